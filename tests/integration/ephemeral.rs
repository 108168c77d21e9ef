//! Issue #7's registration modes, end to end: ephemeral runners (the container exits after
//! the job, or registers a fresh runner with `RUNNER_EPHEMERAL_RESTART`), JIT configurations,
//! the runner's self-update and the minimum runner version.

use std::collections::HashSet;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);
/// The start of every encoded JIT configuration the fake mints: base64 of `{".runner":"`.
const JIT_PREFIX: &str = "eyIucnVubmVyIjoi";
/// The runner's local registration files.
const LOCAL_FILES: [&str; 3] = [".runner", ".credentials", ".credentials_rsaparams"];

const EPHEMERAL: (&str, &str) = ("RUNNER_EPHEMERAL", "true");
const RESTART: (&str, &str) = ("RUNNER_EPHEMERAL_RESTART", "true");
const NO_JIT: (&str, &str) = ("RUNNER_JIT", "false");

fn jit_mints(gh: &FakeGithub) -> usize {
    gh.rest_requests("POST", "/actions/runners/generate-jitconfig").len()
}

fn token_calls(gh: &FakeGithub) -> usize {
    gh.rest_requests("POST", "/actions/runners/registration-token").len()
}

fn local_files_left(runner: &RunnerDir) -> Vec<&'static str> {
    LOCAL_FILES.into_iter().filter(|f| runner.path().join(f).exists()).collect()
}

fn status_of(gh: &FakeGithub, id: u64) -> String {
    gh.job(id)["status"].as_str().unwrap_or_default().to_string()
}

fn wait_completed(gh: &FakeGithub, id: u64) -> Value {
    wait_for(&format!("job {id} completed"), LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"))
}

/// Three jobs queued before the start: the container runs one of them, exits 0, and leaves no
/// registration on GitHub and no registration files behind; the other two stay queued.
fn container_mode_runs_one_of_three(extra: &[(&str, &str)]) -> (FakeGithub, Supervisor) {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let jobs: Vec<u64> = (1..=3).map(|i| gh.enqueue(&format!("job{i}"), &["ci-test"], "true")).collect();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[&[EPHEMERAL], extra].concat()));
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    let states: Vec<String> = jobs.iter().map(|id| status_of(&gh, *id)).collect();
    assert_eq!(states.iter().filter(|s| *s == "completed").count(), 1, "exactly one job must run: {states:?}");
    assert_eq!(states.iter().filter(|s| *s == "queued").count(), 2, "{states:?}");
    let done = jobs.iter().find(|id| status_of(&gh, **id) == "completed").unwrap();
    assert_eq!(gh.job(*done)["result"], "Succeeded");
    assert!(gh.runners().is_empty(), "a registration was left behind: {:?}", gh.runners());
    assert!(local_files_left(&runner).is_empty(), "left in the runner dir: {:?}", local_files_left(&runner));
    (gh, sup)
}

#[test]
fn ephemeral_container_mode_runs_one_of_three_queued_jobs_through_jit_and_leaves_nothing() {
    let (gh, sup) = container_mode_runs_one_of_three(&[]);
    assert_eq!(jit_mints(&gh), 1, "{:?}", gh.requests());
    assert_eq!(token_calls(&gh), 0, "a JIT runner asked for a registration token");
    assert!(sup.log_has("Registering the runner (JIT configuration)."), "{}", sup.log());
}

#[test]
fn ephemeral_container_mode_with_config_sh_runs_one_of_three_queued_jobs_and_leaves_nothing() {
    let (gh, _sup) = container_mode_runs_one_of_three(&[NO_JIT]);
    assert_eq!(jit_mints(&gh), 0);
    assert_eq!(token_calls(&gh), 1);
}

