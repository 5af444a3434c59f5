use clap::Parser;
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs};

/// pushbus replication-lag: the Geo replication-lag message for each push.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    lag: pushbus_replication_lag::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.lag;
    let launcher = Launcher::new("replication-lag", move |ctx, token| {
        pushbus_replication_lag::run(ctx, config, token.cancelled_owned())
    });
    service::run_single("replication-lag", &cli.nats, &cli.ops, launcher).await?;
    Ok(())
}
