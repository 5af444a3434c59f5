//! Webhook delivery: agents whose config names a webhook (a Flux
//! notification-controller Receiver, Argo CD's `/api/webhook`) get GitLab's
//! push hook for each poke. A durable consumer of its own, so a slow or
//! failing target only delays its own retries (JetStream redelivery with
//! jittered exponential backoff), never the streamed pokes.

pub mod guard;
pub mod payload;

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, kv::Store};
use prost::Message;
use pushbus_shared::bus::{self, ConsumerSpec, Delivery, HandleError, Handler};
use pushbus_shared::names;
use pushbus_shared::proto::{AgentConfig, AgentPoke, Webhook};
use reqwest::{StatusCode, Url};
use tokio::sync::Semaphore;
use tokio_util::sync::CancellationToken;

use payload::{GitLabSite, HookKind};
use tracing::Instrument;

mod config;
mod response;

pub use config::{WebhookConfig, WebhookError};
use response::{body_snippet, classify_send_error, redact};
pub use response::{retry_after, signature};

/// Agents whose webhook config is kept in memory at most.
const MAX_CACHED: usize = 65_536;
/// Webhook targets (scheme, host, port) with a concurrency cap kept at most.
const MAX_TARGETS: usize = 4_096;

const USER_AGENT: &str = concat!("pushbus-gitops-notifier/", env!("CARGO_PKG_VERSION"));

pub fn consumer_spec(config: &WebhookConfig) -> ConsumerSpec {
    let mut spec = ConsumerSpec::new(names::STREAM_WEBHOOKS, names::CONSUMER_NOTIFIER_WEBHOOKS);
    spec.max_deliver = config.max_attempts.max(1);
    spec.backoff_base = Duration::from_millis(config.backoff_base_ms);
    spec.backoff_max = Duration::from_millis(config.backoff_max_ms.max(config.backoff_base_ms));
    spec.concurrency = config.concurrency.max(1);
    // A target may take seconds to answer: pull only what runs at once.
    spec.pull_batch = spec.concurrency;
    spec.ack_wait = config.ack_wait();
    spec
}

/// Delivers webhooks until `shutdown`. A consumer that cannot start cancels
/// `shutdown` too: the notifier must not run on without its webhooks.
pub async fn run(
    js: jetstream::Context,
    config: WebhookConfig,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let result = start(js, config, shutdown.clone()).await;
    if let Err(err) = &result {
        tracing::error!(error = %err, "webhook delivery stopped");
        shutdown.cancel();
    }
    result
}

async fn start(
    js: jetstream::Context,
    config: WebhookConfig,
    shutdown: CancellationToken,
) -> Result<(), WebhookError> {
    let site = GitLabSite::parse(&config.gitlab_url)?;
    let agents = pushbus_shared::topology::bucket(&js, names::BUCKET_AGENTS).await?;
    let handler = WebhookHandler::new(&config, site, agents)?;
    bus::run_consumer(js, consumer_spec(&config), handler, shutdown).await?;
    Ok(())
}

pub struct WebhookHandler {
    client: reqwest::Client,
    site: GitLabSite,
    agents: Store,
    policy: Arc<guard::Policy>,
    /// For plain http carrying a secret: reaches allowlisted addresses only.
    allowlisted_client: reqwest::Client,
    cache: Mutex<HashMap<String, (Instant, Option<Webhook>)>>,
    cache_ttl: Duration,
    targets: Mutex<HashMap<String, Arc<Semaphore>>>,
    per_target: usize,
    slot_wait: Duration,
}

impl WebhookHandler {
    pub fn new(
        config: &WebhookConfig,
        site: GitLabSite,
        agents: Store,
    ) -> Result<WebhookHandler, WebhookError> {
        let timeout = Duration::from_millis(config.timeout_ms);
        let policy = Arc::new(guard::Policy::new(config.allow_private, &config.allow));
        let client = |route| {
            reqwest::Client::builder()
                .user_agent(USER_AGENT)
                .timeout(timeout)
                .connect_timeout(timeout)
                // A redirect could lead anywhere, past the address check.
                .redirect(reqwest::redirect::Policy::none())
                // A proxy would resolve the name itself, past the guard.
                .no_proxy()
                .dns_resolver(Arc::new(guard::GuardedResolver::new(policy.clone(), route)))
                .build()
        };
        Ok(WebhookHandler {
            client: client(guard::Route::Any)?,
            allowlisted_client: client(guard::Route::AllowlistedOnly)?,
            site,
            agents,
            policy,
            cache: Mutex::default(),
            cache_ttl: Duration::from_millis(config.config_cache_ms),
            targets: Mutex::default(),
            per_target: config.concurrency_per_target.max(1),
            slot_wait: config
                .ack_wait()
                .saturating_sub(timeout)
                .saturating_sub(Duration::from_secs(5))
                .max(Duration::from_secs(1)),
        })
    }

