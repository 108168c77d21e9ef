//! The container's runners (README "Several runners per container"): the boot they share
//! (time zone, instance labels, forwards, boot hooks, runner group, sweep), one
//! [`Supervisor`] per runner, the signals fanned out to all of them, and the runners added and
//! removed over the admin API ([`crate::admin`]), kept in `STATE_DIR` across restarts.
//!
//! `RUNNER_COUNT=1` (the default) is the one runner in `RUNNER_DIR` itself. Each further runner
//! gets its own root under `RUNNER_ROOTS_DIR`, made from that install by
//! [`runner::make_root`]: the large read-only parts shared, its identity and work its own.

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{self, Config, Credentials, RunnerName, Secret};
use crate::error::{chain, Error, ExitCode};
use crate::github::{Auth, Budget, Github};
use crate::hooks;
use crate::runner;
use crate::status::{State, Status, StatusHandle};
use crate::supervisor::{self, runner_name, RegistrationSlot, SignalKind, Supervisor};

/// Every runner's configuration and registration, for main's panic path.
pub type Registry = Arc<Mutex<Vec<(Config, RegistrationSlot)>>>;

/// A runner added over the admin API, as kept in `STATE_DIR/runners/<name>.json` (mode 0600:
/// it may hold the registration token it was added with).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Spec {
    pub name: String,
    /// `owner/repo` or an organization.
    pub scope: String,
    pub labels: Vec<String>,
    #[serde(default)]
    pub ephemeral: bool,
    /// A registration token given with the request, used instead of the container's
    /// credentials (it expires an hour after GitHub issued it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub token: Option<String>,
}

