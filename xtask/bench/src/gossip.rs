//! The `gossip` benchmark suite: how long a change made on one node takes to reach the kernel
//! maps of every node, how long a dead node's endpoints stay in its peers' maps, and how many
//! bytes gossip costs each node, for meshes of 4, 8 and 16 nodes (`--nodes`).
//!
//! Each mesh size gets its own bed: nodes `n1`…`nN` on one bridge, each running the real agent
//! with the shared service `web` (one backend: the node's own address) and a `[gossip]` table
//! seeded with `n1` and `n2`, the agent's default gossip settings unless `--interval` or
//! `--phi-threshold` say otherwise. Once every agent serves all N backends:
//!
//! 1. **Idle traffic**: the agents' gossip counters over `--idle-secs` of nothing happening
//!    (bytes sent + received per node per second), checked once against `eth0`'s counters of
//!    the last node (wire bytes = gossip bytes + 42 header bytes per datagram).
//! 2. **Propagation**: `--changes` changes, one at a time: `mesh-agent register` of an extra
//!    endpoint of `web` on node k, then `deregister` of it on the same node, k rotating. Each
//!    is timed from just before the command to the moment each node's kernel held the new
//!    backend count, read from the agent's `GET /v1/applied` stream (one event per write of
//!    the maps, published right after it with the kernel's backend count and the agent's
//!    wall clock, which is the bench's clock on one host; one follower thread per agent, see
//!    [`mesh_tests::applied`]): no polling of the agents while a change travels. After each
//!    change every agent's status must list exactly the expected backends. The gossip
//!    counters over this phase give the traffic while changes flow.
//! 3. **Failure detection**: `--failures` rounds: a non-seed node's agent is killed with
//!    SIGKILL and its link cut, timed until no other node's kernel holds its endpoint; then the
//!    link comes back and the agent restarts, timed until every other node's kernel holds it
//!    again (agent start included).
//!
//! A withdrawal slower than the target keeps the bed's configs and logs (as a failure does) for
//! a look at when each agent declared the node dead.
//!
//! The table shows, per size: the time until the last node had a change (p50/p99/max over
//! the changes) and the time per (other node, change) pair (p50/p99); withdrawal and return
//! times (p50/max over the rounds); bytes per node per second idle and while changes flow. The
//! design targets are printed with the values. The bench fails on errors (a change never
//! seen, a wrong backend set, an agent that died), never on a number.
//!
//! Runs after setup and a release build. The bed's drop kills the agents and removes the
//! namespaces; on failure the bed's configs and logs are copied to
//! `$TMPDIR/mesh-bench-gossip-<prefix>` first.

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::time::{Duration, Instant, SystemTime};

use anyhow::{bail, Context as _, Result};
use mesh_tests::applied::Follower;
use mesh_tests::config::{gossip_table, render, Service};
use mesh_tests::{Agent, Node, Signal, TestBed};

use crate::traffic::{self, Counts};
use crate::Artifacts;
use crate::{check_interrupted, keep, keep_files};

/// Options of `cargo xtask bench gossip`.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Mesh sizes, measured one after the other (comma-separated).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "4,8,16",
        value_parser = clap::value_parser!(u32).range(3..=64)
    )]
    pub nodes: Vec<u32>,
    /// Changes per mesh size (registrations and deregistrations, alternating).
    #[arg(long, default_value_t = 40, value_parser = clap::value_parser!(u32).range(2..=1000))]
    pub changes: u32,
    /// Failure rounds per mesh size (kill a node's agent and cut its link, then restore).
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(0..=20))]
    pub failures: u32,
    /// Seconds of the idle window gossip traffic is measured over.
    #[arg(long, default_value_t = 10, value_parser = clap::value_parser!(u64).range(1..=600))]
    pub idle_secs: u64,
    /// The agents' gossip round period (`gossip.interval`, e.g. `200ms`); default: the agent's.
    #[arg(long)]
    pub interval: Option<String>,
    /// The agents' failure-detector threshold (`gossip.phi_threshold`); default: the agent's.
    #[arg(long)]
    pub phi_threshold: Option<u32>,
}

