//! The delivery guarantees README states, attacked with real processes:
//! SIGSTOP/SIGKILL of services and of nats-server, real reconnecting clients.

use std::collections::{HashMap, HashSet};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer};
use futures::StreamExt;
use pushbus_shared::EventMeta;
use pushbus_shared::bus::{ConsumerSpec, Delivery, HandleError, Handler, Publisher};
use pushbus_shared::names;
use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::{ChangeKind, GitPushEvent, RefChange, RefKind, watch_event::Event};
use pushbus_shared::testkit::{self, NatsServer, free_port};
use pushbus_shared::topology;

use crate::fixtures::{pushes_bus, spawn_consumer, stream_messages, test_publisher};
use crate::notifier::{agent, drain, head_is, pokes, push, sha, watch};
use crate::poll::{poll, until, until_ready};
use crate::support::{Replica, SseReader, Stack, local, register};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// A service as its own OS process (`pushbus run <service>`), so a test can
/// freeze and kill it like an operator's node dies.
pub(crate) struct Process {
    child: Child,
    ops: std::net::SocketAddr,
}

impl Process {
    pub(crate) async fn start(nats_url: &str, service: &str, flags: &[&str]) -> Process {
        Self::start_with_env(nats_url, service, flags, &[]).await
    }

    pub(crate) async fn start_with_env(
        nats_url: &str,
        service: &str,
        flags: &[&str],
        env: &[(&str, &str)],
    ) -> Process {
        let ops = local(free_port());
        let child = Command::new(PUSHBUS)
            .args(["run", service, "--nats-url", nats_url, "--ops-listen"])
            .arg(ops.to_string())
            .args(flags)
            .envs(env.iter().copied())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start pushbus");
        let p = Process { child, ops };
        p.wait_ready().await;
        p
    }

    async fn wait_ready(&self) {
        until_ready(&format!("http://{}/readyz", self.ops)).await;
    }

    /// Its /metrics, /readyz address.
    pub(crate) fn ops(&self) -> std::net::SocketAddr {
        self.ops
    }

