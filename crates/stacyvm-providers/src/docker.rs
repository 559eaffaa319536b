//! Docker provider: one container per sandbox, driven through the Docker
//! Engine API on a Unix socket.
//!
//! Every sandbox becomes a container named `stacyvm-<sandbox id>` whose PID 1
//! is the agent binary, bind-mounted read-only from the host. The host run
//! directory of the sandbox is bind-mounted read-write so the agent's socket
//! shows up on the host. Containers carry labels that tie them to the sandbox
//! and to the server instance that owns them, which is what [`DockerProvider::list`]
//! uses for reconciliation.
//!
//! The connection to the daemon is lazy: the provider can be built while the
//! daemon is down, reports that from [`Provider::health`], and negotiates the
//! API version on first contact once the daemon answers.

use crate::agent::{AgentClient, AgentError};
use crate::hostname_for;
use crate::{
    error_chain, Isolation, NetworkMode, Provider, ProviderError, RuntimeInfo, SandboxSpec,
};
use async_trait::async_trait;
use bollard::errors::Error as DockerError;
use bollard::models::{ContainerCreateBody, ContainerSummaryStateEnum, HostConfig};
use bollard::query_parameters::{
    CreateContainerOptionsBuilder, CreateImageOptionsBuilder, ListContainersOptionsBuilder,
    LogsOptionsBuilder, RemoveContainerOptionsBuilder, WaitContainerOptionsBuilder,
};
use bollard::Docker;
use futures_util::StreamExt;
use stacyvm_agent_proto::{AGENT_PATH_IN_SANDBOX, RUN_DIR_IN_SANDBOX};
use std::collections::HashMap;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// Label holding the sandbox id of a container.
pub const LABEL_SANDBOX: &str = "org.stacyvm.sandbox";
/// Label holding the id of the server instance that owns a container.
pub const LABEL_INSTANCE: &str = "org.stacyvm.instance";
/// Label set to `true` on every container StacyVM manages.
pub const LABEL_MANAGED: &str = "org.stacyvm.managed";
/// Prefix of every sandbox container's name.
pub const CONTAINER_PREFIX: &str = "stacyvm-";

/// Socket used when neither the options nor `DOCKER_HOST` name one.
const DEFAULT_SOCKET: &str = "/var/run/docker.sock";
/// Per-request timeout (seconds) of the daemon client.
const REQUEST_TIMEOUT_SECS: u64 = 120;
/// How long [`Provider::health`] waits for the daemon's answer.
const HEALTH_TIMEOUT: Duration = Duration::from_secs(5);
/// How long `destroy` waits for a removal that another caller started.
const REMOVAL_WAIT: Duration = Duration::from_secs(15);
/// Slack past the start timeout before a hung agent request is abandoned.
const READY_GRACE: Duration = Duration::from_millis(500);
/// Log lines attached to an agent start failure.
const FAILURE_LOG_LINES: usize = 20;
/// Minimum interval between two pull progress lines.
const PULL_LOG_INTERVAL: Duration = Duration::from_secs(1);

/// Capabilities the containers keep (everything else is dropped).
const CAP_ADD: &[&str] = &[
    "CHOWN",
    "DAC_OVERRIDE",
    "FOWNER",
    "FSETID",
    "KILL",
    "SETGID",
    "SETUID",
    "NET_BIND_SERVICE",
];

/// When the provider may pull an image that is not present locally.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub enum PullPolicy {
    /// Pull the image when the daemon does not have it.
    #[default]
    Missing,
    /// Never pull; a missing image is an error.
    Never,
}

/// Settings of a [`DockerProvider`].
#[derive(Debug, Clone, Default)]
pub struct DockerOptions {
    /// Daemon socket, as a path or `unix://` URL. Default: `DOCKER_HOST` when
    /// it is a `unix://` URL, else `/var/run/docker.sock`.
    pub socket: Option<String>,
    /// Id of this server instance; stamped on every container as
    /// `org.stacyvm.instance` and used to tell our containers from others.
    pub instance_id: String,
    /// What to do when a sandbox's image is missing.
    pub pull: PullPolicy,
}

