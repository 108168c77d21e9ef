//! The runner's whole life: register, supervise `run.sh`, drain on a signal, de-register.
//!
//! The drain (README "Shutdown sequence"): on the first SIGTERM/SIGINT the runner stops taking
//! jobs at once. Idle: the registration is deleted through the REST API (so GitHub can assign
//! it nothing more) and the Listener gets SIGINT. Busy: nothing is signalled (the runner would
//! cancel the job); when the Listener prints `completed with result`, it gets SIGINT before it
//! can poll for another job, then the registration is deleted. `DRAIN_TIMEOUT_SEC` bounds the
//! wait; past it (or on a second signal) the Listener gets SIGINT and cancels the job, so
//! GitHub records it as cancelled rather than lost. A third signal kills the runner.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::mpsc;
use tokio::time::{sleep_until, Instant};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::config::{Config, Credentials, RunnerName, Scope, Secret};
use crate::error::{chain, Error, ExitCode};
use crate::github::{Budget, Deleted, Github, GithubError, DEFAULT_RUNNER_GROUP_ID};
use crate::lock;
use crate::metrics::{self, JobResult};
use crate::prewarm;
use crate::runner::{self, describe, parse_line, LineEvent, Registration, RunnerProcess, RunnerVersion};
use crate::status::{DrainOutcome, State, StatusHandle};

pub mod drain;
mod exit;
mod registration;

use drain::Drain;
use exit::DEPRECATED;
pub use exit::{decide, restart_delay, Decision, ExitInfo, Lifetime};
use registration::{delete_registration, final_budget, remove_registration, DEREGISTER_REQUEST_TIMEOUT};
pub use registration::{emergency_deregister, DEREGISTER_GRACE};

/// The signals the supervisor acts on; the caller (main, or a test) feeds them in.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SignalKind {
    Term,
    Int,
    /// A spot interruption notice: drain as on SIGTERM, but a running job must end (cancelled
    /// if need be, so GitHub records it) and the runner be removed by `by`, before the
    /// instance goes. A notice during a drain only brings its deadline forward.
    Spot {
        by: Instant,
    },
}

/// A registration that exists on GitHub and must be removed on every exit path.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Registered {
    pub name: String,
    pub id: Option<u64>,
}

/// Shared with main's panic path, which de-registers whatever this holds.
pub type RegistrationSlot = Arc<Mutex<Option<Registered>>>;

pub use drain::STOP_GRACE;
/// The labels call at a drain's start: the DELETE waits for it, so it is kept short.
const LABELS_BUDGET: Duration = Duration::from_secs(10);
const LABELS_REQUEST_TIMEOUT: Duration = Duration::from_secs(4);
const CONFIG_TIMEOUT: Duration = Duration::from_secs(180);
/// Extra registrations after config.sh fails, before giving up with `RunnerFailed`.
const CONFIG_RETRIES: u32 = 2;
/// A run this long (or one that completed a job) resets the failure count.
const STABLE_RUN: Duration = Duration::from_secs(600);
/// `bin/Runner.Listener --version` starts the .NET runtime once: well under a second.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);

/// A name unique per container start: `<prefix>-<YYYYmmdd-HHMMSS>-<6 random chars>`.
pub fn runner_name(name: &RunnerName) -> String {
    match name {
        RunnerName::Exact(n) => n.clone(),
        RunnerName::Prefix(p) => {
            let now = time::OffsetDateTime::now_utc();
            let stamp = now
                .format(time::macros::format_description!("[year][month][day]-[hour][minute][second]"))
                .unwrap_or_default();
            let mut bytes = [0u8; 6];
            let _ = getrandom::getrandom(&mut bytes);
            let alphabet = b"abcdefghijklmnopqrstuvwxyz0123456789";
            let suffix: String = bytes.iter().map(|b| alphabet[*b as usize % alphabet.len()] as char).collect();
            format!("{p}-{stamp}-{suffix}")
        }
    }
}

/// A call to GitHub in flight while the drain goes on.
type Call<T> = std::pin::Pin<Box<dyn std::future::Future<Output = Result<T, GithubError>> + Send>>;

enum Outcome {
    Drained(drain::Summary),
    Exited(ExitInfo),
}

/// A signal arrived while the supervisor was waiting on something else.
struct Interrupted;

pub struct Supervisor {
    cfg: Config,
    github: Option<Github>,
    status: StatusHandle,
    signals: mpsc::UnboundedReceiver<SignalKind>,
    registration: RegistrationSlot,
    name: String,
    cancel: CancellationToken,
    lock: Option<mpsc::UnboundedSender<lock::Request>>,
    prewarm: Option<PrewarmTask>,
    /// When the process started, for the boot's `listening_seconds`.
    started: Instant,
    /// `RUNNER_GROUP` resolved to its id at start (a JIT configuration needs the id).
    runner_group_id: Option<u64>,
    /// The current JIT registration's configuration, for run.sh's environment only.
    jit: Option<Secret>,
    /// `bin/Runner.Listener --version`, learnt while the boot goes on.
    version: Option<tokio::task::JoinHandle<Option<RunnerVersion>>>,
}

/// A pre-warm running on its own thread (not `spawn_blocking`: a hung one must not hold up
/// the process's exit).
struct PrewarmTask {
    result: tokio::sync::oneshot::Receiver<Result<prewarm::Loaded, prewarm::PrewarmError>>,
    gate: Arc<prewarm::Gate>,
    progress: Arc<prewarm::Progress>,
    started: Instant,
    deadline: Instant,
}

