//! End-to-end load-balancing scenarios: a client node `a` runs `mesh-agent`, backend nodes run
//! named servers, and each test asserts on what the clients saw (which backend answered, which
//! errors, which peer address) and on the agent's status.
//!
//! Needs root, cgroup2, bpffs and a built `mesh-agent` (`MESH_AGENT_BIN`, else
//! `target/release`, else `target/debug`); fails, never skips, without them. Every test has its
//! own bed (unique prefix), so they may run in parallel.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::backends::{Backends, Protocol};
use mesh_tests::cgroup;
use mesh_tests::config::{line_of, render, Backend, Service};
use mesh_tests::{Agent, Node, OrFail, Signal, TcpClientReport, TestBed};

/// Per-connection timeout of the clients.
const T: Duration = Duration::from_secs(1);
/// How long the agent may take to apply a config change.
const APPLY: Duration = Duration::from_secs(5);
/// Backends listen here on their node's address.
const BACKEND_PORT: u16 = 8080;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// A bed with client node `a` and one backend node per name, each running a server named
/// after its node on `BACKEND_PORT`.
struct Bed {
    // Fields drop in order: servers before the nodes and the bed.
    backends: Backends,
    a: Node,
    /// Held only for its teardown, which runs last.
    _bed: TestBed,
}

impl Bed {
    fn new(test: &str, names: &[&str], proto: Protocol, ipv6: bool) -> Result<Self> {
        let bed = TestBed::new(test)?;
        let a = bed.add_node("a")?;
        let backends = Backends::start(&bed, names, proto, ipv6, BACKEND_PORT)?;
        Ok(Self {
            backends,
            a,
            _bed: bed,
        })
    }

    fn addrs(&self) -> Vec<SocketAddr> {
        self.backends.addrs()
    }

    fn addr_of(&self, name: &str) -> SocketAddr {
        self.backends.addr_of(name).or_fail()
    }

    /// Starts the agent on `a` with `services` and waits until the status shows them.
    fn start_agent(&self, services: &[Service]) -> Result<Agent> {
        let agent = self.a.start_agent(&render("a", services))?;
        wait_applied(&agent, services)?;
        Ok(agent)
    }
}

fn sorted(v: impl IntoIterator<Item = impl ToString>) -> Vec<String> {
    let mut v: Vec<String> = v.into_iter().map(|x| x.to_string()).collect();
    v.sort();
    v
}

/// Waits until the status lists every service with exactly its backends.
fn wait_applied(agent: &Agent, services: &[Service]) -> Result<serde_json::Value> {
    agent.wait_status(APPLY, |st| {
        services.iter().all(|svc| {
            Agent::backends_in(st, &svc.name) == sorted(svc.backends.iter().map(|b| &b.address))
        })
    })
}

fn assert_spread(r: &TcpClientReport, names: &[&str], min_share: f64) {
    assert!(r.errors.is_empty(), "errors: {r:?}");
    for n in names {
        let share = r.share(n);
        assert!(
            share >= min_share,
            "backend {n} got {share:.2} < {min_share} of connections: {r:?}"
        );
    }
    assert_eq!(r.backends.len(), names.len(), "unexpected backends: {r:?}");
}

/// Each attach type, how many times it is attached directly to `cg`.
fn attach_counts(cg: &std::path::Path) -> Result<BTreeMap<String, usize>> {
    let mut m = BTreeMap::new();
    for t in cgroup::bpf_attach_types(cg)? {
        *m.entry(t).or_insert(0) += 1;
    }
    Ok(m)
}

const HOOKS: [&str; 9] = [
    "connect4",
    "connect6",
    "sendmsg4",
    "sendmsg6",
    "recvmsg4",
    "recvmsg6",
    "getpeername4",
    "getpeername6",
    "sock_release",
];

