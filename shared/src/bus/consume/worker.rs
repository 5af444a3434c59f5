//! One message at a time: decode, hand to the handler, then ack, nak with
//! backoff, or dead-letter.

use std::hash::{Hash, Hasher};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use async_nats::jetstream::AckKind;
use prost::{Message, Name};
use tracing::Instrument;

use super::{ConsumerSpec, Delivery, HandleError, Handler};
use crate::bus::DeadLetters;
use crate::envelope::EventMeta;
use crate::proto::Envelope;
use crate::{envelope, trace};

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

pub(super) struct Worker<M, H> {
    handler: H,
    dead_letters: DeadLetters,
    pub(super) epoch: std::sync::atomic::AtomicI64,
    /// `process <stream>`: the span name, made once rather than per message.
    span_name: String,
    spec: ConsumerSpec,
    /// Metric handles, registered once: looking them up by name and label
    /// costs a label allocation and a hash per message.
    handle_seconds: metrics::Histogram,
    outcomes: Outcomes,
    _message: std::marker::PhantomData<fn() -> M>,
}

/// `pushbus_messages_total` of one consumer, by outcome.
struct Outcomes {
    ok: metrics::Counter,
    retry: metrics::Counter,
    dead_letter: metrics::Counter,
}

impl<M, H> Worker<M, H> {
    pub(super) fn new(
        handler: H,
        dead_letters: DeadLetters,
        epoch: i64,
        spec: ConsumerSpec,
    ) -> Self {
        // Handles made before the recorder is installed would record nothing.
        let _ = crate::ops::metrics_handle();
        let consumer = spec.durable.clone();
        let outcome = |outcome: &'static str| metrics::counter!("pushbus_messages_total", "consumer" => consumer.clone(), "outcome" => outcome);
        Worker {
            handler,
            dead_letters,
            epoch: std::sync::atomic::AtomicI64::new(epoch),
            span_name: format!("process {}", spec.stream),
            handle_seconds: metrics::histogram!("pushbus_handle_seconds", "consumer" => consumer.clone()),
            outcomes: Outcomes {
                ok: outcome("ok"),
                retry: outcome("retry"),
                dead_letter: outcome("dead_letter"),
            },
            spec,
            _message: std::marker::PhantomData,
        }
    }
}

impl<M, H> Worker<M, H>
where
    M: Message + Name + Default + Send + 'static,
    H: Handler<M>,
{
    pub(super) async fn process(&self, msg: jetstream::Message) {
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
            consumer = %self.spec.durable,
            event_id = %env.event_id,
            correlation_id = %env.correlation_id,
            subject = %msg.subject,
            stream_sequence,
            delivered,
        );
        trace::exported_attributes(&span, || {
            [
                ("messaging.system", "nats".into()),
                ("messaging.operation.type", "process".into()),
                ("messaging.destination.name", msg.subject.to_string()),
                ("messaging.consumer.group.name", self.spec.durable.clone()),
                ("messaging.message.id", env.event_id.clone()),
                (
                    "messaging.message.conversation_id",
                    env.correlation_id.clone(),
                ),
            ]
        });
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
        self.handle_seconds.record(started.elapsed().as_secs_f64());
        let outcome = match result {
            Ok(()) => {
                // A plain ack, not a confirmed one: the effect is durable
                // already, and an ack the server never saw only means a
                // redelivery after ack_wait, which every handler absorbs
                // (dedup IDs, heads that only move forward). Confirming
                // cost a request and its reply per message (BENCHMARKS.md).
                if let Err(err) = msg.ack().await {
                    tracing::warn!(error = %err, "ack not sent; message may be redelivered");
                }
                &self.outcomes.ok
            }
            Err(HandleError::Retryable(reason)) if delivered < self.spec.max_deliver => {
                let delay = self
                    .spec
                    .jittered_backoff(delivered, jitter_seed(stream_sequence, delivered));
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler failed; will retry");
                if let Err(err) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "nak failed; redelivery after ack_wait");
                }
                &self.outcomes.retry
            }
            Err(HandleError::RetryAfter { reason, after }) if delivered < self.spec.max_deliver => {
                let delay = self.spec.retry_after_delay(after);
                tracing::warn!(%reason, retry_in_ms = delay.as_millis() as u64, "handler failed; will retry");
                if let Err(err) = msg.ack_with(AckKind::Nak(Some(delay))).await {
                    tracing::warn!(error = %err, "nak failed; redelivery after ack_wait");
                }
                &self.outcomes.retry
            }
            Err(e @ (HandleError::Retryable(_) | HandleError::RetryAfter { .. })) => {
                self.dead_letter(&msg, "max_deliveries", &e.to_string())
                    .await;
                &self.outcomes.dead_letter
            }
            Err(HandleError::Permanent(reason)) => {
                self.dead_letter(&msg, "permanent", &reason.to_string())
                    .await;
                &self.outcomes.dead_letter
            }
        };
        outcome.increment(1);
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
