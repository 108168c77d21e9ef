//! AWS, as far as autoscaling needs it: credentials through the SDK's own providers, the
//! region, Signature Version 4, CloudWatch `PutMetricData`, the ECS agent's task scale-in
//! protection and the instance metadata service (IMDSv2).
//!
//! Credentials come from aws-config's providers (profiles, `credential_process`, web identity,
//! ECS/EKS container credentials with the SDK's endpoint allow-list, IMDSv2), built only when
//! CloudWatch is to be published, over rustls on ring (no second crypto stack). The CloudWatch
//! call stays hand-built: `aws-sdk-cloudwatch` speaks only the newer Smithy RPC v2 CBOR
//! protocol, which moto (the CloudWatch the tests run against) does not serve, while CloudWatch
//! itself still serves the documented Query API, a SigV4-signed form POST (issue #20).

use std::fmt::Write as _;
use std::time::{Duration, SystemTime};

use reqwest::{Client, Method, StatusCode};
use serde::Deserialize;
use time::OffsetDateTime;
use tokio::sync::Mutex;

use aws_config::meta::credentials::CredentialsProviderChain;
use aws_credential_types::provider::{error::CredentialsError, ProvideCredentials};

use crate::config::Secret;

/// Where the standard chain's sources live; every one can be pointed elsewhere by env.
#[derive(Debug, Clone, Default)]
pub struct AwsSettings {
    /// `AWS_REGION`, else `AWS_DEFAULT_REGION`; `None` asks the ECS task metadata, then IMDS.
    pub region: Option<String>,
    /// `AWS_ACCESS_KEY_ID` + `AWS_SECRET_ACCESS_KEY` (+ `AWS_SESSION_TOKEN`).
    pub static_credentials: Option<Credentials>,
    /// `ECS_CONTAINER_METADATA_URI_V4`: the task's ARN names its region.
    pub ecs_metadata_url: Option<String>,
    /// `AWS_EC2_METADATA_SERVICE_ENDPOINT` (default `http://169.254.169.254`); `None` when
    /// `AWS_EC2_METADATA_DISABLED=true`.
    pub imds_url: Option<String>,
    /// `AWS_ENDPOINT_URL_CLOUDWATCH`, else `AWS_ENDPOINT_URL`; default
    /// `https://monitoring.<region>.amazonaws.com`.
    pub cloudwatch_url: Option<String>,
}

pub const DEFAULT_IMDS_URL: &str = "http://169.254.169.254";

#[derive(Debug, thiserror::Error)]
pub enum AwsError {
    #[error("request {method} {url} failed")]
    Transport {
        method: Method,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}: {message}")]
    Status { url: String, status: u16, code: String, message: String },
    #[error("no AWS credentials: none in AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY, no profile (AWS_PROFILE, AWS_CONFIG_FILE), no web identity (AWS_WEB_IDENTITY_TOKEN_FILE + AWS_ROLE_ARN), no container credentials (AWS_CONTAINER_CREDENTIALS_RELATIVE_URI or _FULL_URI), no instance profile on the instance metadata service")]
    NoCredentials,
    /// A provider was configured and failed: a refused `AWS_CONTAINER_CREDENTIALS_FULL_URI`,
    /// STS refusing the web identity token, a `credential_process` that failed.
    #[error("failed to load AWS credentials through the SDK's chain")]
    Credentials {
        #[source]
        source: CredentialsError,
    },
    #[error("failed to read {what} from {url}: {detail}")]
    Invalid { what: &'static str, url: String, detail: String },
}

impl AwsError {
    /// Worth another try later (throttling, 5xx, the network); a 4xx other than throttling or
    /// expired credentials will fail the same way again.
    pub fn is_transient(&self) -> bool {
        match self {
            AwsError::Transport { .. }
            | AwsError::NoCredentials
            | AwsError::Invalid { .. }
            | AwsError::Credentials { .. } => true,
            AwsError::Status { status, code, .. } => {
                *status >= 500
                    || *status == 429
                    || code.contains("Throttl")
                    || code.contains("Expired")
                    || code == "RequestTimeTooSkewed"
            }
        }
    }
}

/// One set of credentials; `expires` is when a temporary set stops working.
#[derive(Debug, Clone)]
pub struct Credentials {
    pub access_key_id: String,
    pub secret_access_key: Secret,
    pub session_token: Option<Secret>,
    pub expires: Option<SystemTime>,
}

impl Credentials {
    /// Still good for at least `margin`.
    fn fresh(&self, margin: Duration) -> bool {
        self.expires.is_none_or(|e| SystemTime::now() + margin < e)
    }
}

/// The instance metadata service, IMDSv2 only: a session token first (PUT), then reads with it.
pub struct Imds {
    base: String,
    http: Client,
    token: Mutex<Option<(String, tokio::time::Instant)>>,
}

const IMDS_TOKEN_TTL: Duration = Duration::from_secs(21600);

impl Imds {
    pub fn new(base: &str) -> Self {
        Self { base: base.trim_end_matches('/').to_string(), http: local_client(), token: Mutex::new(None) }
    }

