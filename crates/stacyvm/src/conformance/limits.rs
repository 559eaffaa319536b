//! Limits: memory (a hog in a 128 MB sandbox is killed), processes (a fork
//! loop hits the cap), CPU (1 vCPU caps two busy processes). The sandbox
//! keeps answering after each. The programs are python3 (in the image).

use super::{snippet, Ctx};
use anyhow::{bail, Context, Result};
use serde_json::json;
use std::time::{Duration, Instant};

const HOG: &str = r#"
blocks = []
for i in range(1, 33):
    blocks.append(b"\x01" * (16 << 20))
    print(i * 16, flush=True)
print("survived", flush=True)
"#;

pub(super) async fn memory(c: &Ctx) -> Result<String> {
    let id = c.limited().await?;
    let out = c
        .exec(
            &id,
            json!({"command": "python3", "args": ["-c", HOG], "mode": "argv", "timeout": "60s"}),
        )
        .await?;
    let reached = out
        .stdout
        .lines()
        .filter_map(|l| l.trim().parse::<u64>().ok())
        .max()
        .unwrap_or(0);
    if out.stdout.contains("survived") || out.exit_code == 0 {
        bail!(
            "allocating 512 MiB in a 128 MB sandbox was not stopped ({})",
            out.describe()
        );
    }
    if out.stderr.contains("No such file") || out.exit_code == 127 {
        bail!("python3 is not in the image: {}", out.describe());
    }
    if reached > 256 {
        bail!(
            "the hog got {reached} MiB in a 128 MB sandbox before it stopped (exit {})",
            out.exit_code
        );
    }
    c.answers(&id).await?;
    Ok(format!(
        "hog stopped after {reached} MiB with exit {}; sandbox answers",
        out.exit_code
    ))
}

const FORKS: &str = r#"
import os, signal
pids, err = [], 0
try:
    for _ in range(2000):
        pid = os.fork()
        if pid == 0:
            try:
                os.execvp("sleep", ["sleep", "30"])
            finally:
                os._exit(0)
        pids.append(pid)
except OSError as e:
    err = e.errno
for p in pids:
    try:
        os.kill(p, signal.SIGKILL)
    except OSError:
        pass
for p in pids:
    try:
        os.waitpid(p, 0)
    except OSError:
        pass
print(len(pids), err)
"#;

pub(super) async fn pids(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .exec(
            &id,
            json!({"command": "python3", "args": ["-c", FORKS], "mode": "argv", "timeout": "45s"}),
        )
        .await?;
    let mut it = out.stdout.split_whitespace();
    let (Some(n), Some(err)) = (
        it.next().and_then(|s| s.parse::<u64>().ok()),
        it.next().and_then(|s| s.parse::<i64>().ok()),
    ) else {
        bail!("the fork loop did not report: {}", out.describe());
    };
    if err == 0 {
        bail!(
            "2000 processes were started although the limit is {}",
            c.pids_limit
        );
    }
    if n > c.pids_limit {
        bail!(
            "{n} processes were started before fork failed (errno {err}); the limit is {}",
            c.pids_limit
        );
    }
    c.answers(&id).await?;
    Ok(format!(
        "fork failed (errno {err}) after {n} processes (limit {}); sandbox answers",
        c.pids_limit
    ))
}

const BURN: &str = r#"
import os, resource, time
t0 = time.time()
end = t0 + 2.0
kids = []
for _ in range(2):
    pid = os.fork()
    if pid == 0:
        while time.time() < end:
            pass
        os._exit(0)
    kids.append(pid)
for p in kids:
    os.waitpid(p, 0)
wall = time.time() - t0
ru = resource.getrusage(resource.RUSAGE_CHILDREN)
print(ru.ru_utime + ru.ru_stime, wall)
"#;

/// Two busy processes (not threads: python's threads share one
/// interpreter lock) in a 1 vCPU sandbox get at most ~1.3 CPU-seconds per
/// wall second.
pub(super) async fn cpu(c: &Ctx) -> Result<String> {
    let id = c.limited().await?;
    let baseline =
        tokio::task::spawn_blocking(|| host_cpus_for_two_threads(Duration::from_secs(1)))
            .await
            .unwrap_or(0.0);
    let out = c
        .exec(
            &id,
            json!({"command": "python3", "args": ["-c", BURN], "mode": "argv", "timeout": "30s"}),
        )
        .await?;
    let nums: Vec<f64> = out
        .stdout
        .split_whitespace()
        .filter_map(|s| s.parse().ok())
        .collect();
    let [cpu, wall] = nums[..] else {
        bail!("the busy loop did not report: {}", out.describe());
    };
    if wall <= 0.0 || cpu <= 0.0 {
        bail!("implausible measurement: {}", snippet(&out.stdout));
    }
    let ratio = cpu / wall;
    if ratio > 1.3 {
        bail!("2 busy processes got {cpu:.2} CPU-s in {wall:.2}s ({ratio:.2} CPUs) with vcpus 1");
    }
    c.answers(&id).await.context("after the busy loop")?;
    let note = if baseline < 1.5 {
        " (the host is busy: below 1.5 CPUs for 2 threads, so this run cannot tell \
         the limit from contention)"
    } else {
        ""
    };
    Ok(format!(
        "2 busy processes got {ratio:.2} CPU-s per second with vcpus 1; \
         2 busy threads on the host: {baseline:.2}{note}"
    ))
}

/// CPUs two busy threads get on the host (outside any sandbox) during
/// `d`: the reference that shows whether the host could have given more.
fn host_cpus_for_two_threads(d: Duration) -> f64 {
    fn thread_cpu() -> f64 {
        let mut ts = libc::timespec {
            tv_sec: 0,
            tv_nsec: 0,
        };
        // SAFETY: clock_gettime writes into the timespec we own.
        unsafe { libc::clock_gettime(libc::CLOCK_THREAD_CPUTIME_ID, &mut ts) };
        ts.tv_sec as f64 + ts.tv_nsec as f64 / 1e9
    }
    let t = Instant::now();
    let threads: Vec<_> = (0..2)
        .map(|_| {
            std::thread::spawn(move || {
                let start = thread_cpu();
                let mut x = 0u64;
                while t.elapsed() < d {
                    x = std::hint::black_box(x.wrapping_add(1));
                }
                thread_cpu() - start
            })
        })
        .collect();
    let cpu: f64 = threads.into_iter().filter_map(|h| h.join().ok()).sum();
    cpu / t.elapsed().as_secs_f64()
}
