//! `pushbus bench …`: each benchmark prints our figures next to a baseline
//! measured in the same run, on a fresh nats-server of its own.

pub mod filter;
pub mod ingest;

use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Instant;

use hdrhistogram::Histogram;

/// A private nats-server (free port, temporary store), removed on drop.
pub struct Nats {
    server: Option<crate::embedded::Embedded>,
    dir: PathBuf,
}

impl Nats {
    pub fn start() -> anyhow::Result<Nats> {
        let dir = std::env::temp_dir().join(format!(
            "pushbus-bench-{}-{}",
            std::process::id(),
            free_port()?
        ));
        let server = crate::embedded::start(&crate::embedded::EmbeddedArgs {
            port: free_port()?,
            dir: dir.clone(),
        })?;
        Ok(Nats {
            server: Some(server),
            dir,
        })
    }

    pub fn url(&self) -> String {
        self.server.as_ref().map(|s| s.url()).unwrap_or_default()
    }
}

impl Drop for Nats {
    fn drop(&mut self) {
        drop(self.server.take());
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/status")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
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

pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
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
