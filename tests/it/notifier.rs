//! gitops-notifier against a real nats-server and real gRPC/HTTP clients:
//! catch-up, coalescing, replicas and bus loss.

use std::collections::{HashMap, HashSet};
use std::time::{Duration, Instant};

use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::{
    RefHead, SeenRef, WatchEvent, WatchRequest, notifier_status::State, watch_event::Event,
};
use pushbus_shared::testkit::{self, NatsServer};
use tonic::Streaming;

use crate::poll::{SETTLE, until};
use crate::support::{Replica, SseReader, Stack, bind_local, push_stored, register};

pub(crate) fn sha(n: u64) -> String {
    format!("{n:040x}")
}

/// One push through hook-ingest's HTTP endpoint; retried while it answers
/// 503 (the bus coming back).
pub(crate) async fn push(stack: &Stack, project_id: i64, branch: &str, new_sha: &str) {
    let body = serde_json::json!({
        "gl_repository": format!("project-{project_id}"),
        "identifier": "user-1",
        "changes": format!("{} {new_sha} refs/heads/{branch}\n", "1".repeat(40)),
    });
    push_stored(stack.ingest, &body).await
}

pub(crate) async fn watch(addr: std::net::SocketAddr, req: WatchRequest) -> Streaming<WatchEvent> {
    let mut client = GitOpsNotifierClient::connect(format!("http://{addr}"))
        .await
        .unwrap();
    let mut stream = client.watch(req).await.unwrap().into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Status(_))), "{first:?}");
    stream
}

pub(crate) fn agent(id: &str, since_cursor: Option<u64>) -> WatchRequest {
    WatchRequest {
        agent_id: id.into(),
        since_cursor,
        ..Default::default()
    }
}

/// Events until none arrives for `quiet`.
pub(crate) async fn drain(stream: &mut Streaming<WatchEvent>, quiet: Duration) -> Vec<WatchEvent> {
    let mut out = Vec::new();
    while let Ok(Some(Ok(ev))) = tokio::time::timeout(quiet, stream.message())
        .await
        .map(|r| r.transpose())
    {
        out.push(ev);
    }
    out
}

