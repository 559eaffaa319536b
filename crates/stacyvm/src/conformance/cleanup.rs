//! Cleanup: destroyed sandboxes leave nothing behind on the host, and at the
//! end the server lists no sandbox.
//!
//! What is looked for, by sandbox id: mounts in any mount namespace of the
//! host (`/proc/self/mountinfo` and `/proc/*/mountinfo`, which also finds
//! any process still living in a sandbox's namespace), processes whose
//! cgroup or command line names the sandbox, entries in the server's data
//! directory (agent run dirs, provider state dirs), cgroup directories below
//! `<cgroup mount>/stacyvm`, and for Docker every container labelled with the
//! sandbox, whatever its state.

use super::{snippet, Ctx};
use crate::client::enc;
use anyhow::{anyhow, bail, Context, Result};
use http::Method;
use http_body_util::BodyExt;
use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// How long a destroyed sandbox's runtime may take to disappear completely
/// (providers may delete the writable layer in the background).
const SETTLE: Duration = Duration::from_secs(10);

fn lock<T: Clone>(m: &std::sync::Mutex<T>) -> T {
    m.lock().unwrap_or_else(|e| e.into_inner()).clone()
}

fn proc_pids() -> Vec<u32> {
    std::fs::read_dir("/proc")
        .map(|d| {
            d.filter_map(|e| e.ok())
                .filter_map(|e| e.file_name().to_string_lossy().parse().ok())
                .collect()
        })
        .unwrap_or_default()
}

fn cmdline(pid: u32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| {
            String::from_utf8_lossy(&b)
                .replace('\0', " ")
                .trim()
                .to_string()
        })
        .unwrap_or_default()
}

/// Mount points (field 5) of mountinfo lines that name any of `ids`.
fn mounts_naming(mountinfo: &str, ids: &[String]) -> Vec<(String, String)> {
    mountinfo
        .lines()
        .filter_map(|l| {
            let id = ids.iter().find(|id| l.contains(id.as_str()))?;
            let mp = l.split(' ').nth(4).unwrap_or(l);
            Some((id.clone(), mp.to_string()))
        })
        .collect()
}

/// Host-side traces of `ids` (empty when there are none).
fn host_leftovers(c: &Ctx, ids: &[String]) -> Vec<String> {
    let mut out = Vec::new();
    let pids = proc_pids();

    // Mounts: this process's namespace, then one process per other mount
    // namespace.
    let own = std::fs::read_to_string("/proc/self/mountinfo").unwrap_or_default();
    for (id, mp) in mounts_naming(&own, ids) {
        out.push(format!("{id}: host mount {mp}"));
    }
    let mut seen: HashSet<PathBuf> = HashSet::new();
    if let Ok(ns) = std::fs::read_link("/proc/self/ns/mnt") {
        seen.insert(ns);
    }
    for &pid in &pids {
        let Ok(ns) = std::fs::read_link(format!("/proc/{pid}/ns/mnt")) else {
            continue;
        };
        if !seen.insert(ns.clone()) {
            continue;
        }
        let Ok(mi) = std::fs::read_to_string(format!("/proc/{pid}/mountinfo")) else {
            continue;
        };
        if let Some((id, mp)) = mounts_naming(&mi, ids).into_iter().next() {
            out.push(format!(
                "{id}: mount {mp} in the mount namespace {} of pid {pid} ({})",
                ns.display(),
                snippet(&cmdline(pid))
            ));
        }
    }

    // Processes that name the sandbox in their cgroup or command line.
    let me = std::process::id();
    for &pid in &pids {
        if pid == me {
            continue;
        }
        let cg = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).unwrap_or_default();
        let cmd = cmdline(pid);
        if let Some(id) = ids
            .iter()
            .find(|id| cg.contains(id.as_str()) || cmd.contains(id.as_str()))
        {
            out.push(format!("{id}: process {pid} ({})", snippet(&cmd)));
        }
    }

    // The server's data directory, two levels deep.
    out.extend(dir_entries_naming(&c.data_dir, ids, 2, "data dir entry"));

    // Cgroup directories below <mount>/stacyvm.
    for mp in cgroup_mounts(&own) {
        out.extend(dir_entries_naming(&mp.join("stacyvm"), ids, 3, "cgroup"));
    }
    out
}

