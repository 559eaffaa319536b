//! Checks of agent requests before anything is done: paths, modes, exec
//! requests, `GET /v1/logs` and `GET /v1/tunnel` parameters, and the size
//! limit of JSON bodies. Every refusal is the [`ApiError`] the agent answers.
//! Nothing here touches the filesystem or the network; where a check needs
//! to look at the sandbox (an exec's working directory) the caller does it.

use crate::error::{io_message, ApiError};
use crate::query::query_param;
use crate::{
    parse_mode, path, ChmodRequest, ExecRequest, MoveRequest, DEFAULT_OUTPUT_LIMIT,
    DEFAULT_WORKDIR, TUNNEL_UPGRADE,
};
use serde::de::DeserializeOwned;
use std::io;

/// Default mode of uploaded files.
pub const DEFAULT_FILE_MODE: u32 = 0o644;
/// Default number of lines `GET /v1/logs` answers.
pub const DEFAULT_LOG_LINES: usize = 100;
/// Most lines `GET /v1/logs` accepts to be asked for.
pub const MAX_LOG_LINES: usize = 10_000;
/// Largest JSON request body accepted.
pub const JSON_BODY_LIMIT: usize = 8 * 1024 * 1024;
/// An oversized JSON body is read and discarded up to this size before the
/// 413 answer; beyond it the connection is simply closed.
pub const JSON_DRAIN_LIMIT: u64 = 64 * 1024 * 1024;

/// A sandbox path from a request, normalized ([`path::normalize`]).
pub fn normalize(raw: &str) -> Result<String, ApiError> {
    Ok(path::normalize(raw)?)
}

fn mode(raw: &str) -> Result<u32, ApiError> {
    parse_mode(raw)
        .ok_or_else(|| ApiError::invalid(format!("invalid mode {raw:?}: expected octal digits")))
}

/// `PUT /v1/files?path=&mode=`: the file to write and its mode.
pub fn write_target(raw_path: &str, raw_mode: Option<&str>) -> Result<(String, u32), ApiError> {
    let p = normalize(raw_path)?;
    if p == "/" {
        return Err(ApiError::invalid("/ is a directory"));
    }
    let mode = match raw_mode {
        None | Some("") => DEFAULT_FILE_MODE,
        Some(m) => mode(m)?,
    };
    Ok((p, mode))
}

/// `DELETE /v1/files?path=`: the path to delete.
pub fn delete_target(raw_path: &str) -> Result<String, ApiError> {
    let p = normalize(raw_path)?;
    if p == "/" {
        return Err(ApiError::invalid("refusing to delete /"));
    }
    Ok(p)
}

/// `POST /v1/files/move`: the normalized `(from, to)`.
pub fn move_paths(req: &MoveRequest) -> Result<(String, String), ApiError> {
    let from = normalize(&req.old_path)?;
    let to = normalize(&req.new_path)?;
    if from == "/" || to == "/" {
        return Err(ApiError::invalid("cannot move /"));
    }
    Ok((from, to))
}

/// Whether a move of the existing `from` to `to` has anything to do
/// (`false`: they are the same path); a move into itself is refused.
pub fn move_needed(from: &str, to: &str) -> Result<bool, ApiError> {
    if from == to {
        return Ok(false);
    }
    if to.starts_with(&format!("{from}/")) {
        return Err(ApiError::invalid(format!(
            "cannot move {from} into itself ({to})"
        )));
    }
    Ok(true)
}

/// `POST /v1/files/chmod`: the path and the mode bits.
pub fn chmod_target(req: &ChmodRequest) -> Result<(String, u32), ApiError> {
    let p = normalize(&req.path)?;
    Ok((p, mode(&req.mode)?))
}

/// A checked exec request.
#[derive(Debug, Clone, PartialEq)]
pub struct ExecPlan {
    pub req: ExecRequest,
    /// The normalized working directory (an existing directory).
    pub workdir: String,
    /// Bytes kept per output stream.
    pub limit: usize,
}

