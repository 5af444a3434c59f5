//! One chain of two raw JetStream hops, in either ceiling's mode.

use std::sync::Arc;
use std::time::{Duration, Instant};

use async_nats::jetstream::{self, consumer::PullConsumer, message::PublishMessage as Publish};
use futures::StreamExt;
use futures::stream::FuturesUnordered;
use pushbus_shared::bus::ConsumerSpec;
use tokio_util::sync::CancellationToken;

use super::{Flat, Mode, ceiling_processes, refused};
use crate::pipeline::Plan;
use crate::{Recorder, Step};

/// Two streams, two durable consumers and a task per hop.
pub(super) struct Chain {
    mode: Mode,
    pub(super) js: jetstream::Context,
    pub(super) recorder: Arc<Recorder>,
    consumers: [PullConsumer; 2],
    stop: CancellationToken,
    hops: Vec<tokio::task::JoinHandle<anyhow::Result<()>>>,
}

impl Chain {
    pub(super) async fn start(
        url: &str,
        mode: Mode,
        plan: &Plan,
        poke_size: usize,
    ) -> anyhow::Result<Chain> {
        let js = jetstream::new(async_nats::connect(url).await?);
        let prefix = mode.name();
        let (pushes, pokes) = (format!("{prefix}_PUSHES"), format!("{prefix}_POKES"));
        let push_subjects = format!("{}.push.>", prefix.to_lowercase());
        let poke_prefix = format!("{}.poke", prefix.to_lowercase());
        // The same stream settings as PUSHBUS_PUSHES.
        for (name, subjects) in [
            (&pushes, push_subjects),
            (&pokes, format!("{poke_prefix}.>")),
        ] {
            let mut config = pushbus_shared::topology::pushes_stream();
            config.name = name.clone();
            config.subjects = vec![subjects];
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
        let js1 = jetstream::new(async_nats::connect(url).await?);
        let js2 = jetstream::new(async_nats::connect(url).await?);
        let c1 = consumer(&js1, mode, &pushes, "ceiling-hop1").await?;
        let c2 = consumer(&js2, mode, &pokes, "ceiling-hop2").await?;
        let hop1 = tokio::spawn(hop(c1.clone(), mode, stop.clone(), move |body| {
            let (js, poke_prefix) = (js1.clone(), poke_prefix.clone());
            async move {
                let seq = seq_of(&body);
                let ack = js
                    .send_publish(
                        format!("{poke_prefix}.bench-{}", seq % 10_000),
                        Publish::build()
                            .payload(payload(seq, poke_size))
                            .message_id(format!("poke-{seq}")),
                    )
                    .await?;
                ack.await?;
                Ok(())
            }
        }));
        let hop2 = tokio::spawn(hop(c2.clone(), mode, stop.clone(), {
            let recorder = recorder.clone();
            move |body| {
                recorder.record(seq_of(&body));
                async { Ok(()) }
            }
        }));
        Ok(Chain {
            mode,
            js,
            recorder,
            consumers: [c1, c2],
            stop,
            hops: vec![hop1, hop2],
        })
    }

    fn subject(&self, seq: u64) -> String {
        match self.mode {
            Mode::SameAck => subject(seq),
            Mode::Physical => format!("physical.push.{}", 100_000 + seq % 10_000),
        }
    }

    /// `n` publishes with up to `window` acks outstanding; then settles.
    /// Prints and returns the figures, with the CPU the server and this
    /// client used.
    pub(super) async fn flat_out(
        &mut self,
        nats_pid: Option<u32>,
        lo: u64,
        n: u64,
        push_size: usize,
        window: usize,
    ) -> Flat {
        let meter = crate::CpuMeter::start(ceiling_processes(nats_pid));
        let t0 = Instant::now();
        self.recorder.begin(lo, n, t0, 1e12);
        let mut acks = FuturesUnordered::new();
        let mut failed = 0;
        for j in 0..n {
            let seq = lo + j;
            match self
                .js
                .send_publish(self.subject(seq), publish(seq, push_size))
                .await
            {
                Ok(ack) => acks.push(std::future::IntoFuture::into_future(ack)),
                Err(_) => failed += 1,
            }
            while acks.len() >= window {
                if let Some(Err(_)) = acks.next().await {
                    failed += 1;
                }
            }
        }
        while let Some(ack) = acks.next().await {
            if ack.is_err() {
                failed += 1;
            }
        }
        let step = self
            .settle(n, Instant::now() + Duration::from_secs(120))
            .await;
        let cpu = meter.read(step.elapsed());
        let flat = Flat {
            step,
            n,
            failed,
            cpu,
        };
        eprintln!(
            "{} flat out: {} messages at {:.0}/s, lost {}{}",
            self.mode.label(),
            flat.n,
            flat.step.achieved(),
            flat.lost(),
            refused(flat.failed)
        );
        flat
    }

    /// Ends the step once `expected` messages arrived, or once both
    /// consumers have nothing pending and nothing un-acked (the rest will
    /// not come), or at `deadline`; returns its figures.
    pub(super) async fn settle(&mut self, expected: u64, deadline: Instant) -> Step {
        while self.recorder.received() < expected && Instant::now() < deadline {
            // Hop 1 first: once it is idle every poke is stored, so hop 2
            // idle after it means every poke was recorded.
            if self.idle(0).await && self.idle(1).await {
                break;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        self.recorder.begin(u64::MAX, 0, Instant::now(), 1.0)
    }

    async fn idle(&mut self, hop: usize) -> bool {
        self.consumers[hop]
            .info()
            .await
            .is_ok_and(|i| i.num_pending == 0 && i.num_ack_pending == 0)
    }

    pub(super) async fn stop(self) {
        self.stop.cancel();
        for hop in self.hops {
            if let Ok(Err(err)) = hop.await {
                eprintln!("ceiling hop ended with: {err:#}");
            }
        }
    }
}

pub(super) fn subject(seq: u64) -> String {
    format!("ceiling.push.{}", 100_000 + seq % 10_000)
}

pub(super) fn publish(seq: u64, size: usize) -> Publish {
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
/// ack_wait), on another stream; the physical ceiling allows more un-acked.
async fn consumer(
    js: &jetstream::Context,
    mode: Mode,
    stream: &str,
    durable: &str,
) -> anyhow::Result<PullConsumer> {
    let mut config = ConsumerSpec::new(stream, durable).pull_config();
    if mode == Mode::Physical {
        config.max_ack_pending = 16_384;
    }
    Ok(js.create_consumer_on_stream(config, stream).await?)
}

/// Pulls a batch at a time and runs `work` on each message, acking after
/// its work. Same-ack-mode: batches of 16, at most 16 at once (the bus's
/// lanes; the bus itself pulls 64 since 2026-12-02, and every ceiling
/// figure in BENCHMARKS.md was taken with 16). Physical: batches of 512,
/// no limit but the consumer's max_ack_pending, plain ack.
///
/// Each batch is a fresh pull request with a short expiry, so the consumer
/// is never left with messages pending and no pull outstanding (a long-
/// lived pull stream whose request expired unrenewed starved it once).
async fn hop<F, Fut>(
    consumer: PullConsumer,
    mode: Mode,
    stop: CancellationToken,
    work: F,
) -> anyhow::Result<()>
where
    F: Fn(bytes::Bytes) -> Fut + Send + Sync + 'static,
    Fut: std::future::Future<Output = anyhow::Result<()>> + Send + 'static,
{
    let (batch, lanes) = match mode {
        Mode::SameAck => (16, 16),
        Mode::Physical => (512, tokio::sync::Semaphore::MAX_PERMITS),
    };
    let lanes = Arc::new(tokio::sync::Semaphore::new(lanes));
    while !stop.is_cancelled() {
        let pulled = consumer
            .batch()
            .max_messages(batch)
            .expires(Duration::from_millis(500))
            .messages()
            .await;
        let Ok(mut messages) = pulled else {
            tokio::time::sleep(Duration::from_millis(50)).await;
            continue;
        };
        loop {
            let next = tokio::select! {
                _ = stop.cancelled() => return Ok(()),
                n = messages.next() => n,
            };
            let Some(msg) = next else { break };
            let Ok(msg) = msg else { continue };
            let permit = lanes.clone().acquire_owned().await?;
            let done = work(msg.payload.clone());
            tokio::spawn(async move {
                // Both modes ack as the bus does: plainly, after the work.
                if done.await.is_ok() {
                    let _ = msg.ack().await;
                }
                drop(permit);
            });
        }
    }
    Ok(())
}
