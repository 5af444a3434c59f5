//! Sending one notification to hook-ingest, and telling a stored push from
//! anything else that answered.

use std::time::Duration;

use pushbus_shared::secret;
use tokio::time::Instant;

use super::{HookArgs, HookError, now_unix};

/// Why a notification was not delivered. Print it with
/// `pushbus_shared::error::one_line`: a transport error's cause ("connection
/// refused") is only in its sources.
#[derive(Debug, thiserror::Error)]
pub enum SendError {
    /// hook-ingest refused the content itself: retrying the same body is
    /// useless. Holds hook-ingest's reason.
    #[error("{0}")]
    Refused(String),
    /// Not stored (timed out, not a pushbus reply, 5xx): replay later.
    /// Holds what answered, or why no answer counted.
    #[error("{0}")]
    NotStored(String),
    /// hook-ingest unreachable, or its answer cut off: replay later. Held
    /// without its URL (`reqwest::Error::without_url`): it may carry
    /// credentials.
    #[error("{0}")]
    Transport(#[source] reqwest::Error),
    /// The hook cannot send as configured: replay once the setup is fixed.
    #[error("{0}")]
    Setup(#[source] HookError),
    /// Older notifications still wait, for this reason; a newer one must
    /// not overtake them.
    #[error("earlier notifications still spooled: {0}")]
    Behind(#[source] Box<SendError>),
}

pub(super) struct Sender {
    url: String,
    timeout: Duration,
    secret: Option<String>,
    client: reqwest::Client,
}

impl Sender {
    pub(super) fn new(args: &HookArgs) -> Result<Self, HookError> {
        let secret = args
            .secret_file
            .as_ref()
            .map(|path| {
                secret::read_file(path).map_err(|source| HookError::SecretFile {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        let timeout = Duration::from_millis(args.timeout_ms);
        // Straight to hook-ingest, whatever http_proxy / HTTPS_PROXY the Git
        // server sets for its own outbound traffic: a proxy would get the
        // signed JWT, and its answer is not hook-ingest's, so the push would
        // only ever be spooled.
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .no_proxy()
            .build()
            .map_err(|e| HookError::HttpClient {
                source: e.without_url(),
            })?;
        Ok(Self {
            url: format!(
                "{}/api/v4/internal/post_receive",
                args.ingest_url.trim_end_matches('/')
            ),
            timeout,
            secret,
            client,
        })
    }

    /// One call, bounded by the timeout and by `deadline`.
    pub(super) async fn send(
        &self,
        body: &serde_json::Value,
        correlation_id: &str,
        deadline: Instant,
    ) -> Result<serde_json::Value, SendError> {
        let left = deadline.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return Err(SendError::NotStored("--timeout-ms used up".into()));
        }
        let sent = async {
            let mut req = self
                .client
                .post(&self.url)
                .timeout(self.timeout.min(left))
                .header("x-correlation-id", correlation_id)
                .json(body);
            if let Some(secret) = &self.secret {
                req = req.header(
                    crate::auth::JWT_HEADER,
                    crate::auth::sign_jwt(secret.as_bytes(), now_unix()),
                );
            }
            let resp = req.send().await?;
            let status = resp.status();
            let bytes = resp.bytes().await?;
            Ok::<_, reqwest::Error>((status, bytes))
        };
        match tokio::time::timeout(left, sent).await {
            Ok(Ok((status, bytes))) => classify(status, &bytes),
            // Without the URL: it may carry credentials.
            Ok(Err(err)) => Err(SendError::Transport(err.without_url())),
            Err(_) => Err(SendError::NotStored("hook-ingest timed out".into())),
        }
    }
}

/// Only hook-ingest's own answer counts: a 200 from anything else (a wrong
/// URL, a proxy's error page, a gRPC server) would otherwise lose the push.
pub(super) fn classify(
    status: reqwest::StatusCode,
    bytes: &[u8],
) -> Result<serde_json::Value, SendError> {
    let json: Option<serde_json::Value> = serde_json::from_slice(bytes).ok();
    if status == reqwest::StatusCode::OK {
        return match json {
            Some(j) if is_pushbus_reply(&j) => Ok(j),
            _ => Err(SendError::NotStored(format!(
                "HTTP 200 but not a pushbus reply (is --ingest-url hook-ingest?): {}",
                snippet(bytes)
            ))),
        };
    }
    let error = json
        .as_ref()
        .and_then(|j| j.get("error"))
        .and_then(|e| e.as_str())
        .map(str::to_owned);
    match (status.as_u16(), error) {
        // hook-ingest refused the content itself.
        (400 | 413 | 422, Some(e)) => Err(SendError::Refused(format!("{status}: {e}"))),
        (_, Some(e)) => Err(SendError::NotStored(format!("{status}: {e}"))),
        (_, None) => Err(SendError::NotStored(format!(
            "{status}, not a pushbus reply: {}",
            snippet(bytes)
        ))),
    }
}

/// The shape of hook-ingest's post_receive answer (http.rs).
pub(super) fn is_pushbus_reply(j: &serde_json::Value) -> bool {
    j.get("reference_counter_decreased") == Some(&serde_json::Value::Bool(true))
        && j.get("correlation_id").is_some_and(|c| c.is_string())
        && j.get("event_ids").is_some_and(|e| e.is_array())
        && j.get("messages")
            .and_then(|m| m.as_array())
            .is_some_and(|m| {
                m.iter()
                    .all(|m| m.get("message").is_some_and(|s| s.is_string()))
            })
}

pub(super) fn snippet(bytes: &[u8]) -> String {
    const MAX: usize = 80;
    let text: String = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect();
    if text.trim().is_empty() {
        "(empty body)".into()
    } else {
        text
    }
}
