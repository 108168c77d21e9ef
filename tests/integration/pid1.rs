//! PID-1 duties, through `ci-runner init -- CMD`, both as a real PID 1 in a new PID namespace
//! (`unshare --pid --fork --mount-proc`) and as a child subreaper.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::{bin, descendants, require, require_root, wait_for};

/// `ci-runner init -- …`, started clean (see [`clean_start`]): the init keeps what it
/// inherits, so a test run under `nohup` (HUP ignored) must not pass that on.
fn init(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("init").arg("--").args(args);
    clean_start(&mut c);
    c
}

/// `ci-runner init -- …` as PID 1 of a new PID namespace.
fn in_namespace(args: &[&str]) -> Option<Command> {
    if !require_root("the PID-namespace tests") || !require("unshare") {
        return None;
    }
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", bin(), "init", "--"]).args(args);
    clean_start(&mut c);
    Some(c)
}

#[test]
fn exit_codes_pass_through_unchanged() {
    for code in [0, 1, 2, 42, 127, 255] {
        let status = init(&["sh", "-c", &format!("exit {code}")]).status().unwrap();
        assert_eq!(status.code(), Some(code), "exit {code}");
    }
}

#[test]
fn death_by_signal_becomes_128_plus_n() {
    for (sig, want) in [("TERM", 143), ("KILL", 137), ("INT", 130), ("HUP", 129)] {
        let status = init(&["sh", "-c", &format!("kill -{sig} $$")]).status().unwrap();
        assert_eq!(status.code(), Some(want), "SIG{sig}");
    }
}

#[test]
fn missing_command_is_127() {
    let status = init(&["/nonexistent/command"]).stderr(Stdio::null()).status().unwrap();
    assert_eq!(status.code(), Some(127));
}

/// Starts `cmd` with default dispositions and an empty mask, as a container's PID 1 starts.
/// The test process itself is no such start: glibc's `posix_spawn` (which cargo used) sets
/// 32 and 33 to SIG_IGN in a child when the parent had handlers for them, and `init` keeps
/// inherited ignores.
fn clean_start(cmd: &mut Command) -> &mut Command {
    use std::os::unix::process::CommandExt;
    // SAFETY: reset_signals makes only async-signal-safe system calls.
    unsafe { cmd.pre_exec(ci_runner::pid1::reset_signals) }
}

#[test]
fn child_signal_mask_and_dispositions_are_clean() {
    // Started clean, the command must be clean too: nothing of the init's own state (every
    // signal blocked, Rust's ignored SIGPIPE) may leak into it.
    for (mode, mut cmd) in both_modes(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]) {
        let out = clean_start(&mut cmd).output().unwrap();
        let text = String::from_utf8(out.stdout).unwrap();
        assert!(text.contains("SigBlk:\t0000000000000000"), "{mode}: {text}");
        assert!(text.contains("SigIgn:\t0000000000000000"), "{mode}: {text}");
    }
}

#[test]
fn signals_are_forwarded_to_the_child() {
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!("trap 'exit 7' TERM; touch {}; while :; do sleep 0.02; done", ready.display());
    let mut child = init(&["sh", "-c", &script]).spawn().unwrap();
    // Once the trap is in place, signal the init process only.
    let pid = child.id();
    wait_for("the shell's trap", Duration::from_secs(10), || ready.exists().then_some(()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_for("init to exit", Duration::from_secs(10), || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(7));
}

/// Makes 1,000 orphans (each a backgrounded grandchild that exits at once), then polls until no
/// zombie child of `$PPID_OF_INIT` remains; exits 0 when all were reaped, 1 otherwise.
const ORPHANS: &str = r#"
init=$1
i=0
while [ $i -lt 1000 ]; do ( /bin/true & ) ; i=$((i+1)); done
deadline=$(( $(date +%s) + 20 ))
while :; do
  z=0
  for s in /proc/[0-9]*/status; do
    st=$(sed -n 's/^State:[[:space:]]*\([A-Z]\).*/\1/p;s/^PPid:[[:space:]]*//p' "$s" 2>/dev/null | tr '\n' ' ')
    set -- $st
    [ "$1" = Z ] && [ "$2" = "$init" ] && z=$((z+1))
  done
  [ $z -eq 0 ] && echo "reaped all" && exit 0
  [ $(date +%s) -ge $deadline ] && echo "zombies left: $z" && exit 1
done
"#;

#[test]
fn pid1_in_a_new_namespace_reaps_a_thousand_orphans() {
    let Some(mut cmd) = in_namespace(&["sh", "-c", ORPHANS, "sh", "1"]) else { return };
    let out = cmd.output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}{}", String::from_utf8_lossy(&out.stderr));
    assert!(text.contains("reaped all"), "{text}");
}

#[test]
fn subreaper_reaps_orphans_when_not_pid1() {
    // Not PID 1: the orphans are re-parented to ci-runner (a child subreaper), which is $PPID.
    let out = init(&["sh", "-c", &format!("set -- $PPID; {ORPHANS}")]).output().unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{text}");
}

#[test]
fn pid1_in_a_namespace_passes_exit_codes_and_signals() {
    let Some(mut cmd) = in_namespace(&["sh", "-c", "exit 42"]) else { return };
    assert_eq!(cmd.status().unwrap().code(), Some(42));
    let mut cmd = in_namespace(&["sh", "-c", "kill -TERM $$"]).unwrap();
    assert_eq!(cmd.status().unwrap().code(), Some(143));
    // A SIGTERM sent to the namespace's PID 1 (by its host pid: unshare forwards nothing).
    let dir = tempfile::tempdir().unwrap();
    let ready = dir.path().join("ready");
    let script = format!("trap 'exit 9' TERM; touch {}; while :; do sleep 0.02; done", ready.display());
    let mut child = in_namespace(&["sh", "-c", &script]).unwrap().spawn().unwrap();
    let init_pid =
        wait_for("the namespace's PID 1", Duration::from_secs(10), || descendants(child.id()).first().copied());
    wait_for("the shell's trap", Duration::from_secs(10), || ready.exists().then_some(()));
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(init_pid as i32), Signal::SIGTERM).unwrap();
    let status = wait_for("the namespace to exit", Duration::from_secs(10), || child.try_wait().unwrap());
    assert_eq!(status.code(), Some(9));
}

