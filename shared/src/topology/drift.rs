//! What differs between the wanted and the actual configuration.

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{kv, stream};

use super::Drift;

/// 0 and negative both mean "no limit" (the server reports -1).
fn limit(v: i64) -> i64 {
    if v <= 0 { -1 } else { v }
}

pub(super) fn replicas(n: usize) -> usize {
    n.max(1)
}

/// The fields whose check says they differ, as a drift of `object` (None when
/// none do).
fn drift(object: impl FnOnce() -> String, checks: &[(&'static str, bool)]) -> Option<Drift> {
    let fields: Vec<_> = checks
        .iter()
        .filter(|(_, differs)| *differs)
        .map(|(f, _)| *f)
        .collect();
    (!fields.is_empty()).then(|| Drift {
        object: object(),
        fields,
    })
}

pub(super) fn stream_drift(want: &stream::Config, have: &stream::Config) -> Option<Drift> {
    let mut subjects_want = want.subjects.clone();
    let mut subjects_have = have.subjects.clone();
    subjects_want.sort();
    subjects_have.sort();
    drift(
        || format!("stream {}", want.name),
        &[
            ("subjects", subjects_want != subjects_have),
            ("retention", want.retention != have.retention),
            ("storage", want.storage != have.storage),
            ("discard", want.discard != have.discard),
            ("max_age", want.max_age != have.max_age),
            ("max_bytes", limit(want.max_bytes) != limit(have.max_bytes)),
            (
                "max_msg_size",
                limit(want.max_message_size.into()) != limit(have.max_message_size.into()),
            ),
            (
                "num_replicas",
                replicas(want.num_replicas) != replicas(have.num_replicas),
            ),
            (
                "duplicate_window",
                !want.duplicate_window.is_zero() && want.duplicate_window != have.duplicate_window,
            ),
        ],
    )
}

pub(super) fn bucket_drift(want: &kv::Config, have: &stream::Config) -> Option<Drift> {
    drift(
        || format!("bucket {}", want.bucket),
        &[
            (
                "history",
                want.history.max(1) != have.max_messages_per_subject,
            ),
            ("max_age", want.max_age != have.max_age),
            (
                "num_replicas",
                replicas(want.num_replicas) != replicas(have.num_replicas),
            ),
            ("storage", want.storage != have.storage),
            ("max_bytes", limit(want.max_bytes) != limit(have.max_bytes)),
            (
                "limit_markers",
                want.limit_markers.is_some() && !have.allow_message_ttl,
            ),
        ],
    )
}

pub(super) fn consumer_drift(
    stream_name: &str,
    want: &pull::Config,
    have: &jetstream::consumer::Config,
) -> Option<Drift> {
    drift(
        || {
            format!(
                "consumer {stream_name}/{}",
                want.durable_name.as_deref().unwrap_or_default()
            )
        },
        &[
            ("ack_wait", want.ack_wait != have.ack_wait),
            (
                "max_deliver",
                limit(want.max_deliver) != limit(have.max_deliver),
            ),
            (
                "max_ack_pending",
                limit(want.max_ack_pending) != limit(have.max_ack_pending),
            ),
            ("filter_subject", want.filter_subject != have.filter_subject),
            // Pinned by an older pushbus or by hand: it will not follow its stream.
            (
                "num_replicas",
                want.num_replicas == 0 && have.num_replicas != 0,
            ),
        ],
    )
}
