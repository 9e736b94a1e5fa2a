//! The operator's view, end to end: every `mesh-agent` CLI answer checked field by field after
//! real traffic, `flows --follow` showing the decisions the test's own clients caused, and the
//! clear error when no agent is running.
//!
//! Needs root, cgroup2, bpffs and built binaries; fails, never skips, without them.

use std::collections::BTreeSet;
use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use mesh_tests::config::{render, Backend, Service};
use mesh_tests::host::agent_bin;
use mesh_tests::process::{self, Capture};
use mesh_tests::{Agent, OrFail, TestBed};
use serde_json::{json, Value};

/// Per-connection timeout of the clients.
const T: Duration = Duration::from_secs(1);
const BACKEND_PORT: u16 = 8080;

fn cli_json(agent: &Agent, command: &str) -> Value {
    agent.query_json(command).or_fail()
}

fn keys(value: &Value) -> BTreeSet<String> {
    value
        .as_object()
        .expect("a JSON object")
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

#[test]
fn cli_json_answers_field_by_field() {
    let bed = TestBed::new("cli_json_answers_field_by_field").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let c = bed.add_node("c").or_fail();
    let b_addr = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let c_addr = SocketAddr::new(c.ipv4().into(), BACKEND_PORT);
    let _servers = [
        b.tcp_server("server", b_addr, "b").or_fail(),
        c.tcp_server("server", c_addr, "c").or_fail(),
    ];
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    // c is drained: listed with weight 0, never picked.
    let web = Service::tcp("web", vip, &[]).lb("weighted").backends(vec![
        Backend::weighted(b_addr, 2),
        Backend::weighted(c_addr, 0),
    ]);
    let agent = a.start_agent(&render("a", &[web])).or_fail();
    let report = a.tcp_client("client", vip, 20, T).or_fail();
    assert_eq!(report.ok(), 20, "{report:?}");

    let status = cli_json(&agent, "status");
    assert_eq!(
        keys(&status),
        set(&[
            "degraded",
            "node",
            "config",
            "cgroup",
            "adopted",
            "config_error",
            "services",
            "counters",
            "conflicts"
        ])
    );
    assert_eq!(status["conflicts"], json!([]));
    // c is drained, not unhealthy: nothing is wrong.
    assert_eq!(status["degraded"], json!([]));
    assert_eq!(status["node"], json!(a.full_name()));
    assert_eq!(
        status["cgroup"],
        json!(a.cgroup().path().display().to_string())
    );
    assert_eq!(status["adopted"], json!(false));
    assert_eq!(status["config_error"], Value::Null);
    let expected_service = json!({
        "name": "web",
        "vip": "10.96.0.10",
        "port": 80,
        "protocol": "tcp",
        "lb": "weighted",
        "affinity": "none",
        "backends": [
            {"address": b_addr.to_string(), "weight": 2},
            {"address": c_addr.to_string(), "weight": 0},
        ],
        "slots": 1,
        "healthy": 1,
        "panic": false,
    });
    assert_eq!(status["services"], json!([expected_service.clone()]));
    let counters = &status["counters"];
    assert_eq!(
        keys(counters),
        set(&[
            "forwarded",
            "no_backend",
            "no_service_port",
            "passthrough",
            "affinity_hit",
            "affinity_miss",
            "reverse_hit",
            "slot_missing",
            "map_update_failed",
            "events_dropped",
            "mtls_redirected",
            "agent_socket",
            "strict_dropped",
            "connect_failed",
            "mtls_no_agent",
            "loopback_redirected",
        ])
    );
    assert!(counters["forwarded"].as_u64() >= Some(20), "{counters}");
    assert_eq!(counters["no_backend"], json!(0));

    assert_eq!(cli_json(&agent, "services"), json!([expected_service]));

    let endpoints = cli_json(&agent, "endpoints");
    assert_eq!(
        endpoints,
        json!([
            {"service": "web", "address": b_addr.to_string(), "weight": 2, "state": "active", "connections": 20, "health": "healthy", "health_reason": null, "ejected_until": null, "announced_by": [a.full_name()]},
            {"service": "web", "address": c_addr.to_string(), "weight": 0, "state": "drained", "connections": 0, "health": "healthy", "health_reason": null, "ejected_until": null, "announced_by": [a.full_name()]},
        ])
    );

    let nodes = cli_json(&agent, "nodes");
    let node = &nodes[0];
    assert_eq!(nodes.as_array().map(Vec::len), Some(1), "{nodes}");
    assert_eq!(
        keys(node),
        set(&[
            "name",
            "role",
            "cgroup",
            "version",
            "uptime_s",
            "address",
            "state",
            "endpoints",
            "rejected"
        ])
    );
    assert_eq!(node["state"], json!("alive"));
    // No gossip: no address, null rather than an empty string.
    assert_eq!(node["address"], Value::Null);
    assert_eq!(
        node["cgroup"],
        json!(a.cgroup().path().display().to_string())
    );
    assert_eq!(
        node["endpoints"],
        json!([format!("web={b_addr}"), format!("web={c_addr}")])
    );
    assert_eq!(node["name"], json!(a.full_name()));
    assert_eq!(node["role"], json!("self"));
    let version = node["version"].as_str().unwrap_or_default();
    assert!(
        version.starts_with(concat!(env!("CARGO_PKG_VERSION"), " (")),
        "version {version:?}"
    );

    assert_eq!(cli_json(&agent, "policies"), json!([]));
    assert_eq!(cli_json(&agent, "certs"), json!([]));

    // The tables: aligned plain columns, the verdict first, wide columns on request.
    let table = |args: &[&str]| {
        let mut all: Vec<&std::ffi::OsStr> = args.iter().map(|a| a.as_ref()).collect();
        all.extend(["-s".as_ref(), agent.socket_path().as_os_str()]);
        agent.cli(&all).or_fail().ok("a table").or_fail().stdout
    };
    let status_table = table(&["status"]);
    let lines: Vec<&str> = status_table.lines().collect();
    assert_eq!(lines[0], "ok", "{status_table}");
    let header = |text: &str| text.lines().next().unwrap_or_default().to_owned();
    let columns = |line: &str| {
        line.split_whitespace()
            .map(str::to_owned)
            .collect::<Vec<_>>()
    };
    let services_header = lines
        .iter()
        .find(|l| l.starts_with("SERVICE"))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        columns(services_header),
        ["SERVICE", "FRONTEND", "PROTO", "LB", "BACKENDS", "HEALTHY", "SLOTS"]
    );
    let web_row = lines
        .iter()
        .find(|l| l.starts_with("web "))
        .copied()
        .unwrap_or_default();
    assert_eq!(
        columns(web_row),
        ["web", "10.96.0.10:80", "tcp", "weighted", "2", "1/1", "1"]
    );

    let endpoints_table = table(&["endpoints"]);
    assert_eq!(
        columns(&header(&endpoints_table)),
        [
            "SERVICE",
            "ENDPOINT",
            "WEIGHT",
            "STATE",
            "HEALTH",
            "CONNECTIONS",
            "NODE"
        ]
    );
    let rows: Vec<Vec<String>> = endpoints_table.lines().skip(1).map(columns).collect();
    assert_eq!(
        rows,
        [
            vec![
                "web".to_owned(),
                b_addr.to_string(),
                "2".into(),
                "active".into(),
                "healthy".into(),
                "20".into(),
                a.full_name()
            ],
            vec![
                "web".to_owned(),
                c_addr.to_string(),
                "0".into(),
                "drained".into(),
                "healthy".into(),
                "0".into(),
                a.full_name()
            ],
        ]
    );
    // Every column of a row starts where its header does.
    let starts = |line: &str| -> Vec<usize> {
        let bytes = line.as_bytes();
        (0..bytes.len())
            .filter(|&i| bytes[i] != b' ' && (i == 0 || bytes[i - 1] == b' '))
            .collect()
    };
    let head = header(&endpoints_table);
    for row in endpoints_table.lines().skip(1) {
        assert_eq!(starts(&head), starts(row), "misaligned:\n{endpoints_table}");
    }
    let wide_header = columns(&header(&table(&["endpoints", "-o", "wide"])));
    assert_eq!(
        wide_header.last().map(String::as_str),
        Some("UNTIL"),
        "{wide_header:?}"
    );

    let nodes_table = table(&["nodes"]);
    let node_row = columns(nodes_table.lines().nth(1).unwrap_or_default());
    assert_eq!(
        node_row[..3],
        [a.full_name(), "self".into(), "alive".into()]
    );
    let uptime = &node_row[4];
    assert!(
        uptime.ends_with('s') || uptime.ends_with('m'),
        "uptime {uptime:?} is not humanised"
    );

    // YAML carries the same answer as JSON.
    let yaml: Value = yaml_serde::from_str(&table(&["endpoints", "-o", "yaml"])).or_fail();
    assert_eq!(yaml, endpoints);
}

