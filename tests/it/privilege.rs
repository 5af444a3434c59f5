//! The shipped least-privilege configuration (deploy/nats/) in use: the
//! whole pipeline over mutual TLS with each service as its own user, and a
//! service reaching outside its permissions refused, with the subject named.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbus_shared::bus::{self, ConnectConfig};
use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::{WatchEvent, WatchRequest, watch_event::Event};
use pushbus_shared::service::{self, BusConfig, Launcher, NatsArgs};
use pushbus_shared::testkit::{NatsServer, free_port};
use tokio_util::sync::CancellationToken;
use tonic::Streaming;

use crate::poll::{poll, until};
use crate::secure::Pki;
use crate::support::SseReader;

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");
const SERVER_CONF: &str = include_str!("../../deploy/nats/nats-server.conf");
const AUTH_CONF: &str = include_str!("../../deploy/nats/auth.conf");
const USERS: [&str; 6] = [
    "hook-ingest",
    "filter",
    "gitops-notifier",
    "replication-lag",
    "geo-2",
    "admin",
];

struct Secured {
    nats: NatsServer,
    pki: Pki,
    dir: tempfile::TempDir,
}

impl Secured {
    /// The shipped config, as is; the test supplies what the environment
    /// would: certificate paths, a server name, one password per user.
    fn start() -> Secured {
        let dir = tempfile::tempdir().unwrap();
        let pki = Pki::generate(dir.path());
        let mut env: Vec<(String, String)> = vec![
            ("PUSHBUS_NATS_SERVER_NAME".into(), "pushbus-secured".into()),
            (
                "PUSHBUS_NATS_STORE_DIR".into(),
                path(&dir.path().join("js")),
            ),
            ("PUSHBUS_NATS_TLS_CERT".into(), path(&pki.server_cert)),
            ("PUSHBUS_NATS_TLS_KEY".into(), path(&pki.server_key)),
            ("PUSHBUS_NATS_TLS_CA".into(), path(&pki.ca)),
        ];
        for user in USERS {
            let password = format!("pw-{user}-{}", free_port());
            std::fs::write(dir.path().join(format!("{user}.password")), &password).unwrap();
            env.push((password_var(user), password));
        }
        let env_refs: Vec<(&str, &str)> =
            env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        let nats =
            NatsServer::start_configured(SERVER_CONF, &[("auth.conf", AUTH_CONF)], &env_refs, true);
        Secured { nats, pki, dir }
    }

    fn password_file(&self, user: &str) -> PathBuf {
        self.dir.path().join(format!("{user}.password"))
    }

    fn args(&self, user: &str) -> NatsArgs {
        NatsArgs {
            nats_url: Some(self.nats.url()),
            nats_user: Some(user.into()),
            nats_password_file: Some(self.password_file(user)),
            nats_tls_ca: Some(self.pki.ca.clone()),
            nats_tls_cert: Some(self.pki.client_cert.clone()),
            nats_tls_key: Some(self.pki.client_key.clone()),
            ..Default::default()
        }
    }

    fn connect_config(&self, user: &str) -> ConnectConfig {
        self.args(user).connect_config().unwrap()
    }

    fn cli(&self, user: &str, args: &[&str]) -> std::process::Output {
        let a = self.args(user);
        Command::new(PUSHBUS)
            .args(args)
            .arg("--nats-url")
            .arg(self.nats.url())
            .args(["--nats-user", user, "--nats-password-file"])
            .arg(self.password_file(user))
            .arg("--nats-tls-ca")
            .arg(a.nats_tls_ca.unwrap())
            .arg("--nats-tls-cert")
            .arg(a.nats_tls_cert.unwrap())
            .arg("--nats-tls-key")
            .arg(a.nats_tls_key.unwrap())
            .output()
            .unwrap()
    }
}

fn path(p: &Path) -> String {
    p.display().to_string()
}

