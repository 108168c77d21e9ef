//! Port forwards: `127.0.0.1:N` in the container to port N on the central host, as the original
//! image's `09-forward` hook set up with haproxy (TCP) and rinetd (UDP) (reference §6).
//!
//! - `FORWARD_HOST` lists hosts, primary first; a `:digits` suffix on each is ignored, as in the
//!   original (`host.docker.internal:10022`). `FORWARD_PORTS` lists `N`, `N/tcp`, `N/tcp-backup`
//!   (tcp with the host list reversed) or `N/udp`.
//! - TCP: every incoming connection tries the hosts in order (resolved at connect time, IPv4
//!   first like haproxy's `resolve-prefer ipv4`); the first that connects wins, so a backup
//!   takes over at once when the primary refuses, and the primary is used again as soon as it
//!   accepts (haproxy needed six health checks 10 s apart either way). Bytes are relayed in both
//!   directions with half-close and `TCP_NODELAY` on both sides: small reads are copied, bulk
//!   transfers move by splice(2) without entering user space.
//! - UDP: one socket on `127.0.0.1:N`; each client address gets a session with its own upstream
//!   socket connected to the host, so replies find their way back; a session ends after an idle
//!   time, and moves to the next host when the current one answers with ICMP port unreachable
//!   (rinetd used the first host only).
//!
//! Everything runs on one dedicated thread with its own current-thread runtime: the
//! supervisor's runtime may block briefly, and must never stall a forwarded byte. [`start`]
//! binds every port before it returns, so "port in use" reaches the caller.
//!
//! Each forward counts its connections and sessions, and its hosts' failures, in
//! [`crate::metrics`] (atomics: nothing on the forwarding thread waits for `/metrics`).

use std::cell::RefCell;
use std::collections::HashMap;
use std::fmt;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd, RawFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt, Interest};
use tokio::net::tcp::{ReadHalf, WriteHalf};
use tokio::net::{TcpListener, TcpSocket, TcpStream, UdpSocket};
use tokio::sync::mpsc;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn, Instrument};

use crate::config::Problem;
use crate::metrics::{self, ForwardCounters};

/// Per-direction copy buffer for TCP; a read that fills it switches the direction to splice(2).
const TCP_BUF: usize = 16 * 1024;
/// Bytes one splice(2) moves at most; the pipe is made this large when the kernel allows.
const PIPE_SIZE: usize = 256 * 1024;
/// The largest UDP payload (65,535 minus the IPv4 and UDP headers).
const UDP_MAX: usize = 65_507;
/// Datagrams queued for one UDP session before new ones are dropped.
const UDP_QUEUE: usize = 1024;
/// Datagrams read from the client socket in one go before other tasks get a turn.
const UDP_BATCH: usize = 64;
/// Pending connections on each TCP listener (many test jobs open connections at once).
const BACKLOG: u32 = 1024;

pub const DEFAULT_CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
pub const DEFAULT_UDP_IDLE: Duration = Duration::from_secs(60);

/// The expected form of `FORWARD_PORTS`, for configuration errors.
pub const PORTS_FORM: &str =
    "space-separated N, N/tcp, N/tcp-backup or N/udp, with N a port 1-65535, e.g. \"15432 18125/udp 10022\"";
/// The expected form of `FORWARD_HOST`, for configuration errors.
pub const HOSTS_FORM: &str = "space-separated host names or IPv4 addresses, primary first, each with an optional \
     :port that is ignored, e.g. \"host.docker.internal:10022 backup.internal\"";

#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Proto {
    Tcp,
    Udp,
}

impl fmt::Display for Proto {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Proto::Tcp => "tcp",
            Proto::Udp => "udp",
        })
    }
}

/// One forwarded port: `<bind>:port` to `port` on the first host that answers, in order.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Forward {
    pub port: u16,
    pub proto: Proto,
    pub hosts: Vec<String>,
}

