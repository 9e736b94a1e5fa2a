//! Path 2 end to end: a strict mTLS service between two nodes.
//!
//! Node `a` runs the clients, node `b` the backend echo server on its own address. Both agents
//! have an `[mtls]` table with certificates issued by one CA made with the real
//! `mesh-agent ca init` / `mesh-agent cert issue`, and define the service `pay` with
//! `mtls = "strict"`. The kernel on `a` redirects a connect to the VIP to `a`'s agent, which
//! tunnels it (TLS 1.3, HTTP/2 CONNECT) to `b`'s agent on port 15008; `b`'s agent checks the
//! policy and connects to the backend. The tests assert on what real clients saw, on a packet
//! capture of `a`'s link, on the kernel counters and on the agents' metrics.
//!
//! Needs root, cgroup2, bpffs, tcpdump and built `mesh-agent` / `mesh-workload`; fails, never
//! skips.

use std::io::{Read as _, Write as _};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::config::Service;
use mesh_tests::mtls::{self, Ca, Issued, MtlsTable};
use mesh_tests::process::{self, Capture};
use mesh_tests::{Agent, Node, OrFail, Proc, Signal, TcpClientReport, TestBed};

const VIP: &str = "10.96.0.30:80";
const BACKEND_PORT: u16 = 8080;
/// The identity of the `client` workload cgroup on `a`.
const CLIENT_ID: &str = "spiffe://mesh.test/ns/shop/sa/client";
/// The identity of the `intruder` workload cgroup on `a`.
const INTRUDER_ID: &str = "spiffe://mesh.test/ns/shop/sa/intruder";
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);
/// How long an agent's start or a change may take to show.
const SETTLE: Duration = Duration::from_secs(10);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// The agent config of `node`: the strict service `pay` (backend on `b`), its `[mtls]` table
/// with the node certificate, the `client` and `intruder` workload cgroups mapped to their
/// identities, and `policies` (TOML, may be empty).
fn config(
    node: &Node,
    backend: SocketAddr,
    ca_bundle: &Path,
    node_cert: &Issued,
    workloads: &[(&str, &str, &Issued)],
    policies: &str,
) -> Result<String> {
    let pay = Service::tcp("pay", sa(VIP), &[backend]).with("mtls = \"strict\"");
    let table = MtlsTable {
        ca_bundle,
        node_cert,
        workloads,
        options: "",
    };
    mtls::config(node, &[pay], &table, policies)
}

/// Two nodes with agents, the backend server on `b` named `marker`.
struct Pair {
    // Fields drop in order: processes before the nodes.
    agent_a: Agent,
    _agent_b: Agent,
    _server: Proc,
    a: Node,
    b: Node,
    ca: Ca,
}

/// Builds the pair; `b`'s config carries `policies`.
fn pair(bed: &TestBed, marker: &str, policies: &str) -> Result<Pair> {
    let a = bed.add_node("a")?;
    let b = bed.add_node("b")?;
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let server = b.tcp_server("server", backend, marker)?;
    let ca = Ca::init(bed, "ca")?;
    let node_a = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a")?;
    let node_b = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")?;
    let client = ca.issue(bed, CLIENT_ID, "client")?;
    let intruder = ca.issue(bed, INTRUDER_ID, "intruder")?;
    let workloads = [
        ("client", CLIENT_ID, &client),
        ("intruder", INTRUDER_ID, &intruder),
    ];
    let agent_b = b.start_agent(&config(&b, backend, &ca.cert, &node_b, &[], policies)?)?;
    let agent_a = a.start_agent(&config(&a, backend, &ca.cert, &node_a, &workloads, "")?)?;
    for agent in [&agent_a, &agent_b] {
        agent.wait_status(SETTLE, |st| {
            Agent::backends_in(st, "pay") == [backend.to_string()]
        })?;
    }
    Ok(Pair {
        agent_a,
        _agent_b: agent_b,
        _server: server,
        a,
        b,
        ca,
    })
}

impl Pair {
    fn backend(&self) -> SocketAddr {
        SocketAddr::new(self.b.ipv4().into(), BACKEND_PORT)
    }
}

