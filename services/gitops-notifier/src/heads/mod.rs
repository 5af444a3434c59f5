//! Ref heads: the latest poke per agent, project and ref, in the
//! `pushbus-ref-heads` bucket. The poke consumer (one replica per poke)
//! writes them; every replica follows the bucket and hands each new head to
//! its own connections of that agent. Catch-up on connect reads the same
//! bucket, so live and catch-up share one ordering: the head's revision,
//! which is also the cursor agents resume from.
//!
//! The bucket stays bounded: a deleted ref's head is a tombstone (the
//! deletion's poke, ordered like any head) that the server expires after
//! [`Pruning::deleted_ref_ttl`], longer than any older push can still come
//! back; a deleted agent's heads are purged. Either leaves a marker (itself
//! expiring) that every replica's feed sees and drops from memory.

use std::time::Duration;

use async_nats::jetstream::kv::Store;
use async_nats::jetstream::message::Message as JsMessage;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentPoke, RefHead, WatchEvent, watch_event::Event};

use crate::conn::RefKey;

mod feed;
mod index;
mod writer;

pub use feed::{follow, load, read};
pub use index::HeadIndex;
pub use writer::HeadWriter;

#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("ref heads bucket: {0}")]
    Kv(#[source] Box<dyn std::error::Error + Send + Sync>),
}

pub(crate) fn kv_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> HeadsError {
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
/// a newer push of the same ref, whatever order the pokes were published in.
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
    /// days, PUSHBUS_POKES pokes 1 day).
    pub deleted_ref_ttl: Duration,
    /// How long the marker a removal leaves lives (every replica's feed
    /// must see it; a replica starting within it learns the removal too).
    pub marker_ttl: Duration,
}

impl Default for Pruning {
    fn default() -> Self {
        Pruning {
            deleted_ref_ttl: DELETED_REF_TTL,
            marker_ttl: pushbus_shared::topology::REF_HEAD_MARKER_TTL,
        }
    }
}

/// PUSHBUS_PUSHES' 7 days plus PUSHBUS_POKES' 1 day: a push redelivered on
/// its last day still makes a poke that lives one more day.
pub const DELETED_REF_TTL: Duration = Duration::from_secs(8 * 24 * 3600);

/// Whether the bucket accepts per-message TTLs (tombstones and markers
/// expire only then).
pub fn allows_ttl(kv: &Store) -> bool {
    kv.stream.cached_info().config.allow_message_ttl
}

/// One head read from the bucket, ready for an outbox.
pub struct Head {
    pub agent_id: String,
    pub key: RefKey,
    pub revision: u64,
    pub event: WatchEvent,
    pub trace: Option<pushbus_shared::proto::TraceContext>,
}

/// What one message of the bucket says.
// Returned per message and consumed at once: boxing the head would cost an
// allocation per head.
#[allow(clippy::large_enum_variant)]
enum Change {
    Put(Head),
    /// A delete or purge marker, or the marker the server leaves when a
    /// tombstone expires: the ref has no head any more.
    Removed {
        agent_id: String,
        key: RefKey,
        revision: u64,
    },
}

fn parse(msg: &JsMessage) -> Option<Change> {
    let headers = msg.headers.as_ref();
    let removed = headers
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE")
        || headers.is_some_and(|h| h.get(async_nats::header::NATS_MARKER_REASON).is_some());
    let prefix = format!("$KV.{}.", names::BUCKET_REF_HEADS);
    let key = msg.subject.as_str().strip_prefix(&prefix)?;
    let revision = msg.info().ok()?.stream_sequence;
    if removed {
        let (agent_id, ref_key) = key.split_once('.')?;
        return Some(Change::Removed {
            agent_id: agent_id.to_owned(),
            key: ref_key.into(),
            revision,
        });
    }
    head(key, revision, &msg.payload).map(Change::Put)
}

/// A head from its full key (`<agent>.<ref key>`), revision and value.
fn head(key: &str, revision: u64, value: &[u8]) -> Option<Head> {
    let (agent_id, ref_key) = key.split_once('.')?;
    let head = match RefHead::decode(value) {
        Ok(h) => h,
        Err(err) => {
            tracing::warn!(%key, %err, "undecodable ref head skipped");
            return None;
        }
    };
    Some(Head {
        agent_id: agent_id.to_owned(),
        key: ref_key.into(),
        revision,
        trace: head.trace,
        event: WatchEvent {
            event_id: head.event_id,
            correlation_id: head.correlation_id,
            event: head.poke.map(Event::Poke),
            cursor: revision,
            catch_up: false,
        },
    })
}

impl Head {
    fn sha(&self) -> &str {
        match &self.event.event {
            Some(Event::Poke(p)) => &p.new_sha,
            _ => "",
        }
    }
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
