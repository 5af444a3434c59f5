//! What an operator sees: traces exported over OTLP to a collector that
//! lives inside the test, from services running as their own processes.

use std::collections::{BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::body::Bytes;
use opentelemetry_proto::tonic::collector::trace::v1::trace_service_server::{
    TraceService, TraceServiceServer,
};
use opentelemetry_proto::tonic::collector::trace::v1::{
    ExportTraceServiceRequest, ExportTraceServiceResponse,
};
use opentelemetry_proto::tonic::common::v1::any_value::Value;
use prost::Message;
use pushbus_shared::testkit::{NatsServer, free_port};

use crate::guarantees::Process;
use crate::poll::until_ok;
use crate::support::{SseReader, local, register};

/// One exported span: its service, trace ID (hex), name and attributes.
#[derive(Clone, Debug)]
struct Span {
    service: String,
    trace_id: String,
    name: String,
    attributes: HashMap<String, String>,
    resource: HashMap<String, String>,
}

#[derive(Clone, Default)]
struct Collector {
    spans: Arc<Mutex<Vec<Span>>>,
}

fn text(v: &Option<opentelemetry_proto::tonic::common::v1::AnyValue>) -> String {
    match v.as_ref().and_then(|v| v.value.as_ref()) {
        Some(Value::StringValue(s)) => s.clone(),
        Some(Value::IntValue(i)) => i.to_string(),
        Some(Value::BoolValue(b)) => b.to_string(),
        Some(other) => format!("{other:?}"),
        None => String::new(),
    }
}

impl Collector {
    fn take(&self, request: ExportTraceServiceRequest) {
        let mut spans = self.spans.lock().unwrap();
        for rs in request.resource_spans {
            let resource: HashMap<String, String> = rs
                .resource
                .map(|r| r.attributes)
                .unwrap_or_default()
                .into_iter()
                .map(|kv| (kv.key, text(&kv.value)))
                .collect();
            let service = resource.get("service.name").cloned().unwrap_or_default();
            for ss in rs.scope_spans {
                for s in ss.spans {
                    spans.push(Span {
                        service: service.clone(),
                        trace_id: s.trace_id.iter().map(|b| format!("{b:02x}")).collect(),
                        name: s.name,
                        attributes: s
                            .attributes
                            .into_iter()
                            .map(|kv| (kv.key, text(&kv.value)))
                            .collect(),
                        resource: resource.clone(),
                    });
                }
            }
        }
    }

    fn of_trace(&self, trace_id: &str) -> Vec<Span> {
        self.spans
            .lock()
            .unwrap()
            .iter()
            .filter(|s| s.trace_id == trace_id)
            .cloned()
            .collect()
    }

    /// An OTLP/gRPC collector on `listener`.
    async fn serve_grpc(self, listener: tokio::net::TcpListener) {
        let app = tonic::service::Routes::new(TraceServiceServer::new(self)).into_axum_router();
        let _ = axum::serve(listener, app).await;
    }

    /// An OTLP/HTTP (protobuf) collector on `listener`.
    async fn serve_http(self, listener: tokio::net::TcpListener) {
        use axum::response::IntoResponse;
        let app = axum::Router::new().route(
            "/v1/traces",
            axum::routing::post(move |body: Bytes| {
                let c = self.clone();
                async move {
                    match ExportTraceServiceRequest::decode(body) {
                        Ok(req) => {
                            c.take(req);
                            (
                                [("content-type", "application/x-protobuf")],
                                ExportTraceServiceResponse::default().encode_to_vec(),
                            )
                                .into_response()
                        }
                        Err(_) => axum::http::StatusCode::BAD_REQUEST.into_response(),
                    }
                }
            }),
        );
        let _ = axum::serve(listener, app).await;
    }
}

#[tonic::async_trait]
impl TraceService for Collector {
    async fn export(
        &self,
        request: tonic::Request<ExportTraceServiceRequest>,
    ) -> Result<tonic::Response<ExportTraceServiceResponse>, tonic::Status> {
        self.take(request.into_inner());
        Ok(tonic::Response::new(ExportTraceServiceResponse::default()))
    }
}

async fn listener() -> (tokio::net::TcpListener, String) {
    let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let url = format!("http://{}", l.local_addr().unwrap());
    (l, url)
}

const TRACE_ID: &str = "4bf92f3577b34da6a3ce929d0e0e4736";

// One push, a caller's traceparent: hook-ingest, filter and gitops-notifier
// (each its own process) export their spans to the collector, all in the
// caller's trace; the standard variables choose protocol and resource.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_push_is_one_trace_across_three_services_under_the_callers_trace_id() {
    let nats = NatsServer::start();
    register(&nats, "traced", 60..=60).await;
    let url = nats.url();
    let collector = Collector::default();
    let (grpc, grpc_url) = listener().await;
    tokio::spawn(collector.clone().serve_grpc(grpc));
    let (http, http_url) = listener().await;
    tokio::spawn(collector.clone().serve_http(http));

    let env = |protocol: &'static str, endpoint: String| {
        vec![
            ("OTEL_EXPORTER_OTLP_ENDPOINT", endpoint),
            ("OTEL_EXPORTER_OTLP_PROTOCOL", protocol.to_owned()),
            ("OTEL_BSP_SCHEDULE_DELAY", "100".to_owned()),
            (
                "OTEL_RESOURCE_ATTRIBUTES",
                "deployment.environment=test".to_owned(),
            ),
        ]
    };
    let grpc_env = env("grpc", grpc_url.clone());
    let http_env = env("http/protobuf", http_url.clone());
    fn borrow<'a>(v: &'a [(&'static str, String)]) -> Vec<(&'static str, &'a str)> {
        v.iter().map(|(k, v)| (*k, v.as_str())).collect()
    }
    let ingest_addr = local(free_port());
    let notifier_addr = local(free_port());
    // hook-ingest over OTLP/HTTP, the others over gRPC.
    let _ingest = Process::start_with_env(
        &url,
        "hook-ingest",
        &["--ingest-listen", &ingest_addr.to_string()],
        &borrow(&http_env),
    )
    .await;
    let _filter = Process::start_with_env(&url, "filter", &[], &borrow(&grpc_env)).await;
    let _notifier = Process::start_with_env(
        &url,
        "gitops-notifier",
        &["--notifier-listen", &notifier_addr.to_string()],
        &borrow(&grpc_env),
    )
    .await;
    let mut sse = SseReader::new(
        SseReader::connect(
            &format!("http://{notifier_addr}/v1/agents/traced/pokes"),
            None,
        )
        .await,
    );
    assert_eq!(
        sse.next_event(Duration::from_secs(5)).await.unwrap().0,
        "status"
    );

    let resp = reqwest::Client::new()
        .post(format!("http://{ingest_addr}/api/v4/internal/post_receive"))
        .header("traceparent", format!("00-{TRACE_ID}-00f067aa0ba902b7-01"))
        .json(&serde_json::json!({
            "gl_repository": "project-60",
            "identifier": "user-1",
            "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
        }))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (event, _) = sse.next_event(Duration::from_secs(10)).await.unwrap();
    assert_eq!(event, "poke");

    // A parent span ends (and is exported) after its children: wait for
    // every span named here, not just for one span of each service.
    let wanted: BTreeSet<(String, String)> = [
        ("hook-ingest", "POST /api/v4/internal/post_receive"),
        ("hook-ingest", "send pushbus.push"),
        ("filter", "process PUSHBUS_PUSHES"),
        ("filter", "match"),
        ("filter", "write ref head"),
        ("gitops-notifier", "deliver"),
    ]
    .into_iter()
    .map(|(service, name)| (service.to_owned(), name.to_owned()))
    .collect();
    let names_of = |collector: &Collector| -> BTreeSet<(String, String)> {
        collector
            .of_trace(TRACE_ID)
            .into_iter()
            .map(|s| (s.service, s.name))
            .collect()
    };
    until_ok("every span of the push in the caller's trace", || {
        let seen = names_of(&collector);
        let missing: Vec<_> = wanted.difference(&seen).cloned().collect();
        async move {
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!("missing {missing:?}"))
            }
        }
    })
    .await;
    let spans = collector.of_trace(TRACE_ID);
    let publish = spans
        .iter()
        .find(|s| s.name == "send pushbus.push")
        .unwrap();
    assert_eq!(publish.attributes["messaging.system"], "nats");
    assert!(publish.attributes["messaging.destination.name"].starts_with("pushbus.push.60."));
    assert!(!publish.attributes["messaging.message.id"].is_empty());
    assert!(!publish.attributes["messaging.message.conversation_id"].is_empty());
    let process = spans
        .iter()
        .find(|s| s.name == "process PUSHBUS_PUSHES")
        .unwrap();
    assert_eq!(
        process.attributes["messaging.consumer.group.name"],
        "filter"
    );
    assert_eq!(
        process.attributes["messaging.message.id"],
        publish.attributes["messaging.message.id"]
    );
    assert!(
        spans
            .iter()
            .all(|s| s.resource.get("deployment.environment").map(String::as_str) == Some("test")),
        "OTEL_RESOURCE_ATTRIBUTES not applied"
    );
}

