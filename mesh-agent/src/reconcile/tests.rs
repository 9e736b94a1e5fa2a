//! The reconciler against an in-memory kernel that resolves services the way the programs do
//! (header → generation and count → slots → backends), checked after every single write.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Arc;

use mesh_common::service::{
    Backend, Service, ServiceKey, SlotKey, LB_MAGLEV, LB_RANDOM, SERVICE_FLAG_VIP_MARKER,
};

use super::apply::ApplyReport;
use super::plan::{GroupKind, Plan};
use super::*;
use crate::balance::{Desired, DesiredService};
use crate::model::{self, Affinity, Frontend, LbPolicy, Protocol};
use crate::reconcile::addr;

/// The map key of a desired service or frontend (the encoding is reconcile's, not balance's).
trait MapKey {
    fn key(&self) -> ServiceKey;
}

impl MapKey for Frontend {
    fn key(&self) -> ServiceKey {
        addr::frontend_key(*self)
    }
}

impl MapKey for DesiredService {
    fn key(&self) -> ServiceKey {
        self.frontend().key()
    }
}

/// The desired service at map key `key`.
fn at<'a>(desired: &'a Desired, key: &ServiceKey) -> Option<&'a DesiredService> {
    desired
        .services
        .values()
        .map(|s| &**s)
        .find(|s| s.key() == *key)
}

// ---------------------------------------------------------------------------------------------
// The model kernel.

/// For each service of the old or new desired state, what it may resolve to during the change.
struct Watch {
    key: ServiceKey,
    old: Option<Vec<SocketAddr>>,
    new: Option<Vec<SocketAddr>>,
}

#[derive(Default)]
struct FakeKernel {
    state: KernelState,
    /// Writes attempted.
    attempts: usize,
    /// Fail the write with this (0-based) attempt number.
    fail_at: Option<usize>,
    /// Fail every write from that attempt on (a map that stays full, a lost map).
    fail_after: Option<usize>,
    watches: Vec<Watch>,
    violations: Vec<String>,
}

impl FakeKernel {
    fn watch(&mut self, old: &Desired, new: &Desired) {
        let mut keys: Vec<ServiceKey> = old
            .services
            .keys()
            .chain(new.services.keys())
            .map(MapKey::key)
            .collect();
        keys.sort();
        keys.dedup();
        self.watches = keys
            .into_iter()
            .map(|key| Watch {
                key,
                old: at(old, &key).map(|s| s.table_addrs().collect()),
                new: at(new, &key).map(|s| s.table_addrs().collect()),
            })
            .collect();
    }

    fn check(&mut self, after: &MapOp) {
        for w in &self.watches {
            let seen = self.state.resolve(&w.key);
            let ok = match &seen {
                // Absent: fine before an add and after a removal.
                None => w.old.is_none() || w.new.is_none(),
                Some(Ok(addrs)) => w.old.as_ref() == Some(addrs) || w.new.as_ref() == Some(addrs),
                Some(Err(_)) => false,
            };
            if !ok {
                self.violations.push(format!(
                    "after {after}: {} resolves to {seen:?}; old {:?}, new {:?}",
                    addr::DisplayKey(&w.key),
                    w.old,
                    w.new
                ));
            }
        }
    }
}

impl MapWriter for FakeKernel {
    fn write(&mut self, op: &MapOp) -> Result<(), MapWriteError> {
        let n = self.attempts;
        self.attempts += 1;
        if self.fail_at == Some(n) || self.fail_after.is_some_and(|f| n >= f) {
            return Err(MapWriteError::new(format!(
                "injected failure of write #{n}"
            )));
        }
        self.state.record(op);
        self.check(op);
        Ok(())
    }
}

/// Plan and apply `to` over a kernel at `from`, checking every write; returns the report.
fn transition(
    kernel: &mut FakeKernel,
    agent: &mut KernelState,
    from: &Desired,
    to: &Desired,
) -> ApplyReport {
    kernel.watch(from, to);
    let p = plan(agent, to);
    let report = apply(&p, kernel, agent).unwrap_or_else(|e| panic!("apply failed: {e}"));
    assert_eq!(
        *agent, kernel.state,
        "agent's state differs from the kernel's"
    );
    assert!(kernel.violations.is_empty(), "{:#?}", kernel.violations);
    assert_converged(&kernel.state, to);
    report
}