fn dir_entries_naming(dir: &Path, ids: &[String], depth: u32, what: &str) -> Vec<String> {
    let mut out = Vec::new();
    let Ok(rd) = std::fs::read_dir(dir) else {
        return out;
    };
    for e in rd.filter_map(|e| e.ok()) {
        let name = e.file_name().to_string_lossy().into_owned();
        let path = e.path();
        if let Some(id) = ids.iter().find(|id| name.contains(id.as_str())) {
            out.push(format!("{id}: {what} {}", path.display()));
            continue;
        }
        if depth > 1 && e.file_type().is_ok_and(|t| t.is_dir()) {
            out.extend(dir_entries_naming(&path, ids, depth - 1, what));
        }
    }
    out
}

fn cgroup_mounts(mountinfo: &str) -> Vec<PathBuf> {
    let mut out: Vec<PathBuf> = Vec::new();
    for l in mountinfo.lines() {
        let Some((left, right)) = l.split_once(" - ") else {
            continue;
        };
        if !matches!(right.split(' ').next(), Some("cgroup" | "cgroup2")) {
            continue;
        }
        if let Some(mp) = left.split(' ').nth(4) {
            let p = PathBuf::from(mp.replace("\\040", " "));
            if !out.contains(&p) {
                out.push(p);
            }
        }
    }
    out
}

/// The Docker daemon's Unix socket.
fn docker_socket(c: &Ctx) -> String {
    let raw = c
        .docker_socket
        .clone()
        .or_else(|| std::env::var("DOCKER_HOST").ok())
        .filter(|s| !s.trim().is_empty())
        .unwrap_or_else(|| "/var/run/docker.sock".to_string());
    raw.strip_prefix("unix://").unwrap_or(&raw).to_string()
}

/// Containers (any state) labelled with the sandbox id, through the Engine
/// API on the daemon's socket.
async fn docker_containers(c: &Ctx, id: &str) -> Result<Vec<String>> {
    let socket = docker_socket(c);
    let stream = tokio::net::UnixStream::connect(&socket)
        .await
        .with_context(|| format!("connecting to the Docker socket {socket}"))?;
    let (mut send, conn) =
        hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let filters = format!(
        r#"{{"label":["{}={id}"]}}"#,
        stacyvm_providers::docker::LABEL_SANDBOX
    );
    let req = http::Request::get(format!("/containers/json?all=1&filters={}", enc(&filters)))
        .header(http::header::HOST, "docker")
        .body(crate::client::empty())?;
    let resp = send.send_request(req).await?;
    let status = resp.status();
    let body = resp.into_body().collect().await?.to_bytes();
    if !status.is_success() {
        bail!(
            "Docker answered {} to the container list: {}",
            status.as_u16(),
            snippet(&String::from_utf8_lossy(&body))
        );
    }
    let v: serde_json::Value = serde_json::from_slice(&body)?;
    Ok(v.as_array()
        .map(|a| {
            a.iter()
                .map(|c| {
                    format!(
                        "{} ({})",
                        c["Id"]
                            .as_str()
                            .unwrap_or("?")
                            .chars()
                            .take(12)
                            .collect::<String>(),
                        c["State"].as_str().unwrap_or("?")
                    )
                })
                .collect()
        })
        .unwrap_or_default())
}

/// Everything left of `ids`, host-side and in the runtime.
async fn leftovers(c: &Ctx, ids: &[String]) -> Result<Vec<String>> {
    let mut out = host_leftovers(c, ids);
    if c.provider == "docker" {
        for id in ids {
            for ctr in docker_containers(c, id).await? {
                out.push(format!("{id}: container {ctr}"));
            }
        }
    }
    Ok(out)
}

/// Wait up to [`SETTLE`] for `ids` to leave no trace.
async fn wait_clean(c: &Ctx, ids: &[String]) -> Result<Duration> {
    let t = Instant::now();
    loop {
        let left = leftovers(c, ids).await?;
        if left.is_empty() {
            return Ok(t.elapsed());
        }
        if t.elapsed() > SETTLE {
            bail!(
                "{}s after destroy: {}",
                SETTLE.as_secs(),
                snippet(&left.join("; "))
            );
        }
        tokio::time::sleep(Duration::from_millis(250)).await;
    }
}

/// The sandboxes destroyed by earlier checks (and the TTL-expired one) left
/// nothing behind.
pub(super) async fn destroyed(c: &Ctx) -> Result<String> {
    let ids = lock(&c.destroyed);
    if ids.is_empty() {
        bail!("no sandbox was destroyed by the earlier checks");
    }
    let took = wait_clean(c, &ids).await?;
    Ok(format!(
        "{} destroyed sandbox(es) left nothing (settled in {:.1}s)",
        ids.len(),
        took.as_secs_f64()
    ))
}

