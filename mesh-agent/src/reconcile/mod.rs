//! Bringing the kernel maps from what they hold to what is desired, without a reader ever
//! seeing a service with no backend, a dangling slot, or a mix of old and new backends.
//!
//! This module owns the ids (service ids and backend ids, kept stable across updates and
//! restarts), the order of map writes, and what happens when a write fails. It does not talk to
//! the kernel itself: [`plan()`] is a pure function of ([`KernelState`],
//! [`Desired`](crate::balance::Desired)), and [`apply()`] hands each [`MapOp`] to a
//! [`MapWriter`] (the loader's pinned maps in the agent, an in-memory model in tests).
//!
//! # The update protocol (see `mesh_common::service`)
//!
//! A service's header names the active slot generation and its count. To change a service the
//! plan writes new backends, writes the *inactive* generation's slots, flips the header in one
//! map update (the commit), then deletes the old generation's slots and the backends nothing
//! references any more. A new service is written the same way into generation 0, then its VIP
//! marker. A removed service's header goes first, then its slots, backends and, when no other
//! service uses the address, its VIP marker.
//!
//! The strict-inbound map (backends of strict mTLS services → service id, read by the
//! `cgroup_skb` program) is planned here too, as the last group: puts, then deletes of what
//! no strict service names any more. It only keeps plaintext out, so nothing of it is taken
//! back on failure; a failed delete is a warning, retried by the next plan. The kernel
//! encodings of a desired service (its map key, `LB_*` and flag bits) are made here and in
//! [`addr`], not in `balance`.
//!
//! # Failure
//!
//! The plan is a list of groups, one per service (plus VIP markers and garbage). [`apply()`]
//! makes each group all-or-nothing: if a write fails before the group's commit, the puts the
//! group already made are deleted again and apply stops with an [`ApplyError`](apply::ApplyError) naming the
//! service and the cause; that service keeps its previous state. Groups applied before it
//! stay applied — each is consistent on its own, and the next reconcile retries the rest. A
//! failed delete after a commit only leaves garbage nothing reads: it becomes a warning in the
//! [`ApplyReport`](apply::ApplyReport) and the next plan deletes it again. Throughout, `state` mirrors exactly what
//! the writer accepted, so it always equals what the kernel holds.

pub mod addr;
pub mod apply;
pub mod kernel;
pub mod plan;
#[cfg(test)]
mod tests;

use imbl::OrdMap;
use std::fmt;
use std::net::SocketAddr;

use mesh_common::redirect::SockKey;
use mesh_common::service::{Backend, Service, ServiceKey, SlotKey};

use self::addr::DisplayKey;

// The two entry points; their types live in the submodules (`plan::Plan`,
// `apply::{ApplyReport, ApplyError}`).
pub use apply::apply;
pub use plan::plan;

/// What the pinned maps the agent writes hold (the load-balancing ones and the strict-inbound
/// map). The loader reads it back when the agent starts, so a restarted agent adopts the ids
/// already in use instead of rewriting everything.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct KernelState {
    /// Services and VIP markers.
    pub services: OrdMap<ServiceKey, Service>,
    /// Slots of both generations → backend id.
    pub slots: OrdMap<SlotKey, u32>,
    /// Backend id → backend.
    pub backends: OrdMap<u32, Backend>,
    /// The strict-inbound map: backend address of a strict service → service id.
    pub strict: OrdMap<SockKey, u32>,
}

impl KernelState {
    /// What a connect to `key` can reach right now, the way the programs resolve it (header →
    /// generation and count → slots → backends): `None` if the key is absent, else the
    /// backends of slots `0..count` in slot order, or why the lookup would fail.
    pub fn resolve(&self, key: &ServiceKey) -> Option<Result<Vec<SocketAddr>, String>> {
        let svc = self.services.get(key)?;
        let mut out = Vec::with_capacity(svc.count as usize);
        for slot in 0..svc.count {
            let sk = SlotKey {
                service_id: svc.id,
                generation: svc.generation,
                slot,
            };
            let Some(id) = self.slots.get(&sk) else {
                return Some(Err(format!("dangling header: slot {sk:?} missing")));
            };
            let Some(be) = self.backends.get(id) else {
                return Some(Err(format!("dangling slot {sk:?}: backend {id} missing")));
            };
            if be.service_id != svc.id {
                return Some(Err(format!(
                    "backend {id} belongs to service {}",
                    be.service_id
                )));
            }
            match addr::decode_backend(be) {
                Ok(addr) => out.push(addr),
                Err(e) => return Some(Err(format!("backend {id}: {e}"))),
            }
        }
        Some(Ok(out))
    }

