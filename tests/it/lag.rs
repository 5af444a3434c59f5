//! Geo pushes get exactly their own node's replication-lag message.

use std::time::{Duration, SystemTime};

use prost::Message;
use pushbus_shared::bus::Publisher;
use pushbus_shared::proto::{GeoNode, ReplicationStatus, Source};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::{EventMeta, names};

use futures::StreamExt;

use crate::support::{Replica, Stack, StackOptions};

async fn post(stack: &Stack, geo_node_id: Option<&str>) -> serde_json::Value {
    push(stack, geo_node_id, &[]).await.0
}

fn messages(reply: &serde_json::Value) -> Vec<String> {
    reply["messages"]
        .as_array()
        .unwrap()
        .iter()
        .map(|m| m["message"].as_str().unwrap().to_owned())
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn each_geo_push_gets_its_own_nodes_lag_message() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let nodes = js.get_key_value(names::BUCKET_GEO_NODES).await.unwrap();
    for (id, primary) in [
        ("primary", true),
        ("eu", false),
        ("us", false),
        ("silent", false),
    ] {
        let node = GeoNode {
            node_id: id.into(),
            name: id.into(),
            primary,
            ..Default::default()
        };
        nodes.put(id, node.encode_to_vec().into()).await.unwrap();
    }
    for (node, db_lag) in [("eu", 12.0), ("us", 40.0)] {
        report(&js, node, u64::MAX, Some(db_lag)).await;
    }

    // Concurrent pushes by one actor to one repository through different nodes.
    let routes = ["eu", "us", "primary", "eu", "us", "primary", "eu", "us"];
    let replies = futures::future::join_all(routes.iter().map(|n| post(&stack, Some(n)))).await;
    for (node, reply) in routes.iter().zip(&replies) {
        let expected: Vec<String> = match *node {
            "eu" => vec!["Current replication lag: 12 seconds".into()],
            "us" => vec!["Current replication lag: 40 seconds".into()],
            _ => vec![],
        };
        assert_eq!(messages(reply), expected, "push via {node}");
    }
    // A node that never reported is called unhealthy, not given a number.
    let silent = messages(&post(&stack, Some("silent")).await);
    assert_eq!(silent.len(), 1);
    assert!(silent[0].contains("silent is unhealthy"), "{silent:?}");
    // Unknown node and plain pushes: 200 without lag message.
    assert!(messages(&post(&stack, Some("nowhere")).await).is_empty());
    assert!(messages(&post(&stack, None).await).is_empty());
    stack.stop().await;
}

// ---- replication-lag: node health, margins, failures ----

const MARGIN: Duration = Duration::from_millis(1500);

/// Registers nodes through the same validated path the CLI uses.
async fn register(js: &async_nats::jetstream::Context, primary: &str, secondaries: &[&str]) {
    let kv = js
        .create_or_update_key_value(pushbus_shared::topology::geo_nodes_bucket())
        .await
        .unwrap();
    let nodes = secondaries.iter().map(|id| (*id, false));
    for (id, primary) in std::iter::once((primary, true)).chain(nodes) {
        let node = GeoNode {
            node_id: id.into(),
            name: format!("{id} node"),
            url: format!("https://{id}.geo.example.com"),
            primary,
        };
        pushbus_replication_lag::nodes::put(&kv, &node)
            .await
            .unwrap();
    }
}

/// A secondary's progress report, as the secondary itself would publish it.
async fn report(
    js: &async_nats::jetstream::Context,
    node: &str,
    applied: u64,
    db_lag: Option<f64>,
) {
    report_status(
        js,
        ReplicationStatus {
            node_id: node.into(),
            applied_sequence: applied,
            reported_at: Some(SystemTime::now().into()),
            db_lag_seconds: db_lag,
            ..Default::default()
        },
    )
    .await;
}

async fn report_status(js: &async_nats::jetstream::Context, status: ReplicationStatus) {
    Publisher::new(js.clone(), Source::default())
        .publish(
            names::geo_status_subject(&status.node_id),
            &status,
            &EventMeta::fresh("geo"),
        )
        .await
        .unwrap();
}

async fn last_push_sequence(js: &async_nats::jetstream::Context) -> u64 {
    let mut stream = js.get_stream(names::STREAM_PUSHES).await.unwrap();
    stream.info().await.unwrap().state.last_sequence
}

