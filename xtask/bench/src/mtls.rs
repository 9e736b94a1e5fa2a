//! The `mtls` benchmark suite: the strict mTLS path (kernel redirect → local agent → TLS 1.3 +
//! HTTP/2 CONNECT tunnel → peer agent → backend) side by side with plain TCP and with a stunnel
//! hop using the same cipher suite, in one test bed, as absolute numbers and ratios to `plain`;
//! then the agents' memory idle and with 10,000 proxied flows.
//!
//! One bed, one bridge. Node `server` runs every backend; every path has its own client node:
//!
//! | path | client node | how the client reaches the server |
//! | --- | --- | --- |
//! | `plain` | `plain` | straight to nginx / iperf3 on the server's plain ports, nothing installed |
//! | `mesh mTLS` | `mesh` | the strict services' VIPs; the agents on `mesh` and `server` tunnel them (ring, `TLS_AES_256_GCM_SHA384`, rustls' first choice) |
//! | `stunnel` | `stunnel` | a stunnel client on `127.0.0.1` → stunnel server on `server` → the plain ports (TLS 1.3, only `TLS_AES_256_GCM_SHA384`, both sides verifying, certificates from the same CA) |
//!
//! Backends on `server`: nginx (`ok\n`) on 8080 (strict, only through the tunnel) and 8081
//! (plain), iperf3 on 5201 (strict) and 5202 (plain), and the echo server `mesh-workload
//! tcp-server` on 7000 (strict) for the flows. The strict ports cannot be reached in plaintext
//! (the server's kernel drops SYNs that do not come from its agent), which is why the plain
//! paths have their own.
//!
//! Loads per path: new connections (wrk, 2 threads, 32 connections, `Connection: close`),
//! request/response on one keep-alive connection (wrk, 1 thread, 1 connection) and single-stream
//! bulk throughput (iperf3 `-P 1`, the receiver's rate). Rounds, warm-up, medians and the
//! re-measuring of runs disturbed by other processes work as in the `lb` suite. On the mesh
//! path the agent's `mtls_redirected` counter must grow by at least the connections made.
//!
//! Memory: the resident set (`VmRSS`) of both agents right after start (idle), then while a
//! client on `mesh` holds `--flows` (default 10,000) connections open through the tunnel, each
//! having echoed a line (the client agent's `mesh_mtls_streams_active` must reach that number),
//! then after they closed, with the agents' open
//! descriptors (a leak would show there).
//!
//! The bench fails on errors (a tool failing, traffic not working, counters that disagree, a
//! flow that did not echo), never on a ratio; the design targets are printed with the measured
//! values. Everything it starts is a child killed on the way out; the bed's drop removes the
//! rest. On failure the configs and logs are kept (see [`crate::in_bed`]).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::cgroup::Cgroup;
use mesh_tests::config::Service;
use mesh_tests::mtls::{self, Ca, MtlsTable, TRUST_DOMAIN};
use mesh_tests::{metrics, Agent, Node, TestBed};

use crate::cpu::{Disturbance, Meter};
use crate::roles::{Role, Roles};
use crate::servers::{Iperf3Server, Nginx, Stunnel, TlsFiles};
use crate::stats::{median, ratio, spread, target_line};
use crate::wrk::{self, Load, Report};
use crate::Artifacts;
use crate::{check_interrupted, client_node, iperf, procstat, wait_services, Tools};

/// Options of `cargo xtask bench mtls`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Seconds of each measured wrk or iperf3 run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration_secs: u64,
    /// Rounds over all paths; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Seconds of the unmeasured warm-up of each path and load in the first round (0: none).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub warmup_secs: u64,
    /// Concurrent flows held open through the tunnel for the memory measurement (0: skip).
    #[arg(long, default_value_t = 10_000, value_parser = clap::value_parser!(u32).range(0..=15_000))]
    pub flows: u32,
    /// Measure a run again when other processes took more than this percentage of the CPUs
    /// during it (the machine may be shared; the least disturbed attempt is kept).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_others_pct: u32,
    /// How many times a disturbed run may be measured again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,
}

