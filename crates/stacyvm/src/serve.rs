//! `stacyvm serve`: load config, bring the engine up, reconcile, serve.

use anyhow::{Context, Result};
use axum::serve::ListenerExt;
use stacyvm_core::{setup, Config};
use std::future::IntoFuture;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
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
    tokio::spawn(Arc::clone(&engine).run_pools());

    let listener = tokio::net::TcpListener::bind(&listen)
        .await
        .with_context(|| format!("cannot listen on {listen}"))?;
    let addr = listener.local_addr()?;
    tracing::info!(%addr, version = env!("CARGO_PKG_VERSION"), default_provider = %engine.config().default_provider,
        auth = engine.config().api_key.is_some(), "StacyVM listening");
    let previews = stacyvm_api::Previews::new(engine.clone());
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let mut servers = tokio::task::JoinSet::new();
    // Client addresses are recorded in the audit log (and previews'
    // X-Forwarded-For).
    let app = stacyvm_api::app(engine.clone(), &previews)
        .into_make_service_with_connect_info::<SocketAddr>();
    servers.spawn(
        axum::serve(listener.tap_io(no_delay), app)
            .with_graceful_shutdown(stopped(stop_rx.clone()))
            .into_future(),
    );
    if let Some(plisten) = engine.config().preview_listen.clone() {
        let pl = tokio::net::TcpListener::bind(&plisten)
            .await
            .with_context(|| format!("cannot listen for previews on {plisten}"))?;
        tracing::info!(addr = %pl.local_addr()?, domain = %engine.config().preview_domain, "live previews listening");
        let svc = previews
            .router()
            .into_make_service_with_connect_info::<SocketAddr>();
        servers.spawn(
            axum::serve(pl.tap_io(no_delay), svc)
                .with_graceful_shutdown(stopped(stop_rx))
                .into_future(),
        );
    }
    tokio::select! {
        _ = shutdown_signal() => {}
        Some(r) = servers.join_next() => {
            r.context("server task failed")?.context("server error")?;
        }
    }
    // Let open requests finish, but do not wait on endless streams
    // (Server-Sent Events, exec streams) forever.
    let _ = stop_tx.send(true);
    let drain = async { while servers.join_next().await.is_some() {} };
    if tokio::time::timeout(SHUTDOWN_GRACE, drain).await.is_err() {
        tracing::warn!(
            "connections still open {}s after the stop signal; closing them",
            SHUTDOWN_GRACE.as_secs()
        );
        servers.abort_all();
    }
    engine.audit_flush().await;
    engine.shutdown().await;
    tracing::info!("server stopped; sandboxes keep running and are re-attached at the next start");
    Ok(())
}

/// Small writes (WebSocket frames, streamed events, proxied answers) go out
/// at once instead of waiting for the peer's delayed ACK.
fn no_delay(tcp: &mut tokio::net::TcpStream) {
    let _ = tcp.set_nodelay(true);
}

/// How long a stopping server waits for open connections.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

async fn stopped(mut rx: tokio::sync::watch::Receiver<bool>) {
    let _ = rx.wait_for(|stop| *stop).await;
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
