//! `ci-runner controller` (issue #9) on the real Docker engine: the fake GitHub sends signed
//! `workflow_job` deliveries, the controller starts runner containers of the test image with
//! JIT configurations, and removes them once their job is done.

use std::collections::HashSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use serde_json::{json, Value};

use crate::docker::{docker, docker_available, docker_ok, has_image, image, rand_suffix, scratch_dir};
use crate::harness::*;

const SECRET: &str = "webhook-topsecret";
const ORG: &str = "octo-org";
const LONG: Duration = Duration::from_secs(120);

/// What each test starts from: the fake GitHub, a scratch dir the runner containers bind-mount
/// at the same path, and the controller's state dir. `None` (the test is skipped, or fails on
/// CI) without a Docker engine.
struct Fixture {
    gh: FakeGithub,
    _keep: tempfile::TempDir,
    scratch: PathBuf,
    state: tempfile::TempDir,
}

impl Fixture {
    fn new() -> Option<Self> {
        if !docker_available() {
            return None;
        }
        let (_keep, scratch) = scratch_dir();
        Some(Fixture { gh: FakeGithub::start(), _keep, scratch, state: tempfile::tempdir().unwrap() })
    }

    fn setup(&self) -> Setup<'_> {
        Setup::new(&self.gh, &self.scratch, self.state.path())
    }
}

/// A running `ci-runner controller`; on drop it is killed and its containers removed.
struct Controller {
    proc: Supervisor,
    name: String,
    addr: String,
}

struct Setup<'a> {
    gh: &'a FakeGithub,
    name: String,
    port: u16,
    scratch: PathBuf,
    state: PathBuf,
    extra: Vec<(String, String)>,
    /// The single pool serves the organization `octo-org` instead of the repository.
    org: bool,
}

impl<'a> Setup<'a> {
    fn new(gh: &'a FakeGithub, scratch: &Path, state: &Path) -> Self {
        Setup {
            gh,
            name: format!("ctl-test-{}-{}", std::process::id(), rand_suffix()),
            port: free_port(),
            scratch: scratch.to_path_buf(),
            state: state.to_path_buf(),
            extra: Vec::new(),
            org: false,
        }
    }

    fn org(mut self) -> Self {
        self.org = true;
        self
    }

    /// The webhook for `path` on `scope` (a repository or an organization); its id.
    fn hook_on(&self, scope: &str, path: &str) -> u64 {
        let h = self.gh.post("/_fake/hooks", json!({"scope": scope, "url": self.url(path), "secret": SECRET}));
        h["id"].as_u64().expect("hook id")
    }

    fn with(mut self, k: &str, v: &str) -> Self {
        self.extra.push((k.into(), v.into()));
        self
    }

    fn url(&self, path: &str) -> String {
        format!("http://127.0.0.1:{}{path}", self.port)
    }

    /// The webhook for `path` on the fake, as `WEBHOOK_URL` or a user would set it up.
    fn hook(&self, path: &str) {
        self.gh.post("/_fake/hooks", json!({"scope": REPO, "url": self.url(path), "secret": SECRET}));
    }

    fn start(&self) -> Controller {
        let gh = self.gh;
        let s = self.scratch.display();
        let runner_env = "STATUS_ADDR=off,AWS_EC2_METADATA_DISABLED=true,FAKE_RETRY_SLEEP_SEC=0.2,\
                          FAKE_SESSION_RETRY_SEC=0.2,FAKE_HTTP_RETRY_SEC=0.05";
        let mut env: Vec<(String, String)> = vec![
            ("PATH".into(), std::env::var("PATH").unwrap_or_default()),
            ("GH_SERVER_URL".into(), gh.url()),
            ("GH_API_URL".into(), format!("{}/api/v3", gh.url())),
            ("CONTROLLER_NAME".into(), self.name.clone()),
            ("CONTROLLER_ADDR".into(), format!("127.0.0.1:{}", self.port)),
            ("CONTROLLER_STATE_DIR".into(), self.state.display().to_string()),
            ("CONTROLLER_POLL_MS".into(), "200".into()),
            ("SECRETS_DIR".into(), self.state.join("secrets").display().to_string()),
            ("RUST_LOG".into(), "info".into()),
        ];
        if !self.extra.iter().any(|(k, _)| k == "CONTROLLER_CONFIG") {
            env.extend([
                ("GH_TOKEN".into(), PAT.into()),
                if self.org { ("GH_ORGANIZATION".into(), ORG.into()) } else { ("GH_REPOSITORY".into(), REPO.into()) },
                ("GH_LABELS".into(), "ci-test".into()),
                ("WEBHOOK_SECRET".into(), SECRET.into()),
                ("CONTROLLER_IMAGE".into(), image().into()),
                ("CONTROLLER_NETWORK".into(), "host".into()),
                ("CONTROLLER_RUNNER_ENV".into(), runner_env.into()),
                ("CONTROLLER_RUNNER_BINDS".into(), format!("{s}:{s}")),
            ]);
        }
        env.extend(self.extra.iter().cloned());
        let mut cmd = Command::new(bin());
        cmd.arg("controller").env_clear().envs(env);
        let proc = Supervisor::from_command(cmd, String::new());
        proc.wait_log("Serving POST /webhook", LONG);
        Controller { proc, name: self.name.clone(), addr: format!("127.0.0.1:{}", self.port) }
    }
}

impl Controller {
    fn containers(&self) -> Vec<String> {
        let filter = format!("label=ci-runner.controller={}", self.name);
        let out = docker_ok(&["ps", "-a", "--filter", &filter, "--format", "{{.Names}}"]);
        out.lines().map(str::to_string).filter(|l| !l.is_empty()).collect()
    }

    fn wait_no_containers(&self) {
        wait_for("every runner container removed", LONG, || self.containers().is_empty().then_some(()));
    }

    fn metrics(&self) -> String {
        ureq::get(&format!("http://{}/metrics", self.addr)).call().unwrap().into_string().unwrap()
    }

