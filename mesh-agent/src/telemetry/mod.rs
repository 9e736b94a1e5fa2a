//! What the agent tells about itself: Prometheus metrics, flow events in user space, the
//! access log of tunneled flows, its writes of the kernel maps (`applied`) and rate-limited
//! warnings.

pub mod access_log;
pub mod applied;
pub mod flows;
pub mod histogram;
pub mod log_level;
pub mod log_limit;
pub mod metrics;
pub mod process;