/// a. Three backends, 300 connections: each gets at least 20 %, no errors, every connection
/// counted as rewritten.
#[test]
fn tcp_spreads_over_backends() {
    let s = Bed::new(
        "tcp_spreads_over_backends",
        &["b", "c", "d"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let agent = s
        .start_agent(&[Service::tcp("web", vip, &s.addrs())])
        .or_fail();
    let before = agent.counter("forwarded").or_fail();
    let r = s.a.tcp_client("client", vip, 300, T).or_fail();
    assert_eq!(r.ok(), 300, "{r:?}");
    assert_spread(&r, &["b", "c", "d"], 0.20);
    let forwarded = agent.counter("forwarded").or_fail() - before;
    assert!(forwarded >= 300, "counters.forwarded grew by {forwarded}");
}

/// b. Weights 1:3 with `lb = "weighted"`: the heavy backend gets 65-85 % of 400 connections.
#[test]
fn weighted_follows_weights() {
    let s = Bed::new(
        "weighted_follows_weights",
        &["b", "c"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let svc = Service::tcp("web", vip, &[]).lb("weighted").backends(vec![
        Backend::weighted(s.addr_of("b"), 1),
        Backend::weighted(s.addr_of("c"), 3),
    ]);
    let _agent = s.start_agent(&[svc]).or_fail();
    let r = s.a.tcp_client("client", vip, 400, T).or_fail();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.ok(), 400, "{r:?}");
    let heavy = r.share("c");
    assert!(
        (0.65..=0.85).contains(&heavy),
        "heavy share {heavy:.3}: {r:?}"
    );
}

/// c. With affinity, every connection of one client cgroup lands on one backend, for a second
/// cgroup too; with random and with Maglev balancing.
#[test]
fn affinity_sticks_per_client() {
    let s = Bed::new(
        "affinity_sticks_per_client",
        &["b", "c", "d"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let random = Service::tcp("web", sa("10.96.0.10:80"), &s.addrs()).affinity("true");
    let maglev = Service::tcp("web2", sa("10.96.0.11:80"), &s.addrs())
        .lb("maglev")
        .affinity("true");
    let _agent = s.start_agent(&[random, maglev]).or_fail();
    for vip in [sa("10.96.0.10:80"), sa("10.96.0.11:80")] {
        for client in ["client1", "client2"] {
            let r = s.a.tcp_client(client, vip, 30, T).or_fail();
            assert!(r.errors.is_empty(), "{vip} {client}: {r:?}");
            assert_eq!(r.ok(), 30, "{vip} {client}: {r:?}");
            assert_eq!(r.backends.len(), 1, "{vip} {client} not sticky: {r:?}");
        }
    }
}

/// c2. Affinity survives backend churn: with 12 client cgroups pinned by affinity over 3
/// backends, removing one backend moves only the clients that were on it; every other client
/// keeps its backend (about 1/N of clients move, as the design promises).
#[test]
fn affinity_moves_only_the_departed_backends_clients() {
    let s = Bed::new(
        "affinity_moves_only_the_departed_backends_clients",
        &["b", "c", "d"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let web = Service::tcp("web", vip, &s.addrs()).affinity("\"cgroup\"");
    let agent = s.start_agent(std::slice::from_ref(&web)).or_fail();
    let clients: Vec<String> = (0..12).map(|i| format!("client{i}")).collect();
    let backend_of = |client: &str| -> String {
        let r = s.a.tcp_client(client, vip, 3, T).or_fail();
        assert_eq!(r.ok(), 3, "{client}: {r:?}");
        assert_eq!(r.backends.len(), 1, "{client} not sticky: {r:?}");
        r.backends.keys().next().cloned().expect("one backend")
    };
    let before: Vec<String> = clients.iter().map(|c| backend_of(c)).collect();
    let on_d = before.iter().filter(|b| *b == "d").count();

    let remaining =
        Service::tcp("web", vip, &[s.addr_of("b"), s.addr_of("c")]).affinity("\"cgroup\"");
    agent
        .write_config(&render("a", std::slice::from_ref(&remaining)))
        .or_fail();
    wait_applied(&agent, std::slice::from_ref(&remaining)).or_fail();

    let after: Vec<String> = clients.iter().map(|c| backend_of(c)).collect();
    for ((client, was), now) in clients.iter().zip(&before).zip(&after) {
        assert_ne!(now, "d", "{client} still reached the removed backend");
        if was != "d" {
            assert_eq!(
                was, now,
                "{client} moved from {was} to {now} though {was} stayed"
            );
        }
    }
    let moved = before.iter().zip(&after).filter(|(a, b)| a != b).count();
    assert_eq!(
        moved, on_d,
        "exactly the clients of the removed backend move"
    );
}

/// d. A backend removed from the file: shortly after the status shows the new set no new
/// connection reaches it, while an established connection to it keeps echoing.
#[test]
fn removed_backend_drains_without_breaking_connections() {
    let s = Bed::new(
        "removed_backend_drains_without_breaking_connections",
        &["b", "c", "d"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let web = Service::tcp("web", vip, &s.addrs());
    let agent = s.start_agent(std::slice::from_ref(&web)).or_fail();
    let hold =
        s.a.tcp_hold(
            "holder",
            vip,
            Duration::from_millis(50),
            Duration::from_millis(3000),
            Some("d"),
        )
        .or_fail();
    assert_eq!(hold.backend, "d");

    let without_d = Service::tcp("web", vip, &[s.addr_of("b"), s.addr_of("c")]);
    agent
        .write_config(&render("a", std::slice::from_ref(&without_d)))
        .or_fail();
    wait_applied(&agent, std::slice::from_ref(&without_d)).or_fail();
    let applied = Instant::now();
    assert!(
        hold.is_running(),
        "the hold ended before the change applied; lengthen it"
    );
    std::thread::sleep(Duration::from_millis(100).saturating_sub(applied.elapsed()));
    for burst in 0..3 {
        let r = s.a.tcp_client("client", vip, 20, T).or_fail();
        assert!(r.errors.is_empty(), "burst {burst}: {r:?}");
        assert!(
            !r.backends.contains_key("d"),
            "burst {burst} reached the removed backend: {r:?}"
        );
    }
    let held = hold.finish().or_fail();
    assert_eq!(held.backend, "d");
    assert!(held.errors.is_empty(), "{held:?}");
    assert_eq!(held.echoed, held.sent, "{held:?}");
    assert!(held.sent >= 20, "{held:?}");
}

/// e. UDP through a VIP: replies come from the backends, and `recv_from` reports the VIP as
/// their source, for unconnected and connected sockets.
#[test]
fn udp_replies_come_from_the_vip() {
    let s = Bed::new(
        "udp_replies_come_from_the_vip",
        &["b", "c"],
        Protocol::Udp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.53:53");
    let _agent = s
        .start_agent(&[Service::udp("dns", vip, &s.addrs())])
        .or_fail();

    let r = s.a.udp_client("client", vip, 30, false, T).or_fail();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.ok(), 30, "{r:?}");
    assert!(r.backends.keys().all(|b| b == "b" || b == "c"), "{r:?}");
    assert_eq!(r.sources, vec![vip.to_string()], "{r:?}");

    let r = s.a.udp_client("client", vip, 10, true, T).or_fail();
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.ok(), 10, "{r:?}");
    assert_eq!(
        r.backends.len(),
        1,
        "a connected socket has one backend: {r:?}"
    );
    assert_eq!(r.sources, vec![vip.to_string()], "{r:?}");
    assert_eq!(r.peer, vec![vip.to_string()], "{r:?}");
}

/// f. An IPv6 VIP in front of IPv6 backends: TCP works, spreads, and shows the VIP as peer.
#[test]
fn ipv6_vip_spreads() {
    let s = Bed::new("ipv6_vip_spreads", &["b", "c", "d"], Protocol::Tcp, true).or_fail();
    let vip = sa("[fd00:96::10]:80");
    let _agent = s
        .start_agent(&[Service::tcp("web", vip, &s.addrs())])
        .or_fail();
    let r = s.a.tcp_client("client", vip, 150, T).or_fail();
    assert_eq!(r.ok(), 150, "{r:?}");
    assert_spread(&r, &["b", "c", "d"], 0.20);
    assert_eq!(r.peer, vec![vip.to_string()], "{r:?}");
}

/// g. `getpeername` on a connection to the VIP returns the VIP, not the backend.
#[test]
fn getpeername_shows_the_vip() {
    let s = Bed::new(
        "getpeername_shows_the_vip",
        &["b", "c"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let _agent = s
        .start_agent(&[Service::tcp("web", vip, &s.addrs())])
        .or_fail();
    let r = s.a.tcp_client("client", vip, 10, T).or_fail();
    assert_eq!(r.ok(), 10, "{r:?}");
    assert_eq!(r.peer, vec![vip.to_string()], "{r:?}");
    // A direct connection still shows the real peer.
    let direct = s.addr_of("b");
    let r = s.a.tcp_client("client", direct, 2, T).or_fail();
    assert_eq!(r.peer, vec![direct.to_string()], "{r:?}");
}

/// g2. A closed socket takes its reverse record with it (cgroup/sock_release), so records do not
/// pile up until the LRU evicts; an open connection keeps its record and its VIP peer name.
#[test]
fn reverse_records_leave_with_their_sockets() {
    let s = Bed::new(
        "reverse_records_leave_with_their_sockets",
        &["b"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let _agent = s
        .start_agent(&[Service::tcp("web", vip, &s.addrs())])
        .or_fail();
    let rev_map =
        s.a.bpffs_dir()
            .join("mesh")
            .join(s.a.full_name())
            .join("maps/MESH_REV_V1");
    let entries = || -> usize {
        let out = std::process::Command::new("bpftool")
            .args(["-j", "map", "dump", "pinned"])
            .arg(&rev_map)
            .output()
            .or_fail();
        assert!(
            out.status.success(),
            "bpftool: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        serde_json::from_slice::<Vec<serde_json::Value>>(&out.stdout)
            .or_fail()
            .len()
    };
    let hold =
        s.a.tcp_hold(
            "holder",
            vip,
            Duration::from_millis(50),
            Duration::from_millis(1500),
            None,
        )
        .or_fail();
    let r = s.a.tcp_client("client", vip, 40, T).or_fail();
    assert_eq!(r.ok(), 40, "{r:?}");
    assert_eq!(r.peer, vec![vip.to_string()], "{r:?}");
    // The 40 closed connections left nothing; the one still open keeps its record.
    assert_eq!(entries(), 1, "reverse records while one connection is open");
    let held = hold.finish().or_fail();
    assert!(
        held.errors.is_empty() && held.echoed == held.sent,
        "{held:?}"
    );
    assert_eq!(
        entries(),
        0,
        "reverse records after every connection closed"
    );
}

/// h. SIGKILL the agent mid-traffic: established connections keep working, new ones are still
/// balanced by the pinned programs, and a restarted agent adopts its attachments instead of
/// duplicating them.
#[test]
fn agent_killed_and_restarted_keeps_the_data_plane() {
    let s = Bed::new(
        "agent_killed_and_restarted_keeps_the_data_plane",
        &["b", "c"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let mut agent = s
        .start_agent(&[Service::tcp("web", vip, &s.addrs())])
        .or_fail();
    let hold =
        s.a.tcp_hold(
            "holder",
            vip,
            Duration::from_millis(50),
            Duration::from_millis(3000),
            None,
        )
        .or_fail();
    std::thread::sleep(Duration::from_millis(200));
    agent.kill(Signal::Kill).or_fail();
    assert!(!agent.is_running(), "agent survived SIGKILL");

    let r = s.a.tcp_client("client", vip, 40, T).or_fail();
    assert_eq!(r.ok(), 40, "with the agent dead: {r:?}");
    assert_spread(&r, &["b", "c"], 0.10);

    agent.restart().or_fail();
    let counts = attach_counts(s.a.cgroup().path()).or_fail();
    for hook in HOOKS {
        assert_eq!(
            counts.get(hook),
            Some(&1),
            "{hook} attached {:?} times after restart: {counts:?}",
            counts.get(hook)
        );
    }
    assert!(
        counts.values().all(|&n| n == 1),
        "duplicate attachments after restart: {counts:?}"
    );
    let r = s.a.tcp_client("client", vip, 20, T).or_fail();
    assert_eq!(r.ok(), 20, "after restart: {r:?}");

    let held = hold.finish().or_fail();
    assert!(held.errors.is_empty(), "{held:?}");
    assert_eq!(held.echoed, held.sent, "{held:?}");
}

/// i. A bad backend address in the live file is rejected with file:line and the field in the
/// log, the last good state stays in force, and `mesh-agent check` rejects the file too.
#[test]
fn invalid_config_keeps_the_last_good_state() {
    let s = Bed::new(
        "invalid_config_keeps_the_last_good_state",
        &["b", "c"],
        Protocol::Tcp,
        false,
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let good = Service::tcp("web", vip, &s.addrs());
    let agent = s.start_agent(std::slice::from_ref(&good)).or_fail();

    let bad_addr = "10.1.0.300:8080";
    let bad = good
        .clone()
        .backends(vec![Backend::new(s.addr_of("b")), Backend::new(bad_addr)]);
    let bad_text = render("a", &[bad]);
    let line = line_of(&bad_text, bad_addr).context("bad line").or_fail();
    agent.write_config(&bad_text).or_fail();
    let where_ = format!("{}:{line}", agent.config_path().display());
    let deadline = Instant::now() + APPLY;
    while !agent.log().contains(&where_) {
        assert!(
            Instant::now() < deadline,
            "agent log does not name {where_} within {APPLY:?}:\n{}",
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    let log = agent.log();
    let err_line = log
        .lines()
        .find(|l| l.contains(&where_))
        .expect("found above");
    assert!(
        err_line.contains("address"),
        "the error does not name the field: {err_line}"
    );

    let st = agent.status_json().or_fail();
    assert_eq!(
        Agent::backends_in(&st, "web"),
        sorted(s.addrs()),
        "the last good backends must stay: {st}"
    );
    let r = s.a.tcp_client("client", vip, 40, T).or_fail();
    assert_eq!(r.ok(), 40, "{r:?}");
    assert_spread(&r, &["b", "c"], 0.10);

    let checked = agent.check(agent.config_path()).or_fail();
    assert!(
        !checked.status.success(),
        "check accepted a bad file: {checked:?}"
    );
    assert!(
        checked.stderr.contains(&where_),
        "check does not name {where_}: {}",
        checked.stderr
    );

    // A good file afterwards applies.
    let only_b = Service::tcp("web", vip, &[s.addr_of("b")]);
    agent
        .write_config(&render("a", std::slice::from_ref(&only_b)))
        .or_fail();
    wait_applied(&agent, &[only_b]).or_fail();
}

/// j. A VIP with no backends and a VIP port with no service are refused by the data plane; a
/// connection to an address that is no VIP passes through untouched.
#[test]
fn refusals_and_passthrough() {
    let s = Bed::new("refusals_and_passthrough", &["b"], Protocol::Tcp, false).or_fail();
    let web = Service::tcp("web", sa("10.96.0.10:80"), &s.addrs());
    let empty = Service::tcp("empty", sa("10.96.0.20:80"), &[]);
    let agent = s.start_agent(&[web, empty]).or_fail();
    let counter = |name: &str| agent.counter(name);
    let (no_backend, no_port, passthrough) = (
        counter("no_backend").or_fail(),
        counter("no_service_port").or_fail(),
        counter("passthrough").or_fail(),
    );

    let r =
        s.a.tcp_client("client", sa("10.96.0.20:80"), 3, T)
            .or_fail();
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&3), "no backends: {r:?}");
    let r =
        s.a.tcp_client("client", sa("10.96.0.10:81"), 3, T)
            .or_fail();
    assert_eq!(
        r.errors.get("ECONNREFUSED"),
        Some(&3),
        "no such port: {r:?}"
    );
    assert!(counter("no_backend").or_fail() >= no_backend + 3);
    assert!(counter("no_service_port").or_fail() >= no_port + 3);

    // Nobody has this address on the bed's subnet: the connect is neither rewritten nor
    // refused by mesh, it just gets no answer.
    let nobody = SocketAddr::new(std::net::Ipv4Addr::new(10, 1, 0, 250).into(), 80);
    let r =
        s.a.tcp_client("client", nobody, 2, Duration::from_millis(300))
            .or_fail();
    assert_eq!(r.ok(), 0, "{r:?}");
    assert_eq!(r.failed(), 2, "{r:?}");
    assert!(!r.errors.contains_key("ECONNREFUSED"), "{r:?}");
    let grown = counter("passthrough").or_fail() - passthrough;
    assert!(grown >= 2, "counters.passthrough grew by {grown}");
}

/// The service map's promise, at its edge: 65,536 entries, one per frontend and one per
/// distinct VIP (its marker), so 32,768 services each on a VIP of its own fit and the last one
/// balances; one more is refused with its cause and the kernel keeps serving; and at full
/// capacity a service can still be swapped for a new one on a new VIP.
#[test]
fn a_full_service_map_holds_32768_services_refuses_one_more_and_still_takes_a_swap() {
    const FIT: u32 = 32_768;
    let s = Bed::new("a_full_service_map", &["b"], Protocol::Tcp, false).or_fail();
    let backend = s.addr_of("b");
    // 10.128.0.1, 10.128.0.2, …: a VIP each, out of the bed's 10.1.0.0/16.
    let vip = |n: u32| SocketAddr::new(std::net::Ipv4Addr::from(0x0a80_0001 + n).into(), 80);
    let services = |range: std::ops::Range<u32>| -> Vec<Service> {
        range
            .map(|n| Service::tcp(&format!("svc{n}"), vip(n), &[backend]))
            .collect()
    };
    let agent = s.start_agent(&services(0..1)).or_fail();
    let mut applied = agent.follow_applied();
    let mut apply = |list: &[Service], count: usize| {
        let since = std::time::SystemTime::now();
        agent.write_config(&render("a", list)).or_fail();
        applied
            .wait(since, Duration::from_secs(60), |a| a.services == count)
            .or_fail();
    };

    apply(&services(0..FIT), FIT as usize);
    let last = s.a.tcp_client("client", vip(FIT - 1), 3, T).or_fail();
    assert_eq!(last.ok(), 3, "the last service balances: {last:?}");

    // One more is refused as a whole, saying why; the kernel keeps all of the last good set.
    agent
        .write_config(&render("a", &services(0..FIT + 1)))
        .or_fail();
    let status = agent
        .wait_status(Duration::from_secs(60), |st| st["config_error"].is_string())
        .or_fail();
    let error = status["config_error"].as_str().unwrap_or_default();
    assert!(
        error.contains("too many services") && error.contains("65536"),
        "{error}"
    );
    assert_eq!(
        status["services"].as_array().map(Vec::len),
        Some(FIT as usize)
    );
    assert_eq!(
        s.a.tcp_client("client", vip(FIT - 1), 3, T).or_fail().ok(),
        3
    );

    // Full, the first service leaves and a new one on a new VIP comes: the swap applies.
    let mut swapped = services(1..FIT);
    swapped.push(Service::tcp("newcomer", vip(FIT + 10), &[backend]));
    apply(&swapped, FIT as usize);
    let newcomer = s.a.tcp_client("client", vip(FIT + 10), 3, T).or_fail();
    assert_eq!(newcomer.ok(), 3, "the newcomer balances: {newcomer:?}");
    let gone = s.a.tcp_client("client", vip(0), 1, T).or_fail();
    assert_eq!(gone.ok(), 0, "the swapped-out service is gone: {gone:?}");
}
