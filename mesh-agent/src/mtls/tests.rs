//! In-process tests of the tunnel.
