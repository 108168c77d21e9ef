//! Boot hooks: `entrypoint.*.sh` as root, then as the runner user, before registration.

use std::path::Path;
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);

struct Dirs {
    root: tempfile::TempDir,
    guest: tempfile::TempDir,
    scratch: tempfile::TempDir,
}

fn dirs() -> Dirs {
    let mk = || {
        let d = tempfile::tempdir().unwrap();
        std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
        d
    };
    Dirs { root: mk(), guest: mk(), scratch: mk() }
}

fn hook(dir: &Path, name: &str, body: &str) {
    // No shebang and no executable bit: hooks are sourced, as in the original image.
    std::fs::write(dir.join(name), body).unwrap();
    std::fs::set_permissions(dir.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o644)).unwrap();
}

fn env(gh: &FakeGithub, runner: &RunnerDir, d: &Dirs) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    env.push(("ROOT_HOOKS_DIR".into(), d.root.path().display().to_string()));
    env.push(("GUEST_HOOKS_DIR".into(), d.guest.path().display().to_string()));
    env
}

#[test]
fn hooks_run_in_order_as_root_then_the_runner_user_and_share_exports() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let d = dirs();
    let s = d.scratch.path().display();
    hook(
        d.root.path(),
        "entrypoint.20-second.sh",
        &format!("echo \"20 $(id -un) $FROM_FIRST\" >> {s}/order\nexport FROM_ROOT=yes\n"),
    );
    hook(
        d.root.path(),
        "entrypoint.05-first.sh",
        &format!("echo \"05 $(id -un)\" >> {s}/order\nFROM_FIRST=shared\necho hello from first\nenv > {s}/root-env\n"),
    );
    hook(d.guest.path(), "entrypoint.01-guest.sh", &format!("echo \"g01 $(id -un) $FROM_ROOT\" >> {s}/order\n"));
    let order_file = d.scratch.path().join("order");
    std::fs::write(&order_file, "").unwrap();
    std::fs::set_permissions(&order_file, std::os::unix::fs::PermissionsExt::from_mode(0o666)).unwrap();
    let mut sup = Supervisor::start(&env(&gh, &runner, &d));
    sup.wait_state("idle", BOOT);
    let order = std::fs::read_to_string(d.scratch.path().join("order")).unwrap();
    let guest = runner.user.unwrap_or("");
    let root = if is_root() { "root".to_string() } else { guest.to_string() };
    let guest_name = if is_root() {
        guest.to_string()
    } else {
        String::from_utf8(std::process::Command::new("id").arg("-un").output().unwrap().stdout)
            .unwrap()
            .trim()
            .to_string()
    };
    assert_eq!(
        order,
        format!("05 {root}\n20 {root} shared\ng01 {guest_name} yes\n"),
        "hooks ran out of order or as the wrong user"
    );
    assert!(sup.log_has("[entrypoint.05-first.sh] hello from first"), "{}", sup.log());
    let hook_env = std::fs::read_to_string(d.scratch.path().join("root-env")).unwrap();
    assert!(hook_env.contains("GH_REPOSITORY=") && !hook_env.contains(PAT), "a hook saw the token: {hook_env}");
    // Each phase's duration, on /health and /metrics; never lost when the runner's own
    // status (registration, listening) is copied over the container's.
    let boot = sup.health().unwrap()["boot"].clone();
    for phase in ["root_hooks", "guest_hooks", "registration", "listening"] {
        let secs = boot[format!("{phase}_seconds")].as_f64();
        assert!(secs.is_some_and(|s| s >= 0.0), "no {phase} time: {boot}");
        let metrics = sup.metrics();
        assert!(metrics.contains(&format!("ci_runner_boot_phase_seconds{{phase=\"{phase}\"}} ")), "{metrics}");
    }
    assert!(boot["sweep_seconds"].is_null() && boot["prewarm_seconds"].is_null(), "a phase that did not run: {boot}");
    let (root, listening) = (boot["root_hooks_seconds"].as_f64().unwrap(), boot["listening_seconds"].as_f64().unwrap());
    assert!(root <= listening, "the root hooks took longer than the whole boot: {boot}");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0));
}

#[test]
fn a_failing_hook_stops_the_boot_before_registration() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let d = dirs();
    hook(d.root.path(), "entrypoint.10-ok.sh", "true\n");
    hook(d.root.path(), "entrypoint.30-bad.sh", "echo about to fail\nfalse\necho never\n");
    hook(d.guest.path(), "entrypoint.01-never.sh", &format!("touch {}/guest-ran\n", d.scratch.path().display()));
    let mut sup = Supervisor::start(&env(&gh, &runner, &d));
    assert_eq!(sup.wait_exit(BOOT).code(), Some(8), "{}", sup.log());
    assert!(sup.log_has("boot hook entrypoint.30-bad.sh failed with exit status 1"), "{}", sup.log());
    assert!(!sup.log_has("never"));
    assert!(!d.scratch.path().join("guest-ran").exists(), "the guest phase ran after a failure");
    assert!(gh.rest_requests("POST", "registration-token").is_empty(), "registration started despite the failure");
    assert!(gh.runners().is_empty());
}

