//! The supervisor's state, served as JSON on `GET /health` and with [`crate::metrics`] as
//! Prometheus text on `GET /metrics`, and the `ci-runner status` client.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use crate::metrics::{escape, family, Metrics};

/// Where the supervisor is in the runner's life.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum State {
    Starting,
    Registering,
    Idle,
    Busy,
    Draining,
    Stopped,
    Failed,
}

impl State {
    /// `/health` answers 200 in these states: a draining runner is still doing its job.
    pub fn healthy(self) -> bool {
        !matches!(self, State::Stopped | State::Failed)
    }
}

#[derive(Debug, Clone, Serialize)]
pub struct Status {
    pub state: State,
    pub version: &'static str,
    pub runner_name: Option<String>,
    pub runner_id: Option<u64>,
    pub busy: bool,
    pub job: Option<String>,
    pub jobs_completed: u64,
    pub restarts: u32,
    /// Unix seconds of the last state change.
    pub since: u64,
    pub last_error: Option<String>,
    /// The hardware lock, when `RUNNER_RESOURCE_ID` is set.
    pub lock: Option<crate::lock::LockStatus>,
    /// The boot-time pre-warm, when `CI_STORAGE_HOST` is set.
    pub prewarm: Option<PrewarmStatus>,
    /// How long the boot's phases took.
    pub boot: BootTimes,
    /// How the drain ended, once it has.
    pub drain: Option<DrainOutcome>,
    /// The runner's scope (`owner/repo`, an organization or an enterprise) and labels.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub scope: Option<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub labels: Vec<String>,
    /// The pid of the runner's `run.sh` while it runs.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pid: Option<u32>,
    /// Unix seconds when the supervisor started this runner.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub started_at: Option<u64>,
    /// Added over the admin API (not one of `RUNNER_COUNT`).
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub added: bool,
    /// Every runner of the container, each with the fields above; at the top level the same
    /// fields describe the whole container (for one runner: that runner).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub runners: Vec<Status>,
    /// Runners that count for the container's state and busy share: those not yet removed
    /// over the admin API.
    pub runner_count: usize,
    pub busy_runners: usize,
    /// The key of a runner's entry in `runners` (internal).
    #[serde(skip)]
    pub(crate) key: u64,
    /// Removed over the admin API: still listed, no longer counted.
    #[serde(skip)]
    pub retired: bool,
}

impl Status {
    /// The share of the container's runners that run a job, in percent: busy/N. `None` while
    /// every runner is still starting (nothing to tell the autoscaler yet).
    pub fn busy_share(&self) -> Option<f64> {
        if self.runners.len() <= 1 && self.runner_count <= 1 {
            return single_busy_share(self);
        }
        let live: Vec<&Status> = self.runners.iter().filter(|r| !r.retired).collect();
        if live.is_empty() {
            return Some(0.0);
        }
        let shares: Vec<Option<f64>> = live.iter().map(|r| single_busy_share(r)).collect();
        if shares.iter().all(Option::is_none) {
            return None;
        }
        Some(shares.iter().map(|s| s.unwrap_or(0.0)).sum::<f64>() / live.len() as f64)
    }
}

/// One runner's busy share: 100 running a job, 0 listening or gone, `None` while it starts.
fn single_busy_share(s: &Status) -> Option<f64> {
    match s.state {
        State::Busy => Some(100.0),
        State::Idle | State::Stopped | State::Failed => Some(0.0),
        State::Draining => Some(if s.busy { 100.0 } else { 0.0 }),
        State::Starting | State::Registering if s.busy => Some(100.0),
        State::Starting | State::Registering => None,
    }
}

/// The container's state from its runners': alive ones first (a drain, then a job, then
/// listening, then the boot), then failed, then stopped.
fn aggregate_state(states: impl Iterator<Item = State>) -> Option<State> {
    let rank = |s: State| match s {
        State::Draining => 7,
        State::Busy => 6,
        State::Idle => 5,
        State::Registering => 4,
        State::Starting => 3,
        State::Failed => 2,
        State::Stopped => 1,
    };
    states.max_by_key(|s| rank(*s))
}

