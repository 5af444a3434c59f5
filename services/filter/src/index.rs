//! The watch index: project -> watches, so the cost of matching a push
//! depends on the agents watching that project, not on the registry's size.

use std::collections::{HashMap, HashSet};
use std::sync::Arc;

use pushbus_shared::proto::{GitPushEvent, RefChange, RefKind, RepositoryKind};

use crate::agent::{CompiledWatch, Interner, ProjectKey, WatchMatcher};

#[derive(Default, Debug)]
pub struct Index {
    by_id: HashMap<i64, Vec<WatchMatcher>>,
    by_path: HashMap<Box<str>, Vec<WatchMatcher>>,
    /// Agent -> the projects it has watches in (for replacing an agent).
    agents: HashMap<Arc<str>, Box<[ProjectKey]>>,
    /// Agents whose config names a webhook.
    webhooks: HashSet<Arc<str>>,
    strings: Interner,
    removed_since_sweep: usize,
}

/// One poke to send: agent and the index of the ref change in the push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Match {
    pub agent_id: Arc<str>,
    pub change: usize,
}

impl Index {
    /// An empty index with room for about `agents` agents, so a full load
    /// allocates its maps once instead of doubling them as it goes (every
    /// table it outgrows is freed memory the process keeps).
    pub fn with_capacity(agents: usize) -> Index {
        Index {
            by_id: HashMap::with_capacity(agents),
            agents: HashMap::with_capacity(agents),
            ..Index::default()
        }
    }

    pub fn agent_count(&self) -> usize {
        self.agents.len()
    }

    pub fn watch_count(&self) -> usize {
        self.watches().count()
    }

    /// Every watch with its project.
    fn watches(&self) -> impl Iterator<Item = (ProjectRef<'_>, &WatchMatcher)> {
        let by_id = self
            .by_id
            .iter()
            .flat_map(|(id, ws)| ws.iter().map(|w| (ProjectRef::Id(*id), w)));
        let by_path = self
            .by_path
            .iter()
            .flat_map(|(p, ws)| ws.iter().map(|w| (ProjectRef::Path(p), w)));
        by_id.chain(by_path)
    }

    /// Gives back the spare capacity of every list (after a full load).
    pub fn shrink_to_fit(&mut self) {
        self.by_id.values_mut().for_each(Vec::shrink_to_fit);
        self.by_path.values_mut().for_each(Vec::shrink_to_fit);
        self.by_id.shrink_to_fit();
        self.by_path.shrink_to_fit();
        self.agents.shrink_to_fit();
    }

    pub fn has_webhook(&self, agent_id: &str) -> bool {
        self.webhooks.contains(agent_id)
    }

    /// Marks whether `agent_id` (already `put`) wants webhook deliveries.
    pub fn set_webhook(&mut self, agent_id: &str, wanted: bool) {
        if !wanted {
            self.webhooks.remove(agent_id);
        } else if let Some((id, _)) = self.agents.get_key_value(agent_id) {
            self.webhooks.insert(id.clone());
        }
    }

    /// Replaces everything `agent_id` watched with `watches`.
    pub fn put(&mut self, agent_id: &str, watches: Vec<CompiledWatch>) {
        self.remove(agent_id);
        let mut projects: Vec<ProjectKey> = Vec::new();
        // The watches' own copy of the ID (one `Arc` for all of them), not
        // another one.
        let agent_key: Arc<str> = watches
            .first()
            .map(|w| w.matcher.agent_id.clone())
            .filter(|id| &**id == agent_id)
            .unwrap_or_else(|| agent_id.into());
        // Most projects have one watcher: a list of one, not of four
        // (`Vec`'s first growth) shrunk after the load.
        let one = || Vec::with_capacity(1);
        for CompiledWatch {
            project,
            mut matcher,
        } in watches
        {
            matcher.intern(&mut self.strings);
            match &project {
                ProjectKey::Id(id) => self.by_id.entry(*id).or_insert_with(one).push(matcher),
                ProjectKey::Path(path) => self
                    .by_path
                    .entry(path.clone())
                    .or_insert_with(one)
                    .push(matcher),
            }
            if !projects.contains(&project) {
                projects.push(project);
            }
        }
        self.agents.insert(agent_key, projects.into());
    }

    pub fn remove(&mut self, agent_id: &str) {
        self.webhooks.remove(agent_id);
        let Some(projects) = self.agents.remove(agent_id) else {
            return;
        };
        for p in &projects {
            match p {
                ProjectKey::Id(id) => retain_others(&mut self.by_id, id, agent_id),
                ProjectKey::Path(path) => retain_others(&mut self.by_path, &**path, agent_id),
            }
        }
        self.removed_since_sweep += 1;
        if self.removed_since_sweep >= 4096 {
            self.strings.sweep();
            self.removed_since_sweep = 0;
        }
    }

