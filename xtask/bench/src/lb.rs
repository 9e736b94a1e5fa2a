//! The `lb` benchmark suite: new TCP connections/s and request/response rate and latency
//! through a service VIP, side by side with going straight to the backend, kube-proxy-style
//! iptables DNAT and an HAProxy hop, in one test bed, printed as absolute numbers and as ratios
//! to `direct`.
//!
//! One bed, one bridge: node `server` runs nginx (answering `ok\n`), and every path has its own
//! client node, identical but for what the path installs in it, so all paths exist at once and
//! the rounds can interleave them. wrk always runs in the client node's namespace *and* cgroup
//! (where an agent attaches its programs).
//!
//! | path | client node | how wrk reaches nginx |
//! | --- | --- | --- |
//! | `direct` | `direct` | `server:8080`, nothing installed |
//! | `vip (1 svc)` | `vip1` | VIP `10.96.0.10:80`, agent with one service |
//! | `vip (20k svc)` | `vip20k` | the same VIP; the agent started with one service, then its config was rewritten to 20,000 (fillers on `10.100.x.y:80`) |
//! | `iptables DNAT (1 svc)` | `ipt1` | the VIP, DNATed by kube-proxy-like rules, no agent |
//! | `iptables DNAT (10k svc)` | `ipt10k` | the same with 10,000 services, the measured one **last** |
//! | `haproxy` | `haproxy` | HAProxy (TCP mode, one thread) on the node's `127.0.0.1:18080` |
//! | `direct (agent on)` | `vip1` | `server:8080` through the agent's hooks (their cost on traffic to no VIP) |
//!
//! Every path is measured with two wrk loads (see [`crate::wrk`]): new connections (2 threads,
//! 32 connections, `Connection: close`) and request/response on one keep-alive connection
//! (1 thread, 1 connection). A round runs every path once, starting at a different path each
//! round; the first round warms each load up first. The table shows the median over the rounds
//! and the spread ((max - min) / median).
//!
//! The machine may be shared (builds, other tests), and anything else running steals CPU from
//! a saturated bench. Interleaving makes slow phases hit all paths alike; on top of that every
//! run is measured again (`--retries`, default 2) when other processes took more than
//! `--max-others-pct` (default 10 %) of the CPUs during it (see [`crate::cpu`]), keeping the
//! least disturbed attempt, and the output says how much CPU others took.
//!
//! For the VIP paths the agent's `forwarded` counter must grow by at least the connections wrk
//! made (the kernel really rewrote them), and for `direct (agent on)` it must not grow; the
//! output shows both, the kernel time the `connect4` program takes per connect (BPF run-time
//! statistics, see [`crate::bpfstats`]), and the CPU time the agents used during the rounds
//! (next to nothing: they are not in the data path). The bench fails on errors (wrk failing,
//! non-2xx responses, socket errors above 1 %, counters that disagree), never on a ratio; the
//! design targets are printed with the measured values.
//!
//! Client nodes get `tcp_tw_reuse = 1` and ephemeral ports 1024-65535, as load generators do
//! (see [`client_node`]); nginx's node keeps the defaults.
//!
//! Runs after setup and a release build. Everything it starts is a child in its own process
//! group, killed on the way out; the bed's drop removes the namespaces (and so the iptables
//! rules), cgroups and pins. On failure the bed's configs and logs (agents, nginx, HAProxy,
//! iptables rules) are copied to `$TMPDIR/mesh-bench-lb-<prefix>` first.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use anyhow::{ensure, Context, Result};
use mesh_tests::config::{render, Service};
use mesh_tests::{Agent, Node, TestBed};

use crate::bpfstats::{self, ProgStats};
use crate::cpu::{Disturbance, Meter};
use crate::iptables::{self, Dnat, DnatService};
use crate::procstat;
use crate::servers::{Haproxy, Nginx};
use crate::stats::{median, ratio, spread, target_line};
use crate::wrk::{self, Load, Report};
use crate::Artifacts;
use crate::{client_node, wait_services, Tools};

