//! Agent configurations: validation and compilation into matchers.

use std::sync::Arc;

use crate::glob::Glob;
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
    Pattern(usize, #[source] PatternError),
    #[error("watches[{0}].kind: unknown watch kind {1}")]
    WatchKind(usize, i32),
    #[error("watches[{0}].paths[{1}]: {2}")]
    PathGlob(usize, usize, #[source] PatternError),
    // Never echo the value: it may be a secret pasted into the wrong field.
    #[error("token_sha256: must be the hex SHA-256 of the token (64 hex characters)")]
    TokenSha256,
    #[error(
        "token_sha256: \"<redacted>\" is what reads show in its place; give the token or its SHA-256"
    )]
    TokenPlaceholder,
    #[error("public: a public agent has no token_sha256")]
    PublicWithToken,
    #[error("webhook.{0}: \"<set>\" is what reads show in its place; give the secret itself")]
    SecretPlaceholder(&'static str),
}

/// Why a ref name or glob is refused. The enclosing `AgentConfigError`
/// quotes it (which field), so a one-line chain (`error::one_line`) prints
/// it once.
#[derive(Debug, Clone, thiserror::Error, PartialEq, Eq)]
pub enum PatternError {
    #[error("must not be empty")]
    Empty,
    #[error("{0} bytes long; at most {MAX_PATTERN_BYTES} are allowed")]
    TooLong(usize),
    #[error("glob has {0} segments; at most {MAX_PATTERN_SEGMENTS} are allowed")]
    TooManySegments(usize),
    // globset's text names the pattern and the fault; shown as is.
    #[error("{0}")]
    Syntax(#[source] globset::Error),
}

/// Longest ref name or glob accepted, in bytes. Globs are matched for every
/// push under the index lock: their size bounds the work (matching is
/// O(pattern × path)) and the memory a registration can claim.
pub const MAX_PATTERN_BYTES: usize = 1024;
/// Most `/`-separated segments in a glob; real ones have a handful.
pub const MAX_PATTERN_SEGMENTS: usize = 64;

/// Checks the size limits, then compiles.
fn glob(pattern: &str) -> Result<Glob, PatternError> {
    check_length(pattern)?;
    let segments = pattern.split('/').count();
    if segments > MAX_PATTERN_SEGMENTS {
        return Err(PatternError::TooManySegments(segments));
    }
    Glob::new(pattern).map_err(PatternError::Syntax)
}

fn check_length(pattern: &str) -> Result<(), PatternError> {
    if pattern.len() > MAX_PATTERN_BYTES {
        return Err(PatternError::TooLong(pattern.len()));
    }
    Ok(())
}

/// A watch ready to match: globs compiled once.
#[derive(Debug, Clone)]
pub struct CompiledWatch {
    pub project: ProjectKey,
    pub matcher: WatchMatcher,
}

/// What the index keeps per watch (the project is the index's key). Small
/// on purpose: a registry of 100,000 agents holds a million of them.
#[derive(Debug, Clone)]
pub struct WatchMatcher {
    pub agent_id: Arc<str>,
    refs: RefMatcher,
    /// None: any path.
    paths: Option<Box<[Glob]>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub enum ProjectKey {
    Id(i64),
    Path(Box<str>),
}

#[derive(Debug, Clone)]
enum RefMatcher {
    AnyBranch,
    AnyTag,
    AnyRef,
    Branch(Arc<str>),
    Tag(Arc<str>),
    BranchGlob(Glob),
    TagGlob(Glob),
}

/// Validates `cfg` and compiles its watches.
pub fn compile(cfg: &AgentConfig) -> Result<Vec<CompiledWatch>, AgentConfigError> {
    if !names::is_valid_token(&cfg.agent_id) {
        return Err(AgentConfigError::AgentId(cfg.agent_id.clone()));
    }
    if cfg.watches.is_empty() {
        return Err(AgentConfigError::NoWatches);
    }
    check_secrets(cfg)?;
    let agent_id: Arc<str> = cfg.agent_id.as_str().into();
    cfg.watches
        .iter()
        .enumerate()
        .map(|(i, w)| compile_watch(i, &agent_id, w))
        .collect()
}

/// A config read back (redacted) and written again must not store the
/// placeholders in place of the secrets.
fn check_secrets(cfg: &AgentConfig) -> Result<(), AgentConfigError> {
    let hash = cfg.token_sha256.as_str();
    if hash == crate::file::REDACTED {
        return Err(AgentConfigError::TokenPlaceholder);
    }
    if !hash.is_empty() && (hash.len() != 64 || !hash.bytes().all(|b| b.is_ascii_hexdigit())) {
        return Err(AgentConfigError::TokenSha256);
    }
    if cfg.public && !hash.is_empty() {
        return Err(AgentConfigError::PublicWithToken);
    }
    if let Some(w) = cfg.webhook.as_ref() {
        if w.secret_token == crate::file::SECRET_SET {
            return Err(AgentConfigError::SecretPlaceholder("secret_token"));
        }
        if w.hmac_secret == crate::file::SECRET_SET {
            return Err(AgentConfigError::SecretPlaceholder("hmac_secret"));
        }
    }
    Ok(())
}

fn compile_watch(
    i: usize,
    agent_id: &Arc<str>,
    w: &Watch,
) -> Result<CompiledWatch, AgentConfigError> {
    let project = match (w.project_id, w.project_path.trim()) {
        (id, "") if id > 0 => ProjectKey::Id(id),
        (0, path) if !path.is_empty() => ProjectKey::Path(path.into()),
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
        Some(
            paths
                .iter()
                .enumerate()
                .map(|(j, p)| glob(p).map_err(|e| AgentConfigError::PathGlob(i, j, e)))
                .collect::<Result<Box<[Glob]>, _>>()?,
        )
    };
    Ok(CompiledWatch {
        project,
        matcher: WatchMatcher {
            agent_id: agent_id.clone(),
            refs,
            paths,
        },
    })
}

fn compile_refs(i: usize, sel: Option<&RefSelector>) -> Result<RefMatcher, AgentConfigError> {
    let sel = sel.ok_or(AgentConfigError::SelectorKind(i))?;
    let kind = Kind::try_from(sel.kind).unwrap_or(Kind::Unspecified);
    let pattern = sel.pattern.as_str();
    let need_pattern = || {
        if pattern.is_empty() {
            Err(AgentConfigError::Pattern(i, PatternError::Empty))
        } else {
            check_length(pattern).map_err(|e| AgentConfigError::Pattern(i, e))?;
            Ok(pattern)
        }
    };
    let compiled = |p: &str| glob(p).map_err(|e| AgentConfigError::Pattern(i, e));
    Ok(match kind {
        Kind::Unspecified => return Err(AgentConfigError::SelectorKind(i)),
        Kind::AnyBranch => RefMatcher::AnyBranch,
        Kind::AnyTag => RefMatcher::AnyTag,
        Kind::AnyRef => RefMatcher::AnyRef,
        Kind::Branch => RefMatcher::Branch(need_pattern()?.into()),
        Kind::Tag => RefMatcher::Tag(need_pattern()?.into()),
        Kind::BranchGlob => RefMatcher::BranchGlob(compiled(need_pattern()?)?),
        Kind::TagGlob => RefMatcher::TagGlob(compiled(need_pattern()?)?),
    })
}

impl WatchMatcher {
    /// Shares exact branch and tag names with every other watch naming them
    /// ("main" a million times is one string).
    pub fn intern(&mut self, strings: &mut Interner) {
        if let RefMatcher::Branch(name) | RefMatcher::Tag(name) = &mut self.refs {
            *name = strings.get(name);
        }
    }

