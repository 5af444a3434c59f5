//! `pushbus setup`: the one writer of stream, bucket and consumer
//! configuration. Services create what is missing; this also updates what
//! exists (replicas, limits) to the flags given.

use pushbus_filter::Filter;
use pushbus_gitops_notifier::GitopsNotifier;
use pushbus_replication_lag::ReplicationLag;
use pushbus_shared::service::{NatsArgs, Service};
use pushbus_shared::topology::Topology;

#[derive(clap::Args)]
pub struct SetupArgs {
    #[command(flatten)]
    routes: pushbus_hook_ingest::geo_routes::RouteTtlArgs,
}

pub async fn run(nats: &NatsArgs, args: SetupArgs) -> anyhow::Result<()> {
    let client = crate::connect(nats, "pushbus-setup").await?;
    let js = async_nats::jetstream::new(client);
    // The configured route TTL, not the default, so setup and hook-ingest do
    // not undo each other's bucket settings (merge keeps the first
    // definition of a bucket).
    pushbus_hook_ingest::topology_with(&args.routes)
        .merge(full_topology())
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

/// Everything every service needs, with their flags' defaults.
pub fn full_topology() -> Topology {
    pushbus_hook_ingest::topology()
        .merge(Filter::topology(&Default::default()))
        .merge(GitopsNotifier::topology(&Default::default()))
        .merge(ReplicationLag::topology(&Default::default()))
}
