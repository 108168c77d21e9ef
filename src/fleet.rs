//! Fleet hygiene: this pool's runners on GitHub, the start-up sweep of its offline ones
//! (`RUNNER_SWEEP_OFFLINE_SEC`), and the `list`, `remove` and `prune` commands.
//!
//! A pool is what one configuration registers: every name starting with
//! `RUNNER_NAME_PREFIX` followed by `-` (the filter the original image's scaler used), or the
//! one `RUNNER_NAME`. The REST API says whether a runner is offline, never since when, so
//! "offline long enough" is judged from the name instead: generated names carry their
//! registration time, `<prefix>-<YYYYmmdd-HHMMSS>-<random>` in UTC (`supervisor::runner_name`;
//! the original image's `-<RANDOM>` suffix parses too). A runner is removed when it is
//! `offline`, not `busy`, and its name's time is at least the threshold ago. A peer container
//! registers before its Listener is online (boot hooks, the pre-warm), so the threshold is what
//! keeps a booting peer from being swept; a long-lived runner that went offline a moment ago
//! may be swept, and its supervisor then registers afresh (an offline runner holds no job).
//! Names without a time (`RUNNER_NAME`, hand-made ones) are never swept, and `prune` removes
//! them only when asked for every offline runner of the pool (no `--older-than`).
//! Every list and delete goes through [`Github`], so it is retried and counted like the rest.

use std::fmt;
use std::io::{BufRead, Write};
use std::net::SocketAddr;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::Serialize;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{info, warn};

use crate::config::{OpsConfig, RunnerName, Scope};
use crate::error::{chain, ExitCode};
use crate::github::{Budget, Deleted, Github, GithubError, RunnerInfo};

/// At most this many runners are removed by one start-up sweep: a fleet that boots together
/// would otherwise all walk the same thousands of leftovers (`prune` clears them at once).
pub const SWEEP_MAX: usize = 100;
/// The whole sweep (listing and deletes, retries included) fits in this; it only delays the boot.
pub const SWEEP_BUDGET: Duration = Duration::from_secs(30);

/// The runners one configuration names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pool {
    /// `<prefix>-…`: the supervisor's generated names.
    Prefix(String),
    /// One fixed name (`RUNNER_NAME`).
    Exact(String),
}

impl Pool {
    pub fn of(name: &RunnerName) -> Self {
        match name {
            RunnerName::Prefix(p) => Pool::Prefix(p.clone()),
            RunnerName::Exact(n) => Pool::Exact(n.clone()),
        }
    }

    /// Whether `runner` is one of this pool's names: the prefix and a `-`, so `ci-storage`
    /// does not take in `ci-storage2-…`. GitHub compares names without case; so do we.
    pub fn contains(&self, runner: &str) -> bool {
        match self {
            Pool::Prefix(p) => {
                strip_prefix_ci(runner, p).and_then(|r| r.strip_prefix('-')).is_some_and(|r| !r.is_empty())
            }
            Pool::Exact(n) => runner.eq_ignore_ascii_case(n),
        }
    }

    /// When a runner of this pool was registered (Unix seconds), read from its name
    /// `<prefix>-<YYYYmmdd-HHMMSS>-<suffix>`; `None` for a name that carries no time.
    pub fn registered_at(&self, runner: &str) -> Option<i64> {
        let Pool::Prefix(p) = self else { return None };
        name_time(strip_prefix_ci(runner, p)?.strip_prefix('-')?)
    }
}

impl fmt::Display for Pool {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Pool::Prefix(p) => write!(f, "{p}-*"),
            Pool::Exact(n) => f.write_str(n),
        }
    }
}

fn strip_prefix_ci<'a>(s: &'a str, prefix: &str) -> Option<&'a str> {
    let head = s.get(..prefix.len())?;
    head.eq_ignore_ascii_case(prefix).then(|| &s[prefix.len()..])
}