#[test]
fn cli_without_an_agent_says_so() {
    let mut cmd = Command::new(agent_bin().or_fail());
    cmd.args([
        "status",
        "--admin-socket",
        "/run/mesh-test-no-such-agent.sock",
    ]);
    let out = process::spawn("mesh-agent status", cmd, None, None, Capture::Lines)
        .or_fail()
        .finish(Duration::from_secs(5))
        .or_fail();
    assert!(!out.status.success(), "status without an agent succeeded");
    assert!(
        out.stderr
            .contains("cannot reach the agent at /run/mesh-test-no-such-agent.sock")
            && out.stderr.contains("is `mesh-agent run` running"),
        "unclear error: {}",
        out.stderr
    );
}

#[test]
fn flows_follow_shows_the_decisions_clients_caused() {
    let bed = TestBed::new("flows_follow_shows_the_decisions_clients_caused").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let b_addr = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let _server = b.tcp_server("server", b_addr, "b").or_fail();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let agent = a
        .start_agent(&render("a", &[Service::tcp("web", vip, &[b_addr])]))
        .or_fail();

    let mut follow = Command::new(agent_bin().or_fail());
    follow
        .arg("flows")
        .arg("--follow")
        .arg("--service")
        .arg("web");
    follow
        .arg("--output")
        .arg("json")
        .arg("--admin-socket")
        .arg(agent.socket_path());
    let follower = process::spawn("flows --follow", follow, None, None, Capture::Lines).or_fail();
    // Let the follower subscribe before the traffic starts.
    std::thread::sleep(Duration::from_millis(300));

    let report = a.tcp_client("shop-frontend", vip, 5, T).or_fail();
    assert_eq!(report.ok(), 5, "{report:?}");
    let refused = a
        .tcp_client(
            "shop-frontend",
            "10.96.0.10:81".parse().expect("addr"),
            2,
            T,
        )
        .or_fail();
    assert_eq!(refused.failed(), 2, "{refused:?}");

    let identity = format!(
        "/{}",
        a.workload_cgroup("shop-frontend")
            .or_fail()
            .path()
            .strip_prefix(bed.cgroup_root().parent().expect("cgroup2 root"))
            .expect("under the cgroup2 root")
            .display()
    );
    // Five forwarded flows of `web` arrive on the open stream; the refusals are filtered out.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    let mut flows = follower_lines(&follower.stdout_text());
    while flows.len() < 5 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
        flows = follower_lines(&follower.stdout_text());
    }
    // Anything else that arrives meanwhile would be a filter leak.
    std::thread::sleep(Duration::from_millis(200));
    let flows = follower_lines(&follower.stdout_text());
    assert_eq!(flows.len(), 5, "{flows:#?}");
    for flow in &flows {
        assert_eq!(flow["service"], json!("web"), "{flow}");
        assert_eq!(flow["frontend"], json!(vip.to_string()), "{flow}");
        assert_eq!(flow["backend"], json!(b_addr.to_string()), "{flow}");
        assert_eq!(flow["verdict"], json!("forwarded"), "{flow}");
        assert_eq!(flow["call"], json!("connect"), "{flow}");
        assert_eq!(flow["protocol"], json!("tcp"), "{flow}");
        assert_eq!(flow["identity"], json!(identity), "{flow}");
    }
    assert!(follower.is_running(), "--follow ended on its own");

    // Without --follow, the history answers and ends; the refusals are there by verdict.
    let out = agent
        .cli(&[
            "flows".as_ref(),
            "--verdict".as_ref(),
            "no_service_port".as_ref(),
            "--output".as_ref(),
            "json".as_ref(),
            "--admin-socket".as_ref(),
            agent.socket_path().as_os_str(),
        ])
        .or_fail()
        .ok("flows --verdict")
        .or_fail();
    let refusals = follower_lines(&out.stdout);
    assert_eq!(refusals.len(), 2, "{refusals:#?}");
    for flow in &refusals {
        assert_eq!(flow["frontend"], json!("10.96.0.10:81"), "{flow}");
        assert_eq!(flow["backend"], Value::Null, "{flow}");
        assert_eq!(flow["service"], Value::Null, "{flow}");
        assert_eq!(flow["identity"], json!(identity), "{flow}");
    }
}