/// The kernel serves exactly `desired`: every service resolves to its table, markers are right,
/// nothing else is there, and planning again is a no-op.
fn assert_converged(state: &KernelState, desired: &Desired) {
    let p = plan(state, desired);
    assert!(p.is_empty(), "not converged, plan: {p:#?}");
    let mut markers = BTreeMap::new();
    for svc in desired.services.values() {
        let key = &svc.key();
        let want: Vec<SocketAddr> = svc.table_addrs().collect();
        assert_eq!(state.resolve(key), Some(Ok(want)), "{}", svc.name);
        let header = state.services[key];
        assert_eq!(
            (header.lb, header.flags, header.affinity_timeout_s),
            (
                plan::kernel_lb(svc.policy),
                plan::service_flags(svc),
                svc.affinity_timeout_s
            )
        );
        markers.insert(ServiceKey::vip_marker(key.addr, key.family), ());
    }
    for (key, svc) in &state.services {
        if addr::is_vip_marker_key(key) {
            assert!(
                markers.contains_key(key),
                "stray marker {}",
                addr::DisplayKey(key)
            );
            assert_eq!(svc.flags, SERVICE_FLAG_VIP_MARKER);
        } else {
            assert!(at(desired, key).is_some(), "stray service");
        }
    }
    assert_eq!(
        state.services.len(),
        desired.services.len() + markers.len(),
        "markers missing"
    );
    // No entry beyond the active generations' slots and their backends.
    let slots: usize = desired.services.values().map(|s| s.table.len()).sum();
    assert_eq!(state.slots.len(), slots, "garbage slots");
    let backends: usize = desired
        .services
        .values()
        .map(|s| {
            let mut a: Vec<SocketAddr> = s.table_addrs().collect();
            a.sort();
            a.dedup();
            a.len()
        })
        .sum();
    assert_eq!(state.backends.len(), backends, "garbage backends");
}

// ---------------------------------------------------------------------------------------------
// Building desired states.

fn marker_key(vip: IpAddr) -> ServiceKey {
    let (addr, family) = addr::encode_ip(vip);
    ServiceKey::vip_marker(addr, family)
}

impl Plan {
    fn is_empty(&self) -> bool {
        self.groups.is_empty()
    }
    fn op_count(&self) -> usize {
        self.groups.iter().map(|g| g.ops.len()).sum()
    }
    fn ops(&self) -> impl Iterator<Item = &MapOp> {
        self.groups.iter().flat_map(|g| g.ops.iter())
    }
}

fn ip(s: &str) -> IpAddr {
    s.parse().unwrap()
}

fn be(s: &str) -> SocketAddr {
    s.parse().unwrap()
}

fn svc(name: &str, vip: &str, port: u16, lb: LbPolicy, backends: &[(&str, u32)]) -> DesiredService {
    DesiredService::from_config(&model::Service {
        name: name.into(),
        vip: ip(vip),
        port,
        protocol: Protocol::Tcp,
        lb,
        affinity: Affinity::None,
        affinity_timeout_s: 10_800,
        health: Default::default(),
        mtls: false,
        backends: backends
            .iter()
            .map(|&(a, weight)| model::Backend {
                address: be(a),
                weight,
            })
            .collect(),
    })
}

fn desired(services: impl IntoIterator<Item = DesiredService>) -> Desired {
    let mut d = Desired::default();
    for s in services {
        d.insert(s);
    }
    d
}

fn web(backends: &[(&str, u32)]) -> DesiredService {
    svc("web", "10.96.0.10", 80, LbPolicy::Random, backends)
}

fn key_of(s: &DesiredService) -> ServiceKey {
    s.key()
}

/// A small deterministic PRNG for generated scenarios.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// A random desired state over a small pool of frontends and backends, so that consecutive
/// states share services and backends.
fn random_desired(rng: &mut Rng, maglev: bool) -> Desired {
    const VIPS: [&str; 3] = ["10.96.0.1", "10.96.0.2", "fd00::96:3"];
    let mut services = Vec::new();
    for (v, vip) in VIPS.iter().enumerate() {
        for port in [80u16, 443] {
            if rng.below(3) == 0 {
                continue;
            }
            let lb = match rng.below(if maglev { 3 } else { 2 }) {
                0 => LbPolicy::Random,
                1 => LbPolicy::Weighted,
                _ => LbPolicy::Maglev,
            };
            let n = rng.below(6);
            let mut backends = Vec::new();
            for b in 0..8u64 {
                if backends.len() as u64 >= n {
                    break;
                }
                if rng.below(2) == 0 {
                    let weight = rng.below(4) as u32;
                    let addr: SocketAddr = if vip.contains(':') {
                        SocketAddr::new(ip(&format!("fd00::200:{b}")), 8080)
                    } else {
                        SocketAddr::new(ip(&format!("10.200.0.{b}")), 8080)
                    };
                    backends.push(model::Backend {
                        address: addr,
                        weight,
                    });
                }
            }
            let mut s = DesiredService::from_config(&model::Service {
                name: format!("s{v}-{port}"),
                vip: ip(vip),
                port,
                protocol: if rng.below(4) == 0 {
                    Protocol::Udp
                } else {
                    Protocol::Tcp
                },
                lb,
                affinity: if rng.below(3) == 0 {
                    Affinity::Cgroup
                } else {
                    Affinity::None
                },
                affinity_timeout_s: 60,
                health: Default::default(),
                backends,
                mtls: false,
            });
            s.name = format!("s{v}-{port}");
            services.push(s);
        }
    }
    desired(services)
}

// ---------------------------------------------------------------------------------------------
// Op order.

