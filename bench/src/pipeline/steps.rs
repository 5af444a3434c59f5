//! The load generator's steps: open-loop pushes at a rate (with a fault
//! halfway, if asked), flat out, and what the streams hold afterwards.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;
use prost::Message;
use pushbus_shared::names;
use pushbus_shared::proto::RefHead;

use crate::stack::{FILTER_ACK_WAIT_SECS, Stack};
use crate::{Recorder, open_loop};

use super::*;

/// The load generator's side of hook-ingest.
pub(super) struct Load {
    pub(super) http: reqwest::Client,
    pub(super) endpoint: String,
    pub(super) agents: u64,
}

impl Load {
    pub(super) fn new(ingest: std::net::SocketAddr, agents: u64) -> Load {
        Load {
            // Idle connections count against hook-ingest's cap too: no more
            // kept than the window can use.
            http: reqwest::Client::builder()
                .pool_max_idle_per_host(MAX_IN_FLIGHT)
                .build()
                .unwrap_or_default(),
            endpoint: format!("http://{ingest}/api/v4/internal/post_receive"),
            agents,
        }
    }

    /// Push `j` of a step at `rate`: agent j mod agents, and as many
    /// branches as it takes for one agent+ref to get at most one push a
    /// second (the notifier may merge closer ones).
    /// Push `j`'s agent and branch.
    pub(super) fn key(&self, j: u64, rate: u64) -> (u64, u64) {
        let refs = rate.div_ceil(self.agents).max(1);
        (j % self.agents, (j / self.agents) % refs)
    }

    pub(super) fn body(&self, seq: u64, j: u64, rate: u64) -> serde_json::Value {
        let (a, branch) = self.key(j, rate);
        serde_json::json!({
            "gl_repository": format!("project-{}", PROJECT_BASE + a),
            "identifier": "user-1",
            "changes": format!("{} {} refs/heads/b{branch}\n", "1".repeat(40), sha_of(seq)),
        })
    }
}

/// HTTP requests the load generator keeps in flight at most. Half of
/// hook-ingest's `--ingest-max-connections` (1024): connections still on
/// their way back to the pool while new ones open must stay under the cap,
/// or hook-ingest closes the extra ones at once and the run reports
/// refusals of the harness's own making (204 to 280 per 100,000 pushes at
/// 10,000/s with a window of 1024).
pub(super) const MAX_IN_FLIGHT: usize = 512;

/// What a step breaks halfway through.
pub(super) enum Fault<'a> {
    /// SIGKILL this service and start it again at once.
    Service(&'a mut Stack, &'static str, &'a Agents),
    /// SIGKILL the nats-server leading PUSHBUS_PUSHES (found through
    /// `$JS.API.STREAM.INFO`), and leave it down.
    Leader(
        &'a mut pushbus_shared::testkit::NatsCluster,
        &'a jetstream::Context,
    ),
}

