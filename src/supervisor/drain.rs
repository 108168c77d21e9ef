//! The drain's decisions, apart from any I/O: events in, actions out.
//!
//! The order (README "Shutdown sequence"), for every way a drain starts (a signal, a spot
//! notice, the admin API, the controller's stop):
//! 1. Make the runner ineligible for new jobs on GitHub's side: strip its custom labels
//!    (`DELETE …/actions/runners/{id}/labels`), so no queued job that asks for the pool's labels
//!    can be assigned to it; and ask the runner itself to stop polling where it can
//!    ([`Action::RequestRunnerDrain`]).
//! 2. While a job runs, wait for it: never signal the Listener, which would cancel the job.
//! 3. Once no job runs (at once when idle, or at the job's `completed with result`) and the
//!    labels call is over: delete the registration. A busy answer (422) means GitHub assigned
//!    a job the Listener has not announced yet: wait for it like the first.
//! 4. Only when the registration is gone (GitHub can assign nothing to a runner that does
//!    not exist) does the Listener get SIGINT.
//!
//! The drain's deadline (`DRAIN_TIMEOUT_SEC`, brought forward by a spot notice) or a second
//! signal stops the Listener at once, cancelling a running job; a third signal kills it. Every
//! job that is running when the Listener is stopped, or that starts after, counts as
//! cancelled by the drain, and makes the exit 7.
//!
//! The supervisor's loop ([`super::Supervisor`]) turns the runner's lines, signals, API
//! answers and timers into [`Event`]s and carries out the [`Action`]s; [`Drain::wake_at`] is
//! when it must call back with [`Event::Tick`].

use std::time::Duration;

use tokio::time::Instant;

/// How long a stopped Listener may take to exit before its group is killed, by default
/// (`RUNNER_STOP_GRACE_SEC`): the runner's own cancel path needs SIGINT → 7.5 s → SIGTERM →
/// 2.5 s for the step, then the cancelled job's `always()` post steps and job-completed hook,
/// then the report.
pub const STOP_GRACE: Duration = Duration::from_secs(30);
/// Pause before deleting again after GitHub answered that the runner is busy while the
/// Listener shows no job (an assignment on its way).
const BUSY_RETRY: Duration = Duration::from_secs(1);
/// Pause before deleting again after a failed call (the client already retried it).
const FAILED_RETRY: Duration = Duration::from_secs(2);
/// How long failing DELETEs (not busy answers) hold the Listener: past this, it is stopped
/// anyway and the supervisor's final de-registration tries again. GitHub failing that long
/// is an outage, during which it assigns nothing either.
pub const DELETE_PHASE: Duration = Duration::from_secs(20);

/// What happened.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Event {
    /// A drain signal after the first: the second cancels a running job, the third kills.
    Signal,
    /// A spot interruption notice: everything must be over by `by`.
    Spot { by: Instant },
    /// A `Running job:` line, or a Worker process seen before its line.
    JobStarted(String),
    /// A `completed with result` line.
    JobCompleted,
    /// The labels call ended (well or not: the drain goes on either way).
    LabelsDone,
    /// The registration's DELETE ended.
    Deleted(DeleteAnswer),
    /// Time passed (at or after [`Drain::wake_at`]).
    Tick,
}

/// How the registration's DELETE ended.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DeleteAnswer {
    /// 204, or 404 (already gone). `worker`: a Worker process runs (a job started while the
    /// call was in flight, its line not yet read).
    Gone { worker: bool },
    /// 422: GitHub holds a job for the runner.
    Busy,
    /// Any other failure, after the client's own retries.
    Failed,
}

/// What the supervisor must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Remove the runner's custom labels on GitHub, then report [`Event::LabelsDone`].
    StripLabels,
    /// Ask the runner to stop polling by itself, where it supports it (actions/runner PRs
    /// #4461 and #4708).
    RequestRunnerDrain,
    /// Start the registration's DELETE, then report [`Event::Deleted`].
    Delete,
    /// SIGINT to the Listener. `cancels`: the job it cancels, if one runs.
    StopListener { cancels: Option<String> },
    /// SIGKILL to the runner's process group.
    Kill,
}