#[test]
fn new_service_writes_backends_slots_header_then_marker() {
    let d = desired([web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 1)])]);
    let p = plan(&KernelState::default(), &d);
    let key = key_of(&d.services.values().next().unwrap().clone());
    let marker = marker_key(ip("10.96.0.10"));
    assert_eq!(p.groups.len(), 2);
    assert_eq!(p.groups[0].kind, GroupKind::AddService);
    assert_eq!(p.groups[0].commit, Some(4));
    let b = |a: &str| addr::backend(be(a), 1);
    let slot = |slot| SlotKey {
        service_id: 1,
        generation: 0,
        slot,
    };
    assert_eq!(
        p.groups[0].ops,
        vec![
            MapOp::PutBackend(1, b("10.200.0.2:8080")),
            MapOp::PutBackend(2, b("10.200.0.3:8080")),
            MapOp::PutSlot(slot(0), 1),
            MapOp::PutSlot(slot(1), 2),
            MapOp::PutService(
                key,
                Service {
                    id: 1,
                    count: 2,
                    generation: 0,
                    lb: LB_RANDOM,
                    flags: 0,
                    affinity_timeout_s: 10_800
                }
            ),
        ]
    );
    assert_eq!(p.groups[1].kind, GroupKind::VipMarker);
    assert_eq!(
        p.groups[1].ops,
        vec![MapOp::PutService(
            marker,
            Service {
                id: 0,
                count: 0,
                generation: 0,
                lb: 0,
                flags: SERVICE_FLAG_VIP_MARKER,
                affinity_timeout_s: 0
            }
        )]
    );
}

