//! `pushbus-bench pipeline`: push-to-poke latency and throughput through
//! hook-ingest -> filter -> gitops-notifier (each its own process) with
//! thousands of connected agents, under an open-loop load; next to the raw
//! JetStream ceiling and a Redis pub/sub baseline measured in the same run;
//! and what each side loses when its subscriber is restarted mid-run.

use std::time::{Duration, Instant};

use async_nats::jetstream;
use pushbus_shared::names;

use super::stack::Stack;
use super::{Recorder, Step};

mod agents;
mod cluster;
mod steps;
mod summary;

use agents::*;
use cluster::*;
use steps::*;
use summary::*;

#[derive(clap::Args, Clone)]
pub struct PipelineArgs {
    /// Offered rates in pushes/s, one step each (comma-separated).
    /// Default 1000,5000,10000 (quick: 1000,5000).
    #[arg(long, value_delimiter = ',')]
    rate: Vec<u64>,
    /// Seconds per step (default 10; quick 3).
    #[arg(long)]
    seconds: Option<f64>,
    /// Connected agents, each watching its own project (default 10,000;
    /// quick 2,000).
    #[arg(long)]
    agents: Option<u64>,
    /// The Redis server of the pub/sub baseline.
    #[arg(long, default_value = "redis://127.0.0.1:6379")]
    redis_url: String,
    /// Also run the pipeline on an N-node JetStream cluster on loopback
    /// (every stream and bucket at RN), after the single-node run: flat
    /// out, 1,000/s, and a SIGKILL of the PUSHBUS_PUSHES leader.
    #[arg(long)]
    cluster: Option<usize>,
    /// Everything smaller: runs in under a minute.
    #[arg(long)]
    quick: bool,
}

/// What one run does, after defaults.
pub struct Plan {
    pub rates: Vec<u64>,
    pub seconds: f64,
    pub agents: u64,
    /// Rate and length of the subscriber-restart runs.
    pub restart_rate: u64,
    pub restart_seconds: f64,
    /// Messages pushed flat out through the ceiling chain.
    pub flat_out: u64,
    /// Length of the cluster's leader-kill run (at `restart_rate`).
    pub leader_kill_seconds: f64,
}

impl Plan {
    pub fn from(args: &PipelineArgs) -> Plan {
        let q = args.quick;
        Plan {
            rates: if !args.rate.is_empty() {
                args.rate.clone()
            } else if q {
                vec![1_000, 5_000]
            } else {
                vec![1_000, 5_000, 10_000]
            },
            seconds: args.seconds.unwrap_or(if q { 3.0 } else { 10.0 }),
            agents: args.agents.unwrap_or(if q { 2_000 } else { 10_000 }),
            restart_rate: 1_000,
            restart_seconds: if q { 4.0 } else { 10.0 },
            flat_out: if q { 20_000 } else { 100_000 },
            leader_kill_seconds: if q { 16.0 } else { 30.0 },
        }
    }
}

/// One step of the pipeline: its latency figures and how many of its pushes
/// were refused by hook-ingest or never reached their agent.
pub struct Outcome {
    pub step: Step,
    pub sent: u64,
    /// The pushes hook-ingest refused, by answer: each distinct answer and
    /// how many pushes got it.
    pub refusals: Vec<(String, u64)>,
    /// Pushes hook-ingest accepted whose poke never reached the agent,
    /// and no newer push of the same agent and ref did either.
    pub lost: i64,
    /// Accepted pushes whose own poke never arrived because a newer push of
    /// the same ref reached the agent first: a ref head moves only to the
    /// newest push, so a poke redelivered after a newer one was recorded is
    /// dropped, as designed (agents want the newest SHA, not every SHA).
    pub superseded: u64,
    /// When a nats-server was killed during the step: how hook-ingest
    /// answered from then on.
    pub outage: Option<Outage>,
}

/// Why hook-ingest refused pushes, so a refused push says what refused
/// it: the status and the `error` of the body, or the transport's failure.
#[derive(Default)]
pub struct Refusals(std::sync::Mutex<std::collections::BTreeMap<String, u64>>);

