//! PID-1 duties: the tiny synchronous parent that forwards signals, reaps every zombie and
//! passes the child's exit status through.
//!
//! The parent forks before anything else (no threads, no runtime, no allocation-heavy work)
//! and then only loops on `sigtimedwait`: every signal but the synchronous fault signals is
//! blocked and collected there, then forwarded to the child or dropped (see [`action`]), and
//! after each one every exited child is reaped with `waitpid(-1, WNOHANG)` (SIGCHLD merges, so
//! a pass drains all of them). The child does the real work. When the binary is not PID 1
//! (under `docker --init` or ECS `initProcessEnabled`) the parent marks itself a child
//! subreaper, so orphans of the runner's job steps still come to it and are reaped.
//!
//! Signal masks and waits go through raw system calls, not glibc or nix: glibc's
//! `sigfillset`/`sigprocmask` leave out signals 32 and 33 (its own), and nix 0.29's
//! `WaitStatus` cannot hold a real-time signal, so its `waitpid` returns `EINVAL` for a child
//! that died of one, after the kernel has already reaped it: the status was lost and the
//! parent waited forever (issue #16). Statuses are decoded from the raw `int` ([`decode`]).
//!
//! Forking (rather than re-executing the binary) keeps the secret-bearing environment out of
//! any new `execve` and spares a second start-up; the child is single-threaded at the fork.

use std::ffi::{CString, OsStr, OsString};
use std::os::unix::ffi::OsStrExt;
use std::time::Duration;

/// Highest signal number on Linux (`SIGRTMAX`; the kernel's `_NSIG` on x86_64 and aarch64).
pub const SIGRTMAX: i32 = 64;

/// The synchronous fault signals: never blocked, so a fault in the parent itself ends it at
/// once with its default action (a blocked fault signal is undefined behaviour in POSIX, and
/// Linux forces it through anyway). tini leaves the same ones unblocked
/// (krallin/tini `src/tini.c`, `configure_signals()`, `signals_for_tini[]`), and besides
/// SIGSYS, SIGTTIN and SIGTTOU: see [`action`] for those.
pub const FAULTS: [i32; 6] = [libc::SIGSEGV, libc::SIGBUS, libc::SIGFPE, libc::SIGILL, libc::SIGTRAP, libc::SIGABRT];

/// A kernel signal set: bit n-1 stands for signal n.
type RawSet = u64;

fn bit(sig: i32) -> RawSet {
    1 << (sig - 1)
}

/// Every signal but the fault signals: what the parent blocks and waits for. SIGKILL and
/// SIGSTOP are in it too; the kernel ignores them in a mask.
pub fn parent_mask() -> RawSet {
    FAULTS.iter().fold(RawSet::MAX, |set, &s| set & !bit(s))
}

/// Who the parent serves, which decides what it forwards.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    /// `ci-runner init -- CMD`: forward like tini; `group` sends to the child's process group
    /// (tini's `-g`).
    Init { group: bool },
    /// The supervisor's own split: forward to the supervisor, which handles or logs each one.
    Supervisor,
}

/// What the parent does with a signal it collected.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Action {
    /// SIGCHLD: nothing to pass on; the reaping pass follows every signal anyway.
    Reap,
    Forward,
    /// Dropped, on purpose.
    Ignore,
}

