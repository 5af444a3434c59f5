//! The in-memory index of every head's revision and SHA, per agent.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

use super::{Change, Head};
use crate::conn::RefKey;

/// Revision and SHA of every head, per agent: what catch-up needs to pick
/// the refs an agent missed without asking the server per connection (10,000
/// agents reconnecting at once would otherwise each create a consumer).
#[derive(Default)]
pub struct HeadIndex {
    inner: Mutex<Agents>,
    /// Every head up to this revision is in the index; later ones are still
    /// to come through the feed (and so reach connections registered now).
    position: AtomicU64,
}

#[derive(Default)]
pub(super) struct Agents {
    by_id: HashMap<Arc<str>, AgentHeads>,
    /// Heads in all (the `pushbus_notifier_ref_heads` gauge).
    heads: usize,
}

#[derive(Default)]
pub(super) struct AgentHeads {
    refs: HashMap<RefKey, Known>,
    /// The highest revision of a head of this agent that was removed: an
    /// agent whose cursor is below it may have missed that removal, which
    /// catch-up can no longer show it.
    removed_up_to: u64,
}

pub(super) struct Known {
    revision: u64,
    sha: Box<str>,
}

impl HeadIndex {
    fn lock(&self) -> std::sync::MutexGuard<'_, Agents> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn record(&self, h: &Head) {
        let mut agents = self.lock();
        let refs = &mut agents
            .by_id
            .entry(h.agent_id.as_str().into())
            .or_default()
            .refs;
        let added = match refs.get_mut(&h.key) {
            Some(k) if k.revision >= h.revision => false,
            Some(k) => {
                k.revision = h.revision;
                k.sha = h.sha().into();
                false
            }
            None => {
                refs.insert(
                    h.key.clone(),
                    Known {
                        revision: h.revision,
                        sha: h.sha().into(),
                    },
                );
                true
            }
        };
        if added {
            agents.heads += 1;
            gauge(agents.heads);
        }
    }

    /// The ref's head was removed by the marker at `revision`.
    fn remove(&self, agent_id: &str, key: &RefKey, revision: u64) {
        let mut agents = self.lock();
        let agent = agents.by_id.entry(agent_id.into()).or_default();
        let removed = match agent.refs.get(key) {
            // A later head of the ref (loaded, or a feed that went back).
            Some(k) if k.revision > revision => return,
            Some(k) => {
                let r = k.revision;
                agent.refs.remove(key);
                Some(r)
            }
            None => None,
        };
        // Without the head (a replica that started after it went), the
        // marker's own revision: later than the head's, so never too low.
        agent.removed_up_to = agent.removed_up_to.max(removed.unwrap_or(revision));
        if removed.is_some() {
            agents.heads -= 1;
            gauge(agents.heads);
        }
    }

    /// Forgets everything about a deleted agent.
    pub fn forget_agent(&self, agent_id: &str) {
        let mut agents = self.lock();
        if let Some(gone) = agents.by_id.remove(agent_id) {
            agents.heads -= gone.refs.len();
            gauge(agents.heads);
        }
    }

    /// The agent's refs `wanted` selects, by (ref key, revision, SHA).
    pub fn select(&self, agent_id: &str, wanted: impl Fn(&str, u64, &str) -> bool) -> Vec<RefKey> {
        self.each_head(agent_id, |key, k| {
            wanted(key, k.revision, &k.sha).then(|| key.clone())
        })
    }

    /// (ref key, revision) of every head of the agent.
    pub fn heads_of(&self, agent_id: &str) -> Vec<(RefKey, u64)> {
        self.each_head(agent_id, |key, k| Some((key.clone(), k.revision)))
    }

    /// What `pick` keeps of each of the agent's heads, under one lock.
    fn each_head<T>(&self, agent_id: &str, pick: impl Fn(&RefKey, &Known) -> Option<T>) -> Vec<T> {
        self.lock()
            .by_id
            .get(agent_id)
            .map(|agent| {
                agent
                    .refs
                    .iter()
                    .filter_map(|(key, k)| pick(key, k))
                    .collect()
            })
            .unwrap_or_default()
    }

    /// Every agent the index holds something for.
    pub fn agents(&self) -> Vec<Arc<str>> {
        self.lock().by_id.keys().cloned().collect()
    }

    /// See [`AgentHeads::removed_up_to`]; 0 when nothing was removed.
    pub fn removed_up_to(&self, agent_id: &str) -> u64 {
        self.lock()
            .by_id
            .get(agent_id)
            .map_or(0, |a| a.removed_up_to)
    }

    /// The cursor a connection registered now may resume from.
    pub fn position(&self) -> u64 {
        self.position.load(Ordering::SeqCst)
    }

    pub(super) fn advance(&self, revision: u64) {
        self.position.fetch_max(revision, Ordering::SeqCst);
    }

    pub fn len(&self) -> usize {
        self.lock().heads
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

pub(super) fn gauge(heads: usize) {
    metrics::gauge!("pushbus_notifier_ref_heads").set(heads as f64);
}

pub(super) fn apply(index: &HeadIndex, change: &Change) {
    match change {
        Change::Put(h) => index.record(h),
        Change::Removed {
            agent_id,
            key,
            revision,
        } => index.remove(agent_id, key, *revision),
    }
}
