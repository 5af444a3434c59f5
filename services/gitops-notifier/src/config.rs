//! gitops-notifier's flags: where agents connect, how long pokes may wait,
//! webhook delivery, and the door's limits and TLS.

use std::net::SocketAddr;

use pushbus_shared::listen;

use crate::webhook;

#[derive(clap::Args, Clone, Debug)]
#[group(id = "notifier")]
pub struct Config {
    /// Address for agents: SSE at /v1/agents/{id}/pokes and gRPC
    /// pushbus.v1.GitOpsNotifier/Watch.
    #[arg(
        id = "notifier_listen",
        long = "notifier-listen",
        env = "PUSHBUS_NOTIFIER_LISTEN",
        default_value = "127.0.0.1:8081"
    )]
    pub listen: SocketAddr,
    /// At most one poke per agent and ref per this many milliseconds; the
    /// first of a burst goes out at once, the last one carries the newest SHA.
    #[arg(
        id = "notifier_coalesce_ms",
        long = "notifier-coalesce-ms",
        env = "PUSHBUS_NOTIFIER_COALESCE_MS",
        default_value_t = 500
    )]
    pub coalesce_ms: u64,
    /// Seconds between sweeps for ref heads of agents no longer registered.
    #[arg(
        id = "notifier_prune_interval_secs",
        long = "notifier-prune-interval-secs",
        env = "PUSHBUS_NOTIFIER_PRUNE_INTERVAL_SECS",
        default_value_t = 300
    )]
    pub prune_interval_secs: u64,
    #[command(flatten)]
    pub webhooks: webhook::WebhookConfig,
    #[command(flatten)]
    pub door: listen::DoorFlags<NotifierDoor>,
    #[command(flatten)]
    pub agent_limits: AgentLimits,
}

/// The agents' door's limits and TLS: `--notifier-tls-cert`,
/// `--notifier-max-requests`, ... (declared in `pushbus_shared::listen`).
#[derive(Clone, Debug)]
pub struct NotifierDoor;

impl listen::Door for NotifierDoor {
    const PREFIX: &'static str = "notifier";
    const SERVES: &'static str = "SSE and gRPC";
    const REQUEST_DEADLINE: &'static str = "A request must be answered (a stream opened, catch-up \
         queued) within this; open streams are not cut";
    const MAX_CONNECTIONS: usize = 20_000;
    const MAX_REQUESTS: usize = 1024;
    const REQUESTS_NOT_COUNTED: &'static str = " (open streams not counted)";
}

/// What one replica, and one agent on it, may hold: open streams, and
/// failed logins before it is refused.
#[derive(clap::Args, Clone, Debug)]
#[group(id = "notifier_agent_limits")]
pub struct AgentLimits {
    /// Streams this replica holds in all; further ones get 503 / RESOURCE_EXHAUSTED.
    #[arg(
        id = "notifier_max_streams",
        long = "notifier-max-streams",
        env = "PUSHBUS_NOTIFIER_MAX_STREAMS",
        default_value_t = 20_000
    )]
    pub max_streams: usize,
    /// Streams one agent may hold on this replica; further ones get 429 / RESOURCE_EXHAUSTED.
    #[arg(
        id = "notifier_max_streams_per_agent",
        long = "notifier-max-streams-per-agent",
        env = "PUSHBUS_NOTIFIER_MAX_STREAMS_PER_AGENT",
        default_value_t = 16
    )]
    pub max_streams_per_agent: usize,
    /// Failed logins one address may make at once before it is refused (429).
    #[arg(
        id = "notifier_login_failure_burst",
        long = "notifier-login-failure-burst",
        env = "PUSHBUS_NOTIFIER_LOGIN_FAILURE_BURST",
        default_value_t = 10
    )]
    pub login_failure_burst: u32,
    /// One more failed login is allowed per this many milliseconds.
    #[arg(
        id = "notifier_login_failure_refill_ms",
        long = "notifier-login-failure-refill-ms",
        env = "PUSHBUS_NOTIFIER_LOGIN_FAILURE_REFILL_MS",
        default_value_t = 1000
    )]
    pub login_failure_refill_ms: u64,
    /// After a failed login, the agent's entry is checked from memory for
    /// this long instead of read again (0: off).
    #[arg(
        id = "notifier_login_cache_ms",
        long = "notifier-login-cache-ms",
        env = "PUSHBUS_NOTIFIER_LOGIN_CACHE_MS",
        default_value_t = 5000
    )]
    pub login_cache_ms: u64,
}

pushbus_shared::default_from_flags!(AgentLimits, Config);

impl Config {
    /// The flags' defaults, listening on `listen`.
    pub fn new(listen: SocketAddr) -> Config {
        Config {
            listen,
            ..Default::default()
        }
    }
}
