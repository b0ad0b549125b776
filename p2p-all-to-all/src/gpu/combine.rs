//! The combine: `combine_send` and `combine_recv`, or the overlapped form.

use stolon_cuda::Stream;

use super::params::{check_rows, CombineArgs, KernelParams};
use super::AllToAll;
use crate::Result;

#[cfg(doc)]
use crate::Error;

impl AllToAll {
    /// Queues `combine_send` on `stream`.
    ///
    /// # Safety
    /// `a.y` must hold `capacity` rows of `y_stride` bytes on this GPU until the launch
    /// completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for misaligned rows, a recorded kernel error.
    pub unsafe fn combine_send(&self, stream: &Stream, a: &CombineArgs) -> Result<()> {
        let p = self.send_combine_params(a)?;
        let grid = self.grid(self.cfg.world * self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.combine_send, stream, grid, 0, p) }
    }

    /// Queues `combine_recv` on `stream`.
    ///
    /// # Safety
    /// `a.out` must hold as many rows of `out_stride` bytes as tokens were dispatched, on this
    /// GPU, until the launch completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for misaligned rows, a recorded kernel error.
    pub unsafe fn combine_recv(&self, stream: &Stream, a: &CombineArgs) -> Result<()> {
        let p = self.recv_combine_params(a, self.base_params())?;
        let grid = self.grid(self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.combine_recv, stream, grid, 0, p) }
    }

    fn send_combine_params(&self, a: &CombineArgs) -> Result<KernelParams> {
        check_rows("expert output rows", a.y, a.y_stride, self.layout.c_bytes)?;
        Ok(KernelParams {
            y: a.y,
            y_stride: a.y_stride,
            ..self.base_params()
        })
    }

    fn recv_combine_params(&self, a: &CombineArgs, p: KernelParams) -> Result<KernelParams> {
        check_rows("result rows", a.out, a.out_stride, self.layout.c_bytes)?;
        Ok(KernelParams {
            out: a.out,
            out_stride: a.out_stride,
            accumulate: i32::from(a.accumulate),
            ..p
        })
    }

    /// Queues a whole combine on `stream`: `combine_send` then `combine_recv`, or, with
    /// `overlap` (default: [`AllToAll::overlaps_by_default`]), the overlapped form (one
    /// launch), which sums this rank's own tokens while the peers' partial sums are still
    /// landing, and never writes its own partial sums to memory. The result and what peers see
    /// are the same either way, so ranks may choose differently in one step. Returns whether
    /// it overlapped.
    ///
    /// # Safety
    /// As [`AllToAll::combine_send`] and [`AllToAll::combine_recv`] for `a`.
    ///
    /// # Errors
    /// As the two halves; [`Error::InvalidArgument`] for `overlap = Some(true)` with ranks on
    /// other nodes.
    pub unsafe fn combine(
        &self,
        stream: &Stream,
        a: &CombineArgs,
        overlap: Option<bool>,
    ) -> Result<bool> {
        let overlap = self.resolve_overlap(overlap, "combine")?;
        // Both halves' arguments are checked before anything is queued.
        let p = self.recv_combine_params(a, self.send_combine_params(a)?)?;
        if !overlap {
            // SAFETY: as promised by the caller.
            unsafe {
                self.combine_send(stream, a)?;
                self.combine_recv(stream, a)?;
            }
            return Ok(false);
        }
        let p = KernelParams {
            senders: self.combine_senders,
            ..p
        };
        // SAFETY: as promised by the caller; the kernel reads the expert outputs and writes
        // the result, this rank's own buffers and the peers' receive areas.
        unsafe {
            self.launch(&self.kernels.combine_fused, stream, self.max_blocks, 0, p)?;
        }
        Ok(true)
    }
}
