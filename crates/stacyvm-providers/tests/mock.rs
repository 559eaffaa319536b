//! The mock provider through real Unix sockets and the real `AgentClient`:
//! lifecycle, exec (exit codes, stdin, timeouts, streaming), files (binary
//! round trips, listing, moves, deletes, escape attempts), destroy, and a
//! second provider over the same state directory serving a sandbox again.
//!
//! Needs nothing but a writable /tmp: the mock runs no program.

use bytes::Bytes;
use http::StatusCode;
use http_body_util::BodyExt;
use stacyvm_agent_proto::{ExecEvent, ExecRequest, ExecResult};
use stacyvm_providers::agent::{AgentClient, AgentError};
use stacyvm_providers::mock::{MockOptions, MockProvider};
use stacyvm_providers::{caps, Isolation, NetworkMode, Provider, SandboxSpec};
use std::collections::BTreeMap;
use std::os::unix::fs::PermissionsExt;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[path = "../../stacyvm-native/tests/shared/mod.rs"]
mod shared;
use shared::token;

/// A data directory of its own (short: socket paths are limited), removed
/// at the end of the test.
struct Data {
    dir: PathBuf,
}

impl Data {
    fn new() -> Data {
        let dir = PathBuf::from(format!("/tmp/svm-mock-{}", token()));
        std::fs::create_dir_all(dir.join("s")).unwrap();
        Data { dir }
    }

    fn state_dir(&self) -> PathBuf {
        self.dir.join("mock")
    }

    fn run_dir(&self, id: &str) -> PathBuf {
        self.dir.join("s").join(id)
    }

    async fn provider(&self, instance: &str) -> MockProvider {
        MockProvider::new(MockOptions {
            state_dir: self.state_dir(),
            instance_id: instance.to_string(),
        })
        .await
        .expect("the mock provider opens")
    }

    /// The spec the engine would pass (the run dir exists, as the engine
    /// makes it before `create`).
    fn spec(&self, id: &str) -> SandboxSpec {
        let run_dir = self.run_dir(id);
        std::fs::create_dir_all(&run_dir).unwrap();
        SandboxSpec {
            id: id.to_string(),
            image: "any/image:tag".to_string(),
            memory_mb: 256,
            vcpus: 1,
            pids_limit: 64,
            network: NetworkMode::None,
            env: BTreeMap::from([("FROM_SPEC".to_string(), "spec-value".to_string())]),
            run_dir,
            agent_binary: PathBuf::from("/nonexistent/stacyvm-agent"),
            start_timeout: Duration::from_secs(5),
        }
    }
}

impl Drop for Data {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn sandbox_id() -> String {
    format!("sb_{}", token())
}

fn sh(line: &str) -> ExecRequest {
    ExecRequest {
        argv: vec!["/bin/sh".into(), "-c".into(), line.into()],
        workdir: "/workspace".into(),
        timeout_ms: 10_000,
        ..Default::default()
    }
}

async fn run(agent: &AgentClient, line: &str) -> ExecResult {
    agent.exec(&sh(line)).await.expect("exec answers")
}

/// The status and code of an agent error answer.
fn status_of(e: AgentError) -> (StatusCode, String) {
    match e {
        AgentError::Status { status, code, .. } => (status, code),
        other => panic!("expected an error answer, got {other:?}"),
    }
}

async fn read_all(agent: &AgentClient, path: &str) -> Result<Vec<u8>, AgentError> {
    let (body, _) = agent.read_file(path).await?;
    Ok(body.collect().await.unwrap().to_bytes().to_vec())
}

#[tokio::test]
async fn provider_identity() {
    let data = Data::new();
    let p = data.provider("inst-id").await;
    assert_eq!(p.name(), "mock");
    assert_eq!(p.isolation(), Isolation::None);
    // It runs no program: `simulated_exec`, never `exec`.
    assert_eq!(
        p.capabilities(),
        [caps::SIMULATED_EXEC, caps::FILES, caps::STREAMING]
    );
    p.health().await.unwrap();
    assert!(p.list().await.unwrap().is_empty());
    assert!(data.state_dir().is_dir());
}

#[tokio::test]
async fn exec_results() {
    let data = Data::new();
    let p = data.provider("inst-exec").await;
    let id = sandbox_id();
    let spec = data.spec(&id);
    let info = p.create(&spec).await.unwrap();
    assert!(info.running);
    assert_eq!(info.sandbox_id, id);
    let agent = AgentClient::new(spec.socket_path());
    assert_eq!(agent.health().await.unwrap().status, "ok");

    let r = run(&agent, "echo hi").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (0, "hi\n", "")
    );
    assert!(!r.timed_out);
    assert_eq!(run(&agent, "exit 3").await.exit_code, 3);
    assert_eq!(run(&agent, "false").await.exit_code, 1);
    let r = run(&agent, "python3 -c 'print(1)'").await;
    assert_eq!(r.exit_code, 127);
    assert_eq!(
        r.stderr,
        "mock: python3: command not found (the mock provider runs no programs)\n"
    );
    let r = run(&agent, "echo to-out; echo to-err >&2; exit 5").await;
    assert_eq!(
        (r.exit_code, r.stdout.as_str(), r.stderr.as_str()),
        (5, "to-out\n", "to-err\n")
    );
    let r = run(&agent, "pwd; echo $FROM_SPEC $HOSTNAME").await;
    let host = stacyvm_providers::hostname_for(&id);
    assert_eq!(r.stdout, format!("/workspace\nspec-value {host}\n"));

