//! The supervisor's state, served as JSON on `GET /health`, and the `ci-runner status` client.

use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr, TcpStream};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use axum::extract::State as AxumState;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::routing::get;
use axum::{Json, Router};
use serde::Serialize;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

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
    pub boot: BootTimes,
}

/// How long the boot's phases took.
#[derive(Debug, Clone, Default, Serialize)]
pub struct BootTimes {
    pub registration_seconds: Option<f64>,
    pub listening_seconds: Option<f64>,
}

/// How the work dir was pre-warmed: `running`, `warm` (a slot was loaded), `cold` (no slot
/// young enough) or `failed` (the reason is in `error`; the runner started cold).
#[derive(Debug, Clone, Default, Serialize)]
pub struct PrewarmStatus {
    pub outcome: &'static str,
    pub slot: Option<String>,
    pub files: u64,
    pub bytes: u64,
    pub seconds: f64,
    pub error: Option<String>,
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
        }
    }
}

/// The writer side, owned by the supervisor.
#[derive(Clone)]
pub struct StatusHandle(watch::Sender<Status>);

impl StatusHandle {
    pub fn new() -> (Self, watch::Receiver<Status>) {
        let (tx, rx) = watch::channel(Status::default());
        (Self(tx), rx)
    }

    pub fn set_state(&self, state: State) {
        self.0.send_modify(|s| {
            if s.state != state {
                s.state = state;
                s.since = now();
            }
        });
    }

    pub fn update(&self, f: impl FnOnce(&mut Status)) {
        self.0.send_modify(f);
    }

    pub fn get(&self) -> Status {
        self.0.borrow().clone()
    }
}

async fn health(AxumState(rx): AxumState<watch::Receiver<Status>>) -> impl IntoResponse {
    let status = rx.borrow().clone();
    let code = if status.state.healthy() { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    (code, Json(status))
}

/// Prometheus text exposition of the status (issue #4 adds the job and API counters).
pub fn render_metrics(s: &Status) -> String {
    use std::fmt::Write as _;
    let mut out = String::new();
    let states =
        [State::Starting, State::Registering, State::Idle, State::Busy, State::Draining, State::Stopped, State::Failed];
    out.push_str(
        "# HELP ci_runner_state The supervisor's state (1 for the current one).\n# TYPE ci_runner_state gauge\n",
    );
    for st in states {
        let name = serde_json::to_value(st).ok().and_then(|v| v.as_str().map(str::to_string)).unwrap_or_default();
        let _ = writeln!(out, "ci_runner_state{{state=\"{name}\"}} {}", u8::from(s.state == st));
    }
    out.push_str("# HELP ci_runner_busy Whether a job runs now.\n# TYPE ci_runner_busy gauge\n");
    let _ = writeln!(out, "ci_runner_busy {}", u8::from(s.busy));
    out.push_str("# HELP ci_runner_jobs_completed_total Jobs this supervisor saw complete.\n# TYPE ci_runner_jobs_completed_total counter\n");
    let _ = writeln!(out, "ci_runner_jobs_completed_total {}", s.jobs_completed);
    out.push_str("# HELP ci_runner_restarts_total Restarts of run.sh.\n# TYPE ci_runner_restarts_total counter\n");
    let _ = writeln!(out, "ci_runner_restarts_total {}", s.restarts);
    if let Some(lock) = &s.lock {
        let r = lock.resource.replace('\\', "\\\\").replace('"', "\\\"");
        out.push_str("# HELP ci_runner_lock_state The hardware lock's state (1 for the current one).\n# TYPE ci_runner_lock_state gauge\n");
        for st in ["free", "waiting", "holding"] {
            let _ =
                writeln!(out, "ci_runner_lock_state{{resource=\"{r}\",state=\"{st}\"}} {}", u8::from(lock.state == st));
        }
        out.push_str("# HELP ci_runner_lock_state_since_seconds Unix time the lock's state began.\n# TYPE ci_runner_lock_state_since_seconds gauge\n");
        let _ = writeln!(out, "ci_runner_lock_state_since_seconds{{resource=\"{r}\"}} {}", lock.since.unwrap_or(0));
    }
    if let Some(p) = &s.prewarm {
        out.push_str("# HELP ci_runner_prewarm_outcome How the work dir was pre-warmed (1 for the outcome).\n# TYPE ci_runner_prewarm_outcome gauge\n");
        for o in ["running", "warm", "cold", "failed"] {
            let _ = writeln!(out, "ci_runner_prewarm_outcome{{outcome=\"{o}\"}} {}", u8::from(p.outcome == o));
        }
        out.push_str(
            "# HELP ci_runner_prewarm_seconds How long the pre-warm took.\n# TYPE ci_runner_prewarm_seconds gauge\n",
        );
        let _ = writeln!(out, "ci_runner_prewarm_seconds {:.3}", p.seconds);
        out.push_str("# HELP ci_runner_prewarm_bytes Bytes of the slot's archive received.\n# TYPE ci_runner_prewarm_bytes gauge\n");
        let _ = writeln!(out, "ci_runner_prewarm_bytes {}", p.bytes);
    }
    out
}

async fn metrics(AxumState(rx): AxumState<watch::Receiver<Status>>) -> impl IntoResponse {
    let body = render_metrics(&rx.borrow());
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
        s.lock =
            Some(crate::lock::LockStatus { resource: "board".into(), state: "waiting", since: Some(7), holder: None });
        let text = render_metrics(&s);
        assert!(text.contains("ci_runner_state{state=\"busy\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_state{state=\"idle\"} 0\n"), "{text}");
        assert!(text.contains("ci_runner_jobs_completed_total 3\n"), "{text}");
        assert!(text.contains("ci_runner_lock_state{resource=\"board\",state=\"waiting\"} 1\n"), "{text}");
        assert!(text.contains("ci_runner_lock_state_since_seconds{resource=\"board\"} 7\n"), "{text}");
        assert!(!render_metrics(&Status::default()).contains("lock"));
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