/// Check `POST /v1/exec`. `stat_workdir` tells whether the normalized
/// working directory is a directory (an error when it cannot be looked at).
pub fn plan_exec(
    mut req: ExecRequest,
    stat_workdir: impl FnOnce(&str) -> io::Result<bool>,
) -> Result<ExecPlan, ApiError> {
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
        req.workdir = DEFAULT_WORKDIR.to_string();
    }
    let workdir =
        path::normalize(&req.workdir).map_err(|e| ApiError::invalid(format!("workdir: {e}")))?;
    match stat_workdir(&workdir) {
        Ok(true) => {}
        Ok(false) => {
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
    Ok(ExecPlan {
        req,
        workdir,
        limit: usize::try_from(limit).unwrap_or(usize::MAX),
    })
}

/// `GET /v1/logs?lines=`: how many lines to answer.
pub fn log_lines(query: Option<&str>) -> Result<usize, ApiError> {
    match query_param(query, "lines")?.as_deref() {
        None | Some("") => Ok(DEFAULT_LOG_LINES),
        Some(s) => match s.parse::<usize>() {
            Ok(n) if n <= MAX_LOG_LINES => Ok(n),
            _ => Err(ApiError::invalid(format!(
                "lines must be a number from 0 to {MAX_LOG_LINES}"
            ))),
        },
    }
}

/// Parse a port (1–65535, digits only).
pub fn parse_port(s: &str) -> Option<u16> {
    if s.is_empty() || s.len() > 5 || !s.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    s.parse::<u16>().ok().filter(|p| *p != 0)
}

/// Whether one of a header's values holds `token` in its comma-separated
/// list (case-insensitive).
pub fn has_token<'a>(values: impl IntoIterator<Item = &'a str>, token: &str) -> bool {
    values
        .into_iter()
        .any(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
}

/// `GET /v1/tunnel?port=`: the port, once the request is a proper upgrade
/// (`connection` and `upgrade` are the values of those headers).
pub fn tunnel_port<'a>(
    query: Option<&str>,
    connection: impl IntoIterator<Item = &'a str>,
    upgrade: impl IntoIterator<Item = &'a str>,
) -> Result<u16, ApiError> {
    let port_s = query_param(query, "port")?.unwrap_or_default();
    let port = parse_port(&port_s)
        .ok_or_else(|| ApiError::invalid(format!("port must be 1 to 65535, not {port_s:?}")))?;
    if !has_token(connection, "upgrade") || !has_token(upgrade, TUNNEL_UPGRADE) {
        return Err(ApiError::invalid(format!(
            "the tunnel needs `Connection: Upgrade` and `Upgrade: {TUNNEL_UPGRADE}`"
        )));
    }
    Ok(port)
}

/// A JSON request body being received, kept to [`JSON_BODY_LIMIT`] bytes.
/// Past the limit the rest is read and discarded (up to
/// [`JSON_DRAIN_LIMIT`]) so the client gets to read the 413 instead of a
/// broken pipe.
#[derive(Debug)]
pub struct JsonBody {
    buf: Vec<u8>,
    total: u64,
}

impl JsonBody {
    /// Start receiving a body whose `Content-Length` header says
    /// `content_length` (when there is one).
    pub fn start(content_length: Option<&str>) -> Result<JsonBody, ApiError> {
        let declared = content_length.and_then(|v| v.parse::<u64>().ok());
        if declared.is_some_and(|n| n > JSON_DRAIN_LIMIT) {
            return Err(ApiError::too_large(JSON_BODY_LIMIT));
        }
        let capacity = declared.map_or(0, |n| n.min(JSON_BODY_LIMIT as u64) as usize);
        Ok(JsonBody {
            buf: Vec::with_capacity(capacity),
            total: 0,
        })
    }

    /// Take the next piece of the body.
    pub fn push(&mut self, data: &[u8]) -> Result<(), ApiError> {
        self.total += data.len() as u64;
        if self.total > JSON_DRAIN_LIMIT {
            return Err(ApiError::too_large(JSON_BODY_LIMIT));
        }
        if self.total <= JSON_BODY_LIMIT as u64 {
            self.buf.extend_from_slice(data);
        }
        Ok(())
    }

    /// The whole body, decoded.
    pub fn finish<T: DeserializeOwned>(self) -> Result<T, ApiError> {
        if self.total > JSON_BODY_LIMIT as u64 {
            return Err(ApiError::too_large(JSON_BODY_LIMIT));
        }
        serde_json::from_slice(&self.buf)
            .map_err(|e| ApiError::invalid(format!("invalid JSON body: {e}")))
    }
}

