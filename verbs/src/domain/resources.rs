//! The verbs objects a domain is built from, as RAII handles: the device context, the protection
//! domain, the completion queue, shared receive queues, memory regions and queue pairs, and
//! posting work requests to them.
//!
//! Each holds an `Arc` of what it depends on, so destruction happens in dependency order
//! whatever order handles are dropped in.

use std::sync::Arc;

use crate::error::{Errno, Error, Result};
use crate::qp::{self, Modify, QpDriver};
use crate::sys::{self, LibIbverbs};
use crate::wr::{RecvChain, SendChain};

/// An open device context; closed when the last holder drops it.
pub(super) struct Context {
    pub(super) lib: &'static LibIbverbs,
    pub(super) raw: *mut sys::ibv_context,
}

// SAFETY: libibverbs contexts may be used from any thread (the library is thread-safe); the
// pointer is only dereferenced through libibverbs calls.
unsafe impl Send for Context {}
// SAFETY: as above; shared references only make thread-safe libibverbs calls.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_open_device and is closed once; every object created from it
        // holds an Arc of this context, so none is left.
        unsafe { (self.lib.close_device)(self.raw) };
    }
}

/// A protection domain.
pub struct ProtectionDomain {
    pub(super) ctx: Arc<Context>,
    pub(super) raw: *mut sys::ibv_pd,
}

// SAFETY: see Context; a PD is a handle usable from any thread.
unsafe impl Send for ProtectionDomain {}
// SAFETY: see Context.
unsafe impl Sync for ProtectionDomain {}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_alloc_pd; every MR and QP on it holds an Arc of this PD, so
        // none is left and dealloc succeeds.
        unsafe { (self.ctx.lib.dealloc_pd)(self.raw) };
    }
}

/// A completion queue.
pub(super) struct CompletionQueue {
    pub(super) ctx: Arc<Context>,
    pub(super) raw: *mut sys::ibv_cq,
}

// SAFETY: see Context.
unsafe impl Send for CompletionQueue {}
// SAFETY: see Context; polling goes through `&mut VerbsDomain`, one thread at a time.
unsafe impl Sync for CompletionQueue {}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_cq; every QP using it holds an Arc of this CQ.
        unsafe { (self.ctx.lib.destroy_cq)(self.raw) };
    }
}

/// A shared receive queue.
pub(super) struct SharedReceiveQueue {
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) raw: *mut sys::ibv_srq,
}

// SAFETY: see Context.
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: see Context; posting goes through `&mut VerbsDomain`.
unsafe impl Sync for SharedReceiveQueue {}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_srq; every QP attached holds an Arc of this SRQ.
        unsafe { (self.pd.ctx.lib.destroy_srq)(self.raw) };
    }
}

/// A registered memory region (host memory, or GPU memory through a dma-buf).
pub struct MemoryRegion {
    pub(super) pd: Arc<ProtectionDomain>,
    pub(super) raw: *mut sys::ibv_mr,
}

// SAFETY: an MR is a handle; libibverbs allows deregistration from any thread.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared references only read the keys.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// The key local work requests name this memory with.
    pub fn lkey(&self) -> u32 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).lkey }
    }

    /// The key a peer writes into this memory with.
    pub fn rkey(&self) -> u32 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).rkey }
    }

    /// Start address (the IOVA peers use as remote address).
    pub fn addr(&self) -> u64 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).addr as u64 }
    }

    pub fn len(&self) -> usize {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).length }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_reg_mr* and is deregistered once.
        unsafe { (self.pd.ctx.lib.dereg_mr)(self.raw) };
    }
}

/// An RC queue pair; its verbs state is tracked by the [`Qp`](crate::qp::Qp) typestate that
/// wraps it.
pub struct QueuePair {
    pub(super) _pd: Arc<ProtectionDomain>,
    pub(super) _cq: Arc<CompletionQueue>,
    pub(super) _srq: Arc<SharedReceiveQueue>,
    pub(super) lib: &'static LibIbverbs,
    pub(super) raw: *mut sys::ibv_qp,
    /// Capabilities granted by `ibv_create_qp`.
    pub(super) cap: sys::ibv_qp_cap,
}

