//! The kube-proxy-style baseline: iptables DNAT in a node's network namespace (Debian's
//! iptables, nf_tables backend).
//!
//! The rules mimic kube-proxy's iptables mode for single-endpoint ClusterIP services:
//!
//! ```text
//! OUTPUT          -j MESHBENCH-SVC
//! MESHBENCH-SVC   -d VIP/32 -p tcp --dport P -j MESHBENCH-S<i>     one rule per service
//! MESHBENCH-S<i>  -j MESHBENCH-E<i>                                 (KUBE-SVC-…, 1 endpoint:
//!                                                                    no `-m statistic`)
//! MESHBENCH-E<i>  -p tcp -j DNAT --to-destination BACKEND          (KUBE-SEP-…)
//! ```
//!
//! The measured service is the **last** rule of `MESHBENCH-SVC`: a new connection to it walks
//! every other service's rule first (the worst case; kube-proxy's order is arbitrary). Only the
//! first packet of a connection traverses the nat table; conntrack carries the rest.
//!
//! [`Dnat::load`] writes the whole nat table with one `iptables-restore` run in the namespace
//! (10,000 services in about a second), checks that the measured service is the last rule, and
//! [`Dnat`]'s drop flushes and deletes the chains again. The programs are named by
//! [`Backend`] (`iptables-nft*` by default), so the backend is the one asked for whatever the
//! host's `update-alternatives` says.

use std::fmt::Write as _;
use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::path::Path;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use mesh_tests::process::Capture;
use mesh_tests::Node;

/// The chain `OUTPUT` jumps to, holding one rule per service.
pub const SERVICES_CHAIN: &str = "MESHBENCH-SVC";

/// Which iptables backend (both ship in Debian's `iptables`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Backend {
    /// nf_tables (`iptables-nft`, Debian's default): rules are nft bytecode, still one chain
    /// walked rule by rule.
    Nft,
    /// x_tables (`iptables-legacy`), what older kube-proxy hosts ran.
    Legacy,
}

impl Backend {
    /// `iptables-nft` or `iptables-legacy`.
    pub fn iptables(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft",
            Backend::Legacy => "iptables-legacy",
        }
    }

    /// `iptables-nft-restore` or `iptables-legacy-restore`.
    pub fn restore(self) -> &'static str {
        match self {
            Backend::Nft => "iptables-nft-restore",
            Backend::Legacy => "iptables-legacy-restore",
        }
    }
}

/// How long one iptables invocation may take.
const IPTABLES_TIMEOUT: Duration = Duration::from_secs(120);

/// One ClusterIP-like service with one endpoint.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct DnatService {
    pub vip: SocketAddrV4,
    pub backend: SocketAddrV4,
}

/// The `n`-th filler VIP (0-based): `10.100.x.y` on port 80, never `.0` or `.255`.
pub fn filler_vip(n: u32) -> Ipv4Addr {
    let x = u8::try_from(n / 254).expect("fewer than 65,024 filler services");
    let y = u8::try_from(n % 254 + 1).expect("1..=254");
    Ipv4Addr::new(10, 100, x, y)
}

/// `measured` last, after `total - 1` filler services on distinct `10.100.x.y:80` VIPs, each
/// pointing at `filler_backend`.
pub fn services(
    total: u32,
    measured: DnatService,
    filler_backend: SocketAddrV4,
) -> Vec<DnatService> {
    let mut v: Vec<DnatService> = (0..total.saturating_sub(1))
        .map(|n| DnatService {
            vip: SocketAddrV4::new(filler_vip(n), 80),
            backend: filler_backend,
        })
        .collect();
    v.push(measured);
    v
}

/// The `iptables-restore` input for `services`, in order. Replaces the whole nat table.
pub fn restore_input(services: &[DnatService]) -> String {
    let mut s = String::with_capacity(services.len() * 260);
    s.push_str("*nat\n:PREROUTING ACCEPT [0:0]\n:INPUT ACCEPT [0:0]\n:OUTPUT ACCEPT [0:0]\n:POSTROUTING ACCEPT [0:0]\n");
    let _ = writeln!(s, ":{SERVICES_CHAIN} - [0:0]");
    for i in 0..services.len() {
        let _ = writeln!(s, ":MESHBENCH-S{i} - [0:0]\n:MESHBENCH-E{i} - [0:0]");
    }
    let _ = writeln!(s, "-A OUTPUT -j {SERVICES_CHAIN}");
    for (i, svc) in services.iter().enumerate() {
        let _ = writeln!(
            s,
            "-A {SERVICES_CHAIN} -d {}/32 -p tcp -m tcp --dport {} -j MESHBENCH-S{i}",
            svc.vip.ip(),
            svc.vip.port()
        );
        let _ = writeln!(s, "-A MESHBENCH-S{i} -j MESHBENCH-E{i}");
        let _ = writeln!(
            s,
            "-A MESHBENCH-E{i} -p tcp -m tcp -j DNAT --to-destination {}",
            svc.backend
        );
    }
    s.push_str("COMMIT\n");
    s
}

/// DNAT rules loaded into a node's namespace; flushed on drop.
#[derive(Debug)]
pub struct Dnat {
    node: Node,
    backend: Backend,
    pub services: usize,
    /// How long `iptables-restore` took.
    pub load_time: Duration,
}

