//! The vocabulary shared by the kernel programs (`mesh-ebpf`) and the agent (`mesh-agent`).
//!
//! Every type that crosses the kernel boundary lives here: map keys and values, the names the
//! maps are pinned under, their capacities, and the constants that index them. Types are
//! `#[repr(C)]` with explicit padding and a compile-time size assertion, because the verifier
//! rejects keys with uninitialised padding and both sides must agree byte for byte.
//!
//! Only user space turns on the `user` feature, which implements `aya::Pod` for these types.
//! Nothing here allocates or depends on `std`.
#![no_std]
#![deny(unsafe_code)]

pub mod counters;
pub mod events;
pub mod hash;
pub mod health;
pub mod maps;
pub mod redirect;
pub mod service;
pub mod sockmap;

#[cfg(feature = "user")]
mod pod;