/// The parent's rule for each signal.
///
/// - SIGCHLD is the parent's own.
/// - SIGTTIN and SIGTTOU are dropped: the child owns the terminal's foreground, and tini does
///   not pass them either (it ignores them, `configure_signals()`); blocked, they stop neither
///   the parent nor its writes to the terminal.
/// - `init` forwards everything else, as tini does (`wait_and_forward_signal()`: "Forward
///   anything else"): SIGCONT, SIGTSTP, SIGALRM, SIGPWR, SIGURG, SIGSYS (a seccomp SIGSYS is
///   forced through by the kernel whatever the mask, so blocking it loses nothing), 32 to 64.
/// - The supervisor gets everything else too except SIGTSTP (a stopped supervisor would stall
///   a drain; job control is not its business) and 32 and 33, which glibc keeps for itself and
///   lets no program handle, so that in the supervisor their default action would kill it.
///   The supervisor drains on TERM and INT and logs and ignores the rest
///   ([`supervisor_logged`]).
pub fn action(mode: Mode, sig: i32) -> Action {
    match sig {
        libc::SIGCHLD => Action::Reap,
        libc::SIGTTIN | libc::SIGTTOU => Action::Ignore,
        _ if !(1..=SIGRTMAX).contains(&sig) || FAULTS.contains(&sig) => Action::Ignore,
        libc::SIGKILL | libc::SIGSTOP => Action::Ignore,
        _ => match mode {
            Mode::Init { .. } => Action::Forward,
            Mode::Supervisor if sig == libc::SIGTSTP || sig == 32 || sig == 33 => Action::Ignore,
            Mode::Supervisor => Action::Forward,
        },
    }
}

/// Whether a signal's default action ends the process (all but CHLD, CONT, URG, WINCH, and
/// the stop signals, which the parent never passes to the supervisor).
pub fn default_ends_process(sig: i32) -> bool {
    !matches!(
        sig,
        libc::SIGCHLD
            | libc::SIGCONT
            | libc::SIGURG
            | libc::SIGWINCH
            | libc::SIGSTOP
            | libc::SIGTSTP
            | libc::SIGTTIN
            | libc::SIGTTOU
    )
}

/// The signals the supervisor logs and ignores: every one the parent forwards to it, whose
/// default action would end it, but TERM and INT (the drain's). PIPE is among them: Rust
/// ignores it already; a handler changes nothing for writes (they still fail with EPIPE).
pub fn supervisor_logged() -> impl Iterator<Item = i32> {
    (1..=SIGRTMAX).filter(|&s| {
        action(Mode::Supervisor, s) == Action::Forward
            && default_ends_process(s)
            && s != libc::SIGTERM
            && s != libc::SIGINT
    })
}

/// A signal's name as `kill -l` prints it: `SIGALRM`, `SIGRTMIN+3`, `SIGRTMAX-2`.
pub fn signal_name(sig: i32) -> String {
    const CLASSIC: [&str; 31] = [
        "HUP", "INT", "QUIT", "ILL", "TRAP", "ABRT", "BUS", "FPE", "KILL", "USR1", "SEGV", "USR2", "PIPE", "ALRM",
        "TERM", "STKFLT", "CHLD", "CONT", "STOP", "TSTP", "TTIN", "TTOU", "URG", "XCPU", "XFSZ", "VTALRM", "PROF",
        "WINCH", "IO", "PWR", "SYS",
    ];
    // glibc's SIGRTMIN is 34: it keeps 32 and 33.
    match sig {
        1..=31 => format!("SIG{}", CLASSIC[sig as usize - 1]),
        32 | 33 => format!("SIG{sig}"),
        34 => "SIGRTMIN".into(),
        35..=49 => format!("SIGRTMIN+{}", sig - 34),
        50..=63 => format!("SIGRTMAX-{}", SIGRTMAX - sig),
        SIGRTMAX => "SIGRTMAX".into(),
        _ => format!("signal {sig}"),
    }
}

/// Exit status a shell would report from a raw `waitpid` status: the code, or 128+n for death
/// by signal n (any n up to `SIGRTMAX`); `None` for a stop or a continue.
pub fn decode(raw: i32) -> Option<i32> {
    if libc::WIFEXITED(raw) {
        Some(libc::WEXITSTATUS(raw))
    } else if libc::WIFSIGNALED(raw) {
        Some(128 + libc::WTERMSIG(raw))
    } else {
        None
    }
}

/// `rt_sigprocmask` on the full kernel set (glibc's would drop 32 and 33); returns the old set.
fn set_mask(how: libc::c_int, set: RawSet) -> std::io::Result<RawSet> {
    let mut old: RawSet = 0;
    // SAFETY: both pointers are to live u64s, the size the kernel's sigset_t has here.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigprocmask,
            how,
            &set as *const RawSet,
            &mut old as *mut RawSet,
            std::mem::size_of::<RawSet>(),
        )
    };
    if r == 0 {
        Ok(old)
    } else {
        Err(std::io::Error::last_os_error())
    }
}

