//! `POST /v1/exec`: run one argv, collect or stream its output, enforce the
//! timeout by killing the whole process tree.

use crate::alog;
use crate::body::{self, Body, BodySender};
use crate::error::{io_message, ApiError};
use crate::mem;
use crate::proctree::kill_tree;
use crate::reaper::{exit_code, Reaper, WaitStatus};
use crate::utf8::{incomplete_tail, lossy, Utf8Chunker};
use bytes::Bytes;
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::Response;
use stacyvm_agent_proto::request::{plan_exec, ExecPlan as Plan};
use stacyvm_agent_proto::{ExecEvent, ExecRequest, ExecResult, OutputStream, TIMEOUT_EXIT_CODE};
use std::collections::VecDeque;
use std::io;
use std::os::fd::OwnedFd;
use std::os::unix::process::CommandExt;
use std::process::{Command, Stdio};
use std::time::Duration;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{mpsc, oneshot};
use tokio::time::{sleep_until, Instant};

/// How long to keep reading output after the main process exited, for
/// background processes that still hold the pipes.
const DRAIN_GRACE: Duration = Duration::from_millis(100);
/// How long to wait for the killed process to be reaped after a timeout.
const KILL_GRACE: Duration = Duration::from_millis(50);
/// Size of one read from an output pipe.
const READ_CHUNK: usize = 64 * 1024;
/// Streamed output waiting for a slow client before reads pause.
const MAX_PENDING: usize = 1024 * 1024;

// What the protocol says a command killed at its timeout exits with.
const _: () = assert!(TIMEOUT_EXIT_CODE == 128 + libc::SIGKILL);

/// Check a request (the working directory must exist here).
fn validate(req: ExecRequest) -> Result<Plan, ApiError> {
    plan_exec(req, |workdir| {
        std::fs::metadata(workdir).map(|m| m.is_dir())
    })
}

/// Handle `POST /v1/exec`.
pub async fn handle(reaper: Reaper, req: ExecRequest) -> Result<Response<Body>, ApiError> {
    let plan = validate(req)?;
    if !plan.req.stream {
        let result = run(&reaper, plan, None).await?;
        return Ok(body::ok(&result));
    }
    let (tx, body) = Body::channel(16);
    // Spawn here so a spawn-time failure still answers with an error status.
    let started = start(&reaper, &plan)?;
    tokio::spawn(async move {
        let _ = drive(plan, started, Some(tx)).await;
    });
    let mut resp = Response::new(body);
    resp.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("application/x-ndjson"),
    );
    Ok(resp)
}

/// A spawned process, or the reason it could not be started.
enum Started {
    Running(Running),
    Failed { code: i32, message: String },
}

struct Running {
    pid: i32,
    status: oneshot::Receiver<WaitStatus>,
    stdout: Option<pipe::Receiver>,
    stderr: Option<pipe::Receiver>,
    stdin_task: Option<tokio::task::JoinHandle<()>>,
    started: Instant,
}

/// Kills the process tree if the exec is abandoned before the main process
/// exited (e.g. the request future was dropped).
struct TreeGuard {
    pid: i32,
    armed: bool,
}

impl Drop for TreeGuard {
    fn drop(&mut self) {
        if self.armed {
            kill_tree(self.pid);
            alog!(
                "exec pid={} abandoned (client went away); killed its process tree",
                self.pid
            );
        }
    }
}

fn start(reaper: &Reaper, plan: &Plan) -> Result<Started, ApiError> {
    let argv = &plan.req.argv;
    let mut cmd = Command::new(&argv[0]);
    cmd.args(&argv[1..])
        .envs(&plan.req.env)
        .current_dir(&plan.workdir)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .stdin(if plan.req.stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        });
    // SAFETY: the closure only calls async-signal-safe functions.
    unsafe {
        cmd.pre_exec(|| {
            // Lead a new session and process group so the whole tree can be
            // killed at once.
            if libc::setsid() < 0 {
                return Err(io::Error::last_os_error());
            }
            // Start with default dispositions for the signals the agent handles.
            for sig in [libc::SIGPIPE, libc::SIGINT, libc::SIGTERM, libc::SIGCHLD] {
                libc::signal(sig, libc::SIG_DFL);
            }
            Ok(())
        });
    }
    let started = Instant::now();
    let (mut child, status) = match reaper.spawn(&mut cmd) {
        Ok(c) => c,
        Err(e) => return spawn_failure(&argv[0], &e),
    };
    let pid = child.id() as i32;
    let stdout = child.stdout.take().map(OwnedFd::from);
    let stderr = child.stderr.take().map(OwnedFd::from);
    let stdin = child.stdin.take().map(OwnedFd::from);
    // From here on the process runs; a guard kills it if we bail out.
    let mut guard = TreeGuard { pid, armed: true };
    let to_pipe = |fd: Option<OwnedFd>| -> Result<Option<pipe::Receiver>, ApiError> {
        fd.map(pipe::Receiver::from_owned_fd)
            .transpose()
            .map_err(|e| ApiError::internal(format!("cannot watch output pipe: {e}")))
    };
    let stdout = to_pipe(stdout)?;
    let stderr = to_pipe(stderr)?;
    let stdin_task = match (stdin, plan.req.stdin.as_ref()) {
        (Some(fd), Some(data)) if !data.is_empty() => {
            let mut tx = pipe::Sender::from_owned_fd(fd)
                .map_err(|e| ApiError::internal(format!("cannot open stdin pipe: {e}")))?;
            let data = Bytes::copy_from_slice(data.as_bytes());
            Some(tokio::spawn(async move {
                // EPIPE just means the program did not read all of it.
                let _ = tx.write_all(&data).await;
            }))
        }
        _ => None, // empty stdin: dropping the fd closes it right away
    };
    guard.armed = false;
    Ok(Started::Running(Running {
        pid,
        status,
        stdout,
        stderr,
        stdin_task,
        started,
    }))
}

