//! Isolation: processes, host files, hostname and network, seen from inside
//! the sandbox and compared with the host.

use super::{snippet, Ctx};
use anyhow::{bail, Context, Result};

fn host_process_count() -> usize {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter(|e| {
                    e.file_name()
                        .to_string_lossy()
                        .bytes()
                        .all(|b| b.is_ascii_digit())
                })
                .count()
        })
        .unwrap_or(0)
}

/// Only a handful of processes are visible inside.
pub(super) async fn pids(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .sh_ok(
            &id,
            "n=0; for d in /proc/[0-9]*; do [ -d \"$d\" ] && n=$((n+1)); done; echo $n",
            "10s",
        )
        .await?;
    let inside: usize = out
        .trim()
        .parse()
        .with_context(|| format!("counting /proc entries answered {out:?}"))?;
    let host = host_process_count();
    if inside == 0 {
        bail!("no process visible in /proc inside the sandbox (is /proc mounted?)");
    }
    if inside > 10 {
        bail!("{inside} processes visible inside the sandbox (host: {host})");
    }
    Ok(format!("{inside} processes visible inside (host: {host})"))
}

/// A file made on the host for this run is neither visible nor writable
/// from inside.
pub(super) async fn filesystem(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let marker = std::env::temp_dir().join(format!("svc-marker-{}", c.token));
    let content = format!("host-only {}\n", c.token);
    std::fs::write(&marker, &content).with_context(|| format!("creating {}", marker.display()))?;
    let m = marker.to_string_lossy().into_owned();
    let res = async {
        let out = c
            .sh(
                &id,
                &format!(
                    "if [ -e '{m}' ]; then echo visible; cat '{m}'; else echo hidden; fi; \
                     echo sandbox-wrote > '{m}' 2>/dev/null; true"
                ),
                "10s",
            )
            .await?;
        let after = std::fs::read_to_string(&marker).unwrap_or_default();
        if out.exit_code != 0 || !out.stdout.starts_with("hidden") {
            bail!(
                "the host file {m} is visible inside the sandbox: {}",
                snippet(&out.stdout)
            );
        }
        if after != content {
            bail!("the sandbox changed the host file {m}: {after:?}");
        }
        Ok(format!("host file {m} invisible and unchanged"))
    }
    .await;
    let _ = std::fs::remove_file(&marker);
    res
}

fn host_hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .unwrap_or_default()
        .trim()
        .to_string()
}

pub(super) async fn hostname(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let inside = c
        .sh_ok(&id, "cat /proc/sys/kernel/hostname", "10s")
        .await?
        .trim()
        .to_string();
    let host = host_hostname();
    if inside.is_empty() {
        bail!("the sandbox has an empty hostname");
    }
    if inside == host {
        bail!("the sandbox's hostname is the host's ({host})");
    }
    Ok(format!("sandbox {inside:?}, host {host:?}"))
}

/// With `network: none` only `lo` exists (`/proc/net/dev` shows the
/// sandbox's own network namespace; `/sys/class/net` when there is no
/// `/proc/net/dev`).
pub(super) async fn network_none(c: &Ctx) -> Result<String> {
    let id = c.main()?;
    let out = c
        .sh_ok(
            &id,
            "if [ -r /proc/net/dev ]; then echo proc; tail -n +3 /proc/net/dev | cut -d: -f1; \
             else echo sys; ls -1 /sys/class/net; fi",
            "10s",
        )
        .await?;
    let mut lines = out.lines().map(str::trim).filter(|l| !l.is_empty());
    let source = match lines.next() {
        Some("proc") => "/proc/net/dev",
        Some("sys") => "/sys/class/net",
        _ => bail!("unexpected answer {out:?}"),
    };
    let ifaces: Vec<&str> = lines.collect();
    if ifaces != ["lo"] {
        bail!("interfaces in {source}: {ifaces:?} (want only lo)");
    }
    Ok(format!("only lo in {source}"))
}
