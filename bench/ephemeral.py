#!/usr/bin/python3
"""GitHub API calls per job of an ephemeral runner in restart mode (issue #7's bar). Run as
root after `cargo build --release`:

    python3 bench/ephemeral.py --jobs 10 [--bin target/release/ci-runner]

For each registration path (JIT, then config.sh), one supervisor with RUNNER_EPHEMERAL=true
and RUNNER_EPHEMERAL_RESTART=true gets N one-step jobs queued up front. Once the last one has
completed and the next fresh runner listens, it gets SIGTERM. Every request the fake GitHub
saw over the supervisor's whole life (boot and drain included, control calls excluded) is
counted by endpoint. Prints Markdown.
"""
import argparse
import collections
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b  # noqa: E402  (the fakes and helpers of bench.py)


def get(gh, path):
    with urllib.request.urlopen(gh.url + path, timeout=10) as r:
        return json.load(r)


def endpoint(path):
    """`POST /api/v3/repos/o/r/actions/runners/42` → `runners/{id}`."""
    path = path.split("?")[0]
    path = re.sub(r"^/api/v3", "", path)
    path = re.sub(r"^/(repos/[^/]+/[^/]+|orgs/[^/]+)/actions/", "", path)
    return re.sub(r"/\d+$", "/{id}", path)


def run(gh, binary, jobs, jit):
    b.post(gh, "/_fake/reset", {})
    b.post(gh, "/_fake/requests/clear", {})
    d = b.runner_copy()
    port = b.free_port()
    env = b.env_for(gh, d, port)
    env.update({"RUNNER_EPHEMERAL": "true", "RUNNER_EPHEMERAL_RESTART": "true", "RUNNER_JIT": "true" if jit else "false"})
    ids = [b.post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["bench"], "name": "job%d" % i,
                                      "steps": "true"})["id"] for i in range(jobs)]
    p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        for i in ids:
            b.wait_for("job %d" % i, 120, lambda: get(gh, "/_fake/jobs/%d" % i)["status"] == "completed", interval=0.05)
        b.wait_for("the next runner", 60, lambda: any(r["status"] == "online" for r in get(gh, "/_fake/runners")),
                   interval=0.02)
        names = {get(gh, "/_fake/jobs/%d" % i)["runner_name"] for i in ids}
        p.send_signal(signal.SIGTERM)
        code = p.wait(timeout=60)
    finally:
        b.kill_tree(p)
        shutil.rmtree(d, ignore_errors=True)
    left = get(gh, "/_fake/runners")
    calls = collections.Counter("%s %s" % (r["method"], endpoint(r["path"]))
                                for r in get(gh, "/_fake/requests") if "/_fake/" not in r["path"])
    return code, len(names), left, calls


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=10)
    ap.add_argument("--bin", default=os.environ.get("CI_RUNNER_BIN", b.BIN))
    args = ap.parse_args()
    gh = b.FakeGithub()
    try:
        print("`python3 bench/ephemeral.py --jobs %d` (release build): RUNNER_EPHEMERAL_RESTART=true, %d one-step jobs "
              "queued, then SIGTERM once the next runner listens; every call at the fake GitHub over the whole life."
              % (args.jobs, args.jobs))
        print()
        print("| Registration | Jobs (registrations) | Exit, left registered | API calls | Per job | By endpoint |")
        print("|---|---|---|---|---|---|")
        for jit in (True, False):
            code, names, left, calls = run(gh, args.bin, args.jobs, jit)
            total = sum(calls.values())
            by = ", ".join("%s ×%d" % (k, v) for k, v in sorted(calls.items()))
            print("| %s | %d (%d names) | %s, %d | %d | %.2f | %s |"
                  % ("JIT" if jit else "config.sh", args.jobs, names, code, len(left), total, total / args.jobs, by))
    finally:
        gh.close()


if __name__ == "__main__":
    main()
