//! The HTTP side: `POST /webhook` (the single pool), `POST /webhook/{id}` (the pools of
//! `CONTROLLER_CONFIG`), `GET /health` and `GET /metrics`.
//!
//! Each delivery is bounded in size (413), verified against its pool's secret (401 for a
//! missing or wrong `X-Hub-Signature-256`) and then parsed; anything that is not a job for
//! this pool is acknowledged with a 2xx and the reason, so GitHub does not retry it.

use std::collections::HashMap;
use std::fmt::Write as _;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::rejection::BytesRejection;
use axum::extract::{DefaultBodyLimit, Path, State};
use axum::http::{HeaderMap, StatusCode};
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use tokio::sync::oneshot;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use super::pool::{Admission, Event};
use super::service::{Command, PoolHandle};
use super::webhook::{self, Delivery, JobAction};
use crate::config::SINGLE_POOL_ID;
use crate::metrics::{escape, family};

/// Outcomes of a delivery, the label of `ci_runner_controller_webhook_deliveries_total`.
pub const OUTCOMES: [&str; 13] = [
    "queued",
    "waiting",
    "duplicate",
    "job_event",
    "unserved_labels",
    "other_scope",
    "ignored_event",
    "ping",
    "missing_signature",
    "bad_signature",
    "too_large",
    "bad_payload",
    "bad_content_type",
];

struct Shared {
    pools: HashMap<String, PoolHandle>,
    order: Vec<String>,
    deliveries: [AtomicU64; OUTCOMES.len()],
    unknown_pool: AtomicU64,
}

impl Shared {
    fn count(&self, outcome: &str) {
        if let Some(i) = OUTCOMES.iter().position(|o| *o == outcome) {
            self.deliveries[i].fetch_add(1, Ordering::Relaxed);
        }
    }
}

type AppState = Arc<Shared>;

pub async fn serve(
    addr: SocketAddr,
    pools: Vec<PoolHandle>,
    max_body: usize,
    cancel: CancellationToken,
) -> std::io::Result<(SocketAddr, tokio::task::JoinHandle<()>)> {
    let listener = tokio::net::TcpListener::bind(addr).await?;
    let bound = listener.local_addr()?;
    let shared = Arc::new(Shared {
        order: pools.iter().map(|p| p.id.clone()).collect(),
        pools: pools.into_iter().map(|p| (p.id.clone(), p)).collect(),
        deliveries: std::array::from_fn(|_| AtomicU64::new(0)),
        unknown_pool: AtomicU64::new(0),
    });
    let app = Router::new()
        .route("/webhook", post(single))
        .route("/webhook/{id}", post(by_id))
        .route("/health", get(health))
        .route("/metrics", get(metrics))
        .layer(DefaultBodyLimit::max(max_body))
        .with_state(shared);
    let task = tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
    });
    Ok((bound, task))
}

fn reply(status: StatusCode, outcome: &str, detail: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({"outcome": outcome, "detail": detail.into()}))).into_response()
}

async fn single(State(s): State<AppState>, headers: HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    deliver(&s, SINGLE_POOL_ID, &headers, body).await
}

async fn by_id(
    State(s): State<AppState>,
    Path(id): Path<String>,
    headers: HeaderMap,
    body: Result<Bytes, BytesRejection>,
) -> Response {
    if id == SINGLE_POOL_ID {
        // `default` is `POST /webhook`'s: one URL per pool.
        s.unknown_pool.fetch_add(1, Ordering::Relaxed);
        return reply(StatusCode::NOT_FOUND, "unknown_pool", "no such pool");
    }
    deliver(&s, &id, &headers, body).await
}

