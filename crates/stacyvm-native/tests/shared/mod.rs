//! Helpers of the provider test suites of several crates (native, proot,
//! docker), each of which includes this file with `#[path = …] mod shared;`:
//! ids, the agent binary, sandbox specs, commands in a sandbox, cleanup and
//! the host's process table. Uses nothing but std, tokio and the provider
//! crates, which every one of those suites has.

#![allow(dead_code)]

use stacyvm_agent_proto::{ExecRequest, ExecResult};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{NetworkMode, Provider, SandboxSpec};
use std::collections::BTreeMap;
use std::future::Future;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name the native and proot tests give the test image in the provider.
pub const IMAGE: &str = "test/python";

/// A unique-enough token for ids and directory names.
pub fn token() -> String {
    static COUNTER: AtomicU64 = AtomicU64::new(0);
    let nanos = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_nanos())
        .unwrap_or_default();
    let n = COUNTER.fetch_add(1, Ordering::Relaxed);
    format!("{:x}{:x}{n:x}", std::process::id(), nanos & 0xff_ffff_ffff)
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// The static agent binary; fails the test when there is none.
pub fn agent_binary() -> PathBuf {
    if let Ok(p) = std::env::var("STACYVM_AGENT_BIN") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "STACYVM_AGENT_BIN={} does not exist",
            p.display()
        );
        return p;
    }
    let target = workspace_root().join("target/x86_64-unknown-linux-gnu");
    for profile in ["release", "debug"] {
        let p = target.join(profile).join("stacyvm-agent");
        if p.is_file() {
            return p.canonicalize().unwrap_or(p);
        }
    }
    panic!(
        "no agent binary: set STACYVM_AGENT_BIN or build it with scripts/build.sh \
         (RUSTFLAGS=\"-C target-feature=+crt-static\" cargo build --release -p stacyvm-agent \
         --target x86_64-unknown-linux-gnu)"
    );
}

/// A spec for a fresh sandbox of `image` with the real agent, its run
/// directory made under `run_root`, and the tests' usual limits (256 MiB,
/// one vCPU, 128 pids, no network, 15 s to start).
pub fn sandbox_spec(image: &str, run_root: &Path) -> SandboxSpec {
    let id = format!("sb_t{}", token());
    let run_dir = run_root.join(&id);
    std::fs::create_dir_all(&run_dir).expect("run dir");
    SandboxSpec {
        id,
        image: image.to_string(),
        memory_mb: 256,
        vcpus: 1,
        pids_limit: 128,
        network: NetworkMode::None,
        env: BTreeMap::from([("STACYVM_TEST".to_string(), "yes".to_string())]),
        run_dir,
        agent_binary: agent_binary(),
        start_timeout: Duration::from_secs(15),
    }
}

/// Create a sandbox and return its agent client.
pub async fn create_sandbox(
    provider: &(impl Provider + ?Sized),
    spec: &SandboxSpec,
) -> AgentClient {
    provider
        .create(spec)
        .await
        .unwrap_or_else(|e| panic!("create {}: {e}", spec.id));
    AgentClient::new(spec.socket_path())
}

/// Run `f` on a runtime and a thread of its own, so that it works inside a
/// test's runtime (even one shutting down, as in a fixture's `drop`) and
/// outside any.
pub fn block_on_own_runtime(f: impl Future<Output = ()> + Send) {
    std::thread::scope(|s| {
        s.spawn(|| {
            let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
            else {
                return;
            };
            rt.block_on(f);
        });
    });
}

/// Destroy every sandbox `provider` lists; failures are printed.
pub async fn destroy_all(provider: &(impl Provider + ?Sized)) {
    if let Ok(list) = provider.list().await {
        for info in list {
            if let Err(e) = provider.destroy(&info.sandbox_id).await {
                eprintln!("cleanup of {} failed: {e}", info.sandbox_id);
            }
        }
    }
}

/// Run `line` with `/bin/sh -c` in the sandbox.
pub async fn sh(agent: &AgentClient, line: &str) -> ExecResult {
    sh_timeout(agent, line, 60_000).await
}

/// Run `line` with `/bin/sh -c` and a timeout in milliseconds.
pub async fn sh_timeout(agent: &AgentClient, line: &str, timeout_ms: u64) -> ExecResult {
    agent
        .exec(&ExecRequest {
            argv: vec!["/bin/sh".into(), "-c".into(), line.into()],
            workdir: "/".into(),
            timeout_ms,
            ..Default::default()
        })
        .await
        .unwrap_or_else(|e| panic!("exec {line:?}: {e}"))
}

/// The host's processes that have not exited (see [`has_exited`]): pid and
/// `/proc/<pid>` directory.
pub fn live_processes() -> Vec<(String, PathBuf)> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
        let name = e.file_name().to_string_lossy().into_owned();
        if !name.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !has_exited(&name) {
            out.push((name, e.path()));
        }
    }
    out
}

/// Whether process `pid` has exited: it is gone, or a zombie.
pub fn has_exited(pid: impl std::fmt::Display) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat")).map_or(true, |s| {
        s.rsplit_once(')')
            .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
    })
}

/// The command line of a process, from its `/proc/<pid>` directory, with
/// spaces between the arguments.
pub fn cmdline(proc_dir: &Path) -> String {
    std::fs::read_to_string(proc_dir.join("cmdline"))
        .unwrap_or_default()
        .replace('\0', " ")
}
