//! `GET /v1/agents/{agent_id}/pokes`: pokes as Server-Sent Events, for agents
//! and for `curl -N`.

use std::convert::Infallible;

use axum::extract::{Path, Query, State};
use axum::http::{HeaderMap, StatusCode, header};
use axum::response::sse::{Event as SseEvent, KeepAlive, Sse};
use axum::response::{IntoResponse, Response};
use axum::{Json, Router, routing::get};
use futures::StreamExt;
use pushbus_shared::proto::{
    self, WatchEvent, notifier_status::State as NotifierState, watch_event::Event,
};
use serde_json::json;

use crate::AppState;
use crate::agent_stream::{self, Since};
use crate::auth::AuthError;
use crate::conn::Out;
use crate::hub::CapExceeded;

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/v1/agents/{agent_id}/pokes", get(pokes))
        .with_state(state)
}

/// `?since=<cursor>` (or the `Last-Event-ID` an EventSource sends on
/// reconnect) asks for catch-up first.
#[derive(serde::Deserialize, Default)]
struct PokesQuery {
    since: Option<String>,
}

async fn pokes(
    State(st): State<AppState>,
    Path(agent_id): Path<String>,
    Query(query): Query<PokesQuery>,
    headers: HeaderMap,
    parts: axum::http::request::Parts,
) -> Response {
    let peer = parts
        .extensions
        .get::<axum::extract::ConnectInfo<std::net::SocketAddr>>()
        .map(|c| c.0.ip());
    let token = pushbus_shared::secret::bearer_header(&headers);
    let since = query.since.or_else(|| {
        headers
            .get("last-event-id")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    });
    let cursor = match since.as_deref().map(str::parse::<u64>) {
        None => None,
        Some(Ok(c)) => Some(c),
        Some(Err(_)) => {
            let error = json!({ "error": "since / Last-Event-ID must be a cursor (an unsigned integer)", "field": "since" });
            return (StatusCode::BAD_REQUEST, Json(error)).into_response();
        }
    };
    let credential = match st
        .gate
        .authenticate(&st.agents, &agent_id, token, peer)
        .await
    {
        Ok(c) => c,
        Err(err) => {
            let status = err.http_status();
            tracing::info!(%agent_id, error = %err, "SSE watch refused");
            let mut resp = (
                status,
                Json(json!({ "error": err.to_string(), "field": "authorization" })),
            )
                .into_response();
            if let AuthError::Throttled {
                retry_after_secs, ..
            } = err
            {
                resp.headers_mut()
                    .insert(header::RETRY_AFTER, retry_after_secs.into());
            }
            return resp;
        }
    };
    let events = match agent_stream::open(
        &st,
        &agent_id,
        &credential,
        Since::from_request(cursor, &[]),
    )
    .await
    {
        Ok(events) => events,
        Err(cap) => {
            let status = match cap {
                CapExceeded::PerAgent(_) => StatusCode::TOO_MANY_REQUESTS,
                CapExceeded::Total(_) => StatusCode::SERVICE_UNAVAILABLE,
            };
            tracing::info!(%agent_id, error = %cap, "SSE watch refused");
            return (
                status,
                Json(json!({ "error": cap.to_string(), "field": null })),
            )
                .into_response();
        }
    };
    tracing::info!(%agent_id, cursor = ?cursor, "agent connected over SSE");
    let events = events.map(|out| {
        Ok::<_, Infallible>(match out {
            Out::Event(ev) => to_sse(&ev),
            // The last event: why the notifier ended the stream.
            Out::Closed(reason) => SseEvent::default()
                .event("closed")
                .data(json!({ "reason": reason }).to_string()),
        })
    });
    Sse::new(events)
        .keep_alive(KeepAlive::default())
        .into_response()
}

fn to_sse(ev: &WatchEvent) -> SseEvent {
    match &ev.event {
        Some(Event::Poke(p)) => SseEvent::default()
            .event("poke")
            // The cursor, so an EventSource resumes with Last-Event-ID.
            .id(ev.cursor.to_string())
            .data(
                json!({
                    "event_id": ev.event_id,
                    "correlation_id": ev.correlation_id,
                    "agent_id": p.agent_id,
                    "project_id": p.project_id,
                    "project_path": p.project_path,
                    "ref": p.r#ref,
                    "ref_kind": proto::ref_kind_name(p.ref_kind),
                    "change": proto::change_kind_name(p.change_kind),
                    "forced": p.forced,
                    "old_sha": p.old_sha,
                    "new_sha": p.new_sha,
                    "push_event_id": p.push_event_id,
                    "default_branch": p.default_branch,
                    "cursor": ev.cursor,
                    "catch_up": ev.catch_up,
                })
                .to_string(),
            ),
        Some(Event::Status(s)) => {
            let state = match NotifierState::try_from(s.state) {
                Ok(NotifierState::Live) => "live",
                Ok(NotifierState::Degraded) => "degraded",
                _ => "unknown",
            };
            let event = SseEvent::default().event("status").data(
                json!({ "state": state, "detail": s.detail, "cursor": ev.cursor }).to_string(),
            );
            // Always a resume point for EventSource's Last-Event-ID, 0
            // included (a notifier with no heads yet).
            event.id(ev.cursor.to_string())
        }
        None => SseEvent::default().comment("empty"),
    }
}
