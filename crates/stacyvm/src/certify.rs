//! `stacyvm certify --provider NAME`: does this provider, on this host, do
//! everything StacyVM promises?
//!
//! Runs the host checks of the provider, then the provider conformance
//! suite ([`crate::conformance`]) against a fresh private server (this
//! binary, `serve`) that runs only that provider, with the configured
//! provider settings and image store and a temporary data directory under
//! `/tmp`. Writes a report (text, JSON or Markdown) and stores a
//! [`Certification`] record in the configured data directory.
//!
//! Exit codes: 0 certified, 1 some check failed, 2 usage or configuration
//! error.

use crate::conformance::{self, Outcome, Status, SuiteOptions, SuiteResult};
use crate::hostcheck::{self, CheckResult};
use crate::server_proc::{provider_env, OwnServer, ServerOptions};
use anyhow::{Context, Result};
use clap::{Args, ValueEnum};
use serde::Serialize;
use stacyvm_core::certification::{Certification, HostClass};
use stacyvm_core::config::PROVIDER_NAMES;
use stacyvm_core::{clock, Config};
use std::fmt::Write as _;
use std::path::PathBuf;
use std::time::{Duration, Instant};

#[derive(Clone, Copy, ValueEnum, Default, PartialEq, Eq)]
pub enum Format {
    /// Aligned, for a terminal.
    #[default]
    Text,
    Json,
    /// Markdown tables, to paste into documentation.
    Md,
}

#[derive(Args)]
pub struct CertifyArgs {
    /// The provider to certify (native, docker, proot, custom, mock).
    #[arg(long)]
    provider: String,
    #[arg(long, value_enum, default_value_t)]
    format: Format,
    /// Write the report to FILE instead of standard output.
    #[arg(long, value_name = "FILE")]
    out: Option<PathBuf>,
    /// Image of the test sandboxes (needs /bin/sh and python3); default:
    /// the configured `default_image`.
    #[arg(long)]
    image: Option<String>,
    /// TOML config file (environment variables STACYVM_* override it).
    #[arg(long, env = "STACYVM_CONFIG")]
    config: Option<PathBuf>,
}

/// Processes per sandbox in the private server: low enough that the
/// fork-limit check stays quick.
const SUITE_PIDS_LIMIT: u64 = 256;

#[derive(Serialize)]
struct Totals {
    passed: u32,
    failed: u32,
    skipped: u32,
    host_failed: u32,
    host_warned: u32,
}

/// The whole report, as `--format json` writes it.
#[derive(Serialize)]
struct Report {
    provider: String,
    /// No conformance check and no host check failed.
    passed: bool,
    ran_at: String,
    duration_ms: u64,
    stacyvm_version: String,
    image: String,
    host: HostClass,
    /// As the provider reports it.
    isolation: String,
    capabilities: Vec<String>,
    host_checks: Vec<CheckResult>,
    checks: Vec<Outcome>,
    totals: Totals,
    /// Where the certification record was stored.
    record: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    record_error: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    server_log_tail: Option<String>,
}

fn usage_error(msg: impl std::fmt::Display) -> Result<i32> {
    eprintln!("stacyvm certify: {msg}");
    Ok(2)
}

fn host_status(c: &CheckResult) -> String {
    serde_json::to_value(c.status)
        .ok()
        .and_then(|v| v.as_str().map(str::to_string))
        .unwrap_or_default()
}

