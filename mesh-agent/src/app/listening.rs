//! What reads the agent's listening sockets: the accept loops (admin API, metrics, the mTLS
//! tunnel's listeners) and gossip. They start on copies of the [`Sockets`]; a takeover stops
//! them, and waits until they are gone, before it hands the sockets over, and starts them
//! again if the takeover fails.

use std::sync::Arc;

use tokio::{sync::watch, task::JoinSet};

use crate::{
    admin::{self, AgentView},
    app::sockets::Sockets,
    catalog::Announcement,
    gossip::{self, Gossip, Member},
    model::settings::GossipSettings,
    telemetry::flows::ServiceNames,
    telemetry::metrics::{self, SnapshotSource},
    tunnel::{OriginalDestinations, Tunnel},
};

/// What the accept loops and gossip serve.
pub struct Serve {
    pub node: String,
    pub admin: Arc<dyn AgentView>,
    pub metrics: Arc<dyn SnapshotSource>,
    /// With `[mtls]`.
    pub tunnel: Option<TunnelServe>,
    pub gossip: Option<GossipSettings>,
}

/// What the tunnel's accept loops need.
pub struct TunnelServe {
    pub tunnel: Arc<Tunnel>,
    /// The kernel's original destinations of redirected connects.
    pub destinations: Arc<dyn OriginalDestinations>,
    /// Service names, for the flows.
    pub names: Arc<ServiceNames>,
}

/// The running accept loops and gossip.
pub struct Listening {
    accepting: JoinSet<()>,
    pub gossip: Option<Gossip>,
}

impl Serve {
    /// Starts accepting on copies of `sockets` and gossiping `announcement`.
    pub async fn start(
        &self,
        sockets: &Sockets,
        announcement: &Announcement,
    ) -> anyhow::Result<Listening> {
        let mut accepting = JoinSet::new();
        if let Some(serve) = &self.tunnel {
            if let Some(listeners) = sockets.tunnel()? {
                serve
                    .tunnel
                    .serve(listeners, &serve.destinations, &serve.names, &mut accepting)?;
            }
        }
        accepting.spawn(admin::serve(sockets.admin()?, Arc::clone(&self.admin)));
        if let Some(listener) = sockets.metrics()? {
            accepting.spawn(metrics::serve(listener, Arc::clone(&self.metrics)));
        }
        let gossip = match (&self.gossip, sockets.gossip()?) {
            (Some(config), Some(socket)) => {
                Some(gossip::start(&self.node, config, announcement, socket).await?)
            }
            _ => None,
        };
        Ok(Listening { accepting, gossip })
    }
}

impl Listening {
    /// The gossip members' updates (`None` without gossip).
    pub fn members(&self) -> Option<watch::Receiver<Arc<Vec<Member>>>> {
        self.gossip.as_ref().map(Gossip::members)
    }

    /// Stops gossip and every accept loop and returns once none of them holds a socket.
    /// Connections already accepted go on (they are tasks of their own).
    pub async fn stop(&mut self) {
        if let Some(gossip) = self.gossip.take() {
            gossip.stop().await;
        }
        self.accepting.abort_all();
        while self.accepting.join_next().await.is_some() {}
    }
}
