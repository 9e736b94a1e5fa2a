//! End-to-end health scenarios: a client node `a` runs `mesh-agent`, backend nodes run named
//! servers that the tests stop, restart or make answer badly; the assertions are on which
//! backends the clients reached and on what `mesh-agent endpoints` and `status` say.
//!
//! Needs root, cgroup2, bpffs and built binaries, like `lb.rs`; fails, never skips, without
//! them. Every test has its own bed (unique prefix).

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{bail, Result};
use mesh_tests::backends::{Backends, Protocol};
use mesh_tests::config::{render, Service};
use mesh_tests::{Agent, Node, OrFail, TestBed};
use serde_json::Value;

/// Per-connection timeout of the clients.
const T: Duration = Duration::from_secs(1);
/// How long the agent may take to apply a config.
const APPLY: Duration = Duration::from_secs(5);
/// Backends listen here on their node's address.
const BACKEND_PORT: u16 = 8080;
/// Scheduling slack on top of what the settings allow (2 shared cores, status polling).
const SLACK: Duration = Duration::from_millis(1500);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// `mesh-agent endpoints --output json`.
fn endpoints(agent: &Agent) -> Result<Vec<Value>> {
    Ok(serde_json::from_value(agent.query_json("endpoints")?)?)
}

/// The endpoint `addr` of `service`.
fn endpoint(all: &[Value], service: &str, addr: SocketAddr) -> Value {
    all.iter()
        .find(|e| e["service"] == service && e["address"] == addr.to_string())
        .cloned()
        .unwrap_or(Value::Null)
}