    // Request environment, working directory, stdin, argv mode.
    let mut req = sh("mkdir -p sub && cd sub && echo $EXTRA > f && pwd && cat f");
    req.env.insert("EXTRA".into(), "from-request".into());
    let r = agent.exec(&req).await.unwrap();
    assert_eq!(r.stdout, "/workspace/sub\nfrom-request\n");
    let mut req = sh("cat; echo done");
    req.stdin = Some("line1\nline2\n".into());
    assert_eq!(
        agent.exec(&req).await.unwrap().stdout,
        "line1\nline2\ndone\n"
    );
    let mut req = sh("pwd");
    req.workdir = "/workspace/sub".into();
    assert_eq!(agent.exec(&req).await.unwrap().stdout, "/workspace/sub\n");
    let req = ExecRequest {
        argv: vec!["echo".into(), "$HOME".into(), ";".into(), "*".into()],
        workdir: "/workspace".into(),
        ..Default::default()
    };
    assert_eq!(agent.exec(&req).await.unwrap().stdout, "$HOME ; *\n");

    // The agent's validation errors.
    let mut req = sh("true");
    req.workdir = "/nope".into();
    let (status, code) = status_of(agent.exec(&req).await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::BAD_REQUEST, "invalid_request")
    );
    let req = ExecRequest::default();
    let (status, _) = status_of(agent.exec(&req).await.unwrap_err());
    assert_eq!(status, StatusCode::BAD_REQUEST);

    // A timeout ends the command at once, as the real agent reports it.
    let mut req = sh("echo started; sleep 30; echo never");
    req.timeout_ms = 300;
    let t0 = Instant::now();
    let r = agent.exec(&req).await.unwrap();
    let took = t0.elapsed();
    assert!(took >= Duration::from_millis(300), "{took:?}");
    assert!(took < Duration::from_secs(5), "{took:?}");
    assert!(r.timed_out);
    assert_eq!(r.exit_code, 137);
    assert_eq!(r.stdout, "started\n");
    // The sandbox still answers afterwards.
    assert_eq!(run(&agent, "echo alive").await.stdout, "alive\n");

    // Output limit.
    let mut req = sh("echo 0123456789");
    req.output_limit = 4;
    let r = agent.exec(&req).await.unwrap();
    assert!(r.truncated);
    assert_eq!(r.stdout, "0123");

    // Logs and stats.
    let logs = agent.logs(100).await.unwrap();
    assert!(
        logs.iter().any(|l| l.contains("exec \"/bin/sh\" exit=3")),
        "{logs:?}"
    );
    let stats = agent.stats().await.unwrap();
    assert_eq!(stats.mem_limit_bytes, 256 * 1024 * 1024);
    assert!(!p.logs(&id, 10).await.is_empty());

    p.destroy(&id).await.unwrap();
}

