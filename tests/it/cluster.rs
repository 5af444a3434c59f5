//! pushbus on a 3-node JetStream cluster (loopback, R3): scaling R1 to R3
//! in place, SIGKILL of the node leading each stream under steady pushes,
//! a rolling restart, and starting with one node down.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream;
use futures::StreamExt;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, GitPushEvent};
use pushbus_shared::testkit::{NatsCluster, stream_leader};
use tokio_util::sync::CancellationToken;

use crate::fixtures::stream_info;
use crate::poll::{poll, until_ok};
use crate::support::{SseReader, Stack, StackOptions};
use crate::topology::{metrics, setup, stream_config};

const REFS: usize = 4;

/// Services told the cluster's replica count, as in production.
fn replicated() -> StackOptions {
    StackOptions {
        replicas: 3,
        ..Default::default()
    }
}
/// hook-ingest answers within its 2 s store timeout; the hook waits 3 s.
const HOOK_DEADLINE: Duration = Duration::from_secs(3);

/// Short request timeouts: a request lost with a killed node is retried
/// soon, so leader changes are seen when they happen.
async fn js(cluster: &NatsCluster) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_millis(1000))
        .build(cluster.client().await.unwrap())
}

async fn register(js: &jetstream::Context, agent_id: &str, project: i64) {
    let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
    let cfg = AgentConfig {
        agent_id: agent_id.into(),
        watches: vec![crate::fixtures::any_branch_of(project)],
        // No token: the agent's stream is opened without one.
        public: true,
        ..Default::default()
    };
    pushbus_filter::put_agent(&kv, &cfg).await.unwrap();
}

/// Newest SHA per ref among the pushes stored in PUSHBUS_PUSHES, and every
/// stored SHA. Retried: right after a fault the cluster may still be settling.
async fn stored_heads(js: &jetstream::Context) -> (HashMap<String, String>, Vec<String>) {
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(5))
        .build(js.client());
    poll(
        "read of PUSHBUS_PUSHES",
        Duration::from_secs(60),
        Duration::from_millis(500),
        async || try_stored_heads(&js).await.map_err(|e| e.to_string()),
    )
    .await
}

async fn try_stored_heads(
    js: &jetstream::Context,
) -> Result<(HashMap<String, String>, Vec<String>), async_nats::Error> {
    let stream = js.get_stream(names::STREAM_PUSHES).await?;
    let count = stream.get_info().await?.state.messages as usize;
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig::default())
        .await?;
    let mut messages = consumer.messages().await?.take(count);
    let mut heads: HashMap<String, String> = HashMap::new();
    let mut all = Vec::new();
    while let Some(m) = messages.next().await {
        let env = pushbus_shared::envelope::decode(&m?.payload)?;
        let push: GitPushEvent = pushbus_shared::envelope::open(&env)?;
        for change in push.changes {
            all.push(change.new_sha.clone());
            let e = heads.entry(change.r#ref.clone()).or_default();
            if change.new_sha > *e {
                *e = change.new_sha;
            }
        }
    }
    Ok((heads, all))
}

/// One push's fate, as the hook would see it.
struct Sent {
    at: Instant,
    sha: String,
    status: u16,
    took: Duration,
    /// The refusal's reason, for the figures.
    reason: String,
}