    async fn token(&self) -> Result<String, AwsError> {
        let mut held = self.token.lock().await;
        if let Some((token, until)) = held.as_ref() {
            if tokio::time::Instant::now() < *until {
                return Ok(token.clone());
            }
        }
        let url = format!("{}/latest/api/token", self.base);
        let resp = self
            .http
            .put(&url)
            .header("X-aws-ec2-metadata-token-ttl-seconds", IMDS_TOKEN_TTL.as_secs().to_string())
            .send()
            .await
            .map_err(|source| AwsError::Transport { method: Method::PUT, url: url.clone(), source })?;
        let token = text_or_status(resp, &url).await?;
        // Renewed well before the service would refuse it.
        *held = Some((token.clone(), tokio::time::Instant::now() + IMDS_TOKEN_TTL / 2));
        Ok(token)
    }

    /// `GET /latest/<path>`; `Ok(None)` for a 404 (e.g. no spot notice, no instance profile).
    pub async fn get(&self, path: &str) -> Result<Option<String>, AwsError> {
        let token = self.token().await?;
        let url = format!("{}/latest/{path}", self.base);
        let resp = self
            .http
            .get(&url)
            .header("X-aws-ec2-metadata-token", &token)
            .send()
            .await
            .map_err(|source| AwsError::Transport { method: Method::GET, url: url.clone(), source })?;
        if resp.status() == StatusCode::NOT_FOUND {
            return Ok(None);
        }
        if resp.status() == StatusCode::UNAUTHORIZED {
            // The token expired or the service restarted: take a new one next time.
            *self.token.lock().await = None;
        }
        text_or_status(resp, &url).await.map(Some)
    }
}

/// A client for link-local and loopback services (IMDS, the ECS agent): never through a
/// proxy, and quick to give up, so that off AWS the probe costs about a second.
pub fn local_client() -> Client {
    Client::builder()
        .no_proxy()
        .connect_timeout(Duration::from_secs(1))
        .timeout(Duration::from_secs(3))
        .build()
        .unwrap_or_default()
}

async fn text_or_status(resp: reqwest::Response, url: &str) -> Result<String, AwsError> {
    let status = resp.status();
    let body = resp.text().await.map_err(|source| AwsError::Transport {
        method: Method::GET,
        url: url.to_string(),
        source,
    })?;
    if status.is_success() {
        Ok(body)
    } else {
        let (code, message) = error_of(&body);
        Err(AwsError::Status { url: url.to_string(), status: status.as_u16(), code, message })
    }
}

/// `<Code>` and `<Message>` of an AWS Query API error, or a JSON `message`; the first line of
/// anything else.
fn error_of(body: &str) -> (String, String) {
    let tag = |name: &str| {
        let open = format!("<{name}>");
        let start = body.find(&open)? + open.len();
        let end = body[start..].find("</")? + start;
        Some(body[start..end].trim().to_string())
    };
    let json = serde_json::from_str::<serde_json::Value>(body).ok();
    let code = tag("Code")
        .or_else(|| json.as_ref().and_then(|j| j.get("__type").or(j.get("code"))?.as_str().map(str::to_string)))
        .unwrap_or_default();
    let message = tag("Message")
        .or_else(|| json.as_ref().and_then(|j| j.get("message").or(j.get("Message"))?.as_str().map(str::to_string)))
        .unwrap_or_else(|| body.lines().next().unwrap_or("").chars().take(200).collect());
    (code, message)
}

/// Credentials from the standard chain, fetched on first use and refreshed five minutes
/// before they expire.
///
/// The order is the SDK's default chain: ci-runner's own keys (`AWS_ACCESS_KEY_ID` and
/// `AWS_SECRET_ACCESS_KEY`, from the variables or `SECRETS_DIR`, as config.rs read them), then
/// the SDK's providers: the shared config and credentials files (`AWS_PROFILE`, `source_profile`
/// and `role_arn`, `credential_process`), web identity (`AWS_WEB_IDENTITY_TOKEN_FILE` +
/// `AWS_ROLE_ARN`, through STS), the ECS/EKS container endpoint (the SDK's allow-list, its
/// token file re-read on every fetch), the instance profile over IMDSv2. The SDK's providers
/// read their own standard variables from the process environment: aws-config takes an
/// environment map only in its test build.
pub struct CredentialChain {
    static_credentials: Option<Credentials>,
    sdk: Option<CredentialsProviderChain>,
    cached: Mutex<Option<Credentials>>,
}

const REFRESH_MARGIN: Duration = Duration::from_secs(300);

impl CredentialChain {
    /// The chain for `region` (STS is regional); no I/O until the first [`get`](Self::get).
    /// `None` for `region` builds the static keys alone (unit tests).
    pub fn new(settings: &AwsSettings, region: Option<&str>) -> Self {
        Self {
            static_credentials: settings.static_credentials.clone(),
            sdk: region.map(|r| sdk_chain(settings, r)),
            cached: Mutex::new(None),
        }
    }

