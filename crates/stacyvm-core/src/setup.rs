//! Bringing a server up: data directory, store, agent binary, providers.

use crate::audit::AuditSink;
use crate::config::Config;
use crate::engine::Engine;
use crate::error::Error;
use crate::images::StoreRootfs;
use stacyvm_images::{ImageStore, StoreOptions};
use stacyvm_native::{NativeOptions, NativeProvider};
use stacyvm_proot::{ProotOptions, ProotProvider};
use stacyvm_providers::custom::{CustomOptions, CustomProvider};
use stacyvm_providers::docker::{DockerOptions, DockerProvider, PullPolicy};
use stacyvm_providers::mock::{MockOptions, MockProvider};
use stacyvm_providers::Provider;
use stacyvm_store::Store;
use std::path::{Path, PathBuf};
use std::sync::{Arc, OnceLock};

/// Where the agent binary is looked for when the config names none.
fn agent_candidates() -> Vec<PathBuf> {
    let mut out = Vec::new();
    if let Ok(exe) = std::env::current_exe() {
        if let Some(dir) = exe.parent() {
            out.push(dir.join("stacyvm-agent"));
            // Inside a cargo target dir: target/<profile>/stacyvm (or
            // target/<profile>/deps/…) next to target/<triple>/release/.
            for up in [dir.parent(), dir.parent().and_then(Path::parent)]
                .into_iter()
                .flatten()
            {
                out.push(up.join("x86_64-unknown-linux-gnu/release/stacyvm-agent"));
            }
        }
    }
    out.push(PathBuf::from("/usr/local/lib/stacyvm/stacyvm-agent"));
    out.push(PathBuf::from("/usr/lib/stacyvm/stacyvm-agent"));
    out
}

/// Whether an ELF file is statically linked (has no program interpreter).
pub fn elf_is_static(bytes: &[u8]) -> Result<bool, String> {
    if bytes.len() < 64 || &bytes[..4] != b"\x7fELF" {
        return Err("not an ELF executable".into());
    }
    if bytes[4] != 2 || bytes[5] != 1 {
        return Err("only 64-bit little-endian ELF is supported".into());
    }
    let u16_at = |o: usize| u16::from_le_bytes([bytes[o], bytes[o + 1]]) as usize;
    let u32_at = |o: usize| -> Option<u32> {
        Some(u32::from_le_bytes(bytes.get(o..o + 4)?.try_into().ok()?))
    };
    let u64_at = |o: usize| -> Option<u64> {
        Some(u64::from_le_bytes(bytes.get(o..o + 8)?.try_into().ok()?))
    };
    let phoff = u64_at(32).ok_or("truncated ELF header")? as usize;
    let phentsize = u16_at(54);
    let phnum = u16_at(56);
    for i in 0..phnum {
        let off = phoff + i * phentsize;
        let p_type = u32_at(off).ok_or("truncated program headers")?;
        if p_type == 3 {
            return Ok(false); // PT_INTERP
        }
    }
    Ok(true)
}