/// Logs how a pre-warm ended and shows it on `/health`, unless it was already shown (a load
/// that ends after the supervisor gave up on it); `over` replaces whatever was shown.
fn finish_prewarm(
    status: &StatusHandle,
    result: &Result<prewarm::Loaded, prewarm::PrewarmError>,
    seconds: f64,
    done: prewarm::Snapshot,
    over: bool,
) {
    let still_running = |s: &crate::status::Status| s.prewarm.as_ref().is_none_or(|p| p.outcome == "running");
    if !over && !still_running(&status.get()) {
        return;
    }
    let st = match result {
        Ok(l) => {
            match &l.slot {
                Some(slot) => {
                    info!(slot = %slot, files = done.files, bytes = done.bytes, received_bytes = l.bytes, seconds = format!("{seconds:.2}"), "Work dir pre-warmed.")
                }
                None => info!("Nothing to pre-warm from; the runner starts cold."),
            }
            crate::status::PrewarmStatus {
                outcome: if l.slot.is_some() { "warm" } else { "cold" },
                slot: l.slot.clone(),
                files: done.files,
                bytes: done.bytes,
                total_files: done.totals.map(|t| t.0),
                total_bytes: done.totals.map(|t| t.1),
                rate_bytes_per_sec: (seconds > 0.0).then(|| (done.bytes as f64 / seconds).round()),
                received_bytes: l.bytes,
                seconds,
                ..Default::default()
            }
        }
        Err(e) => {
            if matches!(e, prewarm::PrewarmError::Cancelled) {
                info!("Pre-warm stopped; what it wrote is removed.");
            } else {
                warn!(error = %chain(e), "Pre-warm failed; the runner starts cold.");
            }
            crate::status::PrewarmStatus { outcome: "failed", seconds, error: Some(chain(e)), ..Default::default() }
        }
    };
    status.update(|s| {
        if over || still_running(s) {
            s.prewarm = Some(st);
            s.boot.prewarm_seconds = Some(seconds);
        }
    });
}

/// How the runner runs a `.sh` job hook.
const BASH_AS_RUNNER: &str = "bash --noprofile --norc -e -o pipefail";

/// Writes a job hook script (0755) that runs `ci-runner hook <kind>`, chained with the
/// user's own hook of that kind, if any.
fn write_hook(
    path: &std::path::Path,
    exe: &std::path::Path,
    kind: &str,
    user_hook: Option<&str>,
) -> std::io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    let q = |s: &str| format!("'{}'", s.replace('\'', "'\\''"));
    let exe = q(&exe.display().to_string());
    let body = match (kind, user_hook) {
        // The user's hook runs as the runner itself runs a job hook (its ScriptHandler's
        // default for bash).
        ("job-started", Some(h)) => format!("{exe} hook job-started || exit $?\nexec {BASH_AS_RUNNER} {}\n", q(h)),
        ("job-completed", Some(h)) => {
            format!("{BASH_AS_RUNNER} {}\nrc=$?\n{exe} hook job-completed\nexit $rc\n", q(h))
        }
        (k, _) => format!("exec {exe} hook {k}\n"),
    };
    std::fs::write(
        path,
        format!("#!/bin/bash\n# Written by ci-runner for the hardware lock (RUNNER_RESOURCE_ID).\n{body}"),
    )?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o755))
}

impl Supervisor {
    /// `started` is when the process started (main takes it first thing), for the boot times.
    /// `github` is the API client for `cfg`'s credentials (`None` for a bare registration
    /// token); the container's runners share one, and with it a GitHub App's tokens.
    pub fn new(
        cfg: Config,
        github: Option<Github>,
        status: StatusHandle,
        signals: mpsc::UnboundedReceiver<SignalKind>,
        registration: RegistrationSlot,
        started: Instant,
    ) -> Result<Self, Error> {
        let name = runner_name(&cfg.name);
        status.update(|s| s.runner_name = Some(name.clone()));
        Ok(Self {
            cfg,
            github,
            status,
            signals,
            registration,
            name,
            cancel: CancellationToken::new(),
            lock: None,
            prewarm: None,
            started,
            runner_group_id: None,
            jit: None,
            version: None,
        })
    }

    /// Runs until the runner is drained, finished or failed; returns the process exit code.
    pub async fn run(mut self) -> ExitCode {
        let code = match self.run_inner().await {
            Ok(code) => code,
            Err(e) => {
                error!(error = %chain(&e), "Supervisor failed.");
                self.status.update(|s| s.last_error = Some(chain(&e)));
                if let Err(de) = self.deregister(final_budget()).await {
                    error!(error = %chain(&de), "Failed to de-register the runner.");
                }
                self.status.set_state(State::Failed);
                e.exit_code()
            }
        };
        if code == ExitCode::Ok || code == ExitCode::DrainTimeout {
            self.status.set_state(State::Stopped);
        }
        code
    }

