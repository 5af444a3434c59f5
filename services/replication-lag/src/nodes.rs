//! The Geo node registry (KV bucket `pushbus-geo-nodes`, node ID ->
//! `GeoNode`), validated before anything is written.

use async_nats::jetstream::kv::Store;
use futures::TryStreamExt;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::GeoNode;

#[derive(Debug, thiserror::Error)]
pub enum NodeError {
    #[error("invalid node ID {0:?}: expected [A-Za-z0-9_-]{{1,128}}")]
    Id(String),
    #[error("node {0}: a name is required")]
    Name(String),
    #[error("node {id}: URL {url:?} is not an absolute http(s) URL")]
    Url { id: String, url: String },
    #[error(
        "node {id} cannot be primary: {existing} already is (remove it or add {id} as a secondary)"
    )]
    SecondPrimary { id: String, existing: String },
    #[error("no node {0:?}")]
    NotFound(String),
    #[error("node {id} in the registry is undecodable: {source}")]
    Decode {
        id: String,
        source: prost::DecodeError,
    },
    #[error("Geo node registry: {0}")]
    Store(#[source] Box<dyn std::error::Error + Send + Sync>),
}

fn store_err(e: impl Into<Box<dyn std::error::Error + Send + Sync>>) -> NodeError {
    NodeError::Store(e.into())
}

/// Checks one node on its own (the registry-wide primary rule is in `put`).
pub fn validate(node: &GeoNode) -> Result<(), NodeError> {
    if !names::is_valid_token(&node.node_id) {
        return Err(NodeError::Id(node.node_id.clone()));
    }
    if node.name.trim().is_empty() || node.name.chars().any(char::is_control) {
        return Err(NodeError::Name(node.node_id.clone()));
    }
    let bad_url = || NodeError::Url {
        id: node.node_id.clone(),
        url: node.url.clone(),
    };
    let url = url::Url::parse(&node.url).map_err(|_| bad_url())?;
    if !matches!(url.scheme(), "http" | "https") || url.host_str().is_none_or(str::is_empty) {
        return Err(bad_url());
    }
    Ok(())
}

/// Every registered node, sorted by ID.
pub async fn list(kv: &Store) -> Result<Vec<GeoNode>, NodeError> {
    let mut keys: Vec<String> = kv
        .keys()
        .await
        .map_err(store_err)?
        .try_collect()
        .await
        .map_err(store_err)?;
    keys.sort();
    let mut nodes = Vec::with_capacity(keys.len());
    for id in keys {
        // A key deleted between listing and reading is simply gone.
        if let Some(bytes) = kv.get(&id).await.map_err(store_err)? {
            let node = GeoNode::decode(bytes.as_ref())
                .map_err(|source| NodeError::Decode { id, source })?;
            nodes.push(node);
        }
    }
    Ok(nodes)
}

/// Adds or replaces a node; refuses a second primary. Returns the revision.
///
/// Two operators adding two primaries at the very same moment could both
/// pass the check; this is an operator command, not a hot path, so the
/// registry does not lock for it.
pub async fn put(kv: &Store, node: &GeoNode) -> Result<u64, NodeError> {
    validate(node)?;
    if node.primary
        && let Some(existing) = list(kv)
            .await?
            .into_iter()
            .find(|n| n.primary && n.node_id != node.node_id)
    {
        return Err(NodeError::SecondPrimary {
            id: node.node_id.clone(),
            existing: existing.node_id,
        });
    }
    kv.put(&node.node_id, node.encode_to_vec().into())
        .await
        .map_err(store_err)
}

/// Removes a node; an unknown ID is an error so typos do not pass silently.
pub async fn remove(kv: &Store, node_id: &str) -> Result<(), NodeError> {
    if !names::is_valid_token(node_id) {
        return Err(NodeError::Id(node_id.into()));
    }
    if kv.get(node_id).await.map_err(store_err)?.is_none() {
        return Err(NodeError::NotFound(node_id.into()));
    }
    kv.delete(node_id).await.map_err(store_err)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn node(id: &str, url: &str) -> GeoNode {
        GeoNode {
            node_id: id.into(),
            name: "n".into(),
            url: url.into(),
            primary: false,
        }
    }

    #[test]
    fn validation() {
        assert!(validate(&node("eu-1", "https://eu.example.com")).is_ok());
        assert!(validate(&node("eu-1", "http://10.0.0.1:8080/")).is_ok());
        for (id, url) in [
            ("eu.1", "https://eu.example.com"),
            ("", "https://eu.example.com"),
            ("eu", "ftp://eu.example.com"),
            ("eu", "eu.example.com"),
            ("eu", "not a url"),
        ] {
            assert!(validate(&node(id, url)).is_err(), "{id} {url}");
        }
        let mut unnamed = node("eu", "https://eu.example.com");
        unnamed.name = " ".into();
        assert!(matches!(validate(&unnamed), Err(NodeError::Name(_))));
    }
}