impl Refusals {
    /// Counts the answer if it is a refusal; whether the push was accepted.
    pub async fn accepted(&self, answer: reqwest::Result<reqwest::Response>) -> bool {
        let cause = match answer {
            Ok(r) if r.status().is_success() => return true,
            Ok(r) => {
                let status = r.status().as_u16();
                let body: serde_json::Value = r.json().await.unwrap_or_default();
                match body.get("error").and_then(|e| e.as_str()) {
                    Some(error) => format!("{status} {error}"),
                    None => status.to_string(),
                }
            }
            Err(e) if e.is_timeout() => "no answer: timed out".to_owned(),
            Err(e) if e.is_connect() => "no answer: could not connect".to_owned(),
            Err(_) => "no answer: connection failed".to_owned(),
        };
        let mut causes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        *causes.entry(cause).or_default() += 1;
        false
    }

    pub fn causes(&self) -> Vec<(String, u64)> {
        let causes = self.0.lock().unwrap_or_else(|p| p.into_inner());
        causes.iter().map(|(c, n)| (c.clone(), *n)).collect()
    }
}

/// hook-ingest's answers after a stream leader was SIGKILLed.
pub struct Outage {
    /// Pushes due after the kill that were refused (503 or no answer).
    pub refused: u64,
    /// From the kill until the first 200 after the last refusal (0 if
    /// nothing was refused; until the step's last answer if never).
    pub window: Duration,
    /// Whether hook-ingest accepted pushes again before the step ended.
    pub recovered: bool,
    /// The slowest answer to a push due after the kill.
    pub slowest: Duration,
    /// The node that led PUSHBUS_PUSHES, and the one that leads it after.
    pub old_leader: String,
    pub new_leader: Option<String>,
}

