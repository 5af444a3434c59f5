//! Hosting services in a process: common flags, one NATS connection per
//! service, the ops server, and shutdown on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Publisher};
use crate::ops::{self, Readiness, ReadyFlag};
use crate::proto::Source;

pub const DEFAULT_NATS_URL: &str = "nats://127.0.0.1:4222";

#[derive(clap::Args, Clone, Debug, Default)]
pub struct NatsArgs {
    /// NATS server URL.
    #[arg(long = "nats-url", env = "PUSHBUS_NATS_URL")]
    pub nats_url: Option<String>,
}

impl NatsArgs {
    pub fn url(&self) -> &str {
        self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL)
    }
}

#[derive(clap::Args, Clone, Debug)]
pub struct OpsArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(
        long = "ops-listen",
        env = "PUSHBUS_OPS_LISTEN",
        default_value = "127.0.0.1:9464"
    )]
    pub ops_listen: SocketAddr,
    /// Log as JSON lines instead of human-readable text.
    #[arg(long = "log-json", env = "PUSHBUS_LOG_JSON")]
    pub log_json: bool,
}

/// What a service gets from its host: its own NATS connection, a publisher
/// stamped with its identity, and its readiness switch.
#[derive(Clone)]
pub struct ServiceContext {
    pub service: &'static str,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub publisher: Publisher,
    pub ready: ReadyFlag,
}

impl ServiceContext {
    pub fn new(service: &'static str, client: async_nats::Client, ready: ReadyFlag) -> Self {
        let js = jetstream::new(client.clone());
        let source = Source {
            service: service.into(),
            instance: instance_id(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        Self {
            service,
            publisher: Publisher::new(js.clone(), source),
            js,
            client,
            ready,
        }
    }

    /// Finishes a service's life on the bus: flushes what was published and
    /// drains subscriptions.
    pub async fn drain(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::warn!(service = self.service, error = %err, "flush on shutdown failed");
        }
        if let Err(err) = self.client.drain().await {
            tracing::warn!(service = self.service, error = %err, "drain on shutdown failed");
        }
    }
}

pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("{host}-{}", std::process::id())
}

pub type ServiceError = Box<dyn std::error::Error + Send + Sync>;
type ServiceFuture = Pin<Box<dyn Future<Output = Result<(), ServiceError>> + Send>>;

/// A service ready to be started by [`host`].
pub struct Launcher {
    pub name: &'static str,
    start: Box<dyn FnOnce(ServiceContext, CancellationToken) -> ServiceFuture + Send>,
}

impl Launcher {
    pub fn new<F, Fut, E>(name: &'static str, start: F) -> Self
    where
        F: FnOnce(ServiceContext, CancellationToken) -> Fut + Send + 'static,
        Fut: Future<Output = Result<(), E>> + Send + 'static,
        E: std::error::Error + Send + Sync + 'static,
    {
        Self {
            name,
            start: Box::new(move |ctx, token| {
                Box::pin(async move {
                    start(ctx, token)
                        .await
                        .map_err(|e| Box::new(e) as ServiceError)
                })
            }),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot listen for ops on {addr}: {source}")]
    OpsListen {
        addr: SocketAddr,
        source: std::io::Error,
    },
    #[error("service {name} failed: {source}")]
    Service {
        name: &'static str,
        source: ServiceError,
    },
}

/// Runs `services` in this process until `shutdown` resolves or one of them
/// fails; then stops all of them and waits for each to finish.
pub async fn host(
    nats_url: &str,
    ops_listen: SocketAddr,
    services: Vec<Launcher>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HostError> {
    let readiness = Readiness::default();
    let token = CancellationToken::new();
    let listener = tokio::net::TcpListener::bind(ops_listen)
        .await
        .map_err(|source| HostError::OpsListen {
            addr: ops_listen,
            source,
        })?;
    let ops_token = token.clone();
    let ops_server = tokio::spawn({
        let app = ops::router(readiness.clone());
        async move {
            let _ = axum::serve(listener, app)
                .with_graceful_shutdown(ops_token.cancelled_owned())
                .await;
        }
    });

    let mut running = tokio::task::JoinSet::new();
    for launcher in services {
        let ready = readiness.component(launcher.name);
        let connected = readiness.component(&format!("{} (nats)", launcher.name));
        let status_readiness = readiness.clone();
        let token = token.clone();
        let url = nats_url.to_owned();
        running.spawn(async move {
            let name = launcher.name;
            let client_name = format!("pushbus-{name}");
            let Some(client) =
                bus::connect(&url, &client_name, token.clone().cancelled_owned()).await
            else {
                return (name, Ok(()));
            };
            tokio::spawn(follow_connection(client.clone(), connected, token.clone()));
            tokio::spawn(crate::status::announce(
                client.clone(),
                name,
                status_readiness,
                token.clone(),
            ));
            tracing::info!(service = name, "starting");
            let ctx = ServiceContext::new(name, client, ready);
            let result = (launcher.start)(ctx, token).await;
            (name, result)
        });
    }

    tokio::pin!(shutdown);
    let mut failure = None;
    tokio::select! {
        _ = &mut shutdown => tracing::info!("shutting down"),
        Some(joined) = running.join_next() => {
            failure = check(joined);
        }
    }
    token.cancel();
    while let Some(joined) = running.join_next().await {
        if let Some(err) = check(joined) {
            failure.get_or_insert(err);
        }
    }
    let _ = ops_server.await;
    failure.map_or(Ok(()), Err)
}

/// A service without its bus is not ready, whatever it loaded: /readyz
/// says so while the connection is down and again once it is back.
async fn follow_connection(client: async_nats::Client, flag: ReadyFlag, stop: CancellationToken) {
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(200));
    loop {
        flag.set(client.connection_state() == async_nats::connection::State::Connected);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tick.tick() => {}
        }
    }
}

fn check(
    joined: Result<(&'static str, Result<(), ServiceError>), tokio::task::JoinError>,
) -> Option<HostError> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::info!(service = name, "stopped");
            None
        }
        Ok((name, Err(source))) => {
            tracing::error!(service = name, error = %source, "service failed");
            Some(HostError::Service { name, source })
        }
        Err(err) => Some(HostError::Service {
            name: "unknown",
            source: Box::new(err),
        }),
    }
}

/// A token cancelled when `shutdown` resolves, to fan one shutdown out to
/// a service's tasks.
pub fn cancel_on(shutdown: impl Future<Output = ()> + Send + 'static) -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown.await;
        cancel.cancel();
    });
    token
}

/// The whole `main` of a single-service binary after parsing its flags.
pub async fn run_single(
    name: &'static str,
    nats: &NatsArgs,
    ops: &OpsArgs,
    launcher: Launcher,
) -> Result<(), HostError> {
    crate::telemetry::init(name, ops.log_json);
    let hosted = host(
        nats.url(),
        ops.ops_listen,
        vec![launcher],
        shutdown_signal(),
    )
    .await;
    crate::telemetry::shutdown();
    hosted
}

/// Resolves on SIGTERM or SIGINT.
pub async fn shutdown_signal() {
    let ctrl_c = async {
        let _ = tokio::signal::ctrl_c().await;
    };
    #[cfg(unix)]
    let term = async {
        match tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate()) {
            Ok(mut s) => {
                s.recv().await;
            }
            Err(_) => std::future::pending::<()>().await,
        }
    };
    #[cfg(not(unix))]
    let term = std::future::pending::<()>();
    tokio::select! {
        _ = ctrl_c => {},
        _ = term => {},
    }
}
