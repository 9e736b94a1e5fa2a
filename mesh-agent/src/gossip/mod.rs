//! Membership and catalog dissemination between agents, over chitchat.
//!
//! chitchat (Scuttlebutt anti-entropy of per-node key-value state, phi-accrual failure
//! detection) carries each agent's [`Announcement`] as the records of [`record`]; every
//! datagram is authenticated under the mesh key by [`auth`]. [`start`] joins the mesh through
//! the configured seeds; [`Gossip::announce`] publishes this node's announcement (only what
//! changed is gossiped); [`Gossip::members`] follows every other member, alive or dead, with
//! its decoded announcement — a new value whenever a member joins, dies, returns or changes
//! what it announces.
//!
//! Failure detection: heartbeats travel in every gossip round (each [`GossipSettings::interval`],
//! to up to three peers), and a member is dead once the time since its last heartbeat exceeds
//! `phi_threshold` times the mean gap between its heartbeats (with 100 ms rounds and the default
//! threshold, 1-2 s). A restarted agent joins with a new generation; the old one dies and is
//! hidden behind it.
//!
//! The gossip socket is bound by [`bind`] (or handed over by a predecessor agent) before
//! [`start`]; [`Gossip::stop`] ends chitchat and waits until nothing reads the socket any more,
//! so that a successor can take it.
//!
//! This module does not merge announcements (that is [`crate::catalog`]) or touch the kernel.

pub mod auth;
pub mod peers;
pub mod record;

use std::collections::{BTreeMap, HashSet};
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use chitchat::{
    spawn_chitchat, Chitchat, ChitchatConfig, ChitchatHandle, ChitchatId, FailureDetectorConfig,
    ProtocolVersion,
};
use tokio::sync::{watch, Mutex};

use crate::catalog::Announcement;
use crate::model::settings::GossipSettings;

pub use auth::{KeyError, MeshKey, Stats};
pub use record::{NodeRecord, RecordError};

/// How long a dead member (and a deleted record) is remembered: a member that returns within
/// this time is recognised, after it is forgotten it joins anew.
const FORGET_AFTER: Duration = Duration::from_secs(600);

/// Why gossip could not start.
#[derive(Debug, thiserror::Error)]
pub enum GossipError {
    #[error(transparent)]
    Key(#[from] KeyError),
    #[error("cannot bind the gossip socket {listen}/udp: {cause}")]
    Bind {
        listen: SocketAddr,
        cause: std::io::Error,
    },
    #[error("cannot start gossip on {listen}: {cause:#}")]
    Start {
        listen: SocketAddr,
        cause: anyhow::Error,
    },
}

/// Another member of the mesh as this agent sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Member {
    pub name: String,
    /// Its gossip address.
    pub address: SocketAddr,
    pub alive: bool,
    /// Changes when its agent restarts.
    pub generation: u64,
    pub node: NodeRecord,
    pub announcement: Announcement,
    /// Its records that were left out.
    pub errors: Vec<RecordError>,
    /// Whether all the records it counts have arrived (see [`NodeRecord::records`]).
    pub complete: bool,
}

/// A running gossip instance; stops when dropped (or, waiting for it, by [`Gossip::stop`]).
pub struct Gossip {
    /// `None` once stopped.
    handle: Option<ChitchatHandle>,
    stats: Arc<Stats>,
    members: watch::Receiver<Arc<Vec<Member>>>,
    follow: tokio::task::JoinHandle<()>,
}

impl Drop for Gossip {
    fn drop(&mut self) {
        self.follow.abort();
        if let Some(handle) = &self.handle {
            handle.abort();
        }
    }
}

/// Binds the gossip socket (non-blocking, as [`start`] takes it).
pub fn bind(listen: SocketAddr) -> Result<std::net::UdpSocket, GossipError> {
    std::net::UdpSocket::bind(listen)
        .and_then(|socket| socket.set_nonblocking(true).map(|()| socket))
        .map_err(|cause| GossipError::Bind { listen, cause })
}

