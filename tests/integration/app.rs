//! Registration modes of issue #7: GitHub App authentication (installation tokens that expire
//! and are renewed), the enterprise scope, runner groups by name, `--no-default-labels`.

use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::harness::*;

const LONG: Duration = Duration::from_secs(60);
const APP_ID: u64 = 4711;

/// A fresh App key pair from openssl: (PKCS#1 private key PEM, SubjectPublicKeyInfo PEM).
/// Generated per test, never committed.
fn app_key(dir: &Path) -> Option<(String, String)> {
    if !require("openssl") {
        return None;
    }
    let (key, public) = (dir.join("app.pem"), dir.join("app.pub.pem"));
    for args in [
        vec!["genrsa", "-traditional", "-out", key.to_str().unwrap(), "2048"],
        vec!["rsa", "-in", key.to_str().unwrap(), "-pubout", "-out", public.to_str().unwrap()],
    ] {
        let ok = Command::new("openssl").args(&args).stderr(Stdio::null()).status().unwrap().success();
        assert!(ok, "openssl {args:?} failed");
    }
    Some((std::fs::read_to_string(key).unwrap(), std::fs::read_to_string(public).unwrap()))
}

/// Registers the App (its public key) at the fake and installs it on `account`.
fn install_app(gh: &FakeGithub, public_pem: &str, account: &str) -> u64 {
    gh.post("/_fake/apps", json!({"app_id": APP_ID, "public_key_pem": public_pem}));
    gh.post("/_fake/installations", json!({"app_id": APP_ID, "account": account}))["id"].as_u64().expect("id")
}

/// `base_env` with `remove` taken out and `extra` set.
fn env_with(gh: &FakeGithub, runner: &RunnerDir, remove: &[&str], extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    env.retain(|(k, _)| !remove.contains(&k.as_str()) && !extra.iter().any(|(e, _)| e == k));
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

/// The App's variables instead of GH_TOKEN.
fn app_env(gh: &FakeGithub, runner: &RunnerDir, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let id = APP_ID.to_string();
    env_with(gh, runner, &["GH_TOKEN"], &[&[("GH_APP_ID", id.as_str())], extra].concat())
}

/// REST calls (not control, not the runner's own endpoints) whose path contains `part`.
fn rest(gh: &FakeGithub, part: &str) -> Vec<Value> {
    gh.requests()
        .into_iter()
        .filter(|r| {
            let p = r["path"].as_str().unwrap_or_default();
            p.contains(part) && !p.contains("/_fake/") && !p.contains("runner-registration")
        })
        .collect()
}

fn summary(reqs: &[Value]) -> Vec<(String, u64, String)> {
    reqs.iter()
        .map(|r| {
            (
                r["method"].as_str().unwrap_or_default().to_string(),
                r["status"].as_u64().unwrap_or_default(),
                r["auth"].as_str().unwrap_or_default().to_string(),
            )
        })
        .collect()
}

fn stop(sup: &mut Supervisor, gh: &FakeGithub, name: &str) {
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runner_named(name).is_none(), "runner {name} left registered");
    assert!(sup.log_has("Runner de-registered."), "{}", sup.log());
}