/// The shared service every node defines.
const SERVICE: &str = "web";
const VIP: &str = "10.96.0.10:80";
/// Each node's own backend of `web`, and the extra endpoint the changes register.
const BACKEND_PORT: u16 = 8080;
const EXTRA_PORT: u16 = 8081;
/// How many nodes seed the others.
const SEEDS: usize = 2;
/// A fresh mesh must agree within this.
const CONVERGE_TIMEOUT: Duration = Duration::from_secs(60);
/// A change (or a withdrawal, or a return) not seen everywhere within this is an error.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(30);
/// How often what the agents' followers received is looked at while a change travels.
const POLL: Duration = Duration::from_millis(20);
/// The design targets.
const TARGET_PROPAGATION: Duration = Duration::from_secs(1);
const TARGET_WITHDRAWAL: Duration = Duration::from_secs(5);

/// One node of the mesh.
struct Member {
    agent: Agent,
    node: Node,
    /// The agent's `GET /v1/applied` stream (followed across restarts).
    applies: Follower,
}

impl Member {
    fn backend(&self) -> String {
        SocketAddr::new(self.node.ipv4().into(), BACKEND_PORT).to_string()
    }

    fn extra(&self) -> String {
        SocketAddr::new(self.node.ipv4().into(), EXTRA_PORT).to_string()
    }
}

/// Gossip traffic of a window.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
struct Rate {
    /// Mean and largest over the nodes of (bytes sent + received) / second.
    mean_bps: f64,
    max_bps: f64,
    /// Mean over the nodes of datagrams sent + received per second.
    datagrams_per_s: f64,
}

/// What one mesh size measured.
#[derive(Debug, Clone, Default)]
struct Measured {
    nodes: usize,
    /// Per change: until the last node's kernel had it.
    all: Vec<Duration>,
    /// Per (other node, change): until that node's kernel had it.
    each: Vec<Duration>,
    /// Per failure round: until no other node's kernel held the dead node's endpoint.
    withdrawn: Vec<Duration>,
    /// Per failure round: until every other node's kernel held it again.
    returned: Vec<Duration>,
    idle: Rate,
    /// Traffic while the changes flowed, and the changes per second then.
    changing: Rate,
    changes_per_s: f64,
    /// The wire check of the idle window.
    wire: String,
}

/// Runs the suite and prints its results.
pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    let mut results = Vec::new();
    for &n in &args.nodes {
        let bed = TestBed::new(&format!("bench-gossip-{n}"))?;
        let measured = mesh(&bed, artifacts, args, n as usize)
            .map_err(|e| keep_files(&bed, "gossip", e))
            .with_context(|| format!("mesh of {n} nodes"))?;
        drop(bed);
        results.push(measured);
    }
    print!("{}", render_results(&results, args));
    Ok(())
}

