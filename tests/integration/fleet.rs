//! Fleet hygiene: the start-up sweep (`RUNNER_SWEEP_OFFLINE_SEC`) and `ci-runner list`,
//! `remove` and `prune`, against the fake GitHub seeded with runners left by other containers
//! (`POST /_fake/runners`).

use std::process::{Command, Output, Stdio};
use std::time::Duration;

use serde_json::{json, Value};

use crate::harness::{base_env, bin, FakeGithub, RunnerDir, Supervisor, PAT, REPO};

/// A registration left on the fake by some other container.
fn seed(gh: &FakeGithub, name: &str, status: &str, busy: bool) -> u64 {
    seed_in(gh, REPO, name, status, busy)
}

fn seed_in(gh: &FakeGithub, scope: &str, name: &str, status: &str, busy: bool) -> u64 {
    let r = gh.post(
        "/_fake/runners",
        json!({"scope": scope, "name": name, "status": status, "busy": busy, "labels": ["ci-test", "linux"]}),
    );
    r["id"].as_u64().unwrap_or_else(|| panic!("seeding {name}: {r}"))
}

fn names(gh: &FakeGithub) -> Vec<String> {
    gh.runners().iter().map(|r| r["name"].as_str().unwrap().to_string()).collect()
}

/// A name the supervisor would generate right now (registered "just now").
fn young(suffix: &str) -> String {
    let now = time::OffsetDateTime::now_utc();
    let stamp = now.format(time::macros::format_description!("[year][month][day]-[hour][minute][second]")).unwrap();
    format!("ci-storage-{stamp}-{suffix}")
}

/// Runs `ci-runner ARGS` as an operator would in the container (stdin not a terminal), with
/// only what the fleet commands need: no GH_LABELS, no RUNNER_DIR.
fn ops(gh: &FakeGithub, args: &[&str], extra: &[(&str, &str)]) -> Output {
    let mut cmd = Command::new(bin());
    cmd.args(args)
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("GH_TOKEN", PAT)
        .env("GH_REPOSITORY", REPO)
        .env("GH_API_URL", format!("{}/api/v3", gh.url()))
        .env("SECRETS_DIR", "/nonexistent")
        .env("STATUS_ADDR", "off");
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let out = cmd.stdin(Stdio::null()).output().expect("run ci-runner");
    eprintln!(
        "$ ci-runner {}\n{}{}exit: {:?}",
        args.join(" "),
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr),
        out.status.code()
    );
    out
}

fn stdout(o: &Output) -> String {
    String::from_utf8_lossy(&o.stdout).into_owned()
}

fn stderr(o: &Output) -> String {
    String::from_utf8_lossy(&o.stderr).into_owned()
}

fn deletes(gh: &FakeGithub) -> Vec<String> {
    gh.rest_requests("DELETE", "/actions/runners/").iter().map(|r| r["path"].as_str().unwrap().to_string()).collect()
}

#[test]
fn sweep_at_start_removes_only_the_pools_offline_runners_registered_long_enough_ago() {
    let gh = FakeGithub::start();
    let old = ["ci-storage-20200101-000000-old001", "ci-storage-20200102-120000-old002"];
    let old_ids: Vec<u64> = old.iter().map(|n| seed(&gh, n, "offline", false)).collect();
    let young = young("young1");
    let kept = [
        ("ci-storage-20200103-000000-busy01", "offline", true),
        ("ci-storage-20200104-000000-onlin1", "online", false),
        ("ci-storage-20200104-000000-onbsy1", "online", true),
        (young.as_str(), "offline", false),
        ("ci-storage-manual", "offline", false),
        ("ci-storage2-20200101-000000-other1", "offline", false),
        ("other-20200101-000000-other2", "offline", false),
    ];
    for (name, status, busy) in kept {
        seed(&gh, name, status, busy);
    }
    // Same name pattern, another scope: not this pool's.
    seed_in(&gh, "octo-org", "ci-storage-20200101-000000-orgrun", "offline", false);

    let runner = RunnerDir::new();
    let mut env = base_env(&gh, &runner);
    env.push(("RUNNER_SWEEP_OFFLINE_SEC".into(), "3600".into()));
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(60));
    assert_eq!(sup.count("Swept offline runners of the pool."), 1, "{}", sup.log());
    let line = sup.log().lines().find(|l| l.contains("Swept offline runners")).unwrap().to_string();
    assert!(line.contains("count=2") && old.iter().all(|n| line.contains(n)), "{line}");

    let left = names(&gh);
    for n in old {
        assert!(!left.iter().any(|l| l == n), "{n} was not swept: {left:?}");
    }
    for (n, _, _) in kept {
        assert!(left.iter().any(|l| l == n), "{n} was swept: {left:?}");
    }
    assert!(left.iter().any(|l| l == "ci-storage-20200101-000000-orgrun"), "{left:?}");
    assert!(left.iter().any(|l| *l == sup.runner_name()), "the supervisor registered itself: {left:?}");
    // Busy and online runners were never even asked for: the only DELETEs are the two old ones.
    let mut want: Vec<String> = old_ids.iter().map(|id| format!("/api/v3/repos/{REPO}/actions/runners/{id}")).collect();
    let mut got = deletes(&gh);
    want.sort();
    got.sort();
    assert_eq!(got, want);
    // Counted with every other GitHub call.
    assert!(sup.metrics().contains("ci_runner_github_api_requests_total{status=\"204\"} 2\n"), "{}", sup.metrics());
}

