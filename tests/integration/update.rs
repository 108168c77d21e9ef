//! The runner updated at boot (`RUNNER_UPDATE_AT_BOOT`, issue #17) from a loopback release
//! server (tests/fakes/fake_releases.py) serving a tarball of the fake runner that reports a
//! newer version (`bin/fake-version`).

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::Value;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(60);
const NEW: &str = "2.340.0";
const INSTALLED: &str = "2.336.0";

fn asset() -> String {
    let arch = match std::env::consts::ARCH {
        "aarch64" => "arm64",
        "arm" => "arm",
        _ => "x64",
    };
    format!("actions-runner-linux-{arch}-{NEW}.tar.gz")
}

/// A release tarball of the fake runner that says it is `version`, laid out as the real one
/// (`./bin`, `./config.sh` … at the top), in `dir`.
fn make_tarball(dir: &Path, version: &str) -> PathBuf {
    let src = tempfile::tempdir().unwrap();
    let status = Command::new("cp").arg("-a").arg(repo_root().join("tests/fakes/runner/.")).arg(src.path()).status();
    assert!(status.unwrap().success());
    let _ = std::fs::remove_dir_all(src.path().join("bin/__pycache__"));
    std::fs::write(src.path().join("bin/fake-version"), format!("{version}\n")).unwrap();
    let out = dir.join(asset());
    let status = Command::new("tar").arg("-czf").arg(&out).arg("-C").arg(src.path()).arg(".").status();
    assert!(status.unwrap().success());
    out
}

/// The fake release server; its requests are read back from its log.
struct Releases {
    child: Child,
    port: u16,
    dir: tempfile::TempDir,
}

impl Releases {
    fn start(flags: &[&str]) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let assets = dir.path().join("assets");
        std::fs::create_dir(&assets).unwrap();
        make_tarball(&assets, NEW);
        let port_file = dir.path().join("port");
        let child = Command::new("/usr/bin/python3")
            .arg(repo_root().join("tests/fakes/fake_releases.py"))
            .args(["--listen", "127.0.0.1:0", "--version", NEW, "--dir"])
            .arg(&assets)
            .arg("--port-file")
            .arg(&port_file)
            .args(flags)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start fake_releases.py");
        let port = wait_for("the release server to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok())
        });
        Self { child, port, dir }
    }

    fn requests(&self) -> Vec<Value> {
        let log = std::fs::read_to_string(self.dir.path().join("port.requests")).unwrap_or_default();
        log.lines().map(|l| serde_json::from_str(l).unwrap()).collect()
    }

    fn paths(&self) -> Vec<String> {
        self.requests().iter().map(|r| r["path"].as_str().unwrap().to_string()).collect()
    }
}

