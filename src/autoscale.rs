//! The autoscaling signals, all from the supervisor's own busy/idle state (no GitHub call):
//! - CloudWatch: this container's share of busy runners (100 or 0) under shared dimensions, so
//!   that the Average over a pool's containers is its `ActiveRunnersPercent`; sent at once on
//!   every change, plus a heartbeat on wall-clock multiples of the interval; the boot phases once;
//!   with `BTIME`, the original image's boot and uptime figures every minute (its guest hook 98).
//! - ECS task scale-in protection, on while a job runs, refreshed before it expires.
//! - The spot interruption notice on the instance metadata service, which starts the drain.
//!
//! None of them can disturb the runner: failures are retried with backoff and logged once per
//! outage; off AWS each is switched off with one INFO line.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::aws::{self, CloudWatch, CredentialChain, Datum, Imds};
use crate::config::AutoscaleSettings;
use crate::status::{State, Status};
use crate::supervisor::SignalKind;

/// Room left before a spot instance goes, for the cancelled job to be reported and the runner
/// removed (the runner's own cancel path takes about 10 s).
pub const SPOT_MARGIN: Duration = Duration::from_secs(30);
/// How long the last datapoint and the protection's release may take at exit.
pub const FLUSH_TIMEOUT: Duration = Duration::from_secs(3);
const MAX_BACKOFF: Duration = Duration::from_secs(60);
/// Datapoints kept while CloudWatch is unreachable (oldest dropped first).
const MAX_PENDING: usize = 500;

/// The running tasks; [`Autoscale::shutdown`] sends the last datapoint and lifts the protection.
pub struct Autoscale {
    tasks: JoinSet<()>,
    cancel: CancellationToken,
}

impl Autoscale {
    /// Starts whatever applies here; each task decides by itself whether it can run.
    pub fn start(
        settings: AutoscaleSettings,
        status: watch::Receiver<Status>,
        drain: mpsc::UnboundedSender<SignalKind>,
    ) -> Self {
        let cancel = CancellationToken::new();
        let mut tasks = JoinSet::new();
        let imds = settings.aws.imds_url.as_deref().map(|u| Arc::new(Imds::new(u)));
        if settings.cloudwatch != Some(false) {
            tasks.spawn(
                publish(settings.clone(), imds.clone(), status.clone(), cancel.clone())
                    .instrument(tracing::info_span!("cloudwatch")),
            );
        }
        if let Some(uri) = settings.ecs_agent_uri.clone() {
            tasks.spawn(
                protect(uri, settings.protection_expires_min, status.clone(), cancel.clone())
                    .instrument(tracing::info_span!("ecs")),
            );
        }
        match imds {
            Some(imds) if settings.spot_watch => {
                tasks.spawn(
                    watch_spot(imds, settings.spot_poll, drain, cancel.clone()).instrument(tracing::info_span!("spot")),
                );
            }
            _ => {}
        }
        Self { tasks, cancel }
    }

    /// Asks every task to finish (last datapoint, protection off) and waits, at most
    /// [`FLUSH_TIMEOUT`] plus a little.
    pub async fn shutdown(mut self) {
        self.cancel.cancel();
        let all = async { while self.tasks.join_next().await.is_some() {} };
        if tokio::time::timeout(FLUSH_TIMEOUT + Duration::from_millis(500), all).await.is_err() {
            self.tasks.abort_all();
        }
    }
}

// ---- CloudWatch ----------------------------------------------------------------------------

/// What to publish, decided from the statuses seen; pure, so the rules are tested apart.
pub struct Publisher {
    metric: String,
    last: Option<f64>,
    seen_listening: bool,
    boot_sent: bool,
}

impl Publisher {
    pub fn new(metric: &str) -> Self {
        Self { metric: metric.to_string(), last: None, seen_listening: false, boot_sent: false }
    }

