//! CUDA virtual memory management (`cuMemCreate`, `cuMemMap`, ...), sharing allocations as POSIX
//! file descriptors, and dma-buf export.

use std::ffi::{c_int, c_void};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};

use crate::error::{Error, Result};
use crate::sys::{self, CUdeviceptr};

use super::init::{check, driver};

/// `cuMemCreate`: a physical allocation, not yet mapped anywhere.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` for a size that is not a multiple of the granularity, ...
pub fn mem_create(
    len: usize,
    prop: &sys::CUmemAllocationProp,
) -> Result<sys::CUmemGenericAllocationHandle> {
    let d = driver()?;
    let mut h = 0;
    // SAFETY: reads `prop`, writes one handle; flags must be 0.
    check(d, "cuMemCreate", unsafe {
        (d.cuMemCreate)(&mut h, len, prop, 0)
    })?;
    Ok(h)
}

/// `cuMemRelease`: drops one reference to an allocation handle.
///
/// # Safety
/// The caller must own the reference it gives up.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_release(h: sys::CUmemGenericAllocationHandle) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller gives up a reference it owns.
    check(d, "cuMemRelease", unsafe { (d.cuMemRelease)(h) })
}

/// `cuMemRetainAllocationHandle`: one more reference to the VMM allocation mapped at `addr`
/// (any address inside the mapping). Release it with [`mem_release`].
///
/// # Errors
/// Fails (`CUDA_ERROR_INVALID_VALUE` or `CUDA_ERROR_NOT_SUPPORTED`) for memory that does not come
/// from `cuMemMap`, which makes it the test for VMM memory.
pub fn mem_retain_allocation_handle(
    addr: CUdeviceptr,
) -> Result<sys::CUmemGenericAllocationHandle> {
    let d = driver()?;
    let mut h = 0;
    // SAFETY: a lookup that writes one handle; the driver validates addr.
    check(d, "cuMemRetainAllocationHandle", unsafe {
        (d.cuMemRetainAllocationHandle)(&mut h, addr as *mut c_void)
    })?;
    Ok(h)
}