/// A request from the admin API, answered on `reply`.
pub enum Command {
    /// Adds a runner; `spec.name` empty means "generate one from the name prefix".
    Add { spec: Spec, reply: oneshot::Sender<Result<Status, AddError>> },
    /// Drains one runner (its job finishes) and de-registers it.
    Remove { name: String, reply: oneshot::Sender<Result<(), RemoveError>> },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum AddError {
    #[error("a runner named {0} already exists in this container")]
    Duplicate(String),
    #[error("the container is draining: it adds no runner")]
    Draining,
    #[error("failed to prepare the runner's root {path}: {reason}")]
    Prepare { path: String, reason: String },
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RemoveError {
    #[error("no runner named {0} in this container")]
    NotFound(String),
}

/// Where a runner came from.
enum Origin {
    /// One of `RUNNER_COUNT`.
    Count,
    /// Added over the admin API.
    Added(Spec),
}

struct Member {
    origin: Origin,
    /// Its configuration and registration, for the panic path: a panicking task is
    /// de-registered from here ([`supervisor::emergency_deregister`]).
    cfg: Config,
    slot: RegistrationSlot,
    signals: mpsc::UnboundedSender<SignalKind>,
    status: StatusHandle,
    root: PathBuf,
    removing: bool,
    done: bool,
}

impl Member {
    /// The name it answers to in the admin API: its registration's current name.
    fn name(&self) -> String {
        match &self.origin {
            Origin::Added(spec) => spec.name.clone(),
            Origin::Count => self.status.get().runner_name.unwrap_or_default(),
        }
    }
}

pub struct Runners {
    cfg: Config,
    status: StatusHandle,
    signals: mpsc::UnboundedReceiver<SignalKind>,
    commands: Option<mpsc::Receiver<Command>>,
    registry: Registry,
    started: Instant,
    daemons: hooks::Daemons,
    forwarder: Option<crate::forward::Forwarder>,
    /// The replica index claimed for `RUNNER_INSTANCE_LABELS`, held while the container lives.
    instance_claim: Option<std::fs::File>,
    group_id: Option<u64>,
    /// The API client for the container's credentials, made once and shared by its runners.
    github: Option<Option<Github>>,
    members: Vec<Member>,
    tasks: JoinSet<(usize, ExitCode)>,
    /// Which member each task runs: a panicked task's `JoinError` carries only its id.
    task_members: HashMap<tokio::task::Id, usize>,
    cancel: CancellationToken,
}

/// `TZ` for the whole container: hooks and the runner get it in their environment; as the
/// container's PID 1 (our parent is PID 1) and root, `/etc/localtime` and `/etc/timezone`
/// follow it too, for programs that ignore `TZ`.
fn apply_tz(cfg: &Config) {
    let Some(tz) = cfg.tz.as_deref().map(|t| t.trim_start_matches(':')) else { return };
    if std::os::unix::process::parent_id() != 1 || !nix::unistd::geteuid().is_root() || tz.starts_with('/') {
        return;
    }
    // The file the configuration checked, so /etc/localtime never points at another database.
    let target = cfg.zoneinfo.join(tz);
    let tmp = PathBuf::from("/etc/.localtime.ci-runner");
    let _ = std::fs::remove_file(&tmp);
    let res = std::os::unix::fs::symlink(&target, &tmp)
        .and_then(|()| std::fs::rename(&tmp, "/etc/localtime"))
        .and_then(|()| std::fs::write("/etc/timezone", format!("{tz}\n")));
    match res {
        Ok(()) => info!(tz = %tz, "Time zone set."),
        Err(e) => {
            warn!(tz = %tz, error = %e, "Failed to set /etc/localtime; TZ is still in every process's environment.")
        }
    }
}

/// The work dir a runner in `root` uses: `RUNNER_WORKDIR` inside the root, or, when absolute,
/// that path for the first runner and `<path>-<n>` for the n-th (`suffix`).
fn work_dir_in(cfg: &Config, root: &Path, suffix: Option<&str>) -> (String, PathBuf) {
    let work = Path::new(&cfg.work_dir);
    match (work.is_absolute(), suffix) {
        (true, Some(sfx)) => {
            let w = format!("{}-{sfx}", cfg.work_dir.trim_end_matches('/'));
            (w.clone(), PathBuf::from(w))
        }
        (true, None) => (cfg.work_dir.clone(), work.to_path_buf()),
        (false, _) => (cfg.work_dir.clone(), root.join(work)),
    }
}

/// `cfg` moved to the runner root `root`: its work dir and the pre-warm's target follow.
fn in_root(mut cfg: Config, root: &Path, suffix: Option<&str>) -> Config {
    let (_, old_work) = work_dir_in(&cfg, &cfg.runner_dir, None);
    let (work_dir, new_work) = work_dir_in(&cfg, root, suffix);
    if let Some(p) = cfg.prewarm.as_mut() {
        if let Ok(rest) = p.local_dir.strip_prefix(&old_work) {
            p.local_dir = new_work.join(rest);
        }
    }
    cfg.work_dir = work_dir;
    cfg.runner_dir = root.to_path_buf();
    cfg
}

/// The configuration of the i-th runner of `RUNNER_COUNT` (from 1): the first in `RUNNER_DIR`
/// itself, the others in `RUNNER_ROOTS_DIR/<i>`; a fixed `RUNNER_NAME` gets `-<i>` when there
/// are several.
pub fn count_config(base: &Config, i: u32) -> Config {
    let mut cfg = base.clone();
    if base.runner_count > 1 {
        if let RunnerName::Exact(n) = &base.name {
            cfg.name = RunnerName::Exact(format!("{n}-{i}"));
        }
    }
    if i == 1 {
        return cfg;
    }
    let root = base.roots_dir.join(i.to_string());
    in_root(cfg, &root, Some(&i.to_string()))
}

/// The configuration of a runner added over the admin API: the container's, with the
/// request's scope, labels, name and lifetime, and its token if it brought one. It has no
/// runner group (a group belongs to the container's organization), no pre-warm (the storage is
/// keyed by the container's repository) and no sweep.
pub fn added_config(base: &Config, spec: &Spec) -> Option<Config> {
    let mut cfg = base.clone();
    cfg.scope = config::parse_scope(&spec.scope)?;
    cfg.labels = spec.labels.clone();
    cfg.name = RunnerName::Exact(spec.name.clone());
    cfg.ephemeral = spec.ephemeral;
    cfg.ephemeral_restart = false;
    if let Some(t) = &spec.token {
        cfg.credentials = Credentials::RegistrationToken(Secret::new(t.clone()));
    }
    cfg.jit = cfg.ephemeral && !matches!(cfg.credentials, Credentials::RegistrationToken(_));
    cfg.group = None;
    cfg.prewarm = None;
    cfg.sweep_offline = None;
    cfg.instance_labels = None;
    let root = base.roots_dir.join("api").join(&spec.name);
    Some(in_root(cfg, &root, Some(&spec.name)))
}

/// Writes `spec` to `dir/runners/<name>.json` (0600, through a temporary file).
fn save_spec(dir: &Path, spec: &Spec) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let dir = dir.join("runners");
    std::fs::create_dir_all(&dir)?;
    let tmp = dir.join(format!(".{}.json.tmp", spec.name));
    let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&tmp)?;
    f.write_all(&serde_json::to_vec_pretty(spec).map_err(std::io::Error::other)?)?;
    f.sync_all()?;
    std::fs::rename(&tmp, dir.join(format!("{}.json", spec.name)))
}

fn forget_spec(dir: &Path, name: &str) {
    let path = dir.join("runners").join(format!("{name}.json"));
    if let Err(e) = std::fs::remove_file(&path) {
        if e.kind() != std::io::ErrorKind::NotFound {
            warn!(path = %path.display(), error = %e, "Failed to remove a runner's state file.");
        }
    }
}

/// The runners kept in `dir`, in name order; a file that does not read back is skipped with
/// a WARN naming it.
pub fn load_specs(dir: &Path) -> Vec<Spec> {
    let Ok(entries) = std::fs::read_dir(dir.join("runners")) else { return Vec::new() };
    let mut specs = BTreeMap::new();
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_none_or(|e| e != "json") || entry.file_name().to_string_lossy().starts_with('.') {
            continue;
        }
        let spec = std::fs::read(&path)
            .map_err(|e| e.to_string())
            .and_then(|b| serde_json::from_slice::<Spec>(&b).map_err(|e| e.to_string()))
            .and_then(|s| {
                let stem = path.file_stem().map(|s| s.to_string_lossy().to_string()).unwrap_or_default();
                validate_spec(&s).map_err(|e| e.to_string())?;
                if stem == s.name {
                    Ok(s)
                } else {
                    Err(format!("its name {:?} is not its file's", s.name))
                }
            });
        match spec {
            Ok(s) => {
                specs.insert(s.name.clone(), s);
            }
            Err(e) => {
                warn!(path = %path.display(), error = %e, "Skipping a runner state file that does not read back.")
            }
        }
    }
    specs.into_values().collect()
}