/// Options of `cargo xtask bench lb`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Seconds of each measured wrk run.
    #[arg(long, default_value_t = 5, value_parser = clap::value_parser!(u64).range(1..=300))]
    pub duration_secs: u64,
    /// Rounds over all paths; the table shows medians.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..=20))]
    pub rounds: u32,
    /// Seconds of the unmeasured warm-up of each path and load in the first round (0: none).
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u64).range(0..=60))]
    pub warmup_secs: u64,
    /// nginx worker processes on the server node.
    #[arg(long, default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=8))]
    pub nginx_workers: u32,
    /// Measure a run again when other processes took more than this percentage of the CPUs
    /// during it (the machine may be shared; the least disturbed attempt is kept).
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u32).range(0..=100))]
    pub max_others_pct: u32,
    /// How many times a disturbed run may be measured again.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(0..=10))]
    pub retries: u32,
    /// The iptables backend of the DNAT baseline.
    #[arg(long, value_enum, default_value_t = iptables::Backend::Nft)]
    pub iptables: iptables::Backend,
}

/// The VIP every VIP and DNAT path connects to.
const VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 10), 80);
/// nginx listens on the server node's address and this port.
const BACKEND_PORT: u16 = 8080;
/// HAProxy listens here in its client node.
const HAPROXY_LISTEN: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::LOCALHOST, 18080);
/// Services in the agent's config for the "many services" VIP path.
const VIP_SERVICES_MANY: u32 = 20_000;
/// Services in the nat table for the "many services" iptables path.
const DNAT_SERVICES_MANY: u32 = 10_000;
/// How long an agent may take to apply a config (20,000 services included).
const APPLY_TIMEOUT: Duration = Duration::from_secs(120);
/// The name of the measured service in the agents' configs.
const SERVICE: &str = "web";

/// The paths, in the order of the table.
const DIRECT: &str = "direct";
const VIP_ONE: &str = "vip (1 svc)";
const VIP_MANY: &str = "vip (20k svc)";
const DNAT_ONE: &str = "iptables DNAT (1 svc)";
const DNAT_MANY: &str = "iptables DNAT (10k svc)";
const HAPROXY: &str = "haproxy";
const DIRECT_AGENT_ON: &str = "direct (agent on)";

/// What the agent's `forwarded` counter must do during a run.
#[derive(Debug, Clone, Copy)]
enum Rewrites<'a> {
    /// No agent on the path.
    NoAgent,
    /// Grow by at least the connections wrk made (traffic to the VIP).
    Every(&'a Agent),
    /// Stay put (traffic to no VIP through the hooks).
    Never(&'a Agent),
}

/// One way from a client to nginx.
struct Path<'a> {
    name: &'static str,
    client: Node,
    target: SocketAddr,
    rewrites: Rewrites<'a>,
}

/// The reports of every round of one path.
#[derive(Debug, Clone, Default)]
struct Samples {
    conn: Vec<Report>,
    rr: Vec<Report>,
    /// Growth of the agent's `forwarded` counter over the measured runs, and the connections
    /// wrk made in them.
    rewritten: u64,
    connections: u64,
    /// The share of the CPUs others used during each measured run (see [`crate::cpu`]).
    others: Vec<f64>,
    /// The `connect4` programs' runs and run time over the new-connection runs (paths with an
    /// agent, when the kernel's BPF statistics could be enabled).
    connect4: ProgStats,
}

/// Runs the suite and prints its results.
pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    Tools::require(&[
        "wrk",
        "nginx",
        "haproxy",
        "bpftool",
        args.iptables.iptables(),
        args.iptables.restore(),
    ])?;
    crate::in_bed("lb", |bed| scenario(bed, artifacts, args))
}

