//! Starts the fake GitHub, a fake runner root and the real `ci-runner`, all on loopback and in
//! temp dirs; polls with deadlines; kills every process it started on drop and prints the
//! captured log when a test fails.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

pub const PAT: &str = "ghp_admin";
pub const REPO: &str = "octo-org/octo-repo";

pub fn repo_root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

pub fn bin() -> &'static str {
    env!("CARGO_BIN_EXE_ci-runner")
}

/// Polls `cond` every 20 ms until it holds or `timeout` passes; then panics saying `what`.
pub fn wait_for<T>(what: &str, timeout: Duration, mut cond: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + timeout;
    loop {
        if let Some(v) = cond() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out after {timeout:?} waiting for: {what}");
        std::thread::sleep(Duration::from_millis(20));
    }
}

/// A prerequisite of a test is missing: fail, or skip when `CI_RUNNER_TEST_SKIP` names it
/// (never on CI). The crate's own rule, shared with its unit tests.
pub use ci_runner::prerequisite_missing;

/// Whether `tool` is on PATH; when not, [`prerequisite_missing`] decides (fail or skip).
pub fn require(tool: &str) -> bool {
    let found = Command::new("sh")
        .arg("-c")
        .arg(format!("command -v {tool}"))
        .stdout(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    found || prerequisite_missing(tool, &format!("install {tool} (scripts/test installs it)"))
}

/// A TCP port free on 127.0.0.1 a moment ago, never handed out twice in one test run.
///
/// It is taken below the kernel's ephemeral range (32768-60999 by default), so no server that
/// binds port 0, as the supervisor's own `/health` does in these tests, can be given it between
/// this call and the bind it is meant for: CI once saw `ADMIN_ADDR` collide that way.
pub fn free_port() -> u16 {
    use std::sync::atomic::{AtomicU32, Ordering};
    static NEXT: AtomicU32 = AtomicU32::new(0);
    const FIRST: u32 = 20_000;
    const SPAN: u32 = 12_000;
    let start = FIRST + std::process::id() % 1_000 * 10;
    loop {
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        assert!(n < SPAN, "no free port left below the ephemeral range");
        let port = (FIRST + (start - FIRST + n) % SPAN) as u16;
        if std::net::TcpListener::bind(("127.0.0.1", port)).is_ok() {
            return port;
        }
    }
}

pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// Root, or [`prerequisite_missing`] decides (fail or skip): `why` names the tests.
pub fn require_root(why: &str) -> bool {
    is_root() || prerequisite_missing("root", &format!("{why} need root: run the tests as root"))
}

/// Every live descendant of `pid` (children first found, by /proc ppid links).
pub fn descendants(pid: u32) -> Vec<u32> {
    let mut parent_of = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok()) else { continue };
            if let Ok(stat) = std::fs::read_to_string(format!("/proc/{p}/stat")) {
                if let Some(after) = stat.rfind(')').map(|i| &stat[i + 1..]) {
                    if let Some(ppid) = after.split_whitespace().nth(1).and_then(|s| s.parse::<u32>().ok()) {
                        parent_of.push((p, ppid));
                    }
                }
            }
        }
    }
    let mut out = Vec::new();
    let mut frontier = vec![pid];
    while let Some(cur) = frontier.pop() {
        for (p, pp) in &parent_of {
            if *pp == cur && !out.contains(p) {
                out.push(*p);
                frontier.push(*p);
            }
        }
    }
    out
}

fn kill_tree(pid: u32) {
    for p in descendants(pid) {
        let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(p as i32), nix::sys::signal::Signal::SIGKILL);
    }
    let _ = nix::sys::signal::kill(nix::unistd::Pid::from_raw(pid as i32), nix::sys::signal::Signal::SIGKILL);
}

/// Captures a child's lines into a shared buffer; returns a flag set at end of stream.
fn capture(
    stream: impl std::io::Read + Send + 'static,
    log: Arc<Mutex<Vec<String>>>,
) -> Arc<std::sync::atomic::AtomicBool> {
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let flag = done.clone();
    std::thread::spawn(move || {
        for line in BufReader::new(stream).lines().map_while(Result::ok) {
            log.lock().unwrap().push(line);
        }
        flag.store(true, std::sync::atomic::Ordering::SeqCst);
    });
    done
}

