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

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use mesh_tests::config::Service;
use mesh_tests::mtls::{self, path_str, Ca, Issued, MtlsTable};
use mesh_tests::process::{self, Capture};
use mesh_tests::{metrics, Agent, Node, OrFail, Proc, Signal, TcpClientReport, TestBed};

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

/// The strict service `pay` with its one backend (on `b`).
fn pay(backend: SocketAddr) -> Service {
    Service::tcp("pay", sa(VIP), &[backend]).with("mtls = \"strict\"")
}

/// The agent config of `node`: the service `pay`, the `[mtls]` table with the node
/// certificate, the `client` and `intruder` workload cgroups mapped to their identities, and
/// `policies` (TOML, may be empty).
fn config(
    node: &Node,
    pay: Service,
    ca_bundle: &Path,
    node_cert: &Issued,
    workloads: &[(&str, &str, &Issued)],
    policies: &str,
) -> Result<String> {
    let table = MtlsTable {
        ca_bundle,
        node_cert,
        workloads,
        // More relay threads than the default: the tests run the tunnel multi-threaded.
        options: &format!("workers = {WORKERS}\n"),
    };
    mtls::config(node, &[pay], &table, policies)
}

/// The agents' `[mtls] workers`.
const WORKERS: usize = 3;

/// The threads of `agent`'s data-plane runtime (named `mesh-data`).
fn data_plane_threads(agent: &Agent) -> Result<usize> {
    let pid = agent.pid().context("the agent runs")?;
    let mut threads = 0;
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))? {
        let comm = std::fs::read_to_string(task?.path().join("comm")).unwrap_or_default();
        threads += usize::from(comm.trim() == "mesh-data");
    }
    Ok(threads)
}

/// Two nodes with agents, the backend server on `b` named `marker`.
struct Pair {
    // Fields drop in order: processes before the nodes.
    agent_a: Agent,
    agent_b: Agent,
    server: Proc,
    a: Node,
    b: Node,
    ca: Ca,
}

/// Builds the pair; `b`'s config carries `policies`.
fn pair(bed: &TestBed, marker: &str, policies: &str) -> Result<Pair> {
    pair_with(bed, marker, policies, None)
}