    /// The value of the metric line starting with `prefix` (name and labels).
    fn metric(&self, prefix: &str) -> f64 {
        let m = self.metrics();
        m.lines()
            .find(|l| l.starts_with(prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse().ok())
            .unwrap_or_else(|| panic!("no metric {prefix} in:\n{m}"))
    }

    fn health(&self) -> Value {
        ureq::get(&format!("http://{}/health", self.addr)).call().unwrap().into_json().unwrap()
    }
}

impl Drop for Controller {
    fn drop(&mut self) {
        if std::thread::panicking() {
            for c in self.containers() {
                let out = docker(&["logs", &c]);
                eprintln!(
                    "----- runner container {c} -----\n{}{}",
                    String::from_utf8_lossy(&out.stdout),
                    String::from_utf8_lossy(&out.stderr)
                );
            }
        }
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.proc.pid() as i32), nix::sys::signal::Signal::SIGKILL)
            .ok();
        for c in self.containers() {
            let _ = docker(&["rm", "-f", &c]);
        }
    }
}

/// A delivery sent by hand: `signature` None sends no header.
fn send(url: &str, event: &str, body: &[u8], signature: Option<String>) -> (u16, String) {
    send_as(url, event, "application/json", body, signature)
}

fn send_as(url: &str, event: &str, content_type: &str, body: &[u8], signature: Option<String>) -> (u16, String) {
    let mut req = ureq::post(url).set("X-GitHub-Event", event).set("Content-Type", content_type);
    if let Some(s) = signature {
        req = req.set("X-Hub-Signature-256", &s);
    }
    match req.send_bytes(body) {
        Ok(r) => (r.status(), r.into_string().unwrap_or_default()),
        Err(ureq::Error::Status(code, r)) => (code, r.into_string().unwrap_or_default()),
        Err(e) => panic!("POST {url}: {e}"),
    }
}

fn job_payload(id: u64, action: &str, labels: &[&str]) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "action": action,
        "workflow_job": {"id": id, "labels": labels, "runner_name": null},
        "repository": {"full_name": REPO, "name": "octo-repo", "owner": {"login": "octo-org"}},
    }))
    .unwrap()
}

fn sign(body: &[u8]) -> String {
    ci_runner::controller::webhook::sign(SECRET.as_bytes(), body)
}

fn wait_job_done(gh: &FakeGithub, id: u64) -> Value {
    wait_for(&format!("job {id} to complete"), LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"))
}

#[test]
fn a_queued_job_starts_a_runner_container_that_runs_it_and_is_removed() {
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    let setup = t.setup();
    setup.hook("/webhook");
    let ctl = setup.start();

    let s = scratch.display();
    let steps = format!("id -un > {s}/user.txt; env > {s}/env.txt; {}", gated_steps(scratch, "job"));
    let id = gh.enqueue("build", &["self-hosted", "ci-test"], &steps);
    wait_for("the job to start in a runner container", LONG, || scratch.join("job.started").exists().then_some(()));
    let names = ctl.containers();
    assert_eq!(names.len(), 1, "{names:?}");
    // Neither the PAT nor the JIT configuration is in the container's environment or the job's.
    let inspected = docker_ok(&["inspect", "-f", "{{json .Config.Env}}", &names[0]]);
    assert!(!inspected.contains(PAT) && !inspected.contains("JITCONFIG"), "{inspected}");
    let job_env = std::fs::read_to_string(scratch.join("env.txt")).unwrap();
    assert!(!job_env.contains(PAT) && !job_env.contains("JITCONFIG"), "a secret reached the job:\n{job_env}");
    assert_eq!(std::fs::read_to_string(scratch.join("user.txt")).unwrap().trim(), "guest");
    // The runner that took it is the container's.
    let job = gh.job(id);
    assert_eq!(job["runner_name"].as_str(), Some(names[0].as_str()), "{job}");

    release(scratch, "job");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();
    assert!(gh.runners().is_empty(), "a runner was left registered: {:?}", gh.runners());
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 1.0);
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"queued\"}"), 1.0);
    assert!(!ctl.proc.log().contains(PAT), "the PAT was logged");
}

