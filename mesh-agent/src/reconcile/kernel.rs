//! The kernel as the controller sees it: the port through which it reads what the maps hold
//! and the signals the programs count, and writes the plan.
//!
//! The agent's implementation is the data plane's pinned maps
//! ([`KernelMaps`](crate::dataplane::kernel_maps::KernelMaps)); [`MemoryKernel`] is a model of
//! them for the in-process tests (`mesh-agent/tests/`), which need neither root nor the eBPF
//! toolchain.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex, MutexGuard};

use mesh_common::{counters::Counter, health::ConnectOutcomes};

use super::{KernelState, MapOp, MapWriteError, MapWriter};

/// Why the kernel's state could not be read, e.g. `lookup MESH_CNT_V1: EPERM`.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{0}")]
pub struct KernelReadError(pub String);

/// What the controller needs of the kernel.
pub trait Kernel: MapWriter + Send {
    /// Everything the maps the plan writes hold now.
    fn read_state(&self) -> Result<KernelState, KernelReadError>;
    /// A reader of what the programs count, for the views: it reads from any thread while
    /// the controller writes.
    fn counters(&self) -> Arc<dyn Counters>;
    /// Connect outcomes of balanced TCP sockets per backend address; they only grow.
    fn connect_outcomes(&self) -> Result<Vec<(SocketAddr, ConnectOutcomes)>, KernelReadError>;
}

/// What the programs count, read without the controller (the admin API and the metrics read
/// it from their own threads).
pub trait Counters: Send + Sync {
    /// Connections (and UDP datagrams) sent to backend `id` since it was added.
    fn backend_count(&self, id: u32) -> u64;
    /// Every counter, summed over CPUs.
    fn counters(&self) -> Result<Vec<(Counter, u64)>, KernelReadError>;
}

/// An in-memory kernel for tests: a handle on [`MemoryMaps`], cloned to keep one while the
/// controller owns another.
#[derive(Clone, Debug, Default)]
pub struct MemoryKernel(Arc<Mutex<MemoryMaps>>);

/// The in-memory maps: the ones the plan writes as a [`KernelState`] (the strict map
/// included), and the outcomes, counters and backend counts a test sets; writes can be made
/// to fail.
#[derive(Debug, Default)]
pub struct MemoryMaps {
    pub state: KernelState,
    pub outcomes: BTreeMap<SocketAddr, ConnectOutcomes>,
    pub counters: BTreeMap<Counter, u64>,
    pub backend_counts: BTreeMap<u32, u64>,
    /// Every write from this (0-based) attempt on fails, like a map that is full.
    pub fail_from: Option<usize>,
    /// Writes attempted so far.
    pub attempts: usize,
}

impl MemoryKernel {
    /// The maps, locked.
    pub fn maps(&self) -> MutexGuard<'_, MemoryMaps> {
        self.0
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }
}

impl MapWriter for MemoryKernel {
    fn write(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let mut maps = self.maps();
        let n = maps.attempts;
        maps.attempts += 1;
        if maps.fail_from.is_some_and(|from| n >= from) {
            return Err(MapWriteError::new(format!(
                "injected failure of write #{n}"
            )));
        }
        maps.state.record(op);
        Ok(())
    }
}

impl Kernel for MemoryKernel {
    fn read_state(&self) -> Result<KernelState, KernelReadError> {
        Ok(self.maps().state.clone())
    }

    fn counters(&self) -> Arc<dyn Counters> {
        Arc::new(self.clone())
    }

    fn connect_outcomes(&self) -> Result<Vec<(SocketAddr, ConnectOutcomes)>, KernelReadError> {
        Ok(self.maps().outcomes.iter().map(|(a, o)| (*a, *o)).collect())
    }
}

impl Counters for MemoryKernel {
    fn backend_count(&self, id: u32) -> u64 {
        self.maps().backend_counts.get(&id).copied().unwrap_or(0)
    }

    fn counters(&self) -> Result<Vec<(Counter, u64)>, KernelReadError> {
        let maps = self.maps();
        Ok(Counter::ALL
            .iter()
            .map(|c| (*c, maps.counters.get(c).copied().unwrap_or(0)))
            .collect())
    }
}