/// Read the NDJSON events of a streamed exec, with the time each arrived.
async fn stream_events(agent: &AgentClient, req: &ExecRequest) -> Vec<(Duration, ExecEvent)> {
    let t0 = Instant::now();
    let mut body = agent.exec_stream(req).await.unwrap();
    let mut buf = Vec::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        let frame = frame.unwrap();
        let Ok(data) = frame.into_data() else {
            continue;
        };
        buf.extend_from_slice(&data);
        while let Some(nl) = buf.iter().position(|b| *b == b'\n') {
            let line: Vec<u8> = buf.drain(..=nl).collect();
            events.push((t0.elapsed(), serde_json::from_slice(&line).unwrap()));
        }
    }
    assert!(buf.is_empty(), "unterminated line {buf:?}");
    events
}

#[tokio::test]
async fn streaming() {
    let data = Data::new();
    let p = data.provider("inst-stream").await;
    let id = sandbox_id();
    let spec = data.spec(&id);
    p.create(&spec).await.unwrap();
    let agent = AgentClient::new(spec.socket_path());

    let mut req = sh("echo first; echo err >&2; sleep 1; echo second; exit 4");
    req.stream = true;
    let events = stream_events(&agent, &req).await;
    let shown: Vec<(&str, &str)> = events
        .iter()
        .map(|(_, e)| (e.stream.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        shown,
        [
            ("stdout", "first\n"),
            ("stderr", "err\n"),
            ("stdout", "second\n"),
            ("exit", "")
        ]
    );
    // The first line came before the sleep, not with the end.
    let (first_at, _) = &events[0];
    let (end_at, exit) = &events[3];
    assert!(
        *end_at - *first_at >= Duration::from_millis(700),
        "{events:?}"
    );
    assert_eq!(exit.exit_code, Some(4));
    assert!(!exit.timed_out);
    assert!(exit.duration_ns.unwrap() >= 1_000_000_000);

    // A streamed timeout ends with the same final event as the agent's.
    let mut req = sh("echo go; sleep 30");
    req.stream = true;
    req.timeout_ms = 300;
    let events = stream_events(&agent, &req).await;
    let (at, last) = events.last().unwrap();
    assert!(*at < Duration::from_secs(5));
    assert_eq!(last.stream, "exit");
    assert_eq!(last.exit_code, Some(137));
    assert!(last.timed_out);
    assert_eq!(events[0].1.data, "go\n");

    p.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn files() {
    let data = Data::new();
    let p = data.provider("inst-files").await;
    let id = sandbox_id();
    let spec = data.spec(&id);
    p.create(&spec).await.unwrap();
    let agent = AgentClient::new(spec.socket_path());
    let root = data.state_dir().join(&id).join("root");

    // Binary round trip: every byte value, and a larger body.
    let all: Vec<u8> = (0..=255u8).cycle().take(256 * 7).collect();
    let w = agent
        .write_bytes("/workspace/bin/all.bin", None, Bytes::from(all.clone()))
        .await
        .unwrap();
    assert_eq!(w.size, all.len() as u64);
    assert_eq!(
        read_all(&agent, "/workspace/bin/all.bin").await.unwrap(),
        all
    );
    assert_eq!(
        std::fs::read(root.join("workspace/bin/all.bin")).unwrap(),
        all
    );
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    agent
        .write_bytes("/workspace/big", Some("600"), Bytes::from(big.clone()))
        .await
        .unwrap();
    assert_eq!(read_all(&agent, "/workspace/big").await.unwrap(), big);
    agent
        .write_bytes("/workspace/empty", None, Bytes::new())
        .await
        .unwrap();
    assert!(read_all(&agent, "/workspace/empty")
        .await
        .unwrap()
        .is_empty());

    // Exec sees the same files.
    agent
        .write_bytes("/workspace/hello.txt", None, Bytes::from_static(b"hello\n"))
        .await
        .unwrap();
    assert_eq!(run(&agent, "cat hello.txt").await.stdout, "hello\n");
    run(&agent, "echo made > /workspace/by-exec").await;
    assert_eq!(
        read_all(&agent, "/workspace/by-exec").await.unwrap(),
        b"made\n"
    );

    // List, stat, chmod, glob.
    let names: Vec<String> = agent
        .list("/workspace")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["big", "bin", "by-exec", "empty", "hello.txt"]);
    let st = agent.stat("/workspace/big").await.unwrap();
    assert_eq!(
        (st.size, st.mode.as_str(), st.is_dir),
        (3_000_000, "600", false)
    );
    agent.chmod("/workspace/big", "640").await.unwrap();
    assert_eq!(agent.stat("/workspace/big").await.unwrap().mode, "640");
    assert_eq!(
        agent.glob("/workspace/**/*.bin").await.unwrap(),
        ["/workspace/bin/all.bin"]
    );

    // Move, delete.
    agent
        .rename("/workspace/hello.txt", "/workspace/moved/hi.txt")
        .await
        .unwrap();
    assert_eq!(
        read_all(&agent, "/workspace/moved/hi.txt").await.unwrap(),
        b"hello\n"
    );
    let (status, code) = status_of(read_all(&agent, "/workspace/hello.txt").await.unwrap_err());
    assert_eq!(
        (status, code.as_str()),
        (StatusCode::NOT_FOUND, "file_not_found")
    );
    let (status, code) = status_of(agent.delete("/workspace/moved", false).await.unwrap_err());
    assert_eq!((status, code.as_str()), (StatusCode::CONFLICT, "conflict"));
    agent.delete("/workspace/moved", true).await.unwrap();
    assert!(!root.join("workspace/moved").exists());
    let (status, _) = status_of(agent.delete("/workspace/moved", true).await.unwrap_err());
    assert_eq!(status, StatusCode::NOT_FOUND);

    // Escape attempts.
    for bad in [
        "/../etc/passwd",
        "/workspace/../../etc",
        "relative",
        "/.stacyvm/run/agent.sock",
    ] {
        let (status, code) = status_of(read_all(&agent, bad).await.unwrap_err());
        assert_eq!(
            (status, code.as_str()),
            (StatusCode::BAD_REQUEST, "invalid_request"),
            "{bad}"
        );
        let e = agent.write_bytes(bad, None, Bytes::from_static(b"x")).await;
        assert_eq!(
            status_of(e.unwrap_err()).0,
            StatusCode::BAD_REQUEST,
            "{bad}"
        );
    }
    // A host file next to the sandbox, and links to it planted in the root.
    let secret = data.dir.join("secret");
    std::fs::write(&secret, b"host only").unwrap();
    let secret_mode = std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777;
    std::os::unix::fs::symlink(&secret, root.join("workspace/abs-link")).unwrap();
    std::os::unix::fs::symlink("../../../../secret", root.join("workspace/rel-link")).unwrap();
    std::os::unix::fs::symlink("/", root.join("workspace/root-link")).unwrap();
    for link in ["/workspace/abs-link", "/workspace/rel-link"] {
        let (status, _) = status_of(read_all(&agent, link).await.unwrap_err());
        assert_eq!(status, StatusCode::NOT_FOUND, "{link}");
        assert_eq!(run(&agent, &format!("cat {link}")).await.exit_code, 1);
    }
    // `/` through a link is the sandbox's own root, not the host's.
    let names: Vec<String> = agent
        .list("/workspace/root-link")
        .await
        .unwrap()
        .into_iter()
        .map(|e| e.name)
        .collect();
    assert_eq!(names, ["root", "tmp", "workspace"]);
    // Writes through links land inside the root; the host file is intact.
    agent
        .write_bytes(
            "/workspace/root-link/etc/x",
            None,
            Bytes::from_static(b"in"),
        )
        .await
        .unwrap();
    assert!(root.join("etc/x").is_file());
    run(&agent, "echo overwritten > /workspace/rel-link/../x").await;
    agent.chmod("/workspace/abs-link", "777").await.unwrap_err();
    agent.delete("/workspace/abs-link", false).await.unwrap();
    assert_eq!(std::fs::read(&secret).unwrap(), b"host only");
    assert_eq!(
        std::fs::metadata(&secret).unwrap().permissions().mode() & 0o777,
        secret_mode
    );

    // The tunnel is refused clearly.
    match agent.tunnel(8080).await {
        Err(AgentError::Status {
            status,
            code,
            message,
        }) => {
            assert_eq!(
                (status, code.as_str()),
                (StatusCode::BAD_GATEWAY, "port_closed")
            );
            assert!(message.contains("mock provider"), "{message}");
        }
        Err(e) => panic!("unexpected tunnel error {e:?}"),
        Ok(_) => panic!("the mock must not open tunnels"),
    }

    p.destroy(&id).await.unwrap();
}

#[tokio::test]
async fn destroy_removes_the_sandbox() {
    let data = Data::new();
    let p = data.provider("inst-destroy").await;
    let id = sandbox_id();
    let spec = data.spec(&id);
    p.create(&spec).await.unwrap();
    let dir = data.state_dir().join(&id);
    assert!(dir.join("state.json").is_file());
    assert!(dir.join("root/workspace").is_dir());
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(dir.join("state.json")).unwrap()).unwrap();
    assert_eq!(state["sandbox_id"], id.as_str());
    assert_eq!(state["instance_id"], "inst-destroy");
    assert_eq!(p.list().await.unwrap().len(), 1);
    assert!(p.inspect(&id).await.unwrap().unwrap().running);
    // A second create of the same id is refused.
    assert!(p.create(&spec).await.is_err());

    p.destroy(&id).await.unwrap();
    assert!(!dir.exists());
    assert!(!spec.socket_path().exists());
    let agent = AgentClient::new(spec.socket_path());
    assert!(matches!(
        agent.health().await,
        Err(AgentError::Unreachable(_))
    ));
    assert!(p.inspect(&id).await.unwrap().is_none());
    assert!(p.list().await.unwrap().is_empty());
    // Idempotent, also for ids that never existed or cannot be directories.
    p.destroy(&id).await.unwrap();
    p.destroy("sb_never").await.unwrap();
    p.destroy("../..").await.unwrap();
    assert!(data.dir.is_dir());
}