#[test]
fn bad_missing_and_oversized_deliveries_are_refused_duplicates_and_unserved_labels_start_nothing() {
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    let setup = t.setup();
    setup.hook("/webhook");
    let ctl = setup.start();
    let url = setup.url("/webhook");

    let body = job_payload(9001, "queued", &["self-hosted", "ci-test"]);
    assert_eq!(send(&url, "workflow_job", &body, None).0, 401, "missing signature");
    let wrong = ci_runner::controller::webhook::sign(b"not-the-secret", &body);
    assert_eq!(send(&url, "workflow_job", &body, Some(wrong)).0, 401, "bad signature");
    let mut tampered = body.clone();
    tampered.extend_from_slice(b" ");
    assert_eq!(send(&url, "workflow_job", &tampered, Some(sign(&body))).0, 401, "tampered body");
    let huge = vec![b' '; 2 << 20];
    assert_eq!(send(&url, "workflow_job", &huge, Some(sign(&huge))).0, 413, "oversized body");
    // Other events, GitHub-hosted jobs and labels the pool lacks: acknowledged, nothing started.
    let (code, text) = send(&url, "push", b"{}", Some(sign(b"{}")));
    assert!(code == 200 && text.contains("ignored_event"), "{code} {text}");
    for labels in [&["ubuntu-latest"][..], &["self-hosted", "ci-test", "gpu"][..]] {
        let b = job_payload(9100 + labels.len() as u64, "queued", labels);
        let (code, text) = send(&url, "workflow_job", &b, Some(sign(&b)));
        assert!(code == 200 && text.contains("unserved_labels"), "{labels:?}: {code} {text}");
    }
    let unserved = gh.enqueue("gpu-job", &["self-hosted", "gpu"], "true");
    wait_for("the gpu job's delivery to be answered", LONG, || {
        gh.get("/_fake/deliveries")
            .as_array()
            .unwrap()
            .iter()
            .any(|d| d["job_id"] == unserved && d["status"] == 200)
            .then_some(())
    });
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"missing_signature\"}"), 1.0);
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"bad_signature\"}"), 2.0);
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"too_large\"}"), 1.0);
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"unserved_labels\"}"), 3.0);
    assert!(ctl.containers().is_empty(), "a container for an unserved job: {:?}", ctl.containers());

    // A job delivered twice (GitHub's redelivery, and the same payload again): one container.
    let id = gh.enqueue("once", &["self-hosted", "ci-test"], &gated_steps(scratch, "once"));
    wait_for("the job to start", LONG, || scratch.join("once.started").exists().then_some(()));
    let first = gh
        .get("/_fake/deliveries")
        .as_array()
        .unwrap()
        .iter()
        .find(|d| d["job_id"] == id && d["action"] == "queued")
        .cloned()
        .unwrap();
    gh.post("/_fake/deliveries/redeliver", json!({"id": first["id"]}));
    wait_for("the redelivery to be answered", LONG, || {
        let log = gh.get("/_fake/deliveries");
        // The first answer is 202 (queued), the redelivery's 200 (duplicate).
        let n = log.as_array().unwrap().iter().filter(|d| d["id"] == first["id"] && d["status"].is_u64()).count();
        (n == 2).then_some(())
    });
    let again = job_payload(id, "queued", &["self-hosted", "ci-test"]);
    let (code, text) = send(&url, "workflow_job", &again, Some(sign(&again)));
    assert!(code == 200 && text.contains("duplicate"), "{code} {text}");
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"duplicate\"}"), 2.0);
    assert_eq!(ctl.containers().len(), 1, "{:?}", ctl.containers());
    release(scratch, "once");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 1.0);
    assert_eq!(gh.job(unserved)["status"], "queued", "the gpu job must wait for a gpu runner");
}

/// The delivery of `action` for job `id`, once the controller has answered it.
fn wait_answered(gh: &FakeGithub, id: u64, action: &str) -> Value {
    wait_for(&format!("the {action} delivery of job {id} to be answered"), LONG, || {
        gh.get("/_fake/deliveries")
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["job_id"] == id && d["action"] == action && d["status"].is_u64())
            .cloned()
    })
}

/// The delivery of `action` for job `id`, once answered or failed (dropped, refused).
fn wait_answered_or_failed(gh: &FakeGithub, id: u64, action: &str) -> Value {
    wait_for(&format!("the {action} delivery of job {id} to be sent or to fail"), LONG, || {
        gh.get("/_fake/deliveries")
            .as_array()
            .unwrap()
            .iter()
            .find(|d| d["job_id"] == id && d["action"] == action && (d["status"].is_u64() || d["error"].is_string()))
            .cloned()
    })
}

/// GitHub's architecture label for the engine's host, as the controller reads it.
fn engine_arch_label() -> String {
    let arch = docker_ok(&["info", "-f", "{{.Architecture}}"]);
    ci_runner::controller::webhook::arch_label(arch.trim()).map(str::to_string).unwrap_or_else(|l| l)
}