/// Strict services: name, VIP, backend port on `server`.
const WEB: (&str, SocketAddrV4, u16) = ("web", vip(20, 80), 8080);
const BULK: (&str, SocketAddrV4, u16) = ("bulk", vip(21, 5201), 5201);
const FLOWS: (&str, SocketAddrV4, u16) = ("flows", vip(22, 7000), 7000);
/// The plain (non-mesh) ports of nginx and iperf3 on `server`.
const PLAIN_HTTP_PORT: u16 = 8081;
const PLAIN_BULK_PORT: u16 = 5202;
/// The stunnel server ends on `server` (→ the plain ports) and client ends on `stunnel`.
const STUNNEL_HTTP_PORT: u16 = 8443;
const STUNNEL_BULK_PORT: u16 = 8444;
const STUNNEL_HTTP_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18080);
const STUNNEL_BULK_LOCAL: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 15201);
/// How long an agent may take to apply its config.
const APPLY_TIMEOUT: Duration = Duration::from_secs(30);
/// How long the flows stay open once all are (long enough to read the memory).
const FLOWS_HOLD: Duration = Duration::from_secs(5);

const fn vip(last: u8, port: u16) -> SocketAddrV4 {
    SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, last), port)
}

/// The paths, in the order of the table.
const PLAIN: &str = "plain";
const MESH: &str = "mesh mTLS";
const STUNNEL: &str = "stunnel";

/// The roles whose CPU is reported: the client node's workloads (wrk, iperf3, and on the
/// stunnel path its client end), each agent, the server node's workloads (nginx, iperf3, and
/// on the stunnel path its server end).
const ROLE_CLIENT: &str = "client node";
const ROLE_CLIENT_AGENT: &str = "client agent";
const ROLE_SERVER_AGENT: &str = "server agent";
const ROLE_BACKEND: &str = "backend";

/// One way from a client to the backends.
struct Path<'a> {
    name: &'static str,
    client: Node,
    /// nginx (wrk's target) and iperf3 (iperf3's target) as this path reaches them.
    http: SocketAddr,
    bulk: SocketAddr,
    /// The agent whose `mtls_redirected` counter must grow with the connections made.
    redirects: Option<&'a Agent>,
    /// The cgroups whose CPU time is reported per unit of work.
    roles: Roles,
}

/// The measurements of every round of one path.
#[derive(Debug, Clone, Default)]
struct Samples {
    conn: Vec<Report>,
    rr: Vec<Report>,
    bulk_bps: Vec<f64>,
    /// Growth of the `mtls_redirected` counter over the measured wrk runs, and the
    /// connections wrk made in them.
    redirected: u64,
    connections: u64,
    /// The share of the CPUs others used during each measured run.
    others: Vec<f64>,
    /// Per measured run, each role's CPU per unit of work: µs per new connection, µs per
    /// request on one connection, ms per GB received by iperf3.
    cpu_conn: Vec<Vec<f64>>,
    cpu_rr: Vec<Vec<f64>>,
    cpu_bulk: Vec<Vec<f64>>,
    /// The roles of those values, in order.
    roles: Vec<&'static str>,
}

/// Runs the suite and prints its results.
pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    Tools::require(&["wrk", "nginx", "iperf3", "stunnel"])?;
    crate::in_bed("mtls", |bed| scenario(bed, artifacts, args))
}

/// The agents of the mesh path.
struct Agents {
    client: Agent,
    server: Agent,
}

