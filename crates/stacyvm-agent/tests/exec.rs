//! Integration tests of `/v1/exec` and the service routes against the real
//! agent binary.

mod common;

use common::{alive, kill, wait_gone, Agent};
use http_body_util::BodyExt;
use hyper::{Method, StatusCode};
use serde_json::json;
use stacyvm_agent_proto::{ExecEvent, Health, Stats};
use std::time::{Duration, Instant};

#[tokio::test]
async fn health_answers() {
    let a = Agent::start();
    let h: Health = a.ok(Method::GET, "/v1/health", "").await;
    assert_eq!(h.status, "ok");
    assert_eq!(h.version, env!("CARGO_PKG_VERSION"));
    assert_eq!(h.pid, a.pid());
}

#[tokio::test]
async fn exec_true_and_latency() {
    let a = Agent::start();
    let w = a.work.str();
    let r = a.exec(json!({"argv": ["true"], "workdir": w})).await;
    assert_eq!(r.exit_code, 0);
    assert!(!r.timed_out && !r.truncated);
    // Round trip including connect + handshake, as the server does it.
    let n = 100;
    let t0 = Instant::now();
    let mut in_agent = 0;
    for _ in 0..n {
        let r = a.exec(json!({"argv": ["/bin/true"], "workdir": w})).await;
        assert_eq!(r.exit_code, 0);
        in_agent += r.duration_ns;
    }
    let per = t0.elapsed() / n;
    let in_agent = Duration::from_nanos(in_agent / u64::from(n));
    let t0 = Instant::now();
    for _ in 0..n {
        let _: Health = a.ok(Method::GET, "/v1/health", "").await;
    }
    let health = t0.elapsed() / n;
    // For comparison: spawning and waiting for /bin/true directly.
    let t0 = Instant::now();
    for _ in 0..n {
        std::process::Command::new("/bin/true").status().unwrap();
    }
    let local = t0.elapsed() / n;
    eprintln!(
        "exec true round trip: {per:?} (process lifetime seen by the agent: {in_agent:?}; \
         health round trip: {health:?}; direct spawn+wait here: {local:?})"
    );
    assert!(per < Duration::from_millis(100), "exec true took {per:?}");
}

#[tokio::test]
async fn exit_code_and_both_streams() {
    let a = Agent::start();
    let r = a
        .exec(json!({"argv": ["sh", "-c", "echo out; echo err >&2; exit 3"], "workdir": a.work.str()}))
        .await;
    assert_eq!(r.exit_code, 3);
    assert_eq!(r.stdout, "out\n");
    assert_eq!(r.stderr, "err\n");
    assert!(r.duration_ns > 0);
}

#[tokio::test]
async fn killed_by_signal_is_128_plus() {
    let a = Agent::start();
    let r = a
        .exec(json!({"argv": ["sh", "-c", "kill -9 $$"], "workdir": a.work.str()}))
        .await;
    assert_eq!(r.exit_code, 137);
}

#[tokio::test]
async fn argv_is_passed_verbatim() {
    let a = Agent::start();
    let args = ["a b", "it's \"quoted\"", "", "$HOME", "*", "ünï"];
    let mut argv = vec!["printf".to_string(), "[%s]".to_string()];
    argv.extend(args.iter().map(|s| s.to_string()));
    let r = a.exec(json!({"argv": argv, "workdir": a.work.str()})).await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    let want: String = args.iter().map(|s| format!("[{s}]")).collect();
    assert_eq!(r.stdout, want);
}

#[tokio::test]
async fn env_is_added_to_the_agents() {
    let a = Agent::start();
    let r = a
        .exec(json!({
            "argv": ["sh", "-c", "printf '%s|' \"$FOO\" \"$EMPTY\"; test -n \"$PATH\" && echo has-path"],
            "env": {"FOO": "bar baz", "EMPTY": ""},
            "workdir": a.work.str()
        }))
        .await;
    assert_eq!(r.stdout, "bar baz||has-path\n");
    // PATH from the request is used to find the program.
    let bin = a.work.path().join("bin");
    std::fs::create_dir(&bin).unwrap();
    std::fs::write(bin.join("hello-tool"), "#!/bin/sh\necho hi from tool\n").unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(bin.join("hello-tool"))
        .status()
        .unwrap();
    let r = a
        .exec(json!({
            "argv": ["hello-tool"],
            "env": {"PATH": format!("{}:/usr/bin:/bin", bin.display())},
            "workdir": a.work.str()
        }))
        .await;
    assert_eq!(r.exit_code, 0, "{}", r.stderr);
    assert_eq!(r.stdout, "hi from tool\n");
}