#[test]
fn jobs_are_served_by_github_s_label_rule_with_the_engine_host_s_architecture() {
    // Never: a container for a job the pool's runners cannot take (it would idle until its
    // lifetime), nor a job they can take left without one (`self-hosted` is not required).
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    let setup = t.setup().with("GH_LABELS", "gpu");
    setup.hook("/webhook");
    let ctl = setup.start();
    let arch = engine_arch_label();
    let other_arch = if arch == "ARM64" { "X64" } else { "ARM64" };
    assert!(ctl.proc.log_has(&format!("label={arch}")), "the architecture is not logged:\n{}", ctl.proc.log());

    let hosted = gh.enqueue("hosted", &["ubuntu-latest"], "true");
    let elsewhere = gh.enqueue("elsewhere", &["self-hosted", other_arch, "gpu"], "true");
    for id in [hosted, elsewhere] {
        let d = wait_answered(gh, id, "queued");
        assert_eq!(d["status"], 200, "{d}");
    }
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"unserved_labels\"}"), 2.0);
    assert!(ctl.containers().is_empty(), "a container for a job it cannot take: {:?}", ctl.containers());

    // `runs-on: [gpu]`, no `self-hosted`: a runner starts, registered with the built-in labels
    // and the engine host's architecture, and takes it.
    let bare = gh.enqueue("bare", &["gpu"], &gated_steps(scratch, "bare"));
    wait_for("the gpu-only job to start", LONG, || scratch.join("bare.started").exists().then_some(()));
    let runner = gh.job(bare)["runner_name"].as_str().unwrap().to_string();
    let registered: Vec<String> = gh
        .runners()
        .into_iter()
        .find(|r| r["name"] == runner.as_str())
        .map(|r| r["labels"].as_array().unwrap().iter().map(|l| l.as_str().unwrap().to_string()).collect())
        .unwrap_or_default();
    assert_eq!(registered, ["self-hosted", "Linux", arch.as_str(), "gpu"], "runner {runner}");
    release(scratch, "bare");
    let full = gh.enqueue("full", &["self-hosted", "linux", "gpu"], "true");
    let lower = arch.to_lowercase();
    let by_arch = gh.enqueue("by-arch", &["gpu", lower.as_str()], "true");
    for id in [bare, full, by_arch] {
        assert_eq!(wait_job_done(gh, id)["result"], "Succeeded", "job {id}");
    }
    ctl.wait_no_containers();
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 3.0);
    for id in [hosted, elsewhere] {
        assert_eq!(gh.job(id)["status"], "queued", "job {id} is not this pool's");
    }
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn twenty_queued_jobs_with_max_three_never_run_more_than_three_containers_and_all_run() {
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    let setup = t.setup().with("CONTROLLER_MAX_RUNNERS", "3");
    setup.hook("/webhook");
    let ctl = setup.start();

    // Watch the engine the whole time: the most containers seen at once.
    let stop = Arc::new(AtomicBool::new(false));
    let most = Arc::new(AtomicUsize::new(0));
    let watcher = {
        let (stop, most, name) = (stop.clone(), most.clone(), ctl.name.clone());
        std::thread::spawn(move || {
            let filter = format!("label=ci-runner.controller={name}");
            while !stop.load(Ordering::SeqCst) {
                let n = docker_ok(&["ps", "-a", "-q", "--filter", &filter]).lines().filter(|l| !l.is_empty()).count();
                most.fetch_max(n, Ordering::SeqCst);
            }
        })
    };
    let s = scratch.display();
    let ids: Vec<u64> = (0..20)
        .map(|i| gh.enqueue(&format!("job{i}"), &["self-hosted", "ci-test"], &format!("touch {s}/ran.{i}")))
        .collect();
    let deadline = Duration::from_secs(600);
    let results: Vec<Value> = ids
        .iter()
        .map(|id| {
            wait_for(&format!("job {id} to complete"), deadline, || {
                Some(gh.job(*id)).filter(|j| j["status"] == "completed")
            })
        })
        .collect();
    ctl.wait_no_containers();
    stop.store(true, Ordering::SeqCst);
    watcher.join().unwrap();
    for (id, j) in ids.iter().zip(&results) {
        assert_eq!(j["result"], "Succeeded", "job {id}: {j}");
    }
    for i in 0..20 {
        assert!(scratch.join(format!("ran.{i}")).exists(), "job{i} did not run");
    }
    let runners: HashSet<String> =
        results.iter().filter_map(|j| j["runner_name"].as_str().map(str::to_string)).collect();
    assert_eq!(runners.len(), 20, "one ephemeral runner per job: {runners:?}");
    let seen = most.load(Ordering::SeqCst);
    assert!((1..=3).contains(&seen), "{seen} containers at once");
    let high = ctl.metric("ci_runner_controller_containers_high_water{pool=\"default\"}");
    assert_eq!(high, 3.0, "the controller never reached its maximum");
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 20.0);
    // Issue #18's phantom slot: a stale listing re-adopted a removed container, which took a
    // place under the maximum and was removed a second time.
    assert_eq!(ctl.metric("ci_runner_controller_adopted_total{pool=\"default\"}"), 0.0, "a container was adopted");
    // The engine shows a container gone a moment before the pool has counted its removal.
    wait_for("20 removals counted", LONG, || {
        (ctl.metric("ci_runner_controller_removals_total{pool=\"default\"}") >= 20.0).then_some(())
    });
    assert_eq!(ctl.metric("ci_runner_controller_removals_total{pool=\"default\"}"), 20.0, "a container removed twice");
    let log = ctl.proc.log();
    for name in &runners {
        let removed = log
            .lines()
            .filter(|l| {
                l.contains("Runner container removed.")
                    && l.split_whitespace().any(|w| w.trim_end_matches(',') == format!("container={name}"))
            })
            .count();
        assert_eq!(removed, 1, "container {name} removed {removed} times");
    }
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn a_container_past_its_lifetime_while_its_job_runs_drains_the_job_succeeds_then_it_goes() {
    // Never: a runner container removed or killed while its job runs (issue #18: the lifetime
    // removed it by force, and the job was lost).
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    // Longer than a container's boot to its job, so that the job runs when the lifetime ends.
    let setup = t.setup().with("CONTROLLER_MAX_LIFETIME_SEC", "6");
    setup.hook("/webhook");
    let ctl = setup.start();
    let id = gh.enqueue("long", &["self-hosted", "ci-test"], &gated_steps(scratch, "long"));
    wait_for("the job to start", LONG, || scratch.join("long.started").exists().then_some(()));
    let names = ctl.containers();
    assert_eq!(names.len(), 1, "{names:?}");
    assert!(!ctl.proc.log_has("Runner container stopping"), "stopped before its job started:\n{}", ctl.proc.log());
    wait_for("the container past its lifetime to be stopped", LONG, || {
        (ctl.health()["pools"][0]["draining"] == 1 && ctl.proc.log_has("Runner container stopping")).then_some(())
    });
    // Draining: the same container still runs the job.
    let running = docker_ok(&["inspect", "-f", "{{.State.Running}}", &names[0]]);
    assert_eq!(running, "true", "the container was killed while its job ran");
    assert_eq!(gh.job(id)["status"], "in_progress");
    assert_eq!(ctl.containers(), names);
    release(scratch, "long");
    let job = wait_job_done(gh, id);
    assert_eq!((job["result"].as_str(), job["runner_name"].as_str()), (Some("Succeeded"), Some(names[0].as_str())));
    ctl.wait_no_containers();
    assert!(gh.runners().is_empty(), "a runner was left registered: {:?}", gh.runners());
    assert_eq!(ctl.metric("ci_runner_controller_stops_total{pool=\"default\"}"), 1.0);
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 1.0);
}

#[test]
fn a_controller_restarted_while_a_container_drains_never_stops_it_a_second_time() {
    // Never: a second SIGTERM to a draining runner container (its supervisor would escalate
    // and cancel the job) because the controller that sent the first one restarted.
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    let setup = t.setup().with("CONTROLLER_MAX_LIFETIME_SEC", "6");
    setup.hook("/webhook");
    let first = setup.start();
    let id = gh.enqueue("drained", &["self-hosted", "ci-test"], &gated_steps(scratch, "drained"));
    wait_for("the job to start", LONG, || scratch.join("drained.started").exists().then_some(()));
    let names = first.containers();
    first.proc.wait_log("Runner container stopping", LONG);
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.proc.pid() as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let mut first = first;
    first.proc.wait_exit(LONG);
    std::mem::forget(first);
    let second = setup.start();
    wait_for("the draining container adopted as draining", LONG, || {
        let h = second.health();
        (h["pools"][0]["adopted"] == 1 && h["pools"][0]["draining"] == 1).then_some(())
    });
    release(scratch, "drained");
    let job = wait_job_done(gh, id);
    assert_eq!((job["result"].as_str(), job["runner_name"].as_str()), (Some("Succeeded"), Some(names[0].as_str())));
    second.wait_no_containers();
    assert!(!second.proc.log_has("Runner container stopping"), "stopped twice:\n{}", second.proc.log());
    assert_eq!(second.metric("ci_runner_controller_stops_total{pool=\"default\"}"), 0.0);
    assert!(gh.runners().is_empty(), "a runner was left registered: {:?}", gh.runners());
}

