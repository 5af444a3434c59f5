//! Small helpers several test modules share: for the bus layer, a bus with
//! the pushes and dead-letter streams, a consumer on its own task, watches
//! and what a stream holds; for real pushes, git as a test author, bare
//! repositories with our hook, and commands fed on stdin.

use std::path::Path;
use std::process::{Command, Output, Stdio};

use async_nats::jetstream;
use prost::{Message, Name};
use pushbus_shared::bus::{ConsumeError, ConsumerSpec, Handler, Publisher, run_consumer};
use pushbus_shared::proto::ref_selector::Kind;
use pushbus_shared::proto::{
    AgentConfig, AgentPoke, ChangeKind, RefKind, RefSelector, Source, Watch,
};
use pushbus_shared::testkit::{self, NatsServer};
use pushbus_shared::topology::{self, Topology};
use tokio::task::JoinHandle;
use tokio_util::sync::CancellationToken;

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// A poke for an update of `refs/heads/main` of project `project_id`
/// (`group/app`) from `1…1` to `new_sha`, as filter publishes it.
pub(crate) fn main_branch_poke(agent_id: &str, project_id: i64, new_sha: String) -> AgentPoke {
    AgentPoke {
        agent_id: agent_id.into(),
        project_id,
        project_path: "group/app".into(),
        r#ref: "refs/heads/main".into(),
        ref_kind: RefKind::Branch as i32,
        change_kind: ChangeKind::Update as i32,
        old_sha: "1".repeat(40),
        new_sha,
        ..Default::default()
    }
}

/// The agent registry (KV pushbus-agents) on `nats`, created if need be.
pub(crate) async fn agents_kv(nats: &NatsServer) -> jetstream::kv::Store {
    jetstream::new(testkit::client(nats).await)
        .create_or_update_key_value(topology::agents_bucket())
        .await
        .unwrap()
}

/// Registers `cfg` through filter's validation, as `pushbus agents put` does.
pub(crate) async fn put_agent(nats: &NatsServer, cfg: &AgentConfig) {
    pushbus_filter::put_agent(&agents_kv(nats).await, cfg)
        .await
        .unwrap();
}

/// A JetStream context with PUSHBUS_PUSHES and the dead-letter stream, and a
/// publisher on it (source `test`).
pub(crate) async fn pushes_bus(nats: &NatsServer) -> (jetstream::Context, Publisher) {
    let js = jetstream::new(testkit::client(nats).await);
    Topology {
        streams: vec![topology::pushes_stream(), topology::dlq_stream()],
        ..Default::default()
    }
    .ensure(&js)
    .await
    .unwrap();
    (js.clone(), test_publisher(&js))
}

/// What the server says of stream `name` now.
pub(crate) async fn stream_info(js: &jetstream::Context, name: &str) -> jetstream::stream::Info {
    js.get_stream(name).await.unwrap().get_info().await.unwrap()
}

/// How many messages stream `name` holds.
pub(crate) async fn stream_messages(js: &jetstream::Context, name: &str) -> u64 {
    stream_info(js, name).await.state.messages
}

/// A publisher whose envelopes name the service `test`.
pub(crate) fn test_publisher(js: &jetstream::Context) -> Publisher {
    Publisher::new(
        js.clone(),
        Source {
            service: "test".into(),
            ..Default::default()
        },
    )
}

/// `run_consumer` on its own task, until `stop`.
pub(crate) struct RunningConsumer {
    token: CancellationToken,
    task: JoinHandle<Result<(), ConsumeError>>,
}

pub(crate) fn spawn_consumer<M, H>(
    js: &jetstream::Context,
    spec: ConsumerSpec,
    handler: H,
) -> RunningConsumer
where
    M: Message + Name + Default + Send + 'static,
    H: Handler<M>,
{
    let token = CancellationToken::new();
    let task = tokio::spawn(run_consumer(js.clone(), spec, handler, token.clone()));
    RunningConsumer { token, task }
}

impl RunningConsumer {
    /// Stops the consumer and checks it ended cleanly.
    pub(crate) async fn stop(self) {
        self.token.cancel();
        self.task.await.unwrap().unwrap();
    }
}

/// A watch on every branch of `project_id`.
pub(crate) fn any_branch_of(project_id: i64) -> Watch {
    watch_of(project_id, Kind::AnyBranch)
}

/// A watch on every ref (branches and tags) of `project_id`.
pub(crate) fn any_ref_of(project_id: i64) -> Watch {
    watch_of(project_id, Kind::AnyRef)
}

/// A watch on the refs of `project_id` that `kind` selects.
pub(crate) fn watch_of(project_id: i64, kind: Kind) -> Watch {
    Watch {
        project_id,
        refs: Some(RefSelector {
            kind: kind as i32,
            pattern: String::new(),
        }),
        ..Default::default()
    }
}

/// Runs git in `dir` as a test author, with `env` on top; asserts it succeeded.
pub(crate) fn git_env(dir: &Path, args: &[&str], env: &[(&str, &str)]) -> Output {
    let out = Command::new("git")
        .args(args)
        .current_dir(dir)
        .env("GIT_AUTHOR_NAME", "Test")
        .env("GIT_AUTHOR_EMAIL", "test@example.com")
        .env("GIT_COMMITTER_NAME", "Test")
        .env("GIT_COMMITTER_EMAIL", "test@example.com")
        .envs(env.iter().copied())
        .output()
        .expect("run git");
    assert!(
        out.status.success(),
        "git {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    out
}

pub(crate) fn git(dir: &Path, args: &[&str]) -> Output {
    git_env(dir, args, &[])
}

/// A bare repository at `bare` whose post-receive hook runs
/// `pushbus hook post-receive <hook_args>`.
pub(crate) fn bare_with_hook(dir: &Path, bare: &Path, hook_args: &str) {
    git(dir, &["init", "--bare", "-q", bare.to_str().unwrap()]);
    let hook = bare.join("hooks/post-receive");
    std::fs::write(
        &hook,
        format!("#!/bin/sh\nexec '{PUSHBUS}' hook post-receive {hook_args}\n"),
    )
    .unwrap();
    Command::new("chmod").arg("+x").arg(&hook).status().unwrap();
}

/// A clone of `bare` at `work`, to push from.
pub(crate) fn clone(dir: &Path, bare: &Path, work: &Path) {
    git(
        dir,
        &[
            "clone",
            "-q",
            bare.to_str().unwrap(),
            work.to_str().unwrap(),
        ],
    );
}

/// Runs `command` with `stdin` written to it, capturing its output.
pub(crate) fn run_with_stdin(command: &mut Command, stdin: &str) -> Output {
    use std::io::Write;
    let mut child = command
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    child
        .stdin
        .take()
        .unwrap()
        .write_all(stdin.as_bytes())
        .unwrap();
    child.wait_with_output().unwrap()
}

/// Held by the test that measures this process's memory and by the tests
/// that make it allocate tens of megabytes: they share one process, so
/// running them side by side would measure each other.
pub static PROCESS_MEMORY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());
