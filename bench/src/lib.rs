//! `pushbus-bench …`: each benchmark prints our figures next to a baseline
//! measured in the same run, on a fresh nats-server of its own.

pub mod ceiling;
pub mod filter;
pub mod heads;
pub mod ingest;
mod measure;
pub mod pipeline;
pub mod redis;
pub mod stack;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use hdrhistogram::Histogram;

/// A private nats-server (free port, temporary store, gone on drop): the
/// test kit's, so tests and benches start servers one way.
pub use pushbus_shared::testkit::{NatsServer as Nats, free_port};

pub use measure::{CpuMeter, CpuUse, cpu_of, rss_bytes, rss_of};

/// The `pushbus` binary the pipeline bench runs each service with:
/// `PUSHBUS_BIN`, else the one beside this executable (same cargo profile).
pub fn pushbus_bin() -> anyhow::Result<PathBuf> {
    if let Some(p) = std::env::var_os("PUSHBUS_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    let bin = exe.with_file_name(format!("pushbus{}", std::env::consts::EXE_SUFFIX));
    anyhow::ensure!(
        bin.is_file(),
        "{} not found: build it first (`cargo build --release --bin pushbus`) or set PUSHBUS_BIN",
        bin.display()
    );
    Ok(bin)
}

pub struct Figures {
    pub rps: f64,
    pub hist: Histogram<u64>,
}

impl Figures {
    pub fn line(&self, name: &str) -> String {
        let q = |p: f64| self.hist.value_at_quantile(p) as f64 / 1000.0;
        format!(
            "{name:<28} {:>9.0} req/s   p50 {:>6.2} ms   p99 {:>6.2} ms   p99.9 {:>6.2} ms   max {:>6.2} ms",
            self.rps,
            q(0.5),
            q(0.99),
            q(0.999),
            self.hist.max() as f64 / 1000.0
        )
    }
}

/// Runs `op(i)` for i in 0..n with `concurrency` workers; latency in µs.
pub async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<Figures>
where
    F: Fn(usize) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send,
{
    let op = Arc::new(op);
    let next = Arc::new(AtomicUsize::new(0));
    let started = Instant::now();
    let mut workers = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (op, next) = (op.clone(), next.clone());
        workers.spawn(async move {
            let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
            loop {
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= n {
                    return Ok::<_, anyhow::Error>(hist);
                }
                let t = Instant::now();
                op(i).await?;
                hist.record(t.elapsed().as_micros().max(1) as u64)?;
            }
        });
    }
    let mut hist = Histogram::<u64>::new_with_bounds(1, 60_000_000, 3)?;
    while let Some(h) = workers.join_next().await {
        hist.add(h??)?;
    }
    Ok(Figures {
        rps: n as f64 / started.elapsed().as_secs_f64(),
        hist,
    })
}

/// Pipelined JetStream publishes: at most `max` acks outstanding, the
/// oldest half awaited when full (awaiting each ack before the next send
/// caps a publisher far below the server).
pub struct AckWindow {
    acks: std::collections::VecDeque<async_nats::jetstream::context::PublishAckFuture>,
    max: usize,
}

impl AckWindow {
    pub fn new(max: usize) -> AckWindow {
        AckWindow {
            acks: Default::default(),
            max: max.max(2),
        }
    }

    pub async fn push(
        &mut self,
        ack: async_nats::jetstream::context::PublishAckFuture,
    ) -> anyhow::Result<()> {
        self.acks.push_back(ack);
        if self.acks.len() >= self.max {
            for ack in self.acks.drain(..self.max / 2) {
                ack.await?;
            }
        }
        Ok(())
    }

    pub async fn finish(self) -> anyhow::Result<()> {
        for ack in self.acks {
            ack.await?;
        }
        Ok(())
    }
}

/// Open-loop latency bookkeeping for one step of a run: event `seq` (in
/// `lo..lo + n`) was due at `t0 + (seq - lo) / rate`, and its latency runs
/// from that scheduled instant, not from when it was actually sent, so a
/// sender or pipeline that falls behind shows up as latency (no coordinated
/// omission).
pub struct Recorder {
    seen: Vec<std::sync::atomic::AtomicBool>,
    step: std::sync::Mutex<Step>,
}

pub struct Step {
    lo: u64,
    n: u64,
    t0: Instant,
    rate: f64,
    pub hist: Histogram<u64>,
    pub received: u64,
    pub duplicates: u64,
    pub last: Option<Instant>,
}

impl Recorder {
    /// Room for `capacity` distinct sequence numbers over the whole run.
    pub fn new(capacity: u64) -> Arc<Recorder> {
        Arc::new(Recorder {
            seen: (0..capacity)
                .map(|_| std::sync::atomic::AtomicBool::new(false))
                .collect(),
            step: std::sync::Mutex::new(Step::new(0, 0, Instant::now(), 1.0)),
        })
    }

