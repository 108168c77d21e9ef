#!/usr/bin/python3
"""Several runners per container (issue #8): disk and supervisor memory. Run as root after
`cargo build --release`:

    python3 bench/multi.py [--count 10] [--bin-mb 90] [--externals-mb 140]

The install is the fake runner (tests/fakes/runner) plus a payload the size of the real
runner's read-only parts: `bin/` gets `--bin-mb` MB in 300 files (the .NET runtime and the
runner's dlls) and `externals/` gets `--externals-mb` MB in 40 files over 8 directories (node).
Everything is local: the fake GitHub on 127.0.0.1.

- Disk: `du -sk` of the install once one runner is registered and idle (RUNNER_COUNT=1), then
  of the install and every root together (du counts a hard-linked file once) with
  RUNNER_COUNT=N registered and idle; their ratio is the bar (< 1.1).
- Memory: the supervisor's two processes (PID 1 side and supervisor) with N runners idle,
  VmRSS and Pss summed; the runners (run.sh and below) are not counted.
"""
import argparse
import os
import platform
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, FakeGithub, descendants, env_for, free_port, health, kill_tree, pss_kib, rss_kib, runner_copy, wait_for  # noqa: E402


def add_payload(install, bin_mb, externals_mb):
    chunk = os.urandom(1 << 20)

    def write(path, size):
        with open(path, "wb") as f:
            left = size
            while left > 0:
                n = min(left, len(chunk))
                f.write(chunk[:n])
                left -= n

    for i in range(300):
        write(os.path.join(install, "bin", "lib%03d.dll" % i), bin_mb * (1 << 20) // 300)
    for d in range(8):
        sub = os.path.join(install, "externals", "node%d" % d, "bin")
        os.makedirs(sub, exist_ok=True)
        for i in range(5):
            write(os.path.join(sub, "part%d" % i), externals_mb * (1 << 20) // 40)
    for dirpath, dirnames, filenames in os.walk(install):
        for n in dirnames + filenames:
            os.chown(os.path.join(dirpath, n), 65534, 65534)


def du_kib(*paths):
    out = subprocess.run(["du", "-skc", *paths], capture_output=True, text=True, check=True).stdout
    return int(out.strip().splitlines()[-1].split()[0])


def start(gh, install, roots, count):
    port = free_port()
    env = env_for(gh, install, port)
    env.update({"RUNNER_COUNT": str(count), "RUNNER_ROOTS_DIR": roots})
    proc = subprocess.Popen([BIN], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)

    def all_idle():
        h = health(port)
        if not h:
            return None
        runners = h.get("runners") or []
        return len(runners) == count and all(r["state"] == "idle" for r in runners) and h

    wait_for("%d runners idle" % count, 120, all_idle, interval=0.05)
    return proc


def supervisor_pids(proc):
    """The PID-1 side (proc) and its ci-runner child, the supervisor."""
    return [proc.pid] + [p for p in descendants(proc.pid)
                         if os.path.realpath("/proc/%d/exe" % p) == os.path.realpath(BIN)]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--count", type=int, default=10)
    ap.add_argument("--bin-mb", type=int, default=90)
    ap.add_argument("--externals-mb", type=int, default=140)
    args = ap.parse_args()
    if os.geteuid() != 0:
        raise SystemExit("run as root (the runners run as nobody)")
    gh = FakeGithub()
    work = tempfile.mkdtemp()
    os.chmod(work, 0o755)
    try:
        install = runner_copy()
        add_payload(install, args.bin_mb, args.externals_mb)
        bare = du_kib(install)
        roots = os.path.join(work, "runners")
        one = start(gh, install, roots, 1)
        one_kib = du_kib(install)
        one.send_signal(15)
        one.wait(timeout=60)
        many = start(gh, install, roots, args.count)
        many_kib = du_kib(install, roots)
        per_root = (many_kib - one_kib) / max(args.count - 1, 1)
        pids = supervisor_pids(many)
        rss = sum(rss_kib(p) for p in pids)
        pss = sum(pss_kib(p) for p in pids)
        kill_tree(many)
        shutil.rmtree(install, ignore_errors=True)
    finally:
        gh.close()
        shutil.rmtree(work, ignore_errors=True)
    cpu = "unknown"
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    print("Machine: %s, %d cores, kernel %s" % (cpu, os.cpu_count(), platform.release()))
    print()
    print("| Figure | Value | Bar |")
    print("|---|---|---|")
    print("| Install (fake runner + %d MB bin/ + %d MB externals/), before any runner | %.1f MiB | |"
          % (args.bin_mb, args.externals_mb, bare / 1024))
    print("| One runner registered and idle (RUNNER_COUNT=1) | %.1f MiB | |" % (one_kib / 1024))
    print("| %d runners registered and idle (RUNNER_COUNT=%d), install + roots | %.1f MiB | |"
          % (args.count, args.count, many_kib / 1024))
    print("| Each further runner's root | %.0f KiB | |" % per_root)
    print("| %d runners / one runner | %.4fx | < 1.1x |" % (args.count, many_kib / one_kib))
    print("| Supervisor memory, %d runners idle (both ci-runner processes, VmRSS) | %.1f MiB | < 20 MiB |"
          % (args.count, rss / 1024))
    print("| Same, Pss | %.1f MiB | |" % (pss / 1024))


if __name__ == "__main__":
    main()
