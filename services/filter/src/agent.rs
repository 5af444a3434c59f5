//! Agent configurations: validation and compilation into matchers.

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher, GlobSet, GlobSetBuilder};
use pushbus_shared::names;
use pushbus_shared::proto::{
    AgentConfig, RefKind, RefSelector, Watch, WatchKind, ref_selector::Kind,
};

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum AgentConfigError {
    #[error("agent_id {0:?} must match [A-Za-z0-9_-]{{1,128}}")]
    AgentId(String),
    #[error("agent has no watches")]
    NoWatches,
    #[error("watches[{0}]: needs exactly one of project_id (> 0) or project_path")]
    Project(usize),
    #[error("watches[{0}].refs: a selector kind is required")]
    SelectorKind(usize),
    #[error("watches[{0}].refs.pattern: {1}")]
    Pattern(usize, String),
    #[error("watches[{0}].kind: unknown watch kind {1}")]
    WatchKind(usize, i32),
    #[error("watches[{0}].paths[{1}]: {2}")]
    PathGlob(usize, usize, String),
}

/// A watch ready to match: globs compiled once.
#[derive(Debug, Clone)]
pub struct CompiledWatch {
    pub agent_id: Arc<str>,
    pub project: ProjectKey,
    refs: RefMatcher,
    /// None: any path.
    paths: Option<GlobSet>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProjectKey {
    Id(i64),
    Path(String),
}

#[derive(Debug, Clone)]
enum RefMatcher {
    AnyBranch,
    AnyTag,
    AnyRef,
    Branch(String),
    Tag(String),
    BranchGlob(GlobMatcher),
    TagGlob(GlobMatcher),
}

/// Validates `cfg` and compiles its watches.
pub fn compile(cfg: &AgentConfig) -> Result<Vec<CompiledWatch>, AgentConfigError> {
    if !names::is_valid_token(&cfg.agent_id) {
        return Err(AgentConfigError::AgentId(cfg.agent_id.clone()));
    }
    if cfg.watches.is_empty() {
        return Err(AgentConfigError::NoWatches);
    }
    let agent_id: Arc<str> = cfg.agent_id.as_str().into();
    cfg.watches
        .iter()
        .enumerate()
        .map(|(i, w)| compile_watch(i, &agent_id, w))
        .collect()
}

fn compile_watch(
    i: usize,
    agent_id: &Arc<str>,
    w: &Watch,
) -> Result<CompiledWatch, AgentConfigError> {
    let project = match (w.project_id, w.project_path.trim()) {
        (id, "") if id > 0 => ProjectKey::Id(id),
        (0, path) if !path.is_empty() => ProjectKey::Path(path.to_owned()),
        _ => return Err(AgentConfigError::Project(i)),
    };
    let kind = WatchKind::try_from(w.kind).map_err(|_| AgentConfigError::WatchKind(i, w.kind))?;
    let refs = compile_refs(i, w.refs.as_ref())?;
    let mut paths = w.paths.clone();
    if paths.is_empty() && kind == WatchKind::Configuration {
        paths.push(format!(".gitlab/agents/{agent_id}/config.yaml"));
    }
    let paths = if paths.is_empty() {
        None
    } else {
        let mut set = GlobSetBuilder::new();
        for (j, p) in paths.iter().enumerate() {
            set.add(glob(p).map_err(|e| AgentConfigError::PathGlob(i, j, e))?);
        }
        Some(
            set.build()
                .map_err(|e| AgentConfigError::PathGlob(i, 0, e.to_string()))?,
        )
    };
    Ok(CompiledWatch {
        agent_id: agent_id.clone(),
        project,
        refs,
        paths,
    })
}

fn compile_refs(i: usize, sel: Option<&RefSelector>) -> Result<RefMatcher, AgentConfigError> {
    let sel = sel.ok_or(AgentConfigError::SelectorKind(i))?;
    let kind = Kind::try_from(sel.kind).unwrap_or(Kind::Unspecified);
    let pattern = sel.pattern.as_str();
    let need_pattern = || {
        if pattern.is_empty() {
            Err(AgentConfigError::Pattern(i, "must not be empty".into()))
        } else {
            Ok(pattern.to_owned())
        }
    };
    let compiled = |p: String| {
        glob(&p)
            .map(|g| g.compile_matcher())
            .map_err(|e| AgentConfigError::Pattern(i, e))
    };
    Ok(match kind {
        Kind::Unspecified => return Err(AgentConfigError::SelectorKind(i)),
        Kind::AnyBranch => RefMatcher::AnyBranch,
        Kind::AnyTag => RefMatcher::AnyTag,
        Kind::AnyRef => RefMatcher::AnyRef,
        Kind::Branch => RefMatcher::Branch(need_pattern()?),
        Kind::Tag => RefMatcher::Tag(need_pattern()?),
        Kind::BranchGlob => RefMatcher::BranchGlob(compiled(need_pattern()?)?),
        Kind::TagGlob => RefMatcher::TagGlob(compiled(need_pattern()?)?),
    })
}

/// `*` stays within one path segment; `**` crosses segments.
fn glob(pattern: &str) -> Result<globset::Glob, String> {
    GlobBuilder::new(pattern)
        .literal_separator(true)
        .build()
        .map_err(|e| e.to_string())
}

impl CompiledWatch {
    pub fn matches_ref(&self, full_ref: &str, kind: RefKind) -> bool {
        let branch = full_ref.strip_prefix("refs/heads/");
        let tag = full_ref.strip_prefix("refs/tags/");
        match &self.refs {
            RefMatcher::AnyRef => true,
            RefMatcher::AnyBranch => kind == RefKind::Branch || branch.is_some(),
            RefMatcher::AnyTag => kind == RefKind::Tag || tag.is_some(),
            RefMatcher::Branch(name) => branch == Some(name.as_str()),
            RefMatcher::Tag(name) => tag == Some(name.as_str()),
            RefMatcher::BranchGlob(g) => branch.is_some_and(|b| g.is_match(b)),
            RefMatcher::TagGlob(g) => tag.is_some_and(|t| g.is_match(t)),
        }
    }

    /// `None` paths mean "unknown": a path-filtered watch must then match,
    /// because unknown never means "no".
    pub fn matches_paths(&self, changed: Option<&[String]>) -> bool {
        match (&self.paths, changed) {
            (None, _) | (Some(_), None) => true,
            (Some(set), Some(paths)) => paths.iter().any(|p| set.is_match(p)),
        }
    }
}
