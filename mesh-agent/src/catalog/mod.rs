//! The mesh catalog: what every node announces, and the one list of services they make.
//!
//! Each node announces an [`Announcement`]: the service definitions of its config and the
//! endpoints it hosts (its config's backends, then endpoints registered at run time with
//! `mesh-agent register`). [`merge`] turns the announcements of every live member (this node
//! included) into a [`Catalog`]: validated [`Service`]s, in name order, that
//! [`Catalog::desired`] turns into the kernel's [`Desired`] state. A transform between the two
//! (health checks dropping unhealthy backends) works on `Catalog::services`.
//!
//! Disagreements are resolved the same way on every node, so all nodes build the same catalog
//! from the same announcements, and each is reported as a [`Conflict`]:
//!
//! * the same service name defined differently by two nodes: the definition of the node whose
//!   name sorts first wins;
//! * the same (VIP, port, protocol) claimed by two service names: the name that sorts first
//!   wins, the other service is left out;
//! * an endpoint whose family differs from its service's VIP, or beyond what the service's
//!   `lb` can hold, is left out; an endpoint of a service nobody defines is ignored;
//! * the same endpoint announced by two nodes: one backend, with the weight announced by the
//!   node whose name sorts first.
//!
//! This module knows nothing of gossip or of the kernel.

pub mod registry;

use std::collections::{BTreeMap, BTreeSet, HashMap, HashSet};
use std::fmt;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use serde::{Deserialize, Serialize};

use crate::balance::{Desired, DesiredService};
use crate::model::{
    rules, Affinity, Backend, Frontend, HealthSettings, LbPolicy, Protocol, Service,
};

/// A service as defined, without its backends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ServiceDef {
    pub vip: IpAddr,
    pub port: u16,
    pub protocol: Protocol,
    pub lb: LbPolicy,
    pub affinity: Affinity,
    pub affinity_timeout_s: u32,
    /// Strict mTLS: clients' connections go through the agents' tunnel.
    pub mtls: bool,
}

impl ServiceDef {
    /// The definition part of a service.
    pub fn of(service: &Service) -> ServiceDef {
        ServiceDef {
            vip: service.vip,
            port: service.port,
            protocol: service.protocol,
            lb: service.lb,
            affinity: service.affinity,
            affinity_timeout_s: service.affinity_timeout_s,
            mtls: service.mtls,
        }
    }

    /// Why this definition (from a peer) is unusable, or `Ok`; the checks of the config file.
    pub fn check(&self) -> Result<(), String> {
        rules::vip(self.vip).map_err(|e| e.to_string())?;
        if self.port == 0 {
            return Err("port 0 is not a service port".into());
        }
        rules::affinity_timeout(i64::from(self.affinity_timeout_s))
            .map_err(|e| format!("affinity timeout: {e}"))?;
        Ok(())
    }

    fn frontend(&self) -> Frontend {
        Frontend {
            vip: self.vip,
            port: self.port,
            protocol: self.protocol,
        }
    }
}

/// One endpoint a node hosts for a service.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Endpoint {
    /// Shared: an announcement copied whole (to change one endpoint) copies no name.
    pub service: Arc<str>,
    pub address: SocketAddr,
    /// 0..=[`MAX_WEIGHT`](crate::model::limits::MAX_WEIGHT); 0: drained.
    pub weight: u32,
}

impl Endpoint {
    /// Why this endpoint cannot be announced to the mesh, or `Ok`: a valid service name, a
    /// port, an address other hosts can reach (not loopback, unspecified, broadcast, multicast
    /// or link-local: another host would dial its own), a weight in range.
    pub fn check(&self) -> Result<(), String> {
        rules::service_name(&self.service).map_err(|e| format!("service: {e}"))?;
        rules::announceable(self.address).map_err(|e| e.to_string())?;
        rules::weight(i64::from(self.weight)).map_err(|e| format!("weight {e}"))?;
        Ok(())
    }
}

