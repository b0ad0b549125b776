//! Loading kernels (PTX, cubin or fatbin) and launching them.

use std::ffi::{c_void, CString};
use std::sync::Arc;

use crate::device::Context;
use crate::error::{Error, Result};
use crate::result;
use crate::stream::Stream;
use crate::sys;

/// A loaded module; unloaded when the last [`Function`] from it and the module itself drop.
#[derive(Debug)]
pub struct Module {
    ctx: Arc<Context>,
    raw: sys::CUmodule,
}

// SAFETY: a CUmodule handle may be used from any thread.
unsafe impl Send for Module {}
// SAFETY: as above; lookups go through the thread-safe driver API.
unsafe impl Sync for Module {}

impl Module {
    /// Loads a cubin, a fatbin, or PTX text (JIT-compiled by the driver for this device).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for an empty image; a driver error
    /// (`CUDA_ERROR_INVALID_PTX`, `CUDA_ERROR_NO_BINARY_FOR_GPU`, ...).
    pub fn load(ctx: &Arc<Context>, image: &[u8]) -> Result<Arc<Module>> {
        if image.is_empty() {
            return Err(Error::InvalidArgument("empty module image".to_string()));
        }
        const ELF: &[u8] = b"\x7fELF";
        const FATBIN: &[u8] = &[0x50, 0xed, 0x55, 0xba];
        // PTX is text and the driver reads it up to a NUL; binaries carry their own length.
        let mut owned;
        let bytes = if image.starts_with(ELF) || image.starts_with(FATBIN) || image.ends_with(&[0])
        {
            image
        } else {
            owned = image.to_vec();
            owned.push(0);
            &owned[..]
        };
        let _g = ctx.enter()?;
        // SAFETY: `bytes` is a complete binary image or NUL-terminated text, alive for the call
        // (the driver copies what it needs).
        let raw = unsafe { result::module_load_data(bytes.as_ptr().cast())? };
        Ok(Arc::new(Module {
            ctx: ctx.clone(),
            raw,
        }))
    }

    /// The kernel `name` (an `extern "C"` name, or the mangled C++ one).
    ///
    /// # Errors
    /// A driver error (`CUDA_ERROR_NOT_FOUND`) for a name the module lacks.
    pub fn function(self: &Arc<Self>, name: &str) -> Result<Function> {
        let cname = CString::new(name).map_err(|_| {
            Error::InvalidArgument(format!("kernel name {name:?} contains a NUL byte"))
        })?;
        let _g = self.ctx.enter()?;
        // SAFETY: the module is live while self exists.
        let raw = unsafe { result::module_get_function(self.raw, &cname)? };
        Ok(Function {
            module: self.clone(),
            raw,
        })
    }
}

impl Drop for Module {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we loaded the module and unload it once; every Function holds an Arc to
            // it, so none outlives it. Kernels still queued were launched through unsafe calls.
            let _ = unsafe { result::module_unload(self.raw) };
        }
    }
}

/// A kernel of a loaded [`Module`] (which it keeps alive).
#[derive(Debug, Clone)]
pub struct Function {
    module: Arc<Module>,
    raw: sys::CUfunction,
}

// SAFETY: a CUfunction handle may be used from any thread.
unsafe impl Send for Function {}
// SAFETY: as above.
unsafe impl Sync for Function {}

impl Function {
    /// The driver's `CUfunction`.
    pub fn raw(&self) -> sys::CUfunction {
        self.raw
    }

    /// Queues the kernel on `stream` with `grid` x `block` threads and `shared_mem_bytes` of
    /// dynamic shared memory. `params` holds one pointer per kernel parameter, pointing at a
    /// value of that parameter's exact type (e.g. `&mut dptr as *mut u64 as *mut c_void`); the
    /// values are copied at launch.
    ///
    /// # Safety
    /// `params` must match the kernel's signature exactly, and every address the kernel touches
    /// must be valid for what it does until it completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a stream of another context; a driver error.
    pub unsafe fn launch(
        &self,
        stream: &Stream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: as promised by the caller.
        unsafe { self.launch_with(stream, grid, block, shared_mem_bytes, params, false) }
    }

    /// As [`Function::launch`], but the kernel may start while the kernel queued ahead of it
    /// on `stream` still runs: once every block of that one executed
    /// `griddepcontrol.launch_dependents` (sm_90 and newer; on older GPUs it starts after).
    ///
    /// # Safety
    /// As [`Function::launch`]; also, the kernel must see the earlier kernel's effects only
    /// through its own synchronization (`griddepcontrol.wait`, or flags it waits for).
    ///
    /// # Errors
    /// [`Error::Unsupported`] without `cuLaunchKernelEx` (drivers before CUDA 12.0); as
    /// [`Function::launch`].
    pub unsafe fn launch_early(
        &self,
        stream: &Stream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &mut [*mut c_void],
    ) -> Result<()> {
        // SAFETY: as promised by the caller.
        unsafe { self.launch_with(stream, grid, block, shared_mem_bytes, params, true) }
    }

    /// # Safety
    /// As [`Function::launch_early`] with `early`, else as [`Function::launch`].
    unsafe fn launch_with(
        &self,
        stream: &Stream,
        grid: (u32, u32, u32),
        block: (u32, u32, u32),
        shared_mem_bytes: u32,
        params: &mut [*mut c_void],
        early: bool,
    ) -> Result<()> {
        if stream.context().raw() != self.module.ctx.raw() {
            return Err(Error::InvalidArgument(
                "kernel and stream belong to different contexts".to_string(),
            ));
        }
        let _g = self.module.ctx.enter()?;
        let launch = if early {
            result::launch_kernel_early
        } else {
            result::launch_kernel
        };
        // SAFETY: the function and stream are live and of one context; the caller promises the
        // parameters, the memory the kernel touches and (early) its synchronization.
        unsafe {
            launch(
                self.raw,
                grid,
                block,
                shared_mem_bytes,
                stream.raw(),
                params,
            )
        }
    }
}
