//! The ceiling: plain async-nats moving the same number of same-size
//! messages through the same JetStream hops as pushbus (publish -> durable
//! pull consumer -> publish -> durable pull consumer), acked the way the bus
//! acks (awaited publish acks, double_ack), with no processing in between.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage as Publish};
use futures::StreamExt;
use pushbus_shared::bus::ConsumerSpec;
use tokio_util::sync::CancellationToken;

use super::pipeline::Plan;
use super::{Recorder, Step, open_loop};

pub struct Ceiling {
    pub steps: Vec<Step>,
    pub flat_rate: f64,
}

const PUSHES: &str = "CEILING_PUSHES";
const POKES: &str = "CEILING_POKES";

pub async fn run(
    url: &str,
    plan: &Plan,
    push_size: usize,
    poke_size: usize,
) -> anyhow::Result<Ceiling> {
    let js = jetstream::new(async_nats::connect(url).await?);
    // The same stream settings as PUSHBUS_PUSHES / PUSHBUS_POKES.
    for (name, subjects) in [(PUSHES, "ceiling.push.>"), (POKES, "ceiling.poke.>")] {
        let mut config = pushbus_shared::topology::pushes_stream();
        config.name = name.into();
        config.subjects = vec![subjects.into()];
        js.create_stream(config).await?;
    }
    let total = plan
        .rates
        .iter()
        .map(|r| (*r as f64 * plan.seconds) as u64)
        .sum::<u64>()
        + plan.flat_out;
    let recorder = Recorder::new(total);
    let stop = CancellationToken::new();
    // Each hop on a connection of its own, as each service has one.
    let hop1 = {
        let js = jetstream::new(async_nats::connect(url).await?);
        let consumer = consumer(&js, PUSHES, "ceiling-hop1").await?;
        let padding = poke_size;
        tokio::spawn(hop(consumer, stop.clone(), move |body| {
            let js = js.clone();
            async move {
                let seq = seq_of(&body);
                let ack = js
                    .send_publish(
                        format!("ceiling.poke.bench-{}", seq % 10_000),
                        Publish::build()
                            .payload(payload(seq, padding))
                            .message_id(format!("poke-{seq}")),
                    )
                    .await?;
                ack.await?;
                Ok(())
            }
        }))
    };
    let hop2 = {
        let js = jetstream::new(async_nats::connect(url).await?);
        let consumer = consumer(&js, POKES, "ceiling-hop2").await?;
        let recorder = recorder.clone();
        tokio::spawn(hop(consumer, stop.clone(), move |body| {
            recorder.record(seq_of(&body));
            async { Ok(()) }
        }))
    };

    let mut steps = Vec::new();
    let mut lo = 0;
    for &rate in &plan.rates {
        let n = (rate as f64 * plan.seconds) as u64;
        let t0 = Instant::now() + Duration::from_millis(50);
        recorder.begin(lo, n, t0, rate as f64);
        let js = js.clone();
        open_loop(n, rate as f64, t0, |j| {
            let js = js.clone();
            tokio::spawn(async move {
                let seq = lo + j;
                if let Ok(ack) = js.send_publish(subject(seq), publish(seq, push_size)).await {
                    let _ = ack.await;
                }
            });
        })
        .await;
        let step = recorder
            .finish(n, Duration::from_secs(3), Duration::from_secs(60))
            .await;
        eprintln!("{}", step.line(&format!("ceiling {rate}/s"), step.lost()));
        steps.push(step);
        lo += n;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }

    // Flat out: publishes with up to 1,024 acks outstanding (a window near
    // 1,000 keeps consumers of the same stream fed; see the notes).
    let n = plan.flat_out;
    let t0 = Instant::now();
    recorder.begin(lo, n, t0, 1e12);
    let mut acks = super::AckWindow::new(1024);
    for j in 0..n {
        let seq = lo + j;
        acks.push(
            js.send_publish(subject(seq), publish(seq, push_size))
                .await?,
        )
        .await?;
    }
    acks.finish().await?;
    let flat = recorder
        .finish(n, Duration::from_secs(3), Duration::from_secs(120))
        .await;
    anyhow::ensure!(
        flat.received == n,
        "ceiling lost {} of {n}",
        n - flat.received
    );
    eprintln!("ceiling flat out: {n} messages at {:.0}/s", flat.achieved());

    stop.cancel();
    let _ = hop1.await;
    let _ = hop2.await;
    Ok(Ceiling {
        steps,
        flat_rate: flat.achieved(),
    })
}

fn subject(seq: u64) -> String {
    format!("ceiling.push.{}", 100_000 + seq % 10_000)
}

fn publish(seq: u64, size: usize) -> Publish {
    Publish::build()
        .payload(payload(seq, size))
        .message_id(format!("push-{seq}"))
}

fn payload(seq: u64, size: usize) -> bytes::Bytes {
    let mut p = vec![b'x'; size.max(8)];
    p[..8].copy_from_slice(&seq.to_le_bytes());
    p.into()
}

fn seq_of(payload: &[u8]) -> u64 {
    payload
        .get(..8)
        .and_then(|b| b.try_into().ok())
        .map_or(u64::MAX, u64::from_le_bytes)
}

/// The consumer config pushbus's bus uses (explicit ack, max_ack_pending,
/// ack_wait), on another stream.
async fn consumer(
    js: &jetstream::Context,
    stream: &str,
    durable: &str,
) -> anyhow::Result<PullConsumer> {
    let spec = ConsumerSpec::new(stream, durable);
    Ok(js
        .create_consumer_on_stream(spec.pull_config(), stream)
        .await?)
}

/// Pulls in batches of 16 (the bus's lanes) and runs `work` on up to 16
/// messages at once, each double-acked after its work, as the bus does.
async fn hop<F, Fut>(consumer: PullConsumer, stop: CancellationToken, work: F) -> anyhow::Result<()>
where
    F: Fn(bytes::Bytes) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    const LANES: usize = 16;
    let lanes = Arc::new(tokio::sync::Semaphore::new(LANES));
    let mut messages = consumer
        .stream()
        .max_messages_per_batch(LANES)
        .heartbeat(Duration::from_secs(5))
        .expires(Duration::from_secs(30))
        .messages()
        .await?;
    loop {
        let next = tokio::select! {
            _ = stop.cancelled() => return Ok(()),
            n = messages.next() => n,
        };
        let Some(msg) = next else { return Ok(()) };
        let Ok(msg) = msg else { continue };
        let permit = lanes.clone().acquire_owned().await?;
        let done = work(msg.payload.clone());
        tokio::spawn(async move {
            if done.await.is_ok() {
                let _ = msg.double_ack().await;
            }
            drop(permit);
        });
    }
}
