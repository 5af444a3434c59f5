//! gitops-notifier's webhook delivery against a real nats-server and a real
//! local HTTP receiver: GitLab's payload and headers, retries with growing
//! delays, dead letters, the private-address guard.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::extract::{Path, State};
use axum::http::{HeaderMap, StatusCode};
use pushbus_gitops_notifier::webhook::WebhookConfig;
use pushbus_shared::bus::Publisher;
use pushbus_shared::proto::{
    AgentConfig, AgentPoke, ChangeKind, GitPushEvent, RefChange, RefKind, Source, Webhook,
};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::{EventMeta, names};

use crate::fixtures::{any_ref_of, main_branch_poke, put_agent};
use crate::guarantees::Process;
use crate::poll::eventually;
use crate::support::{Replica, local};

const DLQ_SUBJECT: &str = "pushbus.dlq.gitops-notifier-webhooks";

/// One request the receiver saw.
#[derive(Clone, Debug)]
struct Hit {
    path: String,
    at: Instant,
    headers: HeaderMap,
    body: serde_json::Value,
}

/// A local webhook receiver, any method. Its answer depends on the path:
/// `ok/…` 200, `fail-N/…` 500 for the first N requests then 200,
/// `down/…` always 500, `missing/…` 404, `retry-after-N/…` and
/// `retry-date-N/…` busy once with a Retry-After, `once-C/…` status C
/// once then 200, `redirect-P/…` always 302 to `127.0.0.1:P/ok/landed`.
#[derive(Clone, Default)]
struct Receiver {
    hits: Arc<Mutex<Vec<Hit>>>,
}

