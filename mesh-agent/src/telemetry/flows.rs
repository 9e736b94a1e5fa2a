//! Flow events in user space: decoding the kernel's records, naming what they refer to, keeping
//! a bounded recent history and fanning new flows out to followers (`mesh-agent flows
//! --follow`).
//!
//! This module never blocks the kernel: the ring buffer is drained as fast as it fills, the
//! history is a fixed-size ring, and a follower too slow to keep up loses flows (the broadcast
//! channel lags) rather than holding anything back.

use std::{
    collections::{HashMap, VecDeque},
    net::SocketAddr,
    path::{Path, PathBuf},
    sync::{
        atomic::{AtomicU64, Ordering},
        Arc, Mutex,
    },
    time::{Duration, SystemTime},
};

use arc_swap::ArcSwap;
use aya::maps::{MapData, RingBuf};

use mesh_common::{
    counters::Counter,
    events::{FlowEvent, AFFINITY_HIT, AFFINITY_MISS, HOOK_SENDMSG, WAKEUP_POLL_MS},
    service::PROTO_UDP,
};
use serde::{Deserialize, Serialize};
use tokio::sync::broadcast;

use crate::reconcile::addr::{decode_ip, decode_port};

/// Flows kept for `mesh-agent flows` without `--follow`.
pub const HISTORY: usize = 4096;

/// One balancing decision, as shown to people and scripts.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Flow {
    /// RFC 3339 wall-clock time of the decision.
    pub time: String,
    /// Service name; `null` when the VIP has no service on that port.
    pub service: Option<String>,
    /// What the client asked for: VIP and port.
    pub frontend: String,
    /// Where the kernel sent it; `null` when refused.
    pub backend: Option<String>,
    /// `tcp` or `udp`.
    pub protocol: String,
    /// `connect` or `sendmsg`.
    pub call: String,
    /// `forwarded`, or why it was refused: `no_backend`, `no_service_port`, `slot_missing`.
    pub verdict: String,
    /// The client's identity on this host: its cgroup path (relative to the cgroup2 root).
    pub identity: String,
    /// `hit`, `miss` or `none`.
    pub affinity: String,
}

/// Which flows a reader wants; every set field must match.
#[derive(Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct FlowFilter {
    pub service: Option<String>,
    pub verdict: Option<String>,
    /// Matches identities that start with this prefix (a cgroup subtree).
    pub identity: Option<String>,
}

impl FlowFilter {
    pub fn matches(&self, flow: &Flow) -> bool {
        self.service
            .as_ref()
            .is_none_or(|s| flow.service.as_ref() == Some(s))
            && self.verdict.as_ref().is_none_or(|v| *v == flow.verdict)
            && self
                .identity
                .as_ref()
                .is_none_or(|i| flow.identity.starts_with(i.as_str()))
    }
}

/// The recent history plus the live feed.
pub struct FlowLog {
    history: Mutex<VecDeque<Flow>>,
    live: broadcast::Sender<Flow>,
    recorded: AtomicU64,
}

impl Default for FlowLog {
    fn default() -> Self {
        Self {
            history: Mutex::new(VecDeque::with_capacity(HISTORY)),
            live: broadcast::channel(HISTORY).0,
            recorded: AtomicU64::new(0),
        }
    }
}

impl FlowLog {
    /// Flows recorded since start.
    pub fn recorded(&self) -> u64 {
        self.recorded.load(Ordering::Relaxed)
    }

    /// Records a flow and hands it to followers.
    pub fn push(&self, flow: Flow) {
        self.recorded.fetch_add(1, Ordering::Relaxed);
        {
            let mut history = self
                .history
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            if history.len() == HISTORY {
                history.pop_front();
            }
            history.push_back(flow.clone());
        }
        // No follower is not an error.
        let _ = self.live.send(flow);
    }

    /// The most recent flows matching `filter`, oldest first, at most `limit`.
    pub fn recent(&self, filter: &FlowFilter, limit: usize) -> Vec<Flow> {
        let history = self
            .history
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let mut matching: Vec<Flow> = history
            .iter()
            .rev()
            .filter(|f| filter.matches(f))
            .take(limit)
            .cloned()
            .collect();
        matching.reverse();
        matching
    }

    /// A receiver of every flow pushed from now on.
    pub fn subscribe(&self) -> broadcast::Receiver<Flow> {
        self.live.subscribe()
    }
}

