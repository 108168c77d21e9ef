//! deploy/: what the deployment files expect of the binary, checked against the real binary.
//! The ECS scaling policy tracks exactly the metric a task of that template publishes (moto's
//! CloudFormation makes the task definition, moto's CloudWatch receives the datapoints).
//! Every metric the Grafana dashboard and the KEDA trigger query is in a real scrape.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::autoscale::{moto_available, Moto};
use crate::harness::*;

/// Whether a Python module the deploy tests need is there; see [`prerequisite_missing`].
fn python_has(module: &str, install: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || prerequisite_missing(module, install)
}

/// The ECS template's stack, made in moto: the runner container's environment and secrets,
/// and the scaling policy's metric (tests/deploy/cfn.py).
fn ecs_stack(args: &[&str]) -> Value {
    let out = Command::new("python3")
        .arg(repo_root().join("tests/deploy/cfn.py"))
        .arg("stack")
        .args(args)
        .output()
        .expect("run tests/deploy/cfn.py");
    assert!(out.status.success(), "cfn.py stack: {}", String::from_utf8_lossy(&out.stderr));
    serde_json::from_slice(&out.stdout).expect("cfn.py prints JSON")
}

#[test]
fn ecs_scaling_policy_tracks_the_metric_a_task_of_the_template_publishes() {
    if !moto_available() || !python_has("cfnlint", "pip install cfn-lint") {
        return;
    }
    let stack = ecs_stack(&[&format!("Scope={REPO}")]);
    assert_eq!(stack["status"], "CREATE_COMPLETE", "{stack}");
    let metric = &stack["metric"];

    let moto = Moto::start();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // The task's environment as ECS would hand it over (the secrets' values are the fake's),
    // with the endpoints pointed at the fakes; plain logs, which the harness reads.
    let task_env: Vec<(String, String)> = stack["environment"]
        .as_object()
        .unwrap()
        .iter()
        .map(|(k, v)| (k.clone(), v.as_str().unwrap().to_string()))
        .collect();
    let mut extra: Vec<(&str, &str)> = task_env.iter().map(|(k, v)| (k.as_str(), v.as_str())).collect();
    let url = moto.url();
    extra.extend([
        ("LOG_FORMAT", "plain"),
        ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
        ("AWS_SECRET_ACCESS_KEY", "secret-test-key"),
        ("AWS_ENDPOINT_URL_CLOUDWATCH", url.as_str()),
    ]);
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &extra));
    sup.wait_state("idle", Duration::from_secs(30));

    let namespace = metric["Namespace"].as_str().unwrap();
    let name = metric["MetricName"].as_str().unwrap();
    let published = wait_for("the busy share on CloudWatch", Duration::from_secs(30), || {
        let listed = moto.call("list_metrics", json!({"MetricName": name}));
        let found: Vec<Value> = listed["Metrics"].as_array().cloned().unwrap_or_default();
        (!found.is_empty()).then_some(found)
    });
    // Never: the policy watching a namespace, name or dimensions the task does not publish
    // under (target tracking would then sit in INSUFFICIENT_DATA and never scale).
    assert_eq!(
        published,
        vec![json!({"Namespace": namespace, "MetricName": name, "Dimensions": metric["Dimensions"]})],
        "what the binary published vs the policy's metric {metric}"
    );
    // And the policy's own query (its statistic over its dimensions) reads the idle task's 0.
    let now = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_secs_f64();
    let stats = moto.call(
        "get_metric_statistics",
        json!({
            "Namespace": namespace, "MetricName": name, "Dimensions": metric["Dimensions"],
            "StartTime": now - 300.0, "EndTime": now + 60.0, "Period": 60,
            "Statistics": [metric["Statistic"]],
        }),
    );
    let points = stats["Datapoints"].as_array().cloned().unwrap_or_default();
    assert!(!points.is_empty(), "no datapoint under the policy's query: {stats}");
    assert!(points.iter().all(|p| p["Average"] == json!(0.0)), "{points:?}");

    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// The metric names a PromQL expression reads: every `ci_runner_…` token; and any other