/// `YYYYmmdd-HHMMSS-<suffix>` (the suffix 1-16 letters and digits) as Unix seconds, UTC.
fn name_time(rest: &str) -> Option<i64> {
    let b = rest.as_bytes();
    let digits = |r: std::ops::Range<usize>| b.get(r).is_some_and(|d| d.iter().all(u8::is_ascii_digit));
    if !(digits(0..8) && b.get(8) == Some(&b'-') && digits(9..15) && b.get(15) == Some(&b'-')) {
        return None;
    }
    let suffix = &rest[16..];
    if suffix.is_empty() || suffix.len() > 16 || !suffix.bytes().all(|c| c.is_ascii_alphanumeric()) {
        return None;
    }
    let format = time::macros::format_description!("[year][month][day]-[hour][minute][second]");
    let t = time::PrimitiveDateTime::parse(&rest[..15], format).ok()?;
    Some(t.assume_utc().unix_timestamp())
}

fn now_unix() -> i64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs() as i64).unwrap_or(0)
}

/// Whether the sweep or `prune` removes `r`: one of the pool's, `offline`, not `busy`, and,
/// with a threshold, registered (by its name) at least that long before `now`. A name without
/// a time, or with one in the future, never passes a threshold.
pub fn removable(pool: &Pool, r: &RunnerInfo, older_than: Option<Duration>, now: i64) -> bool {
    if !pool.contains(&r.name) || !r.status.eq_ignore_ascii_case("offline") || r.busy {
        return false;
    }
    match older_than {
        None => true,
        Some(age) => pool
            .registered_at(&r.name)
            .is_some_and(|t| now.saturating_sub(t) >= i64::try_from(age.as_secs()).unwrap_or(i64::MAX)),
    }
}

/// Fisher-Yates with the OS's randomness: containers that start together then spread their
/// deletes over the leftovers instead of racing for the same ones.
fn shuffle<T>(items: &mut [T]) {
    for i in (1..items.len()).rev() {
        let mut b = [0u8; 4];
        let _ = getrandom::getrandom(&mut b);
        items.swap(i, u32::from_le_bytes(b) as usize % (i + 1));
    }
}

/// The start-up sweep (`RUNNER_SWEEP_OFFLINE_SEC`): remove the pool's runners that are offline
/// and were registered at least `older_than` ago. Bounded by [`SWEEP_BUDGET`] and
/// [`SWEEP_MAX`]; a busy answer (422) is skipped, not retried; a failure is a WARN and the
/// boot goes on.
pub async fn sweep(gh: &Github, scope: &Scope, pool: &Pool, older_than: Duration, cancel: &CancellationToken) {
    let deadline = Instant::now() + SWEEP_BUDGET;
    let budget = Budget { max_attempts: 3, deadline: Some(deadline), request_timeout: None };
    let runners = match gh.list_runners(scope, budget, cancel).await {
        Ok(r) => r,
        Err(e) => {
            warn!(error = %chain(&e), "Failed to list the runners; skipping the sweep of offline runners.");
            return;
        }
    };
    let now = now_unix();
    let mut doomed: Vec<&RunnerInfo> = runners.iter().filter(|r| removable(pool, r, Some(older_than), now)).collect();
    shuffle(&mut doomed);
    let left = doomed.len().saturating_sub(SWEEP_MAX);
    doomed.truncate(SWEEP_MAX);
    let (mut removed, mut busy, mut failed) = (Vec::new(), Vec::new(), 0usize);
    let mut unfinished = left;
    for (i, r) in doomed.iter().enumerate() {
        if Instant::now() >= deadline {
            unfinished += doomed.len() - i;
            break;
        }
        match gh.delete_runner(scope, r.id, budget, cancel).await {
            Ok(Deleted::Removed) => removed.push(r.name.as_str()),
            // Another container's sweep got there first.
            Ok(Deleted::AlreadyGone) => {}
            Err(GithubError::Busy { .. }) => busy.push(r.name.as_str()),
            Err(e) => {
                failed += 1;
                warn!(runner = %r.name, runner_id = r.id, error = %chain(&e), "Failed to remove an offline runner; going on.");
                if e.is_permanent() {
                    unfinished += doomed.len() - i - 1;
                    break;
                }
            }
        }
    }
    info!(
        pool = %pool,
        older_than_s = older_than.as_secs(),
        count = removed.len(),
        runners = %removed.join(","),
        busy_kept = %busy.join(","),
        failed,
        left = unfinished,
        "Swept offline runners of the pool."
    );
}

