//! Configuration from the environment: the only module that reads it.
//!
//! Raw strings become typed values once, here; every bad variable is collected and reported
//! together, with its name, its value (never for a secret) and the expected form, before any
//! network call or child process.

use std::collections::BTreeMap;
use std::fmt;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::Duration;

use crate::forward::{Forward, Options as ForwardOptions};

/// Environment variables that hold secrets. They are never logged and never reach the runner.
pub const SECRET_VARS: &[&str] = &[
    "GH_TOKEN",
    "GH_RUNNER_TOKEN",
    "GITHUB_TOKEN",
    "GH_APP_PRIVATE_KEY",
    "CI_STORAGE_PRIVATE_KEY",
    "ADMIN_TOKEN",
    "ACTIONS_RUNNER_INPUT_TOKEN",
    "ACTIONS_RUNNER_INPUT_PAT",
    "ACTIONS_RUNNER_INPUT_JITCONFIG",
    // A JIT configuration minted by `ci-runner controller` for this container (issue #9).
    "RUNNER_JITCONFIG",
    // ci-runner's own AWS keys (CloudWatch); jobs get AWS access through the task role.
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONTAINER_AUTHORIZATION_TOKEN",
];

/// Where configuration comes from: the process environment in production, a map in tests.
pub trait EnvSource {
    fn get(&self, name: &str) -> Option<String>;
    /// Every variable, for building the runner's environment.
    fn vars(&self) -> Vec<(String, String)>;
}

/// The real process environment.
pub struct ProcessEnv;

impl EnvSource for ProcessEnv {
    fn get(&self, name: &str) -> Option<String> {
        std::env::var(name).ok()
    }
    fn vars(&self) -> Vec<(String, String)> {
        std::env::vars_os().filter_map(|(k, v)| Some((k.into_string().ok()?, v.into_string().ok()?))).collect()
    }
}

impl EnvSource for BTreeMap<String, String> {
    fn get(&self, name: &str) -> Option<String> {
        BTreeMap::get(self, name).cloned()
    }
    fn vars(&self) -> Vec<(String, String)> {
        self.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
    }
}

/// A secret value whose Debug and Display print `***`.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(String);

impl Secret {
    pub fn new(value: impl Into<String>) -> Self {
        Self(value.into())
    }
    pub fn expose(&self) -> &str {
        &self.0
    }
}

impl fmt::Debug for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

impl fmt::Display for Secret {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("***")
    }
}

/// How the supervisor obtains a registration token.
#[derive(Debug, Clone)]
pub enum Credentials {
    /// A personal access token: exchanged for registration tokens, and used to de-register.
    Pat(Secret),
    /// A ready registration token: used as is; the supervisor cannot de-register by itself.
    RegistrationToken(Secret),
    /// A GitHub App: its JWT buys installation tokens, which are used like a PAT.
    App {
        app_id: u64,
        key: crate::app::AppKey,
        /// `GH_APP_INSTALLATION_ID`; else found from the repository or organization.
        installation_id: Option<u64>,
    },
    /// `RUNNER_JITCONFIG`: a JIT configuration minted elsewhere (by `ci-runner controller`,
    /// issue #9), run as is; the container holds no token, so it cannot de-register itself.
    Jit(Secret),
}

/// Where the runner is registered.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Scope {
    Repository {
        owner: String,
        repo: String,
    },
    Organization(String),
    /// An enterprise, by its slug.
    Enterprise(String),
}

impl Scope {
    /// The REST path prefix: `repos/{owner}/{repo}`, `orgs/{org}` or `enterprises/{slug}`.
    pub fn api_path(&self) -> String {
        match self {
            Scope::Repository { owner, repo } => format!("repos/{owner}/{repo}"),
            Scope::Organization(org) => format!("orgs/{org}"),
            Scope::Enterprise(slug) => format!("enterprises/{slug}"),
        }
    }
    /// The path part of the runner's `--url`: `owner/repo`, `org` or `enterprises/slug`.
    pub fn url_path(&self) -> String {
        match self {
            Scope::Repository { owner, repo } => format!("{owner}/{repo}"),
            Scope::Organization(org) => org.clone(),
            Scope::Enterprise(slug) => format!("enterprises/{slug}"),
        }
    }
    /// The repository name, when the scope is a repository.
    pub fn repo(&self) -> Option<&str> {
        match self {
            Scope::Repository { repo, .. } => Some(repo),
            Scope::Organization(_) | Scope::Enterprise(_) => None,
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Scope::Repository { owner, repo } => write!(f, "repository {owner}/{repo}"),
            Scope::Organization(org) => write!(f, "organization {org}"),
            Scope::Enterprise(slug) => write!(f, "enterprise {slug}"),
        }
    }
}

/// How the runner's name is chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RunnerName {
    Exact(String),
    /// `<prefix>-<YYYYmmdd-HHMMSS>-<random>`: unique even for containers started in one second.
    Prefix(String),
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum LogFormat {
    Plain,
    Json,
}

/// The user the runner processes run as.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerUser {
    pub name: String,
    pub uid: u32,
    pub gid: u32,
    pub home: PathBuf,
}

/// The typed configuration; the rest of the code sees only this.
#[derive(Debug, Clone)]
pub struct Config {
    pub credentials: Credentials,
    pub scope: Scope,
    pub labels: Vec<String>,
    pub name: RunnerName,
    pub group: Option<String>,
    pub ephemeral: bool,
    /// `RUNNER_EPHEMERAL_RESTART`: after an ephemeral runner's job, register a fresh one in the
    /// same container instead of exiting.
    pub ephemeral_restart: bool,
    /// Register through `generate-jitconfig` and `ACTIONS_RUNNER_INPUT_JITCONFIG` instead of
    /// config.sh (`RUNNER_JIT`; the default for ephemeral runners when the API can mint one).
    pub jit: bool,
    pub no_default_labels: bool,
    pub disable_update: bool,
    /// `RUNNER_MIN_VERSION`: with updates disabled, an older runner is refused at start
    /// (after the update at boot, when one ran: the check sees the version it left).
    pub min_version: crate::runner::RunnerVersion,
    /// `RUNNER_UPDATE_AT_BOOT`: before anything registers, the install is brought to the
    /// latest release when it is old or below `RUNNER_MIN_VERSION` ([`crate::update`]).
    pub update: Option<UpdateSettings>,
    pub work_dir: String,
    pub server_url: String,
    pub api_url: String,
    pub runner_dir: PathBuf,
    /// `None` when the supervisor is not root: everything then runs as the current user.
    pub runner_user: Option<RunnerUser>,
    pub drain_timeout: Duration,
    /// `RUNNER_STOP_GRACE_SEC`: how long a Listener told to stop may take before it is killed.
    pub stop_grace: Duration,
    pub shutdown_delay: Duration,
    pub status_addr: Option<SocketAddr>,
    pub log_format: LogFormat,
    pub log_filter: String,
    /// The hardware lock, when `RUNNER_RESOURCE_ID` names a resource.
    pub lock: Option<crate::lock::LockConfig>,
    /// Where `entrypoint.*.sh` boot hooks are found: run as root, then as the runner user.
    pub root_hooks_dir: PathBuf,
    pub guest_hooks_dir: PathBuf,
    /// The environment the runner starts from, with every secret removed.
    pub runner_env: Vec<(String, String)>,
    /// The boot-time pre-warm of the work dir from ci-storage, when `CI_STORAGE_HOST` is set.
    pub prewarm: Option<crate::prewarm::Settings>,
    /// `TZ`, checked against the zone database; `None` when unset.
    pub tz: Option<String>,
    /// The zone database `TZ` was checked against (`TZDIR`, default `/usr/share/zoneinfo`).
    pub zoneinfo: PathBuf,
    /// The port forwards (`FORWARD_HOST`, `FORWARD_PORTS`), when both are set.
    pub forwards: Option<(Vec<Forward>, ForwardOptions)>,
    /// CloudWatch, ECS scale-in protection and the spot watch.
    pub autoscale: AutoscaleSettings,
    /// `RUNNER_INSTANCE_LABELS`: labels added per instance of a pool.
    pub instance_labels: Option<crate::instance::InstanceLabels>,
    /// `RUNNER_SWEEP_OFFLINE_SEC`: before registering, remove the pool's runners that are
    /// offline and were registered at least this long ago (README "Fleet hygiene").
    pub sweep_offline: Option<Duration>,
    /// `RUNNER_COUNT`: how many runners of this scope and labels the container runs (README
    /// "Several runners per container"); 0 only with the admin API, which adds them.
    pub runner_count: u32,
    /// `RUNNER_ROOTS_DIR`: where each runner's own root is made from the install in
    /// `runner_dir` when the container runs more than the one runner in `runner_dir` itself.
    pub roots_dir: PathBuf,
    /// The admin API (`ADMIN_TOKEN`, `ADMIN_ADDR`), off without a token.
    pub admin: Option<AdminSettings>,
    /// `STATE_DIR`: where runners added over the admin API are kept across restarts.
    pub state_dir: Option<PathBuf>,
    /// `SECRETS_DIR`: where secret files were read from; kept from the runner user (secrets.rs).
    pub secrets_dir: PathBuf,
    /// `CI_RUNNER_TEST_PANIC=<n>[:busy]`, test-only and in debug builds only: the n-th runner
    /// of `RUNNER_COUNT` panics in its task once registered (or once busy with a job), so the
    /// tests can check the panic path (de-registered, exit 1). Release builds neither read nor
    /// have it.
    #[cfg(debug_assertions)]
    pub test_panic_runner: Option<(u32, bool)>,
}

/// `RUNNER_UPDATE_AT_BOOT` and its settings (README "Ephemeral runners, JIT and updates").
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct UpdateSettings {
    /// `RUNNER_UPDATE_AFTER_DAYS`: an install whose `.updated_at` is older than this (or
    /// missing) is due, as the original's `find -mtime +21`.
    pub after: Duration,
    /// `RUNNER_CACHE_DIR`: the downloaded tarballs, kept across boots when it is a volume.
    pub cache_dir: PathBuf,
    /// `RUNNER_RELEASES_URL`: `<url>/latest` redirects to the newest tag, and
    /// `<url>/download/v<ver>/<asset>` serves the tarballs (the web, not the API).
    pub releases_url: String,
    /// `RUNNER_RELEASES_API_URL`: `<url>/tags/v<ver>` gives the release's published
    /// checksums (one REST call, only when no trusted checksum is cached).
    pub releases_api_url: String,
    /// `RUNNER_UPDATE_TIMEOUT_SEC`: the whole update's bound; past it the installed runner is used.
    pub timeout: Duration,
}

/// The test-only variable of [`Config::test_panic_runner`] (debug builds only).
#[cfg(debug_assertions)]
pub const TEST_PANIC_VAR: &str = "CI_RUNNER_TEST_PANIC";

/// The admin API's address and bearer token.
#[derive(Debug, Clone)]
pub struct AdminSettings {
    pub addr: SocketAddr,
    pub token: Secret,
}

/// Most runners one container may run (`RUNNER_COUNT`).
pub const MAX_RUNNER_COUNT: u32 = 64;
pub const DEFAULT_ADMIN_ADDR: &str = "0.0.0.0:8081";

/// What the autoscaling signals need (README "Autoscaling").
#[derive(Debug, Clone)]
pub struct AutoscaleSettings {
    pub aws: crate::aws::AwsSettings,
    /// `CLOUDWATCH_ENABLED`: `None` (unset) publishes when a region and credentials are found.
    pub cloudwatch: Option<bool>,
    pub namespace: String,
    pub metric_name: String,
    pub dimensions: Vec<(String, String)>,
    pub heartbeat: Duration,
    pub storage_resolution: u32,
    /// `ECS_AGENT_URI`: set by the ECS agent in every task.
    pub ecs_agent_uri: Option<String>,
    pub protection_expires_min: u32,
    /// `SPOT_WATCH` (default on: watched when the instance metadata service answers).
    pub spot_watch: bool,
    pub spot_poll: Duration,
    /// `BTIME`: the host's boot time (Unix seconds, `/proc/stat`'s `btime` on the host), which
    /// turns on the original image's boot and uptime figures (its guest hook 98).
    pub btime: Option<u64>,
    /// The boot figures' dimensions between `Region` and `InstanceId`, as the original's hook 98
    /// sets them: the scope's (`GH_REPOSITORY=owner/repo`), then `GH_LABEL`, the last of
    /// `GH_LABELS`.
    pub boot_dimensions: Vec<(String, String)>,
    /// When the container started (PID 1's start), for the boot and uptime figures.
    pub started: Option<std::time::SystemTime>,
}

pub const DEFAULT_CLOUDWATCH_NAMESPACE: &str = "ci-storage/metrics";
pub const DEFAULT_CLOUDWATCH_METRIC: &str = "ActiveRunnersPercent";
pub const DEFAULT_CLOUDWATCH_HEARTBEAT_SEC: u64 = 60;
pub const DEFAULT_PROTECTION_EXPIRES_MIN: u32 = 60;
pub const DEFAULT_SPOT_POLL_SEC: u64 = 2;

pub const DEFAULT_RUNNER_DIR: &str = "/home/guest/actions-runner";
pub const DEFAULT_STATUS_ADDR: &str = "127.0.0.1:8080";
pub const DEFAULT_DRAIN_TIMEOUT_SEC: u64 = 600;
/// GitHub's minimum runner version for a registration in 2026 (anchors.md §1.4).
pub const DEFAULT_MIN_RUNNER_VERSION: crate::runner::RunnerVersion = crate::runner::RunnerVersion(2, 329, 0);
pub const DEFAULT_NAME_PREFIX: &str = "ci-storage";
pub const DEFAULT_LOCK_DIR: &str = "/tmp/github-runner-locks";
pub const DEFAULT_SECRETS_DIR: &str = "/run/secrets";
pub const DEFAULT_STORAGE_DIR: &str = "/mnt";
pub const DEFAULT_STORAGE_MAX_AGE_SEC: u64 = 1800;
pub const DEFAULT_STORAGE_TIMEOUT_SEC: u64 = 300;
pub const DEFAULT_STORAGE_CONNECT_TIMEOUT_SEC: u64 = 10;
pub const DEFAULT_STORAGE_STALL_TIMEOUT_SEC: u64 = 30;
/// `CI_STORAGE_PROGRESS_SEC`: a pre-warm logs how far it got this often.
pub const DEFAULT_STORAGE_PROGRESS_SEC: f64 = 5.0;
pub const DEFAULT_ZONEINFO: &str = "/usr/share/zoneinfo";
/// The shortest `RUNNER_SWEEP_OFFLINE_SEC`: a peer registers before it is online, and must
/// never be swept in between (README "Fleet hygiene").
pub const MIN_SWEEP_OFFLINE_SEC: u64 = 60;

/// One bad variable: its name, the value shown (None for secrets) and what was expected.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    pub var: &'static str,
    pub value: Option<String>,
    pub expected: String,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.value {
            Some(v) => write!(f, "{}={:?}: expected {}", self.var, v, self.expected),
            None => write!(f, "{}: expected {}", self.var, self.expected),
        }
    }
}

/// Every problem found in the environment, reported together.
#[derive(Debug, thiserror::Error)]
#[error("invalid configuration ({} problem{})", .0.len(), if .0.len() == 1 { "" } else { "s" })]
pub struct ConfigError(pub Vec<Problem>);

/// Looks up a user in the system's user database.
pub trait UserDb {
    fn lookup(&self, name: &str) -> Option<RunnerUser>;
}

/// The container's user database: `/etc/passwd` read directly (as runc does), so no NSS
/// module is loaded into the supervisor; a name it lacks is asked of `getpwnam` (NSS).
pub struct SystemUsers;