/// Everything between building the bed and tearing it down; what it starts is dropped (killed)
/// when it returns, before the bed.
fn scenario(bed: &TestBed, artifacts: &Artifacts, args: &Args) -> Result<()> {
    let server = bed.add_node("server")?;
    let backend = SocketAddr::new(server.ipv4().into(), BACKEND_PORT);
    let vip = SocketAddr::V4(VIP);
    let nginx = Nginx::start(
        &server,
        &bed.tmpdir().join("nginx"),
        backend,
        args.nginx_workers,
    )?;
    let backend = nginx.addr;

    let direct = client_node(bed, "direct")?;

    let proxy_node = client_node(bed, "haproxy")?;
    let haproxy = Haproxy::start(
        &proxy_node,
        &bed.tmpdir().join("haproxy"),
        SocketAddr::V4(HAPROXY_LISTEN),
        backend,
    )?;

    let one = render("vip1", &[Service::tcp(SERVICE, vip, &[backend])]);
    let vip1 = client_node(bed, "vip1")?;
    let agent1 = Agent::start_with(&vip1, artifacts.agent.clone(), &one)?;
    wait_services(&agent1, 1, SERVICE, APPLY_TIMEOUT)?;

    let vip20k = client_node(bed, "vip20k")?;
    let agent20k = Agent::start_with(&vip20k, artifacts.agent.clone(), &one)?;
    wait_services(&agent20k, 1, SERVICE, APPLY_TIMEOUT)?;
    let many = many_services(vip, backend, VIP_SERVICES_MANY);
    let started = Instant::now();
    agent20k.write_config(&render("vip20k", &many))?;
    wait_services(&agent20k, many.len(), SERVICE, APPLY_TIMEOUT)?;
    eprintln!(
        "bench lb: the agent showed {} services {:.1}s after its config was rewritten",
        many.len(),
        started.elapsed().as_secs_f64()
    );

    let measured = DnatService {
        vip: VIP,
        backend: iptables::v4(backend)?,
    };
    let mut dnat = Vec::new();
    let mut dnat_nodes = Vec::new();
    for (node_name, total) in [("ipt1", 1), ("ipt10k", DNAT_SERVICES_MANY)] {
        let node = client_node(bed, node_name)?;
        let services = iptables::services(total, measured, measured.backend);
        let rules = Dnat::load(&node, args.iptables, bed.tmpdir(), &services)?;
        eprintln!(
            "bench lb: {} loaded {} services in {:.2}s",
            args.iptables.restore(),
            rules.services,
            rules.load_time.as_secs_f64()
        );
        dnat.push(rules);
        dnat_nodes.push(node);
    }

    let path = |name, client: &Node, target, rewrites| Path {
        name,
        client: client.clone(),
        target,
        rewrites,
    };
    let paths = [
        path(DIRECT, &direct, backend, Rewrites::NoAgent),
        path(VIP_ONE, &vip1, vip, Rewrites::Every(&agent1)),
        path(VIP_MANY, &vip20k, vip, Rewrites::Every(&agent20k)),
        path(DNAT_ONE, &dnat_nodes[0], vip, Rewrites::NoAgent),
        path(DNAT_MANY, &dnat_nodes[1], vip, Rewrites::NoAgent),
        path(HAPROXY, &proxy_node, haproxy.addr, Rewrites::NoAgent),
        path(DIRECT_AGENT_ON, &vip1, backend, Rewrites::Never(&agent1)),
    ];
    // Off again when this is dropped, at the latest when the bench exits.
    let prog_stats = bpfstats::enable()
        .map_err(|e| eprintln!("bench lb: no per-program kernel statistics: {e:#}"))
        .ok();
    let bench = Bench {
        conn: Load::new_connections(Duration::from_secs(args.duration_secs)),
        rr: Load::request_response(Duration::from_secs(args.duration_secs)),
        warmup: Duration::from_secs(args.warmup_secs),
        cgroup: bed.cgroup_root().to_path_buf(),
        disturbance: Disturbance {
            max_others: f64::from(args.max_others_pct) / 100.0,
            retries: args.retries,
        },
        prog_stats: prog_stats.is_some(),
    };
    eprintln!(
        "bench lb: {} rounds over {} paths, {}s per run (about {} s in all)",
        args.rounds,
        paths.len(),
        args.duration_secs,
        u64::from(args.rounds) * paths.len() as u64 * 2 * args.duration_secs
            + paths.len() as u64 * 2 * args.warmup_secs
    );
    let agents = [("vip1", &agent1), ("vip20k", &agent20k)];
    let cpu_before = agents
        .iter()
        .map(|(_, a)| agent_cpu_s(a))
        .collect::<Result<Vec<_>>>()?;
    let samples = bench.rounds(&paths, args.rounds)?;
    let mut cpu = Vec::new();
    for ((node, agent), before) in agents.iter().zip(cpu_before) {
        cpu.push((*node, agent_cpu_s(agent)? - before));
    }
    drop(dnat);

    print!(
        "{}{}",
        render_results(&summarize(&samples), args),
        render_evidence(&paths, &samples, &cpu)
    );
    Ok(())
}

