//! The fault matrix (issue #16): each case states what must hold and what must never happen,
//! and checks both. README "Failure behaviour" is built from these cases and the ones named
//! there from other files.

use std::io::{Read, Write};
use std::net::TcpStream;
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(90);

fn listener_pid(runner: &RunnerDir) -> Option<u32> {
    let root = runner.path().display().to_string();
    std::fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = std::fs::read(format!("/proc/{pid}/cmdline")).ok()?;
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        (cmd.contains(&format!("{root}/bin/Runner.Listener")) && cmd.contains(" run")).then_some(pid)
    })
}

/// SIGTERM while the registration token is being fetched (GitHub slow to answer): the boot
/// stops, exit 0. Never: a runner registered after the signal, `config.sh` started.
#[test]
fn sigterm_while_the_token_fetch_hangs_stops_the_boot_and_registers_nothing() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.fault(json!({"kind": "slow", "count": 1, "path_contains": "registration-token", "delay_ms": 20000}));
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    wait_for("the token request to be on its way", BOOT, || {
        sup.health().filter(|h| h["state"] == "registering" || h["state"] == "starting").map(|_| ())
    });
    sup.signal(Signal::SIGTERM);
    let status = sup.wait_exit(BOOT);
    let log = sup.log();
    assert_eq!(status.code(), Some(0), "{log}");
    assert!(gh.runners().is_empty(), "registered after the signal: {:?}", gh.runners());
    assert!(!runner.path().join(".runner").exists(), "config.sh ran after the signal\n{log}");
}

/// A token request that hangs past the client's timeout is abandoned and tried again: the
/// runner comes up. Never: a boot wedged on one request.
#[test]
fn a_hung_token_request_is_retried_and_the_runner_comes_up() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // Longer than one request's 30 s timeout.
    gh.fault(json!({"kind": "slow", "count": 1, "path_contains": "registration-token", "delay_ms": 40000}));
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", LONG);
    let name = sup.runner_name();
    // The fake logs a request once answered: the hung one is still being held.
    assert_eq!(gh.rest_requests("POST", "registration-token").len(), 1, "the retry");
    assert!(
        sup.log().lines().any(|l| l.contains("registration-token") && l.contains("retrying")),
        "the timeout and the retry must be logged\n{}",
        sup.log()
    );
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named(&name).is_none(), "runner {name} left registered");
}

/// The Listener SIGKILLed while idle (an OOM kill): the supervisor re-registers and is idle
/// again, with exactly one registration. Never: the container ends, a stale registration stays.
#[test]
fn the_listener_killed_while_idle_is_registered_again_with_nothing_stale() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", BOOT);
    let first = sup.runner_name();
    let pid = wait_for("the Listener's pid", BOOT, || listener_pid(&runner));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    wait_for("a new Listener", LONG, || listener_pid(&runner).filter(|p| *p != pid));
    sup.wait_state("idle", LONG);
    wait_for("exactly one online registration", LONG, || (gh.online_names().len() == 1).then_some(()));
    assert_eq!(gh.runners().len(), 1, "a stale registration was left: {:?}", gh.runners());
    // And it still takes jobs.
    let scratch = runner.scratch();
    let id = gh.enqueue("after-kill", &["ci-test"], &gated_steps(&scratch, "after-kill"));
    release(&scratch, "after-kill");
    let job = wait_for("the job after the kill", LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Succeeded", "{job}");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "left registered: {:?} (first name {first})", gh.runners());
}

/// The Listener SIGKILLed mid-job: the supervisor survives, re-registers, and the next job
/// runs. The killed job cannot be finished by anyone (GitHub times it out); the old
/// registration, busy with it, is removed as soon as GitHub lets go of it, and never counted
/// as ours afterwards. Never: the container ends, the next job waits forever.
#[test]
fn the_listener_killed_mid_job_leaves_the_supervisor_up_and_the_next_job_runs() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", BOOT);
    let first = gh.enqueue("doomed", &["ci-test"], &gated_steps(&scratch, "doomed"));
    wait_for("the job to start", LONG, || scratch.join("doomed.started").exists().then_some(()));
    let pid = wait_for("the Listener's pid", BOOT, || listener_pid(&runner));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGKILL).unwrap();
    // GitHub gives up on the job whose runner vanished (the fake: a completion by hand).
    wait_for("the supervisor to notice", LONG, || sup.log_has("Runner exited.").then_some(()));
    gh.post(&format!("/_fake/jobs/{first}/complete"), json!({"result": "Failed"}));
    release(&scratch, "doomed");
    let next = gh.enqueue("next", &["ci-test"], "true");
    let job = wait_for("the next job", LONG, || Some(gh.job(next)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Succeeded", "{job}\n{}", sup.log());
    assert!(sup.health().is_some(), "the supervisor must still serve /health");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "left registered: {:?}", gh.runners());
}

/// The status port flooded with garbage and half-open requests: `/health` still answers,
/// and the drain is unaffected. Never: a wedged status server, a panic, a lost drain.
#[test]
fn a_flooded_status_port_still_answers_health() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", BOOT);
    let addr = sup.status_addr();
    let mut held = Vec::new();
    for i in 0..200 {
        let Ok(mut s) = TcpStream::connect(&addr) else { continue };
        let _ = match i % 4 {
            0 => s.write_all(b"\x00\xff\xfe garbage \r\n\r\n"),
            1 => s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\n"), // never finished
            2 => s.write_all(format!("GET /{} HTTP/1.1\r\n\r\n", "a".repeat(100_000)).as_bytes()),
            _ => Ok(()), // connected, silent
        };
        held.push(s);
    }
    for _ in 0..5 {
        let h = sup.health().expect("/health must answer while the port is flooded");
        assert_eq!(h["state"], "idle", "{h}");
    }
    // A raw request on a fresh connection gets a whole answer.
    let mut s = TcpStream::connect(&addr).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    s.write_all(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n").unwrap();
    let mut answer = String::new();
    let _ = s.read_to_string(&mut answer);
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(!sup.log().contains("panicked"), "{}", sup.log());
    drop(held);
    assert!(gh.runners().is_empty());
}

/// The ECS agent down (its metadata endpoint refusing) with task protection on: jobs run and
/// the drain completes, with a warning. Never: a job held up or a failed exit for it.
#[test]
fn the_ecs_agent_down_costs_a_warning_and_nothing_else() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    // ECS_AGENT_URI turns task protection on; nothing listens there.
    let closed = format!("http://127.0.0.1:{}", free_port());
    let env = env_with(&gh, &runner, &[("ECS_AGENT_URI", closed.as_str())]);
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    let id = gh.enqueue("with-ecs-down", &["ci-test"], &gated_steps(&scratch, "with-ecs-down"));
    release(&scratch, "with-ecs-down");
    let job = wait_for("the job", LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Succeeded", "{job}");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(sup.log().contains("WARN"), "the agent being down must be said\n{}", sup.log());
    assert!(gh.runners().is_empty());
}
