//! hook-ingest: idempotency and large pushes, against a real stack.

use std::collections::HashSet;

use pushbus_shared::names;
use pushbus_shared::proto::GitPushEvent;
use pushbus_shared::testkit::NatsServer;

use crate::support::{Stack, stored_events};

async fn stored_pushes(nats: &NatsServer) -> Vec<GitPushEvent> {
    stored_events(nats, names::STREAM_PUSHES)
        .await
        .into_iter()
        .map(|(_, e)| e)
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_same_notification_twice_is_one_event() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let body = serde_json::json!({
        "gl_repository": "project-5",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
    });
    let first = stack
        .post_receive(&body, &[("x-request-id", "retry-1")])
        .await;
    assert_eq!(first.headers()["x-correlation-id"], "retry-1");
    let first: serde_json::Value = first.json().await.unwrap();
    let second: serde_json::Value = stack
        .post_receive(&body, &[("x-request-id", "retry-1")])
        .await
        .json()
        .await
        .unwrap();
    assert_eq!(first["event_ids"], second["event_ids"]);
    // A different request is a different push.
    let other = stack
        .post_receive(&body, &[("x-request-id", "retry-2")])
        .await;
    assert_eq!(other.status(), 200);
    assert_eq!(stored_pushes(&nats).await.len(), 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_20000_tag_mirror_push_arrives_complete_in_parts() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let new = "e".repeat(40);
    let changes: String = (0..20_000)
        .map(|i| format!("{} {new} refs/tags/mirror/v{i}\n", "0".repeat(40)))
        .collect();
    let body = serde_json::json!({ "gl_repository": "project-8", "identifier": "user-1", "changes": changes });
    let resp = stack.post_receive(&body, &[]).await;
    assert_eq!(resp.status(), 200);
    let pushes = stored_pushes(&nats).await;
    assert!(
        pushes.len() > 1,
        "a 20,000-tag push should not fit one message"
    );
    let count = pushes[0].part_count as usize;
    assert_eq!(pushes.len(), count);
    let parts: HashSet<u32> = pushes.iter().map(|p| p.part).collect();
    assert_eq!(parts, (1..=count as u32).collect());
    let refs: HashSet<String> = pushes
        .iter()
        .flat_map(|p| p.changes.iter().map(|c| c.r#ref.clone()))
        .collect();
    assert_eq!(refs.len(), 20_000);
    assert!(refs.contains("refs/tags/mirror/v19999"));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn gitlab_authentication_jwt_and_legacy_secret() {
    use base64::Engine;
    use pushbus_hook_ingest::auth::sign_jwt;
    let nats = NatsServer::start();
    let dir = tempfile::tempdir().unwrap();
    let secret_file = dir.path().join(".gitlab_shell_secret");
    std::fs::write(&secret_file, "0123456789abcdef\n").unwrap();
    let stack = Stack::start_with_secret(&nats.url(), Some(secret_file)).await;
    let body = serde_json::json!({
        "gl_repository": "project-5",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
    });
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let good = sign_jwt(b"0123456789abcdef", now);
    let expired = sign_jwt(b"0123456789abcdef", now - 600);
    let forged = sign_jwt(b"wrong", now);
    let legacy = base64::engine::general_purpose::STANDARD.encode("0123456789abcdef");
    let refused: [&[(&str, &str)]; 4] = [
        &[],
        &[("gitlab-shell-api-request", &expired)],
        &[("gitlab-shell-api-request", &forged)],
        &[("gitlab-shared-secret", "d3Jvbmc=")],
    ];
    for headers in refused {
        let resp = stack.post_receive(&body, headers).await;
        assert_eq!(resp.status(), 401, "{headers:?}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    assert!(
        stored_pushes(&nats).await.is_empty(),
        "a refused push was published"
    );
    let accepted: [&[(&str, &str)]; 2] = [
        &[("gitlab-shell-api-request", &good), ("x-request-id", "a1")],
        &[("gitlab-shared-secret", &legacy), ("x-request-id", "a2")],
    ];
    for headers in accepted {
        assert_eq!(
            stack.post_receive(&body, headers).await.status(),
            200,
            "{headers:?}"
        );
    }
    assert_eq!(stored_pushes(&nats).await.len(), 2);
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn grpc_notify_git_push_stores_the_event_and_refuses_bad_input() {
    use pushbus_shared::proto::hook_ingest_client::HookIngestClient;
    use pushbus_shared::proto::{NotifyGitPushRequest, RefChange};
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let mut client = HookIngestClient::connect(format!("http://{}", stack.ingest))
        .await
        .unwrap();
    let change = |new: &str, r: &str| RefChange {
        old_sha: "1".repeat(40),
        new_sha: new.into(),
        r#ref: r.into(),
        ..Default::default()
    };
    let mut req = tonic::Request::new(NotifyGitPushRequest {
        project_id: 12,
        project_path: "group/svc".into(),
        changes: vec![change(&"2".repeat(40), "refs/heads/main")],
        actor: "user-9".into(),
        ..Default::default()
    });
    req.metadata_mut()
        .insert("x-correlation-id", "grpc-corr-1".parse().unwrap());
    let resp = client.notify_git_push(req).await.unwrap().into_inner();
    assert_eq!(resp.correlation_id, "grpc-corr-1");
    assert_eq!(resp.event_ids.len(), 1);

    let bad = [
        NotifyGitPushRequest {
            project_id: 0,
            changes: vec![change(&"2".repeat(40), "refs/heads/main")],
            ..Default::default()
        },
        NotifyGitPushRequest {
            project_id: 12,
            changes: vec![change("zz", "refs/heads/main")],
            ..Default::default()
        },
        NotifyGitPushRequest {
            project_id: 12,
            changes: vec![change(&"2".repeat(40), "refs/heads/a..b")],
            ..Default::default()
        },
        NotifyGitPushRequest {
            project_id: 12,
            ..Default::default()
        },
    ];
    for r in bad {
        let status = client.notify_git_push(r.clone()).await.unwrap_err();
        assert_eq!(status.code(), tonic::Code::InvalidArgument, "{r:?}");
    }
    let stored = stored_pushes(&nats).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].project_id, 12);
    assert_eq!(stored[0].actor, "user-9");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn default_branch_is_stored_from_both_doors_and_validated_like_a_ref() {
    use pushbus_shared::proto::hook_ingest_client::HookIngestClient;
    use pushbus_shared::proto::{NotifyGitPushRequest, RefChange};
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let body = |branch: serde_json::Value| {
        serde_json::json!({
            "gl_repository": "project-5",
            "identifier": "user-1",
            "changes": format!("{} {} refs/heads/main\n", "1".repeat(40), "2".repeat(40)),
            "default_branch": branch,
        })
    };
    let ok = stack.post_receive(&body("release/2.x".into()), &[]).await;
    assert_eq!(ok.status(), 200);
    for bad in ["a..b", "with space", "trailing/", "x.lock", ""] {
        let resp = stack.post_receive(&body(bad.into()), &[]).await;
        if bad.is_empty() {
            // Empty means unknown, as when it is left out.
            assert_eq!(resp.status(), 200);
            continue;
        }
        assert_eq!(resp.status(), 422, "{bad:?}");
        let err: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(err["field"], "default_branch", "{bad:?}");
    }
    let resp = stack.post_receive(&body(7.into()), &[]).await;
    assert_eq!(resp.status(), 400, "a number taken as a branch");

    let mut client = HookIngestClient::connect(format!("http://{}", stack.ingest))
        .await
        .unwrap();
    let req = |branch: &str| NotifyGitPushRequest {
        project_id: 12,
        changes: vec![RefChange {
            old_sha: "1".repeat(40),
            new_sha: "3".repeat(40),
            r#ref: "refs/heads/dev".into(),
            ..Default::default()
        }],
        default_branch: branch.into(),
        ..Default::default()
    };
    client.notify_git_push(req("main")).await.unwrap();
    let status = client.notify_git_push(req("ma~in")).await.unwrap_err();
    assert_eq!(status.code(), tonic::Code::InvalidArgument);
    assert!(status.message().contains("default_branch"), "{status:?}");

    let stored = stored_pushes(&nats).await;
    let branches: Vec<&str> = stored.iter().map(|e| e.default_branch.as_str()).collect();
    assert_eq!(branches, ["release/2.x", "", "main"]);
    stack.stop().await;
}