#[tokio::test]
async fn workdir_is_used_and_checked() {
    let a = Agent::start();
    let sub = a.work.path().join("sub dir");
    std::fs::create_dir(&sub).unwrap();
    let r = a
        .exec(json!({"argv": ["pwd"], "workdir": sub.to_str().unwrap()}))
        .await;
    assert_eq!(r.stdout.trim_end(), sub.to_str().unwrap());
    // A relative program path is relative to the workdir.
    std::fs::write(sub.join("s.sh"), "#!/bin/sh\necho script ran\n").unwrap();
    std::process::Command::new("chmod")
        .arg("755")
        .arg(sub.join("s.sh"))
        .status()
        .unwrap();
    let r = a
        .exec(json!({"argv": ["./s.sh"], "workdir": sub.to_str().unwrap()}))
        .await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, "script ran\n"));

    let bad = |req: serde_json::Value| {
        let body = serde_json::to_vec(&req).unwrap();
        let a = &a;
        async move {
            a.err(
                Method::POST,
                "/v1/exec",
                body,
                StatusCode::BAD_REQUEST,
                "invalid_request",
            )
            .await
        }
    };
    let msg = bad(json!({"argv": ["true"], "workdir": "/nope/not/here"})).await;
    assert_eq!(msg, "workdir /nope/not/here does not exist");
    bad(json!({"argv": ["true"], "workdir": "relative"})).await;
    bad(json!({"argv": ["true"], "workdir": "/.stacyvm/run"})).await;
    let file = a.work.path().join("f");
    std::fs::write(&file, "x").unwrap();
    let msg = bad(json!({"argv": ["true"], "workdir": file.to_str().unwrap()})).await;
    assert!(msg.contains("not a directory"), "{msg}");
    bad(json!({"argv": [], "workdir": "/"})).await;
    bad(json!({"argv": [""], "workdir": "/"})).await;
    bad(json!({"argv": ["echo", "a\u{0}b"], "workdir": "/"})).await;
    bad(json!({"argv": ["true"], "env": {"A=B": "x"}, "workdir": "/"})).await;
    bad(json!({"argv": "true"})).await;
    a.err(
        Method::POST,
        "/v1/exec",
        "{not json",
        StatusCode::BAD_REQUEST,
        "invalid_request",
    )
    .await;
}

#[tokio::test]
async fn stdin_is_fed_then_closed() {
    let a = Agent::start();
    let w = a.work.str();
    let r = a
        .exec(json!({"argv": ["cat"], "stdin": "hello\nwörld", "workdir": w}))
        .await;
    assert_eq!(r.stdout, "hello\nwörld");
    // No stdin: /dev/null, so cat ends at once.
    let r = a.exec(json!({"argv": ["cat"], "workdir": w})).await;
    assert_eq!((r.exit_code, r.stdout.as_str()), (0, ""));
    // Big stdin that the program only partly reads must not hang.
    let big = "x".repeat(4 * 1024 * 1024);
    let r = a
        .exec(json!({"argv": ["head", "-c", "10"], "stdin": big, "workdir": w}))
        .await;
    assert_eq!(r.stdout, "xxxxxxxxxx");
    let r = a
        .exec(json!({"argv": ["wc", "-c"], "stdin": big, "workdir": w}))
        .await;
    assert_eq!(r.stdout.trim(), (4 * 1024 * 1024).to_string());
}

