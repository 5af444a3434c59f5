//! A real `git push` travels the whole pipeline to a connected agent.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};

use pushbus_shared::testkit::NatsServer;

use crate::fixtures::{bare_with_hook, clone, git};
use crate::poll::{SETTLE, poll};
use crate::support::{SseReader, Stack};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// A bare repository for `project_id` whose post-receive hook runs
/// `pushbus hook post-receive <hook_args>`, and a clone of it to push from.
fn repo_with_hook(
    dir: &Path,
    project_id: i64,
    hook_args: &str,
    config: &[(&str, &str)],
) -> (PathBuf, PathBuf) {
    let bare = dir.join("repo.git");
    bare_with_hook(dir, &bare, hook_args);
    git(
        &bare,
        &["config", "pushbus.projectId", &project_id.to_string()],
    );
    for (k, v) in config {
        git(&bare, &["config", k, v]);
    }
    let work = dir.join("work");
    clone(dir, &bare, &work);
    (bare, work)
}

fn agents_put(nats_url: &str, dir: &Path, yaml: &str) {
    let file = dir.join("agent.yaml");
    std::fs::write(&file, yaml).unwrap();
    let out = Command::new(PUSHBUS)
        .args(["agents", "--nats-url", nats_url, "put", "-f"])
        .arg(&file)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "agents put: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn git_push_reaches_connected_agent_with_its_correlation_id() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    agents_put(
        &nats.url(),
        tmp.path(),
        "agent_id: agent-1\ntoken: s3cret\nwatches:\n  - project_id: 42\n    refs: any_branch\n  - project_id: 7\n    refs: any_branch\n",
    );
    let stack = Stack::start(&nats.url()).await;

    // A wrong token is refused; the right one streams.
    let url = format!("http://{}/v1/agents/agent-1/pokes", stack.notifier);
    assert_eq!(SseReader::connect(&url, Some("wrong")).await.status(), 401);
    let mut sse = SseReader::new(SseReader::connect(&url, Some("s3cret")).await);
    let (event, _) = sse
        .next_event(Duration::from_secs(10))
        .await
        .expect("status event");
    assert_eq!(event, "status");

    // A bare repository whose post-receive hook calls the stack.
    let (_, work) = repo_with_hook(
        tmp.path(),
        42,
        &format!("--ingest-url http://{}", stack.ingest),
        &[("pushbus.projectPath", "group/project")],
    );
    std::fs::write(work.join("README"), "hello\n").unwrap();
    git(&work, &["add", "README"]);
    git(&work, &["commit", "-q", "-m", "first"]);
    let sha = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout)
        .unwrap()
        .trim()
        .to_owned();
    let push = git(&work, &["push", "origin", "HEAD:refs/heads/main"]);
    let output = String::from_utf8_lossy(&push.stderr).to_string();
    let correlation_id = output
        .lines()
        .find_map(|l| l.split("correlation ID ").nth(1))
        .unwrap_or_else(|| panic!("no correlation ID in push output:\n{output}"))
        .trim()
        .to_owned();
    assert!(
        output.contains("remote: pushbus: push announced"),
        "{output}"
    );

    let (event, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("poke within 15s");
    assert_eq!(event, "poke");
    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(poke["agent_id"], "agent-1");
    assert_eq!(poke["project_id"], 42);
    assert_eq!(poke["project_path"], "group/project");
    assert_eq!(poke["ref"], "refs/heads/main");
    assert_eq!(poke["change"], "create");
    assert_eq!(poke["new_sha"], sha.as_str());
    assert_eq!(poke["correlation_id"], correlation_id.as_str());

    // A push to a project the agent does not watch pokes nobody.
    let body = serde_json::json!({
        "gl_repository": "project-99",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main", "0".repeat(40), "b".repeat(40)),
    });
    let resp = stack.post_receive(&body, &[]).await;
    assert_eq!(resp.status(), 200);
    // ...and the agent's next poke is for its own next push, not that one.
    let body = serde_json::json!({
        "gl_repository": "project-7",
        "identifier": "key-3",
        "changes": format!("{} {} refs/heads/dev", "0".repeat(40), "c".repeat(40)),
    });
    let resp = stack.post_receive(&body, &[]).await;
    assert_eq!(resp.status(), 200);
    let (_, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("second poke");
    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(poke["project_id"], 7);
    assert_eq!(poke["new_sha"], "c".repeat(40));

    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_notifications_are_refused_with_field_and_nothing_published() {
    let _memory = crate::fixtures::PROCESS_MEMORY.lock().await;
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}/api/v4/internal/post_receive", stack.ingest);
    let z = "0".repeat(40);
    let a = "a".repeat(40);
    let cases = [
        (
            serde_json::json!({"identifier": "user-1", "changes": format!("{z} {a} refs/heads/x")}),
            400,
            Some("gl_repository"),
        ),
        (
            serde_json::json!({"gl_repository": "project-0", "identifier": "user-1", "changes": format!("{z} {a} refs/heads/x")}),
            422,
            Some("gl_repository"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "bob", "changes": format!("{z} {a} refs/heads/x")}),
            422,
            Some("identifier"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1", "changes": format!("{z} xyz refs/heads/x")}),
            422,
            Some("changes[0].new_sha"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1", "changes": format!("{z} {a} refs/heads/..")}),
            422,
            Some("changes[0].ref"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1", "changes": format!("{z} {a} refs/heads/a\u{7}b")}),
            422,
            Some("changes[0].ref"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1"}),
            400,
            Some("changes"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "changes": format!("{z} {a} refs/heads/x")}),
            400,
            Some("identifier"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1", "changes": format!("{z} {a} refs/heads/x\n{a} {} refs/heads/y", "c".repeat(64))}),
            422,
            Some("changes[1].new_sha"),
        ),
        (
            serde_json::json!({"gl_repository": "project-1", "identifier": "user-1", "changes": format!("{z} {} refs/heads/x", "b".repeat(64))}),
            422,
            Some("changes[0].new_sha"),
        ),
    ];
    let client = reqwest::Client::new();
    for (body, status, field) in cases {
        let resp = client.post(&url).json(&body).send().await.unwrap();
        assert_eq!(resp.status().as_u16(), status, "{body}");
        let json: serde_json::Value = resp.json().await.unwrap();
        assert_eq!(json["field"].as_str(), field, "{body}");
        assert!(json["error"].as_str().is_some_and(|e| !e.is_empty()));
    }
    let resp = client.post(&url).body("{not json").send().await.unwrap();
    assert_eq!(resp.status(), 400);
    // A body declared too large is refused before a byte of it is read.
    // (An HTTP client that sends the body races the 413 and the close, and
    // may see only a reset.)
    let mut tcp = tokio::net::TcpStream::connect(stack.ingest).await.unwrap();
    let head = format!(
        "POST /api/v4/internal/post_receive HTTP/1.1\r\nhost: {}\r\n\
         content-type: application/json\r\ncontent-length: {}\r\n\r\n",
        stack.ingest,
        9 * 1024 * 1024
    );
    tcp.write_all(head.as_bytes()).await.unwrap();
    let mut answer = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), tcp.read_to_end(&mut answer))
        .await
        .expect("no answer to a body declared too large")
        .unwrap();
    let answer = String::from_utf8_lossy(&answer);
    assert!(answer.starts_with("HTTP/1.1 413"), "{answer}");
    assert!(
        answer.contains("--ingest-max-body-bytes") || answer.contains("before authentication"),
        "{answer}"
    );

    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(&nats).await);
    let mut stream = js
        .get_stream(pushbus_shared::names::STREAM_PUSHES)
        .await
        .unwrap();
    assert_eq!(
        stream.info().await.unwrap().state.messages,
        0,
        "a refused push was published"
    );
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn ingest_down_during_push_spools_and_flush_delivers_once() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dead = format!("http://127.0.0.1:{}", pushbus_shared::testkit::free_port());
    let (bare, work) = repo_with_hook(
        tmp.path(),
        77,
        &format!("--ingest-url {dead} --timeout-ms 500"),
        &[],
    );
    std::fs::write(work.join("f"), "x\n").unwrap();
    git(&work, &["add", "f"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    // The push succeeds although nothing listens.
    let push = git(&work, &["push", "origin", "HEAD:refs/heads/main"]);
    let output = String::from_utf8_lossy(&push.stderr);
    assert!(output.contains("notification spooled"), "{output}");
    let spool = bare.join("pushbus-spool");
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);

    let stack = Stack::start(&nats.url()).await;
    let flush = |url: String| {
        Command::new(PUSHBUS)
            .args(["hook", "flush", "--ingest-url", &url])
            .env("GIT_DIR", &bare)
            .output()
            .unwrap()
    };
    let out = flush(format!("http://{}", stack.ingest));
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        String::from_utf8_lossy(&out.stderr)
            .contains("1 spooled notification(s) delivered, 0 left")
    );
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 0);
    // Flushing again sends nothing more; exactly one event is stored.
    assert!(flush(format!("http://{}", stack.ingest)).status.success());
    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(&nats).await);
    let mut stream = js
        .get_stream(pushbus_shared::names::STREAM_PUSHES)
        .await
        .unwrap();
    assert_eq!(stream.info().await.unwrap().state.messages, 1);
    let stored = stream.get_raw_message(1).await.unwrap();
    let env = pushbus_shared::envelope::decode(&stored.payload).unwrap();
    let event: pushbus_shared::proto::GitPushEvent = pushbus_shared::envelope::open(&env).unwrap();
    assert_eq!(event.project_id, 77);
    assert_eq!(event.changes[0].r#ref, "refs/heads/main");
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn branches_tags_deletes_and_push_options_arrive_as_events() {
    use pushbus_shared::proto::{ChangeKind, GitPushEvent, RefKind};
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let tmp = tempfile::tempdir().unwrap();
    let (_, work) = repo_with_hook(
        tmp.path(),
        31,
        &format!("--ingest-url http://{}", stack.ingest),
        &[("receive.advertisePushOptions", "true")],
    );
    std::fs::write(work.join("f"), "x\n").unwrap();
    git(&work, &["add", "f"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    git(&work, &["tag", "v1.0"]);
    git(
        &work,
        &[
            "push",
            "-o",
            "ci.skip",
            "-o",
            "deploy=prod",
            "origin",
            "HEAD:refs/heads/main",
            "HEAD:refs/heads/tmp",
            "refs/tags/v1.0",
        ],
    );
    git(&work, &["push", "origin", ":refs/heads/tmp"]);

    let js = async_nats::jetstream::new(pushbus_shared::testkit::client(&nats).await);
    let stream = js
        .get_stream(pushbus_shared::names::STREAM_PUSHES)
        .await
        .unwrap();
    let event = |seq| {
        let stream = stream.clone();
        async move {
            let m = stream.get_raw_message(seq).await.unwrap();
            let env = pushbus_shared::envelope::decode(&m.payload).unwrap();
            pushbus_shared::envelope::open::<GitPushEvent>(&env).unwrap()
        }
    };
    let first = event(1).await;
    assert_eq!(first.project_id, 31);
    assert_eq!(first.push_options, vec!["ci.skip", "deploy=prod"]);
    let mut refs: Vec<(String, i32, i32)> = first
        .changes
        .iter()
        .map(|c| (c.r#ref.clone(), c.ref_kind, c.change_kind))
        .collect();
    refs.sort();
    assert_eq!(
        refs,
        vec![
            (
                "refs/heads/main".into(),
                RefKind::Branch as i32,
                ChangeKind::Create as i32
            ),
            (
                "refs/heads/tmp".into(),
                RefKind::Branch as i32,
                ChangeKind::Create as i32
            ),
            (
                "refs/tags/v1.0".into(),
                RefKind::Tag as i32,
                ChangeKind::Create as i32
            ),
        ]
    );
    let delete = event(2).await;
    assert_eq!(delete.changes.len(), 1);
    assert_eq!(delete.changes[0].r#ref, "refs/heads/tmp");
    assert_eq!(delete.changes[0].change_kind, ChangeKind::Delete as i32);
    assert!(delete.push_options.is_empty());
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn jetstream_down_means_503_with_a_reason() {
    let mut nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    nats.kill();
    let body = serde_json::json!({
        "gl_repository": "project-4",
        "identifier": "user-1",
        "changes": format!("{} {} refs/heads/main", "1".repeat(40), "2".repeat(40)),
    });
    let resp = stack.post_receive(&body, &[]).await;
    assert_eq!(resp.status(), 503);
    let json: serde_json::Value = resp.json().await.unwrap();
    // The reason says which step failed: no connection, no room to send,
    // or no ack from the stream.
    let reasons = [
        "not connected to NATS",
        "timed out sending to the stream",
        "the stream did not confirm in time",
        "no publish ack for event",
        "cannot publish event",
    ];
    assert!(
        json["error"]
            .as_str()
            .is_some_and(|e| reasons.iter().any(|r| e.starts_with(r))),
        "{json}"
    );
    nats.start_again();
    // Back up: the same service stores pushes again without a restart.
    let every = std::time::Duration::from_millis(100);
    poll("push stored again", SETTLE, every, async || {
        match stack.post_receive(&body, &[]).await.status() {
            reqwest::StatusCode::OK => Ok(()),
            status => Err(format!("answered {status}")),
        }
    })
    .await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn path_filtered_agent_is_poked_only_for_its_paths() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    agents_put(
        &nats.url(),
        tmp.path(),
        "agent_id: deployer\npublic: true\nwatches:\n  - project_id: 55\n    refs:\n      branch: main\n    paths: [\"deploy/**\"]\n",
    );
    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}/v1/agents/deployer/pokes", stack.notifier);
    let mut sse = SseReader::new(SseReader::connect(&url, None).await);
    assert_eq!(
        sse.next_event(Duration::from_secs(10)).await.unwrap().0,
        "status"
    );

    let (_, work) = repo_with_hook(
        tmp.path(),
        55,
        &format!("--ingest-url http://{}", stack.ingest),
        &[],
    );
    let commit_push = |path: &str| {
        let file = work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(&file, format!("{path}\n")).unwrap();
        git(&work, &["add", "."]);
        git(&work, &["commit", "-q", "-m", path]);
        git(&work, &["push", "-q", "origin", "HEAD:refs/heads/main"]);
        String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout)
            .unwrap()
            .trim()
            .to_owned()
    };
    // Creating the branch: paths unknown, so the agent is poked.
    let created = commit_push("README");
    let (_, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("poke for the create");
    assert!(data.contains(&created), "{data}");
    // An update outside deploy/ pokes nobody; the next poke is for deploy/.
    commit_push("src/main.rs");
    let deployed = commit_push("deploy/app.yaml");
    let (_, data) = sse
        .next_event(Duration::from_secs(15))
        .await
        .expect("poke for deploy/");
    let poke: serde_json::Value = serde_json::from_str(&data).unwrap();
    assert_eq!(poke["new_sha"], deployed.as_str());
    assert_eq!(poke["change"], "update");
    stack.stop().await;
}
