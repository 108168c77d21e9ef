//! `ci-runner controller`'s configuration (issue #9): the single pool of `POST /webhook` from
//! the supervisor's variables, the pools of `POST /webhook/{id}` from the `CONTROLLER_CONFIG`
//! file, and the service's own settings. Read here, as every other setting is, through
//! [`EnvSource`]; every problem is reported at once and no secret value is ever shown.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use serde::Deserialize;

use super::limits::{MAX_CONTROLLER_BODY_BYTES, MAX_CONTROLLER_LIFETIME_SEC};
use super::{valid_runner_name, Collector, ConfigError, Credentials, EnvSource, LogFormat, Scope, Secret};

pub const DEFAULT_CONTROLLER_ADDR: &str = "0.0.0.0:8080";
pub const DEFAULT_DOCKER_SOCKET: &str = "/var/run/docker.sock";
pub const DEFAULT_CONTROLLER_STATE_DIR: &str = "/var/lib/ci-runner-controller";
pub const DEFAULT_CONTROLLER_IMAGE: &str = "ci-runner:latest";
pub const DEFAULT_MAX_RUNNERS: usize = 4;
pub const DEFAULT_MAX_LIFETIME_SEC: u64 = 6 * 3600;
pub const DEFAULT_POLL_MS: u64 = 500;
/// Issue #18: how often the queued jobs are listed through the REST API, for the deliveries
/// that never arrived.
pub const DEFAULT_RECONCILE_SEC: u64 = 60;
/// GitHub caps a delivery at 25 MB; a `workflow_job` payload is a few KiB.
pub const DEFAULT_MAX_BODY_BYTES: usize = 1 << 20;
/// The pool `POST /webhook` serves.
pub const SINGLE_POOL_ID: &str = "default";

/// One pool: a scope, its credentials, the runners it starts and the webhook secret that
/// proves a delivery is GitHub's.
#[derive(Debug, Clone)]
pub struct PoolConfig {
    pub id: String,
    pub scope: Scope,
    /// A PAT or a GitHub App: they mint JIT configurations; they never reach a runner container.
    pub credentials: Credentials,
    /// `None` only with `webhook_url`: then generated once and kept in the state directory.
    pub webhook_secret: Option<Secret>,
    /// Where GitHub should deliver: the repository's or organization's webhook is created or
    /// updated to point here.
    pub webhook_url: Option<String>,
    /// `CONTROLLER_HOOK_ID` / `hook_id`: the id of the webhook that delivers to this pool, whose
    /// failed deliveries an organization's reconciliation redelivers (issue #18); with
    /// `webhook_url`, the id of the webhook the controller creates or updates is used instead.
    pub hook_id: Option<u64>,
    /// The runners' custom labels (the built-in self-hosted, Linux and the engine host's
    /// architecture come with them).
    pub labels: Vec<String>,
    pub max_runners: usize,
    pub min_idle: usize,
    pub image: String,
    /// Extra environment of the runner containers (never a secret of the controller's).
    pub env: Vec<(String, String)>,
    /// `HostConfig.NetworkMode` of the runner containers (`host`, a network's name); unset: the default bridge.
    pub network: Option<String>,
    /// Bind mounts of the runner containers, `host-path:container-path[:ro]`.
    pub binds: Vec<String>,
    pub max_lifetime: Duration,
    pub name_prefix: String,
    pub runner_group_id: u64,
}

#[derive(Debug, Clone)]
pub struct ControllerConfig {
    /// `CONTROLLER_NAME`: labels this controller's containers, so that two controllers on one
    /// engine never adopt each other's.
    pub name: String,
    pub addr: SocketAddr,
    pub docker_socket: PathBuf,
    pub state_dir: PathBuf,
    pub server_url: String,
    pub api_url: String,
    /// `POST /webhook`'s pool, when a scope is set in the environment.
    pub single: Option<PoolConfig>,
    /// `POST /webhook/{id}`'s pools, from `CONTROLLER_CONFIG`.
    pub pools: Vec<PoolConfig>,
    pub poll: Duration,
    /// `CONTROLLER_RECONCILE_SEC`; `None` (`0`): off.
    pub reconcile: Option<Duration>,
    pub max_body: usize,
    pub log_format: LogFormat,
    pub log_filter: String,
}

impl ControllerConfig {
    /// Every pool, the single one first.
    pub fn all_pools(&self) -> impl Iterator<Item = &PoolConfig> {
        self.single.iter().chain(self.pools.iter())
    }

