//! Issue #17: jobs store to ci-storage through the supervisor's SSH agent, never seeing the
//! key, and no secret file is readable by the runner user whatever the host's owner and mode.

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use crate::prewarm::{describe_tree, Sshd};

const BOOT: Duration = Duration::from_secs(60);
const NOBODY: u32 = 65534;

fn mkdir(path: &Path, mode: u32, owner: u32) {
    std::fs::create_dir_all(path).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(owner)), Some(nix::unistd::Gid::from_raw(owner))).unwrap();
}

fn write(path: &Path, text: &str, mode: u32, owner: u32) {
    std::fs::write(path, text).unwrap();
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).unwrap();
    nix::unistd::chown(path, Some(nix::unistd::Uid::from_raw(owner)), Some(nix::unistd::Gid::from_raw(owner))).unwrap();
}

fn wait_job(gh: &FakeGithub, id: u64) -> serde_json::Value {
    wait_for(&format!("job {id} to complete"), BOOT, || Some(gh.job(id)).filter(|j| j["status"] == "completed"))
}

/// The key's base64 lines, any of which in a file, an environment or a log is a leak; all but
/// the first, which is the same in every OpenSSH key (`openssh-key-v1`, no cipher, one key).
fn key_lines(key: &str) -> Vec<String> {
    key.lines().filter(|l| !l.starts_with("-----") && l.len() >= 20).skip(1).map(str::to_string).collect()
}

fn leaks(text: &[u8], needles: &[String]) -> bool {
    let text = String::from_utf8_lossy(text);
    needles.iter().any(|n| text.contains(n.as_str()))
}

/// Every file below `root` (not following links, at most `depth` levels) that holds the key.
fn files_with_key(root: &Path, depth: u32, needles: &[String], out: &mut Vec<PathBuf>) {
    let Ok(entries) = std::fs::read_dir(root) else { return };
    for e in entries.flatten() {
        let Ok(m) = e.path().symlink_metadata() else { continue };
        if m.is_dir() && depth > 0 {
            files_with_key(&e.path(), depth - 1, needles, out);
        } else if m.is_file() && m.len() < 4 << 20 && std::fs::read(e.path()).is_ok_and(|t| leaks(&t, needles)) {
            out.push(e.path());
        }
    }
}

/// What must never happen: the key's bytes in a process's environment or argv.
fn assert_key_in_no_process(needles: &[String]) {
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        if e.file_name().to_str().is_none_or(|n| n.parse::<u32>().is_err()) {
            continue;
        }
        for part in ["environ", "cmdline"] {
            if let Ok(t) = std::fs::read(e.path().join(part)) {
                assert!(!leaks(&t, needles), "the key is in /proc/{}/{part}", e.file_name().to_string_lossy());
            }
        }
    }
}

