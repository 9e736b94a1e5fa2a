//! Computing the ops that take the maps from one state to another.
//!
//! Owns id assignment and op order; see the parent module for the protocol. Deterministic: the
//! same inputs give the same plan, group for group and op for op.

use std::collections::{BTreeMap, BTreeSet};
use std::fmt;
use std::net::IpAddr;

use mesh_common::redirect::SockKey;
use mesh_common::service::{
    Service, ServiceKey, SlotKey, LB_MAGLEV, LB_RANDOM, SERVICE_FLAG_MTLS, SERVICE_FLAG_VIP_MARKER,
};

use super::{KernelState, MapOp};
use crate::balance::{Desired, DesiredService};
use crate::model::{Frontend, LbPolicy, Protocol};
use crate::reconcile::addr::{self, DisplayKey};

/// The ops of one reconcile, grouped so each group can be applied all-or-nothing. No groups:
/// the maps already hold the desired state.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub groups: Vec<OpGroup>,
}

/// The ops for one service (or one VIP marker, or garbage).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OpGroup {
    /// What the group changes, for messages: `service "web" (10.96.0.10:80/tcp)`.
    pub subject: String,
    pub kind: GroupKind,
    pub ops: Vec<MapOp>,
    /// Index in `ops` of the write that makes the change visible (the header flip, or the
    /// header delete of a removal). Ops before it are puts nothing reads yet; ops after it are
    /// deletes of what nothing reads any more. `None`: the group only deletes garbage.
    pub commit: Option<usize>,
}

/// What an [`OpGroup`] does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum GroupKind {
    AddService,
    ChangeService,
    RemoveService,
    /// Puts the marker of a VIP that has services but no (or a wrong) marker.
    VipMarker,
    /// Deletes entries nothing reads: leftovers of an interrupted update or a failed delete.
    Cleanup,
    /// Brings the strict-inbound map to the backends of the strict services: puts first,
    /// then deletes; nothing is taken back on failure (an entry only keeps plaintext out).
    StrictBackends,
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupKind::AddService => "add",
            GroupKind::ChangeService => "change",
            GroupKind::RemoveService => "remove",
            GroupKind::VipMarker => "VIP marker",
            GroupKind::Cleanup => "cleanup",
            GroupKind::StrictBackends => "strict backends",
        })
    }
}

