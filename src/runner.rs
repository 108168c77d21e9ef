//! The actions runner as processes: `config.sh` to register, `run.sh` to listen, the lines they
//! print, and the files they leave in the runner root.
//!
//! Busy/idle is read from inside the container, from the Listener's own terminal lines
//! (`<ts>: Running job: X`, `<ts>: Job X completed with result: R`), never from GitHub's
//! lagging `busy` flag. Lines are matched anchored at the start, because with
//! `ACTIONS_RUNNER_PRINT_LOG_TO_STDOUT=1` each one is repeated inside a trace prefix.

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::{ExitStatus, Stdio};
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::{Gid, Pid, Uid};
use tokio::io::{AsyncBufReadExt, AsyncRead, BufReader};
use tokio::process::{Child, Command};
use tokio::sync::mpsc;

use crate::config::{Config, RunnerUser, Secret};

/// What one line of the runner's output tells the supervisor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LineEvent {
    /// `<ts>: Listening for Jobs`: connected and idle.
    Listening,
    JobStarted(String),
    JobCompleted {
        name: String,
        result: String,
    },
    /// The registration is gone from the server: re-register.
    RegistrationGone,
    /// `A session for this runner already exists.` or run-helper's rc-5 line.
    SessionConflict,
    /// The runner version is too old for GitHub.
    Deprecated,
    /// run-helper.sh reports the Listener's return code.
    ListenerExit(i32),
}

/// Strips `YYYY-MM-DD HH:MM:SSZ: ` from the start of a line.
fn strip_timestamp(line: &str) -> Option<&str> {
    let b = line.as_bytes();
    if b.len() < 22 {
        return None;
    }
    let digits = [0, 1, 2, 3, 5, 6, 8, 9, 11, 12, 14, 15, 17, 18];
    let shape = digits.iter().all(|&i| b[i].is_ascii_digit())
        && b[4] == b'-'
        && b[7] == b'-'
        && b[10] == b' '
        && b[13] == b':'
        && b[16] == b':'
        && b[19] == b'Z'
        && b[20] == b':'
        && b[21] == b' ';
    shape.then(|| &line[22..])
}

/// Removes ANSI colour sequences (the runner prints `√` in green).
pub fn strip_ansi(line: &str) -> String {
    let mut out = String::with_capacity(line.len());
    let mut chars = line.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\u{1b}' && chars.peek() == Some(&'[') {
            chars.next();
            for d in chars.by_ref() {
                if d.is_ascii_alphabetic() {
                    break;
                }
            }
        } else {
            out.push(c);
        }
    }
    out
}

/// Classifies one (ANSI-stripped) line.
pub fn parse_line(line: &str) -> Option<LineEvent> {
    let line = line.trim_end();
    if let Some(rest) = strip_timestamp(line) {
        if rest == "Listening for Jobs" {
            return Some(LineEvent::Listening);
        }
        if let Some(name) = rest.strip_prefix("Running job: ") {
            return Some(LineEvent::JobStarted(name.to_string()));
        }
        if let Some(rest) = rest.strip_prefix("Job ") {
            if let Some((name, result)) = rest.rsplit_once(" completed with result: ") {
                if !result.is_empty() && result.chars().all(|c| c.is_ascii_alphanumeric() || c == '_') {
                    return Some(LineEvent::JobCompleted { name: name.to_string(), result: result.to_string() });
                }
            }
        }
        return None;
    }
    if line.starts_with("The runner no longer exists on the server.")
        || line.starts_with("Failed to create a session. The runner registration has been deleted")
        || line.contains("Registration was not found or is not medium trust")
    {
        return Some(LineEvent::RegistrationGone);
    }
    if line == "A session for this runner already exists." {
        return Some(LineEvent::SessionConflict);
    }
    if line.starts_with("An error occurred: Runner version")
        && line.ends_with("is deprecated and cannot receive messages.")
    {
        return Some(LineEvent::Deprecated);
    }
    let helper = [
        ("Runner listener exit with 0 return code", 0),
        ("Runner listener exit with terminated error", 1),
        ("Runner listener exit with retryable error", 2),
        ("Runner listener exit because of updating", 3),
        ("Runner listener exit with Session Conflict error", 5),
        ("Runner listener exit with deprecated version exit code: 7", 7),
    ];
    for (prefix, rc) in helper {
        if line.starts_with(prefix) {
            return Some(LineEvent::ListenerExit(rc));
        }
    }
    if let Some(code) = line.strip_prefix("Exiting with unknown error code: ") {
        return code.trim().parse().ok().map(LineEvent::ListenerExit);
    }
    None
}

