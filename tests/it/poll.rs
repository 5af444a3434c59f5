//! Waiting for something a real process does later: the suite's one polling
//! loop, so every test fails the same way (naming what never came) instead of
//! hanging or asserting on a half-settled state.
//!
//! Probes are closures returning a future (`async || …` or `|| async …`),
//! not `AsyncFnMut`: a future that borrows its closure is not `Send`, and
//! some probes run on spawned tasks.

use std::time::{Duration, Instant};

/// How long the suite waits for what a service does in the background.
pub const SETTLE: Duration = Duration::from_secs(30);

/// Polls `probe` every 20 ms until it yields a value; fails the test, naming
/// `what`, if none comes within `within`.
pub async fn eventually<T, F: Future<Output = Option<T>>>(
    what: &str,
    within: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    poll(what, within, Duration::from_millis(20), || {
        let found = probe();
        async move { found.await.ok_or_else(String::new) }
    })
    .await
}

/// Waits (at most [`SETTLE`]) until `holds` is true, polling every 20 ms.
pub async fn until<F: Future<Output = bool>>(what: &str, mut holds: impl FnMut() -> F) {
    eventually(what, SETTLE, || {
        let held = holds();
        async move { held.await.then_some(()) }
    })
    .await
}

/// Polls `probe` every 200 ms (at most [`SETTLE`]) until it yields `Ok`, for
/// probes that load what they ask (a cluster right after a fault); fails the
/// test with the last `Err`, which says what was seen instead.
pub async fn until_ok<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    probe: impl FnMut() -> F,
) -> T {
    poll(what, SETTLE, Duration::from_millis(200), probe).await
}

/// Polls `probe` every `every` until it yields `Ok`; fails the test after
/// `within` with the last `Err`, which says what was seen instead.
pub async fn poll<T, F: Future<Output = Result<T, String>>>(
    what: &str,
    within: Duration,
    every: Duration,
    mut probe: impl FnMut() -> F,
) -> T {
    let deadline = Instant::now() + within;
    loop {
        let seen = match probe().await {
            Ok(found) => return found,
            Err(seen) => seen,
        };
        assert!(
            Instant::now() < deadline,
            "no {what} within {within:?}{}{seen}",
            if seen.is_empty() { "" } else { ": " }
        );
        tokio::time::sleep(every).await;
    }
}

/// Waits until GET `url` answers 2xx (a service's `/readyz`).
pub async fn until_ready(url: &str) {
    until(&format!("2xx from {url}"), async || {
        reqwest::get(url)
            .await
            .is_ok_and(|r| r.status().is_success())
    })
    .await
}
