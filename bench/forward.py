#!/usr/bin/python3
"""Port-forward benchmarks: `ci-runner forward` against socat, side by side in one run.

    cargo build --release && python3 bench/forward.py [--bin PATH] [--runs N]

The forwarders listen on 127.0.0.1 and forward to 127.0.0.2, where this script's own servers
run (in a separate process): a TCP sink, a TCP echo and a UDP echo. ci-runner and both socat
setups run at once, each on its own ports, and every measurement takes the paths in turns
(direct, ci-runner, socat, socat -b 65536), so drift on the machine hits all alike.

1. TCP throughput: one connection streams --bytes (2 GiB) to the sink, which answers with the
   count once it has read everything; MiB/s over that whole time. Both ends use 4 MiB buffers
   (one syscall moves megabytes), so Python is not the bottleneck: the direct figure shows it.
2. Added latency: --round-trips 64-byte ping-pongs over one TCP_NODELAY connection per path,
   in turns of 500 per path; the median round trip through a forwarder minus the direct one.
3. UDP packets/s: --datagrams 64-byte datagrams echoed, with --window in flight (the bar), and
   --round-trips ping-pongs (one in flight, interleaved like the TCP ones). A lost datagram
   (200 ms timeout) is counted and refilled.
Also: the forwarder's CPU time per GiB moved (user + system, socat's forked children included).

socat commands (Q: socat's own listening port, P: the server's):
    socat TCP-LISTEN:Q,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.2:P         (default 8 KiB buffer)
    socat -b 65536 TCP-LISTEN:Q,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.2:P (its best figure here)
    socat UDP-LISTEN:Q,bind=127.0.0.1,reuseaddr,fork UDP:127.0.0.2:P
UDP-LISTEN with fork gives each client a child with its own connected sockets, the same model
as ci-runner's sessions (the children never time out without -T; harmless here); UDP-RECVFROM
with fork would fork once per datagram. The TCP bar is against the better socat figure.
"""
import argparse
import multiprocessing
import os
import platform
import signal
import socket
import statistics
import struct
import subprocess
import sys
import threading
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LISTEN = "127.0.0.1"
TARGET = "127.0.0.2"
BIG = 4 << 20


def wait_for(what, timeout, cond, interval=0.005):
    deadline = time.monotonic() + timeout
    while True:
        v = cond()
        if v:
            return v
        if time.monotonic() > deadline:
            raise SystemExit("timed out waiting for " + what)
        time.sleep(interval)


def free_port():
    """A port free for TCP and UDP on both addresses."""
    while True:
        s = socket.socket()
        s.bind((LISTEN, 0))
        port = s.getsockname()[1]
        s.close()
        try:
            for ip in (LISTEN, TARGET):
                for kind in (socket.SOCK_STREAM, socket.SOCK_DGRAM):
                    t = socket.socket(socket.AF_INET, kind)
                    t.bind((ip, port))
                    t.close()
            return port
        except OSError:
            continue


def bound(proto, port):
    """Whether something listens (tcp) or is bound (udp) on LISTEN:port, from /proc/net."""
    want = "%08X:%04X" % (struct.unpack("<I", socket.inet_aton(LISTEN))[0], port)
    with open("/proc/net/" + proto) as f:
        for line in f.readlines()[1:]:
            parts = line.split()
            if parts[1] == want and (proto == "udp" or parts[3] == "0A"):
                return True
    return False


# ---------------------------------------------------------------- servers (their own process)

def tcp_sink(port):
    srv = socket.create_server((TARGET, port), backlog=64)

    def serve(c):
        buf = bytearray(BIG)
        view = memoryview(buf)
        total = 0
        while True:
            n = c.recv_into(view)
            if not n:
                break
            total += n
        try:
            c.sendall(struct.pack("!Q", total))
        except OSError:
            pass
        c.close()

    while True:
        c, _ = srv.accept()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, BIG)
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def tcp_echo(port):
    srv = socket.create_server((TARGET, port), backlog=64)

    def serve(c):
        c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        recv, send = c.recv, c.sendall
        while True:
            d = recv(65536)
            if not d:
                break
            send(d)
        c.close()

    while True:
        c, _ = srv.accept()
        threading.Thread(target=serve, args=(c,), daemon=True).start()


