//! `pushbus run`: any subset of the services in one process.

use anyhow::{Context, bail};
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs};
use pushbus_shared::topology::Topology;

pub const SERVICES: [&str; 4] = [
    "hook-ingest",
    "filter",
    "gitops-notifier",
    "replication-lag",
];

#[derive(clap::Args)]
pub struct RunArgs {
    /// Services to run: "all", or a comma-separated subset of hook-ingest,
    /// filter, gitops-notifier, replication-lag.
    #[arg(default_value = "all", value_name = "SERVICES")]
    services: String,
    #[command(flatten)]
    embedded: crate::embedded::EmbeddedArgs,
    #[command(flatten)]
    ops: OpsArgs,
    #[command(flatten)]
    ingest: pushbus_hook_ingest::Config,
    #[command(flatten)]
    filter: pushbus_filter::Config,
    #[command(flatten)]
    notifier: pushbus_gitops_notifier::Config,
    #[command(flatten)]
    lag: pushbus_replication_lag::Config,
}

/// Validates the list before anything starts: an unknown name fails start-up.
pub fn parse_services(list: &str) -> anyhow::Result<Vec<&'static str>> {
    let mut chosen = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            return Ok(SERVICES.to_vec());
        }
        match SERVICES.iter().find(|s| **s == name) {
            Some(s) if !chosen.contains(s) => chosen.push(*s),
            Some(_) => {}
            None => bail!(
                "unknown service {name:?}; expected all or some of {}",
                SERVICES.join(", ")
            ),
        }
    }
    if chosen.is_empty() {
        bail!(
            "no service named; expected all or some of {}",
            SERVICES.join(", ")
        );
    }
    Ok(chosen)
}

pub async fn run(args: RunArgs, nats: NatsArgs) -> anyhow::Result<()> {
    let names = parse_services(&args.services)?;
    // One service: its traces are that service's; several: "pushbus".
    let telemetry_name = match names.as_slice() {
        [one] => *one,
        _ => "pushbus",
    };
    pushbus_shared::telemetry::init(telemetry_name, args.ops.log_json);
    // No NATS configured: start one for a laptop.
    let (bus, _embedded) = match &nats.nats_url {
        Some(_) => (nats.bus()?, None),
        None => {
            let server = crate::embedded::start(&args.embedded)
                .context("starting the embedded nats-server")?;
            let bus = service::BusConfig {
                connect: nats.connect_config_or(&server.url())?,
                topology: nats.topology.clone(),
            };
            (bus, Some(server))
        }
    };
    let mut launchers = Vec::new();
    for name in names {
        launchers.push(match name {
            "hook-ingest" => {
                let c = args.ingest.clone();
                Launcher::new(name, move |ctx, t| {
                    pushbus_hook_ingest::run(ctx, c, t.cancelled_owned())
                })
            }
            "filter" => {
                let c = args.filter.clone();
                Launcher::new(name, move |ctx, t| {
                    pushbus_filter::run(ctx, c, t.cancelled_owned())
                })
            }
            "gitops-notifier" => {
                let c = args.notifier.clone();
                Launcher::new(name, move |ctx, t| {
                    pushbus_gitops_notifier::run(ctx, c, t.cancelled_owned())
                })
            }
            _ => {
                let c = args.lag.clone();
                Launcher::new(name, move |ctx, t| {
                    pushbus_replication_lag::run(ctx, c, t.cancelled_owned())
                })
            }
        });
    }
    tracing::info!(nats = %bus.connect.servers_for_log(), "pushbus starting");
    let hosted = service::host(
        bus,
        args.ops.ops_listen,
        launchers,
        service::shutdown_signal(),
    )
    .await;
    pushbus_shared::telemetry::shutdown();
    hosted?;
    Ok(())
}

/// Everything every service needs, for `pushbus setup`.
pub fn full_topology() -> Topology {
    pushbus_hook_ingest::topology()
        .merge(pushbus_filter::topology(&pushbus_filter::Config::default()))
        .merge(pushbus_gitops_notifier::topology(
            &pushbus_gitops_notifier::Config::default(),
        ))
        .merge(pushbus_replication_lag::topology())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lists() {
        assert_eq!(parse_services("all").unwrap(), SERVICES.to_vec());
        assert_eq!(
            parse_services("filter, hook-ingest").unwrap(),
            vec!["filter", "hook-ingest"]
        );
        assert!(parse_services("filter,bogus").is_err());
        assert!(parse_services("").is_err());
    }
}
