//! `pushbus hook post-receive`: the hook command a bare repository runs.
//! It forwards git's ref updates to hook-ingest and returns the lines to
//! show the pusher. It never fails the push and never waits past its timeout.
//! When hook-ingest cannot be reached the notification is written to a spool
//! directory and replayed by the next hook run or `pushbus hook flush`; the
//! replay keeps the correlation ID, so a notification that did get stored
//! before is dropped as a duplicate.

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::Duration;

use pushbus_shared::envelope;
use serde_json::json;

#[derive(clap::Args, Clone, Debug)]
pub struct HookArgs {
    /// Base URL of hook-ingest.
    #[arg(
        long = "ingest-url",
        env = "PUSHBUS_INGEST_URL",
        default_value = "http://127.0.0.1:8080"
    )]
    pub ingest_url: String,
    /// Project ID; default: git config pushbus.projectId of the repository.
    #[arg(long = "project-id", env = "PUSHBUS_PROJECT_ID")]
    pub project_id: Option<i64>,
    /// Project full path; default: git config pushbus.projectPath.
    #[arg(long = "project-path", env = "PUSHBUS_PROJECT_PATH")]
    pub project_path: Option<String>,
    /// Give up on hook-ingest after this long.
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

enum SendError {
    /// hook-ingest answered with a refusal: retrying the same body is useless.
    Refused(String),
    /// Not stored (unreachable, timed out, 5xx): worth replaying later.
    NotStored(String),
}

struct Sender {
    url: String,
    timeout: Duration,
    secret: Option<String>,
}

impl Sender {
    fn new(args: &HookArgs) -> Result<Self, String> {
        let secret = match &args.secret_file {
            Some(path) => Some(
                std::fs::read_to_string(path)
                    .map_err(|e| format!("cannot read {}: {e}", path.display()))?
                    .trim()
                    .to_owned(),
            ),
            None => None,
        };
        Ok(Self {
            url: format!(
                "{}/api/v4/internal/post_receive",
                args.ingest_url.trim_end_matches('/')
            ),
            timeout: Duration::from_millis(args.timeout_ms),
            secret,
        })
    }

    async fn send(
        &self,
        body: &serde_json::Value,
        correlation_id: &str,
    ) -> Result<serde_json::Value, SendError> {
        let sent = async {
            let client = reqwest::Client::builder().timeout(self.timeout).build()?;
            let mut req = client
                .post(&self.url)
                .header("x-correlation-id", correlation_id)
                .json(body);
            if let Some(secret) = &self.secret {
                req = req.header(
                    crate::auth::JWT_HEADER,
                    crate::auth::sign_jwt(secret.as_bytes(), now_unix()),
                );
            }
            let resp = req.send().await?;
            let status = resp.status();
            let json: serde_json::Value = resp.json().await.unwrap_or_default();
            Ok::<_, reqwest::Error>((status, json))
        };
        match tokio::time::timeout(self.timeout, sent).await {
            Ok(Ok((status, json))) if status.is_success() => Ok(json),
            Ok(Ok((status, json))) => {
                let error = json
                    .get("error")
                    .and_then(|e| e.as_str())
                    .unwrap_or("no reason given");
                let msg = format!("{status}: {error}");
                if status.is_client_error() {
                    Err(SendError::Refused(msg))
                } else {
                    Err(SendError::NotStored(msg))
                }
            }
            Ok(Err(err)) => Err(SendError::NotStored(err.to_string())),
            Err(_) => Err(SendError::NotStored("hook-ingest timed out".into())),
        }
    }
}

