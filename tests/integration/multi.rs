//! Several runners in one container (`RUNNER_COUNT`) from one installed runner, and the admin
//! API that adds and removes runners, with `STATE_DIR` across restarts.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);
const TOKEN: &str = "admin-token-0123456789abcdef";
const SECOND: &str = "octo-org/second-repo";

/// A directory for the runners' roots, on the install's filesystem, that the runner user can
/// traverse.
fn roots_dir() -> (tempfile::TempDir, PathBuf) {
    let dir = tempfile::tempdir().unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let roots = dir.path().join("runners");
    (dir, roots)
}

/// The runners `/health` lists, once `n` of them listen.
fn wait_listening(sup: &Supervisor, n: usize) -> Vec<Value> {
    wait_for(&format!("{n} runners listening"), BOOT, || {
        let h = sup.health()?;
        let runners = h["runners"].as_array()?.clone();
        let idle = runners.iter().filter(|r| r["state"] == "idle" && r["removed"] != true).count();
        (idle == n).then_some(runners)
    })
}

/// The environment of a supervisor with the admin API on a free port, `STATE_DIR` and
/// `RUNNER_ROOTS_DIR`, and the API's address.
fn admin_env(
    gh: &FakeGithub,
    runner: &RunnerDir,
    roots: &Path,
    state: &Path,
    extra: &[(&str, &str)],
) -> (String, Vec<(String, String)>) {
    let addr = format!("127.0.0.1:{}", free_port());
    let (state, roots) = (state.display().to_string(), roots.display().to_string());
    let mut vars =
        vec![("ADMIN_TOKEN", TOKEN), ("ADMIN_ADDR", &addr), ("STATE_DIR", &state), ("RUNNER_ROOTS_DIR", &roots)];
    vars.extend_from_slice(extra);
    let env = env_with(gh, runner, &vars);
    (addr.clone(), env)
}

fn enqueue_in(gh: &FakeGithub, scope: &str, name: &str, labels: &[&str], steps: &str) -> u64 {
    let v = gh.post("/_fake/jobs", json!({"scope": scope, "labels": labels, "name": name, "steps": steps}));
    v["id"].as_u64().expect("job id")
}

fn job_done(gh: &FakeGithub, id: u64) -> Value {
    wait_for(&format!("job {id} to complete"), LONG, || {
        let j = gh.job(id);
        (j["status"] == "completed").then_some(j)
    })
}

/// An admin API call: the status code and the JSON body.
fn admin(addr: &str, method: &str, path: &str, token: Option<&str>, body: Option<Value>) -> (u16, Value) {
    let mut req = ureq::request(method, &format!("http://{addr}{path}"));
    if let Some(t) = token {
        req = req.set("Authorization", &format!("Bearer {t}"));
    }
    let res = match body {
        Some(b) => req.send_json(b),
        None => req.call(),
    };
    match res {
        Ok(r) => (r.status(), r.into_json().unwrap_or(Value::Null)),
        Err(ureq::Error::Status(code, r)) => (code, r.into_json().unwrap_or(Value::Null)),
        Err(e) => panic!("{method} {path}: {e}"),
    }
}

/// The status answered to a POST that announces a 100 KiB body, sent without the body: the
/// server must refuse it on the announced length (sending it all would race the answer).
fn announce_huge_body(addr: &str) -> u16 {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(BOOT)).unwrap();
    let head = format!(
        "POST /runners HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {TOKEN}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
        100 * 1024
    );
    s.write_all(head.as_bytes()).unwrap();
    let mut answer = Vec::new();
    let _ = s.read_to_end(&mut answer);
    let text = String::from_utf8_lossy(&answer);
    text.split_whitespace().nth(1).and_then(|c| c.parse().ok()).unwrap_or_else(|| panic!("no answer: {text:?}"))
}

fn listed(addr: &str, name: &str) -> Option<Value> {
    let (code, v) = admin(addr, "GET", "/runners", Some(TOKEN), None);
    assert_eq!(code, 200, "{v}");
    v.as_array()?.iter().find(|r| r["name"] == name).cloned()
}

