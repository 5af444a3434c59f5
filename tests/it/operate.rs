//! The operator's commands through the real binary: `events tail`, `dlq`,
//! `status`; and messages read back by a CloudEvents SDK.

use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use pushbus_shared::EventMeta;
use pushbus_shared::bus::Publisher;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, GitPushEvent, Source, Webhook};
use pushbus_shared::testkit::{self, NatsServer, free_port};

use crate::fixtures::{any_ref_of, main_branch_poke, put_agent, run_with_stdin};
use crate::guarantees::Process;
use crate::notifier::head_is;
use crate::poll::until;
use crate::support::{
    Replica, SseReader, Stack, StackOptions, local, push_stored, register, stored_events,
};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// `pushbus <args>` against `nats`; its stdout, failing the test on a
/// non-zero exit.
fn pushbus(nats: &NatsServer, args: &[&str]) -> String {
    let out = run(nats, args);
    assert!(
        out.status.success(),
        "pushbus {args:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

fn run(nats: &NatsServer, args: &[&str]) -> std::process::Output {
    let (command, rest) = args.split_first().unwrap();
    Command::new(PUSHBUS)
        .arg(command)
        .args(["--nats-url", &nats.url()])
        .args(rest)
        .output()
        .unwrap()
}

fn json_lines(text: &str) -> Vec<serde_json::Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).unwrap())
        .collect()
}

fn push_body(project_id: i64, new_sha: &str) -> serde_json::Value {
    serde_json::json!({
        "gl_repository": format!("project-{project_id}"),
        "identifier": "user-1",
        "changes": format!("{} {new_sha} refs/heads/main\n", "1".repeat(40)),
    })
}

/// A public agent watching every ref of `project`, with a webhook to `url`.
async fn put_webhook_agent(nats: &NatsServer, agent_id: &str, project: i64, url: &str) {
    let config = AgentConfig {
        agent_id: agent_id.into(),
        public: true,
        watches: vec![any_ref_of(project)],
        webhook: Some(Webhook {
            url: url.into(),
            ..Default::default()
        }),
        ..Default::default()
    };
    put_agent(nats, &config).await;
}

/// `until` stream `name` holds `n` messages.
async fn until_holds(what: &str, js: &async_nats::jetstream::Context, name: &str, n: u64) {
    until(what, || {
        let js = js.clone();
        async move {
            let mut s = js.get_stream(name).await.unwrap();
            s.info().await.is_ok_and(|i| i.state.messages == n)
        }
    })
    .await;
}

/// Posts a push of `project_id` to a SHA of `sha_char`s under
/// `correlation_id`, and checks it was stored.
async fn stored_push(
    stack: &Stack,
    project_id: i64,
    sha_char: &str,
    correlation_id: &str,
) -> reqwest::Response {
    let resp = stack
        .post_receive(
            &push_body(project_id, &sha_char.repeat(40)),
            &[("X-Correlation-Id", correlation_id)],
        )
        .await;
    assert_eq!(resp.status(), 200);
    resp
}

/// `pushbus events tail` from the first message, stopping after `count`.
fn events_tail(nats: &NatsServer, count: usize, args: &[&str]) -> String {
    let count = count.to_string();
    let mut all = vec!["events", "tail", "--since", "1", "--count", &count];
    all.extend_from_slice(args);
    pushbus(nats, &all)
}

/// The one push to `project` and the one ref head of `agent` (the poke it
/// is sent), as `pushbus events tail --json` prints them.
fn push_and_poke_tailed(
    nats: &NatsServer,
    project: i64,
    agent: &str,
) -> (serde_json::Value, serde_json::Value) {
    let (pushes, pokes) = (
        format!("pushbus.push.{project}.*"),
        format!("pushbus.poke.{agent}"),
    );
    let out = events_tail(nats, 2, &["--json", &pushes, &pokes]);
    let events = json_lines(&out);
    assert_eq!(events.len(), 2, "{out}");
    let of_type = |t: &str| events.iter().find(|e| e["type"] == t).cloned().unwrap();
    (
        of_type("pushbus.v1.GitPushEvent"),
        of_type("pushbus.v1.RefHead"),
    )
}