/// `rt_sigtimedwait` on the full kernel set: the signal taken, or the errno (EAGAIN on timeout).
fn wait_signal(set: RawSet, timeout: Duration) -> Result<i32, i32> {
    let ts = libc::timespec { tv_sec: timeout.as_secs() as libc::time_t, tv_nsec: timeout.subsec_nanos().into() };
    // SAFETY: the set and the timespec are live; a null siginfo pointer is allowed.
    let r = unsafe {
        libc::syscall(
            libc::SYS_rt_sigtimedwait,
            &set as *const RawSet,
            std::ptr::null_mut::<libc::siginfo_t>(),
            &ts as *const libc::timespec,
            std::mem::size_of::<RawSet>(),
        )
    };
    if r > 0 {
        Ok(r as i32)
    } else {
        Err(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
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

/// Resets what a child of the supervisor inherits from it: an empty signal mask and default
/// dispositions for every signal, real-time ones included. The runner and its job steps expect
/// a clean state, and the supervisor's own state is not one (Rust ignores SIGPIPE; handlers
/// are reset by `execve` but an ignore is not). `ci-runner init` does otherwise: like tini it
/// keeps what it inherited ([`restore_inherited`]).
/// Only raw system calls: it runs between fork and exec. glibc refuses to touch signals 32
/// and 33 (its own), so `rt_sigaction` is called directly.
pub fn reset_signals() -> std::io::Result<()> {
    set_mask(libc::SIG_SETMASK, 0)?;
    let act = KernelSigaction { handler: 0, flags: 0, restorer: 0, mask: 0 };
    for sig in 1..=SIGRTMAX {
        if sig != libc::SIGKILL && sig != libc::SIGSTOP {
            // SAFETY: rt_sigaction with SIG_DFL is async-signal-safe and touches only this
            // process's own signal state; the struct matches the kernel's layout.
            unsafe {
                libc::syscall(
                    libc::SYS_rt_sigaction,
                    sig,
                    &act as *const KernelSigaction,
                    std::ptr::null_mut::<KernelSigaction>(),
                    std::mem::size_of::<RawSet>(),
                );
            }
        }
    }
    Ok(())
}

/// Unblocks every signal in the calling thread; pending ones are delivered now.
pub fn unblock_signals() {
    let _ = set_mask(libc::SIG_SETMASK, 0);
}

/// What the process inherited and the parent changed, for `init`'s child to get back.
#[derive(Clone, Copy)]
struct Inherited {
    mask: RawSet,
    sigchld: libc::sighandler_t,
}

/// `init`'s child: the signal state `ci-runner init` itself was started with, as tini gives it
/// (`restore_signals()`; its sigconf test starts tini with INT, TTOU and SEGV ignored and
/// TERM, TTIN and ILL blocked, and checks the command still has exactly those): `nohup`'s
/// ignored HUP and a shell's ignored INT and QUIT for a background job reach the command.
/// One exception: SIGPIPE is reset to its default, because Rust's start-up code ignores it
/// before `main` and throws the old disposition away, so whether it was inherited ignored
/// cannot be known; the default is what a command in a pipeline expects.
fn restore_inherited(inh: Inherited) -> std::io::Result<()> {
    // SAFETY: plain dispositions in a single-threaded child.
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        libc::signal(libc::SIGCHLD, inh.sigchld);
    }
    set_mask(libc::SIG_SETMASK, inh.mask).map(|_| ())
}

/// Marks this process a child subreaper unless it already is PID 1.
fn become_reaper() {
    if std::process::id() != 1 {
        // SAFETY: prctl with PR_SET_CHILD_SUBREAPER takes plain integers.
        unsafe {
            libc::prctl(libc::PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0);
        }
    }
}

/// Makes the child its own process group and, when we have a terminal, its foreground group,
/// so a Ctrl-C reaches it once (from the terminal) rather than twice (terminal + forward).
fn own_group_and_terminal() {
    // SAFETY: setpgid/isatty/tcsetpgrp/signal on our own process; SIGTTOU is ignored around
    // tcsetpgrp so a background group may take the tty, then put back as it was.
    unsafe {
        libc::setpgid(0, 0);
        if libc::isatty(0) == 1 {
            let old = libc::signal(libc::SIGTTOU, libc::SIG_IGN);
            libc::tcsetpgrp(0, libc::getpid());
            libc::signal(libc::SIGTTOU, old);
        }
    }
}

/// Blocks every signal but the faults, becomes a reaper and forks. The parent never returns:
/// it forwards, reaps and exits with the child's status. The child returns in its own process
/// group, with every signal still blocked (see `unblock_signals`), and what the process
/// inherited.
fn fork_and_serve(who: &str, mode: Mode) -> Inherited {
    let mask = parent_mask();
    let old_mask = match set_mask(libc::SIG_SETMASK, mask) {
        Ok(old) => old,
        Err(e) => {
            eprintln!("{who}: failed to block signals: {e}");
            std::process::exit(1);
        }
    };
    // An inherited ignored SIGCHLD would make the kernel reap our children itself, and the
    // child's status would be lost.
    // SAFETY: setting a default disposition; no other thread exists.
    let sigchld = unsafe { libc::signal(libc::SIGCHLD, libc::SIG_DFL) };
    let inherited = Inherited { mask: old_mask, sigchld };
    become_reaper();
    // SAFETY: no other thread exists yet (this runs first thing in main), so the child may run
    // arbitrary code after the fork.
    match unsafe { libc::fork() } {
        0 => {
            own_group_and_terminal();
            inherited
        }
        child if child > 0 => {
            // Also from this side, so that a signal for the group (`-g`) never misses it.
            // SAFETY: plain integers; EACCES once the child has exec'd is harmless.
            unsafe {
                libc::setpgid(child, child);
            }
            parent_loop(child, mask, mode)
        }
        _ => {
            eprintln!("{who}: failed to fork: {}", std::io::Error::last_os_error());
            std::process::exit(1);
        }
    }
}

/// The supervisor's split: returns in the child; the parent is PID 1 until the child exits.
/// The child keeps every signal blocked until its handlers are installed, so a SIGTERM
/// forwarded in between is held, not fatal.
pub fn split() {
    fork_and_serve("ci-runner", Mode::Supervisor);
}

/// `ci-runner init`'s options.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct InitOptions {
    /// `-g`: forward to the child's process group, not only the child.
    pub group: bool,
}

/// `init`'s arguments: `[-g] [--] COMMAND [ARGS…]`; returns the options and the command.
pub fn parse_init_args(args: &[OsString]) -> Result<(InitOptions, &[OsString]), String> {
    let mut opts = InitOptions::default();
    let mut i = 0;
    while let Some(a) = args.get(i) {
        match a.as_bytes() {
            b"--" => {
                i += 1;
                break;
            }
            b"-g" => opts.group = true,
            [b'-', _, ..] => return Err(format!("unknown option {:?}", OsStr::new(a))),
            _ => break,
        }
        i += 1;
    }
    if i >= args.len() {
        return Err("no command given".into());
    }
    Ok((opts, &args[i..]))
}

/// `ci-runner init [-g] -- CMD ARGS…`: PID-1 duties for an arbitrary command (like tini).
pub fn run_init(argv: &[OsString]) -> ! {
    let (opts, command) = match parse_init_args(argv) {
        Ok(parsed) => parsed,
        Err(e) => {
            eprintln!("ci-runner init: {e}\nci-runner init: usage: ci-runner init [-g] -- COMMAND [ARGS...]");
            std::process::exit(2);
        }
    };
    let Some(cargs) = command.iter().map(|a| CString::new(a.as_bytes()).ok()).collect::<Option<Vec<_>>>() else {
        eprintln!("ci-runner init: an argument contains a NUL byte");
        std::process::exit(2);
    };
    let inherited = fork_and_serve("ci-runner init", Mode::Init { group: opts.group });
    // The child: the signal state we were started with, then the command.
    if restore_inherited(inherited).is_err() {
        std::process::exit(126);
    }
    let err = nix::unistd::execvp(&cargs[0], &cargs).unwrap_err();
    eprintln!("ci-runner init: failed to run {:?}: {err}", cargs[0]);
    std::process::exit(if err == nix::errno::Errno::ENOENT { 127 } else { 126 });
}

/// The parent's whole life: wait for a signal, forward it or not, reap, and exit once the
/// child is gone.
fn parent_loop(child: libc::pid_t, mask: RawSet, mode: Mode) -> ! {
    // The parent holds secrets in its environment: keep /proc/<pid>/environ from other users
    // of the same uid.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    let target = if mode == (Mode::Init { group: true }) { -child } else { child };
    loop {
        // A timeout as tini's (1 s): a pass now and then even if no SIGCHLD came.
        if let Ok(sig) = wait_signal(mask, Duration::from_secs(1)) {
            if action(mode, sig) == Action::Forward {
                // ESRCH just means the child is already gone; the reaping pass will tell.
                // SAFETY: kill with plain integers.
                unsafe {
                    libc::kill(target, sig);
                }
            }
        }
        let pass = reap(child);
        if let Some(code) = pass.code {
            std::process::exit(code);
        }
        if pass.no_children {
            // Only if something else reaped the child (it cannot be us: SIGCHLD is default).
            eprintln!("ci-runner: the child {child} is gone and its exit status with it");
            std::process::exit(1);
        }
    }
}

/// What one reaping pass found.
struct Pass {
    /// The main child's status code, once it has been reaped.
    code: Option<i32>,
    /// `waitpid` said ECHILD: no child left at all.
    no_children: bool,
}

/// Reaps every exited child. Nothing in a status can end the pass early: it is decoded from
/// the raw integer, and only "none exited yet" or "no children" stop it.
fn reap(child: libc::pid_t) -> Pass {
    let mut pass = Pass { code: None, no_children: false };
    loop {
        let mut raw = 0;
        // SAFETY: waitpid writes one int. __WALL: children whose exit signal is not SIGCHLD too.
        let pid = unsafe { libc::waitpid(-1, &mut raw, libc::WNOHANG | libc::__WALL) };
        if pid > 0 {
            if pid == child {
                pass.code = decode(raw).or(pass.code);
            }
            continue;
        }
        if pid < 0 {
            match std::io::Error::last_os_error().raw_os_error() {
                Some(libc::EINTR) => continue,
                Some(libc::ECHILD) => pass.no_children = pass.code.is_none(),
                _ => {}
            }
        }
        return pass;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Raw statuses as the kernel builds them (`wait.h`): exit code in bits 8-15, terminating
    /// signal in bits 0-6, core dump bit 7, 0x7f in the low byte for a stop.
    fn exited(code: i32) -> i32 {
        (code & 0xff) << 8
    }
    fn signaled(sig: i32, core: bool) -> i32 {
        sig | if core { 0x80 } else { 0 }
    }

    #[test]
    fn exit_codes_decode_unchanged() {
        for code in 0..=255 {
            assert_eq!(decode(exited(code)), Some(code), "exit {code}");
        }
    }

    #[test]
    fn every_signal_up_to_sigrtmax_decodes_to_128_plus_n() {
        // Must never be lost: nix's WaitStatus had no room for 32-64 (issue #16).
        for sig in 1..=SIGRTMAX {
            assert_eq!(decode(signaled(sig, false)), Some(128 + sig), "signal {sig}");
            assert_eq!(decode(signaled(sig, true)), Some(128 + sig), "signal {sig} with a core dump");
        }
    }

    #[test]
    fn stops_and_continues_are_not_exits() {
        assert_eq!(decode((libc::SIGSTOP << 8) | 0x7f), None);
        assert_eq!(decode((libc::SIGTSTP << 8) | 0x7f), None);
        assert_eq!(decode(0xffff), None);
    }

    #[test]
    fn parent_blocks_every_signal_but_the_faults() {
        let mask = parent_mask();
        for sig in 1..=SIGRTMAX {
            assert_eq!(mask & bit(sig) != 0, !FAULTS.contains(&sig), "{}", signal_name(sig));
        }
        assert!(mask & bit(32) != 0 && mask & bit(33) != 0, "glibc's own 32 and 33 blocked too");
    }

    #[test]
    fn init_forwards_all_but_chld_ttin_ttou_and_faults_like_tini() {
        let init = Mode::Init { group: false };
        for sig in 1..=SIGRTMAX {
            let want = if sig == libc::SIGCHLD {
                Action::Reap
            } else if [libc::SIGTTIN, libc::SIGTTOU, libc::SIGKILL, libc::SIGSTOP].contains(&sig)
                || FAULTS.contains(&sig)
            {
                Action::Ignore
            } else {
                Action::Forward
            };
            assert_eq!(action(init, sig), want, "{}", signal_name(sig));
        }
        for sig in [libc::SIGCONT, libc::SIGALRM, libc::SIGPWR, libc::SIGURG, libc::SIGTSTP, libc::SIGSYS, 32, 37, 64] {
            assert_eq!(action(init, sig), Action::Forward, "{}", signal_name(sig));
        }
    }

    #[test]
    fn supervisor_survives_every_signal_it_is_forwarded() {
        // Never: a forwarded signal the supervisor has no handler for, with a deadly default.
        for sig in 1..=SIGRTMAX {
            if action(Mode::Supervisor, sig) != Action::Forward {
                continue;
            }
            let handled = [libc::SIGTERM, libc::SIGINT].contains(&sig) || supervisor_logged().any(|s| s == sig);
            assert!(handled || !default_ends_process(sig), "{} would kill the supervisor", signal_name(sig));
        }
        for sig in [libc::SIGALRM, libc::SIGPWR, 37, libc::SIGHUP, libc::SIGQUIT, libc::SIGUSR1, libc::SIGUSR2] {
            assert!(supervisor_logged().any(|s| s == sig), "{} logged", signal_name(sig));
        }
        for sig in [libc::SIGTSTP, 32, 33, libc::SIGCHLD] {
            assert_ne!(action(Mode::Supervisor, sig), Action::Forward, "{}", signal_name(sig));
        }
        assert_eq!(action(Mode::Supervisor, libc::SIGTERM), Action::Forward);
        assert_eq!(action(Mode::Supervisor, libc::SIGWINCH), Action::Forward);
    }

    #[test]
    fn signal_names_match_kill_l() {
        assert_eq!(signal_name(1), "SIGHUP");
        assert_eq!(signal_name(30), "SIGPWR");
        assert_eq!(signal_name(32), "SIG32");
        assert_eq!(signal_name(34), "SIGRTMIN");
        assert_eq!(signal_name(37), "SIGRTMIN+3");
        assert_eq!(signal_name(50), "SIGRTMAX-14");
        assert_eq!(signal_name(64), "SIGRTMAX");
    }

    #[test]
    fn init_arguments() {
        let args = |v: &[&str]| v.iter().map(OsString::from).collect::<Vec<_>>();
        let a = args(&["--", "sh", "-c", "x"]);
        assert_eq!(parse_init_args(&a).unwrap(), (InitOptions { group: false }, &a[1..]));
        let a = args(&["-g", "--", "-g"]);
        assert_eq!(parse_init_args(&a).unwrap(), (InitOptions { group: true }, &a[2..]));
        let a = args(&["sleep", "1"]);
        assert_eq!(parse_init_args(&a).unwrap(), (InitOptions::default(), &a[..]));
        assert!(parse_init_args(&args(&["-x", "--", "sh"])).is_err());
        assert!(parse_init_args(&args(&["--"])).is_err());
        assert!(parse_init_args(&args(&[])).is_err());
    }
}