/// Why a runner request is refused, for a 400.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SpecError {
    #[error("name must be 1-64 characters of A-Z a-z 0-9 . _ - not starting with a dot, got {0:?}")]
    Name(String),
    #[error("scope must be owner/repo (a repository) or an organization login, got {0:?}")]
    Scope(String),
    #[error("labels must be one or more labels of at most 256 characters each, without control characters")]
    Labels,
    #[error("token must be a registration token without spaces")]
    Token,
}

/// Every field of a runner request checked: the name is a safe path component, the scope a
/// repository or an organization, the labels as `GH_LABELS` takes them.
pub fn validate_spec(spec: &Spec) -> Result<(), SpecError> {
    if !spec.name.is_empty() && !config::valid_runner_name(&spec.name) {
        return Err(SpecError::Name(spec.name.clone()));
    }
    if config::parse_scope(&spec.scope).is_none() {
        return Err(SpecError::Scope(spec.scope.clone()));
    }
    if config::parse_labels(spec.labels.iter().map(String::as_str)).as_ref() != Some(&spec.labels) {
        return Err(SpecError::Labels);
    }
    if spec.token.as_ref().is_some_and(|t| t.is_empty() || t.chars().any(|c| c.is_whitespace() || c.is_control())) {
        return Err(SpecError::Token);
    }
    Ok(())
}

impl Runners {
    pub fn new(
        cfg: Config,
        status: StatusHandle,
        signals: mpsc::UnboundedReceiver<SignalKind>,
        commands: Option<mpsc::Receiver<Command>>,
        registry: Registry,
        started: Instant,
    ) -> Self {
        Self {
            cfg,
            status,
            signals,
            commands,
            registry,
            started,
            daemons: hooks::Daemons::default(),
            forwarder: None,
            instance_claim: None,
            group_id: None,
            github: None,
            members: Vec::new(),
            tasks: JoinSet::new(),
            task_members: HashMap::new(),
            cancel: CancellationToken::new(),
        }
    }

    /// Boots the container, runs its runners until they are drained, finished or failed, and
    /// returns the process exit code: the first failing code of the `RUNNER_COUNT` runners
    /// (a runner added over the admin API never ends the container).
    pub async fn run(mut self) -> ExitCode {
        let code = match self.run_inner().await {
            Ok(code) => code,
            Err(e) => {
                error!(error = %chain(&e), "Boot failed.");
                let msg = chain(&e);
                for m in self.members.iter().filter(|m| !m.done) {
                    m.status.update(|s| s.last_error = Some(msg.clone()));
                    m.status.set_state(State::Failed);
                }
                self.status.update(|s| s.last_error = Some(msg));
                self.status.set_state(State::Failed);
                e.exit_code()
            }
        };
        // After the runners: what the boot hooks started (dockerd, a VPN …), then the forwards
        // (the runners' de-registration and the daemons may have used them).
        self.daemons.stop(Duration::from_secs(10)).await;
        if let Some(f) = self.forwarder.take() {
            let _ = tokio::task::spawn_blocking(move || f.stop()).await;
        }
        self.cancel.cancel();
        drop(self.instance_claim.take());
        code
    }

    async fn run_inner(&mut self) -> Result<ExitCode, Error> {
        apply_tz(&self.cfg);
        self.resolve_instance()?;
        // First of all: the hooks and the pre-warm may need them (CI_STORAGE_HOST is often a
        // forwarded port). A port already taken stops the boot before anything is registered.
        if let Some((forwards, opts)) = self.cfg.forwards.clone() {
            self.forwarder = Some(crate::forward::start(forwards, opts)?);
        }
        if !self.run_hooks(false).await? {
            info!("Stopped during boot: nothing was registered.");
            return Ok(ExitCode::Ok);
        }
        // After the root hooks (they may bring up the network), before any runner is prepared:
        // every root is made from the install as the update left it, and the version check
        // (RUNNER_MIN_VERSION) sees the version it left.
        if !self.update_runner().await {
            info!("Stopped during boot: nothing was registered.");
            return Ok(ExitCode::Ok);
        }
        // After the root hooks (they may bring up what reaches the storage host), before the
        // guest hooks and registration, which go on while it loads.
        let mut sups = Vec::new();
        for i in 1..=self.cfg.runner_count {
            let cfg = count_config(&self.cfg, i);
            let mut sup = self.prepare(cfg, Origin::Count)?;
            sup.start_prewarm();
            sup.start_version_check();
            sups.push(sup);
        }
        if !self.run_hooks(true).await? || !self.resolve_group().await? {
            self.stop_in_boot(&mut sups);
            return Ok(ExitCode::Ok);
        }
        self.sweep().await;
        for (idx, mut sup) in sups.into_iter().enumerate() {
            sup.set_runner_env(self.cfg.runner_env.clone());
            sup.set_runner_group_id(self.group_id);
            self.spawn(idx, sup);
        }
        if let Some(dir) = self.cfg.state_dir.clone() {
            for spec in load_specs(&dir) {
                info!(runner = %spec.name, scope = %spec.scope, "Bringing back a runner added over the admin API.");
                if let Err(e) = self.add(spec) {
                    warn!(error = %chain(&e), "Failed to bring back a runner added over the admin API.");
                }
            }
        }
        Ok(self.supervise().await)
    }

