//! The runner updated at boot (`RUNNER_UPDATE_AT_BOOT`, issue #17), as the original image's
//! guest hook 03: GitHub refuses runners that fall behind, and a fleet on a month-old image
//! would stop taking jobs until someone rebuilt it.
//!
//! Once per container, after the root hooks and before any runner is prepared or registered:
//! 1. Due? The install is due when its `.updated_at` is missing or older than
//!    `RUNNER_UPDATE_AFTER_DAYS` (the original's `find -mtime +21`), or when
//!    `bin/Runner.Listener --version` is below `RUNNER_MIN_VERSION`. Otherwise no request is made.
//! 2. The latest version from the web's redirect (`HEAD <RUNNER_RELEASES_URL>/latest`, the
//!    text after `/tag/v` in `location:`), as the original, which spares the API's rate limit.
//! 3. The tarball's SHA-256: from the cache when the cache is one the runner user cannot
//!    write, else from the release (one REST call, see [`expected_sha256`]).
//! 4. The tarball from `RUNNER_CACHE_DIR` when it still hashes to that, else downloaded
//!    (`<RUNNER_RELEASES_URL>/download/v<ver>/actions-runner-linux-<arch>-<ver>.tar.gz`) to a
//!    temporary file, hashed while it streams, renamed into the cache only when it matches.
//! 5. Unpacked by `tar` as `RUNNER_USER` into `RUNNER_DIR/.ci-runner-update/new`, checked
//!    (`config.sh`, `run.sh`, and `bin/Runner.Listener --version` saying the new version),
//!    then swapped in entry by entry behind a journal ([`swap`]): a boot that dies mid-swap
//!    finishes it at the next boot, and a half-unpacked tarball never replaces anything.
//!
//! Any failure, or `RUNNER_UPDATE_TIMEOUT_SEC` passing, is a WARN and the installed runner is
//! used; the boot never stops for the update (a signal meanwhile does stop it, see
//! `runners.rs`). Every request has its own timeout as well ([`REQUEST_TIMEOUT`]).

use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant, SystemTime};

use tokio::io::AsyncWriteExt;
use tracing::{info, warn};

use crate::config::{Config, Credentials, UpdateSettings};
use crate::error::chain;
use crate::runner::{self, RunnerVersion};

/// The connect timeout of every request.
pub const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// The whole-request timeout of the redirect and the release's JSON; the download is bound
/// by [`STALL_TIMEOUT`] between chunks and by `RUNNER_UPDATE_TIMEOUT_SEC` overall.
pub const REQUEST_TIMEOUT: Duration = Duration::from_secs(30);
/// The longest wait for the next chunk of the tarball.
pub const STALL_TIMEOUT: Duration = Duration::from_secs(30);
/// How long `bin/Runner.Listener --version` may take.
const VERSION_TIMEOUT: Duration = Duration::from_secs(15);
/// Where the tarball is unpacked and the swap's journal kept, inside `RUNNER_DIR` (the same
/// filesystem, for `rename`; a dot name, so runner roots never link it).
pub const STAGING: &str = ".ci-runner-update";
/// The install's age stamp, as the original's hook 03.
pub const UPDATED_AT: &str = ".updated_at";

/// What the update did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Not due: nothing was asked of the network.
    NotDue,
    /// Due, but the installed runner is already the latest.
    Latest(RunnerVersion),
    /// Swapped in: the names of the install's entries that changed (runner roots made from
    /// the install must be made again).
    Updated { from: Option<RunnerVersion>, to: RunnerVersion, entries: Vec<String> },
    /// It failed; the installed runner is used (the WARN is logged).
    FellBack,
}

#[derive(Debug, thiserror::Error)]
pub enum UpdateError {
    #[error("failed to reach {url}")]
    Http {
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{url} answered {status}")]
    Status { url: String, status: u16 },
    #[error("{url} did not redirect to a /tag/v<x.y.z> (location: {location:?})")]
    NoVersion { url: String, location: String },
    #[error("the release v{version} publishes no SHA-256 for {asset} (asset digest or release notes)")]
    NoChecksum { version: RunnerVersion, asset: String },
    #[error("the release v{version} publishes two different SHA-256 for {asset}")]
    ChecksumConflict { version: RunnerVersion, asset: String },
    #[error("{url} served a tarball whose SHA-256 is {got}, not the published {expected}")]
    BadChecksum { url: String, expected: String, got: String },
    #[error("no runner release for this architecture ({0})")]
    Arch(&'static str),
    #[error("failed to {what} {}", path.display())]
    Io {
        what: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("tar failed on {} ({status}): {stderr}", path.display())]
    Tar { path: PathBuf, status: String, stderr: String },
    #[error("the unpacked runner is not usable: {0}")]
    Unpacked(String),
    #[error("{url} sent nothing for 30 s (STALL_TIMEOUT)")]
    Stalled { url: String },
    #[error("the update took longer than RUNNER_UPDATE_TIMEOUT_SEC ({0:?})")]
    Timeout(Duration),
}

fn io_err(what: &'static str, path: &Path) -> impl FnOnce(io::Error) -> UpdateError {
    let path = path.to_path_buf();
    move |source| UpdateError::Io { what, path, source }
}

/// Why the install is due, or `None` when it is new enough.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Due {
    /// `.updated_at` is missing.
    NeverUpdated,
    /// `.updated_at` is this old.
    Old(Duration),
    /// Below `RUNNER_MIN_VERSION`.
    BelowMinimum(RunnerVersion),
}

impl std::fmt::Display for Due {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Due::NeverUpdated => write!(f, "{UPDATED_AT} is missing"),
            Due::Old(age) => write!(f, "updated {} days ago", age.as_secs() / 86_400),
            Due::BelowMinimum(v) => write!(f, "version {v} is below RUNNER_MIN_VERSION"),
        }
    }
}

