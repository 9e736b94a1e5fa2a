//! The agent's controller: the pipeline state (config, catalog sources, health, what the
//! kernel holds) and one method per event — a config change ([`Controller::reload`]), a
//! registration ([`Controller::register`], [`Controller::deregister`]), the gossip members
//! ([`Controller::set_members`]), a probe result ([`Controller::on_probe`]) and the health
//! tick ([`Controller::tick`]) — each bringing the kernel to the result through the
//! [`Kernel`] port, or keeping the last good state.
//!
//! It knows neither sockets nor tasks: the composition root ([`super`]) feeds it events, and
//! the in-process tests (`mesh-agent/tests/`) drive it against a
//! [`MemoryKernel`](crate::reconcile::kernel::MemoryKernel).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;

use crate::{
    balance::Desired,
    catalog::{
        registry::Registry, Announcement, Change, Conflict, Endpoint, Registrations, Sources,
    },
    config::Config,
    gossip::{
        self,
        peers::{Peers, RestoreGrace},
        Member,
    },
    health::{
        checker::{Checker, ProbeReport},
        Health,
    },
    model::{settings::GossipSettings, Service},
    reconcile::{kernel::Kernel, KernelState},
    telemetry::{applied::AppliedFeed, flows::ServiceNames},
    tunnel::Tunnel,
};

use super::views::View;

/// What a controller is built from.
pub struct Parts {
    pub node: String,
    /// The config file it follows, and the config read from it.
    pub config_path: PathBuf,
    pub config: Config,
    /// The cgroup the programs are attached to (shown in the reports).
    pub cgroup: PathBuf,
    /// The kernel's maps.
    pub maps: Box<dyn Kernel>,
    /// True when the maps were left by an earlier agent.
    pub adopted: bool,
    /// Where registrations and the peers' catalog are kept across restarts.
    pub state_dir: PathBuf,
    /// Runs the active health checks.
    pub checker: Checker,
    /// The mTLS tunnel, when the config has an `[mtls]` section.
    pub tunnel: Option<Arc<Tunnel>>,
}

/// The agent's state, changed by one event at a time; what it shows is published as a
/// [`View`].
pub struct Controller {
    pub(super) node: String,
    pub(super) config_path: PathBuf,
    pub(super) cgroup: PathBuf,
    pub(super) started: Instant,
    pub(super) maps: Box<dyn Kernel>,
    pub(super) adopted: bool,
    /// The config in force.
    pub(super) config: Config,
    /// The services as the catalog gives them, before health.
    pub(super) catalog: Desired,
    /// The catalog's services (with the health settings this node gives them).
    pub(super) services: Vec<Service>,
    /// What the kernel was last brought to: the catalog with health applied.
    pub(super) desired: Arc<Desired>,
    pub(super) health: Health,
    pub(super) checker: Checker,
    /// What the kernel's load-balancing maps hold (exactly what the writes accepted); shared
    /// with the views, copied on the first write after one was published.
    pub(super) kernel: Arc<KernelState>,
    /// Kernel service id → name, for flows, the tunnel's flows and the reports.
    pub(super) names: Arc<ServiceNames>,
    /// The names do not follow the kernel yet (at start, after a resume): the next write
    /// names every service.
    pub(super) names_stale: bool,
    /// Counts the changes a view would show (see [`Controller::generation`]).
    pub(super) generation: u64,
    pub(super) config_error: Option<String>,
    pub(super) reloads_applied: u64,
    pub(super) reloads_rejected: u64,
    /// What the catalog is made of: config, registrations, live peers.
    pub(super) sources: Sources,
    /// What this node announces: `sources.announcement()` of the catalog in force, made once
    /// per change of the config or the registrations.
    pub(super) announcement: Arc<Announcement>,
    /// The next event goes through the whole pipeline (every service merged, health-masked
    /// and planned), not only as far as it reaches: at start and after a resume, and after a
    /// write that failed or left garbage (see [`crate::reconcile::plan::plan_scoped`]).
    pub(super) whole_pipeline_due: bool,
    /// False: every event goes through the whole pipeline ([`Controller::set_incremental`]).
    pub(super) incremental: bool,
    /// Where `sources.registered` is kept across restarts.
    pub(super) registry: Registry,
    /// The conflicts of the catalog in force.
    pub(super) conflicts: Vec<Conflict>,
    /// The `[gossip]` table the agent started with (a change needs a restart).
    pub(super) gossip_config: Option<GossipSettings>,
    /// Every other gossip member, alive or dead.
    pub(super) members: Arc<Vec<Member>>,
    /// The peers' announcements in force (kept across restarts).
    pub(super) peers: Peers,
    pub(super) gossip_stats: Option<Arc<gossip::Stats>>,
    /// The mTLS tunnel; it follows the catalog's strict services and the config's policies.
    pub(super) tunnel: Option<Arc<Tunnel>>,
    /// Every successful write of the kernel maps, for `GET /v1/applied`.
    pub(super) applied: Arc<AppliedFeed>,
}

