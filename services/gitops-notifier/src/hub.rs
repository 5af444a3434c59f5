//! The agents connected to this replica, and delivery to their outboxes.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbus_shared::proto::{WatchEvent, notifier_status::State};

use crate::conn::{self, Conn, RefKey};

#[derive(Clone)]
pub struct Hub {
    inner: Arc<Inner>,
}

struct Inner {
    agents: Mutex<HashMap<Arc<str>, Vec<Arc<Conn>>>>,
    window: Duration,
    degraded: AtomicBool,
    /// Kept alongside the map: summing it per connect would make 10,000
    /// reconnects quadratic.
    connections: AtomicUsize,
    caps: StreamCaps,
}

/// How many streams this replica holds, in all and per agent.
#[derive(Clone, Copy, Debug)]
pub struct StreamCaps {
    pub total: usize,
    pub per_agent: usize,
}

impl Default for StreamCaps {
    fn default() -> Self {
        StreamCaps {
            total: usize::MAX,
            per_agent: usize::MAX,
        }
    }
}

/// A stream refused because a cap is reached.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CapExceeded {
    #[error(
        "agent already has {0} streams open on this notifier (--notifier-max-streams-per-agent)"
    )]
    PerAgent(usize),
    #[error(
        "notifier has {0} streams open, its limit (--notifier-max-streams): retry later or elsewhere"
    )]
    Total(usize),
}

/// A registered connection; dropping it (the agent went away, or the
/// stream ended) unregisters it.
pub struct Connection {
    hub: Hub,
    agent_id: Arc<str>,
    pub conn: Arc<Conn>,
}

impl Drop for Connection {
    fn drop(&mut self) {
        let mut agents = self.hub.lock();
        if let Some(conns) = agents.get_mut(&self.agent_id) {
            conns.retain(|c| !Arc::ptr_eq(c, &self.conn));
            if conns.is_empty() {
                agents.remove(&self.agent_id);
            }
        }
        drop(agents);
        let now = self.hub.inner.connections.fetch_sub(1, Ordering::SeqCst) - 1;
        connections_gauge(now);
    }
}

fn connections_gauge(now: usize) {
    metrics::gauge!("pushbus_notifier_connections").set(now as f64);
}

impl Hub {
    pub fn new(window: Duration) -> Hub {
        Hub::with_caps(window, StreamCaps::default())
    }

