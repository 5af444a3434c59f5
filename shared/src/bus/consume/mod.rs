//! Running a durable pull consumer: create or bind it, spread messages over
//! per-key lanes, and stop cleanly, handing unstarted messages back.

use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::{self, AckKind, consumer::pull};
use futures::{FutureExt, StreamExt};
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

use super::DeadLetters;
use crate::envelope::EventMeta;

mod spec;
mod worker;

pub use spec::ConsumerSpec;
use worker::Worker;

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth another try later (a dependency was down): nak with backoff.
    #[error(transparent)]
    Retryable(Box<dyn std::error::Error + Send + Sync>),
    /// Will never succeed (invalid content): dead-letter now.
    #[error(transparent)]
    Permanent(Box<dyn std::error::Error + Send + Sync>),
    /// Worth another try, not before `after` (a webhook target's
    /// Retry-After): nak with that delay, never past the spec's backoff cap.
    #[error("{reason}")]
    RetryAfter { reason: String, after: Duration },
}

impl HandleError {
    /// Retryable, from an error or a message.
    pub fn retryable(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandleError::Retryable(e.into())
    }

    /// Permanent, from an error or a message.
    pub fn permanent(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> Self {
        HandleError::Permanent(e.into())
    }
}

/// One decoded message handed to a handler.
#[derive(Debug)]
pub struct Delivery<M> {
    pub message: M,
    pub meta: EventMeta,
    pub subject: String,
    pub stream_sequence: u64,
    /// Where the message stands in its stream's order: its sequence, or for
    /// a dead letter replayed by `pushbus dlq replay` the original's, so a
    /// replayed push orders as the push it was.
    pub order_sequence: u64,
    /// When the stream was created (unix nanoseconds): with
    /// `stream_sequence`, a position that still grows if the stream is
    /// deleted and created again.
    pub stream_epoch: i64,
    /// 1 on the first delivery.
    pub delivered: i64,
    pub occurred_at: Option<prost_types::Timestamp>,
}

/// Reacts to one message. Returning `Ok` means the effect is durable: the
/// message is acked right after.
pub trait Handler<M>: Send + Sync + 'static {
    fn handle(&self, delivery: Delivery<M>)
    -> impl Future<Output = Result<(), HandleError>> + Send;
}

#[derive(Debug, thiserror::Error)]
pub enum ConsumeError {
    #[error("cannot create consumer {durable} on {stream}: {source}")]
    Create {
        stream: String,
        durable: String,
        source: jetstream::stream::ConsumerError,
    },
    #[error("cannot open stream {stream}: {source}")]
    Stream {
        stream: String,
        source: jetstream::context::GetStreamError,
    },
}

