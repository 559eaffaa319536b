//! Server configuration: a TOML file, then `STACYVM_*` environment overrides.
//!
//! Every field has an embedded default, so `stacyvm serve` runs with no file.

use crate::duration;
pub use crate::preview::PreviewAccess;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("cannot read config file {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("config file {path}: {message}")]
    Parse { path: PathBuf, message: String },
    #[error("{name}: {message}")]
    Invalid { name: String, message: String },
}

fn invalid(name: &str, message: impl Into<String>) -> ConfigError {
    ConfigError::Invalid {
        name: name.to_string(),
        message: message.into(),
    }
}

/// Docker provider settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct DockerConfig {
    /// Docker Engine socket; default `DOCKER_HOST` or `/var/run/docker.sock`.
    pub socket: Option<String>,
    /// `missing` (pull images that are not present) or `never`.
    pub pull: String,
}

impl Default for DockerConfig {
    fn default() -> Self {
        DockerConfig {
            socket: None,
            pull: "missing".to_string(),
        }
    }
}

/// PRoot provider settings.
#[derive(Debug, Clone, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct ProotConfig {
    /// The `proot` executable (a path, or a name looked up in `PATH`).
    pub binary: String,
}

impl Default for ProotConfig {
    fn default() -> Self {
        ProotConfig {
            binary: "proot".to_string(),
        }
    }
}

/// Custom (HTTP contract) provider settings; see docs/CUSTOM_PROVIDER.md.
#[derive(Debug, Clone, Deserialize, PartialEq, Default)]
#[serde(default, deny_unknown_fields)]
pub struct CustomConfig {
    /// Base URL of the backend, e.g. `http://127.0.0.1:7500`.
    pub url: Option<String>,
    /// Bearer token sent to the backend on every call.
    pub token: Option<String>,
}

/// Every provider name the server knows.
pub const PROVIDER_NAMES: &[&str] = &["native", "docker", "proot", "custom", "mock"];

/// The raw file form: durations and sizes as strings, everything optional.
#[derive(Debug, Clone, Deserialize, Default)]
#[serde(default, deny_unknown_fields)]
struct FileConfig {
    listen: Option<String>,
    data_dir: Option<PathBuf>,
    default_provider: Option<String>,
    api_key: Option<String>,
    preview_domain: Option<String>,
    preview_listen: Option<String>,
    preview_access: Option<String>,
    preview_timeout: Option<String>,
    preview_token_ttl: Option<String>,
    default_image: Option<String>,
    default_ttl: Option<String>,
    max_ttl: Option<String>,
    default_exec_timeout: Option<String>,
    max_exec_timeout: Option<String>,
    default_memory_mb: Option<u64>,
    max_memory_mb: Option<u64>,
    default_vcpus: Option<u32>,
    max_vcpus: Option<u32>,
    pids_limit: Option<u64>,
    max_sandboxes: Option<u64>,
    max_body_bytes: Option<u64>,
    output_limit_bytes: Option<u64>,
    start_timeout: Option<String>,
    reaper_interval: Option<String>,
    agent_path: Option<PathBuf>,
    log_format: Option<String>,
    audit_log: Option<bool>,
    image_dir: Option<PathBuf>,
    insecure_registries: Option<Vec<String>>,
    providers: Option<Vec<String>>,
    docker: Option<DockerConfig>,
    proot: Option<ProotConfig>,
    custom: Option<CustomConfig>,
}

