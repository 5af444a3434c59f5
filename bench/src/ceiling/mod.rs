//! Two ceilings: plain async-nats moving the same number of same-size
//! messages through two JetStream hops (publish -> durable pull consumer ->
//! publish -> durable pull consumer), with no processing in between: the
//! yardstick the throughput targets are set against. pushbus's second hop is
//! lighter (a compare-and-set KV write followed by an ordered consumer, with
//! no acks).
//!
//! - same-ack-mode: acked the way the bus acks (each publish ack awaited
//!   before the message is acked, a plain ack, 16 lanes per hop);
//! - physical: the same durability (a push is acked only once its poke is
//!   stored, explicit acks) but everything pipelined: many publishes in
//!   flight, pulls of 512, plain acks. What the server and machine allow.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use super::pipeline::Plan;
use super::{Step, open_loop};

mod chain;

use chain::{Chain, publish, subject};

pub struct Ceiling {
    /// The same-ack-mode ceiling at each offered rate.
    pub steps: Vec<Step>,
    /// Flat out, same-ack-mode.
    pub flat: Flat,
    /// Flat out, physical.
    pub physical: Option<Flat>,
}

/// A flat-out run: its step, and publishes the server refused.
pub struct Flat {
    pub step: Step,
    pub n: u64,
    pub failed: u64,
    /// CPU of nats-server and of this client while it ran.
    pub cpu: crate::CpuUse,
}

/// nats-server and this process, the client of the ceiling chains.
fn ceiling_processes(nats_pid: Option<u32>) -> Vec<(&'static str, u32)> {
    let mut pids: Vec<_> = nats_pid.map(|p| ("nats-server", p)).into_iter().collect();
    pids.push(("client", std::process::id()));
    pids
}

impl Flat {
    pub fn lost(&self) -> i64 {
        self.n as i64 - self.step.received as i64
    }
}

#[derive(Clone, Copy, PartialEq)]
enum Mode {
    SameAck,
    Physical,
}

impl Mode {
    fn name(self) -> &'static str {
        match self {
            Mode::SameAck => "CEILING",
            Mode::Physical => "PHYSICAL",
        }
    }

    fn label(self) -> &'static str {
        match self {
            Mode::SameAck => "ceiling",
            Mode::Physical => "physical ceiling",
        }
    }
}

pub async fn run(
    url: &str,
    nats_pid: Option<u32>,
    plan: &Plan,
    push_size: usize,
    poke_size: usize,
) -> anyhow::Result<Ceiling> {
    let mut chain = Chain::start(url, Mode::SameAck, plan, poke_size).await?;
    let mut steps = Vec::new();
    let mut lo = 0;
    for &rate in &plan.rates {
        let n = (rate as f64 * plan.seconds) as u64;
        let t0 = Instant::now() + Duration::from_millis(50);
        chain.recorder.begin(lo, n, t0, rate as f64);
        let (js, failed) = (chain.js.clone(), Arc::new(AtomicU64::new(0)));
        let in_flight = Arc::new(AtomicU64::new(0));
        open_loop(n, rate as f64, t0, |j| {
            let (js, failed, in_flight) = (js.clone(), failed.clone(), in_flight.clone());
            in_flight.fetch_add(1, Ordering::Relaxed);
            tokio::spawn(async move {
                let seq = lo + j;
                let stored = match js.send_publish(subject(seq), publish(seq, push_size)).await {
                    Ok(ack) => ack.await.is_ok(),
                    Err(_) => false,
                };
                if !stored {
                    failed.fetch_add(1, Ordering::Relaxed);
                }
                in_flight.fetch_sub(1, Ordering::Relaxed);
            });
        })
        .await;
        let deadline = Instant::now() + Duration::from_secs(60);
        while in_flight.load(Ordering::Relaxed) > 0 && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        let step = chain.settle(n, deadline).await;
        let failed = failed.load(Ordering::Relaxed);
        eprintln!(
            "{}{}",
            step.line(&format!("ceiling {rate}/s"), step.lost()),
            refused(failed)
        );
        steps.push(step);
        lo += n;
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A window near 1,000 keeps consumers of the same stream fed (see the
    // notes in BENCHMARKS.md).
    let flat = chain
        .flat_out(nats_pid, lo, plan.flat_out, push_size, 1024)
        .await;
    chain.stop().await;

    let physical = match Chain::start(url, Mode::Physical, plan, poke_size).await {
        Ok(mut chain) => {
            // Under the context's 5,000 acks in flight (a publish past it waits
            // for one of ours to be awaited).
            let flat = chain
                .flat_out(nats_pid, 0, plan.flat_out, push_size, 4096)
                .await;
            chain.stop().await;
            Some(flat)
        }
        Err(err) => {
            eprintln!("physical ceiling skipped: {err:#}");
            None
        }
    };
    Ok(Ceiling {
        steps,
        flat,
        physical,
    })
}

fn refused(failed: u64) -> String {
    if failed == 0 {
        String::new()
    } else {
        format!(" ({failed} publishes refused)")
    }
}
