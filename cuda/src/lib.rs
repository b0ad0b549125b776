//! # stolon-cuda: the CUDA driver API, loaded at run time
//!
//! What stolon needs from CUDA to move bytes in and out of GPU memory: device queries, the
//! primary context PyTorch shares, device and pinned host memory, registration of existing
//! memory, copies, streams and events, kernels loaded from PTX, sharing GPU memory between
//! processes of one host (CUDA IPC for `cudaMalloc` memory, POSIX file descriptors for VMM memory
//! such as PyTorch's `expandable_segments`), and 64-bit counters in host-mapped memory that GPU
//! work bumps and a CPU thread watches.
//!
//! Nothing here links against CUDA: `libcuda.so.1` is opened on first use, so the crate builds,
//! and stolon's wheel imports, on machines without a GPU; there every call returns
//! [`Error::LibraryNotFound`] naming each path tried.
//!
//! ## Quick start
//! ```no_run
//! use std::time::Duration;
//! use stolon_cuda::{Device, DeviceBuffer, HostCounter, Stream};
//! # fn main() -> stolon_cuda::Result<()> {
//! if !stolon_cuda::is_present() {
//!     return Ok(()); // no driver or no GPU: CPU paths only
//! }
//! let dev = Device::get(0)?;
//! println!("{} ({}), sm_{:?}", dev.name()?, dev.pci_bus_id()?, dev.compute_capability()?);
//! let ctx = dev.primary_context()?;           // the context PyTorch uses too
//! let mut buf = DeviceBuffer::alloc(&ctx, 1 << 20)?;
//! buf.copy_from_host(0, &[7u8; 4096])?;
//!
//! // Signal "all work queued so far on this stream is done" into host memory, no kernel needed.
//! let stream = Stream::new(&ctx)?;
//! let done = HostCounter::new(&ctx)?;
//! // SAFETY: `done` outlives the stream's work (we wait for it below).
//! unsafe { stolon_cuda::stream_write_value64(&stream, done.device_ptr(), 1)? };
//! done.wait_at_least(1, Duration::from_secs(5))?;
//! # Ok(()) }
//! ```
//!
//! ## Layers
//! - [`sys`]: raw C types, constants and the function table, as `cuda.h` (CUDA 13.0) declares
//!   them, bound to the versioned symbols the header maps to (`cuMemAlloc_v2`, ...).
//! - [`result`]: one function per driver call, status codes turned into [`Result`]; `unsafe fn`
//!   where the call can break memory safety.
//! - the safe types re-exported here: [`Device`], [`Context`], [`DeviceBuffer`],
//!   [`PinnedHostBuffer`], [`HostRegistration`], [`HostCounter`], [`Stream`], [`Event`],
//!   [`IpcMemHandle`]/[`IpcMapping`], [`VmmAllocation`]/[`MappedVmm`], [`Module`]/[`Function`],
//!   [`DmaBuf`] ([`export_dmabuf`]: device memory as a dma-buf for RDMA registration),
//!   [`GpuFlag`] (a word of device memory the CPU writes through GDRCopy, [`gdr`]).
//!   Raw-address operations on memory the crate does not own (copies, stream memory operations,
//!   registration, kernel launches) stay `unsafe fn`, each saying what it needs.
//!
//! ## What loads when
//! - The first call that needs the driver opens the library: `$STOLON_LIBCUDA` if set, then
//!   `libcuda.so.1` through the loader's search path, then the usual driver locations
//!   ([`sys::candidate_paths`]). The library comes with the NVIDIA driver, not the toolkit; the
//!   toolkit's stub `libcuda.so` is never picked (and would fail `cuInit` if forced).
//! - The same call runs `cuInit(0)` once. Both results are cached for the life of the process,
//!   and the library is never unloaded.
//! - [`is_present`] is true when the library loads and `cuInit` finds a GPU;
//!   [`sys::is_loadable`] only checks the library.
//!
//! ## Errors
//! One [`Error`] enum: [`Error::LibraryNotFound`] (no driver; lists each path and why it failed,
//! or the symbol a too-old driver lacks), [`Error::NoDevice`] (driver, but no visible GPU),
//! [`Error::Driver`] (a call failed: its name, `CUresult` code, `cuGetErrorName` and
//! `cuGetErrorString`), [`Error::Forked`], [`Error::InvalidDevice`], [`Error::InvalidArgument`]
//! (bounds, sizes, alignment: checked before calling the driver), [`Error::Timeout`],
//! [`Error::Unsupported`] (the driver lacks an optional entry point such as
//! `cuMemGetHandleForAddressRange`).
//! [`Error::is_unavailable`] tells "no CUDA here" from "an operation failed".
//!
//! ## Contexts and threads
//! Everything uses the device's *primary* context, the one the CUDA runtime and PyTorch use, so
//! memory, streams and events are shared with them. Each object holds an `Arc<Context>` and binds
//! it around each driver call with [`Context::enter`], which restores whatever the thread had
//! bound before: calling into this crate never changes a PyTorch thread's current device.
//!
//! All types are `Send + Sync` (except the [`ContextGuard`], which belongs to its thread): the
//! driver API is thread-safe, and enqueueing onto one [`Stream`] from several threads is allowed
//! (the order between threads is then whatever the driver sees first). Host-side accesses to a
//! [`HostCounter`] are atomic. Device work is outside Rust's borrow rules: the `unsafe` methods
//! that hand out host views of memory a device may write ([`PinnedHostBuffer::as_slice`]) say
//! when they are sound.
//!
//! ## fork()
//! CUDA does not survive `fork()`: a child forked after `cuInit` cannot use the driver. The crate
//! registers a `pthread_atfork` child handler at initialisation; in such a child every call
//! returns [`Error::Forked`] and every drop skips the driver (the memory simply goes with the
//! process). Start GPU workers with `spawn` (Python `multiprocessing.set_start_method("spawn")`),
//! or fork before touching CUDA. Inherited file descriptors from [`export_fd`] remain valid in a
//! child and can be imported after an `exec`.
//!
//! ## Cleanup
//! Every resource is released on drop, in dependency order by construction (each holds its
//! context). Drops ignore driver errors: at process exit the driver may already be shutting down.
//! Memory handed to asynchronous work through `unsafe` calls must outlive that work; dropping
//! a buffer does not wait for streams that still use it.
//!
//! ## Testing
//! - `cargo test -p stolon-cuda` runs everywhere: `tests/no_driver.rs` (clean failure without a
//!   driver), `tests/abi_layout.rs` (symbols, prototypes, layouts and constants against `cuda.h`,
//!   found through `$STOLON_CUDA_INCLUDE` or Python's `nvidia/cu13/include`; SKIP without it),
//!   and `tests/mock_driver.rs`, which builds a mock `libcuda.so.1` from C and drives the safe
//!   layer through it (context binding, references, cleanup, VMM descriptors across processes).
//! - On a GPU machine: `cargo test -p stolon-cuda --test gpu -- --ignored --test-threads=1`, and
//!   `cargo run -p stolon-cuda --example cuda_smoke` for a device report and a quick self-check.
//!
//! ## PyTorch interop
//! Python passes integers, not tensors: `tensor.data_ptr()`, `tensor.device.index`,
//! `torch.cuda.current_stream().cuda_stream` ([`Stream::from_raw`]). [`pointer_info`] tells
//! whether a pointer is caching-allocator memory (`ipc_capable`, share with [`IpcMemHandle`]) or
//! an expandable segment (`is_vmm`, share with [`export_fd`]/[`import_fd`]), and which range of
//! the allocation it sits in.