    /// The hardware lock: its directory, the socket the job hooks talk to, the hook scripts
    /// in the runner's environment, and the lock actor.
    fn start_lock(&mut self) -> Result<(), Error> {
        use std::os::unix::fs::PermissionsExt;
        let Some(lock_cfg) = self.cfg.lock.clone() else { return Ok(()) };
        lock_cfg.prepare()?;
        if !lock::is_own_mount(&lock_cfg.dir) {
            warn!(dir = %lock_cfg.dir.display(), "RUNNER_LOCK_DIR is not a mount of its own: unless it is bind-mounted from the host into every container that shares the device, it locks nothing across containers.");
        }
        let dir = self.cfg.runner_dir.join("_ci-runner");
        let prep = |source| Error::Prepare { path: dir.clone(), source };
        std::fs::create_dir_all(&dir).map_err(prep)?;
        std::fs::set_permissions(&dir, std::fs::Permissions::from_mode(0o755)).map_err(prep)?;
        let socket = dir.join("lock.sock");
        let _ = std::fs::remove_file(&socket);
        let listener = tokio::net::UnixListener::bind(&socket).map_err(prep)?;
        if let Some(u) = &self.cfg.runner_user {
            nix::unistd::chown(
                &socket,
                Some(nix::unistd::Uid::from_raw(u.uid)),
                Some(nix::unistd::Gid::from_raw(u.gid)),
            )
            .map_err(|e| prep(e.into()))?;
        }
        std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(prep)?;
        let exe = std::env::current_exe().map_err(prep)?;
        let env = &mut self.cfg.runner_env;
        let user_hook = |env: &Vec<(String, String)>, k: &str| env.iter().find(|(n, _)| n == k).map(|(_, v)| v.clone());
        let started = user_hook(env, "ACTIONS_RUNNER_HOOK_JOB_STARTED");
        let completed = user_hook(env, "ACTIONS_RUNNER_HOOK_JOB_COMPLETED");
        write_hook(&dir.join("job-started.sh"), &exe, "job-started", started.as_deref()).map_err(prep)?;
        write_hook(&dir.join("job-completed.sh"), &exe, "job-completed", completed.as_deref()).map_err(prep)?;
        env.retain(|(k, _)| !k.starts_with("ACTIONS_RUNNER_HOOK_JOB_") && k != "CI_RUNNER_LOCK_SOCKET");
        env.push(("ACTIONS_RUNNER_HOOK_JOB_STARTED".into(), dir.join("job-started.sh").display().to_string()));
        env.push(("ACTIONS_RUNNER_HOOK_JOB_COMPLETED".into(), dir.join("job-completed.sh").display().to_string()));
        env.push(("CI_RUNNER_LOCK_SOCKET".into(), socket.display().to_string()));
        let (tx, rx) = mpsc::unbounded_channel();
        tokio::spawn(lock::run(lock_cfg.clone(), listener, self.status.clone(), rx, self.cancel.clone()));
        self.lock = Some(tx);
        info!(resource = %lock_cfg.resource, dir = %lock_cfg.dir.display(), "Hardware lock ready.");
        Ok(())
    }

    /// The job is over (or never will be): the lock goes to the next waiter.
    fn release_lock(&self) {
        if let Some(tx) = &self.lock {
            let _ = tx.send(lock::Request::Release);
        }
    }

    /// Starts loading the work dir from ci-storage in the background; registration goes on
    /// meanwhile, and run.sh waits for it (`await_prewarm`).
    pub fn start_prewarm(&mut self) {
        let Some(settings) = self.cfg.prewarm.clone() else { return };
        let gate = Arc::new(prewarm::Gate::default());
        let progress = Arc::new(prewarm::Progress::default());
        let (tx, rx) = tokio::sync::oneshot::channel();
        let started = Instant::now();
        let deadline = crate::config::limits::later_tokio(started, settings.timeout);
        let host = format!("{}:{}", settings.host.host, settings.host.port);
        let thread_gate = gate.clone();
        let thread_progress = progress.clone();
        let status = self.status.clone();
        let span = tracing::info_span!("prewarm");
        let spawned = std::thread::Builder::new().name("prewarm".into()).spawn(move || {
            let _span = span.enter();
            let result = prewarm::load(&settings, &thread_gate, &thread_progress);
            // Said and shown the moment it ends, not once the runner is registered.
            let seconds = started.elapsed().as_secs_f64();
            finish_prewarm(&status, &result, seconds, thread_progress.snapshot(), false);
            let _ = tx.send(result);
        });
        if let Err(e) = spawned {
            warn!(error = %e, "Failed to start the pre-warm; starting cold.");
            return;
        }
        info!(host = %host, "Pre-warming the work dir from ci-storage.");
        let running = crate::status::PrewarmStatus::running(progress.clone(), started.into_std());
        self.status.update(|s| s.prewarm = Some(running));
        self.prewarm = Some(PrewarmTask { result: rx, gate, progress, started, deadline });
    }

    /// Waits for the pre-warm before the runner may take a job: it ends warm, cold (no slot,
    /// a failure, the timeout: each logged with its reason), or interrupted by a signal.
    async fn await_prewarm(&mut self) -> Result<(), Interrupted> {
        let Some(mut task) = self.prewarm.take() else { return Ok(()) };
        // The load enforces its own deadline; this one only guards against a thread stuck
        // where it cannot look (name resolution, a dead peer mid-handshake).
        let give_up = crate::config::limits::later_tokio(task.deadline, Duration::from_secs(5));
        let outcome = tokio::select! {
            r = tokio::time::timeout_at(give_up, &mut task.result) => match r {
                Ok(Ok(r)) => Some(r),
                Ok(Err(_)) => Some(Err(prewarm::PrewarmError::Cancelled)),
                Err(_) => None,
            },
            sig = self.signals.recv() => {
                info!(signal = ?sig, "Signal received while pre-warming; stopping the pre-warm.");
                task.gate.cancel();
                return Err(Interrupted);
            }
        };
        let seconds = || task.started.elapsed().as_secs_f64();
        match outcome {
            // The load's thread said and showed how it ended.
            Some(Ok(_)) => {}
            // It died without a word.
            Some(Err(e)) => finish_prewarm(&self.status, &Err(e), seconds(), task.progress.snapshot(), false),
            None if task.gate.cancel() => {
                let e = prewarm::PrewarmError::Timeout(give_up - task.started);
                finish_prewarm(&self.status, &Err(e), seconds(), task.progress.snapshot(), true);
            }
            // It had just moved the tree into place: let it finish writing the meta.
            None => {
                let _ = task.result.await;
            }
        }
        Ok(())
    }