/// The JSON lines printed so far.
fn follower_lines(text: &str) -> Vec<Value> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            serde_json::from_str(l).unwrap_or_else(|e| panic!("non-JSON flow line ({e}): {l}"))
        })
        .collect()
}

#[test]
fn log_level_changes_what_a_running_agent_logs_and_debug_keeps_the_loader_quiet() {
    let bed = TestBed::new("log_level_changes_what_a_running_agent_logs").or_fail();
    let a = bed.add_node("a").or_fail();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let backend: SocketAddr = "10.200.0.2:8080".parse().expect("backend");
    let config = |port: u16| {
        render(
            "a",
            &[Service::tcp(
                "web",
                SocketAddr::new(vip.ip(), port),
                &[backend],
            )],
        )
    };
    let mut agent = a.start_agent(&config(80)).or_fail();
    // Started at debug: mesh's debug lines, none of the loader's (aya's BTF bookkeeping).
    agent.set_env("RUST_LOG", "debug");
    agent.restart().or_fail();
    let started = agent.log();
    let noise: Vec<&str> = started
        .lines()
        .filter(|l| l.contains("DEBUG") && (l.contains(" aya::") || l.contains(" aya_obj::")))
        .collect();
    assert!(
        noise.is_empty(),
        "loader debug lines: {}\n{started}",
        noise.len()
    );

    let level = |filter: &str| {
        agent.cli(&[
            "log-level".as_ref(),
            filter.as_ref(),
            "-s".as_ref(),
            agent.socket_path().as_os_str(),
        ])
    };
    let applied = |log: &str| log.matches("config applied to the kernel").count();
    level("warn").or_fail().ok("log-level warn").or_fail();
    let before = applied(&agent.log());
    agent.write_config(&config(81)).or_fail();
    let serves = |port: u16| move |status: &Value| status["services"][0]["port"] == json!(port);
    agent
        .wait_status(Duration::from_secs(5), serves(81))
        .or_fail();
    assert_eq!(
        applied(&agent.log()),
        before,
        "an info line got through at warn"
    );

    let out = level("info").or_fail().ok("log-level info").or_fail();
    assert_eq!(out.stdout.trim_end(), "log filter now info");
    agent.write_config(&config(82)).or_fail();
    agent
        .wait_status(Duration::from_secs(5), serves(82))
        .or_fail();
    let log = agent.log();
    assert!(applied(&log) > before, "no info line at info:\n{log}");

    // A filter that does not parse is refused, naming it; the one in force stays.
    let bad = level("mesh_agent=loud").or_fail();
    assert!(!bad.status.success());
    assert!(bad.stderr.contains("mesh_agent=loud"), "{}", bad.stderr);
}