fn spawn_failure(argv0: &str, e: &io::Error) -> Result<Started, ApiError> {
    let code = match e.raw_os_error() {
        Some(libc::EMFILE) | Some(libc::ENFILE) | Some(libc::ENOMEM) | Some(libc::EAGAIN) => {
            alog!("exec {argv0:?}: cannot spawn: {e}");
            return Err(ApiError::internal(format!(
                "cannot start process: {}",
                io_message(e)
            )));
        }
        Some(libc::EACCES) | Some(libc::EPERM) => 126,
        _ => 127,
    };
    alog!("exec {argv0:?}: cannot execute: {}", io_message(e));
    Ok(Started::Failed {
        code,
        message: format!("stacyvm: cannot execute '{argv0}': {}\n", io_message(e)),
    })
}

async fn run(reaper: &Reaper, plan: Plan, tx: Option<BodySender>) -> Result<ExecResult, ApiError> {
    let started = start(reaper, &plan)?;
    Ok(drive(plan, started, tx).await)
}

/// Accumulated output: collected in memory, or turned into NDJSON events
/// waiting to be sent.
struct Output {
    limit: usize,
    kept: [usize; 2],
    truncated: bool,
    streaming: bool,
    collected: [Vec<u8>; 2],
    chunkers: [Utf8Chunker; 2],
    pending: VecDeque<Bytes>,
    pending_bytes: usize,
}

impl Output {
    fn new(limit: usize, streaming: bool) -> Self {
        Output {
            limit,
            kept: [0, 0],
            truncated: false,
            streaming,
            collected: [Vec::new(), Vec::new()],
            chunkers: [Utf8Chunker::default(), Utf8Chunker::default()],
            pending: VecDeque::new(),
            pending_bytes: 0,
        }
    }

    fn accepting(&self) -> bool {
        self.pending_bytes < MAX_PENDING
    }

    /// Take a chunk read from `which`, honouring the limit.
    fn push(&mut self, which: OutputStream, data: &[u8]) {
        let i = which.index();
        let room = self.limit.saturating_sub(self.kept[i]);
        let take = room.min(data.len());
        if take < data.len() {
            self.truncated = true;
        }
        if take == 0 {
            return;
        }
        self.kept[i] += take;
        let data = &data[..take];
        if self.streaming {
            let text = self.chunkers[i].push(data);
            self.queue_text(which, text);
        } else {
            self.collected[i].extend_from_slice(data);
        }
    }

    /// End of `which`: flush a carried incomplete character.
    fn finish(&mut self, which: OutputStream) {
        if self.streaming {
            let text = self.chunkers[which.index()].finish();
            self.queue_text(which, text);
        }
    }

    fn queue_text(&mut self, which: OutputStream, text: String) {
        if text.is_empty() {
            return;
        }
        self.queue_event(&ExecEvent::output(which, text));
    }

    fn queue_event(&mut self, ev: &ExecEvent) {
        let line = ev.to_line();
        self.pending_bytes += line.len();
        self.pending.push_back(Bytes::from(line));
    }

    fn pop(&mut self) -> Option<Bytes> {
        let b = self.pending.pop_front()?;
        self.pending_bytes -= b.len();
        Some(b)
    }

    /// The collected output of `which` as a string.
    fn text(&mut self, which: OutputStream) -> String {
        let mut bytes = std::mem::take(&mut self.collected[which.index()]);
        if self.truncated {
            // The cut may have split a character.
            let keep = bytes.len() - incomplete_tail(&bytes);
            bytes.truncate(keep);
        }
        lossy(bytes)
    }
}