/// [`Provider`] that runs each sandbox as a Docker container.
#[derive(Debug)]
pub struct DockerProvider {
    /// Filesystem path of the daemon socket.
    socket: String,
    instance_id: String,
    pull: PullPolicy,
    /// Client, built on first use once the socket exists.
    client: Mutex<Option<Docker>>,
    /// Whether the API version was agreed with the daemon.
    negotiated: AtomicBool,
}

impl DockerProvider {
    /// Build the provider and try to reach the daemon once.
    ///
    /// An unreachable daemon is not an error here: it is reported by
    /// [`Provider::health`], makes `create` fail with
    /// [`ProviderError::Unavailable`], and is retried on every call until it
    /// answers. Only a socket address that cannot work (a non-Unix scheme) or
    /// an empty instance id is refused.
    pub async fn connect(opts: DockerOptions) -> Result<Self, ProviderError> {
        if opts.instance_id.trim().is_empty() {
            return Err(ProviderError::Invalid(
                "docker provider needs a non-empty instance id".into(),
            ));
        }
        let socket = match opts.socket.filter(|s| !s.trim().is_empty()) {
            Some(raw) => socket_path(&raw)?,
            None => match std::env::var("DOCKER_HOST") {
                Ok(host) if !host.trim().is_empty() => socket_path(&host).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "ignoring DOCKER_HOST; using {DEFAULT_SOCKET}");
                    DEFAULT_SOCKET.to_string()
                }),
                _ => DEFAULT_SOCKET.to_string(),
            },
        };
        let provider = DockerProvider {
            socket,
            instance_id: opts.instance_id,
            pull: opts.pull,
            client: Mutex::new(None),
            negotiated: AtomicBool::new(false),
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, provider.docker()).await {
            Ok(Ok(d)) => {
                let v = d.client_version();
                tracing::debug!(
                    socket = %provider.socket,
                    api = %format!("{}.{}", v.major_version, v.minor_version),
                    "connected to docker daemon"
                );
            }
            Ok(Err(e)) => tracing::warn!(error = %e, "docker daemon not reachable yet"),
            Err(_) => tracing::warn!(
                socket = %provider.socket,
                "docker daemon did not answer in time; will retry on use"
            ),
        }
        Ok(provider)
    }

    /// Filesystem path of the daemon socket in use.
    pub fn socket(&self) -> &str {
        &self.socket
    }

    /// Id of the server instance this provider stamps on its containers.
    pub fn instance_id(&self) -> &str {
        &self.instance_id
    }

    /// A client whose API version has been agreed with the daemon.
    async fn docker(&self) -> Result<Docker, ProviderError> {
        let cached = self
            .client
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let docker = match cached {
            Some(d) if self.negotiated.load(Ordering::Acquire) => return Ok(d),
            Some(d) => d,
            None => {
                let d = Docker::connect_with_unix(
                    &self.socket,
                    REQUEST_TIMEOUT_SECS,
                    bollard::API_DEFAULT_VERSION,
                )
                .map_err(|e| self.unreachable(&e))?;
                let mut slot = self.client.lock().unwrap_or_else(|p| p.into_inner());
                slot.get_or_insert(d).clone()
            }
        };
        // The client shares its version with every clone, so negotiating on a
        // clone settles it for all of them.
        match docker.clone().negotiate_version().await {
            Ok(_) => {
                self.negotiated.store(true, Ordering::Release);
                Ok(docker)
            }
            Err(e) if is_connection_error(&e) => Err(self.unreachable(&e)),
            Err(e) => Err(ProviderError::Unavailable {
                provider: "docker".into(),
                message: format!(
                    "cannot agree on an API version with the docker daemon at {}: {}",
                    self.socket,
                    error_chain(&e)
                ),
            }),
        }
    }

    fn unreachable(&self, e: &DockerError) -> ProviderError {
        ProviderError::Unavailable {
            provider: "docker".into(),
            message: format!(
                "docker daemon unreachable at {}: {}",
                self.socket,
                error_chain(e)
            ),
        }
    }

    /// Map a daemon error to a [`ProviderError`]; `what` says what was being done.
    fn classify(&self, what: &str, e: DockerError) -> ProviderError {
        if is_connection_error(&e) {
            return self.unreachable(&e);
        }
        match &e {
            DockerError::DockerResponseServerError {
                status_code,
                message,
            } => {
                if *status_code == 400 && message.contains("client version") {
                    // The daemon changed under us; agree on a version again.
                    self.negotiated.store(false, Ordering::Release);
                }
                if *status_code == 400 {
                    ProviderError::Invalid(format!("{what}: {message}"))
                } else {
                    ProviderError::Runtime(format!("{what}: {message}"))
                }
            }
            _ => ProviderError::Runtime(format!("{what}: {}", error_chain(&e))),
        }
    }

    /// Container definition of a sandbox.
    fn container_body(&self, spec: &SandboxSpec) -> Result<ContainerCreateBody, ProviderError> {
        let agent = host_path(&spec.agent_binary, "agent binary")?;
        let run_dir = host_path(&spec.run_dir, "run directory")?;
        let memory = spec
            .memory_mb
            .checked_mul(1024 * 1024)
            .and_then(|b| i64::try_from(b).ok())
            .ok_or_else(|| {
                ProviderError::Invalid(format!("memory_mb {} is too large", spec.memory_mb))
            })?;
        let nano_cpus = i64::from(spec.vcpus) * 1_000_000_000;
        let pids_limit = i64::try_from(spec.pids_limit).map_err(|_| {
            ProviderError::Invalid(format!("pids_limit {} is too large", spec.pids_limit))
        })?;
        let labels = HashMap::from([
            (LABEL_SANDBOX.to_string(), spec.id.clone()),
            (LABEL_INSTANCE.to_string(), self.instance_id.clone()),
            (LABEL_MANAGED.to_string(), "true".to_string()),
        ]);
        let env = spec.env.iter().map(|(k, v)| format!("{k}={v}")).collect();
        let network_mode = match spec.network {
            NetworkMode::None => "none",
            NetworkMode::Egress => "bridge",
        };
        Ok(ContainerCreateBody {
            image: Some(spec.image.clone()),
            hostname: Some(hostname_for(&spec.id)),
            entrypoint: Some(vec![AGENT_PATH_IN_SANDBOX.to_string()]),
            // With an explicit entrypoint the daemon does not fall back to the
            // image's CMD, so the agent starts without arguments.
            cmd: Some(Vec::new()),
            env: Some(env),
            labels: Some(labels),
            attach_stdin: Some(false),
            attach_stdout: Some(false),
            attach_stderr: Some(false),
            tty: Some(false),
            open_stdin: Some(false),
            host_config: Some(HostConfig {
                binds: Some(vec![
                    format!("{agent}:{AGENT_PATH_IN_SANDBOX}:ro"),
                    format!("{run_dir}:{RUN_DIR_IN_SANDBOX}:rw"),
                ]),
                memory: Some(memory),
                memory_swap: Some(memory),
                nano_cpus: Some(nano_cpus),
                pids_limit: Some(pids_limit),
                cap_drop: Some(vec!["ALL".to_string()]),
                cap_add: Some(CAP_ADD.iter().map(|c| c.to_string()).collect()),
                security_opt: Some(vec!["no-new-privileges".to_string()]),
                network_mode: Some(network_mode.to_string()),
                init: Some(false),
                auto_remove: Some(false),
                publish_all_ports: Some(false),
                privileged: Some(false),
                ..Default::default()
            }),
            ..Default::default()
        })
    }

    /// Create the container, pulling its image first when it is missing and
    /// the policy allows it. Returns the container id.
    async fn create_container(
        &self,
        docker: &Docker,
        name: &str,
        spec: &SandboxSpec,
        body: ContainerCreateBody,
    ) -> Result<String, ProviderError> {
        let opts = || Some(CreateContainerOptionsBuilder::new().name(name).build());
        let first = docker.create_container(opts(), body.clone()).await;
        let err = match first {
            Ok(r) => return Ok(r.id),
            Err(e) if is_missing_image(&e) => e,
            Err(e) => return Err(self.classify("cannot create container", e)),
        };
        if self.pull == PullPolicy::Never {
            return Err(ProviderError::Image {
                image: spec.image.clone(),
                message: format!("{} (pull policy is never)", server_message(&err)),
            });
        }
        self.pull_image(docker, &spec.image).await?;
        match docker.create_container(opts(), body).await {
            Ok(r) => Ok(r.id),
            Err(e) if is_missing_image(&e) => Err(ProviderError::Image {
                image: spec.image.clone(),
                message: server_message(&e),
            }),
            Err(e) => Err(self.classify("cannot create container", e)),
        }
    }

    /// Pull `image`, logging aggregated progress at most about once a second.
    async fn pull_image(&self, docker: &Docker, image: &str) -> Result<(), ProviderError> {
        let (repo, tag) = split_image_ref(image);
        tracing::info!(image, "image not present locally, pulling");
        let opts = CreateImageOptionsBuilder::new()
            .from_image(&repo)
            .tag(&tag)
            .build();
        let mut stream = docker.create_image(Some(opts), None, None);
        let mut progress = PullProgress::new();
        while let Some(item) = stream.next().await {
            match item {
                Ok(info) => {
                    progress.update(
                        info.id.as_deref(),
                        info.status.as_deref(),
                        info.progress_detail.as_ref().and_then(|p| p.current),
                        info.progress_detail.as_ref().and_then(|p| p.total),
                    );
                    if progress.last_log.elapsed() >= PULL_LOG_INTERVAL {
                        progress.log(image);
                    }
                }
                Err(e) if is_connection_error(&e) => return Err(self.unreachable(&e)),
                Err(e) => {
                    tracing::info!(
                        image,
                        elapsed_ms = progress.started.elapsed().as_millis() as u64,
                        error = %server_message(&e),
                        "image pull failed"
                    );
                    return Err(ProviderError::Image {
                        image: image.to_string(),
                        message: server_message(&e),
                    });
                }
            }
        }
        tracing::info!(
            image,
            elapsed_ms = progress.started.elapsed().as_millis() as u64,
            layers = progress.layers.len(),
            status = %progress.summary,
            "image pulled"
        );
        Ok(())
    }

    /// Start a created container and wait for its agent. Stops waiting as
    /// soon as the container exits.
    async fn start_and_wait(
        &self,
        docker: &Docker,
        name: &str,
        spec: &SandboxSpec,
    ) -> Result<(), ProviderError> {
        if let Err(e) = docker.start_container(name, None).await {
            if is_connection_error(&e) {
                return Err(self.unreachable(&e));
            }
            let msg = server_message(&e);
            // The runtime could not execute the agent (wrong format, missing
            // interpreter, not a file…): that is the agent failing to start.
            if msg.contains("exec") || msg.contains(AGENT_PATH_IN_SANDBOX) {
                let logs = tail_logs(docker, name, FAILURE_LOG_LINES).await;
                return Err(ProviderError::AgentStart(with_logs(
                    format!("container failed to start: {msg}"),
                    &logs,
                )));
            }
            return Err(self.classify("cannot start container", e));
        }
        let started = Instant::now();
        let agent = AgentClient::new(spec.socket_path());
        let exited = wait_exit(docker, name);
        // `wait_ready` checks its deadline between attempts only; an agent that
        // accepts a connection and never answers must not hold us past it.
        let ready = tokio::time::timeout(
            spec.start_timeout + READY_GRACE,
            agent.wait_ready(spec.start_timeout),
        );
        tokio::select! {
            ready = ready => match ready.unwrap_or_else(|_| {
                Err(AgentError::Unreachable("the agent accepted but never answered".into()))
            }) {
                Ok(_) => Ok(()),
                Err(e) => {
                    let logs = tail_logs(docker, name, FAILURE_LOG_LINES).await;
                    Err(ProviderError::AgentStart(with_logs(
                        format!(
                            "no answer on {} within {} ms: {e}",
                            spec.socket_path().display(),
                            started.elapsed().as_millis()
                        ),
                        &logs,
                    )))
                }
            },
            code = exited => {
                let logs = tail_logs(docker, name, FAILURE_LOG_LINES).await;
                Err(ProviderError::AgentStart(with_logs(
                    format!(
                        "container exited with code {code} {} ms after start, before the agent answered",
                        started.elapsed().as_millis()
                    ),
                    &logs,
                )))
            }
        }
    }

    /// Force-remove a container, logging (not returning) failures.
    async fn remove_quietly(docker: &Docker, name: &str) {
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(name, Some(opts)).await {
            Ok(()) => tracing::debug!(container = name, "removed container after failed create"),
            Err(e) if status_of(&e) == Some(404) => {}
            Err(e) => tracing::warn!(
                container = name,
                error = %error_chain(&e),
                "cannot remove container after failed create"
            ),
        }
    }
}