impl Controller {
    /// Starts from what the kernel holds and the state directory keeps (registrations, the
    /// peers' catalog), then brings the kernel to the catalog they make with the config.
    pub fn start(parts: Parts) -> anyhow::Result<Controller> {
        let kernel = parts
            .maps
            .read_state()
            .context("reading the kernel's maps")?;
        let registry = Registry::new(&parts.state_dir, &parts.node);
        let peers = match &parts.config.gossip {
            Some(gossip) => Peers::restore(
                &parts.state_dir,
                &parts.node,
                RestoreGrace::for_interval(gossip.interval),
            ),
            None => Peers::none(),
        };
        let mut controller = Controller {
            sources: Sources {
                node: parts.node.clone(),
                config: parts.config.services.clone(),
                registered: registry.restore(),
                peers: peers.announcements(),
            },
            announcement: Arc::default(),
            whole_pipeline_due: true,
            incremental: true,
            node: parts.node,
            config_path: parts.config_path,
            cgroup: parts.cgroup,
            started: Instant::now(),
            maps: parts.maps,
            adopted: parts.adopted,
            gossip_config: parts.config.gossip.clone(),
            config: parts.config,
            catalog: Desired::default(),
            services: Vec::new(),
            desired: Arc::default(),
            health: Health::default(),
            checker: parts.checker,
            kernel: Arc::new(kernel),
            names: Arc::default(),
            names_stale: true,
            generation: 0,
            config_error: None,
            reloads_applied: 0,
            reloads_rejected: 0,
            registry,
            conflicts: Vec::new(),
            members: Arc::default(),
            peers,
            gossip_stats: None,
            tunnel: parts.tunnel,
            applied: Arc::default(),
        };
        let local = Arc::new(controller.sources.announcement());
        controller.recompute(Change::All, local)?;
        Ok(controller)
    }

    /// What this node announces now: its config's and registrations' endpoints.
    pub fn announcement(&self) -> Arc<Announcement> {
        Arc::clone(&self.announcement)
    }

    /// What the kernel's load-balancing maps hold, as the controller last wrote them.
    pub fn kernel(&self) -> &KernelState {
        &self.kernel
    }

    /// The service names of the kernel in force, kept up to date by every write.
    pub fn names(&self) -> Arc<ServiceNames> {
        Arc::clone(&self.names)
    }

    /// Every successful write of the kernel maps, for `GET /v1/applied`.
    pub fn applied(&self) -> Arc<AppliedFeed> {
        Arc::clone(&self.applied)
    }

    /// Grows with every change a [`View`] shows: a write of the kernel, a reload, a probe
    /// result, the members; equal generations, equal views.
    pub fn generation(&self) -> u64 {
        self.generation
    }

