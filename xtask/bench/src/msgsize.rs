//! Message-size sweeps over one path: what decides whether the loopback sockmap
//! (`[mtls] loopback_sockmap`) is worth turning on, message size by message size.
//!
//! * [`sweep`]: `mesh-workload pingpong` per size (write N bytes, read the N bytes echoed
//!   back, repeated), one connection each: messages/s and p50/p99 round trip. The target must
//!   be a raw echo server (`mesh-workload echo-server`, see `Node::echo_server`).
//! * [`throughput_sweep`]: `iperf3 -c TARGET -l SIZE` per size, one stream: Gbit/s with
//!   writes of that size. The target must be an `iperf3 -s`.
//!
//! Both run in the client node's namespace and workload cgroup [`CLIENT_CGROUP`] (where an
//! agent's hooks apply), fail on any error the client reports, and check for an interrupt
//! between sizes. The caller sets up the paths (e.g. two client nodes, sockmap on and off) and
//! renders the comparison with [`render`].

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use mesh_tests::{workload::PingPong, Node};
use serde_json::Value;

use crate::check_interrupted;

/// The sizes issue 3 asks about: 64 B to 64 KB.
pub const SIZES: [usize; 6] = [64, 256, 1024, 4096, 16 * 1024, 64 * 1024];

/// The workload cgroup the clients run in.
pub const CLIENT_CGROUP: &str = "msgsize";

/// What one size measured over one path.
#[derive(Debug, Clone, PartialEq)]
pub struct SizeResult {
    /// Bytes per message (per write for throughput).
    pub size: usize,
    /// Ping-pong round trips completed.
    pub messages: u64,
    pub messages_per_sec: f64,
    /// Round trip, microseconds.
    pub p50_us: f64,
    pub p99_us: f64,
    /// Single-stream throughput with writes of `size`, when measured.
    pub throughput: Option<Throughput>,
}

/// What a single-stream iperf3 run gave.
#[derive(Debug, Clone, PartialEq)]
pub enum Throughput {
    /// Received Gbit/s.
    Gbit(f64),
    /// The run failed; iperf3's error. A result, not a bench failure: with the loopback
    /// sockmap a sender outrunning the agent gets `ENOMEM` from `write` (see the suite).
    Failed(String),
}

/// Ping-pong of each size in `sizes` for `duration` from `client` to the echo server at
/// `target`, with the `mesh-workload` at `workload_bin`.
pub fn sweep(
    workload_bin: &Path,
    client: &Node,
    target: SocketAddr,
    sizes: &[usize],
    duration: Duration,
) -> Result<Vec<SizeResult>> {
    sizes
        .iter()
        .map(|&size| {
            check_interrupted()?;
            let run = PingPong {
                size,
                duration,
                pace: Duration::ZERO,
            };
            let r = client.pingpong_with(workload_bin, CLIENT_CGROUP, target, &run)?;
            if !r.errors.is_empty() || r.messages == 0 {
                bail!(
                    "ping-pong of {size} B from {} to {target} failed: {r:?}",
                    client.name()
                );
            }
            Ok(SizeResult {
                size,
                messages: r.messages,
                messages_per_sec: r.messages_per_sec,
                p50_us: r.p50_us,
                p99_us: r.p99_us,
                throughput: None,
            })
        })
        .collect()
}

/// Adds to each of `results` the single-stream throughput of `iperf3 -l SIZE` for `duration`
/// from `client` to the iperf3 server at `target`. A run iperf3 itself reports as failed is
/// recorded as [`Throughput::Failed`]; anything else going wrong is an error.
pub fn throughput_sweep(
    client: &Node,
    target: SocketAddr,
    results: &mut [SizeResult],
    duration: Duration,
) -> Result<()> {
    for result in results {
        check_interrupted()?;
        let mut cmd = std::process::Command::new("iperf3");
        cmd.args(["-J", "-c", &target.ip().to_string(), "-p"])
            .arg(target.port().to_string())
            .arg("-l")
            .arg(result.size.to_string())
            .arg("-t")
            .arg(duration.as_secs().max(1).to_string());
        // iperf3 exits non-zero when the test fails, with the reason in its JSON.
        let out = client.run(CLIENT_CGROUP, cmd, duration + Duration::from_secs(20))?;
        result.throughput = Some(
            iperf3_result(&out.stdout)
                .with_context(|| format!("iperf3 -l {} to {target}", result.size))?,
        );
    }
    Ok(())
}

