//! Device memory and copies (`cuMemAlloc`, `cuMemcpy*`, `cuMemset*`), host memory
//! (`cuMemHost*`, `cuMemFreeHost`) and pointer attributes.

use std::ffi::{c_uint, c_void};

use crate::error::Result;
use crate::sys::{self, CUcontext, CUdeviceptr, CUstream};

use super::init::{check, driver};

/// `cuMemAlloc` in the current context.
///
/// # Errors
/// `CUDA_ERROR_OUT_OF_MEMORY`, `CUDA_ERROR_INVALID_VALUE` for 0 bytes, ...
pub fn mem_alloc(len: usize) -> Result<CUdeviceptr> {
    let d = driver()?;
    let mut p: CUdeviceptr = 0;
    // SAFETY: writes one device pointer.
    check(d, "cuMemAlloc", unsafe { (d.cuMemAlloc)(&mut p, len) })?;
    Ok(p)
}

/// `cuMemFree`.
///
/// # Safety
/// `ptr` must come from `cuMemAlloc`, not be freed yet, and no queued or running work may use it.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_free(ptr: CUdeviceptr) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises ptr is a live allocation nothing uses.
    check(d, "cuMemFree", unsafe { (d.cuMemFree)(ptr) })
}

/// `cuMemGetAddressRange`: (base, size) of the allocation (or VMM mapping) containing `ptr`.
///
/// # Errors
/// `CUDA_ERROR_NOT_FOUND` or `CUDA_ERROR_INVALID_VALUE` when `ptr` is not device memory.
pub fn mem_get_address_range(ptr: CUdeviceptr) -> Result<(CUdeviceptr, usize)> {
    let d = driver()?;
    let (mut base, mut size) = (0 as CUdeviceptr, 0usize);
    // SAFETY: a lookup that writes two words; the driver validates ptr.
    check(d, "cuMemGetAddressRange", unsafe {
        (d.cuMemGetAddressRange)(&mut base, &mut size, ptr)
    })?;
    Ok((base, size))
}

/// `cuMemcpy`: unified-addressing copy, either side host or device.
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable memory that CUDA can reach, not
/// overlapping, and not written concurrently by anything else.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy(dst: CUdeviceptr, src: CUdeviceptr, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises both ranges are valid.
    check(d, "cuMemcpy", unsafe { (d.cuMemcpy)(dst, src, len) })
}

/// `cuMemcpyAsync`.
///
/// # Safety
/// As [`memcpy`], and both ranges must stay valid until the copy completes on `stream`, which
/// must be a live stream (or null for the legacy default stream).
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the ranges and the stream are valid.
    check(d, "cuMemcpyAsync", unsafe {
        (d.cuMemcpyAsync)(dst, src, len, stream)
    })
}

/// `cuMemcpyHtoD`.
///
/// # Safety
/// `src` must be readable host memory and `dst` writable device memory, `len` bytes each.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_htod(dst: CUdeviceptr, src: *const c_void, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises both ranges are valid.
    check(d, "cuMemcpyHtoD", unsafe {
        (d.cuMemcpyHtoD)(dst, src, len)
    })
}

/// `cuMemcpyDtoH`.
///
/// # Safety
/// `src` must be readable device memory and `dst` writable host memory, `len` bytes each.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_dtoh(dst: *mut c_void, src: CUdeviceptr, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises both ranges are valid.
    check(d, "cuMemcpyDtoH", unsafe {
        (d.cuMemcpyDtoH)(dst, src, len)
    })
}

/// `cuMemcpyDtoD`.
///
/// # Safety
/// Both ranges must be valid device memory, `len` bytes each.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_dtod(dst: CUdeviceptr, src: CUdeviceptr, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises both ranges are valid.
    check(d, "cuMemcpyDtoD", unsafe {
        (d.cuMemcpyDtoD)(dst, src, len)
    })
}

/// `cuMemcpyHtoDAsync`.
///
/// # Safety
/// As [`memcpy_htod`], with both ranges valid until the copy completes on the live `stream`.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_htod_async(
    dst: CUdeviceptr,
    src: *const c_void,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the ranges and the stream are valid.
    check(d, "cuMemcpyHtoDAsync", unsafe {
        (d.cuMemcpyHtoDAsync)(dst, src, len, stream)
    })
}

/// `cuMemcpyDtoHAsync`.
///
/// # Safety
/// As [`memcpy_dtoh`], with both ranges valid until the copy completes on the live `stream`.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_dtoh_async(
    dst: *mut c_void,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the ranges and the stream are valid.
    check(d, "cuMemcpyDtoHAsync", unsafe {
        (d.cuMemcpyDtoHAsync)(dst, src, len, stream)
    })
}

/// `cuMemcpyDtoDAsync`.
///
/// # Safety
/// As [`memcpy_dtod`], with both ranges valid until the copy completes on the live `stream`.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_dtod_async(
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the ranges and the stream are valid.
    check(d, "cuMemcpyDtoDAsync", unsafe {
        (d.cuMemcpyDtoDAsync)(dst, src, len, stream)
    })
}

/// `cuMemcpyPeerAsync`: copy between memory of two contexts (two devices).
///
/// # Safety
/// `dst` must be `len` writable bytes in `dst_ctx`, `src` `len` readable bytes in `src_ctx`,
/// both valid until the copy completes on the live `stream`; both contexts live.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memcpy_peer_async(
    dst: CUdeviceptr,
    dst_ctx: CUcontext,
    src: CUdeviceptr,
    src_ctx: CUcontext,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the ranges, contexts and stream are valid.
    check(d, "cuMemcpyPeerAsync", unsafe {
        (d.cuMemcpyPeerAsync)(dst, dst_ctx, src, src_ctx, len, stream)
    })
}

