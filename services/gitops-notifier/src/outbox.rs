//! One agent connection's outbox, as a plain state machine (no clock, no
//! locks), so its cursor rule can be checked over any interleaving.
//!
//! The cursor rule: an event carries cursor `c` only when every ref whose
//! current head revision is `c` or lower has been delivered at that revision
//! (on this connection, or before the `since` cursor it started from). So
//! reconnecting with the last cursor received and catching up "every ref
//! whose head revision is above it" sends exactly the refs not yet delivered
//! at their newest SHA, each once, and nothing already delivered.
//!
//! It holds because pokes leave in revision order: the pending head with the
//! lowest revision goes first, and while it waits out its ref's coalescing
//! window, the others wait too (at most one window). Live heads arrive in
//! revision order from the feed, and above every catch-up head, which is
//! queued before the outbox opens.

use std::collections::{BTreeMap, HashMap, VecDeque};
use std::sync::Arc;
use std::time::{Duration, Instant};

use pushbus_shared::proto::{
    NotifierStatus, WatchEvent, notifier_status::State, watch_event::Event,
};

/// Distinct refs waiting for a slow reader before the outbox gives up on
/// them and tells the agent to resynchronise (poll everything) instead.
pub const MAX_PENDING_REFS: usize = 4096;

/// A ref's identity within one agent: `<project_id>.<hex(ref)>`.
pub type RefKey = Arc<str>;

pub struct Outbox {
    window: Duration,
    statuses: VecDeque<WatchEvent>,
    /// Pending head per ref.
    pending: HashMap<RefKey, Pending>,
    /// The same, by revision: the lowest goes first.
    by_revision: BTreeMap<u64, RefKey>,
    /// When each ref last went out, for refs still inside their window.
    last_emit: HashMap<RefKey, Instant>,
    /// Every head at or below this revision was delivered (see the module
    /// doc); offers at or below it are old news.
    cursor: u64,
    /// Pokes wait until catch-up is queued, so no live head overtakes a
    /// lower catch-up one.
    open: bool,
}

struct Pending {
    revision: u64,
    event: WatchEvent,
}

/// What [`Outbox::pop`] found.
// Returned, never stored: boxing the event would cost an allocation per poke.
#[allow(clippy::large_enum_variant)]
#[derive(Debug)]
pub enum Next {
    Event(WatchEvent),
    /// Nothing may go out before this instant (or before the next offer).
    WaitUntil(Instant),
    /// Nothing to send until something is offered.
    Idle,
}

impl Outbox {
    /// An outbox whose agent has everything up to `cursor`; closed until
    /// [`Outbox::open`].
    pub fn new(window: Duration, cursor: u64) -> Outbox {
        Outbox {
            window,
            statuses: VecDeque::new(),
            pending: HashMap::new(),
            by_revision: BTreeMap::new(),
            last_emit: HashMap::new(),
            cursor,
            open: false,
        }
    }

    pub fn cursor(&self) -> u64 {
        self.cursor
    }

    /// Catch-up is queued: pokes may go out.
    pub fn open(&mut self) {
        self.open = true;
    }

    /// Queues head `revision` of `key`, replacing an older pending one.
    /// Returns false when the agent already has it (or something newer).
    pub fn offer(&mut self, key: &RefKey, revision: u64, mut event: WatchEvent) -> bool {
        if revision <= self.cursor {
            return false;
        }
        event.cursor = revision;
        if let Some(p) = self.pending.get_mut(key) {
            if p.revision >= revision {
                return false;
            }
            // Coalesced: the agent gets the newest SHA, once.
            metrics::counter!("pushbus_notifier_coalesced_total").increment(1);
            self.by_revision.remove(&p.revision);
            *p = Pending { revision, event };
            self.by_revision.insert(revision, key.clone());
            return true;
        }
        if self.pending.len() >= MAX_PENDING_REFS {
            self.overflow();
        }
        self.pending
            .insert(key.clone(), Pending { revision, event });
        self.by_revision.insert(revision, key.clone());
        true
    }