// One push and its poke, read back decoded: the push's refs, the poke's
// agent, one correlation ID, the poke caused by the push.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn events_tail_prints_pushes_and_pokes_decoded() {
    let nats = NatsServer::start();
    register(&nats, "tailer", 70..=70).await;
    let stack = Stack::start(&nats.url()).await;
    stored_push(&stack, 70, "a", "tail-1").await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    until_holds("the head is stored", &js, names::STREAM_REF_HEADS, 1).await;
    let (push, poke) = push_and_poke_tailed(&nats, 70, "tailer");
    assert_eq!(push["payload"]["changes"][0]["new_sha"], "a".repeat(40));
    assert_eq!(push["payload"]["changes"][0]["ref"], "refs/heads/main");
    assert_eq!(poke["payload"]["agent_id"], "tailer");
    assert_eq!(push["correlation_id"], "tail-1");
    assert_eq!(poke["correlation_id"], "tail-1");
    assert_eq!(poke["causation_id"], push["event_id"]);
    // The human form names the same things on one line each.
    let human = events_tail(&nats, 1, &["pushbus.poke.tailer"]);
    assert!(
        human.contains("poke agent tailer refs/heads/main"),
        "{human}"
    );
    let bad = run(&nats, &["events", "tail", "--since", "yesterday"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("--since"));
    stack.stop().await;
}

/// A webhook target that answers 404 until `healthy`, then 200.
async fn target(
    healthy: Arc<AtomicBool>,
    hits: Arc<std::sync::Mutex<Vec<String>>>,
) -> std::net::SocketAddr {
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |headers: axum::http::HeaderMap| {
            let (healthy, hits) = (healthy.clone(), hits.clone());
            async move {
                let uuid = headers
                    .get("x-gitlab-event-uuid")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_owned();
                hits.lock().unwrap().push(uuid);
                if healthy.load(Ordering::SeqCst) {
                    axum::http::StatusCode::OK
                } else {
                    axum::http::StatusCode::NOT_FOUND
                }
            }
        }),
    );
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    addr
}

// A webhook poke dead-lettered by a 404, listed and shown with its reason,
// replayed once the target is fixed (same event ID reaches it) and gone
// from the DLQ; purge needs --yes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dlq_lists_shows_replays_and_purges_dead_letters() {
    let nats = NatsServer::start();
    let healthy = Arc::new(AtomicBool::new(false));
    let hits = Arc::new(std::sync::Mutex::new(Vec::new()));
    let addr = target(healthy.clone(), hits.clone()).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    put_webhook_agent(&nats, "hooked", 73, &format!("http://{addr}/hook")).await;
    let webhooks = pushbus_gitops_notifier::webhook::WebhookConfig {
        allow_private: true,
        config_cache_ms: 100,
        ..Default::default()
    };
    let notifier = Replica::notifier_with_webhooks(&nats.url(), webhooks).await;
    let publisher = Publisher::new(js.clone(), Source::default());
    let meta = EventMeta::fresh("dlq-corr");
    let poke = main_branch_poke("hooked", 73, "2".repeat(40));
    publisher
        .publish(names::webhook_subject("hooked"), &poke, &meta)
        .await
        .unwrap();
    // And one undecodable message, dead-lettered at once.
    js.publish(names::webhook_subject("hooked"), "not protobuf".into())
        .await
        .unwrap()
        .await
        .unwrap();
    until_holds("two dead letters", &js, names::STREAM_DLQ, 2).await;
    let listed = json_lines(&pushbus(&nats, &["dlq", "list", "--json"]));
    assert_eq!(listed.len(), 2);
    let letter = listed
        .iter()
        .find(|l| l["event_id"] == meta.event_id.as_str())
        .unwrap();
    assert_eq!(
        letter["dead_letter"]["consumer"],
        names::CONSUMER_NOTIFIER_WEBHOOKS
    );
    assert_eq!(letter["dead_letter"]["subject"], "pushbus.webhook.hooked");
    assert_eq!(letter["dead_letter"]["delivered"], 1);
    assert!(
        letter["dead_letter"]["reason"]
            .as_str()
            .unwrap()
            .contains("404")
    );
    assert_eq!(letter["payload"]["agent_id"], "hooked");
    let seq = letter["sequence"].as_u64().unwrap().to_string();
    let shown: serde_json::Value =
        serde_json::from_str(&pushbus(&nats, &["dlq", "show", &seq, "--json"])).unwrap();
    assert_eq!(shown["correlation_id"], "dlq-corr");
    let human = pushbus(&nats, &["dlq", "list"]);
    assert!(
        human.contains("dead-lettered by gitops-notifier-webhooks after 1 deliveries"),
        "{human}"
    );

    healthy.store(true, Ordering::SeqCst);
    let replayed = json_lines(&pushbus(&nats, &["dlq", "replay", &seq, "--json"]));
    assert_eq!(
        replayed[0]["replayed_to"]["subject"],
        "pushbus.webhook.hooked"
    );
    until("the replayed poke reaches the fixed target", || {
        let hits = hits.clone();
        let id = meta.event_id.clone();
        async move {
            let h = hits.lock().unwrap();
            h.len() >= 2 && h.last() == Some(&id)
        }
    })
    .await;
    let left = json_lines(&pushbus(&nats, &["dlq", "list", "--json"]));
    assert_eq!(
        left.len(),
        1,
        "the replayed letter is still listed: {left:?}"
    );
    assert!(left[0].get("undecodable").is_some());

    let refused = run(&nats, &["dlq", "purge"]);
    assert!(!refused.status.success());
    pushbus(&nats, &["dlq", "purge", "--yes"]);
    assert!(json_lines(&pushbus(&nats, &["dlq", "list", "--json"])).is_empty());
    notifier.stop().await;
}