/// The fake GitHub (tests/fakes/fake_github.py) on a loopback port.
pub struct FakeGithub {
    child: Child,
    pub port: u16,
    _dir: tempfile::TempDir,
    log: Arc<Mutex<Vec<String>>>,
}

impl FakeGithub {
    pub fn start() -> Self {
        let dir = tempfile::tempdir().unwrap();
        let port_file = dir.path().join("port");
        let log = Arc::new(Mutex::new(Vec::new()));
        let mut child = Command::new("/usr/bin/python3")
            .arg(repo_root().join("tests/fakes/fake_github.py"))
            .args(["--listen", "127.0.0.1:0", "--port-file"])
            .arg(&port_file)
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start fake_github.py");
        capture(child.stderr.take().unwrap(), log.clone());
        let port = wait_for("the fake GitHub to listen", Duration::from_secs(20), || {
            std::fs::read_to_string(&port_file).ok().and_then(|s| s.trim().parse().ok())
        });
        Self { child, port, _dir: dir, log }
    }

    pub fn url(&self) -> String {
        format!("http://127.0.0.1:{}", self.port)
    }

    pub fn get(&self, path: &str) -> Value {
        ureq::get(&format!("{}{path}", self.url()))
            .call()
            .unwrap_or_else(|e| panic!("GET {path}: {e}"))
            .into_json()
            .unwrap()
    }

    pub fn post(&self, path: &str, body: Value) -> Value {
        match ureq::post(&format!("{}{path}", self.url())).send_json(body) {
            Ok(r) => r.into_json().unwrap_or(Value::Null),
            Err(e) => panic!("POST {path}: {e}"),
        }
    }

    pub fn runners(&self) -> Vec<Value> {
        let v = self.get("/_fake/runners");
        v.as_array().cloned().or_else(|| v["runners"].as_array().cloned()).unwrap_or_default()
    }

    /// The names of the runners the fake has online.
    pub fn online_names(&self) -> Vec<String> {
        self.runners()
            .into_iter()
            .filter(|r| r["status"] == "online")
            .filter_map(|r| r["name"].as_str().map(str::to_string))
            .collect()
    }

    pub fn runner_named(&self, name: &str) -> Option<Value> {
        self.runners().into_iter().find(|r| r["name"] == name)
    }

    pub fn enqueue(&self, name: &str, labels: &[&str], steps: &str) -> u64 {
        let v = self.post("/_fake/jobs", json!({"scope": REPO, "labels": labels, "name": name, "steps": steps}));
        v["id"].as_u64().expect("job id")
    }

    pub fn job(&self, id: u64) -> Value {
        self.get(&format!("/_fake/jobs/{id}"))
    }

    pub fn fault(&self, spec: Value) {
        self.post("/_fake/faults", spec);
    }

    pub fn requests(&self) -> Vec<Value> {
        let v = self.get("/_fake/requests");
        v.as_array().cloned().or_else(|| v["requests"].as_array().cloned()).unwrap_or_default()
    }

    /// REST requests (not control or runner-side calls) whose path contains `part`.
    pub fn rest_requests(&self, method: &str, part: &str) -> Vec<Value> {
        self.requests()
            .into_iter()
            .filter(|r| {
                r["method"] == method && r["path"].as_str().is_some_and(|p| p.contains(part) && !p.contains("/_fake/"))
            })
            .collect()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }
}

impl Drop for FakeGithub {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- fake GitHub log -----\n{}", self.log());
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A copy of the fake runner, owned by the user the runner will run as.
pub struct RunnerDir {
    pub dir: tempfile::TempDir,
    pub user: Option<&'static str>,
}

fn copy_dir(from: &Path, to: &Path) {
    std::fs::create_dir_all(to).unwrap();
    for e in std::fs::read_dir(from).unwrap().flatten() {
        let name = e.file_name();
        if name == "__pycache__" {
            continue;
        }
        let (src, dst) = (e.path(), to.join(&name));
        if e.file_type().unwrap().is_dir() {
            copy_dir(&src, &dst);
        } else {
            std::fs::copy(&src, &dst).unwrap();
        }
    }
}

fn chown_tree(path: &Path, uid: u32, gid: u32) {
    let _ = nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(uid)), Some(nix::unistd::Gid::from_raw(gid)));
    if path.is_dir() {
        for e in std::fs::read_dir(path).unwrap().flatten() {
            chown_tree(&e.path(), uid, gid);
        }
    }
}