#[test]
fn a_form_encoded_delivery_starts_a_runner_and_a_job_held_for_approval_waits_until_released() {
    // Never: a delivery sent with the webhook's default content type refused, nor a container
    // started (and held for hours) for a job no runner may take before its approval.
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup();
    let url = setup.url("/webhook");
    gh.post("/_fake/hooks", json!({"scope": REPO, "url": url, "secret": SECRET, "content_type": "form"}));
    let ctl = setup.start();
    let id = gh.enqueue("formed", &["self-hosted", "ci-test"], "true");
    assert_eq!(wait_answered(gh, id, "queued")["status"], 202, "the form-encoded delivery was not queued");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();

    let held = gh.post(
        "/_fake/jobs",
        json!({"scope": REPO, "labels": ["self-hosted", "ci-test"], "name": "held", "steps": "true", "waiting": true}),
    )["id"]
        .as_u64()
        .unwrap();
    assert_eq!(wait_answered(gh, held, "queued")["status"], 200);
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"waiting\"}"), 1.0);
    assert_eq!(ctl.metric("ci_runner_controller_queued_jobs{pool=\"default\"}"), 0.0, "a held job waits for a runner");
    assert!(ctl.containers().is_empty(), "a container for a job held for approval: {:?}", ctl.containers());
    gh.post(&format!("/_fake/jobs/{held}/approve"), json!({}));
    assert_eq!(wait_job_done(gh, held)["result"], "Succeeded");
    ctl.wait_no_containers();
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 2.0);

    // Any other content type: refused, with the setting to change.
    let body = job_payload(9300, "queued", &["self-hosted", "ci-test"]);
    let (code, text) = send_as(&url, "workflow_job", "text/plain", &body, Some(sign(&body)));
    assert!(code == 415 && text.contains("\\\"Content type\\\""), "{code} {text}");
    assert_eq!(ctl.metric("ci_runner_controller_webhook_deliveries_total{outcome=\"bad_content_type\"}"), 1.0);
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn jobs_queued_while_the_controller_was_down_all_run_once_it_starts() {
    // Never: a job left without a runner because its delivery came while the controller was
    // down (GitHub does not retry a failed delivery by itself).
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup();
    setup.hook("/webhook");
    let ids: Vec<u64> =
        (0..3).map(|i| gh.enqueue(&format!("missed{i}"), &["self-hosted", "ci-test"], "true")).collect();
    for id in &ids {
        let d = wait_for(&format!("job {id}'s delivery to fail"), LONG, || {
            gh.get("/_fake/deliveries")
                .as_array()
                .unwrap()
                .iter()
                .find(|d| d["job_id"] == *id && d["error"].is_string())
                .cloned()
        });
        assert!(d["status"].is_null(), "{d}");
    }
    let ctl = setup.start();
    for id in &ids {
        assert_eq!(wait_job_done(gh, *id)["result"], "Succeeded", "job {id}");
    }
    ctl.wait_no_containers();
    assert_eq!(ctl.metric("ci_runner_controller_reconcile_jobs_found_total{pool=\"default\"}"), 3.0);
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 3.0, "one runner per job");
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn a_dropped_delivery_s_job_runs_within_one_reconcile_period_at_a_bounded_cost() {
    // Never: a job whose `queued` delivery was lost left waiting for good; nor a reconcile
    // pass of an idle repository costing more than its two listings.
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup().with("CONTROLLER_RECONCILE_SEC", "3");
    setup.hook("/webhook");
    let ctl = setup.start();
    let passes = |ctl: &Controller| ctl.metric("ci_runner_controller_reconcile_passes_total{pool=\"default\"}");
    wait_for("two reconcile passes", LONG, || (passes(&ctl) >= 2.0).then_some(()));
    // Idle: each pass is the two run listings (queued, in_progress), and no job listing.
    let calls = ctl.metric("ci_runner_controller_reconcile_api_calls_total{pool=\"default\"}");
    let done = passes(&ctl);
    assert!(calls <= 2.0 * done && calls >= 2.0 * (done - 1.0), "{calls} calls for {done} passes");
    assert!(gh.rest_requests("GET", "/jobs").is_empty(), "{:?}", gh.rest_requests("GET", "/jobs"));

    gh.post("/_fake/deliveries/drop", json!({"count": 1, "action": "queued"}));
    let id = gh.enqueue("dropped", &["self-hosted", "ci-test"], "true");
    let d = wait_answered_or_failed(gh, id, "queued");
    assert_eq!(d["error"], "dropped by the fake", "{d}");
    // Found at the next full pass, counted in passes, not seconds (a loaded machine stretches
    // a period): the pass in flight when the delivery was lost, the one that finds the job,
    // and at most one more that can end before this scrape.
    let before = passes(&ctl);
    wait_for("the dropped job found by reconciliation", LONG, || {
        (ctl.metric("ci_runner_controller_reconcile_jobs_found_total{pool=\"default\"}") == 1.0).then_some(())
    });
    let took = passes(&ctl) - before;
    assert!(took <= 3.0, "found only after {took} passes, not within one period");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();
    // The webhook and reconcile paths are idempotent: one runner, however often it is listed.
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 1.0);
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

