//! `pushbus hook …`: the commands a bare repository runs. They talk to
//! hook-ingest, never to NATS.

use clap::Subcommand;
use pushbus_hook_ingest::hook::{self, HookArgs};
use pushbus_shared::error::one_line;

#[derive(Subcommand)]
pub enum HookCommand {
    /// Forward git's post-receive input to hook-ingest; prints the messages
    /// for the pusher on stderr. Always exits 0: a push is never failed.
    PostReceive(HookArgs),
    /// Replay notifications spooled while hook-ingest was unreachable.
    Flush(HookArgs),
}

pub async fn run(command: HookCommand) -> anyhow::Result<()> {
    match command {
        HookCommand::PostReceive(args) => {
            post_receive(args).await;
            Ok(())
        }
        HookCommand::Flush(args) => flush(args).await,
    }
}

async fn post_receive(args: HookArgs) {
    use tokio::io::AsyncReadExt;
    let mut stdin = String::new();
    if let Err(err) = tokio::io::stdin().read_to_string(&mut stdin).await {
        eprintln!("pushbus: cannot read the hook's input: {err}");
        return;
    }
    let env = std::env::vars().collect();
    let outcome = hook::post_receive(&args, &stdin, &env).await;
    for line in outcome.lines {
        eprintln!("{line}");
    }
}

async fn flush(args: HookArgs) -> anyhow::Result<()> {
    let env = std::env::vars().collect();
    let report = hook::flush(&args, &env).await?;
    for line in &report.lines {
        eprintln!("{line}");
    }
    eprintln!(
        "pushbus: {} spooled notification(s) delivered, {} left, {} expired",
        report.delivered, report.left, report.expired
    );
    if report.left > 0 {
        if let Some(why) = &report.stopped {
            // With its causes: "connection refused" hides in a source.
            eprintln!("pushbus: stopped: {}", one_line(why));
        }
        anyhow::bail!("hook-ingest still unreachable");
    }
    Ok(())
}
