//! The bus layer: connecting, typed publishing with dedup IDs and awaited
//! acks, typed durable consumption with ordering, retries and dead letters.

mod consume;
mod dead_letter;
mod publish;

use std::time::Duration;

pub use consume::{ConsumeError, ConsumerSpec, Delivery, HandleError, Handler, run_consumer};
pub use dead_letter::DeadLetters;
pub use publish::{PendingAck, PublishError, Publisher};

/// Connects to NATS, retrying until it succeeds or `give_up` fires. Services
/// start in any order in a compose stack, so a missing server at start-up is
/// a wait, not a crash.
pub async fn connect(
    url: &str,
    name: &str,
    give_up: impl std::future::Future<Output = ()>,
) -> Option<async_nats::Client> {
    tokio::pin!(give_up);
    let mut delay = Duration::from_millis(100);
    loop {
        let options = async_nats::ConnectOptions::new()
            .name(name)
            .connection_timeout(Duration::from_secs(5))
            .event_callback(|event| async move {
                match event {
                    async_nats::Event::Connected => tracing::info!("nats connected"),
                    async_nats::Event::Disconnected => tracing::warn!("nats disconnected"),
                    other => tracing::info!(event = %other, "nats event"),
                }
            });
        match options.connect(url).await {
            Ok(client) => return Some(client),
            Err(err) => {
                tracing::warn!(%url, error = %err, retry_in_ms = delay.as_millis() as u64, "cannot connect to nats");
            }
        }
        tokio::select! {
            _ = &mut give_up => return None,
            _ = tokio::time::sleep(delay) => {}
        }
        delay = (delay * 2).min(Duration::from_secs(5));
    }
}
