//! `pushbus hook post-receive`: the hook command a bare repository runs.
//! It forwards git's ref updates to hook-ingest and returns the lines to
//! show the pusher. It never fails the push and never waits past its timeout.

use std::collections::HashMap;
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
    pub secret_file: Option<std::path::PathBuf>,
}

/// What the hook tells the pusher (each entry is one `remote:` line).
#[derive(Debug, Default)]
pub struct Outcome {
    pub lines: Vec<String>,
    pub correlation_id: String,
    pub delivered: bool,
}

/// Runs the hook with git's stdin and the process environment.
pub async fn post_receive(args: &HookArgs, stdin: &str, env: &HashMap<String, String>) -> Outcome {
    let correlation_id = env
        .get("PUSHBUS_CORRELATION_ID")
        .filter(|c| envelope::is_valid_correlation_id(c))
        .cloned()
        .unwrap_or_else(envelope::new_correlation_id);
    let mut outcome = Outcome {
        correlation_id: correlation_id.clone(),
        ..Default::default()
    };
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
    });
    let url = format!(
        "{}/api/v4/internal/post_receive",
        args.ingest_url.trim_end_matches('/')
    );
    let timeout = Duration::from_millis(args.timeout_ms);
    let secret = match &args.secret_file {
        Some(path) => match std::fs::read_to_string(path) {
            Ok(s) => Some(s.trim().to_owned()),
            Err(err) => {
                outcome.lines.push(format!(
                    "pushbus: cannot read {}: {err}; push not announced",
                    path.display()
                ));
                return outcome;
            }
        },
        None => None,
    };
    let sent = async {
        let client = reqwest::Client::builder().timeout(timeout).build()?;
        let mut req = client
            .post(&url)
            .header("x-correlation-id", &correlation_id)
            .json(&body);
        if let Some(secret) = &secret {
            req = req.header(
                crate::auth::JWT_HEADER,
                crate::auth::sign_jwt(secret.as_bytes(), now_unix()),
            );
        }
        let resp = req.send().await?;
        let status = resp.status();
        let json: serde_json::Value = resp.json().await?;
        Ok::<_, reqwest::Error>((status, json))
    };
    match tokio::time::timeout(timeout, sent).await {
        Ok(Ok((status, json))) if status.is_success() => {
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
        Ok(Ok((status, json))) => {
            let error = json
                .get("error")
                .and_then(|e| e.as_str())
                .unwrap_or("unknown error");
            outcome
                .lines
                .push(format!("pushbus: push not announced ({status}): {error}"));
        }
        Ok(Err(err)) => outcome
            .lines
            .push(format!("pushbus: push not announced: {err}")),
        Err(_) => outcome
            .lines
            .push("pushbus: push not announced: hook-ingest timed out".into()),
    }
    outcome
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