    pub async fn get(&self) -> Result<Credentials, AwsError> {
        let mut cached = self.cached.lock().await;
        if let Some(c) = cached.as_ref().filter(|c| c.fresh(REFRESH_MARGIN)) {
            return Ok(c.clone());
        }
        let fresh = self.fetch().await?;
        *cached = Some(fresh.clone());
        Ok(fresh)
    }

    /// Forgets the cached set (after the service called it expired).
    pub async fn invalidate(&self) {
        *self.cached.lock().await = None;
    }

    async fn fetch(&self) -> Result<Credentials, AwsError> {
        if let Some(c) = &self.static_credentials {
            return Ok(c.clone());
        }
        let Some(sdk) = &self.sdk else { return Err(AwsError::NoCredentials) };
        match sdk.provide_credentials().await {
            Ok(c) => Ok(Credentials {
                access_key_id: c.access_key_id().to_string(),
                secret_access_key: Secret::new(c.secret_access_key().to_string()),
                session_token: c.session_token().map(|t| Secret::new(t.to_string())),
                expires: c.expiry(),
            }),
            Err(CredentialsError::CredentialsNotLoaded(_)) => Err(AwsError::NoCredentials),
            Err(source) => Err(AwsError::Credentials { source }),
        }
    }
}

/// The SDK's providers after ci-runner's own keys, in the default chain's order; the instance
/// profile only where config.rs left the instance metadata on, at its endpoint.
fn sdk_chain(settings: &AwsSettings, region: &str) -> CredentialsProviderChain {
    use aws_config::{
        ecs::EcsCredentialsProvider, imds, profile::ProfileFileCredentialsProvider, provider_config::ProviderConfig,
        web_identity_token::WebIdentityTokenCredentialsProvider, Region,
    };
    use aws_smithy_http_client::tls::{rustls_provider::CryptoMode, Provider};
    // rustls on ring, as reqwest's, so the image carries one crypto stack (the SDK's default
    // client would add aws-lc).
    let http = aws_smithy_http_client::Builder::new().tls_provider(Provider::Rustls(CryptoMode::Ring)).build_https();
    let conf = ProviderConfig::default().with_http_client(http).with_region(Some(Region::new(region.to_string())));
    let chain = CredentialsProviderChain::first_try(
        "Profile",
        ProfileFileCredentialsProvider::builder().configure(&conf).build(),
    )
    .or_else("WebIdentityToken", WebIdentityTokenCredentialsProvider::builder().configure(&conf).build())
    .or_else("EcsContainer", EcsCredentialsProvider::builder().configure(&conf).build());
    let Some(url) = &settings.imds_url else { return chain };
    match imds::Client::builder().configure(&conf).endpoint(url) {
        Ok(client) => chain.or_else(
            "Ec2InstanceMetadata",
            imds::credentials::ImdsCredentialsProvider::builder().configure(&conf).imds_client(client.build()).build(),
        ),
        // config.rs checked the URL already; an endpoint the SDK still refuses means no
        // instance profile, said once at DEBUG.
        Err(e) => {
            tracing::debug!(error = %e, "The SDK refused the instance metadata endpoint.");
            chain
        }
    }
}

/// The region: the settings' (`AWS_REGION`), else the ECS task's ARN, else IMDS.
pub async fn discover_region(settings: &AwsSettings, imds: Option<&Imds>) -> Option<String> {
    if let Some(r) = &settings.region {
        return Some(r.clone());
    }
    if let Some(url) = &settings.ecs_metadata_url {
        let task = format!("{}/task", url.trim_end_matches('/'));
        if let Ok(resp) = local_client().get(&task).send().await {
            if let Ok(json) = resp.json::<serde_json::Value>().await {
                // arn:aws:ecs:<region>:<account>:task/<cluster>/<id>
                if let Some(region) = json["TaskARN"].as_str().and_then(|arn| arn.split(':').nth(3)) {
                    if !region.is_empty() {
                        return Some(region.to_string());
                    }
                }
            }
        }
    }
    let region = imds?.get("meta-data/placement/region").await.ok()??;
    let region = region.trim();
    (!region.is_empty()).then(|| region.to_string())
}

// ---- Signature Version 4 -------------------------------------------------------------------

fn hex(bytes: &[u8]) -> String {
    bytes.iter().fold(String::with_capacity(bytes.len() * 2), |mut s, b| {
        let _ = write!(s, "{b:02x}");
        s
    })
}

fn sha256_hex(data: &[u8]) -> String {
    hex(ring::digest::digest(&ring::digest::SHA256, data).as_ref())
}

fn hmac(key: &[u8], data: &str) -> Vec<u8> {
    let key = ring::hmac::Key::new(ring::hmac::HMAC_SHA256, key);
    ring::hmac::sign(&key, data.as_bytes()).as_ref().to_vec()
}

/// RFC 3986 percent-encoding as SigV4 wants it: everything but `A-Z a-z 0-9 - _ . ~`.
pub fn uri_encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len());
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || matches!(b, b'-' | b'_' | b'.' | b'~') {
            out.push(b as char);
        } else {
            let _ = write!(out, "%{b:02X}");
        }
    }
    out
}

