//! Serving a door (hook-ingest, gitops-notifier) so slow or greedy clients
//! cannot take it down: a bounded number of connections, a deadline for the
//! TLS handshake and for each request head, HTTP/2 stream and header caps,
//! optional TLS, and (through [`guard_requests`]) a request deadline and a
//! bound on requests in flight. `axum::serve` offers none of the connection
//! limits, hence hyper-util's server builder.

use std::future::Future;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use axum::Router;
use axum::extract::{ConnectInfo, Request, State};
use axum::http::{HeaderValue, StatusCode, header};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::service::TowerToHyperService;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tower::ServiceExt;

mod flags;
pub use flags::{Door, DoorFlags};

/// Request headers (names and values) a door accepts, JSON 431 past it.
pub const DEFAULT_MAX_HEADER_BYTES: usize = 32 * 1024;

/// How a door's listener is bounded.
#[derive(Clone, Debug)]
pub struct Limits {
    /// TLS handshake, first bytes and every HTTP/1 request head must arrive
    /// within this.
    pub header_read_timeout: Duration,
    /// Open connections; one over it is closed at once.
    pub max_connections: usize,
    /// HTTP/2 streams per connection.
    pub max_streams_per_connection: u32,
    /// Largest request head hyper buffers (HTTP/1 head, HTTP/2 header
    /// list); past it hyper answers 431 itself, without a body. Keep it above
    /// [`RequestLimits::max_header_bytes`], which refuses with a JSON body.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            header_read_timeout: Duration::from_secs(5),
            max_connections: 1024,
            max_streams_per_connection: 256,
            max_header_bytes: 2 * DEFAULT_MAX_HEADER_BYTES,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read TLS certificate file {path}: {reason}")]
    Cert { path: PathBuf, reason: String },
    #[error("cannot read TLS key file {path}: {reason}")]
    Key { path: PathBuf, reason: String },
    #[error("{0} is set without {1}: give both the certificate and the key")]
    Half(String, String),
    #[error("invalid TLS certificate or key: {0}")]
    Config(#[source] rustls::Error),
}

/// A rustls server config from PEM files (certificate chain, private key);
/// offers HTTP/2 (gRPC needs it) and HTTP/1.1 by ALPN.
pub fn tls_config(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(cert)
        .and_then(|it| it.collect::<Result<Vec<_>, _>>())
        .map_err(|e| TlsError::Cert {
            path: cert.to_owned(),
            reason: e.to_string(),
        })?;
    if certs.is_empty() {
        return Err(TlsError::Cert {
            path: cert.to_owned(),
            reason: "no certificate in the file".into(),
        });
    }
    let key_der = PrivateKeyDer::from_pem_file(key).map_err(|e| TlsError::Key {
        path: key.to_owned(),
        // The error names the PEM problem, never key material.
        reason: e.to_string(),
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(TlsError::Config)?
    .with_no_client_auth()
    .with_single_cert(certs, key_der)
    .map_err(TlsError::Config)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

/// Serves `app` on `listener` until `shutdown`, then lets open requests
/// finish. Every request carries `ConnectInfo<SocketAddr>` of its peer.
pub async fn serve(
    listener: TcpListener,
    app: Router,
    limits: Limits,
    tls: Option<Arc<rustls::ServerConfig>>,
    shutdown: impl Future<Output = ()> + Send,
) {
    let connections = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let acceptor = tls.map(tokio_rustls::TlsAcceptor::from);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192));
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(limits.max_streams_per_connection)
        .max_header_list_size(limits.max_header_bytes as u32)
        // A peer that stops answering pings is dropped, so a dead or stalled
        // HTTP/2 client does not hold its connection forever.
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(10));
    let builder = Arc::new(builder);
    tokio::pin!(shutdown);
    loop {
        let (stream, peer) = tokio::select! {
            _ = &mut shutdown => break,
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of
                    // spinning on the error.
                    tracing::warn!(%err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Ok(permit) = connections.clone().try_acquire_owned() else {
            metrics::counter!("pushbus_listener_refused_connections_total").increment(1);
            tracing::debug!(%peer, limit = limits.max_connections, "connection limit reached; connection closed");
            drop(stream);
            continue;
        };
        let _ = stream.set_nodelay(true);
        let service = TowerToHyperService::new(app.clone().map_request(
            move |mut req: Request<hyper::body::Incoming>| {
                req.extensions_mut().insert(ConnectInfo(peer));
                req
            },
        ));
        let builder = builder.clone();
        let acceptor = acceptor.clone();
        let timeout = limits.header_read_timeout;
        let watcher = graceful.watcher();
        tokio::spawn(async move {
            let _permit = permit;
            match acceptor {
                Some(acceptor) => {
                    let tls = match tokio::time::timeout(timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls)) => tls,
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, %err, "TLS handshake failed");
                            return;
                        }
                        Err(_) => {
                            tracing::debug!(%peer, "TLS handshake timed out");
                            return;
                        }
                    };
                    let conn = builder.serve_connection_with_upgrades(TokioIo::new(tls), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
                None => {
                    // hyper's version detection waits for bytes without a
                    // deadline: a silent connection must not stay forever.
                    let mut first = [0u8; 1];
                    match tokio::time::timeout(timeout, stream.peek(&mut first)).await {
                        Ok(Ok(n)) if n > 0 => {}
                        _ => return,
                    }
                    let conn =
                        builder.serve_connection_with_upgrades(TokioIo::new(stream), service);
                    let _ = watcher.watch(conn.into_owned()).await;
                }
            }
        });
    }
    drop(listener);
    graceful.shutdown().await;
}

/// The request deadline and in-flight bound of [`guard_requests`].
#[derive(Clone, Debug)]
pub struct RequestLimits {
    /// Until the response head; `None` for none. Long-lived streams (SSE,
    /// gRPC watch) are not cut: their handler has answered by then.
    pub timeout: Option<Duration>,
    /// Requests being handled at once. One over it waits for a slot up to
    /// `queue_wait`, then is refused (503 / RESOURCE_EXHAUSTED): a stall of
    /// the bus for a moment must not turn into refused pushes, which only
    /// a caller that spools (our hook) replays. Waiting costs only the
    /// request's head: the body is read once the request has its slot.
    pub max_in_flight: usize,
    pub queue_wait: Duration,
    /// Flag names for the refusals, so an operator knows what to raise.
    pub timeout_flag: String,
    pub in_flight_flag: String,
    pub queue_wait_flag: String,
    /// Header names and values, summed; more is a 431 with the JSON error.
    pub max_header_bytes: usize,
}

struct Guard {
    limits: RequestLimits,
    in_flight: Semaphore,
}

/// Adds the request deadline and the in-flight bound to `router`.
pub fn guard_requests(router: Router, limits: RequestLimits) -> Router {
    let guard = Arc::new(Guard {
        in_flight: Semaphore::new(limits.max_in_flight.max(1)),
        limits,
    });
    router.layer(axum::middleware::from_fn_with_state(guard, guarded))
}

async fn guarded(State(guard): State<Arc<Guard>>, req: Request, next: Next) -> Response {
    let grpc = is_grpc(&req);
    match guard.run(req, next).await {
        Ok(response) => response,
        Err(refused) => {
            let (status, code) = refused.status();
            refusal(grpc, status, code, refused.to_string())
        }
    }
}

/// Why [`guard_requests`] answered instead of the handler; the texts name
/// the flag an operator would raise.
#[derive(Debug, thiserror::Error)]
enum Refused<'a> {
    #[error("request headers too large ({bytes} bytes, limit {limit})")]
    HeadersTooLarge { bytes: usize, limit: usize },
    #[error(
        "too many requests in flight (limit {limit}, {flag}; none finished within {waited_ms} ms, {wait_flag})"
    )]
    Busy {
        limit: usize,
        flag: &'a str,
        waited_ms: u128,
        wait_flag: &'a str,
    },
    #[error("request not completed within {limit_ms} ms ({flag})")]
    TooSlow { limit_ms: u128, flag: &'a str },
}

