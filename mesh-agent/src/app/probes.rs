//! Which prober checks a target: strict mTLS backends through the tunnel (their host drops
//! other hosts' plaintext connects), every other backend directly.

use std::sync::Arc;

use crate::{
    health::{
        checker::Target,
        probe::{Direct, ProbeError, Prober},
    },
    tunnel::{Tunnel, TunnelProber},
};

/// The agent's prober.
pub struct Probes {
    tunnel: Option<TunnelProber>,
}

impl Probes {
    pub fn new(tunnel: Option<Arc<Tunnel>>) -> Self {
        Self {
            tunnel: tunnel.map(TunnelProber),
        }
    }
}

#[async_trait::async_trait]
impl Prober for Probes {
    async fn probe(&self, target: &Target) -> Result<(), ProbeError> {
        match (&self.tunnel, target.strict) {
            (Some(tunnel), true) => tunnel.probe(target).await,
            _ => Direct.probe(target).await,
        }
    }
}