def udp_echo(port):
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.bind((TARGET, port))
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    buf = bytearray(65536)
    recvfrom_into, sendto = s.recvfrom_into, s.sendto
    view = memoryview(buf)
    while True:
        n, peer = recvfrom_into(buf)
        sendto(view[:n], peer)


def servers(ports):
    def main():
        for fn, port in ((tcp_sink, ports["sink"]), (tcp_echo, ports["echo"])):
            threading.Thread(target=fn, args=(port,), daemon=True).start()
        udp_echo(ports["udp"])

    p = multiprocessing.get_context("fork").Process(target=main, daemon=True)
    p.start()
    wait_for("the servers", 10, lambda: all(
        port_open(TARGET, ports[k]) for k in ("sink", "echo")))
    return p


def port_open(ip, port):
    try:
        socket.create_connection((ip, port), timeout=1).close()
        return True
    except OSError:
        return False


# ---------------------------------------------------------------- forwarders

class Forwarders:
    """ci-runner and both socat setups, all running at once on their own listening ports, so
    that every measurement can interleave the paths and drift on the machine hits all alike."""

    def __init__(self, binary, ports):
        self.procs = []
        env = {"FORWARD_HOST": TARGET, "FORWARD_PORTS": "%d %d %d/udp" % (ports["sink"], ports["echo"], ports["udp"]),
               "RUST_LOG": "warn", "PATH": "/usr/bin:/bin"}
        self.start([binary, "forward"], env)
        self.listen = {"ci-runner": dict(ports)}
        # Whose CPU time a throughput run costs: ci-runner, or the socat serving the sink port
        # (its forked children's time reaches it when they exit, at the end of each run).
        self.sink_pid = {"ci-runner": self.procs[0].pid}
        for name, extra in (("socat", []), ("socat -b 65536", ["-b", "65536"])):
            mine = {"sink": free_port(), "echo": free_port(), "udp": free_port()}
            for k in ("sink", "echo"):
                self.start(["socat"] + extra + ["TCP-LISTEN:%d,bind=%s,reuseaddr,fork" % (mine[k], LISTEN),
                                                "TCP:%s:%d" % (TARGET, ports[k])])
                if k == "sink":
                    self.sink_pid[name] = self.procs[-1].pid
            if not extra:
                self.start(["socat", "UDP-LISTEN:%d,bind=%s,reuseaddr,fork" % (mine["udp"], LISTEN),
                            "UDP:%s:%d" % (TARGET, ports["udp"])])
            self.listen[name] = mine
        wait_for("the forwarders to listen", 10, lambda: all(
            bound("tcp", p["sink"]) and bound("tcp", p["echo"]) for p in self.listen.values())
            and bound("udp", ports["udp"]) and bound("udp", self.listen["socat"]["udp"]))

    def start(self, argv, env=None):
        self.procs.append(subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                           start_new_session=True))

    def pid(self):
        return self.procs[0].pid

    def close(self):
        for p in self.procs:
            try:
                os.killpg(p.pid, signal.SIGTERM)
            except OSError:
                pass
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                os.killpg(p.pid, signal.SIGKILL)
                p.wait()


# ---------------------------------------------------------------- measurements

def throughput(ip, port, nbytes):
    """MiB/s for streaming nbytes to the sink, until it confirms it read them all."""
    data = memoryview(bytearray(BIG))
    s = socket.socket()
    s.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, BIG)
    t0 = time.perf_counter()
    s.connect((ip, port))
    left = nbytes
    while left > 0:
        n = min(left, BIG)
        s.sendall(data[:n])
        left -= n
    s.shutdown(socket.SHUT_WR)
    got = b""
    while len(got) < 8:
        d = s.recv(8 - len(got))
        if not d:
            raise SystemExit("the sink closed without a count")
        got += d
    t1 = time.perf_counter()
    s.close()
    total = struct.unpack("!Q", got)[0]
    if total != nbytes:
        raise SystemExit("sink read %d of %d bytes" % (total, nbytes))
    return nbytes / (1 << 20) / (t1 - t0)


