//! Empty on purpose: the programs are the `mesh` binary (`main.rs`). This library target lets
//! `mesh-agent` declare a build-dependency on this crate so cargo rebuilds it on changes.
#![no_std]