fn scenario(bed: &TestBed, artifacts: &Artifacts, args: &Args) -> Result<()> {
    let server = bed.add_node("server")?;
    let at = |port| SocketAddr::new(server.ipv4().into(), port);
    let dir = |name: &str| bed.tmpdir().join(name);
    let _nginx = Nginx::start(&server, &dir("nginx-mesh"), at(WEB.2), 1)?;
    let nginx_plain = Nginx::start(&server, &dir("nginx-plain"), at(PLAIN_HTTP_PORT), 1)?;
    let _iperf = Iperf3Server::start(&server, &dir("iperf3-mesh"), at(BULK.2))?;
    let iperf_plain = Iperf3Server::start(&server, &dir("iperf3-plain"), at(PLAIN_BULK_PORT))?;
    let _echo = server.tcp_server("echo", at(FLOWS.2), "echo")?;

    let ca = Ca::init(bed, "ca")?;
    let issue = |who: &str| {
        ca.issue(
            bed,
            &format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{who}"),
            who,
        )
    };
    let services: Vec<Service> = [WEB, BULK, FLOWS]
        .iter()
        .map(|(name, vip, port)| {
            Service::tcp(name, SocketAddr::V4(*vip), &[at(*port)]).with("mtls = \"strict\"")
        })
        .collect();
    let agent_config = |node: &Node, who: &str| -> Result<String> {
        let table = MtlsTable {
            ca_bundle: &ca.cert,
            node_cert: &issue(who)?,
            workloads: &[],
            options: "",
        };
        mtls::config(node, &services, &table, "")
    };
    let mesh = client_node(bed, "mesh")?;
    // Each agent in a cgroup of its own, outside its node's subtree (the hooks do not see it,
    // as with `Agent::start_with`), so that its `cpu.stat` counts the agent alone.
    let agent_cgroup_path = |node: &str| bed.cgroup_root().join(format!("agent-{node}"));
    let agent_cgroup = |node: &str| Cgroup::create(agent_cgroup_path(node));
    let agents = Agents {
        server: Agent::start_in_cgroup(
            &server,
            artifacts.agent.clone(),
            agent_cgroup("server")?,
            &agent_config(&server, "server")?,
        )?,
        client: Agent::start_in_cgroup(
            &mesh,
            artifacts.agent.clone(),
            agent_cgroup("mesh")?,
            &agent_config(&mesh, "client")?,
        )?,
    };
    for agent in [&agents.server, &agents.client] {
        wait_services(agent, services.len(), WEB.0, APPLY_TIMEOUT)?;
    }
    let idle = Memory::read(&agents)?;

    let tls = |who: &str| -> Result<TlsFiles> {
        let issued = issue(who)?;
        Ok(TlsFiles {
            cert: issued.cert,
            key: issued.key,
            ca: ca.cert.clone(),
        })
    };
    let stunnel_node = client_node(bed, "stunnel")?;
    let server_tls = tls("stunnel-server")?;
    let client_tls = tls("stunnel-client")?;
    let stunnels = [
        (STUNNEL_HTTP_PORT, PLAIN_HTTP_PORT, STUNNEL_HTTP_LOCAL),
        (STUNNEL_BULK_PORT, PLAIN_BULK_PORT, STUNNEL_BULK_LOCAL),
    ]
    .iter()
    .map(|&(tls_port, plain_port, local)| -> Result<[Stunnel; 2]> {
        let name = format!("stunnel-{tls_port}");
        Ok([
            Stunnel::start(
                &server,
                &dir(&format!("{name}-server")),
                false,
                at(tls_port),
                at(plain_port),
                &server_tls,
            )?,
            Stunnel::start(
                &stunnel_node,
                &dir(&format!("{name}-client")),
                true,
                SocketAddr::V4(local),
                at(tls_port),
                &client_tls,
            )?,
        ])
    })
    .collect::<Result<Vec<_>>>()?;

    let plain = client_node(bed, "plain")?;
    let role = |name, cgroup: &std::path::Path| Role {
        name,
        cgroup: cgroup.to_path_buf(),
    };
    let node_roles = |client: &Node| {
        Roles(vec![
            role(ROLE_CLIENT, client.cgroup().path()),
            role(ROLE_BACKEND, server.cgroup().path()),
        ])
    };
    let mesh_roles = Roles(vec![
        role(ROLE_CLIENT, mesh.cgroup().path()),
        role(ROLE_CLIENT_AGENT, &agent_cgroup_path("mesh")),
        role(ROLE_SERVER_AGENT, &agent_cgroup_path("server")),
        role(ROLE_BACKEND, server.cgroup().path()),
    ]);
    let paths = [
        Path {
            name: PLAIN,
            roles: node_roles(&plain),
            client: plain,
            http: nginx_plain.addr,
            bulk: iperf_plain.addr,
            redirects: None,
        },
        Path {
            name: MESH,
            client: mesh.clone(),
            http: SocketAddr::V4(WEB.1),
            bulk: SocketAddr::V4(BULK.1),
            redirects: Some(&agents.client),
            roles: mesh_roles,
        },
        Path {
            name: STUNNEL,
            roles: node_roles(&stunnel_node),
            client: stunnel_node,
            http: stunnels[0][1].addr,
            bulk: stunnels[1][1].addr,
            redirects: None,
        },
    ];
    let duration = Duration::from_secs(args.duration_secs);
    let bench = Bench {
        conn: Load::new_connections(duration),
        rr: Load::request_response(duration),
        bulk: duration,
        warmup: Duration::from_secs(args.warmup_secs),
        cgroup: bed.cgroup_root().to_path_buf(),
        disturbance: Disturbance {
            max_others: f64::from(args.max_others_pct) / 100.0,
            retries: args.retries,
        },
    };
    eprintln!(
        "bench mtls: {} rounds over {} paths, 3 loads of {}s each",
        args.rounds,
        paths.len(),
        args.duration_secs
    );
    let samples = bench.rounds(&paths, args.rounds)?;
    let flows = if args.flows > 0 {
        Some(hold_flows(&mesh, &agents, args.flows)?)
    } else {
        None
    };
    print!(
        "{}{}{}",
        render_results(&summarize(&samples), args),
        render_cpu(&samples),
        render_memory(&idle, flows.as_ref(), args.flows)
    );
    Ok(())
}

