//! Creating, finding, re-attaching and destroying native sandboxes, failure
//! cleanup, the pre-started pool, and timings.

mod common;

use common::*;
use stacyvm_agent_proto::AGENT_PATH_IN_SANDBOX;
use stacyvm_native::{DirRootfs, NativeProvider, EGRESS_UNSUPPORTED};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{Isolation, NetworkMode, Provider, ProviderError};
use std::io::{BufRead, BufReader};
use std::os::unix::fs::{symlink, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

/// Cgroup leaves of an instance (in every hierarchy).
fn leaves(provider: &NativeProvider) -> Vec<PathBuf> {
    let Ok(layout) = provider.cgroup_layout() else {
        panic!("no cgroups: {:?}", provider.cgroup_layout().err());
    };
    layout
        .sandbox_dirs(provider.instance_id(), "x")
        .iter()
        .filter_map(|d| d.parent().map(Path::to_path_buf))
        .filter_map(|parent| std::fs::read_dir(parent).ok())
        .flat_map(|rd| rd.flatten().map(|e| e.path()))
        .filter(|p| p.is_dir())
        .collect()
}

/// Host processes whose cgroup path contains `needle`.
fn processes_in(needle: &str) -> Vec<String> {
    // Exited processes not yet reaped by the host's init keep their last
    // cgroup path; they hold no resources of the sandbox (and are left out).
    live_processes()
        .into_iter()
        .filter(|(_, dir)| {
            std::fs::read_to_string(dir.join("cgroup")).is_ok_and(|c| c.contains(needle))
        })
        .map(|(pid, dir)| format!("{pid}: {}", cmdline(&dir)))
        .collect()
}

/// Assert that nothing of a destroyed sandbox is left on the host.
fn assert_gone(fx: &Fixture, id: &str, pid: i32, cgroups: &[PathBuf]) {
    let state_dir = fx.provider.state_dir().join(id);
    assert!(!state_dir.exists(), "{} still exists", state_dir.display());
    for d in cgroups {
        assert!(!d.exists(), "cgroup {} still exists", d.display());
    }
    let alive = std::fs::read_to_string(format!("/proc/{pid}/cmdline"))
        .is_ok_and(|c| c.starts_with(AGENT_PATH_IN_SANDBOX));
    assert!(!alive, "the agent (pid {pid}) still runs");
    let leaf = cgroups
        .first()
        .and_then(|d| d.file_name())
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let procs = processes_in(&format!("/{leaf}"));
    assert!(procs.is_empty(), "processes left in /{leaf}: {procs:?}");
    let mounts = host_mounts_mentioning(id);
    assert!(mounts.is_empty(), "host mounts mention {id}: {mounts:?}");
    let findmnt = Command::new("findmnt")
        .args(["-rn", "-o", "TARGET,SOURCE,OPTIONS"])
        .output()
        .expect("findmnt");
    let text = String::from_utf8_lossy(&findmnt.stdout);
    assert!(!text.contains(id), "findmnt shows {id}: {text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_exec_destroy_leaves_nothing_behind() {
    let fx = Fixture::new();
    assert_eq!(fx.provider.name(), "native");
    assert_eq!(fx.provider.isolation(), Isolation::Namespaces);
    assert!(fx.provider.capabilities().contains(&"seccomp".to_string()));
    for warm in [false, true] {
        fx.provider.set_warm_pool_size(usize::from(warm));
        if warm {
            assert!(fx.provider.wait_warm_pool(Duration::from_secs(20)).await);
        }
        let spec = fx.spec();
        let info = fx.provider.create(&spec).await.expect("create");
        assert!(info.running);
        let agent = AgentClient::new(spec.socket_path());
        let r = sh(
            &agent,
            "echo \"$STACYVM_TEST $HOSTNAME $PATH\"; pwd; test -d /workspace && echo ws; hostname; cat /etc/hostname",
        )
        .await;
        assert_eq!(r.exit_code, 0, "{r:?}");
        let host = spec.id.replace('_', "-");
        assert_eq!(
            r.stdout,
            format!(
                "yes {host} /usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin\n/\nws\n{host}\n{host}\n"
            )
        );
        // Running: no mount of the sandbox is visible on the host.
        assert!(host_mounts_mentioning(&spec.id).is_empty());
        let state = fx.provider.sandbox_state(&spec.id).expect("state");
        let pid = state.pid.expect("pid");
        assert_eq!(info.runtime_id, pid.to_string());
        assert!(state.extra.cgroups.iter().all(|d| d.is_dir()));
        assert_eq!(state.extra.cgroup_leaf == spec.id, !warm, "{state:?}");
        // PID 1 is not the provider's child: it survives the server.
        let ppid = std::fs::read_to_string(format!("/proc/{pid}/status"))
            .ok()
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("PPid:").map(|v| v.trim().to_string()))
            })
            .expect("ppid");
        assert_ne!(ppid, std::process::id().to_string());
        let inspected = fx.provider.inspect(&spec.id).await.expect("inspect");
        assert_eq!(inspected, Some(info.clone()));
        assert!(fx
            .provider
            .list()
            .await
            .expect("list")
            .iter()
            .any(|i| i.sandbox_id == spec.id && i.running));
        let logs = fx.provider.logs(&spec.id, 50).await;
        assert!(logs.iter().any(|l| l.contains("listening")), "{logs:?}");

        fx.provider.destroy(&spec.id).await.expect("destroy");
        assert_gone(&fx, &spec.id, pid, &state.extra.cgroups);
        assert_eq!(fx.provider.inspect(&spec.id).await.expect("inspect"), None);
        fx.provider
            .destroy(&spec.id)
            .await
            .expect("destroy is idempotent");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_creates_report_why_and_clean_up() {
    let bad_root = std::env::temp_dir().join(format!("stacyvm-badroot-{}", token()));
    std::fs::create_dir_all(bad_root.join("etc")).expect("bad root");
    symlink("/etc", bad_root.join("proc")).expect("symlink");
    /// Removes the scratch image even when the test fails.
    struct RemoveDir(PathBuf);
    impl Drop for RemoveDir {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
    let _bad_root_guard = RemoveDir(bad_root.clone());
    let fx = Fixture::with_rootfs(DirRootfs::new().with_image("bad/proc", &bad_root, vec![]));
    for warm in [false, true] {
        fx.provider.set_warm_pool_size(usize::from(warm));
        // An agent that is not an executable.
        let mut spec = fx.spec();
        let garbage = fx.dir.join("garbage-agent");
        std::fs::write(&garbage, b"\x00\x01not an elf").expect("write");
        std::fs::set_permissions(&garbage, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        spec.agent_binary = garbage;
        match fx.provider.create(&spec).await {
            Err(ProviderError::AgentStart(m)) => {
                assert!(m.contains("cannot execute the agent"), "{m}")
            }
            other => panic!("expected AgentStart, got {other:?}"),
        }
        assert!(!fx.provider.state_dir().join(&spec.id).exists());

        // An agent that starts and dies.
        let mut spec = fx.spec();
        let dying = fx.dir.join("dying-agent");
        std::fs::write(&dying, "#!/bin/sh\necho agent-is-dying >&2\nexit 3\n").expect("write");
        std::fs::set_permissions(&dying, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        spec.agent_binary = dying;
        match fx.provider.create(&spec).await {
            Err(ProviderError::AgentStart(m)) => {
                assert!(m.contains("exited") && m.contains("agent-is-dying"), "{m}")
            }
            other => panic!("expected AgentStart, got {other:?}"),
        }
        assert!(!fx.provider.state_dir().join(&spec.id).exists());

        // An image with a symlink where /proc goes.
        let mut spec = fx.spec();
        spec.image = "bad/proc".into();
        match fx.provider.create(&spec).await {
            Err(ProviderError::Runtime(m)) => assert!(m.contains("non-directory at /proc"), "{m}"),
            other => panic!("expected Runtime, got {other:?}"),
        }
        assert!(!fx.provider.state_dir().join(&spec.id).exists());
        // The host's /etc was not mounted over.
        assert!(host_mounts_mentioning(" /etc ").is_empty());
    }
    // Requests the provider refuses outright.
    let mut spec = fx.spec();
    spec.network = NetworkMode::Egress;
    match fx.provider.create(&spec).await {
        Err(ProviderError::Invalid(m)) => assert_eq!(m, EGRESS_UNSUPPORTED),
        other => panic!("expected Invalid, got {other:?}"),
    }
    let mut spec = fx.spec();
    spec.image = "no/such-image".into();
    assert!(matches!(
        fx.provider.create(&spec).await,
        Err(ProviderError::Image { .. })
    ));
    let mut spec = fx.spec();
    spec.id = "../escape".into();
    assert!(matches!(
        fx.provider.create(&spec).await,
        Err(ProviderError::Invalid(_))
    ));
    // Nothing is left: no sandbox state, and once the pool is emptied no
    // cgroup of this instance.
    assert!(fx.provider.list().await.expect("list").is_empty());
    fx.provider.set_warm_pool_size(0);
    // A refill started before may still be finishing; it removes itself.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let left = leaves(&fx.provider);
        if left.is_empty() {
            break;
        }
        assert!(Instant::now() < deadline, "cgroups left: {left:?}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn instances_only_see_and_remove_their_own_sandboxes() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let other = Fixture::provider_for(&fx.dir, &format!("other{}", token()), DirRootfs::new());
    other.set_warm_pool_size(0);
    assert!(other.list().await.expect("list").is_empty());
    assert_eq!(other.inspect(&spec.id).await.expect("inspect"), None);
    other
        .destroy(&spec.id)
        .await
        .expect("destroy of a foreign id");
    assert_eq!(sh(&agent, "echo still").await.stdout, "still\n");
    // A sandbox whose PID 1 died shows as not running, and is still removed.
    let state = fx.provider.sandbox_state(&spec.id).expect("state");
    let pid = state.pid.expect("pid");
    // SAFETY: signalling the sandbox this test created.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    let deadline = Instant::now() + Duration::from_secs(10);
    while fx
        .provider
        .inspect(&spec.id)
        .await
        .expect("inspect")
        .is_some_and(|i| i.running)
    {
        assert!(Instant::now() < deadline, "still running after SIGKILL");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let info = fx
        .provider
        .inspect(&spec.id)
        .await
        .expect("inspect")
        .expect("known");
    assert!(!info.running);
    fx.provider.destroy(&spec.id).await.expect("destroy");
    assert_gone(&fx, &spec.id, pid, &state.extra.cgroups);
}

/// Environment variable that turns [`creator_process`] into a short-lived
/// server for [`sandboxes_survive_a_sigkilled_server`].
const CREATOR_ENV: &str = "STACYVM_NATIVE_TEST_CREATOR";

/// Child side of [`sandboxes_survive_a_sigkilled_server`]: creates one
/// sandbox (with a pre-started one parked), says so, and waits to be killed.
/// Without the variable it has nothing to do.
#[test]
fn creator_process() {
    let Ok(args) = std::env::var(CREATOR_ENV) else {
        return;
    };
    let parts: Vec<&str> = args.split('|').collect();
    let [dir, instance, id, run_dir] = parts[..] else {
        panic!("bad {CREATOR_ENV}: {args}");
    };
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async {
        let rootfs = test_rootfs();
        let provider = Fixture::provider_for(
            Path::new(dir),
            instance,
            DirRootfs::new().with_image(IMAGE, &rootfs.dir, rootfs.env.clone()),
        );
        provider.set_warm_pool_size(1);
        assert!(provider.wait_warm_pool(Duration::from_secs(20)).await);
        let spec = stacyvm_providers::SandboxSpec {
            id: id.to_string(),
            image: IMAGE.to_string(),
            memory_mb: 128,
            vcpus: 1,
            pids_limit: 64,
            network: NetworkMode::None,
            env: Default::default(),
            run_dir: PathBuf::from(run_dir),
            agent_binary: agent_binary(),
            start_timeout: Duration::from_secs(15),
        };
        provider.create(&spec).await.expect("create");
        assert!(provider.wait_warm_pool(Duration::from_secs(20)).await);
        println!("CREATED {id}");
        tokio::time::sleep(Duration::from_secs(120)).await;
    });
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_survive_a_sigkilled_server() {
    let fx = Fixture::new();
    fx.provider.set_warm_pool_size(0);
    let spec = fx.spec();
    let exe = std::env::current_exe().expect("test binary");
    let mut child = Command::new(exe)
        .args([
            "--exact",
            "creator_process",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(
            CREATOR_ENV,
            format!(
                "{}|{}|{}|{}",
                fx.dir.display(),
                fx.instance,
                spec.id,
                spec.run_dir.display()
            ),
        )
        .stdout(Stdio::piped())
        .spawn()
        .expect("spawn the creator");
    /// Kills the creator if the test fails before it does.
    struct KillOnDrop(std::process::Child);
    impl Drop for KillOnDrop {
        fn drop(&mut self) {
            let _ = self.0.kill();
            let _ = self.0.wait();
        }
    }
    let stdout = child.stdout.take().expect("stdout");
    let mut child = KillOnDrop(child);
    let id = spec.id.clone();
    let created = tokio::task::spawn_blocking(move || {
        BufReader::new(stdout)
            .lines()
            .map_while(Result::ok)
            .any(|l| l.contains(&format!("CREATED {id}")))
    });
    let created = tokio::time::timeout(Duration::from_secs(120), created)
        .await
        .expect("the creator took too long")
        .expect("reader");
    assert!(created, "the creator did not create the sandbox");
    child.0.kill().expect("SIGKILL the creator");
    child.0.wait().expect("reap the creator");

    // A new server over the same state: the sandbox is there and answers.
    let restarted = Fixture::provider_for(
        &fx.dir,
        &fx.instance,
        DirRootfs::new().with_image(IMAGE, &fx.rootfs.dir, fx.rootfs.env.clone()),
    );
    restarted.set_warm_pool_size(0);
    let list = restarted.list().await.expect("list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert!(list[0].running && list[0].sandbox_id == spec.id, "{list:?}");
    let agent = AgentClient::new(spec.socket_path());
    assert_eq!(sh(&agent, "echo reattached").await.stdout, "reattached\n");
    // The pre-started sandbox parked in the dead server ended by itself and
    // its leftovers are swept by the next provider. (The sandbox itself was
    // made from a pre-started one too: its cgroups carry that slot's name.)
    let state = restarted.sandbox_state(&spec.id).expect("state");
    let own_leaf = state.extra.cgroup_leaf.clone();
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let parked: Vec<PathBuf> = leaves(&restarted)
            .into_iter()
            .filter(|p| {
                p.file_name()
                    .is_some_and(|n| n.to_string_lossy() != own_leaf)
            })
            .collect();
        let busy = parked.iter().any(|p| {
            std::fs::read_to_string(p.join("cgroup.procs")).is_ok_and(|s| !s.trim().is_empty())
        });
        if !busy {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "parked sandbox still alive: {parked:?}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let swept = Fixture::provider_for(&fx.dir, &fx.instance, DirRootfs::new());
    swept.set_warm_pool_size(0);
    let left: Vec<PathBuf> = leaves(&swept)
        .into_iter()
        .filter(|p| {
            p.file_name()
                .is_some_and(|n| n.to_string_lossy() != own_leaf)
        })
        .collect();
    assert!(left.is_empty(), "leftover cgroups: {left:?}");
    let dirs: Vec<String> = std::fs::read_dir(swept.state_dir())
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pool-"))
        .collect();
    assert!(dirs.is_empty(), "leftover parked state: {dirs:?}");
    restarted.destroy(&spec.id).await.expect("destroy");
    assert_gone(&fx, &spec.id, state.pid.expect("pid"), &state.extra.cgroups);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_probe_passes_and_is_cached() {
    let fx = Fixture::new();
    let t = Instant::now();
    fx.provider.health().await.expect("health");
    let first = t.elapsed();
    let t = Instant::now();
    fx.provider.health().await.expect("health");
    let second = t.elapsed();
    eprintln!("health: probe {first:?}, cached {second:?}");
    assert!(second < Duration::from_millis(50), "{second:?}");
    // A provider whose init executable does not run the init fails clearly.
    let broken = NativeProvider::new(stacyvm_native::NativeOptions {
        state_dir: fx.dir.join("broken-state"),
        instance_id: format!("broken{}", token()),
        init_exe: PathBuf::from("/bin/true"),
        init_args: Vec::new(),
        rootfs: std::sync::Arc::new(DirRootfs::new()),
    })
    .expect("provider");
    broken.set_warm_pool_size(0);
    match broken.health().await {
        Err(ProviderError::Unavailable { message, .. }) => {
            assert!(message.contains("sandbox_init_main"), "{message}")
        }
        other => panic!("expected Unavailable, got {other:?}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_warm_pool_refills_and_is_removed_with_the_provider() {
    let fx = Fixture::new();
    let dir = fx.dir.clone();
    let instance = format!("pool{}", token());
    let provider = Fixture::provider_for(
        &dir,
        &instance,
        DirRootfs::new().with_image(IMAGE, &fx.rootfs.dir, fx.rootfs.env.clone()),
    );
    provider.set_warm_pool_size(3);
    assert!(provider.wait_warm_pool(Duration::from_secs(20)).await);
    assert_eq!(provider.warm_pool_len(), 3);
    let spec = fx.spec();
    provider.create(&spec).await.expect("create");
    assert!(provider.wait_warm_pool(Duration::from_secs(20)).await);
    provider.destroy(&spec.id).await.expect("destroy");
    let parked = leaves(&provider);
    assert!(!parked.is_empty());
    let instance_dirs: Vec<PathBuf> = parked
        .iter()
        .filter_map(|p| p.parent().map(Path::to_path_buf))
        .collect();
    let state_dir = provider.state_dir().to_path_buf();
    drop(provider);
    for p in parked.iter().chain(&instance_dirs) {
        assert!(
            !p.exists(),
            "{} left after the provider was dropped",
            p.display()
        );
    }
    let dirs: Vec<String> = std::fs::read_dir(&state_dir)
        .expect("state dir")
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .filter(|n| n.starts_with(".pool-"))
        .collect();
    assert!(dirs.is_empty(), "parked state left: {dirs:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_to_ready_timings() {
    let fx = Fixture::new();
    fx.provider.health().await.expect("health");
    let runs = 20;
    for warm in [false, true] {
        fx.provider.set_warm_pool_size(if warm { 2 } else { 0 });
        let mut create = Vec::new();
        let mut destroy = Vec::new();
        for _ in 0..runs {
            if warm {
                assert!(fx.provider.wait_warm_pool(Duration::from_secs(20)).await);
            }
            let spec = fx.spec();
            let t = Instant::now();
            let agent = fx.sandbox(&spec).await;
            create.push(t.elapsed());
            assert_eq!(sh(&agent, "echo up").await.stdout, "up\n");
            let t = Instant::now();
            fx.provider.destroy(&spec.id).await.expect("destroy");
            destroy.push(t.elapsed());
        }
        create.sort();
        destroy.sort();
        eprintln!(
            "native create→ready ({}, {runs} runs): p50 {:.2} ms, p99 {:.2} ms, min {:.2} ms; destroy p50 {:.2} ms, p99 {:.2} ms",
            if warm { "pre-started" } else { "cold" },
            percentile(&create, 0.5).as_secs_f64() * 1e3,
            percentile(&create, 0.99).as_secs_f64() * 1e3,
            create[0].as_secs_f64() * 1e3,
            percentile(&destroy, 0.5).as_secs_f64() * 1e3,
            percentile(&destroy, 0.99).as_secs_f64() * 1e3,
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_footprint() {
    let n: usize = std::env::var("STACYVM_NATIVE_FOOTPRINT_N")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let fx = Fixture::new();
    fx.provider.set_warm_pool_size(0);
    let meminfo = |key: &str| -> u64 {
        std::fs::read_to_string("/proc/meminfo")
            .unwrap_or_default()
            .lines()
            .find_map(|l| l.strip_prefix(key))
            .and_then(|v| v.split_whitespace().next()?.parse().ok())
            .unwrap_or(0)
    };
    // Let the previous tests' teardown settle a little.
    tokio::time::sleep(Duration::from_millis(500)).await;
    let avail_before = meminfo("MemAvailable:");
    let slab_before = meminfo("Slab:");
    let mut specs = Vec::new();
    for _ in 0..n {
        let mut spec = fx.spec();
        spec.memory_mb = 64;
        fx.sandbox(&spec).await;
        specs.push(spec);
    }
    tokio::time::sleep(Duration::from_millis(1500)).await;
    let avail_after = meminfo("MemAvailable:");
    let slab_after = meminfo("Slab:");
    let mut rss = 0u64;
    let mut pss = 0u64;
    let mut cg = 0u64;
    for spec in &specs {
        let state = fx.provider.sandbox_state(&spec.id).expect("state");
        let pid = state.pid.expect("pid");
        let rollup =
            std::fs::read_to_string(format!("/proc/{pid}/smaps_rollup")).unwrap_or_default();
        let field = |k: &str| {
            rollup
                .lines()
                .find_map(|l| l.strip_prefix(k))
                .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
                .unwrap_or(0)
        };
        rss += field("Rss:");
        pss += field("Pss:");
        cg += state
            .extra
            .cgroups
            .iter()
            .find_map(|d| {
                std::fs::read_to_string(d.join("memory.usage_in_bytes"))
                    .or_else(|_| std::fs::read_to_string(d.join("memory.current")))
                    .ok()
            })
            .and_then(|s| s.trim().parse::<u64>().ok())
            .unwrap_or(0);
    }
    let n64 = n as u64;
    eprintln!(
        "idle footprint over {n} sandboxes, per sandbox: agent RSS {} KiB, PSS {} KiB, \
         cgroup memory {} KiB, host MemAvailable drop {} KiB, slab growth {} KiB",
        rss / n64,
        pss / n64,
        cg / n64 / 1024,
        avail_before.saturating_sub(avail_after) / n64,
        slab_after.saturating_sub(slab_before) / n64
    );
    for spec in &specs {
        fx.provider.destroy(&spec.id).await.expect("destroy");
    }
}
