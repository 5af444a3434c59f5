//! replication-lag: answers "how far behind is the Geo secondary this push
//! came through", keyed by the push's own node ID and correlation ID, never
//! by actor and repository.
//!
//! State lives in the streams, not in memory: a node's position is its last
//! `ReplicationStatus` in `PUSHBUS_GEO_STATUS`, and its lag is the age of the
//! oldest push in `PUSHBUS_PUSHES` it has not applied yet.

pub mod config;
pub mod nodes;

use std::time::{Duration, SystemTime};

use async_nats::jetstream::message::StreamMessage;
use async_nats::jetstream::stream::RawMessageErrorKind;
use async_nats::jetstream::{self, kv::Store};
use futures::StreamExt;
use prost::Message;
use pushbus_shared::proto::{
    GeoNode, HookMessage, LagReply, LagRequest, NodeHealth, ReplicationStatus,
};
use pushbus_shared::topology::{self, Topology};
use pushbus_shared::{ServiceContext, envelope, names};
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

pub use config::Config;

/// The NATS micro service name (`nats micro ls` shows it).
pub const SERVICE_NAME: &str = "pushbus-geo-lag";

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Topology(#[from] topology::TopologyError),
    #[error("cannot open {what}: {source}")]
    Open {
        what: &'static str,
        #[source]
        source: async_nats::Error,
    },
}

pub fn topology() -> Topology {
    Topology {
        streams: vec![topology::pushes_stream(), topology::geo_status_stream()],
        buckets: vec![topology::geo_nodes_bucket()],
        consumers: Vec::new(),
    }
}

#[derive(Clone)]
struct Lag {
    nodes: Store,
    pushes: jetstream::stream::Stream,
    statuses: jetstream::stream::Stream,
    config: Config,
}

/// The replication-lag service, for hosts (`Launcher::service::<ReplicationLag>`).
pub struct ReplicationLag;

impl pushbus_shared::service::Service for ReplicationLag {
    const NAME: &'static str = names::SERVICE_REPLICATION_LAG;
    const ABOUT: &'static str =
        "pushbus replication-lag: the Geo replication-lag message for each push";
    type Config = Config;
    type Listener = ();
    type Error = Error;

    fn topology(_: &Config) -> Topology {
        topology()
    }

    fn listener(_: &Config) {}

    async fn run(
        ctx: ServiceContext,
        config: Config,
        (): (),
        shutdown: CancellationToken,
    ) -> Result<(), Error> {
        ctx.ensure(topology()).await?;
        let open =
            |what: &'static str| move |source: async_nats::Error| Error::Open { what, source };
        let lag = Lag {
            nodes: ctx.bucket(names::BUCKET_GEO_NODES).await?,
            pushes: ctx
                .js
                .get_stream(names::STREAM_PUSHES)
                .await
                .map_err(|e| open("pushes")(e.into()))?,
            statuses: ctx
                .js
                .get_stream(names::STREAM_GEO_STATUS)
                .await
                .map_err(|e| open("geo status")(e.into()))?,
            config,
        };
        // A NATS micro service, so `nats micro ls/info/stats` show the
        // responder, its endpoint and its request and error counts.
        use async_nats::service::ServiceExt;
        let service = ctx
            .client
            .service_builder()
            .description("pushbus Geo replication lag: LagRequest -> LagReply (protobuf)")
            .queue_group(names::QUEUE_REPLICATION_LAG)
            .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
            .await
            .map_err(open("lag service"))?;
        let mut requests = service
            .endpoint_builder()
            .name("lag")
            .add(names::SUBJECTS_GEO_LAG)
            .await
            .map_err(open("lag endpoint"))?;
        // Ready only once the server has the subscription: a request right after
        // /readyz (e.g. after a restart) must not meet "no responders".
        ctx.client
            .flush()
            .await
            .map_err(|e| open("lag subscription")(e.into()))?;
        ctx.ready.set(true);
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = requests.next() => match r { Some(r) => r, None => break },
            };
            let lag = lag.clone();
            in_flight.spawn(async move {
            let refusal = |status: &str| async_nats::service::error::Error {
                status: status.to_owned(),
                code: 400,
            };
            let result = match LagRequest::decode(request.message.payload.as_ref()) {
                Ok(req) if envelope::is_valid_correlation_id(&req.correlation_id) => {
                    let span = tracing::info_span!("lag", correlation_id = %req.correlation_id, geo_node_id = %req.geo_node_id);
                    let reply = lag.answer(req).instrument(span).await;
                    Ok(reply.encode_to_vec().into())
                }
                Ok(req) => {
                    tracing::warn!(correlation_id = %req.correlation_id, "lag request with malformed correlation ID refused");
                    Err(refusal("malformed correlation_id"))
                }
                Err(err) => {
                    tracing::warn!(error = %err, "undecodable lag request refused");
                    Err(refusal("undecodable LagRequest"))
                }
            };
            if let Err(err) = request.respond(result).await {
                tracing::warn!(error = %err, "cannot send lag reply");
            }
        });
            while in_flight.try_join_next().is_some() {}
        }
        ctx.ready.set(false);
        drop(requests);
        while in_flight.join_next().await.is_some() {}
        if let Err(err) = service.stop().await {
            tracing::debug!(error = %err, "lag service stop");
        }
        ctx.drain().await;
        Ok(())
    }
}

