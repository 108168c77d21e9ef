//! `ci-runner forward`: the real binary forwarding to servers in this test process.
//!
//! Each test has loopback addresses of its own (Linux routes all of 127.0.0.0/8 to `lo`):
//! `127.0.<net>.1` is where the forward listens (`FORWARD_BIND`), `.2` the primary host and `.3`
//! the backup, so tests running in parallel never compete for a port.

use std::collections::HashSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::Duration;

use nix::sys::signal::Signal;

use crate::harness::*;

const READY: Duration = Duration::from_secs(20);
const IO: Duration = Duration::from_secs(20);

struct Net(u8);

impl Net {
    fn bind(&self) -> String {
        format!("127.0.{}.1", self.0)
    }
    fn primary(&self) -> String {
        format!("127.0.{}.2", self.0)
    }
    fn backup(&self) -> String {
        format!("127.0.{}.3", self.0)
    }
    /// A port that is free on the forward's address.
    fn tcp_port(&self) -> u16 {
        TcpListener::bind((self.bind().as_str(), 0)).unwrap().local_addr().unwrap().port()
    }
    fn udp_port(&self) -> u16 {
        UdpSocket::bind((self.bind().as_str(), 0)).unwrap().local_addr().unwrap().port()
    }
    fn at(&self, ip: &str, port: u16) -> SocketAddr {
        format!("{ip}:{port}").parse().unwrap()
    }
}

/// `ci-runner forward` with the given settings, once it says it is forwarding.
fn forward(bind: &str, hosts: &str, ports: &str, extra: &[(&str, &str)]) -> Supervisor {
    let mut cmd = Command::new(bin());
    cmd.arg("forward")
        .env_clear()
        .env("PATH", "/usr/bin:/bin")
        .env("RUST_LOG", "ci_runner=debug")
        .env("FORWARD_BIND", bind)
        .env("FORWARD_HOST", hosts)
        .env("FORWARD_PORTS", ports);
    for (k, v) in extra {
        cmd.env(k, v);
    }
    let fwd = Supervisor::from_command(cmd, String::new());
    fwd.wait_log("Forwarding until SIGTERM or SIGINT.", READY);
    fwd
}

/// A TCP server on `addr` running `handle` on a thread per connection; counts connections.
fn tcp_server(addr: SocketAddr, handle: impl Fn(TcpStream) + Send + Sync + 'static) -> Arc<AtomicUsize> {
    let listener = TcpListener::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let accepted = Arc::new(AtomicUsize::new(0));
    let count = accepted.clone();
    let handle = Arc::new(handle);
    std::thread::spawn(move || {
        for stream in listener.incoming().map_while(Result::ok) {
            count.fetch_add(1, Ordering::SeqCst);
            let handle = handle.clone();
            std::thread::spawn(move || handle(stream));
        }
    });
    accepted
}

/// Echoes until the client's end of stream, then ends its own.
fn echo(mut stream: TcpStream) {
    let mut reader = stream.try_clone().unwrap();
    let _ = std::io::copy(&mut reader, &mut stream);
    let _ = stream.shutdown(Shutdown::Write);
}

fn connect(addr: SocketAddr) -> TcpStream {
    let s = TcpStream::connect(addr).unwrap_or_else(|e| panic!("connect {addr}: {e}"));
    s.set_read_timeout(Some(IO)).unwrap();
    s.set_write_timeout(Some(IO)).unwrap();
    s
}

/// Sends `payload`, ends the stream, and returns everything that came back.
fn round_trip(addr: SocketAddr, payload: Vec<u8>) -> Vec<u8> {
    let mut s = connect(addr);
    let mut w = s.try_clone().unwrap();
    let writer = std::thread::spawn(move || {
        w.write_all(&payload).unwrap();
        w.shutdown(Shutdown::Write).unwrap();
    });
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap_or_else(|e| panic!("read from {addr} after {} bytes: {e}", out.len()));
    writer.join().unwrap();
    out
}

fn pattern(seed: usize, len: usize) -> Vec<u8> {
    (0..len).map(|i| ((i * 31 + seed * 7) % 251) as u8).collect()
}