/// `cuMemsetD8`.
///
/// # Safety
/// `dst..dst+len` must be writable device (or mapped) memory.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memset_d8(dst: CUdeviceptr, value: u8, len: usize) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the range is valid.
    check(d, "cuMemsetD8", unsafe { (d.cuMemsetD8)(dst, value, len) })
}

/// `cuMemsetD8Async`.
///
/// # Safety
/// As [`memset_d8`], valid until the operation completes on the live `stream`.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn memset_d8_async(
    dst: CUdeviceptr,
    value: u8,
    len: usize,
    stream: CUstream,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the range and the stream are valid.
    check(d, "cuMemsetD8Async", unsafe {
        (d.cuMemsetD8Async)(dst, value, len, stream)
    })
}

// ---------------------------------------------------------------------------------------------
// Host memory.

/// `cuMemHostAlloc`: page-locked host memory.
///
/// # Errors
/// `CUDA_ERROR_OUT_OF_MEMORY`, ...
pub fn mem_host_alloc(len: usize, flags: c_uint) -> Result<*mut c_void> {
    let d = driver()?;
    let mut p: *mut c_void = std::ptr::null_mut();
    // SAFETY: writes one pointer.
    check(d, "cuMemHostAlloc", unsafe {
        (d.cuMemHostAlloc)(&mut p, len, flags)
    })?;
    Ok(p)
}

/// `cuMemFreeHost`.
///
/// # Safety
/// `p` must come from `cuMemHostAlloc`, not be freed yet, and nothing (host or device) may use it.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn mem_free_host(p: *mut c_void) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises p is a live pinned allocation nothing uses.
    check(d, "cuMemFreeHost", unsafe { (d.cuMemFreeHost)(p) })
}

/// `cuMemHostRegister`: page-locks existing host memory.
///
/// # Safety
/// `p..p+len` must be host memory that stays mapped until [`mem_host_unregister`].
///
/// # Errors
/// `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`, `CUDA_ERROR_NOT_PERMITTED`, ...
pub unsafe fn mem_host_register(p: *mut c_void, len: usize, flags: c_uint) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the range stays valid while registered.
    check(d, "cuMemHostRegister", unsafe {
        (d.cuMemHostRegister)(p, len, flags)
    })
}

/// `cuMemHostUnregister`.
///
/// # Safety
/// `p` must be the start of a registration, and no device work may still use it.
///
/// # Errors
/// `CUDA_ERROR_HOST_MEMORY_NOT_REGISTERED`, ...
pub unsafe fn mem_host_unregister(p: *mut c_void) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises p starts a registration nothing uses.
    check(d, "cuMemHostUnregister", unsafe {
        (d.cuMemHostUnregister)(p)
    })
}

/// `cuMemHostGetDevicePointer`: the device address of mapped pinned host memory.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` when `host_addr` is not mapped pinned memory.
pub fn mem_host_get_device_pointer(host_addr: usize) -> Result<CUdeviceptr> {
    let d = driver()?;
    let mut dp: CUdeviceptr = 0;
    // SAFETY: a lookup of an address (never dereferenced by us) that writes one word; the driver
    // validates the address (flags must be 0).
    check(d, "cuMemHostGetDevicePointer", unsafe {
        (d.cuMemHostGetDevicePointer)(&mut dp, host_addr as *mut c_void, 0)
    })?;
    Ok(dp)
}

/// `cuPointerGetAttribute`, into a zeroed `T`.
///
/// # Safety
/// `T` must be the type the driver writes for `attr` (or, for integers, at least as wide: the
/// value then lands in the low bytes on little-endian machines).
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` when CUDA does not know `ptr`, or an attribute this driver lacks.
pub unsafe fn pointer_get_attribute<T: Default>(
    attr: sys::CUpointer_attribute,
    ptr: CUdeviceptr,
) -> Result<T> {
    let d = driver()?;
    let mut v = T::default();
    // SAFETY: the caller promises T fits what the driver writes for attr.
    check(d, "cuPointerGetAttribute", unsafe {
        (d.cuPointerGetAttribute)(&mut v as *mut T as *mut c_void, attr, ptr)
    })?;
    Ok(v)
}

/// Sets `CU_POINTER_ATTRIBUTE_SYNC_MEMOPS` on the allocation holding `ptr`: memory operations
/// on it complete synchronously, as GDRCopy needs for CPU stores through a BAR mapping. A
/// driver without `cuPointerSetAttribute` (never seen) is left as it is.
///
/// # Errors
/// A driver error (e.g. `ptr` is not device memory of the current context).
pub fn pointer_set_sync_memops(ptr: CUdeviceptr) -> Result<()> {
    let d = driver()?;
    let Some(f) = d.cuPointerSetAttribute else {
        return Ok(());
    };
    let on: c_uint = 1;
    // SAFETY: for SYNC_MEMOPS the driver reads one unsigned int through the value pointer.
    check(d, "cuPointerSetAttribute", unsafe {
        f(
            (&on as *const c_uint).cast(),
            sys::CU_POINTER_ATTRIBUTE_SYNC_MEMOPS,
            ptr,
        )
    })
}
