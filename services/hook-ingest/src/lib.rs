//! hook-ingest: the one door into pushbus. Receives post-receive
//! notifications, validates them, stores a `GitPushEvent` durably and answers
//! the pusher.

pub mod auth;
pub mod changes;
pub mod config;
pub mod geo_routes;
pub mod grpc;
pub mod hook;
pub mod http;
pub mod ingest;
pub mod lag;
pub mod terminal;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pushbus_shared::secret;
use pushbus_shared::service::{Listen, ListenError, Service};
use pushbus_shared::topology::{self, Topology};
use pushbus_shared::{ServiceContext, names};
use tokio_util::sync::CancellationToken;

pub use config::{Config, IngestDoor};

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("cannot read the shared secret file {path}: {source}")]
    Secret {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error(
        "refusing to accept unauthenticated calls on {addr}: give --ingest-secret-file \
         (a non-empty file), listen on loopback, or pass --ingest-insecure-no-auth"
    )]
    Insecure { addr: SocketAddr },
    #[error("the shared secret file {} is empty", path.display())]
    EmptySecret { path: PathBuf },
    #[error(transparent)]
    Listen(#[from] ListenError),
    #[error("cannot read the listener's address: {0}")]
    ListenAddr(#[source] std::io::Error),
    #[error(transparent)]
    Tls(#[from] pushbus_shared::listen::TlsError),
}

/// With the default route TTL (what `pushbus setup` uses unless told).
pub fn topology() -> Topology {
    topology_with(&geo_routes::RouteTtlArgs::default())
}

pub fn topology_with(routes: &geo_routes::RouteTtlArgs) -> Topology {
    Topology {
        streams: vec![topology::pushes_stream()],
        buckets: vec![topology::geo_push_routes_bucket(routes.ttl())],
        ..Default::default()
    }
}

/// The hook-ingest service, for hosts (`Launcher::service::<HookIngest>`).
pub struct HookIngest;

impl Service for HookIngest {
    const NAME: &'static str = names::SERVICE_HOOK_INGEST;
    const ABOUT: &'static str =
        "pushbus hook-ingest: receives post-receive notifications and stores them as events";
    type Config = Config;
    type Listener = Listen;
    type Error = Error;

    fn topology(config: &Config) -> Topology {
        topology_with(&config.routes)
    }

    fn listener(config: &Config) -> Listen {
        Listen::At(config.listen)
    }

    /// Serves the HTTP and gRPC doors on `listener` (`config.listen` is only
    /// the default of [`Service::listener`]).
    async fn run(
        ctx: ServiceContext,
        config: Config,
        listener: Listen,
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        let listen = listener.addr().map_err(Error::ListenAddr)?;
        let secret = match &config.secret_file {
            Some(path) => Some(secret::read_file(path).map_err(|source| Error::Secret {
                path: path.clone(),
                source,
            })?),
            None => {
                // Open only where nobody else can reach it, unless told.
                if !listen.ip().is_loopback() && !config.insecure_no_auth {
                    return Err(Error::Insecure { addr: listen });
                }
                tracing::warn!(
                    "no --ingest-secret-file: post_receive accepts unauthenticated calls"
                );
                None
            }
        };
        let tls = config.door.tls()?;
        if let (Some(""), Some(path)) = (secret.as_deref(), &config.secret_file) {
            return Err(Error::EmptySecret { path: path.clone() });
        }
        ctx.ensure(topology_with(&config.routes)).await?;
        let routes = if config.geo_routes {
            Some(
                ctx.bucket(pushbus_shared::names::BUCKET_GEO_PUSH_ROUTES)
                    .await?,
            )
        } else {
            None
        };
        let listener = listener.bind().await?;
        let state = http::DoorState {
            ingest: ingest::Ingest {
                publisher: ctx.publisher.clone(),
                client: ctx.client.clone(),
                lag_budget: Duration::from_millis(config.lag_budget_ms),
                store_timeout: Duration::from_millis(config.store_timeout_ms.max(1)),
                routes,
            },
            secret,
            max_body_bytes: config.max_body_bytes,
            unauthenticated_body_bytes: config.unauthenticated_body_bytes,
        };
        let grpc = tonic::service::Routes::new(
            pushbus_shared::proto::hook_ingest_server::HookIngestServer::new(
                grpc::HookIngestService {
                    state: state.clone(),
                },
            ),
        )
        .into_axum_router();
        // HTTP and gRPC (h2c, or h2 over TLS) share one port.
        let app = http::router(state)
            .merge(grpc)
            .fallback(pushbus_shared::fallback::not_found);
        let app = pushbus_shared::listen::guard_requests(
            pushbus_shared::listen::json_framework_errors(app),
            config.door.request_limits(),
        );
        let limits = config.door.limits();
        ctx.ready.set(true);
        tracing::info!(%listen, tls = tls.is_some(), "accepting post-receive notifications");
        pushbus_shared::listen::serve(listener, app, limits, tls, shutdown.cancelled_owned()).await;
        ctx.ready.set(false);
        // In-flight requests have finished (graceful shutdown); their publishes
        // were acked before they answered.
        ctx.drain().await;
        Ok(())
    }
}
