//! The SSH agent for jobs: the ci-storage key served from the supervisor's memory.
//!
//! The original image copied `CI_STORAGE_PRIVATE_KEY` to `~guest/.ssh/id_rsa` so that jobs
//! could run `ci-storage store`; here the key never reaches a file, a variable, an argv or a
//! log (issue #17). Instead the supervisor (root) answers the standard agent protocol
//! (draft-miller-ssh-agent) on a unix socket that only the runner user can reach, and the
//! runner's environment carries `SSH_AUTH_SOCK`, so `ssh`, `rsync -e ssh` and the ci-storage
//! tool authenticate with it as with any agent. Only two requests are answered:
//! `REQUEST_IDENTITIES` and `SIGN_REQUEST`, for Ed25519 and RSA (rsa-sha2-256/512) keys, in
//! OpenSSH or PEM form; adding, removing or locking keys is refused. A job can make the key
//! sign while it runs, which is what storing needs, but never learn it.
//!
//! Our own agent rather than `ssh-agent` fed by `ssh-add -`: ssh-agent would have to run as
//! the runner user (it refuses peers of another uid), so the key would live in a process the
//! job owns and can signal, and the image would depend on its flags; here it stays in the
//! root supervisor, whose memory and `/proc` entries no job can read.

use std::io;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use base64::engine::general_purpose::{STANDARD, STANDARD_NO_PAD};
use base64::Engine as _;
use ring::signature::{Ed25519KeyPair, KeyPair as _, RsaKeyPair};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::config::{Config, RunnerUser};

const SSH_AGENT_FAILURE: u8 = 5;
const SSH_AGENTC_REQUEST_IDENTITIES: u8 = 11;
const SSH_AGENT_IDENTITIES_ANSWER: u8 = 12;
const SSH_AGENTC_SIGN_REQUEST: u8 = 13;
const SSH_AGENT_SIGN_RESPONSE: u8 = 14;
const SSH_AGENT_RSA_SHA2_256: u32 = 2;
const SSH_AGENT_RSA_SHA2_512: u32 = 4;
/// Longest request read: a sign request carries a session hash and a few names.
const MAX_MESSAGE: usize = 256 * 1024;
/// The comment `ssh-add -l` shows.
const COMMENT: &str = "ci-storage (served by ci-runner)";

/// Why a key cannot be served. Never quotes the key.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyError {
    #[error("the key is not PEM text (-----BEGIN OPENSSH PRIVATE KEY----- or -----BEGIN RSA PRIVATE KEY-----)")]
    NotPem,
    #[error("the key's base64 is damaged")]
    Base64,
    #[error("the key is encrypted with a passphrase; the supervisor needs it unencrypted")]
    Encrypted,
    #[error("the key's OpenSSH structure is damaged")]
    Malformed,
    #[error("keys of type {0} are not served (Ed25519 and RSA are)")]
    Unsupported(String),
    #[error("ring refused the key ({0})")]
    Rejected(String),
}

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("failed to make the agent's socket in {dir}")]
    Socket {
        dir: PathBuf,
        #[source]
        source: io::Error,
    },
}

enum Pair {
    Ed25519(Ed25519KeyPair),
    Rsa(RsaKeyPair),
}

/// A private key the agent can sign with, and its public blob (RFC 4253 §6.6).
pub struct AgentKey {
    pair: Pair,
    blob: Vec<u8>,
}

impl std::fmt::Debug for AgentKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "AgentKey({} {})", self.kind(), self.fingerprint())
    }
}

impl AgentKey {
    /// Parses an unencrypted OpenSSH (`openssh-key-v1`) key, or a PEM RSA key (PKCS#1 or
    /// PKCS#8), as `ssh-keygen` writes them.
    pub fn parse(text: &str) -> Result<AgentKey, KeyError> {
        let (label, der) = pem(text)?;
        match label.as_str() {
            "OPENSSH PRIVATE KEY" => openssh_key(&der),
            "RSA PRIVATE KEY" => rsa_key(RsaKeyPair::from_der(&der).map_err(|e| KeyError::Rejected(e.to_string()))?),
            "PRIVATE KEY" => match RsaKeyPair::from_pkcs8(&der) {
                Ok(pair) => rsa_key(pair),
                Err(_) => {
                    let pair = Ed25519KeyPair::from_pkcs8_maybe_unchecked(&der)
                        .map_err(|e| KeyError::Rejected(e.to_string()))?;
                    Ok(ed25519_key(pair))
                }
            },
            "ENCRYPTED PRIVATE KEY" => Err(KeyError::Encrypted),
            other => Err(KeyError::Unsupported(other.to_string())),
        }
    }

