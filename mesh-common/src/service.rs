//! Keys and values of the load-balancing maps.
//!
//! Layout, after cilium's socket load balancer:
//!
//! * [`ServiceKey`] → [`Service`]: one entry per frontend (VIP, port, protocol). The header says
//!   which service id it is, how many slots its active generation holds and how to pick one.
//!   One extra entry per VIP address, with port 0 and [`SERVICE_FLAG_VIP_MARKER`], says "this
//!   address is a VIP", so a connect to a VIP on an unknown port is refused instead of leaking to
//!   the network.
//! * [`SlotKey`] → backend id: slots `0..count` of the active generation. An update writes the
//!   other generation, flips the header in one map update, then deletes the old slots, so a
//!   reader always sees one complete backend set, old or new, never an empty or mixed one.
//! * backend id → [`Backend`]: where to connect.
//!
//! Addresses are kept as the kernel hands them to `cgroup/connect*`: four `u32` words in network
//! byte order (IPv4 in word 0, the rest zero), with an explicit family. Ports are in network
//! byte order too.

/// `family` value of an IPv4 address.
pub const FAMILY_V4: u8 = 4;
/// `family` value of an IPv6 address.
pub const FAMILY_V6: u8 = 6;

/// IP protocol number of TCP, as used in [`ServiceKey::proto`].
pub const PROTO_TCP: u8 = 6;
/// IP protocol number of UDP, as used in [`ServiceKey::proto`].
pub const PROTO_UDP: u8 = 17;

/// The frontend of a service: VIP, port and protocol.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ServiceKey {
    /// VIP in network byte order; IPv4 uses word 0 only.
    pub addr: [u32; 4],
    /// Port in network byte order; 0 in a VIP marker.
    pub port: u16,
    /// [`PROTO_TCP`] or [`PROTO_UDP`]; 0 in a VIP marker.
    pub proto: u8,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
}
const _: () = assert!(core::mem::size_of::<ServiceKey>() == 20);

impl ServiceKey {
    /// The marker entry that flags `addr` as a VIP, whatever the port.
    pub const fn vip_marker(addr: [u32; 4], family: u8) -> Self {
        Self {
            addr,
            port: 0,
            proto: 0,
            family,
        }
    }
}

/// Pick a slot uniformly at random (slots hold each backend once, or by weight).
pub const LB_RANDOM: u32 = 0;
/// Slots hold a Maglev lookup table; index it by a hash of the client (or the socket).
pub const LB_MAGLEV: u32 = 1;

/// Remember each client's backend, the client being its cgroup.
pub const SERVICE_FLAG_AFFINITY_CGROUP: u32 = 1 << 0;
/// Remember each client's backend, the client being its network namespace.
pub const SERVICE_FLAG_AFFINITY_NETNS: u32 = 1 << 1;
/// This entry only marks its address as a VIP; it is not a service.
pub const SERVICE_FLAG_VIP_MARKER: u32 = 1 << 2;
/// Connections go through the agents' mutual-TLS tunnel (see [`crate::redirect`]).
pub const SERVICE_FLAG_MTLS: u32 = 1 << 3;

/// The header of a service.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Service {
    /// Agent-assigned id, nonzero, unique on this host.
    pub id: u32,
    /// Number of slots in the active generation; 0 means "no backend": connect is refused.
    pub count: u32,
    /// Active slot generation, 0 or 1.
    pub generation: u32,
    /// [`LB_RANDOM`] or [`LB_MAGLEV`].
    pub lb: u32,
    /// `SERVICE_FLAG_*` bits.
    pub flags: u32,
    /// How long an affinity entry stays valid without use, in seconds.
    pub affinity_timeout_s: u32,
}
const _: () = assert!(core::mem::size_of::<Service>() == 24);

impl Service {
    /// True when clients of this service keep their backend.
    pub const fn has_affinity(&self) -> bool {
        self.flags & (SERVICE_FLAG_AFFINITY_CGROUP | SERVICE_FLAG_AFFINITY_NETNS) != 0
    }
}

/// One slot of one generation of a service's backend table.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SlotKey {
    /// [`Service::id`].
    pub service_id: u32,
    /// 0 or 1, see [`Service::generation`].
    pub generation: u32,
    /// `0..Service::count`.
    pub slot: u32,
}
const _: () = assert!(core::mem::size_of::<SlotKey>() == 12);

/// Where a backend listens.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Backend {
    /// Address in network byte order; IPv4 uses word 0 only.
    pub addr: [u32; 4],
    /// Port in network byte order.
    pub port: u16,
    /// [`FAMILY_V4`] or [`FAMILY_V6`].
    pub family: u8,
    pub _pad: u8,
    /// The service this backend belongs to; affinity entries are checked against it, so an
    /// entry left behind by a removed backend is never followed into another service.
    pub service_id: u32,
}
const _: () = assert!(core::mem::size_of::<Backend>() == 24);

/// A socket that was balanced, and the backend it was sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseKey {
    /// `bpf_get_socket_cookie` of the client socket.
    pub cookie: u64,
    /// Backend address, network byte order.
    pub addr: [u32; 4],
    /// Backend port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: [u8; 5],
}
const _: () = assert!(core::mem::size_of::<ReverseKey>() == 32);

/// The VIP a socket asked for, shown again by `getpeername` and `recvmsg`.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ReverseValue {
    /// VIP, network byte order.
    pub addr: [u32; 4],
    /// VIP port, network byte order.
    pub port: u16,
    pub family: u8,
    pub _pad: u8,
}
const _: () = assert!(core::mem::size_of::<ReverseValue>() == 20);

/// A client of a service with affinity.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityKey {
    /// The client's cgroup id or network namespace cookie.
    pub client: u64,
    /// [`Service::id`].
    pub service_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityKey>() == 16);

/// The backend a client was last sent to.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct AffinityValue {
    /// `bpf_ktime_get_ns` of the last use.
    pub last_used_ns: u64,
    pub backend_id: u32,
    pub _pad: u32,
}
const _: () = assert!(core::mem::size_of::<AffinityValue>() == 16);
