#!/usr/bin/python3
"""`ci-runner controller` (issue #9): webhook received → runner listening in its new
container, and GitHub API calls per job. Run as root after `cargo build --release`, with the
Docker engine up (the image is built here from image/Dockerfile with the release binary and
the fake runner, on the tests' debootstrap base `ci-runner-test-base:bookworm`, which
`cargo test --test integration docker` makes once):

    python3 bench/controller.py --runs 10 [--bin target/release/ci-runner]

Each run queues one job at the fake GitHub, which sends the signed `queued` delivery to the
controller; the controller mints a JIT configuration and starts a fresh runner container
(host network, so it reaches the fake on loopback). Latency = the fake's assignment of the
job to the new runner (its first poll after its session opened: "listening" plus one poll)
minus the moment the fake sent the delivery, both on this host's clock. Runs are one after
the other: each waits for the job to complete and its container to be removed.

Baseline, in the same run: the same image started by hand (`docker run -d` with GH_TOKEN and
RUNNER_EPHEMERAL=true, so the supervisor mints its own JIT configuration), from the
`docker run` call to the same assignment. API calls: every REST call the fake saw during the
controller runs (control endpoints excluded), by endpoint.

Reconcile path (issue #18), in the same run: a controller with `CONTROLLER_RECONCILE_SEC`
(`--reconcile-sec`, default 5) whose `queued` delivery is dropped by the fake for every job,
so the job is found only by the next listing; latency from the (lost) delivery to the same
assignment. Idle cost: a controller with no job for `--idle-sec` seconds at a 1 s period;
the REST calls the fake saw per reconcile pass, and per hour at the default 60 s period.

Organization pool (`--org`): the same reconcile path and idle cost for a pool of the
organization `octo-org` (`GH_ORGANIZATION`, the webhook on the organization,
`CONTROLLER_HOOK_ID`), whose reconciliation reads the webhook's deliveries and redelivers the
failed `queued` ones; `--org-only` runs just these two phases:

    python3 bench/controller.py --org-only --runs 10 --reconcile-sec 5 --idle-sec 30

Prints Markdown.
"""
import argparse
import collections
import json
import os
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b  # noqa: E402

BASE = "ci-runner-test-base:bookworm"
IMAGE = "ci-runner:bench-controller"
SECRET = "bench-secret"
RUNNER_ENV = {"STATUS_ADDR": "off", "AWS_EC2_METADATA_DISABLED": "true"}


def get(gh, path):
    with urllib.request.urlopen(gh.url + path, timeout=10) as r:
        return json.load(r)


def endpoint(path):
    path = re.sub(r"^/api/v3", "", path.split("?")[0])
    path = re.sub(r"^/(repos/[^/]+/[^/]+|orgs/[^/]+)/", "", path)
    return re.sub(r"/\d+$", "/{id}", path)


def build_image(binary):
    ctx = tempfile.mkdtemp()
    try:
        local = os.path.join(ctx, "image", "local")
        os.makedirs(local)
        shutil.copy(os.path.join(b.ROOT, "image", "Dockerfile"), os.path.join(ctx, "image", "Dockerfile"))
        shutil.copy(binary, os.path.join(local, "ci-runner"))
        # The image installs the ci-storage tool; the tests' stand-in, as scripts/offline-image does.
        shutil.copy(os.path.join(b.FAKES, "ci-storage"), os.path.join(local, "ci-storage"))
        subprocess.run(["tar", "-czf", os.path.join(local, "actions-runner.tar.gz"), "--exclude=__pycache__", "-C",
                        os.path.join(b.FAKES, "runner"), "."], check=True)
        subprocess.run(["docker", "build", "-q", "-f", "image/Dockerfile", "-t", IMAGE,
                        "--build-arg", "BASE_IMAGE=" + BASE, "--build-arg", "BUILDER_IMAGE=" + BASE,
                        "--build-arg", "EXTRA_PACKAGES=python3", "."], cwd=ctx, check=True, stdout=subprocess.DEVNULL)
    finally:
        shutil.rmtree(ctx, ignore_errors=True)


def containers(name):
    out = subprocess.run(["docker", "ps", "-aq", "--filter", "label=ci-runner.controller=" + name],
                         capture_output=True, text=True, check=True).stdout
    return [x for x in out.split() if x]


