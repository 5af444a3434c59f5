//! The agent registry's request API on `pushbus.api.agents.<op>`, so other
//! services can register agents without linking this crate. Every write is
//! validated exactly as `pushbus agents put` validates it, and the reply is
//! sent only after the KV bucket acknowledged the write. Reads are redacted:
//! no token hash, no webhook secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv::{Operation, Store};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, AgentRegistryReply, AgentRegistryRequest};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::file::AgentFile;

/// Requests answered at once; more wait in the subscription (bounds the
/// tasks a request flood can spawn).
const IN_FLIGHT: usize = 64;

/// The NATS micro service name (`nats micro ls` shows it).
pub const SERVICE_NAME: &str = "pushbus-agents";

/// Answers registry requests (queue group `filter`) until `shutdown`, as the
/// NATS micro service `pushbus-agents` (endpoints put, get, delete, list;
/// `nats micro info pushbus-agents`); requests already received are
/// answered before it returns.
pub async fn start(client: async_nats::Client, kv: Store) -> Result<Api, async_nats::Error> {
    use async_nats::service::ServiceExt;
    let refused: Arc<HashMap<&'static str, AtomicU64>> =
        Arc::new(OPS.iter().map(|op| (*op, AtomicU64::new(0))).collect());
    let service = client
        .service_builder()
        .description("pushbus agent registry: put, get, delete, list (protobuf or JSON)")
        .queue_group(names::QUEUE_FILTER)
        .stats_handler({
            let refused = refused.clone();
            move |endpoint, _| {
                // The endpoint's name may come with the group's prefix.
                let op = endpoint.rsplit('.').next().unwrap_or_default();
                let n = refused.get(op).map_or(0, |c| c.load(Ordering::Relaxed));
                serde_json::json!({ "refused": n })
            }
        })
        .start(SERVICE_NAME, env!("CARGO_PKG_VERSION"))
        .await?;
    let group = service.group(names::AGENTS_API_PREFIX);
    let mut endpoints = Vec::with_capacity(OPS.len());
    for op in OPS {
        endpoints.push(group.endpoint(*op).await?);
    }
    // Subscribed on the server before anyone is told the API is up.
    client.flush().await?;
    Ok(Api {
        service,
        requests: futures::stream::select_all(endpoints),
        kv,
        refused,
    })
}

/// The registry API, subscribed and ready to answer.
pub struct Api {
    service: async_nats::service::Service,
    requests: futures::stream::SelectAll<async_nats::service::endpoint::Endpoint>,
    kv: Store,
    refused: Arc<HashMap<&'static str, AtomicU64>>,
}

impl Api {
    /// Answers until `shutdown`; requests already received are answered
    /// before it returns.
    pub async fn serve(self, shutdown: CancellationToken) {
        let Api {
            service,
            mut requests,
            kv,
            refused,
        } = self;
        let slots = Arc::new(tokio::sync::Semaphore::new(IN_FLIGHT));
        let mut in_flight = tokio::task::JoinSet::new();
        loop {
            let request = tokio::select! {
                _ = shutdown.cancelled() => break,
                r = requests.next() => match r { Some(r) => r, None => break },
            };
            let Ok(slot) = slots.clone().acquire_owned().await else {
                break;
            };
            let (kv, refused) = (kv.clone(), refused.clone());
            in_flight.spawn(async move {
                let _slot = slot;
                let op = request
                    .message
                    .subject
                    .as_str()
                    .rsplit('.')
                    .next()
                    .unwrap_or_default()
                    .to_owned();
                let (reply, ok) = answer(&kv, &op, &request.message.payload).await;
                if !ok && let Some(count) = refused.get(op.as_str()) {
                    count.fetch_add(1, Ordering::Relaxed);
                }
                if let Err(err) = request.respond(Ok(reply)).await {
                    tracing::warn!(error = %err, op, "cannot send agent registry reply");
                }
            });
            while in_flight.try_join_next().is_some() {}
        }
        drop(requests);
        while in_flight.join_next().await.is_some() {}
        if let Err(err) = service.stop().await {
            tracing::debug!(error = %err, "agent registry service stop");
        }
    }
}

const OPS: &[&str] = &["put", "get", "delete", "list"];

