//! The ref heads bucket stays bounded: deleted refs' heads expire (without
//! letting an older push bring them back), deleted agents' heads are purged
//! from the bucket and from every replica's memory, and per-pipeline refs
//! do not pile up. Real nats-server; notifiers as their own processes, so
//! each one's `pushbus_notifier_ref_heads` gauge is its own.

use std::net::SocketAddr;
use std::time::Duration;

use async_nats::jetstream::{self, kv};
use futures::StreamExt;
use prost::Message;
use pushbus_gitops_notifier::heads;
use pushbus_shared::heads::{HeadWriter, Pruning};
use pushbus_shared::names;
use pushbus_shared::proto::{
    AgentConfig, AgentPoke, ChangeKind, RefHead, ref_selector::Kind, watch_event::Event,
};
use pushbus_shared::testkit::{self, NatsServer, free_port};

use crate::guarantees::Process;
use crate::notifier::{agent, drain, pokes, sha, watch};
use crate::poll::until;
use crate::support::{Stack, local, push_stored};
use crate::topology::{metrics, setup};

const ZERO: &str = "0000000000000000000000000000000000000000";

fn poke(seq: u64, new_sha: &str, kind: ChangeKind) -> RefHead {
    RefHead {
        poke: Some(AgentPoke {
            agent_id: "pruned".into(),
            project_id: 7,
            r#ref: "refs/heads/gone".into(),
            new_sha: new_sha.into(),
            change_kind: kind as i32,
            push_sequence: seq,
            push_epoch: 1,
            ..Default::default()
        }),
        ..Default::default()
    }
}

/// Writes `poke(seq, new_sha, kind)` with `writer`: whether the head moved.
async fn moved(writer: &HeadWriter, seq: u64, new_sha: &str, kind: ChangeKind) -> bool {
    writer.record(&poke(seq, new_sha, kind)).await.unwrap()
}

/// The SHA of the head stored at `key`, if any.
async fn stored_sha(kv: &kv::Store, key: &str) -> Option<String> {
    let value = kv.get(key).await.unwrap()?;
    Some(
        RefHead::decode(value.as_ref())
            .unwrap()
            .poke
            .unwrap()
            .new_sha,
    )
}

async fn bucket(nats: &NatsServer, marker_ttl: Option<Duration>) -> kv::Store {
    let js = jetstream::new(testkit::client(nats).await);
    js.create_or_update_key_value(kv::Config {
        limit_markers: marker_ttl.or(pushbus_shared::topology::ref_heads_bucket().limit_markers),
        ..pushbus_shared::topology::ref_heads_bucket()
    })
    .await
    .unwrap()
}

/// Keys of the bucket that hold a head (markers left out).
async fn live_keys(kv: &kv::Store) -> Vec<String> {
    let mut keys = kv.keys().await.unwrap();
    let mut out = Vec::new();
    while let Some(k) = keys.next().await {
        out.push(k.unwrap());
    }
    out
}

// A branch deleted at push 200: the push at 150 that comes back late (a
// filter replica died holding it) must not bring it back; the tombstone
// expires after its TTL and leaves nothing a new replica loads.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_branch_leaves_no_head_and_a_late_older_push_does_not_resurrect_it() {
    let nats = NatsServer::start();
    let kv = bucket(&nats, Some(Duration::from_secs(1))).await;
    let js = jetstream::new(testkit::client(&nats).await);
    let pruning = Pruning {
        deleted_ref_ttl: Duration::from_secs(2),
        ..Default::default()
    };
    let (a, b) = (
        HeadWriter::new(kv.clone(), js.clone(), pruning),
        HeadWriter::new(kv.clone(), js.clone(), pruning),
    );
    assert!(moved(&a, 100, &sha(1), ChangeKind::Update).await);
    assert!(moved(&b, 200, ZERO, ChangeKind::Delete).await);
    // `a` still remembers its own write at 100; the bucket says 200.
    assert!(
        !moved(&a, 150, &sha(2), ChangeKind::Update).await,
        "an older push overwrote the deletion"
    );
    let key = format!("pruned.{}", heads::ref_key(7, "refs/heads/gone"));
    assert_eq!(
        stored_sha(&kv, &key).await.as_deref(),
        Some(ZERO),
        "the tombstone is the head"
    );

    // The server expires the tombstone, then its marker.
    until("the tombstone expires", || async {
        kv.get(&key).await.unwrap().is_none()
    })
    .await;
    let (index, _) = heads::load(&kv).await.unwrap();
    assert_eq!(index.len(), 0, "an expired tombstone was loaded");
    until("the bucket is empty", || async {
        kv.stream.clone().info().await.unwrap().state.messages == 0
    })
    .await;
    // A ref created again later is an ordinary head.
    assert!(moved(&b, 300, &sha(3), ChangeKind::Create).await);
    assert_eq!(live_keys(&kv).await, vec![key]);
}

