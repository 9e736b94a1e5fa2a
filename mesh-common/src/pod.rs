//! `aya::Pod` for every map key and value, compiled only for user space.
//!
//! SAFETY: each type is `#[repr(C)]`, `Copy`, made only of integers and integer arrays, and has
//! no implicit padding (every gap is an explicit `_pad` field, and the size assertions next to
//! the types hold), so any bit pattern is a valid value.
#![allow(unsafe_code)]

use crate::events::{EventBudget, FlowEvent};
use crate::health::ConnectOutcomes;
use crate::redirect::{OriginalDest, SockKey};
use crate::service::{
    AffinityKey, AffinityValue, Backend, ReverseKey, ReverseValue, Service, ServiceKey, SlotKey,
};
use crate::sockmap::SockTuple;

unsafe impl aya::Pod for ServiceKey {}
unsafe impl aya::Pod for Service {}
unsafe impl aya::Pod for SlotKey {}
unsafe impl aya::Pod for Backend {}
unsafe impl aya::Pod for ReverseKey {}
unsafe impl aya::Pod for ReverseValue {}
unsafe impl aya::Pod for AffinityKey {}
unsafe impl aya::Pod for AffinityValue {}
unsafe impl aya::Pod for FlowEvent {}
unsafe impl aya::Pod for EventBudget {}
unsafe impl aya::Pod for SockKey {}
unsafe impl aya::Pod for OriginalDest {}
unsafe impl aya::Pod for ConnectOutcomes {}
unsafe impl aya::Pod for SockTuple {}