    /// One match per (agent, ref change) whatever how many of the agent's
    /// watches match it, in change order.
    pub fn matches(&self, push: &GitPushEvent) -> Vec<Match> {
        // Wikis, snippets, groups and designs are other repositories than the
        // project one agents watch; only project pushes (and unlabelled ones) match.
        if !matches!(
            RepositoryKind::try_from(push.repository_kind),
            Ok(RepositoryKind::Project | RepositoryKind::Unspecified)
        ) {
            return Vec::new();
        }
        let by_id = self.by_id.get(&push.project_id);
        let by_path = (!push.project_path.is_empty())
            .then(|| self.by_path.get(push.project_path.as_str()))
            .flatten();
        let candidates: Vec<&WatchMatcher> = by_id.into_iter().chain(by_path).flatten().collect();
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

/// The naive baseline for benchmarks and cross-checks: every watch in the
/// registry tried against every ref change. Same result as `Index::matches`
/// (up to order), at a cost that grows with the registry.
pub fn matches_by_scan(index: &Index, push: &GitPushEvent) -> Vec<Match> {
    if !matches!(
        RepositoryKind::try_from(push.repository_kind),
        Ok(RepositoryKind::Project | RepositoryKind::Unspecified)
    ) {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut seen: HashSet<(&str, usize)> = HashSet::new();
    for (i, change) in push.changes.iter().enumerate() {
        let kind = RefKind::try_from(change.ref_kind).unwrap_or(RefKind::Unspecified);
        for (project, w) in index.watches() {
            let same_project = match project {
                ProjectRef::Id(id) => id == push.project_id,
                ProjectRef::Path(path) => *path == push.project_path,
            };
            if same_project
                && w.matches_ref(&change.r#ref, kind)
                && w.matches_paths(known_paths(change))
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

enum ProjectRef<'a> {
    Id(i64),
    Path(&'a str),
}

fn retain_others<K, Q>(map: &mut HashMap<K, Vec<WatchMatcher>>, key: &Q, agent_id: &str)
where
    K: std::borrow::Borrow<Q> + std::hash::Hash + Eq,
    Q: std::hash::Hash + Eq + ?Sized,
{
    if let Some(ws) = map.get_mut(key) {
        ws.retain(|w| &*w.agent_id != agent_id);
        if ws.is_empty() {
            map.remove(key);
        }
    }
}

fn known_paths(change: &RefChange) -> Option<&[String]> {
    change
        .paths_known
        .then_some(change.changed_paths.as_slice())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::compile;
    use pushbus_shared::proto::{
        AgentConfig, RefSelector, RepositoryKind, Watch, WatchKind, ref_selector::Kind,
    };

    fn agent(id: &str, kind: Kind, pattern: &str, paths: &[&str]) -> AgentConfig {
        AgentConfig {
            agent_id: id.into(),
            watches: vec![Watch {
                project_id: 1,
                refs: Some(RefSelector {
                    kind: kind as i32,
                    pattern: pattern.into(),
                }),
                paths: paths.iter().map(|p| p.to_string()).collect(),
                kind: WatchKind::Gitops as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    fn push(r: &str, paths: Option<&[&str]>) -> GitPushEvent {
        GitPushEvent {
            project_id: 1,
            repository_kind: RepositoryKind::Project as i32,
            changes: vec![RefChange {
                r#ref: r.into(),
                ref_kind: if r.starts_with("refs/tags/") {
                    RefKind::Tag
                } else {
                    RefKind::Branch
                } as i32,
                changed_paths: paths
                    .unwrap_or_default()
                    .iter()
                    .map(|p| p.to_string())
                    .collect(),
                paths_known: paths.is_some(),
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    #[test]
    fn selector_and_path_table() {
        type Case<'a> = (
            Kind,
            &'a str,
            &'a [&'a str],
            &'a str,
            Option<&'a [&'a str]>,
            bool,
        );
        let cases: &[Case] = &[
            (Kind::AnyBranch, "", &[], "refs/heads/main", None, true),
            (Kind::AnyBranch, "", &[], "refs/tags/v1", None, false),
            (Kind::Branch, "main", &[], "refs/heads/main", None, true),
            (Kind::Branch, "main", &[], "refs/heads/main2", None, false),
            (Kind::Branch, "fé/ünï", &[], "refs/heads/fé/ünï", None, true),
            (Kind::Tag, "v1", &[], "refs/tags/v1", None, true),
            (Kind::Tag, "v1", &[], "refs/heads/v1", None, false),
            (
                Kind::BranchGlob,
                "release/*",
                &[],
                "refs/heads/release/1.0",
                None,
                true,
            ),
            (
                Kind::BranchGlob,
                "release/*",
                &[],
                "refs/heads/release/a/b",
                None,
                false,
            ),
            (Kind::TagGlob, "v*", &[], "refs/tags/v2.0-rc.1", None, true),
            (Kind::TagGlob, "v*", &[], "refs/heads/v2", None, false),
            (Kind::AnyTag, "", &[], "refs/tags/x", None, true),
            // Odd but valid ref names.
            (Kind::Branch, "@", &[], "refs/heads/@", None, true),
            (Kind::Branch, "-x", &[], "refs/heads/-x", None, true),
            (
                Kind::TagGlob,
                "v*",
                &[],
                "refs/tags/v1.0+build.7",
                None,
                true,
            ),
            (
                Kind::BranchGlob,
                "日本/*",
                &[],
                "refs/heads/日本/ブランチ",
                None,
                true,
            ),
            (
                Kind::BranchGlob,
                "fix-?",
                &[],
                "refs/heads/fix-é",
                None,
                true,
            ),
            (
                Kind::BranchGlob,
                "fix-?",
                &[],
                "refs/heads/fix-ab",
                None,
                false,
            ),
            (
                Kind::Branch,
                "main",
                &[],
                "refs/heads/refs/heads/main",
                None,
                false,
            ),
            (
                Kind::AnyBranch,
                "",
                &["ünï/**"],
                "refs/heads/main",
                Some(&["ünï/çødé.yaml"]),
                true,
            ),
            (
                Kind::AnyRef,
                "",
                &[],
                "refs/merge-requests/1/head",
                None,
                true,
            ),
            (
                Kind::AnyBranch,
                "",
                &["deploy/**"],
                "refs/heads/main",
                Some(&["deploy/a/b.yaml"]),
                true,
            ),
            (
                Kind::AnyBranch,
                "",
                &["deploy/**"],
                "refs/heads/main",
                Some(&["src/main.rs"]),
                false,
            ),
            // Unknown paths never mean "no".
            (
                Kind::AnyBranch,
                "",
                &["deploy/**"],
                "refs/heads/main",
                None,
                true,
            ),
            (
                Kind::AnyBranch,
                "",
                &["clusters/prod/*.yaml"],
                "refs/heads/main",
                Some(&["clusters/prod/a/b.yaml"]),
                false,
            ),
        ];
        for (kind, pattern, paths, r, changed, want) in cases {
            let cfg = agent("a", *kind, pattern, paths);
            let mut index = Index::default();
            index.put("a", compile(&cfg).unwrap());
            let got = !index.matches(&push(r, *changed)).is_empty();
            assert_eq!(
                got, *want,
                "{kind:?} {pattern:?} {paths:?} vs {r} {changed:?}"
            );
        }
    }

    #[test]
    fn replacing_and_removing_agents() {
        let mut index = Index::default();
        index.put(
            "a",
            compile(&agent("a", Kind::Branch, "main", &[])).unwrap(),
        );
        index.put("b", compile(&agent("b", Kind::AnyBranch, "", &[])).unwrap());
        assert_eq!(index.matches(&push("refs/heads/main", None)).len(), 2);
        index.put("a", compile(&agent("a", Kind::Branch, "dev", &[])).unwrap());
        assert_eq!(index.matches(&push("refs/heads/main", None)).len(), 1);
        index.remove("b");
        assert!(index.matches(&push("refs/heads/main", None)).is_empty());
        assert_eq!(index.agent_count(), 1);
        // Snippet and wiki pushes carry other IDs than projects' and never match.
        let mut snippet = push("refs/heads/dev", None);
        snippet.repository_kind = RepositoryKind::Snippet as i32;
        assert!(index.matches(&snippet).is_empty());
    }

    #[test]
    fn invalid_configs_are_refused() {
        assert!(compile(&agent("a.b", Kind::AnyBranch, "", &[])).is_err());
        assert!(compile(&agent("a", Kind::Unspecified, "", &[])).is_err());
        assert!(compile(&agent("a", Kind::Branch, "", &[])).is_err());
        assert!(compile(&agent("a", Kind::BranchGlob, "a[", &[])).is_err());
        assert!(compile(&agent("a", Kind::AnyBranch, "", &["a{"])).is_err());
        assert!(
            compile(&AgentConfig {
                agent_id: "a".into(),
                ..Default::default()
            })
            .is_err()
        );
    }
}
