//! `pushbus-bench pipeline`: push-to-poke latency and throughput through
//! hook-ingest -> filter -> gitops-notifier (each its own process) with
//! thousands of connected agents, under an open-loop load; next to the raw
//! JetStream ceiling and a Redis pub/sub baseline measured in the same run;
//! and what each side loses when its subscriber is restarted mid-run.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use futures::StreamExt;
use prost::Message;
use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::{
    AgentConfig, AgentPoke, RefSelector, Watch, WatchKind, WatchRequest, ref_selector::Kind,
    watch_event::Event,
};
use pushbus_shared::{names, topology};
use tokio_util::sync::CancellationToken;

use super::stack::{FILTER_ACK_WAIT_SECS, NOTIFIER_ACK_WAIT_SECS, Stack};
use super::{Recorder, Step, open_loop};

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
    pub refused: u64,
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
    let flat = flat_out(&load, &recorder, next_seq, plan.flat_out).await?;
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
        let first_poke = js
            .get_stream(names::STREAM_POKES)
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
                let stored = pokes_in_stream(&js, first_poke, next_seq, n)
                    .await
                    .unwrap_or_else(|err| {
                        eprintln!("counting stored pokes failed: {err:#}");
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
    let poke_size = mean_message_size(&js, names::STREAM_POKES).await?;
    agents.stop().await;
    stack.stop().await;

    // The ceiling and the baseline, on the same nats-server and machine,
    // with the stack stopped so it does not compete for the cores.
    // Bounded: a stuck ceiling must not hold back the figures of the rest.
    let ceiling = tokio::time::timeout(
        Duration::from_secs(600),
        super::ceiling::run(&url, &plan, push_size, poke_size),
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

/// The pipeline on an N-node cluster at RN: what replication costs, and
/// how long hook-ingest refuses pushes when the PUSHBUS_PUSHES leader dies.
pub struct Clustered {
    pub size: usize,
    pub steady: Outcome,
    pub flat: Outcome,
    pub leader_kill: Outcome,
}

async fn cluster(plan: &Plan, size: usize) -> anyhow::Result<Clustered> {
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

fn agent_id(a: u64) -> String {
    format!("bench-{a}")
}

/// Agent `a` watches project `PROJECT_BASE + a`, any branch.
const PROJECT_BASE: u64 = 100_000;

/// Writes `n` agents to KV pushbus-agents with pipelined puts (what
/// `put_agent` does, without a round trip per agent). No token hash: the
/// notifier lets them in without one.
async fn register_agents(js: &jetstream::Context, n: u64, replicas: u8) -> anyhow::Result<()> {
    let mut bucket = topology::agents_bucket();
    bucket.num_replicas = usize::from(replicas);
    js.create_or_update_key_value(bucket)
        .await
        .context("creating the agents bucket")?;
    let mut acks = super::AckWindow::new(2048);
    for a in 0..n {
        let cfg = AgentConfig {
            agent_id: agent_id(a),
            watches: vec![Watch {
                project_id: (PROJECT_BASE + a) as i64,
                refs: Some(RefSelector {
                    kind: Kind::AnyBranch as i32,
                    pattern: String::new(),
                }),
                kind: WatchKind::Gitops as i32,
                ..Default::default()
            }],
            // No token to check: the bench measures delivery, not login.
            public: true,
            ..Default::default()
        };
        if a == 0 {
            // The same validation put_agent applies, once.
            pushbus_filter::agent::compile(&cfg).map_err(|e| anyhow::anyhow!("{e}"))?;
        }
        let subject = format!("$KV.{}.{}", names::BUCKET_AGENTS, cfg.agent_id);
        acks.push(js.publish(subject, cfg.encode_to_vec().into()).await?)
            .await?;
    }
    acks.finish().await
}

/// The SHA a push carries: its sequence number, so the poke names it.
fn sha_of(seq: u64) -> String {
    format!("b{seq:039x}")
}

fn seq_of(sha: &str) -> Option<u64> {
    u64::from_str_radix(sha.get(1..)?, 16).ok()
}

/// Agents connected over gRPC Watch, sharing a few HTTP/2 connections.
pub struct Agents {
    n: u64,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
    tasks: tokio::task::JoinSet<()>,
}

/// Watch streams per HTTP/2 connection: under the server's default limit
/// of concurrent streams (hyper: 200).
const STREAMS_PER_CONNECTION: u64 = 100;

impl Agents {
    pub async fn connect(
        notifier: std::net::SocketAddr,
        n: u64,
        recorder: Arc<Recorder>,
    ) -> anyhow::Result<Agents> {
        let endpoint = tonic::transport::Endpoint::from_shared(format!("http://{notifier}"))?;
        let mut channels = Vec::new();
        for _ in 0..n.div_ceil(STREAMS_PER_CONNECTION) {
            channels.push(endpoint.connect().await?);
        }
        let live = Arc::new(AtomicUsize::new(0));
        let stop = CancellationToken::new();
        let mut tasks = tokio::task::JoinSet::new();
        for a in 0..n {
            let channel = channels[(a / STREAMS_PER_CONNECTION) as usize].clone();
            tasks.spawn(agent(
                GitOpsNotifierClient::new(channel),
                a,
                recorder.clone(),
                live.clone(),
                stop.clone(),
            ));
        }
        let agents = Agents {
            n,
            live,
            stop,
            tasks,
        };
        agents.wait_live(Duration::from_secs(120)).await?;
        Ok(agents)
    }

    /// Until every agent has its LIVE status.
    pub async fn wait_live(&self, limit: Duration) -> anyhow::Result<()> {
        let deadline = Instant::now() + limit;
        while self.live.load(Ordering::Relaxed) < self.n as usize {
            anyhow::ensure!(
                Instant::now() < deadline,
                "only {} of {} agents live",
                self.live.load(Ordering::Relaxed),
                self.n
            );
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        Ok(())
    }

    pub async fn stop(mut self) {
        self.stop.cancel();
        while self.tasks.join_next().await.is_some() {}
    }
}

/// One agent: watch, record pokes, reconnect when the stream ends.
async fn agent(
    mut client: GitOpsNotifierClient<tonic::transport::Channel>,
    a: u64,
    recorder: Arc<Recorder>,
    live: Arc<AtomicUsize>,
    stop: CancellationToken,
) {
    let id = agent_id(a);
    // The last cursor seen (statuses carry one too): a reconnect catches up
    // on what moved while this agent was away, as a real agent would.
    let mut cursor: Option<u64> = None;
    while !stop.is_cancelled() {
        let request = WatchRequest {
            agent_id: id.clone(),
            since_cursor: cursor,
            ..Default::default()
        };
        let mut is_live = false;
        let response = tokio::select! {
            _ = stop.cancelled() => return,
            r = client.watch(request) => r,
        };
        if let Ok(response) = response {
            let mut events = response.into_inner();
            loop {
                let next = tokio::select! {
                    _ = stop.cancelled() => break,
                    m = events.message() => m,
                };
                let Ok(Some(ev)) = next else { break };
                cursor = Some(cursor.map_or(ev.cursor, |c| c.max(ev.cursor)));
                match ev.event {
                    Some(Event::Status(_)) if !is_live => {
                        is_live = true;
                        live.fetch_add(1, Ordering::Relaxed);
                    }
                    Some(Event::Poke(p)) => {
                        if let Some(seq) = seq_of(&p.new_sha) {
                            recorder.record(seq);
                        }
                    }
                    _ => {}
                }
            }
        }
        if is_live {
            live.fetch_sub(1, Ordering::Relaxed);
        }
        // Spread 10,000 reconnects over a few hundred ms.
        let pause = Duration::from_millis(100 + a % 400);
        tokio::select! {
            _ = stop.cancelled() => return,
            _ = tokio::time::sleep(pause) => {}
        }
    }
}

/// The load generator's side of hook-ingest.
struct Load {
    http: reqwest::Client,
    endpoint: String,
    agents: u64,
}

impl Load {
    fn new(ingest: std::net::SocketAddr, agents: u64) -> Load {
        Load {
            http: reqwest::Client::new(),
            endpoint: format!("http://{ingest}/api/v4/internal/post_receive"),
            agents,
        }
    }

    /// Push `j` of a step at `rate`: agent j mod agents, and as many
    /// branches as it takes for one agent+ref to get at most one push a
    /// second (the notifier may merge closer ones).
    /// Push `j`'s agent and branch.
    fn key(&self, j: u64, rate: u64) -> (u64, u64) {
        let refs = rate.div_ceil(self.agents).max(1);
        (j % self.agents, (j / self.agents) % refs)
    }

    fn body(&self, seq: u64, j: u64, rate: u64) -> serde_json::Value {
        let (a, branch) = self.key(j, rate);
        serde_json::json!({
            "gl_repository": format!("project-{}", PROJECT_BASE + a),
            "identifier": "user-1",
            "changes": format!("{} {} refs/heads/b{branch}\n", "1".repeat(40), sha_of(seq)),
        })
    }
}

/// HTTP requests the load generator keeps in flight at most.
const MAX_IN_FLIGHT: usize = 1024;

/// What a step breaks halfway through.
enum Fault<'a> {
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
async fn run_step(
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
    let refused = Arc::new(AtomicU64::new(0));
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
        let (ok, refused, in_flight) = (ok.clone(), refused.clone(), in_flight.clone());
        let (accepted_each, answered) = (accepted_each.clone(), answered.clone());
        let mut bodies = bodies.into_iter();
        tokio::spawn(async move {
            open_loop(n, rate as f64, t0, |j| {
                let req = http
                    .post(&endpoint)
                    .header("x-request-id", format!("bench-{}", lo + j))
                    .json(&bodies.next().unwrap_or_default());
                let (ok, refused, in_flight) = (ok.clone(), refused.clone(), in_flight.clone());
                let (accepted_each, answered) = (accepted_each.clone(), answered.clone());
                let window = window.clone();
                in_flight.fetch_add(1, Ordering::Relaxed);
                tokio::spawn(async move {
                    let _permit = window.acquire_owned().await;
                    match req.send().await {
                        Ok(r) if r.status().is_success() => {
                            if let Some(a) = accepted_each.get(j as usize) {
                                a.store(true, Ordering::Relaxed);
                            }
                            ok.fetch_add(1, Ordering::Relaxed)
                        }
                        _ => refused.fetch_add(1, Ordering::Relaxed),
                    };
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
            // The pokes the killed replica had pulled come back after its
            // ack_wait; a shorter quiet spell counted them lost (they were
            // only late).
            quiet = Duration::from_secs(NOTIFIER_ACK_WAIT_SECS + 3);
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
    let mut outcome = Outcome::new(step, n, accepted, refused.load(Ordering::Relaxed));
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
fn outage_after(
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
async fn flat_out(
    load: &Load,
    recorder: &Arc<Recorder>,
    lo: u64,
    n: u64,
) -> anyhow::Result<Outcome> {
    // Branches enough for one push per agent+ref per second up to 50,000/s.
    const ASSUMED_MAX_RATE: u64 = 50_000;
    let window = Arc::new(tokio::sync::Semaphore::new(256));
    let ok = Arc::new(AtomicU64::new(0));
    let refused = Arc::new(AtomicU64::new(0));
    let t0 = Instant::now();
    recorder.begin(lo, n, t0, 1e12);
    for j in 0..n {
        let permit = window.clone().acquire_owned().await?;
        let req = load
            .http
            .post(&load.endpoint)
            .json(&load.body(lo + j, j, ASSUMED_MAX_RATE));
        let (ok, refused) = (ok.clone(), refused.clone());
        tokio::spawn(async move {
            match req.send().await {
                Ok(r) if r.status().is_success() => ok.fetch_add(1, Ordering::Relaxed),
                _ => refused.fetch_add(1, Ordering::Relaxed),
            };
            drop(permit);
        });
    }
    let _ = window.acquire_many(256).await?;
    let accepted = ok.load(Ordering::Relaxed);
    let step = recorder
        .finish(accepted, Duration::from_secs(3), Duration::from_secs(120))
        .await;
    Ok(Outcome::new(
        step,
        n,
        accepted,
        refused.load(Ordering::Relaxed),
    ))
}

/// Distinct pushes of `lo..lo + n` with at least one poke stored in
/// PUSHBUS_POKES from stream sequence `from` on.
async fn pokes_in_stream(
    js: &jetstream::Context,
    from: u64,
    lo: u64,
    n: u64,
) -> anyhow::Result<u64> {
    let stream = js.get_stream(names::STREAM_POKES).await?;
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
    let mut seen = std::collections::HashSet::new();
    while let Some(msg) = tokio::time::timeout(Duration::from_secs(5), messages.next())
        .await
        .context("reading PUSHBUS_POKES")?
    {
        let msg = msg?;
        let env = pushbus_shared::envelope::decode(&msg.payload)?;
        let poke: AgentPoke = pushbus_shared::envelope::open(&env)?;
        if let Some(seq) = seq_of(&poke.new_sha).filter(|s| (lo..lo + n).contains(s)) {
            seen.insert(seq);
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
    Ok(seen.len() as u64)
}

/// Mean stored message size of a stream (payload, subject and headers).
async fn mean_message_size(js: &jetstream::Context, stream: &str) -> anyhow::Result<usize> {
    let state = js.get_stream(stream).await?.info().await?.state.clone();
    Ok((state.bytes / state.messages.max(1)) as usize)
}

pub struct Report<'a> {
    rss_idle: Vec<(&'static str, u64)>,
    rss_connected: Vec<(&'static str, u64)>,
    rss_after: Vec<(&'static str, u64)>,
    connect_time: Duration,
    ours: &'a [Outcome],
    flat: &'a Outcome,
    restarts: &'a [(&'static str, Outcome, u64, u64)],
    ceiling: Option<&'a super::ceiling::Ceiling>,
    redis: Option<&'a super::redis::Baseline>,
    push_size: usize,
    poke_size: usize,
    clustered: Option<&'a Clustered>,
}

fn mb(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

fn report(plan: &Plan, r: &Report<'_>) {
    println!();
    println!(
        "== pushbus pipeline: hook-ingest -> filter -> gitops-notifier, {} gRPC agents ({} per HTTP/2 connection) ==",
        plan.agents, STREAMS_PER_CONNECTION
    );
    println!(
        "stored sizes: push {} B, poke {} B (ceiling and Redis use the same)",
        r.push_size, r.poke_size
    );
    println!(
        "{:<34} {:>9} {:>10}   latency from scheduled send to poke at the agent (ms)",
        "side / offered", "offered", "achieved"
    );
    for o in r.ours {
        println!("{}", o.step.line("pushbus", o.lost));
        if o.refused > 0 || o.step.duplicates > 0 {
            println!(
                "    {} of {} pushes refused by hook-ingest, {} duplicate pokes",
                o.refused, o.sent, o.step.duplicates
            );
        }
    }
    for s in r.ceiling.iter().flat_map(|c| &c.steps) {
        println!("{}", s.line("ceiling (raw JetStream 2 hops)", s.lost()));
    }
    if let Some(redis) = r.redis {
        for s in &redis.steps {
            println!("{}", s.line("Redis PUBLISH/SUBSCRIBE", s.lost()));
        }
    }
    println!();
    let sustained = r
        .ours
        .iter()
        .filter(|o| {
            o.lost == 0
                && o.refused == 0
                && o.step.achieved() >= 0.95 * o.step_rate()
                && o.step.ms(0.99) < 100.0
        })
        .map(|o| o.step_rate())
        .fold(0.0, f64::max);
    println!(
        "throughput: pushbus sustained {sustained:.0}/s open loop (the highest step with no loss, >= 95% achieved and p99 < 100 ms)"
    );
    let ours = r.flat.step.achieved();
    println!(
        "flat out ({} events each): pushbus {ours:.0}/s (lost {}, refused {})",
        plan.flat_out, r.flat.lost, r.flat.refused
    );
    if let Some(c) = r.ceiling {
        let flats = [
            ("same-ack-mode ceiling", Some(&c.flat)),
            ("physical ceiling", c.physical.as_ref()),
        ];
        for (name, flat) in flats {
            let Some(f) = flat else {
                println!("  {name}: not measured");
                continue;
            };
            let rate = f.step.achieved();
            println!(
                "  {name:<22} {rate:>7.0}/s (lost {}, publishes refused {}) -> pushbus = {:.2} of it",
                f.lost(),
                f.failed,
                if rate > 0.0 { ours / rate } else { f64::NAN }
            );
        }
        for o in r.ours {
            let Some(s) = c.steps.iter().find(|s| s.rate() == o.step_rate()) else {
                continue;
            };
            println!(
                "latency at {:.0}/s: pushbus p50 {:.2}x, p99 {:.2}x the same-ack-mode ceiling's",
                o.step_rate(),
                o.step.ms(0.5) / s.ms(0.5),
                o.step.ms(0.99) / s.ms(0.99)
            );
        }
    }
    println!();
    println!(
        "resident memory (VmRSS, MB): idle | {} agents connected | after the load",
        plan.agents
    );
    for (i, (name, idle)) in r.rss_idle.iter().enumerate() {
        println!(
            "  {name:<16} {:>7.1} | {:>7.1} | {:>7.1}",
            mb(*idle),
            mb(r.rss_connected[i].1),
            mb(r.rss_after[i].1)
        );
    }
    let notifier = |v: &Vec<(&str, u64)>| {
        v.iter()
            .find(|x| x.0 == "gitops-notifier")
            .map_or(0, |x| x.1)
    };
    println!(
        "  gitops-notifier: {:.1} KB per idle connected agent; all {} connected in {:.2} s",
        (notifier(&r.rss_connected) as f64 - notifier(&r.rss_idle) as f64)
            / plan.agents as f64
            / 1024.0,
        plan.agents,
        r.connect_time.as_secs_f64()
    );
    println!();
    println!(
        "subscriber restart mid-run ({}/s for {} s):",
        plan.restart_rate, plan.restart_seconds
    );
    for (victim, o, stored, n) in r.restarts {
        println!(
            "  pushbus, SIGKILL {victim:<16} pushes {n}, refused {}, pokes stored in PUSHBUS_POKES for {stored}, received by agents {}, superseded by a newer push of the ref {} -> lost at agents {}",
            o.refused, o.step.received, o.superseded, o.lost
        );
    }
    if let Some(redis) = r.redis {
        println!(
            "  Redis, subscriber reconnect       published {}, received {} -> lost {}",
            redis.restart_published,
            redis.restart_received,
            redis.restart_published as i64 - redis.restart_received as i64
        );
    }
    if let Some(c) = r.clustered {
        report_cluster(plan, r, c);
    }
}

fn report_cluster(plan: &Plan, r: &Report<'_>, c: &Clustered) {
    let n = c.size;
    println!();
    println!("== {n}-node cluster (R{n}) beside single node (R1), same run ==");
    println!(
        "flat out ({} pushes): R1 {:.0}/s (lost {}), R{n} {:.0}/s (lost {}) -> R{n} = {:.2} of R1",
        plan.flat_out,
        r.flat.step.achieved(),
        r.flat.lost,
        c.flat.step.achieved(),
        c.flat.lost,
        c.flat.step.achieved() / r.flat.step.achieved()
    );
    let one = |o: &Outcome| {
        format!(
            "p50 {:.2} ms, p99 {:.2} ms, max {:.2} ms, lost {}, refused {}",
            o.step.ms(0.5),
            o.step.ms(0.99),
            o.step.hist.max() as f64 / 1000.0,
            o.lost,
            o.refused
        )
    };
    if let Some(r1) = r.ours.iter().find(|o| o.step_rate() == 1_000.0) {
        println!("push -> poke at 1000/s: R1 {}", one(r1));
    }
    println!("push -> poke at 1000/s: R{n} {}", one(&c.steady));
    let k = &c.leader_kill;
    if let Some(o) = &k.outage {
        println!(
            "SIGKILL of the PUSHBUS_PUSHES leader ({}) at {}/s: new leader {}; {} of the pushes due after the kill refused; hook-ingest accepting again {}{:.2} s after the kill; slowest answer {:.2} s",
            o.old_leader,
            plan.restart_rate,
            o.new_leader.as_deref().unwrap_or("none seen"),
            o.refused,
            if o.recovered {
                ""
            } else {
                "NOT by the end of the run, >= "
            },
            o.window.as_secs_f64(),
            o.slowest.as_secs_f64()
        );
    }
    println!(
        "  over the whole kill run ({} pushes): {}, superseded {}",
        k.sent,
        one(k),
        k.superseded
    );
}

impl Outcome {
    fn new(step: Step, sent: u64, accepted: u64, refused: u64) -> Outcome {
        Outcome {
            lost: accepted as i64 - step.received as i64,
            superseded: 0,
            outage: None,
            sent,
            refused,
            step,
        }
    }

    fn step_rate(&self) -> f64 {
        self.step.rate()
    }
}