#[tokio::test]
async fn a_new_provider_serves_the_sandboxes_again() {
    let data = Data::new();
    let first = data.provider("inst-restart").await;
    let id = sandbox_id();
    let spec = data.spec(&id);
    first.create(&spec).await.unwrap();
    let agent = AgentClient::new(spec.socket_path());
    agent
        .write_bytes("/workspace/kept", None, Bytes::from_static(b"still here"))
        .await
        .unwrap();
    // A sandbox of another server instance sharing the directory.
    let other = data.provider("inst-other").await;
    let other_id = sandbox_id();
    let other_spec = data.spec(&other_id);
    other.create(&other_spec).await.unwrap();

    // The server stops: nothing answers any more.
    drop(first);
    assert!(agent.health().await.is_err());

    let second = data.provider("inst-restart").await;
    agent.health().await.expect("served again");
    assert_eq!(
        read_all(&agent, "/workspace/kept").await.unwrap(),
        b"still here"
    );
    assert_eq!(run(&agent, "cat kept").await.stdout, "still here");
    let listed = second.list().await.unwrap();
    assert_eq!(listed.len(), 1, "{listed:?}");
    assert_eq!(listed[0].sandbox_id, id);
    assert!(listed[0].running);
    assert!(second.inspect(&other_id).await.unwrap().is_none());
    // The other instance's sandbox is untouched by this one.
    second.destroy(&other_id).await.unwrap();
    assert!(data.state_dir().join(&other_id).is_dir());
    assert!(AgentClient::new(other_spec.socket_path())
        .health()
        .await
        .is_ok());

    // A sandbox whose socket directory is gone is listed but not served.
    second.destroy(&id).await.unwrap();
    let gone_id = sandbox_id();
    let gone_spec = data.spec(&gone_id);
    second.create(&gone_spec).await.unwrap();
    drop(second);
    std::fs::remove_dir_all(&gone_spec.run_dir).unwrap();
    let third = data.provider("inst-restart").await;
    let rt = third.inspect(&gone_id).await.unwrap().unwrap();
    assert!(!rt.running);
    third.destroy(&gone_id).await.unwrap();
    assert!(!data.state_dir().join(&gone_id).exists());
    other.destroy(&other_id).await.unwrap();
    assert!(!data.state_dir().join(&other_id).exists());
}
