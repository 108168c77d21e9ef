//! GitHub's deliveries, as pure functions: the `X-Hub-Signature-256` check, the
//! `workflow_job` payload, and whether a pool's runners can take a job (GitHub's label rule).

use serde::Deserialize;

use crate::config::Scope;

/// Why a delivery's signature was refused (all answered 401).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum SignatureError {
    #[error("verify the delivery: no X-Hub-Signature-256 header")]
    Missing,
    #[error("verify the delivery: X-Hub-Signature-256 is not sha256=<64 hex digits>")]
    Malformed,
    #[error("verify the delivery: X-Hub-Signature-256 does not match the payload and the webhook secret")]
    Mismatch,
}

/// Checks `sha256=<hex HMAC-SHA256(secret, body)>` in constant time (`ring::hmac::verify`).
pub fn verify(secret: &[u8], body: &[u8], header: Option<&str>) -> Result<(), SignatureError> {
    let header = header.ok_or(SignatureError::Missing)?;
    let hex = header.trim().strip_prefix("sha256=").ok_or(SignatureError::Malformed)?;
    let tag = decode_hex(hex).filter(|t| t.len() == 32).ok_or(SignatureError::Malformed)?;
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    ring::hmac::verify(&key, body, &tag).map_err(|_| SignatureError::Mismatch)
}

/// `sha256=<hex>`: what GitHub sends, for tests and the fake.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, secret);
    let tag = ring::hmac::sign(&key, body);
    let hex: String = tag.as_ref().iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

fn decode_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
}

/// Why a delivery's body could not be read as a payload (answered 415 or 400).
#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum BodyError {
    #[error(
        "read the delivery: Content-Type {0:?} is neither application/json nor application/x-www-form-urlencoded; \
         set the webhook's \"Content type\" to application/json"
    )]
    ContentType(String),
    #[error("read the form-encoded delivery: no payload=<JSON> field (the webhook's \"Content type\" is application/x-www-form-urlencoded)")]
    NoPayload,
}

/// The JSON payload of a delivery, by its `Content-Type`: the webhook's "Content type"
/// setting is `application/json` (the body is the payload) or, GitHub's default,
/// `application/x-www-form-urlencoded` (the body is `payload=<the JSON, percent-encoded>`).
/// The signature is over the raw body either way, so this comes after [`verify`]. No
/// `Content-Type` at all is read as JSON.
pub fn payload(content_type: Option<&str>, body: &[u8]) -> Result<Vec<u8>, BodyError> {
    let media = content_type.map(|c| c.split(';').next().unwrap_or("").trim().to_ascii_lowercase());
    match media.as_deref() {
        None | Some("") | Some("application/json") => Ok(body.to_vec()),
        Some("application/x-www-form-urlencoded") => body
            .split(|b| *b == b'&')
            .find_map(|pair| pair.strip_prefix(b"payload="))
            .map(form_decode)
            .ok_or(BodyError::NoPayload),
        Some(_) => Err(BodyError::ContentType(content_type.unwrap_or_default().to_string())),
    }
}

/// `application/x-www-form-urlencoded` decoding: `+` is a space, `%XX` a byte; a `%` not
/// followed by two hex digits is kept as it is (as browsers and the `url` crate do).
fn form_decode(v: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(v.len());
    let mut i = 0;
    while i < v.len() {
        match v[i] {
            b'+' => out.push(b' '),
            b'%' => match v.get(i + 1..i + 3).and_then(|h| u8::from_str_radix(std::str::from_utf8(h).ok()?, 16).ok()) {
                Some(b) => {
                    out.push(b);
                    i += 2;
                }
                None => out.push(b'%'),
            },
            b => out.push(b),
        }
        i += 1;
    }
    out
}

/// What a `workflow_job` delivery says happened.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum JobAction {
    Queued,
    InProgress,
    Completed,
    /// `waiting` (for an environment's approval) and anything newer.
    Other,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JobEvent {
    pub action: JobAction,
    /// `workflow_job.status`: a `queued` delivery may say `waiting` (held for an
    /// environment's approval), and then no runner can take it yet.
    pub status: String,
    pub job_id: u64,
    pub labels: Vec<String>,
    /// The runner that took the job (`in_progress`, `completed`); none for a job cancelled
    /// while queued.
    pub runner_name: Option<String>,
    /// `owner/repo` of the job's repository.
    pub repository: String,
}

