//! `mesh-agent run`: the composition root of the daemon.
//!
//! Installs (or adopts) the data plane, brings the kernel to the config's desired state, then
//! follows the config file, serves the admin API and waits for a signal. On SIGTERM/SIGINT the
//! data plane stays in place (pinned) unless `--cleanup-on-exit` was given, so established and
//! new connections keep flowing while the agent restarts or upgrades.

use std::{
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use mesh_common::counters::Counter;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    admin::{self, StatusSource},
    cgroup,
    config::Config,
    dataplane::{DataPlane, PinDir},
    desired::Desired,
    reconcile::{self, KernelState},
    status::StatusReport,
    watch,
};

/// Everything `run` needs from the command line.
#[derive(clap::Args)]
pub struct RunOptions {
    /// The config file (TOML); reloaded whenever it changes.
    #[arg(long)]
    pub config: PathBuf,
    /// cgroup v2 directory to attach to [default: root of the unified hierarchy].
    #[arg(long)]
    pub cgroup: Option<PathBuf>,
    /// bpffs mount; pins go under <bpffs>/mesh/<node>/.
    #[arg(long, default_value = "/sys/fs/bpf")]
    pub bpffs: PathBuf,
    /// Unix socket of the admin API.
    #[arg(long, default_value_os_t = default_admin_socket().to_path_buf())]
    pub admin_socket: PathBuf,
    /// Node name [default: the config's [node] name, else the host name].
    #[arg(long)]
    pub node: Option<String>,
    /// Detach and unpin the data plane on exit (by default it keeps running).
    #[arg(long)]
    pub cleanup_on_exit: bool,
}

/// The agent's state, shared by the reload loop and the admin API.
struct Agent {
    node: String,
    config_path: PathBuf,
    cgroup: PathBuf,
    dataplane: DataPlane,
    desired: Desired,
    kernel: KernelState,
    config_error: Option<String>,
}

struct SharedAgent(Mutex<Agent>);

impl SharedAgent {
    fn lock(&self) -> MutexGuard<'_, Agent> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl StatusSource for SharedAgent {
    fn status(&self) -> Result<StatusReport, String> {
        self.lock().status().map_err(|e| format!("{e:#}"))
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&options.config)?;
    let node = node_name(options.node.as_deref(), Some(&config))?;
    let cgroup = match options.cgroup {
        Some(path) => path,
        None => cgroup::unified_root()?,
    };
    let pins = PinDir::new(&options.bpffs, &node);
    let dataplane = DataPlane::install(&cgroup, pins)
        .with_context(|| format!("installing the data plane on cgroup {}", cgroup.display()))?;
    let kernel = dataplane.maps.read_state()?;
    tracing::info!(
        node,
        cgroup = %cgroup.display(),
        adopted = dataplane.adopted,
        services = kernel.services.len(),
        "data plane installed"
    );
    let mut agent = Agent {
        node,
        config_path: options.config.clone(),
        cgroup,
        dataplane,
        desired: Desired::default(),
        kernel,
        config_error: None,
    };
    agent.apply(Desired::from_config(&config))?;
    let agent = Arc::new(SharedAgent(Mutex::new(agent)));

    let listener = admin::bind(&options.admin_socket)?;
    let admin_task = tokio::spawn(admin::serve(listener, agent.clone()));
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch::watch_file(&options.config, changes_tx)?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    tracing::info!(admin_socket = %options.admin_socket.display(), "ready");

    loop {
        tokio::select! {
            _ = terminate.recv() => break,
            _ = interrupt.recv() => break,
            Some(()) = changes.recv() => {
                // Editors write in bursts (truncate, write, rename); let the burst settle.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while changes.try_recv().is_ok() {}
                agent.lock().reload();
            }
        }
    }

    admin_task.abort();
    let _ = std::fs::remove_file(&options.admin_socket);
    let agent = agent.lock();
    if options.cleanup_on_exit {
        agent.dataplane.uninstall()?;
        tracing::info!("data plane detached and unpinned");
    } else {
        tracing::info!("exiting; the data plane stays pinned and keeps balancing");
    }
    Ok(())
}

/// `--node`, else `[node] name`, else the host name.
///
/// The name becomes a directory under bpffs, so it is checked like the config's.
pub fn node_name(flag: Option<&str>, config: Option<&Config>) -> anyhow::Result<String> {
    let configured = config.and_then(|c| c.node.name.as_deref());
    let name = match flag.or(configured) {
        Some(name) => name.to_owned(),
        None => host_name()?,
    };
    crate::config::check_node_name(&name)
        .map_err(|cause| anyhow::anyhow!("node name {name:?}: {cause}"))?;
    Ok(name)
}

/// This host's name, the default node name.
fn host_name() -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (pass --node)")?;
    Ok(host.trim().to_owned())
}

impl Agent {
    /// Brings the kernel to `desired`; on success it becomes the state in force.
    fn apply(&mut self, desired: Desired) -> anyhow::Result<()> {
        let started = Instant::now();
        let plan = reconcile::plan(&self.kernel, &desired);
        let report = reconcile::apply(&plan, &mut self.dataplane.maps, &mut self.kernel)?;
        self.desired = desired;
        tracing::info!(
            %report,
            elapsed_us = started.elapsed().as_micros(),
            "config applied to the kernel"
        );
        Ok(())
    }

    /// Re-reads the config file; a bad file is rejected and the state in force stays.
    fn reload(&mut self) {
        let result = Config::load(&self.config_path)
            .map_err(anyhow::Error::from)
            .and_then(|config| self.apply(Desired::from_config(&config)));
        match result {
            Ok(()) => self.config_error = None,
            Err(error) => {
                tracing::error!(
                    "rejected config change, the previous config stays in force: {error:#}"
                );
                self.config_error = Some(format!("{error:#}"));
            }
        }
    }

    fn status(&self) -> anyhow::Result<StatusReport> {
        let counters = self
            .dataplane
            .maps
            .counters()?
            .into_iter()
            .map(|(counter, value): (Counter, u64)| (counter.name().to_owned(), value))
            .collect();
        Ok(StatusReport {
            node: self.node.clone(),
            config: self.config_path.display().to_string(),
            cgroup: self.cgroup.display().to_string(),
            adopted: self.dataplane.adopted,
            config_error: self.config_error.clone(),
            services: crate::status::services(&self.desired, &self.kernel),
            counters,
        })
    }
}

/// The admin socket path used when none is given.
pub fn default_admin_socket() -> &'static Path {
    Path::new("/run/mesh/agent.sock")
}
