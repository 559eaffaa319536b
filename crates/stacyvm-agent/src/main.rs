//! `stacyvm-agent`: the init process of every StacyVM sandbox.
//!
//! It reaps zombies, and serves the agent protocol (see
//! `stacyvm_agent_proto`) over HTTP/1.1 on a Unix socket (or, for runtimes
//! on other hosts, on TCP with a bearer token): running commands, moving
//! files in and out, and reporting logs and resource usage.

mod body;
mod error;
mod exec;
mod files;
mod glob;
mod logbuf;
mod mem;
mod proctree;
mod reaper;
mod server;
mod stats;
mod tunnel;
mod utf8;

use server::Listen;
use stacyvm_agent_proto::{RUN_DIR_IN_SANDBOX, SOCKET_NAME};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;

/// Environment variable holding the bearer token of the TCP transport. The
/// agent removes it from its own environment at start, so commands it runs
/// never see it.
const TOKEN_ENV: &str = "STACYVM_AGENT_TOKEN";
/// Shortest token accepted for the TCP transport.
const MIN_TOKEN_LEN: usize = 16;

const USAGE: &str = "usage: stacyvm-agent [--socket PATH | --listen unix:PATH | --listen tcp:IP:PORT] [--no-create-workdir]

  --socket PATH          listen on this Unix socket (default /.stacyvm/run/agent.sock)
  --listen unix:PATH     the same as --socket PATH
  --listen tcp:IP:PORT   listen on TCP (e.g. tcp:0.0.0.0:7000, tcp:[::]:7000); every
                         request must then carry `Authorization: Bearer <token>`, the
                         token (at least 16 characters) taken from STACYVM_AGENT_TOKEN
  --no-create-workdir    do not create /workspace at start
  --version              print the version and exit";

/// Parse the value of `--listen`.
fn parse_listen(v: &str) -> Result<Listen, String> {
    if let Some(path) = v.strip_prefix("unix:") {
        if path.is_empty() {
            return Err("--listen unix: needs a socket path".into());
        }
        Ok(Listen::Unix(PathBuf::from(path)))
    } else if let Some(addr) = v.strip_prefix("tcp:") {
        addr.parse::<SocketAddr>().map(Listen::Tcp).map_err(|_| {
            format!("--listen tcp:{addr}: expected an IP address and port, like tcp:0.0.0.0:7000 or tcp:[::1]:7000")
        })
    } else {
        Err(format!("--listen {v:?}: expected unix:PATH or tcp:IP:PORT"))
    }
}

/// Parse the command line; `token` is the value of [`TOKEN_ENV`] (already
/// taken out of the environment).
fn parse_args(
    args: impl IntoIterator<Item = String>,
    token: Option<String>,
) -> Result<Option<server::Config>, String> {
    let mut cfg = server::Config {
        listen: Listen::Unix(PathBuf::from(format!("{RUN_DIR_IN_SANDBOX}/{SOCKET_NAME}"))),
        token: None,
        create_workdir: true,
    };
    let mut args = args.into_iter();
    while let Some(arg) = args.next() {
        match arg.as_str() {
            "--socket" => {
                cfg.listen = Listen::Unix(
                    args.next()
                        .map(PathBuf::from)
                        .ok_or("--socket needs a path")?,
                );
            }
            s if s.starts_with("--socket=") => {
                cfg.listen = Listen::Unix(PathBuf::from(&s["--socket=".len()..]));
            }
            "--listen" => {
                cfg.listen = parse_listen(&args.next().ok_or("--listen needs a value")?)?;
            }
            s if s.starts_with("--listen=") => {
                cfg.listen = parse_listen(&s["--listen=".len()..])?;
            }
            "--no-create-workdir" => cfg.create_workdir = false,
            "--version" | "-V" => {
                println!("stacyvm-agent {}", env!("CARGO_PKG_VERSION"));
                return Ok(None);
            }
            "--help" | "-h" => {
                println!("{USAGE}");
                return Ok(None);
            }
            other => return Err(format!("unknown argument {other:?}\n{USAGE}")),
        }
    }
    if let Listen::Tcp(addr) = &cfg.listen {
        match token {
            Some(t) if t.len() >= MIN_TOKEN_LEN && !t.bytes().any(|b| b.is_ascii_whitespace() || b.is_ascii_control()) => {
                cfg.token = Some(t)
            }
            Some(_) => {
                return Err(format!(
                    "{TOKEN_ENV} must be at least {MIN_TOKEN_LEN} characters without spaces or control characters"
                ))
            }
            None => {
                return Err(format!(
                    "--listen tcp:{addr} needs a bearer token in {TOKEN_ENV}"
                ))
            }
        }
    }
    Ok(Some(cfg))
}