/// JSON requests begin with `{`; a protobuf `AgentRegistryRequest` never
/// does (its first byte is a field tag 0x0a..0x18), and an empty body is an
/// empty protobuf request.
fn is_json(payload: &[u8]) -> bool {
    payload.iter().find(|b| !b.is_ascii_whitespace()) == Some(&b'{')
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct JsonIdRequest {
    #[serde(default)]
    agent_id: String,
}

#[derive(Serialize, Default)]
struct JsonReply {
    #[serde(skip_serializing_if = "String::is_empty")]
    error: String,
    #[serde(skip_serializing_if = "is_zero")]
    revision: u64,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent: Option<AgentFile>,
    #[serde(skip_serializing_if = "Option::is_none")]
    agent_ids: Option<Vec<String>>,
}

fn is_zero(n: &u64) -> bool {
    *n == 0
}

/// The reply, and whether the request succeeded.
async fn answer(kv: &Store, op: &str, payload: &[u8]) -> (bytes::Bytes, bool) {
    if is_json(payload) {
        let reply = match json_request(op, payload) {
            Ok(req) => execute(kv, op, req).await,
            Err(error) => AgentRegistryReply {
                error,
                ..Default::default()
            },
        };
        let ok = reply.error.is_empty();
        let json = JsonReply {
            error: reply.error,
            revision: reply.revision,
            agent: reply.agent.map(AgentFile::from_config),
            agent_ids: (op == "list").then_some(reply.agent_ids),
        };
        (serde_json::to_vec(&json).unwrap_or_default().into(), ok)
    } else {
        let reply = match AgentRegistryRequest::decode(payload) {
            Ok(req) => execute(kv, op, req).await,
            Err(e) => AgentRegistryReply {
                error: format!("undecodable AgentRegistryRequest: {e}"),
                ..Default::default()
            },
        };
        let ok = reply.error.is_empty();
        (reply.encode_to_vec().into(), ok)
    }
}

fn json_request(op: &str, payload: &[u8]) -> Result<AgentRegistryRequest, String> {
    if op == "put" {
        let agent = AgentFile::from_json(payload)
            .and_then(AgentFile::into_config)
            .map_err(|e| e.to_string())?;
        return Ok(AgentRegistryRequest {
            agent: Some(agent),
            ..Default::default()
        });
    }
    let req: JsonIdRequest =
        serde_json::from_slice(payload).map_err(|e| format!("cannot parse request: {e}"))?;
    Ok(AgentRegistryRequest {
        agent_id: req.agent_id,
        ..Default::default()
    })
}

async fn execute(kv: &Store, op: &str, req: AgentRegistryRequest) -> AgentRegistryReply {
    let agent_id = match &req.agent {
        Some(a) => a.agent_id.clone(),
        None => req.agent_id.clone(),
    };
    let result = match op {
        "put" => put(kv, req).await,
        "get" => get(kv, &req.agent_id).await,
        "delete" => delete(kv, &req.agent_id).await,
        "list" => list(kv).await,
        other => Err(format!(
            "unknown operation {other:?} (put, get, delete or list)"
        )),
    };
    match result {
        Ok(reply) => {
            tracing::info!(op, %agent_id, "agent registry request served");
            reply
        }
        Err(error) => {
            tracing::warn!(op, %agent_id, %error, "agent registry request refused");
            AgentRegistryReply {
                error,
                ..Default::default()
            }
        }
    }
}

type Answer = Result<AgentRegistryReply, String>;

async fn put(kv: &Store, req: AgentRegistryRequest) -> Answer {
    let cfg: AgentConfig = req.agent.ok_or("agent: required for put")?;
    agent::compile(&cfg).map_err(|e| format!("invalid agent config: {e}"))?;
    let value = cfg.encode_to_vec().into();
    let written = match req.expected_revision {
        None => kv
            .put(&cfg.agent_id, value)
            .await
            .map_err(|e| e.to_string()),
        Some(0) => kv
            .create(&cfg.agent_id, value)
            .await
            .map_err(|e| format!("cannot create agent {:?}: {e}", cfg.agent_id)),
        Some(rev) => kv
            .update(&cfg.agent_id, value, rev)
            .await
            .map_err(|e| format!("cannot replace revision {rev} of {:?}: {e}", cfg.agent_id)),
    };
    Ok(AgentRegistryReply {
        revision: written?,
        ..Default::default()
    })
}

fn valid_id(agent_id: &str) -> Result<(), String> {
    if names::is_valid_token(agent_id) {
        Ok(())
    } else {
        Err(format!(
            "agent_id {agent_id:?} must match [A-Za-z0-9_-]{{1,128}}"
        ))
    }
}

async fn get(kv: &Store, agent_id: &str) -> Answer {
    valid_id(agent_id)?;
    let entry = kv.entry(agent_id).await.map_err(|e| e.to_string())?;
    match entry {
        Some(e) if e.operation == Operation::Put => {
            let mut agent = AgentConfig::decode(e.value.as_ref())
                .map_err(|err| format!("stored config of {agent_id:?} is undecodable: {err}"))?;
            // Readers of the registry never get its secrets.
            crate::file::redact(&mut agent);
            Ok(AgentRegistryReply {
                revision: e.revision,
                agent: Some(agent),
                ..Default::default()
            })
        }
        _ => Err(format!("no agent {agent_id:?}")),
    }
}

async fn delete(kv: &Store, agent_id: &str) -> Answer {
    valid_id(agent_id)?;
    get(kv, agent_id).await?;
    kv.delete(agent_id).await.map_err(|e| e.to_string())?;
    Ok(AgentRegistryReply::default())
}

async fn list(kv: &Store) -> Answer {
    let keys = kv.keys().await.map_err(|e| e.to_string())?;
    let mut agent_ids: Vec<String> = keys.try_collect().await.map_err(|e| e.to_string())?;
    agent_ids.sort();
    Ok(AgentRegistryReply {
        agent_ids,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_is_told_from_protobuf() {
        assert!(is_json(b" {\"agent_id\":\"a\"}"));
        let proto = AgentRegistryRequest {
            agent_id: "a".into(),
            expected_revision: Some(3),
            agent: Some(AgentConfig::default()),
        }
        .encode_to_vec();
        assert!(!is_json(&proto));
        assert!(!is_json(b""));
    }
}