/// Metric names a PromQL expression uses (histogram series back to their
/// histogram).
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(at) = expr[i..].find("pushbus_") {
        let start = i + at;
        let mut end = start;
        while end < bytes.len() && (bytes[end].is_ascii_alphanumeric() || bytes[end] == b'_') {
            end += 1;
        }
        let name = &expr[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(name);
        names.push(base.to_owned());
        i = end;
    }
    names
}

// Every query of the shipped dashboard names a metric pushbus exports
// (ops::METRICS, which also gives each its HELP line), histograms as such.
#[test]
fn every_dashboard_query_names_an_exported_metric() {
    use pushbus_shared::ops::{Kind, METRICS};
    let path = concat!(env!("CARGO_MANIFEST_DIR"), "/deploy/grafana/pushbus.json");
    let dashboard: serde_json::Value =
        serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap();
    let mut checked = 0;
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().unwrap() {
            let expr = target["expr"].as_str().unwrap();
            let names = metric_names(expr);
            assert!(!names.is_empty(), "query names no pushbus metric: {expr}");
            for name in names {
                let known = METRICS.iter().find(|(n, ..)| *n == name);
                let Some((_, kind, _)) = known else {
                    panic!("{expr}: {name} is not a metric pushbus exports");
                };
                if expr.contains(&format!("{name}_bucket")) {
                    assert_eq!(*kind, Kind::Histogram, "{name} used as a histogram");
                }
                checked += 1;
            }
        }
    }
    assert!(checked >= 20, "only {checked} metric references");
}