/// Kernel service id → name, as the controller last applied them: published by the
/// controller after every write of the kernel, read by the flow decoder and the tunnel's data
/// path without a lock.
#[derive(Default)]
pub struct ServiceNames(ArcSwap<HashMap<u32, String>>);

impl ServiceNames {
    /// Name of the service with kernel id `id`.
    pub fn service_name(&self, id: u32) -> Option<String> {
        self.0.load().get(&id).cloned()
    }

    /// Every name in force.
    pub fn current(&self) -> Arc<HashMap<u32, String>> {
        self.0.load_full()
    }

    /// Puts `names` in force.
    pub fn publish(&self, names: HashMap<u32, String>) {
        self.0.store(Arc::new(names));
    }
}

/// Turns kernel records into [`Flow`]s.
pub struct Decoder {
    cgroup_root: PathBuf,
    identities: CgroupNames,
    /// Wall-clock time minus monotonic time, to date kernel timestamps.
    wall_offset: Duration,
}

impl Decoder {
    pub fn new(cgroup_root: PathBuf) -> Self {
        let wall = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .unwrap_or_default();
        Self {
            cgroup_root,
            identities: CgroupNames::default(),
            wall_offset: wall.saturating_sub(monotonic_now()),
        }
    }

    pub fn decode(&mut self, event: &FlowEvent, names: &ServiceNames) -> Flow {
        let verdict = match Counter::from_index(event.verdict) {
            Some(counter) => counter.name().to_owned(),
            None => format!("unknown({})", event.verdict),
        };
        let backend = (event.backend_id != 0)
            .then(|| address(event.backend, event.backend_port, event.family));
        let time = self.wall_offset + Duration::from_nanos(event.timestamp_ns);
        Flow {
            time: rfc3339(time),
            service: names.service_name(event.service_id),
            frontend: address(event.vip, event.vip_port, event.family),
            backend,
            protocol: if event.proto == PROTO_UDP {
                "udp"
            } else {
                "tcp"
            }
            .to_owned(),
            call: if event.hook == HOOK_SENDMSG {
                "sendmsg"
            } else {
                "connect"
            }
            .to_owned(),
            verdict,
            identity: self.identities.resolve(&self.cgroup_root, event.cgroup_id),
            affinity: match event.affinity {
                AFFINITY_HIT => "hit",
                AFFINITY_MISS => "miss",
                _ => "none",
            }
            .to_owned(),
        }
    }
}

/// Drains the kernel's flow events into `log` until the ring buffer fails.
pub async fn follow_kernel(
    events: RingBuf<MapData>,
    mut decoder: Decoder,
    names: Arc<ServiceNames>,
    log: Arc<FlowLog>,
) {
    let mut ring = match crate::dataplane::poll_readable(events) {
        Ok(ring) => ring,
        Err(error) => {
            tracing::error!(%error, "cannot poll the flow-event ring buffer; flows are off");
            return;
        }
    };
    let mut poll = tokio::time::interval(Duration::from_millis(WAKEUP_POLL_MS));
    loop {
        tokio::select! {
            ready = ring.readable_mut() => match ready {
                Ok(mut ready) => {
                    drain(ready.get_inner_mut(), &mut decoder, names.as_ref(), &log);
                    ready.clear_ready();
                }
                Err(error) => {
                    tracing::error!(%error, "flow-event ring buffer failed; flows are off");
                    return;
                }
            },
            _ = poll.tick() => drain(ring.get_mut(), &mut decoder, names.as_ref(), &log),
        }
    }
}

/// Moves every event waiting in the ring into the log.
fn drain(
    events: &mut RingBuf<MapData>,
    decoder: &mut Decoder,
    names: &ServiceNames,
    log: &FlowLog,
) {
    while let Some(item) = events.next() {
        let Some(event) = parse(&item) else {
            tracing::warn!(len = item.len(), "flow event of unexpected size skipped");
            continue;
        };
        log.push(decoder.decode(&event, names));
    }
}

/// Reads a [`FlowEvent`] out of a ring-buffer record.
fn parse(bytes: &[u8]) -> Option<FlowEvent> {
    if bytes.len() != size_of::<FlowEvent>() {
        return None;
    }
    // SAFETY: the length matches and FlowEvent is plain old data (any bit pattern is valid);
    // read_unaligned copes with the record's alignment.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr().cast::<FlowEvent>()) })
}

fn address(addr: [u32; 4], port: u16, family: u8) -> String {
    match decode_ip(addr, family) {
        Ok(ip) => SocketAddr::new(ip, decode_port(port)).to_string(),
        Err(_) => format!("<family {family}>"),
    }
}

