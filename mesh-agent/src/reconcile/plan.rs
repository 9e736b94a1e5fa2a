//! Computing the ops that take the maps from one state to another.
//!
//! Owns id assignment and op order; see the parent module for the protocol. Deterministic: the
//! same inputs give the same plan, group for group and op for op.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::fmt;
use std::net::SocketAddr;

use mesh_common::service::{Service, ServiceKey, SlotKey, SERVICE_FLAG_VIP_MARKER};

use super::{KernelState, MapOp};
use crate::desired::{Desired, DesiredService};
use crate::kernel_addr::{self, DisplayKey};

/// The ops of one reconcile, grouped so each group can be applied all-or-nothing.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Plan {
    pub groups: Vec<OpGroup>,
}

impl Plan {
    /// True when the maps already hold the desired state.
    pub fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }

    /// Number of ops in all groups.
    pub fn op_count(&self) -> usize {
        self.groups.iter().map(|g| g.ops.len()).sum()
    }

    /// Every op, in order.
    pub fn ops(&self) -> impl Iterator<Item = &MapOp> {
        self.groups.iter().flat_map(|g| g.ops.iter())
    }
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
}

impl fmt::Display for GroupKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            GroupKind::AddService => "add",
            GroupKind::ChangeService => "change",
            GroupKind::RemoveService => "remove",
            GroupKind::VipMarker => "VIP marker",
            GroupKind::Cleanup => "cleanup",
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

    // Removed services, and the VIP markers they leave unused.
    let desired_vips: BTreeSet<([u32; 4], u8)> =
        desired.services.keys().map(|k| (k.addr, k.family)).collect();
    let removed: Vec<&ServiceKey> = planner
        .services
        .keys()
        .filter(|k| !desired.services.contains_key(*k))
        .collect();
    let mut last_removed_on_vip: BTreeMap<([u32; 4], u8), usize> = BTreeMap::new();
    for (i, key) in removed.iter().enumerate() {
        last_removed_on_vip.insert((key.addr, key.family), i);
    }
    let mut markers_done: BTreeSet<([u32; 4], u8)> = BTreeSet::new();
    for (i, &key) in removed.iter().enumerate() {
        let vip = (key.addr, key.family);
        let mut ops = vec![MapOp::DeleteService(*key)];
        if let Some(sid) = planner.owned_id(key) {
            ops.extend(planner.slots_of(sid).map(|(k, _)| MapOp::DeleteSlot(k)));
            ops.extend(planner.backends_of(sid).iter().map(|&id| MapOp::DeleteBackend(id)));
        }
        if last_removed_on_vip.get(&vip) == Some(&i) && !desired_vips.contains(&vip) {
            let marker = ServiceKey::vip_marker(key.addr, key.family);
            if current.services.contains_key(&marker) {
                ops.push(MapOp::DeleteService(marker));
            }
            markers_done.insert(vip);
        }
        groups.push(OpGroup {
            subject: format!("service {}", DisplayKey(key)),
            kind: GroupKind::RemoveService,
            ops,
            commit: Some(0),
        });
    }

    // Desired services, each with its marker.
    for (key, service) in &desired.services {
        if let Some(group) = planner.service(key, service) {
            groups.push(group);
        }
        let vip = (key.addr, key.family);
        if markers_done.insert(vip) {
            let marker_key = ServiceKey::vip_marker(key.addr, key.family);
            let marker = vip_marker();
            if current.services.get(&marker_key) != Some(&marker) {
                groups.push(OpGroup {
                    subject: format!("VIP {}", DisplayKey(&marker_key)),
                    kind: GroupKind::VipMarker,
                    ops: vec![MapOp::PutService(marker_key, marker)],
                    commit: Some(0),
                });
            }
        }
    }

    // Garbage: markers of VIPs without services, slots and backends of no service.
    let mut ops = Vec::new();
    for key in current.services.keys() {
        if kernel_addr::is_vip_marker_key(key) && !markers_done.contains(&(key.addr, key.family)) {
            ops.push(MapOp::DeleteService(*key));
        }
    }
    let owners: BTreeSet<u32> = planner.owners.keys().copied().collect();
    ops.extend(
        current
            .slots
            .keys()
            .filter(|k| !owners.contains(&k.service_id))
            .map(|&k| MapOp::DeleteSlot(k)),
    );
    ops.extend(
        current
            .backends
            .iter()
            .filter(|(_, b)| !owners.contains(&b.service_id))
            .map(|(&id, _)| MapOp::DeleteBackend(id)),
    );
    if !ops.is_empty() {
        groups.push(OpGroup {
            subject: "entries of no service".into(),
            kind: GroupKind::Cleanup,
            ops,
            commit: None,
        });
    }
    Plan { groups }
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

/// Index of the current state, and the ids handed out so far.
struct Planner<'a> {
    current: &'a KernelState,
    /// Current services (markers excluded).
    services: BTreeMap<ServiceKey, Service>,
    /// Service id → the key that owns it: current services with a valid, unique id, then the
    /// services this plan creates or re-ids.
    owners: BTreeMap<u32, ServiceKey>,
    /// Service id → its backend ids, ascending.
    backends_by_service: HashMap<u32, Vec<u32>>,
    service_ids: IdAllocator,
    backend_ids: IdAllocator,
}

