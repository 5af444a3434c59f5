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
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, SystemTime};

use pushbus_shared::envelope;
use pushbus_shared::proto::RepositoryKind;
use serde_json::json;
use tokio::time::Instant;

use crate::changes;

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

impl HookArgs {
    fn spool_max_age(&self) -> Result<Duration, String> {
        let stream = stream_max_age_hours();
        if self.spool_max_age_hours == 0 || self.spool_max_age_hours >= stream {
            return Err(format!(
                "--spool-max-age-hours must be between 1 and {} (below the PUSHBUS_PUSHES max age), not {}",
                stream.saturating_sub(1),
                self.spool_max_age_hours
            ));
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
    pub stopped: Option<String>,
    /// What to tell the operator or pusher.
    pub lines: Vec<String>,
}

#[derive(Debug)]
enum SendError {
    /// hook-ingest refused the content itself: retrying the same body is useless.
    Refused(String),
    /// Not stored (unreachable, timed out, not a pushbus reply, 5xx): replay later.
    NotStored(String),
}

struct Sender {
    url: String,
    timeout: Duration,
    secret: Option<String>,
    client: reqwest::Client,
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
        let timeout = Duration::from_millis(args.timeout_ms);
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .build()
            .map_err(|e| format!("cannot build the HTTP client: {}", e.without_url()))?;
        Ok(Self {
            url: format!(
                "{}/api/v4/internal/post_receive",
                args.ingest_url.trim_end_matches('/')
            ),
            timeout,
            secret,
            client,
        })
    }

    /// One call, bounded by the timeout and by `deadline`.
    async fn send(
        &self,
        body: &serde_json::Value,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<serde_json::Value, SendError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SendError::NotStored("--timeout-ms used up".into()));
        }
        let sent = async {
            let mut req = self
                .client
                .post(&self.url)
                .timeout(self.timeout.min(left))
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
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        };
        match tokio::time::timeout(left, sent).await {
            Ok(Ok((status, bytes))) => classify(status, &bytes),
            // Without the URL: it may carry credentials.
            Ok(Err(err)) => Err(SendError::NotStored(describe(&err.without_url()))),
            Err(_) => Err(SendError::NotStored("hook-ingest timed out".into())),
        }
    }
}

/// The error and its causes on one line ("connection refused" hides in a source).
fn describe(err: &dyn std::error::Error) -> String {
    let mut text = err.to_string();
    let mut source = err.source();
    while let Some(s) = source {
        text.push_str(": ");
        text.push_str(&s.to_string());
        source = s.source();
    }
    text
}

/// Only hook-ingest's own answer counts: a 200 from anything else (a wrong
/// URL, a proxy's error page, a gRPC server) would otherwise lose the push.
fn classify(status: reqwest::StatusCode, bytes: &[u8]) -> Result<serde_json::Value, SendError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
    if status == reqwest::StatusCode::OK {
        return match json {
            Some(j) if is_pushbus_reply(&j) => Ok(j),
            _ => Err(SendError::NotStored(format!(
                "HTTP 200 but not a pushbus reply (is --ingest-url hook-ingest?): {}",
                snippet(bytes)
            ))),
        };
    }
    let error = json
        .as_ref()
        .and_then(|j| j.get("error"))
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    match (status.as_u16(), error) {
        // hook-ingest refused the content itself.
        (400 | 413 | 422, Some(e)) => Err(SendError::Refused(format!("{status}: {e}"))),
        (_, Some(e)) => Err(SendError::NotStored(format!("{status}: {e}"))),
        (_, None) => Err(SendError::NotStored(format!(
            "{status}, not a pushbus reply: {}",
            snippet(bytes)
        ))),
    }
}

/// The shape of hook-ingest's post_receive answer (http.rs).
fn is_pushbus_reply(j: &serde_json::Value) -> bool {
    j.get("reference_counter_decreased") == Some(&serde_json::Value::Bool(true))
        && j.get("correlation_id").is_some_and(|c| c.is_string())
        && j.get("event_ids").is_some_and(|e| e.is_array())
        && j.get("messages")
            .and_then(|m| m.as_array())
            .is_some_and(|m| {
                m.iter()
                    .all(|m| m.get("message").is_some_and(|s| s.is_string()))
            })
}

fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let text: String = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        text
    }
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
    let sender = Sender::new(args);
    let spool = spool_dir(args, env);
    let repo = repository(args, env).await;
    let body = match &repo {
        Ok(repo) => Some(json!({
            "gl_repository": repo.gl_repository,
            "gl_project_path": repo.project_path,
            "identifier": actor(env),
            "changes": stdin,
            "push_options": push_options(env),
            "protocol": env.get("GL_PROTOCOL").filter(|p| !p.is_empty()).cloned().unwrap_or_else(|| "hook".into()),
            "default_branch": default_branch().await,
            "pushbus_changed_paths": changed_paths(stdin, deadline).await,
        })),
        Err(_) => None,
    };
    // Older notifications first, so agents see pushes in order. `pending`:
    // why this one cannot be sent now.
    let pending = match (&sender, args.spool_max_age()) {
        (Err(e), _) => Some(e.clone()),
        (Ok(_), Err(e)) => Some(e),
        (Ok(sender), Ok(max_age)) => {
            let report = flush_spool(sender, &spool, max_age, deadline).await;
            outcome.replayed = report.delivered;
            outcome.lines.extend(report.lines);
            report
                .stopped
                .map(|r| format!("earlier notifications still spooled: {r}"))
        }
    };
    let Some(body) = body else {
        let e = repo.err().unwrap_or_default();
        outcome
            .lines
            .push(format!("pushbus: {e}; push not announced"));
        return outcome;
    };
    // Behind older notifications still waiting, this one waits too: a
    // replay must never overtake it.
    let result = match (pending, &sender) {
        (Some(reason), _) => Err(SendError::NotStored(reason)),
        (None, Err(e)) => Err(SendError::NotStored(e.clone())),
        (None, Ok(sender)) => sender.send(&body, &correlation_id, deadline).await,
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
        Err(SendError::NotStored(e)) => match write_spool(&spool, &correlation_id, &body) {
            Ok(path) => {
                outcome.spooled = true;
                outcome.lines.push(format!(
                    "pushbus: push not announced yet ({e}); notification spooled for replay in {}, correlation ID {correlation_id}",
                    path.display()
                ));
            }
            Err(io) => outcome.lines.push(format!(
                "pushbus: push not announced ({e}) and not spooled ({io})"
            )),
        },
    }
    outcome
}

