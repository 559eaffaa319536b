//! Docker provider against the local Docker daemon.
//!
//! Needs a running dockerd, the static agent binary (`STACYVM_AGENT_BIN`, or
//! the workspace's `target/x86_64-unknown-linux-gnu/{release,debug}/stacyvm-agent`)
//! and the test image (`STACYVM_TEST_IMAGE`, default
//! `stacyvm-test/python:bookworm`, built by `scripts/build-test-image.sh`).
//! Every test uses its own random instance id and removes the containers
//! carrying it when it ends, even on failure.

#[path = "../../stacyvm-native/tests/shared/mod.rs"]
mod shared;

use bollard::query_parameters::{ListContainersOptionsBuilder, RemoveContainerOptionsBuilder};
use bollard::Docker;
use shared::{agent_binary, block_on_own_runtime, sandbox_spec, token};
use stacyvm_providers::agent::AgentClient;
use stacyvm_providers::docker::{
    container_name, DockerOptions, DockerProvider, PullPolicy, LABEL_INSTANCE, LABEL_MANAGED,
    LABEL_SANDBOX,
};
use stacyvm_providers::{NetworkMode, Provider, ProviderError, SandboxSpec};
use std::collections::{BTreeMap, HashMap};
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

fn test_image() -> String {
    std::env::var("STACYVM_TEST_IMAGE").unwrap_or_else(|_| "stacyvm-test/python:bookworm".into())
}

async fn docker() -> Docker {
    Docker::connect_with_unix_defaults()
        .expect("docker socket")
        .negotiate_version()
        .await
        .expect("docker daemon answers")
}

/// One test's world: a provider with a random instance id, scratch
/// directories, and cleanup of both on drop.
struct Fixture {
    provider: DockerProvider,
    instance: String,
    dir: PathBuf,
}

impl Fixture {
    async fn new() -> Fixture {
        Self::with_pull(PullPolicy::Missing).await
    }

    async fn with_pull(pull: PullPolicy) -> Fixture {
        let instance = format!("test-{}", token());
        let dir = std::env::temp_dir().join(format!("stacyvm-dt-{}", token()));
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let provider = DockerProvider::connect(DockerOptions {
            socket: None,
            instance_id: instance.clone(),
            pull,
        })
        .await
        .expect("provider");
        Fixture {
            provider,
            instance,
            dir,
        }
    }

    /// A spec for a fresh sandbox of the test image with the real agent.
    fn spec(&self) -> SandboxSpec {
        sandbox_spec(&test_image(), &self.dir)
    }

    /// Write an executable file into the scratch dir and return its path.
    fn script(&self, name: &str, body: &str) -> PathBuf {
        let p = self.dir.join(name);
        std::fs::write(&p, body).expect("write script");
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o755)).expect("chmod");
        p
    }

    /// Ids of every container carrying this fixture's instance label.
    async fn containers(&self) -> Vec<String> {
        let filters =
            HashMap::from([("label", vec![format!("{LABEL_INSTANCE}={}", self.instance)])]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        docker()
            .await
            .list_containers(Some(opts))
            .await
            .expect("list containers")
            .into_iter()
            .filter_map(|c| c.id)
            .collect()
    }
}

