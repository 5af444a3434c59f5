//! Ref heads: the latest poke per agent, project and ref, in the
//! `pushbus-ref-heads` bucket. filter writes them (see
//! [`pushbus_shared::heads`]); every replica follows the bucket and hands
//! each new head to its own connections of that agent. Catch-up on connect
//! reads the same bucket, so live and catch-up share one ordering: the
//! head's revision, which is also the cursor agents resume from.
//!
//! The bucket stays bounded: a deleted ref's head is a tombstone (the
//! deletion's poke, ordered like any head) that the server expires after
//! [`pushbus_shared::heads::Pruning::deleted_ref_ttl`], longer than any
//! older push can still come back; a deleted agent's heads are purged. Either leaves a marker (itself
//! expiring) that every replica's feed sees and drops from memory.

use async_nats::jetstream::message::Message as JsMessage;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{RefHead, WatchEvent, watch_event::Event};

use crate::conn::RefKey;

mod feed;
mod index;

pub use feed::{follow, load, read};
pub use index::HeadIndex;
pub use pushbus_shared::heads::{HeadsError, allows_ttl, kv_err, ref_key};

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
    let removed = pushbus_shared::heads::removal(msg.headers.as_ref()).is_some();
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
