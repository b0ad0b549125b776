//! The gate every call goes through: loading the library, `cuInit` once, the guard against a
//! child forked after that, and turning a `CUresult` into [`Result`].

use std::ffi::{c_char, CStr};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::OnceLock;

use crate::error::{Error, Result};
use crate::sys::{self, CUresult, Driver};

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
pub(super) fn check_ready(d: &Driver, call: &'static str, code: CUresult) -> Result<bool> {
    match code {
        sys::CUDA_SUCCESS => Ok(true),
        sys::CUDA_ERROR_NOT_READY => Ok(false),
        _ => Err(driver_error(d, call, code)),
    }
}