    /// The agent's webhook, from a short-lived cache over the registry.
    async fn webhook_of(&self, agent_id: &str) -> Result<Option<Webhook>, HandleError> {
        if let Ok(cache) = self.cache.lock()
            && let Some((at, hook)) = cache.get(agent_id)
            && at.elapsed() < self.cache_ttl
        {
            return Ok(hook.clone());
        }
        let entry = self
            .agents
            .get(agent_id)
            .await
            .map_err(|e| HandleError::retryable(format!("agent registry: {e}")))?;
        let hook = match entry {
            None => None,
            Some(bytes) => AgentConfig::decode(bytes)
                .map_err(|e| HandleError::permanent(format!("agent {agent_id} config: {e}")))?
                .webhook
                .filter(|w| !w.url.is_empty()),
        };
        if let Ok(mut cache) = self.cache.lock() {
            // Bounded: past the limit, expired entries go first, then all
            // (forgetting only costs a KV read).
            if cache.len() >= MAX_CACHED {
                let ttl = self.cache_ttl;
                cache.retain(|_, (at, _)| at.elapsed() < ttl);
                if cache.len() >= MAX_CACHED {
                    cache.clear();
                }
            }
            cache.insert(agent_id.to_owned(), (Instant::now(), hook.clone()));
        }
        Ok(hook)
    }

    fn target_slots(&self, url: &Url) -> Arc<Semaphore> {
        let key = format!(
            "{}://{}:{}",
            url.scheme(),
            url.host_str().unwrap_or_default(),
            url.port_or_known_default().unwrap_or_default()
        );
        match self.targets.lock() {
            Ok(mut targets) => {
                // Bounded: idle targets (no request in flight) are dropped
                // past the limit; a new semaphore for one costs nothing.
                if targets.len() >= MAX_TARGETS {
                    let per_target = self.per_target;
                    targets.retain(|_, s| s.available_permits() < per_target);
                }
                targets
                    .entry(key)
                    .or_insert_with(|| Arc::new(Semaphore::new(self.per_target)))
                    .clone()
            }
            // A poisoned map only loses the cap, not the delivery.
            Err(_) => Arc::new(Semaphore::new(self.per_target)),
        }
    }

    async fn deliver(
        &self,
        d: &Delivery<AgentPoke>,
        hook: &Webhook,
        kind: HookKind,
        body: Vec<u8>,
    ) -> Result<StatusCode, HandleError> {
        let url = Url::parse(&hook.url)
            .map_err(|e| HandleError::permanent(format!("invalid webhook URL: {e}")))?;
        let client = match self.policy.check_url(&url, !hook.secret_token.is_empty()) {
            Ok(guard::Route::Any) => &self.client,
            Ok(guard::Route::AllowlistedOnly) => &self.allowlisted_client,
            Err(e) => return Err(HandleError::permanent(e)),
        };
        let slots = self.target_slots(&url);
        let _slot = match tokio::time::timeout(self.slot_wait, slots.acquire_owned()).await {
            Ok(Ok(permit)) => permit,
            Ok(Err(_)) => return Err(HandleError::retryable("target slots closed")),
            Err(_) => {
                return Err(HandleError::retryable(format!(
                    "target busy: {} requests in flight for longer than {:?}",
                    self.per_target, self.slot_wait
                )));
            }
        };
        let mut request = client
            .post(url.clone())
            .header("Content-Type", "application/json")
            .header("X-Gitlab-Event", kind.header())
            .header("X-Gitlab-Token", hook.secret_token.as_str())
            .header("X-Gitlab-Instance", self.site.base())
            // The poke's event ID is stable across redeliveries: receivers
            // can drop repeats.
            .header("X-Gitlab-Event-UUID", d.meta.event_id.as_str())
            .header("Idempotency-Key", d.meta.event_id.as_str());
        if !hook.hmac_secret.is_empty() {
            request = request.header("X-Signature", signature(&hook.hmac_secret, &body));
        }
        let response = request
            .body(body)
            .send()
            .await
            .map_err(classify_send_error)?;
        let status = response.status();
        if status.is_success() {
            return Ok(status);
        }
        let retry_after = (status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::SERVICE_UNAVAILABLE)
            .then(|| retry_after(response.headers(), std::time::SystemTime::now()))
            .flatten();
        let snippet = body_snippet(response).await;
        let detail = format!("HTTP {status} from {}: {snippet}", redact(&url));
        if let Some(after) = retry_after {
            Err(HandleError::RetryAfter {
                reason: format!("{detail} (Retry-After {} s)", after.as_secs()),
                after,
            })
        } else if status.is_server_error()
            || status == StatusCode::TOO_MANY_REQUESTS
            || status == StatusCode::REQUEST_TIMEOUT
        {
            Err(HandleError::retryable(detail))
        } else {
            // 4xx (bad token, no such receiver), and 3xx since redirects are
            // not followed: another try would get the same answer.
            Err(HandleError::permanent(detail))
        }
    }
}

