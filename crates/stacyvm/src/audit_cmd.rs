//! `stacyvm audit verify`: check the audit log's hash chain.
//!
//! By default it opens `<data_dir>/stacyvm.db` read-only (no server needed;
//! safe while one runs). With `--remote` it asks a running server
//! (`GET /api/v1/audit/verify`, admin key).

use crate::client::Client;
use anyhow::{Context, Result};
use clap::{Args, Subcommand};
use http::Method;
use serde_json::{json, Value};
use stacyvm_store::{NewAudit, Store};
use std::path::{Path, PathBuf};

#[derive(Subcommand)]
pub enum AuditCmd {
    /// Verify the hash chain; exits 1 when a record was changed or removed.
    Verify(VerifyArgs),
}

#[derive(Args)]
pub struct VerifyArgs {
    /// TOML config file (for data_dir).
    #[arg(long, env = "STACYVM_CONFIG")]
    config: Option<PathBuf>,
    /// The database file (default `<data_dir>/stacyvm.db`).
    #[arg(long)]
    db: Option<PathBuf>,
    /// Ask the server at --server instead of reading the database.
    #[arg(long)]
    remote: bool,
    /// Print JSON.
    #[arg(long)]
    json: bool,
}

pub async fn run(cmd: AuditCmd, client: impl FnOnce() -> Result<Client>) -> Result<i32> {
    let AuditCmd::Verify(a) = cmd;
    let v: Value = if a.remote {
        client()?
            .json(Method::GET, "/api/v1/audit/verify", None)
            .await?
    } else {
        let db = match a.db {
            Some(p) => p,
            None => {
                let cfg = stacyvm_core::Config::load(a.config.as_deref(), std::env::vars())?;
                cfg.data_dir.join("stacyvm.db")
            }
        };
        if !db.exists() {
            anyhow::bail!("no database at {}", db.display());
        }
        let r = tokio::task::spawn_blocking(move || -> Result<_> {
            let s =
                Store::open_read_only(&db).with_context(|| format!("opening {}", db.display()))?;
            Ok(s.verify_audit()?)
        })
        .await??;
        let mut v = json!({"ok": r.ok, "records": r.records});
        if let Some(b) = r.first_bad {
            v["first_bad"] = json!(b);
        }
        if let Some(reason) = r.reason {
            v["reason"] = json!(reason);
        }
        v
    };
    let ok = v["ok"].as_bool().unwrap_or(false);
    if a.json {
        println!("{v}");
    } else if ok {
        println!("ok: {} records, the chain is intact", v["records"]);
    } else {
        println!(
            "TAMPERED: first bad record {} ({}), {} records",
            v["first_bad"],
            v["reason"].as_str().unwrap_or("chain broken"),
            v["records"]
        );
    }
    Ok(if ok { 0 } else { 1 })
}

/// Record an image pull/import done by the CLI in the data dir's audit log
/// (only when that database exists: the CLI never creates one).
pub fn record_cli_action(data_dir: &Path, action: &str, target: &str, ok: bool) {
    let db = data_dir.join("stacyvm.db");
    if !db.exists() {
        return;
    }
    let user = std::env::var("USER")
        .ok()
        .filter(|u| !u.is_empty())
        // SAFETY: geteuid has no preconditions and cannot fail.
        .unwrap_or_else(|| format!("uid{}", unsafe { libc::geteuid() }));
    let rec = NewAudit {
        at_ms: stacyvm_core::clock::now_ms(),
        actor: format!("cli:{user}"),
        action: action.to_string(),
        target: target.to_string(),
        outcome: if ok { "ok" } else { "error" }.to_string(),
        code: (!ok).then(|| "provider_error".to_string()),
        details: "{}".to_string(),
        ..NewAudit::default()
    };
    match Store::open(&db).and_then(|s| s.append_audit(&[rec])) {
        Ok(_) => {}
        Err(e) => eprintln!("stacyvm: could not record {action} in the audit log: {e}"),
    }
}