/// Three jobs queued: restart mode runs all three, each on a registration of its own (distinct
/// names and ids), then stays up with a fresh runner until SIGTERM, which leaves nothing.
fn restart_mode_runs_three_on_three_registrations(extra: &[(&str, &str)], registrations: fn(&FakeGithub) -> usize) {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let jobs: Vec<u64> = (1..=3).map(|i| gh.enqueue(&format!("job{i}"), &["ci-test"], "true")).collect();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[&[EPHEMERAL, RESTART], extra].concat()));
    let done: Vec<Value> = jobs.iter().map(|id| wait_completed(&gh, *id)).collect();
    for j in &done {
        assert_eq!(j["result"], "Succeeded", "{j}");
    }
    let names: HashSet<&str> = done.iter().filter_map(|j| j["runner_name"].as_str()).collect();
    let ids: HashSet<u64> = done.iter().filter_map(|j| j["runner_id"].as_u64()).collect();
    assert_eq!((names.len(), ids.len()), (3, 3), "three jobs, three registrations: {done:?}");
    // A fourth registration waits for the next job; once it listens, stop the container.
    wait_for("a fourth registration", LONG, || (registrations(&gh) == 4).then_some(()));
    sup.wait_state("idle", BOOT);
    assert!(sup.child.try_wait().unwrap().is_none(), "restart mode exited after a job");
    assert_eq!(gh.runners().len(), 1, "only the waiting runner is registered: {:?}", gh.runners());
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "a registration was left behind: {:?}", gh.runners());
    assert!(local_files_left(&runner).is_empty(), "left in the runner dir: {:?}", local_files_left(&runner));
    assert_eq!(sup.count("Registering a fresh ephemeral runner."), 3, "{}", sup.log());
}

#[test]
fn restart_mode_runs_three_queued_jobs_on_three_jit_registrations_and_leaves_none() {
    restart_mode_runs_three_on_three_registrations(&[], jit_mints);
}

#[test]
fn restart_mode_with_config_sh_runs_three_queued_jobs_on_three_registrations_and_leaves_none() {
    restart_mode_runs_three_on_three_registrations(&[NO_JIT], token_calls);
}

#[test]
fn restart_mode_sigterm_mid_job_lets_it_finish_and_registers_nothing_more() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[EPHEMERAL, RESTART]));
    sup.wait_state("idle", BOOT);
    let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
    wait_for("the first job to start", LONG, || scratch.join("first.started").exists().then_some(()));
    let second = gh.enqueue("second", &["ci-test"], "true");
    sup.signal(Signal::SIGTERM);
    sup.wait_state("draining", BOOT);
    release(&scratch, "first");
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert_eq!(gh.job(first)["result"], "Succeeded", "the running job was not allowed to finish");
    assert_eq!(status_of(&gh, second), "queued", "a job ran after the signal");
    assert_eq!(jit_mints(&gh), 1, "a runner was registered after the signal");
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
    assert!(local_files_left(&runner).is_empty(), "{:?}", local_files_left(&runner));
}

#[test]
fn sigterm_before_any_job_deletes_the_jit_registration_by_its_id() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[EPHEMERAL, RESTART]));
    sup.wait_state("idle", BOOT);
    let registered = gh.runners();
    assert_eq!(registered.len(), 1, "{registered:?}");
    let id = registered[0]["id"].as_u64().unwrap();
    assert_eq!(registered[0]["jit"], true);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "the runner whose job never came was left: {:?}", gh.runners());
    let deletes: Vec<_> = gh
        .rest_requests("DELETE", &format!("/actions/runners/{id}"))
        .into_iter()
        .filter(|r| r["path"].as_str().is_some_and(|p| p.ends_with(&format!("/actions/runners/{id}"))))
        .collect();
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    assert!(gh.rest_requests("GET", "/actions/runners").is_empty(), "the id from generate-jitconfig was not used");
}

