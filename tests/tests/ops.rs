//! End-to-end operations scenarios: the agent's Prometheus endpoint scraped by a real HTTP
//! client (`curl`, run inside client node `a`) after real traffic through a VIP, the Grafana
//! dashboard checked against what that endpoint really exports, the `/healthz` and `/ready`
//! probes on the same port as the agent starts, restarts and hears the mesh, and the admin
//! API's `GET /v1/applied` stream (one line per write of the kernel maps) through a config
//! change.
//!
//! Needs root, cgroup2, bpffs, `curl` and a built `mesh-agent`; fails, never skips, without
//! them. Every test has its own bed, so the agents' default metrics address (`0.0.0.0:15020`)
//! is per network namespace and never collides.

use std::collections::{BTreeMap, BTreeSet};
use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::backends::{Backends, Protocol};
use mesh_tests::config::{render, Backend, Service};
use mesh_tests::process::{self, Capture};
use mesh_tests::{Agent, Node, OrFail, TestBed};
use serde_json::Value;

/// Per-connection timeout of the clients.
const T: Duration = Duration::from_secs(1);
/// How long the agent may take to apply (or reject) a config change.
const APPLY: Duration = Duration::from_secs(5);
/// Backends listen here on their node's address.
const BACKEND_PORT: u16 = 8080;
/// The agent's default metrics endpoint, seen from inside its node.
const METRICS_URL: &str = "http://127.0.0.1:15020/metrics";
const OPENMETRICS: &str = "application/openmetrics-text; version=1.0.0; charset=utf-8";

/// Client node `a` with its agent, and one backend node per name running a server named after
/// it.
struct Bed {
    // Fields drop in order: agent and servers before the nodes and the bed.
    agent: Agent,
    backends: Backends,
    a: Node,
    _bed: TestBed,
}

impl Bed {
    /// Starts the backends, then the agent with service `web` on `vip` over all of them, and
    /// waits until the status shows it.
    fn new(test: &str, names: &[&str], vip: SocketAddr) -> Result<Self> {
        let bed = TestBed::new(test)?;
        let a = bed.add_node("a")?;
        let backends = Backends::start(&bed, names, Protocol::Tcp, false, BACKEND_PORT)?;
        let addrs = backends.addrs();
        let web = Service::tcp("web", vip, &addrs);
        let agent = a.start_agent(&render("a", std::slice::from_ref(&web)))?;
        let mut want: Vec<String> = addrs.iter().map(ToString::to_string).collect();
        want.sort();
        agent.wait_status(APPLY, |st| Agent::backends_in(st, "web") == want)?;
        Ok(Self {
            agent,
            backends,
            a,
            _bed: bed,
        })
    }

    /// One `GET /metrics` with curl inside node `a`: the response headers and the parsed body.
    fn scrape(&self) -> Result<Scrape> {
        let response = curl(&self.a, &["--include", METRICS_URL])?;
        // curl prints the status line and headers, an empty line, then the body (the capture
        // strips the \r of each line).
        let (head, body) = response
            .split_once("\n\n")
            .with_context(|| format!("no header/body separator in {response:?}"))?;
        let content_type = head
            .lines()
            .find_map(|l| {
                let (name, value) = l.split_once(':')?;
                name.eq_ignore_ascii_case("content-type")
                    .then(|| value.trim())
            })
            .with_context(|| format!("no content-type in {head:?}"))?;
        ensure!(
            content_type == OPENMETRICS,
            "content-type {content_type:?}, want {OPENMETRICS:?}"
        );
        Scrape::parse(body)
    }
}

/// Runs `curl -sS --fail ARGS…` in node `a` and returns its stdout. Retries (for up to 2 s)
/// while nothing listens yet (curl exit 7): the endpoint starts beside the admin socket.
fn curl(node: &Node, args: &[&str]) -> Result<String> {
    let deadline = Instant::now() + Duration::from_secs(2);
    loop {
        let mut cmd = Command::new("curl");
        cmd.args(["--silent", "--show-error", "--fail", "--max-time", "5"])
            .args(args);
        let out = node
            .run("scraper", cmd, Duration::from_secs(10))
            .context("running curl (Debian package `curl`)")?;
        if out.status.code() == Some(7) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
            continue;
        }
        return Ok(out.ok(&format!("curl {args:?}"))?.stdout);
    }
}