// A ref-heads bucket made before tombstones expired (an older pushbus: no
// per-message TTLs) keeps working: the services report it as drift and
// leave it as it is, deletions still write tombstones (kept, not expired),
// and after `pushbus setup` a restarted filter's tombstones expire.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bucket_without_message_ttls_keeps_tombstones_until_setup_updates_it() {
    let nats = NatsServer::start();
    let js = jetstream::new(testkit::client(&nats).await);
    let kv = js
        .create_key_value(kv::Config {
            limit_markers: None,
            ..pushbus_shared::topology::ref_heads_bucket()
        })
        .await
        .unwrap();
    let allows_ttl = async || {
        let info = js
            .get_stream(format!("KV_{}", names::BUCKET_REF_HEADS))
            .await;
        info.unwrap().cached_info().config.allow_message_ttl
    };

    let stack = Stack::start(&nats.url()).await;
    let text = metrics(&stack).await;
    assert!(
        text.contains(r#"object="bucket pushbus-ref-heads",fields="limit_markers""#),
        "{text}"
    );
    stack.stop().await;
    assert!(
        !allows_ttl().await,
        "a service rewrote the operator's bucket"
    );

    let pruning = Pruning {
        deleted_ref_ttl: Duration::from_secs(1),
        ..Default::default()
    };
    let key = format!("pruned.{}", heads::ref_key(7, "refs/heads/gone"));
    let old = HeadWriter::new(kv.clone(), js.clone(), pruning);
    assert!(moved(&old, 100, &sha(1), ChangeKind::Create).await);
    assert!(moved(&old, 200, ZERO, ChangeKind::Delete).await);
    // Five times the TTL the writer would have given it.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(
        stored_sha(&kv, &key).await.as_deref(),
        Some(ZERO),
        "the tombstone was lost"
    );

    setup(&nats.url(), &[]);
    assert!(allows_ttl().await, "setup left the bucket without TTLs");
    let kv = js.get_key_value(names::BUCKET_REF_HEADS).await.unwrap();
    let restarted = HeadWriter::new(kv.clone(), js.clone(), pruning);
    assert!(moved(&restarted, 300, &sha(2), ChangeKind::Create).await);
    assert!(moved(&restarted, 400, ZERO, ChangeKind::Delete).await);
    until("the tombstone written after setup expires", || async {
        kv.get(&key).await.unwrap().is_none()
    })
    .await;
}

/// hook-ingest, filter (with `filter_flags`) and `notifiers` notifiers, each
/// its own process.
struct Pipeline {
    nats: NatsServer,
    ingest: SocketAddr,
    notifiers: Vec<(SocketAddr, Process)>,
    _others: Vec<Process>,
}

impl Pipeline {
    async fn start(
        notifiers: usize,
        notifier_flags: &[&str],
        filter_flags: &[&str],
        marker_ttl: Option<Duration>,
    ) -> Self {
        let nats = NatsServer::start();
        bucket(&nats, marker_ttl).await;
        let url = nats.url();
        let ingest = local(free_port());
        let i = Process::start(
            &url,
            "hook-ingest",
            &["--ingest-listen", &ingest.to_string()],
        )
        .await;
        let f = Process::start(&url, "filter", filter_flags).await;
        let mut ns = Vec::new();
        for _ in 0..notifiers {
            let listen = local(free_port());
            let mut flags = vec!["--notifier-listen".to_owned(), listen.to_string()];
            flags.extend(notifier_flags.iter().map(|s| s.to_string()));
            let flags: Vec<&str> = flags.iter().map(String::as_str).collect();
            ns.push((
                listen,
                Process::start(&url, "gitops-notifier", &flags).await,
            ));
        }
        Pipeline {
            nats,
            ingest,
            notifiers: ns,
            _others: vec![i, f],
        }
    }