async fn deliver(s: &Shared, id: &str, headers: &HeaderMap, body: Result<Bytes, BytesRejection>) -> Response {
    let received = Instant::now();
    let Some(pool) = s.pools.get(id) else {
        s.unknown_pool.fetch_add(1, Ordering::Relaxed);
        return reply(StatusCode::NOT_FOUND, "unknown_pool", "no such pool");
    };
    let body = match body {
        Ok(b) => b,
        Err(rejection) => {
            let status = rejection.status();
            let outcome = if status == StatusCode::PAYLOAD_TOO_LARGE { "too_large" } else { "bad_payload" };
            s.count(outcome);
            warn!(pool = %id, status = status.as_u16(), "Delivery refused: its body could not be read within the size limit.");
            return reply(status, outcome, rejection.body_text());
        }
    };
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok());
    let delivery_id = header("x-github-delivery").unwrap_or("-").to_string();
    if let Err(e) = webhook::verify(pool.secret.expose().as_bytes(), &body, header("x-hub-signature-256")) {
        let outcome = if e == webhook::SignatureError::Missing { "missing_signature" } else { "bad_signature" };
        s.count(outcome);
        warn!(pool = %id, delivery = %delivery_id, error = %e, "Delivery refused.");
        return reply(StatusCode::UNAUTHORIZED, outcome, e.to_string());
    }
    let body = match webhook::payload(header("content-type"), &body) {
        Ok(b) => b,
        Err(e) => {
            let (status, outcome) = match e {
                webhook::BodyError::ContentType(_) => (StatusCode::UNSUPPORTED_MEDIA_TYPE, "bad_content_type"),
                webhook::BodyError::NoPayload => (StatusCode::BAD_REQUEST, "bad_payload"),
            };
            s.count(outcome);
            warn!(pool = %id, delivery = %delivery_id, error = %e, "Delivery refused.");
            return reply(status, outcome, e.to_string());
        }
    };
    let delivery = match webhook::parse(header("x-github-event"), &body) {
        Ok(d) => d,
        Err(e) => {
            s.count("bad_payload");
            warn!(pool = %id, delivery = %delivery_id, error = %crate::error::chain(&e), "Delivery refused.");
            return reply(StatusCode::BAD_REQUEST, "bad_payload", e.to_string());
        }
    };
    let job = match delivery {
        Delivery::Ping => {
            s.count("ping");
            return reply(StatusCode::OK, "ping", "pong");
        }
        Delivery::Other(event) => {
            s.count("ignored_event");
            return reply(StatusCode::OK, "ignored_event", format!("event {event:?} is not workflow_job"));
        }
        Delivery::Job(job) => job,
    };
    if !webhook::in_scope(&pool.scope, &job.repository) {
        s.count("other_scope");
        return reply(StatusCode::OK, "other_scope", format!("{} is not in the pool's {}", job.repository, pool.scope));
    }
    match job.action {
        JobAction::Queued => {
            if !pool.labels.serves(&job.labels) {
                s.count("unserved_labels");
                info!(pool = %id, job_id = job.job_id, labels = ?job.labels, "Job not for this pool's runners.");
                return reply(StatusCode::OK, "unserved_labels", format!("labels {:?} are not all served", job.labels));
            }
            if job.held() {
                // Not remembered as seen: its release is the `queued` delivery that follows.
                s.count("waiting");
                info!(pool = %id, job_id = job.job_id, "Job waits for an approval; no runner until it is released.");
                return reply(StatusCode::OK, "waiting", format!("job {} waits for approval", job.job_id));
            }
            let (tx, rx) = oneshot::channel();
            if pool.tx.send(Command::Queued { job_id: job.job_id, received, reply: tx }).is_err() {
                return reply(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the controller is stopping");
            }
            match rx.await {
                Ok(Admission::Queued) => {
                    s.count("queued");
                    reply(StatusCode::ACCEPTED, "queued", format!("job {}", job.job_id))
                }
                Ok(Admission::Duplicate) => {
                    s.count("duplicate");
                    reply(StatusCode::OK, "duplicate", format!("job {} was delivered before", job.job_id))
                }
                Err(_) => reply(StatusCode::SERVICE_UNAVAILABLE, "stopping", "the controller is stopping"),
            }
        }
        JobAction::InProgress | JobAction::Completed => {
            let (job_id, runner_name) = (job.job_id, job.runner_name);
            let event = if job.action == JobAction::InProgress {
                Event::InProgress { job_id, runner_name }
            } else {
                Event::Completed { job_id, runner_name }
            };
            let _ = pool.tx.send(Command::Event(event));
            s.count("job_event");
            reply(StatusCode::OK, "job_event", format!("job {job_id}"))
        }
        JobAction::Other => {
            s.count("ignored_event");
            reply(StatusCode::OK, "ignored_event", "workflow_job action not acted on")
        }
    }
}

async fn health(State(s): State<AppState>) -> Response {
    let pools: Vec<serde_json::Value> = s
        .order
        .iter()
        .filter_map(|id| s.pools.get(id))
        .map(|p| {
            let st = p.stats.lock().unwrap_or_else(|e| e.into_inner()).clone();
            serde_json::json!({
                "id": p.id, "scope": p.scope.to_string(), "queued_jobs": st.waiting,
                "starting": st.starting, "idle": st.idle, "busy": st.busy, "draining": st.draining, "exited": st.exited,
                "containers": st.containers, "high_water": st.high_water,
                "starts": st.starts, "start_failures": st.start_failures, "removals": st.removals,
                "stops": st.stops, "adopted": st.adopted,
            })
        })
        .collect();
    Json(serde_json::json!({"status": "ok", "pools": pools})).into_response()
}

