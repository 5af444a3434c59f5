//! Ref heads: the latest poke per agent, project and ref, in the
//! `pushbus-ref-heads` bucket. The poke consumer (one replica per poke)
//! writes them; every replica follows the bucket and hands each new head to
//! its own connections of that agent. Catch-up on connect reads the same
//! bucket, so live and catch-up share one ordering: the head's revision,
//! which is also the cursor agents resume from.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::kv::{self, Operation, Store};
use async_nats::jetstream::message::Message as JsMessage;
use futures::StreamExt;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentPoke, RefHead, WatchEvent, watch_event::Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conn::RefKey;
use crate::hub::Hub;

#[derive(Debug, thiserror::Error)]
pub enum HeadsError {
    #[error("ref heads bucket: {0}")]
    Kv(String),
}

fn kv_err(e: impl std::fmt::Display) -> HeadsError {
    HeadsError::Kv(e.to_string())
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

/// Writes ref heads. Remembers the revision and push order it last wrote
/// or read per key, so the usual write is one compare-and-set with no read
/// before it; a stale memory (another replica wrote) costs one failed try.
pub struct HeadWriter {
    kv: Store,
    known: Mutex<HashMap<String, Written>>,
}

#[derive(Clone, Copy)]
struct Written {
    revision: u64,
    order: (i64, u64),
}

/// Keys remembered before the memory starts over (bounds it; forgetting only
/// costs a read).
const REMEMBERED_KEYS: usize = 200_000;

impl HeadWriter {
    pub fn new(kv: Store) -> HeadWriter {
        HeadWriter {
            kv,
            known: Mutex::default(),
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
        let mine = |revision| Written { revision, order };
        // Fast path. Heads only move forward, so a remembered order at or
        // past this push's means the bucket's is too.
        let attempt =
            match self.recall(&key) {
                Some(w) if w.order >= order => return Ok(false),
                Some(w) => self
                    .kv
                    .update(&key, value.clone(), w.revision)
                    .await
                    .map_err(|e| {
                        (e.kind() != kv::UpdateErrorKind::WrongLastRevision).then(|| kv_err(e))
                    }),
                None => self.kv.create(&key, value.clone()).await.map_err(|e| {
                    (e.kind() != kv::CreateErrorKind::AlreadyExists).then(|| kv_err(e))
                }),
            };
        match attempt {
            Ok(revision) => {
                self.remember(&key, mine(revision));
                return Ok(true);
            }
            Err(Some(err)) => return Err(err),
            Err(None) => {} // someone else wrote: read and decide
        }
        // Compare-and-set against what is there; a lost race re-reads.
        for _ in 0..16 {
            let current = self.kv.entry(&key).await.map_err(kv_err)?;
            let written = match current {
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
                    match self.kv.update(&key, value.clone(), e.revision).await {
                        Ok(revision) => Some(revision),
                        Err(e) if e.kind() == kv::UpdateErrorKind::WrongLastRevision => None,
                        Err(e) => return Err(kv_err(e)),
                    }
                }
                None => match self.kv.create(&key, value.clone()).await {
                    Ok(revision) => Some(revision),
                    Err(e) if e.kind() == kv::CreateErrorKind::AlreadyExists => None,
                    Err(e) => return Err(kv_err(e)),
                },
            };
            if let Some(revision) = written {
                self.remember(&key, mine(revision));
                return Ok(true);
            }
        }
        Err(kv_err(format!("{key}: too much contention")))
    }
}

/// One head read from the bucket, ready for an outbox.
pub struct Head {
    pub agent_id: String,
    pub key: RefKey,
    pub revision: u64,
    pub event: WatchEvent,
    pub trace: Option<pushbus_shared::proto::TraceContext>,
}

fn parse(msg: &JsMessage) -> Option<Head> {
    let deleted = msg
        .headers
        .as_ref()
        .and_then(|h| h.get("KV-Operation"))
        .is_some_and(|op| op.as_str() == "DEL" || op.as_str() == "PURGE");
    if deleted {
        return None;
    }
    let prefix = format!("$KV.{}.", names::BUCKET_REF_HEADS);
    let key = msg.subject.as_str().strip_prefix(&prefix)?;
    let revision = msg.info().ok()?.stream_sequence;
    head(key, revision, &msg.payload)
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

/// Revision and SHA of every head, per agent: what catch-up needs to pick
/// the refs an agent missed without asking the server per connection (10,000
/// agents reconnecting at once would otherwise each create a consumer).
#[derive(Default)]
pub struct HeadIndex {
    agents: Mutex<HashMap<Arc<str>, HashMap<RefKey, Known>>>,
    /// Every head up to this revision is in the index; later ones are still
    /// to come through the feed (and so reach connections registered now).
    position: AtomicU64,
}

struct Known {
    revision: u64,
    sha: Box<str>,
}

impl HeadIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, HashMap<RefKey, Known>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, h: &Head) {
        let mut agents = self.lock();
        let refs = agents.entry(h.agent_id.as_str().into()).or_default();
        match refs.get_mut(&h.key) {
            Some(k) if k.revision >= h.revision => {}
            Some(k) => {
                k.revision = h.revision;
                k.sha = h.sha().into();
            }
            None => {
                refs.insert(
                    h.key.clone(),
                    Known {
                        revision: h.revision,
                        sha: h.sha().into(),
                    },
                );
            }
        }
    }

    /// The agent's refs `wanted` selects, by (ref key, revision, SHA).
    pub fn select(&self, agent_id: &str, wanted: impl Fn(&str, u64, &str) -> bool) -> Vec<RefKey> {
        self.lock()
            .get(agent_id)
            .map(|refs| {
                refs.iter()
                    .filter(|(key, k)| wanted(key, k.revision, &k.sha))
                    .map(|(key, _)| key.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// The cursor a connection registered now may resume from.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    fn advance(&self, revision: u64) {
        self.position.fetch_max(revision, Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.lock().values().map(HashMap::len).sum()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Reads every current head into a new index; returns it with the revision
/// the live feed must start after.
pub async fn load(kv: &Store) -> Result<(HeadIndex, u64), HeadsError> {
    // Heads written after this point come through the feed (maybe also
    // through the load: the index keeps the higher revision).
    let last = kv
        .stream
        .clone()
        .info()
        .await
        .map_err(kv_err)?
        .state
        .last_sequence;
    let index = HeadIndex::default();
    let consumer = kv
        .stream
        .create_consumer(OrderedConfig {
            filter_subject: format!("$KV.{}.>", names::BUCKET_REF_HEADS),
            deliver_policy: DeliverPolicy::LastPerSubject,
            ..Default::default()
        })
        .await
        .map_err(kv_err)?;
    let count = consumer.cached_info().num_pending as usize;
    let mut messages = consumer.messages().await.map_err(kv_err)?.take(count);
    while let Some(msg) = messages.next().await {
        if let Some(h) = parse(&msg.map_err(kv_err)?) {
            index.record(&h);
        }
    }
    index.advance(last);
    Ok((index, last))
}

/// The current heads of `agent_id` at `keys`, read one by one (direct gets),
/// leaving out those newer than `up_to`: the feed has yet to reach them and
/// will deliver them live, in order.
pub async fn read(
    kv: &Store,
    agent_id: &str,
    keys: &[RefKey],
    up_to: u64,
) -> Result<Vec<Head>, HeadsError> {
    let mut heads = Vec::with_capacity(keys.len());
    for key in keys {
        let full = format!("{agent_id}.{key}");
        if let Some(entry) = kv.entry(&full).await.map_err(kv_err)?
            && entry.operation == Operation::Put
            && entry.revision <= up_to
            && let Some(h) = head(&full, entry.revision, &entry.value)
        {
            heads.push(h);
        }
    }
    Ok(heads)
}

/// Follows the bucket from revision `after` + 1, records every new head in
/// `index` and delivers it to this replica's connections, until `shutdown`.
/// A broken feed, or one whose server went away (`reconnected` fires),
/// resumes after the last head it saw, so nothing written meanwhile (by any
/// replica) is skipped; while it is broken, agents are told to poll.
pub async fn follow(
    kv: Store,
    hub: Hub,
    index: Arc<HeadIndex>,
    after: u64,
    reconnected: Arc<Notify>,
    shutdown: CancellationToken,
) {
    let mut next = after + 1;
    while !shutdown.is_cancelled() {
        let consumer = kv
            .stream
            .create_consumer(OrderedConfig {
                filter_subject: format!("$KV.{}.>", names::BUCKET_REF_HEADS),
                deliver_policy: DeliverPolicy::ByStartSequence {
                    start_sequence: next,
                },
                ..Default::default()
            })
            .await;
        let mut messages = match consumer {
            Ok(c) => match c.messages().await {
                Ok(m) => m,
                Err(err) => {
                    broken(&hub, &err.to_string(), &shutdown).await;
                    continue;
                }
            },
            Err(err) => {
                broken(&hub, &err.to_string(), &shutdown).await;
                continue;
            }
        };
        hub.bus_back();
        let mut check = tokio::time::interval(STALL_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let mut quiet_since = tokio::time::Instant::now();
        loop {
            let msg = tokio::select! {
                _ = shutdown.cancelled() => return,
                // The server may have lost this ephemeral consumer; a new
                // one from `next` is cheap and certain.
                _ = reconnected.notified() => break,
                // So may a leader change or a dead node, silently: a quiet
                // feed with heads waiting on the server is rebuilt.
                _ = check.tick() => {
                    if quiet_since.elapsed() >= STALL_CHECK
                        && let Ok(info) = kv.stream.get_info().await
                        && info.state.last_sequence >= next
                    {
                        tracing::warn!(next, last = info.state.last_sequence, "ref heads feed stalled; following again");
                        break;
                    }
                    continue;
                }
                msg = messages.next() => msg,
            };
            quiet_since = tokio::time::Instant::now();
            match msg {
                Some(Ok(msg)) => {
                    let sequence = msg.info().ok().map(|i| i.stream_sequence);
                    if let Some(s) = sequence {
                        next = s + 1;
                    }
                    let head = parse(&msg);
                    if let Some(head) = &head {
                        index.record(head);
                    }
                    // Recorded first, then the position, then delivery: a
                    // connection that reads the position has every head up
                    // to it in the index and every later one still coming.
                    if let Some(s) = sequence {
                        index.advance(s);
                    }
                    if let Some(head) = head {
                        deliver(&hub, &head);
                    }
                }
                Some(Err(err)) => {
                    broken(&hub, &err.to_string(), &shutdown).await;
                    break;
                }
                None => break,
            }
        }
    }
}

/// Offers a new head to this replica's connections of its agent, in a span
/// that continues the push's trace.
fn deliver(hub: &Hub, head: &Head) {
    let span = tracing::info_span!(
        "deliver",
        otel.kind = "producer",
        agent_id = %head.agent_id,
        event_id = %head.event.event_id,
        correlation_id = %head.event.correlation_id,
        connections = tracing::field::Empty,
    );
    pushbus_shared::trace::continue_stored(&span, head.trace.as_ref());
    let _entered = span.enter();
    let took = hub.deliver(&head.agent_id, &head.key, head.revision, &head.event);
    span.record("connections", took);
    if took > 0
        && let Some(Event::Poke(poke)) = &head.event.event
        && let Some(pushed) = poke
            .pushed_at
            .and_then(|t| std::time::SystemTime::try_from(t).ok())
        && let Ok(age) = std::time::SystemTime::now().duration_since(pushed)
    {
        metrics::histogram!("pushbus_push_to_poke_seconds").record(age.as_secs_f64());
    }
    tracing::debug!(connections = took, "head delivered");
}

/// How long a quiet feed goes before we ask the server whether it missed
/// something.
const STALL_CHECK: Duration = Duration::from_secs(2);

async fn broken(hub: &Hub, err: &str, shutdown: &CancellationToken) {
    if hub.bus_lost() {
        tracing::warn!(%err, "ref heads feed broken; agents told to poll");
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
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