impl UserDb for SystemUsers {
    fn lookup(&self, name: &str) -> Option<RunnerUser> {
        if let Some(u) = std::fs::read_to_string("/etc/passwd").ok().and_then(|t| passwd_entry(&t, name)) {
            return Some(u);
        }
        let user = nix::unistd::User::from_name(name).ok()??;
        Some(RunnerUser { name: user.name, uid: user.uid.as_raw(), gid: user.gid.as_raw(), home: user.dir })
    }
}

/// `name`'s line of an `/etc/passwd` text (`name:x:uid:gid:gecos:home:shell`).
pub fn passwd_entry(text: &str, name: &str) -> Option<RunnerUser> {
    text.lines().find_map(|line| {
        let f: Vec<&str> = line.split(':').collect();
        if f.len() < 7 || f[0] != name {
            return None;
        }
        Some(RunnerUser { name: name.to_string(), uid: f[2].parse().ok()?, gid: f[3].parse().ok()?, home: f[5].into() })
    })
}

/// The groups of `name` in an `/etc/group` text (`name:x:gid:member,member`), after its
/// primary group `gid`.
pub fn member_groups(text: &str, name: &str, gid: u32) -> Vec<u32> {
    let mut groups = vec![gid];
    for line in text.lines() {
        let f: Vec<&str> = line.split(':').collect();
        let Some(id) = f.get(2).and_then(|g| g.parse::<u32>().ok()) else { continue };
        if f.len() >= 4 && f[3].split(',').any(|m| m.trim() == name) && !groups.contains(&id) {
            groups.push(id);
        }
    }
    groups
}

/// Facts about the running process that the configuration depends on.
pub struct Host<'a> {
    pub is_root: bool,
    pub users: &'a dyn UserDb,
    /// Whether `RUNNER_DIR` holds the runner's scripts; checked on the real filesystem in
    /// production, stubbed in unit tests.
    pub runner_dir_ok: &'a dyn Fn(&std::path::Path) -> bool,
}

struct Collector<'a> {
    env: &'a dyn EnvSource,
    problems: Vec<Problem>,
    secrets_dir: PathBuf,
    /// Variables refused as a whole (a control character, too long): reported once, and no
    /// further complaint about them, which would only repeat it.
    refused: Vec<&'static str>,
}

/// Variables whose value is never shown in a problem: the secrets, and the controller's
/// webhook secret and runner environment (which may carry one).
fn hidden(var: &str) -> bool {
    SECRET_VARS.contains(&var) || matches!(var, "WEBHOOK_SECRET" | "CONTROLLER_RUNNER_ENV")
}

impl<'a> Collector<'a> {
    /// Secrets are read from `SECRETS_DIR` (default `/run/secrets`) when their variable is unset.
    fn new(env: &'a dyn EnvSource) -> Self {
        let mut c = Collector::bare(env);
        if let Some(dir) = c.get("SECRETS_DIR") {
            c.secrets_dir = PathBuf::from(dir);
        }
        c
    }

    /// A collector for commands that read no secret.
    fn bare(env: &'a dyn EnvSource) -> Self {
        Collector { env, problems: Vec::new(), secrets_dir: PathBuf::from(DEFAULT_SECRETS_DIR), refused: Vec::new() }
    }

    /// A secret from its variable, or else from the file `<SECRETS_DIR>/<NAME>` (Docker and
    /// compose secrets), read once here and trimmed; checked as every value is, never shown.
    fn secret(&mut self, var: &'static str) -> Option<String> {
        let value = self.raw(var).or_else(|| {
            let text = std::fs::read_to_string(self.secrets_dir.join(var)).ok()?;
            Some(text.trim().to_string()).filter(|t| !t.is_empty())
        })?;
        self.check(var, &value, true);
        Some(value)
    }

    /// Refuses `value` of `var` as a whole when it is too long or holds a control character
    /// ([`limits::refused`]); once per variable.
    fn check(&mut self, var: &'static str, value: &str, secret: bool) {
        if self.refused.contains(&var) {
            return;
        }
        if let Some(expected) = limits::refused(var, value) {
            let shown = (!secret && value.len() <= 256).then_some(value);
            self.bad(var, shown, expected);
            self.refused.push(var);
        }
    }

    /// A token (a PAT, a registration token, a JIT configuration): one word.
    fn token(&mut self, var: &'static str, value: &str) {
        if value.chars().any(char::is_whitespace) {
            self.bad(var, None, "a token without spaces or line breaks");
        }
    }

    /// `GH_TOKEN` (a PAT), `GH_RUNNER_TOKEN` (a registration token) or a GitHub App
    /// (`GH_APP_ID`, `GH_APP_PRIVATE_KEY`, `GH_APP_INSTALLATION_ID`): exactly one.
    fn credentials(&mut self) -> Option<Credentials> {
        if let Some(jit) = self.secret("RUNNER_JITCONFIG") {
            return self.jit_credentials(jit);
        }
        let pat = self.secret("GH_TOKEN");
        let reg = self.secret("GH_RUNNER_TOKEN");
        let app_id = self.get("GH_APP_ID");
        let installation = self.get("GH_APP_INSTALLATION_ID");
        if app_id.is_none() {
            // A key file in SECRETS_DIR alone is not an error (the directory may hold other
            // things); a key or installation in a variable without the App's id is.
            for var in ["GH_APP_PRIVATE_KEY", "GH_APP_INSTALLATION_ID"] {
                if self.get(var).is_some() {
                    self.bad("GH_APP_ID", None, format!("the GitHub App's id (a number), to go with {var}"));
                }
            }
        }
        if let Some(p) = &pat {
            self.token("GH_TOKEN", p);
        }
        if let Some(r) = &reg {
            self.token("GH_RUNNER_TOKEN", r);
        }
        match (pat, reg, app_id) {
            (Some(p), None, None) => Some(Credentials::Pat(Secret::new(p))),
            (None, Some(r), None) => Some(Credentials::RegistrationToken(Secret::new(r))),
            (None, None, Some(id)) => self.app_credentials(&id, installation.as_deref()),
            (Some(_), Some(_), _) => {
                self.bad(
                    "GH_TOKEN",
                    None,
                    "either GH_TOKEN (a PAT) or GH_RUNNER_TOKEN (a registration token), not both",
                );
                None
            }
            (pat, _, Some(id)) => {
                let other = if pat.is_some() { "GH_TOKEN (a PAT)" } else { "GH_RUNNER_TOKEN (a registration token)" };
                self.bad("GH_APP_ID", Some(&id), format!("either GH_APP_ID (a GitHub App) or {other}, not both"));
                None
            }
            (None, None, None) => {
                self.bad("GH_TOKEN", None, "a personal access token with admin rights on the repository or organization (or set GH_APP_ID and GH_APP_PRIVATE_KEY for a GitHub App, or GH_RUNNER_TOKEN to a registration token)");
                None
            }
        }
    }

    /// The App's id, its private key (variable or secret file, never shown) and installation.
    fn app_credentials(&mut self, id: &str, installation: Option<&str>) -> Option<Credentials> {
        let app_id = id.parse::<u64>().ok().filter(|n| *n > 0);
        if app_id.is_none() {
            self.bad("GH_APP_ID", Some(id), "the GitHub App's numeric id (its settings page: App ID), e.g. 123456");
        }
        let installation_id = match installation {
            None => None,
            Some(i) => {
                let n = i.parse::<u64>().ok().filter(|n| *n > 0);
                if n.is_none() {
                    self.bad(
                        "GH_APP_INSTALLATION_ID",
                        Some(i),
                        "the installation's numeric id (the number at the end of its settings URL), or unset to find it from the repository or organization",
                    );
                }
                n
            }
        };
        let file = self.secrets_dir.join("GH_APP_PRIVATE_KEY");
        let form = format!(
            "the GitHub App's private key in PEM (-----BEGIN RSA PRIVATE KEY----- as GitHub issues it, or PKCS#8 -----BEGIN PRIVATE KEY-----), in the variable or in {}",
            file.display()
        );
        let key = match self.secret("GH_APP_PRIVATE_KEY") {
            None => {
                self.bad("GH_APP_PRIVATE_KEY", None, form);
                None
            }
            Some(pem) => match crate::app::AppKey::from_pem(&pem) {
                Ok(key) => Some(key),
                Err(e) => {
                    self.bad("GH_APP_PRIVATE_KEY", None, format!("{form}; {e}"));
                    None
                }
            },
        };
        Some(Credentials::App { app_id: app_id?, key: key?, installation_id })
    }

    /// A non-empty value, trimmed; empty counts as unset (as in the original image's `${X:=}`).
    /// Every value is checked for control characters and length here ([`Collector::check`]).
    fn get(&mut self, var: &'static str) -> Option<String> {
        let value = self.raw(var)?;
        self.check(var, &value, hidden(var));
        Some(value)
    }

    /// [`Collector::get`] without the check, for [`Collector::secret`], which checks its own.
    fn raw(&self, var: &'static str) -> Option<String> {
        self.env.get(var).map(|v| v.trim().to_string()).filter(|v| !v.is_empty())
    }

    fn bad(&mut self, var: &'static str, value: Option<&str>, expected: impl Into<String>) {
        if self.refused.contains(&var) {
            return;
        }
        self.problems.push(Problem { var, value: value.map(str::to_string), expected: expected.into() });
    }

    fn bool(&mut self, var: &'static str, default: bool) -> bool {
        match self.get(var) {
            None => default,
            Some(v) => match parse_bool(&v) {
                Some(b) => b,
                None => {
                    self.bad(var, Some(&v), "a boolean: true/false, 1/0, yes/no");
                    default
                }
            },
        }
    }

    /// `LOG_FORMAT` and `RUST_LOG`.
    fn log_settings(&mut self) -> (LogFormat, String) {
        let log_format = match self.get("LOG_FORMAT").as_deref() {
            None | Some("plain") => LogFormat::Plain,
            Some("json") => LogFormat::Json,
            Some(other) => {
                let other = other.to_string();
                self.bad("LOG_FORMAT", Some(&other), "plain or json");
                LogFormat::Plain
            }
        };
        let log_filter = self.get("RUST_LOG").unwrap_or_else(|| "info".to_string());
        if tracing_subscriber::EnvFilter::try_new(&log_filter).is_err() {
            self.bad("RUST_LOG", Some(&log_filter), "a tracing filter, e.g. info or ci_runner=debug");
        }
        (log_format, log_filter)
    }

    /// Whole seconds from 1 to `max`.
    fn positive_seconds(&mut self, var: &'static str, default: u64, max: u64) -> Duration {
        self.seconds_in(var, default, 1, max)
    }

    /// `RUNNER_USER` (default `guest`) when the supervisor is root; `None` otherwise, as
    /// everything then runs as the current user.
    fn runner_user(&mut self, host: &Host<'_>) -> Option<RunnerUser> {
        if !host.is_root {
            return None;
        }
        let name = self.get("RUNNER_USER").unwrap_or_else(|| "guest".to_string());
        let user = host.users.lookup(&name);
        if user.is_none() {
            self.bad("RUNNER_USER", Some(&name), "an existing user to run the runner as (the image has `guest`)");
        }
        user
    }

    /// Whole seconds from 0 to `max`.
    fn seconds(&mut self, var: &'static str, default: u64, max: u64) -> Duration {
        self.seconds_in(var, default, 0, max)
    }

    /// Whole seconds from `min` to `max`: every duration from the environment is bounded here,
    /// so that no deadline computed from one can overflow. A value outside is named with the
    /// range, and the default is used meanwhile (the start fails anyway).
    fn seconds_in(&mut self, var: &'static str, default: u64, min: u64, max: u64) -> Duration {
        let Some(v) = self.get(var) else { return Duration::from_secs(default) };
        match v.parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => Duration::from_secs(n),
            _ => {
                let expected =
                    format!("a whole number of seconds from {min} to {max} ({})", limits::human_seconds(max));
                self.bad(var, Some(&v), expected);
                Duration::from_secs(default)
            }
        }
    }
}

/// Parses the booleans every variable accepts; anything else is an error, so `EPHEMERAL=0`
/// can never mean "on".
pub fn parse_bool(value: &str) -> Option<bool> {
    match value.trim().to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" | "on" => Some(true),
        "false" | "0" | "no" | "off" => Some(false),
        _ => None,
    }
}

fn is_name_char(c: char) -> bool {
    c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.')
}

fn valid_github_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 100 && s.chars().all(is_name_char) && s != "." && s != ".."
}

/// Runner names become file and URL components: keep them to a safe alphabet.
pub fn valid_runner_name(s: &str) -> bool {
    !s.is_empty() && s.len() <= 64 && s.chars().all(is_name_char) && !s.starts_with('.')
}

/// A scope as the admin API takes it: `owner/repo` (a repository) or `org` (an organization).
pub fn parse_scope(s: &str) -> Option<Scope> {
    if s.contains('/') {
        repository_scope(s)
    } else {
        valid_github_name(s).then(|| Scope::Organization(s.to_string()))
    }
}

/// Labels as `GH_LABELS` takes them: each at most 256 characters, no control characters,
/// duplicates (ignoring case) dropped; `None` when one is bad or none is left.
pub fn parse_labels<'a>(raw: impl IntoIterator<Item = &'a str>) -> Option<Vec<String>> {
    let mut labels: Vec<String> = Vec::new();
    for l in raw.into_iter().map(str::trim).filter(|l| !l.is_empty()) {
        if l.len() > 256 || l.chars().any(|ch| ch.is_control()) {
            return None;
        }
        if !labels.iter().any(|x| x.eq_ignore_ascii_case(l)) {
            labels.push(l.to_string());
        }
    }
    (!labels.is_empty()).then_some(labels)
}

/// `owner/repo` as a repository scope, when both names are valid.
fn repository_scope(r: &str) -> Option<Scope> {
    let (o, n) = r.split_once('/')?;
    (valid_github_name(o) && valid_github_name(n))
        .then(|| Scope::Repository { owner: o.to_string(), repo: n.to_string() })
}

fn strip_slash(s: &str) -> String {
    s.trim_end_matches('/').to_string()
}

/// The REST API base for a server URL: `api.github.com` for github.com, `api.<host>` for
/// GHE.com data residency, `<server>/api/v3` for GitHub Enterprise Server.
pub fn default_api_url(server_url: &str) -> String {
    let rest = server_url.split_once("://").map(|(_, r)| r).unwrap_or(server_url);
    let host = rest.split('/').next().unwrap_or("");
    let scheme = server_url.split_once("://").map(|(s, _)| s).unwrap_or("https");
    if host.eq_ignore_ascii_case("github.com") {
        "https://api.github.com".to_string()
    } else if host.to_ascii_lowercase().ends_with(".ghe.com") {
        format!("{scheme}://api.{host}")
    } else {
        format!("{}/api/v3", strip_slash(server_url))
    }
}

/// A GitHub server or API URL: [`limits::http_url`], and no query or fragment, as paths are
/// appended to it.
fn github_url(s: &str) -> Result<reqwest::Url, String> {
    let url = limits::http_url(s)?;
    if url.query().is_some() || url.fragment().is_some() {
        return Err("no ?query or #fragment".into());
    }
    Ok(url)
}

fn valid_http_url(s: &str) -> bool {
    limits::http_url(s).is_ok()
}