    pub(crate) fn signal(&self, signal: i32) {
        let _ = pushbus_shared::process::signal(self.child.id(), signal);
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        self.signal(pushbus_shared::process::SIGCONT);
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// `until` on what the server says of `consumer`.
async fn until_consumer(
    what: &str,
    consumer: &PullConsumer,
    done: impl Fn(&jetstream::consumer::Info) -> bool,
) {
    let done = &done;
    until(what, || {
        let mut c = consumer.clone();
        async move { c.info().await.is_ok_and(done) }
    })
    .await;
}

/// At least two messages delivered and every one acked.
fn done_with_two(i: &jetstream::consumer::Info) -> bool {
    i.num_ack_pending == 0 && i.num_pending == 0 && i.delivered.stream_sequence >= 2
}

async fn consumer(js: &jetstream::Context, stream: &str, name: &str) -> PullConsumer {
    js.get_stream(stream)
        .await
        .unwrap()
        .get_consumer(name)
        .await
        .unwrap()
}

fn branch_push(project_id: i64, branch: &str, new_sha: &str) -> GitPushEvent {
    GitPushEvent {
        project_id,
        changes: vec![RefChange {
            old_sha: "1".repeat(40),
            new_sha: new_sha.into(),
            r#ref: format!("refs/heads/{branch}"),
            ref_kind: RefKind::Branch as i32,
            change_kind: ChangeKind::Update as i32,
            ..Default::default()
        }],
        part: 1,
        part_count: 1,
        ..Default::default()
    }
}

/// Stores push `n` (SHA `sha(n)`) to `main` of `project_id` under `meta`,
/// on the event's own subject, as hook-ingest would.
async fn store_main_push(
    publisher: &Publisher,
    project_id: i64,
    meta: &EventMeta,
    n: u64,
) -> async_nats::jetstream::publish::PublishAck {
    publisher
        .publish(
            names::push_subject(project_id, &meta.event_id),
            &branch_push(project_id, "main", &sha(n)),
            meta,
        )
        .await
        .unwrap()
}

// A filter replica frozen while it holds push 1, a second replica handles
// the later push 2, then the first is killed: push 1 comes back after
// ack_wait and its head is written *later*. Ordered by write, the head
// would move back to push 1's SHA; ordered by push, it stays.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_redelivered_after_a_replica_dies_never_moves_a_head_back() {
    let nats = NatsServer::start();
    register(&nats, "stale", 50..=50).await;
    let url = nats.url();
    let js = jetstream::new(testkit::client(&nats).await);
    let (notifier_listener, notifier_addr) = crate::support::bind_local().await;
    let notifier = Replica::notifier(&url, notifier_listener).await;
    let a = Process::start(
        &url,
        "filter",
        &["--filter-concurrency", "1", "--filter-ack-wait-secs", "2"],
    )
    .await;
    let filter = consumer(&js, names::STREAM_PUSHES, names::CONSUMER_FILTER).await;
    until_consumer("replica A waits for a push", &filter, |i| {
        i.num_waiting >= 1
    })
    .await;
    a.signal(pushbus_shared::process::SIGSTOP);
    let pushes = test_publisher(&js);
    let first = EventMeta::fresh("c-1");
    store_main_push(&pushes, 50, &first, 1).await;
    until_consumer("push 1 is held by the frozen replica", &filter, |i| {
        i.num_ack_pending == 1
    })
    .await;
    let b = Replica::filter(&url).await;
    let second = EventMeta::fresh("c-2");
    store_main_push(&pushes, 50, &second, 2).await;
    head_is(&nats, "stale", 50, "main", &sha(2)).await;
    a.signal(pushbus_shared::process::SIGKILL);
    drop(a);
    // Push 1 comes back to B after ack_wait (2 s) and is handled.
    // Acked only once its head write was tried: the write found push 2's.
    until_consumer("push 1 handled again", &filter, done_with_two).await;
    head_is(&nats, "stale", 50, "main", &sha(2)).await;
    // And an agent catching up from scratch ends on push 2.
    let mut stream = watch(notifier_addr, agent("stale", Some(0))).await;
    let events = drain(&mut stream, Duration::from_millis(800)).await;
    assert_eq!(pokes(&events), vec![("refs/heads/main".into(), sha(2))]);
    b.stop().await;
    notifier.stop().await;
}

// filter wrote a push's heads and died before its ack reached the server:
// the push comes back and is handled again. Writing its heads again would
// give them new revisions, and agents the same SHA a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_redelivered_after_its_heads_were_written_writes_them_once() {
    use pushbus_shared::heads::{HeadWriter, Pruning};
    use pushbus_shared::proto::{AgentPoke, RefHead};
    let nats = NatsServer::start();
    register(&nats, "once-a", 52..=52).await;
    register(&nats, "once-b", 52..=52).await;
    let js = jetstream::new(testkit::client(&nats).await);
    pushbus_filter::topology(&crate::support::filter_config())
        .ensure(&js)
        .await
        .unwrap();
    let meta = EventMeta::fresh("c-once");
    let ack = store_main_push(&test_publisher(&js), 52, &meta, 1).await;
    // What the dead replica had written: both heads, at the push's position.
    let created = js
        .get_stream(names::STREAM_PUSHES)
        .await
        .unwrap()
        .cached_info()
        .created;
    let kv = js.get_key_value(names::BUCKET_REF_HEADS).await.unwrap();
    let writer = HeadWriter::new(kv, js.clone(), Pruning::default());
    for agent_id in ["once-a", "once-b"] {
        let head = RefHead {
            poke: Some(AgentPoke {
                agent_id: agent_id.into(),
                project_id: 52,
                r#ref: "refs/heads/main".into(),
                new_sha: sha(1),
                push_sequence: ack.sequence,
                push_epoch: i64::try_from(created.unix_timestamp_nanos()).unwrap(),
                ..Default::default()
            }),
            event_id: EventMeta::derived_from(&meta, &[agent_id, "refs/heads/main"]).event_id,
            ..Default::default()
        };
        assert!(writer.record(&head).await.unwrap());
    }
    let replica = Replica::filter(&nats.url()).await;
    let filter = consumer(&js, names::STREAM_PUSHES, names::CONSUMER_FILTER).await;
    until_consumer("the push handled again", &filter, |i| {
        i.num_ack_pending == 0 && i.num_pending == 0 && i.ack_floor.stream_sequence >= ack.sequence
    })
    .await;
    let (heads, writes) = crate::support::stored_heads(&nats).await;
    assert_eq!(heads.len(), 2);
    assert_eq!(writes, 2, "a head was written again");
    replica.stop().await;
}