#[tokio::test]
async fn programs_that_cannot_start() {
    let a = Agent::start();
    let w = a.work.str();
    let r = a
        .exec(json!({"argv": ["definitely-not-a-program"], "workdir": w}))
        .await;
    assert_eq!(r.exit_code, 127);
    assert_eq!(
        r.stderr,
        "stacyvm: cannot execute 'definitely-not-a-program': No such file or directory\n"
    );
    let r = a
        .exec(json!({"argv": ["/no/such/bin"], "workdir": w}))
        .await;
    assert_eq!(r.exit_code, 127);
    let f = a.work.path().join("not-executable");
    std::fs::write(&f, "echo hi\n").unwrap();
    let r = a
        .exec(json!({"argv": [f.to_str().unwrap()], "workdir": w}))
        .await;
    assert_eq!(r.exit_code, 126, "{}", r.stderr);
    assert!(r.stderr.contains("Permission denied"), "{}", r.stderr);
}

#[tokio::test]
async fn timeout_kills_the_whole_tree() {
    let a = Agent::start();
    let t0 = Instant::now();
    // The shell prints the pid of a background grandchild, then waits on it.
    let r = a
        .exec(json!({
            "argv": ["sh", "-c", "sleep 30 & echo $!; sleep 31"],
            "workdir": a.work.str(),
            "timeout_ms": 1000
        }))
        .await;
    let took = t0.elapsed();
    assert!(took < Duration::from_secs(2), "took {took:?}");
    assert!(took >= Duration::from_millis(1000), "took {took:?}");
    assert!(r.timed_out);
    assert_eq!(r.exit_code, 137);
    let pid: i32 = r
        .stdout
        .trim()
        .parse()
        .expect("pid of the background sleep");
    assert!(
        wait_gone(pid, Duration::from_secs(2)),
        "background sleep {pid} survived the timeout"
    );
    // No `sleep 31` left from this agent either.
    let leftovers = children_of(a.pid() as i32);
    assert!(leftovers.is_empty(), "left over: {leftovers:?}");
}

#[tokio::test]
async fn timeout_kills_processes_in_their_own_session() {
    let a = Agent::start();
    // A grandchild that left the session and process group is still found
    // through its parent link.
    let r = a
        .exec(json!({
            "argv": ["sh", "-c", "setsid sleep 30 & echo $!; sleep 31"],
            "workdir": a.work.str(),
            "timeout_ms": 300
        }))
        .await;
    assert!(r.timed_out);
    let pid: i32 = r.stdout.trim().parse().expect("pid of the setsid sleep");
    let gone = wait_gone(pid, Duration::from_secs(2));
    if !gone {
        kill(pid);
    }
    assert!(gone, "setsid'd sleep {pid} survived the timeout");
}

/// Live descendants' pids whose parent is `parent`.
fn children_of(parent: i32) -> Vec<i32> {
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Some(pid) = e.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else {
            continue;
        };
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            continue;
        };
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        if f.get(1).and_then(|p| p.parse::<i32>().ok()) == Some(parent) && alive(pid) {
            out.push(pid);
        }
    }
    out
}

