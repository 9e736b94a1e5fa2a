//! Typed drivers for the `mesh-workload` binary, and the reports it prints.
//!
//! The report structs are shared with the binary (`src/bin/mesh-workload.rs`), so the JSON it
//! prints and the JSON the tests parse cannot drift apart. The drivers spawn the workload
//! inside a node (namespace + workload cgroup) with every wait bounded.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};

use crate::bed::Node;
use crate::host;
use crate::process::Proc;

/// How long a server may take to print `ready`.
const READY_TIMEOUT: Duration = Duration::from_secs(5);

/// What `tcp-client` saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct TcpClientReport {
    /// Backend name (first line the server sent) → connections that reached it.
    pub backends: BTreeMap<String, u64>,
    /// Errno name (`ECONNREFUSED`, `ETIMEDOUT` for any timeout, `EOF` for a connection closed
    /// before the name line) → count.
    pub errors: BTreeMap<String, u64>,
    /// Distinct `getpeername()` results of the successful connections, first one first.
    pub peer: Vec<String>,
}

impl TcpClientReport {
    /// Connections that reached a backend.
    pub fn ok(&self) -> u64 {
        self.backends.values().sum()
    }

    /// Connections that failed.
    pub fn failed(&self) -> u64 {
        self.errors.values().sum()
    }

    /// Fraction of successful connections that reached `backend`.
    pub fn share(&self, backend: &str) -> f64 {
        let ok = self.ok();
        if ok == 0 {
            return 0.0;
        }
        self.backends.get(backend).copied().unwrap_or(0) as f64 / ok as f64
    }
}

/// What `tcp-hold` saw over its one long-lived connection.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct HoldReport {
    /// The backend the connection reached (empty if it never connected as asked).
    pub backend: String,
    /// Connections made to land on the wanted backend.
    pub attempts: u64,
    /// Lines sent.
    pub sent: u64,
    /// Lines echoed back correctly.
    pub echoed: u64,
    /// Anything that went wrong, in order.
    pub errors: Vec<String>,
}

/// What `tcp-many` saw over its connections, all open at once.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ManyReport {
    /// Backend name → connections that reached it.
    pub backends: BTreeMap<String, u64>,
    /// Connections whose own line came back exactly.
    pub echoed: u64,
    /// Errno name (as in [`TcpClientReport`], `BAD_ECHO` for a wrong echo) → count.
    pub errors: BTreeMap<String, u64>,
}

/// What `udp-client` saw.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct UdpClientReport {
    /// Backend name (before the `:` of a reply) → replies.
    pub backends: BTreeMap<String, u64>,
    /// Errno name (`ETIMEDOUT` for a reply that did not come) → count.
    pub errors: BTreeMap<String, u64>,
    /// Distinct source addresses `recv_from` reported for replies.
    pub sources: Vec<String>,
    /// `getpeername()` of the socket when `--connected`.
    pub peer: Vec<String>,
}

impl UdpClientReport {
    /// Replies received.
    pub fn ok(&self) -> u64 {
        self.backends.values().sum()
    }
}

/// One `pingpong` run: `size`-byte messages for `duration`, a round trip every `pace` (back
/// to back when zero).
#[derive(Debug, Clone, Copy)]
pub struct PingPong {
    pub size: usize,
    pub duration: Duration,
    pub pace: Duration,
}

/// What `pingpong` measured over one connection: `size` bytes written, the same `size` bytes
/// read back, repeated.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
pub struct PingPongReport {
    /// Bytes per message.
    pub size: u64,
    /// Round trips completed (each echo checked byte for byte).
    pub messages: u64,
    pub messages_per_sec: f64,
    /// Median and 99th percentile round-trip time, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// The slowest round trip, microseconds.
    #[serde(default)]
    pub max_us: f64,
    /// Bytes sent (and received back) in total.
    pub bytes: u64,
    /// What went wrong, if anything (the run stops at the first error).
    pub errors: Vec<String>,
}

/// What `echo-stream` saw: `total` bytes written in `write_size` writes by one thread, the
/// socket's write side shut down, and the echo read until EOF by another.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct StreamReport {
    pub sent: u64,
    /// Bytes read back before EOF.
    pub received: u64,
    /// Whether every byte read back matched what was sent at that offset.
    pub matched: bool,
    /// Bytes that arrived after the write side was shut down (the half-close worked).
    pub after_shutdown: u64,
    /// The read side ended with EOF (not an error or timeout).
    pub eof: bool,
    pub errors: Vec<String>,
}

