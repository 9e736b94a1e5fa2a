//! What the agent tells about itself: Prometheus metrics, flow events in user space, its
//! writes of the kernel maps (`applied`) and rate-limited warnings.

pub mod applied;
pub mod flows;
pub mod log_level;
pub mod log_limit;
pub mod metrics;