/// Which stream a line came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("failed to start {}", path.display())]
    Spawn {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("config.sh exited with {status}: {last_error}")]
    ConfigFailed { status: String, last_error: String },
    #[error("config.sh did not finish within {0:?}")]
    ConfigTimeout(Duration),
    #[error("failed to wait for {what}")]
    Wait {
        what: &'static str,
        #[source]
        source: io::Error,
    },
    #[error("the runner in RUNNER_DIR is version {found}, older than RUNNER_MIN_VERSION {min} (GitHub's minimum to register), and it may not update itself (RUNNER_DISABLE_UPDATE=true): rebuild the image with a newer runner, or set RUNNER_UPDATE_AT_BOOT=true")]
    TooOld { found: RunnerVersion, min: RunnerVersion },
}

/// A runner version, `2.336.0`; ordered as versions are.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct RunnerVersion(pub u32, pub u32, pub u32);

impl RunnerVersion {
    /// `2.336.0` or `v2.336.0`, nothing else.
    pub fn parse(s: &str) -> Option<Self> {
        let s = s.trim();
        let s = s.strip_prefix('v').unwrap_or(s);
        let number = |p: &str| {
            (!p.is_empty() && p.len() <= 9 && p.bytes().all(|b| b.is_ascii_digit())).then(|| p.parse::<u32>().ok())?
        };
        let mut parts = s.split('.').map(number);
        let v = RunnerVersion(parts.next()??, parts.next()??, parts.next()??);
        parts.next().is_none().then_some(v)
    }
}

impl std::fmt::Display for RunnerVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}.{}", self.0, self.1, self.2)
    }
}

/// The installed runner's version, from `bin/Runner.Listener --version` run as the runner
/// user (it writes its `_diag` trace like any run). `None` when it cannot be learnt in time.
pub async fn installed_version(cfg: &Config, timeout: Duration) -> Option<RunnerVersion> {
    let program = cfg.runner_dir.join("bin").join("Runner.Listener");
    let mut cmd = command(cfg, &program, &[]);
    cmd.arg("--version").kill_on_drop(true);
    let out = tokio::time::timeout(timeout, cmd.output()).await.ok()?.ok()?;
    String::from_utf8_lossy(&out.stdout).lines().find_map(RunnerVersion::parse)
}

/// Whether config.sh's last error line is GitHub refusing the runner's version, which no
/// retry cures.
pub fn version_refused(last_error: &str) -> bool {
    let e = last_error.to_ascii_lowercase();
    e.contains("runner version") && (e.contains("deprecated") || e.contains("too old") || e.contains("minimum"))
}

/// The labels a JIT registration asks for. The API registers exactly the labels it is given,
/// so config.sh's defaults (`self-hosted`, the OS, the architecture) are added here, unless
/// `RUNNER_NO_DEFAULT_LABELS`.
pub fn jit_labels(custom: &[String], no_default_labels: bool) -> Vec<String> {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "ARM64",
        "arm" => "ARM",
        "x86" => "X86",
        _ => "X64",
    };
    let mut labels: Vec<String> =
        if no_default_labels { Vec::new() } else { vec!["self-hosted".into(), "Linux".into(), arch.into()] };
    for l in custom {
        if !labels.iter().any(|x| x.eq_ignore_ascii_case(l)) {
            labels.push(l.clone());
        }
    }
    labels
}

/// The user's uid, gid and supplementary groups, resolved before fork (getgrouplist reads
/// /etc/group, which is not safe between fork and exec).
#[derive(Debug, Clone)]
pub(crate) struct Identity {
    pub(crate) uid: u32,
    pub(crate) gid: u32,
    pub(crate) groups: Vec<u32>,
}