/// The decision, apart from I/O: `age` of `.updated_at` (`None`: missing), the installed
/// version (`None`: unknown, which decides nothing), the threshold and GitHub's minimum.
pub fn due(
    age: Option<Duration>,
    installed: Option<RunnerVersion>,
    after: Duration,
    min: RunnerVersion,
) -> Option<Due> {
    if let Some(v) = installed.filter(|v| *v < min) {
        return Some(Due::BelowMinimum(v));
    }
    match age {
        None => Some(Due::NeverUpdated),
        // `find -mtime +21`: strictly older than the threshold.
        Some(age) if age > after => Some(Due::Old(age)),
        Some(_) => None,
    }
}

/// The version in a `/releases/latest` redirect: the text after the last `/tag/v`, when it
/// is `x.y.z` (anything else, e.g. a login page, is no version).
pub fn version_from_location(location: &str) -> Option<RunnerVersion> {
    let (_, tag) = location.rsplit_once("/tag/v")?;
    let tag = tag.split(['?', '#']).next()?;
    RunnerVersion::parse(tag).filter(|_| !tag.starts_with('v'))
}

/// The release's asset for this machine: `actions-runner-linux-<x64|arm64|arm>-<ver>.tar.gz`.
pub fn asset_name(arch: &'static str, version: RunnerVersion) -> Result<String, UpdateError> {
    let arch = match arch {
        "x86_64" => "x64",
        "aarch64" => "arm64",
        "arm" => "arm",
        other => return Err(UpdateError::Arch(other)),
    };
    Ok(format!("actions-runner-linux-{arch}-{version}.tar.gz"))
}

fn is_sha256(s: &str) -> bool {
    s.len() == 64 && s.bytes().all(|b| b.is_ascii_hexdigit())
}

/// The published SHA-256 of `asset` in a release's JSON (`GET /repos/actions/runner/releases/tags/v<ver>`):
/// the asset's `digest` (`"sha256:<hex>"`, which GitHub computes for every uploaded asset),
/// and the release notes' marker: actions/runner's notes template, `releaseNote.md`, has in its
/// section "SHA-256 Checksums" the line
/// `- actions-runner-linux-x64-<RUNNER_VERSION>.tar.gz <!-- BEGIN SHA linux-x64 --><LINUX_X64_SHA><!-- END SHA linux-x64 -->`
/// (about line 136 of the notes as of v2.309.0, the first of the Linux ones after the Windows
/// and macOS lines; the same markers for `linux-arm64` and `linux-arm`), whose placeholder a
/// published release's body carries as the 64 hex digits. Either is enough; both must agree when both are there.
pub fn published_sha256(release: &serde_json::Value, asset: &str) -> Published {
    let digest = release["assets"]
        .as_array()
        .into_iter()
        .flatten()
        .find(|a| a["name"] == asset)
        .and_then(|a| a["digest"].as_str())
        .and_then(|d| d.strip_prefix("sha256:"))
        .filter(|d| is_sha256(d))
        .map(str::to_ascii_lowercase);
    let platform = asset.strip_prefix("actions-runner-").and_then(|a| a.rsplit_once('-')).map(|(p, _)| p);
    let noted = platform.and_then(|p| {
        let body = release["body"].as_str()?;
        let begin = format!("<!-- BEGIN SHA {p} -->");
        let end = format!("<!-- END SHA {p} -->");
        let (_, rest) = body.split_once(&begin)?;
        let (sha, _) = rest.split_once(&end)?;
        let sha = sha.trim();
        is_sha256(sha).then(|| sha.to_ascii_lowercase())
    });
    match (digest, noted) {
        (Some(a), Some(b)) if a != b => Published::Conflict,
        (a, b) => a.or(b).map_or(Published::Missing, Published::Sha256),
    }
}

/// What a release publishes for an asset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Published {
    Sha256(String),
    Missing,
    /// The digest and the notes disagree: neither is believed.
    Conflict,
}