#[test]
fn three_runners_share_one_install_run_jobs_at_once_and_drain_together() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (_keep, roots) = roots_dir();
    let roots_s = roots.display().to_string();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("RUNNER_COUNT", "3"), ("RUNNER_ROOTS_DIR", &roots_s)]));
    let listed = wait_listening(&sup, 3);
    let mut names: Vec<String> = listed.iter().map(|r| r["runner_name"].as_str().unwrap().to_string()).collect();
    names.sort();
    names.dedup();
    assert_eq!(names.len(), 3, "three distinct names: {listed:?}");
    for n in &names {
        assert!(gh.runner_named(n).is_some_and(|r| r["status"] == "online"), "{n} is not online");
    }
    // The second and third roots share the install's files instead of copying them.
    let ino = |p: &Path| std::fs::metadata(p).unwrap().ino();
    for i in ["2", "3"] {
        for f in std::fs::read_dir(runner.path().join("bin")).unwrap().flatten() {
            let own = roots.join(i).join("bin").join(f.file_name());
            assert_eq!(ino(&own), ino(&f.path()), "root {i} copied {}", own.display());
        }
        assert!(roots.join(i).join(".runner").exists(), "root {i} has its own registration");
    }
    // Three jobs, all running at once: none is released before all have started.
    let ids: Vec<u64> =
        ["a", "b", "c"].iter().map(|j| enqueue_in(&gh, REPO, j, &["ci-test"], &gated_steps(&scratch, j))).collect();
    for j in ["a", "b", "c"] {
        wait_for(&format!("job {j} to start"), LONG, || scratch.join(format!("{j}.started")).exists().then_some(()));
    }
    let h = wait_for("three busy runners in /health", BOOT, || sup.health().filter(|h| h["busy_runners"] == 3));
    assert_eq!(h["runner_count"], 3, "{h}");
    assert_eq!(h["state"], "busy", "{h}");
    // SIGTERM mid-jobs: every job finishes, nothing new starts, every runner is removed.
    sup.signal(Signal::SIGTERM);
    wait_for("every runner draining", BOOT, || {
        let h = sup.health()?;
        h["runners"].as_array()?.iter().all(|r| r["state"] == "draining").then_some(())
    });
    let late = enqueue_in(&gh, REPO, "late", &["ci-test"], &gated_steps(&scratch, "late"));
    for j in ["a", "b", "c"] {
        release(&scratch, j);
    }
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(0), "{}", sup.log());
    for id in ids {
        assert_eq!(job_done(&gh, id)["result"], "Succeeded");
    }
    assert_eq!(gh.job(late)["status"], "queued", "a job started during the drain");
    for n in &names {
        assert!(gh.runner_named(n).is_none(), "runner {n} left registered");
    }
}