/// Offers `n` pushes at `rate`, open loop; if `victim` is given, breaks
/// it halfway.
pub(super) async fn run_step(
    load: &Load,
    recorder: &Arc<Recorder>,
    lo: u64,
    n: u64,
    rate: u64,
    victim: Option<Fault<'_>>,
) -> anyhow::Result<Outcome> {
    let ok = Arc::new(AtomicU64::new(0));
    // When each push was answered, in µs after t0 (0: not yet).
    let answered: Arc<Vec<AtomicU64>> = Arc::new((0..n).map(|_| Default::default()).collect());
    let refusals = Arc::new(Refusals::default());
    let in_flight = Arc::new(AtomicU64::new(0));
    let accepted_each: Arc<Vec<std::sync::atomic::AtomicBool>> =
        Arc::new((0..n).map(|_| Default::default()).collect());
    let t0 = Instant::now() + Duration::from_millis(50);
    recorder.begin(lo, n, t0, rate as f64);
    let bodies: Vec<serde_json::Value> = (0..n).map(|j| load.body(lo + j, j, rate)).collect();
    // Each request in flight holds a connection: without a cap an
    // overloaded hook-ingest makes the generator run out of file
    // descriptors. A send waiting here still counts its latency from its
    // scheduled time, so the wait shows as latency (no coordinated omission).
    let window = Arc::new(tokio::sync::Semaphore::new(MAX_IN_FLIGHT));
    let sender = {
        let (http, endpoint) = (load.http.clone(), load.endpoint.clone());
        let (ok, refusals, in_flight) = (ok.clone(), refusals.clone(), in_flight.clone());
        let (accepted_each, answered) = (accepted_each.clone(), answered.clone());
        let mut bodies = bodies.into_iter();
        tokio::spawn(async move {
            open_loop(n, rate as f64, t0, |j| {
                let req = http
                    .post(&endpoint)
                    .header("x-request-id", format!("bench-{}", lo + j))
                    .json(&bodies.next().unwrap_or_default());
                let (ok, refusals, in_flight) = (ok.clone(), refusals.clone(), in_flight.clone());
                let (accepted_each, answered) = (accepted_each.clone(), answered.clone());
                let window = window.clone();
                in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _permit = window.acquire_owned().await;
                    if refusals.accepted(req.send().await).await {
                        if let Some(a) = accepted_each.get(j as usize) {
                            a.store(true, Ordering::Relaxed);
                        }
                        ok.fetch_add(1, Ordering::Relaxed);
                    }
                    if let Some(at) = answered.get(j as usize) {
                        at.store(t0.elapsed().as_micros().max(1) as u64, Ordering::Relaxed);
                    }
                    in_flight.fetch_sub(1, Ordering::Relaxed);
                });
            })
            .await
        })
    };
    let mut quiet = Duration::from_secs(3);
    let mut killed = None;
    // A service halfway; a leader a quarter in, leaving time to recover.
    let at = match &victim {
        Some(Fault::Leader(..)) => 0.25,
        _ => 0.5,
    };
    if victim.is_some() {
        tokio::time::sleep_until(
            (t0 + Duration::from_secs_f64(n as f64 / rate as f64 * at)).into(),
        )
        .await;
    }
    if let Some(Fault::Leader(nodes, js)) = victim {
        let leader = pushbus_shared::testkit::stream_leader(js, names::STREAM_PUSHES)
            .await
            .context("no PUSHBUS_PUSHES leader")?;
        let i = pushbus_shared::testkit::NatsCluster::index_of(&leader)
            .filter(|i| *i < nodes.nodes.len())
            .context("leader is not one of ours")?;
        nodes.nodes[i].kill();
        killed = Some((t0.elapsed(), leader, js.clone()));
        eprintln!(
            "PUSHBUS_PUSHES leader {} SIGKILLed",
            killed.as_ref().map_or("", |k| &k.1)
        );
        // Pokes held by a consumer whose leader died come back late.
        quiet = Duration::from_secs(10);
    } else if let Some(Fault::Service(stack, name, agents)) = victim {
        let back = stack.kill_and_restart(name).await?;
        eprintln!(
            "{name} SIGKILLed and ready again in {:.2} s",
            back.as_secs_f64()
        );
        if name == "gitops-notifier" {
            let started = Instant::now();
            agents.wait_live(Duration::from_secs(60)).await?;
            eprintln!(
                "all agents live again {:.2} s later",
                started.elapsed().as_secs_f64()
            );
            // Heads written while it was down reach the agents through
            // catch-up on reconnect; give the last of them a moment.
            quiet = Duration::from_secs(3);
        } else {
            // A killed filter's un-acked pushes come back after ack_wait.
            quiet = Duration::from_secs(FILTER_ACK_WAIT_SECS + 3);
        }
    }
    sender.await?;
    while in_flight.load(Ordering::Relaxed) > 0 {
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    let accepted = ok.load(Ordering::Relaxed);
    let step = recorder
        .finish(accepted, quiet, Duration::from_secs(60))
        .await;
    // Walk back from the last push: an accepted push that never arrived
    // while a later one of its agent and ref did was superseded.
    let mut later_arrived = std::collections::HashSet::new();
    let mut superseded = 0;
    for j in (0..n).rev() {
        let key = load.key(j, rate);
        if recorder.seen(lo + j) {
            later_arrived.insert(key);
        } else if accepted_each[j as usize].load(Ordering::Relaxed) && later_arrived.contains(&key)
        {
            superseded += 1;
        }
    }
    let mut outcome = Outcome::new(step, n, accepted, &refusals);
    if let Some((at, old_leader, js)) = killed {
        let mut outage = outage_after(at, rate, &accepted_each, &answered);
        outage.old_leader = old_leader;
        outage.new_leader = pushbus_shared::testkit::stream_leader(&js, names::STREAM_PUSHES).await;
        outcome.outage = Some(outage);
    }
    outcome.superseded = superseded;
    outcome.lost -= superseded as i64;
    Ok(outcome)
}

