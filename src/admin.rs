//! The admin API (README "Admin API"): list, add and remove the container's runners over HTTP,
//! JSON in and out, each request authenticated by the bearer token `ADMIN_TOKEN`.
//!
//! The token is compared as an HMAC tag under a key made at start, which `ring` verifies in
//! constant time; the comparison reveals neither the token's bytes nor its length.

use std::net::SocketAddr;

use axum::body::Bytes;
use axum::extract::{Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::{delete, get};
use axum::{Json, Router};
use serde::{Deserialize, Serialize};
use serde_json::json;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::sync::CancellationToken;

use crate::config::{self, AdminSettings};
use crate::runners::{validate_spec, AddError, Command, RemoveError, Spec};
use crate::status::Status;

/// Requests larger than this are refused (413) before they are parsed.
pub const MAX_BODY: usize = 64 * 1024;

#[derive(Clone)]
struct Api {
    key: ring::hmac::Key,
    tag: ring::hmac::Tag,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
}

/// One runner as `GET /runners` lists it.
#[derive(Debug, Serialize)]
pub struct RunnerView {
    pub name: Option<String>,
    pub scope: Option<String>,
    pub labels: Vec<String>,
    pub state: crate::status::State,
    pub busy: bool,
    pub job: Option<String>,
    pub pid: Option<u32>,
    pub started_at: Option<u64>,
    pub runner_id: Option<u64>,
    pub added: bool,
    pub removed: bool,
    pub jobs_completed: u64,
}

impl RunnerView {
    fn of(s: &Status) -> Self {
        Self {
            name: s.runner_name.clone(),
            scope: s.scope.clone(),
            labels: s.labels.clone(),
            state: s.state,
            busy: s.busy,
            job: s.job.clone(),
            pid: s.pid,
            started_at: s.started_at,
            runner_id: s.runner_id,
            added: s.added,
            removed: s.retired,
            jobs_completed: s.jobs_completed,
        }
    }
}

/// The body of `POST /runners`. Labels may be a list or one comma-separated string.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct AddBody {
    scope: String,
    labels: Labels,
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    ephemeral: bool,
    #[serde(default)]
    token: Option<String>,
}

#[derive(Debug, Deserialize)]
#[serde(untagged)]
enum Labels {
    List(Vec<String>),
    Text(String),
}

/// A request body to a checked [`Spec`], or the reason for a 400.
pub fn parse_add(body: &[u8]) -> Result<Spec, String> {
    let b: AddBody = serde_json::from_slice(body).map_err(|e| format!("invalid JSON body: {e}"))?;
    let raw: Vec<String> = match b.labels {
        Labels::List(l) => l,
        Labels::Text(t) => t.split(',').map(str::to_string).collect(),
    };
    let labels = config::parse_labels(raw.iter().map(String::as_str)).unwrap_or_default();
    let spec = Spec {
        name: b.name.unwrap_or_default(),
        scope: b.scope.trim().to_string(),
        labels,
        ephemeral: b.ephemeral,
        token: b.token.map(|t| t.trim().to_string()),
    };
    validate_spec(&spec).map_err(|e| e.to_string())?;
    Ok(spec)
}

fn error(code: StatusCode, msg: impl Into<String>) -> Response {
    (code, Json(json!({ "error": msg.into() }))).into_response()
}

async fn authenticate(State(api): State<Api>, req: Request, next: Next) -> Response {
    let presented = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(|v| v.strip_prefix("Bearer ").or_else(|| v.strip_prefix("bearer ")))
        .map(str::trim);
    let ok = presented.is_some_and(|t| ring::hmac::verify(&api.key, t.as_bytes(), api.tag.as_ref()).is_ok());
    if !ok {
        let mut resp = error(StatusCode::UNAUTHORIZED, "a valid bearer token (ADMIN_TOKEN) is required");
        resp.headers_mut().insert(header::WWW_AUTHENTICATE, header::HeaderValue::from_static("Bearer"));
        return resp;
    }
    next.run(req).await
}

/// A body announced larger than [`MAX_BODY`] is refused on its `Content-Length`, before a byte
/// of it is read (a chunked one is cut off at the limit by the extractor).
async fn refuse_large(req: Request, next: Next) -> Response {
    let announced =
        req.headers().get(header::CONTENT_LENGTH).and_then(|v| v.to_str().ok()).and_then(|v| v.parse::<u64>().ok());
    if announced.is_some_and(|n| n > MAX_BODY as u64) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, format!("the body must be at most {MAX_BODY} bytes"));
    }
    next.run(req).await
}

async fn list(State(api): State<Api>) -> Response {
    let s = api.status.borrow().clone();
    let runners: Vec<RunnerView> = s.runners.iter().map(RunnerView::of).collect();
    Json(runners).into_response()
}

