//! The thin layer: one function per driver call, turning `CUresult` into [`Result`].
//!
//! Functions that cannot break memory safety whatever their arguments (queries, allocations
//! that hand back a new object) are safe; those that free, copy through raw addresses or act on
//! raw handles are `unsafe fn` and say what they need. Calls that act on "the current context"
//! need one bound on the calling thread ([`crate::Context::enter`]); without it the driver
//! returns `CUDA_ERROR_INVALID_CONTEXT`, which is an error here, not undefined behaviour.
//!
//! [`driver`] is the gate every call goes through: it loads the library, runs `cuInit` once, and
//! refuses to touch the driver in a child forked after that.

use std::ffi::{c_char, c_int, c_uint, c_void, CStr};
use std::os::fd::{BorrowedFd, FromRawFd, OwnedFd};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::sys::{self, CUcontext, CUdevice, CUdeviceptr, CUresult, CUstream, Driver};

static FORKED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_fork_child() {
    // Only an atomic store: async-signal-safe, as a fork child handler must be.
    FORKED.store(true, Ordering::Relaxed);
}

fn init() -> Result<&'static Driver> {
    let d = sys::driver()?;
    // SAFETY: registers a plain function that only stores an atomic; it stays valid for the
    // life of the process.
    unsafe { libc::pthread_atfork(None, None, Some(on_fork_child)) };
    // SAFETY: cuInit takes a flags word (must be 0) and has no other precondition.
    match unsafe { (d.cuInit)(0) } {
        sys::CUDA_SUCCESS => Ok(d),
        sys::CUDA_ERROR_NO_DEVICE => Err(Error::NoDevice),
        code => Err(driver_error(d, "cuInit", code)),
    }
}

/// The initialised driver: loaded, `cuInit` done, and not in a child forked after that.
///
/// # Errors
/// [`Error::LibraryNotFound`], [`Error::NoDevice`], [`Error::Driver`] from `cuInit`, or
/// [`Error::Forked`].
pub fn driver() -> Result<&'static Driver> {
    static STATE: OnceLock<Result<&'static Driver>> = OnceLock::new();
    if FORKED.load(Ordering::Relaxed) {
        return Err(Error::Forked);
    }
    STATE.get_or_init(init).clone()
}

/// Whether this process is a child forked after CUDA was initialised in its parent.
pub fn is_forked_child() -> bool {
    FORKED.load(Ordering::Relaxed)
}

fn static_str(p: *const c_char) -> Option<String> {
    if p.is_null() {
        return None;
    }
    // SAFETY: the driver returns pointers to NUL-terminated static strings.
    Some(unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned())
}

fn driver_error(d: &Driver, call: &'static str, code: CUresult) -> Error {
    let mut name: *const c_char = std::ptr::null();
    let mut message: *const c_char = std::ptr::null();
    // SAFETY: both calls write a pointer to a static string (or fail for unknown codes).
    unsafe {
        (d.cuGetErrorName)(code, &mut name);
        (d.cuGetErrorString)(code, &mut message);
    }
    Error::Driver {
        call,
        code,
        name: static_str(name).unwrap_or_else(|| format!("CUresult {code}")),
        message: static_str(message).unwrap_or_else(|| "unknown error".to_string()),
    }
}

/// `Ok(())` for `CUDA_SUCCESS`, else [`Error::Driver`] naming `call`.
///
/// # Errors
/// [`Error::Driver`] for any code but `CUDA_SUCCESS`.
pub fn check(d: &Driver, call: &'static str, code: CUresult) -> Result<()> {
    if code == sys::CUDA_SUCCESS {
        Ok(())
    } else {
        Err(driver_error(d, call, code))
    }
}

/// `Ok(true)` for `CUDA_SUCCESS`, `Ok(false)` for `CUDA_ERROR_NOT_READY`, else the error.
fn check_ready(d: &Driver, call: &'static str, code: CUresult) -> Result<bool> {
    match code {
        sys::CUDA_SUCCESS => Ok(true),
        sys::CUDA_ERROR_NOT_READY => Ok(false),
        _ => Err(driver_error(d, call, code)),
    }
}

