//! `mesh-workload`: the clients and servers the end-to-end tests run inside nodes.
//!
//! Servers announce their name so a client can tell which backend it reached:
//!
//! | command | does |
//! | --- | --- |
//! | `tcp-server --listen ADDR:PORT --name NAME [--http-status CODE]` | per connection (one thread each): writes `NAME\n`, then echoes every line until EOF; prints `ready` once listening. With `--http-status`, a connection whose peer sends an HTTP request within 300 ms first gets `HTTP/1.1 CODE` with body `NAME\n` and is closed (a health-check target); the others are served as above |
//! | `udp-server --listen ADDR:PORT --name NAME` | answers each datagram with `NAME:<payload>`; prints `ready` once bound |
//! | `tcp-client --connect ADDR:PORT --count N [--timeout-ms T] [--hold-ms H] [--duration-ms D --interval-ms I]` | N sequential connections (with D: until D ms have passed, at most N; I ms apart), reads each one's name line; prints `looping`, then a JSON [`TcpClientReport`] |
//! | `tcp-hold --connect ADDR:PORT [--interval-ms I] [--duration-ms D] [--want NAME --max-attempts M]` | one long-lived connection (reconnecting until it reaches NAME if asked), prints `connected NAME`, then sends a line every I ms and checks the echo; prints a JSON [`HoldReport`] |
//! | `tcp-many --connect ADDR:PORT --count N [--timeout-ms T] [--hold-ms H]` | N connections open at once (each reads its name line), then each sends its own line and checks the echo; prints `echoed E` with all still open, keeps them H ms, closes them and prints a JSON [`ManyReport`]. Raises its RLIMIT_NOFILE soft limit to fit N |
//! | `udp-client --target ADDR:PORT --count N [--connected] [--timeout-ms T]` | one datagram at a time, waiting for each reply; prints a JSON [`UdpClientReport`] |
//! | `echo-server --listen ADDR:PORT` | per connection (one thread each): echoes bytes as they come; at EOF shuts its write side down and closes; prints `ready` once listening |
//! | `pingpong --target ADDR:PORT --size N [--duration-ms D] [--interval-ms I] [--timeout-ms T]` | one connection to an echo server: writes N bytes, reads the N bytes back and checks them, repeated for D ms (a round every I ms, back to back by default); prints a JSON [`PingPongReport`] (messages/s, p50/p99/max round trip) |
//! | `echo-stream --target ADDR:PORT --total N --write-size W [--read-after-shutdown] [--timeout-ms T]` | one connection to an echo server: writes N bytes in W-byte writes, shuts the write side down, reads the echo until EOF (concurrently, or only after the shutdown) and checks it; prints a JSON [`StreamReport`] |
//!
//! Every loop and wait is bounded: clients by count and timeouts, servers exit by themselves
//! after `--max-lifetime-ms` (default 10 minutes) in case nobody kills them. Errors are counted
//! by errno name; any timeout counts as `ETIMEDOUT`.

use std::collections::{BTreeMap, HashMap};
use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream, UdpSocket};
use std::process::ExitCode;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::workload::{
    HoldReport, ManyReport, PingPongReport, StreamReport, TcpClientReport, UdpClientReport,
};

const USAGE: &str = "usage: mesh-workload (tcp-server|udp-server|echo-server|tcp-client|tcp-hold|tcp-many|udp-client|pingpong|echo-stream) [--option value]... (see the module docs)";