#[test]
fn tcp_round_trip_with_half_close_each_way_then_sigterm_exits_0() {
    let net = Net(41);
    let (echo_port, up_port, down_port) = (net.tcp_port(), net.tcp_port(), net.tcp_port());
    tcp_server(net.at(&net.primary(), echo_port), echo);
    // Reads to the client's end of stream, then answers: the answer must still get through.
    tcp_server(net.at(&net.primary(), up_port), |mut s| {
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        s.write_all(format!("got {} bytes", got.len()).as_bytes()).unwrap();
    });
    // Ends its stream first, then reads what the client still sends.
    let (tx, rx) = mpsc::channel();
    let tx = Mutex::new(tx);
    tcp_server(net.at(&net.primary(), down_port), move |mut s| {
        s.write_all(b"hello").unwrap();
        s.shutdown(Shutdown::Write).unwrap();
        let mut got = Vec::new();
        s.read_to_end(&mut got).unwrap();
        tx.lock().unwrap().send(got.len()).unwrap();
    });
    let mut fwd = forward(
        &net.bind(),
        &format!("{}:10022", net.primary()),
        &format!("{echo_port} {up_port}/tcp {down_port}/TCP"),
        &[],
    );
    assert_eq!(fwd.count("Forwarding."), 3, "one INFO line per forward");

    let payload = pattern(1, 1 << 20);
    assert!(round_trip(net.at(&net.bind(), echo_port), payload.clone()) == payload, "echo through the forward differs");

    let answer = round_trip(net.at(&net.bind(), up_port), vec![7; 100_000]);
    assert_eq!(String::from_utf8_lossy(&answer), "got 100000 bytes");

    let mut s = connect(net.at(&net.bind(), down_port));
    let mut greeting = Vec::new();
    s.read_to_end(&mut greeting).unwrap();
    assert_eq!(greeting, b"hello");
    s.write_all(&[1; 50_000]).unwrap();
    s.shutdown(Shutdown::Write).unwrap();
    assert_eq!(rx.recv_timeout(IO).expect("the server to see the client's end of stream"), 50_000);

    fwd.signal(Signal::SIGTERM);
    let status = fwd.wait_exit(IO);
    assert_eq!(status.code(), Some(0), "{}", fwd.log());
    assert!(fwd.log_has("Forwards stopped."));
    assert!(TcpStream::connect(net.at(&net.bind(), echo_port)).is_err(), "still listening after the stop");
}

#[test]
fn tcp_fails_over_to_the_backup_at_once_and_back_when_the_primary_returns() {
    let net = Net(42);
    let port = net.tcp_port();
    let backup = tcp_server(net.at(&net.backup(), port), echo);
    let fwd = forward(&net.bind(), &format!("{}:1 {}:2", net.primary(), net.backup()), &port.to_string(), &[]);
    let addr = net.at(&net.bind(), port);

    for i in 0..3 {
        assert_eq!(round_trip(addr, pattern(i, 1000)), pattern(i, 1000));
    }
    assert_eq!(backup.load(Ordering::SeqCst), 3);
    // Warned once, not on every connection (the log is read through a pipe: wait for it).
    wait_for("the failover warning in the log", IO, || {
        fwd.log_has("Host unavailable; trying the next one.").then_some(())
    });
    assert_eq!(fwd.count("Host unavailable; trying the next one."), 1, "{}", fwd.log());
    let log = fwd.log();
    let warning = log.lines().find(|l| l.contains("Host unavailable")).unwrap();
    assert!(warning.contains("WARN") && warning.contains(&net.primary()), "{warning}");

    let primary = tcp_server(net.at(&net.primary(), port), echo);
    assert_eq!(round_trip(addr, pattern(9, 1000)), pattern(9, 1000));
    assert_eq!(primary.load(Ordering::SeqCst), 1, "the primary took the next connection");
    assert_eq!(backup.load(Ordering::SeqCst), 3);
    wait_for("\"Host answers again.\" in the log", IO, || fwd.log_has("Host answers again.").then_some(()));
}

