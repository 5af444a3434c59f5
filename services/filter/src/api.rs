//! The agent registry's request API on `pushbus.api.agents.<op>`, so other
//! services can register agents without linking this crate. Every write is
//! validated exactly as `pushbus agents put` validates it, and the reply is
//! sent only after the KV bucket acknowledged the write. Reads are redacted:
//! no token hash, no webhook secret.

use async_nats::jetstream::kv::{Operation, Store};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, AgentRegistryReply, AgentRegistryRequest};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::file::AgentFile;

/// Answers registry requests (queue group `filter`) until `shutdown`;
/// requests already received are answered before it returns.
pub async fn serve(
    client: async_nats::Client,
    kv: Store,
    shutdown: CancellationToken,
) -> Result<(), async_nats::SubscribeError> {
    let mut requests = client
        .queue_subscribe(names::SUBJECTS_AGENTS_API, names::QUEUE_FILTER.into())
        .await?;
    let mut in_flight = tokio::task::JoinSet::new();
    loop {
        let msg = tokio::select! {
            _ = shutdown.cancelled() => break,
            msg = requests.next() => match msg { Some(m) => m, None => break },
        };
        let Some(reply_to) = msg.reply.clone() else {
            tracing::warn!(subject = %msg.subject, "agent registry request without a reply subject ignored");
            continue;
        };
        let (kv, client) = (kv.clone(), client.clone());
        in_flight.spawn(async move {
            let op = msg
                .subject
                .as_str()
                .rsplit('.')
                .next()
                .unwrap_or_default()
                .to_owned();
            let reply = answer(&kv, &op, &msg.payload).await;
            if let Err(err) = client.publish(reply_to, reply).await {
                tracing::warn!(error = %err, op, "cannot send agent registry reply");
            }
        });
        while in_flight.try_join_next().is_some() {}
    }
    let _ = requests.unsubscribe().await;
    while in_flight.join_next().await.is_some() {}
    Ok(())
}

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

async fn answer(kv: &Store, op: &str, payload: &[u8]) -> bytes::Bytes {
    if is_json(payload) {
        let reply = match json_request(op, payload) {
            Ok(req) => execute(kv, op, req).await,
            Err(error) => AgentRegistryReply {
                error,
                ..Default::default()
            },
        };
        let json = JsonReply {
            error: reply.error,
            revision: reply.revision,
            agent: reply.agent.map(AgentFile::from_config),
            agent_ids: (op == "list").then_some(reply.agent_ids),
        };
        serde_json::to_vec(&json).unwrap_or_default().into()
    } else {
        let reply = match AgentRegistryRequest::decode(payload) {
            Ok(req) => execute(kv, op, req).await,
            Err(e) => AgentRegistryReply {
                error: format!("undecodable AgentRegistryRequest: {e}"),
                ..Default::default()
            },
        };
        reply.encode_to_vec().into()
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