    /// What the controller shows now.
    pub fn view(&self) -> View {
        View {
            generation: self.generation,
            node: self.node.clone(),
            config_path: self.config_path.clone(),
            cgroup: self.cgroup.clone(),
            adopted: self.adopted,
            started: self.started,
            desired: Arc::clone(&self.desired),
            kernel: Arc::clone(&self.kernel),
            names: self.names.current(),
            health: Arc::new(self.health.clone()),
            config_error: self.config_error.clone(),
            conflicts: self.conflicts.clone(),
            reloads_applied: self.reloads_applied,
            reloads_rejected: self.reloads_rejected,
            local: Arc::clone(&self.announcement),
            peers: self.sources.peers.clone(),
            restored: self.peers.restored().map(str::to_owned).collect(),
            members: Arc::clone(&self.members),
            gossip: self.gossip_config.clone(),
            gossip_stats: self.gossip_stats.clone(),
            tunnel: self.tunnel.clone(),
            counters: self.maps.counters(),
        }
    }

    /// With `false`, every event goes through the whole pipeline, as before it was
    /// incremental: the reference the in-process tests hold the incremental one to.
    pub fn set_incremental(&mut self, incremental: bool) {
        self.incremental = incremental;
    }

    /// The gossip transport's counters, once gossip runs (the peers' deaths are trusted only
    /// while authentic gossip still arrives).
    pub fn set_gossip_stats(&mut self, stats: Option<Arc<gossip::Stats>>) {
        self.generation += 1;
        self.gossip_stats = stats;
    }

    /// Stops every active check (a draining agent probes nothing).
    pub fn stop_checks(&mut self) {
        self.checker.sync(std::iter::empty());
    }

    /// Announces `endpoint` from this node (kept across restarts); `false` when it already
    /// was, with that weight. A registration the rules of the catalog in force refuse changes
    /// nothing.
    pub fn register(&mut self, endpoint: Endpoint) -> Result<bool, String> {
        crate::catalog::check_registration(&self.services, &endpoint)?;
        let (service, address, weight) =
            (endpoint.service.clone(), endpoint.address, endpoint.weight);
        self.change_registrations(&service, address, Some(weight), |r| r.register(endpoint))
    }

    /// Withdraws a registered endpoint; `false` when it was not registered.
    pub fn deregister(&mut self, service: &str, address: SocketAddr) -> Result<bool, String> {
        self.change_registrations(service, address, None, |r| {
            Ok(r.deregister(service, address))
        })
    }

    pub fn on_probe(&mut self, report: ProbeReport) {
        self.generation += 1;
        let result = report.result.map_err(|e| e.to_string());
        if self
            .health
            .record_probe(&report.service, report.backend, result)
        {
            self.refresh(&BTreeSet::from([report.service]));
        }
    }

    /// Feeds the kernel's connect outcomes to the outlier detection and ends the ejections
    /// that are over.
    pub fn tick(&mut self) {
        let now = Instant::now();
        let mut changed = match self.maps.connect_outcomes() {
            Ok(outcomes) => self.health.observe_outcomes(&outcomes, now),
            Err(error) => {
                tracing::warn!(%error, "cannot read the connect outcomes; no passive health this round");
                BTreeSet::new()
            }
        };
        changed.extend(self.health.expire(now));
        self.refresh(&changed);
        // Settles the deaths reported while the mesh was not heard, and the restored peers'
        // grace.
        self.follow_peers(now);
    }

    /// Changes the registered endpoints (`change`: `service`/`address` now registered with
    /// `weight`, `None`: withdrawn), applies the result and keeps it on disk; a change the
    /// kernel refuses, or that cannot be kept, is undone.
    fn change_registrations(
        &mut self,
        service: &str,
        address: SocketAddr,
        weight: Option<u32>,
        change: impl FnOnce(&mut Registrations) -> Result<bool, String>,
    ) -> Result<bool, String> {
        let previous = self.sources.registered.clone();
        if !change(&mut self.sources.registered)? {
            return Ok(false);
        }
        let before = self.announcement();
        let mut local = (*before).clone();
        let change = || Change::Services(BTreeSet::from([service.to_owned()]));
        if local.follow_registration(&self.sources.config, service, address, weight) {
            if let Err(error) = self.recompute(change(), Arc::new(local)) {
                self.sources.registered = previous;
                return Err(format!("{error:#}"));
            }
        }
        if let Err(error) = self.registry.save(&self.sources.registered) {
            self.sources.registered = previous;
            if !Arc::ptr_eq(&before, &self.announcement) {
                if let Err(undo) = self.recompute(change(), before) {
                    tracing::error!("cannot restore the previous registrations: {undo:#}");
                }
            }
            return Err(format!("{error}; the change is undone"));
        }
        Ok(true)
    }