impl Refused<'_> {
    fn status(&self) -> (StatusCode, tonic::Code) {
        match self {
            Refused::HeadersTooLarge { .. } => (
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                tonic::Code::InvalidArgument,
            ),
            Refused::Busy { .. } => (
                StatusCode::SERVICE_UNAVAILABLE,
                tonic::Code::ResourceExhausted,
            ),
            Refused::TooSlow { .. } => (StatusCode::REQUEST_TIMEOUT, tonic::Code::DeadlineExceeded),
        }
    }
}

impl Guard {
    async fn run(&self, req: Request, next: Next) -> Result<Response, Refused<'_>> {
        let limits = &self.limits;
        let bytes: usize = req
            .headers()
            .iter()
            .map(|(k, v)| k.as_str().len() + v.len())
            .sum();
        if bytes > limits.max_header_bytes {
            return Err(Refused::HeadersTooLarge {
                bytes,
                limit: limits.max_header_bytes,
            });
        }
        let slot = match self.in_flight.try_acquire() {
            Ok(permit) => Some(permit),
            Err(_) => {
                metrics::counter!("pushbus_listener_queued_requests_total").increment(1);
                tokio::time::timeout(limits.queue_wait, self.in_flight.acquire())
                    .await
                    .ok()
                    .and_then(Result::ok)
            }
        };
        let Some(_permit) = slot else {
            metrics::counter!("pushbus_listener_refused_requests_total").increment(1);
            return Err(Refused::Busy {
                limit: limits.max_in_flight,
                flag: &limits.in_flight_flag,
                waited_ms: limits.queue_wait.as_millis(),
                wait_flag: &limits.queue_wait_flag,
            });
        };
        let Some(limit) = limits.timeout else {
            return Ok(next.run(req).await);
        };
        tokio::time::timeout(limit, next.run(req))
            .await
            .map_err(|_| Refused::TooSlow {
                limit_ms: limit.as_millis(),
                flag: &limits.timeout_flag,
            })
    }
}

