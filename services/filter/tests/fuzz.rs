//! Bounded fuzzing of the agent file format (YAML and JSON, through to a
//! compiled config) and of glob matching: refused or accepted, never a panic.

use proptest::prelude::*;
use pushbus_filter::agent;
use pushbus_filter::file::AgentFile;
use pushbus_filter::glob::Glob;

fn refs() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("any_branch".to_owned()),
        Just("any_tag".to_owned()),
        "\\{(branch|tag|branch_glob|tag_glob|nope): \"[a-z*?/\\[\\]{},.!-]{0,20}\"\\}",
        ".{0,12}",
    ]
}

fn yaml_file() -> impl Strategy<Value = String> {
    (
        prop_oneof!["[a-z0-9_-]{1,12}", ".{0,12}"],
        proptest::collection::vec(
            (
                prop_oneof!["-?[0-9]{1,20}", ".{0,6}"],
                refs(),
                proptest::collection::vec("[a-z*?/\\[\\]{},.!\\\\-]{0,24}", 0..3),
            ),
            0..3,
        ),
        proptest::option::of(prop_oneof!["[a-z0-9]{1,12}", ".{0,8}"]),
        any::<bool>(),
    )
        .prop_map(|(id, watches, token, public)| {
            let mut y = format!("agent_id: {id:?}\n");
            if let Some(t) = token {
                y.push_str(&format!("token: {t:?}\n"));
            }
            if public {
                y.push_str("public: true\n");
            }
            y.push_str("watches:\n");
            for (project, refs, paths) in watches {
                y.push_str(&format!("  - project_id: {project}\n    refs: {refs}\n"));
                if !paths.is_empty() {
                    y.push_str(&format!("    paths: {paths:?}\n"));
                }
            }
            y
        })
}

fn check(file: AgentFile) {
    if let Ok(cfg) = file.into_config() {
        let _ = agent::compile(&cfg);
    }
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn agent_yaml_is_refused_or_compiles(text in yaml_file()) {
        if let Ok(file) = AgentFile::from_yaml(&text) {
            check(file);
        }
    }

    #[test]
    fn any_text_as_yaml_or_json_never_panics(text in ".{0,300}", bytes in proptest::collection::vec(any::<u8>(), 0..300)) {
        if let Ok(file) = AgentFile::from_yaml(&text) {
            check(file);
        }
        if let Ok(file) = AgentFile::from_json(&bytes) {
            check(file);
        }
        if let Ok(file) = AgentFile::from_json(text.as_bytes()) {
            check(file);
        }
    }

    #[test]
    fn any_glob_is_refused_or_matches_without_panicking(
        pattern in "[a-z*?/\\[\\]{},.!\\\\^-]{0,40}|.{0,20}",
        paths in proptest::collection::vec(".{0,40}|[a-z/.]{0,40}", 1..5),
    ) {
        if let Ok(glob) = Glob::new(&pattern) {
            for p in &paths {
                let _ = glob.is_match(p);
            }
        }
    }
}