/// The samples of one OpenMetrics text exposition.
#[derive(Debug)]
struct Scrape {
    text: String,
    /// (sample name, labels) → value
    samples: BTreeMap<(String, BTreeMap<String, String>), f64>,
}

impl Scrape {
    /// Parses the samples; fails on a malformed line or a missing `# EOF`.
    fn parse(text: &str) -> Result<Self> {
        ensure!(
            text.trim_end().ends_with("# EOF"),
            "exposition does not end with # EOF:\n{text}"
        );
        let mut samples = BTreeMap::new();
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let bad = || format!("malformed sample line {line:?}");
            let (series, value) = line.rsplit_once(' ').with_context(bad)?;
            let value: f64 = value.parse().with_context(bad)?;
            let (name, labels) = match series.split_once('{') {
                Some((name, rest)) => (
                    name,
                    parse_labels(rest.strip_suffix('}').with_context(bad)?).with_context(bad)?,
                ),
                None => (series, BTreeMap::new()),
            };
            samples.insert((name.to_string(), labels), value);
        }
        Ok(Self {
            text: text.to_string(),
            samples,
        })
    }

    /// The value of the sample `name` with exactly `labels`.
    fn value(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        let key = (
            name.to_string(),
            labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        self.samples
            .get(&key)
            .copied()
            .with_context(|| format!("no sample {name}{labels:?} in:\n{}", self.text))
    }

    /// Every sample named `name`: its labels and value.
    fn series(&self, name: &str) -> Vec<(&BTreeMap<String, String>, f64)> {
        self.samples
            .iter()
            .filter(|((n, _), _)| n == name)
            .map(|((_, labels), v)| (labels, *v))
            .collect()
    }

    /// The distinct sample names.
    fn names(&self) -> BTreeSet<&str> {
        self.samples.keys().map(|(n, _)| n.as_str()).collect()
    }
}

/// `k="v",k2="v2"` → map; values may contain escaped `\"`, `\\` and `\n`.
fn parse_labels(text: &str) -> Result<BTreeMap<String, String>> {
    let mut labels = BTreeMap::new();
    let mut rest = text;
    while !rest.is_empty() {
        let (key, after) = rest.split_once("=\"").context("label without =\"")?;
        let mut value = String::new();
        let mut chars = after.char_indices();
        let end = loop {
            match chars.next() {
                Some((i, '"')) => break i,
                Some((_, '\\')) => match chars.next() {
                    Some((_, 'n')) => value.push('\n'),
                    Some((_, c)) => value.push(c),
                    None => bail!("dangling escape"),
                },
                Some((_, c)) => value.push(c),
                None => bail!("unterminated label value"),
            }
        };
        labels.insert(key.to_string(), value);
        rest = &after[end + 1..];
        rest = rest.strip_prefix(',').unwrap_or(rest);
    }
    Ok(labels)
}

