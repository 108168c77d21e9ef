//! Secrets the runner user must not read: proved at start, fixed where that is ours to do.
//!
//! Jobs run as `RUNNER_USER`; the supervisor runs as root and reads its secrets once, at start
//! (variables, or files in `SECRETS_DIR`). Issue #17 found every job able to `cat` a host's
//! `secrets/GH_TOKEN` mounted into the container, since the host user who made it is uid 1000,
//! as `guest` is. So before anything runs as the runner user, the supervisor:
//!
//! 1. lists every file under `SECRETS_DIR` (all of them: the directory holds secrets only),
//!    and the `/proc/<pid>/environ` of PID 1, its parent and itself (which may hold `GH_TOKEN`);
//! 2. for each, works out from the owner, group and mode bits of every directory on the way
//!    whether the runner user's uid and groups get through, and proves it by trying: a forked
//!    child drops to that uid and groups and opens each path (so ACLs and the like count too);
//! 3. when a secret file is readable and `SECRETS_DIR` is a plain directory of the container's
//!    own root filesystem (not a mount), makes that directory root's, mode 0700, and checks
//!    again. A mounted directory (a host bind mount, a volume) is never changed: its owner and
//!    mode are the host's, and a chmod would change the host's files;
//! 4. refuses to start (exit 3) while anything stays readable, naming the file, why, and how to
//!    mount it instead.
//!
//! Not checked: `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, the token for the task role's
//! credentials endpoint, since jobs are meant to reach that role anyway (README "Autoscaling").

use std::ffi::CString;
use std::io;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};

use tracing::{info, warn};

use crate::config::{Config, RunnerUser};

/// How a secret is kept from the runner user, for the message that says how to fix it.
const FIX: &str = "mount the host directory below the image's root-only /run/secrets (0700), as compose.yaml does (-v $PWD/secrets:/run/secrets/host:ro with SECRETS_DIR=/run/secrets/host); or give each secret as a Docker or compose secret (compose's `secrets:`, or --mount type=bind,src=$PWD/secrets/GH_TOKEN,dst=/run/secrets/GH_TOKEN,readonly), which lands in /run/secrets; or make the host directory root-owned with mode 0700";

/// The original image's sudo rule for ci-storage (the image's `CI_STORAGE_SUDO=1`).
const SUDO_RULE: &str = "/etc/sudoers.d/ci-storage";

#[derive(Debug, thiserror::Error)]
pub enum SecretsError {
    #[error("failed to keep secrets from the runner user {user} (uid {uid}): {}; {untouched}. Fix: {FIX}", describe(.readable))]
    Readable { user: String, uid: u32, readable: Vec<(PathBuf, String)>, untouched: String },
    #[error("failed to keep {path} from the runner user {user} (uid {uid}): a process of ci-runner's environment is readable by it; run ci-runner as root with RUNNER_USER another user")]
    Environ { user: String, uid: u32, path: PathBuf },
    #[error("failed to check what the runner user {user} can read")]
    Probe {
        user: String,
        #[source]
        source: io::Error,
    },
    #[error("failed to make {dir} root-only")]
    Lock {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

fn describe(readable: &[(PathBuf, String)]) -> String {
    readable.iter().map(|(p, why)| format!("{} is readable ({why})", p.display())).collect::<Vec<_>>().join("; ")
}

/// The uid and groups a check is made for.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Access {
    pub uid: u32,
    pub gid: u32,
    pub groups: Vec<u32>,
}

impl Access {
    pub fn of(user: &RunnerUser) -> Access {
        let id = crate::runner::identity(user);
        Access { uid: id.uid, gid: id.gid, groups: id.groups }
    }
}

/// Owner, group and mode of one path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Stat {
    pub mode: u32,
    pub uid: u32,
    pub gid: u32,
}

impl Stat {
    fn of(path: &Path) -> io::Result<Stat> {
        let m = std::fs::metadata(path)?;
        Ok(Stat { mode: m.mode() & 0o7777, uid: m.uid(), gid: m.gid() })
    }
}

const READ: u32 = 4;
const SEARCH: u32 = 1;

/// Whether `who` has `want` (READ, SEARCH) on a path of `st`, by the kernel's rule: the
/// owner's bits when it is the owner, else the group's when in the group, else the others'.
pub fn allows(st: Stat, who: &Access, want: u32) -> bool {
    if who.uid == 0 {
        return true;
    }
    let bits = if st.uid == who.uid {
        st.mode >> 6
    } else if who.gid == st.gid || who.groups.contains(&st.gid) {
        st.mode >> 3
    } else {
        st.mode
    } & 7;
    bits & want == want
}