pub mod device;
pub mod dmabuf;
pub mod error;
pub mod gdr;
pub mod ipc;
pub mod memory;
pub mod module;
pub mod result;
pub mod stream;
pub mod sys;
pub mod vmm;

pub use device::{device_count, Context, ContextGuard, Device};
pub use dmabuf::{export_dmabuf, DmaBuf};
pub use error::{Error, Result};
pub use gdr::{Gdr, GpuFlag};
pub use ipc::{IpcExport, IpcMapping, IpcMemHandle};
pub use memory::{
    pointer_info, DeviceBuffer, HostCounter, HostRegistration, MemoryType, PinnedHostBuffer,
    PointerInfo,
};
pub use module::{Function, Module};
pub use stream::{stream_wait_value64, stream_write_value64, Event, Stream, WaitCondition};
pub use sys::CUdeviceptr;
pub use vmm::{export_fd, import_fd, MappedVmm, VmmAllocation, VmmChunk, VmmExport, VmmImport};

/// Whether CUDA is usable here: the driver library loads and `cuInit` finds at least one GPU.
pub fn is_present() -> bool {
    result::driver().is_ok()
}

/// The CUDA version the installed driver supports (not the toolkit's).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct DriverVersion {
    /// e.g. 13
    pub major: u32,
    /// e.g. 0
    pub minor: u32,
}

impl std::fmt::Display for DriverVersion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}.{}", self.major, self.minor)
    }
}

/// The CUDA version the driver supports, e.g. 13.0 for driver 580. Answers even when the driver
/// sees no GPU.
///
/// # Errors
/// [`Error::LibraryNotFound`], or a driver error.
pub fn driver_version() -> Result<DriverVersion> {
    let v = result::driver_get_version()?.max(0) as u32;
    Ok(DriverVersion {
        major: v / 1000,
        minor: (v % 1000) / 10,
    })
}

/// PTX (ISA 7.0, sm_70 and newer) of the small kernels the self-check, the example and the GPU
/// tests use:
/// - `stolon_store_u64(u64* p, u64 v)`: `*p = v`, system-scope release store;
/// - `stolon_wait_then_store(const u64* flag, u64 target, u64* out, u64 v)`: spins until
///   `*flag >= target` (system-scope acquire loads), then `*out = v`;
/// - `stolon_fill_u8(u8* p, u64 n, u8 v)`: `p[0..n] = v`.
pub const SELFCHECK_PTX: &str = include_str!("selfcheck.ptx");
