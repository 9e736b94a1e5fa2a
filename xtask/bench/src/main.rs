//! `mesh-bench SUITE [OPTIONS]`: the benchmark suites, launched by `cargo xtask bench SUITE
//! [OPTIONS]` after set-up and a release build (xtask passes the binaries under test in
//! `MESH_AGENT_BIN` and `MESH_WORKLOAD_BIN`, as for the e2e tests).
//!
//! Suites measure mesh side by side with its baselines (direct, iptables DNAT, HAProxy,
//! stunnel) in one run and report ratios; see the performance targets in the design brief.
//! Each suite lives in its own module with a `run(&Artifacts, &Args) -> anyhow::Result<()>`
//! entry; the helpers they share are modules here too. The microbenchmarks of the agent's
//! pure code (`cargo xtask bench micro`) are criterion benches in `mesh-agent/benches/`, not
//! here.
//!
//! | module | owns |
//! | --- | --- |
//! | [`lb`] | the load-balancing suite: scenario, checks, results table |
//! | [`gossip`] | the gossip suite: propagation, failure detection, gossip traffic |
//! | [`traffic`] | gossip traffic counters of an agent and of a node's interface |
//! | [`wrk`] | running `wrk` and parsing its report |
//! | [`servers`] | nginx, HAProxy, stunnel and iperf3 servers: config files, start, readiness |
//! | [`iptables`] | kube-proxy-like DNAT rules, loaded with `iptables-restore` |
//! | [`mtls`] | the mTLS suite: tunnel vs stunnel vs plain, agent memory, loopback sockmap |
//! | [`iperf`] | running `iperf3` and reading its JSON report |
//! | [`cpu`] | how much CPU other processes took during the runs (the machine may be shared) |
//! | [`roles`] | CPU time per role of a path (client node, each agent, backend), from each role's cgroup |
//! | [`procstat`] | an agent's CPU time, resident memory and descriptors from `/proc` |
//! | [`stats`] | medians, spreads, ratios |
//! | [`bpfstats`] | the kernel's per-program run time of the agent's hooks |
//! | [`msgsize`] | message-size sweeps over one path (ping-pong and iperf3 per size), for the loopback sockmap decision |
//! | [`sockmap`] | the loopback sockmap suite: mTLS path with `loopback_sockmap` off vs on, per message size |
//! | [`admin`] | one request to an agent's admin API over its Unix socket |
//! | [`fillers`] | filler catalogs: many services of 10 backends, for the large-config suites |
//! | [`reload`] | the reload suite: the admin API's and a tunneled flow's round trips while a 20,000-service config is applied |
//! | [`scale`] | the scale suite: load time, memory over reloads and single-change latency at 1,000 and 20,000 services |
//!
//! A suite's processes are children in their own process groups, so Ctrl-C reaches only the
//! bench: it notes the interrupt, finishes the run in progress (each is bounded) and returns
//! an error, and the test bed's drop tears everything down; a suite that fails keeps the bed's
//! configs and logs (see [`keep_files`]).

pub mod admin;
pub mod bpfstats;
pub mod cpu;
pub mod fillers;
pub mod gossip;
pub mod iperf;
pub mod iptables;
pub mod lb;
pub mod msgsize;
pub mod mtls;
pub mod procstat;
pub mod reload;
pub mod roles;
pub mod scale;
pub mod servers;
pub mod sockmap;
pub mod stats;
pub mod traffic;
pub mod wrk;

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use std::process::ExitCode;

use anyhow::{bail, Context as _, Result};
use clap::{Parser, Subcommand};
use mesh_tests::{Agent, Node, TestBed};
use serde_json::Value;

#[derive(Debug, Parser)]
#[command(
    name = "cargo xtask bench",
    bin_name = "cargo xtask bench",
    about = "Benchmark suites of mesh (run through `cargo xtask bench`, which sets up and builds first)"
)]
struct Cli {
    /// The benchmark suite to run.
    #[command(subcommand)]
    suite: Suite,
}

