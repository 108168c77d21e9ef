#!/usr/bin/env python3
"""Pre-warm benchmark: `ci-runner prewarm` vs `rsync -a -e ssh` (ci-storage's method) of the
same ci-storage slot from a real sshd on loopback into an empty dir, side by side in one run.

Run as root after `cargo build --release`:

    python3 bench/prewarm.py                     # 100,000 files / 1 GiB, 3 runs each
    python3 bench/prewarm.py --files 2000 --mib 64 --runs 1   # a quick check

Both sides read the same slot with the same page cache state, run as the same unprivileged
user (nobody, as ci-storage runs as guest), and write into an empty dir on the same
filesystem, made fresh for the benchmark (a tmpfs, as the original image recommends for
/mnt, and a new ext4 on a loop device); `sync` runs before each timed run so one run's
writeback does not land in the next. Each result is checked against the other (paths, types, sizes, modes, mtimes in ns).
"""

import argparse
import os
import random
import resource
import shutil
import socket
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REPO = "bench/repo"


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def generate(slot, files, total):
    """files files of exponentially distributed sizes summing to total, 1,000 per dir."""
    random.seed(1)
    mean = total / files
    sizes = [int(random.expovariate(1 / mean)) for _ in range(files)]
    scale = total / max(1, sum(sizes))
    sizes = [int(s * scale) for s in sizes]
    blob = os.urandom(8 << 20)
    for i, size in enumerate(sizes):
        d = os.path.join(slot, "d%03d" % (i // 1000), "s%d" % ((i // 100) % 10))
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        off = random.randrange(0, len(blob) - min(size, len(blob)) + 1)
        with open(os.path.join(d, "f%06d.dat" % i), "wb") as f:
            while size > 0:
                k = min(size, len(blob) - off)
                f.write(blob[off:off + k])
                size -= k
                off = 0
    with open(os.path.join(slot, ".ci-storage.meta"), "w") as f:
        f.write("full_snapshot_history=1\nhints=\n")


def tree(root):
    out = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for name in dirnames + filenames:
            p = os.path.join(dirpath, name)
            st = os.lstat(p)
            out[os.path.relpath(p, root)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return out


def chown_nobody(path):
    os.chown(path, 65534, 65534)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/ci-runner"))
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/ci-runner-bench-prewarm")
    ap.add_argument("--streams", type=int, default=0, help="CI_STORAGE_STREAMS (default: ci-runner's own)")
    ap.add_argument("--dest", nargs="+", default=["tmpfs", "ext4"], choices=["tmpfs", "ext4"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (sshd, and the runner user nobody)")

    base = args.dir
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    keys = os.path.join(base, "keys")
    shutil.rmtree(keys, ignore_errors=True)
    os.makedirs(keys)
    for k in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(keys, k)], check=True)
    shutil.copy(os.path.join(keys, "client_key.pub"), os.path.join(keys, "authorized_keys"))
    # The client side runs as nobody: its own copy of the key, and the secrets dir.
    secrets = os.path.join(keys, "secrets")
    os.makedirs(secrets)
    shutil.copy(os.path.join(keys, "client_key"), os.path.join(secrets, "CI_STORAGE_PRIVATE_KEY"))
    key_nobody = os.path.join(keys, "key_nobody")
    shutil.copy(os.path.join(keys, "client_key"), key_nobody)
    chown_nobody(key_nobody)
    os.chmod(key_nobody, 0o600)

    port = free_port()
    cfg = os.path.join(keys, "sshd_config")
    with open(cfg, "w") as f:
        f.write(
            "ListenAddress 127.0.0.1:%d\nHostKey %s/host_key\nAuthorizedKeysFile %s/authorized_keys\n"
            "PermitRootLogin prohibit-password\nStrictModes no\nPasswordAuthentication no\nUsePAM no\n"
            "PidFile none\nMaxStartups 500:30:1000\n" % (port, keys, keys)
        )
    os.makedirs("/run/sshd", exist_ok=True)
    sshd = subprocess.Popen(["/usr/sbin/sshd", "-D", "-e", "-f", cfg], stderr=subprocess.DEVNULL)
    try:
        for _ in range(200):
            try:
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                break
            except OSError:
                time.sleep(0.05)

        storage = os.path.join(base, "storage")
        slots = os.path.join(storage, "slots")
        slot = os.path.join(slots, "1")
        marker = os.path.join(base, "generated-%d-%d" % (args.files, args.mib))
        if not os.path.exists(marker):
            shutil.rmtree(storage, ignore_errors=True)
            print("generating %d files, %d MiB ..." % (args.files, args.mib), flush=True)
            generate(slot, args.files, args.mib << 20)
            for m in os.listdir(base):
                if m.startswith("generated-"):
                    os.remove(os.path.join(base, m))
            open(marker, "w").close()
        tmp = os.path.join(base, "tmp")
        os.makedirs(tmp, exist_ok=True)
        os.chmod(tmp, 0o1777)

        ssh = "ssh -i %s -p %d -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null -oLogLevel=error" % (
            key_nobody,
            port,
        )
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

        def cpu():
            r = resource.getrusage(resource.RUSAGE_CHILDREN)
            return r.ru_utime + r.ru_stime

        report = []
        for kind in args.dest:
            # A fresh filesystem per kind: tmpfs (what the original image recommends for /mnt)
            # and a new journaled ext4 on a loop device (a disk). Fresh, so neither side pays
            # for inodes the other freed (ext4 without a journal skips recently freed inodes,
            # slowly, for up to 300 s).
            mnt = os.path.join(base, "dest-" + kind)
            os.makedirs(mnt, exist_ok=True)
            subprocess.run(["umount", mnt], stderr=subprocess.DEVNULL)
            img = os.path.join(base, "dest.img")
            if kind == "tmpfs":
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm" % (args.mib * 3 + 1024), "tmpfs", mnt],
                               check=True)
            else:
                subprocess.run(["truncate", "-s", "%dM" % (args.mib * 3 + 2048), img], check=True)
                subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
                subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
            try:
                work = os.path.join(mnt, "work")
                os.makedirs(work)
                chown_nobody(work)
                local = os.path.join(work, "repo", "repo")
                rsync_dst = os.path.join(mnt, "rsync-dst")
                # The storage dir ci-runner derives for this work dir, pointing at the slots.
                link = os.path.join(storage, REPO, local.replace("/", "_"))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                if os.path.islink(link):
                    os.remove(link)
                os.symlink(slots, link)
                env = {
                    "PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin",
                    "HOME": "/nonexistent",
                    "GH_REPOSITORY": REPO,
                    "RUNNER_DIR": work,
                    "RUNNER_WORKDIR": work,
                    "RUNNER_USER": "nobody",
                    "CI_STORAGE_HOST": "root@127.0.0.1:%d" % port,
                    "CI_STORAGE_DIR": storage,
                    "SECRETS_DIR": secrets,
                    "TMPDIR": tmp,
                }
                if args.streams:
                    env["CI_STORAGE_STREAMS"] = str(args.streams)

                def clean():
                    for d in (rsync_dst, os.path.dirname(local)):
                        shutil.rmtree(d, ignore_errors=True)
                    os.makedirs(rsync_dst)
                    chown_nobody(rsync_dst)
                    subprocess.run(["sync"], check=True)

                def run_rsync():
                    clean()
                    t = time.monotonic()
                    subprocess.run(
                        as_nobody + ["rsync", "-a", "--exclude=.ci-storage.meta", "-e", ssh,
                                     "root@127.0.0.1:%s/" % slot, rsync_dst + "/"],
                        check=True,
                        env={"PATH": env["PATH"], "HOME": "/nonexistent"},
                    )
                    return time.monotonic() - t

                def run_ours():
                    clean()
                    t = time.monotonic()
                    out = subprocess.run([args.bin, "prewarm"], check=True, env=env, capture_output=True, text=True)
                    elapsed = time.monotonic() - t
                    if not out.stdout.startswith("warm slot=1"):
                        sys.exit("ci-runner prewarm did not load the slot: %s %s" % (out.stdout, out.stderr))
                    return elapsed

                results = {"rsync -a -e ssh": [], "ci-runner prewarm": []}
                cpus = {"rsync -a -e ssh": [], "ci-runner prewarm": []}
                for i in range(args.runs):
                    c = cpu()
                    results["rsync -a -e ssh"].append(run_rsync())
                    cpus["rsync -a -e ssh"].append(cpu() - c)
                    keep = tree(rsync_dst)
                    c = cpu()
                    results["ci-runner prewarm"].append(run_ours())
                    cpus["ci-runner prewarm"].append(cpu() - c)
                    ours = tree(local)
                    if ours != keep:
                        diff = [k for k in set(ours) | set(keep) if ours.get(k) != keep.get(k)][:5]
                        sys.exit("the trees differ, e.g. %s" % diff)
                    print("%s run %d: rsync %.2f s, ci-runner %.2f s" % (
                        kind, i + 1, results["rsync -a -e ssh"][-1], results["ci-runner prewarm"][-1]), flush=True)
                clean()
                report.append((kind, results, cpus))
            finally:
                subprocess.run(["umount", mnt])
                if os.path.exists(img):
                    os.remove(img)

        print()
        print("slot: %d files, %d MiB, loopback sshd (OpenSSH), into an empty dir, as nobody" % (args.files, args.mib))
        print("%-8s %-20s %10s %10s %10s %16s" % ("dest", "method", "median s", "min s", "max s", "client CPU s"))
        for kind, results, cpus in report:
            for name, xs in results.items():
                print("%-8s %-20s %10.2f %10.2f %10.2f %16.2f" % (kind, name, statistics.median(xs), min(xs),
                                                                 max(xs), statistics.median(cpus[name])))
            ratio = statistics.median(results["rsync -a -e ssh"]) / statistics.median(results["ci-runner prewarm"])
            print("%-8s speed-up over rsync: %.2fx (bar: at least 1.5x) %s" % (kind, ratio,
                                                                          "PASS" if ratio >= 1.5 else "FAIL"))
    finally:
        sshd.kill()
        sshd.wait()


if __name__ == "__main__":
    main()
