//! A durable pull consumer's configuration and its retry backoff.

use std::time::Duration;

use async_nats::jetstream;
use async_nats::jetstream::consumer::{DeliverPolicy, pull};

/// A durable pull consumer and how to run it.
#[derive(Clone, Debug)]
pub struct ConsumerSpec {
    pub stream: String,
    pub durable: String,
    pub filter_subjects: Vec<String>,
    /// Messages with different subjects handled at once; one subject's
    /// messages are always handled one after another, in stream order.
    pub concurrency: usize,
    /// Messages asked for per pull request (never fewer than `concurrency`).
    /// Larger pulls cost the server fewer requests per message; the price is
    /// that more pulled messages wait here with their ack_wait running, so
    /// handlers that may take seconds (webhooks) pull only what they run.
    pub pull_batch: usize,
    /// Deliveries before a message is dead-lettered. Decided here from the
    /// delivery count, never by the server (whose MaxDeliver would silently
    /// park a message with only an advisory).
    pub max_deliver: i64,
    pub ack_wait: Duration,
    pub backoff_base: Duration,
    pub backoff_max: Duration,
    /// Each nak delay is spread by up to this fraction either way (0.2 =
    /// ±20%), so messages that failed together (one target down) do not
    /// all come back in the same instant.
    pub backoff_jitter: f64,
    pub deliver_policy: DeliverPolicy,
    pub max_ack_pending: i64,
}

impl ConsumerSpec {
    pub fn new(stream: &str, durable: &str) -> Self {
        Self {
            stream: stream.into(),
            durable: durable.into(),
            filter_subjects: Vec::new(),
            concurrency: 16,
            pull_batch: 64,
            max_deliver: 5,
            ack_wait: Duration::from_secs(30),
            backoff_base: Duration::from_millis(200),
            backoff_max: Duration::from_secs(30),
            backoff_jitter: 0.2,
            deliver_policy: DeliverPolicy::All,
            max_ack_pending: 1024,
        }
    }

    pub fn pull_config(&self) -> pull::Config {
        pull::Config {
            durable_name: Some(self.durable.clone()),
            description: Some(format!("pushbus consumer {}", self.durable)),
            ack_policy: jetstream::consumer::AckPolicy::Explicit,
            ack_wait: self.ack_wait,
            // Unlimited: a message the server stopped delivering would be
            // neither handled nor dead-lettered. Deliveries used up by
            // replicas that stalled or stopped while holding it end in our
            // dead-letter stream instead (see `process_envelope`).
            max_deliver: -1,
            filter_subjects: self.filter_subjects.clone(),
            deliver_policy: self.deliver_policy,
            max_ack_pending: self.max_ack_pending,
            ..Default::default()
        }
    }

    /// Nak delay before delivery `delivered + 1`: exponential, capped.
    pub fn backoff(&self, delivered: i64) -> Duration {
        let exp = delivered.clamp(1, 20) as u32 - 1;
        self.backoff_base
            .saturating_mul(2u32.saturating_pow(exp))
            .min(self.backoff_max)
    }

    /// The delay a target asked for, within the backoff cap (a target must
    /// not park a message for longer than the operator allows) and never
    /// below the base (`Retry-After: 0` must not spin).
    pub fn retry_after_delay(&self, after: Duration) -> Duration {
        after
            .max(self.backoff_base)
            .min(self.backoff_max.max(self.backoff_base))
    }

    /// [`Self::backoff`] spread by ±`backoff_jitter`, from `seed` (any value
    /// that differs between messages and deliveries). The cap applies
    /// before the spread, so capped retries stay spread too.
    pub fn jittered_backoff(&self, delivered: i64, seed: u64) -> Duration {
        let jitter = self.backoff_jitter.clamp(0.0, 1.0);
        // splitmix64 finaliser: turns close seeds into unrelated values.
        let mut z = seed.wrapping_add(0x9E37_79B9_7F4A_7C15);
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let unit = (z >> 11) as f64 / (1u64 << 53) as f64; // [0, 1)
        self.backoff(delivered)
            .mul_f64(1.0 + jitter * (2.0 * unit - 1.0))
    }
}