fn main() -> ExitCode {
    match run() {
        Ok(code) => code,
        Err(e) => {
            eprintln!("mesh-workload: {e:#}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<ExitCode> {
    let mut argv = std::env::args().skip(1);
    let cmd = argv.next().context(USAGE)?;
    let args = Args::parse(argv)?;
    match cmd.as_str() {
        "tcp-server" => tcp_server(&args),
        "udp-server" => udp_server(&args),
        "tcp-client" => tcp_client(&args),
        "tcp-hold" => tcp_hold(&args),
        "tcp-many" => tcp_many(&args),
        "udp-client" => udp_client(&args),
        "echo-server" => echo_server(&args),
        "pingpong" => pingpong(&args),
        "echo-stream" => echo_stream(&args),
        other => bail!("unknown command {other:?}\n{USAGE}"),
    }
}

/// `--key value` options and `--flag` switches, parsed by hand (no clap needed for a few
/// commands).
struct Args {
    values: HashMap<String, String>,
    flags: Vec<String>,
}

/// Options that take no value.
const FLAGS: &[&str] = &["connected", "read-after-shutdown"];

impl Args {
    fn parse(mut argv: impl Iterator<Item = String>) -> Result<Self> {
        let mut values = HashMap::new();
        let mut flags = Vec::new();
        while let Some(a) = argv.next() {
            let key = a
                .strip_prefix("--")
                .with_context(|| format!("unexpected argument {a:?}\n{USAGE}"))?;
            if FLAGS.contains(&key) {
                flags.push(key.to_string());
            } else {
                let v = argv
                    .next()
                    .with_context(|| format!("--{key} needs a value"))?;
                values.insert(key.to_string(), v);
            }
        }
        Ok(Self { values, flags })
    }

    fn str(&self, key: &str) -> Result<&str> {
        self.values
            .get(key)
            .map(String::as_str)
            .with_context(|| format!("missing --{key}\n{USAGE}"))
    }

    fn opt_str(&self, key: &str) -> Option<&str> {
        self.values.get(key).map(String::as_str)
    }

    fn addr(&self, key: &str) -> Result<SocketAddr> {
        let s = self.str(key)?;
        s.parse()
            .with_context(|| format!("--{key} {s:?} is not ADDR:PORT ([v6]:PORT for IPv6)"))
    }

    fn num(&self, key: &str, default: u64) -> Result<u64> {
        match self.values.get(key) {
            None => Ok(default),
            Some(s) => s
                .parse()
                .with_context(|| format!("--{key} {s:?} is not a number")),
        }
    }

    fn ms(&self, key: &str, default: u64) -> Result<Duration> {
        self.num(key, default).map(Duration::from_millis)
    }

    fn flag(&self, key: &str) -> bool {
        self.flags.iter().any(|f| f == key)
    }
}

/// The errno name of an I/O error, for counting errors by kind.
fn errno_name(e: &io::Error) -> String {
    if matches!(
        e.kind(),
        io::ErrorKind::TimedOut | io::ErrorKind::WouldBlock
    ) {
        return "ETIMEDOUT".into();
    }
    let Some(n) = e.raw_os_error() else {
        return format!("{:?}", e.kind());
    };
    let name = match n {
        libc::ECONNREFUSED => "ECONNREFUSED",
        libc::ECONNRESET => "ECONNRESET",
        libc::ECONNABORTED => "ECONNABORTED",
        libc::ETIMEDOUT => "ETIMEDOUT",
        libc::EHOSTUNREACH => "EHOSTUNREACH",
        libc::ENETUNREACH => "ENETUNREACH",
        libc::EADDRNOTAVAIL => "EADDRNOTAVAIL",
        libc::EADDRINUSE => "EADDRINUSE",
        libc::EPERM => "EPERM",
        libc::EACCES => "EACCES",
        libc::EINVAL => "EINVAL",
        libc::EPIPE => "EPIPE",
        libc::ENOENT => "ENOENT",
        libc::ENOBUFS => "ENOBUFS",
        libc::EAFNOSUPPORT => "EAFNOSUPPORT",
        libc::EINPROGRESS => "EINPROGRESS",
        libc::EAGAIN => "ETIMEDOUT",
        other => return format!("E{other}"),
    };
    name.into()
}

/// Exits the process after `--max-lifetime-ms`, so a forgotten server cannot outlive its test
/// by much.
fn exit_after_lifetime(args: &Args) -> Result<()> {
    let lifetime = args.ms("max-lifetime-ms", 600_000)?;
    std::thread::spawn(move || {
        std::thread::sleep(lifetime);
        eprintln!("mesh-workload: max lifetime {lifetime:?} reached, exiting");
        std::process::exit(0);
    });
    Ok(())
}

fn ready() -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "ready")?;
    out.flush()?;
    Ok(())
}

fn print_json(v: &impl serde::Serialize) -> Result<()> {
    let mut out = io::stdout().lock();
    writeln!(out, "{}", serde_json::to_string(v)?)?;
    out.flush()?;
    Ok(())
}

fn tcp_server(args: &Args) -> Result<ExitCode> {
    let listen = args.addr("listen")?;
    let name = args.str("name")?.to_string();
    anyhow::ensure!(
        !name.contains('\n') && !name.contains(':'),
        "--name must not contain newline or ':'"
    );
    // An idle connection is dropped after this, so threads cannot pile up forever.
    let idle = args.ms("idle-timeout-ms", 120_000)?;
    let http_status = match args.opt_str("http-status") {
        None => None,
        Some(_) => Some(u16::try_from(args.num("http-status", 200)?).context("--http-status")?),
    };
    exit_after_lifetime(args)?;
    // One descriptor per connection; as many as the hard limit allows.
    raise_nofile_limit(u64::MAX)?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    ready()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        let name = name.clone();
        std::thread::spawn(move || {
            if let Some(status) = http_status {
                match answer_http(&stream, &name, status) {
                    Ok(true) | Err(_) => return,
                    Ok(false) => {}
                }
            }
            let _ = serve_tcp(stream, &name, idle);
        });
    }
    Ok(ExitCode::SUCCESS)
}

