//! What a host hands each service: its NATS connection, a publisher
//! stamped with its identity, its readiness switch and topology settings.

use async_nats::jetstream;

use super::BusConfig;
use crate::bus::Publisher;
use crate::ops::ReadyFlag;
use crate::proto::Source;
use crate::topology::{Topology, TopologyArgs};

/// What a service gets from its host: its own NATS connection, a publisher
/// stamped with its identity, and its readiness switch.
#[derive(Clone)]
pub struct ServiceContext {
    pub service: &'static str,
    pub client: async_nats::Client,
    pub js: jetstream::Context,
    pub publisher: Publisher,
    pub ready: ReadyFlag,
    /// Replicas and limits for what this service creates.
    pub topology: TopologyArgs,
}

impl ServiceContext {
    /// `service`'s context on `client`, with `bus`'s topology and header
    /// settings.
    pub fn new(
        service: &'static str,
        client: async_nats::Client,
        ready: ReadyFlag,
        bus: &BusConfig,
    ) -> Self {
        let js = jetstream::new(client.clone());
        let source = Source {
            service: service.into(),
            instance: instance_id(),
            version: env!("CARGO_PKG_VERSION").into(),
        };
        let mut publisher = Publisher::new(js.clone(), source);
        if bus.no_cloudevents {
            publisher = publisher.without_cloud_events();
        }
        Self {
            service,
            publisher,
            js,
            client,
            ready,
            topology: bus.topology.clone(),
        }
    }

    /// Creates what `topology` lists and is missing, at this host's
    /// replicas and limits; logs (never reverts) what an operator changed.
    pub async fn ensure(
        &self,
        topology: Topology,
    ) -> Result<Vec<crate::topology::Drift>, crate::topology::TopologyError> {
        topology.with(&self.topology).ensure(&self.js).await
    }

    /// Opens KV bucket `name` (its topology created it).
    pub async fn bucket(
        &self,
        name: &str,
    ) -> Result<jetstream::kv::Store, crate::topology::TopologyError> {
        crate::topology::bucket(&self.js, name).await
    }

    /// Finishes a service's life on the bus: flushes what was published and
    /// drains subscriptions.
    pub async fn drain(&self) {
        if let Err(err) = self.client.flush().await {
            tracing::warn!(service = self.service, error = %err, "flush on shutdown failed");
        }
        if let Err(err) = self.client.drain().await {
            tracing::warn!(service = self.service, error = %err, "drain on shutdown failed");
        }
    }
}

pub fn instance_id() -> String {
    let host = std::env::var("HOSTNAME").unwrap_or_else(|_| "local".into());
    format!("{host}-{}", std::process::id())
}
