//! The drain under a fast, adversarial GitHub (issue #15): the fake assigns the next queued
//! job inside the request that reports a completion, and the fake Listener follows the real
//! order of run-service jobs (report the result, poll, then print `completed with result`).
//! What must never happen: a job cancelled by a drain that could have let it finish, a
//! registration left behind, exit 0 after a cancelled job.

use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);

/// The fake GitHub at its fastest: no pause between a job's end and the next assignment,
/// which happens within the completion report itself.
fn instant_github() -> FakeGithub {
    let gh = FakeGithub::start();
    gh.post("/_fake/config", json!({"assign_cooldown_ms": 0, "assign_on_complete": true}));
    gh
}

fn start_idle(gh: &FakeGithub, runner: &RunnerDir, extra: &[(&str, &str)]) -> (Supervisor, String) {
    let mut env = vec![("FAKE_LISTENER_REPORT_FIRST", "1")];
    env.extend_from_slice(extra);
    start_online(gh, &env_with(gh, runner, &env))
}

fn job(gh: &FakeGithub, id: u64) -> Value {
    gh.job(id)
}

fn wait_started(scratch: &std::path::Path, name: &str) {
    wait_for(&format!("job {name} to start"), LONG, || scratch.join(format!("{name}.started")).exists().then_some(()));
}

/// The REST calls of one drain: the labels' DELETE, then the registration's.
fn drain_calls(gh: &FakeGithub) -> (Vec<Value>, Vec<Value>) {
    let labels = gh.rest_requests("DELETE", "/labels");
    let deletes: Vec<Value> = gh
        .rest_requests("DELETE", "/actions/runners/")
        .into_iter()
        .filter(|r| !r["path"].as_str().unwrap_or_default().contains("/labels"))
        .collect();
    (labels, deletes)
}

#[test]
fn fifty_mid_job_drains_under_instant_assignment_cancel_no_job() {
    let gh = instant_github();
    for round in 0..50 {
        gh.post("/_fake/reset", json!({}));
        gh.post("/_fake/config", json!({"assign_cooldown_ms": 0, "assign_on_complete": true}));
        let runner = RunnerDir::new();
        let scratch = runner.scratch();
        let (mut sup, name) = start_idle(&gh, &runner, &[]);
        let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
        wait_started(&scratch, "first");
        // Two more for the pool's labels: each would be handed to this runner the instant the
        // first one's result is reported, were it still eligible.
        let queued = [gh.enqueue("q1", &["ci-test"], "true"), gh.enqueue("q2", &["ci-test", "linux"], "true")];
        sup.signal(Signal::SIGTERM);
        sup.wait_log("Runner's custom labels removed", BOOT);
        release(&scratch, "first");
        let status = sup.wait_exit(LONG);
        let log = sup.log();
        assert_eq!(status.code(), Some(0), "round {round}: a drain that cancelled nothing exits 0\n{log}");
        assert_eq!(job(&gh, first)["result"], "Succeeded", "round {round}: the running job must finish\n{log}");
        for q in queued {
            let j = job(&gh, q);
            assert_eq!(j["status"], "queued", "round {round}: a queued job reached the draining runner: {j}\n{log}");
        }
        assert!(!log.contains("The drain cancelled"), "round {round}: {log}");
        assert!(gh.runner_named(&name).is_none(), "round {round}: runner {name} left registered");
        let (labels, deletes) = drain_calls(&gh);
        assert_eq!(labels.len(), 1, "round {round}: one labels call per drain: {labels:?}");
        assert_eq!(deletes.len(), 1, "round {round}: one DELETE per drain: {deletes:?}");
    }
}

/// The DELETE removes the runner at once but its answer comes late (a slow network), so the
/// Listener sees "no longer exists", exits, and the runner ends before the supervisor has its
/// 204. Never: a second DELETE of the registration (a 404 and an extra call per drain, which
/// the loaded CI saw once in 50 rounds of the test above).
#[test]
fn a_delete_answered_after_the_runner_exited_is_taken_not_repeated() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
    wait_started(&scratch, "first");
    let id = gh.runner_named(&name).expect("registered")["id"].as_u64().expect("id");
    gh.fault(json!({"kind": "slow_answer", "delay_ms": 3000, "count": 1, "method": "DELETE",
               "path_ends_with": format!("/actions/runners/{id}")}));
    sup.signal(Signal::SIGTERM);
    sup.wait_log("Runner's custom labels removed", BOOT);
    release(&scratch, "first");
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert_eq!(job(&gh, first)["result"], "Succeeded", "{log}");
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
    // The runner really ended before the answer came: its exit is logged before the 204.
    let exited = log.find("Runner listener exit with 0").expect("the Listener's exit logged");
    let deregistered = log.find("Runner de-registered.").expect("the 204 taken");
    assert!(exited < deregistered, "the case under test did not happen: the 204 came first\n{log}");
    let (_, deletes) = drain_calls(&gh);
    assert_eq!(deletes.len(), 1, "one DELETE per drain: {deletes:?}\n{log}");
    assert!(!log.contains("already gone"), "{log}");
}

