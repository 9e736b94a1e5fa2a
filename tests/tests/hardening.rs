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
//! - 3,000 junk connections to the inbound tunnel and 3,000 unredirected connects to the
//!   outbound listener are each counted, and logged a few times; an authenticated tunnel
//!   connection that never sends the HTTP/2 preface is closed after the timeout.
//! - The admin socket is root's whatever the umask, changes through it are root's even if it is
//!   opened up, and the state files are 0600.
//! - Gossip frames captured on the wire and replayed (to the running agent, from the
//!   attacker's address and from a spoofed one, and to the same agent restarted after the
//!   sender died) are dropped and counted, draw no reply (nothing goes toward the spoofed
//!   address, not even an ARP request), and bring no member back.
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
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
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

/// Sends each of `frames` to `to`'s gossip port from `attacker`'s namespace through a raw
/// socket, as a UDP datagram claiming to come from `spoofed:15010`.
fn send_spoofed(attacker: &Node, spoofed: std::net::Ipv4Addr, to: &Node, frames: &[Vec<u8>]) {
    let (dst, frames) = (to.ipv4(), frames.to_vec());
    attacker
        .netns()
        .run_in(move || -> anyhow::Result<()> {
            // SAFETY: a raw IPv4 socket (IPPROTO_RAW: this process writes the IP header).
            let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_RAW, libc::IPPROTO_RAW) };
            anyhow::ensure!(fd >= 0, "raw socket: {}", std::io::Error::last_os_error());
            let to = libc::sockaddr_in {
                sin_family: libc::AF_INET as libc::sa_family_t,
                sin_port: 0,
                sin_addr: libc::in_addr {
                    s_addr: u32::from(dst).to_be(),
                },
                sin_zero: [0; 8],
            };
            for frame in &frames {
                let udp_len = 8 + frame.len();
                let mut packet = vec![0x45, 0, 0, 0, 0, 0, 0x40, 0, 64, 17, 0, 0];
                packet[2..4].copy_from_slice(&((20 + udp_len) as u16).to_be_bytes());
                packet.extend_from_slice(&spoofed.octets());
                packet.extend_from_slice(&dst.octets());
                packet.extend_from_slice(&GOSSIP_PORT.to_be_bytes());
                packet.extend_from_slice(&GOSSIP_PORT.to_be_bytes());
                packet.extend_from_slice(&(udp_len as u16).to_be_bytes());
                packet.extend_from_slice(&[0, 0]); // no UDP checksum (allowed over IPv4)
                packet.extend_from_slice(frame);
                // SAFETY: the buffer and the address outlive the call; the kernel fills the IP
                // checksum.
                let sent = unsafe {
                    libc::sendto(
                        fd,
                        packet.as_ptr().cast(),
                        packet.len(),
                        0,
                        std::ptr::addr_of!(to).cast(),
                        std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
                    )
                };
                anyhow::ensure!(sent >= 0, "sendto: {}", std::io::Error::last_os_error());
            }
            // SAFETY: closing the socket opened above.
            unsafe { libc::close(fd) };
            Ok(())
        })
        .or_fail()
        .or_fail();
}

