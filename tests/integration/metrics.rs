//! `GET /metrics`: a checker for the Prometheus text format (0.0.4), and the counters of
//! issue #4 moving as the real binary runs jobs, calls the fake GitHub, drains and forwards.

use std::collections::{BTreeMap, HashSet};
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream, UdpSocket};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::harness::*;

const BOOT: Duration = Duration::from_secs(30);
const LONG: Duration = Duration::from_secs(60);

/// One sample line: `name{labels} value`.
#[derive(Debug, Clone)]
pub struct Sample {
    pub name: String,
    pub labels: BTreeMap<String, String>,
    pub value: f64,
}

#[derive(Debug, Default)]
pub struct Family {
    pub kind: String,
    pub help: Option<String>,
    pub samples: Vec<Sample>,
}

/// A parsed and checked exposition.
#[derive(Debug, Default)]
pub struct Exposition {
    pub families: BTreeMap<String, Family>,
}

fn valid_name(name: &str, colon: bool) -> bool {
    let mut chars = name.chars();
    let ok_first = |c: char| c.is_ascii_alphabetic() || c == '_' || (colon && c == ':');
    chars.next().is_some_and(ok_first) && chars.all(|c| ok_first(c) || c.is_ascii_digit())
}

/// A sample value: a float, `+Inf`, `-Inf` or `NaN` (Rust's parser alone would take `inf`,
/// `infinity` and `nan` too).
fn parse_value(s: &str) -> Result<f64, String> {
    match s {
        "+Inf" => return Ok(f64::INFINITY),
        "-Inf" => return Ok(f64::NEG_INFINITY),
        "NaN" => return Ok(f64::NAN),
        _ => {}
    }
    if s.is_empty() || !s.chars().all(|c| c.is_ascii_digit() || "+-.eE".contains(c)) {
        return Err(format!("bad value {s:?}"));
    }
    s.parse().map_err(|_| format!("bad value {s:?}"))
}

/// `{a="x",b="y"}` from just after the `{`; returns the labels and the rest of the line.
fn parse_labels(mut rest: &str) -> Result<(BTreeMap<String, String>, &str), String> {
    let mut labels = BTreeMap::new();
    loop {
        if let Some(after) = rest.strip_prefix('}') {
            return Ok((labels, after));
        }
        let (name, after) = rest.split_once("=\"").ok_or_else(|| format!("bad label in {rest:?}"))?;
        if !valid_name(name, false) || name.starts_with("__") {
            return Err(format!("bad label name {name:?}"));
        }
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                None => return Err(format!("unterminated value of label {name}")),
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, '\\')) => value.push('\\'),
                    Some((_, '"')) => value.push('"'),
                    Some((_, 'n')) => value.push('\n'),
                    other => return Err(format!("bad escape {other:?} in label {name}")),
                },
                Some((_, c)) => value.push(c),
            }
        };
        if labels.insert(name.to_string(), value).is_some() {
            return Err(format!("label {name} twice"));
        }
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
}

fn parse_sample(line: &str) -> Result<Sample, String> {
    let end = line.find(['{', ' ']).ok_or_else(|| format!("no value in {line:?}"))?;
    let name = &line[..end];
    if !valid_name(name, true) {
        return Err(format!("bad metric name {name:?}"));
    }
    let (labels, rest) = match line[end..].strip_prefix('{') {
        Some(after) => parse_labels(after)?,
        None => (BTreeMap::new(), &line[end..]),
    };
    let rest = rest.strip_prefix(' ').ok_or_else(|| format!("no space before the value in {line:?}"))?;
    let mut fields = rest.split(' ');
    let value = parse_value(fields.next().unwrap_or_default())?;
    if let Some(ts) = fields.next() {
        ts.parse::<i64>().map_err(|_| format!("bad timestamp {ts:?}"))?;
    }
    if fields.next().is_some() {
        return Err(format!("trailing fields in {line:?}"));
    }
    Ok(Sample { name: name.to_string(), labels, value })
}

