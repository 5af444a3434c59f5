//! hook-ingest's flags: where it listens, how it authenticates pushers,
//! how long a push may wait for its store and its lag message, and the
//! door's limits and TLS.

use std::net::SocketAddr;
use std::path::PathBuf;

use pushbus_shared::listen;

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
    /// Largest body read before the caller is authenticated (only the legacy
    /// secret_token body field needs it; the JWT and Gitlab-Shared-Secret
    /// headers are checked before any of the body is read).
    #[arg(
        long = "ingest-unauthenticated-body-bytes",
        env = "PUSHBUS_INGEST_UNAUTHENTICATED_BODY_BYTES",
        default_value_t = 64 * 1024
    )]
    pub unauthenticated_body_bytes: usize,
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
    pub door: listen::DoorFlags<IngestDoor>,
}

/// The ingest door's limits and TLS: `--ingest-tls-cert`,
/// `--ingest-max-requests`, ... (declared in `pushbus_shared::listen`).
#[derive(Clone, Debug)]
pub struct IngestDoor;

impl listen::Door for IngestDoor {
    const PREFIX: &'static str = "ingest";
    const SERVES: &'static str = "HTTPS and gRPC";
    const REQUEST_DEADLINE: &'static str =
        "A request (body read, store and answer) must complete within this (408)";
    const MAX_CONNECTIONS: usize = 1024;
    const MAX_REQUESTS: usize = 256;
}

pushbus_shared::default_from_flags!(Config);

impl Config {
    /// The flags' defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            ..Default::default()
        }
    }
}