    /// The non-secret settings, for the start-up banner.
    pub fn summary(&self) -> String {
        let pools: Vec<String> = self
            .all_pools()
            .map(|p| {
                format!(
                    "{}:{}:labels={}:max={}:min_idle={}:image={}",
                    p.id,
                    p.scope,
                    p.labels.join(","),
                    p.max_runners,
                    p.min_idle,
                    p.image
                )
            })
            .collect();
        format!(
            "addr={} docker={} state_dir={} api={} pools=[{}]",
            self.addr,
            self.docker_socket.display(),
            self.state_dir.display(),
            self.api_url,
            pools.join(" ")
        )
    }
}

/// One entry of `CONTROLLER_CONFIG` (JSON): `{"pools": [Entry, ...]}`.
#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct Entry {
    id: String,
    #[serde(default)]
    repository: Option<String>,
    #[serde(default)]
    organization: Option<String>,
    /// The name of a file in `SECRETS_DIR` holding a PAT.
    #[serde(default)]
    token_secret: Option<String>,
    #[serde(default)]
    app: Option<AppEntry>,
    /// The name of a file in `SECRETS_DIR` holding the webhook secret.
    #[serde(default)]
    webhook_secret: Option<String>,
    #[serde(default)]
    webhook_url: Option<String>,
    #[serde(default)]
    hook_id: Option<u64>,
    labels: Vec<String>,
    #[serde(default)]
    max_runners: Option<usize>,
    #[serde(default)]
    min_idle: Option<usize>,
    #[serde(default)]
    image: Option<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    #[serde(default)]
    network: Option<String>,
    #[serde(default)]
    binds: Vec<String>,
    #[serde(default)]
    max_lifetime_sec: Option<u64>,
    #[serde(default)]
    name_prefix: Option<String>,
    #[serde(default)]
    runner_group_id: Option<u64>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AppEntry {
    id: u64,
    #[serde(default)]
    installation_id: Option<u64>,
    /// The name of a file in `SECRETS_DIR` holding the App's private key (PEM).
    key_secret: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    pools: Vec<Entry>,
}

/// Environment variable names a pool's `env` may not set: the controller sets them, or they
/// would carry a secret into the runner.
fn reserved_env(name: &str) -> bool {
    super::SECRET_VARS.contains(&name)
        || name.starts_with("ACTIONS_RUNNER_INPUT_")
        || matches!(
            name,
            "RUNNER_JITCONFIG"
                | "GH_REPOSITORY"
                | "GH_ORGANIZATION"
                | "GH_ENTERPRISE"
                | "RUNNER_NAME"
                | "RUNNER_NAME_PREFIX"
                | "RUNNER_EPHEMERAL"
                | "SECRETS_DIR"
        )
}

/// `/host:/container` or `/host:/container:ro|rw`.
fn valid_bind(b: &str) -> bool {
    let parts: Vec<&str> = b.split(':').collect();
    matches!(parts.len(), 2 | 3)
        && parts[0].starts_with('/')
        && parts[1].starts_with('/')
        && parts.get(2).is_none_or(|m| matches!(*m, "ro" | "rw"))
}

fn valid_pool_id(id: &str) -> bool {
    !id.is_empty() && id.len() <= 40 && id.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_'))
}

fn clean_labels(raw: &[String]) -> Option<Vec<String>> {
    let mut labels: Vec<String> = Vec::new();
    for l in raw.iter().map(|l| l.trim()).filter(|l| !l.is_empty()) {
        if l.len() > 256 || l.chars().any(|c| c.is_control() || c == ',') {
            return None;
        }
        if !labels.iter().any(|x| x.eq_ignore_ascii_case(l)) {
            labels.push(l.to_string());
        }
    }
    Some(labels)
}

