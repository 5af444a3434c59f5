//! `pushbus.v1.GitOpsNotifier/Watch`: the same pokes over gRPC server streaming.

use std::pin::Pin;

use futures::{Stream, StreamExt};
use pushbus_shared::proto::git_ops_notifier_server::GitOpsNotifier;
use pushbus_shared::proto::{WatchEvent, WatchRequest};
use tonic::{Request, Response, Status};

use crate::AppState;
use crate::agent_stream::{self, Since};
use crate::conn::Out;

/// Refs an agent may list in `seen` (each costs memory while catch-up runs).
pub const MAX_SEEN_REFS: usize = 10_000;

pub struct WatchService {
    pub state: AppState,
}

type WatchStream = Pin<Box<dyn Stream<Item = Result<WatchEvent, Status>> + Send>>;

#[tonic::async_trait]
impl GitOpsNotifier for WatchService {
    type WatchStream = WatchStream;

    async fn watch(&self, req: Request<WatchRequest>) -> Result<Response<WatchStream>, Status> {
        let token = pushbus_shared::secret::bearer_metadata(req.metadata()).map(str::to_owned);
        let peer = req
            .extensions()
            .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
            .map(|c| c.0.ip());
        let req = req.into_inner();
        // The catch-up map built from `seen` lives as long as the stream.
        if req.seen.len() > MAX_SEEN_REFS {
            tracing::info!(
                seen = req.seen.len(),
                "gRPC watch refused: seen list too long"
            );
            return Err(Status::invalid_argument(format!(
                "seen: {} refs exceed the limit of {MAX_SEEN_REFS}; send since_cursor instead",
                req.seen.len()
            )));
        }
        let agent_id = req.agent_id;
        let credential = self
            .state
            .gate
            .authenticate(&self.state.agents, &agent_id, token.as_deref(), peer)
            .await
            .map_err(|err| {
                tracing::info!(%agent_id, error = %err, "gRPC watch refused");
                err.grpc_status()
            })?;
        let since = Since::from_request(req.since_cursor, &req.seen);
        let events = agent_stream::open(&self.state, &agent_id, &credential, since)
            .await
            .map_err(|cap| {
                tracing::info!(%agent_id, error = %cap, "gRPC watch refused");
                Status::resource_exhausted(cap.to_string())
            })?
            .map(|out| match out {
                Out::Event(ev) => Ok(ev),
                // The stream's end says why, so the agent knows what to fix.
                Out::Closed(reason) => Err(Status::unauthenticated(reason)),
            });
        tracing::info!(%agent_id, since_cursor = ?req.since_cursor, "agent connected over gRPC");
        Ok(Response::new(Box::pin(events)))
    }
}
