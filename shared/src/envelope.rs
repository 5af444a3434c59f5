//! The protobuf envelope around every message, and event identity.

use prost::{Message, Name};
use uuid::Uuid;

use crate::proto::{Envelope, Source, TraceContext};

/// Namespace for name-based (UUIDv5) event IDs derived from their inputs.
const PUSHBUS_NAMESPACE: Uuid = Uuid::from_u128(0x6f2c_9a1e_4b7d_4c3a_9e51_7d0b_2a8c_f413);

/// Identity and lineage of one event.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct EventMeta {
    pub event_id: String,
    pub correlation_id: String,
    pub causation_id: String,
}

impl EventMeta {
    /// A fresh event at the edge of the system, with a time-ordered ID.
    pub fn fresh(correlation_id: impl Into<String>) -> Self {
        Self {
            event_id: new_event_id(),
            correlation_id: correlation_id.into(),
            causation_id: String::new(),
        }
    }

    /// An event whose ID is a pure function of `parts`, so every retry of the
    /// same input publishes the same ID and JetStream drops the copies.
    pub fn deterministic(correlation_id: impl Into<String>, parts: &[&str]) -> Self {
        Self {
            event_id: derived_event_id(parts),
            correlation_id: correlation_id.into(),
            causation_id: String::new(),
        }
    }

    /// An event derived from `parent` (same correlation, parent as cause); its
    /// ID is derived from the parent's ID and `parts`, so a redelivered parent
    /// yields the same child IDs.
    pub fn derived_from(parent: &EventMeta, parts: &[&str]) -> Self {
        let mut all = Vec::with_capacity(parts.len() + 1);
        all.push(parent.event_id.as_str());
        all.extend_from_slice(parts);
        Self {
            event_id: derived_event_id(&all),
            correlation_id: parent.correlation_id.clone(),
            causation_id: parent.event_id.clone(),
        }
    }
}

pub fn new_event_id() -> String {
    Uuid::now_v7().to_string()
}

pub fn derived_event_id(parts: &[&str]) -> String {
    // Length-prefix each part so ("ab","c") and ("a","bc") differ.
    let mut buf = Vec::new();
    for p in parts {
        buf.extend_from_slice(&(p.len() as u64).to_be_bytes());
        buf.extend_from_slice(p.as_bytes());
    }
    Uuid::new_v5(&PUSHBUS_NAMESPACE, &buf).to_string()
}

/// A correlation ID is accepted from outside only if it is short and made of
/// characters that are safe in headers and logs.
pub fn is_valid_correlation_id(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b':' | b'/'))
}

/// Where a caller may hand over its own correlation ID, in order of preference.
pub const CALLER_CORRELATION_HEADERS: [&str; 2] = ["x-correlation-id", "x-request-id"];

/// The caller's well-formed `X-Correlation-Id` or `X-Request-Id`, if any, read
/// through `get` (HTTP headers or gRPC metadata); a malformed one is ignored,
/// so the caller of this mints a fresh ID instead.
pub fn caller_correlation_id<'a>(get: impl Fn(&str) -> Option<&'a str>) -> Option<String> {
    CALLER_CORRELATION_HEADERS
        .iter()
        .filter_map(|k| get(k))
        .find(|v| is_valid_correlation_id(v))
        .map(str::to_owned)
}

pub fn new_correlation_id() -> String {
    Uuid::now_v7().simple().to_string()
}

/// Wraps `msg` in an envelope.
pub fn seal<M: Message + Name>(
    msg: &M,
    meta: &EventMeta,
    source: &Source,
    trace: Option<TraceContext>,
) -> Envelope {
    let now = std::time::SystemTime::now();
    Envelope {
        event_id: meta.event_id.clone(),
        type_url: M::type_url(),
        payload: msg.encode_to_vec(),
        correlation_id: meta.correlation_id.clone(),
        causation_id: meta.causation_id.clone(),
        occurred_at: Some(prost_types::Timestamp::from(now)),
        source: Some(source.clone()),
        trace,
    }
}