/// Pushes to project 42, round-robin over REFS branches with ever larger
/// SHAs, every `every`, until `stop`.
fn pusher(
    ingest: std::net::SocketAddr,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sent>> {
    tokio::spawn(async move {
        let http = reqwest::Client::builder()
            .timeout(Duration::from_secs(10))
            .build()
            .unwrap();
        let mut sent = Vec::new();
        let mut i = 0u64;
        while !stop.is_cancelled() {
            i += 1;
            let sha = format!("{i:040x}");
            let body = serde_json::json!({
                "gl_repository": "project-42",
                "identifier": "user-1",
                "changes": format!("{} {sha} refs/heads/b{}", "0".repeat(40), i as usize % REFS),
            });
            let at = Instant::now();
            let (status, reason) = match http
                .post(format!("http://{ingest}/api/v4/internal/post_receive"))
                .json(&body)
                .send()
                .await
            {
                Ok(r) => {
                    let status = r.status().as_u16();
                    let text = if status == 200 {
                        String::new()
                    } else {
                        r.text().await.unwrap_or_default()
                    };
                    (status, text)
                }
                Err(e) => (0, e.to_string()),
            };
            sent.push(Sent {
                at,
                sha,
                status,
                took: at.elapsed(),
                reason,
            });
            tokio::time::sleep(every).await;
        }
        sent
    })
}

/// Follows an SSE agent, reconnecting with its cursor; keeps the newest SHA
/// poked per ref.
fn agent(
    url: String,
    seen: Arc<Mutex<HashMap<String, String>>>,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<()> {
    tokio::spawn(async move {
        let mut cursor: Option<String> = None;
        while !stop.is_cancelled() {
            let full = match &cursor {
                Some(c) => format!("{url}?since={c}"),
                None => url.clone(),
            };
            let Ok(resp) = reqwest::Client::new().get(&full).send().await else {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            };
            if !resp.status().is_success() {
                tokio::time::sleep(Duration::from_millis(200)).await;
                continue;
            }
            let mut sse = SseReader::new(resp);
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => return,
                    e = sse.next_event(Duration::from_secs(3600)) => e,
                };
                let Some((event, data)) = next else { break };
                if let Some(id) = &sse.last_id {
                    cursor = Some(id.clone());
                }
                if event == "poke" {
                    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
                    let r = poke["ref"].as_str().unwrap_or_default().to_owned();
                    let sha = poke["new_sha"].as_str().unwrap_or_default().to_owned();
                    let mut seen = seen.lock().unwrap();
                    let e = seen.entry(r).or_default();
                    // The agent keeps the newest it heard of.
                    if sha > *e {
                        *e = sha;
                    }
                }
            }
        }
    })
}

/// What a fault did to the pushes.
#[derive(Debug)]
#[allow(dead_code)] // printed, not all asserted
struct Figures {
    pushes: usize,
    refused: usize,
    /// Longest run of refused pushes: first refused to the next accepted.
    refused_window: Duration,
    slowest_answer: Duration,
}

fn figures(sent: &[Sent]) -> Figures {
    let mut refused_window = Duration::ZERO;
    let mut run_start: Option<Instant> = None;
    for s in sent {
        match (s.status == 200, run_start) {
            (false, None) => run_start = Some(s.at),
            (true, Some(start)) => {
                refused_window = refused_window.max(s.at - start);
                run_start = None;
            }
            _ => {}
        }
    }
    if let (Some(start), Some(last)) = (run_start, sent.last()) {
        refused_window = refused_window.max(last.at + last.took - start);
    }
    Figures {
        pushes: sent.len(),
        refused: sent.iter().filter(|s| s.status != 200).count(),
        refused_window,
        slowest_answer: sent.iter().map(|s| s.took).max().unwrap_or_default(),
    }
}

/// Steady pushes through a stack on the cluster while `fault` runs; then
/// checks that no acked push is lost, that pushes were accepted again, that
/// the agent ends on the newest SHA of every ref, and that pushes were
/// refused for less than `WINDOW_BOUND`.
async fn under_steady_pushes<F, Fut>(name: &str, fault: F)
where
    F: FnOnce(Arc<Mutex<NatsCluster>>, jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    under_steady_pushes_scaled(name, Scaled::BySetup, fault).await
}

/// How the cluster's streams came to R3.
#[derive(Clone, Copy)]
enum Scaled {
    /// `pushbus setup --replicas 3`, services told `--replicas 3`.
    BySetup,
    /// Created at R1 by services with the default `--replicas 1`, then every
    /// stream and bucket raised to R3 by an operator (`nats stream edit`),
    /// consumers left alone.
    ByHand,
}