/// Runs one job that writes its environment to the scratch dir; returns that environment.
fn run_job(gh: &FakeGithub, runner: &RunnerDir, scope: &str) -> String {
    let scratch = runner.scratch();
    let steps = format!("env > {}/env.txt", scratch.display());
    let id = gh.post("/_fake/jobs", json!({"scope": scope, "labels": ["ci-test"], "name": "build", "steps": steps}))
        ["id"]
        .as_u64()
        .unwrap();
    let job = wait_for("the job to complete", LONG, || Some(gh.job(id)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Succeeded", "{job}");
    std::fs::read_to_string(scratch.join("env.txt")).unwrap()
}

fn assert_no_secret_in(text: &str, key_pem: &str, what: &str) {
    let body = key_pem.lines().nth(1).unwrap();
    assert!(!text.contains(body) && !text.contains("PRIVATE KEY"), "the App's key is in {what}");
    assert!(!text.contains("ghs_"), "an installation token is in {what}");
}

#[test]
fn app_finds_its_installation_registers_runs_a_job_and_deregisters_with_one_token() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let keys = tempfile::tempdir().unwrap();
    let Some((key, public)) = app_key(keys.path()) else { return };
    let installation = install_app(&gh, &public, REPO);
    let (mut sup, name) = start_online(&gh, &app_env(&gh, &runner, &[("GH_APP_PRIVATE_KEY", key.as_str())]));
    let env = run_job(&gh, &runner, REPO);
    assert!(!env.contains("GH_APP_PRIVATE_KEY=") && env.contains(&format!("GH_APP_ID={APP_ID}")), "{env}");
    assert_no_secret_in(&env, &key, "the job's environment");
    stop(&mut sup, &gh, &name);

    let jwt = format!("jwt:{APP_ID}");
    assert_eq!(
        summary(&rest(&gh, "/installation")),
        [
            ("GET".into(), 200, jwt.clone()),
            // The installation's access token: one for the whole life, cached.
            ("POST".into(), 201, jwt)
        ],
        "the installation is found from the repository with the JWT, then one token minted"
    );
    assert!(rest(&gh, &format!("/app/installations/{installation}/access_tokens")).len() == 1);
    let runner_calls = summary(&rest(&gh, "/actions/runners"));
    assert_eq!(runner_calls.first(), Some(&("POST".into(), 201, "ghs#1".into())), "{runner_calls:?}");
    assert_eq!(runner_calls.last(), Some(&("DELETE".into(), 204, "ghs#1".into())), "{runner_calls:?}");
    assert_no_secret_in(&sup.log(), &key, "the supervisor's log");
    assert!(sup.log_has("credentials=app:4711"), "{}", sup.log());
}

#[test]
fn expired_installation_token_is_renewed_for_the_deregistration() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let keys = tempfile::tempdir().unwrap();
    let Some((key, public)) = app_key(keys.path()) else { return };
    let installation = install_app(&gh, &public, REPO);
    // The key as a Docker secret file; the installation given, so not looked up.
    let secrets = tempfile::tempdir().unwrap();
    std::fs::write(secrets.path().join("GH_APP_PRIVATE_KEY"), &key).unwrap();
    let (dir, id) = (secrets.path().display().to_string(), installation.to_string());
    let env = app_env(&gh, &runner, &[("SECRETS_DIR", dir.as_str()), ("GH_APP_INSTALLATION_ID", id.as_str())]);
    let (mut sup, name) = start_online(&gh, &env);
    run_job(&gh, &runner, REPO);
    // Two hours pass on GitHub's side: the token the supervisor holds has expired there.
    gh.post("/_fake/clock", json!({"advance_sec": 7200}));
    stop(&mut sup, &gh, &name);

    assert!(rest(&gh, "/installation").iter().all(|r| r["path"].as_str().unwrap().contains("/app/installations/")));
    let minted = rest(&gh, &format!("/app/installations/{installation}/access_tokens"));
    assert_eq!(minted.len(), 2, "no second installation token was minted: {minted:?}");
    // The drain's first call (the labels' DELETE) meets the expired token and is retried with a
    // fresh one, which the registration's DELETE then uses.
    let deletes =
        summary(&rest(&gh, "/actions/runners/").into_iter().filter(|r| r["method"] == "DELETE").collect::<Vec<_>>());
    assert_eq!(
        deletes,
        [
            ("DELETE".into(), 401, "ghs#1".into()),
            ("DELETE".into(), 200, "ghs#2".into()),
            ("DELETE".into(), 204, "ghs#2".into())
        ],
        "the DELETE was not retried with a fresh token"
    );
    assert!(sup.log_has("GitHub refused the installation token; minting a new one."), "{}", sup.log());
    assert!(gh.runners().is_empty(), "left registered: {:?}", gh.runners());
}

#[test]
fn installation_token_near_its_expiry_is_replaced_before_use() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let keys = tempfile::tempdir().unwrap();
    let Some((key, public)) = app_key(keys.path()) else { return };
    // An organization installation, found from the organization; the group resolved with it.
    install_app(&gh, &public, "octo-org");
    let gid = gh.post("/_fake/groups", json!({"org": "octo-org", "name": "gpu"}))["id"].as_u64().unwrap();
    // Four minutes to live: inside the five-minute margin, so every use needs a new one.
    gh.post("/_fake/apps/token_ttl", json!({"seconds": 240}));
    let env = app_env(
        &gh,
        &runner,
        &[("GH_APP_PRIVATE_KEY", key.as_str()), ("GH_ORGANIZATION", "octo-org"), ("RUNNER_GROUP", "gpu")],
    );
    let env: Vec<_> = env.into_iter().filter(|(k, _)| k != "GH_REPOSITORY").collect();
    let (mut sup, name) = start_online(&gh, &env);
    assert_eq!(gh.runner_named(&name).unwrap()["runner_group_id"], gid);
    stop(&mut sup, &gh, &name);

    assert_eq!(summary(&rest(&gh, "/orgs/octo-org/installation")), [("GET".into(), 200, format!("jwt:{APP_ID}"))]);
    let calls = summary(&rest(&gh, "/orgs/octo-org/actions/"));
    assert!(calls.iter().all(|(_, status, _)| *status != 401), "a stale token was used: {calls:?}");
    let used: Vec<&str> = calls.iter().map(|(_, _, auth)| auth.as_str()).collect();
    // Group lookup, registration token, the drain's labels DELETE, the DELETE: each with a
    // token of its own.
    assert_eq!(used, ["ghs#1", "ghs#2", "ghs#3", "ghs#4"], "{calls:?}");
    assert_eq!(calls.last().unwrap().0, "DELETE");
}