    /// A signal ended the boot after the runners were prepared: their pre-warms stop, and
    /// they are listed as stopped, none having registered.
    fn stop_in_boot(&self, sups: &mut [Supervisor]) {
        for sup in sups {
            sup.cancel_prewarm();
        }
        for m in &self.members {
            m.status.set_state(State::Stopped);
        }
        info!("Stopped during boot: nothing was registered.");
    }

    /// The runners' lives: signals fanned out, admin requests served, ends collected.
    async fn supervise(&mut self) -> ExitCode {
        let mut signalled = false;
        let mut code = ExitCode::Ok;
        loop {
            let serving = self.commands.is_some() && !signalled;
            if self.tasks.is_empty() && !serving {
                return code;
            }
            tokio::select! {
                Some(sig) = self.signals.recv() => {
                    signalled = true;
                    let live = self.members.iter().filter(|m| !m.done).count();
                    info!(signal = ?sig, runners = live, "Signal received: passing it to every runner.");
                    for m in self.members.iter().filter(|m| !m.done) {
                        let _ = m.signals.send(sig);
                    }
                    if live == 0 {
                        return code;
                    }
                }
                cmd = recv_command(&mut self.commands) => match cmd {
                    Some(cmd) => self.command(cmd, signalled),
                    None => self.commands = None,
                },
                Some(joined) = self.tasks.join_next_with_id(), if !self.tasks.is_empty() => {
                    let (idx, rc) = match joined {
                        Ok((id, r)) => {
                            self.task_members.remove(&id);
                            r
                        }
                        Err(e) => {
                            // Main's panic path cannot see a task's panic: handled here.
                            self.panicked(&e).await;
                            code = ExitCode::Internal;
                            if !signalled {
                                signalled = true;
                                for m in self.members.iter().filter(|m| !m.done) {
                                    let _ = m.signals.send(SignalKind::Term);
                                }
                            }
                            continue;
                        }
                    };
                    if let Some(rc) = self.ended(idx, rc) {
                        if code == ExitCode::Ok {
                            code = rc;
                        }
                    }
                }
            }
        }
    }

    /// A runner's supervisor returned; its code counts for the container's when it was one of
    /// `RUNNER_COUNT`.
    fn ended(&mut self, idx: usize, rc: ExitCode) -> Option<ExitCode> {
        let m = &mut self.members[idx];
        m.done = true;
        let name = m.name();
        info!(runner = %name, exit_code = rc.code(), "Runner ended.");
        match &m.origin {
            Origin::Count => (rc != ExitCode::Ok).then_some(rc),
            Origin::Added(spec) => {
                let finished = m.removing || (spec.ephemeral && rc == ExitCode::Ok);
                if finished {
                    if let Some(dir) = &self.cfg.state_dir {
                        forget_spec(dir, &spec.name);
                    }
                    m.status.update(|s| s.retired = true);
                    if let Err(e) = std::fs::remove_dir_all(&m.root) {
                        warn!(root = %m.root.display(), error = %e, "Failed to remove a runner's root.");
                    }
                }
                None
            }
        }
    }

    fn command(&mut self, cmd: Command, signalled: bool) {
        match cmd {
            Command::Add { spec, reply } => {
                let result = if signalled { Err(AddError::Draining) } else { self.add_requested(spec) };
                let _ = reply.send(result);
            }
            Command::Remove { name, reply } => {
                let found = self.members.iter_mut().find(|m| !m.removing && !retired(m) && m.name() == name);
                let result = match found {
                    None => Err(RemoveError::NotFound(name)),
                    Some(m) if m.done => {
                        // It ended on its own (failed, or the container's drain): forget it.
                        info!(runner = %name, "Removing a runner that is no longer running (admin API).");
                        m.removing = true;
                        if let (Origin::Added(spec), Some(dir)) = (&m.origin, &self.cfg.state_dir) {
                            forget_spec(dir, &spec.name);
                        }
                        m.status.update(|s| s.retired = true);
                        Ok(())
                    }
                    Some(m) => {
                        info!(runner = %name, "Removing a runner (admin API): it drains, then is de-registered.");
                        m.removing = true;
                        if let (Origin::Added(spec), Some(dir)) = (&m.origin, &self.cfg.state_dir) {
                            // Gone from the state at once: a restart mid-drain does not bring it back.
                            forget_spec(dir, &spec.name);
                        }
                        let _ = m.signals.send(SignalKind::Term);
                        Ok(())
                    }
                };
                let _ = reply.send(result);
            }
        }
    }