/// Runs `handler` over the durable consumer until `shutdown`, then stops
/// pulling, lets in-flight messages finish and returns.
pub async fn run_consumer<M, H>(
    js: jetstream::Context,
    spec: ConsumerSpec,
    handler: H,
    shutdown: CancellationToken,
) -> Result<(), ConsumeError>
where
    M: Message + Name + Default + Send + 'static,
    H: Handler<M>,
{
    // NATS may be out of reach for a while (a restart, an election): keep
    // trying rather than fail the service.
    let mut delay = Duration::from_millis(200);
    let (mut consumer, epoch) = loop {
        match create(&js, &spec).await {
            Ok(created) => break created,
            Err(err) => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "cannot create the consumer yet");
                tokio::select! {
                    _ = shutdown.cancelled() => return Ok(()),
                    _ = tokio::time::sleep(delay) => {}
                }
                delay = (delay * 2).min(Duration::from_secs(5));
            }
        }
    };
    let worker = Arc::new(Worker::<M, H>::new(
        handler,
        DeadLetters::new(js.clone(), &spec.durable),
        epoch,
        spec.clone(),
    ));
    let gauges = tokio::spawn(report_consumer(js.clone(), spec.clone(), shutdown.clone()));
    let lanes = spec.concurrency.max(1);
    let mut senders = Vec::with_capacity(lanes);
    let mut tasks = tokio::task::JoinSet::new();
    for _ in 0..lanes {
        // A lane holds one message waiting behind the one being handled, so
        // few messages sit pulled-but-idle (their ack_wait is running).
        let (tx, mut rx) = mpsc::channel::<jetstream::Message>(1);
        senders.push(tx);
        let worker = worker.clone();
        tasks.spawn(async move {
            while let Some(msg) = rx.recv().await {
                worker.process(msg).await;
            }
        });
    }

    let mut recreate = false;
    'pull: while !shutdown.is_cancelled() {
        if std::mem::take(&mut recreate) {
            // The consumer (or its stream) may be gone: creating it again
            // is idempotent when it is not.
            match create(&js, &spec).await {
                Ok((c, epoch)) => {
                    consumer = c;
                    worker
                        .epoch
                        .store(epoch, std::sync::atomic::Ordering::SeqCst);
                }
                Err(err) => tracing::warn!(error = %err, "cannot create the consumer again"),
            }
        }
        let mut messages = match consumer
            .stream()
            .max_messages_per_batch(spec.pull_batch.max(lanes))
            .heartbeat(Duration::from_secs(5))
            .expires(Duration::from_secs(30))
            .messages()
            .await
        {
            Ok(m) => m,
            Err(err) => {
                tracing::warn!(consumer = %spec.durable, error = %err, "cannot start pulling; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => break 'pull,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => {}
                }
                recreate = true;
                continue 'pull;
            }
        };
        loop {
            let next = tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    hand_back(messages, None).await;
                    break 'pull;
                }
                next = messages.next() => next,
            };
            match next {
                Some(Ok(msg)) => {
                    let lane = lane_of(&msg.subject, lanes);
                    let permit = tokio::select! {
                        biased;
                        permit = senders[lane].reserve() => permit,
                        _ = shutdown.cancelled() => {
                            hand_back(messages, Some(msg)).await;
                            break 'pull;
                        }
                    };
                    match permit {
                        Ok(permit) => permit.send(msg),
                        Err(_) => break 'pull,
                    }
                }
                Some(Err(err)) => {
                    // Missed heartbeats, reconnects, a deleted consumer or
                    // stream: pull again from a consumer known to exist.
                    tracing::warn!(consumer = %spec.durable, error = %err, "pull error; pulling again");
                    hand_back(messages, None).await;
                    tokio::select! {
                        _ = shutdown.cancelled() => break 'pull,
                        _ = tokio::time::sleep(Duration::from_millis(200)) => {}
                    }
                    recreate = true;
                    continue 'pull;
                }
                None => continue 'pull,
            }
        }
    }
    // Messages already queued to a lane are finished (one per lane at most).
    drop(senders);
    gauges.abort();
    while tasks.join_next().await.is_some() {}
    Ok(())
}

/// Every 10 s: the consumer's backlog and its dead letters, as gauges, so
/// a dashboard shows lag per durable consumer and DLQ depth.
async fn report_consumer(js: jetstream::Context, spec: ConsumerSpec, stop: CancellationToken) {
    let labels = [("consumer", spec.durable.clone())];
    let dlq_subject = crate::names::dlq_subject(&spec.durable);
    loop {
        if let Ok(stream) = js.get_stream(&spec.stream).await
            && let Ok(mut consumer) = stream.get_consumer::<pull::Config>(&spec.durable).await
            && let Ok(info) = consumer.info().await
        {
            metrics::gauge!("pushbus_consumer_pending", &labels).set(info.num_pending as f64);
            metrics::gauge!("pushbus_consumer_ack_pending", &labels)
                .set(info.num_ack_pending as f64);
            metrics::gauge!("pushbus_consumer_redelivered", &labels)
                .set(info.num_redelivered as f64);
        }
        if let Ok(dlq) = js.get_stream(crate::names::STREAM_DLQ).await
            && let Ok(mut subjects) = dlq.info_with_subjects(&dlq_subject).await
        {
            let mut depth = 0;
            while let Some(Ok((_, n))) = subjects.next().await {
                depth += n;
            }
            metrics::gauge!("pushbus_dlq_messages", &labels).set(depth as f64);
        }
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(10)) => {}
        }
    }
}

/// The consumer, and when its stream was created.
async fn create(
    js: &jetstream::Context,
    spec: &ConsumerSpec,
) -> Result<(jetstream::consumer::PullConsumer, i64), ConsumeError> {
    let err = |source| ConsumeError::Create {
        stream: spec.stream.clone(),
        durable: spec.durable.clone(),
        source,
    };
    let stream = js
        .get_stream(&spec.stream)
        .await
        .map_err(|e| ConsumeError::Stream {
            stream: spec.stream.clone(),
            source: e,
        })?;
    let epoch = i64::try_from(stream.cached_info().created.unix_timestamp_nanos()).unwrap_or(0);
    let consumer = match stream.get_consumer(&spec.durable).await {
        Ok(consumer) => consumer,
        // Missing (or unreadable): create it; a consumer that exists keeps what an
        // operator (or `pushbus setup`) set.
        Err(_) => stream
            .create_consumer(spec.pull_config())
            .await
            .map_err(err)?,
    };
    Ok((consumer, epoch))
}