impl Drop for Releases {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The update's variables pointed at `port` (a release server, or nothing), with the cache
/// in `cache`.
fn update_vars(port: u16, cache: &Path) -> Vec<(String, String)> {
    vec![
        ("RUNNER_UPDATE_AT_BOOT".into(), "true".into()),
        ("RUNNER_RELEASES_URL".into(), format!("http://127.0.0.1:{port}/releases")),
        ("RUNNER_RELEASES_API_URL".into(), format!("http://127.0.0.1:{port}/api/releases")),
        ("RUNNER_CACHE_DIR".into(), cache.display().to_string()),
    ]
}

fn env_for(
    gh: &FakeGithub,
    runner: &RunnerDir,
    vars: Vec<(String, String)>,
    extra: &[(&str, &str)],
) -> Vec<(String, String)> {
    let mut all: Vec<(&str, &str)> = vars.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    all.extend_from_slice(extra);
    env_with(gh, runner, &all)
}

/// The version the fake runner in `dir` reports (`bin/fake-version`, else 2.336.0); read,
/// not run, so that no root-owned `_diag` appears in the runner's root.
fn version_in(dir: &Path) -> String {
    assert!(dir.join("bin/Runner.Listener").is_file(), "{} has no bin/Runner.Listener", dir.display());
    std::fs::read_to_string(dir.join("bin/fake-version")).map(|v| v.trim().to_string()).unwrap_or(INSTALLED.into())
}

/// The position of the first log line containing `needle`.
fn line_of(sup: &Supervisor, needle: &str) -> usize {
    sup.log().lines().position(|l| l.contains(needle)).unwrap_or_else(|| panic!("no log line {needle:?}"))
}

/// A stamp as fresh as now: the install is not due by age.
fn stamp_fresh(runner: &RunnerDir) {
    std::fs::write(runner.path().join(".updated_at"), "now\n").unwrap();
}

#[test]
fn an_install_below_the_minimum_is_updated_then_registers_every_runner_on_the_new_version() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&[]));
    let cache = tempfile::tempdir().unwrap();
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    stamp_fresh(&runner);
    // Runner 2's root already made from the old install, hard links and all, as the image
    // lays roots out at build time: the update must not leave it on the old files.
    let root2 = roots.path().join("runners/2");
    std::fs::create_dir_all(&root2).unwrap();
    let linked = Command::new("cp").arg("-al").arg(runner.path().join("bin")).arg(&root2).status().unwrap();
    assert!(linked.success());
    for f in ["config.sh", "env.sh", "run.sh", "run-helper.sh.template"] {
        std::fs::hard_link(runner.path().join(f), root2.join(f)).unwrap();
    }
    if runner.user.is_some() {
        nix::unistd::chown(&root2, Some(nix::unistd::Uid::from_raw(65534)), Some(nix::unistd::Gid::from_raw(65534)))
            .unwrap();
    }
    let roots_dir = roots.path().join("runners").display().to_string();
    // 2.336.0 is below this minimum: without the update the boot would end with exit 6.
    let extra = [("RUNNER_MIN_VERSION", "2.338.0"), ("RUNNER_COUNT", "2"), ("RUNNER_ROOTS_DIR", roots_dir.as_str())];
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &extra));
    // Both listening, or one refused (exit 6: an old runner below the minimum).
    let states = wait_for("2 runners listening, or one failed", BOOT, || {
        let h = sup.health()?;
        let states: Vec<String> = h["runners"].as_array()?.iter().map(|r| r["state"].to_string()).collect();
        let idle = states.iter().filter(|s| *s == "\"idle\"").count();
        (idle == 2 || states.iter().any(|s| s == "\"failed\"")).then_some(states)
    });
    assert_eq!(version_in(runner.path()), NEW, "the install was not updated");
    assert_eq!(version_in(&root2), NEW, "runner 2's root still links the old install");
    assert!(states.iter().all(|s| s == "\"idle\""), "{states:?}");
    // Never a registration before the update decided; the version check saw the new runner.
    let updated = line_of(&sup, "Runner updated at boot.");
    assert!(updated < line_of(&sup, "Runner registered."), "registered before the update:\n{}", sup.log());
    assert!(sup.log_has("reason=version 2.336.0 is below RUNNER_MIN_VERSION"), "{}", sup.log());
    let checked = sup.log().lines().find(|l| l.contains("Runner version checked.")).map(str::to_string);
    assert!(
        checked.as_deref().is_some_and(|l| l.contains(&format!("version={NEW}"))),
        "the min-version check did not see {NEW}: {checked:?}"
    );
    // Never a half-unpacked install or a leftover staging: the swap finished and cleaned up.
    assert!(!runner.path().join(".ci-runner-update").exists());
    assert!(runner.path().join(".updated_at").exists());
    assert!(cache.path().join(asset()).is_file(), "the tarball is not cached");
    if let Some(_user) = runner.user {
        // As root: the runner user's files, never root's, in its install.
        for f in ["bin/Runner.Listener", "bin/fake-version", "config.sh", ".updated_at"] {
            assert_eq!(std::fs::metadata(runner.path().join(f)).unwrap().uid(), 65534, "{f} is not the runner user's");
        }
    }
    let paths = releases.paths();
    assert_eq!(paths.iter().filter(|p| p.contains("/download/")).count(), 1, "{paths:?}");
    assert!(releases.requests().iter().all(|r| r["auth"] == false), "GH_TOKEN went to a host that is not GH_API_URL's");
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(BOOT).success());
}

