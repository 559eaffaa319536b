//! `stacyvm doctor` (is this host ready, and for which providers?) and
//! `stacyvm config lint` (is this configuration safe?).

use crate::hostcheck::{self, CheckResult, Status};
use anyhow::{Context, Result};
use clap::{Args, Subcommand, ValueEnum};
use stacyvm_core::lint::{self, LintContext, Severity};
use stacyvm_core::Config;
use std::path::PathBuf;

#[derive(Clone, Copy, ValueEnum, Default)]
pub enum Format {
    #[default]
    Text,
    Json,
}

#[derive(Args)]
pub struct DoctorArgs {
    /// TOML config file (environment variables STACYVM_* override it).
    #[arg(long, env = "STACYVM_CONFIG")]
    config: Option<PathBuf>,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
}

#[derive(Subcommand)]
pub enum ConfigCmd {
    /// Report unsafe settings; exits 1 when any finding is an error.
    Lint {
        /// TOML config file (environment variables STACYVM_* override it).
        #[arg(long, env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
        /// Judge the configuration as a production deployment: laptop
        /// conveniences (no key on loopback, the mock provider, no quotas,
        /// audit off) become errors.
        #[arg(long)]
        production: bool,
        #[arg(long, value_enum, default_value_t)]
        format: Format,
    },
}

fn load(config: Option<&std::path::Path>) -> Result<Config> {
    Config::load(config, std::env::vars()).context("configuration")
}

/// Providers a failing check makes unusable.
fn affected(check: &CheckResult, enabled: &[String]) -> Vec<String> {
    hostcheck::needed_by(&check.id)
        .iter()
        .filter(|p| enabled.iter().any(|e| e == *p))
        .map(|p| p.to_string())
        .collect()
}

pub async fn doctor(a: DoctorArgs) -> Result<i32> {
    let cfg = load(a.config.as_deref())?;
    let enabled = cfg.enabled_providers();
    let checks = hostcheck::all(&cfg).await;
    let mut ready = Vec::new();
    for p in &enabled {
        let blocked: Vec<&str> = checks
            .iter()
            .filter(|c| {
                c.status == Status::Fail && hostcheck::needed_by(&c.id).contains(&p.as_str())
            })
            .map(|c| c.id.as_str())
            .collect();
        ready.push((p.clone(), blocked));
    }
    // A failure that blocks an enabled provider makes the host not ready.
    let failing = checks
        .iter()
        .any(|c| c.status == Status::Fail && !affected(c, &enabled).is_empty());
    match a.format {
        Format::Json => {
            let v = serde_json::json!({
                "ready": !failing,
                "data_dir": cfg.data_dir,
                "checks": checks,
                "providers": ready.iter().map(|(p, blocked)| serde_json::json!({
                    "name": p, "ready": blocked.is_empty(), "blocked_by": blocked,
                })).collect::<Vec<_>>(),
            });
            println!("{}", serde_json::to_string_pretty(&v)?);
        }
        Format::Text => {
            let w = checks.iter().map(|c| c.id.len()).max().unwrap_or(10);
            for c in &checks {
                println!(
                    "{:<4}  {:<w$}  {}",
                    c.status.as_str().to_uppercase(),
                    c.id,
                    c.detail
                );
            }
            println!();
            for (p, blocked) in &ready {
                if blocked.is_empty() {
                    println!("provider {p}: ready");
                } else {
                    println!("provider {p}: NOT READY ({})", blocked.join(", "));
                }
            }
        }
    }
    Ok(if failing { 1 } else { 0 })
}

fn quota_rows(cfg: &Config) -> Option<usize> {
    let db = cfg.data_dir.join("stacyvm.db");
    if !db.exists() {
        return None;
    }
    stacyvm_store::Store::open_read_only(&db)
        .and_then(|s| s.list_quotas())
        .map(|q| q.len())
        .ok()
}

pub fn config_cmd(cmd: ConfigCmd) -> Result<i32> {
    match cmd {
        ConfigCmd::Lint {
            config,
            production,
            format,
        } => {
            let cfg = load(config.as_deref())?;
            let ctx = LintContext {
                quota_rows: quota_rows(&cfg),
            };
            let findings = lint::lint(&cfg, &ctx, production);
            let errors = findings
                .iter()
                .filter(|f| f.severity == Severity::Error)
                .count();
            match format {
                Format::Json => {
                    let v = serde_json::json!({
                        "production": production,
                        "ok": errors == 0,
                        "findings": findings,
                    });
                    println!("{}", serde_json::to_string_pretty(&v)?);
                }
                Format::Text => {
                    for f in &findings {
                        println!("{:<7}  {}: {}", f.severity.as_str(), f.id, f.message);
                        println!("         fix: {}", f.fix);
                    }
                    let warnings = findings
                        .iter()
                        .filter(|f| f.severity == Severity::Warning)
                        .count();
                    println!(
                        "{} error(s), {warnings} warning(s){}",
                        errors,
                        if production {
                            " (production rules)"
                        } else {
                            ""
                        }
                    );
                }
            }
            Ok(if errors > 0 { 1 } else { 0 })
        }
    }
}