impl Config {
    /// Reads and validates every variable, returning all problems at once.
    pub fn from_env(env: &dyn EnvSource, host: &Host<'_>) -> Result<Config, ConfigError> {
        let mut c = Collector::new(env);

        let credentials = c.credentials();

        let scope = c.scope();
        if let (Some(Credentials::App { app_id, .. }), Some(Scope::Enterprise(_))) = (&credentials, &scope) {
            // §8.4: App installation tokens do not work on the enterprise runner endpoints.
            let id = app_id.to_string();
            c.bad(
                "GH_APP_ID",
                Some(&id),
                "no GitHub App with GH_ENTERPRISE: GitHub does not let App tokens manage enterprise runners; set GH_TOKEN to a classic PAT with manage_runners:enterprise",
            );
        }

        let labels = match c.get("GH_LABELS") {
            None => {
                c.bad("GH_LABELS", None, "comma-separated runner labels, e.g. linux,docker");
                Vec::new()
            }
            Some(raw) => parse_labels(raw.split(',')).unwrap_or_else(|| {
                c.bad(
                    "GH_LABELS",
                    Some(&raw),
                    "comma-separated labels of at most 256 characters each, without control characters, e.g. linux,docker",
                );
                Vec::new()
            }),
        };

        let name = c.runner_name();

        let group = c.get("RUNNER_GROUP");
        if let (Some(g), Some(Scope::Repository { .. })) = (&group, &scope) {
            let g = g.clone();
            c.bad(
                "RUNNER_GROUP",
                Some(&g),
                "no group for a repository runner: runner groups exist only with GH_ORGANIZATION or GH_ENTERPRISE",
            );
        }
        let ephemeral = c.bool("RUNNER_EPHEMERAL", false);
        let no_default_labels = c.bool("RUNNER_NO_DEFAULT_LABELS", false);
        let disable_update = c.bool("RUNNER_DISABLE_UPDATE", true);
        let ephemeral_restart = c.bool("RUNNER_EPHEMERAL_RESTART", false);
        if let (true, false, Some(raw)) = (ephemeral_restart, ephemeral, c.get("RUNNER_EPHEMERAL_RESTART")) {
            c.bad(
                "RUNNER_EPHEMERAL_RESTART",
                Some(&raw),
                "RUNNER_EPHEMERAL=true with it (it registers a fresh ephemeral runner after each job)",
            );
        }
        let jit = jit_setting(&mut c, ephemeral, credentials.as_ref());
        let min_version = match c.get("RUNNER_MIN_VERSION") {
            None => DEFAULT_MIN_RUNNER_VERSION,
            Some(v) => crate::runner::RunnerVersion::parse(&v).unwrap_or_else(|| {
                c.bad("RUNNER_MIN_VERSION", Some(&v), "a runner version, e.g. 2.329.0");
                DEFAULT_MIN_RUNNER_VERSION
            }),
        };
        let update = update_settings(&mut c);
        let work_dir = c.get("RUNNER_WORKDIR").unwrap_or_else(|| "_work".to_string());
        if work_dir.contains('\n') {
            c.bad("RUNNER_WORKDIR", Some(&work_dir), "a directory path");
        }

        let (server_url, api_url) = c.urls();

        let runner_dir = PathBuf::from(c.get("RUNNER_DIR").unwrap_or_else(|| DEFAULT_RUNNER_DIR.to_string()));
        if !(host.runner_dir_ok)(&runner_dir) {
            let shown = runner_dir.display().to_string();
            c.bad("RUNNER_DIR", Some(&shown), "the actions runner's directory, holding config.sh and run.sh");
        }

        let runner_user = c.runner_user(host);

        let drain_timeout = c.seconds("DRAIN_TIMEOUT_SEC", DEFAULT_DRAIN_TIMEOUT_SEC, limits::MAX_DRAIN_TIMEOUT_SEC);
        let stop_grace = c.positive_seconds(
            "RUNNER_STOP_GRACE_SEC",
            crate::supervisor::STOP_GRACE.as_secs(),
            limits::MAX_STOP_GRACE_SEC,
        );
        let shutdown_delay = c.seconds("DEBUG_SHUTDOWN_DELAY_SEC", 0, limits::MAX_SHUTDOWN_DELAY_SEC);

        let status_addr = match status_addr(env) {
            Ok(a) => a,
            Err(p) => {
                c.problems.push(p);
                None
            }
        };

        let (log_format, log_filter) = c.log_settings();

        let lock_dir = PathBuf::from(c.get("RUNNER_LOCK_DIR").unwrap_or_else(|| DEFAULT_LOCK_DIR.to_string()));
        let lock_timeout = c
            .get("RUNNER_LOCK_TIMEOUT_SEC")
            .map(|_| c.seconds("RUNNER_LOCK_TIMEOUT_SEC", 0, limits::MAX_LOCK_TIMEOUT_SEC));
        let instance_labels = match (c.get("RUNNER_INSTANCE_LABELS"), c.get("RUNNER_INSTANCE")) {
            (None, None) => None,
            (None, Some(_)) => {
                c.bad("RUNNER_INSTANCE_LABELS", None, "a table of key:labels entries for RUNNER_INSTANCE to pick from, e.g. 1:board,phytiumpi;2:board,rk3568");
                None
            }
            (Some(table), explicit) => match crate::instance::parse_table(&table) {
                Some(table) => Some(crate::instance::InstanceLabels { table, explicit, dir: lock_dir.clone() }),
                None => {
                    c.bad("RUNNER_INSTANCE_LABELS", Some(&table), "key:label,label entries separated by ';' (keys of A-Z a-z 0-9 . _ -, each once), e.g. 1:board,phytiumpi;2:board,rk3568");
                    None
                }
            },
        };
        let lock = match c.get("RUNNER_RESOURCE_ID") {
            None => None,
            Some(id) if valid_runner_name(&id) => {
                if !lock_dir.is_absolute() {
                    let shown = lock_dir.display().to_string();
                    c.bad("RUNNER_LOCK_DIR", Some(&shown), "an absolute directory path, bind-mounted from the host");
                }
                Some(crate::lock::LockConfig { resource: id, dir: lock_dir, timeout: lock_timeout })
            }
            Some(id) => {
                c.bad(
                    "RUNNER_RESOURCE_ID",
                    Some(&id),
                    "a resource name of A-Z a-z 0-9 . _ - (at most 64), e.g. board-1",
                );
                None
            }
        };

        let root_hooks_dir = PathBuf::from(c.get("ROOT_HOOKS_DIR").unwrap_or_else(|| "/root".into()));
        let guest_hooks_dir = PathBuf::from(c.get("GUEST_HOOKS_DIR").unwrap_or_else(|| "/home/guest".into()));

        let runner_env = runner_env(env);
        job_hooks(&mut c);
        let prewarm = prewarm_settings(&mut c, scope.as_ref(), &runner_dir, &work_dir, runner_user.as_ref());
        let forwards = forward_settings(env).unwrap_or_else(|p| {
            c.problems.extend(p);
            None
        });
        let mut autoscale = autoscale_settings(&mut c, scope.as_ref());
        if let Some(label) = labels.last() {
            autoscale.boot_dimensions.push(("GH_LABEL".to_string(), label.clone()));
        }
        let sweep_offline = sweep_setting(&mut c, credentials.as_ref(), &name);
        let (runner_count, roots_dir, admin, state_dir) = several_runners(&mut c, &runner_dir);
        if let Some(Credentials::Jit(_)) = &credentials {
            // One JIT configuration registers one runner, once.
            if runner_count != 1 {
                c.bad(
                    "RUNNER_COUNT",
                    Some(&runner_count.to_string()),
                    "1 with RUNNER_JITCONFIG (the configuration registers one runner)",
                );
            }
            if admin.is_some() {
                c.bad("ADMIN_TOKEN", None, "unset with RUNNER_JITCONFIG (a runner started with a JIT configuration has no credentials to add runners with)");
            }
        }
        if runner_count > 1 {
            if let Some(l) = &lock {
                let expected = format!("1 with RUNNER_RESOURCE_ID={}: the hardware lock lets one job at a time use the device, so more runners in one container would only wait on each other", l.resource);
                c.bad("RUNNER_COUNT", Some(&runner_count.to_string()), expected);
            }
        }
        let tz = c.get("TZ");
        let zoneinfo = PathBuf::from(c.get("TZDIR").unwrap_or_else(|| DEFAULT_ZONEINFO.into()));
        if let Some(tz) = &tz {
            if !known_zone(&zoneinfo, tz) {
                let tz = tz.clone();
                c.bad("TZ", Some(&tz), format!("a time zone in {}, e.g. UTC or Europe/Berlin", zoneinfo.display()));
            }
        }

        #[cfg(debug_assertions)]
        let test_panic_runner = c.get(TEST_PANIC_VAR).map(|v| {
            let (n, busy) = v.strip_suffix(":busy").map_or((v.as_str(), false), |n| (n, true));
            let n = n.parse::<u32>().ok().filter(|n| *n >= 1).unwrap_or_else(|| {
                c.bad(TEST_PANIC_VAR, Some(&v), "test-only: <n>[:busy], the runner (from 1) whose task panics");
                0
            });
            (n, busy)
        });

        if !c.problems.is_empty() {
            return Err(ConfigError(c.problems));
        }
        let (Some(credentials), Some(scope)) = (credentials, scope) else {
            unreachable!("a missing credential or scope is always reported as a problem");
        };
        Ok(Config {
            credentials,
            scope,
            labels,
            name,
            group,
            ephemeral,
            ephemeral_restart,
            jit,
            no_default_labels,
            disable_update,
            min_version,
            update,
            work_dir,
            server_url,
            api_url,
            runner_dir,
            runner_user,
            drain_timeout,
            stop_grace,
            shutdown_delay,
            status_addr,
            log_format,
            log_filter,
            lock,
            root_hooks_dir,
            guest_hooks_dir,
            runner_env,
            prewarm,
            tz,
            zoneinfo,
            forwards,
            autoscale,
            instance_labels,
            sweep_offline,
            runner_count,
            roots_dir,
            admin,
            state_dir,
            secrets_dir: c.secrets_dir.clone(),
            #[cfg(debug_assertions)]
            test_panic_runner,
        })
    }

    /// The `--url` given to `config.sh`.
    pub fn runner_url(&self) -> String {
        format!("{}/{}", self.server_url, self.scope.url_path())
    }

    /// The non-secret settings, for the start-up banner.
    pub fn summary(&self) -> String {
        let creds = match &self.credentials {
            Credentials::Pat(_) => "GH_TOKEN".to_string(),
            Credentials::RegistrationToken(_) => "GH_RUNNER_TOKEN".to_string(),
            Credentials::Jit(_) => "RUNNER_JITCONFIG".to_string(),
            Credentials::App { app_id, installation_id: Some(i), .. } => format!("app:{app_id}/installation:{i}"),
            Credentials::App { app_id, installation_id: None, .. } => format!("app:{app_id}"),
        };
        format!(
            "scope={} labels={} credentials={} group={} ephemeral={} ephemeral_restart={} jit={} runner_dir={} work_dir={} api={} drain_timeout={}s user={}",
            self.scope,
            self.labels.join(","),
            creds,
            self.group.as_deref().unwrap_or("(default)"),
            self.ephemeral,
            self.ephemeral_restart,
            self.jit,
            self.runner_dir.display(),
            self.work_dir,
            self.api_url,
            self.drain_timeout.as_secs(),
            self.runner_user.as_ref().map(|u| u.name.as_str()).unwrap_or("(self)"),
        )
    }
}

/// The default of `RUNNER_CACHE_DIR` (the image makes it, root's, 0755: see [`crate::update`]).
pub const DEFAULT_RUNNER_CACHE_DIR: &str = "/var/cache/ci-runner";
/// The default of `RUNNER_RELEASES_URL`.
pub const DEFAULT_RUNNER_RELEASES_URL: &str = "https://github.com/actions/runner/releases";
/// The default of `RUNNER_RELEASES_API_URL`.
pub const DEFAULT_RUNNER_RELEASES_API_URL: &str = "https://api.github.com/repos/actions/runner/releases";

/// `RUNNER_UPDATE_AT_BOOT` (default off) and, checked even when it is off, its settings.
fn update_settings(c: &mut Collector<'_>) -> Option<UpdateSettings> {
    let on = c.bool("RUNNER_UPDATE_AT_BOOT", false);
    let days = match c.get("RUNNER_UPDATE_AFTER_DAYS") {
        None => 21,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if n <= 3650 => n,
            _ => {
                c.bad("RUNNER_UPDATE_AFTER_DAYS", Some(&v), "a whole number of days from 0 to 3650, e.g. 21");
                21
            }
        },
    };
    let cache_dir = PathBuf::from(c.get("RUNNER_CACHE_DIR").unwrap_or_else(|| DEFAULT_RUNNER_CACHE_DIR.to_string()));
    if !cache_dir.is_absolute() {
        let shown = cache_dir.display().to_string();
        c.bad("RUNNER_CACHE_DIR", Some(&shown), "an absolute directory path, e.g. /var/cache/ci-runner");
    }
    let url = |c: &mut Collector<'_>, var: &'static str, default: &str| {
        let v = strip_slash(&c.get(var).unwrap_or_else(|| default.to_string()));
        if let Err(why) = github_url(&v) {
            c.bad(var, Some(&v), format!("an http(s) URL, e.g. {default}: {why}"));
        }
        v
    };
    let releases_url = url(c, "RUNNER_RELEASES_URL", DEFAULT_RUNNER_RELEASES_URL);
    let releases_api_url = url(c, "RUNNER_RELEASES_API_URL", DEFAULT_RUNNER_RELEASES_API_URL);
    let timeout = c.positive_seconds("RUNNER_UPDATE_TIMEOUT_SEC", 300, 3600);
    on.then(|| UpdateSettings {
        after: Duration::from_secs(days * 86_400),
        cache_dir,
        releases_url,
        releases_api_url,
        timeout,
    })
}

/// `RUNNER_JIT`: unset, JIT for ephemeral runners whenever the credentials can mint a JIT
/// configuration (a ready registration token cannot); `true` where that is impossible is an
/// error, as is `true` without `RUNNER_EPHEMERAL` (a JIT runner takes one job).
fn jit_setting(c: &mut Collector<'_>, ephemeral: bool, credentials: Option<&Credentials>) -> bool {
    if let Some(Credentials::Jit(_)) = credentials {
        if !ephemeral {
            c.bad("RUNNER_EPHEMERAL", None, "true with RUNNER_JITCONFIG (a JIT runner takes one job)");
        }
        return true;
    }
    let can_mint = !matches!(credentials, Some(Credentials::RegistrationToken(_)));
    let Some(raw) = c.get("RUNNER_JIT") else { return ephemeral && can_mint };
    if !c.bool("RUNNER_JIT", false) {
        return false;
    }
    if !can_mint {
        c.bad(
            "RUNNER_JIT",
            Some(&raw),
            "GH_TOKEN or a GitHub App with it: a registration token (GH_RUNNER_TOKEN) cannot mint a JIT configuration",
        );
    }
    if !ephemeral {
        c.bad("RUNNER_JIT", Some(&raw), "RUNNER_EPHEMERAL=true with it (a JIT runner takes one job)");
    }
    can_mint && ephemeral
}

/// The supervisor's environment minus every secret and every variable that would change how
/// run.sh handles signals: the runner and its jobs start from this.
fn runner_env(env: &dyn EnvSource) -> Vec<(String, String)> {
    env.vars()
        .into_iter()
        .filter(|(k, _)| {
            !SECRET_VARS.contains(&k.as_str())
                && !k.starts_with("ACTIONS_RUNNER_INPUT_")
                && k != "RUNNER_MANUALLY_TRAP_SIG"
        })
        .collect()
}

/// The runner's own job hooks (`ACTIONS_RUNNER_HOOK_JOB_STARTED`/`_COMPLETED`): the runner
/// runs an absolute path to a `.sh` script with `bash --noprofile --norc -e -o pipefail` (its
/// `.ps1` needs PowerShell, which this image has not); anything else would fail every job.
fn job_hooks(c: &mut Collector<'_>) {
    for var in ["ACTIONS_RUNNER_HOOK_JOB_STARTED", "ACTIONS_RUNNER_HOOK_JOB_COMPLETED"] {
        let Some(v) = c.get(var).filter(|v| !v.is_empty()) else { continue };
        if !v.starts_with('/') || !v.ends_with(".sh") {
            c.bad(var, Some(&v), "an absolute path to a .sh script (the runner runs it with bash)");
        }
    }
}

