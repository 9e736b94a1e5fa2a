//! Driving the `mesh-agent` binary for one node.
//!
//! [`Agent::start`] writes the config to `<tmpdir>/<node>.toml` and runs
//!
//! ```text
//! mesh-agent run --config <tmpdir>/<node>.toml --cgroup <node cgroup>
//!     --bpffs /sys/fs/bpf/mesh-test-<prefix> --admin-socket <tmpdir>/<node>.sock
//!     --node <prefix>-<node> --state-dir <tmpdir>/state
//! ```
//!
//! inside the node's network namespace but in the test runner's own cgroup (the agent's
//! sockets must not go through the hooks it attaches). [`Agent::start_in`] runs it in one of
//! the node's workload cgroups instead, as on a host whose programs attach to the root cgroup:
//! the hooks then see the agent's sockets too (it marks them, so they are skipped), which the
//! loopback sockmap needs for the agent's end of the loopback hop. Its stdout and stderr are appended to
//! `<tmpdir>/<node>.agent.log`, printed to stderr if the test panics. Start and restart wait
//! (at most [`READY_TIMEOUT`]) until `mesh-agent status` answers. [`Agent::takeover`] starts a
//! successor with `--takeover` beside the running agent and hands back the predecessor, still
//! running (it drains), so a test can watch it exit.
//!
//! This module knows the agent's command line and the shape of `status --output json`; it does
//! not know how the agent works.

use std::ffi::OsString;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use serde_json::Value;

use crate::applied::Follower;
use crate::bed::Node;
use crate::cgroup::Cgroup;
use crate::host;
use crate::process::{self, Capture, Finished, Proc, Signal};

/// How long start and restart wait for the admin socket to answer.
pub const READY_TIMEOUT: Duration = Duration::from_secs(10);

/// How long one CLI call (`status`, `check`) may take.
const CLI_TIMEOUT: Duration = Duration::from_secs(5);

/// A `mesh-agent` serving one node; SIGKILLed on drop (and at bed teardown).
#[derive(Debug)]
pub struct Agent {
    node: Node,
    bin: PathBuf,
    config_path: PathBuf,
    socket: PathBuf,
    log_path: PathBuf,
    /// The cgroup the agent runs in; `None`: the test runner's.
    cgroup: Option<Cgroup>,
    /// More `run` arguments (e.g. `--drain-timeout 3s`), kept for restarts and takeovers.
    extra_args: Vec<OsString>,
    /// The file-creation mask the agent starts with (`None`: the test runner's).
    umask: Option<libc::mode_t>,
    /// More environment for the agent's next starts (e.g. systemd's `NOTIFY_SOCKET`).
    env: Vec<(OsString, OsString)>,
    proc: Option<Proc>,
}

impl Agent {
    /// Writes `config_toml` and starts the agent (found by [`host::agent_bin`]) for `node`,
    /// waiting until it is ready.
    pub fn start(node: &Node, config_toml: &str) -> Result<Self> {
        Self::start_with(node, host::agent_bin()?, config_toml)
    }

    /// [`Agent::start`] with an explicit binary (the harness self-test uses a stand-in).
    pub fn start_with(node: &Node, bin: PathBuf, config_toml: &str) -> Result<Self> {
        Self::launch_new(node, bin, None, config_toml, &[])
    }

    /// [`Agent::start`] with more `run` arguments (kept for restarts and takeovers).
    pub fn start_with_args(node: &Node, config_toml: &str, args: &[&str]) -> Result<Self> {
        Self::launch_new(node, host::agent_bin()?, None, config_toml, args)
    }

    /// [`Agent::start_with`], with the agent (and its restarts) in the node's workload cgroup
    /// `workload`, where the node's hooks see its sockets.
    pub fn start_in(node: &Node, bin: PathBuf, workload: &str, config_toml: &str) -> Result<Self> {
        let cgroup = node.workload_cgroup(workload)?;
        Self::launch_new(node, bin, Some(cgroup), config_toml, &[])
    }

    /// [`Agent::start_with`], with the agent (and its restarts) in `cgroup`, e.g. one outside
    /// the node's subtree whose `cpu.stat` then counts only the agent.
    pub fn start_in_cgroup(
        node: &Node,
        bin: PathBuf,
        cgroup: Cgroup,
        config_toml: &str,
    ) -> Result<Self> {
        Self::launch_new(node, bin, Some(cgroup), config_toml, &[])
    }

