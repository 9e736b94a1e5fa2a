//! The shipped systemd unit (`deploy/mesh-agent.service`), checked by systemd's own tools:
//! `systemd-analyze verify` accepts it with the built binary and its man page in place, and
//! `systemd-analyze security` rates its exposure 4.0 or lower.
//!
//! These machines have no systemd as PID 1, so the unit is not started here (the takeover and
//! drain it relies on are covered by `takeover.rs`); what is checked is what systemd would
//! refuse or flag, and the notify protocol the unit relies on, spoken to a socket of the test's
//! own standing in for systemd's. Needs root, the built binary and systemd-analyze (installed
//! by the set-up).

use std::path::Path;
use std::process::Command;
use std::time::Duration;

use std::os::unix::net::UnixDatagram;

use mesh_tests::config::render;
use mesh_tests::host::{agent_bin, workspace_root};
use mesh_tests::process::{self, Capture};
use mesh_tests::{OrFail, TestBed};

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

#[test]
fn the_agent_tells_systemd_it_is_ready_and_keeps_the_watchdog_fed() {
    let bed = TestBed::new("the_agent_tells_systemd_it_is_ready").or_fail();
    let node = bed.add_node("a").or_fail();
    let mut agent = node.start_agent(&render("a", &[])).or_fail();
    let scratch = Scratch::new("sd-notify");
    let socket_path = scratch.0.join("notify");
    let systemd = UnixDatagram::bind(&socket_path).or_fail();
    systemd
        .set_read_timeout(Some(Duration::from_secs(10)))
        .or_fail();
    agent.set_env("NOTIFY_SOCKET", &socket_path);
    // As systemd sets it for WatchdogSec=0.4: a ping every 200 ms is due.
    agent.set_env("WATCHDOG_USEC", "400000");
    agent.restart().or_fail();
    let pid = agent.pid().expect("the agent runs");

    let mut buf = [0u8; 256];
    let mut next = || {
        let n = systemd.recv(&mut buf).or_fail();
        String::from_utf8_lossy(&buf[..n]).into_owned()
    };
    assert_eq!(next(), format!("MAINPID={pid}\nREADY=1"));
    let started = std::time::Instant::now();
    for _ in 0..5 {
        assert_eq!(next(), "WATCHDOG=1");
    }
    // Five pings at half the timeout: about a second, never a burst.
    let took = started.elapsed();
    assert!(
        took >= Duration::from_millis(700),
        "5 pings in {took:?}: faster than every 200 ms"
    );
}