#[async_trait]
impl Provider for DockerProvider {
    fn name(&self) -> &str {
        "docker"
    }

    fn isolation(&self) -> Isolation {
        Isolation::Container
    }

    fn capabilities(&self) -> Vec<String> {
        crate::agent_capabilities(&[])
    }

    async fn create(&self, spec: &SandboxSpec) -> Result<RuntimeInfo, ProviderError> {
        let t0 = Instant::now();
        let body = self.container_body(spec)?;
        let docker = self.docker().await?;
        let name = container_name(&spec.id);
        let id = self.create_container(&docker, &name, spec, body).await?;
        let created_ms = t0.elapsed().as_millis() as u64;
        // Removes the container if this future is dropped before it is ready.
        let mut guard = RemoveOnDrop {
            docker: Some(docker.clone()),
            name: name.clone(),
        };
        match self.start_and_wait(&docker, &name, spec).await {
            Ok(()) => {
                guard.docker = None;
                tracing::debug!(
                    sandbox = %spec.id,
                    container = %short_id(&id),
                    created_ms,
                    ready_ms = t0.elapsed().as_millis() as u64,
                    "docker sandbox ready"
                );
                Ok(RuntimeInfo {
                    sandbox_id: spec.id.clone(),
                    runtime_id: id,
                    running: true,
                })
            }
            Err(e) => {
                Self::remove_quietly(&docker, &name).await;
                guard.docker = None;
                tracing::debug!(
                    sandbox = %spec.id,
                    elapsed_ms = t0.elapsed().as_millis() as u64,
                    error = %e,
                    "docker sandbox failed to start"
                );
                Err(e)
            }
        }
    }