/// A user of `/etc/passwd` gets its groups from `/etc/group` (read again each time: a boot hook
/// may have added the user to a group); any other from `getgrouplist` (NSS).
pub(crate) fn identity(user: &RunnerUser) -> Identity {
    let local = std::fs::read_to_string("/etc/passwd")
        .ok()
        .is_some_and(|t| crate::config::passwd_entry(&t, &user.name).is_some_and(|u| u.uid == user.uid));
    let from_files = local
        .then(|| std::fs::read_to_string("/etc/group").ok())
        .flatten()
        .map(|t| crate::config::member_groups(&t, &user.name, user.gid));
    let groups = from_files.unwrap_or_else(|| {
        CString::new(user.name.as_bytes())
            .ok()
            .and_then(|n| nix::unistd::getgrouplist(&n, Gid::from_raw(user.gid)).ok())
            .map(|g| g.into_iter().map(|g| g.as_raw()).collect())
            .unwrap_or_else(|| vec![user.gid])
    });
    Identity { uid: user.uid, gid: user.gid, groups }
}

/// A command for the runner user: its own process group, a clean signal mask and default
/// dispositions, the scrubbed environment, stdin from /dev/null, output piped.
pub(crate) fn command(cfg: &Config, program: &Path, extra_env: &[(&str, &str)]) -> Command {
    let mut cmd = Command::new(program);
    cmd.current_dir(&cfg.runner_dir)
        .env_clear()
        .envs(cfg.runner_env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
        // Lets us tell a deprecated runner (rc 7) from other terminal errors.
        .env("ACTIONS_RUNNER_RETURN_VERSION_DEPRECATED_EXIT_CODE", "1")
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .process_group(0)
        .kill_on_drop(false);
    for (k, v) in extra_env {
        cmd.env(k, v);
    }
    let ident = cfg.runner_user.as_ref().map(|u| {
        cmd.env("HOME", &u.home).env("USER", &u.name).env("LOGNAME", &u.name);
        identity(u)
    });
    if cfg.runner_user.as_ref().is_some_and(|u| u.uid == 0) {
        cmd.env("RUNNER_ALLOW_RUNASROOT", "1");
    }
    drop_privileges(&mut cmd, ident);
    cmd
}

/// Makes `cmd` run as `ident` (when given) with a clean signal mask and default dispositions.
pub(crate) fn drop_privileges(cmd: &mut Command, ident: Option<Identity>) {
    // SAFETY: the closure only makes async-signal-safe system calls (setgroups, setgid,
    // setuid, sigprocmask, rt_sigaction) on data prepared before the fork.
    unsafe {
        cmd.pre_exec(move || {
            if let Some(id) = &ident {
                if libc::setgroups(id.groups.len(), id.groups.as_ptr()) != 0
                    || libc::setgid(id.gid) != 0
                    || libc::setuid(id.uid) != 0
                {
                    return Err(io::Error::last_os_error());
                }
            }
            crate::pid1::reset_signals()
        });
    }
}

/// Forwards a child's output lines into one channel, ANSI stripped, blank lines dropped.
pub(crate) fn pump(
    stream: impl AsyncRead + Unpin + Send + 'static,
    which: Stream,
    tx: mpsc::UnboundedSender<(Stream, String)>,
) {
    tokio::spawn(async move {
        let mut lines = BufReader::new(stream).lines();
        while let Ok(Some(line)) = lines.next_line().await {
            let line = strip_ansi(&line);
            if line.trim().is_empty() {
                continue;
            }
            if tx.send((which, line)).is_err() {
                break;
            }
        }
    });
}

/// What `config.sh` needs to register one runner.
pub struct Registration<'a> {
    pub name: &'a str,
    pub token: &'a Secret,
}