impl Receiver {
    async fn start() -> (Receiver, SocketAddr) {
        let receiver = Receiver::default();
        let app = axum::Router::new()
            .route("/{*path}", axum::routing::any(receive))
            .with_state(receiver.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(async move { axum::serve(listener, app).await });
        (receiver, addr)
    }

    fn hits(&self, path: &str) -> Vec<Hit> {
        self.hits
            .lock()
            .unwrap()
            .iter()
            .filter(|h| h.path == path)
            .cloned()
            .collect()
    }

    fn all(&self) -> usize {
        self.hits.lock().unwrap().len()
    }

    async fn wait_for(&self, path: &str, n: usize, within: Duration) -> Vec<Hit> {
        eventually(&format!("{n} requests to {path}"), within, async || {
            Some(self.hits(path)).filter(|h| h.len() >= n)
        })
        .await
    }
}

async fn receive(
    State(r): State<Receiver>,
    Path(path): Path<String>,
    headers: HeaderMap,
    body: axum::body::Bytes,
) -> axum::response::Response {
    use axum::response::IntoResponse;
    let first = path.split('/').next().unwrap_or_default().to_owned();
    let (status, text) = answer(&r, &path, headers, &body);
    // `retry-after-N/…`: 503 with `Retry-After: N` once, then 200;
    // `retry-date-N/…`: 429 with an HTTP date N seconds ahead once, then 200.
    if status == StatusCode::SERVICE_UNAVAILABLE {
        if let Some(n) = first.strip_prefix("retry-after-") {
            return (status, [("retry-after", n.to_owned())], text).into_response();
        }
        if let Some(n) = first.strip_prefix("retry-date-") {
            let at = std::time::SystemTime::now() + Duration::from_secs(n.parse().unwrap());
            return (
                StatusCode::TOO_MANY_REQUESTS,
                [("retry-after", httpdate::fmt_http_date(at))],
                text,
            )
                .into_response();
        }
    }
    if let Some(port) = first.strip_prefix("redirect-") {
        let location = format!("http://127.0.0.1:{port}/ok/landed");
        return (status, [("location", location)], text).into_response();
    }
    (status, text).into_response()
}

fn answer(r: &Receiver, path: &str, headers: HeaderMap, body: &[u8]) -> (StatusCode, &'static str) {
    let path = path.to_owned();
    let seen = {
        let mut hits = r.hits.lock().unwrap();
        hits.push(Hit {
            path: path.clone(),
            at: Instant::now(),
            headers,
            body: serde_json::from_slice(body).unwrap_or(serde_json::Value::Null),
        });
        hits.iter().filter(|h| h.path == path).count()
    };
    let first = path.split('/').next().unwrap_or_default();
    if first == "ok" {
        (StatusCode::OK, "{}")
    } else if first == "down" {
        (StatusCode::INTERNAL_SERVER_ERROR, "boom")
    } else if first == "missing" {
        (StatusCode::NOT_FOUND, "no such receiver")
    } else if first.starts_with("retry-after-") || first.starts_with("retry-date-") {
        if seen == 1 {
            (StatusCode::SERVICE_UNAVAILABLE, "busy")
        } else {
            (StatusCode::OK, "{}")
        }
    } else if first.starts_with("redirect-") {
        (StatusCode::FOUND, "moved elsewhere")
    } else if let Some(code) = first.strip_prefix("once-") {
        if seen == 1 {
            (
                StatusCode::from_u16(code.parse().unwrap()).unwrap(),
                "not now",
            )
        } else {
            (StatusCode::OK, "{}")
        }
    } else if let Some(n) = first.strip_prefix("fail-") {
        let n: usize = n.parse().unwrap();
        if seen <= n {
            (StatusCode::INTERNAL_SERVER_ERROR, "not yet")
        } else {
            (StatusCode::OK, "{}")
        }
    } else {
        (StatusCode::BAD_REQUEST, "unknown path")
    }
}

fn fast(allow_private: bool) -> WebhookConfig {
    WebhookConfig {
        gitlab_url: "https://gitlab.example.com".into(),
        max_attempts: 5,
        backoff_base_ms: 100,
        backoff_max_ms: 5_000,
        timeout_ms: 2_000,
        allow_private,
        config_cache_ms: 200,
        ..Default::default()
    }
}

async fn register(nats: &NatsServer, agent_id: &str, url: &str) {
    register_webhook(
        nats,
        agent_id,
        Webhook {
            url: url.into(),
            secret_token: format!("token-{agent_id}"),
            ..Default::default()
        },
    )
    .await;
}

/// Registers `agent_id` watching any ref of project 42, with `webhook`.
async fn register_webhook(nats: &NatsServer, agent_id: &str, webhook: Webhook) {
    let cfg = AgentConfig {
        agent_id: agent_id.into(),
        watches: vec![any_ref_of(42)],
        webhook: Some(webhook),
        ..Default::default()
    };
    put_agent(nats, &cfg).await;
}

/// A server with the notifier's and filter's topology, a receiver, and a
/// publisher.
async fn setup() -> (NatsServer, Receiver, SocketAddr, Publisher) {
    let nats = NatsServer::start();
    let (receiver, addr) = Receiver::start().await;
    let publisher = publisher(&nats).await;
    (nats, receiver, addr, publisher)
}

async fn publisher(nats: &NatsServer) -> Publisher {
    let js = async_nats::jetstream::new(testkit::client(nats).await);
    pushbus_gitops_notifier::topology(&pushbus_gitops_notifier::Config::new(
        ([127, 0, 0, 1], 0).into(),
    ))
    .merge(pushbus_filter::topology(&crate::support::filter_config()))
    .ensure(&js)
    .await
    .unwrap();
    Publisher::new(js, Source::default())
}

/// Publishes a webhook delivery for `agent_id` straight onto its stream (as
/// filter does for agents with a webhook).
async fn poke(publisher: &Publisher, agent_id: &str, sha: u32) -> String {
    let poke = main_branch_poke(agent_id, 42, format!("{sha:040x}"));
    let meta = EventMeta::fresh("corr-webhook-test");
    publisher
        .publish(names::webhook_subject(agent_id), &poke, &meta)
        .await
        .unwrap();
    meta.event_id
}

/// Dead letters of the webhook consumer: (agent ID, reason, delivered).
async fn dead_letters(nats: &NatsServer) -> Vec<(String, String, String)> {
    let js = async_nats::jetstream::new(testkit::client(nats).await);
    let stream = js.get_stream(names::STREAM_DLQ).await.unwrap();
    let state = stream.get_info().await.unwrap().state;
    let mut out = Vec::new();
    if state.messages == 0 {
        return out;
    }
    for seq in state.first_sequence..=state.last_sequence {
        let Ok(m) = stream.get_raw_message(seq).await else {
            continue;
        };
        if m.subject.as_str() != DLQ_SUBJECT {
            continue;
        }
        let env = pushbus_shared::envelope::decode(&m.payload).unwrap();
        let poke: AgentPoke = pushbus_shared::envelope::open(&env).unwrap();
        let header = |name: &str| {
            m.headers
                .get(name)
                .map(|v| v.as_str().to_owned())
                .unwrap_or_default()
        };
        out.push((
            poke.agent_id,
            header(names::headers::DLQ_REASON),
            header(names::headers::DLQ_DELIVERED),
        ));
    }
    out
}

/// Waits for `n` dead letters; agent ID -> (reason, delivered).
async fn wait_dead_letters(
    nats: &NatsServer,
    n: usize,
    within: Duration,
) -> HashMap<String, (String, String)> {
    eventually(&format!("{n} dead letters"), within, async || {
        Some(dead_letters(nats).await).filter(|l| l.len() >= n)
    })
    .await
    .into_iter()
    .map(|(agent, reason, delivered)| (agent, (reason, delivered)))
    .collect()
}

/// The `/ok/<agent_id>` target of `Receiver` on `host`.
fn ok_url(host: &str, port: u16, agent_id: &str) -> String {
    format!("http://{host}:{port}/ok/{agent_id}")
}

/// A dead-letter reason that refuses `address` as a loopback one.
fn assert_names_loopback(reason: &str, address: &str) {
    assert!(
        reason.contains(address) && reason.contains("loopback"),
        "{reason}"
    );
}

fn header<'a>(hit: &'a Hit, name: &str) -> &'a str {
    hit.headers
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_push_and_tag_push_carry_gitlabs_payload_and_headers() {
    let (nats, receiver, addr, publisher) = setup().await;
    register(&nats, "hooked", &format!("http://{addr}/ok/hooked")).await;
    let filter = Replica::filter(&nats.url()).await;
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;

    let push = GitPushEvent {
        project_id: 42,
        project_path: "group/app".into(),
        actor: "username-alice".into(),
        changes: vec![RefChange {
            old_sha: "a".repeat(40),
            new_sha: "b".repeat(40),
            r#ref: "refs/heads/main".into(),
            ref_kind: RefKind::Branch as i32,
            change_kind: ChangeKind::Update as i32,
            changed_paths: vec!["deploy/app.yaml".into(), "deploy/svc.yaml".into()],
            paths_known: true,
            ..Default::default()
        }],
        ..Default::default()
    };
    let meta = EventMeta::fresh("corr-push");
    publisher
        .publish(names::push_subject(42, "test"), &push, &meta)
        .await
        .unwrap();
    let hit = receiver
        .wait_for("ok/hooked", 1, Duration::from_secs(15))
        .await
        .remove(0);
    assert_eq!(header(&hit, "X-Gitlab-Event"), "Push Hook");
    assert_eq!(header(&hit, "X-Gitlab-Token"), "token-hooked");
    assert_eq!(header(&hit, "Content-Type"), "application/json");
    assert!(header(&hit, "User-Agent").starts_with("pushbus-gitops-notifier/"));
    assert_eq!(
        header(&hit, "X-Gitlab-Instance"),
        "https://gitlab.example.com"
    );
    // The poke's event ID: stable across retries, for receivers' dedup.
    let poke_id = EventMeta::derived_from(&meta, &["hooked", "refs/heads/main"]).event_id;
    assert_eq!(header(&hit, "X-Gitlab-Event-UUID"), poke_id);
    let b = &hit.body;
    assert_eq!(b["object_kind"], "push");
    assert_eq!(b["event_name"], "push");
    assert_eq!(b["ref"], "refs/heads/main");
    assert_eq!(b["before"], "a".repeat(40));
    assert_eq!(b["after"], "b".repeat(40));
    assert_eq!(b["checkout_sha"], "b".repeat(40));
    assert_eq!(b["user_username"], "alice");
    assert_eq!(b["project_id"], 42);
    let p = &b["project"];
    assert_eq!(p["id"], 42);
    assert_eq!(p["path_with_namespace"], "group/app");
    assert_eq!(p["web_url"], "https://gitlab.example.com/group/app");
    assert_eq!(
        p["git_http_url"],
        "https://gitlab.example.com/group/app.git"
    );
    assert_eq!(p["git_ssh_url"], "git@gitlab.example.com:group/app.git");
    assert_eq!(b["repository"]["git_http_url"], p["git_http_url"]);
    assert_eq!(b["repository"]["homepage"], p["web_url"]);
    assert_eq!(b["total_commits_count"], 1);
    assert_eq!(b["commits"][0]["id"], "b".repeat(40));
    assert_eq!(
        b["commits"][0]["modified"],
        serde_json::json!(["deploy/app.yaml", "deploy/svc.yaml"])
    );
    assert!(b["commits"][0]["timestamp"].is_string(), "{b}");

    let tag = GitPushEvent {
        project_id: 42,
        project_path: "group/app".into(),
        changes: vec![RefChange {
            old_sha: "0".repeat(40),
            new_sha: "c".repeat(40),
            r#ref: "refs/tags/v1.0.0".into(),
            ref_kind: RefKind::Tag as i32,
            change_kind: ChangeKind::Create as i32,
            ..Default::default()
        }],
        ..Default::default()
    };
    publisher
        .publish(
            names::push_subject(42, "test"),
            &tag,
            &EventMeta::fresh("corr-tag"),
        )
        .await
        .unwrap();
    let hit = receiver
        .wait_for("ok/hooked", 2, Duration::from_secs(15))
        .await
        .remove(1);
    assert_eq!(header(&hit, "X-Gitlab-Event"), "Tag Push Hook");
    assert_eq!(hit.body["object_kind"], "tag_push");
    assert_eq!(hit.body["ref"], "refs/tags/v1.0.0");
    assert_eq!(hit.body["checkout_sha"], "c".repeat(40));
    // Paths unknown: no list to filter on, so receivers refresh.
    assert_eq!(hit.body["commits"][0]["modified"], serde_json::json!([]));

    // A config change applies within seconds: the webhook removed, pokes
    // for the agent are acked without a request.
    put_agent(
        &nats,
        &AgentConfig {
            agent_id: "hooked".into(),
            watches: vec![any_ref_of(42)],
            ..Default::default()
        },
    )
    .await;
    tokio::time::sleep(Duration::from_millis(500)).await;
    poke(&publisher, "hooked", 9).await;
    tokio::time::sleep(Duration::from_secs(1)).await;
    assert_eq!(
        receiver.hits("ok/hooked").len(),
        2,
        "webhook removed but still called"
    );

    notifier.stop().await;
    filter.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_with_growing_delays_and_dead_letters_the_rest() {
    let (nats, receiver, addr, publisher) = setup().await;
    register(&nats, "down", &format!("http://{addr}/down/x")).await;
    register(&nats, "flaky", &format!("http://{addr}/fail-3/x")).await;
    register(&nats, "gone", &format!("http://{addr}/missing/x")).await;
    register(&nats, "fine", &format!("http://{addr}/ok/fine")).await;
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;

    poke(&publisher, "down", 1).await;
    poke(&publisher, "flaky", 2).await;
    poke(&publisher, "gone", 3).await;
    // Other pokes keep flowing while those are retried.
    let started = Instant::now();
    for i in 0..5 {
        poke(&publisher, "fine", 10 + i).await;
    }
    receiver
        .wait_for("ok/fine", 5, Duration::from_secs(10))
        .await;
    assert!(
        receiver.hits("down/x").len() < 5,
        "healthy pokes waited for the failing target ({:?})",
        started.elapsed()
    );

    // fail-3: three 500s, then delivered on the fourth attempt.
    let flaky = receiver
        .wait_for("fail-3/x", 4, Duration::from_secs(15))
        .await;
    let gaps: Vec<Duration> = flaky.windows(2).map(|w| w[1].at - w[0].at).collect();
    for (i, gap) in gaps.iter().enumerate() {
        // Nominal backoff 100 ms × 2^i, spread ±20% by jitter.
        let nominal = Duration::from_millis(100 * (1 << i));
        assert!(
            *gap >= nominal.mul_f64(0.8),
            "gap {i} = {gap:?} < 0.8 × {nominal:?}: {gaps:?}"
        );
    }
    assert!(gaps[2] > gaps[0], "delays did not grow: {gaps:?}");

    // down: 5 attempts (the configured maximum), then the dead-letter
    // stream with the last error; gone (404): one attempt, dead-lettered.
    let by_agent = wait_dead_letters(&nats, 2, Duration::from_secs(20)).await;
    let (reason, delivered) = &by_agent["down"];
    assert!(reason.starts_with("max_deliveries"), "{reason}");
    assert!(reason.contains("HTTP 500"), "{reason}");
    assert!(reason.contains("boom"), "{reason}");
    assert_eq!(delivered, "5");
    assert_eq!(receiver.hits("down/x").len(), 5);
    let (reason, delivered) = &by_agent["gone"];
    assert!(reason.starts_with("permanent"), "{reason}");
    assert!(reason.contains("HTTP 404"), "{reason}");
    assert!(reason.contains("no such receiver"), "{reason}");
    assert_eq!(delivered, "1");
    assert_eq!(receiver.hits("missing/x").len(), 1, "a 404 was retried");
    assert!(!by_agent.contains_key("flaky"));
    assert!(!by_agent.contains_key("fine"));

    // Settle: nothing more arrives for the finished ones.
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hits("fail-3/x").len(), 4);
    assert_eq!(receiver.hits("down/x").len(), 5);
    notifier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_to_private_address_is_refused_unless_allowed() {
    let (nats, receiver, addr, publisher) = setup().await;
    let port = addr.port();
    register(&nats, "literal", &ok_url("127.0.0.1", port, "literal")).await;
    // A name, checked at connection time by the resolver.
    register(&nats, "named", &ok_url("localhost", port, "named")).await;
    register(&nats, "scheme", "file:///etc/passwd").await;

    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(false)).await;
    poke(&publisher, "literal", 1).await;
    poke(&publisher, "named", 2).await;
    poke(&publisher, "scheme", 3).await;
    let by_agent = wait_dead_letters(&nats, 3, Duration::from_secs(15)).await;
    let (reason, delivered) = &by_agent["literal"];
    assert!(reason.starts_with("permanent"), "{reason}");
    assert_names_loopback(reason, "127.0.0.1");
    assert_eq!(delivered, "1");
    let (reason, _) = &by_agent["named"];
    assert!(reason.starts_with("permanent"), "{reason}");
    assert_names_loopback(reason, "localhost");
    assert!(
        reason.contains("127.0.0.1") || reason.contains("::1"),
        "{reason}"
    );
    let (reason, _) = &by_agent["scheme"];
    assert!(reason.contains("scheme"), "{reason}");
    assert_eq!(receiver.all(), 0, "a refused target was called");
    notifier.stop().await;

    // Allowed: the same targets are called.
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;
    poke(&publisher, "literal", 4).await;
    poke(&publisher, "named", 5).await;
    receiver
        .wait_for("ok/literal", 1, Duration::from_secs(10))
        .await;
    receiver
        .wait_for("ok/named", 1, Duration::from_secs(10))
        .await;
    notifier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_honours_retry_after_seconds_and_dates_within_the_cap() {
    let (nats, receiver, addr, publisher) = setup().await;
    register(&nats, "secs", &format!("http://{addr}/retry-after-1/x")).await;
    register(&nats, "date", &format!("http://{addr}/retry-date-2/x")).await;
    register(
        &nats,
        "capped",
        &format!("http://{addr}/retry-after-3600/x"),
    )
    .await;
    let config = WebhookConfig {
        backoff_max_ms: 2_500,
        ..fast(true)
    };
    let notifier = Replica::notifier_with_webhooks(&nats.url(), config).await;
    poke(&publisher, "secs", 1).await;
    poke(&publisher, "date", 2).await;
    poke(&publisher, "capped", 3).await;
    let gap = |hits: Vec<Hit>| hits[1].at - hits[0].at;
    let within = Duration::from_secs(15);
    // Without Retry-After the second attempt would come after ~100 ms.
    let secs = gap(receiver.wait_for("retry-after-1/x", 2, within).await);
    assert!(
        secs >= Duration::from_millis(950) && secs < Duration::from_millis(2_000),
        "Retry-After: 1 -> {secs:?}"
    );
    // An HTTP date has whole seconds: between 1 and 2 s ahead when sent.
    let date = gap(receiver.wait_for("retry-date-2/x", 2, within).await);
    assert!(
        date >= Duration::from_millis(950) && date < Duration::from_millis(2_600),
        "Retry-After: <date +2 s> -> {date:?}"
    );
    // An hour is cut to --webhook-backoff-max-ms.
    let capped = gap(receiver.wait_for("retry-after-3600/x", 2, within).await);
    assert!(
        capped >= Duration::from_millis(2_400) && capped < Duration::from_millis(4_000),
        "Retry-After: 3600 with a 2.5 s cap -> {capped:?}"
    );
    assert!(dead_letters(&nats).await.is_empty());
    notifier.stop().await;
}

// 408 and 429 without Retry-After are worth another try, like a 5xx: the
// poke is redelivered after the backoff, under the same idempotency key
// (the poke's event ID), so receivers can drop repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_retries_408_and_429_under_the_pokes_event_id() {
    let (nats, receiver, addr, publisher) = setup().await;
    register(&nats, "timeout", &format!("http://{addr}/once-408/x")).await;
    register(&nats, "busy", &format!("http://{addr}/once-429/x")).await;
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;
    let pokes = [
        ("once-408/x", poke(&publisher, "timeout", 1).await),
        ("once-429/x", poke(&publisher, "busy", 2).await),
    ];
    for (path, event_id) in &pokes {
        let hits = receiver.wait_for(path, 2, Duration::from_secs(15)).await;
        // Redelivered after the backoff (100 ms ± 20%), not at once.
        let gap = hits[1].at - hits[0].at;
        assert!(gap >= Duration::from_millis(80), "{path}: {gap:?}");
        for hit in &hits {
            assert_eq!(header(hit, "Idempotency-Key"), event_id, "{path}");
            assert_eq!(header(hit, "X-Gitlab-Event-UUID"), event_id, "{path}");
        }
    }
    // Delivered on the second attempt: nothing more, nothing dead.
    tokio::time::sleep(Duration::from_millis(500)).await;
    for (path, _) in &pokes {
        assert_eq!(receiver.hits(path).len(), 2, "{path}");
    }
    assert!(dead_letters(&nats).await.is_empty());
    notifier.stop().await;
}