    async fn destroy(&self, sandbox_id: &str) -> Result<(), ProviderError> {
        let t0 = Instant::now();
        let docker = self.docker().await?;
        let name = container_name(sandbox_id);
        let opts = RemoveContainerOptionsBuilder::new()
            .force(true)
            .v(true)
            .build();
        match docker.remove_container(&name, Some(opts)).await {
            Ok(()) => {}
            Err(e) if status_of(&e) == Some(404) => {
                tracing::debug!(sandbox = sandbox_id, "docker sandbox already gone");
                return Ok(());
            }
            Err(e) if status_of(&e) == Some(409) => {
                // Someone else is removing it; wait for that to finish.
                let deadline = Instant::now() + REMOVAL_WAIT;
                loop {
                    match docker.inspect_container(&name, None).await {
                        Err(e) if status_of(&e) == Some(404) => break,
                        Err(e) if is_connection_error(&e) => return Err(self.unreachable(&e)),
                        _ if Instant::now() >= deadline => {
                            return Err(ProviderError::Runtime(format!(
                                "container {name} still being removed after {} s",
                                REMOVAL_WAIT.as_secs()
                            )))
                        }
                        _ => tokio::time::sleep(Duration::from_millis(25)).await,
                    }
                }
            }
            Err(e) => return Err(self.classify("cannot remove container", e)),
        }
        tracing::debug!(
            sandbox = sandbox_id,
            elapsed_ms = t0.elapsed().as_millis() as u64,
            "docker sandbox destroyed"
        );
        Ok(())
    }