    /// Too many refs for a reader that does not read: drop them all and ask
    /// for a full poll, which covers every dropped head.
    fn overflow(&mut self) {
        metrics::counter!("pushbus_notifier_overflows_total").increment(1);
        if let Some((&highest, _)) = self.by_revision.last_key_value() {
            self.cursor = self.cursor.max(highest);
        }
        self.pending.clear();
        self.by_revision.clear();
        self.push_status(status(
            State::Live,
            "too many refs changed while this connection was not reading: poll everything",
        ));
    }

    /// Queues a status; it goes out before any poke, with the cursor as it
    /// is when it leaves.
    pub fn push_status(&mut self, event: WatchEvent) {
        self.statuses.push_back(event);
    }

    /// The agent has everything up to `cursor` (it connected fresh and
    /// polls anyway): forgets pending heads at or below it.
    pub fn advance_to(&mut self, cursor: u64) {
        if cursor <= self.cursor {
            return;
        }
        self.cursor = cursor;
        let stale = self.by_revision.split_off(&(cursor + 1));
        for key in std::mem::replace(&mut self.by_revision, stale).into_values() {
            self.pending.remove(&key);
        }
    }

    /// Forgets what was pending and moves the cursor to `cursor`: the agent
    /// was told to poll everything, which covers it.
    pub fn reset(&mut self, cursor: u64, event: WatchEvent) {
        self.pending.clear();
        self.by_revision.clear();
        self.cursor = cursor;
        self.push_status(event);
    }

