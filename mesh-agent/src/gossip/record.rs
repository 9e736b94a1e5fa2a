//! The wire format of what an agent announces: the key-value records it keeps in its gossip
//! state.
//!
//! | key | value (JSON) |
//! | --- | --- |
//! | `node` | [`NodeRecord`]: agent version, start time |
//! | `svc:<name>` | [`ServiceRecord`]: one service definition |
//! | `ep:<service>:<address>` | [`EndpointRecord`]: one hosted endpoint's weight |
//!
//! Every value carries a format version `v` and is read tolerantly, so agents of adjacent
//! versions coexist: unknown fields are ignored, missing optional fields take their defaults,
//! keys of unknown kinds are skipped. A record that does not decode or fails validation is
//! left out and reported ([`RecordError`]); the node's other records still count.
//!
//! The records have their own types ([`WireProtocol`], [`WireLb`], [`WireAffinity`]), each
//! name spelt out, converted to and from [`crate::model`]'s: renaming a model or config type
//! cannot change what goes on the wire. `testdata/` holds records as agents wrote them; the
//! tests decode and re-encode them byte for byte.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

use serde::{Deserialize, Serialize};

use crate::catalog::{Announcement, Endpoint, ServiceDef};
use crate::model::limits::DEFAULT_AFFINITY_TIMEOUT_S;
use crate::model::{rules, Affinity, LbPolicy, Protocol};

/// The record format this agent writes.
pub const FORMAT_VERSION: u32 = 1;

pub const NODE_KEY: &str = "node";
const SERVICE_PREFIX: &str = "svc:";
const ENDPOINT_PREFIX: &str = "ep:";

fn format_v1() -> u32 {
    1
}

/// `node`: facts about the announcing agent.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct NodeRecord {
    #[serde(default = "format_v1")]
    pub v: u32,
    /// The agent's version string.
    #[serde(default)]
    pub agent: String,
    /// Unix time (s) the agent started.
    #[serde(default)]
    pub started: u64,
    /// How many `svc:` and `ep:` records the node announces with this record. The node record
    /// is written after them, and chitchat delivers a node's records in version order, so a
    /// receiver holding fewer has caught the node mid-delivery (a restarted agent's records
    /// still arriving) and keeps what it had. Absent from agents before this field.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub records: Option<u32>,
}

/// `svc:<name>`: a service definition.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ServiceRecord {
    #[serde(default = "format_v1")]
    pub v: u32,
    pub vip: IpAddr,
    pub port: u16,
    #[serde(default)]
    pub protocol: WireProtocol,
    #[serde(default)]
    pub lb: WireLb,
    #[serde(default)]
    pub affinity: WireAffinity,
    #[serde(default = "default_affinity_timeout")]
    pub affinity_timeout_s: u32,
    /// Strict mTLS. Left out when false, so a plaintext service's record reads the same as
    /// before the field existed (agents without it ignore it either way).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub mtls: bool,
}

fn default_affinity_timeout() -> u32 {
    DEFAULT_AFFINITY_TIMEOUT_S
}

/// The protocol as written on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireProtocol {
    #[default]
    #[serde(rename = "tcp")]
    Tcp,
    #[serde(rename = "udp")]
    Udp,
}

/// The balancing policy as written on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireLb {
    #[default]
    #[serde(rename = "random")]
    Random,
    #[serde(rename = "weighted")]
    Weighted,
    #[serde(rename = "maglev")]
    Maglev,
}

/// Affinity as written on the wire.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum WireAffinity {
    #[default]
    #[serde(rename = "none")]
    None,
    #[serde(rename = "cgroup")]
    Cgroup,
    #[serde(rename = "netns")]
    Netns,
}

impl From<Protocol> for WireProtocol {
    fn from(protocol: Protocol) -> Self {
        match protocol {
            Protocol::Tcp => WireProtocol::Tcp,
            Protocol::Udp => WireProtocol::Udp,
        }
    }
}

impl From<WireProtocol> for Protocol {
    fn from(wire: WireProtocol) -> Self {
        match wire {
            WireProtocol::Tcp => Protocol::Tcp,
            WireProtocol::Udp => Protocol::Udp,
        }
    }
}

impl From<LbPolicy> for WireLb {
    fn from(lb: LbPolicy) -> Self {
        match lb {
            LbPolicy::Random => WireLb::Random,
            LbPolicy::Weighted => WireLb::Weighted,
            LbPolicy::Maglev => WireLb::Maglev,
        }
    }
}

