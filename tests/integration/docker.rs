//! The image on the real Docker engine: built with no registry from a Debian base made here
//! (debootstrap, then `docker import`), the fake runner as its runner tarball and this build of
//! ci-runner as its binary; run against the fake GitHub on the host's loopback.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use crate::harness::*;

const BASE: &str = "ci-runner-test-base:bookworm";
const IMAGE: &str = "ci-runner:test";
/// On every image the tests build: `scripts/test` removes them all at the end.
pub(crate) const TEST_LABEL: &str = "ci-runner.test=1";
const LONG: Duration = Duration::from_secs(90);

pub(crate) fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("run docker")
}

pub(crate) fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether this machine can run the image tests (root, a running engine); see [`prerequisite_missing`].
pub(crate) fn docker_available() -> bool {
    if !require_root("the image tests") || !require("docker") {
        return false;
    }
    docker(&["info", "--format", "{{.ServerVersion}}"]).status.success()
        || prerequisite_missing("docker", "start the Docker engine (e.g. systemctl start docker)")
}

/// The image, built once per test run by the README's offline recipe, `scripts/offline-image`
/// (a Debian bookworm base made by debootstrap, kept in the engine between runs), with the fake
/// runner as the runner tarball and the ci-runner this test run built.
pub(crate) fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        assert!(has_image(BASE) || require("debootstrap"), "debootstrap is needed to make the base image");
        let out = Command::new(repo_root().join("scripts/offline-image"))
            .args(["-t", IMAGE, "--fake-runner", "--label", TEST_LABEL])
            .env("BASE_IMAGE", BASE)
            .env("CI_RUNNER_BIN", bin())
            .output()
            .unwrap();
        assert!(out.status.success(), "scripts/offline-image failed:\n{}", String::from_utf8_lossy(&out.stderr));
    });
    IMAGE
}

/// A container of the image, removed on drop (its logs printed when the test failed).
struct Container {
    name: String,
}

impl Container {
    fn run(env: &[(&str, String)], mounts: &[&Path]) -> Container {
        Self::run_image(image(), env, mounts)
    }

    fn run_image(image: &str, env: &[(&str, String)], mounts: &[&Path]) -> Container {
        let name = format!("ci-runner-test-{}-{}", std::process::id(), rand_suffix());
        let mut args: Vec<String> =
            vec!["run".into(), "-d".into(), "--name".into(), name.clone(), "--network".into(), "host".into()];
        // Never the link-local instance metadata address from a test.
        args.extend(["-e".into(), "AWS_EC2_METADATA_DISABLED=true".into()]);
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        for m in mounts {
            args.push("-v".into());
            args.push(format!("{0}:{0}", m.display()));
        }
        args.push(image.to_string());
        let refs: Vec<&str> = args.iter().map(String::as_str).collect();
        docker_ok(&refs);
        Container { name }
    }

    fn logs(&self) -> String {
        let out = docker(&["logs", &self.name]);
        format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
    }

    fn inspect(&self, format: &str) -> String {
        docker_ok(&["inspect", "-f", format, &self.name])
    }

    fn wait_log(&self, needle: &str) {
        wait_for(&format!("{needle:?} in the container's log"), LONG, || self.logs().contains(needle).then_some(()));
    }
}

impl Drop for Container {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- container log -----\n{}", self.logs());
        }
        let _ = docker(&["rm", "-f", &self.name]);
    }
}

/// Whether the engine has image `name`.
pub(crate) fn has_image(name: &str) -> bool {
    docker(&["image", "inspect", name]).status.success()
}

