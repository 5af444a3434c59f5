//! Ref and path globs, small enough to keep a million of them in memory.
//!
//! A compiled `globset` matcher holds a regex (kilobytes each; 100,000
//! agents × 10 watches would need gigabytes). Almost every glob in an agent
//! config uses only `*`, `?` and `**`, which match segment by segment over
//! the pattern text itself. Globs with classes, alternations or escapes fall
//! back to globset. Both follow the same rules: `*` and `?` stay within one
//! `/`-separated segment, a `**` segment spans any number of them (at least
//! one when it ends the pattern).
//!
//! Patterns come from whoever can register an agent, and are matched under
//! the index lock, so matching must never backtrack exponentially: both
//! levels (segments, and characters within a segment) use the greedy
//! single-backtrack-point algorithm, O(pattern × path) in the worst case.

use std::sync::Arc;

use globset::{GlobBuilder, GlobMatcher};

#[derive(Debug, Clone)]
pub enum Glob {
    /// Only `*`, `?`, `**` and literal text: matched over the pattern text,
    /// with repeated `**` segments collapsed into one.
    Simple(Box<str>),
    Complex(Arc<GlobMatcher>),
}

impl Glob {
    /// Parses `pattern` with globset's syntax (so errors read the same as
    /// everywhere else) and keeps the cheapest form that matches the same.
    /// Callers bound the pattern's size first (see `agent`). The error is
    /// globset's own: it already names the pattern and the fault, so there
    /// is nothing to add here and callers wrap it with their context.
    pub fn new(pattern: &str) -> Result<Glob, globset::Error> {
        let glob = GlobBuilder::new(pattern).literal_separator(true).build()?;
        // Odd slashes are rare too; globset's reading of them is the rule.
        let odd_slashes =
            pattern.starts_with('/') || pattern.ends_with('/') || pattern.contains("//");
        if odd_slashes || pattern.contains(['[', ']', '{', '}', '\\']) {
            Ok(Glob::Complex(Arc::new(glob.compile_matcher())))
        } else {
            Ok(Glob::Simple(collapse_stars(pattern).into()))
        }
    }

    pub fn is_match(&self, path: &str) -> bool {
        self.is_match_counted(path, &mut 0)
    }

    /// Matches and adds the matcher's inner-loop iterations to `steps`, so
    /// tests can bound the work without timing anything.
    fn is_match_counted(&self, path: &str, steps: &mut u64) -> bool {
        match self {
            Glob::Simple(pattern) => segments_match(pattern, path, steps),
            Glob::Complex(m) => m.is_match(path),
        }
    }
}

/// `a/**/**/b` means `a/**/b`, and `a/**/**` means `a/**` (zero or more,
/// then at least one, is at least one).
fn collapse_stars(pattern: &str) -> String {
    let mut segs: Vec<&str> = Vec::new();
    for seg in pattern.split('/') {
        if seg == "**" && segs.last() == Some(&"**") {
            continue;
        }
        segs.push(seg);
    }
    segs.join("/")
}

/// One element of a simple pattern at the segment level.
#[derive(Clone, Copy)]
enum Elem<'a> {
    /// A `**` segment: zero or more path segments.
    Star,
    /// Exactly one path segment, any content (the first half of a trailing
    /// `**`, which needs at least one).
    Any,
    /// Exactly one path segment matching this `*`/`?` pattern.
    Seg(&'a str),
}

/// A simple pattern as a sequence of elements addressed by position: the
/// byte offset of a segment in `body`, then two virtual positions standing
/// for a trailing `**` (rewritten as `Any` then `Star`).
struct Elems<'a> {
    body: &'a str,
    has_body: bool,
    trailing_star: bool,
}

impl<'a> Elems<'a> {
    fn new(pattern: &'a str) -> Self {
        if pattern == "**" {
            Elems {
                body: "",
                has_body: false,
                trailing_star: true,
            }
        } else if let Some(body) = pattern.strip_suffix("/**") {
            Elems {
                body,
                has_body: true,
                trailing_star: true,
            }
        } else {
            Elems {
                body: pattern,
                has_body: true,
                trailing_star: false,
            }
        }
    }

