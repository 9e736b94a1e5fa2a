//! What the agent tells about itself: Prometheus metrics, flow events in user space and
//! rate-limited warnings.

pub mod flows;
pub mod log_level;
pub mod log_limit;
pub mod metrics;
