//! Driver, devices, contexts: `cuDriverGetVersion`, `cuDevice*`, `cuDevicePrimaryCtx*`, `cuCtx*`,
//! `cuMemGetInfo`.

use std::ffi::{c_char, c_int};

use crate::error::Result;
use crate::sys::{self, CUcontext, CUdevice};

use super::init::{check, driver};

/// `cuDriverGetVersion`: 1000 * major + 10 * minor of the CUDA version the driver supports.
///
/// # Errors
/// [`Error::LibraryNotFound`](crate::Error::LibraryNotFound), or whatever the call returns.
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
