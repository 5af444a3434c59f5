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
}

impl Conn {
    /// A connection whose agent has every head up to `cursor`; it sends no
    /// poke before [`Conn::open`].
    pub fn new(window: Duration, cursor: u64) -> Arc<Conn> {
        Arc::new(Conn {
            outbox: Mutex::new(Outbox::new(window, cursor)),
            notify: Notify::new(),
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

    /// The next event to send; waits while there is none.
    pub async fn next(&self) -> WatchEvent {
        loop {
            // Registered before looking, so an offer made in between wakes us.
            let notified = self.notify.notified();
            let next = self.lock().pop(std::time::Instant::now());
            match next {
                Next::Event(event) => return event,
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
