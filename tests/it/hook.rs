//! The hook command (`pushbus hook post-receive` / `hook flush`) as git and
//! Gitaly run it: real `git push`, real hook-ingest, real HTTP impostors.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use axum::http::StatusCode;
use pushbus_shared::names;
use pushbus_shared::proto::{ChangeKind, GitPushEvent, RefChange, RepositoryKind};
use pushbus_shared::testkit::{NatsServer, free_port};

use crate::fixtures::{bare_with_hook, clone, git, git_env, run_with_stdin};
use crate::support::{Stack, stored_events};

const PUSHBUS: &str = env!("CARGO_BIN_EXE_pushbus");

/// A bare repository named `name` whose post-receive hook runs the hook
/// command with `hook_args` and no git config of ours, HEAD on `head`, and a
/// clone with one commit to push from.
pub fn bare_repo(dir: &Path, name: &str, head: &str, hook_args: &str) -> (PathBuf, PathBuf) {
    let bare = dir.join(format!("{name}.git"));
    bare_with_hook(dir, &bare, hook_args);
    git(
        &bare,
        &["symbolic-ref", "HEAD", &format!("refs/heads/{head}")],
    );
    let work = dir.join(format!("{name}-work"));
    clone(dir, &bare, &work);
    std::fs::write(work.join("f"), format!("{name}\n")).unwrap();
    git(&work, &["add", "f"]);
    git(&work, &["commit", "-q", "-m", "one"]);
    (bare, work)
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs the hook command directly, with `stdin` as git would give it.
fn hook(args: &[&str], env: &[(&str, &str)], stdin: &str) -> Output {
    run_with_stdin(
        Command::new(PUSHBUS)
            .arg("hook")
            .args(args)
            .envs(env.iter().copied()),
        stdin,
    )
}

/// `hook post-receive` of project 5 against `url`, spooling to `spool`.
fn post_receive(url: &str, spool: &str, env: &[(&str, &str)], stdin: &str) -> Output {
    hook(
        &[
            "post-receive",
            "--ingest-url",
            url,
            "--project-id",
            "5",
            "--spool-dir",
            spool,
        ],
        env,
        stdin,
    )
}

/// `hook flush` of `spool` to `url`.
fn flush(url: &str, spool: &str) -> Output {
    hook(
        &["flush", "--ingest-url", url, "--spool-dir", spool],
        &[],
        "",
    )
}

/// A URL nothing listens on (a port just freed).
fn dead_url() -> String {
    format!("http://127.0.0.1:{}", free_port())
}

/// A temporary directory and a spool path in it (not made yet), also as a
/// string for `--spool-dir`.
fn temp_spool() -> (tempfile::TempDir, PathBuf, String) {
    let tmp = tempfile::tempdir().unwrap();
    let spool = tmp.path().join("spool");
    let arg = spool.to_str().unwrap().to_owned();
    (tmp, spool, arg)
}

fn spooled(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(dir)
        .map(|rd| {
            rd.filter_map(|e| e.ok().map(|e| e.path()))
                .filter(|p| p.extension().is_some_and(|x| x == "json"))
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    files
}

fn change(n: u32) -> String {
    format!("{} {:040x} refs/heads/main\n", "0".repeat(40), n)
}

async fn pushes(nats: &NatsServer) -> Vec<(pushbus_shared::EventMeta, GitPushEvent)> {
    stored_events(nats, names::STREAM_PUSHES).await
}

/// Exactly one push was stored, under `correlation_id`.
async fn assert_only_stored(nats: &NatsServer, correlation_id: &str) {
    let ids: Vec<String> = pushes(nats)
        .await
        .into_iter()
        .map(|(meta, _)| meta.correlation_id)
        .collect();
    assert_eq!(ids, vec![correlation_id.to_owned()]);
}

/// An HTTP server that answers every request with `status`, `headers` and `body`.
async fn impostor(
    status: StatusCode,
    headers: &'static [(&'static str, &'static str)],
    body: &'static str,
) -> String {
    let app = axum::Router::new().fallback(move || async move {
        let mut resp = axum::response::Response::new(axum::body::Body::from(body));
        *resp.status_mut() = status;
        for (k, v) in headers {
            resp.headers_mut().insert(*k, v.parse().unwrap());
        }
        resp
    });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move { axum::serve(listener, app).await });
    format!("http://{addr}")
}

/// Accepts connections and never answers.
pub async fn black_hole() -> String {
    counted_black_hole().await.0
}

/// A black hole that counts the connections it was given.
pub async fn counted_black_hole() -> (String, Arc<AtomicUsize>) {
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let count = Arc::new(AtomicUsize::new(0));
    let counted = count.clone();
    tokio::spawn(async move {
        let mut held = Vec::new();
        while let Ok((conn, _)) = listener.accept().await {
            counted.fetch_add(1, Ordering::SeqCst);
            held.push(conn);
        }
    });
    (format!("http://{addr}"), count)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_spools_a_correlation_id_with_slashes_and_replays_it_under_the_same_id() {
    let nats = NatsServer::start();
    let tmp = tempfile::tempdir().unwrap();
    let dead = dead_url();
    let (bare, work) = bare_repo(
        tmp.path(),
        "repo",
        "main",
        &format!("--ingest-url {dead} --timeout-ms 500 --project-id 77"),
    );
    // Valid for hook-ingest, and a path traversal as a file name.
    let odd = "../../etc/x/gitaly:corr/1";
    let push = git_env(
        &work,
        &["push", "origin", "HEAD:refs/heads/main"],
        &[("CORRELATION_ID", odd)],
    );
    let output = stderr(&push);
    assert!(
        output.contains("notification spooled for replay"),
        "{output}"
    );
    assert!(output.contains(odd), "pusher not told the ID: {output}");
    let spool = bare.join("pushbus-spool");
    let files = spooled(&spool);
    assert_eq!(files.len(), 1, "{output}");
    assert_eq!(files[0].parent().unwrap(), spool, "escaped the spool dir");
    let entry: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(entry["correlation_id"], odd);
    // No temp file left behind.
    assert_eq!(std::fs::read_dir(&spool).unwrap().count(), 1);

    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}", stack.ingest);
    let out = hook(
        &["flush", "--ingest-url", &url],
        &[("GIT_DIR", bare.to_str().unwrap())],
        "",
    );
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(
        stderr(&out).contains("1 spooled notification(s) delivered, 0 left"),
        "{}",
        stderr(&out)
    );
    assert!(spooled(&spool).is_empty());
    let stored = pushes(&nats).await;
    assert_eq!(stored.len(), 1);
    assert_eq!(stored[0].0.correlation_id, odd);
    assert_eq!(stored[0].1.project_id, 77);

    // The same notification sent again under that ID is the same event:
    // the stream keeps one.
    let sha = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout).unwrap();
    let out = hook(
        &["post-receive", "--ingest-url", &url, "--project-id", "77"],
        &[("CORRELATION_ID", odd), ("GIT_DIR", bare.to_str().unwrap())],
        &format!("{} {} refs/heads/main\n", "0".repeat(40), sha.trim()),
    );
    assert!(stderr(&out).contains("push announced"), "{}", stderr(&out));
    let again = pushes(&nats).await;
    assert_eq!(again.len(), 1, "replay and resend stored twice");
    stack.stop().await;
}

// A Git server's proxy variables are for its outbound traffic: the push,
// and the JWT signed with the shell secret, go to hook-ingest directly.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_goes_to_hook_ingest_directly_whatever_the_proxy_variables_say() {
    let nats = NatsServer::start();
    let (_dir, secret) = crate::doors::secret_file("s3cret");
    let stack = Stack::start_with_secret(&nats.url(), Some(secret.clone())).await;
    let (proxy, via_proxy) = counted_black_hole().await;
    let (_tmp, spool, _) = temp_spool();
    let proxies: Vec<(&str, &str)> = ["http_proxy", "HTTP_PROXY", "https_proxy", "ALL_PROXY"]
        .into_iter()
        .map(|var| (var, proxy.as_str()))
        .collect();
    let out = hook(
        &[
            "post-receive",
            "--ingest-url",
            &format!("http://{}", stack.ingest),
            "--project-id",
            "5",
            "--secret-file",
            secret.to_str().unwrap(),
            "--spool-dir",
            spool.to_str().unwrap(),
        ],
        &proxies,
        &change(1),
    );
    assert!(stderr(&out).contains("push announced"), "{}", stderr(&out));
    assert_eq!(
        via_proxy.load(Ordering::SeqCst),
        0,
        "the proxy got the push"
    );
    assert!(spooled(&spool).is_empty());
    assert_eq!(pushes(&nats).await.len(), 1);
    stack.stop().await;
}