async fn add(State(api): State<Api>, body: Bytes) -> Response {
    let spec = match parse_add(&body) {
        Ok(s) => s,
        Err(msg) => return error(StatusCode::BAD_REQUEST, msg),
    };
    let (tx, rx) = oneshot::channel();
    if api.commands.send(Command::Add { spec, reply: tx }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the container is stopping");
    }
    match rx.await {
        Ok(Ok(status)) => (StatusCode::CREATED, Json(RunnerView::of(&status))).into_response(),
        Ok(Err(e @ AddError::Duplicate(_))) => error(StatusCode::CONFLICT, e.to_string()),
        Ok(Err(e @ AddError::Draining)) => error(StatusCode::SERVICE_UNAVAILABLE, e.to_string()),
        Ok(Err(e @ AddError::Prepare { .. })) => error(StatusCode::INTERNAL_SERVER_ERROR, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the container is stopping"),
    }
}

async fn remove(State(api): State<Api>, Path(name): Path<String>) -> Response {
    if !config::valid_runner_name(&name) {
        return error(
            StatusCode::BAD_REQUEST,
            format!("name must be 1-64 characters of A-Z a-z 0-9 . _ - not starting with a dot, got {name:?}"),
        );
    }
    let (tx, rx) = oneshot::channel();
    if api.commands.send(Command::Remove { name: name.clone(), reply: tx }).await.is_err() {
        return error(StatusCode::SERVICE_UNAVAILABLE, "the container is stopping");
    }
    match rx.await {
        Ok(Ok(())) => (StatusCode::ACCEPTED, Json(json!({ "name": name, "state": "draining" }))).into_response(),
        Ok(Err(e @ RemoveError::NotFound(_))) => error(StatusCode::NOT_FOUND, e.to_string()),
        Err(_) => error(StatusCode::SERVICE_UNAVAILABLE, "the container is stopping"),
    }
}

/// Binds `settings.addr` now (a bad or busy address fails the start) and serves until `cancel`.
pub async fn serve(
    settings: &AdminSettings,
    status: watch::Receiver<Status>,
    commands: mpsc::Sender<Command>,
    cancel: CancellationToken,
) -> std::io::Result<SocketAddr> {
    let rng = ring::rand::SystemRandom::new();
    let key = ring::hmac::Key::generate(ring::hmac::HMAC_SHA256, &rng)
        .map_err(|_| std::io::Error::other("no randomness for the admin API's key"))?;
    let tag = ring::hmac::sign(&key, settings.token.expose().as_bytes());
    let api = Api { key, tag, status, commands };
    let listener = tokio::net::TcpListener::bind(settings.addr).await?;
    let bound = listener.local_addr()?;
    let app = Router::new()
        .route("/runners", get(list).post(add))
        .route("/runners/", get(list).post(add))
        .route("/runners/{name}", delete(remove))
        .layer(axum::extract::DefaultBodyLimit::max(MAX_BODY))
        .route_layer(middleware::from_fn(refuse_large))
        .route_layer(middleware::from_fn_with_state(api.clone(), authenticate))
        .with_state(api);
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).with_graceful_shutdown(cancel.cancelled_owned()).await;
    });
    Ok(bound)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bodies_become_checked_specs_or_a_reason() {
        let s = parse_add(br#"{"scope":"octo/two","labels":"a, b,a","name":"r-1","ephemeral":true}"#).unwrap();
        assert_eq!((s.name.as_str(), s.scope.as_str(), s.ephemeral), ("r-1", "octo/two", true));
        assert_eq!(s.labels, ["a", "b"]);
        let s = parse_add(br#"{"scope":"octo","labels":["x"]}"#).unwrap();
        assert_eq!((s.name.as_str(), s.labels.len(), s.token), ("", 1, None));
        for (body, needle) in [
            (&br#"{"scope":"octo/two","labels":"x","name":"../up"}"#[..], "name must be"),
            (br#"{"scope":"a/b/c","labels":"x"}"#, "scope must be"),
            (br#"{"scope":"octo/two","labels":[]}"#, "labels must be"),
            (br#"{"scope":"octo/two","labels":"x","nmae":"typo"}"#, "unknown field"),
            (br#"{"labels":"x"}"#, "missing field `scope`"),
            (b"not json", "invalid JSON"),
        ] {
            let err = parse_add(body).unwrap_err();
            assert!(err.contains(needle), "{}: {err}", String::from_utf8_lossy(body));
        }
    }

    #[test]
    fn a_token_in_the_body_never_shows_in_the_reason() {
        let err = parse_add(br#"{"scope":"octo/two","labels":"x","token":"SECRET TOKEN"}"#).unwrap_err();
        assert!(!err.contains("SECRET"), "{err}");
    }
}