// A push filter could not finish (its webhook jobs had no room) is
// dead-lettered; by the time it is replayed a newer push moved the ref. The
// replay is ordered as the push it was, so it cannot move the head back,
// and it says where it came from.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replayed_push_is_ordered_as_the_push_it_was_and_says_where_it_came_from() {
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    pushbus(&nats, &["setup"]);
    let set_webhook_room = async |max_messages: i64| {
        let mut webhooks = js.get_stream(names::STREAM_WEBHOOKS).await.unwrap();
        let mut cfg = webhooks.info().await.unwrap().config.clone();
        cfg.max_messages = max_messages;
        js.update_stream(cfg).await.unwrap();
    };
    // No notifier runs: one job fills the stream, which refuses the next.
    set_webhook_room(1).await;
    js.publish(names::webhook_subject("filler"), "job".into())
        .await
        .unwrap()
        .await
        .unwrap();
    put_webhook_agent(&nats, "replayed", 77, "https://ci.example.com/hook").await;
    let (listener, ingest_addr) = crate::support::bind_local().await;
    let ingest = Replica::ingest(&nats.url(), listener).await;
    let filter = Replica::filter(&nats.url()).await;
    let (old, new) = ("a".repeat(40), "b".repeat(40));
    push_stored(ingest_addr, &push_body(77, &old)).await;
    until_holds("the push dead-lettered", &js, names::STREAM_DLQ, 1).await;
    let letter = json_lines(&pushbus(&nats, &["dlq", "list", "--json"])).remove(0);
    assert_eq!(letter["dead_letter"]["consumer"], names::CONSUMER_FILTER);
    let original = letter["dead_letter"]["sequence"].as_u64().unwrap();

    set_webhook_room(-1).await;
    push_stored(ingest_addr, &push_body(77, &new)).await;
    head_is(&nats, "replayed", 77, "main", &new).await;
    let dlq_seq = letter["sequence"].as_u64().unwrap();
    // (The SEQ form is tested above; here every letter of one consumer.)
    pushbus(&nats, &["dlq", "replay", "--all", "--consumer", "filter"]);

    let mut pushes = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    let replay_seq = pushes.info().await.unwrap().state.last_sequence;
    assert_eq!(replay_seq, 3, "the replay is the third push stored");
    let replay = pushes.get_raw_message(replay_seq).await.unwrap();
    let header = |name: &str| replay.headers.get(name).map(|v| v.as_str().to_owned());
    use pushbus_shared::names::headers;
    assert_eq!(header(headers::REPLAY_OF), Some(dlq_seq.to_string()));
    assert_eq!(header(headers::REPLAY_SEQUENCE), Some(original.to_string()));
    let stored = stored_events::<GitPushEvent>(&nats, names::STREAM_PUSHES).await;
    assert_eq!(stored.len(), 3);
    assert_eq!(stored[2].0.event_id, stored[0].0.event_id, "a new event ID");
    assert_eq!(stored[2].1.changes[0].new_sha, old);
    until("filter handled the replay", || {
        let pushes = pushes.clone();
        async move {
            let info = pushes.consumer_info(names::CONSUMER_FILTER).await.unwrap();
            info.delivered.stream_sequence >= replay_seq
                && info.num_pending == 0
                && info.num_ack_pending == 0
        }
    })
    .await;
    head_is(&nats, "replayed", 77, "main", &new).await;
    assert_eq!(
        json_lines(&pushbus(&nats, &["dlq", "list", "--json"])).len(),
        0
    );
    filter.stop().await;
    ingest.stop().await;
}