// ---------------------------------------------------------------------------------------------
// Driver, devices, contexts.

/// `cuDriverGetVersion`: 1000 * major + 10 * minor of the CUDA version the driver supports.
///
/// # Errors
/// [`Error::LibraryNotFound`], or whatever the call returns.
pub fn driver_get_version() -> Result<i32> {
    // Needs no cuInit, so it answers on a machine with a driver but no usable GPU too.
    let d = sys::driver()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    check(d, "cuDriverGetVersion", unsafe {
        (d.cuDriverGetVersion)(&mut v)
    })?;
    Ok(v)
}

/// `cuDeviceGetCount`.
///
/// # Errors
/// Whatever [`driver`] or the call returns.
pub fn device_get_count() -> Result<i32> {
    let d = driver()?;
    let mut n: c_int = 0;
    // SAFETY: writes one int.
    check(d, "cuDeviceGetCount", unsafe {
        (d.cuDeviceGetCount)(&mut n)
    })?;
    Ok(n)
}

/// `cuDeviceGet`.
///
/// # Errors
/// `CUDA_ERROR_INVALID_DEVICE` for an ordinal out of range.
pub fn device_get(ordinal: i32) -> Result<CUdevice> {
    let d = driver()?;
    let mut dev: CUdevice = 0;
    // SAFETY: writes one CUdevice; the driver validates the ordinal.
    check(d, "cuDeviceGet", unsafe {
        (d.cuDeviceGet)(&mut dev, ordinal)
    })?;
    Ok(dev)
}

fn fixed_string(buf: &[c_char]) -> String {
    let bytes: Vec<u8> = buf
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8)
        .collect();
    String::from_utf8_lossy(&bytes).into_owned()
}

/// `cuDeviceGetName`.
///
/// # Errors
/// Whatever the driver returns for the device.
pub fn device_get_name(dev: CUdevice) -> Result<String> {
    let d = driver()?;
    let mut buf = [0 as c_char; 256];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
    check(d, "cuDeviceGetName", unsafe {
        (d.cuDeviceGetName)(buf.as_mut_ptr(), buf.len() as c_int, dev)
    })?;
    Ok(fixed_string(&buf))
}

/// `cuDeviceGetPCIBusId`: `domain:bus:device.function`, e.g. `0000:3B:00.0`.
///
/// # Errors
/// Whatever the driver returns for the device.
pub fn device_get_pci_bus_id(dev: CUdevice) -> Result<String> {
    let d = driver()?;
    let mut buf = [0 as c_char; 64];
    // SAFETY: the driver writes at most `len` bytes, NUL-terminated, into `buf`.
    check(d, "cuDeviceGetPCIBusId", unsafe {
        (d.cuDeviceGetPCIBusId)(buf.as_mut_ptr(), buf.len() as c_int, dev)
    })?;
    Ok(fixed_string(&buf))
}

/// `cuDeviceGetAttribute`.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` for an attribute this driver does not know.
pub fn device_get_attribute(dev: CUdevice, attr: sys::CUdevice_attribute) -> Result<i32> {
    let d = driver()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int; the driver validates the attribute and device.
    check(d, "cuDeviceGetAttribute", unsafe {
        (d.cuDeviceGetAttribute)(&mut v, attr, dev)
    })?;
    Ok(v)
}

/// `cuDeviceTotalMem`.
///
/// # Errors
/// Whatever the driver returns for the device.
pub fn device_total_mem(dev: CUdevice) -> Result<usize> {
    let d = driver()?;
    let mut v = 0usize;
    // SAFETY: writes one size_t.
    check(d, "cuDeviceTotalMem", unsafe {
        (d.cuDeviceTotalMem)(&mut v, dev)
    })?;
    Ok(v)
}

/// `cuDeviceCanAccessPeer`.
///
/// # Errors
/// Whatever the driver returns for the devices.
pub fn device_can_access_peer(dev: CUdevice, peer: CUdevice) -> Result<bool> {
    let d = driver()?;
    let mut v: c_int = 0;
    // SAFETY: writes one int.
    check(d, "cuDeviceCanAccessPeer", unsafe {
        (d.cuDeviceCanAccessPeer)(&mut v, dev, peer)
    })?;
    Ok(v != 0)
}

