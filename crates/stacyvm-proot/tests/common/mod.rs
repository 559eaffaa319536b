//! Shared fixture of the proot provider tests.
//!
//! Needs the `proot` executable (`STACYVM_PROOT_BIN`, default `proot` in
//! `PATH`), the test image in the native image store (`STACYVM_IMAGE_DIR`,
//! else `$STACYVM_CACHE_DIR/native-images`, else
//! `<workspace>/.ci/cache/native-images`; image `STACYVM_TEST_IMAGE`,
//! default `stacyvm-test/python:bookworm`) and the static agent binary
//! (`STACYVM_AGENT_BIN`, or the workspace's
//! `target/x86_64-unknown-linux-gnu/{release,debug}/stacyvm-agent`). A
//! missing prerequisite fails the test with a message saying what to do.
//!
//! Every fixture uses its own random instance id and scratch directory and
//! destroys every sandbox it still has when dropped, even on failure.

#![allow(dead_code)]

#[path = "../../../stacyvm-native/tests/shared/mod.rs"]
mod shared;

pub use shared::*;
use stacyvm_native::{DirRootfs, ResolvedImage};
use stacyvm_proot::{ProotOptions, ProotProvider};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{Provider, SandboxSpec};
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};
use std::time::Duration;

/// The `proot` executable the tests use.
pub fn proot_binary() -> PathBuf {
    PathBuf::from(std::env::var("STACYVM_PROOT_BIN").unwrap_or_else(|_| "proot".into()))
}

/// The native image store holding the test image.
pub fn image_store() -> PathBuf {
    if let Ok(d) = std::env::var("STACYVM_IMAGE_DIR") {
        return PathBuf::from(d);
    }
    let cache = std::env::var("STACYVM_CACHE_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| workspace_root().join(".ci/cache"));
    cache.join("native-images")
}

/// The test image as the store has it: its layer directories (bottom
/// first), environment and working directory.
pub fn test_image() -> &'static ResolvedImage {
    static IMAGE_LAYERS: OnceLock<ResolvedImage> = OnceLock::new();
    IMAGE_LAYERS.get_or_init(load_image)
}

fn load_image() -> ResolvedImage {
    let name = std::env::var("STACYVM_TEST_IMAGE")
        .unwrap_or_else(|_| "stacyvm-test/python:bookworm".into());
    let reference = if name.split('/').next().is_some_and(|h| h.contains('.')) {
        name.clone()
    } else {
        format!("docker.io/{name}")
    };
    let store = image_store();
    let how = format!(
        "import it with `STACYVM_IMAGE_DIR={} target/debug/stacyvm image import \
         .ci/cache/images/python-bookworm.tar {name}` (the tarball comes from \
         scripts/build-test-image.sh), or point STACYVM_IMAGE_DIR at a store that has it",
        store.display()
    );
    let images = store.join("images");
    let rd = std::fs::read_dir(&images)
        .unwrap_or_else(|e| panic!("no image store at {}: {e}; {how}", images.display()));
    let record: serde_json::Value = rd
        .flatten()
        .filter(|e| e.path().extension().is_some_and(|x| x == "json"))
        .filter_map(|e| std::fs::read(e.path()).ok())
        .filter_map(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
        .find(|v| v["reference"] == reference.as_str())
        .unwrap_or_else(|| panic!("{reference} is not in {}; {how}", store.display()));
    let layers: Vec<PathBuf> = record["layers"]
        .as_array()
        .unwrap_or_else(|| panic!("{reference}: no layers in its record"))
        .iter()
        .map(|l| {
            let diff = l["diff_id"].as_str().expect("diff_id");
            let hex = diff.strip_prefix("sha256:").expect("sha256 diff_id");
            let dir = store.join("layers").join(hex);
            assert!(
                dir.is_dir(),
                "layer {} of {reference} is missing; {how}",
                dir.display()
            );
            dir.canonicalize().expect("layer path")
        })
        .collect();
    assert!(!layers.is_empty(), "{reference} has no layers");
    let env = record["config"]["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let working_dir = record["config"]["working_dir"].as_str().map(str::to_string);
    ResolvedImage {
        layers,
        env,
        working_dir,
    }
}

/// One test's world: a provider with a random instance id and its own state
/// directory, and cleanup of both on drop.
pub struct Fixture {
    pub provider: ProotProvider,
    pub instance: String,
    pub dir: PathBuf,
}

/// Logs of the code under test, filtered by `RUST_LOG` (shown for failing
/// tests, or with `--nocapture`).
pub fn init_tracing() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::from_default_env())
        .with_test_writer()
        .try_init();
}

/// A cache of flattened images shared by the fixtures of this test
/// process (flattening the image once instead of once per test), removed
/// when the process exits.
pub fn shared_cache() -> PathBuf {
    static SHARED: OnceLock<PathBuf> = OnceLock::new();
    extern "C" fn remove_shared() {
        if let Some(p) = SHARED.get() {
            let _ = std::fs::remove_dir_all(p);
        }
    }
    SHARED
        .get_or_init(|| {
            let dir = std::env::temp_dir().join(format!("svp-cache-{}", token()));
            std::fs::create_dir_all(&dir).expect("cache dir");
            // SAFETY: registers a plain function without captures.
            unsafe { libc::atexit(remove_shared) };
            dir
        })
        .clone()
}

