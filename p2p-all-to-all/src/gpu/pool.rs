//! The process-wide pool of receive areas: allocated once, reused, never freed.

use std::sync::{Arc, Mutex};

use stolon_cuda::{Context, DeviceBuffer};

use crate::Result;

/// Receive areas of closed all-to-alls, kept for reuse instead of freed.
///
/// CUDA IPC mappings are cached by the importing driver: a peer that once mapped an area can
/// later be handed a stale mapping when the exporter frees it and allocates again (we saw
/// peers write into freed memory that way). An area that is never freed can only ever be
/// mapped to itself, so closed areas wait here for the next all-to-all of this process.
static RX_POOL: Mutex<Vec<(usize, DeviceBuffer)>> = Mutex::new(Vec::new());

/// A zeroed receive area of at least `len` bytes on `device`: the smallest pooled one that fits
/// (and is not more than 4x too large), else a new allocation.
pub(super) fn take_rx(ctx: &Arc<Context>, device: usize, len: usize) -> Result<DeviceBuffer> {
    let reused = {
        let mut pool = RX_POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, (d, b))| *d == device && b.len() >= len && b.len() <= len.max(1 << 20) * 4)
            .min_by_key(|(_, (_, b))| b.len())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i).1)
    };
    let mut rx = match reused {
        Some(b) => b,
        None => DeviceBuffer::alloc(ctx, len)?,
    };
    rx.fill(0)?;
    Ok(rx)
}

/// Puts the receive area of a closed all-to-all on `device` back into the pool.
pub(super) fn put_rx(device: usize, rx: DeviceBuffer) {
    RX_POOL
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .push((device, rx));
}
