#!/usr/bin/env python3
"""Benchmarks for the autoscaling bars (issue #4). Run as root after `cargo build --release`,
with moto installed (`pip install 'moto[server]'`):

    python3 bench/autoscale.py --jobs 20          # busy/idle change → datapoint at CloudWatch
    python3 bench/autoscale.py --idle-sec 3600    # GitHub API calls from an idle container

CloudWatch is moto's server, in this process on loopback, behind a WSGI wrapper that stamps
each PutMetricData with its arrival time. The change's time is the supervisor's own log line
("Job started." / "Job finished."), written when it parses the runner's line. Prints Markdown.
"""
import argparse
import io
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.parse
from datetime import datetime

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench as b  # noqa: E402  (the fakes and helpers of bench.py)

from moto.server import DomainDispatcherApplication, create_backend_app  # noqa: E402
from werkzeug.serving import make_server  # noqa: E402
import logging  # noqa: E402

logging.getLogger("werkzeug").setLevel(logging.ERROR)

ARRIVALS = []  # (arrival time, [(metric, value, timestamp)])


def recording(app):
    def wrapped(environ, start_response):
        length = int(environ.get("CONTENT_LENGTH") or 0)
        body = environ["wsgi.input"].read(length) if length else b""
        t = time.time()
        form = urllib.parse.parse_qs(body.decode(errors="replace"))
        if form.get("Action") == ["PutMetricData"]:
            data, i = [], 1
            while "MetricData.member.%d.MetricName" % i in form:
                m = "MetricData.member.%d." % i
                ts = datetime.fromisoformat(form[m + "Timestamp"][0].replace("Z", "+00:00")).timestamp()
                data.append((form[m + "MetricName"][0], float(form[m + "Value"][0]), ts))
                i += 1
            ARRIVALS.append((t, data))
        environ["wsgi.input"] = io.BytesIO(body)
        return app(environ, start_response)
    return wrapped


def start_moto():
    app = DomainDispatcherApplication(create_backend_app)
    server = make_server("127.0.0.1", 0, recording(app), threaded=True)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, "http://127.0.0.1:%d" % server.server_port


LINE = re.compile(r"^(\S+Z)\s+INFO.*?(Job started\.|Job finished\.)")


def log_events(path):
    out = []
    for line in open(path, errors="replace"):
        line = re.sub(r"\x1b\[[0-9;]*m", "", line)
        m = LINE.match(line)
        if m:
            t = datetime.fromisoformat(m.group(1).replace("Z", "+00:00")).timestamp()
            out.append((t, 100.0 if m.group(2) == "Job started." else 0.0))
    return out


def start_supervisor(gh, moto_url, heartbeat):
    d = b.runner_copy()
    port = b.free_port()
    env = b.env_for(gh, d, port)
    env.update({
        "RUST_LOG": "info",
        "LOG_FORMAT": "plain",
        "AWS_REGION": "us-east-1",
        "AWS_ACCESS_KEY_ID": "AKIDBENCH",
        "AWS_SECRET_ACCESS_KEY": "bench-secret",
        "AWS_ENDPOINT_URL_CLOUDWATCH": moto_url,
        "CLOUDWATCH_HEARTBEAT_SEC": str(heartbeat),
    })
    log = tempfile.mktemp(suffix=".log")
    p = subprocess.Popen([b.BIN], env=env, stdout=subprocess.DEVNULL, stderr=open(log, "w"))
    b.wait_for("idle", 30, lambda: (b.health(port) or {}).get("state") == "idle", interval=0.01)
    return p, d, log


def bench_latency(gh, moto_url, jobs):
    p, d, log = start_supervisor(gh, moto_url, 3600)
    try:
        for i in range(jobs):
            job = b.post(gh, "/_fake/jobs", {"scope": "octo-org/octo-repo", "labels": ["bench"],
                                            "name": "job%d" % i, "steps": "sleep 0.3"})["id"]
            b.wait_for("job %d" % i, 60, lambda: _job(gh, job).get("status") == "completed", interval=0.05)
            # Let the idle datapoint land before the next job (it is what is measured).
            time.sleep(0.3)
    finally:
        b.kill_tree(p)
    events = log_events(log)
    lat = []
    debug = os.environ.get("BENCH_DEBUG")
    for t, value in events:
        arrived = [a for a, data in ARRIVALS
                   if a >= t and any(n == "ActiveRunnersPercent" and v == value and ts >= t - 0.002 for n, v, ts in data)]
        if arrived:
            lat.append((min(arrived) - t) * 1000)
            if debug:
                print(value, round(lat[-1], 1), file=sys.stderr)
    os.unlink(log)
    return lat, len(events)


def _job(gh, job):
    import json
    import urllib.request
    with urllib.request.urlopen(gh.url + "/_fake/jobs/%d" % job, timeout=10) as r:
        return json.load(r)


def bench_idle(gh, moto_url, seconds):
    import json
    import urllib.request
    p, d, log = start_supervisor(gh, moto_url, 60)
    try:
        b.post(gh, "/_fake/requests/clear", {})
        before = len(ARRIVALS)
        time.sleep(seconds)  # the measured window itself, not an assertion
        with urllib.request.urlopen(gh.url + "/_fake/requests", timeout=10) as r:
            reqs = json.load(r)
        rest = [r for r in reqs if "/_fake/" not in r["path"]]
        puts = len(ARRIVALS) - before
    finally:
        b.kill_tree(p)
    os.unlink(log)
    return len(rest), puts


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--jobs", type=int, default=0)
    ap.add_argument("--idle-sec", type=int, default=0)
    args = ap.parse_args()
    server, url = start_moto()
    gh = b.FakeGithub()
    try:
        cpu = next((l.split(":", 1)[1].strip() for l in open("/proc/cpuinfo") if l.startswith("model name")), "?")
        print("Machine: %s, %d cores, kernel %s. Release build; moto %s in-process on loopback."
              % (cpu, os.cpu_count(), platform.release(), __import__("moto").__version__))
        print()
        if args.jobs:
            lat, n = bench_latency(gh, url, args.jobs)
            print("`python3 bench/autoscale.py --jobs %d`: %d busy/idle changes, %d datapoints matched." % (args.jobs, n, len(lat)))
            print()
            print("| Bar | Target | Median | p90 | Max |")
            print("|---|---|---|---|---|")
            q = statistics.quantiles(lat, n=10)[-1] if len(lat) >= 2 else lat[0]
            print("| Busy/idle change (supervisor's log line) → PutMetricData at moto | < 1 s | %.1f ms | %.1f ms | %.1f ms |"
                  % (statistics.median(lat), q, max(lat)))
        if args.idle_sec:
            rest, puts = bench_idle(gh, url, args.idle_sec)
            print("`python3 bench/autoscale.py --idle-sec %d`: one idle runner, registered, CloudWatch on (heartbeat 60 s)."
                  % args.idle_sec)
            print()
            print("| Bar | Target | Measured |")
            print("|---|---|---|")
            print("| GitHub API calls from an idle container after registration | 0 per hour | %d in %d s (%.1f per hour) |"
                  % (rest, args.idle_sec, rest * 3600.0 / args.idle_sec))
            print("| PutMetricData calls in the same window (heartbeats) | — | %d |" % puts)
    finally:
        gh.close()
        server.shutdown()


if __name__ == "__main__":
    main()