impl RunnerDir {
    pub fn new() -> Self {
        let dir = tempfile::tempdir().unwrap();
        copy_dir(&repo_root().join("tests/fakes/runner"), dir.path());
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        // As root the runner runs as `nobody` (RUNNER_USER), so the drop to an unprivileged
        // user is exercised; otherwise everything runs as the current user.
        let user = is_root().then_some("nobody");
        if is_root() {
            chown_tree(dir.path(), 65534, 65534);
        }
        Self { dir, user }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    /// A scratch directory the job can write to and the test can read.
    pub fn scratch(&self) -> PathBuf {
        let p = self.path().join("scratch");
        std::fs::create_dir_all(&p).unwrap();
        std::fs::set_permissions(&p, std::fs::Permissions::from_mode(0o777)).unwrap();
        p
    }
}

/// A running `ci-runner` with its log captured.
pub struct Supervisor {
    pub child: Child,
    log: Arc<Mutex<Vec<String>>>,
    /// Given, or learnt from the log when the supervisor picked a free port itself.
    status_addr: Mutex<Option<String>>,
    /// Set when stdout / stderr reach their end.
    eof: Vec<Arc<std::sync::atomic::AtomicBool>>,
}

/// The environment a test supervisor gets: every endpoint pointed at the fakes.
pub fn base_env(gh: &FakeGithub, runner: &RunnerDir) -> Vec<(String, String)> {
    let mut env = vec![
        ("PATH".to_string(), "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin".to_string()),
        ("GH_TOKEN".into(), PAT.into()),
        ("GH_REPOSITORY".into(), REPO.into()),
        ("GH_LABELS".into(), "ci-test,linux".into()),
        ("GH_SERVER_URL".into(), gh.url()),
        ("GH_API_URL".into(), format!("{}/api/v3", gh.url())),
        ("RUNNER_DIR".into(), runner.path().display().to_string()),
        ("RUST_LOG".into(), "info".into()),
        ("FAKE_RETRY_SLEEP_SEC".into(), "0.2".into()),
        ("FAKE_CANCEL_SIGINT_WAIT_SEC".into(), "1".into()),
        ("FAKE_CANCEL_SIGTERM_WAIT_SEC".into(), "1".into()),
        ("FAKE_SESSION_RETRY_SEC".into(), "0.2".into()),
        ("FAKE_HTTP_RETRY_SEC".into(), "0.05".into()),
        // Never the link-local instance metadata address from a test (the spot watch and the
        // region discovery would try it).
        ("AWS_EC2_METADATA_DISABLED".into(), "true".into()),
        // Not the default /tmp/github-runner-locks, which would outlive the test run.
        ("RUNNER_LOCK_DIR".into(), runner.path().join("_locks").display().to_string()),
    ];
    if let Some(u) = runner.user {
        env.push(("RUNNER_USER".into(), u.into()));
    }
    env
}

/// [`base_env`] with `extra` set over it.
pub fn env_with(gh: &FakeGithub, runner: &RunnerDir, extra: &[(&str, &str)]) -> Vec<(String, String)> {
    let mut env = base_env(gh, runner);
    for (k, v) in extra {
        env.retain(|(ek, _)| ek != k);
        env.push((k.to_string(), v.to_string()));
    }
    env
}

impl Supervisor {
    pub fn start(env: &[(String, String)]) -> Self {
        let mut cmd = Command::new(bin());
        cmd.env_clear().envs(env.iter().map(|(k, v)| (k, v)));
        let given = env.iter().find(|(k, _)| k == "STATUS_ADDR").map(|(_, v)| v.clone()).unwrap_or_default();
        if given.is_empty() {
            // Port 0: the supervisor binds a free port and logs it, so no two tests race for one.
            cmd.env("STATUS_ADDR", "127.0.0.1:0");
        }
        Self::from_command(cmd, given)
    }

    /// Where `/health` is served.
    pub fn status_addr(&self) -> String {
        if let Some(a) = self.status_addr.lock().unwrap().clone() {
            return a;
        }
        let addr = wait_for("the status address in the log", Duration::from_secs(30), || {
            let log = self.log.lock().unwrap();
            log.iter()
                .find(|l| l.contains("Serving /health and /metrics."))
                .and_then(|l| l.split_whitespace().find_map(|w| w.strip_prefix("addr=")).map(str::to_string))
        });
        *self.status_addr.lock().unwrap() = Some(addr.clone());
        addr
    }