/// A job of the organization's (its repository `octo-org/octo-repo`), for its runners.
fn enqueue_org(gh: &FakeGithub, name: &str, labels: &[&str]) -> u64 {
    let v = gh.post("/_fake/jobs", json!({"scope": ORG, "labels": labels, "name": name, "steps": "true"}));
    v["id"].as_u64().expect("job id")
}

/// The fake's delivery log entries of job `id` (first deliveries and redeliveries).
fn deliveries_of(gh: &FakeGithub, id: u64) -> Vec<Value> {
    gh.get("/_fake/deliveries").as_array().unwrap().iter().filter(|d| d["job_id"] == id).cloned().collect()
}

#[test]
fn an_organization_pool_s_dropped_delivery_is_redelivered_within_one_reconcile_period_at_a_bounded_cost() {
    // Never: a job of an organization's pool left without a runner because its `queued`
    // delivery was lost; nor two containers for one job; nor a redelivery of a delivery that
    // succeeded; nor an idle pass costing more than its one listing of the deliveries.
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup().org().with("CONTROLLER_RECONCILE_SEC", "3");
    let hook_id = setup.hook_on(ORG, "/webhook");
    let setup = setup.with("CONTROLLER_HOOK_ID", &hook_id.to_string());
    let ctl = setup.start();
    let metric = |ctl: &Controller, name: &str| ctl.metric(&format!("ci_runner_controller_{name}{{pool=\"default\"}}"));
    let passes = |ctl: &Controller| metric(ctl, "reconcile_passes_total");
    wait_for("two reconcile passes", LONG, || (passes(&ctl) >= 2.0).then_some(()));
    let calls = metric(&ctl, "reconcile_api_calls_total");
    let done = passes(&ctl);
    assert!(calls <= done && calls >= done - 1.0, "idle: {calls} calls for {done} passes");
    let deliveries_path = format!("/orgs/{ORG}/hooks/{hook_id}/deliveries");
    let listings = gh.rest_requests("GET", &deliveries_path);
    assert!(!listings.is_empty() && listings.iter().all(|r| r["status"] == 200), "{listings:?}");

    // A job delivered as usual, then one whose delivery is lost on the way.
    let delivered = enqueue_org(gh, "delivered", &["self-hosted", "ci-test"]);
    assert_eq!(wait_job_done(gh, delivered)["result"], "Succeeded");
    gh.post("/_fake/deliveries/drop", json!({"count": 1, "action": "queued"}));
    let id = enqueue_org(gh, "dropped", &["self-hosted", "ci-test"]);
    let lost = wait_answered_or_failed(gh, id, "queued");
    assert_eq!(lost["error"], "dropped by the fake", "{lost}");
    // Within one period, counted in passes (see the repository's test above).
    let before = passes(&ctl);
    wait_for("the dropped delivery redelivered", LONG, || {
        (metric(&ctl, "reconcile_redeliveries_total") == 1.0).then_some(())
    });
    let took = passes(&ctl) - before;
    assert!(took <= 3.0, "redelivered only after {took} passes, not within one period");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();
    // Two more passes: nothing more redelivered, and the redelivered event is not looked into again.
    let later = passes(&ctl) + 2.0;
    wait_for("two more passes", LONG, || (passes(&ctl) >= later).then_some(()));
    assert_eq!(metric(&ctl, "reconcile_redeliveries_total"), 1.0);
    let attempts = gh.rest_requests("POST", "/attempts");
    assert_eq!(attempts.len(), 1, "{attempts:?}");
    assert!(
        attempts[0]["path"].as_str().unwrap().ends_with(&format!("/deliveries/{}/attempts", lost["delivery_id"])),
        "{attempts:?} for {lost}"
    );
    // The delivered job's event was never sent again; the lost one's exactly once, by GitHub's
    // redelivery (the same guid), answered by the webhook path.
    assert!(
        deliveries_of(gh, delivered).iter().all(|d| d["redelivery"] == false),
        "{:?}",
        deliveries_of(gh, delivered)
    );
    let again: Vec<Value> =
        deliveries_of(gh, id).into_iter().filter(|d| d["redelivery"] == true && d["action"] == "queued").collect();
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((again[0]["guid"].clone(), again[0]["status"].clone()), (lost["guid"].clone(), json!(202)));
    // One runner per job; the calls: one listing a pass, plus 3 for the missed job (its
    // payload, its job's status, its redelivery).
    assert_eq!(metric(&ctl, "starts_total"), 2.0, "one runner per job");
    let (calls, done) = (metric(&ctl, "reconcile_api_calls_total"), passes(&ctl));
    assert!(calls <= done + 3.0 && calls >= done - 1.0 + 3.0, "{calls} calls for {done} passes");
    assert_eq!(gh.rest_requests("GET", "/actions/jobs/").len(), 1, "the job's status asked once");
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn an_organization_pool_started_after_missed_deliveries_runs_each_of_its_jobs_once_and_no_other() {
    // Never: a job of an organization's pool left without a runner because its delivery came
    // while the controller was down; nor a redelivery of an event for labels the pool does not
    // serve, nor one looked into again at every pass.
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup().org().with("CONTROLLER_RECONCILE_SEC", "2");
    let hook_id = setup.hook_on(ORG, "/webhook");
    // No CONTROLLER_HOOK_ID: the webhook WEBHOOK_URL finds (and updates) is the one read.
    let url = setup.url("/webhook");
    let setup = setup.with("WEBHOOK_URL", &url);
    let ids: Vec<u64> = (0..3).map(|i| enqueue_org(gh, &format!("missed{i}"), &["self-hosted", "ci-test"])).collect();
    let gpu = enqueue_org(gh, "gpu", &["self-hosted", "gpu"]);
    for id in ids.iter().chain([&gpu]) {
        let d = wait_answered_or_failed(gh, *id, "queued");
        assert!(d["status"].is_null() && d["error"].is_string(), "{d}");
    }
    let ctl = setup.start();
    for id in &ids {
        assert_eq!(wait_job_done(gh, *id)["result"], "Succeeded", "job {id}");
    }
    ctl.wait_no_containers();
    let passes = || ctl.metric("ci_runner_controller_reconcile_passes_total{pool=\"default\"}");
    let later = passes() + 2.0;
    wait_for("two more passes", LONG, || (passes() >= later).then_some(()));
    assert_eq!(ctl.metric("ci_runner_controller_reconcile_redeliveries_total{pool=\"default\"}"), 3.0);
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 3.0, "one runner per job");
    assert!(deliveries_of(gh, gpu).iter().all(|d| d["redelivery"] == false), "{:?}", deliveries_of(gh, gpu));
    assert_eq!(gh.job(gpu)["status"], "queued");
    // Each failed event's payload read once, however many passes listed it.
    let payload_reads = gh
        .rest_requests("GET", &format!("/orgs/{ORG}/hooks/{hook_id}/deliveries/"))
        .into_iter()
        .filter(|r| !r["path"].as_str().unwrap().ends_with("/attempts"))
        .count();
    assert_eq!(payload_reads, 4, "{:?}", gh.rest_requests("GET", "/deliveries/"));
    assert_eq!(gh.rest_requests("POST", "/attempts").len(), 3);
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
}

