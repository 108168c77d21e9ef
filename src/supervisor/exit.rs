//! What an exit of `run.sh` means when no drain is in progress: the decision table of README
//! "What each exit of run.sh means", apart from any I/O.

use std::time::Duration;

use crate::config::Config;

/// Failed starts in a row before giving up.
pub(super) const MAX_FAILURES: u32 = 10;

/// Everything known about one exit of `run.sh`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ExitInfo {
    pub status: String,
    pub listener_rc: Option<i32>,
    pub registration_gone: bool,
    pub session_conflict: bool,
    pub deprecated: bool,
    pub jobs_completed: u64,
    pub still_configured: bool,
}

/// How long one registration lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Lifetime {
    /// Until the container stops.
    Persistent,
    /// One job, then the supervisor exits and the orchestrator recreates the container.
    Ephemeral,
    /// One job, then a fresh ephemeral registration in the same container
    /// (`RUNNER_EPHEMERAL_RESTART`).
    EphemeralRestart,
}

impl Lifetime {
    pub fn of(cfg: &Config) -> Self {
        match (cfg.ephemeral, cfg.ephemeral_restart) {
            (false, _) => Lifetime::Persistent,
            (true, false) => Lifetime::Ephemeral,
            (true, true) => Lifetime::EphemeralRestart,
        }
    }
}

/// What to do after `run.sh` exits by itself (no drain in progress).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    /// Start `run.sh` again after the delay, with the same registration.
    Restart(Duration),
    /// The runner was updating itself when run.sh ended: start `run.sh` again at once.
    Updated,
    /// Register afresh (new token, `config.sh`) after the delay.
    Reregister(Duration),
    /// The runner's work is over (an ephemeral runner ran its job): de-register, exit 0.
    Done,
    /// An ephemeral runner ran its job and `RUNNER_EPHEMERAL_RESTART` is on: remove whatever
    /// lingers of it, register a fresh runner (new name) at once and go on.
    Renew,
    /// Give up: de-register, exit with `RunnerFailed`.
    Fatal(String),
}

/// The fatal verdict on a runner GitHub no longer accepts.
pub(super) const DEPRECATED: &str =
    "GitHub refuses this runner version (deprecated): rebuild the image with a newer runner";

/// Restart delay after `failures` consecutive failed runs: 1 s, 2 s, 4 s … 60 s.
pub fn restart_delay(failures: u32) -> Duration {
    Duration::from_secs((1u64 << failures.min(6)).min(60))
}

