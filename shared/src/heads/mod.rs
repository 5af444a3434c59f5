//! Ref heads: the latest poke per agent, project and ref, in the
//! `pushbus-ref-heads` bucket. filter writes them (one compare-and-set per
//! head, newest push wins); every gitops-notifier replica follows the bucket
//! and reads it for catch-up. Here: the keys, the order heads move in, how
//! the bucket stays bounded, and the writer.

use std::time::Duration;

use async_nats::jetstream::kv::Store;

use crate::names;
use crate::proto::{AgentPoke, RefHead};

mod writer;

pub use writer::HeadWriter;

#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("ref heads bucket: {0}")]
    Kv(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub fn kv_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HeadsError {
    HeadsError::Kv(e.into())
}

/// `<project_id>.<hex(ref)>`: refs may hold any byte a KV key may not.
pub fn ref_key(project_id: i64, r#ref: &str) -> String {
    format!("{project_id}.{}", names::hex_token(r#ref))
}

pub fn head_key(poke: &AgentPoke) -> String {
    format!(
        "{}.{}",
        poke.agent_id,
        ref_key(poke.project_id, &poke.r#ref)
    )
}

/// Where a head's push stands in `PUSHBUS_PUSHES`: (stream epoch, push
/// sequence). A head only ever moves to a higher one, so a push that comes
/// back late (a filter replica died holding it; a redelivery) never replaces
/// a newer push of the same ref, whatever order the heads are written in.
/// Heads written before pokes carried it order as (0, 0): anything wins.
pub fn push_order(head: &RefHead) -> (i64, u64) {
    head.poke
        .as_ref()
        .map_or((0, 0), |p| (p.push_epoch, p.push_sequence))
}

/// How the ref heads are kept bounded.
#[derive(Clone, Copy, Debug)]
pub struct Pruning {
    /// A deleted ref's tombstone lives this long: past it, no push older
    /// than the deletion can still arrive (PUSHBUS_PUSHES keeps pushes 7
    /// days).
    pub deleted_ref_ttl: Duration,
    /// How long the marker a removal leaves lives (every replica's feed
    /// must see it; a replica starting within it learns the removal too).
    pub marker_ttl: Duration,
}

impl Default for Pruning {
    fn default() -> Self {
        Pruning {
            deleted_ref_ttl: DELETED_REF_TTL,
            marker_ttl: crate::topology::REF_HEAD_MARKER_TTL,
        }
    }
}

/// PUSHBUS_PUSHES' 7 days and a day to spare: a push redelivered on its
/// last day is still older than the tombstone.
pub const DELETED_REF_TTL: Duration = Duration::from_secs(8 * 24 * 3600);

/// Why a message of the bucket removes its ref's head, if it does: a delete
/// or purge (`KV-Operation`), or the marker the server leaves when a
/// tombstone expires (`Nats-Marker-Reason`).
pub fn removal(headers: Option<&async_nats::HeaderMap>) -> Option<&str> {
    let headers = headers?;
    headers
        .get("KV-Operation")
        .map(|op| op.as_str())
        .filter(|op| *op == "DEL" || *op == "PURGE")
        .or_else(|| {
            headers
                .get(async_nats::header::NATS_MARKER_REASON)
                .map(|r| r.as_str())
        })
}

/// Whether the bucket accepts per-message TTLs (tombstones and markers
/// expire only then).
pub fn allows_ttl(kv: &Store) -> bool {
    kv.stream.cached_info().config.allow_message_ttl
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_for_any_ref() {
        let key = ref_key(42, "refs/heads/fé/ünï *>.x");
        assert!(key.starts_with("42."));
        assert!(key[3..].bytes().all(|b| b.is_ascii_hexdigit()));
        assert_ne!(ref_key(1, "refs/heads/a"), ref_key(1, "refs/heads/b"));
    }
}
