use async_nats::HeaderMap;
use async_nats::jetstream::{self, message::PublishMessage};

use super::PublishError;
use crate::names::{self, headers};

/// Sends poison messages to `PUSHBUS_DLQ` on `pushbus.dlq.<consumer>`, with
/// the original payload and headers plus why and where it failed.
#[derive(Clone)]
pub struct DeadLetters {
    js: jetstream::Context,
    consumer: String,
}

impl DeadLetters {
    pub fn new(js: jetstream::Context, consumer: &str) -> Self {
        Self {
            js,
            consumer: consumer.into(),
        }
    }

    /// Publishes the dead letter and waits for its ack; the caller terms the
    /// original only after this succeeds, so nothing is lost in between.
    pub async fn send(&self, msg: &jetstream::Message, reason: &str) -> Result<(), PublishError> {
        let (stream, seq, delivered) = match msg.info() {
            Ok(info) => (info.stream.to_owned(), info.stream_sequence, info.delivered),
            Err(_) => (String::new(), 0, 0),
        };
        let mut map = HeaderMap::new();
        if let Some(orig) = &msg.headers {
            for (name, values) in orig.iter() {
                let name: &str = name.as_ref();
                if name == headers::MSG_ID {
                    continue;
                }
                for v in values {
                    map.append(name, v.as_str());
                }
            }
        }
        map.insert(headers::DLQ_REASON, sanitize(reason).as_str());
        map.insert(headers::DLQ_STREAM, stream.as_str());
        map.insert(headers::DLQ_SUBJECT, msg.subject.as_str());
        map.insert(headers::DLQ_SEQUENCE, seq.to_string().as_str());
        map.insert(headers::DLQ_CONSUMER, self.consumer.as_str());
        map.insert(headers::DLQ_DELIVERED, delivered.to_string().as_str());
        // Deduplicate repeated dead-lettering of the same delivery.
        let id = format!("dlq:{}:{}:{}", self.consumer, stream, seq);
        let subject = names::dlq_subject(&self.consumer);
        let publish = PublishMessage::build()
            .headers(map)
            .message_id(&id)
            .payload(msg.payload.clone());
        let fut = self
            .js
            .send_publish(subject.clone(), publish)
            .await
            .map_err(|source| PublishError::Send {
                event_id: id.clone(),
                subject,
                source,
            })?;
        fut.await.map_err(|source| PublishError::Ack {
            event_id: id,
            source,
        })?;
        metrics::counter!("pushbus_dead_letters_total", "consumer" => self.consumer.clone())
            .increment(1);
        Ok(())
    }
}

/// Header values cannot hold CR/LF; keep reasons on one bounded line.
fn sanitize(reason: &str) -> String {
    let one_line: String = reason
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    one_line.chars().take(512).collect()
}
