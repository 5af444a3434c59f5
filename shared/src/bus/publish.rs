use std::time::Instant;

use async_nats::HeaderMap;
use async_nats::jetstream::{
    self, context::PublishAckFuture, message::PublishMessage, publish::PublishAck,
};
use prost::{Message, Name};

use crate::envelope::{self, EventMeta};
use crate::names::headers;
use crate::proto::Source;
use crate::trace;
use tracing::Instrument;

#[derive(Debug, thiserror::Error)]
pub enum PublishError {
    #[error("cannot publish event {event_id} to {subject}: {source}")]
    Send {
        event_id: String,
        subject: String,
        source: jetstream::context::PublishError,
    },
    #[error("no publish ack for event {event_id}: {source}")]
    Ack {
        event_id: String,
        source: jetstream::context::PublishError,
    },
}

impl PublishError {
    /// The message is larger than the server's `max_payload`; retrying the
    /// same bytes cannot succeed.
    pub fn is_too_large(&self) -> bool {
        matches!(self, Self::Send { source, .. }
            if source.kind() == jetstream::context::PublishErrorKind::MaxPayloadExceeded)
    }

    /// A [`Publisher::send_once`] whose subject already holds a message:
    /// the event was stored before (a replay), so this copy was refused.
    pub fn is_already_stored(&self) -> bool {
        matches!(self, Self::Ack { source, .. }
            if source.kind() == jetstream::context::PublishErrorKind::WrongLastSequence)
    }
}

/// Publishes protobuf messages in envelopes to JetStream.
#[derive(Clone)]
pub struct Publisher {
    js: jetstream::Context,
    source: Source,
    /// `ce-source`, made once rather than per message.
    ce_source: String,
    /// Whether messages carry the CloudEvents `ce-*` headers.
    cloud_events: bool,
}

/// A publish that was sent; its ack has not been awaited yet. Awaiting acks
/// of several sends together pipelines them.
pub struct PendingAck {
    event_id: String,
    started: Instant,
    fut: PublishAckFuture,
}

impl PendingAck {
    pub async fn wait(self) -> Result<PublishAck, PublishError> {
        let ack = self.fut.await.map_err(|source| PublishError::Ack {
            event_id: self.event_id.clone(),
            source,
        })?;
        metrics::histogram!("pushbus_publish_ack_seconds")
            .record(self.started.elapsed().as_secs_f64());
        if ack.duplicate {
            metrics::counter!("pushbus_publish_duplicates_total").increment(1);
            tracing::debug!(event_id = %self.event_id, "duplicate publish dropped by the stream");
        }
        Ok(ack)
    }
}

impl Publisher {
    pub fn new(js: jetstream::Context, source: Source) -> Self {
        let ce_source = format!("/pushbus/{}", source.service);
        Self {
            js,
            source,
            ce_source,
            cloud_events: true,
        }
    }

    /// Leaves the CloudEvents headers off (`--bus-no-cloudevents`): every
    /// reader of the bus parses each header of each message, and these are
    /// most of them. The envelope and the `Pushbus-*` headers still carry
    /// the same facts.
    pub fn without_cloud_events(mut self) -> Self {
        self.cloud_events = false;
        self
    }

    pub fn jetstream(&self) -> &jetstream::Context {
        &self.js
    }

    pub fn source(&self) -> &Source {
        &self.source
    }

    /// Publishes and waits for the stream's ack: `Ok` means stored (or a
    /// duplicate of something stored).
    pub async fn publish<M: Message + Name>(
        &self,
        subject: String,
        msg: &M,
        meta: &EventMeta,
    ) -> Result<PublishAck, PublishError> {
        self.send(subject, msg, meta).await?.wait().await
    }

    /// Sends without waiting for the ack.
    pub async fn send<M: Message + Name>(
        &self,
        subject: String,
        msg: &M,
        meta: &EventMeta,
    ) -> Result<PendingAck, PublishError> {
        self.send_with(subject, msg, meta, false).await
    }

    /// Sends on a subject of the event's own, on condition that it holds no
    /// message yet: the stream stores the event at most once for as long as
    /// it keeps it, however late a replay comes (the duplicate window covers
    /// only two minutes). A refused copy fails with
    /// [`PublishError::is_already_stored`].
    pub async fn send_once<M: Message + Name>(
        &self,
        subject: String,
        msg: &M,
        meta: &EventMeta,
    ) -> Result<PendingAck, PublishError> {
        self.send_with(subject, msg, meta, true).await
    }

