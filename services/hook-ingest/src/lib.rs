//! hook-ingest: the one door into pushbus. Receives post-receive
//! notifications, validates them, stores a `GitPushEvent` durably and answers
//! the pusher.

pub mod auth;
pub mod changes;
pub mod grpc;
pub mod hook;
pub mod http;
pub mod ingest;
pub mod lag;
pub mod routes;

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use pushbus_shared::ServiceContext;
use pushbus_shared::topology::{self, Topology};
use tokio_util::sync::CancellationToken;

#[derive(clap::Args, Clone, Debug)]
#[group(id = "ingest")]
pub struct Config {
    /// Address of the GitLab-compatible internal API.
    #[arg(
        id = "ingest_listen",
        long = "ingest-listen",
        env = "PUSHBUS_INGEST_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// File holding the GitLab shell shared secret; without it the endpoint
    /// accepts unauthenticated calls (local use only).
    #[arg(long = "ingest-secret-file", env = "PUSHBUS_INGEST_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Largest accepted request body.
    #[arg(long = "ingest-max-body-bytes", env = "PUSHBUS_INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a Geo push may wait for its replication-lag message.
    #[arg(
        long = "ingest-lag-budget-ms",
        env = "PUSHBUS_INGEST_LAG_BUDGET_MS",
        default_value_t = 250
    )]
    pub lag_budget_ms: u64,
    /// Look up the Geo node of pushes that name none by their correlation ID
    /// in pushbus-geo-push-routes (the front-end cache variant). Off by
    /// default: it costs every such push a KV read before it is stored.
    #[arg(long = "ingest-geo-routes", env = "PUSHBUS_INGEST_GEO_ROUTES")]
    pub geo_routes: bool,
    /// How long a push may wait for the stream's ack before it is answered
    /// 503 (not confirmed; the hook spools it). Keep it, plus the lag budget,
    /// below the hook's --timeout-ms (3000).
    #[arg(
        long = "ingest-store-timeout-ms",
        env = "PUSHBUS_INGEST_STORE_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub store_timeout_ms: u64,
    /// Accept unauthenticated calls on a non-loopback address (without it,
    /// hook-ingest refuses to start there with no --ingest-secret-file).
    #[arg(
        long = "ingest-insecure-no-auth",
        env = "PUSHBUS_INGEST_INSECURE_NO_AUTH"
    )]
    pub insecure_no_auth: bool,
    #[command(flatten)]
    pub routes: routes::RouteTtlArgs,
}

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
    #[error("cannot listen on {addr}: {source}")]
    Listen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("cannot open the Geo routes bucket: {0}")]
    Routes(String),
    #[error("HTTP server failed: {0}")]
    Serve(std::io::Error),
}

/// With the default route TTL (what `pushbus setup` uses unless told).
pub fn topology() -> Topology {
    topology_with(&routes::RouteTtlArgs::default())
}

pub fn topology_with(routes: &routes::RouteTtlArgs) -> Topology {
    Topology {
        streams: vec![topology::pushes_stream()],
        buckets: vec![topology::geo_push_routes_bucket(routes.ttl())],
        ..Default::default()
    }
}

pub async fn run(
    ctx: ServiceContext,
    config: Config,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> Result<(), Error> {
    let secret = match &config.secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(|source| Error::Secret {
                    path: path.clone(),
                    source,
                })?
                .trim()
                .to_owned(),
        ),
        None => {
            // Open only where nobody else can reach it, unless told.
            if !config.listen.ip().is_loopback() && !config.insecure_no_auth {
                return Err(Error::Insecure {
                    addr: config.listen,
                });
            }
            tracing::warn!("no --ingest-secret-file: post_receive accepts unauthenticated calls");
            None
        }
    };
    if let (Some(""), Some(path)) = (secret.as_deref(), &config.secret_file) {
        return Err(Error::EmptySecret { path: path.clone() });
    }
    topology_with(&config.routes)
        .with(&ctx.topology)
        .ensure(&ctx.js)
        .await?;
    let routes = if config.geo_routes {
        let bucket = ctx
            .js
            .get_key_value(pushbus_shared::names::BUCKET_GEO_PUSH_ROUTES)
            .await
            .map_err(|e| Error::Routes(e.to_string()))?;
        Some(bucket)
    } else {
        None
    };
    let listener = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| Error::Listen {
            addr: config.listen,
            source,
        })?;
    let state = http::HttpState {
        ingest: ingest::Ingest {
            publisher: ctx.publisher.clone(),
            client: ctx.client.clone(),
            lag_budget: Duration::from_millis(config.lag_budget_ms),
            store_timeout: Duration::from_millis(config.store_timeout_ms.max(1)),
            routes,
        },
        secret,
    };
    let grpc = tonic::service::Routes::new(
        pushbus_shared::proto::hook_ingest_server::HookIngestServer::new(grpc::HookIngestService {
            state: state.clone(),
        }),
    )
    .into_axum_router();
    // HTTP and gRPC (h2c) share one port.
    let app = http::router(state, config.max_body_bytes)
        .merge(grpc)
        .fallback(pushbus_shared::fallback::not_found);
    let token = CancellationToken::new();
    ctx.ready.set(true);
    tracing::info!(listen = %config.listen, "accepting post-receive notifications");
    let served = axum::serve(listener, app)
        .with_graceful_shutdown({
            let token = token.clone();
            async move {
                shutdown.await;
                token.cancel();
            }
        })
        .await;
    ctx.ready.set(false);
    // In-flight requests have finished (graceful shutdown); their publishes
    // were acked before they answered.
    ctx.drain().await;
    served.map_err(Error::Serve)
}
