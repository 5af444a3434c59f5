//! One agent connection: its [`Outbox`] behind a lock, and a wake-up for the
//! task that writes the connection's stream.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use pushbus_shared::proto::WatchEvent;
use tokio::sync::Notify;

pub use crate::outbox::{MAX_PENDING_REFS, RefKey, status};
use crate::outbox::{Next, Outbox};

pub struct Conn {
    outbox: Mutex<Outbox>,
    notify: Notify,
    /// Why the connection is being closed (token changed, agent deleted);
    /// once set, the stream ends with it.
    closed: Mutex<Option<String>>,
    /// The registry credential the agent authenticated against (its
    /// token's SHA-256, empty for a public agent): a change closes the stream.
    pub credential: String,
}

/// What a connection's stream yields.
// Items go out one at a time and are not stored; boxing the event would
// cost an allocation per poke for nothing.
#[allow(clippy::large_enum_variant)]
#[derive(Debug, Clone, PartialEq)]
pub enum Out {
    Event(WatchEvent),
    /// The last item: the notifier closed the stream, for this reason.
    Closed(String),
}

impl Conn {
    /// A connection whose agent has every head up to `cursor`; it sends no
    /// poke before [`Conn::open`].
    pub fn new(window: Duration, cursor: u64, credential: &str) -> Arc<Conn> {
        Arc::new(Conn {
            credential: credential.to_owned(),
            outbox: Mutex::new(Outbox::new(window, cursor)),
            notify: Notify::new(),
            closed: Mutex::new(None),
        })
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Outbox> {
        self.outbox.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Queues head `revision` of `key`. Returns false when the connection
    /// already has it (or something newer).
    pub fn offer(&self, key: &RefKey, revision: u64, event: WatchEvent) -> bool {
        let took = self.lock().offer(key, revision, event);
        if took {
            self.notify.notify_one();
        }
        took
    }

    pub fn push_status(&self, event: WatchEvent) {
        self.lock().push_status(event);
        self.notify.notify_one();
    }

    /// Catch-up is queued: pokes may go out.
    pub fn open(&self) {
        self.lock().open();
        self.notify.notify_one();
    }

    /// The agent has every head up to `cursor`.
    pub fn advance_to(&self, cursor: u64) {
        self.lock().advance_to(cursor);
    }

    /// Drops what is pending, moves the cursor and sends `event` (a "poll
    /// everything" status).
    pub fn reset(&self, cursor: u64, event: WatchEvent) {
        self.lock().reset(cursor, event);
        self.notify.notify_one();
    }

    /// Ends the stream: what is queued is dropped, the agent is told `reason`.
    pub fn close(&self, reason: &str) {
        let mut closed = self.closed.lock().unwrap_or_else(|e| e.into_inner());
        closed.get_or_insert_with(|| reason.to_owned());
        drop(closed);
        self.notify.notify_one();
    }

    pub fn close_reason(&self) -> Option<String> {
        self.closed
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    /// The next item to send; waits while there is none.
    pub async fn next(&self) -> Out {
        loop {
            // Registered before looking, so an offer made in between wakes us.
            let notified = self.notify.notified();
            if let Some(reason) = self.close_reason() {
                return Out::Closed(reason);
            }
            let next = self.lock().pop(std::time::Instant::now());
            match next {
                Next::Event(event) => return Out::Event(event),
                Next::WaitUntil(at) => {
                    tokio::select! {
                        _ = notified => {}
                        _ = tokio::time::sleep_until(at.into()) => {}
                    }
                }
                Next::Idle => notified.await,
            }
        }
    }
}
