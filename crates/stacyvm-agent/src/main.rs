//! `stacyvm-agent`: the init process of every StacyVM sandbox.
//!
//! It reaps zombies, and serves the agent protocol (see
//! `stacyvm_agent_proto`) over HTTP/1.1 on a Unix socket: running commands,
//! moving files in and out, and reporting logs and resource usage.

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

use stacyvm_agent_proto::{RUN_DIR_IN_SANDBOX, SOCKET_NAME};
use std::path::PathBuf;
use std::process::ExitCode;

const USAGE: &str = "usage: stacyvm-agent [--socket PATH] [--no-create-workdir]

  --socket PATH          listen on this Unix socket (default /.stacyvm/run/agent.sock)
  --no-create-workdir    do not create /workspace at start
  --version              print the version and exit";

fn parse_args() -> Result<Option<server::Config>, String> {
    let mut cfg = server::Config {
        socket: PathBuf::from(format!("{RUN_DIR_IN_SANDBOX}/{SOCKET_NAME}")),
        create_workdir: true,
    };
    let mut args = std::env::args_os().skip(1);
    while let Some(arg) = args.next() {
        let arg = arg.to_string_lossy().into_owned();
        match arg.as_str() {
            "--socket" => {
                cfg.socket = args
                    .next()
                    .map(PathBuf::from)
                    .ok_or("--socket needs a path")?;
            }
            s if s.starts_with("--socket=") => {
                cfg.socket = PathBuf::from(&s["--socket=".len()..]);
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
    Ok(Some(cfg))
}

fn main() -> ExitCode {
    mem::configure();
    let cfg = match parse_args() {
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