impl Dnat {
    /// Replaces the nat table of `node`'s namespace with the rules for `services`, through
    /// `backend` (the rules file goes to `dir`).
    pub fn load(
        node: &Node,
        backend: Backend,
        dir: &Path,
        services: &[DnatService],
    ) -> Result<Self> {
        let path = dir.join(format!("iptables-{}.rules", services.len()));
        std::fs::write(&path, restore_input(services))
            .with_context(|| format!("writing {}", path.display()))?;
        let started = Instant::now();
        let mut cmd = Command::new(backend.restore());
        cmd.arg(&path);
        run(node, cmd)?;
        let dnat = Self {
            node: node.clone(),
            backend,
            services: services.len(),
            load_time: started.elapsed(),
        };
        // Check that the chain holds every service, the measured one last.
        let mut cmd = Command::new(backend.iptables());
        cmd.args(["-t", "nat", "-S", SERVICES_CHAIN]);
        let listed = run(node, cmd)?;
        let rules: Vec<&str> = listed.lines().filter(|l| l.starts_with("-A")).collect();
        anyhow::ensure!(
            rules.len() == services.len(),
            "{SERVICES_CHAIN} has {} rules after loading {}",
            rules.len(),
            services.len()
        );
        if let (Some(last), Some(measured)) = (rules.last(), services.last()) {
            let dest = format!("-d {}/32 ", measured.vip.ip());
            let port = format!("--dport {} ", measured.vip.port());
            anyhow::ensure!(
                last.contains(&dest) && last.contains(&port),
                "the last rule of {SERVICES_CHAIN} is {last:?}, not the measured service {}",
                measured.vip
            );
        }
        Ok(dnat)
    }

    /// Flushes the nat table and deletes the bench's chains.
    pub fn remove(&self) -> Result<()> {
        for args in [["-t", "nat", "-F"], ["-t", "nat", "-X"]] {
            let mut cmd = Command::new(self.backend.iptables());
            cmd.args(args);
            run(&self.node, cmd)?;
        }
        Ok(())
    }
}

impl Drop for Dnat {
    fn drop(&mut self) {
        if let Err(e) = self.remove() {
            eprintln!("bench: removing the iptables rules: {e:#}");
        }
    }
}

/// Runs `cmd` in `node`'s namespace (not in its cgroup), bounded, returning its stdout.
fn run(node: &Node, cmd: Command) -> Result<String> {
    let label = command_line(&cmd);
    let out = node
        .spawn_with(&label, cmd, None, Capture::Lines)?
        .finish(IPTABLES_TIMEOUT)?
        .ok(&label)?;
    Ok(out.stdout)
}

fn command_line(cmd: &Command) -> String {
    let mut parts = vec![cmd.get_program().to_string_lossy().into_owned()];
    parts.extend(cmd.get_args().map(|a| a.to_string_lossy().into_owned()));
    parts.join(" ")
}

/// The IPv4 socket address `addr` is (the baseline's rules are IPv4 only).
pub fn v4(addr: SocketAddr) -> Result<SocketAddrV4> {
    match addr {
        SocketAddr::V4(a) => Ok(a),
        SocketAddr::V6(a) => anyhow::bail!("the iptables baseline is IPv4 only, got {a}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sa(s: &str) -> SocketAddrV4 {
        s.parse().unwrap()
    }

    #[test]
    fn measured_service_is_last_and_fillers_are_distinct() {
        let measured = DnatService {
            vip: sa("10.96.0.10:80"),
            backend: sa("10.1.0.2:8080"),
        };
        let v = services(10_000, measured, sa("10.1.0.2:8080"));
        assert_eq!(v.len(), 10_000);
        assert_eq!(*v.last().unwrap(), measured);
        let vips: std::collections::HashSet<_> = v.iter().map(|s| s.vip).collect();
        assert_eq!(vips.len(), 10_000);
        assert!(v
            .iter()
            .all(|s| s.vip.ip().octets()[3] != 0 && s.vip.ip().octets()[3] != 255));
        assert_eq!(services(1, measured, sa("10.1.0.2:8080")), [measured]);
    }

    #[test]
    fn renders_kube_proxy_like_chains() {
        let v = [
            DnatService {
                vip: sa("10.100.0.1:80"),
                backend: sa("10.1.0.2:8080"),
            },
            DnatService {
                vip: sa("10.96.0.10:80"),
                backend: sa("10.1.0.2:8080"),
            },
        ];
        let text = restore_input(&v);
        assert!(text.starts_with("*nat\n"));
        assert!(text.ends_with("COMMIT\n"));
        let rules: Vec<&str> = text.lines().filter(|l| l.starts_with("-A")).collect();
        assert_eq!(
            rules,
            [
                "-A OUTPUT -j MESHBENCH-SVC",
                "-A MESHBENCH-SVC -d 10.100.0.1/32 -p tcp -m tcp --dport 80 -j MESHBENCH-S0",
                "-A MESHBENCH-S0 -j MESHBENCH-E0",
                "-A MESHBENCH-E0 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080",
                "-A MESHBENCH-SVC -d 10.96.0.10/32 -p tcp -m tcp --dport 80 -j MESHBENCH-S1",
                "-A MESHBENCH-S1 -j MESHBENCH-E1",
                "-A MESHBENCH-E1 -p tcp -m tcp -j DNAT --to-destination 10.1.0.2:8080",
            ]
        );
        // Every chain jumped to is declared.
        for i in 0..2 {
            assert!(text.contains(&format!(":MESHBENCH-S{i} - [0:0]")));
            assert!(text.contains(&format!(":MESHBENCH-E{i} - [0:0]")));
        }
    }
}
