//! One agent connection's outbox: at most one pending poke per ref (the
//! newest), at most one poke per ref per coalescing window, and the highest
//! head revision already sent per ref, so catch-up and live feed can overlap
//! without a gap or a duplicate.

use std::collections::{HashMap, VecDeque};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbus_shared::proto::{
    NotifierStatus, WatchEvent, notifier_status::State, watch_event::Event,
};
use tokio::sync::Notify;
use tokio::time::Instant;

/// Distinct refs waiting for a slow reader before the outbox gives up on
/// them and tells the agent to resynchronise (poll everything) instead.
pub const MAX_PENDING_REFS: usize = 4096;

/// A ref's identity within one agent: `<project_id>.<hex(ref)>`.
pub type RefKey = Arc<str>;

pub struct Conn {
    queue: Mutex<Queue>,
    notify: Notify,
    window: Duration,
}

#[derive(Default)]
struct Queue {
    statuses: VecDeque<WatchEvent>,
    pending: HashMap<RefKey, Pending>,
    /// Pending refs, oldest first.
    order: VecDeque<RefKey>,
    /// Highest revision sent (or superseded) per ref.
    sent: HashMap<RefKey, u64>,
    last_emit: HashMap<RefKey, Instant>,
}

struct Pending {
    revision: u64,
    event: WatchEvent,
}

impl Conn {
    pub fn new(window: Duration) -> Arc<Conn> {
        Arc::new(Conn {
            queue: Mutex::default(),
            notify: Notify::new(),
            window,
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Queue> {
        self.queue.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues head `revision` of `key`, replacing an older pending one.
    /// Returns false when the connection already has it (or something newer).
    pub fn offer(&self, key: &RefKey, revision: u64, mut event: WatchEvent) -> bool {
        let mut q = self.lock();
        if q.sent.get(key).is_some_and(|&r| r >= revision) {
            return false;
        }
        event.cursor = revision;
        match q.pending.get_mut(key) {
            Some(p) if p.revision >= revision => return false,
            Some(p) => {
                // Coalesced: the agent gets the newest SHA, once.
                metrics::counter!("pushbus_notifier_coalesced_total").increment(1);
                *p = Pending { revision, event };
            }
            None => {
                if q.pending.len() >= MAX_PENDING_REFS {
                    metrics::counter!("pushbus_notifier_overflows_total").increment(1);
                    let dropped: Vec<(RefKey, Pending)> = q.pending.drain().collect();
                    for (k, p) in dropped {
                        q.sent.insert(k, p.revision);
                    }
                    q.order.clear();
                    q.statuses.push_back(status(
                        State::Live,
                        "too many refs changed while this connection was not reading: poll everything",
                    ));
                }
                q.order.push_back(key.clone());
                q.pending.insert(key.clone(), Pending { revision, event });
            }
        }
        drop(q);
        self.notify.notify_one();
        true
    }

    pub fn push_status(&self, event: WatchEvent) {
        self.lock().statuses.push_back(event);
        self.notify.notify_one();
    }

    /// The next event to send: statuses first, then the oldest pending ref
    /// whose window has passed. Waits while there is none.
    pub async fn next(&self) -> WatchEvent {
        loop {
            let wake_at = {
                let mut q = self.lock();
                if let Some(s) = q.statuses.pop_front() {
                    if q.statuses.is_empty() {
                        // Statuses are rare; an idle connection should not
                        // keep room for four of them (about 1 KB).
                        q.statuses = VecDeque::new();
                    }
                    return s;
                }
                let now = Instant::now();
                let mut wake_at: Option<Instant> = None;
                let mut ready = None;
                for (i, key) in q.order.iter().enumerate() {
                    let at = q.last_emit.get(key).map_or(now, |t| *t + self.window);
                    if at <= now {
                        ready = Some(i);
                        break;
                    }
                    wake_at = Some(wake_at.map_or(at, |w: Instant| w.min(at)));
                }
                if let Some(key) = ready.and_then(|i| q.order.remove(i)) {
                    if let Some(p) = q.pending.remove(&key) {
                        q.sent.insert(key.clone(), p.revision);
                        q.last_emit.insert(key, now);
                        if q.last_emit.len() > 1024 {
                            let window = self.window;
                            q.last_emit.retain(|_, t| now.duration_since(*t) < window);
                        }
                        return p.event;
                    }
                    continue;
                }
                wake_at
            };
            match wake_at {
                Some(at) => {
                    tokio::select! {
                        _ = self.notify.notified() => {}
                        _ = tokio::time::sleep_until(at) => {}
                    }
                }
                None => self.notify.notified().await,
            }
        }
    }
}

pub fn status(state: State, detail: &str) -> WatchEvent {
    WatchEvent {
        event: Some(Event::Status(NotifierStatus {
            state: state as i32,
            detail: detail.into(),
        })),
        ..Default::default()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use pushbus_shared::proto::AgentPoke;

    fn poke(sha: &str) -> WatchEvent {
        WatchEvent {
            event: Some(Event::Poke(AgentPoke {
                new_sha: sha.into(),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn sha(ev: &WatchEvent) -> String {
        match &ev.event {
            Some(Event::Poke(p)) => p.new_sha.clone(),
            _ => "status".into(),
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_burst_becomes_one_poke_now_and_the_newest_after_the_window() {
        let conn = Conn::new(Duration::from_millis(500));
        let key: RefKey = "1.6d61696e".into();
        assert!(conn.offer(&key, 1, poke("a")));
        assert_eq!(sha(&conn.next().await), "a");
        let sent_at = Instant::now();
        for (rev, s) in [(2, "b"), (3, "c"), (4, "d")] {
            assert!(conn.offer(&key, rev, poke(s)));
        }
        let ev = conn.next().await;
        assert_eq!((sha(&ev), ev.cursor), ("d".into(), 4));
        assert!(Instant::now() >= sent_at + Duration::from_millis(500));
        // Older or equal revisions never go out again.
        assert!(!conn.offer(&key, 3, poke("c")));
        assert!(!conn.offer(&key, 4, poke("d")));
    }

    #[tokio::test(start_paused = true)]
    async fn other_refs_are_not_held_back_by_a_ref_in_its_window() {
        let conn = Conn::new(Duration::from_millis(500));
        let (a, b): (RefKey, RefKey) = ("1.61".into(), "1.62".into());
        conn.offer(&a, 1, poke("a1"));
        assert_eq!(sha(&conn.next().await), "a1");
        conn.offer(&a, 2, poke("a2"));
        conn.offer(&b, 3, poke("b1"));
        let started = Instant::now();
        assert_eq!(sha(&conn.next().await), "b1");
        assert_eq!(Instant::now(), started);
        assert_eq!(sha(&conn.next().await), "a2");
    }

    #[tokio::test(start_paused = true)]
    async fn statuses_go_first_and_overflow_asks_for_a_full_poll() {
        let conn = Conn::new(Duration::from_millis(500));
        for i in 0..=MAX_PENDING_REFS as u64 {
            let key: RefKey = format!("1.{i:x}").into();
            conn.offer(&key, i + 1, poke("x"));
        }
        match conn.next().await.event {
            Some(Event::Status(s)) => assert!(s.detail.contains("poll everything")),
            other => panic!("expected a status, got {other:?}"),
        }
        // Only the ref that arrived after the overflow is still pending.
        assert_eq!(conn.next().await.cursor, MAX_PENDING_REFS as u64 + 1);
    }
}
