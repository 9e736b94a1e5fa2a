//! `mesh-agent run`: the composition root of the daemon.
//!
//! Installs (or adopts) the data plane, brings the kernel to the config's desired state, then
//! follows the config file, serves the admin API and waits for a signal. On SIGTERM/SIGINT the
//! data plane stays in place (pinned) unless `--cleanup-on-exit` was given, so established and
//! new connections keep flowing while the agent restarts or upgrades.

use std::{
    collections::HashMap,
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, MutexGuard},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    admin::{self, AgentView},
    cgroup,
    config::Config,
    dataplane::{DataPlane, PinDir, Settings},
    desired::Desired,
    flows::{self, FlowLog, Names},
    kernel_addr,
    metrics::{self, BackendSample, MapUsage, Snapshot, SnapshotSource},
    mtls::Tunnel,
    reconcile::{self, KernelState},
    status::{self, EndpointStatus, NodeStatus, StatusReport},
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
    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Do not report flow events (`mesh-agent flows` then shows nothing).
    #[arg(long)]
    pub no_flow_events: bool,
    /// Log every kernel decision through aya-log at debug level (verbose).
    #[arg(long)]
    pub ebpf_debug_log: bool,
}

/// The agent's state, shared by the reload loop, the admin API and the metrics.
struct Agent {
    node: String,
    config_path: PathBuf,
    cgroup: PathBuf,
    started: Instant,
    dataplane: DataPlane,
    desired: Desired,
    kernel: KernelState,
    /// Kernel service id → name, for flows and metrics.
    service_names: HashMap<u32, String>,
    config_error: Option<String>,
    reloads_applied: u64,
    reloads_rejected: u64,
}

struct SharedAgent {
    state: Mutex<Agent>,
    flows: Arc<FlowLog>,
    /// The mTLS tunnel, when the config has an `[mtls]` section.
    tunnel: Option<Arc<Tunnel>>,
}