/// Traffic through a VIP shows in a real scrape: per-backend connection counters that add up
/// to at least the connections made (and match what each backend served), the `forwarded`
/// decisions, map usage, uptime and build info; then a rejected config change counts as one
/// rejected reload. Anything but `GET /metrics` is 404.
#[test]
fn scrape_counts_traffic_and_rejected_reloads() {
    const N: u32 = 60;
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let s = Bed::new(
        "scrape_counts_traffic_and_rejected_reloads",
        &["b", "c"],
        vip,
    )
    .or_fail();

    let before = s.scrape().or_fail();
    let forwarded_before = before
        .value("mesh_kernel_forwarded_total", &[("path", "kernel")])
        .or_fail();
    let r = s.a.tcp_client("client", vip, N, T).or_fail();
    assert_eq!(r.ok(), u64::from(N), "{r:?}");

    let m = s.scrape().or_fail();
    let mut total = 0.0;
    for (name, addr) in s.backends.named() {
        let backend = addr.to_string();
        let counted = m
            .value(
                "mesh_backend_connections_total",
                &[("service", "web"), ("backend", &backend)],
            )
            .or_fail();
        let served = r.backends.get(name).copied().unwrap_or(0) as f64;
        assert!(
            counted >= served,
            "backend {name} ({backend}) served {served} connections but the metric says {counted}:\n{}",
            m.text
        );
        total += counted;
    }
    assert!(
        total >= f64::from(N),
        "mesh_backend_connections_total sums to {total} < {N}:\n{}",
        m.text
    );
    assert_eq!(
        m.series("mesh_backend_connections_total").len(),
        s.backends.len(),
        "one series per backend:\n{}",
        m.text
    );
    let forwarded = m
        .value("mesh_kernel_forwarded_total", &[("path", "kernel")])
        .or_fail();
    assert!(
        forwarded - forwarded_before >= f64::from(N),
        "forwarded grew by {} < {N}:\n{}",
        forwarded - forwarded_before,
        m.text
    );
    for reason in ["no_backend", "no_service_port", "mtls_no_agent"] {
        m.value("mesh_kernel_refused_total", &[("reason", reason)])
            .or_fail();
    }
    for kind in ["slot_missing", "map_update_failed", "event_dropped"] {
        m.value("mesh_kernel_errors_total", &[("kind", kind)])
            .or_fail();
    }
    m.value("mesh_kernel_passthrough_total", &[("kind", "not_a_vip")])
        .or_fail();
    m.value("mesh_kernel_reverse_lookups_total", &[]).or_fail();
    // No datagram went anywhere: a TCP service's backends count connections only.
    assert!(
        m.series("mesh_backend_datagrams_total").is_empty(),
        "{}",
        m.text
    );
    let services = [("map", "services"), ("pinned", "MESH_SVC_V1")];
    assert!(m.value("mesh_map_entries", &services).or_fail() >= 1.0);
    assert_eq!(m.value("mesh_map_capacity", &services).or_fail(), 65_536.0);
    let counted = [("map", "backend_counts"), ("pinned", "MESH_BECNT_V1")];
    assert_eq!(
        m.value("mesh_map_entries", &counted).or_fail(),
        s.backends.len() as f64,
        "every backend was counted at least once:\n{}",
        m.text
    );
    let capacities = m.series("mesh_map_capacity").len();
    assert_eq!(capacities, 12, "every pinned map:\n{}", m.text);
    assert!(m.value("process_resident_memory_bytes", &[]).or_fail() > 0.0);
    assert!(m.value("process_open_fds", &[]).or_fail() >= 3.0);
    assert!(
        m.value("mesh_kernel_apply_duration_seconds_count", &[])
            .or_fail()
            >= 1.0
    );
    assert!(m.value("mesh_agent_uptime_seconds", &[]).or_fail() > 0.0);
    let builds = m.series("mesh_build_info");
    assert!(
        builds.len() == 1
            && builds[0].1 == 1.0
            && builds[0].0.get("version").is_some_and(|v| !v.contains(' '))
            && builds[0].0.contains_key("commit"),
        "mesh_build_info: {builds:?}"
    );
    assert_eq!(
        m.value("mesh_config_reloads_total", &[("result", "rejected")])
            .or_fail(),
        0.0
    );

    // A bad backend address: the agent rejects the change and keeps the running config.
    let bad = Service::tcp("web", vip, &[]).backends(vec![Backend::new("10.1.0.300:8080")]);
    s.agent.write_config(&render("a", &[bad])).or_fail();
    let deadline = Instant::now() + APPLY;
    let rejected = loop {
        let m = s.scrape().or_fail();
        let rejected = m
            .value("mesh_config_reloads_total", &[("result", "rejected")])
            .or_fail();
        if rejected >= 1.0 {
            break m;
        }
        assert!(
            Instant::now() < deadline,
            "no rejected reload within {APPLY:?}:\n{}\n--- agent log ---\n{}",
            m.text,
            s.agent.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    };
    // One file replacement is one reload, also a little later.
    std::thread::sleep(Duration::from_millis(200));
    let m = s.scrape().or_fail();
    for scrape in [&rejected, &m] {
        assert_eq!(
            scrape
                .value("mesh_config_reloads_total", &[("result", "rejected")])
                .or_fail(),
            1.0,
            "{}",
            scrape.text
        );
        assert_eq!(
            scrape
                .value("mesh_config_reloads_total", &[("result", "applied")])
                .or_fail(),
            0.0,
            "{}",
            scrape.text
        );
    }
    assert_eq!(
        m.series("mesh_backend_connections_total").len(),
        s.backends.len(),
        "the rejected change must leave the backends in place:\n{}",
        m.text
    );

    // Anything else is 404 (asked without --fail, which would turn it into exit 22).
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--output",
        "/dev/null",
        "--write-out",
        "%{http_code}",
        "http://127.0.0.1:15020/",
    ]);
    let out = s.a.run("scraper", cmd, Duration::from_secs(10)).or_fail();
    assert_eq!(out.stdout.trim(), "404", "GET / answered {out:?}");
}

