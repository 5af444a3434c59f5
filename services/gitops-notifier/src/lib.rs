//! gitops-notifier: delivers pokes to connected agents so their polling
//! loops poll now (SSE and gRPC streaming on one port).

pub mod auth;
pub mod conn;
pub mod grpc;
pub mod heads;
pub mod hub;
pub mod outbox;
pub mod sse;
pub mod watch;
pub mod webhook;

use std::future::Future;
use std::net::SocketAddr;

use async_nats::jetstream::kv::Store;
use pushbus_shared::bus::{self, ConsumerSpec, Delivery, HandleError, Handler};
use pushbus_shared::proto::git_ops_notifier_server::GitOpsNotifierServer;
use pushbus_shared::proto::{AgentPoke, RefHead};
use pushbus_shared::topology::{self, Topology};
use pushbus_shared::{ServiceContext, names};
use tokio_util::sync::CancellationToken;

pub use hub::Hub;

#[derive(clap::Args, Clone, Debug)]
#[group(id = "notifier")]
pub struct Config {
    /// Address for agents: SSE at /v1/agents/{id}/pokes and gRPC
    /// pushbus.v1.GitOpsNotifier/Watch.
    #[arg(
        id = "notifier_listen",
        long = "notifier-listen",
        env = "PUSHBUS_NOTIFIER_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// At most one poke per agent and ref per this many milliseconds; the
    /// first of a burst goes out at once, the last one carries the newest SHA.
    #[arg(
        id = "notifier_coalesce_ms",
        long = "notifier-coalesce-ms",
        env = "PUSHBUS_NOTIFIER_COALESCE_MS",
        default_value_t = 500
    )]
    pub coalesce_ms: u64,
    /// Seconds before a poke pulled by a replica that died is handed to
    /// another (recording a head takes milliseconds, so this can be short).
    #[arg(
        id = "notifier_ack_wait_secs",
        long = "notifier-ack-wait-secs",
        env = "PUSHBUS_NOTIFIER_ACK_WAIT_SECS",
        default_value_t = 5
    )]
    pub ack_wait_secs: u64,
    #[command(flatten)]
    pub webhooks: webhook::WebhookConfig,
}

/// The flags' defaults.
impl Default for Config {
    fn default() -> Self {
        Config::new(SocketAddr::from(([127, 0, 0, 1], 8081)))
    }
}

impl Config {
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            coalesce_ms: 500,
            ack_wait_secs: 5,
            webhooks: Default::default(),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error("cannot open the agent registry: {0}")]
    Registry(String),
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("poke consumer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
}

#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub agents: Store,
    pub heads: Store,
    pub index: std::sync::Arc<heads::HeadIndex>,
    /// Ends every agent stream on shutdown, so the server can finish.
    pub shutdown: CancellationToken,
}

pub fn consumer_spec(config: &Config) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(names::STREAM_POKES, names::CONSUMER_NOTIFIER);
    spec.ack_wait = std::time::Duration::from_secs(config.ack_wait_secs.max(1));
    spec
}

/// What the notifier needs; the webhook consumer follows `config`'s
/// attempts and backoff (`pushbus setup` uses the defaults; a starting
/// notifier updates the consumer to its own flags).
pub fn topology(config: &Config) -> Topology {
    Topology {
        streams: vec![
            topology::pokes_stream(),
            topology::webhooks_stream(),
            topology::dlq_stream(),
        ],
        buckets: vec![topology::agents_bucket(), topology::ref_heads_bucket()],
        consumers: vec![
            (
                names::STREAM_POKES.into(),
                consumer_spec(config).pull_config(),
            ),
            (
                names::STREAM_WEBHOOKS.into(),
                webhook::consumer_spec(&config.webhooks).pull_config(),
            ),
        ],
    }
}