#[test]
fn changed_service_flips_generation_then_deletes_old() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 1)])]);
    let b = desired([web(&[("10.200.0.3:8080", 1), ("10.200.0.4:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let p = plan(&agent, &b);
    let key = b.services.keys().next().unwrap().key();
    let slot = |generation, slot| SlotKey {
        service_id: 1,
        generation,
        slot,
    };
    assert_eq!(p.groups.len(), 1);
    assert_eq!(p.groups[0].kind, GroupKind::ChangeService);
    assert_eq!(p.groups[0].commit, Some(3));
    assert_eq!(
        p.groups[0].ops,
        vec![
            // 10.200.0.3 keeps id 2; 10.200.0.4 gets 3 (1 is still in use until the end).
            MapOp::PutBackend(3, addr::backend(be("10.200.0.4:8080"), 1)),
            MapOp::PutSlot(slot(1, 0), 2),
            MapOp::PutSlot(slot(1, 1), 3),
            MapOp::PutService(
                key,
                Service {
                    id: 1,
                    count: 2,
                    generation: 1,
                    lb: LB_RANDOM,
                    flags: 0,
                    affinity_timeout_s: 10_800
                }
            ),
            MapOp::DeleteSlot(slot(0, 0)),
            MapOp::DeleteSlot(slot(0, 1)),
            MapOp::DeleteBackend(1),
        ]
    );
    let report = transition(&mut kernel, &mut agent, &a, &b);
    assert_eq!(report.services_changed, 1);
    assert_eq!(report.ops_written, 7);
    // And back: generation 0 again.
    transition(&mut kernel, &mut agent, &b, &a);
    assert_eq!(agent.services[&key].generation, 0);
}

#[test]
fn unchanged_service_emits_nothing_and_header_change_is_one_write() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    assert!(plan(&agent, &a).is_empty());

    let mut b = a.clone();
    for s in b.services.values_mut().map(Arc::make_mut) {
        s.affinity = Affinity::Netns;
        s.affinity_timeout_s = 5;
    }
    let p = plan(&agent, &b);
    assert_eq!(p.op_count(), 1);
    assert!(matches!(
        p.groups[0].ops[0],
        MapOp::PutService(
            _,
            Service {
                generation: 0,
                count: 1,
                ..
            }
        )
    ));
    transition(&mut kernel, &mut agent, &a, &b);
}

#[test]
fn reordered_or_reweighted_random_backends_change_nothing() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let b = desired([web(&[("10.200.0.3:8080", 5), ("10.200.0.2:8080", 1)])]);
    assert!(plan(&agent, &b).is_empty());
}

#[test]
fn service_without_backends_has_count_zero() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1)])]);
    let empty = desired([web(&[])]);
    let drained = desired([web(&[("10.200.0.2:8080", 0)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &empty);
    let key = empty.services.keys().next().unwrap().key();
    assert_eq!(agent.services[&key].count, 0);
    transition(&mut kernel, &mut agent, &empty, &a);
    assert_eq!(agent.services[&key].count, 1);
    transition(&mut kernel, &mut agent, &a, &drained);
    assert_eq!(agent.services[&key].count, 0);
    assert!(
        agent.backends.is_empty(),
        "a drained backend is not in the kernel"
    );
    assert!(agent.slots.is_empty());
}

#[test]
fn markers_follow_the_last_service_of_a_vip() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let http = web(&[("10.200.0.2:8080", 1)]);
    let https = svc(
        "web-tls",
        "10.96.0.10",
        443,
        LbPolicy::Random,
        &[("10.200.0.2:8443", 1)],
    );
    let marker = marker_key(ip("10.96.0.10"));
    let both = desired([http.clone(), https.clone()]);
    let one = desired([https.clone()]);
    transition(&mut kernel, &mut agent, &Desired::default(), &both);
    let p = plan(&agent, &one);
    assert_eq!(p.groups.len(), 1);
    assert!(
        !p.ops().any(|op| *op == MapOp::DeleteService(marker)),
        "marker still needed"
    );
    assert_eq!(
        p.groups[0].ops[0],
        MapOp::DeleteService(http.key()),
        "header goes first"
    );
    transition(&mut kernel, &mut agent, &both, &one);
    assert!(agent.services.contains_key(&marker));

    let p = plan(&agent, &Desired::default());
    assert_eq!(p.groups.len(), 1);
    let ops = &p.groups[0].ops;
    assert_eq!(ops[0], MapOp::DeleteService(https.key()));
    assert_eq!(*ops.last().unwrap(), MapOp::DeleteService(marker));
    let report = transition(&mut kernel, &mut agent, &one, &Desired::default());
    assert_eq!(report.services_removed, 1);
    assert_eq!(kernel.state, KernelState::default());

    // Move a service to another port of the same VIP: the marker stays throughout.
    transition(
        &mut kernel,
        &mut agent,
        &Desired::default(),
        &desired([http.clone()]),
    );
    let p = plan(&agent, &desired([https.clone()]));
    assert!(!p
        .ops()
        .any(|op| matches!(op, MapOp::DeleteService(k) | MapOp::PutService(k, _) if *k == marker)));
}

// ---------------------------------------------------------------------------------------------
// Ids.

#[test]
fn ids_are_stable_and_smallest_free() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a_web = web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 1)]);
    let a_dns = svc(
        "dns",
        "10.96.0.53",
        53,
        LbPolicy::Random,
        &[("10.200.0.9:53", 1)],
    );
    let a = desired([a_web.clone(), a_dns.clone()]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let ids = |state: &KernelState| -> BTreeMap<ServiceKey, u32> {
        state
            .services
            .iter()
            .filter(|(_, s)| s.id != 0)
            .map(|(k, s)| (*k, s.id))
            .collect()
    };
    let backend_id = |state: &KernelState, addr: &str| -> Vec<u32> {
        state
            .backends
            .iter()
            .filter(|(_, b)| addr::decode_backend(b).unwrap() == be(addr))
            .map(|(id, _)| *id)
            .collect()
    };
    let before = ids(&agent);
    assert_eq!(before.values().copied().collect::<Vec<_>>(), vec![1, 2]);
    let kept = backend_id(&agent, "10.200.0.3:8080");

    // Change web: ids of both services and of the kept backend survive.
    let b = desired([
        web(&[("10.200.0.3:8080", 1), ("10.200.0.4:8080", 2)]),
        a_dns.clone(),
    ]);
    transition(&mut kernel, &mut agent, &a, &b);
    assert_eq!(ids(&agent), before);
    assert_eq!(backend_id(&agent, "10.200.0.3:8080"), kept);

    // Remove web, then add it back: it gets the smallest free id again.
    let c = desired([a_dns.clone()]);
    transition(&mut kernel, &mut agent, &b, &c);
    transition(&mut kernel, &mut agent, &c, &a);
    assert_eq!(ids(&agent), before);
    // Backends: ids 1.. were freed by the removal and are reused by the re-add.
    let mut backend_ids: Vec<u32> = agent.backends.keys().copied().collect();
    backend_ids.sort();
    assert_eq!(backend_ids, vec![1, 2, 3]);

    // The same address in two services is two backends, one per service.
    let d = desired([web(&[("10.200.0.9:53", 1)]), a_dns]);
    transition(&mut kernel, &mut agent, &a, &d);
    let owners: Vec<u32> = backend_id(&agent, "10.200.0.9:53")
        .iter()
        .map(|id| agent.backends[id].service_id)
        .collect();
    assert_eq!(owners.len(), 2);
    assert_ne!(owners[0], owners[1]);
}

#[test]
fn restarted_agent_adopts_the_maps() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let mut rng = Rng(0x5eed);
    let mut prev = Desired::default();
    for _ in 0..20 {
        let next = random_desired(&mut rng, true);
        transition(&mut kernel, &mut agent, &prev, &next);
        // A new agent reads the maps back and plans the same config: nothing to do.
        let read_back = kernel.state.clone();
        assert!(plan(&read_back, &next).is_empty());
        prev = next;
    }
}

