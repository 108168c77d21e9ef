//! The counters of issue #4 for `GET /metrics`: jobs by result and their durations, GitHub
//! API answers by status, failed de-registrations, forwarded connections.
//!
//! One process-wide registry ([`global`]): the GitHub client, the supervisor and the forwarding
//! thread (its own runtime) all add to it, and the status server renders it. Counting is an
//! atomic add; the few maps sit behind a `std` mutex held for a lookup, never across `.await`.
//! What the supervisor *is* (state, boot times, the drain's outcome) is not counted here but
//! kept in [`crate::status::Status`].

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use crate::forward::Proto;

/// Upper bounds of `ci_runner_job_duration_seconds` (`+Inf` is implied): CI jobs take from
/// seconds to hours, and GitHub cancels a job after 6 h by default.
pub const JOB_DURATION_BUCKETS: [f64; 10] = [10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1200.0, 1800.0, 3600.0, 7200.0];

static GLOBAL: Metrics = Metrics::new();

/// The registry `/metrics` renders.
pub fn global() -> &'static Metrics {
    &GLOBAL
}

/// A monotonic count.
#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub const fn new() -> Self {
        Self(AtomicU64::new(0))
    }

    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// How a job ended, from the runner's `Job X completed with result: R`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobResult {
    Succeeded,
    Failed,
    Cancelled,
    Other,
}

impl JobResult {
    pub const ALL: [JobResult; 4] = [Self::Succeeded, Self::Failed, Self::Cancelled, Self::Other];