#[test]
fn sysdump_archives_every_answer_the_config_and_no_key() {
    let bed = TestBed::new("sysdump_archives_every_answer").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let b_addr = SocketAddr::new(b.ipv4().into(), BACKEND_PORT);
    let _server = b.tcp_server("server", b_addr, "b").or_fail();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let agent = a
        .start_agent(&render("a", &[Service::tcp("web", vip, &[b_addr])]))
        .or_fail();
    assert_eq!(a.tcp_client("client", vip, 3, T).or_fail().ok(), 3);
    // The kernel's flow events reach the agent's history asynchronously.
    let recorded = || {
        let out = agent
            .cli(&[
                "flows".as_ref(),
                "-o".as_ref(),
                "json".as_ref(),
                "-s".as_ref(),
                agent.socket_path().as_os_str(),
            ])
            .or_fail()
            .ok("flows")
            .or_fail();
        follower_lines(&out.stdout).len()
    };
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while recorded() < 3 && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(50));
    }

    let archive = bed.tmpdir().join("dump.tar.gz");
    // From inside the node: the metrics endpoint is the node's loopback.
    let mut sysdump = Command::new(agent_bin().or_fail());
    sysdump
        .args(["sysdump", "-s"])
        .arg(agent.socket_path())
        .arg("-f")
        .arg(&archive);
    let out = a.run("sysdump", sysdump, Duration::from_secs(30)).or_fail();
    assert!(out.status.success(), "sysdump failed: {}", out.stderr);
    let list = Command::new("tar")
        .arg("-tzf")
        .arg(&archive)
        .output()
        .or_fail();
    let names: BTreeSet<String> = String::from_utf8_lossy(&list.stdout)
        .lines()
        .map(str::to_owned)
        .collect();
    let want: BTreeSet<String> = [
        "status.json",
        "services.json",
        "endpoints.json",
        "nodes.json",
        "policies.json",
        "certs.json",
        "flows.ndjson",
        "config.toml",
        "maps.txt",
        "versions.txt",
        "MANIFEST.txt",
    ]
    .iter()
    .map(|n| format!("mesh-sysdump/{n}"))
    .collect();
    assert!(
        want.is_subset(&names),
        "missing {:?}",
        want.difference(&names)
    );

    let dir = bed.tmpdir().join("dump");
    std::fs::create_dir_all(&dir).or_fail();
    let unpacked = Command::new("tar")
        .arg("-xzf")
        .arg(&archive)
        .arg("-C")
        .arg(&dir)
        .status()
        .or_fail();
    assert!(unpacked.success());
    let read = |name: &str| std::fs::read_to_string(dir.join("mesh-sysdump").join(name)).or_fail();
    let status: Value = serde_json::from_str(&read("status.json")).or_fail();
    assert_eq!(status["node"], json!(a.full_name()));
    assert_eq!(
        read("config.toml"),
        std::fs::read_to_string(agent.config_path()).or_fail()
    );
    assert_eq!(follower_lines(&read("flows.ndjson")).len(), 3);
    assert!(
        read("maps.txt").contains("mesh_map_entries"),
        "{}",
        read("maps.txt")
    );
    assert!(read("versions.txt").contains(&format!("agent: {}", env!("CARGO_PKG_VERSION"))));
    let manifest = read("MANIFEST.txt");
    // The agent here logs to a file, not the journal: the manifest says why agent.log is
    // missing.
    assert!(
        manifest.contains("agent.log: missing: journalctl"),
        "{manifest}"
    );
    for name in &names {
        if let Some(file) = name.strip_prefix("mesh-sysdump/") {
            assert!(!read(file).contains("PRIVATE KEY"), "{file} holds a key");
        }
    }
}

