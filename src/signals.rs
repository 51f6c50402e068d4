//! The signals the server acts on: SIGTERM and SIGINT stop it ([`shutdown`]), SIGHUP reloads
//! its configuration and certificate ([`reload_on_hangup`]).

use crate::app::Live;
use crate::config::Config;
use crate::tls::ServerTls;
use std::sync::Arc;

/// Waits for SIGTERM or SIGINT.
pub async fn shutdown() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(e) => {
            tracing::error!(error = %e, "cannot listen for SIGTERM");
            return std::future::pending().await;
        }
    };
    tokio::select! {
        _ = term.recv() => tracing::info!("SIGTERM received; shutting down"),
        _ = tokio::signal::ctrl_c() => tracing::info!("SIGINT received; shutting down"),
    }
}

/// On each SIGHUP, `load`s the configuration again (the file, for the command) and applies it
/// to `live`, and re-reads the certificate `tls` serves; an invalid configuration or
/// certificate is refused and the running one stays. SIGHUP is taken over when this is
/// called (within the runtime), not when the returned future first runs.
pub fn reload_on_hangup(
    live: Arc<Live>,
    tls: Option<Arc<ServerTls>>,
    load: impl Fn() -> Result<Config, String>,
) -> impl std::future::Future<Output = ()> {
    use tokio::signal::unix::{signal, SignalKind};
    let hangups = signal(SignalKind::hangup());
    async move {
        let Ok(mut hangups) = hangups else {
            tracing::error!("cannot listen for SIGHUP; live reload is off");
            return;
        };
        reload_on_each(&mut hangups, &live, tls.as_deref(), load).await
    }
}

async fn reload_on_each(
    hangups: &mut tokio::signal::unix::Signal,
    live: &Live,
    tls: Option<&ServerTls>,
    load: impl Fn() -> Result<Config, String>,
) {
    while hangups.recv().await.is_some() {
        tracing::info!("SIGHUP received; reloading the configuration");
        let config = match load() {
            Ok(config) => config,
            Err(e) => {
                tracing::error!(error = %e, "configuration reload refused; the running configuration stays");
                continue;
            }
        };
        match (tls, &config.server.tls) {
            (Some(tls), Some(files)) => {
                if let Err(e) = tls.refresh(files) {
                    tracing::error!(error = %e, "new TLS certificate refused; the running one stays");
                }
            }
            (None, None) => {}
            _ => tracing::warn!("turning TLS on or off takes a restart"),
        }
        if let Err(e) = live.reload(config) {
            tracing::error!(error = %e, "configuration reload refused; the running configuration stays")
        }
    }
}