/// How the forwards listen and give up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Options {
    /// The address every forward listens on: loopback, as the original, unless told otherwise.
    pub bind: IpAddr,
    /// How long one host may take to resolve and accept a TCP connection before the next is tried.
    pub connect_timeout: Duration,
    /// A UDP session with no datagram either way for this long is closed.
    pub udp_idle: Duration,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            bind: IpAddr::V4(Ipv4Addr::LOCALHOST),
            connect_timeout: DEFAULT_CONNECT_TIMEOUT,
            udp_idle: DEFAULT_UDP_IDLE,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ForwardError {
    #[error("failed to listen on {addr}/{proto} (is another process using port {}?)", addr.port())]
    Bind {
        addr: SocketAddr,
        proto: Proto,
        #[source]
        source: io::Error,
    },
    #[error("failed to build the forwarding runtime")]
    Runtime(#[source] io::Error),
    #[error("failed to start the forwarding thread")]
    Thread(#[source] io::Error),
}

fn problem(var: &'static str, value: &str, why: String) -> Problem {
    let form = if var == "FORWARD_HOST" { HOSTS_FORM } else { PORTS_FORM };
    Problem { var, value: Some(value.to_string()), expected: format!("{form}; {why}") }
}

/// `FORWARD_HOST` and `FORWARD_PORTS` as forwards. Both empty means no forwards; one without
/// the other is an error (the original silently forwarded nothing, which left jobs talking to a
/// closed port). Every bad entry is reported.
pub fn parse(forward_host: &str, forward_ports: &str) -> Result<Vec<Forward>, Vec<Problem>> {
    let mut problems = Vec::new();
    let hosts = parse_hosts(forward_host, &mut problems);
    let specs = parse_ports(forward_ports, &mut problems);
    let (no_hosts, no_ports) = (forward_host.trim().is_empty(), forward_ports.trim().is_empty());
    if no_hosts && !no_ports {
        problems.push(Problem {
            var: "FORWARD_HOST",
            value: None,
            expected: format!("the host(s) that FORWARD_PORTS={forward_ports:?} forwards to ({HOSTS_FORM}), or an empty FORWARD_PORTS"),
        });
    }
    if no_ports && !no_hosts {
        problems.push(Problem {
            var: "FORWARD_PORTS",
            value: None,
            expected: format!(
                "the ports to forward to FORWARD_HOST={forward_host:?} ({PORTS_FORM}), or an empty FORWARD_HOST"
            ),
        });
    }
    if !problems.is_empty() {
        return Err(problems);
    }
    Ok(specs
        .into_iter()
        .map(|(port, proto, reversed)| {
            let mut hosts = hosts.clone();
            if reversed {
                hosts.reverse();
            }
            Forward { port, proto, hosts }
        })
        .collect())
}

fn parse_hosts(raw: &str, problems: &mut Vec<Problem>) -> Vec<String> {
    let mut hosts = Vec::new();
    for entry in raw.split_whitespace() {
        // As the original's `sed -E 's/:[0-9]+//g'`: the port is the target's business, not ours.
        let host = match entry.rsplit_once(':') {
            Some((h, p)) if !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit()) => h,
            _ => entry,
        };
        let ok = !host.is_empty()
            && host.len() <= 253
            && host.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.');
        if ok {
            hosts.push(host.to_string());
        } else {
            problems.push(problem("FORWARD_HOST", entry, format!("{host:?} is not a host name")));
        }
    }
    hosts
}

/// `(port, proto, hosts reversed)` per entry.
fn parse_ports(raw: &str, problems: &mut Vec<Problem>) -> Vec<(u16, Proto, bool)> {
    let mut specs: Vec<(u16, Proto, bool)> = Vec::new();
    for entry in raw.split_whitespace() {
        let (num, proto) = entry.split_once('/').unwrap_or((entry, "tcp"));
        let (proto, reversed) = match proto.to_ascii_lowercase().as_str() {
            "tcp" => (Proto::Tcp, false),
            "tcp-backup" => (Proto::Tcp, true),
            "udp" => (Proto::Udp, false),
            other => {
                problems.push(problem("FORWARD_PORTS", entry, format!("unknown protocol {other:?}")));
                continue;
            }
        };
        if num.is_empty() || !num.bytes().all(|b| b.is_ascii_digit()) {
            problems.push(problem("FORWARD_PORTS", entry, format!("{num:?} is not a port number")));
            continue;
        }
        let port = match num.parse::<u16>() {
            Ok(p) if p > 0 => p,
            _ => {
                problems.push(problem("FORWARD_PORTS", entry, format!("{num} is not a port in 1-65535")));
                continue;
            }
        };
        if specs.iter().any(|&(p, pr, _)| p == port && pr == proto) {
            problems.push(problem("FORWARD_PORTS", entry, format!("port {port}/{proto} is listed twice")));
            continue;
        }
        specs.push((port, proto, reversed));
    }
    specs
}

/// The running forwards. [`Forwarder::stop`] (or dropping it) closes every listener, connection
/// and session and joins the thread: it blocks for a moment (at most about a second, when a DNS
/// lookup is in flight), so an async caller should stop it last or from `spawn_blocking`.
#[derive(Debug)]
pub struct Forwarder {
    cancel: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Forwarder {
    pub fn stop(mut self) {
        self.shutdown();
    }

    fn shutdown(&mut self) {
        self.cancel.cancel();
        if let Some(thread) = self.thread.take() {
            if thread.join().is_err() {
                tracing::error!("The forwarding thread panicked.");
            }
        }
    }
}

impl Drop for Forwarder {
    fn drop(&mut self) {
        self.shutdown();
    }
}

enum Bound {
    Tcp(TcpListener),
    Udp(UdpSocket),
}

fn bind_tcp(addr: SocketAddr) -> io::Result<TcpListener> {
    let socket = if addr.is_ipv4() { TcpSocket::new_v4()? } else { TcpSocket::new_v6()? };
    // A restarted forward must not wait for the old connections' TIME_WAIT.
    socket.set_reuseaddr(true)?;
    socket.bind(addr)?;
    socket.listen(BACKLOG)
}

fn bind_udp(addr: SocketAddr) -> io::Result<UdpSocket> {
    let socket = std::net::UdpSocket::bind(addr)?;
    socket.set_nonblocking(true)?;
    UdpSocket::from_std(socket)
}

/// Binds every forward's port, then serves them on a thread of their own until stopped.
pub fn start(forwards: Vec<Forward>, opts: Options) -> Result<Forwarder, ForwardError> {
    let cancel = CancellationToken::new();
    if forwards.is_empty() {
        return Ok(Forwarder { cancel, thread: None });
    }
    let runtime = tokio::runtime::Builder::new_current_thread().enable_all().build().map_err(ForwardError::Runtime)?;
    let mut bound = Vec::with_capacity(forwards.len());
    {
        // Sockets register with the runtime that serves them.
        let _enter = runtime.enter();
        for f in forwards {
            let addr = SocketAddr::new(opts.bind, f.port);
            let socket = match f.proto {
                Proto::Tcp => bind_tcp(addr).map(Bound::Tcp),
                Proto::Udp => bind_udp(addr).map(Bound::Udp),
            }
            .map_err(|source| ForwardError::Bind { addr, proto: f.proto, source })?;
            info!(listen = %addr, proto = %f.proto, hosts = %f.hosts.join(","), "Forwarding.");
            bound.push((f, socket));
        }
    }
    // Every port is bound: the counters show on /metrics (at 0) from now on.
    let bound: Vec<_> =
        bound.into_iter().map(|(f, s)| (f.proto, Arc::new(Target::new(f.hosts, f.port, f.proto, opts)), s)).collect();
    let token = cancel.clone();
    let thread = std::thread::Builder::new()
        .name("forward".into())
        .spawn(move || {
            runtime.block_on(serve(bound, token));
            // A DNS lookup stuck in the blocking pool must not hold up the stop.
            runtime.shutdown_timeout(Duration::from_secs(1));
        })
        .map_err(ForwardError::Thread)?;
    Ok(Forwarder { cancel, thread: Some(thread) })
}

async fn serve(bound: Vec<(Proto, Arc<Target>, Bound)>, cancel: CancellationToken) {
    for (proto, target, socket) in bound {
        let span = tracing::info_span!("forward", port = target.port, proto = %proto);
        match socket {
            Bound::Tcp(l) => tokio::spawn(serve_tcp(l, target, cancel.clone()).instrument(span)),
            Bound::Udp(s) => tokio::spawn(serve_udp(Arc::new(s), target, cancel.clone()).instrument(span)),
        };
    }
    // Returning drops the runtime, and with it every connection and session.
    cancel.cancelled().await;
}

/// Where one forward sends its traffic, and which of its hosts last failed (so a host that
/// stays down is warned about once, not on every connection).
struct Target {
    hosts: Vec<String>,
    port: u16,
    opts: Options,
    down: Vec<AtomicBool>,
    counters: Arc<ForwardCounters>,
}

impl Target {
    fn new(hosts: Vec<String>, port: u16, proto: Proto, opts: Options) -> Self {
        let down = hosts.iter().map(|_| AtomicBool::new(false)).collect();
        let counters = metrics::global().forward(port, proto, &hosts);
        Self { hosts, port, opts, down, counters }
    }

    /// Host `i` failed: WARN the first time, DEBUG while it stays down.
    fn failed(&self, i: usize, error: &io::Error) {
        self.counters.host_failed(i);
        let host = &self.hosts[i];
        let next = self.hosts.get(i + 1).map(String::as_str);
        match (self.down[i].swap(true, Ordering::Relaxed), next) {
            (false, Some(next)) => warn!(host, error = %error, next, "Host unavailable; trying the next one."),
            (false, None) => warn!(host, error = %error, "Host unavailable, and it is the last one."),
            (true, _) => debug!(host, error = %error, "Host still unavailable."),
        }
    }

    fn answered(&self, i: usize) {
        if self.down[i].swap(false, Ordering::Relaxed) {
            info!(host = %self.hosts[i], "Host answers again.");
        }
    }
}

/// `host:port`'s addresses, IPv4 first (`host.docker.internal` may resolve to IPv6 too, which
/// is why haproxy had `resolve-prefer ipv4`). IP literals are not looked up.
async fn resolve(host: &str, port: u16) -> io::Result<Vec<SocketAddr>> {
    let mut addrs: Vec<SocketAddr> = tokio::net::lookup_host((host, port)).await?.collect();
    addrs.sort_by_key(SocketAddr::is_ipv6);
    if addrs.is_empty() {
        return Err(io::Error::new(io::ErrorKind::NotFound, format!("{host} has no address")));
    }
    Ok(addrs)
}

async fn serve_tcp(listener: TcpListener, target: Arc<Target>, cancel: CancellationToken) {
    loop {
        let accepted = tokio::select! {
            () = cancel.cancelled() => return,
            r = listener.accept() => r,
        };
        match accepted {
            Ok((client, peer)) => {
                target.counters.connection();
                tokio::spawn(relay_tcp(client, peer, target.clone()).in_current_span());
            }
            Err(e) => {
                // Out of file descriptors, most likely: give the open connections time to end.
                warn!(error = %e, "Failed to accept a connection; retrying.");
                tokio::time::sleep(Duration::from_millis(50)).await;
            }
        }
    }
}

async fn relay_tcp(mut client: TcpStream, peer: SocketAddr, target: Arc<Target>) {
    let Some((mut upstream, host)) = connect(&target).await else {
        debug!(%peer, "No host accepted the connection; closing it.");
        return;
    };
    // Request-response protocols (postgres, ssh) must not wait for Nagle's 40 ms.
    let _ = client.set_nodelay(true);
    let _ = upstream.set_nodelay(true);
    let host = &target.hosts[host];
    debug!(%peer, host, "Connection opened.");
    // Half-close: when one side ends its stream, the other side's write half is shut down,
    // and the other direction goes on until it ends too.
    let (client_read, client_write) = client.split();
    let (upstream_read, upstream_write) = upstream.split();
    let relayed = tokio::try_join!(relay_one(client_read, upstream_write), relay_one(upstream_read, client_write));
    match relayed {
        Ok((sent, received)) => debug!(%peer, host, sent, received, "Connection closed."),
        Err(e) => debug!(%peer, host, error = %e, "Connection ended with an error."),
    }
}

/// A pipe for splice(2): the kernel moves socket pages into it and out to the other socket,
/// with no copy through user space.
struct Pipe {
    read: OwnedFd,
    write: OwnedFd,
}

impl Pipe {
    fn new() -> io::Result<Self> {
        let mut fds = [0; 2];
        // SAFETY: pipe2 writes two new descriptors into the array on success.
        if unsafe { libc::pipe2(fds.as_mut_ptr(), libc::O_NONBLOCK | libc::O_CLOEXEC) } != 0 {
            return Err(io::Error::last_os_error());
        }
        // SAFETY: both descriptors are new and owned by nothing else.
        let pipe = unsafe { Self { read: OwnedFd::from_raw_fd(fds[0]), write: OwnedFd::from_raw_fd(fds[1]) } };
        // A larger pipe moves more per call; the default (64 KiB) is fine when this fails.
        // SAFETY: fcntl on a descriptor we own.
        unsafe { libc::fcntl(pipe.write.as_raw_fd(), libc::F_SETPIPE_SZ, PIPE_SIZE as libc::c_int) };
        Ok(pipe)
    }
}

/// splice(2) without blocking. Into a socket whose peer is gone it raises SIGPIPE (there is no
/// MSG_NOSIGNAL for splice): Rust's runtime ignores SIGPIPE before `main`, and the supervisor
/// inherits that through its fork, so the call fails with EPIPE instead.
fn splice(from: RawFd, to: RawFd, len: usize) -> io::Result<usize> {
    // SAFETY: splice between descriptors we hold open, with no offsets.
    let n = unsafe {
        libc::splice(
            from,
            std::ptr::null_mut(),
            to,
            std::ptr::null_mut(),
            len,
            libc::SPLICE_F_MOVE | libc::SPLICE_F_NONBLOCK,
        )
    };
    if n < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(n as usize)
    }
}

/// One direction, until `from` ends; then `to`'s write half is shut down. Returns the bytes
/// moved.
///
/// Small reads are copied through a buffer, which costs the fewest syscalls per request and
/// response. Once a read fills the buffer a bulk transfer is under way, and the bytes move by
/// splice(2) through a pipe, never entering user space (under half socat's CPU per byte in
/// BENCHMARKS.md), until a splice finds less than a buffer's worth waiting.
async fn relay_one(mut from: ReadHalf<'_>, mut to: WriteHalf<'_>) -> io::Result<u64> {
    let mut buf = vec![0; TCP_BUF];
    let mut pipe: Option<Pipe> = None;
    let mut pipe_failed = false;
    let mut bulk = false;
    let mut total = 0;
    loop {
        let n = match &pipe {
            Some(pipe) if bulk => {
                let n = splice_once(from.as_ref(), to.as_ref(), pipe).await?;
                bulk = n >= TCP_BUF;
                n
            }
            _ => {
                let n = from.read(&mut buf).await?;
                to.write_all(&buf[..n]).await?;
                if n == TCP_BUF && !pipe_failed {
                    if pipe.is_none() {
                        // Out of file descriptors, most likely: keep copying.
                        pipe = Pipe::new().map_err(|e| debug!(error = %e, "No pipe; copying instead.")).ok();
                        pipe_failed = pipe.is_none();
                    }
                    bulk = pipe.is_some();
                }
                n
            }
        };
        if n == 0 {
            return match to.shutdown().await {
                Err(e) if e.kind() != io::ErrorKind::NotConnected => Err(e),
                _ => Ok(total),
            };
        }
        total += n as u64;
    }
}

/// Moves what `from` has waiting (up to the pipe's size) into the pipe and all of it on to `to`;
/// 0 at the end of `from`'s stream.
async fn splice_once(from: &TcpStream, to: &TcpStream, pipe: &Pipe) -> io::Result<usize> {
    let n = loop {
        from.readable().await?;
        // The pipe is empty, so EAGAIN means the socket is, and clears its readiness.
        match from.try_io(Interest::READABLE, || splice(from.as_raw_fd(), pipe.write.as_raw_fd(), PIPE_SIZE)) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            r => break r?,
        }
    };
    let mut left = n;
    while left > 0 {
        // The pipe holds data, so EAGAIN means the socket is full.
        match to.try_io(Interest::WRITABLE, || splice(pipe.read.as_raw_fd(), to.as_raw_fd(), left)) {
            Ok(m) => left -= m,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => to.writable().await?,
            Err(e) => return Err(e),
        }
    }
    Ok(n)
}