/// Effective configuration.
#[derive(Debug, Clone)]
pub struct Config {
    pub listen: String,
    pub data_dir: PathBuf,
    pub default_provider: String,
    /// Bootstrap admin key; auth is on when set.
    pub api_key: Option<String>,
    /// Live previews answer on `{port}-{id}.{preview_domain}`. May carry a
    /// `:port` (then preview URLs use it as is).
    pub preview_domain: String,
    /// A second listener that serves previews only (the main one serves
    /// them too, by `Host`).
    pub preview_listen: Option<String>,
    /// Access to previews of sandboxes that do not choose: `None` = `public`
    /// when the preview domain is `localhost`, else `token`.
    pub preview_access: Option<PreviewAccess>,
    /// How long a previewed app may take to send its response headers
    /// (counted from the end of the request body).
    pub preview_timeout: Duration,
    /// Default lifetime of a preview token (capped by `max_ttl`).
    pub preview_token_ttl: Duration,
    pub default_image: String,
    pub default_ttl: Duration,
    pub max_ttl: Duration,
    pub default_exec_timeout: Duration,
    pub max_exec_timeout: Duration,
    pub default_memory_mb: u64,
    pub max_memory_mb: u64,
    pub default_vcpus: u32,
    pub max_vcpus: u32,
    pub pids_limit: u64,
    /// Global cap of active sandboxes.
    pub max_sandboxes: u64,
    /// Largest JSON request body.
    pub max_body_bytes: u64,
    /// Exec output kept per stream.
    pub output_limit_bytes: u64,
    /// How long a sandbox may take to answer after its runtime started.
    pub start_timeout: Duration,
    pub reaper_interval: Duration,
    /// Static agent binary; default: `stacyvm-agent` beside the server binary.
    pub agent_path: Option<PathBuf>,
    /// `text` or `json`.
    pub log_format: String,
    /// Record the audit trail (API.md §9); off only for measurements.
    pub audit_log: bool,
    /// The native provider's image store; default `<data_dir>/images`.
    pub image_dir: Option<PathBuf>,
    /// Registries (`host:port`) pulled from over plain HTTP; loopback
    /// registries always are.
    pub insecure_registries: Vec<String>,
    /// Providers to start (the default provider is always added). Those
    /// whose runtime is missing on the host are reported unhealthy.
    pub providers: Vec<String>,
    pub docker: DockerConfig,
    pub proot: ProotConfig,
    pub custom: CustomConfig,
}

fn default_data_dir() -> PathBuf {
    // SAFETY: geteuid has no preconditions and cannot fail.
    if unsafe { libc::geteuid() } == 0 {
        PathBuf::from("/var/lib/stacyvm")
    } else if let Some(home) = std::env::var_os("HOME") {
        Path::new(&home).join(".local/share/stacyvm")
    } else {
        PathBuf::from("/tmp/stacyvm")
    }
}

fn host_cpus() -> u32 {
    std::thread::available_parallelism()
        .map(|n| n.get() as u32)
        .unwrap_or(1)
}

impl Default for Config {
    fn default() -> Self {
        Config {
            listen: "0.0.0.0:7423".to_string(),
            data_dir: default_data_dir(),
            default_provider: "native".to_string(),
            api_key: None,
            preview_domain: "localhost".to_string(),
            preview_listen: None,
            preview_access: None,
            preview_timeout: Duration::from_secs(60),
            preview_token_ttl: Duration::from_secs(3600),
            default_image: "python:3.12".to_string(),
            default_ttl: Duration::from_secs(30 * 60),
            max_ttl: Duration::from_secs(24 * 3600),
            default_exec_timeout: Duration::from_secs(5 * 60),
            max_exec_timeout: Duration::from_secs(3600),
            default_memory_mb: 512,
            max_memory_mb: 16 * 1024,
            default_vcpus: 1,
            max_vcpus: host_cpus(),
            pids_limit: 512,
            max_sandboxes: 200,
            max_body_bytes: 64 * 1024 * 1024,
            output_limit_bytes: 16 * 1024 * 1024,
            start_timeout: Duration::from_secs(60),
            reaper_interval: Duration::from_millis(500),
            agent_path: None,
            log_format: "text".to_string(),
            audit_log: true,
            image_dir: None,
            insecure_registries: Vec::new(),
            providers: vec!["native".into(), "docker".into(), "proot".into()],
            docker: DockerConfig::default(),
            proot: ProotConfig::default(),
            custom: CustomConfig::default(),
        }
    }
}