/// Runs `config.sh --unattended --replace …` as the runner user. The token goes through the
/// environment (`ACTIONS_RUNNER_INPUT_TOKEN`, which the Listener deletes once read), never argv.
pub async fn configure(cfg: &Config, reg: Registration<'_>, timeout: Duration) -> Result<(), RunnerError> {
    let program = cfg.runner_dir.join("config.sh");
    let mut args: Vec<String> = vec![
        "--unattended".into(),
        "--replace".into(),
        "--url".into(),
        cfg.runner_url(),
        "--name".into(),
        reg.name.into(),
        "--labels".into(),
        cfg.labels.join(","),
        "--work".into(),
        cfg.work_dir.clone(),
    ];
    if let Some(group) = &cfg.group {
        args.extend(["--runnergroup".into(), group.clone()]);
    }
    if cfg.ephemeral {
        args.push("--ephemeral".into());
    }
    if cfg.no_default_labels {
        args.push("--no-default-labels".into());
    }
    if cfg.disable_update {
        args.push("--disableupdate".into());
    }
    let mut cmd = command(cfg, &program, &[("ACTIONS_RUNNER_INPUT_TOKEN", reg.token.expose())]);
    cmd.args(&args).kill_on_drop(true);
    let mut child = cmd.spawn().map_err(|source| RunnerError::Spawn { path: program.clone(), source })?;
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        pump(out, Stream::Stdout, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        pump(err, Stream::Stderr, tx);
    }
    let mut last_error = String::new();
    let run = async {
        let mut done = None;
        loop {
            tokio::select! {
                line = rx.recv() => match line {
                    Some((stream, line)) => {
                        tracing::info!(target: "runner", "{line}");
                        if stream == Stream::Stderr {
                            last_error = line;
                        }
                    }
                    None => break,
                },
                status = child.wait(), if done.is_none() => {
                    done = Some(status);
                }
            }
        }
        match done {
            Some(s) => s,
            None => child.wait().await,
        }
    };
    let status = tokio::time::timeout(timeout, run).await.map_err(|_| RunnerError::ConfigTimeout(timeout))?;
    let status = status.map_err(|source| RunnerError::Wait { what: "config.sh", source })?;
    if status.success() {
        Ok(())
    } else {
        Err(RunnerError::ConfigFailed { status: describe(status), last_error })
    }
}

/// `exit status 3` or `signal 9`.
pub fn describe(status: ExitStatus) -> String {
    use std::os::unix::process::ExitStatusExt;
    match (status.code(), status.signal()) {
        (Some(c), _) => format!("exit status {c}"),
        (None, Some(s)) => format!("signal {s}"),
        _ => "an unknown status".into(),
    }
}

/// A running `run.sh` and its process group.
pub struct RunnerProcess {
    child: Child,
    pgid: Pid,
    /// The Listener's pid, learnt when it announces itself.
    listener: Option<Pid>,
}

/// The runner's output lines, in order, tagged with their stream.
pub type Lines = mpsc::UnboundedReceiver<(Stream, String)>;

impl RunnerProcess {
    /// Starts `run.sh` from the runner root (so `update.finished` lands where run-helper looks).
    /// A JIT configuration goes in `ACTIONS_RUNNER_INPUT_JITCONFIG`, never in argv (where
    /// `/proc/*/cmdline` shows it to every user); the Listener deletes it from its own
    /// environment once read, so the Worker and the job never see it.
    pub fn spawn(cfg: &Config, jit: Option<&Secret>) -> Result<(Self, Lines), RunnerError> {
        let program = cfg.runner_dir.join("run.sh");
        let jit_env = jit.map(|j| ("ACTIONS_RUNNER_INPUT_JITCONFIG", j.expose()));
        let mut child = command(cfg, &program, jit_env.as_slice())
            .spawn()
            .map_err(|source| RunnerError::Spawn { path: program.clone(), source })?;
        let pgid = Pid::from_raw(child.id().unwrap_or(0) as i32);
        let (tx, lines) = mpsc::unbounded_channel();
        if let Some(out) = child.stdout.take() {
            pump(out, Stream::Stdout, tx.clone());
        }
        if let Some(err) = child.stderr.take() {
            pump(err, Stream::Stderr, tx);
        }
        Ok((Self { child, pgid, listener: None }, lines))
    }

    pub fn pid(&self) -> u32 {
        self.pgid.as_raw() as u32
    }

    pub async fn wait(&mut self) -> io::Result<ExitStatus> {
        self.child.wait().await
    }

    /// Asks the Listener to shut down: SIGINT to the Listener alone, which is the runner's own
    /// clean stop (a running job would be cancelled, so callers only do this when idle or on
    /// purpose). Without a Listener (between restarts) the whole group gets SIGTERM.
    pub fn stop_listener(&self) -> usize {
        // The remembered pid, if it is still a process of our group (pids get reused).
        if let Some(pid) = self.listener.filter(|p| process_group(*p) == Some(self.pgid)) {
            if nix::sys::signal::kill(pid, Signal::SIGINT).is_ok() {
                return 1;
            }
        }
        let listeners = find_in_group(self.pgid, "Runner.Listener");
        for pid in &listeners {
            let _ = nix::sys::signal::kill(*pid, Signal::SIGINT);
        }
        if listeners.is_empty() {
            let _ = killpg(self.pgid, Signal::SIGTERM);
        }
        listeners.len()
    }

