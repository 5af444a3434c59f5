//! The watch index: project -> watches, so the cost of matching a push
//! depends on the agents watching that project, not on the registry's size.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use pushbus_shared::proto::{GitPushEvent, RefChange, RefKind};

use crate::agent::{CompiledWatch, ProjectKey};

#[derive(Default, Debug)]
pub struct Index {
    by_project: HashMap<ProjectKey, Vec<CompiledWatch>>,
    /// Agent -> the projects it has watches in (for replacing an agent).
    agents: HashMap<Arc<str>, HashSet<ProjectKey>>,
}

/// One poke to send: agent and the index of the ref change in the push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub agent_id: Arc<str>,
    pub change: usize,
}

impl Index {
    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    /// Replaces everything `agent_id` watched with `watches`.
    pub fn put(&mut self, agent_id: &str, watches: Vec<CompiledWatch>) {
        self.remove(agent_id);
        let id: Arc<str> = agent_id.into();
        let mut projects = HashSet::new();
        for w in watches {
            projects.insert(w.project.clone());
            self.by_project
                .entry(w.project.clone())
                .or_default()
                .push(w);
        }
        self.agents.insert(id, projects);
    }

    pub fn remove(&mut self, agent_id: &str) {
        let Some(projects) = self.agents.remove(agent_id) else {
            return;
        };
        for p in projects {
            if let Some(ws) = self.by_project.get_mut(&p) {
                ws.retain(|w| &*w.agent_id != agent_id);
                if ws.is_empty() {
                    self.by_project.remove(&p);
                }
            }
        }
    }

    /// One match per (agent, ref change) whatever how many of the agent's
    /// watches match it, in change order.
    pub fn matches(&self, push: &GitPushEvent) -> Vec<Match> {
        let by_id = self.by_project.get(&ProjectKey::Id(push.project_id));
        let by_path = (!push.project_path.is_empty())
            .then(|| {
                self.by_project
                    .get(&ProjectKey::Path(push.project_path.clone()))
            })
            .flatten();
        let candidates: Vec<&CompiledWatch> = by_id.into_iter().chain(by_path).flatten().collect();
        if candidates.is_empty() {
            return Vec::new();
        }
        let mut out = Vec::new();
        let mut seen: HashSet<(&str, usize)> = HashSet::new();
        for (i, change) in push.changes.iter().enumerate() {
            let kind = RefKind::try_from(change.ref_kind).unwrap_or(RefKind::Unspecified);
            let paths = known_paths(change);
            for w in &candidates {
                if w.matches_ref(&change.r#ref, kind)
                    && w.matches_paths(paths)
                    && seen.insert((&w.agent_id, i))
                {
                    out.push(Match {
                        agent_id: w.agent_id.clone(),
                        change: i,
                    });
                }
            }
        }
        out
    }
}

fn known_paths(change: &RefChange) -> Option<&[String]> {
    change
        .paths_known
        .then_some(change.changed_paths.as_slice())
}
