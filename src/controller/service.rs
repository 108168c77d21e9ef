//! The long-running service: one task per pool owning its [`Pool`] state machine (an actor
//! fed by an mpsc channel), the reconcile tick, and the actions carried out on the Docker
//! engine and GitHub.

use std::sync::{Arc, Mutex};
use std::time::Duration;

use tokio::sync::{mpsc, oneshot};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tracing::{info, warn, Instrument};

use super::engine::{Engine, RunnerSpec};
use super::pool::{stop_grace, Action, Admission, Event, Pool, Stats};
use super::reconcile;
use super::webhook::RunnerLabels;
use super::ControllerError;
use crate::config::{ControllerConfig, PoolConfig, Scope, Secret};
use crate::error::chain;
use crate::github::{Auth, Budget, Deleted, Github};

/// What the HTTP side sends a pool's task.
pub enum Command {
    Queued {
        job_id: u64,
        received: Instant,
        reply: oneshot::Sender<Admission>,
    },
    Event(Event),
    ListFailed,
    /// Queued jobs the pool serves, listed through the REST API: admitted as deliveries are.
    Reconciled {
        jobs: Vec<u64>,
    },
}

/// A pool as the HTTP side sees it: its secret, labels and scope, its task's mailbox, its stats.
#[derive(Clone)]
pub struct PoolHandle {
    pub id: String,
    pub scope: Scope,
    /// What its runners register with, and the jobs they can take.
    pub labels: RunnerLabels,
    pub secret: Secret,
    pub tx: mpsc::UnboundedSender<Command>,
    pub stats: Arc<Mutex<Stats>>,
    pub latency: Arc<Mutex<Latency>>,
    pub reconcile: Arc<reconcile::Counters>,
}

/// Webhook received → runner container started (the Docker engine's start returned).
#[derive(Debug, Default, Clone)]
pub struct Latency {
    pub sum: f64,
    pub count: u64,
    pub max: f64,
}