/// `mesh-agent completion bash|zsh` prints scripts that offer every subcommand: bash loads
/// its script and registers the completion; zsh's is a `#compdef` function for mesh-agent.
#[test]
fn completions_for_bash_and_zsh_offer_every_subcommand() {
    let script = |shell: &str| {
        let out = Command::new(agent_bin().or_fail())
            .args(["completion", shell])
            .output()
            .or_fail();
        assert!(out.status.success(), "completion {shell} failed");
        String::from_utf8(out.stdout).or_fail()
    };
    let subcommands = [
        "run",
        "check",
        "status",
        "services",
        "endpoints",
        "nodes",
        "flows",
        "register",
        "deregister",
        "policies",
        "certs",
        "log-level",
        "sysdump",
        "uninstall",
        "completion",
        "man",
        "ca",
        "cert",
    ];
    let bash = script("bash");
    let zsh = script("zsh");
    for name in subcommands {
        assert!(bash.contains(name), "bash completion lacks {name}");
        assert!(zsh.contains(name), "zsh completion lacks {name}");
    }
    assert!(zsh.starts_with("#compdef mesh-agent"), "{}", &zsh[..80]);
    // bash sources it and then completes mesh-agent with it.
    let dir = std::env::temp_dir().join(format!("mesh-completion-{}", std::process::id()));
    std::fs::create_dir_all(&dir).or_fail();
    let file = dir.join("mesh-agent.bash");
    std::fs::write(&file, &bash).or_fail();
    let loaded = Command::new("bash")
        .arg("-c")
        .arg(format!(
            "source {} && complete -p mesh-agent",
            file.display()
        ))
        .output()
        .or_fail();
    let _ = std::fs::remove_dir_all(&dir);
    let registered = String::from_utf8_lossy(&loaded.stdout);
    assert!(
        loaded.status.success() && registered.contains("mesh-agent"),
        "bash did not register the completion: {registered} {}",
        String::from_utf8_lossy(&loaded.stderr)
    );
}