/// The ops that turn `current` into `desired`.
///
/// Order: removed services first (freeing map space), then the desired services in key order,
/// each followed by its VIP's marker if the maps lack it, then garbage no service owns.
/// Service ids are kept per frontend key and backend ids per (service, address); new ones are
/// the smallest ids that no entry of `current` uses, so an id freed by this plan is not reused
/// by it (an entry whose delete fails can never be mistaken for a new one).
pub fn plan(current: &KernelState, desired: &Desired) -> Plan {
    let mut planner = Planner::new(current);
    let mut groups = Vec::new();
    // The desired services by map key: the maps' order is the plan's.
    let desired: BTreeMap<ServiceKey, &DesiredService> = desired
        .services
        .iter()
        .map(|(frontend, service)| (addr::frontend_key(*frontend), &**service))
        .collect();

    // Removed services, and the VIP markers they leave unused.
    let desired_vips: BTreeSet<([u32; 4], u8)> =
        desired.keys().map(|k| (k.addr, k.family)).collect();
    let removed: Vec<&ServiceKey> = planner
        .services
        .keys()
        .filter(|k| !desired.contains_key(*k))
        .collect();
    let mut last_removed_on_vip: BTreeMap<([u32; 4], u8), usize> = BTreeMap::new();
    for (i, key) in removed.iter().enumerate() {
        last_removed_on_vip.insert((key.addr, key.family), i);
    }
    let mut markers_done: BTreeSet<([u32; 4], u8)> = BTreeSet::new();
    for (i, &key) in removed.iter().enumerate() {
        let vip = (key.addr, key.family);
        let last_on_vip = last_removed_on_vip.get(&vip) == Some(&i) && !desired_vips.contains(&vip);
        if last_on_vip {
            markers_done.insert(vip);
        }
        groups.push(planner.removal(key, last_on_vip));
    }

    // Desired services, each with its marker.
    for (key, &service) in &desired {
        if let Some(group) = planner.service(key, service) {
            groups.push(group);
        }
        if markers_done.insert((key.addr, key.family)) {
            groups.extend(marker_group(current, key));
        }
    }

    // Garbage: markers of VIPs without services, slots and backends of no service.
    let mut ops = Vec::new();
    for key in current.services.keys() {
        if addr::is_vip_marker_key(key) && !markers_done.contains(&(key.addr, key.family)) {
            ops.push(MapOp::DeleteService(*key));
        }
    }
    // Both lists come sorted by service id, so one lookup per service id is enough.
    let mut owned = RunCache::new(|sid| planner.owners.contains_key(&sid));
    ops.extend(
        current
            .slots
            .keys()
            .filter(|k| !owned.get(k.service_id))
            .map(|&k| MapOp::DeleteSlot(k)),
    );
    let mut orphans: Vec<u32> = planner
        .backends_by_service
        .iter()
        .filter(|&&(sid, _, _)| !owned.get(sid))
        .map(|&(_, _, id)| id)
        .collect();
    orphans.sort_unstable();
    ops.extend(orphans.into_iter().map(MapOp::DeleteBackend));
    if !ops.is_empty() {
        groups.push(OpGroup {
            subject: "entries of no service".into(),
            kind: GroupKind::Cleanup,
            ops,
            commit: None,
        });
    }

    // The strict-inbound map: every backend of a strict service → that service's id. Last,
    // as when it was written beside the reconciler: the ids are those the groups above gave.
    let strict: BTreeMap<SockKey, u32> = desired
        .iter()
        .filter(|(_, service)| service.strict)
        .filter_map(|(key, service)| Some((planner.ids.get(key).copied()?, service)))
        .flat_map(|(sid, service)| {
            service
                .backends
                .iter()
                .map(move |b| (addr::sock_key(b.addr), sid))
        })
        .collect();
    let mut ops: Vec<MapOp> = strict
        .iter()
        .filter(|&(key, sid)| current.strict.get(key) != Some(sid))
        .map(|(&key, &sid)| MapOp::PutStrict(key, sid))
        .collect();
    ops.extend(
        current
            .strict
            .keys()
            .filter(|key| !strict.contains_key(key))
            .map(|&key| MapOp::DeleteStrict(key)),
    );
    if !ops.is_empty() {
        groups.push(OpGroup {
            subject: "strict backends".into(),
            kind: GroupKind::StrictBackends,
            ops,
            commit: None,
        });
    }
    Plan { groups }
}

/// The ops that bring only the services at `frontends` (those an event touched) from
/// `current` to `desired`, with their VIPs' markers; `None` when they cannot be planned
/// apart from the rest, and [`plan()`] must run instead.
///
/// `current` must be clean, as a plan applied without a failed write leaves the maps: every
/// service owns a unique id, every backend is named by a slot of its service, no slot is
/// dangling. Then the rest of the maps need not be read: these services' entries are found
/// from their headers and slots, and new ids are taken above every id in use (not the smallest
/// free ones), so an id freed by this plan is not reused by it either. The groups are those
/// [`plan()`] would make for these services. Strict services are always planned in full: the
/// strict-inbound map is a function of every strict service at once.
pub fn plan_scoped(
    current: &KernelState,
    desired: &Desired,
    frontends: &BTreeSet<Frontend>,
) -> Option<Plan> {
    let scope: BTreeMap<ServiceKey, (Frontend, Option<&DesiredService>)> = (frontends.iter())
        .map(|f| {
            (
                addr::frontend_key(*f),
                (*f, desired.services.get(f).map(|s| &**s)),
            )
        })
        .collect();
    let strict = |(key, (_, want)): (&ServiceKey, &(Frontend, Option<&DesiredService>))| {
        want.is_some_and(|w| w.strict)
            || (current.services.get(key)).is_some_and(|s| s.flags & SERVICE_FLAG_MTLS != 0)
    };
    if scope.iter().any(strict) {
        return None;
    }
    let mut planner = Planner::scoped(current, scope.keys());
    let mut groups = Vec::new();
    // Removals first, each VIP's marker going with the last service that leaves it.
    let removed: Vec<(&ServiceKey, IpAddr)> = (scope.iter())
        .filter(|(key, (_, want))| want.is_none() && planner.services.contains_key(*key))
        .map(|(key, (frontend, _))| (key, frontend.vip))
        .collect();
    for (i, &(key, vip)) in removed.iter().enumerate() {
        let vip_used = has_vip(desired, vip) || removed[i + 1..].iter().any(|r| r.1 == vip);
        groups.push(planner.removal(key, !vip_used));
    }
    let mut markers_done: BTreeSet<([u32; 4], u8)> = BTreeSet::new();
    for (key, (_, want)) in &scope {
        let Some(want) = want else { continue };
        groups.extend(planner.service(key, want));
        if markers_done.insert((key.addr, key.family)) {
            groups.extend(marker_group(current, key));
        }
    }
    Some(Plan { groups })
}

