#!/usr/bin/env python3
"""Image benchmark: container start to the runner listening, and what ci-runner adds to the
image. Run as root on a machine with the Docker engine, after `cargo build --release`:

    python3 bench/image.py --runs 10

It builds `ci-runner:bench` from image/Dockerfile with no registry (the Debian base the tests
make, `ci-runner-test-base:bookworm`, made here with debootstrap if missing), the fake runner as
the runner tarball and target/release/ci-runner as the binary; the fake GitHub runs on the
host's loopback and the containers use host networking.
"""

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import datetime

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
BASE = "ci-runner-test-base:bookworm"
IMAGE = "ci-runner:bench"


def sh(*args, **kw):
    return subprocess.run(args, check=True, **kw)


def ensure_base():
    if subprocess.run(["docker", "image", "inspect", BASE], capture_output=True).returncode == 0:
        return
    with tempfile.TemporaryDirectory() as root:
        sh("debootstrap", "--variant=minbase", "bookworm", root, "http://deb.debian.org/debian",
           stdout=subprocess.DEVNULL)
        sh("sh", "-c", "tar -C %s -c . | docker import - %s >/dev/null" % (root, BASE))


def build(binary):
    with tempfile.TemporaryDirectory() as ctx:
        local = os.path.join(ctx, "image", "local")
        os.makedirs(local)
        shutil.copy(os.path.join(ROOT, "image", "Dockerfile"), os.path.join(ctx, "image", "Dockerfile"))
        shutil.copy(binary, os.path.join(local, "ci-runner"))
        sh("tar", "-czf", os.path.join(local, "actions-runner.tar.gz"), "--exclude=__pycache__", "-C",
           os.path.join(ROOT, "tests", "fakes", "runner"), ".")
        sh("docker", "build", "-q", "-f", "image/Dockerfile", "-t", IMAGE, "--build-arg", "BASE_IMAGE=" + BASE,
           "--build-arg", "BUILDER_IMAGE=" + BASE, "--build-arg", "EXTRA_PACKAGES=python3", ".", cwd=ctx,
           stdout=subprocess.DEVNULL)


def parse_ts(s):
    # 2026-11-23T12:00:00.123456789Z -> seconds (microsecond precision is plenty here)
    s = s.rstrip("Z")
    if "." in s:
        head, frac = s.split(".")
        s = head + "." + frac[:6]
    return datetime.fromisoformat(s).timestamp()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/ci-runner"))
    ap.add_argument("--runs", type=int, default=10)
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root")
    ensure_base()
    build(args.bin)

    tmp = tempfile.mkdtemp()
    port_file = os.path.join(tmp, "port")
    gh = subprocess.Popen([sys.executable, os.path.join(ROOT, "tests/fakes/fake_github.py"), "--listen",
                           "127.0.0.1:0", "--port-file", port_file], stdout=subprocess.DEVNULL,
                          stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            if os.path.exists(port_file) and open(port_file).read().strip():
                break
            time.sleep(0.05)
        url = "http://127.0.0.1:%s" % open(port_file).read().strip()
        wall, inside = [], []
        for i in range(args.runs):
            name = "ci-runner-bench-%d-%d" % (os.getpid(), i)
            env = ["-e", "GH_TOKEN=ghp_admin", "-e", "GH_REPOSITORY=octo-org/octo-repo", "-e", "GH_LABELS=bench",
                   "-e", "GH_SERVER_URL=" + url, "-e", "GH_API_URL=%s/api/v3" % url, "-e", "STATUS_ADDR=off",
                   "-e", "AWS_EC2_METADATA_DISABLED=true"]
            t0 = time.monotonic()
            sh("docker", "run", "-d", "--name", name, "--network", "host", *env, IMAGE, stdout=subprocess.DEVNULL)
            logs = subprocess.Popen(["docker", "logs", "-f", name], stdout=subprocess.PIPE,
                                    stderr=subprocess.STDOUT, text=True)
            line = ""
            for line in logs.stdout:
                if "Listening for Jobs" in line:
                    break
            t1 = time.monotonic()
            logs.kill()
            started = json.loads(subprocess.run(["docker", "inspect", name], capture_output=True,
                                                text=True).stdout)[0]["State"]["StartedAt"]
            listened = line.split()[0]  # ci-runner's own timestamp on the runner's line
            wall.append(t1 - t0)
            inside.append(parse_ts(listened) - parse_ts(started))
            subprocess.run(["docker", "rm", "-f", name], capture_output=True)
        size = json.loads(subprocess.run(["docker", "image", "inspect", IMAGE], capture_output=True,
                                         text=True).stdout)[0]["Size"]
        base = json.loads(subprocess.run(["docker", "image", "inspect", BASE], capture_output=True,
                                         text=True).stdout)[0]["Size"]
        binsize = os.path.getsize(args.bin)
        print("runs: %d (fake runner, fake GitHub on loopback, host networking)" % args.runs)
        print("docker run -> 'Listening for Jobs': median %.0f ms (min %.0f, max %.0f)" % (
            statistics.median(wall) * 1000, min(wall) * 1000, max(wall) * 1000))
        print("container started -> 'Listening for Jobs' (in-container, the supervisor's part): "
              "median %.0f ms (min %.0f, max %.0f)  bar: < 1000 ms %s" % (
                  statistics.median(inside) * 1000, min(inside) * 1000, max(inside) * 1000,
                  "PASS" if statistics.median(inside) < 1.0 else "FAIL"))
        print("ci-runner binary (the image layer it adds): %.1f MB  bar: < 15 MB %s" % (
            binsize / 1e6, "PASS" if binsize < 15e6 else "FAIL"))
        print("image %s: %.0f MB; its base (debootstrap minbase bookworm): %.0f MB" % (IMAGE, size / 1e6, base / 1e6))
    finally:
        gh.kill()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