#[test]
fn the_jit_config_stays_out_of_argv_the_job_the_log_and_the_runner_dir() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[EPHEMERAL]));
    let steps = format!("env > {s}/env.txt; {}", gated_steps(&scratch, "env"), s = scratch.display());
    let id = gh.enqueue("env", &["ci-test"], &steps);
    wait_for("the job to start", LONG, || scratch.join("env.started").exists().then_some(()));
    let job_env = std::fs::read_to_string(scratch.join("env.txt")).unwrap();
    assert!(job_env.contains("GITHUB_ACTIONS=true"), "not a job environment: {job_env}");
    assert!(!job_env.contains("JITCONFIG") && !job_env.contains(JIT_PREFIX), "the JIT config reached the job");
    // Every process under the supervisor while the job runs: none has it in argv; run.sh has
    // it in its environment (so the search would find it).
    let mut cmdlines = 0;
    let mut in_environ = 0;
    for pid in descendants(sup.pid()) {
        if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/cmdline")) {
            let text = String::from_utf8_lossy(&bytes).to_ascii_lowercase();
            assert!(!text.contains("jitconfig"), "--jitconfig in /proc/{pid}/cmdline: {text}");
            assert!(!text.contains(&JIT_PREFIX.to_ascii_lowercase()), "the JIT config in /proc/{pid}/cmdline");
            cmdlines += 1;
        }
        if let Ok(bytes) = std::fs::read(format!("/proc/{pid}/environ")) {
            let text = String::from_utf8_lossy(&bytes);
            if text.contains(&format!("ACTIONS_RUNNER_INPUT_JITCONFIG={JIT_PREFIX}")) {
                in_environ += 1;
            }
        }
    }
    assert!(cmdlines >= 5, "too few runner processes inspected ({cmdlines})");
    assert!(in_environ >= 1, "run.sh did not get the JIT config in its environment");
    release(&scratch, "env");
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert_eq!(gh.job(id)["result"], "Succeeded");
    assert!(local_files_left(&runner).is_empty(), "credentials outlived the job: {:?}", local_files_left(&runner));
    assert!(!sup.log_has(JIT_PREFIX), "the JIT config reached the log");
    assert!(!gh.log().contains(JIT_PREFIX));
    assert_eq!((jit_mints(&gh), token_calls(&gh)), (1, 0));
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn a_jit_runner_joins_the_configured_group_and_a_missing_group_is_a_clear_error() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let group = gh.post("/_fake/groups", json!({"org": "octo-org", "name": "gpu"}))["id"].as_u64().unwrap();
    assert_ne!(group, 1);
    let org = [EPHEMERAL, ("GH_ORGANIZATION", "octo-org"), ("GH_REPOSITORY", ""), ("RUNNER_GROUP", "GPU")];
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &org));
    sup.wait_state("idle", BOOT);
    let registered = gh.runners();
    assert_eq!(registered.len(), 1, "{registered:?}");
    assert_eq!(registered[0]["runner_group_id"].as_u64(), Some(group), "{registered:?}");
    let labels: Vec<&str> = registered[0]["labels"].as_array().unwrap().iter().filter_map(Value::as_str).collect();
    for l in ["self-hosted", "Linux", "ci-test", "linux"] {
        assert!(labels.iter().any(|x| x.eq_ignore_ascii_case(l)), "{l} missing from {labels:?}");
    }
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty());

    let missing = [EPHEMERAL, ("GH_ORGANIZATION", "octo-org"), ("GH_REPOSITORY", ""), ("RUNNER_GROUP", "nope")];
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &missing));
    assert_eq!(sup.wait_exit(BOOT).code(), Some(4), "{}", sup.log());
    assert!(
        sup.log_has("runner group \"nope\" not found in the organization octo-org") && sup.log_has("Default, gpu"),
        "{}",
        sup.log()
    );
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

fn listener_pid(sup: &Supervisor) -> Option<u32> {
    descendants(sup.pid()).into_iter().find(|p| {
        std::fs::read(format!("/proc/{p}/cmdline"))
            .is_ok_and(|c| c.split(|b| *b == 0).take(2).any(|a| a.ends_with(b"/Runner.Listener")))
    })
}