    /// The datapoints a new status calls for: the share when it changed (or the drain began),
    /// and the boot phases once the runner first listens.
    pub fn on_status(&mut self, s: &Status, now: SystemTime) -> Vec<Datum> {
        let mut out = Vec::new();
        if let Some(share) = s.busy_share() {
            self.seen_listening |= matches!(s.state, State::Idle | State::Busy);
            // Nothing before the runner first listened: a booting container is not capacity.
            let draining_idle = matches!(s.state, State::Draining | State::Stopped | State::Failed) && share == 0.0;
            if self.seen_listening && (self.last != Some(share) || (draining_idle && self.last.is_none())) {
                out.push(self.datum(share, now));
                self.last = Some(share);
            }
        }
        if !self.boot_sent {
            if let Some(listening) = s.boot.listening_seconds {
                self.boot_sent = true;
                let mut phase = |name: &str, v: f64| {
                    out.push(Datum { name: name.to_string(), value: round_ms(v), unit: "Seconds", at: now })
                };
                if let Some(p) = s.prewarm.as_ref().filter(|p| p.outcome != "running") {
                    phase("PrewarmSec", p.seconds);
                }
                if let Some(r) = s.boot.registration_seconds {
                    phase("RegistrationSec", r);
                }
                phase("BootToListeningSec", listening);
            }
        }
        out
    }

    /// The heartbeat's datapoint, stamped with the tick's wall-clock time.
    pub fn heartbeat(&self, at: SystemTime) -> Option<Datum> {
        self.last.map(|v| self.datum(v, at))
    }

    /// The last word at exit: idle, if anything was ever published.
    pub fn last_word(&mut self, now: SystemTime) -> Option<Datum> {
        let d = self.last.map(|_| self.datum(0.0, now));
        self.last = Some(0.0);
        d
    }

    fn datum(&self, value: f64, at: SystemTime) -> Datum {
        Datum { name: self.metric.clone(), value, unit: "None", at }
    }
}

fn round_ms(v: f64) -> f64 {
    (v * 1000.0).round() / 1000.0
}

/// The next multiple of `every` after `now` (wall clock), so every container's heartbeats fall
/// on the same instants and each period holds the same number from each.
pub fn next_tick(now: SystemTime, every: Duration) -> SystemTime {
    let since = now.duration_since(UNIX_EPOCH).unwrap_or_default();
    let every_ms = every.as_millis().max(1);
    let next = (since.as_millis() / every_ms + 1) * every_ms;
    UNIX_EPOCH + Duration::from_millis(next as u64)
}

/// Exponential backoff from 1 s up to [`MAX_BACKOFF`].
pub fn backoff(failures: u32) -> Duration {
    Duration::from_secs(1u64 << failures.min(6)).min(MAX_BACKOFF)
}

/// The namespace the original image's boot figures go to, so that they appear on the EC2
/// instance's Monitoring tab beside the CloudWatch agent's.
pub const CWAGENT_NAMESPACE: &str = "CWAgent";
/// How often the boot and uptime figures are sent (the original's hook 98 loop).
pub const BOOT_FIGURES_EVERY: Duration = Duration::from_secs(60);

/// The original image's boot and uptime figures (its guest hook 98) at `now`, for a host booted
/// at `btime` (Unix seconds), a container started at `started`, whose runner first listened
/// `listening` seconds after that; whole seconds, as the original's.
/// Returns those for [`CWAGENT_NAMESPACE`] (`DockerBootSec`: host boot → container start;
/// `RunnerBootSec`: container start → the runner listening) and those for the busy share's
/// namespace (`InstanceUptimeSec`, `RunnerUptimeSec`). The original took `RunnerBootSec` from
/// `/proc/uptime`, the container's own only under sysbox (under runc it is the host's, which
/// made `DockerBootSec` about 0): here both count from the container's start.
pub fn boot_figures(btime: u64, started: SystemTime, listening: f64, now: SystemTime) -> (Vec<Datum>, Vec<Datum>) {
    let unix = |t: SystemTime| t.duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0);
    let datum = |name: &str, v: u64| Datum { name: name.to_string(), value: v as f64, unit: "None", at: now };
    let runner_boot = listening.max(0.0).floor() as u64;
    let docker_boot = unix(started).saturating_sub(btime);
    let agent = vec![datum("DockerBootSec", docker_boot), datum("RunnerBootSec", runner_boot)];
    let ours = vec![
        datum("InstanceUptimeSec", unix(now).saturating_sub(btime)),
        datum("RunnerUptimeSec", now.duration_since(started).map(|d| d.as_secs()).unwrap_or(0)),
    ];
    (agent, ours)
}

/// What the boot figures' loop needs, found by the CloudWatch task.
struct BootFigures {
    settings: AutoscaleSettings,
    imds: Option<Arc<Imds>>,
    region: String,
    endpoint: String,
    credentials: Arc<CredentialChain>,
    btime: u64,
    started: SystemTime,
}