    /// The runner prints its `TaskResult` names: Succeeded, SucceededWithIssues (a step with
    /// `continue-on-error` failed; GitHub shows the job as a success), Failed, Canceled,
    /// Skipped, Abandoned.
    pub fn from_runner(result: &str) -> Self {
        match result.to_ascii_lowercase().as_str() {
            "succeeded" | "succeededwithissues" => Self::Succeeded,
            "failed" => Self::Failed,
            "canceled" | "cancelled" => Self::Cancelled,
            _ => Self::Other,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Succeeded => "succeeded",
            Self::Failed => "failed",
            Self::Cancelled => "cancelled",
            Self::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// A histogram with fixed upper bounds; counts per bucket, made cumulative when rendered.
#[derive(Debug, Clone)]
pub struct Histogram<const N: usize> {
    bounds: [f64; N],
    /// Observations in `(bounds[i-1], bounds[i]]`; those above the last bound are only in
    /// `count` (the `+Inf` bucket).
    buckets: [u64; N],
    sum: f64,
    count: u64,
}

impl<const N: usize> Histogram<N> {
    pub const fn new(bounds: [f64; N]) -> Self {
        Self { bounds, buckets: [0; N], sum: 0.0, count: 0 }
    }

    pub fn observe(&mut self, value: f64) {
        if let Some(i) = self.bounds.iter().position(|b| value <= *b) {
            self.buckets[i] += 1;
        }
        self.sum += value;
        self.count += 1;
    }

    /// `_bucket` (cumulative, ending with `+Inf`), `_sum` and `_count` lines of `name`.
    fn render(&self, out: &mut String, name: &str) {
        let mut cumulative = 0;
        for (bound, n) in self.bounds.iter().zip(self.buckets) {
            cumulative += n;
            let _ = writeln!(out, "{name}_bucket{{le=\"{bound}\"}} {cumulative}");
        }
        let _ = writeln!(out, "{name}_bucket{{le=\"+Inf\"}} {}", self.count);
        let _ = writeln!(out, "{name}_sum {:.3}", self.sum);
        let _ = writeln!(out, "{name}_count {}", self.count);
    }
}

/// What one request to the GitHub API got back.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum ApiAnswer {
    Status(u16),
    /// No answer: connection refused, TLS, timeout.
    Error,
}

/// One forwarded port's counters; the forwarding thread holds it, `/metrics` reads it.
#[derive(Debug)]
pub struct ForwardCounters {
    port: u16,
    proto: Proto,
    connections: Counter,
    /// Per host of the forward, in its order.
    host_failures: Vec<(String, Counter)>,
}

impl ForwardCounters {
    /// A TCP connection accepted, or a UDP session started.
    pub fn connection(&self) {
        self.connections.inc();
    }

    /// Host `i` could not be reached.
    pub fn host_failed(&self, i: usize) {
        if let Some((_, c)) = self.host_failures.get(i) {
            c.inc();
        }
    }
}

#[derive(Debug)]
pub struct Metrics {
    jobs_started: Counter,
    jobs_completed: [Counter; 4],
    job_duration: Mutex<Histogram<10>>,
    github: Mutex<BTreeMap<ApiAnswer, u64>>,
    deregistration_failures: Counter,
    drain_cancelled_jobs: Counter,
    forwards: Mutex<Vec<Arc<ForwardCounters>>>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

/// A poisoned lock only means a panic elsewhere mid-update of a counter: keep counting.
fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

impl Metrics {
    pub const fn new() -> Self {
        Self {
            jobs_started: Counter::new(),
            jobs_completed: [Counter::new(), Counter::new(), Counter::new(), Counter::new()],
            job_duration: Mutex::new(Histogram::new(JOB_DURATION_BUCKETS)),
            github: Mutex::new(BTreeMap::new()),
            deregistration_failures: Counter::new(),
            drain_cancelled_jobs: Counter::new(),
            forwards: Mutex::new(Vec::new()),
        }
    }

    /// The runner printed `Running job: X`.
    pub fn job_started(&self) {
        self.jobs_started.inc();
    }

    /// The runner printed `Job X completed with result: R`; `duration` since its `Running
    /// job` line, when that was seen.
    pub fn job_completed(&self, result: JobResult, duration: Option<Duration>) {
        self.jobs_completed[result.index()].inc();
        if let Some(d) = duration {
            lock(&self.job_duration).observe(d.as_secs_f64());
        }
    }

    pub fn jobs_completed(&self, result: JobResult) -> u64 {
        self.jobs_completed[result.index()].get()
    }

    /// One request to the GitHub API (each retry is one).
    pub fn github_answer(&self, answer: ApiAnswer) {
        *lock(&self.github).entry(answer).or_default() += 1;
    }

    /// An attempt to remove a registration from GitHub failed.
    pub fn deregistration_failed(&self) {
        self.deregistration_failures.inc();
    }

    /// A drain cancelled a job (its deadline, a second or third signal).
    pub fn drain_cancelled_job(&self) {
        self.drain_cancelled_jobs.inc();
    }

    pub fn drain_cancelled_jobs(&self) -> u64 {
        self.drain_cancelled_jobs.get()
    }

    /// The counters of a forward, shown (at 0) from now on. A forward started again on the same
    /// port and protocol replaces the old one's counters (a counter reset to Prometheus).
    pub fn forward(&self, port: u16, proto: Proto, hosts: &[String]) -> Arc<ForwardCounters> {
        let counters = Arc::new(ForwardCounters {
            port,
            proto,
            connections: Counter::new(),
            host_failures: hosts.iter().map(|h| (h.clone(), Counter::new())).collect(),
        });
        let mut forwards = lock(&self.forwards);
        forwards.retain(|f| (f.port, f.proto) != (port, proto));
        forwards.push(counters.clone());
        counters
    }

    /// Every family, with `# HELP` and `# TYPE`, in the text format 0.0.4.
    pub fn render(&self, out: &mut String) {
        family(out, "ci_runner_jobs_started_total", "counter", "Jobs the runner started (its \"Running job\" line).");
        let _ = writeln!(out, "ci_runner_jobs_started_total {}", self.jobs_started.get());
        family(
            out,
            "ci_runner_jobs_completed_total",
            "counter",
            "Jobs the runner completed, by result; the sum over result counts every completed job.",
        );
        for r in JobResult::ALL {
            let _ =
                writeln!(out, "ci_runner_jobs_completed_total{{result=\"{}\"}} {}", r.label(), self.jobs_completed(r));
        }
        family(
            out,
            "ci_runner_job_duration_seconds",
            "histogram",
            "Time from a job's \"Running job\" line to its \"completed with result\" line.",
        );
        let histogram = lock(&self.job_duration).clone();
        histogram.render(out, "ci_runner_job_duration_seconds");

        family(
            out,
            "ci_runner_github_api_requests_total",
            "counter",
            "Requests to the GitHub REST API by the HTTP status of the answer, each retry counted; \
             status \"error\" when no answer came (connection, TLS, timeout).",
        );
        for (answer, n) in lock(&self.github).iter() {
            let status = match answer {
                ApiAnswer::Status(s) => Cow::Owned(s.to_string()),
                ApiAnswer::Error => Cow::Borrowed("error"),
            };
            let _ = writeln!(out, "ci_runner_github_api_requests_total{{status=\"{status}\"}} {n}");
        }
        family(
            out,
            "ci_runner_deregistration_failures_total",
            "counter",
            "Attempts to remove a runner registration from GitHub (this one, or a stale one left by an \
             earlier start) that failed: an error answer, a 422 for a runner GitHub still thinks busy \
             included, or none after the API client's own retries. Each is counted, whether the \
             supervisor then tried again or gave up.",
        );
        let _ = writeln!(out, "ci_runner_deregistration_failures_total {}", self.deregistration_failures.get());
        family(
            out,
            "ci_runner_drain_cancelled_jobs_total",
            "counter",
            "Jobs a drain cancelled: running when its deadline passed or a second signal came, or \
             received by a Listener already told to stop. 0 in a drain that let every job finish.",
        );
        let _ = writeln!(out, "ci_runner_drain_cancelled_jobs_total {}", self.drain_cancelled_jobs.get());

        let forwards = lock(&self.forwards).clone();
        if forwards.is_empty() {
            return;
        }
        family(
            out,
            "ci_runner_forward_connections_total",
            "counter",
            "Connections accepted (tcp) and sessions started (udp, one per client address) on a forwarded port.",
        );
        for f in &forwards {
            let _ = writeln!(
                out,
                "ci_runner_forward_connections_total{{port=\"{}\",proto=\"{}\"}} {}",
                f.port,
                f.proto,
                f.connections.get()
            );
        }
        family(
            out,
            "ci_runner_forward_host_failures_total",
            "counter",
            "Times a forward's host could not be reached (refused, timed out, no address; ICMP port \
             unreachable for udp); the connection or session then tries the next host, if any.",
        );
        for f in &forwards {
            for (host, n) in &f.host_failures {
                let _ = writeln!(
                    out,
                    "ci_runner_forward_host_failures_total{{port=\"{}\",proto=\"{}\",host=\"{}\"}} {}",
                    f.port,
                    f.proto,
                    escape(host),
                    n.get()
                );
            }
        }
    }
}

/// The `# HELP` and `# TYPE` lines of a family.
pub(crate) fn family(out: &mut String, name: &str, kind: &str, help: &str) {
    let help = help.replace('\\', "\\\\").replace('\n', "\\n");
    let _ = writeln!(out, "# HELP {name} {help}\n# TYPE {name} {kind}");
}

/// A label value as the text format wants it: `\`, `"` and newline escaped.
pub(crate) fn escape(value: &str) -> Cow<'_, str> {
    if !value.contains(['\\', '"', '\n']) {
        return Cow::Borrowed(value);
    }
    Cow::Owned(value.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n"))
}

/// The families the registry renders (the status renders its own before them).
#[cfg(test)]
pub(crate) const FAMILIES: [&str; 8] = [
    "ci_runner_jobs_started_total",
    "ci_runner_jobs_completed_total",
    "ci_runner_job_duration_seconds",
    "ci_runner_github_api_requests_total",
    "ci_runner_deregistration_failures_total",
    "ci_runner_drain_cancelled_jobs_total",
    "ci_runner_forward_connections_total",
    "ci_runner_forward_host_failures_total",
];

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runner_results_map_to_four_labels() {
        assert_eq!(JobResult::from_runner("Succeeded"), JobResult::Succeeded);
        assert_eq!(JobResult::from_runner("SucceededWithIssues"), JobResult::Succeeded);
        assert_eq!(JobResult::from_runner("Failed"), JobResult::Failed);
        assert_eq!(JobResult::from_runner("Canceled"), JobResult::Cancelled);
        assert_eq!(JobResult::from_runner("Abandoned"), JobResult::Other);
        assert_eq!(JobResult::from_runner("Skipped"), JobResult::Other);
        for (i, r) in JobResult::ALL.into_iter().enumerate() {
            assert_eq!(r.index(), i);
        }
    }

    #[test]
    fn histogram_buckets_are_cumulative_and_end_at_inf() {
        let mut h = Histogram::new([10.0, 60.0, 300.0]);
        for v in [5.0, 10.0, 59.9, 61.0, 4000.0] {
            h.observe(v);
        }
        let mut out = String::new();
        h.render(&mut out, "d");
        assert_eq!(
            out,
            "d_bucket{le=\"10\"} 2\nd_bucket{le=\"60\"} 3\nd_bucket{le=\"300\"} 4\nd_bucket{le=\"+Inf\"} 5\n\
             d_sum 4135.900\nd_count 5\n"
        );
    }

    #[test]
    fn every_family_has_help_and_type() {
        let m = Metrics::new();
        m.forward(5432, Proto::Tcp, &["db\"1".into(), "db2".into()]);
        let mut out = String::new();
        m.render(&mut out);
        for name in FAMILIES {
            assert!(
                out.contains(&format!("\n# HELP {name} ")) || out.starts_with(&format!("# HELP {name} ")),
                "{name}"
            );
            assert!(out.contains(&format!("# TYPE {name} ")), "{name}");
        }
        assert!(out.contains("# TYPE ci_runner_job_duration_seconds histogram\n"), "{out}");
        assert!(
            out.contains("ci_runner_forward_host_failures_total{port=\"5432\",proto=\"tcp\",host=\"db\\\"1\"} 0\n"),
            "{out}"
        );
    }

    #[test]
    fn counts_move() {
        let m = Metrics::new();
        m.job_started();
        m.job_started();
        m.job_completed(JobResult::Succeeded, Some(Duration::from_secs(42)));
        m.job_completed(JobResult::Failed, None);
        m.github_answer(ApiAnswer::Status(201));
        m.github_answer(ApiAnswer::Status(201));
        m.github_answer(ApiAnswer::Status(502));
        m.github_answer(ApiAnswer::Error);
        m.deregistration_failed();
        let f = m.forward(53, Proto::Udp, &["a".into(), "b".into()]);
        f.connection();
        f.host_failed(1);
        f.host_failed(7);
        let mut out = String::new();
        m.render(&mut out);
        for line in [
            "ci_runner_jobs_started_total 2",
            "ci_runner_jobs_completed_total{result=\"succeeded\"} 1",
            "ci_runner_jobs_completed_total{result=\"failed\"} 1",
            "ci_runner_jobs_completed_total{result=\"cancelled\"} 0",
            "ci_runner_job_duration_seconds_bucket{le=\"30\"} 0",
            "ci_runner_job_duration_seconds_bucket{le=\"60\"} 1",
            "ci_runner_job_duration_seconds_count 1",
            "ci_runner_github_api_requests_total{status=\"201\"} 2",
            "ci_runner_github_api_requests_total{status=\"502\"} 1",
            "ci_runner_github_api_requests_total{status=\"error\"} 1",
            "ci_runner_deregistration_failures_total 1",
            "ci_runner_forward_connections_total{port=\"53\",proto=\"udp\"} 1",
            "ci_runner_forward_host_failures_total{port=\"53\",proto=\"udp\",host=\"a\"} 0",
            "ci_runner_forward_host_failures_total{port=\"53\",proto=\"udp\",host=\"b\"} 1",
        ] {
            assert!(out.contains(&format!("{line}\n")), "no {line:?} in\n{out}");
        }
        // Statuses in order, "error" last.
        let at = |status: &str| out.find(&format!("{{status=\"{status}\"}}")).unwrap();
        assert!(at("201") < at("502") && at("502") < at("error"), "{out}");
    }

    #[test]
    fn a_forward_started_again_replaces_its_counters() {
        let m = Metrics::new();
        m.forward(22, Proto::Tcp, &["a".into()]).connection();
        m.forward(22, Proto::Udp, &["a".into()]);
        m.forward(22, Proto::Tcp, &["a".into()]);
        let mut out = String::new();
        m.render(&mut out);
        assert_eq!(out.matches("ci_runner_forward_connections_total{port=\"22\",proto=\"tcp\"}").count(), 1, "{out}");
        assert!(out.contains("ci_runner_forward_connections_total{port=\"22\",proto=\"tcp\"} 0\n"), "{out}");
        assert!(out.contains("ci_runner_forward_connections_total{port=\"22\",proto=\"udp\"} 0\n"), "{out}");
    }

    #[test]
    fn label_values_are_escaped() {
        assert_eq!(escape("plain"), "plain");
        assert_eq!(escape("a\\b\"c\nd"), "a\\\\b\\\"c\\nd");
        let mut out = String::new();
        family(&mut out, "x", "gauge", "back\\slash\nnewline");
        assert_eq!(out, "# HELP x back\\\\slash\\nnewline\n# TYPE x gauge\n");
    }
}