#[test]
fn tcp_backup_spec_prefers_the_last_host() {
    let net = Net(43);
    let port = net.tcp_port();
    let primary = tcp_server(net.at(&net.primary(), port), echo);
    let backup = tcp_server(net.at(&net.backup(), port), echo);
    let _fwd = forward(&net.bind(), &format!("{} {}", net.primary(), net.backup()), &format!("{port}/tcp-backup"), &[]);
    assert_eq!(round_trip(net.at(&net.bind(), port), b"x".to_vec()), b"x");
    assert_eq!((primary.load(Ordering::SeqCst), backup.load(Ordering::SeqCst)), (0, 1));
}

#[test]
fn two_hundred_concurrent_tcp_connections_each_echo_64_kib_intact() {
    let net = Net(44);
    let port = net.tcp_port();
    let accepted = tcp_server(net.at(&net.primary(), port), echo);
    let _fwd = forward(&net.bind(), &net.primary(), &port.to_string(), &[]);
    let addr = net.at(&net.bind(), port);
    let clients: Vec<_> = (0..200)
        .map(|i| std::thread::spawn(move || round_trip(addr, pattern(i, 64 * 1024)) == pattern(i, 64 * 1024)))
        .collect();
    let intact = clients.into_iter().map(|c| c.join().unwrap()).filter(|ok| *ok).count();
    assert_eq!(intact, 200);
    assert_eq!(accepted.load(Ordering::SeqCst), 200);
}

#[test]
fn a_host_that_resets_mid_transfer_ends_only_that_connection() {
    let net = Net(49);
    let (reset_port, echo_port) = (net.tcp_port(), net.tcp_port());
    // Reads a little, then closes with unread data: the kernel answers with RST while the
    // forward splices into the socket (ECONNRESET or EPIPE; SIGPIPE would kill it).
    tcp_server(net.at(&net.primary(), reset_port), |mut s| {
        let mut first = [0u8; 1];
        let _ = s.read_exact(&mut first);
    });
    tcp_server(net.at(&net.primary(), echo_port), echo);
    let fwd = forward(&net.bind(), &net.primary(), &format!("{reset_port} {echo_port}"), &[]);
    for _ in 0..3 {
        let mut s = connect(net.at(&net.bind(), reset_port));
        let chunk = vec![5u8; 1 << 20];
        // Bulk, so the forward splices; the upload fails somewhere once the host resets.
        for _ in 0..64 {
            if s.write_all(&chunk).is_err() {
                break;
            }
        }
    }
    let payload = pattern(3, 1 << 20);
    assert!(round_trip(net.at(&net.bind(), echo_port), payload.clone()) == payload);
    wait_for("\"Connection ended with an error.\" in the log", IO, || {
        fwd.log_has("Connection ended with an error.").then_some(())
    });
}

/// A UDP echo server on `addr`; records the peers (the forward's upstream sockets) it saw.
fn udp_echo(addr: SocketAddr) -> Arc<Mutex<HashSet<SocketAddr>>> {
    let socket = UdpSocket::bind(addr).unwrap_or_else(|e| panic!("bind {addr}: {e}"));
    let peers = Arc::new(Mutex::new(HashSet::new()));
    let seen = peers.clone();
    std::thread::spawn(move || {
        let mut buf = [0u8; 65536];
        while let Ok((n, peer)) = socket.recv_from(&mut buf) {
            seen.lock().unwrap().insert(peer);
            let _ = socket.send_to(&buf[..n], peer);
        }
    });
    peers
}

/// Sends `msg` once and waits for the same bytes to come back: loopback does not drop
/// datagrams, so neither may the forward, not even a new session's first one.
fn udp_round_trip(client: &UdpSocket, to: SocketAddr, msg: &[u8]) {
    client.set_read_timeout(Some(IO)).unwrap();
    client.send_to(msg, to).unwrap();
    let mut buf = [0u8; 65536];
    let (n, from) = client
        .recv_from(&mut buf)
        .unwrap_or_else(|e| panic!("no echo of {:?} within {IO:?}: {e}", String::from_utf8_lossy(msg)));
    assert_eq!(from, to, "the reply must come from the forward's port");
    assert_eq!(&buf[..n], msg, "got another datagram than this client's own");
}