    pub fn matches_ref(&self, full_ref: &str, kind: RefKind) -> bool {
        let branch = full_ref.strip_prefix("refs/heads/");
        let tag = full_ref.strip_prefix("refs/tags/");
        match &self.refs {
            RefMatcher::AnyRef => true,
            RefMatcher::AnyBranch => kind == RefKind::Branch || branch.is_some(),
            RefMatcher::AnyTag => kind == RefKind::Tag || tag.is_some(),
            RefMatcher::Branch(name) => branch == Some(&**name),
            RefMatcher::Tag(name) => tag == Some(&**name),
            RefMatcher::BranchGlob(g) => branch.is_some_and(|b| g.is_match(b)),
            RefMatcher::TagGlob(g) => tag.is_some_and(|t| g.is_match(t)),
        }
    }

    /// `None` paths mean "unknown": a path-filtered watch must then match,
    /// because unknown never means "no".
    pub fn matches_paths(&self, changed: Option<&[String]>) -> bool {
        match (&self.paths, changed) {
            (None, _) | (Some(_), None) => true,
            (Some(globs), Some(paths)) => paths.iter().any(|p| globs.iter().any(|g| g.is_match(p))),
        }
    }
}

/// Interned strings, shared by every watch that names them.
#[derive(Debug, Default)]
pub struct Interner(std::collections::HashSet<Arc<str>>);

impl Interner {
    pub fn get(&mut self, s: &str) -> Arc<str> {
        if let Some(shared) = self.0.get(s) {
            return shared.clone();
        }
        let shared: Arc<str> = s.into();
        self.0.insert(shared.clone());
        shared
    }

