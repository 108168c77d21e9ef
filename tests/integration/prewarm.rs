//! The boot-time pre-warm against a real sshd and rsync on loopback: the work dir must be
//! what `rsync -a` of the newest slot gives, and every failure must end in a cold start.

use std::collections::BTreeMap;
use std::ffi::CString;
use std::net::TcpListener;
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(60);

/// A real OpenSSH server on 127.0.0.1 with a fresh host key and one authorized client key.
pub struct Sshd {
    pub dir: tempfile::TempDir,
    pub port: u16,
    child: Child,
}

fn keygen(path: &Path) {
    let ok = Command::new("ssh-keygen")
        .args(["-q", "-t", "ed25519", "-N", "", "-f"])
        .arg(path)
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "ssh-keygen failed");
}

impl Sshd {
    /// None (after saying why) when this machine cannot run one: not root, or no sshd.
    pub fn start() -> Option<Sshd> {
        if !require_root("the pre-warm tests (sshd)") {
            return None;
        }
        if !Path::new("/usr/sbin/sshd").exists() && !require("sshd") {
            return None;
        }
        if !require("rsync") || !require("ssh-keygen") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        keygen(&d.join("host_key"));
        keygen(&d.join("client_key"));
        std::fs::copy(d.join("client_key.pub"), d.join("authorized_keys")).unwrap();
        std::fs::create_dir_all("/run/sshd").unwrap();
        let port = free_port();
        std::fs::write(
            d.join("sshd_config"),
            format!(
                "ListenAddress 127.0.0.1:{port}\nHostKey {d}/host_key\nAuthorizedKeysFile {d}/authorized_keys\n\
                 PermitRootLogin prohibit-password\nStrictModes no\nPasswordAuthentication no\n\
                 KbdInteractiveAuthentication no\nUsePAM no\nPidFile none\nMaxStartups 100:30:200\n",
                d = d.display()
            ),
        )
        .unwrap();
        let child = Command::new("/usr/sbin/sshd")
            .args(["-D", "-e", "-f"])
            .arg(d.join("sshd_config"))
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(d.join("sshd.log")).unwrap())
            .spawn()
            .expect("start sshd");
        wait_for("sshd to listen", Duration::from_secs(20), || {
            std::net::TcpStream::connect(("127.0.0.1", port)).ok().map(|_| ())
        });
        Some(Sshd { dir, port, child })
    }

    pub fn key_file(&self) -> PathBuf {
        self.dir.path().join("client_key")
    }

    pub fn ssh_command(&self) -> String {
        format!(
            "ssh -i {} -p {} -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null -oLogLevel=error",
            self.key_file().display(),
            self.port
        )
    }

    /// `rsync -a` of a remote dir, the way ci-storage loads (its excludes included). rsync 3.5
    /// now and then leaves the top directory's mtime at the time of its last write into it
    /// (seen here about one run in five, the source unchanged, and once even after a second
    /// run): the top directory's mtime is then taken from the source itself, which is on this
    /// machine, so the comparison is with the slot and not with rsync's slip.
    pub fn rsync(&self, remote: &Path, local: &Path) {
        use nix::sys::stat::{utimensat, UtimensatFlags};
        use nix::sys::time::TimeSpec;
        for _ in 0..2 {
            let ok = Command::new("rsync")
                .args(["-a", "--exclude=.ci-storage.meta", "-e", &self.ssh_command()])
                .arg(format!("root@127.0.0.1:{}/", remote.display()))
                .arg(format!("{}/", local.display()))
                .status()
                .unwrap()
                .success();
            assert!(ok, "rsync failed");
        }
        let src = std::fs::metadata(remote).unwrap();
        let dst = std::fs::metadata(local).unwrap();
        utimensat(
            None,
            local,
            &TimeSpec::new(dst.atime(), dst.atime_nsec()),
            &TimeSpec::new(src.mtime(), src.mtime_nsec()),
            UtimensatFlags::NoFollowSymlink,
        )
        .unwrap();
    }
}