    /// Serves again after a failed takeover. The successor may have written the maps, so the
    /// kernel's state is read afresh and the catalog applied again; returns what to announce.
    pub fn resume(&mut self) -> Arc<Announcement> {
        match self.maps.read_state() {
            Ok(kernel) => {
                self.kernel = Arc::new(kernel);
                self.names_stale = true;
            }
            Err(error) => tracing::error!("cannot read the kernel's state again: {error:#}"),
        }
        self.whole_pipeline_due = true;
        if let Err(error) = self.recompute(Change::All, self.announcement()) {
            tracing::error!("cannot apply the catalog again: {error:#}");
        }
        self.announcement()
    }

    /// Takes the gossip members' latest state and applies the catalog it makes.
    pub fn set_members(&mut self, members: Arc<Vec<Member>>) {
        gossip::log_changes(&self.members, &members);
        self.generation += 1;
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
        let peers = self.peers.announcements();
        let change = peers_change(&self.sources.peers, &peers);
        self.sources.peers = peers;
        if let Err(error) = self.recompute(change, self.announcement()) {
            tracing::error!("cannot apply the mesh catalog, the previous state stays: {error:#}");
        }
    }

    /// Re-reads the config file; a bad file is rejected and the state in force stays.
    /// Returns the config now in force when it changed.
    pub fn reload(&mut self) {
        self.generation += 1;
        let before = self.desired.service_count();
        let result = Config::load(&self.config_path)
            .map_err(anyhow::Error::from)
            .and_then(|config| {
                if config.gossip != self.gossip_config {
                    tracing::warn!("the [gossip] table changed; restart the agent to apply it");
                }
                let change = config_change(&self.sources.config, &config.services);
                let previous_services =
                    std::mem::replace(&mut self.sources.config, config.services.clone());
                let previous = std::mem::replace(&mut self.config, config);
                let local = Arc::new(self.sources.announcement());
                let change = match local.services == self.announcement.services {
                    true => change,
                    false => Change::All,
                };
                self.recompute(change, local).inspect_err(|_| {
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
}

/// What changed between two lists of the peers' announcements (both by node name).
fn peers_change<'a>(
    old: &'a [(String, Arc<Announcement>)],
    new: &'a [(String, Arc<Announcement>)],
) -> Change {
    let by_node = |(n, a): &'a (String, Arc<Announcement>)| (n.as_str(), &**a);
    pair_by_name(old.iter().map(by_node), new.iter().map(by_node))
        .into_iter()
        .filter(|(_, a, b)| !matches!((a, b), (Some(a), Some(b)) if std::ptr::eq(*a, *b)))
        .fold(Change::none(), |change, (_, a, b)| {
            change.and(Change::between(a, b))
        })
}

/// The services a config change touches (their definitions are compared by the caller,
/// through this node's announcement): those whose entry differs.
fn config_change<'a>(old: &'a [Service], new: &'a [Service]) -> Change {
    let by_name = |s: &'a Service| (s.name.as_str(), s);
    Change::Services(
        pair_by_name(old.iter().map(by_name), new.iter().map(by_name))
            .into_iter()
            .filter(|(_, a, b)| a != b)
            .map(|(name, _, _)| name.to_owned())
            .collect(),
    )
}

/// Every name of `old` or `new`, in name order, with its entry on each side.
fn pair_by_name<'a, T>(
    old: impl Iterator<Item = (&'a str, &'a T)>,
    new: impl Iterator<Item = (&'a str, &'a T)>,
) -> Vec<(&'a str, Option<&'a T>, Option<&'a T>)> {
    let old: BTreeMap<&str, &T> = old.collect();
    let new: BTreeMap<&str, &T> = new.collect();
    let names: BTreeSet<&str> = old.keys().chain(new.keys()).copied().collect();
    (names.into_iter())
        .map(|name| (name, old.get(name).copied(), new.get(name).copied()))
        .collect()
}
