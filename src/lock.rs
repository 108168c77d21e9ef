//! The hardware lock: one job at a time on a shared device, across containers, repositories
//! and organizations.
//!
//! Layout in `RUNNER_LOCK_DIR` (bind-mounted from the host into every container sharing the
//! device):
//! - `<resource>.lock`: the kernel file lock (`flock`) held by the supervisor exactly while a job
//!   of its runner runs; a crash releases it with the process.
//! - `<resource>.holder`: who holds it (`<container>/<job> since <time>`), for waiters' messages.
//! - `<resource>.queue/<ns>-<container>-<pid>`: one ticket per waiter, itself `flock`ed by its
//!   owner, so a dead waiter's ticket is recognised and removed. Waiters are served in ticket
//!   (arrival) order, not at random.
//!
//! The runner's job-started hook (`ci-runner hook job-started`) asks the supervisor over a
//! Unix socket and blocks, printing `Waiting for <resource>, held by … since …` into the job's
//! log; the job-completed hook, the `completed with result` line, or run.sh's exit release it.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Write};
use std::os::fd::AsRawFd;
use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Serialize;
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::status::{now, StatusHandle};

/// How often a waiter looks at the queue and the lock: the hand-off latency's granularity.
const POLL: Duration = Duration::from_millis(5);
/// How often the job's log is reminded that it is still waiting.
const REMIND: Duration = Duration::from_secs(30);

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LockConfig {
    pub resource: String,
    pub dir: PathBuf,
    pub timeout: Option<Duration>,
}

/// Lock state for `/health`.
#[derive(Debug, Clone, Serialize, PartialEq, Eq)]
pub struct LockStatus {
    pub resource: String,
    /// `free`, `waiting` or `holding`.
    pub state: &'static str,
    /// Unix seconds since the current state began.
    pub since: Option<u64>,
    /// While waiting: who holds it.
    pub holder: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum LockError {
    #[error("failed to use the lock directory {}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("gave up waiting for {resource} after {waited:?} (RUNNER_LOCK_TIMEOUT_SEC), held by {holder}")]
    Timeout { resource: String, waited: Duration, holder: String },
    #[error("the job stopped waiting for {resource}")]
    Abandoned { resource: String },
}

fn io_err(path: &Path) -> impl FnOnce(io::Error) -> LockError + '_ {
    move |source| LockError::Io { path: path.to_path_buf(), source }
}

fn try_flock(file: &File) -> io::Result<bool> {
    // SAFETY: flock on a valid descriptor we own.
    let rc = unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) };
    if rc == 0 {
        return Ok(true);
    }
    let err = io::Error::last_os_error();
    if err.raw_os_error() == Some(libc::EWOULDBLOCK) {
        Ok(false)
    } else {
        Err(err)
    }
}

fn now_ns() -> u128 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_nanos()).unwrap_or(0)
}

/// The container's name for holder messages: its hostname (the container id under Docker).
pub fn container_name() -> String {
    nix::unistd::gethostname().ok().and_then(|h| h.into_string().ok()).unwrap_or_else(|| "unknown".into())
}

/// A waiter's place in the queue, `flock`ed while it waits.
pub struct Ticket {
    path: PathBuf,
    _file: File,
}

impl Drop for Ticket {
    fn drop(&mut self) {
        let _ = fs::remove_file(&self.path);
    }
}

/// The held lock; dropping it releases the kernel lock.
pub struct Held {
    _file: File,
    holder_path: PathBuf,
}

impl Drop for Held {
    fn drop(&mut self) {
        // Clear the holder note before the kernel lock goes with the file.
        let _ = fs::write(&self.holder_path, b"");
    }
}

impl LockConfig {
    fn lock_path(&self) -> PathBuf {
        self.dir.join(format!("{}.lock", self.resource))
    }
    fn holder_path(&self) -> PathBuf {
        self.dir.join(format!("{}.holder", self.resource))
    }
    fn queue_dir(&self) -> PathBuf {
        self.dir.join(format!("{}.queue", self.resource))
    }

    /// Creates the directories, world-writable and sticky like /tmp: containers sharing the
    /// device may run their supervisors as different users.
    pub fn prepare(&self) -> Result<(), LockError> {
        for d in [self.dir.clone(), self.queue_dir()] {
            fs::create_dir_all(&d).map_err(io_err(&d))?;
            let _ = fs::set_permissions(&d, fs::Permissions::from_mode(0o1777));
        }
        Ok(())
    }