/// One delivery, by its `X-GitHub-Event`.
#[derive(Debug, PartialEq, Eq)]
pub enum Delivery {
    Ping,
    Job(JobEvent),
    /// Another event: acknowledged and ignored.
    Other(String),
}

#[derive(Debug, thiserror::Error)]
#[error("parse the {event} payload")]
pub struct PayloadError {
    pub event: String,
    #[source]
    pub source: serde_json::Error,
}

#[derive(Deserialize)]
struct Payload {
    action: String,
    workflow_job: WorkflowJob,
    repository: Repository,
}

#[derive(Deserialize)]
struct WorkflowJob {
    id: u64,
    #[serde(default)]
    status: Option<String>,
    #[serde(default)]
    labels: Vec<String>,
    #[serde(default)]
    runner_name: Option<String>,
}

#[derive(Deserialize)]
struct Repository {
    full_name: String,
}

pub fn parse(event: Option<&str>, body: &[u8]) -> Result<Delivery, PayloadError> {
    match event.unwrap_or("") {
        "ping" => Ok(Delivery::Ping),
        "workflow_job" => {
            let p: Payload =
                serde_json::from_slice(body).map_err(|source| PayloadError { event: "workflow_job".into(), source })?;
            let action = match p.action.as_str() {
                "queued" => JobAction::Queued,
                "in_progress" => JobAction::InProgress,
                "completed" => JobAction::Completed,
                _ => JobAction::Other,
            };
            Ok(Delivery::Job(JobEvent {
                action,
                status: p.workflow_job.status.unwrap_or_else(|| p.action.clone()),
                job_id: p.workflow_job.id,
                labels: p.workflow_job.labels,
                runner_name: p.workflow_job.runner_name.filter(|n| !n.is_empty()),
                repository: p.repository.full_name,
            }))
        }
        other => Ok(Delivery::Other(other.to_string())),
    }
}

/// GitHub's architecture label for the Docker engine's `Architecture` (`docker info`: the
/// host's `uname -m`, e.g. `x86_64`, `aarch64`), as the runner names it when it registers its
/// built-in labels (`X64`, `ARM64`, `ARM`, `X86`). Another architecture keeps its own name,
/// upper-cased, and is logged by the caller.
pub fn arch_label(engine_arch: &str) -> Result<&'static str, String> {
    match engine_arch.trim().to_ascii_lowercase().as_str() {
        "x86_64" | "amd64" | "x64" => Ok("X64"),
        "aarch64" | "arm64" => Ok("ARM64"),
        "armv7l" | "armv6l" | "armhf" | "arm" => Ok("ARM"),
        "i386" | "i686" | "x86" => Ok("X86"),
        other => Err(other.to_ascii_uppercase()),
    }
}

/// A pool's runners' labels: the built-in ones every runner registers with (`self-hosted`,
/// the OS, the architecture of the engine's host, where its containers run), then the pool's
/// own. The same list is registered (the JIT configuration's `labels`) and matched against
/// jobs, so a runner is never started for a job it cannot take.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RunnerLabels(Vec<String>);

impl JobEvent {
    /// A job held for an environment's approval (`status: waiting`): GitHub sends it to no
    /// runner until it is approved, and then sends `queued` again with `status: queued`.
    pub fn held(&self) -> bool {
        self.status.eq_ignore_ascii_case("waiting")
    }
}

impl RunnerLabels {
    pub fn new(custom: &[String], arch: &str) -> Self {
        let mut all: Vec<String> = vec!["self-hosted".into(), "Linux".into(), arch.into()];
        for l in custom {
            if !all.iter().any(|x| x.eq_ignore_ascii_case(l)) {
                all.push(l.clone());
            }
        }
        Self(all)
    }

    /// What a runner of the pool registers with.
    pub fn registered(&self) -> &[String] {
        &self.0
    }

    /// Whether a runner with these labels can take a job whose `runs-on` is `job`: GitHub's
    /// rule is that every label of the job is among the runner's, case-insensitively. The
    /// runner's built-in labels count like any other, so `self-hosted` is not required:
    /// `runs-on: [gpu]` goes to a runner labelled `gpu`, and a pool labelled `ubuntu-latest`
    /// takes `runs-on: ubuntu-latest` (actions/runner docs/adrs/0397-runner-registration-labels.md,
    /// line 50: registering GitHub-hosted labels like `ubuntu-latest` "is not considered an
    /// error", so that admins route such jobs to their own runners). A job for GitHub's hosted
    /// runners is therefore recognised by a label the pool does not have. An empty list (which
    /// GitHub never sends: `runs-on` is required) matches nothing.
    pub fn serves(&self, job: &[String]) -> bool {
        !job.is_empty() && job.iter().all(|l| self.0.iter().any(|r| r.eq_ignore_ascii_case(l.trim())))
    }
}