/// `K=V,K2=V2` (`CONTROLLER_RUNNER_ENV`).
fn parse_env_pairs(raw: &str) -> Option<Vec<(String, String)>> {
    raw.split(',')
        .map(str::trim)
        .filter(|p| !p.is_empty())
        .map(|p| {
            let (k, v) = p.split_once('=')?;
            let k = k.trim();
            (!k.is_empty() && k.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')).then(|| (k.into(), v.into()))
        })
        .collect()
}

/// Reads `CONTROLLER_ADDR`, `DOCKER_HOST`, `CONTROLLER_STATE_DIR`, `GH_SERVER_URL`/`GH_API_URL`,
/// the single pool (`GH_REPOSITORY`/`GH_ORGANIZATION`, credentials, `GH_LABELS`,
/// `WEBHOOK_SECRET`, `WEBHOOK_URL`, `CONTROLLER_*`) and the pools of `CONTROLLER_CONFIG`.
pub fn controller_config(env: &dyn EnvSource) -> Result<ControllerConfig, ConfigError> {
    let mut c = Collector::new(env);
    let name = c.get("CONTROLLER_NAME").unwrap_or_else(|| "ci-runner-controller".into());
    if !valid_runner_name(&name) {
        c.bad("CONTROLLER_NAME", Some(&name), "1-64 characters of A-Z a-z 0-9 . _ -");
    }
    let addr = c.get("CONTROLLER_ADDR").unwrap_or_else(|| DEFAULT_CONTROLLER_ADDR.into());
    let addr = addr.parse::<SocketAddr>().unwrap_or_else(|_| {
        c.bad("CONTROLLER_ADDR", Some(&addr), "an address to listen on, e.g. 0.0.0.0:8080");
        DEFAULT_CONTROLLER_ADDR.parse().expect("the default parses")
    });
    let docker_socket = match c.get("DOCKER_HOST") {
        None => PathBuf::from(DEFAULT_DOCKER_SOCKET),
        Some(h) => match h.strip_prefix("unix://") {
            Some(p) if p.starts_with('/') => PathBuf::from(p),
            _ => {
                c.bad("DOCKER_HOST", Some(&h), "unix:///path/to/docker.sock (the engine's local socket)");
                PathBuf::from(DEFAULT_DOCKER_SOCKET)
            }
        },
    };
    let state_dir = PathBuf::from(c.get("CONTROLLER_STATE_DIR").unwrap_or_else(|| DEFAULT_CONTROLLER_STATE_DIR.into()));
    let (server_url, api_url) = c.urls();
    let poll = Duration::from_millis(match c.get("CONTROLLER_POLL_MS") {
        None => DEFAULT_POLL_MS,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if (50..=60_000).contains(&n) => n,
            _ => {
                c.bad("CONTROLLER_POLL_MS", Some(&v), "milliseconds between checks of the containers, 50 to 60000");
                DEFAULT_POLL_MS
            }
        },
    });
    let reconcile = match c.get("CONTROLLER_RECONCILE_SEC") {
        None => Some(Duration::from_secs(DEFAULT_RECONCILE_SEC)),
        Some(v) => match v.parse::<u64>() {
            Ok(0) => None,
            Ok(n) if n <= 86_400 => Some(Duration::from_secs(n)),
            _ => {
                c.bad(
                    "CONTROLLER_RECONCILE_SEC",
                    Some(&v),
                    "seconds between listings of the queued jobs, 1 to 86400, or 0 for none",
                );
                Some(Duration::from_secs(DEFAULT_RECONCILE_SEC))
            }
        },
    };
    let max_body = match c.get("CONTROLLER_MAX_BODY_BYTES") {
        None => DEFAULT_MAX_BODY_BYTES,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if (1024..=MAX_CONTROLLER_BODY_BYTES).contains(&n) => n,
            _ => {
                c.bad(
                    "CONTROLLER_MAX_BODY_BYTES",
                    Some(&v),
                    format!(
                        "the largest webhook payload accepted, in bytes, from 1024 to {MAX_CONTROLLER_BODY_BYTES} (GitHub's 25 MB cap)"
                    ),
                );
                DEFAULT_MAX_BODY_BYTES
            }
        },
    };
    let (log_format, log_filter) = c.log_settings();

    let single = single_pool(&mut c);
    let pools = match c.get("CONTROLLER_CONFIG") {
        None => Vec::new(),
        Some(path) => file_pools(&mut c, &path),
    };
    if single.is_none() && pools.is_empty() && c.problems.is_empty() {
        c.bad(
            "GH_REPOSITORY",
            None,
            "a pool to serve: GH_REPOSITORY or GH_ORGANIZATION (for POST /webhook), or CONTROLLER_CONFIG (for POST /webhook/{id})",
        );
    }
    if !c.problems.is_empty() {
        return Err(ConfigError(c.problems));
    }
    Ok(ControllerConfig {
        name,
        addr,
        docker_socket,
        state_dir,
        server_url,
        api_url,
        single,
        pools,
        poll,
        reconcile,
        max_body,
        log_format,
        log_filter,
    })
}