/// What the API lets the drain do.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Api {
    /// The registration's labels can be stripped and the registration deleted (an API
    /// token, and the runner's id known).
    pub available: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Labels {
    Pending,
    Over,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Registration {
    Held,
    Deleting,
    RetryAt(Instant),
    Gone,
    /// No API: only the Listener's stop ends it (the supervisor's final step tries again).
    Unmanaged,
    /// The DELETEs failed for [`DELETE_PHASE`]: the final de-registration tries again.
    GaveUp,
}

/// A drain in progress.
#[derive(Debug)]
pub struct Drain {
    deadline: Option<Instant>,
    signals: u32,
    labels: Labels,
    registration: Registration,
    busy: Option<String>,
    /// The Listener has been sent SIGINT.
    stopped: bool,
    kill_at: Option<Instant>,
    stop_grace: Duration,
    killed: bool,
    /// When the first DELETE went out.
    deleting_since: Option<Instant>,
    waited_for_job: bool,
    cancelled: Vec<String>,
}

/// How the drain went, for the exit code, `/health` and `/metrics`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Summary {
    /// A job ran at some point of the drain.
    pub waited_for_job: bool,
    /// The jobs the drain cancelled (at its deadline, or on a second or third signal).
    pub cancelled: Vec<String>,
    /// The registration was deleted during the drain.
    pub deregistered: bool,
}

impl Drain {
    /// A drain starting at `now`: `deadline` is `None` when it would lie beyond any instant
    /// (an unbounded drain), `busy` the job running, if any; a stopped Listener is killed after
    /// `stop_grace`.
    pub fn start(
        now: Instant,
        deadline: Option<Instant>,
        busy: Option<String>,
        api: Api,
        stop_grace: Duration,
    ) -> (Self, Vec<Action>) {
        let mut d = Self {
            deadline,
            signals: 1,
            labels: if api.available { Labels::Pending } else { Labels::Over },
            registration: if api.available { Registration::Held } else { Registration::Unmanaged },
            waited_for_job: busy.is_some(),
            busy,
            stopped: false,
            kill_at: None,
            stop_grace,
            killed: false,
            deleting_since: None,
            cancelled: Vec::new(),
        };
        let mut out = vec![Action::RequestRunnerDrain];
        if api.available {
            out.push(Action::StripLabels);
        }
        d.advance(now, &mut out);
        (d, out)
    }

    pub fn on_event(&mut self, event: Event, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        match event {
            Event::Signal => {
                self.signals += 1;
                if self.signals == 2 {
                    self.stop(now, &mut out);
                } else if !self.killed {
                    self.killed = true;
                    self.kill_at = None;
                    self.cancel_running();
                    out.push(Action::Kill);
                }
            }
            Event::Spot { by } => {
                if self.deadline.is_none_or(|d| by < d) {
                    self.deadline = Some(by);
                }
            }
            Event::JobStarted(name) => {
                self.waited_for_job = true;
                if self.stopped {
                    // The Listener is shutting down: it cancels what it receives now.
                    self.cancelled.push(name.clone());
                }
                self.busy = Some(name);
            }
            Event::JobCompleted => self.busy = None,
            Event::LabelsDone => self.labels = Labels::Over,
            Event::Deleted(answer) => {
                self.registration = match answer {
                    DeleteAnswer::Gone { worker } => {
                        if worker && self.busy.is_none() {
                            self.busy = Some("(starting)".into());
                            self.waited_for_job = true;
                        }
                        Registration::Gone
                    }
                    // A job the Listener shows will end with a line; one it does not show yet
                    // will appear as a line or a Worker: ask again after a pause.
                    DeleteAnswer::Busy if self.busy.is_some() => Registration::Held,
                    DeleteAnswer::Busy => Registration::RetryAt(now + BUSY_RETRY),
                    DeleteAnswer::Failed
                        if self.deleting_since.is_some_and(|t| now.saturating_duration_since(t) >= DELETE_PHASE) =>
                    {
                        Registration::GaveUp
                    }
                    DeleteAnswer::Failed => Registration::RetryAt(now + FAILED_RETRY),
                };
            }
            Event::Tick => {
                if self.deadline.is_some_and(|d| now >= d) {
                    self.deadline = None;
                    self.stop(now, &mut out);
                }
                if self.kill_at.is_some_and(|k| now >= k) {
                    self.kill_at = None;
                    self.killed = true;
                    out.push(Action::Kill);
                }
                if let Registration::RetryAt(at) = self.registration {
                    if now >= at {
                        self.registration = Registration::Held;
                    }
                }
            }
        }
        self.advance(now, &mut out);
        out
    }

