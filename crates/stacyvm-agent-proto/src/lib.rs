//! Wire types shared by the StacyVM server and the in-sandbox agent.
//!
//! The agent speaks plain HTTP/1.1 on a Unix socket. Every route lives under
//! `/v1`. Requests and answers are JSON unless noted; file contents travel as
//! raw bodies so large transfers stream without re-encoding.
//!
//! | method, path            | body / query                         | answer |
//! |-------------------------|--------------------------------------|--------|
//! | `GET /v1/health`        |                                      | [`Health`] |
//! | `POST /v1/exec`         | [`ExecRequest`]                      | [`ExecResult`], or NDJSON [`ExecEvent`]s when `stream` |
//! | `GET /v1/files`         | `?path=`                             | raw bytes |
//! | `PUT /v1/files`         | `?path=&mode=` raw body              | [`WriteResult`] |
//! | `DELETE /v1/files`      | `?path=&recursive=true`              | [`Status`] |
//! | `GET /v1/files/list`    | `?path=`                             | `[FileEntry]` |
//! | `GET /v1/files/stat`    | `?path=`                             | [`FileEntry`] |
//! | `GET /v1/files/glob`    | `?pattern=`                          | `[String]` |
//! | `POST /v1/files/move`   | [`MoveRequest`]                      | [`Status`] |
//! | `POST /v1/files/chmod`  | [`ChmodRequest`]                     | [`Status`] |
//! | `GET /v1/logs`          | `?lines=`                            | `[String]` |
//! | `GET /v1/stats`         |                                      | [`Stats`] |
//! | `GET /v1/tunnel`        | `?port=`, `Connection: Upgrade`, `Upgrade: tcp` | `101`, then raw bytes (see below) |
//!
//! Every non-2xx answer carries an [`ErrorBody`] whose `code` uses the public
//! API's codes (`invalid_request`, `file_not_found`, `conflict`, `internal`).
//!
//! ## The TCP tunnel
//!
//! `GET /v1/tunnel?port=N` with `Connection: Upgrade` and
//! [`Upgrade: tcp`](TUNNEL_UPGRADE) asks the agent to connect to
//! `127.0.0.1:N` (then `[::1]:N`) **inside the sandbox's network namespace**
//! (the agent is PID 1 there, so that is the sandbox's own loopback). When the
//! connection is made the agent answers `101 Switching Protocols` with
//! `Upgrade: tcp`, and from then on the Unix-socket connection is a raw,
//! full-duplex byte pipe to that TCP connection: bytes are copied both ways
//! unchanged, and an end of stream (half-close) on one side is passed on to
//! the other. The server's live-preview proxy speaks HTTP/1.1 (and WebSocket)
//! to the app through it. Errors are ordinary answers instead of the `101`:
//! `400 invalid_request` (port outside 1–65535, no upgrade headers) or
//! `502` [`codes::PORT_CLOSED`] when nothing accepts connections on the port.

pub mod path;

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// Where the agent binary is mounted inside every sandbox.
pub const AGENT_PATH_IN_SANDBOX: &str = "/.stacyvm/stacyvm-agent";
/// Directory inside the sandbox that holds the agent's socket (bind-mounted from the host).
pub const RUN_DIR_IN_SANDBOX: &str = "/.stacyvm/run";
/// File name of the agent socket inside [`RUN_DIR_IN_SANDBOX`].
pub const SOCKET_NAME: &str = "agent.sock";
/// Paths under this prefix belong to StacyVM and are refused by file operations.
pub const RESERVED_PREFIX: &str = "/.stacyvm";
/// The default working directory of execs; the agent creates it at start.
pub const DEFAULT_WORKDIR: &str = "/workspace";
/// The `Upgrade` protocol token of `GET /v1/tunnel`.
pub const TUNNEL_UPGRADE: &str = "tcp";

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
}

/// One command to run. The server has already turned shell mode into
/// `["/bin/sh", "-c", line]`; the agent only ever sees an argv.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, Default)]
pub struct ExecRequest {
    pub argv: Vec<String>,
    /// Extra environment on top of the agent's own (the image's) environment.
    #[serde(default)]
    pub env: BTreeMap<String, String>,
    /// Absolute working directory; must exist.
    #[serde(default = "default_workdir")]
    pub workdir: String,
    /// Kill the whole process tree after this many milliseconds (0 = no limit).
    #[serde(default)]
    pub timeout_ms: u64,
    /// Bytes fed to stdin, then stdin is closed. `None` = stdin is /dev/null.
    #[serde(default)]
    pub stdin: Option<String>,
    /// Keep at most this many bytes per stream (0 = default of 16 MiB).
    #[serde(default)]
    pub output_limit: u64,
    /// Answer NDJSON events as output arrives instead of one [`ExecResult`].
    #[serde(default)]
    pub stream: bool,
}