    /// `ssh-ed25519` or `ssh-rsa`.
    pub fn kind(&self) -> &'static str {
        match self.pair {
            Pair::Ed25519(_) => "ssh-ed25519",
            Pair::Rsa(_) => "ssh-rsa",
        }
    }

    /// `SHA256:…`, as `ssh-keygen -lf` and `ssh-add -l` print it.
    pub fn fingerprint(&self) -> String {
        let digest = ring::digest::digest(&ring::digest::SHA256, &self.blob);
        format!("SHA256:{}", STANDARD_NO_PAD.encode(digest.as_ref()))
    }

    /// The public key blob (what `authorized_keys` holds, base64-encoded).
    pub fn public_blob(&self) -> &[u8] {
        &self.blob
    }

    /// The signature blob for `data`, or None when `flags` ask for an algorithm not served
    /// (plain `ssh-rsa`, i.e. SHA-1, which OpenSSH has not asked an agent for since 8.8).
    fn sign(&self, data: &[u8], flags: u32) -> Option<Vec<u8>> {
        let mut out = Vec::new();
        match &self.pair {
            Pair::Ed25519(pair) => {
                put_string(&mut out, b"ssh-ed25519");
                put_string(&mut out, pair.sign(data).as_ref());
            }
            Pair::Rsa(pair) => {
                let (name, alg): (&[u8], _) = if flags & SSH_AGENT_RSA_SHA2_512 != 0 {
                    (b"rsa-sha2-512", &ring::signature::RSA_PKCS1_SHA512)
                } else if flags & SSH_AGENT_RSA_SHA2_256 != 0 {
                    (b"rsa-sha2-256", &ring::signature::RSA_PKCS1_SHA256)
                } else {
                    return None;
                };
                let mut sig = vec![0; pair.public().modulus_len()];
                pair.sign(alg, &ring::rand::SystemRandom::new(), data, &mut sig).ok()?;
                put_string(&mut out, name);
                put_string(&mut out, &sig);
            }
        }
        Some(out)
    }
}

/// The one PEM block's label and decoded body.
fn pem(text: &str) -> Result<(String, Vec<u8>), KeyError> {
    let mut label = None;
    let mut body = String::new();
    for line in text.lines().map(str::trim) {
        if let Some(l) = line.strip_prefix("-----BEGIN ").and_then(|l| l.strip_suffix("-----")) {
            label = Some(l.to_string());
        } else if line.starts_with("-----END ") {
            break;
        } else if label.is_some() {
            if line.contains(':') {
                // RFC 1421 headers (`Proc-Type: 4,ENCRYPTED`): a passphrase-protected PEM key.
                return Err(KeyError::Encrypted);
            }
            body.push_str(line);
        }
    }
    let label = label.ok_or(KeyError::NotPem)?;
    let der = STANDARD.decode(body.as_bytes()).map_err(|_| KeyError::Base64)?;
    Ok((label, der))
}

/// A reader of the SSH wire format (RFC 4251 §5).
struct Wire<'a>(&'a [u8]);

impl<'a> Wire<'a> {
    fn u32(&mut self) -> Option<u32> {
        let (head, rest) = self.0.split_first_chunk::<4>()?;
        self.0 = rest;
        Some(u32::from_be_bytes(*head))
    }
    fn string(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if n > self.0.len() {
            return None;
        }
        let (s, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(s)
    }
    /// An mpint's magnitude, without its sign byte or leading zeros.
    fn mpint(&mut self) -> Option<&'a [u8]> {
        let s = self.string()?;
        let first = s.iter().position(|b| *b != 0).unwrap_or(s.len());
        Some(&s[first..])
    }
}

fn put_string(out: &mut Vec<u8>, s: &[u8]) {
    out.extend_from_slice(&(s.len() as u32).to_be_bytes());
    out.extend_from_slice(s);
}