/// Lines showing that the kernel rewrote the VIP connections (and nothing else) and that the
/// agents stayed out of the data path.
fn render_evidence(
    paths: &[Path],
    samples: &BTreeMap<&str, Samples>,
    agent_cpu: &[(&str, f64)],
) -> String {
    let mut out = String::from(
        "kernel rewrites (agent `forwarded` counter, summed over the measured runs):\n",
    );
    for p in paths {
        let Some(s) = samples.get(p.name) else {
            continue;
        };
        let _ = match p.rewrites {
            Rewrites::NoAgent => continue,
            Rewrites::Every(_) => writeln!(
                out,
                "  {:<24} +{} for {} connections wrk made",
                p.name, s.rewritten, s.connections
            ),
            Rewrites::Never(_) => writeln!(out, "  {:<24} +{} (no VIP)", p.name, s.rewritten),
        };
    }
    let hooks: Vec<String> = paths
        .iter()
        .filter_map(|p| {
            let ns = samples.get(p.name)?.connect4.ns_per_run()?;
            Some(format!("{} {:.2} us", p.name, ns / 1e3))
        })
        .collect();
    if !hooks.is_empty() {
        let _ = writeln!(
            out,
            "connect4 program, kernel time per connect (BPF run-time stats): {}",
            hooks.join(", ")
        );
    }
    let _ = write!(
        out,
        "agent CPU time during the rounds (its status queries included):"
    );
    for (node, seconds) in agent_cpu {
        let _ = write!(out, " {node} {seconds:.2}s");
    }
    out.push('\n');
    let others: Vec<f64> = samples.values().flat_map(|s| s.others.clone()).collect();
    if let (Some(m), Some(max)) = (median(&others), others.iter().copied().reduce(f64::max)) {
        let _ = writeln!(
            out,
            "CPU used by other processes during the runs (estimate): median {:.0}%, max {:.0}% \
             of the machine{}",
            m * 100.0,
            max * 100.0,
            if max > 0.10 {
                "; the machine was shared, compare the ratios with care"
            } else {
                ""
            }
        );
    }
    out
}

/// CPU seconds the agent has used so far.
fn agent_cpu_s(agent: &Agent) -> Result<f64> {
    procstat::cpu_s(agent.pid().context("the agent is not running")?)
}

/// One measured run.
struct Run {
    report: Report,
    /// How much the agent's `forwarded` counter grew (0 without an agent).
    rewritten: u64,
    /// How many connections wrk made (at least).
    connections: u64,
    /// The share of the CPUs other processes used during the run.
    others: f64,
    /// Growth of the `connect4` programs' statistics during the run (zero if not read).
    connect4: ProgStats,
}

/// The loads, the warm-up, and when to measure again.
struct Bench {
    conn: Load,
    rr: Load,
    warmup: Duration,
    /// The bed's cgroup, holding every process of the runs (for [`Meter`]).
    cgroup: std::path::PathBuf,
    /// When a run is measured again.
    disturbance: Disturbance,
    /// Whether the kernel's BPF run-time statistics are on (see [`bpfstats`]).
    prog_stats: bool,
}

