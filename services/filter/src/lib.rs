//! filter: turns each push into pokes for exactly the agents that watch the
//! pushed project, refs and paths.

pub mod agent;
pub mod api;
pub mod config;
pub mod file;
pub mod glob;
pub mod index;
pub mod registry;

use tokio_util::sync::CancellationToken;

use futures::StreamExt;
use pushbus_shared::bus::{self, ConsumerSpec, Delivery, HandleError, Handler};
use pushbus_shared::heads::{HeadWriter, HeadsError, Pruning};
use pushbus_shared::proto::{AgentPoke, GitPushEvent, RefHead};
use pushbus_shared::topology::{self, Topology};
use pushbus_shared::{EventMeta, ServiceContext, names};
use tracing::Instrument;

pub use config::Config;
pub use registry::{RegistryError, put_agent};

fn pruning(config: &Config) -> Pruning {
    Pruning {
        deleted_ref_ttl: std::time::Duration::from_secs(config.deleted_ref_ttl_secs.max(1)),
        ..Pruning::default()
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error("cannot open the agent registry: agent registry API: {0}")]
    RegistryApi(#[source] async_nats::Error),
}

pub fn consumer_spec(config: &Config) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(names::STREAM_PUSHES, names::CONSUMER_FILTER);
    spec.concurrency = config.concurrency;
    spec.ack_wait = std::time::Duration::from_secs(config.ack_wait_secs.max(1));
    spec
}

pub fn topology(config: &Config) -> Topology {
    Topology {
        streams: vec![
            topology::pushes_stream(),
            topology::webhooks_stream(),
            topology::dlq_stream(),
        ],
        buckets: vec![topology::agents_bucket(), topology::ref_heads_bucket()],
        consumers: vec![(
            names::STREAM_PUSHES.into(),
            consumer_spec(config).pull_config(),
        )],
    }
}

/// The filter service, for hosts (`Launcher::service::<Filter>`).
pub struct Filter;

impl pushbus_shared::service::Service for Filter {
    const NAME: &'static str = names::SERVICE_FILTER;
    const ABOUT: &'static str =
        "pushbus filter: matches pushes against agent watches and emits pokes";
    type Config = Config;
    type Listener = ();
    type Error = Error;

    fn topology(config: &Config) -> Topology {
        topology(config)
    }

    fn listener(_: &Config) {}

    async fn run(
        ctx: ServiceContext,
        config: Config,
        (): (),
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        // Its own child: stopping this service's tasks stops nothing else.
        let token = shutdown.child_token();
        ctx.ensure(topology(&config)).await?;
        let kv = ctx.bucket(names::BUCKET_AGENTS).await?;
        let heads = ctx.bucket(names::BUCKET_REF_HEADS).await?;

        // Registrations are accepted even while the index is still loading:
        // they are KV writes, and the watch brings them into the index.
        // Subscribed before this replica says it is ready, so a request right
        // after /readyz meets a responder.
        let api = api::start(ctx.client.clone(), kv.clone())
            .await
            .map_err(Error::RegistryApi)?;
        let api = tokio::spawn(api.serve(token.clone()));

        // Phase one: the whole registry, before a single push is matched.
        let index = registry::SharedIndex::default();
        let (loaded_tx, mut loaded) = tokio::sync::watch::channel(false);
        let sync = tokio::spawn(registry::sync(kv, index.clone(), loaded_tx, token.clone()));
        tokio::select! {
            _ = token.cancelled() => {}
            _ = loaded.wait_for(|l| *l) => {}
        }
        if !token.is_cancelled() {
            ctx.ready.set(true);
            // Phase two: pushes.
            let handler = PushHandler {
                index,
                publisher: ctx.publisher.clone(),
                writer: HeadWriter::new(heads, ctx.js.clone(), pruning(&config)),
            };
            bus::run_consumer(
                ctx.js.clone(),
                consumer_spec(&config),
                handler,
                token.clone(),
            )
            .await?;
        }
        ctx.ready.set(false);
        token.cancel();
        let _ = sync.await;
        if let Err(e) = api.await {
            tracing::error!(error = %e, "agent registry API task failed");
        }
        ctx.drain().await;
        Ok(())
    }
}

/// Heads of one push written at once (a push to a platform-wide project
/// can concern hundreds of agents).
const HEAD_WRITES_IN_FLIGHT: usize = 64;

