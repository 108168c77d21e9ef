//! PID-1 duties, through `ci-runner init -- CMD`, both as a real PID 1 in a new PID namespace
//! (`unshare --pid --fork --mount-proc`) and as a child subreaper.

use std::process::{Command, Stdio};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::{bin, descendants, require, wait_for};

fn init(args: &[&str]) -> Command {
    let mut c = Command::new(bin());
    c.arg("init").arg("--").args(args);
    c
}

/// `ci-runner init -- …` as PID 1 of a new PID namespace.
fn in_namespace(args: &[&str]) -> Option<Command> {
    if !require("unshare") || !nix::unistd::geteuid().is_root() {
        assert!(std::env::var("CI").is_err(), "PID-namespace tests need root on CI");
        eprintln!("skipping: needs root for unshare --pid");
        return None;
    }
    let mut c = Command::new("unshare");
    c.args(["--pid", "--fork", "--mount-proc", bin(), "init", "--"]).args(args);
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

#[test]
fn child_signal_mask_and_dispositions_are_clean() {
    let out = init(&["grep", "-E", "^Sig(Blk|Ign)", "/proc/self/status"]).output().unwrap();
    let text = String::from_utf8(out.stdout).unwrap();
    assert!(text.contains("SigBlk:\t0000000000000000"), "{text}");
    assert!(text.contains("SigIgn:\t0000000000000000"), "{text}");
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
    let out =
        Command::new(bin()).args(["init", "--", "sh", "-c", &format!("set -- $PPID; {ORPHANS}")]).output().unwrap();
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