/// Polls the endpoints (every 20 ms, up to `timeout`) until `addr` of `service` satisfies
/// `pred`; returns it and how long it took.
fn wait_endpoint(
    agent: &Agent,
    service: &str,
    addr: SocketAddr,
    timeout: Duration,
    pred: impl Fn(&Value) -> bool,
) -> Result<(Value, Duration)> {
    let start = Instant::now();
    let mut last = Value::Null;
    while start.elapsed() < timeout {
        if let Ok(all) = endpoints(agent) {
            last = endpoint(&all, service, addr);
            if pred(&last) {
                return Ok((last, start.elapsed()));
            }
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    bail!(
        "endpoint {addr} of {service} did not reach the expected state within {timeout:?}; last: {last}\n--- agent log ---\n{}",
        agent.log()
    )
}

fn state_is(state: &'static str, health: &'static str) -> impl Fn(&Value) -> bool {
    move |e| e["state"] == state && e["health"] == health
}

/// A bed with client node `a` and one backend node per name.
struct Bed {
    // Fields drop in order: servers before the nodes and the bed.
    backends: Backends,
    a: Node,
    _bed: TestBed,
}

impl Bed {
    fn new(test: &str, names: &[&str]) -> Result<Self> {
        let bed = TestBed::new(test)?;
        let a = bed.add_node("a")?;
        let backends = Backends::start(&bed, names, Protocol::Tcp, false, BACKEND_PORT)?;
        Ok(Self {
            backends,
            a,
            _bed: bed,
        })
    }

    fn addr_of(&self, name: &str) -> SocketAddr {
        self.backends.addr_of(name).or_fail()
    }

    fn start_agent(&self, services: &[Service]) -> Result<Agent> {
        let agent = self.a.start_agent(&render("a", services))?;
        agent.wait_status(APPLY, |st| {
            services
                .iter()
                .all(|svc| !Agent::backends_in(st, &svc.name).is_empty())
        })?;
        Ok(agent)
    }
}

/// a. Three backends, TCP check every 500 ms, unhealthy after 2 failures: a stopped backend
/// leaves the table within interval × threshold (+ slack) and no new connection reaches it;
/// started again on the same address, it is readmitted and reached again.
#[test]
fn stopped_backend_is_ejected_and_readmitted() {
    let mut s = Bed::new(
        "stopped_backend_is_ejected_and_readmitted",
        &["b", "c", "d"],
    )
    .or_fail();
    let vip = sa("10.96.0.10:80");
    let addrs = s.backends.addrs();
    let web = Service::tcp("web", vip, &addrs)
        .with("health = { interval_ms = 500, timeout_ms = 200, healthy_threshold = 1, unhealthy_threshold = 2 }")
        .with("outlier = { enabled = false }");
    let agent = s.start_agent(&[web]).or_fail();
    let d = s.addr_of("d");
    let r = s.a.tcp_client("client", vip, 90, T).or_fail();
    assert_eq!(r.ok(), 90, "{r:?}");
    assert!(r.backends.get("d").copied().unwrap_or(0) > 0, "{r:?}");

    s.backends.stop("d").or_fail();
    let bound = Duration::from_millis(500 * 2) + SLACK;
    let (e, took) =
        wait_endpoint(&agent, "web", d, bound, state_is("excluded", "unhealthy")).or_fail();
    let reason = e["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("failed probe(s): connect"), "{e}");
    eprintln!("stopped backend excluded after {took:?}");
    let r = s.a.tcp_client("client", vip, 60, T).or_fail();
    assert_eq!(r.ok(), 60, "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");
    assert_eq!(r.backends.get("d"), None, "{r:?}");
    let st = agent.status_json().or_fail();
    assert_eq!(st["services"][0]["panic"], false, "{st}");
    assert_eq!(st["services"][0]["slots"], 2, "{st}");

    s.backends.start_again("d").or_fail();
    let bound = Duration::from_millis(500) + SLACK;
    let (_, took) = wait_endpoint(&agent, "web", d, bound, state_is("active", "healthy")).or_fail();
    eprintln!("restarted backend readmitted after {took:?}");
    let r = s.a.tcp_client("client", vip, 90, T).or_fail();
    assert_eq!(r.ok(), 90, "{r:?}");
    assert!(r.backends.get("d").copied().unwrap_or(0) > 0, "{r:?}");
}

/// b. Panic: both backends of a service stopped. Status says panic, the table keeps both, and
/// connects reach the backends (which refuse them) instead of failing for lack of backends.
#[test]
fn all_unhealthy_is_panic_and_keeps_every_backend() {
    let mut s = Bed::new(
        "all_unhealthy_is_panic_and_keeps_every_backend",
        &["b", "c"],
    )
    .or_fail();
    let vip = sa("10.96.0.11:80");
    let addrs = s.backends.addrs();
    let web = Service::tcp("web", vip, &addrs)
        .with("health = { interval_ms = 300, timeout_ms = 100, healthy_threshold = 1, unhealthy_threshold = 1 }");
    let agent = s.start_agent(&[web]).or_fail();
    s.backends.stop("b").or_fail();
    s.backends.stop("c").or_fail();
    let st = agent
        .wait_status(Duration::from_millis(600) + SLACK, |st| {
            st["services"][0]["panic"] == true
        })
        .or_fail();
    assert_eq!(st["services"][0]["slots"], 2, "{st}");
    let all = endpoints(&agent).or_fail();
    for addr in addrs {
        let e = endpoint(&all, "web", addr);
        assert_eq!(e["state"], "active", "{e}");
        assert_eq!(e["health"], "unhealthy", "{e}");
    }
    let forwarded = agent.counter("forwarded").or_fail();
    let no_backend = agent.counter("no_backend").or_fail();
    let r = s.a.tcp_client("client", vip, 20, T).or_fail();
    assert_eq!(r.errors.get("ECONNREFUSED"), Some(&20), "{r:?}");
    assert!(agent.counter("forwarded").or_fail() >= forwarded + 20);
    assert_eq!(agent.counter("no_backend").or_fail(), no_backend);

    // One comes back: panic is over and it takes every connection.
    s.backends.start_again("c").or_fail();
    agent
        .wait_status(Duration::from_millis(300) + SLACK, |st| {
            st["services"][0]["panic"] == false && st["services"][0]["slots"] == 1
        })
        .or_fail();
    let r = s.a.tcp_client("client", vip, 20, T).or_fail();
    assert_eq!(r.backends.get("c"), Some(&20), "{r:?}");
}

/// c. HTTP check: the backend answering 503 is excluded, the one answering 200 takes every
/// connection.
#[test]
fn http_check_excludes_a_backend_with_the_wrong_status() {
    let bed = TestBed::new("http_check_excludes_a_backend_with_the_wrong_status").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let c = bed.add_node("c").or_fail();
    let b_addr = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let c_addr = SocketAddr::new(c.ipv4().into(), BACKEND_PORT);
    let _servers = [
        b.http_server("server", b_addr, "b", 200).or_fail(),
        c.http_server("server", c_addr, "c", 503).or_fail(),
    ];
    let vip = sa("10.96.0.12:80");
    let web = Service::tcp("web", vip, &[b_addr, c_addr]).with(
        "health = { interval_ms = 400, timeout_ms = 200, unhealthy_threshold = 2, http_path = '/healthz', expect_status = 200 }",
    );
    let agent = a.start_agent(&render("a", &[web])).or_fail();
    let bound = Duration::from_millis(400 * 2) + SLACK + APPLY;
    let (e, _) = wait_endpoint(
        &agent,
        "web",
        c_addr,
        bound,
        state_is("excluded", "unhealthy"),
    )
    .or_fail();
    let reason = e["health_reason"].as_str().unwrap_or_default();
    assert!(reason.contains("HTTP status 503, expected 200"), "{e}");
    let all = endpoints(&agent).or_fail();
    assert_eq!(endpoint(&all, "web", b_addr)["health"], "healthy");
    let r = a.tcp_client("client", vip, 30, T).or_fail();
    assert_eq!(r.backends.get("b"), Some(&30), "{r:?}");
}

/// d. Passive: a backend address with nothing listening (connects reset) and no active check
/// is ejected after `consecutive_failures` failed connects, then readmitted once the ejection
/// time is over (and ejected again, for twice as long, as it still fails).
#[test]
fn failed_connects_eject_a_backend_for_a_while() {
    let s = Bed::new("failed_connects_eject_a_backend_for_a_while", &["b", "c"]).or_fail();
    let vip = sa("10.96.0.13:80");
    let b = s.addr_of("b");
    // c's node is up, but nothing listens on this port: every connect is reset.
    let dead = SocketAddr::new(s.addr_of("c").ip(), BACKEND_PORT + 1);
    let web = Service::tcp("web", vip, &[b, dead]).with(
        "outlier = { consecutive_failures = 3, base_ejection_ms = 3000, max_ejection_ms = 30000 }",
    );
    let agent = s.start_agent(&[web]).or_fail();

    // Connect until the dead one is ejected (the agent reads the kernel's counts every
    // 250 ms); bounded in time and rounds.
    let mut failed = 0;
    let mut ejected = None;
    let start = Instant::now();
    for _ in 0..100 {
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        let r = s.a.tcp_client("client", vip, 4, T).or_fail();
        failed += r.errors.get("ECONNREFUSED").copied().unwrap_or(0);
        let all = endpoints(&agent).or_fail();
        let e = endpoint(&all, "web", dead);
        if e["health"] == "ejected" {
            ejected = Some(e);
            break;
        }
    }
    let e = ejected.unwrap_or_else(|| {
        panic!(
            "never ejected after {failed} refused connects; status {}\n{}",
            agent
                .status_json()
                .map(|s| s.to_string())
                .unwrap_or_default(),
            agent.log()
        )
    });
    assert!(failed >= 3, "ejected after {failed} failures");
    assert_eq!(e["state"], "excluded", "{e}");
    assert!(
        e["health_reason"]
            .as_str()
            .unwrap_or_default()
            .contains("failed connects in a row"),
        "{e}"
    );
    assert!(e["ejected_until"].is_string(), "{e}");
    let r = s.a.tcp_client("client", vip, 30, T).or_fail();
    assert_eq!(r.backends.get("b"), Some(&30), "{r:?}");
    assert!(r.errors.is_empty(), "{r:?}");

    let (_, took) = wait_endpoint(
        &agent,
        "web",
        dead,
        Duration::from_millis(3000) + SLACK,
        state_is("active", "healthy"),
    )
    .or_fail();
    eprintln!("readmitted {took:?} after the ejection was seen");
    // Still dead: failing again ejects it again.
    let mut again = false;
    let start = Instant::now();
    for _ in 0..100 {
        if start.elapsed() > Duration::from_secs(5) {
            break;
        }
        std::thread::sleep(Duration::from_millis(50));
        s.a.tcp_client("client", vip, 4, T).or_fail();
        let all = endpoints(&agent).or_fail();
        if endpoint(&all, "web", dead)["health"] == "ejected" {
            again = true;
            break;
        }
    }
    assert!(again, "not ejected again\n{}", agent.log());
}

/// `outlier.max_ejection_percent`: with half of four backends allowed out, three dead ones see
/// only two ejected; the third stays in (its connects keep failing and are counted) until
/// there is room, and the one live backend never leaves.
#[test]
fn outlier_detection_ejects_at_most_its_share_of_the_backends() {
    let s = Bed::new("outlier_ejects_at_most_its_share", &["b", "c"]).or_fail();
    let vip = sa("10.96.0.14:80");
    let live = s.addr_of("b");
    // Nothing listens on these ports of c's node: every connect to them is reset.
    let dead: Vec<SocketAddr> = (1..=3)
        .map(|n| SocketAddr::new(s.addr_of("c").ip(), BACKEND_PORT + n))
        .collect();
    let mut backends = vec![live];
    backends.extend(&dead);
    let web = Service::tcp("web", vip, &backends).with(
        "outlier = { consecutive_failures = 2, base_ejection_ms = 30000, max_ejection_ms = 30000, max_ejection_percent = 50 }",
    );
    let agent = s.start_agent(&[web]).or_fail();
    let ejected = |agent: &Agent| -> Result<usize> {
        let all = endpoints(agent)?;
        Ok(all.iter().filter(|e| e["health"] == "ejected").count())
    };
    // Connect until two are ejected, then a while longer: a third never is.
    let start = Instant::now();
    let mut rounds = 0;
    while ejected(&agent).or_fail() < 2 && start.elapsed() < Duration::from_secs(8) {
        s.a.tcp_client("client", vip, 8, T).or_fail();
        std::thread::sleep(Duration::from_millis(50));
        rounds += 1;
    }
    assert_eq!(ejected(&agent).or_fail(), 2, "after {rounds} rounds");
    for _ in 0..10 {
        s.a.tcp_client("client", vip, 8, T).or_fail();
        std::thread::sleep(Duration::from_millis(100));
    }
    let all = endpoints(&agent).or_fail();
    let out: Vec<&Value> = all.iter().filter(|e| e["health"] == "ejected").collect();
    assert_eq!(out.len(), 2, "never more than half: {all:?}");
    assert_eq!(endpoint(&all, "web", live)["health"], "healthy", "{all:?}");
    assert!(
        out.iter()
            .all(|e| dead.iter().any(|d| e["address"] == d.to_string())),
        "only dead backends are ejected: {all:?}"
    );
}