#[test]
fn a_restarted_controller_adopts_the_running_containers_cleans_them_up_and_runs_the_waiting_job() {
    let Some(t) = Fixture::new() else { return };
    let (gh, scratch, state) = (&t.gh, &t.scratch, &t.state);
    // One pool from CONTROLLER_CONFIG, secrets by file name, at POST /webhook/adopt.
    let secrets = state.path().join("secrets");
    std::fs::create_dir_all(&secrets).unwrap();
    std::fs::write(secrets.join("ADOPT_PAT"), format!("{PAT}\n")).unwrap();
    std::fs::write(secrets.join("ADOPT_HOOK"), SECRET).unwrap();
    let s = scratch.display().to_string();
    let file = state.path().join("controller.json");
    let config = json!({"pools": [{
        "id": "adopt", "repository": REPO, "token_secret": "ADOPT_PAT", "webhook_secret": "ADOPT_HOOK",
        "labels": ["ci-test"], "max_runners": 2, "image": image(), "network": "host",
        "binds": [format!("{s}:{s}")],
        "env": {"STATUS_ADDR": "off", "AWS_EC2_METADATA_DISABLED": "true", "FAKE_RETRY_SLEEP_SEC": "0.2",
                "FAKE_SESSION_RETRY_SEC": "0.2", "FAKE_HTTP_RETRY_SEC": "0.05"},
    }]});
    std::fs::write(&file, serde_json::to_vec(&config).unwrap()).unwrap();
    let setup = t.setup().with("CONTROLLER_CONFIG", &file.display().to_string());
    setup.hook("/webhook/adopt");
    let first = setup.start();

    let a = gh.enqueue("a", &["self-hosted", "ci-test"], &gated_steps(scratch, "a"));
    let b = gh.enqueue("b", &["self-hosted", "ci-test"], &gated_steps(scratch, "b"));
    for n in ["a", "b"] {
        wait_for(&format!("job {n} to start"), LONG, || scratch.join(format!("{n}.started")).exists().then_some(()));
    }
    let running = first.containers();
    assert_eq!(running.len(), 2, "{running:?}");
    // A third job waits: the pool's maximum is 2.
    let c = gh.enqueue("c", &["self-hosted", "ci-test"], "true");
    wait_for("the third job to wait", LONG, || (first.health()["pools"][0]["queued_jobs"] == 1).then_some(()));
    // The controller dies (SIGKILL) while both run; a new one starts on the same address.
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(first.proc.pid() as i32), nix::sys::signal::Signal::SIGKILL)
        .unwrap();
    let mut first = first;
    first.proc.wait_exit(LONG);
    std::mem::forget(first);
    let second = setup.start();
    wait_for("both containers adopted", LONG, || {
        let h = second.health();
        (h["pools"][0]["adopted"] == 2).then_some(())
    });
    // One job finishes while the controller hears of it; the other's container is found exited.
    release(scratch, "a");
    assert_eq!(wait_job_done(gh, a)["result"], "Succeeded");
    release(scratch, "b");
    assert_eq!(wait_job_done(gh, b)["result"], "Succeeded");
    // The job that waited when the first controller died ran on the one runner started since
    // (once an adopted container was removed: the maximum held).
    assert_eq!(wait_job_done(gh, c)["result"], "Succeeded");
    second.wait_no_containers();
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
    assert!(second.health()["pools"][0]["high_water"].as_u64() <= Some(2), "{}", second.health());
    assert_eq!(second.metric("ci_runner_controller_starts_total{pool=\"adopt\"}"), 1.0);
}

#[test]
fn webhook_url_creates_the_webhook_with_a_kept_generated_secret_and_a_restart_updates_it() {
    let Some(t) = Fixture::new() else { return };
    let (gh, state) = (&t.gh, &t.state);
    let setup = t.setup();
    let url = setup.url("/webhook");
    // No WEBHOOK_SECRET (empty is unset): the controller generates one.
    let setup = setup.with("WEBHOOK_URL", &url).with("WEBHOOK_SECRET", "");
    let hooks = || gh.get("/_fake/hooks").as_array().cloned().unwrap();
    {
        let first = setup.start();
        let h = hooks();
        assert_eq!(h.len(), 1, "{h:?}");
        assert_eq!(
            (h[0]["config"]["url"].as_str(), h[0]["events"].clone()),
            (Some(url.as_str()), json!(["workflow_job"]))
        );
        let kept = std::fs::read_to_string(state.path().join("default.webhook-secret")).unwrap();
        assert_eq!(h[0]["config"]["secret"].as_str(), Some(kept.trim()));
        assert!(!first.proc.log().contains(kept.trim()), "the secret was logged");
        // A ping signed with it is accepted.
        let (code, _) =
            send(&url, "ping", b"{}", Some(ci_runner::controller::webhook::sign(kept.trim().as_bytes(), b"{}")));
        assert_eq!(code, 200);
    }
    // The restart finds the webhook by its URL and updates it: still one, same secret.
    let _second = setup.start();
    let h = hooks();
    assert_eq!(h.len(), 1, "{h:?}");
    let kept = std::fs::read_to_string(state.path().join("default.webhook-secret")).unwrap();
    assert_eq!(h[0]["config"]["secret"].as_str(), Some(kept.trim()));
    assert_eq!(gh.rest_requests("PATCH", "/hooks/").len(), 1, "{:?}", gh.requests());
    assert_eq!(gh.rest_requests("POST", "/hooks").len(), 1);
}