/// An mpint of a positive magnitude: a zero byte first when its top bit is set.
fn put_mpint(out: &mut Vec<u8>, magnitude: &[u8]) {
    let first = magnitude.iter().position(|b| *b != 0).unwrap_or(magnitude.len());
    let m = &magnitude[first..];
    if m.first().is_some_and(|b| b & 0x80 != 0) {
        out.extend_from_slice(&(m.len() as u32 + 1).to_be_bytes());
        out.push(0);
        out.extend_from_slice(m);
    } else {
        put_string(out, m);
    }
}

/// `openssh-key-v1` (PROTOCOL.key in OpenSSH): one unencrypted key.
fn openssh_key(der: &[u8]) -> Result<AgentKey, KeyError> {
    let rest = der.strip_prefix(b"openssh-key-v1\0").ok_or(KeyError::Malformed)?;
    let mut w = Wire(rest);
    let bad = KeyError::Malformed;
    let cipher = w.string().ok_or(bad.clone())?;
    let _kdf = w.string().ok_or(bad.clone())?;
    let _kdf_options = w.string().ok_or(bad.clone())?;
    if cipher != b"none" {
        return Err(KeyError::Encrypted);
    }
    if w.u32() != Some(1) {
        return Err(bad);
    }
    let _public = w.string().ok_or(bad.clone())?;
    let mut p = Wire(w.string().ok_or(bad.clone())?);
    let (check1, check2) = (p.u32().ok_or(bad.clone())?, p.u32().ok_or(bad.clone())?);
    if check1 != check2 {
        return Err(bad);
    }
    let kind = p.string().ok_or(bad.clone())?;
    match kind {
        b"ssh-ed25519" => {
            let public = p.string().ok_or(bad.clone())?;
            let private = p.string().ok_or(bad.clone())?;
            if public.len() != 32 || private.len() != 64 {
                return Err(bad);
            }
            let pair = Ed25519KeyPair::from_seed_and_public_key(&private[..32], public)
                .map_err(|e| KeyError::Rejected(e.to_string()))?;
            Ok(ed25519_key(pair))
        }
        b"ssh-rsa" => {
            let mut next = || p.mpint().ok_or(KeyError::Malformed);
            let (n, e, d, iqmp, prime_p, prime_q) = (next()?, next()?, next()?, next()?, next()?, next()?);
            let dp = modulo(d, &minus_one(prime_p));
            let dq = modulo(d, &minus_one(prime_q));
            let components = ring::rsa::KeyPairComponents {
                public_key: ring::rsa::PublicKeyComponents { n, e },
                d,
                p: prime_p,
                q: prime_q,
                dP: dp.as_slice(),
                dQ: dq.as_slice(),
                qInv: iqmp,
            };
            rsa_key(RsaKeyPair::from_components(&components).map_err(|e| KeyError::Rejected(e.to_string()))?)
        }
        other => Err(KeyError::Unsupported(String::from_utf8_lossy(other).into_owned())),
    }
}

fn ed25519_key(pair: Ed25519KeyPair) -> AgentKey {
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-ed25519");
    put_string(&mut blob, pair.public_key().as_ref());
    AgentKey { pair: Pair::Ed25519(pair), blob }
}

fn rsa_key(pair: RsaKeyPair) -> Result<AgentKey, KeyError> {
    let public = ring::rsa::PublicKeyComponents::<Vec<u8>>::from(pair.public());
    let mut blob = Vec::new();
    put_string(&mut blob, b"ssh-rsa");
    put_mpint(&mut blob, &public.e);
    put_mpint(&mut blob, &public.n);
    Ok(AgentKey { pair: Pair::Rsa(pair), blob })
}

/// `x - 1` of a big-endian magnitude above zero.
fn minus_one(x: &[u8]) -> Vec<u8> {
    let mut out = x.to_vec();
    for b in out.iter_mut().rev() {
        let (v, borrow) = b.overflowing_sub(1);
        *b = v;
        if !borrow {
            break;
        }
    }
    out
}

/// `a mod m` of big-endian magnitudes, bit by bit (once per key, a few thousand bits: the
/// CRT exponents OpenSSH's format leaves out, `d mod (p-1)` and `d mod (q-1)`).
fn modulo(a: &[u8], m: &[u8]) -> Vec<u8> {
    let width = m.len() + 1;
    let mut r = vec![0u8; width];
    let mut m_ext = vec![0u8; width - m.len()];
    m_ext.extend_from_slice(m);
    for byte in a {
        for bit in (0..8).rev() {
            // r = 2r + bit
            let mut carry = (byte >> bit) & 1;
            for x in r.iter_mut().rev() {
                let next = *x >> 7;
                *x = (*x << 1) | carry;
                carry = next;
            }
            if r.as_slice() >= m_ext.as_slice() {
                let mut borrow = 0u8;
                for (x, y) in r.iter_mut().rev().zip(m_ext.iter().rev()) {
                    let (v1, b1) = x.overflowing_sub(*y);
                    let (v2, b2) = v1.overflowing_sub(borrow);
                    *x = v2;
                    borrow = u8::from(b1 || b2);
                }
            }
        }
    }
    let first = r.iter().position(|b| *b != 0).unwrap_or(r.len());
    r[first..].to_vec()
}