#[test]
fn sweep_failure_is_a_warning_and_the_boot_goes_on() {
    let gh = FakeGithub::start();
    seed(&gh, "ci-storage-20200101-000000-old001", "offline", false);
    gh.fault(
        json!({"kind": "status", "status": 404, "count": 1, "method": "GET", "path_contains": "/actions/runners?"}),
    );
    let runner = RunnerDir::new();
    let mut env = base_env(&gh, &runner);
    env.push(("RUNNER_SWEEP_OFFLINE_SEC".into(), "3600".into()));
    let sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(60));
    assert!(sup.log_has("skipping the sweep of offline runners"), "{}", sup.log());
    assert!(sup.log().lines().any(|l| l.contains("WARN") && l.contains("skipping the sweep")), "{}", sup.log());
    assert!(names(&gh).iter().any(|n| n == "ci-storage-20200101-000000-old001"));
}

#[test]
fn list_shows_the_pools_runners_over_pages_and_marks_the_local_one() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", Duration::from_secs(60));
    let local = sup.runner_name();
    // More than one page of 100.
    for i in 0..120 {
        seed(&gh, &format!("ci-storage-20200101-000000-p{i:05}"), "offline", false);
    }
    seed(&gh, "ci-storage-20200101-000000-busy01", "online", true);
    seed(&gh, "ci-storage2-20200101-000000-other1", "online", false);
    seed(&gh, "unrelated", "offline", false);
    gh.post("/_fake/requests/clear", json!({}));

    let addr = sup.status_addr();
    let out = ops(&gh, &["list"], &[("STATUS_ADDR", &addr)]);
    assert_eq!(out.status.code(), Some(0));
    let text = stdout(&out);
    let rows: Vec<&str> = text.lines().filter(|l| l.get(2..).is_some_and(|r| r.starts_with("ci-storage-"))).collect();
    assert_eq!(rows.len(), 122, "{text}");
    let marked: Vec<&str> = text.lines().filter(|l| l.starts_with('*')).collect();
    assert_eq!(marked.len(), 1, "{text}");
    assert!(marked[0].starts_with(&format!("* {local} ")) && marked[0].contains("online"), "{text}");
    assert!(marked[0].ends_with("self-hosted,Linux,X64,ci-test"), "{text}");
    let busy = text.lines().find(|l| l.contains("busy01")).unwrap();
    assert!(busy.contains(" online ") && busy.contains(" yes "), "{busy}");
    assert!(!text.contains("ci-storage2-") && !text.contains("unrelated"), "{text}");
    assert!(text.contains("122 runners of pool ci-storage-*") && text.contains("(idle)"), "{text}");
    let pages = gh.rest_requests("GET", "/actions/runners?");
    assert!(pages.iter().any(|r| r["path"].as_str().unwrap().contains("page=2")), "{pages:?}");
    assert!(pages.iter().all(|r| r["path"].as_str().unwrap().contains("per_page=100")), "{pages:?}");

    let out = ops(&gh, &["list", "--json"], &[("STATUS_ADDR", &addr)]);
    assert_eq!(out.status.code(), Some(0));
    let v: Value = serde_json::from_slice(&out.stdout).expect("list --json is JSON");
    assert_eq!(v["scope"], REPO);
    assert_eq!(v["local"]["name"], local.as_str());
    assert_eq!(v["local"]["state"], "idle");
    let runners = v["runners"].as_array().unwrap();
    assert_eq!(runners.len(), 122);
    let locals: Vec<&Value> = runners.iter().filter(|r| r["local"] == true).collect();
    assert_eq!(locals.len(), 1);
    assert_eq!(locals[0]["name"], local.as_str());
    assert_eq!(locals[0]["status"], "online");
    assert!(locals[0]["id"].as_u64().is_some() && locals[0]["registered_at"].as_i64().is_some());

    // No supervisor to ask: nothing is marked.
    let out = ops(&gh, &["list"], &[("STATUS_ADDR", &format!("127.0.0.1:{}", crate::harness::free_port()))]);
    assert_eq!(out.status.code(), Some(0));
    assert!(!stdout(&out).lines().any(|l| l.starts_with('*')), "{}", stdout(&out));
    assert!(stdout(&out).contains("no runner in this container"));
}