/// `CLOCK_MONOTONIC`, the clock of `bpf_ktime_get_ns`.
fn monotonic_now() -> Duration {
    let mut now = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: clock_gettime writes one timespec into the valid pointer it is given.
    unsafe { libc::clock_gettime(libc::CLOCK_MONOTONIC, &mut now) };
    Duration::new(
        u64::try_from(now.tv_sec).unwrap_or_default(),
        u32::try_from(now.tv_nsec).unwrap_or_default(),
    )
}

/// `2026-11-22T04:05:20.227Z` from a time since the epoch.
fn rfc3339(since_epoch: Duration) -> String {
    humantime::format_rfc3339_millis(SystemTime::UNIX_EPOCH + since_epoch).to_string()
}

/// Cgroup id → path, found by walking the cgroup2 tree (a cgroup's id is its directory's inode
/// number) and cached; a bounded cache, re-walked on a miss.
#[derive(Default)]
pub(crate) struct CgroupNames {
    known: HashMap<u64, String>,
}

/// Entries kept before the cache starts over.
const CGROUP_CACHE: usize = 16_384;
/// Directories a walk visits at most.
const CGROUP_WALK_LIMIT: usize = 100_000;

impl CgroupNames {
    pub(crate) fn resolve(&mut self, root: &Path, id: u64) -> String {
        if let Some(path) = self.known.get(&id) {
            return path.clone();
        }
        if self.known.len() >= CGROUP_CACHE {
            self.known.clear();
        }
        self.walk(root);
        // A cgroup the walk did not find was removed after the event (ids are never reused),
        // so the fallback is remembered too: its remaining events must not each walk the tree.
        self.known
            .entry(id)
            .or_insert_with(|| format!("cgroup:{id}"))
            .clone()
    }

    fn walk(&mut self, root: &Path) {
        use std::os::unix::fs::MetadataExt as _;
        let mut stack = vec![root.to_path_buf()];
        let mut visited = 0;
        while let Some(dir) = stack.pop() {
            visited += 1;
            if visited > CGROUP_WALK_LIMIT {
                break;
            }
            if let Ok(meta) = std::fs::metadata(&dir) {
                let relative = dir.strip_prefix(root).unwrap_or(&dir);
                self.known
                    .insert(meta.ino(), format!("/{}", relative.display()));
            }
            let Ok(entries) = std::fs::read_dir(&dir) else {
                continue;
            };
            stack.extend(
                entries
                    .flatten()
                    .filter(|e| e.file_type().is_ok_and(|t| t.is_dir()))
                    .map(|e| e.path()),
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn flow(service: &str, verdict: &str, identity: &str) -> Flow {
        Flow {
            time: String::new(),
            service: Some(service.into()),
            frontend: String::new(),
            backend: None,
            protocol: "tcp".into(),
            call: "connect".into(),
            verdict: verdict.into(),
            identity: identity.into(),
            affinity: "none".into(),
        }
    }

    #[test]
    fn filters_combine_and_identity_matches_subtrees() {
        let filter = FlowFilter {
            service: Some("web".into()),
            verdict: None,
            identity: Some("/shop".into()),
        };
        assert!(filter.matches(&flow("web", "forwarded", "/shop/frontend")));
        assert!(!filter.matches(&flow("db", "forwarded", "/shop/frontend")));
        assert!(!filter.matches(&flow("web", "forwarded", "/other")));
    }

    #[test]
    fn history_is_bounded_and_recent_is_oldest_first() {
        let log = FlowLog::default();
        for i in 0..HISTORY + 10 {
            log.push(flow(&format!("s{i}"), "forwarded", "/"));
        }
        let all = log.recent(&FlowFilter::default(), usize::MAX);
        assert_eq!(all.len(), HISTORY);
        assert_eq!(all[0].service.as_deref(), Some("s10"));
        let last_two = log.recent(&FlowFilter::default(), 2);
        assert_eq!(
            last_two
                .iter()
                .map(|f| f.service.clone().unwrap_or_default())
                .collect::<Vec<_>>(),
            [format!("s{}", HISTORY + 8), format!("s{}", HISTORY + 9)]
        );
    }

    #[test]
    fn dates_are_rfc3339_utc() {
        assert_eq!(rfc3339(Duration::from_secs(0)), "1970-01-01T00:00:00.000Z");
        assert_eq!(
            rfc3339(Duration::from_millis(1_795_320_320_227)),
            "2026-11-22T04:05:20.227Z"
        );
    }
}