    /// Starts a step; returns the previous one's figures.
    pub fn begin(&self, lo: u64, n: u64, t0: Instant, rate: f64) -> Step {
        std::mem::replace(&mut *self.lock(), Step::new(lo, n, t0, rate))
    }

    /// Drains (see `drain`) until `expected` events of this step arrived,
    /// then ends the step and returns its figures.
    pub async fn finish(
        &self,
        expected: u64,
        quiet: std::time::Duration,
        limit: std::time::Duration,
    ) -> Step {
        drain(
            || self.received() >= expected,
            || self.received(),
            quiet,
            limit,
        )
        .await;
        self.begin(u64::MAX, 0, Instant::now(), 1.0)
    }

    /// Whether event `seq` reached its receiver.
    pub fn seen(&self, seq: u64) -> bool {
        self.seen
            .get(seq as usize)
            .is_some_and(|s| s.load(Ordering::Relaxed))
    }

    pub fn received(&self) -> u64 {
        self.lock().received
    }

    /// An event arrived at its final receiver.
    pub fn record(&self, seq: u64) {
        let now = Instant::now();
        let fresh = self
            .seen
            .get(seq as usize)
            .is_some_and(|s| !s.swap(true, Ordering::Relaxed));
        let mut step = self.lock();
        if !fresh {
            step.duplicates += 1;
            return;
        }
        if seq < step.lo || seq >= step.lo + step.n {
            // A straggler of an earlier step: already counted lost there.
            return;
        }
        let due = step.t0 + std::time::Duration::from_secs_f64((seq - step.lo) as f64 / step.rate);
        let micros = now.saturating_duration_since(due).as_micros().max(1) as u64;
        let high = step.hist.high();
        let _ = step.hist.record(micros.min(high));
        step.received += 1;
        step.last = Some(now);
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Step> {
        self.step.lock().unwrap_or_else(|e| e.into_inner())
    }
}

impl Step {
    fn new(lo: u64, n: u64, t0: Instant, rate: f64) -> Step {
        Step {
            lo,
            n,
            t0,
            rate,
            hist: Histogram::new_with_bounds(1, 600_000_000, 3).expect("static bounds"),
            received: 0,
            duplicates: 0,
            last: None,
        }
    }

    /// Events received per second, from the first scheduled send to the
    /// last arrival.
    pub fn achieved(&self) -> f64 {
        match self.last {
            Some(_) => self.received as f64 / self.elapsed().as_secs_f64(),
            None => 0.0,
        }
    }

    /// From the first scheduled send to the last arrival (zero before any).
    pub fn elapsed(&self) -> Duration {
        self.last
            .map_or(Duration::ZERO, |last| last.duration_since(self.t0))
    }

    pub fn rate(&self) -> f64 {
        self.rate
    }

    /// Scheduled minus received (for sides where every send counts).
    pub fn lost(&self) -> i64 {
        self.n as i64 - self.received as i64
    }

    pub fn ms(&self, q: f64) -> f64 {
        self.hist.value_at_quantile(q) as f64 / 1000.0
    }

    /// "offered  achieved  p50 p90 p99 p99.9 max  lost".
    pub fn line(&self, name: &str, lost: i64) -> String {
        format!(
            "{name:<34} {:>7.0}/s {:>8.0}/s  p50 {:>7.2}  p90 {:>7.2}  p99 {:>7.2}  p99.9 {:>7.2}  max {:>8.2} ms  lost {lost}",
            self.rate,
            self.achieved(),
            self.ms(0.5),
            self.ms(0.9),
            self.ms(0.99),
            self.ms(0.999),
            self.hist.max() as f64 / 1000.0,
        )
    }
}

/// Calls `send(i)` for i in 0..n at `t0 + i / rate`, never waiting for a
/// previous send: `send` must only start its work (spawn it) and return.
pub async fn open_loop(n: u64, rate: f64, t0: Instant, mut send: impl FnMut(u64)) {
    for i in 0..n {
        let due = t0 + std::time::Duration::from_secs_f64(i as f64 / rate);
        if due > Instant::now() {
            tokio::time::sleep_until(due.into()).await;
        }
        send(i);
    }
}

/// Waits until `done()` or until `received()` stops growing for `quiet`,
/// or `limit` has passed.
pub async fn drain(
    done: impl Fn() -> bool,
    received: impl Fn() -> u64,
    quiet: std::time::Duration,
    limit: std::time::Duration,
) {
    let start = Instant::now();
    let (mut last, mut since) = (received(), Instant::now());
    while !done() && start.elapsed() < limit && since.elapsed() < quiet {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let now = received();
        if now != last {
            (last, since) = (now, Instant::now());
        }
    }
}
