//! Talking to the server: retries while a cluster elects, waits until every
//! replica is current, and the create and info calls themselves.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::pull;
use async_nats::jetstream::{kv, stream};

use super::TopologyError;
use super::drift::replicas;

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
pub(super) async fn wait_current(js: &jetstream::Context, name: &str) {
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
pub(super) async fn wait_consumer_current(
    js: &jetstream::Context,
    stream_name: &str,
    cfg: &pull::Config,
) {
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
pub(super) fn short_timeouts(js: &jetstream::Context) -> jetstream::Context {
    jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(2))
        .build(js.client())
}

pub(super) async fn retry<T, F, Fut>(mut op: F) -> Result<T, TopologyError>
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

pub(super) async fn consumer_info(
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

pub(super) async fn stream_info(
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

pub(super) async fn create_stream(
    js: &jetstream::Context,
    cfg: &stream::Config,
) -> Result<(), TopologyError> {
    js.create_or_update_stream(cfg.clone())
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Stream {
            name: cfg.name.clone(),
            source,
        })
}

pub(super) async fn create_bucket(
    js: &jetstream::Context,
    cfg: &kv::Config,
) -> Result<(), TopologyError> {
    js.create_or_update_key_value(cfg.clone())
        .await
        .map(|_| ())
        .map_err(|source| TopologyError::Bucket {
            name: cfg.bucket.clone(),
            source,
        })
}

pub(super) async fn create_consumer(
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
