#!/usr/bin/python3
"""Benchmarks for the supervisor's bars (issue #2). Run as root after `cargo build --release`:

    python3 bench/bench.py [--runs N]
    python3 bench/bench.py --rss [--runs N]   # idle RSS only: CloudWatch off, then on (issue #20)

Everything is local: the fake GitHub on 127.0.0.1, the fake runner in temp dirs.
Prints a Markdown report (the body of BENCHMARKS.md) on stdout.
"""
import argparse
import json
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BIN = os.path.join(ROOT, "target", "release", "ci-runner")
FAKES = os.path.join(ROOT, "tests", "fakes")


def wait_for(what, timeout, cond, interval=0.002):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(interval)


def descendants(pid):
    parent = {}
    for p in os.listdir("/proc"):
        if not p.isdigit():
            continue
        try:
            with open("/proc/%s/stat" % p) as f:
                stat = f.read()
        except OSError:
            continue
        parent[int(p)] = int(stat.rsplit(")", 1)[1].split()[1])
    out, frontier = [], [pid]
    while frontier:
        cur = frontier.pop()
        for p, pp in parent.items():
            if pp == cur and p not in out:
                out.append(p)
                frontier.append(p)
    return out


def kill_tree(proc):
    for p in descendants(proc.pid):
        try:
            os.kill(p, signal.SIGKILL)
        except OSError:
            pass
    try:
        proc.kill()
    except OSError:
        pass
    proc.wait()


class FakeGithub:
    def __init__(self):
        self.dir = tempfile.mkdtemp()
        port_file = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(FAKES, "fake_github.py"), "--listen", "127.0.0.1:0", "--port-file", port_file],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        self.port = int(wait_for("fake GitHub", 20, lambda: os.path.exists(port_file) and open(port_file).read().strip()))
        self.url = "http://127.0.0.1:%d" % self.port

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def runner_copy(instant_config=False, stamp=None):
    d = tempfile.mkdtemp()
    os.chmod(d, 0o755)
    shutil.copytree(os.path.join(FAKES, "runner"), d, dirs_exist_ok=True, ignore=shutil.ignore_patterns("__pycache__"))
    if instant_config:
        # "a config.sh that returns at once": writes the registration file and exits.
        with open(os.path.join(d, "config.sh"), "w") as f:
            f.write('#!/bin/bash\nprintf \'{"agentId": 1, "agentName": "bench"}\' > "$(dirname "$0")/.runner"\n')
        # Likewise the runner's own `bin/Runner.Listener --version` (the minimum-version check,
        # issue #7, run during the boot): answered at once, as config.sh is.
        with open(os.path.join(d, "bin", "Runner.Listener"), "w") as f:
            f.write('#!/bin/bash\n[ "$1" = --version ] && echo 2.336.0\n')
    if stamp:
        # run.sh records when it started (a bash builtin: no fork), then idles.
        with open(os.path.join(d, "run.sh"), "w") as f:
            f.write('#!/bin/bash\nprintf "%%s\\n" "$EPOCHREALTIME" > %s\nexec sleep 3600\n' % stamp)
    for dirpath, dirnames, filenames in os.walk(d):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), 65534, 65534)
    os.chown(d, 65534, 65534)
    return d


def env_for(gh, runner_dir, status_port):
    return {
        "PATH": "/usr/local/bin:/usr/bin:/bin",
        "GH_TOKEN": "ghp_admin",
        "GH_REPOSITORY": "octo-org/octo-repo",
        "GH_LABELS": "bench",
        "GH_SERVER_URL": gh.url,
        "GH_API_URL": gh.url + "/api/v3",
        "RUNNER_DIR": runner_dir,
        "RUNNER_USER": "nobody",
        "STATUS_ADDR": "127.0.0.1:%d" % status_port,
        "RUST_LOG": "warn",
        # Off AWS: never probe the link-local instance metadata address.
        "AWS_EC2_METADATA_DISABLED": "true",
    }


def free_port():
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    p = s.getsockname()[1]
    s.close()
    return p


def health(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=2) as r:
            return json.load(r)
    except Exception:
        return None


