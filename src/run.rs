//! `pushbus run`: any subset of the services in one process.

use anyhow::{Context, bail};
use pushbus_filter::Filter;
use pushbus_gitops_notifier::GitopsNotifier;
use pushbus_hook_ingest::HookIngest;
use pushbus_replication_lag::ReplicationLag;
use pushbus_shared::service::{self, Launcher, NatsArgs, OpsArgs, Service};

/// Every service `pushbus run` can host, in start order, and how it is
/// started from the flags: the one list of names.
const SERVICES: [(&str, StartFrom); 4] = [
    (HookIngest::NAME, |a| {
        Launcher::service::<HookIngest>(a.ingest.clone())
    }),
    (Filter::NAME, |a| {
        Launcher::service::<Filter>(a.filter.clone())
    }),
    (GitopsNotifier::NAME, |a| {
        Launcher::service::<GitopsNotifier>(a.notifier.clone())
    }),
    (ReplicationLag::NAME, |a| {
        Launcher::service::<ReplicationLag>(a.lag.clone())
    }),
];

/// Builds a service's launcher from `pushbus run`'s flags.
type StartFrom = fn(&RunArgs) -> Launcher;

fn service_names() -> String {
    SERVICES.map(|(name, _)| name).join(", ")
}

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
fn parse_services(list: &str) -> anyhow::Result<Vec<&'static str>> {
    let mut chosen = Vec::new();
    for name in list.split(',').map(str::trim).filter(|s| !s.is_empty()) {
        if name == "all" {
            return Ok(SERVICES.map(|(name, _)| name).to_vec());
        }
        match SERVICES.iter().find(|(s, _)| *s == name) {
            Some((s, _)) if !chosen.contains(s) => chosen.push(*s),
            Some(_) => {}
            None => bail!(
                "unknown service {name:?}; expected all or some of {}",
                service_names()
            ),
        }
    }
    if chosen.is_empty() {
        bail!(
            "no service named; expected all or some of {}",
            service_names()
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
            (nats.bus_or(&server.url())?, Some(server))
        }
    };
    let launchers = SERVICES
        .iter()
        .filter(|(name, _)| names.contains(name))
        .map(|(_, start)| start(&args))
        .collect();
    tracing::info!(nats = %bus.connect.servers_for_log(), "pushbus starting");
    let hosted = service::host(
        bus,
        args.ops.ops_listen,
        launchers,
        service::shutdown_token(),
    )
    .await;
    pushbus_shared::telemetry::shutdown();
    hosted?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn service_lists() {
        assert_eq!(
            parse_services("all").unwrap(),
            vec![
                "hook-ingest",
                "filter",
                "gitops-notifier",
                "replication-lag"
            ]
        );
        assert_eq!(
            parse_services("filter, hook-ingest").unwrap(),
            vec!["filter", "hook-ingest"]
        );
        let unknown = parse_services("filter,bogus").unwrap_err().to_string();
        assert!(
            unknown.contains("\"bogus\"") && unknown.contains("replication-lag"),
            "{unknown}"
        );
        assert!(parse_services("").is_err());
    }
}