/// A subcommand and its flags.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    List { json: bool },
    Remove { names: Vec<String>, yes: bool },
    Prune { older_than: Option<Duration>, yes: bool },
}

/// Parses `list [--json]`, `remove [--yes] NAME…` and `prune [--yes] [--older-than SEC]`.
pub fn parse_args(command: &str, args: &[String]) -> Result<Command, String> {
    let (mut json, mut yes, mut older_than, mut names) = (false, false, None, Vec::new());
    let mut it = args.iter();
    let mut flags_done = false;
    while let Some(a) = it.next() {
        let (flag, inline) = match a.split_once('=') {
            Some((f, v)) if f.starts_with("--") => (f, Some(v.to_string())),
            _ => (a.as_str(), None),
        };
        match flag {
            _ if flags_done || !a.starts_with('-') || a == "-" => names.push(a.clone()),
            "--" => flags_done = true,
            "--json" if command == "list" && inline.is_none() => json = true,
            "--yes" | "-y" if command != "list" && inline.is_none() => yes = true,
            "--older-than" if command == "prune" => {
                let v = inline.or_else(|| it.next().cloned()).ok_or("--older-than needs a number of seconds")?;
                let secs = v
                    .parse::<u64>()
                    .map_err(|_| format!("--older-than {v:?}: expected a whole number of seconds, e.g. 86400"))?;
                older_than = Some(Duration::from_secs(secs));
            }
            _ => return Err(format!("unknown option {a:?} for {command}")),
        }
    }
    match command {
        "list" | "prune" if !names.is_empty() => Err(format!("{command} takes no names (got {:?})", names[0])),
        "list" => Ok(Command::List { json }),
        "prune" => Ok(Command::Prune { older_than, yes }),
        "remove" if names.is_empty() => Err("remove needs at least one runner name".into()),
        "remove" => {
            let mut unique: Vec<String> = Vec::new();
            for n in names {
                if !unique.iter().any(|u| u.eq_ignore_ascii_case(&n)) {
                    unique.push(n);
                }
            }
            Ok(Command::Remove { names: unique, yes })
        }
        other => Err(format!("unknown command {other:?}")),
    }
}

/// What to do before removing anything.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Confirmation {
    /// `--yes`.
    Given,
    /// Ask on the terminal.
    Ask,
    /// No `--yes` and no terminal to ask on: remove nothing.
    Refuse,
}

impl Confirmation {
    pub fn decide(yes: bool, stdin_is_terminal: bool) -> Self {
        match (yes, stdin_is_terminal) {
            (true, _) => Confirmation::Given,
            (false, true) => Confirmation::Ask,
            (false, false) => Confirmation::Refuse,
        }
    }
}

/// `[y/N]`: only `y` or `yes` (any case) removes; anything else, an empty line or end of
/// input declines.
pub fn accepts(answer: &str) -> bool {
    matches!(answer.trim().to_ascii_lowercase().as_str(), "y" | "yes")
}

fn plural(n: usize) -> &'static str {
    if n == 1 {
        ""
    } else {
        "s"
    }
}

/// The runner this container runs, from its `/health`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Local {
    pub name: String,
    pub state: String,
}