async fn read_pipe(pipe: &mut Option<pipe::Receiver>, buf: &mut [u8]) -> io::Result<usize> {
    match pipe {
        Some(p) => p.read(buf).await,
        None => std::future::pending().await,
    }
}

/// Read and drop everything from `pipe` until its writers are gone.
async fn discard(mut pipe: pipe::Receiver) {
    let mut buf = vec![0u8; 16 * 1024];
    while let Ok(n) = pipe.read(&mut buf).await {
        if n == 0 {
            break;
        }
    }
}

async fn reserve(tx: &Option<BodySender>) -> Option<mpsc::Permit<'_, io::Result<Bytes>>> {
    match tx {
        Some(t) => t.reserve().await.ok(),
        None => std::future::pending().await,
    }
}

async fn closed(tx: &Option<BodySender>) {
    match tx {
        Some(t) => t.closed().await,
        None => std::future::pending().await,
    }
}

async fn sleep_opt(at: Option<Instant>) {
    match at {
        Some(t) => sleep_until(t).await,
        None => std::future::pending().await,
    }
}

/// Where the exec is in its life.
#[derive(Clone, Copy, PartialEq)]
enum Phase {
    /// The main process runs; the wake-up is the timeout, if any.
    Running,
    /// The main process exited; reading what background processes still write.
    Draining(Instant),
    /// Timed out and killed; waiting briefly for the reaper.
    Killed(Instant),
}

/// Run the exec to completion, feeding output to `tx` when streaming, and
/// return the result (which is also sent as the final event when streaming).
async fn drive(plan: Plan, started: Started, mut tx: Option<BodySender>) -> ExecResult {
    let argv0 = plan.req.argv[0].clone();
    let mut output = Output::new(plan.limit, tx.is_some());
    let run = match started {
        Started::Running(r) => r,
        Started::Failed { code, message } => {
            output.push(OutputStream::Stderr, message.as_bytes());
            output.finish(OutputStream::Stderr);
            let result = ExecResult {
                exit_code: code,
                stdout: String::new(),
                stderr: output.text(OutputStream::Stderr),
                duration_ns: 0,
                truncated: false,
                timed_out: false,
            };
            finish_stream(&mut tx, &mut output, &result).await;
            return result;
        }
    };
    let Running {
        pid,
        status: mut status_rx,
        mut stdout,
        mut stderr,
        stdin_task,
        started,
    } = run;
    let mut guard = TreeGuard { pid, armed: true };
    let deadline = match plan.req.timeout_ms {
        0 => None,
        // An absurdly far deadline is no deadline.
        ms => started.checked_add(Duration::from_millis(ms)),
    };
    let mut out_buf = vec![0u8; READ_CHUNK];
    let mut err_buf = vec![0u8; READ_CHUNK];
    let mut status: Option<WaitStatus> = None;
    let mut duration = Duration::ZERO;
    let mut phase = Phase::Running;
    let mut timed_out = false;
    let mut client_gone = false;

    loop {
        if status.is_some() && stdout.is_none() && stderr.is_none() {
            break;
        }
        let wake = match phase {
            Phase::Running => deadline,
            Phase::Draining(t) | Phase::Killed(t) => Some(t),
        };
        let accepting = output.accepting();
        let has_pending = !output.pending.is_empty();
        tokio::select! {
            r = read_pipe(&mut stdout, &mut out_buf), if accepting && stdout.is_some() => match r {
                Ok(n) if n > 0 => output.push(OutputStream::Stdout, &out_buf[..n]),
                _ => {
                    stdout = None;
                    output.finish(OutputStream::Stdout);
                }
            },
            r = read_pipe(&mut stderr, &mut err_buf), if accepting && stderr.is_some() => match r {
                Ok(n) if n > 0 => output.push(OutputStream::Stderr, &err_buf[..n]),
                _ => {
                    stderr = None;
                    output.finish(OutputStream::Stderr);
                }
            },
            s = &mut status_rx, if status.is_none() => {
                // A dropped sender cannot happen while the reaper runs; treat
                // it as an unknown status rather than waiting forever.
                status = Some(s.unwrap_or(-1));
                guard.armed = false;
                if phase == Phase::Running {
                    duration = started.elapsed();
                    phase = Phase::Draining(Instant::now() + DRAIN_GRACE);
                }
            },
            permit = reserve(&tx), if has_pending => match permit {
                Some(p) => {
                    if let Some(b) = output.pop() {
                        p.send(Ok(b));
                    }
                }
                None => {
                    client_gone = true;
                    break;
                }
            },
            _ = closed(&tx) => {
                client_gone = true;
                break;
            },
            _ = sleep_opt(wake) => match phase {
                Phase::Running => {
                    timed_out = true;
                    duration = started.elapsed();
                    kill_tree(pid);
                    guard.armed = false;
                    alog!(
                        "exec {argv0:?} pid={pid} timed out after {} ms; killed its process tree",
                        plan.req.timeout_ms
                    );
                    phase = Phase::Killed(Instant::now() + KILL_GRACE);
                }
                Phase::Draining(_) | Phase::Killed(_) => break,
            },
        }
    }
    if let Some(t) = stdin_task {
        t.abort();
    }
    if client_gone {
        if status.is_none() {
            kill_tree(pid);
            guard.armed = false;
        }
        alog!("exec {argv0:?} pid={pid}: client went away; killed its process tree");
    }
    drop(guard);
    // Background processes may still hold the pipes. Keep draining them
    // (discarding) so those processes don't die of SIGPIPE on their next
    // write once the answer is out.
    for (pipe, which) in [
        (stdout.take(), OutputStream::Stdout),
        (stderr.take(), OutputStream::Stderr),
    ] {
        if let Some(p) = pipe {
            output.finish(which);
            tokio::spawn(discard(p));
        }
    }
    let exit = match status {
        Some(s) => exit_code(s),
        None if timed_out => TIMEOUT_EXIT_CODE,
        None => -1,
    };
    if duration.is_zero() {
        duration = started.elapsed();
    }
    alog!(
        "exec {argv0:?} pid={pid} exit={exit} duration={:.3}ms{}",
        duration.as_secs_f64() * 1000.0,
        if timed_out { " timed_out" } else { "" }
    );
    mem::transferred((output.kept[0] + output.kept[1]) as u64);
    let result = ExecResult {
        exit_code: exit,
        stdout: output.text(OutputStream::Stdout),
        stderr: output.text(OutputStream::Stderr),
        duration_ns: u64::try_from(duration.as_nanos()).unwrap_or(u64::MAX),
        truncated: output.truncated,
        timed_out,
    };
    if !client_gone {
        finish_stream(&mut tx, &mut output, &result).await;
    }
    result
}