    /// Joins the queue: the ticket is made and locked under a hidden name, then renamed in, so
    /// no one ever sees an unlocked live ticket.
    pub fn enqueue(&self, me: &str) -> Result<Ticket, LockError> {
        let q = self.queue_dir();
        let name = format!("{:024}-{}-{}", now_ns(), me, std::process::id());
        let tmp = q.join(format!(".{name}"));
        let file =
            OpenOptions::new().create(true).write(true).truncate(true).mode(0o666).open(&tmp).map_err(io_err(&tmp))?;
        try_flock(&file).map_err(io_err(&tmp))?;
        let path = q.join(&name);
        fs::rename(&tmp, &path).map_err(io_err(&path))?;
        Ok(Ticket { path, _file: file })
    }

    /// Whether every live ticket ahead of `ticket` is gone; removes dead ones on the way.
    pub fn my_turn(&self, ticket: &Ticket) -> Result<bool, LockError> {
        let q = self.queue_dir();
        let mine = ticket.path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
        let mut names: Vec<_> = fs::read_dir(&q)
            .map_err(io_err(&q))?
            .flatten()
            .map(|e| e.file_name())
            .filter(|n| !n.to_string_lossy().starts_with('.') && *n < mine)
            .collect();
        names.sort();
        for name in names {
            let path = q.join(&name);
            let Ok(file) = File::open(&path) else { continue };
            if try_flock(&file).map_err(io_err(&path))? {
                // Nobody holds it: its owner died while waiting.
                let _ = fs::remove_file(&path);
                continue;
            }
            return Ok(false);
        }
        Ok(true)
    }

    /// Takes the kernel lock if it is free.
    pub fn try_acquire(&self, holder: &str) -> Result<Option<Held>, LockError> {
        let path = self.lock_path();
        let file = OpenOptions::new()
            .create(true)
            .read(true)
            .write(true)
            .truncate(false)
            .mode(0o666)
            .open(&path)
            .map_err(io_err(&path))?;
        if !try_flock(&file).map_err(io_err(&path))? {
            return Ok(None);
        }
        let holder_path = self.holder_path();
        let mut f = File::create(&holder_path).map_err(io_err(&holder_path))?;
        let _ = fs::set_permissions(&holder_path, fs::Permissions::from_mode(0o666));
        let _ = write!(f, "{holder} since {}", rfc3339_now());
        Ok(Some(Held { _file: file, holder_path }))
    }

    /// The holder's note (`<container>/<job> since <time>`), if someone holds the lock.
    fn holder_note(&self) -> Option<String> {
        fs::read_to_string(self.holder_path()).ok().filter(|s| !s.trim().is_empty())
    }

    /// Who holds the lock, as its holder wrote it.
    pub fn holder(&self) -> String {
        self.holder_note().unwrap_or_else(|| "another runner".into())
    }

    /// Waits in line for the lock. `say` gets the messages for the job's log; `gone` resolves
    /// when the job stops waiting (its hook was killed).
    pub async fn acquire(
        &self,
        holder: &str,
        me: &str,
        mut say: impl FnMut(String),
        gone: impl std::future::Future<Output = ()>,
    ) -> Result<Held, LockError> {
        let ticket = self.enqueue(me)?;
        let started = Instant::now();
        let mut next_reminder = started;
        tokio::pin!(gone);
        loop {
            if self.my_turn(&ticket)? {
                if let Some(held) = self.try_acquire(holder)? {
                    drop(ticket);
                    return Ok(held);
                }
            }
            if Instant::now() >= next_reminder {
                say(format!("Waiting for {}, held by {}", self.resource, self.holder()));
                next_reminder = Instant::now() + REMIND;
            }
            if let Some(t) = self.timeout {
                if started.elapsed() >= t {
                    return Err(LockError::Timeout {
                        resource: self.resource.clone(),
                        waited: t,
                        holder: self.holder(),
                    });
                }
            }
            tokio::select! {
                () = tokio::time::sleep(POLL) => {}
                () = &mut gone => return Err(LockError::Abandoned { resource: self.resource.clone() }),
            }
        }
    }
}

fn rfc3339_now() -> String {
    time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default()
}

