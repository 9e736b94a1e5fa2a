//! Typed handles on the pinned maps: the reconciler writes through [`KernelMaps`], the views
//! read the programs' counts through [`KernelCounters`].

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, MutexGuard},
};

use aya::{
    maps::{HashMap, MapData, MapError, PerCpuArray, PerCpuHashMap},
    Ebpf,
};
use mesh_common::{
    counters::Counter,
    health::ConnectOutcomes,
    maps,
    redirect::SockKey,
    service::{Backend, Service, ServiceKey, SlotKey},
};

use super::{take_map as take, DataPlaneError};
use crate::reconcile::{
    kernel::{Counters, Kernel, KernelReadError},
    KernelState, MapOp, MapWriteError, MapWriter,
};

/// The maps the agent writes and reads.
pub struct KernelMaps {
    services: HashMap<MapData, ServiceKey, Service>,
    slots: HashMap<MapData, SlotKey, u32>,
    backends: HashMap<MapData, u32, Backend>,
    counts: Arc<KernelCounters>,
    strict_inbound: HashMap<MapData, SockKey, u32>,
    connect_outcomes: PerCpuHashMap<MapData, SockKey, ConnectOutcomes>,
}

impl KernelMaps {
    pub(super) fn take(ebpf: &mut Ebpf) -> Result<Self, DataPlaneError> {
        Ok(Self {
            services: take(ebpf, maps::SERVICES)?,
            slots: take(ebpf, maps::SLOTS)?,
            backends: take(ebpf, maps::BACKENDS)?,
            counts: Arc::new(KernelCounters {
                backend_counts: Mutex::new(take(ebpf, maps::BACKEND_COUNTS)?),
                counters: take(ebpf, maps::COUNTERS)?,
            }),
            strict_inbound: take(ebpf, maps::STRICT_INBOUND)?,
            connect_outcomes: take(ebpf, maps::CONNECT_OUTCOMES)?,
        })
    }

    /// Everything the load-balancing maps hold now: what a previous agent left, on start.
    fn read_state_of_maps(&self) -> Result<KernelState, DataPlaneError> {
        fn collect<K: aya::Pod + Ord, V: aya::Pod>(
            map: &HashMap<MapData, K, V>,
            name: &'static str,
        ) -> Result<imbl::OrdMap<K, V>, DataPlaneError> {
            map.iter()
                .collect::<Result<_, _>>()
                .map_err(|cause| DataPlaneError::Map { name, cause })
        }
        Ok(KernelState {
            services: collect(&self.services, maps::SERVICES)?,
            slots: collect(&self.slots, maps::SLOTS)?,
            backends: collect(&self.backends, maps::BACKENDS)?,
            strict: collect(&self.strict_inbound, maps::STRICT_INBOUND)?,
        })
    }
}

impl KernelMaps {
    /// Connect outcomes of balanced TCP sockets per backend address, summed over CPUs; the
    /// counts only grow while the entry lives.
    fn read_connect_outcomes(&self) -> Result<Vec<(SocketAddr, ConnectOutcomes)>, DataPlaneError> {
        let name = maps::CONNECT_OUTCOMES;
        let mut all = Vec::new();
        for entry in self.connect_outcomes.iter() {
            let (key, per_cpu) = entry.map_err(|cause| DataPlaneError::Map { name, cause })?;
            let Ok(addr) = crate::reconcile::addr::decode_sock_key(&key) else {
                continue;
            };
            let total =
                per_cpu
                    .iter()
                    .fold(ConnectOutcomes::default(), |sum, cpu| ConnectOutcomes {
                        established: sum.established + cpu.established,
                        failed: sum.failed + cpu.failed,
                        syn_timeouts: sum.syn_timeouts + cpu.syn_timeouts,
                    });
            all.push((addr, total));
        }
        Ok(all)
    }
}

/// The programs' counts: per-backend connections and the global counters. Shared by the
/// writer (a deleted backend's count goes with it) and the views' reader.
pub struct KernelCounters {
    backend_counts: Mutex<PerCpuHashMap<MapData, u32, u64>>,
    counters: PerCpuArray<MapData, u64>,
}

impl KernelCounters {
    fn backend_counts(&self) -> MutexGuard<'_, PerCpuHashMap<MapData, u32, u64>> {
        self.backend_counts
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Every counter, summed over CPUs.
    fn read_counters(&self) -> Result<Vec<(Counter, u64)>, DataPlaneError> {
        Counter::ALL
            .iter()
            .map(|&counter| {
                let per_cpu = self.counters.get(&(counter as u32), 0).map_err(|cause| {
                    DataPlaneError::Map {
                        name: maps::COUNTERS,
                        cause,
                    }
                })?;
                Ok((counter, per_cpu.iter().sum()))
            })
            .collect()
    }
}

impl Counters for KernelCounters {
    fn backend_count(&self, id: u32) -> u64 {
        self.backend_counts()
            .get(&id, 0)
            .map_or(0, |per_cpu| per_cpu.iter().sum())
    }

    fn counters(&self) -> Result<Vec<(Counter, u64)>, KernelReadError> {
        self.read_counters().map_err(read_error)
    }
}

/// Deleting what is already gone is success: the goal state holds.
fn ignore_missing(result: Result<(), MapError>) -> Result<(), MapError> {
    match result {
        Err(MapError::KeyNotFound) => Ok(()),
        Err(MapError::SyscallError(e)) if e.io_error.raw_os_error() == Some(libc::ENOENT) => Ok(()),
        other => other,
    }
}

impl MapWriter for KernelMaps {
    fn write(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let (name, result) = match op {
            MapOp::PutBackend(id, backend) => {
                (maps::BACKENDS, self.backends.insert(id, backend, 0))
            }
            MapOp::PutSlot(key, id) => (maps::SLOTS, self.slots.insert(key, id, 0)),
            MapOp::PutService(key, service) => {
                (maps::SERVICES, self.services.insert(key, service, 0))
            }
            MapOp::DeleteService(key) => {
                (maps::SERVICES, ignore_missing(self.services.remove(key)))
            }
            MapOp::DeleteSlot(key) => (maps::SLOTS, ignore_missing(self.slots.remove(key))),
            MapOp::PutStrict(key, id) => {
                (maps::STRICT_INBOUND, self.strict_inbound.insert(key, id, 0))
            }
            MapOp::DeleteStrict(key) => (
                maps::STRICT_INBOUND,
                ignore_missing(self.strict_inbound.remove(key)),
            ),
            MapOp::DeleteBackend(id) => {
                // The count goes with the backend, so a reused id starts from zero. A count
                // that cannot be removed only overstates a backend that no longer exists.
                let _ = ignore_missing(self.counts.backend_counts().remove(id));
                (maps::BACKENDS, ignore_missing(self.backends.remove(id)))
            }
        };
        result.map_err(|cause| MapWriteError::new(format!("{name}: {cause}")))
    }
}

fn read_error(error: DataPlaneError) -> KernelReadError {
    KernelReadError(error.to_string())
}

impl Kernel for KernelMaps {
    fn read_state(&self) -> Result<KernelState, KernelReadError> {
        self.read_state_of_maps().map_err(read_error)
    }

    fn counters(&self) -> Arc<dyn Counters> {
        Arc::clone(&self.counts) as Arc<dyn Counters>
    }

    fn connect_outcomes(&self) -> Result<Vec<(SocketAddr, ConnectOutcomes)>, KernelReadError> {
        self.read_connect_outcomes().map_err(read_error)
    }
}