impl From<WireLb> for LbPolicy {
    fn from(wire: WireLb) -> Self {
        match wire {
            WireLb::Random => LbPolicy::Random,
            WireLb::Weighted => LbPolicy::Weighted,
            WireLb::Maglev => LbPolicy::Maglev,
        }
    }
}

impl From<Affinity> for WireAffinity {
    fn from(affinity: Affinity) -> Self {
        match affinity {
            Affinity::None => WireAffinity::None,
            Affinity::Cgroup => WireAffinity::Cgroup,
            Affinity::Netns => WireAffinity::Netns,
        }
    }
}

impl From<WireAffinity> for Affinity {
    fn from(wire: WireAffinity) -> Self {
        match wire {
            WireAffinity::None => Affinity::None,
            WireAffinity::Cgroup => Affinity::Cgroup,
            WireAffinity::Netns => Affinity::Netns,
        }
    }
}

/// `ep:<service>:<address>`: a hosted endpoint.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct EndpointRecord {
    #[serde(default = "format_v1")]
    pub v: u32,
    #[serde(default = "default_weight")]
    pub weight: u32,
}

fn default_weight() -> u32 {
    1
}

/// A record left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("record {key:?}: {cause}")]
pub struct RecordError {
    pub key: String,
    pub cause: String,
}

/// What a node's records say.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Decoded {
    pub node: NodeRecord,
    pub announcement: Announcement,
    pub errors: Vec<RecordError>,
    /// `svc:` and `ep:` records seen, decodable or not.
    pub records: u32,
}

impl Decoded {
    /// Whether every record the node's `node` record counts has arrived (a node record
    /// without a count is taken as complete).
    pub fn complete(&self) -> bool {
        self.node.records.is_none_or(|n| n == self.records)
    }
}

/// The records of `announcement` (and `node`, with its record count), by key.
pub fn encode(node: &NodeRecord, announcement: &Announcement) -> BTreeMap<String, String> {
    let mut records = BTreeMap::new();
    let count = announcement.services.len() + announcement.endpoints.len();
    let node = NodeRecord {
        records: Some(u32::try_from(count).unwrap_or(u32::MAX)),
        ..node.clone()
    };
    records.insert(NODE_KEY.to_owned(), to_json(&node));
    for (name, def) in &announcement.services {
        let record = ServiceRecord {
            v: FORMAT_VERSION,
            vip: def.vip,
            port: def.port,
            protocol: def.protocol.into(),
            lb: def.lb.into(),
            affinity: def.affinity.into(),
            affinity_timeout_s: def.affinity_timeout_s,
            mtls: def.mtls,
        };
        records.insert(format!("{SERVICE_PREFIX}{name}"), to_json(&record));
    }
    for endpoint in &announcement.endpoints {
        let record = EndpointRecord {
            v: FORMAT_VERSION,
            weight: endpoint.weight,
        };
        records.insert(
            format!("{ENDPOINT_PREFIX}{}:{}", endpoint.service, endpoint.address),
            to_json(&record),
        );
    }
    records
}

/// `records` in the order to write them: the node record (with its count) last, so it gets
/// the highest version and a peer holding it holds every record it counts.
pub fn in_write_order(mut records: BTreeMap<String, String>) -> Vec<(String, String)> {
    let node = records.remove_entry(NODE_KEY);
    records.into_iter().chain(node).collect()
}

/// Reads a node's records; what does not decode is reported in [`Decoded::errors`].
pub fn decode<'a>(records: impl IntoIterator<Item = (&'a str, &'a str)>) -> Decoded {
    let mut decoded = Decoded::default();
    for (key, value) in records {
        if key.starts_with(SERVICE_PREFIX) || key.starts_with(ENDPOINT_PREFIX) {
            decoded.records += 1;
        }
        if let Err(cause) = decode_one(&mut decoded, key, value) {
            decoded.errors.push(RecordError {
                key: key.to_owned(),
                cause,
            });
        }
    }
    // Announcement order is address order for peers; the catalog sorts them anyway.
    let endpoints = &mut decoded.announcement.endpoints;
    endpoints.sort_by(|a, b| (&a.service, a.address).cmp(&(&b.service, b.address)));
    // One endpoint spelled twice (`[::1]` and `[0::1]`) is one endpoint; the first key wins.
    endpoints.dedup_by(|b, a| a.service == b.service && a.address == b.address);
    decoded
}