    fn start(&self) -> usize {
        if self.has_body {
            0
        } else {
            self.body.len() + 1
        }
    }

    /// The element at `pos` and the position after it; `None` at the end.
    fn at(&self, pos: usize) -> Option<(Elem<'a>, usize)> {
        let n = self.body.len();
        if self.has_body && pos <= n {
            let (seg, next) = segment_at(self.body, pos);
            let elem = if seg == "**" {
                Elem::Star
            } else {
                Elem::Seg(seg)
            };
            return Some((elem, next));
        }
        match (self.trailing_star, pos - n) {
            (true, 1) => Some((Elem::Any, pos + 1)),
            (true, 2) => Some((Elem::Star, pos + 1)),
            _ => None,
        }
    }
}

/// The `/`-separated segment of `s` starting at byte `pos`, and where the
/// next one starts (`s.len() + 1` after the last).
fn segment_at(s: &str, pos: usize) -> (&str, usize) {
    let rest = &s[pos..];
    match rest.find('/') {
        Some(i) => (&rest[..i], pos + i + 1),
        None => (rest, s.len() + 1),
    }
}

/// Greedy matching over segments with one backtrack point, the last `**`
/// seen: when a later element fails, that `**` absorbs one more segment and
/// matching resumes after it. Every element but `**` takes exactly one
/// segment, so the earliest placement after a `**` is never worse than a
/// later one, and older `**`s never need revisiting.
fn segments_match(pattern: &str, path: &str, steps: &mut u64) -> bool {
    let elems = Elems::new(pattern);
    let end = path.len() + 1;
    let mut pi = elems.start();
    let mut si = 0;
    // (pattern position after the `**`, path position it absorbs up to)
    let mut star: Option<(usize, usize)> = None;
    while si < end {
        *steps += 1;
        let (head, next_si) = segment_at(path, si);
        match elems.at(pi) {
            Some((Elem::Star, next_pi)) => {
                star = Some((next_pi, si));
                pi = next_pi;
                continue;
            }
            Some((Elem::Any, next_pi)) => {
                (pi, si) = (next_pi, next_si);
                continue;
            }
            Some((Elem::Seg(seg), next_pi))
                if wildcard_match(seg.as_bytes(), head.as_bytes(), steps) =>
            {
                (pi, si) = (next_pi, next_si);
                continue;
            }
            _ => {}
        }
        let Some((after_star, absorbed)) = star else {
            return false;
        };
        let absorbed = segment_at(path, absorbed).1;
        star = Some((after_star, absorbed));
        (pi, si) = (after_star, absorbed);
    }
    // Path consumed: what is left of the pattern must be able to take nothing.
    loop {
        *steps += 1;
        match elems.at(pi) {
            None => return true,
            Some((Elem::Star, next_pi)) => pi = next_pi,
            Some(_) => return false,
        }
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
/// backtracking to the last `*` only, O(pattern × segment) at worst.
fn wildcard_match(p: &[u8], s: &[u8], steps: &mut u64) -> bool {
    let (mut pi, mut si) = (0, 0);
    let mut star: Option<(usize, usize)> = None;
    while si < s.len() {
        *steps += 1;
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
    use proptest::prelude::*;

    fn globset(pattern: &str) -> GlobMatcher {
        GlobBuilder::new(pattern)
            .literal_separator(true)
            .build()
            .unwrap()
            .compile_matcher()
    }

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
            "**/**",
            "a/**/**",
            "**/**/b",
            "a/**/**/b/**/**",
            "**/*/**",
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
            "a/b/b",
            "/b",
        ];
        for pattern in patterns {
            let ours = Glob::new(pattern).unwrap();
            let plain = !pattern.starts_with('/') && !pattern.ends_with('/');
            if plain && !pattern.contains("//") {
                assert!(matches!(ours, Glob::Simple(_)), "{pattern}");
            }
            let theirs = globset(pattern);
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
    fn repeated_double_stars_collapse() {
        for (pattern, stored) in [
            ("**/**", "**"),
            ("a/**/**/**/b", "a/**/b"),
            ("a/**/**", "a/**"),
            ("**/a/**/**/b/**", "**/a/**/b/**"),
            ("a**/**b", "a**/**b"),
        ] {
            match Glob::new(pattern).unwrap() {
                Glob::Simple(s) => assert_eq!(&*s, stored, "{pattern}"),
                Glob::Complex(_) => panic!("{pattern} is simple"),
            }
        }
    }

    /// Sixteen `**/` against twenty segments took minutes when `**` was
    /// tried recursively. The work is bounded by (pattern + 1) × (path + 1)
    /// inner steps, counted rather than timed so the test cannot flake.
    #[test]
    fn pathological_patterns_take_bounded_work() {
        let cases = [
            // Never collapsed away: a real segment between every `**`.
            (format!("{}x", "**/a/".repeat(16)), vec!["a"; 20].join("/")),
            (format!("{}x", "**/".repeat(16)), vec!["a"; 20].join("/")),
            (format!("{}b", "*a".repeat(30)), "a".repeat(200)),
            (
                "**/*a*a*a*a*a*a*a*a*b/**".to_owned(),
                vec!["a".repeat(40); 60].join("/"),
            ),
        ];
        for (pattern, path) in cases {
            let ours = Glob::new(&pattern).unwrap();
            assert!(matches!(ours, Glob::Simple(_)), "{pattern}");
            let mut steps = 0;
            let got = ours.is_match_counted(&path, &mut steps);
            assert_eq!(got, globset(&pattern).is_match(&path), "{pattern:?}");
            let bound = (pattern.len() as u64 + 1) * (path.len() as u64 + 1);
            assert!(steps <= bound, "{pattern:?}: {steps} steps > {bound}");
        }
        // Matching ones too, not only failures.
        let pattern = format!("{}a", "**/".repeat(16));
        let path = vec!["a"; 20].join("/");
        let mut steps = 0;
        assert!(
            Glob::new(&pattern)
                .unwrap()
                .is_match_counted(&path, &mut steps)
        );
        assert!(steps <= (pattern.len() as u64 + 1) * (path.len() as u64 + 1));
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

    /// A pattern segment over `alphabet` (literals and wildcards), or `**`.
    fn pattern_segment(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
        prop_oneof![
            1 => Just("**".to_owned()),
            4 => proptest::collection::vec(proptest::sample::select(alphabet), 1..4)
                .prop_map(|parts| parts.concat()),
        ]
    }

    /// A pattern of one to six segments.
    fn pattern(alphabet: &'static [&'static str]) -> impl Strategy<Value = String> {
        proptest::collection::vec(pattern_segment(alphabet), 1..7).prop_map(|s| s.join("/"))
    }

    /// Paths of one to seven segments, some empty (`a//b`, `a/`).
    fn paths(alphabet: &'static [&'static str]) -> impl Strategy<Value = Vec<String>> {
        let segment = proptest::collection::vec(proptest::sample::select(alphabet), 0..4)
            .prop_map(|parts| parts.concat());
        proptest::collection::vec(
            proptest::collection::vec(segment, 1..8).prop_map(|s| s.join("/")),
            1..8,
        )
    }

    fn agree(pattern: &str, paths: &[String]) -> Result<(), TestCaseError> {
        let ours = Glob::new(pattern).unwrap();
        prop_assert!(matches!(ours, Glob::Simple(_)), "{}", pattern);
        let theirs = globset(pattern);
        for path in paths {
            prop_assert_eq!(
                ours.is_match(path),
                theirs.is_match(path),
                "{:?} vs {:?}",
                pattern,
                path
            );
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(1000))]

        #[test]
        fn simple_matcher_agrees_with_globset(
            pattern in pattern(&["a", "b", "*", "?"]),
            paths in paths(&["a", "b"]),
        ) {
            agree(&pattern, &paths)?;
        }

        /// Multi-byte text, without `?`: globset's `?` is one byte (it
        /// matches bytes), ours one character, on purpose.
        #[test]
        fn simple_matcher_agrees_with_globset_on_utf8(
            pattern in pattern(&["a", "é", "*"]),
            paths in paths(&["a", "é", "\u{1F600}"]),
        ) {
            agree(&pattern, &paths)?;
        }
    }
}
