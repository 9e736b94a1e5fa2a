//! Privileged end-to-end test harness for mesh.
//!
//! A test builds a [`TestBed`]: a "switch" network namespace holding a bridge, and nodes, each a
//! network namespace plus a cgroup v2 subtree, joined to the bridge by a veth pair. Workloads
//! (the `mesh-workload` binary) run inside a node's namespace and one of its workload cgroups;
//! the node's agent (`mesh-agent`) runs inside the namespace with its programs attached to the
//! node's cgroup. Everything a bed creates carries a unique prefix and is torn down on drop,
//! panics included.
//!
//! The harness needs root, a cgroup2 mount, bpffs and iproute2. When any is missing the test
//! fails with a message saying what is missing; it never passes by skipping.
//!
//! | module | owns |
//! | --- | --- |
//! | [`host`] | preflight checks, mounts, finding the binaries under test |
//! | [`netns`] | named network namespaces, `ip` invocations, entering a namespace |
//! | [`cgroup`] | cgroup v2 directories: create, join, kill, remove |
//! | [`process`] | spawning into a namespace and cgroup, output capture, kill-on-drop |
//! | [`bed`] | the bridge, the nodes, their addresses, teardown |
//! | [`config`] | rendering the agent's TOML config |
//! | [`agent`] | starting, querying, killing and reconfiguring `mesh-agent` |
//! | [`applied`] | following an agent's `GET /v1/applied` stream (its writes of the kernel maps) |
//! | [`metrics`] | scraping an agent's metrics endpoint inside its node |
//! | [`workload`] | typed drivers and reports for the `mesh-workload` binary |
//! | [`mtls`] | certificates from the real CLI and the `[mtls]` config, for the mTLS tests |

pub mod agent;
pub mod applied;
pub mod backends;
pub mod bed;
pub mod cgroup;
pub mod config;
pub mod host;
pub mod metrics;
pub mod mtls;
pub mod netns;
pub mod process;
pub mod workload;

pub use agent::Agent;
pub use bed::{Node, TestBed};
pub use process::{Proc, Signal};
pub use workload::{
    HoldReport, ManyReport, PingPongReport, StreamReport, TcpClientReport, UdpClientReport,
};

/// Turns an error into a panic at the caller, with the whole error chain.
///
/// Tests use `.or_fail()` instead of `?`: a panic unwinds with the bed, agents and processes
/// still alive, so teardown knows the test failed (it keeps the scratch directory and prints
/// the agent logs). An `Err` returned from a test would drop them first, as if it passed.
pub trait OrFail<T> {
    /// The value, or a panic quoting the error.
    fn or_fail(self) -> T;
}

impl<T, E: Into<anyhow::Error>> OrFail<T> for Result<T, E> {
    #[track_caller]
    fn or_fail(self) -> T {
        match self {
            Ok(v) => v,
            Err(e) => panic!("{:#}", e.into()),
        }
    }
}