    /// `POST /runners`: a duplicate name is refused; the runner is kept in `STATE_DIR` before
    /// it starts.
    fn add_requested(&mut self, mut spec: Spec) -> Result<Status, AddError> {
        if spec.name.is_empty() {
            let prefix = match &self.cfg.name {
                RunnerName::Prefix(p) => p.clone(),
                RunnerName::Exact(n) => n.clone(),
            };
            spec.name = runner_name(&RunnerName::Prefix(prefix));
        }
        if self.members.iter().any(|m| !m.done && m.name() == spec.name) {
            return Err(AddError::Duplicate(spec.name));
        }
        if let Some(dir) = &self.cfg.state_dir {
            save_spec(dir, &spec).map_err(|e| AddError::Prepare {
                path: dir.join("runners").display().to_string(),
                reason: e.to_string(),
            })?;
        }
        info!(runner = %spec.name, scope = %spec.scope, labels = %spec.labels.join(","), ephemeral = spec.ephemeral, "Adding a runner (admin API).");
        let name = spec.name.clone();
        let status = self.add(spec.clone()).inspect_err(|_| {
            if let Some(dir) = &self.cfg.state_dir {
                forget_spec(dir, &name);
            }
        })?;
        Ok(status)
    }

    /// Starts a runner added over the admin API (now, or brought back from `STATE_DIR`).
    fn add(&mut self, spec: Spec) -> Result<Status, AddError> {
        let cfg = added_config(&self.cfg, &spec)
            .ok_or_else(|| AddError::Prepare { path: spec.name.clone(), reason: "the scope does not parse".into() })?;
        let root = cfg.runner_dir.clone();
        let mut sup = self
            .prepare(cfg, Origin::Added(spec))
            .map_err(|e| AddError::Prepare { path: root.display().to_string(), reason: chain(&e) })?;
        let idx = self.members.len() - 1;
        let status = self.members[idx].status.get();
        sup.set_runner_env(self.cfg.runner_env.clone());
        self.spawn(idx, sup);
        Ok(status)
    }

    /// Runs member `idx`'s supervisor as a task of its own.
    fn spawn(&mut self, idx: usize, sup: Supervisor) {
        #[cfg(debug_assertions)]
        if let (Origin::Count, Some((n, busy))) = (&self.members[idx].origin, self.cfg.test_panic_runner) {
            if idx + 1 == n as usize {
                let (slot, status) = (self.members[idx].slot.clone(), self.members[idx].status.clone());
                let handle = self.tasks.spawn(async move { (idx, panic_once(sup, slot, status, busy).await) });
                self.task_members.insert(handle.id(), idx);
                return;
            }
        }
        let handle = self.tasks.spawn(async move { (idx, sup.run().await) });
        self.task_members.insert(handle.id(), idx);
    }

    /// A runner's task panicked (a bug): its registration is removed at once, as main does
    /// after a panic of the whole supervisor (README "Exit codes": 1), and the container ends
    /// with 1, the other runners draining as on SIGTERM.
    async fn panicked(&mut self, error: &tokio::task::JoinError) {
        let Some(idx) = self.task_members.remove(&error.id()) else {
            error!(error = %error, "A task of unknown runner panicked.");
            return;
        };
        let m = &mut self.members[idx];
        m.done = true;
        let name = m.name();
        error!(runner = %name, error = %error, "A runner's supervisor panicked; removing its registration and stopping the container.");
        let pgid = m.status.get().pid.and_then(|p| i32::try_from(p).ok()).filter(|p| *p > 1);
        m.status.update(|s| s.last_error = Some(format!("the runner's supervisor panicked: {error}")));
        m.status.set_state(State::Failed);
        let (cfg, slot) = (m.cfg.clone(), m.slot.clone());
        // Its runner has no supervisor left: stopped first, so that GitHub does not refuse to
        // remove a runner that is still busy with a job.
        if let Some(pgid) = pgid {
            stop_orphaned_runner(nix::unistd::Pid::from_raw(pgid)).await;
        }
        supervisor::emergency_deregister(&cfg, &slot).await;
    }

    /// A runner's root made, its status entry listed, its supervisor built (not started).
    fn prepare(&mut self, cfg: Config, origin: Origin) -> Result<Supervisor, Error> {
        let root = cfg.runner_dir.clone();
        if root != self.cfg.runner_dir {
            let made = runner::make_root(&self.cfg.runner_dir, &root)
                .map_err(|source| Error::Prepare { path: root.clone(), source })?;
            if made.copied_bytes > 0 && made.linked == 0 {
                warn!(root = %root.display(), bytes = made.copied_bytes, "RUNNER_ROOTS_DIR is on another filesystem than RUNNER_DIR: the runner's files were copied, not linked.");
            }
        }
        let work = Path::new(&cfg.work_dir);
        if work.is_absolute() && cfg.work_dir != self.cfg.work_dir && !work.exists() {
            // `<RUNNER_WORKDIR>-<i>`: the runner user could not make it beside the first.
            make_work_dir(work, cfg.runner_user.as_ref())
                .map_err(|source| Error::Prepare { path: work.to_path_buf(), source })?;
        }
        let added = matches!(origin, Origin::Added(_));
        let (scope, labels) = (cfg.scope.url_path(), cfg.labels.clone());
        let status = self.status.add_runner(|s| {
            s.scope = Some(scope);
            s.labels = labels;
            s.added = added;
        });
        let (tx, rx) = mpsc::unbounded_channel();
        let slot: RegistrationSlot = Arc::new(Mutex::new(None));
        self.registry.lock().unwrap_or_else(|p| p.into_inner()).push((cfg.clone(), slot.clone()));
        let started = if added { Instant::now() } else { self.started };
        // A PAT serves every scope; a GitHub App's installation depends on the owner.
        let github = match (&origin, &cfg.credentials) {
            (Origin::Count, _) | (Origin::Added(_), Credentials::Pat(_)) => self.github()?,
            (Origin::Added(_), _) => client_for(&cfg)?,
        };
        let sup = Supervisor::new(cfg.clone(), github, status.clone(), rx, slot.clone(), started)?;
        self.members.push(Member { origin, cfg, slot, signals: tx, status, root, removing: false, done: false });
        Ok(sup)
    }

