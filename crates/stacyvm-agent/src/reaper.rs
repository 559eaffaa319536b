//! Child reaping for an init process.
//!
//! As PID 1 (or a child subreaper on a host) the agent inherits every
//! orphaned process, so it must `waitpid(-1)` for all of them. One task does
//! that on every `SIGCHLD` and hands each status to whoever spawned the pid;
//! statuses of processes nobody registered (reparented orphans) are dropped.
//!
//! Spawning and registering happen under the same lock the reaper holds while
//! it calls `waitpid`, so a child that exits immediately can never be reaped
//! before its waiter exists — and std's own `waitpid` on a child whose `exec`
//! failed can never lose the race against the reaper.

use crate::alog;
use std::collections::HashMap;
use std::io;
use std::process::{Child, Command};
use std::sync::{Arc, Mutex, MutexGuard};
use tokio::signal::unix::{signal, SignalKind};
use tokio::sync::oneshot;

/// A raw wait status as returned by `waitpid`.
pub type WaitStatus = i32;

/// Shared handle to the reaper.
#[derive(Clone)]
pub struct Reaper {
    waiters: Arc<Mutex<HashMap<i32, oneshot::Sender<WaitStatus>>>>,
}

impl Reaper {
    /// Install the `SIGCHLD` handler and start the reaping task. Must be called
    /// inside the runtime, before the first spawn.
    pub fn start() -> io::Result<Reaper> {
        let reaper = Reaper {
            waiters: Arc::new(Mutex::new(HashMap::new())),
        };
        let mut sigchld = signal(SignalKind::child())?;
        let r = reaper.clone();
        tokio::spawn(async move {
            loop {
                r.reap_all();
                if sigchld.recv().await.is_none() {
                    alog!("SIGCHLD stream ended; reaper stops");
                    return;
                }
            }
        });
        Ok(reaper)
    }

    fn lock(&self) -> MutexGuard<'_, HashMap<i32, oneshot::Sender<WaitStatus>>> {
        self.waiters.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Spawn `cmd` and register a waiter for its exit status. The receiver
    /// yields the raw wait status once the process has been reaped.
    pub fn spawn(&self, cmd: &mut Command) -> io::Result<(Child, oneshot::Receiver<WaitStatus>)> {
        let mut waiters = self.lock();
        let child = cmd.spawn()?;
        let (tx, rx) = oneshot::channel();
        waiters.insert(child.id() as i32, tx);
        Ok((child, rx))
    }

    /// Reap every exited child without blocking.
    pub fn reap_all(&self) {
        let mut waiters = self.lock();
        loop {
            let mut status: libc::c_int = 0;
            // SAFETY: waitpid with a valid pointer to a local int.
            let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
            if pid <= 0 {
                break;
            }
            if let Some(tx) = waiters.remove(&pid) {
                // The exec may have been abandoned; then nobody listens.
                let _ = tx.send(status);
            }
        }
    }
}

/// Exit code of a wait status: the status itself, or `128 + signal`.
pub fn exit_code(status: WaitStatus) -> i32 {
    if libc::WIFEXITED(status) {
        libc::WEXITSTATUS(status)
    } else if libc::WIFSIGNALED(status) {
        128 + libc::WTERMSIG(status)
    } else {
        -1
    }
}

/// Become a child subreaper so orphaned descendants are reparented to this
/// process (only needed when not running as PID 1).
pub fn become_subreaper() {
    // SAFETY: plain prctl call with integer arguments.
    let rc = unsafe { libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) };
    if rc != 0 {
        alog!(
            "cannot become a child subreaper: {}",
            io::Error::last_os_error()
        );
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn decodes_wait_statuses() {
        assert_eq!(exit_code(0), 0);
        assert_eq!(exit_code(3 << 8), 3);
        assert_eq!(exit_code(libc::SIGKILL), 137);
        assert_eq!(exit_code(libc::SIGTERM), 143);
    }
}
