//! Running an `iperf3` client (Debian's iperf3 3.x) inside a node and reading its JSON report.
//!
//! One stream (`-P 1`) for a fixed time; the figure is the receiver's bits per second, so what
//! a proxy buffered but never delivered does not count.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{Context, Result};
use serde_json::Value;

/// `iperf3 -c HOST -p PORT -t SECS -J` (one stream).
pub fn command(target: SocketAddr, duration: Duration) -> Command {
    let mut cmd = Command::new("iperf3");
    cmd.arg("-c")
        .arg(target.ip().to_string())
        .arg("-p")
        .arg(target.port().to_string())
        .arg("-t")
        .arg(duration.as_secs().max(1).to_string())
        .arg("-J");
    cmd
}

/// How long a run may take before it is killed.
pub fn bound(duration: Duration) -> Duration {
    duration + Duration::from_secs(20)
}

/// The receiver's throughput in bits per second from iperf3's JSON report.
pub fn parse_receiver_bps(json: &str) -> Result<f64> {
    let report: Value = serde_json::from_str(json).context("iperf3 printed no JSON report")?;
    if let Some(error) = report.get("error").and_then(Value::as_str) {
        anyhow::bail!("iperf3 failed: {error}");
    }
    report
        .pointer("/end/sum_received/bits_per_second")
        .and_then(Value::as_f64)
        .context("iperf3 report has no end.sum_received.bits_per_second")
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_the_receiver_side() {
        let json = r#"{"start":{},"end":{"sum_sent":{"bits_per_second":2.0e10},
            "sum_received":{"bits_per_second":1.5e10}}}"#;
        assert_eq!(parse_receiver_bps(json).unwrap(), 1.5e10);
        let failed = r#"{"start":{},"end":{},"error":"unable to connect to server"}"#;
        let e = parse_receiver_bps(failed).unwrap_err().to_string();
        assert!(e.contains("unable to connect"), "{e}");
        assert!(parse_receiver_bps("not json").is_err());
    }
}