/// The first host, in order, that accepts a connection within the timeout.
async fn connect(target: &Target) -> Option<(TcpStream, usize)> {
    for (i, host) in target.hosts.iter().enumerate() {
        let attempt = async {
            let mut last = None;
            for addr in resolve(host, target.port).await? {
                match TcpStream::connect(addr).await {
                    Ok(s) => return Ok(s),
                    Err(e) => last = Some(e),
                }
            }
            Err(last.unwrap_or_else(|| io::ErrorKind::NotFound.into()))
        };
        let timeout = target.opts.connect_timeout;
        let result = tokio::time::timeout(timeout, attempt).await.unwrap_or_else(|_| {
            Err(io::Error::new(io::ErrorKind::TimedOut, format!("no answer within {}s", timeout.as_secs_f32())))
        });
        match result {
            Ok(stream) => {
                target.answered(i);
                return Some((stream, i));
            }
            Err(e) => target.failed(i, &e),
        }
    }
    None
}

async fn serve_udp(socket: Arc<UdpSocket>, target: Arc<Target>, cancel: CancellationToken) {
    let mut sessions: HashMap<SocketAddr, mpsc::Sender<Vec<u8>>> = HashMap::new();
    // (An interval of zero would panic; the configuration never gives one.)
    let mut sweep = tokio::time::interval(target.opts.udp_idle.max(Duration::from_secs(1)));
    loop {
        tokio::select! {
            () = cancel.cancelled() => return,
            _ = sweep.tick() => sessions.retain(|_, tx| !tx.is_closed()),
            r = socket.readable() => match r {
                Ok(()) => from_clients(&socket, &mut sessions, &target),
                Err(e) => {
                    warn!(error = %e, "Failed to wait for datagrams; retrying.");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                }
            },
        }
    }
}