// A hook missing its secret file is refused as unauthenticated whatever the
// size of its push: small or large, the push is spooled (401), to be
// replayed once the secret is set, never dropped as refused content.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_push_too_large_to_send_unauthenticated_is_spooled_then_replayed_with_the_secret() {
    let nats = NatsServer::start();
    let (_dir, secret) = crate::doors::secret_file("s3cret");
    let stack = Stack::start_with_secret(&nats.url(), Some(secret.clone())).await;
    let (_tmp, spool, _) = temp_spool();
    let url = format!("http://{}", stack.ingest);
    let args = ["--ingest-url", &url, "--spool-dir", spool.to_str().unwrap()];
    // Over the 64 KiB hook-ingest reads before it knows the caller.
    let many: String = (1..=1000)
        .map(|n| format!("{} {n:040x} refs/heads/branch-{n}\n", "0".repeat(40)))
        .collect();
    assert!(many.len() > 64 * 1024);
    // The large one first, so it meets hook-ingest rather than queueing
    // behind a spooled one.
    for (id, stdin) in [("large", many), ("small", change(1))] {
        let mut run = vec!["post-receive", "--project-id", "5"];
        run.extend(args);
        let out = hook(&run, &[("CORRELATION_ID", id)], &stdin);
        let text = stderr(&out);
        assert!(out.status.success(), "{id}: {text}");
        assert!(
            text.contains("notification spooled for replay") && text.contains("401"),
            "{id}: {text}"
        );
    }
    assert_eq!(spooled(&spool).len(), 2);
    assert!(pushes(&nats).await.is_empty());

    let mut flush = vec!["flush", "--secret-file", secret.to_str().unwrap()];
    flush.extend(args);
    let out = hook(&flush, &[], "");
    assert!(out.status.success(), "{}", stderr(&out));
    assert!(spooled(&spool).is_empty());
    assert!(!spool.join("refused").exists(), "a push was refused");
    let stored = pushes(&nats).await;
    let refs = |id: &str| -> usize {
        stored
            .iter()
            .filter(|(m, _)| m.correlation_id == id)
            .map(|(_, e)| e.changes.len())
            .sum()
    };
    assert_eq!((refs("small"), refs("large")), (1, 1000));
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_spools_when_the_url_answers_but_is_not_hook_ingest() {
    let nats = NatsServer::start();
    let (_tmp, spool, spool_arg) = temp_spool();
    let impostors = [
        // A web server's page.
        (
            impostor(
                StatusCode::OK,
                &[("content-type", "text/html")],
                "<html>hi</html>",
            )
            .await,
            "HTTP 200 but not a pushbus reply",
        ),
        // A gRPC server: 200 with grpc-status 12 (unimplemented), no body.
        (
            impostor(
                StatusCode::OK,
                &[("content-type", "application/grpc"), ("grpc-status", "12")],
                "",
            )
            .await,
            "HTTP 200 but not a pushbus reply",
        ),
        // JSON, but not pushbus' reply.
        (
            impostor(
                StatusCode::OK,
                &[("content-type", "application/json")],
                "{\"ok\":true}",
            )
            .await,
            "HTTP 200 but not a pushbus reply",
        ),
        (
            impostor(
                StatusCode::NOT_FOUND,
                &[("content-type", "application/json")],
                "{\"error\":\"no route\"}",
            )
            .await,
            "404 Not Found: no route",
        ),
        (
            impostor(StatusCode::BAD_GATEWAY, &[], "upstream gone").await,
            "502 Bad Gateway, not a pushbus reply: upstream gone",
        ),
    ];
    for (i, (url, why)) in impostors.iter().enumerate() {
        let out = post_receive(
            url,
            &spool_arg,
            &[("CORRELATION_ID", &format!("impostor-{i}"))],
            &change(i as u32 + 1),
        );
        let text = stderr(&out);
        assert!(out.status.success());
        assert!(
            text.contains("notification spooled for replay"),
            "{url}: {text}"
        );
        assert!(text.contains(why), "{url}: want {why:?} in {text}");
        assert!(!text.contains("push announced"), "{text}");
        // The next run replays first and stops at the impostor: this one
        // queues behind, nothing is lost.
        assert_eq!(spooled(&spool).len(), i + 1, "{text}");
    }

    // A broken setup (unreadable secret file) spools too, to be replayed
    // once it is fixed.
    let n = impostors.len();
    let out = hook(
        &[
            "post-receive",
            "--ingest-url",
            &impostors[0].0,
            "--project-id",
            "5",
            "--spool-dir",
            &spool_arg,
            "--secret-file",
            "/nonexistent/pushbus-secret",
        ],
        &[("CORRELATION_ID", &format!("impostor-{n}"))],
        &change(n as u32 + 1),
    );
    let text = stderr(&out);
    assert!(
        text.contains("cannot read /nonexistent/pushbus-secret")
            && text.contains("notification spooled for replay"),
        "{text}"
    );
    assert_eq!(spooled(&spool).len(), n + 1);

    // Pointed at hook-ingest, every one arrives, in spool order.
    let stack = Stack::start(&nats.url()).await;
    let out = flush(&format!("http://{}", stack.ingest), &spool_arg);
    assert!(out.status.success(), "{}", stderr(&out));
    let stored = pushes(&nats).await;
    let ids: Vec<String> = stored
        .iter()
        .map(|(m, _)| m.correlation_id.clone())
        .collect();
    let want: Vec<String> = (0..=impostors.len())
        .map(|i| format!("impostor-{i}"))
        .collect();
    assert_eq!(ids, want);
    stack.stop().await;
}