// Issue #16: real-time signals, signals nobody forwarded, inherited ignores. Each test runs
// `ci-runner init` both as a subreaper (not PID 1) and as PID 1 of a new PID namespace.

/// Both ways of being an init: as a subreaper, and (as root) as PID 1 of a namespace.
fn both_modes(args: &[&str]) -> Vec<(&'static str, Command)> {
    let mut out = vec![("subreaper", init(args))];
    if let Some(c) = in_namespace(args) {
        out.push(("PID 1", c));
    }
    out
}

/// Signals whose default action ends a process (all of 1-64 but CHLD, CONT, URG, WINCH and
/// the four that stop it).
fn deadly_signals() -> impl Iterator<Item = i32> {
    use libc::*;
    (1..=64).filter(|s| ![SIGCHLD, SIGCONT, SIGURG, SIGWINCH, SIGSTOP, SIGTSTP, SIGTTIN, SIGTTOU].contains(s))
}

/// The process `ci-runner init` really is: itself, or the namespace's PID 1 under unshare.
fn init_pid(mode: &str, child: &std::process::Child) -> u32 {
    if mode == "subreaper" {
        return child.id();
    }
    wait_for("the namespace's PID 1", Duration::from_secs(10), || descendants(child.id()).first().copied())
}

/// A started init that is killed with everything under it when the test ends, even by a
/// failed assertion (an init that hangs must not outlive the test and hold its pipes).
struct Started(std::process::Child);

impl Started {
    fn spawn(cmd: &mut Command) -> Self {
        Self(cmd.spawn().unwrap())
    }
}

impl Drop for Started {
    fn drop(&mut self) {
        for p in descendants(self.0.id()) {
            let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), Signal::SIGKILL);
        }
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn alive(pid: u32) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .is_ok_and(|s| s.rsplit_once(')').is_some_and(|(_, r)| !r.trim_start().starts_with('Z')))
}

fn comm(pid: u32) -> String {
    std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default().trim().to_string()
}

fn zombie_children(pid: u32) -> usize {
    let parent = format!("PPid:\t{pid}\n");
    let mut n = 0;
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if let Ok(s) = std::fs::read_to_string(e.path().join("status")) {
            n += usize::from(s.contains("State:\tZ") && s.contains(&parent));
        }
    }
    n
}

#[test]
fn death_by_every_deadly_signal_up_to_64_is_128_plus_n() {
    // Never: a hang (nix could not hold 32-64, the init waited forever) or another code.
    for sig in deadly_signals() {
        for (mode, mut cmd) in both_modes(&["sh", "-c", &format!("kill -{sig} $$")]) {
            let mut child = Started::spawn(clean_start(&mut cmd));
            let status =
                wait_for(&format!("init ({mode}) to exit after signal {sig}"), Duration::from_secs(10), || {
                    child.0.try_wait().unwrap()
                });
            assert_eq!(status.code(), Some(128 + sig), "{mode}: child killed by signal {sig}");
        }
    }
}

#[test]
fn realtime_death_under_timeout_prints_162_not_137() {
    // The issue's reproduction: the init hung until timeout's KILL (137).
    if !require("timeout") {
        return;
    }
    let script = format!("timeout -k 2 1 {} init -- sh -c 'kill -34 $$'; echo $?", bin());
    let out = Command::new("sh").args(["-c", &script]).output().unwrap();
    assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), "162");
}