// Sequences of a recreated PUSHBUS_PUSHES start again at 1; heads ordered
// by push sequence alone would refuse every new push (acked, never
// delivered). The stream's creation time orders before the sequence.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_recreated_pushes_stream_still_moves_heads() {
    let nats = NatsServer::start();
    register(&nats, "reborn", 51..=51).await;
    let stack = Stack::start(&nats.url()).await;
    for n in 1..=5 {
        push(&stack, 51, "main", &sha(n)).await;
    }
    head_is(&nats, "reborn", 51, "main", &sha(5)).await;
    let js = jetstream::new(testkit::client(&nats).await);
    js.delete_stream(names::STREAM_PUSHES).await.unwrap();
    js.create_stream(topology::pushes_stream()).await.unwrap();
    // filter's consumer went with the stream; it creates it again.
    push(&stack, 51, "main", &sha(6)).await;
    head_is(&nats, "reborn", 51, "main", &sha(6)).await;
    stack.stop().await;
}

// Ref a moves twice within its coalescing window and ref b once right after.
// Sent in arrival order (before), b went out first with a higher cursor
// than a's held head, and a reconnect from b's cursor never got a's newest
// SHA. Sent in revision order, nothing is skipped and nothing repeated.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_event_source_reconnecting_mid_window_misses_nothing_and_gets_nothing_twice() {
    let nats = NatsServer::start();
    register(&nats, "browser", 52..=52).await;
    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}/v1/agents/browser/pokes", stack.notifier);
    let mut received: Vec<(String, String)> = Vec::new();
    let mut sse = SseReader::new(SseReader::connect(&url, None).await);
    let (event, _) = sse.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(event, "status");
    push(&stack, 52, "a", &sha(1)).await;
    received.extend(next_pokes(&mut sse, 1).await);
    push(&stack, 52, "a", &sha(2)).await; // held: a is in its window
    push(&stack, 52, "b", &sha(3)).await;
    head_is(&nats, "browser", 52, "b", &sha(3)).await;
    // Take exactly one more poke, then drop the connection, as a browser
    // whose network blinked would.
    received.extend(next_pokes(&mut sse, 1).await);
    let last_id = sse.last_id.clone().expect("an id to resume from");
    drop(sse);
    let mut sse = resume(&url, Some(&last_id)).await;
    received.extend(pokes_until_quiet(&mut sse, Duration::from_millis(1500)).await);
    let newest = newest_without_repeats(&received);
    assert_eq!(newest.get("refs/heads/a"), Some(&sha(2)), "{received:?}");
    assert_eq!(newest.get("refs/heads/b"), Some(&sha(3)), "{received:?}");
    stack.stop().await;
}

fn poke_of(data: &str) -> (String, String) {
    let v: serde_json::Value = serde_json::from_str(data).unwrap();
    (
        v["ref"].as_str().unwrap().to_owned(),
        v["new_sha"].as_str().unwrap().to_owned(),
    )
}

