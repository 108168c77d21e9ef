#!/usr/bin/python3
"""`ci-runner init` against tini (and dumb-init, catatonit when installed), issue #16. Run as
root after `cargo build --release`, with Debian's `tini` (and `dumb-init`, `catatonit`):

    python3 bench/pid1.py [--runs 200] [--reap-runs 5] [--rounds 20]

Every init runs the same command in the same run; the rounds interleave the inits, so a slow
moment of the machine is shared by all of them. Prints a Markdown table with each init's
median and ours over tini's.

- start+exit: `INIT -- /bin/true`, wall time from `fork` to `waitpid`, not PID 1 (each init
  as a subreaper where it has the option: `tini -s`).
- reap: 10,000 orphans exiting at once under the init as PID 1 of a new PID namespace
  (`unshare --pid --fork --mount-proc`; bench.py's scenario): from the maker's exit until the
  init has no child but the measuring script, and the zombies left then. A second row has
  half of them die of signal 40 (real-time), the others of SIGTERM.
- signal round trip: `kill(init, SIGUSR1)` → the child's handler writes a byte to a pipe →
  the benchmark reads it; the child is a small C program (built here with `cc`) so that the
  figure is the init's forwarding, not an interpreter's.
"""
import argparse
import os
import platform
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench import BIN, REAP, descendants  # noqa: E402

# The reaping scenario of bench.py, with the orphans' way of dying from SIG: "exit" (exit 0)
# or "mixed" (even ones by signal 40, odd ones by SIGTERM).
REAP_MIXED = REAP.replace(
    "        if os.fork() == 0:\n            os._exit(0)",
    "        if os.fork() == 0:\n"
    "            if os.environ.get('SIG') == 'mixed':\n"
    "                os.kill(os.getpid(), 40 if os.getpid() % 2 == 0 else 15)\n"
    "            os._exit(0)",
)
assert REAP_MIXED != REAP

ECHO_C = r"""
#include <signal.h>
#include <unistd.h>
static void on_usr1(int sig) { (void)sig; char c = 'x'; (void)write(1, &c, 1); }
int main(void) {
    struct sigaction sa = {0};
    sa.sa_handler = on_usr1;
    sigaction(SIGUSR1, &sa, 0);
    char c = 'r';
    (void)write(1, &c, 1);
    for (;;) pause();
}
"""


def inits(ours):
    """(name, argv prefix) of each init found; ours first, tini second (the baseline)."""
    found = [("ci-runner init", [ours, "init", "--"])]
    for name, argv in [("tini", ["tini", "-s", "--"]), ("dumb-init", ["dumb-init", "--"]),
                       ("catatonit", ["catatonit", "--"])]:
        path = shutil.which(argv[0])
        if path:
            found.append((name, [path] + argv[1:]))
    if len(found) < 2 or found[1][0] != "tini":
        raise SystemExit("tini is the baseline: apt-get install tini")
    return found


def start_exit(prefix, runs):
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run(prefix + ["/bin/true"], check=True)
        out.append((time.perf_counter() - t0) * 1000)
    return out


def reap(prefix, sig, n=10000):
    # As PID 1 the subreaper flag means nothing; tini's -s only silences its warning.
    r = subprocess.run(["unshare", "--pid", "--fork", "--mount-proc"] + prefix + ["/usr/bin/python3", "-c", REAP_MIXED],
                       env={"N": str(n), "SIG": sig, "PATH": "/usr/bin:/bin"}, capture_output=True, text=True,
                       timeout=300)
    ms, zombies = r.stdout.split()
    return float(ms), int(zombies)


def round_trips(prefix, echo, count):
    p = subprocess.Popen(prefix + [echo], stdout=subprocess.PIPE)
    try:
        fd = p.stdout.fileno()
        assert os.read(fd, 1) == b"r", "the echo child did not start"
        out = []
        for _ in range(count):
            t0 = time.perf_counter()
            os.kill(p.pid, signal.SIGUSR1)
            assert os.read(fd, 1) == b"x"
            out.append((time.perf_counter() - t0) * 1e6)
        return out
    finally:
        # Every init forwards SIGTERM: the child dies of it, then the init exits.
        os.kill(p.pid, signal.SIGTERM)
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            for pid in descendants(p.pid):
                os.kill(pid, signal.SIGKILL)
            p.kill()
            p.wait()


def med(xs):
    return statistics.median(xs)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=200, help="start+exit runs per init")
    ap.add_argument("--reap-runs", type=int, default=5)
    ap.add_argument("--rounds", type=int, default=20, help="signal round trips: rounds of 50 per init")
    ap.add_argument("--bin", default=BIN, help="the ci-runner binary (default: the release build)")
    args = ap.parse_args()
    if not os.path.exists(args.bin):
        raise SystemExit("build first: cargo build --release")
    found = inits(args.bin)
    work = tempfile.mkdtemp(prefix="pid1-bench-")
    echo = os.path.join(work, "pid1-echo")
    with open(echo + ".c", "w") as f:
        f.write(ECHO_C)
    subprocess.run(["cc", "-O2", "-o", echo, echo + ".c"], check=True)

    start = {n: [] for n, _ in found}
    rt = {n: [] for n, _ in found}
    reaps = {(n, s): [] for n, _ in found for s in ("exit", "mixed")}
    step = max(1, args.runs // 10)
    for _ in range(10):
        for name, prefix in found:
            start[name] += start_exit(prefix, step)
    for _ in range(args.rounds):
        for name, prefix in found:
            rt[name] += round_trips(prefix, echo, 50)
    for _ in range(args.reap_runs):
        for name, prefix in found:
            for sig in ("exit", "mixed"):
                reaps[(name, sig)].append(reap(prefix, sig))
    shutil.rmtree(work, ignore_errors=True)

    cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(BIN)).stdout.strip()
    print("Machine: %s, %d cores, %.0f GiB, kernel %s; commit `%s`. Command: `python3 bench/pid1.py --runs %d "
          "--reap-runs %d --rounds %d` (release build)."
          % (cpu, os.cpu_count(), os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30,
             platform.release(), commit, args.runs, args.reap_runs, args.rounds))
    print()
    names = [n for n, _ in found]
    print("| Measure (median) | Bar | " + " | ".join(names) + " | ci-runner / tini |")
    print("|---|---|" + "---|" * len(names) + "---|")

    def row(label, bar, values, fmt):
        ours, tini = values[names[0]], values["tini"]
        print("| %s | %s | %s | %.2fx |" % (label, bar, " | ".join(fmt % values[n] for n in names), ours / tini))

    row("start+exit `INIT -- /bin/true`, %d runs (ms)" % len(start[names[0]]), "≤ 1.3x",
        {n: med(v) for n, v in start.items()}, "%.2f")
    for sig, label in (("exit", "10,000 orphans exiting"), ("mixed", "10,000 orphans, half by signal 40, half by TERM")):
        row("reap, %s, as PID 1, %d runs (ms)" % (label, args.reap_runs), "≤ 1.3x, 0 left",
            {n: med([m for m, _ in reaps[(n, sig)]]) for n in names}, "%.1f")
        zs = {n: max(z for _, z in reaps[(n, sig)]) for n in names}
        print("| zombies left then (most in any run) | 0 | " + " | ".join(str(zs[n]) for n in names) + " | — |")
    row("signal round trip, SIGUSR1 to the init → the child's handler, %d (µs)" % len(rt[names[0]]), "≤ 1.1x",
        {n: med(v) for n, v in rt.items()}, "%.1f")


if __name__ == "__main__":
    main()