/// One push by key-7 to project 3 (always the same actor and repository),
/// optionally through a node and with headers; the reply and how long it took.
async fn push(
    stack: &Stack,
    geo_node_id: Option<&str>,
    headers: &[(&str, &str)],
) -> (serde_json::Value, Duration) {
    push_to(stack, 3, geo_node_id, headers).await
}

async fn push_to(
    stack: &Stack,
    project_id: i64,
    geo_node_id: Option<&str>,
    headers: &[(&str, &str)],
) -> (serde_json::Value, Duration) {
    let body = serde_json::json!({
        "gl_repository": format!("project-{project_id}"),
        "identifier": "key-7",
        "changes": format!("{} {} refs/heads/main", "1".repeat(40), "2".repeat(40)),
        "geo_node_id": geo_node_id,
    });
    let started = std::time::Instant::now();
    let resp = stack.post_receive(&body, headers).await;
    let took = started.elapsed();
    assert_eq!(resp.status(), 200);
    (resp.json().await.unwrap(), took)
}

fn lag_seconds(messages: &[String]) -> i64 {
    assert_eq!(messages.len(), 1, "{messages:?}");
    messages[0]
        .strip_prefix("Current replication lag: ")
        .and_then(|m| m.strip_suffix(" seconds"))
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("not a lag message: {messages:?}"))
}