/// `cuDevicePrimaryCtxRetain`: one more reference on the device's primary context (the one the
/// CUDA runtime, and so PyTorch, uses).
///
/// # Errors
/// Whatever the driver returns for the device.
pub fn device_primary_ctx_retain(dev: CUdevice) -> Result<CUcontext> {
    let d = driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check(d, "cuDevicePrimaryCtxRetain", unsafe {
        (d.cuDevicePrimaryCtxRetain)(&mut ctx, dev)
    })?;
    Ok(ctx)
}

/// `cuDevicePrimaryCtxRelease`.
///
/// # Safety
/// The caller must own a reference from [`device_primary_ctx_retain`] and give it up: releasing
/// a reference it does not own could destroy a context others still use.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn device_primary_ctx_release(dev: CUdevice) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller gives up a reference it owns.
    check(d, "cuDevicePrimaryCtxRelease", unsafe {
        (d.cuDevicePrimaryCtxRelease)(dev)
    })
}

/// `cuCtxSetCurrent`: binds `ctx` (or nothing, for null) to the calling thread.
///
/// # Safety
/// `ctx` must be null or a live context.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn ctx_set_current(ctx: CUcontext) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises ctx is null or live.
    check(d, "cuCtxSetCurrent", unsafe { (d.cuCtxSetCurrent)(ctx) })
}

/// `cuCtxGetCurrent`: the context bound to the calling thread, or null.
///
/// # Errors
/// Whatever the driver returns.
pub fn ctx_get_current() -> Result<CUcontext> {
    let d = driver()?;
    let mut ctx: CUcontext = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check(d, "cuCtxGetCurrent", unsafe {
        (d.cuCtxGetCurrent)(&mut ctx)
    })?;
    Ok(ctx)
}

/// `cuCtxGetDevice`: the device of the current context.
///
/// # Errors
/// `CUDA_ERROR_INVALID_CONTEXT` when no context is current.
pub fn ctx_get_device() -> Result<CUdevice> {
    let d = driver()?;
    let mut dev: CUdevice = 0;
    // SAFETY: writes one CUdevice.
    check(d, "cuCtxGetDevice", unsafe { (d.cuCtxGetDevice)(&mut dev) })?;
    Ok(dev)
}

/// `cuCtxSynchronize`: waits for all work in the current context. Blocks without a bound.
///
/// # Errors
/// An error from any work that failed (sticky errors included).
pub fn ctx_synchronize() -> Result<()> {
    let d = driver()?;
    // SAFETY: no arguments.
    check(d, "cuCtxSynchronize", unsafe { (d.cuCtxSynchronize)() })
}

/// `cuCtxEnablePeerAccess`: lets the current context access `peer`'s memory. Already enabled
/// counts as success.
///
/// # Safety
/// `peer` must be a live context.
///
/// # Errors
/// `CUDA_ERROR_PEER_ACCESS_UNSUPPORTED`, `CUDA_ERROR_TOO_MANY_PEERS`, ...
pub unsafe fn ctx_enable_peer_access(peer: CUcontext) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises peer is live; flags must be 0.
    match unsafe { (d.cuCtxEnablePeerAccess)(peer, 0) } {
        sys::CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED => Ok(()),
        code => check(d, "cuCtxEnablePeerAccess", code),
    }
}

/// `cuMemGetInfo`: (free, total) bytes on the current context's device.
///
/// # Errors
/// `CUDA_ERROR_INVALID_CONTEXT` when no context is current.
pub fn mem_get_info() -> Result<(usize, usize)> {
    let d = driver()?;
    let (mut free, mut total) = (0usize, 0usize);
    // SAFETY: writes two size_t.
    check(d, "cuMemGetInfo", unsafe {
        (d.cuMemGetInfo)(&mut free, &mut total)
    })?;
    Ok((free, total))
}

// ---------------------------------------------------------------------------------------------
// Device memory and copies.

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

// ---------------------------------------------------------------------------------------------
// CUDA IPC.

