//! The agent's dealings with the host outside the data plane: the cgroup2 mount, the
//! open-file limit, following files, atomic state files, the one-agent-per-node lock,
//! systemd's notify socket and returning freed memory.

pub mod cgroup;
pub mod fdlimit;
pub mod memory;
pub mod node_lock;
pub mod sd_notify;
pub mod state_file;
pub mod watch;
