//! The loopback sockmap on path 2: `[mtls] loopback_sockmap`.
//!
//! Node `a` runs the client, node `b` a raw echo server behind the strict service `echo`. The
//! kernel on `a` redirects a connect to the VIP to `a`'s outbound listener; with the sockmap on,
//! both ends of that loopback hop join the sockhash and their messages skip loopback TCP (the
//! `loopback_redirected` counter). `a`'s agent runs inside one of `a`'s cgroups, as on a host
//! whose programs attach to the root cgroup, so `sock_ops` sees its accepted sockets too.
//!
//! The tests assert on what a real client saw (every byte echoed in order, half-close passed
//! on), on the kernel counters, and on the programs the kernel holds.
//!
//! Needs root, cgroup2, bpffs, bpftool and built `mesh-agent` / `mesh-workload`; fails, never
//! skips.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::config::Service;
use mesh_tests::mtls::{self, Ca, MtlsTable};
use mesh_tests::workload::ReadMode;
use mesh_tests::{host, Agent, Node, OrFail, Proc, Signal, TestBed};

const VIP: &str = "10.96.0.31:80";
const BACKEND_PORT: u16 = 9090;
const CLIENT_ID: &str = "spiffe://mesh.test/ns/shop/sa/client";
/// How long an agent's start or a change may take to show.
const SETTLE: Duration = Duration::from_secs(10);
/// Bound of each read and write of the stream clients.
const IO_TIMEOUT: Duration = Duration::from_secs(5);
/// The largest write the tests make, and the total of the bulk stream.
const WRITE: usize = 64 * 1024;
const BULK: usize = 1024 * 1024;

fn vip() -> SocketAddr {
    VIP.parse().expect("socket address")
}

/// Two nodes with agents; `a`'s agent runs in `a`'s cgroup `mesh-agent` with the sockmap
/// switched as asked, `b` serves the echo backend.
struct Pair {
    // Fields drop in order: processes before the nodes.
    agent_a: Agent,
    _agent_b: Agent,
    _server: Proc,
    a: Node,
    _b: Node,
}

fn pair(bed: &TestBed, loopback_sockmap: bool) -> Result<Pair> {
    let a = bed.add_node("a")?;
    let b = bed.add_node("b")?;
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let server = b.echo_server("server", backend)?;
    let ca = Ca::init(bed, "ca")?;
    let node_a = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a")?;
    let node_b = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")?;
    let client = ca.issue(bed, CLIENT_ID, "client")?;
    let echo = [Service::tcp("echo", vip(), &[backend]).with("mtls = \"strict\"")];
    let table_b = MtlsTable {
        ca_bundle: &ca.cert,
        node_cert: &node_b,
        workloads: &[],
        options: "",
    };
    let options = format!("loopback_sockmap = {loopback_sockmap}\n");
    let table_a = MtlsTable {
        ca_bundle: &ca.cert,
        node_cert: &node_a,
        workloads: &[("client", CLIENT_ID, &client)],
        options: &options,
    };
    let agent_b = b.start_agent(&mtls::config(&b, &echo, &table_b, "")?)?;
    let agent_a = Agent::start_in(
        &a,
        host::agent_bin()?,
        "mesh-agent",
        &mtls::config(&a, &echo, &table_a, "")?,
    )?;
    for agent in [&agent_a, &agent_b] {
        agent.wait_status(SETTLE, |st| {
            Agent::backends_in(st, "echo") == [backend.to_string()]
        })?;
    }
    Ok(Pair {
        agent_a,
        _agent_b: agent_b,
        _server: server,
        a,
        _b: b,
    })
}

/// Small and 64 KB ping-pong, a 1 MB stream in 64 KB writes, and a half-closed stream all
/// come back whole and in order; returns the ping-pong messages exchanged.
fn exchange_everything(a: &Node) -> Result<u64> {
    let mut messages = 0;
    for size in [64, 1500, WRITE] {
        let r = a.pingpong("client", vip(), size, Duration::from_millis(400))?;
        if !r.errors.is_empty() || r.messages == 0 {
            bail!("ping-pong of {size} B failed: {r:?}");
        }
        messages += r.messages;
    }
    let bulk = a.echo_stream(
        "client",
        vip(),
        BULK,
        WRITE,
        ReadMode::Concurrent,
        IO_TIMEOUT,
    )?;
    if !(bulk.errors.is_empty()
        && bulk.sent == BULK as u64
        && bulk.received == bulk.sent
        && bulk.matched
        && bulk.eof)
    {
        bail!("the 1 MB stream did not echo whole and in order: {bulk:?}");
    }
    Ok(messages)
}