/// (ref, new SHA) of every poke; statuses dropped.
pub(crate) fn pokes(events: &[WatchEvent]) -> Vec<(String, String)> {
    events
        .iter()
        .filter_map(|e| match &e.event {
            Some(Event::Poke(p)) => Some((p.r#ref.clone(), p.new_sha.clone())),
            _ => None,
        })
        .collect()
}

/// Waits until the notifier recorded `want` as the head of `branch`.
pub(crate) async fn head_is(
    nats: &NatsServer,
    agent_id: &str,
    project_id: i64,
    branch: &str,
    want: &str,
) {
    let js = async_nats::jetstream::new(testkit::client(nats).await);
    let kv = js.get_key_value(names::BUCKET_REF_HEADS).await.unwrap();
    let key = format!(
        "{agent_id}.{}",
        pushbus_gitops_notifier::heads::ref_key(project_id, &format!("refs/heads/{branch}"))
    );
    until(&format!("head of {branch} at {want}"), async || {
        let head = kv.get(&key).await.ok().flatten();
        head.is_some_and(|v| RefHead::decode(v.as_ref()).unwrap().poke.unwrap().new_sha == want)
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn offline_agent_catches_up_one_poke_per_ref_then_goes_live() {
    let nats = NatsServer::start();
    register(&nats, "catcher", 40..=40).await;
    let stack = Stack::start(&nats.url()).await;

    let mut live = watch(stack.notifier, agent("catcher", None)).await;
    push(&stack, 40, "main", &sha(1)).await;
    let first = drain(&mut live, Duration::from_secs(2)).await;
    assert_eq!(pokes(&first), vec![("refs/heads/main".into(), sha(1))]);
    let cursor = first.last().unwrap().cursor;
    assert!(cursor > 0);
    drop(live);

    // Offline: ten pushes to main, three to dev.
    for n in 2..=11 {
        push(&stack, 40, "main", &sha(n)).await;
    }
    for n in 100..=102 {
        push(&stack, 40, "dev", &sha(n)).await;
    }
    head_is(&nats, "catcher", 40, "main", &sha(11)).await;
    head_is(&nats, "catcher", 40, "dev", &sha(102)).await;

    // By cursor: exactly the two refs, newest SHAs, marked as catch-up.
    let mut back = watch(stack.notifier, agent("catcher", Some(cursor))).await;
    let caught = drain(&mut back, Duration::from_secs(1)).await;
    let mut got = pokes(&caught);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("refs/heads/dev".into(), sha(102)),
            ("refs/heads/main".into(), sha(11)),
        ]
    );
    assert!(caught.iter().all(|e| e.catch_up && e.cursor > cursor));
    // Then live, once.
    push(&stack, 40, "main", &sha(12)).await;
    let after = drain(&mut back, Duration::from_secs(2)).await;
    assert_eq!(pokes(&after), vec![("refs/heads/main".into(), sha(12))]);
    assert!(!after[0].catch_up);

    // By SHA: main is current, dev is not listed, so only dev comes.
    let mut by_sha = watch(
        stack.notifier,
        WatchRequest {
            agent_id: "catcher".into(),
            seen: vec![SeenRef {
                project_id: 40,
                r#ref: "refs/heads/main".into(),
                sha: sha(12),
            }],
            ..Default::default()
        },
    )
    .await;
    let caught = drain(&mut by_sha, Duration::from_secs(1)).await;
    assert_eq!(pokes(&caught), vec![("refs/heads/dev".into(), sha(102))]);

    // SSE: an EventSource's Last-Event-ID is the cursor.
    let resp = reqwest::Client::new()
        .get(format!("http://{}/v1/agents/catcher/pokes", stack.notifier))
        .header("Last-Event-ID", cursor.to_string())
        .send()
        .await
        .unwrap();
    let mut sse = SseReader::new(resp);
    let mut seen = Vec::new();
    while let Some((event, data)) = sse.next_event(Duration::from_secs(1)).await {
        if event == "poke" {
            let v: serde_json::Value = serde_json::from_str(&data).unwrap();
            seen.push((
                v["ref"].as_str().unwrap().to_owned(),
                v["new_sha"].as_str().unwrap().to_owned(),
            ));
        }
    }
    seen.sort();
    assert_eq!(
        seen,
        vec![
            ("refs/heads/dev".into(), sha(102)),
            ("refs/heads/main".into(), sha(12)),
        ]
    );
    let bad = reqwest::get(format!(
        "http://{}/v1/agents/catcher/pokes?since=yesterday",
        stack.notifier
    ))
    .await
    .unwrap();
    assert_eq!(bad.status(), 400);
    stack.stop().await;
}

// Reconnecting while pushes keep coming: every cursor after the resume point
// arrives at most once per ref, and each ref ends at its last SHA.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reconnect_during_pushes_leaves_no_gap_and_no_duplicate() {
    let nats = NatsServer::start();
    register(&nats, "steady", 41..=41).await;
    let stack = std::sync::Arc::new(Stack::start(&nats.url()).await);
    let mut stream = watch(stack.notifier, agent("steady", None)).await;
    let pusher = tokio::spawn({
        let stack = stack.clone();
        async move {
            for n in 1..=60u64 {
                let branch = ["a", "b", "c"][(n % 3) as usize];
                push(&stack, 41, branch, &sha(n)).await;
                tokio::time::sleep(Duration::from_millis(15)).await;
            }
        }
    });
    let mut events = drain(&mut stream, Duration::from_millis(300)).await;
    let resume = events.iter().map(|e| e.cursor).max().unwrap_or(0);
    drop(stream);
    let mut again = watch(stack.notifier, agent("steady", Some(resume))).await;
    pusher.await.unwrap();
    head_is(&nats, "steady", 41, "a", &sha(60)).await;
    let later = drain(&mut again, Duration::from_secs(2)).await;
    assert!(
        later.iter().all(|e| e.cursor > resume),
        "resent an old head"
    );
    let mut per_ref: HashMap<String, Vec<u64>> = HashMap::new();
    for e in &later {
        if let Some(Event::Poke(p)) = &e.event {
            per_ref.entry(p.r#ref.clone()).or_default().push(e.cursor);
        }
    }
    for cursors in per_ref.values() {
        assert!(cursors.windows(2).all(|w| w[0] < w[1]), "{cursors:?}");
    }
    events.extend(later);
    let mut last: HashMap<String, String> = HashMap::new();
    for (r, s) in pokes(&events) {
        last.insert(r, s);
    }
    assert_eq!(last["refs/heads/a"], sha(60));
    assert_eq!(last["refs/heads/b"], sha(58));
    assert_eq!(last["refs/heads/c"], sha(59));
    std::sync::Arc::into_inner(stack).unwrap().stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_burst_to_one_ref_becomes_a_handful_of_pokes_ending_with_the_last_sha() {
    let nats = NatsServer::start();
    register(&nats, "bursty", 42..=42).await;
    let stack = Stack::start(&nats.url()).await;
    let mut stream = watch(stack.notifier, agent("bursty", None)).await;
    let started = Instant::now();
    for n in 1..=200 {
        push(&stack, 42, "main", &sha(n)).await;
    }
    let took = started.elapsed();
    let events = drain(&mut stream, Duration::from_secs(2)).await;
    let got = pokes(&events);
    // One at once, then at most one per 500 ms window.
    let bound = 2 + (took.as_millis() / 500) as usize + 1;
    assert!(
        !got.is_empty() && got.len() <= bound,
        "{} pokes for 200 pushes in {took:?}",
        got.len()
    );
    assert_eq!(got.last().unwrap().1, sha(200));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_replicas_deliver_every_poke_exactly_once() {
    let nats = NatsServer::start();
    for id in ["on-first", "on-second"] {
        register(&nats, id, 43..=43).await;
    }
    let stack = Stack::start(&nats.url()).await;
    let (second_listener, second_addr) = bind_local().await;
    let second = Replica::notifier(&nats.url(), second_listener).await;
    let mut first_stream = watch(stack.notifier, agent("on-first", None)).await;
    let mut second_stream = watch(second_addr, agent("on-second", None)).await;
    // Distinct branches: nothing may be coalesced.
    let want: HashSet<(String, String)> = (0..30)
        .map(|n| (format!("refs/heads/b{n}"), sha(n)))
        .collect();
    for n in 0..30 {
        push(&stack, 43, &format!("b{n}"), &sha(n)).await;
    }
    for stream in [&mut first_stream, &mut second_stream] {
        let got = pokes(&drain(stream, Duration::from_secs(2)).await);
        let unique: HashSet<_> = got.iter().cloned().collect();
        assert_eq!(unique.len(), got.len(), "duplicate pokes");
        assert_eq!(unique, want);
    }
    second.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bus_loss_is_announced_and_nothing_is_missing_after_it() {
    let mut nats = NatsServer::start();
    register(&nats, "patient", 44..=44).await;
    let stack = Stack::start(&nats.url()).await;
    let mut stream = watch(stack.notifier, agent("patient", None)).await;
    push(&stack, 44, "main", &sha(1)).await;
    let before = drain(&mut stream, Duration::from_secs(1)).await;
    assert_eq!(pokes(&before), vec![("refs/heads/main".into(), sha(1))]);

    nats.kill();
    let state = |events: &[WatchEvent]| {
        events.iter().find_map(|e| match &e.event {
            Some(Event::Status(s)) => Some(s.state),
            _ => None,
        })
    };
    let down = drain(&mut stream, Duration::from_secs(5)).await;
    assert_eq!(state(&down), Some(State::Degraded as i32), "{down:?}");

    nats.start_again();
    // Read on until the stream says LIVE (not a poll: every read consumes).
    let mut up = Vec::new();
    let deadline = Instant::now() + SETTLE;
    while state(&up) != Some(State::Live as i32) {
        assert!(Instant::now() < deadline, "never live again: {up:?}");
        up = drain(&mut stream, Duration::from_secs(1)).await;
    }
    push(&stack, 44, "main", &sha(2)).await;
    push(&stack, 44, "dev", &sha(3)).await;
    head_is(&nats, "patient", 44, "dev", &sha(3)).await;
    let mut after = pokes(&drain(&mut stream, Duration::from_secs(2)).await);
    after.sort();
    assert_eq!(
        after,
        vec![
            ("refs/heads/dev".into(), sha(3)),
            ("refs/heads/main".into(), sha(2)),
        ]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watcher_receives_pokes_with_correlation_id() {
    let nats = NatsServer::start();
    let cfg = pushbus_shared::proto::AgentConfig {
        agent_id: "grpc-agent".into(),
        watches: vec![pushbus_shared::proto::Watch {
            project_path: "group/app".into(),
            refs: Some(pushbus_shared::proto::RefSelector {
                kind: pushbus_shared::proto::ref_selector::Kind::AnyRef as i32,
                pattern: String::new(),
            }),
            ..Default::default()
        }],
        public: true,
        ..Default::default()
    };
    crate::fixtures::put_agent(&nats, &cfg).await;
    let stack = Stack::start(&nats.url()).await;
    let mut client = GitOpsNotifierClient::connect(format!("http://{}", stack.notifier))
        .await
        .unwrap();
    let mut stream = client
        .watch(WatchRequest {
            agent_id: "grpc-agent".into(),
            ..Default::default()
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Status(_))));
    let denied = client
        .watch(WatchRequest {
            agent_id: "nobody".into(),
            ..Default::default()
        })
        .await
        .unwrap_err();
    assert_eq!(denied.code(), tonic::Code::Unauthenticated);

    let body = serde_json::json!({
        "gl_repository": "project-11",
        "gl_project_path": "group/app",
        "identifier": "user-2",
        "changes": format!("{} {} refs/tags/v1.0", "0".repeat(40), "d".repeat(40)),
    });
    let resp = stack
        .post_receive(&body, &[("x-request-id", "req-123")])
        .await;
    assert_eq!(resp.status(), 200);
    let ev = tokio::time::timeout(Duration::from_secs(15), stream.message())
        .await
        .expect("poke within 15s")
        .unwrap()
        .unwrap();
    assert_eq!(ev.correlation_id, "req-123");
    let Some(Event::Poke(poke)) = ev.event else {
        panic!("expected a poke, got {ev:?}")
    };
    assert_eq!(poke.project_id, 11);
    assert_eq!(poke.r#ref, "refs/tags/v1.0");
    assert_eq!(poke.new_sha, "d".repeat(40));
    drop(stream);
    stack.stop().await;
}

// The status sent on connect carries a cursor, so an agent that received no
// poke before it went away still catches up on what it missed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_connect_status_cursor_is_a_resume_point() {
    let nats = NatsServer::start();
    register(&nats, "quiet", 46..=46).await;
    register(&nats, "other", 47..=47).await;
    let stack = Stack::start(&nats.url()).await;
    // Some head exists before (delivered, so the notifier has seen it), so
    // the cursor is not zero.
    let mut other = watch(stack.notifier, agent("other", None)).await;
    push(&stack, 47, "main", &sha(1)).await;
    let first = drain(&mut other, Duration::from_secs(1)).await;
    assert_eq!(pokes(&first).len(), 1);
    let mut client = GitOpsNotifierClient::connect(format!("http://{}", stack.notifier))
        .await
        .unwrap();
    let mut stream = client
        .watch(agent("quiet", None))
        .await
        .unwrap()
        .into_inner();
    let status = stream.message().await.unwrap().unwrap();
    assert!(matches!(status.event, Some(Event::Status(_))));
    assert!(status.cursor > 0, "{status:?}");
    drop(stream);
    push(&stack, 46, "main", &sha(2)).await;
    head_is(&nats, "quiet", 46, "main", &sha(2)).await;
    let mut back = watch(stack.notifier, agent("quiet", Some(status.cursor))).await;
    let caught = drain(&mut back, Duration::from_secs(1)).await;
    assert_eq!(pokes(&caught), vec![("refs/heads/main".into(), sha(2))]);
    stack.stop().await;
}

// A replica started later knows every head from the bucket, so an agent
// whose replica died catches up on whichever one it reaches next.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_replica_started_later_serves_catch_up_from_the_bucket() {
    let nats = NatsServer::start();
    register(&nats, "mover", 48..=48).await;
    let stack = Stack::start(&nats.url()).await;
    let mut first = watch(stack.notifier, agent("mover", None)).await;
    push(&stack, 48, "main", &sha(1)).await;
    let seen = drain(&mut first, Duration::from_secs(1)).await;
    let cursor = seen.iter().map(|e| e.cursor).max().unwrap();
    drop(first);
    push(&stack, 48, "main", &sha(2)).await;
    push(&stack, 48, "dev", &sha(3)).await;
    head_is(&nats, "mover", 48, "dev", &sha(3)).await;
    let (listener, addr) = bind_local().await;
    let later = Replica::notifier(&nats.url(), listener).await;
    let mut back = watch(addr, agent("mover", Some(cursor))).await;
    let mut got = pokes(&drain(&mut back, Duration::from_secs(1)).await);
    got.sort();
    assert_eq!(
        got,
        vec![
            ("refs/heads/dev".into(), sha(3)),
            ("refs/heads/main".into(), sha(2)),
        ]
    );
    later.stop().await;
    stack.stop().await;
}

// A cursor from a bucket that was since recreated points past every head
// the notifier has: it is answered "poll everything" (after waiting a while
// for the feed to reach it), not taken as a position, and the agent is live
// on the new bucket's cursors from there.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_cursor_from_a_recreated_bucket_is_told_to_poll_everything_then_goes_live() {
    let nats = NatsServer::start();
    register(&nats, "reborn", 49..=49).await;
    let stack = Stack::start(&nats.url()).await;
    let mut first = watch(stack.notifier, agent("reborn", None)).await;
    for (n, branch) in [(1, "main"), (2, "dev"), (3, "next")] {
        push(&stack, 49, branch, &sha(n)).await;
    }
    head_is(&nats, "reborn", 49, "next", &sha(3)).await;
    let seen = drain(&mut first, Duration::from_secs(1)).await;
    assert_eq!(pokes(&seen).len(), 3, "{seen:?}");
    let old_cursor = seen.iter().map(|e| e.cursor).max().unwrap();
    drop(first);
    stack.stop().await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    js.delete_key_value(names::BUCKET_REF_HEADS).await.unwrap();
    let stack = Stack::start(&nats.url()).await;

    let mut client = GitOpsNotifierClient::connect(format!("http://{}", stack.notifier))
        .await
        .unwrap();
    let mut back = client
        .watch(agent("reborn", Some(old_cursor)))
        .await
        .unwrap()
        .into_inner();
    // The notifier waits up to 3 s for its feed to reach the cursor first.
    let told = tokio::time::timeout(Duration::from_secs(15), async {
        loop {
            let ev = back.message().await.unwrap().expect("stream ended");
            if let Some(Event::Status(s)) = &ev.event
                && s.detail.contains("poll everything")
            {
                return ev;
            }
            assert!(
                !matches!(ev.event, Some(Event::Poke(_))),
                "a poke from a guessed position: {ev:?}"
            );
        }
    })
    .await
    .unwrap_or_else(|_| panic!("no \"poll everything\" status for cursor {old_cursor}"));
    let Some(Event::Status(status)) = &told.event else {
        unreachable!()
    };
    assert_eq!(status.state(), State::Live, "{told:?}");
    assert!(told.cursor < old_cursor, "{told:?}");

    push(&stack, 49, "main", &sha(4)).await;
    head_is(&nats, "reborn", 49, "main", &sha(4)).await;
    let live = drain(&mut back, Duration::from_secs(1)).await;
    assert_eq!(pokes(&live), vec![("refs/heads/main".into(), sha(4))]);
    let poke = live
        .iter()
        .find(|e| matches!(e.event, Some(Event::Poke(_))))
        .unwrap();
    assert!(poke.cursor > told.cursor, "{poke:?} after {told:?}");
    stack.stop().await;
}

// Two replicas writing one agent's heads out of order, each remembering
// what it wrote: a head never moves back, replays write nothing.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn heads_only_move_forward_across_replicas() {
    use pushbus_shared::heads::HeadWriter;
    use pushbus_shared::proto::AgentPoke;
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let kv = js
        .create_or_update_key_value(pushbus_shared::topology::ref_heads_bucket())
        .await
        .unwrap();
    let (a, b) = (
        HeadWriter::new(kv.clone(), js.clone(), Default::default()),
        HeadWriter::new(kv.clone(), js.clone(), Default::default()),
    );
    let head = |seq: u64| RefHead {
        poke: Some(AgentPoke {
            agent_id: "racer".into(),
            project_id: 49,
            r#ref: "refs/heads/main".into(),
            new_sha: sha(seq),
            push_sequence: seq,
            push_epoch: 1,
            ..Default::default()
        }),
        ..Default::default()
    };
    assert!(a.record(&head(100)).await.unwrap());
    assert!(!a.record(&head(100)).await.unwrap(), "replay written");
    assert!(b.record(&head(200)).await.unwrap());
    assert!(!a.record(&head(150)).await.unwrap(), "older poke written");
    assert!(a.record(&head(300)).await.unwrap());
    assert!(!b.record(&head(250)).await.unwrap(), "older poke written");
    // A push from a newer stream (recreated: sequences start again) wins.
    let mut reborn = head(2);
    if let Some(p) = reborn.poke.as_mut() {
        p.push_epoch = 2;
    }
    assert!(
        b.record(&reborn).await.unwrap(),
        "a recreated stream's push refused"
    );
    assert!(
        !a.record(&head(400)).await.unwrap(),
        "the old stream's push won"
    );
    let key = format!(
        "racer.{}",
        pushbus_gitops_notifier::heads::ref_key(49, "refs/heads/main")
    );
    let stored = RefHead::decode(kv.get(&key).await.unwrap().unwrap().as_ref()).unwrap();
    assert_eq!(stored.poke.unwrap().new_sha, sha(2));
}