/// A job stores its workspace with the stand-in `ci-storage store` (rsync over ssh, the tool's
/// layout) through `SSH_AUTH_SOCK`; the next container pre-warms from that slot. Never: the
/// key in a file the runner user can read, in any process's environ or argv, in a log; a
/// store that needs a key file; a pre-warm that misses the job's slot.
#[test]
fn a_job_stores_through_the_agent_and_the_next_container_prewarms_from_its_slot() {
    let Some(sshd) = Sshd::start() else { return };
    if !require("python3") || !require("ssh-add") {
        return;
    }
    let gh = FakeGithub::start();
    let shared = tempfile::tempdir().unwrap();
    let s = shared.path();
    mkdir(s, 0o755, 0);
    let (storage, work, secrets, bin, tmp) =
        (s.join("storage"), s.join("work"), s.join("secrets"), s.join("bin"), s.join("tmp"));
    mkdir(&storage, 0o755, 0);
    mkdir(&work, 0o755, NOBODY);
    mkdir(&secrets, 0o700, 0);
    mkdir(&bin, 0o755, 0);
    mkdir(&tmp, 0o1777, 0);
    std::fs::copy(repo_root().join("tests/fakes/ci-storage"), bin.join("ci-storage")).unwrap();
    std::fs::set_permissions(bin.join("ci-storage"), std::fs::Permissions::from_mode(0o755)).unwrap();
    let key = std::fs::read_to_string(sshd.key_file()).unwrap();
    let needles = key_lines(&key);
    // The key as a compose secret (a file, never a variable: no environ may hold it).
    write(&secrets.join("CI_STORAGE_PRIVATE_KEY"), &key, 0o644, NOBODY);

    let env_for = |runner: &RunnerDir| {
        let path = format!("{}:/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", bin.display());
        let host = format!("root@127.0.0.1:{}", sshd.port);
        env_with(
            &gh,
            runner,
            &[
                ("PATH", path.as_str()),
                ("CI_STORAGE_HOST", host.as_str()),
                ("CI_STORAGE_DIR", storage.to_str().unwrap()),
                ("SECRETS_DIR", secrets.to_str().unwrap()),
                ("RUNNER_WORKDIR", work.to_str().unwrap()),
                ("TMPDIR", tmp.to_str().unwrap()),
            ],
        )
    };

    let first = RunnerDir::new();
    let scratch = first.scratch();
    let sup = Supervisor::start(&env_for(&first));
    sup.wait_state("idle", BOOT);
    assert!(sup.log_has("SSH agent serving the ci-storage key to jobs."), "{}", sup.log());
    let sc = scratch.display();
    // What ci-storage's action runs for `action: store` (storage-dir /mnt there; ours here).
    let steps = format!(
        r#"set -eu
mkdir -p src node_modules/pkg
echo 'fn main() {{}}' > src/main.rs
head -c 300000 /dev/urandom > node_modules/pkg/blob.bin
env > {sc}/job.env
ssh-add -l > {sc}/agent.list
host=$(cat ~/ci-storage-host 2>/dev/null || echo "$CI_STORAGE_HOST")
case $host in *@*) ;; *) host="$(whoami)@$host" ;; esac
ci-storage store --storage-host="$host" --storage-dir="{st}/octo-org/octo-repo/$(realpath -m . | tr / _)" \
  --slot-id="$GITHUB_RUN_ID" --local-dir=. > {sc}/store.log 2>&1 || {{ echo "store failed: $?" >> {sc}/store.log; exit 1; }}