pub async fn run(a: CertifyArgs) -> Result<i32> {
    let started = Instant::now();
    let cfg = match Config::load(a.config.as_deref(), std::env::vars()) {
        Ok(c) => c,
        Err(e) => return usage_error(format!("configuration: {e}")),
    };
    let provider = a.provider.trim().to_string();
    if !PROVIDER_NAMES.contains(&provider.as_str()) {
        return usage_error(format!(
            "unknown provider {provider:?}; known providers: {}",
            PROVIDER_NAMES.join(", ")
        ));
    }
    if let Some(out) = &a.out {
        let parent = out
            .parent()
            .filter(|p| !p.as_os_str().is_empty())
            .unwrap_or(std::path::Path::new("."));
        if !parent.is_dir() || out.is_dir() {
            return usage_error(format!(
                "--out {}: not a file in an existing directory",
                out.display()
            ));
        }
    }
    let image = a.image.clone().unwrap_or_else(|| cfg.default_image.clone());
    if image.trim().is_empty() {
        return usage_error("--image must not be empty");
    }

    // The private server: only this provider, as configured.
    let data_dir = std::env::temp_dir().join(format!("svc-{}", std::process::id()));
    let mut env = provider_env(&cfg, &provider);
    env.push(("STACYVM_DEFAULT_IMAGE".into(), image.clone()));
    env.push(("STACYVM_PIDS_LIMIT".into(), SUITE_PIDS_LIMIT.to_string()));
    env.push(("STACYVM_MAX_SANDBOXES".into(), "50".into()));
    let mut probe = env.clone();
    probe.push(("STACYVM_LISTEN".into(), "127.0.0.1:1".into()));
    probe.push((
        "STACYVM_DATA_DIR".into(),
        data_dir.to_string_lossy().into_owned(),
    ));
    if let Err(e) = Config::load(None, probe) {
        return usage_error(format!("provider {provider} is not configured: {e}"));
    }

    eprintln!("certifying provider {provider} (image {image})");
    let host = HostClass::detect();
    let host_checks = hostcheck::for_provider(&cfg, &provider).await;
    for h in &host_checks {
        eprintln!("  {:<4} {:<34}          {}", host_status(h), h.id, h.detail);
    }

    let _ = std::fs::remove_dir_all(&data_dir);
    let opts = ServerOptions {
        env,
        inherit_stacyvm_env: false,
        ready_timeout: Duration::from_secs(60),
        ..ServerOptions::new(data_dir.clone())
    };
    let t = Instant::now();
    let suite = match OwnServer::start(opts).await {
        Ok(server) => {
            conformance::run(
                server,
                SuiteOptions {
                    provider: provider.clone(),
                    image: image.clone(),
                    docker_socket: cfg.docker.socket.clone(),
                    pids_limit: SUITE_PIDS_LIMIT,
                    progress: true,
                },
            )
            .await
        }
        Err(e) => SuiteResult {
            checks: vec![Outcome {
                id: "server.start".into(),
                group: "server".into(),
                status: Status::Fail,
                detail: format!("{e:#}"),
                duration: t.elapsed(),
            }],
            ..SuiteResult::default()
        },
    };
    let _ = std::fs::remove_dir_all(&data_dir);

    let count = |s: Status| suite.checks.iter().filter(|c| c.status == s).count() as u32;
    let host_count = |s: &str| host_checks.iter().filter(|c| host_status(c) == s).count() as u32;
    let totals = Totals {
        passed: count(Status::Pass),
        failed: count(Status::Fail),
        skipped: count(Status::Skip),
        host_failed: host_count("fail"),
        host_warned: host_count("warn"),
    };
    let passed = totals.failed == 0 && totals.host_failed == 0;
    let ran_at = clock::rfc3339_ms(clock::now_ms());
    let record = Certification {
        provider: provider.clone(),
        passed,
        ran_at: ran_at.clone(),
        host: host.clone(),
        stacyvm_version: env!("CARGO_PKG_VERSION").to_string(),
        checks_passed: totals.passed,
        checks_failed: totals.failed,
        checks_skipped: totals.skipped,
    };
    let (record_path, record_error) = match record.save(&cfg.data_dir) {
        Ok(p) => (Some(p.to_string_lossy().into_owned()), None),
        Err(e) => (None, Some(e.to_string())),
    };
    let report = Report {
        provider,
        passed,
        ran_at,
        duration_ms: started.elapsed().as_millis() as u64,
        stacyvm_version: env!("CARGO_PKG_VERSION").to_string(),
        image,
        host,
        isolation: suite.isolation,
        capabilities: suite.capabilities,
        host_checks,
        checks: suite.checks,
        totals,
        record: record_path,
        record_error,
        server_log_tail: suite.server_log_tail,
    };
    let text = match a.format {
        Format::Json => serde_json::to_string_pretty(&report)? + "\n",
        Format::Text => render_text(&report),
        Format::Md => render_md(&report),
    };
    match &a.out {
        Some(path) => {
            std::fs::write(path, &text)
                .with_context(|| format!("writing the report to {}", path.display()))?;
            eprintln!("{}", summary_line(&report));
            eprintln!("report written to {}", path.display());
        }
        None => print!("{text}"),
    }
    if let Some(e) = &report.record_error {
        eprintln!("stacyvm certify: cannot store the certification record: {e}");
        return Ok(1);
    }
    Ok(if report.passed { 0 } else { 1 })
}

