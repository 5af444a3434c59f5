//! What a run prints: each side's figures and the ratios between them.

use std::time::Duration;

use crate::Step;

use super::*;

pub struct Report<'a> {
    pub(super) rss_idle: Vec<(&'static str, u64)>,
    pub(super) rss_connected: Vec<(&'static str, u64)>,
    pub(super) rss_after: Vec<(&'static str, u64)>,
    pub(super) connect_time: Duration,
    pub(super) ours: &'a [Outcome],
    pub(super) flat: &'a Outcome,
    pub(super) flat_cpu: &'a crate::CpuUse,
    pub(super) restarts: &'a [(&'static str, Outcome, u64, u64)],
    pub(super) ceiling: Option<&'a crate::ceiling::Ceiling>,
    pub(super) redis: Option<&'a crate::redis::Baseline>,
    pub(super) push_size: usize,
    pub(super) poke_size: usize,
    pub(super) clustered: Option<&'a Clustered>,
}

pub(super) fn mb(b: u64) -> f64 {
    b as f64 / (1024.0 * 1024.0)
}

pub(super) fn report(plan: &Plan, r: &Report<'_>) {
    println!();
    println!(
        "== pushbus pipeline: hook-ingest -> filter -> gitops-notifier, {} gRPC agents ({} per HTTP/2 connection) ==",
        plan.agents, STREAMS_PER_CONNECTION
    );
    println!(
        "stored sizes: push {} B, poke (ref head) {} B (ceiling and Redis use the same)",
        r.push_size, r.poke_size
    );
    println!(
        "{:<34} {:>9} {:>10}   latency from scheduled send to poke at the agent (ms)",
        "side / offered", "offered", "achieved"
    );
    for o in r.ours {
        println!("{}", o.step.line("pushbus", o.lost));
        if o.refused() > 0 || o.step.duplicates > 0 {
            println!(
                "    {} of {} pushes refused by hook-ingest, {} duplicate pokes",
                o.refused(),
                o.sent,
                o.step.duplicates
            );
        }
        o.print_refusals();
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
                && o.refused() == 0
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
        plan.flat_out,
        r.flat.lost,
        r.flat.refused()
    );
    r.flat.print_refusals();
    println!(
        "  CPU per 1000 pushes flat out: {}",
        r.flat_cpu.line(plan.flat_out, 1000)
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
            println!("    CPU per 1000 messages: {}", f.cpu.line(f.n, 1000));
        }
        if let Some(physical) = &c.physical {
            print_budget(physical.step.achieved(), r.flat_cpu, plan.flat_out);
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
            "  pushbus, SIGKILL {victim:<16} pushes {n}, refused {}, with a stored ref head (theirs or a newer one of the ref) {stored}, received by agents {}, superseded by a newer push of the ref {} -> lost at agents {}",
            o.refused(),
            o.step.received,
            o.superseded,
            o.lost
        );
        o.print_refusals();
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

/// What half the physical ceiling would allow per push on this machine's
/// cores, beside what the parts pushbus cannot make cheaper (the server and
/// the load generator) take of it today: the run states its own bound.
fn print_budget(physical: f64, flat: &crate::CpuUse, pushes: u64) {
    let cores = std::thread::available_parallelism().map_or(1, usize::from) as f64;
    let half = physical / 2.0;
    if half <= 0.0 {
        return;
    }
    let budget = cores * 1e6 / half;
    let fixed = flat.ms_of(&["nats-server", "load generator + agents"], pushes, 1000);
    let services = flat.ms_of(&["hook-ingest", "filter", "gitops-notifier"], pushes, 1000);
    println!(
        "  half the physical ceiling ({half:.0}/s on {cores:.0} cores) allows {budget:.0} ms of CPU per 1000 pushes: nats-server + load generator take {fixed:.0} ms today, the three services {services:.0} ms"
    );
}

pub(super) fn report_cluster(plan: &Plan, r: &Report<'_>, c: &Clustered) {
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
            o.refused()
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
    pub(super) fn new(step: Step, sent: u64, accepted: u64, refusals: &Refusals) -> Outcome {
        Outcome {
            lost: accepted as i64 - step.received as i64,
            superseded: 0,
            outage: None,
            sent,
            refusals: refusals.causes(),
            step,
        }
    }

    pub(super) fn refused(&self) -> u64 {
        self.refusals.iter().map(|(_, n)| n).sum()
    }

    fn print_refusals(&self) {
        for (cause, n) in &self.refusals {
            println!("      {n} answered {cause}");
        }
    }

    pub(super) fn step_rate(&self) -> f64 {
        self.step.rate()
    }
}
