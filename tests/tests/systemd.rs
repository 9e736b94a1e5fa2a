//! The shipped systemd unit (`deploy/mesh-agent.service`), checked by systemd's own tools:
//! `systemd-analyze verify` accepts it with the built binary and its man page in place, and
//! `systemd-analyze security` rates its exposure 4.0 or lower.
//!
//! These machines have no systemd as PID 1, so the unit is not started here (the takeover and
//! drain it relies on are covered by `takeover.rs`); what is checked is what systemd would
//! refuse or flag. Needs the built binary and systemd-analyze (installed by the set-up).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use mesh_tests::host::{agent_bin, workspace_root};
use mesh_tests::process::{self, Capture};
use mesh_tests::OrFail;

const T: Duration = Duration::from_secs(60);

/// A scratch directory removed on drop.
struct Scratch(std::path::PathBuf);

impl Scratch {
    fn new(test: &str) -> Scratch {
        let dir = std::env::temp_dir().join(format!("mesh-{test}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).or_fail();
        Scratch(dir)
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// The shipped unit with the built binary where it would be installed, in `dir`.
fn unit_in(dir: &Path) -> std::path::PathBuf {
    let shipped =
        std::fs::read_to_string(workspace_root().join("deploy/mesh-agent.service")).or_fail();
    let bin = agent_bin().or_fail();
    let unit = dir.join("mesh-agent.service");
    std::fs::write(
        &unit,
        shipped.replace("/usr/local/bin/mesh-agent", &bin.display().to_string()),
    )
    .or_fail();
    unit
}

fn analyze(args: &[&str], unit: &Path, manpath: &Path) -> process::Finished {
    let mut cmd = Command::new("systemd-analyze");
    cmd.args(args).arg(unit).env("MANPATH", manpath);
    process::spawn("systemd-analyze", cmd, None, None, Capture::Lines)
        .or_fail()
        .finish(T)
        .or_fail()
}

#[test]
fn the_unit_verifies_and_rates_4_or_lower() {
    let scratch = Scratch::new("systemd-unit");
    // The man page `Documentation=man:mesh-agent(1)` names, as `mesh-agent man` prints it.
    let man1 = scratch.0.join("man/man1");
    std::fs::create_dir_all(&man1).or_fail();
    let page = Command::new(agent_bin().or_fail())
        .arg("man")
        .output()
        .or_fail();
    assert!(page.status.success(), "mesh-agent man failed");
    std::fs::write(man1.join("mesh-agent.1"), &page.stdout).or_fail();
    let manpath = scratch.0.join("man");
    let unit = unit_in(&scratch.0);

    let verify = analyze(&["verify"], &unit, &manpath);
    let complaints: Vec<&str> = verify
        .stderr
        .lines()
        .filter(|l| l.contains("mesh-agent.service"))
        .collect();
    assert!(
        verify.status.success() && complaints.is_empty(),
        "systemd-analyze verify: {:?}\n{}",
        verify.status,
        verify.stderr
    );

    let security = analyze(&["security", "--offline=true"], &unit, &manpath);
    let overall = security
        .stdout
        .lines()
        .find(|l| l.contains("Overall exposure level for mesh-agent.service"))
        .unwrap_or_else(|| panic!("no overall rating:\n{}{}", security.stdout, security.stderr));
    let score: f64 = overall
        .split(':')
        .nth(1)
        .and_then(|rest| rest.split_whitespace().next())
        .and_then(|n| n.parse().ok())
        .unwrap_or_else(|| panic!("unreadable rating: {overall}"));
    assert!(
        score <= 4.0,
        "exposure {score} above 4.0:\n{}",
        security.stdout
    );
}
