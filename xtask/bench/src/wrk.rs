//! Running `wrk` (Debian's `wrk` 4.x) inside a node and reading its report.
//!
//! [`Load`] says how to drive it (threads, connections, duration, keep-alive or
//! `Connection: close`); [`Load::command`] builds the command line (always with `--latency`,
//! so the report has the percentile table). [`parse`] reads the text report wrk prints and
//! [`Report::check`] fails unless the traffic actually worked: no response at all, any non-2xx
//! response, or socket errors above 1 % of the requests are errors, never a slow result.
//!
//! wrk prints times with a unit (`110.00us`, `1.23ms`, `2.00s`, `1.00m`); they are parsed to
//! seconds. With `Connection: close` every request is one new TCP connection, so its
//! requests/s is the new connections/s.

use std::net::SocketAddr;
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use mesh_tests::Node;

use crate::check_interrupted;

/// How to drive wrk for one run.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Load {
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close`: one TCP connection per request.
    pub close: bool,
}

impl Load {
    /// New connections: 2 threads, 32 connections, `Connection: close`.
    pub fn new_connections(duration: Duration) -> Self {
        Self {
            threads: 2,
            connections: 32,
            duration,
            close: true,
        }
    }

    /// Request/response on one established connection: 1 thread, 1 keep-alive connection.
    pub fn request_response(duration: Duration) -> Self {
        Self {
            threads: 1,
            connections: 1,
            duration,
            close: false,
        }
    }

    /// The same load for another duration (warm-ups).
    pub fn with_duration(&self, duration: Duration) -> Self {
        Self {
            duration,
            ..self.clone()
        }
    }

    /// `wrk -tT -cC -dDs --timeout 2s --latency [-H 'Connection: close'] http://TARGET/`.
    pub fn command(&self, target: SocketAddr) -> Command {
        let mut cmd = Command::new("wrk");
        cmd.arg(format!("-t{}", self.threads))
            .arg(format!("-c{}", self.connections))
            .arg(format!("-d{}s", self.duration.as_secs().max(1)))
            .args(["--timeout", "2s", "--latency"]);
        if self.close {
            cmd.args(["-H", "Connection: close"]);
        }
        cmd.arg(format!("http://{target}/"));
        cmd
    }

    /// How long the run may take before it is killed: the duration plus a generous margin
    /// for start-up, the last requests' timeouts and the report.
    pub fn bound(&self) -> Duration {
        self.duration + Duration::from_secs(20)
    }

    /// `2 threads, 32 connections, Connection: close, 5s`, for messages.
    pub fn describe(&self) -> String {
        format!(
            "{} threads, {} connections, {}, {}s",
            self.threads,
            self.connections,
            if self.close {
                "Connection: close"
            } else {
                "keep-alive"
            },
            self.duration.as_secs()
        )
    }
}

#[cfg(test)]
impl Report {
    /// A clean report of 1,000 requests at `requests_per_s` (for the suites' table tests).
    pub fn with_rate(requests_per_s: f64) -> Self {
        Self {
            requests: 1000,
            elapsed_s: 1.0,
            requests_per_s,
            latency_avg_s: 1e-4,
            latency_p50_s: 1e-4,
            latency_p99_s: 2e-4,
            socket_errors: SocketErrors::default(),
            non_2xx: 0,
        }
    }
}

/// Runs wrk with `load` against `target` in `client`'s namespace and workload cgroup `wrk`,
/// failing unless it exits 0 with a report of working traffic.
pub fn run(client: &Node, load: &Load, target: SocketAddr) -> Result<Report> {
    check_interrupted()?;
    let proc = client.spawn("wrk", load.command(target))?;
    let out = proc.finish(load.bound())?.ok("wrk")?;
    let what = || format!("wrk against {target} ({})", load.describe());
    let report = parse(&out.stdout).with_context(what)?;
    report.check().with_context(|| {
        format!(
            "{}: the traffic did not work\n--- wrk output ---\n{}{}",
            what(),
            out.stdout,
            out.stderr
        )
    })?;
    Ok(report)
}

