//! Restarts and re-configurations that drop nothing, asserted on what real clients saw.
//!
//! - A five-node mesh, a client on node `a` connecting in a loop to a VIP whose backends are
//!   on nodes `b`-`e`: `a`'s agent restarted by SIGTERM, SIGKILLed and restarted three times
//!   quickly, and restarted with gossip cut off (UDP to and from every peer dropped): not one
//!   connect fails, since the restarted agent starts from the peers' catalog it kept.
//! - A second agent for a node is refused, names the first, and changes nothing.
//! - A config written in two halves (one open file) is never applied half; a ConfigMap-style
//!   `..data` symlink swap is applied; SIGHUP reloads.
//! - `uninstall` refuses under a running agent, removes everything without one, and says so.
//!
//! Needs root, cgroup2, bpffs and built `mesh-agent` / `mesh-workload`; fails, never skips.

use std::io::Write as _;
use std::net::SocketAddr;
use std::os::unix::fs::symlink;
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::Context as _;

use mesh_tests::config::{gossip_table, render, Service};
use mesh_tests::workload::TcpClientReport;
use mesh_tests::{Agent, Node, OrFail, Proc, Signal, TestBed};

const VIP: &str = "10.96.0.10:80";
const BACKEND_PORT: u16 = 8080;
/// Convergence of a fresh mesh (starts are slow on a busy machine).
const CONVERGE: Duration = Duration::from_secs(20);
/// How long each client loop runs around a restart.
const LOOP: Duration = Duration::from_secs(6);
/// Between two connects of a loop.
const LOOP_INTERVAL: Duration = Duration::from_millis(2);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

fn sorted(mut v: Vec<String>) -> Vec<String> {
    v.sort();
    v
}

/// Asserts that a client loop saw no failure and reached backends.
fn assert_no_failure(scenario: &str, report: &TcpClientReport, agent: &Agent) {
    assert_eq!(
        report.failed(),
        0,
        "{scenario}: {report:?}\n--- agent log ---\n{}",
        agent.log()
    );
    assert!(
        report.ok() > 100,
        "{scenario}: too few connects: {report:?}"
    );
    eprintln!(
        "{scenario}: {} connects, {} failed, backends {:?}",
        report.ok(),
        report.failed(),
        report.backends
    );
}

/// Runs a client loop on `node` to the VIP while `during` runs (after 1 s of loop).
fn loop_around(node: &Node, during: impl FnOnce()) -> TcpClientReport {
    let looping = node
        .tcp_client_loop("client", sa(VIP), LOOP, LOOP_INTERVAL)
        .or_fail();
    std::thread::sleep(Duration::from_secs(1));
    during();
    looping.finish().or_fail()
}

/// Drops gossip (UDP port 15010) in and out of `node`'s namespace, or lets it through again.
fn gossip_blocked(node: &Node, blocked: bool) {
    let action = if blocked { "-I" } else { "-D" };
    for (chain, dir) in [
        ("INPUT", "--dport"),
        ("OUTPUT", "--dport"),
        ("INPUT", "--sport"),
    ] {
        let mut cmd = Command::new("iptables");
        cmd.args([action, chain, "-p", "udp", dir, "15010", "-j", "DROP"]);
        node.run("iptables", cmd, Duration::from_secs(10))
            .or_fail()
            .ok("iptables")
            .or_fail();
    }
}

#[test]
fn a_restarted_agent_never_refuses_while_gossip_catches_up_or_is_cut_off() {
    let bed = TestBed::new("restart_mesh").or_fail();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let gossip = |node: &Node, seed: &Node| {
        gossip_table(
            node.ipv4().into(),
            &[seed.ipv4().into()],
            &key,
            &["interval = \"100ms\"".to_owned()],
        )
    };
    // b..e host the backends; b is the seed.
    let mut hosts: Vec<(Node, Agent, Proc)> = Vec::new();
    for name in ["b", "c", "d", "e"] {
        let node = bed.add_node(name).or_fail();
        let backend = SocketAddr::new(node.ipv4().into(), BACKEND_PORT);
        let server = node.tcp_server("server", backend, name).or_fail();
        let seed = hosts.first().map_or(&node, |(n, _, _)| n);
        let config =
            render(name, &[Service::tcp("web", sa(VIP), &[backend])]) + &gossip(&node, seed);
        let agent = node.start_agent(&config).or_fail();
        hosts.push((node, agent, server));
    }
    let want = sorted(
        hosts
            .iter()
            .map(|(n, _, _)| SocketAddr::new(n.ipv4().into(), BACKEND_PORT).to_string())
            .collect(),
    );
    // a defines nothing: web reaches it through gossip only.
    let a = bed.add_node("a").or_fail();
    let mut agent = a
        .start_agent(&(render("a", &[]) + &gossip(&a, &hosts[0].0)))
        .or_fail();
    let converged = |agent: &Agent| {
        agent
            .wait_status(CONVERGE, |st| Agent::backends_in(st, "web") == want)
            .or_fail();
    };
    converged(&agent);

    let report = loop_around(&a, || agent.restart().or_fail());
    assert_no_failure("SIGTERM restart", &report, &agent);
    assert!(
        agent.log().contains("peers' catalog restored"),
        "{}",
        agent.log()
    );

    let report = loop_around(&a, || {
        for _ in 0..3 {
            agent.kill(Signal::Kill).or_fail();
            agent.restart().or_fail();
        }
    });
    assert_no_failure("3 SIGKILL restarts", &report, &agent);
    converged(&agent);

    // Gossip cut off, then a restart: the last catalog stays in force.
    gossip_blocked(&a, true);
    let report = loop_around(&a, || agent.restart().or_fail());
    assert_no_failure("restart with gossip blocked", &report, &agent);
    let status = agent.status_json().or_fail();
    assert_eq!(Agent::backends_in(&status, "web"), want, "{status}");
    let nodes = agent.query_json("nodes").or_fail();
    let restored = nodes
        .as_array()
        .into_iter()
        .flatten()
        .filter(|n| n["state"] == "restored")
        .count();
    assert_eq!(restored, 4, "the unheard peers show as restored: {nodes:#}");
    gossip_blocked(&a, false);
    converged(&agent);
}