    async fn inspect(&self, sandbox_id: &str) -> Result<Option<RuntimeInfo>, ProviderError> {
        let docker = self.docker().await?;
        let c = match docker
            .inspect_container(&container_name(sandbox_id), None)
            .await
        {
            Ok(c) => c,
            Err(e) if status_of(&e) == Some(404) => return Ok(None),
            Err(e) => return Err(self.classify("cannot inspect container", e)),
        };
        let labels = c.config.as_ref().and_then(|cfg| cfg.labels.as_ref());
        let ours = labels
            .and_then(|l| l.get(LABEL_INSTANCE))
            .is_some_and(|v| *v == self.instance_id);
        if !ours {
            return Ok(None);
        }
        Ok(Some(RuntimeInfo {
            sandbox_id: labels
                .and_then(|l| l.get(LABEL_SANDBOX))
                .cloned()
                .unwrap_or_else(|| sandbox_id.to_string()),
            runtime_id: c.id.unwrap_or_default(),
            running: c.state.and_then(|s| s.running).unwrap_or(false),
        }))
    }

    async fn list(&self) -> Result<Vec<RuntimeInfo>, ProviderError> {
        let docker = self.docker().await?;
        let filters = HashMap::from([(
            "label".to_string(),
            vec![format!("{LABEL_INSTANCE}={}", self.instance_id)],
        )]);
        let opts = ListContainersOptionsBuilder::new()
            .all(true)
            .filters(&filters)
            .build();
        let containers = docker
            .list_containers(Some(opts))
            .await
            .map_err(|e| self.classify("cannot list containers", e))?;
        Ok(containers
            .into_iter()
            .filter_map(|c| {
                let labels = c.labels?;
                if labels.get(LABEL_INSTANCE) != Some(&self.instance_id) {
                    return None;
                }
                Some(RuntimeInfo {
                    sandbox_id: labels.get(LABEL_SANDBOX)?.clone(),
                    runtime_id: c.id?,
                    running: c.state == Some(ContainerSummaryStateEnum::RUNNING),
                })
            })
            .collect())
    }