    fn launch_new(
        node: &Node,
        bin: PathBuf,
        cgroup: Option<Cgroup>,
        config_toml: &str,
        extra_args: &[&str],
    ) -> Result<Self> {
        let dir = node.tmpdir();
        let mut agent = Self {
            node: node.clone(),
            bin,
            config_path: dir.join(format!("{}.toml", node.name())),
            socket: dir.join(format!("{}.sock", node.name())),
            log_path: dir.join(format!("{}.agent.log", node.name())),
            cgroup,
            extra_args: extra_args.iter().map(OsString::from).collect(),
            umask: None,
            env: Vec::new(),
            proc: None,
        };
        agent.write_config(config_toml)?;
        agent.launch()?;
        Ok(agent)
    }

    fn run_args(&self) -> Vec<OsString> {
        vec![
            "run".into(),
            "--config".into(),
            self.config_path.clone().into(),
            "--cgroup".into(),
            self.node.cgroup().path().into(),
            "--bpffs".into(),
            self.node.bpffs_dir().into(),
            "--admin-socket".into(),
            self.socket.clone().into(),
            "--node".into(),
            self.node.full_name().into(),
            "--state-dir".into(),
            self.state_dir().into(),
        ]
        .into_iter()
        .chain(self.extra_args.iter().cloned())
        .collect()
    }

    fn launch(&mut self) -> Result<()> {
        self.proc = Some(self.spawn_agent(&[])?);
        self.wait_ready(READY_TIMEOUT)
    }