fn verdict(r: &Report) -> &'static str {
    if r.passed {
        "CERTIFIED"
    } else {
        "NOT CERTIFIED"
    }
}

fn summary_line(r: &Report) -> String {
    format!(
        "{}: {} passed, {} failed, {} skipped; host checks: {} failed, {} warnings — {}",
        r.provider,
        r.totals.passed,
        r.totals.failed,
        r.totals.skipped,
        r.totals.host_failed,
        r.totals.host_warned,
        verdict(r)
    )
}

fn host_line(r: &Report) -> String {
    let h = &r.host;
    format!(
        "{}, kernel {}, cgroup {}, {}, {} × {}",
        h.distro,
        h.kernel_release,
        h.cgroup_version.as_str(),
        h.arch,
        h.cpu_count,
        h.cpu_model
    )
}

fn secs(d: Duration) -> String {
    format!("{:.2}s", d.as_secs_f64())
}

fn render_text(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "StacyVM provider certification: {} — {}",
        r.provider,
        verdict(r)
    );
    let _ = writeln!(
        s,
        "  stacyvm {}, image {}, {}, took {:.1}s",
        r.stacyvm_version,
        r.image,
        r.ran_at,
        r.duration_ms as f64 / 1000.0
    );
    let _ = writeln!(s);
    let _ = writeln!(s, "host          {}", host_line(r));
    let _ = writeln!(
        s,
        "isolation     {}",
        if r.isolation.is_empty() {
            "(unknown)"
        } else {
            &r.isolation
        }
    );
    let _ = writeln!(s, "capabilities  {}", r.capabilities.join(", "));
    if !r.host_checks.is_empty() {
        let w = r.host_checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
        let _ = writeln!(s, "\nhost checks");
        for c in &r.host_checks {
            let _ = writeln!(
                s,
                "  {:<4}  {:<w$}  {}",
                host_status(c).to_uppercase(),
                c.id,
                c.detail
            );
        }
    }
    let w = r.checks.iter().map(|c| c.id.len()).max().unwrap_or(0);
    let _ = writeln!(s, "\nchecks");
    for c in &r.checks {
        let _ = writeln!(
            s,
            "  {:<4}  {:<w$}  {:>7}  {}",
            c.status.as_str().to_uppercase(),
            c.id,
            secs(c.duration),
            c.detail
        );
    }
    let _ = writeln!(s, "\n{}", summary_line(r));
    if let Some(p) = &r.record {
        let _ = writeln!(s, "record: {p}");
    }
    if let Some(e) = &r.record_error {
        let _ = writeln!(s, "record NOT stored: {e}");
    }
    if let Some(tail) = &r.server_log_tail {
        if !tail.trim().is_empty() {
            let _ = writeln!(s, "\nserver log (last lines):\n{tail}");
        }
    }
    s
}

/// A Markdown table cell: no line breaks, `|` escaped.
fn cell(s: &str) -> String {
    s.replace('\\', "\\\\")
        .replace('|', "\\|")
        .replace(['\n', '\r'], " ")
}