/// Destroy what is left; then the server lists no sandbox and nothing of any
/// sandbox of the suite remains on the host.
pub(super) async fn final_state(c: &Ctx) -> Result<String> {
    let created = lock(&c.created);
    if created.is_empty() {
        bail!("the suite created no sandbox");
    }
    let gone = lock(&c.destroyed);
    let live: Vec<String> = created
        .iter()
        .filter(|id| !gone.contains(id))
        .cloned()
        .collect();
    // The same probe on the sandboxes still running shows that it can see
    // this provider's runtimes at all.
    let seen_live = leftovers(c, &live).await?.len();
    for id in &live {
        c.destroy(id)
            .await
            .with_context(|| format!("destroying {id}"))?;
    }
    let r = c
        .call(Method::GET, "/api/v1/sandboxes", None)
        .await?
        .expect(200, "list")?;
    let v = r.json()?;
    let n = v
        .as_array()
        .ok_or_else(|| anyhow!("the list is not an array: {}", r.describe()))?
        .len();
    if n != 0 {
        bail!(
            "{n} sandbox(es) still listed after destroying all: {}",
            r.describe()
        );
    }
    let took = wait_clean(c, &created).await?;
    Ok(format!(
        "no sandbox listed; {} sandbox(es) left no trace (settled in {:.1}s; \
         the probe saw {seen_live} trace(s) of the {} running before destroy)",
        created.len(),
        took.as_secs_f64(),
        live.len()
    ))
}

/// Destroy every sandbox the suite created, and any other the private
/// server lists (a create cut off by a check's time limit still finishes);
/// errors are ignored: this runs whatever the checks did.
pub(super) async fn destroy_everything(c: &Ctx) {
    let mut ids = lock(&c.created);
    if let Ok(Ok(r)) = tokio::time::timeout(
        Duration::from_secs(15),
        c.call(Method::GET, "/api/v1/sandboxes", None),
    )
    .await
    {
        if let Ok(serde_json::Value::Array(items)) = r.json() {
            for s in items {
                if let Some(id) = s["id"].as_str() {
                    if !ids.iter().any(|x| x == id) {
                        ids.push(id.to_string());
                    }
                }
            }
        }
    }
    for id in &ids {
        let _ = tokio::time::timeout(
            Duration::from_secs(60),
            c.call(Method::DELETE, &format!("/api/v1/sandboxes/{id}"), None),
        )
        .await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn finds_mounts_and_cgroup_hierarchies() {
        let mi = "\
22 1 8:1 / / rw - ext4 /dev/sda1 rw
30 25 0:26 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory
31 25 0:27 / /sys/fs/cgroup/unified rw - cgroup2 cgroup2 rw
40 22 8:1 /tmp/svc-1/s/sb_abcdefghijkl /.stacyvm/run rw - ext4 /dev/sda1 rw
";
        let ids = vec!["sb_abcdefghijkl".to_string(), "sb_zzzzzzzzzzzz".to_string()];
        assert_eq!(
            mounts_naming(mi, &ids),
            [("sb_abcdefghijkl".to_string(), "/.stacyvm/run".to_string())]
        );
        assert_eq!(
            cgroup_mounts(mi),
            [
                PathBuf::from("/sys/fs/cgroup/memory"),
                PathBuf::from("/sys/fs/cgroup/unified")
            ]
        );
    }

    #[test]
    fn finds_data_dir_entries_by_id() {
        let dir = std::env::temp_dir().join(format!("svc-test-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(dir.join("s/sb_abcdefghijkl")).unwrap();
        std::fs::create_dir_all(dir.join("native/.trash-sb_abcdefghijkl-1")).unwrap();
        std::fs::create_dir_all(dir.join("native/sb_other0000000")).unwrap();
        let ids = vec!["sb_abcdefghijkl".to_string()];
        let mut found = dir_entries_naming(&dir, &ids, 2, "entry");
        found.sort();
        assert_eq!(found.len(), 2, "{found:?}");
        assert!(
            found[0].contains("native/.trash-sb_abcdefghijkl-1"),
            "{found:?}"
        );
        assert!(found[1].ends_with("s/sb_abcdefghijkl"), "{found:?}");
        std::fs::remove_dir_all(&dir).unwrap();
        assert!(dir_entries_naming(&dir, &ids, 2, "entry").is_empty());
    }
}
