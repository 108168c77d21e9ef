//! Reconciliation (issue #18): no queued job is left without a runner because its delivery
//! was missed. GitHub does not retry a failed delivery by itself, so a controller that was
//! down, restarting, or behind a flaky proxy for one `queued` event would never hear of that
//! job. At start and every `CONTROLLER_RECONCILE_SEC` a pass looks for such jobs:
//!
//! - **A repository's pool**: the queued jobs of the repository are listed through the REST
//!   API and the ones the pool serves are handed to it exactly as a delivery would be: the
//!   pool's memory of job ids makes the two paths idempotent (a job seen either way starts one
//!   runner). One pass makes 2 calls (the newest `queued` and `in_progress` runs, one page
//!   each; a run with a job running and another queued is `in_progress`) plus one per run
//!   listed, at most [`MAX_RUNS`]; an idle repository costs 2 calls a pass (120 an hour at
//!   the default 60 s). Runs held for approval (`waiting`) are not listed: their jobs take no
//!   runner until released.
//! - **An organization's pool**: listing an organization's runs would cost a call per
//!   repository, so its webhook's deliveries are read instead (GitHub's own advice for
//!   missed deliveries, docs.github.com "Handling failed webhook deliveries"): the newest
//!   deliveries back to a little before the previous pass's newest (at most
//!   [`MAX_DELIVERY_PAGES`] pages of 100), and each `workflow_job` `queued` event whose every
//!   delivery failed (a `status` other than `OK`) is redelivered: the event then takes the
//!   webhook path, as idempotent as the first delivery would have been. Before that, the
//!   failed delivery's payload is read (the listing carries no job id) and the job's status
//!   asked for: a job another runner took, cancelled, or not for this pool is not redelivered
//!   (a runner started for it would idle). An idle organization costs 1 call a pass (60 an
//!   hour); each missed job 3 more; at most [`MAX_REDELIVERIES`] jobs a pass. Enterprises
//!   have no webhook deliveries API (and the controller serves none).

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::service::Command;
use super::webhook::{self, Delivery, JobAction, RunnerLabels};
use crate::config::Scope;
use crate::error::chain;
use crate::github::{Budget, DeliveryItem, Github, GithubError, ListedJob};

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
    /// Jobs a pass found that no delivery had brought (an organization's: redelivered).
    pub found: AtomicU64,
    /// Failed deliveries asked to be sent again (organization pools).
    pub redeliveries: AtomicU64,
}

/// How a pool's missed jobs are found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Source {
    /// The repository's queued runs and their jobs.
    Runs,
    /// The failed deliveries of the webhook with this id, redelivered.
    Deliveries { hook_id: u64 },
}

/// The queued jobs of a listing that the pool's runners can take.
pub fn wanted(jobs: &[ListedJob], labels: &RunnerLabels) -> Vec<u64> {
    jobs.iter().filter(|j| j.status == "queued" && labels.serves(&j.labels)).map(|j| j.id).collect()
}

/// How reconciliation finds `scope`'s missed jobs: the REST API lists workflow runs per
/// repository only (an organization's would cost a call per repository), so an
/// organization's pool reads its webhook's deliveries, and needs the webhook's id.
pub fn source(scope: &Scope, hook_id: Option<u64>) -> Option<Source> {
    match (scope, hook_id) {
        (Scope::Repository { .. }, _) => Some(Source::Runs),
        (Scope::Organization(_), Some(hook_id)) => Some(Source::Deliveries { hook_id }),
        _ => None,
    }
}