/// Received Gbit/s, or the failure, from `iperf3 -J` output.
fn iperf3_result(json: &str) -> Result<Throughput> {
    let v: Value =
        serde_json::from_str(json).with_context(|| format!("parsing iperf3's JSON: {json:?}"))?;
    if let Some(e) = v["error"].as_str() {
        return Ok(Throughput::Failed(e.to_string()));
    }
    v["end"]["sum_received"]["bits_per_second"]
        .as_f64()
        .map(|bps| Throughput::Gbit(bps / 1e9))
        .context("iperf3's JSON has no end.sum_received.bits_per_second")
}

/// A table of `paths` (name, results of the same sizes) side by side, with each path's
/// messages/s as a ratio to the first path's.
pub fn render(paths: &[(&str, &[SizeResult])]) -> String {
    let mut out = String::from("| size | path | msgs/s | ratio | p50 µs | p99 µs | Gbit/s |\n");
    out.push_str("| ---: | --- | ---: | ---: | ---: | ---: | ---: |\n");
    let Some((_, base)) = paths.first() else {
        return out;
    };
    for (i, b) in base.iter().enumerate() {
        for (name, results) in paths {
            let Some(r) = results.get(i) else { continue };
            let gbit = match &r.throughput {
                None => "-".to_string(),
                Some(Throughput::Gbit(g)) => format!("{g:.2}"),
                Some(Throughput::Failed(e)) => format!("failed: {e}"),
            };
            let _ = writeln!(
                out,
                "| {} | {name} | {:.0} | {:.2}x | {:.0} | {:.0} | {gbit} |",
                r.size,
                r.messages_per_sec,
                r.messages_per_sec / b.messages_per_sec.max(f64::MIN_POSITIVE),
                r.p50_us,
                r.p99_us,
            );
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn result(size: usize, rate: f64, throughput: Option<Throughput>) -> SizeResult {
        SizeResult {
            size,
            messages: 1,
            messages_per_sec: rate,
            p50_us: 10.0,
            p99_us: 20.0,
            throughput,
        }
    }

    #[test]
    fn table_has_a_row_per_size_and_path_with_ratios_to_the_first_path() {
        let off = [
            result(64, 1000.0, Some(Throughput::Gbit(1.5))),
            result(1024, 800.0, None),
        ];
        let on = [
            result(64, 1500.0, Some(Throughput::Gbit(2.0))),
            result(1024, 400.0, Some(Throughput::Failed("ENOMEM".into()))),
        ];
        let table = render(&[("sockmap off", &off), ("sockmap on", &on)]);
        assert!(
            table.contains("| 64 | sockmap on | 1500 | 1.50x | 10 | 20 | 2.00 |"),
            "{table}"
        );
        assert!(
            table.contains("| 1024 | sockmap on | 400 | 0.50x | 10 | 20 | failed: ENOMEM |"),
            "{table}"
        );
        assert_eq!(table.lines().count(), 2 + 4, "{table}");
    }

    #[test]
    fn iperf3_json_gives_received_gbit_or_its_error() {
        let ok = r#"{"end":{"sum_received":{"bits_per_second":2.5e9}}}"#;
        assert_eq!(iperf3_result(ok).unwrap(), Throughput::Gbit(2.5));
        let err = r#"{"error":"unable to connect to server"}"#;
        assert_eq!(
            iperf3_result(err).unwrap(),
            Throughput::Failed("unable to connect to server".into())
        );
        assert!(iperf3_result("not json").is_err());
    }
}
