//! Streams and events: `cuStream*` (stream memory operations included) and `cuEvent*`.

use std::ffi::c_uint;

use crate::error::Result;
use crate::sys::{self, CUdeviceptr, CUstream};

use super::init::{check, check_ready, driver};

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
