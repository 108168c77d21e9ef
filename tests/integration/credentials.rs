//! AWS credentials through the SDK's providers (issue #20), end to end: the real binary gets
//! its keys from web identity (STS is moto's server), an EKS Pod Identity endpoint whose token
//! file is rotated, a profile's `credential_process`, and refuses a container endpoint off the
//! SDK's allow-list. CloudWatch is a loopback stand-in that records each `PutMetricData`, so a
//! test can read which access key signed it (moto accepts any key and does not say which).
//! Everything is on loopback; the instance metadata service is off.

use std::path::Path;
use std::process::Command;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;
use serde_json::json;

use crate::autoscale::{moto_available, FakeHttp, Moto, Request};
use crate::harness::*;

const ROLE_ARN: &str = "arn:aws:iam::123456789012:role/ci-runner";

/// A CloudWatch that accepts every `PutMetricData` and keeps the requests.
fn fake_cloudwatch() -> FakeHttp {
    FakeHttp::start(Arc::new(|req: &Request| {
        if req.method == "POST" && req.body.contains("Action=PutMetricData") {
            (200, "<PutMetricDataResponse><ResponseMetadata><RequestId>r</RequestId></ResponseMetadata></PutMetricDataResponse>".into())
        } else {
            (
                400,
                "<ErrorResponse><Error><Code>InvalidAction</Code><Message>unexpected</Message></Error></ErrorResponse>"
                    .into(),
            )
        }
    }))
}

/// The access key ids that signed the `PutMetricData` calls, in order.
fn signing_keys(cw: &FakeHttp) -> Vec<String> {
    cw.requests()
        .iter()
        .filter(|r| r.body.contains("Action=PutMetricData"))
        .filter_map(|r| {
            let auth = r.headers.get("authorization")?;
            let cred = auth.split("Credential=").nth(1)?;
            Some(cred.split('/').next()?.to_string())
        })
        .collect()
}

/// Every header and body the fake saw, for "never sent there" checks.
fn everything_sent(fake: &FakeHttp) -> String {
    fake.requests().iter().map(|r| format!("{} {} {:?} {}\n", r.method, r.path, r.headers, r.body)).collect()
}

/// The supervisor's environment with CloudWatch at `cw` and no shared config files: the SDK's
/// profile provider must not find the machine's own `~/.aws`.
fn creds_env(gh: &FakeGithub, runner: &RunnerDir, cw: &FakeHttp, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let none = runner.path().join("no-aws-config").display().to_string();
    let cw_url = cw.url();
    let base = [
        ("AWS_REGION", "us-east-1"),
        ("AWS_ENDPOINT_URL_CLOUDWATCH", cw_url.as_str()),
        ("AWS_CONFIG_FILE", none.as_str()),
        ("AWS_SHARED_CREDENTIALS_FILE", none.as_str()),
        ("CLOUDWATCH_ENABLED", "true"),
    ];
    env_with(gh, runner, &[&base[..], extra].concat())
}

fn write_private(path: &Path, text: &str) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::os::unix::fs::PermissionsExt::from_mode(0o600)).unwrap();
}

/// The role moto's STS says an access key belongs to (`GetCallerIdentity` signed with it).
fn caller_arn(moto: &Moto, access_key_id: &str) -> String {
    let script = "import boto3,sys\n\
        c=boto3.client('sts',endpoint_url=sys.argv[1],region_name='us-east-1',aws_access_key_id=sys.argv[2],aws_secret_access_key='x')\n\
        print(c.get_caller_identity()['Arn'])";
    let out = Command::new("python3").args(["-c", script, &moto.url(), access_key_id]).output().unwrap();
    assert!(out.status.success(), "get_caller_identity: {}", String::from_utf8_lossy(&out.stderr));
    String::from_utf8_lossy(&out.stdout).trim().to_string()
}