#[test]
fn garbage_left_by_an_interrupted_agent_is_cleaned_without_touching_live_state() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let key = a.services.keys().next().unwrap().key();
    let live = kernel.state.resolve(&key);

    // An agent died mid-update: inactive-generation slots and an unreferenced backend of the
    // service, plus entries of a service id nothing owns and a marker of no service.
    let mut state = kernel.state.clone();
    let extra = [
        MapOp::PutBackend(40, addr::backend(be("10.200.0.7:8080"), 1)),
        MapOp::PutSlot(
            SlotKey {
                service_id: 1,
                generation: 1,
                slot: 0,
            },
            40,
        ),
        MapOp::PutSlot(
            SlotKey {
                service_id: 1,
                generation: 0,
                slot: 9,
            },
            40,
        ),
        MapOp::PutBackend(41, addr::backend(be("10.200.0.8:8080"), 7)),
        MapOp::PutSlot(
            SlotKey {
                service_id: 7,
                generation: 0,
                slot: 0,
            },
            41,
        ),
        MapOp::PutService(marker_key(ip("10.96.0.99")), super::plan::vip_marker()),
    ];
    for op in &extra {
        kernel.write(op).unwrap();
        state.record(op);
    }
    let p = plan(&state, &a);
    assert!(p.ops().all(MapOp::is_delete), "{p:#?}");
    assert_eq!(p.op_count(), extra.len());
    kernel.watch(&a, &a);
    apply(&p, &mut kernel, &mut state).unwrap();
    assert!(kernel.violations.is_empty(), "{:#?}", kernel.violations);
    assert_eq!(kernel.state.resolve(&key), live);
    assert_converged(&kernel.state, &a);
    // Ids that were in use are not handed out while their garbage may still be there.
    let b = desired([
        web(&[("10.200.0.2:8080", 1)]),
        svc("x", "10.96.0.11", 80, LbPolicy::Random, &[]),
    ]);
    let p = plan(&agent_with(&kernel.state, &extra), &b);
    let new_ids: Vec<u32> = p
        .ops()
        .filter_map(|op| match op {
            MapOp::PutService(k, s) if !addr::is_vip_marker_key(k) => Some(s.id),
            _ => None,
        })
        .collect();
    assert!(!new_ids.contains(&7), "{new_ids:?}");
}

fn agent_with(state: &KernelState, extra: &[MapOp]) -> KernelState {
    let mut s = state.clone();
    for op in extra {
        s.record(op);
    }
    s
}

#[test]
fn header_with_a_broken_id_is_rewritten_under_a_fresh_one() {
    // Two frontends claiming service id 1 (written by something else): the second gets its own.
    let a_web = web(&[("10.200.0.2:8080", 1)]);
    let a_other = svc(
        "other",
        "10.96.0.11",
        80,
        LbPolicy::Random,
        &[("10.200.0.5:8080", 1)],
    );
    let a = desired([a_web.clone(), a_other.clone()]);
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    transition(
        &mut kernel,
        &mut agent,
        &Desired::default(),
        &desired([a_web.clone()]),
    );
    let mut header = agent.services[&a_web.key()];
    header.count = 1;
    kernel
        .write(&MapOp::PutService(a_other.key(), header))
        .unwrap();
    agent.record(&MapOp::PutService(a_other.key(), header));
    let p = plan(&agent, &a);
    kernel.watch(&desired([a_web.clone()]), &a);
    // "other" currently shows web's backends; neither old nor new for the model, so only
    // check the end state and web throughout.
    kernel.watches.retain(|w| w.key == a_web.key());
    apply(&p, &mut kernel, &mut agent).unwrap();
    assert!(kernel.violations.is_empty(), "{:#?}", kernel.violations);
    assert_converged(&kernel.state, &a);
    assert_ne!(
        agent.services[&a_other.key()].id,
        agent.services[&a_web.key()].id
    );
}

// ---------------------------------------------------------------------------------------------
// The invariant over many transitions.

#[test]
fn every_write_leaves_each_service_whole_old_or_whole_new() {
    let mut rng = Rng(0x00c0_ffee);
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let mut prev = Desired::default();
    let mut ops = 0;
    for _ in 0..60 {
        let next = random_desired(&mut rng, true);
        let r = transition(&mut kernel, &mut agent, &prev, &next);
        ops += r.ops_written;
        prev = next;
    }
    assert!(
        ops > 1000,
        "the scenarios should exercise something ({ops} writes)"
    );
    // And to nothing.
    transition(&mut kernel, &mut agent, &prev, &Desired::default());
    assert_eq!(kernel.state, KernelState::default());
}

#[test]
fn maglev_and_weighted_tables_flip_atomically() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([svc(
        "m",
        "10.96.0.20",
        80,
        LbPolicy::Maglev,
        &[("10.200.0.1:80", 1), ("10.200.0.2:80", 1)],
    )]);
    let b = desired([svc(
        "m",
        "10.96.0.20",
        80,
        LbPolicy::Maglev,
        &[
            ("10.200.0.1:80", 1),
            ("10.200.0.2:80", 1),
            ("10.200.0.3:80", 2),
        ],
    )]);
    let c = desired([svc(
        "m",
        "10.96.0.20",
        80,
        LbPolicy::Weighted,
        &[("10.200.0.1:80", 3), ("10.200.0.3:80", 1)],
    )]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let key = a.services.keys().next().unwrap().key();
    assert_eq!(agent.services[&key].lb, LB_MAGLEV);
    assert_eq!(agent.services[&key].count, 251);
    transition(&mut kernel, &mut agent, &a, &b);
    transition(&mut kernel, &mut agent, &b, &c);
    assert_eq!(agent.services[&key].lb, LB_RANDOM);
    assert_eq!(agent.services[&key].count, 4);
}

