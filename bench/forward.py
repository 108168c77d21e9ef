#!/usr/bin/python3
"""Port-forward benchmarks: `ci-runner forward` against socat, side by side in one run.

    cargo build --release && python3 bench/forward.py [--bin PATH] [--runs N]

Both forwarders listen on 127.0.0.1:P and forward to 127.0.0.2:P, where this script's own
servers run (in a separate process): a TCP sink, a TCP echo and a UDP echo. Each run starts
ci-runner, measures, stops it, then does the same with socat, so drift hits both alike.

1. TCP throughput: one connection streams --bytes (2 GiB) to the sink, which answers with the
   count once it has read everything; MiB/s over that whole time. Both ends use 4 MiB buffers
   (one syscall moves megabytes), so Python is not the bottleneck: the direct figure shows it.
2. Added latency: --round-trips 64-byte ping-pongs over one TCP_NODELAY connection; the median
   round trip through the forward minus the median direct one, in the same run.
3. UDP packets/s: --datagrams 64-byte datagrams echoed, with --window in flight; and a
   ping-pong (one in flight) rate. A lost datagram (200 ms timeout) is counted and refilled.

socat commands (its best fair setup; see BENCHMARKS.md):
    socat TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.2:P        (default 8 KiB buffer)
    socat -b 65536 TCP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork TCP:127.0.0.2:P (same buffer as ours)
    socat UDP-LISTEN:P,bind=127.0.0.1,reuseaddr,fork UDP:127.0.0.2:P
UDP-LISTEN with fork gives each client a child with its own connected sockets, the same model
as ci-runner's sessions; UDP-RECVFROM,fork would fork once per datagram.
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

class Forwarder:
    def __init__(self, name, argvs, env=None, ready=None):
        self.name, self.argvs, self.env, self.ready = name, argvs, env, ready
        self.procs = []

    def __enter__(self):
        for argv in self.argvs:
            self.procs.append(subprocess.Popen(argv, env=self.env, stdout=subprocess.DEVNULL,
                                               stderr=subprocess.DEVNULL, start_new_session=True))
        wait_for(self.name + " to listen", 10, self.ready)
        return self

    def __exit__(self, *exc):
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


def ours(binary, ports):
    env = {"FORWARD_HOST": TARGET, "FORWARD_PORTS": "%d %d %d/udp" % (ports["sink"], ports["echo"], ports["udp"]),
           "RUST_LOG": "warn", "PATH": "/usr/bin:/bin"}
    return Forwarder("ci-runner forward", [[binary, "forward"]], env, ready=lambda: all_bound(ports))


def socat(ports, buf=None):
    b = ["-b", str(buf)] if buf else []
    argvs = [["socat"] + b + ["TCP-LISTEN:%d,bind=%s,reuseaddr,fork" % (ports[k], LISTEN), "TCP:%s:%d" % (TARGET, ports[k])]
             for k in ("sink", "echo")]
    argvs.append(["socat", "UDP-LISTEN:%d,bind=%s,reuseaddr,fork" % (ports["udp"], LISTEN),
                  "UDP:%s:%d" % (TARGET, ports["udp"])])
    return Forwarder("socat" + (" -b %d" % buf if buf else ""), argvs, ready=lambda: all_bound(ports))


def all_bound(ports):
    return bound("tcp", ports["sink"]) and bound("tcp", ports["echo"]) and bound("udp", ports["udp"])


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


def latency(ip, port, n):
    """Median and p99 of n 64-byte round trips over one connection, in microseconds."""
    s = socket.create_connection((ip, port))
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    msg = b"x" * 64
    send, recv, clock = s.sendall, s.recv, time.perf_counter_ns
    for _ in range(500):  # warm-up: caches, the forward's first-connection work
        send(msg)
        got = 0
        while got < 64:
            got += len(recv(64 - got))
    samples = [0] * n
    for i in range(n):
        t = clock()
        send(msg)
        got = len(recv(64))
        while got < 64:
            got += len(recv(64 - got))
        samples[i] = clock() - t
    s.close()
    samples.sort()
    return samples[n // 2] / 1000, samples[n * 99 // 100] / 1000


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


# ---------------------------------------------------------------- report

def med(xs):
    return statistics.median(xs)


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
    names = ["direct", "ci-runner", "socat", "socat -b 65536"]
    tp = {k: [] for k in names}
    lat = {k: [] for k in names}
    p99 = {k: [] for k in names}
    pps = {k: [] for k in names if k != "socat -b 65536"}
    pingpong = {k: [] for k in pps}
    lost = {k: 0 for k in pps}

    def measure(name, ip):
        tp[name].append(throughput(ip, ports["sink"], args.bytes))
        m, p = latency(ip, ports["echo"], args.round_trips)
        lat[name].append(m)
        p99[name].append(p)
        if name in pps:
            r, l = udp_rate(ip, ports["udp"], args.datagrams, args.window)
            pps[name].append(r)
            lost[name] += l
            r, l = udp_rate(ip, ports["udp"], args.round_trips, 1)
            pingpong[name].append(r)
            lost[name] += l

    for run in range(args.runs):
        print("run %d/%d" % (run + 1, args.runs), file=sys.stderr)
        measure("direct", TARGET)
        with ours(args.bin, ports):
            measure("ci-runner", LISTEN)
        with socat(ports):
            measure("socat", LISTEN)
        with socat(ports, 65536):
            measure("socat -b 65536", LISTEN)
    srv.terminate()

    direct_lat = med(lat["direct"])
    print("Machine: %s, %d cores, kernel %s. Python %s, %s." % (
        cpu_model(), os.cpu_count(), platform.release(), platform.python_version(),
        subprocess.run(["socat", "-V"], capture_output=True, text=True).stdout.splitlines()[1].strip()))
    print("Command: python3 bench/forward.py %s" % " ".join(sys.argv[1:]))
    print("%d runs; %d MiB per throughput run; %d round trips; %d datagrams (window %d) and %d ping-pongs per UDP run.\n" % (
        args.runs, args.bytes >> 20, args.round_trips, args.datagrams, args.window, args.round_trips))
    print("| Path | TCP MiB/s (median, min-max) | round trip µs (median / p99) | added µs | UDP datagrams/s, window %d | UDP ping-pong /s | UDP lost |" % args.window)
    print("|---|---|---|---|---|---|---|")
    for k in names:
        added = "—" if k == "direct" else "%.1f" % (med(lat[k]) - direct_lat)
        u = ("%.0f" % med(pps[k]), "%.0f" % med(pingpong[k]), str(lost[k])) if k in pps else ("—", "—", "—")
        print("| %s | %.0f (%.0f-%.0f) | %.1f / %.1f | %s | %s | %s | %s |" % (
            k, med(tp[k]), min(tp[k]), max(tp[k]), med(lat[k]), med(p99[k]), added, *u))

    best_socat = max(med(tp["socat"]), med(tp["socat -b 65536"]))
    added = med(lat["ci-runner"]) - direct_lat
    bars = [
        ("TCP throughput >= 90%% of socat's best (%.0f MiB/s)" % best_socat, med(tp["ci-runner"]) >= 0.9 * best_socat,
         "%.0f%%" % (100 * med(tp["ci-runner"]) / best_socat)),
        ("added latency < 50 µs (median)", added < 50, "%.1f µs (socat %.1f µs)" % (added, med(lat["socat"]) - direct_lat)),
        ("UDP datagrams/s >= socat's (window %d)" % args.window, med(pps["ci-runner"]) >= med(pps["socat"]),
         "%.0f%%" % (100 * med(pps["ci-runner"]) / med(pps["socat"]))),
        ("UDP ping-pong/s >= socat's", med(pingpong["ci-runner"]) >= med(pingpong["socat"]),
         "%.0f%%" % (100 * med(pingpong["ci-runner"]) / med(pingpong["socat"]))),
    ]
    print("\n| Bar | Measured | Pass |\n|---|---|---|")
    for what, ok, figure in bars:
        print("| %s | %s | %s |" % (what, figure, "yes" if ok else "**no**"))
    sys.exit(0 if all(ok for _, ok, _ in bars) else 1)


def cpu_model():
    with open("/proc/cpuinfo") as f:
        for line in f:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.machine()


if __name__ == "__main__":
    main()