/// `cuMemExportToShareableHandle` as a POSIX file descriptor.
///
/// # Safety
/// `h` must be a live allocation handle.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` or `CUDA_ERROR_NOT_PERMITTED` when the allocation was not created
/// with `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` among its requested handle types.
pub unsafe fn mem_export_to_fd(h: sys::CUmemGenericAllocationHandle) -> Result<OwnedFd> {
    let d = driver()?;
    let mut fd: c_int = -1;
    // SAFETY: for POSIX_FILE_DESCRIPTOR the driver writes one int; the caller promises h is live.
    check(d, "cuMemExportToShareableHandle", unsafe {
        (d.cuMemExportToShareableHandle)(
            &mut fd as *mut c_int as *mut c_void,
            h,
            sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
            0,
        )
    })?;
    if fd < 0 {
        return Err(Error::InvalidArgument(format!(
            "cuMemExportToShareableHandle returned fd {fd}"
        )));
    }
    // SAFETY: the driver created this descriptor for the caller, who now owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// `cuMemGetHandleForAddressRange` with `CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD`: a dma-buf file
/// descriptor for `len` bytes of device memory at `ptr` (both must be multiples of the host page
/// size; [`crate::dmabuf::dmabuf_range`] computes such a range). Needs a current context.
///
/// # Errors
/// [`Error::Unsupported`] when the driver does not export the entry point (older than CUDA
/// 11.7); `CUDA_ERROR_INVALID_VALUE` for a misaligned or unmapped range;
/// `CUDA_ERROR_NOT_SUPPORTED` when the device or kernel cannot export dma-bufs.
pub fn mem_get_dmabuf_fd(ptr: CUdeviceptr, len: usize) -> Result<OwnedFd> {
    let d = driver()?;
    let Some(f) = d.cuMemGetHandleForAddressRange else {
        return Err(Error::Unsupported {
            what: "dma-buf export",
            why: format!(
                "{} does not export cuMemGetHandleForAddressRange (CUDA 11.7 or newer needed)",
                d.path
            ),
        });
    };
    let mut fd: c_int = -1;
    // SAFETY: for DMA_BUF_FD the driver writes one int through the handle pointer; it validates
    // the range itself.
    check(d, "cuMemGetHandleForAddressRange", unsafe {
        f(
            &mut fd as *mut c_int as *mut c_void,
            ptr,
            len,
            sys::CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD,
            0,
        )
    })?;
    if fd < 0 {
        return Err(Error::InvalidArgument(format!(
            "cuMemGetHandleForAddressRange returned fd {fd}"
        )));
    }
    // SAFETY: the driver created this descriptor for the caller, who now owns it.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

/// Whether the loaded driver exports `cuMemGetHandleForAddressRange` (dma-buf export).
///
/// # Errors
/// [`Error::LibraryNotFound`] and the other [`driver`] errors.
pub fn has_dmabuf_export() -> Result<bool> {
    Ok(driver()?.cuMemGetHandleForAddressRange.is_some())
}

/// `cuMemImportFromShareableHandle` from a POSIX file descriptor (which stays the caller's).
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` for a descriptor that is not an exported CUDA allocation, ...
pub fn mem_import_from_fd(fd: BorrowedFd<'_>) -> Result<sys::CUmemGenericAllocationHandle> {
    use std::os::fd::AsRawFd;
    let d = driver()?;
    let mut h = 0;
    // SAFETY: for POSIX_FILE_DESCRIPTOR the OS handle is the descriptor itself cast to a pointer
    // (cuda.h: `(void *)(uintptr_t)fd`); the driver reads it and writes one handle.
    check(d, "cuMemImportFromShareableHandle", unsafe {
        (d.cuMemImportFromShareableHandle)(
            &mut h,
            fd.as_raw_fd() as usize as *mut c_void,
            sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        )
    })?;
    Ok(h)
}

/// `cuMemGetAllocationPropertiesFromHandle`.
///
/// # Safety
/// `h` must be a live allocation handle.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_get_allocation_properties(
    h: sys::CUmemGenericAllocationHandle,
) -> Result<sys::CUmemAllocationProp> {
    let d = driver()?;
    let mut prop = sys::CUmemAllocationProp::default();
    // SAFETY: writes one CUmemAllocationProp; the caller promises h is live.
    check(d, "cuMemGetAllocationPropertiesFromHandle", unsafe {
        (d.cuMemGetAllocationPropertiesFromHandle)(&mut prop, h)
    })?;
    Ok(prop)
}

/// `cuMemGetAllocationGranularity`.
///
/// # Errors
/// Whatever the driver returns for `prop`.
pub fn mem_get_allocation_granularity(
    prop: &sys::CUmemAllocationProp,
    flags: sys::CUmemAllocationGranularity_flags,
) -> Result<usize> {
    let d = driver()?;
    let mut g = 0usize;
    // SAFETY: reads prop, writes one size_t.
    check(d, "cuMemGetAllocationGranularity", unsafe {
        (d.cuMemGetAllocationGranularity)(&mut g, prop, flags)
    })?;
    Ok(g)
}

/// `cuMemAddressReserve`: a range of virtual addresses, nothing mapped yet.
///
/// # Errors
/// Whatever the driver returns.
pub fn mem_address_reserve(len: usize, alignment: usize) -> Result<CUdeviceptr> {
    let d = driver()?;
    let mut p: CUdeviceptr = 0;
    // SAFETY: writes one address; no fixed address is requested (0), flags must be 0.
    check(d, "cuMemAddressReserve", unsafe {
        (d.cuMemAddressReserve)(&mut p, len, alignment, 0, 0)
    })?;
    Ok(p)
}

/// `cuMemAddressFree`.
///
/// # Safety
/// `p, len` must be a reservation from [`mem_address_reserve`] with nothing mapped in it.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_address_free(p: CUdeviceptr, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises this is an empty reservation.
    check(d, "cuMemAddressFree", unsafe {
        (d.cuMemAddressFree)(p, len)
    })
}

/// `cuMemMap`: maps `len` bytes of allocation `h` (from `offset`, which must be 0) at `p`.
///
/// # Safety
/// `p..p+len` must lie in a reservation this process owns with nothing mapped there; `h` must be
/// a live allocation handle of at least `offset + len` bytes.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_map(
    p: CUdeviceptr,
    len: usize,
    offset: usize,
    h: sys::CUmemGenericAllocationHandle,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the range and the handle; flags must be 0.
    check(d, "cuMemMap", unsafe { (d.cuMemMap)(p, len, offset, h, 0) })
}

/// `cuMemUnmap`.
///
/// # Safety
/// `p, len` must be a mapping from [`mem_map`] that no work still uses.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_unmap(p: CUdeviceptr, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises this is a mapping nothing uses.
    check(d, "cuMemUnmap", unsafe { (d.cuMemUnmap)(p, len) })
}

/// `cuMemSetAccess`.
///
/// # Safety
/// `p..p+len` must be mapped by this process.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_set_access(
    p: CUdeviceptr,
    len: usize,
    desc: &[sys::CUmemAccessDesc],
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the range is mapped; desc is a valid array of desc.len().
    check(d, "cuMemSetAccess", unsafe {
        (d.cuMemSetAccess)(p, len, desc.as_ptr(), desc.len())
    })
}
