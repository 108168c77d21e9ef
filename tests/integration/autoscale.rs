//! The autoscaling signals end to end: CloudWatch (moto's server), a fake ECS agent, a fake
//! instance metadata service (IMDSv2), against the fake GitHub and the fake runner.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpListener;
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use nix::sys::signal::Signal;
use serde_json::{json, Value};

use crate::harness::*;

const NAMESPACE: &str = "ci-storage/metrics";
const METRIC: &str = "ActiveRunnersPercent";

/// moto's server on a loopback port: the CloudWatch the supervisor publishes to.
pub struct Moto {
    child: Child,
    port: u16,
}

/// Whether moto is installed; see [`prerequisite_missing`].
pub fn moto_available() -> bool {
    let ok = Command::new("python3")
        .args(["-c", "import moto.server, boto3"])
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    ok || prerequisite_missing("moto", "pip install 'moto[server]' (scripts/test installs it)")
}

impl Moto {
    pub fn start() -> Self {
        Self::start_on(free_port())
    }

    fn start_on(port: u16) -> Self {
        let child = Command::new("python3")
            .args(["-m", "moto.server", "-H", "127.0.0.1", "-p", &port.to_string()])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start moto");
        wait_for("moto to listen", Duration::from_secs(30), || std::net::TcpStream::connect(("127.0.0.1", port)).ok());
        Moto { child, port }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    /// A boto3 call (tests/tools/cw.py), as a scaler reads CloudWatch.
    pub fn call(&self, op: &str, args: Value) -> Value {
        let out = Command::new("python3")
            .arg(repo_root().join("tests/tools/cw.py"))
            .args([&self.url(), op, &args.to_string()])
            .output()
            .expect("run cw.py");
        assert!(out.status.success(), "cw.py {op}: {}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    }

    /// The datapoints of `metric` with `dims` between `from` and `to` (Unix seconds), per
    /// `period`, oldest first.
    fn stats(&self, metric: &str, dims: &[(&str, &str)], from: f64, to: f64, period: u32) -> Vec<Value> {
        let dims: Vec<Value> = dims.iter().map(|(n, v)| json!({"Name": n, "Value": v})).collect();
        let r = self.call(
            "get_metric_statistics",
            json!({
                "Namespace": NAMESPACE, "MetricName": metric, "Dimensions": dims,
                "StartTime": from, "EndTime": to, "Period": period,
                "Statistics": ["Average", "Minimum", "Maximum", "SampleCount"],
            }),
        );
        let mut points = r["Datapoints"].as_array().cloned().unwrap_or_default();
        points.sort_by(|a, b| a["Timestamp"].as_f64().partial_cmp(&b["Timestamp"].as_f64()).unwrap());
        points
    }

    /// The values of `metric` (one per 1-second bucket: each bucket's min and max), in time order.
    fn values(&self, metric: &str, from: f64) -> Vec<f64> {
        self.stats(metric, &[("GH_REPOSITORY", REPO)], from, now() + 60.0, 1)
            .iter()
            .flat_map(|p| {
                let (lo, hi) = (p["Minimum"].as_f64().unwrap(), p["Maximum"].as_f64().unwrap());
                if lo == hi {
                    vec![lo]
                } else {
                    vec![lo, hi]
                }
            })
            .collect()
    }
}

impl Drop for Moto {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Keeps consecutive changes over a second apart: moto's 1-second buckets start at the first
/// datapoint's own time, and a bucket's values have no order (spacing, not an assertion).
fn space_out() {
    std::thread::sleep(Duration::from_millis(1100));
}

fn now() -> f64 {
    SystemTime::now().duration_since(UNIX_EPOCH).unwrap().as_secs_f64()
}

fn aws_env(gh: &FakeGithub, runner: &RunnerDir, cloudwatch: &str, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let aws = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
        ("AWS_SECRET_ACCESS_KEY", "secret-test-key"),
        ("AWS_ENDPOINT_URL_CLOUDWATCH", cloudwatch),
    ];
    env_with(gh, runner, &[&aws[..], extra].concat())
}

/// For the tests that read the sequence of changes: a heartbeat on a minute boundary could
/// share a 1-second bucket with a change, and a bucket's values have no order (CI saw the
/// busy heartbeat land beside the idle change). Hourly heartbeats stay out of the way.
const CHANGES_ONLY: (&str, &str) = ("CLOUDWATCH_HEARTBEAT_SEC", "3600");

/// Drops consecutive repeats: heartbeats repeat the value they carry.
fn changes(values: &[f64]) -> Vec<f64> {
    let mut out: Vec<f64> = Vec::new();
    for v in values {
        if out.last() != Some(v) {
            out.push(*v);
        }
    }
    out
}

#[test]
fn cloudwatch_follows_a_job_with_no_github_call_while_idle() {
    if !moto_available() {
        return;
    }
    let moto = Moto::start();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let from = now() - 1.0;
    let mut sup = Supervisor::start(&aws_env(&gh, &runner, &moto.url(), &[CHANGES_ONLY]));
    sup.wait_state("idle", Duration::from_secs(30));
    wait_for("the idle datapoint", Duration::from_secs(20), || (moto.values(METRIC, from) == [0.0]).then_some(()));
    // The boot phases, once, under the same namespace and dimensions.
    let listed = moto.call("list_metrics", json!({"Namespace": NAMESPACE}));
    for name in [METRIC, "RegistrationSec", "BootToListeningSec"] {
        let m = listed["Metrics"].as_array().unwrap().iter().find(|m| m["MetricName"] == name);
        let m = m.unwrap_or_else(|| panic!("{name} not published: {listed}"));
        assert_eq!(m["Dimensions"], json!([{"Name": "GH_REPOSITORY", "Value": REPO}]), "{name}");
    }
    assert!(listed_in(&moto, "CWAgent").is_empty(), "boot figures in CWAgent without BTIME");
    let boot = moto.stats("BootToListeningSec", &[("GH_REPOSITORY", REPO)], from, now() + 60.0, 60);
    assert_eq!(boot.iter().map(|p| p["SampleCount"].as_f64().unwrap()).sum::<f64>(), 1.0, "{boot:?}");
    assert!(boot[0]["Maximum"].as_f64().unwrap() > 0.0);

    gh.post("/_fake/requests/clear", json!({}));
    let scratch = runner.scratch();
    space_out();
    gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "a"));
    sup.wait_state("busy", Duration::from_secs(30));
    wait_for("the busy datapoint", Duration::from_secs(20), || {
        (changes(&moto.values(METRIC, from)) == [0.0, 100.0]).then_some(())
    });
    space_out();
    release(&scratch, "a");
    wait_for("the idle datapoint after the job", Duration::from_secs(30), || {
        (changes(&moto.values(METRIC, from)) == [0.0, 100.0, 0.0]).then_some(())
    });
    // A whole job went by, and the busy share never asked GitHub anything.
    let rest: Vec<Value> =
        gh.requests().into_iter().filter(|r| !r["path"].as_str().unwrap_or("").contains("/_fake/")).collect();
    assert!(rest.is_empty(), "GitHub API calls while idle or busy: {rest:?}");

    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
    assert!(gh.runners().is_empty());
    assert!(!sup.log_has("secret-test-key"), "the AWS secret reached the log");
}

#[test]
fn pool_average_is_the_percentage_of_busy_runners() {
    if !moto_available() {
        return;
    }
    let moto = Moto::start();
    let gh = FakeGithub::start();
    let dirs: Vec<RunnerDir> = (0..4).map(|_| RunnerDir::new()).collect();
    let sups: Vec<Supervisor> = dirs
        .iter()
        .map(|d| Supervisor::start(&aws_env(&gh, d, &moto.url(), &[("CLOUDWATCH_HEARTBEAT_SEC", "1")])))
        .collect();
    for s in &sups {
        s.wait_state("idle", Duration::from_secs(60));
    }
    // One job: one runner of four busy.
    let scratch = dirs[0].scratch();
    gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "pool"));
    wait_for("one runner busy", Duration::from_secs(30), || {
        let states: Vec<String> =
            sups.iter().filter_map(|s| s.health().and_then(|h| h["state"].as_str().map(str::to_string))).collect();
        (states.iter().filter(|s| *s == "busy").count() == 1 && states.iter().filter(|s| *s == "idle").count() == 3)
            .then_some(())
    });
    // Four whole heartbeat seconds from now: each container sends one datapoint per second on
    // the same wall-clock instants, so the Average is exactly the busy share of the pool.
    let t0 = now().ceil() + 1.0;
    let (from, to) = (t0 - 0.5, t0 + 3.5);
    let point = wait_for("16 heartbeats in the window", Duration::from_secs(30), || {
        let p = moto.stats(METRIC, &[("GH_REPOSITORY", REPO)], from, to, 60);
        let n: f64 = p.iter().map(|p| p["SampleCount"].as_f64().unwrap()).sum();
        (p.len() == 1 && n >= 16.0).then(|| p[0].clone())
    });
    assert_eq!(point["SampleCount"].as_f64(), Some(16.0), "{point}");
    assert_eq!(point["Average"].as_f64(), Some(25.0), "{point}");
    release(&scratch, "pool");
}

