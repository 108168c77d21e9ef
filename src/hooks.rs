//! Boot hooks: `entrypoint.*.sh` scripts that derived images drop into `/root` (run as root)
//! and `/home/guest` (run as the runner user), before registration.
//!
//! As in the original image, the hooks of one phase are *sourced*, in glob (byte) order, by one
//! bash with `set -u -e`, so they share variables, functions and traps, need no shebang or
//! executable bit, and may start background daemons with `&`. What the root phase exports reaches
//! the guest phase and the runner. Each phase runs in its own process group; daemons it leaves
//! behind are stopped (SIGTERM, then SIGKILL) after the runner, guest phase first.

use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::Duration;

use nix::sys::signal::{killpg, Signal};
use nix::unistd::Pid;
use tokio::process::Command;
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::config::{RunnerUser, SECRET_VARS};

/// Marks the start of a hook in the driver's output.
const MARK: &str = "\u{1e}ci-runner-hook ";

/// Sources each hook in order; then writes the exported environment, NUL-separated, to the
/// file named by `$1`.
const DRIVER: &str = r#"set -u -e
__ci_runner_env_out=$1; shift
for __ci_runner_hook in "$@"; do
  printf '\036ci-runner-hook %s\n' "${__ci_runner_hook##*/}"
  __ci_runner_cwd=$PWD
  source "$__ci_runner_hook"
  cd "$__ci_runner_cwd"
done
unset __ci_runner_hook __ci_runner_cwd
env -0 > "$__ci_runner_env_out"
"#;

/// The hooks of one directory: `entrypoint.*.sh` regular files, in byte order.
pub fn discover(dir: &Path) -> Vec<PathBuf> {
    let Ok(entries) = std::fs::read_dir(dir) else { return Vec::new() };
    let mut hooks: Vec<PathBuf> = entries
        .flatten()
        .filter(|e| {
            let name = e.file_name();
            let b = name.as_bytes();
            b.starts_with(b"entrypoint.")
                && b.ends_with(b".sh")
                && b.len() > "entrypoint..sh".len() - 1
                && e.path().is_file()
        })
        .map(|e| e.path())
        .collect();
    hooks.sort_by(|a, b| a.file_name().map(OsStrExt::as_bytes).cmp(&b.file_name().map(OsStrExt::as_bytes)));
    hooks
}

#[derive(Debug, thiserror::Error)]
pub enum HookError {
    #[error("failed to start the {phase} hooks")]
    Spawn {
        phase: &'static str,
        #[source]
        source: std::io::Error,
    },
    #[error("boot hook {hook} failed with {status}")]
    Failed { hook: String, status: String },
}

/// One phase: who runs it and which hooks.
pub struct Phase<'a> {
    pub name: &'static str,
    pub hooks: Vec<PathBuf>,
    /// `None`: the supervisor's own user.
    pub user: Option<&'a RunnerUser>,
    pub cwd: PathBuf,
}