/// The top-level fields from `runners`: a copy of the one runner's, or a summary of many.
fn aggregate(top: &mut Status) {
    let live: Vec<Status> = top.runners.iter().filter(|r| !r.retired).cloned().collect();
    top.runner_count = live.len();
    top.busy_runners = live.iter().filter(|r| r.busy).count();
    if top.runners.len() == 1 && live.len() == 1 {
        let one = &live[0];
        let keep_runners = std::mem::take(&mut top.runners);
        let container = top.boot.clone();
        *top = Status { runners: keep_runners, runner_count: 1, busy_runners: usize::from(one.busy), ..one.clone() };
        top.boot.keep_container_phases(&container);
        top.key = 0;
        top.added = false;
        return;
    }
    let state = aggregate_state(live.iter().map(|r| r.state)).unwrap_or(State::Idle);
    if top.state != state {
        top.state = state;
        top.since = now();
    }
    top.busy = top.busy_runners > 0;
    top.job = None;
    top.runner_name = None;
    top.runner_id = None;
    top.pid = None;
    top.scope = None;
    top.labels = Vec::new();
    top.jobs_completed = top.runners.iter().map(|r| r.jobs_completed).sum();
    top.restarts = top.runners.iter().map(|r| r.restarts).sum();
    top.last_error = top.runners.iter().rev().find_map(|r| r.last_error.clone());
    top.lock = None;
    top.prewarm = None;
    // The container's boot is over when every runner's is.
    let all = |f: fn(&Status) -> Option<f64>| -> Option<f64> {
        let v: Vec<Option<f64>> = live.iter().map(f).collect();
        (!v.is_empty() && v.iter().all(Option::is_some)).then(|| v.iter().flatten().fold(0.0_f64, |a, b| a.max(*b)))
    };
    top.boot.registration_seconds = all(|r| r.boot.registration_seconds);
    top.boot.listening_seconds = all(|r| r.boot.listening_seconds);
    // Only the first runner of RUNNER_COUNT pre-warms; the container waits for the longest.
    top.boot.prewarm_seconds = live.iter().filter_map(|r| r.boot.prewarm_seconds).reduce(f64::max);
    let drains: Vec<Option<DrainOutcome>> = live.iter().map(|r| r.drain).collect();
    top.drain = if !drains.is_empty() && drains.iter().all(Option::is_some) {
        drains.iter().flatten().copied().max_by_key(|d| match d {
            DrainOutcome::Idle => 0,
            DrainOutcome::Finished => 1,
            DrainOutcome::Cancelled => 2,
        })
    } else {
        None
    };
}

/// Durations of the boot's phases (README "Boot sequence"), once each is over; a phase that
/// has nothing to do (no hooks, no `RUNNER_GROUP`, no sweep, no pre-warm) stays `null`.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTimes {
    /// The boot hooks run as root (`entrypoint.*.sh` in `ROOT_HOOKS_DIR`).
    pub root_hooks_seconds: Option<f64>,
    /// The boot hooks run as the runner user (`GUEST_HOOKS_DIR`), the pre-warm going on.
    pub guest_hooks_seconds: Option<f64>,
    /// `RUNNER_GROUP` looked up on GitHub.
    pub runner_group_seconds: Option<f64>,
    /// `RUNNER_SWEEP_OFFLINE_SEC`: the pool's stale runners removed.
    pub sweep_seconds: Option<f64>,
    /// The pre-warm, from its start to the work dir in place (or the cold start decided).
    pub prewarm_seconds: Option<f64>,
    /// The first successful registration: the token fetch and `config.sh`.
    pub registration_seconds: Option<f64>,
    /// From the supervisor's start to the runner's first `Listening for Jobs`.
    pub listening_seconds: Option<f64>,
}