#[test]
fn sockmap_on_carries_every_message_size_and_half_close_through_the_redirect() {
    let bed = TestBed::new("sockmap_on").or_fail();
    let p = pair(&bed, true).or_fail();
    let before = p.agent_a.counter("loopback_redirected").or_fail();
    let tunneled_before = p.agent_a.counter("mtls_redirected").or_fail();

    let messages = exchange_everything(&p.a).or_fail();

    // Half-close: every byte is written and the write side shut down before anything is
    // read; the echo must still arrive in full, then EOF.
    let r = echo_stream_after_shutdown(&p.a).or_fail();
    assert!(
        r.errors.is_empty()
            && r.sent == 48 * 1024
            && r.received == r.sent
            && r.after_shutdown == r.received
            && r.matched
            && r.eof,
        "the echo of a half-closed connection: {r:?}"
    );

    let after = p.agent_a.counter("loopback_redirected").or_fail();
    // Each ping-pong message is at least one send by the client and one by the agent, both
    // redirected.
    assert!(
        after >= before + 2 * messages,
        "loopback_redirected went {before} -> {after} for {messages} ping-pong messages"
    );
    let tunneled = p.agent_a.counter("mtls_redirected").or_fail();
    // Three ping-pongs, the bulk stream and the half-closed one: five flows.
    assert!(
        tunneled >= tunneled_before + 5,
        "every flow still went through the tunnel: mtls_redirected {tunneled_before} -> {tunneled}"
    );
}

#[test]
fn sockmap_off_leaves_the_loopback_hop_to_tcp() {
    let bed = TestBed::new("sockmap_off").or_fail();
    let p = pair(&bed, false).or_fail();
    exchange_everything(&p.a).or_fail();
    let r = echo_stream_after_shutdown(&p.a).or_fail();
    assert!(r.received == r.sent && r.matched && r.eof, "{r:?}");
    assert_eq!(
        p.agent_a.counter("loopback_redirected").or_fail(),
        0,
        "with loopback_sockmap = false no message may be redirected"
    );
}

#[test]
fn agent_restart_with_sockmap_fails_closed_and_attaches_once() {
    let bed = TestBed::new("sockmap_restart").or_fail();
    let mut p = pair(&bed, true).or_fail();
    exchange_everything(&p.a).or_fail();
    let pin = sockhash_pin(&p.a);
    assert_eq!(
        sk_msg_programs_on(&pin).or_fail().len(),
        1,
        "one sk_msg program on the sockhash"
    );

    p.agent_a.kill(Signal::Kill).or_fail();
    let dead =
        p.a.pingpong("client", vip(), 64, Duration::from_millis(200))
            .or_fail();
    assert_eq!(
        dead.messages, 0,
        "a flow got through a dead agent: {dead:?}"
    );
    assert_eq!(
        dead.errors,
        ["connect: ECONNREFUSED"],
        "the redirect to the dead agent's listener is refused: {dead:?}"
    );

    p.agent_a.restart().or_fail();
    let before = p.agent_a.counter("loopback_redirected").or_fail();
    let deadline = Instant::now() + SETTLE;
    loop {
        let r =
            p.a.pingpong("client", vip(), 64, Duration::from_millis(200))
                .or_fail();
        if r.errors.is_empty() && r.messages > 0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "no flow after the restart: {r:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
    let messages = exchange_everything(&p.a).or_fail();
    let after = p.agent_a.counter("loopback_redirected").or_fail();
    assert!(
        after >= before + 2 * messages,
        "the restarted agent's flows are redirected: {before} -> {after}"
    );
    // The new program replaced the old one on the map; once the old one's sockets are gone it
    // is freed, and exactly one remains.
    let deadline = Instant::now() + SETTLE;
    loop {
        let progs = sk_msg_programs_on(&pin).or_fail();
        if progs.len() == 1 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "sk_msg programs on the sockhash after a restart: {progs:?}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// 48 KB in 4 KB writes, the write side shut down, and only then the echo read.
fn echo_stream_after_shutdown(a: &Node) -> Result<mesh_tests::StreamReport> {
    a.echo_stream(
        "client",
        vip(),
        48 * 1024,
        4096,
        ReadMode::AfterShutdown,
        IO_TIMEOUT,
    )
}

/// Where node `a`'s agent pins the loopback sockhash.
fn sockhash_pin(a: &Node) -> PathBuf {
    a.bpffs_dir()
        .join("mesh")
        .join(a.full_name())
        .join("maps/MESH_LOSOCK_V1")
}

/// Ids of the loaded `sk_msg` programs that use the map pinned at `pin`.
fn sk_msg_programs_on(pin: &Path) -> Result<Vec<u64>> {
    let bpftool = |args: &[&std::ffi::OsStr]| -> Result<serde_json::Value> {
        let out = Command::new("bpftool")
            .arg("-j")
            .args(args)
            .output()
            .context("running bpftool (apt-get install bpftool)")?;
        if !out.status.success() {
            bail!("bpftool {args:?}: {}", String::from_utf8_lossy(&out.stderr));
        }
        serde_json::from_slice(&out.stdout).context("parsing bpftool's JSON")
    };
    let map = bpftool(&[
        "map".as_ref(),
        "show".as_ref(),
        "pinned".as_ref(),
        pin.as_os_str(),
    ])?;
    let map_id = map["id"].as_u64().context("the sockhash has no id")?;
    let progs = bpftool(&["prog".as_ref(), "show".as_ref()])?;
    Ok(progs
        .as_array()
        .into_iter()
        .flatten()
        .filter(|p| p["type"] == "sk_msg")
        .filter(|p| {
            p["map_ids"]
                .as_array()
                .is_some_and(|ids| ids.iter().any(|id| id.as_u64() == Some(map_id)))
        })
        .filter_map(|p| p["id"].as_u64())
        .collect())
}