    /// The next instant at which [`Event::Tick`] is due, if any.
    pub fn wake_at(&self) -> Option<Instant> {
        let retry = match self.registration {
            Registration::RetryAt(at) => Some(at),
            _ => None,
        };
        [self.deadline.filter(|_| !self.stopped), self.kill_at, retry].into_iter().flatten().min()
    }

    pub fn busy(&self) -> Option<&str> {
        self.busy.as_deref()
    }

    pub fn summary(&self) -> Summary {
        Summary {
            waited_for_job: self.waited_for_job,
            cancelled: self.cancelled.clone(),
            deregistered: self.registration == Registration::Gone,
        }
    }

    /// The step the drain is at, taken as far as it can go now.
    fn advance(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopped || self.busy.is_some() || self.labels == Labels::Pending {
            return;
        }
        match self.registration {
            Registration::Held => {
                self.registration = Registration::Deleting;
                self.deleting_since.get_or_insert(now);
                out.push(Action::Delete);
            }
            Registration::Gone | Registration::Unmanaged | Registration::GaveUp => self.stop(now, out),
            Registration::Deleting | Registration::RetryAt(_) => {}
        }
    }

    /// SIGINT to the Listener (once), and the kill after [`STOP_GRACE`].
    fn stop(&mut self, now: Instant, out: &mut Vec<Action>) {
        if self.stopped {
            return;
        }
        self.stopped = true;
        let cancels = self.cancel_running();
        self.kill_at = now.checked_add(self.stop_grace);
        out.push(Action::StopListener { cancels });
    }