/// identifier right before a `{` selector, which would be a metric the binary does not have.
fn metric_names(expr: &str) -> (Vec<String>, Vec<String>) {
    let (mut ours, mut others) = (Vec::new(), Vec::new());
    let bytes = expr.as_bytes();
    let mut i = 0;
    while i < bytes.len() {
        let c = bytes[i];
        if c.is_ascii_alphabetic() || c == b'_' {
            let start = i;
            while i < bytes.len() && (bytes[i].is_ascii_alphanumeric() || bytes[i] == b'_' || bytes[i] == b':') {
                i += 1;
            }
            let word = &expr[start..i];
            let quoted = start > 0 && bytes[start - 1] == b'"';
            if word.starts_with("ci_runner_") {
                ours.push(word.to_string());
            } else if !quoted && bytes.get(i) == Some(&b'{') {
                others.push(word.to_string());
            }
        } else if c == b'"' {
            // Skip string literals (label values, regexes).
            i += 1;
            while i < bytes.len() && bytes[i] != b'"' {
                i += if bytes[i] == b'\\' { 2 } else { 1 };
            }
            i += 1;
        } else {
            i += 1;
        }
    }
    (ours, others)
}

/// Every PromQL expression of the dashboard (panel targets and template variables) and of the
/// KEDA trigger.
fn deployed_queries() -> Vec<(String, String)> {
    let path = repo_root().join("deploy/grafana/ci-runner.json");
    let dash: Value = serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).expect("the dashboard is JSON");
    let mut out = Vec::new();
    for p in dash["panels"].as_array().unwrap() {
        for t in p["targets"].as_array().into_iter().flatten() {
            out.push((format!("panel {:?}", p["title"]), t["expr"].as_str().expect("a target's expr").to_string()));
        }
    }
    for v in dash["templating"]["list"].as_array().unwrap() {
        if let Some(q) = v["query"]["query"].as_str() {
            out.push((format!("variable {:?}", v["name"]), q.to_string()));
        }
    }
    let keda = std::fs::read_to_string(repo_root().join("deploy/kubernetes/keda/scaledobject.yaml")).unwrap();
    for line in keda.lines() {
        if let Some(q) = line.trim().strip_prefix("query: ") {
            out.push(("KEDA trigger".into(), q.to_string()));
        }
    }
    out
}

