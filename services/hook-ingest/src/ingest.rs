//! Accepting a validated push: publish it durably (split when large), then
//! gather the messages for the pusher.

use std::time::Duration;

use prost::Message;
use pushbus_shared::bus::{PublishError, Publisher};
use pushbus_shared::proto::{GitPushEvent, HookMessage, RefChange, RepositoryKind};
use pushbus_shared::{EventMeta, names};

use crate::changes::Invalid;
use crate::{geo_routes, lag};

/// A push that passed validation.
#[derive(Clone, Debug, Default)]
pub struct Push {
    pub project_id: i64,
    pub project_path: String,
    pub repository_kind: RepositoryKind,
    pub changes: Vec<RefChange>,
    pub actor: String,
    pub protocol: String,
    pub push_options: Vec<String>,
    pub geo_node_id: Option<String>,
    /// The repository's default branch ("main"), empty when unknown.
    pub default_branch: String,
    /// The correlation ID came from the caller (not minted here), so a front
    /// end may have stored a Geo route under it.
    pub correlation_from_caller: bool,
}

impl Push {
    /// Checks what every door must check beyond the ref changes themselves
    /// (those are checked when parsed); `path_field` names the project path
    /// as that door calls it.
    pub fn validate(&self, path_field: &str) -> Result<(), Invalid> {
        if self.project_id <= 0 {
            return Err(Invalid::new("project_id", "must be positive"));
        }
        if !self.actor.is_empty() && !is_identifier(&self.actor) {
            return Err(Invalid::new(
                "identifier",
                "expected user-<id>, key-<id> or username-<name>",
            ));
        }
        if let Some(node) = &self.geo_node_id
            && !names::is_valid_token(node)
        {
            return Err(Invalid::new(
                "geo_node_id",
                "must match [A-Za-z0-9_-]{1,128}",
            ));
        }
        for (i, o) in self.push_options.iter().enumerate() {
            if o.len() > 4096 || o.chars().any(char::is_control) {
                return Err(Invalid::new(
                    format!("push_options[{i}]"),
                    "too long or has control characters",
                ));
            }
        }
        if !self.default_branch.is_empty() {
            crate::changes::check_ref_format(&format!("refs/heads/{}", self.default_branch))
                .map_err(|reason| Invalid::new("default_branch", reason))?;
        }
        if self.project_path.len() > 1024 || self.project_path.chars().any(char::is_control) {
            return Err(Invalid::new(
                path_field,
                "too long or has control characters",
            ));
        }
        Ok(())
    }
}

/// `user-<id>`, `key-<id>` or `username-<name>`.
fn is_identifier(s: &str) -> bool {
    match s.split_once('-') {
        Some(("user" | "key", id)) => id.parse::<i64>().is_ok_and(|n| n > 0),
        Some(("username", name)) => {
            !name.is_empty()
                && name.len() <= 255
                && name
                    .chars()
                    .all(|c| c.is_alphanumeric() || "-_.".contains(c))
        }
        _ => false,
    }
}

#[derive(Debug)]
pub struct Accepted {
    pub correlation_id: String,
    pub event_ids: Vec<String>,
    pub messages: Vec<HookMessage>,
}