/// The pokes `sse` brings until it is quiet for `quiet`.
async fn pokes_until_quiet(sse: &mut SseReader, quiet: Duration) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while let Some((event, data)) = sse.next_event(quiet).await {
        if event == "poke" {
            out.push(poke_of(&data));
        }
    }
    out
}

/// An SSE stream of `url`, from `last_id` when there is one.
async fn resume(url: &str, last_id: Option<&str>) -> SseReader {
    let mut req = reqwest::Client::new().get(url);
    if let Some(id) = last_id {
        req = req.header("Last-Event-ID", id);
    }
    SseReader::new(req.send().await.unwrap())
}

/// Each ref's newest SHA in `received`, asserting no (ref, SHA) came twice.
fn newest_without_repeats(received: &[(String, String)]) -> HashMap<String, String> {
    let unique: HashSet<_> = received.iter().cloned().collect();
    assert_eq!(
        unique.len(),
        received.len(),
        "a poke came twice: {received:?}"
    );
    received.iter().cloned().collect()
}

async fn next_pokes(sse: &mut SseReader, n: usize) -> Vec<(String, String)> {
    let mut out = Vec::new();
    while out.len() < n {
        let (event, data) = sse
            .next_event(Duration::from_secs(5))
            .await
            .expect("a poke");
        if event == "poke" {
            out.push(poke_of(&data));
        }
    }
    out
}

// Random disconnect points while pushes to three refs keep coming: each ref
// ends on its newest SHA, and no (ref, SHA) arrives twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnecting_at_random_points_ends_on_every_newest_sha_without_repeats() {
    let nats = NatsServer::start();
    register(&nats, "flaky", 53..=53).await;
    let stack = Arc::new(Stack::start(&nats.url()).await);
    let url = format!("http://{}/v1/agents/flaky/pokes", stack.notifier);
    let pusher = tokio::spawn({
        let stack = stack.clone();
        async move {
            for n in 1..=45u64 {
                push(&stack, 53, ["a", "b", "c"][(n * 7 % 3) as usize], &sha(n)).await;
                tokio::time::sleep(Duration::from_millis(20 + n * 37 % 60)).await;
            }
        }
    });
    let mut received = Vec::new();
    let mut last_id: Option<String> = None;
    let mut round = 0u64;
    while !pusher.is_finished() || round < 3 {
        round += 1;
        let mut sse = resume(&url, last_id.as_deref()).await;
        // Leave after a pseudo-random number of events (1..4) or a quiet spell.
        let leave_after = 1 + round * 5 % 4;
        let mut taken = 0;
        while let Some((event, data)) = sse.next_event(Duration::from_millis(700)).await {
            if event == "poke" {
                received.push(poke_of(&data));
            }
            taken += 1;
            if taken >= leave_after {
                break;
            }
        }
        last_id = sse.last_id.clone().or(last_id);
    }
    pusher.await.unwrap();
    let mut sse = resume(&url, last_id.as_deref()).await;
    received.extend(pokes_until_quiet(&mut sse, Duration::from_millis(1500)).await);
    let newest = newest_without_repeats(&received);
    let mut expected = HashMap::new();
    for n in 1..=45u64 {
        expected.insert(
            format!("refs/heads/{}", ["a", "b", "c"][(n * 7 % 3) as usize]),
            sha(n),
        );
    }
    assert_eq!(newest, expected);
    Arc::into_inner(stack).unwrap().stop().await;
}

