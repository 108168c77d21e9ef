//! `WEBHOOK_URL`: the repository's or organization's webhook is created, or updated when one
//! already points at the URL, with the pool's secret: given, or generated once and kept in
//! the state directory (as the seed kept its own), so a restart keeps verifying deliveries.

use std::io::Write as _;
use std::os::unix::fs::OpenOptionsExt as _;
use std::path::Path;

use tokio_util::sync::CancellationToken;
use tracing::info;

use super::ControllerError;
use crate::config::{Scope, Secret};
use crate::github::{Budget, Github};

/// The pool's generated webhook secret: read from `<state_dir>/<pool>.webhook-secret`, or
/// made (32 random bytes, hex) and written there with mode 0600.
pub fn state_secret(state_dir: &Path, pool: &str) -> Result<Secret, ControllerError> {
    let path = state_dir.join(format!("{pool}.webhook-secret"));
    if let Ok(text) = std::fs::read_to_string(&path) {
        let t = text.trim();
        if !t.is_empty() {
            return Ok(Secret::new(t));
        }
    }
    let io = |source| ControllerError::State { path: path.clone(), source };
    std::fs::create_dir_all(state_dir).map_err(io)?;
    let mut bytes = [0u8; 32];
    getrandom::getrandom(&mut bytes).map_err(|e| io(std::io::Error::other(e.to_string())))?;
    let secret: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    let tmp = state_dir.join(format!(".{pool}.webhook-secret.tmp"));
    let mut f =
        std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp).map_err(io)?;
    f.write_all(secret.as_bytes()).and_then(|()| f.sync_all()).map_err(io)?;
    std::fs::rename(&tmp, &path).map_err(io)?;
    info!(path = %path.display(), "Generated the webhook secret.");
    Ok(Secret::new(secret))
}

/// Creates or updates the webhook for `workflow_job` events at `url` on `scope`; returns its
/// id (an organization's reconciliation reads its deliveries).
pub async fn ensure(
    github: &Github,
    scope: &Scope,
    url: &str,
    secret: &Secret,
    cancel: &CancellationToken,
) -> Result<u64, ControllerError> {
    let err = |source| ControllerError::Webhook { scope: scope.to_string(), source };
    let hooks = github.list_hooks(scope, Budget::attempts(5), cancel).await.map_err(err)?;
    let existing = hooks.iter().find(|h| h.config.url.as_deref() == Some(url)).map(|h| h.id);
    let config = serde_json::json!({
        "url": url,
        "content_type": "json",
        "insecure_ssl": "0",
        "secret": secret.expose(),
    });
    let body = serde_json::json!({"name": "web", "active": true, "events": ["workflow_job"], "config": config});
    match existing {
        Some(id) => {
            github.update_hook(scope, id, &body, Budget::attempts(5), cancel).await.map_err(err)?;
            info!(scope = %scope, hook_id = id, url, "Webhook updated.");
            Ok(id)
        }
        None => {
            let id = github.create_hook(scope, &body, Budget::attempts(5), cancel).await.map_err(err)?;
            info!(scope = %scope, hook_id = id, url, "Webhook created.");
            Ok(id)
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_generated_secret_is_kept_private_and_reused() {
        let dir = tempfile::tempdir().unwrap();
        let a = state_secret(dir.path(), "p").unwrap();
        assert_eq!(a.expose().len(), 64);
        let b = state_secret(dir.path(), "p").unwrap();
        assert_eq!(a, b);
        let mode = std::os::unix::fs::PermissionsExt::mode(
            &std::fs::metadata(dir.path().join("p.webhook-secret")).unwrap().permissions(),
        );
        assert_eq!(mode & 0o777, 0o600);
        assert_ne!(state_secret(dir.path(), "q").unwrap(), a);
    }
}