/// Stops pulling, then hands back at once what this replica holds but has
/// not started (`held`, and whatever the pull already buffered), so another
/// replica takes it now rather than after ack_wait. Safe because the server
/// never runs out of deliveries (unlimited max_deliver) and we stopped
/// pulling first, so the handed-back messages cannot come straight back here.
async fn hand_back(mut messages: pull::Stream, held: Option<jetstream::Message>) {
    let mut back: Vec<jetstream::Message> = held.into_iter().collect();
    while let Some(Some(Ok(msg))) = messages.next().now_or_never() {
        back.push(msg);
    }
    drop(messages);
    for msg in back {
        if let Err(err) = msg.ack_with(AckKind::Nak(None)).await {
            tracing::debug!(error = %err, "hand-back nak failed; redelivery after ack_wait");
        }
    }
}

/// Same key, same lane: that is what keeps per-key order. The key is the
/// subject's first three tokens (`pushbus.poke.<agent>`,
/// `pushbus.push.<project>` of `pushbus.push.<project>.<event>`), so one
/// project's push events share a lane although each has its own subject.
fn lane_of(subject: &str, lanes: usize) -> usize {
    let key = match subject.match_indices('.').nth(2) {
        Some((end, _)) => &subject[..end],
        None => subject,
    };
    let mut h = std::collections::hash_map::DefaultHasher::new();
    key.hash(&mut h);
    (h.finish() % lanes as u64) as usize
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_after_stays_within_base_and_cap() {
        let spec = ConsumerSpec {
            backoff_base: Duration::from_millis(100),
            backoff_max: Duration::from_secs(2),
            ..ConsumerSpec::new("S", "d")
        };
        assert_eq!(
            spec.retry_after_delay(Duration::from_secs(1)),
            Duration::from_secs(1)
        );
        assert_eq!(
            spec.retry_after_delay(Duration::ZERO),
            Duration::from_millis(100)
        );
        assert_eq!(
            spec.retry_after_delay(Duration::from_secs(3600)),
            Duration::from_secs(2)
        );
    }

    #[test]
    fn backoff_grows_and_caps() {
        let spec = ConsumerSpec::new("S", "c");
        assert_eq!(spec.backoff(1), Duration::from_millis(200));
        assert_eq!(spec.backoff(2), Duration::from_millis(400));
        assert_eq!(spec.backoff(3), Duration::from_millis(800));
        assert_eq!(spec.backoff(50), Duration::from_secs(30));
    }

    #[test]
    fn jitter_stays_within_bounds_and_varies() {
        let spec = ConsumerSpec::new("S", "c");
        let mut seen = std::collections::HashSet::new();
        for seed in 0..1000u64 {
            let d = spec.jittered_backoff(3, seed);
            assert!(
                d >= Duration::from_millis(640) && d <= Duration::from_millis(960),
                "{d:?}"
            );
            seen.insert(d);
        }
        assert!(seen.len() > 100, "jitter barely varies");
        let capped = spec.jittered_backoff(50, 7);
        assert!(capped >= Duration::from_secs(24) && capped <= Duration::from_secs(36));
        let none = ConsumerSpec {
            backoff_jitter: 0.0,
            ..spec
        };
        assert_eq!(none.jittered_backoff(2, 99), Duration::from_millis(400));
    }

    #[test]
    fn lanes_are_stable() {
        assert_eq!(lane_of("pushbus.push.1", 8), lane_of("pushbus.push.1", 8));
        assert!(lane_of("x", 3) < 3);
        // One project's events share a lane whatever their event IDs.
        for lanes in [2, 7, 16] {
            assert_eq!(
                lane_of("pushbus.push.1.aaa", lanes),
                lane_of("pushbus.push.1.bbb", lanes)
            );
            assert_eq!(
                lane_of("pushbus.push.1.aaa", lanes),
                lane_of("pushbus.push.1", lanes)
            );
        }
    }
}