    /// Finds and remembers the Listener's pid (it changes only when run.sh restarts it).
    pub fn remember_listener(&mut self) {
        let alive = self.listener.is_some_and(|p| find_in_group(self.pgid, "Runner.Listener").contains(&p));
        if !alive {
            self.listener = find_in_group(self.pgid, "Runner.Listener").into_iter().next();
        }
    }

    /// SIGKILL to the whole group: the last resort.
    pub fn kill(&self) {
        let _ = killpg(self.pgid, Signal::SIGKILL);
    }

    /// Whether a `Runner.Worker` (a job) runs in the group right now.
    pub fn worker_running(&self) -> bool {
        !find_in_group(self.pgid, "Runner.Worker").is_empty()
    }
}

/// The process group of `pid`, from `/proc/<pid>/stat`.
fn process_group(pid: Pid) -> Option<Pid> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = &stat[stat.rfind(')')? + 1..];
    after.split_whitespace().nth(2)?.parse().ok().map(Pid::from_raw)
}

/// Processes in process group `pgid` whose argv[0] or argv[1] (scripts run by an interpreter)
/// ends in `/<name>`.
pub fn find_in_group(pgid: Pid, name: &str) -> Vec<Pid> {
    let Ok(dir) = std::fs::read_dir("/proc") else { return Vec::new() };
    let mut found = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry.file_name().to_str().and_then(|s| s.parse::<i32>().ok()) else { continue };
        // Fields after the parenthesised comm: state ppid pgrp …
        if process_group(Pid::from_raw(pid)) != Some(pgid) {
            continue;
        }
        let Ok(cmdline) = std::fs::read(format!("/proc/{pid}/cmdline")) else { continue };
        let matches = cmdline.split(|b| *b == 0).take(2).any(|arg| {
            let arg = std::ffi::OsStr::from_bytes(arg);
            Path::new(arg).file_name().is_some_and(|f| f == name)
        });
        if matches {
            found.push(Pid::from_raw(pid));
        }
    }
    found
}

/// The runner's local registration files.
/// A registration's local files. The `_migrated` ones are written by runners moved to
/// GitHub's newer broker; the runner deletes `.credentials_migrated` with `.credentials`
/// (actions/runner `src/Runner.Common/ConfigurationStore.cs`, `DeleteCredential`), and a
/// `.runner_migrated` left behind makes `config.sh` refuse as "already configured".
pub const LOCAL_FILES: &[&str] =
    &[".runner", ".credentials", ".credentials_rsaparams", ".runner_migrated", ".credentials_migrated"];

/// The runner id (`agentId`) from `.runner`, read case-insensitively (Newtonsoft writes
/// camelCase, possibly behind a UTF-8 BOM).
pub fn read_agent_id(runner_dir: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(runner_dir.join(".runner")).ok()?;
    let value: serde_json::Value = serde_json::from_str(text.trim_start_matches('\u{feff}')).ok()?;
    value.as_object()?.iter().find(|(k, _)| k.eq_ignore_ascii_case("agentId")).and_then(|(_, v)| v.as_u64())
}

/// Deletes the local registration, as `config.sh remove --local` does.
pub fn remove_local_files(runner_dir: &Path) {
    for f in LOCAL_FILES {
        let _ = std::fs::remove_file(runner_dir.join(f));
    }
}

/// The drain sentinel of actions/runner PR #4461 (open at 2.336.0): a Listener that has it
/// checks `<root>/.drain` at the top of its message loop and leaves without polling again.
/// Older Listeners ignore the file; the supervisor's own drain (labels, DELETE, SIGINT) does
/// not depend on it. PR #4708's `run --drain-file PATH` is the same idea for ephemeral
/// runners, with the path given on the command line.
pub const DRAIN_SENTINEL: &str = ".drain";

/// Asks a Listener that supports it to stop polling: writes [`DRAIN_SENTINEL`].
pub fn request_drain(runner_dir: &Path) {
    if let Err(e) = std::fs::write(runner_dir.join(DRAIN_SENTINEL), b"") {
        tracing::debug!(error = %e, "Failed to write the runner's drain sentinel.");
    }
}

/// Before `run.sh` starts: a sentinel left by an earlier run must not stop the new one.
pub fn clear_drain_sentinel(runner_dir: &Path) {
    let _ = std::fs::remove_file(runner_dir.join(DRAIN_SENTINEL));
}