thread_local! {
    /// One receive buffer for every UDP socket of the forwarding thread, rather than 64 KiB in
    /// each session (or 64 KiB zeroed on the stack for each datagram).
    static UDP_BUF: RefCell<Vec<u8>> = RefCell::new(vec![0; UDP_MAX]);
}

/// Hands the waiting datagrams to their clients' sessions, starting sessions as needed.
fn from_clients(
    socket: &Arc<UdpSocket>,
    sessions: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    target: &Arc<Target>,
) {
    UDP_BUF.with_borrow_mut(|buf| from_clients_with(buf, socket, sessions, target));
}

fn from_clients_with(
    buf: &mut [u8],
    socket: &Arc<UdpSocket>,
    sessions: &mut HashMap<SocketAddr, mpsc::Sender<Vec<u8>>>,
    target: &Arc<Target>,
) {
    for _ in 0..UDP_BATCH {
        let (n, peer) = match socket.try_recv_from(buf) {
            Ok(r) => r,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => return,
            Err(e) => {
                debug!(error = %e, "Failed to receive a datagram.");
                continue;
            }
        };
        let mut datagram = buf[..n].to_vec();
        if let Some(tx) = sessions.get(&peer) {
            match tx.try_send(datagram) {
                Ok(()) => continue,
                Err(mpsc::error::TrySendError::Full(_)) => {
                    debug!(%peer, "Session queue full; datagram dropped.");
                    continue;
                }
                // The session just ended (idle): start a new one.
                Err(mpsc::error::TrySendError::Closed(d)) => datagram = d,
            }
        }
        let (tx, rx) = mpsc::channel(UDP_QUEUE);
        let _ = tx.try_send(datagram);
        sessions.insert(peer, tx);
        target.counters.connection();
        tokio::spawn(udp_session(socket.clone(), peer, rx, target.clone()).in_current_span());
    }
}