// A redirect could lead anywhere, past the address check: a 302 is not
// followed, not retried, but dead-lettered at once with status and body.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_redirect_is_dead_lettered_at_once_and_never_followed() {
    let (nats, receiver, addr, publisher) = setup().await;
    let (elsewhere, elsewhere_addr) = Receiver::start().await;
    let path = format!("redirect-{}/x", elsewhere_addr.port());
    register(&nats, "moved", &format!("http://{addr}/{path}")).await;
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;
    poke(&publisher, "moved", 1).await;
    let by_agent = wait_dead_letters(&nats, 1, Duration::from_secs(15)).await;
    let (reason, delivered) = &by_agent["moved"];
    assert!(reason.starts_with("permanent"), "{reason}");
    assert!(reason.contains("HTTP 302"), "{reason}");
    assert!(reason.contains("moved elsewhere"), "{reason}");
    assert_eq!(delivered, "1");
    tokio::time::sleep(Duration::from_millis(500)).await;
    assert_eq!(receiver.hits(&path).len(), 1, "a 302 was retried");
    assert_eq!(elsewhere.all(), 0, "the redirect was followed");
    notifier.stop().await;
}

// A proxy would resolve the target's name itself, past the address guard:
// the notifier's own process, with every proxy variable set to a black
// hole, calls the target directly (variables are process-wide, hence a
// process of its own).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_goes_to_the_target_directly_whatever_the_proxy_variables_say() {
    let (nats, receiver, addr, publisher) = setup().await;
    register(&nats, "direct", &ok_url("127.0.0.1", addr.port(), "direct")).await;
    let (proxy, via_proxy) = crate::hook::counted_black_hole().await;
    let mut env: Vec<(&str, &str)> = ["http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY"]
        .into_iter()
        .map(|var| (var, proxy.as_str()))
        .collect();
    // Nothing exempted from the proxy by the environment we run in.
    env.extend([("NO_PROXY", ""), ("no_proxy", "")]);
    let listen = local(testkit::free_port()).to_string();
    let _notifier = Process::start_with_env(
        &nats.url(),
        "gitops-notifier",
        &[
            "--notifier-listen",
            &listen,
            "--webhook-allow",
            "127.0.0.1/32",
            "--webhook-backoff-base-ms",
            "100",
            "--webhook-timeout-ms",
            "1000",
        ],
        &env,
    )
    .await;
    poke(&publisher, "direct", 1).await;
    receiver
        .wait_for("ok/direct", 1, Duration::from_secs(15))
        .await;
    assert_eq!(
        via_proxy.load(Ordering::SeqCst),
        0,
        "the proxy got the webhook"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_dead_letter_reasons_never_carry_the_target_url() {
    let (nats, receiver, addr, publisher) = setup().await;
    let dead = testkit::free_port();
    let hole = crate::hook::black_hole().await;
    let hole = hole.trim_start_matches("http://");
    register(
        &nats,
        "refused",
        &format!("http://alice:hunter2@127.0.0.1:{dead}/hook/SECRETPATH?token=QUERYSECRET"),
    )
    .await;
    register(
        &nats,
        "silent",
        &format!("http://alice:hunter2@{hole}/hook/SECRETPATH?token=QUERYSECRET"),
    )
    .await;
    register(
        &nats,
        "failing",
        &format!("http://alice:hunter2@{addr}/down/SECRETPATH?token=QUERYSECRET"),
    )
    .await;
    let config = WebhookConfig {
        max_attempts: 2,
        timeout_ms: 300,
        ..fast(true)
    };
    let notifier = Replica::notifier_with_webhooks(&nats.url(), config).await;
    for (i, agent) in ["refused", "silent", "failing"].iter().enumerate() {
        poke(&publisher, agent, i as u32 + 1).await;
    }
    let by_agent = wait_dead_letters(&nats, 3, Duration::from_secs(20)).await;
    for (agent, want) in [
        ("refused", "cannot connect"),
        ("silent", "timed out"),
        ("failing", "HTTP 500"),
    ] {
        let (reason, _) = &by_agent[agent];
        assert!(reason.contains(want), "{agent}: {reason}");
        assert!(
            reason.contains("127.0.0.1"),
            "{agent}: the host helps: {reason}"
        );
        for secret in [
            "hunter2",
            "alice",
            "SECRETPATH",
            "QUERYSECRET",
            "/hook",
            "/down",
        ] {
            assert!(!reason.contains(secret), "{agent}: {secret} in {reason}");
        }
    }
    assert_eq!(receiver.hits("down/SECRETPATH").len(), 2);
    notifier.stop().await;
}

/// Flux notification-controller's Receiver checks
/// (internal/server/receiver_handlers.go), reproduced: the receiver is found
/// by `/hook/<sha256(token+name+namespace)>`; type `gitlab` compares
/// `X-Gitlab-Token` with the token and matches `X-Gitlab-Event` against
/// `spec.events` case-insensitively; type `generic-hmac` verifies
/// `X-Signature: <alg>=<hex HMAC of the body keyed with the token>`. Flux
/// answers 400 when validation fails and 200 after annotating the sources.
#[derive(Clone)]
struct FluxReceiver {
    name: &'static str,
    kind: &'static str,
    token: &'static str,
    events: &'static [&'static str],
}

