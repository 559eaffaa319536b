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

#[path = "../shared/mod.rs"]
mod shared;

pub use shared::*;
use stacyvm_native::{DirRootfs, NativeOptions, NativeProvider};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::SandboxSpec;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// Fail unless running as root.
pub fn require_root() {
    // SAFETY: no preconditions.
    let euid = unsafe { libc::geteuid() };
    assert_eq!(
        euid, 0,
        "the native provider tests need root (namespaces, overlayfs, cgroups); run them as root"
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
        sandbox_spec(IMAGE, &self.dir.join("run"))
    }

    /// Create a sandbox and return its agent client.
    pub async fn sandbox(&self, spec: &SandboxSpec) -> AgentClient {
        create_sandbox(&self.provider, spec).await
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Destroy whatever this fixture still has.
        block_on_own_runtime(destroy_all(&self.provider));
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
