//! The top-level error and the process exit codes (documented in the README's table).

use crate::config::ConfigError;
use crate::github::GithubError;
use crate::runner::RunnerError;

/// Exit codes of `ci-runner`, the supervisor's and the fleet commands' (`list`, `remove`,
/// `prune`) alike: the README's tables. PID 1 passes the supervisor's code through unchanged,
/// and reports 128+n when the supervisor died of signal n.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitCode {
    /// Drained and de-registered after a signal, or an ephemeral runner finished its job; for
    /// the fleet commands, listed, or every runner asked for removed (or none to remove).
    Ok,
    /// An unexpected internal failure (a bug, a panic); the registration was cleaned up.
    Internal,
    /// A fleet command left some runner in place: busy (GitHub's 422), not found, or the
    /// prompt declined. The same code as [`ExitCode::Internal`], which only the supervisor uses.
    NotRemoved,
    /// Bad command line (for `remove`/`prune`, also a removal without `--yes` while stdin is
    /// not a terminal).
    Usage,
    /// Bad environment: every problem was printed; nothing was called or started.
    Config,
    /// GitHub refused the credentials or the scope (401/403/404).
    GithubRefused,
    /// GitHub stayed unreachable or failing through every retry.
    GithubUnavailable,
    /// The runner failed for good: config.sh refused, too many crashes, or a deprecated version.
    RunnerFailed,
    /// The drain deadline passed with a job running: the job was cancelled, the runner removed.
    DrainTimeout,
    /// A boot hook (`entrypoint.*.sh`) failed; nothing was registered.
    Hook,
}

impl ExitCode {
    pub fn code(self) -> i32 {
        match self {
            Self::Ok => 0,
            Self::Internal | Self::NotRemoved => 1,
            Self::Usage => 2,
            Self::Config => 3,
            Self::GithubRefused => 4,
            Self::GithubUnavailable => 5,
            Self::RunnerFailed => 6,
            Self::DrainTimeout => 7,
            Self::Hook => 8,
        }
    }

    /// A GitHub failure after the retries: refused for good, or unavailable.
    pub fn of_github(e: &GithubError) -> Self {
        if e.is_permanent() {
            Self::GithubRefused
        } else {
            Self::GithubUnavailable
        }
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
            Error::Github(e) => ExitCode::of_github(e),
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

#[cfg(test)]
mod tests {
    use super::ExitCode::*;

    /// The README's tables, the supervisor's (0-8) and the fleet commands' (0-5) in one: a
    /// code never changes meaning for the scripts and health checks that read it.
    #[test]
    fn exit_codes_are_the_readmes() {
        let table = [
            (Ok, 0),
            (Internal, 1),
            (NotRemoved, 1),
            (Usage, 2),
            (Config, 3),
            (GithubRefused, 4),
            (GithubUnavailable, 5),
            (RunnerFailed, 6),
            (DrainTimeout, 7),
            (Hook, 8),
        ];
        for (e, code) in table {
            assert_eq!(e.code(), code, "{e:?}");
        }
    }
}
