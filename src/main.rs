//! `ci-runner`: the PID-1 split, configuration, tracing, runtime and exit code.

use std::ffi::OsString;
use std::panic::AssertUnwindSafe;
use std::sync::{Arc, Mutex};

use ci_runner::autoscale::Autoscale;
use ci_runner::config::{self, Config, ConfigError, Host, LogFormat, ProcessEnv, SystemUsers};
use ci_runner::error::{chain, ExitCode};
use ci_runner::fleet;
use ci_runner::forward;
use ci_runner::pid1;
use ci_runner::runners::{Registry, Runners};
use ci_runner::status::{self, StatusHandle};
use ci_runner::supervisor::{self, SignalKind};
use nix::sys::signal::{SigSet, Signal};
use tokio::signal::unix::{signal, SignalKind as Sig};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;

const USAGE: &str = "usage: ci-runner            run the supervisor (configured by environment variables; see README)
       ci-runner status     print /health from STATUS_ADDR; exit 0 when healthy, 1 otherwise
       ci-runner init [-g] -- COMMAND [ARGS...]
                            be PID 1 for COMMAND only: reap zombies, forward signals (-g: to its
                            process group), pass its exit code
       ci-runner prewarm    load the work dir from ci-storage now, as the boot does (CI_STORAGE_* variables)
       ci-runner forward    only the port forwards (FORWARD_HOST, FORWARD_PORTS), until SIGTERM or SIGINT
       ci-runner list [--json]
                            this pool's runners on GitHub; * marks this container's
       ci-runner remove [--yes] NAME...
                            remove these runners from GitHub (asks first unless --yes)
       ci-runner prune [--yes] [--older-than SEC]
                            remove the pool's offline runners (asks first unless --yes)
       ci-runner hook job-started|job-completed
                            the runner's job hooks for the hardware lock (set up by the supervisor)
       ci-runner controller the webhook autoscaler: a runner container per queued job (see README)
       ci-runner --version";

fn main() {
    let args: Vec<OsString> = std::env::args_os().skip(1).collect();
    match args.first().and_then(|a| a.to_str()) {
        None => supervise(),
        Some("init") => pid1::run_init(&args[1..]),
        Some("status") => status_command(),
        Some("prewarm") => prewarm_command(),
        Some("forward") => forward_command(),
        Some(cmd @ ("list" | "remove" | "prune")) => fleet_command(cmd, &args[1..]),
        Some("hook") => {
            let kind = args.get(1).and_then(|a| a.to_str()).unwrap_or("");
            std::process::exit(ci_runner::lock::hook(kind))
        }
        Some("controller") => controller_command(),
        Some("--version" | "-V" | "version") => println!("ci-runner {}", env!("CARGO_PKG_VERSION")),
        Some("--help" | "-h" | "help") => println!("{USAGE}"),
        Some(other) => {
            eprintln!("ci-runner: unknown command {other:?}\n{USAGE}");
            std::process::exit(ExitCode::Usage.code());
        }
    }
}

fn status_command() {
    let addr = match config::status_addr(&ProcessEnv) {
        Ok(Some(a)) => a,
        Ok(None) => {
            eprintln!("ci-runner status: STATUS_ADDR is off");
            std::process::exit(1);
        }
        Err(p) => {
            eprintln!("ci-runner status: {p}");
            std::process::exit(ExitCode::Config.code());
        }
    };
    match status::query(addr) {
        Ok((healthy, body)) => {
            println!("{body}");
            std::process::exit(if healthy { 0 } else { 1 });
        }
        Err(e) => {
            eprintln!("ci-runner status: failed to reach {addr}: {e}");
            std::process::exit(1);
        }
    }
}

/// `ci-runner list|remove|prune`: the pool's runners on GitHub (README "Fleet hygiene"),
/// configured like the supervisor but needing only the PAT, the scope and the name prefix.
fn fleet_command(name: &str, args: &[OsString]) -> ! {
    let args: Option<Vec<String>> = args.iter().map(|a| a.to_str().map(str::to_string)).collect();
    let cmd = match args.ok_or_else(|| "arguments must be UTF-8".to_string()).and_then(|a| fleet::parse_args(name, &a))
    {
        Ok(cmd) => cmd,
        Err(e) => {
            eprintln!("ci-runner {name}: {e}\n{USAGE}");
            std::process::exit(ExitCode::Usage.code());
        }
    };
    let cfg = match config::ops_config(&ProcessEnv) {
        Ok(cfg) => cfg,
        Err(e) => exit_bad_config(&format!("ci-runner {name}"), &e),
    };
    // GitHub's retries are WARNs on stderr; the results go to stdout.
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("warn"))
        .with_writer(std::io::stderr)
        .try_init();
    let runtime = match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            eprintln!("ci-runner {name}: failed to start the runtime: {e}");
            std::process::exit(ExitCode::Internal.code());
        }
    };
    std::process::exit(fleet::run(&runtime, cmd, &cfg).code())
}