/// `RUNNER_COUNT`, `RUNNER_ROOTS_DIR`, `ADMIN_TOKEN` with `ADMIN_ADDR`, and `STATE_DIR`.
fn several_runners(
    c: &mut Collector<'_>,
    runner_dir: &std::path::Path,
) -> (u32, PathBuf, Option<AdminSettings>, Option<PathBuf>) {
    let token = c.secret("ADMIN_TOKEN");
    let admin = match token {
        None => None,
        Some(t) if t.len() < 16 || t.chars().any(|ch| ch.is_whitespace() || ch.is_control()) => {
            c.bad(
                "ADMIN_TOKEN",
                None,
                "a bearer token of at least 16 characters, no spaces (e.g. from openssl rand -hex 32)",
            );
            None
        }
        Some(t) => {
            let raw = c.get("ADMIN_ADDR").unwrap_or_else(|| DEFAULT_ADMIN_ADDR.to_string());
            match raw.trim().parse::<SocketAddr>() {
                Ok(addr) => Some(AdminSettings { addr, token: Secret::new(t) }),
                Err(_) => {
                    c.bad("ADMIN_ADDR", Some(&raw), "ip:port to serve the admin API on, e.g. 0.0.0.0:8081");
                    None
                }
            }
        }
    };
    let count = match c.get("RUNNER_COUNT") {
        None => 1,
        Some(raw) => match raw.trim().parse::<u32>() {
            Ok(0) if admin.is_some() => 0,
            Ok(n) if (1..=MAX_RUNNER_COUNT).contains(&n) => n,
            _ => {
                let expected = format!(
                    "a number of runners from 1 to {MAX_RUNNER_COUNT} (0 only with ADMIN_TOKEN, to add them over the admin API)"
                );
                c.bad("RUNNER_COUNT", Some(&raw), expected);
                1
            }
        },
    };
    let default_roots = runner_dir.parent().map(|p| p.join("runners")).unwrap_or_else(|| PathBuf::from("/runners"));
    let roots = c.get("RUNNER_ROOTS_DIR").map(PathBuf::from).unwrap_or(default_roots);
    if !roots.is_absolute() {
        let shown = roots.display().to_string();
        c.bad("RUNNER_ROOTS_DIR", Some(&shown), "an absolute directory path on the runner install's filesystem");
    }
    let state_dir = c.get("STATE_DIR").map(PathBuf::from);
    if let Some(d) = &state_dir {
        if !d.is_absolute() {
            let shown = d.display().to_string();
            c.bad("STATE_DIR", Some(&shown), "an absolute directory path (a mounted volume)");
        }
        if admin.is_none() {
            let shown = d.display().to_string();
            c.bad(
                "STATE_DIR",
                Some(&shown),
                "set only with ADMIN_TOKEN: it keeps the runners added over the admin API",
            );
        }
    }
    (count, roots, admin, state_dir)
}

/// An `http://` or `https://` URL, or a problem.
fn url_var(c: &mut Collector<'_>, var: &'static str) -> Option<String> {
    let v = c.get(var)?;
    match limits::http_url(&v) {
        Ok(_) => Some(v.trim_end_matches('/').to_string()),
        Err(why) => {
            c.bad(var, Some(&v), format!("an http:// or https:// URL: {why}"));
            None
        }
    }
}

/// The AWS standard chain's variables, CloudWatch's, the ECS agent's and the spot watch's.
fn autoscale_settings(c: &mut Collector<'_>, scope: Option<&Scope>) -> AutoscaleSettings {
    use crate::aws::{AwsSettings, Credentials as AwsCredentials, DEFAULT_IMDS_URL};
    // Each is checked and named as set: AWS_DEFAULT_REGION is the one many images set.
    let mut region = None;
    for var in ["AWS_REGION", "AWS_DEFAULT_REGION"] {
        let Some(r) = c.get(var) else { continue };
        if !limits::valid_region(&r) {
            let max = limits::MAX_REGION_LEN;
            c.bad(var, Some(&r), format!("an AWS region of at most {max} characters of a-z 0-9 -, e.g. us-east-1"));
        }
        region = region.or(Some(r));
    }
    let static_credentials = match (c.get("AWS_ACCESS_KEY_ID"), c.secret("AWS_SECRET_ACCESS_KEY")) {
        (Some(id), Some(secret)) => Some(AwsCredentials {
            access_key_id: id,
            secret_access_key: Secret::new(secret),
            session_token: c.secret("AWS_SESSION_TOKEN").map(Secret::new),
            expires: None,
        }),
        (Some(_), None) => {
            c.bad("AWS_SECRET_ACCESS_KEY", None, "the secret key that goes with AWS_ACCESS_KEY_ID");
            None
        }
        (None, Some(_)) => {
            c.bad("AWS_ACCESS_KEY_ID", None, "the access key id that goes with AWS_SECRET_ACCESS_KEY");
            None
        }
        (None, None) => None,
    };
    // The SDK's container provider reads these itself (and re-reads the token file on every
    // fetch, as EKS Pod Identity rotates it); their forms are checked here, the allow-list of
    // full URIs is the SDK's.
    if let Some(rel) = c.get("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI") {
        if !rel.starts_with('/') {
            c.bad(
                "AWS_CONTAINER_CREDENTIALS_RELATIVE_URI",
                Some(&rel),
                "a path starting with /, as the ECS agent sets it",
            );
        }
    }
    let _ = url_var(c, "AWS_CONTAINER_CREDENTIALS_FULL_URI");
    let ecs_metadata_url = url_var(c, "ECS_CONTAINER_METADATA_URI_V4");
    let imds_url = if c.bool("AWS_EC2_METADATA_DISABLED", false) {
        None
    } else {
        Some(url_var(c, "AWS_EC2_METADATA_SERVICE_ENDPOINT").unwrap_or_else(|| DEFAULT_IMDS_URL.to_string()))
    };
    let cloudwatch_url = url_var(c, "AWS_ENDPOINT_URL_CLOUDWATCH").or_else(|| url_var(c, "AWS_ENDPOINT_URL"));

    let cloudwatch = c.get("CLOUDWATCH_ENABLED").map(|_| c.bool("CLOUDWATCH_ENABLED", true));
    let namespace = c.get("CLOUDWATCH_NAMESPACE").unwrap_or_else(|| DEFAULT_CLOUDWATCH_NAMESPACE.to_string());
    if namespace.len() > 255 || namespace.starts_with("AWS/") || namespace.contains(':') {
        let n = namespace.clone();
        c.bad(
            "CLOUDWATCH_NAMESPACE",
            Some(&n),
            "a CloudWatch namespace of at most 255 characters, not starting with AWS/, without ':'",
        );
    }
    let metric_name = c.get("CLOUDWATCH_METRIC_NAME").unwrap_or_else(|| DEFAULT_CLOUDWATCH_METRIC.to_string());
    if metric_name.len() > 255 {
        let n = metric_name.clone();
        c.bad("CLOUDWATCH_METRIC_NAME", Some(&n), "a metric name of at most 255 characters");
    }
    let dimensions = match c.get("CLOUDWATCH_DIMENSIONS") {
        Some(v) => {
            match parse_dimensions(&v) {
                Some(d) => d,
                None => {
                    c.bad("CLOUDWATCH_DIMENSIONS", Some(&v), "Name=Value pairs separated by commas (at most 30), e.g. GH_REPOSITORY=owner/repo,GH_LABEL=linux");
                    Vec::new()
                }
            }
        }
        None => scope_dimension(scope).into_iter().collect(),
    };
    let heartbeat = c.positive_seconds(
        "CLOUDWATCH_HEARTBEAT_SEC",
        DEFAULT_CLOUDWATCH_HEARTBEAT_SEC,
        limits::MAX_CLOUDWATCH_HEARTBEAT_SEC,
    );
    let storage_resolution = match c.get("CLOUDWATCH_STORAGE_RESOLUTION").as_deref() {
        None | Some("1") => 1,
        Some("60") => 60,
        Some(other) => {
            let other = other.to_string();
            c.bad("CLOUDWATCH_STORAGE_RESOLUTION", Some(&other), "1 (high resolution) or 60");
            1
        }
    };
    let ecs_agent_uri = url_var(c, "ECS_AGENT_URI");
    let protection_expires_min = match c.get("ECS_PROTECTION_EXPIRES_MIN") {
        None => DEFAULT_PROTECTION_EXPIRES_MIN,
        Some(v) => match v.parse::<u32>() {
            Ok(n) if (1..=2880).contains(&n) => n,
            _ => {
                c.bad("ECS_PROTECTION_EXPIRES_MIN", Some(&v), "whole minutes from 1 to 2880");
                DEFAULT_PROTECTION_EXPIRES_MIN
            }
        },
    };
    let spot_watch = c.bool("SPOT_WATCH", true);
    let spot_poll = c.positive_seconds("SPOT_POLL_SEC", DEFAULT_SPOT_POLL_SEC, limits::MAX_SPOT_POLL_SEC);
    // The original image's `${BTIME:=}`: empty is unset; anything else must be the digits of
    // `/proc/stat`'s btime (and not in the future).
    let btime = match c.get("BTIME") {
        None => None,
        Some(v) => match v.parse::<u64>() {
            Ok(n) if v.bytes().all(|b| b.is_ascii_digit()) && n <= crate::status::now() + 86400 => Some(n),
            _ => {
                c.bad("BTIME", Some(&v), "the host's boot time in Unix seconds (digits, as in /proc/stat's btime line), e.g. BTIME=$(awk '/^btime/{print $2}' /proc/stat)");
                None
            }
        },
    };
    AutoscaleSettings {
        aws: AwsSettings { region, static_credentials, ecs_metadata_url, imds_url, cloudwatch_url },
        cloudwatch,
        namespace,
        metric_name,
        dimensions,
        heartbeat,
        storage_resolution,
        ecs_agent_uri,
        protection_expires_min,
        spot_watch,
        spot_poll,
        btime,
        boot_dimensions: scope_dimension(scope).into_iter().collect(),
        started: None,
    }
}

/// The dimension naming the runner's scope, as the original's variables name it.
fn scope_dimension(scope: Option<&Scope>) -> Option<(String, String)> {
    match scope? {
        Scope::Repository { owner, repo } => Some(("GH_REPOSITORY".to_string(), format!("{owner}/{repo}"))),
        Scope::Organization(org) => Some(("GH_ORGANIZATION".to_string(), org.clone())),
        Scope::Enterprise(slug) => Some(("GH_ENTERPRISE".to_string(), slug.clone())),
    }
}

/// `Name=Value,Name=Value`.
pub fn parse_dimensions(v: &str) -> Option<Vec<(String, String)>> {
    let dims: Option<Vec<(String, String)>> = v
        .split(',')
        .map(|pair| {
            let (name, value) = pair.split_once('=')?;
            let (name, value) = (name.trim(), value.trim());
            (!name.is_empty() && !value.is_empty() && name.len() <= 255 && value.len() <= 1024)
                .then(|| (name.to_string(), value.to_string()))
        })
        .collect();
    dims.filter(|d| d.len() <= 30)
}

/// The pre-warm settings: `CI_STORAGE_HOST` turns it on; the key comes from
/// `CI_STORAGE_PRIVATE_KEY` (variable or secret file); the work dir is the runner's default
/// workspace `{work}/{repo}/{repo}`, and the storage dir the one ci-storage's action derives.
fn prewarm_settings(
    c: &mut Collector<'_>,
    scope: Option<&Scope>,
    runner_dir: &std::path::Path,
    work_dir: &str,
    runner_user: Option<&RunnerUser>,
) -> Option<crate::prewarm::Settings> {
    use crate::prewarm::{Settings, StorageHost};
    let raw = c.get("CI_STORAGE_HOST")?;
    let host = StorageHost::parse(&raw)
        .filter(|h| limits::valid_host(&h.host) && h.user.as_deref().is_none_or(limits::valid_ssh_user));
    if host.is_none() {
        let shown = (raw.len() <= 512).then_some(raw.as_str());
        c.bad(
            "CI_STORAGE_HOST",
            shown,
            format!(
                "[user@]host[:port], e.g. 127.0.0.1:10022 or guest@storage: a host name of at most {} characters or an IP address, a port from 1 to 65535, a user of A-Z a-z 0-9 . _ -",
                limits::MAX_HOSTNAME_LEN
            ),
        );
    }
    let key = c.secret("CI_STORAGE_PRIVATE_KEY");
    if key.is_none() {
        let file = c.secrets_dir.join("CI_STORAGE_PRIVATE_KEY");
        c.bad(
            "CI_STORAGE_PRIVATE_KEY",
            None,
            format!(
                "an SSH private key (OpenSSH or PEM) in {} or in the variable, for CI_STORAGE_HOST",
                file.display()
            ),
        );
    }
    let repository = match scope {
        Some(s @ Scope::Repository { .. }) => Some(s.url_path()),
        _ => None,
    };
    if repository.is_none() && scope.is_some() {
        c.bad("CI_STORAGE_HOST", Some(&raw), "to be used with GH_REPOSITORY: ci-storage slots are per repository");
    }
    let root = c.get("CI_STORAGE_DIR").unwrap_or_else(|| DEFAULT_STORAGE_DIR.into());
    if !root.starts_with('/') && !root.starts_with("~/") {
        c.bad("CI_STORAGE_DIR", Some(&root), "an absolute directory on the storage host, e.g. /mnt");
    }
    let max_age = c.seconds("CI_STORAGE_MAX_AGE_SEC", DEFAULT_STORAGE_MAX_AGE_SEC, limits::MAX_STORAGE_MAX_AGE_SEC);
    let timeout =
        c.positive_seconds("CI_STORAGE_TIMEOUT_SEC", DEFAULT_STORAGE_TIMEOUT_SEC, limits::MAX_STORAGE_TIMEOUT_SEC);
    let connect_timeout = c.positive_seconds(
        "CI_STORAGE_CONNECT_TIMEOUT_SEC",
        DEFAULT_STORAGE_CONNECT_TIMEOUT_SEC,
        limits::MAX_STORAGE_WAIT_SEC,
    );
    let stall_timeout = c.positive_seconds(
        "CI_STORAGE_STALL_TIMEOUT_SEC",
        DEFAULT_STORAGE_STALL_TIMEOUT_SEC,
        limits::MAX_STORAGE_WAIT_SEC,
    );
    let known_hosts = match c.get("CI_STORAGE_KNOWN_HOSTS") {
        Some(p) => {
            let p = PathBuf::from(p);
            if !p.is_file() {
                let shown = p.display().to_string();
                c.bad("CI_STORAGE_KNOWN_HOSTS", Some(&shown), "a readable known_hosts file (OpenSSH format)");
            }
            Some(p)
        }
        None => Some(c.secrets_dir.join("CI_STORAGE_KNOWN_HOSTS")).filter(|p| p.is_file()),
    };
    let streams = match c.get("CI_STORAGE_STREAMS") {
        None => crate::prewarm::default_streams(),
        Some(v) => match v.parse::<usize>() {
            Ok(n @ 1..=16) => n,
            _ => {
                c.bad("CI_STORAGE_STREAMS", Some(&v), "a number of parallel SSH sessions from 1 to 16");
                2
            }
        },
    };
    let progress_every = match c.get("CI_STORAGE_PROGRESS_SEC") {
        None => Some(Duration::from_secs_f64(DEFAULT_STORAGE_PROGRESS_SEC)),
        Some(v) => match v.parse::<f64>() {
            Ok(0.0) => None,
            Ok(n) if (0.1..=3600.0).contains(&n) => Some(Duration::from_secs_f64(n)),
            _ => {
                c.bad(
                    "CI_STORAGE_PROGRESS_SEC",
                    Some(&v),
                    "seconds between the pre-warm's progress lines, from 0.1 to 3600 (decimals allowed), or 0 for none",
                );
                None
            }
        },
    };
    let meta_dir = PathBuf::from(c.env.get("TMPDIR").filter(|t| t.starts_with('/')).unwrap_or_else(|| "/tmp".into()));
    let (host, key, repository) = (host?, key?, repository?);
    let work = std::path::Path::new(work_dir);
    let work = if work.is_absolute() { work.to_path_buf() } else { runner_dir.join(work) };
    let name = repository.rsplit('/').next().unwrap_or(&repository).to_string();
    let local_dir = work.join(&name).join(&name);
    let user = match (&host.user, runner_user) {
        (Some(u), _) => u.clone(),
        (None, Some(u)) => u.name.clone(),
        (None, None) => nix::unistd::User::from_uid(nix::unistd::geteuid())
            .ok()
            .flatten()
            .map(|u| u.name)
            .unwrap_or_else(|| "guest".into()),
    };
    Some(Settings {
        storage_dir: Settings::storage_dir_for(&root, &repository, &local_dir),
        host,
        user,
        key: Secret::new(key),
        local_dir,
        max_age,
        connect_timeout,
        stall_timeout,
        timeout,
        known_hosts,
        owner: runner_user.map(|u| (u.uid, u.gid)),
        meta_dir,
        streams,
        progress_every,
    })
}

