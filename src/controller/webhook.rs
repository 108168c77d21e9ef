//! GitHub's deliveries, as pure functions: the `X-Hub-Signature-256` check, the
//! `workflow_job` payload, and whether a pool serves a job's labels.

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
    if s.len() % 2 != 0 {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| u8::from_str_radix(s.get(i..i + 2)?, 16).ok()).collect()
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
                job_id: p.workflow_job.id,
                labels: p.workflow_job.labels,
                runner_name: p.workflow_job.runner_name.filter(|n| !n.is_empty()),
                repository: p.repository.full_name,
            }))
        }
        other => Ok(Delivery::Other(other.to_string())),
    }
}

/// The labels every runner has unless registered without them (config.sh's defaults).
pub const DEFAULT_LABELS: [&str; 3] = ["self-hosted", "linux", "x64"];

/// Whether runners with `pool` labels (plus the defaults) can take a job asking for `job`:
/// every job label is among them, case-insensitively. A job that does not ask for
/// `self-hosted` is for GitHub's hosted runners, and an empty label list (which GitHub never
/// sends for a self-hosted job) matches nothing: the seed started a runner for every job.
pub fn serves(pool: &[String], job: &[String]) -> bool {
    let has = |l: &str| {
        DEFAULT_LABELS.iter().any(|d| d.eq_ignore_ascii_case(l)) || pool.iter().any(|p| p.eq_ignore_ascii_case(l))
    };
    job.iter().any(|l| l.eq_ignore_ascii_case("self-hosted")) && job.iter().all(|l| has(l))
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
    fn labels_are_served_only_when_every_one_is_the_pool_s_or_a_default() {
        let pool = s(&["gpu", "docker"]);
        assert!(serves(&pool, &s(&["self-hosted", "gpu"])));
        assert!(serves(&pool, &s(&["Self-Hosted", "LINUX", "x64", "GPU", "docker"])));
        assert!(!serves(&pool, &s(&["self-hosted", "gpu", "arm64"])), "an unserved label");
        assert!(!serves(&pool, &s(&["ubuntu-latest"])), "a GitHub-hosted job");
        assert!(!serves(&pool, &s(&["gpu"])), "no self-hosted: not ours");
        assert!(!serves(&pool, &[]), "no labels at all");
        assert!(serves(&[], &s(&["self-hosted"])));
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