/// The benchmark suites.
#[derive(Debug, Clone, Subcommand)]
pub enum Suite {
    /// Service load balancing: new connections/s and request/response via a VIP, vs direct,
    /// iptables DNAT and HAProxy.
    Lb(lb::Args),
    /// Gossip between agents: how fast a change reaches every node's kernel maps, how fast a
    /// dead node is withdrawn, and how many bytes gossip costs, for meshes of 4, 8 and 16 nodes.
    Gossip(gossip::Args),
    /// The mTLS path: throughput, request/response and new connections/s through the tunnel,
    /// vs stunnel with the same cipher and vs plain TCP; agent memory with 10,000 flows; the
    /// loopback sockmap by message size.
    Mtls(mtls::Args),
    /// The loopback sockmap on the mTLS path: ping-pong and iperf3 per message size (64 B to
    /// 64 KB), `[mtls] loopback_sockmap` off vs on.
    Sockmap(sockmap::Args),
    /// What a large reload costs the rest of the agent: the admin API's and a tunneled flow's
    /// round trips while 20,000 services come and go (optionally vs a baseline binary).
    Reload(reload::Args),
    /// What a large catalog costs one agent, per size: cold-start load time, memory over 20
    /// reloads, and the latency of one registration or one-service config change to the
    /// kernel (p50/p99/max).
    Scale(scale::Args),
}

/// The binaries under test.
#[derive(Debug, Clone)]
pub struct Artifacts {
    /// The agent daemon and CLI.
    pub agent: PathBuf,
    /// The test workload (echo servers and clients).
    pub workload: PathBuf,
}

impl Artifacts {
    /// The binaries named by `MESH_AGENT_BIN` and `MESH_WORKLOAD_BIN` (the harness, which
    /// the suites drive, finds them the same way), else the workspace's release build.
    fn from_env() -> Result<Self> {
        Ok(Artifacts {
            agent: mesh_tests::host::agent_bin()?,
            workload: mesh_tests::host::workload_bin()?,
        })
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.suite) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            // `{:#}` prints the whole context chain on one line, without a backtrace.
            eprintln!("error: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(suite: Suite) -> Result<()> {
    let built = Artifacts::from_env()?;
    install_interrupt_handler();
    match suite {
        Suite::Lb(args) => lb::run(&built, &args),
        Suite::Gossip(args) => gossip::run(&built, &args),
        Suite::Mtls(args) => mtls::run(&built, &args),
        Suite::Sockmap(args) => sockmap::run(&built, &args),
        Suite::Reload(args) => reload::run(&built, &args),
        Suite::Scale(args) => scale::run(&built, &args),
    }
}

/// Set by SIGINT/SIGTERM; checked between runs.
static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    INTERRUPTED.store(true, Ordering::SeqCst);
}

fn install_interrupt_handler() {
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: the handler only stores to an atomic, which is async-signal-safe.
        unsafe { libc::signal(sig, on_signal as *const () as libc::sighandler_t) };
    }
}

/// Fails once the bench was asked to stop, so the caller unwinds and tears down.
pub fn check_interrupted() -> Result<()> {
    if INTERRUPTED.load(Ordering::SeqCst) {
        bail!("interrupted");
    }
    Ok(())
}

/// External programs a suite needs.
pub struct Tools;

impl Tools {
    /// Fails naming every program of `names` not found in `PATH`.
    pub fn require(names: &[&str]) -> Result<()> {
        let path = std::env::var_os("PATH").unwrap_or_default();
        let missing: Vec<&str> = names
            .iter()
            .copied()
            .filter(|n| !std::env::split_paths(&path).any(|d| d.join(n).is_file()))
            .collect();
        if !missing.is_empty() {
            bail!(
                "not found in PATH: {} (cargo xtask setup installs them; is /usr/sbin in PATH?)",
                missing.join(", ")
            );
        }
        Ok(())
    }
}

/// `error` with the bed's configs and logs kept (see [`keep`]), saying where they are.
pub fn keep_files(bed: &TestBed, suite: &str, error: anyhow::Error) -> anyhow::Error {
    match keep(bed, suite) {
        Ok(kept) => error.context(format!("configs and logs kept in {}", kept.display())),
        Err(copy) => error.context(format!("(keeping the logs failed: {copy:#})")),
    }
}