/// Find the agent binary, check that it can run in any image, and copy it
/// into the data directory (so rebuilding the source never changes the file
/// that running sandboxes have mounted).
pub fn install_agent(cfg: &Config) -> Result<PathBuf, Error> {
    let (_src, bytes) = match &cfg.agent_path {
        Some(p) => {
            let bytes = std::fs::read(p)
                .map_err(|e| Error::invalid(format!("cannot read agent {}: {e}", p.display())))?;
            match elf_is_static(&bytes) {
                Ok(true) => (p.clone(), bytes),
                Ok(false) => {
                    return Err(Error::invalid(format!(
                        "agent {} is dynamically linked and would not run in every image; \
                         build it with scripts/build.sh (static)",
                        p.display()
                    )))
                }
                Err(e) => return Err(Error::invalid(format!("agent {}: {e}", p.display()))),
            }
        }
        None => {
            // The first statically linked candidate wins; a dynamically
            // linked build (e.g. from `cargo test`) is passed over.
            let mut seen = Vec::new();
            let mut found = None;
            for p in agent_candidates() {
                let Ok(bytes) = std::fs::read(&p) else {
                    continue;
                };
                if elf_is_static(&bytes) == Ok(true) {
                    found = Some((p, bytes));
                    break;
                }
                seen.push(p.display().to_string());
            }
            found.ok_or_else(|| {
                let also = if seen.is_empty() {
                    String::new()
                } else {
                    format!(" (not static: {})", seen.join(", "))
                };
                Error::invalid(format!(
                    "no statically linked sandbox agent (stacyvm-agent) was found beside the server{also}; \
                     build it with scripts/build.sh or set STACYVM_AGENT_PATH"
                ))
            })?
        }
    };
    let bin_dir = cfg.data_dir.join("bin");
    std::fs::create_dir_all(&bin_dir)
        .map_err(|e| Error::internal(format!("cannot create {}: {e}", bin_dir.display())))?;
    let dst = bin_dir.join("stacyvm-agent");
    if std::fs::read(&dst).ok().as_deref() != Some(&bytes[..]) {
        let tmp = bin_dir.join(format!(".stacyvm-agent.{}", std::process::id()));
        std::fs::write(&tmp, &bytes)
            .and_then(|_| {
                use std::os::unix::fs::PermissionsExt;
                std::fs::set_permissions(&tmp, std::fs::Permissions::from_mode(0o755))
            })
            .and_then(|_| std::fs::rename(&tmp, &dst))
            .map_err(|e| {
                Error::internal(format!("cannot install agent into {}: {e}", dst.display()))
            })?;
    }
    Ok(dst)
}

/// The image store of the native provider.
pub fn open_image_store(cfg: &Config) -> Result<ImageStore, Error> {
    ImageStore::open(
        &cfg.image_dir(),
        StoreOptions {
            insecure_registries: cfg.insecure_registries.clone(),
            ..StoreOptions::default()
        },
    )
    .map_err(|e| Error::invalid(format!("image store {}: {e}", cfg.image_dir().display())))
}

fn native_provider(
    cfg: &Config,
    instance_id: &str,
    audit: Arc<OnceLock<AuditSink>>,
) -> Result<NativeProvider, Error> {
    let store = open_image_store(cfg)?;
    let exe = std::env::current_exe()
        .map_err(|e| Error::internal(format!("cannot find the server executable: {e}")))?;
    NativeProvider::new(NativeOptions {
        state_dir: cfg.data_dir.join("native"),
        instance_id: instance_id.to_string(),
        init_exe: exe,
        init_args: vec!["__sandbox-init".to_string()],
        rootfs: Arc::new(StoreRootfs { store, audit }),
    })
    .map_err(Error::from)
}

/// The `custom` provider: the operator's backend at `custom.url` (see
/// docs/CUSTOM_PROVIDER.md). A backend that is down does not stop the
/// server; the provider is unhealthy until it answers.
async fn custom_provider(cfg: &Config, instance_id: &str) -> Result<CustomProvider, Error> {
    let url = cfg
        .custom
        .url
        .clone()
        .ok_or_else(|| Error::invalid("the custom provider needs custom.url"))?;
    CustomProvider::connect(CustomOptions {
        url,
        token: cfg.custom.token.clone(),
        instance_id: instance_id.to_string(),
    })
    .await
    .map_err(|e| Error::invalid(e.to_string()))
}

/// The `mock` provider: sandboxes that are directories under
/// `<data_dir>/mock`, served in-process; it isolates nothing and runs no code
/// (it logs a warning saying so when it starts).
async fn mock_provider(cfg: &Config, instance_id: &str) -> Result<MockProvider, Error> {
    MockProvider::new(MockOptions {
        state_dir: cfg.data_dir.join("mock"),
        instance_id: instance_id.to_string(),
    })
    .await
    .map_err(Error::from)
}