#[derive(Debug, thiserror::Error)]
pub enum EnvelopeError {
    #[error("undecodable envelope: {0}")]
    Undecodable(prost::DecodeError),
    #[error("envelope has no event_id")]
    MissingEventId,
    #[error("unknown type URL {found:?} (expected {expected:?})")]
    UnexpectedType { expected: String, found: String },
    #[error("undecodable {type_url} payload: {source}")]
    UndecodablePayload {
        type_url: String,
        source: prost::DecodeError,
    },
}

impl EnvelopeError {
    /// A short, stable label for metrics and dead-letter headers.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Undecodable(_) => "undecodable_envelope",
            Self::MissingEventId => "missing_event_id",
            Self::UnexpectedType { .. } => "unknown_type_url",
            Self::UndecodablePayload { .. } => "undecodable_payload",
        }
    }
}

/// Decodes an envelope and checks it carries an event ID.
pub fn decode(bytes: &[u8]) -> Result<Envelope, EnvelopeError> {
    let env = Envelope::decode(bytes).map_err(EnvelopeError::Undecodable)?;
    if env.event_id.is_empty() {
        return Err(EnvelopeError::MissingEventId);
    }
    Ok(env)
}

/// Opens the payload of `env` as an `M`, refusing any other type.
pub fn open<M: Message + Name + Default>(env: &Envelope) -> Result<M, EnvelopeError> {
    let expected = M::type_url();
    if env.type_url != expected {
        return Err(EnvelopeError::UnexpectedType {
            expected,
            found: env.type_url.clone(),
        });
    }
    M::decode(env.payload.as_slice()).map_err(|source| EnvelopeError::UndecodablePayload {
        type_url: env.type_url.clone(),
        source,
    })
}

impl From<&Envelope> for EventMeta {
    fn from(env: &Envelope) -> Self {
        Self {
            event_id: env.event_id.clone(),
            correlation_id: env.correlation_id.clone(),
            causation_id: env.causation_id.clone(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::proto::{AgentPoke, GitPushEvent};

    #[test]
    fn type_urls_are_google_style() {
        assert_eq!(
            GitPushEvent::type_url(),
            "type.googleapis.com/pushbus.v1.GitPushEvent"
        );
    }

    #[test]
    fn seal_then_open_round_trips_and_checks_type() {
        let push = GitPushEvent {
            project_id: 7,
            ..Default::default()
        };
        let meta = EventMeta::fresh("corr-1");
        let env = seal(&push, &meta, &Source::default(), None);
        let bytes = env.encode_to_vec();
        let env = decode(&bytes).unwrap();
        assert_eq!(open::<GitPushEvent>(&env).unwrap(), push);
        assert!(matches!(
            open::<AgentPoke>(&env),
            Err(EnvelopeError::UnexpectedType { .. })
        ));
        assert!(decode(b"\xff\xff\xff").is_err());
    }

    #[test]
    fn derived_ids_are_stable_and_distinct() {
        let parent = EventMeta::fresh("c");
        let a = EventMeta::derived_from(&parent, &["agent-a"]);
        let a2 = EventMeta::derived_from(&parent, &["agent-a"]);
        let b = EventMeta::derived_from(&parent, &["agent-b"]);
        assert_eq!(a, a2);
        assert_ne!(a.event_id, b.event_id);
        assert_eq!(a.causation_id, parent.event_id);
        assert_eq!(a.correlation_id, "c");
        assert_ne!(
            derived_event_id(&["ab", "c"]),
            derived_event_id(&["a", "bc"])
        );
    }

    #[test]
    fn correlation_ids() {
        assert!(is_valid_correlation_id("01HX-abc_def.1:2/3"));
        assert!(is_valid_correlation_id(&new_correlation_id()));
        for bad in ["", "a b", "a\nb", "é"] {
            assert!(!is_valid_correlation_id(bad));
        }
        assert!(!is_valid_correlation_id(&"a".repeat(129)));
    }
}