/// The answer to one request (its type byte and contents, without the length).
pub fn answer(key: &AgentKey, request: &[u8]) -> Vec<u8> {
    let failure = vec![SSH_AGENT_FAILURE];
    let Some((&kind, body)) = request.split_first() else { return failure };
    match kind {
        SSH_AGENTC_REQUEST_IDENTITIES => {
            let mut out = vec![SSH_AGENT_IDENTITIES_ANSWER];
            out.extend_from_slice(&1u32.to_be_bytes());
            put_string(&mut out, &key.blob);
            put_string(&mut out, COMMENT.as_bytes());
            out
        }
        SSH_AGENTC_SIGN_REQUEST => {
            let mut w = Wire(body);
            let (Some(blob), Some(data)) = (w.string(), w.string()) else { return failure };
            let flags = w.u32().unwrap_or(0);
            if blob != key.blob.as_slice() {
                return failure;
            }
            match key.sign(data, flags) {
                Some(sig) => {
                    let mut out = vec![SSH_AGENT_SIGN_RESPONSE];
                    put_string(&mut out, &sig);
                    out
                }
                None => failure,
            }
        }
        // Adding, removing, locking keys and extensions (session-bind@openssh.com among
        // them, which ssh tolerates being refused): not for jobs.
        _ => failure,
    }
}

/// The running agent; dropping it stops serving and removes its socket directory.
pub struct Agent {
    socket: PathBuf,
    _dir: tempfile::TempDir,
    cancel: CancellationToken,
}

impl Agent {
    pub fn socket(&self) -> &Path {
        &self.socket
    }
}

impl Drop for Agent {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

/// Where the socket's directory is made: `/run` (a tmpfs or the container's own layer, never
/// a volume) when it is writable, else the temp dir.
fn socket_base() -> PathBuf {
    let run = Path::new("/run");
    if nix::unistd::access(run, nix::unistd::AccessFlags::W_OK).is_ok() {
        run.to_path_buf()
    } else {
        std::env::temp_dir()
    }
}

/// `<base>/ci-runner-agent.<pid>.<random>`: the agent's directory.
const AGENT_DIR_PREFIX: &str = "ci-runner-agent.";

/// Removes the agent directories of supervisors that are gone (killed, so their own cleanup
/// never ran), and of an earlier life of this pid (a restarted container keeps its /run).
fn remove_stale(base: &Path) {
    let Ok(entries) = std::fs::read_dir(base) else { return };
    for e in entries.flatten() {
        let name = e.file_name();
        let Some(pid) = name.to_str().and_then(|n| n.strip_prefix(AGENT_DIR_PREFIX)).and_then(|r| r.split('.').next())
        else {
            continue;
        };
        let Ok(pid) = pid.parse::<i32>() else { continue };
        let gone = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid), None) == Err(nix::errno::Errno::ESRCH);
        if pid == std::process::id() as i32 || gone {
            let _ = std::fs::remove_dir_all(e.path());
        }
    }
}