    async fn health(&self) -> Result<(), ProviderError> {
        let check = async {
            let docker = self.docker().await?;
            docker.ping().await.map_err(|e| {
                if is_connection_error(&e) {
                    self.unreachable(&e)
                } else {
                    ProviderError::Unavailable {
                        provider: "docker".into(),
                        message: format!(
                            "docker daemon at {} failed its ping: {}",
                            self.socket,
                            error_chain(&e)
                        ),
                    }
                }
            })
        };
        match tokio::time::timeout(HEALTH_TIMEOUT, check).await {
            Ok(r) => r.map(|_| ()),
            Err(_) => Err(ProviderError::Unavailable {
                provider: "docker".into(),
                message: format!(
                    "docker daemon at {} did not answer within {} s",
                    self.socket,
                    HEALTH_TIMEOUT.as_secs()
                ),
            }),
        }
    }

    async fn logs(&self, sandbox_id: &str, lines: usize) -> Vec<String> {
        match self.docker().await {
            Ok(docker) => tail_logs(&docker, &container_name(sandbox_id), lines).await,
            Err(_) => Vec::new(),
        }
    }
}

/// Removes a half-created container when `create` is abandoned mid-way.
struct RemoveOnDrop {
    docker: Option<Docker>,
    name: String,
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        let Some(docker) = self.docker.take() else {
            return;
        };
        let name = std::mem::take(&mut self.name);
        if let Ok(handle) = tokio::runtime::Handle::try_current() {
            handle.spawn(async move {
                DockerProvider::remove_quietly(&docker, &name).await;
            });
        } else {
            tracing::warn!(container = %name, "create abandoned outside a runtime; container left behind");
        }
    }
}

/// Aggregated state of an image pull.
struct PullProgress {
    /// Per layer: (finished, bytes downloaded, bytes total).
    layers: HashMap<String, (bool, i64, i64)>,
    /// Last status line without a layer id (`Digest: …`, `Status: …`).
    summary: String,
    started: Instant,
    last_log: Instant,
}

impl PullProgress {
    fn new() -> Self {
        let now = Instant::now();
        PullProgress {
            layers: HashMap::new(),
            summary: String::new(),
            started: now,
            last_log: now,
        }
    }

    fn update(
        &mut self,
        id: Option<&str>,
        status: Option<&str>,
        current: Option<i64>,
        total: Option<i64>,
    ) {
        let status = status.unwrap_or_default();
        let Some(id) = id.filter(|id| !id.is_empty() && !status.starts_with("Pulling from")) else {
            if !status.is_empty() {
                self.summary = status.to_string();
            }
            return;
        };
        let layer = self.layers.entry(id.to_string()).or_insert((false, 0, 0));
        match status {
            "Downloading" => {
                layer.1 = current.unwrap_or(layer.1);
                layer.2 = total.unwrap_or(layer.2);
            }
            "Download complete" | "Verifying Checksum" => layer.1 = layer.2,
            "Pull complete" | "Already exists" => {
                layer.0 = true;
                layer.1 = layer.2;
            }
            _ => {}
        }
    }