/// The pre-warm alone, for `ci-runner prewarm`: `GH_REPOSITORY`, `RUNNER_DIR`,
/// `RUNNER_WORKDIR`, `RUNNER_USER` and the `CI_STORAGE_*` variables, read as the supervisor
/// reads them; no GitHub credentials needed. `Ok(None)` when `CI_STORAGE_HOST` is unset.
pub fn prewarm_only(env: &dyn EnvSource, host: &Host<'_>) -> Result<Option<crate::prewarm::Settings>, ConfigError> {
    let mut c = Collector::new(env);
    let shown = c.get("GH_REPOSITORY");
    let scope = shown.as_deref().and_then(repository_scope);
    if scope.is_none() {
        c.bad("GH_REPOSITORY", shown.as_deref(), "owner/repo, e.g. octo-org/octo-repo");
    }
    let runner_dir = PathBuf::from(c.get("RUNNER_DIR").unwrap_or_else(|| DEFAULT_RUNNER_DIR.to_string()));
    let work_dir = c.get("RUNNER_WORKDIR").unwrap_or_else(|| "_work".to_string());
    let runner_user = c.runner_user(host);
    let settings = prewarm_settings(&mut c, scope.as_ref(), &runner_dir, &work_dir, runner_user.as_ref());
    if !c.problems.is_empty() {
        return Err(ConfigError(c.problems));
    }
    Ok(settings)
}

/// Whether `TZ` names a zone: a TZif file in the zone database (or an absolute path to one),
/// or UTC, which needs no file.
pub fn known_zone(zoneinfo: &std::path::Path, tz: &str) -> bool {
    let tz = tz.strip_prefix(':').unwrap_or(tz);
    if matches!(tz, "UTC" | "UTC0" | "GMT" | "GMT0" | "Etc/UTC" | "Etc/GMT") {
        return true;
    }
    let path = if tz.starts_with('/') {
        PathBuf::from(tz)
    } else {
        if tz.is_empty() || tz.split('/').any(|c| c.is_empty() || c == "." || c == "..") {
            return false;
        }
        zoneinfo.join(tz)
    };
    let mut magic = [0u8; 4];
    std::fs::File::open(path).and_then(|mut f| std::io::Read::read_exact(&mut f, &mut magic)).is_ok()
        && &magic == b"TZif"
}

/// `STATUS_ADDR`: where `/health` is served (`off` disables it). Also read by `ci-runner status`.
pub fn status_addr(env: &dyn EnvSource) -> Result<Option<SocketAddr>, Problem> {
    let raw = env.get("STATUS_ADDR").map(|v| v.trim().to_string()).filter(|v| !v.is_empty());
    match raw {
        Some(v) if v.eq_ignore_ascii_case("off") => Ok(None),
        v => {
            let v = v.unwrap_or_else(|| DEFAULT_STATUS_ADDR.to_string());
            v.parse::<SocketAddr>().map(Some).map_err(|_| Problem {
                var: "STATUS_ADDR",
                value: Some(v),
                expected: "ip:port to serve /health on, e.g. 0.0.0.0:8080, or off".into(),
            })
        }
    }
}

/// `RUNNER_SWEEP_OFFLINE_SEC` (unset: no sweep). Listing and deleting need the PAT, so a
/// registration token alone cannot sweep; and the age comes from generated names, so a fixed
/// `RUNNER_NAME` (re-used with `--replace` anyway) has nothing to sweep.
fn sweep_setting(c: &mut Collector<'_>, credentials: Option<&Credentials>, name: &RunnerName) -> Option<Duration> {
    let raw = c.get("RUNNER_SWEEP_OFFLINE_SEC")?;
    let secs = match raw.parse::<u64>() {
        Ok(n) if (MIN_SWEEP_OFFLINE_SEC..=limits::MAX_SWEEP_OFFLINE_SEC).contains(&n) => n,
        _ => {
            let max = limits::MAX_SWEEP_OFFLINE_SEC;
            c.bad(
                "RUNNER_SWEEP_OFFLINE_SEC",
                Some(&raw),
                format!(
                    "a whole number of seconds, at least {MIN_SWEEP_OFFLINE_SEC} and at most {max} ({}), e.g. 86400 (unset: no sweep)",
                    limits::human_seconds(max)
                ),
            );
            return None;
        }
    };
    if let Some(Credentials::RegistrationToken(_) | Credentials::Jit(_)) = credentials {
        c.bad(
            "RUNNER_SWEEP_OFFLINE_SEC",
            Some(&raw),
            "GH_TOKEN or a GitHub App with it: a registration token (GH_RUNNER_TOKEN) cannot list or remove runners",
        );
        return None;
    }
    if let RunnerName::Exact(_) = name {
        c.bad(
            "RUNNER_SWEEP_OFFLINE_SEC",
            Some(&raw),
            "RUNNER_NAME_PREFIX, not RUNNER_NAME: a runner's age is read from its generated name (<prefix>-<YYYYmmdd-HHMMSS>-<random>)",
        );
        return None;
    }
    Some(Duration::from_secs(secs))
}

/// What `ci-runner list`, `remove` and `prune` need, and nothing of the supervisor's own
/// settings (no labels, runner dir or runner user): a PAT, the scope, the API, the pool's
/// naming and `STATUS_ADDR` (to mark the runner of this container).
#[derive(Debug, Clone)]
pub struct OpsConfig {
    /// A PAT or a GitHub App (a registration token cannot list or remove runners).
    pub credentials: Credentials,
    pub scope: Scope,
    pub api_url: String,
    pub name: RunnerName,
    pub status_addr: Option<SocketAddr>,
}

/// Reads the credentials (`GH_TOKEN` or a GitHub App, variables or secret files), the scope,
/// `GH_SERVER_URL`, `GH_API_URL`, `RUNNER_NAME`/`RUNNER_NAME_PREFIX` and `STATUS_ADDR` as the
/// supervisor reads them, with the same messages; every problem at once.
pub fn ops_config(env: &dyn EnvSource) -> Result<OpsConfig, ConfigError> {
    let mut c = Collector::new(env);
    let credentials = match c.credentials() {
        Some(Credentials::RegistrationToken(_) | Credentials::Jit(_)) => {
            c.bad(
                "GH_TOKEN",
                None,
                "a personal access token with admin rights on the repository or organization, or a GitHub App (a registration token cannot list or remove runners)",
            );
            None
        }
        other => other,
    };
    let scope = c.scope();
    let name = c.runner_name();
    let (_, api_url) = c.urls();
    let status_addr = status_addr(env).unwrap_or_else(|p| {
        c.problems.push(p);
        None
    });
    match (credentials, scope) {
        (Some(credentials), Some(scope)) if c.problems.is_empty() => {
            Ok(OpsConfig { credentials, scope, api_url, name, status_addr })
        }
        _ => Err(ConfigError(c.problems)),
    }
}

impl Collector<'_> {
    /// `GH_REPOSITORY`, `GH_ORGANIZATION` or `GH_ENTERPRISE`, exactly one.
    fn scope(&mut self) -> Option<Scope> {
        let (repo, org, enterprise) =
            (self.get("GH_REPOSITORY"), self.get("GH_ORGANIZATION"), self.get("GH_ENTERPRISE"));
        match (repo, org, enterprise) {
            (Some(r), None, None) => {
                let scope = repository_scope(&r);
                if scope.is_none() {
                    self.bad("GH_REPOSITORY", Some(&r), "owner/repo, e.g. octo-org/octo-repo");
                }
                scope
            }
            (None, Some(o), None) => {
                if valid_github_name(&o) {
                    Some(Scope::Organization(o))
                } else {
                    self.bad("GH_ORGANIZATION", Some(&o), "an organization login, e.g. octo-org");
                    None
                }
            }
            (None, None, Some(e)) => {
                if valid_github_name(&e) {
                    Some(Scope::Enterprise(e))
                } else {
                    self.bad("GH_ENTERPRISE", Some(&e), "an enterprise slug, e.g. octo-corp");
                    None
                }
            }
            (None, None, None) => {
                self.bad(
                    "GH_REPOSITORY",
                    None,
                    "owner/repo for a repository runner (or set GH_ORGANIZATION for an organization runner, GH_ENTERPRISE for an enterprise runner)",
                );
                None
            }
            (r, o, e) => {
                // Named by the first one set, with its value.
                let (var, value) = [("GH_REPOSITORY", r), ("GH_ORGANIZATION", o), ("GH_ENTERPRISE", e)]
                    .into_iter()
                    .find_map(|(var, v)| Some((var, v?)))
                    .expect("at least two are set");
                self.bad(
                    var,
                    Some(&value),
                    "exactly one of GH_REPOSITORY (owner/repo), GH_ORGANIZATION (org) or GH_ENTERPRISE (enterprise slug)",
                );
                None
            }
        }
    }

    /// `RUNNER_NAME` or `RUNNER_NAME_PREFIX` (the generated suffix adds 23 characters).
    fn runner_name(&mut self) -> RunnerName {
        match (self.get("RUNNER_NAME"), self.get("RUNNER_NAME_PREFIX")) {
            (Some(n), None) => {
                if !valid_runner_name(&n) {
                    self.bad("RUNNER_NAME", Some(&n), "1-64 characters of A-Z a-z 0-9 . _ - (not starting with a dot)");
                }
                RunnerName::Exact(n)
            }
            (None, p) => {
                let p = p.unwrap_or_else(|| DEFAULT_NAME_PREFIX.to_string());
                if !valid_runner_name(&p) || p.len() > 40 {
                    self.bad("RUNNER_NAME_PREFIX", Some(&p), "1-40 characters of A-Z a-z 0-9 . _ -");
                }
                RunnerName::Prefix(p)
            }
            (Some(n), Some(_)) => {
                self.bad("RUNNER_NAME", Some(&n), "either RUNNER_NAME or RUNNER_NAME_PREFIX, not both");
                RunnerName::Exact(n)
            }
        }
    }

    /// `GH_SERVER_URL` and `GH_API_URL`, the latter by default derived from the former (and
    /// then only the former is named when it is bad).
    fn urls(&mut self) -> (String, String) {
        let server_url = strip_slash(&self.get("GH_SERVER_URL").unwrap_or_else(|| "https://github.com".to_string()));
        if let Err(why) = github_url(&server_url) {
            self.bad("GH_SERVER_URL", Some(&server_url), format!("an http(s) URL, e.g. https://github.com: {why}"));
        }
        let api_url = match self.get("GH_API_URL") {
            Some(api) => {
                let api = strip_slash(&api);
                if let Err(why) = github_url(&api) {
                    self.bad("GH_API_URL", Some(&api), format!("an http(s) URL, e.g. https://api.github.com: {why}"));
                }
                api
            }
            None => strip_slash(&default_api_url(&server_url)),
        };
        (server_url, api_url)
    }
}

/// `LOG_FORMAT` and `RUST_LOG`, for commands that need no other configuration.
pub fn log_settings(env: &dyn EnvSource) -> Result<(LogFormat, String), Vec<Problem>> {
    let mut c = Collector::bare(env);
    let settings = c.log_settings();
    if c.problems.is_empty() {
        Ok(settings)
    } else {
        Err(c.problems)
    }
}

/// The port forwards: `FORWARD_HOST` and `FORWARD_PORTS` (both empty: `None`, no forwards),
/// `FORWARD_BIND`, `FORWARD_CONNECT_TIMEOUT_SEC` and `FORWARD_UDP_IDLE_SEC`. Every variable is
/// checked even when forwarding is off.
pub fn forward_settings(env: &dyn EnvSource) -> Result<Option<(Vec<Forward>, ForwardOptions)>, Vec<Problem>> {
    let mut c = Collector::bare(env);
    let hosts = c.get("FORWARD_HOST").unwrap_or_default();
    let ports = c.get("FORWARD_PORTS").unwrap_or_default();
    let forwards = crate::forward::parse(&hosts, &ports).unwrap_or_else(|p| {
        c.problems.extend(p);
        Vec::new()
    });
    let defaults = ForwardOptions::default();
    let bind = match c.get("FORWARD_BIND") {
        None => defaults.bind,
        Some(v) => v.parse().unwrap_or_else(|_| {
            c.bad("FORWARD_BIND", Some(&v), "an IP address to listen on, e.g. 127.0.0.1 (the default: loopback only)");
            defaults.bind
        }),
    };
    let connect_timeout = c.positive_seconds(
        "FORWARD_CONNECT_TIMEOUT_SEC",
        crate::forward::DEFAULT_CONNECT_TIMEOUT.as_secs(),
        limits::MAX_FORWARD_CONNECT_TIMEOUT_SEC,
    );
    let udp_idle = c.positive_seconds(
        "FORWARD_UDP_IDLE_SEC",
        crate::forward::DEFAULT_UDP_IDLE.as_secs(),
        limits::MAX_FORWARD_UDP_IDLE_SEC,
    );
    if !c.problems.is_empty() {
        return Err(c.problems);
    }
    Ok((!forwards.is_empty()).then_some((forwards, ForwardOptions { bind, connect_timeout, udp_idle })))
}

/// Whether `dir` holds the runner's `config.sh` and `run.sh`.
pub fn runner_dir_has_scripts(dir: &std::path::Path) -> bool {
    dir.join("config.sh").is_file() && dir.join("run.sh").is_file()
}

/// `RUNNER_JITCONFIG` (issue #9): alone, as no other credential may come with it.
impl Collector<'_> {
    fn jit_credentials(&mut self, jit: String) -> Option<Credentials> {
        self.token("RUNNER_JITCONFIG", &jit);
        for var in ["GH_TOKEN", "GH_RUNNER_TOKEN", "GH_APP_ID"] {
            if self.get(var).is_some() {
                self.bad(
                    var,
                    None,
                    "unset with RUNNER_JITCONFIG (a JIT configuration is the runner's only credential)",
                );
            }
        }
        if self.get("RUNNER_EPHEMERAL_RESTART").is_some_and(|v| parse_bool(&v) == Some(true)) {
            self.bad(
                "RUNNER_EPHEMERAL_RESTART",
                None,
                "false with RUNNER_JITCONFIG (the configuration registers one runner, once)",
            );
        }
        Some(Credentials::Jit(Secret::new(jit)))
    }
}