/// Both agents' resident memory and open descriptors at one moment.
#[derive(Debug, Clone, Copy, PartialEq)]
struct Memory {
    client_rss: u64,
    server_rss: u64,
    client_fds: usize,
    server_fds: usize,
}

impl Memory {
    fn read(agents: &Agents) -> Result<Self> {
        let pid = |a: &Agent| a.pid().context("an agent is not running");
        let (c, s) = (pid(&agents.client)?, pid(&agents.server)?);
        Ok(Self {
            client_rss: procstat::rss_bytes(c)?,
            server_rss: procstat::rss_bytes(s)?,
            client_fds: procstat::open_fds(c)?,
            server_fds: procstat::open_fds(s)?,
        })
    }
}

/// The memory while the flows were open and after they closed.
struct FlowsMemory {
    open: Memory,
    closed: Memory,
    /// How long opening all flows (and one echo each) took.
    opening: Duration,
    /// `mesh_mtls_pooled_connections` on the client while they were open.
    pooled: f64,
}

/// Opens `count` flows from `mesh` through the tunnel to the echo server, reads both agents'
/// memory while they are open, then checks every flow echoed and reads it again once closed.
fn hold_flows(mesh: &Node, agents: &Agents, count: u32) -> Result<FlowsMemory> {
    check_interrupted()?;
    let started = Instant::now();
    let flows = mesh.tcp_many(
        "flows",
        SocketAddr::V4(FLOWS.1),
        count,
        Duration::from_secs(5),
        FLOWS_HOLD,
    )?;
    // All are open and have echoed a line each.
    let opening = started.elapsed();
    metrics::wait_at_least(
        mesh,
        "mesh_mtls_streams_active{side=\"all\"}",
        f64::from(count),
        Duration::from_secs(10),
    )?;
    let pooled = metrics::value(
        &metrics::scrape(mesh)?,
        "mesh_mtls_pooled_connections{side=\"outbound\"}",
    )
    .unwrap_or(0.0);
    let open = Memory::read(agents)?;
    let report = flows.finish()?;
    ensure!(
        report.echoed == u64::from(count) && report.errors.is_empty(),
        "of {count} flows through the tunnel {} echoed; errors: {:?}",
        report.echoed,
        report.errors
    );
    let closed = settle_fds(agents, &open)?;
    Ok(FlowsMemory {
        open,
        closed,
        opening,
        pooled,
    })
}