/// `GET /v1/applied`: the first line is the agent's latest write of the kernel maps (one
/// service, its two backends), a config change that adds a service shows up as a new line
/// with the new counts, stamped after the change, and a follower attaching late starts from
/// the state in force. Read by the harness's follower (the benches' reader), and once by curl
/// for the wire form: NDJSON, every field a JSON number.
#[test]
fn applied_stream_shows_each_write_of_the_maps() {
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let s = Bed::new(
        "applied_stream_shows_each_write_of_the_maps",
        &["b", "c"],
        vip,
    )
    .or_fail();
    let mut follower = s.agent.follow_applied();
    let first = follower.wait(UNIX_EPOCH, APPLY, |_| true).or_fail();
    assert_eq!((first.services, first.backends), (1, 2), "{first:?}");
    let now_ms = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .expect("clock")
        .as_millis() as u64;
    assert!(
        first.seq >= 1 && first.unix_ms <= now_ms && first.unix_ms + 60_000 > now_ms,
        "{first:?} (now {now_ms} ms)"
    );

    // The wire form, as any client sees it (the stream stays open: curl stops it).
    let mut cmd = Command::new("curl");
    cmd.args([
        "--silent",
        "--no-buffer",
        "--max-time",
        "1",
        "--unix-socket",
    ])
    .arg(s.agent.socket_path())
    .arg("http://mesh/v1/applied");
    let out = process::spawn("curl /v1/applied", cmd, None, None, Capture::Lines)
        .or_fail()
        .finish(Duration::from_secs(10))
        .or_fail();
    assert_eq!(
        out.status.code(),
        Some(28),
        "curl should time out on the open stream: {out:?}"
    );
    let line: Value = serde_json::from_str(out.stdout.lines().next().unwrap_or_default())
        .unwrap_or_else(|e| panic!("first line of {:?}: {e}", out.stdout));
    let fields: BTreeSet<&str> = line
        .as_object()
        .expect("an object")
        .keys()
        .map(String::as_str)
        .collect();
    assert_eq!(
        fields,
        BTreeSet::from(["seq", "unix_ms", "elapsed_us", "services", "backends"]),
        "{line}"
    );
    assert!(
        line.as_object()
            .expect("an object")
            .values()
            .all(Value::is_u64),
        "{line}"
    );
    assert!(line["seq"].as_u64() >= Some(first.seq), "{line}");

    let since = SystemTime::now();
    let addrs = s.backends.addrs();
    let web = Service::tcp("web", vip, &addrs);
    let api = Service::tcp("api", "10.96.0.11:80".parse().expect("vip"), &addrs[..1]);
    s.agent.write_config(&render("a", &[web, api])).or_fail();
    let changed = follower.wait(since, APPLY, |a| a.services == 2).or_fail();
    assert!(changed.seq > first.seq, "{first:?} then {changed:?}");
    assert_eq!(changed.backends, 3, "{changed:?}");

    let mut late = s.agent.follow_applied();
    let latest = late.wait(UNIX_EPOCH, APPLY, |_| true).or_fail();
    assert!(
        latest.seq >= changed.seq && latest.services == 2 && latest.backends == 3,
        "a late follower starts from the state in force: {latest:?}, after {changed:?}"
    );
}

