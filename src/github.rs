//! The GitHub REST API, as far as a runner's life needs it: registration tokens, listing
//! runners and finding one by name, deleting them, resolving a runner group's name to its id.
//!
//! Requests carry a PAT, or a GitHub App's installation token ([`Auth`]): minted with the
//! App's JWT, cached, renewed [`REFRESH_EARLY`] before it expires and again on a 401, so a
//! de-registration hours after the start still goes out with a valid token.
//!
//! Every call goes through one retry loop: 5xx, transport errors and rate limits (403/429 with
//! `retry-after` or `x-ratelimit-remaining: 0`) are retried with backoff inside a budget;
//! 401/403/404 become errors that name the token, permission or name that is wrong.
//! Nothing secret is logged: URLs carry no tokens, and bodies are never logged. Each request
//! (retries too) is counted by its answer's status in `ci_runner_github_api_requests_total`.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use reqwest::header::{HeaderMap, ACCEPT, AUTHORIZATION, USER_AGENT};
use reqwest::{Method, StatusCode};
use serde::Deserialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::app::AppKey;
#[cfg(doc)]
use crate::app::REFRESH_EARLY;
use crate::config::{Config, Credentials, Scope, Secret};
use crate::metrics::{self, ApiAnswer};

const API_VERSION: &str = "2022-11-28";

#[derive(Debug, thiserror::Error)]
pub enum GithubError {
    #[error("GitHub rejected the token (401 {message}): the token is invalid, expired or revoked")]
    Unauthorized { message: String },
    #[error("the token may not manage runners of the {scope} (403 {message}): a classic PAT needs the `repo` scope (admin on the repository), `admin:org` (organization) or `manage_runners:enterprise` (enterprise); a fine-grained token or a GitHub App needs Administration: write (repository) or Self-hosted runners: write (organization)")]
    Forbidden { scope: String, message: String },
    #[error("the token may not read or redeliver the webhook deliveries of the {scope} (403 {message}): a classic PAT needs `admin:org_hook` (organization) or `admin:repo_hook` (repository); a fine-grained token or a GitHub App needs Webhooks: write on the organization or the repository")]
    HooksForbidden { scope: String, message: String },
    #[error("{scope} not found (404): check the name, and that the token can see it")]
    NotFound { scope: String },
    #[error("runner {id} is still running a job (422)")]
    Busy { id: u64 },
    #[error("GitHub answered {status} to {method} {path}: {message}")]
    Status { status: u16, method: Method, path: String, message: String },
    #[error("request {method} {path} failed")]
    Transport {
        method: Method,
        path: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("gave up on {path} after {attempts} attempts")]
    GaveUp {
        path: String,
        attempts: u32,
        #[source]
        last: Box<GithubError>,
    },
    #[error("cancelled while calling {path}")]
    Cancelled { path: String },
    #[error("GitHub refused the JWT of GitHub App {app_id} (401 {message}): check GH_APP_ID, that GH_APP_PRIVATE_KEY is a current key of that App, and the clock")]
    AppRefused { app_id: u64, message: String },
    #[error(
        "GitHub App {app_id} is not installed on the {scope} (404): install it there, or set GH_APP_INSTALLATION_ID"
    )]
    AppNotInstalled { app_id: u64, scope: String },
    #[error("installation {installation_id} of GitHub App {app_id} not found (404): check GH_APP_INSTALLATION_ID")]
    InstallationNotFound { app_id: u64, installation_id: u64 },
    #[error("a GitHub App cannot manage runners of the {scope}: use a classic PAT with manage_runners:enterprise")]
    AppUnsupported { scope: String },
    #[error("failed to sign the JWT of GitHub App {app_id}")]
    Jwt { app_id: u64 },
    #[error("runner group {name:?} not found in the {scope}; its groups are: {}", existing.join(", "))]
    GroupNotFound { scope: String, name: String, existing: Vec<String> },
}

impl GithubError {
    /// Errors that retrying will never fix.
    pub fn is_permanent(&self) -> bool {
        matches!(
            self,
            Self::Unauthorized { .. }
                | Self::Forbidden { .. }
                | Self::HooksForbidden { .. }
                | Self::NotFound { .. }
                | Self::AppRefused { .. }
                | Self::AppNotInstalled { .. }
                | Self::InstallationNotFound { .. }
                | Self::AppUnsupported { .. }
                | Self::Jwt { .. }
                | Self::GroupNotFound { .. }
        )
    }
}

/// How long, and how often, one call may be retried.
#[derive(Debug, Clone, Copy)]
pub struct Budget {
    pub max_attempts: u32,
    pub deadline: Option<Instant>,
    /// One request's timeout, when shorter than the client's [`REQUEST_TIMEOUT`].
    pub request_timeout: Option<Duration>,
}

/// The client's timeout for one request (connect, send, answer).
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);

impl Budget {
    pub fn attempts(n: u32) -> Self {
        Self { max_attempts: n, deadline: None, request_timeout: None }
    }
    pub fn until(deadline: Instant) -> Self {
        Self { max_attempts: u32::MAX, deadline: Some(deadline), request_timeout: None }
    }
    /// Each request of the call times out after `timeout`, so that a hung one leaves time to
    /// try again within a short budget.
    pub fn per_request(self, timeout: Duration) -> Self {
        Self { request_timeout: Some(timeout), ..self }
    }
}

