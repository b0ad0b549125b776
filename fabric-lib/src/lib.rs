//! # fabric-lib: stolon's transfer engine
//!
//! One engine moves bytes from registered memory on one machine into registered memory on
//! another with one-sided RMA writes that carry a 32-bit immediate, over any NIC that libfabric
//! drives (EFA, `verbs;ofi_rxm`) and over libfabric's software providers (`tcp;ofi_rxm`, `net`,
//! `shm`, `udp;ofi_rxd`), which is how it is tested on machines without RDMA hardware.
//!
//! ## Quick start
//! ```no_run
//! use fabric_lib::{EngineConfig, TransferEngine};
//! use std::time::Duration;
//! # fn main() -> fabric_lib::Result<()> {
//! let a = TransferEngine::new(EngineConfig::loopback("tcp", 2))?; // 2 domains on 127.0.0.1
//! let b = TransferEngine::new(EngineConfig::loopback("tcp", 2))?;
//! let src = a.register_buffer(vec![7u8; 1 << 20].into_boxed_slice())?;
//! let dst = b.register_buffer(vec![0u8; 1 << 20].into_boxed_slice())?;
//! // The descriptor travels to the writer as bytes (dst.descriptor().to_bytes()).
//! let t = a.write(&src, 0, dst.descriptor(), 0, 1 << 20, Some(42), None, None)?;
//! t.wait(Duration::from_secs(5))?;                              // sender: bytes delivered
//! let n = a.imm_count_write(1 << 20, None, false) as u64;
//! b.imm_counter().wait(42, n, Duration::from_secs(5))?;        // receiver: all shards landed
//! # Ok(()) }
//! ```
//!
//! ## The one assumption
//! Delivery is reliable; order is not. A transfer may be split into several operations over
//! several domains; each carries the immediate, and the receiver counts arrivals
//! ([`ImmCounter`]). [`TransferEngine::imm_count_write`] and friends say how many to expect.
//!
//! ## Required libraries
//! `libfabric.so.1` (1.17 or newer), loaded at run time from `$STOLON_LIBFABRIC`, the EFA
//! install path, then the system path. Without it the crate builds and opening an engine fails
//! with [`Error::LibraryNotFound`] naming every path tried.
//!
//! ## Threads and cleanup
//! Each engine owns one worker thread (all libfabric calls happen there) and one callback
//! thread (user callbacks run there, never on the worker). [`TransferEngine::stop`], or dropping
//! the engine, fails transfers in flight with [`Error::Stopped`] and closes everything.

pub mod callbacks;
pub mod desc;
mod domain;
pub mod domain_types;
pub mod engine;
pub mod error;
pub mod imm;
mod lease;
pub mod libfabric;
pub mod nvlink;
/// The RC queue-pair backend over libibverbs (provider `verbs-rc`). Naming: "verbs" is the
/// libibverbs binding crate (`stolon_verbs`); "rc" is this backend; `verbs;ofi_rxm` is
/// libfabric's own provider, driven by [`libfabric`] like any other.
pub mod rc;
/// The in-process reordering test double: only with the `test-doubles` feature (tests).
#[cfg(feature = "test-doubles")]
pub mod reorder;
pub mod shard;
mod shared;
mod staging;
pub mod sys;
pub mod transfer;
pub mod vmm_share;
mod worker;

pub use desc::{DomainAddr, GpuDesc, MemDesc, NvlinkAddr, PeerAddr};
pub use engine::{
    is_socket_provider, EngineConfig, MemoryRegion, Prepared, StatsSnapshot, TransferEngine,
    WatchCallback,
};
pub use error::{Error, Result};
pub use imm::ImmCounter;
pub use libfabric::{list_providers, DomainAttrs, DomainSpec};
pub use shard::{PagedSpec, ScatterItem, ShardParams, Sharding};
pub use transfer::{Completion, Transfer};
