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
    pushbus_shared::telemetry::init("gitops-notifier", cli.ops.log_json);
    let config = cli.notifier;
    let launcher = Launcher::new("gitops-notifier", move |ctx, token| {
        pushbus_gitops_notifier::run(ctx, config, token.cancelled_owned())
    });
    service::host(
        cli.nats.url(),
        cli.ops.ops_listen,
        vec![launcher],
        service::shutdown_signal(),
    )
    .await?;
    Ok(())
}