/// A socket connected to host `i`, of the address family the host resolves to.
async fn open_upstream(target: &Target, i: usize) -> io::Result<UdpSocket> {
    let addr = resolve(&target.hosts[i], target.port).await?[0];
    let any = if addr.is_ipv4() { IpAddr::V4(Ipv4Addr::UNSPECIFIED) } else { IpAddr::V6(Ipv6Addr::UNSPECIFIED) };
    let socket = UdpSocket::bind((any, 0)).await?;
    socket.connect(addr).await?;
    Ok(socket)
}

/// The first host from `start` on (wrapping around) whose address resolves.
async fn open_from(target: &Target, start: usize) -> Option<(UdpSocket, usize)> {
    let n = target.hosts.len();
    for k in 0..n {
        let i = (start + k) % n;
        match open_upstream(target, i).await {
            Ok(s) => return Some((s, i)),
            Err(e) => target.failed(i, &e),
        }
    }
    None
}

/// One client's session: its datagrams go to the host through a socket of its own, and what
/// comes back goes to the client from the forward's port. Ends after `udp_idle` of silence.
async fn udp_session(socket: Arc<UdpSocket>, client: SocketAddr, mut rx: mpsc::Receiver<Vec<u8>>, target: Arc<Target>) {
    let Some((mut upstream, mut host)) = open_from(&target, 0).await else {
        debug!(%client, "No host for this client; datagrams dropped.");
        return;
    };
    debug!(%client, host = %target.hosts[host], "Session opened.");
    let idle = target.opts.udp_idle;
    let mut last_active = Instant::now();
    let expiry = tokio::time::sleep_until(crate::config::limits::later_tokio(last_active, idle));
    tokio::pin!(expiry);
    // The latest datagram, resent once to each next host when one refuses, so that a client's
    // first datagram is not lost to a primary that is down.
    let mut latest: Vec<u8> = Vec::new();
    let mut resends = 0;
    loop {
        let refused = tokio::select! {
            d = rx.recv() => {
                let Some(d) = d else { break };
                last_active = Instant::now();
                latest = d;
                resends = 0;
                // `send`, not `try_send`: a new socket is not known to be writable until the
                // runtime has polled it once, and `try_send` would drop the first datagram.
                matches!(upstream.send(&latest).await, Err(e) if e.kind() == io::ErrorKind::ConnectionRefused)
            }
            // An ICMP port unreachable makes the socket report an error (EPOLLERR), not
            // readable: the host refused a datagram.
            r = upstream.ready(Interest::READABLE | Interest::ERROR) => {
                let Ok(ready) = r else { break };
                let mut refused = false;
                if ready.is_error() {
                    refused = matches!(upstream.take_error(), Ok(Some(e)) if e.kind() == io::ErrorKind::ConnectionRefused);
                    // Forget the readiness until the next error.
                    let _ = upstream.try_io(Interest::ERROR, || Err::<(), _>(io::ErrorKind::WouldBlock.into()));
                }
                if ready.is_readable() {
                    match to_client(&upstream, &socket, client) {
                        Ok(0) => {}
                        Ok(_) => {
                            last_active = Instant::now();
                            target.answered(host);
                        }
                        Err(e) => refused |= e.kind() == io::ErrorKind::ConnectionRefused,
                    }
                }
                refused
            }
            () = &mut expiry => {
                if last_active.elapsed() >= idle {
                    break;
                }
                expiry.as_mut().reset(crate::config::limits::later_tokio(last_active, idle));
                false
            }
        };
        if refused {
            target.failed(host, &io::ErrorKind::ConnectionRefused.into());
            let n = target.hosts.len();
            if n > 1 {
                let Some((s, i)) = open_from(&target, (host + 1) % n).await else { break };
                (upstream, host) = (s, i);
                if resends + 1 < n && !latest.is_empty() {
                    resends += 1;
                    let _ = upstream.send(&latest).await;
                }
            }
        }
    }
    // Anything that slipped in is sent anyway; the next datagram from this client starts a new session.
    rx.close();
    while let Ok(d) = rx.try_recv() {
        let _ = upstream.try_send(&d);
    }
    debug!(%client, "Session closed.");
}

