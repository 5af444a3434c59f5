//! Declarative topology: each service lists the streams, KV buckets and
//! durable consumers it needs; `ensure` creates what is missing at start-up
//! and reports (never reverts) what differs; `pushbus setup` writes it all.

use std::time::Duration;

use async_nats::jetstream::{self, consumer::pull, kv, stream};

use crate::names;

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

impl Default for TopologyArgs {
    fn default() -> Self {
        Self {
            replicas: 1,
            stream_max_bytes: DEFAULT_STREAM_MAX_BYTES,
            max_msg_size: DEFAULT_MAX_MSG_SIZE,
        }
    }
}

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
    js.get_key_value(&name)
        .await
        .map_err(|source| TopologyError::Open { name, source })
}

/// How long start-up waits out a cluster that cannot answer yet (a stream
/// whose leader died is re-elected within seconds).
const RETRY_FOR: Duration = Duration::from_secs(60);

/// Errors a cluster gives while it elects a leader or misses a peer; worth
/// waiting out. Anything else (bad config, permissions) fails at once.
fn transient(err: &TopologyError) -> bool {
    let text = err.to_string().to_ascii_lowercase();
    [
        "timed out",
        "no responders",
        "temporarily unavailable",
        "no suitable peers",
        "leader",
        "not current",
        // A scale-up the cluster has not applied to the stream yet.
        "exceeds parent stream",
    ]
    .iter()
    .any(|t| text.contains(t))
}

/// After a scale-up the new replicas copy the stream; until they have, a
/// lost leader may leave the stream without quorum. Waits (bounded) until
/// every replica is current, so `pushbus setup` returning means "done".
async fn wait_current(js: &jetstream::Context, name: &str) {
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        let state = match js.get_stream(name).await {
            Ok(mut s) => s.info().await.ok().map(|i| {
                let want = replicas(i.config.num_replicas);
                let c = i.cluster.clone().unwrap_or_default();
                let current = c
                    .replicas
                    .iter()
                    .filter(|r| r.current && !r.offline)
                    .count();
                (c.leader.is_some() || want == 1) && current + 1 >= want
            }),
            Err(_) => None,
        };
        if state == Some(true) {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(
                stream = name,
                "replicas not all current yet; check `nats stream info`"
            );
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The same for a consumer: scaled up, its new replicas catch up too.
async fn wait_consumer_current(js: &jetstream::Context, stream_name: &str, cfg: &pull::Config) {
    let name = cfg.durable_name.clone().unwrap_or_default();
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    loop {
        let done = match js.get_stream(stream_name).await {
            Ok(s) => s.consumer_info(&name).await.ok().is_some_and(|i| {
                // Inherited replicas: as many as the stream has.
                let want = match cfg.num_replicas {
                    0 => replicas(s.cached_info().config.num_replicas),
                    n => n,
                };
                let c = i.cluster.clone().unwrap_or_default();
                let current = c
                    .replicas
                    .iter()
                    .filter(|r| r.current && !r.offline)
                    .count();
                (c.leader.is_some() || want == 1) && current + 1 >= want
            }),
            Err(_) => false,
        };
        if done {
            return;
        }
        if tokio::time::Instant::now() >= deadline {
            tracing::warn!(stream = stream_name, consumer = %name, "consumer replicas not all current yet");
            return;
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// A request lost with a dead node is retried after 2 s rather than after
/// the default 10 s wait.
fn short_timeouts(js: &jetstream::Context) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(js.client())
}

async fn retry<T, F, Fut>(mut op: F) -> Result<T, TopologyError>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Result<T, TopologyError>>,
{
    let deadline = tokio::time::Instant::now() + RETRY_FOR;
    let mut delay = Duration::from_millis(200);
    loop {
        match op().await {
            Err(err) if transient(&err) && tokio::time::Instant::now() < deadline => {
                tracing::warn!(error = %err, retry_in_ms = delay.as_millis() as u64, "nats cluster not answering yet");
                tokio::time::sleep(delay).await;
                delay = (delay * 2).min(Duration::from_secs(2));
            }
            other => return other,
        }
    }
}

async fn consumer_info(
    js: &jetstream::Context,
    stream_name: &str,
    cfg: &pull::Config,
) -> Result<Option<jetstream::consumer::Config>, TopologyError> {
    let name = cfg.durable_name.clone().unwrap_or_default();
    let stream = js
        .get_stream(stream_name)
        .await
        .map_err(|source| TopologyError::Info {
            name: stream_name.into(),
            source,
        })?;
    match stream.consumer_info(&name).await {
        Ok(info) => Ok(Some(info.config)),
        Err(e) if e.kind() == jetstream::context::ConsumerInfoErrorKind::NotFound => Ok(None),
        Err(source) => Err(TopologyError::ConsumerInfo {
            stream: stream_name.into(),
            name,
            source,
        }),
    }
}

async fn stream_info(
    js: &jetstream::Context,
    name: &str,
) -> Result<Option<stream::Config>, TopologyError> {
    match js.get_stream(name).await {
        Ok(s) => Ok(Some(s.cached_info().config.clone())),
        Err(e)
            if matches!(e.kind(), jetstream::context::GetStreamErrorKind::JetStream(ref j)
                if j.error_code() == jetstream::ErrorCode::STREAM_NOT_FOUND) =>
        {
            Ok(None)
        }
        Err(source) => Err(TopologyError::Info {
            name: name.into(),
            source,
        }),
    }
}

async fn create_stream(js: &jetstream::Context, cfg: &stream::Config) -> Result<(), TopologyError> {
    js.create_or_update_stream(cfg.clone())
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Stream {
            name: cfg.name.clone(),
            source,
        })
}

async fn create_bucket(js: &jetstream::Context, cfg: &kv::Config) -> Result<(), TopologyError> {
    js.create_or_update_key_value(cfg.clone())
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Bucket {
            name: cfg.bucket.clone(),
            source,
        })
}

async fn create_consumer(
    js: &jetstream::Context,
    stream_name: &str,
    cfg: &pull::Config,
) -> Result<(), TopologyError> {
    js.create_consumer_on_stream(cfg.clone(), stream_name)
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Consumer {
            stream: stream_name.into(),
            name: cfg.durable_name.clone().unwrap_or_default(),
            source,
        })
}

/// 0 and negative both mean "no limit" (the server reports -1).
fn limit(v: i64) -> i64 {
    if v <= 0 { -1 } else { v }
}

fn replicas(n: usize) -> usize {
    n.max(1)
}

fn stream_drift(want: &stream::Config, have: &stream::Config) -> Option<Drift> {
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

fn bucket_drift(want: &kv::Config, have: &stream::Config) -> Option<Drift> {
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

fn consumer_drift(
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