impl BootTimes {
    /// The phases as `/metrics` names them, in boot order.
    pub fn phases(&self) -> [(&'static str, Option<f64>); 7] {
        [
            ("root_hooks", self.root_hooks_seconds),
            ("prewarm", self.prewarm_seconds),
            ("guest_hooks", self.guest_hooks_seconds),
            ("runner_group", self.runner_group_seconds),
            ("sweep", self.sweep_seconds),
            ("registration", self.registration_seconds),
            ("listening", self.listening_seconds),
        ]
    }

    /// The container's own phases (before any runner starts), kept from `from` when the one
    /// runner's entry is copied to the top.
    fn keep_container_phases(&mut self, from: &BootTimes) {
        self.root_hooks_seconds = from.root_hooks_seconds;
        self.guest_hooks_seconds = from.guest_hooks_seconds;
        self.runner_group_seconds = from.runner_group_seconds;
        self.sweep_seconds = from.sweep_seconds;
    }
}

/// How a drain ended: no job was running (`idle`), the job ran to its end (`finished`), or it
/// was cancelled at the drain's deadline or by a second signal (`cancelled`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum DrainOutcome {
    Idle,
    Finished,
    Cancelled,
}

impl DrainOutcome {
    pub const ALL: [DrainOutcome; 3] = [Self::Idle, Self::Finished, Self::Cancelled];

    /// `cancelled` wins: a job the drain waited for and then cancelled did not finish.
    pub fn of(waited_for_job: bool, cancelled: bool) -> Self {
        match (waited_for_job, cancelled) {
            (_, true) => Self::Cancelled,
            (true, false) => Self::Finished,
            (false, false) => Self::Idle,
        }
    }

    pub fn label(self) -> &'static str {
        match self {
            Self::Idle => "idle",
            Self::Finished => "finished",
            Self::Cancelled => "cancelled",
        }
    }
}

/// How the work dir was pre-warmed: `running`, `warm` (a slot was loaded), `cold` (no slot
/// young enough) or `failed` (the reason is in `error`; the runner started cold).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrewarmStatus {
    pub outcome: &'static str,
    pub slot: Option<String>,
    /// Entries other than directories made: so far while `running`, then in all.
    pub files: u64,
    /// Bytes of files written: so far while `running`, then in all.
    pub bytes: u64,
    /// The slot's entries other than directories and bytes of files, counted as `files` and
    /// `bytes` are, once the storage host sent them.
    pub total_files: Option<u64>,
    pub total_bytes: Option<u64>,
    /// `bytes` per second over the load so far (then over the whole load).
    pub rate_bytes_per_sec: Option<f64>,
    /// The time left at that pace, while `running` and once the totals are known.
    pub eta_seconds: Option<f64>,
    /// Bytes received from the storage host (the listing and the archive's framing included).
    pub received_bytes: u64,
    pub seconds: f64,
    pub error: Option<String>,
    /// The load's live counters while it runs, read at each request.
    #[serde(skip)]
    pub live: Option<LivePrewarm>,
}

/// A running pre-warm's counters and start.
#[derive(Debug, Clone)]
pub struct LivePrewarm {
    pub progress: Arc<crate::prewarm::Progress>,
    pub started: Instant,
}

impl PrewarmStatus {
    /// A pre-warm that just started, counting in `progress`.
    pub fn running(progress: Arc<crate::prewarm::Progress>, started: Instant) -> Self {
        PrewarmStatus { outcome: "running", live: Some(LivePrewarm { progress, started }), ..Default::default() }
    }

    /// While `running`: the counters as they are now.
    fn refresh(&mut self) {
        let Some(live) = self.live.as_ref().filter(|_| self.outcome == "running") else { return };
        let snap = live.progress.snapshot();
        let elapsed = live.started.elapsed();
        self.files = snap.files;
        self.bytes = snap.bytes;
        (self.total_files, self.total_bytes) = snap.totals.unzip();
        self.rate_bytes_per_sec = Some(snap.rate(elapsed).round());
        self.eta_seconds = snap.eta(elapsed).map(|d| (d.as_secs_f64() * 10.0).round() / 10.0);
        self.seconds = elapsed.as_secs_f64();
    }
}

impl Status {
    /// A copy with every running pre-warm's counters read now.
    pub fn live(&self) -> Status {
        let mut s = self.clone();
        for p in std::iter::once(&mut s.prewarm).chain(s.runners.iter_mut().map(|r| &mut r.prewarm)).flatten() {
            p.refresh();
        }
        s
    }
}