/// Whether `dir` sits on a mount of its own (a bind mount from the host), rather than on the
/// container's root filesystem, where it would lock nothing across containers.
pub fn is_own_mount(dir: &Path) -> bool {
    let Ok(info) = fs::read_to_string("/proc/self/mountinfo") else { return true };
    let dir = dir.canonicalize().unwrap_or_else(|_| dir.to_path_buf());
    info.lines().filter_map(|l| l.split_whitespace().nth(4)).any(|mount| {
        let mount = Path::new(mount);
        mount != Path::new("/") && dir.starts_with(mount) && !mount.starts_with("/proc") && !mount.starts_with("/sys")
    })
}

/// Requests from the supervisor to the lock actor.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Request {
    /// The job ended (completed line, run.sh exit, drain): release, or stop waiting.
    Release,
}

fn set_status(status: &StatusHandle, cfg: &LockConfig, state: &'static str, holder: Option<String>) {
    let resource = cfg.resource.clone();
    status.update(|s| {
        let changed = s.lock.as_ref().is_none_or(|l| l.state != state);
        let since = if changed { Some(now()) } else { s.lock.as_ref().and_then(|l| l.since) };
        s.lock = Some(LockStatus { resource, state, since, holder });
    });
}

/// The lock actor: serves the hooks on `socket`, owns the held lock, and releases it on
/// request. Runs until `cancel`.
pub async fn run(
    cfg: LockConfig,
    listener: UnixListener,
    status: StatusHandle,
    mut requests: mpsc::UnboundedReceiver<Request>,
    cancel: CancellationToken,
) {
    let me = container_name();
    let mut held: Option<Held> = None;
    set_status(&status, &cfg, "free", None);
    loop {
        tokio::select! {
            () = cancel.cancelled() => break,
            Some(Request::Release) = requests.recv() => {
                if held.take().is_some() {
                    info!(resource = %cfg.resource, "Lock released.");
                    set_status(&status, &cfg, "free", None);
                }
            }
            conn = listener.accept() => {
                let Ok((stream, _)) = conn else { continue };
                handle(&cfg, &me, stream, &mut held, &status, &mut requests).await;
            }
        }
    }
}

async fn handle(
    cfg: &LockConfig,
    me: &str,
    stream: UnixStream,
    held: &mut Option<Held>,
    status: &StatusHandle,
    requests: &mut mpsc::UnboundedReceiver<Request>,
) {
    let (read, mut write) = stream.into_split();
    let mut lines = BufReader::new(read).lines();
    let Ok(Some(line)) = lines.next_line().await else { return };
    if line == "release" {
        if held.take().is_some() {
            info!(resource = %cfg.resource, "Lock released.");
        }
        set_status(status, cfg, "free", None);
        let _ = write.write_all(b"ok\n").await;
        return;
    }
    let Some(job) = line.strip_prefix("acquire ") else {
        let _ = write.write_all(b"fail unknown request\n").await;
        return;
    };
    // A job that never released (its hook was skipped): its turn is over. Releases queued for
    // earlier jobs must not be taken for this job's end.
    *held = None;
    while requests.try_recv().is_ok() {}
    let holder = format!("{me}/{job}");
    set_status(status, cfg, "waiting", Some(cfg.holder()));
    info!(resource = %cfg.resource, job = %job, "Job waiting for the lock.");
    let (say_tx, mut say_rx) = mpsc::unbounded_channel::<String>();
    let gone = async {
        // The hook sends nothing more: EOF means it was killed (job cancelled).
        let _ = lines.next_line().await;
    };
    let released = async {
        while let Some(r) = requests.recv().await {
            if r == Request::Release {
                return;
            }
        }
        std::future::pending::<()>().await
    };
    let gone_or_released = async {
        tokio::select! {
            () = gone => {}
            () = released => {}
        }
    };
    let acquire = cfg.acquire(
        &holder,
        me,
        |m| {
            let _ = say_tx.send(m);
        },
        gone_or_released,
    );
    tokio::pin!(acquire);
    let result = loop {
        tokio::select! {
            r = &mut acquire => break r,
            Some(msg) = say_rx.recv() => {
                set_status(status, cfg, "waiting", cfg.holder_note());
                let _ = write.write_all(format!("wait {msg}\n").as_bytes()).await;
            }
        }
    };
    match result {
        Ok(h) => {
            *held = Some(h);
            info!(resource = %cfg.resource, job = %job, "Lock taken.");
            set_status(status, cfg, "holding", Some(holder.clone()));
            let _ = write.write_all(b"ok\n").await;
        }
        Err(e) => {
            warn!(resource = %cfg.resource, job = %job, error = %crate::error::chain(&e), "Job did not get the lock.");
            set_status(status, cfg, "free", None);
            let _ = write.write_all(format!("fail {e}\n").as_bytes()).await;
        }
    }
}

