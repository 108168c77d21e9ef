//! The supervisor's life, end to end: the real binary, the fake GitHub, the fake runner.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);
/// Reporting a result to github.com takes at least one round trip (tens of ms) before the
/// Listener polls again; the fake answers on loopback, so model that with a short pause.
const COOLDOWN_MS: u64 = 50;

/// Starts a supervisor and waits until its runner is online and idle.
fn start_idle(gh: &FakeGithub, runner: &RunnerDir, extra: &[(&str, &str)]) -> (Supervisor, String) {
    start_online(gh, &env_with(gh, runner, extra))
}

/// SIGTERM an idle supervisor: it exits 0 and its runner is gone from GitHub.
fn stop_idle(sup: &mut Supervisor, gh: &FakeGithub, name: &str) {
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named(name).is_none(), "runner {name} left registered");
}

/// Enqueues a job that waits for its release file, and waits until it runs.
fn start_gated_job(gh: &FakeGithub, scratch: &std::path::Path, name: &str) -> u64 {
    let id = gh.enqueue(name, &["ci-test"], &gated_steps(scratch, name));
    wait_for(&format!("job {name} to start"), LONG, || scratch.join(format!("{name}.started")).exists().then_some(()));
    id
}

fn job_status(gh: &FakeGithub, id: u64) -> String {
    gh.job(id)["status"].as_str().unwrap_or_default().to_string()
}

fn wait_job_status(gh: &FakeGithub, id: u64, status: &str, timeout: Duration) -> serde_json::Value {
    wait_for(&format!("job {id} {status}"), timeout, || Some(gh.job(id)).filter(|j| j["status"] == status))
}

#[test]
fn sigterm_when_idle_deregisters_and_exits_zero() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
    assert!(!runner.path().join(".runner").exists(), ".runner left behind");
    assert!(sup.log_has("Runner de-registered."));
}

#[test]
fn sigterm_mid_job_lets_job_finish_then_deregisters() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    // Little grace between a job's end and the next assignment: the SIGINT must beat the poll.
    gh.post("/_fake/config", json!({"assign_cooldown_ms": COOLDOWN_MS}));
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
    wait_for("the first job to start", LONG, || scratch.join("first.started").exists().then_some(()));
    sup.signal(Signal::SIGTERM);
    sup.wait_state("draining", BOOT);
    // Queued during the drain: must not start here.
    let second = gh.enqueue("second", &["ci-test"], &gated_steps(&scratch, "second"));
    release(&scratch, "first");
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", sup.log());
    let job = gh.job(first);
    assert_eq!(job["result"], "Succeeded", "the first job was not allowed to finish: {job}");
    assert!(scratch.join("first.done").exists());
    assert_eq!(job_status(&gh, second), "queued", "the second job started on a draining runner");
    assert!(!scratch.join("second.started").exists());
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
}

#[test]
fn drain_timeout_cancels_the_job_and_deregisters() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[("DRAIN_TIMEOUT_SEC", "1")]);
    let id = start_gated_job(&gh, &scratch, "stuck");
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(7), "{}", sup.log());
    let job = wait_job_status(&gh, id, "completed", BOOT);
    assert_eq!(job["result"], "Canceled", "{job}");
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
}

#[test]
fn second_signal_cancels_the_job_at_once() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let id = start_gated_job(&gh, &scratch, "long");
    sup.signal(Signal::SIGTERM);
    sup.wait_log("Waiting for the running job to finish.", BOOT);
    sup.signal(Signal::SIGINT);
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(7), "{}", sup.log());
    assert_eq!(wait_job_status(&gh, id, "completed", BOOT)["result"], "Canceled");
    assert!(gh.runner_named(&name).is_none());
}

#[test]
fn github_errors_and_rate_limits_are_retried_and_nothing_is_left_registered() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.fault(json!({"kind": "status", "status": 502, "count": 2, "path_contains": "registration-token"}));
    gh.fault(json!({"kind": "rate_limit_secondary", "count": 1, "path_contains": "registration-token"}));
    gh.fault(json!({"kind": "rate_limit_primary", "count": 1, "path_contains": "registration-token"}));
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    assert_eq!(gh.rest_requests("POST", "registration-token").len(), 5, "expected 4 failures then success");
    gh.fault(json!({"kind": "status", "status": 503, "count": 2, "method": "DELETE"}));
    gh.fault(json!({"kind": "rate_limit_primary", "count": 1, "method": "DELETE"}));
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
    assert!(gh.rest_requests("DELETE", "/actions/runners/").len() >= 4);
    assert!(!sup.log_has(PAT), "the token reached the log");
}

