//! What the agent shows, published as snapshots: after every event that changed it, the
//! controller's state is captured in a [`View`] (shared pieces, no deep copies of the catalog
//! or the kernel's state) and swapped in atomically. The admin API's reports, the metrics and
//! the readiness probe are computed from the view in force, so a reader never waits for the
//! controller (a 20,000-service reload holds it for a while) and never sees half an event.

use std::{
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex, MutexGuard},
    time::Instant,
};

use arc_swap::ArcSwap;
use tokio::sync::mpsc;

use crate::{
    admin::takeover::Successor,
    admin::types::{EndpointStatus, NodeStatus, StatusReport},
    admin::AgentView,
    balance::Desired,
    catalog::{Announcement, Conflict, Endpoint},
    gossip::{self, Member},
    health::Health,
    model::settings::GossipSettings,
    reconcile::{kernel::Counters, KernelState},
    telemetry::applied::AppliedFeed,
    telemetry::flows::FlowLog,
    telemetry::metrics::{self, BackendSample, MapUsage, Snapshot, SnapshotSource, Transport},
    tunnel::Tunnel,
};

use super::controller::Controller;
use crate::admin::types::{BackendStatus, ServiceStatus};
use mesh_common::counters::Counter;

/// The controller's state as of one event: what every report is computed from.
pub struct View {
    /// The controller's change count this view was taken at.
    pub(super) generation: u64,
    pub(super) node: String,
    pub(super) config_path: PathBuf,
    pub(super) cgroup: PathBuf,
    pub(super) adopted: bool,
    pub(super) started: Instant,
    pub(super) desired: Arc<Desired>,
    pub(super) kernel: Arc<KernelState>,
    /// Kernel service id → name.
    pub(super) names: Arc<HashMap<u32, String>>,
    pub(super) health: Arc<Health>,
    pub(super) config_error: Option<String>,
    pub(super) conflicts: Vec<Conflict>,
    pub(super) reloads_applied: u64,
    pub(super) reloads_rejected: u64,
    /// What this node announces, and what its live peers do.
    pub(super) local: Arc<Announcement>,
    pub(super) peers: Vec<(String, Arc<Announcement>)>,
    /// Peers kept from the state file that gossip has not delivered yet.
    pub(super) restored: Vec<String>,
    pub(super) members: Arc<Vec<Member>>,
    pub(super) gossip: Option<GossipSettings>,
    pub(super) gossip_stats: Option<Arc<gossip::Stats>>,
    pub(super) tunnel: Option<Arc<Tunnel>>,
    /// The programs' counts, read when a report is asked for.
    pub(super) counters: Arc<dyn Counters>,
}

/// The controller behind its lock, the view it last published, and what the admin API needs
/// besides.
pub struct SharedAgent {
    controller: Mutex<Controller>,
    view: ArcSwap<View>,
    flows: Arc<FlowLog>,
    applied: Arc<AppliedFeed>,
    /// Asks the main loop to announce this node's endpoints again.
    announce: mpsc::UnboundedSender<()>,
    /// Asks the main loop to hand the sockets over (one takeover at a time).
    takeovers: mpsc::Sender<Successor>,
}

impl SharedAgent {
    pub fn new(
        controller: Controller,
        flows: Arc<FlowLog>,
        announce: mpsc::UnboundedSender<()>,
        takeovers: mpsc::Sender<Successor>,
    ) -> Self {
        Self {
            view: ArcSwap::from_pointee(controller.view()),
            applied: controller.applied(),
            controller: Mutex::new(controller),
            flows,
            announce,
            takeovers,
        }
    }

    /// Runs `event` on the controller, then publishes its view if the event changed it.
    /// Blocks while another event runs: call it off the runtime's threads ([`Self::event`]).
    pub fn update<T>(&self, event: impl FnOnce(&mut Controller) -> T) -> T {
        let mut controller = self.lock();
        let result = event(&mut controller);
        if controller.generation() != self.view.load().generation {
            self.view.store(Arc::new(controller.view()));
        }
        result
    }

