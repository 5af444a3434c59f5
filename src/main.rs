//! `pushbus`: runs any set of services in one process, and carries the
//! operator commands (setup, agents, the post-receive hook).

mod agents;
mod dlq;
mod embedded;
mod events;
mod geo;
mod hook;
mod run;
mod setup;
mod show;
mod status;

use std::process::ExitCode;

use clap::{Parser, Subcommand};
use pushbus_shared::service::NatsArgs;

#[derive(Parser)]
#[command(
    name = "pushbus",
    version,
    about = "Git push notifications over NATS JetStream"
)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run services in this process: `all` or a comma-separated list of
    /// hook-ingest, filter, gitops-notifier, replication-lag.
    Run(Box<run::RunArgs>),
    /// Create or update every stream, KV bucket and consumer, then exit.
    Setup(setup::SetupArgs),
    /// Manage agent registrations (KV bucket pushbus-agents).
    Agents {
        #[command(subcommand)]
        command: agents::AgentsCommand,
    },
    /// Manage Geo nodes (KV pushbus-geo-nodes) and correlation-ID routes
    /// (KV pushbus-geo-push-routes).
    Geo {
        #[command(subcommand)]
        command: geo::GeoCommand,
    },
    /// Follow the streams, every message decoded (`events tail`).
    Events {
        #[command(subcommand)]
        command: EventsCommand,
    },
    /// Dead letters in PUSHBUS_DLQ: list, show, replay, purge.
    Dlq {
        #[command(subcommand)]
        command: dlq::DlqCommand,
    },
    /// Streams, consumers and their backlog, dead letters, and every running
    /// service instance (agents connected, readiness, last error).
    Status {
        #[command(flatten)]
        args: status::StatusArgs,
    },
    /// Git hook commands, run by a bare repository.
    Hook {
        #[command(subcommand)]
        command: hook::HookCommand,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print every new message of the given subjects (default: pushes,
    /// pokes, webhook jobs) with its envelope and payload decoded.
    Tail(events::TailArgs),
}

#[tokio::main]
async fn main() -> ExitCode {
    pushbus_shared::error::exit_code(dispatch(Cli::parse()).await.err().as_deref())
}

async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    match cli.command {
        Command::Run(args) => run::run(*args, cli.nats).await,
        Command::Setup(args) => setup::run(&cli.nats, args).await,
        Command::Agents { command } => agents::run(&cli.nats, command).await,
        Command::Geo { command } => geo::run(&cli.nats, command).await,
        Command::Events { command } => {
            let EventsCommand::Tail(args) = command;
            let client = connect(&cli.nats, "pushbus-events").await?;
            events::tail(async_nats::jetstream::new(client), args).await
        }
        Command::Dlq { command } => {
            let client = connect(&cli.nats, "pushbus-dlq").await?;
            dlq::run(async_nats::jetstream::new(client), command).await
        }
        Command::Status { args } => {
            status::run(connect(&cli.nats, "pushbus-status").await?, args).await
        }
        Command::Hook { command } => hook::run(command).await,
    }
}

/// One attempt, for commands: a refusal names the servers and the method.
pub async fn connect(nats: &NatsArgs, name: &str) -> anyhow::Result<async_nats::Client> {
    let config = nats.connect_config()?;
    Ok(pushbus_shared::bus::connect_once(&config, name).await?)
}
