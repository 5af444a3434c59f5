//! GitLab-compatible `POST /api/v4/internal/post_receive`.

use axum::Router;
use axum::body::{Body as RequestBody, Bytes};
use axum::extract::State;
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

/// What both doors (HTTP here, gRPC in `grpc`) answer with: the ingest path
/// and the shell secret; the body limits apply to the HTTP door only.
#[derive(Clone)]
pub struct DoorState {
    pub ingest: Ingest,
    /// The GitLab shell secret; `None` disables authentication (local use).
    pub secret: Option<String>,
    /// Largest body read from an authenticated caller (or any, without a secret).
    pub max_body_bytes: usize,
    /// Largest body read while the caller is not yet authenticated (the
    /// legacy `secret_token` field is in it).
    pub unauthenticated_body_bytes: usize,
}

pub fn router(state: DoorState) -> Router {
    // Behind an Arc: axum clones the state for every request, and a
    // DoorState holds NATS clients and strings.
    Router::new()
        .route("/api/v4/internal/post_receive", post(post_receive))
        .with_state(std::sync::Arc::new(state))
}

/// Deepest JSON nesting accepted anywhere in a body, unknown fields
/// included (serde skips those without its recursion limit).
pub const MAX_JSON_DEPTH: usize = 32;

/// A refusal: status plus `{"error": ..., "field": ...}`.
#[derive(Debug)]
pub struct ApiError {
    status: StatusCode,
    error: String,
    field: Option<String>,
    /// Answered before the body was read: the connection cannot be reused
    /// (the unread body is still on it), so the client is told.
    close: bool,
}

impl ApiError {
    pub fn status(&self) -> StatusCode {
        self.status
    }

