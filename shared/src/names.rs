//! The stable names users see in the `nats` CLI. Changing one is a breaking
//! change for deployed systems: the README lists them all.

/// The services, as `pushbus run` takes them and as they name their NATS
/// connections (`pushbus-<service>`), readiness and status reports.
pub const SERVICE_HOOK_INGEST: &str = "hook-ingest";
pub const SERVICE_FILTER: &str = "filter";
pub const SERVICE_GITOPS_NOTIFIER: &str = "gitops-notifier";
pub const SERVICE_REPLICATION_LAG: &str = "replication-lag";

/// Every push part, one subject per event: `pushbus.push.<project_id>.<event_id>`.
/// A subject of its own lets the stream refuse a second copy of the same
/// event for as long as the first is kept (see [`push_subject`]).
pub const STREAM_PUSHES: &str = "PUSHBUS_PUSHES";
pub const SUBJECTS_PUSHES: &str = "pushbus.push.>";

/// Webhook deliveries, only for agents whose config names a webhook:
/// `pushbus.webhook.<agent_id>` (an `AgentPoke`, same event ID as the ref head).
pub const STREAM_WEBHOOKS: &str = "PUSHBUS_WEBHOOKS";
pub const SUBJECTS_WEBHOOKS: &str = "pushbus.webhook.>";

/// Poison messages, one subject per consumer that gave up: `pushbus.dlq.<consumer>`.
pub const STREAM_DLQ: &str = "PUSHBUS_DLQ";
pub const SUBJECTS_DLQ: &str = "pushbus.dlq.>";

/// Geo secondaries' progress reports: `pushbus.geo.status.<node_id>`.
pub const STREAM_GEO_STATUS: &str = "PUSHBUS_GEO_STATUS";
pub const SUBJECTS_GEO_STATUS: &str = "pushbus.geo.status.>";

/// Core NATS request/reply (no stream): `pushbus.geo.lag.<node_id>`.
pub const SUBJECTS_GEO_LAG: &str = "pushbus.geo.lag.*";

/// Core NATS request/reply (no stream), served by filter:
/// `pushbus.api.agents.<put|get|delete|list>`.
pub const SUBJECTS_AGENTS_API: &str = "pushbus.api.agents.*";
/// The same, as the prefix of the NATS micro endpoints `put`, `get`, ….
pub const AGENTS_API_PREFIX: &str = "pushbus.api.agents";

/// KV bucket: agent ID -> `AgentConfig`.
pub const BUCKET_AGENTS: &str = "pushbus-agents";
/// KV bucket: `<agent_id>.<project_id>.<hex(ref)>` -> `RefHead`, the latest
/// poke per agent and ref: filter writes it, gitops-notifier follows it
/// (live feed) and reads it (catch-up).
pub const BUCKET_REF_HEADS: &str = "pushbus-ref-heads";
/// The stream behind [`BUCKET_REF_HEADS`] (every KV bucket is a stream
/// `KV_<bucket>`): what `pushbus status` and `nats stream` show.
pub const STREAM_REF_HEADS: &str = "KV_pushbus-ref-heads";
/// KV bucket: node ID -> `GeoNode`.
pub const BUCKET_GEO_NODES: &str = "pushbus-geo-nodes";
/// KV bucket: hex(correlation ID) -> Geo node ID, with a TTL; for front ends
/// that can only hand over a correlation ID.
pub const BUCKET_GEO_PUSH_ROUTES: &str = "pushbus-geo-push-routes";

/// Durable consumer names (one per service that consumes a stream).
pub const CONSUMER_FILTER: &str = "filter";
/// gitops-notifier's consumer of webhook deliveries (its streamed pokes
/// follow the ref heads bucket, so slow retries never hold them up).
pub const CONSUMER_NOTIFIER_WEBHOOKS: &str = "gitops-notifier-webhooks";

/// Queue group of the agent registry API responders (filter replicas).
pub const QUEUE_FILTER: &str = "filter";
/// Queue group of replication-lag responders.
pub const QUEUE_REPLICATION_LAG: &str = "replication-lag";