impl Drop for Sshd {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn set_mtime(path: &Path, sec: i64, nsec: i64) {
    let c = CString::new(path.as_os_str().as_bytes()).unwrap();
    let t = [libc::timespec { tv_sec: 0, tv_nsec: libc::UTIME_OMIT }, libc::timespec { tv_sec: sec, tv_nsec: nsec }];
    // SAFETY: a valid C string and a two-element array.
    let rc = unsafe { libc::utimensat(libc::AT_FDCWD, c.as_ptr(), t.as_ptr(), libc::AT_SYMLINK_NOFOLLOW) };
    assert_eq!(rc, 0, "utimensat {}", path.display());
}

/// Every entry under `root`, post-order, for setting times after contents.
fn walk(root: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(root).unwrap().flatten().map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        if std::fs::symlink_metadata(&p).unwrap().is_dir() {
            walk(&p, out);
        }
        out.push(p);
    }
}

/// A slot as ci-storage leaves one: nested dirs, odd names, empty dirs and files, a large
/// file, symlinks of every kind, hard links (inside the slot and shared with a sibling
/// slot, as `--link-dest` makes them), modes from 0444 to 0755, read-only dirs, a meta file
/// at the top and a stray one deeper, and nanosecond mtimes everywhere.
pub fn build_slot(slot: &Path, sibling_file: Option<&Path>, seed: u8) {
    let w = |rel: &str, data: &[u8], mode: u32| {
        let p = slot.join(rel);
        std::fs::create_dir_all(p.parent().unwrap()).unwrap();
        std::fs::write(&p, data).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(mode)).unwrap();
    };
    std::fs::create_dir_all(slot).unwrap();
    w("README.md", format!("slot seed {seed}\n").as_bytes(), 0o644);
    w("src/main.rs", b"fn main() {}\n", 0o644);
    w("bin/run", b"#!/bin/sh\necho hi\n", 0o755);
    w("secret/key", b"private", 0o600);
    w("ro/file", b"read only", 0o444);
    w("empty-file", b"", 0o644);
    for name in ["with space", "new\nline", "ünïcødé", "-dash", ".hidden", "back\\slash", "quote'\"", "star*?[x]"] {
        w(&format!("odd/{name}"), name.as_bytes(), 0o644);
    }
    let mut big = Vec::with_capacity(3 << 20);
    let mut x: u32 = 0x9e37_79b9 ^ u32::from(seed);
    while big.len() < (3 << 20) + 123 {
        x ^= x << 13;
        x ^= x >> 17;
        x ^= x << 5;
        big.extend_from_slice(&x.to_le_bytes());
    }
    w("target/big.bin", &big, 0o644);
    for i in 0..300 {
        w(&format!("many/d{}/f{i}.txt", i % 7), format!("{i} {seed}").as_bytes(), 0o644);
    }
    w("deep/.ci-storage.meta", b"a stray meta, excluded like rsync's --exclude excludes it", 0o644);
    std::fs::create_dir_all(slot.join("empty-dir")).unwrap();
    std::fs::create_dir_all(slot.join("a/b/c/empty")).unwrap();
    std::os::unix::fs::symlink("src/main.rs", slot.join("link-rel")).unwrap();
    std::os::unix::fs::symlink("/etc/hostname", slot.join("link-abs")).unwrap();
    std::os::unix::fs::symlink("nowhere", slot.join("link-dangling")).unwrap();
    std::os::unix::fs::symlink("src", slot.join("link-dir")).unwrap();
    std::fs::hard_link(slot.join("README.md"), slot.join("hard-a")).unwrap();
    std::fs::hard_link(slot.join("README.md"), slot.join("src/hard-b")).unwrap();
    if let Some(f) = sibling_file {
        std::fs::hard_link(f, slot.join("shared-with-sibling")).unwrap();
    }
    std::fs::set_permissions(slot.join("ro"), std::fs::Permissions::from_mode(0o555)).unwrap();
    let mut all = Vec::new();
    walk(slot, &mut all);
    for (i, p) in all.iter().enumerate() {
        set_mtime(p, 1_700_000_000 + i as i64 * 17, (i as i64 * 123_456_789 + i64::from(seed)) % 1_000_000_000);
    }
    set_mtime(slot, 1_700_000_000, 987_654_321);
}

