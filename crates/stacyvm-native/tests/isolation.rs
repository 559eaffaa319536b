//! What a sandbox can see and do: processes, files, network, kernel
//! interfaces, writes, and resource limits. Everything runs against the real
//! kernel with the real agent.

mod common;

use common::*;
use std::time::{Duration, Instant};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sees_only_its_own_processes() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let r = sh(
        &agent,
        "cat /proc/1/cmdline | tr '\\0' ' '; echo; ls /proc | grep -c '^[0-9]'",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let mut lines = r.stdout.lines();
    assert_eq!(lines.next(), Some("/.stacyvm/stacyvm-agent "));
    let count: usize = lines
        .next()
        .and_then(|l| l.trim().parse().ok())
        .unwrap_or(999);
    // The agent, the shell, ls and grep (and maybe tr).
    assert!(count <= 6, "the sandbox sees {count} processes: {r:?}");
    // The host's PID 1 is not visible as such.
    let host_init = std::fs::read_to_string("/proc/1/cmdline").unwrap_or_default();
    let inside = sh(&agent, "cat /proc/*/cmdline 2>/dev/null | tr '\\0' ' '").await;
    let host_init = host_init.split('\0').next().unwrap_or_default();
    assert!(
        host_init.is_empty() || !inside.stdout.contains(host_init),
        "host init {host_init:?} visible: {}",
        inside.stdout
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_read_host_files() {
    let fx = Fixture::new();
    let secret_name = format!("stacyvm-host-secret-{}", token());
    let secret = std::env::temp_dir().join(&secret_name);
    std::fs::write(&secret, "top secret").expect("host file");
    let _cleanup = scopeguard(secret.clone());
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let r = sh(
        &agent,
        &format!(
            "find / -path /proc -prune -o -path /sys -prune -o -name '{secret_name}' -print 2>/dev/null; \
             cat {} 2>&1; echo rc=$?",
            secret.display()
        ),
    )
    .await;
    assert!(!r.stdout.contains("top secret"), "{r:?}");
    assert!(
        !r.stdout.lines().any(|l| l.ends_with(&secret_name)),
        "host file found inside: {r:?}"
    );
    assert!(r.stdout.contains("rc=1"), "{r:?}");
    // The state directory and the image cache are not reachable either.
    let r = sh(
        &agent,
        &format!(
            "ls {} {} 2>&1; echo rc=$?",
            fx.provider.state_dir().display(),
            fx.rootfs.dir.display()
        ),
    )
    .await;
    assert!(r.stdout.contains("rc=2"), "{r:?}");
}

/// Removes a host file when dropped.
struct FileGuard(std::path::PathBuf);
impl Drop for FileGuard {
    fn drop(&mut self) {
        let _ = std::fs::remove_file(&self.0);
    }
}
fn scopeguard(p: std::path::PathBuf) -> FileGuard {
    FileGuard(p)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn has_only_loopback() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let r = sh(&agent, "ls /sys/class/net; tail -n +3 /proc/net/dev | cut -d: -f1 | tr -d ' '; cat /sys/class/net/lo/flags").await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    let lines: Vec<&str> = r.stdout.lines().collect();
    assert_eq!(lines, ["lo", "lo", "0x9"], "{r:?}");
    // Loopback works (bound to 127.0.0.1 inside the sandbox's own netns).
    let r = sh(
        &agent,
        "python3 -c \"import socket; s=socket.socket(); s.bind(('127.0.0.1', 0)); s.listen(); \
         c=socket.create_connection(s.getsockname()); a,_=s.accept(); c.sendall(b'ping'); print(a.recv(4).decode())\"",
    )
    .await;
    assert_eq!(r.stdout.trim(), "ping", "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cannot_mount_load_modules_or_rename_the_host() {
    let fx = Fixture::new();
    let host_name_before = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let r = sh(
        &agent,
        "mkdir -p /mnt/x; mount -t tmpfs none /mnt/x 2>&1; echo rc=$?",
    )
    .await;
    assert!(!r.stdout.contains("rc=0"), "mount worked: {r:?}");
    // finit_module, init_module, delete_module, kexec_load, reboot, swapon,
    // unshare(CLONE_NEWUSER), setns, keyctl, bpf: every one refused.
    let r = sh(
        &agent,
        "python3 -c \"
import ctypes
l = ctypes.CDLL(None, use_errno=True)
for name, nr, args in [('finit_module', 313, (-1, b'', 0)), ('init_module', 175, (0, 0, b'')),
                       ('delete_module', 176, (b'ext4', 0)), ('kexec_load', 246, (0, 0, 0, 0)),
                       ('reboot', 169, (0, 0, 0, 0)), ('swapon', 167, (b'/x', 0)),
                       ('unshare_user', 272, (0x10000000,)), ('setns', 308, (0, 0)),
                       ('keyctl', 250, (0, 0)), ('bpf', 321, (0, 0, 0)), ('pivot_root', 155, (b'/', b'/')),
                       ('umount2', 166, (b'/proc', 2)), ('sethostname', 170, (b'evil', 4))]:
    r = l.syscall(nr, *args)
    print(name, r, ctypes.get_errno())
\"",
    )
    .await;
    assert_eq!(r.exit_code, 0, "{r:?}");
    for line in r.stdout.lines() {
        assert!(
            line.ends_with(" -1 1"),
            "not refused with EPERM: {line} ({r:?})"
        );
    }
    assert_eq!(r.stdout.lines().count(), 13, "{r:?}");
    let r = sh(&agent, "hostname evil 2>&1; echo rc=$?; hostname").await;
    assert!(!r.stdout.contains("rc=0"), "{r:?}");
    assert_eq!(
        r.stdout.lines().last(),
        Some(spec.id.replace('_', "-").as_str())
    );
    let host_name_after = std::fs::read_to_string("/proc/sys/kernel/hostname").expect("hostname");
    assert_eq!(host_name_before, host_name_after);
    // Kernel knobs are read-only, secrets masked, privileges minimal.
    let r = sh(
        &agent,
        "echo 1 > /proc/sys/vm/drop_caches 2>&1; echo rc=$?; touch /sys/kernel/x 2>&1; echo rc=$?; \
         wc -c < /proc/keys; grep -E '^(CapEff|CapBnd|CapInh|CapAmb|NoNewPrivs|Seccomp):' /proc/self/status",
    )
    .await;
    let out = r.stdout.replace('\t', " ");
    assert_eq!(out.matches("rc=0").count(), 0, "{r:?}");
    for want in [
        "CapInh: 0000000000000000",
        "CapEff: 00000000000004fb",
        "CapBnd: 00000000000004fb",
        "CapAmb: 0000000000000000",
        "NoNewPrivs: 1",
        "Seccomp: 2",
    ] {
        assert!(out.contains(want), "missing {want:?} in {out}");
    }
    assert!(
        out.lines().any(|l| l.trim() == "0"),
        "/proc/keys not masked: {out}"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn writes_stay_in_their_sandbox() {
    let fx = Fixture::new();
    let a = fx.spec();
    let b = fx.spec();
    let agent_a = fx.sandbox(&a).await;
    let agent_b = fx.sandbox(&b).await;
    let r = sh(
        &agent_a,
        "echo mine > /etc/stacyvm-marker && rm /etc/debian_version && echo t > /tmp/t && echo w > /workspace/w && echo ok",
    )
    .await;
    assert_eq!(r.stdout, "ok\n", "{r:?}");
    let r = sh(
        &agent_b,
        "test ! -e /etc/stacyvm-marker && test -e /etc/debian_version && test ! -e /tmp/t && test ! -e /workspace/w && echo clean",
    )
    .await;
    assert_eq!(r.stdout, "clean\n", "{r:?}");
    // The image is untouched; the writes are in A's upper layer.
    assert!(!fx.rootfs.dir.join("etc/stacyvm-marker").exists());
    assert!(fx.rootfs.dir.join("etc/debian_version").exists());
    let upper = fx.provider.state_dir().join(&a.id).join("upper");
    assert_eq!(
        std::fs::read_to_string(upper.join("etc/stacyvm-marker"))
            .ok()
            .as_deref(),
        Some("mine\n")
    );
    // Files written through the agent land in the sandbox too.
    agent_a
        .write_bytes(
            "/workspace/file.txt",
            None,
            bytes::Bytes::from_static(b"data"),
        )
        .await
        .expect("write");
    let r = sh(&agent_a, "cat /workspace/file.txt").await;
    assert_eq!(r.stdout, "data");
    let r = sh(&agent_b, "cat /workspace/file.txt 2>&1; echo rc=$?").await;
    assert!(r.stdout.contains("rc=1"), "{r:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_hog_is_oom_killed_inside_the_sandbox() {
    let fx = Fixture::new();
    let mut spec = fx.spec();
    spec.memory_mb = 64;
    let agent = fx.sandbox(&spec).await;
    let t = Instant::now();
    let r = sh(
        &agent,
        "python3 -c 'a = bytearray(256 * 1024 * 1024); print(len(a))'",
    )
    .await;
    assert_eq!(r.exit_code, 137, "the hog was not SIGKILLed: {r:?}");
    eprintln!("hog killed after {:?}", t.elapsed());
    // The agent survived and answers.
    let r = sh(&agent, "echo alive").await;
    assert_eq!(r.stdout, "alive\n");
    let stats = agent.stats().await.expect("stats");
    assert_eq!(stats.mem_limit_bytes, 64 << 20, "{stats:?}");
    // The kill was the sandbox cgroup's own OOM kill.
    let state = fx.provider.sandbox_state(&spec.id).expect("state");
    let mem = state
        .extra
        .cgroups
        .iter()
        .find(|d| d.join("memory.oom_control").exists() || d.join("memory.events").exists())
        .expect("memory cgroup");
    let events = std::fs::read_to_string(mem.join("memory.oom_control"))
        .or_else(|_| std::fs::read_to_string(mem.join("memory.events")))
        .expect("oom counters");
    let kills: u64 = events
        .lines()
        .find_map(|l| l.strip_prefix("oom_kill "))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0);
    assert!(kills >= 1, "no OOM kill recorded: {events}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn fork_bomb_is_held_by_the_pids_limit() {
    let fx = Fixture::new();
    let mut bombed = fx.spec();
    bombed.pids_limit = 64;
    let other = fx.spec();
    let agent_bombed = fx.sandbox(&bombed).await;
    let agent_other = fx.sandbox(&other).await;
    let pids_dir = fx
        .provider
        .sandbox_state(&bombed.id)
        .expect("state")
        .extra
        .cgroups
        .into_iter()
        .find(|d| d.join("pids.max").exists())
        .expect("pids cgroup");
    assert_eq!(
        std::fs::read_to_string(pids_dir.join("pids.max"))
            .ok()
            .as_deref(),
        Some("64\n")
    );
    // Every process keeps forking (and retrying when refused), so the
    // sandbox sits at its limit until the exec times out.
    let bomb = tokio::spawn(async move {
        let r = sh_timeout(
            &agent_bombed,
            "python3 -c 'import os, time\nwhile True:\n    try:\n        os.fork()\n    except OSError:\n        time.sleep(0.01)\n'",
            4000,
        )
        .await;
        (agent_bombed, r)
    });
    let mut peak = 0u64;
    let sample_until = Instant::now() + Duration::from_millis(1500);
    while Instant::now() < sample_until {
        let current: u64 = std::fs::read_to_string(pids_dir.join("pids.current"))
            .ok()
            .and_then(|s| s.trim().parse().ok())
            .unwrap_or(0);
        assert!(current <= 64, "pids.current {current} above the limit");
        peak = peak.max(current);
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    assert!(peak >= 60, "the bomb never reached the limit (peak {peak})");
    let current = peak;
    // The other sandbox still answers promptly.
    let t = Instant::now();
    let r = sh(&agent_other, "echo fine").await;
    let took = t.elapsed();
    assert_eq!(r.stdout, "fine\n");
    assert!(
        took < Duration::from_secs(3),
        "exec took {took:?} during the bomb"
    );
    eprintln!("exec in the other sandbox during the bomb: {took:?} (pids.current {current})");
    let (agent_bombed, r) = bomb.await.expect("bomb task");
    assert!(r.timed_out, "the bomb's exec should have timed out: {r:?}");
    // After the bomb's exec timed out, its sandbox recovers.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        if agent_bombed.health().await.is_ok() {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "the bombed sandbox's agent does not answer"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sees_its_limits_and_a_private_dev() {
    let fx = Fixture::new();
    let mut spec = fx.spec();
    spec.memory_mb = 128;
    spec.vcpus = 2;
    let agent = fx.sandbox(&spec).await;
    let stats = agent.stats().await.expect("stats");
    assert_eq!(stats.mem_limit_bytes, 128 << 20, "{stats:?}");
    let state = fx.provider.sandbox_state(&spec.id).expect("state");
    let quota = state.extra.cgroups.iter().find_map(|d| {
        std::fs::read_to_string(d.join("cpu.cfs_quota_us"))
            .or_else(|_| std::fs::read_to_string(d.join("cpu.max")))
            .ok()
    });
    let quota = quota.expect("cpu quota file");
    assert!(quota.starts_with("200000"), "cpu quota {quota:?}");
    let r = sh(&agent, "ls /dev | tr '\\n' ' '; echo; head -c 4 /dev/urandom | wc -c; echo x > /dev/null && echo null-ok").await;
    assert_eq!(
        r.stdout.lines().next(),
        Some("fd full mqueue null ptmx pts random shm stderr stdin stdout tty urandom zero "),
        "{r:?}"
    );
    assert!(
        r.stdout.contains("\n4\n") && r.stdout.contains("null-ok"),
        "{r:?}"
    );
}
