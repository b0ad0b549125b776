//! What every launch shares: the base kernel parameters, grid sizes, the launch itself (with
//! its checks) and the choice between the split and the overlapped forms.

use std::ffi::c_void;

use stolon_cuda::{Function, Stream};

use super::params::KernelParams;
use super::tuning::OVERLAP_MIN_TOKENS;
use super::AllToAll;
use crate::{Error, Result};

/// Threads per block of every kernel (`kThreads` in kernels/common.cuh).
pub(super) const THREADS: u32 = 256;

impl AllToAll {
    pub(super) fn base_params(&self) -> KernelParams {
        let l = &self.layout;
        let c = &self.cfg;
        let local = self.local.ptr();
        KernelParams {
            peers: local + l.peers as u64,
            st: local + l.st as u64,
            err: self.err.device_ptr(),
            tok_mask: local + l.tok_mask as u64,
            host_mask: self
                .remote
                .as_ref()
                .map_or(0, |rm| rm.mailbox.device_ptr() + rm.masks_offset() as u64),
            ecount_local: local + l.ecount_local as u64,
            route_rows: local + l.route_rows as u64,
            timeout_ns: c.timeout.as_nanos().min(u64::MAX as u128) as u64,
            rank: c.rank as i32,
            world: c.world as i32,
            experts_per_rank: l.experts_per_rank as i32,
            topk: c.topk as i32,
            max_tokens: c.max_tokens as i32,
            num_tokens: -1,
            x_bytes: l.x_bytes as i32,
            s_bytes: l.s_bytes as i32,
            slot_bytes: l.slot_bytes as i32,
            meta_bytes: l.meta_bytes as i32,
            capacity: l.capacity as i32,
            hidden: c.hidden as i32,
            chunk_tokens: l.chunk_tokens as i32,
            senders: self.overlap_senders,
            ..KernelParams::default()
        }
    }

    pub(super) fn grid(&self, items: usize) -> u32 {
        (items.max(1) as u32).min(self.max_blocks)
    }

    /// # Safety
    /// Every pointer in `p` must be valid for the kernel until it completes.
    pub(super) unsafe fn launch(
        &self,
        f: &Function,
        stream: &Stream,
        grid: u32,
        smem: u32,
        p: KernelParams,
    ) -> Result<()> {
        // SAFETY: as promised by the caller.
        unsafe { self.launch_with(f, stream, grid, smem, p, false) }
    }

    /// As [`AllToAll::launch`]; with `early`, `f` may start before the kernel ahead of it on
    /// `stream` finishes ([`Function::launch_early`]; a driver without that launches it
    /// plainly).
    ///
    /// # Safety
    /// As [`AllToAll::launch`]; with `early`, `f` must wait for what it needs of the kernel
    /// ahead of it.
    pub(super) unsafe fn launch_with(
        &self,
        f: &Function,
        stream: &Stream,
        grid: u32,
        smem: u32,
        mut p: KernelParams,
        early: bool,
    ) -> Result<()> {
        if !self.connected {
            return Err(Error::InvalidArgument(
                "connect() must be called before the first phase".to_string(),
            ));
        }
        if let Some(e) = self.error().filter(|e| e.code == 1) {
            // A timeout leaves the ranks out of step for good; other errors are per step.
            return Err(Error::Kernel(e));
        }
        let mut params = [(&mut p as *mut KernelParams).cast::<c_void>()];
        let (grid, block) = ((grid, 1, 1), (THREADS, 1, 1));
        if early {
            // SAFETY: as below; the caller promises the kernel's own synchronization.
            match unsafe { f.launch_early(stream, grid, block, smem, &mut params) } {
                Err(stolon_cuda::Error::Unsupported { .. }) => {}
                r => return Ok(r?),
            }
        }
        // SAFETY: the one parameter is a KernelParams, the kernels' `Params` (checked layout);
        // the caller promises the pointers inside.
        unsafe { f.launch(stream, grid, block, smem, &mut params)? };
        Ok(())
    }

    /// Shared memory of the kernels that compute the expert offsets.
    pub(super) fn offsets_smem(&self) -> u32 {
        ((self.cfg.world + 1) * self.layout.experts_per_rank * 4) as u32
    }

    /// Whether [`AllToAll::dispatch`] and [`AllToAll::combine`] overlap by default: every peer
    /// is on this node (the overlapped forms write peer memory directly) and a step may carry
    /// [`OVERLAP_MIN_TOKENS`] tokens or more.
    pub fn overlaps_by_default(&self) -> bool {
        self.remote.is_none() && self.cfg.max_tokens >= OVERLAP_MIN_TOKENS
    }

    /// `overlap` or the default for the overlapped `what` (dispatch, combine); refused with
    /// ranks on other nodes.
    pub(super) fn resolve_overlap(&self, overlap: Option<bool>, what: &str) -> Result<bool> {
        let overlap = overlap.unwrap_or_else(|| self.overlaps_by_default());
        if overlap && self.remote.is_some() {
            return Err(Error::InvalidArgument(format!(
                "the overlapped {what} writes every peer's memory directly; with ranks on other \
                 nodes (ranks_per_node < world) use the split form"
            )));
        }
        Ok(overlap)
    }
}