/// The Grafana dashboard parses, provisions from the file (its data source is the
/// `datasource` variable with a default, no `__inputs` that only a UI import fills), has a
/// panel for each part of the mesh, and every metric every panel's queries use is exported by a
/// running agent with mTLS and gossip configured and a service that carried traffic.
#[test]
fn dashboard_uses_only_exported_metrics() {
    let path =
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../deploy/grafana/mesh-dashboard.json");
    let text = std::fs::read_to_string(&path)
        .with_context(|| format!("reading {}", path.display()))
        .or_fail();
    let dashboard: Value = serde_json::from_str(&text)
        .with_context(|| format!("parsing {}", path.display()))
        .or_fail();
    assert!(
        dashboard["schemaVersion"].as_u64().is_some_and(|v| v >= 36),
        "schemaVersion: {}",
        dashboard["schemaVersion"]
    );
    assert!(
        dashboard.get("__inputs").is_none() && !text.contains("${DS_"),
        "an import-only data source input: provisioning from the file would leave it unset"
    );
    let variables = dashboard["templating"]["list"]
        .as_array()
        .expect("template variables");
    let datasource = variables
        .iter()
        .find(|v| v["name"] == "datasource")
        .expect("a datasource variable");
    assert_eq!(datasource["type"], "datasource", "{datasource}");
    assert_eq!(datasource["query"], "prometheus", "{datasource}");
    assert!(
        datasource["current"]["value"]
            .as_str()
            .is_some_and(|v| !v.is_empty()),
        "the datasource variable has no default: {datasource}"
    );
    let mut titles = Vec::new();
    let mut sources = Vec::new();
    fn walk<'a>(panel: &'a Value, titles: &mut Vec<&'a str>, sources: &mut Vec<&'a Value>) {
        titles.extend(panel["title"].as_str());
        if panel["type"] != "row" {
            sources.push(&panel["datasource"]);
            for target in panel["targets"].as_array().into_iter().flatten() {
                sources.push(&target["datasource"]);
            }
        }
        for inner in panel["panels"].as_array().into_iter().flatten() {
            walk(inner, titles, sources);
        }
    }
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        walk(panel, &mut titles, &mut sources);
    }
    for source in &sources {
        assert_eq!(
            source["uid"], "${datasource}",
            "a panel or query without the variable"
        );
    }
    let queries = queries(&dashboard);
    assert!(queries.len() >= 30, "{} queries", queries.len());
    let used: BTreeSet<String> = queries.iter().flat_map(|q| metric_names(q)).collect();
    // A panel for every part of the mesh.
    for family in [
        "mesh_backend_connections_total",
        "mesh_backend_datagrams_total",
        "mesh_kernel_forwarded_total",
        "mesh_kernel_refused_total",
        "mesh_kernel_passthrough_total",
        "mesh_kernel_reverse_lookups_total",
        "mesh_kernel_errors_total",
        "mesh_map_entries",
        "mesh_map_capacity",
        "mesh_config_reloads_total",
        "mesh_kernel_apply_duration_seconds_bucket",
        "mesh_agent_uptime_seconds",
        "mesh_build_info",
        "mesh_backend_healthy",
        "mesh_service_panic",
        "mesh_health_checks_total",
        "mesh_gossip_members",
        "mesh_gossip_auth_failures_total",
        "mesh_mtls_flows_total",
        "mesh_mtls_handshakes_total",
        "mesh_mtls_flow_duration_seconds_bucket",
        "mesh_mtls_cert_expiry_seconds",
        "mesh_mtls_cert_reloads_total",
        "mesh_catalog_conflicts",
        "process_resident_memory_bytes",
    ] {
        assert!(used.contains(family), "the dashboard shows no {family}");
    }

    // One agent with [mtls] (its own certificate) and [gossip] (seeded by itself); `pay` is a
    // strict service with its backend on the agent's own node, so its flows go through the
    // tunnel (to this agent's inbound listener) and every mTLS family gets samples.
    let bed = TestBed::new("dashboard_uses_only_exported_metrics").or_fail();
    let a = bed.add_node("a").or_fail();
    let backends = Backends::start(&bed, &["b"], Protocol::Tcp, false, BACKEND_PORT).or_fail();
    let vip: SocketAddr = "10.96.0.10:80".parse().expect("vip");
    let web = Service::tcp("web", vip, &backends.addrs());
    let pay_vip: SocketAddr = "10.96.0.20:443".parse().expect("vip");
    let pay_backend = SocketAddr::new(a.ipv4().into(), 9443);
    let pay_server = a.tcp_server("server", pay_backend, "pay").or_fail();
    let pay = Service::tcp("pay", pay_vip, &[pay_backend]).with("mtls = \"strict\"");
    let ca = mesh_tests::mtls::Ca::init(&bed, "ca").or_fail();
    let node_cert = ca
        .issue(
            &bed,
            &format!("spiffe://{}/ns/mesh/sa/a", mesh_tests::mtls::TRUST_DOMAIN),
            "node-a",
        )
        .or_fail();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let config = mesh_tests::mtls::config(
        &a,
        &[web, pay],
        &mesh_tests::mtls::MtlsTable {
            ca_bundle: &ca.cert,
            node_cert: &node_cert,
            workloads: &[],
            options: "",
        },
        "",
    )
    .or_fail()
        + &mesh_tests::config::gossip_table(a.ipv4().into(), &[a.ipv4().into()], &key, &[]);
    let agent = a.start_agent(&config).or_fail();
    agent
        .wait_status(APPLY, |st| Agent::backends_in(st, "web").len() == 1)
        .or_fail();
    let r = a.tcp_client("client", vip, 5, T).or_fail();
    assert_eq!(r.ok(), 5, "{r:?}");
    let tunneled = a.tcp_client("client", pay_vip, 3, T).or_fail();
    assert_eq!(tunneled.backends.get("pay"), Some(&3), "{tunneled:?}");
    drop(pay_server);
    let s = Bed {
        agent,
        backends,
        a,
        _bed: bed,
    };
    let m = s.scrape().or_fail();
    // A family is exported when the scrape declares it (`# TYPE`, with the `_total` of a
    // counter), even before its first labelled sample, or has a sample of that name.
    let mut exported: BTreeSet<String> = m.names().iter().map(|n| n.to_string()).collect();
    for line in m.text.lines() {
        if let Some((name, kind)) = line
            .strip_prefix("# TYPE ")
            .and_then(|rest| rest.split_once(' '))
        {
            exported.insert(name.to_string());
            if kind == "counter" {
                exported.insert(format!("{name}_total"));
            }
        }
    }
    let missing: Vec<&String> = used.iter().filter(|n| !exported.contains(*n)).collect();
    assert!(
        missing.is_empty(),
        "the dashboard queries {missing:?}, which the agent does not export:\n{}",
        m.text
    );
    for family in [
        "mesh_mtls_cert_expiry_seconds",
        "mesh_gossip_members",
        "mesh_mtls_streams_active",
        "mesh_mtls_flows_total",
        "mesh_mtls_handshakes_total",
        "mesh_mtls_flow_duration_seconds_bucket",
        "mesh_kernel_forwarded_total",
        "mesh_backend_connections_total",
    ] {
        assert!(
            !m.series(family).is_empty(),
            "{family} has no sample with mTLS and gossip configured:\n{}",
            m.text
        );
    }
    assert!(titles.len() >= 30, "{titles:?}");
}

