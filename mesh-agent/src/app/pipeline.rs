//! The controller's pipeline: from a change of the catalog's sources, or of health, to the
//! kernel. Each stage goes only as far as the change reaches: a change of some services'
//! endpoints ([`Change::Services`]: a registration, a peer's endpoints, a config that changed
//! no definition) merges, health-masks and plans those services only, the rest shared with
//! the state in force; a change of definitions ([`Change::All`]) makes the whole catalog
//! again. The kernel's garbage is collected by the full plans (at start, on a change of
//! definitions, and after any write that failed).

use std::{
    collections::{BTreeSet, HashMap, HashSet},
    net::SocketAddr,
    sync::Arc,
    time::Instant,
};

use mesh_common::service::ServiceKey;

use super::controller::Controller;
use crate::{
    balance::{Desired, DesiredService},
    catalog::{Announcement, Change, Conflict, ConflictKind},
    model::{Frontend, Service},
    reconcile::{self, plan, plan::Plan, MapOp},
};

/// The most services an event merges one by one; a change of more merges the whole catalog.
const MAX_SCOPED_SERVICES: usize = 32;

impl Controller {
    /// Makes the catalog again after `change` of its sources, `local` this node's
    /// announcement now, applies health and brings the kernel to the result. On error the
    /// previous catalog stays in force, health included.
    pub(super) fn recompute(
        &mut self,
        change: Change,
        local: Arc<Announcement>,
    ) -> anyhow::Result<()> {
        match change {
            // Services outside the catalog (undefined, or left out for their frontend) take
            // part in conflicts the whole catalog decides. Each service merged alone reads
            // every announcement: past a few, one merge of all is cheaper (and a peer that
            // rewrites all its endpoints cannot make the merge quadratic).
            Change::Services(names)
                if names.len() <= MAX_SCOPED_SERVICES
                    && names.iter().all(|n| self.service_index(n).is_some()) =>
            {
                self.recompute_services(&names, local)
            }
            _ => self.recompute_all(local),
        }
    }

    /// Whether the next event must go through the whole pipeline.
    fn whole_pipeline(&self) -> bool {
        self.whole_pipeline_due || !self.incremental
    }

    /// The index in `self.services` (sorted by name) of service `name`.
    fn service_index(&self, name: &str) -> Option<usize> {
        (self.services)
            .binary_search_by(|s| s.name.as_str().cmp(name))
            .ok()
    }

    /// Merges every source again.
    fn recompute_all(&mut self, local: Arc<Announcement>) -> anyhow::Result<()> {
        let merged = self.sources.catalog_with(&local);
        let catalog = merged.desired();
        self.health.sync(&merged.services);
        let mut desired = catalog.clone();
        self.health.apply(&mut desired);
        if let Err(error) = self.apply(desired, None) {
            self.health.sync(&self.services);
            return Err(error);
        }
        self.services = merged.services;
        self.catalog = catalog;
        self.settle(merged.conflicts, local);
        Ok(())
    }

    /// Merges the services `names` again (all of the catalog in force, their definitions
    /// unchanged); the others are shared with the state in force.
    fn recompute_services(
        &mut self,
        names: &BTreeSet<String>,
        local: Arc<Announcement>,
    ) -> anyhow::Result<()> {
        let mut conflicts: Vec<Conflict> = (self.conflicts.iter())
            .filter(|c| !(c.kind == ConflictKind::Endpoint && names.contains(&c.service)))
            .cloned()
            .collect();
        let mut merged: Vec<(usize, Service)> = Vec::with_capacity(names.len());
        for name in names {
            let Some(at) = self.service_index(name) else {
                continue;
            };
            let (service, found) = self.sources.service_with(&local, &self.services[at]);
            conflicts.extend(found);
            merged.push((at, service));
        }
        conflicts.sort();
        let mut desired = (*self.desired).clone();
        let mut wanted = Vec::with_capacity(merged.len());
        for (_, service) in &merged {
            self.health.sync_service(service);
            let want = Arc::new(DesiredService::from_config(service));
            desired.services.insert(want.frontend(), Arc::clone(&want));
            wanted.push(want);
        }
        let frontends: BTreeSet<Frontend> = wanted.iter().map(|w| w.frontend()).collect();
        self.health.apply_to(&mut desired, names);
        if let Err(error) = self.apply(desired, Some(&frontends)) {
            for (at, _) in &merged {
                self.health.sync_service(&self.services[*at]);
            }
            return Err(error);
        }
        for (at, service) in merged {
            self.services[at] = service;
        }
        for want in wanted {
            self.catalog.services.insert(want.frontend(), want);
        }
        self.settle(conflicts, local);
        Ok(())
    }

