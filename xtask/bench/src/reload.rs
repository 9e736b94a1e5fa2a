//! The reload suite: what a large config change costs the rest of the agent.
//!
//! A client node's agent has a strict mTLS service `echo` (an echo server on a second node,
//! reached through the tunnel) and, besides it, either no other service or `--services`
//! fillers of 10 backends each. Each phase lasts [`PHASE`]: one second in, the config is
//! replaced by atomic rename (idle: not at all), and all along the bench asks the admin API
//! for `/v1/policies` every [`PACE`] (a small answer, so that what is timed is the agent's
//! responsiveness, not the size of a 20,000-service report) while a workload in the node keeps
//! one tunneled connection in ping-pong, one 64-byte round trip every [`PACE`]. Reported per
//! phase: the slowest and the 99th-percentile admin and flow round trips (milliseconds), how
//! long the apply took and the agent's resident memory at the phase's end, for each round.
//!
//! With `--baseline-agent PATH` a second agent binary (say, built from an earlier commit) runs
//! the same phases, its rounds interleaved with the current one's, and the table ends with
//! the ratios baseline / current of the median worst cases.

use std::collections::BTreeMap;
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use mesh_tests::{
    config::Service,
    mtls::{self, Ca, MtlsTable, TRUST_DOMAIN},
    workload::PingPong,
    Agent, Node, TestBed,
};

use crate::{admin, check_interrupted, fillers, in_bed, stats, wait_services, Artifacts};

/// What `cargo xtask bench reload` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Filler services of the large config (10 backends each).
    #[arg(long, default_value_t = 20_000)]
    pub services: u32,
    /// Rounds per agent binary; each runs the three phases.
    #[arg(long, default_value_t = 3)]
    pub rounds: u32,
    /// A second agent binary measured in the same run, rounds interleaved.
    #[arg(long)]
    pub baseline_agent: Option<PathBuf>,
}

/// How long each phase measures.
const PHASE: Duration = Duration::from_secs(8);
/// When, within a phase, the config is replaced.
const CHANGE_AT: Duration = Duration::from_secs(1);
/// Between two admin requests, and between two round trips of the flow.
const PACE: Duration = Duration::from_millis(10);
/// The tunneled service the flow uses.
const ECHO: &str = "echo";
const ECHO_VIP: SocketAddr = SocketAddr::new(IpAddr::V4(Ipv4Addr::new(10, 96, 0, 10)), 7000);
const ECHO_PORT: u16 = 7000;
/// The workload cgroup of the flow's client.
const CLIENT: &str = "client";

pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    in_bed("reload", |bed| scenario(bed, artifacts, args))
}

/// One phase: from which config to which, or none.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Phase {
    Idle,
    Grow,
    Shrink,
}

impl Phase {
    const ALL: [Phase; 3] = [Phase::Idle, Phase::Grow, Phase::Shrink];

    fn label(self, services: u32) -> String {
        match self {
            Phase::Idle => "idle (1 service)".to_owned(),
            Phase::Grow => format!("reload 1 -> {services}"),
            Phase::Shrink => format!("reload {services} -> 1"),
        }
    }
}

/// What one phase measured, milliseconds.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    admin_worst: f64,
    admin_p99: f64,
    flow_worst: f64,
    flow_p99: f64,
    /// The apply's own time as the agent reports it (0 when idle).
    apply: f64,
    /// The agent's resident memory at the end of the phase, MiB.
    rss: f64,
}

fn scenario(bed: &TestBed, artifacts: &Artifacts, args: &Args) -> Result<()> {
    let server = bed.add_node("server")?;
    let backend = SocketAddr::new(server.ipv4().into(), ECHO_PORT);
    let _echo = server.echo_server("echo", backend)?;
    let ca = Ca::init(bed, "ca")?;
    let echo = Service::tcp(ECHO, ECHO_VIP, &[backend]).with("mtls = \"strict\"");
    let config = |node: &Node, fillers: u32| -> Result<String> {
        let issued = ca.issue(
            bed,
            &format!("spiffe://{TRUST_DOMAIN}/ns/bench/sa/{}", node.name()),
            node.name(),
        )?;
        let table = MtlsTable {
            ca_bundle: &ca.cert,
            node_cert: &issued,
            workloads: &[],
            options: "",
        };
        let mut services = fillers::services(fillers);
        services.push(echo.clone());
        mtls::config(node, &services, &table, "")
    };
    let _server_agent = Agent::start_with(&server, artifacts.agent.clone(), &config(&server, 0)?)?;
    let client = bed.add_node("client")?;
    let small = config(&client, 0)?;
    let large = config(&client, args.services)?;

    let mut agents = vec![("current", artifacts.agent.clone())];
    if let Some(baseline) = &args.baseline_agent {
        agents.push(("baseline", baseline.clone()));
    }
    let mut samples: BTreeMap<(&str, Phase), Vec<Sample>> = BTreeMap::new();
    for round in 0..args.rounds {
        for (label, bin) in &agents {
            check_interrupted()?;
            let agent = Agent::start_with(&client, bin.clone(), &small)?;
            wait_services(&agent, 1, ECHO, Duration::from_secs(60))?;
            for phase in Phase::ALL {
                let (change, services) = match phase {
                    Phase::Idle => (None, 1),
                    Phase::Grow => (Some(&large), args.services as usize + 1),
                    Phase::Shrink => (Some(&small), 1),
                };
                let sample = measure(&client, &agent, artifacts, change, services)
                    .with_context(|| format!("{label}, round {round}, {phase:?}"))?;
                samples.entry((label, phase)).or_default().push(sample);
            }
        }
    }
    println!("{}", render(&samples, args));
    Ok(())
}