/// Waits (up to 10 s) for the agents' descriptors to drop from the open-flows level; returns
/// the memory then.
fn settle_fds(agents: &Agents, open: &Memory) -> Result<Memory> {
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let now = Memory::read(agents)?;
        let settled =
            now.client_fds < open.client_fds / 10 && now.server_fds < open.server_fds / 10;
        if settled || Instant::now() >= deadline {
            return Ok(now);
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

/// The loads, the warm-up, and when to measure again.
struct Bench {
    conn: Load,
    rr: Load,
    bulk: Duration,
    warmup: Duration,
    /// The bed's cgroup, holding every process of the runs (for [`Meter`]).
    cgroup: std::path::PathBuf,
    disturbance: Disturbance,
}

impl Bench {
    /// `rounds` rounds over `paths`, each round starting one path further; the first round
    /// warms each path and load up.
    fn rounds(&self, paths: &[Path], rounds: u32) -> Result<BTreeMap<&'static str, Samples>> {
        let mut samples: BTreeMap<&str, Samples> = BTreeMap::new();
        for round in 0..rounds as usize {
            for i in 0..paths.len() {
                let p = &paths[(i + round) % paths.len()];
                let s = samples.entry(p.name).or_default();
                s.roles = p.roles.names().collect();
                if round == 0 && !self.warmup.is_zero() {
                    for load in [&self.conn, &self.rr] {
                        wrk::run(&p.client, &load.with_duration(self.warmup), p.http)
                            .with_context(|| format!("{}: warm-up", p.name))?;
                    }
                    self.iperf(p, self.warmup)
                        .with_context(|| format!("{}: warm-up", p.name))?;
                }
                for load in [&self.conn, &self.rr] {
                    let label = format!("{} ({})", p.name, load.describe());
                    let ((report, cpu), others) =
                        self.disturbance.least_disturbed(&label, || {
                            let ((report, redirected, others), cpu) =
                                p.roles.measure(|| self.wrk(p, load))?;
                            s.redirected += redirected;
                            s.connections += connections(&report, load);
                            Ok(((report, cpu), others))
                        })?;
                    s.others.push(others);
                    // µs per connection (new connections) or per request (one connection).
                    let units = report.requests.max(1) as f64;
                    let per_unit = cpu.iter().map(|c| c * 1e6 / units).collect();
                    if load.close {
                        s.conn.push(report);
                        s.cpu_conn.push(per_unit);
                    } else {
                        s.rr.push(report);
                        s.cpu_rr.push(per_unit);
                    }
                }
                let label = format!("{} (iperf3)", p.name);
                let ((bps, cpu), others) = self.disturbance.least_disturbed(&label, || {
                    let meter = Meter::start(&self.cgroup)?;
                    let (bps, cpu) = p.roles.measure(|| self.iperf(p, self.bulk))?;
                    Ok(((bps, cpu), meter.others_share()?))
                })?;
                s.others.push(others);
                s.bulk_bps.push(bps);
                // ms per GB received.
                let gb = (bps * self.bulk.as_secs_f64() / 8.0 / 1e9).max(1e-9);
                s.cpu_bulk.push(cpu.iter().map(|c| c * 1e3 / gb).collect());
                eprintln!(
                    "bench mtls: round {}/{rounds} {:<10} {:>8.0} conn/s {:>8.0} rr/s  p99 {:.3} ms \
                     {:>6.2} Gbit/s",
                    round + 1,
                    p.name,
                    s.conn[round].requests_per_s,
                    s.rr[round].requests_per_s,
                    s.rr[round].latency_p99_s * 1e3,
                    bps / 1e9
                );
            }
        }
        Ok(samples)
    }

    /// One wrk run on `path`: its report, the growth of the path's redirect counter, and the
    /// others' CPU share during it; fails when the counter grew less than the connections.
    fn wrk(&self, path: &Path, load: &Load) -> Result<(Report, u64, f64)> {
        let before = path.redirects.map(redirected).transpose()?;
        let meter = Meter::start(&self.cgroup)?;
        let report = wrk::run(&path.client, load, path.http).context(path.name)?;
        let others = meter.others_share()?;
        let grew = match (path.redirects, before) {
            (Some(agent), Some(before)) => redirected(agent)?.saturating_sub(before),
            _ => 0,
        };
        let made = connections(&report, load);
        ensure!(
            path.redirects.is_none() || grew >= made,
            "{}: the agent's `mtls_redirected` counter grew by {grew}, but wrk made at least \
             {made} connections: the kernel did not send them through the tunnel",
            path.name
        );
        Ok((report, grew, others))
    }

    /// One iperf3 run of `duration` on `path`: the receiver's bits per second.
    fn iperf(&self, path: &Path, duration: Duration) -> Result<f64> {
        check_interrupted()?;
        let proc = path
            .client
            .spawn("iperf3", iperf::command(path.bulk, duration))?;
        let out = proc.finish(iperf::bound(duration))?;
        iperf::parse_receiver_bps(&out.stdout)
            .with_context(|| format!("{}: iperf3 to {}\n{}", path.name, path.bulk, out.stderr))
    }
}

fn redirected(agent: &Agent) -> Result<u64> {
    agent.counter("mtls_redirected")
}

/// Connections wrk made: one per request with `Connection: close`, else one per connection.
fn connections(report: &Report, load: &Load) -> u64 {
    if load.close {
        report.requests
    } else {
        u64::from(load.connections)
    }
}

/// The medians of one path.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    path: &'static str,
    conn_per_s: f64,
    conn_spread: f64,
    rr_per_s: f64,
    rr_spread: f64,
    rr_p99_s: f64,
    bulk_bps: f64,
    bulk_spread: f64,
}

