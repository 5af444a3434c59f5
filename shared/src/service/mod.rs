//! What every service is: the [`Service`] trait and the flags all of them
//! share. What a host hands each one is [`ServiceContext`] (in `context`);
//! hosting them (connections, the ops server, shutdown) is in [`host`].

mod context;
mod host;

pub use context::{ServiceContext, instance_id};
pub use host::{HostError, host, run_single, shutdown_signal, shutdown_token};

use std::future::Future;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::pin::Pin;

use tokio_util::sync::CancellationToken;

pub use crate::bus::DEFAULT_NATS_URL;
use crate::bus::{ConnectConfig, ConnectConfigError, ConnectFlags};
use crate::topology::{Topology, TopologyArgs};

/// One pushbus service: its name, its flags, what it needs on the bus, and
/// how it runs. The per-service binaries, `pushbus run` and the tests all
/// start services through this one shape.
pub trait Service: 'static {
    /// Its name in `pushbus run`, logs, readiness and NATS client names.
    const NAME: &'static str;
    /// One line for `--help`.
    const ABOUT: &'static str;
    /// Its own flags (each also a `PUSHBUS_…` variable).
    type Config: clap::Args + Clone + Send + 'static;
    /// Where it accepts clients: [`Listen`] for a service with a door, `()`
    /// for one that only talks to the bus.
    type Listener: Send + 'static;
    type Error: std::error::Error + Send + Sync + 'static;

    /// The streams, buckets and consumers it uses.
    fn topology(config: &Self::Config) -> Topology;

    /// The listener its flags ask for.
    fn listener(config: &Self::Config) -> Self::Listener;

    /// Runs until `shutdown` is cancelled, then finishes in-flight work and
    /// drains its connection.
    fn run(
        ctx: ServiceContext,
        config: Self::Config,
        listener: Self::Listener,
        shutdown: CancellationToken,
    ) -> impl Future<Output = Result<(), Self::Error>> + Send;
}

/// The values `C`'s flags default to, as if none were given and no
/// `PUSHBUS_…` variable were set: a config's `Default` is its flags'
/// defaults, written once, on the flags.
pub fn flag_defaults<C: clap::Args + clap::FromArgMatches>() -> C {
    let command = C::augment_args(clap::Command::new("defaults")).mut_args(|arg| arg.env(None));
    command
        .try_get_matches_from(["defaults"])
        .and_then(|matches| C::from_arg_matches(&matches))
        .expect("every flag of a service's config has a default")
}

/// `impl Default` for flag structs, as [`flag_defaults`]: the defaults are
/// written once, on the flags, and never again by hand.
#[macro_export]
macro_rules! default_from_flags {
    ($($config:ty),+ $(,)?) => {$(
        impl ::core::default::Default for $config {
            fn default() -> Self {
                $crate::service::flag_defaults()
            }
        }
    )+};
}

/// Where a door listens: an address bound when the service starts, or a
/// listener the caller bound already (tests bind port 0 and read the
/// address back, so no port is picked and then lost to another process).
#[derive(Debug)]
pub enum Listen {
    At(SocketAddr),
    Bound(tokio::net::TcpListener),
}

impl Listen {
    /// Binds 127.0.0.1 on a free port.
    pub async fn local() -> std::io::Result<Self> {
        tokio::net::TcpListener::bind(("127.0.0.1", 0))
            .await
            .map(Self::Bound)
    }

    /// The address it listens on (for `Bound`, the one the OS gave).
    pub fn addr(&self) -> std::io::Result<SocketAddr> {
        match self {
            Self::At(addr) => Ok(*addr),
            Self::Bound(listener) => listener.local_addr(),
        }
    }

    pub async fn bind(self) -> Result<tokio::net::TcpListener, ListenError> {
        match self {
            Self::At(addr) => tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|source| ListenError { addr, source }),
            Self::Bound(listener) => Ok(listener),
        }
    }
}

