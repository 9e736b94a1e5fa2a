//! The peers' part of the catalog, and why it survives a restart.
//!
//! The kernel's maps hold the whole mesh's catalog; an agent that restarted knows nobody yet.
//! If it applied only what it has heard, every peer's endpoint would leave the maps until
//! gossip delivered it again (and never, with gossip cut off). So the peers' announcements in
//! force are kept in `<state-dir>/<node>/peers.json` (rewritten atomically on every change, in
//! the gossip records' own format and read back through the same tolerant decoder), and a
//! restarted agent starts from them.
//!
//! An announcement leaves only when the mesh says so:
//! - a member this agent has seen alive (in this generation) is declared dead, and authentic
//!   gossip still arrives after that (a member declared dead while nothing arrives any more is
//!   more likely this agent's own isolation, which it cannot tell apart: it keeps the last
//!   catalog until it hears the mesh again);
//! - a member's live records no longer hold it (withdrawn);
//! - a restored peer is never seen alive within [`RestoreGrace`] after this agent first heard
//!   any live member: the mesh has forgotten it (it died while this agent was down).
//!
//! Until any member is heard, and while none is, the peers stay in force indefinitely: a node
//! cut off from gossip keeps serving the last catalog it knew (backends that die meanwhile are
//! caught by the health checks and passive ejection, which need no gossip). The price: in a
//! mesh of two, the survivor keeps the dead peer's endpoints (and ejects them passively).
//!
//! A member caught mid-delivery (fewer records than its node record counts, as when a
//! restarted peer's records are still arriving) keeps the announcement it had.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};

use super::{record, Member, NodeRecord};
use crate::catalog::Announcement;

/// The format version of `peers.json`.
const VERSION: u32 = 1;

/// How long after first hearing the mesh a restored peer that was never seen alive is kept.
#[derive(Clone, Copy, Debug)]
pub struct RestoreGrace(pub Duration);

impl RestoreGrace {
    /// Long enough for a joining agent to hear every live member through its seeds and see
    /// their heartbeats (a few gossip rounds, a failure detector's first samples).
    pub fn for_interval(gossip_interval: Duration) -> RestoreGrace {
        RestoreGrace((gossip_interval * 100).max(Duration::from_secs(10)))
    }
}

/// Where a peer's announcement in force comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Origin {
    /// Read back from the state file; not heard of yet.
    Restored,
    /// Heard alive through gossip, in this generation of the member's agent.
    Live { generation: u64 },
}

#[derive(Clone, Debug)]
struct Peer {
    announcement: Arc<Announcement>,
    origin: Origin,
}

/// The peers' announcements in force.
#[derive(Debug)]
pub struct Peers {
    file: PathBuf,
    peers: BTreeMap<String, Peer>,
    /// When a live member was first heard (restored peers' grace runs from here).
    heard: Option<Instant>,
    /// Members seen alive and since declared dead, with when that was first reported: the
    /// death is taken once authentic gossip arrives after it.
    dying: BTreeMap<String, Instant>,
    grace: RestoreGrace,
}

/// `peers.json`.
#[derive(Serialize, Deserialize)]
struct File {
    version: u32,
    /// Node name → its gossip records (key → value).
    peers: BTreeMap<String, BTreeMap<String, String>>,
}

/// Why `peers.json` could not be read back.
#[derive(Debug, thiserror::Error)]
enum RestoreError {
    #[error("cannot read {}: {cause}", path.display())]
    Read { path: PathBuf, cause: io::Error },
    #[error("{}: not a peers file: {cause}", path.display())]
    Parse {
        path: PathBuf,
        cause: serde_json::Error,
    },
    #[error("{}: format version {found}, this agent reads version {VERSION}", path.display())]
    Version { path: PathBuf, found: u32 },
}