/// The answer to a request body that could not be read.
pub fn body_read_error(e: impl std::fmt::Display) -> ApiError {
    ApiError::invalid(format!("cannot read request body: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn req(argv: &[&str]) -> ExecRequest {
        ExecRequest {
            workdir: "/".into(),
            ..ExecRequest::new(argv.iter().copied())
        }
    }

    fn dir(_: &str) -> io::Result<bool> {
        Ok(true)
    }

    #[test]
    fn exec_requests() {
        assert!(plan_exec(req(&[]), dir).is_err());
        assert!(plan_exec(req(&[""]), dir).is_err());
        assert!(plan_exec(req(&["a\0b"]), dir).is_err());
        let p = plan_exec(req(&["true"]), dir).unwrap();
        assert_eq!((p.workdir.as_str(), p.limit), ("/", 16 * 1024 * 1024));
        let mut r = req(&["true"]);
        r.workdir = "/definitely/not/here".into();
        let e = plan_exec(r, |_| Err(io::ErrorKind::NotFound.into())).unwrap_err();
        assert_eq!(e.message, "workdir /definitely/not/here does not exist");
        let e = plan_exec(req(&["true"]), |_| Ok(false)).unwrap_err();
        assert_eq!(e.message, "workdir / is not a directory");
        let e = plan_exec(req(&["true"]), |_| Err(io::Error::from_raw_os_error(13)));
        assert_eq!(e.unwrap_err().message, "workdir /: Permission denied");
        let mut r = req(&["true"]);
        r.workdir = String::new();
        let mut seen = String::new();
        plan_exec(r, |w| {
            seen = w.to_string();
            Ok(true)
        })
        .unwrap();
        assert_eq!(seen, DEFAULT_WORKDIR);
        for bad in ["relative", "/.."] {
            let mut r = req(&["true"]);
            r.workdir = bad.into();
            assert!(plan_exec(r, dir).is_err(), "{bad}");
        }
        let mut r = req(&["true"]);
        r.env.insert("A=B".into(), "x".into());
        assert!(plan_exec(r, dir).is_err());
        let mut r = req(&["true"]);
        r.env.insert("A".into(), "x\0".into());
        assert!(plan_exec(r, dir).is_err());
        let mut r = req(&["true"]);
        r.output_limit = 5;
        assert_eq!(plan_exec(r, dir).unwrap().limit, 5);
    }

    #[test]
    fn file_requests() {
        assert_eq!(write_target("/a//b", None).unwrap(), ("/a/b".into(), 0o644));
        assert_eq!(write_target("/a", Some("0755")).unwrap().1, 0o755);
        assert_eq!(write_target("/a", Some("")).unwrap().1, 0o644);
        assert_eq!(
            write_target("/a", Some("9")).unwrap_err().message,
            "invalid mode \"9\": expected octal digits"
        );
        assert_eq!(
            write_target("/", None).unwrap_err().message,
            "/ is a directory"
        );
        assert!(write_target("/.stacyvm/x", None).is_err());
        assert_eq!(
            delete_target("/x/..").unwrap_err().message,
            "refusing to delete /"
        );
        let mv = |a: &str, b: &str| {
            move_paths(&MoveRequest {
                old_path: a.into(),
                new_path: b.into(),
            })
        };
        assert_eq!(mv("/a/", "/b").unwrap(), ("/a".into(), "/b".into()));
        assert!(mv("/", "/b").is_err());
        assert!(mv("/a", "relative").is_err());
        assert_eq!(move_needed("/a", "/a"), Ok(false));
        assert_eq!(move_needed("/a", "/ab"), Ok(true));
        assert!(move_needed("/a", "/a/b").is_err());
        let ch = ChmodRequest {
            path: "/f".into(),
            mode: "600".into(),
        };
        assert_eq!(chmod_target(&ch).unwrap(), ("/f".into(), 0o600));
    }

    #[test]
    fn logs_and_tunnels() {
        assert_eq!(log_lines(None).unwrap(), DEFAULT_LOG_LINES);
        assert_eq!(log_lines(Some("lines=")).unwrap(), DEFAULT_LOG_LINES);
        assert_eq!(log_lines(Some("lines=7")).unwrap(), 7);
        assert!(log_lines(Some("lines=10001")).is_err());
        assert!(log_lines(Some("lines=-1")).is_err());
        assert_eq!(parse_port("80"), Some(80));
        assert_eq!(parse_port("65535"), Some(65535));
        for bad in [
            "", "0", "65536", "99999", "+80", "-1", "8 0", "123456", "0x50",
        ] {
            assert_eq!(parse_port(bad), None, "{bad}");
        }
        assert!(has_token(["keep-alive, Upgrade"], "upgrade"));
        assert!(!has_token(["keep-alive"], "upgrade"));
        let t = |q, c: &[&'static str], u: &[&'static str]| {
            tunnel_port(Some(q), c.iter().copied(), u.iter().copied())
        };
        assert_eq!(t("port=8080", &["Upgrade"], &["tcp"]), Ok(8080));
        assert!(t("port=0", &["Upgrade"], &["tcp"]).is_err());
        assert!(t("port=80", &[], &["tcp"]).is_err());
        assert!(t("port=80", &["upgrade"], &["websocket"]).is_err());
    }

    #[test]
    fn json_bodies_are_bounded() {
        let mut b = JsonBody::start(Some("13")).unwrap();
        b.push(br#"{"status":"#).unwrap();
        b.push(br#""ok"}"#).unwrap();
        let s: crate::Status = b.finish().unwrap();
        assert_eq!(s.status, "ok");
        assert_eq!(
            JsonBody::start(Some(&(JSON_DRAIN_LIMIT + 1).to_string()))
                .unwrap_err()
                .status,
            413
        );
        let mut b = JsonBody::start(None).unwrap();
        b.push(&vec![b' '; JSON_BODY_LIMIT + 1]).unwrap();
        assert_eq!(b.finish::<crate::Status>().unwrap_err().status, 413);
        let mut b = JsonBody::start(None).unwrap();
        assert_eq!(
            b.push(&vec![0; JSON_DRAIN_LIMIT as usize + 1])
                .unwrap_err()
                .status,
            413
        );
        let b = JsonBody::start(Some("nonsense")).unwrap();
        assert_eq!(b.finish::<crate::Status>().unwrap_err().status, 400);
    }
}