#[test]
fn bad_configuration_reports_every_error_and_calls_nothing() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let env = env_with(
        &gh,
        &runner,
        &[
            ("GH_REPOSITORY", "not-a-repo"),
            ("RUNNER_EPHEMERAL", "maybe"),
            ("DRAIN_TIMEOUT_SEC", "ten"),
            ("STATUS_ADDR", "nowhere"),
        ],
    );
    let mut sup = Supervisor::start(&env);
    let status = sup.wait_exit(BOOT);
    assert_eq!(status.code(), Some(3), "{}", sup.log());
    for var in [
        "GH_REPOSITORY=\"not-a-repo\"",
        "RUNNER_EPHEMERAL=\"maybe\"",
        "DRAIN_TIMEOUT_SEC=\"ten\"",
        "STATUS_ADDR=\"nowhere\"",
    ] {
        assert!(sup.log_has(var), "{var} not reported:\n{}", sup.log());
    }
    let rest: Vec<_> =
        gh.requests().into_iter().filter(|r| !r["path"].as_str().unwrap_or("").contains("/_fake/")).collect();
    assert!(rest.is_empty(), "API called despite bad configuration: {rest:?}");
}

#[test]
fn refused_token_and_unknown_repository_are_clear_errors() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("GH_TOKEN", "ghp_wrong")]));
    assert_eq!(sup.wait_exit(BOOT).code(), Some(4), "{}", sup.log());
    assert!(sup.log_has("401") && sup.log_has("invalid, expired or revoked"), "{}", sup.log());
    assert!(!sup.log_has("ghp_wrong"));
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("GH_REPOSITORY", "octo-org/missing")]));
    assert_eq!(sup.wait_exit(BOOT).code(), Some(4), "{}", sup.log());
    assert!(sup.log_has("repository octo-org/missing not found"), "{}", sup.log());
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("GH_TOKEN", "ghp_noadmin")]));
    assert_eq!(sup.wait_exit(BOOT).code(), Some(4), "{}", sup.log());
    assert!(sup.log_has("Administration: write"), "{}", sup.log());
    assert!(gh.runners().is_empty(), "a refused start registered something");
}

#[test]
fn runner_crash_is_restarted_with_backoff() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let listener = wait_for("the Listener process", BOOT, || {
        descendants(sup.pid()).into_iter().find(|p| {
            std::fs::read(format!("/proc/{p}/cmdline"))
                .is_ok_and(|c| String::from_utf8_lossy(&c).contains("Runner.Listener"))
        })
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(listener as i32), Signal::SIGKILL).unwrap();
    sup.wait_log("Restarting the runner after a pause.", BOOT);
    wait_for("a second run.sh", BOOT, || (sup.count("Runner started.") >= 2).then_some(()));
    let health = sup.wait_state("idle", BOOT);
    assert!(health["restarts"].as_u64() >= Some(1), "{health}");
    // Killed, the Listener left a stale session: the supervisor re-registers at once rather
    // than sitting through the Listener's 240 s of session retries.
    assert!(sup.log_has("listener_rc=Some(137) decision=Reregister"), "{}", sup.log());
    wait_for("the runner online again", BOOT, || {
        gh.runner_named(&name).filter(|r| r["status"] == "online").map(|_| ())
    });
    stop_idle(&mut sup, &gh, &name);
}

#[test]
fn no_secret_reaches_the_job_or_any_runner_process() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, _) = start_idle(&gh, &runner, &[("CI_STORAGE_PRIVATE_KEY", "key-material-xyz")]);
    let steps = format!("env > {s}/env.txt; {}", gated_steps(&scratch, "env"), s = scratch.display());
    let id = gh.enqueue("env", &["ci-test"], &steps);
    wait_for("the job to start", LONG, || scratch.join("env.started").exists().then_some(()));
    let job_env = std::fs::read_to_string(scratch.join("env.txt")).unwrap();
    assert!(job_env.contains("GITHUB_ACTIONS=true"), "not a job environment: {job_env}");
    for secret in [PAT, "key-material-xyz"] {
        assert!(!job_env.contains(secret), "{secret} in the job's environment");
    }
    assert!(!job_env.contains("GH_TOKEN="), "GH_TOKEN set in the job");
    // Every process under the supervisor except the supervisor itself (which holds the token,
    // non-dumpable), while the job runs. The supervisor is PID 1's child running ci-runner, not
    // the lowest PID: PIDs wrap (32768 here), and once they have, a runner process may have the
    // lowest, and the supervisor would be inspected in its place.
    let ppid = |p: u32| {
        let stat = std::fs::read_to_string(format!("/proc/{p}/stat")).unwrap_or_default();
        stat.rfind(')').and_then(|i| stat[i + 1..].split_whitespace().nth(1)?.parse::<u32>().ok())
    };
    // comm, not exe: the supervisor is not dumpable, so only root may read its exe link.
    let is_ci_runner =
        |p: u32| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ci-runner");
    let supervisors: Vec<u32> =
        descendants(sup.pid()).into_iter().filter(|p| ppid(*p) == Some(sup.pid()) && is_ci_runner(*p)).collect();
    assert_eq!(supervisors.len(), 1, "not one supervisor process under PID 1: {supervisors:?}");
    let supervisor_child = supervisors[0];
    let mut checked = 0;
    for pid in descendants(sup.pid()).into_iter().filter(|p| *p != supervisor_child) {
        for file in ["environ", "cmdline"] {
            if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/{file}")) {
                let text = String::from_utf8_lossy(&bytes);
                assert!(!text.contains(PAT) && !text.contains("key-material-xyz"), "secret in /proc/{pid}/{file}");
                checked += 1;
            }
        }
    }
    assert!(checked >= 8, "too few runner processes inspected ({checked})");
    release(&scratch, "env");
    wait_job_status(&gh, id, "completed", LONG);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0));
    assert!(!sup.log_has(PAT) && !sup.log_has("key-material-xyz"), "a secret reached the log");
}