fn serve_tcp(stream: TcpStream, name: &str, idle: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_nodelay(true)?;
    // Reads and writes through `&TcpStream`: one descriptor per connection (a `try_clone`
    // would double them and hit the open-file limit at half the connections).
    let mut writer = &stream;
    writer.write_all(format!("{name}\n").as_bytes())?;
    let mut reader = BufReader::new(&stream);
    let mut line = Vec::new();
    loop {
        line.clear();
        if reader.read_until(b'\n', &mut line)? == 0 {
            return Ok(());
        }
        writer.write_all(&line)?;
    }
}

/// Answers an HTTP request if the peer sends one within 300 ms (true: answered, close now).
fn answer_http(stream: &TcpStream, name: &str, status: u16) -> io::Result<bool> {
    stream.set_read_timeout(Some(Duration::from_millis(300)))?;
    let mut head = Vec::new();
    let mut buf = [0u8; 1024];
    while !head.windows(4).any(|w| w == b"\r\n\r\n") && head.len() < 16 * 1024 {
        match io::Read::read(&mut &*stream, &mut buf) {
            Ok(0) => return Ok(true),
            Ok(n) => head.extend_from_slice(&buf[..n]),
            Err(e) if head.is_empty() && errno_name(&e) == "ETIMEDOUT" => return Ok(false),
            Err(e) => return Err(e),
        }
    }
    let body = format!("{name}\n");
    let reply = format!(
        "HTTP/1.1 {status} Status\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    (&*stream).write_all(reply.as_bytes())?;
    Ok(true)
}

fn udp_server(args: &Args) -> Result<ExitCode> {
    let listen = args.addr("listen")?;
    let name = args.str("name")?.to_string();
    exit_after_lifetime(args)?;
    let sock = UdpSocket::bind(listen).with_context(|| format!("binding {listen}"))?;
    ready()?;
    let mut buf = vec![0u8; 65536];
    loop {
        let (n, from) = match sock.recv_from(&mut buf) {
            Ok(x) => x,
            Err(e) => {
                eprintln!("udp-server: recv_from: {e}");
                continue;
            }
        };
        let mut reply = format!("{name}:").into_bytes();
        reply.extend_from_slice(&buf[..n]);
        if let Err(e) = sock.send_to(&reply, from) {
            eprintln!("udp-server: send_to {from}: {e}");
        }
    }
}

/// Connects with a timeout and reads the server's name line (bounded by the same timeout).
fn connect_and_name(target: SocketAddr, timeout: Duration) -> io::Result<(TcpStream, String)> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    let mut line = String::new();
    // One byte at a time so nothing after the name line is swallowed by a buffer.
    let mut byte = [0u8; 1];
    loop {
        match io::Read::read(&mut &stream, &mut byte)? {
            0 => return Err(io::Error::new(io::ErrorKind::UnexpectedEof, "EOF")),
            _ if byte[0] == b'\n' => break,
            _ => line.push(char::from(byte[0])),
        }
        if line.len() > 256 {
            return Err(io::Error::new(io::ErrorKind::InvalidData, "name too long"));
        }
    }
    Ok((stream, line))
}

fn error_kind(e: &io::Error) -> String {
    match e.kind() {
        io::ErrorKind::UnexpectedEof => "EOF".into(),
        io::ErrorKind::InvalidData => "BAD_NAME".into(),
        _ => errno_name(e),
    }
}

