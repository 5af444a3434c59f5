//! What a door answers on a path it does not serve. Without this, the gRPC
//! router's catch-all answered every unknown URL with HTTP 200 and a gRPC
//! "unimplemented" trailer, which a hook took for success.

use axum::http::{HeaderValue, Request, StatusCode, header};
use axum::response::{IntoResponse, Response};

/// gRPC callers get the gRPC status `UNIMPLEMENTED` (as gRPC requires);
/// everyone else a 404 with a JSON error.
pub async fn not_found<B>(req: Request<B>) -> Response {
    let grpc = req
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"));
    if grpc {
        return tonic::Status::unimplemented(format!("no such method: {}", req.uri().path()))
            .into_http();
    }
    let mut response = (
        StatusCode::NOT_FOUND,
        axum::Json(serde_json::json!({
            "error": "no such endpoint",
            "method": req.method().as_str(),
            "path": req.uri().path(),
        })),
    )
        .into_response();
    response
        .headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}
