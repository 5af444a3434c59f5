//! Around one webhook call: the body's signature, and what a target's
//! answer or failure means for the retry (permanent, retry, retry after).

use std::time::Duration;

use pushbus_shared::bus::HandleError;
use reqwest::Url;

use super::guard;

/// `sha256=<hex HMAC-SHA256 of the body>`, as Flux's generic-hmac Receiver
/// verifies `X-Signature`.
pub fn signature(secret: &str, body: &[u8]) -> String {
    use hmac::{Hmac, Mac};
    let mut mac = Hmac::<sha2::Sha256>::new_from_slice(secret.as_bytes())
        .expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

/// A `Retry-After` header: delay-seconds or an HTTP date (RFC 9110 10.2.3).
/// `None` when absent or unparsable (then the usual backoff applies).
pub fn retry_after(
    headers: &reqwest::header::HeaderMap,
    now: std::time::SystemTime,
) -> Option<Duration> {
    let value = headers
        .get(reqwest::header::RETRY_AFTER)?
        .to_str()
        .ok()?
        .trim();
    if let Ok(secs) = value.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let at = httpdate::parse_http_date(value).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// Refused by the guard: permanent. Connect errors, timeouts: retry.
pub(super) fn classify_send_error(err: reqwest::Error) -> HandleError {
    if let Some(refused) = guard::refusal_in(&err) {
        return HandleError::permanent(refused);
    }
    let what = if err.is_timeout() {
        "timed out"
    } else if err.is_connect() {
        "cannot connect"
    } else {
        "request failed"
    };
    // reqwest's text names the URL (paths and credentials of receivers):
    // only the redacted form goes into logs and dead letters.
    let url = err.url().map(redact).unwrap_or_default();
    let bare = err.without_url();
    let detail = pushbus_shared::error::one_line(&bare);
    HandleError::retryable(format!("{what} {url}: {detail}"))
}

/// The first bytes of an error response, for the dead-letter reason.
pub(super) async fn body_snippet(mut response: reqwest::Response) -> String {
    const MAX: usize = 200;
    let mut buf = Vec::new();
    while buf.len() < MAX {
        match response.chunk().await {
            Ok(Some(chunk)) => buf.extend_from_slice(&chunk),
            _ => break,
        }
    }
    let text = String::from_utf8_lossy(&buf[..buf.len().min(MAX)]).into_owned();
    if text.is_empty() {
        "(empty body)".into()
    } else {
        text
    }
}

/// Webhook URLs may hold credentials (Flux receiver paths are secret-ish,
/// user:pass in the authority): logs and dead letters get scheme, host and
/// port only.
pub(super) fn redact(url: &Url) -> String {
    match (url.host_str(), url.port()) {
        (Some(host), Some(port)) => format!("{}://{host}:{port}", url.scheme()),
        (Some(host), None) => format!("{}://{host}", url.scheme()),
        _ => url.scheme().to_owned(),
    }
}
