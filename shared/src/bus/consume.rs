use std::future::Future;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, AckKind, consumer::DeliverPolicy, consumer::pull};
use futures::{FutureExt, StreamExt};
use prost::{Message, Name};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::DeadLetters;
use crate::envelope::{self, EventMeta};
use crate::proto::Envelope;
use crate::trace;

/// How a handler failed.
#[derive(Debug, thiserror::Error)]
pub enum HandleError {
    /// Worth another try later (a dependency was down): nak with backoff.
    #[error("{0}")]
    Retryable(String),
    /// Will never succeed (invalid content): dead-letter now.
    #[error("{0}")]
    Permanent(String),
    /// Worth another try, not before `after` (a webhook target's
    /// Retry-After): nak with that delay, never past the spec's backoff cap.
    #[error("{reason}")]
    RetryAfter { reason: String, after: Duration },
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

/// A durable pull consumer and how to run it.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub stream: String,
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// Messages with different subjects handled at once; one subject's
    /// messages are always handled one after another, in stream order.
    pub concurrency: usize,
    /// Deliveries before a message is dead-lettered. Decided here from the
    /// delivery count, never by the server (whose MaxDeliver would silently
    /// park a message with only an advisory).
    pub max_deliver: i64,
    pub ack_wait: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Each nak delay is spread by up to this fraction either way (0.2 =
    /// ±20%), so messages that failed together (one target down) do not
    /// all come back in the same instant.
    pub backoff_jitter: f64,
    pub deliver_policy: DeliverPolicy,
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            filter_subjects: Vec::new(),
            concurrency: 16,
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            backoff_jitter: 0.2,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 1024,
        }
    }

    pub fn pull_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some(format!("pushbus consumer {}", self.durable)),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: a message the server stopped delivering would be
            // neither handled nor dead-lettered. Deliveries used up by
            // replicas that stalled or stopped while holding it end in our
            // dead-letter stream instead (see `process_envelope`).
            max_deliver: -1,
            filter_subjects: self.filter_subjects.clone(),
            deliver_policy: self.deliver_policy,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }

    /// Nak delay before delivery `delivered + 1`: exponential, capped.
    pub fn backoff(&self, delivered: i64) -> Duration {
        let exp = delivered.clamp(1, 20) as u32 - 1;
        self.backoff_base
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.backoff_max)
    }

    /// The delay a target asked for, within the backoff cap (a target must
    /// not park a message for longer than the operator allows) and never
    /// below the base (`Retry-After: 0` must not spin).
    pub fn retry_after_delay(&self, after: Duration) -> Duration {
        after
            .max(self.backoff_base)
            .min(self.backoff_max.max(self.backoff_base))
    }

    /// [`Self::backoff`] spread by ±`backoff_jitter`, from `seed` (any value
    /// that differs between messages and deliveries). The cap applies
    /// before the spread, so capped retries stay spread too.
    pub fn jittered_backoff(&self, delivered: i64, seed: u64) -> Duration {
        let jitter = self.backoff_jitter.clamp(0.0, 1.0);
        // splitmix64 finaliser: turns close seeds into unrelated values.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        self.backoff(delivered)
            .mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
    }
}

