//! CUDA IPC: `cuIpcGetMemHandle`, `cuIpcOpenMemHandle`, `cuIpcCloseMemHandle`.

use std::ffi::c_uint;

use crate::error::Result;
use crate::sys::{self, CUdeviceptr};

use super::init::{check, driver};

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