impl FluxReceiver {
    fn path(&self) -> String {
        use sha2::Digest;
        let digest = sha2::Sha256::digest(format!("{}{}flux-system", self.token, self.name));
        format!("/hook/{}", hex::encode(digest))
    }

    fn validate(&self, headers: &HeaderMap, body: &[u8]) -> Result<(), String> {
        let header = |n: &str| {
            headers
                .get(n)
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default()
        };
        match self.kind {
            "gitlab" => {
                if header("X-Gitlab-Token") != self.token {
                    return Err("the X-Gitlab-Token header value does not match".into());
                }
                let event = header("X-Gitlab-Event");
                if !self.events.is_empty()
                    && !self.events.iter().any(|e| e.eq_ignore_ascii_case(event))
                {
                    return Err(format!("the GitLab event '{event}' is not authorised"));
                }
                Ok(())
            }
            "generic-hmac" => {
                use hmac::Mac;
                let sig = header("X-Signature");
                let (alg, hex_sig) = sig.split_once('=').ok_or("missing signature")?;
                if alg != "sha256" {
                    return Err(format!("unexpected algorithm {alg}"));
                }
                let given = hex::decode(hex_sig).map_err(|e| e.to_string())?;
                let mut mac =
                    hmac::Hmac::<sha2::Sha256>::new_from_slice(self.token.as_bytes()).unwrap();
                mac.update(body);
                mac.verify_slice(&given)
                    .map_err(|_| "HMAC mismatch".to_owned())
            }
            other => Err(format!("receiver type {other} not reproduced")),
        }
    }
}