#[test]
fn idle_drain_strips_the_labels_then_deletes_then_stops_the_listener() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let id = gh.runner_named(&name).expect("registered")["id"].as_u64().expect("id");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    let (labels, deletes) = drain_calls(&gh);
    assert_eq!(labels.len(), 1, "{labels:?}");
    assert!(labels[0]["path"].as_str().unwrap().ends_with(&format!("/actions/runners/{id}/labels")), "{labels:?}");
    assert_eq!(deletes.len(), 1, "{deletes:?}");
    // The fake logs each request when it has answered it.
    let all = gh.requests();
    let at = |suffix: &str| {
        all.iter()
            .position(|r| r["method"] == "DELETE" && r["path"].as_str().is_some_and(|p| p.ends_with(suffix)))
            .unwrap_or_else(|| panic!("no DELETE …{suffix}: {all:?}"))
    };
    assert!(
        at(&format!("/actions/runners/{id}/labels")) < at(&format!("/actions/runners/{id}")),
        "the labels must go before the registration: {all:?}"
    );
    let log = sup.log();
    let stripped = log.find("Runner's custom labels removed").expect("labels step logged");
    let removed = log.find("Runner removed from GitHub: stopping the runner.").expect("stop step logged");
    assert!(stripped < removed, "never a SIGINT before the labels and the DELETE\n{log}");
    assert!(gh.runner_named(&name).is_none());
}

/// A mid-job drain while the labels call is slow: the job queued meanwhile is assigned the
/// instant the first one's result is reported, while the runner still has its labels. Returns
/// the first job's and the late job's ids once the late one runs on the draining runner.
fn slip_a_job_in(gh: &FakeGithub, sup: &Supervisor, scratch: &std::path::Path) -> (u64, u64) {
    gh.fault(json!({"kind": "slow", "count": 1, "path_contains": "/labels", "method": "DELETE", "delay_ms": 3500}));
    let first = gh.enqueue("first", &["ci-test"], &gated_steps(scratch, "first"));
    wait_started(scratch, "first");
    let late = gh.enqueue("late", &["ci-test"], &gated_steps(scratch, "late"));
    sup.signal(Signal::SIGTERM);
    sup.wait_state("draining", BOOT);
    release(scratch, "first");
    wait_started(scratch, "late");
    (first, late)
}

#[test]
fn a_job_that_slipped_in_before_the_labels_went_finishes_and_exits_zero() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let (first, late) = slip_a_job_in(&gh, &sup, &scratch);
    // It runs on the draining runner: it must be waited for, not cancelled.
    release(&scratch, "late");
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(job(&gh, first)["result"], "Succeeded", "{log}");
    assert_eq!(job(&gh, late)["result"], "Succeeded", "the slipped-in job was cancelled\n{log}");
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(log.contains("A job started during the drain; waiting for it."), "{log}");
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
}

#[test]
fn the_deadline_cancels_a_slipped_in_job_and_exits_seven() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[("DRAIN_TIMEOUT_SEC", "2")]);
    // The late job is never released: only the deadline ends it.
    let (first, late) = slip_a_job_in(&gh, &sup, &scratch);
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(job(&gh, first)["result"], "Succeeded", "{log}");
    let j = wait_for("the late job completed", BOOT, || Some(job(&gh, late)).filter(|j| j["status"] == "completed"));
    assert_eq!(j["result"], "Canceled", "{log}");
    assert_eq!(status.code(), Some(7), "a cancelled job must never exit 0\n{log}");
    assert!(log.contains("The drain cancelled this job."), "{log}");
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
}

#[test]
fn labels_endpoint_failing_still_drains_with_a_warning() {
    for (fault, needle) in [
        (
            json!({"kind": "status", "status": 502, "count": 1000, "path_contains": "/labels"}),
            "Failed to remove the runner's labels",
        ),
        (json!({"kind": "status", "status": 403, "count": 1000, "path_contains": "/labels"}), "Administration: write"),
    ] {
        let gh = instant_github();
        let runner = RunnerDir::new();
        let scratch = runner.scratch();
        let (mut sup, name) = start_idle(&gh, &runner, &[]);
        gh.fault(fault.clone());
        let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
        wait_started(&scratch, "first");
        sup.signal(Signal::SIGTERM);
        sup.wait_log(needle, LONG);
        release(&scratch, "first");
        let status = sup.wait_exit(LONG);
        let log = sup.log();
        assert_eq!(job(&gh, first)["result"], "Succeeded", "{fault}: {log}");
        assert_eq!(status.code(), Some(0), "{fault}: {log}");
        assert!(log.contains("WARN"), "{fault}: the failure is a warning\n{log}");
        assert!(gh.runner_named(&name).is_none(), "{fault}: runner {name} left registered");
    }
}

#[test]
fn the_drain_asks_a_runner_that_has_one_to_stop_polling_through_its_sentinel() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let sentinel = runner.path().join(".drain");
    std::fs::write(&sentinel, b"").unwrap();
    // A sentinel left by an earlier run must not stop the new one at its first poll.
    let (mut sup, name) = start_idle(&gh, &runner, &[("FAKE_LISTENER_DRAIN_SENTINEL", "1")]);
    assert!(!sentinel.exists(), "a stale sentinel was left for the new run");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(sentinel.exists(), "the drain did not write <root>/.drain");
    assert!(gh.runner_named(&name).is_none());
}

#[test]
fn a_delete_that_hangs_after_a_mid_job_drain_is_tried_again_and_nothing_is_left() {
    let gh = instant_github();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (mut sup, name) = start_idle(&gh, &runner, &[]);
    let id = gh.runner_named(&name).expect("registered")["id"].as_u64().expect("id");
    // The registration's first DELETE hangs far past the request timeout.
    gh.fault(json!({"kind": "slow", "count": 1, "method": "DELETE", "delay_ms": 45000,
                    "path_ends_with": format!("/actions/runners/{id}")}));
    let first = gh.enqueue("first", &["ci-test"], &gated_steps(&scratch, "first"));
    wait_started(&scratch, "first");
    sup.signal(Signal::SIGTERM);
    sup.wait_state("draining", BOOT);
    release(&scratch, "first");
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(job(&gh, first)["result"], "Succeeded", "{log}");
    // Never exit 5 with the registration left: a second attempt fits in the budget.
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered\n{log}");
}