def epoch(iso):
    # "YYYY-MM-DDTHH:MM:SS.mmmZ" or without fractions
    from datetime import datetime, timezone
    iso = iso.rstrip("Z")
    fmt = "%Y-%m-%dT%H:%M:%S.%f" if "." in iso else "%Y-%m-%dT%H:%M:%S"
    return datetime.strptime(iso, fmt).replace(tzinfo=timezone.utc).timestamp()


def assigned_at(gh, jid):
    j = b.wait_for("job %d assigned" % jid, 120, lambda: (lambda j: j if j["assigned_at"] else None)(get(gh, "/_fake/jobs/%d" % jid)),
                   interval=0.01)
    return j


def controller_env(gh, name, port, state, max_runners, extra=None, org=False):
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "GH_TOKEN": "ghp_admin",
        ("GH_ORGANIZATION" if org else "GH_REPOSITORY"): "octo-org" if org else "octo-org/octo-repo",
        "GH_LABELS": "bench", "GH_SERVER_URL": gh.url, "GH_API_URL": gh.url + "/api/v3",
        "WEBHOOK_SECRET": SECRET, "CONTROLLER_NAME": name, "CONTROLLER_ADDR": "127.0.0.1:%d" % port,
        "CONTROLLER_STATE_DIR": state, "CONTROLLER_IMAGE": IMAGE, "CONTROLLER_NETWORK": "host",
        "CONTROLLER_RUNNER_ENV": ",".join("%s=%s" % kv for kv in RUNNER_ENV.items()),
        "CONTROLLER_POLL_MS": "200", "CONTROLLER_MAX_RUNNERS": str(max(max_runners, 1)),
        "SECRETS_DIR": os.path.join(state, "none"), "RUST_LOG": "warn",
    }
    env.update(extra or {})
    return env


def metric(port, prefix):
    with urllib.request.urlopen("http://127.0.0.1:%d/metrics" % port, timeout=5) as r:
        for line in r.read().decode().splitlines():
            if line.startswith(prefix):
                return float(line.rsplit(" ", 1)[1])
    raise RuntimeError("no metric " + prefix)


