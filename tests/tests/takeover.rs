//! Upgrades without a gap (`mesh-agent run --takeover`) and the drain on SIGTERM, end to end.
//!
//! Node `a` runs the clients, node `b` the echo backend of the strict mTLS service `pay`; both
//! agents tunnel it (certificates from the real `mesh-agent ca init` / `cert issue`). The
//! clients are real: 20 `tcp-hold` flows echoing a line every 100 ms and a `tcp-client` loop
//! of new connects, and the assertions are on what they saw (echoes, errors by errno) and on
//! the old agents' processes (running while their flows are open, gone once they ended). The
//! upgrade test also health-checks the strict backend through the tunnel (a's agent asks b's)
//! and wants no probe to fail across the upgrades.
//!
//! Another has a successor fail after it received the sockets: the old agent serves on.
//! A third test replaces an agent of a gossip mesh and checks the successor gossips on the
//! socket it was handed (a registration made on it reaches the other node).
//!
//! Needs root, cgroup2, bpffs and built `mesh-agent` / `mesh-workload`; fails, never skips.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use mesh_tests::config::{gossip_table, render, Service};
use mesh_tests::mtls::{self, Ca, MtlsTable};
use mesh_tests::{Agent, HoldReport, Node, OrFail, Proc, Signal, TestBed};

const VIP: &str = "10.96.0.40:80";
const BACKEND_PORT: u16 = 8080;
const CLIENT_ID: &str = "spiffe://mesh.test/ns/shop/sa/client";
/// Long-lived flows and their echo period.
const FLOWS: usize = 20;
const ECHO_EVERY: Duration = Duration::from_millis(100);
/// The bound of a connect, and the pause between two of the loop's.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
const CONNECT_EVERY: Duration = Duration::from_millis(10);
/// How long an agent's start may take to show.
const SETTLE: Duration = Duration::from_secs(10);

fn vip() -> SocketAddr {
    VIP.parse().expect("socket address")
}

/// A TCP check of `pay`'s backend; through the tunnel from `a`, run by `b`'s agent.
const HEALTH: &str = "health = { interval_ms = 500, timeout_ms = 200, healthy_threshold = 1, unhealthy_threshold = 2 }";

/// Nodes `a` (clients) and `b` (backend) with their agents; `args_a` go to `a`'s agent,
/// `service` is an extra line of `pay` (may be empty).
struct Pair {
    // Fields drop in order: processes before the nodes.
    agent_a: Agent,
    agent_b: Agent,
    _server: Proc,
    a: Node,
    _b: Node,
    marker: String,
    /// `a`'s agent config.
    config_a: String,
}

