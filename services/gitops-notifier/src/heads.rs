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

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use async_nats::jetstream::consumer::{DeliverPolicy, pull::OrderedConfig};
use async_nats::jetstream::context::PublishErrorKind;
use async_nats::jetstream::kv::{Operation, Store};
use async_nats::jetstream::message::Message as JsMessage;
use futures::StreamExt;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentPoke, ChangeKind, RefHead, WatchEvent, watch_event::Event};
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use crate::conn::RefKey;
use crate::hub::Hub;

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

#[derive(Clone, Copy)]
struct Written {
    revision: u64,
    order: (i64, u64),
}

/// Keys remembered before the memory starts over (bounds it; forgetting only
/// costs a read).
const REMEMBERED_KEYS: usize = 200_000;

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
            last.to_string().as_str(),
        );
        if let Some(ttl) = ttl {
            headers.insert(
                async_nats::header::NATS_MESSAGE_TTL,
                ttl.as_secs().max(1).to_string().as_str(),
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

/// Revision and SHA of every head, per agent: what catch-up needs to pick
/// the refs an agent missed without asking the server per connection (10,000
/// agents reconnecting at once would otherwise each create a consumer).
#[derive(Default)]
pub struct HeadIndex {
    inner: Mutex<Agents>,
    /// Every head up to this revision is in the index; later ones are still
    /// to come through the feed (and so reach connections registered now).
    position: AtomicU64,
}

#[derive(Default)]
struct Agents {
    by_id: HashMap<Arc<str>, AgentHeads>,
    /// Heads in all (the `pushbus_notifier_ref_heads` gauge).
    heads: usize,
}

#[derive(Default)]
struct AgentHeads {
    refs: HashMap<RefKey, Known>,
    /// The highest revision of a head of this agent that was removed: an
    /// agent whose cursor is below it may have missed that removal, which
    /// catch-up can no longer show it.
    removed_up_to: u64,
}

struct Known {
    revision: u64,
    sha: Box<str>,
}

impl HeadIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Agents> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, h: &Head) {
        let mut agents = self.lock();
        let refs = &mut agents
            .by_id
            .entry(h.agent_id.as_str().into())
            .or_default()
            .refs;
        let added = match refs.get_mut(&h.key) {
            Some(k) if k.revision >= h.revision => false,
            Some(k) => {
                k.revision = h.revision;
                k.sha = h.sha().into();
                false
            }
            None => {
                refs.insert(
                    h.key.clone(),
                    Known {
                        revision: h.revision,
                        sha: h.sha().into(),
                    },
                );
                true
            }
        };
        if added {
            agents.heads += 1;
            gauge(agents.heads);
        }
    }

    /// The ref's head was removed by the marker at `revision`.
    fn remove(&self, agent_id: &str, key: &RefKey, revision: u64) {
        let mut agents = self.lock();
        let agent = agents.by_id.entry(agent_id.into()).or_default();
        let removed = match agent.refs.get(key) {
            // A later head of the ref (loaded, or a feed that went back).
            Some(k) if k.revision > revision => return,
            Some(k) => {
                let r = k.revision;
                agent.refs.remove(key);
                Some(r)
            }
            None => None,
        };
        // Without the head (a replica that started after it went), the
        // marker's own revision: later than the head's, so never too low.
        agent.removed_up_to = agent.removed_up_to.max(removed.unwrap_or(revision));
        if removed.is_some() {
            agents.heads -= 1;
            gauge(agents.heads);
        }
    }

    /// Forgets everything about a deleted agent.
    pub fn forget_agent(&self, agent_id: &str) {
        let mut agents = self.lock();
        if let Some(gone) = agents.by_id.remove(agent_id) {
            agents.heads -= gone.refs.len();
            gauge(agents.heads);
        }
    }

    /// The agent's refs `wanted` selects, by (ref key, revision, SHA).
    pub fn select(&self, agent_id: &str, wanted: impl Fn(&str, u64, &str) -> bool) -> Vec<RefKey> {
        self.lock()
            .by_id
            .get(agent_id)
            .map(|agent| {
                agent
                    .refs
                    .iter()
                    .filter(|(key, k)| wanted(key, k.revision, &k.sha))
                    .map(|(key, _)| key.clone())
                    .collect()
            })
            .unwrap_or_default()
    }

    /// (ref key, revision) of every head of the agent.
    pub fn heads_of(&self, agent_id: &str) -> Vec<(RefKey, u64)> {
        self.lock()
            .by_id
            .get(agent_id)
            .map(|agent| {
                agent
                    .refs
                    .iter()
                    .map(|(key, k)| (key.clone(), k.revision))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every agent the index holds something for.
    pub fn agents(&self) -> Vec<Arc<str>> {
        self.lock().by_id.keys().cloned().collect()
    }

    /// See [`AgentHeads::removed_up_to`]; 0 when nothing was removed.
    pub fn removed_up_to(&self, agent_id: &str) -> u64 {
        self.lock()
            .by_id
            .get(agent_id)
            .map_or(0, |a| a.removed_up_to)
    }

    /// The cursor a connection registered now may resume from.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    fn advance(&self, revision: u64) {
        self.position.fetch_max(revision, Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.lock().heads
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

fn gauge(heads: usize) {
    metrics::gauge!("pushbus_notifier_ref_heads").set(heads as f64);
}

fn apply(index: &HeadIndex, change: &Change) {
    match change {
        Change::Put(h) => index.record(h),
        Change::Removed {
            agent_id,
            key,
            revision,
        } => index.remove(agent_id, key, *revision),
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
        if let Some(change) = parse(&msg.map_err(kv_err)?) {
            apply(&index, &change);
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
                    let change = parse(&msg);
                    if let Some(change) = &change {
                        apply(&index, change);
                    }
                    // Recorded first, then the position, then delivery: a
                    // connection that reads the position has every head up
                    // to it in the index and every later one still coming.
                    if let Some(s) = sequence {
                        index.advance(s);
                    }
                    // A removal is no news to agents: the deletion's poke
                    // went out when it happened.
                    if let Some(Change::Put(head)) = change {
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