#[test]
fn a_warm_cache_is_verified_again_and_not_downloaded() {
    let (gh, releases) = (FakeGithub::start(), Releases::start(&[]));
    let cache = tempfile::tempdir().unwrap();
    for boot in 0..2 {
        // Never stamped: due by age, as an image's install without `.updated_at` is.
        let runner = RunnerDir::new();
        let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &[]));
        sup.wait_state("idle", BOOT);
        assert_eq!(version_in(runner.path()), NEW, "boot {boot}: not updated");
        assert!(sup.log_has(&format!("from_cache={}", boot == 1)), "boot {boot}:\n{}", sup.log());
        sup.signal(Signal::SIGTERM);
        assert!(sup.wait_exit(BOOT).success());
    }
    let paths = releases.paths();
    assert_eq!(paths.iter().filter(|p| p.contains("/download/")).count(), 1, "downloaded twice: {paths:?}");
    assert_eq!(paths.iter().filter(|p| p.ends_with("/latest")).count(), 2, "{paths:?}");
    if is_root() {
        // The cache is root's and 0700 here: the checksum kept beside the tarball is believed,
        // so the warm boot costs no API call.
        assert_eq!(paths.iter().filter(|p| p.contains("/api/")).count(), 1, "{paths:?}");
    }
}

#[test]
fn a_release_server_that_is_down_leaves_the_installed_runner_with_a_warn() {
    let (gh, runner) = (FakeGithub::start(), RunnerDir::new());
    let cache = tempfile::tempdir().unwrap();
    // Nothing listens there.
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(free_port(), cache.path()), &[]));
    sup.wait_state("idle", BOOT);
    let warn = line_of(&sup, "Failed to update the runner at boot; the installed runner is used.");
    assert!(sup.log().lines().nth(warn).unwrap().contains("WARN"), "{}", sup.log());
    assert!(warn < line_of(&sup, "Runner registered."));
    // Never a lost or touched install: the same runner, no staging, no stamp (due again next boot).
    assert_eq!(version_in(runner.path()), INSTALLED);
    assert!(!runner.path().join(".ci-runner-update").exists());
    assert!(!runner.path().join(".updated_at").exists());
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(BOOT).success());
}

#[test]
fn a_bad_checksum_is_refused_the_cached_entry_not_trusted_and_the_installed_runner_used() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&["--bad-sha"]));
    let cache = tempfile::tempdir().unwrap();
    // A poisoned cache entry (a job that could write the cache would leave one): a runner that
    // says it is the new version.
    let poisoned = make_tarball(cache.path(), NEW);
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &[]));
    sup.wait_state("idle", BOOT);
    assert!(sup.log_has("A cached runner tarball does not match its SHA-256"), "{}", sup.log());
    let warn = line_of(&sup, "Failed to update the runner at boot; the installed runner is used.");
    assert!(sup.log().lines().nth(warn).unwrap().contains("not the published"), "{}", sup.log());
    // Never unpacked, never kept: neither the poisoned entry nor the bad download.
    assert_eq!(version_in(runner.path()), INSTALLED, "an unverified tarball was installed");
    assert!(!poisoned.exists(), "the cache entry that did not match is still there");
    let left: Vec<_> = std::fs::read_dir(cache.path()).unwrap().flatten().map(|e| e.file_name()).collect();
    assert!(left.is_empty(), "the cache kept {left:?}");
    assert!(!runner.path().join(".ci-runner-update").exists());
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(BOOT).success());
}