impl BootFigures {
    /// The dimensions the original gave them: `Region`, the scope, `GH_LABEL`, `InstanceId`.
    fn dimensions(&self, instance: &str) -> Vec<(String, String)> {
        let mut dims = vec![("Region".to_string(), self.region.clone())];
        dims.extend(self.settings.boot_dimensions.iter().cloned());
        dims.push(("InstanceId".to_string(), instance.to_string()));
        dims
    }

    fn client(&self, namespace: &str, instance: &str) -> CloudWatch {
        CloudWatch {
            endpoint: self.endpoint.clone(),
            region: self.region.clone(),
            namespace: namespace.to_string(),
            dimensions: self.dimensions(instance),
            storage_resolution: 1,
            credentials: self.credentials.clone(),
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
        }
    }

    /// Once the runner first listens, then every [`BOOT_FIGURES_EVERY`]; only on EC2 (the
    /// figures are per instance), failures logged and otherwise ignored, as the original did.
    async fn publish(self, mut status: watch::Receiver<Status>, cancel: CancellationToken) {
        let instance = match &self.imds {
            Some(imds) => tokio::select! {
                r = imds.get("meta-data/instance-id") => r.ok().flatten().map(|id| id.trim().to_string()),
                () = cancel.cancelled() => return,
            },
            None => None,
        };
        let Some(instance) = instance.filter(|id| !id.is_empty()) else {
            info!("BTIME is set, but the boot and uptime figures are off: no EC2 instance id on the instance metadata service.");
            return;
        };
        let listening = loop {
            if let Some(l) = status.borrow_and_update().boot.listening_seconds {
                break l;
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                changed = status.changed() => if changed.is_err() { return },
            }
        };
        let agent = self.client(CWAGENT_NAMESPACE, &instance);
        let ours = self.client(&self.settings.namespace, &instance);
        info!(
            instance = %instance,
            agent_namespace = CWAGENT_NAMESPACE,
            namespace = %self.settings.namespace,
            dimensions = ?agent.dimensions,
            "Publishing the boot and uptime figures (BTIME) every minute."
        );
        let mut failures = 0u32;
        loop {
            let (for_agent, for_ours) = boot_figures(self.btime, self.started, listening, SystemTime::now());
            for (cw, data) in [(&agent, for_agent), (&ours, for_ours)] {
                let sent = tokio::select! {
                    r = cw.put(&data) => r,
                    () = cancel.cancelled() => return,
                };
                match sent {
                    Ok(()) => failures = 0,
                    Err(e) if failures == 0 => {
                        failures += 1;
                        warn!(error = %crate::error::chain(&e), namespace = %cw.namespace, "Failed to publish the boot figures; trying again in a minute (the runner is unaffected).");
                    }
                    Err(e) => {
                        failures += 1;
                        debug!(error = %crate::error::chain(&e), namespace = %cw.namespace, "The boot figures still fail.");
                    }
                }
            }
            tokio::select! {
                () = cancel.cancelled() => return,
                () = tokio::time::sleep(BOOT_FIGURES_EVERY) => {}
            }
        }
    }
}

/// Sends datapoints in order and keeps them through an outage; one WARN per outage.
struct Sender {
    cw: CloudWatch,
    pending: Vec<Datum>,
    failures: u32,
    retry_at: Option<Instant>,
}

impl Sender {
    fn push(&mut self, data: impl IntoIterator<Item = Datum>) {
        self.pending.extend(data);
        if self.pending.len() > MAX_PENDING {
            let drop = self.pending.len() - MAX_PENDING;
            self.pending.drain(..drop);
            debug!(dropped = drop, "CloudWatch unreachable: dropped the oldest datapoints.");
        }
    }