pub async fn pipeline(args: PipelineArgs) -> anyhow::Result<()> {
    let plan = Plan::from(&args);
    let nats = super::Nats::start();
    let url = nats.url();
    let client = async_nats::connect(&url).await?;
    let js = jetstream::new(client.clone());
    println!(
        "pipeline benchmark: {} agents, rates {:?}/s for {} s each, nats-server at {url}",
        plan.agents, plan.rates, plan.seconds
    );

    let started = Instant::now();
    register_agents(&js, plan.agents, 1).await?;
    let logs = std::env::temp_dir().join(format!("pushbus-bench-logs-{}", std::process::id()));
    let mut stack = Stack::start(&url, 1, logs.clone()).await?;
    eprintln!(
        "{} agents registered and 3 services ready in {:.1} s (service logs: {})",
        plan.agents,
        started.elapsed().as_secs_f64(),
        logs.display()
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_idle = stack.rss();

    // Sequence numbers are unique over the whole run; the SHA carries them.
    let total = plan
        .rates
        .iter()
        .map(|r| (*r as f64 * plan.seconds) as u64 + 1)
        .sum::<u64>()
        + 3 * (plan.restart_rate as f64 * plan.restart_seconds) as u64
        + plan.flat_out;
    let recorder = Recorder::new(total);
    let started = Instant::now();
    let agents = Agents::connect(stack.notifier, plan.agents, recorder.clone()).await?;
    let connect_time = started.elapsed();
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_connected = stack.rss();

    let load = Load::new(stack.ingest, plan.agents);
    let mut next_seq = 0u64;
    let mut ours = Vec::new();
    for &rate in &plan.rates {
        let n = (rate as f64 * plan.seconds) as u64;
        // A step that fails is reported and the run goes on: one bad step
        // must not hide the figures of the others.
        match run_step(&load, &recorder, next_seq, n, rate, None).await {
            Ok(outcome) => {
                eprintln!(
                    "{}",
                    outcome
                        .step
                        .line(&format!("pushbus {rate}/s"), outcome.lost)
                );
                ours.push(outcome);
            }
            Err(err) => eprintln!("pushbus {rate}/s step failed: {err:#}"),
        }
        next_seq += n;
        // Keeps one agent+ref's pushes of two steps at least a second apart.
        tokio::time::sleep(Duration::from_secs(1)).await;
    }
    // Flat out: as fast as hook-ingest takes them, 256 requests in flight.
    // The CPU each process spends on it says what bounds throughput.
    let mut processes = stack.pids();
    processes.extend(nats.pid().map(|p| ("nats-server", p)));
    processes.push(("load generator + agents", std::process::id()));
    let meter = crate::CpuMeter::start(processes);
    let flat = flat_out(&load, &recorder, next_seq, plan.flat_out).await?;
    let flat_cpu = meter.read(flat.step.elapsed());
    eprintln!(
        "pushbus flat out: {} pushes at {:.0}/s, lost {}",
        plan.flat_out,
        flat.step.achieved(),
        flat.lost
    );
    next_seq += plan.flat_out;
    tokio::time::sleep(Duration::from_secs(1)).await;
    let rss_after = stack.rss();

    // Subscriber restarts: SIGKILL mid-run, start a new process at once.
    let mut restarts = Vec::new();
    for victim in ["filter", "gitops-notifier"] {
        let n = (plan.restart_rate as f64 * plan.restart_seconds) as u64;
        let first_head = js
            .get_stream(names::STREAM_REF_HEADS)
            .await?
            .info()
            .await?
            .state
            .last_sequence
            + 1;
        let outcome = run_step(
            &load,
            &recorder,
            next_seq,
            n,
            plan.restart_rate,
            Some(Fault::Service(&mut stack, victim, &agents)),
        )
        .await;
        match outcome {
            Ok(outcome) => {
                let stored =
                    heads_in_bucket(&js, first_head, (next_seq, n), &load, plan.restart_rate)
                        .await
                        .unwrap_or_else(|err| {
                            eprintln!("counting stored heads failed: {err:#}");
                            0
                        });
                let name = format!("pushbus, {victim} restarted");
                eprintln!("{}", outcome.step.line(&name, outcome.lost));
                restarts.push((victim, outcome, stored, n));
            }
            Err(err) => eprintln!("{victim} restart step failed: {err:#}"),
        }
        next_seq += n;
        tokio::time::sleep(Duration::from_secs(1)).await;
    }

    let push_size = mean_message_size(&js, names::STREAM_PUSHES).await?;
    let poke_size = mean_message_size(&js, names::STREAM_REF_HEADS).await?;
    agents.stop().await;
    stack.stop().await;

    // The ceiling and the baseline, on the same nats-server and machine,
    // with the stack stopped so it does not compete for the cores.
    // Bounded: a stuck ceiling must not hold back the figures of the rest.
    let ceiling = tokio::time::timeout(
        Duration::from_secs(600),
        super::ceiling::run(&url, nats.pid(), &plan, push_size, poke_size),
    )
    .await;
    let ceiling = match ceiling {
        Ok(Ok(c)) => Some(c),
        Ok(Err(err)) => {
            eprintln!("ceilings failed: {err:#}");
            None
        }
        Err(_) => {
            eprintln!("ceilings did not finish within 10 minutes");
            None
        }
    };
    let redis = match super::redis::run(&args.redis_url, &plan, push_size).await {
        Ok(r) => Some(r),
        Err(err) => {
            eprintln!("Redis baseline skipped: {err:#}");
            None
        }
    };
    drop(nats);

    let clustered = match args.cluster {
        Some(size) => match cluster(&plan, size).await {
            Ok(c) => Some(c),
            Err(err) => {
                eprintln!("cluster run failed: {err:#}");
                None
            }
        },
        None => None,
    };

    report(
        &plan,
        &Report {
            rss_idle,
            rss_connected,
            rss_after,
            connect_time,
            ours: &ours,
            flat: &flat,
            flat_cpu: &flat_cpu,
            restarts: &restarts,
            ceiling: ceiling.as_ref(),
            redis: redis.as_ref(),
            push_size,
            poke_size,
            clustered: clustered.as_ref(),
        },
    );
    Ok(())
}
