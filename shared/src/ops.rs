//! The ops endpoints every process serves: `/healthz` (alive), `/readyz`
//! (every service in the process has its topology and initial state) and
//! `/metrics` (Prometheus text format).

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex, OnceLock};

use axum::{Json, Router, extract::State, http::StatusCode, response::IntoResponse, routing::get};
use metrics_exporter_prometheus::{PrometheusBuilder, PrometheusHandle};

/// Readiness of the components (services) of one process.
#[derive(Clone, Default)]
pub struct Readiness {
    components: Arc<Mutex<BTreeMap<String, bool>>>,
}

/// One component's switch; starts not ready.
#[derive(Clone)]
pub struct ReadyFlag {
    name: String,
    components: Arc<Mutex<BTreeMap<String, bool>>>,
}

impl Readiness {
    pub fn component(&self, name: &str) -> ReadyFlag {
        lock(&self.components).insert(name.into(), false);
        ReadyFlag {
            name: name.into(),
            components: self.components.clone(),
        }
    }

    /// Components not ready yet; empty means ready.
    pub fn waiting_for(&self) -> Vec<String> {
        lock(&self.components)
            .iter()
            .filter(|(_, ready)| !**ready)
            .map(|(name, _)| name.clone())
            .collect()
    }
}

impl ReadyFlag {
    pub fn set(&self, ready: bool) {
        lock(&self.components).insert(self.name.clone(), ready);
    }
}

fn lock<T>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
    // A panic elsewhere must not take readiness down with it.
    m.lock().unwrap_or_else(|e| e.into_inner())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Counter,
    Gauge,
    Histogram,
}

/// Every metric pushbus exports, with its HELP text: the one list the
/// dashboard in deploy/grafana is checked against.
pub const METRICS: &[(&str, Kind, &str)] = &[
    (
        "pushbus_ingest_pushes_total",
        Kind::Counter,
        "Pushes hook-ingest stored (answered 200).",
    ),
    (
        "pushbus_ingest_replays_total",
        Kind::Counter,
        "Pushes that an earlier attempt had already stored (replays of spooled hooks).",
    ),
    (
        "pushbus_ingest_lag_timeouts_total",
        Kind::Counter,
        "Geo lag requests that got no answer within the lag budget.",
    ),
    (
        "pushbus_publish_ack_seconds",
        Kind::Histogram,
        "Time from publish to the stream's ack.",
    ),
    (
        "pushbus_publish_duplicates_total",
        Kind::Counter,
        "Publishes the stream dropped as duplicates.",
    ),
    (
        "pushbus_handle_seconds",
        Kind::Histogram,
        "Time a consumer's handler took per message, by consumer.",
    ),
    (
        "pushbus_messages_total",
        Kind::Counter,
        "Messages consumed, by consumer and outcome (ok, retry, dead_letter).",
    ),
    (
        "pushbus_dead_letters_total",
        Kind::Counter,
        "Messages sent to PUSHBUS_DLQ, by consumer.",
    ),
    (
        "pushbus_consumer_pending",
        Kind::Gauge,
        "Messages not yet delivered to a durable consumer, by consumer.",
    ),
    (
        "pushbus_consumer_ack_pending",
        Kind::Gauge,
        "Messages delivered to a durable consumer and not yet acked, by consumer.",
    ),
    (
        "pushbus_consumer_redelivered",
        Kind::Gauge,
        "Messages of a durable consumer delivered more than once and not yet acked, by consumer.",
    ),
    (
        "pushbus_dlq_messages",
        Kind::Gauge,
        "Messages in PUSHBUS_DLQ from this consumer, by consumer.",
    ),
    (
        "pushbus_filter_pushes_total",
        Kind::Counter,
        "Pushes filter matched against the agent registry.",
    ),
    (
        "pushbus_filter_pushes_unmatched_total",
        Kind::Counter,
        "Pushes no agent watches.",
    ),
    (
        "pushbus_filter_pokes_total",
        Kind::Counter,
        "Pokes filter made: one per matched agent and ref.",
    ),
    (
        "pushbus_filter_registry_agents",
        Kind::Gauge,
        "Agents in filter's in-memory registry.",
    ),
    (
        "pushbus_filter_heads_written_total",
        Kind::Counter,
        "Ref heads filter wrote (none for a push older than its ref's head).",
    ),
    (
        "pushbus_filter_index_build_seconds",
        Kind::Histogram,
        "Time to build filter's match index.",
    ),
    (
        "pushbus_notifier_heads_followed_total",
        Kind::Counter,
        "New ref heads this notifier replica's feed read and offered to its agents.",
    ),
    (
        "pushbus_notifier_connections",
        Kind::Gauge,
        "Agent streams (SSE and gRPC) connected to this notifier replica.",
    ),
    (
        "pushbus_notifier_degraded",
        Kind::Gauge,
        "1 while this notifier replica has lost NATS (agents told to poll).",
    ),
    (
        "pushbus_notifier_ref_heads",
        Kind::Gauge,
        "Ref heads (tombstones of deleted refs included) this notifier replica holds in memory.",
    ),
    (
        "pushbus_notifier_ref_heads_purged_total",
        Kind::Counter,
        "Ref heads of deleted agents this notifier replica purged from the bucket.",
    ),
    (
        "pushbus_notifier_catch_up_pokes_total",
        Kind::Counter,
        "Pokes queued as catch-up on reconnect.",
    ),
    (
        "pushbus_notifier_coalesced_total",
        Kind::Counter,
        "Pokes merged into a newer one by the coalescing window.",
    ),
    (
        "pushbus_notifier_overflows_total",
        Kind::Counter,
        "Connections told to poll everything because too many refs were pending.",
    ),
    (
        "pushbus_push_to_poke_seconds",
        Kind::Histogram,
        "Time from hook-ingest storing a push to its poke reaching an agent's connection (live pokes).",
    ),
    (
        "pushbus_webhook_seconds",
        Kind::Histogram,
        "Time of one webhook delivery attempt, by outcome.",
    ),
    (
        "pushbus_webhook_deliveries_total",
        Kind::Counter,
        "Webhook delivery attempts, by outcome.",
    ),
    (
        "pushbus_listener_refused_connections_total",
        Kind::Counter,
        "Connections closed at once because a listener was at its connection limit, by listener.",
    ),
    (
        "pushbus_listener_queued_requests_total",
        Kind::Counter,
        "Requests that found every in-flight slot taken and waited for one.",
    ),
    (
        "pushbus_listener_refused_requests_total",
        Kind::Counter,
        "Requests answered 503 / RESOURCE_EXHAUSTED because no in-flight slot freed within the queue wait.",
    ),
    (
        "pushbus_notifier_streams_refused_total",
        Kind::Counter,
        "Agent streams refused by the per-agent or total stream cap, by reason.",
    ),
    (
        "pushbus_notifier_streams_revoked_total",
        Kind::Counter,
        "Agent streams closed because the agent's token changed or it was deleted.",
    ),
    (
        "pushbus_nats_permission_denied_total",
        Kind::Counter,
        "NATS permission violations this process met, by client, operation and subject.",
    ),
    (
        "pushbus_topology_drift",
        Kind::Gauge,
        "1 for each stream, bucket or consumer whose configuration differs from what this service would create (kept as the operator set it), by object and fields.",
    ),
];