// Neither delivered nor spooled: the pusher is told where the spool failed
// and which push it was, and the push itself is not failed for it. A spool
// that cannot be read is said to be so, never taken for an empty one.
#[test]
fn a_spool_that_cannot_be_written_is_named_with_the_push() {
    let tmp = tempfile::tempdir().unwrap();
    // A directory cannot be made under a file, whoever runs the test.
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let spool = file.join("spool");
    let out = hook(
        &[
            "post-receive",
            "--ingest-url",
            &dead_url(),
            "--project-id",
            "5",
            "--spool-dir",
            spool.to_str().unwrap(),
        ],
        &[("PUSHBUS_CORRELATION_ID", "lost-1")],
        &change(1),
    );
    assert!(out.status.success(), "a hook failure would fail the push");
    let said = stderr(&out);
    assert!(
        said.contains(&format!("not spooled to {}", spool.display()))
            && said.contains("correlation ID lost-1"),
        "{said}"
    );
    // Nor could older notifications be read: said, not taken for an empty spool.
    assert!(
        said.contains(&format!("cannot read the spool {}", spool.display())),
        "{said}"
    );

    // `hook flush` of such a spool fails, naming it.
    let out = flush(&dead_url(), spool.to_str().unwrap());
    let said = stderr(&out);
    assert!(!out.status.success(), "{said}");
    assert!(
        said.contains(&format!("Error: cannot read the spool {}", spool.display())),
        "{said}"
    );
}

