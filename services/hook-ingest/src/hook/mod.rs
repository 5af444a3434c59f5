//! `pushbus hook post-receive`: the hook command a bare repository runs
//! (git's own hooks, or Gitaly's `custom_hooks/post-receive.d/`). It forwards
//! git's ref updates to hook-ingest and returns the lines to show the pusher.
//! It never fails the push and never waits past its timeout. Only a
//! well-formed pushbus reply counts as delivered; anything else (hook-ingest
//! down, a wrong URL answering 200 or 404, 5xx) writes the notification to a
//! spool directory, replayed by the next hook run or `pushbus hook flush`. The
//! replay keeps the correlation ID, so a notification that did get stored
//! before is dropped as a duplicate.

use std::collections::HashMap;
use std::path::PathBuf;
use std::time::Duration;

use pushbus_shared::envelope;
use pushbus_shared::error::one_line;
use serde_json::json;
use tokio::time::Instant;

mod git;
mod send;
mod spool;

use git::{actor, changed_paths, default_branch, push_options, repository};
pub use send::SendError;
use send::Sender;
use spool::{flush_spool, write_spool};

/// PUSHBUS_PUSHES' max age in hours: the spool's limit stays below it, so
/// no entry is replayed past what the stream is configured to keep.
fn stream_max_age_hours() -> u64 {
    pushbus_shared::topology::pushes_stream().max_age.as_secs() / 3600
}

#[derive(clap::Args, Clone, Debug)]
pub struct HookArgs {
    /// Base URL of hook-ingest.
    #[arg(
        long = "ingest-url",
        env = "PUSHBUS_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,
    /// Project ID; default: git config pushbus.projectId, else GitLab's
    /// GL_REPOSITORY (project-42, wiki-42, ...).
    #[arg(long = "project-id", env = "PUSHBUS_PROJECT_ID")]
    pub project_id: Option<i64>,
    /// Project full path; default: git config pushbus.projectPath, else
    /// GitLab's GL_PROJECT_PATH.
    #[arg(long = "project-path", env = "PUSHBUS_PROJECT_PATH")]
    pub project_path: Option<String>,
    /// The whole run (replays included) never takes longer than this.
    #[arg(
        long = "timeout-ms",
        env = "PUSHBUS_HOOK_TIMEOUT_MS",
        default_value_t = 3000
    )]
    pub timeout_ms: u64,
    /// GitLab shell secret file; when given, calls carry a signed JWT.
    #[arg(long = "secret-file", env = "PUSHBUS_HOOK_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Where undeliverable notifications wait; default: pushbus-spool in
    /// the repository ($GIT_DIR).
    #[arg(long = "spool-dir", env = "PUSHBUS_HOOK_SPOOL_DIR")]
    pub spool_dir: Option<PathBuf>,
    /// Spooled notifications older than this are not replayed but moved to
    /// <spool>/expired/; must stay below PUSHBUS_PUSHES' 7 days.
    #[arg(
        long = "spool-max-age-hours",
        env = "PUSHBUS_SPOOL_MAX_AGE_HOURS",
        default_value_t = 144
    )]
    pub spool_max_age_hours: u64,
}

/// Why the hook cannot send or replay as configured. A message quotes its source
/// where a person needs it; `one_line` then leaves the source out.
#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error(
        "--spool-max-age-hours must be between 1 and {max} (below the PUSHBUS_PUSHES max age), not {given}"
    )]
    SpoolMaxAge { max: u64, given: u64 },
    #[error("cannot read {}: {source}", path.display())]
    SecretFile {
        path: PathBuf,
        source: std::io::Error,
    },
    /// Held without its URL (`reqwest::Error::without_url`): a URL may
    /// carry credentials, and this error reaches the pusher's terminal.
    #[error("cannot build the HTTP client: {source}")]
    HttpClient { source: reqwest::Error },
    #[error("cannot read the spool {}: {source}", path.display())]
    Spool {
        path: PathBuf,
        source: std::io::Error,
    },
}

impl HookArgs {
    fn spool_max_age(&self) -> Result<Duration, HookError> {
        let stream = stream_max_age_hours();
        if self.spool_max_age_hours == 0 || self.spool_max_age_hours >= stream {
            return Err(HookError::SpoolMaxAge {
                max: stream.saturating_sub(1),
                given: self.spool_max_age_hours,
            });
        }
        Ok(Duration::from_secs(self.spool_max_age_hours * 3600))
    }
}