#[test]
fn cloudwatch_down_leaves_the_runner_alone_and_catches_up() {
    if !moto_available() {
        return;
    }
    let port = free_port();
    let url = format!("http://127.0.0.1:{port}");
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let from = now() - 1.0;
    // CloudWatch is down from the start: the job runs and the drain works all the same.
    let mut sup = Supervisor::start(&aws_env(&gh, &runner, &url, &[CHANGES_ONLY]));
    sup.wait_state("idle", Duration::from_secs(30));
    let scratch = runner.scratch();
    space_out();
    let job = gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "down"));
    sup.wait_state("busy", Duration::from_secs(30));
    space_out();
    release(&scratch, "down");
    wait_for("the job to succeed", Duration::from_secs(30), || (gh.job(job)["result"] == "Succeeded").then_some(()));
    sup.wait_log("Failed to publish to CloudWatch", Duration::from_secs(20));
    // Back up: what was kept through the outage arrives, in order.
    let moto = Moto::start_on(port);
    sup.wait_log("CloudWatch reachable again.", Duration::from_secs(90));
    let deadline = std::time::Instant::now() + Duration::from_secs(20);
    loop {
        let seen = moto.stats(METRIC, &[("GH_REPOSITORY", REPO)], from, now() + 60.0, 1);
        let values: Vec<f64> = moto.values(METRIC, from);
        if changes(&values) == [0.0, 100.0, 0.0] {
            break;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "the datapoints kept through the outage: {seen:?}\n{}",
            sup.log()
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(sup.count("Failed to publish to CloudWatch"), 1, "one warning per outage:\n{}", sup.log());
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
    assert!(gh.runners().is_empty());
}

#[test]
fn off_aws_metrics_are_off_with_one_info_line() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&base_env(&gh, &runner));
    sup.wait_state("idle", Duration::from_secs(30));
    sup.wait_log("CloudWatch metrics off (not on AWS).", Duration::from_secs(10));
    assert_eq!(sup.count("CloudWatch"), 1, "{}", sup.log());
    assert!(!sup.log_has("WARN"), "{}", sup.log());
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// One request a fake HTTP service saw.
#[derive(Debug, Clone)]
pub struct Request {
    pub method: String,
    pub path: String,
    pub headers: BTreeMap<String, String>,
    pub body: String,
}