/// `pushbus hook flush`: replays spooled notifications within `--timeout-ms`.
pub async fn flush(args: &HookArgs, env: &HashMap<String, String>) -> Result<FlushReport, String> {
    let deadline = Instant::now() + Duration::from_millis(args.timeout_ms);
    let max_age = args.spool_max_age()?;
    let sender = Sender::new(args)?;
    let mut report = flush_spool(&sender, &spool_dir(args, env), max_age, deadline).await;
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

/// Where the push went, as hook-ingest's `gl_repository` names it.
struct Repo {
    gl_repository: String,
    project_path: Option<String>,
}

/// Flags and git config (plain git servers) win over the variables
/// Gitaly sets for server hooks (GL_REPOSITORY, GL_PROJECT_PATH).
async fn repository(args: &HookArgs, env: &HashMap<String, String>) -> Result<Repo, String> {
    let from_env = match env.get("GL_REPOSITORY").filter(|s| !s.is_empty()) {
        Some(s) => Some(
            changes::parse_gl_repository(s)
                .map_err(|e| format!("GL_REPOSITORY {s:?}: {}", e.reason))?,
        ),
        None => None,
    };
    let configured = match args.project_id {
        Some(id) => Some(id),
        None => match git_config("pushbus.projectId").await {
            Some(v) => Some(
                v.parse::<i64>()
                    .map_err(|_| format!("git config pushbus.projectId {v:?} is not a number"))?,
            ),
            None => None,
        },
    };
    let (kind, id) = match (configured, from_env) {
        (Some(id), Some((kind, _))) => (kind, id),
        (Some(id), None) => (RepositoryKind::Project, id),
        (None, Some(found)) => found,
        (None, None) => {
            return Err(
                "no project ID (no GL_REPOSITORY; set git config pushbus.projectId or --project-id)"
                    .into(),
            );
        }
    };
    if id <= 0 {
        return Err(format!("project ID {id} must be positive"));
    }
    let prefix = match kind {
        RepositoryKind::Wiki => "wiki",
        RepositoryKind::Snippet => "snippet",
        RepositoryKind::Group => "group",
        RepositoryKind::Design => "design",
        RepositoryKind::Project | RepositoryKind::Unspecified => "project",
    };
    let project_path = match &args.project_path {
        Some(p) => Some(p.clone()),
        None => match git_config("pushbus.projectPath").await {
            Some(p) => Some(p),
            None => env
                .get("GL_PROJECT_PATH")
                .filter(|p| !p.is_empty())
                .cloned(),
        },
    };
    Ok(Repo {
        gl_repository: format!("{prefix}-{id}"),
        project_path,
    })
}

/// The branch HEAD names in the (bare) repository, without `refs/heads/`;
/// `None` when HEAD is detached or the name would be refused.
async fn default_branch() -> Option<String> {
    let out = tokio::process::Command::new("git")
        .args(["symbolic-ref", "--quiet", "HEAD"])
        .kill_on_drop(true)
        .output()
        .await
        .ok()?;
    let full = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    let branch = full.strip_prefix("refs/heads/")?;
    (out.status.success() && changes::check_ref_format(&full).is_ok()).then(|| branch.to_owned())
}

/// A spooled notification on disk.
#[derive(serde::Serialize, serde::Deserialize)]
struct SpoolEntry {
    correlation_id: String,
    /// Unix seconds; absent in entries written before it existed (then the
    /// file's mtime stands in).
    #[serde(default)]
    spooled_at: Option<u64>,
    body: serde_json::Value,
}

/// Writes one entry atomically and durably: temp file in the same
/// directory, fsync, rename, fsync the directory. The name never comes from
/// the correlation ID alone (it may hold `/` or `..`): a time-ordered UUID
/// keeps replay order and uniqueness, a sanitized ID fragment helps humans.
fn write_spool(
    dir: &Path,
    correlation_id: &str,
    body: &serde_json::Value,
) -> std::io::Result<PathBuf> {
    std::fs::create_dir_all(dir)?;
    let entry = SpoolEntry {
        correlation_id: correlation_id.to_owned(),
        spooled_at: Some(now_unix().max(0) as u64),
        body: body.clone(),
    };
    let text = serde_json::to_vec(&entry)?;
    let fragment: String = correlation_id
        .chars()
        .take(64)
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '-' || c == '_' {
                c
            } else {
                '_'
            }
        })
        .collect();
    let name = format!("{}-{fragment}.json", uuid::Uuid::now_v7().simple());
    let tmp = dir.join(format!(".{name}.tmp"));
    let written = (|| {
        let mut file = std::fs::OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&tmp)?;
        file.write_all(&text)?;
        file.sync_all()
    })();
    if let Err(e) = written {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    let path = dir.join(&name);
    if let Err(e) = std::fs::rename(&tmp, &path) {
        let _ = std::fs::remove_file(&tmp);
        return Err(e);
    }
    sync_dir(dir)?;
    Ok(path)
}

/// Makes a rename in `dir` survive a crash.
fn sync_dir(dir: &Path) -> std::io::Result<()> {
    std::fs::File::open(dir)?.sync_all()
}

/// Moves a spool file into `<spool>/<sub>/`, never deleting it.
fn set_aside(dir: &Path, path: &Path, sub: &str) -> std::io::Result<PathBuf> {
    let target_dir = dir.join(sub);
    std::fs::create_dir_all(&target_dir)?;
    let target = target_dir.join(path.file_name().unwrap_or_default());
    std::fs::rename(path, &target)?;
    sync_dir(&target_dir)?;
    sync_dir(dir)?;
    Ok(target)
}

fn age_of(entry: &SpoolEntry, path: &Path) -> Duration {
    let now = SystemTime::now();
    let at = match entry.spooled_at {
        Some(secs) => SystemTime::UNIX_EPOCH + Duration::from_secs(secs),
        None => std::fs::metadata(path)
            .and_then(|m| m.modified())
            .unwrap_or(now),
    };
    now.duration_since(at).unwrap_or_default()
}