/// The pool of `POST /webhook`, when `GH_REPOSITORY` or `GH_ORGANIZATION` is set.
fn single_pool(c: &mut Collector<'_>) -> Option<PoolConfig> {
    if c.get("GH_REPOSITORY").is_none() && c.get("GH_ORGANIZATION").is_none() && c.get("GH_ENTERPRISE").is_none() {
        return None;
    }
    let scope = c.scope();
    if let Some(Scope::Enterprise(e)) = &scope {
        let e = e.clone();
        c.bad(
            "GH_ENTERPRISE",
            Some(&e),
            "GH_REPOSITORY or GH_ORGANIZATION: the controller registers webhooks on a repository or an organization",
        );
    }
    let credentials = match c.credentials() {
        Some(Credentials::RegistrationToken(_)) | Some(Credentials::Jit(_)) => {
            c.bad("GH_TOKEN", None, "a PAT or a GitHub App: the controller mints a JIT configuration per runner");
            None
        }
        other => other,
    };
    let labels = match c.get("GH_LABELS") {
        None => Some(Vec::new()),
        Some(raw) => {
            let l = clean_labels(&raw.split(',').map(str::to_string).collect::<Vec<_>>());
            if l.is_none() {
                c.bad(
                    "GH_LABELS",
                    Some(&raw),
                    "comma-separated labels of at most 256 characters each, without control characters, e.g. linux,docker",
                );
            }
            l
        }
    };
    let webhook_secret = c.secret("WEBHOOK_SECRET").map(Secret::new);
    let webhook_url = super::url_var(c, "WEBHOOK_URL");
    let hook_id = c.get("CONTROLLER_HOOK_ID").and_then(|v| match v.trim().parse::<u64>() {
        Ok(n) if n > 0 => Some(n),
        _ => {
            c.bad(
                "CONTROLLER_HOOK_ID",
                Some(&v),
                "the positive id of the webhook that delivers to POST /webhook (its X-GitHub-Hook-ID header)",
            );
            None
        }
    });
    if webhook_secret.is_none() && webhook_url.is_none() {
        c.bad(
            "WEBHOOK_SECRET",
            None,
            "the webhook's secret (variable or secret file), or WEBHOOK_URL to create the webhook with a generated one",
        );
    }
    let max_runners = count(c, "CONTROLLER_MAX_RUNNERS", DEFAULT_MAX_RUNNERS, 1);
    let min_idle = count(c, "CONTROLLER_MIN_IDLE", 0, 0);
    if min_idle > max_runners {
        c.bad("CONTROLLER_MIN_IDLE", Some(&min_idle.to_string()), "at most CONTROLLER_MAX_RUNNERS");
    }
    let image = c.get("CONTROLLER_IMAGE").unwrap_or_else(|| DEFAULT_CONTROLLER_IMAGE.into());
    let env = match c.get("CONTROLLER_RUNNER_ENV") {
        None => Vec::new(),
        Some(raw) => match parse_env_pairs(&raw) {
            Some(pairs) if pairs.iter().all(|(k, _)| !reserved_env(k)) => pairs,
            _ => {
                c.bad("CONTROLLER_RUNNER_ENV", None, "comma-separated NAME=value pairs for the runner containers, none of them a secret or a variable the controller sets");
                Vec::new()
            }
        },
    };
    let network = c.get("CONTROLLER_NETWORK");
    let binds: Vec<String> = c
        .get("CONTROLLER_RUNNER_BINDS")
        .map(|raw| raw.split(',').map(str::trim).filter(|b| !b.is_empty()).map(str::to_string).collect())
        .unwrap_or_default();
    if binds.iter().any(|b| !valid_bind(b)) {
        let raw = binds.join(",");
        c.bad("CONTROLLER_RUNNER_BINDS", Some(&raw), "comma-separated /host/path:/container/path[:ro] bind mounts");
    }
    let max_lifetime =
        c.positive_seconds("CONTROLLER_MAX_LIFETIME_SEC", DEFAULT_MAX_LIFETIME_SEC, MAX_CONTROLLER_LIFETIME_SEC);
    let name_prefix = c.get("RUNNER_NAME_PREFIX").unwrap_or_else(|| "ci-runner".into());
    if !valid_runner_name(&name_prefix) || name_prefix.len() > 30 {
        c.bad("RUNNER_NAME_PREFIX", Some(&name_prefix), "1-30 characters of A-Z a-z 0-9 . _ -");
    }
    Some(PoolConfig {
        id: SINGLE_POOL_ID.into(),
        scope: scope?,
        credentials: credentials?,
        webhook_secret,
        webhook_url,
        hook_id,
        labels: labels?,
        max_runners,
        min_idle,
        image,
        env,
        network,
        binds,
        max_lifetime,
        name_prefix,
        runner_group_id: crate::github::DEFAULT_RUNNER_GROUP_ID,
    })
}