/// One mesh size, start to finish; what it starts is killed when the bed drops.
fn mesh(bed: &TestBed, artifacts: &Artifacts, args: &Args, n: usize) -> Result<Measured> {
    let started = Instant::now();
    let key = bed.tmpdir().join("mesh.key");
    std::fs::write(&key, "a-bench-mesh-key-of-32-bytes-long\n")?;
    let nodes = (1..=n)
        .map(|i| bed.add_node(&format!("n{i}")))
        .collect::<Result<Vec<_>>>()?;
    let seeds: Vec<std::net::IpAddr> = nodes[..SEEDS].iter().map(|s| s.ipv4().into()).collect();
    let mut members = Vec::new();
    for node in nodes {
        check_interrupted()?;
        let backend = SocketAddr::new(node.ipv4().into(), BACKEND_PORT);
        let web = Service::tcp(SERVICE, VIP.parse()?, &[backend]);
        let mut extra = Vec::new();
        if let Some(interval) = &args.interval {
            extra.push(format!("interval = {interval:?}"));
        }
        if let Some(phi) = args.phi_threshold {
            extra.push(format!("phi_threshold = {phi}"));
        }
        let config =
            render(node.name(), &[web]) + &gossip_table(node.ipv4().into(), &seeds, &key, &extra);
        let agent = Agent::start_with(&node, artifacts.agent.clone(), &config)?;
        let applies = agent.follow_applied();
        members.push(Member {
            agent,
            node,
            applies,
        });
    }
    let all: Vec<String> = members.iter().map(Member::backend).collect();
    let deadline = Instant::now() + CONVERGE_TIMEOUT;
    for m in &members {
        check_interrupted()?;
        wait_backends(m, &all, deadline.saturating_duration_since(Instant::now()))?;
    }
    eprintln!(
        "bench gossip: {n} agents started and agreed after {:.1}s",
        started.elapsed().as_secs_f64()
    );
    let mut measured = Measured {
        nodes: n,
        ..Measured::default()
    };

    // 1. Idle traffic, checked once against the wire.
    let wire_node = &members[n - 1].node;
    let before = gossip_counts(&members)?;
    let wire_before = traffic::interface(wire_node)?;
    let idle_started = Instant::now();
    pause(Duration::from_secs(args.idle_secs))?;
    let after = gossip_counts(&members)?;
    let wire = traffic::interface(wire_node)? - wire_before;
    let secs = idle_started.elapsed().as_secs_f64();
    measured.idle = rate(&before, &after, secs);
    measured.wire = wire_check(
        wire_node.name(),
        after[n - 1] - before[n - 1],
        wire,
        args.idle_secs,
    );
    eprintln!("bench gossip: {}", measured.wire);

    // 2. Propagation.
    let before = gossip_counts(&members)?;
    let changes_started = Instant::now();
    for change in 0..args.changes as usize {
        let origin = (change / 2) % n;
        let register = change % 2 == 0;
        let extra = members[origin].extra();
        let mut want = all.clone();
        if register {
            want.push(extra.clone());
        }
        forget_applies(&mut members);
        let since = SystemTime::now();
        cli_change(&members[origin].agent, register, &extra)?;
        let everyone: Vec<usize> = (0..n).collect();
        let times = wait_applied(&mut members, &everyone, since, want.len())?;
        measured
            .all
            .push(times.iter().copied().max().unwrap_or_default());
        measured.each.extend(
            times
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != origin)
                .map(|(_, t)| *t),
        );
        for m in &members {
            wait_backends(m, &want, Duration::from_secs(5))?;
        }
    }
    let after = gossip_counts(&members)?;
    let secs = changes_started.elapsed().as_secs_f64();
    measured.changing = rate(&before, &after, secs);
    measured.changes_per_s = f64::from(args.changes) / secs;
    eprintln!(
        "bench gossip: {n} nodes: {} changes, the last node had each after {} ms (p50)",
        args.changes,
        ms(percentile(&measured.all, 50.0))
    );

    // 3. Failure detection.
    for round in 0..args.failures as usize {
        let victim = SEEDS + round % (n - SEEDS);
        let others: Vec<usize> = (0..n).filter(|&i| i != victim).collect();
        let port = format!("p-{}", members[victim].node.name());
        let without: Vec<String> = all
            .iter()
            .filter(|b| **b != members[victim].backend())
            .cloned()
            .collect();
        forget_applies(&mut members);
        let since = SystemTime::now();
        members[victim].agent.kill(Signal::Kill)?;
        bed.switch().ip(&["link", "set", &port, "down"])?;
        let gone = wait_applied(&mut members, &others, since, without.len())?;
        measured.withdrawn.push(slowest(&gone).1);
        for &i in &others {
            wait_backends(&members[i], &without, Duration::from_secs(5))?;
        }

        forget_applies(&mut members);
        let since = SystemTime::now();
        bed.switch().ip(&["link", "set", &port, "up"])?;
        members[victim].agent.restart()?;
        let back = wait_applied(&mut members, &others, since, all.len())?;
        measured.returned.push(slowest(&back).1);
        for m in &members {
            wait_backends(m, &all, CONVERGE_TIMEOUT)?;
        }
        let name = |i: usize| members[others[i]].node.name();
        if slowest(&gone).1 > TARGET_WITHDRAWAL {
            // Worth a look at the agents' "member state changed" lines.
            let kept = keep(bed, "gossip")?;
            eprintln!(
                "bench gossip: withdrawing {} took longer than {TARGET_WITHDRAWAL:?}: configs and \
                 logs kept in {}",
                members[victim].node.name(),
                kept.display()
            );
        }
        let (first, last) = (fastest(&gone), slowest(&gone));
        eprintln!(
            "bench gossip: {n} nodes: {} dead: withdrawn on {} after {} ms, everywhere (last {}) \
             after {} ms; back everywhere after {} ms",
            members[victim].node.name(),
            name(first.0),
            ms(Some(first.1)),
            name(last.0),
            ms(Some(last.1)),
            ms(Some(slowest(&back).1)),
        );
    }
    Ok(measured)
}