impl Bench {
    /// `rounds` rounds over `paths`, each round starting one path further so no path always
    /// runs first or last; the first round warms each path and load up.
    fn rounds<'p>(
        &self,
        paths: &[Path<'p>],
        rounds: u32,
    ) -> Result<BTreeMap<&'static str, Samples>> {
        let mut samples: BTreeMap<&str, Samples> = BTreeMap::new();
        for round in 0..rounds as usize {
            for i in 0..paths.len() {
                let p = &paths[(i + round) % paths.len()];
                let s = samples.entry(p.name).or_default();
                for load in [&self.conn, &self.rr] {
                    if round == 0 && !self.warmup.is_zero() {
                        wrk::run(&p.client, &load.with_duration(self.warmup), p.target)
                            .with_context(|| format!("{}: warm-up", p.name))?;
                    }
                    let (report, others) = self.least_disturbed(p, load, s)?;
                    s.others.push(others);
                    if load.close {
                        s.conn.push(report);
                    } else {
                        s.rr.push(report);
                    }
                }
                eprintln!(
                    "bench lb: round {}/{rounds} {:<24} {:>8.0} conn/s {:>8.0} rr/s  p99 {:.3} ms  \
                     (others used {:.0}% CPU)",
                    round + 1,
                    p.name,
                    s.conn[round].requests_per_s,
                    s.rr[round].requests_per_s,
                    s.rr[round].latency_p99_s * 1e3,
                    s.others[s.others.len() - 2..]
                        .iter()
                        .copied()
                        .fold(0.0, f64::max)
                        * 100.0
                );
            }
        }
        Ok(samples)
    }

    /// Measures `load` on `path`, again when the machine was busy (see [`Disturbance`]);
    /// returns the least disturbed report and the others' share during it. Counter growth
    /// and connections of every attempt go to `s`.
    fn least_disturbed(&self, path: &Path, load: &Load, s: &mut Samples) -> Result<(Report, f64)> {
        let label = format!("{} ({})", path.name, load.describe());
        self.disturbance.least_disturbed(&label, || {
            let run = self.one(path, load)?;
            s.rewritten += run.rewritten;
            s.connections += run.connections;
            s.connect4.add(run.connect4);
            Ok((run.report, run.others))
        })
    }

    /// One measured run of `load` on `path`, checking the agent's counters.
    fn one(&self, path: &Path, load: &Load) -> Result<Run> {
        let name = path.name;
        let agent = match path.rewrites {
            Rewrites::NoAgent => None,
            Rewrites::Every(a) | Rewrites::Never(a) => Some(a),
        };
        let before = agent.map(|a| a.counter("forwarded")).transpose()?;
        let cgroup = path.client.cgroup().path();
        let read_hook = agent.is_some() && load.close && self.prog_stats;
        let hook_before = read_hook
            .then(|| bpfstats::hook(cgroup, "connect4"))
            .transpose()?;
        // Only wrk's run: the status and bpftool queries around it are the bench's own work.
        let meter = Meter::start(&self.cgroup)?;
        let report = wrk::run(&path.client, load, path.target).context(name)?;
        let others = meter.others_share()?;
        let connect4 = match hook_before {
            Some(b) => bpfstats::hook(cgroup, "connect4")?.since(b),
            None => ProgStats::default(),
        };
        let grew = match (agent, before) {
            (Some(a), Some(before)) => a.counter("forwarded")?.saturating_sub(before),
            _ => 0,
        };
        // With Connection: close every request had its own connection; keep-alive opens one
        // per wrk connection.
        let connections = if load.close {
            report.requests
        } else {
            u64::from(load.connections)
        };
        match path.rewrites {
            Rewrites::NoAgent => {}
            Rewrites::Every(_) => ensure!(
                grew >= connections,
                "{name}: the agent's `forwarded` counter grew by {grew}, but wrk made at least \
                 {connections} connections to the VIP: the kernel did not rewrite them"
            ),
            Rewrites::Never(_) => ensure!(
                grew == 0,
                "{name}: the agent's `forwarded` counter grew by {grew} on traffic to no VIP"
            ),
        }
        Ok(Run {
            report,
            rewritten: grew,
            connections,
            others,
            connect4,
        })
    }
}