/// What the hook tells the pusher (each entry is one `remote:` line).
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
    pub correlation_id: String,
    pub delivered: bool,
    pub spooled: bool,
    /// Earlier spooled notifications delivered by this run.
    pub replayed: usize,
}

/// What a spool replay did.
#[derive(Debug, Default)]
pub struct FlushReport {
    pub delivered: usize,
    /// Still spooled (hook-ingest unavailable, or out of time).
    pub left: usize,
    /// Moved to `<spool>/expired/`.
    pub expired: usize,
    /// Why the replay stopped early, when it did.
    pub stopped: Option<SendError>,
    /// What to tell the operator or pusher.
    pub lines: Vec<String>,
}

/// Runs the hook with git's stdin and the process environment.
pub async fn post_receive(args: &HookArgs, stdin: &str, env: &HashMap<String, String>) -> Outcome {
    let mut outcome = announce(args, stdin, env).await;
    // Every line reaches the pusher's terminal; some hold server text.
    outcome.lines = terminal_lines(std::mem::take(&mut outcome.lines));
    outcome
}

fn terminal_lines(lines: Vec<String>) -> Vec<String> {
    lines.iter().map(|l| crate::terminal::sanitize(l)).collect()
}

async fn announce(args: &HookArgs, stdin: &str, env: &HashMap<String, String>) -> Outcome {
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    // Ours first, then the one Gitaly/GitLab hooks carry.
    let correlation_id = ["PUSHBUS_CORRELATION_ID", "CORRELATION_ID"]
        .iter()
        .filter_map(|k| env.get(*k))
        .find(|c| envelope::is_valid_correlation_id(c))
        .cloned()
        .unwrap_or_else(envelope::new_correlation_id);
    let mut outcome = Outcome {
        correlation_id: correlation_id.clone(),
        ..Default::default()
    };
    // A sender that cannot be built (unreadable secret file) still spools:
    // the push is replayed once the setup is fixed.
    let setup =
        Sender::new(args).and_then(|sender| args.spool_max_age().map(|max_age| (sender, max_age)));
    let spool = spool_dir(args, env);
    let body = match repository(args, env).await {
        Ok(repo) => Ok(json!({
            "gl_repository": repo.gl_repository,
            "gl_project_path": repo.project_path,
            "identifier": actor(env),
            "changes": stdin,
            "push_options": push_options(env),
            "protocol": env.get("GL_PROTOCOL").filter(|p| !p.is_empty()).cloned().unwrap_or_else(|| "hook".into()),
            "default_branch": default_branch().await,
            "pushbus_changed_paths": changed_paths(stdin, deadline).await,
        })),
        Err(e) => Err(e),
    };
    // Older notifications first, so agents see pushes in order. `behind`:
    // why older ones still wait.
    let behind = match &setup {
        Ok((sender, max_age)) => match flush_spool(sender, &spool, *max_age, deadline).await {
            Ok(report) => {
                outcome.replayed = report.delivered;
                outcome.lines.extend(report.lines);
                report.stopped
            }
            // Nothing in it can be replayed before this push, so holding the
            // push back would only lose it too: sent, and the operator told.
            Err(e) => {
                outcome.lines.push(format!(
                    "pushbus: {}; spooled notifications not replayed",
                    one_line(&e)
                ));
                None
            }
        },
        Err(_) => None,
    };
    let body = match body {
        Ok(body) => body,
        // Display, not `one_line`: the message already holds what its
        // source says, which `one_line` would repeat in other words.
        Err(e) => {
            outcome
                .lines
                .push(format!("pushbus: {e}; push not announced"));
            return outcome;
        }
    };
    // Behind older notifications still waiting, this one waits too: a
    // replay must never overtake it.
    let result = match (setup, behind) {
        (Err(e), _) => Err(SendError::Setup(e)),
        (Ok(_), Some(stopped)) => Err(SendError::Behind(Box::new(stopped))),
        (Ok((sender, _)), None) => sender.send(&body, &correlation_id, deadline).await,
    };
    match result {
        Ok(json) => {
            outcome.delivered = true;
            outcome.lines.extend(render_messages(&json));
            // Lets the pusher quote one ID that every service's logs carry.
            let id = json
                .get("correlation_id")
                .and_then(|c| c.as_str())
                .unwrap_or(&correlation_id);
            outcome
                .lines
                .push(format!("pushbus: push announced, correlation ID {id}"));
        }
        Err(SendError::Refused(e)) => outcome
            .lines
            .push(format!("pushbus: push not announced ({e})")),
        Err(not_stored) => {
            // With its causes: "connection refused" hides in a source.
            let e = one_line(&not_stored);
            match write_spool(&spool, &correlation_id, &body) {
                Ok(path) => {
                    outcome.spooled = true;
                    outcome.lines.push(format!(
                        "pushbus: push not announced yet ({e}); notification spooled for replay in {}, correlation ID {correlation_id}",
                        path.display()
                    ));
                }
                // Where and which push, so an operator can fix the spool and
                // find the push again.
                Err(io) => outcome.lines.push(format!(
                    "pushbus: push not announced ({e}) and not spooled to {} ({io}), correlation ID {correlation_id}",
                    spool.display()
                )),
            }
        }
    }
    outcome
}

