//! A mesh without a controller: agents on several nodes join each other by gossip, and every
//! agent's kernel maps hold the whole mesh's catalog.
//!
//! Each node runs `mesh-agent` with a `[gossip]` table (seeded with the first node) and a
//! backend server, and defines the shared service `web` with its own server as the one backend.
//! The tests assert on each agent's status (the catalog it applied), on `mesh-agent nodes`, on
//! the metrics, and on what clients saw through the VIP.
//!
//! Needs root, cgroup2, bpffs and built `mesh-agent` / `mesh-workload`; fails, never skips.

use std::net::{SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::config::{gossip_table, render, Service, GOSSIP_PORT};
use mesh_tests::{metrics, Agent, Node, OrFail, Proc, Signal, TestBed};

const VIP: &str = "10.96.0.10:80";
const BACKEND_PORT: u16 = 8080;
/// The budget for a dead node's endpoints to leave every peer.
const WITHDRAW: Duration = Duration::from_secs(5);
/// Convergence after a start or a change (the target is 1 s; starts are slower).
const CONVERGE: Duration = Duration::from_secs(10);

fn sa(s: &str) -> SocketAddr {
    s.parse().expect("socket address")
}

/// One node of the mesh: its agent and its backend server.
struct Member {
    // Fields drop in order: agent and server before the node.
    agent: Agent,
    _server: Proc,
    node: Node,
}

impl Member {
    fn backend(&self) -> String {
        SocketAddr::new(self.node.ipv4().into(), BACKEND_PORT).to_string()
    }
}

/// The agent config of `node`: `web` with the node's server, and gossip seeded with `seed`.
fn config(bed: &TestBed, node: &Node, seed: &Node) -> String {
    let backend = SocketAddr::new(node.ipv4().into(), BACKEND_PORT);
    let web = Service::tcp("web", sa(VIP), &[backend]);
    render(node.name(), &[web])
        + &gossip_table(
            node.ipv4().into(),
            &[seed.ipv4().into()],
            &key_path(bed),
            &["interval = \"100ms\"".to_owned()],
        )
}

fn key_path(bed: &TestBed) -> std::path::PathBuf {
    bed.tmpdir().join("mesh.key")
}

fn add_member(bed: &TestBed, name: &str, seed: Option<&Node>) -> Result<Member> {
    let node = bed.add_node(name)?;
    let server = node.tcp_server(
        "server",
        SocketAddr::new(node.ipv4().into(), BACKEND_PORT),
        name,
    )?;
    let agent = node.start_agent(&config(bed, &node, seed.unwrap_or(&node)))?;
    Ok(Member {
        agent,
        _server: server,
        node,
    })
}

fn sorted(v: impl IntoIterator<Item = String>) -> Vec<String> {
    let mut v: Vec<String> = v.into_iter().collect();
    v.sort();
    v
}

/// Waits until every running agent of `members` serves `web` with exactly `want`, by `deadline`.
fn wait_web<'m>(
    members: impl IntoIterator<Item = &'m Member>,
    want: &[String],
    deadline: Instant,
) -> Result<()> {
    let want = sorted(want.iter().cloned());
    for m in members.into_iter().filter(|m| m.agent.is_running()) {
        let left = deadline.saturating_duration_since(Instant::now());
        m.agent
            .wait_status(left, |st| Agent::backends_in(st, "web") == want)
            .with_context(|| format!("web on {} never became {want:?}", m.node.name()))?;
    }
    Ok(())
}

/// `mesh-agent nodes --output json` of `agent`.
fn nodes(agent: &Agent) -> Result<serde_json::Value> {
    agent.query_json("nodes")
}

/// The value of metric line `name` on `node`'s metrics endpoint.
fn metric(node: &Node, name: &str) -> Result<f64> {
    let text = metrics::scrape(node)?;
    metrics::value(&text, name).with_context(|| format!("no metric {name} in:\n{text}"))
}

