//! The original destinations of redirected (mTLS) connections, read by the outbound listener.
//!
//! The kernel keys each record by the client's address and port once its connection to the
//! listener is established (see `mesh_common::redirect`); the listener takes the record of the
//! peer it accepted, and the record leaves the map with it.

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex},
};

use aya::maps::{HashMap, MapData, MapError};
use mesh_common::{maps, redirect::OriginalDest};

use super::DataPlaneError;

/// Where a redirected connection was going, and who opened it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Redirect {
    /// The backend the kernel chose.
    pub backend: SocketAddr,
    /// The kernel's id of the service the client called.
    pub service_id: u32,
    /// The client's cgroup id: its workload identity on this host.
    pub cgroup_id: u64,
}

/// Handle on the kernel's redirect records; cheap to clone, shared by the listener's tasks.
#[derive(Clone)]
pub struct Redirects {
    by_peer: Arc<Mutex<HashMap<MapData, mesh_common::redirect::SockKey, OriginalDest>>>,
}

impl Redirects {
    pub(super) fn new(
        by_peer: HashMap<MapData, mesh_common::redirect::SockKey, OriginalDest>,
    ) -> Self {
        Self {
            by_peer: Arc::new(Mutex::new(by_peer)),
        }
    }

    /// The original destination of the connection the outbound listener accepted from
    /// `client`, removed from the kernel map on the way out. `None` when the kernel has no
    /// record for it (the connection did not come through a redirect).
    pub fn take(&self, client: SocketAddr) -> Result<Option<Redirect>, DataPlaneError> {
        let name = maps::REDIRECT_BY_PEER;
        let key = crate::reconcile::addr::sock_key(client);
        let mut map = self
            .by_peer
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let original = match map.get(&key, 0) {
            Ok(original) => original,
            Err(MapError::KeyNotFound) => return Ok(None),
            Err(cause) => return Err(DataPlaneError::Map { name, cause }),
        };
        // Already gone means another taker raced us; the value we read is still right.
        let _ = map.remove(&key);
        let backend = crate::reconcile::addr::decode_ip(original.backend, original.family)
            .map(|ip| {
                SocketAddr::new(
                    ip,
                    crate::reconcile::addr::decode_port(original.backend_port),
                )
            })
            .map_err(|e| DataPlaneError::Corrupt {
                name,
                reason: e.to_string(),
            })?;
        Ok(Some(Redirect {
            backend,
            service_id: original.service_id,
            cgroup_id: original.cgroup_id,
        }))
    }
}
