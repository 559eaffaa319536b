//! The data plane: exec and file operations, forwarded to each sandbox's agent.

use super::{check_env_pair, check_path, shell_quote, Engine, ExecInput};
use crate::clock::now_ms;
use crate::duration;
use crate::error::{Error, ErrorCode};
use bytes::Bytes;
use stacyvm_agent_proto::{path, ExecRequest, ExecResult, FileEntry, Stats, WriteResult};
use stacyvm_providers::agent::{full_body, AgentBody, AgentClient, AgentError, Incoming};
use stacyvm_store::SandboxState;
use std::time::{Duration, Instant};

impl Engine {
    fn live_agent(&self, id: &str) -> Option<AgentClient> {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.get(id).map(|l| l.agent.clone())
    }

    /// The agent of a running sandbox, or the right error for its state.
    pub(super) async fn agent(&self, id: &str) -> Result<AgentClient, Error> {
        if let Some(agent) = self.live_agent(id) {
            return Ok(agent);
        }
        let rec = self.get(id).await?;
        let why = rec
            .error
            .as_deref()
            .map(|e| format!(": {e}"))
            .unwrap_or_default();
        Err(Error::new(
            ErrorCode::Conflict,
            format!("sandbox {id} is {}{why}", rec.state),
        ))
    }

    /// Map an agent failure: a sandbox that disappeared meanwhile is a 404;
    /// an unreachable agent of a sandbox whose runtime is gone marks it `error`.
    pub(super) async fn agent_failed(&self, id: &str, e: AgentError) -> Error {
        match e {
            AgentError::Status { .. } => e.into(),
            other => {
                if let Err(nf) = self.get(id).await {
                    return nf;
                }
                if let Ok(rec) = self.get(id).await {
                    if let Ok(p) = self.provider(&rec.provider) {
                        let gone = !matches!(p.inspect(id).await, Ok(Some(rt)) if rt.running);
                        if gone && rec.state == SandboxState::Running {
                            tracing::warn!(sandbox = %id, "runtime is gone; marking sandbox as error");
                            self.live
                                .write()
                                .unwrap_or_else(|p| p.into_inner())
                                .remove(id);
                            let idc = id.to_string();
                            let _ = self
                                .db(move |s| {
                                    s.transition(
                                        &idc,
                                        SandboxState::Error,
                                        Some("the sandbox's runtime stopped unexpectedly"),
                                        now_ms(),
                                    )
                                })
                                .await;
                        }
                    }
                }
                Error::new(
                    ErrorCode::ProviderError,
                    format!("sandbox {id} did not answer: {other}"),
                )
            }
        }
    }

    /// Validate an exec body into the agent's request and the timeout.
    pub fn prepare_exec(&self, input: &ExecInput) -> Result<(ExecRequest, Duration), Error> {
        let command = input.command.as_deref().unwrap_or("");
        if command.trim().is_empty() {
            return Err(Error::invalid("command is required"));
        }
        let has_nul = command.contains('\0') || input.args.iter().any(|a| a.contains('\0'));
        if has_nul {
            return Err(Error::invalid(
                "command and args must not contain NUL bytes",
            ));
        }
        let argv = match input.mode.as_deref().unwrap_or("shell") {
            "shell" | "" => {
                let mut line = command.to_string();
                for a in &input.args {
                    line.push(' ');
                    line.push_str(&shell_quote(a));
                }
                vec!["/bin/sh".to_string(), "-c".to_string(), line]
            }
            "argv" => {
                let mut v = vec![command.to_string()];
                v.extend(input.args.iter().cloned());
                v
            }
            other => {
                return Err(Error::invalid(format!(
                    "mode must be \"shell\" or \"argv\", not {other:?}"
                )))
            }
        };
        for (k, v) in &input.env {
            check_env_pair(k, v)?;
        }
        let workdir = match input.workdir.as_deref() {
            None | Some("") => stacyvm_agent_proto::DEFAULT_WORKDIR.to_string(),
            Some(w) => path::normalize(w)
                .map_err(|e| Error::invalid(format!("invalid workdir {w:?}: {e}")))?,
        };
        let timeout = match input.timeout.as_deref() {
            None | Some("") => self.cfg.default_exec_timeout,
            Some(t) => {
                let d = duration::parse(t).map_err(|e| Error::invalid(e.to_string()))?;
                if d.is_zero() {
                    self.cfg.max_exec_timeout
                } else {
                    d
                }
            }
        };
        if timeout > self.cfg.max_exec_timeout {
            return Err(Error::new(
                ErrorCode::QuotaExceeded,
                format!(
                    "exec timeout {} exceeds the maximum of {}",
                    duration::format(timeout),
                    duration::format(self.cfg.max_exec_timeout)
                ),
            ));
        }
        if input
            .stdin
            .as_deref()
            .is_some_and(|s| s.len() > self.cfg.max_body_bytes as usize)
        {
            return Err(Error::new(ErrorCode::PayloadTooLarge, "stdin is too large"));
        }
        Ok((
            ExecRequest {
                argv,
                env: input.env.clone(),
                workdir,
                timeout_ms: timeout.as_millis().max(1) as u64,
                stdin: input.stdin.clone(),
                output_limit: self.cfg.output_limit_bytes,
                stream: input.stream,
            },
            timeout,
        ))
    }