impl SharedAgent {
    fn lock(&self) -> MutexGuard<'_, Agent> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.state
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl AgentView for SharedAgent {
    fn status(&self) -> Result<StatusReport, String> {
        self.lock().status().map_err(|e| format!("{e:#}"))
    }

    fn endpoints(&self) -> Result<Vec<EndpointStatus>, String> {
        Ok(self.lock().endpoints())
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        let agent = self.lock();
        vec![NodeStatus {
            name: agent.node.clone(),
            role: "self".to_owned(),
            cgroup: agent.cgroup.display().to_string(),
            version: crate::VERSION.to_owned(),
            uptime_s: agent.started.elapsed().as_secs(),
        }]
    }

    fn flows(&self) -> &FlowLog {
        &self.flows
    }

    fn policies(&self) -> Vec<crate::mtls::policy::PolicyStatus> {
        self.tunnel
            .as_ref()
            .map(|t| t.policies())
            .unwrap_or_default()
    }

    fn certs(&self) -> Vec<crate::mtls::certs::CertStatus> {
        self.tunnel.as_ref().map(|t| t.certs()).unwrap_or_default()
    }
}

impl Names for SharedAgent {
    fn service_name(&self, id: u32) -> Option<String> {
        self.lock().service_names.get(&id).cloned()
    }
}

impl SnapshotSource for SharedAgent {
    fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.lock().snapshot();
        snapshot.flows_recorded = self.flows.recorded();
        snapshot.tunnel = self.tunnel.as_ref().map(|t| t.sample());
        snapshot
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    let config = Config::load(&options.config)?;
    let node = node_name(options.node.as_deref(), Some(&config))?;
    let cgroup_root = cgroup::unified_root()?;
    let cgroup = options
        .cgroup
        .clone()
        .unwrap_or_else(|| cgroup_root.clone());
    let pins = PinDir::new(&options.bpffs, &node);
    let settings = Settings {
        flow_events: !options.no_flow_events,
        debug_log: options.ebpf_debug_log,
        // Connects to mTLS services go to this port on loopback. Without a listener there
        // (no agent, or no [mtls] config) they are refused: strict flows fail closed.
        outbound_port: config
            .mtls
            .as_ref()
            .map_or(mesh_common::redirect::DEFAULT_OUTBOUND_PORT, |m| {
                m.outbound_port
            }),
    };
    let tunnel = config
        .mtls
        .as_ref()
        .map(|m| Tunnel::new(&m.tunnel(), cgroup_root.clone()))
        .transpose()?;
    let (dataplane, telemetry) = DataPlane::install(&cgroup, pins, settings)
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
        started: Instant::now(),
        dataplane,
        desired: Desired::default(),
        kernel,
        service_names: HashMap::new(),
        config_error: None,
        reloads_applied: 0,
        reloads_rejected: 0,
    };
    agent.apply(Desired::from_config(&config))?;
    let flow_log = Arc::new(FlowLog::default());
    if let Some(tunnel) = &tunnel {
        tunnel.update(
            &crate::config::mtls_services(&config.services),
            config.policies.clone(),
        );
    }
    let redirects = agent.dataplane.redirects();
    let agent = Arc::new(SharedAgent {
        state: Mutex::new(agent),
        flows: Arc::clone(&flow_log),
        tunnel,
    });

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(flows::follow_kernel(
        telemetry.events,
        flows::Decoder::new(cgroup_root),
        agent.clone(),
        flow_log,
    ));
    if let Some(logger) = telemetry.logger {
        tasks.spawn(forward_kernel_log(logger));
    }
    if let (Some(tunnel), Some(mtls)) = (&agent.tunnel, &config.mtls) {
        tunnel
            .spawn(
                &mtls.tunnel(),
                Arc::new(redirects),
                agent.clone(),
                &mut tasks,
            )
            .await?;
    }
    let listener = admin::bind(&options.admin_socket)?;
    tasks.spawn(admin::serve(listener, agent.clone()));
    let metrics = agent.clone();
    let metrics_addr = options.metrics_addr;
    tasks.spawn(async move {
        if let Err(error) = metrics::serve(metrics_addr, metrics).await {
            tracing::error!("{error}; metrics are off");
        }
    });
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
                let config = agent.lock().reload();
                if let (Some(tunnel), Some(config)) = (&agent.tunnel, config) {
                    tunnel.update(&crate::config::mtls_services(&config.services), config.policies);
                }
            }
        }
    }

    tasks.abort_all();
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