/// Every PromQL text of the dashboard: panel (and nested row panel) target expressions and
/// template variable queries.
fn queries(dashboard: &Value) -> Vec<String> {
    fn panel_queries(panel: &Value, out: &mut Vec<String>) {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(expr) = target["expr"].as_str() {
                out.push(expr.to_string());
            }
        }
        for inner in panel["panels"].as_array().into_iter().flatten() {
            panel_queries(inner, out);
        }
    }
    let mut out = Vec::new();
    for panel in dashboard["panels"].as_array().into_iter().flatten() {
        panel_queries(panel, &mut out);
    }
    for var in dashboard["templating"]["list"]
        .as_array()
        .into_iter()
        .flatten()
    {
        for q in [&var["definition"], &var["query"], &var["query"]["query"]] {
            if let Some(q) = q.as_str() {
                out.push(q.to_string());
            }
        }
    }
    out
}

/// The `mesh_[a-z_]+` and `process_[a-z_]+` tokens of a query.
fn metric_names(query: &str) -> Vec<String> {
    let bytes = query.as_bytes();
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let mut names = Vec::new();
    for prefix in ["mesh_", "process_"] {
        let mut i = 0;
        while let Some(at) = query[i..].find(prefix).map(|p| p + i) {
            let mut end = at + prefix.len();
            while end < bytes.len() && (bytes[end].is_ascii_lowercase() || bytes[end] == b'_') {
                end += 1;
            }
            if at == 0 || !word(bytes[at - 1]) {
                names.push(query[at..end].to_string());
            }
            i = end;
        }
    }
    names
}