/// Why `endpoint` cannot be registered on this node against the catalog's `services`, or
/// `Ok`: it must be announceable ([`Endpoint::check`]), of a service the catalog has, of that
/// service's address family, and not a VIP of any service (a registration must never point
/// the mesh at a frontend).
pub fn check_registration(services: &[Service], endpoint: &Endpoint) -> Result<(), String> {
    endpoint.check()?;
    let addr = endpoint.address;
    let service = services
        .iter()
        .find(|s| *s.name == *endpoint.service)
        .ok_or_else(|| {
            format!(
                "service {}: not in the catalog (define it in a config first)",
                endpoint.service
            )
        })?;
    if !rules::same_family(addr, service.vip) {
        return Err(format!(
            "{addr}: service {} has VIP {}, an endpoint must be of the same address family",
            service.name, service.vip
        ));
    }
    if let Some(other) = services.iter().find(|s| s.vip == addr.ip()) {
        return Err(format!(
            "{addr}: {} is the VIP of service {}, not an endpoint",
            addr.ip(),
            other.name
        ));
    }
    Ok(())
}

/// What one node announces.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Announcement {
    /// Service definitions by name.
    pub services: BTreeMap<String, ServiceDef>,
    /// Hosted endpoints, each (service, address) once, in announcement order.
    pub endpoints: Vec<Endpoint>,
}

impl Announcement {
    /// This node's announcement: its config's services and backends, then `registered`.
    pub fn local(services: &[Service], registered: &Registrations) -> Announcement {
        let mut announcement = Announcement {
            services: services
                .iter()
                .map(|s| (s.name.clone(), ServiceDef::of(s)))
                .collect(),
            endpoints: Vec::new(),
        };
        // Each (service, address) once, the first announcement of it kept; one name per
        // service, shared by its endpoints.
        let mut seen: HashSet<(&str, SocketAddr)> = HashSet::new();
        let configured = services.iter().flat_map(|s| {
            let name: Arc<str> = Arc::from(s.name.as_str());
            (s.backends.iter()).map(move |b| (s.name.as_str(), Arc::clone(&name), b))
        });
        let configured = configured.map(|(key, name, b)| (key, name, b.address, b.weight));
        let registered = (registered.endpoints.iter())
            .map(|e| (&*e.service, Arc::clone(&e.service), e.address, e.weight));
        for (key, service, address, weight) in configured.chain(registered) {
            if seen.insert((key, address)) {
                announcement.endpoints.push(Endpoint {
                    service,
                    address,
                    weight,
                });
            }
        }
        announcement
    }
}

impl Announcement {
    /// The (service, endpoint) pairs of `services` in this announcement that peers may reach
    /// through this node's inbound tunnel: never its loopback and the like
    /// ([`Endpoint::check`]), even where its own config lists such a backend.
    pub fn reachable_by_peers(&self, services: &HashSet<&str>) -> HashSet<(String, SocketAddr)> {
        if services.is_empty() {
            return HashSet::new();
        }
        self.endpoints
            .iter()
            .filter(|e| services.contains(&*e.service) && e.check().is_ok())
            .map(|e| (e.service.to_string(), e.address))
            .collect()
    }

    /// Brings this node's announcement (made by [`Announcement::local`] from `config`) along
    /// with a registration of `service`/`address` that now has `weight` (`None`: withdrawn),
    /// the registrations' order kept: a configured endpoint wins over its registration, a new
    /// registration comes last. Whether the announcement changed.
    pub fn follow_registration(
        &mut self,
        config: &[Service],
        service: &str,
        address: SocketAddr,
        weight: Option<u32>,
    ) -> bool {
        let configured = (config.iter().filter(|s| s.name == service))
            .any(|s| s.backends.iter().any(|b| b.address == address));
        if configured {
            return false;
        }
        let at =
            (self.endpoints.iter()).position(|e| e.address == address && &*e.service == service);
        match (at, weight) {
            (Some(at), Some(weight)) if self.endpoints[at].weight != weight => {
                self.endpoints[at].weight = weight;
            }
            (None, Some(weight)) => self.endpoints.push(Endpoint {
                service: service.into(),
                address,
                weight,
            }),
            (Some(at), None) => {
                self.endpoints.remove(at);
            }
            _ => return false,
        }
        true
    }
}

/// What changed between two versions of the catalog's sources, so the catalog is made again
/// only as far as it must be.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Change {
    /// Definitions changed (or may have): every service is merged again.
    All,
    /// Only the endpoints (or this node's settings) of these services; every definition is
    /// as it was, so no other service can change.
    Services(BTreeSet<String>),
}

impl Change {
    /// No change at all.
    pub fn none() -> Change {
        Change::Services(BTreeSet::new())
    }

    /// Both changes.
    pub fn and(self, other: Change) -> Change {
        match (self, other) {
            (Change::Services(mut a), Change::Services(b)) => {
                a.extend(b);
                Change::Services(a)
            }
            _ => Change::All,
        }
    }

