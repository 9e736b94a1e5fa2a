//! Nobody gets in: what an operator's mistake or a hostile holder of a mesh certificate tries,
//! and what it gets now, asserted on real sockets.
//!
//! - `mesh-agent register` refuses every endpoint that would point the mesh somewhere it must
//!   not go (unknown service, wrong family, loopback, unspecified, broadcast, multicast,
//!   link-local, a VIP, port 0), naming the rule, and the kernel holds none of them.
//! - A peer with a valid mesh certificate and the mesh key that announces a port of the
//!   backend host as an endpoint (a private server there, which the backend host does not
//!   announce) is refused by the backend host's inbound tunnel although the catalog holds it:
//!   no client byte reaches the private server, and the refusals are counted.
//!
//! Needs root, cgroup2, bpffs and built `mesh-agent` / `mesh-workload`; fails, never skips.

use std::net::SocketAddr;
use std::time::Duration;

use mesh_tests::config::{gossip_table, render, Service};
use mesh_tests::mtls::{self, Ca, MtlsTable};
use mesh_tests::{metrics, Agent, OrFail, TestBed};

const VIP: &str = "10.96.0.40:80";
const BACKEND_PORT: u16 = 8080;
const PRIVATE_PORT: u16 = 9090;

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

#[test]
fn register_refuses_what_the_mesh_must_not_reach_naming_the_rule() {
    let bed = TestBed::new("hardening_register").or_fail();
    let a = bed.add_node("a").or_fail();
    let backend = SocketAddr::new(a.ipv4().into(), BACKEND_PORT);
    let _server = a.tcp_server("server", backend, "a").or_fail();
    let services = [
        Service::tcp("web", sa(VIP), &[backend]),
        Service::tcp("dns", sa("10.96.0.53:53"), &[backend]),
    ];
    let agent = a.start_agent(&render("a", &services)).or_fail();
    let register = |service: &str, address: &str| {
        agent
            .cli(&[
                "register".as_ref(),
                "--admin-socket".as_ref(),
                agent.socket_path().as_os_str(),
                "--service".as_ref(),
                service.as_ref(),
                "--address".as_ref(),
                address.as_ref(),
            ])
            .or_fail()
    };
    for (service, address, rule) in [
        ("nosuch", "10.1.0.9:80", "not in the catalog"),
        ("web", "[fd00::9]:80", "same address family"),
        ("web", "127.0.0.1:15020", "loopback"),
        ("web", "0.0.0.0:80", "unspecified"),
        ("web", "255.255.255.255:80", "broadcast"),
        ("web", "224.0.0.1:80", "multicast"),
        ("web", "169.254.0.1:80", "link-local"),
        ("web", "10.96.0.53:53", "the VIP of service dns"),
        ("web", "10.1.0.9:0", "port 0"),
    ] {
        let out = register(service, address);
        assert!(!out.status.success(), "{service} {address} was accepted: {out:?}");
        assert!(
            out.stderr.contains(rule),
            "{service} {address}: no {rule:?} in {out:?}"
        );
    }
    let status = agent.status_json().or_fail();
    assert_eq!(
        Agent::backends_in(&status, "web"),
        [backend.to_string()],
        "{status}"
    );
    // A good one still registers.
    let good = SocketAddr::new(a.ipv4().into(), BACKEND_PORT + 1).to_string();
    register("web", &good).ok("register").or_fail();
    agent
        .wait_status(Duration::from_secs(5), |st| {
            Agent::backends_in(st, "web").contains(&good)
        })
        .or_fail();
}

#[test]
fn a_peer_cannot_tunnel_to_what_the_backend_host_does_not_announce() {
    let bed = TestBed::new("hardening_tunnel").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let private = SocketAddr::new(b.ipv4().into(), PRIVATE_PORT);
    let _server = b.tcp_server("server", backend, "pay").or_fail();
    let _private = b.tcp_server("private", private, "private").or_fail();
    let ca = Ca::init(&bed, "ca").or_fail();
    let node_a = ca.issue(&bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a").or_fail();
    let node_b = ca.issue(&bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b").or_fail();
    let table = |node_cert| MtlsTable {
        ca_bundle: &ca.cert,
        node_cert,
        workloads: &[],
        options: "",
    };
    let pay = |backends: &[SocketAddr]| {
        Service::tcp("pay", sa(VIP), backends).with("mtls = \"strict\"")
    };
    // b announces its one backend; a (holding a valid certificate and the mesh key) announces
    // b's private port as an endpoint of pay too, so b's catalog holds it.
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let gossip = |node: &mesh_tests::Node| {
        gossip_table(
            node.ipv4().into(),
            &[b.ipv4().into()],
            &key,
            &["interval = \"100ms\"".to_owned()],
        )
    };
    let agent_b = b
        .start_agent(
            &(mtls::config(&b, &[pay(&[backend])], &table(&node_b), "").or_fail() + &gossip(&b)),
        )
        .or_fail();
    let agent_a = a
        .start_agent(
            &(mtls::config(&a, &[pay(&[backend, private])], &table(&node_a), "").or_fail()
                + &gossip(&a)),
        )
        .or_fail();
    let both = {
        let mut v = vec![backend.to_string(), private.to_string()];
        v.sort();
        v
    };
    for agent in [&agent_a, &agent_b] {
        agent
            .wait_status(Duration::from_secs(10), |st| {
                Agent::backends_in(st, "pay") == both
            })
            .or_fail();
    }
    let report = a
        .tcp_client("client", sa(VIP), 40, Duration::from_secs(2))
        .or_fail();
    assert_eq!(
        report.backends.get("private"),
        None,
        "the private server was reached: {report:?}"
    );
    assert!(report.backends.get("pay").copied().unwrap_or(0) > 0, "{report:?}");
    assert!(report.failed() > 0, "no connect was sent to the private port: {report:?}");
    // Every refused flow is counted on b.
    let scrape = metrics::scrape(&b).or_fail();
    let refused: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("mesh_mtls_flows_total") && l.contains("unknown_target"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, report.failed() as f64, "{report:?}\n{scrape}");
}