/// Copies the kernel's aya-log records into the agent's log as they arrive.
async fn forward_kernel_log(logger: aya_log::EbpfLogger<&'static dyn log::Log>) {
    let mut logger = match crate::dataplane::poll_readable(logger) {
        Ok(logger) => logger,
        Err(error) => {
            tracing::error!(%error, "cannot poll the eBPF debug log");
            return;
        }
    };
    loop {
        let Ok(mut ready) = logger.readable_mut().await else {
            return;
        };
        ready.get_inner_mut().flush();
        ready.clear_ready();
    }
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
        let result = reconcile::apply(&plan, &mut self.dataplane.maps, &mut self.kernel);
        // Whatever was applied is in the kernel now; name it for flows either way.
        self.service_names = self
            .kernel
            .services
            .iter()
            .filter_map(|(key, service)| {
                desired
                    .services
                    .get(key)
                    .or_else(|| self.desired.services.get(key))
                    .map(|d| (service.id, d.name.clone()))
            })
            .collect();
        let report = result?;
        let strict = desired
            .strict_backends()
            .filter_map(|(addr, key)| Some((addr, self.kernel.services.get(&key)?.id)))
            .collect();
        self.dataplane.maps.sync_strict(&strict)?;
        self.desired = desired;
        tracing::info!(
            %report,
            elapsed_us = started.elapsed().as_micros(),
            "config applied to the kernel"
        );
        Ok(())
    }

    /// Re-reads the config file; a bad file is rejected and the state in force stays.
    /// Returns the config now in force when it changed.
    fn reload(&mut self) -> Option<Config> {
        let result = Config::load(&self.config_path)
            .map_err(anyhow::Error::from)
            .and_then(|config| self.apply(Desired::from_config(&config)).map(|()| config));
        match result {
            Ok(config) => {
                self.reloads_applied += 1;
                self.config_error = None;
                Some(config)
            }
            Err(error) => {
                self.reloads_rejected += 1;
                tracing::error!(
                    "rejected config change, the previous config stays in force: {error:#}"
                );
                self.config_error = Some(format!("{error:#}"));
                None
            }
        }
    }

    fn status(&self) -> anyhow::Result<StatusReport> {
        let counters = self
            .dataplane
            .maps
            .counters()?
            .into_iter()
            .map(|(counter, value)| (counter.name().to_owned(), value))
            .collect();
        Ok(StatusReport {
            node: self.node.clone(),
            config: self.config_path.display().to_string(),
            cgroup: self.cgroup.display().to_string(),
            adopted: self.dataplane.adopted,
            config_error: self.config_error.clone(),
            services: status::services(&self.desired, &self.kernel),
            counters,
        })
    }

    /// The kernel backend id of each (service name, backend address) installed now.
    fn installed_backends(&self) -> impl Iterator<Item = (u32, &str, SocketAddr)> + '_ {
        self.kernel.backends.iter().filter_map(|(&id, backend)| {
            let name = self.service_names.get(&backend.service_id)?;
            let addr = kernel_addr::decode_backend(backend).ok()?;
            Some((id, name.as_str(), addr))
        })
    }

    fn endpoints(&self) -> Vec<EndpointStatus> {
        let installed: HashMap<(&str, SocketAddr), u32> = self
            .installed_backends()
            .map(|(id, name, addr)| ((name, addr), id))
            .collect();
        self.desired
            .services
            .values()
            .flat_map(|service| {
                service.backends.iter().map(|backend| {
                    let id = installed.get(&(service.name.as_str(), backend.addr));
                    let state = match (backend.weight, id) {
                        (0, _) => "drained",
                        (_, Some(_)) => "active",
                        (_, None) => "pending",
                    };
                    EndpointStatus {
                        service: service.name.clone(),
                        address: backend.addr.to_string(),
                        weight: backend.weight,
                        state: state.to_owned(),
                        connections: id.map_or(0, |&id| self.dataplane.maps.backend_count(id)),
                    }
                })
            })
            .collect()
    }

    fn snapshot(&self) -> Snapshot {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        Snapshot {
            counters: self.dataplane.maps.counters().unwrap_or_default(),
            backends: self
                .installed_backends()
                .map(|(id, service, addr)| BackendSample {
                    service: service.to_owned(),
                    backend: addr.to_string(),
                    connections: self.dataplane.maps.backend_count(id),
                })
                .collect(),
            maps: vec![
                MapUsage {
                    name: mesh_common::maps::SERVICES,
                    entries: count(self.kernel.services.len()),
                    capacity: u64::from(mesh_common::maps::SERVICES_MAX),
                },
                MapUsage {
                    name: mesh_common::maps::SLOTS,
                    entries: count(self.kernel.slots.len()),
                    capacity: u64::from(mesh_common::maps::SLOTS_MAX),
                },
                MapUsage {
                    name: mesh_common::maps::BACKENDS,
                    entries: count(self.kernel.backends.len()),
                    capacity: u64::from(mesh_common::maps::BACKENDS_MAX),
                },
            ],
            reloads_applied: self.reloads_applied,
            reloads_rejected: self.reloads_rejected,
            flows_recorded: 0,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            tunnel: None,
        }
    }
}

/// The admin socket path used when none is given.
pub fn default_admin_socket() -> &'static Path {
    Path::new("/run/mesh/agent.sock")
}