#[test]
fn min_idle_keeps_a_warm_runner_that_takes_the_next_job_and_is_replaced() {
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup().with("CONTROLLER_MIN_IDLE", "1");
    setup.hook("/webhook");
    let ctl = setup.start();
    // With no job at all, one runner starts and waits online.
    let warm = wait_for("a warm runner online", LONG, || gh.online_names().into_iter().next());
    assert_eq!(ctl.containers(), std::slice::from_ref(&warm));
    // A job: the warm runner takes it, and another one is started to stay warm.
    let id = gh.enqueue("warm-job", &["self-hosted", "ci-test"], "true");
    let job = wait_job_done(gh, id);
    assert_eq!((job["result"].as_str(), job["runner_name"].as_str()), (Some("Succeeded"), Some(warm.as_str())));
    wait_for("a new warm runner online, the used one removed", LONG, || {
        let online = gh.online_names();
        (online.len() == 1 && online[0] != warm && ctl.containers() == online).then_some(())
    });
}

#[test]
fn a_runner_that_cannot_start_is_deregistered_and_its_job_keeps_waiting() {
    let Some(t) = Fixture::new() else { return };
    let gh = &t.gh;
    let setup = t.setup().with("CONTROLLER_IMAGE", "ci-runner:no-such-image");
    setup.hook("/webhook");
    let ctl = setup.start();
    let id = gh.enqueue("stuck", &["self-hosted", "ci-test"], "true");
    wait_for("two failed starts (with a backoff between)", LONG, || {
        (ctl.metric("ci_runner_controller_start_failures_total{pool=\"default\"}") >= 2.0).then_some(())
    });
    assert_eq!(ctl.metric("ci_runner_controller_queued_jobs{pool=\"default\"}"), 1.0, "the job was dropped");
    assert_eq!(gh.job(id)["status"], "queued");
    // Each minted runner was de-registered again: none lingers offline.
    wait_for("no runner registered", LONG, || gh.runners().is_empty().then_some(()));
    assert!(ctl.containers().is_empty(), "{:?}", ctl.containers());
    assert!(ctl.proc.log_has("Failed to start the runner container; the job waits."), "{}", ctl.proc.log());
}

/// A registry of our own (Debian's `docker-registry`) on loopback, which the engine trusts
/// without TLS as it does any 127.0.0.0/8 registry; killed on drop.
struct Registry {
    child: std::process::Child,
    port: u16,
    _dir: tempfile::TempDir,
}

impl Registry {
    fn start() -> Option<Self> {
        if !require("docker-registry") {
            return None;
        }
        let dir = tempfile::tempdir().unwrap();
        let port = free_port();
        let config = dir.path().join("config.yml");
        let storage = dir.path().join("storage");
        std::fs::write(
            &config,
            format!(
                "version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {}\n\
                 http:\n  addr: 127.0.0.1:{port}\n",
                storage.display()
            ),
        )
        .unwrap();
        let child = Command::new("docker-registry")
            .arg("serve")
            .arg(&config)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("start docker-registry");
        let registry = Registry { child, port, _dir: dir };
        wait_for("the registry to answer /v2/", Duration::from_secs(30), || {
            ureq::get(&format!("http://127.0.0.1:{port}/v2/")).call().ok().map(|_| ())
        });
        Some(registry)
    }
}

impl Drop for Registry {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Removes the image tag on drop.
struct Tag(String);

impl Drop for Tag {
    fn drop(&mut self) {
        let _ = docker(&["rmi", &self.0]);
    }
}

#[test]
fn an_image_missing_on_the_host_is_pulled_at_the_start_and_again_when_a_runner_needs_it() {
    let Some(t) = Fixture::new() else { return };
    let Some(registry) = Registry::start() else { return };
    let (gh, scratch) = (&t.gh, &t.scratch);
    // The test image, pushed to the registry under a name of its own, then gone from the host.
    let tag = Tag(format!("127.0.0.1:{}/ci-runner-pull:{}", registry.port, rand_suffix()));
    docker_ok(&["tag", image(), &tag.0]);
    docker_ok(&["push", &tag.0]);
    docker_ok(&["rmi", &tag.0]);
    assert!(!has_image(&tag.0));

    let setup = t.setup().with("CONTROLLER_IMAGE", &tag.0);
    setup.hook("/webhook");
    let ctl = setup.start();
    ctl.proc.wait_log("Image pulled.", LONG);
    assert!(has_image(&tag.0), "the log says pulled, the engine has no {}", tag.0);

    // Gone again while the controller runs: the runner's start pulls it.
    docker_ok(&["rmi", &tag.0]);
    let id = gh.enqueue("pulled", &["self-hosted", "ci-test"], &gated_steps(scratch, "pulled"));
    wait_for("the job to start in a container of the pulled image", LONG, || {
        scratch.join("pulled.started").exists().then_some(())
    });
    assert!(has_image(&tag.0));
    release(scratch, "pulled");
    assert_eq!(wait_job_done(gh, id)["result"], "Succeeded");
    ctl.wait_no_containers();
    assert!(gh.runners().is_empty(), "runners left registered: {:?}", gh.runners());
    assert_eq!(ctl.metric("ci_runner_controller_starts_total{pool=\"default\"}"), 1.0);
}