/// Copies the bed's configs and logs to `$TMPDIR/mesh-bench-SUITE-PREFIX` (the bed removes its
/// scratch directory on drop) and returns that directory.
pub fn keep(bed: &TestBed, suite: &str) -> Result<PathBuf> {
    let kept = std::env::temp_dir().join(format!("mesh-bench-{suite}-{}", bed.prefix()));
    copy_files(bed.tmpdir(), &kept)?;
    Ok(kept)
}

/// Builds a bed named `bench-<suite>` and runs `scenario` in it; on failure the bed's configs
/// and logs are kept (see [`keep_files`]).
pub fn in_bed(suite: &str, scenario: impl FnOnce(&TestBed) -> Result<()>) -> Result<()> {
    let bed = TestBed::new(&format!("bench-{suite}"))?;
    scenario(&bed).map_err(|e| keep_files(&bed, suite, e))
}

/// Copies the regular files under `from` to `to`, keeping the tree (sockets are skipped).
fn copy_files(from: &Path, to: &Path) -> Result<()> {
    std::fs::create_dir_all(to).with_context(|| format!("creating {}", to.display()))?;
    for entry in std::fs::read_dir(from).with_context(|| format!("reading {}", from.display()))? {
        let entry = entry?;
        let kind = entry.file_type()?;
        let dest = to.join(entry.file_name());
        if kind.is_dir() {
            copy_files(&entry.path(), &dest)?;
        } else if kind.is_file() {
            std::fs::copy(entry.path(), &dest)
                .with_context(|| format!("copying {}", entry.path().display()))?;
        }
    }
    Ok(())
}

/// Adds client node `name`, tuned like any load generator: wrk often closes a connection before
/// the server's FIN arrives, leaving the client in TIME_WAIT; with Linux's defaults (28k
/// ephemeral ports, no TIME_WAIT reuse) back-to-back runs of 16k connections/s from one address
/// pile up TIME_WAIT sockets until `connect()` crawls (measured: 16k, then 3.6k connections/s by
/// the fifth 5-second run). `tcp_tw_reuse = 1` and ports 1024-65535 keep it flat. Per
/// namespace, so every path gets the same.
pub fn client_node(bed: &TestBed, name: &str) -> Result<Node> {
    let node = bed.add_node(name)?;
    node.netns().run_in(|| -> Result<()> {
        for (key, value) in [
            ("net/ipv4/tcp_tw_reuse", "1"),
            ("net/ipv4/ip_local_port_range", "1024 65535"),
        ] {
            std::fs::write(format!("/proc/sys/{key}"), value)
                .with_context(|| format!("setting {key} = {value}"))?;
        }
        Ok(())
    })??;
    Ok(node)
}

/// Polls the agent's status (every 200 ms, up to `timeout`) until it lists `count` services
/// and `service` has slots in the kernel; fails at once on a rejected config.
pub fn wait_services(agent: &Agent, count: usize, service: &str, timeout: Duration) -> Result<()> {
    let deadline = Instant::now() + timeout;
    loop {
        check_interrupted()?;
        let last = match agent.status_json() {
            Ok(st) => {
                if let Some(e) = st["config_error"].as_str() {
                    bail!("the agent rejected the bench config: {e}");
                }
                if services_ready(&st, count, service) {
                    return Ok(());
                }
                format!(
                    "{} services listed",
                    st["services"].as_array().map_or(0, Vec::len)
                )
            }
            Err(e) => format!("{e:#}"),
        };
        if Instant::now() >= deadline {
            bail!(
                "the agent did not show {count} services within {timeout:?} (last: {last})\n\
                 --- agent log ---\n{}",
                agent.log()
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
}

fn services_ready(status: &Value, count: usize, service: &str) -> bool {
    let Some(services) = status["services"].as_array() else {
        return false;
    };
    services.len() == count
        && services
            .iter()
            .any(|s| s["name"] == service && s["slots"].as_u64().is_some_and(|n| n > 0))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn services_ready_needs_the_count_and_slots() {
        let st: Value = serde_json::json!({
            "services": [{"name": "web", "slots": 1}, {"name": "x", "slots": 1}]
        });
        assert!(services_ready(&st, 2, "web"));
        assert!(!services_ready(&st, 1, "web"));
        assert!(!services_ready(&st, 2, "other"));
        let st: Value = serde_json::json!({"services": [{"name": "web", "slots": 0}]});
        assert!(!services_ready(&st, 1, "web"));
    }
}