#[tokio::test]
async fn background_children_do_not_hold_the_answer() {
    let a = Agent::start();
    let t0 = Instant::now();
    let r = a
        .exec(json!({"argv": ["sh", "-c", "sleep 30 & echo $!"], "workdir": a.work.str()}))
        .await;
    let took = t0.elapsed();
    assert_eq!(r.exit_code, 0);
    assert!(took < Duration::from_secs(1), "took {took:?}");
    let pid: i32 = r.stdout.trim().parse().unwrap();
    // The background process keeps running.
    assert!(alive(pid));
    kill(pid);
    assert!(wait_gone(pid, Duration::from_secs(2)));

    // A background process that writes after the answer is not killed by
    // SIGPIPE: the agent keeps draining the pipes.
    let marker = a.work.path().join("marker");
    let script = format!(
        "(sleep 0.4; echo late; echo late >&2; echo done > {}) & echo started",
        marker.display()
    );
    let r = a
        .exec(json!({"argv": ["sh", "-c", script], "workdir": a.work.str()}))
        .await;
    assert_eq!(r.stdout, "started\n");
    let deadline = Instant::now() + Duration::from_secs(5);
    while !marker.exists() {
        assert!(Instant::now() < deadline, "the background writer died");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// Read an NDJSON exec stream to its end.
async fn stream_events(a: &Agent, req: serde_json::Value) -> Vec<(Duration, ExecEvent)> {
    let t0 = Instant::now();
    let resp = a
        .send(
            Method::POST,
            "/v1/exec",
            serde_json::to_vec(&req).unwrap().into(),
        )
        .await;
    assert_eq!(resp.status(), StatusCode::OK);
    assert_eq!(resp.headers()["content-type"], "application/x-ndjson");
    let mut body = resp.into_body();
    let mut buf = Vec::new();
    let mut events = Vec::new();
    while let Some(frame) = body.frame().await {
        if let Ok(data) = frame.unwrap().into_data() {
            buf.extend_from_slice(&data);
            while let Some(i) = buf.iter().position(|&b| b == b'\n') {
                let line: Vec<u8> = buf.drain(..=i).collect();
                events.push((t0.elapsed(), serde_json::from_slice(&line).unwrap()));
            }
        }
    }
    assert!(buf.is_empty(), "unterminated line");
    events
}

#[tokio::test]
async fn streaming_events_arrive_in_order() {
    let a = Agent::start();
    let events = stream_events(
        &a,
        json!({
            "argv": ["sh", "-c", "echo one; sleep 0.3; echo two >&2; sleep 0.1; echo three; exit 4"],
            "workdir": a.work.str(),
            "stream": true
        }),
    )
    .await;
    let kinds: Vec<(&str, &str)> = events
        .iter()
        .map(|(_, e)| (e.stream.as_str(), e.data.as_str()))
        .collect();
    assert_eq!(
        kinds,
        vec![
            ("stdout", "one\n"),
            ("stderr", "two\n"),
            ("stdout", "three\n"),
            ("exit", "")
        ]
    );
    // The first line came as it was written, not at the end.
    assert!(events[3].0 - events[0].0 >= Duration::from_millis(300));
    let exit = &events[3].1;
    assert_eq!(exit.exit_code, Some(4));
    assert!(exit.duration_ns.unwrap() > 0);
    assert!(!exit.timed_out && !exit.truncated);
}

#[tokio::test]
async fn streaming_timeout_and_truncation() {
    let a = Agent::start();
    let events = stream_events(
        &a,
        json!({
            "argv": ["sh", "-c", "yes é | head -c 5000; sleep 30"],
            "workdir": a.work.str(),
            "stream": true,
            "timeout_ms": 500,
            "output_limit": 1000
        }),
    )
    .await;
    let (last, rest) = events.split_last().unwrap();
    assert_eq!(last.1.stream, "exit");
    assert!(last.1.timed_out);
    assert!(last.1.truncated);
    assert_eq!(last.1.exit_code, Some(137));
    let text: String = rest.iter().map(|(_, e)| e.data.as_str()).collect();
    // 1000 bytes of "é\n" (3 bytes each): 333 whole lines and a cut 'é'.
    assert!(text.starts_with(&"é\n".repeat(333)), "{text}");
    assert!(text.len() <= 999 + 3);
}

#[tokio::test]
async fn streaming_client_disconnect_kills_the_tree() {
    let a = Agent::start();
    let req = json!({
        "argv": ["sh", "-c", "echo $$; exec sleep 30"],
        "workdir": a.work.str(),
        "stream": true
    });
    let (resp, conn) = a
        .send_on_conn(
            Method::POST,
            "/v1/exec",
            serde_json::to_vec(&req).unwrap().into(),
        )
        .await;
    let mut body = resp.into_body();
    let frame = body.frame().await.unwrap().unwrap().into_data().unwrap();
    let ev: ExecEvent = serde_json::from_slice(&frame).unwrap();
    let pid: i32 = ev.data.trim().parse().unwrap();
    assert!(alive(pid));
    drop(body);
    conn.abort();
    let _ = conn.await; // the socket is closed once the task is gone
    assert!(
        wait_gone(pid, Duration::from_secs(3)),
        "process {pid} survived the disconnect"
    );
}

#[tokio::test]
async fn hanging_up_on_a_plain_exec_kills_the_tree() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let a = Agent::start();
    let pidfile = a.work.path().join("pid");
    let body = json!({
        "argv": ["sh", "-c", format!("echo $$ > {}; exec sleep 30", pidfile.display())],
        "workdir": a.work.str()
    })
    .to_string();
    let mut s = tokio::net::UnixStream::connect(&a.sock).await.unwrap();
    let head = format!(
        "POST /v1/exec HTTP/1.1\r\nHost: agent\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.unwrap();
    s.write_all(body.as_bytes()).await.unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    let pid: i32 = loop {
        if let Some(p) = std::fs::read_to_string(&pidfile)
            .ok()
            .and_then(|t| t.trim().parse().ok())
        {
            break p;
        }
        assert!(Instant::now() < deadline, "the command did not start");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    // Nothing has been answered yet.
    let mut buf = [0u8; 16];
    let early = tokio::time::timeout(Duration::from_millis(100), s.read(&mut buf)).await;
    assert!(early.is_err(), "answered before the command ended");
    drop(s);
    let gone = wait_gone(pid, Duration::from_secs(3));
    if !gone {
        kill(pid);
    }
    assert!(gone, "process {pid} survived the hang-up");
}

#[tokio::test]
async fn output_is_capped_but_drained() {
    let a = Agent::start();
    let w = a.work.str();
    let r = a
        .exec(json!({
            "argv": ["sh", "-c", "head -c 300000 /dev/zero | tr '\\0' a; echo done >&2"],
            "output_limit": 1000,
            "workdir": w
        }))
        .await;
    assert_eq!(r.exit_code, 0);
    assert_eq!(r.stdout, "a".repeat(1000));
    assert_eq!(r.stderr, "done\n");
    assert!(r.truncated);
    // Under the default limit nothing is lost.
    let r = a
        .exec(json!({"argv": ["sh", "-c", "head -c 3000000 /dev/zero | tr '\\0' b"], "workdir": w}))
        .await;
    assert_eq!(r.stdout.len(), 3_000_000);
    assert!(!r.truncated);
    // Invalid UTF-8 is replaced, not an error.
    let r = a
        .exec(json!({"argv": ["printf", "a\\377b"], "workdir": w}))
        .await;
    assert_eq!(r.stdout, "a\u{FFFD}b");
}

#[tokio::test]
async fn logs_record_execs() {
    let a = Agent::start();
    a.exec(json!({"argv": ["true"], "workdir": a.work.str()}))
        .await;
    let lines: Vec<String> = a.ok(Method::GET, "/v1/logs?lines=5", "").await;
    assert!(lines.len() <= 5);
    assert!(
        lines
            .iter()
            .any(|l| l.contains("exec \"true\"") && l.contains("exit=0")),
        "{lines:?}"
    );
    assert!(lines.iter().all(|l| l.as_bytes().get(10) == Some(&b'T')));
    let all: Vec<String> = a.ok(Method::GET, "/v1/logs", "").await;
    assert!(all[0].contains("starting"));
    for bad in [
        "/v1/logs?lines=abc",
        "/v1/logs?lines=10001",
        "/v1/logs?lines=-1",
    ] {
        a.err(
            Method::GET,
            bad,
            "",
            StatusCode::BAD_REQUEST,
            "invalid_request",
        )
        .await;
    }
}

#[tokio::test]
async fn stats_are_sane() {
    let a = Agent::start();
    let s: Stats = a.ok(Method::GET, "/v1/stats", "").await;
    assert!(s.mem_limit_bytes > 0);
    assert!(s.pids > 0);
    assert!(s.cpu_pct >= 0.0);
}

#[tokio::test]
async fn unknown_routes_methods_and_big_bodies() {
    let a = Agent::start();
    a.err(
        Method::GET,
        "/v1/nope",
        "",
        StatusCode::NOT_FOUND,
        "not_found",
    )
    .await;
    a.err(Method::GET, "/", "", StatusCode::NOT_FOUND, "not_found")
        .await;
    let (status, body) = a.call(Method::GET, "/v1/exec", "").await;
    assert_eq!(status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(serde_json::from_slice::<stacyvm_agent_proto::ErrorBody>(&body).is_ok());
    let big = vec![b' '; 9 * 1024 * 1024];
    a.err(
        Method::POST,
        "/v1/exec",
        big,
        StatusCode::PAYLOAD_TOO_LARGE,
        "payload_too_large",
    )
    .await;
    // Still serving afterwards.
    let _: Health = a.ok(Method::GET, "/v1/health", "").await;
}