fn count(c: &mut Collector<'_>, var: &'static str, default: usize, min: usize) -> usize {
    match c.get(var) {
        None => default,
        Some(v) => match v.parse::<usize>() {
            Ok(n) if n >= min && n <= 1000 => n,
            _ => {
                c.bad(var, Some(&v), format!("a whole number from {min} to 1000"));
                default
            }
        },
    }
}

/// The pools of the `CONTROLLER_CONFIG` file; secrets by name, read from `SECRETS_DIR`.
fn file_pools(c: &mut Collector<'_>, path: &str) -> Vec<PoolConfig> {
    const VAR: &str = "CONTROLLER_CONFIG";
    let text = match std::fs::read_to_string(path) {
        Ok(t) => t,
        Err(e) => {
            c.bad(VAR, Some(path), format!("a readable JSON file ({e})"));
            return Vec::new();
        }
    };
    let file: File = match serde_json::from_str(&text) {
        Ok(f) => f,
        Err(e) => {
            c.bad(VAR, Some(path), format!("JSON of the form {{\"pools\": [{{\"id\", \"repository\"|\"organization\", \"token_secret\"|\"app\", \"webhook_secret\", \"labels\", ...}}]}} ({e})"));
            return Vec::new();
        }
    };
    let mut pools: Vec<PoolConfig> = Vec::new();
    for e in file.pools {
        let bad = |c: &mut Collector<'_>, what: String| c.bad(VAR, Some(path), format!("pool {:?}: {what}", e.id));
        if !valid_pool_id(&e.id) || pools.iter().any(|p| p.id == e.id) || e.id == SINGLE_POOL_ID {
            bad(c, "a unique id of 1-40 characters of A-Z a-z 0-9 - _ (not \"default\")".into());
            continue;
        }
        let scope = match (&e.repository, &e.organization) {
            (Some(r), None) => super::repository_scope(r),
            (None, Some(o)) if super::valid_github_name(o) => Some(Scope::Organization(o.clone())),
            _ => None,
        };
        if scope.is_none() {
            bad(c, "exactly one of \"repository\" (owner/repo) or \"organization\"".into());
        }
        let read = |c: &Collector<'_>, name: &str| -> Option<String> {
            if name.is_empty() || name.contains('/') || name.starts_with('.') {
                return None;
            }
            let t = std::fs::read_to_string(c.secrets_dir.join(name)).ok()?;
            Some(t.trim().to_string()).filter(|t| !t.is_empty())
        };
        // A token or a webhook secret is one line; only a key spans several.
        let read_line = |c: &Collector<'_>, name: &str| read(c, name).filter(|t| !t.chars().any(char::is_control));
        let credentials = match (&e.token_secret, &e.app) {
            (Some(name), None) => match read_line(c, name) {
                Some(t) => Some(Credentials::Pat(Secret::new(t))),
                None => {
                    bad(
                        c,
                        format!(
                            "token_secret {name:?}: a non-empty file of that name in {}, one line without control characters",
                            c.secrets_dir.display()
                        ),
                    );
                    None
                }
            },
            (None, Some(app)) => match read(c, &app.key_secret).map(|pem| crate::app::AppKey::from_pem(&pem)) {
                Some(Ok(key)) if app.id > 0 => {
                    Some(Credentials::App { app_id: app.id, key, installation_id: app.installation_id })
                }
                _ => {
                    bad(
                        c,
                        format!(
                            "app: a positive id and key_secret naming a PEM private key file in {}",
                            c.secrets_dir.display()
                        ),
                    );
                    None
                }
            },
            _ => {
                bad(c, "exactly one of \"token_secret\" (a PAT's secret file name) or \"app\"".into());
                None
            }
        };
        let webhook_secret = match &e.webhook_secret {
            Some(name) => {
                let s = read_line(c, name);
                if s.is_none() {
                    bad(
                        c,
                        format!(
                            "webhook_secret {name:?}: a non-empty file of that name in {}, one line without control characters",
                            c.secrets_dir.display()
                        ),
                    );
                }
                s.map(Secret::new)
            }
            None => None,
        };
        let webhook_url = e.webhook_url.clone().filter(|u| super::valid_http_url(u));
        if e.webhook_url.is_some() && webhook_url.is_none() {
            bad(c, "webhook_url: an http(s) URL".into());
        }
        if webhook_secret.is_none() && webhook_url.is_none() && e.webhook_secret.is_none() {
            bad(
                c,
                "webhook_secret (a secret file name), or webhook_url to create the webhook with a generated secret"
                    .into(),
            );
        }
        if e.hook_id == Some(0) {
            bad(c, "hook_id: the positive id of the webhook that delivers to this pool".into());
        }
        let labels = clean_labels(&e.labels);
        if labels.is_none() {
            bad(c, "labels: strings of at most 256 characters, no commas".into());
        }
        let max_runners = e.max_runners.unwrap_or(DEFAULT_MAX_RUNNERS);
        let min_idle = e.min_idle.unwrap_or(0);
        if max_runners == 0 || max_runners > 1000 || min_idle > max_runners {
            bad(c, "max_runners from 1 to 1000 and min_idle at most max_runners".into());
        }
        let env: Vec<(String, String)> = e.env.clone().into_iter().collect();
        if env.iter().any(|(k, _)| reserved_env(k) || k.is_empty()) {
            bad(c, "env: no secret variable and none the controller sets (GH_REPOSITORY, RUNNER_NAME, ...)".into());
        }
        if e.binds.iter().any(|b| !valid_bind(b)) {
            bad(c, "binds: /host/path:/container/path[:ro] bind mounts".into());
        }
        let texts = e.image.iter().chain(&e.network).chain(&e.binds).chain(e.env.keys()).chain(e.env.values());
        if texts.clone().any(|t| t.chars().any(char::is_control))
            || texts.map(String::len).sum::<usize>() > super::limits::MAX_VALUE_LEN
        {
            bad(
                c,
                format!(
                    "image, network, binds and env: no control characters, at most {} bytes in all",
                    super::limits::MAX_VALUE_LEN
                ),
            );
        }
        if e.max_lifetime_sec.is_some_and(|s| !(1..=MAX_CONTROLLER_LIFETIME_SEC).contains(&s)) {
            bad(
                c,
                format!(
                    "max_lifetime_sec: whole seconds from 1 to {MAX_CONTROLLER_LIFETIME_SEC} ({})",
                    super::limits::human_seconds(MAX_CONTROLLER_LIFETIME_SEC)
                ),
            );
        }
        let name_prefix = e.name_prefix.clone().unwrap_or_else(|| format!("ci-runner-{}", e.id));
        if !valid_runner_name(&name_prefix) || name_prefix.len() > 40 {
            bad(c, "name_prefix: 1-40 characters of A-Z a-z 0-9 . _ -".into());
        }
        let (Some(scope), Some(credentials), Some(labels)) = (scope, credentials, labels) else { continue };
        pools.push(PoolConfig {
            id: e.id.clone(),
            scope,
            credentials,
            webhook_secret,
            webhook_url,
            hook_id: e.hook_id.filter(|&id| id > 0),
            labels,
            max_runners,
            min_idle,
            image: e.image.clone().unwrap_or_else(|| DEFAULT_CONTROLLER_IMAGE.into()),
            env,
            network: e.network.clone(),
            binds: e.binds.clone(),
            max_lifetime: Duration::from_secs(
                e.max_lifetime_sec.unwrap_or(DEFAULT_MAX_LIFETIME_SEC).clamp(1, MAX_CONTROLLER_LIFETIME_SEC),
            ),
            name_prefix,
            runner_group_id: e.runner_group_id.unwrap_or(crate::github::DEFAULT_RUNNER_GROUP_ID),
        });
    }
    pools
}

