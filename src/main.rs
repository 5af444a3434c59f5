//! `pushbus`: runs any set of services in one process, and carries the
//! operator commands (setup, agents, the post-receive hook).

mod agents;
mod dlq;
mod embedded;
mod events;
mod geo;
mod run;
mod show;
mod status;

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
    Setup {
        #[command(flatten)]
        routes: pushbus_hook_ingest::routes::RouteTtlArgs,
    },
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
        command: HookCommand,
    },
}

#[derive(Subcommand)]
enum EventsCommand {
    /// Print every new message of the given subjects (default: pushes,
    /// pokes, webhook jobs) with its envelope and payload decoded.
    Tail(events::TailArgs),
}

#[derive(Subcommand)]
enum HookCommand {
    /// Forward git's post-receive input to hook-ingest; prints the messages
    /// for the pusher on stderr. Always exits 0: a push is never failed.
    PostReceive(pushbus_hook_ingest::hook::HookArgs),
    /// Replay notifications spooled while hook-ingest was unreachable.
    Flush(pushbus_hook_ingest::hook::HookArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    match cli.command {
        Command::Run(args) => run::run(*args, cli.nats).await,
        Command::Setup { routes } => {
            let nats = cli.nats;
            let client = connect(&nats, "pushbus-setup").await?;
            let js = async_nats::jetstream::new(client);
            // The configured route TTL, not the default, so setup and
            // hook-ingest do not undo each other's bucket settings (merge
            // keeps the first definition of a bucket).
            pushbus_hook_ingest::topology_with(&routes)
                .merge(run::full_topology())
                .with(&nats.topology)
                .apply(&js)
                .await?;
            eprintln!(
                "pushbus topology is in place on {} (replicas {})",
                nats.url(),
                nats.topology.replicas
            );
            Ok(())
        }
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
        Command::Hook {
            command: HookCommand::PostReceive(args),
        } => {
            post_receive(args).await;
            Ok(())
        }
        Command::Hook {
            command: HookCommand::Flush(args),
        } => {
            let env = std::env::vars().collect();
            let report = pushbus_hook_ingest::hook::flush(&args, &env)
                .await
                .map_err(anyhow::Error::msg)?;
            for line in &report.lines {
                eprintln!("{line}");
            }
            eprintln!(
                "pushbus: {} spooled notification(s) delivered, {} left, {} expired",
                report.delivered, report.left, report.expired
            );
            if report.left > 0 {
                if let Some(why) = &report.stopped {
                    eprintln!("pushbus: stopped: {why}");
                }
                anyhow::bail!("hook-ingest still unreachable");
            }
            Ok(())
        }
    }
}

/// One attempt, for commands: a refusal names the servers and the method.
pub async fn connect(nats: &NatsArgs, name: &str) -> anyhow::Result<async_nats::Client> {
    let config = nats.connect_config()?;
    Ok(pushbus_shared::bus::connect_once(&config, name).await?)
}

async fn post_receive(args: pushbus_hook_ingest::hook::HookArgs) {
    use tokio::io::AsyncReadExt;
    let mut stdin = String::new();
    if let Err(err) = tokio::io::stdin().read_to_string(&mut stdin).await {
        eprintln!("pushbus: cannot read the hook's input: {err}");
        return;
    }
    let env = std::env::vars().collect();
    let outcome = pushbus_hook_ingest::hook::post_receive(&args, &stdin, &env).await;
    for line in outcome.lines {
        eprintln!("{line}");
    }
}