#[test]
fn five_nodes_converge_withdraw_a_dead_node_and_take_it_back() {
    let bed = TestBed::new("mesh_five_nodes").or_fail();
    std::fs::write(key_path(&bed), "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let a = add_member(&bed, "a", None).or_fail();
    let mut members = vec![a];
    for name in ["b", "c", "d", "e"] {
        let m = add_member(&bed, name, Some(&members[0].node)).or_fail();
        members.push(m);
    }
    let all: Vec<String> = members.iter().map(Member::backend).collect();
    wait_web(&members, &all, Instant::now() + CONVERGE).or_fail();

    // A client on a reaches the backends of the other nodes through the VIP.
    let report = members[0]
        .node
        .tcp_client("client", sa(VIP), 50, Duration::from_secs(1))
        .or_fail();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(
        report.backends.keys().filter(|b| *b != "a").count() >= 3,
        "a client on a should reach most other nodes' backends: {report:?}"
    );

    // Every agent knows every member.
    let listed = nodes(&members[0].agent).or_fail();
    let states: Vec<(String, String)> = listed
        .as_array()
        .into_iter()
        .flatten()
        .map(|n| {
            (
                n["state"].as_str().unwrap_or("").into(),
                n["role"].as_str().unwrap_or("").into(),
            )
        })
        .collect();
    assert_eq!(states.len(), 5, "{listed}");
    assert!(states.iter().all(|(s, _)| s == "alive"), "{listed}");
    let e_entry = listed
        .as_array()
        .into_iter()
        .flatten()
        .find(|n| n["name"].as_str().is_some_and(|s| s.ends_with("-e")))
        .cloned()
        .unwrap_or_default();
    assert_eq!(
        e_entry["endpoints"],
        serde_json::json!([format!("web={}", members[4].backend())]),
        "{listed}"
    );

    // A stranger's datagram (wrong key) is dropped and counted.
    let before = metric(
        &members[0].node,
        "mesh_gossip_auth_failures_total{kind=\"hmac\"}",
    )
    .or_fail();
    let target = SocketAddr::new(members[0].node.ipv4().into(), GOSSIP_PORT);
    members[1]
        .node
        .netns()
        .run_in(move || -> Result<()> {
            let s = UdpSocket::bind("0.0.0.0:0")?;
            let mut forged = b"MGS2".to_vec();
            forged.extend_from_slice(b"not a gossip message, wrong key");
            forged.extend_from_slice(&[7u8; 32]);
            for _ in 0..3 {
                s.send_to(&forged, target)?;
            }
            Ok(())
        })
        .or_fail()
        .or_fail();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        let now = metric(
            &members[0].node,
            "mesh_gossip_auth_failures_total{kind=\"hmac\"}",
        )
        .or_fail();
        if now >= before + 3.0 {
            break;
        }
        assert!(
            Instant::now() < deadline,
            "auth failures stayed at {now} (before: {before})"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    let alive = metric(&members[0].node, "mesh_gossip_members{state=\"alive\"}").or_fail();
    assert_eq!(alive, 5.0);
    wait_web(&members, &all, Instant::now() + Duration::from_secs(1)).or_fail();

    // e dies and is cut off: its endpoint leaves every other node within 5 s.
    let e_backend = members[4].backend();
    members[4].agent.kill(Signal::Kill).or_fail();
    let cut = Instant::now();
    bed.switch().ip(&["link", "set", "p-e", "down"]).or_fail();
    let without_e: Vec<String> = all.iter().filter(|b| **b != e_backend).cloned().collect();
    wait_web(&members[..4], &without_e, cut + WITHDRAW).or_fail();
    eprintln!(
        "e's endpoint withdrawn everywhere after {:?}",
        cut.elapsed()
    );
    let report = members[0]
        .node
        .tcp_client("client", sa(VIP), 30, Duration::from_secs(1))
        .or_fail();
    assert_eq!(
        report.failed(),
        0,
        "nothing goes to the dead node: {report:?}"
    );
    assert!(!report.backends.contains_key("e"), "{report:?}");
    let listed = nodes(&members[1].agent).or_fail();
    assert!(
        listed
            .as_array()
            .into_iter()
            .flatten()
            .any(|n| n["name"].as_str().is_some_and(|s| s.ends_with("-e")) && n["state"] == "dead"),
        "{listed}"
    );

    // e comes back (link up, agent restarted): it rejoins, adopts its pins, and is used again.
    bed.switch().ip(&["link", "set", "p-e", "up"]).or_fail();
    members[4].agent.restart().or_fail();
    let back = Instant::now();
    wait_web(&members, &all, back + CONVERGE).or_fail();
    eprintln!("e's endpoint back everywhere after {:?}", back.elapsed());
    assert_eq!(members[4].agent.status_json().or_fail()["adopted"], true);

    // A workload registered at run time on c appears everywhere, and leaves when deregistered.
    let extra = SocketAddr::new(members[2].node.ipv4().into(), 8081).to_string();
    let c = &members[2].agent;
    let register = |action: &str| {
        let mut args: Vec<&std::ffi::OsStr> = vec![
            action.as_ref(),
            "--admin-socket".as_ref(),
            c.socket_path().as_os_str(),
            "--service".as_ref(),
            "web".as_ref(),
            "--address".as_ref(),
            extra.as_ref(),
        ];
        if action == "register" {
            args.push("--weight".as_ref());
            args.push("2".as_ref());
        }
        c.cli(&args).or_fail().ok(action).or_fail()
    };
    let out = register("register");
    assert!(out.stdout.contains("registered web"), "{}", out.stdout);
    let mut with_extra = all.clone();
    with_extra.push(extra.clone());
    wait_web(&members, &with_extra, Instant::now() + CONVERGE).or_fail();
    register("deregister");
    wait_web(&members, &all, Instant::now() + CONVERGE).or_fail();

    // A node added at run time is recognised and used.
    let f = add_member(&bed, "f", Some(&members[1].node)).or_fail();
    let mut with_f = all.clone();
    with_f.push(f.backend());
    wait_web(
        members.iter().chain([&f]),
        &with_f,
        Instant::now() + CONVERGE,
    )
    .or_fail();
    let report = members[0]
        .node
        .tcp_client("client", sa(VIP), 80, Duration::from_secs(1))
        .or_fail();
    assert_eq!(report.failed(), 0, "{report:?}");
    assert!(report.backends.contains_key("f"), "{report:?}");
}

#[test]
fn a_conflicting_definition_is_resolved_the_same_everywhere() {
    let bed = TestBed::new("mesh_conflict").or_fail();
    std::fs::write(key_path(&bed), "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let a = add_member(&bed, "a", None).or_fail();
    let b = add_member(&bed, "b", Some(&a.node)).or_fail();
    let both = vec![a.backend(), b.backend()];
    wait_web([&a, &b], &both, Instant::now() + CONVERGE).or_fail();
    // b redefines web with another policy: a's definition (lowest node name) wins everywhere.
    let text = config(&bed, &b.node, &a.node).replace("lb = \"random\"", "lb = \"maglev\"");
    b.agent.write_config(&text).or_fail();
    for m in [&a, &b] {
        let st = m
            .agent
            .wait_status(CONVERGE, |st| {
                st["conflicts"].as_array().is_some_and(|c| !c.is_empty())
            })
            .or_fail();
        let web = st["services"]
            .as_array()
            .into_iter()
            .flatten()
            .find(|s| s["name"] == "web")
            .cloned()
            .unwrap_or_default();
        assert_eq!(web["lb"], "random", "{st}");
        assert_eq!(st["conflicts"][0]["kind"], "definition", "{st}");
        assert_eq!(Agent::backends_in(&st, "web"), sorted(both.clone()));
    }
    assert_eq!(
        metric(&a.node, "mesh_catalog_conflicts{kind=\"definition\"}").or_fail(),
        1.0
    );
}

/// `mesh-agent register` / `deregister` of `address` for `web` on `agent`.
fn registration(agent: &Agent, action: &str, address: &str) -> Result<()> {
    let out = agent
        .cli(&[
            action.as_ref(),
            "--admin-socket".as_ref(),
            agent.socket_path().as_os_str(),
            "--service".as_ref(),
            "web".as_ref(),
            "--address".as_ref(),
            address.as_ref(),
        ])?
        .ok(action)?;
    anyhow::ensure!(
        out.stdout.contains(&format!("{action}ed web")),
        "{action} printed {:?}",
        out.stdout
    );
    Ok(())
}

#[test]
fn registrations_survive_an_agent_restart_and_a_broken_file_is_set_aside() {
    let bed = TestBed::new("mesh_registrations").or_fail();
    std::fs::write(key_path(&bed), "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let a = add_member(&bed, "a", None).or_fail();
    let mut b = add_member(&bed, "b", Some(&a.node)).or_fail();
    let all = vec![a.backend(), b.backend()];
    wait_web([&a, &b], &all, Instant::now() + CONVERGE).or_fail();
    let extra = SocketAddr::new(b.node.ipv4().into(), 8081).to_string();
    let with_extra = vec![a.backend(), b.backend(), extra.clone()];
    registration(&b.agent, "register", &extra).or_fail();
    wait_web([&a, &b], &with_extra, Instant::now() + CONVERGE).or_fail();
    let file = b
        .agent
        .state_dir()
        .join(b.node.full_name())
        .join("registrations.json");
    assert!(
        std::fs::read_to_string(&file).or_fail().contains(&extra),
        "{} keeps the registration",
        file.display()
    );

    // b's agent restarts: it serves the registration at once, and its peer sees it again.
    b.agent.restart().or_fail();
    let st = b.agent.status_json().or_fail();
    assert!(
        Agent::backends_in(&st, "web").contains(&extra),
        "b restored its registration before it was ready: {st}"
    );
    wait_web([&a, &b], &with_extra, Instant::now() + CONVERGE).or_fail();

    // A deregistration is kept too: after another restart the endpoint stays gone.
    registration(&b.agent, "deregister", &extra).or_fail();
    wait_web([&a, &b], &all, Instant::now() + CONVERGE).or_fail();
    b.agent.restart().or_fail();
    wait_web([&a, &b], &all, Instant::now() + CONVERGE).or_fail();

    // A file the agent cannot read back: it starts without registrations, says which file
    // and why, and keeps the file aside for the operator.
    b.agent.kill(Signal::Term).or_fail();
    std::fs::write(&file, "{\"version\": 1, \"endpoints\": [").or_fail();
    b.agent.restart().or_fail();
    let log = b.agent.log();
    assert!(
        log.lines().any(|l| l.contains("registrations not restored")
            && l.contains(&format!("{}: not a registrations file", file.display()))),
        "no line naming the broken file:\n{log}"
    );
    let aside = file.with_extension("json.broken");
    assert_eq!(
        std::fs::read_to_string(&aside).or_fail(),
        "{\"version\": 1, \"endpoints\": ["
    );
    wait_web([&a, &b], &all, Instant::now() + CONVERGE).or_fail();
    registration(&b.agent, "register", &extra).or_fail();
    wait_web([&a, &b], &with_extra, Instant::now() + CONVERGE).or_fail();
    assert!(std::fs::read_to_string(&file).or_fail().contains(&extra));
}