/// The text of `node`'s metrics endpoint.
fn metrics(node: &Node) -> Result<String> {
    node.netns().run_in(|| -> Result<String> {
        let mut s = TcpStream::connect_timeout(&sa("127.0.0.1:15020"), Duration::from_secs(5))?;
        s.set_read_timeout(Some(Duration::from_secs(5)))?;
        s.write_all(b"GET /metrics HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")?;
        let mut text = String::new();
        s.read_to_string(&mut text)?;
        Ok(text)
    })?
}

/// The value of the metric line that starts with `series` (name and labels), 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0.0)
}

fn authz_series(decision: &str, identity: &str) -> String {
    format!(
        "mesh_mtls_authz_decisions_total{{service=\"pay\",decision=\"{decision}\",identity=\"{identity}\"}}"
    )
}

/// Polls `node`'s metrics (every 50 ms, up to [`SETTLE`]) until `series` is at least `want`.
fn wait_metric(node: &Node, series: &str, want: f64) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let text = metrics(node)?;
        if metric(&text, series) >= want {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "{series} on {} never reached {want}; metrics:\n{text}",
                node.name()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// `tcpdump` writing every packet of the bridge port of node `a` to a file.
struct Pcap {
    proc: Proc,
    file: PathBuf,
}

fn start_capture(bed: &TestBed, node: &Node) -> Result<Pcap> {
    let file = bed.tmpdir().join(format!("{}.pcap", node.name()));
    let port = format!("p-{}", node.name());
    let mut cmd = Command::new("tcpdump");
    cmd.args(["-i", &port, "-n", "-U", "--immediate-mode", "-s", "0", "-w"])
        .arg(&file);
    let proc = process::spawn("tcpdump", cmd, Some(bed.switch()), None, Capture::Lines)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    while !proc.stderr_text().contains("listening on") {
        if !proc.is_running() || Instant::now() >= deadline {
            bail!("tcpdump did not start: {}", proc.stderr_text());
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Ok(Pcap { proc, file })
}

impl Pcap {
    /// Stops the capture and returns the file's bytes.
    fn stop(self) -> Result<Vec<u8>> {
        // Let the last packets reach the file, then ask tcpdump to flush and exit.
        std::thread::sleep(Duration::from_millis(300));
        self.proc.signal(Signal::Int)?;
        self.proc
            .wait_timeout(Duration::from_secs(5))?
            .context("tcpdump did not exit after SIGINT")?;
        std::fs::read(&self.file).with_context(|| format!("reading {}", self.file.display()))
    }

    /// Packets in the capture matching the pcap `filter`.
    fn count(file: &Path, filter: &str) -> Result<usize> {
        let mut cmd = Command::new("tcpdump");
        cmd.args(["-n", "-r"]).arg(file).arg(filter);
        let out = process::spawn("tcpdump -r", cmd, None, None, Capture::Lines)?
            .finish(Duration::from_secs(10))?
            .ok("tcpdump -r")?;
        Ok(out.stdout.lines().count())
    }
}

fn contains(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}

/// A backend name no other traffic carries.
fn unique_marker(tag: &str) -> String {
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or_default();
    format!("secret-{tag}-{}-{nanos:x}", std::process::id())
}

fn client(node: &Node, workload: &str, target: SocketAddr, count: u32) -> Result<TcpClientReport> {
    node.tcp_client(workload, target, count, CONNECT_TIMEOUT)
}

#[test]
fn strict_flow_is_tunneled_encrypted_and_plaintext_to_the_backend_is_dropped() {
    let bed = TestBed::new("mtls_tunnel").or_fail();
    let marker = unique_marker("tunnel");
    let p = pair(&bed, &marker, "").or_fail();
    let redirected_before = p.agent_a.counter("mtls_redirected").or_fail();

    // Scenario 1: bytes echo through the VIP, and a capture of a's link never sees them.
    let capture = start_capture(&bed, &p.a).or_fail();
    let report = client(&p.a, "client", sa(VIP), 5).or_fail();
    let pcap = capture.stop().or_fail();
    assert_eq!(
        report.ok(),
        5,
        "every connection reaches the backend: {report:?}"
    );
    assert_eq!(report.backends.get(&marker), Some(&5), "{report:?}");
    let hold =
        p.a.tcp_hold(
            "client",
            sa(VIP),
            Duration::from_millis(20),
            Duration::from_millis(500),
            None,
        )
        .or_fail()
        .finish()
        .or_fail();
    assert_eq!(hold.backend, marker);
    assert!(
        hold.sent > 0 && hold.echoed == hold.sent && hold.errors.is_empty(),
        "lines echo through the tunnel: {hold:?}"
    );
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the marker {marker:?} crossed a's link in clear"
    );
    let file = bed.tmpdir().join("a.pcap");
    let tunnel_packets = Pcap::count(
        &file,
        &format!("tcp and dst host {} and dst port 15008", p.b.ipv4()),
    )
    .or_fail();
    assert!(
        tunnel_packets > 0,
        "the capture holds the tunnel's packets to b:15008 (else it proves nothing)"
    );
    let plain_packets = Pcap::count(
        &file,
        &format!("tcp and host {} and port {BACKEND_PORT}", p.b.ipv4()),
    )
    .or_fail();
    assert_eq!(
        plain_packets, 0,
        "no packet went to the backend port directly"
    );

    // The kernel on a redirected the flows; b saw the client's identity and allowed it.
    let redirected = p.agent_a.counter("mtls_redirected").or_fail();
    assert!(
        redirected >= redirected_before + 6,
        "mtls_redirected went {redirected_before} -> {redirected}"
    );
    wait_metric(&p.b, &authz_series("allow", CLIENT_ID), 6.0).or_fail();
    // A client in no mapped cgroup carries a's node identity.
    let report = client(&p.a, "other", sa(VIP), 1).or_fail();
    assert_eq!(report.backends.get(&marker), Some(&1), "{report:?}");
    wait_metric(
        &p.b,
        &authz_series("allow", "spiffe://mesh.test/ns/mesh/sa/a"),
        1.0,
    )
    .or_fail();

    // Scenario 3: plaintext straight to the backend is dropped by b's kernel (the SYN never
    // gets an answer), while the VIP still works.
    let direct = client(&p.a, "client", p.backend(), 1).or_fail();
    assert_eq!(
        direct.ok(),
        0,
        "plaintext reached the strict backend: {direct:?}"
    );
    assert_eq!(
        direct.errors.get("ETIMEDOUT"),
        Some(&1),
        "the SYN is dropped, so the connect times out: {direct:?}"
    );
    let again = client(&p.a, "client", sa(VIP), 2).or_fail();
    assert_eq!(again.backends.get(&marker), Some(&2), "{again:?}");
}

#[test]
fn policy_admits_the_allowed_identity_and_refuses_another() {
    let bed = TestBed::new("mtls_policy").or_fail();
    let marker = unique_marker("policy");
    let policies =
        format!("\n[[policies]]\nservice = \"pay\"\naction = \"allow\"\nfrom = [{CLIENT_ID:?}]\n");
    let p = pair(&bed, &marker, &policies).or_fail();

    let allowed = client(&p.a, "client", sa(VIP), 3).or_fail();
    assert_eq!(allowed.backends.get(&marker), Some(&3), "{allowed:?}");
    wait_metric(&p.b, &authz_series("allow", CLIENT_ID), 3.0).or_fail();

    let refused = client(&p.a, "intruder", sa(VIP), 3).or_fail();
    assert_eq!(
        refused.ok(),
        0,
        "a caller no allow rule names never gets the echo: {refused:?}"
    );
    assert_eq!(refused.failed(), 3, "{refused:?}");
    wait_metric(&p.b, &authz_series("deny", INTRUDER_ID), 3.0).or_fail();
    let text = metrics(&p.b).or_fail();
    assert_eq!(
        metric(&text, &authz_series("allow", INTRUDER_ID)),
        0.0,
        "{text}"
    );
}

#[test]
fn killed_agent_fails_closed_and_a_restart_restores_the_flow() {
    let bed = TestBed::new("mtls_agent_kill").or_fail();
    let marker = unique_marker("kill");
    let mut p = pair(&bed, &marker, "").or_fail();
    let before = client(&p.a, "client", sa(VIP), 2).or_fail();
    assert_eq!(before.backends.get(&marker), Some(&2), "{before:?}");

    p.agent_a.kill(Signal::Kill).or_fail();
    let capture = start_capture(&bed, &p.a).or_fail();
    let dead = client(&p.a, "client", sa(VIP), 3).or_fail();
    let pcap = capture.stop().or_fail();
    assert_eq!(
        dead.ok(),
        0,
        "with a's agent dead no flow may reach the backend: {dead:?}"
    );
    assert_eq!(
        dead.errors.get("ECONNREFUSED"),
        Some(&3),
        "the redirect to the dead agent's listener is refused: {dead:?}"
    );
    assert!(
        !contains(&pcap, marker.as_bytes()),
        "the marker crossed a's link in clear while a's agent was dead"
    );
    let plain = Pcap::count(
        &bed.tmpdir().join("a.pcap"),
        &format!("tcp and host {} and port {BACKEND_PORT}", p.b.ipv4()),
    )
    .or_fail();
    assert_eq!(plain, 0, "a plaintext packet went to the backend");

    p.agent_a.restart().or_fail();
    let backend = p.backend().to_string();
    p.agent_a
        .wait_status(SETTLE, |st| {
            Agent::backends_in(st, "pay") == [backend.clone()]
        })
        .or_fail();
    let deadline = Instant::now() + SETTLE;
    let after = loop {
        let r = client(&p.a, "client", sa(VIP), 1).or_fail();
        if r.ok() == 1 || Instant::now() >= deadline {
            break r;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    assert_eq!(after.backends.get(&marker), Some(&1), "{after:?}");
    let steady = client(&p.a, "client", sa(VIP), 3).or_fail();
    assert_eq!(steady.backends.get(&marker), Some(&3), "{steady:?}");
}

#[test]
fn a_peer_with_a_certificate_from_another_ca_is_rejected() {
    let bed = TestBed::new("mtls_foreign_ca").or_fail();
    let marker = unique_marker("foreign");
    let p = pair(&bed, &marker, "").or_fail();
    // Node c trusts both CAs (so it accepts b) but holds certificates of a foreign CA.
    let c = bed.add_node("c").or_fail();
    let foreign = Ca::init(&bed, "foreign-ca").or_fail();
    let bundle = bed.tmpdir().join("both-cas.pem");
    let mut pem = std::fs::read(&p.ca.cert).or_fail();
    pem.extend(std::fs::read(&foreign.cert).or_fail());
    std::fs::write(&bundle, pem).or_fail();
    let node_c = foreign
        .issue(&bed, "spiffe://mesh.test/ns/mesh/sa/c", "node-c")
        .or_fail();
    let client_c = foreign.issue(&bed, CLIENT_ID, "client-c").or_fail();
    let agent_c = c
        .start_agent(
            &config(
                &c,
                p.backend(),
                &bundle,
                &node_c,
                &[("client", CLIENT_ID, &client_c)],
                "",
            )
            .or_fail(),
        )
        .or_fail();
    let backend = p.backend().to_string();
    agent_c
        .wait_status(SETTLE, |st| {
            Agent::backends_in(st, "pay") == [backend.clone()]
        })
        .or_fail();

    let before = metric(&metrics(&p.b).or_fail(), &authz_series("allow", CLIENT_ID));
    let rejected = client(&c, "client", sa(VIP), 2).or_fail();
    assert_eq!(
        rejected.ok(),
        0,
        "a peer with a foreign CA's certificate reached the backend: {rejected:?}"
    );
    wait_metric(
        &p.b,
        "mesh_mtls_handshakes_total{side=\"inbound\",result=\"unknown_ca\"}",
        1.0,
    )
    .or_fail();
    let text = metrics(&p.b).or_fail();
    assert_eq!(
        metric(&text, &authz_series("allow", CLIENT_ID)),
        before,
        "b admitted a flow from the foreign peer:\n{text}"
    );

    // The same client identity with the right CA's certificate, on a, still gets through.
    let ok = client(&p.a, "client", sa(VIP), 1).or_fail();
    assert_eq!(ok.backends.get(&marker), Some(&1), "{ok:?}");
}