/// Writes every head, up to [`HEAD_WRITES_IN_FLIGHT`] at once (different
/// keys: the writes need not wait for each other); how many it wrote.
async fn record_all(writer: &HeadWriter, heads: &[RefHead]) -> Result<u64, HeadsError> {
    let mut in_flight = futures::stream::FuturesUnordered::new();
    let mut wrote = 0;
    for head in heads {
        if in_flight.len() == HEAD_WRITES_IN_FLIGHT
            && let Some(done) = in_flight.next().await
        {
            wrote += u64::from(done?);
        }
        let agent_id = head.poke.as_ref().map_or("", |p| p.agent_id.as_str());
        let span = tracing::info_span!("write ref head", %agent_id);
        in_flight.push(writer.record(head).instrument(span));
    }
    while let Some(done) = in_flight.next().await {
        wrote += u64::from(done?);
    }
    Ok(wrote)
}

struct PushHandler {
    index: registry::SharedIndex,
    publisher: pushbus_shared::bus::Publisher,
    writer: HeadWriter,
}

impl Handler<GitPushEvent> for PushHandler {
    async fn handle(&self, d: Delivery<GitPushEvent>) -> Result<(), HandleError> {
        let push = &d.message;
        metrics::counter!("pushbus_filter_pushes_total").increment(1);
        // Which matched agents want a webhook too, read under the same lock.
        let matches: Vec<(index::Match, bool)> = {
            let _span = tracing::info_span!("match", project_id = push.project_id).entered();
            let index = registry::read(&self.index);
            index
                .matches(push)
                .into_iter()
                .map(|m| {
                    let hook = index.has_webhook(&m.agent_id);
                    (m, hook)
                })
                .collect()
        };
        if matches.is_empty() {
            metrics::counter!("pushbus_filter_pushes_unmatched_total").increment(1);
            tracing::debug!(project_id = push.project_id, "push matches no agent");
            return Ok(());
        }
        // This handler's span, child of the push's publish: delivering a
        // head continues the push's trace from here.
        let trace = pushbus_shared::trace::current();
        // Webhook jobs first, so their acks travel while the heads are written.
        let mut hooks = Vec::new();
        let mut heads = Vec::with_capacity(matches.len());
        for (m, hook) in &matches {
            let change = &push.changes[m.change];
            let poke = AgentPoke {
                agent_id: m.agent_id.to_string(),
                project_id: push.project_id,
                project_path: push.project_path.clone(),
                r#ref: change.r#ref.clone(),
                ref_kind: change.ref_kind,
                change_kind: change.change_kind,
                forced: change.forced,
                old_sha: change.old_sha.clone(),
                new_sha: change.new_sha.clone(),
                push_event_id: d.meta.event_id.clone(),
                changed_paths: change.changed_paths.clone(),
                paths_known: change.paths_known,
                actor: push.actor.clone(),
                // Heads order by the push, not by when they are written: a
                // replica that died holding an older push writes it late,
                // and it must not win.
                push_sequence: d.order_sequence,
                push_epoch: d.stream_epoch,
                pushed_at: d.occurred_at,
                default_branch: push.default_branch.clone(),
            };
            // Derived from the push ID + agent + ref: a redelivered push
            // derives the same IDs (webhook jobs are deduplicated by them).
            let meta = EventMeta::derived_from(&d.meta, &[&m.agent_id, &change.r#ref]);
            // Only agents with a webhook cost the webhook consumer anything.
            if *hook {
                let sent = self
                    .publisher
                    .send(names::webhook_subject(&m.agent_id), &poke, &meta)
                    .await
                    .map_err(HandleError::retryable)?;
                hooks.push(sent);
            }
            heads.push(RefHead {
                poke: Some(poke),
                event_id: meta.event_id,
                correlation_id: meta.correlation_id,
                trace: trace.clone(),
                ..Default::default()
            });
        }
        let wrote = record_all(&self.writer, &heads)
            .await
            .map_err(HandleError::retryable)?;
        metrics::counter!("pushbus_filter_heads_written_total").increment(wrote);
        for p in hooks {
            p.wait().await.map_err(HandleError::retryable)?;
        }
        metrics::counter!("pushbus_filter_pokes_total").increment(matches.len() as u64);
        // Per push: debug, as hook-ingest's "push stored".
        tracing::debug!(
            pokes = matches.len(),
            project_id = push.project_id,
            "push matched"
        );
        Ok(())
    }
}
