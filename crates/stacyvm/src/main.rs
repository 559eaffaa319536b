//! `stacyvm`: the server (`serve`) and a command-line client for it.

mod audit_cmd;
mod bench;
mod certify;
mod client;
mod commands;
mod conformance;
mod doctor;
mod hostcheck;
mod image_cmd;
mod serve;
mod server_proc;

use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Parser)]
#[command(
    name = "stacyvm",
    version,
    about = "Self-hosted sandboxes for AI agents and developer tools"
)]
struct Cli {
    /// Server URL for client commands.
    #[arg(
        long,
        global = true,
        env = "STACYVM_URL",
        default_value = "http://127.0.0.1:7423"
    )]
    server: String,
    /// API key for client commands.
    #[arg(long, global = true, env = "STACYVM_API_KEY", hide_env_values = true)]
    api_key: Option<String>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Run the StacyVM server.
    Serve {
        /// TOML config file (environment variables STACYVM_* override it).
        #[arg(long, env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
    },
    /// Create a sandbox and print its id.
    Spawn(commands::SpawnArgs),
    /// Run a command in a sandbox; exits with the command's exit code.
    Exec(commands::ExecArgs),
    /// List sandboxes.
    Ls(commands::LsArgs),
    /// Destroy sandboxes.
    Rm {
        #[arg(required = true)]
        ids: Vec<String>,
    },
    /// Copy a file into or out of a sandbox: `cp ./a.py sb_x:/app/a.py`,
    /// `cp sb_x:/out.txt ./out.txt` (`-` is stdin/stdout).
    Cp { src: String, dst: String },
    /// Manage the local image store of the native provider (pull, import, ls, rm).
    Image {
        /// TOML config file (for data_dir / image_dir / insecure_registries).
        #[arg(long, env = "STACYVM_CONFIG")]
        config: Option<PathBuf>,
        /// Registries (host:port) reached over plain HTTP; loopback ones always are.
        #[arg(long = "insecure-registry", value_delimiter = ',')]
        insecure_registries: Vec<String>,
        #[command(subcommand)]
        cmd: image_cmd::ImageCmd,
    },
    /// Measure exec latency, create→first exec and file throughput against
    /// Docker's own CLI in the same run.
    Bench(bench::BenchArgs),
    /// Run the provider conformance suite against a private server and
    /// store the certification record; exits 0 when certified, 1 when a
    /// check failed, 2 on usage or configuration errors.
    Certify(certify::CertifyArgs),
    /// Check that this host can run sandboxes, and with which providers.
    Doctor(doctor::DoctorArgs),
    /// Configuration tools: `stacyvm config lint [--production]`.
    Config {
        #[command(subcommand)]
        cmd: doctor::ConfigCmd,
    },
    /// The audit log: `stacyvm audit verify` checks its hash chain.
    Audit {
        #[command(subcommand)]
        cmd: audit_cmd::AuditCmd,
    },
}

fn main() {
    // The native provider starts each sandbox through this binary; that
    // helper must run before any thread exists.
    if std::env::args_os()
        .nth(1)
        .is_some_and(|a| a == "__sandbox-init")
    {
        stacyvm_native::sandbox_init_main();
    }
    let cli = Cli::parse();
    let rt = match tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("stacyvm: cannot start the async runtime: {e}");
            std::process::exit(1);
        }
    };
    let code = rt.block_on(async move {
        let client = || client::Client::new(&cli.server, cli.api_key.clone());
        let res: anyhow::Result<i32> = async {
            match cli.command {
                Command::Serve { config } => serve::run(config).await.map(|_| 0),
                Command::Spawn(a) => commands::spawn(&client()?, a).await,
                Command::Exec(a) => commands::exec(&client()?, a).await,
                Command::Ls(a) => commands::ls(&client()?, a).await,
                Command::Rm { ids } => commands::rm(&client()?, ids).await,
                Command::Cp { src, dst } => commands::cp(&client()?, &src, &dst).await,
                Command::Image {
                    config,
                    mut insecure_registries,
                    cmd,
                } => {
                    let cfg = stacyvm_core::Config::load(config.as_deref(), std::env::vars())?;
                    insecure_registries.extend(cfg.insecure_registries.iter().cloned());
                    let audited = match &cmd {
                        image_cmd::ImageCmd::Pull { reference } => {
                            Some(("image.pull", reference.clone()))
                        }
                        image_cmd::ImageCmd::Import { name, .. } => {
                            Some(("image.import", name.clone()))
                        }
                        _ => None,
                    };
                    let r = image_cmd::run(cmd, cfg.image_dir(), insecure_registries).await;
                    if let Some((action, target)) = audited {
                        audit_cmd::record_cli_action(
                            &cfg.data_dir,
                            action,
                            &target,
                            matches!(r, Ok(0)),
                        );
                    }
                    r
                }
                Command::Audit { cmd } => audit_cmd::run(cmd, client).await,
                Command::Doctor(a) => doctor::doctor(a).await,
                Command::Config { cmd } => doctor::config_cmd(cmd),
                Command::Bench(a) => bench::run(a, cli.api_key.clone()).await,
                Command::Certify(a) => certify::run(a).await,
            }
        }
        .await;
        match res {
            Ok(code) => code,
            Err(e) => {
                eprintln!("stacyvm: {e:#}");
                1
            }
        }
    });
    std::process::exit(code);
}