/// `cuIpcGetMemHandle` for the `cuMemAlloc` allocation whose base is `base`.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` when `base` is not such an allocation (VMM memory included).
pub fn ipc_get_mem_handle(base: CUdeviceptr) -> Result<sys::CUipcMemHandle> {
    let d = driver()?;
    let mut h = sys::CUipcMemHandle { reserved: [0; 64] };
    // SAFETY: writes one 64-byte handle; the driver validates base.
    check(d, "cuIpcGetMemHandle", unsafe {
        (d.cuIpcGetMemHandle)(&mut h, base)
    })?;
    Ok(h)
}

/// `cuIpcOpenMemHandle` in the current context.
///
/// # Errors
/// `CUDA_ERROR_INVALID_CONTEXT` for a handle from this same process, `CUDA_ERROR_MAP_FAILED`,
/// `CUDA_ERROR_TOO_MANY_PEERS`, ...
pub fn ipc_open_mem_handle(handle: sys::CUipcMemHandle, flags: c_uint) -> Result<CUdeviceptr> {
    let d = driver()?;
    let mut p: CUdeviceptr = 0;
    // SAFETY: writes one device pointer; the driver validates the handle.
    check(d, "cuIpcOpenMemHandle", unsafe {
        (d.cuIpcOpenMemHandle)(&mut p, handle, flags)
    })?;
    Ok(p)
}

/// `cuIpcCloseMemHandle`.
///
/// # Safety
/// `p` must come from [`ipc_open_mem_handle`], once per open, with no work still using it.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn ipc_close_mem_handle(p: CUdeviceptr) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises p is an open IPC mapping nothing uses.
    check(d, "cuIpcCloseMemHandle", unsafe {
        (d.cuIpcCloseMemHandle)(p)
    })
}

// ---------------------------------------------------------------------------------------------
// CUDA virtual memory management.

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

// ---------------------------------------------------------------------------------------------
// Streams and events.

/// `cuStreamCreate` in the current context.
///
/// # Errors
/// Whatever the driver returns.
pub fn stream_create(flags: c_uint) -> Result<CUstream> {
    let d = driver()?;
    let mut s: CUstream = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check(d, "cuStreamCreate", unsafe {
        (d.cuStreamCreate)(&mut s, flags)
    })?;
    Ok(s)
}

/// `cuStreamDestroy`.
///
/// # Safety
/// `s` must be a live stream created by [`stream_create`], destroyed once.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn stream_destroy(s: CUstream) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises s is live and owned.
    check(d, "cuStreamDestroy", unsafe { (d.cuStreamDestroy)(s) })
}

/// `cuStreamSynchronize`. Blocks without a bound.
///
/// # Safety
/// `s` must be a live stream (or null for the legacy default stream).
///
/// # Errors
/// An error from work on the stream.
pub unsafe fn stream_synchronize(s: CUstream) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises s is live.
    check(d, "cuStreamSynchronize", unsafe {
        (d.cuStreamSynchronize)(s)
    })
}

/// `cuStreamQuery`: whether all work on the stream has completed.
///
/// # Safety
/// `s` must be a live stream (or null).
///
/// # Errors
/// An error from work on the stream.
pub unsafe fn stream_query(s: CUstream) -> Result<bool> {
    let d = driver()?;
    // SAFETY: the caller promises s is live.
    check_ready(d, "cuStreamQuery", unsafe { (d.cuStreamQuery)(s) })
}

/// `cuStreamWaitEvent`: later work on `s` waits for `e`.
///
/// # Safety
/// `s` and `e` must be live.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn stream_wait_event(s: CUstream, e: sys::CUevent) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises s and e are live.
    check(d, "cuStreamWaitEvent", unsafe {
        (d.cuStreamWaitEvent)(s, e, sys::CU_EVENT_WAIT_DEFAULT)
    })
}

/// `cuStreamWriteValue64`: when the stream reaches it, writes `value` to `addr` (after a memory
/// barrier, so earlier work on the stream is visible first).
///
/// # Safety
/// `s` must be live; `addr` must be 8-byte aligned device-accessible memory (device memory, or the
/// device address of mapped pinned memory) that stays valid until the write executes.
///
/// # Errors
/// `CUDA_ERROR_NOT_SUPPORTED` on devices without 64-bit stream memory operations.
pub unsafe fn stream_write_value64(
    s: CUstream,
    addr: CUdeviceptr,
    value: u64,
    flags: c_uint,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the stream and the address.
    check(d, "cuStreamWriteValue64", unsafe {
        (d.cuStreamWriteValue64)(s, addr, value, flags)
    })
}

