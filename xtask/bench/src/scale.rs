//! The scale suite: what a large catalog costs one agent, at each of `--sizes` (services).
//!
//! A catalog of N services is N - 1 fillers ([`fillers::services`], 10 backends each, on no
//! host) and `target`, a `weighted` service with the same 10 backends, the one the changes
//! touch: the weight of its first backend goes 1 -> 2 -> 1 ..., which changes its slot table
//! in the kernel (a weight change of a `random` service changes nothing there). Each size runs
//! on a node of its own, so every start is cold (no pinned maps to adopt). Measured per size:
//!
//! 1. **Load**: the agent is started with the N-service config; from its spawn to the first
//!    record of `GET /v1/applied` with N services (the agent stamps it with its wall clock
//!    right after the map writes), and that record's own `elapsed_us` (plan + write).
//! 2. **Memory over reloads**: the agent's `VmRSS` and `VmHWM` (peak) after the start and
//!    after each of `--reloads` reloads, [`SETTLE`] after the reload's applied record; each
//!    reload rewrites the file (atomic rename) with `target`'s weight flipped, so each one
//!    changes the kernel. Reported as first / last / max, so growth shows, with the agent's
//!    apply time of the reloads.
//! 3. **Single changes**, `--changes` of each kind within `--budget-secs` per kind, each
//!    [`GAP`] after the previous one's applied record: `register` and `deregister` of one endpoint of `target` (the admin API's `POST
//!    /v1/endpoints/register`, as `mesh-agent register` sends it), and a config rewrite with
//!    `target`'s weight flipped (timed from the rename; writing the file comes before). Each
//!    is timed from the request (or rename) until the bench reads the applied record that
//!    follows it (the first with a `seq` above the last one before the change) from the
//!    stream; also reported: when the POST was answered, and the agent's own `elapsed_us`.
//!    Each change should produce exactly one apply; any other apply (before the one that
//!    follows a change, or within [`GAP`] after it) is counted in the row's `extra`.
//!
//! The admin API's and a tunneled flow's latency while a full 20,000-service reload runs are
//! measured by `cargo xtask bench reload`, not here.

use std::net::{Ipv4Addr, SocketAddr};
use std::time::{Duration, Instant, UNIX_EPOCH};

use anyhow::{bail, ensure, Context as _, Result};
use mesh_tests::{
    applied::{Applied, Follower},
    config::{render as render_config, Backend, Service},
    Agent, TestBed,
};

use crate::{admin, check_interrupted, fillers, in_bed, procstat, stats, Artifacts};

/// What `cargo xtask bench scale` takes.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Catalog sizes to measure, in services of 10 backends each, comma-separated; each runs
    /// on a fresh node (cold start).
    #[arg(long, value_delimiter = ',', default_values_t = [1_000, 20_000])]
    pub sizes: Vec<u32>,
    /// Reloads per size for the memory rows (each flips one backend's weight).
    #[arg(long, default_value_t = 20)]
    pub reloads: u32,
    /// Single changes of each kind per size (register + deregister pairs; config rewrites).
    #[arg(long, default_value_t = 50)]
    pub changes: u32,
    /// Time per kind of single change per size, seconds; when it runs out, fewer than
    /// `--changes` are made (the table's `n` says how many).
    #[arg(long, default_value_t = 30)]
    pub budget_secs: u64,
}

/// How long the agent may take from spawn to holding the whole catalog.
const LOAD_TIMEOUT: Duration = Duration::from_secs(120);
/// How long one change (reload, registration) may take to be applied.
const CHANGE_TIMEOUT: Duration = Duration::from_secs(60);
/// After an applied record, before the memory is read: what the agent does after the map
/// writes (its published views) is done by then.
const SETTLE: Duration = Duration::from_millis(300);
/// After each change's applied record, before the next change, so each starts from an agent
/// at rest (and a late second apply of the same change is seen and counted).
const GAP: Duration = Duration::from_millis(50);
/// The service the changes touch.
const TARGET: &str = "target";
const TARGET_VIP: &str = "10.96.0.20:80";
/// The endpoint registered and deregistered (on no host).
const REGISTERED: SocketAddr =
    SocketAddr::new(std::net::IpAddr::V4(Ipv4Addr::new(10, 201, 0, 1)), 8080);

pub fn run(artifacts: &Artifacts, args: &Args) -> Result<()> {
    ensure!(!args.sizes.is_empty(), "--sizes names no size");
    ensure!(
        args.sizes.iter().all(|&n| n >= 1),
        "a size is at least 1 service"
    );
    in_bed("scale", |bed| {
        for (i, &services) in args.sizes.iter().enumerate() {
            check_interrupted()?;
            let result = measure_size(bed, artifacts, args, i, services)
                .with_context(|| format!("{services} services"))?;
            println!("{}", render(&result, args));
        }
        Ok(())
    })
}