/// Sleeps `total`, checking for an interrupt every 100 ms.
fn pause(total: Duration) -> Result<()> {
    let end = Instant::now() + total;
    while Instant::now() < end {
        check_interrupted()?;
        std::thread::sleep(Duration::from_millis(100).min(end - Instant::now()));
    }
    Ok(())
}

/// The index and time of the slowest of `times` (zero for none).
fn slowest(times: &[Duration]) -> (usize, Duration) {
    times
        .iter()
        .copied()
        .enumerate()
        .max_by_key(|&(_, t)| t)
        .unwrap_or_default()
}

/// The index and time of the fastest of `times` (zero for none).
fn fastest(times: &[Duration]) -> (usize, Duration) {
    times
        .iter()
        .copied()
        .enumerate()
        .min_by_key(|&(_, t)| t)
        .unwrap_or_default()
}

/// `mesh-agent register` (or `deregister`) of `address` for `web` on `agent`.
fn cli_change(agent: &Agent, register: bool, address: &str) -> Result<()> {
    let action = if register { "register" } else { "deregister" };
    agent
        .cli(&[
            action.as_ref(),
            "--admin-socket".as_ref(),
            agent.socket_path().as_os_str(),
            "--service".as_ref(),
            SERVICE.as_ref(),
            "--address".as_ref(),
            address.as_ref(),
        ])?
        .ok(&format!("mesh-agent {action}"))?;
    Ok(())
}

/// Drops the applies received so far from every agent.
fn forget_applies(members: &mut [Member]) {
    members.iter_mut().for_each(|m| m.applies.forget());
}

/// Waits until the kernel of each member in `which` held `backends` backends after `since`,
/// looking at what their followers received every [`POLL`]; returns the time each took, in
/// `which`'s order.
/// Fails when one has not within [`CHANGE_TIMEOUT`] or its agent died.
fn wait_applied(
    members: &mut [Member],
    which: &[usize],
    since: SystemTime,
    backends: usize,
) -> Result<Vec<Duration>> {
    let deadline = Instant::now() + CHANGE_TIMEOUT;
    let mut times: Vec<Option<Duration>> = vec![None; which.len()];
    loop {
        for (slot, &i) in times.iter_mut().zip(which) {
            if slot.is_some() {
                continue;
            }
            let m = &mut members[i];
            m.applies.poll();
            if let Some(apply) = m.applies.first(since, |a| a.backends == backends) {
                *slot = Some(apply.at().duration_since(since).unwrap_or_default());
            } else if !m.agent.is_running() {
                bail!(
                    "the agent on {} died\n--- agent log ---\n{}",
                    m.node.name(),
                    m.agent.log()
                );
            }
        }
        if times.iter().all(Option::is_some) {
            return Ok(times.into_iter().flatten().collect());
        }
        if Instant::now() >= deadline {
            let missing: Vec<String> = times
                .iter()
                .zip(which)
                .filter(|(t, _)| t.is_none())
                .map(|(_, &i)| {
                    let m = &members[i];
                    let last = m.applies.last().map_or_else(
                        || format!("no apply since; {}", m.applies.problem()),
                        |a| format!("last apply: {} backends", a.backends),
                    );
                    format!("{} ({last})", m.node.name())
                })
                .collect();
            bail!(
                "the kernel maps of {} never held {backends} backends within {CHANGE_TIMEOUT:?}",
                missing.join(", ")
            );
        }
        check_interrupted()?;
        std::thread::sleep(POLL);
    }
}

/// Waits until `m`'s agent serves `web` with exactly `want` (its status, so what it applied).
fn wait_backends(m: &Member, want: &[String], timeout: Duration) -> Result<()> {
    let mut want = want.to_vec();
    want.sort();
    m.agent
        .wait_status(timeout, |st| Agent::backends_in(st, SERVICE) == want)
        .with_context(|| format!("{SERVICE} on {} never became {want:?}", m.node.name()))?;
    Ok(())
}

fn gossip_counts(members: &[Member]) -> Result<Vec<Counts>> {
    members.iter().map(|m| traffic::gossip(&m.node)).collect()
}