// Streams and consumers with their backlog, and every service instance with
// its gauges: the notifier counts the agent connected to it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_shows_streams_consumers_and_each_instance() {
    let nats = NatsServer::start();
    register(&nats, "watcher", 74..=74).await;
    // Its own process: gauges are per process, and the test process hosts
    // other tests' notifiers.
    let (ingest, notifier) = (local(free_port()), local(free_port()));
    let _all = Process::start(
        &nats.url(),
        "all",
        &[
            "--ingest-listen",
            &ingest.to_string(),
            "--notifier-listen",
            &notifier.to_string(),
        ],
    )
    .await;
    let mut sse = SseReader::new(
        SseReader::connect(&format!("http://{notifier}/v1/agents/watcher/pokes"), None).await,
    );
    assert_eq!(
        sse.next_event(Duration::from_secs(5)).await.unwrap().0,
        "status"
    );
    // A push filter cannot decode: dead-lettered, an error logged by the
    // shared consumer code on filter's behalf.
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    js.publish(
        names::push_subject(74, "undecodable"),
        "not protobuf".into(),
    )
    .await
    .unwrap()
    .await
    .unwrap();
    until_holds("a dead letter", &js, names::STREAM_DLQ, 1).await;
    let report: serde_json::Value =
        serde_json::from_str(&pushbus(&nats, &["status", "--json"])).unwrap();
    let stream = |name: &str| {
        report["streams"]
            .as_array()
            .unwrap()
            .iter()
            .find(|s| s["stream"] == name)
            .unwrap()
            .clone()
    };
    let consumers = |s: &serde_json::Value| s["consumers"].as_array().unwrap().clone();
    let pushes = stream(names::STREAM_PUSHES);
    assert!(
        consumers(&pushes)
            .iter()
            .any(|c| c["consumer"] == names::CONSUMER_FILTER)
    );
    // The ref heads' stream is listed, with the notifier's feed following it.
    let heads = stream(names::STREAM_REF_HEADS);
    assert!(heads.get("missing").is_none(), "{heads}");
    assert!(!consumers(&heads).is_empty(), "{heads}");
    let instances = report["instances"].as_array().unwrap();
    let services: std::collections::BTreeSet<&str> = instances
        .iter()
        .map(|i| i["service"].as_str().unwrap())
        .collect();
    assert_eq!(
        services,
        [
            "filter",
            "gitops-notifier",
            "hook-ingest",
            "replication-lag"
        ]
        .into()
    );
    let notifier = instances
        .iter()
        .find(|i| i["service"] == "gitops-notifier")
        .unwrap();
    assert_eq!(notifier["ready"], true);
    assert_eq!(notifier["gauges"]["pushbus_notifier_connections"], 1);
    // One process hosts all four, yet each instance shows only its own
    // gauges: hook-ingest holds no registry, filter no connections.
    let gauges = |service: &str| {
        let i = instances.iter().find(|i| i["service"] == service).unwrap();
        let names: std::collections::BTreeSet<String> =
            i["gauges"].as_object().unwrap().keys().cloned().collect();
        names
    };
    assert!(gauges("hook-ingest").is_empty(), "{report}");
    assert!(gauges("replication-lag").is_empty(), "{report}");
    assert_eq!(
        gauges("filter"),
        ["pushbus_filter_registry_agents".to_owned()].into()
    );
    assert!(
        gauges("gitops-notifier")
            .iter()
            .all(|g| g.starts_with("pushbus_notifier_")),
        "{report}"
    );
    let last_error = |service: &str| {
        let i = instances.iter().find(|i| i["service"] == service).unwrap();
        i["last_error"]["message"].as_str().map(str::to_owned)
    };
    let dead = last_error("filter").unwrap_or_default();
    assert!(dead.contains("dead-lettering message"), "{report}");
    for other in ["hook-ingest", "gitops-notifier", "replication-lag"] {
        assert_eq!(last_error(other), None, "{other}: {report}");
    }
    let human = pushbus(&nats, &["status"]);
    assert!(human.contains("consumer filter"), "{human}");
    assert!(human.contains(" notifier_connections=1"), "{human}");
    assert!(human.contains(" filter_registry_agents=1"), "{human}");
}

/// The headers (first value of each) and payload of a stream's first message.
async fn first_message(
    js: &async_nats::jetstream::Context,
    stream: &str,
) -> (serde_json::Map<String, serde_json::Value>, bytes::Bytes) {
    use futures::StreamExt;
    let msg = js
        .get_stream(stream)
        .await
        .unwrap()
        .create_consumer(async_nats::jetstream::consumer::pull::OrderedConfig::default())
        .await
        .unwrap()
        .messages()
        .await
        .unwrap()
        .next()
        .await
        .unwrap()
        .unwrap();
    let headers = msg
        .headers
        .as_ref()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.to_string(), serde_json::json!(v[0].as_str())))
        .collect();
    (headers, msg.payload.clone())
}