    async fn send_with<M: Message + Name>(
        &self,
        subject: String,
        msg: &M,
        meta: &EventMeta,
        once: bool,
    ) -> Result<PendingAck, PublishError> {
        // The consumer's span is a child of this one, wherever it runs.
        let span = tracing::info_span!(
            "publish",
            otel.name = %format!("send {}", subject_family(&subject)),
            otel.kind = "producer",
            event_id = %meta.event_id,
            correlation_id = %meta.correlation_id,
            %subject,
        );
        trace::exported_attributes(&span, || {
            [
                ("messaging.system", "nats".into()),
                ("messaging.operation.type", "send".into()),
                ("messaging.destination.name", subject.clone()),
                ("messaging.message.id", meta.event_id.clone()),
                (
                    "messaging.message.conversation_id",
                    meta.correlation_id.clone(),
                ),
            ]
        });
        let mut map = HeaderMap::new();
        insert_ids(
            &mut map,
            [headers::CORRELATION_ID, headers::CAUSATION_ID],
            &meta.correlation_id,
            &meta.causation_id,
        );
        map.insert(static_name(headers::EVENT_TYPE), M::full_name().as_str());
        let trace = span.in_scope(|| trace::inject_current(&mut map));
        let env = envelope::seal(msg, meta, &self.source, trace);
        if self.cloud_events {
            cloud_event_headers(&mut map, &env, &M::full_name(), &subject, &self.ce_source);
        }
        let mut publish = PublishMessage::build()
            .headers(map)
            .message_id(&meta.event_id)
            .payload(env.encode_to_vec().into());
        if once {
            publish = publish.expected_last_subject_sequence(0);
        }
        let started = Instant::now();
        let fut = self
            .js
            .send_publish(subject.clone(), publish)
            .instrument(span)
            .await
            .map_err(|source| PublishError::Send {
                event_id: meta.event_id.clone(),
                subject,
                source,
            })?;
        Ok(PendingAck {
            event_id: meta.event_id.clone(),
            started,
            fut,
        })
    }
}

/// A header name without the allocation and checks a `&str` name costs on
/// every insert (these are constants, checked by the tests that read them).
fn static_name(name: &'static str) -> async_nats::header::HeaderName {
    async_nats::header::HeaderName::from_static(name)
}

/// `pushbus.push` of `pushbus.push.42.<id>`: a span name of low cardinality.
fn subject_family(subject: &str) -> &str {
    match subject.match_indices('.').nth(1) {
        Some((end, _)) => &subject[..end],
        None => subject,
    }
}

/// CloudEvents binary content mode (the NATS protocol binding: `ce-`
/// headers), so any CloudEvents consumer can route pushbus events without
/// pushbus code. The data is the `pushbus.v1.Envelope` whose payload is the
/// `ce-type` message.
fn cloud_event_headers(
    map: &mut HeaderMap,
    env: &crate::proto::Envelope,
    type_name: &str,
    subject: &str,
    ce_source: &str,
) {
    map.insert(static_name(headers::CONTENT_TYPE), "application/protobuf");
    map.insert(static_name(headers::CE_SPECVERSION), "1.0");
    map.insert(static_name(headers::CE_ID), env.event_id.as_str());
    map.insert(static_name(headers::CE_TYPE), type_name);
    map.insert(static_name(headers::CE_SOURCE), ce_source);
    map.insert(static_name(headers::CE_SUBJECT), subject);
    map.insert(
        headers::CE_DATASCHEMA,
        "type.googleapis.com/pushbus.v1.Envelope",
    );
    if let Some(time) = env.occurred_at.as_ref().and_then(rfc3339) {
        map.insert(static_name(headers::CE_TIME), time.as_str());
    }
    insert_ids(
        map,
        [headers::CE_CORRELATIONID, headers::CE_CAUSATIONID],
        &env.correlation_id,
        &env.causation_id,
    );
}

/// The correlation ID, and the causation ID unless the event is the first
/// of its chain, under the header names `[correlation, causation]`.
fn insert_ids(
    map: &mut HeaderMap,
    names: [&'static str; 2],
    correlation_id: &str,
    causation_id: &str,
) {
    map.insert(static_name(names[0]), correlation_id);
    if !causation_id.is_empty() {
        map.insert(static_name(names[1]), causation_id);
    }
}

fn rfc3339(t: &prost_types::Timestamp) -> Option<String> {
    let nanos = i128::from(t.seconds) * 1_000_000_000 + i128::from(t.nanos);
    time::OffsetDateTime::from_unix_timestamp_nanos(nanos)
        .ok()?
        .format(&time::format_description::well_known::Rfc3339)
        .ok()
}