/// `cuStreamWaitValue64`: later work on the stream waits until the condition in `flags` holds
/// for the 64-bit value at `addr`.
///
/// # Safety
/// As [`stream_write_value64`].
///
/// # Errors
/// `CUDA_ERROR_NOT_SUPPORTED` on devices without 64-bit stream memory operations.
pub unsafe fn stream_wait_value64(
    s: CUstream,
    addr: CUdeviceptr,
    value: u64,
    flags: c_uint,
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the stream and the address.
    check(d, "cuStreamWaitValue64", unsafe {
        (d.cuStreamWaitValue64)(s, addr, value, flags)
    })
}

/// `cuEventCreate` in the current context.
///
/// # Errors
/// Whatever the driver returns.
pub fn event_create(flags: c_uint) -> Result<sys::CUevent> {
    let d = driver()?;
    let mut e: sys::CUevent = std::ptr::null_mut();
    // SAFETY: writes one handle.
    check(d, "cuEventCreate", unsafe {
        (d.cuEventCreate)(&mut e, flags)
    })?;
    Ok(e)
}

/// `cuEventRecord`.
///
/// # Safety
/// `e` and `s` must be live and of the same context.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn event_record(e: sys::CUevent, s: CUstream) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises e and s are live.
    check(d, "cuEventRecord", unsafe { (d.cuEventRecord)(e, s) })
}

/// `cuEventQuery`: whether the work captured by the last record has completed.
///
/// # Safety
/// `e` must be live.
///
/// # Errors
/// An error from the captured work.
pub unsafe fn event_query(e: sys::CUevent) -> Result<bool> {
    let d = driver()?;
    // SAFETY: the caller promises e is live.
    check_ready(d, "cuEventQuery", unsafe { (d.cuEventQuery)(e) })
}

/// `cuEventSynchronize`. Blocks without a bound.
///
/// # Safety
/// `e` must be live.
///
/// # Errors
/// An error from the captured work.
pub unsafe fn event_synchronize(e: sys::CUevent) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises e is live.
    check(d, "cuEventSynchronize", unsafe {
        (d.cuEventSynchronize)(e)
    })
}

/// `cuEventElapsedTime` in milliseconds.
///
/// # Safety
/// Both events must be live.
///
/// # Errors
/// `CUDA_ERROR_NOT_READY`, or `CUDA_ERROR_INVALID_HANDLE` for events without timing.
pub unsafe fn event_elapsed_time(start: sys::CUevent, end: sys::CUevent) -> Result<f32> {
    let d = driver()?;
    let mut ms = 0f32;
    // SAFETY: writes one float; the caller promises both events are live.
    check(d, "cuEventElapsedTime", unsafe {
        (d.cuEventElapsedTime)(&mut ms, start, end)
    })?;
    Ok(ms)
}

/// `cuEventDestroy`.
///
/// # Safety
/// `e` must be a live event, destroyed once.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn event_destroy(e: sys::CUevent) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises e is live and owned.
    check(d, "cuEventDestroy", unsafe { (d.cuEventDestroy)(e) })
}

// ---------------------------------------------------------------------------------------------
// Modules and kernels.

/// `cuModuleLoadData` in the current context.
///
/// # Safety
/// `image` must point to a complete cubin, fatbin, or NUL-terminated PTX text.
///
/// # Errors
/// `CUDA_ERROR_INVALID_IMAGE`, `CUDA_ERROR_INVALID_PTX`, `CUDA_ERROR_NO_BINARY_FOR_GPU`, ...
pub unsafe fn module_load_data(image: *const c_void) -> Result<sys::CUmodule> {
    let d = driver()?;
    let mut m: sys::CUmodule = std::ptr::null_mut();
    // SAFETY: the caller promises the image is complete; writes one handle.
    check(d, "cuModuleLoadData", unsafe {
        (d.cuModuleLoadData)(&mut m, image)
    })?;
    Ok(m)
}