/// `pushbus hook flush`: replays spooled notifications within `--timeout-ms`.
pub async fn flush(
    args: &HookArgs,
    env: &HashMap<String, String>,
) -> Result<FlushReport, HookError> {
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let max_age = args.spool_max_age()?;
    let sender = Sender::new(args)?;
    let mut report = flush_spool(&sender, &spool_dir(args, env), max_age, deadline).await?;
    report.lines = terminal_lines(std::mem::take(&mut report.lines));
    Ok(report)
}

fn spool_dir(args: &HookArgs, env: &HashMap<String, String>) -> PathBuf {
    args.spool_dir.clone().unwrap_or_else(|| {
        env.get("GIT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join("pushbus-spool")
    })
}

/// Alerts first, boxed in `=` lines, then basic messages (as Gitaly prints them).
fn render_messages(json: &serde_json::Value) -> Vec<String> {
    let messages = json
        .get("messages")
        .and_then(|m| m.as_array())
        .cloned()
        .unwrap_or_default();
    let text = |m: &serde_json::Value| {
        m.get("message")
            .and_then(|s| s.as_str())
            .unwrap_or("")
            .to_owned()
    };
    let kind = |m: &serde_json::Value| {
        m.get("type")
            .and_then(|s| s.as_str())
            .unwrap_or("basic")
            .to_owned()
    };
    let mut lines = Vec::new();
    for m in messages.iter().filter(|m| kind(m) == "alert") {
        let bar = "=".repeat(72);
        lines.extend([bar.clone(), String::new(), text(m), String::new(), bar]);
    }
    for m in messages.iter().filter(|m| kind(m) != "alert") {
        lines.extend(text(m).lines().map(str::to_owned));
    }
    lines
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}

#[cfg(test)]
mod tests {
    use super::send::classify;
    use super::spool::SpoolEntry;
    use super::*;
    use reqwest::StatusCode;
    use std::error::Error as _;

    fn args(ingest_url: &str) -> HookArgs {
        HookArgs {
            ingest_url: ingest_url.into(),
            project_id: Some(5),
            project_path: None,
            timeout_ms: 3000,
            secret_file: None,
            spool_dir: None,
            spool_max_age_hours: 144,
        }
    }

    #[test]
    fn setup_errors_keep_their_source_and_their_text() {
        let mut a = args("http://127.0.0.1:1");
        a.secret_file = Some("/nonexistent/pushbus-secret".into());
        let Err(err) = Sender::new(&a) else {
            panic!("read a missing secret file");
        };
        let io = err
            .source()
            .and_then(|s| s.downcast_ref::<std::io::Error>())
            .unwrap();
        assert_eq!(io.kind(), std::io::ErrorKind::NotFound);
        let want = format!("cannot read /nonexistent/pushbus-secret: {io}");
        // Printed with its causes, the source is not said twice.
        assert_eq!(one_line(&SendError::Setup(err)), want);

        a.secret_file = None;
        a.spool_max_age_hours = 0;
        let err = a.spool_max_age().unwrap_err();
        assert_eq!(
            one_line(&err),
            format!(
                "--spool-max-age-hours must be between 1 and {} (below the PUSHBUS_PUSHES max age), not 0",
                stream_max_age_hours() - 1
            )
        );
    }

    #[tokio::test]
    async fn a_bad_gl_repository_keeps_the_parse_error() {
        let mut a = args("http://127.0.0.1:1");
        a.project_id = None;
        let env = [("GL_REPOSITORY".to_owned(), "repo-1".to_owned())].into();
        let Err(err) = repository(&a, &env).await else {
            panic!("accepted GL_REPOSITORY repo-1");
        };
        assert!(
            err.to_string()
                .starts_with("GL_REPOSITORY \"repo-1\": expected project-<id>"),
            "{err}"
        );
        let invalid = err
            .source()
            .and_then(|s| s.downcast_ref::<crate::changes::Invalid>())
            .unwrap();
        assert_eq!(invalid.field, "gl_repository");
    }

    #[tokio::test]
    async fn a_transport_error_keeps_its_cause_and_drops_the_url() {
        // A port just freed: the connection is refused at once. The secret
        // sits in the path: reqwest moves user:password out of the URL itself.
        let port = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .port();
        let sender = Sender::new(&args(&format!("http://127.0.0.1:{port}/s3cret"))).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        let err = sender.send(&json!({}), "c-1", deadline).await.unwrap_err();
        assert!(matches!(err, SendError::Transport(_)), "{err:?}");
        let behind = SendError::Behind(Box::new(err));
        let line = one_line(&behind);
        assert!(
            line.starts_with("earlier notifications still spooled: ")
                && line.to_lowercase().contains("connection refused"),
            "{line}"
        );
        // Nowhere in the chain, printed or debugged.
        let mut cause: Option<&dyn std::error::Error> = Some(&behind);
        while let Some(c) = cause {
            assert!(!format!("{c} {c:?}").contains("s3cret"), "{c:?}");
            cause = c.source();
        }
    }

    #[test]
    fn only_a_pushbus_reply_counts_as_delivered() {
        let reply = br#"{"reference_counter_decreased":true,"messages":[{"type":"basic","message":"hi"}],"correlation_id":"c","event_ids":["e"]}"#;
        assert!(classify(StatusCode::OK, reply).is_ok());
        for body in [
            &b"<html>ok</html>"[..],
            b"",
            b"{}",
            br#"{"reference_counter_decreased":false,"messages":[],"correlation_id":"c","event_ids":[]}"#,
            br#"{"reference_counter_decreased":true,"messages":[1],"correlation_id":"c","event_ids":[]}"#,
        ] {
            assert!(
                matches!(classify(StatusCode::OK, body), Err(SendError::NotStored(_))),
                "{}",
                String::from_utf8_lossy(body)
            );
        }
        // Only hook-ingest's own refusal of the content drops it.
        let refusal = br#"{"error":"changes: bad","field":"changes"}"#;
        assert!(matches!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, refusal),
            Err(SendError::Refused(_))
        ));
        for status in [
            StatusCode::NOT_FOUND,
            StatusCode::UNAUTHORIZED,
            StatusCode::SERVICE_UNAVAILABLE,
        ] {
            assert!(matches!(
                classify(status, refusal),
                Err(SendError::NotStored(_))
            ));
        }
        assert!(matches!(
            classify(StatusCode::UNPROCESSABLE_ENTITY, b"nginx says no"),
            Err(SendError::NotStored(_))
        ));
    }

    #[test]
    fn spool_names_stay_in_the_spool_whatever_the_id() {
        let dir = tempfile::tempdir().unwrap();
        let mut names = Vec::new();
        for id in ["../../x", "a/b:c", "/abs", "plain"] {
            let path = write_spool(dir.path(), id, &json!({"k": 1})).unwrap();
            assert_eq!(path.parent().unwrap(), dir.path());
            let entry: SpoolEntry = serde_json::from_slice(&std::fs::read(&path).unwrap()).unwrap();
            assert_eq!(entry.correlation_id, id);
            names.push(path);
        }
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(sorted, names, "name order is not spool order");
        assert_eq!(std::fs::read_dir(dir.path()).unwrap().count(), 4);
    }
}