    /// Sends what is pending, oldest first, unless backing off after a failure.
    async fn flush(&mut self) {
        if self.pending.is_empty() || self.retry_at.is_some_and(|t| Instant::now() < t) {
            return;
        }
        while !self.pending.is_empty() {
            let n = self.pending.len().min(aws::MAX_DATA_PER_CALL);
            match self.cw.put(&self.pending[..n]).await {
                Ok(()) => {
                    if self.failures > 0 {
                        info!(failures = self.failures, "CloudWatch reachable again.");
                    }
                    debug!(datapoints = n, "Datapoints sent.");
                    self.pending.drain(..n);
                    self.failures = 0;
                    self.retry_at = None;
                }
                Err(e) => {
                    let delay = backoff(self.failures);
                    if self.failures == 0 {
                        warn!(error = %crate::error::chain(&e), retry_in_s = delay.as_secs(), transient = e.is_transient(), "Failed to publish to CloudWatch; retrying with backoff (the runner is unaffected).");
                    } else {
                        debug!(error = %crate::error::chain(&e), retry_in_s = delay.as_secs(), "CloudWatch still failing.");
                    }
                    self.failures += 1;
                    self.retry_at = Some(Instant::now() + delay);
                    return;
                }
            }
        }
    }
}

async fn publish(
    settings: AutoscaleSettings,
    imds: Option<Arc<Imds>>,
    mut status: watch::Receiver<Status>,
    cancel: CancellationToken,
) {
    let required = settings.cloudwatch == Some(true);
    let off = |why: &str| {
        if required {
            warn!(reason = why, "CLOUDWATCH_ENABLED=true but CloudWatch metrics are off.");
        } else {
            info!(reason = why, "CloudWatch metrics off (not on AWS).");
        }
    };
    let region = tokio::select! {
        r = aws::discover_region(&settings.aws, imds.as_deref()) => r,
        () = cancel.cancelled() => return,
    };
    let Some(region) = region else {
        off("no AWS region: AWS_REGION unset, no ECS task metadata, no instance metadata");
        return;
    };
    // Built only here, with a region found: an idle supervisor off AWS never loads the SDK's
    // providers (issue #20's RSS bar).
    let chain = Arc::new(CredentialChain::new(&settings.aws, Some(&region)));
    let first = tokio::select! {
        c = chain.get() => c,
        () = cancel.cancelled() => return,
    };
    if let Err(e) = first {
        off(&crate::error::chain(&e));
        return;
    }
    let endpoint = settings.aws.cloudwatch_url.clone().unwrap_or_else(|| CloudWatch::default_endpoint(&region));
    if let (Some(btime), Some(started)) = (settings.btime, settings.started) {
        let figures = BootFigures {
            settings: settings.clone(),
            imds: imds.clone(),
            region: region.clone(),
            endpoint: endpoint.clone(),
            credentials: chain.clone(),
            btime,
            started,
        };
        tokio::spawn(
            figures.publish(status.clone(), cancel.clone()).instrument(tracing::info_span!("cloudwatch_boot")),
        );
    }
    info!(
        endpoint = %endpoint,
        region = %region,
        namespace = %settings.namespace,
        metric = %settings.metric_name,
        dimensions = ?settings.dimensions,
        heartbeat_s = settings.heartbeat.as_secs(),
        "Publishing the busy share to CloudWatch."
    );
    let sender = Sender {
        cw: CloudWatch {
            endpoint,
            region,
            namespace: settings.namespace.clone(),
            dimensions: settings.dimensions.clone(),
            storage_resolution: settings.storage_resolution,
            credentials: chain,
            http: reqwest::Client::builder()
                .connect_timeout(Duration::from_secs(5))
                .timeout(Duration::from_secs(15))
                .build()
                .unwrap_or_default(),
        },
        pending: Vec::new(),
        failures: 0,
        retry_at: None,
    };
    // The sending runs apart: a slow or failing PutMetricData must not delay the next change's
    // datapoint, which is stamped when the change is seen.
    let (tx, rx) = mpsc::unbounded_channel();
    let sending = tokio::spawn(send(sender, rx));
    let mut publisher = Publisher::new(&settings.metric_name);
    let mut tick = next_tick(SystemTime::now(), settings.heartbeat);
    let mut status_open = true;
    loop {
        for d in publisher.on_status(&status.borrow_and_update(), SystemTime::now()) {
            let _ = tx.send(d);
        }
        let until_tick = tick.duration_since(SystemTime::now()).unwrap_or_default();
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = status.changed(), if status_open => status_open = changed.is_ok(),
            () = tokio::time::sleep(until_tick) => {
                if let Some(d) = publisher.heartbeat(tick) {
                    let _ = tx.send(d);
                }
                tick = next_tick(SystemTime::now().max(tick), settings.heartbeat);
            }
        }
    }
    // The container is going: the pool's average must not keep counting it busy.
    let last = publisher.on_status(&status.borrow(), SystemTime::now());
    for d in last.into_iter().chain(publisher.last_word(SystemTime::now())) {
        let _ = tx.send(d);
    }
    drop(tx);
    let unsent = match tokio::time::timeout(FLUSH_TIMEOUT, sending).await {
        Ok(Ok(0)) => return,
        Ok(Ok(n)) => Some(n),
        _ => None,
    };
    warn!(datapoints = ?unsent, "The last datapoints could not be sent to CloudWatch.");
}