    /// Record that `op` was written to the kernel.
    pub fn record(&mut self, op: &MapOp) {
        match *op {
            MapOp::PutBackend(id, backend) => {
                self.backends.insert(id, backend);
            }
            MapOp::PutSlot(key, id) => {
                self.slots.insert(key, id);
            }
            MapOp::PutService(key, service) => {
                self.services.insert(key, service);
            }
            MapOp::DeleteService(key) => {
                self.services.remove(&key);
            }
            MapOp::DeleteSlot(key) => {
                self.slots.remove(&key);
            }
            MapOp::DeleteBackend(id) => {
                self.backends.remove(&id);
            }
            MapOp::PutStrict(key, id) => {
                self.strict.insert(key, id);
            }
            MapOp::DeleteStrict(key) => {
                self.strict.remove(&key);
            }
        }
    }
}

/// One map update or delete.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MapOp {
    PutBackend(u32, Backend),
    PutSlot(SlotKey, u32),
    PutService(ServiceKey, Service),
    DeleteService(ServiceKey),
    DeleteSlot(SlotKey),
    DeleteBackend(u32),
    /// A backend of a strict service (its address) → the service id.
    PutStrict(SockKey, u32),
    DeleteStrict(SockKey),
}

impl MapOp {
    /// True for the deletes.
    pub fn is_delete(&self) -> bool {
        matches!(
            self,
            MapOp::DeleteService(_)
                | MapOp::DeleteSlot(_)
                | MapOp::DeleteBackend(_)
                | MapOp::DeleteStrict(_)
        )
    }

    /// The op that takes back a put (`None` for a delete, which cannot be taken back).
    pub fn undo(&self) -> Option<MapOp> {
        match *self {
            MapOp::PutBackend(id, _) => Some(MapOp::DeleteBackend(id)),
            MapOp::PutSlot(key, _) => Some(MapOp::DeleteSlot(key)),
            MapOp::PutService(key, _) => Some(MapOp::DeleteService(key)),
            MapOp::PutStrict(key, _) => Some(MapOp::DeleteStrict(key)),
            _ => None,
        }
    }
}

impl fmt::Display for MapOp {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            MapOp::PutBackend(id, be) => match addr::decode_backend(be) {
                Ok(addr) => write!(
                    f,
                    "put backend {id} = {addr} (service id {})",
                    be.service_id
                ),
                Err(e) => write!(f, "put backend {id} = <{e}>"),
            },
            MapOp::PutSlot(k, id) => write!(
                f,
                "put slot {}/{}/{} = backend {id}",
                k.service_id, k.generation, k.slot
            ),
            MapOp::PutService(key, s) if addr::is_vip_marker_key(key) => {
                write!(f, "put {} marker (flags {:#x})", DisplayKey(key), s.flags)
            }
            MapOp::PutService(key, s) => write!(
                f,
                "put service {} (id {}, {} slots in generation {}, lb {}, flags {:#x})",
                DisplayKey(key),
                s.id,
                s.count,
                s.generation,
                s.lb,
                s.flags
            ),
            MapOp::DeleteService(key) if addr::is_vip_marker_key(key) => {
                write!(f, "delete {} marker", DisplayKey(key))
            }
            MapOp::DeleteService(key) => write!(f, "delete service {}", DisplayKey(key)),
            MapOp::DeleteSlot(k) => write!(
                f,
                "delete slot {}/{}/{}",
                k.service_id, k.generation, k.slot
            ),
            MapOp::DeleteBackend(id) => write!(f, "delete backend {id}"),
            MapOp::PutStrict(key, id) => match addr::decode_sock_key(key) {
                Ok(addr) => write!(f, "put strict backend {addr} = service id {id}"),
                Err(e) => write!(f, "put strict backend <{e}>"),
            },
            MapOp::DeleteStrict(key) => match addr::decode_sock_key(key) {
                Ok(addr) => write!(f, "delete strict backend {addr}"),
                Err(e) => write!(f, "delete strict backend <{e}>"),
            },
        }
    }
}

/// Writes map ops to the kernel (or a model of it).
///
/// A put either happens entirely or not at all (a BPF map update is atomic per entry); on
/// `Err` the op is taken as not done. Deleting a key that is already absent must succeed, so a
/// retried plan can delete garbage a previous attempt already removed.
pub trait MapWriter {
    fn write(&mut self, op: &MapOp) -> Result<(), MapWriteError>;
}

/// Why a map write failed, e.g. `MESH_SLOT_V1 is full` or `update MESH_BE_V1: EPERM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct MapWriteError(pub String);

impl MapWriteError {
    pub fn new(message: impl Into<String>) -> Self {
        Self(message.into())
    }
}