fn dur(name: &str, v: &str) -> Result<Duration, ConfigError> {
    duration::parse(v).map_err(|e| invalid(name, e.to_string()))
}

fn num<T: std::str::FromStr>(name: &str, v: &str) -> Result<T, ConfigError> {
    v.trim()
        .parse()
        .map_err(|_| invalid(name, format!("{v:?} is not a valid number")))
}

impl Config {
    /// Where the image store lives.
    pub fn image_dir(&self) -> PathBuf {
        self.image_dir
            .clone()
            .unwrap_or_else(|| self.data_dir.join("images"))
    }

    /// Load from an optional TOML file, then apply environment overrides
    /// from `env` (normally `std::env::vars()`).
    pub fn load(
        file: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config, ConfigError> {
        let mut cfg = Config::default();
        if let Some(path) = file {
            let text = std::fs::read_to_string(path).map_err(|source| ConfigError::Read {
                path: path.to_path_buf(),
                source,
            })?;
            let f: FileConfig = toml::from_str(&text).map_err(|e| ConfigError::Parse {
                path: path.to_path_buf(),
                message: e.to_string(),
            })?;
            cfg.apply_file(f)?;
        }
        for (k, v) in env {
            cfg.apply_env(&k, &v)?;
        }
        cfg.validate()?;
        Ok(cfg)
    }

    fn apply_file(&mut self, f: FileConfig) -> Result<(), ConfigError> {
        macro_rules! set {
            ($field:ident) => {
                if let Some(v) = f.$field {
                    self.$field = v;
                }
            };
        }
        macro_rules! set_dur {
            ($field:ident) => {
                if let Some(v) = f.$field {
                    self.$field = dur(stringify!($field), &v)?;
                }
            };
        }
        set!(listen);
        set!(data_dir);
        set!(default_provider);
        set!(preview_domain);
        set!(default_image);
        set!(default_memory_mb);
        set!(max_memory_mb);
        set!(default_vcpus);
        set!(max_vcpus);
        set!(pids_limit);
        set!(max_sandboxes);
        set!(max_body_bytes);
        set!(output_limit_bytes);
        set!(log_format);
        set!(audit_log);
        set!(docker);
        set!(proot);
        set!(custom);
        set!(providers);
        set_dur!(default_ttl);
        set_dur!(max_ttl);
        set_dur!(default_exec_timeout);
        set_dur!(max_exec_timeout);
        set_dur!(start_timeout);
        set_dur!(reaper_interval);
        set_dur!(preview_timeout);
        set_dur!(preview_token_ttl);
        if let Some(v) = f.preview_listen {
            self.preview_listen = (!v.is_empty()).then_some(v);
        }
        if let Some(v) = f.preview_access {
            self.preview_access = Some(access("preview_access", &v)?);
        }
        if f.api_key.is_some() {
            self.api_key = f.api_key;
        }
        if f.agent_path.is_some() {
            self.agent_path = f.agent_path;
        }
        if f.image_dir.is_some() {
            self.image_dir = f.image_dir;
        }
        if let Some(r) = f.insecure_registries {
            self.insecure_registries = r;
        }
        Ok(())
    }

    fn apply_env(&mut self, key: &str, v: &str) -> Result<(), ConfigError> {
        let Some(name) = key.strip_prefix("STACYVM_") else {
            return Ok(());
        };
        match name {
            "LISTEN" => self.listen = v.to_string(),
            "DATA_DIR" => self.data_dir = PathBuf::from(v),
            "DEFAULT_PROVIDER" => self.default_provider = v.to_string(),
            "API_KEY" => self.api_key = (!v.is_empty()).then(|| v.to_string()),
            "PREVIEW_DOMAIN" => self.preview_domain = v.to_string(),
            "PREVIEW_LISTEN" => self.preview_listen = (!v.is_empty()).then(|| v.to_string()),
            "PREVIEW_ACCESS" => {
                self.preview_access = if v.is_empty() {
                    None
                } else {
                    Some(access(key, v)?)
                }
            }
            "PREVIEW_TIMEOUT" => self.preview_timeout = dur(key, v)?,
            "PREVIEW_TOKEN_TTL" => self.preview_token_ttl = dur(key, v)?,
            "DEFAULT_IMAGE" => self.default_image = v.to_string(),
            "DEFAULT_TTL" => self.default_ttl = dur(key, v)?,
            "MAX_TTL" => self.max_ttl = dur(key, v)?,
            "DEFAULT_EXEC_TIMEOUT" => self.default_exec_timeout = dur(key, v)?,
            "MAX_EXEC_TIMEOUT" => self.max_exec_timeout = dur(key, v)?,
            "DEFAULT_MEMORY_MB" => self.default_memory_mb = num(key, v)?,
            "MAX_MEMORY_MB" => self.max_memory_mb = num(key, v)?,
            "DEFAULT_VCPUS" => self.default_vcpus = num(key, v)?,
            "MAX_VCPUS" => self.max_vcpus = num(key, v)?,
            "PIDS_LIMIT" => self.pids_limit = num(key, v)?,
            "MAX_SANDBOXES" => self.max_sandboxes = num(key, v)?,
            "MAX_BODY_BYTES" => self.max_body_bytes = num(key, v)?,
            "OUTPUT_LIMIT_BYTES" => self.output_limit_bytes = num(key, v)?,
            "START_TIMEOUT" => self.start_timeout = dur(key, v)?,
            "REAPER_INTERVAL" => self.reaper_interval = dur(key, v)?,
            "AGENT_PATH" => self.agent_path = Some(PathBuf::from(v)),
            "LOG_FORMAT" => self.log_format = v.to_string(),
            "AUDIT_LOG" => {
                self.audit_log = match v.trim() {
                    "1" | "true" | "on" | "yes" => true,
                    "0" | "false" | "off" | "no" => false,
                    _ => return Err(invalid(key, format!("{v:?} is not true or false"))),
                }
            }
            "IMAGE_DIR" => self.image_dir = Some(PathBuf::from(v)),
            "INSECURE_REGISTRIES" => {
                self.insecure_registries = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "DOCKER_SOCKET" => self.docker.socket = Some(v.to_string()),
            "DOCKER_PULL" => self.docker.pull = v.to_string(),
            "PROVIDERS" => {
                self.providers = v
                    .split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(str::to_string)
                    .collect()
            }
            "PROOT_BINARY" => self.proot.binary = v.to_string(),
            "CUSTOM_URL" => self.custom.url = (!v.is_empty()).then(|| v.to_string()),
            "CUSTOM_TOKEN" => self.custom.token = (!v.is_empty()).then(|| v.to_string()),
            // Client-side and unrelated variables (STACYVM_URL, …) are not ours.
            _ => {}
        }
        Ok(())
    }

    fn validate(&self) -> Result<(), ConfigError> {
        if self.listen.parse::<std::net::SocketAddr>().is_err() {
            return Err(invalid(
                "listen",
                format!("{:?} is not an address like 0.0.0.0:7423", self.listen),
            ));
        }
        if self.default_ttl.is_zero() || self.default_ttl > self.max_ttl {
            return Err(invalid(
                "default_ttl",
                "must be positive and at most max_ttl",
            ));
        }
        if self.default_exec_timeout.is_zero() || self.default_exec_timeout > self.max_exec_timeout
        {
            return Err(invalid(
                "default_exec_timeout",
                "must be positive and at most max_exec_timeout",
            ));
        }
        if self.default_memory_mb == 0 || self.default_memory_mb > self.max_memory_mb {
            return Err(invalid(
                "default_memory_mb",
                "must be between 1 and max_memory_mb",
            ));
        }
        if self.default_vcpus == 0 || self.default_vcpus > self.max_vcpus {
            return Err(invalid("default_vcpus", "must be between 1 and max_vcpus"));
        }
        if self.max_body_bytes < 1024 {
            return Err(invalid("max_body_bytes", "must be at least 1024"));
        }
        if !matches!(self.docker.pull.as_str(), "missing" | "never") {
            return Err(invalid("docker.pull", "must be \"missing\" or \"never\""));
        }
        for p in self.providers.iter().chain([&self.default_provider]) {
            if !PROVIDER_NAMES.contains(&p.as_str()) {
                return Err(invalid(
                    "providers",
                    format!(
                        "unknown provider {p:?}; known: {}",
                        PROVIDER_NAMES.join(", ")
                    ),
                ));
            }
        }
        if self.enabled_providers().iter().any(|p| p == "custom") {
            match &self.custom.url {
                None => {
                    return Err(invalid(
                        "custom.url",
                        "the custom provider needs the URL of its backend",
                    ))
                }
                Some(u) if !(u.starts_with("http://") || u.starts_with("https://")) => {
                    return Err(invalid(
                        "custom.url",
                        format!("{u:?} is not an http:// or https:// URL"),
                    ))
                }
                Some(_) => {}
            }
        }
        if !matches!(self.log_format.as_str(), "text" | "json") {
            return Err(invalid("log_format", "must be \"text\" or \"json\""));
        }
        if crate::preview::Domain::parse(&self.preview_domain).is_none() {
            return Err(invalid(
                "preview_domain",
                format!(
                    "{:?} is not a host name like preview.example.com (optionally with :port)",
                    self.preview_domain
                ),
            ));
        }
        if let Some(l) = &self.preview_listen {
            if l.parse::<std::net::SocketAddr>().is_err() {
                return Err(invalid(
                    "preview_listen",
                    format!("{l:?} is not an address like 0.0.0.0:8080"),
                ));
            }
        }
        if self.preview_timeout.is_zero() {
            return Err(invalid("preview_timeout", "must be positive"));
        }
        if self.preview_token_ttl.is_zero() {
            return Err(invalid("preview_token_ttl", "must be positive"));
        }
        Ok(())
    }

    /// The providers to start: `providers` plus the default provider,
    /// without repeats, in order.
    pub fn enabled_providers(&self) -> Vec<String> {
        let mut out: Vec<String> = Vec::new();
        for p in self.providers.iter().chain([&self.default_provider]) {
            if !out.contains(p) {
                out.push(p.clone());
            }
        }
        out
    }

    /// The effective preview access of sandboxes that do not choose.
    pub fn default_preview_access(&self) -> PreviewAccess {
        self.preview_access.unwrap_or_else(|| {
            match crate::preview::Domain::parse(&self.preview_domain) {
                Some(d) if d.host == "localhost" => PreviewAccess::Public,
                _ => PreviewAccess::Token,
            }
        })
    }
}

fn access(name: &str, v: &str) -> Result<PreviewAccess, ConfigError> {
    PreviewAccess::parse(v).ok_or_else(|| invalid(name, "must be \"token\" or \"public\""))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn defaults_are_valid() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.listen, "0.0.0.0:7423");
        assert_eq!(c.default_provider, "native");
        assert!(c.api_key.is_none());
        assert_eq!(c.preview_domain, "localhost");
        assert_eq!(c.default_preview_access(), PreviewAccess::Public);
        assert_eq!(c.preview_timeout, Duration::from_secs(60));
        assert!(c.preview_listen.is_none());
    }

