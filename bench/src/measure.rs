//! What a process costs, read from `/proc`: resident memory and CPU time,
//! and CPU per process over a stretch of a run.

use std::time::Duration;

/// Resident set size of this process, in bytes (Linux).
pub fn rss_bytes() -> u64 {
    rss_of("self")
}

/// Resident set size of process `pid` ("self" or a number), in bytes; 0 if
/// it cannot be read (the process is gone).
pub fn rss_of(pid: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("VmRSS:"))
                .and_then(|l| l.split_whitespace().nth(1))
                .and_then(|kb| kb.parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// CPU time (user + system) a process has used so far, from
/// `/proc/<pid>/stat`; zero when it cannot be read.
pub fn cpu_of(pid: u32) -> Duration {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return Duration::ZERO;
    };
    // Fields after the command name (which may hold spaces) in parentheses:
    // utime and stime are the 12th and 13th.
    let ticks: u64 = stat
        .rsplit_once(')')
        .map(|(_, rest)| {
            rest.split_whitespace()
                .skip(11)
                .take(2)
                .filter_map(|t| t.parse::<u64>().ok())
                .sum()
        })
        .unwrap_or(0);
    // USER_HZ is 100 on every Linux this runs on.
    Duration::from_millis(ticks * 10)
}

/// CPU used by named processes between two readings.
pub struct CpuMeter {
    pids: Vec<(&'static str, u32)>,
    start: Vec<Duration>,
}

impl CpuMeter {
    pub fn start(pids: Vec<(&'static str, u32)>) -> CpuMeter {
        let start = pids.iter().map(|(_, p)| cpu_of(*p)).collect();
        CpuMeter { pids, start }
    }

    /// Each process's CPU since `start`, over `wall` (the stretch the
    /// events took).
    pub fn read(&self, wall: Duration) -> CpuUse {
        let used = self
            .pids
            .iter()
            .zip(&self.start)
            .map(|((name, pid), s)| (*name, cpu_of(*pid).saturating_sub(*s)))
            .collect();
        CpuUse { used, wall }
    }
}

/// CPU per process over a stretch of wall time.
#[derive(Clone, Debug, Default)]
pub struct CpuUse {
    pub used: Vec<(&'static str, Duration)>,
    pub wall: Duration,
}

impl CpuUse {
    /// CPU-milliseconds per `per` events of the processes named in `names`.
    pub fn ms_of(&self, names: &[&str], events: u64, per: u64) -> f64 {
        let used: Duration = self
            .used
            .iter()
            .filter(|(name, _)| names.contains(name))
            .map(|(_, d)| *d)
            .sum();
        used.as_secs_f64() * 1e3 * per as f64 / events.max(1) as f64
    }

    /// `name 12.3 ms (31%)` per process: CPU-milliseconds per `per` events
    /// and share of the total, then the total in cores.
    pub fn line(&self, events: u64, per: u64) -> String {
        let total: Duration = self.used.iter().map(|(_, d)| *d).sum();
        let scale = per as f64 / events.max(1) as f64;
        let mut parts: Vec<String> = self
            .used
            .iter()
            .map(|(name, d)| {
                format!(
                    "{name} {:.0} ms ({:.0}%)",
                    d.as_secs_f64() * 1e3 * scale,
                    100.0 * d.as_secs_f64() / total.as_secs_f64().max(1e-9)
                )
            })
            .collect();
        parts.push(format!(
            "total {:.0} ms, {:.2} cores busy",
            total.as_secs_f64() * 1e3 * scale,
            total.as_secs_f64() / self.wall.as_secs_f64().max(1e-9)
        ));
        parts.join(", ")
    }
}