#[test]
fn admin_api_adds_a_runner_for_another_repository_and_drains_it_on_delete() {
    let gh = FakeGithub::start();
    gh.post("/_fake/repos", json!({"full_name": SECOND}));
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let (_keep, roots) = roots_dir();
    let state = tempfile::tempdir().unwrap();
    let (addr, env) = admin_env(&gh, &runner, &roots, state.path(), &[]);
    let mut sup = Supervisor::start(&env);
    wait_listening(&sup, 1);
    assert!(!sup.log().contains(TOKEN), "the admin token was logged");

    let good = json!({"scope": SECOND, "labels": ["second"], "name": "second-1"});
    assert_eq!(admin(&addr, "GET", "/runners", None, None).0, 401);
    assert_eq!(admin(&addr, "GET", "/runners", Some("admin-token-wrong-0000000000"), None).0, 401);
    assert_eq!(admin(&addr, "POST", "/runners", None, Some(good.clone())).0, 401);
    assert_eq!(admin(&addr, "DELETE", "/runners/second-1", Some("x"), None).0, 401);
    let (code, v) =
        admin(&addr, "POST", "/runners", Some(TOKEN), Some(json!({"scope": SECOND, "labels": ["x"], "name": "../x"})));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("name"), "{v}");
    let (code, v) =
        admin(&addr, "POST", "/runners", Some(TOKEN), Some(json!({"scope": "not a/scope/x", "labels": ["x"]})));
    assert_eq!(code, 400, "{v}");
    assert!(v["error"].as_str().unwrap().contains("scope"), "{v}");
    assert!(!roots.join("api").join("..").join("x").exists());
    assert_eq!(announce_huge_body(&addr), 413, "a 100 KiB body was not refused");

    let (code, v) = admin(&addr, "POST", "/runners", Some(TOKEN), Some(good.clone()));
    assert_eq!(code, 201, "{v}");
    assert_eq!(admin(&addr, "POST", "/runners", Some(TOKEN), Some(good)).0, 409);
    assert!(state.path().join("runners/second-1.json").exists());
    wait_for("second-1 online on the fake GitHub", BOOT, || {
        gh.runner_named("second-1").filter(|r| r["status"] == "online" && r["scope"] == SECOND).map(|_| ())
    });
    wait_for("second-1 idle in GET /runners", BOOT, || listed(&addr, "second-1").filter(|r| r["state"] == "idle"));

    let id = enqueue_in(&gh, SECOND, "other", &["second"], &gated_steps(&scratch, "other"));
    wait_for("the job on second-1 to start", LONG, || scratch.join("other.started").exists().then_some(()));
    let (code, v) = admin(&addr, "DELETE", "/runners/second-1", Some(TOKEN), None);
    assert_eq!(code, 202, "{v}");
    assert_eq!(admin(&addr, "DELETE", "/runners/no-such", Some(TOKEN), None).0, 404);
    assert_eq!(listed(&addr, "second-1").unwrap()["state"], "draining");
    assert!(!state.path().join("runners/second-1.json").exists(), "a deleted runner stays in the state");
    assert!(gh.runner_named("second-1").is_some(), "de-registered before its job finished");
    release(&scratch, "other");
    assert_eq!(job_done(&gh, id)["result"], "Succeeded");
    wait_for("second-1 de-registered", BOOT, || gh.runner_named("second-1").is_none().then_some(()));
    wait_for("second-1 stopped in GET /runners", BOOT, || {
        listed(&addr, "second-1").filter(|r| r["state"] == "stopped")
    });
    // The container's own runner went on all along.
    let h = sup.health().unwrap();
    assert_eq!((h["state"].as_str(), h["runner_count"].as_u64()), (Some("idle"), Some(1)), "{h}");

    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn runners_added_over_the_api_come_back_after_a_restart_with_a_state_dir() {
    let gh = FakeGithub::start();
    gh.post("/_fake/repos", json!({"full_name": SECOND}));
    let runner = RunnerDir::new();
    let (_keep, roots) = roots_dir();
    let state = tempfile::tempdir().unwrap();
    let (addr, env) = admin_env(&gh, &runner, &roots, state.path(), &[("RUNNER_COUNT", "0")]);
    let mut sup = Supervisor::start(&env);
    wait_for("the admin API", BOOT, || sup.log_has("Serving the admin API.").then_some(()));
    let (code, v) = admin(
        &addr,
        "POST",
        "/runners",
        Some(TOKEN),
        Some(json!({"scope": SECOND, "labels": "keep", "name": "keep-1"})),
    );
    assert_eq!(code, 201, "{v}");
    wait_listening(&sup, 1);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named("keep-1").is_none(), "the container's stop de-registers it");

    let sup = Supervisor::start(&env);
    wait_listening(&sup, 1);
    wait_for("keep-1 back on the fake GitHub", BOOT, || {
        gh.runner_named("keep-1").filter(|r| r["status"] == "online" && r["scope"] == SECOND).map(|_| ())
    });
    let r = listed(&addr, "keep-1").expect("keep-1 listed after the restart");
    assert_eq!(
        (r["scope"].as_str(), r["labels"][0].as_str(), r["added"].as_bool()),
        (Some(SECOND), Some("keep"), Some(true))
    );
}