fn tcp_client(args: &Args) -> Result<ExitCode> {
    let target = args.addr("connect")?;
    let count = args.num("count", 1)?;
    let timeout = args.ms("timeout-ms", 1000)?;
    let hold = args.ms("hold-ms", 0)?;
    let duration = args.ms("duration-ms", 0)?;
    let interval = args.ms("interval-ms", 0)?;
    let mut report = TcpClientReport::default();
    let started = Instant::now();
    println!("looping");
    io::stdout().flush()?;
    for _ in 0..count {
        if !duration.is_zero() && started.elapsed() >= duration {
            break;
        }
        if !interval.is_zero() {
            std::thread::sleep(interval);
        }
        match connect_and_name(target, timeout) {
            Ok((stream, name)) => {
                let peer = match stream.peer_addr() {
                    Ok(p) => p.to_string(),
                    Err(e) => format!("getpeername: {}", errno_name(&e)),
                };
                if !report.peer.contains(&peer) {
                    report.peer.push(peer);
                }
                *report.backends.entry(name).or_default() += 1;
                if !hold.is_zero() {
                    std::thread::sleep(hold);
                }
            }
            Err(e) => *report.errors.entry(error_kind(&e)).or_default() += 1,
        }
    }
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

fn tcp_hold(args: &Args) -> Result<ExitCode> {
    let target = args.addr("connect")?;
    let interval = args.ms("interval-ms", 50)?;
    let duration = args.ms("duration-ms", 2000)?;
    let want = args.opt_str("want");
    let max_attempts = args.num("max-attempts", 1)?.max(1);
    let timeout = Duration::from_secs(1);
    let mut report = HoldReport::default();

    let mut conn = None;
    let mut last_err = String::new();
    while report.attempts < max_attempts {
        report.attempts += 1;
        match connect_and_name(target, timeout) {
            Ok((s, name)) if want.is_none_or(|w| w == name) => {
                conn = Some((s, name));
                break;
            }
            Ok((_, name)) => last_err = format!("reached {name}"),
            Err(e) => last_err = error_kind(&e),
        }
    }
    let Some((mut stream, name)) = conn else {
        report.errors.push(format!(
            "no connection{} after {} attempts (last: {last_err})",
            want.map(|w| format!(" to {w}")).unwrap_or_default(),
            report.attempts
        ));
        print_json(&report)?;
        return Ok(ExitCode::from(1));
    };
    report.backend = name.clone();
    {
        let mut out = io::stdout().lock();
        writeln!(out, "connected {name}")?;
        out.flush()?;
    }

    let mut reader = BufReader::new(stream.try_clone()?);
    let start = Instant::now();
    let mut line = String::new();
    while start.elapsed() < duration {
        let msg = format!("ping {}\n", report.sent);
        if let Err(e) = stream.write_all(msg.as_bytes()) {
            report
                .errors
                .push(format!("write #{}: {}", report.sent, errno_name(&e)));
            break;
        }
        report.sent += 1;
        line.clear();
        match reader.read_line(&mut line) {
            Ok(0) => {
                report
                    .errors
                    .push(format!("EOF after #{}", report.sent - 1));
                break;
            }
            Ok(_) if line == msg => report.echoed += 1,
            Ok(_) => report.errors.push(format!(
                "echo #{}: got {:?}, want {:?}",
                report.sent - 1,
                line,
                msg
            )),
            Err(e) => {
                report
                    .errors
                    .push(format!("read #{}: {}", report.sent - 1, errno_name(&e)));
                break;
            }
        }
        std::thread::sleep(interval);
    }
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

fn tcp_many(args: &Args) -> Result<ExitCode> {
    let target = args.addr("connect")?;
    let count = args.num("count", 1)?;
    let timeout = args.ms("timeout-ms", 2000)?;
    let hold = args.ms("hold-ms", 0)?;
    // The connections, stdio and a margin.
    raise_nofile_limit(count + 64)?;
    let mut report = ManyReport::default();
    let mut open = Vec::new();
    for _ in 0..count {
        match connect_and_name(target, timeout) {
            Ok((stream, name)) => {
                *report.backends.entry(name).or_default() += 1;
                open.push(stream);
            }
            Err(e) => *report.errors.entry(error_kind(&e)).or_default() += 1,
        }
    }
    // Every connection is open: each sends its own line, then each reads its echo back.
    let line = |i: usize| format!("flow {i}\n");
    let mut sent = Vec::new();
    for (i, mut stream) in open.iter().enumerate() {
        match stream.write_all(line(i).as_bytes()) {
            Ok(()) => sent.push((i, stream)),
            Err(e) => *report.errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    for (i, stream) in sent {
        let mut echo = String::new();
        match BufReader::new(stream).read_line(&mut echo) {
            Ok(_) if echo == line(i) => report.echoed += 1,
            Ok(_) => *report.errors.entry("BAD_ECHO".into()).or_default() += 1,
            Err(e) => *report.errors.entry(errno_name(&e)).or_default() += 1,
        }
    }
    {
        let mut out = io::stdout().lock();
        writeln!(out, "echoed {}", report.echoed)?;
        out.flush()?;
    }
    std::thread::sleep(hold);
    drop(open);
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// Raises the soft limit of open files to `want` (at most the hard limit) if it is lower.
fn raise_nofile_limit(want: u64) -> Result<()> {
    let mut limit = libc::rlimit {
        rlim_cur: 0,
        rlim_max: 0,
    };
    // SAFETY: getrlimit/setrlimit only read and write the struct passed.
    if unsafe { libc::getrlimit(libc::RLIMIT_NOFILE, &mut limit) } != 0 {
        return Err(io::Error::last_os_error()).context("getrlimit(RLIMIT_NOFILE)");
    }
    if limit.rlim_cur >= want {
        return Ok(());
    }
    limit.rlim_cur = want.min(limit.rlim_max);
    // SAFETY: as above.
    if unsafe { libc::setrlimit(libc::RLIMIT_NOFILE, &limit) } != 0 {
        return Err(io::Error::last_os_error()).context("setrlimit(RLIMIT_NOFILE)");
    }
    Ok(())
}

fn udp_client(args: &Args) -> Result<ExitCode> {
    let target = args.addr("target")?;
    let count = args.num("count", 1)?;
    let timeout = args.ms("timeout-ms", 1000)?;
    let connected = args.flag("connected");
    let bind: SocketAddr = if target.is_ipv4() {
        "0.0.0.0:0".parse()?
    } else {
        "[::]:0".parse()?
    };
    let sock = UdpSocket::bind(bind).context("binding the client socket")?;
    sock.set_read_timeout(Some(timeout))?;
    let mut report = UdpClientReport::default();
    let mut errors: BTreeMap<String, u64> = BTreeMap::new();
    if connected {
        if let Err(e) = sock.connect(target) {
            *errors.entry(errno_name(&e)).or_default() += 1;
            report.errors = errors;
            print_json(&report)?;
            return Ok(ExitCode::SUCCESS);
        }
        match sock.peer_addr() {
            Ok(p) => report.peer.push(p.to_string()),
            Err(e) => report.peer.push(format!("getpeername: {}", errno_name(&e))),
        }
    }
    let mut buf = vec![0u8; 65536];
    for i in 0..count {
        let payload = format!("req-{i}");
        let sent = if connected {
            sock.send(payload.as_bytes())
        } else {
            sock.send_to(payload.as_bytes(), target)
        };
        if let Err(e) = sent {
            *errors.entry(errno_name(&e)).or_default() += 1;
            continue;
        }
        // Skip late replies to earlier requests; stop at the first timeout.
        let deadline = Instant::now() + timeout;
        loop {
            match sock.recv_from(&mut buf) {
                Ok((n, from)) => {
                    let text = String::from_utf8_lossy(&buf[..n]);
                    let from = from.to_string();
                    if !report.sources.contains(&from) {
                        report.sources.push(from);
                    }
                    match text.split_once(':') {
                        Some((name, p)) if p == payload => {
                            *report.backends.entry(name.to_string()).or_default() += 1;
                            break;
                        }
                        _ if Instant::now() < deadline => continue,
                        _ => {
                            *errors.entry("BAD_REPLY".into()).or_default() += 1;
                            break;
                        }
                    }
                }
                Err(e) => {
                    *errors.entry(errno_name(&e)).or_default() += 1;
                    break;
                }
            }
        }
    }
    report.errors = errors;
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

fn echo_server(args: &Args) -> Result<ExitCode> {
    let listen = args.addr("listen")?;
    let idle = args.ms("idle-timeout-ms", 120_000)?;
    exit_after_lifetime(args)?;
    let listener = TcpListener::bind(listen).with_context(|| format!("binding {listen}"))?;
    ready()?;
    for conn in listener.incoming() {
        let Ok(stream) = conn else { continue };
        std::thread::spawn(move || {
            let _ = echo_bytes(stream, idle);
        });
    }
    Ok(ExitCode::SUCCESS)
}

/// Echoes everything read; at EOF shuts the write side down (passing the half-close on).
fn echo_bytes(mut stream: TcpStream, idle: Duration) -> io::Result<()> {
    stream.set_read_timeout(Some(idle))?;
    stream.set_nodelay(true)?;
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = stream.read(&mut buf)?;
        if n == 0 {
            return stream.shutdown(Shutdown::Write);
        }
        stream.write_all(&buf[..n])?;
    }
}

/// Connects with a timeout, bounding every read and write by it too.
fn connect_bounded(target: SocketAddr, timeout: Duration) -> io::Result<TcpStream> {
    let stream = TcpStream::connect_timeout(&target, timeout)?;
    stream.set_read_timeout(Some(timeout))?;
    stream.set_write_timeout(Some(timeout))?;
    stream.set_nodelay(true)?;
    Ok(stream)
}

/// One `read`, retried while it fails with `EAGAIN` before `timeout` has passed.
///
/// The socket's own timeout (`SO_RCVTIMEO`) also ends in `EAGAIN`, so the elapsed time tells
/// the two apart. A spurious `EAGAIN` is real: once a socket is in a sockmap (the loopback
/// sockmap of the mTLS path), the kernel's sockmap receive path returns `EAGAIN` from a
/// blocking read that a wakeup without data for it ended (another thread's write frees send
/// space and wakes the same queue). Event-loop programs retry anyway; blocking ones must too.
fn read_patiently(stream: &mut TcpStream, buf: &mut [u8], timeout: Duration) -> io::Result<usize> {
    let start = Instant::now();
    loop {
        match stream.read(buf) {
            Err(e) if e.kind() == io::ErrorKind::WouldBlock && start.elapsed() < timeout => {}
            other => return other,
        }
    }
}

/// `read_exact` made of [`read_patiently`] reads.
fn read_exact_patiently(
    stream: &mut TcpStream,
    mut buf: &mut [u8],
    timeout: Duration,
) -> io::Result<()> {
    while !buf.is_empty() {
        match read_patiently(stream, buf, timeout)? {
            0 => return Err(io::ErrorKind::UnexpectedEof.into()),
            n => buf = &mut buf[n..],
        }
    }
    Ok(())
}

/// The byte at `offset` of a test stream: a pattern that catches reordered or lost chunks.
fn pattern(offset: u64) -> u8 {
    (offset % 251) as u8
}

fn pingpong(args: &Args) -> Result<ExitCode> {
    let target = args.addr("target")?;
    let size = usize::try_from(args.num("size", 64)?).context("--size")?;
    anyhow::ensure!((1..=16 << 20).contains(&size), "--size must be 1..=16 MiB");
    let duration = args.ms("duration-ms", 5000)?;
    let timeout = args.ms("timeout-ms", 5000)?;
    let pace = args.ms("interval-ms", 0)?;
    let mut report = PingPongReport {
        size: size as u64,
        ..PingPongReport::default()
    };
    let mut stream = match connect_bounded(target, timeout) {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("connect: {}", errno_name(&e)));
            print_json(&report)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let mut out: Vec<u8> = (0..size as u64).map(pattern).collect();
    let mut back = vec![0u8; size];
    let mut rtts_ns: Vec<u64> = Vec::new();
    let start = Instant::now();
    while start.elapsed() < duration {
        // A different first byte each round, so a stale echo cannot pass for this one.
        out[0] = out[0].wrapping_add(1);
        let t = Instant::now();
        if let Err(e) = stream.write_all(&out) {
            report
                .errors
                .push(format!("write #{}: {}", report.messages, errno_name(&e)));
            break;
        }
        if let Err(e) = read_exact_patiently(&mut stream, &mut back, timeout) {
            report
                .errors
                .push(format!("read #{}: {}", report.messages, error_kind(&e)));
            break;
        }
        rtts_ns.push(t.elapsed().as_nanos() as u64);
        if back != out {
            report.errors.push(format!(
                "echo #{} differs from what was sent",
                report.messages
            ));
            break;
        }
        report.messages += 1;
        std::thread::sleep(pace.saturating_sub(t.elapsed()));
    }
    let elapsed = start.elapsed().as_secs_f64();
    report.bytes = report.messages * size as u64;
    report.messages_per_sec = report.messages as f64 / elapsed.max(1e-9);
    rtts_ns.sort_unstable();
    report.p50_us = percentile_us(&rtts_ns, 0.50);
    report.p99_us = percentile_us(&rtts_ns, 0.99);
    report.max_us = percentile_us(&rtts_ns, 1.0);
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}

/// The `q` quantile of sorted nanoseconds, in microseconds (0 when empty).
fn percentile_us(sorted_ns: &[u64], q: f64) -> f64 {
    if sorted_ns.is_empty() {
        return 0.0;
    }
    let i = ((sorted_ns.len() - 1) as f64 * q).round() as usize;
    sorted_ns[i] as f64 / 1000.0
}

fn echo_stream(args: &Args) -> Result<ExitCode> {
    let target = args.addr("target")?;
    let total = args.num("total", 1 << 20)?;
    let write_size = usize::try_from(args.num("write-size", 65_536)?).context("--write-size")?;
    anyhow::ensure!(write_size > 0, "--write-size must be positive");
    let timeout = args.ms("timeout-ms", 5000)?;
    let mut report = StreamReport::default();
    let stream = match connect_bounded(target, timeout) {
        Ok(s) => s,
        Err(e) => {
            report.errors.push(format!("connect: {}", errno_name(&e)));
            print_json(&report)?;
            return Ok(ExitCode::SUCCESS);
        }
    };
    let received = Arc::new(AtomicU64::new(0));
    let mut writer = {
        let mut stream = stream.try_clone()?;
        let received = Arc::clone(&received);
        move || -> Written {
            let mut sent = 0u64;
            let mut chunk = vec![0u8; write_size];
            while sent < total {
                let n =
                    usize::try_from((total - sent).min(write_size as u64)).unwrap_or(write_size);
                for (i, b) in chunk[..n].iter_mut().enumerate() {
                    *b = pattern(sent + i as u64);
                }
                if let Err(e) = stream.write_all(&chunk[..n]) {
                    return (
                        sent,
                        Some(format!("write at {sent}: {}", errno_name(&e))),
                        0,
                    );
                }
                sent += n as u64;
            }
            let at_shutdown = received.load(Ordering::SeqCst);
            let err = stream
                .shutdown(Shutdown::Write)
                .err()
                .map(|e| format!("shutdown: {}", errno_name(&e)));
            (sent, err, at_shutdown)
        }
    };
    /// The writer's outcome: (bytes sent, error, bytes received when it shut down).
    type Written = (u64, Option<String>, u64);
    enum Writer {
        Done(Written),
        Running(std::thread::JoinHandle<Written>),
    }
    let writer = if args.flag("read-after-shutdown") {
        Writer::Done(writer())
    } else {
        Writer::Running(std::thread::spawn(writer))
    };
    let mut reader = stream;
    let mut buf = vec![0u8; 256 * 1024];
    report.matched = true;
    loop {
        match read_patiently(&mut reader, &mut buf, timeout) {
            Ok(0) => {
                report.eof = true;
                break;
            }
            Ok(n) => {
                let offset = received.fetch_add(n as u64, Ordering::SeqCst);
                if report.matched
                    && buf[..n]
                        .iter()
                        .enumerate()
                        .any(|(i, &b)| b != pattern(offset + i as u64))
                {
                    report.matched = false;
                }
            }
            Err(e) => {
                report.errors.push(format!("read: {}", error_kind(&e)));
                break;
            }
        }
    }
    let (sent, err, at_shutdown) = match writer {
        Writer::Done(w) => w,
        Writer::Running(h) => h
            .join()
            .map_err(|_| anyhow::anyhow!("the writer thread panicked"))?,
    };
    report.sent = sent;
    report.errors.extend(err);
    report.received = received.load(Ordering::SeqCst);
    report.after_shutdown = report.received - at_shutdown.min(report.received);
    print_json(&report)?;
    Ok(ExitCode::SUCCESS)
}
