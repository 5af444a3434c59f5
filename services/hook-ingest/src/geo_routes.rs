//! The correlation-ID cache variant of Geo routing: a front end that can only
//! hand over a correlation ID stores correlation ID -> Geo node ID in KV
//! bucket `pushbus-geo-push-routes` (entries expire with the bucket's TTL),
//! and hook-ingest looks a push's node up by that ID alone — never by actor
//! and repository, which is what let simultaneous pushes see each other's
//! messages.
//!
//! KV keys may not contain ':' (and '.' splits tokens), both of which a
//! correlation ID may hold, so the key is the lowercase hex of the ID's
//! bytes: `req:42/a` is stored under `7265713a34322f61`.

use std::time::Duration;

use async_nats::jetstream::kv::Store;
use pushbus_shared::{envelope, names};

/// How long a route lives unless configured otherwise.
pub const DEFAULT_TTL_SECS: u64 = 600;

/// The bucket's TTL; one env var for every process that creates the bucket
/// (hook-ingest, `pushbus setup`, `pushbus geo route`) so they agree.
#[derive(clap::Args, Clone, Debug)]
pub struct RouteTtlArgs {
    /// Lifetime of a correlation ID -> Geo node entry in pushbus-geo-push-routes.
    #[arg(
        long = "geo-route-ttl-secs",
        env = "PUSHBUS_GEO_ROUTE_TTL_SECS",
        default_value_t = DEFAULT_TTL_SECS
    )]
    pub geo_route_ttl_secs: u64,
}

pushbus_shared::default_from_flags!(RouteTtlArgs);

impl RouteTtlArgs {
    pub fn ttl(&self) -> Duration {
        Duration::from_secs(self.geo_route_ttl_secs)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum RouteError {
    #[error("invalid correlation ID {0:?}: expected [A-Za-z0-9._:/-]{{1,128}}")]
    CorrelationId(String),
    #[error("invalid Geo node ID {0:?}: expected [A-Za-z0-9_-]{{1,128}}")]
    NodeId(String),
    #[error("cannot store the route: {0}")]
    Store(#[from] async_nats::jetstream::kv::PutError),
}

/// The KV key for a correlation ID (lowercase hex of its bytes).
pub fn route_key(correlation_id: &str) -> String {
    names::hex_token(correlation_id)
}

/// Stores correlation ID -> node ID; what a front end calls before the push
/// reaches hook-ingest. Returns the KV revision.
pub async fn store_route(
    routes: &Store,
    correlation_id: &str,
    geo_node_id: &str,
) -> Result<u64, RouteError> {
    if !envelope::is_valid_correlation_id(correlation_id) {
        return Err(RouteError::CorrelationId(correlation_id.into()));
    }
    if !names::is_valid_token(geo_node_id) {
        return Err(RouteError::NodeId(geo_node_id.into()));
    }
    Ok(routes
        .put(route_key(correlation_id), geo_node_id.to_owned().into())
        .await?)
}

/// The node stored for `correlation_id`, if any; waits at most `budget`.
/// Never fails: a miss, a slow store or a bad entry means "no node", logged.
pub async fn lookup(routes: &Store, correlation_id: &str, budget: Duration) -> Option<String> {
    if !envelope::is_valid_correlation_id(correlation_id) {
        return None;
    }
    match tokio::time::timeout(budget, routes.get(route_key(correlation_id))).await {
        Ok(Ok(Some(value))) => match String::from_utf8(value.to_vec()) {
            Ok(node) if names::is_valid_token(&node) => Some(node),
            _ => {
                tracing::warn!("Geo route entry is not a valid node ID; ignored");
                None
            }
        },
        Ok(Ok(None)) => None,
        Ok(Err(err)) => {
            tracing::warn!(error = %err, "cannot read the Geo route; no lag message");
            None
        }
        Err(_) => {
            tracing::warn!(
                budget_ms = budget.as_millis() as u64,
                "Geo route lookup exceeded the lag budget; no lag message"
            );
            None
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_are_valid_kv_keys_for_any_valid_correlation_id() {
        assert_eq!(route_key("req:42/a"), "7265713a34322f61");
        for id in ["a", "req:1/2", "..x..", &"z".repeat(128)] {
            let k = route_key(id);
            assert!(k.bytes().all(|b| b.is_ascii_hexdigit()), "{k}");
        }
        assert_ne!(route_key("ab"), route_key("a:b"));
    }
}