/// The measured service (VIP → backend) last, after `total - 1` filler services on distinct
/// `10.100.x.y:80` VIPs with the same backend.
fn many_services(vip: SocketAddr, backend: SocketAddr, total: u32) -> Vec<Service> {
    let mut v: Vec<Service> = (0..total.saturating_sub(1))
        .map(|n| {
            let filler = SocketAddr::new(iptables::filler_vip(n).into(), 80);
            Service::tcp(&format!("filler{n}"), filler, &[backend])
        })
        .collect();
    v.push(Service::tcp(SERVICE, vip, &[backend]));
    v
}

/// The medians (and spreads) of one path.
#[derive(Debug, Clone, PartialEq)]
struct Summary {
    path: String,
    conn_per_s: f64,
    /// (max - min) / median of the new connections/s over the rounds.
    conn_spread: f64,
    rr_per_s: f64,
    rr_spread: f64,
    rr_avg_s: f64,
    rr_p99_s: f64,
}

/// Medians per path, in the table's order.
fn summarize(samples: &BTreeMap<&str, Samples>) -> Vec<Summary> {
    let order = [
        DIRECT,
        VIP_ONE,
        VIP_MANY,
        DNAT_ONE,
        DNAT_MANY,
        HAPROXY,
        DIRECT_AGENT_ON,
    ];
    order
        .iter()
        .filter_map(|path| {
            let s = samples.get(path)?;
            let conn: Vec<f64> = s.conn.iter().map(|r| r.requests_per_s).collect();
            let rr: Vec<f64> = s.rr.iter().map(|r| r.requests_per_s).collect();
            Some(Summary {
                path: path.to_string(),
                conn_per_s: median(&conn)?,
                conn_spread: spread(&conn)?,
                rr_per_s: median(&rr)?,
                rr_spread: spread(&rr)?,
                rr_avg_s: median(&s.rr.iter().map(|r| r.latency_avg_s).collect::<Vec<_>>())?,
                rr_p99_s: median(&s.rr.iter().map(|r| r.latency_p99_s).collect::<Vec<_>>())?,
            })
        })
        .collect()
}