// ---------------------------------------------------------------------------------------------
// Failures.

#[test]
fn a_failed_write_leaves_the_service_as_it_was() {
    let mut rng = Rng(0xdead_beef);
    let mut scenarios = 0;
    for _ in 0..60 {
        // Without Maglev, whose 251-slot tables would make this quadratic test slow; the
        // protocol does not depend on the table's size.
        let from = random_desired(&mut rng, false);
        let to = random_desired(&mut rng, false);
        // Converge on `from`.
        let mut base_kernel = FakeKernel::default();
        let mut base_agent = KernelState::default();
        transition(
            &mut base_kernel,
            &mut base_agent,
            &Desired::default(),
            &from,
        );
        let p = plan(&base_agent, &to);
        for fail in 0..p.op_count() {
            scenarios += 1;
            let mut kernel = FakeKernel {
                state: base_kernel.state.clone(),
                fail_at: Some(fail),
                ..Default::default()
            };
            let mut agent = base_agent.clone();
            kernel.watch(&from, &to);
            let result = apply(&p, &mut kernel, &mut agent);
            assert_eq!(
                agent, kernel.state,
                "state must mirror the kernel (fail at {fail})"
            );
            assert!(
                kernel.violations.is_empty(),
                "fail at {fail}: {:#?}",
                kernel.violations
            );
            let failed_op = *p.ops().nth(fail).unwrap();
            match result {
                Ok(report) => {
                    // Only a delete after a commit may fail without stopping.
                    assert!(failed_op.is_delete(), "{failed_op}");
                    assert_eq!(report.warnings.len(), 1);
                    assert_eq!(report.warnings[0].op, failed_op);
                }
                Err(e) => {
                    assert_eq!(e.op, failed_op);
                    assert!(e.undo_failures.is_empty());
                    // The failed group's service shows its old table (or is still absent).
                    if let Some(MapOp::PutService(key, _) | MapOp::DeleteService(key)) = p
                        .groups
                        .iter()
                        .find(|g| g.subject == e.subject)
                        .and_then(|g| g.commit.map(|c| g.ops[c]))
                    {
                        let old = at(&from, &key).map(|s| Ok(s.table_addrs().collect::<Vec<_>>()));
                        if !addr::is_vip_marker_key(&key) {
                            assert_eq!(kernel.state.resolve(&key), old, "{e}");
                        }
                    }
                    assert!(e.to_string().contains("injected failure"), "{e}");
                }
            }
            // The next reconcile finishes the job.
            kernel.fail_at = None;
            transition(&mut kernel, &mut agent, &from, &to);
        }
    }
    assert!(scenarios > 200, "{scenarios}");
}