// A spool nobody can read holds nothing this push could wait behind: the
// push is sent (and stored) all the same, and the pusher is told the spool
// was not replayed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spool_that_cannot_be_read_does_not_hold_the_push_back() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let tmp = tempfile::tempdir().unwrap();
    // A directory cannot be read under a file, whoever runs the test.
    let file = tmp.path().join("file");
    std::fs::write(&file, "").unwrap();
    let spool = file.join("spool");
    let out = post_receive(
        &format!("http://{}", stack.ingest),
        spool.to_str().unwrap(),
        &[("CORRELATION_ID", "unheld")],
        &change(1),
    );
    let said = stderr(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains(&format!("cannot read the spool {}", spool.display()))
            && said.contains("spooled notifications not replayed"),
        "{said}"
    );
    assert!(said.contains("push announced"), "{said}");
    assert_only_stored(&nats, "unheld").await;
    stack.stop().await;
}

// A spooled notification hook-ingest refuses as content (an invalid ref
// name) will never be accepted: the replay sets it aside in refused/ and
// goes on with the next one, which is stored.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_notification_refused_as_content_moves_to_refused_and_the_rest_replay() {
    let nats = NatsServer::start();
    let (_tmp, spool, spool_arg) = temp_spool();
    let dead = dead_url();
    let bad = format!("{} {:040x} refs/heads/a..b\n", "0".repeat(40), 1);
    for (id, stdin) in [("bad-ref", bad), ("good", change(2))] {
        let out = post_receive(&dead, &spool_arg, &[("CORRELATION_ID", id)], &stdin);
        assert!(
            stderr(&out).contains("notification spooled for replay"),
            "{id}: {}",
            stderr(&out)
        );
    }
    assert_eq!(spooled(&spool).len(), 2);

    let stack = Stack::start(&nats.url()).await;
    let out = flush(&format!("http://{}", stack.ingest), &spool_arg);
    let said = stderr(&out);
    assert!(out.status.success(), "{said}");
    assert!(
        said.contains("spooled notification bad-ref refused (422")
            && said.contains("must not contain '..'"),
        "{said}"
    );
    assert!(spooled(&spool).is_empty(), "{said}");
    let set_aside = spooled(&spool.join("refused"));
    assert_eq!(set_aside.len(), 1, "{said}");
    let kept = std::fs::read_to_string(&set_aside[0]).unwrap();
    assert!(
        kept.contains("refs/heads/a..b"),
        "the entry is kept whole: {kept}"
    );
    assert_only_stored(&nats, "good").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_flush_and_post_receive_never_wait_past_the_timeout() {
    let (_tmp, spool, spool_arg) = temp_spool();
    let dead = dead_url();
    for i in 0..4 {
        let out = post_receive(&dead, &spool_arg, &[], &change(i + 1));
        assert!(stderr(&out).contains("spooled"), "{}", stderr(&out));
    }
    assert_eq!(spooled(&spool).len(), 4);

    // A server that accepts and never answers: each call would hang for
    // the whole timeout, yet the run as a whole stays within it. Even with
    // RUST_BACKTRACE set (resolving a backtrace for the failure once took
    // seconds), and the pusher is shown the cause, not a backtrace.
    let hole = black_hole().await;
    let started = Instant::now();
    let out = hook(
        &[
            "flush",
            "--ingest-url",
            &hole,
            "--spool-dir",
            &spool_arg,
            "--timeout-ms",
            "700",
        ],
        &[("RUST_BACKTRACE", "1")],
        "",
    );
    let took = started.elapsed();
    assert!(!out.status.success(), "flush reported success");
    assert!(
        stderr(&out).contains("0 spooled notification(s) delivered, 4 left"),
        "{}",
        stderr(&out)
    );
    assert!(
        stderr(&out).contains("Error: hook-ingest still unreachable")
            && !stderr(&out).to_lowercase().contains("backtrace"),
        "{}",
        stderr(&out)
    );
    assert!(took < Duration::from_millis(1_500), "flush took {took:?}");

    let started = Instant::now();
    let out = hook(
        &[
            "post-receive",
            "--ingest-url",
            &hole,
            "--project-id",
            "5",
            "--spool-dir",
            &spool_arg,
            "--timeout-ms",
            "700",
        ],
        &[],
        &change(9),
    );
    let took = started.elapsed();
    assert!(out.status.success());
    assert!(stderr(&out).contains("spooled"), "{}", stderr(&out));
    assert!(took < Duration::from_millis(1_500), "hook took {took:?}");
    assert_eq!(spooled(&spool).len(), 5);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_spool_entries_past_the_max_age_move_to_expired_not_replayed() {
    let nats = NatsServer::start();
    let (_tmp, spool, spool_arg) = temp_spool();
    let dead = dead_url();
    for (i, id) in ["old-one", "fresh-one"].iter().enumerate() {
        hook(
            &[
                "post-receive",
                "--ingest-url",
                &dead,
                "--project-id",
                "6",
                "--spool-dir",
                &spool_arg,
            ],
            &[("CORRELATION_ID", id)],
            &change(i as u32 + 1),
        );
    }
    let files = spooled(&spool);
    assert_eq!(files.len(), 2);
    // Age the first entry by three hours.
    let mut old: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&files[0]).unwrap()).unwrap();
    assert_eq!(old["correlation_id"], "old-one");
    let at = old["spooled_at"].as_u64().expect("spooled_at");
    old["spooled_at"] = (at - 3 * 3600).into();
    std::fs::write(&files[0], old.to_string()).unwrap();

    let stack = Stack::start(&nats.url()).await;
    let url = format!("http://{}", stack.ingest);
    // The limit must stay below the stream's 7 days.
    for bad in ["0", "168", "1000"] {
        let out = hook(
            &[
                "flush",
                "--ingest-url",
                &url,
                "--spool-dir",
                &spool_arg,
                "--spool-max-age-hours",
                bad,
            ],
            &[],
            "",
        );
        assert!(!out.status.success(), "accepted max age {bad}");
        assert!(
            stderr(&out).contains("--spool-max-age-hours"),
            "{}",
            stderr(&out)
        );
    }
    assert_eq!(spooled(&spool).len(), 2, "a refused flag replayed anyway");

    let out = hook(
        &["flush", "--ingest-url", &url, "--spool-dir", &spool_arg],
        &[("PUSHBUS_SPOOL_MAX_AGE_HOURS", "2")],
        "",
    );
    let text = stderr(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains("1 spooled notification(s) delivered, 0 left, 1 expired"),
        "{text}"
    );
    assert!(
        text.contains("old-one") && text.contains("not replayed") && text.contains("expired"),
        "{text}"
    );
    let expired = spooled(&spool.join("expired"));
    assert_eq!(expired.len(), 1);
    assert_eq!(expired[0].file_name(), files[0].file_name());
    assert_only_stored(&nats, "fresh-one").await;
    stack.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hook_as_a_gitaly_server_hook_reads_gl_variables_and_head() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let tmp = tempfile::tempdir().unwrap();
    let args = format!("--ingest-url http://{}", stack.ingest);
    // (GL_REPOSITORY, HEAD, expected kind, project ID)
    let repos = [
        ("project-42", "trunk", RepositoryKind::Project, 42),
        ("wiki-42", "main", RepositoryKind::Wiki, 42),
        ("snippet-7", "master", RepositoryKind::Snippet, 7),
    ];
    for (i, (gl_repository, head, _, _)) in repos.iter().enumerate() {
        let name = format!("r{i}");
        let (_, work) = bare_repo(tmp.path(), &name, head, &args);
        // What Gitaly puts in a custom hook's environment; no git config.
        let push = git_env(
            &work,
            &["push", "origin", "HEAD:refs/heads/main"],
            &[
                ("GL_REPOSITORY", gl_repository),
                ("GL_PROJECT_PATH", "group/app"),
                ("GL_ID", "user-5"),
                ("GL_USERNAME", "alice"),
                ("GL_PROTOCOL", "ssh"),
                ("CORRELATION_ID", &format!("01gitaly{i}")),
            ],
        );
        assert!(
            stderr(&push).contains("push announced"),
            "{}",
            stderr(&push)
        );
    }
    // GL_USERNAME stands in when GL_ID is absent.
    let (_, work) = bare_repo(tmp.path(), "r3", "main", &args);
    git_env(
        &work,
        &["push", "origin", "HEAD:refs/heads/main"],
        &[
            ("GL_REPOSITORY", "project-43"),
            ("GL_USERNAME", "bob"),
            ("CORRELATION_ID", "01gitaly3"),
        ],
    );
    // A malformed GL_REPOSITORY is named to the pusher, nothing is sent.
    let (_, work) = bare_repo(tmp.path(), "r4", "main", &args);
    let push = git_env(
        &work,
        &["push", "origin", "HEAD:refs/heads/main"],
        &[("GL_REPOSITORY", "repo-1")],
    );
    assert!(
        stderr(&push).contains("GL_REPOSITORY \"repo-1\"")
            && stderr(&push).contains("not announced"),
        "{}",
        stderr(&push)
    );

    let stored = pushes(&nats).await;
    assert_eq!(stored.len(), 4);
    for (i, (_, head, kind, id)) in repos.iter().enumerate() {
        let (meta, event) = &stored[i];
        assert_eq!(meta.correlation_id, format!("01gitaly{i}"));
        assert_eq!(event.project_id, *id);
        assert_eq!(event.repository_kind, *kind as i32, "{event:?}");
        assert_eq!(event.project_path, "group/app");
        assert_eq!(event.actor, "user-5");
        assert_eq!(event.protocol, "ssh");
        assert_eq!(event.default_branch, *head);
        assert_eq!(event.changes[0].r#ref, "refs/heads/main");
    }
    let (meta, event) = &stored[3];
    assert_eq!(meta.correlation_id, "01gitaly3");
    assert_eq!(event.project_id, 43);
    assert_eq!(event.actor, "username-bob");
    assert_eq!(event.protocol, "hook");
    stack.stop().await;
}