/// Whether a job of `repository` (`owner/repo`) belongs to `scope`.
pub fn in_scope(scope: &Scope, repository: &str) -> bool {
    match scope {
        Scope::Repository { owner, repo } => repository.eq_ignore_ascii_case(&format!("{owner}/{repo}")),
        Scope::Organization(org) => repository.split('/').next().is_some_and(|o| o.eq_ignore_ascii_case(org)),
        Scope::Enterprise(_) => true,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(v: &[&str]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }

    #[test]
    fn a_signature_made_with_the_secret_passes_and_any_other_is_refused() {
        let body = br#"{"action":"queued"}"#;
        let good = sign(b"topsecret", body);
        assert_eq!(verify(b"topsecret", body, Some(&good)), Ok(()));
        assert_eq!(verify(b"other", body, Some(&good)), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"topsecret", b"{}", Some(&good)), Err(SignatureError::Mismatch));
        assert_eq!(verify(b"topsecret", body, None), Err(SignatureError::Missing));
        assert_eq!(verify(b"topsecret", body, Some("sha1=abcd")), Err(SignatureError::Malformed));
        assert_eq!(verify(b"topsecret", body, Some("sha256=zz")), Err(SignatureError::Malformed));
        let short = &good[..good.len() - 2];
        assert_eq!(verify(b"topsecret", body, Some(short)), Err(SignatureError::Malformed));
    }

    #[test]
    fn github_s_documented_example_signature_verifies() {
        // docs.github.com "Validating webhook deliveries", test values.
        let sig = "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";
        assert_eq!(verify(b"It's a Secret to Everybody", b"Hello, World!", Some(sig)), Ok(()));
    }

    #[test]
    fn the_engine_s_architecture_maps_to_github_s_label() {
        for (engine, label) in [
            ("x86_64", Ok("X64")),
            ("amd64", Ok("X64")),
            ("aarch64", Ok("ARM64")),
            ("arm64", Ok("ARM64")),
            ("armv7l", Ok("ARM")),
            ("i686", Ok("X86")),
            ("s390x", Err("S390X".to_string())),
        ] {
            assert_eq!(arch_label(engine), label, "{engine}");
        }
    }

    #[test]
    fn registered_labels_are_the_built_in_ones_then_the_pool_s_without_duplicates() {
        let l = RunnerLabels::new(&s(&["gpu", "linux", "ARM64"]), "ARM64");
        assert_eq!(l.registered(), ["self-hosted", "Linux", "ARM64", "gpu"]);
    }

    /// GitHub's rule, from its documented examples: every `runs-on` label among the runner's
    /// (built-in `self-hosted`, OS, architecture, plus custom), case-insensitively; `self-hosted`
    /// itself not required. actions/runner docs/adrs/0397-runner-registration-labels.md:
    /// lines 20-26 (`--labels mylabel` → `runs-on: [self-hosted, mylabel]`), lines 31-37
    /// (`--labels mylabel,anotherlabel` → `runs-on: [self-hosted, mylabel, anotherlabel]`),
    /// line 50 (a runner registered with `ubuntu-latest` takes `runs-on: ubuntu-latest`).
    #[test]
    fn jobs_are_served_when_every_runs_on_label_is_the_runner_s() {
        let x64 = |custom: &[&str]| RunnerLabels::new(&s(custom), "X64");
        let cases: &[(&[&str], &[&str], bool, &str)] = &[
            // ADR 0397, lines 20-26 and 31-37.
            (&["mylabel"], &["self-hosted", "mylabel"], true, "one custom label"),
            (&["mylabel", "anotherlabel"], &["self-hosted", "mylabel", "anotherlabel"], true, "two custom labels"),
            (&["mylabel"], &["self-hosted", "mylabel", "anotherlabel"], false, "a label the runner lacks"),
            // ADR 0397, line 50: GitHub-hosted labels registered on purpose.
            (&["ubuntu-latest"], &["ubuntu-latest"], true, "ubuntu-latest registered"),
            (&["gpu"], &["ubuntu-latest"], false, "a GitHub-hosted job"),
            (&["gpu"], &["windows-latest"], false, "a GitHub-hosted job"),
            // self-hosted is a label like any other: not required.
            (&["gpu"], &["gpu"], true, "runs-on: [gpu]"),
            (&["gpu"], &["self-hosted", "linux", "gpu"], true, "runs-on: [self-hosted, linux, gpu]"),
            (&[], &["self-hosted"], true, "any runner"),
            (&[], &["linux"], true, "the OS alone"),
            (&[], &["self-hosted", "linux", "x64"], true, "the built-in labels, in any case"),
            (&["gpu", "docker"], &["Self-Hosted", "LINUX", "x64", "GPU", "docker"], true, "case-insensitive"),
            // The architecture is the engine host's.
            (&["gpu"], &["self-hosted", "ARM64"], false, "another architecture"),
            (&[], &["self-hosted", "windows"], false, "another OS"),
            (&[], &["macOS"], false, "another OS"),
            (&["gpu"], &[], false, "no labels at all"),
        ];
        for (custom, job, want, why) in cases {
            assert_eq!(x64(custom).serves(&s(job)), *want, "{why}: pool {custom:?}, runs-on {job:?}");
        }
        let arm = RunnerLabels::new(&s(&["gpu"]), "ARM64");
        assert!(arm.serves(&s(&["self-hosted", "arm64", "gpu"])));
        assert!(!arm.serves(&s(&["self-hosted", "x64", "gpu"])), "an x64 job on an arm64 host");
    }

    #[test]
    fn json_and_form_encoded_bodies_give_the_payload_and_other_content_types_name_the_setting() {
        let json = br#"{"action":"queued","n":"a b&c"}"#;
        assert_eq!(payload(Some("application/json"), json).unwrap(), json);
        assert_eq!(payload(Some("application/json; charset=utf-8"), json).unwrap(), json);
        assert_eq!(payload(None, json).unwrap(), json);
        // What GitHub sends with the default "Content type": payload=<percent-encoded JSON>.
        let form = b"payload=%7B%22action%22%3A%22queued%22%2C%22n%22%3A%22a+b%26c%22%7D";
        assert_eq!(payload(Some("application/x-www-form-urlencoded"), form).unwrap(), json);
        assert_eq!(payload(Some("Application/X-WWW-Form-Urlencoded"), b"x=1&payload=%7B%7D").unwrap(), b"{}");
        assert_eq!(form_decode(b"100%+sure%2"), b"100% sure%2");
        assert_eq!(payload(Some("application/x-www-form-urlencoded"), b"x=1"), Err(BodyError::NoPayload));
        let err = payload(Some("text/plain"), json).unwrap_err();
        assert!(err.to_string().contains("\"Content type\" to application/json"), "{err}");
    }

    #[test]
    fn a_queued_job_waiting_for_approval_is_held() {
        let body = |status: &str| {
            format!(
                r#"{{"action":"queued","workflow_job":{{"id":7,"status":"{status}","labels":["x"]}},"repository":{{"full_name":"o/r"}}}}"#
            )
        };
        let job = |status| match parse(Some("workflow_job"), body(status).as_bytes()).unwrap() {
            Delivery::Job(j) => j,
            other => panic!("{other:?}"),
        };
        assert!(job("waiting").held());
        assert!(!job("queued").held());
        assert_eq!(job("waiting").action, JobAction::Queued);
    }

    #[test]
    fn jobs_belong_to_their_repository_or_its_organization() {
        let repo = Scope::Repository { owner: "Octo".into(), repo: "Repo".into() };
        assert!(in_scope(&repo, "octo/repo"));
        assert!(!in_scope(&repo, "octo/other"));
        let org = Scope::Organization("octo".into());
        assert!(in_scope(&org, "Octo/anything"));
        assert!(!in_scope(&org, "evil/anything"));
    }

    #[test]
    fn workflow_job_payloads_parse_and_other_events_are_named() {
        let body = br#"{"action":"completed","workflow_job":{"id":7,"labels":["self-hosted"],"runner_name":"r-1"},
                        "repository":{"full_name":"o/r"}}"#;
        let Delivery::Job(j) = parse(Some("workflow_job"), body).unwrap() else { panic!() };
        assert_eq!((j.action, j.job_id, j.runner_name.as_deref()), (JobAction::Completed, 7, Some("r-1")));
        assert_eq!(parse(Some("push"), b"{}").unwrap(), Delivery::Other("push".into()));
        assert_eq!(parse(Some("ping"), b"{}").unwrap(), Delivery::Ping);
        assert!(parse(Some("workflow_job"), b"{").is_err());
    }
}