    /// From one announcement of a node to the next (`None`: the node is not a member).
    pub fn between(old: Option<&Announcement>, new: Option<&Announcement>) -> Change {
        let (old, new) = match (old, new) {
            (Some(old), Some(new)) => (old, new),
            (Some(one), None) | (None, Some(one)) => {
                return match one.services.is_empty() {
                    true => Change::Services(services_of(&one.endpoints)),
                    false => Change::All,
                }
            }
            (None, None) => return Change::none(),
        };
        if old.services != new.services {
            return Change::All;
        }
        // Endpoints outside the longest common prefix and suffix are the same on both sides,
        // each where it was relative to the others: only the services in between can change.
        let (old, new) = (old.endpoints.as_slice(), new.endpoints.as_slice());
        let prefix = old.iter().zip(new).take_while(|(a, b)| a == b).count();
        let (old, new) = (&old[prefix..], &new[prefix..]);
        let suffix = (old.iter().rev().zip(new.iter().rev()))
            .take_while(|(a, b)| a == b)
            .count();
        let (old, new) = (&old[..old.len() - suffix], &new[..new.len() - suffix]);
        let mut services = services_of(old);
        services.extend(services_of(new));
        Change::Services(services)
    }
}

fn services_of(endpoints: &[Endpoint]) -> BTreeSet<String> {
    endpoints.iter().map(|e| e.service.to_string()).collect()
}

/// Everything this node's catalog is made of.
#[derive(Debug, Clone, Default)]
pub struct Sources {
    /// This node's name.
    pub node: String,
    /// The services of the config in force.
    pub config: Vec<Service>,
    /// Endpoints registered at run time.
    pub registered: Registrations,
    /// The announcements of the live peers, by node name.
    pub peers: Vec<(String, Arc<Announcement>)>,
}

impl Sources {
    /// What this node announces.
    pub fn announcement(&self) -> Announcement {
        Announcement::local(&self.config, &self.registered)
    }

    /// The catalog of this node and its live peers. Each service carries the health
    /// settings this node's config gives it (they are each agent's own, never gossiped), the
    /// defaults where the config does not define it.
    pub fn catalog(&self) -> Catalog {
        self.catalog_with(&self.announcement())
    }

    /// [`Sources::catalog`] with this node's announcement already made (it is
    /// [`Sources::announcement`]; at 20,000 services making it is a large part of a merge).
    pub fn catalog_with(&self, local: &Announcement) -> Catalog {
        let mut members: Vec<(&str, &Announcement)> = vec![(&self.node, local)];
        members.extend(self.peers.iter().map(|(n, a)| (n.as_str(), &**a)));
        let mut catalog = merge(&self.node, &members);
        let settings: HashMap<&str, &HealthSettings> = self
            .config
            .iter()
            .map(|s| (s.name.as_str(), &s.health))
            .collect();
        for service in &mut catalog.services {
            if let Some(health) = settings.get(service.name.as_str()) {
                service.health = (*health).clone();
            }
        }
        catalog
    }

    /// One service of the catalog in force (`previous`) made again after a change that
    /// touched only its endpoints or this node's settings for it ([`Change::Services`]), with
    /// this node's announcement `local`; its endpoint conflicts with it. The same as
    /// [`Sources::catalog_with`] gives it.
    pub fn service_with(
        &self,
        local: &Announcement,
        previous: &Service,
    ) -> (Service, Vec<Conflict>) {
        let mut members: Vec<(&str, &Announcement)> = vec![(&self.node, local)];
        members.extend(self.peers.iter().map(|(n, a)| (n.as_str(), &**a)));
        let (mut service, conflicts) = merge_service(&self.node, &members, previous);
        if let Some(configured) = self.config.iter().find(|s| s.name == service.name) {
            service.health = configured.health.clone();
        }
        (service, conflicts)
    }
}

/// Endpoints registered at run time, in registration order.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Registrations {
    endpoints: Vec<Endpoint>,
}

impl Registrations {
    /// Adds `endpoint` (or changes its weight). Returns whether anything changed.
    pub fn register(&mut self, endpoint: Endpoint) -> Result<bool, String> {
        endpoint.check()?;
        match self
            .endpoints
            .iter_mut()
            .find(|e| e.service == endpoint.service && e.address == endpoint.address)
        {
            Some(e) if e.weight == endpoint.weight => Ok(false),
            Some(e) => {
                e.weight = endpoint.weight;
                Ok(true)
            }
            None => {
                self.endpoints.push(endpoint);
                Ok(true)
            }
        }
    }