#[test]
fn undo_takes_back_the_group_and_reports_a_clear_error() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1)])]);
    let b = desired([web(&[("10.200.0.3:8080", 1), ("10.200.0.4:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let before = kernel.state.clone();
    let p = plan(&agent, &b);
    // PutBackend, PutBackend, PutSlot, PutSlot(fails), ...
    kernel.fail_at = Some(kernel.attempts + 3);
    kernel.watch(&a, &b);
    let e = apply(&p, &mut kernel, &mut agent).unwrap_err();
    assert_eq!(kernel.state, before, "the group's puts were taken back");
    assert_eq!(agent, before);
    assert_eq!(e.kind, GroupKind::ChangeService);
    assert_eq!(
        e.to_string(),
        "service \"web\" (10.96.0.10:80/tcp): put slot 1/1/1 = backend 3 failed: injected failure of write #7; \
         the service keeps its previous backends"
    );
    assert_eq!(e.completed.ops_written, 6, "3 puts and their 3 undos");
}

#[test]
fn failing_undo_is_reported_and_cleaned_next_time() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1)])]);
    let b = desired([web(&[("10.200.0.3:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let p = plan(&agent, &b);
    // The map dies after the first put: the put, the slot fails, and the undo fails too.
    kernel.fail_after = Some(kernel.attempts + 1);
    kernel.watch(&a, &b);
    let e = apply(&p, &mut kernel, &mut agent).unwrap_err();
    assert_eq!(agent, kernel.state);
    assert_eq!(e.undo_failures.len(), 1);
    assert!(
        e.to_string().ends_with(
            "(1 unreferenced entries could not be removed and are retried on the next reconcile)"
        ),
        "{e}"
    );
    assert!(kernel.violations.is_empty());
    // The map recovers; the next reconcile converges (and reuses the stranded backend).
    kernel.fail_after = None;
    transition(&mut kernel, &mut agent, &a, &b);
}

#[test]
fn a_failed_delete_after_commit_is_a_warning() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let a = desired([web(&[("10.200.0.2:8080", 1)])]);
    transition(&mut kernel, &mut agent, &Desired::default(), &a);
    let p = plan(&agent, &Desired::default());
    // DeleteService, DeleteSlot(fails), DeleteBackend, DeleteService(marker)
    kernel.fail_at = Some(kernel.attempts + 1);
    kernel.watch(&a, &Desired::default());
    let report = apply(&p, &mut kernel, &mut agent).unwrap();
    assert_eq!(report.services_removed, 1);
    assert_eq!(report.warnings.len(), 1);
    assert!(report.warnings[0]
        .to_string()
        .contains("delete slot 1/0/0 failed"));
    assert_eq!(agent, kernel.state);
    assert_eq!(agent.slots.len(), 1, "the slot is still there");
    // Next plan deletes it as garbage.
    let p = plan(&agent, &Desired::default());
    assert_eq!(p.groups.len(), 1);
    assert_eq!(p.groups[0].kind, GroupKind::Cleanup);
    apply(&p, &mut kernel, &mut agent).unwrap();
    assert_eq!(kernel.state, KernelState::default());
}

#[test]
fn earlier_services_stay_applied_when_a_later_one_fails() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let first = svc(
        "a",
        "10.96.0.1",
        80,
        LbPolicy::Random,
        &[("10.200.0.1:80", 1)],
    );
    let second = svc(
        "b",
        "10.96.0.2",
        80,
        LbPolicy::Random,
        &[("10.200.0.2:80", 1)],
    );
    let d = desired([first.clone(), second.clone()]);
    let p = plan(&agent, &d);
    // a: PutBackend, PutSlot, PutService; marker; b: PutBackend(fails)
    kernel.fail_at = Some(4);
    kernel.watch(&Desired::default(), &d);
    let e = apply(&p, &mut kernel, &mut agent).unwrap_err();
    assert!(e.subject.contains("\"b\""), "{e}");
    assert_eq!(e.completed.services_added, 1);
    assert!(kernel.state.resolve(&first.key()).is_some());
    assert!(kernel.state.resolve(&second.key()).is_none());
    assert_eq!(agent, kernel.state);
    kernel.fail_at = None;
    transition(&mut kernel, &mut agent, &desired([first]), &d);
}

#[test]
fn backend_value_reuse_requires_same_service() {
    // Sanity of the test model: a backend of another service is a violation.
    let mut state = KernelState::default();
    let key = addr::service_key(ip("10.96.0.1"), 80, 6);
    state.services.insert(
        key,
        Service {
            id: 1,
            count: 1,
            generation: 0,
            lb: 0,
            flags: 0,
            affinity_timeout_s: 1,
        },
    );
    state.slots.insert(
        SlotKey {
            service_id: 1,
            generation: 0,
            slot: 0,
        },
        5,
    );
    state.backends.insert(
        5,
        Backend {
            service_id: 2,
            ..addr::backend(be("10.0.0.1:80"), 2)
        },
    );
    assert!(matches!(state.resolve(&key), Some(Err(_))));
}

/// What balance leaves to reconcile: the map key, `LB_*` and the flag bits of a desired
/// service (the assertions `balance`'s `from_config` test made when it held them).
#[test]
fn kernel_encoding_of_a_desired_service() {
    use mesh_common::service::{FAMILY_V4, PROTO_UDP, SERVICE_FLAG_AFFINITY_CGROUP};
    let mut web = svc(
        "web",
        "10.96.0.10",
        80,
        LbPolicy::Weighted,
        &[("10.0.0.3:80", 200), ("10.0.0.2:80", 100)],
    );
    web.affinity = Affinity::Cgroup;
    let mut dns = svc(
        "dns",
        "10.96.0.53",
        53,
        LbPolicy::Maglev,
        &[("10.0.0.5:53", 1)],
    );
    dns.protocol = Protocol::Udp;
    let d = desired([web, dns]);
    let web = d.services.values().find(|s| s.name == "web").unwrap();
    assert_eq!(plan::kernel_lb(web.policy), LB_RANDOM);
    assert_eq!(plan::service_flags(web), SERVICE_FLAG_AFFINITY_CGROUP);
    let key = web.key();
    assert_eq!(key.family, FAMILY_V4);
    assert_eq!(key.port, 80u16.to_be());
    assert_eq!(key.addr[0].to_ne_bytes(), [10, 96, 0, 10]);
    let dns = d.services.values().find(|s| s.name == "dns").unwrap();
    assert_eq!(dns.key().proto, PROTO_UDP);
    assert_eq!(plan::kernel_lb(dns.policy), LB_MAGLEV);
    let mut strict = (**web).clone();
    strict.strict = true;
    assert_eq!(
        plan::service_flags(&strict),
        SERVICE_FLAG_AFFINITY_CGROUP | mesh_common::service::SERVICE_FLAG_MTLS
    );
}

fn strict(mut s: DesiredService) -> DesiredService {
    s.strict = true;
    s
}

/// The strict map as (address, service id).
fn strict_map(state: &KernelState) -> Vec<(SocketAddr, u32)> {
    state
        .strict
        .iter()
        .map(|(k, &id)| (addr::decode_sock_key(k).unwrap(), id))
        .collect()
}

/// The strict-inbound map is planned like the others: a strict service's backends (drained
/// ones too) go in with its id, after the service's own group; a service that stops being
/// strict, or goes, takes its entries out; nothing else is touched.
#[test]
fn the_strict_map_follows_the_strict_services() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let plain = desired([
        web(&[("10.200.0.2:8080", 1), ("10.200.0.3:8080", 0)]),
        svc(
            "api",
            "10.96.0.11",
            80,
            LbPolicy::Random,
            &[("10.200.0.4:80", 1)],
        ),
    ]);
    transition(&mut kernel, &mut agent, &Desired::default(), &plain);
    assert!(agent.strict.is_empty());

    // Add: web becomes strict.
    let mut strict_web = plain.clone();
    for s in (strict_web.services.values_mut())
        .filter(|s| s.name == "web")
        .map(Arc::make_mut)
    {
        s.strict = true;
    }
    let p = plan(&agent, &strict_web);
    let last = p.groups.last().unwrap();
    assert_eq!(last.kind, GroupKind::StrictBackends);
    assert_eq!(last.commit, None);
    assert!(last.ops.iter().all(|op| matches!(op, MapOp::PutStrict(..))));
    transition(&mut kernel, &mut agent, &plain, &strict_web);
    let web_id = agent.services[&web(&[]).key()].id;
    assert_eq!(
        strict_map(&agent),
        [
            ("10.200.0.2:8080".parse().unwrap(), web_id),
            ("10.200.0.3:8080".parse().unwrap(), web_id)
        ]
    );

    // A strict service added in the same plan gets the id that plan gives it.
    let mut with_pay = strict_web.clone();
    with_pay.insert(strict(svc(
        "pay",
        "10.96.0.30",
        443,
        LbPolicy::Random,
        &[("10.200.0.9:8443", 1)],
    )));
    transition(&mut kernel, &mut agent, &strict_web, &with_pay);
    let pay = with_pay
        .services
        .values()
        .find(|s| s.name == "pay")
        .unwrap();
    let pay_id = agent.services[&pay.key()].id;
    assert!(strict_map(&agent).contains(&("10.200.0.9:8443".parse().unwrap(), pay_id)));

    // Remove: pay goes, web is plain again; the entries go, the services' groups first.
    let p = plan(&agent, &plain);
    let last = p.groups.last().unwrap();
    assert_eq!(last.kind, GroupKind::StrictBackends);
    assert_eq!(last.ops.len(), 3);
    assert!(last
        .ops
        .iter()
        .all(|op| matches!(op, MapOp::DeleteStrict(_))));
    transition(&mut kernel, &mut agent, &with_pay, &plain);
    assert!(agent.strict.is_empty());
    assert!(kernel.state.strict.is_empty());
}

/// A restarted agent reads the strict map back with the others and writes nothing.
#[test]
fn a_restart_rewrites_nothing_of_the_strict_map() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let d = desired([strict(web(&[("10.200.0.2:8080", 1)]))]);
    transition(&mut kernel, &mut agent, &Desired::default(), &d);
    assert_eq!(kernel.state.strict.len(), 1);
    // What the new agent reads is what the kernel holds; its plan is empty.
    let restarted = kernel.state.clone();
    assert!(plan(&restarted, &d).is_empty());
    // A stale entry left by the previous agent (a crash between writes) is deleted, and an
    // entry naming the wrong id is rewritten.
    let mut stale = restarted.clone();
    let orphan = addr::sock_key("10.200.0.77:80".parse().unwrap());
    stale.strict.insert(orphan, 9);
    let (&key, _) = stale.strict.iter().next().unwrap();
    stale.strict.insert(key, 42);
    let p = plan(&stale, &d);
    assert_eq!(p.groups.len(), 1);
    let ops = &p.groups[0].ops;
    assert!(ops.contains(&MapOp::DeleteStrict(orphan)));
    assert!(ops
        .iter()
        .any(|op| matches!(op, MapOp::PutStrict(k, id) if *k == key && *id != 42)));
}

/// A strict write that fails is an error naming the map write (the controller keeps the last
/// good state), and nothing written before it is taken back.
#[test]
fn a_failed_strict_write_is_an_error_and_undoes_nothing() {
    let mut kernel = FakeKernel::default();
    let mut agent = KernelState::default();
    let d = desired([strict(web(&[
        ("10.200.0.2:8080", 1),
        ("10.200.0.3:8080", 1),
    ]))]);
    let p = plan(&agent, &d);
    let before_strict: usize = p.groups[..p.groups.len() - 1]
        .iter()
        .map(|g| g.ops.len())
        .sum();
    kernel.fail_at = Some(before_strict + 1);
    let e = apply(&p, &mut kernel, &mut agent).unwrap_err();
    assert_eq!(e.kind, GroupKind::StrictBackends);
    assert!(e.to_string().contains("put strict backend"), "{e}");
    assert_eq!(agent.strict.len(), 1, "the first entry stays");
    assert_eq!(agent, kernel.state);
}