#[test]
fn sigterm_during_a_long_hook_is_honoured_at_once() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let d = dirs();
    let s = d.scratch.path().display();
    hook(d.root.path(), "entrypoint.50-slow.sh", &format!("touch {s}/slow-started\nsleep 1000\n"));
    let mut sup = Supervisor::start(&env(&gh, &runner, &d));
    wait_for("the slow hook to start", BOOT, || d.scratch.path().join("slow-started").exists().then_some(()));
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
    assert!(gh.rest_requests("POST", "registration-token").is_empty());
    assert!(gh.runners().is_empty());
}

#[test]
fn a_daemon_started_by_a_hook_is_stopped_after_the_runner() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let d = dirs();
    let s = d.scratch.path().display();
    hook(d.root.path(), "entrypoint.60-daemon.sh", &format!("sleep 1000 &\necho $! > {s}/daemon.pid\n"));
    let mut sup = Supervisor::start(&env(&gh, &runner, &d));
    sup.wait_state("idle", BOOT);
    let pid: i32 = std::fs::read_to_string(d.scratch.path().join("daemon.pid")).unwrap().trim().parse().unwrap();
    let alive = |p: i32| {
        std::fs::read_to_string(format!("/proc/{p}/stat"))
            .is_ok_and(|st| !st.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
    };
    assert!(alive(pid), "the daemon is not running while the runner idles");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
    assert!(sup.log_has("Stopping daemons started by the boot hooks."), "{}", sup.log());
    assert!(!alive(pid), "the hook's daemon outlived the supervisor");
}

/// The shipped Docker-in-Docker hook, against stand-ins for `dockerd` and `docker` (a real
/// dockerd needs a privileged container, which this machine's engine refuses): `mode` is
/// `ok` (answers after 0.3 s), `crash` (exits at once) or `hang` (never answers).
fn dind(mode: &str, wait_sec: &str) -> (FakeGithub, RunnerDir, Dirs, Supervisor) {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let d = dirs();
    let stub = d.scratch.path().join("bin");
    std::fs::create_dir(&stub).unwrap();
    let s = d.scratch.path().display();
    let dockerd = match mode {
        "ok" => format!("echo $$ > {s}/dockerd.pid\nsleep 0.3\ntouch {s}/ready\nexec sleep 1000\n"),
        "crash" => "echo 'failed to start daemon: Error initializing network controller'\nexit 1\n".to_string(),
        _ => format!("echo $$ > {s}/dockerd.pid\nexec sleep 1000\n"),
    };
    for (name, body) in [("dockerd", dockerd), ("docker", format!("[ \"$1\" = info ] && [ -e {s}/ready ]\n"))] {
        std::fs::write(stub.join(name), format!("#!/bin/bash\n{body}")).unwrap();
        std::fs::set_permissions(stub.join(name), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    }
    std::fs::copy(
        repo_root().join("hooks/root/entrypoint.10-dockerd.sh"),
        d.root.path().join("entrypoint.10-dockerd.sh"),
    )
    .unwrap();
    let mut e = env(&gh, &runner, &d);
    for (k, v) in e.iter_mut() {
        if k == "PATH" {
            *v = format!("{}:{v}", stub.display());
        }
    }
    e.push(("DOCKERD_WAIT_SEC".into(), wait_sec.into()));
    e.push(("DOCKERD_LOG".into(), format!("{s}/dockerd.log")));
    let sup = Supervisor::start(&e);
    (gh, runner, d, sup)
}

#[test]
fn dind_hook_waits_for_the_daemon_then_stops_it_after_the_runner() {
    let (gh, _runner, d, mut sup) = dind("ok", "30");
    sup.wait_state("idle", BOOT);
    assert!(d.scratch.path().join("ready").exists(), "the runner registered before dockerd answered");
    assert!(sup.log_has("dockerd is up"), "{}", sup.log());
    let pid: i32 = std::fs::read_to_string(d.scratch.path().join("dockerd.pid")).unwrap().trim().parse().unwrap();
    let alive = |pid: i32| nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None).is_ok();
    assert!(alive(pid));
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty());
    assert!(!alive(pid), "dockerd outlived the supervisor");
}

#[test]
fn dind_hook_fails_the_boot_when_the_daemon_dies_or_never_answers() {
    let (gh, _runner, _d, mut sup) = dind("crash", "30");
    assert_eq!(sup.wait_exit(BOOT).code(), Some(8), "{}", sup.log());
    assert!(sup.log_has("Error initializing network controller"), "the daemon's log was not shown: {}", sup.log());
    assert!(gh.runners().is_empty());

    let (gh, _runner, _d, mut sup) = dind("hang", "1");
    assert_eq!(sup.wait_exit(BOOT).code(), Some(8), "{}", sup.log());
    assert!(sup.log_has("dockerd did not answer within 1s"), "{}", sup.log());
    assert!(gh.runners().is_empty());
}
