//! The agent registry's request API on `pushbus.api.agents.<op>`, so other
//! services can register agents without linking this crate. Every write is
//! validated exactly as `pushbus agents put` validates it, and the reply is
//! sent only after the KV bucket acknowledged the write. Reads are redacted:
//! no token hash, no webhook secret.

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};

use async_nats::jetstream::kv::{self, Operation, Store};
use futures::{StreamExt, TryStreamExt};
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, AgentRegistryReply, AgentRegistryRequest};
use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;

use crate::agent;
use crate::file::{AgentFile, AgentFileError};

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

/// Why a request is refused. Its text is the reply's `error`, made once
/// (`refusal`) and byte-for-byte what clients and tests expect: variants
/// show their cause in the text too, and relay ones (`{0}` alone) are
/// exactly the cause's text.
#[derive(Debug, thiserror::Error)]
enum ApiError {
    #[error("undecodable AgentRegistryRequest: {0}")]
    Undecodable(#[source] prost::DecodeError),
    #[error("cannot parse request: {0}")]
    Parse(#[source] serde_json::Error),
    #[error("{0}")]
    AgentFile(#[source] AgentFileError),
    #[error("unknown operation {0:?} (put, get, delete or list)")]
    UnknownOperation(String),
    #[error("agent: required for put")]
    MissingAgent,
    #[error("invalid agent config: {0}")]
    Invalid(#[source] agent::AgentConfigError),
    #[error("agent_id {0:?} must match [A-Za-z0-9_-]{{1,128}}")]
    AgentId(String),
    #[error("no agent {0:?}")]
    NoAgent(String),
    #[error("stored config of {agent_id:?} is undecodable: {source}")]
    StoredUndecodable {
        agent_id: String,
        source: prost::DecodeError,
    },
    #[error("{0}")]
    Put(#[source] kv::PutError),
    #[error("cannot create agent {agent_id:?}: {source}")]
    Create {
        agent_id: String,
        source: kv::CreateError,
    },
    #[error("cannot replace revision {revision} of {agent_id:?}: {source}")]
    Replace {
        revision: u64,
        agent_id: String,
        source: kv::UpdateError,
    },
    #[error("{0}")]
    Entry(#[source] kv::EntryError),
    #[error("{0}")]
    Delete(#[source] kv::DeleteError),
    #[error("{0}")]
    Keys(#[source] kv::HistoryError),
    #[error("{0}")]
    NextKey(#[source] kv::WatcherError),
}

/// The reply to a refused request: the one place an error becomes text.
fn refusal(err: &ApiError) -> AgentRegistryReply {
    AgentRegistryReply {
        error: err.to_string(),
        ..Default::default()
    }
}

/// The reply, and whether the request succeeded.
async fn answer(kv: &Store, op: &str, payload: &[u8]) -> (bytes::Bytes, bool) {
    if is_json(payload) {
        let reply = match json_request(op, payload) {
            Ok(req) => execute(kv, op, req).await,
            Err(err) => refusal(&err),
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
            Err(e) => refusal(&ApiError::Undecodable(e)),
        };
        let ok = reply.error.is_empty();
        (reply.encode_to_vec().into(), ok)
    }
}

fn json_request(op: &str, payload: &[u8]) -> Result<AgentRegistryRequest, ApiError> {
    if op == "put" {
        let agent = AgentFile::from_json(payload)
            .and_then(AgentFile::into_config)
            .map_err(ApiError::AgentFile)?;
        return Ok(AgentRegistryRequest {
            agent: Some(agent),
            ..Default::default()
        });
    }
    let req: JsonIdRequest = serde_json::from_slice(payload).map_err(ApiError::Parse)?;
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
        other => Err(ApiError::UnknownOperation(other.to_owned())),
    };
    match result {
        Ok(reply) => {
            tracing::info!(op, %agent_id, "agent registry request served");
            reply
        }
        Err(error) => {
            tracing::warn!(op, %agent_id, %error, "agent registry request refused");
            refusal(&error)
        }
    }
}

type Answer = Result<AgentRegistryReply, ApiError>;

async fn put(kv: &Store, req: AgentRegistryRequest) -> Answer {
    let cfg: AgentConfig = req.agent.ok_or(ApiError::MissingAgent)?;
    agent::compile(&cfg).map_err(ApiError::Invalid)?;
    let value = cfg.encode_to_vec().into();
    let written = match req.expected_revision {
        None => kv.put(&cfg.agent_id, value).await.map_err(ApiError::Put),
        Some(0) => kv
            .create(&cfg.agent_id, value)
            .await
            .map_err(|source| ApiError::Create {
                agent_id: cfg.agent_id.clone(),
                source,
            }),
        Some(revision) => kv
            .update(&cfg.agent_id, value, revision)
            .await
            .map_err(|source| ApiError::Replace {
                revision,
                agent_id: cfg.agent_id.clone(),
                source,
            }),
    };
    Ok(AgentRegistryReply {
        revision: written?,
        ..Default::default()
    })
}

fn valid_id(agent_id: &str) -> Result<(), ApiError> {
    if names::is_valid_token(agent_id) {
        Ok(())
    } else {
        Err(ApiError::AgentId(agent_id.to_owned()))
    }
}

async fn get(kv: &Store, agent_id: &str) -> Answer {
    valid_id(agent_id)?;
    let entry = kv.entry(agent_id).await.map_err(ApiError::Entry)?;
    match entry {
        Some(e) if e.operation == Operation::Put => {
            let mut agent = AgentConfig::decode(e.value.as_ref()).map_err(|source| {
                ApiError::StoredUndecodable {
                    agent_id: agent_id.to_owned(),
                    source,
                }
            })?;
            // Readers of the registry never get its secrets.
            crate::file::redact(&mut agent);
            Ok(AgentRegistryReply {
                revision: e.revision,
                agent: Some(agent),
                ..Default::default()
            })
        }
        _ => Err(ApiError::NoAgent(agent_id.to_owned())),
    }
}

async fn delete(kv: &Store, agent_id: &str) -> Answer {
    valid_id(agent_id)?;
    get(kv, agent_id).await?;
    kv.delete(agent_id).await.map_err(ApiError::Delete)?;
    Ok(AgentRegistryReply::default())
}

async fn list(kv: &Store) -> Answer {
    let keys = kv.keys().await.map_err(ApiError::Keys)?;
    let mut agent_ids: Vec<String> = keys.try_collect().await.map_err(ApiError::NextKey)?;
    agent_ids.sort();
    Ok(AgentRegistryReply {
        agent_ids,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Clients and the README quote these replies: the typed errors must
    /// read exactly as the strings they replaced.
    #[test]
    fn refusals_read_as_before() {
        let put = || kv::PutError::new(kv::PutErrorKind::Publish);
        let create = kv::CreateError::new(kv::CreateErrorKind::AlreadyExists);
        let cases = [
            (
                ApiError::AgentId("a b".into()),
                r#"agent_id "a b" must match [A-Za-z0-9_-]{1,128}"#,
            ),
            (ApiError::NoAgent("x".into()), r#"no agent "x""#),
            (
                ApiError::UnknownOperation("purge".into()),
                r#"unknown operation "purge" (put, get, delete or list)"#,
            ),
            (ApiError::MissingAgent, "agent: required for put"),
            (ApiError::Put(put()), "failed to put key into store"),
            (
                ApiError::Create {
                    agent_id: "a".into(),
                    source: create,
                },
                r#"cannot create agent "a": key already exists"#,
            ),
        ];
        for (err, want) in cases {
            assert_eq!(refusal(&err).error, want);
            assert_eq!(pushbus_shared::error::one_line(&err), want);
        }
        // The KV error stays reachable as the cause.
        let err = ApiError::Put(put());
        let cause = std::error::Error::source(&err).and_then(|e| e.downcast_ref::<kv::PutError>());
        assert_eq!(cause.map(|e| e.kind()), Some(kv::PutErrorKind::Publish));

        let parse = json_request("get", b"{\"nope\": 1}").unwrap_err();
        assert!(matches!(parse, ApiError::Parse(_)), "{parse:?}");
        assert!(
            parse
                .to_string()
                .starts_with("cannot parse request: unknown field `nope`"),
            "{parse}"
        );
        let invalid = ApiError::Invalid(agent::AgentConfigError::NoWatches);
        assert_eq!(
            invalid.to_string(),
            "invalid agent config: agent has no watches"
        );
    }

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