impl Exposition {
    /// Parses every line and checks: each sample follows its family's `# TYPE` (so every sample
    /// has one) with the family's lines in one group, HELP and TYPE at most once per family,
    /// names, label escapes and values as the format defines them, no series twice, and each
    /// histogram's buckets cumulative in rising `le`, ending at `+Inf` equal to `_count`, with
    /// `_sum`.
    pub fn parse(text: &str) -> Result<Self, String> {
        if !text.is_empty() && !text.ends_with('\n') {
            return Err("the last line does not end with a newline".into());
        }
        let mut exp = Exposition::default();
        let mut current: Option<String> = None;
        let mut series = HashSet::new();
        for (n, line) in text.lines().enumerate() {
            let at = |e: String| format!("line {}: {e}: {line:?}", n + 1);
            if line.is_empty() {
                continue;
            }
            if let Some(comment) = line.strip_prefix('#') {
                let mut parts = comment.trim_start().splitn(3, ' ');
                let (keyword, name, rest) = (parts.next(), parts.next(), parts.next());
                let (Some(keyword @ ("HELP" | "TYPE")), Some(name)) = (keyword, name) else { continue };
                if !valid_name(name, true) {
                    return Err(at(format!("bad metric name {name:?}")));
                }
                if current.as_deref() != Some(name) && exp.families.contains_key(name) {
                    return Err(at(format!("{name} again after other families")));
                }
                let family = exp.families.entry(name.to_string()).or_default();
                if !family.samples.is_empty() {
                    return Err(at(format!("{keyword} after samples of {name}")));
                }
                let rest = rest.unwrap_or_default();
                if keyword == "HELP" {
                    if family.help.replace(rest.to_string()).is_some() {
                        return Err(at(format!("second HELP for {name}")));
                    }
                    let mut chars = rest.chars();
                    while let Some(c) = chars.next() {
                        if c == '\\' && !matches!(chars.next(), Some('\\' | 'n')) {
                            return Err(at("bad escape in HELP".into()));
                        }
                    }
                } else {
                    if !family.kind.is_empty() {
                        return Err(at(format!("second TYPE for {name}")));
                    }
                    if !["counter", "gauge", "histogram", "summary", "untyped"].contains(&rest) {
                        return Err(at(format!("unknown type {rest:?}")));
                    }
                    family.kind = rest.to_string();
                }
                current = Some(name.to_string());
                continue;
            }
            let sample = parse_sample(line).map_err(at)?;
            let family_name = current.clone().ok_or_else(|| at("a sample before any TYPE".into()))?;
            let family = exp.families.get_mut(&family_name).expect("current family exists");
            let suffix = sample.name.strip_prefix(family_name.as_str());
            let belongs = match family.kind.as_str() {
                "" => return Err(at(format!("no TYPE for {family_name}"))),
                "histogram" => matches!(suffix, Some("_bucket" | "_sum" | "_count")),
                "summary" => matches!(suffix, Some("" | "_sum" | "_count")),
                _ => suffix == Some(""),
            };
            if !belongs {
                return Err(at(format!("sample of no TYPE (the family in progress is {family_name})")));
            }
            if family.kind == "counter" && (sample.value < 0.0 || sample.value.is_nan()) {
                return Err(at("a negative counter".into()));
            }
            if !series.insert(format!("{}{:?}", sample.name, sample.labels)) {
                return Err(at("the same series twice".into()));
            }
            family.samples.push(sample);
        }
        for (name, family) in &exp.families {
            if family.kind == "histogram" {
                check_histogram(name, family)?;
            }
        }
        Ok(exp)
    }

    /// The value of the series `name` with exactly these labels.
    pub fn value(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect();
        self.families.values().flat_map(|f| &f.samples).find(|s| s.name == name && s.labels == want).map(|s| s.value)
    }

    /// The samples of `family` (all of its series).
    pub fn samples(&self, family: &str) -> &[Sample] {
        self.families.get(family).map(|f| f.samples.as_slice()).unwrap_or_default()
    }
}

/// One series of a histogram: its `(le, count)` buckets in order, `_sum` and `_count`.
#[derive(Default)]
struct HistogramSeries {
    buckets: Vec<(f64, f64)>,
    sum: Option<f64>,
    count: Option<f64>,
}

