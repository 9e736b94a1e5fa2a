//! The kernel side of the agent: loading the programs, attaching them to the cgroup, pinning
//! maps and links so the data plane outlives the agent, and adopting that state on restart.
//!
//! A restart never duplicates attachments: each hook's new link is attached beside the old one,
//! pinned, and only then is the old link's pin removed, which detaches it. There is no moment
//! without a program on the hook, and at rest exactly one link per hook remains. Running both
//! for an instant is harmless: after the first rewrites a VIP, the second sees a backend address
//! and passes. The loopback `sk_msg` program is the exception: it attaches to its pinned
//! sockhash, not to the cgroup, and a new attach replaces the old one (see [`sockmap`]).

mod kernel_maps;
mod pins;
mod redirects;
mod sockmap;

use std::{
    fs::{self, File},
    io,
    os::fd::AsRawFd,
    path::{Path, PathBuf},
};

use tokio::io::{unix::AsyncFd, Interest};

use aya::{
    maps::{Array, MapData, RingBuf},
    programs::{links::FdLink, links::PinnedLink, CgroupAttachMode, CgroupSkbAttachType, Program},
    Ebpf, EbpfLoader,
};
use aya_log::EbpfLogger;
pub use kernel_maps::KernelMaps;
use mesh_common::{
    events::{SETTING_DEBUG_LOG, SETTING_FLOW_EVENTS},
    maps,
    redirect::SETTING_OUTBOUND_PORT,
    sockmap::SETTING_LOOPBACK_SOCKMAP,
};
pub use pins::{PinDir, PinError};
pub use redirects::{Redirect, Redirects};

/// The programs, compiled by `build.rs` from `mesh-ebpf`.
#[cfg(feature = "ebpf")]
static OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/mesh"));
/// Built without the `ebpf` feature (in-process tests): there is nothing to load.
#[cfg(not(feature = "ebpf"))]
static OBJECT: &[u8] = &[];

/// (program function, hook name used for its link pin).
const HOOKS: [(&str, &str); 11] = [
    ("mesh_connect4", "connect4"),
    ("mesh_connect6", "connect6"),
    ("mesh_sendmsg4", "sendmsg4"),
    ("mesh_sendmsg6", "sendmsg6"),
    ("mesh_recvmsg4", "recvmsg4"),
    ("mesh_recvmsg6", "recvmsg6"),
    ("mesh_getpeername4", "getpeername4"),
    ("mesh_getpeername6", "getpeername6"),
    ("mesh_sock_release", "sock_release"),
    ("mesh_sock_ops", "sock_ops"),
    ("mesh_strict_ingress", "strict_ingress"),
];