pub fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Default for Status {
    fn default() -> Self {
        Self {
            state: State::Starting,
            version: env!("CARGO_PKG_VERSION"),
            runner_name: None,
            runner_id: None,
            busy: false,
            job: None,
            jobs_completed: 0,
            restarts: 0,
            since: now(),
            last_error: None,
            lock: None,
            prewarm: None,
            boot: BootTimes::default(),
            drain: None,
            scope: None,
            labels: Vec::new(),
            pid: None,
            started_at: None,
            added: false,
            runners: Vec::new(),
            runner_count: 0,
            busy_runners: 0,
            key: 0,
            retired: false,
        }
    }
}

/// The writer side: the container's (held by main and the boot) or one runner's (held by its
/// supervisor), which writes that runner's entry and then the container's summary.
#[derive(Clone)]
pub struct StatusHandle {
    tx: watch::Sender<Status>,
    /// The runner's key in `runners`; `None` for the container's handle.
    runner: Option<u64>,
}

impl StatusHandle {
    pub fn new() -> (Self, watch::Receiver<Status>) {
        let (tx, rx) = watch::channel(Status::default());
        (Self { tx, runner: None }, rx)
    }

    /// A handle for a new runner's entry, listed from now on.
    pub fn add_runner(&self, init: impl FnOnce(&mut Status)) -> StatusHandle {
        let mut key = 0;
        self.tx.send_modify(|top| {
            key = top.runners.iter().map(|r| r.key).max().unwrap_or(0) + 1;
            let mut entry = Status { key, started_at: Some(now()), ..Status::default() };
            init(&mut entry);
            top.runners.push(entry);
            aggregate(top);
        });
        StatusHandle { tx: self.tx.clone(), runner: Some(key) }
    }

    pub fn set_state(&self, state: State) {
        self.update(|s| {
            if s.state != state {
                s.state = state;
                s.since = now();
            }
        });
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        match self.runner {
            None => self.tx.send_modify(f),
            Some(key) => self.tx.send_modify(|top| {
                if let Some(entry) = top.runners.iter_mut().find(|r| r.key == key) {
                    f(entry);
                }
                aggregate(top);
            }),
        }
    }

    /// This handle's view: the runner's entry, or the container's summary.
    pub fn get(&self) -> Status {
        let top = self.tx.borrow();
        match self.runner {
            None => top.clone(),
            Some(key) => top.runners.iter().find(|r| r.key == key).cloned().unwrap_or_default(),
        }
    }
}

async fn health(AxumState(rx): AxumState<watch::Receiver<Status>>) -> impl IntoResponse {
    let status = rx.borrow().live();
    let code = if status.state.healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status))
}

