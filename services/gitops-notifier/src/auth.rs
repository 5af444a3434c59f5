//! Agent authentication: the token's SHA-256 must equal the hash stored in
//! the agent's registry entry; an agent without one connects only if its
//! entry says `public`.

use async_nats::jetstream::kv::Store;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::AgentConfig;
use pushbus_shared::secret::constant_time_eq;
use sha2::{Digest, Sha256};
use std::collections::HashMap;
use std::net::IpAddr;
use std::sync::Mutex;
use std::time::{Duration, Instant};

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    /// Unknown agent and wrong token look the same from outside.
    #[error("unknown agent or invalid token")]
    Denied,
    #[error("agent registry unavailable: {0}")]
    Unavailable(#[source] async_nats::jetstream::kv::EntryError),
    #[error(
        "too many failed logins from this address (burst {burst}, --notifier-login-failure-burst): retry in {retry_after_secs} s"
    )]
    Throttled { burst: u32, retry_after_secs: u64 },
}

impl AuthError {
    /// What an SSE refusal answers with.
    pub fn http_status(&self) -> axum::http::StatusCode {
        use axum::http::StatusCode;
        match self {
            AuthError::Denied => StatusCode::UNAUTHORIZED,
            AuthError::Unavailable(_) => StatusCode::SERVICE_UNAVAILABLE,
            AuthError::Throttled { .. } => StatusCode::TOO_MANY_REQUESTS,
        }
    }

    /// What a gRPC `Watch` refusal ends with.
    pub fn grpc_status(&self) -> tonic::Status {
        let message = self.to_string();
        match self {
            AuthError::Denied => tonic::Status::unauthenticated(message),
            AuthError::Unavailable(_) => tonic::Status::unavailable(message),
            AuthError::Throttled { .. } => tonic::Status::resource_exhausted(message),
        }
    }
}

/// Failed logins are throttled per peer address (a token bucket: `burst`
/// failures, then one more per `refill`), and an agent that just failed a
/// login is checked against its entry as read then (the negative cache), so
/// guessing costs no registry read. Both maps are bounded.
pub struct LoginGate {
    burst: u32,
    refill: Duration,
    cache_for: Duration,
    peers: Mutex<HashMap<IpAddr, Bucket>>,
    recent: Mutex<HashMap<String, Cached>>,
}

/// Entries per map; past it, stale ones go, then (under a flood of new
/// addresses or IDs) all of them: the limits loosen, memory does not grow.
const MAX_ENTRIES: usize = 65_536;

#[derive(Clone, Copy)]
struct Bucket {
    tokens: f64,
    at: Instant,
}

struct Cached {
    /// None: no such agent (or an undecodable entry).
    entry: Option<AgentConfig>,
    until: Instant,
}

impl LoginGate {
    pub fn new(burst: u32, refill: Duration, cache_for: Duration) -> LoginGate {
        LoginGate {
            burst: burst.max(1),
            refill: refill.max(Duration::from_millis(1)),
            cache_for,
            peers: Mutex::default(),
            recent: Mutex::default(),
        }
    }

    fn tokens_now(&self, b: &Bucket, now: Instant) -> f64 {
        let refilled = now.duration_since(b.at).as_secs_f64() / self.refill.as_secs_f64();
        (b.tokens + refilled).min(f64::from(self.burst))
    }

    /// Refuses a peer whose failures used up its bucket.
    fn check_peer(&self, peer: Option<IpAddr>) -> Result<(), AuthError> {
        let Some(ip) = peer else { return Ok(()) };
        let now = Instant::now();
        let peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
        match peers.get(&ip) {
            Some(b) if self.tokens_now(b, now) < 1.0 => {
                let missing = 1.0 - self.tokens_now(b, now);
                Err(AuthError::Throttled {
                    burst: self.burst,
                    retry_after_secs: (missing * self.refill.as_secs_f64()).ceil().max(1.0) as u64,
                })
            }
            _ => Ok(()),
        }
    }

    fn failed(&self, peer: Option<IpAddr>, agent_id: &str, entry: Option<AgentConfig>) {
        let now = Instant::now();
        if let Some(ip) = peer {
            let mut peers = self.peers.lock().unwrap_or_else(|e| e.into_inner());
            if peers.len() >= MAX_ENTRIES && !peers.contains_key(&ip) {
                let burst = f64::from(self.burst);
                peers.retain(|_, b| self.tokens_now(b, now) < burst);
                if peers.len() >= MAX_ENTRIES {
                    peers.clear();
                }
            }
            let tokens = peers
                .get(&ip)
                .map_or(f64::from(self.burst), |b| self.tokens_now(b, now));
            peers.insert(
                ip,
                Bucket {
                    tokens: (tokens - 1.0).max(0.0),
                    at: now,
                },
            );
        }
        if self.cache_for.is_zero() {
            return;
        }
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        if recent.len() >= MAX_ENTRIES && !recent.contains_key(agent_id) {
            recent.retain(|_, c| c.until > now);
            if recent.len() >= MAX_ENTRIES {
                recent.clear();
            }
        }
        recent.entry(agent_id.to_owned()).or_insert_with(|| Cached {
            entry,
            until: now + self.cache_for,
        });
    }