/// What to do with one answer.
#[derive(Debug, PartialEq, Eq)]
pub enum Verdict {
    Done,
    Retry(Duration),
    Fail,
}

/// Exponential backoff: 1 s, 2 s, 4 s … capped at 30 s, with up to 25 % jitter.
pub fn backoff(attempt: u32, jitter: f64) -> Duration {
    let base = 1000u64.saturating_mul(1 << attempt.min(5)).min(30_000);
    Duration::from_millis(base + (base as f64 * 0.25 * jitter.clamp(0.0, 1.0)) as u64)
}

/// Decides, from a status and its headers, whether a call is done, retried (and after how
/// long) or failed, following GitHub's documented rate-limit rules.
pub fn classify(status: u16, headers: &HeaderMap, body: &str, attempt: u32, now_epoch: u64, jitter: f64) -> Verdict {
    let header =
        |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).and_then(|v| v.trim().parse::<u64>().ok());
    if (200..300).contains(&status) {
        return Verdict::Done;
    }
    let rate_limited = status == 429
        || (status == 403
            && (header("retry-after").is_some()
                || header("x-ratelimit-remaining") == Some(0)
                || body.contains("rate limit")));
    if rate_limited {
        if let Some(after) = header("retry-after") {
            return Verdict::Retry(Duration::from_secs(after.max(1)));
        }
        if header("x-ratelimit-remaining") == Some(0) {
            if let Some(reset) = header("x-ratelimit-reset") {
                return Verdict::Retry(Duration::from_secs(reset.saturating_sub(now_epoch).max(1)));
            }
        }
        // Documented: with neither header, wait at least a minute, then back off.
        return Verdict::Retry(Duration::from_secs(60) + backoff(attempt, jitter));
    }
    if status >= 500 {
        return Verdict::Retry(backoff(attempt, jitter));
    }
    Verdict::Fail
}

#[derive(Debug, Clone, Deserialize)]
pub struct RunnerInfo {
    pub id: u64,
    pub name: String,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub busy: bool,
    #[serde(default)]
    pub labels: Vec<RunnerLabel>,
}

/// One of a runner's labels (`read-only` defaults such as `self-hosted`, or `custom`).
#[derive(Debug, Clone, Deserialize)]
pub struct RunnerLabel {
    pub name: String,
}

#[derive(Deserialize)]
struct RunnerList {
    runners: Vec<RunnerInfo>,
}

/// A successful answer's JSON body as `T`; an answer of another shape is an error saying
/// what it lacks.
fn parse_answer<T: serde::de::DeserializeOwned>(
    status: StatusCode,
    body: &str,
    method: Method,
    path: &str,
    lacks: &str,
) -> Result<T, GithubError> {
    serde_json::from_str(body).map_err(|_| GithubError::Status {
        status: status.as_u16(),
        method,
        path: path.to_string(),
        message: lacks.to_string(),
    })
}

#[derive(Deserialize)]
struct TokenAnswer {
    token: String,
    #[serde(default)]
    expires_at: String,
}

#[derive(Deserialize)]
struct GroupList {
    runner_groups: Vec<GroupInfo>,
}

#[derive(Deserialize)]
struct GroupInfo {
    id: u64,
    name: String,
}

#[derive(Deserialize)]
struct InstallationAnswer {
    id: u64,
}

#[derive(Deserialize)]
struct ErrorBody {
    #[serde(default)]
    message: String,
}

/// Outcome of deleting a runner.
#[derive(Debug, PartialEq, Eq)]
pub enum Deleted {
    Removed,
    AlreadyGone,
}

/// How requests are authenticated.
#[derive(Clone)]
pub enum Auth {
    /// A personal access token, sent as is.
    Pat(Secret),
    /// A GitHub App: installation tokens bought with its JWT.
    App(AppAuth),
}

impl Auth {
    /// The API credentials of a configuration: `None` for a bare registration token.
    pub fn for_config(cfg: &Config) -> Option<Auth> {
        Self::new(&cfg.credentials, &cfg.scope)
    }

    /// The API credentials for `scope`: `None` for a bare registration token.
    pub fn new(credentials: &Credentials, scope: &Scope) -> Option<Auth> {
        match credentials {
            Credentials::Pat(token) => Some(Auth::Pat(token.clone())),
            Credentials::App { app_id, key, installation_id } => {
                Some(Auth::App(AppAuth::new(*app_id, key.clone(), *installation_id, scope.clone())))
            }
            Credentials::RegistrationToken(_) | Credentials::Jit(_) => None,
        }
    }
}

/// A GitHub App's identity and its cached installation token, shared by every clone of the
/// client (one token for the whole process, minted once, not once per caller).
#[derive(Clone)]
pub struct AppAuth {
    app_id: u64,
    key: AppKey,
    /// Where the installation is looked up when its id was not given.
    scope: Scope,
    state: Arc<tokio::sync::Mutex<AppState>>,
}

#[derive(Default)]
struct AppState {
    installation_id: Option<u64>,
    /// The token and until when it may be used (`REFRESH_EARLY` before it expires).
    token: Option<(Secret, Instant)>,
}

impl AppAuth {
    pub fn new(app_id: u64, key: AppKey, installation_id: Option<u64>, scope: Scope) -> Self {
        let state = AppState { installation_id, token: None };
        Self { app_id, key, scope, state: Arc::new(tokio::sync::Mutex::new(state)) }
    }