/// wrk's "Socket errors" line; all zero when wrk does not print it.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

/// What one wrk run reported.
#[derive(Debug, Clone, PartialEq)]
pub struct Report {
    /// Completed requests (`N requests in …`).
    pub requests: u64,
    /// How long the run took, in seconds.
    pub elapsed_s: f64,
    /// `Requests/sec:`.
    pub requests_per_s: f64,
    /// Mean latency in seconds (thread stats `Latency` avg).
    pub latency_avg_s: f64,
    /// Median latency in seconds (`--latency` table).
    pub latency_p50_s: f64,
    /// 99th percentile latency in seconds (`--latency` table).
    pub latency_p99_s: f64,
    pub socket_errors: SocketErrors,
    /// `Non-2xx or 3xx responses:`; 0 when wrk does not print it.
    pub non_2xx: u64,
}

impl Report {
    /// Fails unless the run really carried traffic: at least one request, no non-2xx
    /// response, and socket errors at most 1 % of the requests.
    pub fn check(&self) -> Result<()> {
        ensure!(self.requests > 0, "wrk completed no request at all");
        ensure!(
            self.non_2xx == 0,
            "{} of {} responses were not 2xx/3xx",
            self.non_2xx,
            self.requests
        );
        let errors = self.socket_errors.total();
        // errors / requests > 1 %, in integers.
        ensure!(
            errors * 100 <= self.requests,
            "{errors} socket errors ({:?}) for {} requests: more than 1 %",
            self.socket_errors,
            self.requests
        );
        Ok(())
    }
}

/// Parses wrk's text report. Needs the `requests in`, `Requests/sec:` and thread-stats
/// `Latency` lines, and the `99%` line of `--latency`.
pub fn parse(text: &str) -> Result<Report> {
    let mut requests = None;
    let mut elapsed_s = None;
    let mut requests_per_s = None;
    let mut latency_avg_s = None;
    let mut p50 = None;
    let mut p99 = None;
    let mut socket_errors = SocketErrors::default();
    let mut non_2xx = 0;
    for line in text.lines().map(str::trim) {
        let words: Vec<&str> = line.split_whitespace().collect();
        match words.as_slice() {
            // "80000 requests in 5.00s, 10.00MB read"
            [n, "requests", "in", t, ..] => {
                requests = Some(n.parse::<u64>().with_context(|| format!("in {line:?}"))?);
                elapsed_s = Some(seconds(t.trim_end_matches(','))?);
            }
            ["Requests/sec:", v] => {
                requests_per_s = Some(v.parse::<f64>().with_context(|| format!("in {line:?}"))?);
            }
            // Thread stats: "Latency  1.23ms  456.00us  10.00ms  75.00%"
            ["Latency", avg, ..] if avg.ends_with('s') => latency_avg_s = Some(seconds(avg)?),
            ["50%", v] => p50 = Some(seconds(v)?),
            ["99%", v] => p99 = Some(seconds(v)?),
            ["Socket", "errors:", rest @ ..] => socket_errors = parse_socket_errors(rest, line)?,
            ["Non-2xx", "or", "3xx", "responses:", n] => {
                non_2xx = n.parse().with_context(|| format!("in {line:?}"))?;
            }
            _ => {}
        }
    }
    let missing = |what: &str| format!("no {what} in wrk's output:\n{text}");
    Ok(Report {
        requests: requests.with_context(|| missing("`N requests in` line"))?,
        elapsed_s: elapsed_s.with_context(|| missing("run time"))?,
        requests_per_s: requests_per_s.with_context(|| missing("`Requests/sec:` line"))?,
        latency_avg_s: latency_avg_s.with_context(|| missing("`Latency` thread stats"))?,
        latency_p50_s: p50.with_context(|| missing("`50%` latency line (--latency)"))?,
        latency_p99_s: p99.with_context(|| missing("`99%` latency line (--latency)"))?,
        socket_errors,
        non_2xx,
    })
}

