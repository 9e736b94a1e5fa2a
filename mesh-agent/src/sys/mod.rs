//! The agent's dealings with the host outside the data plane: the cgroup2 mount, the
//! open-file limit, following files, atomic state files, the one-agent-per-node lock and
//! systemd's notify socket.

pub mod cgroup;
pub mod fdlimit;
pub mod node_lock;
pub mod sd_notify;
pub mod state_file;
pub mod watch;