    async fn run_inner(&mut self) -> Result<ExitCode, Error> {
        // The boot (README "Boot sequence") started both already for the container's runners.
        if self.prewarm.is_none() {
            self.start_prewarm();
        }
        if self.version.is_none() {
            self.start_version_check();
        }
        self.start_lock()?;
        self.clean_stale_registration().await;
        runner::prepare_root(&self.cfg)
            .map_err(|source| Error::Prepare { path: self.cfg.runner_dir.clone(), source })?;
        let mut failures = 0u32;
        let mut config_failures = 0u32;
        'register: loop {
            match self.register().await {
                Ok(()) => {
                    config_failures = 0;
                    if self.await_prewarm().await.is_err() {
                        return self.stop_before_listening().await;
                    }
                }
                Err(Ok(Interrupted)) => return self.stop_before_listening().await,
                // config.sh gives up after three tries of its own; a fresh token and a pause
                // often cure what it hit (an expired token looks like a 404, GitHub hiccups).
                Err(Err(Error::Runner(runner::RunnerError::ConfigFailed { last_error, .. })))
                    if runner::version_refused(&last_error) =>
                {
                    error!(error = %last_error, "config.sh: GitHub refuses this runner version.");
                    return Err(Error::RunnerGaveUp(DEPRECATED.into()));
                }
                Err(Err(Error::Runner(e @ runner::RunnerError::ConfigFailed { .. })))
                    if config_failures < CONFIG_RETRIES =>
                {
                    config_failures += 1;
                    warn!(error = %chain(&e), attempt = config_failures, "config.sh failed; registering again with a fresh token.");
                    if let Err(de) = self.deregister(Budget::attempts(3)).await {
                        warn!(error = %chain(&de), "Failed to remove a partial registration.");
                    }
                    if self.pause(restart_delay(config_failures)).await.is_err() {
                        return self.stop_before_listening().await;
                    }
                    continue 'register;
                }
                Err(Err(e)) => return Err(e),
            }
            loop {
                let started = Instant::now();
                let outcome = self.supervise_once().await?;
                let info = match outcome {
                    Outcome::Drained(summary) => {
                        let cancelled = !summary.cancelled.is_empty();
                        for job in &summary.cancelled {
                            warn!(job = %job, "The drain cancelled this job.");
                            metrics::global().drain_cancelled_job();
                        }
                        self.status.update(|s| s.drain = Some(DrainOutcome::of(summary.waited_for_job, cancelled)));
                        return Ok(self.finish_drain(cancelled, summary.deregistered).await);
                    }
                    Outcome::Exited(info) => info,
                };
                if info.jobs_completed > 0 || started.elapsed() >= STABLE_RUN {
                    failures = 0;
                }
                let decision = decide(&info, Lifetime::of(&self.cfg), failures);
                info!(status = %info.status, listener_rc = ?info.listener_rc, decision = ?decision, "Runner exited.");
                match decision {
                    Decision::Done => {
                        self.deregister(final_budget()).await?;
                        return Ok(ExitCode::Ok);
                    }
                    Decision::Renew => {
                        // GitHub removes an ephemeral runner after its job; whatever lingers
                        // (a job that never completed on the server's side) goes now.
                        self.deregister(final_budget()).await?;
                        self.new_name();
                        info!(runner = %self.name, "Registering a fresh ephemeral runner.");
                        continue 'register;
                    }
                    Decision::Updated => {
                        failures += 1;
                        self.status.update(|s| s.restarts += 1);
                    }
                    Decision::Fatal(msg) => return Err(Error::RunnerGaveUp(msg)),
                    Decision::Restart(delay) => {
                        failures += 1;
                        self.status.update(|s| s.restarts += 1);
                        if self.pause(delay).await.is_err() {
                            return self.stop_before_listening().await;
                        }
                    }
                    Decision::Reregister(delay) => {
                        failures += 1;
                        self.status.update(|s| s.restarts += 1);
                        // The old registration may linger on the server: remove it first.
                        if let Err(e) = self.deregister(Budget::attempts(3)).await {
                            warn!(error = %chain(&e), "Failed to remove the old registration.");
                        }
                        if self.cfg.jit {
                            // A JIT name is only free once its registration is gone.
                            self.new_name();
                        }
                        if self.pause(delay).await.is_err() {
                            return self.stop_before_listening().await;
                        }
                        continue 'register;
                    }
                }
            }
        }
    }

    /// Sleeps, unless a signal comes first.
    async fn pause(&mut self, delay: Duration) -> Result<(), Interrupted> {
        self.status.set_state(State::Starting);
        info!(delay_ms = delay.as_millis() as u64, "Restarting the runner after a pause.");
        tokio::select! {
            () = tokio::time::sleep(delay) => Ok(()),
            Some(sig) = self.signals.recv() => {
                info!(signal = ?sig, "Signal received while the runner was down.");
                Err(Interrupted)
            }
        }
    }

    /// The id of `RUNNER_GROUP`, resolved by the boot.
    pub fn set_runner_group_id(&mut self, id: Option<u64>) {
        self.runner_group_id = id;
    }

    /// What the boot hooks exported: the runner's environment from now on.
    pub fn set_runner_env(&mut self, env: Vec<(String, String)>) {
        self.cfg.runner_env = env;
    }

    /// Stops a pre-warm the boot started (a signal ended the boot).
    pub fn cancel_prewarm(&mut self) {
        if let Some(task) = self.prewarm.take() {
            task.gate.cancel();
        }
    }

    /// A signal came before the Listener ran: remove whatever was registered, exit 0.
    async fn stop_before_listening(&mut self) -> Result<ExitCode, Error> {
        self.status.set_state(State::Draining);
        self.status.update(|s| s.drain = Some(DrainOutcome::Idle));
        if let Some(task) = self.prewarm.take() {
            task.gate.cancel();
        }
        self.deregister(final_budget()).await?;
        info!("Stopped before taking any job.");
        Ok(ExitCode::Ok)
    }

    /// A `.runner` left by an earlier start of this container: delete that registration on
    /// GitHub (when we can) and the local files, so nothing stale piles up.
    async fn clean_stale_registration(&mut self) {
        if !runner::is_configured(&self.cfg.runner_dir) {
            return;
        }
        let id = runner::read_agent_id(&self.cfg.runner_dir);
        info!(runner_id = ?id, "Removing a registration left by an earlier start.");
        if let (Some(gh), Some(id)) = (&self.github, id) {
            let budget = Budget::attempts(3);
            if let Err(e) = delete_registration(gh, &self.cfg.scope, id, budget, &self.cancel).await {
                warn!(runner_id = id, error = %chain(&e), "Failed to delete the stale registration; GitHub removes offline runners after 14 days.");
            }
        }
        runner::remove_local_files(&self.cfg.runner_dir);
    }

    /// Token, then `config.sh`. A signal during the token fetch aborts it at once; a signal
    /// during `config.sh` lets it finish (a half-written registration is worse), then stops.
    async fn register(&mut self) -> Result<(), Result<Interrupted, Error>> {
        let began = Instant::now();
        self.status.set_state(State::Registering);
        runner::remove_local_files(&self.cfg.runner_dir);
        self.jit = None;
        if let Credentials::Jit(encoded) = &self.cfg.credentials {
            // Minted by `ci-runner controller` (issue #9): the registration exists already.
            info!(runner = %self.name, "Running the JIT configuration given in RUNNER_JITCONFIG.");
            self.jit = Some(encoded.clone());
            return Ok(());
        }
        if self.cfg.jit {
            return self.register_jit(began).await;
        }
        let token = match (&self.cfg.credentials, &self.github) {
            (Credentials::RegistrationToken(t), _) => t.clone(),
            (_, Some(gh)) => {
                let fetch = gh.registration_token(&self.cfg.scope, Budget::attempts(8), &self.cancel);
                tokio::select! {
                    t = fetch => t.map_err(|e| Err(Error::Github(e)))?,
                    Some(sig) = self.signals.recv() => {
                        info!(signal = ?sig, "Signal received during registration.");
                        return Err(Ok(Interrupted));
                    }
                }
            }
            (_, None) => unreachable!("a PAT or an App always has a client"),
        };
        // The token registers nothing; config.sh does.
        self.check_version().await?;
        info!(runner = %self.name, url = %self.cfg.runner_url(), "Registering the runner.");
        let reg = Registration { name: &self.name, token: &token };
        let configure = runner::configure(&self.cfg, reg, CONFIG_TIMEOUT);
        tokio::pin!(configure);
        let mut interrupted = false;
        let result = loop {
            tokio::select! {
                r = &mut configure => break r,
                Some(sig) = self.signals.recv() => {
                    info!(signal = ?sig, "Signal received during config.sh; stopping once it returns.");
                    interrupted = true;
                }
            }
        };
        // Record the registration before judging the result: config.sh may have registered
        // and then failed, and the exit paths must remove it.
        let mut id = runner::read_agent_id(&self.cfg.runner_dir);
        if id.is_none() && runner::is_configured(&self.cfg.runner_dir) {
            if let Some(gh) = &self.github {
                id = gh
                    .find_runner(&self.cfg.scope, &self.name, Budget::attempts(3), &self.cancel)
                    .await
                    .ok()
                    .flatten()
                    .map(|r| r.id);
            }
        }
        if runner::is_configured(&self.cfg.runner_dir) || id.is_some() {
            *self.registration.lock().unwrap_or_else(|p| p.into_inner()) =
                Some(Registered { name: self.name.clone(), id });
            self.status.update(|s| s.runner_id = id);
        }
        result.map_err(|e| Err(Error::Runner(e)))?;
        if interrupted {
            return Err(Ok(Interrupted));
        }
        let seconds = began.elapsed().as_secs_f64();
        info!(runner = %self.name, runner_id = ?id, seconds = format!("{seconds:.2}"), "Runner registered.");
        self.status.update(|s| {
            s.boot.registration_seconds.get_or_insert(seconds);
        });
        Ok(())
    }

    /// A JIT registration: `generate-jitconfig` registers the runner and returns its
    /// configuration, which run.sh gets in its environment; no registration token, no config.sh,
    /// no `.credentials` beyond the runner's own run. A signal aborts the call at once.
    async fn register_jit(&mut self, began: Instant) -> Result<(), Result<Interrupted, Error>> {
        let gh = self.github.clone().expect("RUNNER_JIT is only on with an API token (config checks it)");
        let scope = self.cfg.scope.clone();
        // Resolved at start (`resolve_group`) when RUNNER_GROUP is set.
        let group_id = self.runner_group_id.unwrap_or(DEFAULT_RUNNER_GROUP_ID);
        // Minting registers the runner.
        self.check_version().await?;
        let name = self.name.clone();
        info!(runner = %name, url = %self.cfg.runner_url(), runner_group_id = group_id, "Registering the runner (JIT configuration).");
        // Recorded before the call: GitHub registers the runner as it mints the configuration,
        // and an answer lost to a signal or a timeout must not leave it behind (it is then
        // found by name).
        self.set_registered(Registered { name: name.clone(), id: None });
        let labels = runner::jit_labels(&self.cfg.labels, self.cfg.no_default_labels);
        let mint = gh.generate_jitconfig(
            &scope,
            &name,
            group_id,
            &labels,
            &self.cfg.work_dir,
            Budget::attempts(8),
            &self.cancel,
        );
        let jit = tokio::select! {
            r = mint => r.map_err(|e| Err(Error::Github(e)))?,
            Some(sig) = self.signals.recv() => {
                info!(signal = ?sig, "Signal received during registration.");
                return Err(Ok(Interrupted));
            }
        };
        let id = jit.runner.id;
        self.set_registered(Registered { name: name.clone(), id: Some(id) });
        self.jit = Some(jit.encoded);
        let seconds = began.elapsed().as_secs_f64();
        info!(runner = %name, runner_id = id, seconds = format!("{seconds:.2}"), "Runner registered.");
        self.status.update(|s| {
            s.boot.registration_seconds.get_or_insert(seconds);
        });
        Ok(())
    }

    fn set_registered(&self, reg: Registered) {
        let id = reg.id;
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = Some(reg);
        self.status.update(|s| s.runner_id = id);
    }

    /// A fresh name for the next registration (the same one when `RUNNER_NAME` fixes it).
    fn new_name(&mut self) {
        self.name = runner_name(&self.cfg.name);
        let name = self.name.clone();
        self.status.update(|s| s.runner_name = Some(name));
    }

    /// With updates disabled (`RUNNER_DISABLE_UPDATE`), the version is learnt while the boot
    /// and the registration's first calls go on (the real Listener takes a fraction of a
    /// second to start); `check_version` judges it just before anything is registered.
    pub fn start_version_check(&mut self) {
        if !self.cfg.disable_update {
            return;
        }
        let cfg = self.cfg.clone();
        self.version = Some(tokio::spawn(async move { runner::installed_version(&cfg, VERSION_TIMEOUT).await }));
    }

    /// A runner that may not update itself and is older than GitHub's minimum would register
    /// (or fail to) and never get a job: refuse it, saying what to do. Once per process; a
    /// signal meanwhile stops the boot.
    async fn check_version(&mut self) -> Result<(), Result<Interrupted, Error>> {
        let Some(task) = self.version.take() else { return Ok(()) };
        let min = self.cfg.min_version;
        let found = tokio::select! {
            r = task => r.ok().flatten(),
            Some(sig) = self.signals.recv() => {
                info!(signal = ?sig, "Signal received during registration.");
                return Err(Ok(Interrupted));
            }
        };
        match found {
            Some(found) if found < min => Err(Err(Error::Runner(runner::RunnerError::TooOld { found, min }))),
            Some(found) => {
                info!(version = %found, min = %min, "Runner version checked.");
                Ok(())
            }
            None => {
                warn!(min = %min, "Failed to learn the runner's version (bin/Runner.Listener --version); going on, GitHub's answer decides.");
                Ok(())
            }
        }
    }

    /// Removes the registration from GitHub and the local files; retries a busy answer (the
    /// API's busy flag lags the runner by up to a minute) until the budget runs out.
    async fn deregister(&mut self, budget: Budget) -> Result<(), Error> {
        let Some(reg) = self.registration.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
            return Ok(());
        };
        let Some(gh) = &self.github else {
            warn!(runner = %reg.name, "No GH_TOKEN: cannot de-register; GitHub removes offline runners after 14 days (1 day if ephemeral).");
            runner::remove_local_files(&self.cfg.runner_dir);
            *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = None;
            return Ok(());
        };
        remove_registration(gh, &self.cfg.scope, &reg, budget, &self.cancel).await?;
        self.forget_registration();
        Ok(())
    }

    /// After GitHub removed the registration: nothing of it is left here either.
    fn forget_registration(&self) {
        runner::remove_local_files(&self.cfg.runner_dir);
        *self.registration.lock().unwrap_or_else(|p| p.into_inner()) = None;
        self.status.update(|s| s.runner_id = None);
    }

    /// After the drain's run.sh has exited: make sure the registration is gone, then stop.
    /// Exit 7 when the drain cancelled a job, 0 when none.
    async fn finish_drain(&mut self, cancelled: bool, deregistered: bool) -> ExitCode {
        let mut code = if cancelled { ExitCode::DrainTimeout } else { ExitCode::Ok };
        if !deregistered || self.registration.lock().unwrap_or_else(|p| p.into_inner()).is_some() {
            if let Err(e) = self.deregister(final_budget()).await {
                error!(error = %chain(&e), "Failed to de-register the runner during the drain.");
                code = e.exit_code();
            }
        }
        runner::remove_local_files(&self.cfg.runner_dir);
        let delay = self.cfg.shutdown_delay.as_secs();
        if delay > 0 {
            // DEBUG_SHUTDOWN_DELAY_SEC, as in the original image: the last number logged is how
            // long the orchestrator really waited before SIGKILL.
            info!(seconds = delay, "Delaying the exit (DEBUG_SHUTDOWN_DELAY_SEC).");
            for k in 1..=delay {
                tokio::time::sleep(Duration::from_secs(1)).await;
                info!("  ...{k} seconds elapsed");
            }
        }
        info!(exit_code = code.code(), "Drain complete.");
        code
    }

    /// A call about our registration that the drain's loop awaits: `None` without an API
    /// client or a known runner id.
    fn start_call<T, F, Fut>(&self, call: F) -> Option<Call<T>>
    where
        F: FnOnce(Github, Scope, u64, CancellationToken) -> Fut,
        Fut: std::future::Future<Output = Result<T, GithubError>> + Send + 'static,
    {
        let gh = self.github.clone()?;
        let id = self.registered_id()?;
        Some(Box::pin(call(gh, self.cfg.scope.clone(), id, self.cancel.clone())))
    }

    fn start_delete(&self) -> Option<Call<Deleted>> {
        let budget = Budget::attempts(2).per_request(DEREGISTER_REQUEST_TIMEOUT);
        self.start_call(move |gh, scope, id, cancel| async move {
            delete_registration(&gh, &scope, id, budget, &cancel).await
        })
    }

    /// The drain's first step: the runner's custom labels off, so that GitHub assigns it no
    /// queued job that asks for them. Retried like every call, briefly: the drain waits for it
    /// before the DELETE.
    fn start_strip_labels(&self) -> Option<Call<Vec<String>>> {
        let budget = Budget::until(Instant::now() + LABELS_BUDGET).per_request(LABELS_REQUEST_TIMEOUT);
        self.start_call(move |gh, scope, id, cancel| async move {
            gh.remove_custom_labels(&scope, id, budget, &cancel).await
        })
    }

    /// The runner's `Listening for Jobs`: the first one ends the boot.
    fn listening(&self) {
        let seconds = self.started.elapsed().as_secs_f64();
        self.status.update(|s| {
            s.boot.listening_seconds.get_or_insert(seconds);
        });
    }

    /// A job's `completed with result` line; `started` when its `Running job` line was seen.
    fn job_completed(&self, result: &str, started: Option<Instant>) {
        metrics::global().job_completed(JobResult::from_runner(result), started.map(|t| t.elapsed()));
        self.status.update(|s| s.jobs_completed += 1);
    }

    /// One run of `run.sh`, until it exits. The drain's decisions are [`drain::Drain`]'s; this
    /// loop feeds it the runner's lines, the signals, the API's answers and the time, and
    /// carries out what it asks.
    async fn supervise_once(&mut self) -> Result<Outcome, Error> {
        runner::clear_drain_sentinel(&self.cfg.runner_dir);
        let (mut proc, mut lines) = RunnerProcess::spawn(&self.cfg, self.jit.as_ref())?;
        info!(pid = proc.pid(), "Runner started.");
        let pid = proc.pid();
        self.status.update(|s| s.pid = Some(pid));
        self.status.set_state(State::Starting);
        let mut info = ExitInfo::default();
        let mut busy: Option<String> = None;
        // When the running job's "Running job" line came, for its duration.
        let mut job_started: Option<Instant> = None;
        let mut drain: Option<Drain> = None;
        let mut calls = DrainCalls::default();
        let far = Instant::now() + Duration::from_secs(100 * 365 * 86400);

        let status = loop {
            let wake_at = drain.as_ref().and_then(Drain::wake_at);
            let event = tokio::select! {
                biased;
                Some((_, line)) = lines.recv() => {
                    info!(target: "runner", "{line}");
                    let Some(event) = parse_line(&line) else { continue };
                    // Learn the Listener's pid while nothing is urgent, so the SIGINT at a job's
                    // end goes out without a /proc scan.
                    let learn_pid = matches!(event, LineEvent::Listening | LineEvent::JobStarted(_));
                    let mut fed = None;
                    match event {
                        LineEvent::Listening => {
                            if drain.is_none() && busy.is_none() {
                                self.status.set_state(State::Idle);
                            }
                            self.listening();
                            // Start-up garbage (certificate parsing, registration) goes back to
                            // the system before the long idle.
                            // SAFETY: malloc_trim has no preconditions.
                            unsafe {
                                libc::malloc_trim(0);
                            }
                        }
                        LineEvent::JobStarted(name) => {
                            info!(job = %name, "Job started.");
                            if drain.is_some() {
                                warn!(job = %name, "A job started during the drain; waiting for it.");
                            }
                            self.status.update(|s| { s.busy = true; s.job = Some(name.clone()); });
                            if drain.is_none() {
                                self.status.set_state(State::Busy);
                            }
                            metrics::global().job_started();
                            job_started = Some(Instant::now());
                            busy = Some(name.clone());
                            fed = Some(drain::Event::JobStarted(name));
                        }
                        LineEvent::JobCompleted { name, result } => {
                            info.jobs_completed += 1;
                            busy = None;
                            info!(job = %name, result = %result, "Job finished.");
                            self.release_lock();
                            self.status.update(|s| { s.busy = false; s.job = None; });
                            self.job_completed(&result, job_started.take());
                            if drain.is_none() && !self.cfg.ephemeral {
                                self.status.set_state(State::Idle);
                            }
                            fed = Some(drain::Event::JobCompleted);
                        }
                        LineEvent::RegistrationGone => info.registration_gone = true,
                        LineEvent::SessionConflict => {
                            if !info.session_conflict && drain.is_none() && busy.is_none() {
                                // Do not sit through 240 s of retries: stop and re-register.
                                info!("The server holds a stale session for this runner: re-registering.");
                                proc.stop_listener();
                            }
                            info.session_conflict = true;
                        }
                        LineEvent::Deprecated => info.deprecated = true,
                        LineEvent::ListenerExit(rc) => info.listener_rc = Some(rc),
                    }
                    if learn_pid {
                        proc.remember_listener();
                    }
                    match fed {
                        Some(e) if drain.is_some() => e,
                        _ => continue,
                    }
                }
                Some(sig) = self.signals.recv() => {
                    let Some(d) = drain.as_ref() else {
                        let now = Instant::now();
                        let deadline = now.checked_add(self.cfg.drain_timeout);
                        let deadline = match (deadline, sig) {
                            (Some(d), SignalKind::Spot { by }) => Some(d.min(by)),
                            (None, SignalKind::Spot { by }) => Some(by),
                            (d, _) => d,
                        };
                        info!(signal = ?sig, drain_timeout_s = self.cfg.drain_timeout.as_secs(), "Signal received: draining (no new job will start).");
                        self.status.set_state(State::Draining);
                        // The Worker process is the second witness: its "Running job" line may
                        // still be in the pipe.
                        if busy.is_none() && proc.worker_running() {
                            busy = Some("(starting)".into());
                        }
                        match &busy {
                            Some(job) => info!(job = %job, "Waiting for the running job to finish."),
                            None => info!("No job running: removing the runner."),
                        }
                        let api = drain::Api { available: self.github.is_some() && self.registered_id().is_some() };
                        let (d, actions) = Drain::start(now, deadline, busy.clone(), api, self.cfg.stop_grace);
                        drain = Some(d);
                        self.carry_out(actions, &proc, &mut calls);
                        continue;
                    };
                    match sig {
                        SignalKind::Spot { by } => {
                            if d.wake_at().is_none_or(|w| by < w) {
                                info!(in_s = by.saturating_duration_since(Instant::now()).as_secs(), "Spot interruption: the drain's deadline comes forward.");
                            }
                            drain::Event::Spot { by }
                        }
                        _ => {
                            warn!(signal = ?sig, job = ?busy, "Another signal during the drain.");
                            drain::Event::Signal
                        }
                    }
                }
                result = async { calls.labels.as_mut().expect("guarded").await }, if calls.labels.is_some() => {
                    calls.labels = None;
                    match result {
                        Ok(left) => info!(labels_left = %left.join(","), "Runner's custom labels removed: GitHub assigns it no job that asks for them."),
                        Err(e @ GithubError::Forbidden { .. }) => warn!(error = %chain(&e), "Failed to remove the runner's labels: the token lacks the permission to change a runner's labels (the same as to remove a runner: Administration: write on a repository, Self-hosted runners: write on an organization, manage_runners:enterprise). Draining without it: a queued job may still be assigned to this runner until it is removed."),
                        Err(e) => warn!(error = %chain(&e), "Failed to remove the runner's labels; draining without it: a queued job may still be assigned to this runner until it is removed."),
                    }
                    drain::Event::LabelsDone
                }
                result = async { calls.delete.as_mut().expect("guarded").await }, if calls.delete.is_some() => {
                    calls.delete = None;
                    match result {
                        Ok(_) => {
                            self.forget_registration();
                            info!("Runner de-registered.");
                            let worker = busy.is_none() && proc.worker_running();
                            if worker {
                                warn!("A job started while the runner was being removed; waiting for it.");
                            }
                            drain::DeleteAnswer::Gone { worker }.into()
                        }
                        Err(GithubError::Busy { .. }) => {
                            if busy.is_none() {
                                info!("GitHub reports the runner busy: a job is on its way to it; waiting for it.");
                            }
                            drain::DeleteAnswer::Busy.into()
                        }
                        Err(e) => {
                            warn!(error = %chain(&e), "Failed to de-register; retrying.");
                            drain::DeleteAnswer::Failed.into()
                        }
                    }
                }
                () = sleep_until(wake_at.unwrap_or(far)), if wake_at.is_some() => drain::Event::Tick,
                status = proc.wait() => break status,
            };
            let d = drain.as_mut().expect("events are fed only while draining");
            let actions = d.on_event(event, Instant::now());
            self.carry_out(actions, &proc, &mut calls);
        };
        // GitHub's 204 ends the Listener ("no longer exists on the server"), so the runner can
        // exit before the loop has taken the DELETE's answer: take it now (the call is bounded
        // by its request timeout), so the registration is not DELETEd a second time. A failure
        // is left to the final de-registration, which retries.
        if let Some(call) = calls.delete.take() {
            if call.await.is_ok() {
                self.forget_registration();
                info!("Runner de-registered.");
            }
        }
        self.release_lock();
        let status = status.map_err(|source| Error::Runner(runner::RunnerError::Wait { what: "run.sh", source }))?;
        // The last lines (run-helper's verdict) may still be in the pipes: read until EOF, or
        // until 100 ms pass without a line (orphans of the job may hold the pipes open).
        while let Ok(Some((_, line))) = tokio::time::timeout(Duration::from_millis(100), lines.recv()).await {
            info!(target: "runner", "{line}");
            match parse_line(&line) {
                Some(LineEvent::RegistrationGone) => info.registration_gone = true,
                Some(LineEvent::SessionConflict) => info.session_conflict = true,
                Some(LineEvent::Deprecated) => info.deprecated = true,
                Some(LineEvent::ListenerExit(rc)) => info.listener_rc = Some(rc),
                Some(LineEvent::JobStarted(_)) => {
                    metrics::global().job_started();
                    job_started = Some(Instant::now());
                }
                Some(LineEvent::JobCompleted { result, .. }) => {
                    info.jobs_completed += 1;
                    self.job_completed(&result, job_started.take());
                }
                _ => {}
            }
        }
        info.status = describe(status);
        info.still_configured = runner::is_configured(&self.cfg.runner_dir);
        self.status.update(|s| {
            s.busy = false;
            s.job = None;
            s.pid = None;
        });
        Ok(match drain {
            Some(d) => {
                let mut summary = d.summary();
                summary.waited_for_job |= busy.is_some();
                Outcome::Drained(summary)
            }
            None => Outcome::Exited(info),
        })
    }

    fn registered_id(&self) -> Option<u64> {
        self.registration.lock().unwrap_or_else(|p| p.into_inner()).as_ref()?.id
    }

    /// Does what the drain asks, at once: calls to GitHub start here and are awaited by the loop.
    fn carry_out(&self, actions: Vec<drain::Action>, proc: &RunnerProcess, calls: &mut DrainCalls) {
        for action in actions {
            match action {
                drain::Action::RequestRunnerDrain => runner::request_drain(&self.cfg.runner_dir),
                drain::Action::StripLabels => calls.labels = self.start_strip_labels(),
                drain::Action::Delete => {
                    calls.delete = self.start_delete();
                    if calls.delete.is_none() {
                        // The registration went meanwhile (the panic path, or never had an id).
                        calls.delete = Some(Box::pin(async { Ok(Deleted::AlreadyGone) }));
                    }
                }
                drain::Action::StopListener { cancels } => {
                    let n = proc.stop_listener();
                    match cancels {
                        Some(job) => {
                            warn!(job = %job, listeners = n, "Stopping the runner now: the running job is cancelled.");
                        }
                        None => info!(listeners = n, "Runner removed from GitHub: stopping the runner."),
                    }
                }
                drain::Action::Kill => {
                    warn!("Killing the runner.");
                    proc.kill();
                }
            }
        }
    }
}

/// The drain's calls to GitHub in flight.
#[derive(Default)]
struct DrainCalls {
    labels: Option<Call<Vec<String>>>,
    delete: Option<Call<Deleted>>,
}

impl From<drain::DeleteAnswer> for drain::Event {
    fn from(answer: drain::DeleteAnswer) -> Self {
        drain::Event::Deleted(answer)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn generated_names_are_unique_and_valid() {
        let p = RunnerName::Prefix("ci-storage".into());
        let a = runner_name(&p);
        let b = runner_name(&p);
        assert_ne!(a, b);
        assert!(a.starts_with("ci-storage-") && crate::config::valid_runner_name(&a), "{a}");
        assert_eq!(runner_name(&RunnerName::Exact("x".into())), "x");
    }
}