#[cfg(test)]
mod tests {
    use super::*;

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    #[test]
    fn single_pool_from_the_supervisor_s_variables() {
        let cfg = controller_config(&env(&[
            ("GH_TOKEN", "ghp_x"),
            ("GH_REPOSITORY", "o/r"),
            ("GH_LABELS", "gpu, docker"),
            ("WEBHOOK_SECRET", "s3cret"),
            ("CONTROLLER_MAX_RUNNERS", "3"),
            ("SECRETS_DIR", "/nonexistent"),
        ]))
        .unwrap();
        let p = cfg.single.unwrap();
        assert_eq!(p.labels, ["gpu", "docker"]);
        assert_eq!(p.max_runners, 3);
        assert_eq!(p.webhook_secret.unwrap().expose(), "s3cret");
        assert!(cfg.pools.is_empty());
    }

    #[test]
    fn reconciliation_runs_every_minute_by_default_and_0_turns_it_off() {
        let base = [("GH_TOKEN", "ghp_x"), ("GH_REPOSITORY", "o/r"), ("WEBHOOK_SECRET", "s"), ("SECRETS_DIR", "/no")];
        let with = |extra: Option<&str>| {
            let mut pairs = base.to_vec();
            pairs.extend(extra.map(|v| ("CONTROLLER_RECONCILE_SEC", v)));
            controller_config(&env(&pairs))
        };
        assert_eq!(with(None).unwrap().reconcile, Some(Duration::from_secs(60)));
        assert_eq!(with(Some("5")).unwrap().reconcile, Some(Duration::from_secs(5)));
        assert_eq!(with(Some("0")).unwrap().reconcile, None);
        for bad in ["-1", "soon", "86401"] {
            let e = with(Some(bad)).unwrap_err();
            assert!(e.0.iter().any(|p| p.var == "CONTROLLER_RECONCILE_SEC"), "{bad}: {e:?}");
        }
    }