def bench_start(gh, runs):
    """exec of ci-runner → run.sh started, with config.sh returning at once."""
    sup, base = [], []
    for _ in range(runs):
        stamp = tempfile.mktemp()
        d = runner_copy(instant_config=True, stamp=stamp)
        port = free_port()
        t0 = time.time()
        p = subprocess.Popen([BIN], env=env_for(gh, d, port), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        t1 = float(wait_for("run.sh stamp", 20, lambda: os.path.exists(stamp) and open(stamp).read().strip()))
        sup.append((t1 - t0) * 1000)
        kill_tree(p)
        os.unlink(stamp)
        # Baseline: the same run.sh started directly (fork+exec from Python, no supervisor).
        t0 = time.time()
        q = subprocess.Popen([os.path.join(d, "run.sh")], stdout=subprocess.DEVNULL)
        t1 = float(wait_for("run.sh stamp", 20, lambda: os.path.exists(stamp) and open(stamp).read().strip()))
        base.append((t1 - t0) * 1000)
        kill_tree(q)
        os.unlink(stamp)
        shutil.rmtree(d, ignore_errors=True)
    return sup, base


def rss_kib(pid, field="VmRSS"):
    with open("/proc/%d/status" % pid) as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    return 0


def pss_kib(pid):
    with open("/proc/%d/smaps_rollup" % pid) as f:
        for line in f:
            if line.startswith("Pss:"):
                return int(line.split()[1])
    return 0


def start_idle(gh, extra=None):
    d = runner_copy()
    port = free_port()
    env = env_for(gh, d, port)
    env.update(extra or {})
    p = subprocess.Popen([BIN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    wait_for("idle", 30, lambda: (health(port) or {}).get("state") == "idle", interval=0.01)
    return p, d, port


class FakeAws:
    """A loopback CloudWatch that accepts PutMetricData (and counts it) and an ECS/EKS-style
    container credentials endpoint (`GET /creds`), so that with CloudWatch on the supervisor
    goes through the SDK's container provider and its HTTP client, as in a task."""

    def __init__(self):
        import http.server
        import threading
        outer = self
        self.puts = 0

        class H(http.server.BaseHTTPRequestHandler):
            def log_message(self, *a):
                pass

            def do_GET(self):
                body = json.dumps({"AccessKeyId": "ASIABENCH", "SecretAccessKey": "bench-secret",
                                   "Token": "bench-token", "Expiration": "2099-01-01T00:00:00Z"}).encode()
                self.send_response(200 if self.path == "/creds" else 404)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def do_POST(self):
                self.rfile.read(int(self.headers.get("Content-Length") or 0))
                outer.puts += 1
                body = b"<PutMetricDataResponse></PutMetricDataResponse>"
                self.send_response(200)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), H)
        self.url = "http://127.0.0.1:%d" % self.server.server_address[1]
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def env(self):
        return {"CLOUDWATCH_ENABLED": "true", "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL_CLOUDWATCH": self.url,
                "AWS_CONTAINER_CREDENTIALS_FULL_URI": self.url + "/creds",
                "AWS_CONTAINER_AUTHORIZATION_TOKEN": "bench-auth"}

    def close(self):
        self.server.shutdown()


def bench_memory(gh, runs, aws=None):
    samples = []
    for _ in range(runs):
        before = aws.puts if aws else 0
        p, d, port = start_idle(gh, aws.env() if aws else None)
        if aws:
            wait_for("the idle datapoint at CloudWatch", 30, lambda: aws.puts > before, interval=0.01)
        time.sleep(1)  # settle after start-up; this is a measurement, not a test assertion
        child = [c for c in descendants(p.pid) if open("/proc/%d/comm" % c).read().strip() == "ci-runner"][0]
        samples.append((rss_kib(p.pid), rss_kib(child), pss_kib(p.pid) + pss_kib(child)))
        kill_tree(p)
        shutil.rmtree(d, ignore_errors=True)
    # Baseline: the original image's PID 1, a bash script waiting on run.sh.
    b = subprocess.Popen(["bash", "-c", "sleep 3600 & wait $!"])
    time.sleep(0.2)
    bash_rss = rss_kib(b.pid)
    kill_tree(b)
    return samples, bash_rss


def bench_sigterm(gh, runs):
    out = []
    for _ in range(runs):
        p, d, port = start_idle(gh)
        t0 = time.monotonic()
        p.send_signal(signal.SIGTERM)
        rc = p.wait(timeout=60)
        out.append((time.monotonic() - t0) * 1000)
        if rc != 0:
            raise SystemExit("SIGTERM exit code %d" % rc)
        kill_tree(p)
        shutil.rmtree(d, ignore_errors=True)
    return out


REAP = r'''
import os, time
n = int(os.environ["N"])
pid = os.fork()
if pid == 0:
    # The maker: forks N children that exit at once, never waits, then exits itself, so all N
    # are re-parented to PID 1 (as zombies or about to be).
    for _ in range(n):
        if os.fork() == 0:
            os._exit(0)
    os._exit(0)
os.waitpid(pid, 0)
t0 = time.monotonic()
me = str(os.getpid())
while True:
    with open("/proc/1/task/1/children") as f:
        kids = f.read().split()
    if kids == [me]:
        break
t1 = time.monotonic()
zombies = sum(1 for p in os.listdir("/proc") if p.isdigit() and open("/proc/%s/stat" % p).read().rsplit(")", 1)[1].split()[0] == "Z")
print("%.3f %d" % ((t1 - t0) * 1000, zombies))
'''


def bench_reap(runs, n=10000):
    out = []
    for _ in range(runs):
        r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", BIN, "init", "--", "/usr/bin/python3", "-c", REAP],
                           env={"N": str(n), "PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=300)
        ms, zombies = r.stdout.split()
        out.append((float(ms), int(zombies)))
    return out


def post(gh, path, body):
    req = urllib.request.Request(gh.url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.load(r)


def bench_lock(gh, runs):
    """Hand-off of the hardware lock: one job's last step ends → the next waiter's first step starts."""
    lock_dir, scratch = tempfile.mkdtemp(), tempfile.mkdtemp()
    os.chmod(lock_dir, 0o777)
    os.chmod(scratch, 0o777)
    sups, dirs, ports = [], [], []
    for i in range(2):
        d = runner_copy()
        port = free_port()
        env = env_for(gh, d, port)
        env.update({"GH_LABELS": "lock%d" % i, "RUNNER_RESOURCE_ID": "board", "RUNNER_LOCK_DIR": lock_dir})
        sups.append(subprocess.Popen([BIN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL))
        dirs.append(d)
        ports.append(port)
    for port in ports:
        wait_for("idle", 30, lambda: (health(port) or {}).get("state") == "idle", interval=0.01)
    out = []
    try:
        for k in range(runs):
            a, b = os.path.join(scratch, "a%d" % k), os.path.join(scratch, "b%d" % k)
            post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["lock0"], "name": "a%d" % k,
                                     "steps": "touch %s.started; while [ ! -e %s.release ]; do sleep 0.01; done; echo $(date +%%s%%N) > %s.end" % (a, a, a)})
            wait_for("a started", 30, lambda: os.path.exists(a + ".started"))
            post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["lock1"], "name": "b%d" % k,
                                     "steps": "echo $(date +%%s%%N) > %s.tmp && mv %s.tmp %s.start" % (b, b, b)})
            wait_for("b waiting", 30, lambda: ((health(ports[1]) or {}).get("lock") or {}).get("state") == "waiting", interval=0.01)
            open(a + ".release", "w").close()
            wait_for("b started", 30, lambda: os.path.exists(b + ".start"))
            wait_for("a ended", 30, lambda: os.path.exists(a + ".end") and open(a + ".end").read().strip())
            out.append((int(open(b + ".start").read()) - int(open(a + ".end").read())) / 1e6)
            wait_for("b's lock released", 30, lambda: ((health(ports[1]) or {}).get("lock") or {}).get("state") == "free", interval=0.01)
        # Crash hand-off: the holder's whole container is SIGKILLed mid-job.
        a, b = os.path.join(scratch, "ka"), os.path.join(scratch, "kb")
        post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["lock0"], "name": "ka",
                                 "steps": "touch %s.started; while :; do sleep 0.01; done" % a})
        wait_for("ka started", 30, lambda: os.path.exists(a + ".started"))
        post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["lock1"], "name": "kb",
                                 "steps": "echo $(date +%%s%%N) > %s.tmp && mv %s.tmp %s.start" % (b, b, b)})
        wait_for("kb waiting", 30, lambda: ((health(ports[1]) or {}).get("lock") or {}).get("state") == "waiting", interval=0.01)
        t0 = time.time_ns()
        kill_tree(sups[0])
        wait_for("kb started", 30, lambda: os.path.exists(b + ".start"))
        crash = (int(open(b + ".start").read()) - t0) / 1e6
    finally:
        for p in sups:
            kill_tree(p)
        for d in dirs + [lock_dir, scratch]:
            shutil.rmtree(d, ignore_errors=True)
    return out, crash


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=20)
    ap.add_argument("--rss", action="store_true", help="only the idle RSS, with CloudWatch off and on")
    ap.add_argument("--bin", help="the ci-runner binary (default: the release build)")
    args = ap.parse_args()
    if args.bin:
        global BIN
        BIN = os.path.abspath(args.bin)
    if not os.path.exists(BIN):
        raise SystemExit("build first: cargo build --release")
    if args.rss:
        return rss_only(args.runs)
    gh = FakeGithub()
    try:
        start, base = bench_start(gh, args.runs)
        mem, bash_rss = bench_memory(gh, 3)
        term = bench_sigterm(gh, max(5, args.runs // 2))
        reap = bench_reap(5)
        lock, crash = bench_lock(gh, max(5, args.runs // 2))
    finally:
        gh.close()
    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    print("Machine: %s, %d cores, %s, kernel %s. Command: `python3 bench/bench.py --runs %d` (release build)."
          % (cpu, os.cpu_count(), "%.0f GiB" % (os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30),
             platform.release(), args.runs))
    print()
    print("| Bar | Target | Measured (median) | Spread | Baseline in the same run |")
    print("|---|---|---|---|---|")
    print("| exec → `run.sh` started (fake GitHub on loopback, instant `config.sh`), %d runs | < 50 ms | %.1f ms | min %.1f, max %.1f | `run.sh` started directly: %.1f ms (supervisor adds %.1f ms) |"
          % (len(start), med(start), min(start), max(start), med(base), med(start) - med(base)))
    tot = [a + b for a, b, _ in mem]
    print("| RSS of both processes while the runner idles, %d runs | < 10 MiB | %.1f MiB (PID 1 %.1f + supervisor %.1f) | PSS %.1f MiB | bash PID 1 of the original image: %.1f MiB |"
          % (len(mem), med(tot) / 1024, med([a for a, _, _ in mem]) / 1024, med([b for _, b, _ in mem]) / 1024,
             med([c for _, _, c in mem]) / 1024, bash_rss / 1024))
    print("| SIGTERM → exit when idle (de-registered), %d runs | < 1 s | %.0f ms | min %.0f, max %.0f | — |"
          % (len(term), med(term), min(term), max(term)))
    print("| Reaping 10,000 orphans as PID 1 in a new PID namespace, %d runs | < 1 s, none left | %.0f ms, %d zombies left | min %.0f, max %.0f | — |"
          % (len(reap), med([m for m, _ in reap]), max(z for _, z in reap), min(m for m, _ in reap), max(m for m, _ in reap)))
    print("| Hardware-lock hand-off: a job's last step ends → the waiting runner's first step starts (two supervisors, one lock dir), %d runs | < 100 ms | %.0f ms | min %.0f, max %.0f | — |"
          % (len(lock), med(lock), min(lock), max(lock)))
    print("| Hardware-lock hand-off after the holder's container is SIGKILLed mid-job: kill → the waiter's first step starts, 1 run | within 1 s | %.0f ms | — | — |" % crash)


def rss_only(runs):
    gh = FakeGithub()
    aws = FakeAws()
    try:
        off, bash_rss = bench_memory(gh, runs)
        on, _ = bench_memory(gh, runs, aws)
    finally:
        gh.close()
        aws.close()
    print("Command: `python3 bench/bench.py --rss --runs %d --bin %s` (%d bytes)."
          % (runs, BIN, os.path.getsize(BIN)))
    print()
    print("| Idle RSS of both processes, %d runs | Target | Measured (median) | Spread | PSS |" % runs)
    print("|---|---|---|---|---|")
    for name, target, mem in (("CloudWatch off (AWS_EC2_METADATA_DISABLED, no region)", "≤ 10 MiB", off),
                              ("CloudWatch on (container credentials from a loopback endpoint, a datapoint sent)", "measured", on)):
        tot = [a + b for a, b, _ in mem]
        print("| %s | %s | %.2f MiB (PID 1 %.2f + supervisor %.2f) | min %.2f, max %.2f | %.2f MiB |"
              % (name, target, med(tot) / 1024, med([a for a, _, _ in mem]) / 1024, med([b for _, b, _ in mem]) / 1024,
                 min(tot) / 1024, max(tot) / 1024, med([c for _, _, c in mem]) / 1024))
    print("Baseline: bash PID 1 of the original image: %.1f MiB." % (bash_rss / 1024))


if __name__ == "__main__":
    main()