/// The traffic per node between two samples `secs` apart.
fn rate(before: &[Counts], after: &[Counts], secs: f64) -> Rate {
    let per_node: Vec<Counts> = after.iter().zip(before).map(|(a, b)| *a - *b).collect();
    let n = per_node.len().max(1) as f64;
    let bps: Vec<f64> = per_node.iter().map(|c| c.bytes() as f64 / secs).collect();
    Rate {
        mean_bps: bps.iter().sum::<f64>() / n,
        max_bps: bps.iter().copied().fold(0.0, f64::max),
        datagrams_per_s: per_node.iter().map(|c| c.datagrams() as f64).sum::<f64>() / n / secs,
    }
}

/// The agent's gossip counters of one node against its interface's, over the same window.
fn wire_check(node: &str, gossip: Counts, wire: Counts, secs: u64) -> String {
    let expected = gossip.bytes() + traffic::FRAME_OVERHEAD * gossip.datagrams();
    format!(
        "wire check on {node} over {secs}s idle: the agent counted {} gossip bytes in {} \
         datagrams (+{} header bytes each = {expected}); eth0 carried {} bytes in {} frames \
         ({:+.1}%; the rest is ARP/ND)",
        gossip.bytes(),
        gossip.datagrams(),
        traffic::FRAME_OVERHEAD,
        wire.bytes(),
        wire.datagrams(),
        if expected > 0 {
            (wire.bytes() as f64 / expected as f64 - 1.0) * 100.0
        } else {
            f64::NAN
        }
    )
}

/// The `p`th percentile (nearest rank) of `v`.
fn percentile(v: &[Duration], p: f64) -> Option<Duration> {
    let mut v = v.to_vec();
    v.sort();
    let rank = ((p / 100.0) * v.len() as f64).ceil() as usize;
    v.get(rank.clamp(1, v.len().max(1)) - 1).copied()
}

/// Milliseconds, or `-` for nothing measured.
fn ms(d: Option<Duration>) -> String {
    d.map_or("-".into(), |d| format!("{:.0}", d.as_secs_f64() * 1e3))
}