/// Medians per path, in the table's order.
fn summarize(samples: &BTreeMap<&str, Samples>) -> Vec<Summary> {
    [PLAIN, MESH, STUNNEL]
        .iter()
        .filter_map(|&path| {
            let s = samples.get(path)?;
            let conn: Vec<f64> = s.conn.iter().map(|r| r.requests_per_s).collect();
            let rr: Vec<f64> = s.rr.iter().map(|r| r.requests_per_s).collect();
            let p99: Vec<f64> = s.rr.iter().map(|r| r.latency_p99_s).collect();
            Some(Summary {
                path,
                conn_per_s: median(&conn)?,
                conn_spread: spread(&conn)?,
                rr_per_s: median(&rr)?,
                rr_spread: spread(&rr)?,
                rr_p99_s: median(&p99)?,
                bulk_bps: median(&s.bulk_bps)?,
                bulk_spread: spread(&s.bulk_bps)?,
            })
        })
        .collect()
}

/// The results table and the design-target lines.
fn render_results(rows: &[Summary], args: &Args) -> String {
    let mut out = String::new();
    let find = |p: &str| rows.iter().find(|r| r.path == p);
    let Some(plain) = find(PLAIN) else {
        return "no plain run: nothing to compare\n".into();
    };
    let _ = writeln!(
        out,
        "\nmtls: median of {} rounds of {}s runs; conn = wrk -t2 -c32 'Connection: close' (new \
         TCP connections/s), rr = wrk -t1 -c1 keep-alive (its p99 latency), bulk = iperf3 one \
         stream (receiver); spread = (max - min) / median",
        args.rounds, args.duration_secs
    );
    let _ = writeln!(
        out,
        "{:<10} {:>8} {:>6} {:>7} {:>8} {:>6} {:>7} {:>7} {:>7} {:>6} {:>7}",
        "path",
        "conn/s",
        "ratio",
        "spread",
        "rr/s",
        "ratio",
        "spread",
        "p99 ms",
        "Gbit/s",
        "ratio",
        "spread"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<10} {:>8.0} {:>6.2} {:>6.0}% {:>8.0} {:>6.2} {:>6.0}% {:>7.3} {:>7.2} {:>6.2} {:>6.0}%",
            r.path,
            r.conn_per_s,
            ratio(r.conn_per_s, plain.conn_per_s),
            r.conn_spread * 100.0,
            r.rr_per_s,
            ratio(r.rr_per_s, plain.rr_per_s),
            r.rr_spread * 100.0,
            r.rr_p99_s * 1e3,
            r.bulk_bps / 1e9,
            ratio(r.bulk_bps, plain.bulk_bps),
            r.bulk_spread * 100.0,
        );
    }
    let _ = writeln!(out, "design targets (measured, not asserted):");
    let mesh = find(MESH);
    let stunnel = find(STUNNEL);
    let mut target = |what: &str, measured: Option<f64>, min: f64| {
        out.push_str(&target_line(what, measured, min));
    };
    target(
        "mesh mTLS bulk vs plain",
        mesh.map(|m| ratio(m.bulk_bps, plain.bulk_bps)),
        0.55,
    );
    target(
        "mesh mTLS bulk vs stunnel (same cipher)",
        mesh.zip(stunnel)
            .map(|(m, s)| ratio(m.bulk_bps, s.bulk_bps)),
        2.0,
    );
    target(
        "mesh mTLS conn/s vs plain",
        mesh.map(|m| ratio(m.conn_per_s, plain.conn_per_s)),
        0.6,
    );
    target(
        "mesh mTLS rr/s vs plain",
        mesh.map(|m| ratio(m.rr_per_s, plain.rr_per_s)),
        0.7,
    );
    out
}

