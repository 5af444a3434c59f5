//! The agent registry: the `pushbus-agents` KV bucket, loaded whole before
//! any push is matched, then kept current from the bucket's watch.

use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use async_nats::jetstream::kv::{Entry, Operation, Store};
use futures::StreamExt;
use prost::Message;
use pushbus_shared::proto::AgentConfig;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::index::Index;

pub type SharedIndex = Arc<RwLock<Index>>;

/// Keeps `index` in step with the bucket until `shutdown`. `loaded` turns
/// true once the first full load is in the index (and stays true across
/// reloads: the old index keeps serving until the new one is complete).
pub async fn sync(
    kv: Store,
    index: SharedIndex,
    loaded: watch::Sender<bool>,
    shutdown: CancellationToken,
) {
    while !shutdown.is_cancelled() {
        match load(&kv).await {
            Ok((fresh, watch, last_revision)) => {
                metrics::gauge!("pushbus_filter_registry_agents").set(fresh.agent_count() as f64);
                *write(&index) = fresh;
                loaded.send_replace(true);
                tracing::info!(last_revision, "agent registry loaded; following updates");
                follow(&kv, watch, last_revision, &index, &shutdown).await;
            }
            Err(err) => tracing::warn!(error = %err, "cannot load agent registry; retrying"),
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
}

type Watch = async_nats::jetstream::kv::Watch;

/// Reads the final value of every key into a new index; returns it with the
/// watch positioned right after the snapshot.
async fn load(kv: &Store) -> Result<(Index, Watch, u64), async_nats::Error> {
    let started = Instant::now();
    // Fresh from the server: `Store::status` returns the info cached when the
    // handle was made, which would end a reload early (a half-loaded index).
    let state = kv.stream.get_info().await?.state;
    let last = state.last_sequence;
    let mut watch = kv.watch_with_history(">").await?;
    // One entry per key (not per message: the bucket keeps some history).
    let mut index = Index::with_capacity(usize::try_from(state.subjects_count).unwrap_or(0));
    if state.messages > 0 {
        while let Some(entry) = watch.next().await {
            let entry = entry?;
            let done = entry.delta == 0 || entry.revision >= last;
            apply(&mut index, &entry);
            if done {
                break;
            }
        }
    }
    index.shrink_to_fit();
    metrics::histogram!("pushbus_filter_index_build_seconds")
        .record(started.elapsed().as_secs_f64());
    Ok((index, watch, last))
}

/// A one-off full load (benchmarks, tools): the index as the filter builds
/// it on start-up.
pub async fn snapshot(kv: &Store) -> Result<Index, async_nats::Error> {
    Ok(load(kv).await?.0)
}

/// How long a quiet watch goes before we ask the server whether it missed
/// something: a watch's ephemeral consumer can vanish with a cluster node
/// (or a stream leader change) without an error reaching us.
const STALL_CHECK: Duration = Duration::from_secs(3);

async fn follow(
    kv: &Store,
    mut watch: Watch,
    mut seen: u64,
    index: &SharedIndex,
    shutdown: &CancellationToken,
) {
    let mut check = tokio::time::interval(STALL_CHECK);
    check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut quiet_since = Instant::now();
    loop {
        let next = tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = check.tick() => {
                if quiet_since.elapsed() >= STALL_CHECK
                    && let Ok(info) = kv.stream.get_info().await
                    && info.state.last_sequence > seen
                {
                    tracing::warn!(seen, last = info.state.last_sequence, "agent registry watch stalled; reloading");
                    return;
                }
                continue;
            }
            next = watch.next() => next,
        };
        quiet_since = Instant::now();
        match next {
            Some(Ok(entry)) => {
                seen = seen.max(entry.revision);
                let mut idx = write(index);
                apply(&mut idx, &entry);
                metrics::gauge!("pushbus_filter_registry_agents").set(idx.agent_count() as f64);
            }
            Some(Err(err)) => {
                tracing::warn!(error = %err, "agent registry watch failed; reloading");
                return;
            }
            None => return,
        }
    }
}

fn apply(index: &mut Index, entry: &Entry) {
    match entry.operation {
        Operation::Delete | Operation::Purge => index.remove(&entry.key),
        Operation::Put => match decode(entry) {
            Ok((watches, webhook)) => {
                index.put(&entry.key, watches);
                index.set_webhook(&entry.key, webhook);
            }
            Err(reason) => {
                // Never crash on a bad value; the agent is not matched until fixed.
                tracing::error!(agent_id = %entry.key, revision = entry.revision, %reason, "invalid agent config in registry; agent disabled");
                index.remove(&entry.key);
            }
        },
    }
}

/// Why a stored value disables its agent.
#[derive(Debug, thiserror::Error)]
enum StoredAgentError {
    #[error("undecodable AgentConfig: {0}")]
    Undecodable(#[source] prost::DecodeError),
    #[error("agent_id {0:?} does not match its key")]
    KeyMismatch(String),
    // The log line already says "invalid agent config".
    #[error("{0}")]
    Invalid(#[source] agent::AgentConfigError),
}

/// The agent's compiled watches, and whether it names a webhook.
fn decode(entry: &Entry) -> Result<(Vec<agent::CompiledWatch>, bool), StoredAgentError> {
    let cfg = AgentConfig::decode(entry.value.as_ref()).map_err(StoredAgentError::Undecodable)?;
    if cfg.agent_id != entry.key {
        return Err(StoredAgentError::KeyMismatch(cfg.agent_id));
    }
    let webhook = cfg.webhook.as_ref().is_some_and(|w| !w.url.is_empty());
    let watches = agent::compile(&cfg).map_err(StoredAgentError::Invalid)?;
    Ok((watches, webhook))
}

pub fn write(index: &SharedIndex) -> std::sync::RwLockWriteGuard<'_, Index> {
    index.write().unwrap_or_else(|e| e.into_inner())
}

pub fn read(index: &SharedIndex) -> std::sync::RwLockReadGuard<'_, Index> {
    index.read().unwrap_or_else(|e| e.into_inner())
}

/// Validates and stores an agent config (the `pushbus agents put` path).
pub async fn put_agent(kv: &Store, cfg: &AgentConfig) -> Result<u64, RegistryError> {
    agent::compile(cfg)?;
    kv.put(&cfg.agent_id, cfg.encode_to_vec().into())
        .await
        .map_err(RegistryError::Kv)
}

#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error("invalid agent config: {0}")]
    Invalid(#[from] agent::AgentConfigError),
    #[error("agent registry: {0}")]
    Kv(#[source] async_nats::jetstream::kv::PutError),
}