impl<'a> Planner<'a> {
    fn new(current: &'a KernelState) -> Self {
        let services: BTreeMap<ServiceKey, Service> = current
            .services
            .iter()
            .filter(|(k, _)| !kernel_addr::is_vip_marker_key(k))
            .map(|(k, v)| (*k, *v))
            .collect();
        // Adopt each service's id unless it is 0 or another service already has it (neither
        // happens unless the maps were written by something else; such a service is given a
        // fresh id and rewritten).
        let mut owners = BTreeMap::new();
        for (key, svc) in &services {
            if svc.id != 0 {
                owners.entry(svc.id).or_insert(*key);
            }
        }
        let mut backends_by_service: HashMap<u32, Vec<u32>> = HashMap::new();
        for (&id, backend) in &current.backends {
            backends_by_service.entry(backend.service_id).or_default().push(id);
        }
        let service_ids = IdAllocator::new(
            services
                .values()
                .map(|s| s.id)
                .chain(current.slots.keys().map(|k| k.service_id))
                .chain(current.backends.values().map(|b| b.service_id)),
        );
        let backend_ids = IdAllocator::new(
            current
                .backends
                .keys()
                .copied()
                .chain(current.slots.values().copied()),
        );
        Planner {
            current,
            services,
            owners,
            backends_by_service,
            service_ids,
            backend_ids,
        }
    }

    /// The id `key` owns in the current state, if it owns one.
    fn owned_id(&self, key: &ServiceKey) -> Option<u32> {
        let id = self.services.get(key)?.id;
        (self.owners.get(&id) == Some(key)).then_some(id)
    }

    /// Slots of service `sid`, both generations, in key order.
    fn slots_of(&self, sid: u32) -> impl Iterator<Item = (SlotKey, u32)> + 'a {
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
        self.current.slots.range(lo..=hi).map(|(k, v)| (*k, *v))
    }

    fn backends_of(&self, sid: u32) -> &[u32] {
        self.backends_by_service.get(&sid).map_or(&[], Vec::as_slice)
    }

    /// The group for a desired service, or `None` when the maps already hold it exactly.
    fn service(&mut self, key: &ServiceKey, want: &DesiredService) -> Option<OpGroup> {
        let subject = format!("service {:?} ({})", want.name, DisplayKey(key));
        let current = self.services.get(key).copied();
        let adopted = self.owned_id(key);
        let (sid, kind) = match (current, adopted) {
            (Some(_), Some(sid)) => (sid, GroupKind::ChangeService),
            (Some(_), None) => (self.new_service_id(key), GroupKind::ChangeService),
            (None, _) => (self.new_service_id(key), GroupKind::AddService),
        };

        // Backend ids: reuse this service's entry for the same address, else a new id.
        let mut existing: HashMap<SocketAddr, u32> = HashMap::new();
        if adopted.is_some() {
            for &id in self.backends_of(sid) {
                if let Some(addr) = self
                    .current
                    .backends
                    .get(&id)
                    .and_then(|b| kernel_addr::decode_backend(b).ok())
                {
                    existing.entry(addr).or_insert(id);
                }
            }
        }
        let mut ops = Vec::new();
        let mut ids: BTreeMap<SocketAddr, u32> = BTreeMap::new();
        let mut slots: Vec<u32> = Vec::with_capacity(want.table.len());
        for addr in want.table_addrs() {
            let id = match ids.get(&addr) {
                Some(&id) => id,
                None => {
                    let id = match existing.get(&addr) {
                        Some(&id) => id,
                        None => {
                            let id = self.backend_ids.allocate();
                            ops.push(MapOp::PutBackend(id, kernel_addr::backend(addr, sid)));
                            id
                        }
                    };
                    ids.insert(addr, id);
                    id
                }
            };
            slots.push(id);
        }
        let count = u32::try_from(slots.len()).unwrap_or(u32::MAX);

        // Does the active generation already hold exactly these slots?
        let active_gen = match (current, adopted) {
            (Some(cur), Some(_)) if cur.generation <= 1 => {
                let same = cur.count == count
                    && slots.iter().enumerate().all(|(i, &id)| {
                        let k = SlotKey {
                            service_id: sid,
                            generation: cur.generation,
                            slot: i as u32,
                        };
                        self.current.slots.get(&k) == Some(&id)
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
            lb: want.lb,
            flags: want.flags,
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
            let keep: BTreeSet<u32> = slots.iter().copied().collect();
            ops.extend(
                self.slots_of(sid)
                    .filter(|(k, _)| k.generation != generation || k.slot >= count)
                    .map(|(k, _)| MapOp::DeleteSlot(k)),
            );
            ops.extend(
                self.backends_of(sid)
                    .iter()
                    .filter(|id| !keep.contains(id))
                    .map(|&id| MapOp::DeleteBackend(id)),
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
            subject,
            kind,
            ops,
            commit,
        })
    }

    fn new_service_id(&mut self, key: &ServiceKey) -> u32 {
        let id = self.service_ids.allocate();
        self.owners.insert(id, *key);
        id
    }
}

/// Hands out the smallest ids ≥ 1 not in use.
struct IdAllocator {
    used: BTreeSet<u32>,
    next: u32,
}

impl IdAllocator {
    fn new(used: impl IntoIterator<Item = u32>) -> Self {
        IdAllocator {
            used: used.into_iter().collect(),
            next: 1,
        }
    }

    fn allocate(&mut self) -> u32 {
        // Map capacities (at most 2^18 entries) keep this far from u32::MAX.
        while self.used.contains(&self.next) {
            self.next = self.next.saturating_add(1);
        }
        self.used.insert(self.next);
        self.next
    }
}