    /// The next event to send at `now`: statuses first, then the pending
    /// head with the lowest revision once its ref's window has passed.
    pub fn pop(&mut self, now: Instant) -> Next {
        if let Some(mut s) = self.statuses.pop_front() {
            if self.statuses.is_empty() {
                // Statuses are rare; an idle connection keeps no room for them.
                self.statuses = VecDeque::new();
            }
            s.cursor = self.cursor;
            return Next::Event(s);
        }
        if !self.open {
            return Next::Idle;
        }
        let Some((&revision, key)) = self.by_revision.first_key_value() else {
            return Next::Idle;
        };
        if let Some(at) = self.last_emit.get(key).map(|t| *t + self.window)
            && at > now
        {
            return Next::WaitUntil(at);
        }
        let key = key.clone();
        self.by_revision.remove(&revision);
        let Some(p) = self.pending.remove(&key) else {
            return Next::Idle;
        };
        self.cursor = revision;
        if self.last_emit.len() >= 1024 {
            let window = self.window;
            self.last_emit
                .retain(|_, t| now.saturating_duration_since(*t) < window);
        }
        self.last_emit.insert(key, now);
        Next::Event(p.event)
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

    fn take(o: &mut Outbox, now: Instant) -> WatchEvent {
        match o.pop(now) {
            Next::Event(e) => e,
            other => panic!("expected an event, got {other:?}"),
        }
    }

    #[test]
    fn a_burst_becomes_one_poke_now_and_the_newest_after_the_window() {
        let t0 = Instant::now();
        let window = Duration::from_millis(500);
        let mut o = Outbox::new(window, 0);
        o.open();
        let key: RefKey = "1.6d61696e".into();
        assert!(o.offer(&key, 1, poke("a")));
        assert_eq!(sha(&take(&mut o, t0)), "a");
        for (rev, s) in [(2, "b"), (3, "c"), (4, "d")] {
            assert!(o.offer(&key, rev, poke(s)));
        }
        assert!(matches!(o.pop(t0), Next::WaitUntil(at) if at == t0 + window));
        let ev = take(&mut o, t0 + window);
        assert_eq!((sha(&ev), ev.cursor), ("d".into(), 4));
        // Older or equal revisions never go out again.
        assert!(!o.offer(&key, 3, poke("c")));
        assert!(!o.offer(&key, 4, poke("d")));
    }

    // The gap this rule closes: a held ref (b at 2) must not be overtaken by
    // a later one (c at 3), or a reconnect from cursor 3 would skip it.
    #[test]
    fn pokes_leave_in_revision_order_even_past_a_ref_in_its_window() {
        let t0 = Instant::now();
        let window = Duration::from_millis(500);
        let mut o = Outbox::new(window, 0);
        o.open();
        let (a, b): (RefKey, RefKey) = ("1.61".into(), "1.62".into());
        o.offer(&a, 1, poke("a1"));
        assert_eq!(take(&mut o, t0).cursor, 1);
        o.offer(&a, 2, poke("a2"));
        o.offer(&b, 3, poke("b1"));
        assert!(matches!(o.pop(t0), Next::WaitUntil(_)));
        let first = take(&mut o, t0 + window);
        let second = take(&mut o, t0 + window);
        assert_eq!((sha(&first), first.cursor), ("a2".into(), 2));
        assert_eq!((sha(&second), second.cursor), ("b1".into(), 3));
    }

    #[test]
    fn nothing_leaves_before_open_and_statuses_carry_the_cursor() {
        let t0 = Instant::now();
        let mut o = Outbox::new(Duration::from_millis(500), 7);
        let key: RefKey = "1.61".into();
        assert!(!o.offer(&key, 7, poke("old")), "at or below the cursor");
        assert!(o.offer(&key, 9, poke("new")));
        o.push_status(status(State::Live, "connected"));
        let s = take(&mut o, t0);
        assert_eq!((sha(&s), s.cursor), ("status".into(), 7));
        assert!(matches!(o.pop(t0), Next::Idle));
        o.open();
        assert_eq!(take(&mut o, t0).cursor, 9);
    }

    #[test]
    fn advancing_forgets_what_the_agent_has() {
        let t0 = Instant::now();
        let mut o = Outbox::new(Duration::from_millis(500), 0);
        let (a, b): (RefKey, RefKey) = ("1.61".into(), "1.62".into());
        o.offer(&a, 3, poke("a"));
        o.offer(&b, 6, poke("b"));
        o.advance_to(5);
        o.open();
        assert_eq!(take(&mut o, t0).cursor, 6);
        assert!(matches!(o.pop(t0), Next::Idle));
        assert!(!o.offer(&a, 4, poke("a-old")));
    }

    #[test]
    fn overflow_asks_for_a_full_poll_with_a_cursor_past_what_it_dropped() {
        let t0 = Instant::now();
        let mut o = Outbox::new(Duration::from_millis(500), 0);
        o.open();
        for i in 0..=MAX_PENDING_REFS as u64 {
            let key: RefKey = format!("1.{i:x}").into();
            o.offer(&key, i + 1, poke("x"));
        }
        let s = take(&mut o, t0);
        match &s.event {
            Some(Event::Status(st)) => assert!(st.detail.contains("poll everything")),
            other => panic!("expected a status, got {other:?}"),
        }
        assert_eq!(s.cursor, MAX_PENDING_REFS as u64);
        // Only the ref that arrived after the overflow is still pending.
        assert_eq!(take(&mut o, t0).cursor, MAX_PENDING_REFS as u64 + 1);
    }
}

/// The cursor rule over random interleavings of pushes, coalescing windows,
/// reads and reconnects.
#[cfg(test)]
mod properties {
    use super::*;
    use proptest::prelude::*;
    use pushbus_shared::proto::AgentPoke;

    #[derive(Clone, Debug)]
    enum Op {
        /// A push to one of a few refs (a new head revision).
        Push(u8),
        /// The agent reads whatever may go out now.
        Read,
        Advance(u16),
        /// The connection drops; the agent reconnects with the last cursor
        /// it received.
        Reconnect,
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            4 => (0u8..4).prop_map(Op::Push),
            4 => Just(Op::Read),
            2 => (0u16..700).prop_map(Op::Advance),
            1 => Just(Op::Reconnect),
        ]
    }

