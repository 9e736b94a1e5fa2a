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
//! - Gossip frames captured on the wire and replayed (to the running agent, and to the same
//!   agent restarted after the sender died) are dropped and counted, draw no reply, and bring
//!   no member back.
//!
//! Needs root, cgroup2, bpffs and built `mesh-agent` / `mesh-workload`; fails, never skips.

use std::net::{SocketAddr, UdpSocket};
use std::process::Command;
use std::time::Duration;

use mesh_tests::config::{gossip_table, render, Service, GOSSIP_PORT};
use mesh_tests::mtls::{self, Ca, MtlsTable};
use mesh_tests::process::{self, Capture};
use mesh_tests::{metrics, Agent, Node, OrFail, Signal, TestBed};

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
        assert!(
            !out.status.success(),
            "{service} {address} was accepted: {out:?}"
        );
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
    let node_a = ca
        .issue(&bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a")
        .or_fail();
    let node_b = ca
        .issue(&bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")
        .or_fail();
    let table = |node_cert| MtlsTable {
        ca_bundle: &ca.cert,
        node_cert,
        workloads: &[],
        options: "",
    };
    let pay =
        |backends: &[SocketAddr]| Service::tcp("pay", sa(VIP), backends).with("mtls = \"strict\"");
    // b announces its one backend; a (holding a valid certificate and the mesh key) announces
    // b's private port as an endpoint of pay too, so b's catalog holds it.
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let gossip = |node: &Node| {
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
    assert!(
        report.backends.get("pay").copied().unwrap_or(0) > 0,
        "{report:?}"
    );
    assert!(
        report.failed() > 0,
        "no connect was sent to the private port: {report:?}"
    );
    // Every refused flow is counted on b.
    let scrape = metrics::scrape(&b).or_fail();
    let refused: f64 = scrape
        .lines()
        .filter(|l| l.starts_with("mesh_mtls_flows_total") && l.contains("unknown_target"))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum();
    assert_eq!(refused, report.failed() as f64, "{report:?}\n{scrape}");
}

/// The UDP payloads of an Ethernet/IPv4 pcap file (what tcpdump `-w` writes).
fn udp_payloads(pcap: &[u8]) -> Vec<Vec<u8>> {
    let mut out = Vec::new();
    let mut at = 24;
    while at + 16 <= pcap.len() {
        let incl = u32::from_le_bytes(pcap[at + 8..at + 12].try_into().unwrap()) as usize;
        let packet = &pcap[at + 16..(at + 16 + incl).min(pcap.len())];
        at += 16 + incl;
        // Ethernet (14) → IPv4 (IHL words) → UDP (8).
        if packet.len() < 14 + 20 || packet[12..14] != [0x08, 0x00] {
            continue;
        }
        let ihl = usize::from(packet[14] & 0x0f) * 4;
        if packet[14 + 9] != 17 || packet.len() < 14 + ihl + 8 {
            continue;
        }
        out.push(packet[14 + ihl + 8..].to_vec());
    }
    out
}

/// Captures `count` gossip datagrams that `from` sends to `to` (on `from`'s bridge port).
fn capture_gossip(bed: &TestBed, from: &Node, to: &Node, count: usize) -> Vec<Vec<u8>> {
    let file = bed.tmpdir().join(format!("{}-gossip.pcap", from.name()));
    let mut cmd = Command::new("tcpdump");
    let filter = format!(
        "udp and src host {} and dst host {} and dst port {GOSSIP_PORT}",
        from.ipv4(),
        to.ipv4()
    );
    cmd.args(["-i", &format!("p-{}", from.name()), "-n", "-U", "-s", "0"])
        .args(["-c", &count.to_string(), "-w"])
        .arg(&file)
        .arg(filter);
    process::spawn("tcpdump", cmd, Some(bed.switch()), None, Capture::Lines)
        .or_fail()
        .finish(Duration::from_secs(20))
        .or_fail()
        .ok("tcpdump")
        .or_fail();
    let frames = udp_payloads(&std::fs::read(&file).or_fail());
    assert_eq!(frames.len(), count, "captured {} frames", frames.len());
    assert!(
        frames.iter().all(|f| f.starts_with(b"MGS2")),
        "not gossip frames"
    );
    frames
}

/// Sends `frames` to `to`'s gossip port from `attacker`, and returns how many bytes came back
/// within 1 s.
fn replay(attacker: &Node, to: &Node, frames: &[Vec<u8>]) -> usize {
    let target = SocketAddr::new(to.ipv4().into(), GOSSIP_PORT);
    let frames = frames.to_vec();
    attacker
        .netns()
        .run_in(move || -> anyhow::Result<usize> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            for frame in &frames {
                s.send_to(frame, target)?;
            }
            s.set_read_timeout(Some(Duration::from_secs(1)))?;
            let mut buf = [0; 65_536];
            let mut back = 0;
            while let Ok((n, _)) = s.recv_from(&mut buf) {
                back += n;
            }
            Ok(back)
        })
        .or_fail()
        .or_fail()
}

/// Gossip datagrams `node` dropped as replayed or stale
/// (`mesh_gossip_auth_failures_total{kind}`).
fn replays_dropped(node: &Node) -> f64 {
    let text = metrics::scrape(node).or_fail();
    ["replayed", "stale"]
        .iter()
        .filter_map(|kind| {
            metrics::value(
                &text,
                &format!("mesh_gossip_auth_failures_total{{kind=\"{kind}\"}}"),
            )
        })
        .sum()
}

/// Waits (up to 5 s) until `node` has dropped `want` more replays than `before`.
fn wait_replays_dropped(node: &Node, before: f64, want: usize) {
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    loop {
        let dropped = replays_dropped(node) - before;
        if dropped == want as f64 {
            return;
        }
        assert!(
            dropped < want as f64 && std::time::Instant::now() < deadline,
            "{dropped} replays dropped, {want} sent"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn replayed_gossip_is_dropped_counted_draws_no_reply_and_resurrects_nobody() {
    let bed = TestBed::new("hardening_replay").or_fail();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let mut members = Vec::new();
    for name in ["a", "b", "c"] {
        let node = bed.add_node(name).or_fail();
        let backend = SocketAddr::new(node.ipv4().into(), BACKEND_PORT);
        let server = node.tcp_server("server", backend, name).or_fail();
        let seed = members
            .first()
            .map_or(node.ipv4(), |(n, _, _): &(Node, Agent, _)| n.ipv4());
        let config = render(name, &[Service::tcp("web", sa(VIP), &[backend])])
            + &gossip_table(
                node.ipv4().into(),
                &[seed.into()],
                &key,
                &["interval = \"100ms\"".to_owned()],
            );
        let agent = node.start_agent(&config).or_fail();
        members.push((node, agent, server));
    }
    let attacker = bed.add_node("x").or_fail();
    let backend_of = |n: &Node| SocketAddr::new(n.ipv4().into(), BACKEND_PORT).to_string();
    let mut all: Vec<String> = members.iter().map(|(n, _, _)| backend_of(n)).collect();
    all.sort();
    for (_, agent, _) in &members {
        agent
            .wait_status(Duration::from_secs(20), |st| {
                Agent::backends_in(st, "web") == all
            })
            .or_fail();
    }
    let (a, c) = (&members[0].0.clone(), &members[2].0.clone());
    let frames = capture_gossip(&bed, c, a, 10);

    // Replayed at once to the running agent: every frame is known, dropped, counted; no reply.
    let before = replays_dropped(a);
    let back = replay(&attacker, a, &frames);
    assert_eq!(back, 0, "a replay drew {back} bytes of reply");
    wait_replays_dropped(a, before, frames.len());

    // c dies and its link is cut; a withdraws it, restarts (remembering no frame), and is fed
    // c's frames again: nothing comes back to life.
    members[2].1.kill(Signal::Kill).or_fail();
    bed.switch().ip(&["link", "set", "p-c", "down"]).or_fail();
    let without_c: Vec<String> = all
        .iter()
        .filter(|b| **b != backend_of(c))
        .cloned()
        .collect();
    members[0]
        .1
        .wait_status(Duration::from_secs(10), |st| {
            Agent::backends_in(st, "web") == without_c
        })
        .or_fail();
    members[0].1.restart().or_fail();
    let before = replays_dropped(a);
    assert_eq!(replay(&attacker, a, &frames), 0);
    wait_replays_dropped(a, before, frames.len());
    let status = members[0].1.status_json().or_fail();
    assert_eq!(Agent::backends_in(&status, "web"), without_c, "{status}");
    let nodes = members[0].1.query_json("nodes").or_fail();
    let c_alive = nodes
        .as_array()
        .into_iter()
        .flatten()
        .any(|n| n["name"] == c.full_name().as_str() && n["state"] == "alive");
    assert!(!c_alive, "c resurrected: {nodes:#}");
}
