//! What differs between the wanted and the actual configuration.

use super::*;

/// 0 and negative both mean "no limit" (the server reports -1).
fn limit(v: i64) -> i64 {
    if v <= 0 { -1 } else { v }
}

pub(super) fn replicas(n: usize) -> usize {
    n.max(1)
}

pub(super) fn stream_drift(want: &stream::Config, have: &stream::Config) -> Option<Drift> {
    let mut fields = Vec::new();
    let mut subjects_want = want.subjects.clone();
    let mut subjects_have = have.subjects.clone();
    subjects_want.sort();
    subjects_have.sort();
    if subjects_want != subjects_have {
        fields.push("subjects");
    }
    if want.retention != have.retention {
        fields.push("retention");
    }
    if want.storage != have.storage {
        fields.push("storage");
    }
    if want.discard != have.discard {
        fields.push("discard");
    }
    if want.max_age != have.max_age {
        fields.push("max_age");
    }
    if limit(want.max_bytes) != limit(have.max_bytes) {
        fields.push("max_bytes");
    }
    if limit(want.max_message_size.into()) != limit(have.max_message_size.into()) {
        fields.push("max_msg_size");
    }
    if replicas(want.num_replicas) != replicas(have.num_replicas) {
        fields.push("num_replicas");
    }
    if !want.duplicate_window.is_zero() && want.duplicate_window != have.duplicate_window {
        fields.push("duplicate_window");
    }
    (!fields.is_empty()).then(|| Drift {
        object: format!("stream {}", want.name),
        fields,
    })
}

pub(super) fn bucket_drift(want: &kv::Config, have: &stream::Config) -> Option<Drift> {
    let mut fields = Vec::new();
    if want.history.max(1) != have.max_messages_per_subject {
        fields.push("history");
    }
    if want.max_age != have.max_age {
        fields.push("max_age");
    }
    if replicas(want.num_replicas) != replicas(have.num_replicas) {
        fields.push("num_replicas");
    }
    if want.storage != have.storage {
        fields.push("storage");
    }
    if limit(want.max_bytes) != limit(have.max_bytes) {
        fields.push("max_bytes");
    }
    if want.limit_markers.is_some() && !have.allow_message_ttl {
        fields.push("limit_markers");
    }
    (!fields.is_empty()).then(|| Drift {
        object: format!("bucket {}", want.bucket),
        fields,
    })
}

pub(super) fn consumer_drift(
    stream_name: &str,
    want: &pull::Config,
    have: &jetstream::consumer::Config,
) -> Option<Drift> {
    let mut fields = Vec::new();
    if want.ack_wait != have.ack_wait {
        fields.push("ack_wait");
    }
    if limit(want.max_deliver) != limit(have.max_deliver) {
        fields.push("max_deliver");
    }
    if limit(want.max_ack_pending) != limit(have.max_ack_pending) {
        fields.push("max_ack_pending");
    }
    if want.filter_subject != have.filter_subject {
        fields.push("filter_subject");
    }
    // Pinned by an older pushbus or by hand: it will not follow its stream.
    if want.num_replicas == 0 && have.num_replicas != 0 {
        fields.push("num_replicas");
    }
    (!fields.is_empty()).then(|| Drift {
        object: format!(
            "consumer {stream_name}/{}",
            want.durable_name.as_deref().unwrap_or_default()
        ),
        fields,
    })
}
