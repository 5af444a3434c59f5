use clap::Parser;
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs};

/// pushbus filter: matches pushes against agent watches and emits pokes.
#[derive(Parser)]
#[command(version)]
struct Cli {
    #[command(flatten)]
    nats: NatsArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    filter: pushbus_filter::Config,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    let config = cli.filter;
    let launcher = Launcher::new("filter", move |ctx, token| {
        pushbus_filter::run(ctx, config, token.cancelled_owned())
    });
    service::run_single("filter", &cli.nats, &cli.ops, launcher).await?;
    Ok(())
}