#[test]
fn status_command_reports_busy_then_unreachable_after_exit() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, _) = start_idle(&gh, &runner, &[]);
    gh.enqueue("probe", &["ci-test"], &gated_steps(&scratch, "probe"));
    sup.wait_state("busy", LONG);
    let out = std::process::Command::new(bin())
        .arg("status")
        .env_clear()
        .env("STATUS_ADDR", sup.status_addr())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let body = String::from_utf8_lossy(&out.stdout);
    assert!(body.contains("\"state\":\"busy\"") && body.contains("\"job\":\"probe\""), "{body}");
    release(&scratch, "probe");
    sup.wait_state("idle", LONG);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0));
    let out = std::process::Command::new(bin())
        .arg("status")
        .env_clear()
        .env("STATUS_ADDR", sup.status_addr())
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(1), "status must fail once the supervisor is gone");
}

#[test]
fn supervisor_as_pid1_drains_and_reaps_job_orphans() {
    if !require_root("PID-namespace tests") || !require("unshare") {
        return;
    }
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let mut env = base_env(&gh, &runner);
    env.push(("STATUS_ADDR".into(), "127.0.0.1:0".into()));
    let mut cmd = std::process::Command::new("unshare");
    cmd.args(["--pid", "--fork", "--mount-proc", bin()]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
    let mut sup = Supervisor::from_command(cmd, String::new());
    sup.wait_state("idle", BOOT);
    // 200 daemonised grandchildren: re-parented to PID 1, they must not stay zombies.
    let steps = format!(
        "i=0; while [ $i -lt 200 ]; do ( /bin/true & ); i=$((i+1)); done; touch {s}/orphans.done",
        s = scratch.display()
    );
    let id = gh.enqueue("orphans", &["ci-test"], &steps);
    wait_job_status(&gh, id, "completed", LONG);
    let init = wait_for("the namespace's PID 1", BOOT, || descendants(sup.pid()).first().copied());
    wait_for("no zombie under the namespace's PID 1", BOOT, || {
        let zombies = descendants(init).into_iter().filter(|p| {
            std::fs::read_to_string(format!("/proc/{p}/stat"))
                .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| r.trim_start().starts_with('Z')))
        });
        (zombies.count() == 0).then_some(())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), Signal::SIGTERM).unwrap();
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty());
}

#[test]
fn ephemeral_runner_exits_zero_after_its_job_and_leaves_nothing() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[("RUNNER_EPHEMERAL", "true")]);
    let one = gh.enqueue("one", &["ci-test"], &gated_steps(&scratch, "one"));
    let two = gh.enqueue("two", &["ci-test"], &gated_steps(&scratch, "two"));
    wait_for("the first job to start", LONG, || scratch.join("one.started").exists().then_some(()));
    release(&scratch, "one");
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert_eq!(gh.job(one)["result"], "Succeeded");
    assert_eq!(job_status(&gh, two), "queued", "an ephemeral runner took a second job");
    assert!(gh.runner_named(&name).is_none(), "ephemeral runner {name} left registered");
    assert!(!runner.path().join(".runner").exists());
}

