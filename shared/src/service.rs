//! Hosting services in a process: common flags, one NATS connection per
//! service, the ops server, and shutdown on SIGTERM/SIGINT.

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use async_nats::jetstream;
use tokio_util::sync::CancellationToken;

use crate::bus::{self, Publisher};
use crate::ops::{self, Readiness, ReadyFlag};
use crate::proto::Source;

pub use crate::bus::DEFAULT_NATS_URL;
use crate::bus::{ConnectConfig, ConnectConfigError, ConnectFlags};
use crate::topology::TopologyArgs;

/// How to reach NATS, and the replicas and limits of what pushbus creates
/// there. Global: `pushbus agents list --nats-url …` works like `pushbus
/// run --nats-url …`. Secrets are only ever read from files.
#[derive(clap::Args, Clone, Debug, Default)]
pub struct NatsArgs {
    /// NATS seed servers, comma-separated (`nats://host:4222` or `tls://…`).
    #[arg(long = "nats-url", env = "PUSHBUS_NATS_URL", global = true)]
    pub nats_url: Option<String>,
    /// A `.creds` file (JWT and nkey seed, operator mode).
    #[arg(long = "nats-creds", env = "PUSHBUS_NATS_CREDS", global = true)]
    pub nats_creds: Option<PathBuf>,
    /// A file holding an nkey seed.
    #[arg(long = "nats-nkey", env = "PUSHBUS_NATS_NKEY", global = true)]
    pub nats_nkey: Option<PathBuf>,
    /// User name (with --nats-password-file).
    #[arg(long = "nats-user", env = "PUSHBUS_NATS_USER", global = true)]
    pub nats_user: Option<String>,
    /// A file holding the password of --nats-user.
    #[arg(
        long = "nats-password-file",
        env = "PUSHBUS_NATS_PASSWORD_FILE",
        global = true
    )]
    pub nats_password_file: Option<PathBuf>,
    /// A file holding an authentication token.
    #[arg(
        long = "nats-token-file",
        env = "PUSHBUS_NATS_TOKEN_FILE",
        global = true
    )]
    pub nats_token_file: Option<PathBuf>,
    /// CA certificate (PEM) to verify the servers with; implies TLS.
    #[arg(long = "nats-tls-ca", env = "PUSHBUS_NATS_TLS_CA", global = true)]
    pub nats_tls_ca: Option<PathBuf>,
    /// Client certificate (PEM) for mutual TLS, with --nats-tls-key.
    #[arg(long = "nats-tls-cert", env = "PUSHBUS_NATS_TLS_CERT", global = true)]
    pub nats_tls_cert: Option<PathBuf>,
    /// Client key (PEM) for mutual TLS.
    #[arg(long = "nats-tls-key", env = "PUSHBUS_NATS_TLS_KEY", global = true)]
    pub nats_tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub topology: TopologyArgs,
}

impl NatsArgs {
    /// The seed list as given (or the default), for messages: never any
    /// credentials.
    pub fn url(&self) -> String {
        crate::bus::redact_url(self.nats_url.as_deref().unwrap_or(DEFAULT_NATS_URL))
    }

    /// Validates the flags and reads the secret files.
    pub fn connect_config(&self) -> Result<ConnectConfig, ConnectConfigError> {
        self.connect_config_or(DEFAULT_NATS_URL)
    }

    /// Same, with `url` when no --nats-url was given (the embedded server).
    pub fn connect_config_or(&self, url: &str) -> Result<ConnectConfig, ConnectConfigError> {
        ConnectFlags {
            url: self.nats_url.clone(),
            creds: self.nats_creds.clone(),
            nkey: self.nats_nkey.clone(),
            user: self.nats_user.clone(),
            password_file: self.nats_password_file.clone(),
            token_file: self.nats_token_file.clone(),
            tls_ca: self.nats_tls_ca.clone(),
            tls_cert: self.nats_tls_cert.clone(),
            tls_key: self.nats_tls_key.clone(),
        }
        .resolve(url)
    }