fn render_md(r: &Report) -> String {
    let mut s = String::new();
    let _ = writeln!(
        s,
        "### StacyVM certification: `{}` — {}\n",
        r.provider,
        if r.passed {
            "certified"
        } else {
            "**not certified**"
        }
    );
    let _ = writeln!(s, "| | |\n|---|---|");
    let _ = writeln!(s, "| Host | {} |", cell(&host_line(r)));
    let _ = writeln!(s, "| StacyVM | {} |", cell(&r.stacyvm_version));
    let _ = writeln!(s, "| Image | `{}` |", cell(&r.image));
    let _ = writeln!(s, "| Isolation | {} |", cell(&r.isolation));
    let caps: Vec<String> = r
        .capabilities
        .iter()
        .map(|c| format!("`{}`", cell(c)))
        .collect();
    let _ = writeln!(s, "| Capabilities | {} |", caps.join(", "));
    let _ = writeln!(
        s,
        "| Ran at | {} ({:.1} s) |",
        r.ran_at,
        r.duration_ms as f64 / 1000.0
    );
    let _ = writeln!(
        s,
        "| Result | {} passed, {} failed, {} skipped |",
        r.totals.passed, r.totals.failed, r.totals.skipped
    );
    if !r.host_checks.is_empty() {
        let _ = writeln!(s, "\n| Host check | Result | Detail |\n|---|---|---|");
        for c in &r.host_checks {
            let st = host_status(c);
            let st = if st == "fail" { "**fail**".into() } else { st };
            let _ = writeln!(s, "| `{}` | {} | {} |", cell(&c.id), st, cell(&c.detail));
        }
    }
    let _ = writeln!(
        s,
        "\n| Check | Group | Result | Time | Detail |\n|---|---|---|---:|---|"
    );
    for c in &r.checks {
        let st = match c.status {
            Status::Fail => "**fail**",
            other => other.as_str(),
        };
        let _ = writeln!(
            s,
            "| `{}` | {} | {} | {} | {} |",
            cell(&c.id),
            cell(&c.group),
            st,
            secs(c.duration),
            cell(&c.detail)
        );
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use stacyvm_core::certification::CgroupVersion;

    fn report(passed: bool) -> Report {
        Report {
            provider: "native".into(),
            passed,
            ran_at: "2026-05-10T10:00:00Z".into(),
            duration_ms: 12_345,
            stacyvm_version: "0.1.0".into(),
            image: "img:1".into(),
            host: HostClass {
                kernel_release: "6.1.0".into(),
                distro: "Debian GNU/Linux 12 (bookworm)".into(),
                cgroup_version: CgroupVersion::V2,
                cpu_model: "Some CPU".into(),
                cpu_count: 2,
                arch: "x86_64".into(),
            },
            isolation: "namespaces".into(),
            capabilities: vec!["exec".into(), "files".into()],
            host_checks: Vec::new(),
            checks: vec![
                Outcome {
                    id: "exec.stdin".into(),
                    group: "exec".into(),
                    status: Status::Pass,
                    detail: "ok".into(),
                    duration: Duration::from_millis(10),
                },
                Outcome {
                    id: "files.list".into(),
                    group: "files".into(),
                    status: if passed { Status::Skip } else { Status::Fail },
                    detail: "a | b\nc".into(),
                    duration: Duration::from_millis(2500),
                },
            ],
            totals: Totals {
                passed: 1,
                failed: u32::from(!passed),
                skipped: u32::from(passed),
                host_failed: 0,
                host_warned: 0,
            },
            record: Some("/d/certifications/native.json".into()),
            record_error: None,
            server_log_tail: None,
        }
    }

    #[test]
    fn markdown_rows_are_one_line_with_escaped_pipes() {
        let md = render_md(&report(false));
        assert!(md.starts_with("### StacyVM certification: `native` — **not certified**"));
        assert!(
            md.contains("| `files.list` | files | **fail** | 2.50s | a \\| b c |"),
            "{md}"
        );
        assert!(md.contains("| Capabilities | `exec`, `files` |"), "{md}");
    }

    #[test]
    fn text_is_aligned_and_has_a_verdict() {
        let t = render_text(&report(true));
        assert!(
            t.starts_with("StacyVM provider certification: native — CERTIFIED"),
            "{t}"
        );
        assert!(t.contains("  PASS  exec.stdin    0.01s  ok\n"), "{t}");
        assert!(t.contains("  SKIP  files.list    2.50s  "), "{t}");
        assert!(t.contains("record: /d/certifications/native.json"), "{t}");
        let j = serde_json::to_value(report(true)).unwrap();
        assert_eq!(j["checks"][1]["duration_ms"], 2500);
        assert_eq!(j["host"]["cgroup_version"], "v2");
        assert!(j.get("record_error").is_none());
    }
}