/// When `echo-stream` reads the echo.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReadMode {
    /// While writing (any total works).
    Concurrent,
    /// Only after writing everything and shutting the write side down (proves half-close; the
    /// total must fit in the path's buffers).
    AfterShutdown,
}

/// A running `tcp-hold`: connected to [`Hold::backend`], exchanging lines until its duration
/// ends.
#[derive(Debug)]
pub struct Hold {
    proc: Proc,
    /// The backend the connection reached.
    pub backend: String,
    timeout: Duration,
}

impl Hold {
    /// Whether the hold is still exchanging lines.
    pub fn is_running(&self) -> bool {
        self.proc.is_running()
    }

    /// Waits for the hold to end by itself and returns its report.
    pub fn finish(self) -> Result<HoldReport> {
        let out = self.proc.finish(self.timeout)?.ok(self.proc.label())?;
        parse_last_json(&out.stdout)
    }
}

/// A workload running in the background that prints a report of type `R` when it ends.
#[derive(Debug)]
pub struct Running<R> {
    proc: Proc,
    timeout: Duration,
    report: std::marker::PhantomData<R>,
}

impl<R: serde::de::DeserializeOwned> Running<R> {
    fn new(proc: Proc, timeout: Duration) -> Self {
        Running {
            proc,
            timeout,
            report: std::marker::PhantomData,
        }
    }

    /// Waits (bounded) for it to end by itself and returns its report.
    pub fn finish(self) -> Result<R> {
        let out = self.proc.finish(self.timeout)?.ok(self.proc.label())?;
        parse_last_json(&out.stdout)
    }
}

/// A running `tcp-many` whose connections are all open.
pub type Many = Running<ManyReport>;

/// A running `tcp-client` loop (new connections one after another for a while).
pub type ClientLoop = Running<TcpClientReport>;

/// A `mesh-workload` command with `args`.
pub fn command(args: &[&str]) -> Result<Command> {
    let mut cmd = Command::new(host::workload_bin()?);
    cmd.args(args);
    Ok(cmd)
}

fn parse_last_json<T: serde::de::DeserializeOwned>(stdout: &str) -> Result<T> {
    let line = stdout
        .lines()
        .rev()
        .find(|l| l.starts_with('{'))
        .with_context(|| format!("no JSON report in output {stdout:?}"))?;
    serde_json::from_str(line).with_context(|| format!("parsing report {line:?}"))
}

fn ms(d: Duration) -> String {
    d.as_millis().to_string()
}

impl crate::TestBed {
    /// Adds node `name` with a TCP server named after it on `<its address>:port` (workload
    /// `server`), as most single-node tests begin; the server's address is returned with it.
    pub fn add_node_with_server(&self, name: &str, port: u16) -> Result<(Node, SocketAddr, Proc)> {
        let node = self.add_node(name)?;
        let backend = SocketAddr::new(node.ipv4().into(), port);
        let server = node.tcp_server("server", backend, name)?;
        Ok((node, backend, server))
    }
}

impl Node {
    /// Starts a TCP server named `name` on `listen` in workload cgroup `workload`; returns
    /// once it listens.
    pub fn tcp_server(&self, workload: &str, listen: SocketAddr, name: &str) -> Result<Proc> {
        let addr = listen.to_string();
        let p = self.spawn(
            workload,
            command(&["tcp-server", "--listen", &addr, "--name", name])?,
        )?;
        p.wait_line(READY_TIMEOUT, |l| l == "ready")?;
        Ok(p)
    }

    /// Starts a TCP server like [`Node::tcp_server`] that also answers HTTP requests with
    /// `status` (a health-check target).
    pub fn http_server(
        &self,
        workload: &str,
        listen: SocketAddr,
        name: &str,
        status: u16,
    ) -> Result<Proc> {
        let addr = listen.to_string();
        let status = status.to_string();
        let p = self.spawn(
            workload,
            command(&[
                "tcp-server",
                "--listen",
                &addr,
                "--name",
                name,
                "--http-status",
                &status,
            ])?,
        )?;
        p.wait_line(READY_TIMEOUT, |l| l == "ready")?;
        Ok(p)
    }

