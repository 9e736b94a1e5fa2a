//! Attaching the loopback `sk_msg` program to its sockhash (see `mesh_common::sockmap`).
//!
//! Unlike the cgroup hooks, an `sk_msg` program is attached to a map, with `BPF_PROG_ATTACH`:
//! the sockhash holds the program, so the attachment lives exactly as long as the (pinned)
//! map, and there is no link to pin. A sockhash has one `sk_msg` slot, so attaching again on a
//! restart replaces the previous agent's program instead of adding a second one; sockets
//! already in the map keep the program they joined with until they close.

use aya::{
    maps::{MapData, SockHash},
    programs::{links::ProgAttachLink, SkMsg},
    Ebpf,
};
use mesh_common::{maps, sockmap::SockTuple};

use super::DataPlaneError;

/// The `sk_msg` program's function name in the object.
const PROGRAM: &str = "mesh_loopback_msg";

/// Loads the `sk_msg` program and attaches it to the loopback sockhash, replacing the program
/// a previous agent attached.
pub(super) fn attach(ebpf: &mut Ebpf) -> Result<(), DataPlaneError> {
    let name = maps::LOOPBACK_SOCKETS;
    let sockets: SockHash<&MapData, SockTuple> = ebpf
        .map(name)
        .ok_or(DataPlaneError::MissingMap(name))?
        .try_into()
        .map_err(|cause| DataPlaneError::Map { name, cause })?;
    let map_fd = sockets.fd().try_clone().map_err(|e| DataPlaneError::Link {
        path: name.into(),
        reason: format!("duplicating the map descriptor: {e}"),
    })?;
    let err = |cause| DataPlaneError::Program {
        name: PROGRAM,
        cause,
    };
    let program: &mut SkMsg = ebpf
        .program_mut(PROGRAM)
        .ok_or(DataPlaneError::MissingProgram(PROGRAM))?
        .try_into()
        .map_err(err)?;
    program.load().map_err(err)?;
    let id = program.attach(&map_fd).map_err(err)?;
    // Dropping aya's link wrapper would detach the program; the bare attachment, once its
    // descriptors are closed, stays with the map, which is what must outlive this agent.
    let link: ProgAttachLink = program.take_link(id).map_err(err)?.into();
    drop(link);
    Ok(())
}