/// Joins the mesh as `node` on `socket` (bound to `config.listen`), announcing
/// `announcement`.
pub async fn start(
    node: &str,
    config: &GossipSettings,
    announcement: &Announcement,
    socket: std::net::UdpSocket,
) -> Result<Gossip, GossipError> {
    let key = MeshKey::load(&config.key_file)?;
    let started = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default();
    let node_record = NodeRecord {
        v: record::FORMAT_VERSION,
        agent: crate::VERSION.to_owned(),
        started: started.as_secs(),
        records: None,
    };
    let id = ChitchatId::new(
        node,
        u64::try_from(started.as_millis()).unwrap_or(u64::MAX),
        config.advertise,
    );
    let chitchat_config = ChitchatConfig {
        chitchat_id: id,
        cluster_id: config.cluster.clone(),
        gossip_interval: config.interval,
        listen_addr: config.listen,
        seed_nodes: config.seeds.iter().map(ToString::to_string).collect(),
        failure_detector_config: FailureDetectorConfig {
            phi_threshold: f64::from(config.phi_threshold),
            sampling_window_size: 100,
            max_interval: (config.interval * 20).max(Duration::from_secs(2)),
            initial_interval: config.interval,
            dead_node_grace_period: FORGET_AFTER,
        },
        marked_for_deletion_grace_period: FORGET_AFTER,
        catchup_callback: None,
        extra_liveness_predicate: None,
        protocol_version: ProtocolVersion::V1,
    };
    let stats = Arc::new(Stats::default());
    let transport = auth::AuthTransport {
        key,
        stats: Arc::clone(&stats),
        wire: std::sync::Mutex::new(Some(socket)),
    };
    let records = record::in_write_order(record::encode(&node_record, announcement));
    let handle = spawn_chitchat(chitchat_config, records, &transport)
        .await
        .map_err(|cause| GossipError::Start {
            listen: config.listen,
            cause,
        })?;
    let (tx, members) = watch::channel(Arc::new(Vec::new()));
    let follow = tokio::spawn(follow(handle.chitchat(), node.to_owned(), tx));
    tracing::info!(
        listen = %config.listen,
        advertise = %config.advertise,
        seeds = ?config.seeds,
        "gossip started"
    );
    Ok(Gossip {
        handle: Some(handle),
        stats,
        members,
        follow,
    })
}

impl Gossip {
    /// Stops gossiping and returns once chitchat's task (and with it its socket) is gone.
    pub async fn stop(mut self) {
        self.follow.abort();
        if let Some(handle) = self.handle.take() {
            // Cancelled, then joined: no waiting on a round in progress, and once the join
            // returns nothing of chitchat reads the socket.
            handle.abort();
            if let Err(error) = handle.shutdown().await {
                tracing::debug!(%error, "gossip task ended");
            }
        }
        tracing::info!("gossip stopped");
    }

    /// Publishes `announcement` as this node's records: changed records are set, records no
    /// longer announced are deleted, unchanged ones are left alone (and not gossiped again).
    pub async fn announce(&self, announcement: &Announcement) {
        let Some(handle) = &self.handle else {
            return;
        };
        let chitchat = handle.chitchat();
        let mut chitchat = chitchat.lock().await;
        let state = chitchat.self_node_state();
        let node = state
            .get("node")
            .and_then(|v| serde_json::from_str::<NodeRecord>(v).ok())
            .unwrap_or_default();
        let records = record::encode(&node, announcement);
        let stale: Vec<String> = state
            .key_values()
            .filter(|(key, _)| !records.contains_key(*key))
            .map(|(key, _)| key.to_owned())
            .collect();
        for key in stale {
            state.delete(&key);
        }
        for (key, value) in record::in_write_order(records) {
            state.set(key, value);
        }
    }

    /// Every other member, updated as they change.
    pub fn members(&self) -> watch::Receiver<Arc<Vec<Member>>> {
        self.members.clone()
    }