    async fn push(&self, project_id: i64, lines: &[(&str, &str, &str)]) {
        let changes: String = lines
            .iter()
            .map(|(old, new, r)| format!("{old} {new} {r}\n"))
            .collect();
        let body = serde_json::json!({
            "gl_repository": format!("project-{project_id}"),
            "identifier": "user-1",
            "changes": changes,
        });
        push_stored(self.ingest, &body).await;
    }

    async fn agents(&self) -> kv::Store {
        jetstream::new(testkit::client(&self.nats).await)
            .get_key_value(names::BUCKET_AGENTS)
            .await
            .unwrap()
    }

    async fn heads(&self) -> kv::Store {
        jetstream::new(testkit::client(&self.nats).await)
            .get_key_value(names::BUCKET_REF_HEADS)
            .await
            .unwrap()
    }
}

async fn register(agents: &kv::Store, agent_id: &str, project_id: i64, kind: Kind) {
    let cfg = AgentConfig {
        agent_id: agent_id.into(),
        watches: vec![crate::fixtures::watch_of(project_id, kind)],
        public: true,
        ..Default::default()
    };
    pushbus_filter::put_agent(agents, &cfg).await.unwrap();
}

/// The heads a notifier process holds in memory, from its /metrics.
async fn heads_in_memory(p: &Process) -> Option<f64> {
    let text = reqwest::get(format!("http://{}/metrics", p.ops()))
        .await
        .ok()?
        .text()
        .await
        .ok()?;
    text.lines()
        .find_map(|l| l.strip_prefix("pushbus_notifier_ref_heads "))
        .and_then(|v| v.trim().parse().ok())
}

async fn memory_is(p: &Process, want: f64, what: &str) {
    until(what, || async { heads_in_memory(p).await == Some(want) }).await;
}

// An agent with heads on three branches is deleted from the registry: its
// heads leave the bucket and the memory of both replicas (whichever purged
// them), and the agent registered again under the same name is given
// nothing old, whatever cursor it brings.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_agents_heads_are_gone_from_the_bucket_and_every_replica() {
    let p = Pipeline::start(2, &[], &[], None).await;
    let agents = p.agents().await;
    register(&agents, "doomed", 61, Kind::AnyBranch).await;
    register(&agents, "keeper", 61, Kind::AnyBranch).await;
    let old = "1".repeat(40);
    for (n, branch) in ["a", "b", "c"].iter().enumerate() {
        p.push(
            61,
            &[(&old, &sha(n as u64 + 1), &format!("refs/heads/{branch}"))],
        )
        .await;
    }
    // Three refs for each of two agents, on both replicas.
    for (_, n) in &p.notifiers {
        memory_is(n, 6.0, "both replicas hold six heads").await;
    }
    let mut live = watch(p.notifiers[1].0, agent("doomed", Some(0))).await;
    let before = drain(&mut live, Duration::from_secs(2)).await;
    assert_eq!(pokes(&before).len(), 3);
    let cursor = before.last().unwrap().cursor;

    agents.delete("doomed").await.unwrap();
    let kv = p.heads().await;
    until("the bucket holds no head of the deleted agent", || async {
        live_keys(&kv)
            .await
            .iter()
            .all(|k| !k.starts_with("doomed."))
    })
    .await;
    for (_, n) in &p.notifiers {
        memory_is(n, 3.0, "each replica keeps only the other agent's heads").await;
    }
    assert_eq!(live_keys(&kv).await.len(), 3, "the other agent lost heads");

    register(&agents, "doomed", 61, Kind::AnyBranch).await;
    for since in [Some(0), Some(cursor), None] {
        let mut again = watch(p.notifiers[0].0, agent("doomed", since)).await;
        let got = drain(&mut again, Duration::from_secs(1)).await;
        assert!(pokes(&got).is_empty(), "since {since:?}: old heads {got:?}");
    }
    // Still live for what comes next.
    let mut again = watch(p.notifiers[0].0, agent("doomed", None)).await;
    p.push(61, &[(&old, &sha(9), "refs/heads/a")]).await;
    let got = drain(&mut again, Duration::from_secs(2)).await;
    assert_eq!(pokes(&got), vec![("refs/heads/a".into(), sha(9))]);
}

