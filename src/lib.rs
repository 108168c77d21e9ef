//! `ci-runner`: PID 1 of a GitHub Actions self-hosted runner container.
//!
//! It exchanges a PAT (or a GitHub App's installation token) for a registration token,
//! registers the official runner with `config.sh`, supervises `run.sh`, knows from the
//! runner's own output whether a job runs, and on SIGTERM lets that job finish before it
//! de-registers. As PID 1 it reaps every zombie, forwards signals and passes exit codes
//! through.
//!
//! # Layout
//! - [`pid1`]: the tiny synchronous parent: fork, forward signals, reap, pass the exit code.
//! - [`config`]: the only reader of the environment; typed, validated all at once.
//! - [`github`]: the REST API (registration tokens, JIT configurations, runner groups, find and
//!   delete runners) with retries, authenticated by a PAT or a GitHub App's installation tokens.
//! - [`app`]: GitHub App authentication: the private key, the RS256 JWT, token lifetimes.
//! - [`runner`]: `config.sh` and `run.sh` as processes, their output lines, their files.
//! - [`update`]: the runner brought to the latest release at boot, verified, cached, swapped in whole.
//! - [`supervisor`]: one runner's life: register, supervise, drain, de-register; the exit table.
//! - [`runners`]: the container's runners: the shared boot, one supervisor each, signals fanned out.
//! - [`admin`]: the authenticated admin API: list, add and remove runners.
//! - [`fleet`]: the pool's runners on GitHub: the start-up sweep, `list`, `remove`, `prune`.
//! - [`hooks`]: the boot hooks, `entrypoint.*.sh` sourced as root, then as the runner user.
//! - [`secrets`]: proves at start that the runner user can read no secret; makes it so or refuses.
//! - [`agent`]: the SSH agent that signs with the ci-storage key for jobs, which never see it.
//! - [`prewarm`]: the work dir loaded from the newest ci-storage slot over SSH before the first job.
//! - [`instance`]: per-instance labels in a pool (`RUNNER_INSTANCE_LABELS`), by key or claimed index.
//! - [`lock`]: the hardware lock: one job at a time on a shared device, in arrival order.
//! - [`forward`]: `127.0.0.1:N` to port N on the central host: TCP with failover, UDP sessions.
//! - [`aws`]: credentials, SigV4, CloudWatch, the ECS agent and instance metadata, by hand.
//! - [`autoscale`]: the busy share on CloudWatch, ECS scale-in protection, the spot watch.
//! - [`status`]: the state machine's current state on `GET /health` and `ci-runner status`.
//! - [`metrics`]: the process-wide counters (jobs, GitHub calls, forwards) for `GET /metrics`.
//! - [`error`]: the top-level error and the exit codes.
//! - [`controller`]: `ci-runner controller`, the webhook autoscaler: a runner container per queued job.

pub mod admin;
pub mod agent;
pub mod app;
pub mod autoscale;
pub mod aws;
pub mod config;
pub mod controller;
pub mod error;
pub mod fleet;
pub mod forward;
pub mod github;
pub mod hooks;
pub mod instance;
pub mod lock;
pub mod metrics;
pub mod pid1;
pub mod prewarm;
pub mod runner;
pub mod runners;
pub mod secrets;
pub mod status;
pub mod supervisor;
pub mod update;

/// A test's prerequisite is missing (root, a tool, the Docker engine): the test fails, saying
/// how to get it, unless `CI_RUNNER_TEST_SKIP` (comma-separated) lists `what` or `all`; then it
/// says it skips and returns false. With `CI` set nothing may be skipped. The one rule of the
/// unit tests and the integration tests (whose harness calls it); not for the binary.
#[doc(hidden)]
pub fn prerequisite_missing(what: &str, fix: &str) -> bool {
    let skip = std::env::var("CI_RUNNER_TEST_SKIP").unwrap_or_default();
    let skipped = skip.split(',').map(str::trim).any(|s| s == what || s == "all");
    assert!(
        skipped && std::env::var("CI").is_err(),
        "{what} is missing: {fix} (or skip the tests that need it with CI_RUNNER_TEST_SKIP={what}, never on CI)"
    );
    eprintln!("skipping (CI_RUNNER_TEST_SKIP): {what} is missing: {fix}");
    false
}
