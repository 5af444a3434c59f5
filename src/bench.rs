//! `pushbus bench ingest`: hook-ingest requests (request -> durable ack) at
//! a fixed concurrency, next to raw async-nats JetStream publishes of the
//! same payload size measured in the same run.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use hdrhistogram::Histogram;
use pushbus_shared::service::{self, Launcher};

#[derive(clap::Args)]
pub struct BenchArgs {
    /// Requests per side.
    #[arg(long, default_value_t = 20_000)]
    requests: usize,
    /// Requests in flight at once (closed loop).
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// 2,000 requests per side: a smoke run in seconds.
    #[arg(long)]
    quick: bool,
}

struct Figures {
    rps: f64,
    hist: Histogram<u64>,
}

impl Figures {
    fn line(&self, name: &str) -> String {
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

fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Runs `op(i)` for i in 0..n with `concurrency` workers; latency in µs.
async fn drive<F, Fut>(n: usize, concurrency: usize, op: F) -> anyhow::Result<Figures>
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

pub async fn ingest(args: BenchArgs) -> anyhow::Result<()> {
    let n = if args.quick { 2_000 } else { args.requests };
    let dir = std::env::temp_dir().join(format!("pushbus-bench-{}", std::process::id()));
    let nats = crate::embedded::start(&crate::embedded::EmbeddedArgs {
        port: free_port()?,
        dir: dir.clone(),
    })?;
    let url = nats.url();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let config = pushbus_hook_ingest::Config {
        listen,
        secret_file: None,
        max_body_bytes: 8 << 20,
        lag_budget_ms: 250,
        geo_routes: false,
        routes: Default::default(),
    };
    let stop = tokio_util::sync::CancellationToken::new();
    let host = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        let launcher = Launcher::new("hook-ingest", move |ctx, t| {
            pushbus_hook_ingest::run(ctx, config, t.cancelled_owned())
        });
        async move { service::host(&url, ops, vec![launcher], stop.cancelled_owned()).await }
    });
    let http = reqwest::Client::new();
    let ready = format!("http://{ops}/readyz");
    let deadline = Instant::now() + Duration::from_secs(30);
    while !http
        .get(&ready)
        .send()
        .await
        .is_ok_and(|r| r.status().is_success())
    {
        anyhow::ensure!(Instant::now() < deadline, "hook-ingest not ready");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let endpoint = format!("http://{listen}/api/v4/internal/post_receive");
    let body = |i: usize| {
        serde_json::json!({
            "gl_repository": format!("project-{}", 1 + i % 100),
            "identifier": "user-1",
            "changes": format!("{} {:040x} refs/heads/main\n", "1".repeat(40), i),
        })
    };
    let ours = drive(n, args.concurrency, {
        let (http, endpoint) = (http.clone(), endpoint.clone());
        move |i| {
            let req = http
                .post(&endpoint)
                .header("x-request-id", format!("bench-{i}"))
                .json(&body(i));
            async move {
                let resp = req.send().await?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "ingest answered {}",
                    resp.status()
                );
                Ok(())
            }
        }
    })
    .await
    .context("driving hook-ingest")?;

    // Same payload size as one stored push event, straight to JetStream.
    let client = async_nats::connect(&url).await?;
    let js = async_nats::jetstream::new(client);
    let payload = bytes::Bytes::from(vec![b'x'; 320]);
    let raw = drive(n, args.concurrency, move |i| {
        let (js, payload) = (js.clone(), payload.clone());
        async move {
            let publish = async_nats::jetstream::message::PublishMessage::build()
                .payload(payload)
                .message_id(format!("raw-{i}"));
            js.send_publish(format!("pushbus.push.{}", 1 + i % 100), publish)
                .await?
                .await?;
            Ok(())
        }
    })
    .await
    .context("driving raw publishes")?;

    stop.cancel();
    let _ = host.await;
    drop(nats);
    let _ = std::fs::remove_dir_all(&dir);

    println!(
        "hook-ingest benchmark: {n} requests per side, concurrency {}",
        args.concurrency
    );
    println!("{}", ours.line("hook-ingest (HTTP -> ack)"));
    println!("{}", raw.line("raw JetStream publish+ack"));
    let p99 = |f: &Figures| f.hist.value_at_quantile(0.99) as f64;
    println!(
        "ratio: throughput {:.2} of raw, p99 latency {:.1}x raw",
        ours.rps / raw.rps,
        p99(&ours) / p99(&raw)
    );
    Ok(())
}