    #[test]
    fn the_hook_id_of_an_organization_s_pool_is_a_positive_number() {
        let base = [("GH_TOKEN", "ghp_x"), ("GH_ORGANIZATION", "o"), ("WEBHOOK_SECRET", "s"), ("SECRETS_DIR", "/no")];
        let with = |v: &str| {
            let mut pairs = base.to_vec();
            pairs.push(("CONTROLLER_HOOK_ID", v));
            controller_config(&env(&pairs))
        };
        assert_eq!(with("42").unwrap().single.unwrap().hook_id, Some(42));
        assert_eq!(controller_config(&env(&base)).unwrap().single.unwrap().hook_id, None);
        for bad in ["0", "-1", "hook"] {
            let e = with(bad).unwrap_err();
            assert_eq!(e.0.iter().map(|p| p.var).collect::<Vec<_>>(), ["CONTROLLER_HOOK_ID"], "{bad}: {e:?}");
        }
    }

    #[test]
    fn problems_are_reported_together_without_secret_values() {
        let e = controller_config(&env(&[
            ("GH_TOKEN", "ghp_hidden"),
            ("GH_REPOSITORY", "o/r"),
            ("CONTROLLER_MAX_RUNNERS", "0"),
            ("CONTROLLER_RUNNER_ENV", "GH_TOKEN=ghp_hidden"),
            ("SECRETS_DIR", "/nonexistent"),
        ]))
        .unwrap_err();
        let vars: Vec<&str> = e.0.iter().map(|p| p.var).collect();
        for v in ["WEBHOOK_SECRET", "CONTROLLER_MAX_RUNNERS", "CONTROLLER_RUNNER_ENV"] {
            assert!(vars.contains(&v), "{v} not reported: {vars:?}");
        }
        assert!(!e.to_string().contains("ghp_hidden") && !format!("{:?}", e.0).contains("ghp_hidden"));
    }