#[test]
fn alrm_pwr_rtmin3_to_the_init_reach_the_child_in_both_modes() {
    // Never: the init killed by the signal with `sleep` orphaned (not PID 1), or the signal
    // dropped and the init waiting on (PID 1).
    for (name, sig) in [("ALRM", libc::SIGALRM), ("PWR", libc::SIGPWR), ("RTMIN+3", 37)] {
        for (mode, mut cmd) in both_modes(&["sleep", "77"]) {
            let mut child = Started::spawn(&mut cmd);
            let init = init_pid(mode, &child.0);
            let sleep = wait_for(&format!("{mode}: sleep under the init"), Duration::from_secs(10), || {
                descendants(init).into_iter().find(|p| comm(*p) == "sleep")
            });
            // SAFETY: kill with plain integers.
            assert_eq!(unsafe { libc::kill(init as i32, sig) }, 0);
            let status = wait_for(&format!("{mode}: init to exit after SIG{name}"), Duration::from_secs(10), || {
                child.0.try_wait().unwrap()
            });
            assert_eq!(status.code(), Some(128 + sig), "{mode}: SIG{name} to the init: {status:?}");
            assert!(!alive(sleep), "{mode}: sleep {sleep} left running after SIG{name}");
        }
    }
}

/// 1,000 `sleep`s orphaned to the init, then killed together: half by real-time signals
/// (34, 40, 64), the rest by TERM, KILL and HUP. Then it waits on the fifo `$1/go`, so the
/// test can look while the init still lives and nothing else makes a child exit.
const MIXED_ORPHANS: &str = r#"
dir=$1
mkfifo "$dir/go"
i=0
while [ $i -lt 1000 ]; do ( sleep 1000 & echo $! >> "$dir/pids" ); i=$((i+1)); done
n=0
for p in $(cat "$dir/pids"); do
  case $((n % 6)) in 0) s=34;; 1) s=TERM;; 2) s=40;; 3) s=KILL;; 4) s=64;; *) s=HUP;; esac
  kill -$s $p
  n=$((n+1))
done
touch "$dir/killed"
read x < "$dir/go"
"#;

#[test]
fn thousand_orphans_dying_of_mixed_signals_leave_no_zombie() {
    // Never: a zombie left under the init (a real-time status used to end the reaping pass).
    for mode in ["subreaper", "PID 1"] {
        let dir = tempfile::tempdir().unwrap();
        let d = dir.path().display().to_string();
        let args = ["sh", "-c", MIXED_ORPHANS, "sh", &d];
        let Some(mut cmd) = (if mode == "subreaper" { Some(init(&args)) } else { in_namespace(&args) }) else {
            continue;
        };
        let mut child = Started::spawn(&mut cmd);
        let init = init_pid(mode, &child.0);
        wait_for(&format!("{mode}: 1,000 orphans started and killed"), Duration::from_secs(60), || {
            dir.path().join("killed").exists().then_some(())
        });
        let left = || (zombie_children(init), descendants(init).into_iter().filter(|p| comm(*p) == "sleep").count());
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        while left() != (0, 0) && std::time::Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
        let (zombies, sleeping) = left();
        std::fs::write(dir.path().join("go"), "\n").unwrap();
        let status =
            wait_for(&format!("{mode}: init to exit"), Duration::from_secs(10), || child.0.try_wait().unwrap());
        assert_eq!((zombies, sleeping), (0, 0), "{mode}: zombies and live sleeps left under the init after 10 s");
        assert_eq!(status.code(), Some(0), "{mode}");
        let pids = std::fs::read_to_string(dir.path().join("pids")).unwrap();
        assert_eq!(pids.lines().count(), 1000, "{mode}: orphans made");
    }
}