/// Sends what the publisher hands over, in order, backing off through an outage; once the
/// publisher is done, one last try (even while backing off). Returns how many stayed unsent.
async fn send(mut sender: Sender, mut rx: mpsc::UnboundedReceiver<Datum>) -> usize {
    loop {
        let retry = sender.retry_at.filter(|_| !sender.pending.is_empty());
        tokio::select! {
            biased;
            d = rx.recv() => match d {
                Some(d) => {
                    sender.push([d]);
                    while let Ok(d) = rx.try_recv() {
                        sender.push([d]);
                    }
                }
                None => break,
            },
            () = tokio::time::sleep_until(retry.unwrap_or_else(Instant::now)), if retry.is_some() => {}
        }
        sender.flush().await;
    }
    sender.retry_at = None;
    sender.flush().await;
    sender.pending.len()
}

// ---- ECS task scale-in protection ----------------------------------------------------------

/// Whether protection must be set (`Some(true)`), lifted (`Some(false)`) or left alone.
/// `current` is what the agent last accepted and when; a protection is renewed once half its
/// time is gone, so it never lapses under a long job.
pub fn protection_action(
    busy: Option<bool>,
    current: Option<(bool, Instant)>,
    expires: Duration,
    now: Instant,
) -> Option<bool> {
    let busy = busy?;
    match current {
        None => Some(busy),
        Some((on, _)) if on != busy => Some(busy),
        Some((true, at)) if now >= at + expires / 2 => Some(true),
        Some(_) => None,
    }
}