    #[test]
    fn config_file_pools_take_secrets_by_file_name() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("PAT_A"), "ghp_a\n").unwrap();
        std::fs::write(dir.path().join("HOOK_A"), "hook-a\n").unwrap();
        let file = dir.path().join("controller.json");
        std::fs::write(
            &file,
            r#"{"pools": [{"id": "a", "repository": "o/r", "token_secret": "PAT_A", "webhook_secret": "HOOK_A",
                "labels": ["gpu"], "max_runners": 2, "image": "img:1", "env": {"FOO": "bar"}, "network": "host"},
               {"id": "b", "organization": "o", "token_secret": "MISSING", "webhook_secret": "HOOK_A", "labels": [], "hook_id": 9}]}"#,
        )
        .unwrap();
        let sd = dir.path().display().to_string();
        let fp = file.display().to_string();
        let e = controller_config(&env(&[("SECRETS_DIR", &sd), ("CONTROLLER_CONFIG", &fp)])).unwrap_err();
        assert_eq!(e.0.len(), 1, "{e:?}");
        assert!(e.0[0].expected.contains("pool \"b\"") && e.0[0].expected.contains("MISSING"), "{e:?}");
        std::fs::write(dir.path().join("MISSING"), "ghp_b").unwrap();
        let cfg = controller_config(&env(&[("SECRETS_DIR", &sd), ("CONTROLLER_CONFIG", &fp)])).unwrap();
        assert!(cfg.single.is_none());
        let a = &cfg.pools[0];
        assert_eq!((a.id.as_str(), a.max_runners, a.image.as_str()), ("a", 2, "img:1"));
        assert_eq!(a.env, [("FOO".to_string(), "bar".to_string())]);
        assert!(matches!(&a.credentials, Credentials::Pat(t) if t.expose() == "ghp_a"));
        assert_eq!(cfg.pools[1].scope, Scope::Organization("o".into()));
        assert_eq!((a.hook_id, cfg.pools[1].hook_id), (None, Some(9)));
    }

    #[test]
    fn a_pre_minted_jit_configuration_is_the_runner_s_only_credential() {
        let host = super::super::Host { is_root: false, users: &super::super::SystemUsers, runner_dir_ok: &|_| true };
        let base = [("GH_REPOSITORY", "o/r"), ("GH_LABELS", "gpu"), ("SECRETS_DIR", "/nonexistent")];
        let with = |extra: &[(&str, &str)]| {
            let mut pairs = base.to_vec();
            pairs.extend_from_slice(extra);
            super::super::Config::from_env(&env(&pairs), &host)
        };
        let cfg = with(&[("RUNNER_JITCONFIG", "eyJqaXQiOjF9"), ("RUNNER_EPHEMERAL", "true")]).unwrap();
        assert!(matches!(&cfg.credentials, Credentials::Jit(j) if j.expose() == "eyJqaXQiOjF9"));
        assert!(cfg.jit && cfg.ephemeral);
        assert!(!cfg.summary().contains("eyJqaXQiOjF9"));
        let e = with(&[("RUNNER_JITCONFIG", "eyJqaXQiOjF9"), ("GH_TOKEN", "ghp_x")]).unwrap_err();
        let vars: Vec<&str> = e.0.iter().map(|p| p.var).collect();
        assert!(vars.contains(&"GH_TOKEN") && vars.contains(&"RUNNER_EPHEMERAL"), "{vars:?}");
        assert!(!cfg.runner_env.iter().any(|(k, _)| k == "RUNNER_JITCONFIG"));
    }

    #[test]
    fn controller_values_are_bounded_and_checked_each_named() {
        let base = [
            ("GH_TOKEN", "ghp_x"),
            ("GH_REPOSITORY", "o/r"),
            ("WEBHOOK_SECRET", "s3cret"),
            ("SECRETS_DIR", "/nonexistent"),
        ];
        for (var, value, says) in [
            ("CONTROLLER_MAX_LIFETIME_SEC", "10000000000000000000", "from 1 to 604800 (7 days)"),
            ("CONTROLLER_MAX_LIFETIME_SEC", "604801", "from 1 to 604800"),
            ("CONTROLLER_MAX_BODY_BYTES", "99999999999", "from 1024 to 26214400"),
            ("GH_SERVER_URL", "https://ghes.example:99999", "invalid port"),
            ("WEBHOOK_URL", "https://hooks.example/\nx", "control characters"),
            ("WEBHOOK_SECRET", "s3c\nret", "control characters"),
            ("GH_LABELS", "gpu,do\ncker", "control characters"),
            ("CONTROLLER_IMAGE", "img:1\u{1b}", "control characters"),
        ] {
            let mut pairs = base.to_vec();
            pairs.retain(|(k, _)| *k != var);
            pairs.push((var, value));
            let e = controller_config(&env(&pairs)).expect_err(var);
            let vars: Vec<&str> = e.0.iter().map(|p| p.var).collect();
            assert_eq!(vars, [var], "{var}={value:?}: {:?}", e.0);
            assert!(e.0[0].to_string().contains(says), "{var}: {}", e.0[0]);
            if var == "WEBHOOK_SECRET" {
                assert!(!e.0[0].to_string().contains("s3c"), "the secret was shown: {}", e.0[0]);
            }
        }
    }

    #[test]
    fn config_file_pools_bound_the_lifetime_and_refuse_control_characters() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("PAT"), "ghp_a\n").unwrap();
        std::fs::write(dir.path().join("TWO_LINES"), "ghp_a\nghp_b\n").unwrap();
        std::fs::write(dir.path().join("HOOK"), "hook\n").unwrap();
        let file = dir.path().join("controller.json");
        let sd = dir.path().display().to_string();
        let fp = file.display().to_string();
        for (pool, says) in [
            (r#""token_secret": "PAT", "max_lifetime_sec": 10000000000000000000"#, "max_lifetime_sec"),
            (r#""token_secret": "TWO_LINES""#, "one line without control characters"),
            (r#""token_secret": "PAT", "image": "img\u001b:1""#, "no control characters"),
            (r#""token_secret": "PAT", "webhook_url": "https://h.example:99999/""#, "webhook_url"),
        ] {
            let text = format!(
                r#"{{"pools": [{{"id": "a", "repository": "o/r", "webhook_secret": "HOOK", "labels": ["gpu"], {pool}}}]}}"#
            );
            std::fs::write(&file, text).unwrap();
            let e = controller_config(&env(&[("SECRETS_DIR", &sd), ("CONTROLLER_CONFIG", &fp)])).unwrap_err();
            assert!(e.0.iter().all(|p| p.var == "CONTROLLER_CONFIG"), "{e:?}");
            assert!(e.0.iter().any(|p| p.expected.contains(says)), "{pool}: {e:?}");
            assert!(!format!("{e:?}").contains("ghp_b"), "{e:?}");
        }
    }
}
