//! GitHub App authentication (reference §8.7): the App's private key, the RS256 JWT that
//! proves the App, and how long an installation token may be used before it is renewed.
//!
//! The HTTP side (finding the installation, minting installation tokens, renewing them on a
//! 401) lives in [`crate::github`]; everything here is pure and unit-tested.

use std::fmt;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use base64::engine::general_purpose::{STANDARD, URL_SAFE_NO_PAD};
use base64::Engine as _;
use ring::signature::{RsaKeyPair, RSA_PKCS1_SHA256};

use crate::config::Secret;

/// `iat` is backdated by this much: GitHub's documented allowance for clock drift.
pub const JWT_BACKDATE: Duration = Duration::from_secs(60);
/// `exp` is this far ahead: GitHub refuses more than 10 minutes, and exactly 10 plus a little
/// clock skew already gives 401 (§8.7), so stay well inside.
pub const JWT_LIFETIME: Duration = Duration::from_secs(9 * 60);
/// An installation token is renewed this long before it expires, so that a call made with it
/// (a de-registration with its retries included) never runs into the expiry.
pub const REFRESH_EARLY: Duration = Duration::from_secs(5 * 60);

/// Why a private key was refused. The messages never quote the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("no PEM private key block found")]
    NotPem,
    #[error("the key is encrypted; GitHub issues unencrypted keys (decrypt it with `openssl rsa`)")]
    Encrypted,
    #[error("a PEM `{0}` block is not an RSA private key")]
    WrongKind(String),
    #[error("the PEM body is not valid base64")]
    Base64,
    #[error("ring refused the RSA key ({0})")]
    Rejected(String),
}

/// The App's RSA private key, parsed once at start. Debug prints `***`.
#[derive(Clone)]
pub struct AppKey(Arc<RsaKeyPair>);

impl fmt::Debug for AppKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("AppKey(***)")
    }
}

/// One PEM block: its label (`RSA PRIVATE KEY`), whether it carried encryption headers, and
/// its base64 body.
struct PemBlock {
    label: String,
    has_headers: bool,
    body: String,
}

fn pem_blocks(text: &str) -> Vec<PemBlock> {
    let mut out = Vec::new();
    let mut current: Option<PemBlock> = None;
    for line in text.lines().map(str::trim) {
        if let Some(label) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            current = Some(PemBlock { label: label.to_string(), has_headers: false, body: String::new() });
        } else if line.starts_with("-----END ") {
            out.extend(current.take());
        } else if let Some(block) = current.as_mut() {
            if line.contains(':') {
                // RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`, `DEK-Info: …`).
                block.has_headers = true;
            } else {
                block.body.push_str(line);
            }
        }
    }
    out
}

impl AppKey {
    /// Parses a PEM key: PKCS#1 (`BEGIN RSA PRIVATE KEY`, as GitHub issues them) or PKCS#8
    /// (`BEGIN PRIVATE KEY`). A key pasted into one line with literal `\n`s (common in
    /// `.env` files and task definitions) is accepted too.
    pub fn from_pem(text: &str) -> Result<Self, KeyError> {
        let unescaped;
        let text = if !text.contains('\n') && text.contains("\\n") {
            unescaped = text.replace("\\n", "\n");
            &unescaped
        } else {
            text
        };
        let blocks = pem_blocks(text);
        let Some(block) = blocks.iter().find(|b| b.label.ends_with("PRIVATE KEY")) else {
            return Err(blocks.first().map_or(KeyError::NotPem, |b| KeyError::WrongKind(b.label.clone())));
        };
        if block.has_headers || block.label == "ENCRYPTED PRIVATE KEY" {
            return Err(KeyError::Encrypted);
        }
        let der = STANDARD.decode(&block.body).map_err(|_| KeyError::Base64)?;
        let pair = match block.label.as_str() {
            "RSA PRIVATE KEY" => RsaKeyPair::from_der(&der),
            "PRIVATE KEY" => RsaKeyPair::from_pkcs8(&der),
            other => return Err(KeyError::WrongKind(other.to_string())),
        };
        pair.map(|p| AppKey(Arc::new(p))).map_err(|e| KeyError::Rejected(e.to_string()))
    }

