#!/usr/bin/python3
"""The update at boot (issue #17). Run as root after `cargo build --release`:

    python3 bench/update.py [--runs 5] [--mib 150] [--bin PATH]

Boot to listening (the supervisor started until `/health` says `idle`) of the fake runner
against the fake GitHub, in four ways, interleaved run by run:
- `off`: RUNNER_UPDATE_AT_BOOT unset (the baseline);
- `not due`: the update on, the install stamped today and above the minimum (its cost is
  `bin/Runner.Listener --version`, no request);
- `warm`: due (no `.updated_at`), the tarball and its checksum already in RUNNER_CACHE_DIR:
  the redirect's HEAD, the tarball hashed again, unpacked, swapped;
- `cold`: due, an empty cache: the redirect, the release's JSON (the checksum), the download
  from tests/fakes/fake_releases.py on loopback, then as warm.
The release tarball is the fake runner reporting 2.340.0, padded with `--mib` MiB of
incompressible bytes in `externals/` so that the download, the hash and the unpack have
something to chew on. Prints a Markdown table: medians, min and max, and each against `off`.
"""
import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import bench  # noqa: E402  (the shared helpers: fake GitHub, runner copies, health)

NEW = "2.340.0"
ARCH = {"x86_64": "x64", "aarch64": "arm64"}.get(os.uname().machine, "x64")
ASSET = "actions-runner-linux-%s-%s.tar.gz" % (ARCH, NEW)


def make_release(dest, mib):
    src = tempfile.mkdtemp()
    try:
        shutil.copytree(os.path.join(bench.FAKES, "runner"), src, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("__pycache__"))
        with open(os.path.join(src, "bin", "fake-version"), "w") as f:
            f.write(NEW + "\n")
        os.makedirs(os.path.join(src, "externals"))
        with open(os.path.join(src, "externals", "padding"), "wb") as f:
            for _ in range(mib):
                f.write(os.urandom(1 << 20))
        subprocess.run(["tar", "-czf", os.path.join(dest, ASSET), "-C", src, "."], check=True)
    finally:
        shutil.rmtree(src, ignore_errors=True)


class Releases:
    def __init__(self, assets):
        self.dir = tempfile.mkdtemp()
        port_file = os.path.join(self.dir, "port")
        self.proc = subprocess.Popen(
            ["/usr/bin/python3", os.path.join(bench.FAKES, "fake_releases.py"), "--listen", "127.0.0.1:0",
             "--port-file", port_file, "--dir", assets, "--version", NEW],
            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        bench.wait_for("fake_releases", 20, lambda: os.path.exists(port_file))
        with open(port_file) as f:
            self.url = "http://127.0.0.1:%s" % f.read().strip()

    def close(self):
        self.proc.kill()
        self.proc.wait()
        shutil.rmtree(self.dir, ignore_errors=True)


def boot(gh, binary, mode, releases, warm_cache):
    d = bench.runner_copy()
    port = bench.free_port()
    env = bench.env_for(gh, d, port)
    cache = None
    if mode != "off":
        if mode == "warm":
            cache = tempfile.mkdtemp()
            for f in os.listdir(warm_cache):
                shutil.copy2(os.path.join(warm_cache, f), cache)
        else:
            cache = tempfile.mkdtemp()
        env.update(RUNNER_UPDATE_AT_BOOT="true", RUNNER_CACHE_DIR=cache,
                   RUNNER_RELEASES_URL=releases.url + "/releases",
                   RUNNER_RELEASES_API_URL=releases.url + "/api/releases")
        if mode == "not due":
            with open(os.path.join(d, ".updated_at"), "w") as f:
                f.write("now\n")
    t0 = time.monotonic()
    p = subprocess.Popen([binary], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        bench.wait_for("idle (%s)" % mode, 300, lambda: (bench.health(port) or {}).get("state") == "idle",
                       interval=0.005)
        took = time.monotonic() - t0
        version_file = os.path.join(d, "bin", "fake-version")
        updated = os.path.exists(version_file)
        if updated != (mode in ("warm", "cold")):
            raise SystemExit("%s: the runner was %supdated" % (mode, "" if updated else "not "))
        if mode == "cold" and not os.path.exists(os.path.join(cache, ASSET)):
            raise SystemExit("cold: the tarball was not cached")
    finally:
        if p.poll() is None:
            bench.kill_tree(p)
        shutil.rmtree(d, ignore_errors=True)
    return took, cache


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--mib", type=int, default=150)
    ap.add_argument("--bin", default=bench.BIN)
    args = ap.parse_args()
    assets = tempfile.mkdtemp()
    make_release(assets, args.mib)
    size = os.path.getsize(os.path.join(assets, ASSET))
    gh = bench.FakeGithub()
    releases = Releases(assets)
    modes = ["off", "not due", "warm", "cold"]
    times = {m: [] for m in modes}
    # The warm cache: what a cold boot leaves (the tarball and its checksum).
    _, warm_cache = boot(gh, args.bin, "cold", releases, None)
    try:
        for _ in range(args.runs):
            for m in modes:
                took, cache = boot(gh, args.bin, m, releases, warm_cache)
                times[m].append(took)
                if cache:
                    shutil.rmtree(cache, ignore_errors=True)
    finally:
        releases.close()
        gh.close()
        shutil.rmtree(assets, ignore_errors=True)
        shutil.rmtree(warm_cache, ignore_errors=True)
    base = bench.med(times["off"])
    print("Tarball: %.1f MiB (fake runner + %d MiB incompressible), %d runs per mode." % (size / 2**20, args.mib, args.runs))
    print()
    print("| Boot to listening | Median | Min | Max | Against `off` |")
    print("|---|---|---|---|---|")
    for m in modes:
        t = times[m]
        print("| %s | %.2f s | %.2f s | %.2f s | %+.2f s (%.2fx) |" % (
            m, bench.med(t), min(t), max(t), bench.med(t) - base, bench.med(t) / base))


if __name__ == "__main__":
    main()