#[test]
fn metric_names_are_the_mesh_tokens() {
    assert_eq!(
        metric_names(r#"sum(rate(mesh_a_total{x="mesh_b"}[5m])) / xmesh_c + mesh_d + process_e"#),
        ["mesh_a_total", "mesh_b", "mesh_d", "process_e"]
    );
    let labels = parse_labels(r#"service="web",backend="[fd00:1::3]:8080",q="a\"b""#).unwrap();
    assert_eq!(labels["backend"], "[fd00:1::3]:8080");
    assert_eq!(labels["q"], "a\"b");
}

/// `(status code, body)` of `GET path` on the node's metrics port, polled until `want` holds
/// (every 50 ms, at most 10 s); the last answer either way.
fn probe_until(node: &Node, path: &str, want: impl Fn(u16) -> bool) -> (u16, String) {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let answer = mesh_tests::metrics::get(node, path).or_fail();
        let status: u16 = answer
            .split_whitespace()
            .nth(1)
            .and_then(|code| code.parse().ok())
            .unwrap_or(0);
        let body = answer
            .split_once("\r\n\r\n")
            .map(|(_, body)| body.to_owned())
            .unwrap_or_default();
        if want(status) || Instant::now() >= deadline {
            return (status, body);
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[test]
fn probes_flip_as_the_agent_starts_restarts_and_hears_the_mesh() {
    let bed = TestBed::new("probes_flip_as_the_agent_starts").or_fail();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-test-mesh-key-of-32-bytes-long\n").or_fail();
    let a = bed.add_node("a").or_fail();
    let b = bed.add_node("b").or_fail();
    let config = |node: &Node, seed: &Node| {
        render(node.name(), &[])
            + &mesh_tests::config::gossip_table(
                node.ipv4().into(),
                &[seed.ipv4().into()],
                &key,
                &["interval = \"100ms\"".to_owned()],
            )
    };
    // a's only seed, b, is not running: a is alive, and not ready until it hears the mesh.
    let mut agent_a = a.start_agent(&config(&a, &b)).or_fail();
    assert_eq!(
        probe_until(&a, "/healthz", |s| s == 200),
        (200, "ok\n".into())
    );
    let (status, body) = probe_until(&a, "/ready", |s| s == 503);
    assert_eq!(status, 503, "{body}");
    assert!(body.contains("waiting for gossip"), "{body}");
    // A second look a while later: still waiting, nothing flips on its own.
    std::thread::sleep(Duration::from_millis(500));
    assert_eq!(probe_until(&a, "/ready", |s| s == 503).0, 503);

    let _agent_b = b.start_agent(&config(&b, &a)).or_fail();
    assert_eq!(
        probe_until(&a, "/ready", |s| s == 200),
        (200, "ready\n".into())
    );

    // Restarted, a adopts its pins and is ready again once it hears b.
    agent_a.restart().or_fail();
    assert_eq!(
        probe_until(&a, "/ready", |s| s == 200),
        (200, "ready\n".into())
    );
    assert_eq!(probe_until(&a, "/healthz", |s| s == 200).0, 200);
    assert_eq!(probe_until(&a, "/nothing", |s| s == 404).0, 404);
}