#[test]
fn dashboard_and_keda_queries_name_only_metrics_a_real_scrape_exports() {
    let queries = deployed_queries();
    assert!(queries.len() > 20, "{queries:?}");
    let mut wanted = std::collections::BTreeMap::new();
    for (place, q) in &queries {
        let (ours, others) = metric_names(q);
        assert!(others.is_empty(), "{place} reads metrics ci-runner does not export: {others:?} in {q}");
        assert!(!ours.is_empty(), "{place} reads no ci-runner metric: {q}");
        for m in ours {
            wanted.entry(m).or_insert_with(|| place.clone());
        }
    }
    // The areas the dashboard must cover (issue #20).
    for m in [
        "ci_runner_busy",
        "ci_runner_jobs_completed_total",
        "ci_runner_boot_phase_seconds",
        "ci_runner_prewarm_outcome",
        "ci_runner_drain_outcome",
        "ci_runner_lock_state_since_seconds",
        "ci_runner_controller_queued_jobs",
    ] {
        assert!(wanted.contains_key(m), "the dashboard has no panel on {m}");
    }

    // The supervisor with everything that adds families on: the hardware lock and a pre-warm
    // (its storage host refuses, so it fails fast and reports it); scraped idle and again
    // during the debug delay after a drain, when the drain's outcome is there.
    if !require("ssh-keygen") {
        return;
    }
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let locks = tempfile::tempdir().unwrap();
    let key = runner.scratch().join("id_ed25519");
    let ok = Command::new("ssh-keygen").args(["-q", "-t", "ed25519", "-N", "", "-f"]).arg(&key).status().unwrap();
    assert!(ok.success(), "ssh-keygen failed");
    let key_text = std::fs::read_to_string(&key).unwrap();
    let storage = format!("127.0.0.1:{}", free_port());
    let lock_dir = locks.path().display().to_string();
    let mut sup = Supervisor::start(&env_with(
        &gh,
        &runner,
        &[
            ("RUNNER_RESOURCE_ID", "dash-board"),
            ("RUNNER_LOCK_DIR", &lock_dir),
            ("CI_STORAGE_HOST", &storage),
            ("CI_STORAGE_PRIVATE_KEY", &key_text),
            ("DEBUG_SHUTDOWN_DELAY_SEC", "10"),
        ],
    ));
    sup.wait_state("idle", Duration::from_secs(60));
    let mut scrapes = vec![sup.metrics()];
    sup.signal(Signal::SIGTERM);
    scrapes.push(wait_for("the drain's outcome on /metrics", Duration::from_secs(30), || {
        let m = sup.metrics();
        m.contains("ci_runner_drain_outcome{").then_some(m)
    }));

    // The controller (its families are its own), on the real Docker engine; its image is on a
    // closed loopback port, so the pull it tries at the start fails at once.
    let state = tempfile::tempdir().unwrap();
    let mut controller = None;
    if crate::docker::docker_available() {
        let port = free_port();
        let env: Vec<(String, String)> = [
            ("PATH", std::env::var("PATH").unwrap_or_default()),
            ("GH_SERVER_URL", gh.url()),
            ("GH_API_URL", format!("{}/api/v3", gh.url())),
            ("GH_TOKEN", PAT.to_string()),
            ("GH_REPOSITORY", REPO.to_string()),
            ("GH_LABELS", "ci-test".to_string()),
            ("WEBHOOK_SECRET", "dashboard-test-secret".to_string()),
            ("CONTROLLER_NAME", format!("ctl-dash-{}", std::process::id())),
            ("CONTROLLER_IMAGE", format!("127.0.0.1:{}/ci-runner:none", free_port())),
            ("CONTROLLER_ADDR", format!("127.0.0.1:{port}")),
            ("CONTROLLER_STATE_DIR", state.path().display().to_string()),
            ("RUST_LOG", "info".to_string()),
        ]
        .into_iter()
        .map(|(k, v)| (k.to_string(), v))
        .collect();
        let mut cmd = Command::new(bin());
        cmd.arg("controller").env_clear().envs(env);
        let proc = Supervisor::from_command(cmd, String::new());
        proc.wait_log("Serving POST /webhook", Duration::from_secs(60));
        scrapes.push(ureq::get(&format!("http://127.0.0.1:{port}/metrics")).call().unwrap().into_string().unwrap());
        controller = Some(proc);
    }

    let mut exported = std::collections::BTreeSet::new();
    for text in &scrapes {
        let exp = crate::metrics::Exposition::parse(text).unwrap_or_else(|e| panic!("{e}\n{text}"));
        for (family, f) in &exp.families {
            exported.insert(family.clone());
            exported.extend(f.samples.iter().map(|s| s.name.clone()));
        }
    }
    // Never: a dashboard or KEDA query on a metric no ci-runner exports (an empty panel, or a
    // scaler that never scales).
    let missing: Vec<_> = wanted
        .iter()
        .filter(|(m, _)| {
            // The controller's metrics are only checked where its scrape ran (skipped locally
            // without a Docker engine; on CI docker_available() fails the test instead).
            let unchecked = m.starts_with("ci_runner_controller_") && controller.is_none();
            !(exported.contains(*m) || unchecked)
        })
        .collect();
    assert!(missing.is_empty(), "not in a real /metrics scrape: {missing:?}\nexported: {exported:?}");
    assert_eq!(sup.wait_exit(Duration::from_secs(60)).code(), Some(0));
    drop(controller);
}