/// Starts every pool's task; returns their handles for the HTTP side.
pub async fn start_pools(
    cfg: &ControllerConfig,
    engine: &Engine,
    arch: &str,
    tracker: &TaskTracker,
    cancel: &CancellationToken,
) -> Result<Vec<PoolHandle>, ControllerError> {
    let nonce = nonce();
    let mut handles = Vec::new();
    for p in cfg.all_pools() {
        let auth = Auth::new(&p.credentials, &p.scope).expect("the config accepts only a PAT or an App");
        let github = Github::new(&cfg.api_url, auth).map_err(|source| ControllerError::Http { source })?;
        let secret = match &p.webhook_secret {
            Some(s) => s.clone(),
            None => super::hook::state_secret(&cfg.state_dir, &p.id)?,
        };
        let hook_id = match &p.webhook_url {
            Some(url) => Some(super::hook::ensure(&github, &p.scope, url, &secret, cancel).await?),
            None => p.hook_id,
        };
        let (tx, rx) = mpsc::unbounded_channel();
        let stats = Arc::new(Mutex::new(Stats::default()));
        let latency = Arc::new(Mutex::new(Latency::default()));
        let queue_file = cfg.state_dir.join(format!("{}.queue.json", p.id));
        let draining_file = cfg.state_dir.join(format!("{}.draining.json", p.id));
        let stopped_before: Vec<String> =
            std::fs::read(&draining_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        let labels = RunnerLabels::new(&p.labels, arch);
        let counters = Arc::new(reconcile::Counters::default());
        let task = PoolTask {
            queue_file,
            saved: Vec::new(),
            draining_saved: stopped_before.clone(),
            draining_file,
            cfg: p.clone(),
            labels: labels.clone(),
            server_url: cfg.server_url.clone(),
            api_url: cfg.api_url.clone(),
            pool: Pool::new(p.max_runners, p.min_idle, p.max_lifetime, format!("{}-{nonce}", p.name_prefix))
                .with_stop_grace(stop_grace(&p.env))
                .with_stopped_before(stopped_before),
            engine: engine.clone(),
            github,
            tx: tx.clone(),
            stats: stats.clone(),
            latency: latency.clone(),
            received: std::collections::HashMap::new(),
            counters: counters.clone(),
            tracker: tracker.clone(),
            cancel: cancel.clone(),
            poll: cfg.poll,
        };
        match (cfg.reconcile, reconcile::source(&p.scope, hook_id)) {
            (Some(period), Some(source)) => {
                if let reconcile::Source::Deliveries { hook_id } = source {
                    info!(pool = %p.id, scope = %p.scope, hook_id, "Reconciling through the webhook's failed deliveries.");
                }
                let run = reconcile::run(
                    task.github.clone(),
                    p.scope.clone(),
                    source,
                    labels.clone(),
                    period,
                    tx.clone(),
                    counters.clone(),
                    cancel.clone(),
                );
                tracker.spawn(run.instrument(tracing::info_span!("reconcile", id = %p.id)));
            }
            (Some(_), None) => {
                warn!(pool = %p.id, scope = %p.scope, "No reconciliation for this organization's pool: set CONTROLLER_HOOK_ID (or the pool's hook_id), or WEBHOOK_URL, so that its webhook's failed deliveries are redelivered; a missed delivery now leaves its job without a runner.")
            }
            (None, _) => {}
        }
        tracker.spawn(task.run(rx).instrument(tracing::info_span!("pool", id = %p.id)));
        tracker.spawn(
            pull_if_missing(engine.clone(), p.image.clone()).instrument(tracing::info_span!("pool", id = %p.id)),
        );
        handles.push(PoolHandle {
            id: p.id.clone(),
            scope: p.scope.clone(),
            labels,
            secret,
            tx,
            stats,
            latency,
            reconcile: counters,
        });
    }
    Ok(handles)
}

/// The pool's image, pulled now if the host lacks it, so that the first job does not wait for
/// the pull. A failure is only logged: each start tries again.
async fn pull_if_missing(engine: Engine, image: String) {
    let started = Instant::now();
    match engine.ensure_image(&image).await {
        Ok(true) => info!(%image, elapsed_ms = started.elapsed().as_millis() as u64, "Image pulled."),
        Ok(false) => {}
        Err(e) => warn!(%image, error = %chain(&e), "Failed to pull the runner image; each runner start tries again."),
    }
}

/// Six random hex digits: runner names stay unique across controller restarts.
fn nonce() -> String {
    let mut b = [0u8; 3];
    let _ = getrandom::getrandom(&mut b);
    b.iter().map(|x| format!("{x:02x}")).collect()
}

struct PoolTask {
    /// `<state dir>/<pool>.queue.json`: the waiting jobs' ids, so that a restart drops none.
    queue_file: std::path::PathBuf,
    saved: Vec<u64>,
    /// `<state dir>/<pool>.draining.json`: the containers sent their SIGTERM, so that a
    /// restarted controller never sends a second one (it would escalate the drain).
    draining_file: std::path::PathBuf,
    draining_saved: Vec<String>,
    cfg: PoolConfig,
    labels: RunnerLabels,
    server_url: String,
    api_url: String,
    pool: Pool,
    engine: Engine,
    github: Github,
    tx: mpsc::UnboundedSender<Command>,
    stats: Arc<Mutex<Stats>>,
    latency: Arc<Mutex<Latency>>,
    /// When the delivery that asked for a runner arrived, by runner name, for the latency.
    received: std::collections::HashMap<String, Instant>,
    counters: Arc<reconcile::Counters>,
    tracker: TaskTracker,
    cancel: CancellationToken,
    poll: Duration,
}

impl PoolTask {
    async fn run(mut self, mut rx: mpsc::UnboundedReceiver<Command>) {
        info!(scope = %self.cfg.scope, max_runners = self.cfg.max_runners, image = %self.cfg.image, "Pool started.");
        let mut tick = tokio::time::interval(self.poll);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        // The runners of an earlier run first (they count against the maximum), then the jobs
        // that were waiting when it stopped (GitHub does not deliver them twice).
        let asked = Instant::now();
        match self.engine.list(&self.cfg.id).await {
            Ok(list) => {
                let actions = self.pool.on_event(Event::Observed { list, asked }, Instant::now());
                self.execute(actions, None);
            }
            Err(e) => warn!(error = %chain(&e), "Failed to list the runner containers; trying again at the next tick."),
        }
        let restored: Vec<u64> =
            std::fs::read(&self.queue_file).ok().and_then(|b| serde_json::from_slice(&b).ok()).unwrap_or_default();
        if !restored.is_empty() {
            info!(jobs = restored.len(), "Restoring the jobs that were waiting.");
            let now = Instant::now();
            for job_id in restored {
                let (_, actions) = self.pool.admit(job_id, now);
                self.execute(actions, None);
            }
            self.publish();
        }
        let mut listing = false;
        loop {
            let event = tokio::select! {
                () = self.cancel.cancelled() => break,
                Some(cmd) = rx.recv() => match cmd {
                    Command::Queued { job_id, received, reply } => {
                        let (admission, actions) = self.pool.admit(job_id, Instant::now());
                        let _ = reply.send(admission);
                        if admission == Admission::Duplicate {
                            info!(job_id, "Job delivered again; nothing to do.");
                        } else {
                            info!(job_id, "Job queued.");
                        }
                        self.execute(actions, Some(received));
                        self.publish();
                        continue;
                    }
                    Command::Event(e @ Event::Observed { .. }) => {
                        listing = false;
                        e
                    }
                    Command::Event(e) => e,
                    Command::ListFailed => {
                        listing = false;
                        continue;
                    }
                    Command::Reconciled { jobs } => {
                        for job_id in jobs {
                            let (admission, actions) = self.pool.admit(job_id, Instant::now());
                            if admission == Admission::Queued {
                                self.counters.found.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                info!(job_id, "Job found queued by reconciliation; no delivery had brought it.");
                            }
                            self.execute(actions, None);
                        }
                        self.publish();
                        continue;
                    }
                },
                _ = tick.tick() => {
                    if !listing {
                        listing = true;
                        self.list();
                    }
                    Event::Tick
                }
            };
            let actions = self.pool.on_event(event, Instant::now());
            self.execute(actions, None);
            self.publish();
        }
        info!("Pool stopped; its runner containers are left to finish and are adopted at the next start.");
    }

    fn publish(&mut self) {
        *self.stats.lock().unwrap_or_else(|p| p.into_inner()) = self.pool.stats().clone();
        let waiting = self.pool.waiting();
        if waiting != self.saved {
            if let Err(e) = save_queue(&self.queue_file, &waiting) {
                warn!(path = %self.queue_file.display(), error = %e, "Failed to save the waiting jobs; a restart now would forget them.");
            }
            self.saved = waiting;
        }
        let draining = self.pool.draining();
        if draining != self.draining_saved {
            if let Err(e) = save_json(&self.draining_file, &draining) {
                warn!(path = %self.draining_file.display(), error = %e, "Failed to save the draining containers; a restart now would stop them again.");
            }
            self.draining_saved = draining;
        }
    }

    fn list(&self) {
        let engine = self.engine.clone();
        let tx = self.tx.clone();
        let pool = self.cfg.id.clone();
        let asked = Instant::now();
        self.tracker.spawn(async move {
            match engine.list(&pool).await {
                Ok(list) => {
                    let _ = tx.send(Command::Event(Event::Observed { list, asked }));
                }
                Err(e) => {
                    warn!(error = %chain(&e), "Failed to list the runner containers; trying again at the next tick.");
                    // Lets the next tick list again (an empty listing would read as every
                    // container gone).
                    let _ = tx.send(Command::ListFailed);
                }
            }
        });
    }

    fn execute(&mut self, actions: Vec<Action>, received: Option<Instant>) {
        for action in actions {
            match action {
                Action::Start { name, for_job } => {
                    if let Some(r) = received {
                        self.received.insert(name.clone(), r);
                    }
                    let started_for = self.received.get(&name).copied();
                    let job = StartJob {
                        name,
                        for_job,
                        cfg: self.cfg.clone(),
                        labels: self.labels.clone(),
                        server_url: self.server_url.clone(),
                        api_url: self.api_url.clone(),
                        engine: self.engine.clone(),
                        github: self.github.clone(),
                        tx: self.tx.clone(),
                        latency: self.latency.clone(),
                        received: started_for,
                        cancel: self.cancel.clone(),
                    };
                    self.tracker.spawn(job.run());
                }
                Action::Stop { name } => {
                    let engine = self.engine.clone();
                    let tx = self.tx.clone();
                    self.tracker.spawn(async move {
                        match engine.stop(&name).await {
                            Ok(()) => info!(container = %name, "Runner container stopping: its runner finishes a running job, de-registers and exits."),
                            Err(e) => {
                                warn!(container = %name, error = %chain(&e), "Failed to stop the runner container; trying again at the next listing.");
                                let _ = tx.send(Command::Event(Event::StopFailed { name }));
                            }
                        }
                    });
                }
                Action::Remove { name, deregister } => {
                    self.received.remove(&name);
                    let engine = self.engine.clone();
                    let github = self.github.clone();
                    let scope = self.cfg.scope.clone();
                    let tx = self.tx.clone();
                    let cancel = self.cancel.clone();
                    self.tracker.spawn(async move {
                        match engine.remove(&name).await {
                            Ok(()) => info!(container = %name, "Runner container removed."),
                            Err(e) => {
                                warn!(container = %name, error = %chain(&e), "Failed to remove the runner container; trying again at the next tick.");
                                // Asked again at the next listing that shows it.
                                let _ = tx.send(Command::Event(Event::RemoveFailed { name: name.clone() }));
                                return;
                            }
                        }
                        if let Some(id) = deregister {
                            match github.delete_runner(&scope, id, Budget::attempts(3), &cancel).await {
                                Ok(Deleted::Removed) => info!(runner = %name, runner_id = id, "Runner de-registered; its container died before finishing a job."),
                                Ok(Deleted::AlreadyGone) => {}
                                Err(e) => warn!(runner = %name, runner_id = id, error = %chain(&e), "Failed to de-register the runner."),
                            }
                        }
                        let _ = tx.send(Command::Event(Event::Removed { name }));
                    });
                }
            }
        }
    }
}

/// One runner's start: mint its JIT configuration, then the container.
struct StartJob {
    name: String,
    for_job: Option<u64>,
    cfg: PoolConfig,
    labels: RunnerLabels,
    server_url: String,
    api_url: String,
    engine: Engine,
    github: Github,
    tx: mpsc::UnboundedSender<Command>,
    latency: Arc<Mutex<Latency>>,
    received: Option<Instant>,
    cancel: CancellationToken,
}

impl StartJob {
    async fn run(self) {
        // The labels jobs are matched against (`RunnerLabels::serves`), architecture included.
        let labels = self.labels.registered();
        let jit = match self
            .github
            .generate_jitconfig(
                &self.cfg.scope,
                &self.name,
                self.cfg.runner_group_id,
                labels,
                "_work",
                Budget::attempts(3),
                &self.cancel,
            )
            .await
        {
            Ok(j) => j,
            Err(e) => {
                warn!(runner = %self.name, error = %chain(&e), "Failed to mint the runner's JIT configuration; the job waits.");
                let _ = self.tx.send(Command::Event(Event::StartFailed { name: self.name }));
                return;
            }
        };
        let runner_id = jit.runner.id;
        let mut env = vec![
            scope_var(&self.cfg.scope),
            format!("GH_LABELS={}", labels.join(",")),
            format!("RUNNER_NAME={}", self.name),
            "RUNNER_EPHEMERAL=true".to_string(),
            format!("GH_SERVER_URL={}", self.server_url),
            format!("GH_API_URL={}", self.api_url),
        ];
        env.extend(self.cfg.env.iter().map(|(k, v)| format!("{k}={v}")));
        let spec = RunnerSpec {
            name: &self.name,
            pool: &self.cfg.id,
            image: &self.cfg.image,
            env,
            network: self.cfg.network.as_deref(),
            binds: &self.cfg.binds,
            for_job: self.for_job,
            runner_id,
            jit: &jit.encoded,
        };
        match self.engine.start(&spec).await {
            Ok(id) => {
                if let Some(r) = self.received {
                    let s = r.elapsed().as_secs_f64();
                    let mut l = self.latency.lock().unwrap_or_else(|p| p.into_inner());
                    l.sum += s;
                    l.count += 1;
                    l.max = l.max.max(s);
                }
                info!(runner = %self.name, runner_id, container = %&id[..12.min(id.len())], job_id = ?self.for_job, "Runner container started.");
                let _ = self.tx.send(Command::Event(Event::Started { name: self.name, runner_id }));
            }
            Err(e) => {
                warn!(runner = %self.name, error = %chain(&e), "Failed to start the runner container; the job waits.");
                if let Err(e) =
                    self.github.delete_runner(&self.cfg.scope, runner_id, Budget::attempts(3), &self.cancel).await
                {
                    warn!(runner = %self.name, runner_id, error = %chain(&e), "Failed to de-register the runner that did not start.");
                }
                let _ = self.tx.send(Command::Event(Event::StartFailed { name: self.name }));
            }
        }
    }
}

/// Written whole to a temporary file, then renamed over the old one.
fn save_queue(path: &std::path::Path, waiting: &[u64]) -> std::io::Result<()> {
    save_json(path, waiting)
}

fn save_json<T: serde::Serialize + ?Sized>(path: &std::path::Path, value: &T) -> std::io::Result<()> {
    if let Some(dir) = path.parent() {
        std::fs::create_dir_all(dir)?;
    }
    let tmp = path.with_extension("json.tmp");
    std::fs::write(&tmp, serde_json::to_vec(value).map_err(std::io::Error::other)?)?;
    std::fs::rename(&tmp, path)
}

fn scope_var(scope: &Scope) -> String {
    match scope {
        Scope::Repository { owner, repo } => format!("GH_REPOSITORY={owner}/{repo}"),
        Scope::Organization(org) => format!("GH_ORGANIZATION={org}"),
        Scope::Enterprise(e) => format!("GH_ENTERPRISE={e}"),
    }
}