/// Runs the update; never fails the boot: a failure is logged as a WARN and gives
/// [`Outcome::FellBack`].
pub async fn at_boot(cfg: &Config, s: &UpdateSettings) -> Outcome {
    match tokio::time::timeout(s.timeout, update(cfg, s)).await.unwrap_or(Err(UpdateError::Timeout(s.timeout))) {
        Ok(o) => o,
        Err(e) => {
            warn!(error = %chain(&e), runner_dir = %cfg.runner_dir.display(), "Failed to update the runner at boot; the installed runner is used.");
            Outcome::FellBack
        }
    }
}

async fn update(cfg: &Config, s: &UpdateSettings) -> Result<Outcome, UpdateError> {
    let dir = &cfg.runner_dir;
    // A boot that died mid-swap: finished first, so the install is whole whatever follows.
    recover(dir)?;
    let age = std::fs::metadata(dir.join(UPDATED_AT))
        .and_then(|m| m.modified())
        .ok()
        .map(|t| SystemTime::now().duration_since(t).unwrap_or_default());
    let installed = runner::installed_version(cfg, VERSION_TIMEOUT).await;
    let Some(why) = due(age, installed, s.after, cfg.min_version) else {
        let shown = installed.map(|v| v.to_string()).unwrap_or_else(|| "unknown".into());
        info!(version = %shown, days = age.map(|a| a.as_secs() / 86_400).unwrap_or_default(), "Runner is new enough; no update at boot.");
        return Ok(Outcome::NotDue);
    };
    let started = Instant::now();
    let shown = installed.map(|v| v.to_string()).unwrap_or_else(|| "unknown".into());
    info!(installed = %shown, reason = %why, "Checking for a newer runner.");
    let http = client(true)?;
    let latest = latest_version(&client(false)?, &s.releases_url).await?;
    if installed.is_some_and(|v| v >= latest) {
        info!(version = %latest, "The installed runner is the latest.");
        stamp(cfg);
        return Ok(Outcome::Latest(latest));
    }
    let asset = asset_name(std::env::consts::ARCH, latest)?;
    let cache = Cache::open(&s.cache_dir, cfg.runner_user.as_ref().map(|u| u.uid))?;
    let expected = match cache.trusted_sha256(&asset) {
        Some(sha) => sha,
        None => expected_sha256(&http, cfg, s, latest, &asset).await?,
    };
    let tarball = cache.dir.join(&asset);
    // The very file that was hashed goes to tar (an open descriptor, rewound): a cache entry
    // replaced between the check and the unpack is never the one unpacked.
    let cached = match open_verified(&tarball, &expected).await {
        Ok(Some(file)) => Some(file),
        Ok(None) => {
            // Never trusted as it is: a poisoned or torn entry is removed, not unpacked.
            warn!(path = %tarball.display(), expected = %expected, "A cached runner tarball does not match its SHA-256; downloading it again.");
            let _ = std::fs::remove_file(&tarball);
            None
        }
        Err(_) => None,
    };
    let from_cache = cached.is_some();
    let file = match cached {
        Some(f) => f,
        None => {
            let url = format!("{}/download/v{latest}/{asset}", s.releases_url);
            download(&http, &url, &cache, &asset, &expected).await?
        }
    };
    cache.remember_sha256(&asset, &expected);
    let entries = unpack_and_swap(cfg, file, &tarball, latest).await?;
    stamp(cfg);
    info!(
        from = %shown,
        to = %latest,
        from_cache,
        seconds = format!("{:.2}", started.elapsed().as_secs_f64()),
        "Runner updated at boot."
    );
    Ok(Outcome::Updated { from: installed, to: latest, entries })
}

fn client(follow: bool) -> Result<reqwest::Client, UpdateError> {
    let redirects = if follow { reqwest::redirect::Policy::limited(5) } else { reqwest::redirect::Policy::none() };
    reqwest::Client::builder()
        .user_agent(concat!("ci-runner/", env!("CARGO_PKG_VERSION")))
        .connect_timeout(CONNECT_TIMEOUT)
        .redirect(redirects)
        .build()
        .map_err(|source| UpdateError::Http { url: String::new(), source })
}

/// `HEAD <releases>/latest` without following: the tag is in `location:`.
async fn latest_version(http: &reqwest::Client, releases: &str) -> Result<RunnerVersion, UpdateError> {
    let url = format!("{releases}/latest");
    let resp = http
        .head(&url)
        .timeout(REQUEST_TIMEOUT)
        .send()
        .await
        .map_err(|source| UpdateError::Http { url: url.clone(), source })?;
    if !resp.status().is_redirection() {
        return Err(UpdateError::Status { url, status: resp.status().as_u16() });
    }
    let location = resp.headers().get("location").and_then(|l| l.to_str().ok()).unwrap_or_default().to_string();
    version_from_location(&location).ok_or(UpdateError::NoVersion { url, location })
}

