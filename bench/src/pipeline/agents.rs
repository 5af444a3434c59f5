//! The bench's agents: registered in pushbus-agents, connected over gRPC
//! Watch, counting the pokes that reach them.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use async_nats::jetstream;
use prost::Message;
use pushbus_shared::proto::git_ops_notifier_client::GitOpsNotifierClient;
use pushbus_shared::proto::{
    AgentConfig, RefSelector, Watch, WatchKind, WatchRequest, ref_selector::Kind,
    watch_event::Event,
};
use pushbus_shared::{names, topology};
use tokio_util::sync::CancellationToken;

use crate::Recorder;

pub(super) fn agent_id(a: u64) -> String {
    format!("bench-{a}")
}

/// Agent `a` watches project `PROJECT_BASE + a`, any branch.
pub(super) const PROJECT_BASE: u64 = 100_000;

/// Writes `n` agents to KV pushbus-agents with pipelined puts (what
/// `put_agent` does, without a round trip per agent). No token hash: the
/// notifier lets them in without one.
pub(super) async fn register_agents(
    js: &jetstream::Context,
    n: u64,
    replicas: u8,
) -> anyhow::Result<()> {
    let mut bucket = topology::agents_bucket();
    bucket.num_replicas = usize::from(replicas);
    js.create_or_update_key_value(bucket)
        .await
        .context("creating the agents bucket")?;
    let mut acks = crate::AckWindow::new(2048);
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
pub(super) fn sha_of(seq: u64) -> String {
    format!("b{seq:039x}")
}

pub(super) fn seq_of(sha: &str) -> Option<u64> {
    u64::from_str_radix(sha.get(1..)?, 16).ok()
}

/// Agents connected over gRPC Watch, sharing a few HTTP/2 connections.
pub struct Agents {
    pub(super) n: u64,
    pub(super) live: Arc<AtomicUsize>,
    pub(super) stop: CancellationToken,
    pub(super) tasks: tokio::task::JoinSet<()>,
}

/// Watch streams per HTTP/2 connection: under the server's default limit
/// of concurrent streams (hyper: 200).
pub(super) const STREAMS_PER_CONNECTION: u64 = 100;

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
pub(super) async fn agent(
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