pub type Handler = dyn Fn(&Request) -> (u16, String) + Send + Sync;

/// A tiny HTTP/1.1 server on loopback for the ECS agent and the instance metadata service.
pub struct FakeHttp {
    port: u16,
    seen: Arc<Mutex<Vec<Request>>>,
}

impl FakeHttp {
    pub fn start(handler: Arc<Handler>) -> Self {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let port = listener.local_addr().unwrap().port();
        let seen = Arc::new(Mutex::new(Vec::new()));
        let log = seen.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { continue };
                let handler = handler.clone();
                let log = log.clone();
                std::thread::spawn(move || {
                    let mut reader = BufReader::new(stream.try_clone().unwrap());
                    let mut line = String::new();
                    if reader.read_line(&mut line).unwrap_or(0) == 0 {
                        return;
                    }
                    let mut parts = line.split_whitespace();
                    let (method, path) =
                        (parts.next().unwrap_or("").to_string(), parts.next().unwrap_or("").to_string());
                    let mut headers = BTreeMap::new();
                    loop {
                        let mut h = String::new();
                        if reader.read_line(&mut h).unwrap_or(0) == 0 || h.trim().is_empty() {
                            break;
                        }
                        if let Some((k, v)) = h.split_once(':') {
                            headers.insert(k.trim().to_ascii_lowercase(), v.trim().to_string());
                        }
                    }
                    let len = headers.get("content-length").and_then(|l| l.parse().ok()).unwrap_or(0);
                    let mut body = vec![0; len];
                    let _ = reader.read_exact(&mut body);
                    let req = Request { method, path, headers, body: String::from_utf8_lossy(&body).into_owned() };
                    let (code, reply) = handler(&req);
                    // IMDSv2 answers a token request with the token's TTL, which the SDK's
                    // client requires.
                    let ttl = match req.headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
                        Some(t) if code == 200 => format!("X-aws-ec2-metadata-token-ttl-seconds: {t}\r\n"),
                        _ => String::new(),
                    };
                    log.lock().unwrap().push(req);
                    let _ = write!(
                        stream,
                        "HTTP/1.1 {code} X\r\nContent-Type: application/json\r\n{ttl}Content-Length: {}\r\nConnection: close\r\n\r\n{reply}",
                        reply.len()
                    );
                });
            }
        });
        FakeHttp { port, seen }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn requests(&self) -> Vec<Request> {
        self.seen.lock().unwrap().clone()
    }
}

