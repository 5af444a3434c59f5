//! Validation of what git's post-receive hook reports: "<old> <new> <ref>"
//! lines, SHAs and ref names.

use pushbus_shared::proto::{ChangeKind, RefChange, RefKind, RepositoryKind};

/// A refusal naming the offending field.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {reason}")]
pub struct Invalid {
    pub field: String,
    pub reason: String,
}

impl Invalid {
    pub fn new(field: impl Into<String>, reason: impl Into<String>) -> Self {
        Self {
            field: field.into(),
            reason: reason.into(),
        }
    }
}

pub const MAX_REFS_PER_PUSH: usize = 50_000;

/// Parses the `changes` text of a post-receive call.
pub fn parse_changes(text: &str) -> Result<Vec<RefChange>, Invalid> {
    let lines: Vec<&str> = text.lines().filter(|l| !l.trim().is_empty()).collect();
    if lines.is_empty() {
        return Err(Invalid::new("changes", "no ref changes"));
    }
    lines
        .iter()
        .enumerate()
        .map(|(i, line)| {
            let mut parts = line.split(' ');
            match (parts.next(), parts.next(), parts.next(), parts.next()) {
                (Some(old), Some(new), Some(r), None) => Ok((old, new, r)),
                _ => Err(Invalid::new(
                    format!("changes[{i}]"),
                    "expected \"<old-sha> <new-sha> <ref>\"",
                )),
            }
        })
        .map(|parsed| parsed.map(|(o, n, r)| (o.to_owned(), n.to_owned(), r.to_owned())))
        .collect::<Result<Vec<_>, _>>()
        .and_then(|triples| {
            validate(
                triples
                    .into_iter()
                    .map(|(old_sha, new_sha, r)| RefChange {
                        old_sha,
                        new_sha,
                        r#ref: r,
                        ..Default::default()
                    })
                    .collect(),
            )
        })
}