/// The table in the README ("What each exit of run.sh means").
pub fn decide(info: &ExitInfo, lifetime: Lifetime, failures: u32) -> Decision {
    let delay = restart_delay(failures);
    if info.jobs_completed > 0 {
        match lifetime {
            Lifetime::Persistent => {}
            Lifetime::Ephemeral => return Decision::Done,
            Lifetime::EphemeralRestart => return Decision::Renew,
        }
    }
    if info.deprecated || info.listener_rc == Some(7) {
        // GitHub has sent this for the current version during an outage (actions/runner#4613):
        // retry a few times before believing it.
        return if failures >= 2 {
            Decision::Fatal(DEPRECATED.into())
        } else {
            Decision::Restart(delay.max(Duration::from_secs(5)))
        };
    }
    if info.registration_gone || !info.still_configured {
        return Decision::Reregister(delay);
    }
    // A self-update (Listener rc 3, or 4 when ephemeral) never ends run.sh: run-helper waits
    // for `update.finished` and returns 2, and run.sh starts the new version (reference §3.2,
    // §4.8). Seeing it here means run.sh stopped in between (killed, or a run.sh that does
    // not loop): the update is done or will be redone, so start again at once. It still
    // counts as a failure, so a run.sh that dies at every update cannot loop hot.
    if matches!(info.listener_rc, Some(3 | 4)) && failures < MAX_FAILURES {
        return Decision::Updated;
    }
    // A conflicting session, or a Listener that died without deleting its session (killed by a
    // signal: OOM, SIGKILL), means the server holds a stale session for minutes; the Listener
    // would retry it for 240 s and give up. Re-registering with --replace gets a new one now.
    let killed = info.listener_rc.is_some_and(|rc| rc > 128);
    if info.session_conflict || info.listener_rc == Some(5) || killed {
        return Decision::Reregister(delay);
    }
    if failures >= MAX_FAILURES {
        return Decision::Fatal(format!("run.sh failed {failures} times in a row (last: {})", info.status));
    }
    Decision::Restart(delay)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn info() -> ExitInfo {
        ExitInfo { status: "exit status 0".into(), still_configured: true, ..Default::default() }
    }

    #[test]
    fn ephemeral_runner_is_done_after_its_job() {
        let i = ExitInfo { jobs_completed: 1, ..info() };
        assert_eq!(decide(&i, Lifetime::Ephemeral, 0), Decision::Done);
        assert_eq!(decide(&i, Lifetime::Persistent, 0), Decision::Restart(Duration::from_secs(1)));
    }

    #[test]
    fn restart_mode_renews_the_registration_after_the_job() {
        let done = ExitInfo { jobs_completed: 1, ..info() };
        assert_eq!(decide(&done, Lifetime::EphemeralRestart, 0), Decision::Renew);
        // Even when the Listener removed its files (still_configured false) or the server had
        // already removed the registration: the job ran, so a fresh runner, not a re-register.
        let gone = ExitInfo { jobs_completed: 1, still_configured: false, registration_gone: true, ..info() };
        assert_eq!(decide(&gone, Lifetime::EphemeralRestart, 3), Decision::Renew);
        assert_eq!(decide(&gone, Lifetime::Ephemeral, 3), Decision::Done);
        // No job yet: an ephemeral runner's crash is handled like any other.
        let crashed = ExitInfo { status: "signal 9".into(), ..info() };
        assert_eq!(decide(&crashed, Lifetime::EphemeralRestart, 0), Decision::Restart(Duration::from_secs(1)));
    }

    #[test]
    fn lifetime_follows_the_configuration() {
        struct NoUsers;
        impl crate::config::UserDb for NoUsers {
            fn lookup(&self, _: &str) -> Option<crate::config::RunnerUser> {
                None
            }
        }
        let lifetime = |extra: &[(&str, &str)]| {
            let base =
                [("GH_TOKEN", "t"), ("GH_REPOSITORY", "a/b"), ("GH_LABELS", "x"), ("SECRETS_DIR", "/nonexistent")];
            let env: std::collections::BTreeMap<String, String> =
                base.iter().chain(extra).map(|(k, v)| (k.to_string(), v.to_string())).collect();
            let ok = |_: &std::path::Path| true;
            let host = crate::config::Host { is_root: false, users: &NoUsers, runner_dir_ok: &ok };
            Lifetime::of(&Config::from_env(&env, &host).unwrap())
        };
        assert_eq!(lifetime(&[]), Lifetime::Persistent);
        assert_eq!(lifetime(&[("RUNNER_EPHEMERAL", "true")]), Lifetime::Ephemeral);
        assert_eq!(
            lifetime(&[("RUNNER_EPHEMERAL", "true"), ("RUNNER_EPHEMERAL_RESTART", "yes")]),
            Lifetime::EphemeralRestart
        );
    }

    #[test]
    fn a_self_update_exit_restarts_at_once_and_never_ends_the_container() {
        for rc in [3, 4] {
            let i = ExitInfo { listener_rc: Some(rc), ..info() };
            for lifetime in [Lifetime::Persistent, Lifetime::Ephemeral, Lifetime::EphemeralRestart] {
                assert_eq!(decide(&i, lifetime, 0), Decision::Updated, "rc {rc} {lifetime:?}");
                assert_eq!(decide(&i, lifetime, MAX_FAILURES - 1), Decision::Updated);
            }
            // A run.sh that dies at every update gives up like any crash loop.
            assert!(matches!(decide(&i, Lifetime::Persistent, MAX_FAILURES), Decision::Fatal(_)));
            // An update whose Listener also lost its files re-registers.
            let unconfigured = ExitInfo { still_configured: false, ..i };
            assert_eq!(decide(&unconfigured, Lifetime::Persistent, 0), Decision::Reregister(Duration::from_secs(1)));
        }
    }

    #[test]
    fn crashes_restart_with_growing_backoff_then_give_up() {
        let i = ExitInfo { status: "signal 9".into(), ..info() };
        assert_eq!(decide(&i, Lifetime::Persistent, 0), Decision::Restart(Duration::from_secs(1)));
        assert_eq!(decide(&i, Lifetime::Persistent, 3), Decision::Restart(Duration::from_secs(8)));
        assert_eq!(decide(&i, Lifetime::Persistent, 9), Decision::Restart(Duration::from_secs(60)));
        assert!(matches!(decide(&i, Lifetime::Persistent, MAX_FAILURES), Decision::Fatal(_)));
    }

    #[test]
    fn lost_registration_reregisters() {
        assert_eq!(
            decide(&ExitInfo { registration_gone: true, ..info() }, Lifetime::Persistent, 0),
            Decision::Reregister(Duration::from_secs(1))
        );
        assert_eq!(
            decide(&ExitInfo { still_configured: false, ..info() }, Lifetime::Persistent, 1),
            Decision::Reregister(Duration::from_secs(2))
        );
    }

    #[test]
    fn stale_sessions_reregister_at_once() {
        let i = ExitInfo { listener_rc: Some(5), ..info() };
        assert_eq!(decide(&i, Lifetime::Persistent, 0), Decision::Reregister(Duration::from_secs(1)));
        let i = ExitInfo { session_conflict: true, ..info() };
        assert_eq!(decide(&i, Lifetime::Persistent, 2), Decision::Reregister(Duration::from_secs(4)));
        let killed = ExitInfo { listener_rc: Some(137), ..info() };
        assert_eq!(decide(&killed, Lifetime::Persistent, 0), Decision::Reregister(Duration::from_secs(1)));
        let clean = ExitInfo { listener_rc: Some(0), ..info() };
        assert_eq!(decide(&clean, Lifetime::Persistent, 0), Decision::Restart(Duration::from_secs(1)));
    }

    #[test]
    fn deprecated_is_retried_before_it_is_fatal() {
        let i = ExitInfo { listener_rc: Some(7), ..info() };
        assert_eq!(decide(&i, Lifetime::Persistent, 0), Decision::Restart(Duration::from_secs(5)));
        let Decision::Fatal(msg) = decide(&i, Lifetime::Persistent, 2) else { panic!("not fatal") };
        assert!(msg.contains("rebuild the image with a newer runner"), "{msg}");
        let line = ExitInfo { deprecated: true, listener_rc: Some(1), ..info() };
        assert!(matches!(decide(&line, Lifetime::EphemeralRestart, 2), Decision::Fatal(_)));
    }
}
