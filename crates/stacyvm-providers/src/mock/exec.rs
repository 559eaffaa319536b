//! `POST /v1/exec` of the mock agent: validation (as the real agent does
//! it), output collection or NDJSON streaming with the output limit, and the
//! timeout. The command itself is interpreted by [`super::shell`]; no
//! program is ever started.

use super::error::{io_message, ApiError};
use super::fs::Root;
use super::shell::Interp;
use bytes::Bytes;
use stacyvm_agent_proto::{path, ExecEvent, ExecRequest, ExecResult, DEFAULT_OUTPUT_LIMIT};
use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The exit code the real agent reports for a command killed at its
/// timeout: `128 + SIGKILL`.
pub(crate) const TIMEOUT_EXIT_CODE: i32 = 128 + 9;

/// Largest `data` of one streamed output event.
const EVENT_CHUNK: usize = 64 * 1024;

/// Sending half of a streamed response body.
pub(crate) type BodySender = mpsc::Sender<io::Result<Bytes>>;

/// Which output stream a chunk belongs to.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn name(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Where a command's output goes: collected for one [`ExecResult`], or sent
/// as NDJSON [`ExecEvent`] lines as it is produced. Keeps at most `limit`
/// bytes per stream and remembers whether anything was cut.
pub(crate) struct Sink {
    limit: usize,
    kept: [usize; 2],
    truncated: bool,
    collected: [Vec<u8>; 2],
    tx: Option<BodySender>,
    gone: bool,
}

impl Sink {
    /// Collect output in memory.
    pub fn collect(limit: usize) -> Sink {
        Sink {
            limit,
            kept: [0, 0],
            truncated: false,
            collected: [Vec::new(), Vec::new()],
            tx: None,
            gone: false,
        }
    }

    /// Send output as NDJSON lines into `tx`.
    pub fn streaming(limit: usize, tx: BodySender) -> Sink {
        Sink {
            tx: Some(tx),
            ..Sink::collect(limit)
        }
    }

    /// Whether the streaming client went away (the command should stop).
    pub fn gone(&self) -> bool {
        self.gone
    }

    /// Take `data` written to `which`, honouring the limit.
    pub async fn write(&mut self, which: Stream, data: &[u8]) {
        let i = which as usize;
        let room = self.limit.saturating_sub(self.kept[i]);
        let mut take = room.min(data.len());
        if take < data.len() {
            self.truncated = true;
            // Do not split a character when the output is text.
            if let Ok(s) = std::str::from_utf8(data) {
                while take > 0 && !s.is_char_boundary(take) {
                    take -= 1;
                }
            }
        }
        if take == 0 {
            return;
        }
        self.kept[i] += take;
        let data = &data[..take];
        if self.tx.is_some() {
            // Events of at most EVENT_CHUNK bytes, split on characters, as
            // the real agent's reads produce them.
            let text = String::from_utf8_lossy(data);
            let mut rest: &str = &text;
            while !rest.is_empty() {
                let mut cut = rest.len().min(EVENT_CHUNK);
                while !rest.is_char_boundary(cut) {
                    cut -= 1;
                }
                let (piece, tail) = rest.split_at(cut);
                rest = tail;
                self.send(&ExecEvent {
                    stream: which.name().to_string(),
                    data: piece.to_string(),
                    exit_code: None,
                    duration_ns: None,
                    timed_out: false,
                    truncated: false,
                })
                .await;
            }
        } else {
            self.collected[i].extend_from_slice(data);
        }
    }

    async fn send(&mut self, ev: &ExecEvent) {
        let Some(tx) = &self.tx else { return };
        if self.gone {
            return;
        }
        let mut line = match serde_json::to_vec(ev) {
            Ok(l) => l,
            Err(e) => {
                tracing::warn!(error = %e, "cannot encode an exec event");
                return;
            }
        };
        line.push(b'\n');
        if tx.send(Ok(Bytes::from(line))).await.is_err() {
            self.gone = true;
        }
    }