/// Whether `desired` has a service on `vip`.
fn has_vip(desired: &Desired, vip: IpAddr) -> bool {
    // Frontends sort by VIP first (TCP, port 0 the lowest): a VIP's services are one range.
    let lowest = Frontend {
        vip,
        port: 0,
        protocol: Protocol::Tcp,
    };
    (desired.services.range(lowest..).next()).is_some_and(|(f, _)| f.vip == vip)
}

/// The group that puts the marker of `key`'s VIP, unless `current` holds it already.
fn marker_group(current: &KernelState, key: &ServiceKey) -> Option<OpGroup> {
    let marker_key = ServiceKey::vip_marker(key.addr, key.family);
    let marker = vip_marker();
    (current.services.get(&marker_key) != Some(&marker)).then(|| OpGroup {
        subject: format!("VIP {}", DisplayKey(&marker_key)),
        kind: GroupKind::VipMarker,
        ops: vec![MapOp::PutService(marker_key, marker)],
        commit: Some(0),
    })
}

/// The range of `all` (sorted by service id) that belongs to service `sid`.
fn backends_of(all: &[(u32, BackendAddr, u32)], sid: u32) -> &[(u32, BackendAddr, u32)] {
    let start = all.partition_point(|&(s, _, _)| s < sid);
    let end = all.partition_point(|&(s, _, _)| s <= sid);
    &all[start..end]
}

/// Remembers the answer for the last key, for keys that come in runs.
struct RunCache<F> {
    last: Option<(u32, bool)>,
    f: F,
}

impl<F: Fn(u32) -> bool> RunCache<F> {
    fn new(f: F) -> Self {
        RunCache { last: None, f }
    }

    fn get(&mut self, key: u32) -> bool {
        match self.last {
            Some((k, v)) if k == key => v,
            _ => {
                let v = (self.f)(key);
                self.last = Some((key, v));
                v
            }
        }
    }
}

/// The kernel's policy for a table built for `policy`: `weighted` tables repeat backends in
/// proportion to weight, so the kernel picks them like `random` ones.
pub(crate) const fn kernel_lb(policy: LbPolicy) -> u32 {
    match policy {
        LbPolicy::Random | LbPolicy::Weighted => LB_RANDOM,
        LbPolicy::Maglev => LB_MAGLEV,
    }
}

/// The header flags of a desired service: its affinity's bits, and `SERVICE_FLAG_MTLS` when
/// it is strict.
pub(crate) const fn service_flags(want: &DesiredService) -> u32 {
    addr::affinity_flags(want.affinity) | if want.strict { SERVICE_FLAG_MTLS } else { 0 }
}

/// The header of a VIP marker.
pub(crate) const fn vip_marker() -> Service {
    Service {
        id: 0,
        count: 0,
        generation: 0,
        lb: 0,
        flags: SERVICE_FLAG_VIP_MARKER,
        affinity_timeout_s: 0,
    }
}

/// A backend's address as the maps hold it: words, port, family.
type BackendAddr = ([u32; 4], u16, u8);