    /// [`Self::update`] on a blocking thread: a reload of any size leaves the runtime free
    /// for gossip, the admin API and the metrics.
    pub async fn event<T: Send + 'static>(
        self: &Arc<Self>,
        event: impl FnOnce(&mut Controller) -> T + Send + 'static,
    ) -> T {
        let agent = Arc::clone(self);
        match tokio::task::spawn_blocking(move || agent.update(event)).await {
            Ok(result) => result,
            Err(error) => std::panic::resume_unwind(error.into_panic()),
        }
    }

    /// The view in force.
    pub fn view(&self) -> Arc<View> {
        self.view.load_full()
    }

    fn lock(&self) -> MutexGuard<'_, Controller> {
        // A panic while holding the lock leaves plain data behind; keep serving it.
        self.controller
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl AgentView for SharedAgent {
    fn status(&self) -> Result<StatusReport, String> {
        self.view().status().map_err(|e| format!("{e:#}"))
    }

    fn endpoints(&self) -> Result<Vec<EndpointStatus>, String> {
        Ok(self.view().endpoints())
    }

    fn nodes(&self) -> Vec<NodeStatus> {
        self.view().nodes()
    }

    fn flows(&self) -> &FlowLog {
        &self.flows
    }

    fn applied(&self) -> Arc<AppliedFeed> {
        Arc::clone(&self.applied)
    }

    fn register(&self, endpoint: Endpoint) -> Result<bool, String> {
        let changed = self.update(|c| c.register(endpoint))?;
        if changed {
            let _ = self.announce.send(());
        }
        Ok(changed)
    }

    fn deregister(&self, service: &str, address: SocketAddr) -> Result<bool, String> {
        let changed = self.update(|c| c.deregister(service, address))?;
        if changed {
            let _ = self.announce.send(());
        }
        Ok(changed)
    }

    fn policies(&self) -> Vec<crate::admin::types::PolicyStatus> {
        self.view()
            .tunnel
            .as_ref()
            .map(|t| t.policies())
            .unwrap_or_default()
    }

    fn certs(&self) -> Vec<crate::tunnel::identity::certs::CertStatus> {
        self.view()
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

impl SnapshotSource for SharedAgent {
    fn snapshot(&self) -> Snapshot {
        let mut snapshot = self.view().snapshot();
        snapshot.flows_recorded = self.flows.recorded();
        snapshot.apply_durations = self.applied.durations();
        snapshot
    }

    fn waiting_for(&self) -> Vec<String> {
        self.view().waiting_for()
    }
}

impl View {
    /// What this agent still waits for before it is ready (`/ready`): the data plane is
    /// installed and the config applied before anything serves, so only gossip remains. With
    /// `[gossip]` and a seed other than itself, the agent is ready once it has heard one
    /// authentic datagram from the mesh (its catalog then holds what the mesh says, not only
    /// what it kept on disk).
    pub fn waiting_for(&self) -> Vec<String> {
        let Some(gossip) = &self.gossip else {
            return Vec::new();
        };
        let has_peers = gossip.seeds.iter().any(|seed| *seed != gossip.advertise);
        let heard = self
            .gossip_stats
            .as_ref()
            .is_some_and(|stats| stats.last_authentic().is_some());
        match has_peers && !heard {
            true => vec!["gossip: no authentic datagram from the mesh yet".to_owned()],
            false => Vec::new(),
        }
    }

    /// This node, its gossip members and the peers restored from the state file.
    pub fn nodes(&self) -> Vec<NodeStatus> {
        let agent = self;
        let this = NodeStatus {
            name: agent.node.clone(),
            role: "self".to_owned(),
            cgroup: Some(agent.cgroup.display().to_string()),
            version: Some(crate::VERSION.to_owned()),
            uptime_s: agent.started.elapsed().as_secs(),
            address: agent.gossip.as_ref().map(|g| g.advertise.to_string()),
            state: "alive".to_owned(),
            endpoints: gossip::endpoint_names(&agent.local),
            rejected: Vec::new(),
        };
        // Peers kept from the state file that gossip has not delivered yet.
        let restored = agent
            .restored
            .iter()
            .filter(|name| !agent.members.iter().any(|m| m.name == **name))
            .map(|name| NodeStatus {
                name: name.clone(),
                role: "peer".to_owned(),
                state: "restored".to_owned(),
                ..NodeStatus::default()
            });
        std::iter::once(this)
            .chain(agent.members.iter().map(gossip::node_status))
            .chain(restored)
            .collect()
    }

    pub fn status(&self) -> anyhow::Result<StatusReport> {
        let counters = self
            .counters
            .counters()?
            .into_iter()
            .map(|(counter, value)| (counter.name().to_owned(), value))
            .collect();
        let now = Instant::now();
        let services: Vec<ServiceStatus> = services(&self.desired, &self.kernel)
            .into_iter()
            .map(|s| {
                let healthy = s
                    .backends
                    .iter()
                    .filter(|b| b.weight > 0)
                    .filter(|b| {
                        b.address.parse().is_ok_and(|addr| {
                            self.health
                                .view(&s.name, addr, now)
                                .is_none_or(|v| v.state == "healthy")
                        })
                    })
                    .count();
                ServiceStatus {
                    panic: self.health.panic(&s.name),
                    healthy: u32::try_from(healthy).unwrap_or(u32::MAX),
                    ..s
                }
            })
            .collect();
        Ok(StatusReport {
            degraded: degraded(self.config_error.is_some(), &services, self.conflicts.len()),
            node: self.node.clone(),
            config: self.config_path.display().to_string(),
            cgroup: self.cgroup.display().to_string(),
            adopted: self.adopted,
            config_error: self.config_error.clone(),
            services,
            counters,
            conflicts: self.conflicts.clone(),
        })
    }

    /// The kernel backend id of each (service name, backend address) installed now.
    fn installed_backends(&self) -> impl Iterator<Item = (u32, &str, SocketAddr)> + '_ {
        self.kernel.backends.iter().filter_map(|(&id, backend)| {
            let name = self.names.get(&backend.service_id)?;
            let addr = crate::reconcile::addr::decode_backend(backend).ok()?;
            Some((id, name.as_str(), addr))
        })
    }

    pub fn endpoints(&self) -> Vec<EndpointStatus> {
        let installed: HashMap<(&str, SocketAddr), u32> = self
            .installed_backends()
            .map(|(id, name, addr)| ((name, addr), id))
            .collect();
        let mut announcers: HashMap<(&str, SocketAddr), Vec<String>> = HashMap::new();
        let members = std::iter::once((self.node.as_str(), &*self.local))
            .chain(self.peers.iter().map(|(n, a)| (n.as_str(), &**a)));
        for (node, announcement) in members {
            for e in &announcement.endpoints {
                announcers
                    .entry((&*e.service, e.address))
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
                            connections: id.map_or(0, |&id| self.counters.backend_count(id)),
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

    pub fn snapshot(&self) -> Snapshot {
        let count = |n: usize| u64::try_from(n).unwrap_or(u64::MAX);
        // Each backend belongs to one service, of one protocol: TCP counts connections, UDP
        // datagrams.
        let transports: HashMap<u32, Transport> = self
            .kernel
            .services
            .iter()
            .map(|(key, service)| {
                let transport = match key.proto {
                    mesh_common::service::PROTO_UDP => Transport::Udp,
                    _ => Transport::Tcp,
                };
                (service.id, transport)
            })
            .collect();
        let backends: Vec<BackendSample> = self
            .kernel
            .backends
            .iter()
            .filter_map(|(&id, backend)| {
                let service = self.names.get(&backend.service_id)?;
                let addr = crate::reconcile::addr::decode_backend(backend).ok()?;
                Some(BackendSample {
                    service: service.clone(),
                    backend: addr.to_string(),
                    transport: *transports.get(&backend.service_id)?,
                    count: self.counters.backend_count(id),
                })
            })
            .collect();
        // A backend's count entry is created with its first connection or datagram.
        let counted = backends.iter().filter(|b| b.count > 0).count();
        let map = |name, pinned, entries: Option<usize>, capacity: u32| MapUsage {
            name,
            pinned,
            entries: entries.map(count),
            capacity: u64::from(capacity),
        };
        use mesh_common::maps as m;
        Snapshot {
            counters: self.counters.counters().unwrap_or_default(),
            maps: vec![
                map(
                    "services",
                    m::SERVICES,
                    Some(self.kernel.services.len()),
                    m::SERVICES_MAX,
                ),
                map(
                    "slots",
                    m::SLOTS,
                    Some(self.kernel.slots.len()),
                    m::SLOTS_MAX,
                ),
                map(
                    "backends",
                    m::BACKENDS,
                    Some(self.kernel.backends.len()),
                    m::BACKENDS_MAX,
                ),
                map(
                    "backend_counts",
                    m::BACKEND_COUNTS,
                    Some(counted),
                    m::BACKENDS_MAX,
                ),
                map(
                    "strict",
                    m::STRICT_INBOUND,
                    Some(self.kernel.strict.len()),
                    m::STRICT_MAX,
                ),
                map(
                    "counters",
                    m::COUNTERS,
                    Some(Counter::ALL.len()),
                    m::COUNTERS_MAX,
                ),
                map("reverse", m::REVERSE, None, m::REVERSE_MAX),
                map("affinity", m::AFFINITY, None, m::AFFINITY_MAX),
                map(
                    "redirect_by_cookie",
                    m::REDIRECT_BY_COOKIE,
                    None,
                    m::REDIRECT_MAX,
                ),
                map(
                    "redirect_by_peer",
                    m::REDIRECT_BY_PEER,
                    None,
                    m::REDIRECT_MAX,
                ),
                map("outcomes", m::CONNECT_OUTCOMES, None, m::BACKENDS_MAX),
                map(
                    "loopback_sockets",
                    m::LOOPBACK_SOCKETS,
                    None,
                    m::LOOPBACK_SOCKETS_MAX,
                ),
            ],
            backends,
            health: self.health.samples(),
            reloads_applied: self.reloads_applied,
            reloads_rejected: self.reloads_rejected,
            apply_durations: Default::default(),
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

/// Each desired service with the slot count the kernel actually holds for it.
fn services(desired: &Desired, kernel: &KernelState) -> Vec<ServiceStatus> {
    desired
        .services
        .iter()
        .map(|(frontend, service)| ServiceStatus {
            name: service.name.clone(),
            vip: service.vip.to_string(),
            port: service.port,
            protocol: service.protocol.to_string(),
            lb: service.policy.to_string(),
            affinity: service.affinity.to_string(),
            backends: service
                .backends
                .iter()
                .map(|b| BackendStatus {
                    address: b.addr.to_string(),
                    weight: b.weight,
                })
                .collect(),
            slots: (kernel
                .services
                .get(&crate::reconcile::addr::frontend_key(*frontend)))
            .map_or(0, |s| s.count),
            healthy: 0,
            panic: false,
        })
        .collect()
}

/// Why the agent is degraded, for the status verdict; empty when all is well.
fn degraded(config_rejected: bool, services: &[ServiceStatus], conflicts: usize) -> Vec<String> {
    let count = |what: &dyn Fn(&ServiceStatus) -> bool| services.iter().filter(|s| what(s)).count();
    let plural = |n: usize, one: &str, many: &str| match n {
        1 => format!("1 {one}"),
        n => format!("{n} {many}"),
    };
    let mut reasons = Vec::new();
    if config_rejected {
        reasons.push("the last config change was rejected".to_owned());
    }
    let refusing = count(&|s| s.slots == 0);
    if refusing > 0 {
        let what = plural(refusing, "service refuses", "services refuse");
        reasons.push(format!("{what} connects (no backend in the kernel)"));
    }
    let panicking = count(&|s| s.panic);
    if panicking > 0 {
        let what = plural(panicking, "service is", "services are");
        reasons.push(format!("{what} in panic (every backend unhealthy)"));
    }
    let unhealthy: usize = services
        .iter()
        .filter(|s| !s.panic)
        .map(|s| {
            let weighted = s.backends.iter().filter(|b| b.weight > 0).count();
            weighted.saturating_sub(s.healthy as usize)
        })
        .sum();
    if unhealthy > 0 {
        let what = plural(unhealthy, "backend is", "backends are");
        reasons.push(format!("{what} unhealthy or ejected"));
    }
    if conflicts > 0 {
        reasons.push(plural(conflicts, "catalog conflict", "catalog conflicts"));
    }
    reasons
}