/// The published SHA-256 from `GET <RUNNER_RELEASES_API_URL>/tags/v<ver>`: one REST call
/// (60 an hour per address without a token). `GH_TOKEN` goes with it only when it is a PAT of
/// that very API host (`GH_API_URL`), so a GHES token never reaches github.com; it is never logged.
async fn expected_sha256(
    http: &reqwest::Client,
    cfg: &Config,
    s: &UpdateSettings,
    version: RunnerVersion,
    asset: &str,
) -> Result<String, UpdateError> {
    let url = format!("{}/tags/v{version}", s.releases_api_url);
    let mut req = http.get(&url).timeout(REQUEST_TIMEOUT).header("Accept", "application/vnd.github+json");
    if let Credentials::Pat(token) = &cfg.credentials {
        if same_origin(&cfg.api_url, &s.releases_api_url) {
            req = req.bearer_auth(token.expose());
        }
    }
    let resp = req.send().await.map_err(|source| UpdateError::Http { url: url.clone(), source })?;
    if !resp.status().is_success() {
        return Err(UpdateError::Status { url, status: resp.status().as_u16() });
    }
    let release: serde_json::Value =
        resp.json().await.map_err(|source| UpdateError::Http { url: url.clone(), source })?;
    match published_sha256(&release, asset) {
        Published::Sha256(sha) => Ok(sha),
        Published::Missing => Err(UpdateError::NoChecksum { version, asset: asset.to_string() }),
        Published::Conflict => Err(UpdateError::ChecksumConflict { version, asset: asset.to_string() }),
    }
}

/// Whether two URLs have the same scheme, host and port: the only case where `GH_TOKEN`
/// goes to the releases API.
fn same_origin(a: &str, b: &str) -> bool {
    match (reqwest::Url::parse(a), reqwest::Url::parse(b)) {
        (Ok(a), Ok(b)) => a.origin().is_tuple() && a.origin() == b.origin(),
        _ => false,
    }
}

/// `RUNNER_CACHE_DIR`, and whether what is in it can be believed without asking GitHub.
struct Cache {
    dir: PathBuf,
    /// The directory is ours and nobody else's (not writable by group, others, or the runner
    /// user), so a `<asset>.sha256` we wrote there is what we verified. Otherwise (e.g. a
    /// volume the runner user owns, which every job could write) only the tarball is cached,
    /// and its checksum comes from the release every time.
    private: bool,
}

impl Cache {
    /// `runner_uid`: the runner user's, when the supervisor runs it as another user.
    fn open(dir: &Path, runner_uid: Option<u32>) -> Result<Self, UpdateError> {
        if !dir.is_dir() {
            std::fs::create_dir_all(dir).map_err(io_err("create the cache", dir))?;
            let _ = std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755));
        }
        let meta = std::fs::metadata(dir).map_err(io_err("read the cache", dir))?;
        let me = nix::unistd::geteuid().as_raw();
        let private = meta.uid() == me && meta.mode() & 0o022 == 0 && runner_uid.is_some_and(|u| u != me);
        Ok(Self { dir: dir.to_path_buf(), private })
    }

    fn sha_path(&self, asset: &str) -> PathBuf {
        self.dir.join(format!("{asset}.sha256"))
    }

    fn trusted_sha256(&self, asset: &str) -> Option<String> {
        if !self.private {
            return None;
        }
        let path = self.sha_path(asset);
        let meta = std::fs::symlink_metadata(&path).ok()?;
        let me = nix::unistd::geteuid().as_raw();
        if !meta.is_file() || meta.uid() != me || meta.mode() & 0o022 != 0 {
            return None;
        }
        let sha = std::fs::read_to_string(&path).ok()?.trim().to_ascii_lowercase();
        is_sha256(&sha).then_some(sha)
    }

    fn remember_sha256(&self, asset: &str, sha: &str) {
        if self.private {
            let (path, tmp) = (self.sha_path(asset), self.dir.join(format!(".{asset}.sha256.tmp.{}", suffix())));
            let _ = std::fs::write(&tmp, format!("{sha}\n")).and_then(|()| std::fs::rename(&tmp, &path));
        }
    }
}

/// `path` opened and hashed: the open file, rewound, when it has the SHA-256 `expected`;
/// `None` when it has another; an error when it cannot be read (e.g. it is not there).
async fn open_verified(path: &Path, expected: &str) -> io::Result<Option<std::fs::File>> {
    use tokio::io::{AsyncReadExt, AsyncSeekExt};
    let mut f = tokio::fs::File::open(path).await?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = f.read(&mut buf).await?;
        if n == 0 {
            break;
        }
        ctx.update(&buf[..n]);
    }
    if hex(ctx.finish().as_ref()) != expected {
        return Ok(None);
    }
    f.rewind().await?;
    Ok(Some(f.into_std().await))
}

/// A random name part for temporary files in the shared cache.
fn suffix() -> String {
    let mut b = [0u8; 8];
    let _ = getrandom::getrandom(&mut b);
    hex(&b)
}

fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The tarball to `<cache>/.<asset>.tmp.<random>`, hashed as it streams, renamed to
/// `<cache>/<asset>` only when it has the published SHA-256 (removed otherwise); returned
/// open and rewound, the descriptor that was hashed.
async fn download(
    http: &reqwest::Client,
    url: &str,
    cache: &Cache,
    asset: &str,
    expected: &str,
) -> Result<std::fs::File, UpdateError> {
    use tokio::io::AsyncSeekExt;
    // Replicas share the cache (and have the same pid in their namespaces): a random name.
    let tmp = cache.dir.join(format!(".{asset}.tmp.{}", suffix()));
    // Removed however this ends short of the rename: an error, the timeout, a signal (the
    // future is dropped), so no torn download is left in the cache.
    let guard = RemoveOnDrop(Some(tmp.clone()));
    let mut resp = http.get(url).send().await.map_err(|source| UpdateError::Http { url: url.to_string(), source })?;
    if !resp.status().is_success() {
        return Err(UpdateError::Status { url: url.to_string(), status: resp.status().as_u16() });
    }
    let mut file = tokio::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .await
        .map_err(io_err("create", &tmp))?;
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    let mut bytes = 0u64;
    loop {
        let chunk = tokio::time::timeout(STALL_TIMEOUT, resp.chunk())
            .await
            .map_err(|_| UpdateError::Stalled { url: url.to_string() })?
            .map_err(|source| UpdateError::Http { url: url.to_string(), source })?;
        let Some(chunk) = chunk else { break };
        ctx.update(&chunk);
        bytes += chunk.len() as u64;
        file.write_all(&chunk).await.map_err(io_err("write", &tmp))?;
    }
    file.sync_all().await.map_err(io_err("write", &tmp))?;
    let got = hex(ctx.finish().as_ref());
    if got != expected {
        return Err(UpdateError::BadChecksum { url: url.to_string(), expected: expected.to_string(), got });
    }
    let dest = cache.dir.join(asset);
    std::fs::rename(&tmp, &dest).map_err(io_err("rename into", &dest))?;
    guard.disarm();
    info!(url = %url, bytes, "Runner tarball downloaded and verified.");
    file.rewind().await.map_err(io_err("read", &dest))?;
    Ok(file.into_std().await)
}

/// A temporary file removed when dropped, unless [`RemoveOnDrop::disarm`]ed.
struct RemoveOnDrop(Option<PathBuf>);

impl RemoveOnDrop {
    fn disarm(mut self) {
        self.0 = None;
    }
}

impl Drop for RemoveOnDrop {
    fn drop(&mut self) {
        if let Some(p) = self.0.take() {
            let _ = std::fs::remove_file(p);
        }
    }
}

/// `file` (the verified `tarball`) unpacked by `tar` as the runner user, from its stdin, into
/// [`STAGING`]`/new`, checked, then swapped into `RUNNER_DIR`. Returns the names of the
/// entries swapped.
async fn unpack_and_swap(
    cfg: &Config,
    file: std::fs::File,
    tarball: &Path,
    version: RunnerVersion,
) -> Result<Vec<String>, UpdateError> {
    let staging = cfg.runner_dir.join(STAGING);
    let new = staging.join("new");
    if staging.exists() {
        std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))?;
    }
    // The staging dir is the supervisor's (0755), so that the journal and `old/` in it are
    // too: RUNNER_DIR is the runner user's, and a job must not be able to plant a journal
    // that root would follow at the next boot (see `recover`). Only `new/`, where tar
    // writes, is the runner user's.
    std::fs::create_dir(&staging).map_err(io_err("create", &staging))?;
    std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).map_err(io_err("chmod", &staging))?;
    std::fs::create_dir(&new).map_err(io_err("create", &new))?;
    if let Some(u) = &cfg.runner_user {
        nix::unistd::chown(&new, Some(nix::unistd::Uid::from_raw(u.uid)), Some(nix::unistd::Gid::from_raw(u.gid)))
            .map_err(|e| UpdateError::Io { what: "chown", path: new.clone(), source: e.into() })?;
    }
    let mut in_new = cfg.clone();
    in_new.runner_dir = new.clone();
    let mut tar = runner::command(&in_new, Path::new("tar"), &[]);
    // As the runner user: its files, and a tarball cannot write where that user cannot.
    tar.args(["-xzf", "-", "--no-same-owner", "-C"]).arg(&new);
    tar.stdin(std::process::Stdio::from(file)).kill_on_drop(true);
    let out = tar.output().await.map_err(io_err("run tar on", tarball))?;
    if !out.status.success() {
        let stderr = String::from_utf8_lossy(&out.stderr).lines().last().unwrap_or_default().to_string();
        return Err(UpdateError::Tar { path: tarball.to_path_buf(), status: out.status.to_string(), stderr });
    }
    let mut entries: Vec<String> = std::fs::read_dir(&new)
        .map_err(io_err("read", &new))?
        .flatten()
        .map(|e| e.file_name().to_string_lossy().to_string())
        .collect();
    entries.sort();
    for needed in ["config.sh", "run.sh", "bin"] {
        if !entries.iter().any(|e| e == needed) {
            return Err(UpdateError::Unpacked(format!("{needed} is missing")));
        }
    }
    match runner::installed_version(&in_new, VERSION_TIMEOUT).await {
        Some(v) if v == version => {}
        other => {
            return Err(UpdateError::Unpacked(format!(
                "bin/Runner.Listener --version says {}, not {version}",
                other.map(|v| v.to_string()).unwrap_or_else(|| "nothing".into())
            )))
        }
    }
    // The journal: from here on the next boot finishes the swap.
    let journal = staging.join("ready");
    std::fs::write(&journal, entries.join("\n")).map_err(io_err("write", &journal))?;
    std::fs::File::open(&journal).and_then(|f| f.sync_all()).map_err(io_err("write", &journal))?;
    swap(&cfg.runner_dir, &entries)?;
    Ok(entries)
}

