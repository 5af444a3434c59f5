//! Hardened doors: slow and greedy clients, TLS, the gRPC ingest JWT, streams
//! closed when an agent's credential changes, and one validation path.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::hook_ingest_client::HookIngestClient;
use pushbus_shared::proto::watch_event::Event;
use pushbus_shared::proto::{
    AgentConfig, NotifyGitPushRequest, RefChange, WatchEvent, WatchRequest,
};
use pushbus_shared::testkit::NatsServer;
use sha2::Digest;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::poll::until;
use crate::support::{Replica, SseReader, Stack, bind_local};

/// One hook-ingest on a free port, its default configuration changed by
/// `tune`.
async fn ingest_with(
    nats: &NatsServer,
    tune: impl FnOnce(&mut pushbus_hook_ingest::Config),
) -> (Replica, SocketAddr) {
    let (listener, addr) = bind_local().await;
    let mut cfg = pushbus_hook_ingest::Config::new(addr);
    tune(&mut cfg);
    (Replica::ingest_on(&nats.url(), cfg, listener).await, addr)
}

fn push_body(project: i64) -> serde_json::Value {
    serde_json::json!({
        "gl_repository": format!("project-{project}"),
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
    })
}

fn vm_rss_kib() -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .unwrap()
}

/// A secret file holding `contents`, in a folder that lives as long as the
/// returned guard.
pub(crate) fn secret_file(contents: &str) -> (tempfile::TempDir, std::path::PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    let secret = dir.path().join("secret");
    std::fs::write(&secret, contents).unwrap();
    (dir, secret)
}

/// A JSON error body whose `error` mentions `needle`.
async fn assert_error_mentions(resp: reqwest::Response, needle: &str) {
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(err["error"].as_str().unwrap().contains(needle), "{err}");
}

/// The next SSE event closes the stream, saying `why`.
async fn assert_closed(sse: &mut SseReader, why: &str) {
    let (event, data) = sse
        .next_event(Duration::from_secs(3))
        .await
        .expect("closed event");
    assert_eq!(event, "closed");
    assert!(data.contains(why), "{data}");
}

/// An agent's SSE stream and gRPC watch both end, unauthenticated, for `why`.
async fn assert_revoked(sse: &mut SseReader, stream: &mut tonic::Streaming<WatchEvent>, why: &str) {
    assert_closed(sse, why).await;
    let end = tokio::time::timeout(Duration::from_secs(3), stream.message())
        .await
        .unwrap()
        .unwrap_err();
    assert_eq!(end.code(), tonic::Code::Unauthenticated);
    assert!(end.message().contains(why), "{end:?}");
}

/// A gRPC watch opens with its status event.
async fn assert_status_first(stream: &mut tonic::Streaming<WatchEvent>) {
    assert!(matches!(
        stream.message().await.unwrap().unwrap().event,
        Some(Event::Status(_))
    ));
}

async fn post(addr: SocketAddr, body: &serde_json::Value) -> (reqwest::StatusCode, Duration) {
    let started = Instant::now();
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/api/v4/internal/post_receive"))
        .json(body)
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .expect("valid request answered");
    (resp.status(), started.elapsed())
}

