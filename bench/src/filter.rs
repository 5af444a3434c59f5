//! `pushbus-bench filter`: the agent registry at scale. Writes N agents × W
//! watches to a real `pushbus-agents` bucket, loads them the way filter does
//! on start-up, and matches a realistic push mix on one core, next to a
//! naive linear scan over the same watches measured in the same run.

use std::time::{Duration, Instant};

use anyhow::Context;
use prost::Message;
use pushbus_filter::index::{Index, Match, matches_by_scan};
use pushbus_shared::proto::{
    AgentConfig, GitPushEvent, RefChange, RefKind, RefSelector, RepositoryKind, Watch, WatchKind,
    ref_selector::Kind,
};
use pushbus_shared::topology;

use super::rss_bytes;

#[derive(clap::Args)]
pub struct FilterBenchArgs {
    /// Registered agents.
    #[arg(long, default_value_t = 100_000)]
    agents: usize,
    /// Watches per agent.
    #[arg(long, default_value_t = 10)]
    watches: usize,
    /// Seconds spent matching with the index.
    #[arg(long, default_value_t = 3.0)]
    seconds: f64,
    /// Pushes matched by the naive scan (it is slow by design).
    #[arg(long, default_value_t = 300)]
    scan_pushes: usize,
    /// 10,000 agents and a one-second run.
    #[arg(long)]
    quick: bool,
}

/// Projects holding manifests: most watches point into this pool.
const POOL: i64 = 200_000;
/// Pushes land anywhere in this range; most projects are watched by nobody.
const ALL_PROJECTS: i64 = 2_000_000;
/// A few platform-wide projects that hundreds of agents each watch.
const POPULAR_BASE: i64 = 3_000_000;
const POPULAR: u64 = 20;
/// Agents' own configuration projects, one per ten agents.
const CONFIG_BASE: i64 = 4_000_000;

/// splitmix64: a deterministic mix, so every run benchmarks the same data.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }

    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }

    fn percent(&mut self) -> u64 {
        self.below(100)
    }
}

fn project_path(id: i64) -> String {
    format!("group-{}/project-{id}", id % 1000)
}

fn selector(kind: Kind, pattern: &str) -> Option<RefSelector> {
    Some(RefSelector {
        kind: kind as i32,
        pattern: pattern.into(),
    })
}

fn agent(i: usize, watches: usize, rng: &mut Rng) -> AgentConfig {
    let agent_id = format!("agent-{i}");
    let mut out = vec![Watch {
        project_id: CONFIG_BASE + (i / 10) as i64,
        refs: selector(Kind::Branch, "main"),
        kind: WatchKind::Configuration as i32,
        ..Default::default()
    }];
    while out.len() < watches {
        let popular = out.len() == 1 && rng.percent() < 10;
        let id = if popular {
            POPULAR_BASE + rng.below(POPULAR) as i64
        } else {
            1 + rng.below(POOL as u64) as i64
        };
        let (project_id, project_path) = if rng.percent() < 20 {
            (0, project_path(id))
        } else {
            (id, String::new())
        };
        let refs = match rng.percent() {
            0..60 => selector(Kind::Branch, "main"),
            60..75 => selector(Kind::AnyBranch, ""),
            75..85 => selector(Kind::BranchGlob, "release/*"),
            85..95 => selector(Kind::TagGlob, "v*"),
            _ => selector(Kind::Tag, "v1.0.0"),
        };
        let paths = match rng.percent() {
            // One directory per agent: no two agents share this glob.
            0..50 => vec![format!("clusters/agent-{i}/**")],
            50..60 => vec!["deploy/*.yaml".into(), "charts/**".into()],
            _ => Vec::new(),
        };
        out.push(Watch {
            project_id,
            project_path,
            refs,
            paths,
            kind: WatchKind::Gitops as i32,
        });
    }
    AgentConfig {
        agent_id,
        watches: out,
        ..Default::default()
    }
}

/// Most pushes go to projects nobody watches, some to a watched project
/// (a few matches), 1% to a platform-wide one (hundreds).
fn push(rng: &mut Rng, agents: usize) -> GitPushEvent {
    let project_id = match rng.percent() {
        0..85 => 1 + rng.below(ALL_PROJECTS as u64) as i64,
        85..99 => 1 + rng.below(POOL as u64) as i64,
        _ => POPULAR_BASE + rng.below(POPULAR) as i64,
    };
    let (r, kind) = match rng.percent() {
        0..80 => ("refs/heads/main".to_owned(), RefKind::Branch),
        80..88 => (
            format!("refs/heads/feature-{}", rng.below(50)),
            RefKind::Branch,
        ),
        88..94 => ("refs/heads/release/1.2".to_owned(), RefKind::Branch),
        _ => (format!("refs/tags/v1.{}", rng.below(20)), RefKind::Tag),
    };
    let paths_known = rng.percent() < 80;
    let changed_paths = if paths_known {
        (0..1 + rng.below(3))
            .map(|_| match rng.percent() {
                0..40 => format!("clusters/agent-{}/app.yaml", rng.below(agents as u64)),
                40..60 => "deploy/service.yaml".to_owned(),
                60..80 => "src/lib.rs".to_owned(),
                _ => "README.md".to_owned(),
            })
            .collect()
    } else {
        Vec::new()
    };
    GitPushEvent {
        project_id,
        project_path: project_path(project_id),
        repository_kind: RepositoryKind::Project as i32,
        changes: vec![RefChange {
            r#ref: r,
            ref_kind: kind as i32,
            old_sha: "1".repeat(40),
            new_sha: "2".repeat(40),
            changed_paths,
            paths_known,
            ..Default::default()
        }],
        ..Default::default()
    }
}