pub async fn run(
    ctx: ServiceContext,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let token = pushbus_shared::service::cancel_on(shutdown);
    topology(&config)
        .with(&ctx.topology)
        .ensure(&ctx.js)
        .await?;
    let agents = ctx
        .js
        .get_key_value(names::BUCKET_AGENTS)
        .await
        .map_err(|e| Error::Registry(e.to_string()))?;
    let heads = ctx
        .js
        .get_key_value(names::BUCKET_REF_HEADS)
        .await
        .map_err(|e| Error::Registry(e.to_string()))?;
    // Every head's revision and SHA, before any agent connects, so catch-up
    // never asks the server per connection.
    let (index, after) = loop {
        match heads::load(&heads).await {
            Ok(loaded) => break loaded,
            Err(err) => tracing::warn!(%err, "cannot load the ref heads; retrying"),
        }
        tokio::select! {
            _ = token.cancelled() => {
                ctx.drain().await;
                return Ok(());
            }
            _ = tokio::time::sleep(std::time::Duration::from_secs(1)) => {}
        }
    };
    metrics::gauge!("pushbus_notifier_ref_heads").set(index.len() as f64);
    let index = std::sync::Arc::new(index);
    let state = AppState {
        hub: Hub::new(std::time::Duration::from_millis(config.coalesce_ms)),
        agents,
        heads: heads.clone(),
        index: index.clone(),
        shutdown: token.clone(),
    };
    // Every replica follows every head and keeps the ones for its agents.
    let reconnected = std::sync::Arc::new(tokio::sync::Notify::new());
    let feed = tokio::spawn(heads::follow(
        heads.clone(),
        state.hub.clone(),
        index,
        after,
        reconnected.clone(),
        token.clone(),
    ));
    let monitor = tokio::spawn(watch_bus(
        ctx.client.clone(),
        state.hub.clone(),
        reconnected,
        token.clone(),
    ));
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    let grpc = tonic::service::Routes::new(GitOpsNotifierServer::new(grpc::WatchService {
        state: state.clone(),
    }))
    .into_axum_router();
    let app = sse::router(state.clone())
        .merge(grpc)
        .fallback(pushbus_shared::fallback::not_found);
    let server = tokio::spawn({
        let token = token.clone();
        async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
        }
    });
    tracing::info!(listen = %config.listen, "agents may connect");

    let consumer = tokio::spawn(bus::run_consumer(
        ctx.js.clone(),
        consumer_spec(&config),
        PokeHandler {
            writer: heads::HeadWriter::new(heads),
        },
        token.clone(),
    ));
    let webhooks = tokio::spawn(webhook::run(
        ctx.js.clone(),
        config.webhooks.clone(),
        token.clone(),
    ));
    ctx.ready.set(true);
    let consumed = consumer.await;
    token.cancel();
    ctx.ready.set(false);
    let hooked = webhooks.await;
    let _ = server.await;
    let _ = feed.await;
    let _ = monitor.await;
    ctx.drain().await;
    match consumed {
        Ok(result) => result.map_err(Error::from)?,
        Err(join) => return Err(Error::Task(join)),
    }
    match hooked {
        Ok(result) => result.map_err(Error::from),
        Err(join) => Err(Error::Task(join)),
    }
}

/// Tells connected agents to fall back to polling while this replica has
/// no bus, and that pokes are live again once it is back.
async fn watch_bus(
    client: async_nats::Client,
    hub: Hub,
    reconnected: std::sync::Arc<tokio::sync::Notify>,
    shutdown: CancellationToken,
) {
    use async_nats::connection::State as Conn;
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(250));
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tick.tick() => {}
        }
        let changed = match client.connection_state() {
            Conn::Connected => {
                let back = hub.bus_back();
                if back {
                    reconnected.notify_one();
                }
                back
            }
            Conn::Disconnected | Conn::Pending => hub.bus_lost(),
        };
        if changed {
            tracing::warn!(state = ?client.connection_state(), "bus state changed; agents told");
        }
    }
}

/// Durable effect of a poke: its ref head. Every replica's feed then
/// delivers it to the agent's connections, wherever they are.
struct PokeHandler {
    writer: heads::HeadWriter,
}

impl Handler<AgentPoke> for PokeHandler {
    async fn handle(&self, d: Delivery<AgentPoke>) -> Result<(), HandleError> {
        let agent_id = d.message.agent_id.clone();
        let head = RefHead {
            poke: Some(d.message),
            event_id: d.meta.event_id.clone(),
            correlation_id: d.meta.correlation_id.clone(),
            poke_sequence: d.stream_sequence,
        };
        let wrote = self
            .writer
            .record(&head)
            .await
            .map_err(|e| HandleError::Retryable(e.to_string()))?;
        metrics::counter!("pushbus_notifier_pokes_total").increment(1);
        tracing::debug!(%agent_id, wrote, "ref head recorded");
        Ok(())
    }
}