/// Serves `key` to `user` (None: the supervisor's own user) on a fresh socket: a new 0700
/// directory of that user's (`mkdtemp`, so nothing a job planted beforehand is followed),
/// the socket 0600 in it, and every peer whose uid is neither that user's nor root's refused.
pub fn serve(key: AgentKey, user: Option<&RunnerUser>) -> Result<Agent, AgentError> {
    let base = socket_base();
    let fail = |dir: &Path| {
        let dir = dir.to_path_buf();
        move |source| AgentError::Socket { dir: dir.clone(), source }
    };
    remove_stale(&base);
    let prefix = format!("{AGENT_DIR_PREFIX}{}.", std::process::id());
    let dir = tempfile::Builder::new().prefix(&prefix).tempdir_in(&base).map_err(fail(&base))?;
    // Root's until the chown below, so nobody else could reach it in between.
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o700)).map_err(fail(dir.path()))?;
    let socket = dir.path().join("agent.sock");
    let listener = tokio::net::UnixListener::bind(&socket).map_err(fail(dir.path()))?;
    std::fs::set_permissions(&socket, std::fs::Permissions::from_mode(0o600)).map_err(fail(dir.path()))?;
    let allowed = match user {
        Some(u) => {
            // The socket first, while the directory is still root's: once the directory is the
            // runner user's, a chown by path could follow a link put in its place.
            for p in [socket.as_path(), dir.path()] {
                nix::unistd::chown(p, Some(nix::unistd::Uid::from_raw(u.uid)), Some(nix::unistd::Gid::from_raw(u.gid)))
                    .map_err(|e| AgentError::Socket { dir: dir.path().to_path_buf(), source: e.into() })?;
            }
            u.uid
        }
        None => nix::unistd::geteuid().as_raw(),
    };
    let cancel = CancellationToken::new();
    let key = Arc::new(key);
    info!(socket = %socket.display(), key = key.kind(), fingerprint = %key.fingerprint(), "SSH agent serving the ci-storage key to jobs.");
    tokio::spawn(accept(listener, key, allowed, cancel.clone()));
    Ok(Agent { socket, _dir: dir, cancel })
}

async fn accept(listener: tokio::net::UnixListener, key: Arc<AgentKey>, allowed: u32, cancel: CancellationToken) {
    loop {
        let stream = tokio::select! {
            _ = cancel.cancelled() => return,
            r = listener.accept() => match r {
                Ok((s, _)) => s,
                Err(e) => {
                    warn!(error = %e, "SSH agent failed to accept a connection.");
                    continue;
                }
            },
        };
        let uid = stream.peer_cred().map(|c| c.uid()).ok();
        if uid != Some(allowed) && uid != Some(0) {
            warn!(uid = ?uid, "SSH agent refused a peer of another user.");
            continue;
        }
        let (key, cancel) = (key.clone(), cancel.clone());
        tokio::spawn(async move {
            tokio::select! {
                _ = cancel.cancelled() => {}
                r = session(stream, &key) => if let Err(e) = r {
                    debug!(error = %e, "SSH agent connection ended.");
                },
            }
        });
    }
}

/// One client: length-prefixed requests, each answered in turn, until it hangs up.
async fn session(mut stream: tokio::net::UnixStream, key: &AgentKey) -> io::Result<()> {
    loop {
        let mut len = [0u8; 4];
        match stream.read_exact(&mut len).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => return Ok(()),
            Err(e) => return Err(e),
        }
        let len = u32::from_be_bytes(len) as usize;
        if len > MAX_MESSAGE {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "request too long"));
        }
        let mut request = vec![0u8; len];
        stream.read_exact(&mut request).await?;
        let reply = answer(key, &request);
        debug!(request = request.first().copied().unwrap_or(0), reply = reply[0], "SSH agent request.");
        let mut framed = (reply.len() as u32).to_be_bytes().to_vec();
        framed.extend_from_slice(&reply);
        stream.write_all(&framed).await?;
    }
}

/// The value ci-storage's action reads from `~/ci-storage-host` (empty: local mode).
pub fn storage_host_value(cfg: &Config) -> String {
    let Some(p) = &cfg.prewarm else { return String::new() };
    let user = p.host.user.as_deref().map(|u| format!("{u}@")).unwrap_or_default();
    let port = if p.host.port == 22 { String::new() } else { format!(":{}", p.host.port) };
    format!("{user}{}{port}", p.host.host)
}

/// Writes `~/ci-storage-host` for the runner user, as the original image's guest hook 01:
/// through a new file (`O_EXCL|O_NOFOLLOW`) renamed into place, so a link a job left there
/// is replaced, never written through. Skipped, with a WARN, when the home does not exist.
pub fn write_storage_host(home: &Path, value: &str, owner: Option<(u32, u32)>) -> io::Result<bool> {
    use std::io::Write as _;
    use std::os::unix::fs::OpenOptionsExt;
    if !home.is_dir() {
        return Ok(false);
    }
    let tmp = home.join(format!(".ci-storage-host.{}", std::process::id()));
    let _ = std::fs::remove_file(&tmp);
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .mode(0o644)
        .custom_flags(libc::O_NOFOLLOW)
        .open(&tmp)?;
    f.write_all(value.as_bytes())?;
    if let Some((uid, gid)) = owner {
        std::os::unix::fs::fchown(&f, Some(uid), Some(gid))?;
    }
    drop(f);
    std::fs::rename(&tmp, home.join("ci-storage-host"))?;
    Ok(true)
}