/// The catalog of `services` services: the fillers, then `target` with its first backend's
/// weight at `weight`.
fn catalog(services: u32, weight: u32) -> Vec<Service> {
    let mut all = fillers::services(services - 1);
    let backends = fillers::backends()
        .iter()
        .enumerate()
        .map(|(i, b)| Backend::weighted(b, if i == 0 { weight } else { 1 }))
        .collect();
    let vip: SocketAddr = TARGET_VIP.parse().expect("a socket address");
    all.push(
        Service::tcp(TARGET, vip, &[])
            .lb("weighted")
            .backends(backends),
    );
    all
}

/// Everything measured at one size.
#[derive(Debug, Clone, Default)]
struct SizeResult {
    services: u32,
    /// Backends in the kernel once loaded.
    backends: usize,
    /// Spawn to the applied record with all services, ms.
    load: f64,
    /// That record's own apply time, ms.
    load_apply: f64,
    /// (VmRSS, VmHWM) in MiB after the start, then after each reload.
    memory: Vec<(f64, f64)>,
    /// The agent's apply time of each reload, ms.
    reload_apply: Vec<f64>,
    register: Changes,
    deregister: Changes,
    config: Changes,
}

/// The single changes of one kind.
#[derive(Debug, Clone, Default)]
struct Changes {
    /// Request (or rename) to the applied record read, ms.
    to_applied: Vec<f64>,
    /// Request to its answer, ms (registrations only).
    answered: Vec<f64>,
    /// The agent's own apply time, ms.
    agent: Vec<f64>,
    /// Applies beyond one per change.
    extra_applies: u64,
}

/// One change, timed.
struct Timed {
    to_applied: f64,
    answered: f64,
    applied: Applied,
    extra_applies: u64,
}

impl Changes {
    fn push(&mut self, timed: &Timed, answered: bool) {
        self.to_applied.push(timed.to_applied);
        if answered {
            self.answered.push(timed.answered);
        }
        self.agent.push(timed.applied.elapsed_us as f64 / 1000.0);
        self.extra_applies += timed.extra_applies;
    }
}

fn measure_size(
    bed: &TestBed,
    artifacts: &Artifacts,
    args: &Args,
    index: usize,
    services: u32,
) -> Result<SizeResult> {
    let node = bed.add_node(&format!("scale{index}"))?;
    let texts = [1, 2].map(|weight| render_config(node.name(), &catalog(services, weight)));
    let mut result = SizeResult {
        services,
        ..SizeResult::default()
    };

    // 1. Cold start.
    let agent = Agent::start_with(&node, artifacts.agent.clone(), &texts[0])?;
    let spawned = agent.spawned_at().context("the agent runs")?;
    let pid = agent.pid().context("the agent runs")?;
    let mut applies = agent.follow_applied();
    let loaded = applies
        .wait(UNIX_EPOCH, LOAD_TIMEOUT, |a| {
            a.services == services as usize
        })
        .map_err(|e| with_status(&agent, e))
        .context("loading the catalog")?;
    result.load = loaded
        .at()
        .duration_since(spawned)
        .unwrap_or_default()
        .as_secs_f64()
        * 1000.0;
    result.load_apply = loaded.elapsed_us as f64 / 1000.0;
    result.backends = loaded.backends;
    std::thread::sleep(SETTLE);
    result.memory.push(memory(pid)?);

    // 2. Reloads; `weight` is the index of the text in force.
    let mut weight = 0;
    for reload in 0..args.reloads {
        check_interrupted()?;
        weight = 1 - weight;
        let staged = agent.stage_config(&texts[weight])?;
        let timed = timed_change(&mut applies, || staged.commit(), |_| true)
            .with_context(|| format!("reload {}", reload + 1))?;
        result
            .reload_apply
            .push(timed.applied.elapsed_us as f64 / 1000.0);
        std::thread::sleep(SETTLE);
        result.memory.push(memory(pid)?);
    }

    // 3a. Registrations: one endpoint of `target` in, then out.
    let query = format!(
        "service={TARGET}&address={}",
        REGISTERED.to_string().replace(':', "%3A")
    );
    let socket = agent.socket_path();
    let base = result.backends;
    let budget = Instant::now() + Duration::from_secs(args.budget_secs);
    for _ in 0..args.changes {
        check_interrupted()?;
        if Instant::now() >= budget {
            break;
        }
        for (path, backends, into) in [
            ("register", base + 1, &mut result.register),
            ("deregister", base, &mut result.deregister),
        ] {
            let post = || admin::request(socket, "POST", &format!("/v1/endpoints/{path}?{query}"));
            let timed = timed_change(
                &mut applies,
                || post().map(drop),
                |a| a.backends == backends,
            )
            .with_context(|| format!("{path} {REGISTERED}"))?;
            into.push(&timed, true);
        }
    }

    // 3b. Config rewrites of one service.
    let budget = Instant::now() + Duration::from_secs(args.budget_secs);
    for _ in 0..args.changes {
        check_interrupted()?;
        if Instant::now() >= budget {
            break;
        }
        weight = 1 - weight;
        let staged = agent.stage_config(&texts[weight])?;
        let timed = timed_change(&mut applies, || staged.commit(), |_| true)
            .context("a config change of one service")?;
        result.config.push(&timed, false);
    }
    Ok(result)
}