    /// Everything `host` needs from these flags.
    pub fn bus(&self) -> Result<BusConfig, ConnectConfigError> {
        Ok(BusConfig {
            connect: self.connect_config()?,
            topology: self.topology.clone(),
        })
    }
}

/// How services reach the bus and what they create there.
#[derive(Clone, Debug, Default)]
pub struct BusConfig {
    pub connect: ConnectConfig,
    pub topology: TopologyArgs,
}

impl From<&str> for BusConfig {
    fn from(urls: &str) -> Self {
        Self {
            connect: ConnectConfig::plain(urls),
            topology: TopologyArgs::default(),
        }
    }
}

impl From<&String> for BusConfig {
    fn from(urls: &String) -> Self {
        urls.as_str().into()
    }
}

impl From<String> for BusConfig {
    fn from(urls: String) -> Self {
        urls.as_str().into()
    }
}

impl From<&BusConfig> for BusConfig {
    fn from(b: &BusConfig) -> Self {
        b.clone()
    }
}

impl From<ConnectConfig> for BusConfig {
    fn from(connect: ConnectConfig) -> Self {
        Self {
            connect,
            topology: TopologyArgs::default(),
        }
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
    /// Replicas and limits for what this service creates.
    pub topology: TopologyArgs,
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
            topology: TopologyArgs::default(),
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
    #[error("service {name} cannot use nats: {source}")]
    Connect {
        name: &'static str,
        source: crate::bus::ConnectError,
    },
    #[error("invalid nats settings: {0}")]
    Config(#[from] ConnectConfigError),
    #[error("service {name} failed: {source}")]
    Service {
        name: &'static str,
        source: ServiceError,
    },
}

/// Runs `services` in this process until `shutdown` resolves or one of them
/// fails; then stops all of them and waits for each to finish.
pub async fn host(
    bus: impl Into<BusConfig>,
    ops_listen: SocketAddr,
    services: Vec<Launcher>,
    shutdown: impl Future<Output = ()> + Send,
) -> Result<(), HostError> {
    let bus: BusConfig = bus.into();
    // A bad seed list fails start-up, not each service's reconnect loop.
    bus.connect.server_addrs()?;
    tracing::info!(nats = %bus.connect.servers_for_log(), auth = %bus.connect.auth.describe(), "nats settings");
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
        let bus = bus.clone();
        running.spawn(async move {
            let name = launcher.name;
            let client_name = format!("pushbus-{name}");
            let client =
                match bus::connect(&bus.connect, &client_name, token.clone().cancelled_owned())
                    .await
                {
                    Ok(Some(client)) => client,
                    Ok(None) => return (name, Ok(())),
                    Err(source) => return (name, Err(ServiceFailure::Connect(source))),
                };
            tokio::spawn(follow_connection(client.clone(), connected, token.clone()));
            tokio::spawn(crate::status::announce(
                client.clone(),
                name,
                status_readiness,
                token.clone(),
            ));
            tracing::info!(service = name, "starting");
            let mut ctx = ServiceContext::new(name, client, ready);
            ctx.topology = bus.topology.clone();
            let result = (launcher.start)(ctx, token).await;
            (name, result.map_err(ServiceFailure::Run))
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

enum ServiceFailure {
    Connect(bus::ConnectError),
    Run(ServiceError),
}

fn check(
    joined: Result<(&'static str, Result<(), ServiceFailure>), tokio::task::JoinError>,
) -> Option<HostError> {
    match joined {
        Ok((name, Ok(()))) => {
            tracing::info!(service = name, "stopped");
            None
        }
        Ok((name, Err(ServiceFailure::Connect(source)))) => {
            tracing::error!(service = name, error = %source, "cannot use nats");
            Some(HostError::Connect { name, source })
        }
        Ok((name, Err(ServiceFailure::Run(source)))) => {
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
        nats.bus()?,
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
