//! `mesh-agent run`: the composition root of the daemon.
//!
//! Installs (or adopts) the data plane, brings the kernel to the config's desired state, then
//! follows the config file, serves the admin API and waits for a signal. On SIGTERM/SIGINT the
//! data plane stays in place (pinned) unless `--cleanup-on-exit` was given, so established and
//! new connections keep flowing while the agent restarts or upgrades.
//!
//! With `--takeover` it replaces the agent running on the admin socket ([`crate::takeover`]);
//! a replaced agent, or one stopped by a signal, drains its tunneled flows ([`drain`]) before
//! it exits.

mod drain;
mod listening;

use std::{
    collections::{HashMap, HashSet},
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
    admin::AgentView,
    catalog::{Conflict, Endpoint, Sources},
    cgroup,
    config::{gossip::GossipConfig, Config},
    dataplane::{DataPlane, PinDir, Settings},
    desired::Desired,
    flows::{self, FlowLog, Names},
    gossip::{self, Member},
    health::{
        self,
        checker::{Checker, ProbeReport},
        Health,
    },
    kernel_addr,
    metrics::{self, BackendSample, MapUsage, Snapshot, SnapshotSource},
    mtls::Tunnel,
    node_lock::NodeLock,
    peers::{Peers, RestoreGrace},
    reconcile::{self, KernelState},
    registry::Registry,
    sockets::{Sockets, Wanted},
    status::{self, EndpointStatus, NodeStatus, StatusReport},
    takeover::{self, Kind, Successor},
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
    /// Directory of the agent's state; registrations are kept in
    /// <state-dir>/<node>/registrations.json.
    #[arg(long, default_value = "/var/lib/mesh")]
    pub state_dir: PathBuf,
    /// Address of the Prometheus endpoint (`GET /metrics`).
    #[arg(long, default_value = "0.0.0.0:15020")]
    pub metrics_addr: SocketAddr,
    /// Do not report flow events (`mesh-agent flows` then shows nothing).
    #[arg(long)]
    pub no_flow_events: bool,
    /// Log every kernel decision through aya-log at debug level (verbose).
    #[arg(long)]
    pub ebpf_debug_log: bool,
    /// Replace the agent running on --admin-socket without a gap: take its listening sockets
    /// and node lock; it then drains and exits. Starts as usual when no agent answers there.
    #[arg(long)]
    pub takeover: bool,
    /// How long a replaced or stopped (SIGTERM) agent keeps relaying its open tunneled flows.
    #[arg(long, default_value = "300s", value_parser = humantime::parse_duration)]
    pub drain_timeout: Duration,
}

/// The agent's state, shared by the reload loop, the admin API and the metrics.
struct Agent {
    node: String,
    config_path: PathBuf,
    cgroup: PathBuf,
    started: Instant,
    dataplane: DataPlane,
    /// The config in force.
    config: Config,
    /// The services as the config (and later the catalog) gives them, before health.
    catalog: Desired,
    /// What the kernel was last brought to: the catalog with health applied.
    desired: Desired,
    health: Health,
    checker: Checker,
    kernel: KernelState,
    /// Kernel service id → name, for flows and metrics.
    service_names: HashMap<u32, String>,
    config_error: Option<String>,
    reloads_applied: u64,
    reloads_rejected: u64,
    /// What the catalog is made of: config, registrations, live peers.
    sources: Sources,
    /// Where `sources.registered` is kept across restarts.
    registry: Registry,
    /// The conflicts of the catalog in force.
    conflicts: Vec<Conflict>,
    /// The `[gossip]` table the agent started with (a change needs a restart).
    gossip_config: Option<GossipConfig>,
    /// Every other gossip member, alive or dead.
    members: Arc<Vec<Member>>,
    /// The peers' announcements in force (kept across restarts).
    peers: Peers,
    gossip_stats: Option<Arc<gossip::Stats>>,
    /// The mTLS tunnel, when the config has an `[mtls]` section; it follows the catalog's
    /// strict services and the config's policies.
    tunnel: Option<Arc<Tunnel>>,
}

