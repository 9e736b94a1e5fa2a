//! `mesh-agent run`: the composition root of the daemon.
//!
//! Installs (or adopts) the data plane, brings the kernel to the config's desired state, then
//! follows the config file, serves the admin API and waits for a signal. On SIGTERM/SIGINT the
//! data plane stays in place (pinned) unless `--cleanup-on-exit` was given, so established and
//! new connections keep flowing while the agent restarts or upgrades.
//!
//! With `--takeover` it replaces the agent running on the admin socket ([`crate::admin::takeover`]);
//! a replaced agent, or one stopped by a signal, drains its tunneled flows ([`drain`]) before
//! it exits.

mod drain;
mod listening;
pub mod sockets;

pub mod controller;
mod pipeline;
mod probes;
mod runtime;
pub mod views;

use std::{
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use tokio::{
    signal::unix::{signal, SignalKind},
    sync::mpsc,
};

use crate::{
    admin::takeover::{self, Kind},
    app::sockets::{Sockets, Wanted},
    config::Config,
    dataplane::{DataPlane, PinDir, Settings},
    gossip::{self},
    health::{
        self,
        checker::{Checker, ProbeReport},
    },
    sys::cgroup,
    sys::node_lock::NodeLock,
    sys::watch,
    telemetry::flows::{self, FlowLog},
    tunnel::{Tunnel, TunnelConfig},
};

use self::{
    controller::{Controller, Parts},
    probes::Probes,
    runtime::DataPlaneRuntime,
    views::SharedAgent,
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

/// Runs the agent until SIGTERM or SIGINT.
pub async fn run(options: RunOptions) -> anyhow::Result<()> {
    crate::sys::fdlimit::raise_and_log();
    let config = Config::load(&options.config)?;
    let node = node_name(options.node.as_deref(), Some(&config))?;
    let cgroup_root = cgroup::unified_root()?;
    let cgroup = options
        .cgroup
        .clone()
        .unwrap_or_else(|| cgroup_root.clone());
    let pins = PinDir::new(&options.bpffs, &node);
    // The tunnel runs on a runtime of its own. Its credentials are only read: a bad file
    // fails here, before a takeover stops the running agent.
    let data_plane = match &config.mtls {
        Some(mtls) => {
            Some(DataPlaneRuntime::start(mtls.workers).context("starting the data-plane runtime")?)
        }
        None => None,
    };
    let tunnel = match (&config.mtls, &data_plane) {
        (Some(mtls), Some(runtime)) => Some(Tunnel::new(
            &TunnelConfig::from(mtls),
            cgroup_root.clone(),
            runtime.handle(),
        )?),
        _ => None,
    };
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
    let DataPlane {
        maps,
        redirects,
        pins,
        adopted,
    } = dataplane;
    let (probes_tx, mut probes) = mpsc::channel::<ProbeReport>(1024);
    let agent = Controller::start(Parts {
        node: node.clone(),
        config_path: options.config.clone(),
        config: config.clone(),
        cgroup: cgroup.clone(),
        maps: Box::new(maps),
        adopted,
        state_dir: options.state_dir.clone(),
        checker: Checker::new(probes_tx, Arc::new(Probes::new(tunnel.clone()))),
        tunnel: tunnel.clone(),
    })?;
    tracing::info!(
        node,
        cgroup = %cgroup.display(),
        adopted,
        services = agent.kernel().services.len(),
        "data plane installed"
    );
    let sockets = Sockets::open(
        &Wanted {
            admin: &options.admin_socket,
            tunnel: config.mtls.as_ref().map(TunnelConfig::from).as_ref(),
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
    let announcement = agent.announcement();
    let names = agent.names();
    let agent = Arc::new(SharedAgent::new(
        agent,
        Arc::clone(&flow_log),
        announce_tx.clone(),
        takeovers_tx,
    ));

    let mut tasks = tokio::task::JoinSet::new();
    tasks.spawn(flows::follow_kernel(
        telemetry.events,
        flows::Decoder::new(cgroup_root),
        Arc::clone(&names),
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
            names,
        }),
        gossip: config.gossip.clone(),
    };
    let mut listening = serve.start(&sockets, &announcement).await?;
    let mut members = listening.members();
    let stats = listening.gossip.as_ref().map(|g| Arc::clone(g.stats()));
    agent.event(|c| c.set_gossip_stats(stats)).await;
    let (changes_tx, mut changes) = mpsc::unbounded_channel();
    let _watcher = watch::watch_file(&options.config, changes_tx)?;
    let mut terminate = signal(SignalKind::terminate())?;
    let mut interrupt = signal(SignalKind::interrupt())?;
    let mut hangup = signal(SignalKind::hangup())?;
    let mut health_poll = tokio::time::interval(health::POLL_INTERVAL);
    health_poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    tracing::info!(admin_socket = %options.admin_socket.display(), "ready");
    crate::sys::sd_notify::ready();
    if let Some(watchdog) = crate::sys::sd_notify::watchdog() {
        tasks.spawn(watchdog);
    }

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
                        let announcement = agent.event(Controller::resume).await;
                        listening = serve.start(&sockets, &announcement).await?;
                        members = listening.members();
                        let stats = listening.gossip.as_ref().map(|g| Arc::clone(g.stats()));
                        agent.event(|c| c.set_gossip_stats(stats)).await;
                    }
                }
            }
            Some(()) = changes.recv() => {
                // A deploy may swap several links at once; let the burst settle.
                tokio::time::sleep(Duration::from_millis(5)).await;
                while changes.try_recv().is_ok() {}
                reload(&agent).await;
                let _ = announce_tx.send(());
            }
            _ = hangup.recv() => {
                tracing::info!(config = %options.config.display(), "SIGHUP: reloading the config");
                reload(&agent).await;
                let _ = announce_tx.send(());
            }
            Some(report) = probes.recv() => {
                // Every result waiting is handled in one event, published once.
                let mut reports = vec![report];
                while let Ok(report) = probes.try_recv() {
                    reports.push(report);
                }
                agent.event(|c| reports.into_iter().for_each(|r| c.on_probe(r))).await;
            }
            _ = health_poll.tick() => agent.event(Controller::tick).await,
            Some(()) = announce.recv() => {
                while announce.try_recv().is_ok() {}
                if let Some(gossip) = &listening.gossip {
                    let announcement = agent.event(|c| c.announcement()).await;
                    gossip.announce(&announcement).await;
                }
            }
            // chitchat publishes member changes once per gossip round: already batched.
            latest = gossip::next_members(&mut members) => {
                agent.event(|c| c.set_members(latest)).await;
            }
        }
    };

    // Nothing reads a socket or writes a map from here on; the open flows are relayed on.
    listening.stop().await;
    tasks.abort_all();
    agent.event(Controller::stop_checks).await;
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
    if why == drain::Why::TakenOver {
        tracing::info!("exiting; the successor serves the node");
    } else if options.cleanup_on_exit {
        crate::dataplane::uninstall(&pins)?;
        tracing::info!("data plane detached and unpinned");
    } else {
        tracing::info!("exiting; the data plane stays pinned and keeps balancing");
    }
    Ok(())
}

/// A config change; then, once the view of the previous catalog is replaced too, the memory
/// they held is given back (glibc would keep a large catalog's pages after a shrink).
async fn reload(agent: &Arc<SharedAgent>) {
    agent.event(Controller::reload).await;
    let _ = tokio::task::spawn_blocking(crate::sys::memory::give_back_freed_memory).await;
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
    crate::model::rules::node_name(&name)
        .map_err(|cause| anyhow::anyhow!("node name {name:?}: {cause}"))?;
    Ok(name)
}

/// This host's name, the default node name.
fn host_name() -> anyhow::Result<String> {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .context("reading the host name (pass --node)")?;
    Ok(host.trim().to_owned())
}

/// The admin socket path used when none is given.
pub fn default_admin_socket() -> &'static Path {
    Path::new("/run/mesh/agent.sock")
}