impl Peers {
    /// The peers kept in `<state_dir>/<node>/peers.json`, all restored (none if there is no
    /// file; a file that cannot be read back is logged and moved aside to `peers.json.broken`).
    pub fn restore(state_dir: &Path, node: &str, grace: RestoreGrace) -> Peers {
        let file = state_dir.join(node).join("peers.json");
        let peers = match read(&file) {
            Ok(peers) => peers,
            Err(error) => {
                let aside = file.with_extension("json.broken");
                let moved = std::fs::rename(&file, &aside);
                tracing::error!(%error, moved_to = %aside.display(), moved = moved.is_ok(),
                    "the peers' catalog was not restored; peers' endpoints come back as gossip delivers them");
                BTreeMap::new()
            }
        };
        if !peers.is_empty() {
            tracing::info!(file = %file.display(), peers = peers.len(),
                "peers' catalog restored; it stays in force until the mesh says otherwise");
        }
        Peers {
            file,
            peers,
            heard: None,
            dying: BTreeMap::new(),
            grace,
        }
    }

    /// No peers, kept nowhere (an agent without gossip).
    pub fn none() -> Peers {
        Peers {
            file: PathBuf::new(),
            peers: BTreeMap::new(),
            heard: None,
            dying: BTreeMap::new(),
            grace: RestoreGrace(Duration::ZERO),
        }
    }

    /// The announcements in force, by node name.
    pub fn announcements(&self) -> Vec<(String, Arc<Announcement>)> {
        self.peers
            .iter()
            .map(|(name, peer)| (name.clone(), Arc::clone(&peer.announcement)))
            .collect()
    }

    /// Names of the peers kept from the state file and not heard of yet.
    pub fn restored(&self) -> impl Iterator<Item = &str> {
        self.peers
            .iter()
            .filter(|(_, p)| p.origin == Origin::Restored)
            .map(|(name, _)| name.as_str())
    }

    /// Takes gossip's latest view of the members (called on every change and periodically,
    /// so pending deaths are settled); `last_heard`: when the last authentic gossip datagram
    /// arrived. Whether the announcements in force changed.
    pub fn update(
        &mut self,
        members: &[Member],
        now: Instant,
        last_heard: Option<Instant>,
    ) -> bool {
        if self.heard.is_none() && members.iter().any(|m| m.alive) {
            self.heard = Some(now);
        }
        let mut changed = false;
        for member in members {
            if member.alive {
                self.dying.remove(&member.name);
            }
            let live = Origin::Live {
                generation: member.generation,
            };
            let mut gone = false;
            match (member.alive, self.peers.get_mut(&member.name)) {
                (true, Some(kept)) if !member.complete => {
                    tracing::debug!(
                        member = member.name,
                        "records still arriving; keeping its previous announcement"
                    );
                    kept.origin = live;
                }
                (true, Some(kept)) => {
                    kept.origin = live;
                    if *kept.announcement != member.announcement {
                        kept.announcement = Arc::new(member.announcement.clone());
                        changed = true;
                    }
                }
                (true, None) => {
                    self.peers.insert(
                        member.name.clone(),
                        Peer {
                            announcement: Arc::new(member.announcement.clone()),
                            origin: live,
                        },
                    );
                    changed = true;
                }
                // Declared dead after this agent saw that very generation alive: gone once
                // the mesh is heard after the report.
                (false, Some(kept)) if kept.origin == live => {
                    let reported = *self.dying.entry(member.name.clone()).or_insert(now);
                    gone = last_heard.is_some_and(|heard| heard > reported);
                }
                // Never seen alive by this agent (a restored peer, or a new generation not
                // yet heard beating): not taken to be gone.
                (false, _) => {}
            }
            if gone {
                self.dying.remove(&member.name);
                self.peers.remove(&member.name);
                changed = true;
            }
        }
        // Live peers chitchat no longer lists were forgotten after their death.
        let listed: BTreeSet<&str> = members.iter().map(|m| m.name.as_str()).collect();
        let before = self.peers.len();
        self.peers
            .retain(|name, peer| peer.origin == Origin::Restored || listed.contains(name.as_str()));
        changed |= self.peers.len() != before;
        let peers = &self.peers;
        self.dying.retain(|name, _| peers.contains_key(name));
        if changed {
            self.save();
        }
        changed
    }