/// Whether `who` can read the file at `path` (absolute, without links), going down from `/`;
/// `Err` holds the first directory that stops it or the file's own bits, as a sentence.
pub fn reach(path: &Path, who: &Access, stat: &dyn Fn(&Path) -> io::Result<Stat>) -> Result<String, String> {
    let mut dirs: Vec<&Path> = path.ancestors().skip(1).collect();
    dirs.reverse();
    for dir in dirs {
        let st = stat(dir).map_err(|e| format!("{} cannot be read: {e}", dir.display()))?;
        if !allows(st, who, SEARCH) {
            return Err(format!("{} is {:04o} owned by {}:{}", dir.display(), st.mode, st.uid, st.gid));
        }
    }
    let st = stat(path).map_err(|e| format!("{e}"))?;
    let whose = if st.uid == who.uid { "the runner user's own" } else { "owned by" };
    let why = format!(
        "every directory above it lets uid {} through and the file is {:04o}, {whose} {}:{}",
        who.uid, st.mode, st.uid, st.gid
    );
    if allows(st, who, READ) {
        Ok(why)
    } else {
        Err(format!("{} is {:04o} owned by {}:{}", path.display(), st.mode, st.uid, st.gid))
    }
}

/// Every file under `dir`, through links, as absolute paths without links (deduplicated).
fn files_under(dir: &Path) -> Vec<PathBuf> {
    fn walk(dir: &Path, depth: u32, out: &mut Vec<PathBuf>) {
        let Ok(entries) = std::fs::read_dir(dir) else { return };
        for e in entries.flatten() {
            let Ok(real) = std::fs::canonicalize(e.path()) else { continue };
            match std::fs::metadata(&real) {
                Ok(m) if m.is_dir() && depth < 4 => walk(&real, depth + 1, out),
                Ok(m) if m.is_file() && !out.contains(&real) => out.push(real),
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(dir, 0, &mut out);
    out.sort();
    out
}

/// Tries to open each path for reading as `who`, in a forked child that drops to that uid
/// and those groups; one verdict per path.
pub fn probe(paths: &[PathBuf], who: &Access) -> io::Result<Vec<bool>> {
    let cpaths: Vec<CString> = paths
        .iter()
        .map(|p| CString::new(p.as_os_str().as_bytes()).map_err(io::Error::other))
        .collect::<Result<_, _>>()?;
    let groups: Vec<libc::gid_t> = who.groups.clone();
    let mut fds = [0; 2];
    // SAFETY: pipe2 with a valid array of two ints.
    if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_CLOEXEC) } != 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: the child only makes async-signal-safe calls (setgroups, setgid, setuid, open,
    // close, write, _exit) on data prepared before the fork.
    let pid = unsafe { libc::fork() };
    if pid == 0 {
        unsafe {
            libc::close(fds[0]);
            if libc::setgroups(groups.len(), groups.as_ptr()) != 0
                || libc::setgid(who.gid) != 0
                || libc::setuid(who.uid) != 0
            {
                libc::_exit(2);
            }
            for c in &cpaths {
                let fd = libc::open(c.as_ptr(), libc::O_RDONLY | libc::O_NONBLOCK | libc::O_NOCTTY | libc::O_CLOEXEC);
                let b: u8 = if fd >= 0 {
                    libc::close(fd);
                    b'1'
                } else {
                    b'0'
                };
                if libc::write(fds[1], (&b as *const u8).cast(), 1) != 1 {
                    libc::_exit(3);
                }
            }
            libc::_exit(0);
        }
    }
    // SAFETY: closing our copy of the write end.
    unsafe { libc::close(fds[1]) };
    if pid < 0 {
        let e = io::Error::last_os_error();
        unsafe { libc::close(fds[0]) };
        return Err(e);
    }
    // SAFETY: fds[0] is ours alone from here; File closes it.
    let mut read_end = unsafe { <std::fs::File as std::os::fd::FromRawFd>::from_raw_fd(fds[0]) };
    let mut out = Vec::new();
    let read = io::Read::read_to_end(&mut read_end, &mut out);
    let mut status = 0;
    // SAFETY: waits for our own child only (never -1: tokio owns other children's statuses).
    unsafe { libc::waitpid(pid, &mut status, 0) };
    read?;
    if !(libc::WIFEXITED(status) && libc::WEXITSTATUS(status) == 0) || out.len() != paths.len() {
        return Err(io::Error::other(format!("the probe as uid {} failed (status {status:#x})", who.uid)));
    }
    Ok(out.into_iter().map(|b| b == b'1').collect())
}

/// The mount point under which `path` lies (from `/proc/self/mountinfo`), if known.
fn mount_point_of(path: &Path) -> Option<PathBuf> {
    let text = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    text.lines()
        .filter_map(|l| l.split(' ').nth(4))
        .map(unescape_mountinfo)
        .filter(|m| path.starts_with(m))
        .max_by_key(|m| m.components().count())
}

/// Mountinfo's octal escapes (`\040` for a space).
fn unescape_mountinfo(s: &str) -> PathBuf {
    let b = s.as_bytes();
    let mut out = Vec::with_capacity(b.len());
    let mut i = 0;
    while i < b.len() {
        if b[i] == b'\\' && i + 3 < b.len() && b[i + 1..i + 4].iter().all(|c| (b'0'..=b'7').contains(c)) {
            out.push((b[i + 1] - b'0') * 64 + (b[i + 2] - b'0') * 8 + (b[i + 3] - b'0'));
            i += 4;
        } else {
            out.push(b[i]);
            i += 1;
        }
    }
    PathBuf::from(<std::ffi::OsString as std::os::unix::ffi::OsStringExt>::from_vec(out))
}

/// The readable ones among `paths`, each with why: the probe's verdict, explained by the bits.
fn readable(paths: &[PathBuf], who: &Access) -> io::Result<Vec<(PathBuf, String)>> {
    let verdicts = probe(paths, who)?;
    Ok(paths
        .iter()
        .zip(verdicts)
        .filter(|(_, open)| *open)
        .map(|(p, _)| {
            let why = match reach(p, who, &Stat::of) {
                Ok(why) => why,
                Err(bits) => format!("the bits say no ({bits}), but an open as its uid succeeded: an ACL?"),
            };
            (p.clone(), why)
        })
        .collect())
}

/// Step 3: `dir` made root's and 0700, when it is a directory of the container's own root
/// filesystem; else left untouched, and why (it is a mount or lies on one).
fn lock_dir(dir: &Path) -> Result<Result<(), String>, SecretsError> {
    use std::os::unix::fs::PermissionsExt;
    let Ok(real) = std::fs::canonicalize(dir) else {
        return Ok(Err(format!("SECRETS_DIR {} cannot be resolved", dir.display())));
    };
    match mount_point_of(&real) {
        Some(m) if m == Path::new("/") && real != Path::new("/") => {}
        Some(m) if m == real => {
            return Ok(Err(format!(
                "SECRETS_DIR {} is a mount, whose owner and mode are the host's, so ci-runner leaves them as they are",
                real.display()
            )));
        }
        m => {
            let on = m.map(|m| m.display().to_string()).unwrap_or_else(|| "an unknown mount".into());
            return Ok(Err(format!("SECRETS_DIR {} lies on the mount {on}, whose owners and modes are the host's, so ci-runner leaves them as they are", real.display())));
        }
    }
    let fail = |source| SecretsError::Lock { dir: real.clone(), source };
    nix::unistd::chown(&real, Some(nix::unistd::Uid::from_raw(0)), Some(nix::unistd::Gid::from_raw(0)))
        .map_err(|e| fail(e.into()))?;
    std::fs::set_permissions(&real, std::fs::Permissions::from_mode(0o700)).map_err(fail)?;
    Ok(Ok(()))
}

/// Steps 1-4 for `cfg`; `Ok` once nothing secret is readable by the runner user.
pub fn protect(cfg: &Config) -> Result<(), SecretsError> {
    let Some(user) = &cfg.runner_user else {
        // Not root: the runner runs as ourselves, and there is nobody to hide from.
        return Ok(());
    };
    if user.uid == 0 {
        warn!(user = %user.name, "RUNNER_USER is root: jobs can read every secret.");
        return Ok(());
    }
    if Path::new(SUDO_RULE).exists() {
        warn!(
            file = SUDO_RULE,
            "A sudo rule lets jobs run ci-storage as root, and so read every secret (the image's CI_STORAGE_SUDO=1)."
        );
    }
    let who = Access::of(user);
    let probe_err = |source| SecretsError::Probe { user: user.name.clone(), source };

    let mut environs: Vec<PathBuf> = vec!["/proc/1/environ".into()];
    for pid in [nix::unistd::getppid().as_raw(), std::process::id() as i32] {
        let p = PathBuf::from(format!("/proc/{pid}/environ"));
        if !environs.contains(&p) {
            environs.push(p);
        }
    }
    if let Some((path, _)) = readable(&environs, &who).map_err(probe_err)?.into_iter().next() {
        return Err(SecretsError::Environ { user: user.name.clone(), uid: user.uid, path });
    }

    let files = files_under(&cfg.secrets_dir);
    if files.is_empty() {
        return Ok(());
    }
    let mut open = readable(&files, &who).map_err(probe_err)?;
    if open.is_empty() {
        info!(dir = %cfg.secrets_dir.display(), files = files.len(), user = %user.name, "Secrets checked: none readable by the runner user.");
        return Ok(());
    }
    let untouched = match lock_dir(&cfg.secrets_dir)? {
        Ok(()) => {
            info!(dir = %cfg.secrets_dir.display(), user = %user.name, "SECRETS_DIR made root-only (0700): the runner user could read the secrets in it.");
            open = readable(&files, &who).map_err(probe_err)?;
            "they lie outside SECRETS_DIR (links out of it), which ci-runner made root-only".to_string()
        }
        Err(why) => why,
    };
    if !open.is_empty() {
        return Err(SecretsError::Readable { user: user.name.clone(), uid: user.uid, readable: open, untouched });
    }
    info!(dir = %cfg.secrets_dir.display(), files = files.len(), user = %user.name, "Secrets checked: none readable by the runner user.");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::HashMap;

    fn who() -> Access {
        Access { uid: 1000, gid: 1000, groups: vec![1000, 999] }
    }

    fn tree(entries: &[(&str, u32, u32, u32)]) -> impl Fn(&Path) -> io::Result<Stat> {
        let map: HashMap<PathBuf, Stat> = entries
            .iter()
            .map(|(p, mode, uid, gid)| (PathBuf::from(p), Stat { mode: *mode, uid: *uid, gid: *gid }))
            .collect();
        move |p: &Path| map.get(p).copied().ok_or_else(|| io::Error::from(io::ErrorKind::NotFound))
    }

    /// What must never happen: a secret called unreadable that the runner user can read.
    #[test]
    fn a_root_only_directory_protects_any_file_below_it() {
        let st = tree(&[
            ("/", 0o755, 0, 0),
            ("/run", 0o755, 0, 0),
            ("/run/secrets", 0o700, 0, 0),
            ("/run/secrets/GH_TOKEN", 0o644, 1000, 1000),
        ]);
        let e = reach(Path::new("/run/secrets/GH_TOKEN"), &who(), &st).unwrap_err();
        assert!(e.contains("/run/secrets is 0700 owned by 0:0"), "{e}");
    }

    #[test]
    fn the_owner_reads_its_own_0600_file_in_its_own_directory() {
        let st = tree(&[
            ("/", 0o755, 0, 0),
            ("/run", 0o755, 0, 0),
            ("/run/secrets", 0o700, 1000, 1000),
            ("/run/secrets/GH_TOKEN", 0o600, 1000, 1000),
        ]);
        let why = reach(Path::new("/run/secrets/GH_TOKEN"), &who(), &st).unwrap();
        assert!(why.contains("0600, the runner user's own 1000:1000"), "{why}");
    }

    #[test]
    fn group_and_other_bits_follow_the_kernels_order() {
        let me = who();
        // A group member gets the group's bits even when the others' are wider.
        assert!(!allows(Stat { mode: 0o607, uid: 0, gid: 999 }, &me, READ));
        assert!(allows(Stat { mode: 0o640, uid: 0, gid: 999 }, &me, READ));
        // The owner gets the owner's bits even when the others' are wider.
        assert!(!allows(Stat { mode: 0o077, uid: 1000, gid: 0 }, &me, READ));
        assert!(allows(Stat { mode: 0o604, uid: 0, gid: 0 }, &me, READ));
        assert!(!allows(Stat { mode: 0o640, uid: 0, gid: 0 }, &me, READ));
        assert!(allows(Stat { mode: 0o711, uid: 0, gid: 0 }, &me, SEARCH));
        assert!(!allows(Stat { mode: 0o744, uid: 0, gid: 0 }, &me, SEARCH));
    }

    #[test]
    fn mountinfo_escapes_are_undone() {
        assert_eq!(unescape_mountinfo(r"/run/my\040secrets"), PathBuf::from("/run/my secrets"));
        assert_eq!(unescape_mountinfo(r"/a\134b"), PathBuf::from(r"/a\b"));
        assert_eq!(unescape_mountinfo("/plain"), PathBuf::from("/plain"));
    }

    /// The probe against the real kernel: as root, a 0600 root file is closed to uid 65534 and
    /// a 0644 one open; skipped when not root.
    #[test]
    fn the_probe_opens_as_the_runner_uid() {
        if !nix::unistd::geteuid().is_root() {
            crate::prerequisite_missing("root", "the probe test needs root: run the tests as root");
            return;
        }
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let (closed, open) = (dir.path().join("closed"), dir.path().join("open"));
        std::fs::write(&closed, "x").unwrap();
        std::fs::write(&open, "x").unwrap();
        std::fs::set_permissions(&closed, std::fs::Permissions::from_mode(0o600)).unwrap();
        std::fs::set_permissions(&open, std::fs::Permissions::from_mode(0o644)).unwrap();
        let nobody = Access { uid: 65534, gid: 65534, groups: vec![65534] };
        let got = probe(&[closed, open, "/proc/1/environ".into()], &nobody).unwrap();
        assert_eq!(got, [false, true, false]);
    }
}