/// What a tree is, for comparing two: per path its type, mode, size, content or link target,
/// and mtime to the nanosecond. Owners are compared separately.
#[derive(Debug, PartialEq, Eq)]
pub struct Entry {
    kind: &'static str,
    mode: u32,
    mtime: (i64, i64),
    data: Vec<u8>,
}

pub fn describe_tree(root: &Path) -> BTreeMap<PathBuf, Entry> {
    let mut all = Vec::new();
    walk(root, &mut all);
    all.push(root.to_path_buf());
    all.into_iter()
        .map(|p| {
            let m = std::fs::symlink_metadata(&p).unwrap();
            let ft = m.file_type();
            let (kind, data) = if ft.is_symlink() {
                ("symlink", std::fs::read_link(&p).unwrap().as_os_str().as_bytes().to_vec())
            } else if ft.is_dir() {
                ("dir", Vec::new())
            } else {
                ("file", std::fs::read(&p).unwrap())
            };
            let rel = p.strip_prefix(root).unwrap().to_path_buf();
            (rel, Entry { kind, mode: m.mode() & 0o7777, mtime: (m.mtime(), m.mtime_nsec()), data })
        })
        .collect()
}

pub fn owners(root: &Path) -> Vec<(PathBuf, u32, u32)> {
    let mut all = Vec::new();
    walk(root, &mut all);
    all.push(root.to_path_buf());
    all.into_iter()
        .map(|p| {
            let m = std::fs::symlink_metadata(&p).unwrap();
            (p, m.uid(), m.gid())
        })
        .collect()
}

pub fn assert_same_tree(ours: &Path, reference: &Path) {
    let (a, b) = (describe_tree(ours), describe_tree(reference));
    let only_a: Vec<_> = a.keys().filter(|k| !b.contains_key(*k)).collect();
    let only_b: Vec<_> = b.keys().filter(|k| !a.contains_key(*k)).collect();
    assert!(only_a.is_empty() && only_b.is_empty(), "only in ours: {only_a:?}; only in rsync's: {only_b:?}");
    for (k, v) in &a {
        assert_eq!(Some(v), b.get(k), "{} differs from rsync's copy", k.display());
    }
}

/// The storage dir ci-storage's action derives for the test's work dir.
fn storage_dir(storage_root: &Path, runner: &RunnerDir) -> (PathBuf, PathBuf) {
    let local = runner.path().join("_work/octo-repo/octo-repo");
    let slug = local.display().to_string().replace('/', "_");
    (storage_root.join("octo-org/octo-repo").join(slug), local)
}

struct Storage {
    root: tempfile::TempDir,
    dir: PathBuf,
    local: PathBuf,
    tmp: tempfile::TempDir,
}

