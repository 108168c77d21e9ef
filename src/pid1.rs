//! PID-1 duties: the tiny synchronous parent that forwards signals, reaps every zombie and
//! passes the child's exit status through.
//!
//! The parent forks before anything else (no threads, no runtime, no allocation-heavy work)
//! and then only loops on `sigwait`: forwarding TERM/INT/HUP/QUIT/USR1/USR2/WINCH to the child
//! and reaping with `waitpid(-1, WNOHANG)` on each SIGCHLD (signals merge, so it drains the
//! queue every time). The child does the real work. When the binary is not PID 1 (under
//! `docker --init` or ECS `initProcessEnabled`) the parent marks itself a child subreaper, so
//! orphans of the runner's job steps still come to it and are reaped.
//!
//! Forking (rather than re-executing the binary) keeps the secret-bearing environment out of
//! any new `execve` and spares a second start-up; the child is single-threaded at the fork.

use std::ffi::{CString, OsString};
use std::os::unix::ffi::OsStrExt;

use nix::sys::signal::{self, SigSet, SigmaskHow, Signal};
use nix::sys::wait::{waitpid, WaitPidFlag, WaitStatus};
use nix::unistd::{self, ForkResult, Pid};

/// Signals the parent passes on to the child.
const FORWARDED: &[Signal] = &[
    Signal::SIGTERM,
    Signal::SIGINT,
    Signal::SIGHUP,
    Signal::SIGQUIT,
    Signal::SIGUSR1,
    Signal::SIGUSR2,
    Signal::SIGWINCH,
];

/// Job-control signals the parent swallows (it owns no terminal work of its own).
const SWALLOWED: &[Signal] = &[Signal::SIGTSTP, Signal::SIGTTIN, Signal::SIGTTOU];

fn parent_set() -> SigSet {
    let mut set = SigSet::empty();
    for s in FORWARDED.iter().chain(SWALLOWED) {
        set.add(*s);
    }
    set.add(Signal::SIGCHLD);
    set
}

/// Exit status a shell would report: the code, or 128+n for death by signal n.
pub fn status_code(status: WaitStatus) -> Option<i32> {
    match status {
        WaitStatus::Exited(_, code) => Some(code),
        WaitStatus::Signaled(_, sig, _) => Some(128 + sig as i32),
        _ => None,
    }
}

/// The kernel's `struct sigaction` (x86_64 and aarch64 both define `SA_RESTORER`).
#[repr(C)]
struct KernelSigaction {
    handler: usize,
    flags: u64,
    restorer: usize,
    mask: u64,
}

/// Resets what a child inherits from us: an empty signal mask and default dispositions for
/// every signal, real-time ones included (tini and dumb-init check SigIgn is all zero).
/// Only raw system calls: it runs between fork and exec. glibc refuses to touch signals 32
/// and 33 (its own), so `rt_sigaction` is called directly.
pub fn reset_signals() -> std::io::Result<()> {
    // SAFETY: sigprocmask and rt_sigaction with SIG_DFL are async-signal-safe and touch only
    // this process's own signal state; the struct matches the kernel's layout.
    unsafe {
        let mut empty: libc::sigset_t = std::mem::zeroed();
        libc::sigemptyset(&mut empty);
        if libc::sigprocmask(libc::SIG_SETMASK, &empty, std::ptr::null_mut()) != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let act = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
        for sig in 1..=64 {
            if sig != libc::SIGKILL && sig != libc::SIGSTOP {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &act as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    8usize,
                );
            }
        }
    }
    Ok(())
}

/// Unblocks every signal in the calling thread; pending ones are delivered now.
pub fn unblock_signals() {
    let _ = signal::sigprocmask(SigmaskHow::SIG_SETMASK, Some(&SigSet::empty()), None);
}

/// Marks this process a child subreaper unless it already is PID 1.
fn become_reaper() {
    if unistd::getpid().as_raw() != 1 {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }
}

