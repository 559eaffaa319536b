//! A private `stacyvm serve` child process on a loopback port, for the
//! commands that measure or test a server of their own (`bench`,
//! `certify`). It can be killed with SIGKILL and restarted on the same data
//! directory and port, like a crashed server coming back.

use crate::client::{ApiFailure, Client};
use anyhow::{bail, Context, Result};
use http::Method;
use stacyvm_core::Config;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// How long a server that answers `/api/v1/ready` with "not ready" is
/// waited for.
const NOT_READY_GRACE: Duration = Duration::from_secs(15);

/// How a private server is started.
pub struct ServerOptions {
    /// Its data directory; created if missing and removed when the server
    /// is dropped. Keep it short: agent socket paths live below it.
    pub data_dir: PathBuf,
    /// `STACYVM_*` settings of the child (applied after everything else).
    pub env: Vec<(String, String)>,
    /// Inherit the caller's `STACYVM_*` variables (`false`: the child sees
    /// only `env`, so nothing of the calling shell leaks into it).
    pub inherit_stacyvm_env: bool,
    /// Bootstrap API key of the child (auth on when set).
    pub api_key: Option<String>,
    /// How long the child may take to answer `/api/v1/ready`.
    pub ready_timeout: Duration,
}

impl ServerOptions {
    pub fn new(data_dir: PathBuf) -> ServerOptions {
        ServerOptions {
            data_dir,
            env: Vec::new(),
            inherit_stacyvm_env: true,
            api_key: None,
            ready_timeout: Duration::from_secs(30),
        }
    }

    pub fn env(mut self, key: &str, value: impl Into<String>) -> ServerOptions {
        self.env.push((key.to_string(), value.into()));
        self
    }
}

/// The settings of `cfg` a child server needs to run `provider` exactly as
/// configured (and only it): provider selection, image store, agent,
/// Docker/PRoot/custom settings, registries.
pub fn provider_env(cfg: &Config, provider: &str) -> Vec<(String, String)> {
    let mut env = vec![
        ("STACYVM_PROVIDERS".to_string(), provider.to_string()),
        ("STACYVM_DEFAULT_PROVIDER".to_string(), provider.to_string()),
        (
            "STACYVM_IMAGE_DIR".to_string(),
            cfg.image_dir().to_string_lossy().into_owned(),
        ),
        ("STACYVM_DOCKER_PULL".to_string(), cfg.docker.pull.clone()),
        ("STACYVM_PROOT_BINARY".to_string(), cfg.proot.binary.clone()),
    ];
    let mut opt = |k: &str, v: Option<String>| {
        if let Some(v) = v {
            env.push((k.to_string(), v));
        }
    };
    opt(
        "STACYVM_AGENT_PATH",
        cfg.agent_path
            .as_ref()
            .map(|p| p.to_string_lossy().into_owned()),
    );
    opt("STACYVM_DOCKER_SOCKET", cfg.docker.socket.clone());
    opt("STACYVM_CUSTOM_URL", cfg.custom.url.clone());
    opt("STACYVM_CUSTOM_TOKEN", cfg.custom.token.clone());
    if !cfg.insecure_registries.is_empty() {
        env.push((
            "STACYVM_INSECURE_REGISTRIES".to_string(),
            cfg.insecure_registries.join(","),
        ));
    }
    env
}

/// A running (or killed) private server. Dropping it stops the process
/// (SIGTERM, then SIGKILL after 10 s) and removes its data directory.
pub struct OwnServer {
    child: Option<Child>,
    opts: ServerOptions,
    port: u16,
    url: String,
    starts: u32,
}

fn free_port() -> Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")
        .context("finding a free loopback port")?
        .local_addr()?
        .port())
}

impl OwnServer {
    /// Start the server and wait until it is ready.
    pub async fn start(opts: ServerOptions) -> Result<OwnServer> {
        std::fs::create_dir_all(&opts.data_dir)
            .with_context(|| format!("creating {}", opts.data_dir.display()))?;
        let port = free_port()?;
        let mut s = OwnServer {
            child: None,
            opts,
            port,
            url: format!("http://127.0.0.1:{port}"),
            starts: 0,
        };
        s.spawn().await?;
        Ok(s)
    }

    pub fn url(&self) -> &str {
        &self.url
    }

    pub fn port(&self) -> u16 {
        self.port
    }

    pub fn data_dir(&self) -> &Path {
        &self.opts.data_dir
    }