/// Moves each of `entries` from [`STAGING`]`/new` into `dir`, the old one first to
/// [`STAGING`]`/old`; idempotent, so [`recover`] can run it again after a crash. Nothing
/// here awaits: a signal cannot cut it in half. Then the staging goes.
fn swap(dir: &Path, entries: &[String]) -> Result<(), UpdateError> {
    let staging = dir.join(STAGING);
    let (new, old) = (staging.join("new"), staging.join("old"));
    std::fs::create_dir_all(&old).map_err(io_err("create", &old))?;
    for e in entries {
        let (from, to, keep) = (new.join(e), dir.join(e), old.join(e));
        if std::fs::symlink_metadata(&from).is_err() {
            continue; // Moved by an earlier, interrupted swap.
        }
        if std::fs::symlink_metadata(&to).is_ok() && std::fs::symlink_metadata(&keep).is_err() {
            match std::fs::rename(&to, &keep) {
                Ok(()) => {}
                // overlayfs without `redirect_dir` (Docker's default) refuses to rename a
                // directory of an image layer: the old one is removed instead. Still safe
                // to cut short: the journal makes the next boot remove the rest and move
                // the new one in.
                Err(e) if e.raw_os_error() == Some(libc::EXDEV) => {
                    let meta = std::fs::symlink_metadata(&to).map_err(io_err("read", &to))?;
                    if meta.is_dir() { std::fs::remove_dir_all(&to) } else { std::fs::remove_file(&to) }
                        .map_err(io_err("remove", &to))?;
                }
                Err(e) => return Err(UpdateError::Io { what: "move aside", path: to, source: e }),
            }
        }
        std::fs::rename(&from, &to).map_err(io_err("move into place", &to))?;
    }
    std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))
}

/// A swap the last boot began (its journal written) is finished; an unpack it left without
/// a journal is thrown away. Either way the install is whole after this.
pub fn recover(dir: &Path) -> Result<(), UpdateError> {
    let staging = dir.join(STAGING);
    let Ok(meta) = std::fs::symlink_metadata(&staging) else { return Ok(()) };
    // Only a staging dir of our own is believed: one the runner user made (RUNNER_DIR is
    // theirs) could name any path for root to move.
    let ours = meta.is_dir() && meta.uid() == nix::unistd::geteuid().as_raw() && meta.mode() & 0o022 == 0;
    let journal = if ours { std::fs::read_to_string(staging.join("ready")).ok() } else { None };
    match journal {
        Some(list) => {
            let entries: Vec<String> = list.lines().filter(|l| !l.is_empty()).map(str::to_string).collect();
            if let Some(bad) = entries.iter().find(|e| !plain_name(e)) {
                return Err(UpdateError::Unpacked(format!(
                    "the update journal names {bad:?}, not an entry of the install"
                )));
            }
            warn!(runner_dir = %dir.display(), "Finishing a runner update that an earlier boot began.");
            swap(dir, &entries)
        }
        None => {
            if !ours {
                warn!(path = %staging.display(), "Removing an update staging dir the supervisor did not make.");
            }
            // remove_dir_all removes a symlink itself, never what it points at.
            std::fs::remove_dir_all(&staging).map_err(io_err("remove", &staging))
        }
    }
}

/// One path component, neither `.` nor `..`: an entry at the top of the install.
fn plain_name(e: &str) -> bool {
    !e.is_empty() && e != "." && e != ".." && !e.contains('/') && !e.contains('\0')
}

