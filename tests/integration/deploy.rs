//! deploy/: what the deployment files expect of the binary, checked against the real binary.
//! The ECS scaling policy tracks exactly the metric a task of that template publishes (moto's
//! CloudFormation makes the task definition, moto's CloudWatch receives the datapoints).

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::autoscale::{moto_available, Moto};
use crate::harness::*;

/// Skips locally, fails on CI, when a Python module the deploy tests need is missing.
fn python_has(module: &str, install: &str) -> bool {
    let ok = Command::new("python3")
        .args(["-c", &format!("import {module}")])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        assert!(std::env::var("CI").is_err(), "{module} is required on CI ({install})");
        eprintln!("skipping: {module} not installed ({install})");
    }
    ok
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
