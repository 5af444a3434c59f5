//! The pipeline on an N-node cluster at RN (`pipeline --cluster N`): the
//! steady and flat-out steps again, then a kill of the PUSHBUS_PUSHES leader.

use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;

use super::super::stack::Stack;
use super::{Agents, Fault, Load, Outcome, Plan, flat_out, register_agents, run_step};
use crate::Recorder;

/// The pipeline on an N-node cluster at RN: what replication costs, and
/// how long hook-ingest refuses pushes when the PUSHBUS_PUSHES leader dies.
pub struct Clustered {
    pub size: usize,
    pub steady: Outcome,
    pub flat: Outcome,
    pub leader_kill: Outcome,
}

pub(super) async fn cluster(plan: &Plan, size: usize) -> anyhow::Result<Clustered> {
    use pushbus_shared::testkit::NatsCluster;
    let replicas = u8::try_from(size).context("cluster size")?;
    let mut nodes = NatsCluster::start(size);
    nodes.wait_ready().await;
    let urls = nodes.urls();
    eprintln!("{size}-node cluster at {urls}");
    let started = Instant::now();
    Stack::setup(&urls, replicas).await?;
    // Short request timeouts: a request lost with the killed node is
    // retried soon instead of waiting out the default 5 s.
    let js = jetstream::ContextBuilder::new()
        .timeout(Duration::from_secs(1))
        .build(nodes.client().await?);
    register_agents(&js, plan.agents, replicas).await?;
    let logs =
        std::env::temp_dir().join(format!("pushbus-bench-logs-{}-cluster", std::process::id()));
    let stack = Stack::start(&urls, replicas, logs.clone()).await?;
    eprintln!(
        "R{replicas} topology, {} agents and 3 services ready in {:.1} s (service logs: {})",
        plan.agents,
        started.elapsed().as_secs_f64(),
        logs.display()
    );
    let steady_n = (1_000.0 * plan.seconds) as u64;
    let kill_n = (plan.restart_rate as f64 * plan.leader_kill_seconds) as u64;
    let recorder = Recorder::new(steady_n + plan.flat_out + kill_n);
    let agents = Agents::connect(stack.notifier, plan.agents, recorder.clone()).await?;
    let load = Load::new(stack.ingest, plan.agents);
    let steady = run_step(&load, &recorder, 0, steady_n, 1_000, None).await?;
    eprintln!(
        "{}",
        steady
            .step
            .line(&format!("R{replicas} 1000/s"), steady.lost)
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let flat = flat_out(&load, &recorder, steady_n, plan.flat_out).await?;
    eprintln!(
        "R{replicas} flat out: {} pushes at {:.0}/s, lost {}",
        plan.flat_out,
        flat.step.achieved(),
        flat.lost
    );
    tokio::time::sleep(Duration::from_secs(1)).await;
    let leader_kill = run_step(
        &load,
        &recorder,
        steady_n + plan.flat_out,
        kill_n,
        plan.restart_rate,
        Some(Fault::Leader(&mut nodes, &js)),
    )
    .await?;
    eprintln!(
        "{}",
        leader_kill
            .step
            .line(&format!("R{replicas}, leader SIGKILLed"), leader_kill.lost)
    );
    agents.stop().await;
    stack.stop().await;
    Ok(Clustered {
        size,
        steady,
        flat,
        leader_kill,
    })
}
