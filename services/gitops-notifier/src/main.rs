use clap::Parser;
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs};

/// pushbus gitops-notifier: streams pokes to connected agents.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    notifier: pushbus_gitops_notifier::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.notifier;
    let launcher = Launcher::new("gitops-notifier", move |ctx, token| {
        pushbus_gitops_notifier::run(ctx, config, token.cancelled_owned())
    });
    service::run_single("gitops-notifier", &cli.nats, &cli.ops, launcher).await?;
    Ok(())
}