/// `ci-runner forward`: the port forwards alone, in the foreground, until SIGTERM or SIGINT.
fn forward_command() -> ! {
    // Every bad variable is reported, the logging ones with the forwarding ones.
    let settings = match (config::log_settings(&ProcessEnv), config::forward_settings(&ProcessEnv)) {
        (Ok(log), Ok(fwd)) => Ok((log, fwd)),
        (log, fwd) => Err([log.err(), fwd.err()].into_iter().flatten().flatten().collect::<Vec<_>>()),
    };
    let ((format, filter), (forwards, opts)) = match settings {
        Ok((log, Some(fwd))) => (log, fwd),
        Ok((_, None)) => {
            eprintln!("ci-runner forward: nothing to forward: set FORWARD_HOST and FORWARD_PORTS");
            std::process::exit(ExitCode::Config.code());
        }
        Err(problems) => exit_bad_config("ci-runner forward", &ConfigError(problems)),
    };
    init_tracing(format, &filter);
    // Blocked before the forwarding thread starts, so that it inherits the mask and the signals
    // wait for `sigwait` here.
    let mut signals = SigSet::empty();
    signals.add(Signal::SIGTERM);
    signals.add(Signal::SIGINT);
    if let Err(e) = signals.thread_block() {
        tracing::error!(error = %e, "Failed to block SIGTERM and SIGINT.");
        std::process::exit(ExitCode::Internal.code());
    }
    let forwarder = match forward::start(forwards, opts) {
        Ok(f) => f,
        Err(e) => {
            tracing::error!(error = %chain(&e), "Failed to start the forwards.");
            std::process::exit(ExitCode::Internal.code());
        }
    };
    tracing::info!(
        version = env!("CARGO_PKG_VERSION"),
        pid = std::process::id(),
        "Forwarding until SIGTERM or SIGINT."
    );
    match signals.wait() {
        Ok(sig) => tracing::info!(signal = %sig, "Signal received; stopping the forwards."),
        Err(e) => tracing::error!(error = %e, "Failed to wait for a signal; stopping the forwards."),
    }
    forwarder.stop();
    tracing::info!("Forwards stopped.");
    std::process::exit(ExitCode::Ok.code())
}

/// `ci-runner prewarm`: one pre-warm in the foreground; exit 0 warm or cold (no slot),
/// 1 when it failed, 3 for bad configuration.
fn prewarm_command() {
    let is_root = nix::unistd::geteuid().is_root();
    let host = Host { is_root, users: &SystemUsers, runner_dir_ok: &|_: &std::path::Path| true };
    let settings = match config::prewarm_only(&ProcessEnv, &host) {
        Ok(Some(s)) => s,
        Ok(None) => {
            eprintln!("ci-runner prewarm: CI_STORAGE_HOST is not set");
            std::process::exit(ExitCode::Config.code());
        }
        Err(e) => exit_bad_config("ci-runner prewarm", &e),
    };
    let _ = tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::new("info"))
        .with_writer(std::io::stderr)
        .try_init();
    let started = std::time::Instant::now();
    let gate = Arc::new(ci_runner::prewarm::Gate::default());
    match ci_runner::prewarm::load(&settings, &gate, &ci_runner::prewarm::Progress::default()) {
        Ok(l) => {
            println!(
                "{} slot={} files={} bytes={} seconds={:.3} dir={}",
                if l.slot.is_some() { "warm" } else { "cold" },
                l.slot.as_deref().unwrap_or("-"),
                l.files,
                l.bytes,
                started.elapsed().as_secs_f64(),
                settings.local_dir.display()
            );
        }
        Err(e) => {
            eprintln!("ci-runner prewarm: {}", chain(&e));
            std::process::exit(1);
        }
    }
}