/// IRSA on EKS: the projected token and the role ARN, exchanged at STS
/// (`AssumeRoleWithWebIdentity`, moto here through `AWS_ENDPOINT_URL_STS`). Never: the web
/// identity token sent to CloudWatch or written to the log.
#[test]
fn web_identity_token_is_exchanged_at_sts_and_its_keys_sign_the_metric() {
    if !moto_available() {
        return;
    }
    let moto = Moto::start();
    let cw = fake_cloudwatch();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let token_file = runner.path().join("web-identity-token");
    let token = "eyJhbGciOiJSUzI1NiJ9.web-identity-token-must-stay-secret.sig";
    write_private(&token_file, token);
    let token_path = token_file.display().to_string();
    let moto_url = moto.url();
    let env = creds_env(
        &gh,
        &runner,
        &cw,
        &[
            ("AWS_WEB_IDENTITY_TOKEN_FILE", &token_path),
            ("AWS_ROLE_ARN", ROLE_ARN),
            ("AWS_ROLE_SESSION_NAME", "ci-runner-test"),
            ("AWS_ENDPOINT_URL_STS", &moto_url),
        ],
    );
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    sup.wait_log("Publishing the busy share to CloudWatch.", Duration::from_secs(20));
    let key = wait_for("a PutMetricData signed with STS's keys", Duration::from_secs(20), || {
        signing_keys(&cw).first().cloned()
    });
    assert!(key.starts_with("ASIA"), "not temporary credentials from STS: {key}");
    assert_eq!(caller_arn(&moto, &key), "arn:aws:sts::123456789012:assumed-role/ci-runner/ci-runner-test");
    let put = cw.requests().into_iter().find(|r| r.body.contains("Action=PutMetricData")).unwrap();
    assert!(put.headers.contains_key("x-amz-security-token"), "the session token was not sent: {put:?}");
    assert!(
        !everything_sent(&cw).contains("web-identity-token-must-stay-secret"),
        "the web identity token reached CloudWatch"
    );
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", sup.log());
    assert!(!sup.log().contains("web-identity-token-must-stay-secret"), "the token is in the log:\n{}", sup.log());
}

/// EKS Pod Identity: `AWS_CONTAINER_CREDENTIALS_FULL_URI` on the agent's address (loopback
/// here, which the allow-list admits) and `AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE`, which the
/// kubelet rewrites; each fetch must carry the file's current token. The credentials expire
/// within the refresh margin, so every datapoint fetches anew. Never: a stale token after
/// the first fresh one, a token or the secret key in the log or at CloudWatch.
#[test]
fn pod_identity_token_file_is_read_again_after_it_is_rotated() {
    let fetches = Arc::new(Mutex::new(0u32));
    let n = fetches.clone();
    let agent = FakeHttp::start(Arc::new(move |req: &Request| {
        if req.method != "GET" || req.path != "/v1/credentials" {
            return (404, String::new());
        }
        let mut n = n.lock().unwrap();
        *n += 1;
        let expires = time::OffsetDateTime::now_utc() + Duration::from_secs(60);
        let body = json!({
            "AccessKeyId": format!("ASIAPOD{n}"),
            "SecretAccessKey": "pod-secret-key-must-stay-secret",
            "Token": "pod-session-token",
            "Expiration": expires.format(&time::format_description::well_known::Rfc3339).unwrap(),
        });
        (200, body.to_string())
    }));
    let cw = fake_cloudwatch();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let token_file = runner.path().join("eks-pod-identity-token");
    // As the kubelet writes it: no trailing newline (the SDK sends the bytes as they are).
    write_private(&token_file, "pod-token-one");
    let full_uri = format!("{}/v1/credentials", agent.url());
    let token_path = token_file.display().to_string();
    let env = creds_env(
        &gh,
        &runner,
        &cw,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", &full_uri),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN_FILE", &token_path),
            ("CLOUDWATCH_HEARTBEAT_SEC", "1"),
        ],
    );
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    let tokens =
        || -> Vec<String> { agent.requests().iter().filter_map(|r| r.headers.get("authorization").cloned()).collect() };
    wait_for("a fetch with the first token", Duration::from_secs(20), || {
        tokens().iter().any(|t| t == "pod-token-one").then_some(())
    });
    // Rotated as the kubelet does: a new file moved over the old one.
    let next = runner.path().join("eks-pod-identity-token.new");
    write_private(&next, "pod-token-two");
    std::fs::rename(&next, &token_file).unwrap();
    wait_for("a fetch with the rotated token", Duration::from_secs(20), || {
        tokens().iter().any(|t| t == "pod-token-two").then_some(())
    });
    let seen = tokens();
    assert_eq!(seen.len(), agent.requests().len(), "a credentials request without the token: {seen:?}");
    let first_new = seen.iter().position(|t| t == "pod-token-two").unwrap();
    assert!(
        seen[first_new..].iter().all(|t| t == "pod-token-two"),
        "the old token was sent after the rotated one: {seen:?}"
    );
    assert!(seen.iter().all(|t| t == "pod-token-one" || t == "pod-token-two"), "{seen:?}");
    // The datapoints are signed with the keys the endpoint hands out, fetched anew.
    let keys = wait_for("PutMetricData signed with a second set of keys", Duration::from_secs(20), || {
        let k = signing_keys(&cw);
        (k.iter().any(|k| k != "ASIAPOD1") && k.iter().all(|k| k.starts_with("ASIAPOD"))).then_some(k)
    });
    assert!(keys.iter().all(|k| k.starts_with("ASIAPOD")), "{keys:?}");
    let sent = everything_sent(&cw);
    assert!(!sent.contains("pod-token-"), "the authorization token reached CloudWatch");
    assert!(!sent.contains("pod-secret-key-must-stay-secret"), "the secret key was sent in the clear");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", sup.log());
    let log = sup.log();
    assert!(!log.contains("pod-token-") && !log.contains("pod-secret-key"), "a secret is in the log:\n{log}");
}