fn storage(runner: &RunnerDir) -> Storage {
    let root = tempfile::tempdir().unwrap();
    std::fs::set_permissions(root.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let (dir, local) = storage_dir(root.path(), runner);
    std::fs::create_dir_all(&dir).unwrap();
    let tmp = tempfile::tempdir().unwrap();
    std::fs::set_permissions(tmp.path(), std::fs::Permissions::from_mode(0o1777)).unwrap();
    Storage { root, dir, local, tmp }
}

fn prewarm_env(
    gh: &FakeGithub,
    runner: &RunnerDir,
    st: &Storage,
    host: &str,
    key: &Path,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    let key = std::fs::read_to_string(key).unwrap();
    env.extend([
        ("CI_STORAGE_HOST".to_string(), host.to_string()),
        ("CI_STORAGE_PRIVATE_KEY".to_string(), key),
        ("CI_STORAGE_DIR".to_string(), st.root.path().display().to_string()),
        ("TMPDIR".to_string(), st.tmp.path().display().to_string()),
    ]);
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

fn stop(mut sup: Supervisor) {
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
}

fn log_index(sup: &Supervisor, needle: &str) -> Option<usize> {
    sup.log().lines().position(|l| l.contains(needle))
}

#[test]
fn prewarm_loads_the_newest_slot_exactly_as_rsync_would_before_the_runner_listens() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    // An older slot, the newest committed one, and decoys ci-storage never lists: an
    // in-flight store and a backup, both made last so that only their names exclude them.
    build_slot(&st.dir.join("100"), None, 1);
    std::fs::write(st.dir.join("100/.ci-storage.meta"), "full_snapshot_history=90\nhints=old\n").unwrap();
    build_slot(&st.dir.join("200"), Some(&st.dir.join("100/README.md")), 2);
    std::fs::write(st.dir.join("200/.ci-storage.meta"), "full_snapshot_history=100 90\nhints=@abc main\n").unwrap();
    build_slot(&st.dir.join("300.tmp.1700000000"), None, 3);
    build_slot(&st.dir.join("200.bak.1700000000"), None, 4);

    let env = prewarm_env(&gh, &runner, &st, &format!("root@127.0.0.1:{}", sshd.port), &sshd.key_file(), &[]);
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let health = sup.health().unwrap();
    assert_eq!(health["prewarm"]["outcome"], "warm", "{health}");
    assert_eq!(health["prewarm"]["slot"], "200", "{health}");
    // /health may say idle a moment before the log capture has the line (seen under load).
    sup.wait_log("Listening for Jobs", BOOT);
    let warmed = log_index(&sup, "Work dir pre-warmed.").expect("no pre-warm line");
    let listening = log_index(&sup, "Listening for Jobs").expect("no Listening line");
    assert!(warmed < listening, "the runner listened before the work dir was warm:\n{}", sup.log());

    let reference = tempfile::tempdir().unwrap();
    sshd.rsync(&st.dir.join("200"), reference.path());
    assert_same_tree(&st.local, reference.path());
    for (path, uid, gid) in owners(&st.local) {
        assert_eq!((uid, gid), (65534, 65534), "{} is not the runner user's", path.display());
    }
    // The local meta, as `ci-storage load` writes it: the loaded slot first.
    let meta_file =
        st.tmp.path().join(format!(".ci-storage.meta.{}", st.local.display().to_string().replace(['/', '.'], "_")));
    let meta = std::fs::read_to_string(&meta_file).unwrap_or_else(|e| panic!("{}: {e}", meta_file.display()));
    assert_eq!(meta, "full_snapshot_history=200 100 90\nhints=@abc main\n");
    // Nothing left beside the work dir.
    let siblings: Vec<_> =
        std::fs::read_dir(st.local.parent().unwrap()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert_eq!(siblings, vec![std::ffi::OsString::from("octo-repo")]);
    stop(sup);
}

/// Boots with the pre-warm failing in some way: the runner must still come up, cold, with an
/// empty work dir and the reason in the log and on /health.
fn assert_cold_start(env: Vec<(String, String)>, st: &Storage, reason: &str) {
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let health = sup.health().unwrap();
    assert_eq!(health["prewarm"]["outcome"], "failed", "{health}");
    let error = health["prewarm"]["error"].as_str().unwrap_or_default().to_string();
    assert!(error.contains(reason), "expected {reason:?} in the error: {error}");
    assert!(sup.log_has("Pre-warm failed; the runner starts cold."), "{}", sup.log());
    let left = std::fs::read_dir(&st.local).map(|d| d.count()).unwrap_or(0);
    assert_eq!(left, 0, "the work dir was half filled");
    if let Some(parent) = st.local.parent().filter(|p| p.exists()) {
        let stray: Vec<_> =
            std::fs::read_dir(parent).unwrap().flatten().filter(|e| e.file_name() != "octo-repo").collect();
        assert!(stray.is_empty(), "a staging dir was left behind: {stray:?}");
    }
    stop(sup);
}

#[test]
fn prewarm_with_the_storage_down_starts_cold() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    build_slot(&st.dir.join("1"), None, 1);
    // A port nothing listens on.
    let env = prewarm_env(&gh, &runner, &st, &format!("127.0.0.1:{}", free_port()), &sshd.key_file(), &[]);
    assert_cold_start(env, &st, "failed to connect");
}

#[test]
fn prewarm_with_a_wrong_key_starts_cold() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    build_slot(&st.dir.join("1"), None, 1);
    let other = tempfile::tempdir().unwrap();
    keygen(&other.path().join("k"));
    let env = prewarm_env(&gh, &runner, &st, &format!("root@127.0.0.1:{}", sshd.port), &other.path().join("k"), &[]);
    assert_cold_start(env, &st, "CI_STORAGE_PRIVATE_KEY");
}

