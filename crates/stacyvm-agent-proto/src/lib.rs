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
//!
//! ## Shared behaviour
//!
//! Besides the wire types, this crate holds what every implementation of the
//! agent's side must do the same way: the routes ([`Route`]), the error
//! answers ([`error`]), query strings ([`query`]), request checks and limits
//! ([`request`]), glob matching and the walk ([`glob`]), paths ([`path`]),
//! directory listings ([`FileEntry::listing`]) and timestamps
//! ([`timestamp`]). None of it does I/O itself: where a filesystem is
//! needed, the caller supplies it (the agent the real one, the mock
//! provider's in-process agent a sandbox root directory).

pub mod error;
pub mod glob;
pub mod path;
pub mod query;
pub mod request;
pub mod timestamp;

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

/// One route of the protocol (the table above).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Route {
    Health,
    Exec,
    ReadFile,
    WriteFile,
    DeleteFile,
    ListFiles,
    StatFile,
    Glob,
    MoveFile,
    Chmod,
    Logs,
    Stats,
    Tunnel,
}

impl Route {
    /// Every route: (method, path, route).
    pub const ALL: [(&'static str, &'static str, Route); 13] = [
        ("GET", "/v1/health", Route::Health),
        ("POST", "/v1/exec", Route::Exec),
        ("GET", "/v1/files", Route::ReadFile),
        ("PUT", "/v1/files", Route::WriteFile),
        ("DELETE", "/v1/files", Route::DeleteFile),
        ("GET", "/v1/files/list", Route::ListFiles),
        ("GET", "/v1/files/stat", Route::StatFile),
        ("GET", "/v1/files/glob", Route::Glob),
        ("POST", "/v1/files/move", Route::MoveFile),
        ("POST", "/v1/files/chmod", Route::Chmod),
        ("GET", "/v1/logs", Route::Logs),
        ("GET", "/v1/stats", Route::Stats),
        ("GET", "/v1/tunnel", Route::Tunnel),
    ];