// What /metrics of a running stack shows after a push: every metric has a
// HELP line and is in the catalogue; latencies are histograms with buckets,
// not summaries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn metrics_are_described_and_latencies_are_histograms() {
    use pushbus_shared::ops::METRICS;
    let nats = NatsServer::start();
    register(&nats, "measured", 61..=61).await;
    let stack = crate::support::Stack::start(&nats.url()).await;
    let mut sse = SseReader::new(
        SseReader::connect(
            &format!("http://{}/v1/agents/measured/pokes", stack.notifier),
            None,
        )
        .await,
    );
    assert_eq!(
        sse.next_event(Duration::from_secs(5)).await.unwrap().0,
        "status"
    );
    let body = serde_json::json!({
        "gl_repository": "project-61",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
    });
    assert_eq!(stack.post_receive(&body, &[]).await.status(), 200);
    assert_eq!(
        sse.next_event(Duration::from_secs(10)).await.unwrap().0,
        "poke"
    );
    let text = reqwest::get(format!("http://{}/metrics", stack.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut typed = HashMap::new();
    let mut helped = BTreeSet::new();
    for line in text.lines() {
        let mut words = line.split_whitespace();
        match (words.next(), words.next(), words.next(), words.next()) {
            (Some("#"), Some("TYPE"), Some(name), Some(kind)) => {
                typed.insert(name.to_owned(), kind.to_owned());
            }
            (Some("#"), Some("HELP"), Some(name), Some(_)) => {
                helped.insert(name.to_owned());
            }
            _ => {}
        }
    }
    for want in [
        "pushbus_ingest_pushes_total",
        "pushbus_push_to_poke_seconds",
        "pushbus_handle_seconds",
        "pushbus_publish_ack_seconds",
        "pushbus_notifier_connections",
    ] {
        assert!(typed.contains_key(want), "{want} not exported:\n{text}");
    }
    for (name, kind) in &typed {
        assert!(helped.contains(name), "{name} has no HELP line");
        assert!(
            METRICS.iter().any(|(n, ..)| n == name),
            "{name} is exported but not in ops::METRICS"
        );
        assert_ne!(kind, "summary", "{name} is a summary");
    }
    assert_eq!(typed["pushbus_push_to_poke_seconds"], "histogram");
    assert!(text.contains("pushbus_push_to_poke_seconds_bucket{le=\"0.005\"}"));
    // The consumer's handles are registered before the first message: they
    // must still count what was handled, not just be exported.
    let handled = text
        .lines()
        .find(|l| {
            l.starts_with("pushbus_messages_total{")
                && l.contains("consumer=\"filter\"")
                && l.contains("outcome=\"ok\"")
        })
        .and_then(|l| l.rsplit(' ').next())
        .and_then(|v| v.parse::<f64>().ok());
    assert!(
        handled.is_some_and(|n| n >= 1.0),
        "filter handled nothing by its metrics:\n{text}"
    );
    // The notifier has no consumer of pushes or pokes: its feed counts.
    assert!(
        text.lines()
            .any(|l| l.starts_with("pushbus_notifier_heads_followed_total ")),
        "the notifier's feed read nothing by its metrics:\n{text}"
    );
    stack.stop().await;
}

/// Every answer to `subject` within `wait` (NATS micro discovery is
/// scatter-gather: each instance answers).
async fn gather(
    client: &async_nats::Client,
    subject: &str,
    wait: Duration,
) -> Vec<serde_json::Value> {
    use futures::StreamExt;
    let inbox = client.new_inbox();
    let mut replies = client.subscribe(inbox.clone()).await.unwrap();
    client
        .publish_with_reply(subject.to_owned(), inbox, "".into())
        .await
        .unwrap();
    let mut out = Vec::new();
    while let Ok(Some(msg)) = tokio::time::timeout(wait, replies.next()).await {
        out.push(serde_json::from_slice(&msg.payload).unwrap());
    }
    out
}

// The agents request API and the Geo lag responder are NATS micro services:
// `nats micro ls/info/stats` find them with endpoints, versions and counts.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_apis_answer_nats_micro_discovery() {
    let nats = NatsServer::start();
    let stack = crate::support::Stack::start(&nats.url()).await;
    let client = pushbus_shared::testkit::client(&nats).await;
    let wait = Duration::from_millis(500);
    let names: BTreeSet<String> = gather(&client, "$SRV.PING", wait)
        .await
        .iter()
        .map(|p| p["name"].as_str().unwrap().to_owned())
        .collect();
    assert!(names.contains("pushbus-agents"), "{names:?}");
    assert!(names.contains("pushbus-geo-lag"), "{names:?}");

    let info = gather(&client, "$SRV.INFO.pushbus-agents", wait).await;
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0]["version"], env!("CARGO_PKG_VERSION"));
    let subjects: BTreeSet<String> = info[0]["endpoints"]
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["subject"].as_str().unwrap().to_owned())
        .collect();
    let want: BTreeSet<String> = ["put", "get", "delete", "list"]
        .iter()
        .map(|op| format!("pushbus.api.agents.{op}"))
        .collect();
    assert_eq!(subjects, want);
    assert!(
        info[0]["endpoints"]
            .as_array()
            .unwrap()
            .iter()
            .all(|e| e["queue_group"] == "filter")
    );

    // One refused and one good request to the registry, one bad lag request.
    let refused = client
        .request("pushbus.api.agents.get", r#"{"agent_id": "nobody"}"#.into())
        .await
        .unwrap();
    assert!(String::from_utf8_lossy(&refused.payload).contains("error"));
    client
        .request("pushbus.api.agents.list", "{}".into())
        .await
        .unwrap();
    let bad = client
        .request("pushbus.geo.lag.node-1", vec![0xff, 0xff].into())
        .await
        .unwrap();
    let status = bad
        .headers
        .as_ref()
        .and_then(|h| h.get("Nats-Service-Error"));
    assert_eq!(status.map(|s| s.as_str()), Some("undecodable LagRequest"));

    let stats = gather(&client, "$SRV.STATS.pushbus-agents", wait).await;
    let endpoints = stats[0]["endpoints"].as_array().unwrap();
    let by_name = |op: &str| {
        let subject = format!("pushbus.api.agents.{op}");
        endpoints
            .iter()
            .find(|e| e["subject"] == subject.as_str())
            .unwrap_or_else(|| panic!("no {subject} in {endpoints:?}"))
            .clone()
    };
    assert_eq!(by_name("get")["num_requests"], 1);
    assert_eq!(by_name("get")["data"]["refused"], 1);
    assert_eq!(by_name("list")["num_requests"], 1);
    assert_eq!(by_name("list")["data"]["refused"], 0);
    let lag = gather(&client, "$SRV.STATS.pushbus-geo-lag", wait).await;
    let lag_endpoint = &lag[0]["endpoints"][0];
    assert_eq!(lag_endpoint["subject"], "pushbus.geo.lag.*");
    assert_eq!(lag_endpoint["num_requests"], 1);
    assert_eq!(lag_endpoint["num_errors"], 1);
    stack.stop().await;
}