pub fn is_grpc<B>(req: &axum::http::Request<B>) -> bool {
    req.headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .is_some_and(|ct| ct.starts_with("application/grpc"))
}

/// A refusal in the caller's protocol: a gRPC status, or HTTP `status` with
/// `{"error", "field"}`.
pub fn refusal(grpc: bool, status: StatusCode, code: tonic::Code, message: String) -> Response {
    if grpc {
        return tonic::Status::new(code, message).into_http();
    }
    json_error(status, &message, None)
}

/// `{"error": message, "field": field}` with `status`, as every door refuses.
pub fn json_error(status: StatusCode, message: &str, field: Option<&str>) -> Response {
    let mut resp = (
        status,
        axum::Json(serde_json::json!({ "error": message, "field": field })),
    )
        .into_response();
    resp.headers_mut()
        .insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    resp
}

/// Gives the framework's own refusals (405, 413, 415, ... with a text or
/// empty body) the JSON error body every other refusal has.
pub fn json_framework_errors(router: Router) -> Router {
    router.layer(axum::middleware::map_response(
        |resp: Response| async move { jsonify(resp) },
    ))
}

fn jsonify(resp: Response) -> Response {
    let status = resp.status();
    if !(status.is_client_error() || status.is_server_error()) {
        return resp;
    }
    let ct = resp
        .headers()
        .get(header::CONTENT_TYPE)
        .and_then(|v| v.to_str().ok())
        .unwrap_or("");
    // Ours already (JSON), or gRPC (a status in headers, HTTP 200).
    if ct.starts_with("application/json") || ct.starts_with("application/grpc") {
        return resp;
    }
    let message = match status {
        StatusCode::METHOD_NOT_ALLOWED => "method not allowed".to_owned(),
        StatusCode::PAYLOAD_TOO_LARGE => "request body too large".to_owned(),
        StatusCode::UNSUPPORTED_MEDIA_TYPE => "unsupported content type".to_owned(),
        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE => "request headers too large".to_owned(),
        s => s.canonical_reason().unwrap_or("request refused").to_owned(),
    };
    let allow = resp.headers().get(header::ALLOW).cloned();
    let mut out = json_error(status, &message, None);
    if let Some(allow) = allow {
        out.headers_mut().insert(header::ALLOW, allow);
    }
    out
}