/// Daemons the hooks left running, by phase process group.
#[derive(Default)]
pub struct Daemons {
    groups: Vec<(&'static str, Pid)>,
}

fn group_alive(pgid: Pid) -> bool {
    killpg(pgid, None).is_ok()
}

impl Daemons {
    /// Stops what the hooks started, last phase first: SIGTERM, then SIGKILL after `grace`.
    pub async fn stop(&mut self, grace: Duration) {
        while let Some((phase, pgid)) = self.groups.pop() {
            if !group_alive(pgid) {
                continue;
            }
            info!(phase, "Stopping daemons started by the boot hooks.");
            let _ = killpg(pgid, Signal::SIGTERM);
            let deadline = tokio::time::Instant::now() + grace;
            while group_alive(pgid) && tokio::time::Instant::now() < deadline {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            if group_alive(pgid) {
                warn!(phase, "Daemons did not stop in time: killing them.");
                let _ = killpg(pgid, Signal::SIGKILL);
            }
        }
    }
}

/// What running a phase came to.
pub enum Outcome {
    /// Exported environment of the phase (secrets removed).
    Done(Vec<(String, String)>),
    /// A signal arrived: the phase was stopped.
    Interrupted,
}

/// Runs one phase with `env`; `interrupt` resolves when a signal asks to stop.
pub async fn run_phase(
    phase: &Phase<'_>,
    env: &[(String, String)],
    daemons: &mut Daemons,
    interrupt: impl std::future::Future<Output = ()>,
) -> Result<Outcome, HookError> {
    let spawn_err = |source| HookError::Spawn { phase: phase.name, source };
    let out = tempfile::NamedTempFile::new().map_err(spawn_err)?;
    if let Some(u) = phase.user {
        nix::unistd::chown(
            out.path(),
            Some(nix::unistd::Uid::from_raw(u.uid)),
            Some(nix::unistd::Gid::from_raw(u.gid)),
        )
        .map_err(|e| spawn_err(e.into()))?;
    }
    let mut cmd = Command::new("bash");
    cmd.arg("-c").arg(DRIVER).arg("ci-runner-hooks").arg(out.path()).args(&phase.hooks);
    cmd.env_clear().envs(env.iter().map(|(k, v)| (k.as_str(), v.as_str()))).current_dir(&phase.cwd);
    cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
    let ids = phase.user.map(|u| {
        cmd.env("HOME", &u.home).env("USER", &u.name).env("LOGNAME", &u.name);
        crate::runner::identity(u)
    });
    crate::runner::drop_privileges(&mut cmd, ids);
    let mut child = cmd.spawn().map_err(spawn_err)?;
    let pgid = Pid::from_raw(child.id().unwrap_or(0) as i32);
    daemons.groups.push((phase.name, pgid));
    let (tx, mut rx) = mpsc::unbounded_channel();
    if let Some(out) = child.stdout.take() {
        crate::runner::pump(out, crate::runner::Stream::Stdout, tx.clone());
    }
    if let Some(err) = child.stderr.take() {
        crate::runner::pump(err, crate::runner::Stream::Stderr, tx);
    }
    let mut current = String::from("(driver)");
    tokio::pin!(interrupt);
    let log = |line: String, current: &mut String| {
        if let Some(name) = line.strip_prefix(MARK) {
            *current = name.to_string();
            info!(phase = phase.name, hook = %current, "Running boot hook.");
        } else {
            info!(target: "hook", "[{current}] {line}");
        }
    };
    let status = loop {
        tokio::select! {
            biased;
            Some((_, line)) = rx.recv() => log(line, &mut current),
            () = &mut interrupt => {
                info!(phase = phase.name, hook = %current, "Signal received during a boot hook: stopping it.");
                let _ = killpg(pgid, Signal::SIGTERM);
                let stopped = tokio::time::timeout(Duration::from_secs(5), child.wait()).await;
                if stopped.is_err() {
                    let _ = killpg(pgid, Signal::SIGKILL);
                    let _ = child.wait().await;
                }
                return Ok(Outcome::Interrupted);
            }
            status = child.wait() => break status.map_err(spawn_err)?,
        }
    };
    // The hook's last words (daemons may keep the pipes open: do not wait for EOF).
    while let Ok(Some((_, line))) = tokio::time::timeout(Duration::from_millis(100), rx.recv()).await {
        log(line, &mut current);
    }
    if !status.success() {
        return Err(HookError::Failed { hook: current, status: crate::runner::describe(status) });
    }
    let raw = std::fs::read(out.path()).map_err(spawn_err)?;
    Ok(Outcome::Done(parse_env(&raw)))
}

/// `env -0` output, minus secrets and the shell's own bookkeeping.
pub fn parse_env(raw: &[u8]) -> Vec<(String, String)> {
    raw.split(|b| *b == 0)
        .filter_map(|kv| {
            let kv = std::str::from_utf8(kv).ok()?;
            let (k, v) = kv.split_once('=')?;
            let skip = k.is_empty() || SECRET_VARS.contains(&k) || matches!(k, "SHLVL" | "_" | "PWD" | "OLDPWD");
            (!skip).then(|| (k.to_string(), v.to_string()))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hooks_are_found_in_byte_order() {
        let d = tempfile::tempdir().unwrap();
        for n in [
            "entrypoint.20-b.sh",
            "entrypoint.05-a.sh",
            "entrypoint.sh",
            "entrypoint.10-x.txt",
            "other.01.sh",
            "entrypoint.Z.sh",
        ] {
            std::fs::write(d.path().join(n), "").unwrap();
        }
        std::fs::create_dir(d.path().join("entrypoint.30-dir.sh")).unwrap();
        let names: Vec<_> =
            discover(d.path()).iter().map(|p| p.file_name().unwrap().to_string_lossy().into_owned()).collect();
        assert_eq!(names, ["entrypoint.05-a.sh", "entrypoint.20-b.sh", "entrypoint.Z.sh"]);
        assert!(discover(Path::new("/nonexistent")).is_empty());
    }

    #[test]
    fn exported_env_drops_secrets_and_shell_state() {
        let env = parse_env(b"A=1\0GH_TOKEN=x\0SHLVL=2\0B=two=2\0");
        assert_eq!(env, [("A".into(), "1".into()), ("B".into(), "two=2".into())]);
    }
}