fn supervise() -> ! {
    // The boot's times count from here (the fork keeps the monotonic clock).
    let started = std::time::Instant::now();
    pid1::split();
    // From here on we are the supervisor child. Keep /proc/<pid>/environ (which still holds
    // GH_TOKEN) from processes of the same uid.
    // SAFETY: prctl with integer arguments.
    unsafe {
        libc::prctl(libc::PR_SET_DUMPABLE, 0, 0, 0, 0);
    }
    // One malloc arena: the supervisor is one busy thread plus the odd blocking helper, and
    // per-thread arenas would only add resident memory (the bar is 10 MiB for both processes).
    // SAFETY: mallopt is called before any other thread exists.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 1);
    }
    let is_root = nix::unistd::geteuid().is_root();
    let host = Host { is_root, users: &SystemUsers, runner_dir_ok: &config::runner_dir_has_scripts };
    let cfg = match Config::from_env(&ProcessEnv, &host) {
        Ok(cfg) => cfg,
        Err(e) => exit_bad_config("ci-runner", &e),
    };
    init_tracing(cfg.log_format, &cfg.log_filter);
    // Before anything runs as the runner user (issue #17); still one thread, for the probe's fork.
    if let Err(e) = ci_runner::secrets::protect(&cfg) {
        let e = ci_runner::error::Error::from(e);
        tracing::error!(error = %chain(&e), "Failed to start.");
        std::process::exit(e.exit_code().code());
    }
    let runtime = runtime_or_exit();
    let registry: Registry = Arc::new(Mutex::new(Vec::new()));
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| runtime.block_on(run(cfg, registry.clone(), started))));
    drop(runtime);
    let code = match result {
        Ok(code) => code,
        Err(_) => {
            tracing::error!("The supervisor panicked; removing the registrations.");
            let runners = registry.lock().unwrap_or_else(|p| p.into_inner()).clone();
            if let Ok(rt) = tokio::runtime::Builder::new_current_thread().enable_all().build() {
                for (cfg, slot) in &runners {
                    rt.block_on(supervisor::emergency_deregister(cfg, slot));
                }
            }
            ExitCode::Internal
        }
    };
    std::process::exit(code.code())
}

async fn run(mut cfg: Config, registry: Registry, started: std::time::Instant) -> ExitCode {
    let (tx, rx) = mpsc::unbounded_channel();
    let drain = tx.clone();
    if let Err(e) = forward_signals(tx) {
        tracing::error!(error = %e, "Failed to install signal handlers.");
        return ExitCode::Internal;
    }
    // Handlers are in place: let the signals held since the fork through.
    pid1::unblock_signals();
    tracing::info!(version = env!("CARGO_PKG_VERSION"), pid = std::process::id(), config = %cfg.summary(), "ci-runner starting.");

    let (status, status_rx) = StatusHandle::new();
    let cancel = CancellationToken::new();
    // The container's start on the wall clock, for the boot figures (BTIME).
    cfg.autoscale.started = std::time::SystemTime::now().checked_sub(started.elapsed());
    let autoscale = Autoscale::start(cfg.autoscale.clone(), status_rx.clone(), drain);
    if let Some(addr) = cfg.status_addr {
        match status::serve(addr, status_rx.clone(), cancel.clone()).await {
            Ok(bound) => tracing::info!(addr = %bound, "Serving /health and /metrics."),
            Err(source) => {
                let e = ci_runner::error::Error::Status { addr, source };
                tracing::error!(error = %chain(&e), "Failed to start.");
                return e.exit_code();
            }
        }
    }
    let commands = match &cfg.admin {
        None => None,
        Some(admin) => {
            let (tx, commands) = mpsc::channel(16);
            match ci_runner::admin::serve(admin, status_rx.clone(), tx, cancel.clone()).await {
                Ok(bound) => tracing::info!(addr = %bound, "Serving the admin API."),
                Err(source) => {
                    let e = ci_runner::error::Error::Admin { addr: admin.addr, source };
                    tracing::error!(error = %chain(&e), "Failed to start.");
                    return e.exit_code();
                }
            }
            Some(commands)
        }
    };
    // ~/ci-storage-host, and the ci-storage key served to jobs (SSH_AUTH_SOCK), before the hooks.
    let agent = ci_runner::agent::start(&mut cfg);
    let runners = Runners::new(cfg, status, rx, commands, registry, tokio::time::Instant::from_std(started));
    let code = runners.run().await;
    drop(agent);
    // The last datapoint and the protection's release, once the runner is gone.
    autoscale.shutdown().await;
    cancel.cancel();
    code
}

/// TERM and INT drive the drain; every other signal that PID 1 forwards and whose default
/// would end the supervisor (HUP, QUIT, USR1, USR2, ALRM, PWR, real-time ones…; see
/// `pid1::supervisor_logged`) is logged and otherwise ignored, so that `docker kill -s PWR` or
/// a `STOPSIGNAL SIGRTMIN+3` never ends it without a drain (issue #16).
fn forward_signals(tx: mpsc::UnboundedSender<SignalKind>) -> std::io::Result<()> {
    for (kind, sig) in [(SignalKind::Term, Sig::terminate()), (SignalKind::Int, Sig::interrupt())] {
        let mut stream = signal(sig)?;
        let tx = tx.clone();
        tokio::spawn(async move {
            while stream.recv().await.is_some() {
                if tx.send(kind).is_err() {
                    break;
                }
            }
        });
    }
    let mut streams = Vec::new();
    for n in pid1::supervisor_logged() {
        streams.push((n, signal(Sig::from_raw(n))?));
    }
    // One task for all of them (about 45 signals).
    tokio::spawn(async move {
        loop {
            let taken = std::future::poll_fn(|cx| {
                for (n, stream) in streams.iter_mut() {
                    if let std::task::Poll::Ready(got) = stream.poll_recv(cx) {
                        return std::task::Poll::Ready(got.map(|()| *n));
                    }
                }
                std::task::Poll::Pending
            })
            .await;
            match taken {
                Some(n) => tracing::info!(signal = %pid1::signal_name(n), "Signal ignored."),
                // The runtime is shutting down.
                None => break,
            }
        }
    });
    Ok(())
}

