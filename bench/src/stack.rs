//! The pushbus stack for benchmarks: each service in a child process of its
//! own (`pushbus run <service>`), so its resident memory can be read apart
//! from the others' and from the load generator's, and so one can be killed
//! with SIGKILL and started again.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::Context;

use super::free_port;

pub const SERVICES: [&str; 3] = ["hook-ingest", "filter", "gitops-notifier"];

/// Ack wait of filter's durable consumer in the bench. The service default
/// is 30 s; a SIGKILLed filter's un-acked pushes come back after this, and
/// the restart run should not sit 30 s waiting for them.
pub const FILTER_ACK_WAIT_SECS: u64 = 5;

pub struct Stack {
    pub nats_url: String,
    /// `--replicas` of every service (the cluster's size, or 1).
    pub replicas: u8,
    pub ingest: SocketAddr,
    pub notifier: SocketAddr,
    logs: PathBuf,
    children: Vec<Service>,
}

struct Service {
    name: &'static str,
    ops: SocketAddr,
    child: tokio::process::Child,
}

fn local() -> anyhow::Result<SocketAddr> {
    Ok(SocketAddr::from(([127, 0, 0, 1], free_port())))
}

impl Stack {
    /// Starts hook-ingest, filter and gitops-notifier against `nats_url` and
    /// waits until each says ready. Service logs go to files in `logs`.
    /// `nats_url` may list several servers (comma-separated).
    pub async fn start(nats_url: &str, replicas: u8, logs: PathBuf) -> anyhow::Result<Stack> {
        std::fs::create_dir_all(&logs)?;
        let mut stack = Stack {
            nats_url: nats_url.to_owned(),
            replicas,
            ingest: local()?,
            notifier: local()?,
            logs,
            children: Vec::new(),
        };
        for name in SERVICES {
            let svc = stack.spawn(name, local()?).await?;
            stack.children.push(svc);
        }
        Ok(stack)
    }

    async fn spawn(&self, name: &'static str, ops: SocketAddr) -> anyhow::Result<Service> {
        let exe = super::pushbus_bin()?;
        let mut cmd = tokio::process::Command::new(exe);
        cmd.arg("run")
            .arg(name)
            .arg("--ops-listen")
            .arg(ops.to_string())
            .env("PUSHBUS_NATS_URL", &self.nats_url)
            .env("PUSHBUS_REPLICAS", self.replicas.to_string())
            .kill_on_drop(true)
            .stdin(std::process::Stdio::null());
        match name {
            "hook-ingest" => cmd.arg("--ingest-listen").arg(self.ingest.to_string()),
            "gitops-notifier" => cmd.arg("--notifier-listen").arg(self.notifier.to_string()),
            _ => cmd
                .arg("--filter-ack-wait-secs")
                .arg(FILTER_ACK_WAIT_SECS.to_string()),
        };
        // At the services' default level (info) unless RUST_LOG says
        // otherwise: the bench measures what a deployment runs.
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.logs.join(format!("{name}.log")))?;
        // The services log to stdout; both streams go to the log file, so a
        // stall or an error during a run can be read afterwards.
        cmd.stdout(log.try_clone()?);
        cmd.stderr(log);
        let mut child = cmd.spawn().with_context(|| format!("starting {name}"))?;
        let ready = format!("http://{ops}/readyz");
        let http = reqwest::Client::new();
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            if http
                .get(&ready)
                .send()
                .await
                .is_ok_and(|r| r.status().is_success())
            {
                break;
            }
            if let Some(status) = child.try_wait()? {
                anyhow::bail!(
                    "{name} exited with {status}; see {}",
                    self.logs.join(format!("{name}.log")).display()
                );
            }
            anyhow::ensure!(Instant::now() < deadline, "{name} not ready within 30 s");
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        Ok(Service { name, ops, child })
    }

    /// `pushbus setup` against `nats_url`: every stream, bucket and consumer
    /// at `replicas`, waiting until each replica is current.
    pub async fn setup(nats_url: &str, replicas: u8) -> anyhow::Result<()> {
        let status = tokio::process::Command::new(super::pushbus_bin()?)
            .arg("setup")
            .env("PUSHBUS_NATS_URL", nats_url)
            .env("PUSHBUS_REPLICAS", replicas.to_string())
            .env("RUST_LOG", "warn")
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .status()
            .await
            .context("running pushbus setup")?;
        anyhow::ensure!(status.success(), "pushbus setup exited with {status}");
        Ok(())
    }

    /// VmRSS of each service process, in bytes.
    pub fn rss(&self) -> Vec<(&'static str, u64)> {
        self.children
            .iter()
            .map(|s| {
                let pid = s.child.id().map(|p| p.to_string()).unwrap_or_default();
                (s.name, super::rss_of(&pid))
            })
            .collect()
    }

    /// Each service's name and process ID.
    pub fn pids(&self) -> Vec<(&'static str, u32)> {
        self.children
            .iter()
            .filter_map(|s| Some((s.name, s.child.id()?)))
            .collect()
    }

    /// SIGKILLs `name` (no graceful anything: un-acked messages stay with
    /// the server) and starts a fresh process on the same ports.
    pub async fn kill_and_restart(&mut self, name: &str) -> anyhow::Result<Duration> {
        let i = self
            .children
            .iter()
            .position(|s| s.name == name)
            .context("no such service")?;
        let old = self.children.remove(i);
        let (name, ops) = (old.name, old.ops);
        let mut child = old.child;
        child.start_kill()?;
        child.wait().await?;
        let started = Instant::now();
        let svc = self.spawn(name, ops).await?;
        self.children.insert(i, svc);
        Ok(started.elapsed())
    }

    /// SIGTERM to every service, then wait (SIGKILL on drop if one hangs).
    pub async fn stop(mut self) {
        for s in &self.children {
            if let Some(pid) = s.child.id() {
                let _ = pushbus_shared::process::signal(pid, pushbus_shared::process::SIGTERM);
            }
        }
        for s in &mut self.children {
            let _ = tokio::time::timeout(Duration::from_secs(10), s.child.wait()).await;
        }
    }
}
