//! The proot provider against the real `proot`, the real static agent and
//! the test image: lifecycle, exec, files, path translation (the sandbox must
//! only ever see its own root), process cleanup, restarts, previews.

mod common;

use bytes::Bytes;
use common::*;
use http_body_util::BodyExt;
use stacyvm_agent_proto::ExecRequest;
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::{caps, Isolation, Provider, ProviderError};
use std::time::{Duration, Instant};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn lifecycle_exec_files_and_destroy() {
    let fx = Fixture::new();
    let p = &fx.provider;
    assert_eq!(p.name(), "proot");
    assert_eq!(p.isolation(), Isolation::Ptrace);
    assert_eq!(
        p.capabilities(),
        [caps::EXEC, caps::FILES, caps::STREAMING, caps::PREVIEW]
    );
    p.health().await.expect("health");

    // Default limits (memory, vCPUs, pids, network none) must not fail it.
    let spec = fx.spec();
    let t0 = Instant::now();
    let info = p.create(&spec).await.expect("create");
    let first = t0.elapsed();
    assert!(info.running);
    assert_eq!(info.sandbox_id, spec.id);
    let agent = AgentClient::new(spec.socket_path());

    // Exec: exit codes, output, environment.
    let r = sh(&agent, "echo out; echo err >&2; exit 7").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (7, "out\n", "err\n")
    );
    assert_eq!(
        sh_ok(&agent, "echo $STACYVM_TEST $HOME").await,
        "yes /root\n"
    );
    assert_eq!(
        sh_ok(&agent, "cat /etc/debian_version").await,
        std::fs::read_to_string(fx.rootfs(&spec.id).join("etc/debian_version")).unwrap()
    );
    assert_eq!(sh_ok(&agent, "python3 -c 'print(6*7)'").await, "42\n");
    let r = agent
        .exec(&ExecRequest {
            argv: vec!["/no/such/program".into()],
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!(r.exit_code, 127, "{r:?}");
    let r = agent
        .exec(&ExecRequest {
            argv: vec!["sleep".into(), "30".into()],
            timeout_ms: 300,
            ..Default::default()
        })
        .await
        .expect("exec");
    assert!(r.timed_out, "{r:?}");

    // Files: write, read, list, stat, rename, chmod, delete.
    agent
        .write_bytes(
            "/workspace/a.txt",
            Some("640"),
            Bytes::from_static(b"hello proot"),
        )
        .await
        .expect("write");
    let (body, _) = agent.read_file("/workspace/a.txt").await.expect("read");
    let got = body.collect().await.expect("body").to_bytes();
    assert_eq!(&got[..], b"hello proot");
    assert_eq!(sh_ok(&agent, "cat /workspace/a.txt").await, "hello proot");
    assert_eq!(
        agent.stat("/workspace/a.txt").await.expect("stat").mode,
        "640"
    );
    agent
        .rename("/workspace/a.txt", "/workspace/b.txt")
        .await
        .expect("rename");
    let names: Vec<String> = agent
        .list("/workspace")
        .await
        .expect("list")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["b.txt"]);
    agent.chmod("/workspace/b.txt", "755").await.expect("chmod");
    assert_eq!(sh_ok(&agent, "stat -c %a /workspace/b.txt").await, "755\n");
    sh_ok(&agent, "mkdir -p /workspace/d/e && touch /workspace/d/e/f").await;
    agent.delete("/workspace/d", true).await.expect("delete");
    assert_eq!(sh(&agent, "test -e /workspace/d").await.exit_code, 1);
    // What the sandbox wrote is in its own root on the host.
    assert_eq!(
        std::fs::read(fx.rootfs(&spec.id).join("workspace/b.txt")).unwrap(),
        b"hello proot"
    );

    // A second sandbox reuses the flattened image.
    let spec2 = fx.spec();
    let t1 = Instant::now();
    let agent2 = fx.sandbox(&spec2).await;
    let second = t1.elapsed();
    assert_eq!(sh(&agent2, "test -e /workspace/b.txt").await.exit_code, 1);
    eprintln!(
        "create to agent ready: first (flattens the image) {} ms, second {} ms",
        first.as_millis(),
        second.as_millis()
    );
    let logs = p.logs(&spec.id, 50).await;
    assert!(
        logs.iter().any(|l| l.contains("stacyvm-agent")),
        "agent log: {logs:?}"
    );

    // Destroy: no process, no directory, idempotent.
    let state_dir = p.state_dir().join(&spec.id);
    p.destroy(&spec.id).await.expect("destroy");
    assert!(!state_dir.exists());
    assert!(p.inspect(&spec.id).await.expect("inspect").is_none());
    assert!(processes_below(&state_dir).is_empty());
    p.destroy(&spec.id).await.expect("second destroy");
    assert!(agent.health().await.is_err());
    let ids: Vec<String> = p
        .list()
        .await
        .unwrap()
        .into_iter()
        .map(|i| i.sandbox_id)
        .collect();
    assert_eq!(ids, std::slice::from_ref(&spec2.id));
    p.destroy(&spec2.id).await.expect("destroy 2");
    let leftovers = p.state_dir().to_path_buf();
    assert!(
        eventually(Duration::from_secs(10), || {
            std::fs::read_dir(&leftovers)
                .unwrap()
                .flatten()
                .next()
                .is_none()
        })
        .await,
        "sandbox files left in {}",
        leftovers.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sandboxes_see_only_their_own_root() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let root = fx.rootfs(&spec.id);
    let tok = token();

    // A path that exists only on the host, and one only in the sandbox.
    let host_only = format!("/tmp/svp-host-only-{tok}");
    std::fs::create_dir(&host_only).unwrap();
    let _cleanup = RemoveOnDrop(host_only.clone().into());
    let root_only = format!("/tmp/svp-root-only-{tok}");
    sh_ok(&agent, &format!("mkdir {root_only} && touch {root_only}/f")).await;
    assert!(root.join(root_only.trim_start_matches('/')).is_dir());
    assert!(!std::path::Path::new(&root_only).exists());
    // proot itself is on the host but not in the image.
    assert!(std::path::Path::new("/usr/bin/proot").exists());
    assert!(!root.join("usr/bin/proot").exists());

    // coreutils (statx), shell builtins and python (newfstatat).
    for (cmd, want) in [
        (format!("ls -d {root_only}"), 0),
        (format!("ls -d {host_only}"), 2),
        ("ls -d /usr/bin/proot".to_string(), 2),
        (format!("stat -c %n {root_only}/f"), 0),
        (format!("stat {host_only}"), 1),
        (format!("test -e {root_only}"), 0),
        (format!("test -e {host_only}"), 1),
        (format!("test -d {host_only}"), 1),
        ("[ -x /usr/bin/proot ]".to_string(), 1),
        (format!("find {root_only} -name f | grep -q f"), 0),
        (format!("du -s {host_only}"), 1),
        (format!("realpath -e {host_only}"), 1),
        (format!("cd {host_only}"), 2),
    ] {
        let r = sh(&agent, &cmd).await;
        assert_eq!(r.exit_code, want, "{cmd}: {r:?}");
    }
    // The command that first showed the problem: a new top-level directory.
    sh_ok(
        &agent,
        "mkdir /workspace2 && ls -d /workspace2 && stat /workspace2 >/dev/null",
    )
    .await;
    assert!(root.join("workspace2").is_dir());
    assert!(!std::path::Path::new("/workspace2").exists());

    // mv (renameat2) inside the root only.
    sh_ok(
        &agent,
        &format!("mv {root_only}/f {root_only}/g && ls {root_only}/g"),
    )
    .await;
    assert!(root
        .join(root_only.trim_start_matches('/'))
        .join("g")
        .is_file());
    let r = sh(&agent, &format!("mv {host_only} /tmp/svp-moved-{tok}")).await;
    assert_ne!(r.exit_code, 0, "{r:?}");
    assert!(std::path::Path::new(&host_only).is_dir());

    // Python: stat, exists, access, rename, scandir, relative paths, threads
    // (a chdir in one thread is seen by the others).
    let py = format!(
        r#"
import os, threading
assert os.path.isdir("{root_only}")
assert not os.path.exists("{host_only}")
assert not os.access("/usr/bin/proot", os.F_OK)
assert not os.access("{host_only}", os.F_OK, effective_ids=True)
os.stat("{root_only}/g")
try:
    os.stat("{host_only}")
    raise SystemExit("host path visible")
except FileNotFoundError:
    pass
os.rename("{root_only}/g", "{root_only}/h")
assert sorted(os.listdir("{root_only}")) == ["h"]
def move():
    os.chdir("{root_only}")
t = threading.Thread(target=move); t.start(); t.join()
assert os.getcwd() == "{root_only}", os.getcwd()
assert os.path.exists("h")
import subprocess
out = subprocess.run(["ls", "-d", "{root_only}/h", "{host_only}"], capture_output=True, text=True)
assert out.returncode == 2 and out.stdout == "{root_only}/h\n", out
print("ok")
"#
    );
    let r = agent
        .exec(&ExecRequest {
            argv: vec!["python3".into(), "-c".into(), py],
            workdir: "/".into(),
            timeout_ms: 60_000,
            ..Default::default()
        })
        .await
        .expect("exec");
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "ok\n"), "{r:?}");

    // The agent's own file API: the sandbox's root, both ways.
    agent
        .stat(&format!("{root_only}/h"))
        .await
        .expect("stat in root");
    assert!(
        agent.stat(&host_only).await.is_err(),
        "the agent sees a host path"
    );
    assert!(agent.stat("/usr/bin/proot").await.is_err());
    assert!(agent.list(&host_only).await.is_err());
    let listed: Vec<String> = agent
        .list("/tmp")
        .await
        .expect("list /tmp")
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert!(
        listed.iter().any(|n| n.starts_with("svp-root-only-")),
        "{listed:?}"
    );
    assert!(
        !listed.iter().any(|n| n.starts_with("svp-host-only-")),
        "{listed:?}"
    );
    let written = format!("/tmp/svp-written-{tok}");
    agent
        .write_bytes(&written, None, Bytes::from_static(b"inside"))
        .await
        .expect("write");
    assert_eq!(
        std::fs::read(root.join(written.trim_start_matches('/'))).unwrap(),
        b"inside"
    );
    assert!(!std::path::Path::new(&written).exists());
    agent
        .rename(&written, &format!("{written}-2"))
        .await
        .expect("rename");
    assert!(root
        .join(format!("{}-2", written.trim_start_matches('/')))
        .is_file());
    assert!(agent.delete(&host_only, true).await.is_err());
    assert!(std::path::Path::new(&host_only).is_dir());
    // glob walks the root too.
    let found = agent.glob("/tmp/svp-*").await.expect("glob");
    assert!(found.iter().all(|p| !p.contains("host-only")), "{found:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_kills_every_process_of_the_sandbox() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    // Distinct durations identify this test's processes on the host.
    let base = 100_000 + (std::process::id() % 50_000) * 10;
    let (a, b, c, d) = (base + 1, base + 2, base + 3, base + 4);
    sh_ok(
        &agent,
        &format!(
            "sleep {a} >/dev/null 2>&1 & \
             setsid sleep {b} >/dev/null 2>&1 & \
             (setsid sh -c 'sleep {c} >/dev/null 2>&1 &' &) ; \
             nohup python3 -c 'import os,time; os.setsid(); os.fork() or time.sleep({d})' >/dev/null 2>&1 & \
             sleep 0.5"
        ),
    )
    .await;
    for n in [a, b, c, d] {
        assert!(
            process_appears(&n.to_string()).await,
            "background process {n} did not start"
        );
    }
    let dir = fx.provider.state_dir().join(&spec.id);
    let loader = fx
        .provider
        .sandbox_state(&spec.id)
        .and_then(|s| s.extra.loader);
    fx.provider.destroy(&spec.id).await.expect("destroy");
    if let Some(l) = &loader {
        assert!(processes_below(l).is_empty());
    }
    for n in [a, b, c, d] {
        let left = processes_with(&n.to_string());
        assert!(left.is_empty(), "left running after destroy: {left:?}");
    }
    assert!(processes_below(&dir).is_empty());
    assert!(!dir.exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn destroy_kills_what_is_left_when_proot_died() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    let n = 200_000 + (std::process::id() % 50_000) * 10;
    sh_ok(&agent, &format!("setsid sleep {n} >/dev/null 2>&1 &")).await;
    assert!(
        process_appears(&n.to_string()).await,
        "background process did not start"
    );
    let dir = fx.provider.state_dir().join(&spec.id);
    let loader = fx
        .provider
        .sandbox_state(&spec.id)
        .expect("state")
        .extra
        .loader
        .expect("the loader is recorded");
    assert!(
        processes_below(&loader).len() >= 2,
        "the agent and the sleep run PRoot's loader {}",
        loader.display()
    );
    // PRoot dies on its own: its tracees are released and keep running.
    let pid = fx.pid(&spec.id).await;
    // SAFETY: plain signal to the PRoot process this test started.
    assert_eq!(unsafe { libc::kill(pid, libc::SIGKILL) }, 0);
    assert!(eventually(Duration::from_secs(5), || has_exited(pid)).await);
    let info = fx
        .provider
        .inspect(&spec.id)
        .await
        .unwrap()
        .expect("inspect");
    assert!(!info.running, "{info:?}");
    assert!(
        !processes_with(&n.to_string()).is_empty(),
        "the tracees outlive PRoot"
    );
    fx.provider.destroy(&spec.id).await.expect("destroy");
    let left = processes_with(&n.to_string());
    assert!(left.is_empty(), "left running after destroy: {left:?}");
    assert!(processes_below(&dir).is_empty());
    assert!(processes_below(&loader).is_empty());
    assert!(!dir.exists());
    assert!(!loader.exists(), "the loader is removed");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restarted_server_finds_and_destroys_its_sandboxes() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    sh_ok(&agent, "touch /workspace/kept").await;
    let pid = fx.pid(&spec.id).await;

    // The server shuts down; the sandbox keeps running.
    fx.provider.shutdown().await;
    assert!(agent.health().await.is_ok());

    let again = Fixture::provider_for(&fx.dir, &fx.instance);
    let list = again.list().await.expect("list");
    assert_eq!(list.len(), 1, "{list:?}");
    assert_eq!(list[0].sandbox_id, spec.id);
    assert!(list[0].running);
    assert_eq!(list[0].runtime_id, pid.to_string());
    assert_eq!(
        sh_ok(&agent, "ls /workspace").await,
        "kept\n",
        "the sandbox survived the new provider"
    );
    // Another instance sharing the directory sees nothing and cannot remove it.
    let other = Fixture::provider_for(&fx.dir, &format!("o{}", token()));
    assert!(other.list().await.unwrap().is_empty());
    other
        .destroy(&spec.id)
        .await
        .expect("foreign destroy is a no-op");
    assert!(agent.health().await.is_ok());

    again.destroy(&spec.id).await.expect("destroy");
    assert!(again.inspect(&spec.id).await.unwrap().is_none());
    assert!(fx.provider.list().await.unwrap().is_empty());
    assert!(
        eventually(Duration::from_secs(5), || std::fs::metadata(format!(
            "/proc/{pid}"
        ))
        .is_err()
            || std::fs::read_to_string(format!("/proc/{pid}/stat")).is_ok_and(
                |s| s
                    .rsplit_once(')')
                    .is_some_and(|(_, r)| r.trim_start().starts_with('Z'))
            ))
        .await,
        "proot {pid} still runs"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_start_leaves_nothing_and_says_why() {
    let fx = Fixture::new();
    let mut spec = fx.spec();
    // An "agent" that fails at once: the error must carry the log tail.
    let fake = fx.dir.join("fake-agent");
    std::fs::write(
        &fake,
        "#!/bin/sh\necho fake-agent-refuses-to-start >&2\nexit 3\n",
    )
    .unwrap();
    std::fs::set_permissions(&fake, std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    spec.agent_binary = fake;
    let err = fx.provider.create(&spec).await.expect_err("must fail");
    assert!(matches!(err, ProviderError::AgentStart(_)), "{err:?}");
    assert!(
        err.to_string().contains("fake-agent-refuses-to-start"),
        "{err}"
    );
    let dir = fx.provider.state_dir().join(&spec.id);
    assert!(!dir.exists());
    assert!(fx.provider.list().await.unwrap().is_empty());
    assert!(processes_below(&dir).is_empty());

    // An unknown image is an image error, before anything is made.
    let mut spec = fx.spec();
    spec.image = "no/such:image".into();
    let err = fx.provider.create(&spec).await.expect_err("must fail");
    assert!(matches!(err, ProviderError::Image { .. }), "{err:?}");

    // A missing proot is a clear error when the provider is built.
    let err = stacyvm_proot::ProotProvider::new(stacyvm_proot::ProotOptions {
        state_dir: fx.dir.join("state2"),
        instance_id: "x".into(),
        proot_binary: "/nonexistent/proot".into(),
        cache_dir: None,
        rootfs: std::sync::Arc::new(Fixture::images()),
    })
    .expect_err("must fail");
    assert!(err.to_string().contains("/nonexistent/proot"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn previews_reach_the_sandbox_port() {
    let fx = Fixture::new();
    let spec = fx.spec();
    let agent = fx.sandbox(&spec).await;
    // A free port on the loopback the sandbox shares with the host.
    let port = {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        l.local_addr().unwrap().port()
    };
    sh_ok(
        &agent,
        "mkdir -p /srv/www && echo preview-body > /srv/www/index.html",
    )
    .await;
    sh_ok(
        &agent,
        &format!(
            "cd /srv/www && nohup python3 -m http.server {port} --bind 127.0.0.1 >/dev/null 2>&1 &"
        ),
    )
    .await;
    let mut tunnel = None;
    for _ in 0..100 {
        match agent.tunnel(port).await {
            Ok(t) => {
                tunnel = Some(t);
                break;
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
    let mut t = tunnel.expect("tunnel to the sandbox's port");
    t.write_all(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await
        .unwrap();
    let mut resp = Vec::new();
    tokio::time::timeout(Duration::from_secs(10), t.read_to_end(&mut resp))
        .await
        .expect("answer in time")
        .unwrap();
    let resp = String::from_utf8_lossy(&resp);
    assert!(resp.starts_with("HTTP/1.0 200"), "{resp}");
    assert!(resp.contains("preview-body"), "{resp}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_times_cold_copied_and_from_a_ready_copy() {
    use std::os::unix::fs::MetadataExt;
    // The image cache in the state directory, as in a server.
    let fx = Fixture::with_cache(None);
    let p = &fx.provider;
    // Nothing cached: flatten the image, then copy it.
    p.set_spare_roots(0);
    let (cold, cold_t) = timed(&fx, fx.spec()).await;
    // Flattened, no ready copy: copy it.
    let (copied, copied_t) = timed(&fx, fx.spec()).await;
    // A ready copy: renamed into place.
    p.set_spare_roots(1);
    p.prepare_image(IMAGE).await.expect("prepare");
    assert!(p.wait_spare_roots(Duration::from_secs(120)).await);
    let spares: Vec<_> = std::fs::read_dir(p.state_dir().join(".bases"))
        .unwrap()
        .flatten()
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .flat_map(|b| {
            std::fs::read_dir(b.path().join("spares"))
                .unwrap()
                .flatten()
        })
        .filter(|e| !e.file_name().to_string_lossy().starts_with('.'))
        .map(|e| e.metadata().unwrap().ino())
        .collect();
    assert_eq!(spares.len(), 1, "one ready copy");
    let (warm, warm_t) = timed(&fx, fx.spec()).await;
    let root_ino = std::fs::metadata(fx.rootfs(&warm.id)).unwrap().ino();
    assert_eq!(
        root_ino, spares[0],
        "the ready copy became the sandbox's root"
    );
    eprintln!(
        "create to agent ready: cold (flatten + copy) {} ms, copy {} ms, ready copy {} ms",
        cold_t.as_millis(),
        copied_t.as_millis(),
        warm_t.as_millis()
    );
    for s in [cold, copied, warm] {
        p.destroy(&s.id).await.expect("destroy");
    }
}

/// Create a sandbox, check that it answers, and return how long the create
/// took.
async fn timed(
    fx: &Fixture,
    spec: stacyvm_providers::SandboxSpec,
) -> (stacyvm_providers::SandboxSpec, Duration) {
    let t0 = Instant::now();
    let agent = fx.sandbox(&spec).await;
    let took = t0.elapsed();
    assert_eq!(sh_ok(&agent, "echo ready").await, "ready\n");
    (spec, took)
}

/// Removes a host directory when dropped.
struct RemoveOnDrop(std::path::PathBuf);

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}