fn generous(budget_ms: u64) -> StackOptions {
    // Correctness tests: a budget no loaded CI machine runs out of.
    StackOptions {
        lag_budget_ms: budget_ms,
        ..Default::default()
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fifty_concurrent_pushes_by_one_actor_each_get_their_own_nodes_lag() {
    let nats = NatsServer::start();
    let stack = Stack::start_with(&nats.url(), generous(5000)).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu", "us", "ap"]).await;
    for (node, db_lag) in [("eu", 12.0), ("us", 40.0), ("ap", 95.0)] {
        report(&js, node, u64::MAX, Some(db_lag)).await;
    }
    let routes: Vec<Option<&str>> = (0..50)
        .map(|i| [Some("eu"), Some("us"), Some("ap"), Some("primary"), None][i % 5])
        .collect();
    let replies = futures::future::join_all(routes.iter().map(|n| push(&stack, *n, &[]))).await;
    let mut correlation_ids = std::collections::HashSet::new();
    for (node, (reply, _)) in routes.iter().zip(&replies) {
        let expected: Vec<String> = match node {
            Some("eu") => vec!["Current replication lag: 12 seconds".into()],
            Some("us") => vec!["Current replication lag: 40 seconds".into()],
            Some("ap") => vec!["Current replication lag: 95 seconds".into()],
            _ => vec![],
        };
        assert_eq!(messages(reply), expected, "push via {node:?}");
        correlation_ids.insert(reply["correlation_id"].as_str().unwrap().to_owned());
    }
    assert_eq!(correlation_ids.len(), 50, "every push is its own");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lag_grows_while_a_secondary_is_silent_and_drops_when_it_catches_up() {
    let nats = NatsServer::start();
    let opts = StackOptions {
        lag_budget_ms: 5000,
        lag: Some(pushbus_replication_lag::Config {
            threshold_seconds: 1.0,
            // Longer than this test waits: silence here means "behind", not "dead".
            unhealthy_after_seconds: 300,
        }),
        ..Default::default()
    };
    let stack = Stack::start_with(&nats.url(), opts).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu"]).await;
    // A plain push first, so the secondary's position is a real sequence.
    push(&stack, None, &[]).await;
    report(&js, "eu", last_push_sequence(&js).await, None).await;

    // The first unapplied push is this one, a moment old: below the threshold.
    let (first, _) = push(&stack, Some("eu"), &[]).await;
    assert!(messages(&first).is_empty(), "{first}");
    tokio::time::sleep(Duration::from_millis(2200)).await;
    let (second, _) = push(&stack, Some("eu"), &[]).await;
    let lag2 = lag_seconds(&messages(&second));
    assert!(lag2 >= 2, "{second}");
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let (third, _) = push(&stack, Some("eu"), &[]).await;
    let lag3 = lag_seconds(&messages(&third));
    assert!(lag3 > lag2, "lag should grow: {lag2} then {lag3}");

    // Caught up: it has applied everything stored so far.
    report(&js, "eu", last_push_sequence(&js).await, None).await;
    let (caught_up, _) = push(&stack, Some("eu"), &[]).await;
    assert!(messages(&caught_up).is_empty(), "{caught_up}");
    stack.stop().await;
}

// A secondary that reported once and then went quiet for longer than
// --lag-unhealthy-after-seconds is unhealthy: its old report says nothing
// about now. A fresh report makes it healthy again.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_silent_past_the_unhealthy_limit_is_unhealthy_until_it_reports() {
    let nats = NatsServer::start();
    let stack = Stack::start_with(&nats.url(), generous(5000)).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu"]).await;
    let unhealthy_after = pushbus_replication_lag::Config::default().unhealthy_after_seconds;
    let status_aged = |age: u64| ReplicationStatus {
        node_id: "eu".into(),
        applied_sequence: u64::MAX,
        reported_at: Some((SystemTime::now() - Duration::from_secs(age)).into()),
        db_lag_seconds: Some(12.0),
        ..Default::default()
    };

    report_status(&js, status_aged(unhealthy_after * 2)).await;
    let quiet = messages(&post(&stack, Some("eu")).await);
    assert_eq!(quiet.len(), 1, "{quiet:?}");
    assert!(
        quiet[0].contains("eu node is unhealthy: it has not reported for")
            && quiet[0].contains("replication lag unknown"),
        "{quiet:?}"
    );

    // Within the limit, the same report is believed.
    report_status(&js, status_aged(unhealthy_after / 2)).await;
    assert_eq!(
        messages(&post(&stack, Some("eu")).await),
        vec!["Current replication lag: 12 seconds"]
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_replication_lag_answers_as_before() {
    let nats = NatsServer::start();
    let opts = StackOptions {
        lag: None,
        ..generous(5000)
    };
    let stack = Stack::start_with(&nats.url(), opts).await;
    let lag = Replica::replication_lag(&nats.url(), Default::default()).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu", "us", "silent"]).await;
    report(&js, "eu", u64::MAX, Some(12.0)).await;
    report(&js, "us", u64::MAX, Some(40.0)).await;
    let nodes = [
        Some("eu"),
        Some("us"),
        Some("silent"),
        Some("primary"),
        Some("nowhere"),
        None,
    ];
    let ask = || async {
        let mut out = Vec::new();
        for n in nodes {
            out.push(messages(&push(&stack, n, &[]).await.0));
        }
        out
    };
    let before = ask().await;
    assert_eq!(before[0], vec!["Current replication lag: 12 seconds"]);
    assert_eq!(before[1], vec!["Current replication lag: 40 seconds"]);
    assert!(
        before[2][0].contains("silent node is unhealthy"),
        "{before:?}"
    );
    assert!(before[3..].iter().all(Vec::is_empty), "{before:?}");

    lag.stop().await;
    let lag = Replica::replication_lag(&nats.url(), Default::default()).await;
    assert_eq!(ask().await, before, "state rebuilt from the streams");
    lag.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_lag_message_but_200_in_time_without_an_answer() {
    let nats = NatsServer::start();
    let budget_ms = 250;
    let opts = StackOptions {
        lag: None,
        ..generous(budget_ms)
    };
    let stack = Stack::start_with(&nats.url(), opts).await;
    let client = testkit::client(&nats).await;
    let js = async_nats::jetstream::new(client.clone());
    // What `pushbus setup` would have created for the absent service.
    pushbus_replication_lag::topology()
        .ensure(&js)
        .await
        .unwrap();
    register(&js, "primary", &["eu", "slow"]).await;
    report(&js, "eu", u64::MAX, Some(12.0)).await;
    // Someone listens on slow's subject but never answers: the budget runs out.
    let mut mute = client
        .subscribe(names::geo_lag_subject("slow"))
        .await
        .unwrap();
    client.flush().await.unwrap();
    let in_time = Duration::from_millis(budget_ms) + MARGIN;
    // replication-lag not running at all (no responders), and a mute one.
    for node in ["eu", "slow"] {
        let (reply, took) = push(&stack, Some(node), &[]).await;
        assert!(messages(&reply).is_empty(), "via {node}: {reply}");
        assert!(took < in_time, "via {node}: answered after {took:?}");
    }
    assert!(mute.next().await.is_some(), "the mute listener was asked");

    let lag = Replica::replication_lag(&nats.url(), Default::default()).await;
    // Routes are ignored unless hook-ingest runs with --ingest-geo-routes.
    let bucket = js
        .get_key_value(names::BUCKET_GEO_PUSH_ROUTES)
        .await
        .unwrap();
    pushbus_hook_ingest::geo_routes::store_route(&bucket, "gitlab:req/off", "eu")
        .await
        .unwrap();
    let (reply, _) = push(&stack, None, &[("x-request-id", "gitlab:req/off")]).await;
    assert!(messages(&reply).is_empty(), "{reply}");
    // Unknown node.
    let (reply, took) = push(&stack, Some("nowhere"), &[]).await;
    assert!(messages(&reply).is_empty(), "{reply}");
    assert!(took < in_time);
    // A malformed correlation ID is replaced, never passed on; a push naming
    // its node still gets that node's message under the new ID.
    let bad = "not a valid id!";
    let (reply, _) = push(&stack, Some("eu"), &[("x-request-id", bad)]).await;
    assert_ne!(reply["correlation_id"], bad);
    assert_eq!(
        messages(&reply),
        vec!["Current replication lag: 12 seconds"]
    );
    // ... and replication-lag itself refuses one: a service error, no lag.
    let request = pushbus_shared::proto::LagRequest {
        correlation_id: bad.into(),
        geo_node_id: "eu".into(),
        project_id: 3,
    };
    let refused = client
        .request(names::geo_lag_subject("eu"), request.encode_to_vec().into())
        .await
        .unwrap();
    assert!(
        refused.payload.is_empty(),
        "a malformed correlation ID got a lag reply"
    );
    assert_eq!(
        refused
            .headers
            .as_ref()
            .and_then(|h| h.get("Nats-Service-Error"))
            .map(|v| v.as_str()),
        Some("malformed correlation_id")
    );
    lag.stop().await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn correlation_id_routes_give_each_push_its_own_nodes_lag() {
    use pushbus_hook_ingest::geo_routes;
    use pushbus_shared::proto::GitPushEvent;
    let nats = NatsServer::start();
    let opts = StackOptions {
        geo_routes: true,
        ..generous(5000)
    };
    let stack = Stack::start_with(&nats.url(), opts).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu", "us"]).await;
    report(&js, "eu", u64::MAX, Some(12.0)).await;
    report(&js, "us", u64::MAX, Some(40.0)).await;
    // The bucket hook-ingest created; a front end stores routes in it.
    let bucket = js
        .get_key_value(names::BUCKET_GEO_PUSH_ROUTES)
        .await
        .unwrap();
    // ':' and '/' are fine in correlation IDs, not in KV keys: encoded.
    let routed = [
        ("gitlab:req/1", "eu"),
        ("gitlab:req/2", "us"),
        ("gitlab:req/3", "eu"),
    ];
    for (cid, node) in routed {
        geo_routes::store_route(&bucket, cid, node).await.unwrap();
    }
    assert!(
        geo_routes::store_route(&bucket, "bad id", "eu")
            .await
            .is_err()
    );
    assert!(
        geo_routes::store_route(&bucket, "ok", "bad.node")
            .await
            .is_err()
    );

    // Same actor, same repository, concurrently, no geo_node_id in the body.
    let headers: Vec<[(&str, &str); 1]> = routed
        .iter()
        .map(|(cid, _)| [("x-request-id", *cid)])
        .collect();
    let replies = futures::future::join_all(headers.iter().map(|h| push(&stack, None, h))).await;
    for ((cid, node), (reply, _)) in routed.iter().zip(&replies) {
        assert_eq!(reply["correlation_id"], *cid);
        let expected = if *node == "eu" { 12 } else { 40 };
        assert_eq!(lag_seconds(&messages(reply)), expected, "{cid} via {node}");
    }
    // Unrouted and malformed correlation IDs: no node, no message.
    for cid in ["gitlab:req/unrouted", "gitlab req 1"] {
        let (reply, _) = push(&stack, None, &[("x-correlation-id", cid)]).await;
        assert!(messages(&reply).is_empty(), "{cid}: {reply}");
    }
    // An explicit node wins over a stored route.
    let (reply, _) = push(&stack, Some("us"), &[("x-request-id", "gitlab:req/1")]).await;
    assert_eq!(lag_seconds(&messages(&reply)), 40);

    // The node taken from the route is recorded on the stored event.
    let stored = crate::support::stored_events::<GitPushEvent>(&nats, names::STREAM_PUSHES).await;
    for (cid, node) in routed {
        let (_, ev) = stored
            .iter()
            .find(|(m, _)| m.correlation_id == cid)
            .unwrap_or_else(|| panic!("no event for {cid}"));
        assert_eq!(ev.geo_node_id.as_deref(), Some(node), "{cid}");
    }
    let (_, unrouted) = stored
        .iter()
        .find(|(m, _)| m.correlation_id == "gitlab:req/unrouted")
        .unwrap();
    assert_eq!(unrouted.geo_node_id, None);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn geo_cli_manages_nodes_and_routes() {
    use pushbus_hook_ingest::geo_routes;
    let nats = NatsServer::start();
    let pushbus = |args: &[&str]| {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_pushbus"))
            .args(args)
            .env("PUSHBUS_NATS_URL", nats.url())
            .env_remove("PUSHBUS_GEO_ROUTE_TTL_SECS")
            .output()
            .expect("run pushbus");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    };
    let add = |id: &str, url: &str, primary: bool| {
        let mut a = vec!["geo", "nodes", "add", id, "--name", "Node", "--url", url];
        if primary {
            a.push("--primary");
        }
        a.into_iter().map(str::to_owned).collect::<Vec<_>>()
    };
    let run = |a: Vec<String>| pushbus(&a.iter().map(String::as_str).collect::<Vec<_>>());
    assert!(run(add("main", "https://main.example.com", true)).0);
    assert!(run(add("eu", "https://eu.example.com:8443/", false)).0);
    // Re-adding the primary itself is an update, not a second primary.
    assert!(run(add("main", "https://main2.example.com", true)).0);
    let (ok, _, err) = run(add("us", "https://us.example.com", true));
    assert!(!ok);
    assert!(err.contains("main already is"), "{err}");
    for (id, url) in [
        ("u.s", "https://us.example.com"),
        ("us", "ftp://us"),
        ("us", "nope"),
    ] {
        let (ok, _, err) = run(add(id, url, false));
        assert!(!ok, "{id} {url} accepted");
        assert!(!err.is_empty());
    }
    let (ok, out, _) = pushbus(&["geo", "nodes", "list"]);
    assert!(ok);
    assert_eq!(
        out,
        "eu\tsecondary\tNode\thttps://eu.example.com:8443/\nmain\tprimary\tNode\thttps://main2.example.com\n"
    );
    assert!(pushbus(&["geo", "nodes", "remove", "eu"]).0);
    assert!(
        !pushbus(&["geo", "nodes", "remove", "eu"]).0,
        "removing twice"
    );
    let (_, out, _) = pushbus(&["geo", "nodes", "list"]);
    assert!(
        out.starts_with("main\t") && out.lines().count() == 1,
        "{out}"
    );

    let (ok, _, err) = pushbus(&["geo", "route", "gitlab:req/9", "main"]);
    assert!(ok, "{err}");
    assert!(!pushbus(&["geo", "route", "bad id", "main"]).0);
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let bucket = js
        .get_key_value(names::BUCKET_GEO_PUSH_ROUTES)
        .await
        .unwrap();
    assert_eq!(
        geo_routes::lookup(&bucket, "gitlab:req/9", Duration::from_secs(5)).await,
        Some("main".into())
    );
    let ttl = bucket.status().await.unwrap().max_age();
    assert_eq!(ttl, Duration::from_secs(geo_routes::DEFAULT_TTL_SECS));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn per_project_positions_judge_pushes_to_listed_projects() {
    let nats = NatsServer::start();
    let stack = Stack::start_with(&nats.url(), generous(5000)).await;
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    register(&js, "primary", &["eu"]).await;
    // An old push to project 4 the secondary has not applied.
    push_to(&stack, 4, None, &[]).await;
    let mut status = ReplicationStatus {
        node_id: "eu".into(),
        applied_sequence: 0,
        reported_at: Some(SystemTime::now().into()),
        ..Default::default()
    };
    status
        .project_applied_sequences
        .insert(3, last_push_sequence(&js).await);
    report_status(&js, status).await;
    tokio::time::sleep(Duration::from_millis(2200)).await;

    // Project 3 is caught up (its only unapplied push is the one just made) ...
    let (reply, _) = push_to(&stack, 3, Some("eu"), &[]).await;
    assert!(messages(&reply).is_empty(), "{reply}");
    // ... project 4 is not listed: the whole-log position says it is behind.
    let (reply, _) = push_to(&stack, 4, Some("eu"), &[]).await;
    assert!(lag_seconds(&messages(&reply)) >= 2, "{reply}");
    stack.stop().await;
}
