//! `pushbus-bench`: benchmarks that print our figures next to a baseline
//! measured in the same run. Not part of the shipped `pushbus` binary.

use clap::{Parser, Subcommand};
use pushbus_bench::{filter, heads, ingest, pipeline};

#[derive(Parser)]
#[command(
    name = "pushbus-bench",
    version,
    about = "pushbus benchmarks, each against a baseline from the same run"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// hook-ingest request -> durable ack, against raw JetStream publishes.
    Ingest(ingest::BenchArgs),
    /// The agent registry at 100,000 agents: load time, memory, matches/s,
    /// against a naive linear scan.
    Filter(filter::FilterBenchArgs),
    /// Push-to-poke latency and throughput through the whole stack (each
    /// service its own `pushbus` process) with connected agents, open loop,
    /// against the raw JetStream ceilings and Redis pub/sub, plus loss on
    /// subscriber restart.
    Pipeline(pipeline::PipelineArgs),
    /// The notifier's ref heads in memory: resident memory per head and
    /// per agent, loaded from a real bucket, against the process before.
    Heads(heads::HeadsBenchArgs),
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    let cli = Cli::parse();
    // Benchmarks print their own figures; the log shows warnings only.
    pushbus_shared::telemetry::init_with_default("pushbus-bench", false, "warn");
    match cli.command {
        Command::Ingest(args) => ingest::ingest(args).await,
        Command::Filter(args) => filter::filter(args).await,
        Command::Pipeline(args) => pipeline::pipeline(args).await,
        Command::Heads(args) => heads::heads(args).await,
    }
}