fn default_workdir() -> String {
    DEFAULT_WORKDIR.to_string()
}

/// Default cap per output stream.
pub const DEFAULT_OUTPUT_LIMIT: u64 = 16 * 1024 * 1024;

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecResult {
    /// Exit status; `128 + signal` when killed by a signal; 127 when the
    /// program could not be started (the reason is in `stderr`).
    pub exit_code: i32,
    pub stdout: String,
    pub stderr: String,
    /// Wall time from spawn to exit, in nanoseconds.
    pub duration_ns: u64,
    #[serde(default)]
    pub truncated: bool,
    #[serde(default)]
    pub timed_out: bool,
}

/// One NDJSON line of a streamed exec. Output lines have `stream` =
/// `stdout`/`stderr` and `data`; the last line has `stream` = `exit` and carries
/// `exit_code`, `duration_ns`, `timed_out` and `truncated`. Output chunks are
/// split on UTF-8 character boundaries.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ExecEvent {
    pub stream: String,
    pub data: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exit_code: Option<i32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_ns: Option<u64>,
    #[serde(default, skip_serializing_if = "is_false")]
    pub timed_out: bool,
    #[serde(default, skip_serializing_if = "is_false")]
    pub truncated: bool,
}

fn is_false(b: &bool) -> bool {
    !*b
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct FileEntry {
    pub path: String,
    pub name: String,
    pub size: u64,
    /// Octal permission bits without a leading zero, e.g. `"644"`.
    pub mode: String,
    pub is_dir: bool,
    /// RFC 3339 UTC.
    pub mod_time: String,
    #[serde(default, skip_serializing_if = "is_false")]
    pub is_symlink: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct WriteResult {
    pub size: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct MoveRequest {
    pub old_path: String,
    pub new_path: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ChmodRequest {
    pub path: String,
    /// Octal digits, with or without a leading zero (`"755"`, `"0644"`).
    pub mode: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Status {
    pub status: String,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Stats {
    pub cpu_pct: f64,
    pub mem_bytes: u64,
    pub mem_limit_bytes: u64,
    pub pids: u64,
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct ErrorBody {
    pub code: String,
    pub message: String,
}

/// Error codes the agent uses (a subset of the public API's).
pub mod codes {
    pub const INVALID_REQUEST: &str = "invalid_request";
    pub const FILE_NOT_FOUND: &str = "file_not_found";
    pub const CONFLICT: &str = "conflict";
    pub const FORBIDDEN: &str = "forbidden";
    pub const INTERNAL: &str = "internal";
    /// `GET /v1/tunnel`: nothing accepts connections on the port (HTTP 502).
    pub const PORT_CLOSED: &str = "port_closed";
}

/// Percent-encode a query-string value: everything but unreserved
/// characters and `/` is escaped (so `+` travels as `%2B`, never as a space).
pub fn percent_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        match b {
            b'A'..=b'Z' | b'a'..=b'z' | b'0'..=b'9' | b'-' | b'_' | b'.' | b'~' | b'/' => {
                out.push(b as char)
            }
            _ => out.push_str(&format!("%{b:02X}")),
        }
    }
    out
}

/// Parse an octal permission string (`"755"`, `"0644"`) into mode bits.
pub fn parse_mode(s: &str) -> Option<u32> {
    let digits = s.strip_prefix("0o").unwrap_or(s);
    if digits.is_empty() || digits.len() > 5 || !digits.bytes().all(|b| (b'0'..=b'7').contains(&b))
    {
        return None;
    }
    let v = u32::from_str_radix(digits, 8).ok()?;
    (v <= 0o7777).then_some(v)
}

/// Render mode bits the way the API shows them: octal, no leading zero.
pub fn format_mode(bits: u32) -> String {
    format!("{:o}", bits & 0o7777)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn modes_parse_and_render() {
        assert_eq!(parse_mode("755"), Some(0o755));
        assert_eq!(parse_mode("0644"), Some(0o644));
        assert_eq!(parse_mode("4755"), Some(0o4755));
        assert_eq!(parse_mode("0o600"), Some(0o600));
        assert_eq!(parse_mode("8"), None);
        assert_eq!(parse_mode(""), None);
        assert_eq!(parse_mode("rwx"), None);
        assert_eq!(parse_mode("77777"), None);
        assert_eq!(format_mode(0o100644), "644");
        assert_eq!(format_mode(0o755), "755");
    }

    #[test]
    fn percent_encoding() {
        assert_eq!(percent_encode("/a b/c+d&e=%"), "/a%20b/c%2Bd%26e%3D%25");
        assert_eq!(percent_encode("/é"), "/%C3%A9");
    }

    #[test]
    fn exec_request_defaults() {
        let r: ExecRequest = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(r.workdir, "/workspace");
        assert_eq!(r.timeout_ms, 0);
        assert!(!r.stream);
        assert!(r.stdin.is_none());
    }
}
