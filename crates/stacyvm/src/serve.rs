//! `stacyvm serve`: load config, bring the engine up, reconcile, serve.

use anyhow::{Context, Result};
use stacyvm_core::{setup, Config};
use std::path::PathBuf;
use std::sync::Arc;
use tokio::signal::unix::{signal, SignalKind};

fn init_logging(format: &str) {
    let filter = tracing_subscriber::EnvFilter::try_from_env("STACYVM_LOG")
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info"));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_target(false);
    if format == "json" {
        // Without the json feature this keeps one event per line.
        let _ = builder.with_ansi(false).try_init();
    } else {
        let _ = builder.try_init();
    }
}

pub async fn run(config: Option<PathBuf>) -> Result<()> {
    let cfg = Config::load(config.as_deref(), std::env::vars()).context("configuration")?;
    init_logging(&cfg.log_format);
    let listen = cfg.listen.clone();
    let engine = setup::build_engine(cfg)
        .await
        .map_err(|e| anyhow::anyhow!(e.message))?;

    engine.check_providers().await;
    engine
        .reconcile()
        .await
        .map_err(|e| anyhow::anyhow!("reconciliation failed: {}", e.message))?;
    tokio::spawn(Arc::clone(&engine).run_reaper());
    tokio::spawn(Arc::clone(&engine).run_health_checks());

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), default_provider = %engine.config().default_provider,
        auth = engine.config().api_key.is_some(), "StacyVM listening");
    let app = stacyvm_api::router(engine.clone());
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown_signal())
        .await
        .context("server error")?;
    engine.shutdown().await;
    tracing::info!("server stopped; sandboxes keep running and are re-attached at the next start");
    Ok(())
}

async fn shutdown_signal() {
    let (Ok(mut term), Ok(mut int)) = (
        signal(SignalKind::terminate()),
        signal(SignalKind::interrupt()),
    ) else {
        std::future::pending::<()>().await;
        return;
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM: shutting down"),
        _ = int.recv() => tracing::info!("SIGINT: shutting down"),
    }
}