fn password_var(user: &str) -> String {
    format!(
        "PUSHBUS_{}_PASSWORD",
        user.to_ascii_uppercase().replace('-', "_")
    )
}

/// One service in its own host, as its own user.
struct Hosted {
    token: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), service::HostError>>,
}

async fn host(bus: BusConfig, launcher: Launcher) -> Hosted {
    let (ops_listener, ops) = crate::support::bind_local().await;
    let token = CancellationToken::new();
    let task = tokio::spawn({
        let token = token.clone();
        async move { service::host(bus, ops_listener, vec![launcher], token).await }
    });
    until("the service ready", async || {
        assert!(!task.is_finished(), "service stopped before it was ready");
        let ready = reqwest::get(format!("http://{ops}/readyz")).await;
        ready.is_ok_and(|r| r.status().is_success())
    })
    .await;
    Hosted { token, task }
}

impl Hosted {
    async fn stop(self) {
        self.token.cancel();
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("service did not stop")
            .unwrap()
            .expect("service failed");
    }
}

/// A webhook target: `/ok` answers 200, anything else 500. Returns the
/// paths it was sent, in order.
async fn webhook_receiver() -> (Arc<Mutex<Vec<String>>>, SocketAddr) {
    let hits = Arc::new(Mutex::new(Vec::new()));
    let seen = hits.clone();
    let app = axum::Router::new().fallback(move |uri: axum::http::Uri| {
        let seen = seen.clone();
        async move {
            seen.lock().unwrap().push(uri.path().to_owned());
            if uri.path() == "/ok" {
                axum::http::StatusCode::OK
            } else {
                axum::http::StatusCode::INTERNAL_SERVER_ERROR
            }
        }
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    (hits, addr)
}

async fn push(ingest: SocketAddr, project_id: i64, new_sha: &str) {
    let body = serde_json::json!({
        "gl_repository": format!("project-{project_id}"),
        "identifier": "user-1",
        "changes": format!("{} {new_sha} refs/heads/main", "1".repeat(40)),
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{ingest}/api/v4/internal/post_receive"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
}

async fn grpc_watch(addr: SocketAddr, since_cursor: Option<u64>) -> Streaming<WatchEvent> {
    let mut client = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut req = tonic::Request::new(WatchRequest {
        agent_id: "agent-p".into(),
        since_cursor,
        ..Default::default()
    });
    req.metadata_mut()
        .insert("authorization", "Bearer s3cret".parse().unwrap());
    client.watch(req).await.unwrap().into_inner()
}

async fn grpc_next_poke(stream: &mut Streaming<WatchEvent>) -> WatchEvent {
    loop {
        let ev = tokio::time::timeout(Duration::from_secs(15), stream.message())
            .await
            .expect("no poke over gRPC")
            .unwrap()
            .expect("gRPC stream ended");
        if matches!(ev.event, Some(Event::Poke(_))) {
            return ev;
        }
    }
}

fn denials(client: &str) -> Vec<String> {
    pushbus_shared::ops::metrics_handle()
        .render()
        .lines()
        .filter(|l| {
            l.starts_with("pushbus_nats_permission_denied_total")
                && l.contains(&format!("client=\"{client}\""))
        })
        .map(str::to_owned)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_with_least_privilege_users_over_mutual_tls_and_refusals_name_the_subject() {
    // Denials are counted by the process-wide recorder: install it first.
    pushbus_shared::ops::metrics_handle();
    let secured = Secured::start();
    let out = secured.cli("admin", &["setup"]);
    assert!(
        out.status.success(),
        "setup as admin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let agent = secured.dir.path().join("agent.yaml");
    std::fs::write(
        &agent,
        "agent_id: agent-p\ntoken: s3cret\nwatches:\n  - project_id: 42\n    refs: any_branch\n",
    )
    .unwrap();
    let out = secured.cli("admin", &["agents", "put", "-f", &path(&agent)]);
    assert!(
        out.status.success(),
        "agents put as admin: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    // Two agents with webhooks: one target answers, one never does (its
    // pokes end as dead letters).
    let (hits, receiver) = webhook_receiver().await;
    for (id, project, path_) in [("hooked", 43, "ok"), ("dead", 44, "down")] {
        let file = secured.dir.path().join(format!("{id}.yaml"));
        std::fs::write(
            &file,
            format!(
                "agent_id: {id}\npublic: true\nwebhook:\n  url: http://{receiver}/{path_}\n  secret_token: hook-s3cret\nwatches:\n  - project_id: {project}\n    refs: any_branch\n"
            ),
        )
        .unwrap();
        let out = secured.cli("admin", &["agents", "put", "-f", &path(&file)]);
        assert!(
            out.status.success(),
            "agents put {id}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    let bus_for = |user: &str| BusConfig::from(secured.connect_config(user));
    let (ingest_listener, ingest_addr) = crate::support::bind_local().await;
    let (notifier_listener, notifier_addr) = crate::support::bind_local().await;
    let ingest_cfg = pushbus_hook_ingest::Config {
        geo_routes: true,
        ..pushbus_hook_ingest::Config::new(ingest_addr)
    };
    let notifier_cfg = pushbus_gitops_notifier::Config {
        webhooks: pushbus_gitops_notifier::webhook::WebhookConfig {
            allow: vec!["127.0.0.1".parse().unwrap()],
            max_attempts: 2,
            backoff_base_ms: 100,
            config_cache_ms: 200,
            ..Default::default()
        },
        // The sweep for unregistered agents' heads runs within the test.
        prune_interval_secs: 1,
        ..pushbus_gitops_notifier::Config::new(notifier_addr)
    };
    let lag = host(
        bus_for("replication-lag"),
        Launcher::service::<pushbus_replication_lag::ReplicationLag>(Default::default()),
    )
    .await;
    let filter = host(
        bus_for("filter"),
        Launcher::service::<pushbus_filter::Filter>(Default::default()),
    )
    .await;
    let notifier = host(
        bus_for("gitops-notifier"),
        Launcher::bound::<pushbus_gitops_notifier::GitopsNotifier>(notifier_cfg, notifier_listener),
    )
    .await;
    let ingest = host(
        bus_for("hook-ingest"),
        Launcher::bound::<pushbus_hook_ingest::HookIngest>(ingest_cfg, ingest_listener),
    )
    .await;

    let url = format!("http://{notifier_addr}/v1/agents/agent-p/pokes");
    assert_eq!(SseReader::connect(&url, Some("wrong")).await.status(), 401);
    let mut sse = SseReader::new(SseReader::connect(&url, Some("s3cret")).await);
    let (event, _) = sse
        .next_event(Duration::from_secs(10))
        .await
        .expect("status");
    assert_eq!(event, "status");

    // A push through a Geo node: hook-ingest asks replication-lag too.
    let body = serde_json::json!({
        "gl_repository": "project-42",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main", "0".repeat(40), "d".repeat(40)),
        "geo_node_id": "geo-2",
    });
    let resp = reqwest::Client::new()
        .post(format!("http://{ingest_addr}/api/v4/internal/post_receive"))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(resp.status(), 200);
    let (event, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("poke over the least-privilege pipeline");
    assert_eq!(event, "poke");
    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(poke["new_sha"], "d".repeat(40));

    // A gRPC agent: live pokes, and catch-up from a cursor (heads read by
    // direct get).
    let mut grpc = grpc_watch(notifier_addr, Some(0)).await;
    let caught = grpc_next_poke(&mut grpc).await;
    assert!(caught.catch_up, "{caught:?}");
    push(ingest_addr, 42, &"e".repeat(40)).await;
    let live = grpc_next_poke(&mut grpc).await;
    assert!(!live.catch_up);
    assert!(
        matches!(&live.event, Some(Event::Poke(p)) if p.new_sha == "e".repeat(40)),
        "{live:?}"
    );

    // Webhook delivery, and a dead letter for the target that fails.
    push(ingest_addr, 43, &"f".repeat(40)).await;
    push(ingest_addr, 44, &"a".repeat(40)).await;
    until("webhook delivered", async || {
        hits.lock().unwrap().iter().any(|p| p == "/ok")
    })
    .await;
    let admin_js = async_nats::jetstream::new(
        bus::connect_once(&secured.connect_config("admin"), "pushbus-admin-test")
            .await
            .unwrap(),
    );
    let dlq = admin_js.get_stream("PUSHBUS_DLQ").await.unwrap();
    until("a dead letter for the failing webhook", async || {
        dlq.get_last_raw_message_by_subject("pushbus.dlq.gitops-notifier-webhooks")
            .await
            .is_ok()
    })
    .await;
    assert!(
        hits.lock()
            .unwrap()
            .iter()
            .filter(|p| *p == "/down")
            .count()
            >= 2
    );

    // Deleting an agent purges its ref heads (the notifier's own purge).
    let heads = admin_js.get_key_value("pushbus-ref-heads").await.unwrap();
    let heads_of = |agent: &'static str| {
        let heads = heads.clone();
        async move {
            let mut keys = heads.keys().await.unwrap();
            let mut n = 0;
            while let Some(k) = futures::StreamExt::next(&mut keys).await {
                n += usize::from(k.unwrap().starts_with(&format!("{agent}.")));
            }
            n
        }
    };
    assert_eq!(heads_of("hooked").await, 1);
    let out = secured.cli("admin", &["agents", "delete", "hooked"]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    until("the deleted agent's heads purged", async || {
        heads_of("hooked").await == 0
    })
    .await;

    // The agents request API answers the admin (filter responds).
    let admin = bus::connect_once(&secured.connect_config("admin"), "pushbus-admin-test")
        .await
        .unwrap();
    let reply = admin
        .request(
            "pushbus.api.agents.get",
            serde_json::to_vec(&serde_json::json!({"agent_id": "agent-p"}))
                .unwrap()
                .into(),
        )
        .await
        .unwrap();
    assert!(
        String::from_utf8_lossy(&reply.payload).contains("agent-p"),
        "{:?}",
        reply.payload
    );

    // The geo node user can report its own status.
    let geo = bus::connect_once(&secured.connect_config("geo-2"), "geo-2")
        .await
        .unwrap();
    geo.publish("pushbus.geo.status.geo-2", "x".into())
        .await
        .unwrap();
    geo.flush().await.unwrap();

    // Nothing any service did was refused: the allow-lists are complete.
    tokio::time::sleep(Duration::from_millis(300)).await;
    for client in [
        "pushbus-hook-ingest",
        "pushbus-filter",
        "pushbus-gitops-notifier",
        "pushbus-replication-lag",
        "geo-2",
    ] {
        assert_eq!(denials(client), Vec::<String>::new(), "{client}");
    }

    outside_permissions_refused_with_subject(&secured).await;

    ingest.stop().await;
    notifier.stop().await;
    filter.stop().await;
    lag.stop().await;
}

/// A ref head of agent-x (project 1, `main`) that only filter may write.
const FAKE_HEAD: &str = "$KV.pushbus-ref-heads.agent-x.1.6d61696e";

/// Connected as `service`'s NATS user, as `pushbus-<service>`, with a
/// JetStream context that gives up on a denied request in 500 ms.
async fn connect_as(
    secured: &Secured,
    service: &str,
) -> (async_nats::Client, async_nats::jetstream::Context) {
    let client = bus::connect_once(
        &secured.connect_config(service),
        &format!("pushbus-{service}"),
    )
    .await
    .unwrap();
    let js = async_nats::jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(500))
        .build(client.clone());
    (client, js)
}

/// Outside its permissions a user is refused, and the log and metrics name
/// the subject. Run after the pipeline, whose check that no service was
/// refused anything would otherwise see these.
async fn outside_permissions_refused_with_subject(secured: &Secured) {
    // hook-ingest may not poke agents (write a ref head), nor read the agent
    // registry.
    let (_ingest, js) = connect_as(secured, "hook-ingest").await;
    let poke = js.publish(FAKE_HEAD, "fake".into()).await;
    if let Ok(ack) = poke {
        assert!(ack.await.is_err(), "a denied publish was acked");
    }
    assert!(js.get_key_value("pushbus-agents").await.is_err());

    // gitops-notifier reads agents but may not write them or serve the API.
    let (notifier, njs) = connect_as(secured, "gitops-notifier").await;
    let kv = njs.get_key_value("pushbus-agents").await.unwrap();
    assert!(kv.get("agent-x").await.unwrap().is_none());
    assert!(kv.put("agent-x", "evil".into()).await.is_err());
    let _sub = notifier.subscribe("pushbus.api.agents.*").await.unwrap();
    notifier.flush().await.unwrap();

    // replication-lag only reads: it may not store a push, nor read
    // another service's replies.
    let (lag, ljs) = connect_as(secured, "replication-lag").await;
    if let Ok(ack) = ljs.publish("pushbus.push.1.fake", "fake".into()).await {
        assert!(ack.await.is_err(), "a denied publish was acked");
    }
    let _sub = lag.subscribe("_INBOX.pushbus-filter.>").await.unwrap();
    lag.flush().await.unwrap();

    // A Geo node may report only as itself.
    let geo = bus::connect_once(&secured.connect_config("geo-2"), "geo-2")
        .await
        .unwrap();
    geo.publish("pushbus.geo.status.geo-1", "lie".into())
        .await
        .unwrap();
    geo.flush().await.unwrap();

    // Each refusal is logged and counted with its subject.
    let want = [
        ("pushbus-hook-ingest", "publish", FAKE_HEAD),
        (
            "pushbus-hook-ingest",
            "publish",
            "$JS.API.STREAM.INFO.KV_pushbus-agents",
        ),
        (
            "pushbus-gitops-notifier",
            "publish",
            "$KV.pushbus-agents.agent-x",
        ),
        (
            "pushbus-gitops-notifier",
            "subscription",
            "pushbus.api.agents.*",
        ),
        ("pushbus-replication-lag", "publish", "pushbus.push.1.fake"),
        (
            "pushbus-replication-lag",
            "subscription",
            "_INBOX.pushbus-filter.>",
        ),
        ("geo-2", "publish", "pushbus.geo.status.geo-1"),
    ];
    let every = Duration::from_millis(100);
    poll(
        "every denial reported",
        Duration::from_secs(5),
        every,
        async || {
            let missing: Vec<_> = want
                .iter()
                .filter(|(client, op, subject)| {
                    !denials(client).iter().any(|l| {
                        l.contains(&format!("operation=\"{op}\""))
                            && l.contains(&format!("subject=\"{subject}\""))
                    })
                })
                .collect();
            if missing.is_empty() {
                Ok(())
            } else {
                Err(format!(
                    "missing {missing:?}\n{}",
                    pushbus_shared::ops::metrics_handle().render()
                ))
            }
        },
    )
    .await;
    // Nothing was stored by the refused publish.
    let admin = bus::connect_once(&secured.connect_config("admin"), "pushbus-admin-test")
        .await
        .unwrap();
    let ajs = async_nats::jetstream::new(admin);
    let heads = ajs
        .get_stream(pushbus_shared::names::STREAM_REF_HEADS)
        .await
        .unwrap();
    assert!(
        heads
            .get_last_raw_message_by_subject(FAKE_HEAD)
            .await
            .is_err(),
        "a refused ref head was stored"
    );
}