/// Index of the current state, and the ids handed out so far.
struct Planner<'a> {
    current: &'a KernelState,
    /// Current services (markers excluded), and whether each owns its id.
    services: BTreeMap<ServiceKey, (Service, bool)>,
    /// Service id → the key that owns it: current services with a valid, unique id, then the
    /// services this plan creates or re-ids.
    owners: BTreeMap<u32, ServiceKey>,
    /// (service id, address, backend id) of every backend, sorted: a service's backends are a
    /// range, sorted by address, the smallest id first among equal addresses.
    backends_by_service: Vec<(u32, BackendAddr, u32)>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
    /// The id of each desired service, once planned.
    ids: BTreeMap<ServiceKey, u32>,
}

impl<'a> Planner<'a> {
    fn new(current: &'a KernelState) -> Self {
        // Adopt each service's id unless it is 0 or another service already has it (neither
        // happens unless the maps were written by something else; such a service is given a
        // fresh id and rewritten).
        let mut owners = BTreeMap::new();
        let services: BTreeMap<ServiceKey, (Service, bool)> = current
            .services
            .iter()
            .filter(|(k, _)| !addr::is_vip_marker_key(k))
            .map(|(k, v)| {
                let owns = v.id != 0 && owners.insert(v.id, *k).is_none();
                (*k, (*v, owns))
            })
            .collect();
        let mut backends_by_service: Vec<(u32, BackendAddr, u32)> = current
            .backends
            .iter()
            .map(|(&id, b)| (b.service_id, (b.addr, b.port, b.family), id))
            .collect();
        backends_by_service.sort_unstable();
        Planner {
            current,
            services,
            owners,
            backends_by_service,
            service_ids: IdAllocator::new(),
            backend_ids: IdAllocator::new(),
            ids: BTreeMap::new(),
        }
    }