/// A host that accepts the connection and then says nothing, like a wedged one: its port,
/// and the thread holding the connection (dropped, it lets go).
fn silent_host() -> (u16, std::thread::JoinHandle<std::io::Result<std::net::TcpStream>>) {
    let silent = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = silent.local_addr().unwrap().port();
    (port, std::thread::spawn(move || silent.accept().map(|(s, _)| s)))
}

#[test]
fn prewarm_from_a_storage_host_that_stalls_starts_cold() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    let (port, held) = silent_host();
    let env = prewarm_env(
        &gh,
        &runner,
        &st,
        &format!("root@127.0.0.1:{port}"),
        &sshd.key_file(),
        &[("CI_STORAGE_STALL_TIMEOUT_SEC", "1")],
    );
    assert_cold_start(env, &st, "handshake");
    drop(held);
}

/// SIGTERM while the pre-warm is stuck on a silent host: the boot stops at once, exit 0.
/// Never: a wait for the stall timeout (60 s here), a registration left, a half-filled work dir.
#[test]
fn sigterm_during_a_stalled_prewarm_stops_the_boot_and_leaves_nothing() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    let (port, held) = silent_host();
    let env = prewarm_env(
        &gh,
        &runner,
        &st,
        &format!("root@127.0.0.1:{port}"),
        &sshd.key_file(),
        &[("CI_STORAGE_STALL_TIMEOUT_SEC", "60"), ("CI_STORAGE_TIMEOUT_SEC", "120")],
    );
    let mut sup = Supervisor::start(&env);
    wait_for("the pre-warm to start", BOOT, || sup.health().filter(|h| !h["prewarm"].is_null()).map(|_| ()));
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    let status = sup.wait_exit(BOOT);
    let log = sup.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(gh.runners().is_empty(), "left registered: {:?}", gh.runners());
    assert_eq!(std::fs::read_dir(&st.local).map(|d| d.count()).unwrap_or(0), 0, "the work dir was half filled");
    drop(held);
}

#[test]
fn prewarm_with_no_young_slot_starts_cold_without_error() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    // Only what ci-storage never loads: in-flight and backup dirs.
    build_slot(&st.dir.join("5.tmp.1"), None, 1);
    build_slot(&st.dir.join("5.bak.2"), None, 2);
    let env = prewarm_env(&gh, &runner, &st, &format!("root@127.0.0.1:{}", sshd.port), &sshd.key_file(), &[]);
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let health = sup.health().unwrap();
    assert_eq!(health["prewarm"]["outcome"], "cold", "{health}");
    assert_eq!(std::fs::read_dir(&st.local).map(|d| d.count()).unwrap_or(0), 0);
    stop(sup);
}

#[test]
fn a_missing_storage_key_is_a_configuration_error_naming_it() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut env = base_env(&gh, &runner);
    env.push(("CI_STORAGE_HOST".into(), "127.0.0.1:10022".into()));
    env.push(("SECRETS_DIR".into(), "/nonexistent".into()));
    let mut sup = Supervisor::start(&env);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(3), "{}", sup.log());
    assert!(sup.log_has("CI_STORAGE_PRIVATE_KEY"), "{}", sup.log());
    assert!(gh.rest_requests("POST", "registration-token").is_empty(), "GitHub was called");
}

