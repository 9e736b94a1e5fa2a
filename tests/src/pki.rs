//! Certificates for mTLS tests and benchmarks, made by the real CLI: a trust domain's CA
//! (`mesh-agent ca init`) and certificates it issues (`mesh-agent cert issue`), written into
//! the bed's scratch directory.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::Result;

use crate::bed::TestBed;
use crate::host;
use crate::process::{self, Capture};

/// A certificate authority made by `mesh-agent ca init`.
#[derive(Debug, Clone)]
pub struct Ca {
    pub cert: PathBuf,
    pub key: PathBuf,
}

/// A certificate and key made by `mesh-agent cert issue`.
#[derive(Debug, Clone)]
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

/// `p` as UTF-8 (the bed's paths are).
pub fn path_str(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

impl Ca {
    /// A new CA for `trust_domain`, written as `<name>.pem` / `<name>-key.pem`.
    pub fn init(bed: &TestBed, trust_domain: &str, name: &str) -> Result<Ca> {
        let ca = Ca {
            cert: bed.tmpdir().join(format!("{name}.pem")),
            key: bed.tmpdir().join(format!("{name}-key.pem")),
        };
        agent_cli(&[
            "ca",
            "init",
            "--trust-domain",
            trust_domain,
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
