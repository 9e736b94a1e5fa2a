//! The mesh agent as a library: every room of the daemon (loader, catalog sources,
//! reconciler, gossip, health, mTLS tunnel, admin API, metrics, takeover), so that the
//! binary (`main.rs`: the command line), in-process tests and the fuzz targets
//! (`mesh-agent/fuzz/`) all drive the same code.

pub mod admin;
pub mod catalog;
pub mod cgroup;
pub mod config;
pub mod dataplane;
pub mod desired;
pub mod fdlimit;
pub mod flows;
pub mod gossip;
pub mod health;
pub mod kernel_addr;
pub mod log_limit;
pub mod maglev;
pub mod metrics;
pub mod mtls;
pub mod node_lock;
pub mod peers;
pub mod reconcile;
pub mod registry;
pub mod run;
pub mod sd_notify;
pub mod sockets;
pub mod state_file;
pub mod status;
pub mod takeover;
pub mod uninstall;
pub mod watch;

/// The version and the commit it was built from, e.g. `0.1.0 (3f2c1ab)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESH_BUILD_COMMIT"),
    ")"
);