async fn protect(uri: String, expires_min: u32, mut status: watch::Receiver<Status>, cancel: CancellationToken) {
    let http = aws::local_client();
    let expires = Duration::from_secs(u64::from(expires_min) * 60);
    let mut current: Option<(bool, Instant)> = None;
    let mut failures = 0u32;
    let mut retry_at: Option<Instant> = None;
    let mut status_open = true;
    info!(agent = %uri, expires_min, "ECS task: scale-in protection follows the runner's jobs.");
    loop {
        let busy = status.borrow_and_update().busy_share().map(|s| s > 0.0);
        let now = Instant::now();
        let action = protection_action(busy, current, expires, now).filter(|_| retry_at.is_none_or(|t| now >= t));
        if let Some(on) = action {
            match aws::set_task_protection(&http, &uri, on, expires_min).await {
                Ok(()) => {
                    if on != current.is_some_and(|(c, _)| c) || failures > 0 {
                        info!(protected = on, "Task scale-in protection {}.", if on { "on" } else { "off" });
                    } else {
                        debug!("Task scale-in protection renewed.");
                    }
                    current = Some((on, Instant::now()));
                    failures = 0;
                    retry_at = None;
                }
                Err(e) => {
                    let delay = backoff(failures).min(Duration::from_secs(30));
                    if failures == 0 {
                        warn!(error = %crate::error::chain(&e), protected = on, retry_in_s = delay.as_secs(), "Failed to set task scale-in protection; retrying.");
                    }
                    failures += 1;
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
        let renew_at = current.filter(|(on, _)| *on).map(|(_, at)| at + expires / 2);
        let wake = match (renew_at, retry_at) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        };
        tokio::select! {
            biased;
            () = cancel.cancelled() => break,
            changed = status.changed(), if status_open => status_open = changed.is_ok(),
            () = tokio::time::sleep_until(wake.unwrap_or_else(Instant::now)), if wake.is_some() => {
                retry_at = None;
            }
        }
    }
    if current.is_some_and(|(on, _)| on) {
        match tokio::time::timeout(FLUSH_TIMEOUT, aws::set_task_protection(&http, &uri, false, expires_min)).await {
            Ok(Ok(())) => info!("Task scale-in protection off (exiting)."),
            Ok(Err(e)) => {
                warn!(error = %crate::error::chain(&e), "Failed to lift task scale-in protection at exit; it lapses by itself.")
            }
            Err(_) => warn!("Lifting task scale-in protection timed out at exit; it lapses by itself."),
        }
    }
}

// ---- Spot interruption ---------------------------------------------------------------------

/// When the drain must be over for a notice seen `now` (wall clock and monotonic).
pub fn spot_deadline(notice: &aws::SpotNotice, now: SystemTime, mono: Instant) -> Instant {
    // Without a time the notice still means two minutes.
    let at = notice.at().unwrap_or(now + Duration::from_secs(120));
    let left = at.duration_since(now).unwrap_or_default().saturating_sub(SPOT_MARGIN);
    mono + left
}

async fn watch_spot(
    imds: Arc<Imds>,
    every: Duration,
    drain: mpsc::UnboundedSender<SignalKind>,
    cancel: CancellationToken,
) {
    // IMDSv2 first: its token request tells whether this is EC2 at all.
    let probe = tokio::select! {
        r = imds.get("meta-data/instance-id") => r,
        () = cancel.cancelled() => return,
    };
    match probe {
        Ok(Some(id)) => {
            info!(instance = %id.trim(), every_s = every.as_secs(), "On EC2: watching for a spot interruption notice.")
        }
        Ok(None) | Err(_) => {
            info!("No instance metadata service: spot watch off (not on EC2).");
            return;
        }
    }
    let mut failures = 0u32;
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            () = tokio::time::sleep(every) => {}
        }
        match imds.get("meta-data/spot/instance-action").await {
            Ok(None) => failures = 0,
            Ok(Some(body)) => match serde_json::from_str::<aws::SpotNotice>(&body) {
                Ok(notice) => {
                    let by = spot_deadline(&notice, SystemTime::now(), Instant::now());
                    warn!(action = %notice.action, time = %notice.time, drain_within_s = by.saturating_duration_since(Instant::now()).as_secs(), "Spot interruption notice: draining now (no new job will start).");
                    let _ = drain.send(SignalKind::Spot { by });
                    return;
                }
                Err(e) => debug!(error = %e, "Unreadable spot notice; polling on."),
            },
            Err(e) => {
                if failures == 0 {
                    warn!(error = %crate::error::chain(&e), "Failed to read the spot notice; polling on.");
                }
                failures += 1;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::status::{BootTimes, PrewarmStatus};

    fn st(state: State, busy: bool) -> Status {
        Status { state, busy, ..Status::default() }
    }

    #[test]
    fn shares_follow_the_runner_and_start_only_once_it_listens() {
        let mut p = Publisher::new("ActiveRunnersPercent");
        let t = SystemTime::now();
        assert!(p.on_status(&st(State::Starting, false), t).is_empty());
        assert!(p.on_status(&st(State::Registering, false), t).is_empty());
        assert!(p.heartbeat(t).is_none(), "no heartbeat before the runner listens");
        let idle = p.on_status(&st(State::Idle, false), t);
        assert_eq!(idle.iter().map(|d| d.value).collect::<Vec<_>>(), vec![0.0]);
        assert!(p.on_status(&st(State::Idle, false), t).is_empty(), "no change, no datapoint");
        let busy = p.on_status(&st(State::Busy, true), t);
        assert_eq!(busy[0].value, 100.0);
        assert_eq!(busy[0].name, "ActiveRunnersPercent");
        assert_eq!(p.heartbeat(t).unwrap().value, 100.0);
        // Draining with the job still running: still busy; once it ends, idle.
        assert!(p.on_status(&st(State::Draining, true), t).is_empty());
        assert_eq!(p.on_status(&st(State::Draining, false), t)[0].value, 0.0);
        assert_eq!(p.last_word(t).unwrap().value, 0.0);
    }

    #[test]
    fn a_runner_restarting_mid_job_stays_busy() {
        let mut p = Publisher::new("M");
        let t = SystemTime::now();
        p.on_status(&st(State::Busy, true), t);
        assert!(p.on_status(&st(State::Starting, true), t).is_empty());
    }

    #[test]
    fn boot_phases_are_sent_once_when_the_runner_first_listens() {
        let mut p = Publisher::new("M");
        let t = SystemTime::now();
        let mut s = st(State::Idle, false);
        s.boot = BootTimes { registration_seconds: Some(1.25), listening_seconds: Some(3.5), ..BootTimes::default() };
        s.prewarm = Some(PrewarmStatus { outcome: "warm", seconds: 2.0, ..PrewarmStatus::default() });
        let names: Vec<(String, f64)> = p.on_status(&s, t).into_iter().map(|d| (d.name, d.value)).collect();
        assert_eq!(
            names,
            vec![
                ("M".into(), 0.0),
                ("PrewarmSec".into(), 2.0),
                ("RegistrationSec".into(), 1.25),
                ("BootToListeningSec".into(), 3.5)
            ]
        );
        s.state = State::Busy;
        s.busy = true;
        assert_eq!(p.on_status(&s, t).len(), 1);
    }

    #[test]
    fn boot_figures_split_host_boot_and_container_boot_as_the_original_named_them() {
        let btime = 1_700_000_000;
        let started = UNIX_EPOCH + Duration::from_millis(1_700_000_045_700);
        let now = started + Duration::from_secs(600);
        let (agent, ours) = boot_figures(btime, started, 12.9, now);
        let named = |d: &[Datum]| d.iter().map(|d| (d.name.clone(), d.value)).collect::<Vec<_>>();
        assert_eq!(named(&agent), vec![("DockerBootSec".into(), 45.0), ("RunnerBootSec".into(), 12.0)]);
        assert_eq!(named(&ours), vec![("InstanceUptimeSec".into(), 645.0), ("RunnerUptimeSec".into(), 600.0)]);
        assert!(agent.iter().chain(&ours).all(|d| d.unit == "None" && d.at == now));
        // Never negative, even with a host clock that went back or a BTIME after the start.
        let (agent, ours) = boot_figures(btime + 100, started, -1.0, started - Duration::from_secs(5));
        assert!(agent.iter().chain(&ours).all(|d| d.value == 0.0), "{agent:?} {ours:?}");
    }

    #[test]
    fn heartbeats_fall_on_wall_clock_multiples() {
        let at = UNIX_EPOCH + Duration::from_millis(1_000_123_400);
        assert_eq!(next_tick(at, Duration::from_secs(60)), UNIX_EPOCH + Duration::from_secs(1_000_140));
        let exact = UNIX_EPOCH + Duration::from_secs(1_000_140);
        assert_eq!(next_tick(exact, Duration::from_secs(60)), UNIX_EPOCH + Duration::from_secs(1_000_200));
    }

    #[test]
    fn protection_follows_busy_and_is_renewed_at_half_time() {
        let now = Instant::now();
        let exp = Duration::from_secs(3600);
        assert_eq!(protection_action(None, None, exp, now), None, "nothing before the runner listens");
        assert_eq!(protection_action(Some(false), None, exp, now), Some(false), "a stale protection is lifted");
        assert_eq!(protection_action(Some(true), Some((false, now)), exp, now), Some(true));
        assert_eq!(protection_action(Some(true), Some((true, now)), exp, now + Duration::from_secs(1000)), None);
        assert_eq!(protection_action(Some(true), Some((true, now)), exp, now + Duration::from_secs(1800)), Some(true));
        assert_eq!(protection_action(Some(false), Some((true, now)), exp, now), Some(false));
        assert_eq!(protection_action(Some(false), Some((false, now)), exp, now + exp * 2), None);
    }

    #[test]
    fn spot_deadline_leaves_a_margin_before_the_instance_goes() {
        let now = SystemTime::now();
        let mono = Instant::now();
        let at = rfc3339(now + Duration::from_secs(120));
        let n = aws::SpotNotice { action: "terminate".into(), time: at };
        let by = spot_deadline(&n, now, mono);
        let left = by - mono;
        assert!(left <= Duration::from_secs(90) && left >= Duration::from_secs(89), "{left:?}");
        let past = aws::SpotNotice { action: "terminate".into(), time: "2000-01-01T00:00:00Z".into() };
        assert_eq!(spot_deadline(&past, now, mono), mono);
    }

    fn rfc3339(t: SystemTime) -> String {
        time::OffsetDateTime::from(t).format(&time::format_description::well_known::Rfc3339).unwrap()
    }

    #[test]
    fn backoff_grows_to_a_minute() {
        assert_eq!(backoff(0), Duration::from_secs(1));
        assert_eq!(backoff(3), Duration::from_secs(8));
        assert_eq!(backoff(20), Duration::from_secs(60));
    }
}