    /// The index of the services at `keys` only, for [`plan_scoped`], read from a clean
    /// `current` (see there): each service owns its id, its backends are those its slots
    /// name, and new ids are taken above the largest in use, so nothing else is read.
    fn scoped<'k>(current: &'a KernelState, keys: impl Iterator<Item = &'k ServiceKey>) -> Self {
        let services: BTreeMap<ServiceKey, (Service, bool)> = keys
            .filter_map(|key| Some((*key, (*current.services.get(key)?, true))))
            .collect();
        let owners: BTreeMap<u32, ServiceKey> = (services.iter())
            .map(|(key, (service, _))| (service.id, *key))
            .collect();
        let mut backends_by_service: Vec<(u32, BackendAddr, u32)> = Vec::new();
        for &sid in owners.keys() {
            let mut ids: Vec<u32> = Self::slots_in(current, sid).map(|(_, id)| id).collect();
            ids.sort_unstable();
            ids.dedup();
            let backends = ids
                .iter()
                .filter_map(|id| Some((id, current.backends.get(id)?)));
            backends_by_service
                .extend(backends.map(|(&id, b)| (sid, (b.addr, b.port, b.family), id)));
        }
        backends_by_service.sort_unstable();
        // Every service has slots but one with no backend of weight: its header is read.
        let service_ids = (current.services.values().map(|s| s.id))
            .chain(current.slots.get_max().map(|(k, _)| k.service_id));
        let backend_id = current.backends.get_max().map(|&(id, _)| id);
        Planner {
            current,
            services,
            owners,
            backends_by_service,
            service_ids: IdAllocator::above(service_ids.max().unwrap_or(0)),
            backend_ids: IdAllocator::above(backend_id.unwrap_or(0)),
            ids: BTreeMap::new(),
        }
    }

    /// The group that removes the service at `key`: its header first, then what it owns;
    /// with its VIP's marker when `last_on_vip` (no desired service is left on the VIP).
    fn removal(&self, key: &ServiceKey, last_on_vip: bool) -> OpGroup {
        let mut ops = vec![MapOp::DeleteService(*key)];
        if let Some(sid) = self.owned_id(key) {
            ops.extend(self.slots_of(sid).map(|(k, _)| MapOp::DeleteSlot(k)));
            ops.extend(
                self.backends_of(sid)
                    .iter()
                    .map(|b| MapOp::DeleteBackend(b.2)),
            );
        }
        let marker = ServiceKey::vip_marker(key.addr, key.family);
        if last_on_vip && self.current.services.contains_key(&marker) {
            ops.push(MapOp::DeleteService(marker));
        }
        OpGroup {
            subject: format!("service {}", DisplayKey(key)),
            kind: GroupKind::RemoveService,
            ops,
            commit: Some(0),
        }
    }

    /// The id `key` owns in the current state, if it owns one.
    fn owned_id(&self, key: &ServiceKey) -> Option<u32> {
        match self.services.get(key) {
            Some(&(svc, true)) => Some(svc.id),
            _ => None,
        }
    }

    /// Slots of service `sid`, both generations, in key order.
    fn slots_of(&self, sid: u32) -> impl Iterator<Item = (SlotKey, u32)> + 'a {
        Self::slots_in(self.current, sid)
    }

    /// Slots of service `sid` in `current`, both generations, in key order.
    fn slots_in(current: &'a KernelState, sid: u32) -> impl Iterator<Item = (SlotKey, u32)> + 'a {
        let lo = SlotKey {
            service_id: sid,
            generation: 0,
            slot: 0,
        };
        let hi = SlotKey {
            service_id: sid,
            generation: u32::MAX,
            slot: u32::MAX,
        };
        current.slots.range(lo..=hi).map(|(k, v)| (*k, *v))
    }

    /// (service id, address, backend id) of the backends of service `sid`, by address.
    fn backends_of(&self, sid: u32) -> &[(u32, BackendAddr, u32)] {
        backends_of(&self.backends_by_service, sid)
    }

    /// The group for a desired service, or `None` when the maps already hold it exactly.
    fn service(&mut self, key: &ServiceKey, want: &DesiredService) -> Option<OpGroup> {
        let (current, adopted) = match self.services.get(key) {
            Some(&(svc, owns)) => (Some(svc), owns.then_some(svc.id)),
            None => (None, None),
        };
        let (sid, kind) = match (current, adopted) {
            (Some(_), Some(sid)) => (sid, GroupKind::ChangeService),
            (Some(_), None) => (self.new_service_id(key), GroupKind::ChangeService),
            (None, _) => (self.new_service_id(key), GroupKind::AddService),
        };
        self.ids.insert(*key, sid);

        // Backend ids: reuse this service's entry for the same address (the smallest id if
        // there are several), else a new id. Sorted slices, not maps: this runs for every
        // service on every reconcile.
        let existing = match adopted {
            // A free function, not the method: the loop below allocates ids meanwhile.
            Some(sid) => backends_of(&self.backends_by_service, sid),
            None => &[],
        };
        let mut ops = Vec::new();
        // Id of each of `want.backends`, once known.
        let mut ids: Vec<Option<u32>> = vec![None; want.backends.len()];
        let mut slots: Vec<u32> = Vec::with_capacity(want.table.len());
        for &index in &want.table {
            let index = index as usize;
            let Some(backend) = want.backends.get(index) else {
                continue;
            };
            let id = match ids[index] {
                Some(id) => id,
                None => {
                    let entry = addr::backend(backend.addr, sid);
                    let addr = (entry.addr, entry.port, entry.family);
                    let at = existing.partition_point(|&(_, a, _)| a < addr);
                    let id = match existing.get(at) {
                        Some(&(_, a, id)) if a == addr => id,
                        _ => {
                            let current = self.current;
                            let id = self.backend_ids.allocate(|| {
                                current
                                    .backends
                                    .keys()
                                    .copied()
                                    .chain(current.slots.values().copied())
                            });
                            ops.push(MapOp::PutBackend(id, entry));
                            id
                        }
                    };
                    ids[index] = Some(id);
                    id
                }
            };
            slots.push(id);
        }
        let count = u32::try_from(slots.len()).unwrap_or(u32::MAX);

        // Does the active generation already hold exactly these slots?
        let active_gen = match (current, adopted) {
            (Some(cur), Some(_)) if cur.generation <= 1 => {
                // Slots 0..count of one generation are contiguous keys: one range scan.
                let from = SlotKey {
                    service_id: sid,
                    generation: cur.generation,
                    slot: 0,
                };
                let mut held = self.current.slots.range(from..).map(|(k, &id)| (*k, id));
                let same = cur.count == count
                    && slots.iter().enumerate().all(|(i, &id)| {
                        let k = SlotKey {
                            slot: i as u32,
                            ..from
                        };
                        held.next() == Some((k, id))
                    });
                same.then_some(cur.generation)
            }
            _ => None,
        };
        let generation = match (active_gen, current) {
            (Some(g), _) => g,
            (None, Some(cur)) if adopted.is_some() && cur.generation == 0 => 1,
            (None, _) => 0,
        };
        if active_gen.is_none() {
            ops.extend(slots.iter().enumerate().map(|(i, &id)| {
                MapOp::PutSlot(
                    SlotKey {
                        service_id: sid,
                        generation,
                        slot: i as u32,
                    },
                    id,
                )
            }));
        }
        let header = Service {
            id: sid,
            count,
            generation,
            lb: kernel_lb(want.policy),
            flags: service_flags(want),
            affinity_timeout_s: want.affinity_timeout_s,
        };
        let commit = if current != Some(header) {
            ops.push(MapOp::PutService(*key, header));
            Some(ops.len() - 1)
        } else {
            None
        };

        // Then delete whatever this service owned that the new header does not reach.
        if adopted.is_some() {
            let mut keep = slots.clone();
            keep.sort_unstable();
            keep.dedup();
            ops.extend(
                self.slots_of(sid)
                    .filter(|(k, _)| k.generation != generation || k.slot >= count)
                    .map(|(k, _)| MapOp::DeleteSlot(k)),
            );
            ops.extend(
                self.backends_of(sid)
                    .iter()
                    .map(|b| b.2)
                    .filter(|id| keep.binary_search(id).is_err())
                    .map(MapOp::DeleteBackend),
            );
        }
        if ops.is_empty() {
            return None;
        }
        let kind = if commit.is_none() {
            GroupKind::Cleanup
        } else {
            kind
        };
        Some(OpGroup {
            subject: format!("service {:?} ({})", want.name, DisplayKey(key)),
            kind,
            ops,
            commit,
        })
    }

    fn new_service_id(&mut self, key: &ServiceKey) -> u32 {
        let current = self.current;
        let id = self.service_ids.allocate(|| {
            current
                .services
                .values()
                .map(|s| s.id)
                .chain(current.slots.keys().map(|k| k.service_id))
                .chain(current.backends.values().map(|b| b.service_id))
        });
        self.owners.insert(id, *key);
        id
    }
}