    /// The JWT for `app_id` at `now`: `iat` backdated, `exp` inside GitHub's 10 minutes.
    pub fn jwt(&self, app_id: u64, now: SystemTime) -> Result<Secret, ring::error::Unspecified> {
        let now = now.duration_since(UNIX_EPOCH).unwrap_or_default().as_secs();
        // `iss` as a number: GHES up to 3.13 accepts only the numeric App ID (§8.7).
        let claims = format!(
            r#"{{"iat":{},"exp":{},"iss":{app_id}}}"#,
            now.saturating_sub(JWT_BACKDATE.as_secs()),
            now + JWT_LIFETIME.as_secs()
        );
        let input =
            format!("{}.{}", URL_SAFE_NO_PAD.encode(br#"{"alg":"RS256","typ":"JWT"}"#), URL_SAFE_NO_PAD.encode(claims));
        let mut signature = vec![0u8; self.0.public().modulus_len()];
        self.0.sign(&RSA_PKCS1_SHA256, &ring::rand::SystemRandom::new(), input.as_bytes(), &mut signature)?;
        Ok(Secret::new(format!("{input}.{}", URL_SAFE_NO_PAD.encode(signature))))
    }

    /// The public key (DER `RSAPublicKey`), for verifying in tests.
    #[cfg(test)]
    fn public_der(&self) -> Vec<u8> {
        use ring::signature::KeyPair as _;
        self.0.public_key().as_ref().to_vec()
    }
}

/// How long an installation token minted now may be used: until `REFRESH_EARLY` before it
/// expires. The lifetime is measured against the answer's `Date` when there is one, so a
/// container clock that is off (or a fake GitHub's clock) cannot make a stale token look
/// fresh; otherwise against the local clock. Zero when `expires_at` does not parse: the
/// token is then used once and minted anew for the next call.
pub fn usable_for(expires_at: &str, server_date: Option<&str>, local_now: SystemTime) -> Duration {
    use time::format_description::well_known::{Rfc2822, Rfc3339};
    use time::OffsetDateTime;
    let Ok(expires) = OffsetDateTime::parse(expires_at, &Rfc3339) else { return Duration::ZERO };
    let now = server_date
        .and_then(|d| OffsetDateTime::parse(d, &Rfc2822).ok())
        .unwrap_or_else(|| OffsetDateTime::from(local_now));
    let left = expires - now;
    Duration::try_from(left).unwrap_or_default().saturating_sub(REFRESH_EARLY)
}

/// A 2048-bit key from `openssl genrsa` (PKCS#1, as GitHub issues them) and the same key as
/// PKCS#8: generated once per test run, never committed. Without openssl the test fails unless
/// told to skip it (`None`; see `crate::prerequisite_missing`).
#[cfg(test)]
pub(crate) fn test_keys() -> Option<&'static (String, String)> {
    use std::process::{Command, Stdio};
    static KEYS: std::sync::OnceLock<Option<(String, String)>> = std::sync::OnceLock::new();
    let keys = KEYS.get_or_init(|| {
        let dir = tempfile::tempdir().unwrap();
        let (pkcs1, pkcs8) = (dir.path().join("k1.pem"), dir.path().join("k8.pem"));
        let run = |args: &[&std::ffi::OsStr]| {
            Command::new("openssl").args(args).stderr(Stdio::null()).status().is_ok_and(|s| s.success())
        };
        let ok =
            run(&["genrsa".as_ref(), "-traditional".as_ref(), "-out".as_ref(), pkcs1.as_os_str(), "2048".as_ref()])
                && run(&[
                    "pkcs8".as_ref(),
                    "-topk8".as_ref(),
                    "-nocrypt".as_ref(),
                    "-in".as_ref(),
                    pkcs1.as_os_str(),
                    "-out".as_ref(),
                    pkcs8.as_os_str(),
                ]);
        ok.then(|| (std::fs::read_to_string(pkcs1).unwrap(), std::fs::read_to_string(pkcs8).unwrap()))
    });
    if keys.is_none() {
        crate::prerequisite_missing("openssl", "install openssl (scripts/test installs it)");
    }
    keys.as_ref()
}

#[cfg(test)]
mod tests {
    use super::*;
    use ring::signature::{UnparsedPublicKey, RSA_PKCS1_2048_8192_SHA256};

    fn keys() -> Option<(String, String)> {
        test_keys().cloned()
    }

    fn decode_json(part: &str) -> serde_json::Value {
        serde_json::from_slice(&URL_SAFE_NO_PAD.decode(part).expect("base64url without padding")).unwrap()
    }