    fn log(&mut self, image: &str) {
        let done = self.layers.values().filter(|l| l.0).count();
        let downloaded: i64 = self.layers.values().map(|l| l.1).sum();
        let total: i64 = self.layers.values().map(|l| l.2).sum();
        tracing::info!(
            image,
            layers_done = done,
            layers = self.layers.len(),
            downloaded_mib = downloaded / (1024 * 1024),
            total_mib = total / (1024 * 1024),
            elapsed_s = self.started.elapsed().as_secs(),
            "pulling image"
        );
        self.last_log = Instant::now();
    }
}

/// Resolves when the container stops running, with its exit code. Never
/// resolves if the daemon cannot tell (the agent wait then decides).
async fn wait_exit(docker: &Docker, name: &str) -> i64 {
    let opts = WaitContainerOptionsBuilder::new()
        .condition("not-running")
        .build();
    let mut stream = docker.wait_container(name, Some(opts));
    match stream.next().await {
        Some(Ok(r)) => r.status_code,
        Some(Err(DockerError::DockerContainerWaitError { code, .. })) => code,
        other => {
            if let Some(Err(e)) = other {
                tracing::debug!(container = name, error = %error_chain(&e), "container wait failed");
            }
            std::future::pending().await
        }
    }
}

/// The last `lines` lines of the container's stdout and stderr.
async fn tail_logs(docker: &Docker, name: &str, lines: usize) -> Vec<String> {
    if lines == 0 {
        return Vec::new();
    }
    let opts = LogsOptionsBuilder::new()
        .stdout(true)
        .stderr(true)
        .tail(&lines.to_string())
        .build();
    let mut stream = docker.logs(name, Some(opts));
    let mut out = Vec::new();
    while let Some(item) = stream.next().await {
        match item {
            Ok(chunk) => {
                let text = String::from_utf8_lossy(chunk.as_ref()).into_owned();
                out.extend(
                    text.split('\n')
                        .map(|l| l.strip_suffix('\r').unwrap_or(l))
                        .filter(|l| !l.is_empty())
                        .map(str::to_string),
                );
            }
            Err(e) => {
                tracing::debug!(container = name, error = %error_chain(&e), "cannot read container logs");
                break;
            }
        }
    }
    let skip = out.len().saturating_sub(lines);
    out.drain(..skip);
    out
}

fn with_logs(message: String, logs: &[String]) -> String {
    if logs.is_empty() {
        format!("{message}; the container logged nothing")
    } else {
        format!("{message}; last log lines:\n{}", logs.join("\n"))
    }
}

/// `stacyvm-<sandbox id>`.
pub fn container_name(sandbox_id: &str) -> String {
    format!("{CONTAINER_PREFIX}{sandbox_id}")
}

fn short_id(id: &str) -> &str {
    id.get(..12).unwrap_or(id)
}

/// A host path usable in a `src:dst:mode` bind.
fn host_path(p: &Path, what: &str) -> Result<String, ProviderError> {
    let s = p.to_str().ok_or_else(|| {
        ProviderError::Invalid(format!("{what} path {} is not UTF-8", p.display()))
    })?;
    if !p.is_absolute() || s.contains(':') {
        return Err(ProviderError::Invalid(format!(
            "{what} path {s:?} must be absolute and must not contain ':'"
        )));
    }
    // A missing bind source would be created by the daemon as a directory.
    if std::fs::metadata(p).is_err() {
        return Err(ProviderError::Invalid(format!("{what} {s} does not exist")));
    }
    Ok(s.to_string())
}

/// Filesystem path of a Unix socket given as a path or `unix://` URL.
fn socket_path(raw: &str) -> Result<String, ProviderError> {
    let raw = raw.trim();
    if let Some(path) = raw.strip_prefix("unix://") {
        return Ok(path.to_string());
    }
    if raw.contains("://") {
        return Err(ProviderError::Invalid(format!(
            "docker host {raw} is not supported: only unix:// sockets are"
        )));
    }
    Ok(raw.to_string())
}

/// Split an image reference into the `fromImage` and `tag` pull parameters.
/// `host:port/repo:tag` keeps the port in the repository; a digest
/// (`repo@sha256:…`) is passed as the tag; no tag means `latest`.
pub fn split_image_ref(image: &str) -> (String, String) {
    if let Some((repo, digest)) = image.split_once('@') {
        // A tag next to a digest is redundant; the digest wins.
        let repo = match tag_position(repo) {
            Some(i) => &repo[..i],
            None => repo,
        };
        return (repo.to_string(), digest.to_string());
    }
    match tag_position(image) {
        Some(i) => (image[..i].to_string(), image[i + 1..].to_string()),
        None => (image.to_string(), "latest".to_string()),
    }
}

