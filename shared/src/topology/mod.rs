//! Declarative topology: each service lists the streams, KV buckets and
//! durable consumers it needs; `ensure` creates what is missing at start-up
//! and reports (never reverts) what differs; `pushbus setup` writes it all.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, stream};

mod configs;
mod drift;
mod server;

pub use configs::{
    REF_HEAD_MARKER_TTL, agents_bucket, dlq_stream, geo_nodes_bucket, geo_push_routes_bucket,
    geo_status_stream, pushes_stream, ref_heads_bucket, webhooks_stream,
};
use drift::{bucket_drift, consumer_drift, stream_drift};
use server::{
    consumer_info, create_bucket, create_consumer, create_stream, retry, short_timeouts,
    stream_info, wait_consumer_current, wait_current,
};

const DAY: Duration = Duration::from_secs(24 * 3600);

/// Stream defaults: bounded, so a runaway producer fills a stream rather
/// than the disk. 1 GiB per stream, messages up to 1 MiB (nats-server's
/// default `max_payload`).
pub const DEFAULT_STREAM_MAX_BYTES: i64 = 1 << 30;
pub const DEFAULT_MAX_MSG_SIZE: i32 = 1 << 20;

/// Replicas and limits for every stream and bucket pushbus creates.
#[derive(clap::Args, Clone, Debug)]
pub struct TopologyArgs {
    /// Replicas of every stream and KV bucket (1, 3 or 5; a cluster needs at
    /// least as many JetStream servers). Services use it only for what is
    /// missing; `pushbus setup` also changes existing ones.
    #[arg(long = "replicas", env = "PUSHBUS_REPLICAS", default_value_t = 1,
          value_parser = clap::value_parser!(u8).range(1..=5), global = true)]
    pub replicas: u8,
    /// Size limit of each stream in bytes (PUSHBUS_PUSHES refuses new pushes
    /// when full; nothing stored is discarded before its max_age).
    #[arg(long = "stream-max-bytes", env = "PUSHBUS_STREAM_MAX_BYTES",
          default_value_t = DEFAULT_STREAM_MAX_BYTES, global = true)]
    pub stream_max_bytes: i64,
    /// Largest message a stream accepts, in bytes.
    #[arg(long = "stream-max-msg-size", env = "PUSHBUS_STREAM_MAX_MSG_SIZE",
          default_value_t = DEFAULT_MAX_MSG_SIZE, global = true)]
    pub max_msg_size: i32,
}

crate::default_from_flags!(TopologyArgs);

#[derive(Debug, thiserror::Error)]
pub enum TopologyError {
    #[error("cannot read stream {name}: {source}")]
    Info {
        name: String,
        source: jetstream::context::GetStreamError,
    },
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
    #[error("cannot open KV bucket {name}: {source}")]
    Open {
        name: String,
        source: jetstream::context::KeyValueError,
    },
    #[error("cannot read consumer {name} on {stream}: {source}")]
    ConsumerInfo {
        stream: String,
        name: String,
        source: jetstream::context::ConsumerInfoError,
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

/// An object on the server whose configuration differs from ours.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Drift {
    /// `stream NAME`, `bucket NAME` or `consumer STREAM/NAME`.
    pub object: String,
    pub fields: Vec<&'static str>,
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

    /// Applies replicas and stream limits to everything.
    pub fn with(mut self, args: &TopologyArgs) -> Topology {
        let replicas = usize::from(args.replicas.max(1));
        for s in &mut self.streams {
            s.num_replicas = replicas;
            s.max_bytes = args.stream_max_bytes;
            s.max_message_size = args.max_msg_size;
        }
        for b in &mut self.buckets {
            b.num_replicas = replicas;
        }
        // Inherited (0), never pinned: the server scales a named consumer
        // with its stream, also when an operator raises the stream by hand
        // (`nats stream edit --replicas 3`). A consumer pinned at R1 stays
        // on one node of an R3 stream and dies with it: every push is still
        // stored and matched, but nothing downstream of it moves.
        for (_, c) in &mut self.consumers {
            c.num_replicas = 0;
        }
        self
    }

    /// What services do at start-up: creates what is missing, and leaves
    /// what exists as it is, even where it differs (an operator may have
    /// raised replicas or limits; `pushbus setup` is the one writer). The
    /// differences are logged by field name, counted in
    /// `pushbus_topology_drift`, and returned.
    pub async fn ensure(&self, js: &jetstream::Context) -> Result<Vec<Drift>, TopologyError> {
        let js = &short_timeouts(js);
        let mut drifts = Vec::new();
        for cfg in &self.streams {
            match retry(|| stream_info(js, &cfg.name)).await? {
                Some(actual) => drifts.extend(stream_drift(cfg, &actual)),
                None => retry(|| create_stream(js, cfg)).await?,
            }
        }
        for cfg in &self.buckets {
            let name = format!("KV_{}", cfg.bucket);
            match retry(|| stream_info(js, &name)).await? {
                Some(actual) => drifts.extend(bucket_drift(cfg, &actual)),
                None => retry(|| create_bucket(js, cfg)).await?,
            }
        }
        for (stream_name, cfg) in &self.consumers {
            match retry(|| consumer_info(js, stream_name, cfg)).await? {
                Some(have) => drifts.extend(consumer_drift(stream_name, cfg, &have)),
                None => retry(|| create_consumer(js, stream_name, cfg)).await?,
            }
        }
        for d in &drifts {
            metrics::gauge!("pushbus_topology_drift", "object" => d.object.clone(), "fields" => d.fields.join(",")).set(1.0);
            tracing::warn!(
                object = %d.object,
                fields = %d.fields.join(","),
                "{} differs from pushbus's configuration in {}: kept as it is (`pushbus setup` writes it)",
                d.object,
                d.fields.join(", ")
            );
        }
        Ok(drifts)
    }

    /// `pushbus setup`: creates or updates everything to this configuration
    /// (e.g. R1 -> R3 in place), streams first (consumers need them).
    pub async fn apply(&self, js: &jetstream::Context) -> Result<(), TopologyError> {
        let js = &short_timeouts(js);
        for cfg in &self.streams {
            retry(|| create_stream(js, cfg)).await?;
        }
        for cfg in &self.buckets {
            retry(|| create_bucket(js, cfg)).await?;
        }
        // Consumers may not have more replicas than their stream has yet.
        let mut names: Vec<String> = self.streams.iter().map(|s| s.name.clone()).collect();
        names.extend(self.buckets.iter().map(|b| format!("KV_{}", b.bucket)));
        for name in &names {
            wait_current(js, name).await;
        }
        for (stream_name, cfg) in &self.consumers {
            retry(|| create_consumer(js, stream_name, cfg)).await?;
        }
        for (stream_name, cfg) in &self.consumers {
            wait_consumer_current(js, stream_name, cfg).await;
        }
        Ok(())
    }
}

/// Opens one bucket for a command, creating it if missing (never changing
/// an existing one).
pub async fn open_bucket(
    js: &jetstream::Context,
    cfg: kv::Config,
    args: &TopologyArgs,
) -> Result<kv::Store, TopologyError> {
    let name = cfg.bucket.clone();
    Topology {
        buckets: vec![cfg],
        ..Default::default()
    }
    .with(args)
    .ensure(js)
    .await?;
    bucket(js, &name).await
}

/// Opens bucket `name` (which must exist), naming it in the error.
pub async fn bucket(js: &jetstream::Context, name: &str) -> Result<kv::Store, TopologyError> {
    js.get_key_value(name)
        .await
        .map_err(|source| TopologyError::Open {
            name: name.to_owned(),
            source,
        })
}