/// The boot's part: `~/ci-storage-host` written and, with a ci-storage key, the agent started
/// and `SSH_AUTH_SOCK` put in the runner's environment. A key the agent cannot use, or a
/// socket it cannot make, only warns: the pre-warm may still load, and jobs then cannot store.
pub fn start(cfg: &mut Config) -> Option<Agent> {
    let value = storage_host_value(cfg);
    let home = match &cfg.runner_user {
        Some(u) => Some(u.home.clone()),
        None => nix::unistd::User::from_uid(nix::unistd::geteuid()).ok().flatten().map(|u| u.dir),
    };
    if let Some(home) = home {
        let owner = cfg.runner_user.as_ref().map(|u| (u.uid, u.gid));
        match write_storage_host(&home, &value, owner) {
            Ok(true) => debug!(file = %home.join("ci-storage-host").display(), "ci-storage host written."),
            Ok(false) => {
                if cfg.prewarm.is_some() {
                    warn!(home = %home.display(), "The runner user's home does not exist: jobs get no ~/ci-storage-host.");
                }
            }
            Err(e) => {
                warn!(file = %home.join("ci-storage-host").display(), error = %e, "Failed to write ~/ci-storage-host.")
            }
        }
    }
    let prewarm = cfg.prewarm.as_ref()?;
    let key = match AgentKey::parse(prewarm.key.expose()) {
        Ok(k) => k,
        Err(e) => {
            warn!(error = %e, "CI_STORAGE_PRIVATE_KEY cannot be served to jobs: jobs cannot store to ci-storage.");
            return None;
        }
    };
    let agent = match serve(key, cfg.runner_user.as_ref()) {
        Ok(a) => a,
        Err(e) => {
            warn!(error = %crate::error::chain(&e), "Failed to start the SSH agent: jobs cannot store to ci-storage.");
            return None;
        }
    };
    let sock = agent.socket().display().to_string();
    cfg.runner_env.retain(|(k, _)| k != "SSH_AUTH_SOCK");
    cfg.runner_env.push(("SSH_AUTH_SOCK".into(), sock));
    Some(agent)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;

    /// A fresh key of `kind` from ssh-keygen (OpenSSH format, or PEM with `pem`); None
    /// (without ssh-keygen: see `crate::prerequisite_missing`).
    fn keygen(dir: &Path, kind: &str, pem: bool) -> Option<(String, String)> {
        let path = dir.join(format!("{kind}-{pem}"));
        let mut cmd = Command::new("ssh-keygen");
        cmd.args(["-q", "-t", kind, "-N", "", "-C", "test", "-f"]).arg(&path);
        if kind == "rsa" {
            cmd.args(["-b", "2048"]);
        }
        if pem {
            cmd.args(["-m", "PEM"]);
        }
        if !cmd.status().is_ok_and(|s| s.success()) {
            crate::prerequisite_missing("ssh-keygen", "install openssh-client (scripts/test installs it)");
            return None;
        }
        let private = std::fs::read_to_string(&path).unwrap();
        let public = std::fs::read_to_string(path.with_extension("pub")).unwrap();
        Some((private, public))
    }

    fn sign_request(blob: &[u8], data: &[u8], flags: u32) -> Vec<u8> {
        let mut req = vec![SSH_AGENTC_SIGN_REQUEST];
        put_string(&mut req, blob);
        put_string(&mut req, data);
        req.extend_from_slice(&flags.to_be_bytes());
        req
    }

    /// What must never happen: the agent offers a key other than the one configured, or its
    /// signatures do not verify against the public key ssh-keygen wrote.
    #[test]
    fn keys_of_every_served_form_list_the_right_public_key_and_sign_verifiably() {
        use ring::signature::{UnparsedPublicKey, ED25519, RSA_PKCS1_2048_8192_SHA256, RSA_PKCS1_2048_8192_SHA512};
        let dir = tempfile::tempdir().unwrap();
        for (kind, pem, flags) in
            [("ed25519", false, 0), ("rsa", false, SSH_AGENT_RSA_SHA2_256), ("rsa", true, SSH_AGENT_RSA_SHA2_512)]
        {
            let Some((private, public)) = keygen(dir.path(), kind, pem) else { return };
            let key = AgentKey::parse(&private).unwrap_or_else(|e| panic!("{kind} pem={pem}: {e}"));
            let blob = STANDARD.decode(public.split_whitespace().nth(1).unwrap()).unwrap();
            assert_eq!(key.public_blob(), blob.as_slice(), "{kind} pem={pem}: wrong public key");

            let list = answer(&key, &[SSH_AGENTC_REQUEST_IDENTITIES]);
            let mut w = Wire(&list[1..]);
            assert_eq!((list[0], w.u32()), (SSH_AGENT_IDENTITIES_ANSWER, Some(1)));
            assert_eq!(w.string(), Some(blob.as_slice()));

            let data = b"session hash and userauth request";
            let reply = answer(&key, &sign_request(&blob, data, flags));
            assert_eq!(reply[0], SSH_AGENT_SIGN_RESPONSE, "{kind} pem={pem}");
            let mut w = Wire(&reply[1..]);
            let mut sig = Wire(w.string().unwrap());
            let (alg, raw) = (sig.string().unwrap(), sig.string().unwrap());
            let mut pk = Wire(&blob);
            pk.string();
            let verified = match alg {
                b"ssh-ed25519" => UnparsedPublicKey::new(&ED25519, pk.string().unwrap()).verify(data, raw),
                b"rsa-sha2-256" | b"rsa-sha2-512" => {
                    let (e, n) = (pk.mpint().unwrap(), pk.mpint().unwrap());
                    let alg =
                        if alg == b"rsa-sha2-256" { &RSA_PKCS1_2048_8192_SHA256 } else { &RSA_PKCS1_2048_8192_SHA512 };
                    ring::rsa::PublicKeyComponents { n, e }.verify(alg, data, raw)
                }
                other => panic!("unexpected algorithm {}", String::from_utf8_lossy(other)),
            };
            assert!(verified.is_ok(), "{kind} pem={pem}: the signature does not verify");
        }
    }

    /// Never: a signature with SHA-1, for another key, or any key management for a job.
    #[test]
    fn other_keys_sha1_and_key_management_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        let Some((rsa, _)) = keygen(dir.path(), "rsa", false) else { return };
        let Some((ed, _)) = keygen(dir.path(), "ed25519", false) else { return };
        let (rsa, ed) = (AgentKey::parse(&rsa).unwrap(), AgentKey::parse(&ed).unwrap());
        assert_eq!(answer(&rsa, &sign_request(rsa.public_blob(), b"x", 0)), [SSH_AGENT_FAILURE]);
        assert_eq!(answer(&ed, &sign_request(rsa.public_blob(), b"x", 0)), [SSH_AGENT_FAILURE]);
        for kind in [17u8, 18, 19, 22, 25, 27] {
            assert_eq!(answer(&ed, &[kind, 0, 0, 0, 0]), [SSH_AGENT_FAILURE], "request {kind}");
        }
        assert_eq!(answer(&ed, &[]), [SSH_AGENT_FAILURE]);
        assert_eq!(answer(&ed, &[SSH_AGENTC_SIGN_REQUEST, 0, 0, 9]), [SSH_AGENT_FAILURE]);
    }

    #[test]
    fn encrypted_and_foreign_keys_are_refused_without_quoting_them() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("enc");
        let ok = Command::new("ssh-keygen")
            .args(["-q", "-t", "ed25519", "-N", "passphrase", "-f"])
            .arg(&path)
            .status()
            .is_ok_and(|s| s.success());
        if ok {
            let text = std::fs::read_to_string(&path).unwrap();
            assert_eq!(AgentKey::parse(&text).unwrap_err(), KeyError::Encrypted);
        }
        assert_eq!(AgentKey::parse("not a key").unwrap_err(), KeyError::NotPem);
        let e = AgentKey::parse("-----BEGIN EC PRIVATE KEY-----\nAAAA\n-----END EC PRIVATE KEY-----\n").unwrap_err();
        assert!(!e.to_string().contains("AAAA"), "{e}");
    }

    /// The real OpenSSH client against the served socket: `ssh-add -l` lists the key and
    /// `ssh-keygen -Y sign` (given only the public key, so the agent must sign) makes a
    /// signature `ssh-keygen -Y check-novalidate` accepts, for an Ed25519 and an RSA key.
    /// Never: a key the client cannot use through the agent.
    #[tokio::test]
    async fn openssh_signs_through_the_agent_with_ed25519_and_rsa() {
        let dir = tempfile::tempdir().unwrap();
        for kind in ["ed25519", "rsa"] {
            let Some((private, public)) = keygen(dir.path(), kind, false) else { return };
            let agent = serve(AgentKey::parse(&private).unwrap(), None).unwrap();
            let sock = agent.socket().to_path_buf();
            let d = dir.path().to_path_buf();
            let ok = tokio::task::spawn_blocking(move || {
                let pubfile = d.join(format!("{kind}.pub"));
                std::fs::write(&pubfile, &public).unwrap();
                std::fs::write(d.join("data"), b"signed through the agent").unwrap();
                let run = |args: &[&str], stdin: Option<&Path>| {
                    let mut c = Command::new(args[0]);
                    c.args(&args[1..]).env("SSH_AUTH_SOCK", &sock).current_dir(&d);
                    if let Some(f) = stdin {
                        c.stdin(std::fs::File::open(f).unwrap());
                    }
                    let out = c.output().unwrap();
                    assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
                    String::from_utf8_lossy(&out.stdout).into_owned()
                };
                let listed = run(&["ssh-add", "-l"], None);
                let p = pubfile.to_str().unwrap();
                run(&["ssh-keygen", "-Y", "sign", "-n", "file", "-f", p, "data"], None);
                run(
                    &["ssh-keygen", "-Y", "check-novalidate", "-n", "file", "-f", p, "-s", "data.sig"],
                    Some(&d.join("data")),
                );
                let _ = std::fs::remove_file(d.join("data.sig"));
                listed
            })
            .await
            .unwrap();
            let key = AgentKey::parse(&private).unwrap();
            assert!(ok.contains(&key.fingerprint()), "{kind}: ssh-add -l shows {ok}");
        }
    }

    /// Never: a live supervisor's socket directory removed, or anything else in the base.
    #[test]
    fn only_the_directories_of_gone_supervisors_are_removed() {
        let base = tempfile::tempdir().unwrap();
        let dead = base.path().join(format!("{AGENT_DIR_PREFIX}{}.abc", i32::MAX));
        let live = base.path().join(format!("{AGENT_DIR_PREFIX}1.abc"));
        let ours = base.path().join(format!("{AGENT_DIR_PREFIX}{}.old", std::process::id()));
        let other = base.path().join("sshd");
        for d in [&dead, &live, &ours, &other] {
            std::fs::create_dir(d).unwrap();
        }
        remove_stale(base.path());
        assert!(!dead.exists() && !ours.exists(), "a stale directory was kept");
        assert!(live.exists() && other.exists(), "a live or foreign directory was removed");
    }

    #[test]
    fn modulo_matches_small_numbers() {
        for (a, m) in [(1_000_003u64, 97u64), (0xffff_ffff_ffff, 0x1_0001), (5, 7), (7, 7), (123_456_789, 1)] {
            let r = modulo(&a.to_be_bytes(), &m.to_be_bytes()[m.leading_zeros() as usize / 8..]);
            let mut want = (a % m).to_be_bytes().to_vec();
            let first = want.iter().position(|b| *b != 0).unwrap_or(want.len());
            want.drain(..first);
            assert_eq!(r, want, "{a} mod {m}");
        }
        assert_eq!(minus_one(&[1, 0, 0]), [0, 255, 255]);
    }

    #[test]
    fn the_storage_host_file_replaces_a_planted_link_and_belongs_to_the_user() {
        let home = tempfile::tempdir().unwrap();
        let target = home.path().join("target");
        std::fs::write(&target, "keep").unwrap();
        std::os::unix::fs::symlink(&target, home.path().join("ci-storage-host")).unwrap();
        assert!(write_storage_host(home.path(), "guest@storage:10022", None).unwrap());
        assert_eq!(std::fs::read_to_string(&target).unwrap(), "keep", "wrote through the link");
        let file = home.path().join("ci-storage-host");
        assert!(!file.symlink_metadata().unwrap().file_type().is_symlink());
        assert_eq!(std::fs::read_to_string(&file).unwrap(), "guest@storage:10022");
        assert!(!write_storage_host(&home.path().join("missing"), "x", None).unwrap());
    }
}
