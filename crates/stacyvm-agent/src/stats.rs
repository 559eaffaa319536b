//! `GET /v1/stats`: resource usage of the sandbox, best effort.
//!
//! Reads cgroup v2, else cgroup v1, else falls back to `/proc`. Nothing here
//! ever fails: unknown values are 0.

use stacyvm_agent_proto::Stats;
use std::fs;
use std::time::{Duration, Instant};

const CG: &str = "/sys/fs/cgroup";
/// Distance between the two CPU samples.
const SAMPLE: Duration = Duration::from_millis(100);

fn read_u64(path: &str) -> Option<u64> {
    fs::read_to_string(path).ok()?.trim().parse().ok()
}

/// A `key value` line from a flat keyed file such as `cpu.stat` or `meminfo`.
pub fn keyed(text: &str, key: &str) -> Option<u64> {
    text.lines().find_map(|l| {
        let mut it = l.split_whitespace();
        let k = it.next()?;
        (k.trim_end_matches(':') == key).then(|| it.next()?.parse().ok())?
    })
}

/// Which accounting the machine offers.
#[derive(Clone, Copy, Debug, PartialEq)]
enum Source {
    V2,
    V1,
    Proc,
}

fn source() -> Source {
    if fs::metadata(format!("{CG}/memory.current")).is_ok() {
        Source::V2
    } else if fs::metadata(format!("{CG}/memory/memory.usage_in_bytes")).is_ok() {
        Source::V1
    } else {
        Source::Proc
    }
}

/// Cumulative CPU time in nanoseconds (for `/proc`: all CPUs of the machine).
fn cpu_ns(src: Source) -> Option<u64> {
    match src {
        Source::V2 => {
            let text = fs::read_to_string(format!("{CG}/cpu.stat")).ok()?;
            keyed(&text, "usage_usec").map(|us| us * 1000)
        }
        Source::V1 => read_u64(&format!("{CG}/cpuacct/cpuacct.usage"))
            .or_else(|| read_u64(&format!("{CG}/cpu,cpuacct/cpuacct.usage"))),
        Source::Proc => {
            let text = fs::read_to_string("/proc/stat").ok()?;
            let line = text.lines().find(|l| l.starts_with("cpu "))?;
            let v: Vec<u64> = line
                .split_whitespace()
                .skip(1)
                .filter_map(|x| x.parse().ok())
                .collect();
            // user nice system idle iowait irq softirq steal: busy = all but idle+iowait.
            let busy: u64 = v
                .iter()
                .take(8)
                .enumerate()
                .filter(|(i, _)| *i != 3 && *i != 4)
                .map(|(_, x)| x)
                .sum();
            // SAFETY: sysconf has no preconditions.
            let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
            let hz = if hz > 0 { hz as u64 } else { 100 };
            Some(busy * (1_000_000_000 / hz))
        }
    }
}

fn meminfo() -> (u64, u64) {
    let text = fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let total = keyed(&text, "MemTotal").unwrap_or(0) * 1024;
    let avail = keyed(&text, "MemAvailable").unwrap_or(0) * 1024;
    (total.saturating_sub(avail), total)
}

/// (usage, limit) in bytes. A missing or unlimited limit is the machine's RAM.
fn memory(src: Source) -> (u64, u64) {
    let (proc_used, total) = meminfo();
    let (used, limit) = match src {
        Source::V2 => (
            read_u64(&format!("{CG}/memory.current")),
            read_u64(&format!("{CG}/memory.max")),
        ),
        Source::V1 => (
            read_u64(&format!("{CG}/memory/memory.usage_in_bytes")),
            read_u64(&format!("{CG}/memory/memory.limit_in_bytes")),
        ),
        Source::Proc => (None, None),
    };
    let limit = match limit {
        // v1 reports "unlimited" as a huge page-aligned number.
        Some(l) if l > 0 && (total == 0 || l < total) => l,
        _ => total,
    };
    (used.unwrap_or(proc_used), limit)
}

fn count_pids() -> u64 {
    fs::read_dir("/proc")
        .map(|rd| {
            rd.flatten()
                .filter(|e| {
                    e.file_name()
                        .to_str()
                        .is_some_and(|s| s.bytes().all(|b| b.is_ascii_digit()))
                })
                .count() as u64
        })
        .unwrap_or(0)
}

fn pids(src: Source) -> u64 {
    let v = match src {
        Source::V2 => read_u64(&format!("{CG}/pids.current")),
        Source::V1 => read_u64(&format!("{CG}/pids/pids.current")),
        Source::Proc => None,
    };
    v.unwrap_or_else(count_pids)
}

/// Sample the sandbox's usage; takes about 100 ms for the CPU measurement.
pub async fn collect() -> Stats {
    let src = source();
    let t0 = Instant::now();
    let c0 = cpu_ns(src);
    tokio::time::sleep(SAMPLE).await;
    let c1 = cpu_ns(src);
    let wall = t0.elapsed().as_nanos() as f64;
    let cpu_pct = match (c0, c1) {
        (Some(a), Some(b)) if wall > 0.0 && b >= a => (b - a) as f64 / wall * 100.0,
        _ => 0.0,
    };
    let (mem_bytes, mem_limit_bytes) = memory(src);
    Stats {
        cpu_pct: (cpu_pct * 100.0).round() / 100.0,
        mem_bytes,
        mem_limit_bytes,
        pids: pids(src),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keyed_files() {
        let cpu = "usage_usec 1234\nuser_usec 1000\nsystem_usec 234\n";
        assert_eq!(keyed(cpu, "usage_usec"), Some(1234));
        assert_eq!(keyed(cpu, "nope"), None);
        let mem = "MemTotal:       16314344 kB\nMemAvailable:   12000000 kB\n";
        assert_eq!(keyed(mem, "MemTotal"), Some(16314344));
        assert_eq!(keyed(mem, "MemAvailable"), Some(12000000));
    }

    #[test]
    fn sources_are_readable() {
        // Whatever this machine offers, the readers must not fail.
        let src = source();
        let (_, limit) = memory(src);
        assert!(limit > 0);
        assert!(pids(src) > 0);
    }
}