    /// This instance's entry of `RUNNER_INSTANCE_LABELS`: its labels join `GH_LABELS`, its key
    /// is `RUNNER_INSTANCE` for the hooks and jobs; a claimed replica index is held for life.
    fn resolve_instance(&mut self) -> Result<(), Error> {
        let Some(table) = self.cfg.instance_labels.clone() else { return Ok(()) };
        let host = nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_default();
        let resolved = table.resolve(&host)?;
        for l in &resolved.labels {
            if !self.cfg.labels.iter().any(|x| x.eq_ignore_ascii_case(l)) {
                self.cfg.labels.push(l.clone());
            }
        }
        self.cfg.runner_env.retain(|(k, _)| k != "RUNNER_INSTANCE");
        self.cfg.runner_env.push(("RUNNER_INSTANCE".into(), resolved.key.clone()));
        info!(instance = %resolved.key, claimed = resolved.claim.is_some(), labels = %self.cfg.labels.join(","), "Instance labels added.");
        self.instance_claim = resolved.claim;
        Ok(())
    }

    /// One phase of the boot hooks (`root`, then `guest`); what they export (and do not
    /// unset) becomes the runners' environment. Returns false when a signal stopped them.
    async fn run_hooks(&mut self, guest: bool) -> Result<bool, Error> {
        let dir = if guest { &self.cfg.guest_hooks_dir } else { &self.cfg.root_hooks_dir };
        let found = hooks::discover(dir);
        if found.is_empty() {
            return Ok(true);
        }
        self.status.set_state(State::Starting);
        let phase = if guest {
            hooks::Phase {
                name: "guest",
                hooks: found,
                user: self.cfg.runner_user.as_ref(),
                cwd: self
                    .cfg
                    .runner_user
                    .as_ref()
                    .map(|u| u.home.clone())
                    .filter(|h| h.is_dir())
                    .unwrap_or_else(|| "/".into()),
            }
        } else {
            hooks::Phase { name: "root", hooks: found, user: None, cwd: "/".into() }
        };
        let signals = &mut self.signals;
        let interrupt = async {
            if let Some(sig) = signals.recv().await {
                info!(signal = ?sig, "Signal received during boot.");
            } else {
                std::future::pending::<()>().await;
            }
        };
        let started = Instant::now();
        match hooks::run_phase(&phase, &self.cfg.runner_env, &mut self.daemons, interrupt).await? {
            hooks::Outcome::Done(exported) => {
                let seconds = started.elapsed().as_secs_f64();
                info!(phase = phase.name, seconds = format!("{seconds:.2}"), "Boot hooks done.");
                self.status.update(|s| match guest {
                    true => s.boot.guest_hooks_seconds = Some(seconds),
                    false => s.boot.root_hooks_seconds = Some(seconds),
                });
                // The runner's HOME/USER/LOGNAME are set again when it starts.
                self.cfg.runner_env = exported;
                Ok(true)
            }
            hooks::Outcome::Interrupted => Ok(false),
        }
    }

    /// `RUNNER_UPDATE_AT_BOOT`: the install brought to the latest release, once per container
    /// ([`crate::update`]; a failure is a WARN and the installed runner runs). The roots of
    /// further runners, made from the old install, are unmade so that they are made again.
    /// Returns false when a signal came first (the update is dropped: its children are
    /// killed, and a swap never stops halfway, see [`crate::update::recover`]).
    async fn update_runner(&mut self) -> bool {
        let Some(settings) = self.cfg.update.clone() else {
            // A swap an earlier boot began is finished even with the update now off: the
            // install is never left mixed.
            if let Err(e) = crate::update::recover(&self.cfg.runner_dir) {
                warn!(error = %chain(&e), "Failed to finish an earlier runner update.");
            }
            return true;
        };
        self.status.set_state(State::Starting);
        let outcome = tokio::select! {
            o = crate::update::at_boot(&self.cfg, &settings) => o,
            Some(sig) = self.signals.recv() => {
                info!(signal = ?sig, "Signal received during the runner update.");
                return false;
            }
        };
        if matches!(outcome, crate::update::Outcome::Updated { .. }) {
            for root in existing_roots(&self.cfg.roots_dir) {
                if let Err(e) = runner::unmake_root(&self.cfg.runner_dir, &root) {
                    warn!(root = %root.display(), error = %e, "Failed to clear a runner root of the old install.");
                }
            }
        }
        true
    }