// On a system with no heads yet the connect status carries cursor 0; an
// agent that resumes from it catches up on what came meanwhile (since=0
// used to mean "no catch-up").
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_status_of_a_fresh_system_is_a_resume_point() {
    let nats = NatsServer::start();
    register(&nats, "early", 54..=54).await;
    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}/v1/agents/early/pokes", stack.notifier);
    let mut sse = SseReader::new(SseReader::connect(&url, None).await);
    let (event, data) = sse.next_event(Duration::from_secs(5)).await.unwrap();
    assert_eq!(event, "status", "{data}");
    let id = sse.last_id.clone().expect("the status carries an id");
    assert_eq!(id, "0");
    drop(sse);
    let mut client = GitOpsNotifierClient::connect(format!("http://{}", stack.notifier))
        .await
        .unwrap();
    let mut grpc = client
        .watch(agent("early", None))
        .await
        .unwrap()
        .into_inner();
    let status = grpc.message().await.unwrap().unwrap();
    assert!(matches!(status.event, Some(Event::Status(_))), "{status:?}");
    let status_cursor = status.cursor;
    drop(grpc);
    let resp = stack
        .post_receive(
            &serde_json::json!({
                "gl_repository": "project-54",
                "identifier": "user-1",
                "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), sha(7)),
                "default_branch": "main",
            }),
            &[],
        )
        .await;
    assert_eq!(resp.status(), 200);
    head_is(&nats, "early", 54, "main", &sha(7)).await;
    let mut sse = resume(&url, Some(&id)).await;
    let mut got = Vec::new();
    while let Some((event, data)) = sse.next_event(Duration::from_millis(800)).await {
        if event == "poke" {
            got.push(poke_of(&data));
            // The SSE view carries the repository's default branch too.
            let v: serde_json::Value = serde_json::from_str(&data).unwrap();
            assert_eq!(v["default_branch"], "main");
        }
    }
    assert_eq!(got, vec![("refs/heads/main".into(), sha(7))]);
    let mut back = watch(stack.notifier, agent("early", Some(status_cursor))).await;
    let events = drain(&mut back, Duration::from_millis(800)).await;
    assert_eq!(pokes(&events), vec![("refs/heads/main".into(), sha(7))]);
    assert!(
        events
            .iter()
            .all(|e| matches!(e.event, Some(Event::Poke(_))))
    );
    stack.stop().await;
}

// Unknown paths used to answer 200 with a gRPC "unimplemented" body, which
// the hook counted as stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unknown_paths_are_404_with_a_json_error_and_unknown_grpc_methods_unimplemented() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let http = reqwest::Client::new();
    for base in [stack.ingest, stack.notifier] {
        let resp = http
            .post(format!("http://{base}/api/v4/internal/post_receiv"))
            .json(&serde_json::json!({}))
            .send()
            .await
            .unwrap();
        assert_eq!(resp.status(), 404);
        let body: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(body["path"], "/api/v4/internal/post_receiv");
        assert!(body["error"].as_str().unwrap().contains("no such endpoint"));
        let grpc = http
            .post(format!("http://{base}/pushbus.v1.Nope/Nothing"))
            .header("content-type", "application/grpc")
            .body(Vec::<u8>::new())
            .send()
            .await
            .unwrap();
        assert_eq!(grpc.headers()["grpc-status"], "12");
    }
    stack.stop().await;
}

fn ingest_body(project_id: i64, new_sha: &str) -> serde_json::Value {
    serde_json::json!({
        "gl_repository": format!("project-{project_id}"),
        "identifier": "user-1",
        "changes": format!("{} {new_sha} refs/heads/main\n", "1".repeat(40)),
    })
}

async fn stored_pushes(js: &jetstream::Context) -> u64 {
    stream_messages(js, names::STREAM_PUSHES).await
}

/// Shrinks the duplicate window, standing in for a replay that comes after
/// it (a spool that sat for days).
async fn short_duplicate_window(js: &jetstream::Context) {
    let mut config = topology::pushes_stream();
    config.duplicate_window = Duration::from_millis(200);
    js.update_stream(config).await.unwrap();
}