/// Asks the fake GitHub to send runner `name` a self-update, and waits until the runner is
/// back on a new Listener process.
fn self_update(gh: &FakeGithub, sup: &Supervisor, name: &str) {
    let id = gh.runner_named(name).expect("registered")["id"].as_u64().unwrap();
    let before = wait_for("the Listener", BOOT, || listener_pid(sup));
    gh.post(&format!("/_fake/runners/{id}/update"), json!({"version": "2.337.0"}));
    sup.wait_log("Runner listener exit because of updating", LONG);
    sup.wait_log("Update finished successfully.", LONG);
    wait_for("a new Listener after the update", LONG, || listener_pid(sup).filter(|p| *p != before));
    wait_for("the runner listening again", LONG, || (sup.count("Listening for Jobs") >= 2).then_some(()));
}

#[test]
fn a_self_update_mid_life_restarts_the_runner_inside_the_container() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("RUNNER_DISABLE_UPDATE", "false")]));
    sup.wait_state("idle", BOOT);
    let name = sup.runner_name();
    self_update(&gh, &sup, &name);
    assert!(sup.child.try_wait().unwrap().is_none(), "the container died of the update");
    // run.sh itself carried the update: the supervisor never had to start it again.
    assert_eq!(sup.count("Runner started."), 1, "{}", sup.log());
    assert!(!sup.log_has("Runner exited."), "{}", sup.log());
    let id = gh.enqueue("after-update", &["ci-test"], &gated_steps(&scratch, "after"));
    wait_for("the job to start on the updated runner", LONG, || scratch.join("after.started").exists().then_some(()));
    release(&scratch, "after");
    assert_eq!(wait_completed(&gh, id)["result"], "Succeeded");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn an_ephemeral_jit_runner_updated_before_its_job_still_runs_it_on_the_same_registration() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[EPHEMERAL]));
    sup.wait_state("idle", BOOT);
    let name = sup.runner_name();
    let registered = gh.runner_named(&name).unwrap()["id"].as_u64();
    // rc 4 (ephemeral): run.sh starts the new version with the same JIT configuration.
    self_update(&gh, &sup, &name);
    let id = gh.enqueue("after-update", &["ci-test"], "true");
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    let job = gh.job(id);
    assert_eq!(job["result"], "Succeeded", "{job}");
    assert_eq!(job["runner_id"].as_u64(), registered, "the job ran on another registration");
    assert_eq!(jit_mints(&gh), 1);
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
    assert!(local_files_left(&runner).is_empty(), "{:?}", local_files_left(&runner));
}

#[test]
fn a_runner_older_than_the_minimum_is_refused_before_anything_is_registered() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // config.sh's path (the check overlaps the token fetch, which registers nothing) and JIT's.
    for extra in [&[][..], &[EPHEMERAL][..]] {
        let env = env_with(&gh, &runner, &[&[("RUNNER_MIN_VERSION", "2.400.0")], extra].concat());
        let mut sup = Supervisor::start(&env);
        assert_eq!(sup.wait_exit(BOOT).code(), Some(6), "{}", sup.log());
        for needle in ["version 2.336.0", "RUNNER_MIN_VERSION 2.400.0", "rebuild the image with a newer runner"] {
            assert!(sup.log_has(needle), "{needle:?} not in the log:\n{}", sup.log());
        }
        assert!(!sup.log_has("Registering the runner"), "{}", sup.log());
    }
    assert!(
        gh.requests().iter().all(|r| !r["path"].as_str().unwrap_or("").contains("runner-registration")),
        "config.sh ran"
    );
    assert_eq!(jit_mints(&gh), 0);
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());

    // A runner that may update itself is not held to the minimum.
    let env = env_with(&gh, &runner, &[("RUNNER_MIN_VERSION", "2.400.0"), ("RUNNER_DISABLE_UPDATE", "false")]);
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
}

#[test]
fn a_version_github_calls_deprecated_gives_up_saying_to_rebuild_the_image() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.post("/_fake/deprecate", json!({"below": "9.9.9"}));
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    assert_eq!(sup.wait_exit(LONG).code(), Some(6), "{}", sup.log());
    assert!(sup.log_has("is deprecated and cannot receive messages."), "{}", sup.log());
    assert!(sup.log_has("rebuild the image with a newer runner"), "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}