/// Commits new files at `paths` on `branch`, made anew from `base`, in `work`.
fn commit_on(work: &Path, branch: &str, base: &str, paths: &[String]) {
    git(work, &["checkout", "-q", "-B", branch, base]);
    for path in paths {
        let file = work.join(path);
        std::fs::create_dir_all(file.parent().unwrap()).unwrap();
        std::fs::write(file, "x\n").unwrap();
    }
    git(work, &["add", "-A"]);
    git(work, &["commit", "-q", "-m", branch]);
}

/// One `git push` of every refspec in `refspecs`.
fn push_refspecs(work: &Path, refspecs: &[String]) {
    let mut push = vec!["push", "-q", "origin"];
    push.extend(refspecs.iter().map(String::as_str));
    git(work, &push);
}

/// Every ref update (not create or delete) stored so far, by ref.
async fn updates(nats: &NatsServer) -> std::collections::HashMap<String, RefChange> {
    pushes(nats)
        .await
        .into_iter()
        .flat_map(|(_, event)| event.changes)
        .filter(|c| c.change_kind == ChangeKind::Update as i32)
        .map(|c| (c.r#ref.clone(), c))
        .collect()
}

// The hook diffs every updated ref for filters by path, within bounds so a
// huge push never stalls the pusher: only the first 20 refs of a push, and
// only refs with at most 2,000 changed paths. Past a bound the paths are
// unknown (filters then match any path), never a truncated list.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn changed_paths_are_sent_for_the_first_20_refs_up_to_2000_paths_each() {
    let nats = NatsServer::start();
    let stack = Stack::start(&nats.url()).await;
    let tmp = tempfile::tempdir().unwrap();
    let args = format!("--ingest-url http://{} --project-id 5", stack.ingest);
    let (_, work) = bare_repo(tmp.path(), "paths", "main", &args);
    let base = String::from_utf8(git(&work, &["rev-parse", "HEAD"]).stdout).unwrap();
    let base = base.trim();
    let branches: Vec<String> = (1..=21).map(|n| format!("b{n:02}")).collect();
    let limits = ["at-limit".to_owned(), "over-limit".to_owned()];
    // Created first: a create's paths are unknown anyway.
    let created: Vec<String> = branches
        .iter()
        .chain(&limits)
        .map(|b| format!("{base}:refs/heads/{b}"))
        .collect();
    push_refspecs(&work, &created);

    // 21 refs updated in one push, one file each.
    for b in &branches {
        commit_on(&work, b, base, std::slice::from_ref(b));
    }
    let updated: Vec<String> = branches
        .iter()
        .map(|b| format!("{b}:refs/heads/{b}"))
        .collect();
    push_refspecs(&work, &updated);
    let got = updates(&nats).await;
    assert_eq!(got.len(), 21);
    let known: Vec<&String> = branches
        .iter()
        .filter(|b| got[&format!("refs/heads/{b}")].paths_known)
        .collect();
    assert_eq!(known.len(), 20, "{known:?}");
    for b in known {
        assert_eq!(
            got[&format!("refs/heads/{b}")].changed_paths,
            vec![b.clone()]
        );
    }

    // 2,000 changed paths are sent; 2,001 are not, not even in part.
    for (branch, files) in limits.iter().zip([2000, 2001]) {
        let paths: Vec<String> = (0..files).map(|n| format!("{branch}/{n}")).collect();
        commit_on(&work, branch, base, &paths);
    }
    let updated: Vec<String> = limits
        .iter()
        .map(|b| format!("{b}:refs/heads/{b}"))
        .collect();
    push_refspecs(&work, &updated);
    let got = updates(&nats).await;
    let at = &got["refs/heads/at-limit"];
    assert!(at.paths_known);
    assert_eq!(at.changed_paths.len(), 2000);
    let over = &got["refs/heads/over-limit"];
    assert!(!over.paths_known);
    assert!(over.changed_paths.is_empty());
    stack.stop().await;
}

// Whatever a server answers reaches the pusher's terminal only as plain
// text: escape sequences (a title change, a screen clear), other control
// characters and bidirectional overrides are stripped, from a reply's
// messages and from an error alike, and the words around them kept.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_text_reaches_the_pushers_terminal_without_escapes() {
    let (_tmp, spool, _) = temp_spool();
    let replies = [
        impostor(
            StatusCode::OK,
            &[("content-type", "application/json")],
            r#"{"reference_counter_decreased":true,"correlation_id":"c","event_ids":[],
                "messages":[{"type":"basic","message":"lag \u001b]0;pwned\u0007\u001b[2Jhere\u202eevil\u0008"}]}"#,
        )
        .await,
        impostor(
            StatusCode::UNPROCESSABLE_ENTITY,
            &[("content-type", "application/json")],
            r#"{"error":"bad \u001b[31mred\u001b[0m \u009b2Jref","field":"changes"}"#,
        )
        .await,
    ];
    for (url, words) in replies
        .iter()
        .zip([["lag", "hereevil"], ["bad", "red ref"]])
    {
        let out = post_receive(url, spool.to_str().unwrap(), &[], &change(1));
        let said = stderr(&out);
        let unsafe_chars: Vec<char> = said
            .chars()
            .filter(|c| (c.is_control() && *c != '\n') || *c == '\u{202e}')
            .collect();
        assert!(unsafe_chars.is_empty(), "{unsafe_chars:?} in {said:?}");
        for w in words {
            assert!(said.contains(w), "{w:?} lost from {said:?}");
        }
    }
}