async fn flush_spool(
    sender: &Sender,
    dir: &Path,
    max_age: Duration,
    deadline: Instant,
) -> FlushReport {
    let mut report = FlushReport::default();
    let mut files: Vec<PathBuf> = match std::fs::read_dir(dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| p.is_file() && p.extension().is_some_and(|x| x == "json"))
            .filter(|p| {
                !p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with('.'))
            })
            .collect(),
        Err(_) => return report,
    };
    // Names start with a UUIDv7: name order is spool order.
    files.sort();
    for (i, path) in files.iter().enumerate() {
        let entry: Option<SpoolEntry> = std::fs::read(path)
            .ok()
            .and_then(|t| serde_json::from_slice(&t).ok())
            .filter(|e: &SpoolEntry| envelope::is_valid_correlation_id(&e.correlation_id));
        let Some(entry) = entry else {
            // Unreadable: set aside rather than block the spool forever.
            let moved = std::fs::rename(path, path.with_extension("bad"));
            report.lines.push(format!(
                "pushbus: spooled notification {} is unreadable; {}",
                path.display(),
                match moved {
                    Ok(()) => "renamed to .bad".to_owned(),
                    Err(e) => format!("cannot rename it: {e}"),
                }
            ));
            continue;
        };
        let id = &entry.correlation_id;
        let age = age_of(&entry, path);
        if age > max_age {
            // Replaying it could store the push again once the stream has
            // forgotten its event ID; an operator decides instead.
            let hours = age.as_secs() / 3600;
            report.lines.push(match set_aside(dir, path, "expired") {
                Ok(to) => {
                    report.expired += 1;
                    format!(
                        "pushbus: spooled notification {id} is {hours} h old (over --spool-max-age-hours {}); not replayed, moved to {}",
                        max_age.as_secs() / 3600,
                        to.display()
                    )
                }
                Err(e) => format!(
                    "pushbus: spooled notification {id} is {hours} h old; not replayed, and cannot move it to expired/: {e}"
                ),
            });
            continue;
        }
        if Instant::now() >= deadline {
            report.left = files.len() - i;
            report.stopped = Some("--timeout-ms reached".into());
            break;
        }
        match sender.send(&entry.body, id, deadline).await {
            Ok(_) => {
                if let Err(e) = std::fs::remove_file(path).and_then(|()| sync_dir(dir)) {
                    report.lines.push(format!(
                        "pushbus: replayed {id} but cannot remove {}: {e}",
                        path.display()
                    ));
                }
                report.delivered += 1;
            }
            // Refused content will never be accepted: set aside, say why.
            Err(SendError::Refused(e)) => {
                report.lines.push(match set_aside(dir, path, "refused") {
                    Ok(to) => format!(
                        "pushbus: spooled notification {id} refused ({e}); moved to {}",
                        to.display()
                    ),
                    Err(io) => format!(
                        "pushbus: spooled notification {id} refused ({e}); cannot move it: {io}"
                    ),
                })
            }
            // Still unavailable: keep this and the rest for next time.
            Err(SendError::NotStored(e)) => {
                report.left = files.len() - i;
                report.stopped = Some(e);
                break;
            }
        }
    }
    report
}

/// Refs updated in one push whose paths are computed; beyond that, and for
/// creates and deletes, paths stay unknown (which filters treat as "any").
const PATHS_MAX_REFS: usize = 20;
const PATHS_MAX_PER_REF: usize = 2_000;
const PATHS_BUDGET: Duration = Duration::from_millis(1_000);

/// Paths changed by each fast-forward or forced update, bounded in count
/// and time so a huge push never stalls the pusher.
async fn changed_paths(stdin: &str, deadline: Instant) -> HashMap<String, Vec<String>> {
    let mut out = HashMap::new();
    let deadline = deadline.min(Instant::now() + PATHS_BUDGET);
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

/// GitLab's `GL_ID` (user-1, key-7), else `GL_USERNAME`, else the local user.
fn actor(env: &HashMap<String, String>) -> String {
    if let Some(id) = env.get("GL_ID").filter(|s| !s.is_empty()) {
        return id.clone();
    }
    let user: String = env
        .get("GL_USERNAME")
        .filter(|s| !s.is_empty())
        .or_else(|| env.get("USER"))
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

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::StatusCode;

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