/// Prints every configuration problem, one per line under `prefix`, and exits 3 (the
/// supervisor's and the fleet commands' code for a bad environment alike).
fn exit_bad_config(prefix: &str, e: &ConfigError) -> ! {
    eprintln!("{prefix}: {e}:");
    for p in &e.0 {
        eprintln!("{prefix}:   {p}");
    }
    std::process::exit(ExitCode::Config.code())
}

/// The single-threaded runtime of the supervisor and the controller; without one, exit 1 (the
/// internal error's code) with the reason logged.
fn runtime_or_exit() -> tokio::runtime::Runtime {
    match tokio::runtime::Builder::new_current_thread().enable_all().build() {
        Ok(rt) => rt,
        Err(e) => {
            tracing::error!(error = %e, "Failed to start the runtime.");
            std::process::exit(ExitCode::Internal.code());
        }
    }
}

/// C's `pow`, the one libm function the binary calls (the AWS SDK's client-side rate limiter,
/// issue #20), from the pure-Rust port of musl's: defined here, it keeps libm.so.6 out of
/// both processes, about 300 KiB resident in each against the 10 MiB bar. glibc's static
/// libm cannot be linked beside a dynamic libc (its ifuncs need libc's internals).
#[no_mangle]
pub extern "C" fn pow(x: f64, y: f64) -> f64 {
    libm::pow(x, y)
}

fn init_tracing(format: LogFormat, filter: &str) {
    let filter = tracing_subscriber::EnvFilter::try_new(sdk_held_back(filter)).unwrap_or_else(|_| "info".into());
    let builder = tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Plain => builder.with_ansi(nix::unistd::isatty(2).unwrap_or(false)).init(),
    }
}

/// The AWS SDK's crates whose own log lines [`sdk_held_back`] keeps to errors.
const SDK_LOG_TARGETS: [&str; 6] = [
    "aws_config",
    "aws_sdk_sts",
    "aws_runtime",
    "aws_smithy_runtime",
    "aws_smithy_http_client",
    "aws_credential_types",
];

/// `filter` with the AWS SDK's crates at ERROR unless it names one: their providers log each
/// fetch at INFO (the profile provider, with the access key id) and each failure at WARN on
/// every retry, beside ci-runner's own line that carries the whole error once per outage.
fn sdk_held_back(filter: &str) -> String {
    if filter.contains("aws_") {
        return filter.to_string();
    }
    SDK_LOG_TARGETS.iter().fold(filter.to_string(), |f, t| format!("{f},{t}=error"))
}

/// `ci-runner controller`: the webhook autoscaler (issue #9), until SIGTERM or SIGINT.
fn controller_command() -> ! {
    let cfg = match config::controller_config(&ProcessEnv) {
        Ok(cfg) => cfg,
        Err(e) => exit_bad_config("ci-runner controller", &e),
    };
    init_tracing(cfg.log_format, &cfg.log_filter);
    let runtime = runtime_or_exit();
    let code = runtime.block_on(async move {
        tracing::info!(version = env!("CARGO_PKG_VERSION"), config = %cfg.summary(), "ci-runner controller starting.");
        let cancel = CancellationToken::new();
        let stop = cancel.clone();
        let (mut term, mut int) = match (signal(Sig::terminate()), signal(Sig::interrupt())) {
            (Ok(t), Ok(i)) => (t, i),
            _ => {
                tracing::error!("Failed to install signal handlers.");
                return ExitCode::Internal;
            }
        };
        tokio::spawn(async move {
            tokio::select! {
                _ = term.recv() => tracing::info!(signal = "SIGTERM", "Signal received; stopping."),
                _ = int.recv() => tracing::info!(signal = "SIGINT", "Signal received; stopping."),
            }
            stop.cancel();
        });
        match ci_runner::controller::run(cfg, cancel).await {
            Ok(()) => ExitCode::Ok,
            Err(e) => {
                tracing::error!(error = %chain(&e), "Failed to run the controller.");
                ExitCode::Internal
            }
        }
    });
    std::process::exit(code.code())
}