    /// The route of a request: `404 not_found` for an unknown path, `405`
    /// for a known path called with another method.
    pub fn of(method: &str, path: &str) -> Result<Route, error::ApiError> {
        let mut known_path = false;
        for (m, p, route) in Route::ALL {
            if p == path {
                if m == method {
                    return Ok(route);
                }
                known_path = true;
            }
        }
        Err(if known_path {
            error::ApiError::method_not_allowed(&method, path)
        } else {
            error::ApiError::no_route(path)
        })
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct Health {
    pub status: String,
    pub version: String,
    pub pid: u32,
}

impl Health {
    /// The answer of an agent of `version` running as `pid`.
    pub fn ok(version: &str, pid: u32) -> Health {
        Health {
            status: "ok".to_string(),
            version: version.to_string(),
            pid,
        }
    }
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

impl ExecRequest {
    /// A request to run `argv` with every other field as a JSON request
    /// that names only `argv` has it (the working directory is
    /// [`DEFAULT_WORKDIR`]).
    pub fn new<S: Into<String>>(argv: impl IntoIterator<Item = S>) -> ExecRequest {
        ExecRequest {
            argv: argv.into_iter().map(Into::into).collect(),
            workdir: default_workdir(),
            ..ExecRequest::default()
        }
    }
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

/// The output stream an [`ExecEvent`] carries.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum OutputStream {
    Stdout = 0,
    Stderr = 1,
}

impl OutputStream {
    /// The `stream` of its events.
    pub fn name(self) -> &'static str {
        match self {
            OutputStream::Stdout => "stdout",
            OutputStream::Stderr => "stderr",
        }
    }

    /// 0 for stdout, 1 for stderr (to index per-stream state).
    pub fn index(self) -> usize {
        self as usize
    }
}

impl ExecEvent {
    /// An output line: `data` written to `stream`.
    pub fn output(stream: OutputStream, data: String) -> ExecEvent {
        ExecEvent {
            stream: stream.name().to_string(),
            data,
            exit_code: None,
            duration_ns: None,
            timed_out: false,
            truncated: false,
        }
    }

    /// The last line, for `result`.
    pub fn exit(result: &ExecResult) -> ExecEvent {
        ExecEvent {
            stream: "exit".to_string(),
            data: String::new(),
            exit_code: Some(result.exit_code),
            duration_ns: Some(result.duration_ns),
            timed_out: result.timed_out,
            truncated: result.truncated,
        }
    }

    /// This event as one NDJSON line (with its newline).
    pub fn to_line(&self) -> Vec<u8> {
        let mut line = serde_json::to_vec(self).unwrap_or_default();
        line.push(b'\n');
        line
    }
}

/// The exit code of a command killed at its timeout: `128 + SIGKILL`.
pub const TIMEOUT_EXIT_CODE: i32 = 128 + 9;

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

#[cfg(unix)]
impl FileEntry {
    /// The entry of `path` (named `name`) from its `lstat` metadata.
    pub fn from_metadata(path: String, name: String, m: &std::fs::Metadata) -> FileEntry {
        use std::os::unix::fs::MetadataExt;
        FileEntry {
            path,
            name,
            size: m.len(),
            mode: format_mode(m.mode()),
            is_dir: m.is_dir(),
            mod_time: timestamp::rfc3339(m.mtime()),
            is_symlink: m.file_type().is_symlink(),
        }
    }

    /// The answer of `GET /v1/files/list` for the directory `dir`
    /// (normalized): its entries, as read, with their `lstat` metadata
    /// (`None` for an entry removed meanwhile, which is skipped), sorted by
    /// name and without the reserved tree. An error reading the directory
    /// is the answer.
    pub fn listing(
        dir: &str,
        entries: impl IntoIterator<Item = std::io::Result<(String, Option<std::fs::Metadata>)>>,
    ) -> Result<Vec<FileEntry>, error::ApiError> {
        let mut out = Vec::new();
        for ent in entries {
            let (name, meta) = ent.map_err(|e| error::ApiError::from_io(&e, dir))?;
            let full = path::join(dir, &name);
            if path::is_reserved(&full) {
                continue;
            }
            if let Some(m) = meta {
                out.push(FileEntry::from_metadata(full, name, &m));
            }
        }
        out.sort_by(|a, b| a.name.cmp(&b.name));
        Ok(out)
    }
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
    fn routes() {
        assert_eq!(Route::of("GET", "/v1/health"), Ok(Route::Health));
        assert_eq!(Route::of("DELETE", "/v1/files"), Ok(Route::DeleteFile));
        assert_eq!(Route::of("POST", "/v1/files/chmod"), Ok(Route::Chmod));
        let e = Route::of("POST", "/v1/files").unwrap_err();
        assert_eq!((e.status, e.code), (405, "method_not_allowed"));
        assert_eq!(e.message, "method POST is not allowed on /v1/files");
        let e = Route::of("get", "/v1/health").unwrap_err();
        assert_eq!(e.status, 405);
        let e = Route::of("GET", "/v2/health").unwrap_err();
        assert_eq!((e.status, e.code), (404, "not_found"));
        assert_eq!(e.message, "no such route: /v2/health");
    }

    #[test]
    fn listings_hide_the_agent_and_sort() {
        let m = std::fs::symlink_metadata("/").unwrap();
        let items = ["b", ".stacyvm", "a", "gone"]
            .map(|n| Ok((n.to_string(), (n != "gone").then(|| m.clone()))));
        let l = FileEntry::listing("/", items).unwrap();
        let paths: Vec<_> = l.iter().map(|e| e.path.as_str()).collect();
        assert_eq!(paths, ["/a", "/b"]);
        assert!(l[0].is_dir);
        let err = FileEntry::listing("/d", [Err(std::io::Error::from_raw_os_error(13))]);
        assert_eq!(err.unwrap_err().message, "permission denied: /d");
    }

    #[test]
    fn exec_events() {
        let ev = ExecEvent::output(OutputStream::Stderr, "x".into());
        assert_eq!(ev.to_line(), b"{\"stream\":\"stderr\",\"data\":\"x\"}\n");
        let r = ExecResult {
            exit_code: 3,
            stdout: String::new(),
            stderr: String::new(),
            duration_ns: 7,
            truncated: false,
            timed_out: true,
        };
        let ev = ExecEvent::exit(&r);
        assert_eq!(
            (
                ev.stream.as_str(),
                ev.exit_code,
                ev.duration_ns,
                ev.timed_out
            ),
            ("exit", Some(3), Some(7), true)
        );
        assert_eq!(OutputStream::Stdout.index(), 0);
        assert_eq!(OutputStream::Stderr.index(), 1);
    }

    #[test]
    fn exec_request_defaults() {
        let r: ExecRequest = serde_json::from_str(r#"{"argv":["true"]}"#).unwrap();
        assert_eq!(r, ExecRequest::new(["true"]));
        assert_eq!(r.workdir, "/workspace");
        assert_eq!(r.timeout_ms, 0);
        assert!(!r.stream);
        assert!(r.stdin.is_none());
    }
}
