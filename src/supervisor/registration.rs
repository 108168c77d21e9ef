//! Removing a registration from GitHub: the drain's final step, the error paths, the panic path.

use std::time::Duration;

use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info};

use crate::config::{Config, Scope};
use crate::error::chain;
use crate::github::{backoff, Auth, Budget, Deleted, Github, GithubError};
use crate::metrics;
use crate::runner;

use super::{Registered, RegistrationSlot};

/// De-registration may run this long past the drain deadline.
pub const DEREGISTER_GRACE: Duration = Duration::from_secs(20);
/// One request of the final de-registration: short enough that a hung one leaves time for a
/// second attempt (and the client's backoff, at most 1.25 s after the first) within
/// [`DEREGISTER_GRACE`].
pub(super) const DEREGISTER_REQUEST_TIMEOUT: Duration = Duration::from_secs(9);
const _: () = assert!(2 * DEREGISTER_REQUEST_TIMEOUT.as_millis() + 1250 < DEREGISTER_GRACE.as_millis());

/// The final de-registration's budget: [`DEREGISTER_GRACE`], at least two attempts.
pub(super) fn final_budget() -> Budget {
    Budget::until(Instant::now() + DEREGISTER_GRACE).per_request(DEREGISTER_REQUEST_TIMEOUT)
}

/// Deletes `reg` from GitHub (found by name when its id is unknown); a busy answer is retried
/// within the budget, since the API's busy flag lags the runner by up to a minute.
pub(super) async fn remove_registration(
    gh: &Github,
    scope: &Scope,
    reg: &Registered,
    budget: Budget,
    cancel: &CancellationToken,
) -> Result<(), GithubError> {
    let id = match reg.id {
        Some(id) => id,
        None => match gh.find_runner(scope, &reg.name, budget, cancel).await {
            Ok(Some(r)) => r.id,
            Ok(None) => return Ok(()),
            Err(e) => {
                metrics::global().deregistration_failed();
                return Err(e);
            }
        },
    };
    let mut attempt = 0;
    loop {
        match delete_registration(gh, scope, id, budget, cancel).await {
            Ok(Deleted::Removed) => {
                info!(runner = %reg.name, runner_id = id, "Runner de-registered.");
                return Ok(());
            }
            Ok(Deleted::AlreadyGone) => {
                info!(runner = %reg.name, runner_id = id, "Runner was already gone from GitHub.");
                return Ok(());
            }
            Err(GithubError::Busy { .. }) => {
                let wait = backoff(attempt, 0.0).min(Duration::from_secs(5));
                attempt += 1;
                if budget.deadline.is_some_and(|d| Instant::now() + wait > d) || attempt >= budget.max_attempts {
                    return Err(GithubError::Busy { id });
                }
                info!(runner_id = id, "GitHub still reports the runner busy; retrying.");
                tokio::time::sleep(wait).await;
            }
            Err(e) => return Err(e),
        }
    }
}

/// `DELETE` of a runner's registration; every failure (a busy 422 included, whether the caller
/// retries it or not) counts in `ci_runner_deregistration_failures_total`.
pub(super) async fn delete_registration(
    gh: &Github,
    scope: &Scope,
    id: u64,
    budget: Budget,
    cancel: &CancellationToken,
) -> Result<Deleted, GithubError> {
    let result = gh.delete_runner(scope, id, budget, cancel).await;
    if result.is_err() {
        metrics::global().deregistration_failed();
    }
    result
}

/// After a panic: remove whatever registration the slot holds, best effort, briefly.
pub async fn emergency_deregister(cfg: &Config, slot: &RegistrationSlot) {
    let Some(reg) = slot.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return };
    let Some(auth) = Auth::for_config(cfg) else { return };
    let Ok(gh) = Github::new(&cfg.api_url, auth) else { return };
    let budget = final_budget();
    if let Err(e) = remove_registration(&gh, &cfg.scope, &reg, budget, &CancellationToken::new()).await {
        error!(error = %chain(&e), "Failed to de-register the runner.");
    }
    runner::remove_local_files(&cfg.runner_dir);
}