/// NATS headers set on every pushbus message (case-sensitive, one spelling).
pub mod headers {
    pub const MSG_ID: &str = "Nats-Msg-Id";
    pub const CORRELATION_ID: &str = "Pushbus-Correlation-Id";
    pub const CAUSATION_ID: &str = "Pushbus-Causation-Id";
    pub const EVENT_TYPE: &str = "Pushbus-Type";
    pub const TRACEPARENT: &str = "traceparent";
    pub const TRACESTATE: &str = "tracestate";
    /// Dead-letter annotations.
    pub const DLQ_REASON: &str = "Pushbus-Dlq-Reason";
    pub const DLQ_STREAM: &str = "Pushbus-Dlq-Stream";
    pub const DLQ_SUBJECT: &str = "Pushbus-Dlq-Subject";
    pub const DLQ_SEQUENCE: &str = "Pushbus-Dlq-Sequence";
    pub const DLQ_CONSUMER: &str = "Pushbus-Dlq-Consumer";
    pub const DLQ_DELIVERED: &str = "Pushbus-Dlq-Delivered";
    /// On a message `pushbus dlq replay` published again: the dead letter's
    /// PUSHBUS_DLQ sequence, and where the original stood in its stream.
    pub const REPLAY_OF: &str = "Pushbus-Replay-Of";
    pub const REPLAY_SEQUENCE: &str = "Pushbus-Replay-Sequence";
    /// CloudEvents binary content mode (NATS binding), on every message.
    pub const CONTENT_TYPE: &str = "Content-Type";
    pub const CE_SPECVERSION: &str = "ce-specversion";
    pub const CE_ID: &str = "ce-id";
    pub const CE_TYPE: &str = "ce-type";
    pub const CE_SOURCE: &str = "ce-source";
    pub const CE_TIME: &str = "ce-time";
    pub const CE_SUBJECT: &str = "ce-subject";
    pub const CE_DATASCHEMA: &str = "ce-dataschema";
    /// The CloudEvents correlation extension's attributes.
    pub const CE_CORRELATIONID: &str = "ce-correlationid";
    pub const CE_CAUSATIONID: &str = "ce-causationid";
}

/// The subject of one push event. Published with "no message on this
/// subject yet" as a condition, it makes a replay days later (a spooled
/// hook) a refusal instead of a second copy.
pub fn push_subject(project_id: i64, event_id: &str) -> String {
    format!("pushbus.push.{project_id}.{event_id}")
}

/// Every push of one project.
pub fn project_push_subjects(project_id: i64) -> String {
    format!("pushbus.push.{project_id}.*")
}

pub fn webhook_subject(agent_id: &str) -> String {
    format!("pushbus.webhook.{agent_id}")
}

pub fn dlq_subject(consumer: &str) -> String {
    format!("pushbus.dlq.{consumer}")
}

pub fn geo_lag_subject(node_id: &str) -> String {
    format!("pushbus.geo.lag.{node_id}")
}

pub fn agents_api_subject(op: &str) -> String {
    format!("pushbus.api.agents.{op}")
}

/// Where every instance of `service` answers with its status
/// (`pushbus status`).
pub fn status_subject(service: &str) -> String {
    format!("pushbus.status.{service}")
}

pub fn geo_status_subject(node_id: &str) -> String {
    format!("pushbus.geo.status.{node_id}")
}

/// Lowercase hex of `s`'s bytes: turns any text (refs, correlation IDs)
/// into one valid subject token / KV key segment.
pub fn hex_token(s: &str) -> String {
    use std::fmt::Write;
    s.bytes()
        .fold(String::with_capacity(s.len() * 2), |mut out, b| {
            let _ = write!(out, "{b:02x}");
            out
        })
}

/// Identifiers that become subject tokens and KV keys (agent IDs, node IDs)
/// must be a single, wildcard-free token: `[A-Za-z0-9_-]{1,128}`.
pub fn is_valid_token(id: &str) -> bool {
    !id.is_empty()
        && id.len() <= 128
        && id
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens() {
        assert!(is_valid_token("agent-1_a"));
        for bad in ["", "a.b", "a*", ">", "a b", "ä"] {
            assert!(!is_valid_token(bad), "{bad:?}");
        }
        assert!(!is_valid_token(&"x".repeat(129)));
    }
}