pub fn is_configured(runner_dir: &Path) -> bool {
    runner_dir.join(".runner").exists()
}

/// Gives the runner user the runner root, without a recursive chown of the payload: only the
/// root itself must be writable (config.sh writes `.runner` there).
pub fn prepare_root(cfg: &Config) -> io::Result<()> {
    if let Some(u) = &cfg.runner_user {
        nix::unistd::chown(&cfg.runner_dir, Some(Uid::from_raw(u.uid)), Some(Gid::from_raw(u.gid)))
            .map_err(io::Error::from)?;
    }
    Ok(())
}

/// What making a runner root took: files hard-linked, and bytes copied where a link could not
/// be made (another filesystem).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct RootMade {
    pub linked: u64,
    pub copied_bytes: u64,
}

/// Makes a runner's own root at `root` from the runner installed in `install` (README "Several
/// runners per container"). The runner takes the directory holding `bin/` as its root and
/// writes its identity there (`.runner`, `.credentials`, `.env`, `_diag/`, `_work/`), so each
/// runner needs its own directory, but not its own copy of the large read-only parts:
/// - `bin*` and other directories: the tree again, each file hard-linked (the Listener's own
///   path, which the runner resolves its root from, must lie in the root; a symlinked `bin`
///   would resolve to the install). Across filesystems a file is copied instead;
/// - `externals*`: a symlink to the install's (node and friends; their path does not matter);
/// - top-level files (the scripts): copied, since `env.sh` and `config.sh` rewrite files in
///   the root in place, and a linked inode would change every runner's;
/// - dotfiles and `_*` (the installed runner's own state, if any): left out.
///
/// A root that already has `bin/` is left as it is (a restart of the same container).
pub fn make_root(install: &Path, root: &Path) -> io::Result<RootMade> {
    let mut made = RootMade::default();
    if root.join("bin").exists() {
        return Ok(made);
    }
    std::fs::create_dir_all(root)?;
    for entry in std::fs::read_dir(install)? {
        let entry = entry?;
        let name = entry.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with('.') || name_str.starts_with('_') {
            continue;
        }
        let (from, to) = (entry.path(), root.join(&name));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&from)?, &to)?;
        } else if kind.is_dir() && name_str.starts_with("externals") {
            std::os::unix::fs::symlink(&from, &to)?;
        } else if kind.is_dir() {
            link_tree(&from, &to, &mut made)?;
        } else {
            made.copied_bytes += std::fs::copy(&from, &to)?;
        }
    }
    Ok(made)
}

/// Undoes [`make_root`] in `root` after the install changed (the update at boot): every entry
/// named as one of the install's shared ones goes (its hard links hold the old files), so that
/// [`make_root`] makes them again; the root's own state (`.runner`, `_work`, `_diag` …) stays.
pub fn unmake_root(install: &Path, root: &Path) -> io::Result<()> {
    if !root.join("bin").exists() {
        return Ok(());
    }
    for entry in std::fs::read_dir(install)? {
        let name = entry?.file_name();
        let name_str = name.to_string_lossy();
        if name_str.starts_with('.') || name_str.starts_with('_') {
            continue;
        }
        let path = root.join(&name);
        match std::fs::symlink_metadata(&path) {
            Ok(m) if m.is_dir() => std::fs::remove_dir_all(&path)?,
            Ok(_) => std::fs::remove_file(&path)?,
            Err(_) => {}
        }
    }
    Ok(())
}