/// What one request's signature covers.
pub struct SignedRequest<'a> {
    pub method: &'a str,
    pub host: &'a str,
    pub path: &'a str,
    /// Already canonical: encoded pairs sorted by name, joined with `&`.
    pub query: &'a str,
    /// Lowercase names; `host` and `x-amz-date` are added here.
    pub headers: &'a [(&'a str, &'a str)],
    pub body: &'a [u8],
    pub region: &'a str,
    pub service: &'a str,
    /// `YYYYMMDDTHHMMSSZ`.
    pub amz_date: &'a str,
}

/// The `Authorization` header's value for `req` (AWS Signature Version 4).
pub fn authorization(req: &SignedRequest<'_>, access_key_id: &str, secret: &str) -> String {
    let mut headers: Vec<(String, String)> = req
        .headers
        .iter()
        .map(|(k, v)| (k.to_ascii_lowercase(), v.trim().to_string()))
        .chain([("host".to_string(), req.host.to_string()), ("x-amz-date".to_string(), req.amz_date.to_string())])
        .collect();
    headers.sort();
    let signed_headers = headers.iter().map(|(k, _)| k.as_str()).collect::<Vec<_>>().join(";");
    let canonical_headers: String = headers.iter().map(|(k, v)| format!("{k}:{v}\n")).collect();
    let canonical = format!(
        "{}\n{}\n{}\n{canonical_headers}\n{signed_headers}\n{}",
        req.method,
        req.path,
        req.query,
        sha256_hex(req.body)
    );
    let date = &req.amz_date[..8];
    let scope = format!("{date}/{}/{}/aws4_request", req.region, req.service);
    let to_sign = format!("AWS4-HMAC-SHA256\n{}\n{scope}\n{}", req.amz_date, sha256_hex(canonical.as_bytes()));
    let key = [req.region, req.service, "aws4_request"]
        .iter()
        .fold(hmac(format!("AWS4{secret}").as_bytes(), date), |k, part| hmac(&k, part));
    let signature = hex(&hmac(&key, &to_sign));
    format!(
        "AWS4-HMAC-SHA256 Credential={access_key_id}/{scope}, SignedHeaders={signed_headers}, Signature={signature}"
    )
}