async fn metrics(State(s): State<AppState>) -> Response {
    let mut out = String::new();
    family(&mut out, "ci_runner_controller_webhook_deliveries_total", "counter", "Webhook deliveries by outcome.");
    for (i, o) in OUTCOMES.iter().enumerate() {
        let _ = writeln!(
            out,
            "ci_runner_controller_webhook_deliveries_total{{outcome=\"{o}\"}} {}",
            s.deliveries[i].load(Ordering::Relaxed)
        );
    }
    let _ = writeln!(
        out,
        "ci_runner_controller_webhook_deliveries_total{{outcome=\"unknown_pool\"}} {}",
        s.unknown_pool.load(Ordering::Relaxed)
    );
    let pools: Vec<(&PoolHandle, super::pool::Stats, super::service::Latency)> = s
        .order
        .iter()
        .filter_map(|id| s.pools.get(id))
        .map(|p| {
            (
                p,
                p.stats.lock().unwrap_or_else(|e| e.into_inner()).clone(),
                p.latency.lock().unwrap_or_else(|e| e.into_inner()).clone(),
            )
        })
        .collect();
    let gauge = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&super::pool::Stats) -> String| {
        family(out, name, "gauge", help);
        for (p, st, _) in &pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", escape(&p.id), f(st));
        }
    };
    gauge(&mut out, "ci_runner_controller_queued_jobs", "Jobs queued on GitHub that no runner has taken yet.", &|st| {
        st.waiting.to_string()
    });
    family(&mut out, "ci_runner_controller_containers", "gauge", "Runner containers by state.");
    for (p, st, _) in &pools {
        for (state, n) in [
            ("starting", st.starting),
            ("idle", st.idle),
            ("busy", st.busy),
            ("draining", st.draining),
            ("exited", st.exited),
        ] {
            let _ =
                writeln!(out, "ci_runner_controller_containers{{pool=\"{}\",state=\"{state}\"}} {n}", escape(&p.id));
        }
    }
    gauge(
        &mut out,
        "ci_runner_controller_containers_high_water",
        "The most runner containers that existed at once since the start.",
        &|st| st.high_water.to_string(),
    );
    let counter = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&super::pool::Stats) -> u64| {
        family(out, name, "counter", help);
        for (p, st, _) in &pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", escape(&p.id), f(st));
        }
    };
    counter(&mut out, "ci_runner_controller_starts_total", "Runner containers started.", &|st| st.starts);
    counter(
        &mut out,
        "ci_runner_controller_start_failures_total",
        "Runner starts that failed (JIT configuration or container).",
        &|st| st.start_failures,
    );
    counter(&mut out, "ci_runner_controller_removals_total", "Runner containers removed.", &|st| st.removals);
    counter(
        &mut out,
        "ci_runner_controller_stops_total",
        "Runner containers stopped to drain (past their lifetime, or idle and not needed).",
        &|st| st.stops,
    );
    counter(&mut out, "ci_runner_controller_adopted_total", "Containers of an earlier run adopted.", &|st| st.adopted);
    let reconcile = |out: &mut String, name: &str, help: &str, f: &dyn Fn(&super::reconcile::Counters) -> u64| {
        family(out, name, "counter", help);
        for (p, _, _) in &pools {
            let _ = writeln!(out, "{name}{{pool=\"{}\"}} {}", escape(&p.id), f(&p.reconcile));
        }
    };
    let load = |a: &AtomicU64| a.load(Ordering::Relaxed);
    reconcile(&mut out, "ci_runner_controller_reconcile_passes_total", "Listings of the queued jobs.", &|c| {
        load(&c.passes)
    });
    reconcile(
        &mut out,
        "ci_runner_controller_reconcile_failures_total",
        "Listings of the queued jobs that failed.",
        &|c| load(&c.failures),
    );
    reconcile(
        &mut out,
        "ci_runner_controller_reconcile_api_calls_total",
        "GitHub REST calls made by the reconciliation (runs and jobs listed; deliveries listed, read, redelivered).",
        &|c| load(&c.api_calls),
    );
    reconcile(
        &mut out,
        "ci_runner_controller_reconcile_redeliveries_total",
        "Failed webhook deliveries redelivered by the reconciliation of an organization's pool.",
        &|c| load(&c.redeliveries),
    );
    reconcile(
        &mut out,
        "ci_runner_controller_reconcile_jobs_found_total",
        "Queued jobs found by a listing that no delivery had brought.",
        &|c| load(&c.found),
    );
    family(
        &mut out,
        "ci_runner_controller_queue_wait_seconds",
        "summary",
        "Time from a job's queued delivery to its in_progress delivery.",
    );
    for (p, st, _) in &pools {
        let id = escape(&p.id);
        let _ = writeln!(out, "ci_runner_controller_queue_wait_seconds_sum{{pool=\"{id}\"}} {:.3}", st.queue_wait_sum);
        let _ = writeln!(out, "ci_runner_controller_queue_wait_seconds_count{{pool=\"{id}\"}} {}", st.queue_wait_count);
    }
    family(
        &mut out,
        "ci_runner_controller_start_seconds",
        "summary",
        "Time from a queued delivery to its runner container's start.",
    );
    for (p, _, l) in &pools {
        let id = escape(&p.id);
        let _ = writeln!(out, "ci_runner_controller_start_seconds_sum{{pool=\"{id}\"}} {:.3}", l.sum);
        let _ = writeln!(out, "ci_runner_controller_start_seconds_count{{pool=\"{id}\"}} {}", l.count);
    }
    crate::metrics::global().render(&mut out);
    ([("content-type", "text/plain; version=0.0.4")], out).into_response()
}