/// Reads `/health` at `STATUS_ADDR`; unreachable, off or nameless means no local runner.
pub fn local_runner(addr: Option<SocketAddr>) -> Option<Local> {
    let (_, body) = crate::status::query(addr?).ok()?;
    let v: serde_json::Value = serde_json::from_str(&body).ok()?;
    Some(Local {
        name: v.get("runner_name")?.as_str()?.to_string(),
        state: v.get("state").and_then(|s| s.as_str()).unwrap_or("unknown").to_string(),
    })
}

#[derive(Serialize)]
struct Row<'a> {
    name: &'a str,
    id: u64,
    status: &'a str,
    busy: bool,
    labels: Vec<&'a str>,
    /// From the name; `null` when it carries no time.
    registered_at: Option<i64>,
    local: bool,
}

#[derive(Serialize)]
struct Listing<'a> {
    scope: String,
    pool: String,
    local: Option<&'a Local>,
    runners: Vec<Row<'a>>,
}

/// The `list` output: a table (the local runner marked `*`), or one JSON document.
pub fn render_list(scope: &Scope, pool: &Pool, runners: &[RunnerInfo], local: Option<&Local>, json: bool) -> String {
    let mine: Vec<&RunnerInfo> = runners.iter().filter(|r| pool.contains(&r.name)).collect();
    let is_local = |r: &RunnerInfo| local.is_some_and(|l| l.name.eq_ignore_ascii_case(&r.name));
    let rows: Vec<Row<'_>> = mine
        .iter()
        .map(|r| Row {
            name: &r.name,
            id: r.id,
            status: &r.status,
            busy: r.busy,
            labels: r.labels.iter().map(|l| l.name.as_str()).collect(),
            registered_at: pool.registered_at(&r.name),
            local: is_local(r),
        })
        .collect();
    if json {
        let listing = Listing { scope: scope.url_path(), pool: pool.to_string(), local, runners: rows };
        return serde_json::to_string_pretty(&listing).unwrap_or_default() + "\n";
    }
    let mut out = String::new();
    let header = ["NAME", "ID", "STATUS", "BUSY", "LABELS"];
    let cells: Vec<[String; 5]> = rows
        .iter()
        .map(|r| {
            let busy = if r.busy { "yes" } else { "no" };
            [r.name.to_string(), r.id.to_string(), r.status.to_string(), busy.to_string(), r.labels.join(",")]
        })
        .collect();
    let width = |i: usize| cells.iter().map(|c| c[i].len()).chain([header[i].len()]).max().unwrap_or(0);
    let widths: Vec<usize> = (0..4).map(width).collect();
    let line = |mark: &str, c: [&str; 5]| {
        let (w0, w1, w2, w3) = (widths[0], widths[1], widths[2], widths[3]);
        let text = format!("{mark} {:<w0$}  {:>w1$}  {:<w2$}  {:<w3$}  {}", c[0], c[1], c[2], c[3], c[4]);
        format!("{}\n", text.trim_end())
    };
    if !rows.is_empty() {
        out.push_str(&line(" ", header));
    }
    for (r, c) in rows.iter().zip(&cells) {
        out.push_str(&line(if r.local { "*" } else { " " }, [&c[0], &c[1], &c[2], &c[3], &c[4]]));
    }
    out.push_str(&format!("{} runner{} of pool {} in the {}", rows.len(), plural(rows.len()), pool, scope));
    match local {
        Some(l) if rows.iter().any(|r| r.local) => out.push_str(&format!("; * = this container's ({})\n", l.state)),
        Some(l) => out.push_str(&format!("; this container's runner {} ({}) is not on GitHub\n", l.name, l.state)),
        None => out.push_str("; no runner in this container\n"),
    }
    out
}

/// The exit code a removal has earned so far.
#[derive(Debug, Default)]
struct Outcome {
    exit: Option<ExitCode>,
}

