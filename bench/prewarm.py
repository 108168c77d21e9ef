#!/usr/bin/env python3
"""Pre-warm benchmark: `ci-runner prewarm` vs `rsync -a -e ssh` (ci-storage's method) of the
same ci-storage slot from a real sshd on loopback into an empty dir, side by side in one run,
with the local `tar c | tar x` (no ssh: the limit of this machine) measured in the same run.

Run as root after `cargo build --release`:

    python3 bench/prewarm.py                     # 100,000 files / 1 GiB, 3 runs each
    python3 bench/prewarm.py --files 10 --mib 1 --runs 7 --dest tmpfs   # issue 21's tiny slot
    python3 bench/prewarm.py --files 2000 --mib 64 --runs 1   # a quick check

The storage side runs as an unprivileged user (ci-bench-storage, made if missing) whose
`~/.bashrc` takes `--rc-sec` (0.25 s by default, a realistic nvm/conda-style rc file), which
every remote command pays, as ci-storage's guest user would. With `CI_STORAGE_TOOL=/path/to/ci-storage`
the real tool's `load` is measured too (never committed here).

Every method reads the same slot with the same page cache state, runs as the same unprivileged
user (nobody, as ci-storage runs as guest), and writes into an empty dir on the same
filesystem, made fresh for the benchmark (a tmpfs, as the original image recommends for
/mnt, and a new ext4 on a loop device); `sync` runs before each timed run so one run's
writeback does not land in the next. The methods alternate within each run, so a machine
shared with other work loads them alike: compare the ratios, not the absolute seconds. Each
result is checked against rsync's (paths, types, sizes, modes, mtimes in ns).
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

STORAGE_USER = "ci-bench-storage"
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


def storage_user(base, rc_sec):
    """The storage side's user: bash, a home with an rc file that takes rc_sec."""
    home = os.path.join(base, "storage-home")
    if subprocess.run(["id", STORAGE_USER], capture_output=True).returncode != 0:
        subprocess.run(["useradd", "--system", "--shell", "/bin/bash", "--home-dir", home, STORAGE_USER],
                       check=True)
    # No password, but not locked either ("!" is, and sshd without PAM refuses such a user).
    subprocess.run(["usermod", "-p", "*", STORAGE_USER], check=True)
    import pwd
    pw = pwd.getpwnam(STORAGE_USER)
    os.makedirs(home, exist_ok=True)
    with open(os.path.join(home, ".bashrc"), "w") as f:
        # What a version manager's init costs on a storage host (measured with `time bash -ic exit`).
        f.write("# ci-runner bench: an rc file that takes %.2f s\nsleep %.3f\n" % (rc_sec, rc_sec))
    for p in (home, os.path.join(home, ".bashrc")):
        os.chown(p, pw.pw_uid, pw.pw_gid)
    return pw


def chown_tree(root, uid, gid):
    if os.lstat(root).st_uid == uid:
        return
    subprocess.run(["chown", "-R", "-h", "%d:%d" % (uid, gid), root], check=True)