// A replay after the duplicate window used to be stored a second time.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replay_long_after_the_first_store_is_not_stored_again() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let js = jetstream::new(testkit::client(&nats).await);
    short_duplicate_window(&js).await;
    let body = ingest_body(55, &sha(1));
    let first = stack
        .post_receive(&body, &[("X-Correlation-Id", "spooled/for:days")])
        .await;
    assert_eq!(first.status(), 200);
    tokio::time::sleep(Duration::from_millis(600)).await;
    let replay = stack
        .post_receive(&body, &[("X-Correlation-Id", "spooled/for:days")])
        .await;
    assert_eq!(
        replay.status(),
        200,
        "a replay of a stored push is a success"
    );
    let a: serde_json::Value = first.json().await.unwrap();
    let b: serde_json::Value = replay.json().await.unwrap();
    assert_eq!(a["event_ids"], b["event_ids"]);
    assert_eq!(stored_pushes(&js).await, 1);
    stack.stop().await;
}

// A frozen nats-server takes the publish into its socket but answers
// nothing: ingest answers 503 within its deadline (before the hook's 3 s),
// the server stores the push once it runs again, and the hook's replay,
// past the duplicate window, is refused rather than stored twice.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_503_during_a_frozen_server_and_a_late_replay_store_the_push_once() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let js = jetstream::new(testkit::client(&nats).await);
    short_duplicate_window(&js).await;
    let body = ingest_body(56, &sha(9));
    let headers = [("X-Correlation-Id", "frozen-1")];
    nats.pause();
    let started = Instant::now();
    let answer = stack.post_receive(&body, &headers).await;
    let took = started.elapsed();
    nats.resume();
    assert_eq!(answer.status(), 503);
    assert!(took < Duration::from_secs(3), "answered after {took:?}");
    until("the buffered publish is stored", || {
        let js = js.clone();
        async move { stored_pushes(&js).await == 1 }
    })
    .await;
    tokio::time::sleep(Duration::from_millis(600)).await;
    let replay = stack.post_receive(&body, &headers).await;
    assert_eq!(replay.status(), 200);
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert_eq!(stored_pushes(&js).await, 1);
    stack.stop().await;
}

// /readyz used to stay 200 while the bus was gone.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn readiness_follows_the_bus() {
    let mut nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let ready = format!("http://{}/readyz", stack.ops);
    nats.kill();
    until("unready without NATS", || {
        let ready = ready.clone();
        async move { reqwest::get(&ready).await.is_ok_and(|r| r.status() == 503) }
    })
    .await;
    nats.start_again();
    until("ready again", || {
        let ready = ready.clone();
        async move { reqwest::get(&ready).await.is_ok_and(|r| r.status() == 200) }
    })
    .await;
    stack.stop().await;
}

/// Counts handled deliveries, each taking `takes`.
#[derive(Clone)]
struct Slow {
    takes: Duration,
    handled: Arc<AtomicUsize>,
    most_delivered: Arc<AtomicUsize>,
}

impl Handler<GitPushEvent> for Slow {
    async fn handle(&self, d: Delivery<GitPushEvent>) -> Result<(), HandleError> {
        self.most_delivered
            .fetch_max(d.delivered as usize, Ordering::SeqCst);
        tokio::time::sleep(self.takes).await;
        self.handled.fetch_add(1, Ordering::SeqCst);
        Ok(())
    }
}

impl Slow {
    fn handled_at_least(&self, n: usize) -> impl std::future::Future<Output = bool> + use<> {
        let handled = self.handled.clone();
        async move { handled.load(Ordering::SeqCst) >= n }
    }
}

/// Publishes a push to branch m of project 1, on the subject of `event`.
async fn publish_push(publisher: &Publisher, event: &str, n: u64) {
    publisher
        .publish(
            names::push_subject(1, event),
            &branch_push(1, "m", &sha(n)),
            &EventMeta::fresh("c"),
        )
        .await
        .unwrap();
}

fn slow(takes: Duration) -> Slow {
    Slow {
        takes,
        handled: Arc::default(),
        most_delivered: Arc::default(),
    }
}