/// The results table, its notes and the design-target lines.
fn render_results(rows: &[Summary], args: &Args) -> String {
    let mut out = String::new();
    let find = |p: &str| rows.iter().find(|r| r.path == p);
    let Some(direct) = find(DIRECT) else {
        return "no direct run: nothing to compare\n".into();
    };
    let _ = writeln!(
        out,
        "\nlb: median of {} rounds of {}s runs; conn = wrk -t2 -c32 'Connection: close' \
         (new TCP connections/s), rr = wrk -t1 -c1 keep-alive (its latency in ms); \
         spread = (max - min) / median",
        args.rounds, args.duration_secs
    );
    let _ = writeln!(
        out,
        "{:<24} {:>8} {:>6} {:>7} {:>8} {:>6} {:>7} {:>7} {:>7}",
        "path", "conn/s", "ratio", "spread", "rr/s", "ratio", "spread", "avg ms", "p99 ms"
    );
    for r in rows {
        let _ = writeln!(
            out,
            "{:<24} {:>8.0} {:>6.2} {:>6.0}% {:>8.0} {:>6.2} {:>6.0}% {:>7.3} {:>7.3}",
            r.path,
            r.conn_per_s,
            ratio(r.conn_per_s, direct.conn_per_s),
            r.conn_spread * 100.0,
            r.rr_per_s,
            ratio(r.rr_per_s, direct.rr_per_s),
            r.rr_spread * 100.0,
            r.rr_avg_s * 1e3,
            r.rr_p99_s * 1e3,
        );
    }
    let _ = writeln!(
        out,
        "iptables ({}): the measured service is the LAST of the services chain's rules (worst \
         case). haproxy: TCP mode, nbthread 1, on the client node.",
        args.iptables.iptables()
    );

    let _ = writeln!(out, "design targets (measured, not asserted):");
    let conn = |p: &str| find(p).map(|r| r.conn_per_s);
    let rr = |p: &str| find(p).map(|r| r.rr_per_s);
    let mut target = |what: &str, measured: Option<f64>, min: f64| {
        out.push_str(&target_line(what, measured, min));
    };
    let (d_conn, d_rr) = (direct.conn_per_s, direct.rr_per_s);
    let vs_direct = |v: f64| ratio(v, d_conn);
    target(
        "vip (1 svc) conn/s vs direct",
        conn(VIP_ONE).map(vs_direct),
        0.97,
    );
    target(
        "vip (20k svc) conn/s vs direct",
        conn(VIP_MANY).map(vs_direct),
        0.97,
    );
    target(
        "vip (20k svc) conn/s vs iptables DNAT (10k svc)",
        conn(VIP_MANY)
            .zip(conn(DNAT_MANY))
            .map(|(v, i)| ratio(v, i)),
        4.0,
    );
    target(
        "vip (1 svc) rr/s vs direct",
        rr(VIP_ONE).map(|v| ratio(v, d_rr)),
        0.99,
    );
    target(
        "vip (20k svc) rr/s vs direct",
        rr(VIP_MANY).map(|v| ratio(v, d_rr)),
        0.99,
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn samples(conn: &[f64], rr: &[f64]) -> Samples {
        Samples {
            conn: conn.iter().copied().map(Report::with_rate).collect(),
            rr: rr.iter().copied().map(Report::with_rate).collect(),
            ..Samples::default()
        }
    }

    #[test]
    fn table_has_medians_ratios_and_targets() {
        let mut s = BTreeMap::new();
        s.insert(DIRECT, samples(&[16000.0, 15000.0, 17000.0], &[13000.0; 3]));
        s.insert(VIP_ONE, samples(&[15800.0; 3], &[12990.0; 3]));
        s.insert(VIP_MANY, samples(&[15000.0; 3], &[12000.0; 3]));
        s.insert(DNAT_MANY, samples(&[3000.0, 4000.0], &[13000.0; 2]));
        let rows = summarize(&s);
        // Table order, whatever the map's.
        let order: Vec<&str> = rows.iter().map(|r| r.path.as_str()).collect();
        assert_eq!(order, [DIRECT, VIP_ONE, VIP_MANY, DNAT_MANY]);
        assert_eq!(rows[0].conn_per_s, 16000.0);
        assert_eq!(rows[0].conn_spread, 0.125);
        assert_eq!(rows[3].conn_per_s, 3500.0);
        let args = Args {
            duration_secs: 5,
            rounds: 3,
            warmup_secs: 1,
            nginx_workers: 1,
            max_others_pct: 10,
            retries: 2,
            iptables: iptables::Backend::Nft,
        };
        let text = render_results(&rows, &args);
        assert!(
            text.contains(
                "direct                      16000   1.00     12%    13000   1.00      0%"
            ),
            "{text}"
        );
        assert!(
            text.contains("vip (1 svc)                 15800   0.99      0%    12990   1.00"),
            "{text}"
        );
        assert!(text.contains("vip (20k svc) conn/s vs direct   "), "{text}");
        assert!(text.contains("0.94x  (>= 0.97x) NOT met"), "{text}");
        assert!(text.contains("4.29x  (>= 4x) met"), "{text}");
        assert!(text.contains("LAST"));
        assert!(
            !text.lines().any(|l| l.starts_with(HAPROXY)),
            "rows not run are left out: {text}"
        );
    }

    #[test]
    fn many_services_puts_the_measured_one_last() {
        let vip: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let be: SocketAddr = "10.1.0.2:8080".parse().unwrap();
        let v = many_services(vip, be, 20_000);
        assert_eq!(v.len(), 20_000);
        assert_eq!(v.last().unwrap().name, SERVICE);
        assert_eq!(v[0].vip, "10.100.0.1");
        let vips: std::collections::HashSet<_> = v.iter().map(|s| &s.vip).collect();
        assert_eq!(vips.len(), 20_000);
    }
}