    fn jwt(&self) -> Result<Secret, GithubError> {
        self.key.jwt(self.app_id, SystemTime::now()).map_err(|_| GithubError::Jwt { app_id: self.app_id })
    }

    /// Drops the cached token after GitHub refused it, unless another call already replaced it.
    async fn forget(&self, refused: &Secret) {
        let mut state = self.state.lock().await;
        if state.token.as_ref().is_some_and(|(t, _)| t == refused) {
            state.token = None;
        }
    }
}

/// A REST client bound to one API base and one set of credentials.
#[derive(Clone)]
pub struct Github {
    http: reqwest::Client,
    api_url: String,
    auth: Auth,
}

fn now_epoch() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

fn jitter() -> f64 {
    let mut b = [0u8; 2];
    let _ = getrandom::getrandom(&mut b);
    f64::from(u16::from_le_bytes(b)) / f64::from(u16::MAX)
}

fn next_link(headers: &HeaderMap) -> Option<String> {
    let link = headers.get("link")?.to_str().ok()?;
    link.split(',').find_map(|part| {
        let (url, rel) = part.split_once(';')?;
        rel.contains("rel=\"next\"").then(|| url.trim().trim_start_matches('<').trim_end_matches('>').to_string())
    })
}

impl Github {
    pub fn new(api_url: &str, auth: Auth) -> Result<Self, reqwest::Error> {
        let http =
            reqwest::Client::builder().connect_timeout(Duration::from_secs(10)).timeout(REQUEST_TIMEOUT).build()?;
        Ok(Self { http, api_url: api_url.trim_end_matches('/').to_string(), auth })
    }