    /// Starts a raw echo server on `listen` (bytes back as they come, half-close passed on);
    /// returns once it listens.
    pub fn echo_server(&self, workload: &str, listen: SocketAddr) -> Result<Proc> {
        let addr = listen.to_string();
        let p = self.spawn(workload, command(&["echo-server", "--listen", &addr])?)?;
        p.wait_line(READY_TIMEOUT, |l| l == "ready")?;
        Ok(p)
    }

    /// Ping-pong of `size`-byte messages over one connection to `target` (an echo server) for
    /// `duration`, back to back, from workload cgroup `workload`.
    pub fn pingpong(
        &self,
        workload: &str,
        target: SocketAddr,
        size: usize,
        duration: Duration,
    ) -> Result<PingPongReport> {
        let run = PingPong {
            size,
            duration,
            pace: Duration::ZERO,
        };
        self.pingpong_with(&host::workload_bin()?, workload, target, &run)
    }

    /// [`Node::pingpong`] as `run` says, with an explicit `mesh-workload` binary (benchmarks
    /// name the one they built).
    pub fn pingpong_with(
        &self,
        bin: &Path,
        workload: &str,
        target: SocketAddr,
        run: &PingPong,
    ) -> Result<PingPongReport> {
        let (addr, size) = (target.to_string(), run.size.to_string());
        let mut cmd = Command::new(bin);
        cmd.args([
            "pingpong",
            "--target",
            &addr,
            "--size",
            &size,
            "--duration-ms",
            &ms(run.duration),
            "--interval-ms",
            &ms(run.pace),
        ]);
        let out = self
            .run(workload, cmd, run.duration + Duration::from_secs(15))?
            .ok("pingpong")?;
        parse_last_json(&out.stdout)
    }

    /// Streams `total` bytes in `write_size` writes to `target` (an echo server), shuts the
    /// write side down and reads the echo until EOF, as `mode` says; each read bounded by
    /// `timeout`.
    pub fn echo_stream(
        &self,
        workload: &str,
        target: SocketAddr,
        total: usize,
        write_size: usize,
        mode: ReadMode,
        timeout: Duration,
    ) -> Result<StreamReport> {
        let (addr, total, write_size) = (
            target.to_string(),
            total.to_string(),
            write_size.to_string(),
        );
        let timeout_ms = ms(timeout);
        let mut args = vec![
            "echo-stream",
            "--target",
            &addr,
            "--total",
            &total,
            "--write-size",
            &write_size,
            "--timeout-ms",
            &timeout_ms,
        ];
        if mode == ReadMode::AfterShutdown {
            args.push("--read-after-shutdown");
        }
        let cmd = command(&args)?;
        let out = self
            .run(workload, cmd, timeout * 4 + Duration::from_secs(10))?
            .ok("echo-stream")?;
        parse_last_json(&out.stdout)
    }

    /// Starts a UDP server named `name` on `listen`; returns once it is bound.
    pub fn udp_server(&self, workload: &str, listen: SocketAddr, name: &str) -> Result<Proc> {
        let addr = listen.to_string();
        let p = self.spawn(
            workload,
            command(&["udp-server", "--listen", &addr, "--name", name])?,
        )?;
        p.wait_line(READY_TIMEOUT, |l| l == "ready")?;
        Ok(p)
    }

    /// Makes `count` sequential TCP connections to `target` from workload cgroup `workload`,
    /// each bounded by `timeout`, and reports which backends answered.
    pub fn tcp_client(
        &self,
        workload: &str,
        target: SocketAddr,
        count: u32,
        timeout: Duration,
    ) -> Result<TcpClientReport> {
        self.tcp_client_hold(workload, target, count, timeout, Duration::ZERO)
    }

    /// [`Node::tcp_client`], keeping each connection open for `hold` before closing it.
    pub fn tcp_client_hold(
        &self,
        workload: &str,
        target: SocketAddr,
        count: u32,
        timeout: Duration,
        hold: Duration,
    ) -> Result<TcpClientReport> {
        let (addr, n) = (target.to_string(), count.to_string());
        let cmd = command(&[
            "tcp-client",
            "--connect",
            &addr,
            "--count",
            &n,
            "--timeout-ms",
            &ms(timeout),
            "--hold-ms",
            &ms(hold),
        ])?;
        // Each connection: connect + read, each bounded by timeout, then the hold.
        let bound = (timeout * 2 + hold) * count + Duration::from_secs(5);
        let out = self.run(workload, cmd, bound)?.ok("tcp-client")?;
        parse_last_json(&out.stdout)
    }

