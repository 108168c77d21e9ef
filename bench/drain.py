#!/usr/bin/python3
"""Scale-ins under instant assignment (issue #15). Run as root after `cargo build --release`:

    python3 bench/drain.py [--drains 1000] [--parallel 4] [--bin PATH]

Each drain: a supervisor boots against the fake GitHub (which hands a runner its next queued
job inside the request that reports the previous one's result) with the fake Listener in the
real order (report, poll, print); a job runs, two more are queued for the runner's labels,
SIGTERM, the job is let finish. Counted: jobs cancelled (any job of the round ending
`Canceled`), jobs the draining runner took after the signal, exit codes, registrations left,
and the GitHub REST calls the drain made (the labels' DELETE, the registration's DELETE).
`--parallel` supervisors drain at once, each with labels of its own. Prints a Markdown table.
"""
import argparse
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers: fake GitHub, runner copies, health)


def call(gh, method, path, body=None):
    import json
    import urllib.request
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(gh.url + path, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", "application/json")
    with urllib.request.urlopen(req, timeout=10) as r:
        raw = r.read()
        return json.loads(raw) if raw else None


def one_drain(gh, binary, round_no, scratch):
    label = "r%d" % round_no
    d = bench.runner_copy()
    port = bench.free_port()
    env = bench.env_for(gh, d, port)
    env.update(GH_LABELS="bench,%s" % label, FAKE_LISTENER_REPORT_FIRST="1", FAKE_RETRY_SLEEP_SEC="0.2",
               FAKE_CANCEL_SIGINT_WAIT_SEC="1", FAKE_CANCEL_SIGTERM_WAIT_SEC="1", FAKE_POLL_WAIT_SEC="1")
    p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_for("idle", 60, lambda: (bench.health(port) or {}).get("state") == "idle", interval=0.01)
        name = bench.health(port).get("runner_name")
        gate = os.path.join(scratch, "%s.release" % label)
        started = os.path.join(scratch, "%s.started" % label)
        steps = "touch %s; while [ ! -e %s ]; do sleep 0.02; done" % (started, gate)
        first = call(gh, "POST", "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": [label], "name": "first-" + label,
                                                 "steps": steps})["id"]
        bench.wait_for("first job", 60, lambda: os.path.exists(started), interval=0.01)
        queued = [call(gh, "POST", "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": [label], "name": "q%d-%s" % (i, label),
                                                   "steps": "true"})["id"] for i in range(2)]
        runner = [r for r in call(gh, "GET", "/_fake/runners") if r["name"] == name][0]
        p.send_signal(signal.SIGTERM)
        bench.wait_for("draining", 30, lambda: (bench.health(port) or {}).get("state") != "busy", interval=0.005)
        open(gate, "w").close()
        rc = p.wait(120)
    finally:
        if p.poll() is None:
            bench.kill_tree(p)
        shutil.rmtree(d, ignore_errors=True)
    jobs = [call(gh, "GET", "/_fake/jobs/%d" % j) for j in [first] + queued]
    left = any(r["name"] == name for r in call(gh, "GET", "/_fake/runners"))
    calls = [r for r in call(gh, "GET", "/_fake/requests?path_contains=/actions/runners/%d" % runner["id"])
             if r["method"] != "GET"]
    return {
        "rc": rc,
        "cancelled": sum(1 for j in jobs if j.get("result") == "Canceled"),
        "taken": sum(1 for j in jobs[1:] if j["status"] != "queued"),
        "first_ok": jobs[0].get("result") == "Succeeded",
        "left": left,
        "calls": len(calls),
    }


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--drains", type=int, default=1000)
    ap.add_argument("--parallel", type=int, default=4)
    ap.add_argument("--bin", default=bench.BIN)
    args = ap.parse_args()
    gh = bench.FakeGithub()
    call(gh, "POST", "/_fake/config", {"assign_cooldown_ms": 0, "assign_on_complete": True})
    # The jobs run as the runner user: a scratch dir they can write.
    scratch = tempfile.mkdtemp(prefix="drain-bench-")
    os.chmod(scratch, 0o1777)
    results, lock, counter = [], threading.Lock(), iter(range(args.drains))
    t0 = time.monotonic()

    def worker():
        while True:
            with lock:
                n = next(counter, None)
            if n is None:
                return
            try:
                r = one_drain(gh, args.bin, n, scratch)
            except BaseException as e:  # noqa: BLE001 - a drain that went wrong is a result too
                r = {"rc": "error: %s" % e, "cancelled": 0, "taken": 0, "first_ok": False, "left": True, "calls": 0}
            with lock:
                results.append(r)
                if len(results) % 100 == 0:
                    print("  %d drains, %d jobs cancelled so far" % (len(results), sum(x["cancelled"] for x in results)),
                          file=sys.stderr, flush=True)

    threads = [threading.Thread(target=worker) for _ in range(args.parallel)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    took = time.monotonic() - t0
    gh.close()
    shutil.rmtree(scratch, ignore_errors=True)
    if not results:
        raise SystemExit("no drain completed")
    n = len(results)
    cancelled = sum(r["cancelled"] for r in results)
    rcs = {}
    for r in results:
        rcs[r["rc"]] = rcs.get(r["rc"], 0) + 1
    calls = sorted(r["calls"] for r in results)
    print("| Drains | Jobs cancelled | Per 1,000 | Queued jobs taken by the draining runner | First job Succeeded | Registrations left | Exit codes | REST calls per drain (min/median/max) | Took |")
    print("|---|---|---|---|---|---|---|---|---|")
    print("| %d | %d | %.1f | %d | %d/%d | %d | %s | %d/%d/%d | %.0f s |" % (
        n, cancelled, 1000.0 * cancelled / max(n, 1), sum(r["taken"] for r in results),
        sum(r["first_ok"] for r in results), n, sum(r["left"] for r in results),
        ", ".join("%s: %d" % (k, v) for k, v in sorted(rcs.items(), key=lambda kv: str(kv[0]))),
        calls[0], calls[len(calls) // 2], calls[-1], took))


if __name__ == "__main__":
    main()