impl Outcome {
    /// Keeps the most severe code: GitHub's errors over a runner left in place.
    fn note(&mut self, code: ExitCode) {
        let rank = |c: ExitCode| match c {
            ExitCode::Ok => 0,
            ExitCode::NotRemoved => 1,
            ExitCode::GithubUnavailable => 2,
            _ => 3,
        };
        if self.exit.is_none_or(|e| rank(code) > rank(e)) {
            self.exit = Some(code);
        }
    }
}

/// Runs `list`, `remove` or `prune` to its end; prints results on stdout and problems on
/// stderr, prefixed with `ci-runner <command>:`.
pub fn run(rt: &tokio::runtime::Runtime, cmd: Command, cfg: &OpsConfig) -> ExitCode {
    let pool = Pool::of(&cfg.name);
    let cancel = CancellationToken::new();
    let name = match &cmd {
        Command::List { .. } => "list",
        Command::Remove { .. } => "remove",
        Command::Prune { .. } => "prune",
    };
    let Some(auth) = crate::github::Auth::new(&cfg.credentials, &cfg.scope) else {
        unreachable!("ops_config refuses a bare registration token");
    };
    let gh = match Github::new(&cfg.api_url, auth) {
        Ok(gh) => gh,
        Err(e) => {
            eprintln!("ci-runner {name}: failed to build the HTTP client: {}", chain(&e));
            return ExitCode::GithubUnavailable;
        }
    };
    let runners = match rt.block_on(gh.list_runners(&cfg.scope, Budget::attempts(5), &cancel)) {
        Ok(r) => r,
        Err(e) => {
            eprintln!("ci-runner {name}: failed to list the runners of the {}: {}", cfg.scope, chain(&e));
            return ExitCode::of_github(&e);
        }
    };
    let mut outcome = Outcome::default();
    let doomed: Vec<&RunnerInfo> = match &cmd {
        Command::List { json } => {
            let local = local_runner(cfg.status_addr);
            print!("{}", render_list(&cfg.scope, &pool, &runners, local.as_ref(), *json));
            return ExitCode::Ok;
        }
        Command::Prune { older_than, .. } => {
            let now = now_unix();
            runners.iter().filter(|r| removable(&pool, r, *older_than, now)).collect()
        }
        Command::Remove { names, .. } => {
            let mut found = Vec::new();
            for n in names {
                match runners.iter().find(|r| r.name.eq_ignore_ascii_case(n)) {
                    Some(r) => found.push(r),
                    None => {
                        eprintln!("ci-runner remove: runner {n:?} not found in the {}", cfg.scope);
                        outcome.note(ExitCode::NotRemoved);
                    }
                }
            }
            found
        }
    };
    if doomed.is_empty() {
        if let Command::Prune { older_than, .. } = &cmd {
            let age = older_than.map(|a| format!(" registered over {} s ago", a.as_secs())).unwrap_or_default();
            println!("No offline runner of pool {pool}{age} in the {}.", cfg.scope);
        }
        return outcome.exit.unwrap_or(ExitCode::Ok);
    }
    let yes = matches!(cmd, Command::Remove { yes: true, .. } | Command::Prune { yes: true, .. });
    let n = doomed.len();
    match Confirmation::decide(yes, nix::unistd::isatty(0).unwrap_or(false)) {
        Confirmation::Given => {}
        Confirmation::Refuse => {
            eprintln!(
                "ci-runner {name}: not removing {n} runner{} without confirmation: stdin is not a terminal; pass --yes",
                plural(n)
            );
            for r in &doomed {
                eprintln!("ci-runner {name}:   would remove {} (id {}, {})", r.name, r.id, r.status);
            }
            return ExitCode::Usage;
        }
        Confirmation::Ask => {
            let mut err = std::io::stderr().lock();
            for r in &doomed {
                let busy = if r.busy { ", busy" } else { "" };
                let _ = writeln!(err, "  {} (id {}, {}{busy})", r.name, r.id, r.status);
            }
            let _ = write!(err, "Remove {n} runner{}? [y/N] ", plural(n));
            let _ = err.flush();
            let mut answer = String::new();
            let _ = std::io::stdin().lock().read_line(&mut answer);
            if !accepts(&answer) {
                println!("Nothing removed.");
                return ExitCode::NotRemoved;
            }
        }
    }
    for r in doomed {
        match rt.block_on(gh.delete_runner(&cfg.scope, r.id, Budget::attempts(5), &cancel)) {
            Ok(Deleted::Removed) => println!("removed {} (id {})", r.name, r.id),
            Ok(Deleted::AlreadyGone) => println!("already gone {} (id {})", r.name, r.id),
            Err(GithubError::Busy { .. }) => {
                eprintln!("ci-runner {name}: kept {} (id {}): GitHub says it is running a job (422)", r.name, r.id);
                outcome.note(ExitCode::NotRemoved);
            }
            Err(e) => {
                eprintln!("ci-runner {name}: failed to remove {} (id {}): {}", r.name, r.id, chain(&e));
                outcome.note(ExitCode::of_github(&e));
                if e.is_permanent() {
                    // The token or scope is refused: the next ones would be too.
                    break;
                }
            }
        }
    }
    outcome.exit.unwrap_or(ExitCode::Ok)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn runner(name: &str, status: &str, busy: bool) -> RunnerInfo {
        RunnerInfo { id: 1, name: name.into(), status: status.into(), busy, labels: Vec::new() }
    }

    fn pool() -> Pool {
        Pool::Prefix("ci-storage".into())
    }

    /// 2026-01-01T00:00:00Z.
    const NEW_YEAR: i64 = 1_767_225_600;

    #[test]
    fn pool_is_the_prefix_and_a_dash_not_a_longer_prefix() {
        let p = pool();
        assert!(p.contains("ci-storage-20260101-000000-abc123"));
        assert!(p.contains("CI-Storage-anything"));
        assert!(!p.contains("ci-storage2-20260101-000000-abc123"));
        assert!(!p.contains("ci-storage"));
        assert!(!p.contains("ci-storage-"));
        assert!(!p.contains("ci-stor"));
        assert!(!p.contains("other-ci-storage-20260101-000000-abc123"));
        let exact = Pool::Exact("build-01".into());
        assert!(exact.contains("build-01") && exact.contains("BUILD-01"));
        assert!(!exact.contains("build-01-20260101-000000-abc123") && !exact.contains("build-0"));
        assert_eq!(Pool::of(&RunnerName::Prefix("x".into())), Pool::Prefix("x".into()));
        assert_eq!(p.to_string(), "ci-storage-*");
    }

    #[test]
    fn registration_time_comes_from_the_generated_name() {
        let p = pool();
        assert_eq!(p.registered_at("ci-storage-20260101-000000-abc123"), Some(NEW_YEAR));
        assert_eq!(p.registered_at("ci-storage-20260101-000130-zzzzzz"), Some(NEW_YEAR + 90));
        // The original image's off-AWS names: `-<RANDOM+10000>`.
        assert_eq!(p.registered_at("ci-storage-20260101-000000-12345"), Some(NEW_YEAR));
        // What the supervisor generates parses back to its own time.
        let name = crate::supervisor::runner_name(&RunnerName::Prefix("ci-storage".into()));
        let at = p.registered_at(&name).expect(&name);
        assert!((now_unix() - at).abs() <= 2, "{name}: {at}");
        for no_time in [
            "ci-storage-0abc123def4567890-0427-1315",
            "ci-storage-manual",
            "ci-storage-gpu-20260101-000000-abc123",
            "ci-storage-20261301-000000-abc123",
            "ci-storage-20260101-250000-abc123",
            "ci-storage-20260101-000000-",
            "ci-storage-20260101-000000",
            "ci-storage-20260101-000000-abc-123",
            "ci-storage-2026010-1000000-abc123",
            "ci-storage-+2026101-000000-abc123",
            "ci-storage2-20260101-000000-abc123",
        ] {
            assert_eq!(p.registered_at(no_time), None, "{no_time}");
        }
        assert_eq!(Pool::Exact("ci-storage-20260101-000000-abc123".into()).registered_at("x"), None);
    }

    #[test]
    fn only_offline_idle_runners_of_the_pool_old_enough_are_removable() {
        let p = pool();
        let day = Duration::from_secs(86_400);
        let now = NEW_YEAR + 86_400;
        let old = "ci-storage-20260101-000000-abc123";
        assert!(removable(&p, &runner(old, "offline", false), Some(day), now));
        assert!(!removable(&p, &runner(old, "offline", false), Some(day), now - 1), "one second too young");
        assert!(!removable(&p, &runner(old, "online", false), Some(day), now));
        assert!(!removable(&p, &runner(old, "offline", true), Some(day), now), "busy");
        assert!(!removable(&p, &runner(old, "", false), None, now), "unknown status");
        assert!(!removable(&p, &runner("ci-storage2-20260101-000000-abc123", "offline", false), Some(day), now));
        // No time in the name: only when every offline runner of the pool is asked for.
        assert!(!removable(&p, &runner("ci-storage-manual", "offline", false), Some(day), now));
        assert!(removable(&p, &runner("ci-storage-manual", "offline", false), None, now));
        assert!(!removable(&p, &runner("other-1", "offline", false), None, now));
        // A clock behind the name's: never old enough.
        assert!(!removable(&p, &runner(old, "offline", false), Some(Duration::from_secs(60)), NEW_YEAR - 3600));
        // An age beyond any clock (`--older-than` huge): never old enough, never wrapped negative.
        assert!(!removable(&p, &runner(old, "offline", false), Some(Duration::from_secs(u64::MAX)), now));
    }

    #[test]
    fn removals_need_yes_or_a_terminal_and_an_explicit_answer() {
        assert_eq!(Confirmation::decide(true, false), Confirmation::Given);
        assert_eq!(Confirmation::decide(true, true), Confirmation::Given);
        assert_eq!(Confirmation::decide(false, true), Confirmation::Ask);
        assert_eq!(Confirmation::decide(false, false), Confirmation::Refuse);
        for yes in ["y", "Y", "yes", " YES\n", "y\n"] {
            assert!(accepts(yes), "{yes:?}");
        }
        for no in ["", "\n", "n", "no", "N", "yep", "ye", "y y", "sure"] {
            assert!(!accepts(no), "{no:?}");
        }
    }

    fn args(a: &[&str]) -> Vec<String> {
        a.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn command_lines() {
        assert_eq!(parse_args("list", &args(&[])), Ok(Command::List { json: false }));
        assert_eq!(parse_args("list", &args(&["--json"])), Ok(Command::List { json: true }));
        assert_eq!(
            parse_args("remove", &args(&["a", "--yes", "B", "b", "-y"])),
            Ok(Command::Remove { names: args(&["a", "B"]), yes: true })
        );
        assert_eq!(
            parse_args("remove", &args(&["--", "--odd"])),
            Ok(Command::Remove { names: args(&["--odd"]), yes: false })
        );
        assert_eq!(parse_args("prune", &args(&[])), Ok(Command::Prune { older_than: None, yes: false }));
        let day = Some(Duration::from_secs(86_400));
        assert_eq!(
            parse_args("prune", &args(&["--older-than", "86400", "-y"])),
            Ok(Command::Prune { older_than: day, yes: true })
        );
        assert_eq!(
            parse_args("prune", &args(&["--older-than=86400"])),
            Ok(Command::Prune { older_than: day, yes: false })
        );
        for (cmd, bad) in [
            ("remove", &[][..]),
            ("remove", &["--yes"][..]),
            ("list", &["--yes"][..]),
            ("list", &["name"][..]),
            ("prune", &["name"][..]),
            ("prune", &["--older-than"][..]),
            ("prune", &["--older-than", "1d"][..]),
            ("prune", &["--json"][..]),
            ("remove", &["--older-than", "5", "x"][..]),
            ("list", &["--json=1"][..]),
        ] {
            assert!(parse_args(cmd, &args(bad)).is_err(), "{cmd} {bad:?}");
        }
    }

    #[test]
    fn list_marks_the_local_runner_and_shows_only_the_pool() {
        let scope = Scope::Repository { owner: "o".into(), repo: "r".into() };
        let mut a = runner("ci-storage-20260101-000000-aaaaaa", "online", true);
        a.labels = vec![
            crate::github::RunnerLabel { name: "self-hosted".into() },
            crate::github::RunnerLabel { name: "linux".into() },
        ];
        a.id = 7;
        let b = RunnerInfo { id: 1234, ..runner("ci-storage-manual", "offline", false) };
        let other = runner("ci-storage2-20260101-000000-aaaaaa", "online", false);
        let local = Local { name: "ci-storage-20260101-000000-aaaaaa".into(), state: "busy".into() };
        let text = render_list(&scope, &pool(), &[a.clone(), b.clone(), other.clone()], Some(&local), false);
        let lines: Vec<&str> = text.lines().collect();
        assert_eq!(lines.len(), 4, "{text}");
        assert!(lines[0].starts_with("  NAME") && lines[0].contains("LABELS"), "{text}");
        assert!(
            lines[1].starts_with("* ci-storage-20260101-000000-aaaaaa") && lines[1].ends_with("self-hosted,linux"),
            "{text}"
        );
        assert!(lines[1].contains(" yes "), "{text}");
        assert!(
            lines[2].starts_with("  ci-storage-manual") && lines[2].contains("1234") && lines[2].contains("offline"),
            "{text}"
        );
        assert!(!text.contains("ci-storage2"), "{text}");
        assert!(lines[3].contains("2 runners of pool ci-storage-*") && lines[3].contains("(busy)"), "{text}");

        let json: serde_json::Value =
            serde_json::from_str(&render_list(&scope, &pool(), &[a, b, other], Some(&local), true)).unwrap();
        assert_eq!(json["scope"], "o/r");
        assert_eq!(json["local"]["state"], "busy");
        assert_eq!(json["runners"].as_array().unwrap().len(), 2);
        assert_eq!(json["runners"][0]["local"], true);
        assert_eq!(json["runners"][0]["registered_at"], NEW_YEAR);
        assert_eq!(json["runners"][0]["labels"], serde_json::json!(["self-hosted", "linux"]));
        assert_eq!(json["runners"][1]["local"], false);
        assert!(json["runners"][1]["registered_at"].is_null());

        let text = render_list(&scope, &pool(), &[], None, false);
        assert!(text.starts_with("0 runners of pool") && text.contains("no runner in this container"), "{text}");
    }

    #[test]
    fn the_worst_outcome_sets_the_exit_code() {
        let mut o = Outcome::default();
        o.note(ExitCode::NotRemoved);
        o.note(ExitCode::GithubRefused);
        o.note(ExitCode::NotRemoved);
        assert_eq!(o.exit, Some(ExitCode::GithubRefused));
        let mut o = Outcome::default();
        o.note(ExitCode::GithubUnavailable);
        o.note(ExitCode::NotRemoved);
        assert_eq!(o.exit, Some(ExitCode::GithubUnavailable));
    }

    #[test]
    fn shuffle_keeps_every_item() {
        let mut v: Vec<u32> = (0..50).collect();
        shuffle(&mut v);
        v.sort_unstable();
        assert_eq!(v, (0..50).collect::<Vec<_>>());
    }
}