CHUNK = 500


def round_trips(paths, n, udp=False):
    """n 64-byte ping-pongs per path over one connection (or UDP socket) each, taken in turns
    of CHUNK per path; every round trip's time in microseconds, per path."""
    socks = {}
    for name, addr in paths.items():
        if udp:
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.connect(addr)
            s.settimeout(5)
        else:
            s = socket.create_connection(addr)
            s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        socks[name] = s
    msg = b"x" * 64
    clock = time.perf_counter_ns
    samples = {name: [] for name in paths}
    for chunk in range(-1, n // CHUNK):  # chunk -1 warms up: caches, sessions, socat's fork
        for name, s in socks.items():
            send, recv, out = s.send, s.recv, samples[name]
            for _ in range(CHUNK):
                t = clock()
                send(msg)
                got = len(recv(64))
                while got < 64:
                    got += len(recv(64 - got))
                if chunk >= 0:
                    out.append((clock() - t) / 1000)
    for s in socks.values():
        s.close()
    return samples


def udp_rate(ip, port, total, window):
    """Echoed datagrams per second with `window` in flight, and how many were lost."""
    s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
    s.connect((ip, port))
    s.settimeout(0.2)
    msg = b"u" * 64
    send, recv = s.send, s.recv
    # Warm-up: opens the session (ci-runner) or forks the child (socat).
    for _ in range(100):
        send(msg)
        recv(2048)
    sent = received = lost = 0
    t0 = time.perf_counter()
    while received + lost < total:
        while sent < total and sent - received - lost < window:
            send(msg)
            sent += 1
        try:
            recv(2048)
            received += 1
        except socket.timeout:
            lost = sent - received
    t1 = time.perf_counter()
    s.close()
    return received / (t1 - t0), lost


def cpu_seconds(pid):
    """User + system time of pid and its reaped children."""
    with open("/proc/%d/stat" % pid) as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return sum(int(x) for x in fields[11:15]) / os.sysconf("SC_CLK_TCK")


# ---------------------------------------------------------------- report

def med(xs):
    return statistics.median(xs)


def pct(xs, q):
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(len(xs) * q))]


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bin", default=os.path.join(ROOT, "target", "release", "ci-runner"))
    ap.add_argument("--runs", type=int, default=5)
    ap.add_argument("--bytes", type=int, default=2 << 30)
    ap.add_argument("--round-trips", type=int, default=20000)
    ap.add_argument("--datagrams", type=int, default=200000)
    ap.add_argument("--window", type=int, default=32)
    args = ap.parse_args()
    if not os.access(args.bin, os.X_OK):
        raise SystemExit("no binary at %s: run cargo build --release, or pass --bin" % args.bin)

    ports = {"sink": free_port(), "echo": free_port(), "udp": free_port()}
    srv = servers(ports)
    fwd = Forwarders(args.bin, ports)
    names = ["direct", "ci-runner", "socat", "socat -b 65536"]
    udp_names = names[:3]

    def addr(name, kind):
        if name == "direct":
            return (TARGET, ports[kind])
        return (LISTEN, fwd.listen[name][kind])

    try:
        tp = {k: [] for k in names}
        cpu = {k: 0.0 for k in names[1:]}
        for run in range(args.runs):
            print("throughput run %d/%d" % (run + 1, args.runs), file=sys.stderr)
            for k in names:
                before = cpu_seconds(fwd.sink_pid[k]) if k in cpu else 0
                tp[k].append(throughput(*addr(k, "sink"), args.bytes))
                if k in cpu:
                    # socat's child is reaped just after the sink's answer: wait for its time.
                    wait_for("the forwarder's CPU time", 5, lambda: k == "ci-runner" or not children(fwd.sink_pid[k]))
                    cpu[k] += cpu_seconds(fwd.sink_pid[k]) - before
        print("TCP round trips", file=sys.stderr)
        lat = round_trips({k: addr(k, "echo") for k in names}, args.round_trips)
        pps = {k: [] for k in udp_names}
        lost = {k: 0 for k in udp_names}
        for run in range(args.runs):
            print("UDP run %d/%d" % (run + 1, args.runs), file=sys.stderr)
            for k in udp_names:
                r, n = udp_rate(*addr(k, "udp"), args.datagrams, args.window)
                pps[k].append(r)
                lost[k] += n
        print("UDP round trips", file=sys.stderr)
        udp_lat = round_trips({k: addr(k, "udp") for k in udp_names}, args.round_trips, udp=True)
        rss = 0
        with open("/proc/%d/status" % fwd.pid()) as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
    finally:
        fwd.close()
        srv.terminate()

    direct = med(lat["direct"])
    print("Machine: %s, %d cores, kernel %s. Python %s, %s." % (
        cpu_model(), os.cpu_count(), platform.release(), platform.python_version(),
        subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout.splitlines()[1].strip()))
    print("Command: python3 bench/forward.py %s" % " ".join(sys.argv[1:]))
    print("%d throughput runs of %d MiB; %d TCP and %d UDP round trips per path, interleaved in turns of %d; "
          "%d UDP runs of %d datagrams, %d in flight. ci-runner forward's RSS at the end: %.1f MiB.\n" % (
              args.runs, args.bytes >> 20, args.round_trips, args.round_trips, CHUNK, args.runs, args.datagrams,
              args.window, rss / 1024))
    gib = args.runs * args.bytes / (1 << 30)
    print("| Path | TCP MiB/s, median (min-max) | forwarder CPU s per GiB | TCP round trip µs, median / p99 | added µs | "
          "UDP datagrams/s, %d in flight | UDP round trip µs, median / p99 | UDP lost |" % args.window)
    print("|---|---|---|---|---|---|---|---|")
    for k in names:
        added = "—" if k == "direct" else "%.1f" % (med(lat[k]) - direct)
        if k in udp_names:
            u = ("%.0f" % med(pps[k]), "%.1f / %.1f" % (med(udp_lat[k]), pct(udp_lat[k], 0.99)), str(lost[k]))
        else:
            u = ("—", "—", "—")
        c = "—" if k == "direct" else "%.2f" % (cpu[k] / gib)
        print("| %s | %.0f (%.0f-%.0f) | %s | %.1f / %.1f | %s | %s | %s | %s |" % (
            k, med(tp[k]), min(tp[k]), max(tp[k]), c, med(lat[k]), pct(lat[k], 0.99), added, *u))

    best = max(med(tp["socat"]), med(tp["socat -b 65536"]))
    added = med(lat["ci-runner"]) - direct
    bars = [
        ("TCP throughput >= 90%% of socat's best (%.0f MiB/s)" % best, med(tp["ci-runner"]) >= 0.9 * best,
         "%.0f MiB/s, %.0f%%" % (med(tp["ci-runner"]), 100 * med(tp["ci-runner"]) / best)),
        ("added TCP round-trip latency < 50 µs (median)", added < 50,
         "%.1f µs (socat %.1f µs)" % (added, med(lat["socat"]) - direct)),
        ("UDP datagrams/s >= socat's (%d in flight)" % args.window, med(pps["ci-runner"]) >= med(pps["socat"]),
         "%.0f%%" % (100 * med(pps["ci-runner"]) / med(pps["socat"]))),
    ]
    print("\n| Bar | Measured | Pass |\n|---|---|---|")
    for what, ok, figure in bars:
        print("| %s | %s | %s |" % (what, figure, "yes" if ok else "**no**"))
    print("\nFor information: UDP ping-pong (one datagram in flight) through ci-runner takes %.0f%% of socat's "
          "median round trip; TCP bulk costs ci-runner %.0f%% of the CPU per GiB of socat -b 65536." % (
              100 * med(udp_lat["ci-runner"]) / med(udp_lat["socat"]), 100 * cpu["ci-runner"] / cpu["socat -b 65536"]))
    sys.exit(0 if all(ok for _, ok, _ in bars) else 1)


def children(pid):
    try:
        with open("/proc/%d/task/%d/children" % (pid, pid)) as f:
            return f.read().split()
    except OSError:
        return []


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