// A heads sweep catches what the registry watch cannot: heads written for
// an agent that is not registered (a poke in flight while it was deleted).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_of_unregistered_agents_are_swept() {
    let p = Pipeline::start(1, &["--notifier-prune-interval-secs", "1"], &[], None).await;
    let kv = p.heads().await;
    let js = jetstream::new(testkit::client(&p.nats).await);
    let writer = HeadWriter::new(kv.clone(), js, Pruning::default());
    let mut orphan = poke(5, &sha(5), ChangeKind::Update);
    if let Some(poke) = orphan.poke.as_mut() {
        poke.agent_id = "never-registered".into();
    }
    assert!(writer.record(&orphan).await.unwrap());
    until("the orphan head is swept", || async {
        live_keys(&kv).await.is_empty()
    })
    .await;
    memory_is(&p.notifiers[0].1, 0.0, "the replica forgot the orphan").await;
}

// GitLab creates and deletes refs/pipelines/<id> for every pipeline: an
// agent watching any ref gets poked for each, and the bucket and every
// replica's memory end empty once the tombstones' TTL (and their markers')
// has passed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pipeline_refs_do_not_pile_up() {
    let p = Pipeline::start(
        2,
        &[],
        &["--filter-deleted-ref-ttl-secs", "2"],
        Some(Duration::from_secs(1)),
    )
    .await;
    let agents = p.agents().await;
    register(&agents, "runner", 62, Kind::AnyRef).await;
    let mut live = watch(p.notifiers[0].0, agent("runner", Some(0))).await;
    let zero = "0".repeat(40);
    let old = "1".repeat(40);
    for n in 1..=20u64 {
        let r = format!("refs/pipelines/{n}");
        p.push(62, &[(&zero, &sha(n), &r)]).await;
        p.push(62, &[(&sha(n), &zero, &r)]).await;
    }
    p.push(62, &[(&old, &sha(99), "refs/heads/main")]).await;
    // Every deletion reached the agent as a poke of its own.
    let mut deleted = 0;
    let mut cursor = 0;
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    while deleted < 20 {
        assert!(
            std::time::Instant::now() < deadline,
            "{deleted} of 20 deletions poked"
        );
        let got = drain(&mut live, Duration::from_millis(500)).await;
        cursor = got.last().map_or(cursor, |e| e.cursor);
        deleted += got
            .iter()
            .filter(|e| matches!(&e.event, Some(Event::Poke(p)) if p.new_sha == zero))
            .count();
    }
    let kv = p.heads().await;
    until("only the branch's head is left", || async {
        live_keys(&kv).await.len() == 1
    })
    .await;
    for (_, n) in &p.notifiers {
        memory_is(n, 1.0, "each replica holds only the branch's head").await;
    }
    until("the expiry markers are gone too", || async {
        kv.stream.clone().info().await.unwrap().state.messages == 1
    })
    .await;
    drop(live);
    // Told to poll when it comes back from before deletions it can no
    // longer be shown; given nothing when it had them all.
    let told = |events: &[pushbus_shared::proto::WatchEvent]| {
        events.iter().any(|e| {
            matches!(&e.event, Some(Event::Status(s)) if s.detail.contains("refs were removed"))
        })
    };
    let mut old = watch(p.notifiers[1].0, agent("runner", Some(1))).await;
    assert!(told(&drain(&mut old, Duration::from_secs(1)).await));
    let mut current = watch(p.notifiers[1].0, agent("runner", Some(cursor))).await;
    let got = drain(&mut current, Duration::from_secs(1)).await;
    assert!(!told(&got) && pokes(&got).is_empty(), "{got:?}");
}