/// Prometheus text exposition (format 0.0.4) of the status and the counters in `m`.
pub fn render_metrics(s: &Status, m: &Metrics) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let states =
        [State::Starting, State::Registering, State::Idle, State::Busy, State::Draining, State::Stopped, State::Failed];
    family(&mut out, "ci_runner_state", "gauge", "The supervisor's state (1 for the current one).");
    for st in states {
        let name = serde_json::to_value(st).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let _ = writeln!(out, "ci_runner_state{{state=\"{name}\"}} {}", u8::from(s.state == st));
    }
    family(&mut out, "ci_runner_busy", "gauge", "Whether a job runs now (on any of the container's runners).");
    let _ = writeln!(out, "ci_runner_busy {}", u8::from(s.busy));
    family(
        &mut out,
        "ci_runner_runners",
        "gauge",
        "The container's runners (RUNNER_COUNT and those added over the admin API, not those removed) by state.",
    );
    for st in states {
        let name = serde_json::to_value(st).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let n = s.runners.iter().filter(|r| !r.retired && r.state == st).count();
        let _ = writeln!(out, "ci_runner_runners{{state=\"{name}\"}} {n}");
    }
    family(&mut out, "ci_runner_restarts_total", "counter", "Restarts of run.sh.");
    let _ = writeln!(out, "ci_runner_restarts_total {}", s.restarts);
    family(
        &mut out,
        "ci_runner_boot_phase_seconds",
        "gauge",
        "How long each boot phase took, once over (none for a phase with nothing to do): root_hooks and \
         guest_hooks (the boot hooks), prewarm (loading the work dir), runner_group (RUNNER_GROUP looked \
         up), sweep (stale runners removed), registration (token and config.sh, the first that \
         succeeded), listening (from the supervisor's start to the runner's first \"Listening for Jobs\").",
    );
    for (phase, seconds) in s.boot.phases() {
        if let Some(seconds) = seconds {
            let _ = writeln!(out, "ci_runner_boot_phase_seconds{{phase=\"{phase}\"}} {seconds:.3}");
        }
    }
    family(
        &mut out,
        "ci_runner_drain_outcome",
        "gauge",
        "How the drain ended (1 for the outcome; no sample before): idle (no job), finished (the job \
         ran to its end), cancelled (at the drain's deadline or a second signal).",
    );
    if let Some(drain) = s.drain {
        for o in DrainOutcome::ALL {
            let _ = writeln!(out, "ci_runner_drain_outcome{{outcome=\"{}\"}} {}", o.label(), u8::from(drain == o));
        }
    }
    if let Some(lock) = &s.lock {
        let r = escape(&lock.resource);
        family(&mut out, "ci_runner_lock_state", "gauge", "The hardware lock's state (1 for the current one).");
        for st in ["free", "waiting", "holding"] {
            let _ =
                writeln!(out, "ci_runner_lock_state{{resource=\"{r}\",state=\"{st}\"}} {}", u8::from(lock.state == st));
        }
        family(&mut out, "ci_runner_lock_state_since_seconds", "gauge", "Unix time the lock's state began.");
        let _ = writeln!(out, "ci_runner_lock_state_since_seconds{{resource=\"{r}\"}} {}", lock.since.unwrap_or(0));
    }
    if let Some(p) = &s.prewarm {
        family(&mut out, "ci_runner_prewarm_outcome", "gauge", "How the work dir was pre-warmed (1 for the outcome).");
        for o in ["running", "warm", "cold", "failed"] {
            let _ = writeln!(out, "ci_runner_prewarm_outcome{{outcome=\"{o}\"}} {}", u8::from(p.outcome == o));
        }
        family(&mut out, "ci_runner_prewarm_seconds", "gauge", "How long the pre-warm took.");
        let _ = writeln!(out, "ci_runner_prewarm_seconds {:.3}", p.seconds);
        family(&mut out, "ci_runner_prewarm_bytes", "gauge", "Bytes of the slot's archive received.");
        let _ = writeln!(out, "ci_runner_prewarm_bytes {}", p.received_bytes);
        family(
            &mut out,
            "ci_runner_prewarm_files",
            "gauge",
            "Entries other than directories loaded (so far, while running), and the slot's total once known.",
        );
        let _ = writeln!(out, "ci_runner_prewarm_files{{of=\"done\"}} {}", p.files);
        if let Some(t) = p.total_files {
            let _ = writeln!(out, "ci_runner_prewarm_files{{of=\"slot\"}} {t}");
        }
        family(
            &mut out,
            "ci_runner_prewarm_file_bytes",
            "gauge",
            "Bytes of files written (so far, while running), and the slot's total once known.",
        );
        let _ = writeln!(out, "ci_runner_prewarm_file_bytes{{of=\"done\"}} {}", p.bytes);
        if let Some(t) = p.total_bytes {
            let _ = writeln!(out, "ci_runner_prewarm_file_bytes{{of=\"slot\"}} {t}");
        }
    }
    m.render(&mut out);
    out
}

async fn metrics(AxumState(rx): AxumState<watch::Receiver<Status>>) -> impl IntoResponse {
    let body = render_metrics(&rx.borrow().live(), crate::metrics::global());
    ([(axum::http::header::CONTENT_TYPE, "text/plain; version=0.0.4")], body)
}

/// Binds `addr` now (so a bad or busy address fails the start) and serves until `cancel`.
/// Returns the bound address (port 0 picks a free port).
pub async fn serve(
    addr: SocketAddr,
    rx: watch::Receiver<Status>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new().route("/health", get(health)).route("/metrics", get(metrics)).with_state(rx);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
    });
    Ok(bound)
}

/// The address to connect to for a listening address (`0.0.0.0` → loopback).
pub fn connect_addr(addr: SocketAddr) -> SocketAddr {
    match addr.ip() {
        IpAddr::V4(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V4(Ipv4Addr::LOCALHOST), addr.port()),
        IpAddr::V6(ip) if ip.is_unspecified() => SocketAddr::new(IpAddr::V6(Ipv6Addr::LOCALHOST), addr.port()),
        _ => addr,
    }
}