/// One phase on `agent`: the admin poller and the flow run for [`PHASE`]; `change` (a config)
/// is written at [`CHANGE_AT`] and must be applied, with `services` in the kernel, before
/// the phase ends.
fn measure(
    client: &Node,
    agent: &Agent,
    artifacts: &Artifacts,
    change: Option<&String>,
    services: usize,
) -> Result<Sample> {
    let mut applies = agent.follow_applied();
    let stop = AtomicBool::new(false);
    std::thread::scope(|scope| -> Result<Sample> {
        let admin = scope.spawn(|| poll_admin(agent.socket_path(), &stop));
        let flow = scope.spawn(|| {
            let run = PingPong {
                size: 64,
                duration: PHASE,
                pace: PACE,
            };
            client.pingpong_with(&artifacts.workload, CLIENT, ECHO_VIP, &run)
        });
        let started = Instant::now();
        let mut apply = 0.0;
        if let Some(config) = change {
            std::thread::sleep(CHANGE_AT);
            let since = SystemTime::now();
            agent.write_config(config)?;
            let left = PHASE.saturating_sub(started.elapsed());
            let applied = applies
                .wait(since, left, |a| a.services == services)
                .context("the change was not applied within the phase")?;
            apply = applied.elapsed_us as f64 / 1000.0;
        }
        let flow = flow.join().expect("the flow thread")?;
        stop.store(true, Ordering::SeqCst);
        let admin = admin.join().expect("the admin thread")?;
        let pid = agent.pid().context("the agent runs")?;
        let rss = crate::procstat::rss_bytes(pid)? as f64 / (1024.0 * 1024.0);
        if let Some(error) = flow.errors.first() {
            bail!("the tunneled flow failed: {error}");
        }
        if flow.messages == 0 {
            bail!("the tunneled flow made no round trip");
        }
        Ok(Sample {
            admin_worst: admin.last().copied().unwrap_or(0.0),
            admin_p99: stats::quantile(&admin, 0.99),
            flow_worst: flow.max_us / 1000.0,
            flow_p99: flow.p99_us / 1000.0,
            apply,
            rss,
        })
    })
}

/// Asks the admin API for `/v1/policies` (a small answer: the request's own cost stays out of
/// it) every [`PACE`] until `stop`; returns the round trips in milliseconds, sorted. A request
/// that fails fails the phase.
fn poll_admin(socket: &Path, stop: &AtomicBool) -> Result<Vec<f64>> {
    let mut times = Vec::new();
    while !stop.load(Ordering::SeqCst) {
        let started = Instant::now();
        admin::request(socket, "GET", "/v1/policies")?;
        times.push(started.elapsed().as_secs_f64() * 1000.0);
        std::thread::sleep(PACE.saturating_sub(started.elapsed()));
    }
    times.sort_by(f64::total_cmp);
    Ok(times)
}

fn render(samples: &BTreeMap<(&str, Phase), Vec<Sample>>, args: &Args) -> String {
    let mut out = format!(
        "reload suite: {} filler services x {} backends, {} rounds; admin = GET \
         /v1/policies every 10 ms, flow = one tunneled connection, a 64-byte round trip every \
         10 ms; milliseconds, each round's value\n\n",
        args.services,
        fillers::BACKENDS,
        args.rounds
    );
    let per_round = |values: Vec<f64>| {
        values
            .iter()
            .map(|v| format!("{v:.1}"))
            .collect::<Vec<_>>()
            .join(" / ")
    };
    out.push_str(&format!(
        "{:<9} {:<22} {:<24} {:<24} {:<24} {:<24} {:<24} {}\n",
        "agent", "phase", "admin worst", "admin p99", "flow worst", "flow p99", "apply", "RSS MiB"
    ));
    for ((agent, phase), rounds) in samples {
        let column = |f: fn(&Sample) -> f64| per_round(rounds.iter().map(f).collect());
        out.push_str(&format!(
            "{:<9} {:<22} {:<24} {:<24} {:<24} {:<24} {:<24} {}\n",
            agent,
            phase.label(args.services),
            column(|s| s.admin_worst),
            column(|s| s.admin_p99),
            column(|s| s.flow_worst),
            column(|s| s.flow_p99),
            column(|s| s.apply),
            column(|s| s.rss),
        ));
    }
    if args.baseline_agent.is_some() {
        out.push_str("\nbaseline / current, medians of the rounds' worst cases:\n");
        for phase in Phase::ALL {
            let median = |agent: &str, f: fn(&Sample) -> f64| {
                let values: Vec<f64> = samples
                    .get(&(agent, phase))
                    .map(|r| r.iter().map(f).collect())
                    .unwrap_or_default();
                stats::median(&values).unwrap_or(0.0)
            };
            let ratio =
                |f: fn(&Sample) -> f64| stats::ratio(median("baseline", f), median("current", f));
            out.push_str(&format!(
                "  {:<22} admin {:>7.1}x   flow {:>7.1}x\n",
                phase.label(args.services),
                ratio(|s| s.admin_worst),
                ratio(|s| s.flow_worst),
            ));
        }
    }
    out
}