pub fn amz_date(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}{:02}{:02}T{:02}{:02}{:02}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second()
    )
}

fn iso8601(t: SystemTime) -> String {
    let t = OffsetDateTime::from(t);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        t.year(),
        u8::from(t.month()),
        t.day(),
        t.hour(),
        t.minute(),
        t.second(),
        t.millisecond()
    )
}

// ---- CloudWatch ----------------------------------------------------------------------------

/// One datapoint: `value` of `name` at `at`, with the publisher's dimensions.
#[derive(Debug, Clone, PartialEq)]
pub struct Datum {
    pub name: String,
    pub value: f64,
    pub unit: &'static str,
    pub at: SystemTime,
}

/// A CloudWatch client for one namespace and one set of dimensions.
pub struct CloudWatch {
    pub endpoint: String,
    pub region: String,
    pub namespace: String,
    pub dimensions: Vec<(String, String)>,
    /// 1 (high resolution) or 60.
    pub storage_resolution: u32,
    pub credentials: std::sync::Arc<CredentialChain>,
    pub http: Client,
}

/// The Query API takes at most this many datapoints per call.
pub const MAX_DATA_PER_CALL: usize = 1000;

impl CloudWatch {
    pub fn default_endpoint(region: &str) -> String {
        if region.starts_with("cn-") {
            format!("https://monitoring.{region}.amazonaws.com.cn")
        } else {
            format!("https://monitoring.{region}.amazonaws.com")
        }
    }

    /// The form body of `PutMetricData` for `data`, its pairs encoded and sorted.
    pub fn put_body(&self, data: &[Datum]) -> String {
        let mut pairs: Vec<(String, String)> = vec![
            ("Action".into(), "PutMetricData".into()),
            ("Version".into(), "2010-08-01".into()),
            ("Namespace".into(), self.namespace.clone()),
        ];
        for (i, d) in data.iter().enumerate() {
            let m = format!("MetricData.member.{}", i + 1);
            pairs.push((format!("{m}.MetricName"), d.name.clone()));
            pairs.push((format!("{m}.Value"), format!("{}", d.value)));
            pairs.push((format!("{m}.Unit"), d.unit.to_string()));
            pairs.push((format!("{m}.Timestamp"), iso8601(d.at)));
            pairs.push((format!("{m}.StorageResolution"), self.storage_resolution.to_string()));
            for (j, (name, value)) in self.dimensions.iter().enumerate() {
                let dim = format!("{m}.Dimensions.member.{}", j + 1);
                pairs.push((format!("{dim}.Name"), name.clone()));
                pairs.push((format!("{dim}.Value"), value.clone()));
            }
        }
        let mut encoded: Vec<(String, String)> = pairs.iter().map(|(k, v)| (uri_encode(k), uri_encode(v))).collect();
        encoded.sort();
        encoded.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join("&")
    }

