//! filter against a real nats-server: replicas and restarts never lose or
//! double a ref head (the poke an agent is sent).

use std::collections::HashSet;
use std::time::Duration;

use prost::Message;
use pushbus_shared::bus::Publisher;
use pushbus_shared::proto::{
    AgentConfig, AgentRegistryReply, AgentRegistryRequest, ChangeKind, GitPushEvent, RefChange,
    RefKind, RefSelector, Source, Watch, ref_selector::Kind,
};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::{EventMeta, names};

use crate::poll::{eventually, poll};
use crate::support::{Replica, register, stored_heads};

/// Publishes pushes `range` (project = 1 + i % 20, each to a branch of its
/// own, so every head stays in the bucket) and returns the head IDs they
/// must yield: agent-a watches every project, agent-b only project 1.
async fn publish(publisher: &Publisher, range: std::ops::Range<u32>) -> HashSet<String> {
    let mut expected = HashSet::new();
    for i in range {
        let project = 1 + (i % 20) as i64;
        let branch = format!("refs/heads/b{i}");
        let push = GitPushEvent {
            project_id: project,
            changes: vec![RefChange {
                old_sha: "1".repeat(40),
                new_sha: format!("{i:040x}"),
                r#ref: branch.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        let meta = EventMeta::deterministic("c", &[&i.to_string()]);
        publisher
            .publish(names::push_subject(project, "test"), &push, &meta)
            .await
            .unwrap();
        for agent in ["agent-a", "agent-b"] {
            if agent == "agent-a" || project == 1 {
                expected.insert(EventMeta::derived_from(&meta, &[agent, &branch]).event_id);
            }
        }
    }
    expected
}

async fn head_ids(nats: &NatsServer) -> (Vec<String>, u64) {
    let (heads, writes) = stored_heads(nats).await;
    (heads.into_iter().map(|h| h.event_id).collect(), writes)
}

/// Every expected head written, each once.
async fn heads_once(nats: &NatsServer, expected: &HashSet<String>) {
    let what = format!("{} heads", expected.len());
    let ids = poll(
        &what,
        Duration::from_secs(15),
        Duration::from_millis(50),
        async || {
            let ids = head_ids(nats).await.0;
            if ids.len() >= expected.len() {
                Ok(ids)
            } else {
                Err(format!("{ids:?}"))
            }
        },
    )
    .await;
    // Settle: late rewrites would show up now.
    tokio::time::sleep(Duration::from_millis(300)).await;
    let (again, writes) = head_ids(nats).await;
    assert_eq!(again.len(), ids.len(), "heads kept coming");
    assert_eq!(writes, ids.len() as u64, "a head was written twice");
    let unique: HashSet<String> = ids.iter().cloned().collect();
    assert_eq!(&unique, expected, "missing or unexpected heads");
}

async fn setup(nats: &NatsServer) -> Publisher {
    register(nats, "agent-a", 1..=20).await;
    register(nats, "agent-b", 1..=1).await;
    let js = async_nats::jetstream::new(testkit::client(nats).await);
    pushbus_filter::topology(&crate::support::filter_config())
        .ensure(&js)
        .await
        .unwrap();
    Publisher::new(js, Source::default())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_on_one_consumer_lose_and_double_nothing() {
    let nats = NatsServer::start();
    let publisher = setup(&nats).await;
    let (r1, r2) = (
        Replica::filter(&nats.url()).await,
        Replica::filter(&nats.url()).await,
    );
    let expected = publish(&publisher, 0..200).await;
    assert_eq!(expected.len(), 210);
    heads_once(&nats, &expected).await;
    r1.stop().await;
    r2.stop().await;
}

// A replica stopped mid-stream leaves pulled pushes un-acked; they come back
// to the next replica after ack_wait (2 s here). This failed under CPU load
// when shutdown nak'ed such messages instead.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restart_mid_stream_yields_every_poke_exactly_once() {
    let nats = NatsServer::start();
    let publisher = setup(&nats).await;
    let first = Replica::filter(&nats.url()).await;
    let mut expected = publish(&publisher, 0..100).await;
    first.stop().await;
    // Pushes stored while no filter runs are handled after the restart.
    expected.extend(publish(&publisher, 100..150).await);
    let second = Replica::filter(&nats.url()).await;
    expected.extend(publish(&publisher, 150..200).await);
    heads_once(&nats, &expected).await;
    second.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_updates_apply_to_later_pushes() {
    let nats = NatsServer::start();
    let publisher = setup(&nats).await;
    let replica = Replica::filter(&nats.url()).await;
    let mut expected = publish(&publisher, 0..20).await;
    heads_once(&nats, &expected).await;
    // agent-c appears while the filter runs; its watch applies to later pushes.
    register(&nats, "agent-c", 1..=20).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
    // The watch is asynchronous: wait until a probe push pokes agent-c.
    let mut probe = 1000;
    loop {
        let meta = EventMeta::deterministic("probe", &[&probe.to_string()]);
        let branch = format!("refs/heads/probe{probe}");
        let push = GitPushEvent {
            project_id: 2,
            changes: vec![RefChange {
                old_sha: "1".repeat(40),
                new_sha: "2".repeat(40),
                r#ref: branch.clone(),
                ..Default::default()
            }],
            ..Default::default()
        };
        publisher
            .publish(names::push_subject(2, "test"), &push, &meta)
            .await
            .unwrap();
        expected.insert(EventMeta::derived_from(&meta, &["agent-a", &branch]).event_id);
        let c_id = EventMeta::derived_from(&meta, &["agent-c", &branch]).event_id;
        tokio::time::sleep(Duration::from_millis(100)).await;
        if head_ids(&nats).await.0.contains(&c_id) {
            expected.insert(c_id);
            break;
        }
        probe += 1;
        assert!(probe < 1050, "agent-c never matched");
    }
    // Deleting agent-b stops its pokes for later pushes.
    kv.delete("agent-b").await.unwrap();
    // KV watch updates land in milliseconds; a second is ample.
    tokio::time::sleep(Duration::from_secs(1)).await;
    for id in publish(&publisher, 20..40).await {
        expected.insert(id);
    }
    let c_expected: HashSet<String> = (20..40u32)
        .map(|i| {
            EventMeta::derived_from(
                &EventMeta::deterministic("c", &[&i.to_string()]),
                &["agent-c", &format!("refs/heads/b{i}")],
            )
            .event_id
        })
        .collect();
    let b_later: HashSet<String> = (20..40u32)
        .filter(|i| i % 20 == 0)
        .map(|i| {
            EventMeta::derived_from(
                &EventMeta::deterministic("c", &[&i.to_string()]),
                &["agent-b", &format!("refs/heads/b{i}")],
            )
            .event_id
        })
        .collect();
    expected.extend(c_expected);
    expected.retain(|id| !b_later.contains(id));
    heads_once(&nats, &expected).await;
    replica.stop().await;
}

async fn registry_request(
    client: &async_nats::Client,
    op: &str,
    req: &AgentRegistryRequest,
) -> AgentRegistryReply {
    let reply = client
        .request(names::agents_api_subject(op), req.encode_to_vec().into())
        .await
        .unwrap();
    AgentRegistryReply::decode(reply.payload.as_ref()).unwrap()
}

fn watcher(agent_id: &str, project_id: i64, paths: &[&str]) -> AgentConfig {
    AgentConfig {
        agent_id: agent_id.into(),
        watches: vec![Watch {
            paths: paths.iter().map(|p| p.to_string()).collect(),
            ..crate::fixtures::any_branch_of(project_id)
        }],
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_request_api_validates_writes_and_applies() {
    let nats = NatsServer::start();
    let publisher = setup(&nats).await;
    let replica = Replica::filter(&nats.url()).await;
    let client = testkit::client(&nats).await;
    let put = |cfg: AgentConfig, expected_revision: Option<u64>| AgentRegistryRequest {
        agent: Some(cfg),
        expected_revision,
        ..Default::default()
    };
    let by_id = |id: &str| AgentRegistryRequest {
        agent_id: id.into(),
        ..Default::default()
    };

    // Protobuf: create, then replace at the right revision only.
    let created = registry_request(&client, "put", &put(watcher("api-a", 7, &[]), Some(0))).await;
    assert_eq!(created.error, "");
    assert!(created.revision > 0);
    let again = registry_request(&client, "put", &put(watcher("api-a", 7, &[]), Some(0))).await;
    assert!(again.error.contains("cannot create"), "{}", again.error);
    let stale = registry_request(
        &client,
        "put",
        &put(watcher("api-a", 7, &[]), Some(created.revision + 100)),
    )
    .await;
    assert!(stale.error.contains("cannot replace"), "{}", stale.error);
    let replaced = registry_request(
        &client,
        "put",
        &put(watcher("api-a", 7, &["deploy/**"]), Some(created.revision)),
    )
    .await;
    assert_eq!(replaced.error, "");
    let got = registry_request(&client, "get", &by_id("api-a")).await;
    assert_eq!(got.revision, replaced.revision);
    assert_eq!(got.agent.unwrap().watches[0].paths, vec!["deploy/**"]);

    // Invalid configs and IDs are refused and nothing is written.
    for (cfg, why) in [
        (watcher("api-bad", 7, &["a{"]), "paths[0]"),
        (watcher("api.bad", 7, &[]), "agent_id"),
        (watcher("api-bad", 0, &[]), "project"),
    ] {
        let reply = registry_request(&client, "put", &put(cfg, None)).await;
        assert!(reply.error.contains(why), "{why}: {}", reply.error);
    }
    let missing = registry_request(&client, "get", &by_id("api-bad")).await;
    assert!(missing.error.contains("no agent"), "{}", missing.error);
    // The API is a NATS micro service with one endpoint per operation: any
    // other subject has no responder.
    let unknown = client
        .request(
            names::agents_api_subject("frobnicate"),
            by_id("api-a").encode_to_vec().into(),
        )
        .await;
    assert_eq!(
        unknown.map(|_| ()).map_err(|e| e.kind()),
        Err(async_nats::client::RequestErrorKind::NoResponders)
    );
    let garbage = client
        .request(names::agents_api_subject("put"), vec![0xff, 0x01].into())
        .await
        .unwrap();
    let garbage = AgentRegistryReply::decode(garbage.payload.as_ref()).unwrap();
    assert!(garbage.error.contains("undecodable"), "{}", garbage.error);

    // JSON, as from `nats req`: the agent file format in, JSON out.
    let json = |op: &str, body: &'static str| {
        let client = client.clone();
        let subject = names::agents_api_subject(op);
        async move {
            let reply = client.request(subject, body.into()).await.unwrap();
            serde_json::from_slice::<serde_json::Value>(&reply.payload).unwrap()
        }
    };
    let stored = json(
        "put",
        r#"{"agent_id":"api-json","watches":[{"project_id":7,"refs":{"branch":"main"}}]}"#,
    )
    .await;
    assert!(stored["revision"].as_u64().unwrap() > 0, "{stored}");
    let bad = json("put", r#"{"agent_id":"api-json","watches":[]}"#).await;
    assert!(
        bad["error"].as_str().unwrap().contains("no watches"),
        "{bad}"
    );
    let bad = json("put", r#"{"agent_id":"x","wat":1}"#).await;
    assert!(bad["error"].as_str().unwrap().contains("JSON"), "{bad}");
    let listed = json("list", "{}").await;
    assert_eq!(
        listed["agent_ids"],
        serde_json::json!(["agent-a", "agent-b", "api-a", "api-json"])
    );
    let fetched = json("get", r#"{"agent_id":"api-json"}"#).await;
    assert_eq!(fetched["agent"]["watches"][0]["refs"]["branch"], "main");

    // Both registrations take effect: a push to project 7 touching deploy/
    // pokes api-a and api-json, next to agent-a that watches every project
    // (the filter's KV watch is asynchronous).
    let mut probe = 0;
    let want: HashSet<&str> = ["agent-a", "api-a", "api-json"].into();
    loop {
        let meta = EventMeta::deterministic("api", &[&probe.to_string()]);
        let push = GitPushEvent {
            project_id: 7,
            changes: vec![RefChange {
                old_sha: "1".repeat(40),
                new_sha: "2".repeat(40),
                r#ref: "refs/heads/main".into(),
                changed_paths: vec!["deploy/app.yaml".into()],
                paths_known: true,
                ..Default::default()
            }],
            ..Default::default()
        };
        publisher
            .publish(names::push_subject(7, "test"), &push, &meta)
            .await
            .unwrap();
        tokio::time::sleep(Duration::from_millis(100)).await;
        let poked: HashSet<String> = stored_heads(&nats)
            .await
            .0
            .into_iter()
            .filter_map(|h| h.poke)
            .filter(|p| p.push_event_id == meta.event_id)
            .map(|p| p.agent_id)
            .collect();
        if poked.iter().map(String::as_str).collect::<HashSet<_>>() == want {
            break;
        }
        probe += 1;
        assert!(probe < 50, "registered agents never poked: {poked:?}");
    }

    let deleted = registry_request(&client, "delete", &by_id("api-a")).await;
    assert_eq!(deleted.error, "");
    let gone = registry_request(&client, "get", &by_id("api-a")).await;
    assert!(gone.error.contains("no agent"));
    let twice = registry_request(&client, "delete", &by_id("api-a")).await;
    assert!(twice.error.contains("no agent"));
    replica.stop().await;
}

// A KV handle caches the bucket's state from when it was opened; the load
// must read the server's current state, or a reload would stop early and
// match pushes against a half-loaded registry.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn registry_load_sees_agents_written_after_the_handle_was_opened() {
    let nats = NatsServer::start();
    let early = crate::fixtures::agents_kv(&nats).await;
    for i in 0..50 {
        register(&nats, &format!("late-{i}"), 1..=3).await;
    }
    let index = pushbus_filter::registry::snapshot(&early).await.unwrap();
    assert_eq!(index.agent_count(), 50);
    assert_eq!(index.watch_count(), 150);
}

// Tag pushes, branch deletes and force pushes poke too, and say which.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tag_delete_and_force_pushes_poke_marked_as_such() {
    let nats = NatsServer::start();
    let publisher = setup(&nats).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let kv = js.get_key_value(names::BUCKET_AGENTS).await.unwrap();
    let mut cfg = watcher("any-ref", 30, &[]);
    cfg.watches[0].refs = Some(RefSelector {
        kind: Kind::AnyRef as i32,
        pattern: String::new(),
    });
    pushbus_filter::put_agent(&kv, &cfg).await.unwrap();
    let replica = Replica::filter(&nats.url()).await;
    let zeros = "0".repeat(40);
    let change = |r: &str, kind: RefKind, change: ChangeKind, forced: bool| RefChange {
        r#ref: r.into(),
        ref_kind: kind as i32,
        change_kind: change as i32,
        forced,
        old_sha: if change == ChangeKind::Create {
            zeros.clone()
        } else {
            "1".repeat(40)
        },
        new_sha: if change == ChangeKind::Delete {
            zeros.clone()
        } else {
            "2".repeat(40)
        },
        ..Default::default()
    };
    let push = GitPushEvent {
        project_id: 30,
        changes: vec![
            change("refs/tags/v1", RefKind::Tag, ChangeKind::Create, false),
            change("refs/heads/old", RefKind::Branch, ChangeKind::Delete, false),
            change("refs/heads/main", RefKind::Branch, ChangeKind::Update, true),
        ],
        ..Default::default()
    };
    let meta = EventMeta::deterministic("kinds", &["1"]);
    publisher
        .publish(names::push_subject(30, "test"), &push, &meta)
        .await
        .unwrap();
    let heads = eventually("three heads", Duration::from_secs(5), async || {
        Some(stored_heads(&nats).await.0).filter(|h| h.len() >= 3)
    })
    .await;
    let mut got: Vec<(String, i32, i32, bool, String)> = heads
        .into_iter()
        .map(|h| {
            assert_eq!(h.correlation_id, meta.correlation_id);
            let p = h.poke.unwrap();
            assert_eq!(p.push_event_id, meta.event_id);
            (p.r#ref, p.ref_kind, p.change_kind, p.forced, p.new_sha)
        })
        .collect();
    got.sort();
    assert_eq!(
        got,
        vec![
            (
                "refs/heads/main".into(),
                RefKind::Branch as i32,
                ChangeKind::Update as i32,
                true,
                "2".repeat(40)
            ),
            (
                "refs/heads/old".into(),
                RefKind::Branch as i32,
                ChangeKind::Delete as i32,
                false,
                zeros.clone()
            ),
            (
                "refs/tags/v1".into(),
                RefKind::Tag as i32,
                ChangeKind::Create as i32,
                false,
                "2".repeat(40)
            ),
        ]
    );
    // An agent without a webhook costs the webhook stream nothing.
    let webhooks = js.get_stream(names::STREAM_WEBHOOKS).await.unwrap();
    assert_eq!(webhooks.get_info().await.unwrap().state.messages, 0);
    replica.stop().await;
}
