//! dma-buf export of device memory (`cuMemGetHandleForAddressRange`), for registering GPU memory
//! with an RDMA NIC (`ibv_reg_dmabuf_mr`, libfabric's `FI_MR_DMABUF`) without the
//! nvidia-peermem kernel module.
//!
//! # Alignment
//! The driver requires the exported range to start and end on host-page boundaries
//! (`sysconf(_SC_PAGESIZE)`, 4 KiB on x86-64, 4 or 64 KiB on ARM). [`export_dmabuf`] therefore
//! exports the smallest page-aligned range enclosing the bytes asked for ([`dmabuf_range`]) and
//! says where they sit in it ([`DmaBuf::offset`]); a NIC registration then names `offset` and the
//! original length inside the dma-buf, with the original address as its I/O virtual address.
//! Rounding outward may reach past the allocation when it does not itself start or end on a
//! page boundary (the caching allocator's sub-allocations of its 2 MiB segments do, `cuMemAlloc`
//! blocks do); the driver then refuses (`CUDA_ERROR_INVALID_VALUE`) and callers fall back to
//! registration by address.
//!
//! # Support
//! Three things must hold: the driver exports the entry point (CUDA 11.7+, else the field of
//! [`crate::sys::Driver`] is `None`), the device reports `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`
//! (needs the open kernel modules and a 5.12+ kernel), and the call succeeds.
//! [`Device::dma_buf_supported`] checks the first two without exporting anything.

use std::os::fd::OwnedFd;

use crate::device::{Context, Device};
use crate::error::{Error, Result};
use crate::result;
use crate::sys::{self, CUdeviceptr};

/// The host page size the driver aligns dma-buf ranges to.
pub fn host_page_size() -> usize {
    // SAFETY: sysconf has no preconditions.
    let p = unsafe { libc::sysconf(libc::_SC_PAGESIZE) };
    if p > 0 {
        p as usize
    } else {
        4096
    }
}

/// The page-aligned range to export for `len` bytes at `ptr`: `(base, aligned_len, offset)` with
/// `base <= ptr`, `offset = ptr - base`, and `base`, `aligned_len` multiples of `page`.
///
/// # Errors
/// [`Error::InvalidArgument`] for zero bytes, a page size that is not a power of two, or a
/// range that overflows.
pub fn dmabuf_range(
    ptr: CUdeviceptr,
    len: usize,
    page: usize,
) -> Result<(CUdeviceptr, usize, u64)> {
    if len == 0 {
        return Err(Error::InvalidArgument(
            "dma-buf export: size must be non-zero".into(),
        ));
    }
    if !page.is_power_of_two() {
        return Err(Error::InvalidArgument(format!(
            "dma-buf export: page size {page} is not a power of two"
        )));
    }
    let mask = page as u64 - 1;
    let base = ptr & !mask;
    let end = ptr
        .checked_add(len as u64)
        .and_then(|e| e.checked_add(mask))
        .map(|e| e & !mask)
        .ok_or_else(|| {
            Error::InvalidArgument(format!("dma-buf export: {ptr:#x}+{len} overflows"))
        })?;
    let aligned = usize::try_from(end - base).map_err(|_| {
        Error::InvalidArgument(format!("dma-buf export: {ptr:#x}+{len} is too large"))
    })?;
    Ok((base, aligned, ptr - base))
}

/// A dma-buf exported from device memory: the descriptor (closed on drop), the page-aligned
/// range it covers, and where the bytes asked for start in it.
#[derive(Debug)]
pub struct DmaBuf {
    /// The dma-buf; importers (the RDMA stack) take their own reference, so it can be closed
    /// once registered.
    pub fd: OwnedFd,
    /// First device address of the exported range (page-aligned).
    pub base: CUdeviceptr,
    /// Bytes exported (a multiple of the page size).
    pub len: usize,
    /// `ptr - base`: the offset of the bytes asked for inside the dma-buf.
    pub offset: u64,
}

/// Exports the page-aligned range around `ptr..ptr+len` (device memory of `ctx`'s device) as a
/// dma-buf.
///
/// # Errors
/// [`Error::Unsupported`] when the driver lacks `cuMemGetHandleForAddressRange`;
/// [`Error::InvalidArgument`] for an empty or overflowing range; [`Error::Driver`] when the
/// driver refuses (`CUDA_ERROR_NOT_SUPPORTED`: no dma-buf support on this device or kernel;
/// `CUDA_ERROR_INVALID_VALUE`: the aligned range is not fully inside mapped device memory).
pub fn export_dmabuf(ctx: &Context, ptr: CUdeviceptr, len: usize) -> Result<DmaBuf> {
    let (base, aligned, offset) = dmabuf_range(ptr, len, host_page_size())?;
    let _g = ctx.enter()?;
    let fd = result::mem_get_dmabuf_fd(base, aligned)?;
    Ok(DmaBuf {
        fd,
        base,
        len: aligned,
        offset,
    })
}

impl Device {
    /// Whether device memory of this GPU can be exported as a dma-buf: the driver exports
    /// `cuMemGetHandleForAddressRange` and the device reports
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`. `Ok(false)` for either missing.
    ///
    /// # Errors
    /// Driver errors other than an unknown attribute (which an old driver returns as
    /// `CUDA_ERROR_INVALID_VALUE` and which counts as "no").
    pub fn dma_buf_supported(&self) -> Result<bool> {
        if !result::has_dmabuf_export()? {
            return Ok(false);
        }
        match self.attribute(sys::CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED) {
            Ok(v) => Ok(v != 0),
            Err(e) if e.driver_code() == Some(sys::CUDA_ERROR_INVALID_VALUE) => Ok(false),
            Err(e) => Err(e),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ranges_round_outward_to_pages() {
        assert_eq!(
            dmabuf_range(0x10000, 4096, 4096).unwrap(),
            (0x10000, 4096, 0)
        );
        assert_eq!(
            dmabuf_range(0x10010, 10, 4096).unwrap(),
            (0x10000, 4096, 0x10)
        );
        assert_eq!(
            dmabuf_range(0x10ff0, 0x20, 4096).unwrap(),
            (0x10000, 0x2000, 0xff0)
        );
        assert_eq!(
            dmabuf_range(0x20000, 1, 65536).unwrap(),
            (0x20000, 65536, 0)
        );
        assert!(dmabuf_range(0x1000, 0, 4096).is_err());
        assert!(dmabuf_range(0x1000, 1, 3000).is_err());
        assert!(dmabuf_range(u64::MAX - 10, 100, 4096).is_err());
    }

    #[test]
    fn every_range_covers_the_bytes_asked_for() {
        for ptr in [0u64, 1, 4095, 4096, 4097, 0x7f00_0000_1234] {
            for len in [1usize, 2, 4095, 4096, 4097, 1 << 20] {
                let (base, n, off) = dmabuf_range(ptr, len, 4096).unwrap();
                assert_eq!(base % 4096, 0);
                assert_eq!(n % 4096, 0);
                assert_eq!(base + off, ptr);
                assert!(off < 4096);
                assert!(base + n as u64 >= ptr + len as u64);
                assert!(n < len + 2 * 4096);
            }
        }
    }
}