/// The peer of a request served by [`serve`].
pub fn peer<B>(req: &axum::http::Request<B>) -> Option<SocketAddr> {
    req.extensions()
        .get::<ConnectInfo<SocketAddr>>()
        .map(|c| c.0)
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    async fn start(limits: Limits) -> SocketAddr {
        let app = Router::new().route(
            "/slow",
            axum::routing::post(|body: String| async move {
                tokio::time::sleep(Duration::from_millis(1200)).await;
                format!("done {}", body.len())
            }),
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(listener, app, limits, None, std::future::pending()));
        addr
    }

    // The head deadline is for reading the head only: a slow answer to a
    // request whose head and body arrived in time is still sent.
    #[tokio::test]
    async fn a_slow_answer_outlives_the_header_read_timeout() {
        let addr = start(Limits {
            header_read_timeout: Duration::from_millis(300),
            ..Default::default()
        })
        .await;
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        s.write_all(b"POST /slow HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n\r\nhello")
            .await
            .unwrap();
        let mut out = Vec::new();
        let mut buf = [0u8; 1024];
        while !String::from_utf8_lossy(&out).contains("done") {
            let n = tokio::time::timeout(Duration::from_secs(3), s.read(&mut buf))
                .await
                .expect("answer in time")
                .unwrap();
            assert!(n > 0, "closed: {}", String::from_utf8_lossy(&out));
            out.extend_from_slice(&buf[..n]);
        }
        assert!(String::from_utf8_lossy(&out).starts_with("HTTP/1.1 200"));
    }

    /// A door of one slot, taken by a `/hold` request (`held`) until
    /// `release` is notified.
    struct OneSlot {
        addr: SocketAddr,
        held: tokio::task::JoinHandle<String>,
        release: Arc<tokio::sync::Notify>,
    }

    async fn one_slot(queue_wait: Duration) -> OneSlot {
        let entered = Arc::new(tokio::sync::Notify::new());
        let release = Arc::new(tokio::sync::Notify::new());
        let (e, r) = (entered.clone(), release.clone());
        let app = Router::new()
            .route(
                "/hold",
                axum::routing::get(move || async move {
                    e.notify_one();
                    r.notified().await
                }),
            )
            .route("/quick", axum::routing::get(|| async { "quick" }));
        let app = guard_requests(
            app,
            RequestLimits {
                timeout: Some(Duration::from_secs(30)),
                max_in_flight: 1,
                queue_wait,
                timeout_flag: "--x-request-timeout-ms".into(),
                in_flight_flag: "--x-max-requests".into(),
                queue_wait_flag: "--x-queue-wait-ms".into(),
                max_header_bytes: DEFAULT_MAX_HEADER_BYTES,
            },
        );
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        tokio::spawn(serve(
            listener,
            app,
            Limits::default(),
            None,
            std::future::pending(),
        ));
        let held = get(addr, "/hold").await;
        entered.notified().await;
        OneSlot {
            addr,
            held,
            release,
        }
    }

    /// Sends `GET path` on a new connection; the whole answer once it comes.
    async fn get(addr: SocketAddr, path: &str) -> tokio::task::JoinHandle<String> {
        let mut s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let head = format!("GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n");
        s.write_all(head.as_bytes()).await.unwrap();
        tokio::spawn(async move {
            let mut out = Vec::new();
            let _ = s.read_to_end(&mut out).await;
            String::from_utf8_lossy(&out).into_owned()
        })
    }

    /// The answer, which must come within 10 s.
    async fn answer_within(answer: tokio::task::JoinHandle<String>, what: &str) -> String {
        let answer = tokio::time::timeout(Duration::from_secs(10), answer).await;
        answer
            .unwrap_or_else(|_| panic!("no answer in time: {what}"))
            .unwrap()
    }

    #[tokio::test]
    async fn a_request_over_the_limit_waits_for_a_slot() {
        let door = one_slot(Duration::from_secs(20)).await;
        let waiting = get(door.addr, "/quick").await;
        tokio::time::sleep(Duration::from_millis(300)).await;
        assert!(!waiting.is_finished(), "answered while the slot was held");
        door.release.notify_one();
        assert!(door.held.await.unwrap().starts_with("HTTP/1.1 200"));
        let answer = answer_within(waiting, "the waiting request got the freed slot").await;
        assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
        assert!(answer.ends_with("quick"), "{answer}");
    }

    #[tokio::test]
    async fn a_request_over_the_limit_is_refused_once_its_wait_is_over() {
        let door = one_slot(Duration::from_millis(100)).await;
        let answer = get(door.addr, "/quick").await;
        let answer =
            answer_within(answer, "refused once its wait was over, not left waiting").await;
        assert!(answer.starts_with("HTTP/1.1 503"), "{answer}");
        assert!(answer.contains("limit 1, --x-max-requests"), "{answer}");
        assert!(
            answer.contains("within 100 ms, --x-queue-wait-ms"),
            "{answer}"
        );
        door.release.notify_one();
        assert!(door.held.await.unwrap().starts_with("HTTP/1.1 200"));
    }
}