/// Differs per message, per delivery and per run: the jitter seed.
fn jitter_seed(stream_sequence: u64, delivered: i64) -> u64 {
    let mut h = std::collections::hash_map::DefaultHasher::new();
    (stream_sequence, delivered).hash(&mut h);
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default()
        .hash(&mut h);
    h.finish()
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
    let worker = Arc::new(Worker {
        handler,
        dead_letters: DeadLetters::new(js.clone(), &spec.durable),
        epoch: std::sync::atomic::AtomicI64::new(epoch),
        span_name: format!("process {}", spec.stream),
        spec: spec.clone(),
        _message: std::marker::PhantomData::<fn() -> M>,
    });
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
            .max_messages_per_batch(lanes)
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

struct Worker<M, H> {
    handler: H,
    dead_letters: DeadLetters,
    epoch: std::sync::atomic::AtomicI64,
    /// `process <stream>`: the span name, made once rather than per message.
    span_name: String,
    spec: ConsumerSpec,
    _message: std::marker::PhantomData<fn() -> M>,
}

impl<M, H> Worker<M, H>
where
    M: Message + Name + Default + Send + 'static,
    H: Handler<M>,
{
    async fn process(&self, msg: jetstream::Message) {
        let (stream_sequence, delivered) = match msg.info() {
            Ok(info) => (info.stream_sequence, info.delivered),
            Err(err) => {
                tracing::warn!(consumer = %self.spec.durable, error = %err, "message without JetStream metadata dropped");
                return;
            }
        };
        let env: Envelope = match envelope::decode(&msg.payload) {
            Ok(env) => env,
            Err(err) => return self.dead_letter(&msg, err.kind(), &err.to_string()).await,
        };
        let span = tracing::info_span!(
            "handle",
            otel.name = %self.span_name,
            otel.kind = "consumer",
            messaging.system = "nats",
            messaging.operation.type = "process",
            messaging.destination.name = %msg.subject,
            messaging.consumer.group.name = %self.spec.durable,
            messaging.message.id = %env.event_id,
            messaging.message.conversation_id = %env.correlation_id,
            consumer = %self.spec.durable,
            event_id = %env.event_id,
            correlation_id = %env.correlation_id,
            subject = %msg.subject,
            stream_sequence,
            delivered,
        );
        trace::continue_trace(&span, msg.headers.as_ref());
        self.process_envelope(msg, env, stream_sequence, delivered)
            .instrument(span)
            .await
    }

    async fn process_envelope(
        &self,
        msg: jetstream::Message,
        env: Envelope,
        stream_sequence: u64,
        delivered: i64,
    ) {
        let message = match envelope::open::<M>(&env) {
            Ok(m) => m,
            Err(err) => return self.dead_letter(&msg, err.kind(), &err.to_string()).await,
        };
        if delivered > self.spec.max_deliver {
            return self
                .dead_letter(
                    &msg,
                    "max_deliveries",
                    "handler did not finish within ack_wait",
                )
                .await;
        }
        let delivery = Delivery {
            message,
            meta: EventMeta::from(&env),
            subject: msg.subject.to_string(),
            stream_sequence,
            order_sequence: msg
                .headers
                .as_ref()
                .and_then(|h| h.get(crate::names::headers::REPLAY_SEQUENCE))
                .and_then(|v| v.as_str().parse().ok())
                .unwrap_or(stream_sequence),
            stream_epoch: self.epoch.load(std::sync::atomic::Ordering::SeqCst),
            delivered,
            occurred_at: env.occurred_at,
        };
        let started = Instant::now();
        let result = self
            .with_progress(&msg, self.handler.handle(delivery))
            .await;
        metrics::histogram!("pushbus_handle_seconds", "consumer" => self.spec.durable.clone())
            .record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(()) => {
                if let Err(err) = msg.double_ack().await {
                    // The effect is done; a redelivery is absorbed by dedup IDs.
                    tracing::warn!(error = %err, "ack not confirmed; message may be redelivered");
                }
                "ok"
            }
            Err(HandleError::Retryable(reason)) if delivered < self.spec.max_deliver => {
                let delay = self
                    .spec
                    .jittered_backoff(delivered, jitter_seed(stream_sequence, delivered));
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler failed; will retry");
                if let Err(err) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "nak failed; redelivery after ack_wait");
                }
                "retry"
            }
            Err(HandleError::RetryAfter { reason, after }) if delivered < self.spec.max_deliver => {
                let delay = self.spec.retry_after_delay(after);
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler failed; will retry");
                if let Err(err) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "nak failed; redelivery after ack_wait");
                }
                "retry"
            }
            Err(HandleError::Retryable(reason) | HandleError::RetryAfter { reason, .. }) => {
                self.dead_letter(&msg, "max_deliveries", &reason).await;
                "dead_letter"
            }
            Err(HandleError::Permanent(reason)) => {
                self.dead_letter(&msg, "permanent", &reason).await;
                "dead_letter"
            }
        };
        metrics::counter!("pushbus_messages_total", "consumer" => self.spec.durable.clone(), "outcome" => outcome)
            .increment(1);
    }

    /// Runs `handling`, telling the server every third of ack_wait that the
    /// message is still being worked on, so a long handler is not redelivered
    /// (and its deliveries used up) while it runs.
    async fn with_progress<T>(
        &self,
        msg: &jetstream::Message,
        handling: impl Future<Output = T>,
    ) -> T {
        tokio::pin!(handling);
        let every = (self.spec.ack_wait / 3).max(Duration::from_millis(50));
        let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + every, every);
        loop {
            tokio::select! {
                result = &mut handling => return result,
                _ = tick.tick() => {
                    if let Err(err) = msg.ack_with(AckKind::Progress).await {
                        tracing::debug!(error = %err, "progress ack failed");
                    }
                }
            }
        }
    }

    async fn dead_letter(&self, msg: &jetstream::Message, kind: &str, detail: &str) {
        let reason = format!("{kind}: {detail}");
        tracing::error!(consumer = %self.spec.durable, subject = %msg.subject, %reason, "dead-lettering message");
        match self.dead_letters.send(msg, &reason).await {
            Ok(()) => {
                if let Err(err) = msg.double_ack_with(AckKind::Term).await {
                    tracing::warn!(error = %err, "term not confirmed; message may come back and be dead-lettered again (deduplicated)");
                }
            }
            Err(err) => {
                // Never drop it: try again later.
                tracing::error!(error = %err, "dead-letter publish failed; will retry");
                let _ = msg
                    .ack_with(AckKind::Nak(Some(self.spec.backoff_max)))
                    .await;
            }
        }
    }
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