/// Runs `change` on a thread of its own and waits for the first applied record after it
/// (a `seq` above the last one read before it) that `expect` accepts; timed from just before
/// `change` to the moment the record is read, and to `change`'s return. Then waits [`GAP`]
/// and counts the applies that were not that first one (before it, or in the gap after it).
fn timed_change(
    applies: &mut Follower,
    change: impl FnOnce() -> Result<()> + Send,
    expect: impl Fn(&Applied) -> bool,
) -> Result<Timed> {
    applies.poll();
    let before = applies.last().map_or(0, |a| a.seq);
    let timed = std::thread::scope(|scope| {
        let started = Instant::now();
        let answered = scope.spawn(move || -> Result<f64> {
            change()?;
            Ok(started.elapsed().as_secs_f64() * 1000.0)
        });
        let waited = applies.wait(UNIX_EPOCH, CHANGE_TIMEOUT, |a| a.seq > before);
        let to_applied = started.elapsed().as_secs_f64() * 1000.0;
        let answered = answered.join().expect("the change's thread")?;
        let applied = waited?;
        if !expect(&applied) {
            bail!("the apply after the change does not show it: {applied:?}");
        }
        Ok(Timed {
            to_applied,
            answered,
            applied,
            extra_applies: applied.seq - before - 1,
        })
    })?;
    std::thread::sleep(GAP);
    applies.poll();
    let after = applies.last().map_or(0, |a| a.seq) - timed.applied.seq;
    Ok(Timed {
        extra_applies: timed.extra_applies + after,
        ..timed
    })
}

/// The agent's (VmRSS, VmHWM) in MiB.
fn memory(pid: i32) -> Result<(f64, f64)> {
    let mib = |bytes: u64| bytes as f64 / (1024.0 * 1024.0);
    let memory = procstat::memory(pid)?;
    Ok((mib(memory.rss), mib(memory.peak)))
}

/// `error`, with the agent's config error if it has one (a rejected config is the usual
/// reason a catalog never shows up).
fn with_status(agent: &Agent, error: anyhow::Error) -> anyhow::Error {
    match agent.status_json() {
        Ok(st) => match st["config_error"].as_str() {
            Some(e) => error.context(format!("the agent rejected the config: {e}")),
            None => error,
        },
        Err(status) => error.context(format!("(and its status failed: {status:#})")),
    }
}

/// First, last and largest of `values` (zeros when empty).
fn first_last_max(values: impl IntoIterator<Item = f64>) -> (f64, f64, f64) {
    let values: Vec<f64> = values.into_iter().collect();
    let first = values.first().copied().unwrap_or(0.0);
    let last = values.last().copied().unwrap_or(0.0);
    let max = values.iter().copied().fold(0.0, f64::max);
    (first, last, max)
}

/// p50 (the median), p99 (nearest rank: of 50 values or fewer, the largest) and max of
/// `values`; zeros when empty.
fn percentiles(values: &[f64]) -> (f64, f64, f64) {
    let mut sorted = values.to_vec();
    sorted.sort_by(f64::total_cmp);
    (
        stats::median(&sorted).unwrap_or(0.0),
        stats::quantile(&sorted, 0.99),
        sorted.last().copied().unwrap_or(0.0),
    )
}