/// Runs a pass now and then every `period` until `cancel`.
#[expect(clippy::too_many_arguments, reason = "one task's whole context, passed once at its spawn")]
pub async fn run(
    github: Github,
    scope: Scope,
    source: Source,
    labels: RunnerLabels,
    period: Duration,
    tx: mpsc::UnboundedSender<Command>,
    counters: Arc<Counters>,
    cancel: CancellationToken,
) {
    let mut seen = Redeliveries::default();
    loop {
        counters.passes.fetch_add(1, Ordering::Relaxed);
        let result = match source {
            Source::Runs => pass(&github, &scope, &labels, &counters, &cancel).await,
            Source::Deliveries { hook_id } => {
                redelivery_pass(&github, &scope, hook_id, &labels, &mut seen, &counters, &cancel).await.map(|n| {
                    debug!(redelivered = n, "Reconciled the webhook's failed deliveries.");
                    Vec::new()
                })
            }
        };
        match result {
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

/// The most pages of deliveries (100 each) one pass reads.
pub const MAX_DELIVERY_PAGES: usize = 3;
/// The most failed `queued` events one pass looks into and redelivers (3 calls each).
pub const MAX_REDELIVERIES: usize = 10;
/// How often one event is redelivered while its redeliveries fail too (the controller still
/// unreachable); the next passes try again only once the previous attempt is listed.
pub const MAX_ATTEMPTS: u32 = 3;
/// A pass reads back this far before the newest delivery the previous pass saw: a delivery
/// is listed once attempted, up to GitHub's 10 s timeout after a later one is.
pub const OVERLAP_SEC: i64 = 300;
/// The first pass reads back this far from GitHub's clock: GitHub cancels a job that has
/// been queued for 24 hours, so an older `queued` event names no job left to run.
pub const FIRST_LOOKBACK_SEC: i64 = 24 * 3600;
/// Events remembered as settled or redelivered.
const REMEMBERED: usize = 10_000;

/// What the passes remember of the deliveries they read (pure: unit-tested apart from I/O).
#[derive(Debug, Default)]
pub struct Redeliveries {
    /// The newest `delivered_at` seen, as epoch seconds (GitHub's clock, never ours).
    newest: Option<i64>,
    /// By guid.
    known: HashMap<String, Known>,
    order: VecDeque<String>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Known {
    /// Delivered, or not worth redelivering (the job is gone, or not this pool's).
    Settled,
    /// Redelivered `attempts` times, the last when the newest delivery listed was `after`.
    Redelivered { attempts: u32, after: u64 },
}

/// `delivered_at` as epoch seconds.
pub fn epoch(at: &str) -> Option<i64> {
    time::OffsetDateTime::parse(at, &time::format_description::well_known::Rfc3339).ok().map(|t| t.unix_timestamp())
}

/// A delivery the receiver took: GitHub says `OK` for a 2xx answer.
pub fn delivered(d: &DeliveryItem) -> bool {
    (200..300).contains(&d.status_code) && d.status.eq_ignore_ascii_case("ok")
}

impl Redeliveries {
    /// The oldest `delivered_at` a pass reads, given GitHub's clock now (the `Date` of the
    /// first page).
    pub fn cutoff(&self, server_now: Option<i64>) -> Option<i64> {
        match (self.newest, server_now) {
            (Some(n), _) => Some(n - OVERLAP_SEC),
            (None, Some(now)) => Some(now - FIRST_LOOKBACK_SEC),
            (None, None) => None,
        }
    }

    fn remember(&mut self, guid: &str, known: Known) {
        if self.known.insert(guid.to_string(), known).is_none() {
            self.order.push_back(guid.to_string());
            if self.order.len() > REMEMBERED {
                if let Some(old) = self.order.pop_front() {
                    self.known.remove(&old);
                }
            }
        }
    }

    /// The deliveries of a pass's listing worth redelivering, oldest first, at most
    /// [`MAX_REDELIVERIES`]: one per `workflow_job` `queued` event none of whose deliveries
    /// succeeded, that no earlier pass settled, and that was not redelivered already with
    /// its attempt still unlisted (or [`MAX_ATTEMPTS`] times). Never one whose event was
    /// delivered once: a redelivery that succeeded covers the failures before it.
    pub fn pick(&mut self, items: &[DeliveryItem]) -> Vec<DeliveryItem> {
        if let Some(n) = items.iter().filter_map(|d| epoch(&d.delivered_at)).max() {
            self.newest = Some(self.newest.map_or(n, |m| m.max(n)));
        }
        let mut events: HashMap<&str, (bool, &DeliveryItem)> = HashMap::new();
        for d in items.iter().filter(|d| d.event == "workflow_job" && d.action.as_deref() == Some("queued")) {
            let e = events.entry(d.guid.as_str()).or_insert((false, d));
            e.0 |= delivered(d);
            if d.id > e.1.id {
                e.1 = d;
            }
        }
        let mut picked = Vec::new();
        for (guid, (ok, newest)) in events {
            let known = self.known.get(guid).copied();
            if ok {
                if known.is_some_and(|k| k != Known::Settled) {
                    self.remember(guid, Known::Settled);
                }
                continue;
            }
            let due = match known {
                None => true,
                Some(Known::Settled) => false,
                Some(Known::Redelivered { attempts, after }) => newest.id > after && attempts < MAX_ATTEMPTS,
            };
            if due {
                picked.push(newest.clone());
            }
        }
        picked.sort_unstable_by_key(|d| d.id);
        picked.truncate(MAX_REDELIVERIES);
        picked
    }

    /// `guid`'s job is gone or not this pool's: never looked into again.
    pub fn settle(&mut self, guid: &str) {
        self.remember(guid, Known::Settled);
    }

    /// `guid` was redelivered while `after` was the newest delivery listed.
    pub fn redelivered(&mut self, guid: &str, after: u64) {
        let attempts = match self.known.get(guid) {
            Some(Known::Redelivered { attempts, .. }) => attempts + 1,
            _ => 1,
        };
        self.remember(guid, Known::Redelivered { attempts, after });
    }
}

/// One pass over an organization's webhook deliveries: the failed `queued` events of jobs
/// still queued that the pool serves are redelivered. Returns how many.
async fn redelivery_pass(
    github: &Github,
    scope: &Scope,
    hook_id: u64,
    labels: &RunnerLabels,
    seen: &mut Redeliveries,
    counters: &Counters,
    cancel: &CancellationToken,
) -> Result<usize, GithubError> {
    let mut items: Vec<DeliveryItem> = Vec::new();
    let mut next: Option<String> = None;
    let mut cutoff: Option<i64> = None;
    for page in 1..=MAX_DELIVERY_PAGES {
        counters.api_calls.fetch_add(1, Ordering::Relaxed);
        let got = github.list_deliveries(scope, hook_id, 100, next.as_deref(), Budget::attempts(2), cancel).await?;
        if page == 1 {
            cutoff = seen.cutoff(got.server_now);
        }
        let old = |d: &DeliveryItem| cutoff.is_some_and(|c| epoch(&d.delivered_at).is_some_and(|t| t < c));
        let reached = got.items.is_empty() || got.items.iter().any(old);
        items.extend(got.items.iter().filter(|d| !old(d)).cloned());
        match got.next {
            Some(n) if !reached => {
                if page == MAX_DELIVERY_PAGES {
                    warn!(
                        pages = page,
                        "More deliveries since the last pass than one pass reads; older ones are not looked into."
                    );
                }
                next = Some(n);
            }
            _ => break,
        }
    }
    let newest = items.iter().map(|d| d.id).max().unwrap_or(0);
    let mut redelivered = 0;
    for d in seen.pick(&items) {
        counters.api_calls.fetch_add(1, Ordering::Relaxed);
        let payload = match github.delivery_payload(scope, hook_id, d.id, Budget::attempts(2), cancel).await {
            Ok(p) => p,
            Err(GithubError::NotFound { .. }) => None,
            Err(e) => return Err(e),
        };
        let job = payload
            .and_then(|p| serde_json::to_vec(&p).ok())
            .and_then(|body| webhook::parse(Some("workflow_job"), &body).ok())
            .and_then(|delivery| match delivery {
                Delivery::Job(job) => Some(job),
                _ => None,
            })
            .filter(|job| {
                job.action == JobAction::Queued
                    && !job.held()
                    && webhook::in_scope(scope, &job.repository)
                    && labels.serves(&job.labels)
            });
        let Some(job) = job else {
            debug!(delivery_id = d.id, guid = %d.guid, "A failed delivery not for this pool's runners; not redelivered.");
            seen.settle(&d.guid);
            continue;
        };
        if let Some((owner, repo)) = job.repository.split_once('/') {
            let repository = Scope::Repository { owner: owner.into(), repo: repo.into() };
            counters.api_calls.fetch_add(1, Ordering::Relaxed);
            match github.job_status(&repository, job.job_id, Budget::attempts(2), cancel).await {
                Ok(status) if status != "queued" => {
                    debug!(job_id = job.job_id, status = %status, "The job of a failed delivery is no longer queued; not redelivered.");
                    seen.settle(&d.guid);
                    continue;
                }
                Ok(_) => {}
                Err(e @ GithubError::Cancelled { .. }) => return Err(e),
                // The token may not read the repository's jobs (a GitHub App without
                // Actions: read): the redelivery is made all the same; the pool stops a
                // runner nothing needs.
                Err(e) => {
                    debug!(job_id = job.job_id, error = %chain(&e), "Failed to read the job's status; redelivering all the same.")
                }
            }
        }
        counters.api_calls.fetch_add(1, Ordering::Relaxed);
        match github.redeliver(scope, hook_id, d.id, Budget::attempts(2), cancel).await {
            Ok(()) => {}
            // Refused for this delivery (gone, too old to redeliver): never asked again, so
            // that one refusal does not cost 3 calls at every pass.
            Err(GithubError::NotFound { .. }) | Err(GithubError::Status { status: 400..=499, .. }) => {
                warn!(
                    job_id = job.job_id,
                    delivery_id = d.id,
                    "GitHub refused to redeliver a failed delivery; its job is left to the webhook path."
                );
                seen.settle(&d.guid);
                continue;
            }
            Err(e) => return Err(e),
        }
        seen.redelivered(&d.guid, newest);
        counters.redeliveries.fetch_add(1, Ordering::Relaxed);
        counters.found.fetch_add(1, Ordering::Relaxed);
        info!(job_id = job.job_id, delivery_id = d.id, guid = %d.guid, "Job's queued delivery had failed; redelivered.");
        redelivered += 1;
    }
    Ok(redelivered)
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
    fn repositories_list_runs_and_organizations_read_their_webhook_s_deliveries() {
        let repo = Scope::Repository { owner: "o".into(), repo: "r".into() };
        assert_eq!(source(&repo, None), Some(Source::Runs));
        assert_eq!(source(&repo, Some(7)), Some(Source::Runs));
        let org = Scope::Organization("o".into());
        assert_eq!(source(&org, Some(7)), Some(Source::Deliveries { hook_id: 7 }));
        assert_eq!(source(&org, None), None, "no hook id: nothing to read");
        assert_eq!(source(&Scope::Enterprise("e".into()), Some(7)), None, "enterprises have no deliveries API");
    }

    fn delivery(id: u64, guid: &str, action: &str, code: u16, at: &str) -> DeliveryItem {
        DeliveryItem {
            id,
            guid: guid.into(),
            delivered_at: at.into(),
            redelivery: false,
            status: if (200..300).contains(&code) { "OK".into() } else { "failed to connect".into() },
            status_code: code,
            event: "workflow_job".into(),
            action: Some(action.into()),
        }
    }

    const T: &str = "2026-12-04T18:00:00Z";

    #[test]
    fn only_failed_queued_events_never_delivered_are_picked_oldest_first() {
        let mut r = Redeliveries::default();
        let items = [
            delivery(9, "c", "queued", 0, T),
            delivery(8, "b", "queued", 202, T), // a redelivery that succeeded covers the failure
            delivery(7, "b", "queued", 502, T),
            delivery(6, "d", "completed", 0, T), // not a queued event
            delivery(5, "a", "queued", 503, T),
            delivery(4, "e", "queued", 200, T),
            DeliveryItem { event: "ping".into(), ..delivery(3, "f", "queued", 0, T) },
        ];
        let picked: Vec<u64> = r.pick(&items).iter().map(|d| d.id).collect();
        assert_eq!(picked, [5, 9]);
        // Never a delivery whose event was delivered once.
        assert!(!picked.contains(&7) && !picked.contains(&8) && !picked.contains(&4));
    }

    #[test]
    fn a_redelivered_event_waits_for_its_attempt_and_is_tried_a_bounded_number_of_times() {
        let mut r = Redeliveries::default();
        let mut items = vec![delivery(1, "a", "queued", 0, T)];
        assert_eq!(r.pick(&items).len(), 1);
        r.redelivered("a", 1);
        assert!(r.pick(&items).is_empty(), "its attempt is not listed yet: never sent twice");
        for attempt in 2..=MAX_ATTEMPTS {
            let id = items.len() as u64 + 1;
            items.push(DeliveryItem { redelivery: true, ..delivery(id, "a", "queued", 0, T) });
            assert_eq!(r.pick(&items).iter().map(|d| d.id).collect::<Vec<_>>(), [id], "attempt {attempt}");
            r.redelivered("a", id);
        }
        items.push(DeliveryItem { redelivery: true, ..delivery(99, "a", "queued", 0, T) });
        assert!(r.pick(&items).is_empty(), "at most {MAX_ATTEMPTS} attempts");
        // Its last attempt went through: settled.
        items.push(DeliveryItem { redelivery: true, ..delivery(100, "a", "queued", 202, T) });
        assert!(r.pick(&items).is_empty());
        r.settle("b");
        assert!(r.pick(&[delivery(101, "b", "queued", 0, T)]).is_empty(), "a settled event is never redelivered");
    }

    #[test]
    fn one_pass_picks_a_bounded_number() {
        let mut r = Redeliveries::default();
        let items: Vec<DeliveryItem> = (1..=50).map(|i| delivery(i, &format!("g{i}"), "queued", 0, T)).collect();
        let picked = r.pick(&items);
        assert_eq!(picked.len(), MAX_REDELIVERIES);
        assert_eq!(picked[0].id, 1, "the oldest first");
    }

    #[test]
    fn the_look_back_follows_github_s_clock() {
        let mut r = Redeliveries::default();
        assert_eq!(r.cutoff(None), None);
        let now = epoch("2026-12-04T18:00:00Z").unwrap();
        assert_eq!(r.cutoff(Some(now)), Some(now - FIRST_LOOKBACK_SEC));
        r.pick(&[delivery(1, "a", "queued", 202, "2026-12-04T17:59:00Z")]);
        assert_eq!(r.cutoff(Some(now + 3600)), Some(now - 60 - OVERLAP_SEC), "the newest seen, not our clock");
    }
}