impl From<SocketAddr> for Listen {
    fn from(addr: SocketAddr) -> Self {
        Self::At(addr)
    }
}

impl From<tokio::net::TcpListener> for Listen {
    fn from(listener: tokio::net::TcpListener) -> Self {
        Self::Bound(listener)
    }
}

#[derive(Debug, thiserror::Error)]
#[error("cannot listen on {addr}: {source}")]
pub struct ListenError {
    pub addr: SocketAddr,
    #[source]
    pub source: std::io::Error,
}

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
    /// Publish without the CloudEvents `ce-*` headers: smaller messages and
    /// less work for every reader, where nothing reads the bus as
    /// CloudEvents (the envelope and `Pushbus-*` headers carry the same).
    #[arg(
        long = "bus-no-cloudevents",
        env = "PUSHBUS_BUS_NO_CLOUDEVENTS",
        global = true
    )]
    pub no_cloudevents: bool,
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
        self.bus_or(DEFAULT_NATS_URL)
    }

    /// Same, with `url` when no --nats-url was given (the embedded server).
    pub fn bus_or(&self, url: &str) -> Result<BusConfig, ConnectConfigError> {
        Ok(BusConfig {
            connect: self.connect_config_or(url)?,
            topology: self.topology.clone(),
            no_cloudevents: self.no_cloudevents,
        })
    }
}

/// How services reach the bus and what they create there.
#[derive(Clone, Debug, Default)]
pub struct BusConfig {
    pub connect: ConnectConfig,
    pub topology: TopologyArgs,
    /// `--bus-no-cloudevents`: publish without the `ce-*` headers.
    pub no_cloudevents: bool,
}

impl From<&str> for BusConfig {
    fn from(urls: &str) -> Self {
        Self {
            connect: ConnectConfig::plain(urls),
            ..Self::default()
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
            ..Self::default()
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

pub type ServiceError = Box<dyn std::error::Error + Send + Sync>;
type ServiceFuture = Pin<Box<dyn Future<Output = Result<(), ServiceError>> + Send>>;

/// A service ready to be started by [`host`].
pub struct Launcher {
    pub name: &'static str,
    start: Box<dyn FnOnce(ServiceContext, CancellationToken) -> ServiceFuture + Send>,
}

impl Launcher {
    /// `S` with `config`, listening where its flags say.
    pub fn service<S: Service>(config: S::Config) -> Self {
        let listener = S::listener(&config);
        Self::bound::<S>(config, listener)
    }

    /// `S` with `config` and a listener the caller chose.
    pub fn bound<S: Service>(config: S::Config, listener: S::Listener) -> Self {
        Self::new(S::NAME, move |ctx, token| {
            S::run(ctx, config, listener, token)
        })
    }

    /// Any future as a service (the hosting of other programs, benches).
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

#[cfg(test)]
mod tests {
    #[derive(clap::Args, Debug, PartialEq)]
    struct Flags {
        #[arg(long, env = "PUSHBUS_TEST_UNSET_FLAG", default_value_t = 7)]
        count: u32,
        #[arg(long)]
        file: Option<std::path::PathBuf>,
    }

    #[test]
    fn flag_defaults_are_what_the_flags_say() {
        assert_eq!(
            super::flag_defaults::<Flags>(),
            Flags {
                count: 7,
                file: None
            }
        );
    }

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        nats: super::NatsArgs,
    }

    #[test]
    fn cloudevents_headers_stay_unless_switched_off() {
        use clap::Parser;
        let bus = |args: &[&str]| {
            let cli = Cli::try_parse_from(std::iter::once("pushbus").chain(args.iter().copied()));
            cli.unwrap().nats.bus_or("nats://127.0.0.1:4222").unwrap()
        };
        assert!(!bus(&[]).no_cloudevents);
        assert!(bus(&["--bus-no-cloudevents"]).no_cloudevents);
        assert!(!super::BusConfig::from("nats://127.0.0.1:4222").no_cloudevents);
    }
}
