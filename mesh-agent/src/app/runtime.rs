//! The data-plane runtime. The agent runs on two: the control runtime (current-thread, built
//! by [`crate::cli`] around [`super::run`]) carries config, catalog, gossip, health, the
//! admin API and the metrics, with the controller's events on its blocking threads; the
//! data-plane runtime (multi-thread, `[mtls] workers` threads) carries the tunnel's listeners,
//! relays and pooled connections. A reload of any size then stalls neither a relay nor a
//! gossip heartbeat nor an admin request.

use tokio::runtime::{Builder, Handle, Runtime};

/// The multi-thread runtime of the tunnel; shut down (without waiting for its tasks) when
/// dropped, which may happen inside the control runtime.
pub struct DataPlaneRuntime(Option<Runtime>);

impl DataPlaneRuntime {
    /// Starts `workers` threads named `mesh-data`.
    pub fn start(workers: u32) -> std::io::Result<Self> {
        let runtime = Builder::new_multi_thread()
            .worker_threads(usize::try_from(workers).unwrap_or(1).max(1))
            .thread_name("mesh-data")
            .enable_all()
            .build()?;
        Ok(Self(Some(runtime)))
    }

    /// Where the tunnel spawns its work.
    pub fn handle(&self) -> Handle {
        match &self.0 {
            Some(runtime) => runtime.handle().clone(),
            None => unreachable!("the runtime is only taken when dropped"),
        }
    }
}

impl Drop for DataPlaneRuntime {
    fn drop(&mut self) {
        if let Some(runtime) = self.0.take() {
            runtime.shutdown_background();
        }
    }
}