#[test]
fn udp_clients_get_their_own_replies_and_idle_sessions_end() {
    let net = Net(45);
    let port = net.udp_port();
    let peers = udp_echo(net.at(&net.primary(), port));
    let fwd = forward(&net.bind(), &net.primary(), &format!("{port}/udp"), &[("FORWARD_UDP_IDLE_SEC", "1")]);
    let to = net.at(&net.bind(), port);
    let a = UdpSocket::bind("127.0.0.1:0").unwrap();
    let b = UdpSocket::bind("127.0.0.1:0").unwrap();
    for i in 0..50 {
        udp_round_trip(&a, to, format!("client-a {i}").as_bytes());
        udp_round_trip(&b, to, format!("client-b {i}").as_bytes());
    }
    // Both in flight at once: each reply goes to its own client.
    a.send_to(b"client-a both", to).unwrap();
    udp_round_trip(&b, to, b"client-b both");
    let mut buf = [0u8; 64];
    let (n, _) = a.recv_from(&mut buf).unwrap();
    assert_eq!(&buf[..n], b"client-a both");
    assert_eq!(peers.lock().unwrap().len(), 2, "one upstream socket per client");

    wait_for("both sessions to end after 1 s idle", IO, || (fwd.count("Session closed.") >= 2).then_some(()));
    udp_round_trip(&a, to, b"client-a again");
    assert_eq!(peers.lock().unwrap().len(), 3, "a new session after the idle timeout");
}

#[test]
fn udp_moves_to_the_backup_when_the_primary_refuses() {
    let net = Net(46);
    let port = net.udp_port();
    // Nothing listens on the primary: the kernel answers with ICMP port unreachable.
    let backup = udp_echo(net.at(&net.backup(), port));
    let fwd = forward(&net.bind(), &format!("{} {}", net.primary(), net.backup()), &format!("{port}/udp"), &[]);
    let client = UdpSocket::bind("127.0.0.1:0").unwrap();
    let to = net.at(&net.bind(), port);
    udp_round_trip(&client, to, b"statsd-ish 1");
    udp_round_trip(&client, to, b"statsd-ish 2");
    assert_eq!(backup.lock().unwrap().len(), 1);
    wait_for("the failover warning in the log", IO, || {
        fwd.log_has("Host unavailable; trying the next one.").then_some(())
    });
    assert_eq!(fwd.count("Host unavailable; trying the next one."), 1, "{}", fwd.log());
}

#[test]
fn bad_forward_ports_exit_3_naming_the_variable() {
    let mut cmd = Command::new(bin());
    cmd.arg("forward")
        .env_clear()
        .env("FORWARD_HOST", "127.0.0.2")
        .env("FORWARD_PORTS", "15432 abc/tcp 70000 22/sctp")
        .env("FORWARD_BIND", "127.0.47.1")
        .env("LOG_FORMAT", "xml");
    let mut fwd = Supervisor::from_command(cmd, String::new());
    let status = fwd.wait_exit(IO);
    assert_eq!(status.code(), Some(3), "{}", fwd.log());
    for needle in ["FORWARD_PORTS=\"abc/tcp\"", "FORWARD_PORTS=\"70000\"", "FORWARD_PORTS=\"22/sctp\"", "N/tcp-backup"]
    {
        assert!(fwd.log_has(needle), "no {needle:?} in:\n{}", fwd.log());
    }

    let mut cmd = Command::new(bin());
    cmd.arg("forward").env_clear().env("FORWARD_PORTS", "15432");
    let mut fwd = Supervisor::from_command(cmd, String::new());
    assert_eq!(fwd.wait_exit(IO).code(), Some(3));
    assert!(fwd.log_has("FORWARD_HOST: expected"), "{}", fwd.log());
}

#[test]
fn a_port_in_use_fails_the_start() {
    let net = Net(48);
    let taken = TcpListener::bind((net.bind().as_str(), 0)).unwrap();
    let port = taken.local_addr().unwrap().port();
    let mut cmd = Command::new(bin());
    cmd.arg("forward")
        .env_clear()
        .env("FORWARD_HOST", net.primary())
        .env("FORWARD_PORTS", port.to_string())
        .env("FORWARD_BIND", net.bind());
    let mut fwd = Supervisor::from_command(cmd, String::new());
    assert_eq!(fwd.wait_exit(IO).code(), Some(1), "{}", fwd.log());
    assert!(fwd.log_has(&format!("{}:{port}/tcp", net.bind())) && fwd.log_has("in use"), "{}", fwd.log());
}