/// Makes the child its own process group and, when we have a terminal, its foreground group,
/// so a Ctrl-C reaches it once (from the terminal) rather than twice (terminal + forward).
fn own_group_and_terminal() {
    let _ = unistd::setpgid(Pid::from_raw(0), Pid::from_raw(0));
    if unistd::isatty(0).unwrap_or(false) {
        // SAFETY: ignoring SIGTTOU around tcsetpgrp so a background group may take the tty.
        unsafe {
            let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpid());
            libc::signal(libc::SIGTTOU, old);
        }
    }
}

/// Blocks the signals the parent waits on, becomes a reaper and forks. The parent never
/// returns: it forwards, reaps and exits with the child's status. The child returns in its own
/// process group, with those signals still blocked (see `unblock_signals`).
fn fork_and_serve(who: &str) {
    let set = parent_set();
    if let Err(e) = signal::sigprocmask(SigmaskHow::SIG_BLOCK, Some(&set), None) {
        eprintln!("{who}: failed to block signals: {e}");
        std::process::exit(1);
    }
    become_reaper();
    // SAFETY: no other thread exists yet (this runs first thing in main), so the child may run
    // arbitrary code after the fork.
    match unsafe { unistd::fork() } {
        Ok(ForkResult::Child) => own_group_and_terminal(),
        Ok(ForkResult::Parent { child }) => parent_loop(child, &set),
        Err(e) => {
            eprintln!("{who}: failed to fork: {e}");
            std::process::exit(1);
        }
    }
}

/// The supervisor's split: returns in the child; the parent is PID 1 until the child exits.
/// The child keeps the forwarded signals blocked until its handlers are installed, so a
/// SIGTERM forwarded in between is held, not fatal.
pub fn split() {
    fork_and_serve("ci-runner");
}

/// `ci-runner init -- CMD ARGS…`: PID-1 duties for an arbitrary command (like tini).
pub fn run_init(argv: &[OsString]) -> ! {
    let Some(cargs) = argv.iter().map(|a| CString::new(a.as_bytes()).ok()).collect::<Option<Vec<_>>>() else {
        eprintln!("ci-runner init: an argument contains a NUL byte");
        std::process::exit(2);
    };
    if cargs.is_empty() {
        eprintln!("ci-runner init: usage: ci-runner init -- COMMAND [ARGS...]");
        std::process::exit(2);
    }
    fork_and_serve("ci-runner init");
    // The child: a clean signal state, then the command.
    if reset_signals().is_err() {
        std::process::exit(126);
    }
    let err = unistd::execvp(&cargs[0], &cargs).unwrap_err();
    eprintln!("ci-runner init: failed to run {:?}: {err}", cargs[0]);
    std::process::exit(if err == nix::errno::Errno::ENOENT { 127 } else { 126 });
}

/// The parent's whole life: wait for a signal, forward or reap, exit when the child is gone.
fn parent_loop(child: Pid, set: &SigSet) -> ! {
    // The parent holds secrets in its environment: keep /proc/<pid>/environ from other users
    // of the same uid.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    loop {
        let sig = match set.wait() {
            Ok(s) => s,
            Err(_) => continue,
        };
        if sig == Signal::SIGCHLD {
            if let Some(code) = reap(child) {
                std::process::exit(code);
            }
        } else if FORWARDED.contains(&sig) {
            // ESRCH just means the child is already gone; SIGCHLD will tell.
            let _ = signal::kill(child, sig);
        }
    }
}

/// Reaps every exited child; returns the main child's status code once it has exited.
fn reap(child: Pid) -> Option<i32> {
    let mut result = None;
    loop {
        match waitpid(Pid::from_raw(-1), Some(WaitPidFlag::WNOHANG)) {
            Ok(WaitStatus::StillAlive) | Err(_) => return result,
            Ok(status) => {
                if status.pid() == Some(child) {
                    result = status_code(status).or(result);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn exit_status_maps_like_a_shell() {
        let p = Pid::from_raw(10);
        assert_eq!(status_code(WaitStatus::Exited(p, 3)), Some(3));
        assert_eq!(status_code(WaitStatus::Signaled(p, Signal::SIGTERM, false)), Some(143));
        assert_eq!(status_code(WaitStatus::Signaled(p, Signal::SIGKILL, true)), Some(137));
        assert_eq!(status_code(WaitStatus::StillAlive), None);
    }
}