// `--bus-no-cloudevents`: no `ce-*` header on what the services publish,
// and the pipeline and the tools work as before, from the envelope and the
// `Pushbus-*` headers.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_cloudevents_headers_the_pipeline_runs_on_the_envelope() {
    let nats = NatsServer::start();
    register(&nats, "bare", 76..=76).await;
    let opts = StackOptions {
        no_cloudevents: true,
        ..Default::default()
    };
    let stack = Stack::start_with(&nats.url(), opts).await;
    stored_push(&stack, 76, "c", "bare-1").await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    until_holds("the head is stored", &js, names::STREAM_REF_HEADS, 1).await;
    let (headers, _) = first_message(&js, names::STREAM_PUSHES).await;
    assert!(headers.keys().all(|k| !k.starts_with("ce-")), "{headers:?}");
    assert_eq!(headers[names::headers::CORRELATION_ID], "bare-1");
    let (_, poke) = push_and_poke_tailed(&nats, 76, "bare");
    assert_eq!(poke["payload"]["new_sha"], "c".repeat(40));
    assert_eq!(poke["correlation_id"], "bare-1");
    stack.stop().await;
}

// Every message carries CloudEvents binary-mode headers; the CloudEvents
// Python SDK (installed by `make tools`) reads them back.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn messages_read_back_with_a_cloudevents_sdk() {
    use base64::Engine;
    let nats = NatsServer::start();
    // An agent with a webhook, so the push causes a message of its own.
    put_webhook_agent(&nats, "caused", 75, "https://ci.example.com/hook").await;
    let stack = Stack::start(&nats.url()).await;
    let resp = stored_push(&stack, 75, "b", "ce-1").await;
    let event_id = resp.json::<serde_json::Value>().await.unwrap()["event_ids"][0]
        .as_str()
        .unwrap()
        .to_owned();
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let (headers, payload) = first_message(&js, names::STREAM_PUSHES).await;
    let input = serde_json::json!({
        "headers": headers,
        "body_b64": base64::engine::general_purpose::STANDARD.encode(&payload),
    });
    let python = concat!(env!("CARGO_MANIFEST_DIR"), "/.tools/venv/bin/python");
    let script = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/tests/it/tools/cloudevents_read.py"
    );
    assert!(
        std::path::Path::new(python).exists(),
        "{python} missing: run `make tools` (it installs the CloudEvents SDK)"
    );
    let out = run_with_stdin(Command::new(python).arg(script), &input.to_string());
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let event: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(event["specversion"], "1.0");
    assert_eq!(event["id"], event_id.as_str());
    assert_eq!(event["type"], "pushbus.v1.GitPushEvent");
    assert_eq!(event["source"], "/pushbus/hook-ingest");
    assert_eq!(event["subject"], format!("pushbus.push.75.{event_id}"));
    assert_eq!(event["datacontenttype"], "application/protobuf");
    assert_eq!(event["correlationid"], "ce-1");
    assert!(event["time"].as_str().unwrap().starts_with("20"));
    // What an operator reads without decoding; the first event of a chain
    // has no cause.
    assert_eq!(headers["Nats-Msg-Id"], event_id.as_str());
    assert_eq!(headers["Pushbus-Type"], "pushbus.v1.GitPushEvent");
    assert_eq!(headers["Pushbus-Correlation-Id"], "ce-1");
    assert_eq!(
        headers["ce-dataschema"],
        "type.googleapis.com/pushbus.v1.Envelope"
    );
    assert!(!headers.contains_key("Pushbus-Causation-Id"), "{headers:?}");
    assert!(!headers.contains_key("ce-causationid"), "{headers:?}");

    // The webhook job the push caused names it as its cause.
    until_holds("the webhook job", &js, names::STREAM_WEBHOOKS, 1).await;
    let (job, _) = first_message(&js, names::STREAM_WEBHOOKS).await;
    assert_eq!(job["Pushbus-Type"], "pushbus.v1.AgentPoke");
    assert_eq!(job["Pushbus-Correlation-Id"], "ce-1");
    assert_eq!(job["Pushbus-Causation-Id"], event_id.as_str());
    assert_eq!(job["ce-causationid"], event_id.as_str());
    assert_eq!(job["ce-correlationid"], "ce-1");
    assert_eq!(job["Nats-Msg-Id"], job["ce-id"], "{job:?}");
    stack.stop().await;
}
