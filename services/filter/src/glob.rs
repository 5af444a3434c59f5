//! Ref and path globs, small enough to keep a million of them in memory.
//!
//! A compiled `globset` matcher holds a regex (kilobytes each; 100,000
//! agents × 10 watches would need gigabytes). Almost every glob in an agent
//! config uses only `*`, `?` and `**`, which match segment by segment over
//! the pattern text itself. Globs with classes, alternations or escapes fall
//! back to globset. Both follow the same rules: `*` and `?` stay within one
//! `/`-separated segment, a `**` segment spans any number of them (at least
//! one when it ends the pattern).

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, Clone)]
pub enum Glob {
    /// Only `*`, `?`, `**` and literal text: matched over the pattern text.
    Simple(Box<str>),
    Complex(Arc<GlobMatcher>),
}

impl Glob {
    /// Parses `pattern` with globset's syntax (so errors read the same as
    /// everywhere else) and keeps the cheapest form that matches the same.
    pub fn new(pattern: &str) -> Result<Glob, String> {
        let glob = GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .map_err(|e| e.to_string())?;
        // Odd slashes are rare too; globset's reading of them is the rule.
        let odd_slashes =
            pattern.starts_with('/') || pattern.ends_with('/') || pattern.contains("//");
        if odd_slashes || pattern.contains(['[', ']', '{', '}', '\\']) {
            Ok(Glob::Complex(Arc::new(glob.compile_matcher())))
        } else {
            Ok(Glob::Simple(pattern.into()))
        }
    }

    pub fn is_match(&self, path: &str) -> bool {
        match self {
            Glob::Simple(pattern) => segments_match(pattern, Some(path)),
            Glob::Complex(m) => m.is_match(path),
        }
    }
}

/// Splits off the first `/`-separated segment.
fn first(s: &str) -> (&str, Option<&str>) {
    match s.split_once('/') {
        Some((head, tail)) => (head, Some(tail)),
        None => (s, None),
    }
}

/// `path` is `None` once every segment is consumed.
fn segments_match(pattern: &str, path: Option<&str>) -> bool {
    let (seg, rest) = first(pattern);
    if seg == "**" {
        let Some(rest) = rest else {
            // A trailing `**` needs at least one more segment.
            return path.is_some();
        };
        // Zero segments, then one more at a time.
        let mut path = path;
        loop {
            if segments_match(rest, path) {
                return true;
            }
            match path {
                Some(p) => path = first(p).1,
                None => return false,
            }
        }
    }
    let Some(path) = path else { return false };
    let (head, tail) = first(path);
    if !wildcard_match(seg.as_bytes(), head.as_bytes()) {
        return false;
    }
    match rest {
        Some(rest) => segments_match(rest, tail),
        None => tail.is_none(),
    }
}

/// Length of the UTF-8 character starting with `b`: `?` and `*` consume
/// whole characters.
fn char_len(b: u8) -> usize {
    match b {
        0xF0.. => 4,
        0xE0.. => 3,
        0xC0.. => 2,
        _ => 1,
    }
}

/// `*` (any run) and `?` (one character) within one segment; greedy with
/// backtracking to the last `*`, so linear in practice.
fn wildcard_match(p: &[u8], s: &[u8]) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        match p.get(pi) {
            Some(b'*') => {
                star = Some((pi, si));
                pi += 1;
            }
            Some(b'?') => {
                pi += 1;
                si += char_len(s[si]);
            }
            Some(&c) if c == s[si] => {
                pi += 1;
                si += 1;
            }
            _ => match star {
                Some((sp, ss)) => {
                    let next = ss + char_len(s[ss]);
                    star = Some((sp, next));
                    pi = sp + 1;
                    si = next;
                }
                None => return false,
            },
        }
    }
    p[pi.min(p.len())..].iter().all(|&b| b == b'*')
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every simple pattern must agree with globset on every path.
    #[test]
    fn agrees_with_globset() {
        let patterns = [
            "deploy/**",
            "**/x.yaml",
            "**",
            "a/**/b",
            "a/**/b/**",
            "clusters/prod/*.yaml",
            "*.yaml",
            "*",
            "?",
            "a?c/*",
            "a**b",
            "release/*",
            "v*",
            "fé/*ï",
            ".gitlab/agents/a/config.yaml",
            "a/*/c",
            "*/**/*.y?ml",
            "a/",
            "**/",
            "x*y*z",
            "/a",
            "a//b",
        ];
        let paths = [
            "",
            "deploy",
            "deploy/a",
            "deploy/a/b.yaml",
            "x.yaml",
            "d/x.yaml",
            "d/e/x.yaml",
            "a/b",
            "a/x/b",
            "a/x/y/b",
            "a/b/c",
            "a/b/c/d",
            "clusters/prod/a.yaml",
            "clusters/prod/a/b.yaml",
            "a.yaml",
            "b",
            "abc/d",
            "abbc/d",
            "ab",
            "axxb",
            "a/b/xb",
            "release/1.0",
            "release/a/b",
            "v2.0-rc.1",
            "fé/üï",
            "fé/ï",
            "fé/a/ï",
            ".gitlab/agents/a/config.yaml",
            "a/",
            "a//c",
            "q/r/s.yml",
            "q/s.yaml",
            "xyz",
            "xaybzc",
            "xzy",
        ];
        for pattern in patterns {
            let ours = Glob::new(pattern).unwrap();
            let plain = !pattern.starts_with('/') && !pattern.ends_with('/');
            if plain && !pattern.contains("//") {
                assert!(matches!(ours, Glob::Simple(_)), "{pattern}");
            }
            let theirs = GlobBuilder::new(pattern)
                .literal_separator(true)
                .build()
                .unwrap()
                .compile_matcher();
            for path in paths {
                assert_eq!(
                    ours.is_match(path),
                    theirs.is_match(path),
                    "{pattern:?} vs {path:?}"
                );
            }
        }
    }

    #[test]
    fn classes_and_alternations_use_globset() {
        let g = Glob::new("deploy/{a,b}/[xy].yaml").unwrap();
        assert!(matches!(g, Glob::Complex(_)));
        assert!(g.is_match("deploy/b/x.yaml"));
        assert!(!g.is_match("deploy/c/x.yaml"));
        assert!(Glob::new("a[").is_err());
        assert!(Glob::new("a{").is_err());
    }
}
