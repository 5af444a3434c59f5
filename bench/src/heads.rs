//! `pushbus-bench heads`: what the notifier's in-memory index of ref heads
//! costs. N heads spread over A agents are written to a real
//! `pushbus-ref-heads` bucket, then loaded exactly as a notifier replica
//! loads them on start (`heads::load`); the process's resident memory
//! before the load is the baseline, after it the figure, so the difference
//! is what the heads add (per head and per agent).

use std::time::Instant;

use prost::Message;
use pushbus_gitops_notifier::heads;
use pushbus_shared::names;
use pushbus_shared::proto::{AgentPoke, ChangeKind, RefHead, RefKind};

use super::{AckWindow, rss_bytes};

#[derive(clap::Args)]
pub struct HeadsBenchArgs {
    /// Heads in the bucket.
    #[arg(long, default_value_t = 100_000)]
    heads: u64,
    /// Agents they are spread over (each gets heads / agents refs).
    #[arg(long, default_value_t = 1_000)]
    agents: u64,
}

pub async fn heads(args: HeadsBenchArgs) -> anyhow::Result<()> {
    let agents = args.agents.clamp(1, args.heads.max(1));
    let nats = super::Nats::start();
    let client = async_nats::connect(nats.url()).await?;
    let js = async_nats::jetstream::new(client);
    let kv = js
        .create_key_value(pushbus_shared::topology::ref_heads_bucket())
        .await?;

    let t0 = Instant::now();
    let mut window = AckWindow::new(1_000);
    for n in 0..args.heads {
        let agent = n % agents;
        let head = RefHead {
            poke: Some(AgentPoke {
                agent_id: format!("agent-{agent}"),
                project_id: 1_000 + (n / agents) as i64 % 50,
                project_path: format!("group/project-{}", (n / agents) % 50),
                // Per-pipeline and merge-request refs: what piles up.
                r#ref: format!("refs/pipelines/{n}"),
                ref_kind: RefKind::Other as i32,
                change_kind: ChangeKind::Update as i32,
                old_sha: format!("{:040x}", n),
                new_sha: format!("{:040x}", n + 1),
                push_sequence: n + 1,
                push_epoch: 1,
                ..Default::default()
            }),
            event_id: format!("{n:032x}"),
            correlation_id: format!("{n:032x}"),
            trace: None,
            ..Default::default()
        };
        let subject = format!(
            "$KV.{}.{}",
            names::BUCKET_REF_HEADS,
            pushbus_shared::heads::head_key(head.poke.as_ref().expect("set above"))
        );
        window
            .push(js.publish(subject, head.encode_to_vec().into()).await?)
            .await?;
    }
    window.finish().await?;
    let written = t0.elapsed();

    let before = rss_bytes();
    let t1 = Instant::now();
    let (index, _) = heads::load(&kv).await?;
    let loaded = t1.elapsed();
    let after = rss_bytes();
    anyhow::ensure!(
        index.len() as u64 == args.heads,
        "loaded {} heads of {}",
        index.len(),
        args.heads
    );
    // What the allocator kept of the load's transient buffers.
    // SAFETY: malloc_trim only returns free memory to the OS.
    #[allow(unsafe_code)]
    unsafe {
        libc::malloc_trim(0);
    }
    let trimmed = rss_bytes();

    let mb = |b: u64| b as f64 / 1e6;
    let added = after.saturating_sub(before);
    let kept = trimmed.saturating_sub(before);
    println!(
        "ref heads: {} heads over {} agents ({} per agent)",
        args.heads,
        agents,
        args.heads / agents
    );
    println!(
        "  written in {:.2} s ({:.0}/s); loaded in {:.2} s ({:.0} heads/s)",
        written.as_secs_f64(),
        args.heads as f64 / written.as_secs_f64(),
        loaded.as_secs_f64(),
        args.heads as f64 / loaded.as_secs_f64()
    );
    println!(
        "  baseline (process before the load): {:.1} MB; after the load: {:.1} MB (+{:.1} MB); after malloc_trim: {:.1} MB (+{:.1} MB)",
        mb(before),
        mb(after),
        mb(added),
        mb(trimmed),
        mb(kept)
    );
    println!(
        "  per head: {:.0} B as loaded, {:.0} B kept ({:.2}x the baseline process per 100,000 heads)",
        added as f64 / args.heads as f64,
        kept as f64 / args.heads as f64,
        (kept as f64 / args.heads as f64 * 100_000.0) / before.max(1) as f64
    );
    drop(index);
    Ok(())
}