#[test]
fn a_new_enough_install_asks_the_release_server_nothing() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&[]));
    let cache = tempfile::tempdir().unwrap();
    stamp_fresh(&runner);
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &[]));
    sup.wait_state("idle", BOOT);
    assert!(sup.log_has("Runner is new enough; no update at boot."), "{}", sup.log());
    assert_eq!(releases.paths(), Vec::<String>::new(), "a request was made for a new-enough install");
    assert_eq!(version_in(runner.path()), INSTALLED);
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(BOOT).success());
}

#[test]
fn a_hanging_release_server_is_given_up_after_the_timeout() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&["--hang"]));
    let cache = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::start(&env_for(
        &gh,
        &runner,
        update_vars(releases.port, cache.path()),
        &[("RUNNER_UPDATE_TIMEOUT_SEC", "2")],
    ));
    sup.wait_state("idle", BOOT);
    assert!(sup.log_has("the update took longer than RUNNER_UPDATE_TIMEOUT_SEC"), "{}", sup.log());
    assert_eq!(version_in(runner.path()), INSTALLED);
    sup.signal(Signal::SIGTERM);
    assert!(sup.wait_exit(BOOT).success());
}

#[test]
fn sigterm_during_the_update_stops_the_boot_at_once_with_nothing_registered() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&["--hang"]));
    let cache = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &[]));
    wait_for("the update's first request", BOOT, || (!releases.paths().is_empty()).then_some(()));
    sup.signal(Signal::SIGTERM);
    // Far below RUNNER_UPDATE_TIMEOUT_SEC (300 s) and the request's own 30 s.
    let status = sup.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", sup.log());
    assert!(sup.log_has("Signal received during the runner update."), "{}", sup.log());
    assert!(!sup.log_has("Runner registered."));
    assert!(gh.rest_requests("POST", "registration-token").is_empty(), "a token was asked for after the signal");
    assert_eq!(version_in(runner.path()), INSTALLED);
}

#[test]
fn a_bad_update_setting_is_exit_3_naming_the_variable_before_any_request() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&[]));
    let cache = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::start(&env_for(
        &gh,
        &runner,
        update_vars(releases.port, cache.path()),
        &[("RUNNER_UPDATE_AFTER_DAYS", "three weeks")],
    ));
    let status = sup.wait_exit(BOOT);
    assert_eq!(status.code(), Some(3), "{}", sup.log());
    let line = sup.log().lines().find(|l| l.contains("RUNNER_UPDATE_AFTER_DAYS")).map(str::to_string);
    assert!(line.as_deref().is_some_and(|l| l.contains("a whole number of days")), "{line:?}");
    // Never a request, a registration or a touched install on a bad configuration.
    assert!(releases.paths().is_empty(), "{:?}", releases.paths());
    assert!(gh.rest_requests("POST", "registration-token").is_empty());
    assert_eq!(version_in(runner.path()), INSTALLED);
}

#[test]
fn sigterm_mid_download_leaves_no_torn_tarball_in_the_cache() {
    let (gh, runner, releases) = (FakeGithub::start(), RunnerDir::new(), Releases::start(&["--stall-download"]));
    let cache = tempfile::tempdir().unwrap();
    let mut sup = Supervisor::start(&env_for(&gh, &runner, update_vars(releases.port, cache.path()), &[]));
    let in_cache = || -> Vec<String> {
        std::fs::read_dir(cache.path())
            .unwrap()
            .flatten()
            .map(|e| e.file_name().to_string_lossy().to_string())
            .collect()
    };
    wait_for("half a tarball in the cache", BOOT, || in_cache().iter().any(|n| n.contains(".tmp.")).then_some(()));
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(Duration::from_secs(10));
    assert!(status.success(), "{status:?}\n{}", sup.log());
    // Never a torn download left for the next boot, never an install touched.
    assert_eq!(in_cache(), Vec::<String>::new(), "the cache kept a partial download");
    assert_eq!(version_in(runner.path()), INSTALLED);
    assert!(!runner.path().join(".ci-runner-update").exists());
    assert!(gh.rest_requests("POST", "registration-token").is_empty());
}