    /// Drops the restored peers the mesh has not shown alive within the grace; whether the
    /// announcements in force changed.
    pub fn expire(&mut self, now: Instant) -> bool {
        let Some(heard) = self.heard else {
            return false;
        };
        if now.saturating_duration_since(heard) < self.grace.0 || self.restored().next().is_none() {
            return false;
        }
        self.peers.retain(|name, peer| {
            let keep = peer.origin != Origin::Restored;
            if !keep {
                tracing::warn!(peer = name, grace_s = self.grace.0.as_secs(),
                    "a restored peer was not heard alive since the mesh was reached; its endpoints are withdrawn");
            }
            keep
        });
        self.save();
        true
    }

    fn save(&self) {
        if self.file.as_os_str().is_empty() {
            return;
        }
        let file = File {
            version: VERSION,
            peers: self
                .peers
                .iter()
                .map(|(name, peer)| {
                    let records = record::encode(&NodeRecord::default(), &peer.announcement);
                    (name.clone(), records)
                })
                .collect(),
        };
        if let Err(error) = crate::sys::state_file::write_json(&self.file, &file) {
            tracing::error!(%error, "cannot keep the peers' catalog; a restart would start without the latest of it");
        }
    }
}

fn read(path: &Path) -> Result<BTreeMap<String, Peer>, RestoreError> {
    let bytes = match std::fs::read(path) {
        Ok(bytes) => bytes,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(BTreeMap::new()),
        Err(cause) => {
            return Err(RestoreError::Read {
                path: path.to_owned(),
                cause,
            })
        }
    };
    let file: File = serde_json::from_slice(&bytes).map_err(|cause| RestoreError::Parse {
        path: path.to_owned(),
        cause,
    })?;
    if file.version != VERSION {
        return Err(RestoreError::Version {
            path: path.to_owned(),
            found: file.version,
        });
    }
    Ok(file
        .peers
        .into_iter()
        .filter(|(name, _)| crate::model::rules::node_name(name).is_ok())
        .map(|(name, records)| {
            let decoded = record::decode(records.iter().map(|(k, v)| (k.as_str(), v.as_str())));
            for error in &decoded.errors {
                tracing::warn!(peer = name, %error, "restored peer record left out");
            }
            let peer = Peer {
                announcement: Arc::new(decoded.announcement),
                origin: Origin::Restored,
            };
            (name, peer)
        })
        .collect())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::catalog::Endpoint;
    use crate::sys::state_file::ScratchDir;

    fn announcement(address: &str) -> Announcement {
        Announcement {
            services: BTreeMap::new(),
            endpoints: vec![Endpoint {
                service: "web".into(),
                address: address.parse().unwrap(),
                weight: 1,
            }],
        }
    }

    fn member(name: &str, alive: bool, generation: u64, address: &str) -> Member {
        Member {
            name: name.into(),
            address: "10.0.0.1:15010".parse().unwrap(),
            alive,
            generation,
            node: NodeRecord::default(),
            announcement: announcement(address),
            errors: Vec::new(),
            complete: true,
        }
    }

    const GRACE: RestoreGrace = RestoreGrace(Duration::from_secs(10));

    /// Peers `b` and `c` heard alive, saved, then restored by a fresh agent.
    fn restored(dir: &ScratchDir) -> Peers {
        let mut first = Peers::restore(dir.path(), "a", GRACE);
        let now = Instant::now();
        let members = [
            member("b", true, 1, "10.0.0.2:80"),
            member("c", true, 1, "10.0.0.3:80"),
        ];
        assert!(first.update(&members, now, None));
        Peers::restore(dir.path(), "a", GRACE)
    }

    #[test]
    fn a_restarted_agent_starts_from_the_peers_it_knew_and_keeps_them_while_nobody_is_heard() {
        let dir = ScratchDir::new("peers-restore");
        let mut peers = restored(&dir);
        assert_eq!(peers.announcements().len(), 2);
        assert_eq!(peers.restored().count(), 2);
        let later = Instant::now() + Duration::from_secs(3600);
        assert!(!peers.update(&[], later, None));
        assert!(!peers.expire(later));
        assert_eq!(peers.announcements().len(), 2);
    }

    #[test]
    fn heard_peers_replace_restored_ones_and_unheard_ones_leave_after_the_grace() {
        let dir = ScratchDir::new("peers-grace");
        let mut peers = restored(&dir);
        let t0 = Instant::now();
        // b is back with another endpoint; c is not heard of.
        assert!(peers.update(&[member("b", true, 2, "10.0.0.9:80")], t0, None));
        let names: Vec<_> = peers.announcements().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b", "c"]);
        assert!(!peers.expire(t0 + Duration::from_secs(9)));
        assert!(peers.expire(t0 + Duration::from_secs(11)));
        let kept = peers.announcements();
        assert_eq!(kept.len(), 1);
        assert_eq!(*kept[0].1, announcement("10.0.0.9:80"));
        // What is kept on disk follows.
        assert_eq!(Peers::restore(dir.path(), "a", GRACE).announcements(), kept);
    }

    #[test]
    fn only_a_death_seen_by_this_agent_withdraws_a_peer() {
        let dir = ScratchDir::new("peers-death");
        let mut peers = restored(&dir);
        let now = Instant::now();
        // Learned through a seed, not yet heard beating: reported dead, kept.
        let heard = Some(now + Duration::from_secs(1));
        assert!(!peers.update(&[member("b", false, 2, "10.0.0.2:80")], now, heard));
        assert_eq!(peers.announcements().len(), 2);
        let c = member("c", true, 1, "10.0.0.3:80");
        assert!(!peers.update(
            &[member("b", true, 2, "10.0.0.2:80"), c.clone()],
            now,
            heard
        ));
        let dead_b = [member("b", false, 2, "10.0.0.2:80"), c];
        // Reported dead at t; the mesh was last heard before that: not yet.
        let t = now + Duration::from_secs(2);
        assert!(!peers.update(&dead_b, t, heard));
        // Heard after the report: gone.
        let later = Some(t + Duration::from_millis(100));
        assert!(peers.update(&dead_b, t + Duration::from_millis(250), later));
        let names: Vec<_> = peers.announcements().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["c"]);
    }

    #[test]
    fn members_declared_dead_while_nothing_arrives_stay() {
        let dir = ScratchDir::new("peers-isolated");
        let mut peers = restored(&dir);
        let now = Instant::now();
        let alive = [
            member("b", true, 1, "10.0.0.2:80"),
            member("c", true, 1, "10.0.0.3:80"),
        ];
        let heard = Some(now);
        assert!(!peers.update(&alive, now, heard));
        // Cut off: nothing arrives after `now`, both are declared dead. Nothing leaves,
        // however long.
        let dead = alive.clone().map(|m| Member { alive: false, ..m });
        for s in [1, 10, 3600] {
            let t = now + Duration::from_secs(s);
            assert!(!peers.update(&dead, t, heard));
            assert!(!peers.expire(t));
        }
        assert_eq!(peers.announcements().len(), 2);
        // Heard again: b is back, c is still dead, so c leaves.
        let back = [alive[0].clone(), dead[1].clone()];
        let t = now + Duration::from_secs(3601);
        assert!(peers.update(&back, t, Some(t)));
        let names: Vec<_> = peers.announcements().into_iter().map(|(n, _)| n).collect();
        assert_eq!(names, ["b"]);
    }

    #[test]
    fn a_member_caught_mid_delivery_keeps_its_previous_announcement() {
        let dir = ScratchDir::new("peers-partial");
        let mut peers = restored(&dir);
        let mut partial = member("b", true, 2, "10.0.0.2:80");
        partial.announcement.endpoints.clear();
        partial.complete = false;
        assert!(!peers.update(&[partial], Instant::now(), None));
        assert_eq!(*peers.announcements()[0].1, announcement("10.0.0.2:80"));
        assert_eq!(peers.restored().collect::<Vec<_>>(), ["c"]);
    }

    #[test]
    fn a_broken_file_is_set_aside_and_the_agent_starts_without_peers() {
        let dir = ScratchDir::new("peers-broken");
        std::fs::create_dir_all(dir.path().join("a")).unwrap();
        std::fs::write(dir.path().join("a/peers.json"), b"{\"version\":1,\"pee").unwrap();
        let peers = Peers::restore(dir.path(), "a", GRACE);
        assert!(peers.announcements().is_empty());
        assert!(dir.path().join("a/peers.json.broken").exists());
    }
}
