//! The mesh agent as a library, so that the binary (`main.rs`: the command line), the
//! in-process tests (`mesh-agent/tests/`), the microbenchmarks and the fuzz targets
//! (`mesh-agent/fuzz/`) all drive the same code. ARCHITECTURE.md maps the rooms and the
//! import rules between them.
//!
//! The pure core: [`model`] (the service vocabulary), [`config`], [`catalog`], [`balance`], [`health`] (its state),
//! [`reconcile`]. The runtime: [`dataplane`], [`gossip`], [`tunnel`], [`admin`],
//! [`telemetry`], [`sys`]. [`app`] composes them into the daemon; [`cli`] is every other
//! command.

pub mod admin;
pub mod app;
pub mod balance;
pub mod catalog;
pub mod cli;
pub mod config;
pub mod dataplane;
pub mod gossip;
pub mod health;
pub mod model;
pub mod reconcile;
pub mod sys;
pub mod telemetry;
pub mod tunnel;

/// The version and the commit it was built from, e.g. `0.1.0 (3f2c1ab)`.
pub const VERSION: &str = concat!(
    env!("CARGO_PKG_VERSION"),
    " (",
    env!("MESH_BUILD_COMMIT"),
    ")"
);