    /// Starts `cmd` (ci-runner, or something wrapping it) with its output captured.
    pub fn from_command(mut cmd: Command, status_addr: String) -> Self {
        cmd.stdin(Stdio::null()).stdout(Stdio::piped()).stderr(Stdio::piped()).process_group(0);
        let mut child = cmd.spawn().expect("start ci-runner");
        let log = Arc::new(Mutex::new(Vec::new()));
        let eof = vec![
            capture(child.stdout.take().unwrap(), log.clone()),
            capture(child.stderr.take().unwrap(), log.clone()),
        ];
        let status_addr = Mutex::new(Some(status_addr).filter(|a| !a.is_empty()));
        Self { child, log, status_addr, eof }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    pub fn log(&self) -> String {
        self.log.lock().unwrap().join("\n")
    }

    pub fn log_has(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn count(&self, needle: &str) -> usize {
        self.log.lock().unwrap().iter().filter(|l| l.contains(needle)).count()
    }

    pub fn wait_log(&self, needle: &str, timeout: Duration) {
        wait_for(&format!("log line containing {needle:?}"), timeout, || self.log_has(needle).then_some(()));
    }

    /// Signals the supervisor process (the PID-1 parent, which forwards it).
    pub fn signal(&self, sig: nix::sys::signal::Signal) {
        nix::sys::signal::kill(nix::unistd::Pid::from_raw(self.pid() as i32), sig).unwrap();
    }

    /// Waits for the exit, then for the captured log to be complete (both pipes at their end,
    /// or 5 s, since orphans of a job may hold them open).
    pub fn wait_exit(&mut self, timeout: Duration) -> ExitStatus {
        let child = &mut self.child;
        let status = wait_for("ci-runner to exit", timeout, || child.try_wait().unwrap());
        let deadline = Instant::now() + Duration::from_secs(5);
        while Instant::now() < deadline && !self.eof.iter().all(|f| f.load(std::sync::atomic::Ordering::SeqCst)) {
            std::thread::sleep(Duration::from_millis(10));
        }
        status
    }

    /// `/health` as JSON.
    pub fn health(&self) -> Option<Value> {
        let url = format!("http://{}/health", self.status_addr());
        match ureq::get(&url).call() {
            Ok(r) => r.into_json().ok(),
            Err(ureq::Error::Status(_, r)) => r.into_json().ok(),
            Err(_) => None,
        }
    }

    /// `/metrics` as text.
    pub fn metrics(&self) -> String {
        ureq::get(&format!("http://{}/metrics", self.status_addr())).call().unwrap().into_string().unwrap()
    }

    pub fn wait_state(&self, state: &str, timeout: Duration) -> Value {
        wait_for(&format!("state {state}"), timeout, || self.health().filter(|h| h["state"] == state))
    }

    pub fn runner_name(&self) -> String {
        wait_for("the runner name in /health", Duration::from_secs(10), || {
            self.health().and_then(|h| h["runner_name"].as_str().map(str::to_string))
        })
    }
}

impl Drop for Supervisor {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!("----- ci-runner log -----\n{}", self.log());
        }
        kill_tree(self.child.id());
        let _ = self.child.wait();
    }
}

/// Starts a supervisor with `env` and waits until its runner is idle and online on the fake
/// GitHub; returns it and the runner's name.
pub fn start_online(gh: &FakeGithub, env: &[(String, String)]) -> (Supervisor, String) {
    let boot = Duration::from_secs(30);
    let sup = Supervisor::start(env);
    sup.wait_state("idle", boot);
    let name = sup.runner_name();
    wait_for("the runner online on the fake GitHub", boot, || {
        gh.runner_named(&name).filter(|r| r["status"] == "online").map(|_| ())
    });
    (sup, name)
}

/// A job script that waits for `<scratch>/<name>.release` and records that it ran.
pub fn gated_steps(scratch: &Path, name: &str) -> String {
    let s = scratch.display();
    format!("touch {s}/{name}.started; while [ ! -e {s}/{name}.release ]; do sleep 0.05; done; touch {s}/{name}.done")
}

pub fn release(scratch: &Path, name: &str) {
    std::fs::write(scratch.join(format!("{name}.release")), b"").unwrap();
}