async fn under_steady_pushes_scaled<F, Fut>(name: &str, scaled: Scaled, fault: F)
where
    F: FnOnce(Arc<Mutex<NatsCluster>>, jetstream::Context) -> Fut,
    Fut: std::future::Future<Output = ()>,
{
    let cluster = NatsCluster::start(3);
    cluster.wait_ready().await;
    let urls = cluster.urls();
    let js = js(&cluster).await;
    let stack = match scaled {
        Scaled::BySetup => {
            setup(&urls, &["--replicas", "3"]);
            register(&js, "agent-c", 42).await;
            Stack::start_with(&urls, replicated()).await
        }
        Scaled::ByHand => {
            setup(&urls, &[]);
            scale_streams_by_hand(&js, 3).await;
            register(&js, "agent-c", 42).await;
            Stack::start(&urls).await
        }
    };

    let agent_stop = CancellationToken::new();
    let push_stop = CancellationToken::new();
    let seen = Arc::new(Mutex::new(HashMap::new()));
    let agent = agent(
        format!("http://{}/v1/agents/agent-c/pokes", stack.notifier),
        seen.clone(),
        agent_stop.clone(),
    );
    let pushing = pusher(stack.ingest, Duration::from_millis(50), push_stop.clone());
    tokio::time::sleep(Duration::from_secs(2)).await;

    let cluster = Arc::new(Mutex::new(cluster));
    fault(cluster.clone(), js.clone()).await;

    // Pushes must be accepted again after the fault.
    tokio::time::sleep(Duration::from_secs(3)).await;
    push_stop.cancel();
    let sent = pushing.await.unwrap();
    let f = figures(&sent);
    let mut reasons: HashMap<String, usize> = HashMap::new();
    for s in sent.iter().filter(|s| s.status != 200) {
        *reasons
            .entry(format!("{} {}", s.status, s.reason))
            .or_default() += 1;
    }
    eprintln!("{name}: {f:?} refusals: {reasons:?}");
    let tail: Vec<u16> = sent.iter().rev().take(10).map(|s| s.status).collect();
    assert!(
        tail.iter().all(|s| *s == 200),
        "{name}: not accepting pushes again: {tail:?}"
    );
    assert!(
        f.slowest_answer < HOOK_DEADLINE,
        "{name}: a push was answered after {:?}",
        f.slowest_answer
    );

    // No acked push is lost.
    let (heads, all) = stored_heads(&js).await;
    for s in sent.iter().filter(|s| s.status == 200) {
        assert!(all.contains(&s.sha), "{name}: acked push {} lost", s.sha);
    }
    assert_eq!(heads.len(), REFS);

    // Every ref ends on its newest stored SHA at the agent.
    let what = format!("{name}: the agent on the newest SHAs {heads:?}");
    until_ok(&what, async || {
        let now = seen.lock().unwrap().clone();
        if heads.iter().all(|(r, sha)| now.get(r) == Some(sha)) {
            Ok(())
        } else {
            Err(format!("have {now:?}"))
        }
    })
    .await;
    agent_stop.cancel();
    let _ = agent.await;
    stack.stop().await;
    assert!(f.refused_window < WINDOW_BOUND, "{f:?}");
}

/// SIGKILLs the node leading `stream`, waits for a new leader, starts the
/// node again.
async fn kill_leader_of(cluster: Arc<Mutex<NatsCluster>>, js: jetstream::Context, stream: &str) {
    let leader = stream_leader(&js, stream).await.expect("a leader");
    let i = NatsCluster::index_of(&leader).unwrap();
    cluster.lock().unwrap().nodes[i].kill();
    let killed = Instant::now();
    let what = format!("new leader for {stream}");
    let new = until_ok(&what, async || {
        let now = stream_leader(&js, stream).await;
        now.clone()
            .filter(|l| *l != leader)
            .ok_or_else(|| format!("leader {now:?}"))
    })
    .await;
    eprintln!("{stream}: new leader {new} after {:?}", killed.elapsed());
    tokio::time::sleep(Duration::from_secs(3)).await;
    cluster.lock().unwrap().nodes[i].start_again();
}

const WINDOW_BOUND: Duration = Duration::from_secs(10);

/// What `nats stream edit --replicas N` does to every stream and bucket:
/// the stream configuration only. Waits until every replica is current.
async fn scale_streams_by_hand(js: &jetstream::Context, replicas: usize) {
    let mut names_ = js.stream_names();
    let mut all = Vec::new();
    while let Some(n) = names_.next().await {
        all.push(n.unwrap());
    }
    for n in &all {
        let mut cfg = stream_config(js, n).await;
        cfg.num_replicas = replicas;
        js.update_stream(&cfg).await.unwrap();
    }
    let what = format!("every stream at R{replicas}");
    until_ok(&what, async || {
        for n in &all {
            if current_peers(js, n).await != Some(replicas) {
                return Err(format!("{n} is not"));
            }
        }
        Ok(())
    })
    .await;
}

