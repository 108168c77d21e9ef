//! The hardware lock across supervisors sharing one lock directory (as containers sharing a
//! bind-mounted host directory do).

use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);

struct Pool {
    gh: FakeGithub,
    lock_dir: tempfile::TempDir,
    scratch: tempfile::TempDir,
    runners: Vec<RunnerDir>,
    sups: Vec<Supervisor>,
}

fn shared_dir() -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    std::fs::set_permissions(d.path(), std::os::unix::fs::PermissionsExt::from_mode(0o777)).unwrap();
    d
}

/// `n` supervisors, runner `i` labelled `r<i>`, all locking resource `board`.
fn pool(n: usize, extra: &[(&str, &str)]) -> Pool {
    let gh = FakeGithub::start();
    let lock_dir = shared_dir();
    let scratch = shared_dir();
    let mut runners = Vec::new();
    let mut sups = Vec::new();
    for i in 0..n {
        let runner = RunnerDir::new();
        let mut env = base_env(&gh, &runner);
        env.retain(|(k, _)| k != "GH_LABELS");
        env.push(("GH_LABELS".into(), format!("r{i}")));
        env.push(("RUNNER_RESOURCE_ID".into(), "board".into()));
        env.push(("RUNNER_LOCK_DIR".into(), lock_dir.path().display().to_string()));
        for (k, v) in extra {
            env.push((k.to_string(), v.to_string()));
        }
        sups.push(Supervisor::start(&env));
        runners.push(runner);
    }
    for s in &sups {
        s.wait_state("idle", BOOT);
    }
    Pool { gh, lock_dir, scratch, runners, sups }
}

impl Pool {
    fn s(&self) -> &Path {
        self.scratch.path()
    }

    /// A job for runner `i` that logs its start and end (ns) and waits for its release file.
    fn job(&self, i: usize, name: &str) -> u64 {
        let s = self.s().display();
        let steps = format!(
            "echo $(date +%s%N) > {s}/{name}.start; touch {s}/{name}.started; \
             while [ ! -e {s}/{name}.release ]; do sleep 0.02; done; echo $(date +%s%N) > {s}/{name}.end"
        );
        self.gh.enqueue(name, &[&format!("r{i}")], &steps)
    }

    fn started(&self, name: &str) -> bool {
        self.s().join(format!("{name}.started")).exists()
    }

    fn wait_started(&self, name: &str) {
        wait_for(&format!("job {name} to start"), LONG, || self.started(name).then_some(()));
    }

    fn wait_lock_state(&self, i: usize, state: &str) {
        wait_for(&format!("runner {i}'s lock {state}"), LONG, || {
            self.sups[i].health().filter(|h| h["lock"]["state"] == state).map(|_| ())
        });
    }

    fn stamp(&self, name: &str, which: &str) -> u128 {
        std::fs::read_to_string(self.s().join(format!("{name}.{which}"))).unwrap().trim().parse().unwrap()
    }

    fn tickets(&self) -> Vec<PathBuf> {
        std::fs::read_dir(self.lock_dir.path().join("board.queue")).unwrap().flatten().map(|e| e.path()).collect()
    }
}

#[test]
fn jobs_never_overlap_and_waiters_go_in_arrival_order() {
    let p = pool(3, &[]);
    let a = p.job(0, "a");
    p.wait_started("a");
    p.wait_lock_state(0, "holding");
    let b = p.job(1, "b");
    p.wait_lock_state(1, "waiting");
    let metrics = p.sups[1].metrics();
    assert!(metrics.contains("ci_runner_lock_state{resource=\"board\",state=\"waiting\"} 1"), "{metrics}");
    let holding = p.sups[0].metrics();
    assert!(holding.contains("ci_runner_lock_state{resource=\"board\",state=\"holding\"} 1"), "{holding}");
    let c = p.job(2, "c");
    p.wait_lock_state(2, "waiting");
    assert!(!p.started("b") && !p.started("c"), "a job ran while another held the lock");
    // Release everything at once: the order must come from the lock, not from the releases.
    for n in ["a", "b", "c"] {
        release(p.s(), n);
    }
    for id in [a, b, c] {
        let job = wait_for(&format!("job {id} to complete"), LONG, || {
            Some(p.gh.job(id)).filter(|j| j["status"] == "completed")
        });
        assert_eq!(job["result"], "Succeeded", "{job}");
    }
    let (a0, a1, b0, b1, c0, c1) = (
        p.stamp("a", "start"),
        p.stamp("a", "end"),
        p.stamp("b", "start"),
        p.stamp("b", "end"),
        p.stamp("c", "start"),
        p.stamp("c", "end"),
    );
    assert!(a1 <= b0, "b started before a ended");
    assert!(b1 <= c0, "c started before b ended: waiters not served in arrival order or overlapping");
    assert!(a0 < a1 && b0 < b1 && c0 < c1);
    assert!(p.sups[1].log_has("Waiting for board, held by"), "{}", p.sups[1].log());
    assert!(p.tickets().is_empty(), "tickets left: {:?}", p.tickets());
}

#[test]
fn a_holder_killed_mid_job_hands_the_lock_on() {
    let mut p = pool(2, &[]);
    p.job(0, "a");
    p.wait_started("a");
    p.job(1, "b");
    p.wait_lock_state(1, "waiting");
    // SIGKILL the holder's whole container: supervisor, runner, job.
    let victim = p.sups.remove(0);
    drop(victim);
    p.wait_started("b");
    release(p.s(), "b");
    // The survivor (index 0 now) releases after its job.
    p.wait_lock_state(0, "free");
}

#[test]
fn a_cancelled_job_releases_the_lock() {
    let p = pool(2, &[]);
    let a = p.job(0, "a");
    p.wait_started("a");
    p.job(1, "b");
    p.wait_lock_state(1, "waiting");
    p.gh.post(&format!("/_fake/jobs/{a}/cancel"), json!({}));
    let job = wait_for("job a cancelled", LONG, || Some(p.gh.job(a)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Canceled");
    p.wait_started("b");
    release(p.s(), "b");
}

#[test]
fn draining_a_waiting_runner_leaves_no_lock_behind() {
    let mut p = pool(2, &[("DRAIN_TIMEOUT_SEC", "1")]);
    p.job(0, "a");
    p.wait_started("a");
    let b = p.job(1, "b");
    p.wait_lock_state(1, "waiting");
    assert_eq!(p.tickets().len(), 1);
    p.sups[1].signal(Signal::SIGTERM);
    assert_eq!(p.sups[1].wait_exit(LONG).code(), Some(7), "{}", p.sups[1].log());
    assert_eq!(p.gh.job(b)["result"], "Canceled");
    assert!(!p.started("b"), "b ran without the lock");
    assert!(p.tickets().is_empty(), "the drained waiter left its ticket: {:?}", p.tickets());
    release(p.s(), "a");
    p.wait_lock_state(0, "free");
    p.sups[0].signal(Signal::SIGTERM);
    assert_eq!(p.sups[0].wait_exit(LONG).code(), Some(0));
    let holder = std::fs::read_to_string(p.lock_dir.path().join("board.holder")).unwrap_or_default();
    assert!(holder.is_empty(), "holder note left: {holder}");
    let _ = &p.runners;
}