impl Lag {
    async fn answer(&self, req: LagRequest) -> LagReply {
        let mut reply = LagReply {
            correlation_id: req.correlation_id.clone(),
            geo_node_id: req.geo_node_id.clone(),
            health: NodeHealth::UnknownNode as i32,
            ..Default::default()
        };
        let Some(node) = self.node(&req.geo_node_id).await else {
            tracing::warn!("lag asked for an unknown Geo node");
            return reply;
        };
        if node.primary {
            reply.health = NodeHealth::Healthy as i32;
            reply.lag_seconds = Some(0.0);
            return reply;
        }
        let status = self.last_status(&node.node_id).await;
        let now = SystemTime::now();
        let silent_for = status
            .as_ref()
            .and_then(|s| s.reported_at.and_then(|t| SystemTime::try_from(t).ok()))
            .map(|t| now.duration_since(t).unwrap_or_default());
        let unhealthy_after = Duration::from_secs(self.config.unhealthy_after_seconds);
        let (Some(status), Some(silent_for)) = (status, silent_for) else {
            return self.unhealthy(reply, &node, "has not reported its replication status");
        };
        if silent_for > unhealthy_after {
            let why = format!("has not reported for {} seconds", silent_for.as_secs());
            return self.unhealthy(reply, &node, &why);
        }
        let project_position = status
            .project_applied_sequences
            .get(&req.project_id)
            .copied()
            .filter(|_| req.project_id > 0);
        let push_lag = match project_position {
            Some(applied) => {
                self.oldest_unapplied_in_project(req.project_id, applied, now)
                    .await
            }
            None => {
                self.oldest_unapplied_age(status.applied_sequence, now)
                    .await
            }
        };
        let lag = push_lag + status.db_lag_seconds.unwrap_or(0.0);
        reply.health = NodeHealth::Healthy as i32;
        reply.lag_seconds = Some(lag);
        if lag >= self.config.threshold_seconds {
            reply.messages.push(HookMessage {
                r#type: "basic".into(),
                message: format!("Current replication lag: {} seconds", lag.round() as i64),
            });
        }
        reply
    }

    fn unhealthy(&self, mut reply: LagReply, node: &GeoNode, why: &str) -> LagReply {
        reply.health = NodeHealth::Unhealthy as i32;
        let name = if node.name.is_empty() {
            &node.node_id
        } else {
            &node.name
        };
        reply.messages.push(HookMessage {
            r#type: "alert".into(),
            message: format!(
                "Geo secondary {name} is unhealthy: it {why}; replication lag unknown"
            ),
        });
        reply
    }

    async fn node(&self, node_id: &str) -> Option<GeoNode> {
        if !names::is_valid_token(node_id) {
            return None;
        }
        let bytes = self.nodes.get(node_id).await.ok()??;
        GeoNode::decode(bytes.as_ref()).ok()
    }

    async fn last_status(&self, node_id: &str) -> Option<ReplicationStatus> {
        let msg = self
            .statuses
            .get_last_raw_message_by_subject(&names::geo_status_subject(node_id))
            .await
            .ok()?;
        let env = envelope::decode(&msg.payload).ok()?;
        envelope::open::<ReplicationStatus>(&env).ok()
    }

    /// Seconds since the first push after `applied` was stored; 0 when the
    /// node has applied everything.
    async fn oldest_unapplied_age(&self, applied: u64, now: SystemTime) -> f64 {
        let Ok(info) = self.pushes.get_info().await else {
            return 0.0;
        };
        let state = info.state;
        if applied >= state.last_sequence {
            return 0.0;
        }
        let next = (applied + 1).max(state.first_sequence);
        match self.pushes.get_raw_message(next).await {
            Ok(msg) => age_seconds(&msg, now),
            Err(err) => {
                tracing::warn!(error = %err, sequence = next, "cannot read the oldest unapplied push");
                0.0
            }
        }
    }

    /// Like `oldest_unapplied_age`, counting only `project_id`'s pushes.
    async fn oldest_unapplied_in_project(
        &self,
        project_id: i64,
        applied: u64,
        now: SystemTime,
    ) -> f64 {
        let next = self
            .pushes
            .raw_message_builder()
            .sequence(applied.saturating_add(1))
            .next_by_subject(names::project_push_subjects(project_id))
            .send()
            .await;
        match next {
            Ok(msg) => age_seconds(&msg, now),
            Err(err) if err.kind() == RawMessageErrorKind::NoMessageFound => 0.0,
            Err(err) => {
                tracing::warn!(error = %err, project_id, "cannot read the project's oldest unapplied push");
                0.0
            }
        }
    }
}

/// Seconds since the stream stored `msg`.
fn age_seconds(msg: &StreamMessage, now: SystemTime) -> f64 {
    let stored = msg.time.unix_timestamp_nanos() as f64 / 1e9;
    let now = now
        .duration_since(SystemTime::UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs_f64();
    (now - stored).max(0.0)
}