/// The proot provider (no isolation; for hosts without namespaces). Fails
/// when `proot` is not installed.
fn proot_provider(
    cfg: &Config,
    instance_id: &str,
    audit: Arc<OnceLock<AuditSink>>,
) -> Result<ProotProvider, Error> {
    let store = open_image_store(cfg)?;
    ProotProvider::new(ProotOptions {
        state_dir: cfg.data_dir.join("proot"),
        instance_id: instance_id.to_string(),
        proot_binary: PathBuf::from(&cfg.proot.binary),
        cache_dir: None,
        rootfs: Arc::new(StoreRootfs { store, audit }),
    })
    .map_err(Error::from)
}

async fn docker_provider(cfg: &Config, instance_id: &str) -> Result<DockerProvider, Error> {
    DockerProvider::connect(DockerOptions {
        socket: cfg.docker.socket.clone(),
        instance_id: instance_id.to_string(),
        pull: if cfg.docker.pull == "never" {
            PullPolicy::Never
        } else {
            PullPolicy::Missing
        },
    })
    .await
    .map_err(|e| Error::invalid(e.to_string()))
}

/// Open the store, install the agent, connect the providers and build the
/// engine. Does not reconcile or start background tasks.
pub async fn build_engine(cfg: Config) -> Result<Arc<Engine>, Error> {
    std::fs::create_dir_all(cfg.data_dir.join("s")).map_err(|e| {
        Error::invalid(format!(
            "cannot create data dir {}: {e}",
            cfg.data_dir.display()
        ))
    })?;
    // Unix socket paths are limited to 107 bytes.
    let probe = cfg
        .data_dir
        .join("s")
        .join("sb_0000000000000000")
        .join("agent.sock");
    if probe.as_os_str().len() > 107 {
        return Err(Error::invalid(format!(
            "data dir {} is too long for agent socket paths; use a shorter STACYVM_DATA_DIR",
            cfg.data_dir.display()
        )));
    }
    let db_path = cfg.data_dir.join("stacyvm.db");
    let store = tokio::task::spawn_blocking(move || Store::open(&db_path))
        .await
        .map_err(|e| Error::internal(e.to_string()))??;
    let store = Arc::new(store);
    let instance_id = store.meta_get_or_init("instance_id", || crate::id::random_token(12))?;
    let agent = install_agent(&cfg)?;

    let mut providers: Vec<Arc<dyn Provider>> = Vec::new();
    let pull_audit = Arc::new(OnceLock::new());
    for name in cfg.enabled_providers() {
        let built: Result<Arc<dyn Provider>, Error> = match name.as_str() {
            "docker" => docker_provider(&cfg, &instance_id)
                .await
                .map(|p| Arc::new(p) as Arc<dyn Provider>),
            "native" => native_provider(&cfg, &instance_id, pull_audit.clone())
                .map(|p| Arc::new(p) as Arc<dyn Provider>),
            "proot" => proot_provider(&cfg, &instance_id, pull_audit.clone())
                .map(|p| Arc::new(p) as Arc<dyn Provider>),
            "mock" => mock_provider(&cfg, &instance_id)
                .await
                .map(|p| Arc::new(p) as Arc<dyn Provider>),
            "custom" => custom_provider(&cfg, &instance_id)
                .await
                .map(|p| Arc::new(p) as Arc<dyn Provider>),
            other => Err(Error::invalid(format!(
                "provider {other} is not available in this build"
            ))),
        };
        match built {
            Ok(p) => providers.push(p),
            Err(e) => tracing::warn!(provider = %name, error = %e, "provider unavailable"),
        }
    }
    tracing::info!(instance = %instance_id, data_dir = %cfg.data_dir.display(), agent = %agent.display(), "engine ready");
    let engine = Engine::new(cfg, store, providers, agent)?;
    let _ = pull_audit.set(engine.audit_sink());
    Ok(engine)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn detects_dynamic_executables() {
        // This test binary itself is dynamically linked.
        let me = std::fs::read(std::env::current_exe().unwrap()).unwrap();
        assert_eq!(elf_is_static(&me), Ok(false));
        assert!(elf_is_static(b"#!/bin/sh\necho hi\n").is_err());
        assert!(elf_is_static(&[]).is_err());
    }
}