/// [`pair`], with `health` (a service TOML line) on `pay` on both nodes: the backend server
/// then also answers HTTP checks (200).
fn pair_with(bed: &TestBed, marker: &str, policies: &str, health: Option<&str>) -> Result<Pair> {
    let a = bed.add_node("a")?;
    let b = bed.add_node("b")?;
    let backend = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let server = match health {
        None => b.tcp_server("server", backend, marker)?,
        Some(_) => b.http_server("server", backend, marker, 200)?,
    };
    let service = || health.map_or_else(|| pay(backend), |h| pay(backend).with(h));
    let ca = Ca::init(bed, "ca")?;
    let node_a = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/a", "node-a")?;
    let node_b = ca.issue(bed, "spiffe://mesh.test/ns/mesh/sa/b", "node-b")?;
    let client = ca.issue(bed, CLIENT_ID, "client")?;
    let intruder = ca.issue(bed, INTRUDER_ID, "intruder")?;
    let workloads = [
        ("client", CLIENT_ID, &client),
        ("intruder", INTRUDER_ID, &intruder),
    ];
    let agent_b = b.start_agent(&config(&b, service(), &ca.cert, &node_b, &[], policies)?)?;
    let agent_a = a.start_agent(&config(&a, service(), &ca.cert, &node_a, &workloads, "")?)?;
    for agent in [&agent_a, &agent_b] {
        agent.wait_status(SETTLE, |st| {
            Agent::backends_in(st, "pay") == [backend.to_string()]
        })?;
    }
    Ok(Pair {
        agent_a,
        agent_b,
        server,
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

/// The value of `series` in `text` (a scrape), 0 if absent.
fn metric(text: &str, series: &str) -> f64 {
    metrics::value(text, series).unwrap_or(0.0)
}

fn authz_series(decision: &str, identity: &str) -> String {
    format!(
        "mesh_mtls_authz_decisions_total{{service=\"pay\",decision=\"{decision}\",identity=\"{identity}\"}}"
    )
}

fn wait_metric(node: &Node, series: &str, want: f64) -> Result<()> {
    metrics::wait_at_least(node, series, want, SETTLE)
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
    let text = metrics::scrape(&p.b).or_fail();
    assert_eq!(
        metric(&text, &authz_series("allow", INTRUDER_ID)),
        0.0,
        "{text}"
    );

    // The access log has a line per flow on each side: who, which service and backend, the
    // bytes, how it ended.
    let backend = p.backend().to_string();
    for (agent, side) in [(&p.agent_a, "outbound"), (&p.agent_b, "inbound")] {
        let words = [" access: ", side, CLIENT_ID, "pay", &backend, "closed"];
        wait_log(agent, &words).or_fail();
        let lines = log_lines(agent, &words);
        assert_eq!(lines.len(), 3, "one line per allowed flow: {lines:#?}");
        for line in &lines {
            // The client only reads: the server's marker line came back, nothing went out.
            let (sent, received) = (field(line, "sent"), field(line, "received"));
            assert!(
                sent == 0 && received > marker.len() as u64,
                "bytes each way: {line}"
            );
        }
    }
    wait_log(&p.agent_b, &[" access: ", "inbound", INTRUDER_ID, "denied"]).or_fail();
    wait_log(
        &p.agent_a,
        &[" access: ", "outbound", INTRUDER_ID, "refused"],
    )
    .or_fail();
}

/// The number after `name=` in a log line (0 if absent).
fn field(line: &str, name: &str) -> u64 {
    line.split_whitespace()
        .find_map(|word| word.strip_prefix(&format!("{name}=")))
        .and_then(|value| value.parse().ok())
        .unwrap_or(0)
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
                pay(p.backend()),
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

    let before = metric(
        &metrics::scrape(&p.b).or_fail(),
        &authz_series("allow", CLIENT_ID),
    );
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
    let text = metrics::scrape(&p.b).or_fail();
    assert_eq!(
        metric(&text, &authz_series("allow", CLIENT_ID)),
        before,
        "b admitted a flow from the foreign peer:\n{text}"
    );

    // The same client identity with the right CA's certificate, on a, still gets through.
    let ok = client(&p.a, "client", sa(VIP), 1).or_fail();
    assert_eq!(ok.backends.get(&marker), Some(&1), "{ok:?}");
}

/// The serial of the certificate `agent` holds for `identity` (`mesh-agent certs`).
fn serial_in_force(agent: &Agent, identity: &str) -> Result<String> {
    let certs = agent.query_json("certs")?;
    certs
        .as_array()
        .into_iter()
        .flatten()
        .find(|c| c["identity"] == identity)
        .and_then(|c| c["serial"].as_str())
        .map(str::to_owned)
        .with_context(|| format!("mesh-agent certs shows no {identity}: {certs}"))
}

/// The lines of `agent`'s log that contain every one of `words`.
fn log_lines(agent: &Agent, words: &[&str]) -> Vec<String> {
    agent
        .log()
        .lines()
        .filter(|l| words.iter().all(|w| l.contains(w)))
        .map(str::to_owned)
        .collect()
}

/// Polls (every 50 ms, up to [`SETTLE`]) until `agent`'s log has a line with all `words`.
fn wait_log(agent: &Agent, words: &[&str]) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    while log_lines(agent, words).is_empty() {
        if Instant::now() >= deadline {
            bail!(
                "no line with {words:?} in the log of {}:\n{}",
                agent.node().name(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    Ok(())
}

#[test]
fn a_certificate_rotated_mid_stream_keeps_open_flows_and_new_flows_present_it() {
    let bed = TestBed::new("mtls_rotate").or_fail();
    let marker = unique_marker("rotate");
    let p = pair(&bed, &marker, "").or_fail();
    let node_a = "spiffe://mesh.test/ns/mesh/sa/a";
    // A flow from a cgroup with no identity of its own carries a's node certificate: b logs
    // the serial it was shown.
    let old = serial_in_force(&p.agent_a, node_a).or_fail();
    let first = client(&p.a, "other", sa(VIP), 1).or_fail();
    assert_eq!(first.backends.get(&marker), Some(&1), "{first:?}");
    wait_log(&p.agent_b, &["tunnel connection accepted", node_a, &old]).or_fail();

    // A long-lived flow is open through the tunnel while a's node certificate is replaced.
    let long =
        p.a.tcp_hold(
            "client",
            sa(VIP),
            Duration::from_millis(50),
            Duration::from_secs(8),
            None,
        )
        .or_fail();
    assert_eq!(long.backend, marker);
    std::thread::sleep(Duration::from_millis(500));
    p.ca.issue(&bed, node_a, "node-a").or_fail();
    let deadline = Instant::now() + SETTLE;
    let new = loop {
        let serial = serial_in_force(&p.agent_a, node_a).or_fail();
        if serial != old {
            break serial;
        }
        assert!(
            Instant::now() < deadline,
            "a still holds serial {old} after the rotation\n{}",
            p.agent_a.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    };

    // New flows are served, over a new tunnel connection that presents the new certificate.
    let after = client(&p.a, "other", sa(VIP), 3).or_fail();
    assert_eq!(after.backends.get(&marker), Some(&3), "{after:?}");
    let also = client(&p.a, "client", sa(VIP), 2).or_fail();
    assert_eq!(also.backends.get(&marker), Some(&2), "{also:?}");
    wait_log(&p.agent_b, &["tunnel connection accepted", node_a, &new]).or_fail();
    assert!(
        long.is_running(),
        "the long-lived flow must span the rotation"
    );

    // A broken certificate file is refused with a line naming it; the rotated one stays.
    let text = metrics::scrape(&p.a).or_fail();
    let rejected = "mesh_mtls_cert_reloads_total{result=\"rejected\"}";
    let rejected_before = metric(&text, rejected);
    let cert_file = bed.tmpdir().join("node-a.pem");
    std::fs::write(&cert_file, "not a certificate\n").or_fail();
    wait_metric(&p.a, rejected, rejected_before + 1.0).or_fail();
    wait_log(
        &p.agent_a,
        &[
            "certificate reload refused",
            path_str(&cert_file),
            "no PEM certificate",
        ],
    )
    .or_fail();
    assert_eq!(serial_in_force(&p.agent_a, node_a).or_fail(), new);
    let still = client(&p.a, "other", sa(VIP), 2).or_fail();
    assert_eq!(still.backends.get(&marker), Some(&2), "{still:?}");

    // The flow opened before the rotation echoed every line throughout.
    let report = long.finish().or_fail();
    assert!(
        report.attempts == 1
            && report.sent > 20
            && report.echoed == report.sent
            && report.errors.is_empty(),
        "the established flow kept echoing across the rotation: {report:?}"
    );
}

/// Established TCP connections in `node`'s namespace matching the `ss` filter `filter`.
fn established(node: &Node, filter: &[&str]) -> Result<usize> {
    let mut cmd = Command::new("ss");
    cmd.args(["-Htn", "state", "established"]).args(filter);
    let out = node.run("ss", cmd, Duration::from_secs(10))?.ok("ss")?;
    Ok(out.stdout.lines().filter(|l| !l.trim().is_empty()).count())
}

/// Open file descriptors of `agent`'s process.
fn open_fds(agent: &Agent) -> Result<usize> {
    let pid = agent.pid().context("the agent is not running")?;
    let dir = format!("/proc/{pid}/fd");
    Ok(std::fs::read_dir(&dir)
        .with_context(|| format!("listing {dir}"))?
        .count())
}

/// Polls `agent`'s descriptors (every 100 ms, up to [`SETTLE`]) until at most `baseline`.
fn wait_fds_at_most(agent: &Agent, baseline: usize) -> Result<()> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let now = open_fds(agent)?;
        if now <= baseline {
            return Ok(());
        }
        if Instant::now() >= deadline {
            bail!(
                "the agent on {} holds {now} descriptors, {baseline} before the flows: a leak",
                agent.node().name()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

#[test]
fn a_thousand_concurrent_flows_share_one_tunnel_connection_and_leak_no_descriptors() {
    const FLOWS: u32 = 1000;
    let bed = TestBed::new("mtls_thousand").or_fail();
    let marker = unique_marker("thousand");
    let p = pair(&bed, &marker, "").or_fail();
    // One flow sets up the pooled connection; the descriptors then are the baseline.
    let warm = client(&p.a, "client", sa(VIP), 1).or_fail();
    assert_eq!(warm.backends.get(&marker), Some(&1), "{warm:?}");
    let b_tunnel = format!("{}:15008", p.b.ipv4());
    let tunnel_to_b = ["dst", b_tunnel.as_str()];
    assert_eq!(established(&p.a, &tunnel_to_b).or_fail(), 1);
    let baseline = (
        open_fds(&p.agent_a).or_fail(),
        open_fds(&p.agent_b).or_fail(),
    );

    let started = Instant::now();
    let many =
        p.a.tcp_many(
            "client",
            sa(VIP),
            FLOWS,
            CONNECT_TIMEOUT,
            Duration::from_secs(3),
        )
        .or_fail();
    // The flows ran on the data-plane runtime's threads, as many as the config says.
    for agent in [&p.agent_a, &p.agent_b] {
        assert_eq!(data_plane_threads(agent).or_fail(), WORKERS);
    }
    // All flows are open now: one tunnel connection carries them, seen from both ends.
    let on_a = established(&p.a, &tunnel_to_b).or_fail();
    let on_b = established(&p.b, &["sport", "=", ":15008"]).or_fail();
    let text_a = metrics::scrape(&p.a).or_fail();
    let text_b = metrics::scrape(&p.b).or_fail();
    let fds_open = (
        open_fds(&p.agent_a).or_fail(),
        open_fds(&p.agent_b).or_fail(),
    );
    eprintln!(
        "{FLOWS} flows open and echoed after {:?}; agent descriptors a/b: baseline {baseline:?}, open {fds_open:?}",
        started.elapsed()
    );
    let report = many.finish().or_fail();
    assert_eq!(
        (report.echoed, report.backends.get(&marker)),
        (u64::from(FLOWS), Some(&u64::from(FLOWS))),
        "every flow reached the backend and echoed its own line: {report:?}"
    );
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(
        (on_a, on_b),
        (1, 1),
        "one tunnel connection between the agents (a's view, b's view)"
    );
    assert_eq!(
        metric(&text_a, "mesh_mtls_pooled_connections{side=\"outbound\"}"),
        1.0,
        "{text_a}"
    );
    assert!(
        metric(&text_b, "mesh_mtls_streams_active{side=\"all\"}") >= f64::from(FLOWS),
        "b carried the flows at once:\n{text_b}"
    );
    // A socket per open flow; a few descriptors of other work (an admin query's connection,
    // a probe) may come and go between the two counts.
    let held = |open: usize, base: usize| open + 8 >= base + FLOWS as usize;
    assert!(
        held(fds_open.0, baseline.0) && held(fds_open.1, baseline.1),
        "each agent held a socket per open flow ({fds_open:?}, baseline {baseline:?})"
    );

    // The clients are gone: both agents let go of every descriptor the flows took.
    wait_fds_at_most(&p.agent_a, baseline.0).or_fail();
    wait_fds_at_most(&p.agent_b, baseline.1).or_fail();
    let after = client(&p.a, "client", sa(VIP), 1).or_fail();
    assert_eq!(after.backends.get(&marker), Some(&1), "{after:?}");
}

/// The endpoint `backend` of `pay` in `mesh-agent endpoints --output json` of `agent`.
fn pay_endpoint(agent: &Agent, backend: SocketAddr) -> Result<serde_json::Value> {
    let all = agent.query_json("endpoints")?;
    all.as_array()
        .into_iter()
        .flatten()
        .find(|e| e["service"] == "pay" && e["address"] == backend.to_string())
        .cloned()
        .with_context(|| format!("no endpoint {backend} of pay: {all}"))
}

/// Polls (every 50 ms, up to [`SETTLE`]) until the endpoint's health on `agent` is `health`.
fn wait_health(agent: &Agent, backend: SocketAddr, health: &str) -> Result<serde_json::Value> {
    let deadline = Instant::now() + SETTLE;
    loop {
        let endpoint = pay_endpoint(agent, backend)?;
        if endpoint["health"] == health {
            return Ok(endpoint);
        }
        if Instant::now() >= deadline {
            bail!(
                "{backend} on {} never became {health}: {endpoint}\n{}",
                agent.node().name(),
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn a_strict_backend_on_another_host_is_health_checked_through_the_tunnel() {
    let bed = TestBed::new("mtls_remote_health").or_fail();
    let marker = unique_marker("health");
    // Only the client workload may call pay: a probe is no flow and passes all the same.
    let policies =
        format!("\n[[policies]]\nservice = \"pay\"\naction = \"allow\"\nfrom = [{CLIENT_ID:?}]\n");
    let check = "health = { interval_ms = 300, timeout_ms = 200, healthy_threshold = 1, unhealthy_threshold = 2, http_path = '/healthz', expect_status = 200 }";
    let mut p = pair_with(&bed, &marker, &policies, Some(check)).or_fail();
    let backend = p.backend();
    let passed = "mesh_health_checks_total{service=\"pay\",result=\"passed\"}";
    let failed = "mesh_health_checks_total{service=\"pay\",result=\"failed\"}";

    // b's kernel drops a's own connects to the strict backend; b's agent runs a's checks.
    wait_metric(&p.a, passed, 4.0).or_fail();
    wait_metric(
        &p.b,
        "mesh_mtls_flows_total{side=\"inbound\",result=\"probe_passed\"}",
        4.0,
    )
    .or_fail();
    let text = metrics::scrape(&p.a).or_fail();
    assert_eq!(metric(&text, failed), 0.0, "a probe from a failed:\n{text}");
    assert_eq!(
        pay_endpoint(&p.agent_a, backend).or_fail()["health"],
        "healthy"
    );
    let ok = client(&p.a, "client", sa(VIP), 2).or_fail();
    assert_eq!(ok.backends.get(&marker), Some(&2), "{ok:?}");

    // The backend stops: the checks run on b fail, and a excludes it, saying why.
    p.server.signal(Signal::Kill).or_fail();
    p.server
        .wait_timeout(Duration::from_secs(5))
        .or_fail()
        .context("the backend server did not exit")
        .or_fail();
    let down = wait_health(&p.agent_a, backend, "unhealthy").or_fail();
    let reason = down["health_reason"].as_str().unwrap_or_default();
    assert!(
        reason.contains("through the mTLS tunnel") && reason.contains("503"),
        "{down}"
    );
    // It comes back once the backend does.
    p.server = p.b.http_server("server", backend, &marker, 200).or_fail();
    wait_health(&p.agent_a, backend, "healthy").or_fail();
}

#[test]
fn a_strict_ipv6_service_is_tunneled_between_hosts() {
    let bed = TestBed::new("mtls_ipv6").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let marker = unique_marker("v6");
    let backend = SocketAddr::new(b.ipv6().into(), BACKEND_PORT);
    let _server = b.tcp_server("server", backend, &marker).or_fail();
    let vip = sa("[fd00:96::30]:80");
    let pay6 = Service::tcp("pay6", vip, &[backend]).with("mtls = \"strict\"");
    let ca = Ca::init(&bed, "ca").or_fail();
    let start = |node: &Node, stem: &str| -> Result<Agent> {
        let cert = ca.issue(&bed, &format!("spiffe://mesh.test/ns/mesh/sa/{stem}"), stem)?;
        let agent = node.start_agent(&config(node, pay6.clone(), &ca.cert, &cert, &[], "")?)?;
        agent.wait_status(SETTLE, |st| {
            Agent::backends_in(st, "pay6") == [backend.to_string()]
        })?;
        Ok(agent)
    };
    let _agent_b = start(&b, "node-b").or_fail();
    let agent_a = start(&a, "node-a").or_fail();

    let report = client(&a, "client", vip, 3).or_fail();
    assert_eq!(
        report.backends.get(&marker),
        Some(&3),
        "the IPv6 VIP reaches the backend on b through the tunnel: {report:?}"
    );
    assert!(agent_a.counter("mtls_redirected").or_fail() >= 3);
    // b's agent took the flows in over the tunnel (to its inbound port on b's IPv6 address).
    wait_metric(
        &b,
        "mesh_mtls_flows_total{side=\"inbound\",result=\"opened\"}",
        3.0,
    )
    .or_fail();
    // Plaintext straight to the IPv6 backend is dropped by b's kernel.
    let plain = client(&a, "client", backend, 1).or_fail();
    assert_eq!(
        plain.ok(),
        0,
        "plaintext reached the strict backend: {plain:?}"
    );
}
