//! A test bed: a bridge in a "switch" namespace and nodes plugged into it.
//!
//! Every bed gets a unique prefix (`m<pid>x<n>`), used for its namespaces (`<prefix>-sw`,
//! `<prefix>-<node>`), its cgroup subtree (`<cgroup2>/mesh-test-<prefix>/<node>/<workload>`),
//! its bpffs directory (`/sys/fs/bpf/mesh-test-<prefix>`) and its scratch directory
//! (`$TMPDIR/mesh-test-<prefix>`). Interface names live inside the bed's own namespaces, so
//! they need no prefix (`br0`, `p-<node>`, `eth0`) and stay far below 15 characters.
//!
//! Node `n` (1-based, in the order added) gets `10.<k>.0.<n>/16` and `fd00:<k>::<n>/64` on
//! `eth0` with default routes through it, where `k` is [`SUBNET`]; beds never share a namespace,
//! so every bed can use the same addresses.
//!
//! Dropping the bed tears everything down, panics included: it kills every process spawned
//! through it (agents too), removes the bpffs directory (unpinning maps and links), kills and
//! removes the cgroups children first, deletes the namespaces, and removes the scratch directory
//! unless the test panicked (then it says where the logs are). Teardown never panics; failures
//! go to stderr.

use std::net::{Ipv4Addr, Ipv6Addr};
use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};

use crate::agent::Agent;
use crate::cgroup::{self, Cgroup};
use crate::host;
use crate::netns::NetNs;
use crate::process::{self, Capture, Finished, Proc};

/// The `k` in every node's `10.<k>.0.<n>` and `fd00:<k>::<n>`.
pub const SUBNET: u8 = 1;

/// The bridge in the switch namespace.
const BRIDGE: &str = "br0";

/// State shared by the bed and its nodes.
#[derive(Debug)]
struct Shared {
    test_name: String,
    prefix: String,
    cgroup_root: Cgroup,
    bpffs_dir: PathBuf,
    tmpdir: PathBuf,
    /// Every process spawned through the bed, killed at teardown if still alive.
    procs: Mutex<Vec<Weak<Mutex<Child>>>>,
}

impl Shared {
    fn register(&self, p: &Proc) {
        let mut procs = self
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        procs.retain(|w| w.strong_count() > 0);
        procs.push(p.handle());
    }
}

/// A bridge and the nodes plugged into it. See the module docs.
#[derive(Debug)]
pub struct TestBed {
    shared: Arc<Shared>,
    switch: NetNs,
    nodes: Mutex<Vec<Node>>,
}

/// One node: a network namespace with `eth0` on the bridge, and a cgroup subtree. Cheap to
/// clone; the bed owns the resources.
#[derive(Debug, Clone)]
pub struct Node {
    inner: Arc<NodeInner>,
}

#[derive(Debug)]
struct NodeInner {
    name: String,
    index: u8,
    netns: NetNs,
    cgroup: Cgroup,
    bed: Arc<Shared>,
}

fn unique_prefix(cgroup2: &Path) -> String {
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    loop {
        let n = COUNTER.fetch_add(1, Ordering::Relaxed);
        let prefix = format!("m{}x{n}", std::process::id());
        // A crashed earlier run with the same pid may have left things behind: skip its names.
        let taken = crate::netns::exists(&format!("{prefix}-sw"))
            || cgroup2.join(format!("mesh-test-{prefix}")).exists()
            || Path::new(host::BPFFS_ROOT)
                .join(format!("mesh-test-{prefix}"))
                .exists();
        if !taken {
            return prefix;
        }
    }
}

