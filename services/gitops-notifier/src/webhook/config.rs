//! Webhook delivery's flags (`--notifier-gitlab-url`, `--webhook-*`) and
//! what can stop it from starting.

use std::time::Duration;

use pushbus_shared::bus;

use super::guard;

#[derive(clap::Args, Clone, Debug)]
#[group(id = "webhooks")]
pub struct WebhookConfig {
    /// GitLab's external URL: the base of project.web_url / git_http_url /
    /// git_ssh_url in webhook payloads (receivers match repositories by them).
    #[arg(
        id = "webhook_gitlab_url",
        long = "notifier-gitlab-url",
        env = "PUSHBUS_NOTIFIER_GITLAB_URL",
        default_value = "http://localhost"
    )]
    pub gitlab_url: String,
    /// Delivery attempts before a webhook goes to the dead-letter stream.
    #[arg(
        id = "webhook_max_attempts",
        long = "webhook-max-attempts",
        env = "PUSHBUS_WEBHOOK_MAX_ATTEMPTS",
        default_value_t = 8
    )]
    pub max_attempts: i64,
    /// Delay before the second attempt; doubles per attempt (±20% jitter).
    #[arg(
        id = "webhook_backoff_base_ms",
        long = "webhook-backoff-base-ms",
        env = "PUSHBUS_WEBHOOK_BACKOFF_BASE_MS",
        default_value_t = 1000
    )]
    pub backoff_base_ms: u64,
    /// Cap of the delay between attempts.
    #[arg(
        id = "webhook_backoff_max_ms",
        long = "webhook-backoff-max-ms",
        env = "PUSHBUS_WEBHOOK_BACKOFF_MAX_MS",
        default_value_t = 60_000
    )]
    pub backoff_max_ms: u64,
    /// Whole-request timeout of one attempt (connect, send, response).
    #[arg(
        id = "webhook_timeout_ms",
        long = "webhook-timeout-ms",
        env = "PUSHBUS_WEBHOOK_TIMEOUT_MS",
        default_value_t = 10_000
    )]
    pub timeout_ms: u64,
    /// Requests in flight to one target (scheme + host + port) at once.
    #[arg(
        id = "webhook_concurrency_per_target",
        long = "webhook-concurrency-per-target",
        env = "PUSHBUS_WEBHOOK_CONCURRENCY_PER_TARGET",
        default_value_t = 4
    )]
    pub concurrency_per_target: usize,
    /// Webhook deliveries in flight at once, all targets together.
    #[arg(
        id = "webhook_concurrency",
        long = "webhook-concurrency",
        env = "PUSHBUS_WEBHOOK_CONCURRENCY",
        default_value_t = 32
    )]
    pub concurrency: usize,
    /// Deprecated (use --webhook-allow): allow every loopback, private,
    /// link-local and other non-public address.
    #[arg(
        id = "webhook_allow_private",
        long = "webhook-allow-private",
        env = "PUSHBUS_WEBHOOK_ALLOW_PRIVATE"
    )]
    pub allow_private: bool,
    /// Non-public targets webhooks may reach anyway: CIDRs, addresses, host
    /// names or `*.suffix` names (repeat, or comma-separate in the env).
    #[arg(
        id = "webhook_allow",
        long = "webhook-allow",
        env = "PUSHBUS_WEBHOOK_ALLOW",
        value_name = "CIDR|HOST",
        value_delimiter = ','
    )]
    pub allow: Vec<guard::Allow>,
    /// How long an agent's webhook setting is cached; a config change
    /// applies within this time.
    #[arg(
        id = "webhook_config_cache_ms",
        long = "webhook-config-cache-ms",
        env = "PUSHBUS_WEBHOOK_CONFIG_CACHE_MS",
        default_value_t = 2000
    )]
    pub config_cache_ms: u64,
}

pushbus_shared::default_from_flags!(WebhookConfig);

#[derive(Debug, thiserror::Error)]
pub enum WebhookError {
    #[error("invalid --notifier-gitlab-url {0}")]
    GitLabUrl(#[from] super::payload::SiteError),
    #[error("cannot build the webhook HTTP client: {0}")]
    Client(#[from] reqwest::Error),
    #[error(transparent)]
    Open(#[from] pushbus_shared::topology::TopologyError),
    #[error(transparent)]
    Consume(#[from] bus::ConsumeError),
}

impl WebhookConfig {
    /// Longest a handler may wait for a target slot: what is left of
    /// ack_wait after the request itself, so the server never redelivers a
    /// poke we are still working on.
    pub(super) fn ack_wait(&self) -> Duration {
        Duration::from_millis(self.timeout_ms)
            .saturating_mul(3)
            .max(Duration::from_secs(30))
    }
}