/// `ci-runner status`: prints `/health` and returns whether it answered 200.
pub fn query(addr: SocketAddr) -> Result<(bool, String), std::io::Error> {
    let timeout = Duration::from_secs(3);
    let mut stream = TcpStream::connect_timeout(&connect_addr(addr), timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.write_all(b"GET /health HTTP/1.0\r\nHost: localhost\r\nConnection: close\r\n\r\n")?;
    let mut response = String::new();
    stream.read_to_string(&mut response)?;
    let ok = response.split_whitespace().nth(1) == Some("200");
    let body = response.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or_default();
    Ok((ok, body))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn draining_is_healthy_failed_is_not() {
        assert!(State::Draining.healthy() && State::Busy.healthy() && State::Starting.healthy());
        assert!(!State::Failed.healthy() && !State::Stopped.healthy());
    }

    #[test]
    fn metrics_show_the_state_and_the_lock() {
        let mut s = Status { state: State::Busy, busy: true, jobs_completed: 3, ..Status::default() };
        s.lock = Some(crate::lock::LockStatus {
            resource: "board \"7\"\\a".into(),
            state: "waiting",
            since: Some(7),
            holder: None,
        });
        let text = render_metrics(&s, &Metrics::new());
        assert!(text.contains("ci_runner_state{state=\"busy\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_state{state=\"idle\"} 0\n"), "{text}");
        assert!(text.contains("ci_runner_busy 1\n"), "{text}");
        assert!(
            text.contains("ci_runner_lock_state{resource=\"board \\\"7\\\"\\\\a\",state=\"waiting\"} 1\n"),
            "{text}"
        );
        assert!(text.contains("ci_runner_lock_state_since_seconds{resource=\"board \\\"7\\\"\\\\a\"} 7\n"), "{text}");
        assert!(!render_metrics(&Status::default(), &Metrics::new()).contains("lock"));
    }

    /// The names of the families in `text`, from their `# TYPE` lines, each checked to follow
    /// its `# HELP` line.
    fn families(text: &str) -> Vec<String> {
        let lines: Vec<&str> = text.lines().collect();
        let mut names = Vec::new();
        for (i, line) in lines.iter().enumerate() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                let name = rest.split(' ').next().unwrap();
                assert!(
                    i > 0 && lines[i - 1].starts_with(&format!("# HELP {name} ")),
                    "no HELP before the TYPE of {name}"
                );
                names.push(name.to_string());
            }
        }
        names
    }

    #[test]
    fn every_family_is_there_with_help_and_type_and_only_once() {
        let mut s = Status {
            prewarm: Some(PrewarmStatus { outcome: "warm", seconds: 1.5, bytes: 10, ..Default::default() }),
            ..Status::default()
        };
        s.lock = Some(crate::lock::LockStatus { resource: "b".into(), state: "free", since: None, holder: None });
        let metrics = Metrics::new();
        metrics.forward(1, crate::forward::Proto::Tcp, &["h".into()]);
        let text = render_metrics(&s, &metrics);
        let names = families(&text);
        for name in [
            "ci_runner_state",
            "ci_runner_busy",
            "ci_runner_runners",
            "ci_runner_restarts_total",
            "ci_runner_boot_phase_seconds",
            "ci_runner_drain_outcome",
            "ci_runner_lock_state",
            "ci_runner_lock_state_since_seconds",
            "ci_runner_prewarm_outcome",
            "ci_runner_prewarm_seconds",
            "ci_runner_prewarm_bytes",
            "ci_runner_prewarm_files",
            "ci_runner_prewarm_file_bytes",
        ]
        .into_iter()
        .chain(crate::metrics::FAMILIES)
        {
            assert_eq!(names.iter().filter(|n| *n == name).count(), 1, "{name} in\n{text}");
        }
        // Every sample belongs to the family whose TYPE came last.
        let mut current = String::new();
        for line in text.lines() {
            if let Some(rest) = line.strip_prefix("# TYPE ") {
                current = rest.split(' ').next().unwrap().to_string();
            } else if !line.starts_with('#') {
                assert!(line.starts_with(&current), "{line:?} outside its family ({current})");
            }
        }
    }

    #[test]
    fn boot_phases_appear_as_they_end() {
        let mut s = Status::default();
        let none = render_metrics(&s, &Metrics::new());
        assert!(!none.contains("ci_runner_boot_phase_seconds{"), "{none}");
        s.prewarm = Some(PrewarmStatus { outcome: "running", ..Default::default() });
        s.boot.registration_seconds = Some(2.25);
        let some = render_metrics(&s, &Metrics::new());
        assert!(some.contains("ci_runner_boot_phase_seconds{phase=\"registration\"} 2.250\n"), "{some}");
        assert!(!some.contains("phase=\"prewarm\"") && !some.contains("phase=\"listening\""), "{some}");
        s.prewarm = Some(PrewarmStatus { outcome: "cold", seconds: 0.5, ..Default::default() });
        s.boot.prewarm_seconds = Some(0.5);
        s.boot.listening_seconds = Some(4.0);
        s.boot.root_hooks_seconds = Some(0.125);
        s.boot.guest_hooks_seconds = Some(1.0);
        let all = render_metrics(&s, &Metrics::new());
        assert!(all.contains("ci_runner_boot_phase_seconds{phase=\"prewarm\"} 0.500\n"), "{all}");
        assert!(all.contains("ci_runner_boot_phase_seconds{phase=\"listening\"} 4.000\n"), "{all}");
        assert!(all.contains("ci_runner_boot_phase_seconds{phase=\"root_hooks\"} 0.125\n"), "{all}");
        assert!(all.contains("ci_runner_boot_phase_seconds{phase=\"guest_hooks\"} 1.000\n"), "{all}");
        // Never a sample for a phase that had nothing to do.
        assert!(!all.contains("phase=\"sweep\"") && !all.contains("phase=\"runner_group\""), "{all}");
        // The names another engineer's CloudWatch code reads.
        let json = serde_json::to_value(&s).unwrap();
        assert_eq!(json["boot"]["registration_seconds"], 2.25);
        assert_eq!(json["boot"]["listening_seconds"], 4.0);
        assert_eq!(json["boot"]["root_hooks_seconds"], 0.125);
        assert_eq!(json["boot"]["sweep_seconds"], serde_json::Value::Null);
    }

    #[test]
    fn the_container_phases_survive_the_one_runner_copied_to_the_top() {
        let (top, rx) = StatusHandle::new();
        top.update(|s| s.boot.root_hooks_seconds = Some(0.25));
        let a = top.add_runner(|_| {});
        top.update(|s| s.boot.guest_hooks_seconds = Some(0.5));
        a.update(|s| s.boot.registration_seconds = Some(1.0));
        a.set_state(State::Idle);
        let b = rx.borrow().boot.clone();
        // Never lost when the runner's entry is copied over the container's.
        assert_eq!(
            (b.root_hooks_seconds, b.guest_hooks_seconds, b.registration_seconds),
            (Some(0.25), Some(0.5), Some(1.0))
        );
        let c = top.add_runner(|_| {});
        c.update(|s| s.boot.prewarm_seconds = None);
        let b = rx.borrow().boot.clone();
        assert_eq!((b.root_hooks_seconds, b.registration_seconds), (Some(0.25), None), "a runner still booting");
    }

    #[test]
    fn health_reads_a_running_prewarm_live_and_never_goes_back() {
        let progress = Arc::new(crate::prewarm::Progress::default());
        let (top, rx) = StatusHandle::new();
        let a = top.add_runner(|_| {});
        a.update(|s| s.prewarm = Some(PrewarmStatus::running(progress.clone(), Instant::now())));
        let before = rx.borrow().live();
        let p = before.prewarm.as_ref().unwrap();
        assert_eq!((p.files, p.total_files, p.eta_seconds), (0, None, None), "{p:?}");
        progress.test_advance(3, 4096, Some((10, 8192)));
        let after = rx.borrow().live();
        let p = after.prewarm.as_ref().unwrap();
        assert_eq!((p.files, p.bytes, p.total_files, p.total_bytes), (3, 4096, Some(10), Some(8192)), "{p:?}");
        assert_eq!(after.runners[0].prewarm.as_ref().unwrap().files, 3, "the runner's entry is live too");
        let json = serde_json::to_value(&after).unwrap();
        assert_eq!(json["prewarm"]["total_files"], 10, "{json}");
        assert!(json["prewarm"].get("live").is_none(), "{json}");
        // Once over, the status is what the load ended with, not the counters.
        a.update(|s| s.prewarm = Some(PrewarmStatus { outcome: "warm", files: 10, ..Default::default() }));
        progress.test_advance(1, 0, None);
        assert_eq!(rx.borrow().live().prewarm.unwrap().files, 10);
    }

    #[test]
    fn drain_outcome_is_one_gauge_set_once_the_drain_ended() {
        assert_eq!(DrainOutcome::of(false, false), DrainOutcome::Idle);
        assert_eq!(DrainOutcome::of(true, false), DrainOutcome::Finished);
        assert_eq!(DrainOutcome::of(true, true), DrainOutcome::Cancelled);
        assert_eq!(DrainOutcome::of(false, true), DrainOutcome::Cancelled);
        let mut s = Status::default();
        assert!(!render_metrics(&s, &Metrics::new()).contains("ci_runner_drain_outcome{"));
        s.drain = Some(DrainOutcome::Finished);
        let text = render_metrics(&s, &Metrics::new());
        assert!(text.contains("ci_runner_drain_outcome{outcome=\"finished\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_drain_outcome{outcome=\"idle\"} 0\n"), "{text}");
        assert!(text.contains("ci_runner_drain_outcome{outcome=\"cancelled\"} 0\n"), "{text}");
        assert_eq!(serde_json::to_value(&s).unwrap()["drain"], "finished");
    }

    #[test]
    fn one_runner_is_the_container_and_many_sum_up_to_busy_over_n() {
        let (top, rx) = StatusHandle::new();
        assert_eq!(rx.borrow().busy_share(), None, "nothing to say while booting");
        let a = top.add_runner(|s| s.runner_name = Some("a".into()));
        a.update(|s| s.busy = true);
        a.set_state(State::Busy);
        let h = rx.borrow().clone();
        assert_eq!((h.state, h.runner_name.as_deref(), h.busy_share()), (State::Busy, Some("a"), Some(100.0)));
        assert_eq!((h.runner_count, h.busy_runners, h.runners.len()), (1, 1, 1));
        let b = top.add_runner(|s| s.runner_name = Some("b".into()));
        let c = top.add_runner(|s| s.runner_name = Some("c".into()));
        b.set_state(State::Idle);
        c.set_state(State::Idle);
        let h = rx.borrow().clone();
        assert_eq!((h.state, h.runner_name.as_deref(), h.busy), (State::Busy, None, true));
        assert_eq!((h.runner_count, h.busy_runners), (3, 1));
        assert!((h.busy_share().unwrap() - 100.0 / 3.0).abs() < 1e-9, "{:?}", h.busy_share());
        assert_eq!(c.get().runner_name.as_deref(), Some("c"), "a runner's handle reads its own entry");
        c.update(|s| s.retired = true);
        assert_eq!(rx.borrow().busy_share(), Some(50.0), "a removed runner no longer counts");
        b.set_state(State::Draining);
        assert_eq!(rx.borrow().state, State::Draining);
        let text = render_metrics(&rx.borrow(), &Metrics::new());
        assert!(text.contains("ci_runner_runners{state=\"busy\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_runners{state=\"draining\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_runners{state=\"idle\"} 0\n"), "the removed one is not counted: {text}");
    }

    #[tokio::test]
    async fn health_answers_with_the_state() {
        let (handle, rx) = StatusHandle::new();
        let cancel = CancellationToken::new();
        let addr = serve("127.0.0.1:0".parse().unwrap(), rx, cancel.clone()).await.unwrap();
        handle.set_state(State::Busy);
        let (ok, body) = tokio::task::spawn_blocking(move || query(addr).unwrap()).await.unwrap();
        assert!(ok);
        assert!(body.contains("\"state\":\"busy\""), "{body}");
        handle.set_state(State::Failed);
        let (ok, body) = tokio::task::spawn_blocking(move || query(addr).unwrap()).await.unwrap();
        assert!(!ok, "{body}");
        cancel.cancel();
    }
}
