//! Removes the ref heads of deleted agents: at once when the registry says
//! an agent was deleted, and by a periodic sweep that catches the rest (a
//! poke that was in flight when its agent went, a deletion no replica was
//! running to see). Any replica may do it, any number at once: each purge
//! names the revision it removes, so the first one wins and the others are
//! no-ops. The purge markers reach every replica's feed, which drops the
//! heads from its index.

use std::collections::HashSet;
use std::sync::Arc;
use std::time::Duration;

use async_nats::jetstream::kv::{Operation, PurgeErrorKind, Store};
use futures::StreamExt;
use tokio_util::sync::CancellationToken;

use crate::heads::{self, HeadIndex, HeadsError, kv_err};

/// Purges every head of `agent_id` this replica knows of and forgets the
/// agent. Returns how many heads it purged (0 when another replica was
/// first).
pub async fn purge_agent(
    kv: &Store,
    index: &HeadIndex,
    agent_id: &str,
    marker_ttl: Duration,
) -> Result<usize, HeadsError> {
    let ttl = heads::allows_ttl(kv).then_some(marker_ttl);
    let mut purged = 0;
    for (key, revision) in index.heads_of(agent_id) {
        let full = format!("{agent_id}.{key}");
        let mut last = revision;
        // A head newer than this replica has seen yet: purge that one.
        for _ in 0..4 {
            let done = match ttl {
                Some(ttl) => kv.purge_expect_revision_with_ttl(&full, last, ttl).await,
                None => kv.purge_expect_revision(&full, Some(last)).await,
            };
            match done {
                Ok(()) => {
                    purged += 1;
                    break;
                }
                Err(e) if e.kind() == PurgeErrorKind::WrongLastRevision => {
                    match kv.entry(&full).await.map_err(kv_err)? {
                        Some(e) if e.operation == Operation::Put => last = e.revision,
                        _ => break, // gone already
                    }
                }
                Err(e) => return Err(kv_err(e)),
            }
        }
    }
    index.forget_agent(agent_id);
    if purged > 0 {
        metrics::counter!("pushbus_notifier_ref_heads_purged_total").increment(purged as u64);
        tracing::info!(%agent_id, purged, "deleted agent's ref heads purged");
    }
    Ok(purged)
}

/// Every `interval`, purges the heads of agents the registry no longer has.
pub async fn sweep(
    agents: Store,
    kv: Store,
    index: Arc<HeadIndex>,
    interval: Duration,
    marker_ttl: Duration,
    shutdown: CancellationToken,
) {
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
        if let Err(err) = sweep_once(&agents, &kv, &index, marker_ttl).await {
            tracing::warn!(%err, "ref heads sweep failed; trying again later");
        }
    }
}

async fn sweep_once(
    agents: &Store,
    kv: &Store,
    index: &HeadIndex,
    marker_ttl: Duration,
) -> Result<(), HeadsError> {
    let candidates = index.agents();
    if candidates.is_empty() {
        return Ok(());
    }
    let mut registered = HashSet::new();
    let mut keys = agents.keys().await.map_err(kv_err)?;
    while let Some(key) = keys.next().await {
        registered.insert(key.map_err(kv_err)?);
    }
    for agent_id in candidates {
        if registered.contains(agent_id.as_ref()) {
            continue;
        }
        // Registered since the listing?
        let entry = agents.entry(agent_id.as_ref()).await.map_err(kv_err)?;
        if entry.is_some_and(|e| e.operation == Operation::Put) {
            continue;
        }
        purge_agent(kv, index, &agent_id, marker_ttl).await?;
    }
    Ok(())
}
