//! gitops-notifier: delivers pokes to connected agents so their polling
//! loops poll now (SSE and gRPC streaming on one port).

pub mod agent_stream;
pub mod auth;
pub mod config;
pub mod conn;
pub mod grpc;
pub mod heads;
pub mod hub;
pub mod outbox;
pub mod prune;
pub mod revoke;
pub mod sse;
pub mod webhook;

use async_nats::jetstream::kv::Store;
use pushbus_shared::bus;
use pushbus_shared::proto::git_ops_notifier_server::GitOpsNotifierServer;
use pushbus_shared::service::{Listen, ListenError, Service};
use pushbus_shared::topology::{self, Topology};
use pushbus_shared::{ServiceContext, names};
use tokio_util::sync::CancellationToken;

pub use config::{AgentLimits, Config, NotifierDoor};
pub use hub::Hub;

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot read the listener's address: {0}")]
    ListenAddr(#[source] std::io::Error),
    #[error("webhook consumer task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Webhook(#[from] webhook::WebhookError),
    #[error(transparent)]
    Tls(#[from] pushbus_shared::listen::TlsError),
}

#[derive(Clone)]
pub struct AppState {
    pub hub: Hub,
    pub agents: Store,
    pub heads: Store,
    pub index: std::sync::Arc<heads::HeadIndex>,
    /// Ends every agent stream on shutdown, so the server can finish.
    pub shutdown: CancellationToken,
    pub gate: std::sync::Arc<auth::LoginGate>,
}

/// What the notifier needs; the webhook consumer follows `config`'s
/// attempts and backoff (`pushbus setup` uses the defaults; a starting
/// notifier updates the consumer to its own flags).
pub fn topology(config: &Config) -> Topology {
    Topology {
        streams: vec![topology::webhooks_stream(), topology::dlq_stream()],
        buckets: vec![topology::agents_bucket(), topology::ref_heads_bucket()],
        consumers: vec![(
            names::STREAM_WEBHOOKS.into(),
            webhook::consumer_spec(&config.webhooks).pull_config(),
        )],
    }
}

/// The gitops-notifier service, for hosts (`Launcher::service::<GitopsNotifier>`).
pub struct GitopsNotifier;

impl Service for GitopsNotifier {
    const NAME: &'static str = names::SERVICE_GITOPS_NOTIFIER;
    const ABOUT: &'static str = "pushbus gitops-notifier: streams pokes to connected agents";
    type Config = Config;
    type Listener = Listen;
    type Error = Error;

    fn topology(config: &Config) -> Topology {
        topology(config)
    }

    fn listener(config: &Config) -> Listen {
        Listen::At(config.listen)
    }

    /// Serves agents on `listener` (`config.listen` is only the default of
    /// [`Service::listener`]).
    async fn run(
        ctx: ServiceContext,
        config: Config,
        listener: Listen,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        // Its own child: stopping this service's tasks stops nothing else.
        let token = shutdown.child_token();
        let listen = listener.addr().map_err(Error::ListenAddr)?;
        let tls = config.door.tls()?;
        ctx.ensure(topology(&config)).await?;
        let agents = ctx.bucket(names::BUCKET_AGENTS).await?;
        let heads = ctx.bucket(names::BUCKET_REF_HEADS).await?;
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
            hub: Hub::with_caps(
                std::time::Duration::from_millis(config.coalesce_ms),
                hub::StreamCaps {
                    total: config.agent_limits.max_streams,
                    per_agent: config.agent_limits.max_streams_per_agent,
                },
            ),
            agents,
            heads: heads.clone(),
            index: index.clone(),
            shutdown: token.clone(),
            gate: std::sync::Arc::new(auth::LoginGate::new(
                config.agent_limits.login_failure_burst,
                std::time::Duration::from_millis(config.agent_limits.login_failure_refill_ms),
                std::time::Duration::from_millis(config.agent_limits.login_cache_ms),
            )),
        };
        // How long a removal's marker lives (tombstones' TTL is filter's).
        let marker_ttl = topology::REF_HEAD_MARKER_TTL;
        let revoker = tokio::spawn(revoke::follow(
            state.agents.clone(),
            state.hub.clone(),
            state.gate.clone(),
            revoke::HeadsOf {
                kv: heads.clone(),
                index: index.clone(),
                marker_ttl,
            },
            token.clone(),
        ));
        let sweeper = tokio::spawn(prune::sweep(
            state.agents.clone(),
            heads.clone(),
            index.clone(),
            std::time::Duration::from_secs(config.prune_interval_secs.max(1)),
            marker_ttl,
            token.clone(),
        ));
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
        let listener = listener.bind().await?;
        let grpc = tonic::service::Routes::new(GitOpsNotifierServer::new(grpc::WatchService {
            state: state.clone(),
        }))
        .into_axum_router();
        let app = sse::router(state.clone())
            .merge(grpc)
            .fallback(pushbus_shared::fallback::not_found);
        let app = pushbus_shared::listen::guard_requests(
            pushbus_shared::listen::json_framework_errors(app),
            config.door.request_limits(),
        );
        let limits = config.door.limits();
        let tls_on = tls.is_some();
        let server = tokio::spawn(pushbus_shared::listen::serve(
            listener,
            app,
            limits,
            tls,
            token.clone().cancelled_owned(),
        ));
        tracing::info!(%listen, tls = tls_on, "agents may connect");

        let webhooks = tokio::spawn(webhook::run(
            ctx.js.clone(),
            config.webhooks.clone(),
            token.clone(),
        ));
        ctx.ready.set(true);
        let hooked = webhooks.await;
        token.cancel();
        ctx.ready.set(false);
        let _ = server.await;
        let _ = feed.await;
        let _ = monitor.await;
        let _ = revoker.await;
        let _ = sweeper.await;
        ctx.drain().await;
        match hooked {
            Ok(result) => result.map_err(Error::from),
            Err(join) => Err(Error::Task(join)),
        }
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
