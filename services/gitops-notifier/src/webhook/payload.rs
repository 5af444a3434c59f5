//! GitLab's push webhook body, built from a poke. Field names and types
//! follow GitLab's "Push events" payload; receivers parse it with typed
//! structs (Argo CD: go-playground/webhooks `gitlab.PushEventPayload`), so
//! a value we do not know is left out or null, never an empty string where
//! a number or a timestamp is expected.

use pushbus_shared::proto::{AgentPoke, ChangeKind, RefKind};
use serde::Serialize;

/// Which GitLab hook a poke becomes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HookKind {
    Push,
    TagPush,
}

impl HookKind {
    /// GitLab sends hooks for branches and tags only; other refs
    /// (refs/merge-requests/…, notes) have no push hook.
    pub fn of(poke: &AgentPoke) -> Option<HookKind> {
        match RefKind::try_from(poke.ref_kind).unwrap_or(RefKind::Unspecified) {
            RefKind::Branch => Some(HookKind::Push),
            RefKind::Tag => Some(HookKind::TagPush),
            RefKind::Other => None,
            RefKind::Unspecified if poke.r#ref.starts_with("refs/heads/") => Some(HookKind::Push),
            RefKind::Unspecified if poke.r#ref.starts_with("refs/tags/") => Some(HookKind::TagPush),
            RefKind::Unspecified => None,
        }
    }

    /// `X-Gitlab-Event`.
    pub fn header(self) -> &'static str {
        match self {
            HookKind::Push => "Push Hook",
            HookKind::TagPush => "Tag Push Hook",
        }
    }

    /// `object_kind` and `event_name`.
    pub fn object_kind(self) -> &'static str {
        match self {
            HookKind::Push => "push",
            HookKind::TagPush => "tag_push",
        }
    }
}

/// Where project URLs point: GitLab's external URL.
#[derive(Debug, Clone)]
pub struct GitLabSite {
    /// Without a trailing slash, e.g. `https://gitlab.example.com`.
    base: String,
    /// For `git@<host>:<path>.git`.
    host: String,
}

/// Why `--notifier-gitlab-url` cannot be the base of payload URLs.
#[derive(Debug, thiserror::Error)]
pub enum SiteError {
    #[error("{0:?}: {1}")]
    Parse(String, #[source] url::ParseError),
    #[error("{0:?}: no host")]
    NoHost(String),
}

impl GitLabSite {
    pub fn parse(url: &str) -> Result<GitLabSite, SiteError> {
        let parsed = reqwest::Url::parse(url).map_err(|e| SiteError::Parse(url.to_owned(), e))?;
        let host = parsed
            .host_str()
            .ok_or_else(|| SiteError::NoHost(url.to_owned()))?
            .to_owned();
        Ok(GitLabSite {
            base: url.trim_end_matches('/').to_owned(),
            host,
        })
    }

