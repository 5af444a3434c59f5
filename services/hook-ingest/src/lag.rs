//! The replication-lag message for a push that came through a Geo
//! secondary, asked of replication-lag within a fixed budget.

use std::time::Duration;

use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{HookMessage, LagReply, LagRequest};

/// Never fails and never waits past `budget`: without an answer the pusher
/// simply gets no lag message, and the log says why.
pub async fn messages(
    client: &async_nats::Client,
    node: &str,
    correlation_id: &str,
    project_id: i64,
    budget: Duration,
) -> Vec<HookMessage> {
    let request = LagRequest {
        correlation_id: correlation_id.into(),
        geo_node_id: node.into(),
        project_id,
    };
    let asked = client.request(names::geo_lag_subject(node), request.encode_to_vec().into());
    match tokio::time::timeout(budget, asked).await {
        Ok(Ok(reply)) => match LagReply::decode(reply.payload.as_ref()) {
            // The pusher's terminal shows these as they are: no escapes.
            Ok(reply) if reply.correlation_id == correlation_id => reply
                .messages
                .into_iter()
                .map(|m| HookMessage {
                    message: crate::terminal::sanitize(&m.message),
                    r#type: crate::terminal::sanitize(&m.r#type),
                })
                .collect(),
            Ok(reply) => {
                tracing::warn!(geo_node_id = node, got = %reply.correlation_id, "lag reply for another push ignored");
                Vec::new()
            }
            Err(err) => {
                tracing::warn!(geo_node_id = node, error = %err, "undecodable lag reply");
                Vec::new()
            }
        },
        Ok(Err(err)) => {
            tracing::warn!(geo_node_id = node, error = %err, "no lag message: request failed");
            Vec::new()
        }
        Err(_) => {
            metrics::counter!("pushbus_ingest_lag_timeouts_total").increment(1);
            tracing::warn!(
                geo_node_id = node,
                budget_ms = budget.as_millis() as u64,
                "no lag message: budget exhausted"
            );
            Vec::new()
        }
    }
}
