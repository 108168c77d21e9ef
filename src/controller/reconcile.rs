//! Reconciliation (issue #18): no queued job is left without a runner because its delivery
//! was missed. GitHub does not retry a failed delivery by itself, so a controller that was
//! down, restarting, or behind a flaky proxy for one `queued` event would never hear of that
//! job. At start and every `CONTROLLER_RECONCILE_SEC`, the queued jobs of the pool's
//! repository are listed through the REST API and the ones the pool serves are handed to it
//! exactly as a delivery would be: the pool's memory of job ids makes the two paths
//! idempotent (a job seen either way starts one runner).
//!
//! The cost is bounded: one pass makes 2 calls (the newest `queued` and `in_progress` runs,
//! one page each; a run with a job running and another queued is `in_progress`) plus one per
//! run listed, at most [`MAX_RUNS`]; an idle repository costs 2 calls a pass (120 an hour at
//! the default 60 s). Runs held for approval (`waiting`) are not listed: their jobs take no
//! runner until released.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use super::service::Command;
use super::webhook::RunnerLabels;
use crate::config::Scope;
use crate::error::chain;
use crate::github::{Budget, Github, GithubError, ListedJob};

/// The most runs whose jobs one pass lists (the newest first).
pub const MAX_RUNS: usize = 20;

/// The run statuses listed: a run is `queued` until a job starts, then `in_progress` while
/// any other job may still be queued.
const RUN_STATUSES: [&str; 2] = ["queued", "in_progress"];

/// Counted for `/metrics`.
#[derive(Debug, Default)]
pub struct Counters {
    pub passes: AtomicU64,
    pub failures: AtomicU64,
    pub api_calls: AtomicU64,
    /// Jobs a pass found that no delivery had brought.
    pub found: AtomicU64,
}

/// The queued jobs of a listing that the pool's runners can take.
pub fn wanted(jobs: &[ListedJob], labels: &RunnerLabels) -> Vec<u64> {
    jobs.iter().filter(|j| j.status == "queued" && labels.serves(&j.labels)).map(|j| j.id).collect()
}

/// Whether reconciliation can list `scope`'s jobs: the REST API lists workflow runs per
/// repository only (an organization's would cost a call per repository).
pub fn supported(scope: &Scope) -> bool {
    matches!(scope, Scope::Repository { .. })
}

/// Runs a pass now and then every `period` until `cancel`.
pub async fn run(
    github: Github,
    scope: Scope,
    labels: RunnerLabels,
    period: Duration,
    tx: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    loop {
        counters.passes.fetch_add(1, Ordering::Relaxed);
        match pass(&github, &scope, &labels, &counters, &cancel).await {
            Ok(jobs) => {
                debug!(jobs = jobs.len(), "Reconciled the queued jobs.");
                if !jobs.is_empty() && tx.send(Command::Reconciled { jobs }).is_err() {
                    return;
                }
            }
            Err(GithubError::Cancelled { .. }) => return,
            Err(e) => {
                counters.failures.fetch_add(1, Ordering::Relaxed);
                warn!(error = %chain(&e), "Failed to list the queued jobs; trying again at the next reconcile.");
            }
        }
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(period) => {}
        }
    }
}

/// One pass: the queued jobs the pool serves, oldest run first.
async fn pass(
    github: &Github,
    scope: &Scope,
    labels: &RunnerLabels,
    counters: &Counters,
    cancel: &CancellationToken,
) -> Result<Vec<u64>, GithubError> {
    let mut runs: Vec<u64> = Vec::new();
    for status in RUN_STATUSES {
        counters.api_calls.fetch_add(1, Ordering::Relaxed);
        for id in github.list_runs(scope, status, MAX_RUNS, Budget::attempts(2), cancel).await? {
            if !runs.contains(&id) {
                runs.push(id);
            }
        }
    }
    // The oldest first: the jobs that have waited longest get runners first.
    runs.sort_unstable();
    runs.truncate(MAX_RUNS);
    let mut jobs = Vec::new();
    for run_id in runs {
        counters.api_calls.fetch_add(1, Ordering::Relaxed);
        match github.list_run_jobs(scope, run_id, Budget::attempts(2), cancel).await {
            Ok(listed) => jobs.extend(wanted(&listed, labels)),
            // Deleted since it was listed.
            Err(GithubError::NotFound { .. }) => {}
            Err(e) => return Err(e),
        }
    }
    Ok(jobs)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn job(id: u64, status: &str, labels: &[&str]) -> ListedJob {
        ListedJob { id, status: status.into(), labels: labels.iter().map(|l| l.to_string()).collect() }
    }

    #[test]
    fn only_queued_jobs_the_pool_serves_are_wanted() {
        let labels = RunnerLabels::new(&["gpu".to_string()], "X64");
        let listed = [
            job(1, "queued", &["self-hosted", "gpu"]),
            job(2, "in_progress", &["gpu"]),
            job(3, "completed", &["gpu"]),
            job(4, "waiting", &["gpu"]),
            job(5, "queued", &["ubuntu-latest"]),
            job(6, "queued", &["GPU"]),
        ];
        assert_eq!(wanted(&listed, &labels), [1, 6]);
    }

    #[test]
    fn repositories_are_reconciled_and_organizations_are_not() {
        assert!(supported(&Scope::Repository { owner: "o".into(), repo: "r".into() }));
        assert!(!supported(&Scope::Organization("o".into())));
    }
}
