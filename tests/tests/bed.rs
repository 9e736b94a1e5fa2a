//! Self-tests of the harness, without an agent: nodes reach each other over the bridge,
//! workloads land in the right namespace and cgroup, and teardown leaves nothing behind, also
//! when the test panics. Needs root, like every test here; fails (never skips) without it.

use std::net::SocketAddr;
use std::os::unix::fs::MetadataExt;
use std::path::PathBuf;
use std::time::Duration;

use mesh_tests::{netns, OrFail, TestBed};

const T: Duration = Duration::from_secs(2);

/// What a bed leaves on the host, to check it is gone after drop.
struct Footprint {
    prefix: String,
    cgroup_root: PathBuf,
    bpffs_dir: PathBuf,
    tmpdir: PathBuf,
}

impl Footprint {
    fn of(bed: &TestBed) -> Self {
        Self {
            prefix: bed.prefix().to_string(),
            cgroup_root: bed.cgroup_root().to_path_buf(),
            bpffs_dir: bed.bpffs_dir().to_path_buf(),
            tmpdir: bed.tmpdir().to_path_buf(),
        }
    }

    fn assert_gone(&self, keep_tmpdir: bool) {
        let left = netns::list_with_prefix(&format!("{}-", self.prefix));
        assert!(left.is_empty(), "netns left behind: {left:?}");
        assert!(
            !self.cgroup_root.exists(),
            "cgroup left behind: {}",
            self.cgroup_root.display()
        );
        assert!(
            !self.bpffs_dir.exists(),
            "bpffs dir left behind: {}",
            self.bpffs_dir.display()
        );
        assert_eq!(
            self.tmpdir.exists(),
            keep_tmpdir,
            "tmpdir {}",
            self.tmpdir.display()
        );
    }
}

fn netns_inode(pid: i32) -> u64 {
    std::fs::metadata(format!("/proc/{pid}/ns/net"))
        .expect("process ns")
        .ino()
}

#[test]
fn three_nodes_talk_and_teardown_is_clean() {
    let bed = TestBed::new("three_nodes_talk_and_teardown_is_clean").or_fail();
    let footprint = Footprint::of(&bed);
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let c = bed.add_node("c").or_fail();
    assert_eq!(a.ipv4().to_string(), "10.1.0.1");
    assert_eq!(c.ipv6().to_string(), "fd00:1::3");

    // IPv4 TCP a -> b.
    let b_addr = SocketAddr::new(b.ipv4().into(), 8080);
    let server = b.tcp_server("web", b_addr, "b").or_fail();
    let report = a.tcp_client("client", b_addr, 5, T).or_fail();
    assert_eq!(report.backends.get("b"), Some(&5), "{report:?}");
    assert!(report.errors.is_empty(), "{report:?}");
    assert_eq!(report.peer, vec![b_addr.to_string()]);

    // The server sits in b's namespace and in b's workload cgroup.
    assert_eq!(
        netns_inode(server.pid()),
        std::fs::metadata(b.netns().path()).or_fail().ino()
    );
    let web = b.workload_cgroup("web").or_fail();
    assert!(
        web.pids().contains(&server.pid()),
        "server {} not in {}",
        server.pid(),
        web.path().display()
    );

    // Echo over one held connection.
    let hold = a
        .tcp_hold(
            "client",
            b_addr,
            Duration::from_millis(20),
            Duration::from_millis(300),
            None,
        )
        .or_fail();
    assert_eq!(hold.backend, "b");
    let held = hold.finish().or_fail();
    assert!(held.errors.is_empty(), "{held:?}");
    assert!(held.sent >= 5 && held.echoed == held.sent, "{held:?}");

    // IPv6 TCP a -> c, and UDP both ways of addressing.
    let c6 = SocketAddr::new(c.ipv6().into(), 8080);
    let _c_tcp = c.tcp_server("web", c6, "c6").or_fail();
    let report = a.tcp_client("client", c6, 3, T).or_fail();
    assert_eq!(report.backends.get("c6"), Some(&3), "{report:?}");
    assert_eq!(report.peer, vec![c6.to_string()]);

    let c_udp = SocketAddr::new(c.ipv4().into(), 5353);
    let _c_udp = c.udp_server("dns", c_udp, "c").or_fail();
    for connected in [false, true] {
        let report = a.udp_client("client", c_udp, 4, connected, T).or_fail();
        assert_eq!(report.backends.get("c"), Some(&4), "{report:?}");
        assert!(report.errors.is_empty(), "{report:?}");
        assert_eq!(report.sources, vec![c_udp.to_string()]);
    }

    // Nothing listens on a: refused, counted by errno name.
    let a_addr = SocketAddr::new(a.ipv4().into(), 9);
    let report = b.tcp_client("client", a_addr, 2, T).or_fail();
    assert_eq!(report.errors.get("ECONNREFUSED"), Some(&2), "{report:?}");

    drop(server);
    drop((a, b, c));
    drop(bed);
    footprint.assert_gone(false);
}

