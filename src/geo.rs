//! `pushbus geo nodes add|list|remove` (KV bucket pushbus-geo-nodes) and
//! `pushbus geo route` (KV bucket pushbus-geo-push-routes).

use pushbus_hook_ingest::geo_routes::{self, RouteTtlArgs};
use pushbus_replication_lag::nodes;
use pushbus_shared::proto::GeoNode;
use pushbus_shared::service::NatsArgs;
use pushbus_shared::topology;

#[derive(clap::Subcommand)]
pub enum GeoCommand {
    /// Manage the Geo node registry.
    Nodes {
        #[command(subcommand)]
        command: NodesCommand,
    },
    /// Store correlation ID -> node ID for a push whose front end cannot pass
    /// the node itself (expires after --geo-route-ttl-secs).
    Route {
        correlation_id: String,
        node_id: String,
        #[command(flatten)]
        ttl: RouteTtlArgs,
    },
}

#[derive(clap::Subcommand)]
pub enum NodesCommand {
    /// Register or replace a node. At most one node may be primary.
    Add {
        node_id: String,
        #[arg(long, env = "PUSHBUS_GEO_NODE_NAME")]
        name: String,
        #[arg(long, env = "PUSHBUS_GEO_NODE_URL")]
        url: String,
        #[arg(long, env = "PUSHBUS_GEO_NODE_PRIMARY")]
        primary: bool,
    },
    /// List nodes: ID, role, name, URL (tab-separated).
    List,
    /// Remove a node.
    Remove { node_id: String },
}

pub async fn run(nats: &NatsArgs, command: GeoCommand) -> anyhow::Result<()> {
    // Validate before touching the network: a bad node writes nothing.
    if let GeoCommand::Nodes {
        command:
            NodesCommand::Add {
                node_id,
                name,
                url,
                primary,
            },
    } = &command
    {
        nodes::validate(&GeoNode {
            node_id: node_id.clone(),
            name: name.clone(),
            url: url.clone(),
            primary: *primary,
        })?;
    }
    let client = crate::connect(nats, "pushbus-geo").await?;
    let js = async_nats::jetstream::new(client);
    match command {
        GeoCommand::Nodes { command } => {
            let kv = pushbus_shared::topology::open_bucket(
                &js,
                topology::geo_nodes_bucket(),
                &nats.topology,
            )
            .await?;
            match command {
                NodesCommand::Add {
                    node_id,
                    name,
                    url,
                    primary,
                } => {
                    let node = GeoNode {
                        node_id,
                        name,
                        url,
                        primary,
                    };
                    let revision = nodes::put(&kv, &node).await?;
                    eprintln!("Geo node {} stored (revision {revision})", node.node_id);
                }
                NodesCommand::List => {
                    for n in nodes::list(&kv).await? {
                        let role = if n.primary { "primary" } else { "secondary" };
                        println!("{}\t{role}\t{}\t{}", n.node_id, n.name, n.url);
                    }
                }
                NodesCommand::Remove { node_id } => {
                    nodes::remove(&kv, &node_id).await?;
                    eprintln!("Geo node {node_id} removed");
                }
            }
        }
        GeoCommand::Route {
            correlation_id,
            node_id,
            ttl,
        } => {
            let kv = pushbus_shared::topology::open_bucket(
                &js,
                topology::geo_push_routes_bucket(ttl.ttl()),
                &nats.topology,
            )
            .await?;
            geo_routes::store_route(&kv, &correlation_id, &node_id).await?;
            eprintln!(
                "pushes with correlation ID {correlation_id} go through Geo node {node_id} (key {})",
                geo_routes::route_key(&correlation_id)
            );
        }
    }
    Ok(())
}