    fn new(status: StatusCode, error: impl Into<String>, field: Option<&str>) -> Self {
        Self {
            status,
            error: error.into(),
            field: field.map(str::to_owned),
            close: false,
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
        let mut resp = (
            self.status,
            axum::Json(json!({ "error": self.error, "field": self.field })),
        )
            .into_response();
        if self.close {
            resp.headers_mut().insert(
                axum::http::header::CONNECTION,
                HeaderValue::from_static("close"),
            );
        }
        resp
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
    State(st): State<std::sync::Arc<DoorState>>,
    headers: HeaderMap,
    body: RequestBody,
) -> Result<Response, ApiError> {
    // Header credentials are checked before a byte of the body is read; only
    // the legacy body field needs the body, and then only a small one.
    let authenticated = authenticate_headers(&st, &headers).map_err(|mut e| {
        e.close = true;
        e
    })?;
    let limit = if authenticated {
        st.max_body_bytes
    } else {
        st.unauthenticated_body_bytes.min(st.max_body_bytes)
    };
    let body = read_body(body, &headers, limit, authenticated)?.await?;
    let parsed = parse_body(&body)?;
    if !authenticated {
        authenticate_body(&st, parsed.secret_token.as_deref())?;
    }
    let from_header = |k: &str| headers.get(k).and_then(|v| v.to_str().ok());
    let (correlation_id, from_caller) = match envelope::caller_correlation_id(from_header) {
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
        .map_err(|e: IngestError| {
            ApiError::new(StatusCode::SERVICE_UNAVAILABLE, e.to_string(), None)
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

/// Whether the headers authenticate the caller: true also without a secret
/// configured; false when they carry no credentials (the body may); an
/// error for credentials that are wrong.
fn authenticate_headers(st: &DoorState, headers: &HeaderMap) -> Result<bool, ApiError> {
    let Some(secret) = &st.secret else {
        return Ok(true);
    };
    let header = |name| {
        headers
            .get(name)
            .and_then(|v: &HeaderValue| v.to_str().ok())
    };
    let creds = auth::Credentials {
        jwt: header(auth::JWT_HEADER),
        legacy_header: header(auth::LEGACY_HEADER),
        secret_token: None,
    };
    if creds.jwt.is_none() && creds.legacy_header.is_none() {
        return Ok(false);
    }
    auth::check(secret, &creds, auth::now_unix())
        .map(|()| true)
        .map_err(unauthorized)
}

fn authenticate_body(st: &DoorState, secret_token: Option<&str>) -> Result<(), ApiError> {
    let Some(secret) = &st.secret else {
        return Ok(());
    };
    let creds = auth::Credentials {
        jwt: None,
        legacy_header: None,
        secret_token,
    };
    auth::check(secret, &creds, auth::now_unix()).map_err(unauthorized)
}

fn unauthorized(e: auth::AuthError) -> ApiError {
    ApiError::new(StatusCode::UNAUTHORIZED, e.to_string(), e.field())
}

/// Reads at most `limit` bytes; a declared or actual larger body is refused
/// saying what would allow it. Before authentication that is a 401, not a
/// 413: the body is not at fault, its sender is not yet known, and a hook
/// spools a 401 (its secret may be missing) where it drops a 413.
fn too_large(limit: usize, authenticated: bool) -> ApiError {
    let mut e = if authenticated {
        ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            format!("body larger than {limit} bytes (--ingest-max-body-bytes)"),
            None,
        )
    } else {
        ApiError::new(
            StatusCode::UNAUTHORIZED,
            format!(
                "body larger than {limit} bytes before authentication: send the \
                 Gitlab-Shell-Api-Request JWT (or Gitlab-Shared-Secret) header"
            ),
            Some(auth::JWT_HEADER),
        )
    };
    e.close = true;
    e
}

fn read_body(
    body: RequestBody,
    headers: &HeaderMap,
    limit: usize,
    authenticated: bool,
) -> Result<impl std::future::Future<Output = Result<Bytes, ApiError>>, ApiError> {
    let declared = headers
        .get(axum::http::header::CONTENT_LENGTH)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.parse::<u64>().ok());
    if declared.is_some_and(|n| n > limit as u64) {
        return Err(too_large(limit, authenticated));
    }
    Ok(async move {
        use http_body_util::BodyExt;
        match http_body_util::Limited::new(body, limit).collect().await {
            Ok(collected) => Ok(collected.to_bytes()),
            Err(e) if e.is::<http_body_util::LengthLimitError>() => {
                Err(too_large(limit, authenticated))
            }
            Err(e) => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                format!("cannot read the body: {e}"),
                None,
            )),
        }
    })
}

/// A post_receive body as the HTTP door reads it: parsed, depth-checked and
/// validated (authentication aside). What the fuzz tests drive.
pub fn parse_post_receive(body: &[u8]) -> Result<Push, ApiError> {
    to_push(parse_body(body)?)
}

/// Parses a post_receive body, refusing nesting deeper than [`MAX_JSON_DEPTH`].
fn parse_body(body: &[u8]) -> Result<Body, ApiError> {
    if let Err(depth) = check_json_depth(body, MAX_JSON_DEPTH) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: nested deeper than {depth} levels"),
            None,
        ));
    }
    serde_json::from_slice(body).map_err(|e| {
        ApiError::new(
            StatusCode::BAD_REQUEST,
            format!("invalid JSON body: {e}"),
            None,
        )
    })
}

/// Counts `[`/`{` nesting outside strings; `Err(max)` when it goes deeper.
/// Malformed JSON is left to the parser.
pub fn check_json_depth(body: &[u8], max: usize) -> Result<(), usize> {
    let (mut depth, mut in_string, mut escaped) = (0usize, false, false);
    for &b in body {
        if in_string {
            match (escaped, b) {
                (true, _) => escaped = false,
                (false, b'\\') => escaped = true,
                (false, b'"') => in_string = false,
                _ => {}
            }
            continue;
        }
        match b {
            b'"' => in_string = true,
            b'[' | b'{' => {
                depth += 1;
                if depth > max {
                    return Err(max);
                }
            }
            b']' | b'}' => depth = depth.saturating_sub(1),
            _ => {}
        }
    }
    Ok(())
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
