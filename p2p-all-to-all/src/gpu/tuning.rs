//! How the phases launch: blocks per SM, the senders of the overlapped forms, and the early
//! launch of the fused dispatch, each from its environment variable or a measured default.

use stolon_cuda::Device;

use crate::Result;

#[cfg(doc)]
use super::AllToAll;

/// Blocks per SM the phases launch (`STOLON_MOE_BLOCKS_PER_SM`, 1..=8; default
/// [`DEFAULT_BLOCKS_PER_SM`], which the kernels' launch bounds keep resident). More blocks keep
/// more loads and NVLink stores in flight: at prefill sizes the phases are bandwidth-bound
/// (on 2 H200s, 1 -> 4 blocks per SM took prefill dispatch from 234 to 201 us and combine from
/// 380 to 308 us); decode sizes launch one block per token or fewer either way.
pub(super) fn blocks_per_sm() -> u32 {
    std::env::var("STOLON_MOE_BLOCKS_PER_SM")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|b| (1..=8).contains(b))
        .unwrap_or(DEFAULT_BLOCKS_PER_SM)
}

/// See [`blocks_per_sm`].
pub const DEFAULT_BLOCKS_PER_SM: u32 = 4;

/// Smallest `max_tokens` for which [`AllToAll::dispatch`] overlaps by default.
pub const OVERLAP_MIN_TOKENS: usize = 512;

/// Blocks of the overlapped dispatch that send this rank's tokens to the peers
/// (`STOLON_MOE_SENDERS`, at least 1; default [`DEFAULT_SENDERS`]); the other blocks expand
/// what has landed and this rank's own tokens. A bounded set of senders working in token order
/// makes the peers' chunks land one after another from the start, so their expansion overlaps
/// the transfer; with every block sending, every chunk would land at the end. One sender block
/// moves only 4-5 GB/s over NVLink (2 H100s), hence the default: the best of 128, 192 and 256
/// measured there.
pub(super) fn overlap_senders() -> i32 {
    senders_from_env("STOLON_MOE_SENDERS", DEFAULT_SENDERS)
}

/// See [`overlap_senders`].
pub const DEFAULT_SENDERS: i32 = 192;

/// Blocks of the overlapped combine that sum the tokens the peers sent here and write the sums
/// back (`STOLON_MOE_COMBINE_SENDERS`, at least 1; default [`DEFAULT_COMBINE_SENDERS`]); the
/// other blocks sum this rank's own tokens as the peers' sums of them land.
pub(super) fn combine_senders() -> i32 {
    senders_from_env("STOLON_MOE_COMBINE_SENDERS", DEFAULT_COMBINE_SENDERS)
}

/// See [`combine_senders`].
pub const DEFAULT_COMBINE_SENDERS: i32 = 264;

/// Whether the overlapped dispatch launches its second kernel early (programmatic dependent
/// launch, so that its senders start while the counts kernel runs): on GPUs of compute
/// capability 9.0 and newer, unless `STOLON_MOE_EARLY_LAUNCH=0`.
pub(super) fn early_launch(dev: &Device) -> Result<bool> {
    if std::env::var("STOLON_MOE_EARLY_LAUNCH").is_ok_and(|v| v.trim() == "0") {
        return Ok(false);
    }
    Ok(dev.compute_capability()?.0 >= 9)
}

fn senders_from_env(var: &str, default: i32) -> i32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(default)
}