#[test]
fn enterprise_scope_registers_runs_a_job_and_deregisters() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.post("/_fake/enterprises", json!({"slug": "octo-corp"}));
    let env = env_with(&gh, &runner, &["GH_REPOSITORY"], &[("GH_ENTERPRISE", "octo-corp")]);
    let (mut sup, name) = start_online(&gh, &env);
    let registered = gh.runner_named(&name).unwrap();
    assert_eq!(registered["scope"], "enterprises/octo-corp", "{registered}");
    assert!(sup.log_has(&format!("url={}/enterprises/octo-corp", gh.url())), "{}", sup.log());
    run_job(&gh, &runner, "enterprises/octo-corp");
    stop(&mut sup, &gh, &name);
    let calls = summary(&rest(&gh, "/enterprises/octo-corp/actions/runners"));
    assert_eq!(calls.first().map(|c| (c.0.as_str(), c.1)), Some(("POST", 201)), "{calls:?}");
    assert_eq!(calls.last().map(|c| (c.0.as_str(), c.1)), Some(("DELETE", 204)), "{calls:?}");
}

#[test]
fn runner_group_by_name_is_resolved_before_registering_into_it() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.post("/_fake/groups", json!({"org": "octo-org", "name": "cpu"}));
    let gid = gh.post("/_fake/groups", json!({"org": "octo-org", "name": "GPU pool"}))["id"].as_u64().unwrap();
    let env =
        env_with(&gh, &runner, &["GH_REPOSITORY"], &[("GH_ORGANIZATION", "octo-org"), ("RUNNER_GROUP", "gpu POOL")]);
    let (mut sup, name) = start_online(&gh, &env);
    assert_eq!(gh.runner_named(&name).unwrap()["runner_group_id"], gid);
    assert!(sup.log_has(&format!("group_id={gid}")) && sup.log_has("Runner group found."), "{}", sup.log());
    let paths: Vec<String> =
        rest(&gh, "/orgs/octo-org/actions/").iter().map(|r| r["path"].as_str().unwrap().to_string()).collect();
    assert!(paths[0].contains("/runner-groups?per_page=100"), "the group was not looked up first: {paths:?}");
    assert!(paths[1].contains("/runners/registration-token"), "{paths:?}");
    stop(&mut sup, &gh, &name);
}

#[test]
fn missing_runner_group_stops_the_boot_naming_the_groups_and_registers_nothing() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    gh.post("/_fake/groups", json!({"org": "octo-org", "name": "gpu"}));
    let env = env_with(&gh, &runner, &["GH_REPOSITORY"], &[("GH_ORGANIZATION", "octo-org"), ("RUNNER_GROUP", "tpu")]);
    let mut sup = Supervisor::start(&env);
    let status = sup.wait_exit(LONG);
    assert_eq!(status.code(), Some(4), "{}", sup.log());
    assert!(
        sup.log_has(r#"runner group "tpu" not found in the organization octo-org; its groups are: Default, gpu"#),
        "{}",
        sup.log()
    );
    assert!(gh.runners().is_empty(), "registered anyway: {:?}", gh.runners());
    assert!(rest(&gh, "registration-token").is_empty(), "a registration token was fetched");
    assert!(!runner.path().join(".runner").exists());
}

#[test]
fn no_default_labels_registers_only_the_given_labels() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let (mut sup, name) = start_online(&gh, &env_with(&gh, &runner, &[], &[("RUNNER_NO_DEFAULT_LABELS", "true")]));
    assert_eq!(gh.runner_named(&name).unwrap()["labels"], json!(["ci-test", "linux"]));
    stop(&mut sup, &gh, &name);
}
