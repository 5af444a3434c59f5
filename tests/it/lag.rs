//! Geo pushes get exactly their own node's replication-lag message.

use std::time::{Duration, SystemTime};

use prost::Message;
use pushbus_shared::bus::Publisher;
use pushbus_shared::proto::{GeoNode, ReplicationStatus, Source};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::{EventMeta, names};

use crate::support::Stack;

async fn post(stack: &Stack, geo_node_id: Option<&str>) -> serde_json::Value {
    let body = serde_json::json!({
        "gl_repository": "project-3",
        "identifier": "key-7",
        "changes": format!("{} {} refs/heads/main", "1".repeat(40), "2".repeat(40)),
        "geo_node_id": geo_node_id,
    });
    let resp = stack.post_receive(&body, &[]).await;
    assert_eq!(resp.status(), 200);
    resp.json().await.unwrap()
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
    let publisher = Publisher::new(js.clone(), Source::default());
    for (node, db_lag) in [("eu", 12.0), ("us", 40.0)] {
        let status = ReplicationStatus {
            node_id: node.into(),
            applied_sequence: u64::MAX,
            reported_at: Some(SystemTime::now().into()),
            db_lag_seconds: Some(db_lag),
        };
        publisher
            .publish(
                names::geo_status_subject(node),
                &status,
                &EventMeta::fresh("geo"),
            )
            .await
            .unwrap();
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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_watcher_receives_pokes() {
    use pushbus_shared::proto::{
        WatchRequest, git_ops_notifier_client::GitOpsNotifierClient, watch_event::Event,
    };
    let nats = NatsServer::start();
    let js = async_nats::jetstream::new(testkit::client(&nats).await);
    let kv = js
        .create_or_update_key_value(pushbus_shared::topology::agents_bucket())
        .await
        .unwrap();
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
        ..Default::default()
    };
    pushbus_filter::put_agent(&kv, &cfg).await.unwrap();
    let stack = Stack::start(&nats.url()).await;
    let mut client = GitOpsNotifierClient::connect(format!("http://{}", stack.notifier))
        .await
        .unwrap();
    let mut stream = client
        .watch(WatchRequest {
            agent_id: "grpc-agent".into(),
        })
        .await
        .unwrap()
        .into_inner();
    let first = stream.message().await.unwrap().unwrap();
    assert!(matches!(first.event, Some(Event::Status(_))));
    let denied = client
        .watch(WatchRequest {
            agent_id: "nobody".into(),
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
