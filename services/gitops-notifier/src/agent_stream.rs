//! Opening an agent's stream, shared by SSE and gRPC: register the
//! connection first (live heads start queueing), then offer the catch-up
//! heads. The outbox keeps the highest revision per ref, so whatever the
//! interleaving, each ref's newest head goes out once.

use std::collections::HashMap;
use std::time::Duration;

use futures::{Stream, StreamExt};
use pushbus_shared::proto::{SeenRef, notifier_status::State};

use crate::AppState;
use crate::conn::{self, Conn, Out};
use crate::heads;
use crate::hub::CapExceeded;

/// What the agent says it last saw.
#[derive(Default, Debug)]
pub struct Since {
    /// Every head up to this revision was delivered to it (0 included: a
    /// cursor from a notifier that had no heads yet).
    pub cursor: Option<u64>,
    /// ref key -> SHA.
    pub seen: Option<HashMap<String, String>>,
}

impl Since {
    pub fn from_request(cursor: Option<u64>, seen: &[SeenRef]) -> Since {
        Since {
            cursor,
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

    fn asks_catch_up(&self) -> bool {
        self.cursor.is_some() || self.seen.is_some()
    }
}

/// How long a connection waits for this replica's feed to reach a cursor
/// the agent got from a replica further ahead.
const CATCH_UP_TO_CURSOR: Duration = Duration::from_secs(3);

pub async fn open(
    state: &AppState,
    agent_id: &str,
    credential: &str,
    since: Since,
) -> Result<impl Stream<Item = Out> + Send + 'static, CapExceeded> {
    let connection = state
        .hub
        .connect(agent_id, since.cursor.unwrap_or(0), credential)?;
    let conn = &connection.conn;
    // Read after registering: every head up to it is in the index (catch-up
    // covers it), every later one reaches this connection live.
    let mut position = state.index.position();
    if let Some(cursor) = since.cursor
        && cursor > position
    {
        position = wait_for_position(state, cursor).await;
    }
    conn.push_status(state.hub.current_status("connected"));
    match since.cursor {
        Some(cursor) if cursor > position => {
            // Not a cursor of this bucket (recreated, or a feed far behind).
            tracing::warn!(%agent_id, cursor, position, "cursor ahead of the ref heads; agent told to poll");
            conn.reset(
                position,
                conn::status(
                    State::Live,
                    "unknown cursor (ahead of this notifier): poll everything",
                ),
            );
        }
        // A head it may not have had was removed since (a deleted ref's
        // tombstone expired): catch-up can no longer show that ref.
        Some(cursor) if cursor < state.index.removed_up_to(agent_id) => {
            tracing::info!(%agent_id, cursor, "refs removed since the cursor; agent told to poll");
            conn.reset(
                position,
                conn::status(
                    State::Live,
                    "refs were removed since this cursor: poll everything",
                ),
            );
        }
        _ if !since.asks_catch_up() => conn.advance_to(position),
        _ => catch_up(state, agent_id, &since, position, conn).await,
    }
    conn.open();
    Ok(futures::stream::unfold(Some(connection), |c| async move {
        let c = c?;
        match c.conn.next().await {
            // The last item; the connection unregisters as it drops.
            closed @ Out::Closed(_) => Some((closed, None)),
            event => Some((event, Some(c))),
        }
    })
    .take_until(state.shutdown.clone().cancelled_owned()))
}

async fn wait_for_position(state: &AppState, cursor: u64) -> u64 {
    let deadline = tokio::time::Instant::now() + CATCH_UP_TO_CURSOR;
    loop {
        let position = state.index.position();
        if position >= cursor || tokio::time::Instant::now() >= deadline {
            return position;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Queues every head the agent missed, up to `position`: later ones come
/// through the feed, in order, so catch-up never overtakes them.
async fn catch_up(state: &AppState, agent_id: &str, since: &Since, position: u64, conn: &Conn) {
    let keys = state.index.select(agent_id, |key, revision, sha| {
        since.wants(key, revision, sha)
    });
    match heads::read(&state.heads, agent_id, &keys, position).await {
        Ok(heads) => {
            let mut offered = 0;
            for h in heads {
                let mut event = h.event;
                event.catch_up = true;
                offered += usize::from(conn.offer(&h.key, h.revision, event));
            }
            metrics::counter!("pushbus_notifier_catch_up_pokes_total").increment(offered as u64);
            tracing::info!(%agent_id, offered, cursor = ?since.cursor, "catch-up queued");
        }
        Err(err) => {
            tracing::warn!(%agent_id, %err, "catch-up unavailable; agent told to poll");
            // Live pokes still flow; one full poll covers what was missed.
            conn.reset(
                position,
                conn::status(
                    State::Live,
                    "catch-up unavailable: poll once, live pokes follow",
                ),
            );
        }
    }
}