    /// The registered endpoints, in registration order.
    pub fn endpoints(&self) -> &[Endpoint] {
        &self.endpoints
    }

    /// Removes the endpoint; returns whether it was registered.
    pub fn deregister(&mut self, service: &str, address: SocketAddr) -> bool {
        let before = self.endpoints.len();
        self.endpoints
            .retain(|e| !(&*e.service == service && e.address == address));
        self.endpoints.len() != before
    }
}

/// Which kind of disagreement a [`Conflict`] is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum ConflictKind {
    /// One name, different definitions.
    Definition,
    /// One (VIP, port, protocol), different names.
    Frontend,
    /// An endpoint left out (wrong family, over the service's capacity).
    Endpoint,
    /// Endpoints of a service no node defines.
    Undefined,
}

impl ConflictKind {
    pub const ALL: [ConflictKind; 4] = [
        ConflictKind::Definition,
        ConflictKind::Frontend,
        ConflictKind::Endpoint,
        ConflictKind::Undefined,
    ];

    pub fn name(self) -> &'static str {
        match self {
            ConflictKind::Definition => "definition",
            ConflictKind::Frontend => "frontend",
            ConflictKind::Endpoint => "endpoint",
            ConflictKind::Undefined => "undefined",
        }
    }
}

/// A disagreement between announcements and how it was resolved.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Conflict {
    pub service: String,
    pub kind: ConflictKind,
    /// What was found and what was kept, for people.
    pub detail: String,
}

impl fmt::Display for Conflict {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "service {} ({}): {}",
            self.service,
            self.kind.name(),
            self.detail
        )
    }
}

/// The merged catalog.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Catalog {
    /// Every service with its backends, by name.
    pub services: Vec<Service>,
    /// Every disagreement found, sorted.
    pub conflicts: Vec<Conflict>,
}

impl Catalog {
    /// The kernel state of this catalog.
    pub fn desired(&self) -> Desired {
        let mut desired = Desired::default();
        for service in &self.services {
            desired.insert(DesiredService::from_config(service));
        }
        desired
    }
}

/// Where a backend goes in its service's list: (0, position) for this node's endpoints,
/// (1, 0) for the others (then in address order).
type Order = (u8, usize);

/// The catalog of `members`' announcements ((node name, announcement), this node's included).
/// `local` names this node: its endpoints come first in each service's backend list, in the
/// order it announces them (so a single node keeps its config's order); the others follow in
/// address order.
pub fn merge(local: &str, members: &[(&str, &Announcement)]) -> Catalog {
    let mut members: Vec<(&str, &Announcement)> = members.to_vec();
    members.sort_by(|a, b| a.0.cmp(b.0));
    let mut conflicts = Vec::new();

    // Definitions: the lowest node's wins.
    let mut definitions: BTreeMap<&str, Vec<(&str, &ServiceDef)>> = BTreeMap::new();
    for (node, announcement) in &members {
        for (name, def) in &announcement.services {
            definitions.entry(name).or_default().push((node, def));
        }
    }
    let mut winners: BTreeMap<&str, ServiceDef> = BTreeMap::new();
    for (name, defs) in &definitions {
        let (first, def) = defs[0];
        let differing: Vec<&str> = defs
            .iter()
            .filter(|(_, d)| *d != def)
            .map(|(n, _)| *n)
            .collect();
        if !differing.is_empty() {
            conflicts.push(Conflict {
                service: (*name).to_owned(),
                kind: ConflictKind::Definition,
                detail: format!(
                    "node(s) {} define it differently from {first}, whose definition ({}) wins",
                    differing.join(", "),
                    def.frontend()
                ),
            });
        }
        winners.insert(name, *def);
    }

    // Frontends: the lowest name wins.
    let mut frontends: HashMap<Frontend, &str> = HashMap::new();
    winners.retain(|name, def| match frontends.get(&def.frontend()) {
        Some(owner) => {
            conflicts.push(Conflict {
                service: (*name).to_owned(),
                kind: ConflictKind::Frontend,
                detail: format!(
                    "{} is already served by {owner}; {name} is left out",
                    def.frontend()
                ),
            });
            false
        }
        None => {
            frontends.insert(def.frontend(), name);
            true
        }
    });

    // Endpoints: weight from the lowest node; this node's first, in its order.
    // Endpoints come in runs of one service: the definition is looked up once per run.
    let mut endpoints: HashMap<&str, Merged> = HashMap::new();
    let mut undefined: BTreeMap<&str, usize> = BTreeMap::new();
    for (node, announcement) in &members {
        let mut run: Option<(&str, Option<&ServiceDef>)> = None;
        for (i, endpoint) in announcement.endpoints.iter().enumerate() {
            let name = &*endpoint.service;
            let def = match run {
                Some((last, def)) if last == name => def,
                _ => {
                    let def = winners.get(name);
                    run = Some((name, def));
                    def
                }
            };
            let Some(def) = def else {
                *undefined.entry(&endpoint.service).or_default() += 1;
                continue;
            };
            let order = if *node == local { (0, i) } else { (1, 0) };
            let merged = endpoints.entry(&endpoint.service).or_default();
            add_endpoint(merged, node, endpoint, order, def, &mut conflicts);
        }
    }
    for (service, count) in undefined {
        conflicts.push(Conflict {
            service: service.to_owned(),
            kind: ConflictKind::Undefined,
            detail: format!("{count} endpoint(s) announced, but no node defines the service"),
        });
    }

    let services = winners
        .into_iter()
        .map(|(name, def)| {
            let merged = endpoints.remove(name).unwrap_or_default();
            build_service(name, &def, merged, &mut conflicts)
        })
        .collect();
    conflicts.sort();
    Catalog {
        services,
        conflicts,
    }
}