#[test]
fn prune_yes_removes_only_the_pools_offline_runners() {
    let gh = FakeGithub::start();
    let young = young("young1");
    for (name, status, busy) in [
        ("ci-storage-20200101-000000-old001", "offline", false),
        (young.as_str(), "offline", false),
        ("ci-storage-manual", "offline", false),
        ("ci-storage-20200101-000000-onlin1", "online", false),
        ("ci-storage-20200101-000000-busy01", "offline", true),
        ("ci-storage2-20200101-000000-other1", "offline", false),
    ] {
        seed(&gh, name, status, busy);
    }

    // With a threshold: only the name registered long enough ago.
    let out = ops(&gh, &["prune", "--older-than", "3600", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("removed ci-storage-20200101-000000-old001"), "{}", stdout(&out));
    let left = names(&gh);
    assert!(!left.contains(&"ci-storage-20200101-000000-old001".to_string()), "{left:?}");
    assert!(left.contains(&young) && left.contains(&"ci-storage-manual".to_string()), "{left:?}");

    // Without one: every offline, idle runner of the pool, and nothing else.
    let out = ops(&gh, &["prune", "--yes"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let mut left = names(&gh);
    left.sort();
    assert_eq!(
        left,
        [
            "ci-storage-20200101-000000-busy01",
            "ci-storage-20200101-000000-onlin1",
            "ci-storage2-20200101-000000-other1"
        ]
    );
    assert_eq!(deletes(&gh).len(), 3, "no DELETE for a busy, online or foreign runner");

    // Nothing left to prune: exit 0, no prompt needed.
    let out = ops(&gh, &["prune"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert!(stdout(&out).contains("No offline runner of pool ci-storage-*"), "{}", stdout(&out));
}

#[test]
fn prune_without_yes_and_without_a_terminal_refuses_and_removes_nothing() {
    let gh = FakeGithub::start();
    seed(&gh, "ci-storage-20200101-000000-old001", "offline", false);
    seed(&gh, "ci-storage-20200101-000000-old002", "offline", false);
    let out = ops(&gh, &["prune"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let err = stderr(&out);
    assert!(err.contains("not removing 2 runners without confirmation") && err.contains("--yes"), "{err}");
    assert!(err.contains("would remove ci-storage-20200101-000000-old001"), "{err}");
    assert_eq!(names(&gh).len(), 2);
    assert!(deletes(&gh).is_empty());
    // The same for remove.
    let out = ops(&gh, &["remove", "ci-storage-20200101-000000-old001"], &[]);
    assert_eq!(out.status.code(), Some(2));
    assert_eq!(names(&gh).len(), 2);
    assert!(deletes(&gh).is_empty());
}

#[test]
fn remove_takes_the_named_runners_and_reports_a_busy_or_unknown_one() {
    let gh = FakeGithub::start();
    seed(&gh, "ci-storage-20200101-000000-aaaaaa", "offline", false);
    seed(&gh, "ci-storage-20200101-000000-bbbbbb", "online", true);
    seed(&gh, "ci-storage-20200101-000000-cccccc", "online", false);
    seed(&gh, "hand-made", "offline", false);

    let out = ops(&gh, &["remove", "--yes", "ci-storage-20200101-000000-aaaaaa", "hand-made"], &[]);
    assert_eq!(out.status.code(), Some(0));
    assert_eq!(names(&gh), ["ci-storage-20200101-000000-bbbbbb", "ci-storage-20200101-000000-cccccc"]);

    // The busy one: GitHub's 422 is reported, the runner kept, the other removed, exit 1.
    let out =
        ops(&gh, &["remove", "ci-storage-20200101-000000-bbbbbb", "ci-storage-20200101-000000-cccccc", "-y"], &[]);
    assert_eq!(out.status.code(), Some(1));
    let err = stderr(&out);
    assert!(err.contains("kept ci-storage-20200101-000000-bbbbbb") && err.contains("422"), "{err}");
    assert_eq!(names(&gh), ["ci-storage-20200101-000000-bbbbbb"]);
    assert_eq!(gh.rest_requests("DELETE", "/actions/runners/").iter().filter(|r| r["status"] == 422).count(), 1);

    // A name that is not there is named.
    let out = ops(&gh, &["remove", "--yes", "no-such-runner"], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert!(stderr(&out).contains("runner \"no-such-runner\" not found in the repository octo-org/octo-repo"));
    assert_eq!(names(&gh), ["ci-storage-20200101-000000-bbbbbb"]);
}

#[test]
fn fleet_commands_check_their_own_configuration_and_command_line() {
    let gh = FakeGithub::start();
    let out = ops(&gh, &["list"], &[("GH_TOKEN", ""), ("RUNNER_NAME_PREFIX", "bad prefix")]);
    assert_eq!(out.status.code(), Some(3));
    let err = stderr(&out);
    assert!(err.contains("GH_TOKEN") && err.contains("RUNNER_NAME_PREFIX=\"bad prefix\""), "{err}");
    let out = ops(&gh, &["prune", "--older-than", "soon"], &[]);
    assert_eq!(out.status.code(), Some(2));
    let out = ops(&gh, &["remove"], &[]);
    assert_eq!(out.status.code(), Some(2));
    // A token GitHub refuses: exit 4.
    let out = ops(&gh, &["list"], &[("GH_TOKEN", "ghp_noadmin")]);
    assert_eq!(out.status.code(), Some(4));
    assert!(stderr(&out).contains("Must have admin rights"), "{}", stderr(&out));
    assert!(gh.rest_requests("GET", "").len() == 1, "nothing was called with a bad configuration");
}