    pub fn with_caps(window: Duration, caps: StreamCaps) -> Hub {
        Hub {
            inner: Arc::new(Inner {
                agents: Mutex::default(),
                window,
                degraded: AtomicBool::new(false),
                connections: AtomicUsize::new(0),
                caps,
            }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<Arc<str>, Vec<Arc<Conn>>>> {
        self.inner.agents.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Registers a connection of `agent_id` whose agent has every head up
    /// to `cursor`; heads delivered from now on reach it. The caller sends
    /// its first event (`status_event`) and opens it once catch-up is queued.
    pub fn connect(
        &self,
        agent_id: &str,
        cursor: u64,
        credential: &str,
    ) -> Result<Connection, CapExceeded> {
        let conn = Conn::new(self.inner.window, cursor, credential);
        let agent_id: Arc<str> = agent_id.into();
        let caps = self.inner.caps;
        let mut agents = self.lock();
        // Checked under the map's lock, so racing connects cannot overshoot.
        if self.inner.connections.load(Ordering::SeqCst) >= caps.total {
            metrics::counter!("pushbus_notifier_streams_refused_total", "cap" => "total")
                .increment(1);
            return Err(CapExceeded::Total(caps.total));
        }
        let conns = agents.entry(agent_id.clone()).or_default();
        if conns.len() >= caps.per_agent {
            metrics::counter!("pushbus_notifier_streams_refused_total", "cap" => "per_agent")
                .increment(1);
            return Err(CapExceeded::PerAgent(caps.per_agent));
        }
        conns.push(conn.clone());
        connections_gauge(self.inner.connections.fetch_add(1, Ordering::SeqCst) + 1);
        drop(agents);
        Ok(Connection {
            hub: self.clone(),
            agent_id,
            conn,
        })
    }

    /// Ends every stream of `agent_id` on this replica, telling it `reason`
    /// (its token changed, or it was deleted). Returns how many.
    /// `credential` None closes them all; Some closes those that
    /// authenticated against another credential.
    pub fn close_agent(&self, agent_id: &str, credential: Option<&str>, reason: &str) -> usize {
        self.lock().get(agent_id).map_or(0, |conns| {
            let mut closed = 0;
            for c in conns {
                if credential.is_none_or(|k| k != c.credential) {
                    c.close(reason);
                    closed += 1;
                }
            }
            closed
        })
    }

    /// Connections registered now (what the connections gauge shows).
    pub fn connection_count(&self) -> usize {
        self.inner.connections.load(Ordering::SeqCst)
    }

    /// Offers head `revision` of `key` to every connection of `agent_id`;
    /// returns how many took it.
    pub fn deliver(
        &self,
        agent_id: &str,
        key: &RefKey,
        revision: u64,
        event: &WatchEvent,
    ) -> usize {
        // Offering only takes each outbox's own short lock.
        self.lock().get(agent_id).map_or(0, |conns| {
            conns
                .iter()
                .filter(|c| c.offer(key, revision, event.clone()))
                .count()
        })
    }

    /// The bus is gone: agents fall back to polling. Returns whether this
    /// changed the state.
    pub fn bus_lost(&self) -> bool {
        self.set_degraded(true, "lost the bus: fall back to polling")
    }

    /// The bus is back: pokes are live again. Returns whether this changed
    /// the state.
    pub fn bus_back(&self) -> bool {
        self.set_degraded(false, "bus reachable again: pokes are live")
    }

    /// Tells every connection when the bus is lost or back.
    fn set_degraded(&self, degraded: bool, detail: &str) -> bool {
        if self.inner.degraded.swap(degraded, Ordering::SeqCst) == degraded {
            return false;
        }
        metrics::gauge!("pushbus_notifier_degraded").set(if degraded { 1.0 } else { 0.0 });
        let event = self.current_status(detail);
        for conns in self.lock().values() {
            for c in conns {
                c.push_status(event.clone());
            }
        }
        true
    }

    /// Live (pokes will reach the agent) or degraded (keep polling); the
    /// outbox stamps the cursor as it leaves.
    pub fn current_status(&self, detail: &str) -> WatchEvent {
        if self.inner.degraded.load(Ordering::SeqCst) {
            conn::status(State::Degraded, detail)
        } else {
            conn::status(State::Live, detail)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    // The count follows agents that leave without ever receiving a poke (it
    // used to drop only when a delivery found the connection closed).
    #[test]
    fn leaving_agents_are_forgotten() {
        let hub = Hub::new(Duration::from_millis(500));
        let a = hub.connect("a", 0, "").unwrap();
        let b = hub.connect("a", 0, "").unwrap();
        let c = hub.connect("c", 0, "").unwrap();
        assert_eq!(hub.connection_count(), 3);
        drop((a, c));
        b.conn.open();
        assert_eq!(hub.connection_count(), 1);
        let key: RefKey = "1.61".into();
        assert_eq!(hub.deliver("a", &key, 1, &WatchEvent::default()), 1);
        assert_eq!(hub.deliver("c", &key, 1, &WatchEvent::default()), 0);
        drop(b);
        assert_eq!(hub.connection_count(), 0);
    }

    #[test]
    fn caps_refuse_streams_and_free_up_when_they_end() {
        let hub = Hub::with_caps(
            Duration::from_millis(500),
            StreamCaps {
                total: 3,
                per_agent: 2,
            },
        );
        let a1 = hub.connect("a", 0, "").unwrap();
        let _a2 = hub.connect("a", 0, "").unwrap();
        assert_eq!(
            hub.connect("a", 0, "").err(),
            Some(CapExceeded::PerAgent(2))
        );
        let _b1 = hub.connect("b", 0, "").unwrap();
        assert_eq!(hub.connect("c", 0, "").err(), Some(CapExceeded::Total(3)));
        drop(a1);
        let _c = hub.connect("c", 0, "").expect("a freed place is taken");
        assert_eq!(hub.connection_count(), 3);
    }
}
