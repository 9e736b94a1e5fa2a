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
    collections::{HashMap, HashSet},
    net::SocketAddr,
    path::PathBuf,
    sync::Arc,
    time::Instant,
};

use anyhow::Context as _;
use mesh_common::service::ServiceKey;

use crate::{
    balance::Desired,
    catalog::{registry::Registry, Announcement, Conflict, Endpoint, Registrations, Sources},
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
    reconcile::{self, kernel::Kernel, plan::Plan, KernelState, MapOp},
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
        controller.recompute()?;
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
        self.change_registrations(|r| r.register(endpoint))
    }

    /// Withdraws a registered endpoint; `false` when it was not registered.
    pub fn deregister(&mut self, service: &str, address: SocketAddr) -> Result<bool, String> {
        self.change_registrations(|r| Ok(r.deregister(service, address)))
    }

    /// Brings the kernel to `desired`; on success it becomes the state in force.
    fn apply(&mut self, desired: Desired) -> anyhow::Result<()> {
        let started = Instant::now();
        self.generation += 1;
        let plan = reconcile::plan(&self.kernel, &desired);
        // The ids the plan's removals free, read before the writes.
        let removed: Vec<(ServiceKey, u32)> = (plan.groups.iter())
            .flat_map(|g| &g.ops)
            .filter_map(|op| match op {
                MapOp::DeleteService(key) => Some((*key, self.kernel.services.get(key)?.id)),
                _ => None,
            })
            .collect();
        let result = match plan.groups.is_empty() {
            true => Ok(reconcile::apply::ApplyReport::default()),
            false => reconcile::apply(&plan, &mut *self.maps, Arc::make_mut(&mut self.kernel)),
        };
        // Whatever was applied is in the kernel now; name it for flows either way.
        self.rename(&plan, &removed, &desired);
        let report = result?;
        self.desired = Arc::new(desired);
        // Published and logged after the maps were written, with what the kernel holds now
        // (the benches follow `GET /v1/applied` to time changes).
        let services = self.kernel.services.keys();
        let services = services
            .filter(|k| !reconcile::addr::is_vip_marker_key(k))
            .count();
        let applied =
            (self.applied).publish(started.elapsed(), services, self.kernel.backends.len());
        tracing::info!(
            %report,
            seq = applied.seq,
            elapsed_us = applied.elapsed_us,
            services = applied.services,
            backends = applied.backends,
            "config applied to the kernel"
        );
        Ok(())
    }

    /// Brings the service names up to what the kernel holds after `plan` was applied, all of
    /// it or part: the ids of `removed` services whose delete went through lose their name,
    /// the services whose header was written or whose name changed are named from `desired`.
    /// After a restart or a resume (no names yet, or a kernel read afresh) every service is
    /// named, from `desired` or the state in force.
    fn rename(&mut self, plan: &Plan, removed: &[(ServiceKey, u32)], desired: &Desired) {
        let by_key = |d: &Desired, keys: Option<&HashSet<ServiceKey>>| {
            (d.services.iter())
                .map(|(frontend, s)| (reconcile::addr::frontend_key(*frontend), s))
                .filter(|(key, _)| keys.is_none_or(|keys| keys.contains(key)))
                .map(|(key, s)| (key, s.name.clone()))
                .collect::<HashMap<ServiceKey, String>>()
        };
        if self.names_stale {
            let (new, old) = (by_key(desired, None), by_key(&self.desired, None));
            let names = (self.kernel.services.iter())
                .filter_map(|(key, service)| {
                    let name = new.get(key).or_else(|| old.get(key))?;
                    Some((service.id, name.clone()))
                })
                .collect();
            self.names.publish(names);
            self.names_stale = false;
            return;
        }
        // Services whose header was written (new, or a new id), and those that kept their
        // header under another name.
        let mut keys: HashSet<ServiceKey> = (plan.groups.iter())
            .flat_map(|g| &g.ops)
            .filter_map(|op| match op {
                &MapOp::PutService(key, _) if !reconcile::addr::is_vip_marker_key(&key) => {
                    Some(key)
                }
                _ => None,
            })
            .collect();
        keys.extend(
            (desired.services.iter())
                .filter(|(frontend, s)| {
                    self.desired.services.get(frontend).map(|old| &old.name) != Some(&s.name)
                })
                .map(|(frontend, _)| reconcile::addr::frontend_key(*frontend)),
        );
        let mut gone = removed
            .iter()
            .filter(|(key, _)| !self.kernel.services.contains_key(key))
            .peekable();
        if keys.is_empty() && gone.peek().is_none() {
            return;
        }
        let new = by_key(desired, Some(&keys));
        let mut names = (*self.names.current()).clone();
        for (_, id) in gone {
            names.remove(id);
        }
        for key in &keys {
            if let (Some(service), Some(name)) = (self.kernel.services.get(key), new.get(key)) {
                names.insert(service.id, name.clone());
            }
        }
        self.names.publish(names);
    }

    /// Re-applies the catalog after a health change.
    fn refresh(&mut self) {
        let mut desired = self.catalog.clone();
        self.health.apply(&mut desired);
        if let Err(error) = self.apply(desired) {
            tracing::error!("cannot apply a health change to the kernel: {error:#}");
        }
    }

    pub fn on_probe(&mut self, report: ProbeReport) {
        self.generation += 1;
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
    pub fn tick(&mut self) {
        let now = Instant::now();
        let mut changed = match self.maps.connect_outcomes() {
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
        let local = self.sources.announcement();
        let merged = self.sources.catalog_with(&local);
        let catalog = merged.desired();
        self.health.sync(&merged.services);
        let mut desired = catalog.clone();
        self.health.apply(&mut desired);
        if let Err(error) = self.apply(desired) {
            self.health.sync(&self.services);
            return Err(error);
        }
        for conflict in &merged.conflicts {
            if !self.conflicts.contains(conflict) {
                tracing::warn!(%conflict, "catalog conflict");
            }
        }
        if let Some(tunnel) = &self.tunnel {
            let reachable = local.reachable_by_peers();
            let hosted = |service: &str, backend: SocketAddr| {
                reachable.contains(&(service.to_owned(), backend))
            };
            tunnel.update(
                &crate::tunnel::authz::mtls_services(
                    &merged.services,
                    &self.config.services,
                    &hosted,
                ),
                self.config.policies.clone(),
            );
        }
        self.conflicts = merged.conflicts;
        self.checker.sync(self.health.targets());
        self.catalog = catalog;
        self.services = merged.services;
        self.announcement = Arc::new(local);
        Ok(())
    }

    /// Changes the registered endpoints, applies the result and keeps it on disk; a change
    /// the kernel refuses, or that cannot be kept, is undone.
    fn change_registrations(
        &mut self,
        change: impl FnOnce(&mut Registrations) -> Result<bool, String>,
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
    pub fn resume(&mut self) -> Arc<Announcement> {
        match self.maps.read_state() {
            Ok(kernel) => {
                self.kernel = Arc::new(kernel);
                self.names_stale = true;
            }
            Err(error) => tracing::error!("cannot read the kernel's state again: {error:#}"),
        }
        if let Err(error) = self.recompute() {
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
        self.sources.peers = self.peers.announcements();
        if let Err(error) = self.recompute() {
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
}
