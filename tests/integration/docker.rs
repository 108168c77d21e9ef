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
const LONG: Duration = Duration::from_secs(90);

fn docker(args: &[&str]) -> std::process::Output {
    Command::new("docker").args(args).stdin(Stdio::null()).output().expect("run docker")
}

fn docker_ok(args: &[&str]) -> String {
    let out = docker(args);
    assert!(out.status.success(), "docker {args:?} failed: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// Whether this machine can run the image tests: skips locally, fails on CI.
fn docker_available() -> bool {
    if !is_root() || !require("docker") {
        assert!(std::env::var("CI").is_err(), "the image tests need root and docker on CI");
        return false;
    }
    let up = docker(&["info", "--format", "{{.ServerVersion}}"]).status.success();
    if !up {
        assert!(std::env::var("CI").is_err(), "the Docker engine must be running on CI");
        eprintln!("skipping: the Docker engine is not running");
    }
    up
}

/// A Debian bookworm base made without any registry, kept in the engine between runs.
fn base_image() {
    if docker(&["image", "inspect", BASE]).status.success() {
        return;
    }
    assert!(require("debootstrap"), "debootstrap is needed to make the base image");
    let root = tempfile::tempdir().unwrap();
    let ok = Command::new("debootstrap")
        .args(["--variant=minbase", "bookworm"])
        .arg(root.path())
        .arg("http://deb.debian.org/debian")
        .stdout(Stdio::null())
        .status()
        .unwrap()
        .success();
    assert!(ok, "debootstrap failed");
    let ok = Command::new("sh")
        .arg("-c")
        .arg(format!("tar -C {} -c . | docker import - {BASE} >/dev/null", root.path().display()))
        .status()
        .unwrap()
        .success();
    assert!(ok, "docker import failed");
}

/// The image, built once per test run from image/Dockerfile with the fake runner as the
/// runner tarball and the ci-runner this test run built.
fn image() -> &'static str {
    static BUILT: OnceLock<()> = OnceLock::new();
    BUILT.get_or_init(|| {
        base_image();
        let ctx = tempfile::tempdir().unwrap();
        let local = ctx.path().join("image/local");
        std::fs::create_dir_all(&local).unwrap();
        std::fs::copy(repo_root().join("image/Dockerfile"), ctx.path().join("image/Dockerfile")).unwrap();
        std::fs::copy(bin(), local.join("ci-runner")).unwrap();
        let ok = Command::new("tar")
            .args(["-czf"])
            .arg(local.join("actions-runner.tar.gz"))
            .args(["--exclude=__pycache__", "-C"])
            .arg(repo_root().join("tests/fakes/runner"))
            .arg(".")
            .status()
            .unwrap()
            .success();
        assert!(ok, "failed to pack the fake runner");
        let out = Command::new("docker")
            .args(["build", "-q", "-f", "image/Dockerfile", "-t", IMAGE])
            .args(["--build-arg", &format!("BASE_IMAGE={BASE}"), "--build-arg", &format!("BUILDER_IMAGE={BASE}")])
            .args(["--build-arg", "EXTRA_PACKAGES=python3"])
            .arg(".")
            .current_dir(ctx.path())
            .output()
            .unwrap();
        assert!(out.status.success(), "docker build failed:\n{}", String::from_utf8_lossy(&out.stderr));
    });
    IMAGE
}

/// A container of the image, removed on drop (its logs printed when the test failed).
struct Container {
    name: String,
}

impl Container {
    fn run(env: &[(&str, String)], mounts: &[&Path]) -> Container {
        let name = format!("ci-runner-test-{}-{}", std::process::id(), rand_suffix());
        let mut args: Vec<String> =
            vec!["run".into(), "-d".into(), "--name".into(), name.clone(), "--network".into(), "host".into()];
        for (k, v) in env {
            args.push("-e".into());
            args.push(format!("{k}={v}"));
        }
        for m in mounts {
            args.push("-v".into());
            args.push(format!("{0}:{0}", m.display()));
        }
        args.push(image().to_string());
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

fn rand_suffix() -> String {
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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap().port()
}

fn scratch_dir() -> (tempfile::TempDir, PathBuf) {
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