/// How many nodes hold `stream` (leader and replicas), if it has a leader
/// and every replica is current.
async fn current_peers(js: &jetstream::Context, stream: &str) -> Option<usize> {
    let cluster = js
        .get_stream(stream)
        .await
        .ok()?
        .info()
        .await
        .ok()?
        .cluster
        .clone()?;
    (cluster.leader.is_some() && cluster.replicas.iter().all(|r| r.current))
        .then(|| 1 + cluster.replicas.len())
}

/// The cluster view of `consumer` on `stream`: its leader and replicas.
async fn consumer_cluster(
    js: &jetstream::Context,
    stream: &str,
    consumer: &str,
) -> Option<jetstream::stream::ClusterInfo> {
    let stream = js.get_stream(stream).await.ok()?;
    let mut c: jetstream::consumer::PullConsumer = stream.get_consumer(consumer).await.ok()?;
    c.info().await.ok()?.cluster.clone()
}

/// How many nodes hold `consumer` on `stream` (its leader and replicas).
async fn consumer_peers(js: &jetstream::Context, stream: &str, consumer: &str) -> Option<usize> {
    let cluster = consumer_cluster(js, stream, consumer).await?;
    Some(usize::from(cluster.leader.is_some()) + cluster.replicas.len())
}

/// Seen on a cluster whose streams an operator raised to R3 by hand: after
/// a node died, filter matched every push but no agent was poked again.
/// Consumers pinned to their replica count at creation stayed R1 and died
/// with their node; consumers that inherit the stream's replicas follow it
/// to R3 and survive. The node holding filter's consumer (the one durable
/// consumer between a push and its ref head) stays down to the end.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_scaled_by_hand_survives_the_loss_of_a_consumers_node() {
    under_steady_pushes_scaled(
        "node loss after scaling by hand",
        Scaled::ByHand,
        |c, js| async move {
            let cluster = consumer_cluster(&js, names::STREAM_PUSHES, names::CONSUMER_FILTER).await;
            eprintln!(
                "PUSHBUS_PUSHES/filter: {:?}",
                cluster
                    .as_ref()
                    .map(|c| (c.leader.clone(), c.replicas.len()))
            );
            let leader = cluster
                .and_then(|c| c.leader)
                .expect("filter's consumer has a leader");
            let i = NatsCluster::index_of(&leader).unwrap();
            c.lock().unwrap().nodes[i].kill();
            eprintln!("killed {leader}, filter's consumer leader");
            tokio::time::sleep(Duration::from_secs(10)).await;
        },
    )
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_pushes_leader_sigkill_loses_no_acked_push() {
    under_steady_pushes("PUSHBUS_PUSHES leader kill", |c, js| async move {
        kill_leader_of(c, js, names::STREAM_PUSHES).await
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_kv_leaders_sigkill_agents_end_on_newest() {
    under_steady_pushes("KV leaders kill", |c, js| async move {
        kill_leader_of(c.clone(), js.clone(), names::STREAM_REF_HEADS).await;
        kill_leader_of(c, js, "KV_pushbus-agents").await;
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_rolling_restart_loses_nothing() {
    under_steady_pushes("rolling restart", |c, js| async move {
        for i in 0..3 {
            c.lock().unwrap().nodes[i].restart();
            // Let the node catch up before the next goes down.
            let what = format!("node n{i} caught up");
            until_ok(&what, async || {
                for s in [names::STREAM_PUSHES, names::STREAM_REF_HEADS] {
                    if current_peers(&js, s).await.is_none() {
                        return Err(format!("{s} has replicas behind"));
                    }
                }
                Ok(())
            })
            .await;
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cluster_setup_scales_r1_to_r3_and_services_start_with_a_node_down() {
    let mut cluster = NatsCluster::start(3);
    cluster.wait_ready().await;
    let urls = cluster.urls();
    setup(&urls, &[]);
    let js = js(&cluster).await;
    let ack = js
        .publish(names::push_subject(1, "e1"), "before".into())
        .await
        .unwrap()
        .await
        .unwrap();
    let stream = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    assert_eq!(stream.cached_info().config.num_replicas, 1);

    setup(&urls, &["--replicas", "3"]);
    let mut names_ = js.stream_names();
    let mut all = Vec::new();
    while let Some(n) = names_.next().await {
        all.push(n.unwrap());
    }
    assert!(all.len() >= 8, "{all:?}");
    for n in &all {
        let info = stream_info(&js, n).await;
        assert_eq!(info.config.num_replicas, 3, "{n}");
    }
    // Consumers follow their streams (they inherit the replica count).
    for (stream, consumer) in [
        (names::STREAM_PUSHES, names::CONSUMER_FILTER),
        (names::STREAM_WEBHOOKS, names::CONSUMER_NOTIFIER_WEBHOOKS),
    ] {
        let what = format!("{stream}/{consumer} on 3 peers");
        poll(
            &what,
            Duration::from_secs(20),
            Duration::from_millis(200),
            async || match consumer_peers(&js, stream, consumer).await {
                Some(3) => Ok(()),
                peers => Err(format!("{peers:?} peers")),
            },
        )
        .await;
    }
    // Scaled in place: the message is still there, same sequence.
    let stream = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    let msg = stream.get_raw_message(ack.sequence).await.unwrap();
    assert_eq!(&msg.payload[..], b"before");

    // One node down: services still start, pushes are stored, and the R3
    // configuration is kept (services only report the difference from
    // their default of 1).
    cluster.nodes[2].kill();
    let stack = Stack::start(&urls).await;
    let body = serde_json::json!({
        "gl_repository": "project-42",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main", "0".repeat(40), "a".repeat(40)),
    });
    poll(
        "push stored with a node down",
        Duration::from_secs(20),
        Duration::from_millis(200),
        async || match stack.post_receive(&body, &[]).await.status() {
            reqwest::StatusCode::OK => Ok(()),
            status => Err(format!("answered {status}")),
        },
    )
    .await;
    let js2 = jetstream::new(async_nats::connect(cluster.nodes[0].url()).await.unwrap());
    let info = stream_info(&js2, names::STREAM_PUSHES).await;
    assert_eq!(info.config.num_replicas, 3);
    let text = metrics(&stack).await;
    assert!(
        text.contains(r#"object="stream PUSHBUS_WEBHOOKS",fields="num_replicas""#),
        "{text}"
    );
    stack.stop().await;
}

/// What a leader change can do to an ephemeral consumer without the client
/// noticing: it is gone. The notifier's ref-heads feed must rebuild itself
/// and keep poking a connected agent, with no reconnect on either side.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_heads_feed_recovers_when_its_consumer_vanishes() {
    let nats = pushbus_shared::testkit::NatsServer::start();
    crate::support::register(&nats, "agent-v", [42].into_iter()).await;
    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}/v1/agents/agent-v/pokes", stack.notifier);
    let mut sse = SseReader::new(SseReader::connect(&url, None).await);
    assert_eq!(
        sse.next_event(Duration::from_secs(10)).await.unwrap().0,
        "status"
    );
    let push = |sha: String| {
        serde_json::json!({
            "gl_repository": "project-42",
            "identifier": "user-1",
            "changes": format!("{} {sha} refs/heads/main", "0".repeat(40)),
        })
    };
    assert_eq!(
        stack
            .post_receive(&push("a".repeat(40)), &[])
            .await
            .status(),
        200
    );
    let (_, data) = sse
        .next_event(Duration::from_secs(10))
        .await
        .expect("first poke");
    assert!(data.contains(&"a".repeat(40)), "{data}");

    let js = jetstream::new(pushbus_shared::testkit::client(&nats).await);
    let stream = js.get_stream(names::STREAM_REF_HEADS).await.unwrap();
    let mut names = stream.consumer_names();
    let mut deleted = 0;
    while let Some(name) = names.next().await {
        stream.delete_consumer(&name.unwrap()).await.unwrap();
        deleted += 1;
    }
    assert!(deleted > 0, "no feed consumer found");

    assert_eq!(
        stack
            .post_receive(&push("b".repeat(40)), &[])
            .await
            .status(),
        200
    );
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let (event, data) = sse
            .next_event(left)
            .await
            .expect("no poke after the feed's consumer vanished");
        if event == "poke" && data.contains(&"b".repeat(40)) {
            break;
        }
    }
    stack.stop().await;
}
