//! The boot-time pre-warm: the work dir loaded from the newest ci-storage slot over SSH.
//!
//! Compatible with the ci-storage tool (reference §13): the storage dir is the one its GitHub
//! action derives, slots are the directories in it whose names hold no `.`, a slot is as old
//! as its directory's ctime, slots within 60 s of `CI_STORAGE_MAX_AGE_SEC` are ignored, the
//! newest wins (ties: the larger id), and the local meta file is written as `ci-storage load`
//! writes it, so a later `ci-storage store` in a job dedups against the slot we loaded.
//!
//! How it is fast: SSH sessions (libssh2, in-process, ChaCha20-Poly1305 from OpenSSL), one per
//! usable CPU, all started together, each running one remote command that lists the slots,
//! chooses the newest and has the storage host's GNU tar stream its share as a POSIX (pax)
//! archive, which carries nanosecond mtimes: one handshake and one remote shell start-up in
//! wall time (issue 21). Per stream, two threads overlap the network with the disk: one
//! reads the channel, a writer thread creates the files.
//! The writer runs with the runner user's filesystem uid and gid (`setfsuid`), so every file is
//! born owned by that user and the archive can reach nothing that user could not.
//!
//! How it is safe: the tree is built in a hidden sibling of the work dir and renamed into place
//! only when the archive and the remote tar both ended cleanly; any failure, a timeout or a
//! signal removes it, and the runner starts cold with an empty work dir.
//!
//! How it is visible (issue #17): the writers count entries and bytes in a [`Progress`]
//! (atomics, no lock); the last stream's remote walk sends the slot's totals before its
//! archive; a thread logs a line every `progress_every`, and `/health` reads the counters.

use std::collections::HashSet;
use std::ffi::CString;
use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::net::{TcpStream, ToSocketAddrs};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{DirBuilderExt, OpenOptionsExt, PermissionsExt};
use std::os::unix::io::AsRawFd;
use std::path::{Component, Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicU8, Ordering};
use std::sync::mpsc::{sync_channel, Receiver, SyncSender};
use std::sync::{Arc, Condvar, Mutex, PoisonError};
use std::time::{Duration, Instant};

use crate::config::Secret;

/// Slots this close to the max age are about to be collected by ci-storage's GC: not loaded.
const GC_MARGIN: Duration = Duration::from_secs(60);
/// Size of one chunk passed from the network thread to the writer.
const CHUNK: usize = 256 * 1024;
/// Chunks in flight between the two threads of a stream.
const CHUNKS_IN_FLIGHT: usize = 16;
/// The most a listing may hold.
const MAX_LISTING: usize = 64 << 20;

/// `CI_STORAGE_HOST`: `[user@]host[:port]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StorageHost {
    pub user: Option<String>,
    pub host: String,
    pub port: u16,
}

impl StorageHost {
    /// Parses `[user@]host[:port]` the way ci-storage does (`^(.*?)(?::(\d+))?$`).
    pub fn parse(s: &str) -> Option<StorageHost> {
        let s = s.trim();
        let (user, rest) = match s.split_once('@') {
            Some((u, r)) => (Some(u.to_string()), r),
            None => (None, s),
        };
        let (host, port) = match rest.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => (h, p.parse().ok()?),
            _ => (rest, 22),
        };
        let host = host.trim_start_matches('[').trim_end_matches(']');
        let ok_user = user.as_deref().is_none_or(|u| !u.is_empty() && !u.contains(char::is_whitespace));
        if host.is_empty() || host.contains(char::is_whitespace) || port == 0 || !ok_user {
            return None;
        }
        Some(StorageHost { user, host: host.to_string(), port })
    }
}

/// Everything the pre-warm needs, resolved by `config`.
#[derive(Debug, Clone)]
pub struct Settings {
    pub host: StorageHost,
    /// The SSH user: the one in `CI_STORAGE_HOST`, else the runner user (as ssh would).
    pub user: String,
    pub key: Secret,
    /// The storage dir on the storage host (`{CI_STORAGE_DIR}/{owner}/{repo}/{slug of local_dir}`).
    pub storage_dir: String,
    /// The work dir to fill: `{work}/{repo}/{repo}`, the runner's default workspace.
    pub local_dir: PathBuf,
    pub max_age: Duration,
    pub connect_timeout: Duration,
    /// The longest wait for any one thing from the storage host (handshake, a read).
    pub stall_timeout: Duration,
    /// The whole load, from connect to the last file.
    pub timeout: Duration,
    /// Checked when set (OpenSSH format); otherwise any host key is accepted, as ci-storage does.
    pub known_hosts: Option<PathBuf>,
    /// The runner user's uid and gid when the files must be theirs (the supervisor is root).
    pub owner: Option<(u32, u32)>,
    /// Where the local meta file goes (`$TMPDIR`, else `/tmp`, like Python's gettempdir).
    pub meta_dir: PathBuf,
    /// Parallel SSH sessions the slot's files are split over.
    pub streams: usize,
    /// How often a load logs its progress (`CI_STORAGE_PROGRESS_SEC`); `None`: never.
    pub progress_every: Option<Duration>,
}

impl Settings {
    /// `{storage root}/{owner}/{repo}/{realpath of local_dir with / turned into _}`.
    /// A root starting with `~/` is relative to the SSH user's home, as ci-storage makes it
    /// (the commands run there, and a quoted `~` would not expand).
    pub fn storage_dir_for(root: &str, repository: &str, local_dir: &Path) -> String {
        let root = root.trim_end_matches('/');
        let dir = format!("{root}/{repository}/{}", slug(local_dir));
        match dir.strip_prefix("~/") {
            Some(relative) => relative.to_string(),
            None => dir,
        }
    }

    /// `/tmp/.ci-storage.meta._mnt_repo_repo`: where `ci-storage load` keeps the local meta.
    pub fn meta_path(&self) -> PathBuf {
        self.meta_dir.join(format!(".ci-storage.meta.{}", normalize_id(&self.local_dir.to_string_lossy())))
    }
}

/// `realpath -m dir | tr / _`.
fn slug(dir: &Path) -> String {
    dir.to_string_lossy().replace('/', "_")
}

/// ci-storage's normalization of ids and paths: `[^a-zA-Z0-9_-]` becomes `_`.
pub fn normalize_id(s: &str) -> String {
    s.chars().map(|c| if c.is_ascii_alphanumeric() || c == '_' || c == '-' { c } else { '_' }).collect()
}

/// A slot as the storage host listed it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Slot {
    pub id: String,
    pub age: Duration,
    pub meta: String,
}

/// The slot `ci-storage load --slot-id='*'` would load: among those not about to be
/// collected, the newest, ties broken by the larger id.
pub fn choose(slots: &[Slot], max_age: Duration) -> Option<&Slot> {
    let limit = max_age.saturating_sub(GC_MARGIN);
    slots.iter().filter(|s| s.age < limit).min_by(|a, b| a.age.cmp(&b.age).then_with(|| b.id.cmp(&a.id)))
}

/// Parses the listing: one `id<TAB>age_sec<TAB>meta` line per slot, meta with `\\`, `\n`
/// and `\r` escaped.
pub fn parse_listing(text: &str) -> Vec<Slot> {
    text.lines()
        .filter_map(|line| {
            let mut parts = line.splitn(3, '\t');
            let id = parts.next()?.to_string();
            let age: u64 = parts.next()?.trim().parse().ok()?;
            let meta = unescape(parts.next().unwrap_or(""));
            if id.is_empty() || id.contains('.') || id.contains('/') {
                return None;
            }
            Some(Slot { id, age: Duration::from_secs(age), meta })
        })
        .collect()
}

fn unescape(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    let mut chars = s.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('r') => out.push('\r'),
            Some(other) => out.push(other),
            None => out.push('\\'),
        }
    }
    out
}

/// The local meta after loading `slot`: its remote meta with the slot's id put first in
/// `full_snapshot_history` (unique, at most 10), hints kept, in ci-storage's two-line form.
pub fn local_meta(remote_meta: &str, slot_id: &str) -> String {
    let field = |name: &str| -> Vec<String> {
        remote_meta
            .lines()
            .find_map(|l| l.strip_prefix(name).and_then(|r| r.strip_prefix('=')))
            .map(|v| v.split_whitespace().map(str::to_string).collect())
            .unwrap_or_default()
    };
    let mut history = vec![slot_id.to_string()];
    for id in field("full_snapshot_history") {
        if !history.contains(&id) {
            history.push(id);
        }
    }
    history.truncate(10);
    let mut hints: Vec<String> = Vec::new();
    for h in field("hints") {
        if !hints.contains(&h) {
            hints.push(h);
        }
    }
    format!("full_snapshot_history={}\nhints={}\n", history.join(" "), hints.join(" "))
}

/// What a load did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Loaded {
    /// The slot loaded; `None` when the storage had no slot young enough (a cold start).
    pub slot: Option<String>,
    /// Entries made (directories included).
    pub files: u64,
    /// Bytes received from the storage host (the listing and the archives).
    pub bytes: u64,
}

/// How far a load has got: counters the writers bump (one atomic add per entry and per
/// chunk written, no lock), read by the progress lines and `/health` whenever they look.
#[derive(Debug, Default)]
pub struct Progress {
    files: AtomicU64,
    bytes: AtomicU64,
    total_files: AtomicU64,
    total_bytes: AtomicU64,
    /// The totals are known (the storage host sent them with the last stream's listing).
    totals: AtomicBool,
}