/// The protection states the fake agent accepted, in order.
fn protections(agent: &FakeHttp) -> Vec<bool> {
    agent
        .requests()
        .iter()
        .filter(|r| r.method == "PUT" && r.path == "/task-protection/v1/state")
        .filter_map(|r| serde_json::from_str::<Value>(&r.body).ok())
        .map(|b| b["ProtectionEnabled"] == true)
        .collect()
}

#[test]
fn ecs_protection_is_on_while_busy_renewed_and_off_when_idle() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    // The agent fails the first call: the protection is retried.
    let calls = Arc::new(Mutex::new(0u32));
    let counter = calls.clone();
    let agent = FakeHttp::start(Arc::new(move |req: &Request| {
        let mut n = counter.lock().unwrap();
        *n += 1;
        if *n == 1 {
            return (503, r#"{"error":{"Code":"ServerException","Message":"try again"}}"#.into());
        }
        let body: Value = serde_json::from_str(&req.body).unwrap_or_default();
        (200, json!({"protection": {"ProtectionEnabled": body["ProtectionEnabled"], "ExpirationDate": null, "TaskArn": "arn"}}).to_string())
    }));
    let env = {
        let mut e = base_env(&gh, &runner);
        e.push(("ECS_AGENT_URI".into(), agent.url()));
        // One minute: renewed every 30 s while the job runs.
        e.push(("ECS_PROTECTION_EXPIRES_MIN".into(), "1".into()));
        e
    };
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    // A protection left by an earlier run of this task is lifted (after one retry).
    wait_for("protection off at the start", Duration::from_secs(20), || {
        (protections(&agent) == [false, false]).then_some(())
    });
    let scratch = runner.scratch();
    gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "p"));
    sup.wait_state("busy", Duration::from_secs(30));
    wait_for("protection on while busy", Duration::from_secs(10), || {
        (protections(&agent) == [false, false, true]).then_some(())
    });
    let body: Value = serde_json::from_str(&agent.requests().last().unwrap().body).unwrap();
    assert_eq!(body["ExpiresInMinutes"], 1);
    wait_for("the protection renewed before it expires", Duration::from_secs(45), || {
        (protections(&agent) == [false, false, true, true]).then_some(())
    });
    release(&scratch, "p");
    wait_for("protection off when idle", Duration::from_secs(30), || {
        (protections(&agent) == [false, false, true, true, false]).then_some(())
    });
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
}

/// A fake IMDSv2: a token first, every read with it; a spot notice once `armed` holds a time.
fn fake_imds(notice: Arc<Mutex<Option<String>>>) -> FakeHttp {
    FakeHttp::start(Arc::new(move |req: &Request| {
        if req.method == "PUT" && req.path == "/latest/api/token" {
            return match req.headers.get("x-aws-ec2-metadata-token-ttl-seconds") {
                Some(_) => (200, "imds-session-token".into()),
                None => (400, String::new()),
            };
        }
        if req.headers.get("x-aws-ec2-metadata-token").map(String::as_str) != Some("imds-session-token") {
            return (401, String::new());
        }
        match req.path.as_str() {
            "/latest/meta-data/instance-id" => (200, "i-0123456789abcdef0".into()),
            "/latest/meta-data/placement/region" => (200, "us-east-1".into()),
            "/latest/meta-data/iam/security-credentials/" => (200, "ci-runner-role".into()),
            "/latest/meta-data/iam/security-credentials/ci-runner-role" => (
                200,
                json!({"Code": "Success", "AccessKeyId": "ASIAIMDS", "SecretAccessKey": "imds-secret",
                       "Token": "imds-session", "Expiration": "2099-01-01T00:00:00Z"})
                .to_string(),
            ),
            "/latest/meta-data/spot/instance-action" => match notice.lock().unwrap().clone() {
                Some(time) => (200, json!({"action": "terminate", "time": time}).to_string()),
                None => (404, String::new()),
            },
            _ => (404, String::new()),
        }
    }))
}

