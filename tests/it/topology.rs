//! `pushbus setup` is the one writer of stream, bucket and consumer
//! configuration; services create what is missing and report, never revert,
//! what an operator changed. A full PUSHBUS_PUSHES refuses new pushes (503,
//! the hook spools) and never drops the older, unprocessed ones.

use std::collections::HashMap;
use std::process::Command;
use std::time::Duration;

use async_nats::jetstream;
use pushbus_shared::names;
use pushbus_shared::testkit::NatsServer;

use crate::fixtures::stream_info;
use crate::support::Stack;

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

pub fn setup(url: &str, extra: &[&str]) {
    let out = Command::new(PUSHBUS)
        .args(["setup", "--nats-url", url])
        .args(extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "pushbus setup {extra:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

pub async fn metrics(stack: &Stack) -> String {
    reqwest::get(format!("http://{}/metrics", stack.ops))
        .await
        .unwrap()
        .text()
        .await
        .unwrap()
}

pub async fn stream_config(js: &jetstream::Context, name: &str) -> jetstream::stream::Config {
    stream_info(js, name).await.config
}

fn push_body(sha: &str) -> serde_json::Value {
    serde_json::json!({
        "gl_repository": "project-42",
        "identifier": "user-1",
        "changes": format!("{} {sha} refs/heads/main", "0".repeat(40)),
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn services_keep_operator_changes_and_report_drift_setup_writes() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    stack.stop().await;
    let js = jetstream::new(pushbus_shared::testkit::client(&nats).await);

    // An operator raises the push stream's size and the filter consumer's
    // in-flight limit by hand, and pins its replicas (as older pushbus did).
    let mut pushes = stream_config(&js, names::STREAM_PUSHES).await;
    assert_eq!(
        pushes.max_bytes,
        pushbus_shared::topology::DEFAULT_STREAM_MAX_BYTES
    );
    assert_eq!(pushes.discard, jetstream::stream::DiscardPolicy::New);
    pushes.max_bytes = 123_456_789;
    js.update_stream(pushes).await.unwrap();
    let (stream_name, mut consumer) = pushbus_filter::topology(&Default::default())
        .consumers
        .into_iter()
        .find(|(s, _)| s == names::STREAM_PUSHES)
        .unwrap();
    consumer.max_ack_pending = 777;
    consumer.num_replicas = 1;
    js.create_consumer_on_stream(consumer, &stream_name)
        .await
        .unwrap();

    // A restart keeps both and says what differs.
    let stack = Stack::start(&nats.url()).await;
    assert_eq!(
        stream_config(&js, names::STREAM_PUSHES).await.max_bytes,
        123_456_789
    );
    let stream = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    let info = stream.consumer_info(names::CONSUMER_FILTER).await.unwrap();
    assert_eq!(info.config.max_ack_pending, 777);
    let text = metrics(&stack).await;
    assert!(
        text.contains(r#"object="stream PUSHBUS_PUSHES",fields="max_bytes""#),
        "{text}"
    );
    assert!(
        text.contains(
            r#"object="consumer PUSHBUS_PUSHES/filter",fields="max_ack_pending,num_replicas""#
        ),
        "{text}"
    );
    // Pushes still flow through the kept configuration.
    let resp = stack.post_receive(&push_body(&"a".repeat(40)), &[]).await;
    assert_eq!(resp.status(), 200);
    stack.stop().await;

    // `pushbus setup` writes its own configuration back.
    setup(&nats.url(), &["--stream-max-bytes", "222222222"]);
    assert_eq!(
        stream_config(&js, names::STREAM_PUSHES).await.max_bytes,
        222_222_222
    );
    let info = stream.consumer_info(names::CONSUMER_FILTER).await.unwrap();
    assert_ne!(info.config.max_ack_pending, 777);
    // Unpinned: it follows its stream's replicas again.
    assert_eq!(info.config.num_replicas, 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_push_stream_refuses_new_pushes_keeps_old_ones_and_the_hook_spools() {
    let nats = NatsServer::start();
    setup(&nats.url(), &["--stream-max-bytes", "3000"]);
    let stack = Stack::start(&nats.url()).await;
    let js = jetstream::new(pushbus_shared::testkit::client(&nats).await);
    assert_eq!(
        stream_config(&js, names::STREAM_PUSHES).await.max_bytes,
        3000
    );

    let mut stored = 0u64;
    let mut refused = false;
    for i in 0..100 {
        let sha = format!("{:040x}", i + 1);
        let resp = stack.post_receive(&push_body(&sha), &[]).await;
        match resp.status().as_u16() {
            200 => stored += 1,
            503 => {
                refused = true;
                break;
            }
            other => panic!("unexpected status {other}"),
        }
    }
    assert!(refused, "a 3000-byte stream took 100 pushes");
    assert!(stored >= 1, "not even one push fitted");
    let state = stream_info(&js, names::STREAM_PUSHES).await.state;
    // Nothing older was dropped to make room.
    assert_eq!(state.first_sequence, 1);
    assert_eq!(state.messages, stored);

    // The hook hears the 503 and spools the notification.
    let spool = tempfile::tempdir().unwrap();
    let args = pushbus_hook_ingest::hook::HookArgs {
        ingest_url: format!("http://{}", stack.ingest),
        project_id: Some(42),
        project_path: None,
        timeout_ms: 3000,
        secret_file: None,
        spool_dir: Some(spool.path().to_owned()),
        spool_max_age_hours: 144,
    };
    let env: HashMap<String, String> = [("GL_ID".to_string(), "user-1".to_string())].into();
    let line = format!("{} {} refs/heads/main\n", "0".repeat(40), "f".repeat(40));
    let outcome = pushbus_hook_ingest::hook::post_receive(&args, &line, &env).await;
    assert!(outcome.spooled && !outcome.delivered, "{:?}", outcome);

    // Once the operator makes room, the spooled push is delivered.
    setup(&nats.url(), &["--stream-max-bytes", "1000000"]);
    let report = pushbus_hook_ingest::hook::flush(&args, &env).await.unwrap();
    assert_eq!((report.delivered, report.left), (1, 0));
    let mut s = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    tokio::time::sleep(Duration::from_millis(100)).await;
    assert_eq!(s.info().await.unwrap().state.messages, stored + 1);
    stack.stop().await;
}

// The limits README's "Names on the bus" and "Topology, limits and what a
// full stream does" promise, as `pushbus setup` writes them: each stream's
// subjects and age, the push stream's 2-minute duplicate window, the size
// limits (and their flags), and which streams refuse new messages when full.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn setup_writes_each_streams_documented_limits() {
    use jetstream::stream::DiscardPolicy::{New, Old};
    const DAY: u64 = 24 * 3600;
    let nats = NatsServer::start();
    setup(&nats.url(), &[]);
    let js = jetstream::new(pushbus_shared::testkit::client(&nats).await);
    let streams = [
        (names::STREAM_PUSHES, "pushbus.push.>", 7 * DAY, New),
        (names::STREAM_WEBHOOKS, "pushbus.webhook.>", DAY, New),
        (names::STREAM_DLQ, "pushbus.dlq.>", 30 * DAY, New),
        (names::STREAM_GEO_STATUS, "pushbus.geo.status.>", DAY, Old),
    ];
    for (name, subjects, age_secs, discard) in streams {
        let cfg = stream_config(&js, name).await;
        assert_eq!(cfg.subjects, vec![subjects.to_owned()], "{name}");
        assert_eq!(cfg.max_age, Duration::from_secs(age_secs), "{name}");
        assert_eq!(cfg.discard, discard, "{name}");
        assert_eq!(cfg.max_bytes, 1 << 30, "{name}");
        assert_eq!(cfg.max_message_size, 1 << 20, "{name}");
    }
    let pushes = stream_config(&js, names::STREAM_PUSHES).await;
    assert_eq!(pushes.duplicate_window, Duration::from_secs(120));

    setup(&nats.url(), &["--stream-max-msg-size", "2048"]);
    for (name, ..) in streams {
        assert_eq!(
            stream_config(&js, name).await.max_message_size,
            2048,
            "{name}"
        );
    }
}