    /// One authenticated call with retries. An App's token refused with 401 (revoked, or
    /// expired sooner than its `expires_at` said) is replaced once and the call made again.
    async fn call(
        &self,
        method: Method,
        path: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(StatusCode, HeaderMap, String), GithubError> {
        self.call_with_body(method, path, None, budget, cancel).await
    }

    /// `call` with a JSON body (sent again on every retry, and after a renewed App token).
    async fn call_with_body(
        &self,
        method: Method,
        path: &str,
        body: Option<&serde_json::Value>,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(StatusCode, HeaderMap, String), GithubError> {
        let mut renewed = false;
        loop {
            let bearer = self.bearer(budget, cancel).await?;
            let answer = self.send(method.clone(), path, &bearer, body, budget, cancel).await?;
            match &self.auth {
                Auth::App(app) if answer.0 == StatusCode::UNAUTHORIZED && !renewed => {
                    let shown = path.split('?').next().unwrap_or(path);
                    warn!(path = %shown, "GitHub refused the installation token; minting a new one.");
                    app.forget(&bearer).await;
                    renewed = true;
                }
                _ => return Ok(answer),
            }
        }
    }

    /// The token for the next request: the PAT, or the App's cached installation token,
    /// minted anew when it is due (finding the installation first, once).
    async fn bearer(&self, budget: Budget, cancel: &CancellationToken) -> Result<Secret, GithubError> {
        let app = match &self.auth {
            Auth::Pat(token) => return Ok(token.clone()),
            Auth::App(app) => app,
        };
        // Held while minting: concurrent callers wait for one new token instead of each
        // minting their own.
        let mut state = app.state.lock().await;
        if let Some((token, until)) = &state.token {
            if Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let jwt = app.jwt()?;
        let installation_id = match state.installation_id {
            Some(id) => id,
            None => {
                let id = self.find_installation(app, &jwt, budget, cancel).await?;
                info!(app_id = app.app_id, installation_id = id, scope = %app.scope, "Found the GitHub App's installation.");
                state.installation_id = Some(id);
                id
            }
        };
        let path = format!("app/installations/{installation_id}/access_tokens");
        let (status, headers, body) = self.send(Method::POST, &path, &jwt, None, budget, cancel).await?;
        if !status.is_success() {
            return Err(match status.as_u16() {
                404 => GithubError::InstallationNotFound { app_id: app.app_id, installation_id },
                _ => self.app_refusal(app, status, &body, &Method::POST, &path),
            });
        }
        let answer: TokenAnswer = parse_answer(status, &body, Method::POST, &path, "the answer has no token")?;
        let date = headers.get(reqwest::header::DATE).and_then(|d| d.to_str().ok());
        let usable = crate::app::usable_for(&answer.expires_at, date, SystemTime::now());
        info!(installation_id, expires_at = %answer.expires_at, renew_in_sec = usable.as_secs(), "Minted a GitHub App installation token.");
        let token = Secret::new(answer.token);
        state.token = Some((token.clone(), Instant::now() + usable));
        Ok(token)
    }

    /// `GET /repos/{o}/{r}/installation` or `GET /orgs/{org}/installation`, with the JWT.
    async fn find_installation(
        &self,
        app: &AppAuth,
        jwt: &Secret,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<u64, GithubError> {
        if let Scope::Enterprise(_) = app.scope {
            return Err(GithubError::AppUnsupported { scope: app.scope.to_string() });
        }
        let path = format!("{}/installation", app.scope.api_path());
        let (status, _, body) = self.send(Method::GET, &path, jwt, None, budget, cancel).await?;
        if !status.is_success() {
            return Err(match status.as_u16() {
                404 => GithubError::AppNotInstalled { app_id: app.app_id, scope: app.scope.to_string() },
                _ => self.app_refusal(app, status, &body, &Method::GET, &path),
            });
        }
        parse_answer::<InstallationAnswer>(status, &body, Method::GET, &path, "the answer is not an installation")
            .map(|i| i.id)
    }

    fn app_refusal(&self, app: &AppAuth, status: StatusCode, body: &str, method: &Method, path: &str) -> GithubError {
        let message = serde_json::from_str::<ErrorBody>(body).map(|b| b.message).unwrap_or_default();
        match status.as_u16() {
            401 => GithubError::AppRefused { app_id: app.app_id, message },
            s => GithubError::Status { status: s, method: method.clone(), path: path.to_string(), message },
        }
    }

    /// One call with retries and the given bearer. `path` is relative to the API base, or an
    /// absolute URL from a `Link` header.
    async fn send(
        &self,
        method: Method,
        path: &str,
        bearer: &Secret,
        body: Option<&serde_json::Value>,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(StatusCode, HeaderMap, String), GithubError> {
        let url = if path.starts_with("http") { path.to_string() } else { format!("{}/{}", self.api_url, path) };
        let shown = path.split('?').next().unwrap_or(path).to_string();
        let mut attempt = 0u32;
        loop {
            let request = self
                .http
                .request(method.clone(), &url)
                .header(ACCEPT, "application/vnd.github+json")
                .header("X-GitHub-Api-Version", API_VERSION)
                .header(USER_AGENT, concat!("ci-runner/", env!("CARGO_PKG_VERSION")))
                .header(AUTHORIZATION, format!("Bearer {}", bearer.expose()));
            let request = match budget.request_timeout {
                Some(t) => request.timeout(t),
                None => request,
            };
            let result = tokio::select! {
                r = with_body(request, body).send() => r,
                () = cancel.cancelled() => return Err(GithubError::Cancelled { path: shown }),
            };
            let (err, wait) = match result {
                Ok(resp) => {
                    let status = resp.status();
                    metrics::global().github_answer(ApiAnswer::Status(status.as_u16()));
                    let headers = resp.headers().clone();
                    let body = resp.text().await.unwrap_or_default();
                    match classify(status.as_u16(), &headers, &body, attempt, now_epoch(), jitter()) {
                        Verdict::Done => return Ok((status, headers, body)),
                        Verdict::Fail => return Ok((status, headers, body)),
                        Verdict::Retry(wait) => {
                            let message =
                                serde_json::from_str::<ErrorBody>(&body).map(|b| b.message).unwrap_or_default();
                            (
                                GithubError::Status {
                                    status: status.as_u16(),
                                    method: method.clone(),
                                    path: shown.clone(),
                                    message,
                                },
                                wait,
                            )
                        }
                    }
                }
                Err(source) => {
                    metrics::global().github_answer(ApiAnswer::Error);
                    (
                        GithubError::Transport { method: method.clone(), path: shown.clone(), source },
                        backoff(attempt, jitter()),
                    )
                }
            };
            attempt += 1;
            let out_of_time = budget.deadline.is_some_and(|d| Instant::now().checked_add(wait).is_none_or(|t| t > d));
            if attempt >= budget.max_attempts || out_of_time {
                return Err(GithubError::GaveUp { path: shown, attempts: attempt, last: Box::new(err) });
            }
            warn!(path = %shown, attempt, wait_ms = wait.as_millis() as u64, error = %err, "GitHub call failed, retrying.");
            tokio::select! {
                () = tokio::time::sleep(wait) => {}
                () = cancel.cancelled() => return Err(GithubError::Cancelled { path: shown }),
            }
        }
    }

    fn refusal(status: StatusCode, body: &str, method: &Method, path: &str, scope: &Scope) -> GithubError {
        let message = serde_json::from_str::<ErrorBody>(body).map(|b| b.message).unwrap_or_default();
        match status.as_u16() {
            401 => GithubError::Unauthorized { message },
            403 => GithubError::Forbidden { scope: scope.to_string(), message },
            404 => GithubError::NotFound { scope: scope.to_string() },
            s => GithubError::Status { status: s, method: method.clone(), path: path.to_string(), message },
        }
    }

    async fn token(
        &self,
        scope: &Scope,
        kind: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Secret, GithubError> {
        let path = format!("{}/actions/runners/{kind}", scope.api_path());
        let (status, _, body) = self.call(Method::POST, &path, budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &body, &Method::POST, &path, scope));
        }
        let answer: TokenAnswer = parse_answer(status, &body, Method::POST, &path, "the answer has no token")?;
        Ok(Secret::new(answer.token))
    }

    /// `POST /{scope}/actions/runners/registration-token`.
    pub async fn registration_token(
        &self,
        scope: &Scope,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Secret, GithubError> {
        self.token(scope, "registration-token", budget, cancel).await
    }

    /// One page of `GET /{scope}/actions/runners…`, and the next page's URL from `Link`.
    async fn runner_page(
        &self,
        scope: &Scope,
        path: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(Vec<RunnerInfo>, Option<String>), GithubError> {
        let (status, headers, body) = self.call(Method::GET, path, budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &body, &Method::GET, path, scope));
        }
        let shown = path.split('?').next().unwrap_or(path);
        let list: RunnerList = parse_answer(status, &body, Method::GET, shown, "the answer is not a runner list")?;
        Ok((list.runners, next_link(&headers)))
    }

    /// Finds runners by exact name, following pagination.
    pub async fn find_runner(
        &self,
        scope: &Scope,
        name: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Option<RunnerInfo>, GithubError> {
        let mut path = format!("{}/actions/runners?per_page=100&name={name}", scope.api_path());
        loop {
            let (runners, next) = self.runner_page(scope, &path, budget, cancel).await?;
            if let Some(r) = runners.into_iter().find(|r| r.name == name) {
                return Ok(Some(r));
            }
            match next {
                Some(next) => path = next,
                None => return Ok(None),
            }
        }
    }

    /// The id of the runner group called `name` (case-insensitive, as config.sh matches it),
    /// from `GET /{scope}/actions/runner-groups` across every page; organization and
    /// enterprise scopes only (repositories have no groups).
    pub async fn runner_group_id(
        &self,
        scope: &Scope,
        name: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<u64, GithubError> {
        let mut path = format!("{}/actions/runner-groups?per_page=100", scope.api_path());
        let mut existing = Vec::new();
        loop {
            let (status, headers, body) = self.call(Method::GET, &path, budget, cancel).await?;
            if !status.is_success() {
                return Err(Self::refusal(status, &body, &Method::GET, &path, scope));
            }
            let list: GroupList =
                parse_answer(status, &body, Method::GET, &path, "the answer is not a runner group list")?;
            for g in list.runner_groups {
                if g.name.to_lowercase() == name.to_lowercase() {
                    return Ok(g.id);
                }
                existing.push(g.name);
            }
            match next_link(&headers) {
                Some(next) => path = next,
                None => {
                    return Err(GithubError::GroupNotFound {
                        scope: scope.to_string(),
                        name: name.to_string(),
                        existing,
                    })
                }
            }
        }
    }

    /// Every runner of the scope, 100 a page, following `Link: rel="next"` to the end.
    pub async fn list_runners(
        &self,
        scope: &Scope,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Vec<RunnerInfo>, GithubError> {
        let mut path = format!("{}/actions/runners?per_page=100", scope.api_path());
        let mut all = Vec::new();
        loop {
            let (runners, next) = self.runner_page(scope, &path, budget, cancel).await?;
            all.extend(runners);
            match next {
                Some(next) => path = next,
                None => return Ok(all),
            }
        }
    }

    /// `DELETE /{scope}/actions/runners/{id}`: 422 while the runner is busy.
    pub async fn delete_runner(
        &self,
        scope: &Scope,
        id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Deleted, GithubError> {
        let path = format!("{}/actions/runners/{id}", scope.api_path());
        let (status, _, body) = self.call(Method::DELETE, &path, budget, cancel).await?;
        match status.as_u16() {
            s if (200..300).contains(&s) => Ok(Deleted::Removed),
            404 => Ok(Deleted::AlreadyGone),
            422 => Err(GithubError::Busy { id }),
            _ => Err(Self::refusal(status, &body, &Method::DELETE, &path, scope)),
        }
    }

    /// `DELETE …/actions/runners/{id}/labels`: removes every custom label of the runner (the
    /// defaults, `read-only`, stay), so that no queued job asking for them is assigned to it.
    /// Returns the labels left. 404: the runner is gone already, nothing to do.
    pub async fn remove_custom_labels(
        &self,
        scope: &Scope,
        id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Vec<String>, GithubError> {
        let path = format!("{}/actions/runners/{id}/labels", scope.api_path());
        let (status, _, body) = self.call(Method::DELETE, &path, budget, cancel).await?;
        match status.as_u16() {
            200 => {
                let answer: LabelList = parse_answer(status, &body, Method::DELETE, &path, "the answer has no labels")?;
                Ok(answer.labels.into_iter().map(|l| l.name).collect())
            }
            404 => Ok(Vec::new()),
            _ => Err(Self::refusal(status, &body, &Method::DELETE, &path, scope)),
        }
    }
}

#[derive(Deserialize)]
struct LabelList {
    labels: Vec<RunnerLabel>,
}

fn with_body(request: reqwest::RequestBuilder, body: Option<&serde_json::Value>) -> reqwest::RequestBuilder {
    match body {
        Some(b) => request.json(b),
        None => request,
    }
}

/// A JIT configuration: GitHub registers the runner when it mints one (issue #7).
pub struct JitConfig {
    /// The registration, `offline` until the Listener connects.
    pub runner: RunnerInfo,
    /// `encoded_jit_config`: the runner's credentials, for `ACTIONS_RUNNER_INPUT_JITCONFIG` only.
    pub encoded: Secret,
}

#[derive(Deserialize)]
struct JitAnswer {
    runner: RunnerInfo,
    encoded_jit_config: String,
}

/// The id of the runner group every organization has (and the one repository runners use).
pub const DEFAULT_RUNNER_GROUP_ID: u64 = 1;

/// Ephemeral and JIT registration (issue #7).
impl Github {
    /// `POST /{scope}/actions/runners/generate-jitconfig`: registers runner `name` and returns
    /// its single-use configuration. 409 when the name is taken.
    #[expect(clippy::too_many_arguments, reason = "the endpoint's four fields plus the call's budget")]
    pub async fn generate_jitconfig(
        &self,
        scope: &Scope,
        name: &str,
        runner_group_id: u64,
        labels: &[String],
        work_folder: &str,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<JitConfig, GithubError> {
        let path = format!("{}/actions/runners/generate-jitconfig", scope.api_path());
        let body = serde_json::json!({
            "name": name,
            "runner_group_id": runner_group_id,
            "labels": labels,
            "work_folder": work_folder,
        });
        let (status, _, text) = self.call_with_body(Method::POST, &path, Some(&body), budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &text, &Method::POST, &path, scope));
        }
        let answer: JitAnswer =
            parse_answer(status, &text, Method::POST, &path, "the answer has no runner or encoded_jit_config")?;
        Ok(JitConfig { runner: answer.runner, encoded: Secret::new(answer.encoded_jit_config) })
    }
}

/// A repository's or organization's webhook, as far as `ci-runner controller` needs it.
#[derive(Debug, Clone, Deserialize)]
pub struct HookInfo {
    pub id: u64,
    #[serde(default)]
    pub config: HookConfig,
}

#[derive(Debug, Clone, Default, Deserialize)]
pub struct HookConfig {
    #[serde(default)]
    pub url: Option<String>,
}

#[derive(Deserialize)]
struct HookId {
    id: u64,
}

/// Webhooks, for `ci-runner controller`'s `WEBHOOK_URL` (issue #9). The body carries the
/// webhook's secret: it is sent, never logged.
impl Github {
    /// `GET /{scope}/hooks` (one page of 100: a scope has at most 20 webhooks per event).
    pub async fn list_hooks(
        &self,
        scope: &Scope,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Vec<HookInfo>, GithubError> {
        let path = format!("{}/hooks?per_page=100", scope.api_path());
        let (status, _, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &body, &Method::GET, &path, scope));
        }
        parse_answer(status, &body, Method::GET, &path, "the answer is not a webhook list")
    }

    /// `POST /{scope}/hooks`: the new webhook's id.
    pub async fn create_hook(
        &self,
        scope: &Scope,
        body: &serde_json::Value,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<u64, GithubError> {
        let path = format!("{}/hooks", scope.api_path());
        let (status, _, text) = self.call_with_body(Method::POST, &path, Some(body), budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &text, &Method::POST, &path, scope));
        }
        parse_answer::<HookId>(status, &text, Method::POST, &path, "the answer has no id").map(|h| h.id)
    }

    /// `PATCH /{scope}/hooks/{id}`.
    pub async fn update_hook(
        &self,
        scope: &Scope,
        id: u64,
        body: &serde_json::Value,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(), GithubError> {
        let path = format!("{}/hooks/{id}", scope.api_path());
        let (status, _, text) = self.call_with_body(Method::PATCH, &path, Some(body), budget, cancel).await?;
        if !status.is_success() {
            return Err(Self::refusal(status, &text, &Method::PATCH, &path, scope));
        }
        Ok(())
    }
}

/// A workflow job as `GET /repos/{o}/{r}/actions/runs/{run_id}/jobs` lists it.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct ListedJob {
    pub id: u64,
    /// `queued`, `in_progress`, `completed`, `waiting`, `requested` or `pending`.
    pub status: String,
    #[serde(default)]
    pub labels: Vec<String>,
}

#[derive(Deserialize)]
struct RunsPage {
    workflow_runs: Vec<RunId>,
}

#[derive(Deserialize)]
struct RunId {
    id: u64,
}

#[derive(Deserialize)]
struct JobsPage {
    jobs: Vec<ListedJob>,
}

/// Workflow runs and their jobs, for `ci-runner controller`'s reconciliation (issue #18):
/// the queued jobs whose delivery never arrived.
impl Github {
    /// `GET /repos/{o}/{r}/actions/runs?status=<status>&per_page=<n>`: the ids of the newest
    /// `per_page` runs (at most 100) with that status; one page, one call.
    pub async fn list_runs(
        &self,
        scope: &Scope,
        status: &str,
        per_page: usize,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Vec<u64>, GithubError> {
        let path = format!("{}/actions/runs?status={status}&per_page={}", scope.api_path(), per_page.clamp(1, 100));
        let (code, _, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::refusal(code, &body, &Method::GET, &path, scope));
        }
        let page: RunsPage = parse_answer(code, &body, Method::GET, &path, "the answer has no workflow_runs")?;
        Ok(page.workflow_runs.into_iter().map(|r| r.id).collect())
    }

    /// `GET /repos/{o}/{r}/actions/runs/{run_id}/jobs?filter=latest&per_page=100`: the jobs of
    /// the run's latest attempt (one page, one call: a matrix makes at most 256 jobs, and the
    /// newest are the queued ones).
    pub async fn list_run_jobs(
        &self,
        scope: &Scope,
        run_id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Vec<ListedJob>, GithubError> {
        let path = format!("{}/actions/runs/{run_id}/jobs?filter=latest&per_page=100", scope.api_path());
        let (code, _, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::refusal(code, &body, &Method::GET, &path, scope));
        }
        let page: JobsPage = parse_answer(code, &body, Method::GET, &path, "the answer has no jobs")?;
        Ok(page.jobs)
    }
}

/// One webhook delivery as `GET /{scope}/hooks/{hook_id}/deliveries` lists it (GitHub's
/// `hook-delivery-item`: github/rest-api-docs-md `orgs/{org}/hooks/{hook_id}/deliveries/get.md`
/// lines 3 and 22-24, octokit/plugin-rest-endpoint-methods.js `docs/orgs/listWebhookDeliveries.md`
/// line 4; the fields as harana/search-engine `clients/github/docs/HookDeliveryItem.md` lines 7-18
/// list them). A failed delivery has a `status` other than `OK` (docs.github.com "Handling
/// failed webhook deliveries"); `status_code` is 0 when no answer came.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct DeliveryItem {
    /// The delivery's own id: a redelivery gets a new one.
    pub id: u64,
    /// The event's: shared by the first delivery and every redelivery (`X-GitHub-Delivery`).
    pub guid: String,
    /// `YYYY-MM-DDTHH:MM:SSZ`.
    pub delivered_at: String,
    #[serde(default)]
    pub redelivery: bool,
    #[serde(default)]
    pub status: String,
    #[serde(default)]
    pub status_code: u16,
    #[serde(default)]
    pub event: String,
    #[serde(default)]
    pub action: Option<String>,
}

/// An HTTP `Date` (`Fri, 04 Dec 2026 18:46:21 GMT`) as epoch seconds.
fn http_date(d: &str) -> Option<i64> {
    time::OffsetDateTime::parse(d, &time::format_description::well_known::Rfc2822).ok().map(|t| t.unix_timestamp())
}

/// One page of deliveries, newest first, with the next page's URL (`Link: rel="next"`, a
/// `cursor` query) and GitHub's clock (`Date`) as epoch seconds.
#[derive(Debug, Default)]
pub struct DeliveryPage {
    pub items: Vec<DeliveryItem>,
    pub next: Option<String>,
    pub server_now: Option<i64>,
}

#[derive(Deserialize)]
struct DeliveryDetail {
    request: DeliveryRequest,
}

#[derive(Deserialize)]
struct DeliveryRequest {
    #[serde(default)]
    payload: Option<serde_json::Value>,
}

#[derive(Deserialize)]
struct JobStatus {
    status: String,
}

/// Webhook deliveries, for the reconciliation of an organization's pool (issue #18): its
/// failed `queued` deliveries are found and redelivered, and the event takes the webhook path.
impl Github {
    fn hooks_refusal(status: StatusCode, body: &str, method: &Method, path: &str, scope: &Scope) -> GithubError {
        match Self::refusal(status, body, method, path, scope) {
            GithubError::Forbidden { scope, message } => GithubError::HooksForbidden { scope, message },
            e => e,
        }
    }

    /// `GET /{scope}/hooks/{hook_id}/deliveries?per_page=<n>` (at most 100), or `next` (a
    /// page's `Link: rel="next"`, which carries the `cursor`): one call.
    pub async fn list_deliveries(
        &self,
        scope: &Scope,
        hook_id: u64,
        per_page: usize,
        next: Option<&str>,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<DeliveryPage, GithubError> {
        let path = match next {
            Some(url) => url.to_string(),
            None => format!("{}/hooks/{hook_id}/deliveries?per_page={}", scope.api_path(), per_page.clamp(1, 100)),
        };
        let shown = format!("{}/hooks/{hook_id}/deliveries", scope.api_path());
        let (code, headers, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::hooks_refusal(code, &body, &Method::GET, &shown, scope));
        }
        let items = parse_answer(code, &body, Method::GET, &shown, "the answer is not a delivery list")?;
        let server_now = headers.get(reqwest::header::DATE).and_then(|d| d.to_str().ok()).and_then(http_date);
        Ok(DeliveryPage { items, next: next_link(&headers), server_now })
    }

    /// `GET /{scope}/hooks/{hook_id}/deliveries/{delivery_id}`: the payload it carried.
    pub async fn delivery_payload(
        &self,
        scope: &Scope,
        hook_id: u64,
        delivery_id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<Option<serde_json::Value>, GithubError> {
        let path = format!("{}/hooks/{hook_id}/deliveries/{delivery_id}", scope.api_path());
        let (code, _, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::hooks_refusal(code, &body, &Method::GET, &path, scope));
        }
        let d: DeliveryDetail = parse_answer(code, &body, Method::GET, &path, "the answer has no request")?;
        Ok(d.request.payload)
    }

    /// `POST /{scope}/hooks/{hook_id}/deliveries/{delivery_id}/attempts` (202): GitHub sends
    /// the delivery again, as a new delivery with the same guid (octokit/plugin-rest-endpoint-methods.js
    /// `docs/orgs/redeliverWebhookDelivery.md` line 4).
    pub async fn redeliver(
        &self,
        scope: &Scope,
        hook_id: u64,
        delivery_id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<(), GithubError> {
        let path = format!("{}/hooks/{hook_id}/deliveries/{delivery_id}/attempts", scope.api_path());
        let (code, _, body) = self.call(Method::POST, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::hooks_refusal(code, &body, &Method::POST, &path, scope));
        }
        Ok(())
    }

    /// `GET /repos/{o}/{r}/actions/jobs/{job_id}`: the job's status (`queued`, `in_progress`, …).
    pub async fn job_status(
        &self,
        repository: &Scope,
        job_id: u64,
        budget: Budget,
        cancel: &CancellationToken,
    ) -> Result<String, GithubError> {
        let path = format!("{}/actions/jobs/{job_id}", repository.api_path());
        let (code, _, body) = self.call(Method::GET, &path, budget, cancel).await?;
        if !code.is_success() {
            return Err(Self::refusal(code, &body, &Method::GET, &path, repository));
        }
        parse_answer::<JobStatus>(code, &body, Method::GET, &path, "the answer has no status").map(|j| j.status)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use reqwest::header::HeaderValue;

    fn headers(pairs: &[(&'static str, &str)]) -> HeaderMap {
        let mut h = HeaderMap::new();
        for (k, v) in pairs {
            h.insert(*k, HeaderValue::from_str(v).unwrap());
        }
        h
    }

    #[test]
    fn success_and_client_errors() {
        assert_eq!(classify(201, &HeaderMap::new(), "", 0, 0, 0.0), Verdict::Done);
        assert_eq!(classify(404, &HeaderMap::new(), "", 0, 0, 0.0), Verdict::Fail);
        assert_eq!(classify(401, &HeaderMap::new(), "", 0, 0, 0.0), Verdict::Fail);
        assert_eq!(
            classify(
                403,
                &headers(&[("x-ratelimit-remaining", "4999")]),
                "{\"message\":\"Must have admin rights\"}",
                0,
                0,
                0.0
            ),
            Verdict::Fail
        );
    }

    #[test]
    fn server_errors_back_off_exponentially() {
        assert_eq!(classify(502, &HeaderMap::new(), "", 0, 0, 0.0), Verdict::Retry(Duration::from_secs(1)));
        assert_eq!(classify(500, &HeaderMap::new(), "", 3, 0, 0.0), Verdict::Retry(Duration::from_secs(8)));
        assert_eq!(classify(503, &HeaderMap::new(), "", 20, 0, 0.0), Verdict::Retry(Duration::from_secs(30)));
    }

    #[test]
    fn rate_limits_follow_the_headers() {
        let primary = headers(&[("x-ratelimit-remaining", "0"), ("x-ratelimit-reset", "1010")]);
        assert_eq!(classify(403, &primary, "", 0, 1000, 0.0), Verdict::Retry(Duration::from_secs(10)));
        assert_eq!(classify(429, &primary, "", 0, 1000, 0.0), Verdict::Retry(Duration::from_secs(10)));
        let secondary = headers(&[("retry-after", "7")]);
        assert_eq!(classify(403, &secondary, "", 0, 1000, 0.0), Verdict::Retry(Duration::from_secs(7)));
        assert_eq!(
            classify(403, &HeaderMap::new(), "You have exceeded a secondary rate limit", 0, 0, 0.0),
            Verdict::Retry(Duration::from_secs(61))
        );
    }

    #[test]
    fn link_header_next() {
        let h = headers(&[(
            "link",
            "<https://api.github.com/x?page=2>; rel=\"next\", <https://api.github.com/x?page=5>; rel=\"last\"",
        )]);
        assert_eq!(next_link(&h).as_deref(), Some("https://api.github.com/x?page=2"));
        assert_eq!(next_link(&headers(&[("link", "<https://a/x?page=1>; rel=\"prev\"")])), None);
    }

    #[test]
    fn github_s_example_delivery_item_parses_and_the_date_header_is_read() {
        // The `hook-delivery-items` example of GitHub's REST description (as docs.github.com
        // "List deliveries for an organization webhook" shows it).
        let page = r#"[{"id": 12345678, "guid": "0b989ba4-242f-11e5-81e1-c7b6966d2516",
            "delivered_at": "2019-06-03T00:57:16Z", "redelivery": false, "duration": 0.27,
            "status": "OK", "status_code": 200, "event": "issues", "action": "opened",
            "installation_id": 123, "repository_id": 456, "throttled_at": "2019-06-03T00:57:16Z"}]"#;
        let items: Vec<DeliveryItem> = serde_json::from_str(page).unwrap();
        assert_eq!((items[0].id, items[0].status_code, items[0].action.as_deref()), (12345678, 200, Some("opened")));
        assert_eq!(http_date("Fri, 04 Dec 2026 18:46:21 GMT"), Some(1_796_409_981));
        assert_eq!(http_date("yesterday"), None);
    }

    #[test]
    fn refusals_name_what_is_wrong() {
        let scope = Scope::Repository { owner: "o".into(), repo: "r".into() };
        let e = Github::hooks_refusal(StatusCode::FORBIDDEN, "{\"message\":\"Not Found\"}", &Method::GET, "p", &scope);
        assert!(matches!(e, GithubError::HooksForbidden { .. }) && e.to_string().contains("admin:org_hook"), "{e}");
        let e = Github::refusal(StatusCode::NOT_FOUND, "", &Method::POST, "p", &scope);
        assert!(e.to_string().contains("repository o/r not found"), "{e}");
        let e = Github::refusal(
            StatusCode::FORBIDDEN,
            "{\"message\":\"Must have admin rights to Repository.\"}",
            &Method::POST,
            "p",
            &scope,
        );
        assert!(
            e.to_string().contains("Must have admin rights") && e.to_string().contains("Administration: write"),
            "{e}"
        );
        assert!(e.is_permanent());
    }
}