/// `pushbus run hook-ingest,filter` as its own process with `flags` and
/// `RUST_LOG` (unset: `None`), given `pushes` pushes, then stopped; what it
/// wrote to stdout.
async fn logs_of_a_run(flags: &[&str], rust_log: Option<&str>, pushes: u32) -> String {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let out = dir.path().join("stdout");
    let (ops, ingest) = (local(free_port()), local(free_port()));
    let mut cmd = std::process::Command::new(env!("CARGO_BIN_EXE_pushbus"));
    cmd.args(["run", "hook-ingest,filter", "--nats-url", &nats.url()])
        .args(["--ops-listen", &ops.to_string()])
        .args(["--ingest-listen", &ingest.to_string()])
        .args(flags)
        .env_remove("RUST_LOG")
        .env_remove("NO_COLOR")
        .stdout(std::fs::File::create(&out).unwrap())
        .stderr(std::process::Stdio::null());
    if let Some(level) = rust_log {
        cmd.env("RUST_LOG", level);
    }
    let mut child = cmd.spawn().unwrap();
    crate::poll::until_ready(&format!("http://{ops}/readyz")).await;
    for n in 1..=pushes {
        let body = serde_json::json!({
            "gl_repository": "project-9",
            "identifier": "user-1",
            "changes": format!("{} {n:040x} refs/heads/main", "0".repeat(40)),
        });
        crate::support::push_stored(ingest, &body).await;
    }
    // Filter's matches too, before the process stops.
    crate::poll::until("every push matched", async || {
        let metrics = reqwest::get(format!("http://{ops}/metrics")).await;
        let text = metrics.unwrap().text().await.unwrap();
        text.lines().any(|l| {
            l.starts_with("pushbus_filter_pushes_total") && l.ends_with(&format!(" {pushes}"))
        })
    })
    .await;
    pushbus_shared::process::signal(child.id(), pushbus_shared::process::SIGTERM).unwrap();
    assert!(child.wait().unwrap().success());
    std::fs::read_to_string(&out).unwrap()
}

