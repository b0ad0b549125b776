//! One error type for the crate; one variant per kind of failure a caller may branch on.

use std::time::Duration;

use crate::sys;

/// Everything that can go wrong in stolon-cuda.
///
/// Not `#[non_exhaustive]`: the Python bindings convert it with one exhaustive `match`.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum Error {
    /// `libcuda.so.1` could not be loaded (no NVIDIA driver on this machine); names every path
    /// tried and why each failed.
    #[error(transparent)]
    LibraryNotFound(#[from] sys::LoadError),
    /// The driver loaded but sees no GPU (`cuInit` returned `CUDA_ERROR_NO_DEVICE`).
    #[error(
        "no CUDA device is visible: the driver is installed but cuInit found no GPU \
         (check CUDA_VISIBLE_DEVICES, and that the container was started with GPUs)"
    )]
    NoDevice,
    /// A device ordinal beyond the visible devices.
    #[error("CUDA device {ordinal} does not exist ({count} visible)")]
    InvalidDevice { ordinal: usize, count: usize },
    /// A driver call returned an error.
    #[error("{call} failed: {name} ({code}): {message}")]
    Driver {
        /// The driver function, e.g. `cuMemAlloc`.
        call: &'static str,
        /// The `CUresult` code.
        code: sys::CUresult,
        /// `cuGetErrorName`, e.g. `CUDA_ERROR_OUT_OF_MEMORY`.
        name: String,
        /// `cuGetErrorString`.
        message: String,
    },
    /// This process was forked after CUDA was initialised in its parent; CUDA cannot be used in
    /// such a child. Start workers with `spawn` (or initialise CUDA only after forking).
    #[error(
        "CUDA was initialised before this process was forked, and a forked child cannot use it; \
         start worker processes with spawn instead of fork"
    )]
    Forked,
    /// A bad argument (out of range, zero size, misaligned, wrong length...).
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// The driver or device cannot do this at all (a driver too old to export the entry point,
    /// or a device attribute saying no). Callers fall back to another mechanism.
    #[error("{what} is not supported here: {why}")]
    Unsupported {
        /// The feature, e.g. `dma-buf export`.
        what: &'static str,
        /// Why, in words.
        why: String,
    },
    /// A bounded wait ran out.
    #[error("timed out after {waited:?} waiting for {what}")]
    Timeout {
        waited: Duration,
        what: &'static str,
    },
}

impl Error {
    /// The driver's `CUresult`, for [`Error::Driver`].
    pub fn driver_code(&self) -> Option<sys::CUresult> {
        match self {
            Error::Driver { code, .. } => Some(*code),
            _ => None,
        }
    }

    /// Whether this error means "no usable CUDA here" (no library, no device, or a forked
    /// child), as opposed to a failure of an operation on a working GPU.
    pub fn is_unavailable(&self) -> bool {
        matches!(
            self,
            Error::LibraryNotFound(_) | Error::NoDevice | Error::Forked
        ) || self.driver_code() == Some(sys::CUDA_ERROR_STUB_LIBRARY)
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