// A handler that runs three times its ack_wait is not redelivered while it
// runs (progress acks), so it uses one delivery.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_long_handler_keeps_its_message_with_progress_acks() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let mut spec = ConsumerSpec::new(names::STREAM_PUSHES, "long");
    spec.ack_wait = Duration::from_secs(1);
    let handler = slow(Duration::from_secs(3));
    let running = spawn_consumer(&js, spec, handler.clone());
    publish_push(&publisher, "long", 1).await;
    until("handled", || handler.handled_at_least(1)).await;
    tokio::time::sleep(Duration::from_millis(1500)).await;
    assert_eq!(handler.handled.load(Ordering::SeqCst), 1);
    assert_eq!(handler.most_delivered.load(Ordering::SeqCst), 1);
    running.stop().await;
}

// Deliveries used up by replicas that stalled holding a message (pulled,
// never acked). With the server's MaxDeliver as the limit, the message was
// then parked for good: never handled, never dead-lettered. Now the server
// keeps delivering and the client dead-letters it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_message_whose_deliveries_stalled_replicas_used_up_is_dead_lettered_not_lost() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let mut spec = ConsumerSpec::new(names::STREAM_PUSHES, "stalls");
    spec.ack_wait = Duration::from_millis(500);
    spec.max_deliver = 2;
    let durable = js
        .get_stream(names::STREAM_PUSHES)
        .await
        .unwrap()
        .create_consumer(spec.pull_config())
        .await
        .unwrap();
    publish_push(&publisher, "stall", 1).await;
    // Three replicas each pull it and freeze (ack_wait runs out).
    for _ in 0..3 {
        let mut batch = durable
            .fetch()
            .max_messages(1)
            .expires(Duration::from_secs(2))
            .messages()
            .await
            .unwrap();
        let msg = batch.next().await.expect("a delivery").unwrap();
        drop(msg);
        tokio::time::sleep(Duration::from_millis(700)).await;
    }
    let handler = slow(Duration::ZERO);
    let running = spawn_consumer(&js, spec, handler.clone());
    let dlq = js.get_stream(names::STREAM_DLQ).await.unwrap();
    until("dead-lettered", || {
        let dlq = dlq.clone();
        async move {
            let mut dlq = dlq;
            dlq.info().await.is_ok_and(|i| i.state.messages == 1)
        }
    })
    .await;
    assert_eq!(handler.handled.load(Ordering::SeqCst), 0);
    running.stop().await;
}

// A stopping replica hands back what it pulled but had not started, so
// another replica takes it at once instead of after ack_wait (30 s here).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stopping_replica_hands_its_unstarted_messages_back_at_once() {
    let nats = NatsServer::start();
    let (js, publisher) = pushes_bus(&nats).await;
    let mut spec = ConsumerSpec::new(names::STREAM_PUSHES, "handback");
    spec.ack_wait = Duration::from_secs(30);
    spec.concurrency = 2;
    let first = slow(Duration::from_millis(300));
    let running = spawn_consumer(&js, spec.clone(), first.clone());
    for n in 0..20u64 {
        publish_push(&publisher, &format!("hb-{n}"), n).await;
    }
    until("the first replica started", || first.handled_at_least(1)).await;
    running.stop().await;
    let second = slow(Duration::ZERO);
    let running = spawn_consumer(&js, spec, second.clone());
    let what = "all 20 handled long before ack_wait (30 s)";
    poll(
        what,
        Duration::from_secs(15),
        Duration::from_millis(50),
        async || {
            let handled = (
                first.handled.load(Ordering::SeqCst),
                second.handled.load(Ordering::SeqCst),
            );
            if handled.0 + handled.1 >= 20 {
                Ok(())
            } else {
                Err(format!("{} + {} handled", handled.0, handled.1))
            }
        },
    )
    .await;
    running.stop().await;
}