/// IAM Roles Anywhere on on-prem hosts: a profile whose `credential_process` prints the keys.
/// Never: the process's secret key in the log or at CloudWatch.
#[test]
fn credential_process_keys_sign_the_metric() {
    let cw = fake_cloudwatch();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let marker = runner.path().join("credential-process-ran");
    let script = runner.path().join("credential-process.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\necho ran >> '{}'\n\
             echo '{{\"Version\": 1, \"AccessKeyId\": \"AKIDPROCESS\", \"SecretAccessKey\": \"process-secret-must-stay-secret\"}}'\n",
            marker.display()
        ),
    )
    .unwrap();
    std::fs::set_permissions(&script, std::os::unix::fs::PermissionsExt::from_mode(0o700)).unwrap();
    let config = runner.path().join("aws-config");
    write_private(&config, &format!("[profile onprem]\ncredential_process = {}\n", script.display()));
    let config_path = config.display().to_string();
    let mut env = creds_env(&gh, &runner, &cw, &[("AWS_PROFILE", "onprem")]);
    env.retain(|(k, _)| k != "AWS_CONFIG_FILE");
    env.push(("AWS_CONFIG_FILE".into(), config_path));
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    let key = wait_for("a PutMetricData signed by credential_process's keys", Duration::from_secs(20), || {
        signing_keys(&cw).first().cloned()
    });
    assert_eq!(key, "AKIDPROCESS");
    assert!(std::fs::read_to_string(&marker).is_ok_and(|m| m.contains("ran")), "the process did not run");
    assert!(!everything_sent(&cw).contains("process-secret-must-stay-secret"), "the secret key was sent in the clear");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", sup.log());
    assert!(!sup.log().contains("process-secret-must-stay-secret"), "the secret is in the log:\n{}", sup.log());
}

/// A full URI that is neither https, loopback, nor the ECS/EKS agents' link-local addresses is
/// refused by the SDK's allow-list before any connection: CloudWatch stays off with a WARN that
/// says why, and the runner is unaffected. Never: the authorization token in the log, keys
/// from anywhere else, a datapoint sent.
#[test]
fn container_full_uri_off_the_allow_list_is_refused() {
    let cw = fake_cloudwatch();
    let gh = FakeGithub::start();
    let runner = RunnerDir::new();
    let env = creds_env(
        &gh,
        &runner,
        &cw,
        &[
            ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://10.1.2.3/creds"),
            ("AWS_CONTAINER_AUTHORIZATION_TOKEN", "container-token-must-not-leave"),
        ],
    );
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", Duration::from_secs(30));
    sup.wait_log("CLOUDWATCH_ENABLED=true but CloudWatch metrics are off.", Duration::from_secs(20));
    let log = sup.log();
    let line = log.lines().find(|l| l.contains("CloudWatch metrics are off")).unwrap();
    assert!(line.contains("did not refer to an allowed IP address"), "not the allow-list's refusal: {line}");
    assert!(line.contains("http://10.1.2.3/creds"), "the refused URI is not named: {line}");
    assert!(!log.contains("Publishing the busy share"), "{log}");
    sup.signal(Signal::SIGTERM);
    assert_eq!(sup.wait_exit(Duration::from_secs(30)).code(), Some(0), "{}", sup.log());
    assert!(cw.requests().is_empty(), "a datapoint was sent: {}", everything_sent(&cw));
    assert!(!sup.log().contains("container-token-must-not-leave"), "the token is in the log:\n{}", sup.log());
}
