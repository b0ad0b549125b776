//! The dispatch: `dispatch_send` and `dispatch_recv`, or the overlapped form.

use stolon_cuda::Stream;

use super::launch::THREADS;
use super::params::{check_rows, DispatchArgs, DispatchOutputs, KernelParams};
use super::AllToAll;
use crate::{Error, Result};

impl AllToAll {
    /// Queues `dispatch_send` on `stream`.
    ///
    /// # Safety
    /// The pointers in `a` must address device memory of this GPU as described, valid (and not
    /// written by others) until the launch completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (too many tokens, misaligned rows), a recorded kernel error.
    pub unsafe fn dispatch_send(&self, stream: &Stream, a: &DispatchArgs) -> Result<()> {
        let p = self.send_params(a)?;
        // SAFETY: the caller promises the inputs; our own buffers live as long as self.
        unsafe { self.launch_send(stream, p) }
    }

    /// # Safety
    /// As [`AllToAll::launch`]; `p` from [`AllToAll::send_params`].
    unsafe fn launch_send(&self, stream: &Stream, p: KernelParams) -> Result<()> {
        let grid = self.grid(self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.dispatch_send, stream, grid, 0, p) }
    }

    /// The kernel parameters of a dispatch's inputs, checked.
    fn send_params(&self, a: &DispatchArgs) -> Result<KernelParams> {
        let l = &self.layout;
        let num_tokens = match a.num_tokens {
            Some(n) if n > self.cfg.max_tokens => {
                return Err(Error::InvalidArgument(format!(
                    "{n} tokens is more than max_tokens ({})",
                    self.cfg.max_tokens
                )))
            }
            Some(n) => n as i32,
            None if a.num_tokens_ptr == 0 => {
                return Err(Error::InvalidArgument(
                    "neither num_tokens nor a num_tokens pointer given".to_string(),
                ))
            }
            None => -1,
        };
        check_rows("token rows", a.x, a.x_stride, l.x_bytes)?;
        let empty = a.num_tokens == Some(0);
        if (l.s_bytes > 0 && a.scales == 0 && !empty) || (l.s_bytes == 0 && a.scales != 0) {
            return Err(Error::InvalidArgument(if l.s_bytes > 0 {
                "this all-to-all sends scales with every token, but none were given".to_string()
            } else {
                "scales given, but this all-to-all was built without scales".to_string()
            }));
        }
        if a.scales != 0 && (a.scales % 4 != 0 || a.s_stride % 4 != 0) {
            return Err(Error::InvalidArgument(
                "scales must be 4-byte aligned".to_string(),
            ));
        }
        let p = KernelParams {
            x: a.x,
            x_stride: a.x_stride,
            scales: a.scales,
            s_stride: a.s_stride,
            idx: a.idx,
            idx64: i32::from(a.idx64),
            idx_stride: a.idx_stride,
            weights: a.weights,
            w_stride: a.w_stride,
            num_tokens,
            num_tokens_ptr: a.num_tokens_ptr,
            ..self.base_params()
        };
        Ok(p)
    }

    /// Queues `dispatch_recv` on `stream`.
    ///
    /// # Safety
    /// `o`'s pointers must address device memory of this GPU of at least the sizes described
    /// in [`DispatchOutputs`] (with `capacity` rows), valid until the launch completes.
    ///
    /// # Errors
    /// A recorded kernel error.
    pub unsafe fn dispatch_recv(&self, stream: &Stream, o: &DispatchOutputs) -> Result<()> {
        let p = self.recv_params(o, self.base_params())?;
        // SAFETY: as promised by the caller.
        unsafe { self.launch_recv(stream, p) }
    }

    /// # Safety
    /// As [`AllToAll::launch`]; `p` from [`AllToAll::recv_params`].
    unsafe fn launch_recv(&self, stream: &Stream, p: KernelParams) -> Result<()> {
        let grid = self.grid(self.cfg.world * self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe {
            self.launch(
                &self.kernels.dispatch_recv,
                stream,
                grid,
                self.offsets_smem(),
                p,
            )
        }
    }

    /// `p` with a dispatch's outputs, checked.
    fn recv_params(&self, o: &DispatchOutputs, p: KernelParams) -> Result<KernelParams> {
        if o.out_x % 16 != 0 {
            return Err(Error::InvalidArgument(
                "the dispatch output must be 16-byte aligned".to_string(),
            ));
        }
        Ok(KernelParams {
            out_x: o.out_x,
            out_s: o.out_s,
            expert_counts: o.counts,
            expert_offsets: o.offsets,
            ..p
        })
    }

    /// Queues a whole dispatch on `stream`: `dispatch_send` then `dispatch_recv`, or, with
    /// `overlap` (default: [`AllToAll::overlaps_by_default`]), the overlapped form, which
    /// expands this rank's own tokens and each peer's chunks of tokens while the sends are
    /// still draining (two launches, see kernels/dispatch.cuh). Either way the outputs, the
    /// state the combine reads and what peers see are the same, so ranks may choose
    /// differently in one step. Returns whether it overlapped.
    ///
    /// # Safety
    /// As [`AllToAll::dispatch_send`] for `a` and [`AllToAll::dispatch_recv`] for `o`.
    ///
    /// # Errors
    /// As the two halves; [`Error::InvalidArgument`] for `overlap = Some(true)` with ranks on
    /// other nodes.
    pub unsafe fn dispatch(
        &self,
        stream: &Stream,
        a: &DispatchArgs,
        o: &DispatchOutputs,
        overlap: Option<bool>,
    ) -> Result<bool> {
        let overlap = self.resolve_overlap(overlap, "dispatch")?;
        let p = self.recv_params(o, self.send_params(a)?)?;
        if !overlap {
            // SAFETY: as promised by the caller.
            unsafe {
                self.launch_send(stream, p)?;
                self.launch_recv(stream, p)?;
            }
            return Ok(false);
        }
        let count_grid = self.grid(self.cfg.max_tokens * self.cfg.topk / THREADS as usize);
        // SAFETY: as promised by the caller; both kernels read only the inputs and write only
        // the outputs, this rank's own buffers and the peers' receive areas.
        unsafe {
            self.launch(&self.kernels.dispatch_count, stream, count_grid, 0, p)?;
            let (grid, smem, early) = (self.max_blocks, self.offsets_smem(), self.early_launch);
            self.launch_with(&self.kernels.dispatch_fused, stream, grid, smem, p, early)?;
        }
        Ok(true)
    }
}