    /// The gossip socket's counters.
    pub fn stats(&self) -> &Arc<Stats> {
        &self.stats
    }
}

/// Publishes the members each time chitchat's view of live members (or their records) changes.
async fn follow(chitchat: Arc<Mutex<Chitchat>>, this: String, tx: watch::Sender<Arc<Vec<Member>>>) {
    let mut changes = chitchat.lock().await.live_nodes_watcher();
    loop {
        let members = snapshot(&*chitchat.lock().await, &this);
        tx.send_if_modified(|current| {
            let changed = **current != members;
            if changed {
                *current = Arc::new(members);
            }
            changed
        });
        if changes.changed().await.is_err() {
            return;
        }
    }
}

/// The other members in chitchat's state, the latest generation of each, by name.
fn snapshot(chitchat: &Chitchat, this: &str) -> Vec<Member> {
    let live: HashSet<&ChitchatId> = chitchat.live_nodes().collect();
    let mut latest: BTreeMap<&str, &ChitchatId> = BTreeMap::new();
    for id in chitchat.node_states().keys() {
        if &*id.node_id == this {
            continue;
        }
        let slot = latest.entry(&id.node_id).or_insert(id);
        if id.generation_id > slot.generation_id {
            *slot = id;
        }
    }
    latest
        .into_values()
        .filter_map(|id| {
            let state = chitchat.node_state(id)?;
            let decoded = record::decode(state.key_values());
            let complete = decoded.complete();
            Some(Member {
                complete,
                name: id.node_id.to_string(),
                address: id.gossip_advertise_addr,
                alive: live.contains(id),
                generation: id.generation_id,
                node: decoded.node,
                announcement: decoded.announcement,
                errors: decoded.errors,
            })
        })
        .collect()
}

/// The next members' state; never resolves once gossip is off or has stopped.
pub async fn next_members(
    members: &mut Option<watch::Receiver<Arc<Vec<Member>>>>,
) -> Arc<Vec<Member>> {
    if let Some(rx) = members {
        if rx.changed().await.is_ok() {
            return Arc::clone(&rx.borrow_and_update());
        }
    }
    std::future::pending().await
}

/// Logs members that joined, died, returned, restarted or were forgotten between two states.
pub fn log_changes(before: &[Member], after: &[Member]) {
    for member in after {
        let state = if member.alive { "alive" } else { "dead" };
        match before.iter().find(|m| m.name == member.name) {
            None => {
                tracing::info!(member = member.name, address = %member.address, state, "member joined")
            }
            Some(old) if old.generation != member.generation => {
                tracing::info!(member = member.name, state, "member restarted")
            }
            Some(old) if old.alive != member.alive => {
                tracing::warn!(member = member.name, state, "member state changed")
            }
            Some(old) => {
                if old.errors != member.errors {
                    for error in &member.errors {
                        tracing::warn!(member = member.name, %error, "member record left out");
                    }
                }
            }
        }
    }
    for gone in before
        .iter()
        .filter(|m| !after.iter().any(|a| a.name == m.name))
    {
        tracing::info!(member = gone.name, "member forgotten");
    }
}

/// `service=address` for each endpoint of `announcement`.
pub fn endpoint_names(announcement: &Announcement) -> Vec<String> {
    announcement
        .endpoints
        .iter()
        .map(|e| format!("{}={}", e.service, e.address))
        .collect()
}

/// A member as `mesh-agent nodes` shows it.
pub fn node_status(member: &Member) -> crate::admin::types::NodeStatus {
    let now = SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap_or_default()
        .as_secs();
    crate::admin::types::NodeStatus {
        name: member.name.clone(),
        role: "peer".to_owned(),
        cgroup: None,
        version: Some(member.node.agent.clone()),
        uptime_s: now.saturating_sub(member.node.started),
        address: Some(member.address.to_string()),
        state: if member.alive { "alive" } else { "dead" }.to_owned(),
        endpoints: endpoint_names(&member.announcement),
        rejected: member.errors.iter().map(ToString::to_string).collect(),
    }
}