    /// Log file of the current (or last) process.
    pub fn log_path(&self) -> PathBuf {
        self.opts
            .data_dir
            .join(format!("server.{}.log", self.starts.max(1)))
    }

    /// The last `lines` lines of the server's log.
    pub fn log_tail(&self, lines: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let all: Vec<&str> = text.lines().collect();
        all[all.len().saturating_sub(lines)..].join("\n")
    }

    /// A client for the server's API.
    pub fn client(&self) -> Result<Client> {
        Client::new(&self.url, self.opts.api_key.clone())
    }

    /// Whether the process was started and has not been stopped or killed
    /// (it may still have exited on its own).
    pub fn is_started(&self) -> bool {
        self.child.is_some()
    }

    /// Pid of the running process.
    pub fn pid(&self) -> Option<u32> {
        self.child.as_ref().map(Child::id)
    }

    async fn spawn(&mut self) -> Result<()> {
        self.starts += 1;
        let log = std::fs::File::create(self.log_path())
            .with_context(|| format!("creating {}", self.log_path().display()))?;
        let exe = std::env::current_exe().context("finding the stacyvm executable")?;
        let mut cmd = Command::new(exe);
        cmd.arg("serve");
        if !self.opts.inherit_stacyvm_env {
            for (k, _) in std::env::vars_os() {
                if k.to_string_lossy().starts_with("STACYVM_") && k != "STACYVM_LOG" {
                    cmd.env_remove(k);
                }
            }
        }
        if std::env::var_os("STACYVM_LOG").is_none() {
            cmd.env("STACYVM_LOG", "warn");
        }
        cmd.env("STACYVM_LISTEN", format!("127.0.0.1:{}", self.port))
            .env("STACYVM_DATA_DIR", &self.opts.data_dir);
        if let Some(k) = &self.opts.api_key {
            cmd.env("STACYVM_API_KEY", k);
        }
        for (k, v) in &self.opts.env {
            cmd.env(k, v);
        }
        cmd.stdin(Stdio::null()).stdout(Stdio::null()).stderr(log);
        let child = cmd.spawn().context("starting stacyvm serve")?;
        self.child = Some(child);
        self.wait_ready().await
    }

    async fn wait_ready(&mut self) -> Result<()> {
        let c = self.client()?;
        let deadline = Instant::now() + self.opts.ready_timeout;
        // A server that answers but stays not ready (its provider is
        // unhealthy) is given up on sooner than one that is still starting.
        let mut not_ready: Option<(Instant, String)> = None;
        loop {
            if let Some(Ok(Some(status))) = self.child.as_mut().map(Child::try_wait) {
                self.child = None;
                bail!(
                    "stacyvm serve exited ({status}) before it was ready:\n{}",
                    self.log_tail(30)
                );
            }
            match c.json(Method::GET, "/api/v1/ready", None).await {
                Ok(_) => return Ok(()),
                Err(e) => {
                    if let Some(f) = e.downcast_ref::<ApiFailure>() {
                        let since = not_ready.map_or_else(Instant::now, |(t, _)| t);
                        not_ready = Some((since, f.message.clone()));
                    }
                }
            }
            if let Some((since, why)) = &not_ready {
                if since.elapsed() > NOT_READY_GRACE {
                    bail!(
                        "stacyvm serve answers but is not ready after {}s: {why}",
                        NOT_READY_GRACE.as_secs()
                    );
                }
            }
            if Instant::now() > deadline {
                bail!(
                    "stacyvm serve did not become ready within {:?}:\n{}",
                    self.opts.ready_timeout,
                    self.log_tail(30)
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// SIGKILL the process (a crash: nothing is cleaned up) and reap it.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Start a new process on the same data directory and port.
    pub async fn restart(&mut self) -> Result<()> {
        if self.child.is_some() {
            self.stop();
        }
        self.spawn().await
    }

    /// Stop gracefully: SIGTERM, SIGKILL after 10 s.
    pub fn stop(&mut self) {
        let Some(mut child) = self.child.take() else {
            return;
        };
        // SAFETY: kill on the pid of a child we spawned and have not reaped.
        unsafe {
            libc::kill(child.id() as i32, libc::SIGTERM);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}

impl Drop for OwnServer {
    fn drop(&mut self) {
        self.stop();
        let _ = std::fs::remove_dir_all(&self.opts.data_dir);
    }
}
