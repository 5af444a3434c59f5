//! `pushbus.v1.HookIngest/NotifyGitPush`: the gRPC door, as KAS-style servers
//! call it. Same validation, storage and answer as the HTTP door.

use pushbus_shared::envelope;
use pushbus_shared::proto::hook_ingest_server::HookIngest;
use pushbus_shared::proto::{NotifyGitPushRequest, NotifyGitPushResponse, RepositoryKind};
use tonic::{Request, Response, Status};
use tracing::Instrument;

use crate::http::DoorState;
use crate::ingest::{IngestError, Push};
use crate::{auth, changes};

pub struct HookIngestService {
    pub state: DoorState,
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
            check_bearer(secret, pushbus_shared::secret::bearer_metadata(md)).inspect_err(
                |status| {
                    tracing::warn!(reason = status.message(), "NotifyGitPush refused");
                },
            )?;
        }
        let from_caller =
            envelope::caller_correlation_id(|k| md.get(k).and_then(|v| v.to_str().ok()));
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
            .map_err(|e: IngestError| Status::unavailable(e.to_string()))?;
        Ok(Response::new(NotifyGitPushResponse {
            correlation_id: accepted.correlation_id,
            event_ids: accepted.event_ids,
            messages: accepted.messages,
        }))
    }
}

/// The gRPC door takes the same short-lived JWT as the HTTP door's
/// `Gitlab-Shell-Api-Request`, as a bearer token; the raw shell secret is
/// refused, so it never has to cross the wire.
fn check_bearer(secret: &str, token: Option<&str>) -> Result<(), Status> {
    let Some(token) = token else {
        return Err(Status::unauthenticated(
            "missing credentials: send authorization: Bearer <JWT signed with the GitLab shell secret, as gitlab-shell signs Gitlab-Shell-Api-Request>",
        ));
    };
    if !auth::looks_like_jwt(token) {
        // Said the same way for a right or a wrong secret: this answer must
        // not tell a guesser which.
        return Err(Status::unauthenticated(
            "authorization must be Bearer <JWT> (HS256 over the GitLab shell secret, issuer gitlab-shell); a raw secret is refused: send the JWT",
        ));
    }
    auth::verify_jwt(secret.as_bytes(), token, auth::now_unix())
        .map_err(|e| Status::unauthenticated(format!("authorization: {e}")))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bearer_must_be_a_valid_jwt_never_the_raw_secret() {
        let now = auth::now_unix();
        let jwt = auth::sign_jwt(b"s3cret", now);
        assert!(check_bearer("s3cret", Some(&jwt)).is_ok());
        let raw = check_bearer("s3cret", Some("s3cret")).unwrap_err();
        assert!(raw.message().contains("send the JWT"), "{raw:?}");
        assert!(check_bearer("s3cret", None).is_err());
        assert!(check_bearer("other", Some(&jwt)).is_err());
        let old = auth::sign_jwt(b"s3cret", now - 600);
        assert!(check_bearer("s3cret", Some(&old)).is_err());
    }
}