fn render(r: &SizeResult, args: &Args) -> String {
    let mut out = format!(
        "scale suite: {} services ({} fillers x {} backends + `{TARGET}`, weighted), {} backends \
         in the kernel; targets at 20,000 services (issue 13): load <= 1 s, RSS <= 64 MB and \
         no growth over reloads, a change to the kernel p99 <= 10 ms\n\n",
        r.services,
        r.services - 1,
        fillers::BACKENDS,
        r.backends,
    );
    out.push_str(&format!(
        "load (cold start)        spawn -> applied record {:>9.1} ms   the agent's apply {:>9.1} ms\n\n",
        r.load, r.load_apply
    ));
    out.push_str(&format!(
        "memory, MiB              {:>9} {:>9} {:>9}   (after start, then after each of {} reloads, \
         each flipping one weight)\n",
        "first", "last", "max", args.reloads
    ));
    for (label, series) in [
        ("VmRSS", r.memory.iter().map(|m| m.0).collect::<Vec<_>>()),
        ("VmHWM (peak)", r.memory.iter().map(|m| m.1).collect()),
    ] {
        let (first, last, max) = first_last_max(series);
        out.push_str(&format!(
            "  {label:<22} {first:>9.1} {last:>9.1} {max:>9.1}\n"
        ));
    }
    let (p50, p99, max) = percentiles(&r.reload_apply);
    out.push_str(&format!(
        "reload, agent's apply ms {p50:>9.1} {p99:>9.1} {max:>9.1}   (p50 p99 max of {})\n\n",
        r.reload_apply.len()
    ));
    out.push_str(&format!(
        "single change, ms        {:>5} {:>9} {:>9} {:>9}   {:>13} {:>17} {:>6}\n",
        "n", "p50", "p99", "max", "answered p50", "agent's apply p50", "extra"
    ));
    for (label, c) in [
        ("register", &r.register),
        ("deregister", &r.deregister),
        ("config, one service", &r.config),
    ] {
        let (p50, p99, max) = percentiles(&c.to_applied);
        let answered = match c.answered.is_empty() {
            true => "-".to_owned(),
            false => format!("{:.2}", percentiles(&c.answered).0),
        };
        out.push_str(&format!(
            "  {label:<22} {:>5} {p50:>9.2} {p99:>9.2} {max:>9.2}   {answered:>13} {:>17.2} {:>6}\n",
            c.to_applied.len(),
            percentiles(&c.agent).0,
            c.extra_applies,
        ));
    }
    out.push_str(
        "  (request or rename -> the applied record that follows it, read from GET /v1/applied; \
         answered: the POST's answer; extra: applies beyond one per change)\n",
    );
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_catalog_has_the_size_and_one_weighted_target() {
        let small = catalog(3, 2);
        assert_eq!(small.len(), 3);
        let target = small.last().unwrap();
        assert_eq!(
            (target.name.as_str(), target.lb.as_str()),
            (TARGET, "weighted")
        );
        assert_eq!(target.backends[0].weight, Some(2));
        assert!(target.backends[1..].iter().all(|b| b.weight == Some(1)));
        assert_eq!(catalog(1, 1).len(), 1);
        let text = |w| render_config("n", &catalog(2, w));
        assert_ne!(text(1), text(2), "flipping the weight changes the file");
    }

    #[test]
    fn summaries_of_series() {
        assert_eq!(first_last_max([3.0, 9.0, 4.0]), (3.0, 4.0, 9.0));
        assert_eq!(first_last_max([]), (0.0, 0.0, 0.0));
        let fifty: Vec<f64> = (1..=50).rev().map(f64::from).collect();
        assert_eq!(percentiles(&fifty), (25.5, 50.0, 50.0));
        assert_eq!(percentiles(&[]), (0.0, 0.0, 0.0));
    }

    #[test]
    fn the_table_shows_every_row() {
        let changes = |ms: f64| Changes {
            to_applied: vec![ms, ms * 2.0],
            answered: vec![ms],
            agent: vec![ms / 2.0],
            extra_applies: 0,
        };
        let result = SizeResult {
            services: 1000,
            backends: 10,
            load: 123.4,
            load_apply: 56.7,
            memory: vec![(20.0, 30.0), (25.0, 40.0), (21.0, 40.0)],
            reload_apply: vec![5.0, 6.0],
            register: changes(1.0),
            deregister: changes(2.0),
            config: Changes {
                answered: Vec::new(),
                extra_applies: 1,
                ..changes(3.0)
            },
        };
        let args = Args {
            sizes: vec![1000],
            reloads: 2,
            changes: 2,
            budget_secs: 1,
        };
        let table = render(&result, &args);
        assert!(table.starts_with("scale suite: 1000 services (999 fillers x 10 backends"));
        assert!(
            table.contains("spawn -> applied record     123.4 ms"),
            "{table}"
        );
        let line = |label: &str| {
            table
                .lines()
                .find(|l| l.trim_start().starts_with(label))
                .unwrap_or_else(|| panic!("no {label} in {table}"))
                .split_whitespace()
                .collect::<Vec<_>>()
        };
        assert_eq!(line("VmRSS")[1..], ["20.0", "21.0", "25.0"]);
        assert_eq!(line("VmHWM")[2..], ["30.0", "40.0", "40.0"]);
        assert_eq!(
            line("register")[1..],
            ["2", "1.50", "2.00", "2.00", "1.00", "0.50", "0"]
        );
        assert_eq!(
            line("config, one service")[3..],
            ["2", "4.50", "6.00", "6.00", "-", "1.50", "1"]
        );
    }
}