/// Latency buckets in seconds (1 ms to 30 s), so latencies render as
/// histograms that aggregate across replicas rather than as summaries.
pub const LATENCY_BUCKETS: &[f64] = &[
    0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0,
];

/// The process-wide Prometheus recorder, installed on first use.
pub fn metrics_handle() -> PrometheusHandle {
    static HANDLE: OnceLock<PrometheusHandle> = OnceLock::new();
    HANDLE
        .get_or_init(|| {
            let builder = PrometheusBuilder::new();
            // Fails only on an empty bucket list.
            let builder = builder
                .set_buckets(LATENCY_BUCKETS)
                .unwrap_or_else(|_| PrometheusBuilder::new());
            let recorder = builder.build_recorder();
            let handle = recorder.handle();
            // Fails only if another recorder was installed first; then our
            // handle renders nothing, which beats crashing.
            if metrics::set_global_recorder(recorder).is_ok() {
                describe_all();
            }
            handle
        })
        .clone()
}

fn describe_all() {
    for &(name, kind, help) in METRICS {
        match kind {
            Kind::Counter => metrics::describe_counter!(name, help),
            Kind::Gauge => metrics::describe_gauge!(name, help),
            Kind::Histogram => {
                metrics::describe_histogram!(name, metrics::Unit::Seconds, help);
            }
        }
    }
}

pub fn router(readiness: Readiness) -> Router {
    let handle = metrics_handle();
    Router::new()
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(readyz))
        .route(
            "/metrics",
            get(move || {
                let handle = handle.clone();
                async move {
                    handle.run_upkeep();
                    handle.render()
                }
            }),
        )
        .with_state(readiness)
}

async fn readyz(State(readiness): State<Readiness>) -> impl IntoResponse {
    let waiting = readiness.waiting_for();
    let status = if waiting.is_empty() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (
        status,
        Json(serde_json::json!({ "ready": waiting.is_empty(), "waiting_for": waiting })),
    )
}
