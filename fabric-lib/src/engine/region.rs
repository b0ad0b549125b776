//! Registered local memory: [`MemoryRegion`], what it is ([`RegionMem`]) and how its bytes
//! travel ([`Path`]).

use std::any::Any;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::Sender;
use std::sync::Arc;

use crate::desc::MemDesc;
pub use crate::domain_types::{Path, RegionMem};
use crate::vmm_share::FdServer;
use crate::worker::Request;

use super::Shared;

/// A registered local region. Cloning shares it; it is unregistered when the last clone (and
/// every transfer using it) is gone, or explicitly with [`TransferEngine::unregister`].
#[derive(Clone)]
pub struct MemoryRegion {
    pub(crate) inner: Arc<RegionInner>,
}

pub(crate) struct RegionInner {
    pub(super) id: u64,
    pub(super) ptr: usize,
    pub(super) len: u64,
    /// Where the bytes live: host memory, or GPU memory (staged over the fabric).
    pub(super) mem: RegionMem,
    pub(super) engine_id: u64,
    pub(super) desc: MemDesc,
    pub(super) revoked: AtomicBool,
    pub(super) tx: Sender<Request>,
    pub(super) shared: Arc<Shared>,
    /// The engine's VMM socket, when this region is served on it (revoked on drop).
    pub(super) vmm_server: Option<Arc<FdServer>>,
    /// Why peers cannot write this GPU region over NVLink, if they cannot.
    pub(super) nvlink_note: Option<String>,
    /// The memory's owner: handed to the worker on drop, which releases it only once the
    /// registration is closed and no peer or local op can touch the memory.
    pub(super) owner: Option<Box<dyn Any + Send + Sync>>,
}

/// `GpuDesc::device` value that marks a staged host region.
pub(crate) const STAGED_HOST_DEVICE: u32 = u32::MAX;

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(s) = &self.vmm_server {
            s.revoke(self.id);
        }
        // If the worker is gone (engine stopped), everything is closed: the owner drops here.
        let _ = self.tx.send(Request::Unregister {
            id: self.id,
            owner: self.owner.take(),
            reply: None,
        });
        self.shared.waker.ring();
    }
}

impl MemoryRegion {
    /// What a transfer holds to keep this region (and its memory) alive until its ops finish.
    pub(crate) fn keep_alive(&self) -> crate::worker::KeepAlive {
        self.inner.clone()
    }

    /// What a peer needs to write here.
    pub fn descriptor(&self) -> &MemDesc {
        &self.inner.desc
    }
    /// Address of the first byte.
    pub fn ptr(&self) -> usize {
        self.inner.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// Whether [`TransferEngine::unregister`] was called.
    pub fn memory(&self) -> RegionMem {
        self.inner.mem
    }
    /// For GPU memory that peers cannot write over NVLink: why (e.g. VMM memory whose
    /// allocation was not created exportable as a file descriptor). None otherwise.
    pub fn nvlink_note(&self) -> Option<&str> {
        self.inner.nvlink_note.as_deref()
    }
    /// Whether [`TransferEngine::unregister`] was called.
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::Acquire)
    }
}