/// README's Gitaly `post-receive.d/pushbus` script, with its URL, secret
/// file, spool and binary replaced by these.
fn readmes_gitaly_script(url: &str, secret: &Path, spool: &Path) -> String {
    let readme = crate::compose::repo_file("README.md");
    let start = readme
        .find("#!/bin/sh\n# post-receive.d/pushbus")
        .expect("README's Gitaly script");
    let script = &readme[start..start + readme[start..].find("```").unwrap()];
    let mut out = script.to_owned();
    for (theirs, ours) in [
        ("https://pushbus-ingest.internal:8080", url),
        (
            "/etc/gitlab/pushbus-ingest-secret",
            secret.to_str().unwrap(),
        ),
        (
            "/var/opt/gitlab/gitaly/pushbus-spool",
            spool.to_str().unwrap(),
        ),
        ("/usr/local/bin/pushbus", PUSHBUS),
    ] {
        assert!(
            out.contains(theirs),
            "README's script no longer names {theirs}"
        );
        out = out.replace(theirs, ours);
    }
    out
}

// README's Gitaly script, as written: its variables alone (no flags, no git
// config) announce a push signed with the secret, spool it while
// hook-ingest is away, and the next push replays it first.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_readmes_gitaly_script_announces_spools_and_replays_through_its_variables() {
    let nats = NatsServer::start();
    let (_dir, secret) = crate::doors::secret_file("s3cret");
    let stack = Stack::start_with_secret(&nats.url(), Some(secret.clone())).await;
    let (tmp, spool, _) = temp_spool();
    let dead = dead_url();
    let live = format!("http://{}", stack.ingest);
    let gitaly_env = |id: &'static str| {
        [
            ("GL_REPOSITORY", "project-44"),
            ("GL_ID", "user-5"),
            ("GL_PROTOCOL", "ssh"),
            ("CORRELATION_ID", id),
        ]
    };
    for (i, url) in [dead, live].iter().enumerate() {
        let (bare, work) = bare_repo(tmp.path(), &format!("gitaly{i}"), "main", "");
        let hook = bare.join("hooks/post-receive");
        std::fs::write(&hook, readmes_gitaly_script(url, &secret, &spool)).unwrap();
        let id = ["01gitaly-away", "01gitaly-back"][i];
        let push = git_env(
            &work,
            &["push", "origin", "HEAD:refs/heads/main"],
            &gitaly_env(id),
        );
        let said = stderr(&push);
        if i == 0 {
            assert!(said.contains("notification spooled for replay"), "{said}");
            assert_eq!(spooled(&spool).len(), 1, "{said}");
        } else {
            assert!(said.contains("push announced"), "{said}");
            assert!(spooled(&spool).is_empty(), "{said}");
        }
    }
    let ids: Vec<String> = pushes(&nats)
        .await
        .into_iter()
        .map(|(meta, event)| {
            assert_eq!(event.project_id, 44);
            meta.correlation_id
        })
        .collect();
    assert_eq!(ids, ["01gitaly-away", "01gitaly-back"]);
    stack.stop().await;
}