"#,
        st = storage.display()
    );
    let id = gh.enqueue("store", &["ci-test"], &steps);
    let job = wait_job(&gh, id);
    let store_log = std::fs::read_to_string(scratch.join("store.log")).unwrap_or_default();
    assert_eq!(job["result"], "Succeeded", "the job failed:\n{store_log}\n{}", sup.log());

    // The agent is what the job saw: SSH_AUTH_SOCK in its environment, the key listed by
    // fingerprint, and the key itself nowhere in what the job could write down.
    let job_env = std::fs::read_to_string(scratch.join("job.env")).unwrap();
    let sock = job_env.lines().find_map(|l| l.strip_prefix("SSH_AUTH_SOCK=")).expect("no SSH_AUTH_SOCK in the job");
    let sm = std::fs::metadata(sock).unwrap();
    let dm = std::fs::metadata(Path::new(sock).parent().unwrap()).unwrap();
    assert_eq!((sm.uid(), sm.mode() & 0o777, dm.uid(), dm.mode() & 0o777), (NOBODY, 0o600, NOBODY, 0o700));
    assert!(std::fs::read_to_string(scratch.join("agent.list")).unwrap().contains("SHA256:"));
    assert!(!leaks(job_env.as_bytes(), &needles), "the key reached the job's environment");
    assert!(!leaks(store_log.as_bytes(), &needles), "the key is in the store's output");

    // The slot, in the tool's layout: `<storage>/<owner>/<repo>/<slug>/<run id>/`, its meta
    // inside, nothing in flight left.
    let local = work.join("octo-repo/octo-repo");
    let slug = local.display().to_string().replace('/', "_");
    let dir = storage.join("octo-org/octo-repo").join(slug);
    let run_id = job["id"].to_string();
    let slot = dir.join(&run_id);
    let meta = std::fs::read_to_string(slot.join(".ci-storage.meta"))
        .unwrap_or_else(|e| panic!("{}: {e}\n{store_log}", slot.display()));
    assert_eq!(meta, format!("full_snapshot_history={run_id}\nhints=\n"));
    let names: Vec<String> =
        std::fs::read_dir(&dir).unwrap().flatten().map(|e| e.file_name().to_string_lossy().into_owned()).collect();
    assert_eq!(names, std::slice::from_ref(&run_id), "in-flight or backup dirs left: {names:?}");
    assert!(store_log.contains("--link-dest") || store_log.contains("rsync --inplace"), "{store_log}");

    // No file the runner user can read holds the key: the test's dirs, the runner's, /tmp.
    let mut found = Vec::new();
    for (root, depth) in [(s, 8), (first.path(), 8), (Path::new("/tmp"), 2), (Path::new("/run"), 2)] {
        files_with_key(root, depth, &needles, &mut found);
    }
    found.retain(|p| !p.starts_with(sshd.dir.path()));
    found.sort();
    found.dedup();
    let nobody = ci_runner::secrets::Access { uid: NOBODY, gid: NOBODY, groups: vec![NOBODY] };
    let open = ci_runner::secrets::probe(&found, &nobody).unwrap();
    for (p, readable) in found.iter().zip(open) {
        assert!(!readable, "the runner user can read the key in {}", p.display());
    }
    assert_eq!(found, [secrets.join("CI_STORAGE_PRIVATE_KEY")], "the key was copied somewhere");
    assert_key_in_no_process(&needles);
    assert!(!leaks(sup.log().as_bytes(), &needles), "the key is in the log");

    let mut sup = sup;
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());
    assert!(!Path::new(sock).exists(), "the agent's socket outlived the supervisor");
    let _ =
        std::fs::remove_file(format!("/tmp/.ci-storage.meta.{}", local.display().to_string().replace(['/', '.'], "_")));

    // The next container: an empty work dir, pre-warmed from the job's slot.
    let before = describe_tree(&local);
    std::fs::remove_dir_all(work.join("octo-repo")).unwrap();
    let second = RunnerDir::new();
    let sup2 = Supervisor::start(&env_for(&second));
    sup2.wait_state("idle", BOOT);
    let health = sup2.health().unwrap();
    assert_eq!(health["prewarm"]["outcome"], "warm", "{health}");
    assert_eq!(health["prewarm"]["slot"], run_id.as_str(), "{health}");
    let mut after = describe_tree(&local);
    let mut before = before;
    for t in [&mut before, &mut after] {
        t.remove(Path::new(""));
    }
    assert_eq!(after, before, "the pre-warmed work dir is not what the job stored");
    assert!(!leaks(sup2.log().as_bytes(), &needles), "the key is in the second log");
    let mut sup2 = sup2;
    sup2.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sup2.wait_exit(BOOT).code(), Some(0), "{}", sup2.log());
}