// SAFETY: see Context; a QP is used by one thread at a time through `&mut`.
unsafe impl Send for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num())
            .field("cap", &self.cap)
            .finish()
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_qp and is destroyed once; outstanding WRs are
        // discarded, and their buffers are owned by transfers that were failed before this.
        unsafe { (self.lib.destroy_qp)(self.raw) };
    }
}

impl QpDriver for QueuePair {
    fn qp_num(&self) -> u32 {
        // SAFETY: raw is a live QP until drop.
        unsafe { (*self.raw).qp_num }
    }

    fn modify(&mut self, m: &Modify) -> Result<()> {
        let mut attr = m.attr;
        // SAFETY: raw is a live QP; attr is a fully initialised ibv_qp_attr that lives across
        // the call; the mask names only members that attr sets.
        let rc = unsafe { (self.lib.modify_qp)(self.raw, &mut attr, m.mask) };
        if rc != 0 {
            return Err(Error::Verbs {
                call: modify_call(m.to),
                source: Errno(rc),
            });
        }
        Ok(())
    }
}

fn modify_call(to: qp::QpState) -> &'static str {
    match to {
        qp::QpState::Reset => "ibv_modify_qp(RESET)",
        qp::QpState::Init => "ibv_modify_qp(INIT)",
        qp::QpState::Rtr => "ibv_modify_qp(RTR)",
        qp::QpState::Rts => "ibv_modify_qp(RTS)",
        qp::QpState::Error => "ibv_modify_qp(ERR)",
    }
}

impl QueuePair {
    /// Posts a linked chain. Returns how many WRs were posted: all, or those before the one the
    /// provider refused, with its error.
    ///
    /// # Safety
    /// Every SGE of the chain must name memory registered on this QP's PD that stays valid (and,
    /// for receives, unread) until the WR's completion is polled or the QP is reset or
    /// destroyed; remote addresses and keys must be ones the peer handed out.
    ///
    /// # Errors
    /// The provider's errno (as [`Error::Verbs`]) beside the count of WRs it accepted.
    pub(super) unsafe fn post(&mut self, chain: &mut SendChain) -> (usize, Option<Error>) {
        let head = chain.link();
        if head.is_null() {
            return (0, None);
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: raw is a live QP; head is a valid NULL-terminated chain owned by `chain`, which
        // outlives the call; the caller upholds the buffer contract.
        let rc = unsafe { sys::post_send(self.raw, head, &mut bad) };
        if rc == 0 {
            return (chain.len(), None);
        }
        let posted = chain.index_of(bad).unwrap_or(0);
        (posted, Some(Error::verbs("ibv_post_send", rc)))
    }
}

/// Posts a receive chain on an SRQ; returns how many were posted.
///
/// # Safety
/// As for [`sys::post_srq_recv`]: every SGE names registered memory that stays valid and unread
/// until its completion.
///
/// # Errors
/// [`Error::Verbs`] when the provider refuses a WR (those before it are posted).
pub(super) unsafe fn post_srq(srq: &SharedReceiveQueue, chain: &mut RecvChain) -> Result<u32> {
    let head = chain.link();
    if head.is_null() {
        return Ok(0);
    }
    let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
    // SAFETY: srq is live; head is a valid chain owned by `chain`, alive across the call.
    let rc = unsafe { sys::post_srq_recv(srq.raw, head, &mut bad) };
    if rc == 0 {
        return Ok(chain.len() as u32);
    }
    let posted = chain.index_of(bad).unwrap_or(0) as u32;
    if posted > 0 {
        // Partial success is still progress; report the error on the next refill.
        return Ok(posted);
    }
    Err(Error::verbs("ibv_post_srq_recv", rc))
}