#[test]
fn inherited_ignores_and_blocks_are_kept_like_tini() {
    // tini's sigconf test: started with INT and TTOU ignored and TERM, TTIN and ILL blocked,
    // the command must still have them. Never lost: `nohup`'s HUP, a shell's ignored
    // INT/QUIT. The command must see exactly what it sees when started without the init
    // (SIGPIPE included: Rust's Command resets it, and so does init; see pid1.rs).
    use std::os::unix::process::CommandExt;
    let ignored = [libc::SIGINT, libc::SIGTTOU, libc::SIGHUP, libc::SIGQUIT];
    let blocked = [libc::SIGTERM, libc::SIGTTIN, libc::SIGILL];
    let mask = |sigs: &[i32]| sigs.iter().fold(0u64, |m, s| m | 1 << (s - 1));
    let configure = |cmd: &mut Command| {
        // SAFETY: signal and sigprocmask only, between fork and exec.
        unsafe {
            cmd.pre_exec(move || {
                for s in ignored {
                    libc::signal(s, libc::SIG_IGN);
                }
                let mut set: libc::sigset_t = std::mem::zeroed();
                libc::sigemptyset(&mut set);
                for s in blocked {
                    libc::sigaddset(&mut set, s);
                }
                libc::sigprocmask(libc::SIG_BLOCK, &set, std::ptr::null_mut());
                Ok(())
            });
        }
    };
    let report = |cmd: &mut Command| {
        configure(cmd);
        let text = String::from_utf8(cmd.output().unwrap().stdout).unwrap();
        let field = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name))
                .map(|v| u64::from_str_radix(v.trim(), 16).unwrap())
                .unwrap_or_else(|| panic!("no {name} in {text:?}"))
        };
        (field("SigIgn:"), field("SigBlk:"))
    };
    let args = ["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"];
    // Both started clean, then given the same ignores and blocks.
    let direct = report(clean_start(Command::new(args[0]).args(&args[1..])));
    assert_eq!(direct.0 & mask(&ignored), mask(&ignored), "the test's own ignores");
    assert_eq!(direct.1, mask(&blocked), "the test's own blocks");
    assert_eq!(direct.0 & (1 << (libc::SIGPIPE - 1)), 0, "SIGPIPE default when started directly");
    for (mode, mut cmd) in both_modes(&args) {
        assert_eq!(report(&mut cmd), direct, "{mode}: (SigIgn, SigBlk) under init vs started directly");
    }
}

#[test]
fn group_option_signals_the_whole_process_group() {
    // With -g, a SIGTERM to the init reaches the background `sleep` too; without, only `sh`
    // (tini does the same), so the sleep must never outlive a -g init.
    let dir = tempfile::tempdir().unwrap();
    let pidfile = dir.path().join("pid");
    let script = format!("sleep 77 & echo $! > {}; wait", pidfile.display());
    let mut c = Command::new(bin());
    c.args(["init", "-g", "--", "sh", "-c", &script]);
    let mut child = Started::spawn(clean_start(&mut c));
    let sleep: u32 = wait_for("the sleep's pid", Duration::from_secs(10), || {
        std::fs::read_to_string(&pidfile).ok().and_then(|s| s.trim().parse().ok())
    });
    nix::sys::signal::kill(nix::unistd::Pid::from_raw(child.0.id() as i32), Signal::SIGTERM).unwrap();
    let status = wait_for("init -g to exit", Duration::from_secs(10), || child.0.try_wait().unwrap());
    assert_eq!(status.code(), Some(143));
    wait_for("the group's sleep to die", Duration::from_secs(10), || (!alive(sleep)).then_some(()));
}

#[test]
fn supervisor_survives_alrm_pwr_rtmin3_and_still_drains() {
    // `docker kill -s PWR` (or STOPSIGNAL SIGRTMIN+3) must never end the supervisor without a
    // drain: each is logged and ignored, and a SIGTERM afterwards still de-registers.
    use crate::harness::{base_env, FakeGithub, RunnerDir, Supervisor};
    for mode in ["subreaper", "PID 1"] {
        let gh = FakeGithub::start();
        let runner = RunnerDir::new();
        let mut sup = if mode == "subreaper" {
            Supervisor::start(&base_env(&gh, &runner))
        } else {
            if in_namespace(&[]).is_none() {
                continue;
            }
            let mut env = base_env(&gh, &runner);
            env.push(("STATUS_ADDR".into(), "127.0.0.1:0".into()));
            let mut cmd = Command::new("unshare");
            cmd.args(["--pid", "--fork", "--mount-proc", bin()]).env_clear().envs(env.iter().map(|(k, v)| (k, v)));
            Supervisor::from_command(cmd, String::new())
        };
        sup.wait_state("idle", Duration::from_secs(30));
        let init = init_pid(mode, &sup.child);
        for (name, sig) in [("SIGALRM", libc::SIGALRM), ("SIGPWR", libc::SIGPWR), ("SIGRTMIN+3", 37)] {
            // SAFETY: kill with plain integers.
            assert_eq!(unsafe { libc::kill(init as i32, sig) }, 0);
            sup.wait_log(&format!("signal={name}"), Duration::from_secs(10));
        }
        assert!(sup.child.try_wait().unwrap().is_none(), "{mode}: the supervisor exited\n{}", sup.log());
        assert_eq!(sup.health().map(|h| h["state"].clone()), Some("idle".into()), "{mode}");
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(init as i32), Signal::SIGTERM).unwrap();
        assert_eq!(sup.wait_exit(Duration::from_secs(60)).code(), Some(0), "{mode}\n{}", sup.log());
        assert!(gh.runners().is_empty(), "{mode}: runner left registered");
    }
}
