//! # stolon-verbs: the ConnectX backend
//!
//! One-sided RDMA writes with 32-bit immediates over libibverbs reliable-connected (RC) queue
//! pairs, for ConnectX NICs on InfiniBand and RoCE. It is the verbs backend of stolon's domain
//! layer: one [`domain::VerbsDomain`] is one NIC port.
//!
//! ## Quick start
//! ```no_run
//! use std::time::Instant;
//! use stolon_verbs::domain::{open_device, DomainConfig, DomainEvent};
//! # fn main() -> stolon_verbs::Result<()> {
//! let mut dom = open_device(DomainConfig::default())?; // first active port
//! // Connecting is a handshake carried out of band: send what the domain asks to send,
//! // feed back what the peer answers.
//! for ev in dom.connect(1, Instant::now())? {
//!     if let DomainEvent::SendHandshake { peer, bytes } = ev {
//!         let _ = (peer, bytes); // deliver over any channel; hand replies to on_handshake
//!     }
//! }
//! let mut events = Vec::new();
//! dom.poll(Instant::now(), &mut events)?; // completions, immediates, messages
//! # Ok(()) }
//! ```
//!
//! ## Layers
//! * [`sys`]: libibverbs loaded at run time (`$STOLON_LIBIBVERBS`, then `libibverbs.so.1`),
//!   `#[repr(C)]` mirrors checked against the C headers by `tests/abi_layout.rs`, and the data
//!   path called through the provider's `ibv_context_ops` as the header's inline functions do.
//! * Pure logic, tested without hardware: [`qp`] (attributes of every QP transition, typestate
//!   RESET → INIT → RTR → RTS), [`gid`] (GID and GRH choice for InfiniBand and RoCE),
//!   [`handshake`] (connection exchange that survives loss, repeats, reordering and restarts),
//!   [`wr`] (work-request planning, selective signalling, send-queue accounting, receive
//!   stocking), [`completion`] (`wr_id` encoding, transfer table, typed completion errors).
//! * [`domain`]: the device-facing part built on all of the above.
//!
//! ## Required libraries
//! rdma-core's `libibverbs.so.1` (1.1 ABI; `ibv_reg_dmabuf_mr` needs rdma-core 34) and its
//! provider plugins. Without them the crate builds, and opening fails with
//! [`Error::LibraryNotFound`] naming every path tried; without a device, with
//! [`Error::NoDevices`] or [`Error::NoActivePort`] saying what was found.
//!
//! ## Threads and cleanup
//! A domain is driven by one thread at a time and may move between threads. Verbs objects are
//! RAII handles that keep what they depend on alive, so they are destroyed in dependency order
//! (QPs, SRQs, MRs, CQ, PD, context) whichever is dropped first.
//!
//! ## Not yet run on hardware
//! Nothing in [`domain`] has run against a real device yet; see the README for what is verified
//! and how.

mod addr;
pub mod completion;
pub mod domain;
pub mod error;
pub mod gid;
pub mod handshake;
pub mod qp;
pub mod sys;
mod wc_status;
pub mod wr;

pub use error::{Error, Result};