/// Why the data plane could not be installed or removed.
#[derive(Debug, thiserror::Error)]
pub enum DataPlaneError {
    #[error("this mesh-agent was built without its eBPF programs (the `ebpf` feature)")]
    NoPrograms,
    #[error(transparent)]
    Pins(#[from] PinError),
    #[error("cannot load the eBPF object")]
    Load(#[source] Box<aya::EbpfError>),
    #[error("the eBPF object has no program {0}")]
    MissingProgram(&'static str),
    #[error("the eBPF object has no map {0}")]
    MissingMap(&'static str),
    #[error("program {name}")]
    Program {
        name: &'static str,
        #[source]
        cause: aya::programs::ProgramError,
    },
    #[error("cannot start the eBPF debug log: {0}")]
    Logger(String),
    #[error("cannot open cgroup {path}: {cause}")]
    Cgroup { path: PathBuf, cause: io::Error },
    #[error("cannot pin or unpin link {path}: {reason}")]
    Link { path: PathBuf, reason: String },
    #[error("map {name} holds a bad entry: {reason}")]
    Corrupt { name: &'static str, reason: String },
    #[error("map {name}")]
    Map {
        name: &'static str,
        #[source]
        cause: aya::maps::MapError,
    },
}

/// What the programs report to this agent, for the tasks that read it.
pub struct Telemetry {
    /// Flow events of this agent's programs.
    pub events: RingBuf<MapData>,
    /// The kernel's debug log, when `Settings::debug_log` is on.
    pub logger: Option<EbpfLogger<&'static dyn log::Log>>,
}

/// Registers a [`Telemetry`] stream (the flow-event ring buffer or the eBPF logger) with the
/// tokio reactor for readability.
pub fn poll_readable<T: AsRawFd>(inner: T) -> io::Result<AsyncFd<T>> {
    // SAFETY: both telemetry types own their map's file descriptor (an `OwnedFd` inside aya's
    // `MapData`) for as long as they live and always return that same descriptor, and the
    // `AsyncFd` owns them, so the descriptor stays open and unchanged while registered.
    unsafe { AsyncFd::register_with_interest(inner, Interest::READABLE) }.map_err(io::Error::from)
}

/// Switches the agent sets for its programs.
#[derive(Clone, Copy, Debug)]
pub struct Settings {
    /// Send a flow event for every balancing decision (rate-bounded).
    pub flow_events: bool,
    /// Log each decision from the kernel through aya-log (verbose; for debugging).
    pub debug_log: bool,
    /// Port of the agent's outbound (mTLS) listener on loopback; 0 = none, and then connects
    /// to mTLS services are refused.
    pub outbound_port: u16,
    /// Short-circuit the loopback hop between applications and the outbound listener with a
    /// sockmap (`[mtls] loopback_sockmap`).
    pub loopback_sockmap: bool,
}

/// The installed data plane: programs attached, state pinned, maps open for writing.
pub struct DataPlane {
    pub maps: KernelMaps,
    /// The original destinations of redirected (mTLS) connections, for the outbound listener.
    pub redirects: Redirects,
    pub pins: PinDir,
    /// True when maps of a previous agent were found and reused.
    pub adopted: bool,
}

impl DataPlane {
    /// Loads the programs into the kernel, adopting pinned maps if present, attaches them to
    /// `cgroup` and pins everything under `pins`.
    pub fn install(
        cgroup: &Path,
        pins: PinDir,
        settings: Settings,
    ) -> Result<(Self, Telemetry), DataPlaneError> {
        if OBJECT.is_empty() {
            return Err(DataPlaneError::NoPrograms);
        }
        pins.validate()?;
        let adopted = pins.has_maps();
        pins.create()?;
        let mut ebpf = EbpfLoader::new()
            .default_map_pin_directory(pins.maps())
            .load(OBJECT)
            .map_err(|e| DataPlaneError::Load(Box::new(e)))?;
        // The logger must own its ring buffer before the programs load.
        let logger = if settings.debug_log {
            Some(EbpfLogger::init(&mut ebpf).map_err(|e| DataPlaneError::Logger(e.to_string()))?)
        } else {
            None
        };
        apply_settings(&mut ebpf, settings)?;
        let cgroup_dir = File::open(cgroup).map_err(|cause| DataPlaneError::Cgroup {
            path: cgroup.to_owned(),
            cause,
        })?;
        for (name, hook) in HOOKS {
            let link = attach(&mut ebpf, name, &cgroup_dir)?;
            replace_pinned_link(&pins.link(hook), link)?;
        }
        sockmap::attach(&mut ebpf)?;
        let maps = KernelMaps::take(&mut ebpf)?;
        let redirects = Redirects::new(take_map(&mut ebpf, maps::REDIRECT_BY_PEER)?);
        let events = take_map(&mut ebpf, maps::EVENTS)?;
        Ok((
            Self {
                maps,
                redirects,
                pins,
                adopted,
            },
            Telemetry { events, logger },
        ))
    }
}

/// Detaches and unpins a node's data plane without loading anything (`mesh-agent uninstall`).
pub fn uninstall(pins: &PinDir) -> Result<(), DataPlaneError> {
    pins.remove_all().map_err(DataPlaneError::from)
}

fn apply_settings(ebpf: &mut Ebpf, settings: Settings) -> Result<(), DataPlaneError> {
    let name = maps::SETTINGS;
    let mut switches: Array<&mut MapData, u32> = ebpf
        .map_mut(name)
        .ok_or(DataPlaneError::MissingMap(name))?
        .try_into()
        .map_err(|cause| DataPlaneError::Map { name, cause })?;
    for (index, value) in [
        (SETTING_FLOW_EVENTS, u32::from(settings.flow_events)),
        (SETTING_DEBUG_LOG, u32::from(settings.debug_log)),
        (SETTING_OUTBOUND_PORT, u32::from(settings.outbound_port)),
        (
            SETTING_LOOPBACK_SOCKMAP,
            u32::from(settings.loopback_sockmap),
        ),
    ] {
        switches
            .set(index, value, 0)
            .map_err(|cause| DataPlaneError::Map { name, cause })?;
    }
    Ok(())
}

/// Takes map `name` out of the loaded object as a typed handle.
fn take_map<T: TryFrom<aya::maps::Map, Error = aya::maps::MapError>>(
    ebpf: &mut Ebpf,
    name: &'static str,
) -> Result<T, DataPlaneError> {
    let map = ebpf
        .take_map(name)
        .ok_or(DataPlaneError::MissingMap(name))?;
    T::try_from(map).map_err(|cause| DataPlaneError::Map { name, cause })
}

fn attach(ebpf: &mut Ebpf, name: &'static str, cgroup: &File) -> Result<FdLink, DataPlaneError> {
    let err = |cause| DataPlaneError::Program { name, cause };
    let program = ebpf
        .program_mut(name)
        .ok_or(DataPlaneError::MissingProgram(name))?;
    // aya attaches through a BPF link here (kernel >= 5.7). Cgroup links always coexist with
    // other programs on the hook and the kernel rejects any attach flag on them with EINVAL,
    // so the mode must be `Single` (no flags), which does not make the link exclusive.
    // One arm per program type: aya has no trait covering their `attach` methods.
    let link = match program {
        Program::CgroupSockAddr(program) => {
            program.load().map_err(err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err)?;
            FdLink::try_from(program.take_link(id).map_err(err)?)
        }
        Program::CgroupSock(program) => {
            program.load().map_err(err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err)?;
            FdLink::try_from(program.take_link(id).map_err(err)?)
        }
        Program::SockOps(program) => {
            program.load().map_err(err)?;
            let id = program
                .attach(cgroup, CgroupAttachMode::Single)
                .map_err(err)?;
            FdLink::try_from(program.take_link(id).map_err(err)?)
        }
        Program::CgroupSkb(program) => {
            program.load().map_err(err)?;
            let id = program
                .attach(
                    cgroup,
                    CgroupSkbAttachType::Ingress,
                    CgroupAttachMode::Single,
                )
                .map_err(err)?;
            FdLink::try_from(program.take_link(id).map_err(err)?)
        }
        other => {
            return Err(DataPlaneError::Link {
                path: PathBuf::from(name),
                reason: format!("unexpected program type {:?}", other.prog_type()),
            })
        }
    };
    link.map_err(|e| DataPlaneError::Link {
        path: PathBuf::from(name),
        reason: e.to_string(),
    })
}

/// Pins `link` at `path`, detaching whatever link was pinned there before.
fn replace_pinned_link(path: &Path, link: FdLink) -> Result<(), DataPlaneError> {
    let link_err = |step: &str, reason: String| DataPlaneError::Link {
        path: path.to_owned(),
        reason: format!("{step}: {reason}"),
    };
    // bpffs refuses names with a dot (EPERM), so no `.new` suffix.
    let mut staging = path.as_os_str().to_owned();
    staging.push("_new");
    let staging = PathBuf::from(staging);
    match fs::remove_file(&staging) {
        Ok(()) => {}
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(link_err("removing a stale staging pin", e.to_string())),
    }
    let staged = link
        .pin(&staging)
        .map_err(|e| link_err("pinning the new link", format!("{e:?}")))?;
    if path.exists() {
        let old = PinnedLink::from_pin(path)
            .map_err(|e| link_err("opening the old link", e.to_string()))?;
        // Dropping the unpinned link closes its last descriptor, which detaches it.
        drop(
            old.unpin()
                .map_err(|e| link_err("unpinning the old link", e.to_string()))?,
        );
    }
    let link = staged
        .unpin()
        .map_err(|e| link_err("unpinning the staged link", e.to_string()))?;
    link.pin(path)
        .map_err(|e| link_err("pinning the link", format!("{e:?}")))?;
    Ok(())
}