struct SharedAgent {
    state: Mutex<Agent>,
    flows: Arc<FlowLog>,
    /// Asks the main loop to announce this node's endpoints again.
    announce: mpsc::UnboundedSender<()>,
    /// Asks the main loop to hand the sockets over (one takeover at a time).
    takeovers: mpsc::Sender<Successor>,
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
        let this = NodeStatus {
            name: agent.node.clone(),
            role: "self".to_owned(),
            cgroup: agent.cgroup.display().to_string(),
            version: crate::VERSION.to_owned(),
            uptime_s: agent.started.elapsed().as_secs(),
            address: agent
                .gossip_config
                .as_ref()
                .map(|g| g.advertise.to_string())
                .unwrap_or_default(),
            state: "alive".to_owned(),
            endpoints: gossip::endpoint_names(&agent.sources.announcement()),
            rejected: Vec::new(),
        };
        // Peers kept from the state file that gossip has not delivered yet.
        let restored = agent
            .peers
            .restored()
            .filter(|name| !agent.members.iter().any(|m| m.name == *name))
            .map(|name| NodeStatus {
                name: name.to_owned(),
                role: "peer".to_owned(),
                state: "restored".to_owned(),
                ..NodeStatus::default()
            });
        std::iter::once(this)
            .chain(agent.members.iter().map(gossip::node_status))
            .chain(restored)
            .collect()
    }

    fn flows(&self) -> &FlowLog {
        &self.flows
    }

    fn register(&self, endpoint: Endpoint) -> Result<bool, String> {
        let mut agent = self.lock();
        let catalog = agent.sources.catalog();
        crate::catalog::check_registration(&catalog, &endpoint)?;
        let changed = agent.change_registrations(|r| r.register(endpoint))?;
        drop(agent);
        if changed {
            let _ = self.announce.send(());
        }
        Ok(changed)
    }

    fn deregister(&self, service: &str, address: SocketAddr) -> Result<bool, String> {
        let changed = self
            .lock()
            .change_registrations(|r| Ok(r.deregister(service, address)))?;
        if changed {
            let _ = self.announce.send(());
        }
        Ok(changed)
    }

    fn policies(&self) -> Vec<crate::mtls::policy::PolicyStatus> {
        self.lock()
            .tunnel
            .as_ref()
            .map(|t| t.policies())
            .unwrap_or_default()
    }

    fn certs(&self) -> Vec<crate::mtls::certs::CertStatus> {
        self.lock()
            .tunnel
            .as_ref()
            .map(|t| t.certs())
            .unwrap_or_default()
    }

    fn take_over(&self, successor: Successor) -> Result<(), String> {
        self.takeovers
            .try_send(successor)
            .map_err(|_| "a takeover is already under way".to_owned())
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
        snapshot
    }
}

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    crate::fdlimit::raise_and_log();
    let config = Config::load(&options.config)?;
    let node = node_name(options.node.as_deref(), Some(&config))?;
    let node_for_agent = node.clone();
    let cgroup_root = cgroup::unified_root()?;
    let cgroup = options
        .cgroup
        .clone()
        .unwrap_or_else(|| cgroup_root.clone());
    let pins = PinDir::new(&options.bpffs, &node);
    // The credentials are only read: a bad file fails here, before a takeover stops the
    // running agent.
    let tunnel = config
        .mtls
        .as_ref()
        .map(|m| Tunnel::new(&m.tunnel(), cgroup_root.clone()))
        .transpose()?;
    // Before any map, link or socket is touched: one agent per node (a successor is handed
    // the predecessor's lock).
    let owner_file = options.state_dir.join(&node).join("agent.json");
    let mut inherited = match options.takeover {
        true => takeover::request(&options.admin_socket).await?,
        false => None,
    };
    let lock = match inherited
        .as_mut()
        .and_then(|i| i.take(Kind::Lock, |_| true))
    {
        Some(fd) => NodeLock::adopt(fd, &owner_file, &options.admin_socket),
        None => {
            if options.takeover {
                tracing::info!(admin_socket = %options.admin_socket.display(),
                    "--takeover: no agent answers on the admin socket; starting as usual");
            }
            NodeLock::acquire(pins.root(), &owner_file, &node, &options.admin_socket)?
        }
    };
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
        loopback_sockmap: config.mtls.as_ref().is_some_and(|m| m.loopback_sockmap),
    };
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
    let (probes_tx, mut probes) = mpsc::channel::<ProbeReport>(1024);
    let registry = Registry::new(&options.state_dir, &node);
    let peers = match &config.gossip {
        Some(gossip) => Peers::restore(
            &options.state_dir,
            &node,
            RestoreGrace::for_interval(gossip.interval),
        ),
        None => Peers::none(),
    };
    let mut agent = Agent {
        node: node_for_agent,
        config_path: options.config.clone(),
        cgroup,
        started: Instant::now(),
        dataplane,
        config: config.clone(),
        catalog: Desired::default(),
        desired: Desired::default(),
        health: Health::default(),
        checker: Checker::new(probes_tx, tunnel.clone()),
        kernel,
        service_names: HashMap::new(),
        config_error: None,
        reloads_applied: 0,
        reloads_rejected: 0,
        sources: Sources {
            node: node.clone(),
            config: config.services.clone(),
            registered: registry.restore(),
            peers: peers.announcements(),
        },
        registry,
        conflicts: Vec::new(),
        gossip_config: config.gossip.clone(),
        members: Arc::default(),
        peers,
        gossip_stats: None,
        tunnel: tunnel.clone(),
    };
    agent.recompute()?;
    let sockets = Sockets::open(
        &Wanted {
            admin: &options.admin_socket,
            tunnel: config.mtls.as_ref().map(|m| m.tunnel()).as_ref(),
            metrics: options.metrics_addr,
            gossip: config.gossip.as_ref().map(|g| g.listen),
        },
        inherited.as_mut(),
    )?;
    if let Some(inherited) = inherited {
        let predecessor = inherited.predecessor();
        inherited.ready().await?;
        tracing::info!(predecessor, "took over; the predecessor drains");
    }
    let flow_log = Arc::new(FlowLog::default());
    let (announce_tx, mut announce) = mpsc::unbounded_channel();
    let (takeovers_tx, mut takeovers) = mpsc::channel(1);
    let redirects = agent.dataplane.redirects();
    let announcement = agent.sources.announcement();
    let agent = Arc::new(SharedAgent {
        state: Mutex::new(agent),
        flows: Arc::clone(&flow_log),
        announce: announce_tx.clone(),
        takeovers: takeovers_tx,
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
    if let Some(tunnel) = &tunnel {
        tunnel.spawn(&mut tasks);
    }
    let serve = listening::Serve {
        node: node.clone(),
        admin: agent.clone(),
        metrics: agent.clone(),
        tunnel: tunnel.clone().map(|tunnel| listening::TunnelServe {
            tunnel,
            destinations: Arc::new(redirects),
            names: agent.clone(),
        }),
        gossip: config.gossip.clone(),
    };
    let mut listening = serve.start(&sockets, &announcement).await?;
    let mut members = listening.members();
    agent.lock().gossip_stats = listening.gossip.as_ref().map(|g| Arc::clone(g.stats()));
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch::watch_file(&options.config, changes_tx)?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut health_poll = tokio::time::interval(health::POLL_INTERVAL);
    health_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(admin_socket = %options.admin_socket.display(), "ready");
    crate::sd_notify::ready();

    let why = loop {
        tokio::select! {
            _ = terminate.recv() => break drain::Why::Signal,
            _ = interrupt.recv() => break drain::Why::Signal,
            Some(successor) = takeovers.recv() => {
                tracing::info!(successor = ?successor.pid(), "takeover: handing the sockets over");
                listening.stop().await;
                let mut fds = sockets.handover();
                fds.insert(0, (Kind::Lock, lock.fd()));
                match successor.hand_over(&fds).await {
                    Ok(()) => break drain::Why::TakenOver,
                    Err(error) => {
                        tracing::error!(%error, "takeover failed; serving again");
                        lock.record_owner(&options.admin_socket);
                        let announcement = agent.lock().resume();
                        listening = serve.start(&sockets, &announcement).await?;
                        members = listening.members();
                        agent.lock().gossip_stats = listening.gossip.as_ref().map(|g| Arc::clone(g.stats()));
                    }
                }
            }
            Some(()) = changes.recv() => {
                // A deploy may swap several links at once; let the burst settle.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while changes.try_recv().is_ok() {}
                agent.lock().reload();
                let _ = announce_tx.send(());
            }
            _ = hangup.recv() => {
                tracing::info!(config = %options.config.display(), "SIGHUP: reloading the config");
                agent.lock().reload();
                let _ = announce_tx.send(());
            }
            Some(report) = probes.recv() => agent.lock().on_probe(report),
            _ = health_poll.tick() => agent.lock().poll_health(),
            Some(()) = announce.recv() => {
                while announce.try_recv().is_ok() {}
                if let Some(gossip) = &listening.gossip {
                    let announcement = agent.lock().sources.announcement();
                    gossip.announce(&announcement).await;
                }
            }
            // chitchat publishes member changes once per gossip round: already batched.
            latest = gossip::next_members(&mut members) => agent.lock().set_members(latest),
        }
    };

    // Nothing reads a socket or writes a map from here on; the open flows are relayed on.
    listening.stop().await;
    tasks.abort_all();
    agent.lock().checker.sync(std::iter::empty());
    drop(sockets);
    // A draining agent touches no map, link or pin (unless it uninstalls at the end): the node
    // is free for the next agent.
    let _lock = (options.cleanup_on_exit && why == drain::Why::Signal).then_some(lock);
    if why == drain::Why::Signal {
        // Closed above: new strict connects are refused, and the CLI finds no agent.
        let _ = std::fs::remove_file(&options.admin_socket);
    }
    drain::drain(
        tunnel.as_deref(),
        why,
        options.drain_timeout,
        &mut terminate,
        &mut interrupt,
    )
    .await;
    let agent = agent.lock();
    if why == drain::Why::TakenOver {
        tracing::info!("exiting; the successor serves the node");
    } else if options.cleanup_on_exit {
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
        // Logged after the maps were written; `services` and `backends` count what the kernel
        // holds now (how the gossip bench tells which apply brought a change).
        tracing::info!(
            %report,
            elapsed_us = started.elapsed().as_micros(),
            services = self.kernel.services.len(),
            backends = self.kernel.backends.len(),
            "config applied to the kernel"
        );
        Ok(())
    }

    /// Re-applies the catalog after a health change.
    fn refresh(&mut self) {
        let mut desired = self.catalog.clone();
        self.health.apply(&mut desired);
        if let Err(error) = self.apply(desired) {
            tracing::error!("cannot apply a health change to the kernel: {error:#}");
        }
    }

    fn on_probe(&mut self, report: ProbeReport) {
        let result = report.result.map_err(|e| e.to_string());
        if self
            .health
            .record_probe(&report.service, report.backend, result)
        {
            self.refresh();
        }
    }

    /// Feeds the kernel's connect outcomes to the outlier detection and ends the ejections
    /// that are over.
    fn poll_health(&mut self) {
        let now = Instant::now();
        let mut changed = match self.dataplane.maps.connect_outcomes() {
            Ok(outcomes) => self.health.observe_outcomes(&outcomes, now),
            Err(error) => {
                tracing::warn!(%error, "cannot read the connect outcomes; no passive health this round");
                false
            }
        };
        changed |= self.health.expire(now);
        if changed {
            self.refresh();
        }
        // Settles the deaths reported while the mesh was not heard, and the restored peers'
        // grace.
        self.follow_peers(now);
    }

    /// Merges the catalog's sources again, applies health and brings the kernel to the
    /// result. On error the previous catalog stays in force, health included.
    fn recompute(&mut self) -> anyhow::Result<()> {
        let merged = self.sources.catalog();
        let catalog = merged.desired();
        self.health.sync(&catalog, &self.config);
        let mut desired = catalog.clone();
        self.health.apply(&mut desired);
        if let Err(error) = self.apply(desired) {
            self.health.sync(&self.catalog, &self.config);
            return Err(error);
        }
        for conflict in &merged.conflicts {
            if !self.conflicts.contains(conflict) {
                tracing::warn!(%conflict, "catalog conflict");
            }
        }
        if let Some(tunnel) = &self.tunnel {
            let local = self.sources.announcement().reachable_by_peers();
            let hosted =
                |service: &str, backend: SocketAddr| local.contains(&(service.to_owned(), backend));
            tunnel.update(
                &crate::config::mtls_services(&merged.services, &self.config.services, &hosted),
                self.config.policies.clone(),
            );
        }
        self.conflicts = merged.conflicts;
        self.checker.sync(self.health.targets());
        self.catalog = catalog;
        Ok(())
    }

    /// Changes the registered endpoints, applies the result and keeps it on disk; a change
    /// the kernel refuses, or that cannot be kept, is undone.
    fn change_registrations(
        &mut self,
        change: impl FnOnce(&mut crate::catalog::Registrations) -> Result<bool, String>,
    ) -> Result<bool, String> {
        let previous = self.sources.registered.clone();
        if !change(&mut self.sources.registered)? {
            return Ok(false);
        }
        if let Err(error) = self.recompute() {
            self.sources.registered = previous;
            return Err(format!("{error:#}"));
        }
        if let Err(error) = self.registry.save(&self.sources.registered) {
            self.sources.registered = previous;
            if let Err(undo) = self.recompute() {
                tracing::error!("cannot restore the previous registrations: {undo:#}");
            }
            return Err(format!("{error}; the change is undone"));
        }
        Ok(true)
    }

    /// Serves again after a failed takeover. The successor may have written the maps, so the
    /// kernel's state is read afresh and the catalog applied again; returns what to announce.
    fn resume(&mut self) -> crate::catalog::Announcement {
        match self.dataplane.maps.read_state() {
            Ok(kernel) => self.kernel = kernel,
            Err(error) => tracing::error!("cannot read the kernel's state again: {error:#}"),
        }
        if let Err(error) = self.recompute() {
            tracing::error!("cannot apply the catalog again: {error:#}");
        }
        self.sources.announcement()
    }

    /// Takes the gossip members' latest state and applies the catalog it makes.
    fn set_members(&mut self, members: Arc<Vec<Member>>) {
        gossip::log_changes(&self.members, &members);
        self.members = members;
        self.follow_peers(Instant::now());
    }

    /// Brings the peers' announcements in force up to date with the members (and the restored
    /// peers' grace) and applies the catalog when they changed.
    fn follow_peers(&mut self, now: Instant) {
        let last_heard = self.gossip_stats.as_ref().and_then(|s| s.last_authentic());
        let members = Arc::clone(&self.members);
        let changed = self.peers.update(&members, now, last_heard) | self.peers.expire(now);
        if !changed {
            return;
        }
        self.sources.peers = self.peers.announcements();
        if let Err(error) = self.recompute() {
            tracing::error!("cannot apply the mesh catalog, the previous state stays: {error:#}");
        }
    }

    /// Re-reads the config file; a bad file is rejected and the state in force stays.
    /// Returns the config now in force when it changed.
    fn reload(&mut self) {
        let before = self.desired.service_count();
        let result = Config::load(&self.config_path)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                if config.gossip != self.gossip_config {
                    tracing::warn!("the [gossip] table changed; restart the agent to apply it");
                }
                let previous_services =
                    std::mem::replace(&mut self.sources.config, config.services.clone());
                let previous = std::mem::replace(&mut self.config, config);
                self.recompute().inspect_err(|_| {
                    self.sources.config = previous_services;
                    self.config = previous;
                })
            });
        match result {
            Ok(()) => {
                self.reloads_applied += 1;
                self.config_error = None;
                let after = self.desired.service_count();
                if after < before {
                    tracing::warn!(
                        before,
                        after,
                        removed = before - after,
                        "the config change leaves the kernel with fewer services"
                    );
                }
            }
            Err(error) => {
                self.reloads_rejected += 1;
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
            .map(|(counter, value)| (counter.name().to_owned(), value))
            .collect();
        Ok(StatusReport {
            node: self.node.clone(),
            config: self.config_path.display().to_string(),
            cgroup: self.cgroup.display().to_string(),
            adopted: self.dataplane.adopted,
            config_error: self.config_error.clone(),
            services: status::services(&self.desired, &self.kernel)
                .into_iter()
                .map(|s| status::ServiceStatus {
                    panic: self.health.panic(&s.name),
                    ..s
                })
                .collect(),
            counters,
            conflicts: self.conflicts.clone(),
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
        let mut announcers: HashMap<(&str, SocketAddr), Vec<String>> = HashMap::new();
        let local = self.sources.announcement();
        let members = std::iter::once((self.node.as_str(), &local))
            .chain(self.sources.peers.iter().map(|(n, a)| (n.as_str(), a)));
        for (node, announcement) in members {
            for e in &announcement.endpoints {
                announcers
                    .entry((e.service.as_str(), e.address))
                    .or_default()
                    .push(node.to_owned());
            }
        }
        let now = Instant::now();
        let installed = &installed;
        let announcers = &announcers;
        self.desired
            .services
            .values()
            .flat_map(|service| {
                let used: HashSet<u32> = service.table.iter().copied().collect();
                service
                    .backends
                    .iter()
                    .enumerate()
                    .map(move |(i, backend)| {
                        let id = installed.get(&(service.name.as_str(), backend.addr));
                        let in_table = used.contains(&(i as u32));
                        let state = match (backend.weight, id, in_table) {
                            (0, _, _) => "drained",
                            (_, Some(_), _) => "active",
                            (_, None, true) => "pending",
                            (_, None, false) => "excluded",
                        };
                        let view = self.health.view(&service.name, backend.addr, now);
                        EndpointStatus {
                            service: service.name.clone(),
                            address: backend.addr.to_string(),
                            weight: backend.weight,
                            state: state.to_owned(),
                            connections: id.map_or(0, |&id| self.dataplane.maps.backend_count(id)),
                            announced_by: announcers
                                .get(&(service.name.as_str(), backend.addr))
                                .cloned()
                                .unwrap_or_default(),
                            health: view.as_ref().map(|v| v.state.to_owned()),
                            health_reason: view.as_ref().and_then(|v| v.reason.clone()),
                            ejected_until: view
                                .and_then(|v| v.until)
                                .map(|t| humantime::format_rfc3339_seconds(t).to_string()),
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
            health: self.health.samples(),
            reloads_applied: self.reloads_applied,
            reloads_rejected: self.reloads_rejected,
            flows_recorded: 0,
            uptime_seconds: self.started.elapsed().as_secs_f64(),
            tunnel: self.tunnel.as_ref().map(|t| t.sample()),
            gossip: self.gossip_sample(),
            conflicts: crate::catalog::ConflictKind::ALL
                .iter()
                .map(|&kind| {
                    let n = self.conflicts.iter().filter(|c| c.kind == kind).count();
                    (kind.name(), count(n))
                })
                .collect(),
        }
    }

    fn gossip_sample(&self) -> metrics::GossipSample {
        let Some(stats) = &self.gossip_stats else {
            return metrics::GossipSample::default();
        };
        let load = |c: &std::sync::atomic::AtomicU64| c.load(std::sync::atomic::Ordering::Relaxed);
        let alive = self.members.iter().filter(|m| m.alive).count() as u64;
        metrics::GossipSample {
            alive: alive + 1,
            dead: self.members.len() as u64 - alive,
            bytes_sent: load(&stats.bytes_sent),
            bytes_received: load(&stats.bytes_received),
            datagrams_sent: load(&stats.datagrams_sent),
            datagrams_received: load(&stats.datagrams_received),
            rejected: stats.rejected(),
        }
    }
}

/// The admin socket path used when none is given.
pub fn default_admin_socket() -> &'static Path {
    Path::new("/run/mesh/agent.sock")
}