/// Matches `pushes` round-robin for at least `seconds` on this thread;
/// returns (pushes matched, pokes, elapsed).
fn time_matching(
    pushes: &[GitPushEvent],
    seconds: f64,
    matcher: impl Fn(&GitPushEvent) -> Vec<Match>,
) -> (usize, usize, Duration) {
    let started = Instant::now();
    let (mut done, mut pokes) = (0, 0);
    loop {
        for p in pushes {
            pokes += std::hint::black_box(matcher(p)).len();
        }
        done += pushes.len();
        if started.elapsed().as_secs_f64() >= seconds {
            return (done, pokes, started.elapsed());
        }
    }
}

fn sorted(m: Vec<Match>) -> Vec<(String, usize)> {
    let mut out: Vec<_> = m
        .into_iter()
        .map(|m| (m.agent_id.to_string(), m.change))
        .collect();
    out.sort();
    out
}

pub async fn filter(args: FilterBenchArgs) -> anyhow::Result<()> {
    let agents = if args.quick { 10_000 } else { args.agents };
    let seconds = if args.quick { 1.0 } else { args.seconds };
    let nats = super::Nats::start();
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_key_value(topology::agents_bucket())
        .await
        .context("creating the agents bucket")?;

    // Fill the bucket with pipelined KV puts (publishes to $KV.<bucket>.<key>).
    let mut rng = Rng(42);
    let started = Instant::now();
    let mut acks = super::AckWindow::new(4096);
    for i in 0..agents {
        let cfg = agent(i, args.watches, &mut rng);
        let subject = format!(
            "$KV.{}.{}",
            pushbus_shared::names::BUCKET_AGENTS,
            cfg.agent_id
        );
        acks.push(js.publish(subject, cfg.encode_to_vec().into()).await?)
            .await?;
    }
    acks.finish().await?;
    let write_time = started.elapsed();

    let rss_before = rss_bytes();
    let started = Instant::now();
    let index: Index = pushbus_filter::registry::snapshot(&kv)
        .await
        .map_err(|e| anyhow::anyhow!("loading the registry: {e}"))?;
    let load_time = started.elapsed();
    let rss_after = rss_bytes();
    anyhow::ensure!(
        index.agent_count() == agents,
        "loaded {} of {agents} agents",
        index.agent_count()
    );
    let watches = index.watch_count();

    let mut rng = Rng(7);
    let pushes: Vec<GitPushEvent> = (0..20_000).map(|_| push(&mut rng, agents)).collect();
    // Both matchers must agree before their speeds mean anything.
    let sample = &pushes[..args.scan_pushes.min(pushes.len())];
    for p in sample {
        anyhow::ensure!(
            sorted(index.matches(p)) == sorted(matches_by_scan(&index, p)),
            "index and scan disagree on a push to project {}",
            p.project_id
        );
    }
    let (n_idx, pokes_idx, t_idx) = time_matching(&pushes, seconds, |p| index.matches(p));
    let (n_scan, pokes_scan, t_scan) = time_matching(sample, 0.0, |p| matches_by_scan(&index, p));
    let rate = |n: usize, t: Duration| n as f64 / t.as_secs_f64();
    let (idx_rate, scan_rate) = (rate(n_idx, t_idx), rate(n_scan, t_scan));
    let mb = |b: u64| b as f64 / (1024.0 * 1024.0);

    println!(
        "filter benchmark: {agents} agents x {} watches = {watches} watches",
        args.watches
    );
    println!(
        "registry write (pipelined KV puts)   {:>8.2} s",
        write_time.as_secs_f64()
    );
    println!(
        "registry load (as on start-up)       {:>8.2} s",
        load_time.as_secs_f64()
    );
    println!(
        "resident memory                      {:>8.1} MB total, {:.1} MB added by the load",
        mb(rss_after),
        mb(rss_after.saturating_sub(rss_before))
    );
    println!(
        "index matching, one core             {:>10.0} pushes/s ({:.2} pokes per push)",
        idx_rate,
        pokes_idx as f64 / n_idx as f64
    );
    println!(
        "naive linear scan, one core          {:>10.1} pushes/s ({:.2} pokes per push)",
        scan_rate,
        pokes_scan as f64 / n_scan.max(1) as f64
    );
    println!(
        "ratio: index {:.0}x the naive scan (same {} pushes cross-checked equal)",
        idx_rate / scan_rate,
        sample.len()
    );
    Ok(())
}