def run_measured(cmd, env):
    """Runs one child to its end: (seconds, peak RSS in MiB, stdout); exits on a failure.
    GNU time takes the peak: a child forked from this Python starts with Python's pages."""
    import tempfile
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err, \
            tempfile.NamedTemporaryFile("r") as rss:
        t = time.monotonic()
        p = subprocess.run(["/usr/bin/time", "-f", "%M", "-o", rss.name] + cmd, stdout=out, stderr=err, env=env)
        elapsed = time.monotonic() - t
        out.seek(0)
        err.seek(0)
        text = out.read()
        if p.returncode != 0:
            sys.exit("%s failed (exit %d): %s %s" % (" ".join(cmd), p.returncode, text, err.read()))
        return elapsed, int(rss.read().split()[-1]) / 1024, text


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--bin", default=os.path.join(ROOT, "target/release/ci-runner"))
    ap.add_argument("--streams-also", type=int, default=0, help="CI_STORAGE_STREAMS for the --also binaries")
    ap.add_argument("--files", type=int, default=100_000)
    ap.add_argument("--mib", type=int, default=1024)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--dir", default="/var/tmp/ci-runner-bench-prewarm")
    ap.add_argument("--also", action="append", default=[],
                    help="another ci-runner binary (e.g. a build of main) measured in the same run; repeatable")
    ap.add_argument("--streams", type=int, default=0, help="CI_STORAGE_STREAMS (default: ci-runner's own)")
    ap.add_argument("--rc-sec", type=float, default=0.25, help="what the storage user's ~/.bashrc takes")
    ap.add_argument("--dest", nargs="+", default=["tmpfs", "ext4"], choices=["tmpfs", "ext4"])
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("run as root (sshd, the storage user, and the runner user nobody)")
    tool = os.environ.get("CI_STORAGE_TOOL")
    tiny = args.files <= 1000

    base = args.dir
    os.makedirs(base, exist_ok=True)
    os.chmod(base, 0o755)
    pw = storage_user(base, args.rc_sec)
    keys = os.path.join(base, "keys")
    shutil.rmtree(keys, ignore_errors=True)
    os.makedirs(keys)
    os.chmod(keys, 0o755)
    for k in ("host_key", "client_key"):
        subprocess.run(["ssh-keygen", "-q", "-t", "ed25519", "-N", "", "-f", os.path.join(keys, k)], check=True)
    shutil.copy(os.path.join(keys, "client_key.pub"), os.path.join(keys, "authorized_keys"))
    os.chmod(os.path.join(keys, "authorized_keys"), 0o644)
    # The client side runs as nobody: its own copy of the key, and the secrets dir.
    secrets = os.path.join(keys, "secrets")
    os.makedirs(secrets)
    shutil.copy(os.path.join(keys, "client_key"), os.path.join(secrets, "CI_STORAGE_PRIVATE_KEY"))
    key_nobody = os.path.join(keys, "key_nobody")
    shutil.copy(os.path.join(keys, "client_key"), key_nobody)
    chown_nobody(key_nobody)
    os.chmod(key_nobody, 0o600)
    # The real tool runs plain ssh with the default key of nobody's home.
    nobody_home = os.path.join(keys, "nobody-home")
    os.makedirs(os.path.join(nobody_home, ".ssh"))
    shutil.copy(key_nobody, os.path.join(nobody_home, ".ssh", "id_ed25519"))
    for root, dirs, files in os.walk(nobody_home):
        for n in [root] + [os.path.join(root, f) for f in files]:
            chown_nobody(n)
    os.chmod(os.path.join(nobody_home, ".ssh", "id_ed25519"), 0o600)

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

        # One storage per slot size, so the tiny case does not regenerate the big one.
        storage = os.path.join(base, "storage-%d-%d" % (args.files, args.mib))
        slots = os.path.join(storage, "slots")
        slot = os.path.join(slots, "1")
        marker = os.path.join(storage, "generated")
        if not os.path.exists(marker):
            shutil.rmtree(storage, ignore_errors=True)
            print("generating %d files, %d MiB ..." % (args.files, args.mib), flush=True)
            generate(slot, args.files, args.mib << 20)
            open(marker, "w").close()
        # The storage user owns the slots, as a store would have left them (the load touches
        # the slot to keep it from the GC).
        chown_tree(slots, pw.pw_uid, pw.pw_gid)
        tmp = os.path.join(base, "tmp")
        os.makedirs(tmp, exist_ok=True)
        os.chmod(tmp, 0o1777)
        remote = "%s@127.0.0.1" % STORAGE_USER

        ssh_opts = "-p %d -oStrictHostKeyChecking=no -oUserKnownHostsFile=/dev/null -oLogLevel=error" % port
        ssh = "ssh -i %s %s" % (key_nobody, ssh_opts)
        as_nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
        # ssh itself: does the rc file cost what it should?
        t = time.monotonic()
        subprocess.run(as_nobody + ssh.split() + [remote, "true"], check=True,
                       env={"PATH": "/usr/bin:/bin", "HOME": "/nonexistent"})
        print("one `ssh %s true`: %.2f s (rc file %.2f s)" % (remote, time.monotonic() - t, args.rc_sec), flush=True)

        def cpu():
            r = resource.getrusage(resource.RUSAGE_CHILDREN)
            return r.ru_utime + r.ru_stime

        RSYNC, OURS, TAR, TOOL = "rsync -a -e ssh", "ci-runner prewarm", "local tar | tar", "ci-storage load"
        also = {"ci-runner --also %d" % (n + 1): b for n, b in enumerate(args.also)}
        methods = [RSYNC, OURS, TAR] + ([TOOL] if tool else []) + list(also)
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
                subprocess.run(["mount", "-t", "tmpfs", "-o", "size=%dm" % (args.mib * 4 + 1024), "tmpfs", mnt],
                               check=True)
            else:
                subprocess.run(["truncate", "-s", "%dM" % (args.mib * 4 + 2048), img], check=True)
                subprocess.run(["mkfs.ext4", "-q", "-F", img], check=True)
                subprocess.run(["mount", "-o", "loop", img, mnt], check=True)
            try:
                work = os.path.join(mnt, "work")
                os.makedirs(work)
                chown_nobody(work)
                local = os.path.join(work, "repo", "repo")
                dst = os.path.join(mnt, "dst")
                # The storage dir ci-runner derives for this work dir, pointing at the slots.
                link = os.path.join(storage, REPO, local.replace("/", "_"))
                os.makedirs(os.path.dirname(link), exist_ok=True)
                if os.path.islink(link):
                    os.remove(link)
                os.symlink(slots, link)
                plain = {"PATH": "/usr/local/bin:/usr/bin:/bin:/usr/sbin:/sbin", "HOME": "/nonexistent"}
                env = dict(plain, **{
                    "GH_REPOSITORY": REPO,
                    "RUNNER_DIR": work,
                    "RUNNER_WORKDIR": work,
                    "RUNNER_USER": "nobody",
                    "CI_STORAGE_HOST": "%s:%d" % (remote, port),
                    "CI_STORAGE_DIR": storage,
                    "SECRETS_DIR": secrets,
                    "TMPDIR": tmp,
                })
                if args.streams:
                    env["CI_STORAGE_STREAMS"] = str(args.streams)

                def clean():
                    for d in (dst, os.path.dirname(local)):
                        shutil.rmtree(d, ignore_errors=True)
                    os.makedirs(dst)
                    chown_nobody(dst)
                    subprocess.run(["sync"], check=True)

                def run(method):
                    """(seconds, peak RSS MiB, bytes through the cipher or None, the loaded dir)"""
                    clean()
                    if method == RSYNC:
                        cmd = as_nobody + ["rsync", "-a", "--exclude=.ci-storage.meta", "-e", ssh,
                                           "%s:%s/" % (remote, slot), dst + "/"]
                        secs, rss, _ = run_measured(cmd, plain)
                        return secs, rss, None, dst
                    if method == TAR:
                        pipe = "tar -C %s --exclude=.ci-storage.meta --format=posix -cf - . | tar -C %s -xf -" % (
                            slot, dst)
                        secs, rss, _ = run_measured(as_nobody + ["sh", "-c", pipe], plain)
                        return secs, rss, None, dst
                    if method == TOOL:
                        cmd = as_nobody + [tool, "--storage-host=%s:%d" % (remote, port), "--storage-dir=%s" % slots,
                                           "--slot-id=*", "--local-dir=%s" % dst, "load"]
                        secs, rss, _ = run_measured(cmd, dict(plain, HOME=nobody_home, TMPDIR=tmp))
                        return secs, rss, None, dst
                    run_env = dict(env)
                    if method in also and args.streams_also:
                        run_env["CI_STORAGE_STREAMS"] = str(args.streams_also)
                    secs, rss, out = run_measured([also.get(method, args.bin), "prewarm"], run_env)
                    if not out.startswith("warm slot=1"):
                        sys.exit("ci-runner prewarm did not load the slot: %s" % out)
                    fields = dict(f.split("=", 1) for f in out.split()[1:] if "=" in f)
                    return secs, rss, int(fields["bytes"]), local

                results = {m: [] for m in methods}
                cpus = {m: [] for m in methods}
                rss = {m: [] for m in methods}
                sent = []
                for i in range(args.runs):
                    keep = None
                    # Alternate the order too, so neither side always runs just after the other.
                    order = methods if i % 2 == 0 else [methods[1], methods[0]] + methods[2:]
                    for m in order:
                        c = cpu()
                        secs, peak, nbytes, loaded = run(m)
                        cpus[m].append(cpu() - c)
                        results[m].append(secs)
                        rss[m].append(peak)
                        if nbytes is not None and m == OURS:
                            sent.append(nbytes)
                        got = tree(loaded)
                        if m == RSYNC:
                            keep = got
                        elif keep is not None and got != keep:
                            diff = [k for k in set(got) | set(keep) if got.get(k) != keep.get(k)][:5]
                            sys.exit("%s: the tree differs from rsync's, e.g. %s" % (m, diff))
                    print("%s run %d: %s" % (kind, i + 1, ", ".join(
                        "%s %.2f s" % (m, results[m][-1]) for m in methods)), flush=True)
                clean()
                report.append((kind, results, cpus, rss, sent))
            finally:
                subprocess.run(["umount", mnt])
                if os.path.exists(img):
                    os.remove(img)

        files_bytes = sum(os.lstat(os.path.join(d, f)).st_size for d, _, fs in os.walk(slot) for f in fs
                          if f != ".ci-storage.meta")
        print()
        print("slot: %d files, %d MiB (%d bytes of files), loopback sshd (OpenSSH), storage user %s with a "
              "%.2f s rc file, into an empty dir, as nobody; %d runs, methods alternated" % (
                  args.files, args.mib, files_bytes, STORAGE_USER, args.rc_sec, args.runs))
        print("%-6s %-18s %9s %7s %7s %13s %10s %8s" % ("dest", "method", "median s", "min s", "max s",
                                                         "client CPU s", "peak MiB", "vs rsync"))
        bars = []
        for kind, results, cpus, rss, sent in report:
            r = statistics.median(results[RSYNC])
            for name, xs in results.items():
                print("%-6s %-18s %9.2f %7.2f %7.2f %13.2f %10.1f %7.2fx" % (
                    kind, name, statistics.median(xs), min(xs), max(xs), statistics.median(cpus[name]),
                    max(rss[name]), r / statistics.median(xs)))
            ours = statistics.median(results[OURS])
            ratio = r / ours
            limit = statistics.median(results[TAR]) / ours
            print("%-6s bytes through the cipher: %d (%.1f%% over the files)" % (
                kind, statistics.median(sent), 100.0 * (statistics.median(sent) - files_bytes) / max(1, files_bytes)))
            print("%-6s ci-runner at %.0f%% of the local tar | tar speed" % (kind, 100 * limit))
            if tiny:
                bars.append(("%s: no slower than rsync on a tiny slot" % kind, ratio >= 1.0, "%.2fx" % ratio))
            else:
                bars.append(("%s: >= 2.0x rsync (issue 21)" % kind, ratio >= 2.0, "%.2fx" % ratio))
                bars.append(("%s: >= 1.5x rsync" % kind, ratio >= 1.5, "%.2fx" % ratio))
                bars.append(("%s: >= 70%% of local tar | tar" % kind, limit >= 0.7, "%.0f%%" % (100 * limit)))
            bars.append(("%s: peak memory <= 32 MiB" % kind, max(rss[OURS]) <= 32, "%.1f MiB" % max(rss[OURS])))
        print()
        for name, ok, value in bars:
            print("bar %-45s %-10s %s" % (name, value, "PASS" if ok else "FAIL"))
    finally:
        sshd.kill()
        sshd.wait()


if __name__ == "__main__":
    main()
