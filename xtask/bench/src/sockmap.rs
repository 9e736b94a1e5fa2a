//! The `sockmap` benchmark suite: does the loopback sockmap (`[mtls] loopback_sockmap`) pay on
//! the mTLS path, message size by message size (issue 3)?
//!
//! One bed: node `server` runs a raw echo server and an `iperf3 -s`, each behind a strict mTLS
//! service, with an agent; client nodes `smoff` and `smon` are identical but for the switch:
//! their agents run inside the node's cgroup (as on a host whose programs attach to the root
//! cgroup, which the passive end of the loopback hop needs) with `loopback_sockmap` off and
//! on. For each size in [`msgsize::SIZES`], both paths get a ping-pong run and (unless
//! `--no-iperf3`) an iperf3 run with writes of that size, interleaved off/on per size; the
//! table shows both, `on` as a ratio to `off`.
//!
//! The suite checks that the switch did what it says: the `loopback_redirected` counter of
//! `smon` grows by at least the ping-pong messages, and `smoff`'s stays 0.
//!
//! An iperf3 run that fails is shown as such, not fatal: with the sockmap on, a sender that
//! outruns the agent gets `ENOMEM` from `write` (the kernel's ingress redirect has no
//! backpressure: when the agent's socket cannot take more memory the message is dropped and
//! the error returned), which is itself a finding.
//!
//! Run it with `cargo xtask bench sockmap [--duration-secs 3] [--no-iperf3]`.

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use mesh_tests::config::Service;
use mesh_tests::mtls::{self, Ca, MtlsTable};
use mesh_tests::{Agent, Node, TestBed};

use crate::msgsize::{self, SizeResult};
use crate::Artifacts;
use crate::Tools;

/// Options of `cargo xtask bench sockmap`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Seconds of each run (per size and path).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u64).range(1..=60))]
    pub duration_secs: u64,
    /// Skip the iperf3 throughput runs.
    #[arg(long)]
    pub no_iperf3: bool,
}

const ECHO_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 40), 80);
const IPERF_VIP: SocketAddrV4 = SocketAddrV4::new(Ipv4Addr::new(10, 96, 0, 41), 5201);
const ECHO_PORT: u16 = 9000;
const IPERF_PORT: u16 = 5201;
const SETTLE: Duration = Duration::from_secs(10);

/// Runs the suite and prints its results.
pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    Tools::require(&["iperf3"])?;
    let bed = TestBed::new("bench-sockmap")?;
    let server = bed.add_node("server")?;
    let echo = SocketAddr::new(server.ipv4().into(), ECHO_PORT);
    let iperf = SocketAddr::new(server.ipv4().into(), IPERF_PORT);
    let services = [
        Service::tcp("echo", SocketAddr::V4(ECHO_VIP), &[echo]).with("mtls = \"strict\""),
        Service::tcp("iperf", SocketAddr::V4(IPERF_VIP), &[iperf]).with("mtls = \"strict\""),
    ];
    let ca = Ca::init(&bed, "ca")?;
    let mut echo_cmd = Command::new(&artifacts.workload);
    echo_cmd.args(["echo-server", "--listen", &echo.to_string()]);
    let echo_server = server.spawn("echo", echo_cmd)?;
    echo_server.wait_line(SETTLE, |l| l == "ready")?;
    let mut iperf_cmd = Command::new("iperf3");
    // Without --forceflush iperf3 buffers its output in a pipe and "listening" never shows.
    iperf_cmd.args([
        "-s",
        "--forceflush",
        "-B",
        &server.ipv4().to_string(),
        "-p",
        &IPERF_PORT.to_string(),
    ]);
    let iperf_server = server.spawn("iperf3", iperf_cmd)?;
    iperf_server.wait_line(SETTLE, |l| l.contains("Server listening"))?;
    let issued = ca.issue(&bed, "spiffe://mesh.test/ns/mesh/sa/server", "server")?;
    let table = MtlsTable {
        ca_bundle: &ca.cert,
        node_cert: &issued,
        workloads: &[],
        options: "",
    };
    let server_agent = Agent::start_with(
        &server,
        artifacts.agent.clone(),
        &mtls::config(&server, &services, &table, "")?,
    )?;

    let mut clients = Vec::new();
    for (name, on) in [("smoff", false), ("smon", true)] {
        let node = bed.add_node(name)?;
        let issued = ca.issue(&bed, &format!("spiffe://mesh.test/ns/mesh/sa/{name}"), name)?;
        let options = format!("loopback_sockmap = {on}\n");
        let table = MtlsTable {
            ca_bundle: &ca.cert,
            node_cert: &issued,
            workloads: &[],
            options: &options,
        };
        let agent = Agent::start_in(
            &node,
            artifacts.agent.clone(),
            "mesh-agent",
            &mtls::config(&node, &services, &table, "")?,
        )?;
        clients.push((node, agent));
    }
    for agent in clients.iter().map(|(_, a)| a).chain([&server_agent]) {
        agent.wait_status(SETTLE, |st| {
            Agent::backends_in(st, "echo") == [echo.to_string()]
        })?;
    }

    let duration = Duration::from_secs(args.duration_secs);
    let mut results: [Vec<SizeResult>; 2] = [Vec::new(), Vec::new()];
    let before: Vec<u64> = counters(&clients)?;
    for size in msgsize::SIZES {
        for ((node, _), out) in clients.iter().zip(results.iter_mut()) {
            let mut r = msgsize::sweep(
                &artifacts.workload,
                node,
                SocketAddr::V4(ECHO_VIP),
                &[size],
                duration,
            )?;
            if !args.no_iperf3 {
                msgsize::throughput_sweep(node, SocketAddr::V4(IPERF_VIP), &mut r, duration)?;
            }
            out.extend(r);
        }
    }
    let after = counters(&clients)?;
    let messages: u64 = results[1].iter().map(|r| r.messages).sum();
    ensure!(
        after[0] == before[0],
        "smoff redirected messages with loopback_sockmap = false"
    );
    ensure!(
        after[1] - before[1] >= messages,
        "smon's loopback_redirected grew by {} for about {messages} ping-pong messages",
        after[1] - before[1]
    );
    println!(
        "{}",
        msgsize::render(&[("sockmap off", &results[0]), ("sockmap on", &results[1])])
    );
    println!(
        "loopback_redirected: smoff +{}, smon +{}",
        after[0] - before[0],
        after[1] - before[1]
    );
    Ok(())
}

/// `loopback_redirected` of each client's agent.
fn counters(clients: &[(Node, Agent)]) -> Result<Vec<u64>> {
    clients
        .iter()
        .map(|(_, a)| a.counter("loopback_redirected"))
        .collect()
}