impl Fixture {
    /// A provider sharing the process's image cache, without ready copies
    /// (each test makes only a few sandboxes).
    pub fn new() -> Fixture {
        let fx = Self::with_cache(Some(shared_cache()));
        fx.provider.set_spare_roots(0);
        fx
    }

    /// A provider with a cache of its own (`None`: in its state directory,
    /// as in a server).
    pub fn with_cache(cache_dir: Option<PathBuf>) -> Fixture {
        init_tracing();
        let instance = format!("t{}", token());
        // Short: agent socket paths are limited to 107 bytes.
        let dir = std::env::temp_dir().join(format!("svp-{}", token()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let provider = Self::provider_with(&dir, &instance, cache_dir);
        Fixture {
            provider,
            instance,
            dir,
        }
    }

    /// The images every provider of the tests knows.
    pub fn images() -> DirRootfs {
        DirRootfs::new().with_resolved(IMAGE, test_image().clone())
    }

    /// A provider over the state directory of `dir` (another one is a
    /// restarted server).
    pub fn provider_for(dir: &Path, instance: &str) -> ProotProvider {
        Self::provider_with(dir, instance, Some(shared_cache()))
    }

    fn provider_with(dir: &Path, instance: &str, cache_dir: Option<PathBuf>) -> ProotProvider {
        ProotProvider::new(ProotOptions {
            state_dir: dir.join("state"),
            instance_id: instance.to_string(),
            proot_binary: proot_binary(),
            cache_dir,
            rootfs: Arc::new(Self::images()),
        })
        .unwrap_or_else(|e| panic!("proot provider: {e}"))
    }

    /// A spec for a fresh sandbox of the test image with the real agent and
    /// the server's default limits.
    pub fn spec(&self) -> SandboxSpec {
        SandboxSpec {
            memory_mb: 512,
            pids_limit: 256,
            start_timeout: Duration::from_secs(30),
            ..sandbox_spec(IMAGE, &self.dir.join("run"))
        }
    }

    /// Create a sandbox and return its agent client.
    pub async fn sandbox(&self, spec: &SandboxSpec) -> AgentClient {
        create_sandbox(&self.provider, spec).await
    }

    /// The host pid of a sandbox's PRoot, as `inspect` reports it.
    pub async fn pid(&self, id: &str) -> i32 {
        self.provider
            .inspect(id)
            .await
            .unwrap()
            .expect("inspect")
            .runtime_id
            .parse()
            .expect("pid")
    }

    /// The host path of a sandbox's root file system.
    pub fn rootfs(&self, id: &str) -> PathBuf {
        self.provider.state_dir().join(id).join("rootfs")
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        // Destroy whatever this fixture still has.
        let provider = &self.provider;
        block_on_own_runtime(async {
            provider.set_spare_roots(0);
            provider.wait_spare_roots(Duration::from_secs(60)).await;
            destroy_all(provider).await;
        });
        // Background deletion of destroyed sandboxes may still run.
        for _ in 0..100 {
            if std::fs::remove_dir_all(&self.dir).is_ok() || !self.dir.exists() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Run `line` and require exit code 0; returns stdout.
pub async fn sh_ok(agent: &AgentClient, line: &str) -> String {
    let r = sh(agent, line).await;
    assert_eq!(
        r.exit_code, 0,
        "{line:?} failed: stdout {:?} stderr {:?}",
        r.stdout, r.stderr
    );
    r.stdout
}

/// Host processes (not zombies) whose command line contains `needle`.
pub fn processes_with(needle: &str) -> Vec<String> {
    live_processes()
        .into_iter()
        .map(|(pid, dir)| (pid, cmdline(&dir)))
        .filter(|(_, cmdline)| cmdline.contains(needle))
        .map(|(pid, cmdline)| format!("{pid}: {cmdline}"))
        .collect()
}

/// Host processes running the program `dir` or a program from below it.
pub fn processes_below(dir: &Path) -> Vec<String> {
    live_processes()
        .into_iter()
        .filter_map(|(pid, proc_dir)| {
            let exe = std::fs::read_link(proc_dir.join("exe")).ok()?;
            let exe = exe.to_string_lossy();
            let exe = Path::new(exe.strip_suffix(" (deleted)").unwrap_or(&exe));
            exe.starts_with(dir)
                .then(|| format!("{pid}: {}", exe.display()))
        })
        .collect()
}

/// Whether a host process whose command line contains `needle` shows up
/// within 5 s.
pub async fn process_appears(needle: &str) -> bool {
    eventually(Duration::from_secs(5), || {
        !processes_with(needle).is_empty()
    })
    .await
}

/// Wait up to `timeout` for `f` to hold.
pub async fn eventually(timeout: Duration, mut f: impl FnMut() -> bool) -> bool {
    let deadline = std::time::Instant::now() + timeout;
    loop {
        if f() {
            return true;
        }
        if std::time::Instant::now() >= deadline {
            return false;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}