    /// One signed `PutMetricData` call with up to [`MAX_DATA_PER_CALL`] datapoints.
    pub async fn put(&self, data: &[Datum]) -> Result<(), AwsError> {
        let creds = self.credentials.get().await?;
        let body = self.put_body(data);
        let url = reqwest::Url::parse(&self.endpoint).map_err(|e| AwsError::Invalid {
            what: "the CloudWatch endpoint",
            url: self.endpoint.clone(),
            detail: e.to_string(),
        })?;
        let host = match (url.host_str(), url.port()) {
            (Some(h), Some(p)) => format!("{h}:{p}"),
            (Some(h), None) => h.to_string(),
            (None, _) => String::new(),
        };
        let path = if url.path().is_empty() { "/" } else { url.path() };
        let date = amz_date(SystemTime::now());
        let content_type = "application/x-www-form-urlencoded; charset=utf-8";
        let token = creds.session_token.as_ref().map(|t| t.expose().to_string());
        let mut headers = vec![("content-type", content_type)];
        if let Some(t) = &token {
            headers.push(("x-amz-security-token", t.as_str()));
        }
        let auth = authorization(
            &SignedRequest {
                method: "POST",
                host: &host,
                path,
                query: "",
                headers: &headers,
                body: body.as_bytes(),
                region: &self.region,
                service: "monitoring",
                amz_date: &date,
            },
            &creds.access_key_id,
            creds.secret_access_key.expose(),
        );
        let mut req = self
            .http
            .post(url.clone())
            .header(reqwest::header::CONTENT_TYPE, content_type)
            .header("x-amz-date", &date)
            .header(reqwest::header::AUTHORIZATION, auth)
            .body(body);
        if let Some(t) = &token {
            req = req.header("x-amz-security-token", t);
        }
        let shown = self.endpoint.clone();
        let resp = req.send().await.map_err(|source| AwsError::Transport {
            method: Method::POST,
            url: shown.clone(),
            source,
        })?;
        match text_or_status(resp, &shown).await {
            Ok(_) => Ok(()),
            Err(e @ AwsError::Status { .. }) => {
                if matches!(&e, AwsError::Status { code, .. } if code.contains("Expired")) {
                    self.credentials.invalidate().await;
                }
                Err(e)
            }
            Err(e) => Err(e),
        }
    }
}

// ---- ECS task scale-in protection ----------------------------------------------------------

/// `PUT $ECS_AGENT_URI/task-protection/v1/state`: protects the task from scale-in for
/// `expires_min` minutes (1–2880), or lifts the protection.
pub async fn set_task_protection(
    http: &Client,
    agent_uri: &str,
    enabled: bool,
    expires_min: u32,
) -> Result<(), AwsError> {
    let url = format!("{}/task-protection/v1/state", agent_uri.trim_end_matches('/'));
    let body = if enabled {
        serde_json::json!({ "ProtectionEnabled": true, "ExpiresInMinutes": expires_min })
    } else {
        serde_json::json!({ "ProtectionEnabled": false })
    };
    let resp = http.put(&url).json(&body).send().await.map_err(|source| AwsError::Transport {
        method: Method::PUT,
        url: url.clone(),
        source,
    })?;
    let text = text_or_status(resp, &url).await?;
    // The agent answers 200 with a `failure` object when ECS refused.
    let json: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
    if let Some(f) = json.get("failure").filter(|f| !f.is_null()) {
        return Err(AwsError::Status {
            url,
            status: 200,
            code: f["Reason"].as_str().unwrap_or("failure").to_string(),
            message: f["Detail"].as_str().unwrap_or_default().to_string(),
        });
    }
    if let Some(e) = json.get("error").filter(|e| !e.is_null()) {
        return Err(AwsError::Status {
            url,
            status: 200,
            code: e["Code"].as_str().unwrap_or("error").to_string(),
            message: e["Message"].as_str().unwrap_or_default().to_string(),
        });
    }
    Ok(())
}

/// A spot interruption notice: `{"action": "terminate"|"stop"|"hibernate", "time": RFC 3339}`.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
pub struct SpotNotice {
    pub action: String,
    pub time: String,
}