impl TestBed {
    /// Creates the switch namespace with its bridge, the bed's cgroup subtree, bpffs
    /// directory and scratch directory. Fails (never skips) if the host cannot run it.
    pub fn new(test_name: &str) -> Result<Self> {
        let host = host::preflight()?;
        let prefix = unique_prefix(&host.cgroup2);
        let tmpdir = std::env::temp_dir().join(format!("mesh-test-{prefix}"));
        std::fs::create_dir_all(&tmpdir)
            .with_context(|| format!("creating {}", tmpdir.display()))?;
        std::fs::write(tmpdir.join("TEST"), format!("{test_name}\n"))?;
        let bpffs_dir = host.bpffs.join(format!("mesh-test-{prefix}"));
        let cgroup_root = Cgroup::create(host.cgroup2.join(format!("mesh-test-{prefix}")))?;
        let shared = Arc::new(Shared {
            test_name: test_name.to_string(),
            prefix: prefix.clone(),
            cgroup_root,
            bpffs_dir,
            tmpdir,
            procs: Mutex::new(Vec::new()),
        });
        let switch = match NetNs::create(&format!("{prefix}-sw")) {
            Ok(ns) => ns,
            Err(e) => {
                teardown_shared(&shared, false);
                return Err(e);
            }
        };
        // From here on Drop cleans up whatever the rest of `new` fails to finish.
        let bed = Self {
            shared,
            switch,
            nodes: Mutex::new(Vec::new()),
        };
        std::fs::create_dir_all(&bed.shared.bpffs_dir)
            .with_context(|| format!("creating {}", bed.shared.bpffs_dir.display()))?;
        // Multicast snooping without a querier can drop IPv6 neighbour discovery.
        bed.switch.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
        ])?;
        bed.switch.ip(&["link", "set", BRIDGE, "up"])?;
        Ok(bed)
    }

    /// The unique prefix of everything this bed creates.
    pub fn prefix(&self) -> &str {
        &self.shared.prefix
    }

    /// The name given to [`TestBed::new`].
    pub fn test_name(&self) -> &str {
        &self.shared.test_name
    }

    /// The switch namespace (holds the bridge).
    pub fn switch(&self) -> &NetNs {
        &self.switch
    }

    /// `<cgroup2>/mesh-test-<prefix>`.
    pub fn cgroup_root(&self) -> &Path {
        self.shared.cgroup_root.path()
    }

    /// `/sys/fs/bpf/mesh-test-<prefix>`, passed to agents as `--bpffs`.
    pub fn bpffs_dir(&self) -> &Path {
        &self.shared.bpffs_dir
    }

    /// Scratch directory for configs, logs and admin sockets; kept if the test panics.
    pub fn tmpdir(&self) -> &Path {
        &self.shared.tmpdir
    }

    /// Adds node `name` (lowercase letters and digits, at most 10): namespace
    /// `<prefix>-<name>`, `eth0` on the bridge with the next addresses, default routes, and
    /// cgroup `<cgroup root>/<name>`.
    pub fn add_node(&self, name: &str) -> Result<Node> {
        ensure!(
            !name.is_empty()
                && name.len() <= 10
                && name
                    .chars()
                    .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit()),
            "node name {name:?} must be 1-10 lowercase letters or digits"
        );
        let mut nodes = self
            .nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if nodes.iter().any(|n| n.name() == name) {
            bail!("node {name} already exists in bed {}", self.prefix());
        }
        let index = u8::try_from(nodes.len() + 1)
            .ok()
            .filter(|i| *i < 255)
            .context("too many nodes")?;
        let ns_name = format!("{}-{name}", self.prefix());
        let netns = NetNs::create(&ns_name)?;
        let cgroup = self.shared.cgroup_root.child(name)?;
        let node = Node {
            inner: Arc::new(NodeInner {
                name: name.to_string(),
                index,
                netns,
                cgroup,
                bed: self.shared.clone(),
            }),
        };
        // Registered before configuring, so a half-built node is still torn down.
        nodes.push(node.clone());
        drop(nodes);

        let port = format!("p-{name}");
        self.switch.ip(&[
            "link", "add", &port, "type", "veth", "peer", "name", "eth0", "netns", &ns_name,
        ])?;
        self.switch
            .ip(&["link", "set", &port, "master", BRIDGE, "up"])?;
        let ns = node.netns();
        // No duplicate address detection: addresses are usable at once, and the link-local
        // one does not hold up neighbour discovery.
        ns.run_in(|| {
            for conf in ["all", "default", "eth0"] {
                let _ = std::fs::write(format!("/proc/sys/net/ipv6/conf/{conf}/accept_dad"), "0");
            }
        })?;
        let v4 = format!("{}/16", node.ipv4());
        let v6 = format!("{}/64", node.ipv6());
        ns.ip(&["addr", "add", &v4, "dev", "eth0"])?;
        ns.ip(&["-6", "addr", "add", &v6, "dev", "eth0", "nodad"])?;
        ns.ip(&["link", "set", "eth0", "up"])?;
        // Unrouted destinations (e.g. a VIP with no service) then fail later, not with
        // ENETUNREACH at connect().
        ns.ip(&["route", "add", "default", "dev", "eth0"])?;
        ns.ip(&["-6", "route", "add", "default", "dev", "eth0"])?;
        Ok(node)
    }

    /// The nodes added so far.
    pub fn nodes(&self) -> Vec<Node> {
        self.nodes
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .clone()
    }
}