/// Index of the `:` that starts the tag, if the reference has one.
fn tag_position(reference: &str) -> Option<usize> {
    let last_slash = reference.rfind('/').map_or(0, |i| i + 1);
    reference[last_slash..].rfind(':').map(|i| last_slash + i)
}

fn status_of(e: &DockerError) -> Option<u16> {
    match e {
        DockerError::DockerResponseServerError { status_code, .. } => Some(*status_code),
        _ => None,
    }
}

fn is_missing_image(e: &DockerError) -> bool {
    matches!(e, DockerError::DockerResponseServerError { status_code: 404, message }
        if message.to_ascii_lowercase().contains("no such image"))
}

/// Errors that mean the daemon could not be talked to at all.
fn is_connection_error(e: &DockerError) -> bool {
    matches!(
        e,
        DockerError::SocketNotFoundError(_)
            | DockerError::HyperLegacyError { .. }
            | DockerError::HyperResponseError { .. }
            | DockerError::IOError { .. }
            | DockerError::RequestTimeoutError
    )
}

/// The daemon's own message when there is one, else the error chain.
fn server_message(e: &DockerError) -> String {
    match e {
        DockerError::DockerResponseServerError { message, .. } => message.clone(),
        DockerError::DockerStreamError { error } => error.clone(),
        _ => error_chain(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_refs_split_into_repo_and_tag() {
        let cases = [
            ("python", ("python", "latest")),
            ("python:3.12", ("python", "3.12")),
            (
                "stacyvm-test/python:bookworm",
                ("stacyvm-test/python", "bookworm"),
            ),
            (
                "localhost:5000/team/app",
                ("localhost:5000/team/app", "latest"),
            ),
            (
                "localhost:5000/team/app:v1",
                ("localhost:5000/team/app", "v1"),
            ),
            (
                "127.0.0.1:9/stacyvm-missing/none:latest",
                ("127.0.0.1:9/stacyvm-missing/none", "latest"),
            ),
            ("alpine@sha256:abcd", ("alpine", "sha256:abcd")),
            (
                "reg:443/alpine:3@sha256:abcd",
                ("reg:443/alpine", "sha256:abcd"),
            ),
        ];
        for (input, (repo, tag)) in cases {
            assert_eq!(
                split_image_ref(input),
                (repo.to_string(), tag.to_string()),
                "{input}"
            );
        }
    }

    #[test]
    fn hostnames_are_valid_labels() {
        assert_eq!(hostname_for("sb_AbC123"), "sb-abc123");
        assert_eq!(hostname_for("__"), "sandbox");
        assert_eq!(hostname_for(&"x".repeat(100)).len(), 63);
    }

    #[test]
    fn socket_addresses() {
        assert_eq!(
            socket_path("unix:///run/docker.sock").ok(),
            Some("/run/docker.sock".into())
        );
        assert_eq!(
            socket_path("/run/docker.sock").ok(),
            Some("/run/docker.sock".into())
        );
        assert!(matches!(
            socket_path("tcp://127.0.0.1:2375"),
            Err(ProviderError::Invalid(_))
        ));
    }

    #[test]
    fn pull_progress_aggregates_layers() {
        let mut p = PullProgress::new();
        p.update(None, Some("Pulling from library/x"), None, None);
        p.update(Some("latest"), Some("Pulling from library/x"), None, None);
        p.update(Some("a"), Some("Pulling fs layer"), None, None);
        p.update(Some("a"), Some("Downloading"), Some(10), Some(100));
        p.update(Some("b"), Some("Already exists"), None, None);
        assert_eq!(p.layers.len(), 2);
        assert_eq!(p.layers["a"], (false, 10, 100));
        p.update(Some("a"), Some("Pull complete"), None, None);
        assert_eq!(p.layers["a"], (true, 100, 100));
        p.update(None, Some("Status: Downloaded newer image"), None, None);
        assert_eq!(p.summary, "Status: Downloaded newer image");
    }
}