mod controller;
pub mod limits;
pub use controller::*;

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    struct Users;
    impl UserDb for Users {
        fn lookup(&self, name: &str) -> Option<RunnerUser> {
            (name == "guest").then(|| RunnerUser {
                name: "guest".into(),
                uid: 1000,
                gid: 1000,
                home: "/home/guest".into(),
            })
        }
    }

    fn env(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
    }

    pub(crate) fn load(pairs: &[(&str, &str)], is_root: bool) -> Result<Config, ConfigError> {
        let ok = |_: &std::path::Path| true;
        let mut e = env(pairs);
        e.entry("SECRETS_DIR".into()).or_insert_with(|| "/nonexistent".into());
        Config::from_env(&e, &Host { is_root, users: &Users, runner_dir_ok: &ok })
    }

    const GOOD: &[(&str, &str)] =
        &[("GH_TOKEN", "ghp_secret"), ("GH_REPOSITORY", "octo-org/octo-repo"), ("GH_LABELS", "linux, docker,linux")];

    #[test]
    fn good_environment_gives_typed_config() {
        let cfg = load(GOOD, true).unwrap();
        assert_eq!(cfg.scope, Scope::Repository { owner: "octo-org".into(), repo: "octo-repo".into() });
        assert_eq!(cfg.labels, vec!["linux", "docker"]);
        assert_eq!(cfg.api_url, "https://api.github.com");
        assert_eq!(cfg.runner_url(), "https://github.com/octo-org/octo-repo");
        assert_eq!(cfg.runner_user.unwrap().name, "guest");
        assert!(cfg.disable_update);
        assert_eq!(cfg.drain_timeout, Duration::from_secs(DEFAULT_DRAIN_TIMEOUT_SEC));
    }

    #[test]
    fn every_problem_is_reported_at_once() {
        let err = load(
            &[
                ("GH_REPOSITORY", "no-slash"),
                ("RUNNER_EPHEMERAL", "maybe"),
                ("DRAIN_TIMEOUT_SEC", "10m"),
                ("STATUS_ADDR", "nope"),
                ("LOG_FORMAT", "xml"),
            ],
            true,
        )
        .unwrap_err();
        let vars: Vec<_> = err.0.iter().map(|p| p.var).collect();
        assert_eq!(
            vars,
            [
                "GH_TOKEN",
                "GH_REPOSITORY",
                "GH_LABELS",
                "RUNNER_EPHEMERAL",
                "DRAIN_TIMEOUT_SEC",
                "STATUS_ADDR",
                "LOG_FORMAT"
            ]
        );
    }

    #[test]
    fn secrets_never_appear_in_problems() {
        let err = load(
            &[("GH_TOKEN", "ghp_secret"), ("GH_RUNNER_TOKEN", "AABBCC"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x")],
            false,
        )
        .unwrap_err();
        let text: String = err.0.iter().map(|p| p.to_string()).collect();
        assert!(!text.contains("ghp_secret") && !text.contains("AABBCC"), "{text}");
        assert!(text.contains("not both"));
    }

    #[test]
    fn booleans_accept_the_usual_spellings_and_reject_others() {
        for (v, want) in [("true", true), ("1", true), ("YES", true), ("false", false), ("0", false), ("no", false)] {
            assert_eq!(parse_bool(v), Some(want), "{v}");
        }
        assert_eq!(parse_bool("2"), None);
        let mut e = GOOD.to_vec();
        e.push(("RUNNER_EPHEMERAL", "0"));
        assert!(!load(&e, false).unwrap().ephemeral);
    }

    #[test]
    fn organization_scope_and_group() {
        let cfg = load(
            &[("GH_TOKEN", "t"), ("GH_ORGANIZATION", "octo-org"), ("GH_LABELS", "a"), ("RUNNER_GROUP", "gpu")],
            false,
        )
        .unwrap();
        assert_eq!(cfg.scope.api_path(), "orgs/octo-org");
        assert_eq!(cfg.group.as_deref(), Some("gpu"));
        assert!(cfg.runner_user.is_none());
        let err =
            load(&[("GH_TOKEN", "t"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "a"), ("RUNNER_GROUP", "gpu")], false)
                .unwrap_err();
        assert_eq!(err.0[0].var, "RUNNER_GROUP");
        assert!(err.0[0].to_string().contains("GH_ORGANIZATION or GH_ENTERPRISE"), "{}", err.0[0]);
    }

    #[test]
    fn both_scopes_or_unknown_user_are_errors() {
        let err = load(
            &[
                ("GH_TOKEN", "t"),
                ("GH_REPOSITORY", "a/b"),
                ("GH_ORGANIZATION", "a"),
                ("GH_LABELS", "a"),
                ("RUNNER_USER", "nobody-here"),
            ],
            true,
        )
        .unwrap_err();
        let vars: Vec<_> = err.0.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["GH_REPOSITORY", "RUNNER_USER"]);
    }

    #[test]
    fn enterprise_scope_and_exactly_one_scope_of_three() {
        let cfg = load(&[("GH_TOKEN", "t"), ("GH_ENTERPRISE", "octo-corp"), ("GH_LABELS", "a")], false).unwrap();
        assert_eq!(cfg.scope, Scope::Enterprise("octo-corp".into()));
        assert_eq!(cfg.scope.api_path(), "enterprises/octo-corp");
        assert_eq!(cfg.runner_url(), "https://github.com/enterprises/octo-corp");
        assert_eq!(cfg.scope.to_string(), "enterprise octo-corp");
        assert_eq!(cfg.autoscale.dimensions, [("GH_ENTERPRISE".to_string(), "octo-corp".to_string())]);
        let cfg = load(
            &[("GH_TOKEN", "t"), ("GH_ENTERPRISE", "octo-corp"), ("GH_LABELS", "a"), ("RUNNER_GROUP", "gpu")],
            false,
        )
        .unwrap();
        assert_eq!(cfg.group.as_deref(), Some("gpu"));
        for (pairs, var) in [
            (&[("GH_REPOSITORY", "a/b"), ("GH_ENTERPRISE", "e")][..], "GH_REPOSITORY"),
            (&[("GH_ORGANIZATION", "o"), ("GH_ENTERPRISE", "e")][..], "GH_ORGANIZATION"),
            (&[("GH_REPOSITORY", "a/b"), ("GH_ORGANIZATION", "o"), ("GH_ENTERPRISE", "e")][..], "GH_REPOSITORY"),
        ] {
            let e = load(&[&[("GH_TOKEN", "t"), ("GH_LABELS", "a")][..], pairs].concat(), false).unwrap_err();
            assert_eq!(vars_of(&e), [var], "{pairs:?}");
            let text = e.0[0].to_string();
            assert!(text.contains("exactly one of GH_REPOSITORY") && text.contains("GH_ENTERPRISE"), "{text}");
        }
        let e = load(&[("GH_TOKEN", "t"), ("GH_ENTERPRISE", "not/a/slug"), ("GH_LABELS", "a")], false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_ENTERPRISE"]);
        let e = load(&[("GH_TOKEN", "t"), ("GH_LABELS", "a")], false).unwrap_err();
        assert!(e.0[0].to_string().contains("GH_ENTERPRISE"), "{}", e.0[0]);
    }

    fn key_file(pem: &str) -> (tempfile::TempDir, String) {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("GH_APP_PRIVATE_KEY"), pem).unwrap();
        let d = dir.path().display().to_string();
        (dir, d)
    }

    #[test]
    fn github_app_from_id_key_file_and_installation() {
        let Some((pkcs1, pkcs8)) = crate::app::test_keys() else { return };
        let (_dir, d) = key_file(pkcs1);
        let base = [("SECRETS_DIR", d.as_str()), ("GH_ORGANIZATION", "octo-org"), ("GH_LABELS", "a")];
        let cfg = load(&[&base[..], &[("GH_APP_ID", "123")]].concat(), false).unwrap();
        assert!(matches!(cfg.credentials, Credentials::App { app_id: 123, installation_id: None, .. }));
        assert!(cfg.summary().contains("credentials=app:123 "), "{}", cfg.summary());
        let cfg =
            load(&[&base[..], &[("GH_APP_ID", "123"), ("GH_APP_INSTALLATION_ID", "42")]].concat(), false).unwrap();
        assert!(matches!(cfg.credentials, Credentials::App { app_id: 123, installation_id: Some(42), .. }));
        // PKCS#8 in the variable (it wins over the file), and the key reaches neither the
        // runner's environment nor the configuration's Debug.
        let cfg = load(&[&base[..], &[("GH_APP_ID", "123"), ("GH_APP_PRIVATE_KEY", pkcs8.as_str())]].concat(), false)
            .unwrap();
        assert!(matches!(cfg.credentials, Credentials::App { .. }));
        let names: Vec<_> = cfg.runner_env.iter().map(|(k, _)| k.as_str()).collect();
        assert!(!names.contains(&"GH_APP_PRIVATE_KEY") && names.contains(&"GH_APP_ID"), "{names:?}");
        let body = pkcs8.lines().nth(1).unwrap();
        assert!(!format!("{cfg:?}").contains(body), "the key is in the Debug output");
    }

    #[test]
    fn github_app_problems_name_the_variable_never_the_key() {
        let base = [("GH_REPOSITORY", "a/b"), ("GH_LABELS", "a")];
        // No key anywhere.
        let e = load(&[&base[..], &[("GH_APP_ID", "123")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_APP_PRIVATE_KEY"]);
        let text = e.0[0].to_string();
        assert!(text.contains("BEGIN RSA PRIVATE KEY") && text.contains("/nonexistent/GH_APP_PRIVATE_KEY"), "{text}");
        // A key that does not parse: named, the reason given, the value never shown.
        let bad = "-----BEGIN RSA PRIVATE KEY-----
c2VjcmV0LWJ5dGVz
-----END RSA PRIVATE KEY-----";
        let e = load(&[&base[..], &[("GH_APP_ID", "123"), ("GH_APP_PRIVATE_KEY", bad)]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_APP_PRIVATE_KEY"]);
        assert_eq!(e.0[0].value, None);
        let text = e.0[0].to_string();
        assert!(text.contains("ring refused the RSA key") && !text.contains("c2VjcmV0"), "{text}");
        let (_dir, d) = key_file("ghp_pasted_the_wrong_thing");
        let e = load(&[&base[..], &[("GH_APP_ID", "123"), ("SECRETS_DIR", d.as_str())]].concat(), false).unwrap_err();
        let text = e.0[0].to_string();
        assert!(text.contains("no PEM private key") && !text.contains("ghp_pasted"), "{text}");
        // Ids are numbers.
        let e = load(
            &[&base[..], &[("GH_APP_ID", "my-app"), ("GH_APP_INSTALLATION_ID", "x"), ("GH_APP_PRIVATE_KEY", bad)]]
                .concat(),
            false,
        )
        .unwrap_err();
        assert_eq!(vars_of(&e), ["GH_APP_ID", "GH_APP_INSTALLATION_ID", "GH_APP_PRIVATE_KEY"]);
        // A key or an installation without the App's id.
        let e = load(&[&base[..], &[("GH_TOKEN", "t"), ("GH_APP_INSTALLATION_ID", "42")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_APP_ID"]);
    }

    #[test]
    fn pat_and_app_are_mutually_exclusive() {
        let base = [("GH_REPOSITORY", "a/b"), ("GH_LABELS", "a"), ("GH_APP_ID", "123")];
        for (other, named) in [("GH_TOKEN", "GH_TOKEN (a PAT)"), ("GH_RUNNER_TOKEN", "GH_RUNNER_TOKEN")] {
            let e = load(&[&base[..], &[(other, "ghp_secret")]].concat(), false).unwrap_err();
            assert_eq!(vars_of(&e), ["GH_APP_ID"]);
            let text = e.0[0].to_string();
            assert!(text.contains("either GH_APP_ID") && text.contains(named), "{text}");
            assert!(text.contains("not both") && !text.contains("ghp_secret"), "{text}");
        }
    }

    #[test]
    fn github_app_cannot_serve_an_enterprise() {
        let Some((pkcs1, _)) = crate::app::test_keys() else { return };
        let e = load(
            &[("GH_ENTERPRISE", "octo-corp"), ("GH_LABELS", "a"), ("GH_APP_ID", "123"), ("GH_APP_PRIVATE_KEY", pkcs1)],
            false,
        )
        .unwrap_err();
        assert_eq!(vars_of(&e), ["GH_APP_ID"]);
        assert!(e.0[0].to_string().contains("manage_runners:enterprise"), "{}", e.0[0]);
    }

    #[test]
    fn api_url_follows_the_server() {
        assert_eq!(default_api_url("https://github.com"), "https://api.github.com");
        assert_eq!(default_api_url("https://octo.ghe.com"), "https://api.octo.ghe.com");
        assert_eq!(default_api_url("https://ghes.example/"), "https://ghes.example/api/v3");
        assert_eq!(default_api_url("http://127.0.0.1:8000"), "http://127.0.0.1:8000/api/v3");
    }

    #[test]
    fn runner_env_has_no_secret() {
        let mut e = GOOD.to_vec();
        e.extend([
            ("CI_STORAGE_PRIVATE_KEY", "k"),
            ("ACTIONS_RUNNER_INPUT_TOKEN", "t"),
            ("PATH", "/bin"),
            ("RUNNER_MANUALLY_TRAP_SIG", "1"),
        ]);
        let cfg = load(&e, false).unwrap();
        let names: Vec<_> = cfg.runner_env.iter().map(|(k, _)| k.as_str()).collect();
        assert!(names.contains(&"PATH") && names.contains(&"GH_REPOSITORY"));
        for s in SECRET_VARS.iter().chain(&["RUNNER_MANUALLY_TRAP_SIG"]) {
            assert!(!names.contains(s), "{s} leaked");
        }
    }

    #[test]
    fn lock_settings() {
        let mut e = GOOD.to_vec();
        e.extend([("RUNNER_RESOURCE_ID", "board-1"), ("RUNNER_LOCK_TIMEOUT_SEC", "30")]);
        let lock = load(&e, false).unwrap().lock.unwrap();
        assert_eq!(lock.dir, PathBuf::from(DEFAULT_LOCK_DIR));
        assert_eq!(lock.timeout, Some(Duration::from_secs(30)));
        assert!(load(GOOD, false).unwrap().lock.is_none());
        let mut e = GOOD.to_vec();
        e.extend([("RUNNER_RESOURCE_ID", "../x"), ("RUNNER_LOCK_TIMEOUT_SEC", "soon")]);
        let vars: Vec<_> = load(&e, false).unwrap_err().0.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["RUNNER_LOCK_TIMEOUT_SEC", "RUNNER_RESOURCE_ID"]);
    }

    #[test]
    fn several_runners_and_the_admin_api() {
        let cfg = load(GOOD, false).unwrap();
        assert_eq!((cfg.runner_count, cfg.admin.is_none(), cfg.state_dir.is_none()), (1, true, true));
        assert_eq!(cfg.roots_dir, cfg.runner_dir.parent().unwrap().join("runners"));
        let mut e = GOOD.to_vec();
        let token = "0123456789abcdef-secret";
        e.extend([("RUNNER_COUNT", "0"), ("ADMIN_TOKEN", token), ("STATE_DIR", "/state"), ("RUNNER_ROOTS_DIR", "/r")]);
        let cfg = load(&e, false).unwrap();
        let admin = cfg.admin.unwrap();
        assert_eq!((cfg.runner_count, admin.addr.to_string().as_str()), (0, DEFAULT_ADMIN_ADDR));
        assert_eq!(admin.token.expose(), token);
        assert_eq!((cfg.state_dir.unwrap(), cfg.roots_dir), (PathBuf::from("/state"), PathBuf::from("/r")));
        // 0 needs the admin API; a state dir keeps only what it adds; a short token is refused
        // without being shown; a lock and several runners do not mix.
        for (extra, var) in [
            (vec![("RUNNER_COUNT", "0")], "RUNNER_COUNT"),
            (vec![("RUNNER_COUNT", "65")], "RUNNER_COUNT"),
            (vec![("RUNNER_COUNT", "two")], "RUNNER_COUNT"),
            (vec![("STATE_DIR", "/state")], "STATE_DIR"),
            (vec![("ADMIN_TOKEN", "short")], "ADMIN_TOKEN"),
            (vec![("ADMIN_TOKEN", token), ("ADMIN_ADDR", "8081")], "ADMIN_ADDR"),
            (vec![("RUNNER_ROOTS_DIR", "runners")], "RUNNER_ROOTS_DIR"),
            (vec![("RUNNER_COUNT", "2"), ("RUNNER_RESOURCE_ID", "board-1")], "RUNNER_COUNT"),
        ] {
            let mut e = GOOD.to_vec();
            e.extend(extra.iter().copied());
            let problems = load(&e, false).unwrap_err().0;
            assert_eq!(problems.iter().map(|p| p.var).collect::<Vec<_>>(), [var], "{extra:?}");
            assert!(problems.iter().all(|p| !p.to_string().contains("short")), "{problems:?}");
        }
    }

    #[test]
    fn users_and_groups_come_from_the_files() {
        let passwd = "root:x:0:0:root:/root:/bin/bash\nbad line\nguest:x:1000:1000:,,,:/home/guest:/bin/bash\n";
        let u = passwd_entry(passwd, "guest").unwrap();
        assert_eq!((u.uid, u.gid, u.home), (1000, 1000, PathBuf::from("/home/guest")));
        assert!(passwd_entry(passwd, "gues").is_none() && passwd_entry(passwd, "bad line").is_none());
        let group = "root:x:0:\nguest:x:1000:\ndocker:x:998:guest\nkvm:x:105:other,guest\nvideo:x:44:guests\n";
        assert_eq!(member_groups(group, "guest", 1000), [1000, 998, 105]);
        assert_eq!(member_groups(group, "nobody", 65534), [65534]);
    }

    #[test]
    fn a_jit_configuration_is_one_runner_without_the_admin_api() {
        let base = [
            ("RUNNER_JITCONFIG", "eyJqaXQiOiJ4In0="),
            ("RUNNER_EPHEMERAL", "true"),
            ("GH_REPOSITORY", "o/r"),
            ("GH_LABELS", "x"),
        ];
        assert_eq!(load(&base, false).unwrap().runner_count, 1);
        let mut e = base.to_vec();
        e.extend([("RUNNER_COUNT", "2"), ("ADMIN_TOKEN", "0123456789abcdef-secret")]);
        let vars: Vec<_> = load(&e, false).unwrap_err().0.iter().map(|p| p.var).collect();
        assert_eq!(vars, ["RUNNER_COUNT", "ADMIN_TOKEN"]);
    }

    #[test]
    fn tokens_come_from_secret_files_when_the_variable_is_unset() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("GH_TOKEN"), "ghp_from_file\n").unwrap();
        let d = dir.path().display().to_string();
        let cfg = load(&[("SECRETS_DIR", &d), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x")], false).unwrap();
        assert!(matches!(&cfg.credentials, Credentials::Pat(t) if t.expose() == "ghp_from_file"));
        // The variable wins over the file.
        let cfg =
            load(&[("SECRETS_DIR", &d), ("GH_TOKEN", "ghp_env"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x")], false)
                .unwrap();
        assert!(matches!(&cfg.credentials, Credentials::Pat(t) if t.expose() == "ghp_env"));
    }

    #[test]
    fn secret_debug_is_masked() {
        let c = Credentials::Pat(Secret::new("ghp_x"));
        assert!(!format!("{c:?}").contains("ghp_x"));
    }

    #[test]
    fn forward_settings_off_on_and_bad() {
        assert_eq!(forward_settings(&env(&[])).unwrap(), None);
        let (forwards, opts) =
            forward_settings(&env(&[("FORWARD_HOST", "h:1 b"), ("FORWARD_PORTS", "22 53/udp")])).unwrap().unwrap();
        assert_eq!(forwards.len(), 2);
        assert_eq!(opts, ForwardOptions::default());
        let (_, opts) = forward_settings(&env(&[
            ("FORWARD_HOST", "h"),
            ("FORWARD_PORTS", "22"),
            ("FORWARD_BIND", "127.0.0.5"),
            ("FORWARD_CONNECT_TIMEOUT_SEC", "2"),
            ("FORWARD_UDP_IDLE_SEC", "9"),
        ]))
        .unwrap()
        .unwrap();
        assert_eq!(opts.bind.to_string(), "127.0.0.5");
        assert_eq!((opts.connect_timeout.as_secs(), opts.udp_idle.as_secs()), (2, 9));
        let err = forward_settings(&env(&[
            ("FORWARD_PORTS", "22/sctp"),
            ("FORWARD_BIND", "localhost"),
            ("FORWARD_CONNECT_TIMEOUT_SEC", "0"),
            ("FORWARD_UDP_IDLE_SEC", "1m"),
        ]))
        .unwrap_err();
        let vars: Vec<_> = err.iter().map(|p| p.var).collect();
        assert_eq!(
            vars,
            ["FORWARD_PORTS", "FORWARD_HOST", "FORWARD_BIND", "FORWARD_CONNECT_TIMEOUT_SEC", "FORWARD_UDP_IDLE_SEC"]
        );
    }

    #[test]
    fn ephemeral_runners_default_to_jit_when_the_token_can_mint_one() {
        let with = |extra: &[(&'static str, &'static str)]| [GOOD, extra].concat();
        let cfg = load(&with(&[("RUNNER_EPHEMERAL", "true")]), false).unwrap();
        assert!(cfg.jit && !cfg.ephemeral_restart);
        assert!(!load(GOOD, false).unwrap().jit, "a persistent runner went JIT");
        let forced_off = load(&with(&[("RUNNER_EPHEMERAL", "yes"), ("RUNNER_JIT", "0")]), false).unwrap();
        assert!(!forced_off.jit);
        let restart = load(&with(&[("RUNNER_EPHEMERAL", "1"), ("RUNNER_EPHEMERAL_RESTART", "true")]), false).unwrap();
        assert!(restart.ephemeral_restart && restart.jit);
        // A ready registration token cannot mint a JIT configuration: config.sh, silently by
        // default, an error when forced.
        let reg =
            [("GH_RUNNER_TOKEN", "AABB"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x"), ("RUNNER_EPHEMERAL", "true")];
        assert!(!load(&reg, false).unwrap().jit);
        let e = load(&[&reg[..], &[("RUNNER_JIT", "true")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["RUNNER_JIT"]);
        assert!(e.0[0].to_string().contains("GH_RUNNER_TOKEN") && !e.0[0].to_string().contains("AABB"), "{}", e.0[0]);
    }

    #[test]
    fn restart_and_jit_need_an_ephemeral_runner_and_strict_booleans() {
        let e =
            load(&[GOOD, &[("RUNNER_EPHEMERAL_RESTART", "true"), ("RUNNER_JIT", "true")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["RUNNER_EPHEMERAL_RESTART", "RUNNER_JIT"]);
        let text = e.0[0].to_string();
        assert!(text.contains("RUNNER_EPHEMERAL_RESTART") && text.contains("RUNNER_EPHEMERAL=true"), "{text}");
        let e =
            load(&[GOOD, &[("RUNNER_EPHEMERAL", "true"), ("RUNNER_EPHEMERAL_RESTART", "sometimes")]].concat(), false)
                .unwrap_err();
        assert_eq!(vars_of(&e), ["RUNNER_EPHEMERAL_RESTART"]);
        // Off is off: no complaint about RUNNER_EPHEMERAL.
        assert!(!load(&[GOOD, &[("RUNNER_EPHEMERAL_RESTART", "0")]].concat(), false).unwrap().ephemeral_restart);
    }

    #[test]
    fn min_version_has_github_s_default_and_is_checked() {
        use crate::runner::RunnerVersion;
        assert_eq!(load(GOOD, false).unwrap().min_version, RunnerVersion(2, 329, 0));
        let cfg = load(&[GOOD, &[("RUNNER_MIN_VERSION", "2.340.1")]].concat(), false).unwrap();
        assert_eq!(cfg.min_version, RunnerVersion(2, 340, 1));
        let e = load(&[GOOD, &[("RUNNER_MIN_VERSION", "latest")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["RUNNER_MIN_VERSION"]);
    }

    #[test]
    fn update_at_boot_is_off_by_default_and_every_setting_is_checked() {
        assert_eq!(load(GOOD, false).unwrap().update, None);
        let on = load(&[GOOD, &[("RUNNER_UPDATE_AT_BOOT", "yes")]].concat(), false).unwrap().update.unwrap();
        assert_eq!(on.after, Duration::from_secs(21 * 86_400), "21 days, as the original's hook 03");
        assert_eq!(on.cache_dir, PathBuf::from(DEFAULT_RUNNER_CACHE_DIR));
        assert_eq!(on.releases_url, DEFAULT_RUNNER_RELEASES_URL);
        assert_eq!(on.releases_api_url, DEFAULT_RUNNER_RELEASES_API_URL);
        assert_eq!(on.timeout, Duration::from_secs(300));
        let set = [
            ("RUNNER_UPDATE_AT_BOOT", "1"),
            ("RUNNER_UPDATE_AFTER_DAYS", "0"),
            ("RUNNER_CACHE_DIR", "/cache"),
            ("RUNNER_RELEASES_URL", "http://127.0.0.1:9/r/"),
            ("RUNNER_UPDATE_TIMEOUT_SEC", "5"),
        ];
        let s = load(&[GOOD, &set].concat(), false).unwrap().update.unwrap();
        assert_eq!(
            (s.after, s.cache_dir, s.releases_url.as_str()),
            (Duration::ZERO, "/cache".into(), "http://127.0.0.1:9/r")
        );
        // Checked even when off: a typo must not wait for the day it is turned on.
        let bad = [
            ("RUNNER_UPDATE_AT_BOOT", "sometimes"),
            ("RUNNER_UPDATE_AFTER_DAYS", "-1"),
            ("RUNNER_CACHE_DIR", "cache"),
            ("RUNNER_RELEASES_URL", "ftp://x"),
            ("RUNNER_RELEASES_API_URL", "not a url"),
            ("RUNNER_UPDATE_TIMEOUT_SEC", "0"),
        ];
        let e = load(&[GOOD, &bad].concat(), false).unwrap_err();
        assert_eq!(
            vars_of(&e),
            [
                "RUNNER_UPDATE_AT_BOOT",
                "RUNNER_UPDATE_AFTER_DAYS",
                "RUNNER_CACHE_DIR",
                "RUNNER_RELEASES_URL",
                "RUNNER_RELEASES_API_URL",
                "RUNNER_UPDATE_TIMEOUT_SEC"
            ]
        );
        let text = e.0.iter().map(|p| p.to_string()).collect::<Vec<_>>().join("\n");
        assert!(text.contains("a whole number of days"), "{text}");
        assert!(text.contains("an absolute directory path"), "{text}");
    }

    #[test]
    fn runner_names_are_checked() {
        assert!(valid_runner_name("ci-storage-20260101-000000-abc"));
        assert!(!valid_runner_name("../etc"));
        assert!(!valid_runner_name("a b"));
        let mut e = GOOD.to_vec();
        e.push(("RUNNER_NAME", "bad name"));
        assert_eq!(load(&e, false).unwrap_err().0[0].var, "RUNNER_NAME");
    }

    fn vars_of(e: &ConfigError) -> Vec<&'static str> {
        e.0.iter().map(|p| p.var).collect()
    }

    #[test]
    fn tz_must_name_a_zone() {
        let zones = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(zones.path().join("Europe")).unwrap();
        std::fs::write(zones.path().join("Europe/Berlin"), b"TZif2...").unwrap();
        std::fs::write(zones.path().join("zone.tab"), b"# not a zone").unwrap();
        let dir = zones.path().display().to_string();
        let base = [("GH_TOKEN", "t"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x"), ("TZDIR", dir.as_str())];
        for ok in ["Europe/Berlin", ":Europe/Berlin", "UTC"] {
            let cfg = load(&[&base[..], &[("TZ", ok)]].concat(), false).unwrap();
            assert_eq!(cfg.tz.as_deref(), Some(ok));
        }
        for bad in ["Mars/Olympus", "zone.tab", "../Europe/Berlin", "Europe"] {
            let e = load(&[&base[..], &[("TZ", bad)]].concat(), false).unwrap_err();
            assert_eq!(vars_of(&e), vec!["TZ"], "{bad}");
            assert!(e.0[0].to_string().contains("a time zone in"), "{}", e.0[0]);
        }
    }

    #[test]
    fn sweep_threshold_is_checked_and_needs_a_pat_and_generated_names() {
        assert_eq!(load(GOOD, false).unwrap().sweep_offline, None);
        let cfg = load(&[GOOD, &[("RUNNER_SWEEP_OFFLINE_SEC", "86400")]].concat(), false).unwrap();
        assert_eq!(cfg.sweep_offline, Some(Duration::from_secs(86_400)));
        for bad in ["0", "59", "1d", "-5"] {
            let e = load(&[GOOD, &[("RUNNER_SWEEP_OFFLINE_SEC", bad)]].concat(), false).unwrap_err();
            assert_eq!(vars_of(&e), vec!["RUNNER_SWEEP_OFFLINE_SEC"], "{bad}");
            assert!(e.0[0].to_string().contains("at least 60"), "{}", e.0[0]);
        }
        let reg = [("GH_RUNNER_TOKEN", "AABB"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x")];
        let e = load(&[&reg[..], &[("RUNNER_SWEEP_OFFLINE_SEC", "3600")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), vec!["RUNNER_SWEEP_OFFLINE_SEC"]);
        assert!(e.0[0].to_string().contains("GH_TOKEN"), "{}", e.0[0]);
        let e = load(&[GOOD, &[("RUNNER_SWEEP_OFFLINE_SEC", "3600"), ("RUNNER_NAME", "build-01")]].concat(), false)
            .unwrap_err();
        assert_eq!(vars_of(&e), vec!["RUNNER_SWEEP_OFFLINE_SEC"]);
    }

    #[test]
    fn ops_commands_need_only_the_token_scope_and_names() {
        let e = env(&[
            ("GH_TOKEN", "ghp_secret"),
            ("GH_ORGANIZATION", "octo-org"),
            ("GH_SERVER_URL", "https://ghes.example/"),
            ("RUNNER_NAME_PREFIX", "gpu"),
            ("STATUS_ADDR", "127.0.0.1:9"),
            ("SECRETS_DIR", "/nonexistent"),
            // The supervisor's own settings are not read: a RUNNER_DIR without scripts is fine.
            ("RUNNER_DIR", "/nonexistent"),
            ("RUNNER_USER", "nobody-here"),
        ]);
        let cfg = ops_config(&e).unwrap();
        assert_eq!(cfg.scope, Scope::Organization("octo-org".into()));
        assert_eq!(cfg.api_url, "https://ghes.example/api/v3");
        assert_eq!(cfg.name, RunnerName::Prefix("gpu".into()));
        assert_eq!(cfg.status_addr, Some("127.0.0.1:9".parse().unwrap()));
        assert!(matches!(&cfg.credentials, Credentials::Pat(t) if t.expose() == "ghp_secret"));
        let cfg =
            ops_config(&env(&[("GH_TOKEN", "t"), ("GH_REPOSITORY", "a/b"), ("SECRETS_DIR", "/nonexistent")])).unwrap();
        assert_eq!(cfg.name, RunnerName::Prefix(DEFAULT_NAME_PREFIX.into()));
        assert_eq!(cfg.api_url, "https://api.github.com");

        let err = ops_config(&env(&[
            ("GH_RUNNER_TOKEN", "AABBCC"),
            ("GH_REPOSITORY", "no-slash"),
            ("RUNNER_NAME_PREFIX", "bad prefix"),
            ("GH_API_URL", "ftp://x"),
            ("STATUS_ADDR", "nope"),
            ("SECRETS_DIR", "/nonexistent"),
        ]))
        .unwrap_err();
        assert_eq!(vars_of(&err), ["GH_TOKEN", "GH_REPOSITORY", "RUNNER_NAME_PREFIX", "GH_API_URL", "STATUS_ADDR"]);
        let text: String = err.0.iter().map(|p| p.to_string()).collect();
        assert!(!text.contains("AABBCC"), "{text}");
        assert!(text.contains("a registration token cannot list or remove runners"), "{text}");
    }

    #[test]
    fn btime_and_the_progress_interval_are_read_as_given() {
        let base = [("GH_TOKEN", "t"), ("GH_REPOSITORY", "octo/repo"), ("GH_LABELS", "linux,x64")];
        let cfg = load(&base, false).unwrap();
        assert_eq!(cfg.autoscale.btime, None, "the boot figures are on without BTIME");
        let cfg = load(&[&base[..], &[("BTIME", " 1700000000 ")]].concat(), false).unwrap();
        assert_eq!(cfg.autoscale.btime, Some(1_700_000_000));
        // The original's dimensions: the repository, then the last of GH_LABELS.
        let dims: Vec<(&str, &str)> =
            cfg.autoscale.boot_dimensions.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
        assert_eq!(dims, [("GH_REPOSITORY", "octo/repo"), ("GH_LABEL", "x64")]);
        let storage = [("CI_STORAGE_HOST", "127.0.0.1:10022"), ("CI_STORAGE_PRIVATE_KEY", "k")];
        for (v, want) in
            [("0.25", Some(Duration::from_millis(250))), ("0", None), ("3600", Some(Duration::from_secs(3600)))]
        {
            let cfg = load(&[&base[..], &storage[..], &[("CI_STORAGE_PROGRESS_SEC", v)]].concat(), false).unwrap();
            assert_eq!(cfg.prewarm.unwrap().progress_every, want, "{v}");
        }
    }

    #[test]
    fn storage_settings_derive_the_action_s_paths_and_check_every_value() {
        let base = [("GH_TOKEN", "t"), ("GH_REPOSITORY", "octo/repo"), ("GH_LABELS", "x")];
        let cfg = load(
            &[
                &base[..],
                &[("CI_STORAGE_HOST", "127.0.0.1:10022"), ("CI_STORAGE_PRIVATE_KEY", "k"), ("RUNNER_WORKDIR", "/mnt")],
            ]
            .concat(),
            true,
        )
        .unwrap();
        let p = cfg.prewarm.expect("pre-warm settings");
        assert_eq!(p.local_dir, PathBuf::from("/mnt/repo/repo"));
        assert_eq!(p.storage_dir, "/mnt/octo/repo/_mnt_repo_repo");
        assert_eq!((p.user.as_str(), p.host.port, p.owner), ("guest", 10022, Some((1000, 1000))));
        assert_eq!(p.progress_every, Some(Duration::from_secs(5)), "progress lines on by default");
        assert!(!cfg.runner_env.iter().any(|(k, _)| k == "CI_STORAGE_PRIVATE_KEY"), "the key reached the runner");

        let e = load(
            &[&base[..], &[("CI_STORAGE_HOST", "a b"), ("CI_STORAGE_TIMEOUT_SEC", "0"), ("CI_STORAGE_DIR", "rel")]]
                .concat(),
            true,
        )
        .unwrap_err();
        let vars = vars_of(&e);
        for v in ["CI_STORAGE_HOST", "CI_STORAGE_PRIVATE_KEY", "CI_STORAGE_TIMEOUT_SEC", "CI_STORAGE_DIR"] {
            assert!(vars.contains(&v), "{v} not reported: {vars:?}");
        }
        let e = load(
            &[
                ("GH_TOKEN", "t"),
                ("GH_ORGANIZATION", "o"),
                ("GH_LABELS", "x"),
                ("CI_STORAGE_HOST", "h"),
                ("CI_STORAGE_PRIVATE_KEY", "k"),
            ],
            true,
        )
        .unwrap_err();
        assert_eq!(vars_of(&e), vec!["CI_STORAGE_HOST"]);
    }

    /// One malformed value: set over [`GOOD`] (less `without`), it must fail the start naming
    /// exactly `var`; a secret's value must never be shown.
    struct Malformed {
        var: &'static str,
        value: String,
        extra: &'static [(&'static str, &'static str)],
        without: &'static [&'static str],
        secret: bool,
        /// Part of the message, e.g. the allowed range.
        says: &'static str,
    }

    fn bad(var: &'static str, value: impl Into<String>, says: &'static str) -> Malformed {
        Malformed { var, value: value.into(), extra: &[], without: &[], secret: false, says }
    }

    const STORAGE: &[(&str, &str)] = &[("CI_STORAGE_HOST", "127.0.0.1:10022"), ("CI_STORAGE_PRIVATE_KEY", "k")];

    #[test]
    fn malformed_values_are_refused_each_named_with_its_variable() {
        let huge = "10000000000000000000";
        let storage = |m: Malformed| Malformed { extra: STORAGE, ..m };
        let secret = |m: Malformed| Malformed { secret: true, ..m };
        let cases = [
            // Durations: each bounded, the message giving the value and the range.
            bad("ACTIONS_RUNNER_HOOK_JOB_STARTED", "hooks/started.sh", "an absolute path to a .sh script"),
            bad("ACTIONS_RUNNER_HOOK_JOB_COMPLETED", "/hooks/done.ps1", "an absolute path to a .sh script"),
            bad("DRAIN_TIMEOUT_SEC", huge, "from 0 to 432000 (5 days)"),
            bad("DRAIN_TIMEOUT_SEC", "432001", "from 0 to 432000"),
            bad("DRAIN_TIMEOUT_SEC", "99999999999999999999999", "from 0 to 432000"),
            bad("DRAIN_TIMEOUT_SEC", "-1", "whole number of seconds"),
            bad("DEBUG_SHUTDOWN_DELAY_SEC", "3601", "from 0 to 3600 (1 hour)"),
            bad("RUNNER_STOP_GRACE_SEC", "0", "from 1 to 3600 (1 hour)"),
            bad("RUNNER_STOP_GRACE_SEC", huge, "from 1 to 3600"),
            bad("RUNNER_LOCK_TIMEOUT_SEC", huge, "from 0 to 604800 (7 days)"),
            bad("RUNNER_SWEEP_OFFLINE_SEC", "31536001", "at most 31536000 (365 days)"),
            bad("CLOUDWATCH_HEARTBEAT_SEC", "86401", "from 1 to 86400 (1 day)"),
            bad("SPOT_POLL_SEC", huge, "from 1 to 600"),
            bad("FORWARD_CONNECT_TIMEOUT_SEC", "3601", "from 1 to 3600"),
            bad("FORWARD_UDP_IDLE_SEC", huge, "from 1 to 86400"),
            storage(bad("CI_STORAGE_TIMEOUT_SEC", huge, "from 1 to 86400 (1 day)")),
            storage(bad("CI_STORAGE_TIMEOUT_SEC", "0", "from 1 to 86400")),
            storage(bad("CI_STORAGE_CONNECT_TIMEOUT_SEC", "3601", "from 1 to 3600")),
            storage(bad("CI_STORAGE_STALL_TIMEOUT_SEC", huge, "from 1 to 3600")),
            storage(bad("CI_STORAGE_MAX_AGE_SEC", "2592001", "from 0 to 2592000 (30 days)")),
            storage(bad("CI_STORAGE_PROGRESS_SEC", "0.05", "from 0.1 to 3600")),
            storage(bad("CI_STORAGE_PROGRESS_SEC", "5s", "or 0 for none")),
            storage(bad("CI_STORAGE_PROGRESS_SEC", "NaN", "from 0.1 to 3600")),
            bad("BTIME", "1.7e9", "Unix seconds (digits"),
            bad("BTIME", "-1700000000", "/proc/stat"),
            bad("BTIME", "+1700000000", "digits"),
            bad("BTIME", "99999999999", "btime"),
            // URLs: parsed, with a valid port, no control characters, no credentials.
            bad("GH_SERVER_URL", "https://github.com:99999", "invalid port"),
            bad("GH_SERVER_URL", "https://git\nhub.com", "control characters"),
            bad("GH_SERVER_URL", "https://user:pw@ghes.example", "no user or password"),
            bad("GH_SERVER_URL", "https://ghes.example:0", "a port from 1 to 65535"),
            bad("GH_API_URL", "http://127.0.0.1:99999/api/v3", "invalid port"),
            bad("GH_API_URL", "https://api.github.com/x\ny", "control characters"),
            bad("GH_API_URL", "https://api.github.com/?per_page=1", "no ?query"),
            bad("ECS_AGENT_URI", "http://127.0.0.1:70000", "invalid port"),
            bad("AWS_ENDPOINT_URL_CLOUDWATCH", "http://cw\t.local", "control characters"),
            // The SDK's container provider reads these; their forms are checked first.
            bad("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://169.254.170.23:99999/v1", "invalid port"),
            bad("AWS_CONTAINER_CREDENTIALS_RELATIVE_URI", "v2/credentials/x", "a path starting with /"),
            // Tokens and secrets: refused, never shown.
            secret(Malformed { without: &["GH_TOKEN"], ..bad("GH_TOKEN", "ghp_abc\ndef", "control characters") }),
            secret(Malformed { without: &["GH_TOKEN"], ..bad("GH_TOKEN", "ghp_abc def", "without spaces") }),
            secret(Malformed {
                without: &["GH_TOKEN"],
                ..bad("GH_RUNNER_TOKEN", "AABB\u{1b}CC", "control characters")
            }),
            secret(bad("ADMIN_TOKEN", "0123456789abcdef\n0123", "control characters")),
            secret(Malformed {
                extra: &[("AWS_ACCESS_KEY_ID", "AKIDEXAMPLE")],
                ..bad("AWS_SECRET_ACCESS_KEY", "wJalr\nXUtnFEMI", "control characters")
            }),
            // Labels, hosts, names and paths.
            bad("GH_LABELS", "linux,do\ncker", "control characters"),
            bad("GH_LABELS", format!("linux,{}", "l".repeat(257)), "at most 256"),
            bad("RUNNER_INSTANCE_LABELS", "1:board,phy\ntiumpi", "control characters"),
            storage(bad("CI_STORAGE_HOST", "host:notaport", "at most 253")),
            storage(bad("CI_STORAGE_HOST", "h".repeat(70_000), "at most 32768 bytes")),
            storage(bad("CI_STORAGE_HOST", format!("{}.com", "h".repeat(300)), "at most 253")),
            storage(bad("CI_STORAGE_HOST", "guest@storage:99999", "a port from 1 to 65535")),
            storage(bad("CI_STORAGE_HOST", "-oProxyCommand=x@storage", "a user of")),
            bad("GH_REPOSITORY", "octo-org/octo\nrepo", "control characters"),
            bad("RUNNER_NAME_PREFIX", "ci\u{7f}x", "control characters"),
            bad("RUNNER_WORKDIR", "_work\tx", "control characters"),
            bad("TZ", "UTC\n", "control characters").with_inner_newline(),
            // Each region named as the user set it.
            bad("AWS_DEFAULT_REGION", "US_EAST_1", "an AWS region"),
            bad("AWS_REGION", "us east 1", "an AWS region"),
        ];
        for m in cases {
            let mut e: BTreeMap<String, String> = env(GOOD);
            for v in m.without {
                e.remove(*v);
            }
            e.extend(m.extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
            e.insert(m.var.to_string(), m.value.clone());
            e.insert("SECRETS_DIR".into(), "/nonexistent".into());
            let ok = |_: &std::path::Path| true;
            let err = Config::from_env(&e, &Host { is_root: false, users: &Users, runner_dir_ok: &ok })
                .expect_err(&format!("{}={:?} was accepted", m.var, m.value));
            assert_eq!(vars_of(&err), [m.var], "{}={:?}: {:?}", m.var, m.value, err.0);
            let text = err.0[0].to_string();
            assert!(text.contains(m.says), "{}={:?}: {text}", m.var, m.value);
            if m.secret {
                assert!(err.0[0].value.is_none(), "{} shown: {text}", m.var);
                let core = m.value.split(|c: char| c.is_whitespace() || c.is_control()).next().unwrap();
                assert!(!text.contains(core), "{} leaked: {text}", m.var);
            } else if m.value.len() <= 256 && !m.value.chars().any(char::is_control) {
                assert!(text.contains(&format!("{:?}", m.value)), "{}: value not shown: {text}", m.var);
            }
        }
    }

    impl Malformed {
        /// `TZ=UTC\n` would be trimmed to a valid zone: put the newline inside.
        fn with_inner_newline(self) -> Self {
            Malformed { value: "Europe/Ber\nlin".into(), ..self }
        }
    }

    #[test]
    fn values_at_their_bounds_and_multi_line_lists_are_accepted() {
        let cfg = load(
            &[
                GOOD,
                STORAGE,
                &[
                    ("DRAIN_TIMEOUT_SEC", "432000"),
                    ("DEBUG_SHUTDOWN_DELAY_SEC", "3600"),
                    ("CI_STORAGE_TIMEOUT_SEC", "86400"),
                    ("CI_STORAGE_HOST", "guest@storage.example.com:65535"),
                    ("GH_SERVER_URL", "https://ghes.example:8443/"),
                    ("AWS_DEFAULT_REGION", "eu-central-1"),
                    ("FORWARD_HOST", "db\nbackup"),
                    ("FORWARD_PORTS", "5432\n53/udp\t6379"),
                    // A trailing newline (a value pasted from a file) is trimmed, not refused.
                    ("GH_TOKEN", "ghp_secret\n"),
                ],
            ]
            .concat(),
            true,
        )
        .unwrap();
        assert_eq!(cfg.drain_timeout, Duration::from_secs(limits::MAX_DRAIN_TIMEOUT_SEC));
        assert_eq!(cfg.api_url, "https://ghes.example:8443/api/v3");
        assert_eq!(cfg.autoscale.aws.region.as_deref(), Some("eu-central-1"));
        assert_eq!(cfg.prewarm.unwrap().host.port, 65535);
        assert_eq!(cfg.forwards.unwrap().0.len(), 3);
        assert!(matches!(&cfg.credentials, Credentials::Pat(t) if t.expose() == "ghp_secret"));
    }

    #[test]
    fn a_bad_server_url_is_named_once_not_again_as_the_derived_api_url() {
        let e = load(&[GOOD, &[("GH_SERVER_URL", "https://ghes.example:99999")]].concat(), false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_SERVER_URL"]);
        let e = ops_config(&env(&[
            ("GH_TOKEN", "t"),
            ("GH_REPOSITORY", "a/b"),
            ("GH_API_URL", "https://api.github.com:99999"),
            ("SECRETS_DIR", "/nonexistent"),
        ]))
        .unwrap_err();
        assert_eq!(vars_of(&e), ["GH_API_URL"]);
    }

    #[test]
    fn a_token_from_a_secret_file_is_checked_like_the_variable() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("GH_TOKEN"), "ghp_first\nghp_second\n").unwrap();
        let d = dir.path().display().to_string();
        let e = load(&[("SECRETS_DIR", &d), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x")], false).unwrap_err();
        assert_eq!(vars_of(&e), ["GH_TOKEN"]);
        let text = e.0[0].to_string();
        assert!(!text.contains("ghp_first") && !text.contains("ghp_second"), "{text}");
    }
}
