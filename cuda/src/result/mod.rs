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
//!
//! One file per area, each re-exported here so every function keeps its `crate::result::` path:
//! `init` (the gate and status checks, which every other area uses), `device` (driver, devices,
//! contexts), `memory` (device and host memory, copies, pointer attributes), `ipc` (CUDA IPC),
//! `vmm` (virtual memory management, file-descriptor sharing, dma-buf export), `stream`
//! (streams and events) and `module` (modules and kernel launches).

mod device;
mod init;
mod ipc;
mod memory;
mod module;
mod stream;
mod vmm;

pub use device::*;
pub use init::{check, driver, is_forked_child};
pub use ipc::*;
pub use memory::*;
pub use module::*;
pub use stream::*;
pub use vmm::*;