pub(crate) fn rand_suffix() -> String {
    let mut b = [0u8; 4];
    getrandom::getrandom(&mut b).unwrap();
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn env_for(gh: &FakeGithub, status_port: u16) -> Vec<(&'static str, String)> {
    vec![
        ("GH_TOKEN", PAT.to_string()),
        ("GH_REPOSITORY", REPO.to_string()),
        ("GH_LABELS", "ci-test,docker".to_string()),
        ("GH_SERVER_URL", gh.url()),
        ("GH_API_URL", format!("{}/api/v3", gh.url())),
        ("STATUS_ADDR", format!("127.0.0.1:{status_port}")),
        ("FAKE_RETRY_SLEEP_SEC", "0.2".to_string()),
        ("FAKE_SESSION_RETRY_SEC", "0.2".to_string()),
        ("FAKE_HTTP_RETRY_SEC", "0.05".to_string()),
    ]
}

/// The names of `n` runners online on the fake GitHub, once there are.
fn wait_online(gh: &FakeGithub, n: usize) -> Vec<String> {
    wait_for(&format!("{n} runners online"), LONG, || {
        let online = gh.online_names();
        (online.len() == n).then_some(online)
    })
}

pub(crate) fn scratch_dir() -> (tempfile::TempDir, PathBuf) {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    let p = d.path().to_path_buf();
    (d, p)
}

#[test]
fn image_registers_runs_jobs_as_guest_without_secrets_and_drains_on_docker_stop() {
    if !docker_available() {
        return;
    }
    let gh = FakeGithub::start();
    let (_keep, scratch) = scratch_dir();
    let c = Container::run(&env_for(&gh, free_port()), &[&scratch]);
    c.wait_log("Listening for Jobs");

    // Registered with the labels asked for.
    let runner =
        wait_for("the runner on the fake GitHub", LONG, || gh.runners().into_iter().find(|r| r["status"] == "online"));
    let labels: Vec<String> =
        runner["labels"].as_array().unwrap().iter().filter_map(|l| l.as_str().map(str::to_string)).collect();
    for l in ["ci-test", "docker", "self-hosted"] {
        assert!(labels.iter().any(|x| x == l), "label {l} missing: {labels:?}");
    }
    // Docker's own HEALTHCHECK (`ci-runner status`) calls it healthy.
    wait_for("the HEALTHCHECK to pass", LONG, || (c.inspect("{{.State.Health.Status}}") == "healthy").then_some(()));
    // PID 1 is ci-runner.
    let pid1 = docker_ok(&["exec", &c.name, "cat", "/proc/1/cmdline"]);
    assert!(pid1.starts_with("/usr/local/bin/ci-runner"), "PID 1 is {pid1:?}");
    // `docker exec -it <c> bash -l` lands in a guest login shell in /home/guest (stdin here).
    let out = Command::new("docker")
        .args(["exec", "-i", &c.name, "bash", "-l"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .and_then(|mut child| {
            use std::io::Write;
            child.stdin.take().unwrap().write_all(b"id -un; pwd\n")?;
            child.wait_with_output()
        })
        .unwrap();
    let shell = String::from_utf8_lossy(&out.stdout);
    assert_eq!(shell.split_whitespace().collect::<Vec<_>>(), ["guest", "/home/guest"], "{shell}");

    // A job: it runs as guest, without GH_TOKEN; then `docker stop` while it runs.
    let s = scratch.display();
    let steps = format!("id -un > {s}/user.txt; env > {s}/env.txt; {}", gated_steps(&scratch, "job"));
    let id = gh.enqueue("job", &["ci-test"], &steps);
    wait_for("the job to start", LONG, || scratch.join("job.started").exists().then_some(()));
    assert_eq!(std::fs::read_to_string(scratch.join("user.txt")).unwrap().trim(), "guest");
    let job_env = std::fs::read_to_string(scratch.join("env.txt")).unwrap();
    assert!(!job_env.contains(PAT) && !job_env.contains("GH_TOKEN="), "the PAT reached the job");

    let name = c.name.clone();
    let stopper = std::thread::spawn(move || docker(&["stop", "-t", "120", &name]));
    c.wait_log("Signal received: draining");
    // The job is not killed: it finishes when it is released.
    assert!(!scratch.join("job.done").exists());
    release(&scratch, "job");
    let stopped = stopper.join().unwrap();
    assert!(stopped.status.success(), "docker stop failed");
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
    assert!(scratch.join("job.done").exists(), "the job did not finish");
    let job = gh.job(id);
    assert_eq!(job["result"], "Succeeded", "{job}");
    assert!(gh.runners().is_empty(), "a runner was left registered: {:?}", gh.runners());
}

/// `RUNNER_COUNT=3` in the image: the roots made at build time serve (their files are the
/// install's, linked in its layer), each runner has its own work dir, and `docker stop` mid-jobs
/// lets all three jobs finish and de-registers all three.
#[test]
fn image_runs_three_runners_from_its_build_time_roots_and_drains_them_on_docker_stop() {
    if !docker_available() {
        return;
    }
    let gh = FakeGithub::start();
    let (_keep, scratch) = scratch_dir();
    let mut env = env_for(&gh, free_port());
    env.push(("RUNNER_COUNT", "3".to_string()));
    let c = Container::run(&env, &[&scratch]);
    let names = wait_online(&gh, 3);
    // Linked at build time: root 3's files are the install's, and nothing of either `bin/` is
    // in the container's own layer (a link made at run time would have copied the file up).
    let inode = |p: &str| docker_ok(&["exec", &c.name, "stat", "-c", "%i %U", p]);
    assert_eq!(
        inode("/home/guest/runners/3/bin/Runner.Listener"),
        inode("/home/guest/actions-runner/bin/Runner.Listener"),
        "root 3's Listener is not the install's"
    );
    let changed = docker_ok(&["diff", &c.name]);
    let copied: Vec<&str> = changed.lines().filter(|l| l.contains("/bin/") && l.contains("/home/guest/")).collect();
    assert!(copied.is_empty(), "runner files copied into the container's layer: {copied:?}");
    for i in [2, 3] {
        let work = docker_ok(&["exec", &c.name, "stat", "-c", "%U %a", &format!("/mnt-{i}")]);
        assert_eq!(work.trim(), "guest 700", "/mnt-{i}");
    }
    let ids: Vec<u64> =
        ["a", "b", "c"].iter().map(|j| gh.enqueue(j, &["ci-test"], &gated_steps(&scratch, j))).collect();
    for j in ["a", "b", "c"] {
        wait_for(&format!("job {j} to start"), LONG, || scratch.join(format!("{j}.started")).exists().then_some(()));
    }
    let name = c.name.clone();
    let stopper = std::thread::spawn(move || docker(&["stop", "-t", "120", &name]));
    c.wait_log("passing it to every runner");
    for j in ["a", "b", "c"] {
        assert!(!scratch.join(format!("{j}.done")).exists(), "job {j} ended before its release");
        release(&scratch, j);
    }
    assert!(stopper.join().unwrap().status.success(), "docker stop failed");
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
    for id in ids {
        assert_eq!(gh.job(id)["result"], "Succeeded", "{}", gh.job(id));
    }
    for n in &names {
        assert!(gh.runner_named(n).is_none(), "{n} left registered");
    }
}

/// A derived image, as users make one: the shipped docker-group hook and a guest hook of
/// their own dropped in.
fn derived_image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    const DERIVED: &str = "ci-runner:test-derived";
    BUILT.get_or_init(|| {
        let base = image();
        let ctx = tempfile::tempdir().unwrap();
        std::fs::copy(
            repo_root().join("hooks/root/entrypoint.05-docker-group.sh"),
            ctx.path().join("entrypoint.05-docker-group.sh"),
        )
        .unwrap();
        std::fs::write(
            ctx.path().join("entrypoint.20-mark.sh"),
            "echo \"guest hook ran as $(id -un)\"\nexport HOOK_MARK=derived\n",
        )
        .unwrap();
        std::fs::write(
            ctx.path().join("Dockerfile"),
            format!(
                "FROM {base}\nCOPY entrypoint.05-docker-group.sh /root/\n\
                 COPY --chown=guest:guest entrypoint.20-mark.sh /home/guest/\n"
            ),
        )
        .unwrap();
        let out = Command::new("docker")
            .args(["build", "-q", "-t", DERIVED, "--label", TEST_LABEL, "."])
            .current_dir(ctx.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    });
    DERIVED
}

#[test]
fn a_derived_image_runs_its_hooks_joins_the_socket_group_and_reaps_zombies() {
    if !docker_available() {
        return;
    }
    let gh = FakeGithub::start();
    let (_keep, scratch) = scratch_dir();
    let socket = Path::new("/var/run/docker.sock");
    let c = Container::run_image(derived_image(), &env_for(&gh, free_port()), &[&scratch, socket]);
    c.wait_log("Listening for Jobs");
    let logs = c.logs();
    assert!(logs.contains("[entrypoint.20-mark.sh] guest hook ran as guest"), "{logs}");
    assert!(logs.contains("[entrypoint.05-docker-group.sh]"), "{logs}");

    // The job: the hook's export, the socket's group, and orphans left to PID 1.
    let s = scratch.display();
    let steps = format!(
        "env > {s}/env.txt; id -G > {s}/groups.txt; \
         for i in $(seq 50); do sh -c 'sleep 0.01 & exit 0'; done; touch {s}/orphans.made"
    );
    let id = gh.enqueue("zombies", &["ci-test"], &steps);
    wait_for("the job to finish", LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"));
    let job_env = std::fs::read_to_string(scratch.join("env.txt")).unwrap();
    assert!(job_env.contains("HOOK_MARK=derived"), "the hook's export did not reach the job");
    let gid = std::os::unix::fs::MetadataExt::gid(&std::fs::metadata(socket).unwrap()).to_string();
    let groups = std::fs::read_to_string(scratch.join("groups.txt")).unwrap();
    if gid != "0" {
        assert!(groups.split_whitespace().any(|g| g == gid), "guest is not in the socket's group {gid}: {groups}");
    }
    // Every orphan was reaped by PID 1: no zombie is left in the container.
    wait_for("no zombie left in the container", LONG, || {
        let z = docker_ok(&["exec", &c.name, "sh", "-c", "grep -l '^State:.*Z' /proc/[0-9]*/status || true"]);
        z.is_empty().then_some(())
    });
}

/// Runs the compose file from a copy of the repository's, as users do, with the test image.
fn compose(dir: &Path, project: &str, args: &[&str]) -> std::process::Output {
    let mut cmd = if docker(&["compose", "version"]).status.success() {
        let mut c = Command::new("docker");
        c.arg("compose");
        c
    } else {
        Command::new("docker-compose")
    };
    cmd.args(["-f", "compose.yaml", "-p", project]).args(args).current_dir(dir).output().expect("run compose")
}

#[test]
fn compose_scales_to_three_distinct_runners_and_down_leaves_none() {
    if !docker_available() {
        return;
    }
    if !docker(&["compose", "version"]).status.success() && !require("docker-compose") {
        return;
    }
    let gh = FakeGithub::start();
    let img = image();
    let dir = tempfile::tempdir().unwrap();
    std::fs::copy(repo_root().join("compose.yaml"), dir.path().join("compose.yaml")).unwrap();
    // The PAT as a secret file, as the compose file advises, not in .env.
    std::fs::create_dir_all(dir.path().join("secrets")).unwrap();
    std::fs::write(dir.path().join("secrets/GH_TOKEN"), format!("{PAT}\n")).unwrap();
    // Host networking so the containers reach the fake GitHub on loopback; three containers
    // on one network namespace cannot share a status port, so it is off.
    std::fs::write(
        dir.path().join(".env"),
        format!(
            "GH_REPOSITORY={REPO}\nGH_LABELS=ci-test,compose\nGH_SERVER_URL={url}\n\
             GH_API_URL={url}/api/v3\nCI_RUNNER_IMAGE={img}\nCI_RUNNER_NETWORK_MODE=host\nSTATUS_ADDR=off\n\
             STOP_GRACE_PERIOD=60s\nDRAIN_TIMEOUT_SEC=30\nAWS_EC2_METADATA_DISABLED=true\n\
             RUNNER_LOCK_HOST_DIR={locks}\n",
            url = gh.url(),
            // Not the host's /tmp/github-runner-locks, which Docker would make and leave.
            locks = dir.path().join("locks").display()
        ),
    )
    .unwrap();
    let project = format!("cirunnertest{}{}", std::process::id(), rand_suffix());
    struct Down<'a>(&'a Path, &'a str);
    impl Drop for Down<'_> {
        fn drop(&mut self) {
            let _ = compose(self.0, self.1, &["down", "-v", "-t", "60"]);
        }
    }
    let _down = Down(dir.path(), &project);
    let up = compose(dir.path(), &project, &["up", "-d", "--no-build", "--scale", "ci-runner=3"]);
    assert!(up.status.success(), "compose up failed: {}", String::from_utf8_lossy(&up.stderr));
    let names = wait_online(&gh, 3);
    let distinct: std::collections::HashSet<_> = names.iter().collect();
    assert_eq!(distinct.len(), 3, "names collide: {names:?}");
    let down = compose(dir.path(), &project, &["down", "-v", "-t", "60"]);
    assert!(down.status.success(), "compose down failed: {}", String::from_utf8_lossy(&down.stderr));
    assert!(gh.runners().is_empty(), "runners left registered after down: {:?}", gh.runners());
}

/// Issue #17 in the image: `secrets/` made by the host's first user (uid 1000, `guest`'s uid),
/// `GH_TOKEN` 0600 and another file 0644. Mounted as `compose.yaml` mounts it (at
/// `/run/secrets/host`, below the image's root-only `/run/secrets`), the runner starts on the
/// PAT from the file and no job can read either file; mounted at `/run/secrets` itself, the
/// container refuses to start: exit 3, the files and the fix named, nothing registered.
#[test]
fn image_keeps_host_secret_files_from_jobs_or_refuses_to_start() {
    use std::os::unix::fs::PermissionsExt;
    if !docker_available() {
        return;
    }
    let gh = FakeGithub::start();
    let (_keep, scratch) = scratch_dir();
    let secrets = tempfile::tempdir().unwrap();
    let host_user = |p: &Path, mode: u32| {
        std::fs::set_permissions(p, std::fs::Permissions::from_mode(mode)).unwrap();
        nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(1000)), Some(nix::unistd::Gid::from_raw(1000))).unwrap();
    };
    host_user(secrets.path(), 0o755);
    std::fs::write(secrets.path().join("GH_TOKEN"), PAT).unwrap();
    host_user(&secrets.path().join("GH_TOKEN"), 0o600);
    std::fs::write(secrets.path().join("OTHER_SECRET"), "s3cr3t-of-the-host").unwrap();
    host_user(&secrets.path().join("OTHER_SECRET"), 0o644);
    let start = |env: &[(&str, String)], target: &str| {
        let name = format!("ci-runner-test-{}-{}", std::process::id(), rand_suffix());
        let mut args: Vec<String> = ["run", "-d", "--name", &name, "--network", "host"].map(String::from).to_vec();
        args.extend(["-e".into(), "AWS_EC2_METADATA_DISABLED=true".into()]);
        for (k, v) in env {
            args.extend(["-e".into(), format!("{k}={v}")]);
        }
        args.extend(["-v".into(), format!("{0}:{0}", scratch.display())]);
        args.extend(["-v".into(), format!("{}:{target}:ro", secrets.path().display())]);
        args.push(image().to_string());
        docker_ok(&args.iter().map(String::as_str).collect::<Vec<_>>());
        Container { name }
    };
    let mut env = env_for(&gh, free_port());
    env.retain(|(k, _)| *k != "GH_TOKEN");

    // As compose.yaml mounts it: started, and a job reads nothing.
    let mut compose_env = env.clone();
    compose_env.push(("SECRETS_DIR", "/run/secrets/host".to_string()));
    let c = start(&compose_env, "/run/secrets/host");
    c.wait_log("Listening for Jobs");
    assert!(c.logs().contains("Secrets checked: none readable by the runner user."), "{}", c.logs());
    let s = scratch.display();
    let steps = format!(
        "for f in /run/secrets/host/GH_TOKEN /run/secrets/host/OTHER_SECRET; do \
           if cat \"$f\" >> {s}/read.out 2>/dev/null; then echo \"LEAK $f\" >> {s}/read.out; fi; \
         done; touch {s}/done"
    );
    let id = gh.enqueue("read", &["ci-test"], &steps);
    wait_for("the job to finish", LONG, || (gh.job(id)["status"] == "completed").then_some(()));
    assert!(scratch.join("done").exists(), "the job did not run");
    let out = std::fs::read_to_string(scratch.join("read.out")).unwrap_or_default();
    assert!(!out.contains("LEAK") && !out.contains(PAT) && !out.contains("s3cr3t"), "a job read a secret: {out}");
    docker_ok(&["stop", "-t", "60", &c.name]);
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "0", "{}", c.logs());
    drop(c);

    // Mounted at /run/secrets itself: the host's owner and mode show through; refused.
    let c = start(&env, "/run/secrets");
    wait_for("the container to exit", LONG, || (c.inspect("{{.State.Status}}") == "exited").then_some(()));
    let logs = c.logs();
    assert_eq!(c.inspect("{{.State.ExitCode}}"), "3", "{logs}");
    for needle in [
        "/run/secrets/GH_TOKEN is readable",
        "/run/secrets/OTHER_SECRET is readable",
        "is a mount",
        "/run/secrets/host",
    ] {
        assert!(logs.contains(needle), "the refusal does not say {needle:?}:\n{logs}");
    }
    assert!(!logs.contains(PAT) && !logs.contains("s3cr3t"), "a secret is in the log");
    assert!(gh.runners().is_empty(), "a runner registered despite readable secrets");
}