/// When streaming, send what is still queued and the final `exit` event.
async fn finish_stream(tx: &mut Option<BodySender>, output: &mut Output, result: &ExecResult) {
    let Some(sender) = tx.take() else { return };
    output.queue_event(&ExecEvent::exit(result));
    while let Some(b) = output.pop() {
        if sender.send(Ok(b)).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Check `true` run in `workdir`: the working directory, or the message.
    fn check(workdir: &str) -> Result<String, String> {
        let req = ExecRequest {
            workdir: workdir.into(),
            ..ExecRequest::new(["true"])
        };
        validate(req).map(|p| p.workdir).map_err(|e| e.message)
    }

    #[test]
    fn the_workdir_must_be_a_directory_here() {
        assert_eq!(check("/tmp/"), Ok("/tmp".into()));
        let missing = check("/definitely/not/here").unwrap_err();
        assert_eq!(missing, "workdir /definitely/not/here does not exist");
        let file = check("/proc/self/status").unwrap_err();
        assert_eq!(file, "workdir /proc/self/status is not a directory");
    }

    #[test]
    fn output_limit_and_truncation() {
        let mut o = Output::new(4, false);
        o.push(OutputStream::Stdout, b"ab");
        o.push(OutputStream::Stdout, b"cdef");
        o.push(OutputStream::Stderr, "é€".as_bytes()); // 5 bytes, cut inside '€'
        assert!(o.truncated);
        assert_eq!(o.text(OutputStream::Stdout), "abcd");
        assert_eq!(o.text(OutputStream::Stderr), "é");
    }

    #[test]
    fn streamed_events_are_ndjson() {
        let mut o = Output::new(100, true);
        o.push(OutputStream::Stdout, b"hi\n");
        o.push(OutputStream::Stderr, &"€".as_bytes()[..1]);
        assert_eq!(o.pending.len(), 1);
        o.push(OutputStream::Stderr, &"€".as_bytes()[1..]);
        let a = o.pop().unwrap();
        let b = o.pop().unwrap();
        assert!(o.pop().is_none());
        assert_eq!(o.pending_bytes, 0);
        let a: ExecEvent = serde_json::from_slice(&a).unwrap();
        let b: ExecEvent = serde_json::from_slice(&b).unwrap();
        assert_eq!((a.stream.as_str(), a.data.as_str()), ("stdout", "hi\n"));
        assert_eq!((b.stream.as_str(), b.data.as_str()), ("stderr", "€"));
    }
}