fn teardown_shared(shared: &Shared, keep_tmpdir: bool) {
    let procs = std::mem::take(
        &mut *shared
            .procs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner),
    );
    for p in procs.iter().filter_map(Weak::upgrade) {
        process::kill_and_reap(&p);
    }
    // Unpinning the links detaches the programs; the agents are dead, nothing re-pins.
    if shared.bpffs_dir.exists() {
        if let Err(e) = std::fs::remove_dir_all(&shared.bpffs_dir) {
            eprintln!(
                "mesh-tests teardown: removing {}: {e}",
                shared.bpffs_dir.display()
            );
        }
    }
    cgroup::remove_tree(shared.cgroup_root.path());
    if keep_tmpdir {
        eprintln!(
            "mesh-tests: test {} failed; configs and logs kept in {}",
            shared.test_name,
            shared.tmpdir.display()
        );
    } else if let Err(e) = std::fs::remove_dir_all(&shared.tmpdir) {
        eprintln!(
            "mesh-tests teardown: removing {}: {e}",
            shared.tmpdir.display()
        );
    }
}

impl Drop for TestBed {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        teardown_shared(&self.shared, panicking);
        let nodes = std::mem::take(
            &mut *self
                .nodes
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        for node in &nodes {
            node.inner.netns.teardown();
        }
        self.switch.teardown();
    }
}

impl Node {
    /// The node's short name (`a`).
    pub fn name(&self) -> &str {
        &self.inner.name
    }

    /// `<prefix>-<name>`: the namespace's name and the agent's `--node`.
    pub fn full_name(&self) -> String {
        format!("{}-{}", self.inner.bed.prefix, self.inner.name)
    }

    /// `10.<k>.0.<n>`.
    pub fn ipv4(&self) -> Ipv4Addr {
        Ipv4Addr::new(10, SUBNET, 0, self.inner.index)
    }

    /// `fd00:<k>::<n>`.
    pub fn ipv6(&self) -> Ipv6Addr {
        Ipv6Addr::new(
            0xfd00,
            u16::from(SUBNET),
            0,
            0,
            0,
            0,
            0,
            u16::from(self.inner.index),
        )
    }

    /// The node's network namespace.
    pub fn netns(&self) -> &NetNs {
        &self.inner.netns
    }

    /// The node's cgroup (`<cgroup root>/<name>`), where its agent attaches programs.
    pub fn cgroup(&self) -> &Cgroup {
        &self.inner.cgroup
    }

    /// The workload cgroup `<node cgroup>/<name>`, created on demand.
    pub fn workload_cgroup(&self, name: &str) -> Result<Cgroup> {
        self.inner.cgroup.child(name)
    }

    /// The bed's bpffs directory.
    pub fn bpffs_dir(&self) -> &Path {
        &self.inner.bed.bpffs_dir
    }

    /// The bed's scratch directory.
    pub fn tmpdir(&self) -> &Path {
        &self.inner.bed.tmpdir
    }

    /// Adds an extra address (`"10.1.0.12/16"`, `"fd00:1::12/64"`) to `eth0`.
    pub fn add_address(&self, cidr: &str) -> Result<()> {
        let mut args = vec![];
        if cidr.contains(':') {
            args.push("-6");
        }
        args.extend(["addr", "add", cidr, "dev", "eth0"]);
        if cidr.contains(':') {
            args.push("nodad");
        }
        self.netns().ip(&args).map(drop)
    }

    /// Runs `cmd` in the node's namespace and workload cgroup `workload`, capturing its
    /// output line by line. Killed on drop and at bed teardown.
    pub fn spawn(&self, workload: &str, cmd: Command) -> Result<Proc> {
        let cg = self.workload_cgroup(workload)?;
        let label = format!("{}/{workload}: {}", self.name(), cmd_name(&cmd));
        self.spawn_with(&label, cmd, Some(&cg), Capture::Lines)
    }

    /// Spawns into the node's namespace and the given cgroup (`None`: stay in the test
    /// runner's cgroup), registered for teardown.
    pub fn spawn_with(
        &self,
        label: &str,
        cmd: Command,
        cgroup: Option<&Cgroup>,
        capture: Capture,
    ) -> Result<Proc> {
        let p = process::spawn(label, cmd, Some(self.netns()), cgroup, capture)?;
        self.inner.bed.register(&p);
        Ok(p)
    }

    /// Runs `cmd` like [`Node::spawn`] and waits up to `timeout` for it to finish.
    pub fn run(&self, workload: &str, cmd: Command, timeout: Duration) -> Result<Finished> {
        self.spawn(workload, cmd)?.finish(timeout)
    }

    /// Starts `mesh-agent` for this node with `config_toml`; see [`Agent::start`].
    pub fn start_agent(&self, config_toml: &str) -> Result<Agent> {
        Agent::start(self, config_toml)
    }
}

fn cmd_name(cmd: &Command) -> String {
    let prog = Path::new(cmd.get_program())
        .file_name()
        .map(|s| s.to_string_lossy().into_owned())
        .unwrap_or_default();
    let first = cmd
        .get_args()
        .next()
        .map(|s| s.to_string_lossy().into_owned());
    match first {
        Some(a) => format!("{prog} {a}"),
        None => prog,
    }
}
