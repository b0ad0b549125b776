//! The device-facing part: one ConnectX port as a stolon *domain*.
//!
//! [`VerbsDomain::open`] finds the device and port, picks the GID, and builds the shared
//! objects: a protection domain, one completion queue sized for every peer's outstanding work,
//! a shared receive queue for messages (with registered buffers) and one for writes with
//! immediate (empty receives: such a write consumes a receive WR at the target but places no
//! data in it, so that SRQ is kept stocked). Per peer it creates two RC QPs on demand (data and
//! message) and connects them through [`crate::handshake`], whose messages the caller carries
//! out of band ([`DomainEvent::SendHandshake`]). Posting and polling go through the pure modules:
//! [`crate::wr`] builds and accounts work requests, [`crate::completion`] maps completions back.
//!
//! # Ownership and teardown
//! Each verbs object is an RAII type that holds an `Arc` of what it depends on (a QP holds its
//! PD, CQ and SRQ; an MR its PD; everything the device context), so destruction happens in
//! dependency order whatever order handles are dropped in: QPs, then SRQs, MRs, the CQ, the PD,
//! and the context last. A [`MemoryRegion`] the caller keeps outlives the domain safely.
//!
//! # Threads
//! A domain is driven by one thread at a time (the worker); it is `Send`. libibverbs objects are
//! thread-safe, which is what makes the `Arc`-shared RAII types sound.
//!
//! Nothing in this module has run on hardware yet (see the README).
//!
//! # Layout
//! * `resources`: the RAII wrappers of verbs objects (context, [`ProtectionDomain`], CQ, SRQs,
//!   [`MemoryRegion`], [`QueuePair`]) and posting to them.
//! * `discovery`: devices, ports and GID tables as plain data ([`list_devices`],
//!   [`choose_port`]), read through libibverbs and sysfs.
//! * `config`: [`DomainConfig`] (with its `STOLON_IB_*` overrides) and [`queue_sizes`].
//! * `event`: [`PeerId`] and the [`DomainEvent`]s a domain reports.
//! * `verbs_domain`: [`VerbsDomain`] itself: opening, memory registration, receive stocking;
//!   `connection` adds peers and their handshakes, `datapath` posting and polling.
//!
//! Each imports only those listed before it (and the crate's pure modules); this file only
//! re-exports.

mod config;
mod connection;
mod datapath;
mod discovery;
mod event;
mod resources;
mod verbs_domain;

pub use config::{queue_sizes, DomainConfig, QueueSizes};
pub use discovery::{
    choose_port, interface_addrs, link_speed_gbps, list_devices, pci_address, DeviceCaps,
    DeviceInfo, PortInfo, PortState,
};
pub use event::{DomainEvent, PeerId};
pub use resources::{MemoryRegion, ProtectionDomain, QueuePair};
pub use verbs_domain::{open_device, VerbsDomain};