impl SpotNotice {
    /// When the instance goes, if the notice says.
    pub fn at(&self) -> Option<SystemTime> {
        OffsetDateTime::parse(&self.time, &time::format_description::well_known::Rfc3339).ok().map(SystemTime::from)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The worked example of AWS's "Signature Version 4 signing process" documentation (IAM
    /// ListUsers), whose intermediate and final values are published.
    #[test]
    fn signature_matches_the_published_example() {
        let req = SignedRequest {
            method: "GET",
            host: "iam.amazonaws.com",
            path: "/",
            query: "Action=ListUsers&Version=2010-05-08",
            headers: &[("content-type", "application/x-www-form-urlencoded; charset=utf-8")],
            body: b"",
            region: "us-east-1",
            service: "iam",
            amz_date: "20150830T123600Z",
        };
        let auth = authorization(&req, "AKIDEXAMPLE", "wJalrXUtnFEMI/K7MDENG+bPxRfiCYEXAMPLEKEY");
        assert_eq!(
            auth,
            "AWS4-HMAC-SHA256 Credential=AKIDEXAMPLE/20150830/us-east-1/iam/aws4_request, \
             SignedHeaders=content-type;host;x-amz-date, \
             Signature=5d672d79c15b13162d9279b0855cfba6789a8edb4c82c400e06b5924a6f2b5d7"
        );
    }

    #[test]
    fn put_body_carries_every_field_encoded_and_sorted() {
        let cw = CloudWatch {
            endpoint: "http://127.0.0.1:1".into(),
            region: "us-east-1".into(),
            namespace: "ci-storage/metrics".into(),
            dimensions: vec![("GH_REPOSITORY".into(), "octo-org/octo-repo".into())],
            storage_resolution: 1,
            credentials: std::sync::Arc::new(CredentialChain::new(&AwsSettings::default(), None)),
            http: Client::new(),
        };
        let at = SystemTime::UNIX_EPOCH + Duration::from_millis(1_700_000_000_250);
        let body = cw.put_body(&[Datum { name: "ActiveRunnersPercent".into(), value: 100.0, unit: "None", at }]);
        for part in [
            "Action=PutMetricData",
            "Namespace=ci-storage%2Fmetrics",
            "MetricData.member.1.MetricName=ActiveRunnersPercent",
            "MetricData.member.1.Value=100",
            "MetricData.member.1.Unit=None",
            "MetricData.member.1.StorageResolution=1",
            "MetricData.member.1.Timestamp=2023-11-14T22%3A13%3A20.250Z",
            "MetricData.member.1.Dimensions.member.1.Name=GH_REPOSITORY",
            "MetricData.member.1.Dimensions.member.1.Value=octo-org%2Focto-repo",
            "Version=2010-08-01",
        ] {
            assert!(body.split('&').any(|p| p == part), "{part} missing from {body}");
        }
        let keys: Vec<&str> = body.split('&').map(|p| p.split('=').next().unwrap()).collect();
        let mut sorted = keys.clone();
        sorted.sort();
        assert_eq!(keys, sorted);
    }

    #[test]
    fn query_and_json_errors_are_read() {
        let xml = "<ErrorResponse><Error><Type>Sender</Type><Code>Throttling</Code><Message>Rate exceeded</Message></Error></ErrorResponse>";
        assert_eq!(error_of(xml), ("Throttling".into(), "Rate exceeded".into()));
        let e = AwsError::Status { url: "u".into(), status: 400, code: "Throttling".into(), message: String::new() };
        assert!(e.is_transient());
        let e = AwsError::Status { url: "u".into(), status: 403, code: "AccessDenied".into(), message: String::new() };
        assert!(!e.is_transient());
    }

    #[test]
    fn spot_notice_time_parses() {
        let n: SpotNotice = serde_json::from_str(r#"{"action":"terminate","time":"2026-11-23T14:00:00Z"}"#).unwrap();
        let at = n.at().unwrap();
        assert_eq!(amz_date(at), "20261123T140000Z");
    }
}
