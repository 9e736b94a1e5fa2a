//! Map names and capacities.
//!
//! The layout version is part of every map name (`_V1`), so a pin left by an agent with another
//! layout is never mistaken for ours: the agent refuses to adopt it with a clear message instead
//! of reading foreign bytes. Bump [`LAYOUT_VERSION`] and the suffix together whenever a key or
//! value changes shape.

/// Version of the map layout, carried in every map name.
pub const LAYOUT_VERSION: u32 = 1;

/// Frontends: (VIP, port, protocol) → service header. See [`crate::service::ServiceKey`].
pub const SERVICES: &str = "MESH_SVC_V1";
/// Backend slots: (service id, generation, slot) → backend id.
pub const SLOTS: &str = "MESH_SLOT_V1";
/// Backends: backend id → address and port.
pub const BACKENDS: &str = "MESH_BE_V1";
/// Reverse translation: (socket cookie, backend address, port) → VIP and port.
pub const REVERSE: &str = "MESH_REV_V1";
/// Session affinity: (client key, service id) → backend id.
pub const AFFINITY: &str = "MESH_AFF_V1";
/// Per-CPU counters, indexed by [`crate::counters::Counter`].
pub const COUNTERS: &str = "MESH_CNT_V1";
/// Connections (and datagrams) sent to each backend: backend id → count.
pub const BACKEND_COUNTS: &str = "MESH_BECNT_V1";
/// Switches the agent sets for the programs, indexed by `events::SETTING_*`.
pub const SETTINGS: &str = "MESH_SET_V1";
/// Per-CPU token buckets bounding the flow-event rate.
pub const EVENT_BUDGET: &str = "MESH_EVB_V1";
/// Flow events (ring buffer). Not pinned, like [`SETTINGS`] and [`EVENT_BUDGET`]: each agent
/// sets up and reads its own programs' copies.
pub const EVENTS: &str = "MESH_EVT_V1";

/// mTLS connects awaiting their source port: socket cookie → original destination.
pub const REDIRECT_BY_COOKIE: &str = "MESH_RDC_V1";
/// Established mTLS connects: client address and port → original destination. The agent
/// looks up (and deletes) the peer of each connection its outbound listener accepts.
pub const REDIRECT_BY_PEER: &str = "MESH_RDP_V1";
/// Backends of strict mTLS services: address and port → service id. Connection openings to
/// them from anything but the agent are dropped.
pub const STRICT_INBOUND: &str = "MESH_STRICT_V1";
/// Connect outcomes per backend address, per CPU (passive health checking).
pub const CONNECT_OUTCOMES: &str = "MESH_OUTCOME_V1";
/// Sockets of the loopback hop between applications and the agent's outbound listener:
/// 4-tuple → socket (a sockhash), for the `sk_msg` redirect. See [`crate::sockmap`].
pub const LOOPBACK_SOCKETS: &str = "MESH_LOSOCK_V1";

/// Frontend entries: services plus one VIP marker per distinct VIP address.
pub const SERVICES_MAX: u32 = 65_536;
/// Backend entries, mesh-wide on this host.
pub const BACKENDS_MAX: u32 = 262_144;
/// Slot entries. A service holds one slot per backend (`random`), its weighted share
/// (`weighted`) or a Maglev table (`maglev`); twice that while an update switches generations.
pub const SLOTS_MAX: u32 = 1_048_576;
/// Sockets that talked to a VIP and may ask for their peer name.
pub const REVERSE_MAX: u32 = 262_144;
/// Clients with a remembered backend.
pub const AFFINITY_MAX: u32 = 131_072;
/// Slots of the counters array: room for counters added later without a layout change.
pub const COUNTERS_MAX: u32 = 32;
/// mTLS connects between `connect` and the agent's `accept` (each lives a few round trips).
pub const REDIRECT_MAX: u32 = 65_536;
/// Backend addresses of strict services on this host.
pub const STRICT_MAX: u32 = 65_536;
/// Sockets of loopback hops (two per redirected mTLS flow while it is open).
pub const LOOPBACK_SOCKETS_MAX: u32 = 65_536;