    /// The container's API client, when its credentials can call the API.
    fn github(&mut self) -> Result<Option<Github>, Error> {
        if self.github.is_none() {
            self.github = Some(client_for(&self.cfg)?);
        }
        Ok(self.github.clone().flatten())
    }

    /// `RUNNER_GROUP` to its id, before anything is registered: a group that does not exist
    /// stops the boot with the groups that do (config.sh would only say it found none).
    /// Without API credentials (a bare registration token) config.sh resolves the name itself.
    /// Returns false when a signal came first.
    async fn resolve_group(&mut self) -> Result<bool, Error> {
        let (Some(name), Some(gh)) = (self.cfg.group.clone(), self.github()?) else { return Ok(true) };
        let lookup = gh.runner_group_id(&self.cfg.scope, &name, Budget::attempts(8), &self.cancel);
        let started = Instant::now();
        let id = tokio::select! {
            id = lookup => id.map_err(Error::Github)?,
            Some(sig) = self.signals.recv() => {
                info!(signal = ?sig, "Signal received while resolving the runner group.");
                return Ok(false);
            }
        };
        let seconds = started.elapsed().as_secs_f64();
        info!(group = %name, group_id = id, seconds = format!("{seconds:.2}"), "Runner group found.");
        self.status.update(|s| s.boot.runner_group_seconds = Some(seconds));
        self.group_id = Some(id);
        Ok(true)
    }

    /// `RUNNER_SWEEP_OFFLINE_SEC`: the pool's stale runners, before ours register.
    async fn sweep(&mut self) {
        let Some(older_than) = self.cfg.sweep_offline else { return };
        let Ok(Some(gh)) = self.github() else { return };
        let pool = crate::fleet::Pool::of(&self.cfg.name);
        let started = Instant::now();
        crate::fleet::sweep(&gh, &self.cfg.scope, &pool, older_than, &self.cancel).await;
        let seconds = started.elapsed().as_secs_f64();
        self.status.update(|s| s.boot.sweep_seconds = Some(seconds));
    }
}