/// Reads until the server closes the connection or `within` passes; what
/// was read, and whether it closed.
async fn read_until_closed(s: &mut TcpStream, within: Duration) -> (String, bool) {
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + within;
    loop {
        match tokio::time::timeout_at(deadline, s.read(&mut buf)).await {
            Ok(Ok(0) | Err(_)) => return (String::from_utf8_lossy(&out).into(), true),
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => return (String::from_utf8_lossy(&out).into(), false),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_loris_and_a_connection_flood_leave_valid_pushes_answered_and_memory_bounded() {
    let _memory = crate::fixtures::PROCESS_MEMORY.lock().await;
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with(&nats, |cfg| {
        cfg.door.header_read_timeout_ms = 1000;
    })
    .await;
    assert_eq!(post(addr, &push_body(1)).await.0, 200);
    let rss_before = vm_rss_kib();

    // 400 clients that start a request head and never finish it.
    let mut loris = Vec::new();
    for _ in 0..400 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /api/v4/internal/post_receive HTTP/1.1\r\nHost: x\r\n")
            .await
            .unwrap();
        loris.push(s);
    }
    // And a flood: 3,000 connections opened, sent garbage or nothing, dropped.
    let flood = tokio::spawn(async move {
        for round in 0..30 {
            let mut batch = Vec::new();
            for i in 0..100 {
                batch.push(tokio::spawn(async move {
                    if let Ok(mut s) = TcpStream::connect(addr).await
                        && (round + i) % 2 == 0
                    {
                        let _ = s.write_all(b"\x16\x03\x01garbage\r\n\r\n").await;
                    }
                }));
            }
            for t in batch {
                let _ = t.await;
            }
        }
    });
    for p in 2..8 {
        let (status, took) = post(addr, &push_body(p)).await;
        assert_eq!(status, 200);
        assert!(took < Duration::from_secs(2), "valid push took {took:?}");
    }
    flood.await.unwrap();
    // The server drops every unfinished head after its deadline.
    let closed = futures::future::join_all(
        loris
            .iter_mut()
            .map(|s| read_until_closed(s, Duration::from_secs(4))),
    )
    .await;
    assert!(
        closed.iter().all(|(_, c)| *c),
        "{} slow clients still connected",
        closed.iter().filter(|(_, c)| !c).count()
    );
    let (status, took) = post(addr, &push_body(9)).await;
    assert_eq!(status, 200);
    assert!(took < Duration::from_secs(2), "{took:?}");
    let grown = vm_rss_kib().saturating_sub(rss_before);
    assert!(grown < 64 * 1024, "VmRSS grew by {grown} KiB");
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn connections_over_the_limit_are_closed_at_once_and_stalled_bodies_time_out() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with(&nats, |cfg| {
        cfg.door.max_connections = 20;
        cfg.door.request_timeout_ms = 800;
    })
    .await;

    // A body that stops halfway: 408 with the JSON error naming the flag.
    let started = Instant::now();
    let mut s = body_stopped_halfway(addr).await;
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert!(answer.contains("--ingest-request-timeout-ms"), "{answer}");
    assert!(started.elapsed() < Duration::from_secs(2));
    drop(s);

    let mut held = Vec::new();
    for _ in 0..20 {
        let mut s = TcpStream::connect(addr).await.unwrap();
        s.write_all(b"GET / HTTP/1.1\r\n").await.unwrap();
        held.push(s);
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut extra = TcpStream::connect(addr).await.unwrap();
    let (_, closed) = read_until_closed(&mut extra, Duration::from_millis(500)).await;
    assert!(closed, "a connection over the limit was kept");
    drop(held);
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert_eq!(post(addr, &push_body(3)).await.0, 200);
    ingest.stop().await;
}

/// A request whose body stops halfway; it keeps its request slot until it
/// times out or the connection is dropped.
async fn body_stopped_halfway(addr: SocketAddr) -> TcpStream {
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /api/v4/internal/post_receive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n{\"gl_rep")
        .await
        .unwrap();
    // Until its handler has the slot and waits for the rest of the body.
    tokio::time::sleep(Duration::from_millis(300)).await;
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_over_the_in_flight_limit_waits_for_a_slot_before_its_503() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with_one_slot(&nats, 1_500).await;

    // No slot frees within the wait: 503 naming both flags.
    let held = body_stopped_halfway(addr).await;
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/api/v4/internal/post_receive"))
        .json(&push_body(5))
        .timeout(Duration::from_secs(10))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 503);
    assert_error_mentions(
        resp,
        "limit 1, --ingest-max-requests; none finished within 1500 ms, --ingest-queue-wait-ms",
    )
    .await;
    drop(held);

    // The slot frees while the push waits: it is stored and answered 200.
    let held = body_stopped_halfway(addr).await;
    let body = push_body(6);
    let waiting = tokio::spawn(async move { post(addr, &body).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "answered while the slot was held");
    drop(held);
    let (status, _) = waiting.await.unwrap();
    assert_eq!(status, 200);
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_checks_header_credentials_before_reading_the_body() {
    let nats = NatsServer::start();
    let (_dir, secret) = secret_file("s3cret\n");
    let (ingest, addr) = ingest_with(&nats, |cfg| {
        cfg.secret_file = Some(secret);
    })
    .await;

    // A bad JWT announcing 8 MB: refused before any of the body is sent.
    let mut s = TcpStream::connect(addr).await.unwrap();
    s.write_all(b"POST /api/v4/internal/post_receive HTTP/1.1\r\nHost: x\r\nGitlab-Shell-Api-Request: a.b.c\r\nContent-Type: application/json\r\nContent-Length: 8000000\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut s, Duration::from_secs(2)).await;
    assert!(answer.starts_with("HTTP/1.1 401"), "{answer}");
    assert!(answer.contains("gitlab-shell-api-request"), "{answer}");

    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v4/internal/post_receive");
    // No header credentials: only a small body is read, for secret_token.
    let mut big = push_body(4);
    big["secret_token"] = "s3cret".into();
    big["push_options"] = serde_json::json!(vec!["x".repeat(4000); 30]);
    let resp = client.post(&url).json(&big).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // The unread body is still on the connection: it must not be reused.
    assert_eq!(resp.headers()["connection"], "close");
    assert_error_mentions(resp, "Gitlab-Shell-Api-Request").await;
    let mut small = push_body(4);
    small["secret_token"] = "s3cret".into();
    assert_eq!(
        client
            .post(&url)
            .json(&small)
            .send()
            .await
            .unwrap()
            .status(),
        200
    );
    small["secret_token"] = "wrong".into();
    let resp = client.post(&url).json(&small).send().await.unwrap();
    assert_eq!(resp.status(), 401);
    // The same big body with the JWT header is read whole.
    let jwt = pushbus_hook_ingest::auth::sign_jwt(b"s3cret", pushbus_hook_ingest::auth::now_unix());
    big.as_object_mut().unwrap().remove("secret_token");
    let resp = client
        .post(&url)
        .header("Gitlab-Shell-Api-Request", jwt)
        .json(&big)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_ingest_takes_the_jwt_and_refuses_the_raw_secret() {
    let nats = NatsServer::start();
    let (_dir, secret) = secret_file("s3cret");
    let stack = Stack::start_with_secret(&nats.url(), Some(secret)).await;
    let mut client = HookIngestClient::connect(format!("http://{}", stack.ingest))
        .await
        .unwrap();
    let call = |bearer: Option<String>| {
        let mut req = tonic::Request::new(grpc_push(21));
        if let Some(b) = bearer {
            req.metadata_mut()
                .insert("authorization", format!("Bearer {b}").parse().unwrap());
        }
        req
    };
    let raw = client
        .notify_git_push(call(Some("s3cret".into())))
        .await
        .unwrap_err();
    assert_eq!(raw.code(), tonic::Code::Unauthenticated);
    assert!(raw.message().contains("send the JWT"), "{raw:?}");
    let none = client.notify_git_push(call(None)).await.unwrap_err();
    assert_eq!(none.code(), tonic::Code::Unauthenticated);
    let forged =
        pushbus_hook_ingest::auth::sign_jwt(b"other", pushbus_hook_ingest::auth::now_unix());
    let bad = client
        .notify_git_push(call(Some(forged)))
        .await
        .unwrap_err();
    assert_eq!(bad.code(), tonic::Code::Unauthenticated);
    let jwt = pushbus_hook_ingest::auth::sign_jwt(b"s3cret", pushbus_hook_ingest::auth::now_unix());
    let ok = client.notify_git_push(call(Some(jwt))).await.unwrap();
    assert_eq!(ok.into_inner().event_ids.len(), 1);
    stack.stop().await;
}

fn grpc_push(project: i64) -> NotifyGitPushRequest {
    NotifyGitPushRequest {
        project_id: project,
        changes: vec![RefChange {
            old_sha: "1".repeat(40),
            new_sha: "2".repeat(40),
            r#ref: "refs/heads/main".into(),
            ..Default::default()
        }],
        actor: "user-1".into(),
        ..Default::default()
    }
}

async fn put_agent_with_token(
    kv: &async_nats::jetstream::kv::Store,
    id: &str,
    token: Option<&str>,
    project: i64,
) {
    let cfg = AgentConfig {
        agent_id: id.into(),
        watches: vec![crate::fixtures::any_branch_of(project)],
        token_sha256: token
            .map(|t| hex::encode(sha2::Sha256::digest(t.as_bytes())))
            .unwrap_or_default(),
        public: token.is_none(),
        ..Default::default()
    };
    pushbus_filter::put_agent(kv, &cfg).await.unwrap();
}

fn watch_req(id: &str) -> WatchRequest {
    WatchRequest {
        agent_id: id.into(),
        ..Default::default()
    }
}

fn with_bearer<T>(msg: T, token: &str) -> tonic::Request<T> {
    let mut req = tonic::Request::new(msg);
    req.metadata_mut()
        .insert("authorization", format!("Bearer {token}").parse().unwrap());
    req
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn stream_caps_and_failed_logins_are_refused_with_clear_statuses() {
    let nats = NatsServer::start();
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "a", None, 1).await;
    put_agent_with_token(&kv, "b", None, 1).await;
    put_agent_with_token(&kv, "c", Some("right"), 1).await;
    let (notifier, addr) = notifier_with(&nats, |cfg| {
        cfg.agent_limits.max_streams = 3;
        cfg.agent_limits.max_streams_per_agent = 2;
        cfg.agent_limits.login_failure_burst = 3;
        cfg.agent_limits.login_failure_refill_ms = 60_000;
    })
    .await;
    let url = |id: &str| format!("http://{addr}/v1/agents/{id}/pokes");

    let a1 = SseReader::connect(&url("a"), None).await;
    let a2 = SseReader::connect(&url("a"), None).await;
    assert_eq!((a1.status().as_u16(), a2.status().as_u16()), (200, 200));
    let a3 = SseReader::connect(&url("a"), None).await;
    assert_eq!(a3.status(), 429);
    assert_error_mentions(a3, "--notifier-max-streams-per-agent").await;
    let mut grpc = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let refused = grpc.watch(watch_req("a")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    assert!(refused.message().contains("per-agent"), "{refused:?}");
    let b1 = SseReader::connect(&url("b"), None).await;
    assert_eq!(b1.status(), 200);
    let b2 = SseReader::connect(&url("b"), None).await;
    assert_eq!(b2.status(), 503);
    assert_error_mentions(b2, "--notifier-max-streams").await;
    let refused = grpc.watch(watch_req("b")).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::ResourceExhausted);
    drop(a1);
    // A freed stream can be taken again.
    until("a closed stream freed", async || {
        SseReader::connect(&url("b"), None).await.status() == 200
    })
    .await;

    // Failed logins: three 401s, then 429 with Retry-After, from this address.
    drop((a2, b1));
    for _ in 0..3 {
        let resp = SseReader::connect(&url("c"), Some("wrong")).await;
        assert_eq!(resp.status(), 401);
    }
    let throttled = SseReader::connect(&url("c"), Some("wrong")).await;
    assert_eq!(throttled.status(), 429);
    assert!(throttled.headers().contains_key("retry-after"));
    let denied = grpc
        .watch(with_bearer(watch_req("c"), "wrong"))
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::ResourceExhausted);
    assert!(denied.message().contains("failed logins"), "{denied:?}");
    notifier.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn streams_close_when_the_agent_token_changes_or_it_is_deleted() {
    let nats = NatsServer::start();
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "ag", Some("old"), 1).await;
    let (notifier, addr) = notifier_with(&nats, |_| {}).await;
    let url = format!("http://{addr}/v1/agents/ag/pokes");

    let mut sse = SseReader::new(SseReader::connect(&url, Some("old")).await);
    assert_eq!(
        sse.next_event(Duration::from_secs(3)).await.unwrap().0,
        "status"
    );
    let mut grpc = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = grpc
        .watch(with_bearer(watch_req("ag"), "old"))
        .await
        .unwrap()
        .into_inner();
    assert_status_first(&mut stream).await;
    // Same token, other watches: streams stay.
    put_agent_with_token(&kv, "ag", Some("old"), 2).await;
    assert!(sse.next_event(Duration::from_millis(700)).await.is_none());

    put_agent_with_token(&kv, "ag", Some("new"), 2).await;
    assert_revoked(&mut sse, &mut stream, "token changed").await;
    assert_eq!(SseReader::connect(&url, Some("old")).await.status(), 401);

    let mut sse = SseReader::new(SseReader::connect(&url, Some("new")).await);
    assert_eq!(
        sse.next_event(Duration::from_secs(3)).await.unwrap().0,
        "status"
    );
    kv.delete("ag").await.unwrap();
    assert_closed(&mut sse, "deleted").await;
    notifier.stop().await;
}

/// A CA and a certificate for localhost / 127.0.0.1 signed by it, as PEM
/// files in `dir`: (ca PEM, cert path, key path).
fn test_certs(dir: &std::path::Path) -> (String, std::path::PathBuf, std::path::PathBuf) {
    let ca_key = rcgen::KeyPair::generate().unwrap();
    let mut ca_params = rcgen::CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    let ca = rcgen::CertifiedIssuer::self_signed(ca_params, ca_key).unwrap();
    let key = rcgen::KeyPair::generate().unwrap();
    let params =
        rcgen::CertificateParams::new(vec!["localhost".to_owned(), "127.0.0.1".to_owned()])
            .unwrap();
    let cert = params.signed_by(&key, &ca).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.pem()).unwrap();
    std::fs::write(&key_path, key.serialize_pem()).unwrap();
    (ca.pem(), cert_path, key_path)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_doors_serve_https_and_grpc_with_the_configured_certificate() {
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let (ca_pem, cert, key) = test_certs(dir.path());
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "tls-agent", Some("t0ken"), 1).await;
    let (ingest, ingest_addr) = ingest_with(&nats, |cfg| {
        cfg.door.tls_cert = Some(cert.clone());
        cfg.door.tls_key = Some(key.clone());
    })
    .await;
    let (notifier, notifier_addr) = notifier_with(&nats, |cfg| {
        cfg.door.tls_cert = Some(cert);
        cfg.door.tls_key = Some(key);
    })
    .await;

    let ca = reqwest::Certificate::from_pem(ca_pem.as_bytes()).unwrap();
    let https = reqwest::Client::builder()
        .add_root_certificate(ca)
        .build()
        .unwrap();
    let port = ingest_addr.port();
    let resp = https
        .post(format!(
            "https://localhost:{port}/api/v4/internal/post_receive"
        ))
        .json(&push_body(31))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    // Plain HTTP on a TLS port gets no answer a hook could take for success.
    assert!(
        reqwest::Client::new()
            .post(format!(
                "http://127.0.0.1:{port}/api/v4/internal/post_receive"
            ))
            .json(&push_body(31))
            .timeout(Duration::from_secs(3))
            .send()
            .await
            .is_err_and(|e| !e.is_status())
    );
    // An unknown CA is refused.
    assert!(
        reqwest::Client::new()
            .post(format!(
                "https://localhost:{port}/api/v4/internal/post_receive"
            ))
            .json(&push_body(31))
            .send()
            .await
            .is_err()
    );
    let sse = https
        .get(format!(
            "https://localhost:{}/v1/agents/tls-agent/pokes",
            notifier_addr.port()
        ))
        .bearer_auth("t0ken")
        .send()
        .await
        .unwrap();
    assert_eq!(sse.status(), 200);
    drop(sse);

    let tls = |port: u16| {
        tonic::transport::Channel::from_shared(format!("https://localhost:{port}"))
            .unwrap()
            .tls_config(
                tonic::transport::ClientTlsConfig::new()
                    .ca_certificate(tonic::transport::Certificate::from_pem(&ca_pem))
                    .domain_name("localhost"),
            )
            .unwrap()
    };
    let channel = tls(port).connect().await.unwrap();
    let resp = HookIngestClient::new(channel)
        .notify_git_push(grpc_push(32))
        .await
        .unwrap();
    assert_eq!(resp.into_inner().event_ids.len(), 1);
    let channel = tls(notifier_addr.port()).connect().await.unwrap();
    let mut stream = GitOpsNotifierClient::new(channel)
        .watch(with_bearer(watch_req("tls-agent"), "t0ken"))
        .await
        .unwrap()
        .into_inner();
    assert_status_first(&mut stream).await;
    drop(stream);
    notifier.stop().await;
    ingest.stop().await;
}

/// One hostile input as each door takes it: the HTTP body (None: not
/// expressible there) and the gRPC request (likewise), and the field the
/// refusal must name.
struct Hostile {
    name: &'static str,
    http: Option<serde_json::Value>,
    grpc: Option<NotifyGitPushRequest>,
    field: &'static str,
}

fn hostile_inputs() -> Vec<Hostile> {
    let with_paths = |paths: serde_json::Value| {
        let mut b = push_body(5);
        b["pushbus_changed_paths"] = serde_json::json!({ "refs/heads/main": paths });
        b
    };
    let grpc_paths = |paths: Vec<String>| {
        let mut r = grpc_push(5);
        r.changes[0].changed_paths = paths;
        r.changes[0].paths_known = true;
        r
    };
    let http_change = |line: String| {
        let mut b = push_body(5);
        b["changes"] = line.into();
        b
    };
    let grpc_change = |old: &str, new: &str, r: &str| {
        let mut req = grpc_push(5);
        req.changes[0] = RefChange {
            old_sha: old.into(),
            new_sha: new.into(),
            r#ref: r.into(),
            ..Default::default()
        };
        req
    };
    let (a, b) = ("1".repeat(40), "2".repeat(40));
    let many: Vec<String> = (0..20_000).map(|i| format!("p/{i}")).collect();
    let mut deep = push_body(5);
    let nested = format!("{}{}", "[".repeat(100_000), "]".repeat(100_000));
    let mut text = deep.to_string();
    text.truncate(text.len() - 1);
    let deep_text = format!("{text},\"extra\":{nested}}}");
    deep = serde_json::Value::String(deep_text);
    let mut bad_option = push_body(5);
    bad_option["push_options"] = serde_json::json!(["ci.skip\u{1b}[2J"]);
    let mut grpc_option = grpc_push(5);
    grpc_option.push_options = vec!["ci.skip\u{1b}[2J".into()];
    let mut plus = push_body(5);
    plus["gl_repository"] = "project-+6161".into();
    let mut negative = grpc_push(5);
    negative.project_id = -6161;
    vec![
        Hostile {
            name: "path with NUL",
            http: Some(with_paths(serde_json::json!(["a\u{0}b"]))),
            grpc: Some(grpc_paths(vec!["a\0b".into()])),
            field: "changed_paths",
        },
        Hostile {
            name: "empty path",
            http: Some(with_paths(serde_json::json!([""]))),
            grpc: Some(grpc_paths(vec![String::new()])),
            field: "changed_paths",
        },
        Hostile {
            name: "20,000 paths",
            http: Some(with_paths(serde_json::json!(many))),
            grpc: Some(grpc_paths(many.clone())),
            field: "changed_paths",
        },
        Hostile {
            name: "signed project ID",
            http: Some(plus),
            grpc: Some(negative),
            field: "project",
        },
        Hostile {
            name: "bad SHA",
            http: Some(http_change(format!("{a} zz refs/heads/main"))),
            grpc: Some(grpc_change(&a, "zz", "refs/heads/main")),
            field: "sha",
        },
        Hostile {
            name: "bad ref",
            http: Some(http_change(format!("{a} {b} refs/heads/a..b"))),
            grpc: Some(grpc_change(&a, &b, "refs/heads/a..b")),
            field: "ref",
        },
        Hostile {
            name: "escape in a push option",
            http: Some(bad_option),
            grpc: Some(grpc_option),
            field: "push_options[0]",
        },
        Hostile {
            name: "100,000-deep value under an unknown field",
            http: Some(deep),
            grpc: None,
            field: "",
        },
    ]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_inputs_are_refused_alike_on_both_doors_with_json_errors() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with(&nats, |cfg| {
        cfg.max_body_bytes = 2 * 1024 * 1024;
    })
    .await;
    let client = reqwest::Client::new();
    let url = format!("http://{addr}/api/v4/internal/post_receive");
    let mut grpc = HookIngestClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    for case in hostile_inputs() {
        if let Some(body) = &case.http {
            let req = match body {
                serde_json::Value::String(raw) => client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(raw.clone()),
                v => client.post(&url).json(v),
            };
            let resp = req.send().await.unwrap();
            let status = resp.status();
            assert!(
                status == 400 || status == 422,
                "{}: HTTP {status}",
                case.name
            );
            let err: serde_json::Value = resp.json().await.unwrap();
            let text = format!("{} {}", err["field"], err["error"]);
            assert!(text.contains(case.field), "{}: {err}", case.name);
        }
        if let Some(req) = case.grpc {
            let status = grpc.notify_git_push(req).await.unwrap_err();
            assert_eq!(status.code(), tonic::Code::InvalidArgument, "{}", case.name);
            assert!(
                status.message().contains(case.field),
                "{}: {status:?}",
                case.name
            );
        }
    }
    // Framework refusals carry the same JSON error body.
    let resp = client.get(&url).send().await.unwrap();
    assert_eq!(resp.status(), 405);
    let err: serde_json::Value = resp.json().await.unwrap();
    assert!(err["error"].is_string(), "{err}");
    let resp = client
        .post(&url)
        .header("x-padding", "p".repeat(40 * 1024))
        .json(&push_body(5))
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 431);
    assert_error_mentions(resp, "headers too large").await;
    // Too large: refused from the announced length, before the body.
    let mut raw = TcpStream::connect(addr).await.unwrap();
    raw.write_all(b"POST /api/v4/internal/post_receive HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\nContent-Length: 3145728\r\n\r\n")
        .await
        .unwrap();
    let (answer, _) = read_until_closed(&mut raw, Duration::from_secs(3)).await;
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(answer.contains("--ingest-max-body-bytes"), "{answer}");
    assert!(answer.contains("\"error\""), "{answer}");
    // Nothing hostile was stored; a good push still is.
    assert_eq!(post(addr, &push_body(5)).await.0, 200);
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_lag_messages_reach_the_pusher_without_escape_sequences() {
    use futures::StreamExt;
    use prost::Message;
    use pushbus_shared::proto::{HookMessage, LagReply, LagRequest};
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with(&nats, |cfg| {
        cfg.lag_budget_ms = 2000;
    })
    .await;
    // A lag responder whose text (from NATS / KV) is hostile.
    let client = pushbus_shared::testkit::client(&nats).await;
    let mut requests = client
        .subscribe(pushbus_shared::names::geo_lag_subject("node-1"))
        .await
        .unwrap();
    let responder = tokio::spawn({
        let client = client.clone();
        async move {
            while let Some(msg) = requests.next().await {
                let req = LagRequest::decode(msg.payload.as_ref()).unwrap();
                let reply = LagReply {
                    correlation_id: req.correlation_id,
                    messages: vec![HookMessage {
                        r#type: "basic".into(),
                        message: "\u{1b}]0;pwned\u{7}\u{1b}[2JCurrent replication lag: \u{1b}[31m5\u{1b}[0m seconds\u{8}\u{8}\u{202e}".into(),
                    }],
                    ..Default::default()
                };
                if let Some(to) = msg.reply {
                    client
                        .publish(to, reply.encode_to_vec().into())
                        .await
                        .unwrap();
                }
            }
        }
    });
    let mut body = push_body(41);
    body["geo_node_id"] = "node-1".into();
    let resp = reqwest::Client::new()
        .post(format!("http://{addr}/api/v4/internal/post_receive"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let json: serde_json::Value = resp.json().await.unwrap();
    assert_eq!(
        json["messages"][0]["message"],
        "Current replication lag: 5 seconds"
    );
    let mut grpc = HookIngestClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = grpc_push(42);
    req.geo_node_id = Some("node-1".into());
    let resp = grpc.notify_git_push(req).await.unwrap().into_inner();
    assert_eq!(
        resp.messages[0].message,
        "Current replication lag: 5 seconds"
    );
    responder.abort();
    ingest.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_watch_with_an_oversized_seen_list_is_refused() {
    use pushbus_shared::proto::SeenRef;
    let nats = NatsServer::start();
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "s", None, 1).await;
    let (notifier, addr) = notifier_with(&nats, |_| {}).await;
    let mut grpc = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let seen = |n: usize| WatchRequest {
        agent_id: "s".into(),
        seen: (0..n)
            .map(|i| SeenRef {
                project_id: 1,
                r#ref: format!("refs/heads/b{i}"),
                sha: "1".repeat(40),
            })
            .collect(),
        ..Default::default()
    };
    let refused = grpc.watch(seen(10_001)).await.unwrap_err();
    assert_eq!(refused.code(), tonic::Code::InvalidArgument);
    assert!(refused.message().contains("seen"), "{refused:?}");
    let mut ok = grpc.watch(seen(10)).await.unwrap().into_inner();
    assert!(ok.message().await.unwrap().is_some());
    drop(ok);
    notifier.stop().await;
}

// The login cache holds an agent's entry as read at its last failed login,
// and a cached entry also lets the token it names in. README: dropped at
// once when the entry changes. The cache here lives a minute, so only that
// drop (not its expiry) can refuse the old token and take the new one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_change_drops_the_cached_login_at_once_old_token_refused_new_one_taken() {
    let nats = NatsServer::start();
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "lc", Some("first"), 1).await;
    let (notifier, addr) = notifier_with(&nats, |cfg| {
        cfg.agent_limits.login_cache_ms = 60_000;
    })
    .await;
    let url = format!("http://{addr}/v1/agents/lc/pokes");
    let mut grpc = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    // A wrong guess caches the entry naming the first token; both doors
    // then let the first token in (from that entry).
    assert_eq!(SseReader::connect(&url, Some("guess")).await.status(), 401);
    let mut sse = SseReader::new(SseReader::connect(&url, Some("first")).await);
    assert_eq!(
        sse.next_event(Duration::from_secs(3)).await.unwrap().0,
        "status"
    );
    let mut stream = grpc
        .watch(with_bearer(watch_req("lc"), "first"))
        .await
        .unwrap()
        .into_inner();
    assert_status_first(&mut stream).await;

    put_agent_with_token(&kv, "lc", Some("second"), 1).await;
    // The open streams end (revoke.rs forgets the cached entry before it
    // closes them, so from here on the change must be seen).
    assert_revoked(&mut sse, &mut stream, "token changed").await;
    assert_eq!(SseReader::connect(&url, Some("first")).await.status(), 401);
    let refused = grpc
        .watch(with_bearer(watch_req("lc"), "first"))
        .await
        .unwrap_err();
    assert_eq!(refused.code(), tonic::Code::Unauthenticated);
    assert_eq!(SseReader::connect(&url, Some("second")).await.status(), 200);
    let mut stream = grpc
        .watch(with_bearer(watch_req("lc"), "second"))
        .await
        .unwrap()
        .into_inner();
    assert_status_first(&mut stream).await;
    drop(stream);
    notifier.stop().await;
}

/// One gitops-notifier on a free port, its default configuration changed
/// by `tune`.
async fn notifier_with(
    nats: &NatsServer,
    tune: impl FnOnce(&mut pushbus_gitops_notifier::Config),
) -> (Replica, SocketAddr) {
    let (listener, addr) = bind_local().await;
    let mut cfg = pushbus_gitops_notifier::Config::new(addr);
    tune(&mut cfg);
    (Replica::notifier_on(&nats.url(), cfg, listener).await, addr)
}

/// A hook-ingest answering one request at a time; one more waits
/// `queue_wait_ms` for the slot.
async fn ingest_with_one_slot(nats: &NatsServer, queue_wait_ms: u64) -> (Replica, SocketAddr) {
    ingest_with(nats, |cfg| {
        cfg.door.max_requests = 1;
        cfg.door.queue_wait_ms = queue_wait_ms;
    })
    .await
}

/// A hook-ingest whose request timeout (500 ms) is far below its store
/// timeout (10 s), so a push the bus never acks is cut by the former.
async fn ingest_timing_out_before_its_store(nats: &NatsServer) -> (Replica, SocketAddr) {
    ingest_with(nats, |cfg| {
        cfg.door.request_timeout_ms = 500;
        cfg.store_timeout_ms = 10_000;
    })
    .await
}

// README: a request not answered within --ingest-request-timeout-ms gets
// gRPC DEADLINE_EXCEEDED (408 JSON over HTTP). A frozen nats-server never
// acks the publish, so the push is really still being stored at the deadline.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_still_storing_at_the_request_timeout_gets_deadline_exceeded_and_408() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_timing_out_before_its_store(&nats).await;
    let mut grpc = HookIngestClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    assert_eq!(post(addr, &push_body(51)).await.0, 200);

    nats.pause();
    let started = Instant::now();
    let late = grpc.notify_git_push(grpc_push(52)).await.unwrap_err();
    let took = started.elapsed();
    let (status, http_took) = post(addr, &push_body(53)).await;
    nats.resume();
    assert_eq!(late.code(), tonic::Code::DeadlineExceeded, "{late:?}");
    assert!(
        late.message().contains("--ingest-request-timeout-ms"),
        "{late:?}"
    );
    // Well before the 10 s store timeout, which would answer otherwise.
    assert!(took < Duration::from_secs(8), "answered after {took:?}");
    assert_eq!(status, 408);
    assert!(
        http_took < Duration::from_secs(8),
        "answered after {http_took:?}"
    );
    // The bus back, the door stores pushes again.
    crate::support::push_stored(addr, &push_body(54)).await;
    ingest.stop().await;
}

// README: the notifier's request timeout runs until the answer starts; open
// SSE and gRPC watch streams are not cut. Both outlive several timeouts and
// still carry the next poke.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn watch_streams_outlive_the_notifier_request_timeout_and_still_get_pokes() {
    let nats = NatsServer::start();
    let kv = crate::fixtures::agents_kv(&nats).await;
    put_agent_with_token(&kv, "long", None, 61).await;
    let (ingest_listener, ingest_addr) = bind_local().await;
    let ingest = Replica::ingest(&nats.url(), ingest_listener).await;
    let filter = Replica::filter(&nats.url()).await;
    let (notifier, addr) = notifier_with(&nats, |cfg| {
        cfg.door.request_timeout_ms = 300;
    })
    .await;

    let mut sse = SseReader::new(
        SseReader::connect(&format!("http://{addr}/v1/agents/long/pokes"), None).await,
    );
    assert_eq!(
        sse.next_event(Duration::from_secs(3)).await.unwrap().0,
        "status"
    );
    let mut stream = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap()
        .watch(watch_req("long"))
        .await
        .unwrap()
        .into_inner();
    assert_status_first(&mut stream).await;
    // Five timeouts pass with the streams open and idle.
    tokio::time::sleep(Duration::from_millis(1_500)).await;

    let new_sha = "2".repeat(40);
    crate::support::push_stored(ingest_addr, &push_body(61)).await;
    let (event, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("a poke on the SSE stream");
    assert_eq!(event, "poke", "{data}");
    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(poke["new_sha"], new_sha.as_str());
    let ev = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("a poke on the gRPC stream within 15 s")
        .expect("the gRPC stream still open")
        .unwrap();
    let Some(Event::Poke(poke)) = ev.event else {
        panic!("expected a poke, got {ev:?}")
    };
    assert_eq!(poke.new_sha, new_sha);
    drop(stream);
    notifier.stop().await;
    filter.stop().await;
    ingest.stop().await;
}

// README: one request over --ingest-max-requests waits for a slot, then gets
// gRPC RESOURCE_EXHAUSTED (the HTTP 503 is tested above); a slot freed while
// it waits lets it through.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_push_over_the_in_flight_limit_gets_resource_exhausted() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with_one_slot(&nats, 3_000).await;
    let mut grpc = HookIngestClient::connect(format!("http://{addr}"))
        .await
        .unwrap();

    let held = body_stopped_halfway(addr).await;
    let busy = grpc.notify_git_push(grpc_push(71)).await.unwrap_err();
    assert_eq!(busy.code(), tonic::Code::ResourceExhausted, "{busy:?}");
    assert!(
        busy.message().contains(
            "limit 1, --ingest-max-requests; none finished within 3000 ms, --ingest-queue-wait-ms"
        ),
        "{busy:?}"
    );

    let waiting = tokio::spawn(async move { grpc.notify_git_push(grpc_push(72)).await });
    tokio::time::sleep(Duration::from_millis(200)).await;
    assert!(!waiting.is_finished(), "answered while the slot was held");
    drop(held);
    let stored = waiting.await.unwrap().unwrap().into_inner();
    assert_eq!(stored.event_ids.len(), 1);
    ingest.stop().await;
}

// Each HTTP/2 connection may carry at most 256 requests at once (README
// "Doors"): the door announces the cap in its SETTINGS, so one connection
// cannot open streams without bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn http2_connections_are_told_the_stream_cap() {
    let nats = NatsServer::start();
    let (ingest, addr) = ingest_with(&nats, |_| {}).await;
    let tcp = tokio::net::TcpStream::connect(addr).await.unwrap();
    let (client, connection) = h2::client::handshake(tcp).await.unwrap();
    tokio::spawn(connection);
    let mut client = client.ready().await.unwrap();
    let request = axum::http::Request::get(format!("http://{addr}/healthz"))
        .body(())
        .unwrap();
    let (response, _) = client.send_request(request, true).unwrap();
    // An answer means the door's SETTINGS arrived before it.
    response.await.unwrap();
    assert_eq!(client.current_max_send_streams(), 256);
    ingest.stop().await;
}