#[test]
fn teardown_runs_on_panic() {
    let (tx, rx) = std::sync::mpsc::channel();
    let joined = std::thread::spawn(move || {
        let bed = TestBed::new("teardown_runs_on_panic").or_fail();
        tx.send(Footprint::of(&bed)).expect("send");
        let n = bed.add_node("n").or_fail();
        let addr = SocketAddr::new(n.ipv4().into(), 8080);
        let _server = n.tcp_server("web", addr, "n").or_fail();
        panic!("deliberate panic with a server running");
    })
    .join();
    assert!(joined.is_err(), "the thread should have panicked");
    let footprint = rx.recv().expect("footprint");
    // A failed test keeps its scratch directory for the logs; remove it here.
    footprint.assert_gone(true);
    std::fs::remove_dir_all(&footprint.tmpdir).expect("remove tmpdir");
}

/// A stand-in for `mesh-agent` speaking just enough of its CLI to exercise [`mesh_tests::Agent`]:
/// `run` records its pid and arguments in the "admin socket" (a plain file here) and sleeps;
/// `status` answers while that pid lives; `check` always rejects.
const FAKE_AGENT: &str = r#"#!/bin/bash
cmd=$1; shift
while [ $# -gt 0 ]; do
  case $1 in
    --admin-socket) sock=$2; shift;;
    --node) node=$2; shift;;
    --config) cfg=$2; shift;;
    --cgroup) cg=$2; shift;;
    --bpffs) bpffs=$2; shift;;
  esac
  shift
done
case $cmd in
  run)
    echo "fake agent up: node=$node cgroup=$cg bpffs=$bpffs config=$cfg"
    echo "$$ $node" > "$sock"
    trap 'rm -f "$sock"; echo "fake agent: SIGTERM"; exit 0' TERM
    # Short sleeps: a SIGKILLed stand-in leaves at most a 0.1 s orphan behind.
    for _ in $(seq 3000); do sleep 0.1 & wait; done
    ;;
  status)
    read -r pid node < "$sock" || exit 1
    kill -0 "$pid" 2>/dev/null || { echo "agent $pid is dead" >&2; exit 1; }
    echo "{\"node\": \"$node\", \"services\": [], \"counters\": {\"forwarded\": 0}}"
    ;;
  check)
    echo "$cfg:3: services[0].backends[0].address: not an address" >&2
    exit 1
    ;;
esac
"#;

#[test]
fn agent_driver_with_a_stand_in() {
    use std::os::unix::fs::PermissionsExt;

    use mesh_tests::{Agent, Signal};

    let bed = TestBed::new("agent_driver_with_a_stand_in").or_fail();
    let a = bed.add_node("a").or_fail();
    let fake = bed.tmpdir().join("fake-mesh-agent");
    std::fs::write(&fake, FAKE_AGENT).or_fail();
    std::fs::set_permissions(&fake, std::fs::Permissions::from_mode(0o755)).or_fail();

    let mut agent = Agent::start_with(&a, fake, "[node]\nname = \"x\"\n").or_fail();
    assert_eq!(
        agent.status_json().or_fail()["node"],
        a.full_name().as_str()
    );
    assert_eq!(agent.counter("forwarded").or_fail(), 0);
    let pid = agent.pid().expect("started");
    // In the node's namespace, but not in its cgroup (it stays in the runner's).
    assert_eq!(
        netns_inode(pid),
        std::fs::metadata(a.netns().path()).or_fail().ino()
    );
    let own_cgroup = std::fs::read_to_string("/proc/self/cgroup").or_fail();
    let agent_cgroup = std::fs::read_to_string(format!("/proc/{pid}/cgroup")).or_fail();
    assert_eq!(agent_cgroup, own_cgroup);
    assert!(agent
        .log()
        .contains(&format!("cgroup={}", a.cgroup().path().display())));

    agent.write_config("[node]\nname = \"y\"\n").or_fail();
    assert_eq!(
        std::fs::read_to_string(agent.config_path()).or_fail(),
        "[node]\nname = \"y\"\n"
    );
    let checked = agent.check(agent.config_path()).or_fail();
    assert!(!checked.status.success());
    assert!(checked
        .stderr
        .contains(&format!("{}:3:", agent.config_path().display())));

    agent.kill(Signal::Kill).or_fail();
    assert!(!agent.is_running());
    assert!(agent.status_json().is_err());
    agent.restart().or_fail();
    assert!(agent.is_running());
    assert_ne!(agent.pid(), Some(pid));
    agent.restart().or_fail(); // from a live agent: SIGTERM first
    assert!(agent.log().contains("fake agent: SIGTERM"));
    assert_eq!(agent.log().matches("=== mesh-tests: starting").count(), 3);
}