impl Drop for Fixture {
    fn drop(&mut self) {
        let instance = &self.instance;
        block_on_own_runtime(async move {
            let Ok(d) = Docker::connect_with_unix_defaults() else {
                return;
            };
            let Ok(d) = d.negotiate_version().await else {
                return;
            };
            let filters = HashMap::from([("label", vec![format!("{LABEL_INSTANCE}={instance}")])]);
            let opts = ListContainersOptionsBuilder::new()
                .all(true)
                .filters(&filters)
                .build();
            for c in d.list_containers(Some(opts)).await.unwrap_or_default() {
                if let Some(id) = c.id {
                    let rm = RemoveContainerOptionsBuilder::new()
                        .force(true)
                        .v(true)
                        .build();
                    let _ = d.remove_container(&id, Some(rm)).await;
                }
            }
        });
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_applies_limits_and_agent_answers() {
    let fx = Fixture::new().await;
    let spec = fx.spec();
    let t0 = Instant::now();
    let info = fx.provider.create(&spec).await.expect("create");
    eprintln!("create -> ready: {:?}", t0.elapsed());
    assert_eq!(info.sandbox_id, spec.id);
    assert!(info.running);

    // The agent answers on the host side of the socket.
    let health = AgentClient::new(spec.socket_path())
        .health()
        .await
        .expect("agent health");
    assert_eq!(health.status, "ok");

    // What the daemon really got.
    let c = docker()
        .await
        .inspect_container(&info.runtime_id, None)
        .await
        .expect("inspect");
    assert_eq!(
        c.name.as_deref(),
        Some(format!("/{}", container_name(&spec.id)).as_str())
    );
    assert_eq!(c.state.as_ref().and_then(|s| s.running), Some(true));
    let cfg = c.config.expect("config");
    let labels = cfg.labels.expect("labels");
    assert_eq!(labels.get(LABEL_SANDBOX), Some(&spec.id));
    assert_eq!(labels.get(LABEL_INSTANCE), Some(&fx.instance));
    assert_eq!(labels.get(LABEL_MANAGED).map(String::as_str), Some("true"));
    assert_eq!(
        cfg.entrypoint,
        Some(vec![stacyvm_agent_proto::AGENT_PATH_IN_SANDBOX.to_string()])
    );
    assert!(
        cfg.cmd.unwrap_or_default().is_empty(),
        "image CMD must not be passed"
    );
    let hostname = cfg.hostname.expect("hostname");
    assert!(
        hostname
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-'),
        "hostname {hostname}"
    );
    assert!(cfg
        .env
        .unwrap_or_default()
        .iter()
        .any(|e| e == "STACYVM_TEST=yes"));

    let hc = c.host_config.expect("host config");
    assert_eq!(hc.memory, Some(256 * 1024 * 1024));
    assert_eq!(hc.memory_swap, Some(256 * 1024 * 1024));
    assert_eq!(hc.nano_cpus, Some(1_000_000_000));
    assert_eq!(hc.pids_limit, Some(128));
    assert_eq!(hc.cap_drop, Some(vec!["ALL".to_string()]));
    let cap_add = hc.cap_add.unwrap_or_default();
    for cap in ["CHOWN", "SETUID", "SETGID", "KILL", "NET_BIND_SERVICE"] {
        assert!(
            cap_add.iter().any(|c| c == cap),
            "{cap} missing from {cap_add:?}"
        );
    }
    assert!(!cap_add.iter().any(|c| c == "SYS_ADMIN" || c == "NET_RAW"));
    assert!(hc
        .security_opt
        .unwrap_or_default()
        .iter()
        .any(|o| o.starts_with("no-new-privileges")));
    assert_eq!(hc.network_mode.as_deref(), Some("none"));
    assert_ne!(hc.init, Some(true));
    assert_ne!(hc.auto_remove, Some(true));
    assert_ne!(hc.privileged, Some(true));
    assert!(hc.port_bindings.unwrap_or_default().is_empty());
    let binds = hc.binds.unwrap_or_default();
    assert!(
        binds
            .iter()
            .any(|b| b.ends_with(":/.stacyvm/stacyvm-agent:ro")),
        "{binds:?}"
    );
    assert!(
        binds.iter().any(|b| b.ends_with(":/.stacyvm/run:rw")),
        "{binds:?}"
    );

    // The provider's own view.
    let seen = fx
        .provider
        .inspect(&spec.id)
        .await
        .expect("inspect")
        .expect("exists");
    assert_eq!(seen, info);
    let listed = fx.provider.list().await.expect("list");
    assert_eq!(listed, vec![info.clone()]);

    // Destroy, then again.
    fx.provider.destroy(&spec.id).await.expect("destroy");
    assert_eq!(fx.provider.inspect(&spec.id).await.expect("inspect"), None);
    let gone = docker()
        .await
        .inspect_container(&info.runtime_id, None)
        .await;
    assert!(gone.is_err(), "container still exists after destroy");
    fx.provider.destroy(&spec.id).await.expect("second destroy");
    assert!(fx.provider.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn egress_uses_the_bridge_network() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    spec.network = NetworkMode::Egress;
    let info = fx.provider.create(&spec).await.expect("create");
    let c = docker()
        .await
        .inspect_container(&info.runtime_id, None)
        .await
        .expect("inspect");
    let mode = c
        .host_config
        .and_then(|h| h.network_mode)
        .unwrap_or_default();
    assert!(mode == "bridge" || mode == "default", "network mode {mode}");
    fx.provider.destroy(&spec.id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn list_and_inspect_only_see_own_instance() {
    let a = Fixture::new().await;
    let b = Fixture::new().await;
    let (sa1, sa2, sb) = (a.spec(), a.spec(), b.spec());
    let (ra1, ra2, rb) = tokio::join!(
        a.provider.create(&sa1),
        a.provider.create(&sa2),
        b.provider.create(&sb)
    );
    let (ra1, ra2, rb) = (ra1.expect("a1"), ra2.expect("a2"), rb.expect("b"));

    let mut listed = a.provider.list().await.expect("list a");
    listed.sort_by(|x, y| x.sandbox_id.cmp(&y.sandbox_id));
    let mut want = vec![ra1.clone(), ra2.clone()];
    want.sort_by(|x, y| x.sandbox_id.cmp(&y.sandbox_id));
    assert_eq!(listed, want);
    assert_eq!(b.provider.list().await.expect("list b"), vec![rb.clone()]);

    // Another instance's sandbox is invisible.
    assert_eq!(b.provider.inspect(&sa1.id).await.expect("inspect"), None);
    assert_eq!(a.provider.inspect(&sb.id).await.expect("inspect"), None);

    // Stopped containers are listed too, as not running.
    docker()
        .await
        .kill_container(&ra2.runtime_id, None)
        .await
        .expect("kill");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let l = a.provider.list().await.expect("list a");
        if l.iter().any(|r| r.sandbox_id == sa2.id && !r.running) {
            assert_eq!(l.len(), 2);
            break;
        }
        assert!(
            Instant::now() < deadline,
            "killed container not reported as stopped: {l:?}"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let seen = a
        .provider
        .inspect(&sa2.id)
        .await
        .expect("inspect")
        .expect("exists");
    assert!(!seen.running);

    for (p, s) in [(&a, &sa1), (&a, &sa2), (&b, &sb)] {
        p.provider.destroy(&s.id).await.expect("destroy");
    }
    assert!(a.provider.list().await.expect("list").is_empty());
    assert!(b.provider.list().await.expect("list").is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_destroys_all_succeed() {
    let fx = Fixture::new().await;
    let spec = fx.spec();
    fx.provider.create(&spec).await.expect("create");
    let (r1, r2, r3) = tokio::join!(
        fx.provider.destroy(&spec.id),
        fx.provider.destroy(&spec.id),
        fx.provider.destroy(&spec.id)
    );
    r1.expect("destroy 1");
    r2.expect("destroy 2");
    r3.expect("destroy 3");
    assert!(fx.containers().await.is_empty());
    fx.provider
        .destroy("sb_never_existed")
        .await
        .expect("unknown sandbox");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_image_is_an_image_error() {
    // A registry on a closed loopback port: the pull fails without leaving the host.
    let image = "127.0.0.1:9/stacyvm-missing/none:latest";
    for pull in [PullPolicy::Missing, PullPolicy::Never] {
        let fx = Fixture::with_pull(pull).await;
        let mut spec = fx.spec();
        spec.image = image.to_string();
        let t0 = Instant::now();
        let err = fx
            .provider
            .create(&spec)
            .await
            .expect_err("create must fail");
        match &err {
            ProviderError::Image { image: i, message } => {
                assert_eq!(i, image);
                assert!(!message.is_empty());
            }
            other => panic!("{pull:?}: expected an image error, got {other:?}"),
        }
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "took {:?}",
            t0.elapsed()
        );
        eprintln!("{pull:?}: {err} ({:?})", t0.elapsed());
        assert!(fx.containers().await.is_empty());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unreachable_daemon_is_unavailable() {
    let socket = "/nonexistent/stacyvm/docker.sock";
    let provider = DockerProvider::connect(DockerOptions {
        socket: Some(format!("unix://{socket}")),
        instance_id: format!("test-{}", token()),
        pull: PullPolicy::Missing,
    })
    .await
    .expect("construction must not need the daemon");
    assert_eq!(provider.socket(), socket);

    let err = provider.health().await.expect_err("health");
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    assert!(err.to_string().contains(socket), "{err}");

    let dir = std::env::temp_dir().join(format!("stacyvm-dt-{}", token()));
    std::fs::create_dir_all(&dir).expect("dir");
    let agent = dir.join("agent");
    std::fs::write(&agent, b"x").expect("agent stand-in file");
    let spec = SandboxSpec {
        id: format!("sb_t{}", token()),
        image: test_image(),
        memory_mb: 128,
        vcpus: 1,
        pids_limit: 64,
        network: NetworkMode::None,
        env: BTreeMap::new(),
        run_dir: dir.clone(),
        agent_binary: agent,
        start_timeout: Duration::from_secs(1),
    };
    let err = provider.create(&spec).await.expect_err("create");
    let _ = std::fs::remove_dir_all(&dir);
    match &err {
        ProviderError::Unavailable { message, .. } => {
            assert!(
                message.contains("docker daemon unreachable at"),
                "{message}"
            )
        }
        other => panic!("expected unavailable, got {other:?}"),
    }
    assert!(matches!(
        provider.list().await,
        Err(ProviderError::Unavailable { .. })
    ));
    assert!(matches!(
        provider.destroy("sb_x").await,
        Err(ProviderError::Unavailable { .. })
    ));
    assert!(provider.logs("sb_x", 10).await.is_empty());

    // A socket that is not a daemon (nothing listening) is unavailable too.
    let fake = std::env::temp_dir().join(format!("stacyvm-dt-{}.sock", token()));
    let listener = std::os::unix::net::UnixListener::bind(&fake).expect("bind");
    drop(listener);
    let provider = DockerProvider::connect(DockerOptions {
        socket: Some(fake.display().to_string()),
        instance_id: "test-x".into(),
        pull: PullPolicy::Missing,
    })
    .await
    .expect("construction");
    let err = provider.health().await.expect_err("health");
    let _ = std::fs::remove_file(&fake);
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failing_agent_is_agent_start_with_logs() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    spec.agent_binary = fx.script(
        "bogus-agent",
        "#!/bin/sh\necho 'bogus agent: starting'\necho 'bogus agent: cannot go on' >&2\nexit 3\n",
    );
    let t0 = Instant::now();
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    let elapsed = t0.elapsed();
    let ProviderError::AgentStart(msg) = &err else {
        panic!("expected AgentStart, got {err:?}");
    };
    assert!(msg.contains("code 3"), "{msg}");
    assert!(msg.contains("bogus agent: cannot go on"), "{msg}");
    assert!(msg.contains("bogus agent: starting"), "{msg}");
    // It stops waiting when the container exits, long before the timeout.
    assert!(elapsed < Duration::from_secs(5), "took {elapsed:?}");
    assert!(fx.containers().await.is_empty(), "container left behind");
    assert_eq!(fx.provider.inspect(&spec.id).await.expect("inspect"), None);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_cannot_execute_is_agent_start() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    // Executable bit but not a program: the runtime cannot exec it.
    spec.agent_binary = fx.script("garbage-agent", "this is not a program\n");
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::AgentStart(_)), "{err:?}");
    eprintln!("{err}");
    assert!(fx.containers().await.is_empty(), "container left behind");

    // A directory where the agent should be: the runtime refuses to start it.
    let mut spec = fx.spec();
    let dir = fx.dir.join("agent-dir");
    std::fs::create_dir_all(&dir).expect("dir");
    spec.agent_binary = dir;
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::AgentStart(_)), "{err:?}");
    eprintln!("{err}");
    assert!(fx.containers().await.is_empty(), "container left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn silent_agent_times_out_and_is_removed() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    spec.agent_binary = fx.script(
        "silent-agent",
        "#!/bin/sh\necho 'never answering'\nexec sleep 600\n",
    );
    spec.start_timeout = Duration::from_millis(1500);
    let t0 = Instant::now();
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    let ProviderError::AgentStart(msg) = &err else {
        panic!("expected AgentStart, got {err:?}");
    };
    assert!(msg.contains("never answering"), "{msg}");
    assert!(
        t0.elapsed() < Duration::from_secs(10),
        "took {:?}",
        t0.elapsed()
    );
    assert!(fx.containers().await.is_empty(), "container left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn abandoned_create_leaves_nothing_behind() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    spec.agent_binary = fx.script("slow-agent", "#!/bin/sh\nexec sleep 600\n");
    spec.start_timeout = Duration::from_secs(60);
    let r = tokio::time::timeout(Duration::from_millis(1500), fx.provider.create(&spec)).await;
    assert!(r.is_err(), "create should still be waiting");
    let deadline = Instant::now() + Duration::from_secs(10);
    while !fx.containers().await.is_empty() {
        assert!(Instant::now() < deadline, "abandoned container not removed");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn impossible_limits_are_invalid() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    spec.vcpus = 100_000;
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    eprintln!("{err}");

    let mut spec = fx.spec();
    spec.memory_mb = 1;
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");

    let mut spec = fx.spec();
    spec.agent_binary = fx.dir.join("no-such-agent");
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::Invalid(_)), "{err:?}");
    assert!(
        !spec.agent_binary.exists(),
        "the daemon must not create a missing bind source"
    );

    assert!(fx.containers().await.is_empty(), "container left behind");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn logs_return_the_container_output() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    // A wrapper that logs two lines, then becomes the real agent (kept in the
    // run dir, which is mounted in the sandbox).
    std::fs::copy(agent_binary(), spec.run_dir.join("real-agent")).expect("copy agent");
    spec.agent_binary = fx.script(
        "logging-agent",
        "#!/bin/sh\necho 'stacyvm-test-line-1'\necho 'stacyvm-test-line-2' >&2\nexec /.stacyvm/run/real-agent\n",
    );
    fx.provider.create(&spec).await.expect("create");
    let logs = fx.provider.logs(&spec.id, 100).await;
    assert!(logs.iter().any(|l| l == "stacyvm-test-line-1"), "{logs:?}");
    assert!(logs.iter().any(|l| l == "stacyvm-test-line-2"), "{logs:?}");
    assert!(fx.provider.logs(&spec.id, 1).await.len() <= 1);
    assert!(fx.provider.logs(&spec.id, 0).await.is_empty());
    assert!(fx.provider.logs("sb_never_existed", 10).await.is_empty());
    fx.provider.destroy(&spec.id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn health_and_description() {
    let fx = Fixture::new().await;
    fx.provider.health().await.expect("health");
    assert_eq!(fx.provider.name(), "docker");
    assert_eq!(
        fx.provider.isolation(),
        stacyvm_providers::Isolation::Container
    );
    let caps = fx.provider.capabilities();
    for c in [
        "exec",
        "files",
        "memory_limit",
        "cpu_limit",
        "pids_limit",
        "network_none",
    ] {
        assert!(caps.iter().any(|x| x == c), "{c} missing");
    }
}

/// Create→ready latency over a few sequential runs (printed; bounded loosely).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn create_to_ready_latency() {
    let fx = Fixture::new().await;
    // Warm-up (first contact, page cache).
    let spec = fx.spec();
    fx.provider.create(&spec).await.expect("create");
    fx.provider.destroy(&spec.id).await.expect("destroy");

    let mut times = Vec::new();
    for _ in 0..7 {
        let spec = fx.spec();
        let t0 = Instant::now();
        fx.provider.create(&spec).await.expect("create");
        times.push(t0.elapsed());
        let t1 = Instant::now();
        fx.provider.destroy(&spec.id).await.expect("destroy");
        eprintln!(
            "create->ready {:?}, destroy {:?}",
            times[times.len() - 1],
            t1.elapsed()
        );
    }
    times.sort();
    let p50 = times[times.len() / 2];
    eprintln!("create->ready p50 {p50:?}, all {times:?}");
    assert!(p50 < Duration::from_secs(3), "p50 {p50:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn daemon_that_appears_later_is_picked_up() {
    let fx = Fixture::new().await;
    // The socket does not exist when the provider is built…
    let link = fx.dir.join("docker.sock");
    let provider = DockerProvider::connect(DockerOptions {
        socket: Some(link.display().to_string()),
        instance_id: fx.instance.clone(),
        pull: PullPolicy::Missing,
    })
    .await
    .expect("construction must not need the daemon");
    let err = provider.health().await.expect_err("health while down");
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");
    let spec = fx.spec();
    let err = provider.create(&spec).await.expect_err("create while down");
    assert!(matches!(err, ProviderError::Unavailable { .. }), "{err:?}");

    // …then the daemon shows up there: the next calls connect and negotiate.
    let real = std::env::var("DOCKER_HOST")
        .ok()
        .and_then(|h| h.strip_prefix("unix://").map(str::to_string))
        .unwrap_or_else(|| "/var/run/docker.sock".to_string());
    std::os::unix::fs::symlink(real, &link).expect("symlink");
    provider.health().await.expect("health once up");
    let info = provider.create(&spec).await.expect("create once up");
    assert!(info.running);
    provider.destroy(&spec.id).await.expect("destroy");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agent_that_accepts_but_never_answers_times_out() {
    let fx = Fixture::new().await;
    let mut spec = fx.spec();
    // Listens on the agent socket but never replies.
    spec.agent_binary = fx.script(
        "mute-agent",
        "#!/usr/bin/python3\nimport socket, time\n\
         s = socket.socket(socket.AF_UNIX)\n\
         s.bind('/.stacyvm/run/agent.sock')\ns.listen(16)\nprint('mute agent up', flush=True)\n\
         conns = []\nwhile True:\n    conns.append(s.accept())\n",
    );
    spec.start_timeout = Duration::from_millis(1500);
    let t0 = Instant::now();
    let err = fx
        .provider
        .create(&spec)
        .await
        .expect_err("create must fail");
    assert!(matches!(err, ProviderError::AgentStart(_)), "{err:?}");
    assert!(
        t0.elapsed() < Duration::from_secs(8),
        "took {:?}",
        t0.elapsed()
    );
    eprintln!("{err}");
    assert!(fx.containers().await.is_empty(), "container left behind");
}