/// `previous` (a service of the catalog of `members`) merged again after only its endpoints
/// changed: its definition and its frontend stay won, so none of the other services can
/// change. Returns it with its endpoint conflicts; the same as [`merge`] gives it.
pub fn merge_service(
    local: &str,
    members: &[(&str, &Announcement)],
    previous: &Service,
) -> (Service, Vec<Conflict>) {
    let mut members: Vec<(&str, &Announcement)> = members.to_vec();
    members.sort_by(|a, b| a.0.cmp(b.0));
    let def = ServiceDef::of(previous);
    let mut conflicts = Vec::new();
    let mut merged = Merged::new();
    for (node, announcement) in &members {
        let of_service = (announcement.endpoints.iter().enumerate())
            .filter(|(_, e)| *e.service == *previous.name);
        for (i, endpoint) in of_service {
            let order = if *node == local { (0, i) } else { (1, 0) };
            add_endpoint(&mut merged, node, endpoint, order, &def, &mut conflicts);
        }
    }
    let service = build_service(&previous.name, &def, merged, &mut conflicts);
    conflicts.sort();
    (service, conflicts)
}

/// One service's endpoints while they are merged: address → (weight, order).
type Merged = BTreeMap<SocketAddr, (u32, Order)>;

/// Adds `endpoint` (announced by `node`, its place in the service's list `order`) to its
/// service's, of definition `def`: the first node's weight is kept (members come in name
/// order), an endpoint of the wrong family is left out as a conflict.
fn add_endpoint(
    merged: &mut Merged,
    node: &str,
    endpoint: &Endpoint,
    order: Order,
    def: &ServiceDef,
    conflicts: &mut Vec<Conflict>,
) {
    if !rules::same_family(endpoint.address, def.vip) {
        conflicts.push(Conflict {
            service: endpoint.service.to_string(),
            kind: ConflictKind::Endpoint,
            detail: format!(
                "{} (from {node}) is not of the VIP {}'s family; left out",
                endpoint.address, def.vip
            ),
        });
        return;
    }
    let entry = (merged.entry(endpoint.address)).or_insert((endpoint.weight, order));
    entry.1 = entry.1.min(order);
}

