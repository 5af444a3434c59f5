//! Declarative topology: each service lists the streams, KV buckets and
//! durable consumers it needs; `ensure` creates or updates them idempotently
//! at start-up (and `pushbus setup` does it for all services at once).

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, stream};

use crate::names;

const DAY: Duration = Duration::from_secs(24 * 3600);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot create or update stream {name}: {source}")]
    Stream {
        name: String,
        source: jetstream::context::CreateStreamError,
    },
    #[error("cannot create or update KV bucket {name}: {source}")]
    Bucket {
        name: String,
        source: jetstream::context::CreateKeyValueError,
    },
    #[error("cannot create or update consumer {name} on {stream}: {source}")]
    Consumer {
        stream: String,
        name: String,
        source: jetstream::stream::ConsumerError,
    },
}

/// What one service needs to exist on the server.
#[derive(Clone, Debug, Default)]
pub struct Topology {
    pub streams: Vec<stream::Config>,
    pub buckets: Vec<kv::Config>,
    /// (stream name, consumer config)
    pub consumers: Vec<(String, pull::Config)>,
}

impl Topology {
    pub fn merge(mut self, other: Topology) -> Topology {
        for s in other.streams {
            if !self.streams.iter().any(|x| x.name == s.name) {
                self.streams.push(s);
            }
        }
        for b in other.buckets {
            if !self.buckets.iter().any(|x| x.bucket == b.bucket) {
                self.buckets.push(b);
            }
        }
        self.consumers.extend(other.consumers);
        self
    }

    /// Creates or updates everything, streams first (consumers need them).
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<(), TopologyError> {
        for cfg in &self.streams {
            js.create_or_update_stream(cfg.clone())
                .await
                .map_err(|source| TopologyError::Stream {
                    name: cfg.name.clone(),
                    source,
                })?;
        }
        for cfg in &self.buckets {
            js.create_or_update_key_value(cfg.clone())
                .await
                .map_err(|source| TopologyError::Bucket {
                    name: cfg.bucket.clone(),
                    source,
                })?;
        }
        for (stream_name, cfg) in &self.consumers {
            js.create_consumer_on_stream(cfg.clone(), stream_name)
                .await
                .map_err(|source| TopologyError::Consumer {
                    stream: stream_name.clone(),
                    name: cfg.durable_name.clone().unwrap_or_default(),
                    source,
                })?;
        }
        Ok(())
    }
}

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
        discard: stream::DiscardPolicy::Old,
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

pub fn pokes_stream() -> stream::Config {
    limits_stream(
        names::STREAM_POKES,
        names::SUBJECTS_POKES,
        "pushbus: AgentPoke per agent and ref, subject per agent",
        DAY,
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
    limits_stream(
        names::STREAM_GEO_STATUS,
        names::SUBJECTS_GEO_STATUS,
        "pushbus: Geo secondaries' ReplicationStatus reports",
        DAY,
    )
}

pub fn ref_heads_bucket() -> kv::Config {
    kv::Config {
        bucket: names::BUCKET_REF_HEADS.into(),
        description: "pushbus: latest poke per agent, project and ref (RefHead)".into(),
        history: 1,
        storage: stream::StorageType::File,
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
