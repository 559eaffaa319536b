//! Shared fixture of the native provider tests.
//!
//! Needs root, a running dockerd with the test image
//! (`STACYVM_TEST_IMAGE`, default `stacyvm-test/python:bookworm`) to build the
//! test root filesystem from (`docker export`, cached under
//! `.ci/cache/native-test-rootfs/<image id>`), and the static agent binary
//! (`STACYVM_AGENT_BIN`, or the workspace's
//! `target/x86_64-unknown-linux-gnu/{release,debug}/stacyvm-agent`). A missing
//! prerequisite fails the test with a message saying what to do.
//!
//! Every fixture uses its own random instance id and scratch directory and
//! destroys every sandbox it still has when dropped, even on failure.

#![allow(dead_code)]

use stacyvm_agent_proto::{ExecRequest, ExecResult};
use stacyvm_native::{DirRootfs, NativeOptions, NativeProvider};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{NetworkMode, Provider, SandboxSpec};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// Name the tests give the test image in the provider.
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

/// Fail unless running as root.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the native provider tests need root (namespaces, overlayfs, cgroups); run them as root"
    );
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

fn docker(args: &[&str]) -> String {
    let out = Command::new("docker")
        .args(args)
        .output()
        .unwrap_or_else(|e| panic!("cannot run docker {args:?}: {e} (the tests need docker to build their root filesystem)"));
    assert!(
        out.status.success(),
        "docker {args:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// The test image exported to a directory (built once per image id), and
/// the image's environment.
pub struct TestRootfs {
    pub dir: PathBuf,
    pub env: Vec<String>,
}

/// The test root filesystem, built on first use.
pub fn test_rootfs() -> &'static TestRootfs {
    static ROOTFS: OnceLock<TestRootfs> = OnceLock::new();
    ROOTFS.get_or_init(build_rootfs)
}

fn build_rootfs() -> TestRootfs {
    require_root();
    let image = std::env::var("STACYVM_TEST_IMAGE")
        .unwrap_or_else(|_| "stacyvm-test/python:bookworm".into());
    let id = docker(&["image", "inspect", "-f", "{{.Id}}", &image]);
    let env_json = docker(&["image", "inspect", "-f", "{{json .Config.Env}}", &image]);
    let env: Vec<String> = serde_json::from_str(&env_json).unwrap_or_default();
    let key = id
        .trim_start_matches("sha256:")
        .get(..16)
        .unwrap_or("unknown")
        .to_string();
    let cache = workspace_root().join(".ci/cache/native-test-rootfs");
    let dir = cache.join(&key);
    if dir.join("rootfs/.complete").exists() {
        return TestRootfs {
            dir: dir.join("rootfs").canonicalize().expect("rootfs path"),
            env,
        };
    }
    std::fs::create_dir_all(&cache).expect("cache dir");
    let tmp = cache.join(format!(".build-{}", token()));
    std::fs::create_dir_all(tmp.join("rootfs")).expect("tmp dir");
    let name = format!("stacyvm-native-export-{}", token());
    docker(&["create", "--name", &name, &image, "/bin/true"]);
    let status = Command::new("sh")
        .arg("-c")
        .arg(format!(
            "docker export {name} | tar -x -C {} --numeric-owner",
            tmp.join("rootfs").display()
        ))
        .status();
    docker(&["rm", "-f", &name]);
    assert!(
        status.as_ref().is_ok_and(|s| s.success()),
        "exporting {image} failed: {status:?}"
    );
    std::fs::write(tmp.join("rootfs/.complete"), &id).expect("marker");
    if std::fs::rename(&tmp, &dir).is_err() {
        // Another test process won the race; use its copy.
        let _ = std::fs::remove_dir_all(&tmp);
    }
    TestRootfs {
        dir: dir.join("rootfs").canonicalize().expect("rootfs path"),
        env,
    }
}

/// Path of the init executable built with this crate.
pub fn init_exe() -> PathBuf {
    PathBuf::from(env!("CARGO_BIN_EXE_stacyvm-sandbox-init"))
}

/// One test's world: a provider with a random instance id and its own state
/// directory, and cleanup of both on drop.
pub struct Fixture {
    pub provider: NativeProvider,
    pub instance: String,
    pub dir: PathBuf,
    pub rootfs: &'static TestRootfs,
}

impl Fixture {
    pub fn new() -> Fixture {
        Self::with_rootfs(DirRootfs::new())
    }

    /// A fixture whose provider also knows the images in `extra`.
    pub fn with_rootfs(extra: DirRootfs) -> Fixture {
        require_root();
        let rootfs = test_rootfs();
        let instance = format!("t{}", token());
        let dir = std::env::temp_dir().join(format!("stacyvm-nt-{}", token()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let provider = Self::provider_for(
            &dir,
            &instance,
            extra.with_image(IMAGE, &rootfs.dir, rootfs.env.clone()),
        );
        Fixture {
            provider,
            instance,
            dir,
            rootfs,
        }
    }

    /// Another provider over the same state directory (a restarted server).
    pub fn provider_for(dir: &Path, instance: &str, images: DirRootfs) -> NativeProvider {
        NativeProvider::new(NativeOptions {
            state_dir: dir.join("state"),
            instance_id: instance.to_string(),
            init_exe: init_exe(),
            init_args: Vec::new(),
            rootfs: Arc::new(images),
        })
        .expect("provider")
    }

    /// A spec for a fresh sandbox of the test image with the real agent.
    pub fn spec(&self) -> SandboxSpec {
        let id = format!("sb_t{}", token());
        let run_dir = self.dir.join("run").join(&id);
        std::fs::create_dir_all(&run_dir).expect("run dir");
        SandboxSpec {
            id,
            image: IMAGE.to_string(),
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
    pub async fn sandbox(&self, spec: &SandboxSpec) -> AgentClient {
        self.provider
            .create(spec)
            .await
            .unwrap_or_else(|e| panic!("create {}: {e}", spec.id));
        AgentClient::new(spec.socket_path())
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Destroy whatever this fixture still has, on a runtime of our own
        // (the test's runtime may be shutting down).
        let provider = &self.provider;
        std::thread::scope(|s| {
            s.spawn(|| {
                let Ok(rt) = tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                else {
                    return;
                };
                rt.block_on(async {
                    if let Ok(list) = provider.list().await {
                        for info in list {
                            if let Err(e) = provider.destroy(&info.sandbox_id).await {
                                eprintln!("cleanup of {} failed: {e}", info.sandbox_id);
                            }
                        }
                    }
                });
            });
        });
        // Whatever else of this instance is left (pre-started sandboxes of a
        // helper process, a failed assertion half-way): kill and remove it.
        if let Ok(layout) = self.provider.cgroup_layout() {
            for leaf in layout.leaves(&self.instance) {
                let _ = layout.kill_all(&self.instance, &leaf, None, Duration::from_secs(10));
                layout.remove_dirs(&self.instance, &leaf);
            }
        }
        let _ = std::fs::remove_dir_all(&self.dir);
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

/// Lines of the host's mount table that mention `needle`.
pub fn host_mounts_mentioning(needle: &str) -> Vec<String> {
    std::fs::read_to_string("/proc/self/mountinfo")
        .expect("mountinfo")
        .lines()
        .filter(|l| l.contains(needle))
        .map(str::to_string)
        .collect()
}

/// Percentile of a sorted list of durations.
pub fn percentile(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let idx = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[idx.min(sorted.len() - 1)]
}
