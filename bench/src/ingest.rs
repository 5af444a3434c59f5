//! `pushbus-bench ingest`: hook-ingest requests (request -> durable ack) at
//! a fixed concurrency, next to raw async-nats JetStream publishes of the
//! same payload size measured in the same run.

use std::time::{Duration, Instant};

use anyhow::Context;
use pushbus_shared::service::{self, Launcher};

use super::{Figures, drive, free_port};

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

pub async fn ingest(args: BenchArgs) -> anyhow::Result<()> {
    let n = if args.quick { 2_000 } else { args.requests };
    let nats = super::Nats::start();
    let url = nats.url();
    let listen = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let ops = std::net::SocketAddr::from(([127, 0, 0, 1], free_port()));
    let config = pushbus_hook_ingest::Config::new(listen);
    let stop = tokio_util::sync::CancellationToken::new();
    let host = tokio::spawn({
        let (url, stop) = (url.clone(), stop.clone());
        let launcher = Launcher::service::<pushbus_hook_ingest::HookIngest>(config);
        async move { service::host(&url, ops, vec![launcher], stop).await }
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
            js.send_publish(format!("pushbus.push.{}.raw-{i}", 1 + i % 100), publish)
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