/// Checks SHAs and refs, and fills in ref and change kinds.
pub fn validate(mut changes: Vec<RefChange>) -> Result<Vec<RefChange>, Invalid> {
    if changes.is_empty() {
        return Err(Invalid::new("changes", "no ref changes"));
    }
    if changes.len() > MAX_REFS_PER_PUSH {
        return Err(Invalid::new(
            "changes",
            format!(
                "{} refs exceed the limit of {MAX_REFS_PER_PUSH}",
                changes.len()
            ),
        ));
    }
    let hash_len = changes[0].old_sha.len();
    for (i, c) in changes.iter_mut().enumerate() {
        for (name, sha) in [("old_sha", &mut c.old_sha), ("new_sha", &mut c.new_sha)] {
            check_sha(sha).map_err(|r| Invalid::new(format!("changes[{i}].{name}"), r))?;
            if sha.len() != hash_len {
                return Err(Invalid::new(
                    format!("changes[{i}].{name}"),
                    "SHA-1 and SHA-256 object IDs mixed in one push",
                ));
            }
            sha.make_ascii_lowercase();
        }
        check_ref_format(&c.r#ref).map_err(|r| Invalid::new(format!("changes[{i}].ref"), r))?;
        let old_zero = is_zero(&c.old_sha);
        let new_zero = is_zero(&c.new_sha);
        c.change_kind = match (old_zero, new_zero) {
            (true, true) => {
                return Err(Invalid::new(
                    format!("changes[{i}]"),
                    "old and new SHA are both zero",
                ));
            }
            (true, false) => ChangeKind::Create,
            (false, true) => ChangeKind::Delete,
            (false, false) => ChangeKind::Update,
        } as i32;
        c.ref_kind = ref_kind(&c.r#ref) as i32;
        if c.paths_known || !c.changed_paths.is_empty() {
            check_paths(&c.changed_paths, || format!("changes[{i}].changed_paths"))?;
        }
    }
    Ok(changes)
}

pub const MAX_PATHS_PER_REF: usize = 10_000;

/// Attaches known changed paths (ref -> paths) to their ref changes.
pub fn attach_paths(
    changes: &mut [RefChange],
    mut paths: std::collections::HashMap<String, Vec<String>>,
) -> Result<(), Invalid> {
    for (i, c) in changes.iter_mut().enumerate() {
        let Some(list) = paths.remove(&c.r#ref) else {
            continue;
        };
        check_paths(&list, || format!("pushbus_changed_paths[{}]", c.r#ref))
            .map_err(|e| Invalid::new(e.field, format!("{} (changes[{i}])", e.reason)))?;
        c.changed_paths = list;
        c.paths_known = true;
    }
    match paths.keys().next() {
        Some(r) => Err(Invalid::new(
            format!("pushbus_changed_paths[{r}]"),
            "names a ref not in changes",
        )),
        None => Ok(()),
    }
}

/// The rules for changed paths, whichever door they came through.
fn check_paths(list: &[String], field: impl Fn() -> String) -> Result<(), Invalid> {
    if list.len() > MAX_PATHS_PER_REF {
        return Err(Invalid::new(
            field(),
            format!("more than {MAX_PATHS_PER_REF} paths"),
        ));
    }
    if let Some(bad) = list
        .iter()
        .find(|p| p.is_empty() || p.len() > 4096 || p.chars().any(char::is_control))
    {
        // Debug form: control characters are shown escaped, never raw.
        return Err(Invalid::new(
            field(),
            format!("invalid path {:?}", truncate(bad, 64)),
        ));
    }
    Ok(())
}

fn truncate(s: &str, max: usize) -> &str {
    match s.char_indices().nth(max) {
        Some((i, _)) => &s[..i],
        None => s,
    }
}

fn check_sha(sha: &str) -> Result<(), &'static str> {
    if sha.len() != 40 && sha.len() != 64 {
        return Err("must be 40 (SHA-1) or 64 (SHA-256) hex digits");
    }
    if !sha.bytes().all(|b| b.is_ascii_hexdigit()) {
        return Err("must be hexadecimal");
    }
    Ok(())
}

pub fn is_zero(sha: &str) -> bool {
    sha.bytes().all(|b| b == b'0')
}

pub fn ref_kind(r: &str) -> RefKind {
    if r.starts_with("refs/heads/") {
        RefKind::Branch
    } else if r.starts_with("refs/tags/") {
        RefKind::Tag
    } else {
        RefKind::Other
    }
}

/// `git check-ref-format` rules, for a fully qualified ref.
pub fn check_ref_format(r: &str) -> Result<(), &'static str> {
    if !r.starts_with("refs/") {
        return Err("must be fully qualified (refs/...)");
    }
    if r.len() > 1024 {
        return Err("longer than 1024 bytes");
    }
    if r.ends_with('/') || r.ends_with('.') {
        return Err("must not end with '/' or '.'");
    }
    if r.contains("..") || r.contains("//") || r.contains("@{") || r == "@" {
        return Err("must not contain '..', '//' or '@{'");
    }
    if r.chars()
        .any(|c| c.is_control() || matches!(c, ' ' | '~' | '^' | ':' | '?' | '*' | '[' | '\\'))
    {
        return Err("must not contain control characters, space, ~ ^ : ? * [ or \\");
    }
    for component in r.split('/') {
        if component.is_empty() {
            return Err("empty path component");
        }
        if component.starts_with('.') || component.ends_with(".lock") {
            return Err("a component must not start with '.' or end with '.lock'");
        }
    }
    if r.split('/').count() < 3 {
        return Err("must name a ref below refs/<namespace>/");
    }
    Ok(())
}

/// GitLab's `gl_repository` (also Gitaly's `GL_REPOSITORY`): `project-<id>`,
/// `wiki-<id>`, `snippet-<id>`, `group-<id>`, `design-<id>`.
pub fn parse_gl_repository(s: &str) -> Result<(RepositoryKind, i64), Invalid> {
    let bad = || {
        Invalid::new(
            "gl_repository",
            "expected project-<id>, wiki-<id>, snippet-<id>, group-<id> or design-<id>",
        )
    };
    let (kind, id) = s.split_once('-').ok_or_else(bad)?;
    let kind = match kind {
        "project" => RepositoryKind::Project,
        "wiki" => RepositoryKind::Wiki,
        "snippet" => RepositoryKind::Snippet,
        "group" => RepositoryKind::Group,
        "design" => RepositoryKind::Design,
        _ => return Err(bad()),
    };
    // Digits only: i64's parser also takes "+6161".
    if id.is_empty() || id.len() > 18 || !id.bytes().all(|b| b.is_ascii_digit()) {
        return Err(bad());
    }
    let id: i64 = id.parse().map_err(|_| bad())?;
    if id <= 0 {
        return Err(Invalid::new("gl_repository", "the ID must be positive"));
    }
    Ok((kind, id))
}

#[cfg(test)]
mod tests {
    use super::*;

    const A: &str = "1111111111111111111111111111111111111111";
    const B: &str = "2222222222222222222222222222222222222222";
    const Z: &str = "0000000000000000000000000000000000000000";

    #[test]
    fn parses_and_classifies() {
        let text =
            format!("{A} {B} refs/heads/main\n{Z} {B} refs/tags/v1.0\n{A} {Z} refs/heads/gone\n");
        let c = parse_changes(&text).unwrap();
        assert_eq!(c.len(), 3);
        assert_eq!(c[0].change_kind, ChangeKind::Update as i32);
        assert_eq!(c[0].ref_kind, RefKind::Branch as i32);
        assert_eq!(c[1].change_kind, ChangeKind::Create as i32);
        assert_eq!(c[1].ref_kind, RefKind::Tag as i32);
        assert_eq!(c[2].change_kind, ChangeKind::Delete as i32);
    }

    #[test]
    fn refuses_bad_input() {
        let sha256 = "a".repeat(64);
        let cases = [
            format!("{A} {B}"),
            format!("xyz {B} refs/heads/main"),
            format!("{A} {sha256} refs/heads/main"),
            format!("{A} {B} refs/heads/.."),
            format!("{A} {B} refs/heads/a..b"),
            format!("{A} {B} refs/heads/a\x01b"),
            format!("{A} {B} main"),
            format!("{A} {B} refs/heads/x.lock"),
            format!("{A} {B} refs/heads/a b"),
            format!("{Z} {Z} refs/heads/main"),
            String::new(),
        ];
        for text in cases {
            assert!(parse_changes(&text).is_err(), "accepted {text:?}");
        }
    }

    #[test]
    fn accepts_odd_but_valid_refs() {
        for r in [
            "refs/heads/feature/ünïcödé",
            "refs/heads/a-b_c+d",
            "refs/merge-requests/1/head",
            "refs/tags/v1.2.3-rc.1",
        ] {
            assert_eq!(check_ref_format(r), Ok(()), "{r}");
        }
    }
}
