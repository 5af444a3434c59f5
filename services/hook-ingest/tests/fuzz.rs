//! Bounded fuzzing of what the ingest doors parse: any bytes, and
//! near-valid post_receive bodies, are refused with a status or accepted as a
//! valid push; nothing panics.

use proptest::prelude::*;
use pushbus_hook_ingest::{changes, http, terminal};
use pushbus_shared::proto::RefChange;

fn sha() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("0".repeat(40)),
        "[0-9a-f]{40}",
        "[0-9a-fA-F]{64}",
        "[0-9a-z]{0,70}",
    ]
}

fn ref_name() -> impl Strategy<Value = String> {
    prop_oneof![
        "refs/heads/[a-z/._-]{1,20}",
        "refs/tags/v[0-9.]{1,8}",
        "refs/[a-z]{0,5}",
        ".{0,40}",
    ]
}

fn body() -> impl Strategy<Value = serde_json::Value> {
    let change = (sha(), sha(), ref_name()).prop_map(|(a, b, r)| format!("{a} {b} {r}"));
    (
        prop_oneof![
            "(project|wiki|snippet|group|design|x)-[+-]?[0-9]{0,20}",
            ".{0,20}"
        ],
        prop_oneof!["(user|key|username)-[a-z0-9]{0,10}", ".{0,10}"],
        proptest::collection::vec(change, 0..5),
        proptest::collection::vec(".{0,20}", 0..3),
        proptest::option::of(prop_oneof!["[a-z/._-]{0,20}", ".{0,10}"]),
        proptest::collection::hash_map(
            ref_name(),
            proptest::collection::vec(".{0,12}", 0..4),
            0..3,
        ),
        proptest::option::of(prop_oneof!["[A-Za-z0-9_-]{1,10}", ".{0,10}"]),
    )
        .prop_map(|(repo, id, changes, options, branch, paths, geo)| {
            serde_json::json!({
                "gl_repository": repo,
                "identifier": id,
                "changes": changes.join("\n"),
                "push_options": options,
                "default_branch": branch,
                "pushbus_changed_paths": paths,
                "geo_node_id": geo,
            })
        })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(512))]

    #[test]
    fn any_bytes_are_refused_or_valid(bytes in proptest::collection::vec(any::<u8>(), 0..512)) {
        if let Err(e) = http::parse_post_receive(&bytes) {
            prop_assert!(e.status().is_client_error());
        }
    }

    #[test]
    fn near_valid_bodies_are_refused_with_4xx_or_accepted_valid(b in body()) {
        match http::parse_post_receive(b.to_string().as_bytes()) {
            Ok(push) => {
                prop_assert!(push.project_id > 0);
                prop_assert!(push.validate("gl_project_path").is_ok());
                prop_assert!(!push.changes.is_empty());
            }
            Err(e) => prop_assert!(e.status().is_client_error()),
        }
    }

    #[test]
    fn nesting_never_panics_and_deep_values_are_refused(depth in 0usize..5000, open in "[\\[{]") {
        let close = if open == "[" { "]" } else { "}" };
        let inner = if open == "[" { "1".to_owned() } else { String::new() };
        let value = format!("{}{inner}{}", open.repeat(depth), close.repeat(depth));
        let text = format!(r#"{{"x":{value},"gl_repository":"project-1","identifier":"user-1","changes":"{} {} refs/heads/m"}}"#, "1".repeat(40), "2".repeat(40));
        let result = http::parse_post_receive(text.as_bytes());
        if depth + 1 > http::MAX_JSON_DEPTH {
            prop_assert!(result.is_err());
        }
    }

    #[test]
    fn grpc_changes_are_refused_or_valid(
        raw in proptest::collection::vec((sha(), sha(), ref_name(), proptest::collection::vec(".{0,8}", 0..3)), 0..6)
    ) {
        let input: Vec<RefChange> = raw
            .into_iter()
            .map(|(old, new, r, paths)| RefChange {
                old_sha: old,
                new_sha: new,
                r#ref: r,
                paths_known: !paths.is_empty(),
                changed_paths: paths,
                ..Default::default()
            })
            .collect();
        if let Ok(valid) = changes::validate(input) {
            for c in &valid {
                prop_assert!(changes::check_ref_format(&c.r#ref).is_ok());
                prop_assert!(c.changed_paths.iter().all(|p| !p.is_empty() && !p.contains('\0')));
            }
        }
    }

    #[test]
    fn terminal_text_has_no_escape_or_control_left(text in proptest::collection::vec(any::<char>(), 0..200)) {
        let text: String = text.into_iter().collect();
        let clean = terminal::sanitize(&text);
        prop_assert!(!clean.chars().any(|c| c.is_control()), "{clean:?}");
    }
}