type Annotated = Arc<Mutex<Vec<(&'static str, HeaderMap)>>>;

async fn flux(receivers: Vec<FluxReceiver>) -> (SocketAddr, Annotated) {
    let annotated: Annotated = Arc::default();
    let app = axum::Router::new()
        .route(
            "/hook/{digest}",
            axum::routing::post(
                |State((receivers, annotated)): State<(Vec<FluxReceiver>, Annotated)>,
                 uri: axum::http::Uri,
                 headers: HeaderMap,
                 body: axum::body::Bytes| async move {
                    let Some(r) = receivers.iter().find(|r| r.path() == uri.path()) else {
                        return StatusCode::NOT_FOUND;
                    };
                    match r.validate(&headers, &body) {
                        Ok(()) => {
                            annotated.lock().unwrap().push((r.name, headers));
                            StatusCode::OK
                        }
                        Err(_) => StatusCode::BAD_REQUEST,
                    }
                },
            ),
        )
        .with_state((receivers, annotated.clone()));
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, annotated)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_passes_flux_gitlab_and_generic_hmac_receivers() {
    let nats = NatsServer::start();
    let publisher = publisher(&nats).await;
    let gitlab = FluxReceiver {
        name: "gitlab-receiver",
        kind: "gitlab",
        token: "gl-token",
        events: &["Push Hook", "Tag Push Hook"],
    };
    let hmac = FluxReceiver {
        name: "hmac-receiver",
        kind: "generic-hmac",
        token: "hmac-token",
        events: &[],
    };
    let (addr, annotated) = flux(vec![gitlab.clone(), hmac.clone()]).await;
    let url = |r: &FluxReceiver| format!("http://{addr}{}", r.path());
    let agents = [
        ("flux-gl", url(&gitlab), "gl-token", ""),
        ("flux-hmac", url(&hmac), "", "hmac-token"),
        // Misconfigured: Flux refuses them, and so must our reproduction.
        ("flux-gl-wrong", url(&gitlab), "not-the-token", ""),
        ("flux-hmac-wrong", url(&hmac), "", "not-the-token"),
    ];
    for (agent, url, token, key) in &agents {
        register_webhook(
            &nats,
            agent,
            Webhook {
                url: url.clone(),
                secret_token: (*token).into(),
                hmac_secret: (*key).into(),
            },
        )
        .await;
    }
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;
    for (i, (agent, ..)) in agents.iter().enumerate() {
        poke(&publisher, agent, i as u32 + 1).await;
    }
    let by_agent = wait_dead_letters(&nats, 2, Duration::from_secs(15)).await;
    for agent in ["flux-gl-wrong", "flux-hmac-wrong"] {
        let (reason, delivered) = &by_agent[agent];
        assert!(reason.contains("HTTP 400"), "{agent}: {reason}");
        assert_eq!(delivered, "1");
    }
    let seen = eventually("two annotations", Duration::from_secs(10), async || {
        Some(annotated.lock().unwrap().clone()).filter(|a| a.len() >= 2)
    })
    .await;
    let mut names: Vec<&str> = seen.iter().map(|(n, _)| *n).collect();
    names.sort();
    assert_eq!(names, ["gitlab-receiver", "hmac-receiver"]);
    for (name, headers) in &seen {
        // Signed only when the config names an HMAC secret.
        assert_eq!(
            headers.contains_key("x-signature"),
            *name == "hmac-receiver",
            "{name}"
        );
    }
    assert!(!by_agent.contains_key("flux-gl") && !by_agent.contains_key("flux-hmac"));
    notifier.stop().await;
}

/// What Argo CD's `/api/webhook` (util/webhook/webhook.go, GitLab case)
/// extracts from a push, after go-playground/webhooks checked the token and
/// parsed the body into its typed `PushEventPayload`.
#[derive(Debug, Clone)]
struct ArgoSaw {
    web_url: String,
    revision: String,
    touched_head: bool,
    changed_files: Vec<String>,
    sha_before: String,
    sha_after: String,
}

/// The fields Argo CD reads, typed as the Go structs type them: a wrong
/// JSON type fails the parse (Argo CD then answers 400).
#[derive(serde::Deserialize)]
struct ArgoPush {
    #[serde(rename = "ref")]
    ref_name: String,
    before: String,
    after: String,
    project: ArgoProject,
    #[serde(default)]
    commits: Vec<ArgoCommit>,
}

#[derive(serde::Deserialize)]
struct ArgoProject {
    web_url: String,
    // Go leaves a missing string empty.
    #[serde(default)]
    default_branch: String,
}

#[derive(serde::Deserialize)]
struct ArgoCommit {
    #[serde(default)]
    added: Vec<String>,
    #[serde(default)]
    modified: Vec<String>,
    #[serde(default)]
    removed: Vec<String>,
}

/// `ParseRevision`: the third `/`-separated part of the ref, whole.
fn argo_parse_revision(r: &str) -> String {
    r.splitn(3, '/').last().unwrap_or_default().to_owned()
}

/// `GetWebURLRegex`.
fn argo_web_url_regex(web_url: &str) -> regex::Regex {
    let url = reqwest::Url::parse(web_url).unwrap();
    let host = regex::escape(url.host_str().unwrap());
    let path = regex::escape(&url.path()[1..]);
    let user = r"[\w\.][\w\.-]{0,30}[\w\.\$-]?";
    regex::Regex::new(&format!(
        r"(?i)^((https?|ssh)://)?({user}@)?((alt)?ssh\.)?{host}(:\d+)?[:/]{path}(\.git)?$"
    ))
    .unwrap()
}

/// `sourceRevisionHasChanged`.
fn argo_revision_changed(target_revision: &str, revision: &str, touched_head: bool) -> bool {
    let target = argo_parse_revision(target_revision);
    if target == "HEAD" || target.is_empty() {
        return touched_head;
    }
    if target_revision.starts_with("refs/heads/") || target_revision.starts_with("refs/tags/") {
        return revision == target;
    }
    target_revision == revision
}

async fn argo(secret: &'static str) -> (SocketAddr, Arc<Mutex<Vec<ArgoSaw>>>) {
    let saw: Arc<Mutex<Vec<ArgoSaw>>> = Arc::default();
    let app = axum::Router::new()
        .route(
            "/api/webhook",
            axum::routing::post(
                move |State(saw): State<Arc<Mutex<Vec<ArgoSaw>>>>,
                      headers: HeaderMap,
                      body: axum::body::Bytes| async move {
                    let header = |n: &str| {
                        headers
                            .get(n)
                            .and_then(|v| v.to_str().ok())
                            .unwrap_or_default()
                            .to_owned()
                    };
                    let event = header("X-Gitlab-Event");
                    if event.is_empty() {
                        return StatusCode::BAD_REQUEST;
                    }
                    if header("X-Gitlab-Token") != secret {
                        return StatusCode::BAD_REQUEST;
                    }
                    if event != "Push Hook" && event != "Tag Push Hook" {
                        return StatusCode::BAD_REQUEST;
                    }
                    let Ok(p) = serde_json::from_slice::<ArgoPush>(&body) else {
                        return StatusCode::BAD_REQUEST;
                    };
                    let revision = argo_parse_revision(&p.ref_name);
                    let mut changed_files = Vec::new();
                    for c in &p.commits {
                        changed_files.extend(c.added.iter().cloned());
                        changed_files.extend(c.modified.iter().cloned());
                        changed_files.extend(c.removed.iter().cloned());
                    }
                    saw.lock().unwrap().push(ArgoSaw {
                        web_url: p.project.web_url,
                        touched_head: p.project.default_branch == revision,
                        revision,
                        changed_files,
                        sha_before: argo_parse_revision(&p.before),
                        sha_after: argo_parse_revision(&p.after),
                    });
                    StatusCode::OK
                },
            ),
        )
        .with_state(saw.clone());
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (addr, saw)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_from_a_real_git_push_satisfies_argo_cds_gitlab_handler() {
    use crate::fixtures::{git, git_env};
    use crate::hook::bare_repo;
    let nats = NatsServer::start();
    let (addr, saw) = argo("argo-secret").await;
    register_webhook(
        &nats,
        "argocd",
        Webhook {
            url: format!("http://{addr}/api/webhook"),
            secret_token: "argo-secret".into(),
            ..Default::default()
        },
    )
    .await;
    let (listener, listen) = crate::support::bind_local().await;
    let ingest = Replica::ingest(&nats.url(), listener).await;
    let filter = Replica::filter(&nats.url()).await;
    let notifier = Replica::notifier_with_webhooks(&nats.url(), fast(true)).await;

    let tmp = tempfile::tempdir().unwrap();
    let (_, work) = bare_repo(
        tmp.path(),
        "app",
        "main",
        &format!("--ingest-url http://{listen}"),
    );
    let gitaly = [
        ("GL_REPOSITORY", "project-42"),
        ("GL_PROJECT_PATH", "group/app"),
        ("GL_ID", "user-3"),
    ];
    git_env(&work, &["push", "origin", "HEAD:refs/heads/main"], &gitaly);
    let first = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout).unwrap();
    std::fs::create_dir_all(work.join("deploy")).unwrap();
    std::fs::write(work.join("deploy/app.yaml"), "kind: Deployment\n").unwrap();
    git(&work, &["add", "deploy/app.yaml"]);
    git(&work, &["commit", "-q", "-m", "deploy"]);
    let second = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout).unwrap();
    git_env(&work, &["push", "origin", "HEAD:refs/heads/main"], &gitaly);
    git_env(
        &work,
        &["push", "origin", "HEAD:refs/heads/feature/x"],
        &gitaly,
    );

    let seen = eventually(
        "three Argo CD webhooks",
        Duration::from_secs(20),
        async || Some(saw.lock().unwrap().clone()).filter(|s| s.len() >= 3),
    )
    .await;
    let update = seen
        .iter()
        .find(|s| s.revision == "main" && s.sha_after == second.trim())
        .unwrap_or_else(|| panic!("no update of main: {seen:?}"));
    assert_eq!(update.sha_before, first.trim());
    assert!(
        update.touched_head,
        "default branch push not HEAD: {update:?}"
    );
    assert_eq!(update.changed_files, ["deploy/app.yaml"]);
    let feature = seen
        .iter()
        .find(|s| s.revision == "feature/x")
        .unwrap_or_else(|| panic!("no feature push: {seen:?}"));
    assert!(!feature.touched_head, "{feature:?}");

    // Applications Argo CD would refresh for these pushes.
    let re = argo_web_url_regex(&update.web_url);
    for repo in [
        "https://gitlab.example.com/group/app.git",
        "https://gitlab.example.com/group/app",
        "git@gitlab.example.com:group/app.git",
        "ssh://git@gitlab.example.com/group/app.git",
        "HTTPS://GITLAB.EXAMPLE.COM/group/app.git",
    ] {
        assert!(
            re.is_match(repo),
            "{repo} does not match {}",
            update.web_url
        );
    }
    for repo in [
        "https://gitlab.example.com/group/app-other.git",
        "https://gitlab.example.com/other/group/app.git",
        "https://gitlab.example.org/group/app.git",
    ] {
        assert!(!re.is_match(repo), "{repo} matches {}", update.web_url);
    }
    for (target, on_main, on_feature) in [
        ("HEAD", true, false),
        ("", true, false),
        ("main", true, false),
        ("refs/heads/main", true, false),
        ("feature/x", false, true),
    ] {
        assert_eq!(
            argo_revision_changed(target, &update.revision, update.touched_head),
            on_main,
            "{target:?} on main"
        );
        assert_eq!(
            argo_revision_changed(target, &feature.revision, feature.touched_head),
            on_feature,
            "{target:?} on feature/x"
        );
    }
    notifier.stop().await;
    filter.stop().await;
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn webhook_allowlist_admits_listed_networks_and_hosts_only() {
    let (nats, receiver, addr, publisher) = setup().await;
    let port = addr.port();
    // Every agent here carries a secret over plain http: only allowlisted
    // targets may get it.
    register(&nats, "listed", &ok_url("127.0.0.1", port, "listed")).await;
    register(&nats, "named", &ok_url("localhost", port, "named")).await;
    register(&nats, "unlisted", &ok_url("127.0.0.2", port, "unlisted")).await;
    let allow = |entries: &[&str]| WebhookConfig {
        allow: entries.iter().map(|e| e.parse().unwrap()).collect(),
        ..fast(false)
    };

    // A /32 on loopback: the literal and a name resolving into it are called.
    let notifier = Replica::notifier_with_webhooks(&nats.url(), allow(&["127.0.0.1/32"])).await;
    poke(&publisher, "listed", 1).await;
    poke(&publisher, "named", 2).await;
    poke(&publisher, "unlisted", 3).await;
    receiver
        .wait_for("ok/listed", 1, Duration::from_secs(10))
        .await;
    receiver
        .wait_for("ok/named", 1, Duration::from_secs(10))
        .await;
    let by_agent = wait_dead_letters(&nats, 1, Duration::from_secs(15)).await;
    let (reason, delivered) = &by_agent["unlisted"];
    assert!(reason.starts_with("permanent"), "{reason}");
    assert_names_loopback(reason, "127.0.0.2");
    assert_eq!(delivered, "1");
    assert!(receiver.hits("ok/unlisted").is_empty());
    notifier.stop().await;

    // A host name: that name is called whatever it resolves to, the bare
    // address it resolves to is not.
    let notifier = Replica::notifier_with_webhooks(&nats.url(), allow(&["localhost"])).await;
    poke(&publisher, "named", 4).await;
    poke(&publisher, "listed", 5).await;
    receiver
        .wait_for("ok/named", 2, Duration::from_secs(10))
        .await;
    let by_agent = wait_dead_letters(&nats, 2, Duration::from_secs(15)).await;
    let (reason, _) = &by_agent["listed"];
    assert_names_loopback(reason, "127.0.0.1");
    assert_eq!(receiver.hits("ok/listed").len(), 1);
    notifier.stop().await;
}
