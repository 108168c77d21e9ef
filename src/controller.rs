//! `ci-runner controller` (issue #9): a webhook autoscaler on one Docker host. Each
//! `workflow_job` `queued` delivery a pool serves gets an ephemeral runner container of the
//! pool's image with a JIT configuration the controller mints (no PAT or App key ever enters
//! a runner container); beyond the pool's maximum jobs wait; the container that ran a job is
//! removed once it has exited; a reconcile loop adopts, cleans up and keeps warm runners.
//!
//! - [`webhook`]: signatures, payloads, label matching (pure).
//! - [`pool`]: a pool's decisions as a state machine (pure).
//! - [`engine`]: the Docker engine's API on its socket.
//! - [`reconcile`]: missed deliveries made good: a repository's queued jobs listed through the
//!   REST API, an organization's failed webhook deliveries redelivered.
//! - [`service`]: the pools' tasks carrying the decisions out.
//! - [`server`]: `POST /webhook`, `POST /webhook/{id}`, `/health`, `/metrics`.
//! - [`hook`]: `WEBHOOK_URL`: the webhook created or updated, its secret kept.

pub mod engine;
pub mod hook;
pub mod pool;
pub mod reconcile;
pub mod server;
pub mod service;
pub mod webhook;

use std::net::SocketAddr;
use std::path::PathBuf;

use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use crate::config::ControllerConfig;

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("reach the Docker engine")]
    Engine(#[from] engine::EngineError),
    #[error("serve HTTP on {addr}")]
    Listen {
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("build the GitHub client")]
    Http {
        #[source]
        source: reqwest::Error,
    },
    #[error("keep the webhook secret in {path}")]
    State {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("create or update the webhook of the {scope}")]
    Webhook {
        scope: String,
        #[source]
        source: crate::github::GithubError,
    },
}

/// Runs until `cancel`: the pools' tasks, then the HTTP server. Runner containers are left
/// running at the end; the next start adopts them by their labels.
pub async fn run(cfg: ControllerConfig, cancel: CancellationToken) -> Result<(), ControllerError> {
    let engine = engine::Engine::connect(&cfg.docker_socket, &cfg.name)?.negotiate(&cfg.docker_socket).await?;
    let engine_arch = engine.architecture().await?;
    let arch = match webhook::arch_label(&engine_arch) {
        Ok(label) => label.to_string(),
        Err(label) => {
            warn!(engine_arch = %engine_arch, label = %label, "The Docker engine's architecture has no GitHub label of its own; runners register with its name.");
            label
        }
    };
    info!(engine_arch = %engine_arch, label = %arch, "Runners register with the engine host's architecture.");
    let tracker = TaskTracker::new();
    let pools = service::start_pools(&cfg, &engine, &arch, &tracker, &cancel).await?;
    let (bound, server) = server::serve(cfg.addr, pools, cfg.max_body, cancel.clone())
        .instrument(tracing::info_span!("server"))
        .await
        .map_err(|source| ControllerError::Listen { addr: cfg.addr, source })?;
    info!(addr = %bound, "Serving POST /webhook, POST /webhook/{{id}}, /health and /metrics.");
    cancel.cancelled().await;
    tracker.close();
    let _ = server.await;
    let _ = tokio::time::timeout(std::time::Duration::from_secs(10), tracker.wait()).await;
    info!("Controller stopped.");
    Ok(())
}