impl Handler<AgentPoke> for WebhookHandler {
    async fn handle(&self, d: Delivery<AgentPoke>) -> Result<(), HandleError> {
        let agent_id = d.message.agent_id.clone();
        let Some(hook) = self.webhook_of(&agent_id).await? else {
            return Ok(());
        };
        let occurred_at = d.occurred_at.as_ref().map(|t| t.to_string());
        let (Some(kind), Some(body)) = (
            HookKind::of(&d.message),
            payload::build(&d.message, &self.site, occurred_at),
        ) else {
            tracing::debug!(%agent_id, r#ref = %d.message.r#ref, "no GitLab hook for this ref kind");
            return Ok(());
        };
        let body = serde_json::to_vec(&body)
            .map_err(|e| HandleError::permanent(format!("cannot encode webhook body: {e}")))?;
        let started = Instant::now();
        // The target's host only: its path and credentials stay out of spans.
        let target = Url::parse(&hook.url)
            .ok()
            .and_then(|u| u.host_str().map(str::to_owned))
            .unwrap_or_default();
        let span = tracing::info_span!(
            "webhook attempt",
            otel.kind = "client",
            %agent_id,
            attempt = d.delivered,
            server.address = %target,
            http.response.status_code = tracing::field::Empty,
        );
        let result = self
            .deliver(&d, &hook, kind, body)
            .instrument(span.clone())
            .await;
        if let Ok(status) = &result {
            span.record("http.response.status_code", status.as_u16());
        }
        let outcome = match &result {
            Ok(_) => "ok",
            Err(HandleError::Retryable(_) | HandleError::RetryAfter { .. }) => "retry",
            Err(HandleError::Permanent(_)) => "failed",
        };
        metrics::histogram!("pushbus_webhook_seconds", "outcome" => outcome)
            .record(started.elapsed().as_secs_f64());
        metrics::counter!("pushbus_webhook_deliveries_total", "outcome" => outcome).increment(1);
        match result {
            Ok(status) => {
                // Per delivery: debug; failures are warnings.
                tracing::debug!(
                    %agent_id,
                    status = status.as_u16(),
                    attempt = d.delivered,
                    ms = started.elapsed().as_millis() as u64,
                    "webhook delivered"
                );
                Ok(())
            }
            Err(err) => {
                tracing::warn!(%agent_id, attempt = d.delivered, error = %err, "webhook delivery failed");
                Err(err)
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn redacts_path_and_credentials() {
        let url = Url::parse("https://u:p@argocd.example.com:8443/hook/abc?x=1").unwrap();
        assert_eq!(redact(&url), "https://argocd.example.com:8443");
    }

    #[test]
    fn signs_like_hmac_sha256() {
        // RFC-style known vector for HMAC-SHA256.
        assert_eq!(
            signature("key", b"The quick brown fox jumps over the lazy dog"),
            "sha256=f7bc83f430538424b13298e6aa6fb143ef4d59a14946175997479dbc2d1a3cd8"
        );
    }

    #[test]
    fn retry_after_in_seconds_or_as_a_date() {
        use reqwest::header::{HeaderMap, HeaderValue, RETRY_AFTER};
        let at = |v: &str| {
            let mut h = HeaderMap::new();
            h.insert(RETRY_AFTER, HeaderValue::from_str(v).unwrap());
            h
        };
        let now = httpdate::parse_http_date("Wed, 21 Oct 2015 07:27:30 GMT").unwrap();
        assert_eq!(retry_after(&at("120"), now), Some(Duration::from_secs(120)));
        assert_eq!(
            retry_after(&at("Wed, 21 Oct 2015 07:28:00 GMT"), now),
            Some(Duration::from_secs(30))
        );
        // A date already past: retry now (the consumer's base still applies).
        assert_eq!(
            retry_after(&at("Wed, 21 Oct 2015 07:00:00 GMT"), now),
            Some(Duration::ZERO)
        );
        assert_eq!(retry_after(&at("soon"), now), None);
        assert_eq!(retry_after(&at("-5"), now), None);
        assert_eq!(retry_after(&HeaderMap::new(), now), None);
    }

    #[test]
    fn flag_defaults_match_default() {
        use clap::{Args, FromArgMatches};
        let cmd = WebhookConfig::augment_args(clap::Command::new("t"));
        cmd.clone().debug_assert();
        let matches = cmd.try_get_matches_from(["t"]).unwrap();
        let parsed = WebhookConfig::from_arg_matches(&matches).unwrap();
        assert_eq!(
            format!("{parsed:?}"),
            format!("{:?}", WebhookConfig::default())
        );
    }

    #[test]
    fn spec_follows_flags() {
        let spec = consumer_spec(&WebhookConfig {
            max_attempts: 3,
            backoff_base_ms: 100,
            backoff_max_ms: 50,
            ..Default::default()
        });
        assert_eq!(spec.durable, "gitops-notifier-webhooks");
        assert_eq!(spec.max_deliver, 3);
        assert_eq!(spec.backoff(1), Duration::from_millis(100));
        // The cap never undercuts the base.
        assert_eq!(spec.backoff(3), Duration::from_millis(100));
        assert!(spec.ack_wait >= Duration::from_secs(30));
    }
}