/// `cuModuleUnload`.
///
/// # Safety
/// `m` must be a live module, unloaded once, with no kernel of it still running or queued.
///
/// # Errors
/// Whatever the driver returns.
pub unsafe fn module_unload(m: sys::CUmodule) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises m is live and unused.
    check(d, "cuModuleUnload", unsafe { (d.cuModuleUnload)(m) })
}

/// `cuModuleGetFunction`.
///
/// # Safety
/// `m` must be a live module.
///
/// # Errors
/// `CUDA_ERROR_NOT_FOUND` for a name the module lacks.
pub unsafe fn module_get_function(m: sys::CUmodule, name: &CStr) -> Result<sys::CUfunction> {
    let d = driver()?;
    let mut f: sys::CUfunction = std::ptr::null_mut();
    // SAFETY: name is NUL-terminated; writes one handle; the caller promises m is live.
    check(d, "cuModuleGetFunction", unsafe {
        (d.cuModuleGetFunction)(&mut f, m, name.as_ptr())
    })?;
    Ok(f)
}

/// `cuLaunchKernelEx` with programmatic stream serialization: the kernel may start before
/// the kernel queued ahead of it on `s` completes, once every block of that one executed
/// `griddepcontrol.launch_dependents` (or exited). Nothing of the earlier kernel's is visible
/// to it except through its own synchronization (`griddepcontrol.wait`, or flags).
///
/// # Safety
/// As [`launch_kernel`]; also, the kernel must not rely on the earlier kernel's completion.
///
/// # Errors
/// [`Error::Unsupported`] when the driver does not export `cuLaunchKernelEx` (CUDA 12.0 or
/// newer); as [`launch_kernel`].
pub unsafe fn launch_kernel_early(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
    s: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    let d = driver()?;
    let Some(launch) = d.cuLaunchKernelEx else {
        return Err(Error::Unsupported {
            what: "programmatic dependent launch",
            why: format!(
                "{} does not export cuLaunchKernelEx (CUDA 12.0 or newer needed)",
                d.path
            ),
        });
    };
    let mut attr = sys::CUlaunchAttribute {
        id: sys::CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION,
        ..Default::default()
    };
    // `programmaticStreamSerializationAllowed`, an int at the start of the value.
    attr.value.words[0] = 1;
    let config = sys::CUlaunchConfig {
        gridDimX: grid.0,
        gridDimY: grid.1,
        gridDimZ: grid.2,
        blockDimX: block.0,
        blockDimY: block.1,
        blockDimZ: block.2,
        sharedMemBytes: shared_mem_bytes,
        hStream: s,
        attrs: &mut attr,
        numAttrs: 1,
    };
    // SAFETY: `config` and `attr` outlive the call (the driver copies them); the caller promises
    // the function, stream and parameter pointers; no `extra`.
    check(d, "cuLaunchKernelEx", unsafe {
        launch(&config, f, params.as_mut_ptr(), std::ptr::null_mut())
    })
}

/// `cuLaunchKernel` with parameters passed as `kernelParams`.
///
/// # Safety
/// `f` and `s` must be live; `params` must hold one pointer per kernel parameter, each to a value
/// of exactly that parameter's type; every address the kernel touches must stay valid until it
/// completes.
///
/// # Errors
/// `CUDA_ERROR_INVALID_VALUE` for bad dimensions, `CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES`, ...
pub unsafe fn launch_kernel(
    f: sys::CUfunction,
    grid: (u32, u32, u32),
    block: (u32, u32, u32),
    shared_mem_bytes: u32,
    s: CUstream,
    params: &mut [*mut c_void],
) -> Result<()> {
    let d = driver()?;
    // SAFETY: the caller promises the function, stream and parameter pointers; no `extra`.
    check(d, "cuLaunchKernel", unsafe {
        (d.cuLaunchKernel)(
            f,
            grid.0,
            grid.1,
            grid.2,
            block.0,
            block.1,
            block.2,
            shared_mem_bytes,
            s,
            params.as_mut_ptr(),
            std::ptr::null_mut(),
        )
    })
}