/// `from`'s tree again at `to`: directories made, files hard-linked (copied across
/// filesystems), symlinks recreated.
fn link_tree(from: &Path, to: &Path, made: &mut RootMade) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir(to)?;
    let mode = std::fs::metadata(from)?.permissions().mode();
    std::fs::set_permissions(to, std::fs::Permissions::from_mode(mode))?;
    for entry in std::fs::read_dir(from)? {
        let entry = entry?;
        let (src, dst) = (entry.path(), to.join(entry.file_name()));
        let kind = entry.file_type()?;
        if kind.is_symlink() {
            std::os::unix::fs::symlink(std::fs::read_link(&src)?, &dst)?;
        } else if kind.is_dir() {
            link_tree(&src, &dst, made)?;
        } else {
            match std::fs::hard_link(&src, &dst) {
                Ok(()) => made.linked += 1,
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => made.copied_bytes += std::fs::copy(&src, &dst)?,
                Err(e) => return Err(e),
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn local_files_include_the_migrated_ones_and_nothing_else_goes() {
        let dir = tempfile::tempdir().unwrap();
        for f in LOCAL_FILES.iter().chain(&["config.sh", "_diag"]) {
            std::fs::write(dir.path().join(f), b"x").unwrap();
        }
        remove_local_files(dir.path());
        for f in LOCAL_FILES {
            assert!(!dir.path().join(f).exists(), "{f} left behind");
        }
        assert!(dir.path().join("config.sh").exists(), "a file of the install was removed");
        assert!(dir.path().join("_diag").exists());
    }

    #[test]
    fn a_root_shares_the_installs_files_and_keeps_its_state_apart() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let install = dir.path().join("install");
        std::fs::create_dir_all(install.join("bin/sub")).unwrap();
        std::fs::create_dir_all(install.join("externals/node20/bin")).unwrap();
        std::fs::create_dir_all(install.join("_diag")).unwrap();
        std::fs::write(install.join("bin/Runner.Listener"), "listener").unwrap();
        std::fs::write(install.join("bin/sub/x.dll"), "dll").unwrap();
        std::fs::write(install.join("externals/node20/bin/node"), "node").unwrap();
        std::fs::write(install.join("run.sh"), "#!/bin/bash\n").unwrap();
        std::fs::write(install.join(".runner"), "{}").unwrap();
        std::os::unix::fs::symlink("bin", install.join("bin.current")).unwrap();
        let root = dir.path().join("roots/1");
        let made = make_root(&install, &root).unwrap();
        assert_eq!(made.linked, 2, "{made:?}");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(ino(&root.join("bin/Runner.Listener")), ino(&install.join("bin/Runner.Listener")));
        assert_eq!(ino(&root.join("bin/sub/x.dll")), ino(&install.join("bin/sub/x.dll")));
        assert!(std::fs::symlink_metadata(root.join("bin")).unwrap().is_dir(), "bin is a real directory");
        assert_eq!(std::fs::read_link(root.join("externals")).unwrap(), install.join("externals"));
        assert_ne!(ino(&root.join("run.sh")), ino(&install.join("run.sh")), "scripts are copies");
        assert_eq!(std::fs::read_link(root.join("bin.current")).unwrap(), Path::new("bin"));
        assert!(!root.join(".runner").exists() && !root.join("_diag").exists(), "no state is carried over");
        // Again on the same root: nothing to do.
        assert_eq!(make_root(&install, &root).unwrap(), RootMade::default());
    }

    #[test]
    fn an_unmade_root_is_made_again_from_the_new_install_and_keeps_its_state() {
        use std::os::unix::fs::MetadataExt;
        let dir = tempfile::tempdir().unwrap();
        let (install, root) = (dir.path().join("install"), dir.path().join("root"));
        std::fs::create_dir_all(install.join("bin")).unwrap();
        std::fs::create_dir_all(install.join("externals")).unwrap();
        std::fs::write(install.join("bin/Runner.Listener"), "old").unwrap();
        std::fs::write(install.join("config.sh"), "old").unwrap();
        make_root(&install, &root).unwrap();
        std::fs::write(root.join(".runner"), "its registration").unwrap();
        std::fs::create_dir_all(root.join("_work/repo")).unwrap();
        // The update swaps new files in (new inodes), as `update::swap` does.
        std::fs::remove_dir_all(install.join("bin")).unwrap();
        std::fs::create_dir_all(install.join("bin")).unwrap();
        std::fs::write(install.join("bin/Runner.Listener"), "new").unwrap();
        std::fs::remove_file(install.join("config.sh")).unwrap();
        std::fs::write(install.join("config.sh"), "new").unwrap();
        assert_eq!(
            std::fs::read_to_string(root.join("bin/Runner.Listener")).unwrap(),
            "old",
            "the links hold the old files"
        );
        unmake_root(&install, &root).unwrap();
        make_root(&install, &root).unwrap();
        assert_eq!(std::fs::read_to_string(root.join("bin/Runner.Listener")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(root.join("config.sh")).unwrap(), "new");
        let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
        assert_eq!(
            ino(&root.join("bin/Runner.Listener")),
            ino(&install.join("bin/Runner.Listener")),
            "linked, not copied"
        );
        assert_eq!(
            std::fs::read_to_string(root.join(".runner")).unwrap(),
            "its registration",
            "the root's state stays"
        );
        assert!(root.join("_work/repo").is_dir(), "the work dir stays");
    }

    #[test]
    fn job_lines_are_parsed() {
        assert_eq!(parse_line("2026-08-17 14:15:44Z: Listening for Jobs"), Some(LineEvent::Listening));
        assert_eq!(
            parse_line("2026-08-17 14:15:44Z: Running job: build (ubuntu, 18)"),
            Some(LineEvent::JobStarted("build (ubuntu, 18)".into()))
        );
        assert_eq!(
            parse_line("2026-08-17 14:16:00Z: Job build (ubuntu, 18) completed with result: Succeeded"),
            Some(LineEvent::JobCompleted { name: "build (ubuntu, 18)".into(), result: "Succeeded".into() })
        );
    }

    #[test]
    fn trace_copies_are_not_counted_twice() {
        assert_eq!(
            parse_line(
                "[RUNNER 2026-08-17 14:15:44Z INFO Terminal] WRITE LINE: 2026-08-17 14:15:44Z: Running job: build"
            ),
            None
        );
        assert_eq!(parse_line("echo 2026-08-17 14:15:44Z: Running job: x"), None);
    }

    #[test]
    fn lifecycle_lines_are_recognised() {
        assert_eq!(
            parse_line("The runner no longer exists on the server. Cleaning up local configuration."),
            Some(LineEvent::RegistrationGone)
        );
        assert_eq!(parse_line("A session for this runner already exists."), Some(LineEvent::SessionConflict));
        assert_eq!(
            parse_line("An error occurred: Runner version v2.300.0 is deprecated and cannot receive messages."),
            Some(LineEvent::Deprecated)
        );
        assert_eq!(
            parse_line("Runner listener exit with retryable error, re-launch runner in 5 seconds."),
            Some(LineEvent::ListenerExit(2))
        );
        assert_eq!(parse_line("Exiting with unknown error code: 143"), Some(LineEvent::ListenerExit(143)));
        assert_eq!(parse_line("hello"), None);
    }

    #[test]
    fn ansi_is_stripped() {
        assert_eq!(strip_ansi("\u{1b}[32m√\u{1b}[0m Connected to GitHub"), "√ Connected to GitHub");
    }

    #[test]
    fn versions_parse_and_compare_as_versions() {
        assert_eq!(RunnerVersion::parse("2.336.0"), Some(RunnerVersion(2, 336, 0)));
        assert_eq!(RunnerVersion::parse(" v2.329.0\n"), Some(RunnerVersion(2, 329, 0)));
        for bad in ["", "2.336", "2.336.0.1", "2.x.0", "+2.1.0", "2..0", "version 2.1.0"] {
            assert_eq!(RunnerVersion::parse(bad), None, "{bad}");
        }
        assert!(RunnerVersion(2, 329, 0) < RunnerVersion(2, 336, 0));
        // Numerically, not as strings.
        assert!(RunnerVersion(2, 99, 9) < RunnerVersion(2, 100, 0));
        assert_eq!(RunnerVersion(2, 329, 0).to_string(), "2.329.0");
    }

    #[test]
    fn a_refused_version_is_recognised_in_config_sh_errors() {
        assert!(version_refused(
            "An error occurred: Runner version v2.300.0 is deprecated and cannot receive messages."
        ));
        assert!(version_refused("Runner version 2.300.0 is too old to register."));
        assert!(!version_refused(
            "Http response code: NotFound from 'POST https://api.github.com/actions/runner-registration'"
        ));
    }

    #[test]
    fn jit_labels_carry_config_sh_defaults_unless_disabled() {
        let custom = vec!["gpu".to_string(), "linux".to_string()];
        let labels = jit_labels(&custom, false);
        assert_eq!(&labels[..2], ["self-hosted", "Linux"]);
        assert_eq!(labels.len(), 4, "{labels:?}");
        assert_eq!(labels[3], "gpu");
        assert_eq!(jit_labels(&custom, true), custom);
    }

    #[test]
    fn agent_id_is_read_case_insensitively() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join(".runner"), "\u{feff}{\n  \"AgentId\": 42,\n  \"agentName\": \"x\"\n}").unwrap();
        assert_eq!(read_agent_id(dir.path()), Some(42));
        remove_local_files(dir.path());
        assert_eq!(read_agent_id(dir.path()), None);
    }
}
