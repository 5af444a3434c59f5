//! What the hook learns from git and the environment: the repository, the
//! default branch, the paths each ref changed, the actor, push options.

use std::collections::HashMap;
use std::time::Duration;

use pushbus_shared::proto::RepositoryKind;

use tokio::time::Instant;

use super::HookArgs;
use crate::changes;

/// Where the push went, as hook-ingest's `gl_repository` names it.
pub(super) struct Repo {
    pub(super) gl_repository: String,
    pub(super) project_path: Option<String>,
}

/// Why the push's repository cannot be named. Each message says all a
/// pusher needs; the sources keep the parse errors behind it.
#[derive(Debug, thiserror::Error)]
pub(super) enum RepoError {
    // The reason only: the source names the field as hook-ingest's API
    // does (gl_repository), not as the pusher's server sets it.
    #[error("GL_REPOSITORY {value:?}: {}", source.reason)]
    GlRepository {
        value: String,
        source: changes::Invalid,
    },
    #[error("git config pushbus.projectId {value:?} is not a number")]
    ConfiguredProjectId {
        value: String,
        source: std::num::ParseIntError,
    },
    #[error("no project ID (no GL_REPOSITORY; set git config pushbus.projectId or --project-id)")]
    NoProjectId,
    #[error("project ID {0} must be positive")]
    NotPositive(i64),
}

/// Flags and git config (plain git servers) win over the variables
/// Gitaly sets for server hooks (GL_REPOSITORY, GL_PROJECT_PATH).
pub(super) async fn repository(
    args: &HookArgs,
    env: &HashMap<String, String>,
) -> Result<Repo, RepoError> {
    let from_env = match env.get("GL_REPOSITORY").filter(|s| !s.is_empty()) {
        Some(s) => {
            Some(
                changes::parse_gl_repository(s).map_err(|source| RepoError::GlRepository {
                    value: s.clone(),
                    source,
                })?,
            )
        }
        None => None,
    };
    let configured = match args.project_id {
        Some(id) => Some(id),
        None => match git_config("pushbus.projectId").await {
            Some(v) => Some(
                v.parse::<i64>()
                    .map_err(|source| RepoError::ConfiguredProjectId {
                        value: v.clone(),
                        source,
                    })?,
            ),
            None => None,
        },
    };
    let (kind, id) = match (configured, from_env) {
        (Some(id), Some((kind, _))) => (kind, id),
        (Some(id), None) => (RepositoryKind::Project, id),
        (None, Some(found)) => found,
        (None, None) => return Err(RepoError::NoProjectId),
    };
    if id <= 0 {
        return Err(RepoError::NotPositive(id));
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
pub(super) async fn default_branch() -> Option<String> {
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

/// Refs updated in one push whose paths are computed; beyond that, and for
/// creates and deletes, paths stay unknown (which filters treat as "any").
pub(super) const PATHS_MAX_REFS: usize = 20;
pub(super) const PATHS_MAX_PER_REF: usize = 2_000;
pub(super) const PATHS_BUDGET: Duration = Duration::from_millis(1_000);

/// Paths changed by each fast-forward or forced update, bounded in count
/// and time so a huge push never stalls the pusher.
pub(super) async fn changed_paths(stdin: &str, deadline: Instant) -> HashMap<String, Vec<String>> {
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

/// GitLab's `GL_ID` (user-1, key-7), else `GL_USERNAME`, else the local user.
pub(super) fn actor(env: &HashMap<String, String>) -> String {
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

pub(super) fn push_options(env: &HashMap<String, String>) -> Vec<String> {
    let count: usize = env
        .get("GIT_PUSH_OPTION_COUNT")
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (0..count.min(1000))
        .filter_map(|i| env.get(&format!("GIT_PUSH_OPTION_{i}")).cloned())
        .collect()
}

pub(super) async fn git_config(key: &str) -> Option<String> {
    let out = tokio::process::Command::new("git")
        .args(["config", "--get", key])
        .output()
        .await
        .ok()?;
    let value = String::from_utf8(out.stdout).ok()?.trim().to_owned();
    (out.status.success() && !value.is_empty()).then_some(value)
}