    const WINDOW: Duration = Duration::from_millis(500);

    fn event(r#ref: u8, revision: u64) -> WatchEvent {
        WatchEvent {
            event: Some(Event::Poke(AgentPoke {
                r#ref: r#ref.to_string(),
                new_sha: format!("sha-{revision}"),
                ..Default::default()
            })),
            ..Default::default()
        }
    }

    fn key(r#ref: u8) -> RefKey {
        format!("1.{ref:02x}").into()
    }

    /// The bucket: newest revision per ref.
    #[derive(Default)]
    struct Heads {
        by_ref: HashMap<u8, u64>,
        last: u64,
    }

    struct Agent {
        /// Every (ref, revision) ever received, to catch duplicates.
        received: Vec<(u8, u64)>,
        newest: HashMap<u8, u64>,
        last_cursor: u64,
        last_poke_at: HashMap<u8, Instant>,
    }

    /// What `agent_stream::open` does: a new outbox from the agent's cursor, its
    /// status, catch-up of every ref whose head is above the cursor, open.
    fn connect(heads: &Heads, since: u64) -> Outbox {
        let mut o = Outbox::new(WINDOW, since);
        o.push_status(status(State::Live, "connected"));
        for (&r, &rev) in &heads.by_ref {
            if rev > since {
                o.offer(&key(r), rev, event(r, rev));
            }
        }
        o.open();
        o
    }

    fn read_all(o: &mut Outbox, agent: &mut Agent, now: Instant) -> Result<(), TestCaseError> {
        while let Next::Event(ev) = o.pop(now) {
            prop_assert!(
                ev.cursor >= agent.last_cursor,
                "cursor went back from {} to {}",
                agent.last_cursor,
                ev.cursor
            );
            agent.last_cursor = ev.cursor;
            if let Some(Event::Poke(p)) = &ev.event {
                let r: u8 = p.r#ref.parse().unwrap_or(u8::MAX);
                if let Some(at) = agent.last_poke_at.get(&r) {
                    prop_assert!(now >= *at + WINDOW, "two pokes of ref {r} in one window");
                }
                agent.last_poke_at.insert(r, now);
                prop_assert!(
                    !agent.received.contains(&(r, ev.cursor)),
                    "ref {r} at revision {} delivered twice",
                    ev.cursor
                );
                agent.received.push((r, ev.cursor));
                agent.newest.insert(r, ev.cursor);
            }
        }
        Ok(())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

        #[test]
        fn reconnecting_with_the_last_cursor_loses_nothing_and_repeats_nothing(
            ops in proptest::collection::vec(op(), 1..120)
        ) {
            let mut now = Instant::now();
            let mut heads = Heads::default();
            let mut agent = Agent {
                received: Vec::new(),
                newest: HashMap::new(),
                last_cursor: 0,
                last_poke_at: HashMap::new(),
            };
            let mut o = connect(&heads, 0);
            for op in ops {
                match op {
                    Op::Push(r) => {
                        heads.last += 1;
                        heads.by_ref.insert(r, heads.last);
                        o.offer(&key(r), heads.last, event(r, heads.last));
                    }
                    Op::Read => read_all(&mut o, &mut agent, now)?,
                    Op::Advance(ms) => now += Duration::from_millis(u64::from(ms)),
                    Op::Reconnect => {
                        // A new connection has its own coalescing windows.
                        agent.last_poke_at.clear();
                        o = connect(&heads, agent.last_cursor);
                    }
                }
            }
            // Quiet now: everything that may go out, goes out.
            for _ in 0..=heads.by_ref.len() {
                now += WINDOW;
                read_all(&mut o, &mut agent, now)?;
            }
            for (r, rev) in &heads.by_ref {
                prop_assert_eq!(agent.newest.get(r), Some(rev), "ref {} not on its newest head", r);
            }
        }
    }
}
