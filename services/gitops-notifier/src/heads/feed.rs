//! Loading the heads, reading an agent's, and following the bucket live.

use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::consumer::DeliverPolicy;
use async_nats::jetstream::consumer::pull::OrderedConfig;
use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;
use pushbus_shared::names;
use pushbus_shared::proto::watch_event::Event;
use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::index::apply;
use super::{Change, Head, HeadIndex, HeadsError, head, kv_err, parse};
use crate::conn::RefKey;
use crate::hub::Hub;

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
pub(super) fn deliver(hub: &Hub, head: &Head) {
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
    metrics::counter!("pushbus_notifier_heads_followed_total").increment(1);
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
pub(super) const STALL_CHECK: Duration = Duration::from_secs(2);

pub(super) async fn broken(hub: &Hub, err: &str, shutdown: &CancellationToken) {
    if hub.bus_lost() {
        tracing::warn!(%err, "ref heads feed broken; agents told to poll");
    }
    tokio::select! {
        _ = shutdown.cancelled() => {}
        _ = tokio::time::sleep(Duration::from_millis(500)) => {}
    }
}