/// The service `name` of definition `def` with its `merged` endpoints, this node's first;
/// the endpoints with weight beyond what its `lb` holds are left out as a conflict.
fn build_service(
    name: &str,
    def: &ServiceDef,
    merged: Merged,
    conflicts: &mut Vec<Conflict>,
) -> Service {
    let mut backends: Vec<(SocketAddr, u32, Order)> = merged
        .into_iter()
        .map(|(addr, (weight, order))| (addr, weight, order))
        .collect();
    backends.sort_by_key(|&(addr, _, order)| (order, addr));
    let limit = def.lb.backend_limit().map_or(usize::MAX, |(max, _)| max);
    let mut active = 0;
    let before = backends.len();
    backends.retain(|&(_, weight, _)| {
        active += usize::from(weight > 0);
        weight == 0 || active <= limit
    });
    if backends.len() != before {
        conflicts.push(Conflict {
            service: name.to_owned(),
            kind: ConflictKind::Endpoint,
            detail: format!(
                "{} endpoints with weight exceed the {limit} that lb = \"{}\" holds; {} left out",
                active,
                def.lb,
                before - backends.len()
            ),
        });
    }
    Service {
        name: name.to_owned(),
        vip: def.vip,
        port: def.port,
        protocol: def.protocol,
        lb: def.lb,
        affinity: def.affinity,
        affinity_timeout_s: def.affinity_timeout_s,
        backends: backends
            .into_iter()
            .map(|(address, weight, _)| Backend { address, weight })
            .collect(),
        // Health settings are each agent's own: [`Sources::catalog`] gives them.
        health: HealthSettings::default(),
        mtls: def.mtls,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::Config;

    const CONFIG: &str = r#"
[[services]]
name = "web"
vip = "10.96.0.10"
port = 80
lb = "maglev"
backends = [{ address = "10.0.0.9:80", weight = 2 }, { address = "10.0.0.3:80" }]
[[services]]
name = "dns"
vip = "10.96.0.53"
port = 53
protocol = "udp"
"#;

    fn config() -> Config {
        Config::parse(CONFIG, "t.toml").unwrap()
    }

    fn ep(service: &str, address: &str, weight: u32) -> Endpoint {
        Endpoint {
            service: service.into(),
            address: address.parse().unwrap(),
            weight,
        }
    }

    fn only(endpoints: Vec<Endpoint>) -> Announcement {
        Announcement {
            services: BTreeMap::new(),
            endpoints,
        }
    }

    fn backends(catalog: &Catalog, service: &str) -> Vec<(String, u32)> {
        catalog
            .services
            .iter()
            .find(|s| s.name == service)
            .map(|s| {
                s.backends
                    .iter()
                    .map(|b| (b.address.to_string(), b.weight))
                    .collect()
            })
            .unwrap_or_default()
    }

    #[test]
    fn a_registration_names_the_rule_it_breaks() {
        let sources = Sources {
            node: "a".into(),
            config: config().services,
            ..Sources::default()
        };
        let catalog = sources.catalog();
        let refused = |service: &str, address: &str| {
            check_registration(&catalog.services, &ep(service, address, 1)).unwrap_err()
        };
        for (service, address, rule) in [
            ("nosuch", "10.0.0.4:80", "not in the catalog"),
            ("web", "[fd00::4]:80", "same address family"),
            ("web", "127.0.0.1:15020", "loopback"),
            ("web", "0.0.0.0:80", "unspecified"),
            ("web", "255.255.255.255:80", "broadcast"),
            ("web", "224.0.0.1:80", "multicast"),
            ("web", "169.254.1.1:80", "link-local"),
            ("web", "10.96.0.53:53", "the VIP of service dns"),
            ("web", "10.0.0.4:0", "port 0"),
        ] {
            let error = refused(service, address);
            assert!(error.contains(rule), "{service} {address}: {error}");
        }
        check_registration(&catalog.services, &ep("web", "10.0.0.4:80", 1)).unwrap();
    }

    #[test]
    fn a_single_node_is_its_config() {
        let c = config();
        let local = Announcement::local(&c.services, &Registrations::default());
        let catalog = merge("a", &[("a", &local)]);
        assert!(catalog.conflicts.is_empty());
        assert_eq!(catalog.desired(), Desired::from_config(&c));
        let mut by_name = c.services.clone();
        by_name.sort_by(|x, y| x.name.cmp(&y.name));
        assert_eq!(catalog.services, by_name, "config order of backends kept");
    }

    #[test]
    fn peers_add_endpoints_and_registrations_join() {
        let c = config();
        let mut registered = Registrations::default();
        assert!(registered.register(ep("dns", "10.0.0.4:53", 1)).unwrap());
        assert!(!registered.register(ep("dns", "10.0.0.4:53", 1)).unwrap());
        assert!(registered.register(ep("web", "10.0.0.9:80", 5)).unwrap());
        assert!(registered.register(ep("Bad", "10.0.0.9:80", 5)).is_err());
        assert!(registered.register(ep("web", "0.0.0.0:80", 5)).is_err());
        let local = Announcement::local(&c.services, &registered);
        // The config's weight wins over a registration of the same endpoint.
        assert_eq!(local.endpoints.len(), 3);
        let b = only(vec![
            ep("web", "10.0.0.1:80", 1),
            ep("dns", "10.0.0.2:53", 3),
        ]);
        let catalog = merge("a", &[("b", &b), ("a", &local)]);
        assert!(catalog.conflicts.is_empty(), "{:?}", catalog.conflicts);
        assert_eq!(
            backends(&catalog, "web"),
            [
                ("10.0.0.9:80".into(), 2),
                ("10.0.0.3:80".into(), 1),
                ("10.0.0.1:80".into(), 1)
            ]
        );
        assert_eq!(
            backends(&catalog, "dns"),
            [("10.0.0.4:53".into(), 1), ("10.0.0.2:53".into(), 3)]
        );
        // Deregistered: gone.
        assert!(registered.deregister("dns", "10.0.0.4:53".parse().unwrap()));
        assert!(!registered.deregister("dns", "10.0.0.4:53".parse().unwrap()));
        let local = Announcement::local(&c.services, &registered);
        let catalog = merge("a", &[("b", &b), ("a", &local)]);
        assert_eq!(backends(&catalog, "dns"), [("10.0.0.2:53".into(), 3)]);
    }

    #[test]
    fn conflicts_resolve_the_same_everywhere() {
        let c = config();
        let a = Announcement::local(&c.services, &Registrations::default());
        let mut b = a.clone();
        // b defines web with another lb, and "www" on web's frontend.
        b.services.get_mut("web").unwrap().lb = LbPolicy::Random;
        let www = *b.services.get("web").unwrap();
        b.services.insert("www".into(), www);
        b.endpoints = vec![
            ep("web", "[fd00::1]:80", 1),
            ep("web", "10.0.0.3:80", 7),
            ep("api", "10.0.0.5:80", 1),
        ];
        let on_a = merge("a", &[("a", &a), ("b", &b)]);
        let on_b = merge("b", &[("b", &b), ("a", &a)]);
        let kinds: Vec<ConflictKind> = on_a.conflicts.iter().map(|c| c.kind).collect();
        assert_eq!(
            kinds,
            [
                ConflictKind::Undefined,
                ConflictKind::Definition,
                ConflictKind::Endpoint,
                ConflictKind::Frontend,
            ],
            "{:?}",
            on_a.conflicts
        );
        assert_eq!(on_a.conflicts, on_b.conflicts);
        // Each node lists its own endpoints first; the kernel tables are the same.
        let tables = |c: &Catalog| -> Vec<Vec<SocketAddr>> {
            c.desired()
                .services
                .values()
                .map(|s| s.table_addrs().collect())
                .collect()
        };
        assert_eq!(tables(&on_a), tables(&on_b));
        let web = on_a.services.iter().find(|s| s.name == "web").unwrap();
        assert_eq!(web.lb, LbPolicy::Maglev, "a's definition wins");
        assert!(on_a.services.iter().all(|s| s.name != "www"));
        // 10.0.0.3:80 keeps a's weight (a sorts first).
        assert!(backends(&on_b, "web").contains(&("10.0.0.3:80".into(), 1)));
        assert!(on_a.conflicts[1]
            .to_string()
            .contains("node(s) b define it differently"));
    }

    #[test]
    fn capacity_of_weighted_services() {
        let mut c = config();
        c.services[0].lb = LbPolicy::Weighted;
        c.services[0].backends.clear();
        let a = Announcement::local(&c.services, &Registrations::default());
        let many = only(
            (0..crate::model::limits::WEIGHTED_MAX_SLOTS + 3)
                .map(|i| ep("web", &format!("10.1.{}.{}:80", i / 250, i % 250 + 1), 1))
                .collect(),
        );
        let catalog = merge("a", &[("a", &a), ("b", &many)]);
        assert_eq!(
            backends(&catalog, "web").len(),
            crate::model::limits::WEIGHTED_MAX_SLOTS
        );
        assert_eq!(catalog.conflicts[0].kind, ConflictKind::Endpoint);
        let def = ServiceDef {
            vip: "0.0.0.0".parse().unwrap(),
            ..ServiceDef::of(&c.services[0])
        };
        assert!(def.check().is_err());
    }
}