/// Hands out the smallest ids ≥ 1 that no entry uses. The ids in use are collected on the
/// first allocation only, so planning an unchanged state costs nothing here.
struct IdAllocator {
    /// Sorted, deduplicated ids in use; `None` until the first allocation.
    used: Option<Vec<u32>>,
    /// Index in `used` of the first id ≥ `next`.
    pos: usize,
    next: u32,
}

impl IdAllocator {
    fn new() -> Self {
        IdAllocator {
            used: None,
            pos: 0,
            next: 1,
        }
    }

    /// Hands out `max + 1`, `max + 2`, ...: ids above `max`, the largest in use.
    fn above(max: u32) -> Self {
        IdAllocator {
            used: Some(Vec::new()),
            pos: 0,
            next: max.saturating_add(1),
        }
    }

    /// The smallest id ≥ 1 not in `in_use()` and not handed out before. Ids handed out are
    /// increasing, so one pass over the sorted ids in use serves every allocation.
    fn allocate<I: Iterator<Item = u32>>(&mut self, in_use: impl FnOnce() -> I) -> u32 {
        let used = self.used.get_or_insert_with(|| {
            let mut v: Vec<u32> = in_use().collect();
            v.sort_unstable();
            v.dedup();
            v
        });
        // Map capacities (at most 2^18 entries) keep this far from u32::MAX.
        loop {
            while used.get(self.pos).is_some_and(|&u| u < self.next) {
                self.pos += 1;
            }
            if used.get(self.pos) == Some(&self.next) {
                self.next = self.next.saturating_add(1);
                continue;
            }
            let id = self.next;
            self.next = self.next.saturating_add(1);
            return id;
        }
    }
}