/// What [`Progress`] held at one moment.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Snapshot {
    /// Entries other than directories made so far (files, links, fifos).
    pub files: u64,
    /// Bytes of file contents written so far.
    pub bytes: u64,
    /// The slot's (files, bytes), counted alike, once the storage host sent them.
    pub totals: Option<(u64, u64)>,
}

impl Progress {
    pub fn snapshot(&self) -> Snapshot {
        let totals = self
            .totals
            .load(Ordering::Acquire)
            .then(|| (self.total_files.load(Ordering::Relaxed), self.total_bytes.load(Ordering::Relaxed)));
        Snapshot { files: self.files.load(Ordering::Relaxed), bytes: self.bytes.load(Ordering::Relaxed), totals }
    }

    fn set_totals(&self, files: u64, bytes: u64) {
        self.total_files.store(files, Ordering::Relaxed);
        self.total_bytes.store(bytes, Ordering::Relaxed);
        self.totals.store(true, Ordering::Release);
    }

    fn add_file(&self) {
        self.files.fetch_add(1, Ordering::Relaxed);
    }

    fn add_bytes(&self, n: u64) {
        self.bytes.fetch_add(n, Ordering::Relaxed);
    }

    /// For other modules' tests: as if a load had got this far.
    #[cfg(test)]
    pub(crate) fn test_advance(&self, files: u64, bytes: u64, totals: Option<(u64, u64)>) {
        self.files.fetch_add(files, Ordering::Relaxed);
        self.add_bytes(bytes);
        if let Some((f, b)) = totals {
            self.set_totals(f, b);
        }
    }
}

impl Snapshot {
    /// The share done, from 0 to 1: the mean of the files' and the bytes' shares, since a
    /// slot of small files costs per file and one of large files per byte. `None` before the
    /// totals are known.
    pub fn fraction(&self) -> Option<f64> {
        let (tf, tb) = self.totals?;
        let share = |done: u64, total: u64| if total == 0 { 1.0 } else { (done as f64 / total as f64).min(1.0) };
        Some(match (tf, tb) {
            (0, 0) => 1.0,
            (_, 0) => share(self.files, tf),
            _ => (share(self.files, tf) + share(self.bytes, tb)) / 2.0,
        })
    }

    /// Bytes of files written per second, over the load so far.
    pub fn rate(&self, elapsed: Duration) -> f64 {
        let secs = elapsed.as_secs_f64();
        if secs <= 0.0 {
            0.0
        } else {
            self.bytes as f64 / secs
        }
    }

    /// The time left at the pace so far; `None` before the totals are known or anything is done.
    pub fn eta(&self, elapsed: Duration) -> Option<Duration> {
        let f = self.fraction()?;
        if f <= 0.0 {
            return None;
        }
        let left = elapsed.as_secs_f64() * (1.0 - f) / f;
        Some(Duration::from_secs_f64(left.clamp(0.0, 365.0 * 86400.0)))
    }

    /// `41,000/100,000 files, 1.2 GB/2.9 GB, 310 MB/s, ETA 5 s` (before the totals:
    /// `41,000 files, 1.2 GB, 310 MB/s`).
    pub fn line(&self, elapsed: Duration) -> String {
        let rate = format!("{}/s", human_bytes(self.rate(elapsed) as u64));
        match self.totals {
            Some((tf, tb)) => {
                let eta = match self.eta(elapsed) {
                    Some(d) => format!("ETA {}", human_secs(d)),
                    None => "ETA unknown".to_string(),
                };
                format!(
                    "{}/{} files, {}/{}, {rate}, {eta}",
                    thousands(self.files),
                    thousands(tf),
                    human_bytes(self.bytes),
                    human_bytes(tb)
                )
            }
            None => format!("{} files, {}, {rate}", thousands(self.files), human_bytes(self.bytes)),
        }
    }
}

/// `1234567` → `1,234,567`.
pub fn thousands(n: u64) -> String {
    let digits = n.to_string();
    let mut out = String::with_capacity(digits.len() + digits.len() / 3);
    for (i, c) in digits.chars().enumerate() {
        if i > 0 && (digits.len() - i).is_multiple_of(3) {
            out.push(',');
        }
        out.push(c);
    }
    out
}