fn pair(bed: &TestBed, args_a: &[&str], service: &str) -> Pair {
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let marker = format!("takeover-{}", std::process::id());
    let server = b.tcp_server("server", backend, &marker).or_fail();
    let pay = || {
        Service::tcp("pay", vip(), &[backend])
            .with("mtls = \"strict\"")
            .with(service)
    };
    let ca = Ca::init(bed, "ca").or_fail();
    let node_a = ca
        .issue(bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a")
        .or_fail();
    let node_b = ca
        .issue(bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")
        .or_fail();
    let client = ca.issue(bed, CLIENT_ID, "client").or_fail();
    let table = |node_cert, workloads| MtlsTable {
        ca_bundle: &ca.cert,
        node_cert,
        workloads,
        options: "",
    };
    let config_b = mtls::config(&b, &[pay()], &table(&node_b, &[]), "").or_fail();
    let workloads = [("client", CLIENT_ID, &client)];
    let config_a = mtls::config(&a, &[pay()], &table(&node_a, &workloads), "").or_fail();
    let agent_b = b.start_agent(&config_b).or_fail();
    let agent_a = Agent::start_with_args(&a, &config_a, args_a).or_fail();
    let config_a = config_a.clone();
    for agent in [&agent_a, &agent_b] {
        agent
            .wait_status(SETTLE, |st| {
                Agent::backends_in(st, "pay") == [backend.to_string()]
            })
            .or_fail();
    }
    Pair {
        agent_a,
        agent_b,
        _server: server,
        a,
        _b: b,
        marker,
        config_a,
    }
}

/// The long-lived flows from `a`, each echoing every [`ECHO_EVERY`] for `duration`.
fn holds(p: &Pair, duration: Duration) -> Vec<mesh_tests::workload::Hold> {
    (0..FLOWS)
        .map(|_| {
            let hold =
                p.a.tcp_hold("client", vip(), ECHO_EVERY, duration, None)
                    .or_fail();
            assert_eq!(hold.backend, p.marker, "the flow reached the backend");
            hold
        })
        .collect()
}

fn finish(holds: Vec<mesh_tests::workload::Hold>) -> Vec<HoldReport> {
    holds.into_iter().map(|h| h.finish().or_fail()).collect()
}

#[test]
fn takeover_of_both_agents_refuses_and_resets_nothing() {
    let bed = TestBed::new("takeover_upgrade").or_fail();
    let mut p = pair(&bed, &[], HEALTH);
    let hold_for = Duration::from_secs(16);
    let flows = holds(&p, hold_for);
    let flows_started = Instant::now();
    let connects =
        p.a.tcp_client_loop("client", vip(), Duration::from_secs(9), CONNECT_EVERY)
            .or_fail();
    std::thread::sleep(Duration::from_secs(1));

    // (i) the client-side agent, then (ii) the server-side one.
    let upgrade_a = Instant::now();
    let old_a = p.agent_a.takeover().or_fail();
    let took_a = upgrade_a.elapsed();
    std::thread::sleep(Duration::from_secs(2));
    assert!(
        old_a.is_running(),
        "the old client-side agent exited while its flows were open"
    );
    let upgrade_b = Instant::now();
    let old_b = p.agent_b.takeover().or_fail();
    let took_b = upgrade_b.elapsed();
    assert_ne!(
        Some(old_b.pid()),
        p.agent_b.pid(),
        "a new server-side agent"
    );

    let report = connects.finish().or_fail();
    eprintln!(
        "takeover: a in {took_a:?}, b in {took_b:?}; connect loop: {report:?}; flows open for {:?}",
        flows_started.elapsed()
    );
    assert!(
        report.errors.is_empty(),
        "new strict connects failed across the upgrades (refused, reset, timed out): {report:?}"
    );
    assert!(
        report.ok() >= 100 && report.backends.get(&p.marker) == Some(&report.ok()),
        "the connect loop reached the backend throughout: {report:?}"
    );
    assert!(
        flows_started.elapsed() < hold_for - Duration::from_secs(1),
        "the test was too slow to check the old agents while the flows are open"
    );
    assert!(
        old_a.is_running() && old_b.is_running(),
        "an old agent exited while its flows were open"
    );

    let reports = finish(flows);
    let closed = Instant::now();
    let min_echoes = (hold_for.as_millis() / ECHO_EVERY.as_millis() / 2) as u64;
    for (i, r) in reports.iter().enumerate() {
        assert!(
            r.errors.is_empty() && r.echoed == r.sent && r.sent >= min_echoes,
            "flow {i} was cut or lost an echo across the upgrades: {r:?}"
        );
    }
    for (side, old) in [("client", &old_a), ("server", &old_b)] {
        let status = old
            .wait_timeout(Duration::from_secs(10))
            .or_fail()
            .unwrap_or_else(|| {
                panic!("the old {side}-side agent still runs 10 s after its flows closed")
            });
        assert!(
            status.success(),
            "the old {side}-side agent exited with {status}"
        );
    }
    eprintln!(
        "old agents exited {:?} after the flows closed; echoes per flow: {:?}",
        closed.elapsed(),
        reports.iter().map(|r| r.echoed).collect::<Vec<_>>()
    );
    for (side, agent) in [("client", &p.agent_a), ("server", &p.agent_b)] {
        assert!(
            !agent.log().contains("backend unhealthy"),
            "a health probe through the tunnel failed across the upgrades ({side} side)"
        );
    }
    let probed = p.agent_a.query_json("endpoints").or_fail();
    assert!(
        probed.to_string().contains("\"healthy\""),
        "the successor's probes through the tunnel pass: {probed}"
    );
    // The successors serve on their own.
    let after =
        p.a.tcp_client("client", vip(), 10, CONNECT_TIMEOUT)
            .or_fail();
    assert_eq!(after.backends.get(&p.marker), Some(&10), "{after:?}");
    assert!(p.agent_a.is_running() && p.agent_b.is_running());
}

#[test]
fn sigterm_drains_open_flows_until_the_timeout_and_refuses_new_ones() {
    let bed = TestBed::new("takeover_sigterm").or_fail();
    let drain = Duration::from_secs(3);
    let p = pair(&bed, &["--drain-timeout", "3s"], "");
    let flows = holds(&p, Duration::from_secs(20));
    let term = Instant::now();
    p.agent_a.signal(Signal::Term).or_fail();
    std::thread::sleep(Duration::from_millis(300));

    // New strict connects are refused by the closed listener, never passed in clear.
    let refused =
        p.a.tcp_client("client", vip(), 10, CONNECT_TIMEOUT)
            .or_fail();
    assert_eq!(
        refused.ok(),
        0,
        "a connect reached the backend: {refused:?}"
    );
    assert_eq!(
        refused.errors.get("ECONNREFUSED"),
        Some(&10),
        "a draining agent refuses new strict connects: {refused:?}"
    );

    // The open flows keep echoing until the drain timeout (tcp-hold stops at its first error).
    std::thread::sleep((drain - Duration::from_millis(500)).saturating_sub(term.elapsed()));
    assert!(
        p.agent_a.is_running(),
        "the agent exited before the drain timeout"
    );
    let running = flows.iter().filter(|h| h.is_running()).count();
    assert_eq!(running, FLOWS, "flows were cut before the drain timeout");

    let status = p
        .agent_a
        .wait_exit(drain + Duration::from_secs(5))
        .or_fail()
        .expect("the agent exits after the drain timeout");
    let exited = term.elapsed();
    assert!(status.success(), "the draining agent exited with {status}");
    assert!(
        exited >= drain && exited < drain + Duration::from_secs(3),
        "the agent exited {exited:?} after SIGTERM, drain timeout {drain:?}"
    );
    let reports = finish(flows);
    let min_echoes = (drain.as_millis() / ECHO_EVERY.as_millis() / 2) as u64;
    for (i, r) in reports.iter().enumerate() {
        assert!(
            r.echoed >= min_echoes && r.echoed + 1 >= r.sent && r.errors.len() == 1,
            "flow {i} should echo until the drain ends, then be cut once: {r:?}"
        );
    }
    eprintln!(
        "SIGTERM: agent exited after {exited:?}; echoes per flow: {:?}; cut with: {:?}",
        reports.iter().map(|r| r.echoed).collect::<Vec<_>>(),
        reports[0].errors
    );
}

#[test]
fn takeover_hands_the_gossip_socket_over_and_the_successor_gossips_on_it() {
    let bed = TestBed::new("takeover_gossip").or_fail();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let web = "10.96.0.41:80"
        .parse::<SocketAddr>()
        .expect("socket address");
    let b = bed.add_node("b").or_fail();
    let a = bed.add_node("a").or_fail();
    let gossip = |node: &Node| {
        gossip_table(
            node.ipv4().into(),
            &[b.ipv4().into()],
            &key,
            &["interval = \"100ms\"".to_owned()],
        )
    };
    let first = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let second = SocketAddr::new(b.ipv4().into(), BACKEND_PORT + 1);
    let _servers = [
        b.tcp_server("server", first, "first").or_fail(),
        b.tcp_server("server", second, "second").or_fail(),
    ];
    // b announces web; a defines nothing and learns it through gossip only.
    let mut agent_b = b
        .start_agent(&(render("b", &[Service::tcp("web", web, &[first])]) + &gossip(&b)))
        .or_fail();
    let agent_a = a.start_agent(&(render("a", &[]) + &gossip(&a))).or_fail();
    let has = |want: &[SocketAddr]| {
        let mut want: Vec<String> = want.iter().map(ToString::to_string).collect();
        want.sort();
        move |st: &serde_json::Value| Agent::backends_in(st, "web") == want
    };
    agent_a.wait_status(SETTLE * 2, has(&[first])).or_fail();

    let connects = a
        .tcp_client_loop("client", web, Duration::from_secs(4), CONNECT_EVERY)
        .or_fail();
    std::thread::sleep(Duration::from_secs(1));
    let old_b = agent_b.takeover().or_fail();
    // Without [mtls] there is nothing to drain: the old agent exits once it handed over.
    let status = old_b
        .wait_timeout(Duration::from_secs(5))
        .or_fail()
        .expect("the old agent exits after the handover");
    assert!(status.success(), "the old agent exited with {status}");
    let log = agent_b.log();
    assert!(
        log.contains("taking over from the running agent") && log.contains("Gossip"),
        "the successor received the gossip socket\n{log}"
    );
    // A registration on the successor reaches a: it gossips on the socket it was handed.
    agent_b
        .cli(&[
            "register".as_ref(),
            "--service".as_ref(),
            "web".as_ref(),
            "--address".as_ref(),
            second.to_string().as_ref(),
            "--admin-socket".as_ref(),
            agent_b.socket_path().as_os_str(),
        ])
        .or_fail()
        .ok("mesh-agent register")
        .or_fail();
    agent_a.wait_status(SETTLE, has(&[first, second])).or_fail();
    let report = connects.finish().or_fail();
    eprintln!("gossip takeover: connect loop {report:?}");
    assert!(
        report.errors.is_empty() && report.ok() > 100,
        "connects from a failed while b's agent was replaced: {report:?}"
    );
}

#[test]
fn a_successor_that_fails_after_the_handover_leaves_the_old_agent_serving() {
    let bed = TestBed::new("takeover_failed").or_fail();
    let mut p = pair(&bed, &[], "");
    let flows = holds(&p, Duration::from_secs(8));
    let connects =
        p.a.tcp_client_loop("client", vip(), Duration::from_secs(5), CONNECT_EVERY)
            .or_fail();
    std::thread::sleep(Duration::from_secs(1));
    // Its inbound port is the metrics port, which the running agent holds and hands over as
    // metrics: the successor fails to bind it after it received the sockets and installed
    // the data plane.
    let bad = p
        .config_a
        .replace("[mtls]\n", "[mtls]\ninbound_port = 15020\n");
    let failed = p.agent_a.run_takeover_with(&bad).or_fail();
    assert!(
        !failed.status.success() && failed.stderr.contains("15020"),
        "the successor fails on the port: {failed:?}"
    );
    assert!(p.agent_a.is_running(), "the old agent went away");
    assert!(
        p.agent_a.log().contains("takeover failed; serving again"),
        "{}",
        p.agent_a.log()
    );
    let report = connects.finish().or_fail();
    eprintln!("failed takeover: connect loop {report:?}");
    assert!(
        report.errors.is_empty() && report.ok() > 100,
        "connects failed around the failed takeover: {report:?}"
    );
    for (i, r) in finish(flows).iter().enumerate() {
        assert!(
            r.errors.is_empty() && r.echoed == r.sent,
            "flow {i} suffered from the failed takeover: {r:?}"
        );
    }
    // The old agent serves as before: a good successor takes over from it.
    let old = p.agent_a.takeover().or_fail();
    let status = old
        .wait_timeout(Duration::from_secs(10))
        .or_fail()
        .expect("the old agent, with no flow open, exits after the handover");
    assert!(status.success(), "the old agent exited with {status}");
    let after =
        p.a.tcp_client("client", vip(), 10, CONNECT_TIMEOUT)
            .or_fail();
    assert_eq!(after.backends.get(&p.marker), Some(&10), "{after:?}");
}
