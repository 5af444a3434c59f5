//! Hosting services in a process: one NATS connection per service, the ops
//! server, and one shutdown for all of them.
use clap::{CommandFactory, FromArgMatches};
use tokio_util::sync::CancellationToken;

use super::{
    BusConfig, Launcher, Listen, NatsArgs, OpsArgs, Service, ServiceContext, ServiceError,
};
use crate::bus;
use crate::bus::ConnectConfigError;
use crate::ops::{self, Readiness, ReadyFlag};

#[derive(Debug, thiserror::Error)]
pub enum HostError {
    #[error("cannot serve ops: {0}")]
    OpsListen(#[source] super::ListenError),
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

/// Runs `services` in this process until `shutdown` is cancelled or one of
/// them fails; then stops all of them and waits for each to finish.
pub async fn host(
    bus: impl Into<BusConfig>,
    ops: impl Into<Listen>,
    services: Vec<Launcher>,
    shutdown: CancellationToken,
) -> Result<(), HostError> {
    let bus: BusConfig = bus.into();
    // A bad seed list fails start-up, not each service's reconnect loop.
    bus.connect.server_addrs()?;
    tracing::info!(nats = %bus.connect.servers_for_log(), auth = %bus.connect.auth.describe(), "nats settings");
    let readiness = Readiness::default();
    // A child of `shutdown`: a failing service stops the others without
    // cancelling the caller's token.
    let token = shutdown.child_token();
    let listener = ops.into().bind().await.map_err(HostError::OpsListen)?;
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
            let ctx = ServiceContext::new(name, client, ready, &bus);
            let result = (launcher.start)(ctx, token).await;
            (name, result.map_err(ServiceFailure::Run))
        });
    }

    let mut failure = None;
    tokio::select! {
        _ = token.cancelled() => tracing::info!("shutting down"),
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

/// The flags of a single-service binary.
#[derive(clap::Parser)]
struct SingleCli<C: clap::Args> {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    config: C,
}

/// The whole `main` of a single-service binary: parses its flags, runs it
/// until SIGTERM or SIGINT.
pub async fn run_single<S: Service>() -> Result<(), HostError> {
    let command = SingleCli::<S::Config>::command()
        .name(S::NAME)
        .about(S::ABOUT)
        .version(env!("CARGO_PKG_VERSION"));
    let cli = match SingleCli::<S::Config>::from_arg_matches(&command.get_matches()) {
        Ok(cli) => cli,
        Err(err) => err.exit(),
    };
    crate::telemetry::init(S::NAME, cli.ops.log_json);
    let hosted = host(
        cli.nats.bus()?,
        cli.ops.ops_listen,
        vec![Launcher::service::<S>(cli.config)],
        shutdown_token(),
    )
    .await;
    crate::telemetry::shutdown();
    hosted
}

/// A token cancelled on SIGTERM or SIGINT.
pub fn shutdown_token() -> CancellationToken {
    let token = CancellationToken::new();
    let cancel = token.clone();
    tokio::spawn(async move {
        shutdown_signal().await;
        cancel.cancel();
    });
    token
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
