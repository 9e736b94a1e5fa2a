//! Shared set-up of the mTLS tests: a CA and certificates made with the real
//! `mesh-agent ca init` / `mesh-agent cert issue`, and the agent config of a node with an
//! `[mtls]` table and strict services.
//!
//! This module knows the CLI's certificate commands and the `[mtls]` config shape; the tests
//! decide the services, identities and policies.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::bed::{Node, TestBed};
use crate::config::{render, Service};
use crate::host;
use crate::process::{self, Capture};

/// The trust domain of every certificate the tests issue.
pub const TRUST_DOMAIN: &str = "mesh.test";

/// A certificate authority made by `mesh-agent ca init` in the bed's scratch directory.
pub struct Ca {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate and key made by `mesh-agent cert issue`.
pub struct Issued {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// Runs `mesh-agent ARGS…` (a CLI command that needs no agent) and fails unless it succeeds.
fn agent_cli(args: &[&str]) -> Result<()> {
    let mut cmd = Command::new(host::agent_bin()?);
    cmd.args(args);
    process::spawn("mesh-agent cli", cmd, None, None, Capture::Lines)?
        .finish(Duration::from_secs(10))?
        .ok(&format!("mesh-agent {}", args[..2].join(" ")))?;
    Ok(())
}

/// A path as the UTF-8 text the CLI and the config take.
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Ca {
    /// Makes a CA as `<name>.pem` / `<name>-key.pem` in the bed's scratch directory.
    pub fn init(bed: &TestBed, name: &str) -> Result<Ca> {
        let ca = Ca {
            cert: bed.tmpdir().join(format!("{name}.pem")),
            key: bed.tmpdir().join(format!("{name}-key.pem")),
        };
        agent_cli(&[
            "ca",
            "init",
            "--trust-domain",
            TRUST_DOMAIN,
            "--cert",
            path_str(&ca.cert),
            "--key",
            path_str(&ca.key),
        ])?;
        Ok(ca)
    }

    /// Issues a certificate for `spiffe_id`, written as `<stem>.pem` / `<stem>-key.pem`.
    pub fn issue(&self, bed: &TestBed, spiffe_id: &str, stem: &str) -> Result<Issued> {
        let out = Issued {
            cert: bed.tmpdir().join(format!("{stem}.pem")),
            key: bed.tmpdir().join(format!("{stem}-key.pem")),
        };
        agent_cli(&[
            "cert",
            "issue",
            "--ca-cert",
            path_str(&self.cert),
            "--ca-key",
            path_str(&self.key),
            "--spiffe-id",
            spiffe_id,
            "--cert",
            path_str(&out.cert),
            "--key",
            path_str(&out.key),
        ])?;
        Ok(out)
    }
}

/// The `[mtls]` part of one node's config.
pub struct MtlsTable<'a> {
    /// The CA bundle the node trusts.
    pub ca_bundle: &'a Path,
    /// The node's own certificate.
    pub node_cert: &'a Issued,
    /// (workload cgroup name on the node, SPIFFE ID, its certificate).
    pub workloads: &'a [(&'a str, &'a str, &'a Issued)],
    /// More `key = value` lines of the `[mtls]` table (may be empty).
    pub options: &'a str,
}

/// The agent config of `node`: `services`, the `[mtls]` table with the workload cgroups
/// mapped to their identities, and `policies` (TOML, may be empty).
pub fn config(
    node: &Node,
    services: &[Service],
    mtls: &MtlsTable<'_>,
    policies: &str,
) -> Result<String> {
    let mut text = render(node.name(), services);
    text.push_str(&format!(
        "\n[mtls]\ntrust_domain = {TRUST_DOMAIN:?}\nca_bundle = {:?}\ncert = {:?}\nkey = {:?}\n{}",
        path_str(mtls.ca_bundle),
        path_str(&mtls.node_cert.cert),
        path_str(&mtls.node_cert.key),
        mtls.options,
    ));
    for (workload, id, issued) in mtls.workloads {
        let cgroup = node.workload_cgroup(workload)?;
        text.push_str(&format!(
            "\n[[mtls.identities]]\ncgroup = {:?}\nspiffe_id = {id:?}\ncert = {:?}\nkey = {:?}\n",
            path_str(cgroup.path()),
            path_str(&issued.cert),
            path_str(&issued.key),
        ));
    }
    text.push_str(policies);
    Ok(text)
}
