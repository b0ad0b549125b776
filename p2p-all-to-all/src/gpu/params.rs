//! What a launch hands the kernels: the public argument structs of the phases, their checks,
//! and the mirrors of the kernels' `Params` and `Peer` (kernels/common.cuh).

use stolon_cuda::CUdeviceptr;

use crate::{Error, Result, PEER_BYTES};

/// Rows the kernels read or write with 16-byte accesses: aligned start, stride a multiple of 16
/// and at least one row long.
pub(super) fn check_rows(
    what: &str,
    ptr: CUdeviceptr,
    stride: i64,
    row_bytes: usize,
) -> Result<()> {
    if ptr % 16 != 0 || stride % 16 != 0 || stride < row_bytes as i64 {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 16-byte aligned with a stride of at least {row_bytes} bytes (a \
             multiple of 16); got address {ptr:#x}, stride {stride}"
        )));
    }
    Ok(())
}

/// Mirror of `Peer` in kernels/common.cuh.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct PeerEntry {
    pub(super) data: u64,
    pub(super) meta: u64,
    pub(super) ecount: u64,
    pub(super) dflag: u64,
    pub(super) cflag: u64,
    pub(super) rel: u64,
    pub(super) rx_data: u64,
    pub(super) rx_meta: u64,
    pub(super) rx_ecount: u64,
    pub(super) rx_dflag: u64,
    pub(super) rx_cflag: u64,
    pub(super) rel_in: u64,
    pub(super) cntflag: u64,
    pub(super) chunk: u64,
    pub(super) rx_cntflag: u64,
    pub(super) rx_chunk: u64,
}
const _: () = assert!(std::mem::size_of::<PeerEntry>() == PEER_BYTES);

/// Mirror of `Params` in kernels/common.cuh: same fields, same order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
pub(super) struct KernelParams {
    pub(super) peers: u64,
    pub(super) st: u64,
    pub(super) err: u64,
    pub(super) tok_mask: u64,
    pub(super) host_mask: u64,
    pub(super) ecount_local: u64,
    pub(super) route_rows: u64,
    pub(super) num_tokens_ptr: u64,
    pub(super) x: u64,
    pub(super) scales: u64,
    pub(super) idx: u64,
    pub(super) weights: u64,
    pub(super) out_x: u64,
    pub(super) out_s: u64,
    pub(super) expert_counts: u64,
    pub(super) expert_offsets: u64,
    pub(super) y: u64,
    pub(super) out: u64,
    pub(super) x_stride: i64,
    pub(super) s_stride: i64,
    pub(super) idx_stride: i64,
    pub(super) w_stride: i64,
    pub(super) y_stride: i64,
    pub(super) out_stride: i64,
    pub(super) timeout_ns: u64,
    pub(super) rank: i32,
    pub(super) world: i32,
    pub(super) experts_per_rank: i32,
    pub(super) topk: i32,
    pub(super) max_tokens: i32,
    pub(super) num_tokens: i32,
    pub(super) x_bytes: i32,
    pub(super) s_bytes: i32,
    pub(super) slot_bytes: i32,
    pub(super) meta_bytes: i32,
    pub(super) capacity: i32,
    pub(super) hidden: i32,
    pub(super) idx64: i32,
    pub(super) accumulate: i32,
    pub(super) chunk_tokens: i32,
    pub(super) senders: i32,
}
const _: () = assert!(std::mem::size_of::<KernelParams>() == 18 * 8 + 7 * 8 + 16 * 4);

/// Inputs of `dispatch_send`. Pointers are device addresses on this rank's GPU; strides are in
/// bytes for rows of data and in elements for the routing.
#[derive(Debug, Clone, Copy)]
pub struct DispatchArgs {
    /// Token rows (`x_bytes` each, 16-byte aligned).
    pub x: CUdeviceptr,
    /// Bytes between token rows (a multiple of 16).
    pub x_stride: i64,
    /// float32 scales per token (0 when the config has none).
    pub scales: CUdeviceptr,
    /// Bytes between scale rows (a multiple of 4).
    pub s_stride: i64,
    /// Expert ids, `[tokens][topk]`, int32 or int64.
    pub idx: CUdeviceptr,
    /// True for int64 ids.
    pub idx64: bool,
    /// Elements between rows of `idx`.
    pub idx_stride: i64,
    /// float32 routing weights `[tokens][topk]`.
    pub weights: CUdeviceptr,
    /// Elements between rows of `weights`.
    pub w_stride: i64,
    /// Token count this step; `None` reads an int32 at `num_tokens_ptr` (for CUDA graphs).
    pub num_tokens: Option<usize>,
    /// Device int32 holding the token count, used when `num_tokens` is `None`.
    pub num_tokens_ptr: CUdeviceptr,
}

/// Outputs of `dispatch_recv`: rows of local expert `e` are `offsets[e]..offsets[e] + counts[e]`.
#[derive(Debug, Clone, Copy)]
pub struct DispatchOutputs {
    /// `[capacity][x_bytes]` token rows.
    pub out_x: CUdeviceptr,
    /// `[capacity][s_bytes]` scales (0 when none).
    pub out_s: CUdeviceptr,
    /// int32 `[experts_per_rank]`.
    pub counts: CUdeviceptr,
    /// int32 `[experts_per_rank + 1]`.
    pub offsets: CUdeviceptr,
}

/// Inputs and outputs of the combine.
#[derive(Debug, Clone, Copy)]
pub struct CombineArgs {
    /// Expert outputs, rows as the dispatch output (`hidden` elements of the combine dtype).
    pub y: CUdeviceptr,
    /// Bytes between rows of `y`.
    pub y_stride: i64,
    /// Result rows `[tokens][hidden]`.
    pub out: CUdeviceptr,
    /// Bytes between result rows.
    pub out_stride: i64,
    /// Add to what `out` holds instead of overwriting it.
    pub accumulate: bool,
}