/// How hook-ingest answered the pushes due after `kill` (since t0).
pub(super) fn outage_after(
    kill: Duration,
    rate: u64,
    accepted: &[std::sync::atomic::AtomicBool],
    answered: &[AtomicU64],
) -> Outage {
    let kill_us = kill.as_micros() as u64;
    let due_us = |j: usize| (j as f64 * 1e6 / rate as f64) as u64;
    let after: Vec<usize> = (0..accepted.len())
        .filter(|&j| due_us(j) >= kill_us)
        .collect();
    let ok = |j: usize| accepted[j].load(Ordering::Relaxed);
    let at = |j: usize| answered[j].load(Ordering::Relaxed);
    let refused = after.iter().filter(|&&j| !ok(j)).count() as u64;
    let (window, recovered) = match after.iter().rposition(|&j| !ok(j)) {
        None => (0, true),
        Some(last) => match after[last + 1..]
            .iter()
            .filter(|&&j| ok(j))
            .map(|&j| at(j))
            .min()
        {
            Some(first_ok) => (first_ok.saturating_sub(kill_us), true),
            // Refused until the end of the step: at least that long.
            None => {
                let end = after.iter().map(|&j| at(j)).max().unwrap_or(kill_us);
                (end.saturating_sub(kill_us), false)
            }
        },
    };
    let slowest = after
        .iter()
        .map(|&j| at(j).saturating_sub(due_us(j)))
        .max()
        .unwrap_or(0);
    Outage {
        refused,
        window: Duration::from_micros(window),
        recovered,
        slowest: Duration::from_micros(slowest),
        old_leader: String::new(),
        new_leader: None,
    }
}

/// `n` pushes as fast as hook-ingest answers, 256 requests in flight;
/// only throughput (first send to last poke) means anything here.
pub(super) async fn flat_out(
    load: &Load,
    recorder: &Arc<Recorder>,
    lo: u64,
    n: u64,
) -> anyhow::Result<Outcome> {
    // Branches enough for one push per agent+ref per second up to 50,000/s.
    const ASSUMED_MAX_RATE: u64 = 50_000;
    let window = Arc::new(tokio::sync::Semaphore::new(256));
    let ok = Arc::new(AtomicU64::new(0));
    let refusals = Arc::new(Refusals::default());
    let t0 = Instant::now();
    recorder.begin(lo, n, t0, 1e12);
    for j in 0..n {
        let permit = window.clone().acquire_owned().await?;
        let req = load
            .http
            .post(&load.endpoint)
            .json(&load.body(lo + j, j, ASSUMED_MAX_RATE));
        let (ok, refusals) = (ok.clone(), refusals.clone());
        tokio::spawn(async move {
            if refusals.accepted(req.send().await).await {
                ok.fetch_add(1, Ordering::Relaxed);
            }
            drop(permit);
        });
    }
    let _ = window.acquire_many(256).await?;
    let accepted = ok.load(Ordering::Relaxed);
    let step = recorder
        .finish(accepted, Duration::from_secs(3), Duration::from_secs(120))
        .await;
    Ok(Outcome::new(step, n, accepted, &refusals))
}

/// Pushes of `lo..lo + n` (sent by `load` at `rate`) whose ref head, or a
/// newer push's head of the same agent and ref, is stored in
/// pushbus-ref-heads from revision `from` on: a newer push replaces the head.
pub(super) async fn heads_in_bucket(
    js: &jetstream::Context,
    from: u64,
    (lo, n): (u64, u64),
    load: &Load,
    rate: u64,
) -> anyhow::Result<u64> {
    let stream = js.get_stream(names::STREAM_REF_HEADS).await?;
    let last = stream.get_info().await?.state.last_sequence;
    if last < from {
        return Ok(0);
    }
    let consumer = stream
        .create_consumer(jetstream::consumer::pull::OrderedConfig {
            deliver_policy: jetstream::consumer::DeliverPolicy::ByStartSequence {
                start_sequence: from,
            },
            ..Default::default()
        })
        .await?;
    let mut messages = consumer.messages().await?;
    // The newest stored push per agent and ref.
    let mut newest = std::collections::HashMap::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .context("reading pushbus-ref-heads")?
    {
        let msg = msg?;
        let head = RefHead::decode(msg.payload.as_ref()).unwrap_or_default();
        let sha = head.poke.map(|p| p.new_sha).unwrap_or_default();
        if let Some(seq) = seq_of(&sha).filter(|s| (lo..lo + n).contains(s)) {
            let top = newest.entry(load.key(seq - lo, rate)).or_insert(seq);
            *top = (*top).max(seq);
        }
        if msg
            .info()
            .map_err(|e| anyhow::anyhow!("{e}"))?
            .stream_sequence
            >= last
        {
            break;
        }
    }
    let covered = (lo..lo + n)
        .filter(|&seq| {
            newest
                .get(&load.key(seq - lo, rate))
                .is_some_and(|&top| top >= seq)
        })
        .count();
    Ok(covered as u64)
}

/// Mean stored message size of a stream (payload, subject and headers).
pub(super) async fn mean_message_size(
    js: &jetstream::Context,
    stream: &str,
) -> anyhow::Result<usize> {
    let state = js.get_stream(stream).await?.info().await?.state.clone();
    Ok((state.bytes / state.messages.max(1)) as usize)
}