// At the default level a service logs its life, not each push (a line per
// push cost an eighth of the throughput); --log-json makes every line a
// JSON object.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_logs_at_the_default_level_have_no_line_per_push() {
    let logs = logs_of_a_run(&["--log-json"], None, 20).await;
    let lines: Vec<serde_json::Value> = logs
        .lines()
        .map(|l| serde_json::from_str(l).unwrap_or_else(|e| panic!("{e}: {l}")))
        .collect();
    let messages: Vec<&str> = lines
        .iter()
        .map(|l| l["fields"]["message"].as_str().unwrap_or_default())
        .collect();
    assert!(
        messages.contains(&"accepting post-receive notifications"),
        "{messages:?}"
    );
    assert!(lines.iter().all(|l| l["level"].is_string()), "{logs}");
    assert!(
        !messages.iter().any(|m| m.starts_with("push ")),
        "{messages:?}"
    );
    assert!(
        lines.len() < 40,
        "{} lines for 20 pushes: {logs}",
        lines.len()
    );
}

// With the per-push lines turned on, each carries its span's correlation
// ID; written to a file, text logs carry no colour codes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_push_lines_at_debug_carry_the_correlation_id_and_no_colour() {
    let level = "info,pushbus_hook_ingest=debug,pushbus_filter=debug";
    let logs = logs_of_a_run(&[], Some(level), 3).await;
    assert!(!logs.contains('\u{1b}'), "colour codes in a file: {logs}");
    for what in ["push stored", "push matches no agent"] {
        let lines: Vec<&str> = logs.lines().filter(|l| l.contains(what)).collect();
        assert_eq!(lines.len(), 3, "{what}: {logs}");
        assert!(
            lines.iter().all(|l| l.contains("correlation_id=")),
            "{what}: {lines:?}"
        );
    }
}

// A dashboard's view of a durable consumer: its backlog gauges and its
// dead letters, sampled every 10 s (README "Metrics").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn consumer_gauges_show_the_backlog_and_dead_letters_per_consumer() {
    let nats = NatsServer::start();
    let filter = Process::start(&nats.url(), "filter", &[]).await;
    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(&nats).await);
    // Not an envelope: dead-lettered at its first delivery.
    js.publish("pushbus.push.1.poison", "not protobuf".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let url = format!("http://{}/metrics", filter.ops());
    until_ok("the filter consumer's gauges", async || {
        let text = reqwest::get(&url).await.unwrap().text().await.unwrap();
        let gauge = |name: &str| {
            text.lines()
                .find(|l| l.starts_with(&format!("{name}{{")) && l.contains("consumer=\"filter\""))
                .and_then(|l| l.rsplit(' ').next())
                .map(str::to_owned)
        };
        let seen = [
            gauge("pushbus_dlq_messages"),
            gauge("pushbus_consumer_pending"),
            gauge("pushbus_consumer_ack_pending"),
            gauge("pushbus_consumer_redelivered"),
        ];
        let want = ["1", "0", "0", "0"].map(|v| Some(v.to_owned()));
        if seen == want {
            Ok(())
        } else {
            Err(format!("{seen:?}"))
        }
    })
    .await;
}
