//! Opening an agent's stream, shared by SSE and gRPC: register the
//! connection first (live heads start queueing), then offer the catch-up
//! heads. The outbox keeps the highest revision per ref, so whatever the
//! interleaving, each ref's newest head goes out once.

use std::collections::HashMap;

use futures::{Stream, StreamExt};
use pushbus_shared::proto::{SeenRef, WatchEvent, notifier_status::State};

use crate::AppState;
use crate::conn;
use crate::heads;

/// What the agent says it last saw.
#[derive(Default, Debug)]
pub struct Since {
    pub cursor: Option<u64>,
    /// ref key -> SHA.
    pub seen: Option<HashMap<String, String>>,
}

impl Since {
    pub fn from_request(cursor: u64, seen: &[SeenRef]) -> Since {
        Since {
            cursor: (cursor > 0).then_some(cursor),
            seen: (!seen.is_empty()).then(|| {
                seen.iter()
                    .map(|s| (heads::ref_key(s.project_id, &s.r#ref), s.sha.clone()))
                    .collect()
            }),
        }
    }

    fn wants(&self, key: &str, revision: u64, sha: &str) -> bool {
        let after_cursor = self.cursor.is_some_and(|c| revision > c);
        let sha_differs = self
            .seen
            .as_ref()
            .is_some_and(|seen| seen.get(key).is_none_or(|s| s != sha));
        after_cursor || sha_differs
    }
}

pub async fn open(
    state: &AppState,
    agent_id: &str,
    since: Since,
) -> impl Stream<Item = WatchEvent> + Send + 'static {
    let connection = state.hub.connect(agent_id);
    // Read after registering: every head up to it is in the index (catch-up
    // covers it), every later one reaches this connection live. So it is a
    // resume point even for an agent that gets no poke before it leaves.
    let cursor = state.index.position();
    connection
        .conn
        .push_status(state.hub.status_event("connected", cursor));
    if since.cursor.is_some() || since.seen.is_some() {
        let keys = state.index.select(agent_id, |key, revision, sha| {
            since.wants(key, revision, sha)
        });
        match heads::read(&state.heads, agent_id, &keys).await {
            Ok(heads) => {
                let mut offered = 0;
                for h in heads {
                    let mut event = h.event;
                    event.catch_up = true;
                    offered += usize::from(connection.conn.offer(&h.key, h.revision, event));
                }
                metrics::counter!("pushbus_notifier_catch_up_pokes_total")
                    .increment(offered as u64);
                tracing::info!(%agent_id, offered, cursor = ?since.cursor, "catch-up queued");
            }
            Err(err) => {
                tracing::warn!(%agent_id, %err, "catch-up unavailable; agent told to poll");
                // Live pokes still flow; one full poll covers what was missed.
                connection.conn.push_status(conn::status(
                    State::Live,
                    "catch-up unavailable: poll once, live pokes follow",
                ));
            }
        }
    }
    futures::stream::unfold(connection, |c| async move {
        let event = c.conn.next().await;
        Some((event, c))
    })
    .take_until(state.shutdown.clone().cancelled_owned())
}