/// `ci-runner hook job-started|job-completed`: the runner's job hooks, talking to the
/// supervisor's lock socket (`CI_RUNNER_LOCK_SOCKET`).
pub fn hook(kind: &str) -> i32 {
    use std::io::{BufRead, BufReader as StdBufReader};
    use std::os::unix::net::UnixStream as StdUnixStream;
    let Ok(socket) = std::env::var("CI_RUNNER_LOCK_SOCKET") else {
        eprintln!("ci-runner hook: CI_RUNNER_LOCK_SOCKET is not set (expected the supervisor's lock socket path)");
        return if kind == "job-completed" { 0 } else { 1 };
    };
    let request = match kind {
        "job-started" => {
            format!("acquire {}\n", std::env::var("GITHUB_JOB").unwrap_or_else(|_| "job".into()).replace('\n', " "))
        }
        "job-completed" => "release\n".to_string(),
        other => {
            eprintln!("ci-runner hook: unknown hook {other:?} (expected job-started or job-completed)");
            return 2;
        }
    };
    let mut stream = match StdUnixStream::connect(&socket) {
        Ok(s) => s,
        Err(e) => {
            eprintln!("ci-runner hook: failed to reach the supervisor at {socket}: {e}");
            return if kind == "job-completed" { 0 } else { 1 };
        }
    };
    if stream.write_all(request.as_bytes()).is_err() {
        return 1;
    }
    for line in StdBufReader::new(stream).lines() {
        let Ok(line) = line else { break };
        if let Some(msg) = line.strip_prefix("wait ") {
            println!("{msg}");
        } else if line == "ok" {
            return 0;
        } else if let Some(msg) = line.strip_prefix("fail ") {
            eprintln!("{msg}");
            return 1;
        }
    }
    eprintln!("ci-runner hook: the supervisor closed the lock socket");
    if kind == "job-completed" {
        0
    } else {
        1
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg(dir: &Path) -> LockConfig {
        let c = LockConfig { resource: "board".into(), dir: dir.to_path_buf(), timeout: None };
        c.prepare().unwrap();
        c
    }

    #[test]
    fn the_lock_excludes_a_second_holder_until_dropped() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let a = c.try_acquire("a/job1").unwrap().expect("free lock");
        assert!(c.try_acquire("b/job2").unwrap().is_none());
        assert!(c.holder().starts_with("a/job1 since "));
        drop(a);
        assert!(c.try_acquire("b/job2").unwrap().is_some());
    }

    #[test]
    fn tickets_are_served_in_arrival_order_and_dead_ones_skipped() {
        let d = tempfile::tempdir().unwrap();
        let c = cfg(d.path());
        let first = c.enqueue("x").unwrap();
        let second = c.enqueue("y").unwrap();
        assert!(c.my_turn(&first).unwrap());
        assert!(!c.my_turn(&second).unwrap());
        // A waiter that died leaves an unlocked ticket: skipped and removed.
        let dead = first.path.clone();
        std::mem::forget(first);
        // Forgetting keeps the fd open (and locked) in this process; simulate death by a new
        // unlocked file of the same name.
        let _ = fs::remove_file(&dead);
        File::create(&dead).unwrap();
        assert!(c.my_turn(&second).unwrap());
        assert!(!dead.exists());
    }

    #[tokio::test]
    async fn a_waiter_times_out_with_the_holder_named() {
        let d = tempfile::tempdir().unwrap();
        let mut c = cfg(d.path());
        c.timeout = Some(Duration::from_millis(50));
        let _held = c.try_acquire("box/build").unwrap().unwrap();
        let mut said = Vec::new();
        let err = c.acquire("me/test", "me", |m| said.push(m), std::future::pending()).await.err().unwrap();
        assert!(err.to_string().contains("box/build"), "{err}");
        assert!(said[0].starts_with("Waiting for board, held by box/build since "), "{said:?}");
        assert_eq!(fs::read_dir(c.queue_dir()).unwrap().count(), 0, "ticket left behind");
    }
}