/// Why a push was not stored. Every cause is answered 503 / UNAVAILABLE:
/// the pusher's hook spools the push and replays it later.
#[derive(Debug, thiserror::Error)]
pub enum IngestError {
    #[error("not connected to NATS")]
    NotConnected,
    #[error("timed out sending to the stream")]
    SendTimeout,
    #[error("the stream did not confirm in time")]
    ConfirmTimeout,
    #[error(transparent)]
    Store(#[from] PublishError),
}

/// Room left for headers and the envelope around a part's payload.
const ENVELOPE_MARGIN: usize = 8 * 1024;

#[derive(Clone)]
pub struct Ingest {
    pub publisher: Publisher,
    pub client: async_nats::Client,
    pub lag_budget: Duration,
    /// How long to wait for the stream's ack before answering "not stored";
    /// shorter than the hook's own timeout, so the hook hears the 503 and
    /// spools instead of giving up blind.
    pub store_timeout: Duration,
    /// KV bucket pushbus-geo-push-routes when the correlation-ID cache
    /// variant is on (`--ingest-geo-routes`).
    pub routes: Option<async_nats::jetstream::kv::Store>,
}

impl Ingest {
    pub async fn accept(
        &self,
        mut push: Push,
        correlation_id: String,
    ) -> Result<Accepted, IngestError> {
        // The route lookup and the lag request share one budget, so a Geo push
        // never waits longer than a push that named its node.
        let mut lag_budget = self.lag_budget;
        if let Some(bucket) = &self.routes
            && push.geo_node_id.is_none()
            && push.correlation_from_caller
        {
            let started = tokio::time::Instant::now();
            push.geo_node_id = geo_routes::lookup(bucket, &correlation_id, lag_budget).await;
            lag_budget = lag_budget.saturating_sub(started.elapsed());
            if let Some(node) = &push.geo_node_id {
                tracing::debug!(geo_node_id = %node, "Geo node taken from the correlation-ID route");
            }
        }
        // A publish sent while disconnected would sit in the client's buffer
        // and might be stored long after we answered 503; refuse it now.
        if self.client.connection_state() != async_nats::connection::State::Connected {
            return Err(IngestError::NotConnected);
        }
        // `max_payload()` reads one atomic; `server_info()` would clone the
        // whole INFO (URLs, names) on every push.
        let max_payload = self.client.max_payload().max(64 * 1024);
        let parts = split(&push, max_payload - ENVELOPE_MARGIN);
        let part_count = parts.len() as u32;
        let deadline = tokio::time::Instant::now() + self.store_timeout;
        let mut pending = Vec::with_capacity(parts.len());
        let mut event_ids = Vec::with_capacity(parts.len());
        for (i, changes) in parts.into_iter().enumerate() {
            let part = i as u32 + 1;
            let identity = identity(&push, &changes, &correlation_id, part);
            let identity: Vec<&str> = identity.iter().map(String::as_str).collect();
            let meta = EventMeta::deterministic(&correlation_id, &identity);
            let event = GitPushEvent {
                project_id: push.project_id,
                project_path: push.project_path.clone(),
                repository_kind: push.repository_kind as i32,
                changes,
                actor: push.actor.clone(),
                protocol: push.protocol.clone(),
                push_options: push.push_options.clone(),
                geo_node_id: push.geo_node_id.clone(),
                part,
                part_count,
                default_branch: push.default_branch.clone(),
            };
            let subject = names::push_subject(push.project_id, &meta.event_id);
            let sent =
                tokio::time::timeout_at(deadline, self.publisher.send_once(subject, &event, &meta))
                    .await
                    .map_err(|_| IngestError::SendTimeout)??;
            event_ids.push(meta.event_id);
            pending.push(sent);
        }
        let mut replayed = 0;
        for p in pending {
            match tokio::time::timeout_at(deadline, p.wait()).await {
                Ok(Ok(_)) => {}
                // Stored by an earlier attempt (a replay of a spooled push).
                Ok(Err(e)) if e.is_already_stored() => replayed += 1,
                Ok(Err(e)) => return Err(e.into()),
                Err(_) => return Err(IngestError::ConfirmTimeout),
            }
        }
        if replayed > 0 {
            metrics::counter!("pushbus_ingest_replays_total").increment(1);
            tracing::info!(
                project_id = push.project_id,
                parts = replayed,
                "push already stored by an earlier attempt; not stored again"
            );
        }
        metrics::counter!("pushbus_ingest_pushes_total").increment(1);
        // Per push: debug, so the default level costs no line per push
        // (BENCHMARKS.md: it cost an eighth of the throughput).
        tracing::debug!(
            project_id = push.project_id,
            parts = part_count,
            refs = push.changes.len(),
            "push stored"
        );
        let messages = match &push.geo_node_id {
            Some(node) => {
                lag::messages(
                    &self.client,
                    node,
                    &correlation_id,
                    push.project_id,
                    lag_budget,
                )
                .await
            }
            None => Vec::new(),
        };
        Ok(Accepted {
            correlation_id,
            event_ids,
            messages,
        })
    }
}

/// What makes a push part the same push on a retry: project, its changes,
/// the correlation ID and the part number.
fn identity(push: &Push, changes: &[RefChange], correlation_id: &str, part: u32) -> Vec<String> {
    let mut lines = String::new();
    for c in changes {
        lines.push_str(&c.old_sha);
        lines.push(' ');
        lines.push_str(&c.new_sha);
        lines.push(' ');
        lines.push_str(&c.r#ref);
        lines.push('\n');
    }
    vec![
        push.project_id.to_string(),
        lines,
        correlation_id.to_owned(),
        part.to_string(),
    ]
}

/// Splits the changes into parts whose encoded events stay under `budget`.
pub fn split(push: &Push, budget: usize) -> Vec<Vec<RefChange>> {
    let base = GitPushEvent {
        project_path: push.project_path.clone(),
        actor: push.actor.clone(),
        protocol: push.protocol.clone(),
        push_options: push.push_options.clone(),
        geo_node_id: push.geo_node_id.clone(),
        default_branch: push.default_branch.clone(),
        project_id: push.project_id,
        part: u32::MAX,
        part_count: u32::MAX,
        ..Default::default()
    }
    .encoded_len();
    let mut parts = Vec::new();
    let mut current = Vec::new();
    let mut size = base;
    for c in &push.changes {
        // Field tag + length prefix + message.
        let len = c.encoded_len() + 1 + prost::length_delimiter_len(c.encoded_len());
        if !current.is_empty() && size + len > budget {
            parts.push(std::mem::take(&mut current));
            size = base;
        }
        size += len;
        current.push(c.clone());
    }
    parts.push(current);
    parts
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn splits_large_pushes_under_budget_without_loss() {
        let changes: Vec<RefChange> = (0..20_000)
            .map(|i| RefChange {
                old_sha: "0".repeat(40),
                new_sha: "a".repeat(40),
                r#ref: format!("refs/tags/v{i}"),
                ..Default::default()
            })
            .collect();
        let push = Push {
            project_id: 1,
            changes: changes.clone(),
            ..Default::default()
        };
        let parts = split(&push, 256 * 1024);
        assert!(parts.len() > 1);
        let total: Vec<RefChange> = parts.iter().flatten().cloned().collect();
        assert_eq!(total, changes);
        for p in &parts {
            let ev = GitPushEvent {
                project_id: 1,
                changes: p.clone(),
                part: 1,
                part_count: parts.len() as u32,
                ..Default::default()
            };
            assert!(ev.encoded_len() <= 256 * 1024);
        }
        let small = Push {
            changes: changes[..3].to_vec(),
            ..Default::default()
        };
        assert_eq!(split(&small, 256 * 1024).len(), 1);
    }
}