    /// Starts a `tcp-hold` to `target`: one connection sending a line every `interval` for
    /// `duration`, checking each echo. With `want`, reconnects (up to 200 times) until the
    /// connection lands on that backend. Returns once connected.
    pub fn tcp_hold(
        &self,
        workload: &str,
        target: SocketAddr,
        interval: Duration,
        duration: Duration,
        want: Option<&str>,
    ) -> Result<Hold> {
        let addr = target.to_string();
        let (interval_ms, duration_ms) = (ms(interval), ms(duration));
        let mut args = vec![
            "tcp-hold",
            "--connect",
            &addr,
            "--interval-ms",
            &interval_ms,
            "--duration-ms",
            &duration_ms,
        ];
        if let Some(w) = want {
            args.extend(["--want", w, "--max-attempts", "200"]);
        }
        let p = self.spawn(workload, command(&args)?)?;
        let line = p.wait_line(Duration::from_secs(10), |l| l.starts_with("connected "))?;
        let backend = line["connected ".len()..].to_string();
        Ok(Hold {
            proc: p,
            backend,
            timeout: duration + Duration::from_secs(10),
        })
    }

    /// Starts a `tcp-many`: `count` connections to `target` open at once, each echoing its
    /// own line, kept open for `hold` once all have echoed. Returns once they have (each
    /// connection bounded by `timeout`); [`Many::finish`] gives the report.
    pub fn tcp_many(
        &self,
        workload: &str,
        target: SocketAddr,
        count: u32,
        timeout: Duration,
        hold: Duration,
    ) -> Result<Many> {
        let (addr, n) = (target.to_string(), count.to_string());
        let p = self.spawn(
            workload,
            command(&[
                "tcp-many",
                "--connect",
                &addr,
                "--count",
                &n,
                "--timeout-ms",
                &ms(timeout),
                "--hold-ms",
                &ms(hold),
            ])?,
        )?;
        // Connecting is sequential and fast when it works (about 1 ms per flow through the
        // tunnel on a busy 2-core machine); a failing connection costs up to `timeout` more.
        let bound = Duration::from_secs(10) + Duration::from_millis(5) * count + timeout * 4;
        p.wait_line(bound, |l| l.starts_with("echoed "))?;
        Ok(Many::new(p, hold + Duration::from_secs(10)))
    }

    /// Starts a `tcp-client` loop to `target` from workload cgroup `workload`: a new
    /// connection every `interval` (each bounded by 1 s) until `duration` has passed (at most
    /// 100,000). Returns once it runs; [`ClientLoop::finish`] gives what it saw.
    pub fn tcp_client_loop(
        &self,
        workload: &str,
        target: SocketAddr,
        duration: Duration,
        interval: Duration,
    ) -> Result<ClientLoop> {
        let addr = target.to_string();
        let cmd = command(&[
            "tcp-client",
            "--connect",
            &addr,
            "--count",
            "100000",
            "--timeout-ms",
            "1000",
            "--duration-ms",
            &ms(duration),
            "--interval-ms",
            &ms(interval),
        ])?;
        let p = self.spawn(workload, cmd)?;
        p.wait_line(READY_TIMEOUT, |l| l == "looping")?;
        Ok(ClientLoop::new(p, duration + Duration::from_secs(10)))
    }

    /// Sends `count` datagrams to `target` (one at a time, each waiting up to `timeout` for
    /// its reply) from an unconnected socket, or a connected one if `connected`.
    pub fn udp_client(
        &self,
        workload: &str,
        target: SocketAddr,
        count: u32,
        connected: bool,
        timeout: Duration,
    ) -> Result<UdpClientReport> {
        let (addr, n) = (target.to_string(), count.to_string());
        let t = ms(timeout);
        let mut args = vec![
            "udp-client",
            "--target",
            &addr,
            "--count",
            &n,
            "--timeout-ms",
            &t,
        ];
        if connected {
            args.push("--connected");
        }
        let bound = timeout * count + Duration::from_secs(5);
        let out = self
            .run(workload, command(&args)?, bound)?
            .ok("udp-client")?;
        parse_last_json(&out.stdout)
    }
}
