//! pushbus's streams and buckets, as configured when nothing overrides them.

use std::time::Duration;

use async_nats::jetstream::{kv, stream};

use super::{DAY, DEFAULT_MAX_MSG_SIZE, DEFAULT_STREAM_MAX_BYTES};
use crate::names;

fn limits_stream(
    name: &str,
    subjects: &str,
    description: &str,
    max_age: Duration,
) -> stream::Config {
    stream::Config {
        name: name.into(),
        subjects: vec![subjects.into()],
        description: Some(description.into()),
        // Limits (not WorkQueue): several services each keep their own
        // durable consumer on the same subjects.
        retention: stream::RetentionPolicy::Limits,
        storage: stream::StorageType::File,
        // A full stream refuses new messages (the publisher sees the error:
        // hook-ingest answers 503 and the hook spools; filter and notifier
        // retry) instead of dropping the oldest, still unprocessed ones.
        discard: stream::DiscardPolicy::New,
        max_bytes: DEFAULT_STREAM_MAX_BYTES,
        max_message_size: DEFAULT_MAX_MSG_SIZE,
        max_age,
        duplicate_window: Duration::from_secs(120),
        ..Default::default()
    }
}

pub fn pushes_stream() -> stream::Config {
    limits_stream(
        names::STREAM_PUSHES,
        names::SUBJECTS_PUSHES,
        "pushbus: GitPushEvent per push, subject per project",
        7 * DAY,
    )
}

pub fn webhooks_stream() -> stream::Config {
    limits_stream(
        names::STREAM_WEBHOOKS,
        names::SUBJECTS_WEBHOOKS,
        "pushbus: AgentPoke for agents with a webhook, subject per agent",
        DAY,
    )
}

pub fn dlq_stream() -> stream::Config {
    limits_stream(
        names::STREAM_DLQ,
        names::SUBJECTS_DLQ,
        "pushbus: dead letters, subject per consumer that gave up",
        30 * DAY,
    )
}

pub fn geo_status_stream() -> stream::Config {
    stream::Config {
        // Reports supersede each other: when full, the oldest go first.
        discard: stream::DiscardPolicy::Old,
        ..limits_stream(
            names::STREAM_GEO_STATUS,
            names::SUBJECTS_GEO_STATUS,
            "pushbus: Geo secondaries' ReplicationStatus reports",
            DAY,
        )
    }
}

/// How long the marker of a removed ref head lives (a deleted ref's expired
/// tombstone, a deleted agent's purged heads): every notifier replica's feed
/// sees it well within this, and one starting within it learns the removal.
pub const REF_HEAD_MARKER_TTL: Duration = DAY;

pub fn ref_heads_bucket() -> kv::Config {
    kv::Config {
        bucket: names::BUCKET_REF_HEADS.into(),
        description: "pushbus: latest poke per agent, project and ref (RefHead)".into(),
        history: 1,
        storage: stream::StorageType::File,
        // Per-message TTLs: deleted refs' tombstones and removal markers
        // expire, so the bucket stays bounded.
        limit_markers: Some(REF_HEAD_MARKER_TTL),
        ..Default::default()
    }
}

pub fn agents_bucket() -> kv::Config {
    kv::Config {
        bucket: names::BUCKET_AGENTS.into(),
        description: "pushbus: AgentConfig per agent ID".into(),
        history: 5,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

pub fn geo_nodes_bucket() -> kv::Config {
    kv::Config {
        bucket: names::BUCKET_GEO_NODES.into(),
        description: "pushbus: GeoNode per node ID".into(),
        history: 5,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}

/// Short-lived routes: an entry only has to outlive the push it names.
pub fn geo_push_routes_bucket(ttl: Duration) -> kv::Config {
    kv::Config {
        bucket: names::BUCKET_GEO_PUSH_ROUTES.into(),
        description: "pushbus: Geo node ID per push correlation ID (hex key)".into(),
        history: 1,
        max_age: ttl,
        storage: stream::StorageType::File,
        ..Default::default()
    }
}