/// What the bridge carried toward `addr` (IP packets to it, ARP requests for it) during
/// `during`, as tcpdump's text lines.
fn traffic_toward(bed: &TestBed, addr: std::net::Ipv4Addr, during: impl FnOnce()) -> Vec<String> {
    let mut cmd = Command::new("timeout");
    cmd.args(["4", "tcpdump", "-i", "br0", "-n", "-l"])
        .arg(format!(
            "dst host {addr} or (arp and arp[24:4] = 0x{:08x})",
            u32::from(addr)
        ));
    let capture =
        process::spawn("tcpdump", cmd, Some(bed.switch()), None, Capture::Lines).or_fail();
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !capture.stderr_text().contains("listening on") {
        assert!(
            std::time::Instant::now() < deadline,
            "tcpdump did not start"
        );
        std::thread::sleep(Duration::from_millis(20));
    }
    during();
    let _ = capture.wait_timeout(Duration::from_secs(10)).or_fail();
    capture.stdout_text().lines().map(str::to_owned).collect()
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
    // The same frames claiming another source (an address nobody has): nothing is sent there,
    // not even an ARP request for it.
    let spoofed = std::net::Ipv4Addr::new(10, 1, 0, 250);
    let before = replays_dropped(a);
    let toward = traffic_toward(&bed, spoofed, || {
        send_spoofed(&attacker, spoofed, a, &frames)
    });
    wait_replays_dropped(a, before, frames.len());
    assert!(
        toward.is_empty(),
        "traffic toward the spoofed source: {toward:#?}"
    );

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

/// Node `b` serving the strict service `pay` (its own backend) behind its inbound tunnel, and
/// a workload certificate of the trust domain for a client elsewhere.
struct Tunneled {
    // Fields drop in order: processes before the node.
    agent: Agent,
    _server: mesh_tests::Proc,
    b: Node,
    ca: Ca,
    client: mtls::Issued,
}

fn tunneled(bed: &TestBed) -> Tunneled {
    let b = bed.add_node("b").or_fail();
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let server = b.tcp_server("server", backend, "pay").or_fail();
    let ca = Ca::init(bed, "ca").or_fail();
    let node_b = ca
        .issue(bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")
        .or_fail();
    let client = ca
        .issue(bed, "spiffe://mesh.test/ns/shop/sa/x", "x")
        .or_fail();
    let table = MtlsTable {
        ca_bundle: &ca.cert,
        node_cert: &node_b,
        workloads: &[],
        options: "",
    };
    let pay = Service::tcp("pay", sa(VIP), &[backend]).with("mtls = \"strict\"");
    let agent = b
        .start_agent(&mtls::config(&b, &[pay], &table, "").or_fail())
        .or_fail();
    Tunneled {
        agent,
        _server: server,
        b,
        ca,
        client,
    }
}

/// The sum of the samples of `family` on `node` whose labels contain every one of `labels`
/// and none of `except`.
fn sum(node: &Node, family: &str, labels: &[&str], except: &[&str]) -> f64 {
    let text = metrics::scrape(node).or_fail();
    text.lines()
        .filter(|l| l.starts_with(&format!("{family}{{")))
        .filter(|l| labels.iter().all(|w| l.contains(w)) && !except.iter().any(|w| l.contains(w)))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Opens `count` connections to `target` from `node`'s namespace, each sending `junk` and
/// waiting (at most 2 s) for the other side to close.
fn junk_connections(node: &Node, target: SocketAddr, count: usize, junk: &'static [u8]) {
    node.netns()
        .run_in(move || -> anyhow::Result<()> {
            use std::io::{Read as _, Write as _};
            for _ in 0..count {
                let mut s =
                    match std::net::TcpStream::connect_timeout(&target, Duration::from_secs(2)) {
                        Ok(s) => s,
                        // Accepted and reset at once, before the connect call returned.
                        Err(e) if e.kind() == std::io::ErrorKind::ConnectionReset => continue,
                        Err(e) => return Err(e.into()),
                    };
                s.set_read_timeout(Some(Duration::from_secs(2)))?;
                let _ = s.write_all(junk);
                let _ = s.read(&mut [0; 256]);
            }
            Ok(())
        })
        .or_fail()
        .or_fail();
}

/// Waits (up to 30 s) until `value()` reaches `want`.
fn wait_for(what: &str, want: f64, value: impl Fn() -> f64) {
    let deadline = std::time::Instant::now() + Duration::from_secs(30);
    loop {
        let now = value();
        if now >= want {
            return;
        }
        assert!(
            std::time::Instant::now() < deadline,
            "{what}: {now}, want {want}"
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn junk_connections_are_each_counted_and_logged_a_few_times() {
    const JUNK: usize = 3_000;
    let bed = TestBed::new("hardening_junk").or_fail();
    let t = tunneled(&bed);
    let attacker = bed.add_node("x").or_fail();
    let failed_handshakes = || {
        sum(
            &t.b,
            "mesh_mtls_handshakes_total",
            &["side=\"inbound\""],
            &["result=\"ok\""],
        )
    };
    let no_destination = || {
        sum(
            &t.b,
            "mesh_mtls_flows_total",
            &["side=\"outbound\"", "no_destination"],
            &[],
        )
    };
    let (handshakes, unrecorded) = (failed_handshakes(), no_destination());
    // Strangers' junk at the inbound tunnel, and local connects to the outbound listener that
    // the kernel never redirected (no original destination).
    let inbound = SocketAddr::new(t.b.ipv4().into(), 15008);
    junk_connections(&attacker, inbound, JUNK, b"GET / HTTP/1.0\r\n\r\n");
    junk_connections(&t.b, sa("127.0.0.1:15001"), JUNK, b"hello");
    wait_for(
        "failed inbound handshakes",
        handshakes + JUNK as f64,
        failed_handshakes,
    );
    wait_for(
        "outbound connects without a destination",
        unrecorded + JUNK as f64,
        no_destination,
    );
    let log = t.agent.log();
    let lines = |needle: &str| log.lines().filter(|l| l.contains(needle)).count();
    for needle in ["refused a peer", "no original destination"] {
        assert!(
            (1..=3).contains(&lines(needle)),
            "{} lines {needle:?} for {JUNK} refusals",
            lines(needle)
        );
    }
    assert!(log.contains("suppressed"), "{log}");
}

#[test]
fn an_authenticated_connection_without_a_preface_is_closed_after_the_timeout() {
    let bed = TestBed::new("hardening_preface").or_fail();
    let t = tunneled(&bed);
    let a = bed.add_node("a").or_fail();
    let series = |result: &str| {
        sum(
            &t.b,
            "mesh_mtls_handshakes_total",
            &["side=\"inbound\"", &format!("result=\"{result}\"")],
            &[],
        )
    };
    let ok = series("ok");
    // A client holding a valid certificate completes TLS, then sends nothing at all.
    let mut cmd = Command::new("openssl");
    cmd.args(["s_client", "-quiet", "-ign_eof", "-connect"])
        .arg(SocketAddr::new(t.b.ipv4().into(), 15008).to_string())
        .arg("-cert")
        .arg(&t.client.cert)
        .arg("-key")
        .arg(&t.client.key)
        .arg("-CAfile")
        .arg(&t.ca.cert);
    let started = std::time::Instant::now();
    let silent = a.spawn("silent", cmd).or_fail();
    let exited = silent.wait_timeout(Duration::from_secs(40)).or_fail();
    let held = started.elapsed();
    assert!(
        exited.is_some(),
        "the silent connection is still open after {held:?}"
    );
    assert!(
        held >= Duration::from_secs(9),
        "closed after {held:?}, before the timeout"
    );
    assert_eq!(series("ok") - ok, 1.0, "the client was authenticated");
    assert_eq!(series("preface_timeout"), 1.0);
}

#[test]
fn the_admin_socket_and_state_are_root_only_whatever_the_umask() {
    use std::os::unix::fs::PermissionsExt as _;
    let bed = TestBed::new("hardening_admin").or_fail();
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
    let mut agent = a
        .start_agent(&render("a", &[Service::tcp("web", sa(VIP), &[backend])]))
        .or_fail();
    agent.set_umask(0);
    agent.restart().or_fail();
    let mode = |p: &std::path::Path| std::fs::metadata(p).or_fail().permissions().mode() & 0o777;
    assert_eq!(mode(agent.socket_path()), 0o600, "the admin socket");
    let extra = SocketAddr::new(a.ipv4().into(), BACKEND_PORT + 1).to_string();
    let register = |as_nobody: bool| {
        let bin = mesh_tests::host::agent_bin().or_fail();
        let mut cmd = if as_nobody {
            let mut cmd = Command::new("setpriv");
            cmd.args(["--reuid=65534", "--regid=65534", "--clear-groups"])
                .arg(bin);
            cmd
        } else {
            Command::new(bin)
        };
        cmd.args([
            "register",
            "--service",
            "web",
            "--address",
            &extra,
            "--admin-socket",
        ])
        .arg(agent.socket_path());
        process::spawn("register", cmd, None, None, Capture::Lines)
            .or_fail()
            .finish(Duration::from_secs(10))
            .or_fail()
    };
    // nobody cannot open the socket.
    let out = register(true);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("Permission denied"), "{out:?}");
    // Even through a socket opened to everyone, a change by nobody is refused.
    std::fs::set_permissions(agent.socket_path(), std::fs::Permissions::from_mode(0o666)).or_fail();
    let out = register(true);
    assert!(!out.status.success(), "{out:?}");
    assert!(out.stderr.contains("only root may change"), "{out:?}");
    assert!(!agent.status_json().or_fail().to_string().contains(&extra));
    // Root registers; the state files are root's alone.
    register(false).ok("register as root").or_fail();
    let state = agent.state_dir().join(a.full_name());
    assert_eq!(mode(&state), 0o700, "the node's state directory");
    for file in ["registrations.json", "agent.json"] {
        assert_eq!(mode(&state.join(file)), 0o600, "{file}");
    }
}