def reconcile_runs(gh, binary, runs, period, org=False):
    """Every job's `queued` delivery lost: the job is found by the next reconcile pass (an
    organization's pool: redelivered by it)."""
    name = "bench-rec-%d" % os.getpid()
    port = b.free_port()
    state = tempfile.mkdtemp()
    scope = "octo-org" if org else "octo-org/octo-repo"
    # Only this controller's webhook: a drop must hit its delivery, not an earlier phase's.
    b.post(gh, "/_fake/reset", {})
    hook = b.post(gh, "/_fake/hooks", {"scope": scope, "url": "http://127.0.0.1:%d/webhook" % port,
                                       "secret": SECRET})
    extra = {"CONTROLLER_RECONCILE_SEC": str(period)}
    if org:
        extra["CONTROLLER_HOOK_ID"] = str(hook["id"])
    env = controller_env(gh, name, port, state, 1, extra, org=org)
    p = subprocess.Popen([binary, "controller"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat = []
    try:
        b.wait_for("the controller", 30, lambda: _up(port), interval=0.02)
        for i in range(runs):
            b.post(gh, "/_fake/deliveries/drop", {"count": 1, "action": "queued"})
            jid = b.post(gh, "/_fake/jobs", {"scope": scope, "labels": ["self-hosted", "bench"],
                                             "name": "r%d" % i, "steps": "true"})["id"]
            j = assigned_at(gh, jid)
            sent = next(d["queued_at"] for d in get(gh, "/_fake/deliveries")
                        if d["job_id"] == jid and d["action"] == "queued" and d["error"])
            lat.append(epoch(j["assigned_at"]) - sent)
            b.wait_for("job %d completed" % jid, 120, lambda: get(gh, "/_fake/jobs/%d" % jid)["status"] == "completed",
                       interval=0.02)
            b.wait_for("its container removed", 120, lambda: not containers(name), interval=0.05)
        found = metric(port, 'ci_runner_controller_reconcile_jobs_found_total{pool="default"}')
        queued = metric(port, 'ci_runner_controller_webhook_deliveries_total{outcome="queued"}')
        if org:
            # Redelivered: each job came by the webhook path, once, after its redelivery.
            redelivered = metric(port, 'ci_runner_controller_reconcile_redeliveries_total{pool="default"}')
            again = [d for d in get(gh, "/_fake/deliveries") if d.get("redelivery") and d["action"] == "queued"]
            assert redelivered == runs == len(again) == queued, (redelivered, len(again), queued)
        else:
            assert queued == 0, "%d jobs came by webhook: not the reconcile path" % queued
    finally:
        b.kill_tree(p)
        for c in containers(name):
            subprocess.run(["docker", "rm", "-f", c], stdout=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)
    return lat, found


def idle_cost(gh, binary, seconds, org=False):
    """REST calls of an idle controller's reconciliation, at a 1 s period, per pass."""
    name = "bench-idle-%d" % os.getpid()
    port = b.free_port()
    state = tempfile.mkdtemp()
    extra = {"CONTROLLER_RECONCILE_SEC": "1"}
    if org:
        # The organization's webhook, with the deliveries of an earlier phase (all delivered or
        # already redelivered): an idle pass lists one page and redelivers nothing.
        hook = b.post(gh, "/_fake/hooks", {"scope": "octo-org", "url": "http://127.0.0.1:%d/webhook" % port,
                                           "secret": SECRET})
        extra["CONTROLLER_HOOK_ID"] = str(hook["id"])
    env = controller_env(gh, name, port, state, 1, extra, org=org)
    p = subprocess.Popen([binary, "controller"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    passes = 'ci_runner_controller_reconcile_passes_total{pool="default"}'
    try:
        b.wait_for("the controller", 30, lambda: _up(port), interval=0.02)
        b.wait_for("a first pass", 30, lambda: metric(port, passes) >= 1, interval=0.05)
        b.post(gh, "/_fake/requests/clear", {})
        p0 = metric(port, passes)
        time.sleep(seconds)
        p1 = metric(port, passes)
        calls = collections.Counter("%s %s" % (r["method"], endpoint(r["path"]))
                                    for r in get(gh, "/_fake/requests") if "/_fake/" not in r["path"])
        counted = metric(port, 'ci_runner_controller_reconcile_api_calls_total{pool="default"}')
    finally:
        b.kill_tree(p)
        shutil.rmtree(state, ignore_errors=True)
    return calls, p1 - p0, counted


def controller_runs(gh, binary, runs, burst):
    name = "bench-ctl-%d" % os.getpid()
    port = b.free_port()
    state = tempfile.mkdtemp()
    env = {
        "PATH": "/usr/local/bin:/usr/bin:/bin", "GH_TOKEN": "ghp_admin", "GH_REPOSITORY": "octo-org/octo-repo",
        "GH_LABELS": "bench", "GH_SERVER_URL": gh.url, "GH_API_URL": gh.url + "/api/v3",
        "WEBHOOK_SECRET": SECRET, "CONTROLLER_NAME": name, "CONTROLLER_ADDR": "127.0.0.1:%d" % port,
        "CONTROLLER_STATE_DIR": state, "CONTROLLER_IMAGE": IMAGE, "CONTROLLER_NETWORK": "host",
        "CONTROLLER_RUNNER_ENV": ",".join("%s=%s" % kv for kv in RUNNER_ENV.items()),
        "CONTROLLER_POLL_MS": "200", "CONTROLLER_MAX_RUNNERS": str(max(burst, 1)), "SECRETS_DIR": os.path.join(state, "none"), "RUST_LOG": "warn",
    }
    b.post(gh, "/_fake/hooks", {"scope": "octo-org/octo-repo", "url": "http://127.0.0.1:%d/webhook" % port,
                                "secret": SECRET})
    p = subprocess.Popen([binary, "controller"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    lat = []
    try:
        b.wait_for("the controller", 30, lambda: _up(port), interval=0.02)
        b.post(gh, "/_fake/requests/clear", {})
        for i in range(runs):
            jid = b.post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["self-hosted", "bench"],
                                             "name": "c%d" % i, "steps": "true"})["id"]
            j = assigned_at(gh, jid)
            sent = next(d["queued_at"] for d in get(gh, "/_fake/deliveries") if d["job_id"] == jid and d["action"] == "queued")
            lat.append(epoch(j["assigned_at"]) - sent)
            b.wait_for("job %d completed" % jid, 120, lambda: get(gh, "/_fake/jobs/%d" % jid)["status"] == "completed",
                       interval=0.02)
            b.wait_for("its container removed", 120, lambda: not containers(name), interval=0.05)
        calls = collections.Counter("%s %s" % (r["method"], endpoint(r["path"]))
                                    for r in get(gh, "/_fake/requests") if "/_fake/" not in r["path"])
        left = get(gh, "/_fake/runners")
        # A burst: `burst` jobs queued at once, as many containers starting together.
        blat = []
        if burst:
            ids = [b.post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["self-hosted", "bench"],
                                              "name": "burst%d" % i, "steps": "true"})["id"] for i in range(burst)]
            for jid in ids:
                j = assigned_at(gh, jid)
                sent = next(d["queued_at"] for d in get(gh, "/_fake/deliveries")
                            if d["job_id"] == jid and d["action"] == "queued")
                blat.append(epoch(j["assigned_at"]) - sent)
            for jid in ids:
                b.wait_for("job %d completed" % jid, 120,
                           lambda: get(gh, "/_fake/jobs/%d" % jid)["status"] == "completed", interval=0.02)
            b.wait_for("the containers removed", 120, lambda: not containers(name), interval=0.05)
    finally:
        b.kill_tree(p)
        for c in containers(name):
            subprocess.run(["docker", "rm", "-f", c], stdout=subprocess.DEVNULL)
        shutil.rmtree(state, ignore_errors=True)
    return lat, calls, left, blat


def _up(port):
    try:
        with urllib.request.urlopen("http://127.0.0.1:%d/health" % port, timeout=1):
            return True
    except OSError:
        return False


def baseline_runs(gh, runs):
    lat = []
    for i in range(runs):
        jid = b.post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["self-hosted", "bench"],
                                         "name": "m%d" % i, "steps": "true"})["id"]
        name = "bench-manual-%d-%d" % (os.getpid(), i)
        args = ["docker", "run", "-d", "--name", name, "--network", "host", "-e", "GH_TOKEN=ghp_admin",
                "-e", "GH_REPOSITORY=octo-org/octo-repo", "-e", "GH_LABELS=bench", "-e", "RUNNER_EPHEMERAL=true",
                "-e", "GH_SERVER_URL=" + gh.url, "-e", "GH_API_URL=" + gh.url + "/api/v3"]
        for k, v in RUNNER_ENV.items():
            args += ["-e", "%s=%s" % (k, v)]
        t0 = time.time()
        subprocess.run(args + [IMAGE], check=True, stdout=subprocess.DEVNULL)
        j = assigned_at(gh, jid)
        lat.append(epoch(j["assigned_at"]) - t0)
        b.wait_for("job %d completed" % jid, 120, lambda: get(gh, "/_fake/jobs/%d" % jid)["status"] == "completed",
                   interval=0.02)
        subprocess.run(["docker", "rm", "-f", name], stdout=subprocess.DEVNULL)
    return lat


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=10)
    ap.add_argument("--burst", type=int, default=5, help="then this many jobs queued at once (0: none)")
    ap.add_argument("--bin", default=os.environ.get("CI_RUNNER_BIN", b.BIN))
    ap.add_argument("--reconcile-sec", type=int, default=5, help="the reconcile path's CONTROLLER_RECONCILE_SEC")
    ap.add_argument("--idle-sec", type=int, default=30, help="how long the idle controller is watched")
    ap.add_argument("--org", action="store_true", help="also an organization's pool: reconcile path and idle cost")
    ap.add_argument("--org-only", action="store_true", help="only the organization pool's phases")
    args = ap.parse_args()
    build_image(args.bin)
    if args.org_only:
        gh = b.FakeGithub()
        try:
            org_report(gh, args)
        finally:
            gh.close()
        return
    gh = b.FakeGithub()
    try:
        # The fake's default 1 s cool-down between a runner's jobs does not apply: each runner is new.
        lat, calls, left, blat = controller_runs(gh, args.bin, args.runs, args.burst)
        base = baseline_runs(gh, args.runs)
        rlat, found = reconcile_runs(gh, args.bin, args.runs, args.reconcile_sec)
        icalls, ipasses, icounted = idle_cost(gh, args.bin, args.idle_sec)
    finally:
        gh.close()
    total = sum(calls.values())
    med, bmed = statistics.median(lat), statistics.median(base)
    print("`python3 bench/controller.py --runs %d --burst %d` (release build), %d runs each, one at a time."
          % (args.runs, args.burst, args.runs))
    print()
    print("| Path | Median | Min | Max |")
    print("|---|---|---|---|")
    print("| webhook sent → job assigned in the new container (`ci-runner controller`) | %.3f s | %.3f s | %.3f s |"
          % (med, min(lat), max(lat)))
    print("| `docker run` → job assigned (baseline: the image started by hand, self-minted JIT) | %.3f s | %.3f s | %.3f s |"
          % (bmed, min(base), max(base)))
    if blat:
        print("| the same, %d jobs queued at once (max runners %d): each job | %.3f s | %.3f s | %.3f s |"
              % (len(blat), args.burst, statistics.median(blat), min(blat), max(blat)))
    print()
    print("Ratio controller / baseline: %.2f. All runs (s): controller %s; baseline %s."
          % (med / bmed, ", ".join("%.3f" % x for x in lat), ", ".join("%.3f" % x for x in base)))
    print()
    print("GitHub API calls during the %d controller runs: %d (%.2f per job): %s. Runners left registered: %d."
          % (args.runs, total, total / args.runs, ", ".join("%s ×%d" % kv for kv in sorted(calls.items())), len(left)))
    print()
    print("| Path (issue #18) | Median | Min | Max |")
    print("|---|---|---|---|")
    print("| webhook sent → job assigned (as above) | %.3f s | %.3f s | %.3f s |" % (med, min(lat), max(lat)))
    print("| delivery lost → job assigned, found by reconciliation (`CONTROLLER_RECONCILE_SEC=%d`) | %.3f s | %.3f s | %.3f s |"
          % (args.reconcile_sec, statistics.median(rlat), min(rlat), max(rlat)))
    print()
    print("Reconcile path: %d jobs found by reconciliation for %d lost deliveries. All runs (s): %s."
          % (found, args.runs, ", ".join("%.3f" % x for x in rlat)))
    itotal = sum(icalls.values())
    per_pass = itotal / ipasses if ipasses else float("nan")
    print()
    print("Idle controller, %d s at a 1 s period: %d reconcile passes, %d REST calls seen by the fake (%s; the "
          "controller counted %d since its start), %.2f per pass: **%.0f calls an hour per repository** at the "
          "default 60 s period." % (args.idle_sec, ipasses, itotal, ", ".join("%s ×%d" % kv for kv in sorted(icalls.items())),
                                    icounted, per_pass, per_pass * 60))
    if args.org:
        gh = b.FakeGithub()
        try:
            org_report(gh, args)
        finally:
            gh.close()


