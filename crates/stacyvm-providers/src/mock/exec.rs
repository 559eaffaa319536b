//! `POST /v1/exec` of the mock agent: validation (as the real agent does
//! it), output collection or NDJSON streaming with the output limit, and the
//! timeout. The command itself is interpreted by [`super::shell`]; no
//! program is ever started.

use super::fs::Root;
use super::shell::Interp;
use bytes::Bytes;
use stacyvm_agent_proto::error::ApiError;
use stacyvm_agent_proto::request::{plan_exec, ExecPlan};
use stacyvm_agent_proto::{ExecEvent, ExecRequest, ExecResult, OutputStream, TIMEOUT_EXIT_CODE};
use std::collections::BTreeMap;
use std::io;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Largest `data` of one streamed output event.
const EVENT_CHUNK: usize = 64 * 1024;

/// Sending half of a streamed response body.
pub(crate) type BodySender = mpsc::Sender<io::Result<Bytes>>;

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
    pub async fn write(&mut self, which: OutputStream, data: &[u8]) {
        let i = which.index();
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
                self.send(&ExecEvent::output(which, piece.to_string()))
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
        if tx.send(Ok(Bytes::from(ev.to_line()))).await.is_err() {
            self.gone = true;
        }
    }

    /// The collected output of `which` (empty when streaming).
    pub fn text(&mut self, which: OutputStream) -> String {
        let bytes = std::mem::take(&mut self.collected[which.index()]);
        match String::from_utf8(bytes) {
            Ok(s) => s,
            Err(e) => String::from_utf8_lossy(e.as_bytes()).into_owned(),
        }
    }

    /// When streaming, send the final `exit` event.
    pub async fn finish(&mut self, result: &ExecResult) {
        self.send(&ExecEvent::exit(result)).await;
    }
}

/// Check a request the way the real agent does (the working directory must
/// exist inside the root).
pub(crate) fn validate(root: &Root, req: ExecRequest) -> Result<ExecPlan, ApiError> {
    plan_exec(req, |workdir| {
        root.resolve(workdir, true)
            .and_then(std::fs::metadata)
            .map(|m| m.is_dir())
    })
}

/// Interpret the request's command to its end or its timeout. `base_env`
/// is the sandbox's environment; the request's is laid over it.
pub(crate) async fn run(
    root: &Root,
    base_env: &BTreeMap<String, String>,
    plan: &ExecPlan,
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
        stdout: sink.text(OutputStream::Stdout),
        stderr: sink.text(OutputStream::Stderr),
        duration_ns: u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
        truncated: sink.truncated,
        timed_out,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::mock::fs::tests::TempDir;

    #[test]
    fn the_workdir_must_exist_inside_the_root() {
        let t = TempDir::new("exec-validate");
        let root = Root::new(&t.0);
        std::fs::write(t.0.join("file"), b"").unwrap();
        std::os::unix::fs::symlink("/", t.0.join("up")).unwrap();
        let workdir_of = |workdir: &str| {
            let req = ExecRequest {
                workdir: workdir.into(),
                ..ExecRequest::new(["true"])
            };
            validate(&root, req).map(|p| p.workdir)
        };
        assert_eq!(workdir_of("/up").unwrap(), "/up");
        for (dir, problem) in [("/nope", "does not exist"), ("/file", "is not a directory")] {
            let e = workdir_of(dir).unwrap_err();
            assert_eq!(e.message, format!("workdir {dir} {problem}"));
        }
    }

    #[tokio::test]
    async fn limits_and_truncation() {
        let mut s = Sink::collect(4);
        s.write(OutputStream::Stdout, b"ab").await;
        s.write(OutputStream::Stdout, b"cdef").await;
        s.write(OutputStream::Stderr, "é€".as_bytes()).await; // cut inside '€'
        assert!(s.truncated);
        assert_eq!(s.text(OutputStream::Stdout), "abcd");
        assert_eq!(s.text(OutputStream::Stderr), "é");
    }

    #[tokio::test]
    async fn streamed_events_are_ndjson() {
        let (tx, mut rx) = mpsc::channel(8);
        let mut s = Sink::streaming(1 << 20, tx);
        s.write(OutputStream::Stdout, b"hi\n").await;
        let line = rx.recv().await.unwrap().unwrap();
        let ev: ExecEvent = serde_json::from_slice(&line).unwrap();
        assert_eq!((ev.stream.as_str(), ev.data.as_str()), ("stdout", "hi\n"));
        // Big output comes in several events, split on characters.
        let big = "é".repeat(EVENT_CHUNK); // 2 bytes each
        s.write(OutputStream::Stderr, big.as_bytes()).await;
        let mut got = String::new();
        for _ in 0..2 {
            let line = rx.recv().await.unwrap().unwrap();
            let ev: ExecEvent = serde_json::from_slice(&line).unwrap();
            assert!(ev.data.len() <= EVENT_CHUNK);
            got.push_str(&ev.data);
        }
        assert_eq!(got, big);
        drop(rx);
        s.write(OutputStream::Stdout, b"more").await;
        assert!(s.gone());
    }

    #[tokio::test]
    async fn timeouts_answer_like_the_agent() {
        let t = TempDir::new("exec-timeout");
        let root = Root::new(&t.0);
        let r = ExecRequest {
            workdir: "/".into(),
            timeout_ms: 100,
            ..ExecRequest::new(["/bin/sh", "-c", "echo started; sleep 10; echo never"])
        };
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
