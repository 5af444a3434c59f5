//! GitLab-compatible `POST /api/v4/internal/post_receive`.

use axum::Router;
use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, State};
use axum::http::{HeaderMap, HeaderValue, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use pushbus_shared::envelope;
use pushbus_shared::proto::HookMessage;
use serde::Deserialize;
use serde_json::json;
use tracing::Instrument;

use crate::auth;
use crate::changes::{self, Invalid};
use crate::ingest::{Ingest, IngestError, Push};

#[derive(Clone)]
pub struct HttpState {
    pub ingest: Ingest,
    /// The GitLab shell secret; `None` disables authentication (local use).
    pub secret: Option<String>,
}

pub fn router(state: HttpState, max_body_bytes: usize) -> Router {
    Router::new()
        .route("/api/v4/internal/post_receive", post(post_receive))
        .layer(DefaultBodyLimit::max(max_body_bytes))
        .with_state(state)
}

/// A refusal: status plus `{"error": ..., "field": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
}

impl ApiError {
    fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> Self {
        Self {
            status,
            error: error.into(),
            field: field.map(str::to_owned),
        }
    }
}

impl From<Invalid> for ApiError {
    fn from(e: Invalid) -> Self {
        Self::new(StatusCode::UNPROCESSABLE_ENTITY, e.reason, Some(&e.field))
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        tracing::warn!(status = self.status.as_u16(), error = %self.error, field = ?self.field, "post_receive refused");
        (
            self.status,
            axum::Json(json!({ "error": self.error, "field": self.field })),
        )
            .into_response()
    }
}

#[derive(Deserialize)]
struct Body {
    gl_repository: Option<String>,
    identifier: Option<String>,
    changes: Option<String>,
    #[serde(default)]
    push_options: Vec<String>,
    #[serde(default)]
    geo_node_id: Option<serde_json::Value>,
    /// Not sent by Gitaly; pushbus' own hook sends it so filters can match by path.
    #[serde(default)]
    gl_project_path: Option<String>,
    #[serde(default)]
    protocol: Option<String>,
    /// Not sent by Gitaly; pushbus' own hook reads it from the repository's HEAD.
    #[serde(default)]
    default_branch: Option<String>,
    #[serde(default)]
    secret_token: Option<String>,
    /// pushbus' own hook: ref -> paths changed by that ref's update.
    #[serde(default)]
    pushbus_changed_paths: std::collections::HashMap<String, Vec<String>>,
}

async fn post_receive(
    State(st): State<HttpState>,
    headers: HeaderMap,
    body: Result<Bytes, axum::extract::rejection::BytesRejection>,
) -> Result<Response, ApiError> {
    let body = body.map_err(|e| ApiError::new(e.status(), e.body_text(), None))?;
    let parsed: Body = serde_json::from_slice(&body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
            None,
        )
    })?;
    authenticate(&st, &headers, parsed.secret_token.as_deref())?;
    let (correlation_id, from_caller) = match caller_correlation_id(&headers) {
        Some(id) => (id, true),
        None => (envelope::new_correlation_id(), false),
    };
    let mut push = to_push(parsed)?;
    push.correlation_from_caller = from_caller;
    let span = tracing::info_span!(
        "post_receive",
        otel.name = "POST /api/v4/internal/post_receive",
        otel.kind = "server",
        %correlation_id,
        project_id = push.project_id
    );
    // GitLab's trace (its traceparent header) continues into pushbus.
    pushbus_shared::trace::continue_from(&span, |k| headers.get(k).and_then(|v| v.to_str().ok()));
    let accepted = st
        .ingest
        .accept(push, correlation_id)
        .instrument(span)
        .await
        .map_err(|e| match e {
            IngestError::Unavailable(reason) => {
                ApiError::new(StatusCode::SERVICE_UNAVAILABLE, reason, None)
            }
        })?;
    let body = json!({
        "reference_counter_decreased": true,
        "messages": accepted.messages.iter().map(message_json).collect::<Vec<_>>(),
        "correlation_id": accepted.correlation_id,
        "event_ids": accepted.event_ids,
    });
    let mut resp = (StatusCode::OK, axum::Json(body)).into_response();
    if let Ok(v) = HeaderValue::from_str(&accepted.correlation_id) {
        resp.headers_mut().insert("x-correlation-id", v);
    }
    Ok(resp)
}

fn message_json(m: &HookMessage) -> serde_json::Value {
    json!({ "type": m.r#type, "message": m.message })
}

fn authenticate(
    st: &HttpState,
    headers: &HeaderMap,
    secret_token: Option<&str>,
) -> Result<(), ApiError> {
    let Some(secret) = &st.secret else {
        return Ok(());
    };
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let creds = auth::Credentials {
        jwt: header(auth::JWT_HEADER),
        legacy_header: header(auth::LEGACY_HEADER),
        secret_token,
    };
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs() as i64);
    auth::check(secret, &creds, now)
        .map_err(|e| ApiError::new(StatusCode::UNAUTHORIZED, e.to_string(), None))
}

/// From `X-Correlation-Id` or `X-Request-Id` when well-formed, else new.
pub fn correlation_id(headers: &HeaderMap) -> String {
    caller_correlation_id(headers).unwrap_or_else(envelope::new_correlation_id)
}

/// The caller's well-formed `X-Correlation-Id` or `X-Request-Id`, if any; a
/// malformed one is ignored (and a fresh ID minted by the caller of this).
pub fn caller_correlation_id(headers: &HeaderMap) -> Option<String> {
    ["x-correlation-id", "x-request-id"]
        .iter()
        .filter_map(|h| headers.get(*h).and_then(|v| v.to_str().ok()))
        .find(|v| envelope::is_valid_correlation_id(v))
        .map(str::to_owned)
}

fn to_push(b: Body) -> Result<Push, ApiError> {
    let missing =
        |f: &str| ApiError::new(StatusCode::BAD_REQUEST, format!("{f} is required"), Some(f));
    let gl_repository = b.gl_repository.ok_or_else(|| missing("gl_repository"))?;
    let (repository_kind, project_id) = changes::parse_gl_repository(&gl_repository)?;
    let identifier = b.identifier.ok_or_else(|| missing("identifier"))?;
    let mut changes = changes::parse_changes(&b.changes.ok_or_else(|| missing("changes"))?)?;
    changes::attach_paths(&mut changes, b.pushbus_changed_paths)?;
    let geo_node_id = match b.geo_node_id {
        None | Some(serde_json::Value::Null) => None,
        Some(serde_json::Value::Number(n)) => Some(n.to_string()),
        Some(serde_json::Value::String(s)) => Some(s),
        Some(_) => return Err(Invalid::new("geo_node_id", "must be a string or a number").into()),
    };
    let project_path = b.gl_project_path.unwrap_or_default();
    let push = Push {
        project_id,
        project_path,
        repository_kind,
        changes,
        actor: identifier,
        protocol: b.protocol.unwrap_or_else(|| "http".into()),
        push_options: b.push_options,
        geo_node_id,
        default_branch: b.default_branch.unwrap_or_default(),
        correlation_from_caller: false,
    };
    push.validate("gl_project_path")?;
    Ok(push)
}