    /// Takes a catalog that reached the kernel into force (its services already in
    /// `self.services` and `self.catalog`): its conflicts, the tunnel's services, the checks.
    fn settle(&mut self, conflicts: Vec<Conflict>, local: Arc<Announcement>) {
        for conflict in &conflicts {
            if !self.conflicts.contains(conflict) {
                tracing::warn!(%conflict, "catalog conflict");
            }
        }
        if let Some(tunnel) = &self.tunnel {
            let strict: HashSet<&str> = (self.services.iter())
                .filter(|s| s.mtls)
                .map(|s| s.name.as_str())
                .collect();
            let reachable = local.reachable_by_peers(&strict);
            let hosted = |service: &str, backend: SocketAddr| {
                reachable.contains(&(service.to_owned(), backend))
            };
            tunnel.update(
                &crate::tunnel::authz::mtls_services(
                    &self.services,
                    &self.config.services,
                    &hosted,
                ),
                self.config.policies.clone(),
            );
        }
        self.conflicts = conflicts;
        self.checker.sync(self.health.targets());
        self.announcement = local;
    }

    /// Re-applies the catalog after a health change of the services `names`.
    pub(super) fn refresh(&mut self, names: &BTreeSet<String>) {
        if names.is_empty() {
            return;
        }
        if self.whole_pipeline() {
            let mut desired = self.catalog.clone();
            self.health.apply(&mut desired);
            if let Err(error) = self.apply(desired, None) {
                tracing::error!("cannot apply a health change to the kernel: {error:#}");
            }
            return;
        }
        let mut desired = (*self.desired).clone();
        let mut frontends = BTreeSet::new();
        for name in names {
            let Some(at) = self.service_index(name) else {
                continue;
            };
            let frontend = self.services[at].frontend();
            if let Some(service) = self.catalog.services.get(&frontend) {
                desired.services.insert(frontend, Arc::clone(service));
                frontends.insert(frontend);
            }
        }
        self.health.apply_to(&mut desired, names);
        if let Err(error) = self.apply(desired, Some(&frontends)) {
            tracing::error!("cannot apply a health change to the kernel: {error:#}");
        }
    }

    /// Brings the kernel to `desired`; on success it becomes the state in force. With
    /// `scope` (the frontends an event touched, all that differs from the state in force),
    /// only those are planned, unless a full plan is due or the scope cannot be planned alone.
    pub(super) fn apply(
        &mut self,
        desired: Desired,
        scope: Option<&BTreeSet<Frontend>>,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        self.generation += 1;
        let scoped = (scope.filter(|_| !self.whole_pipeline()))
            .and_then(|frontends| plan::plan_scoped(&self.kernel, &desired, frontends));
        let plan = scoped.unwrap_or_else(|| reconcile::plan(&self.kernel, &desired));
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
        self.rename(&plan, &removed, &desired, scope);
        // A failed write leaves the state in force behind what the sources and health say,
        // and a failed delete leaves entries only a full plan finds.
        self.whole_pipeline_due = !matches!(&result, Ok(report) if report.warnings.is_empty());
        let report = result?;
        self.desired = Arc::new(desired);
        // Published and logged after the maps were written, with what the kernel holds now:
        // every desired service (the benches follow `GET /v1/applied` to time changes).
        let services = self.desired.services.len();
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
    /// named, from `desired` or the state in force. Names only change where definitions do:
    /// with a `scope` (an event that changed none) they are not compared.
    fn rename(
        &mut self,
        plan: &Plan,
        removed: &[(ServiceKey, u32)],
        desired: &Desired,
        scope: Option<&BTreeSet<Frontend>>,
    ) {
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
        if scope.is_none() {
            keys.extend(
                (desired.services.iter())
                    .filter(|(frontend, s)| {
                        self.desired.services.get(frontend).map(|old| &old.name) != Some(&s.name)
                    })
                    .map(|(frontend, _)| reconcile::addr::frontend_key(*frontend)),
            );
        }
        let current = self.names.current();
        let gone = (removed.iter())
            .filter(|(key, id)| !self.kernel.services.contains_key(key) && current.contains_key(id))
            .map(|&(_, id)| (id, None));
        // An event's plan writes the services in its scope (a full plan it fell back to may
        // write others): looked up directly when it did.
        let scoped: Option<HashMap<ServiceKey, String>> = scope.map(|scope| {
            (scope.iter())
                .filter_map(|f| Some((reconcile::addr::frontend_key(*f), desired.services.get(f)?)))
                .filter(|(key, _)| keys.contains(key))
                .map(|(key, s)| (key, s.name.clone()))
                .collect()
        });
        let new = match scoped {
            Some(scoped) if scoped.len() == keys.len() => scoped,
            _ => by_key(desired, Some(&keys)),
        };
        let named = (keys.iter())
            .filter_map(|key| Some((self.kernel.services.get(key)?.id, new.get(key)?)))
            .filter(|(id, name)| current.get(id) != Some(*name))
            .map(|(id, name)| (id, Some(name.clone())));
        let changes: Vec<(u32, Option<String>)> = gone.chain(named).collect();
        if changes.is_empty() {
            return;
        }
        let mut names = (*current).clone();
        for (id, name) in changes {
            match name {
                Some(name) => names.insert(id, name),
                None => names.remove(&id),
            };
        }
        self.names.publish(names);
    }
}