    fn cached(&self, agent_id: &str) -> Option<Option<AgentConfig>> {
        let mut recent = self.recent.lock().unwrap_or_else(|e| e.into_inner());
        match recent.get(agent_id) {
            Some(c) if c.until > Instant::now() => Some(c.entry.clone()),
            Some(_) => {
                recent.remove(agent_id);
                None
            }
            None => None,
        }
    }

    /// The agent's entry changed (or went): drop what was cached of it.
    pub fn forget(&self, agent_id: &str) {
        self.recent
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .remove(agent_id);
    }

    pub async fn authenticate(
        &self,
        agents: &Store,
        agent_id: &str,
        token: Option<&str>,
        peer: Option<IpAddr>,
    ) -> Result<String, AuthError> {
        self.check_peer(peer)?;
        if !names::is_valid_token(agent_id) {
            self.failed(peer, agent_id, None);
            return Err(AuthError::Denied);
        }
        let entry = match self.cached(agent_id) {
            Some(entry) => entry,
            None => match agents.get(agent_id).await {
                Ok(Some(bytes)) => AgentConfig::decode(bytes.as_ref()).ok(),
                Ok(None) => None,
                Err(e) => return Err(AuthError::Unavailable(e)),
            },
        };
        let result = match &entry {
            Some(cfg) => check_token(agent_id, cfg, token),
            None => Err(AuthError::Denied),
        };
        if result.is_err() {
            self.failed(peer, agent_id, entry);
        }
        result
    }
}

impl Default for LoginGate {
    fn default() -> Self {
        LoginGate::new(10, Duration::from_secs(1), Duration::from_secs(5))
    }
}

/// Without a gate (tests, tools): one registry read per call.
pub async fn authenticate(
    agents: &Store,
    agent_id: &str,
    token: Option<&str>,
) -> Result<String, AuthError> {
    LoginGate::new(u32::MAX, Duration::from_millis(1), Duration::ZERO)
        .authenticate(agents, agent_id, token, None)
        .await
}

/// The credential an agent's streams hold: its token's SHA-256 (lowercase),
/// empty for a public agent, None for an agent that takes no connection.
pub fn credential(cfg: &AgentConfig) -> Option<String> {
    match (cfg.token_sha256.is_empty(), cfg.public) {
        (false, _) => Some(cfg.token_sha256.to_ascii_lowercase()),
        (true, true) => Some(String::new()),
        (true, false) => None,
    }
}

fn check_token(
    agent_id: &str,
    cfg: &AgentConfig,
    token: Option<&str>,
) -> Result<String, AuthError> {
    if cfg.token_sha256.is_empty() {
        // Open only when registered as public: a forgotten token must not
        // mean anyone can follow the agent's pokes.
        if cfg.public {
            return Ok(String::new());
        }
        tracing::info!(
            agent_id,
            "agent has no token and is not public: connection refused"
        );
        return Err(AuthError::Denied);
    }
    let given = token.ok_or(AuthError::Denied)?;
    let digest = hex::encode(Sha256::digest(given.as_bytes()));
    let stored = cfg.token_sha256.to_ascii_lowercase();
    if constant_time_eq(digest.as_bytes(), stored.as_bytes()) {
        Ok(stored)
    } else {
        Err(AuthError::Denied)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(token: &str) -> AgentConfig {
        AgentConfig {
            token_sha256: hex::encode(Sha256::digest(token.as_bytes())),
            ..Default::default()
        }
    }

    #[test]
    fn a_peer_is_throttled_after_its_burst_and_refills() {
        let gate = LoginGate::new(3, Duration::from_millis(200), Duration::from_secs(5));
        let ip: IpAddr = [10, 0, 0, 1].into();
        for _ in 0..3 {
            assert!(gate.check_peer(Some(ip)).is_ok());
            gate.failed(Some(ip), "a", Some(cfg("t")));
        }
        assert!(matches!(
            gate.check_peer(Some(ip)),
            Err(AuthError::Throttled { burst: 3, .. })
        ));
        // Another address is not affected.
        assert!(gate.check_peer(Some([10, 0, 0, 2].into())).is_ok());
        std::thread::sleep(Duration::from_millis(250));
        assert!(gate.check_peer(Some(ip)).is_ok());
    }

    #[test]
    fn the_negative_cache_holds_the_entry_until_forgotten() {
        let gate = LoginGate::default();
        gate.failed(None, "a", Some(cfg("t")));
        let cached = gate.cached("a").expect("cached").expect("entry");
        assert!(check_token("a", &cached, Some("t")).is_ok());
        assert!(check_token("a", &cached, Some("x")).is_err());
        gate.forget("a");
        assert!(gate.cached("a").is_none());
    }
}
