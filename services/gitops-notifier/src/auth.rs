//! Agent authentication: the token's SHA-256 must equal the hash stored in
//! the agent's registry entry; an agent without one connects only if its
//! entry says `public`.

use async_nats::jetstream::kv::Store;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::AgentConfig;
use pushbus_shared::secret::constant_time_eq;
use sha2::{Digest, Sha256};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown agent and wrong token look the same from outside.
    #[error("unknown agent or invalid token")]
    Denied,
    #[error("agent registry unavailable: {0}")]
    Unavailable(String),
}

pub async fn authenticate(
    agents: &Store,
    agent_id: &str,
    token: Option<&str>,
) -> Result<(), AuthError> {
    if !names::is_valid_token(agent_id) {
        return Err(AuthError::Denied);
    }
    let entry = agents
        .get(agent_id)
        .await
        .map_err(|e| AuthError::Unavailable(e.to_string()))?
        .ok_or(AuthError::Denied)?;
    let cfg = AgentConfig::decode(entry.as_ref()).map_err(|_| AuthError::Denied)?;
    if cfg.token_sha256.is_empty() {
        // Open only when registered as public: a forgotten token must not
        // mean anyone can follow the agent's pokes.
        if cfg.public {
            return Ok(());
        }
        tracing::info!(
            agent_id,
            "agent has no token and is not public: connection refused"
        );
        return Err(AuthError::Denied);
    }
    let given = token.ok_or(AuthError::Denied)?;
    let digest = hex::encode(Sha256::digest(given.as_bytes()));
    if constant_time_eq(
        digest.as_bytes(),
        cfg.token_sha256.to_ascii_lowercase().as_bytes(),
    ) {
        Ok(())
    } else {
        Err(AuthError::Denied)
    }
}

/// "Bearer <token>" -> "<token>".
pub fn bearer(value: Option<&str>) -> Option<&str> {
    value?.strip_prefix("Bearer ").map(str::trim)
}