fn check_histogram(name: &str, family: &Family) -> Result<(), String> {
    let mut groups: BTreeMap<Vec<(String, String)>, HistogramSeries> = BTreeMap::new();
    for s in &family.samples {
        let key = s.labels.iter().filter(|(k, _)| *k != "le").map(|(k, v)| (k.clone(), v.clone())).collect();
        let group = groups.entry(key).or_default();
        match s.name.strip_prefix(name) {
            Some("_bucket") => {
                let le = s.labels.get("le").ok_or_else(|| format!("{name}: a bucket without le"))?;
                group.buckets.push((parse_value(le)?, s.value));
            }
            Some("_sum") => group.sum = Some(s.value),
            Some("_count") => group.count = Some(s.value),
            _ => return Err(format!("{name}: unexpected sample {}", s.name)),
        }
    }
    if groups.is_empty() {
        return Err(format!("{name}: a histogram without samples"));
    }
    for (labels, HistogramSeries { buckets, sum, count }) in groups {
        let (Some(_), Some(count)) = (sum, count) else {
            return Err(format!("{name}{labels:?}: no _sum or no _count"));
        };
        for pair in buckets.windows(2) {
            if pair[1].0 <= pair[0].0 {
                return Err(format!("{name}{labels:?}: le not rising ({} then {})", pair[0].0, pair[1].0));
            }
            if pair[1].1 < pair[0].1 {
                return Err(format!("{name}{labels:?}: buckets not cumulative ({} then {})", pair[0].1, pair[1].1));
            }
        }
        match buckets.last() {
            Some((le, n)) if le.is_infinite() && *le > 0.0 => {
                if *n != count {
                    return Err(format!("{name}{labels:?}: +Inf bucket {n} but _count {count}"));
                }
            }
            _ => return Err(format!("{name}{labels:?}: buckets do not end at +Inf")),
        }
    }
    Ok(())
}

/// `/metrics`, checked; `None` while (or once) the supervisor does not answer.
fn scrape(sup: &Supervisor) -> Option<Exposition> {
    let text = ureq::get(&format!("http://{}/metrics", sup.status_addr())).call().ok()?.into_string().ok()?;
    Some(Exposition::parse(&text).unwrap_or_else(|e| panic!("invalid exposition: {e}\n{text}")))
}

fn metrics(sup: &Supervisor) -> Exposition {
    scrape(sup).expect("/metrics answers")
}

/// The supervisor's own REST calls in the fake's log (not the runner's, nor the test's
/// controls), counted by status.
fn github_statuses(gh: &FakeGithub) -> BTreeMap<String, f64> {
    let mut by_status = BTreeMap::new();
    for r in gh.requests() {
        if r["path"].as_str().is_some_and(|p| p.contains("/repos/") && !p.contains("/_fake/")) {
            *by_status.entry(r["status"].to_string()).or_default() += 1.0;
        }
    }
    by_status
}

fn metric_statuses(m: &Exposition) -> BTreeMap<String, f64> {
    m.samples("ci_runner_github_api_requests_total").iter().map(|s| (s.labels["status"].clone(), s.value)).collect()
}

fn job_counts(m: &Exposition) -> [f64; 4] {
    ["succeeded", "failed", "cancelled", "other"].map(|result| {
        m.value("ci_runner_jobs_completed_total", &[("result", result)]).expect("every result has a series")
    })
}

fn drain_outcome(m: &Exposition) -> Option<String> {
    let samples = m.samples("ci_runner_drain_outcome");
    samples.iter().find(|s| s.value == 1.0).map(|s| s.labels["outcome"].clone())
}

fn env_with(gh: &FakeGithub, runner: &RunnerDir, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    env.extend(extra.iter().map(|(k, v)| (k.to_string(), v.to_string())));
    env
}