/// Runs the hook with git's stdin and the process environment.
pub async fn post_receive(args: &HookArgs, stdin: &str, env: &HashMap<String, String>) -> Outcome {
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
    let sender = match Sender::new(args) {
        Ok(s) => s,
        Err(e) => {
            outcome
                .lines
                .push(format!("pushbus: {e}; push not announced"));
            return outcome;
        }
    };
    let spool = spool_dir(args, env);
    // Older notifications first, so agents see pushes in order.
    let (replayed, _) = flush_spool(&sender, &spool).await;
    outcome.replayed = replayed;

    let project_id = match args.project_id {
        Some(id) => Some(id),
        None => git_config("pushbus.projectId")
            .await
            .and_then(|v| v.parse().ok()),
    };
    let Some(project_id) = project_id else {
        outcome.lines.push(
            "pushbus: no project ID (set git config pushbus.projectId); push not announced".into(),
        );
        return outcome;
    };
    let project_path = match &args.project_path {
        Some(p) => Some(p.clone()),
        None => git_config("pushbus.projectPath").await,
    };
    let body = json!({
        "gl_repository": format!("project-{project_id}"),
        "gl_project_path": project_path,
        "identifier": actor(env),
        "changes": stdin,
        "push_options": push_options(env),
        "protocol": env.get("GL_PROTOCOL").cloned().unwrap_or_else(|| "hook".into()),
        "pushbus_changed_paths": changed_paths(stdin).await,
    });
    match sender.send(&body, &correlation_id).await {
        Ok(json) => {
            outcome.delivered = true;
            outcome.lines = render_messages(&json);
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
        Err(SendError::NotStored(e)) => match write_spool(&spool, &correlation_id, &body) {
            Ok(()) => {
                outcome.spooled = true;
                outcome.lines.push(format!(
                    "pushbus: hook-ingest unavailable ({e}); notification spooled for replay"
                ));
            }
            Err(io) => outcome.lines.push(format!(
                "pushbus: push not announced ({e}) and not spooled ({io})"
            )),
        },
    }
    outcome
}

/// `pushbus hook flush`: replays spooled notifications; returns (delivered, left).
pub async fn flush(
    args: &HookArgs,
    env: &HashMap<String, String>,
) -> Result<(usize, usize), String> {
    let sender = Sender::new(args)?;
    Ok(flush_spool(&sender, &spool_dir(args, env)).await)
}

fn spool_dir(args: &HookArgs, env: &HashMap<String, String>) -> PathBuf {
    args.spool_dir.clone().unwrap_or_else(|| {
        env.get("GIT_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|| PathBuf::from("."))
            .join("pushbus-spool")
    })
}

fn write_spool(dir: &Path, correlation_id: &str, body: &serde_json::Value) -> std::io::Result<()> {
    std::fs::create_dir_all(dir)?;
    let entry = json!({ "correlation_id": correlation_id, "body": body });
    // Write then rename: a crash never leaves a half-written entry.
    let tmp = dir.join(format!(".{correlation_id}.tmp"));
    std::fs::write(&tmp, entry.to_string())?;
    std::fs::rename(&tmp, dir.join(format!("{correlation_id}.json")))
}

async fn flush_spool(sender: &Sender, dir: &Path) -> (usize, usize) {
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.extension().is_some_and(|x| x == "json"))
            .collect(),
        Err(_) => return (0, 0),
    };
    // Correlation IDs are UUIDv7: name order is time order.
    files.sort();
    let mut delivered = 0;
    for (i, path) in files.iter().enumerate() {
        let entry: Option<serde_json::Value> = std::fs::read_to_string(path)
            .ok()
            .and_then(|t| serde_json::from_str(&t).ok());
        let Some(entry) = entry else {
            // Unreadable: set aside rather than block the spool forever.
            let _ = std::fs::rename(path, path.with_extension("bad"));
            continue;
        };
        let id = entry["correlation_id"]
            .as_str()
            .unwrap_or_default()
            .to_owned();
        match sender.send(&entry["body"], &id).await {
            Ok(_) => {
                let _ = std::fs::remove_file(path);
                delivered += 1;
            }
            // Refused content will never be accepted: drop it, say why.
            Err(SendError::Refused(e)) => {
                tracing::warn!(correlation_id = %id, error = %e, "spooled notification refused; dropped");
                let _ = std::fs::remove_file(path);
            }
            // Still down: keep this and the rest for next time.
            Err(SendError::NotStored(_)) => return (delivered, files.len() - i),
        }
    }
    (delivered, 0)
}

/// Refs updated in one push whose paths are computed; beyond that, and for
/// creates and deletes, paths stay unknown (which filters treat as "any").
const PATHS_MAX_REFS: usize = 20;
const PATHS_MAX_PER_REF: usize = 2_000;
const PATHS_BUDGET: Duration = Duration::from_millis(1_000);

/// Paths changed by each fast-forward or forced update, bounded in count
/// and time so a huge push never stalls the pusher.
async fn changed_paths(stdin: &str) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    let deadline = tokio::time::Instant::now() + PATHS_BUDGET;
    let updates = stdin.lines().filter_map(|l| {
        let mut p = l.split(' ');
        let (old, new, r) = (p.next()?, p.next()?, p.next()?);
        let zero = |s: &str| s.bytes().all(|b| b == b'0');
        (!zero(old) && !zero(new)).then(|| (old.to_owned(), new.to_owned(), r.to_owned()))
    });
    for (old, new, r) in updates.take(PATHS_MAX_REFS) {
        let diff = tokio::process::Command::new("git")
            .args(["diff", "--name-only", "-z", "--no-renames", &old, &new])
            .kill_on_drop(true)
            .output();
        let Ok(Ok(o)) = tokio::time::timeout_at(deadline, diff).await else {
            break;
        };
        if !o.status.success() {
            continue;
        }
        let paths: Vec<String> = o
            .stdout
            .split(|b| *b == 0)
            .filter(|p| !p.is_empty())
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        if paths.len() <= PATHS_MAX_PER_REF {
            out.insert(r, paths);
        }
    }
    out
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

fn actor(env: &HashMap<String, String>) -> String {
    if let Some(id) = env.get("GL_ID").filter(|s| !s.is_empty()) {
        return id.clone();
    }
    let user: String = env
        .get("USER")
        .map(String::as_str)
        .unwrap_or("unknown")
        .chars()
        .filter(|c| c.is_alphanumeric() || "-_.".contains(*c))
        .collect();
    format!(
        "username-{}",
        if user.is_empty() { "unknown" } else { &user }
    )
}

fn push_options(env: &HashMap<String, String>) -> Vec<String> {
    let count: usize = env
        .get("GIT_PUSH_OPTION_COUNT")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (0..count.min(1000))
        .filter_map(|i| env.get(&format!("GIT_PUSH_OPTION_{i}")).cloned())
        .collect()
}

async fn git_config(key: &str) -> Option<String> {
    let out = tokio::process::Command::new("git")
        .args(["config", "--get", key])
        .output()
        .await
        .ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !value.is_empty()).then_some(value)
}

fn now_unix() -> i64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64)
}
