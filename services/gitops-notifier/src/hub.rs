//! Connected agents in this replica and delivery to their streams.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use pushbus_shared::proto::{
    NotifierStatus, WatchEvent, notifier_status::State, watch_event::Event,
};
use tokio::sync::mpsc;

/// Pokes buffered per connection before a slow reader starts losing them.
pub const CONNECTION_BUFFER: usize = 256;

#[derive(Clone, Default)]
pub struct Hub {
    agents: Arc<Mutex<HashMap<String, Vec<mpsc::Sender<WatchEvent>>>>>,
}

impl Hub {
    /// Registers a new connection of `agent_id`. Its first event says the
    /// stream is live, so the agent knows pokes will now reach it.
    pub fn connect(&self, agent_id: &str) -> mpsc::Receiver<WatchEvent> {
        let (tx, rx) = mpsc::channel(CONNECTION_BUFFER);
        let live = WatchEvent {
            event: Some(Event::Status(NotifierStatus {
                state: State::Live as i32,
                detail: "connected".into(),
            })),
            ..Default::default()
        };
        // Cannot fail: the channel is new and empty.
        let _ = tx.try_send(live);
        let mut agents = self.lock();
        agents.entry(agent_id.to_owned()).or_default().push(tx);
        metrics::gauge!("pushbus_notifier_connections").increment(1.0);
        rx
    }

    /// Hands `event` to every live connection of `agent_id`; returns how many
    /// took it. Closed connections are forgotten here.
    pub fn deliver(&self, agent_id: &str, event: &WatchEvent) -> usize {
        let mut agents = self.lock();
        let Some(conns) = agents.get_mut(agent_id) else {
            return 0;
        };
        let mut delivered = 0;
        conns.retain(|tx| match tx.try_send(event.clone()) {
            Ok(()) => {
                delivered += 1;
                true
            }
            Err(mpsc::error::TrySendError::Full(_)) => {
                tracing::warn!(%agent_id, "agent connection is not reading; poke dropped for it");
                metrics::counter!("pushbus_notifier_slow_drops_total").increment(1);
                true
            }
            Err(mpsc::error::TrySendError::Closed(_)) => {
                metrics::gauge!("pushbus_notifier_connections").decrement(1.0);
                false
            }
        });
        if conns.is_empty() {
            agents.remove(agent_id);
        }
        delivered
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<String, Vec<mpsc::Sender<WatchEvent>>>> {
        self.agents.lock().unwrap_or_else(|e| e.into_inner())
    }
}