fn decode_one(decoded: &mut Decoded, key: &str, value: &str) -> Result<(), String> {
    if key == NODE_KEY {
        decoded.node = serde_json::from_str(value).map_err(|e| e.to_string())?;
    } else if let Some(name) = key.strip_prefix(SERVICE_PREFIX) {
        rules::service_name(name).map_err(|e| e.to_string())?;
        let r: ServiceRecord = serde_json::from_str(value).map_err(|e| e.to_string())?;
        let def = ServiceDef {
            vip: r.vip,
            port: r.port,
            protocol: r.protocol.into(),
            lb: r.lb.into(),
            affinity: r.affinity.into(),
            affinity_timeout_s: r.affinity_timeout_s,
            mtls: r.mtls,
        };
        def.check()?;
        decoded.announcement.services.insert(name.to_owned(), def);
    } else if let Some(rest) = key.strip_prefix(ENDPOINT_PREFIX) {
        let (service, address) = rest
            .split_once(':')
            .ok_or("an endpoint key is ep:<service>:<address>")?;
        let address: SocketAddr = address
            .parse()
            .map_err(|_| format!("{address:?} is not an IP:port"))?;
        let r: EndpointRecord = serde_json::from_str(value).map_err(|e| e.to_string())?;
        let endpoint = Endpoint {
            service: service.into(),
            address,
            weight: r.weight,
        };
        endpoint.check()?;
        decoded.announcement.endpoints.push(endpoint);
    }
    // Other keys: a newer agent's records; skipped.
    Ok(())
}