#[test]
fn registration_deleted_on_the_server_is_registered_again() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let id = gh.runner_named(&name).unwrap()["id"].as_u64().unwrap();
    // Someone removes the runner in GitHub's UI while it idles.
    ureq::delete(&format!("{}/api/v3/repos/{REPO}/actions/runners/{id}", gh.url()))
        .set("Authorization", &format!("Bearer {PAT}"))
        .call()
        .unwrap();
    sup.wait_log("decision=Reregister", LONG);
    wait_for("the runner registered and online again", LONG, || {
        gh.runner_named(&name).filter(|r| r["status"] == "online" && r["id"].as_u64() != Some(id)).map(|_| ())
    });
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "a registration was left behind: {:?}", gh.runners());
}

#[test]
fn sigterm_during_registration_leaves_nothing_registered() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // The registration token call hangs for 3 s; the signal comes meanwhile.
    gh.fault(json!({"kind": "slow", "count": 1, "delay_ms": 3000, "path_contains": "registration-token"}));
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("registering", BOOT);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn a_failed_config_sh_is_retried_with_a_fresh_token_then_gives_up() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // An expired or unknown registration token looks like a 404 to config.sh (actions/runner#4042).
    gh.fault(json!({"kind": "status", "status": 404, "count": 1, "path_contains": "runner-registration"}));
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    assert!(sup.log_has("config.sh failed; registering again with a fresh token."), "{}", sup.log());
    assert_eq!(gh.rest_requests("POST", "registration-token").len(), 2);
    stop_idle(&mut sup, &gh, &name);

    gh.fault(json!({"kind": "status", "status": 404, "count": 10, "path_contains": "runner-registration"}));
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    assert_eq!(sup.wait_exit(LONG).code(), Some(6), "{}", sup.log());
    assert_eq!(sup.count("config.sh failed; registering again"), 2, "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn the_token_can_come_from_a_secret_file() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("GH_TOKEN"), format!("{PAT}\n")).unwrap();
    let mut env = base_env(&gh, &runner);
    env.retain(|(k, _)| k != "GH_TOKEN");
    env.push(("SECRETS_DIR".into(), secrets.path().display().to_string()));
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let name = sup.runner_name();
    assert!(!sup.log_has(PAT));
    stop_idle(&mut sup, &gh, &name);
}

#[test]
fn replicas_of_one_pool_each_claim_their_own_instance_labels() {
    let gh = FakeGithub::start();
    let locks = tempfile::tempdir().unwrap();
    let dir = locks.path().display().to_string();
    let table = "1:board,phytiumpi;2:board,rk3568";
    let extra = [("RUNNER_INSTANCE_LABELS", table), ("RUNNER_LOCK_DIR", dir.as_str())];
    let (r1, r2, r3) = (RunnerDir::new(), RunnerDir::new(), RunnerDir::new());
    let (mut a, name_a) = start_idle(&gh, &r1, &extra);
    let (mut b, name_b) = start_idle(&gh, &r2, &extra);
    let labels = |name: &str| -> Vec<String> {
        let r = gh.runner_named(name).unwrap();
        r["labels"]
            .as_array()
            .unwrap()
            .iter()
            .map(|l| l["name"].as_str().unwrap_or(l.as_str().unwrap_or("")).to_string())
            .collect()
    };
    let (la, lb) = (labels(&name_a), labels(&name_b));
    assert!(la.contains(&"phytiumpi".to_string()) && la.contains(&"ci-test".to_string()), "{la:?}");
    assert!(lb.contains(&"rk3568".to_string()) && !lb.contains(&"phytiumpi".to_string()), "{lb:?}");
    // A job for one board goes to that board's runner, and RUNNER_INSTANCE tells it which.
    let scratch = r2.scratch();
    let job = gh.enqueue("flash", &["rk3568"], &format!("echo \"$RUNNER_INSTANCE\" > {}/instance", scratch.display()));
    wait_job_status(&gh, job, "completed", LONG);
    assert_eq!(gh.job(job)["runner_name"], name_b.as_str());
    assert_eq!(std::fs::read_to_string(scratch.join("instance")).unwrap().trim(), "2");
    // A third replica finds every entry claimed: a clear error, nothing registered.
    let mut c = Supervisor::start(&env_with(&gh, &r3, &extra));
    assert_eq!(c.wait_exit(BOOT).code(), Some(3), "{}", c.log());
    assert!(c.log_has("every replica index of RUNNER_INSTANCE_LABELS"), "{}", c.log());
    assert_eq!(gh.runners().len(), 2);
    // The first goes away: its index is free for the next replica at once.
    stop_idle(&mut a, &gh, &name_a);
    let (mut d, name_d) = start_idle(&gh, &r3, &extra);
    assert!(labels(&name_d).contains(&"phytiumpi".to_string()));
    stop_idle(&mut b, &gh, &name_b);
    stop_idle(&mut d, &gh, &name_d);
}
