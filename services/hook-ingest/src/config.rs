//! hook-ingest's flags: where it listens, how it authenticates pushers,
//! how long a push may wait for its store and its lag message, and the
//! door's limits and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use crate::geo_routes;

#[derive(clap::Args, Clone, Debug)]
#[group(id = "ingest")]
pub struct Config {
    /// Address of the GitLab-compatible internal API.
    #[arg(
        id = "ingest_listen",
        long = "ingest-listen",
        env = "PUSHBUS_INGEST_LISTEN",
        default_value = "127.0.0.1:8080"
    )]
    pub listen: SocketAddr,
    /// File holding the GitLab shell shared secret; without it the endpoint
    /// accepts unauthenticated calls (local use only).
    #[arg(long = "ingest-secret-file", env = "PUSHBUS_INGEST_SECRET_FILE")]
    pub secret_file: Option<PathBuf>,
    /// Largest accepted request body.
    #[arg(long = "ingest-max-body-bytes", env = "PUSHBUS_INGEST_MAX_BODY_BYTES", default_value_t = 8 * 1024 * 1024)]
    pub max_body_bytes: usize,
    /// How long a Geo push may wait for its replication-lag message.
    #[arg(
        long = "ingest-lag-budget-ms",
        env = "PUSHBUS_INGEST_LAG_BUDGET_MS",
        default_value_t = 250
    )]
    pub lag_budget_ms: u64,
    /// Look up the Geo node of pushes that name none by their correlation ID
    /// in pushbus-geo-push-routes (the front-end cache variant). Off by
    /// default: it costs every such push a KV read before it is stored.
    #[arg(long = "ingest-geo-routes", env = "PUSHBUS_INGEST_GEO_ROUTES")]
    pub geo_routes: bool,
    /// How long a push may wait for the stream's ack before it is answered
    /// 503 (not confirmed; the hook spools it). Keep it, plus the lag budget,
    /// below the hook's --timeout-ms (3000).
    #[arg(
        long = "ingest-store-timeout-ms",
        env = "PUSHBUS_INGEST_STORE_TIMEOUT_MS",
        default_value_t = 2000
    )]
    pub store_timeout_ms: u64,
    /// Accept unauthenticated calls on a non-loopback address (without it,
    /// hook-ingest refuses to start there with no --ingest-secret-file).
    #[arg(
        long = "ingest-insecure-no-auth",
        env = "PUSHBUS_INGEST_INSECURE_NO_AUTH"
    )]
    pub insecure_no_auth: bool,
    #[command(flatten)]
    pub routes: geo_routes::RouteTtlArgs,
    #[command(flatten)]
    pub door: DoorArgs,
}

/// How the ingest listener bounds slow and greedy clients, and its TLS.
#[derive(clap::Args, Clone, Debug)]
#[group(id = "ingest_door")]
pub struct DoorArgs {
    /// PEM certificate chain: serve HTTPS and gRPC over TLS (with --ingest-tls-key).
    #[arg(
        id = "ingest_tls_cert",
        long = "ingest-tls-cert",
        env = "PUSHBUS_INGEST_TLS_CERT"
    )]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key of --ingest-tls-cert.
    #[arg(
        id = "ingest_tls_key",
        long = "ingest-tls-key",
        env = "PUSHBUS_INGEST_TLS_KEY"
    )]
    pub tls_key: Option<PathBuf>,
    /// A connection must finish its TLS handshake and each request head within this.
    #[arg(
        id = "ingest_header_read_timeout_ms",
        long = "ingest-header-read-timeout-ms",
        env = "PUSHBUS_INGEST_HEADER_READ_TIMEOUT_MS",
        default_value_t = 5000
    )]
    pub header_read_timeout_ms: u64,
    /// A request (body read, store and answer) must complete within this (408).
    #[arg(
        id = "ingest_request_timeout_ms",
        long = "ingest-request-timeout-ms",
        env = "PUSHBUS_INGEST_REQUEST_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub request_timeout_ms: u64,
    /// Open connections; further ones are closed at once.
    #[arg(
        id = "ingest_max_connections",
        long = "ingest-max-connections",
        env = "PUSHBUS_INGEST_MAX_CONNECTIONS",
        default_value_t = 1024
    )]
    pub max_connections: usize,
    /// Requests handled at once; further ones wait for a slot (see
    /// --ingest-queue-wait-ms), then are answered 503 (gRPC RESOURCE_EXHAUSTED).
    #[arg(
        id = "ingest_max_requests",
        long = "ingest-max-requests",
        env = "PUSHBUS_INGEST_MAX_REQUESTS",
        default_value_t = 256
    )]
    pub max_requests: usize,
    /// How long a request over --ingest-max-requests waits for a slot
    /// before its 503 (0: refused at once).
    #[arg(
        id = "ingest_queue_wait_ms",
        long = "ingest-queue-wait-ms",
        env = "PUSHBUS_INGEST_QUEUE_WAIT_MS",
        default_value_t = 500
    )]
    pub queue_wait_ms: u64,
    /// Largest body read before the caller is authenticated (only the legacy
    /// secret_token body field needs it; the JWT and Gitlab-Shared-Secret
    /// headers are checked before any of the body is read).
    #[arg(
        id = "ingest_unauthenticated_body_bytes",
        long = "ingest-unauthenticated-body-bytes",
        env = "PUSHBUS_INGEST_UNAUTHENTICATED_BODY_BYTES",
        default_value_t = 64 * 1024
    )]
    pub unauthenticated_body_bytes: usize,
}

pushbus_shared::default_from_flags!(DoorArgs);

impl Config {
    /// The flags' defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            ..pushbus_shared::service::flag_defaults()
        }
    }
}