/// `.updated_at` rewritten, the runner user's, as the original's `date > .updated_at`.
fn stamp(cfg: &Config) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let path = cfg.runner_dir.join(UPDATED_AT);
    let tmp = cfg.runner_dir.join(format!(".updated_at.tmp.{}", suffix()));
    let now =
        time::OffsetDateTime::now_utc().format(&time::format_description::well_known::Rfc3339).unwrap_or_default();
    // A new file (O_EXCL: never through a symlink the runner user left), chowned by its
    // descriptor, renamed over the stamp (which replaces a symlink, never its target).
    let res = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .open(&tmp)
        .and_then(|mut f| {
            f.write_all(format!("{now}\n").as_bytes())?;
            if let Some(u) = &cfg.runner_user {
                std::os::unix::fs::fchown(&f, Some(u.uid), Some(u.gid))?;
            }
            Ok(())
        })
        .and_then(|()| std::fs::rename(&tmp, &path));
    if let Err(e) = res {
        let _ = std::fs::remove_file(&tmp);
        warn!(path = %path.display(), error = %e, "Failed to write the install's update stamp.");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const V: RunnerVersion = RunnerVersion(2, 336, 0);
    const DAY: Duration = Duration::from_secs(86_400);

    #[test]
    fn due_when_old_missing_or_below_the_minimum_and_never_otherwise() {
        let (after, min) = (21 * DAY, RunnerVersion(2, 329, 0));
        assert_eq!(due(Some(3 * DAY), Some(V), after, min), None, "fresh and new enough: no request");
        assert_eq!(due(Some(21 * DAY), Some(V), after, min), None, "-mtime +21 is strictly older");
        assert_eq!(due(Some(22 * DAY), Some(V), after, min), Some(Due::Old(22 * DAY)));
        assert_eq!(due(None, Some(V), after, min), Some(Due::NeverUpdated));
        let old = RunnerVersion(2, 320, 0);
        assert_eq!(
            due(Some(DAY), Some(old), after, min),
            Some(Due::BelowMinimum(old)),
            "fresh stamp, too old a runner"
        );
        assert_eq!(due(Some(DAY), None, after, min), None, "an unknown version decides nothing");
        assert_eq!(due(Some(DAY), Some(V), Duration::ZERO, min), Some(Due::Old(DAY)), "0 days: every boot");
    }

    #[test]
    fn the_version_comes_from_the_redirect_or_not_at_all() {
        let v = version_from_location("https://github.com/actions/runner/releases/tag/v2.337.1");
        assert_eq!(v, Some(RunnerVersion(2, 337, 1)));
        assert_eq!(version_from_location("/actions/runner/releases/tag/v2.337.1?x=1"), Some(RunnerVersion(2, 337, 1)));
        for bad in [
            "",
            "https://github.com/login",
            "https://github.com/a/releases/tag/2.337.1",
            ".../tag/vlatest",
            ".../tag/v2.337",
            ".../tag/vv2.1.1",
        ] {
            assert_eq!(version_from_location(bad), None, "{bad}");
        }
    }

    #[test]
    fn assets_are_named_as_the_release_names_them() {
        assert_eq!(asset_name("x86_64", V).unwrap(), "actions-runner-linux-x64-2.336.0.tar.gz");
        assert_eq!(asset_name("aarch64", V).unwrap(), "actions-runner-linux-arm64-2.336.0.tar.gz");
        assert!(asset_name("riscv64", V).is_err());
    }

    #[test]
    fn the_checksum_comes_from_the_asset_digest_or_the_notes_and_they_must_agree() {
        let (a, b) = ("a".repeat(64), "b".repeat(64));
        let asset = "actions-runner-linux-x64-2.336.0.tar.gz";
        let body = |x: &str, arm: &str| {
            format!("- {asset} <!-- BEGIN SHA linux-x64 -->{x}<!-- END SHA linux-x64 -->\n- actions-runner-linux-arm64-2.336.0.tar.gz <!-- BEGIN SHA linux-arm64 -->{arm}<!-- END SHA linux-arm64 -->")
        };
        let notes = serde_json::json!({"body": body(&a, &b), "assets": []});
        assert_eq!(published_sha256(&notes, asset), Published::Sha256(a.clone()), "linux-x64's, not linux-arm64's");
        let digest = serde_json::json!({"body": "", "assets": [{"name": asset, "digest": format!("sha256:{b}")}]});
        assert_eq!(published_sha256(&digest, asset), Published::Sha256(b.clone()));
        let both =
            serde_json::json!({"body": body(&a, &a), "assets": [{"name": asset, "digest": format!("sha256:{b}")}]});
        assert_eq!(published_sha256(&both, asset), Published::Conflict, "two different checksums: neither is believed");
        let none = serde_json::json!({"body": body("<LINUX_X64_SHA>", &b), "assets": [{"name": "other", "digest": format!("sha256:{a}")}]});
        assert_eq!(published_sha256(&none, asset), Published::Missing);
    }

    #[test]
    fn the_token_goes_only_to_the_api_it_belongs_to() {
        let gh = "https://api.github.com/repos/actions/runner/releases";
        assert!(same_origin("https://api.github.com", gh));
        assert!(!same_origin("https://ghe.example.com/api/v3", gh), "a GHES token never reaches github.com");
        assert!(!same_origin("http://127.0.0.1:1/api/v3", "http://127.0.0.1:2/api/releases"), "another port");
        assert!(!same_origin("http://api.github.com", gh), "another scheme");
    }

    #[test]
    fn a_journal_the_supervisor_did_not_write_is_never_followed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        let outside = tempfile::tempdir().unwrap();
        std::fs::write(outside.path().join("victim"), "keep").unwrap();
        std::fs::write(d.join("config.sh"), "install").unwrap();
        // A journal naming a path outside the install.
        let staging = d.join(STAGING);
        std::fs::create_dir_all(staging.join("new")).unwrap();
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o755)).unwrap();
        let escape = format!("../{}/victim", outside.path().file_name().unwrap().to_string_lossy());
        std::fs::write(staging.join("ready"), &escape).unwrap();
        assert!(recover(d).is_err(), "a journal entry that is not a plain name was followed");
        assert_eq!(std::fs::read_to_string(outside.path().join("victim")).unwrap(), "keep");
        // A staging dir anyone could have written (here: world-writable) is removed, unread.
        std::fs::write(staging.join("ready"), "config.sh").unwrap();
        std::fs::write(staging.join("new/config.sh"), "planted").unwrap();
        std::fs::set_permissions(&staging, std::fs::Permissions::from_mode(0o777)).unwrap();
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("config.sh")).unwrap(), "install");
        assert!(!staging.exists());
    }

    #[test]
    fn a_cached_checksum_is_believed_only_from_a_cache_no_job_can_write() {
        let dir = tempfile::tempdir().unwrap();
        let sha = "c".repeat(64);
        let me = nix::unistd::geteuid().as_raw();
        let other = if me == 0 { 65534 } else { me + 1 };
        let asset = "actions-runner-linux-x64-2.340.0.tar.gz";
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        let cache = Cache::open(dir.path(), Some(other)).unwrap();
        cache.remember_sha256(asset, &sha);
        assert_eq!(cache.trusted_sha256(asset), Some(sha.clone()), "ours, 0755, the runner user another uid");
        // Everything runs as one user: a job could have written it.
        assert_eq!(Cache::open(dir.path(), None).unwrap().trusted_sha256(asset), None);
        assert_eq!(Cache::open(dir.path(), Some(me)).unwrap().trusted_sha256(asset), None);
        // A group- or world-writable file or cache.
        std::fs::set_permissions(cache.sha_path(asset), std::fs::Permissions::from_mode(0o666)).unwrap();
        assert_eq!(Cache::open(dir.path(), Some(other)).unwrap().trusted_sha256(asset), None);
        std::fs::set_permissions(cache.sha_path(asset), std::fs::Permissions::from_mode(0o644)).unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        assert_eq!(Cache::open(dir.path(), Some(other)).unwrap().trusted_sha256(asset), None);
        // Not written either: nothing that could be believed later is left there.
        std::fs::remove_file(cache.sha_path(asset)).unwrap();
        Cache::open(dir.path(), Some(other)).unwrap().remember_sha256(asset, &sha);
        assert!(!cache.sha_path(asset).exists());
    }

    #[test]
    fn an_interrupted_swap_is_finished_and_a_torn_unpack_thrown_away() {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path();
        std::fs::create_dir_all(d.join("bin")).unwrap();
        std::fs::write(d.join("bin/Runner.Listener"), "old").unwrap();
        std::fs::write(d.join("config.sh"), "old").unwrap();
        std::fs::write(d.join(".runner"), "state").unwrap();
        // The journal is written; the swap moved `bin` and died before `config.sh`.
        let new = d.join(STAGING).join("new");
        std::fs::create_dir_all(new.join("bin")).unwrap();
        std::fs::write(new.join("bin/Runner.Listener"), "new").unwrap();
        std::fs::write(new.join("config.sh"), "new").unwrap();
        std::fs::write(d.join(STAGING).join("ready"), "bin\nconfig.sh").unwrap();
        std::fs::set_permissions(d.join(STAGING), std::fs::Permissions::from_mode(0o755)).unwrap();
        std::fs::create_dir_all(d.join(STAGING).join("old")).unwrap();
        std::fs::rename(d.join("bin"), d.join(STAGING).join("old/bin")).unwrap();
        std::fs::rename(new.join("bin"), d.join("bin")).unwrap();
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("bin/Runner.Listener")).unwrap(), "new");
        assert_eq!(std::fs::read_to_string(d.join("config.sh")).unwrap(), "new", "never a mixed install");
        assert_eq!(std::fs::read_to_string(d.join(".runner")).unwrap(), "state", "the runner's own files stay");
        assert!(!d.join(STAGING).exists());

        // An unpack without its journal never replaces anything.
        std::fs::create_dir_all(d.join(STAGING).join("new/bin")).unwrap();
        std::fs::write(d.join(STAGING).join("new/config.sh"), "torn").unwrap();
        recover(d).unwrap();
        assert_eq!(std::fs::read_to_string(d.join("config.sh")).unwrap(), "new");
        assert!(!d.join(STAGING).exists());
    }
}