def org_report(gh, args):
    rlat, found = reconcile_runs(gh, args.bin, args.runs, args.reconcile_sec, org=True)
    icalls, ipasses, icounted = idle_cost(gh, args.bin, args.idle_sec, org=True)
    print()
    print("| Path (organization pool, issue #18) | Median | Min | Max |")
    print("|---|---|---|---|")
    print("| delivery lost → job assigned, redelivered by reconciliation (`CONTROLLER_RECONCILE_SEC=%d`) | %.3f s | %.3f s | %.3f s |"
          % (args.reconcile_sec, statistics.median(rlat), min(rlat), max(rlat)))
    print()
    print("Organization reconcile path: %d jobs redelivered for %d lost deliveries. All runs (s): %s."
          % (found, args.runs, ", ".join("%.3f" % x for x in rlat)))
    itotal = sum(icalls.values())
    per_pass = itotal / ipasses if ipasses else float("nan")
    print()
    print("Idle organization pool, %d s at a 1 s period: %d reconcile passes, %d REST calls seen by the fake (%s; the "
          "controller counted %d since its start), %.2f per pass: **%.0f calls an hour per organization pool** at the "
          "default 60 s period." % (args.idle_sec, ipasses, itotal,
                                    ", ".join("%s ×%d" % kv for kv in sorted(icalls.items())),
                                    icounted, per_pass, per_pass * 60))


if __name__ == "__main__":
    main()