    #[test]
    fn preview_settings() {
        let c = Config::load(
            None,
            env(&[
                ("STACYVM_PREVIEW_DOMAIN", "Preview.Test:8080"),
                ("STACYVM_PREVIEW_LISTEN", "127.0.0.1:8080"),
                ("STACYVM_PREVIEW_TIMEOUT", "2s"),
            ]),
        )
        .unwrap();
        assert_eq!(c.default_preview_access(), PreviewAccess::Token);
        assert_eq!(c.preview_timeout, Duration::from_secs(2));
        assert_eq!(c.preview_listen.as_deref(), Some("127.0.0.1:8080"));
        let c = Config::load(
            None,
            env(&[
                ("STACYVM_PREVIEW_DOMAIN", "localhost:7423"),
                ("STACYVM_PREVIEW_ACCESS", "token"),
            ]),
        )
        .unwrap();
        assert_eq!(c.default_preview_access(), PreviewAccess::Token);
        for bad in [
            ("STACYVM_PREVIEW_ACCESS", "open"),
            ("STACYVM_PREVIEW_DOMAIN", "a b"),
            ("STACYVM_PREVIEW_DOMAIN", "x.test:99999"),
            ("STACYVM_PREVIEW_DOMAIN", ""),
            ("STACYVM_PREVIEW_LISTEN", "nowhere"),
            ("STACYVM_PREVIEW_TIMEOUT", "0"),
        ] {
            assert!(Config::load(None, env(&[bad])).is_err(), "{bad:?}");
        }
    }

