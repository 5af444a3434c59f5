//! Writing ref heads: one compare-and-set per head, newest push wins.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

use crate::names;
use crate::proto::{ChangeKind, RefHead};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{Operation, Store};
use prost::Message;

use super::{HeadsError, Pruning, allows_ttl, head_key, kv_err, push_order};

/// Writes ref heads. Remembers the revision and push order it last wrote
/// or read per key, so the usual write is one compare-and-set with no read
/// before it; a stale memory (another replica wrote) costs one failed try.
pub struct HeadWriter {
    kv: Store,
    js: async_nats::jetstream::Context,
    known: Mutex<HashMap<String, Written>>,
    /// How long a deleted ref's tombstone lives; None when the bucket does
    /// not allow per-message TTLs (made before they were used: `pushbus
    /// setup` updates it), and tombstones then stay.
    deleted_ttl: Option<Duration>,
}

#[derive(Clone, Copy)]
pub(super) struct Written {
    revision: u64,
    order: (i64, u64),
}

/// Keys remembered before the memory starts over (bounds it; forgetting only
/// costs a read).
pub(super) const REMEMBERED_KEYS: usize = 200_000;

impl HeadWriter {
    pub fn new(kv: Store, js: async_nats::jetstream::Context, pruning: Pruning) -> HeadWriter {
        let deleted_ttl = allows_ttl(&kv).then_some(pruning.deleted_ref_ttl);
        if deleted_ttl.is_none() {
            tracing::warn!(
                bucket = names::BUCKET_REF_HEADS,
                "bucket without per-message TTLs: deleted refs' tombstones are kept (run `pushbus setup`)"
            );
        }
        HeadWriter {
            kv,
            js,
            known: Mutex::default(),
            deleted_ttl,
        }
    }

    /// Writes `value` at `key` if the key's last revision is `last` (0: no
    /// value); None when it is not (someone else wrote).
    async fn swap(
        &self,
        key: &str,
        value: bytes::Bytes,
        last: u64,
        ttl: Option<Duration>,
    ) -> Result<Option<u64>, HeadsError> {
        let mut headers = async_nats::HeaderMap::new();
        headers.insert(
            async_nats::header::NATS_EXPECTED_LAST_SUBJECT_SEQUENCE,
            last.to_string(),
        );
        if let Some(ttl) = ttl {
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                ttl.as_secs().max(1).to_string(),
            );
        }
        let subject = format!(
            "{}{key}",
            self.kv.put_prefix.as_ref().unwrap_or(&self.kv.prefix)
        );
        let ack = self
            .js
            .publish_with_headers(subject, headers, value)
            .await
            .map_err(kv_err)?
            .await;
        match ack {
            Ok(ack) => Ok(Some(ack.sequence)),
            Err(e) if e.kind() == PublishErrorKind::WrongLastSequence => Ok(None),
            Err(e) => Err(kv_err(e)),
        }
    }

    fn recall(&self, key: &str) -> Option<Written> {
        self.known
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .get(key)
            .copied()
    }

    fn remember(&self, key: &str, w: Written) {
        let mut known = self.known.lock().unwrap_or_else(|e| e.into_inner());
        if known.len() >= REMEMBERED_KEYS {
            known.clear();
        }
        known.insert(key.to_owned(), w);
    }

    /// Records `head` unless the bucket already holds this push or a newer
    /// one of the ref (see [`push_order`]). Returns whether it wrote.
    pub async fn record(&self, head: &RefHead) -> Result<bool, HeadsError> {
        let poke = head
            .poke
            .as_ref()
            .ok_or_else(|| kv_err("head without a poke"))?;
        let key = head_key(poke);
        let value: bytes::Bytes = head.encode_to_vec().into();
        let order = push_order(head);
        // A deletion's head is a tombstone: it keeps the deletion's push
        // order (no older push brings the ref back) until no older push can
        // come any more, then the server removes it.
        let ttl = self
            .deleted_ttl
            .filter(|_| poke.change_kind == ChangeKind::Delete as i32);
        let mine = |revision| Written { revision, order };
        // Fast path. Heads only move forward, so a remembered order at or
        // past this push's means the bucket's is too.
        let last = match self.recall(&key) {
            Some(w) if w.order >= order => return Ok(false),
            Some(w) => w.revision,
            None => 0,
        };
        if let Some(revision) = self.swap(&key, value.clone(), last, ttl).await? {
            self.remember(&key, mine(revision));
            return Ok(true);
        }
        // Compare-and-set against what is there; a lost race re-reads.
        for _ in 0..16 {
            let current = self.kv.entry(&key).await.map_err(kv_err)?;
            // A removed head (marker) or none: the ref starts afresh.
            let last = match current {
                Some(e) => {
                    let there = (e.operation == Operation::Put)
                        .then(|| RefHead::decode(e.value.as_ref()).ok())
                        .flatten();
                    if let Some(h) = &there
                        && push_order(h) >= order
                    {
                        self.remember(
                            &key,
                            Written {
                                revision: e.revision,
                                order: push_order(h),
                            },
                        );
                        return Ok(false);
                    }
                    e.revision
                }
                None => 0,
            };
            if let Some(revision) = self.swap(&key, value.clone(), last, ttl).await? {
                self.remember(&key, mine(revision));
                return Ok(true);
            }
        }
        Err(kv_err(format!("{key}: too much contention")))
    }
}
