//! Follows the agent registry and ends the live streams of an agent whose
//! token changed or which was deleted: a stream authenticated once must not
//! outlive the credential it was opened with. A deleted agent's ref heads
//! are purged too.

use std::time::Duration;

use async_nats::jetstream::kv::{Operation, Store};
use futures::StreamExt;
use prost::Message;
use pushbus_shared::proto::AgentConfig;
use tokio_util::sync::CancellationToken;

use crate::Hub;
use crate::auth::{self, LoginGate};

pub const TOKEN_CHANGED: &str = "agent token changed: reconnect with the new token";
pub const DELETED: &str = "agent deleted from the registry";

/// Where a deleted agent's ref heads are purged.
#[derive(Clone)]
pub struct HeadsOf {
    pub kv: Store,
    pub index: std::sync::Arc<crate::heads::HeadIndex>,
    pub marker_ttl: Duration,
}

pub async fn follow(
    agents: Store,
    hub: Hub,
    gate: std::sync::Arc<LoginGate>,
    heads: HeadsOf,
    shutdown: CancellationToken,
) {
    loop {
        let mut updates = match agents.watch_all().await {
            Ok(w) => w,
            Err(err) => {
                tracing::warn!(%err, "cannot watch the agent registry; retrying");
                tokio::select! {
                    _ = shutdown.cancelled() => return,
                    _ = tokio::time::sleep(Duration::from_secs(1)) => continue,
                }
            }
        };
        loop {
            let entry = tokio::select! {
                _ = shutdown.cancelled() => return,
                e = updates.next() => e,
            };
            let entry = match entry {
                Some(Ok(e)) => e,
                Some(Err(err)) => {
                    tracing::warn!(%err, "agent registry watch failed; restarting it");
                    break;
                }
                None => break,
            };
            gate.forget(&entry.key);
            let closed = match entry.operation {
                Operation::Put => {
                    let credential = AgentConfig::decode(entry.value.as_ref())
                        .ok()
                        .and_then(|cfg| auth::credential(&cfg));
                    match credential {
                        Some(c) => hub.close_agent(&entry.key, Some(&c), TOKEN_CHANGED),
                        // Undecodable, or no longer connectable.
                        None => hub.close_agent(&entry.key, None, TOKEN_CHANGED),
                    }
                }
                Operation::Delete | Operation::Purge => {
                    // Off this loop: a big agent's purge must not hold up
                    // revocations. Idempotent, so every replica may.
                    let heads = heads.clone();
                    let agent_id = entry.key.clone();
                    tokio::spawn(async move {
                        if let Err(err) = crate::prune::purge_agent(
                            &heads.kv,
                            &heads.index,
                            &agent_id,
                            heads.marker_ttl,
                        )
                        .await
                        {
                            tracing::warn!(%agent_id, %err, "cannot purge a deleted agent's ref heads yet; the sweep will");
                        }
                    });
                    hub.close_agent(&entry.key, None, DELETED)
                }
            };
            if closed > 0 {
                metrics::counter!("pushbus_notifier_streams_revoked_total")
                    .increment(closed as u64);
                tracing::info!(agent_id = %entry.key, closed, "agent's credential changed; its streams closed");
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
    }
}