    #[test]
    fn jwt_has_the_documented_header_and_claims_and_verifies() {
        let Some((pkcs1, _)) = keys() else { return };
        assert!(pkcs1.starts_with("-----BEGIN RSA PRIVATE KEY-----"), "not PKCS#1: {}", &pkcs1[..40]);
        let key = AppKey::from_pem(&pkcs1).unwrap();
        let now = UNIX_EPOCH + Duration::from_secs(1_700_000_000);
        let jwt = key.jwt(123456, now).unwrap();
        let parts: Vec<&str> = jwt.expose().split('.').collect();
        assert_eq!(parts.len(), 3);
        assert!(parts.iter().all(|p| !p.contains(['=', '+', '/'])), "not base64url without padding: {parts:?}");
        assert_eq!(decode_json(parts[0]), serde_json::json!({"alg": "RS256", "typ": "JWT"}));
        assert_eq!(
            decode_json(parts[1]),
            serde_json::json!({"iat": 1_700_000_000 - 60, "exp": 1_700_000_000 + 540, "iss": 123456})
        );
        let signature = URL_SAFE_NO_PAD.decode(parts[2]).unwrap();
        let public = UnparsedPublicKey::new(&RSA_PKCS1_2048_8192_SHA256, key.public_der());
        let input = format!("{}.{}", parts[0], parts[1]);
        public.verify(input.as_bytes(), &signature).expect("the signature verifies with the public key");
        // And it is a signature of exactly that input.
        assert!(public.verify(format!("{input}x").as_bytes(), &signature).is_err());
    }

    #[test]
    fn pkcs1_and_pkcs8_parse_to_the_same_key() {
        let Some((pkcs1, pkcs8)) = keys() else { return };
        assert!(pkcs8.starts_with("-----BEGIN PRIVATE KEY-----"));
        let a = AppKey::from_pem(&pkcs1).unwrap();
        let b = AppKey::from_pem(&pkcs8).unwrap();
        assert_eq!(a.public_der(), b.public_der());
        // One line with literal \n, as in a .env file or a task definition.
        let c = AppKey::from_pem(&pkcs1.trim().replace('\n', "\\n")).unwrap();
        assert_eq!(a.public_der(), c.public_der());
        assert_eq!(format!("{a:?}"), "AppKey(***)");
    }

    #[test]
    fn bad_keys_are_refused_without_quoting_them() {
        assert_eq!(AppKey::from_pem("ghp_not_a_key").unwrap_err(), KeyError::NotPem);
        let public = "-----BEGIN PUBLIC KEY-----\nAAAA\n-----END PUBLIC KEY-----\n";
        assert_eq!(AppKey::from_pem(public).unwrap_err(), KeyError::WrongKind("PUBLIC KEY".into()));
        let enc = "-----BEGIN RSA PRIVATE KEY-----\nProc-Type: 4,ENCRYPTED\nDEK-Info: AES-128-CBC,00\n\nAAAA\n-----END RSA PRIVATE KEY-----\n";
        assert_eq!(AppKey::from_pem(enc).unwrap_err(), KeyError::Encrypted);
        let bad64 = "-----BEGIN RSA PRIVATE KEY-----\nnot*base64\n-----END RSA PRIVATE KEY-----\n";
        assert_eq!(AppKey::from_pem(bad64).unwrap_err(), KeyError::Base64);
        let garbage = "-----BEGIN RSA PRIVATE KEY-----\nc2VjcmV0LWJ5dGVz\n-----END RSA PRIVATE KEY-----\n";
        let e = AppKey::from_pem(garbage).unwrap_err();
        assert!(matches!(e, KeyError::Rejected(_)), "{e:?}");
        assert!(!e.to_string().contains("c2VjcmV0"), "{e}");
        let ssh = "-----BEGIN OPENSSH PRIVATE KEY-----\nAAAA\n-----END OPENSSH PRIVATE KEY-----\n";
        assert_eq!(AppKey::from_pem(ssh).unwrap_err(), KeyError::WrongKind("OPENSSH PRIVATE KEY".into()));
    }

    #[test]
    fn tokens_are_renewed_five_minutes_early_by_the_server_s_clock() {
        let local = UNIX_EPOCH + Duration::from_secs(1_700_000_000); // 2023-11-14T22:13:20Z
                                                                     // One hour left by the server's Date: used for 55 minutes.
        let d = usable_for("2023-11-14T23:13:20.000+00:00", Some("Tue, 14 Nov 2023 22:13:20 GMT"), local);
        assert_eq!(d, Duration::from_secs(55 * 60));
        // The server's clock is two hours ahead of ours: its Date wins, not our clock.
        let d = usable_for("2023-11-15T01:13:20Z", Some("Wed, 15 Nov 2023 00:13:20 GMT"), local);
        assert_eq!(d, Duration::from_secs(55 * 60));
        // No Date: the local clock; an offset in expires_at counts.
        let d = usable_for("2023-11-14T15:13:20.123-08:00", None, local);
        assert_eq!(d, Duration::from_millis(55 * 60 * 1000 + 123));
        // Less than five minutes left, already expired, or unreadable: not reusable.
        assert_eq!(usable_for("2023-11-14T22:17:20Z", None, local), Duration::ZERO);
        assert_eq!(usable_for("2023-11-14T22:00:00Z", None, local), Duration::ZERO);
        assert_eq!(usable_for("soon", None, local), Duration::ZERO);
    }
}