    /// Forgets strings no watch uses any more.
    pub fn sweep(&mut self) {
        self.0.retain(|s| Arc::strong_count(s) > 1);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn with(kind: Kind, pattern: &str, paths: Vec<String>) -> AgentConfig {
        AgentConfig {
            agent_id: "a".into(),
            watches: vec![Watch {
                project_id: 1,
                refs: Some(RefSelector {
                    kind: kind as i32,
                    pattern: pattern.into(),
                }),
                paths,
                kind: WatchKind::Gitops as i32,
                ..Default::default()
            }],
            ..Default::default()
        }
    }

    /// A change to a valid config, and the start of the error it must cause.
    type Case = (fn(&mut AgentConfig), Option<&'static str>);

    #[test]
    fn secrets_are_checked_and_placeholders_refused() {
        let ok = with(Kind::AnyBranch, "", vec![]);
        let cases: [Case; 8] = [
            (|_| {}, None),
            (|c| c.token_sha256 = "aB".repeat(32), None),
            (|c| c.public = true, None),
            (
                |c| c.token_sha256 = "<redacted>".into(),
                Some("token_sha256: \"<redacted>\""),
            ),
            (
                |c| c.token_sha256 = "s3cret".into(),
                Some("token_sha256: must be"),
            ),
            (
                |c| {
                    c.public = true;
                    c.token_sha256 = "0".repeat(64);
                },
                Some("public: "),
            ),
            (
                |c| {
                    c.webhook = Some(pushbus_shared::proto::Webhook {
                        url: "https://x.example/h".into(),
                        secret_token: "<set>".into(),
                        ..Default::default()
                    })
                },
                Some("webhook.secret_token: \"<set>\""),
            ),
            (
                |c| {
                    c.webhook = Some(pushbus_shared::proto::Webhook {
                        url: "https://x.example/h".into(),
                        hmac_secret: "<set>".into(),
                        ..Default::default()
                    })
                },
                Some("webhook.hmac_secret: \"<set>\""),
            ),
        ];
        for (change, want) in cases {
            let mut cfg = ok.clone();
            change(&mut cfg);
            match (compile(&cfg), want) {
                (Ok(_), None) => {}
                (Err(e), Some(want)) => {
                    assert!(e.to_string().starts_with(want), "{e}");
                    assert!(!e.to_string().contains("s3cret"), "{e}");
                }
                (got, want) => panic!("{cfg:?}: {got:?}, want {want:?}"),
            }
        }
    }

    #[test]
    fn pattern_errors_keep_their_cause() {
        let err = compile(&with(Kind::AnyBranch, "", vec!["a[".into()])).unwrap_err();
        let AgentConfigError::PathGlob(0, 0, PatternError::Syntax(cause)) = &err else {
            panic!("{err:?}");
        };
        assert_eq!(err.to_string(), format!("watches[0].paths[0]: {cause}"));
        // The chain reaches globset's own error, and one line shows it once.
        let innermost = std::error::Error::source(&err).and_then(|e| e.source());
        assert_eq!(
            innermost.and_then(|e| e.downcast_ref::<globset::Error>()),
            Some(cause)
        );
        assert_eq!(pushbus_shared::error::one_line(&err), err.to_string());

        let err = compile(&with(Kind::Branch, "", vec![])).unwrap_err();
        assert_eq!(err, AgentConfigError::Pattern(0, PatternError::Empty));
        assert_eq!(
            err.to_string(),
            "watches[0].refs.pattern: must not be empty"
        );
    }

    #[test]
    fn glob_size_is_capped_at_registration() {
        let at_limit = format!("{}b", "a/".repeat(MAX_PATTERN_SEGMENTS - 1));
        assert!(compile(&with(Kind::AnyBranch, "", vec![at_limit.clone()])).is_ok());
        assert!(compile(&with(Kind::BranchGlob, &at_limit, vec![])).is_ok());
        let too_many = format!("a/{at_limit}");
        let err = compile(&with(
            Kind::AnyBranch,
            "",
            vec!["x".into(), too_many.clone()],
        ))
        .unwrap_err();
        assert!(
            err.to_string()
                .starts_with("watches[0].paths[1]: glob has 65 segments; at most 64"),
            "{err}"
        );
        let err = compile(&with(Kind::TagGlob, &too_many, vec![])).unwrap_err();
        assert!(
            err.to_string()
                .starts_with("watches[0].refs.pattern: glob has 65"),
            "{err}"
        );
        let long = "x".repeat(MAX_PATTERN_BYTES + 1);
        for cfg in [
            with(Kind::AnyBranch, "", vec![long.clone()]),
            with(Kind::BranchGlob, &long, vec![]),
            with(Kind::Branch, &long, vec![]),
        ] {
            let err = compile(&cfg).unwrap_err();
            assert!(
                err.to_string().contains("1025 bytes long; at most 1024"),
                "{err}"
            );
        }
        let exact = "x".repeat(MAX_PATTERN_BYTES);
        assert!(compile(&with(Kind::Tag, &exact, vec![exact.clone()])).is_ok());
    }
}