    /// Run a command to completion. A timed-out result is returned as such
    /// (`timed_out`); the caller decides how to answer it.
    pub async fn exec(&self, id: &str, req: &ExecRequest) -> Result<ExecResult, Error> {
        let agent = self.agent(id).await?;
        let start = Instant::now();
        // The agent enforces the timeout itself; this guard only covers an
        // agent that stops answering.
        let guard = Duration::from_millis(req.timeout_ms) + Duration::from_secs(5);
        let res = match tokio::time::timeout(guard, agent.exec(req)).await {
            Ok(Ok(r)) => r,
            Ok(Err(e)) => {
                self.metrics
                    .exec_errors
                    .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                return Err(self.agent_failed(id, e).await);
            }
            Err(_) => ExecResult {
                exit_code: -1,
                stdout: String::new(),
                stderr: String::new(),
                duration_ns: start.elapsed().as_nanos() as u64,
                truncated: false,
                timed_out: true,
            },
        };
        self.metrics.observe_exec(start.elapsed());
        if res.timed_out {
            self.metrics
                .exec_timeouts
                .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        }
        Ok(res)
    }

    /// Start a streamed exec; the body is the agent's NDJSON event stream.
    pub async fn exec_stream(&self, id: &str, req: &ExecRequest) -> Result<Incoming, Error> {
        let agent = self.agent(id).await?;
        self.metrics
            .execs
            .fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        match agent.exec_stream(req).await {
            Ok(b) => Ok(b),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn write_file(
        &self,
        id: &str,
        path: &str,
        mode: Option<&str>,
        body: AgentBody,
    ) -> Result<WriteResult, Error> {
        let path = check_path(path)?;
        if let Some(m) = mode {
            if stacyvm_agent_proto::parse_mode(m).is_none() {
                return Err(Error::invalid(format!(
                    "mode {m:?} is not an octal permission like 644"
                )));
            }
        }
        let agent = self.agent(id).await?;
        match agent.write_file(&path, mode, body).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn write_bytes(
        &self,
        id: &str,
        path: &str,
        mode: Option<&str>,
        data: Bytes,
    ) -> Result<WriteResult, Error> {
        self.write_file(id, path, mode, full_body(data)).await
    }

    pub async fn read_file(&self, id: &str, path: &str) -> Result<(Incoming, Option<u64>), Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.read_file(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn delete_file(&self, id: &str, path: &str, recursive: bool) -> Result<(), Error> {
        let path = check_path(path)?;
        if path == "/" {
            return Err(Error::invalid("refusing to delete /"));
        }
        let agent = self.agent(id).await?;
        match agent.delete(&path, recursive).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn list_files(&self, id: &str, path: &str) -> Result<Vec<FileEntry>, Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.list(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn stat_file(&self, id: &str, path: &str) -> Result<FileEntry, Error> {
        let path = check_path(path)?;
        let agent = self.agent(id).await?;
        match agent.stat(&path).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn glob(&self, id: &str, pattern: &str) -> Result<Vec<String>, Error> {
        if pattern.is_empty() {
            return Err(Error::invalid("pattern is required"));
        }
        check_path(pattern)?;
        let agent = self.agent(id).await?;
        match agent.glob(pattern).await {
            Ok(r) => Ok(r),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn move_file(&self, id: &str, from: &str, to: &str) -> Result<(), Error> {
        let from = check_path(from)?;
        let to = check_path(to)?;
        if from == "/" {
            return Err(Error::invalid("refusing to move /"));
        }
        let agent = self.agent(id).await?;
        match agent.rename(&from, &to).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    pub async fn chmod(&self, id: &str, path: &str, mode: &str) -> Result<(), Error> {
        let path = check_path(path)?;
        if stacyvm_agent_proto::parse_mode(mode).is_none() {
            return Err(Error::invalid(format!(
                "mode {mode:?} is not an octal permission like 755"
            )));
        }
        let agent = self.agent(id).await?;
        match agent.chmod(&path, mode).await {
            Ok(_) => Ok(()),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }

    /// The sandbox's own log: lifecycle lines from the store, then the
    /// agent's diagnostics (when it runs), the last `lines` of them.
    pub async fn logs(&self, id: &str, lines: usize) -> Result<Vec<String>, Error> {
        let rec = self.get(id).await?;
        let idc = id.to_string();
        let mut out: Vec<String> = self
            .db(move |s| s.events(&idc, lines))
            .await?
            .into_iter()
            .map(|(at, msg)| format!("{} [stacyvm] {msg}", crate::clock::rfc3339_ms(at)))
            .collect();
        let live = self.live_agent(id);
        if let Some(agent) = live {
            match agent.logs(lines).await {
                Ok(agent_lines) => out.extend(agent_lines),
                Err(e) => out.push(format!("[stacyvm] agent log unavailable: {e}")),
            }
        } else if let Ok(p) = self.provider(&rec.provider) {
            out.extend(p.logs(id, lines).await);
        }
        // Both sources start with an RFC 3339 timestamp; a stable sort merges them.
        out.sort_by(|a, b| a.split(' ').next().cmp(&b.split(' ').next()));
        let skip = out.len().saturating_sub(lines);
        Ok(out.split_off(skip))
    }

    pub async fn stats(&self, id: &str) -> Result<Stats, Error> {
        let agent = self.agent(id).await?;
        match agent.stats().await {
            Ok(s) => Ok(s),
            Err(e) => Err(self.agent_failed(id, e).await),
        }
    }
}