/// The runner of a panicked supervisor (`pgid`: its run.sh's process group): SIGINT to the
/// Listener, the runner's own clean stop, which cancels a running job and reports it (as the
/// drain's deadline does); then, after [`supervisor::STOP_GRACE`] at most, SIGKILL to the group.
async fn stop_orphaned_runner(pgid: nix::unistd::Pid) {
    use nix::sys::signal::{kill, killpg, Signal};
    let listeners = runner::find_in_group(pgid, "Runner.Listener");
    for pid in &listeners {
        let _ = kill(*pid, Signal::SIGINT);
    }
    if listeners.is_empty() {
        let _ = killpg(pgid, Signal::SIGTERM);
    }
    let deadline = Instant::now() + supervisor::STOP_GRACE;
    while killpg(pgid, None).is_ok() && Instant::now() < deadline {
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let _ = killpg(pgid, Signal::SIGKILL);
}

/// The test hook of `CI_RUNNER_TEST_PANIC` (debug builds only): runs `sup` and panics once its
/// registration is recorded, or once it is busy with a job, as a bug in a runner's supervisor
/// would.
#[cfg(debug_assertions)]
async fn panic_once(sup: Supervisor, slot: RegistrationSlot, status: StatusHandle, busy: bool) -> ExitCode {
    let reached = async {
        loop {
            let registered = slot.lock().unwrap_or_else(|p| p.into_inner()).is_some();
            if registered && (!busy || status.get().state == State::Busy) {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    tokio::select! {
        rc = sup.run() => rc,
        () = reached => panic!("{} is set: this runner's task panics now (a test hook)", config::TEST_PANIC_VAR),
    }
}

/// The runner roots already under `RUNNER_ROOTS_DIR`: `<n>` for `RUNNER_COUNT`, `api/<name>`
/// for runners added over the admin API.
fn existing_roots(roots_dir: &Path) -> Vec<PathBuf> {
    let list = |d: &Path| -> Vec<PathBuf> {
        std::fs::read_dir(d).into_iter().flatten().flatten().map(|e| e.path()).filter(|p| p.is_dir()).collect()
    };
    let mut roots: Vec<PathBuf> = list(roots_dir)
        .into_iter()
        .filter(|p| p.file_name().is_some_and(|n| n.to_string_lossy().bytes().all(|b| b.is_ascii_digit())))
        .collect();
    roots.extend(list(&roots_dir.join("api")));
    roots
}

/// A work dir of its own for a further runner: the runner user's, 0700.
fn make_work_dir(dir: &Path, user: Option<&config::RunnerUser>) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    if let Some(u) = user {
        nix::unistd::chown(dir, Some(nix::unistd::Uid::from_raw(u.uid)), Some(nix::unistd::Gid::from_raw(u.gid)))?;
    }
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))
}

fn client_for(cfg: &Config) -> Result<Option<Github>, Error> {
    Auth::for_config(cfg).map(|auth| Github::new(&cfg.api_url, auth)).transpose().map_err(Error::Http)
}

fn retired(m: &Member) -> bool {
    m.status.get().retired
}

/// The next admin request, or never when the admin API is off.
async fn recv_command(commands: &mut Option<mpsc::Receiver<Command>>) -> Option<Command> {
    match commands {
        Some(rx) => rx.recv().await,
        None => std::future::pending().await,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn spec(name: &str, scope: &str, labels: &[&str]) -> Spec {
        Spec {
            name: name.into(),
            scope: scope.into(),
            labels: labels.iter().map(|l| l.to_string()).collect(),
            ephemeral: false,
            token: None,
        }
    }

    #[test]
    fn requests_are_checked_field_by_field() {
        assert_eq!(validate_spec(&spec("a-1", "octo/repo", &["linux"])), Ok(()));
        assert_eq!(validate_spec(&spec("", "octo", &["linux"])), Ok(()), "a name is optional; an org scope is fine");
        assert_eq!(validate_spec(&spec("../etc", "octo/repo", &["x"])), Err(SpecError::Name("../etc".into())));
        assert_eq!(validate_spec(&spec("..", "octo/repo", &["x"])), Err(SpecError::Name("..".into())));
        assert_eq!(validate_spec(&spec("a/b", "octo/repo", &["x"])), Err(SpecError::Name("a/b".into())));
        assert_eq!(validate_spec(&spec("a", "octo/repo/x", &["x"])), Err(SpecError::Scope("octo/repo/x".into())));
        assert_eq!(validate_spec(&spec("a", "", &["x"])), Err(SpecError::Scope("".into())));
        assert_eq!(validate_spec(&spec("a", "octo repo", &["x"])), Err(SpecError::Scope("octo repo".into())));
        assert_eq!(validate_spec(&spec("a", "octo/repo", &[])), Err(SpecError::Labels));
        assert_eq!(validate_spec(&spec("a", "octo/repo", &["bad\nlabel"])), Err(SpecError::Labels));
        let mut s = spec("a", "octo/repo", &["x"]);
        s.token = Some("two words".into());
        assert_eq!(validate_spec(&s), Err(SpecError::Token));
    }

    #[test]
    fn each_runner_gets_its_own_root_name_and_work_dir() {
        let env = [
            ("GH_TOKEN", "ghp_x"),
            ("GH_REPOSITORY", "octo/repo"),
            ("GH_LABELS", "linux"),
            ("RUNNER_DIR", "/opt/runner"),
            ("RUNNER_NAME", "build"),
            ("RUNNER_COUNT", "3"),
        ];
        let base = crate::config::tests::load(&env, false).unwrap();
        let first = count_config(&base, 1);
        assert_eq!(first.runner_dir, PathBuf::from("/opt/runner"), "the first runs in the install");
        assert!(matches!(&first.name, RunnerName::Exact(n) if n == "build-1"));
        let third = count_config(&base, 3);
        assert_eq!(third.runner_dir, PathBuf::from("/opt/runners/3"));
        assert!(matches!(&third.name, RunnerName::Exact(n) if n == "build-3"));
        assert_eq!(third.work_dir, "_work", "a relative work dir is inside each root");
        let mut abs = base.clone();
        abs.work_dir = "/mnt/work".into();
        assert_eq!(count_config(&abs, 1).work_dir, "/mnt/work");
        assert_eq!(count_config(&abs, 2).work_dir, "/mnt/work-2");

        let mut s = spec("other-1", "octo-two", &["gpu"]);
        s.ephemeral = true;
        let added = added_config(&base, &s).unwrap();
        assert_eq!(added.scope, crate::config::Scope::Organization("octo-two".into()));
        assert_eq!(added.runner_dir, PathBuf::from("/opt/runners/api/other-1"));
        assert_eq!((added.labels.clone(), added.ephemeral, added.jit), (vec!["gpu".to_string()], true, true));
        s.token = Some("AAAA".into());
        let with_token = added_config(&base, &s).unwrap();
        assert!(matches!(with_token.credentials, Credentials::RegistrationToken(_)));
        assert!(!with_token.jit, "a registration token cannot mint a JIT configuration");
    }

    #[test]
    fn specs_survive_a_round_trip_through_the_state_dir() {
        let dir = tempfile::tempdir().unwrap();
        let mut a = spec("b-runner", "octo/two", &["x", "y"]);
        a.token = Some("AAAA".into());
        save_spec(dir.path(), &a).unwrap();
        save_spec(dir.path(), &spec("a-runner", "octo", &["z"])).unwrap();
        std::fs::write(dir.path().join("runners/c.json"), "{not json").unwrap();
        std::fs::write(dir.path().join("runners/d.json"), serde_json::to_vec(&spec("other", "o/r", &["x"])).unwrap())
            .unwrap();
        let names: Vec<String> = load_specs(dir.path()).into_iter().map(|s| s.name).collect();
        assert_eq!(names, ["a-runner", "b-runner"], "bad files and misnamed ones are skipped");
        assert_eq!(load_specs(dir.path())[1], a);
        use std::os::unix::fs::PermissionsExt;
        let mode = std::fs::metadata(dir.path().join("runners/b-runner.json")).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600, "it may hold a token");
        forget_spec(dir.path(), "b-runner");
        assert_eq!(load_specs(dir.path()).len(), 1);
    }
}