#[test]
fn spot_notice_drains_the_runner_and_no_new_job_starts() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let notice = Arc::new(Mutex::new(None));
    let imds = fake_imds(notice.clone());
    let mut env = imds_env(&gh, &runner, &imds);
    env.push(("CLOUDWATCH_ENABLED".into(), "false".into()));
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    sup.wait_log("On EC2: watching for a spot interruption notice.", Duration::from_secs(10));
    let scratch = runner.scratch();
    let first = gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "s1"));
    sup.wait_state("busy", Duration::from_secs(30));
    // Two minutes' notice: the running job may finish within the 90 s left before the margin.
    let at = time_in(120);
    *notice.lock().unwrap() = Some(at);
    sup.wait_log("Spot interruption notice: draining now", Duration::from_secs(10));
    sup.wait_state("draining", Duration::from_secs(10));
    let second = gh.enqueue("build", &["ci-test"], "true");
    release(&scratch, "s1");
    assert_eq!(sup.wait_exit(Duration::from_secs(60)).code(), Some(0), "{}", sup.log());
    assert_eq!(gh.job(first)["result"], "Succeeded");
    assert_eq!(gh.job(second)["status"], "queued", "a job started after the spot notice");
    assert!(gh.runners().is_empty(), "the runner was left registered");
    // IMDSv2 only: every read carried the session token.
    let reqs = imds.requests();
    assert_eq!(reqs[0].method, "PUT");
    assert!(reqs.iter().all(|r| r.method == "PUT" || r.headers.contains_key("x-aws-ec2-metadata-token")), "{reqs:?}");
}

#[test]
fn spot_notice_cancels_a_job_that_cannot_finish_in_time() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let notice = Arc::new(Mutex::new(None));
    let imds = fake_imds(notice.clone());
    let mut env = imds_env(&gh, &runner, &imds);
    // Region and credentials from the instance metadata; CloudWatch nowhere (the port is
    // closed), which must not matter.
    env.push(("AWS_ENDPOINT_URL_CLOUDWATCH".into(), format!("http://127.0.0.1:{}", free_port())));
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    sup.wait_log("Publishing the busy share to CloudWatch.", Duration::from_secs(10));
    let scratch = runner.scratch();
    let job = gh.enqueue("build", &["ci-test"], &gated_steps(&scratch, "never"));
    sup.wait_state("busy", Duration::from_secs(30));
    // The instance goes in 35 s: 5 s before the margin, the job is cancelled and reported.
    *notice.lock().unwrap() = Some(time_in(35));
    assert_eq!(sup.wait_exit(Duration::from_secs(60)).code(), Some(7), "{}", sup.log());
    assert_eq!(gh.job(job)["result"], "Canceled");
    assert!(gh.runners().is_empty(), "the runner was left registered");
}

/// The supervisor's environment on "EC2": the fake instance metadata, polled every second.
fn imds_env(gh: &FakeGithub, runner: &RunnerDir, imds: &FakeHttp) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    env.retain(|(k, _)| k != "AWS_EC2_METADATA_DISABLED");
    env.push(("AWS_EC2_METADATA_SERVICE_ENDPOINT".into(), imds.url()));
    env.push(("SPOT_POLL_SEC".into(), "1".into()));
    env
}

fn time_in(secs: u64) -> String {
    let t = time::OffsetDateTime::now_utc() + Duration::from_secs(secs);
    t.format(&time::format_description::well_known::Rfc3339).unwrap()
}

/// The statistics of `metric` in `namespace` under `dims` over the last ten minutes.
fn stats_in(moto: &Moto, namespace: &str, metric: &str, dims: &Value) -> Vec<Value> {
    let r = moto.call(
        "get_metric_statistics",
        json!({
            "Namespace": namespace, "MetricName": metric, "Dimensions": dims,
            "StartTime": now() - 600.0, "EndTime": now() + 60.0, "Period": 60,
            "Statistics": ["Minimum", "Maximum", "SampleCount"],
        }),
    );
    r["Datapoints"].as_array().cloned().unwrap_or_default()
}

/// The metric names in `namespace`, each with its dimensions sorted by name.
fn listed_in(moto: &Moto, namespace: &str) -> Vec<(String, Value)> {
    let r = moto.call("list_metrics", json!({"Namespace": namespace}));
    let mut out: Vec<(String, Value)> = r["Metrics"]
        .as_array()
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .map(|m| {
            let mut dims = m["Dimensions"].as_array().cloned().unwrap_or_default();
            dims.sort_by(|a, b| a["Name"].as_str().cmp(&b["Name"].as_str()));
            (m["MetricName"].as_str().unwrap_or_default().to_string(), Value::Array(dims))
        })
        .collect();
    out.sort_by(|a, b| a.0.cmp(&b.0));
    out.dedup_by(|a, b| a.0 == b.0 && a.1 == b.1);
    out
}

