//! One error type for the crate; one variant per kind of failure a caller may branch on.

use std::time::Duration;

/// Everything that can go wrong in the engine.
///
/// Not `#[non_exhaustive]`: the Python bindings convert it with one exhaustive `match`, so a new
/// variant does not compile until it is given its exception class.
#[derive(Debug, Clone, thiserror::Error)]
pub enum Error {
    /// libfabric (or another native library) could not be loaded.
    #[error("{0}")]
    LibraryNotFound(String),
    /// No provider/interface matched the request.
    #[error("no provider matches {what}: {detail}")]
    ProviderNotFound { what: String, detail: String },
    /// The libibverbs RC backend (`verbs-rc`) cannot run here: no libibverbs, no RDMA device,
    /// or no usable port. The message says why and lists what was found.
    #[error("RDMA (verbs-rc) is not usable here: {0}")]
    RdmaUnavailable(String),
    /// A libfabric (or libibverbs) call failed.
    #[error("libfabric {call} failed: {message} ({code})")]
    Fabric {
        call: &'static str,
        code: isize,
        message: String,
    },
    /// Invalid configuration of the engine.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// A request touches bytes outside a region or descriptor.
    #[error("out of bounds: {0}")]
    OutOfBounds(String),
    /// A local region was unregistered, or belongs to another engine.
    #[error("unregistered memory: {0}")]
    Unregistered(String),
    /// A descriptor or address does not fit this engine's domains (count or provider).
    #[error("domain mismatch: {0}")]
    DomainMismatch(String),
    /// Bytes that should hold a descriptor or address could not be decoded.
    #[error("cannot decode {what}: {why}")]
    Decode { what: &'static str, why: String },
    /// Any other bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A message is larger than the receive buffers.
    #[error("message of {len} bytes exceeds the {max}-byte limit")]
    MessageTooLarge { len: usize, max: usize },
    /// A transfer completed with an error reported by the fabric (a dead peer, a broken link).
    #[error("transfer failed: {0}")]
    TransferFailed(String),
    /// The target refused the write: its region is unregistered or revoked, the descriptor does
    /// not match the registration (forged length, unknown key), or a staged chunk fell outside
    /// the region. Nothing was written; the connection and other transfers are unaffected.
    #[error("rejected by the target: {0}")]
    Rejected(String),
    /// A wait ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
    /// A CUDA driver call failed, or CUDA is not usable here (no driver, no GPU, a forked
    /// child: [`stolon_cuda::Error::is_unavailable`]); the driver's error is kept as the source.
    #[error("CUDA: {0}")]
    CudaDriver(#[from] stolon_cuda::Error),
    /// A CUDA precondition of the engine is not met (e.g. NVLink without `cuda_device`).
    #[error("CUDA: {0}")]
    Cuda(String),
    /// The engine was stopped.
    #[error("engine is stopped")]
    Stopped,
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