#[test]
fn a_second_agent_for_the_node_is_refused_and_the_first_keeps_balancing() {
    let bed = TestBed::new("restart_second_agent").or_fail();
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
    let agent = a
        .start_agent(&render("a", &[Service::tcp("web", sa(VIP), &[backend])]))
        .or_fail();
    let before = agent.counter("forwarded").or_fail();

    let second = agent.run_second().or_fail();
    assert!(
        !second.status.success(),
        "a second agent started: {second:?}"
    );
    let pid = agent.pid().expect("agent started");
    for needle in [
        "already served by another agent".to_owned(),
        format!("pid {pid}"),
        agent.socket_path().display().to_string(),
        "--takeover".to_owned(),
    ] {
        assert!(
            second.stderr.contains(&needle),
            "no {needle:?} in {second:?}"
        );
    }
    // The first agent still balances, and still sees its flows.
    let report = a
        .tcp_client("client", sa(VIP), 50, Duration::from_secs(1))
        .or_fail();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert_eq!(report.ok(), 50, "{report:?}");
    assert!(agent.is_running());
    assert!(agent.counter("forwarded").or_fail() >= before + 50);
    // The flow events reach the agent through a ring buffer it polls: wait for them.
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let flows = agent
            .cli(&[
                "flows".as_ref(),
                "--limit".as_ref(),
                "1000".as_ref(),
                "--output".as_ref(),
                "json".as_ref(),
                "--admin-socket".as_ref(),
                agent.socket_path().as_os_str(),
            ])
            .or_fail()
            .ok("flows")
            .or_fail();
        let forwarded = flows
            .stdout
            .lines()
            .filter(|l| l.contains("\"web\""))
            .count();
        if forwarded >= 50 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "flows after the refusal: {}\n--- agent log ---\n{}",
            flows.stdout,
            agent.log()
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// The config of node `a` with services `svc0`..`svc{n-1}`, each its own VIP, all backed by
/// `backend`.
fn many_services(n: u32, backend: SocketAddr) -> String {
    let services: Vec<Service> = (0..n)
        .map(|i| {
            let vip = SocketAddr::new(format!("10.96.1.{}", i + 1).parse().unwrap(), 80);
            Service::tcp(&format!("svc{i}"), vip, &[backend])
        })
        .collect();
    render("a", &services)
}

#[test]
fn a_config_caught_mid_write_is_never_applied_half() {
    let bed = TestBed::new("restart_half_config").or_fail();
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
    let config = many_services(40, backend);
    let agent = a.start_agent(&config).or_fail();
    let last = sa("10.96.1.40:80");
    // Cut at the table boundary of the middle service: the first half is a valid config.
    let cut = config
        .find("[[services]]\nname = \"svc20\"")
        .expect("svc20 in the config");
    let (first, second) = config.split_at(cut);

    let looping = a
        .tcp_client_loop("client", last, LOOP, LOOP_INTERVAL)
        .or_fail();
    for _ in 0..5 {
        let mut file = std::fs::File::create(agent.config_path()).or_fail();
        file.write_all(first.as_bytes()).or_fail();
        file.flush().or_fail();
        std::thread::sleep(Duration::from_millis(50));
        file.write_all(second.as_bytes()).or_fail();
        drop(file);
        std::thread::sleep(Duration::from_millis(300));
    }
    let report = looping.finish().or_fail();
    assert_no_failure("two-half writes", &report, &agent);
    assert!(
        !agent.log().contains("fewer services"),
        "a half was applied:\n{}",
        agent.log()
    );
    let status = agent.status_json().or_fail();
    assert_eq!(
        status["services"].as_array().map(Vec::len),
        Some(40),
        "{status}"
    );
}

/// Points `link` at `target` atomically (a sibling link renamed over it).
fn relink(target: &str, link: &Path) {
    let mut name = link.file_name().expect("a link name").to_owned();
    name.push("_tmp");
    let tmp = link.with_file_name(name);
    let _ = std::fs::remove_file(&tmp);
    symlink(target, &tmp)
        .with_context(|| format!("linking {} -> {target}", tmp.display()))
        .or_fail();
    std::fs::rename(&tmp, link).or_fail();
}

#[test]
fn a_configmap_symlink_swap_is_applied_and_sighup_reloads() {
    let bed = TestBed::new("restart_configmap").or_fail();
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
    let mut agent = a.start_agent(&many_services(1, backend)).or_fail();

    // The Kubernetes layout: <config> -> cm/..data/mesh.toml, cm/..data -> ..v1.
    let cm = bed.tmpdir().join("cm");
    let version = |name: &str, services: u32| {
        std::fs::create_dir_all(cm.join(name)).or_fail();
        std::fs::write(
            cm.join(name).join("mesh.toml"),
            many_services(services, backend),
        )
        .or_fail();
    };
    version("..v1", 1);
    relink("..v1", &cm.join("..data"));
    relink("cm/..data/mesh.toml", agent.config_path());
    // The swap: a new directory, ..data renamed over to point at it.
    version("..v2", 2);
    let swapped = Instant::now();
    relink("..v2", &cm.join("..data"));
    agent
        .wait_status(Duration::from_secs(1), |st| {
            st["services"].as_array().map(Vec::len) == Some(2)
        })
        .or_fail();
    eprintln!("..data swap applied after {:?}", swapped.elapsed());
    let report = a
        .tcp_client("client", sa("10.96.1.2:80"), 20, Duration::from_secs(1))
        .or_fail();
    assert_eq!(report.failed(), 0, "{report:?}");

    // A change the watcher cannot see (written through a hard link in another directory)
    // is applied by SIGHUP.
    let hidden = bed.tmpdir().join("hidden");
    std::fs::create_dir_all(&hidden).or_fail();
    std::fs::hard_link(cm.join("..v2/mesh.toml"), hidden.join("mesh.toml")).or_fail();
    std::fs::write(hidden.join("mesh.toml"), many_services(3, backend)).or_fail();
    std::thread::sleep(Duration::from_millis(500));
    let status = agent.status_json().or_fail();
    assert_eq!(
        status["services"].as_array().map(Vec::len),
        Some(2),
        "{status}"
    );
    agent.kill(Signal::Hup).or_fail();
    agent
        .wait_status(Duration::from_secs(5), |st| {
            st["services"].as_array().map(Vec::len) == Some(3)
        })
        .or_fail();
    assert!(agent.is_running(), "SIGHUP killed the agent");
}

/// `bpftool cgroup show` of the node's cgroup.
fn cgroup_programs(node: &Node) -> String {
    let out = Command::new("bpftool")
        .args(["cgroup", "show"])
        .arg(node.cgroup().path())
        .output()
        .or_fail();
    assert!(out.status.success(), "bpftool: {out:?}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn uninstall_refuses_under_a_running_agent_and_removes_everything_without_one() {
    let bed = TestBed::new("restart_uninstall").or_fail();
    let (a, backend, _server) = bed.add_node_with_server("a", BACKEND_PORT).or_fail();
    let mut agent = a
        .start_agent(&render("a", &[Service::tcp("web", sa(VIP), &[backend])]))
        .or_fail();
    assert!(
        cgroup_programs(&a).contains("mesh_connect4"),
        "{}",
        cgroup_programs(&a)
    );
    let node = a.full_name();
    let state = agent.state_dir();
    let uninstall = |agent: &Agent| {
        agent
            .cli(&[
                "uninstall".as_ref(),
                "--node".as_ref(),
                node.as_ref(),
                "--bpffs".as_ref(),
                a.bpffs_dir().as_os_str(),
                "--state-dir".as_ref(),
                state.as_os_str(),
            ])
            .or_fail()
    };

    let refused = uninstall(&agent);
    assert!(!refused.status.success(), "{refused:?}");
    let pid = agent.pid().expect("agent started");
    assert!(
        refused.stderr.contains(&format!("pid {pid}")),
        "{refused:?}"
    );
    let report = a
        .tcp_client("client", sa(VIP), 20, Duration::from_secs(1))
        .or_fail();
    assert_eq!(
        report.failed(),
        0,
        "still balancing after a refused uninstall: {report:?}"
    );

    // SIGKILL leaves everything behind, the admin socket included.
    agent.kill(Signal::Kill).or_fail();
    assert!(agent.socket_path().exists());
    let removed = uninstall(&agent).ok("uninstall").or_fail();
    let pins = a.bpffs_dir().join("mesh").join(&node);
    for path in [pins.as_path(), agent.socket_path(), &state.join(&node)] {
        assert!(
            removed
                .stdout
                .contains(&format!("removed {}", path.display())),
            "{path:?} not reported in {removed:?}"
        );
        assert!(!path.exists(), "{path:?} still exists");
    }
    let shown = cgroup_programs(&a);
    assert!(!shown.contains("mesh"), "programs left attached: {shown}");
    let again = uninstall(&agent).ok("second uninstall").or_fail();
    assert!(again.stdout.contains("nothing to remove"), "{again:?}");
}