/// A record as JSON. Cannot fail: the record types have no maps with non-string keys.
fn to_json<T: Serialize>(value: &T) -> String {
    serde_json::to_string(value).unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records as an agent of format 1 writes them (checked in; never regenerate).
    const V1_SERVICE: &str = include_str!("testdata/service.v1.json");
    const V1_ENDPOINT: &str = include_str!("testdata/endpoint.v1.json");
    /// Records as a (hypothetical) format-2 agent writes them: new fields, a new key kind.
    const V2_SERVICE: &str = include_str!("testdata/service.v2.json");
    const V2_ENDPOINT: &str = include_str!("testdata/endpoint.v2.json");

    fn announcement() -> Announcement {
        let mut a = Announcement::default();
        a.services.insert(
            "web".into(),
            ServiceDef {
                vip: "10.96.0.10".parse().unwrap(),
                port: 80,
                protocol: Protocol::Tcp,
                lb: LbPolicy::Maglev,
                affinity: Affinity::Netns,
                affinity_timeout_s: 60,
                mtls: false,
            },
        );
        a.endpoints.push(Endpoint {
            service: "web".into(),
            address: "[fd00::2]:8080".parse().unwrap(),
            weight: 3,
        });
        a
    }

    #[test]
    fn round_trip_and_v1_bytes_are_stable() {
        let node = NodeRecord {
            v: 1,
            agent: "0.1.0".into(),
            started: 7,
            records: None,
        };
        let records = encode(&node, &announcement());
        assert_eq!(records["svc:web"], V1_SERVICE.trim_end());
        assert_eq!(records["ep:web:[fd00::2]:8080"], V1_ENDPOINT.trim_end());
        let decoded = decode(records.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        assert_eq!(decoded.errors, []);
        assert_eq!(
            decoded.node,
            NodeRecord {
                records: Some(2),
                ..node
            }
        );
        assert!(decoded.complete());
        assert_eq!(decoded.announcement, announcement());
    }

    /// Today's records, decoded and written again, are the same bytes (a rolling upgrade
    /// mixes agents of both sides).
    #[test]
    fn v1_fixtures_decode_and_re_encode_byte_for_byte() {
        let decoded = decode([
            ("svc:web", V1_SERVICE),
            ("ep:web:[fd00::2]:8080", V1_ENDPOINT),
        ]);
        assert_eq!(decoded.errors, []);
        let records = encode(&NodeRecord::default(), &decoded.announcement);
        assert_eq!(records["svc:web"], V1_SERVICE.trim_end());
        assert_eq!(records["ep:web:[fd00::2]:8080"], V1_ENDPOINT.trim_end());
        assert_eq!(records.len(), 3, "the node record and the two");
    }

    /// Every value of every wire enum, as format-1 agents spell it, both ways.
    #[test]
    fn every_wire_name_is_spelt_as_format_1_writes_it() {
        let def = |protocol, lb, affinity, mtls| ServiceDef {
            vip: "fd00::10".parse().unwrap(),
            port: 53,
            protocol,
            lb,
            affinity,
            affinity_timeout_s: 10_800,
            mtls,
        };
        let cases = [
            (
                def(Protocol::Udp, LbPolicy::Weighted, Affinity::Cgroup, true),
                r#"{"v":1,"vip":"fd00::10","port":53,"protocol":"udp","lb":"weighted","affinity":"cgroup","affinity_timeout_s":10800,"mtls":true}"#,
            ),
            (
                def(Protocol::Tcp, LbPolicy::Random, Affinity::None, false),
                r#"{"v":1,"vip":"fd00::10","port":53,"protocol":"tcp","lb":"random","affinity":"none","affinity_timeout_s":10800}"#,
            ),
            (
                def(Protocol::Tcp, LbPolicy::Maglev, Affinity::Netns, false),
                r#"{"v":1,"vip":"fd00::10","port":53,"protocol":"tcp","lb":"maglev","affinity":"netns","affinity_timeout_s":10800}"#,
            ),
        ];
        for (def, json) in cases {
            let mut a = Announcement::default();
            a.services.insert("dns".into(), def);
            let records = encode(&NodeRecord::default(), &a);
            assert_eq!(records["svc:dns"], json);
            let decoded = decode([("svc:dns", json)]);
            assert_eq!(decoded.errors, []);
            assert_eq!(decoded.announcement.services["dns"], def);
        }
    }

    #[test]
    fn a_node_caught_mid_delivery_is_incomplete_and_the_node_record_is_written_last() {
        let node = NodeRecord::default();
        let records = encode(&node, &announcement());
        let ordered = in_write_order(records.clone());
        assert_eq!(ordered.last().map(|(k, _)| k.as_str()), Some(NODE_KEY));
        let partial = decode(
            records
                .iter()
                .filter(|(k, _)| !k.starts_with(ENDPOINT_PREFIX))
                .map(|(k, v)| (k.as_str(), v.as_str())),
        );
        assert!(!partial.complete());
        // An agent of the previous format sends no count: taken as complete.
        let old = decode([
            ("node", r#"{"v":1,"agent":"x","started":1}"#),
            ("svc:web", V1_SERVICE),
        ]);
        assert!(old.complete());
    }

    #[test]
    fn one_endpoint_spelled_twice_is_one_endpoint() {
        let decoded = decode([
            ("ep:web:[fd00::2]:8080", V1_ENDPOINT),
            ("ep:web:[fd00:0::2]:8080", V1_ENDPOINT),
        ]);
        assert_eq!(decoded.announcement.endpoints.len(), 1);
    }

    #[test]
    fn this_version_reads_v2_records() {
        let decoded = decode([
            ("svc:web", V2_SERVICE),
            ("ep:web:[fd00::2]:8080", V2_ENDPOINT),
            ("policy:web", r#"{"v":2,"allow":["spiffe://x"]}"#),
        ]);
        assert_eq!(decoded.errors, []);
        assert_eq!(decoded.announcement, announcement());
    }

    /// What a format-2 agent would decode: this format plus optional fields.
    #[derive(Deserialize)]
    struct ServiceRecordV2 {
        #[serde(flatten)]
        v1: ServiceRecord,
        #[serde(default)]
        mirror: Option<String>,
    }

    #[test]
    fn a_v2_reader_reads_v1_records() {
        let r: ServiceRecordV2 = serde_json::from_str(V1_SERVICE).unwrap();
        assert_eq!(r.mirror, None);
        assert_eq!(r.v1.v, 1);
        assert_eq!(r.v1.lb, WireLb::Maglev);
        let r: ServiceRecordV2 = serde_json::from_str(V2_SERVICE).unwrap();
        assert_eq!(r.mirror.as_deref(), Some("shadow"));
        assert_eq!(r.v1.v, 2);
    }

    #[test]
    fn bad_records_are_reported_and_left_out() {
        let decoded = decode([
            ("svc:web", V1_SERVICE),
            ("svc:Bad", V1_SERVICE),
            ("svc:dns", r#"{"vip":"224.0.0.1","port":53}"#),
            (
                "svc:api",
                r#"{"vip":"10.0.0.1","port":80,"lb":"leastconn"}"#,
            ),
            ("ep:web:10.0.0.1", r#"{}"#),
            ("ep:web:10.0.0.2:80", r#"{"weight":10001}"#),
            ("ep:web:10.0.0.3:80", r#"{}"#),
            ("node", "not json"),
        ]);
        let keys: Vec<&str> = decoded.errors.iter().map(|e| e.key.as_str()).collect();
        assert_eq!(
            keys,
            [
                "svc:Bad",
                "svc:dns",
                "svc:api",
                "ep:web:10.0.0.1",
                "ep:web:10.0.0.2:80",
                "node"
            ]
        );
        assert!(decoded.errors[2].to_string().contains("leastconn"));
        assert_eq!(decoded.announcement.services.len(), 1);
        assert_eq!(decoded.announcement.endpoints.len(), 1);
        assert_eq!(
            decoded.announcement.endpoints[0].weight, 1,
            "default weight"
        );
    }
}