/// The issue's case: a secrets dir made by the host user (here the runner user itself, the
/// worst case) holding a 0600 file of its own and a 0644 file of uid 1000. Never: a job that
/// reads either. A plain directory is made root-only; the same directory bind-mounted (as
/// `-v ./secrets:/run/secrets` does) cannot be changed, so the start is refused, exit 3,
/// naming the files and the fix, before anything registers.
#[test]
fn secrets_readable_by_the_runner_user_are_hidden_or_refused_with_exit_3() {
    if !require_root("the secrets tests") {
        return;
    }
    if !require("unshare") || !require("mount") {
        return;
    }
    let gh = FakeGithub::start();
    let shared = tempfile::tempdir().unwrap();
    let s = shared.path();
    mkdir(s, 0o755, 0);
    let make = |dir: &Path| {
        mkdir(dir, 0o755, NOBODY);
        write(&dir.join("GH_TOKEN"), "ghp_from_the_host_file", 0o600, NOBODY);
        write(&dir.join("OTHER_SECRET"), "s3cr3t-of-the-host", 0o644, 1000);
    };

    // A plain directory: locked by the supervisor, then no job can read it.
    let plain = s.join("plain");
    make(&plain);
    let runner = RunnerDir::new();
    let scratch = runner.scratch();
    let env = env_with(&gh, &runner, &[("SECRETS_DIR", plain.to_str().unwrap())]);
    let mut sup = Supervisor::start(&env);
    sup.wait_state("idle", BOOT);
    assert!(sup.log_has("SECRETS_DIR made root-only (0700)"), "{}", sup.log());
    let m = std::fs::metadata(&plain).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (0, 0o700));
    // Every ci-runner process (PID 1 and the supervisor, both holding GH_TOKEN), and PID 1 of
    // the machine.
    let mut procs: Vec<u32> = vec![sup.pid()];
    procs.extend(
        descendants(sup.pid())
            .into_iter()
            .filter(|p| std::fs::read_to_string(format!("/proc/{p}/comm")).is_ok_and(|c| c.trim() == "ci-runner")),
    );
    assert!(procs.len() >= 2, "no supervisor child among {procs:?}");
    let environs: Vec<String> = procs.iter().map(|p| format!("/proc/{p}/environ")).collect();
    let sc = scratch.display();
    let steps = format!(
        "for f in {p}/GH_TOKEN {p}/OTHER_SECRET /proc/1/environ {environs}; do \
           if cat \"$f\" >> {sc}/read.out 2>/dev/null; then echo \"LEAK $f\" >> {sc}/read.out; fi; \
         done; touch {sc}/done",
        p = plain.display(),
        environs = environs.join(" ")
    );
    let job = wait_job(&gh, gh.enqueue("read", &["ci-test"], &steps));
    assert_eq!(job["result"], "Succeeded");
    let out = std::fs::read_to_string(scratch.join("read.out")).unwrap_or_default();
    assert!(
        !out.contains("LEAK") && !out.contains("s3cr3t") && !out.contains("ghp_"),
        "a job read a secret or a ci-runner environ: {out}"
    );
    assert!(scratch.join("done").exists());
    sup.signal(nix::sys::signal::Signal::SIGTERM);
    assert_eq!(sup.wait_exit(BOOT).code(), Some(0), "{}", sup.log());

    // The same directory as a bind mount: refused, exit 3, nothing started or registered.
    let host = s.join("host");
    make(&host);
    let mounted = s.join("mounted");
    mkdir(&mounted, 0o755, 0);
    let runner = RunnerDir::new();
    let env = env_with(&gh, &runner, &[("SECRETS_DIR", mounted.to_str().unwrap())]);
    let mut cmd = Command::new("unshare");
    cmd.args(["--mount", "--propagation", "private", "--", "sh", "-c", r#"mount --bind "$1" "$2" && exec "$3""#, "sh"])
        .arg(&host)
        .arg(&mounted)
        .arg(bin())
        .env_clear()
        .envs(env.iter().map(|(k, v)| (k, v)))
        .env("STATUS_ADDR", "127.0.0.1:0");
    let mut sup = Supervisor::from_command(cmd, String::new());
    let status = sup.wait_exit(BOOT);
    let log = sup.log();
    assert_eq!(status.code(), Some(3), "{log}");
    for needle in [
        "GH_TOKEN is readable",
        "OTHER_SECRET is readable",
        "the runner user's own",
        "is a mount",
        "/run/secrets",
        "0700",
    ] {
        assert!(log.contains(needle), "the refusal does not say {needle:?}:\n{log}");
    }
    assert!(!log.contains("ghp_from_the_host_file") && !log.contains("s3cr3t"), "a secret is in the log");
    let m = std::fs::metadata(host.join("GH_TOKEN")).unwrap();
    assert_eq!((m.uid(), m.mode() & 0o777), (NOBODY, 0o600), "the host's file was changed");
    assert_eq!(std::fs::metadata(&host).unwrap().mode() & 0o777, 0o755, "the host's directory was changed");
    assert!(gh.runners().is_empty(), "a runner registered despite readable secrets");
}