    #[test]
    fn env_overrides_file() {
        let dir = std::env::temp_dir().join(format!("stacyvm-cfg-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let file = dir.join("c.toml");
        std::fs::write(
            &file,
            "listen = \"127.0.0.1:9000\"\nmax_ttl = \"2h\"\n[docker]\npull = \"never\"\n",
        )
        .unwrap();
        let c = Config::load(
            Some(&file),
            env(&[
                ("STACYVM_LISTEN", "127.0.0.1:9001"),
                ("STACYVM_API_KEY", "k1"),
                ("STACYVM_PREVIEW_DOMAIN", "preview.test"),
                ("HOME", "/root"),
            ]),
        )
        .unwrap();
        assert_eq!(c.listen, "127.0.0.1:9001");
        assert_eq!(c.max_ttl, Duration::from_secs(7200));
        assert_eq!(c.docker.pull, "never");
        assert_eq!(c.api_key.as_deref(), Some("k1"));
        assert_eq!(c.preview_domain, "preview.test");
        std::fs::remove_dir_all(&dir).ok();
    }

    #[test]
    fn provider_selection() {
        let c = Config::load(None, env(&[])).unwrap();
        assert_eq!(c.enabled_providers(), ["native", "docker", "proot"]);
        let c = Config::load(
            None,
            env(&[
                ("STACYVM_PROVIDERS", "docker"),
                ("STACYVM_DEFAULT_PROVIDER", "mock"),
            ]),
        )
        .unwrap();
        assert_eq!(c.enabled_providers(), ["docker", "mock"]);
        let e = Config::load(None, env(&[("STACYVM_PROVIDERS", "native,lxc")])).unwrap_err();
        assert!(e.to_string().contains("lxc"), "{e}");
        let e = Config::load(None, env(&[("STACYVM_PROVIDERS", "custom")])).unwrap_err();
        assert!(e.to_string().contains("custom.url"), "{e}");
        let c = Config::load(
            None,
            env(&[
                ("STACYVM_PROVIDERS", "custom"),
                ("STACYVM_CUSTOM_URL", "http://127.0.0.1:7500"),
            ]),
        )
        .unwrap();
        assert_eq!(c.enabled_providers(), ["custom", "native"]);
    }

    #[test]
    fn bad_values_are_named() {
        let e = Config::load(None, env(&[("STACYVM_MAX_TTL", "forever")])).unwrap_err();
        assert!(e.to_string().contains("STACYVM_MAX_TTL"), "{e}");
        let e = Config::load(None, env(&[("STACYVM_LISTEN", "nowhere")])).unwrap_err();
        assert!(e.to_string().contains("listen"), "{e}");
    }
}