    fn cancel_running(&mut self) -> Option<String> {
        let job = self.busy.clone()?;
        if !self.cancelled.contains(&job) {
            self.cancelled.push(job.clone());
        }
        Some(job)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const API: Api = Api { available: true };
    const NO_API: Api = Api { available: false };

    fn t0() -> Instant {
        Instant::now()
    }

    fn stop(job: Option<&str>) -> Action {
        Action::StopListener { cancels: job.map(str::to_string) }
    }

    #[test]
    fn idle_drain_strips_labels_then_deletes_then_stops() {
        let now = t0();
        let (mut d, out) = Drain::start(now, Some(now + Duration::from_secs(60)), None, API, STOP_GRACE);
        // Never a DELETE or a SIGINT before the labels call is over.
        assert_eq!(out, vec![Action::RequestRunnerDrain, Action::StripLabels]);
        assert_eq!(d.on_event(Event::LabelsDone, now), vec![Action::Delete]);
        assert_eq!(d.on_event(Event::Deleted(DeleteAnswer::Gone { worker: false }), now), vec![stop(None)]);
        let s = d.summary();
        assert!(s.deregistered && s.cancelled.is_empty() && !s.waited_for_job, "{s:?}");
    }

    #[test]
    fn a_job_that_slips_in_before_the_labels_go_is_waited_for() {
        let now = t0();
        let (mut d, _) = Drain::start(now, Some(now + Duration::from_secs(60)), None, API, STOP_GRACE);
        assert!(d.on_event(Event::JobStarted("late".into()), now).is_empty());
        assert!(d.on_event(Event::LabelsDone, now).is_empty(), "nothing may happen while a job runs");
        assert_eq!(d.on_event(Event::JobCompleted, now), vec![Action::Delete]);
        assert_eq!(d.on_event(Event::Deleted(DeleteAnswer::Gone { worker: false }), now), vec![stop(None)]);
        let s = d.summary();
        assert!(s.cancelled.is_empty() && s.waited_for_job, "{s:?}");
    }

    #[test]
    fn mid_job_drain_deletes_before_the_sigint_and_waits_for_a_job_assigned_meanwhile() {
        let now = t0();
        let (mut d, out) =
            Drain::start(now, Some(now + Duration::from_secs(600)), Some("first".into()), API, STOP_GRACE);
        assert_eq!(out, vec![Action::RequestRunnerDrain, Action::StripLabels]);
        assert!(d.on_event(Event::LabelsDone, now).is_empty());
        // The job ends: the registration goes first; the Listener, still polling, is not stopped.
        assert_eq!(d.on_event(Event::JobCompleted, now), vec![Action::Delete]);
        // GitHub assigned a job before the DELETE: 422. Never SIGINT now: it would cancel it.
        assert!(d.on_event(Event::Deleted(DeleteAnswer::Busy), now).is_empty());
        let retry = d.wake_at().expect("a retry is due");
        assert!(d.on_event(Event::JobStarted("second".into()), now).is_empty());
        assert!(d.on_event(Event::Tick, retry).is_empty(), "no DELETE while the job runs");
        assert_eq!(d.on_event(Event::JobCompleted, retry), vec![Action::Delete]);
        assert_eq!(d.on_event(Event::Deleted(DeleteAnswer::Gone { worker: false }), retry), vec![stop(None)]);
        assert!(d.summary().cancelled.is_empty());
    }

    #[test]
    fn a_busy_answer_with_no_job_shown_asks_again_after_a_pause() {
        let now = t0();
        let (mut d, _) = Drain::start(now, None, None, API, STOP_GRACE);
        d.on_event(Event::LabelsDone, now);
        assert!(d.on_event(Event::Deleted(DeleteAnswer::Busy), now).is_empty());
        assert_eq!(d.wake_at(), Some(now + BUSY_RETRY));
        assert!(d.on_event(Event::Tick, now + Duration::from_millis(500)).is_empty(), "too early");
        assert_eq!(d.on_event(Event::Tick, now + BUSY_RETRY), vec![Action::Delete]);
    }

    #[test]
    fn a_worker_seen_when_the_delete_succeeds_is_waited_for() {
        let now = t0();
        let (mut d, _) = Drain::start(now, None, None, API, STOP_GRACE);
        d.on_event(Event::LabelsDone, now);
        assert!(d.on_event(Event::Deleted(DeleteAnswer::Gone { worker: true }), now).is_empty());
        assert_eq!(d.busy(), Some("(starting)"));
        assert!(d.on_event(Event::JobStarted("j".into()), now).is_empty());
        assert_eq!(d.on_event(Event::JobCompleted, now), vec![stop(None)]);
        assert!(d.summary().cancelled.is_empty());
    }

    #[test]
    fn the_deadline_cancels_a_slipped_in_job() {
        let now = t0();
        let deadline = now + Duration::from_secs(5);
        let (mut d, _) = Drain::start(now, Some(deadline), Some("first".into()), API, STOP_GRACE);
        d.on_event(Event::LabelsDone, now);
        d.on_event(Event::JobCompleted, now);
        d.on_event(Event::Deleted(DeleteAnswer::Busy), now);
        d.on_event(Event::JobStarted("second".into()), now);
        assert_eq!(d.wake_at(), Some(now + BUSY_RETRY));
        assert!(d.on_event(Event::Tick, now + BUSY_RETRY).is_empty());
        assert_eq!(d.wake_at(), Some(deadline));
        assert_eq!(d.on_event(Event::Tick, deadline), vec![stop(Some("second"))]);
        assert_eq!(d.summary().cancelled, vec!["second".to_string()]);
        // The Listener did not stop in time: killed once, after the grace.
        assert_eq!(d.wake_at(), Some(deadline + STOP_GRACE));
        assert_eq!(d.on_event(Event::Tick, deadline + STOP_GRACE), vec![Action::Kill]);
        assert_eq!(d.wake_at(), None);
    }

    #[test]
    fn a_spot_notice_brings_the_deadline_forward_never_back() {
        let now = t0();
        let (mut d, _) = Drain::start(now, Some(now + Duration::from_secs(100)), Some("j".into()), API, STOP_GRACE);
        d.on_event(Event::Spot { by: now + Duration::from_secs(10) }, now);
        assert_eq!(d.wake_at(), Some(now + Duration::from_secs(10)));
        d.on_event(Event::Spot { by: now + Duration::from_secs(50) }, now);
        assert_eq!(d.wake_at(), Some(now + Duration::from_secs(10)));
        // An unbounded drain gets the notice's deadline.
        let (mut u, _) = Drain::start(now, None, Some("j".into()), API, STOP_GRACE);
        assert_eq!(u.wake_at(), None);
        u.on_event(Event::Spot { by: now + Duration::from_secs(7) }, now);
        assert_eq!(u.wake_at(), Some(now + Duration::from_secs(7)));
    }

    #[test]
    fn second_signal_cancels_third_kills() {
        let now = t0();
        let (mut d, _) = Drain::start(now, None, Some("j".into()), API, STOP_GRACE);
        assert_eq!(d.on_event(Event::Signal, now), vec![stop(Some("j"))]);
        assert_eq!(d.on_event(Event::Signal, now), vec![Action::Kill]);
        assert!(d.on_event(Event::Signal, now).is_empty(), "killed once");
        assert_eq!(d.summary().cancelled, vec!["j".to_string()], "one job, counted once");
    }

    #[test]
    fn a_job_received_after_the_stop_counts_as_cancelled() {
        let now = t0();
        let (mut d, out) = Drain::start(now, None, None, NO_API, STOP_GRACE);
        // No API: nothing to strip or delete; only the Listener's stop.
        assert_eq!(out, vec![Action::RequestRunnerDrain, stop(None)]);
        d.on_event(Event::JobStarted("raced".into()), now);
        assert_eq!(d.summary().cancelled, vec!["raced".to_string()]);
    }

    #[test]
    fn no_api_mid_job_stops_at_the_jobs_end() {
        let now = t0();
        let (mut d, out) = Drain::start(now, None, Some("j".into()), NO_API, STOP_GRACE);
        assert_eq!(out, vec![Action::RequestRunnerDrain]);
        assert_eq!(d.on_event(Event::JobCompleted, now), vec![stop(None)]);
        assert!(d.summary().cancelled.is_empty());
    }

    #[test]
    fn failed_deletes_retry_for_the_delete_phase_then_the_listener_stops() {
        let now = t0();
        let (mut d, _) = Drain::start(now, Some(now + Duration::from_secs(600)), None, API, STOP_GRACE);
        d.on_event(Event::LabelsDone, now);
        let mut at = now;
        let mut deletes = 1;
        loop {
            // Each failed call took the client's retries: a few seconds.
            at += Duration::from_secs(3);
            let out = d.on_event(Event::Deleted(DeleteAnswer::Failed), at);
            if out.contains(&stop(None)) {
                break;
            }
            assert!(out.is_empty(), "{out:?}");
            at = d.wake_at().expect("a retry");
            assert_eq!(d.on_event(Event::Tick, at), vec![Action::Delete]);
            deletes += 1;
        }
        assert!(at.saturating_duration_since(now) >= DELETE_PHASE, "stopped too soon");
        assert!(at.saturating_duration_since(now) < DELETE_PHASE + Duration::from_secs(6), "held too long");
        assert!(deletes >= 3, "{deletes}");
        assert!(!d.summary().deregistered, "the final step must try again");
    }

    #[test]
    fn busy_answers_are_not_failures_and_wait_for_the_deadline() {
        let now = t0();
        let deadline = now + Duration::from_secs(60);
        let (mut d, _) = Drain::start(now, Some(deadline), None, API, STOP_GRACE);
        d.on_event(Event::LabelsDone, now);
        let mut at = now;
        loop {
            let out = d.on_event(Event::Deleted(DeleteAnswer::Busy), at);
            assert!(out.is_empty(), "{out:?}");
            at = d.wake_at().expect("a retry or the deadline");
            let out = d.on_event(Event::Tick, at);
            if out.contains(&stop(None)) {
                break;
            }
            assert_eq!(out, vec![Action::Delete]);
        }
        assert_eq!(at, deadline, "a job on its way is waited for until the deadline");
    }

    #[tokio::test(start_paused = true)]
    async fn wake_at_follows_the_paused_clock() {
        let now = Instant::now();
        let (mut d, _) = Drain::start(now, Some(now + Duration::from_secs(30)), None, NO_API, STOP_GRACE);
        assert_eq!(d.wake_at(), Some(now + STOP_GRACE), "stopped at once: only the kill is due");
        tokio::time::advance(STOP_GRACE).await;
        assert_eq!(d.on_event(Event::Tick, Instant::now()), vec![Action::Kill]);
    }
}
