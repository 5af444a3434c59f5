use clap::Parser;
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs};

/// pushbus hook-ingest: receives post-receive notifications and stores them as events.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    ingest: pushbus_hook_ingest::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.ingest;
    let launcher = Launcher::new("hook-ingest", move |ctx, token| {
        pushbus_hook_ingest::run(ctx, config, token.cancelled_owned())
    });
    service::run_single("hook-ingest", &cli.nats, &cli.ops, launcher).await?;
    Ok(())
}