/// `connect 0, read 3, write 0, timeout 1` (already split on whitespace).
fn parse_socket_errors(words: &[&str], line: &str) -> Result<SocketErrors> {
    let mut e = SocketErrors::default();
    for pair in words.chunks(2) {
        let [kind, n] = pair else {
            bail!("unexpected socket errors line {line:?}")
        };
        let n: u64 = n
            .trim_end_matches(',')
            .parse()
            .with_context(|| format!("in {line:?}"))?;
        match *kind {
            "connect" => e.connect = n,
            "read" => e.read = n,
            "write" => e.write = n,
            "timeout" => e.timeout = n,
            other => bail!("unknown socket error kind {other:?} in {line:?}"),
        }
    }
    Ok(e)
}

/// wrk's time format: a number and `us`, `ms`, `s`, `m` or `h`.
fn seconds(s: &str) -> Result<f64> {
    let units = [
        ("us", 1e-6),
        ("ms", 1e-3),
        ("s", 1.0),
        ("m", 60.0),
        ("h", 3600.0),
    ];
    for (suffix, scale) in units {
        if let Some(n) = s.strip_suffix(suffix) {
            if let Ok(v) = n.parse::<f64>() {
                return Ok(v * scale);
            }
        }
    }
    bail!("{s:?} is not a wrk time (like 1.23ms)")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Recorded on a bench bed: `wrk -t2 -c32 -d2s --timeout 2s --latency -H 'Connection: close'`.
    const CLOSE: &str = "\
Running 2s test @ http://10.1.0.1:8080/
  2 threads and 32 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     3.34ms    1.20ms   8.63ms   75.65%
    Req/Sec     4.21k   304.47     4.95k    82.50%
  Latency Distribution
     50%    3.48ms
     75%    3.87ms
     90%    4.57ms
     99%    6.70ms
  16841 requests in 2.01s, 2.33MB read
Requests/sec:   8384.05
Transfer/sec:      1.16MB
";

    /// Recorded on the same bed: `wrk -t1 -c1 -d2s --timeout 2s --latency` (keep-alive).
    const KEEPALIVE: &str = "\
Running 2s test @ http://10.1.0.1:8080/
  1 threads and 1 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    77.22us  221.18us   4.30ms   97.99%
    Req/Sec    19.78k     4.38k   28.30k    71.43%
  Latency Distribution
     50%   42.00us
     75%   45.00us
     90%   96.00us
     99%    0.94ms
  41308 requests in 2.10s, 5.91MB read
Requests/sec:  19670.85
Transfer/sec:      2.81MB
";

    /// Recorded against an nginx answering `return 503`.
    const NON_2XX: &str = "\
Running 1s test @ http://127.0.0.1:18999/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency    58.14us  179.46us   4.23ms   99.29%
    Req/Sec    16.44k     0.98k   17.19k    90.91%
  Latency Distribution
     50%   49.00us
     75%   58.00us
     90%   73.00us
     99%  161.00us
  17968 requests in 1.10s, 2.98MB read
  Non-2xx or 3xx responses: 17968
Requests/sec:  16340.44
Transfer/sec:      2.71MB
";

    /// Recorded against an nginx closing every connection unanswered (`return 444`).
    const READ_ERRORS: &str = "\
Running 1s test @ http://127.0.0.1:18999/
  1 threads and 2 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     0.00us    0.00us   0.00us    -nan%
    Req/Sec     0.00      0.00     0.00      -nan%
  Latency Distribution
     50%    0.00us
     75%    0.00us
     90%    0.00us
     99%    0.00us
  0 requests in 1.10s, 0.00B read
  Socket errors: connect 0, read 18822, write 0, timeout 0
Requests/sec:      0.00
Transfer/sec:       0.00B
";

    fn close(a: f64, b: f64) -> bool {
        (a - b).abs() < 1e-9
    }

    #[test]
    fn parses_a_clean_new_connections_run() {
        let r = parse(CLOSE).unwrap();
        assert_eq!(r.requests, 16841);
        assert!(close(r.elapsed_s, 2.01));
        assert!(close(r.requests_per_s, 8384.05));
        assert!(close(r.latency_avg_s, 3.34e-3));
        assert!(close(r.latency_p50_s, 3.48e-3));
        assert!(close(r.latency_p99_s, 6.70e-3));
        assert_eq!(r.socket_errors, SocketErrors::default());
        assert_eq!(r.non_2xx, 0);
        r.check().unwrap();
    }

    #[test]
    fn parses_microseconds_of_a_keepalive_run() {
        let r = parse(KEEPALIVE).unwrap();
        assert_eq!(r.requests, 41308);
        assert!(close(r.elapsed_s, 2.1));
        assert!(close(r.requests_per_s, 19670.85));
        assert!(close(r.latency_avg_s, 77.22e-6));
        assert!(close(r.latency_p50_s, 42e-6));
        // wrk switches units within one table: `0.94ms` after `96.00us`.
        assert!(close(r.latency_p99_s, 0.94e-3));
        r.check().unwrap();
    }

    #[test]
    fn non_2xx_responses_fail_the_check() {
        let r = parse(NON_2XX).unwrap();
        assert_eq!(r.requests, 17968);
        assert_eq!(r.non_2xx, 17968);
        let err = r.check().unwrap_err().to_string();
        assert!(err.contains("17968 of 17968 responses"), "{err}");
    }

    #[test]
    fn socket_errors_fail_the_check_above_one_percent() {
        let r = parse(READ_ERRORS).unwrap();
        assert_eq!(r.requests, 0);
        assert_eq!(
            r.socket_errors,
            SocketErrors {
                connect: 0,
                read: 18822,
                write: 0,
                timeout: 0
            }
        );
        assert!(r.check().is_err());
        // The same line in an otherwise clean run: 0.5 % passes, over 1 % fails.
        let with = |line: &str| CLOSE.replace("Requests/sec:", &format!("{line}\nRequests/sec:"));
        let r = parse(&with(
            "  Socket errors: connect 84, read 0, write 0, timeout 0",
        ))
        .unwrap();
        assert_eq!(r.socket_errors.connect, 84);
        r.check().unwrap();
        let r = parse(&with(
            "  Socket errors: connect 0, read 100, write 1, timeout 70",
        ))
        .unwrap();
        assert_eq!(r.socket_errors.total(), 171);
        let err = r.check().unwrap_err().to_string();
        assert!(err.contains("171 socket errors"), "{err}");
    }

    #[test]
    fn rejects_truncated_output_and_bad_times() {
        assert!(parse("Running 5s test @ http://10.1.0.2:8080/\n").is_err());
        assert!(parse("unable to connect to 10.96.0.10:80 Connection refused\n").is_err());
        assert!(seconds("1.5").is_err());
        assert!(seconds("fast").is_err());
        assert!((seconds("2.00s").unwrap() - 2.0).abs() < 1e-12);
        assert!((seconds("1.00m").unwrap() - 60.0).abs() < 1e-12);
    }

    #[test]
    fn builds_the_command_line() {
        let target: SocketAddr = "10.96.0.10:80".parse().unwrap();
        let cmd = Load::new_connections(Duration::from_secs(5)).command(target);
        let args: Vec<String> = cmd
            .get_args()
            .map(|a| a.to_string_lossy().into_owned())
            .collect();
        assert_eq!(
            args,
            [
                "-t2",
                "-c32",
                "-d5s",
                "--timeout",
                "2s",
                "--latency",
                "-H",
                "Connection: close",
                "http://10.96.0.10:80/"
            ]
        );
        let cmd = Load::request_response(Duration::from_secs(3)).command(target);
        assert!(!cmd.get_args().any(|a| a == "-H"));
    }
}