    /// The collected output of `which` (empty when streaming).
    pub fn text(&mut self, which: Stream) -> String {
        let bytes = std::mem::take(&mut self.collected[which as usize]);
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// When streaming, send the final `exit` event.
    pub async fn finish(&mut self, result: &ExecResult) {
        self.send(&ExecEvent {
            stream: "exit".to_string(),
            data: String::new(),
            exit_code: Some(result.exit_code),
            duration_ns: Some(result.duration_ns),
            timed_out: result.timed_out,
            truncated: result.truncated,
        })
        .await;
    }
}

/// A validated exec request.
pub(crate) struct Plan {
    pub req: ExecRequest,
    pub workdir: String,
    pub limit: usize,
}

/// Check a request the way the real agent does (same messages).
pub(crate) fn validate(root: &Root, mut req: ExecRequest) -> Result<Plan, ApiError> {
    let Some(argv0) = req.argv.first() else {
        return Err(ApiError::invalid("argv must not be empty"));
    };
    if argv0.is_empty() {
        return Err(ApiError::invalid("argv[0] must not be empty"));
    }
    if req.argv.iter().any(|a| a.contains('\0')) {
        return Err(ApiError::invalid("argv contains a NUL byte"));
    }
    for (k, v) in &req.env {
        if k.is_empty() || k.contains('=') || k.contains('\0') {
            return Err(ApiError::invalid(format!(
                "invalid environment variable name {k:?}"
            )));
        }
        if v.contains('\0') {
            return Err(ApiError::invalid(format!(
                "environment variable {k} contains a NUL byte"
            )));
        }
    }
    if req.workdir.is_empty() {
        req.workdir = stacyvm_agent_proto::DEFAULT_WORKDIR.to_string();
    }
    let workdir =
        path::normalize(&req.workdir).map_err(|e| ApiError::invalid(format!("workdir: {e}")))?;
    let meta = root.resolve(&workdir, true).and_then(std::fs::metadata);
    match meta {
        Ok(m) if m.is_dir() => {}
        Ok(_) => {
            return Err(ApiError::invalid(format!(
                "workdir {workdir} is not a directory"
            )))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {
            return Err(ApiError::invalid(format!(
                "workdir {workdir} does not exist"
            )))
        }
        Err(e) => {
            return Err(ApiError::invalid(format!(
                "workdir {workdir}: {}",
                io_message(&e)
            )))
        }
    }
    let limit = match req.output_limit {
        0 => DEFAULT_OUTPUT_LIMIT,
        n => n,
    };
    Ok(Plan {
        req,
        workdir,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
    })
}

/// Interpret the request's command to its end or its timeout. `base_env`
/// is the sandbox's environment; the request's is laid over it.
pub(crate) async fn run(
    root: &Root,
    base_env: &BTreeMap<String, String>,
    plan: &Plan,
    sink: &mut Sink,
) -> ExecResult {
    let started = Instant::now();
    let mut env = base_env.clone();
    env.extend(plan.req.env.iter().map(|(k, v)| (k.clone(), v.clone())));
    let stdin = plan.req.stdin.as_ref().map(|s| s.as_bytes().to_vec());
    let mut interp = Interp::new(root, env, plan.workdir.clone(), stdin);
    let fut = interp.run_argv(&plan.req.argv, sink);
    let (exit_code, timed_out) = match plan.req.timeout_ms {
        0 => (fut.await, false),
        ms => match tokio::time::timeout(Duration::from_millis(ms), fut).await {
            Ok(code) => (code, false),
            Err(_) => (TIMEOUT_EXIT_CODE, true),
        },
    };
    let duration = started.elapsed();
    ExecResult {
        exit_code,
        stdout: sink.text(Stream::Stdout),
        stderr: sink.text(Stream::Stderr),
        duration_ns: u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
        truncated: sink.truncated,
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::fs::tests::TempDir;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            argv: argv.iter().map(|s| s.to_string()).collect(),
            workdir: "/".to_string(),
            ..Default::default()
        }
    }

    #[test]
    fn validation_matches_the_agent() {
        let t = TempDir::new("exec-validate");
        let root = Root::new(&t.0);
        assert!(validate(&root, req(&[])).is_err());
        assert!(validate(&root, req(&[""])).is_err());
        assert!(validate(&root, req(&["a\0b"])).is_err());
        assert!(validate(&root, req(&["true"])).is_ok());
        let mut r = req(&["true"]);
        r.workdir = "/definitely/not/here".into();
        let e = validate(&root, r).err().unwrap();
        assert_eq!(e.message, "workdir /definitely/not/here does not exist");
        let mut r = req(&["true"]);
        r.workdir = "/..".into();
        assert!(validate(&root, r).is_err());
        let mut r = req(&["true"]);
        r.env.insert("A=B".into(), "x".into());
        assert!(validate(&root, r).is_err());
    }

    #[tokio::test]
    async fn limits_and_truncation() {
        let mut s = Sink::collect(4);
        s.write(Stream::Stdout, b"ab").await;
        s.write(Stream::Stdout, b"cdef").await;
        s.write(Stream::Stderr, "é€".as_bytes()).await; // cut inside '€'
        assert!(s.truncated);
        assert_eq!(s.text(Stream::Stdout), "abcd");
        assert_eq!(s.text(Stream::Stderr), "é");
    }

    #[tokio::test]
    async fn streamed_events_are_ndjson() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Sink::streaming(1 << 20, tx);
        s.write(Stream::Stdout, b"hi\n").await;
        let line = rx.recv().await.unwrap().unwrap();
        let ev: ExecEvent = serde_json::from_slice(&line).unwrap();
        assert_eq!((ev.stream.as_str(), ev.data.as_str()), ("stdout", "hi\n"));
        // Big output comes in several events, split on characters.
        let big = "é".repeat(EVENT_CHUNK); // 2 bytes each
        s.write(Stream::Stderr, big.as_bytes()).await;
        let mut got = String::new();
        for _ in 0..2 {
            let line = rx.recv().await.unwrap().unwrap();
            let ev: ExecEvent = serde_json::from_slice(&line).unwrap();
            assert!(ev.data.len() <= EVENT_CHUNK);
            got.push_str(&ev.data);
        }
        assert_eq!(got, big);
        drop(rx);
        s.write(Stream::Stdout, b"more").await;
        assert!(s.gone());
    }

    #[tokio::test]
    async fn timeouts_answer_like_the_agent() {
        let t = TempDir::new("exec-timeout");
        let root = Root::new(&t.0);
        let mut r = req(&["/bin/sh", "-c", "echo started; sleep 10; echo never"]);
        r.timeout_ms = 100;
        let plan = validate(&root, r).unwrap();
        let mut sink = Sink::collect(1024);
        let t0 = Instant::now();
        let res = run(&root, &BTreeMap::new(), &plan, &mut sink).await;
        assert!(t0.elapsed() < Duration::from_secs(5));
        assert!(res.timed_out);
        assert_eq!(res.exit_code, TIMEOUT_EXIT_CODE);
        assert_eq!(res.stdout, "started\n");
        assert!(res.duration_ns >= 100_000_000);
    }
}