    /// Sent as `X-Gitlab-Instance`, like GitLab does.
    pub fn base(&self) -> &str {
        &self.base
    }
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PushHook {
    pub object_kind: &'static str,
    pub event_name: &'static str,
    pub before: String,
    pub after: String,
    #[serde(rename = "ref")]
    pub ref_name: String,
    /// Null when the ref was deleted (GitLab does the same).
    pub checkout_sha: Option<String>,
    pub message: Option<String>,
    pub user_id: Option<i64>,
    pub user_name: Option<String>,
    pub user_username: Option<String>,
    pub project_id: i64,
    pub project: Project,
    pub repository: Repository,
    pub commits: Vec<Commit>,
    pub total_commits_count: u32,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Project {
    pub id: i64,
    pub name: String,
    pub namespace: String,
    pub path_with_namespace: String,
    pub web_url: String,
    pub git_http_url: String,
    pub git_ssh_url: String,
    /// The repository's HEAD branch as the hook read it; absent (never
    /// guessed) when unknown. Argo CD refreshes HEAD-tracking apps only when
    /// it equals the pushed branch.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub default_branch: Option<String>,
    pub homepage: String,
    pub url: String,
    pub ssh_url: String,
    pub http_url: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Repository {
    pub name: String,
    pub url: String,
    pub homepage: String,
    pub git_http_url: String,
    pub git_ssh_url: String,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Commit {
    pub id: String,
    pub message: String,
    pub title: String,
    /// RFC 3339; null when unknown (an empty string fails receivers' parsers).
    pub timestamp: Option<String>,
    pub url: String,
    pub author: Author,
    pub added: Vec<String>,
    pub modified: Vec<String>,
    pub removed: Vec<String>,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct Author {
    pub name: String,
    pub email: String,
}

/// The body for `poke`, or `None` for refs GitLab sends no hook for.
/// `occurred_at`: the push's time, RFC 3339.
pub fn build(poke: &AgentPoke, site: &GitLabSite, occurred_at: Option<String>) -> Option<PushHook> {
    let kind = HookKind::of(poke)?;
    // Without a path (a push that named only the project ID) the URLs use
    // the ID; receivers that match by URL will not match them.
    let path = if poke.project_path.is_empty() {
        poke.project_id.to_string()
    } else {
        poke.project_path.trim_matches('/').to_owned()
    };
    let (namespace, name) = match path.rsplit_once('/') {
        Some((ns, name)) => (ns.to_owned(), name.to_owned()),
        None => (String::new(), path.clone()),
    };
    let web_url = format!("{}/{}", site.base, path);
    let git_http_url = format!("{web_url}.git");
    let git_ssh_url = format!("git@{}:{}.git", site.host, path);
    let deleted = poke.change_kind == ChangeKind::Delete as i32;
    let (user_id, username) = parse_actor(&poke.actor);
    let commits = if deleted {
        Vec::new()
    } else {
        vec![Commit {
            id: poke.new_sha.clone(),
            message: String::new(),
            title: String::new(),
            timestamp: occurred_at,
            url: format!("{web_url}/-/commit/{}", poke.new_sha),
            author: Author {
                name: username.clone().unwrap_or_default(),
                email: String::new(),
            },
            added: Vec::new(),
            // Pokes carry changed paths without add/modify/delete; receivers
            // (Argo CD's path filter) treat all three alike.
            modified: if poke.paths_known {
                poke.changed_paths.clone()
            } else {
                Vec::new()
            },
            removed: Vec::new(),
        }]
    };
    Some(PushHook {
        object_kind: kind.object_kind(),
        event_name: kind.object_kind(),
        before: poke.old_sha.clone(),
        after: poke.new_sha.clone(),
        ref_name: poke.r#ref.clone(),
        checkout_sha: (!deleted).then(|| poke.new_sha.clone()),
        message: None,
        user_id,
        user_name: username.clone(),
        user_username: username,
        project_id: poke.project_id,
        project: Project {
            id: poke.project_id,
            name: name.clone(),
            namespace,
            path_with_namespace: path,
            web_url: web_url.clone(),
            git_http_url: git_http_url.clone(),
            git_ssh_url: git_ssh_url.clone(),
            default_branch: (!poke.default_branch.is_empty()).then(|| poke.default_branch.clone()),
            homepage: web_url.clone(),
            url: git_ssh_url.clone(),
            ssh_url: git_ssh_url.clone(),
            http_url: git_http_url.clone(),
        },
        repository: Repository {
            name,
            url: git_ssh_url.clone(),
            homepage: web_url,
            git_http_url,
            git_ssh_url,
        },
        total_commits_count: commits.len() as u32,
        commits,
    })
}

/// GitLab identifiers: `user-42` → user ID, `username-alice` → username;
/// deploy keys (`key-7`) name no user.
fn parse_actor(actor: &str) -> (Option<i64>, Option<String>) {
    if let Some(id) = actor.strip_prefix("user-") {
        (id.parse().ok(), None)
    } else if let Some(name) = actor.strip_prefix("username-") {
        (None, (!name.is_empty()).then(|| name.to_owned()))
    } else {
        (None, None)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn poke() -> AgentPoke {
        AgentPoke {
            agent_id: "agent-1".into(),
            project_id: 42,
            project_path: "group/sub/app".into(),
            r#ref: "refs/heads/main".into(),
            ref_kind: RefKind::Branch as i32,
            change_kind: ChangeKind::Update as i32,
            old_sha: "a".repeat(40),
            new_sha: "b".repeat(40),
            changed_paths: vec!["deploy/app.yaml".into(), "README.md".into()],
            paths_known: true,
            actor: "username-alice".into(),
            ..Default::default()
        }
    }

    fn site() -> GitLabSite {
        GitLabSite::parse("https://gitlab.example.com:8443/").unwrap()
    }

    #[test]
    fn a_gitlab_url_without_scheme_or_host_is_refused_with_its_cause() {
        let err = GitLabSite::parse("gitlab.example.com").unwrap_err();
        assert!(matches!(err, SiteError::Parse(..)), "{err:?}");
        assert!(std::error::Error::source(&err).is_some());
        assert_eq!(
            err.to_string(),
            "\"gitlab.example.com\": relative URL without a base"
        );
        let err = GitLabSite::parse("unix:/run/gitlab.sock").unwrap_err();
        assert_eq!(err.to_string(), "\"unix:/run/gitlab.sock\": no host");
    }

    #[test]
    fn branch_push_has_gitlabs_shape() {
        let hook = build(&poke(), &site(), Some("2024-05-01T10:00:00Z".into())).unwrap();
        let v = serde_json::to_value(&hook).unwrap();
        assert_eq!(v["object_kind"], "push");
        assert_eq!(v["event_name"], "push");
        assert_eq!(v["ref"], "refs/heads/main");
        assert_eq!(v["before"], "a".repeat(40));
        assert_eq!(v["after"], "b".repeat(40));
        assert_eq!(v["checkout_sha"], "b".repeat(40));
        assert_eq!(v["user_username"], "alice");
        assert_eq!(v["user_id"], serde_json::Value::Null);
        assert_eq!(v["project_id"], 42);
        let web = "https://gitlab.example.com:8443/group/sub/app";
        assert_eq!(
            v["project"],
            json!({
                "id": 42,
                "name": "app",
                "namespace": "group/sub",
                "path_with_namespace": "group/sub/app",
                "web_url": web,
                "git_http_url": format!("{web}.git"),
                "git_ssh_url": "git@gitlab.example.com:group/sub/app.git",
                "homepage": web,
                "url": "git@gitlab.example.com:group/sub/app.git",
                "ssh_url": "git@gitlab.example.com:group/sub/app.git",
                "http_url": format!("{web}.git"),
            })
        );
        assert_eq!(v["repository"]["git_http_url"], format!("{web}.git"));
        assert_eq!(v["repository"]["name"], "app");
        assert_eq!(v["total_commits_count"], 1);
        let c = &v["commits"][0];
        assert_eq!(c["id"], "b".repeat(40));
        assert_eq!(c["timestamp"], "2024-05-01T10:00:00Z");
        assert_eq!(c["modified"], json!(["deploy/app.yaml", "README.md"]));
        assert_eq!(c["added"], json!([]));
        assert_eq!(c["removed"], json!([]));
        assert_eq!(c["url"], format!("{web}/-/commit/{}", "b".repeat(40)));
    }

    #[test]
    fn tags_deletes_unknown_paths_and_other_refs() {
        let mut tag = poke();
        tag.r#ref = "refs/tags/v1".into();
        tag.ref_kind = RefKind::Tag as i32;
        tag.actor = "user-7".into();
        let hook = build(&tag, &site(), None).unwrap();
        assert_eq!(hook.object_kind, "tag_push");
        assert_eq!(HookKind::of(&tag).unwrap().header(), "Tag Push Hook");
        assert_eq!(hook.user_id, Some(7));
        assert_eq!(hook.commits[0].timestamp, None);

        let mut unknown = poke();
        unknown.paths_known = false;
        let hook = build(&unknown, &site(), None).unwrap();
        assert!(hook.commits[0].modified.is_empty());

        let mut deleted = poke();
        deleted.change_kind = ChangeKind::Delete as i32;
        deleted.new_sha = "0".repeat(40);
        let hook = build(&deleted, &site(), None).unwrap();
        assert_eq!(hook.checkout_sha, None);
        assert!(hook.commits.is_empty());
        assert_eq!(hook.total_commits_count, 0);
        let v = serde_json::to_value(&hook).unwrap();
        assert_eq!(v["checkout_sha"], serde_json::Value::Null);

        let mut mr = poke();
        mr.r#ref = "refs/merge-requests/1/head".into();
        mr.ref_kind = RefKind::Other as i32;
        assert!(build(&mr, &site(), None).is_none());
    }

    #[test]
    fn default_branch_is_sent_when_known() {
        let mut p = poke();
        p.default_branch = "main".into();
        let v = serde_json::to_value(build(&p, &site(), None).unwrap()).unwrap();
        assert_eq!(v["project"]["default_branch"], "main");
        // Unknown: left out, never guessed (Argo CD would match it wrongly).
        let v = serde_json::to_value(build(&poke(), &site(), None).unwrap()).unwrap();
        assert!(v["project"].get("default_branch").is_none(), "{v}");
    }

    #[test]
    fn project_without_path_uses_its_id() {
        let mut p = poke();
        p.project_path.clear();
        let hook = build(&p, &GitLabSite::parse("http://localhost").unwrap(), None).unwrap();
        assert_eq!(hook.project.web_url, "http://localhost/42");
        assert_eq!(hook.project.git_ssh_url, "git@localhost:42.git");
        assert_eq!(hook.project.namespace, "");
    }
}