    /// Starts `mesh-agent run` with the agent's arguments and `more`, not waiting.
    fn spawn_agent(&self, more: &[&str]) -> Result<Proc> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.run_args()).args(more);
        if let Some(mask) = self.umask {
            use std::os::unix::process::CommandExt as _;
            // SAFETY: umask is async-signal-safe and touches only the child.
            unsafe {
                cmd.pre_exec(move || {
                    libc::umask(mask);
                    Ok(())
                });
            }
        }
        // Keep the logs readable and complete; the agent may honour either.
        cmd.env("RUST_BACKTRACE", "1");
        if std::env::var_os("RUST_LOG").is_none() {
            cmd.env("RUST_LOG", "info");
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        append(
            &self.log_path,
            &format!("=== mesh-tests: starting {cmd:?} ===\n"),
        )?;
        let label = format!("mesh-agent on {}", self.node.name());
        self.node.spawn_with(
            &label,
            cmd,
            self.cgroup.as_ref(),
            Capture::File(self.log_path.clone()),
        )
    }

    /// Upgrades the agent the way an operator does: starts `mesh-agent run --takeover` with the
    /// same arguments beside the running agent and waits (at most [`READY_TIMEOUT`]) until
    /// the successor serves: it is the node's recorded owner and the admin socket answers.
    /// From then on this `Agent` drives the successor; the predecessor is returned, still
    /// running while it drains (SIGKILLed when dropped).
    pub fn takeover(&mut self) -> Result<Proc> {
        let Some(old) = self.proc.take() else {
            bail!("agent on {} is not running", self.node.name())
        };
        let new = self.spawn_agent(&["--takeover"])?;
        let pid = new.pid();
        self.proc = Some(new);
        let owner = self
            .state_dir()
            .join(self.node.full_name())
            .join("agent.json");
        let deadline = Instant::now() + READY_TIMEOUT;
        loop {
            let recorded = std::fs::read(&owner)
                .ok()
                .and_then(|b| serde_json::from_slice::<Value>(&b).ok())
                .and_then(|v| v["pid"].as_i64());
            if recorded == Some(i64::from(pid)) {
                break;
            }
            if Instant::now() >= deadline || !self.is_running() {
                bail!(
                    "the successor on {} did not take over within {READY_TIMEOUT:?} (owner record: {recorded:?}, successor pid {pid})\n--- agent log ---\n{}",
                    self.node.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        self.wait_ready(deadline.saturating_duration_since(Instant::now()))?;
        Ok(old)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(p) = &self.proc {
                if let Some(st) = p.wait_timeout(Duration::ZERO)? {
                    bail!(
                        "mesh-agent on {} exited ({st}) before it was ready\n--- agent log ---\n{}",
                        self.node.name(),
                        self.log()
                    );
                }
            }
            let err = match self.status_json() {
                Ok(_) => return Ok(()),
                Err(e) => e,
            };
            if Instant::now() >= deadline {
                bail!(
                    "mesh-agent on {} not ready within {timeout:?}: {err:#}\n--- agent log ---\n{}",
                    self.node.name(),
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    /// Runs `mesh-agent ARGS…` (a CLI subcommand) in the test runner's namespace and waits
    /// for it, returning what it printed whatever its exit status.
    pub fn cli(&self, args: &[&std::ffi::OsStr]) -> Result<Finished> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(args);
        process::spawn("mesh-agent cli", cmd, None, None, Capture::Lines)?.finish(CLI_TIMEOUT)
    }

    /// `mesh-agent COMMAND --admin-socket S --output json` (a query of this agent), parsed.
    pub fn query_json(&self, command: &str) -> Result<Value> {
        let out = self
            .cli(&[
                command.as_ref(),
                "--admin-socket".as_ref(),
                self.socket.as_os_str(),
                "--output".as_ref(),
                "json".as_ref(),
            ])?
            .ok(&format!("mesh-agent {command}"))?;
        serde_json::from_str(&out.stdout)
            .with_context(|| format!("mesh-agent {command} printed non-JSON: {:?}", out.stdout))
    }

    /// `mesh-agent status --admin-socket S --output json`, parsed.
    pub fn status_json(&self) -> Result<Value> {
        self.query_json("status")
    }

    /// Polls the status (every 10 ms, up to `timeout`) until `pred` holds; returns it.
    pub fn wait_status(&self, timeout: Duration, pred: impl Fn(&Value) -> bool) -> Result<Value> {
        let deadline = Instant::now() + timeout;
        loop {
            let st = self.status_json();
            if let Ok(v) = &st {
                if pred(v) {
                    return st;
                }
            }
            if Instant::now() >= deadline {
                bail!(
                    "agent status on {} did not reach the expected state within {timeout:?}; last: {}\n--- agent log ---\n{}",
                    self.node.name(),
                    match st {
                        Ok(v) => v.to_string(),
                        Err(e) => format!("{e:#}"),
                    },
                    self.log()
                );
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// `counters.<name>` from the status.
    pub fn counter(&self, name: &str) -> Result<u64> {
        let st = self.status_json()?;
        st["counters"][name]
            .as_u64()
            .with_context(|| format!("status has no counters.{name}: {st}"))
    }

    /// The backend addresses of service `service` in a status document.
    pub fn backends_in(status: &Value, service: &str) -> Vec<String> {
        let mut v: Vec<String> = status["services"]
            .as_array()
            .into_iter()
            .flatten()
            .filter(|s| s["name"] == service)
            .flat_map(|s| s["backends"].as_array().cloned().unwrap_or_default())
            .filter_map(|b| b["address"].as_str().map(str::to_string))
            .collect();
        v.sort();
        v
    }

    /// Sends `sig`. For SIGKILL, SIGTERM and SIGINT, also waits (up to 5 s) for the agent to
    /// exit, so a following [`Agent::restart`] starts from a dead agent.
    pub fn kill(&mut self, sig: Signal) -> Result<()> {
        let Some(p) = &self.proc else {
            bail!("agent on {} is not running", self.node.name())
        };
        p.signal(sig)?;
        if matches!(sig, Signal::Kill | Signal::Term | Signal::Int) {
            let timeout = Duration::from_secs(5);
            if p.wait_timeout(timeout)?.is_none() {
                bail!(
                    "agent on {} still running {timeout:?} after {sig:?}\n--- agent log ---\n{}",
                    self.node.name(),
                    self.log()
                );
            }
        }
        Ok(())
    }

    /// Runs `mesh-agent run --takeover` with this agent's arguments but the config
    /// `config_toml` (written beside the agent's) and waits (bounded) for it to end: a
    /// successor that fails. The running agent stays this `Agent`'s.
    pub fn run_takeover_with(&self, config_toml: &str) -> Result<Finished> {
        let config = self.config_path.with_extension("next.toml");
        std::fs::write(&config, config_toml)
            .with_context(|| format!("writing {}", config.display()))?;
        let mut args = self.run_args();
        if let Some(i) = args.iter().position(|a| a == "--config") {
            args[i + 1] = config.into();
        }
        let mut cmd = Command::new(&self.bin);
        cmd.args(args).arg("--takeover");
        self.node
            .spawn_with(
                "failing successor",
                cmd,
                self.cgroup.as_ref(),
                Capture::Lines,
            )?
            .finish(READY_TIMEOUT * 2)
    }

    /// Sends `sig` and returns at once (a drain takes its time).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        match &self.proc {
            Some(p) => p.signal(sig),
            None => bail!("agent on {} is not running", self.node.name()),
        }
    }

    /// Waits up to `timeout` for the agent to exit; `None` if it still runs.
    pub fn wait_exit(&self, timeout: Duration) -> Result<Option<std::process::ExitStatus>> {
        match &self.proc {
            Some(p) => p.wait_timeout(timeout),
            None => bail!("agent on {} was not started", self.node.name()),
        }
    }

    /// Runs a second `mesh-agent run` with this agent's arguments (same node, pins, state and
    /// admin socket) in the node's namespace, and waits (bounded) for it to end.
    pub fn run_second(&self) -> Result<Finished> {
        let mut cmd = Command::new(&self.bin);
        cmd.args(self.run_args());
        self.node
            .spawn_with(
                "second mesh-agent",
                cmd,
                self.cgroup.as_ref(),
                Capture::Lines,
            )?
            .finish(READY_TIMEOUT)
    }

    /// Makes the agent's next starts (restarts, takeovers) run under file-creation mask `mask`.
    pub fn set_umask(&mut self, mask: libc::mode_t) {
        self.umask = Some(mask);
    }

    /// Sets `key=value` in the environment of the agent's next starts (restarts, takeovers).
    pub fn set_env(&mut self, key: &str, value: impl Into<OsString>) {
        self.env.push((key.into(), value.into()));
    }

    /// Whether the agent process is alive.
    pub fn is_running(&self) -> bool {
        self.proc.as_ref().is_some_and(Proc::is_running)
    }

    /// The agent's pid, if started.
    pub fn pid(&self) -> Option<i32> {
        self.proc.as_ref().map(Proc::pid)
    }

    /// When the running agent was spawned (wall clock, comparable with [`Applied::at`]), if
    /// started.
    ///
    /// [`Applied::at`]: crate::applied::Applied::at
    pub fn spawned_at(&self) -> Option<std::time::SystemTime> {
        self.proc.as_ref().map(Proc::spawned_at)
    }

    /// Starts the agent again with the same arguments (stopping it with SIGTERM first if it is
    /// still running) and waits until it is ready.
    pub fn restart(&mut self) -> Result<()> {
        if self.is_running() {
            self.kill(Signal::Term)?;
        }
        self.proc = None;
        self.launch()
    }

    /// Replaces the config file atomically (write a sibling, then rename over it), as an
    /// editor or a config manager would; a running agent sees one complete file.
    pub fn write_config(&self, config_toml: &str) -> Result<()> {
        self.stage_config(config_toml)?.commit()
    }

    /// The first half of [`Agent::write_config`]: writes the sibling file and returns the
    /// rename still to be done, so a bench can time a change from the moment the agent can
    /// see it (the rename) rather than from the start of a large write.
    pub fn stage_config(&self, config_toml: &str) -> Result<StagedConfig> {
        let tmp = self.config_path.with_extension("toml.tmp");
        std::fs::write(&tmp, config_toml).with_context(|| format!("writing {}", tmp.display()))?;
        Ok(StagedConfig {
            tmp,
            path: self.config_path.clone(),
        })
    }

    /// `mesh-agent check --config PATH`, whatever its exit status.
    pub fn check(&self, config: &Path) -> Result<Finished> {
        self.cli(&["check".as_ref(), "--config".as_ref(), config.as_os_str()])
    }

    /// Everything the agent has logged so far (all runs, separated by marker lines).
    pub fn log(&self) -> String {
        std::fs::read_to_string(&self.log_path)
            .unwrap_or_else(|e| format!("(cannot read {}: {e})", self.log_path.display()))
    }

    /// The config file the agent watches.
    pub fn config_path(&self) -> &Path {
        &self.config_path
    }

    /// The admin socket.
    pub fn socket_path(&self) -> &Path {
        &self.socket
    }

    /// The agent's state directory (`--state-dir`): `<tmpdir>/state`.
    pub fn state_dir(&self) -> PathBuf {
        self.node.tmpdir().join("state")
    }

    /// The log file.
    pub fn log_path(&self) -> &Path {
        &self.log_path
    }

    /// The node this agent serves.
    pub fn node(&self) -> &Node {
        &self.node
    }

    /// Follows the agent's writes of its kernel maps (`GET /v1/applied`), across restarts.
    pub fn follow_applied(&self) -> Follower {
        Follower::start(&self.socket)
    }
}

/// A config file written beside the agent's, not yet renamed over it ([`Agent::stage_config`]).
#[derive(Debug)]
#[must_use = "the agent sees nothing until commit"]
pub struct StagedConfig {
    tmp: PathBuf,
    path: PathBuf,
}

impl StagedConfig {
    /// Renames the staged file over the agent's config (atomically: the agent sees one whole
    /// file).
    pub fn commit(self) -> Result<()> {
        std::fs::rename(&self.tmp, &self.path)
            .with_context(|| format!("renaming to {}", self.path.display()))
    }
}

fn append(path: &Path, text: &str) -> Result<()> {
    use std::io::Write;
    let mut f = std::fs::File::options()
        .create(true)
        .append(true)
        .open(path)
        .with_context(|| format!("opening {}", path.display()))?;
    f.write_all(text.as_bytes())?;
    Ok(())
}

impl Drop for Agent {
    fn drop(&mut self) {
        if std::thread::panicking() {
            eprintln!(
                "--- mesh-agent log for node {} ({}) ---\n{}\n--- end of agent log ---",
                self.node.name(),
                self.log_path.display(),
                self.log()
            );
        }
        // Proc's drop SIGKILLs and reaps it.
    }
}