#[test]
fn prewarm_reaches_the_storage_host_through_a_port_forward_that_is_up_first() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let st = storage(&runner);
    build_slot(&st.dir.join("7"), None, 7);
    // As in compose: CI_STORAGE_HOST is a forwarded port on the container's loopback
    // (127.0.0.5 here, so the forward does not collide with sshd's own 127.0.0.1).
    let port = sshd.port.to_string();
    let env = prewarm_env(
        &gh,
        &runner,
        &st,
        &format!("root@127.0.0.5:{port}"),
        &sshd.key_file(),
        &[("FORWARD_HOST", "127.0.0.1"), ("FORWARD_PORTS", &port), ("FORWARD_BIND", "127.0.0.5")],
    );
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let health = sup.health().unwrap();
    assert_eq!(health["prewarm"]["outcome"], "warm", "{health}\n{}", sup.log());
    let reference = tempfile::tempdir().unwrap();
    sshd.rsync(&st.dir.join("7"), reference.path());
    assert_same_tree(&st.local, reference.path());
    stop(sup);
}

/// A tmpfs mounted for a test, unmounted (lazily) when dropped.
struct Tmpfs(PathBuf);

impl Tmpfs {
    /// None (after saying so) where mounting is not allowed: the test then runs on the disk.
    fn mount(at: &Path, opts: &str) -> Option<Tmpfs> {
        std::fs::create_dir_all(at).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", opts, "tmpfs"])
            .arg(at)
            .stderr(Stdio::null())
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            eprintln!("note: no tmpfs at {} (mount refused); the files go to the disk, slower", at.display());
        }
        ok.then(|| Tmpfs(at.to_path_buf()))
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

/// A slot of `files` small files, 1,000 per directory, made on two threads (a few seconds for
/// 100k): returns the files' total size.
fn build_many(slot: &Path, files: u32) -> u64 {
    let per_dir = 1000;
    let dirs = files.div_ceil(per_dir);
    let make = |range: std::ops::Range<u32>| -> u64 {
        let mut bytes = 0;
        for d in range {
            let dir = slot.join(format!("d{d:03}"));
            std::fs::create_dir_all(&dir).unwrap();
            for i in d * per_dir..((d + 1) * per_dir).min(files) {
                let data = format!("file {i}\n").repeat(1 + (i % 7) as usize);
                std::fs::write(dir.join(format!("f{i:06}")), &data).unwrap();
                bytes += data.len() as u64;
            }
        }
        bytes
    };
    std::fs::create_dir_all(slot).unwrap();
    let half = dirs / 2;
    let total = std::thread::scope(|s| {
        let a = s.spawn(|| make(0..half));
        make(half..dirs) + a.join().unwrap()
    });
    // Not part of what a load makes, and so never counted in its totals.
    std::fs::write(slot.join(".ci-storage.meta"), "full_snapshot_history=\nhints=\n").unwrap();
    total
}

/// The numbers of a progress line, `Pre-warm: 41,000/100,000 files, …`: (done, total) files.
fn progress_files(line: &str) -> Option<(u64, u64)> {
    let rest = &line[line.find("Pre-warm: ")? + "Pre-warm: ".len()..];
    let (done, rest) = rest.split_once('/')?;
    let total = rest.split_once(" files")?.0;
    let n = |s: &str| s.replace(',', "").parse::<u64>().ok();
    Some((n(done)?, n(total)?))
}

/// A pre-warm of 100k files, progress lines every 0.1 s: the log shows lines with the slot's
/// totals, and /health, polled while it loads, shows it running part way.
/// Never: counters that go backwards, totals other than the slot's (the meta file counted),
/// more done than the slot holds, a running pre-warm without its counters, progress lines
/// once it is over.
#[test]
fn a_prewarm_of_100k_files_shows_its_progress_in_the_log_and_on_health_while_it_runs() {
    let Some(sshd) = Sshd::start() else { return };
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // 100k files on a disk cost minutes to make and remove on a busy machine: both sides on
    // a tmpfs of their own (the original image's advice for the work dir, too).
    let st = storage(&runner);
    let _slots = Tmpfs::mount(&st.dir, "size=1g,mode=0755");
    let _work = Tmpfs::mount(st.local.parent().unwrap().parent().unwrap(), "size=1g,mode=1777");
    const FILES: u64 = 100_000;
    let made = std::time::Instant::now();
    let bytes = build_many(&st.dir.join("1"), FILES as u32);
    eprintln!("slot of {FILES} files, {bytes} bytes, made in {:.1} s", made.elapsed().as_secs_f64());
    let env = prewarm_env(
        &gh,
        &runner,
        &st,
        &format!("root@127.0.0.1:{}", sshd.port),
        &sshd.key_file(),
        &[("CI_STORAGE_PROGRESS_SEC", "0.1")],
    );
    let sup = Supervisor::start(&env);
    let mut samples = Vec::new();
    let last = wait_for("the pre-warm to end", BOOT, || {
        let p = sup.health()?["prewarm"].clone();
        if p.is_null() {
            return None;
        }
        samples.push(p.clone());
        (p["outcome"] != "running").then_some(p)
    });
    assert_eq!(last["outcome"], "warm", "{last}\n{}", sup.log());
    eprintln!("loaded in {} s; {} /health samples", last["seconds"], samples.len());
    let n = |v: &serde_json::Value, k: &str| v[k].as_u64();
    let mut seen_part_way = false;
    let (mut files, mut done_bytes) = (0, 0);
    for p in &samples {
        let (f, b) = (n(p, "files").expect("files"), n(p, "bytes").expect("bytes"));
        assert!(f >= files && b >= done_bytes, "went backwards: {f} files, {b} bytes after {files}, {done_bytes}");
        (files, done_bytes) = (f, b);
        assert!(f <= FILES && b <= bytes, "more done than the slot holds: {p}");
        if !p["total_files"].is_null() {
            assert_eq!((n(p, "total_files"), n(p, "total_bytes")), (Some(FILES), Some(bytes)), "{p}");
        }
        if p["outcome"] == "running" {
            assert!(p["rate_bytes_per_sec"].as_f64().is_some(), "a running pre-warm without its rate: {p}");
            if f > 0 && f < FILES && !p["total_files"].is_null() {
                seen_part_way = true;
                assert!(p["eta_seconds"].as_f64().is_some(), "part way, no ETA: {p}");
            }
        }
    }
    assert!(seen_part_way, "/health never showed the load part way ({} samples): {samples:?}", samples.len());
    assert_eq!((n(&last, "files"), n(&last, "bytes")), (Some(FILES), Some(bytes)), "{last}");
    assert_eq!(n(&last, "total_files"), Some(FILES), "{last}");

    let log = sup.log();
    let lines: Vec<&str> = log.lines().filter(|l| l.contains("Pre-warm: ")).collect();
    assert!(!lines.is_empty(), "no progress line:\n{log}");
    let mut before = 0;
    for line in &lines {
        if let Some((done, total)) = progress_files(line) {
            assert_eq!(total, FILES, "{line}");
            assert!(done >= before && done <= FILES, "{line}");
            before = done;
        }
    }
    assert!(lines.iter().any(|l| progress_files(l).is_some()), "no line with the slot's totals: {lines:?}");
    let warmed = log_index(&sup, "Work dir pre-warmed.").expect("no pre-warm line");
    let last_line = log.lines().enumerate().filter(|(_, l)| l.contains("Pre-warm: ")).map(|(i, _)| i).last().unwrap();
    assert!(last_line < warmed, "a progress line after the load was over:\n{log}");
    assert_eq!(std::fs::read_dir(st.local.join("d099")).unwrap().count(), 1000);
    sup.wait_state("idle", BOOT);
    let m = sup.metrics();
    assert!(m.contains(&format!("ci_runner_prewarm_files{{of=\"slot\"}} {FILES}\n")), "{m}");
    assert!(m.contains("ci_runner_boot_phase_seconds{phase=\"prewarm\"}"), "{m}");
    stop(sup);
}
