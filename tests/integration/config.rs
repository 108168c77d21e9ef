//! Configuration through the real binary (issue #16): a malformed value ends the start with
//! exit 3 before any network call, naming the variable (never a secret's value); a panic in
//! a runner's task removes its registration and ends the container with exit 1.

use std::time::Duration;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(90);

/// Requests the fake GitHub saw outside its own control paths.
fn api_requests(gh: &FakeGithub) -> Vec<serde_json::Value> {
    gh.requests().into_iter().filter(|r| !r["path"].as_str().unwrap_or("").contains("/_fake/")).collect()
}

/// The variables set, the text naming the bad one, and text that must never be logged.
type Case<'a> = (Vec<(&'a str, &'a str)>, &'a str, Option<&'a str>);

#[test]
fn a_malformed_value_exits_3_before_any_request_and_registers_nothing() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let secret = "ghp_admin\nX-Injected: 1";
    let long_host = "h".repeat(70_000);
    let cases: Vec<Case> = vec![
        // Accepted until #16, then SIGTERM panicked: overflow when adding duration to instant.
        (vec![("DRAIN_TIMEOUT_SEC", "10000000000000000000")], "DRAIN_TIMEOUT_SEC=\"10000000000000000000\"", None),
        (vec![("GH_TOKEN", secret)], "GH_TOKEN: expected no control characters", Some("X-Injected")),
        (vec![("GH_SERVER_URL", "http://127.0.0.1:99999")], "GH_SERVER_URL=\"http://127.0.0.1:99999\"", None),
        (vec![("RUNNER_INSTANCE_LABELS", "1:board,phy\ntiumpi")], "RUNNER_INSTANCE_LABELS=", None),
        (
            vec![("CI_STORAGE_HOST", "host:notaport"), ("CI_STORAGE_PRIVATE_KEY", "k")],
            "CI_STORAGE_HOST=\"host:notaport\"",
            None,
        ),
        (
            vec![("CI_STORAGE_HOST", &long_host), ("CI_STORAGE_PRIVATE_KEY", "k")],
            "CI_STORAGE_HOST: expected a value of at most 32768 bytes",
            None,
        ),
        (vec![("AWS_DEFAULT_REGION", "US_EAST_1")], "AWS_DEFAULT_REGION=\"US_EAST_1\"", None),
    ];
    for (vars, named, hidden) in cases {
        let mut sup = Supervisor::start(&env_with(&gh, &runner, &vars));
        let status = sup.wait_exit(BOOT);
        let log = sup.log();
        assert_eq!(status.code(), Some(3), "{vars:?} did not exit 3:\n{log}");
        assert!(log.contains(named), "{named} not reported:\n{log}");
        if let Some(h) = hidden {
            assert!(!log.contains(h), "the secret reached the log:\n{log}");
        }
        assert!(!log.contains("AWS_REGION="), "a region reported under another name:\n{log}");
        assert!(!log.contains("panicked"), "{log}");
    }
    // None of them got as far as the network: nothing was asked, nothing registered.
    assert_eq!(api_requests(&gh), Vec::<serde_json::Value>::new(), "API called despite bad configuration");
    assert!(gh.runners().is_empty(), "registered: {:?}", gh.runners());
}

/// Live processes whose working directory is under one of `dirs`.
fn processes_in(dirs: &[std::path::PathBuf]) -> Vec<u32> {
    let Ok(entries) = std::fs::read_dir("/proc") else { return Vec::new() };
    entries
        .flatten()
        .filter_map(|e| e.file_name().to_str()?.parse::<u32>().ok())
        .filter(|pid| {
            let zombie = std::fs::read_to_string(format!("/proc/{pid}/stat"))
                .is_ok_and(|s| s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')));
            let cwd = std::fs::read_link(format!("/proc/{pid}/cwd"));
            !zombie && cwd.is_ok_and(|c| dirs.iter().any(|d| c.starts_with(d)))
        })
        .collect()
}

/// The names the log says were registered.
fn registered_names(log: &str) -> Vec<String> {
    log.lines()
        .filter(|l| l.contains("Runner registered."))
        .filter_map(|l| l.split_whitespace().find_map(|w| w.strip_prefix("runner=")).map(str::to_string))
        .collect()
}

#[test]
fn a_panic_in_a_runner_s_task_deregisters_it_and_exits_1() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let roots = tempfile::tempdir().unwrap();
    std::fs::set_permissions(roots.path(), std::os::unix::fs::PermissionsExt::from_mode(0o755)).unwrap();
    let roots_s = roots.path().join("runners").display().to_string();
    // The second of two runners panics once registered (CI_RUNNER_TEST_PANIC, a hook of debug
    // builds only); the first drains as on SIGTERM.
    let env =
        env_with(&gh, &runner, &[("RUNNER_COUNT", "2"), ("RUNNER_ROOTS_DIR", &roots_s), ("CI_RUNNER_TEST_PANIC", "2")]);
    let mut sup = Supervisor::start(&env);
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(status.code(), Some(1), "a panicked runner task must end the container with 1:\n{log}");
    assert!(log.contains("A runner's supervisor panicked"), "{log}");
    let names = registered_names(&log);
    assert!(!names.is_empty(), "the panicking runner was never registered:\n{log}");
    // What must never happen: a registration left behind on GitHub after the exit.
    for n in &names {
        assert!(gh.runner_named(n).is_none(), "{n} left registered:\n{log}");
    }
    assert!(gh.runners().is_empty(), "left registered: {:?}", gh.runners());
    assert!(!gh.rest_requests("DELETE", "/actions/runners/").is_empty(), "no DELETE was sent");
    // Nor a runner process of either root left running without its supervisor.
    let roots = [runner.path().to_path_buf(), roots.path().to_path_buf()];
    wait_for("no runner process left in the runner roots", Duration::from_secs(10), || {
        processes_in(&roots).is_empty().then_some(())
    });
    assert!(!log.contains(PAT), "the token reached the log");
}

#[test]
fn a_panic_mid_job_cancels_the_job_deregisters_and_exits_1() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let env = env_with(&gh, &runner, &[("CI_RUNNER_TEST_PANIC", "1:busy")]);
    let mut sup = Supervisor::start(&env);
    // A job that never ends by itself: only a cancel stops it.
    let id = gh.enqueue("held", &["ci-test"], &gated_steps(&scratch, "held"));
    let status = sup.wait_exit(LONG);
    let log = sup.log();
    assert_eq!(status.code(), Some(1), "{log}");
    let started = log.find("Job started. job=held");
    let panicked = log.find("A runner's supervisor panicked");
    assert!(started.zip(panicked).is_some_and(|(s, p)| s < p), "the panic was not mid-job:\n{log}");
    // What must never happen: the registration left behind because GitHub saw the runner busy,
    // or the job left running with no supervisor.
    let job = gh.job(id);
    assert_eq!(job["status"], "completed", "{job}\n{log}");
    assert_eq!(job["result"], "Canceled", "{job}");
    assert!(gh.runners().is_empty(), "left registered: {:?}\n{log}", gh.runners());
    let roots = [runner.path().to_path_buf()];
    wait_for("no runner process left in the runner root", Duration::from_secs(10), || {
        processes_in(&roots).is_empty().then_some(())
    });
}
