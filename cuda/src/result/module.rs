//! Modules and kernels: `cuModule*`, `cuLaunchKernel`, `cuLaunchKernelEx`.

use std::ffi::{c_void, CStr};

use crate::error::{Error, Result};
use crate::sys::{self, CUstream};

use super::init::{check, driver};

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
