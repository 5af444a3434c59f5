//! `pushbus.v1.HookIngest/NotifyGitPush`: the gRPC door, as KAS-style servers
//! call it. Same validation, storage and answer as the HTTP door.

use pushbus_shared::envelope;
use pushbus_shared::proto::hook_ingest_server::HookIngest;
use pushbus_shared::proto::{NotifyGitPushRequest, NotifyGitPushResponse, RepositoryKind};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::changes;
use crate::http::HttpState;
use crate::ingest::{IngestError, Push};

pub struct HookIngestService {
    pub state: HttpState,
}

#[tonic::async_trait]
impl HookIngest for HookIngestService {
    async fn notify_git_push(
        &self,
        req: Request<NotifyGitPushRequest>,
    ) -> Result<Response<NotifyGitPushResponse>, Status> {
        let md = req.metadata();
        let text = |k: &str| md.get(k).and_then(|v| v.to_str().ok()).map(str::to_owned);
        if let Some(secret) = &self.state.secret {
            let given =
                text("authorization").and_then(|v| v.strip_prefix("Bearer ").map(str::to_owned));
            if !given.is_some_and(|g| {
                pushbus_shared::secret::constant_time_eq(g.as_bytes(), secret.as_bytes())
            }) {
                tracing::warn!("NotifyGitPush refused: missing or invalid token");
                return Err(Status::unauthenticated("missing or invalid token"));
            }
        }
        let from_caller = ["x-correlation-id", "x-request-id"]
            .iter()
            .filter_map(|k| text(k))
            .find(|v| envelope::is_valid_correlation_id(v));
        let correlation_from_caller = from_caller.is_some();
        let correlation_id = from_caller.unwrap_or_else(envelope::new_correlation_id);
        // The caller's trace (gRPC metadata) continues into pushbus.
        let trace = (text("traceparent"), text("tracestate"));
        let r = req.into_inner();
        let invalid = |e: changes::Invalid| {
            tracing::warn!(field = %e.field, reason = %e.reason, "NotifyGitPush refused");
            Status::invalid_argument(format!("{}: {}", e.field, e.reason))
        };
        let push = Push {
            project_id: r.project_id,
            project_path: r.project_path,
            repository_kind: RepositoryKind::Project,
            changes: changes::validate(r.changes).map_err(invalid)?,
            actor: r.actor,
            protocol: if r.protocol.is_empty() {
                "grpc".into()
            } else {
                r.protocol
            },
            push_options: r.push_options,
            geo_node_id: r.geo_node_id,
            default_branch: r.default_branch,
            correlation_from_caller,
        };
        push.validate("project_path").map_err(invalid)?;
        let span = tracing::info_span!(
            "notify_git_push",
            otel.name = "pushbus.v1.HookIngest/NotifyGitPush",
            otel.kind = "server",
            rpc.system = "grpc",
            %correlation_id,
            project_id = push.project_id
        );
        pushbus_shared::trace::continue_from(&span, |k| match k {
            "traceparent" => trace.0.as_deref(),
            "tracestate" => trace.1.as_deref(),
            _ => None,
        });
        let accepted = self
            .state
            .ingest
            .accept(push, correlation_id)
            .instrument(span)
            .await
            .map_err(|IngestError::Unavailable(reason)| Status::unavailable(reason))?;
        Ok(Response::new(NotifyGitPushResponse {
            correlation_id: accepted.correlation_id,
            event_ids: accepted.event_ids,
            messages: accepted.messages,
        }))
    }
}