/// The results tables and the design-target lines.
fn render_results(results: &[Measured], args: &Args) -> String {
    let mut out = String::new();
    let _ = writeln!(
        out,
        "\ngossip: gossip.interval {}, phi_threshold {}; seeds n1, n2",
        args.interval.as_deref().unwrap_or("default"),
        args.phi_threshold
            .map_or("default".to_string(), |p| p.to_string()),
    );
    let _ = writeln!(
        out,
        "propagation: a change = `mesh-agent register`/`deregister` of one endpoint on a rotating \
         node, timed from just before the command to each node's kernel map write (the agent's \
         /v1/applied); all = until the last node, node = each other node per change (ms)"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9}",
        "nodes", "changes", "all p50", "all p99", "all max", "node p50", "node p99"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:>5} {:>7} {:>8} {:>8} {:>8} {:>9} {:>9}",
            r.nodes,
            r.all.len(),
            ms(percentile(&r.all, 50.0)),
            ms(percentile(&r.all, 99.0)),
            ms(r.all.iter().max().copied()),
            ms(percentile(&r.each, 50.0)),
            ms(percentile(&r.each, 99.0)),
        );
    }
    let _ = writeln!(
        out,
        "failure detection: kill -9 a non-seed node's agent and cut its link, until no other \
         node's kernel holds its endpoint (withdrawn); link up and agent restarted, until every \
         other node's kernel holds it again (back, agent start included) (ms)"
    );
    let _ = writeln!(
        out,
        "{:>5} {:>6} {:>13} {:>13} {:>9} {:>9}",
        "nodes", "rounds", "withdrawn p50", "withdrawn max", "back p50", "back max"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:>5} {:>6} {:>13} {:>13} {:>9} {:>9}",
            r.nodes,
            r.withdrawn.len(),
            ms(percentile(&r.withdrawn, 50.0)),
            ms(r.withdrawn.iter().max().copied()),
            ms(percentile(&r.returned, 50.0)),
            ms(r.returned.iter().max().copied()),
        );
    }
    let _ = writeln!(
        out,
        "gossip traffic per node: UDP payload bytes sent + received per second (the agents' \
         mesh_gossip_bytes_total), idle for {}s and while the changes flowed",
        args.idle_secs
    );
    let _ = writeln!(
        out,
        "{:>5} {:>11} {:>10} {:>12} {:>10} {:>12} {:>10} {:>10}",
        "nodes",
        "idle B/s",
        "idle max",
        "idle dgram/s",
        "changes/s",
        "changing B/s",
        "max",
        "dgram/s"
    );
    for r in results {
        let _ = writeln!(
            out,
            "{:>5} {:>11.0} {:>10.0} {:>12.1} {:>10.2} {:>12.0} {:>10.0} {:>10.1}",
            r.nodes,
            r.idle.mean_bps,
            r.idle.max_bps,
            r.idle.datagrams_per_s,
            r.changes_per_s,
            r.changing.mean_bps,
            r.changing.max_bps,
            r.changing.datagrams_per_s,
        );
    }
    for r in results {
        let _ = writeln!(out, "{}", r.wire);
    }

    let _ = writeln!(out, "design targets (measured, not asserted):");
    for r in results {
        let line = |what: String, value: Option<Duration>, target: Duration| {
            let verdict = match value {
                Some(v) if v <= target => "met",
                Some(_) => "NOT met",
                None => "not measured",
            };
            format!(
                "  {what:<60} {:>6} ms  (<= {} ms) {verdict}\n",
                ms(value),
                target.as_millis()
            )
        };
        out.push_str(&line(
            format!("change in the maps of all {} nodes, p99", r.nodes),
            percentile(&r.all, 99.0),
            TARGET_PROPAGATION,
        ));
        out.push_str(&line(
            format!("dead node withdrawn everywhere ({} nodes), max", r.nodes),
            r.withdrawn.iter().max().copied(),
            TARGET_WITHDRAWAL,
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ms_list(v: &[u64]) -> Vec<Duration> {
        v.iter().map(|&m| Duration::from_millis(m)).collect()
    }

    #[test]
    fn percentiles_by_nearest_rank() {
        let v = ms_list(&[50, 10, 40, 20, 30]);
        assert_eq!(percentile(&v, 50.0), Some(Duration::from_millis(30)));
        assert_eq!(percentile(&v, 99.0), Some(Duration::from_millis(50)));
        assert_eq!(percentile(&v, 0.0), Some(Duration::from_millis(10)));
        assert_eq!(percentile(&[], 50.0), None);
        let hundred: Vec<Duration> = (1..=100).map(Duration::from_millis).collect();
        assert_eq!(percentile(&hundred, 99.0), Some(Duration::from_millis(99)));
    }

    #[test]
    fn rate_is_per_node_per_second() {
        let c = |b: u64, d: u64| Counts {
            bytes_sent: b,
            bytes_received: b,
            sent: d,
            received: d,
        };
        let r = rate(&[c(0, 0), c(100, 1)], &[c(1000, 10), c(300, 3)], 2.0);
        // Node 1: 2000 B in 2 s; node 2: 400 B.
        assert_eq!(r.mean_bps, 600.0);
        assert_eq!(r.max_bps, 1000.0);
        assert_eq!(r.datagrams_per_s, 6.0);
    }

    #[test]
    fn table_shows_every_size_and_the_targets() {
        let args = Args {
            nodes: vec![4, 16],
            changes: 4,
            failures: 1,
            idle_secs: 10,
            interval: None,
            phi_threshold: None,
        };
        let m = |nodes, all: &[u64], withdrawn: &[u64]| Measured {
            nodes,
            all: ms_list(all),
            each: ms_list(all),
            withdrawn: ms_list(withdrawn),
            returned: ms_list(&[900]),
            idle: Rate {
                mean_bps: 1500.0,
                max_bps: 2000.0,
                datagrams_per_s: 20.0,
            },
            changing: Rate::default(),
            changes_per_s: 2.5,
            wire: "wire check".into(),
        };
        let text = render_results(
            &[
                m(4, &[200, 300, 250, 220], &[1500]),
                m(16, &[400, 1200, 500, 450], &[]),
            ],
            &args,
        );
        assert!(
            text.contains("    4       4      220      300      300       220       300"),
            "{text}"
        );
        assert!(
            text.contains("    4      1          1500          1500"),
            "{text}"
        );
        assert!(
            text.contains("    4        1500       2000         20.0"),
            "{text}"
        );
        assert!(
            text.contains("change in the maps of all 4 nodes, p99")
                && text.contains("300 ms  (<= 1000 ms) met"),
            "{text}"
        );
        assert!(text.contains("1200 ms  (<= 1000 ms) NOT met"), "{text}");
        assert!(
            text.contains("     - ms  (<= 5000 ms) not measured"),
            "{text}"
        );
    }
}