/// Relays the host's waiting datagrams to the client; `Ok(count)`.
fn to_client(upstream: &UdpSocket, socket: &UdpSocket, client: SocketAddr) -> io::Result<usize> {
    UDP_BUF.with_borrow_mut(|buf| to_client_with(buf, upstream, socket, client))
}

fn to_client_with(buf: &mut [u8], upstream: &UdpSocket, socket: &UdpSocket, client: SocketAddr) -> io::Result<usize> {
    let mut count = 0;
    for _ in 0..UDP_BATCH {
        match upstream.try_recv(buf) {
            Ok(n) => {
                // A full client buffer drops the datagram, as the kernel would.
                let _ = socket.try_send_to(&buf[..n], client);
                count += 1;
            }
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
            Err(e) if count == 0 => return Err(e),
            Err(_) => break,
        }
    }
    Ok(count)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fwd(port: u16, proto: Proto, hosts: &[&str]) -> Forward {
        Forward { port, proto, hosts: hosts.iter().map(|h| h.to_string()).collect() }
    }

    fn problems(host: &str, ports: &str) -> Vec<Problem> {
        parse(host, ports).unwrap_err()
    }

    #[test]
    fn every_port_form_parses() {
        let got = parse("a b", "15432 10022/tcp 80/tcp-backup 8125/udp").unwrap();
        assert_eq!(
            got,
            [
                fwd(15432, Proto::Tcp, &["a", "b"]),
                fwd(10022, Proto::Tcp, &["a", "b"]),
                fwd(80, Proto::Tcp, &["b", "a"]),
                fwd(8125, Proto::Udp, &["a", "b"]),
            ]
        );
    }

    #[test]
    fn host_ports_are_stripped_and_order_kept() {
        // The original's own end-to-end test passes the same host twice with different ports.
        let got = parse("host.docker.internal:42\thost.docker.internal:4242  10.0.0.7", " 1\n").unwrap();
        assert_eq!(got, [fwd(1, Proto::Tcp, &["host.docker.internal", "host.docker.internal", "10.0.0.7"])]);
    }

    #[test]
    fn tcp_backup_reverses_the_hosts() {
        let got = parse("primary:1 middle backup:3", "80/tcp-backup 81").unwrap();
        assert_eq!(got[0].hosts, ["backup", "middle", "primary"]);
        assert_eq!(got[1].hosts, ["primary", "middle", "backup"]);
    }

    #[test]
    fn both_empty_means_no_forwards() {
        assert_eq!(parse("", "").unwrap(), []);
        assert_eq!(parse("  ", "\t").unwrap(), []);
    }

    #[test]
    fn one_without_the_other_is_an_error() {
        let p = problems("", "15432");
        assert_eq!(p.len(), 1);
        assert_eq!(p[0].var, "FORWARD_HOST");
        assert!(p[0].to_string().contains("FORWARD_PORTS=\"15432\""), "{}", p[0]);
        let p = problems("host", " ");
        assert_eq!(p[0].var, "FORWARD_PORTS");
        assert!(p[0].to_string().contains("N/tcp-backup"), "{}", p[0]);
    }

    #[test]
    fn bad_port_specs_name_the_variable_the_value_and_the_form() {
        let cases = [
            ("abc", "\"abc\" is not a port number"),
            ("/tcp", "\"\" is not a port number"),
            ("+5", "\"+5\" is not a port number"),
            ("0", "0 is not a port in 1-65535"),
            ("65536/udp", "65536 is not a port in 1-65535"),
            ("99999999999", "is not a port in 1-65535"),
            ("53/sctp", "unknown protocol \"sctp\""),
            ("53/", "unknown protocol \"\""),
        ];
        for (spec, why) in cases {
            let p = problems("host", spec);
            assert_eq!(p.len(), 1, "{spec}");
            let text = p[0].to_string();
            assert!(text.starts_with(&format!("FORWARD_PORTS={spec:?}: expected")), "{text}");
            assert!(text.contains(why), "{spec}: {text}");
            for form in ["N,", "N/tcp,", "N/tcp-backup", "N/udp"] {
                assert!(text.contains(form), "{text}");
            }
        }
    }

    #[test]
    fn duplicates_are_errors_but_one_port_may_be_tcp_and_udp() {
        let p = problems("host", "53 53/tcp-backup 80/udp 80/udp");
        let values: Vec<_> = p.iter().map(|p| p.value.clone().unwrap()).collect();
        assert_eq!(values, ["53/tcp-backup", "80/udp"]);
        assert!(p[0].to_string().contains("port 53/tcp is listed twice"), "{}", p[0]);
        let ok = parse("host", "53/tcp 53/udp").unwrap();
        assert_eq!(ok.len(), 2);
    }

    #[test]
    fn protocols_ignore_case() {
        assert_eq!(parse("h", "5/UDP").unwrap(), [fwd(5, Proto::Udp, &["h"])]);
    }

    #[test]
    fn every_bad_entry_is_reported_at_once() {
        let p = problems("good bad_host: :99 a:1b", "x 1/foo 2");
        let vars: Vec<_> = p.iter().map(|p| (p.var, p.value.clone().unwrap())).collect();
        assert_eq!(
            vars,
            [
                ("FORWARD_HOST", "bad_host:".to_string()),
                ("FORWARD_HOST", ":99".to_string()),
                ("FORWARD_HOST", "a:1b".to_string()),
                ("FORWARD_PORTS", "x".to_string()),
                ("FORWARD_PORTS", "1/foo".to_string()),
            ]
        );
        assert!(p[0].to_string().contains("host names or IPv4 addresses"), "{}", p[0]);
    }

    #[test]
    fn a_port_in_use_is_reported_by_start() {
        let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = start(vec![fwd(port, Proto::Tcp, &["127.0.0.1"])], Options::default()).unwrap_err();
        let text = crate::error::chain(&err);
        assert!(text.contains(&format!("127.0.0.1:{port}/tcp")) && text.contains("in use"), "{text}");
        let taken = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        let port = taken.local_addr().unwrap().port();
        let err = start(vec![fwd(port, Proto::Udp, &["127.0.0.1"])], Options::default()).unwrap_err();
        assert!(matches!(err, ForwardError::Bind { proto: Proto::Udp, .. }), "{err:?}");
    }

    /// This forward's lines of `/metrics` (each test has ports of its own).
    fn metric_lines(port: u16) -> String {
        let mut out = String::new();
        metrics::global().render(&mut out);
        out.lines().filter(|l| l.contains(&format!("{{port=\"{port}\""))).map(|l| format!("{l}\n")).collect()
    }

    #[test]
    fn connections_sessions_and_host_failures_are_counted() {
        use std::io::{Read, Write};
        // Nothing listens on the primary: TCP is refused, UDP gets ICMP port unreachable.
        let (bind, primary, backup) = ("127.0.51.1", "127.0.51.2", "127.0.51.3");
        let tcp_port = std::net::TcpListener::bind((bind, 0)).unwrap().local_addr().unwrap().port();
        let udp_port = std::net::UdpSocket::bind((bind, 0)).unwrap().local_addr().unwrap().port();
        let tcp_echo = std::net::TcpListener::bind((backup, tcp_port)).unwrap();
        std::thread::spawn(move || {
            for s in tcp_echo.incoming().map_while(Result::ok) {
                let (mut r, mut w) = (s.try_clone().unwrap(), s);
                let _ = std::io::copy(&mut r, &mut w);
            }
        });
        let udp_echo = std::net::UdpSocket::bind((backup, udp_port)).unwrap();
        std::thread::spawn(move || {
            let mut buf = [0u8; 64];
            while let Ok((n, from)) = udp_echo.recv_from(&mut buf) {
                let _ = udp_echo.send_to(&buf[..n], from);
            }
        });
        let opts = Options { bind: bind.parse().unwrap(), ..Options::default() };
        let forwards =
            vec![fwd(tcp_port, Proto::Tcp, &[primary, backup]), fwd(udp_port, Proto::Udp, &[primary, backup])];
        let f = start(forwards, opts).unwrap();
        let tcp = format!("port=\"{tcp_port}\",proto=\"tcp\"");
        let udp = format!("port=\"{udp_port}\",proto=\"udp\"");
        let at_start = metric_lines(tcp_port) + &metric_lines(udp_port);
        for labels in [&tcp, &udp] {
            assert!(at_start.contains(&format!("ci_runner_forward_connections_total{{{labels}}} 0\n")), "{at_start}");
        }

        let timeout = Some(Duration::from_secs(20));
        for _ in 0..2 {
            let mut client = std::net::TcpStream::connect((bind, tcp_port)).unwrap();
            client.set_read_timeout(timeout).unwrap();
            client.write_all(b"ping").unwrap();
            let mut answer = [0u8; 4];
            client.read_exact(&mut answer).unwrap();
            assert_eq!(&answer, b"ping");
        }
        let client = std::net::UdpSocket::bind("127.0.0.1:0").unwrap();
        client.set_read_timeout(timeout).unwrap();
        for _ in 0..2 {
            client.send_to(b"ping", (bind, udp_port)).unwrap();
            let mut answer = [0u8; 8];
            let (n, _) = client.recv_from(&mut answer).unwrap();
            assert_eq!(&answer[..n], b"ping");
        }
        f.stop();

        // Each answer came back after its connection was counted and the primary failed.
        let text = metric_lines(tcp_port) + &metric_lines(udp_port);
        for line in [
            format!("ci_runner_forward_connections_total{{{tcp}}} 2"),
            format!("ci_runner_forward_host_failures_total{{{tcp},host=\"{primary}\"}} 2"),
            format!("ci_runner_forward_host_failures_total{{{tcp},host=\"{backup}\"}} 0"),
            // One session per client address; it stays on the backup once it moved there.
            format!("ci_runner_forward_connections_total{{{udp}}} 1"),
            format!("ci_runner_forward_host_failures_total{{{udp},host=\"{primary}\"}} 1"),
            format!("ci_runner_forward_host_failures_total{{{udp},host=\"{backup}\"}} 0"),
        ] {
            assert!(text.contains(&format!("{line}\n")), "no {line:?} in\n{text}");
        }
    }

    #[test]
    fn nothing_to_forward_starts_no_thread() {
        let f = start(Vec::new(), Options::default()).unwrap();
        assert!(f.thread.is_none());
        f.stop();
    }
}
