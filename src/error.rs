//! The top-level error and the process exit codes (documented in the README's table).

use crate::config::ConfigError;
use crate::github::GithubError;
use crate::runner::RunnerError;

/// Exit codes of `ci-runner`. PID 1 passes the supervisor's code through unchanged, and
/// reports 128+n when the supervisor died of signal n.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum ExitCode {
    /// Drained and de-registered after a signal, or an ephemeral runner finished its job.
    Ok = 0,
    /// An unexpected internal failure (a bug, a panic); the registration was cleaned up.
    Internal = 1,
    /// Bad command line.
    Usage = 2,
    /// Bad environment: every problem was printed; nothing was called or started.
    Config = 3,
    /// GitHub refused the credentials or the scope (401/403/404).
    GithubRefused = 4,
    /// GitHub stayed unreachable or failing through every retry.
    GithubUnavailable = 5,
    /// The runner failed for good: config.sh refused, too many crashes, or a deprecated version.
    RunnerFailed = 6,
    /// The drain deadline passed with a job running: the job was cancelled, the runner removed.
    DrainTimeout = 7,
    /// A boot hook (`entrypoint.*.sh`) failed; nothing was registered.
    Hook = 8,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        self as i32
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("failed to talk to GitHub")]
    Github(#[from] GithubError),
    #[error("failed to run the actions runner")]
    Runner(#[from] RunnerError),
    #[error("failed to serve the status endpoint on {addr}")]
    Status {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to serve the admin API on {addr}")]
    Admin {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to build the HTTP client")]
    Http(#[source] reqwest::Error),
    #[error("failed to prepare the runner directory {path}")]
    Prepare {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("failed to boot")]
    Hook(#[from] crate::hooks::HookError),
    #[error("failed to set up the hardware lock")]
    Lock(#[from] crate::lock::LockError),
    #[error("failed to start the port forwards")]
    Forward(#[from] crate::forward::ForwardError),
    #[error("the runner failed for good: {0}")]
    RunnerGaveUp(String),
    #[error("failed to find this instance's labels")]
    Instance(#[from] crate::instance::InstanceError),
    #[error(transparent)]
    Secrets(#[from] crate::secrets::SecretsError),
}

impl Error {
    pub fn exit_code(&self) -> ExitCode {
        match self {
            // A port already taken is the operator's to fix, like a bad variable.
            Error::Config(_) | Error::Forward(_) | Error::Instance(_) | Error::Secrets(_) => ExitCode::Config,
            Error::Github(e) if e.is_permanent() => ExitCode::GithubRefused,
            Error::Github(_) => ExitCode::GithubUnavailable,
            Error::Runner(_) | Error::RunnerGaveUp(_) | Error::Prepare { .. } | Error::Lock(_) => {
                ExitCode::RunnerFailed
            }
            Error::Status { .. } | Error::Admin { .. } | Error::Http(_) => ExitCode::Internal,
            Error::Hook(_) => ExitCode::Hook,
        }
    }
}

/// The error and its whole `source` chain on one line, for the `error` log field.
pub fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut out = err.to_string();
    let mut cur = err.source();
    while let Some(e) = cur {
        out.push_str(": ");
        out.push_str(&e.to_string());
        cur = e.source();
    }
    out
}