const VALID: &str = "# HELP up Whether it is up, with a \\\\ and a \\n.
# TYPE up gauge
up 1
# a comment
# TYPE requests_total counter
requests_total{code=\"200\",path=\"/a \\\"b\\\" \\\\ \\n\"} 3 1700000000000
requests_total{code=\"500\"} 0

# HELP d_seconds Durations.
# TYPE d_seconds histogram
d_seconds_bucket{le=\"1\"} 1
d_seconds_bucket{le=\"10\"} 3
d_seconds_bucket{le=\"+Inf\"} 4
d_seconds_sum 42.5
d_seconds_count 4
# TYPE t gauge
t +Inf
";

#[test]
fn the_checker_accepts_valid_text_and_reads_values() {
    let m = Exposition::parse(VALID).unwrap();
    assert_eq!(m.value("requests_total", &[("code", "200"), ("path", "/a \"b\" \\ \n")]), Some(3.0));
    assert_eq!(m.value("d_seconds_count", &[]), Some(4.0));
    assert_eq!(m.families["up"].help.as_deref(), Some("Whether it is up, with a \\\\ and a \\n."));
    assert_eq!(m.families["d_seconds"].kind, "histogram");
    assert_eq!(m.value("t", &[]), Some(f64::INFINITY));
}

#[test]
fn the_checker_rejects_each_kind_of_invalid_text() {
    let cases: &[(&str, &str, &str)] = &[
        ("no TYPE", "up 1\n", "before any TYPE"),
        ("another family's sample", "# TYPE up gauge\ndown 1\n", "no TYPE"),
        ("HELP only", "# HELP up Up.\nup 1\n", "no TYPE for up"),
        ("bad value", "# TYPE up gauge\nup 1.2.3\n", "bad value"),
        ("Rust's inf", "# TYPE up gauge\nup inf\n", "bad value"),
        ("bad escape", "# TYPE up gauge\nup{a=\"\\t\"} 1\n", "bad escape"),
        ("unterminated", "# TYPE up gauge\nup{a=\"x} 1\n", "unterminated"),
        ("bad label name", "# TYPE up gauge\nup{1a=\"x\"} 1\n", "bad label name"),
        ("twice", "# TYPE up gauge\nup{a=\"x\"} 1\nup{a=\"x\"} 2\n", "twice"),
        ("second TYPE", "# TYPE up gauge\n# TYPE up gauge\n", "second TYPE"),
        ("split family", "# TYPE a gauge\na 1\n# TYPE b gauge\nb 1\n# HELP a A.\n", "again"),
        ("unknown type", "# TYPE up meter\n", "unknown type"),
        ("negative counter", "# TYPE c_total counter\nc_total -1\n", "negative"),
        ("no newline at the end", "# TYPE up gauge\nup 1", "newline"),
        (
            "not cumulative",
            "# TYPE d histogram\nd_bucket{le=\"1\"} 3\nd_bucket{le=\"2\"} 2\nd_bucket{le=\"+Inf\"} 3\nd_sum 1\nd_count 3\n",
            "not cumulative",
        ),
        ("no +Inf", "# TYPE d histogram\nd_bucket{le=\"1\"} 3\nd_sum 1\nd_count 3\n", "+Inf"),
        (
            "+Inf is not the count",
            "# TYPE d histogram\nd_bucket{le=\"1\"} 1\nd_bucket{le=\"+Inf\"} 2\nd_sum 1\nd_count 3\n",
            "_count 3",
        ),
        (
            "le falling",
            "# TYPE d histogram\nd_bucket{le=\"5\"} 1\nd_bucket{le=\"1\"} 1\nd_bucket{le=\"+Inf\"} 1\nd_sum 1\nd_count 1\n",
            "le not rising",
        ),
        ("no _sum", "# TYPE d histogram\nd_bucket{le=\"+Inf\"} 1\nd_count 1\n", "no _sum"),
    ];
    for (what, text, why) in cases {
        match Exposition::parse(text) {
            Ok(_) => panic!("{what}: accepted\n{text}"),
            Err(e) => assert!(e.contains(why), "{what}: rejected for another reason: {e}"),
        }
    }
}

#[test]
fn metrics_count_jobs_by_result_github_answers_and_failed_deregistrations_then_show_an_idle_drain() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    // A 502 before the token, so that the statuses are not all successes.
    gh.fault(json!({"kind": "status", "status": 502, "count": 1, "path_contains": "registration-token"}));
    // The exit waits 5 s once the drain is over, so that its outcome can be read.
    let mut sup = Supervisor::start(&env_with(&gh, &runner, &[("DEBUG_SHUTDOWN_DELAY_SEC", "5")]));
    sup.wait_state("idle", BOOT);

    let m = metrics(&sup);
    for phase in ["registration", "listening"] {
        let seconds = m.value("ci_runner_boot_phase_seconds", &[("phase", phase)]);
        assert!(seconds.is_some_and(|s| s > 0.0), "boot phase {phase}: {seconds:?}");
    }
    assert!(m.value("ci_runner_boot_phase_seconds", &[("phase", "prewarm")]).is_none(), "no pre-warm configured");
    let boot = |phase| m.value("ci_runner_boot_phase_seconds", &[("phase", phase)]).unwrap();
    assert!(boot("listening") >= boot("registration"), "listening counts from the start, before registration");
    assert!(
        m.families.contains_key("ci_runner_drain_outcome") && drain_outcome(&m).is_none(),
        "a drain outcome before any drain"
    );
    assert_eq!(m.value("ci_runner_jobs_started_total", &[]), Some(0.0));
    assert_eq!(m.value("ci_runner_job_duration_seconds_count", &[]), Some(0.0));
    let statuses = github_statuses(&gh);
    assert_eq!(statuses.get("502"), Some(&1.0), "the fault did not fire: {statuses:?}");
    assert_eq!(metric_statuses(&m), statuses, "the GitHub answers counted differ from the fake's log");
    let health = sup.health().unwrap();
    assert!(health["boot"]["registration_seconds"].as_f64().is_some(), "{health}");
    assert!(health["boot"]["listening_seconds"].as_f64().is_some(), "{health}");

    gh.enqueue("pass", &["ci-test"], &gated_steps(&scratch, "pass"));
    wait_for("the passing job to start", LONG, || scratch.join("pass.started").exists().then_some(()));
    wait_for("the started job counted", LONG, || {
        (metrics(&sup).value("ci_runner_jobs_started_total", &[]) == Some(1.0)).then_some(())
    });
    release(&scratch, "pass");
    let fail = gh.enqueue("fail", &["ci-test"], "echo failing on purpose; exit 1");
    let job =
        wait_for("the failing job to complete", LONG, || Some(gh.job(fail)).filter(|j| j["status"] == "completed"));
    assert_eq!(job["result"], "Failed", "{job}");
    let m = wait_for("both completed jobs counted", LONG, || {
        Some(metrics(&sup)).filter(|m| job_counts(m).iter().sum::<f64>() == 2.0)
    });
    assert_eq!(job_counts(&m), [1.0, 1.0, 0.0, 0.0], "succeeded, failed, cancelled, other");
    assert_eq!(m.value("ci_runner_jobs_started_total", &[]), Some(2.0));
    assert_eq!(m.value("ci_runner_job_duration_seconds_count", &[]), Some(2.0));
    assert_eq!(m.value("ci_runner_job_duration_seconds_bucket", &[("le", "+Inf")]), Some(2.0));
    assert!(m.value("ci_runner_job_duration_seconds_sum", &[]).is_some_and(|s| s > 0.0));
    assert_eq!(sup.health().unwrap()["jobs_completed"], 2);
    assert_eq!(m.value("ci_runner_deregistration_failures_total", &[]), Some(0.0));

    // The drain's DELETE fails three times (the client's own retries: one failed attempt),
    // then succeeds.
    let id = gh.runners()[0]["id"].as_u64().expect("runner id");
    gh.fault(json!({"kind": "status", "status": 503, "count": 3, "method": "DELETE",
                    "path_ends_with": format!("/actions/runners/{id}")}));
    sup.signal(Signal::SIGTERM);
    let m = wait_for("the drain's outcome on /metrics", LONG, || scrape(&sup).filter(|m| drain_outcome(m).is_some()));
    assert_eq!(drain_outcome(&m).as_deref(), Some("idle"));
    assert_eq!(m.value("ci_runner_drain_outcome", &[("outcome", "finished")]), Some(0.0));
    assert_eq!(m.value("ci_runner_deregistration_failures_total", &[]), Some(1.0));
    let statuses = github_statuses(&gh);
    assert_eq!((statuses.get("503"), statuses.get("204")), (Some(&3.0), Some(&1.0)), "{statuses:?}");
    assert_eq!(metric_statuses(&m), statuses, "the GitHub answers counted differ from the fake's log");
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());
    assert!(gh.runners().is_empty(), "{:?}", gh.runners());
}

#[test]
fn the_drain_outcome_is_finished_after_the_job_and_cancelled_by_a_second_signal() {
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let env = env_with(&gh, &runner, &[("DEBUG_SHUTDOWN_DELAY_SEC", "5")]);

    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    gh.enqueue("finish", &["ci-test"], &gated_steps(&scratch, "finish"));
    wait_for("the job to start", LONG, || scratch.join("finish.started").exists().then_some(()));
    sup.signal(Signal::SIGTERM);
    sup.wait_log("Waiting for the running job to finish.", BOOT);
    release(&scratch, "finish");
    let m = wait_for("the drain's outcome on /metrics", LONG, || scrape(&sup).filter(|m| drain_outcome(m).is_some()));
    assert_eq!(drain_outcome(&m).as_deref(), Some("finished"));
    assert_eq!(job_counts(&m), [1.0, 0.0, 0.0, 0.0]);
    assert_eq!(sup.wait_exit(LONG).code(), Some(0), "{}", sup.log());

    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    gh.enqueue("cancel", &["ci-test"], &gated_steps(&scratch, "cancel"));
    wait_for("the job to start", LONG, || scratch.join("cancel.started").exists().then_some(()));
    sup.signal(Signal::SIGTERM);
    sup.wait_log("Waiting for the running job to finish.", BOOT);
    sup.signal(Signal::SIGINT);
    let m = wait_for("the drain's outcome on /metrics", LONG, || scrape(&sup).filter(|m| drain_outcome(m).is_some()));
    assert_eq!(drain_outcome(&m).as_deref(), Some("cancelled"));
    assert_eq!(job_counts(&m), [0.0, 0.0, 1.0, 0.0], "the runner reports the job Canceled");
    assert_eq!(m.value("ci_runner_job_duration_seconds_count", &[]), Some(1.0));
    assert_eq!(sup.wait_exit(LONG).code(), Some(7), "{}", sup.log());
}

#[test]
fn metrics_count_forwarded_connections_and_sessions_per_port_and_host_failures() {
    // As in forward.rs: addresses of its own; nothing listens on the primary (.2).
    let (bind, primary, backup) = ("127.0.53.1", "127.0.53.2", "127.0.53.3");
    let tcp_port = TcpListener::bind((bind, 0)).unwrap().local_addr().unwrap().port();
    let udp_port = UdpSocket::bind((bind, 0)).unwrap().local_addr().unwrap().port();
    let tcp_echo = TcpListener::bind((backup, tcp_port)).unwrap();
    std::thread::spawn(move || {
        for s in tcp_echo.incoming().map_while(Result::ok) {
            let (mut r, mut w) = (s.try_clone().unwrap(), s);
            let _ = std::io::copy(&mut r, &mut w);
        }
    });
    let udp_echo = UdpSocket::bind((backup, udp_port)).unwrap();
    std::thread::spawn(move || {
        let mut buf = [0u8; 64];
        while let Ok((n, from)) = udp_echo.recv_from(&mut buf) {
            let _ = udp_echo.send_to(&buf[..n], from);
        }
    });
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let ports = format!("{tcp_port} {udp_port}/udp");
    let hosts = format!("{primary} {backup}");
    let sup = Supervisor::start(&env_with(
        &gh,
        &runner,
        &[("FORWARD_BIND", bind), ("FORWARD_HOST", &hosts), ("FORWARD_PORTS", &ports)],
    ));
    // The forwards start first; the status server is up before them.
    sup.wait_log("Forwarding.", BOOT);
    let (tcp, udp) = (tcp_port.to_string(), udp_port.to_string());
    let m = metrics(&sup);
    assert_eq!(m.value("ci_runner_forward_connections_total", &[("port", &tcp), ("proto", "tcp")]), Some(0.0));
    assert_eq!(m.value("ci_runner_forward_connections_total", &[("port", &udp), ("proto", "udp")]), Some(0.0));

    let io = Some(Duration::from_secs(20));
    for _ in 0..3 {
        let mut client = TcpStream::connect((bind, tcp_port)).unwrap();
        client.set_read_timeout(io).unwrap();
        client.write_all(b"ping").unwrap();
        let mut answer = [0u8; 4];
        client.read_exact(&mut answer).unwrap();
        assert_eq!(&answer, b"ping");
    }
    for _ in 0..2 {
        let client = UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(io).unwrap();
        client.send_to(b"ping", (bind, udp_port)).unwrap();
        let mut answer = [0u8; 8];
        let (n, _) = client.recv_from(&mut answer).unwrap();
        assert_eq!(&answer[..n], b"ping");
    }
    // Each answer came after its connection was counted and the primary had failed.
    let m = metrics(&sup);
    let value = |name, port: &str, proto, host: Option<&str>| {
        let mut labels = vec![("port", port), ("proto", proto)];
        labels.extend(host.map(|h| ("host", h)));
        m.value(name, &labels)
    };
    assert_eq!(value("ci_runner_forward_connections_total", &tcp, "tcp", None), Some(3.0));
    assert_eq!(value("ci_runner_forward_connections_total", &udp, "udp", None), Some(2.0), "one session per client");
    assert_eq!(value("ci_runner_forward_host_failures_total", &tcp, "tcp", Some(primary)), Some(3.0));
    assert_eq!(value("ci_runner_forward_host_failures_total", &tcp, "tcp", Some(backup)), Some(0.0));
    assert_eq!(value("ci_runner_forward_host_failures_total", &udp, "udp", Some(primary)), Some(2.0));
    assert_eq!(value("ci_runner_forward_host_failures_total", &udp, "udp", Some(backup)), Some(0.0));
}