/// Overwrite the value of `name` in the process's environment block, so
/// that `/proc/<pid>/environ` (which shows the block the process started
/// with) no longer reveals it. Must run while the process is single-threaded.
fn scrub_environ_value(name: &str) {
    extern "C" {
        static mut environ: *mut *mut libc::c_char;
    }
    let prefix = format!("{name}=");
    // SAFETY: the process is single-threaded here, so nothing reads or
    // changes the environment concurrently. `environ` is a NULL-terminated
    // array of NUL-terminated strings in writable memory (the initial block
    // on the stack, or heap copies made by setenv); bytes are only
    // overwritten up to each string's own NUL, which stays in place.
    unsafe {
        let mut p = environ;
        if p.is_null() {
            return;
        }
        while !(*p).is_null() {
            let entry = *p;
            let bytes = std::ffi::CStr::from_ptr(entry).to_bytes();
            if bytes.starts_with(prefix.as_bytes()) {
                let len = bytes.len() - prefix.len();
                std::ptr::write_bytes(entry.add(prefix.len()), b'x', len);
            }
            p = p.add(1);
        }
    }
}

fn main() -> ExitCode {
    mem::configure();
    // Take the token out of the environment while the process is still
    // single-threaded: every command the agent starts inherits it otherwise.
    let token = std::env::var_os(TOKEN_ENV).map(|t| t.to_string_lossy().into_owned());
    if token.is_some() {
        scrub_environ_value(TOKEN_ENV);
    }
    std::env::remove_var(TOKEN_ENV);
    let args = std::env::args_os()
        .skip(1)
        .map(|a| a.to_string_lossy().into_owned());
    let cfg = match parse_args(args, token) {
        Ok(Some(cfg)) => cfg,
        Ok(None) => return ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::from(2);
        }
    };
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .max_blocking_threads(16)
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            alog!("cannot start the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    let code = rt.block_on(server::run(cfg));
    // Don't wait for blocking tasks (e.g. a download to a vanished client).
    rt.shutdown_background();
    ExitCode::from(code as u8)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(args: &[&str], token: Option<&str>) -> Result<Option<server::Config>, String> {
        parse_args(
            args.iter().map(|s| s.to_string()),
            token.map(str::to_string),
        )
    }

    #[test]
    fn unix_socket_is_the_default() {
        let cfg = parse(&[], None).unwrap().unwrap();
        assert!(
            matches!(cfg.listen, Listen::Unix(ref p) if p == std::path::Path::new("/.stacyvm/run/agent.sock"))
        );
        assert!(cfg.token.is_none());
        let cfg = parse(&["--listen", "unix:/tmp/a.sock"], None)
            .unwrap()
            .unwrap();
        assert!(
            matches!(cfg.listen, Listen::Unix(ref p) if p == std::path::Path::new("/tmp/a.sock"))
        );
        // A token in the environment does not matter on the Unix socket.
        let cfg = parse(&["--socket=/tmp/b.sock"], Some("x"))
            .unwrap()
            .unwrap();
        assert!(cfg.token.is_none());
    }

    #[test]
    fn tcp_needs_a_good_token() {
        let t = "0123456789abcdef0123";
        let cfg = parse(&["--listen", "tcp:127.0.0.1:7000"], Some(t))
            .unwrap()
            .unwrap();
        assert!(matches!(cfg.listen, Listen::Tcp(a) if a.port() == 7000));
        assert_eq!(cfg.token.as_deref(), Some(t));
        let cfg = parse(&["--listen=tcp:[::1]:7001"], Some(t))
            .unwrap()
            .unwrap();
        assert!(matches!(cfg.listen, Listen::Tcp(a) if a.is_ipv6()));
        let e = parse(&["--listen", "tcp:127.0.0.1:7000"], None).unwrap_err();
        assert!(e.contains(TOKEN_ENV), "{e}");
        assert!(parse(&["--listen", "tcp:127.0.0.1:7000"], Some("short")).is_err());
        assert!(parse(
            &["--listen", "tcp:127.0.0.1:7000"],
            Some("0123456789abcdef 123")
        )
        .is_err());
        assert!(parse(&["--listen", "tcp:localhost:7000"], Some(t)).is_err());
        assert!(parse(&["--listen", "udp:1.2.3.4:5"], Some(t)).is_err());
        assert!(parse(&["--listen"], Some(t)).is_err());
    }
}