/// The median over runs of each role's value.
fn role_medians(runs: &[Vec<f64>], roles: usize) -> Vec<Option<f64>> {
    (0..roles)
        .map(|i| {
            median(
                &runs
                    .iter()
                    .filter_map(|r| r.get(i).copied())
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// CPU per unit of work per path and role, and the target on both agents' CPU per GB.
fn render_cpu(samples: &BTreeMap<&str, Samples>) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "CPU per unit of work (each role's cgroup cpu.stat usage_usec, median of the rounds): \
         us per new connection (conn), us per request on one connection (rr), CPU-ms per GB \
         received by iperf3 (bulk)"
    );
    let _ = writeln!(
        out,
        "{:<10} {:<13} {:>9} {:>9} {:>9}",
        "path", "role", "us/conn", "us/req", "ms/GB"
    );
    let cell = |v: Option<f64>| v.map_or_else(|| "-".to_string(), |v| format!("{v:.1}"));
    let mut agents_per_gb = None;
    for path in [PLAIN, MESH, STUNNEL] {
        let Some(s) = samples.get(path) else { continue };
        let n = s.roles.len();
        let (conn, rr, bulk) = (
            role_medians(&s.cpu_conn, n),
            role_medians(&s.cpu_rr, n),
            role_medians(&s.cpu_bulk, n),
        );
        for (i, role) in s.roles.iter().enumerate() {
            let _ = writeln!(
                out,
                "{path:<10} {role:<13} {:>9} {:>9} {:>9}",
                cell(conn[i]),
                cell(rr[i]),
                cell(bulk[i])
            );
        }
        if path == MESH {
            // Summed per run, then the median: both agents together on the same bytes.
            let per_run: Vec<f64> = s
                .cpu_bulk
                .iter()
                .map(|run| {
                    s.roles
                        .iter()
                        .zip(run)
                        .filter(|(r, _)| [ROLE_CLIENT_AGENT, ROLE_SERVER_AGENT].contains(r))
                        .map(|(_, v)| v)
                        .sum()
                })
                .collect();
            agents_per_gb = median(&per_run);
        }
    }
    if let Some(v) = agents_per_gb {
        let verdict = if v <= 1000.0 { "met" } else { "NOT met" };
        let _ = writeln!(
            out,
            "  mesh mTLS CPU per GB through both agents   {v:>7.0} CPU-ms  (<= 1,000) {verdict}"
        );
    }
    out
}

fn mib(bytes: u64) -> f64 {
    bytes as f64 / (1024.0 * 1024.0)
}

/// The memory lines and their targets.
fn render_memory(idle: &Memory, flows: Option<&FlowsMemory>, count: u32) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "agent memory (VmRSS; client = the agent on `mesh`, server = the agent on `server`):"
    );
    let line = |out: &mut String, what: &str, m: &Memory| {
        let _ = writeln!(
            out,
            "  {what:<34} client {:>6.1} MiB ({:>5} fds)   server {:>6.1} MiB ({:>5} fds)",
            mib(m.client_rss),
            m.client_fds,
            mib(m.server_rss),
            m.server_fds
        );
    };
    line(&mut out, "idle, after start", idle);
    if let Some(f) = flows {
        line(&mut out, &format!("{count} flows open"), &f.open);
        line(&mut out, "after they echoed and closed", &f.closed);
        let _ = writeln!(
            out,
            "  the {count} flows opened in {:.1}s over {} pooled tunnel connection(s)",
            f.opening.as_secs_f64(),
            f.pooled
        );
    }
    let _ = writeln!(out, "design targets (measured, not asserted):");
    let verdict = |v: f64, max: f64| if v <= max { "met" } else { "NOT met" };
    let idle_max = mib(idle.client_rss.max(idle.server_rss));
    let _ = writeln!(
        out,
        "  agent RSS idle                               {idle_max:>6.1} MiB  (<= 16 MiB) {}",
        verdict(idle_max, 16.0)
    );
    if let Some(f) = flows {
        let busy = mib(f.open.client_rss.max(f.open.server_rss));
        let _ = writeln!(
            out,
            "  agent RSS with {count} proxied connections      {busy:>6.1} MiB  (<= 40 MiB) {}",
            verdict(busy, 40.0)
        );
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(conn: f64, rr: f64, bulk: f64) -> Samples {
        Samples {
            conn: vec![Report::with_rate(conn); 3],
            rr: vec![Report::with_rate(rr); 3],
            bulk_bps: vec![bulk; 3],
            ..Samples::default()
        }
    }

    #[test]
    fn table_has_ratios_to_plain_and_the_targets() {
        let mut s = BTreeMap::new();
        s.insert(STUNNEL, samples(500.0, 9000.0, 3.0e9));
        s.insert(PLAIN, samples(16000.0, 13000.0, 16.0e9));
        s.insert(MESH, samples(8000.0, 9100.0, 9.6e9));
        let rows = summarize(&s);
        let order: Vec<&str> = rows.iter().map(|r| r.path).collect();
        assert_eq!(order, [PLAIN, MESH, STUNNEL]);
        let args = Args {
            duration_secs: 5,
            rounds: 3,
            warmup_secs: 1,
            flows: 10_000,
            max_others_pct: 10,
            retries: 2,
        };
        let text = render_results(&rows, &args);
        assert!(text.contains("mesh mTLS      8000   0.50"), "{text}");
        assert!(text.contains("9.60   0.60"), "{text}");
        assert!(text.contains("0.60x  (>= 0.55x) met"), "{text}");
        assert!(text.contains("3.20x  (>= 2x) met"), "{text}");
        assert!(text.contains("0.50x  (>= 0.6x) NOT met"), "{text}");
        assert!(text.contains("0.70x  (>= 0.7x) met"), "{text}");
    }

    #[test]
    fn cpu_table_has_each_role_and_the_agents_per_gb() {
        let mut s = BTreeMap::new();
        let mut mesh = samples(8000.0, 9100.0, 9.6e9);
        mesh.roles = vec![
            ROLE_CLIENT,
            ROLE_CLIENT_AGENT,
            ROLE_SERVER_AGENT,
            ROLE_BACKEND,
        ];
        mesh.cpu_conn = vec![vec![10.0, 20.0, 30.0, 40.0]; 3];
        mesh.cpu_rr = vec![vec![1.0, 2.0, 3.0, 4.0]; 3];
        mesh.cpu_bulk = vec![
            vec![100.0, 500.0, 400.0, 200.0],
            vec![100.0, 700.0, 400.0, 200.0],
            vec![100.0, 600.0, 300.0, 200.0],
        ];
        s.insert(MESH, mesh);
        let text = render_cpu(&s);
        assert!(
            text.contains("mesh mTLS  client agent       20.0       2.0     600.0"),
            "{text}"
        );
        // Per run 900, 1100, 900: the median is 900.
        assert!(text.contains("900 CPU-ms  (<= 1,000) met"), "{text}");
    }

    #[test]
    fn memory_lines_compare_with_the_targets() {
        let m = |c: u64, s: u64| Memory {
            client_rss: c << 20,
            server_rss: s << 20,
            client_fds: 20,
            server_fds: 20,
        };
        let flows = FlowsMemory {
            open: m(30, 45),
            closed: m(12, 12),
            opening: Duration::from_secs(4),
            pooled: 1.0,
        };
        let text = render_memory(&m(10, 11), Some(&flows), 10_000);
        assert!(text.contains("11.0 MiB  (<= 16 MiB) met"), "{text}");
        assert!(text.contains("45.0 MiB  (<= 40 MiB) NOT met"), "{text}");
        assert!(
            text.contains("over 1 pooled tunnel connection(s)"),
            "{text}"
        );
    }
}