/// Decimal units, as `df -H` and transfer rates are read: `999 B`, `1.2 kB`, `310 MB`, `2.9 GB`.
pub fn human_bytes(n: u64) -> String {
    const UNITS: [&str; 6] = ["kB", "MB", "GB", "TB", "PB", "EB"];
    if n < 1000 {
        return format!("{n} B");
    }
    let mut v = n as f64 / 1000.0;
    let mut unit = 0;
    while v >= 999.95 && unit + 1 < UNITS.len() {
        v /= 1000.0;
        unit += 1;
    }
    if v >= 99.95 {
        format!("{v:.0} {}", UNITS[unit])
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// Whole seconds up to two minutes, then minutes and seconds: `5 s`, `2 min 05 s`.
pub fn human_secs(d: Duration) -> String {
    let s = d.as_secs_f64().round() as u64;
    if s < 120 {
        format!("{s} s")
    } else if s < 3600 {
        format!("{} min {:02} s", s / 60, s % 60)
    } else {
        format!("{} h {:02} min", s / 3600, (s % 3600) / 60)
    }
}

/// Logs `progress` every `every` until `done` is dropped: nothing for a load shorter than that.
fn report(progress: &Progress, started: Instant, every: Duration, done: &Receiver<()>) {
    loop {
        match done.recv_timeout(every) {
            Err(std::sync::mpsc::RecvTimeoutError::Timeout) => {}
            _ => return,
        }
        let snap = progress.snapshot();
        let elapsed = started.elapsed();
        let (total_files, total_bytes) = snap.totals.unzip();
        tracing::info!(
            files = snap.files,
            bytes = snap.bytes,
            total_files,
            total_bytes,
            rate_bytes_per_sec = snap.rate(elapsed) as u64,
            eta_sec = snap.eta(elapsed).map(|d| d.as_secs()),
            "Pre-warm: {}.",
            snap.line(elapsed)
        );
    }
}

#[derive(Debug, thiserror::Error)]
pub enum PrewarmError {
    #[error("failed to resolve {host}")]
    Resolve {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to connect to {host}:{port}")]
    Connect {
        host: String,
        port: u16,
        #[source]
        source: io::Error,
    },
    #[error("failed to {what} with {host}")]
    Ssh {
        what: &'static str,
        host: String,
        #[source]
        source: ssh2::Error,
    },
    #[error("failed to verify the host key of {host}: {reason} (known hosts file {file})")]
    HostKey { host: String, reason: String, file: PathBuf },
    #[error("failed to {what} on {host}: exit status {status}: {stderr}")]
    Remote { what: &'static str, host: String, status: i32, stderr: String },
    #[error("failed to choose the slot on {host}: {reason}")]
    Slot { host: String, reason: String },
    #[error("failed to read from {host}")]
    Read {
        host: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to unpack the slot into {}", path.display())]
    Unpack {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("failed to load within {}s", .0.as_secs())]
    Timeout(Duration),
    #[error("failed to finish: cancelled")]
    Cancelled,
}

/// Shared between the load and whoever waits for it: the load may move its tree into place
/// only if nobody gave up on it first, and once it has, nobody can give up any more.
#[derive(Debug, Default)]
pub struct Gate(AtomicU8);

const RUNNING: u8 = 0;
const COMMITTED: u8 = 1;
const CANCELLED: u8 = 2;
const ABORTED: u8 = 3;

impl Gate {
    /// Stops the load; false when it already moved its tree into place (it is then done or
    /// about to be, and should be waited for).
    pub fn cancel(&self) -> bool {
        self.0.compare_exchange(RUNNING, CANCELLED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
            || self.0.load(Ordering::SeqCst) == CANCELLED
    }

    /// Stops the load from inside (a stream failed): the other streams end at once.
    fn abort(&self) {
        let _ = self.0.compare_exchange(RUNNING, ABORTED, Ordering::SeqCst, Ordering::SeqCst);
    }

    fn is_stopped(&self) -> bool {
        matches!(self.0.load(Ordering::SeqCst), CANCELLED | ABORTED)
    }

    fn commit(&self) -> bool {
        self.0.compare_exchange(RUNNING, COMMITTED, Ordering::SeqCst, Ordering::SeqCst).is_ok()
    }
}

/// Loads the newest slot into `settings.local_dir`. Blocking; bounded by the settings'
/// timeouts and by `gate`. `progress` counts what is done as it goes; every
/// `settings.progress_every` a line says how far it got.
pub fn load(s: &Settings, gate: &Arc<Gate>, progress: &Progress) -> Result<Loaded, PrewarmError> {
    let started = Instant::now();
    let (done, done_rx) = std::sync::mpsc::channel::<()>();
    std::thread::scope(|sc| {
        if let Some(every) = s.progress_every {
            let span = tracing::Span::current();
            let spawned = std::thread::Builder::new().name("prewarm-progress".into()).spawn_scoped(sc, move || {
                let _span = span.enter();
                report(progress, started, every, &done_rx);
            });
            if let Err(e) = spawned {
                tracing::debug!(error = %e, "No progress lines for this pre-warm: the thread did not start.");
            }
        }
        let r = load_quietly(s, gate, progress);
        drop(done);
        r
    })
}

fn load_quietly(s: &Settings, gate: &Arc<Gate>, progress: &Progress) -> Result<Loaded, PrewarmError> {
    let deadline = crate::config::limits::later(Instant::now(), s.timeout);
    let staging = sibling(&s.local_dir, "prewarm");
    let result = fill(s, &staging, gate, progress, deadline).and_then(|filled| {
        let Some((slot, files, bytes)) = filled else { return Ok(None) };
        let _fs = s.owner.map(FsIdentity::assume);
        if !gate.commit() {
            return Err(PrewarmError::Cancelled);
        }
        replace_dir(&staging, &s.local_dir).map_err(|source| PrewarmError::Unpack { path: s.local_dir.clone(), source })?;
        if let Err(e) = write_meta(&s.meta_path(), &local_meta(&slot.meta, &slot.id)) {
            tracing::warn!(path = %s.meta_path().display(), error = %e, "Failed to write the local ci-storage meta; a store in a job will not dedup against the loaded slot.");
        }
        Ok(Some(Loaded { slot: Some(slot.id), files, bytes }))
    });
    match result {
        Ok(Some(loaded)) => Ok(loaded),
        Ok(None) => {
            if let Err(e) = std::fs::remove_file(s.meta_path()) {
                if e.kind() != io::ErrorKind::NotFound {
                    tracing::warn!(path = %s.meta_path().display(), error = %e, "Failed to reset the local ci-storage meta.");
                }
            }
            Ok(Loaded { slot: None, files: 0, bytes: 0 })
        }
        Err(e) => {
            let _fs = s.owner.map(FsIdentity::assume);
            let _ = std::fs::remove_dir_all(&staging);
            Err(e)
        }
    }
}

/// A value one stream publishes and the others wait for.
struct Published<T> {
    value: Mutex<Option<T>>,
    ready: Condvar,
}

impl<T> Default for Published<T> {
    fn default() -> Self {
        Published { value: Mutex::new(None), ready: Condvar::new() }
    }
}

impl<T: Clone> Published<T> {
    fn set(&self, v: T) {
        *self.value.lock().unwrap_or_else(PoisonError::into_inner) = Some(v);
        self.ready.notify_all();
    }

    fn get(&self) -> Option<T> {
        self.value.lock().unwrap_or_else(PoisonError::into_inner).clone()
    }

    /// The value once published; gives up when the load stops or its deadline passes.
    fn wait(&self, gate: &Gate, deadline: Instant, timeout: Duration) -> Result<T, PrewarmError> {
        let mut v = self.value.lock().unwrap_or_else(PoisonError::into_inner);
        loop {
            if let Some(x) = v.as_ref() {
                return Ok(x.clone());
            }
            if gate.is_stopped() {
                return Err(PrewarmError::Cancelled);
            }
            if Instant::now() > deadline {
                return Err(PrewarmError::Timeout(timeout));
            }
            // The gate has no way to wake us: look at it now and then.
            v = self.ready.wait_timeout(v, Duration::from_millis(20)).unwrap_or_else(PoisonError::into_inner).0;
        }
    }
}

/// What the streams of one load share: the slot stream 0 chose (`None`: none young enough),
/// the directories it made, which the other streams fill, and the progress they all count.
struct Shared<'a> {
    slot: Published<Option<Slot>>,
    dirs: Published<Arc<DirState>>,
    progress: &'a Progress,
}

/// How one stream ended.
enum Streamed {
    /// (entries, bytes received)
    Done(u64, u64),
    /// Its session could not be set up; its share is loaded afterwards over stream 0's.
    NoSession(PrewarmError),
}

/// Fills `staging` with the newest slot over `s.streams` sessions started together: each
/// connects, then runs one remote command that lists the slots, chooses the newest and
/// streams its share of the files (stream 0: first the directories, then its share), so a
/// load costs one SSH handshake and one remote shell start-up in wall time, however many
/// streams (issue 21: the storage user's rc file is paid once, not four times in a row).
/// Returns the slot with (entries, bytes received), or `None` for no slot young enough.
fn fill(
    s: &Settings,
    staging: &Path,
    gate: &Gate,
    progress: &Progress,
    deadline: Instant,
) -> Result<Option<(Slot, u64, u64)>, PrewarmError> {
    let k = s.streams.max(1);
    let shared = Shared { slot: Published::default(), dirs: Published::default(), progress };
    let shared = &shared;
    let outcomes: Vec<(Result<Streamed, PrewarmError>, Option<ssh2::Session>)> = std::thread::scope(|sc| {
        let threads: Vec<_> = (0..k)
            .map(|i| {
                sc.spawn(move || {
                    let session = match connect(s) {
                        Ok(session) => session,
                        Err(e) if i > 0 => return (Ok(Streamed::NoSession(e)), None),
                        Err(e) => {
                            gate.abort();
                            return (Err(e), None);
                        }
                    };
                    let r = stream(s, &session, k, i, None, staging, shared, gate, deadline);
                    if r.is_err() {
                        gate.abort();
                    }
                    (r.map(|(f, b)| Streamed::Done(f, b)), Some(session))
                })
            })
            .collect();
        threads.into_iter().map(|t| t.join().unwrap_or_else(|_| (Err(panicked(staging)), None))).collect()
    });
    let (mut files, mut bytes) = (0, 0);
    let mut first_error = None;
    let mut missing = Vec::new();
    let mut first_session = None;
    for (i, (r, session)) in outcomes.into_iter().enumerate() {
        if i == 0 {
            first_session = session;
        }
        match r {
            Ok(Streamed::Done(f, b)) => {
                files += f;
                bytes += b;
            }
            Ok(Streamed::NoSession(e)) => missing.push((i, e)),
            // A stream that stopped because another failed is not the story.
            Err(PrewarmError::Cancelled) if first_error.is_none() => first_error = Some(PrewarmError::Cancelled),
            Err(PrewarmError::Cancelled) => {}
            Err(e) => {
                if matches!(first_error, None | Some(PrewarmError::Cancelled)) {
                    first_error = Some(e);
                }
            }
        }
    }
    if let Some(e) = first_error {
        return Err(e);
    }
    let Some(slot) = shared.slot.get().flatten() else {
        return Ok(None);
    };
    if let (Some(session), false) = (&first_session, missing.is_empty()) {
        for (i, e) in missing {
            tracing::debug!(stream = i, error = %e, "A stream had no session; its share goes over the first one.");
            let (f, b) = stream(s, session, k, i, Some(&slot.id), staging, shared, gate, deadline)?;
            files += f;
            bytes += b;
        }
    }
    let dirs = shared.dirs.get().ok_or_else(|| PrewarmError::Unpack {
        path: staging.to_path_buf(),
        source: invalid("no directories in the archive"),
    })?;
    let _fs = s.owner.map(FsIdentity::assume);
    dirs.finish()?;
    Ok(Some((slot, files, bytes)))
}

fn panicked(path: &Path) -> PrewarmError {
    PrewarmError::Unpack { path: path.to_path_buf(), source: io::Error::other("a pre-warm thread panicked") }
}

/// Makes the empty, private directory the tree is built in.
fn make_staging(s: &Settings, staging: &Path) -> Result<(), PrewarmError> {
    let _fs = s.owner.map(FsIdentity::assume);
    let unpack_err = |source| PrewarmError::Unpack { path: s.local_dir.clone(), source };
    if let Some(parent) = staging.parent() {
        std::fs::DirBuilder::new().recursive(true).mode(0o755).create(parent).map_err(unpack_err)?;
    }
    let _ = std::fs::remove_dir_all(staging);
    std::fs::DirBuilder::new().mode(0o700).create(staging).map_err(unpack_err)
}

/// Stream `i` of `k`: runs [`stream_command`], reads the listing it starts with, and agrees on
/// the slot (stream 0 chooses it, and makes the staging dir; the others check that their
/// storage host chose the same); then the archive is read on this thread and unpacked on
/// another (as the runner user). Returns (entries, bytes received).
#[expect(clippy::too_many_arguments, reason = "one stream's whole context, passed down once")]
fn stream(
    s: &Settings,
    session: &ssh2::Session,
    k: usize,
    i: usize,
    slot: Option<&str>,
    staging: &Path,
    shared: &Shared<'_>,
    gate: &Gate,
    deadline: Instant,
) -> Result<(u64, u64), PrewarmError> {
    let host = &s.host.host;
    let mut channel = session.channel_session().map_err(|e| ssh_err("open a channel", host, e))?;
    let limit = s.max_age.saturating_sub(GC_MARGIN);
    channel
        .exec(&stream_command(&s.storage_dir, limit, k, i, slot))
        .map_err(|e| ssh_err("start the load on the storage host", host, e))?;
    let (mut header, mut rest) = read_header(s, &mut channel, Vec::new(), header_end, gate, deadline)?;
    let (slots, chosen) = parse_header(&String::from_utf8_lossy(&header));
    if i + 1 == k && chosen.is_some() {
        // The last stream follows the chosen line with the slot's totals, for the ETA.
        let (line, after) = read_header(s, &mut channel, rest, line_end, gate, deadline)?;
        match parse_totals(&String::from_utf8_lossy(&line)) {
            Some((files, bytes)) => shared.progress.set_totals(files, bytes),
            None => {
                return Err(PrewarmError::Slot {
                    host: host.clone(),
                    reason: "the slot's totals were not sent after the listing".into(),
                })
            }
        }
        header.extend_from_slice(&line);
        rest = after;
    }
    let slot_err = |reason: String| PrewarmError::Slot { host: host.clone(), reason };
    let agreed = if i == 0 && slot.is_none() {
        let expected = choose(&slots, s.max_age).cloned();
        if expected.as_ref().map(|x| x.id.as_str()) != chosen.as_deref() {
            return Err(slot_err(format!(
                "the storage host chose {:?} where the listing gives {:?}",
                chosen,
                expected.map(|x| x.id)
            )));
        }
        match &expected {
            Some(x) => {
                tracing::info!(slot = %x.id, age_sec = x.age.as_secs(), storage_dir = %s.storage_dir, streams = k, "Loading the newest slot.");
                make_staging(s, staging)?;
            }
            None => {
                tracing::info!(storage_dir = %s.storage_dir, slots = slots.len(), "No slot young enough to load; starting cold.")
            }
        }
        shared.slot.set(expected.clone());
        expected
    } else {
        let agreed = shared.slot.wait(gate, deadline, s.timeout)?;
        if agreed.as_ref().map(|x| x.id.as_str()) != chosen.as_deref() {
            // A slot stored between the streams' listings: rare, and a cold start is safe.
            return Err(slot_err(format!(
                "stream {i} was given {chosen:?} where stream 0 has {:?} (a slot stored mid-load)",
                agreed.map(|x| x.id)
            )));
        }
        agreed
    };
    let header_bytes = header.len() as u64;
    if agreed.is_none() {
        let mut tail = Vec::new();
        let _ = Read::by_ref(&mut channel).take(4096).read_to_end(&mut tail);
        remote_exit(&mut channel, "list the slots", host, false)?;
        return Ok((0, header_bytes));
    }

    let (tx, rx) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT);
    // Spent chunks come back for reuse: no allocation (and no fresh pages) per chunk.
    let (free_tx, free_rx) = sync_channel::<Vec<u8>>(CHUNKS_IN_FLIGHT + 2);
    let dirs = if i == 0 && slot.is_none() {
        Dirs::Create(&shared.dirs)
    } else {
        Dirs::Wait(&shared.dirs, deadline, s.timeout)
    };
    let progress = shared.progress;
    std::thread::scope(|sc| {
        let writer = sc.spawn(move || {
            let _fs = s.owner.map(FsIdentity::assume);
            unpack_stream(ChunkReader::new(rx, free_tx), staging, dirs, gate, progress)
        });
        let read = pump(s, &mut channel, rest, gate, deadline, tx, free_rx).map(|b| b + header_bytes);
        finish_pair(read, writer.join(), gate, staging)
    })
}

/// Reads what the remote command sends before the archive, after `buf` (already read), up
/// to where `end` says it ends: the listing that every stream starts with, up to its last
/// line (a tab, then the chosen slot's id or nothing, [`header_end`]), or the last stream's totals
/// line ([`line_end`]). Returns it and the archive bytes read past it.
fn read_header(
    s: &Settings,
    channel: &mut ssh2::Channel,
    mut buf: Vec<u8>,
    end: fn(&[u8]) -> Option<usize>,
    gate: &Gate,
    deadline: Instant,
) -> Result<(Vec<u8>, Vec<u8>), PrewarmError> {
    let host = &s.host.host;
    buf.reserve(64 * 1024);
    let mut chunk = vec![0u8; 64 * 1024];
    loop {
        if let Some(end) = end(&buf) {
            let rest = buf.split_off(end);
            return Ok((buf, rest));
        }
        if gate.is_stopped() {
            return Err(PrewarmError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(PrewarmError::Timeout(s.timeout));
        }
        match channel.read(&mut chunk) {
            Ok(0) => {
                // The remote command ended before its listing did: its stderr says why.
                remote_exit(channel, "list the slots", host, true)?;
                return Err(PrewarmError::Slot { host: host.clone(), reason: "the listing ended early".into() });
            }
            Ok(n) if buf.len() + n > MAX_LISTING => {
                return Err(PrewarmError::Slot { host: host.clone(), reason: "a listing over 64 MiB".into() })
            }
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
            Err(source) => return Err(PrewarmError::Read { host: host.clone(), source }),
        }
    }
}

/// Where the listing ends: after the first line that starts with a tab.
fn header_end(buf: &[u8]) -> Option<usize> {
    let mut start = 0;
    while let Some(nl) = buf[start..].iter().position(|&b| b == b'\n') {
        if buf.get(start) == Some(&b'\t') {
            return Some(start + nl + 1);
        }
        start += nl + 1;
    }
    None
}

/// Where the first line ends.
fn line_end(buf: &[u8]) -> Option<usize> {
    buf.iter().position(|&b| b == b'\n').map(|nl| nl + 1)
}

/// The last stream's totals line, `<TAB><TAB>files<TAB>bytes`.
fn parse_totals(line: &str) -> Option<(u64, u64)> {
    let rest = line.trim_end_matches('\n').strip_prefix("\t\t")?;
    let (files, bytes) = rest.split_once('\t')?;
    Some((files.parse().ok()?, bytes.parse().ok()?))
}

/// The listing's slots and the id the storage host chose (`None`: no slot young enough).
fn parse_header(text: &str) -> (Vec<Slot>, Option<String>) {
    let (listing, last) = match text.trim_end_matches('\n').rsplit_once('\n') {
        Some((listing, last)) => (listing, last),
        None => ("", text.trim_end_matches('\n')),
    };
    let chosen = last.strip_prefix('\t').filter(|id| !id.is_empty()).map(str::to_string);
    (parse_listing(listing), chosen)
}

/// One stream's outcome from its reader's and its writer's: the reader's error first (the
/// writer may have taken a cut-off stream for a short archive), then the writer's. Any
/// failure stops the other streams.
fn finish_pair(
    read: Result<u64, PrewarmError>,
    written: std::thread::Result<Result<u64, PrewarmError>>,
    gate: &Gate,
    staging: &Path,
) -> Result<(u64, u64), PrewarmError> {
    let written = written.unwrap_or_else(|_| Err(panicked(staging)));
    let out = match (read, written) {
        (Ok(bytes), Ok(entries)) => return Ok((entries, bytes)),
        (Err(e), _) | (Ok(_), Err(e)) => e,
    };
    gate.abort();
    Err(out)
}

/// Feeds the rest of the remote command's stdout (after `first`, already read) to the
/// writer in whole chunks; then checks that it exited 0 and said nothing on stderr.
/// Returns the bytes read.
fn pump(
    s: &Settings,
    channel: &mut ssh2::Channel,
    first: Vec<u8>,
    gate: &Gate,
    deadline: Instant,
    tx: SyncSender<Vec<u8>>,
    free_rx: Receiver<Vec<u8>>,
) -> Result<u64, PrewarmError> {
    let host = &s.host.host;
    let mut bytes = first.len() as u64;
    if !first.is_empty() && tx.send(first).is_err() {
        return Ok(bytes);
    }
    loop {
        if gate.is_stopped() {
            return Err(PrewarmError::Cancelled);
        }
        if Instant::now() > deadline {
            return Err(PrewarmError::Timeout(s.timeout));
        }
        let mut buf = free_rx.try_recv().unwrap_or_else(|_| Vec::with_capacity(CHUNK));
        buf.resize(CHUNK, 0);
        // Fill the whole chunk: one read returns at most one SSH packet.
        let mut filled = 0;
        let mut eof = false;
        while filled < CHUNK {
            match channel.read(&mut buf[filled..]) {
                Ok(0) => {
                    eof = true;
                    break;
                }
                Ok(n) => filled += n,
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(source) => return Err(PrewarmError::Read { host: host.clone(), source }),
            }
        }
        bytes += filled as u64;
        buf.truncate(filled);
        if filled > 0 && tx.send(buf).is_err() {
            // The writer stopped; its error is the one to report.
            return Ok(bytes);
        }
        if eof {
            break;
        }
    }
    drop(tx);
    remote_exit(channel, "stream the slot", host, true)?;
    Ok(bytes)
}

fn ssh_err(what: &'static str, host: &str, source: ssh2::Error) -> PrewarmError {
    PrewarmError::Ssh { what, host: host.to_string(), source }
}

/// Connects, checks the host key, authenticates.
fn connect(s: &Settings) -> Result<ssh2::Session, PrewarmError> {
    let host = &s.host.host;
    let addrs: Vec<_> = (host.as_str(), s.host.port)
        .to_socket_addrs()
        .map_err(|source| PrewarmError::Resolve { host: host.clone(), source })?
        .collect();
    // IPv4 first: host.docker.internal may resolve to an IPv6 address nothing listens on.
    let mut ordered: Vec<_> =
        addrs.iter().filter(|a| a.is_ipv4()).chain(addrs.iter().filter(|a| a.is_ipv6())).collect();
    ordered.dedup();
    let mut last = io::Error::new(io::ErrorKind::NotFound, "no address");
    let mut tcp = None;
    for addr in ordered {
        match TcpStream::connect_timeout(addr, s.connect_timeout) {
            Ok(t) => {
                tcp = Some(t);
                break;
            }
            Err(e) => last = e,
        }
    }
    let tcp = tcp.ok_or(PrewarmError::Connect { host: host.clone(), port: s.host.port, source: last })?;
    let _ = tcp.set_nodelay(true);
    let mut session = ssh2::Session::new().map_err(|e| ssh_err("start an SSH session", host, e))?;
    for way in [ssh2::MethodType::CryptCs, ssh2::MethodType::CryptSc] {
        session.method_pref(way, CIPHERS).map_err(|e| ssh_err("choose the ciphers", host, e))?;
    }
    session.set_tcp_stream(tcp);
    session.set_timeout(u32::try_from(s.stall_timeout.as_millis()).unwrap_or(u32::MAX).max(1));
    session.handshake().map_err(|e| ssh_err("complete the SSH handshake", host, e))?;
    check_host_key(&session, s)?;
    session
        .userauth_pubkey_memory(&s.user, None, s.key.expose(), None)
        .map_err(|e| ssh_err("authenticate with CI_STORAGE_PRIVATE_KEY", &format!("{}@{host}", s.user), e))?;
    Ok(session)
}

/// The ciphers offered, best first, chosen by measurement (BENCHMARKS.md, issue 21): the
/// whole slot is decrypted on this side, so the cipher is most of a load's CPU. ChaCha20 and
/// Poly1305 both come from OpenSSL's vector code (vendor/libssh2-sys/CI-RUNNER.md). libssh2's
/// AES-GCM, even patched to hand OpenSSL a packet's middle blocks in one call, measured 1.7x
/// the client CPU of ChaCha20 on an AES-NI CPU (512 MiB: 1.63 s against 0.98 s), although
/// OpenSSH's own AES-GCM is the faster there. So ChaCha20-Poly1305 leads on every CPU;
/// AES-GCM and AES-CTR are for a server without it.
const CIPHERS: &str =
    "chacha20-poly1305@openssh.com,aes128-gcm@openssh.com,aes256-gcm@openssh.com,aes128-ctr,aes256-ctr";

/// The default number of streams: one per core this process may use, which
/// `available_parallelism` counts with the affinity mask and the cgroup CPU quota
/// (`cpu.max`, or v1's `cpu.cfs_quota_us`) taken into account, so a container limited to
/// 1.5 CPUs on a 64-core host gets 1, not 64. Each stream is one session's decryption
/// and one writer; at most 8, where the storage host's disk, not our CPU, is the limit.
pub fn default_streams() -> usize {
    streams_for(std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1))
}

fn streams_for(cpus: usize) -> usize {
    cpus.clamp(1, 8)
}

fn check_host_key(session: &ssh2::Session, s: &Settings) -> Result<(), PrewarmError> {
    let host = &s.host.host;
    let (key, _) = session.host_key().ok_or_else(|| PrewarmError::HostKey {
        host: host.clone(),
        reason: "the server sent no host key".into(),
        file: s.known_hosts.clone().unwrap_or_default(),
    })?;
    let fingerprint = session.host_key_hash(ssh2::HashType::Sha256).map(hex).unwrap_or_default();
    let Some(file) = &s.known_hosts else {
        tracing::debug!(host = %host, sha256 = %fingerprint, "Storage host key accepted (no known hosts file).");
        return Ok(());
    };
    let err = |reason: String| PrewarmError::HostKey { host: host.clone(), reason, file: file.clone() };
    let mut known = session.known_hosts().map_err(|e| err(e.to_string()))?;
    known.read_file(file, ssh2::KnownHostFileKind::OpenSSH).map_err(|e| err(format!("unreadable: {e}")))?;
    match known.check_port(host, s.host.port, key) {
        ssh2::CheckResult::Match => Ok(()),
        ssh2::CheckResult::Mismatch => Err(err(format!("the key (sha256 {fingerprint}) does not match"))),
        ssh2::CheckResult::NotFound => Err(err(format!("no entry for the host (its key: sha256 {fingerprint})"))),
        ssh2::CheckResult::Failure => Err(err("the check failed".into())),
    }
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Quotes one argument for the remote POSIX shell.
fn sh_quote(s: &str) -> String {
    format!("'{}'", s.replace('\'', r"'\''"))
}

/// The one remote command of stream `i` of `k`, read-only but for touching the slot:
///
/// 1. LIST_SLOTS: every directory of the storage dir whose name holds no `.` (tmp and bak
///    dirs do), as `id<TAB>age<TAB>escaped meta` lines; then `<TAB>id` for the slot
///    `ci-storage load --slot-id='*'` would load (`slot` when given; nothing for none), chosen
///    by [`choose`]'s rule, which the client checks against the listing.
/// 2. The slot touched by stream 0 (as LIST_SLOTS touches the newest slot), so that
///    ci-storage's GC keeps it while it is read; only there, before its archive reads the
///    slot's own mtime, so that the loaded root has the mtime the slot keeps.
/// 3. GNU tar of this stream's share as a POSIX (pax) archive: every `k`-th of the slot's
///    entries that are not directories, in `find` order (no side stats a file to split the
///    work; every stream computes the same split); stream 0 sends all the directories first.
///    The last stream walks the whole slot before its archive starts and sends
///    `<TAB><TAB>files<TAB>bytes` first: the slot's entries other than directories and the
///    bytes of its files, from the same walk, for the progress's ETA. Only its walk stats
///    each file (the others' `find` reads the types from the directories), and it is off
///    the critical path: no stream's files can be unpacked before stream 0's directories
///    have come, which is when stream 0's own walk is over.
///
/// perl is what ci-storage needs on the storage host anyway; the shell the storage user's
/// login runs starts once per stream, and the streams start together.
fn stream_command(storage_dir: &str, limit: Duration, k: usize, i: usize, slot: Option<&str>) -> String {
    const SCRIPT: &str = r#"use strict; my ($d, $limit, $k, $i, $want) = @ARGV; my $now = time; my ($best, $best_age);
$| = 1; if (opendir(my $dh, $d)) { for my $n (sort readdir $dh) { next if $n =~ /[.\t\n\r\\]/;
my $p = "$d/$n"; my @st = lstat $p; next unless @st && -d _;
my $meta = ""; if (open(my $fh, "<", "$p/.ci-storage.meta")) { local $/; $meta = <$fh> // ""; close $fh; }
$meta =~ s/\\/\\\\/g; $meta =~ s/\n/\\n/g; $meta =~ s/\r/\\r/g; my $age = $now - $st[10]; $age = 0 if $age < 0;
print "$n\t$age\t$meta\n";
if ($want ne "" ? $n eq $want : ($age < $limit && (!defined $best || $age < $best_age || ($age == $best_age && $n gt $best)))) {
($best, $best_age) = ($n, $age); } } }
print "\t", $best // "", "\n"; exit 0 unless defined $best;
chdir "$d/$best" or die "failed to enter $d/$best: $!\n";
if ($i == 0) { utime(undef, undef, ".") or die "failed to touch $d/$best: $!\n"; }
my $last = $i == $k - 1;
open(my $find, "-|", "find", ".", "-printf", $last ? '%y%s %p\0' : '%y0 %p\0') or die "failed to start find: $!\n";
my @tar = ("tar", "--format=posix", "--pax-option=delete=atime,delete=ctime", "--exclude=.ci-storage.meta",
"--numeric-owner", "--null", "--no-recursion", "--hard-dereference", "-cf", "-", "-T", "-"); my $tar;
unless ($last) { open($tar, "|-", @tar) or die "failed to start tar: $!\n"; }
$/ = "\0"; my ($seen, $files, $bytes) = (0, 0, 0); my (@dirs, @mine); while (my $e = <$find>) { chomp $e;
my $sp = index($e, " "); my ($y, $size, $path) = (substr($e, 0, 1), substr($e, 1, $sp - 1), substr($e, $sp + 1));
next if substr($path, -17) eq "/.ci-storage.meta";
if ($y eq "d") { if ($i == 0) { if ($last) { push @dirs, $path; } else { print $tar "$path\0"; } } next; }
$files++; $bytes += $size if $y eq "f";
if ($seen++ % $k == $i) { if ($i == 0 || $last) { push @mine, $path; } else { print $tar "$path\0"; } } }
close $find or die "find failed\n";
if ($last) { print "\t\t$files\t$bytes\n"; open($tar, "|-", @tar) or die "failed to start tar: $!\n"; print $tar "$_\0" for @dirs; }
print $tar "$_\0" for @mine; close $tar or die "tar failed\n";"#;
    format!(
        "perl -we {} {} {} {k} {i} {}",
        sh_quote(SCRIPT),
        sh_quote(storage_dir),
        limit.as_secs_f64(),
        sh_quote(slot.unwrap_or(""))
    )
}

/// Waits for the remote command's end; a non-zero status is an error carrying its stderr,
/// and so is any stderr at all when `quiet` (find or perl failing inside a pipeline that tar
/// ends: tar's status alone would hide a tree read in part).
fn remote_exit(ch: &mut ssh2::Channel, what: &'static str, host: &str, quiet: bool) -> Result<(), PrewarmError> {
    let mut stderr = String::new();
    let _ = ch.stderr().take(4096).read_to_string(&mut stderr);
    let _ = ch.wait_close();
    let status = ch.exit_status().unwrap_or(-1);
    if status == 0 && (!quiet || stderr.trim().is_empty()) {
        return Ok(());
    }
    Err(PrewarmError::Remote {
        what,
        host: host.to_string(),
        status,
        stderr: stderr.trim().lines().take(5).collect::<Vec<_>>().join("; "),
    })
}

/// Reads the chunks the network thread sends.
struct ChunkReader {
    rx: Receiver<Vec<u8>>,
    spent: SyncSender<Vec<u8>>,
    cur: Vec<u8>,
    pos: usize,
}

impl ChunkReader {
    fn new(rx: Receiver<Vec<u8>>, spent: SyncSender<Vec<u8>>) -> Self {
        ChunkReader { rx, spent, cur: Vec::new(), pos: 0 }
    }
}

impl Read for ChunkReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        while self.pos == self.cur.len() {
            match self.rx.recv() {
                Ok(chunk) => {
                    let _ = self.spent.try_send(std::mem::replace(&mut self.cur, chunk));
                    self.pos = 0;
                }
                Err(_) => return Ok(0),
            }
        }
        let n = buf.len().min(self.cur.len() - self.pos);
        buf[..n].copy_from_slice(&self.cur[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// The hidden sibling the tree is built in, and where an old work dir is moved aside.
fn sibling(local_dir: &Path, what: &str) -> PathBuf {
    let name = local_dir.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default();
    local_dir.with_file_name(format!(".{name}.ci-runner-{what}.{}", std::process::id()))
}

/// Moves `staging` to `dir`; an empty `dir` is removed first, a non-empty one moved aside
/// and removed after (as `ci-storage load`'s `--delete` would have removed its content).
fn replace_dir(staging: &Path, dir: &Path) -> io::Result<()> {
    match std::fs::remove_dir(dir) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(_) => {
            let old = sibling(dir, "old");
            std::fs::rename(dir, &old)?;
            std::fs::rename(staging, dir)?;
            let _ = std::fs::remove_dir_all(&old);
            return Ok(());
        }
    }
    std::fs::rename(staging, dir)
}

fn write_meta(path: &Path, meta: &str) -> io::Result<()> {
    let tmp = path.with_file_name(format!(
        "{}.tmp.{}",
        path.file_name().map(|n| n.to_string_lossy().into_owned()).unwrap_or_default(),
        std::process::id()
    ));
    let mut f = OpenOptions::new().write(true).create_new(true).mode(0o644).open(&tmp)?;
    f.write_all(meta.as_bytes())?;
    drop(f);
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

/// This thread's filesystem uid and gid set to the runner user's, restored on drop.
/// `setfsuid` is per thread: the rest of the supervisor keeps root.
struct FsIdentity;

impl FsIdentity {
    fn assume((uid, gid): (u32, u32)) -> FsIdentity {
        // SAFETY: plain syscalls on this thread's credentials.
        unsafe {
            libc::setfsgid(gid);
            libc::setfsuid(uid);
        }
        FsIdentity
    }
}

impl Drop for FsIdentity {
    fn drop(&mut self) {
        // SAFETY: as above; back to the thread's real ids.
        unsafe {
            libc::setfsuid(libc::geteuid());
            libc::setfsgid(libc::getegid());
        }
    }
}

/// Attributes applied to a directory once everything inside it exists.
struct DirAttrs {
    path: PathBuf,
    mode: u32,
    mtime: libc::timespec,
}

/// The directories an archive created: the only places its entries may land.
#[derive(Default)]
pub struct DirState {
    known: HashSet<PathBuf>,
    attrs: Vec<DirAttrs>,
}

impl DirState {
    /// Innermost first: a directory's mtime goes after its last change, a read-only mode
    /// after its last entry.
    fn finish(&self) -> Result<(), PrewarmError> {
        let err = |path: &Path, source: io::Error| PrewarmError::Unpack { path: path.to_path_buf(), source };
        for d in self.attrs.iter().rev() {
            std::fs::set_permissions(&d.path, std::fs::Permissions::from_mode(d.mode)).map_err(|e| err(&d.path, e))?;
            set_times_nofollow(&d.path, d.mtime).map_err(|e| err(&d.path, e))?;
        }
        Ok(())
    }
}

/// Whether a stream makes the directories (stream 0: they come first in its archive, and it
/// publishes them at its first other entry) or waits for them and only fills them (the rest,
/// which run in parallel and share the set read-only).
enum Dirs<'a> {
    Create(&'a Published<Arc<DirState>>),
    Wait(&'a Published<Arc<DirState>>, Instant, Duration),
}

/// Unpacks one tar stream into `root` (an empty directory we just made): see [`unpack_stream`].
pub fn unpack(archive: impl Read, root: &Path, gate: &Gate) -> Result<u64, PrewarmError> {
    let dirs = Published::default();
    let n = unpack_stream(archive, root, Dirs::Create(&dirs), gate, &Progress::default())?;
    if let Some(d) = dirs.get() {
        d.finish()?;
    }
    Ok(n)
}

/// Regular files, directories, symlinks, fifos; hard links become copies (as `rsync -a`
/// without `-H` makes); mode and nanosecond mtime on everything (directories' are left to
/// [`DirState::finish`]). An entry may only land in a directory that this load created, so
/// nothing is written through a symlink or outside `root`.
/// Counts every entry but directories, and the bytes of files, in `progress`.
fn unpack_stream(
    archive: impl Read,
    root: &Path,
    dirs: Dirs<'_>,
    gate: &Gate,
    progress: &Progress,
) -> Result<u64, PrewarmError> {
    let err = |path: &Path, source: io::Error| PrewarmError::Unpack { path: path.to_path_buf(), source };
    let mut ar = tar::Archive::new(archive);
    let mut files: HashSet<PathBuf> = HashSet::new();
    let mut buf = vec![0u8; CHUNK];
    let mut count = 0u64;
    // Exactly one of the two: the directories being made, or those made (by us or stream 0).
    let (mut making, publish, mut made) = match dirs {
        Dirs::Create(publish) => {
            let mut d = DirState::default();
            d.known.insert(PathBuf::new());
            (Some(d), Some(publish), None)
        }
        Dirs::Wait(published, deadline, timeout) => (None, None, Some(published.wait(gate, deadline, timeout)?)),
    };
    let freeze = |making: &mut Option<DirState>, made: &mut Option<Arc<DirState>>| {
        if let (Some(d), Some(p)) = (making.take(), publish) {
            let d = Arc::new(d);
            p.set(d.clone());
            *made = Some(d);
        }
    };
    for entry in ar.entries().map_err(|e| err(root, e))? {
        if gate.is_stopped() {
            return Err(PrewarmError::Cancelled);
        }
        let mut entry = entry.map_err(|e| err(root, e))?;
        let kind = entry.header().entry_type();
        if kind.is_pax_global_extensions() || kind.is_pax_local_extensions() || kind.is_gnu_longname() {
            continue;
        }
        let raw_path = entry.path().map_err(|e| err(root, e))?.into_owned();
        let rel = relative(&raw_path).ok_or_else(|| err(&raw_path, invalid("an unsafe path in the archive")))?;
        let dest = root.join(&rel);
        let mode = entry.header().mode().map_err(|e| err(&dest, e))? & 0o7777;
        let mtime = mtime_of(&mut entry).map_err(|e| err(&dest, e))?;
        if !kind.is_dir() {
            freeze(&mut making, &mut made);
        }
        if rel.as_os_str().is_empty() {
            if let (true, Some(d)) = (kind.is_dir(), &mut making) {
                d.attrs.push(DirAttrs { path: dest, mode, mtime });
            }
            continue;
        }
        let known = match (&making, &made) {
            (Some(d), _) => &d.known,
            (None, Some(d)) => &d.known,
            (None, None) => return Err(err(&dest, invalid("no directories"))),
        };
        let parent = rel.parent().unwrap_or(Path::new("")).to_path_buf();
        if !known.contains(&parent) {
            return Err(err(&dest, invalid("an entry outside the directories of the archive")));
        }
        if kind.is_dir() {
            let Some(d) = &mut making else {
                return Err(err(&dest, invalid("a directory in a stream of files")));
            };
            std::fs::DirBuilder::new().mode(0o700).create(&dest).map_err(|e| err(&dest, e))?;
            d.known.insert(rel);
            d.attrs.push(DirAttrs { path: dest, mode, mtime });
        } else if kind.is_file() || kind == tar::EntryType::Continuous {
            let mut f = create_file(&dest).map_err(|e| err(&dest, e))?;
            loop {
                let n = entry.read(&mut buf).map_err(|e| err(&dest, e))?;
                if n == 0 {
                    break;
                }
                f.write_all(&buf[..n]).map_err(|e| err(&dest, e))?;
                progress.add_bytes(n as u64);
            }
            finish_file(&f, mode, mtime).map_err(|e| err(&dest, e))?;
            files.insert(rel);
        } else if kind.is_hard_link() {
            let target = entry
                .link_name()
                .map_err(|e| err(&dest, e))?
                .and_then(|t| relative(&t))
                .filter(|t| files.contains(t))
                .ok_or_else(|| err(&dest, invalid("a hard link to a file not in the archive")))?;
            let mut src = File::open(root.join(&target)).map_err(|e| err(&dest, e))?;
            let mut f = create_file(&dest).map_err(|e| err(&dest, e))?;
            let n = io::copy(&mut src, &mut f).map_err(|e| err(&dest, e))?;
            progress.add_bytes(n);
            finish_file(&f, mode, mtime).map_err(|e| err(&dest, e))?;
            files.insert(rel);
        } else if kind.is_symlink() {
            let target = entry
                .link_name()
                .map_err(|e| err(&dest, e))?
                .ok_or_else(|| err(&dest, invalid("a symlink without a target")))?;
            std::os::unix::fs::symlink(&target, &dest).map_err(|e| err(&dest, e))?;
            set_times_nofollow(&dest, mtime).map_err(|e| err(&dest, e))?;
        } else if kind.is_fifo() {
            nix::unistd::mkfifo(&dest, nix::sys::stat::Mode::from_bits_truncate(0o600))
                .map_err(|e| err(&dest, io::Error::from(e)))?;
            std::fs::set_permissions(&dest, std::fs::Permissions::from_mode(mode)).map_err(|e| err(&dest, e))?;
            set_times_nofollow(&dest, mtime).map_err(|e| err(&dest, e))?;
        } else {
            // Devices (and anything else) cannot be made by the runner user; rsync -a run as
            // that user skips them too.
            tracing::debug!(path = %rel.display(), kind = ?kind, "Skipped an entry that is not a file, directory or link.");
            progress.add_file();
            continue;
        }
        if !kind.is_dir() {
            progress.add_file();
        }
        count += 1;
    }
    freeze(&mut making, &mut made);
    Ok(count)
}

fn invalid(msg: &str) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg.to_string())
}

/// `./a/b` → `a/b`; `.` or `./` → empty; absolute paths and `..` → None.
fn relative(p: &Path) -> Option<PathBuf> {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::Normal(n) => out.push(n),
            Component::ParentDir | Component::RootDir | Component::Prefix(_) => return None,
        }
    }
    Some(out)
}

fn create_file(path: &Path) -> io::Result<File> {
    OpenOptions::new().write(true).create_new(true).mode(0o600).custom_flags(libc::O_NOFOLLOW).open(path)
}

fn finish_file(f: &File, mode: u32, mtime: libc::timespec) -> io::Result<()> {
    f.set_permissions(std::fs::Permissions::from_mode(mode))?;
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, mtime];
    // SAFETY: a valid fd and a two-element array, as futimens requires.
    if unsafe { libc::futimens(f.as_raw_fd(), times.as_ptr()) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

fn set_times_nofollow(path: &Path, mtime: libc::timespec) -> io::Result<()> {
    let c = CString::new(path.as_os_str().as_bytes()).map_err(|_| invalid("a path with a NUL byte"))?;
    let times = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, mtime];
    // SAFETY: a NUL-terminated path and a two-element array, as utimensat requires.
    if unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), times.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// The entry's mtime: the pax `mtime` record (`sec[.frac]`, nanoseconds) when there is one,
/// else the header's whole seconds.
fn mtime_of<R: Read>(entry: &mut tar::Entry<'_, R>) -> io::Result<libc::timespec> {
    if let Some(exts) = entry.pax_extensions()? {
        for ext in exts {
            let ext = ext?;
            if ext.key() == Ok("mtime") {
                if let Some(ts) = ext.value().ok().and_then(parse_pax_time) {
                    return Ok(ts);
                }
            }
        }
    }
    let secs = entry.header().mtime()?;
    Ok(libc::timespec { tv_sec: secs as libc::time_t, tv_nsec: 0 })
}

/// `1700000000.123456789` (or `-1.5`) as a timespec.
fn parse_pax_time(s: &str) -> Option<libc::timespec> {
    let (neg, s) = match s.strip_prefix('-') {
        Some(rest) => (true, rest),
        None => (false, s),
    };
    let (sec, frac) = s.split_once('.').unwrap_or((s, ""));
    let sec: i64 = sec.parse().ok()?;
    if !frac.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let mut digits: String = frac.chars().take(9).collect();
    while digits.len() < 9 {
        digits.push('0');
    }
    let nsec: i64 = digits.parse().ok()?;
    let (sec, nsec) = if neg && nsec > 0 {
        (-sec - 1, 1_000_000_000 - nsec)
    } else if neg {
        (-sec, 0)
    } else {
        (sec, nsec)
    };
    Some(libc::timespec { tv_sec: sec as libc::time_t, tv_nsec: nsec as libc::c_long })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn slot(id: &str, age: u64) -> Slot {
        Slot { id: id.into(), age: Duration::from_secs(age), meta: String::new() }
    }

    #[test]
    fn storage_host_forms() {
        assert_eq!(
            StorageHost::parse("guest@10.0.0.1:10022"),
            Some(StorageHost { user: Some("guest".into()), host: "10.0.0.1".into(), port: 10022 })
        );
        assert_eq!(StorageHost::parse("127.0.0.1:10022").map(|h| h.port), Some(10022));
        assert_eq!(StorageHost::parse("storage").map(|h| (h.host, h.port)), Some(("storage".into(), 22)));
        assert_eq!(StorageHost::parse("[::1]:2222").map(|h| (h.host, h.port)), Some(("::1".into(), 2222)));
        for bad in ["", "@host", "host:0", "a b", "user@", "host:99999"] {
            assert_eq!(StorageHost::parse(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn storage_dir_is_what_the_action_derives() {
        let d = Settings::storage_dir_for("/mnt", "octo-org/octo-repo", Path::new("/mnt/octo-repo/octo-repo"));
        assert_eq!(d, "/mnt/octo-org/octo-repo/_mnt_octo-repo_octo-repo");
        let d = Settings::storage_dir_for("/mnt/", "o/r", Path::new("/work/r/r"));
        assert_eq!(d, "/mnt/o/r/_work_r_r");
        let d = Settings::storage_dir_for("~/ci-storage", "o/r", Path::new("/mnt/r/r"));
        assert_eq!(d, "ci-storage/o/r/_mnt_r_r");
    }

    #[test]
    fn newest_young_slot_wins_ties_to_larger_id() {
        let max = Duration::from_secs(1800);
        let slots = vec![slot("100", 50), slot("200", 10), slot("150", 10), slot("300", 1745)];
        assert_eq!(choose(&slots, max).map(|s| s.id.as_str()), Some("200"));
        // Within 60 s of the max age: about to be collected, so never chosen.
        assert_eq!(choose(&[slot("300", 1740), slot("301", 1799)], max), None);
        assert_eq!(choose(&[slot("300", 1739)], max).map(|s| s.id.as_str()), Some("300"));
        assert_eq!(choose(&[], max), None);
    }

    #[test]
    fn listing_parses_escaped_meta_and_drops_tmp_and_bak() {
        let text = "1001\t5\tfull_snapshot_history=1000 999\\nhints=a b\\n\n\
                    1001.tmp.17\t1\t\n1000.bak.16\t2\t\nbroken line\n999\t40\t\n";
        let slots = parse_listing(text);
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].id, "1001");
        assert_eq!(slots[0].meta, "full_snapshot_history=1000 999\nhints=a b\n");
        assert_eq!(slots[1], slot("999", 40));
    }

    #[test]
    fn local_meta_puts_the_loaded_slot_first() {
        let meta = local_meta("full_snapshot_history=7 5 7 4\nhints=x y x\n", "5");
        assert_eq!(meta, "full_snapshot_history=5 7 4\nhints=x y\n");
        assert_eq!(local_meta("", "9"), "full_snapshot_history=9\nhints=\n");
        let long: Vec<String> = (0..15).map(|i| i.to_string()).collect();
        let meta = local_meta(&format!("full_snapshot_history={}\n", long.join(" ")), "x");
        assert_eq!(meta.lines().next().unwrap().split_whitespace().count(), 10);
    }

    #[test]
    fn meta_path_matches_ci_storage() {
        let s = Settings {
            host: StorageHost::parse("h").unwrap(),
            user: "guest".into(),
            key: Secret::new("k"),
            storage_dir: String::new(),
            local_dir: "/mnt/repo/repo".into(),
            max_age: Duration::from_secs(1800),
            connect_timeout: Duration::from_secs(1),
            stall_timeout: Duration::from_secs(1),
            timeout: Duration::from_secs(1),
            known_hosts: None,
            owner: None,
            meta_dir: "/tmp".into(),
            streams: 2,
            progress_every: None,
        };
        assert_eq!(s.meta_path(), PathBuf::from("/tmp/.ci-storage.meta._mnt_repo_repo"));
    }

    #[test]
    fn pax_times_keep_nanoseconds() {
        let t = parse_pax_time("1700000000.123456789").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 123456789));
        let t = parse_pax_time("1700000000.5").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (1700000000, 500000000));
        let t = parse_pax_time("-1.25").unwrap();
        assert_eq!((t.tv_sec, t.tv_nsec), (-2, 750000000));
        assert!(parse_pax_time("12x").is_none());
    }

    #[test]
    fn unsafe_paths_are_refused() {
        assert_eq!(relative(Path::new("./a/b")), Some(PathBuf::from("a/b")));
        assert_eq!(relative(Path::new("./")), Some(PathBuf::new()));
        assert_eq!(relative(Path::new("/etc/passwd")), None);
        assert_eq!(relative(Path::new("a/../../x")), None);
    }

    #[test]
    fn only_aead_and_ctr_ciphers_are_offered_chacha20_first() {
        assert_eq!(CIPHERS.split(',').next(), Some("chacha20-poly1305@openssh.com"));
        // Never a cipher without integrity of its own, nor a CBC one.
        assert!(
            CIPHERS.split(',').all(|c| c.contains("gcm") || c.contains("chacha") || c.ends_with("-ctr")),
            "{CIPHERS}"
        );
    }

    #[test]
    fn streams_follow_the_cpus_the_process_may_use() {
        assert_eq!(streams_for(1), 1, "a 1-CPU quota must not get two streams fighting for it");
        assert_eq!(streams_for(2), 2);
        assert_eq!(streams_for(6), 6);
        assert_eq!(streams_for(64), 8);
        assert_eq!(streams_for(0), 1);
        let n = default_streams();
        assert!((1..=8).contains(&n), "{n}");
    }

    #[test]
    fn the_remote_command_quotes_its_arguments() {
        let c = stream_command("/mnt/o/r/it's", Duration::from_secs(1740), 3, 1, None);
        assert!(c.starts_with("perl -we '"), "{c}");
        assert!(c.ends_with(r" '/mnt/o/r/it'\''s' 1740 3 1 ''"), "{c}");
        let c = stream_command("/x y", Duration::from_millis(1500), 1, 0, Some("12"));
        assert!(c.ends_with(" '/x y' 1.5 1 0 '12'"), "{c}");
        assert!(!c.contains('\0'), "a NUL in the command");
    }

    #[test]
    fn the_listing_ends_at_the_chosen_line_and_the_archive_follows() {
        let out = b"1001\t5\tfull_snapshot_history=1000\\n\n999\t40\t\n\t1001\n./PaxHeaders\n\tx\n";
        let end = header_end(out).unwrap();
        assert_eq!(&out[end..], b"./PaxHeaders\n\tx\n", "the archive's bytes taken for the listing");
        let (slots, chosen) = parse_header(std::str::from_utf8(&out[..end]).unwrap());
        assert_eq!(slots.len(), 2);
        assert_eq!(slots[0].meta, "full_snapshot_history=1000\n");
        assert_eq!(chosen.as_deref(), Some("1001"));
        // No slot: the chosen line is empty, and nothing follows.
        assert_eq!(header_end(b"\t\n"), Some(2));
        assert_eq!(parse_header("\t\n"), (vec![], None));
        assert_eq!(parse_header("7\t3\t\n\t\n").1, None);
        // Not yet complete: more must be read.
        assert_eq!(header_end(b"1001\t5\t"), None);
        assert_eq!(header_end(b"1001\t5\t\n\t10"), None);
    }

    #[test]
    fn progress_lines_read_as_the_issue_shows_them() {
        let snap = Snapshot { files: 41_000, bytes: 1_200_000_000, totals: Some((100_000, 2_900_000_000)) };
        // 41% of the files and 41.4% of the bytes in 3.9 s: about 5.5 s left.
        let line = snap.line(Duration::from_millis(3870));
        assert_eq!(line, "41,000/100,000 files, 1.2 GB/2.9 GB, 310 MB/s, ETA 6 s");
        // Before the storage host sent the totals: no ETA, never a made-up one.
        let early = Snapshot { files: 999, bytes: 999, totals: None };
        assert_eq!(early.line(Duration::from_secs(1)), "999 files, 999 B, 999 B/s");
        assert_eq!(early.eta(Duration::from_secs(1)), None);
        // Nothing done yet: no ETA either (not infinity, not zero).
        let none = Snapshot { files: 0, bytes: 0, totals: Some((10, 10)) };
        assert_eq!(none.eta(Duration::from_secs(3)), None);
        assert!(none.line(Duration::ZERO).ends_with("0 B/s, ETA unknown"), "{}", none.line(Duration::ZERO));
        // Done: nothing left, and a share never above 1 when more came than was counted.
        let over = Snapshot { files: 12, bytes: 50, totals: Some((10, 40)) };
        assert_eq!((over.fraction(), over.eta(Duration::from_secs(2))), (Some(1.0), Some(Duration::ZERO)));
        // A slot of empty files: the files alone say how far.
        let empty = Snapshot { files: 5, bytes: 0, totals: Some((10, 0)) };
        assert_eq!(empty.fraction(), Some(0.5));
        assert_eq!(empty.eta(Duration::from_secs(2)), Some(Duration::from_secs(2)));
    }

    #[test]
    fn numbers_are_grouped_and_sized_in_decimal_units() {
        assert_eq!(thousands(0), "0");
        assert_eq!(thousands(999), "999");
        assert_eq!(thousands(1000), "1,000");
        assert_eq!(thousands(100_000), "100,000");
        assert_eq!(thousands(1_234_567_890), "1,234,567,890");
        assert_eq!(human_bytes(0), "0 B");
        assert_eq!(human_bytes(1000), "1.0 kB");
        assert_eq!(human_bytes(310_400_000), "310 MB");
        assert_eq!(human_bytes(99_960_000), "100 MB");
        assert_eq!(human_bytes(999_960_000), "1.0 GB", "never 1000 MB");
        assert_eq!(human_bytes(1_073_741_824), "1.1 GB");
        assert_eq!(human_bytes(u64::MAX), "18.4 EB");
        assert_eq!(human_secs(Duration::from_millis(4600)), "5 s");
        assert_eq!(human_secs(Duration::from_secs(125)), "2 min 05 s");
        assert_eq!(human_secs(Duration::from_secs(7300)), "2 h 01 min");
    }

    #[test]
    fn the_last_stream_sends_the_slots_totals_after_the_listing() {
        assert_eq!(parse_totals("\t\t100000\t1073741824\n"), Some((100_000, 1_073_741_824)));
        assert_eq!(parse_totals("\t\t0\t0\n"), Some((0, 0)));
        // Never taken from anything else: an archive's first bytes, a slot id line, junk.
        for bad in ["./PaxHeaders/x\n", "\t1001\n", "\t\t12\n", "\t\t-1\t5\n", "\t\tx\ty\n"] {
            assert_eq!(parse_totals(bad), None, "{bad:?}");
        }
        assert_eq!(line_end(b"\t\t3\t4\nrest"), Some(6));
        assert_eq!(line_end(b"\t\t3\t4"), None);
    }

    #[test]
    fn counting_sees_files_and_their_bytes_but_not_directories() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        let mut d = tar::Header::new_ustar();
        d.set_entry_type(tar::EntryType::Directory);
        d.set_size(0);
        d.set_mode(0o755);
        b.append_data(&mut d, "sub", &b""[..]).unwrap();
        b.append_data(&mut file_header(5), "sub/a", &b"hello"[..]).unwrap();
        b.append_data(&mut file_header(3), "b", &b"abc"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        let dirs = Published::default();
        let progress = Progress::default();
        assert_eq!(unpack_stream(&data[..], &root, Dirs::Create(&dirs), &Gate::default(), &progress).unwrap(), 3);
        assert_eq!(progress.snapshot(), Snapshot { files: 2, bytes: 8, totals: None });
    }

    fn file_header(size: u64) -> tar::Header {
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Regular);
        h.set_size(size);
        h.set_mode(0o644);
        h.set_mtime(1_700_000_000);
        h
    }

    #[test]
    fn entries_through_a_symlink_or_outside_the_root_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let outside = dir.path().join("outside");
        std::fs::create_dir(&outside).unwrap();

        // A symlink to a directory outside, then a file "inside" it.
        let mut b = tar::Builder::new(Vec::new());
        let mut h = tar::Header::new_ustar();
        h.set_entry_type(tar::EntryType::Symlink);
        h.set_size(0);
        h.set_mode(0o777);
        b.append_link(&mut h, "esc", &outside).unwrap();
        b.append_data(&mut file_header(3), "esc/pwned", &b"bad"[..]).unwrap();
        let data = b.into_inner().unwrap();
        let root = dir.path().join("root1");
        std::fs::create_dir(&root).unwrap();
        let e = unpack(&data[..], &root, &Gate::default()).unwrap_err();
        assert!(e.to_string().contains("esc/pwned"), "{e}");
        assert!(!outside.join("pwned").exists(), "written through the symlink");

        // A `..` path, written into the raw header (the builder refuses to make one).
        let mut h = file_header(3);
        h.as_old_mut().name[..9].copy_from_slice(b"../pwned2");
        h.set_cksum();
        let mut raw = h.as_bytes().to_vec();
        raw.extend_from_slice(b"bad");
        raw.resize(raw.len() + (512 - 3) + 1024, 0);
        let root = outside.join("root2");
        std::fs::create_dir(&root).unwrap();
        assert!(unpack(&raw[..], &root, &Gate::default()).is_err());
        assert!(!outside.join("pwned2").exists(), "written outside the root");
    }

    #[test]
    fn a_hard_link_becomes_a_copy_and_a_cancelled_load_stops() {
        let dir = tempfile::tempdir().unwrap();
        let mut b = tar::Builder::new(Vec::new());
        b.append_data(&mut file_header(5), "a", &b"hello"[..]).unwrap();
        let mut h = file_header(0);
        h.set_entry_type(tar::EntryType::Link);
        b.append_link(&mut h, "b", "a").unwrap();
        let data = b.into_inner().unwrap();
        let root = dir.path().join("r");
        std::fs::create_dir(&root).unwrap();
        assert_eq!(unpack(&data[..], &root, &Gate::default()).unwrap(), 2);
        use std::os::unix::fs::MetadataExt;
        assert_eq!(std::fs::read(root.join("b")).unwrap(), b"hello");
        assert_eq!(std::fs::metadata(root.join("a")).unwrap().nlink(), 1, "rsync -a does not keep hard links");

        let gate = Gate::default();
        gate.cancel();
        let root = dir.path().join("r2");
        std::fs::create_dir(&root).unwrap();
        assert!(matches!(unpack(&data[..], &root, &gate), Err(PrewarmError::Cancelled)));
    }

    #[test]
    fn a_cancelled_gate_refuses_to_commit_and_a_committed_one_to_cancel() {
        let g = Gate::default();
        assert!(g.cancel());
        assert!(!g.commit());
        let g = Gate::default();
        assert!(g.commit());
        assert!(!g.cancel());
    }
}