/// `BTIME` on "EC2" (the fake instance metadata gives the instance id): the original image's
/// hook-98 figures land as it sent them, `DockerBootSec` and `RunnerBootSec` in `CWAgent`,
/// `InstanceUptimeSec` and `RunnerUptimeSec` in `ci-storage/metrics`, under `Region`,
/// `GH_REPOSITORY`, `GH_LABEL` (the last of `GH_LABELS`) and `InstanceId`.
/// Never: another name or the busy share in `CWAgent`, other dimensions, a figure that
/// contradicts the clock (a container boot longer than the boot to listening, an uptime
/// shorter than the time since `BTIME`).
#[test]
fn btime_sends_the_original_boot_figures_to_cwagent_with_its_dimensions() {
    if !moto_available() {
        return;
    }
    let moto = Moto::start();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let imds = fake_imds(Arc::new(Mutex::new(None)));
    let mut env = imds_env(&gh, &runner, &imds);
    let btime = now() as u64 - 3600;
    let btime_s = btime.to_string();
    for (k, v) in [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ACCESS_KEY_ID", "AKIDTEST"),
        ("AWS_SECRET_ACCESS_KEY", "secret-test-key"),
        ("AWS_ENDPOINT_URL_CLOUDWATCH", moto.url().as_str()),
        ("BTIME", btime_s.as_str()),
        CHANGES_ONLY,
    ] {
        env.push((k.into(), v.into()));
    }
    let started = now();
    let mut sup = Supervisor::start(&env);
    let health = sup.wait_state("idle", Duration::from_secs(30));
    let dims = json!([
        {"Name": "GH_LABEL", "Value": "linux"},
        {"Name": "GH_REPOSITORY", "Value": REPO},
        {"Name": "InstanceId", "Value": "i-0123456789abcdef0"},
        {"Name": "Region", "Value": "us-east-1"},
    ]);
    let agent = wait_for("the boot figures in CWAgent", Duration::from_secs(20), || {
        let l = listed_in(&moto, "CWAgent");
        (l.len() >= 2).then_some(l)
    });
    assert_eq!(
        agent,
        vec![("DockerBootSec".to_string(), dims.clone()), ("RunnerBootSec".to_string(), dims.clone())],
        "CWAgent holds exactly the two boot figures, with the original's dimensions"
    );
    let ours = wait_for("the uptime figures in ci-storage/metrics", Duration::from_secs(20), || {
        let l: Vec<_> = listed_in(&moto, NAMESPACE).into_iter().filter(|(n, _)| n.ends_with("UptimeSec")).collect();
        (l.len() >= 2).then_some(l)
    });
    assert_eq!(
        ours,
        vec![("InstanceUptimeSec".to_string(), dims.clone()), ("RunnerUptimeSec".to_string(), dims.clone())]
    );
    let one = |ns: &str, m: &str| {
        let p = stats_in(&moto, ns, m, &dims);
        assert!(!p.is_empty(), "no {m} in {ns}");
        p[0]["Maximum"].as_f64().unwrap()
    };
    let docker = one("CWAgent", "DockerBootSec");
    assert!((3599.0..=started - btime as f64 + 5.0).contains(&docker), "DockerBootSec {docker}");
    let listening = health["boot"]["listening_seconds"].as_f64().unwrap();
    let runner_boot = one("CWAgent", "RunnerBootSec");
    assert_eq!(runner_boot, listening.floor(), "RunnerBootSec is the boot to listening, whole seconds");
    assert!(one(NAMESPACE, "InstanceUptimeSec") >= 3600.0);
    assert!(one(NAMESPACE, "RunnerUptimeSec") <= now() - started + 1.0);
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0));
    assert!(!sup.log_has("secret-test-key"), "the AWS secret reached the log");
}

/// `BTIME` that is not the digits of a boot time: exit 3, naming it, before any call.
#[test]
fn a_malformed_btime_is_a_configuration_error_naming_it() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("BTIME", "yesterday")]));
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(3), "{}", sup.log());
    assert!(sup.log_has("BTIME"), "{}", sup.log());
    assert!(gh.rest_requests("POST", "registration-token").is_empty(), "GitHub was called");
}
