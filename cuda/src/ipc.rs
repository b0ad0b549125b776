//! CUDA IPC: sharing `cuMemAlloc` memory (PyTorch's caching-allocator segments included) with
//! another process on the same host.
//!
//! The owner exports a 64-byte [`IpcMemHandle`] for the allocation containing an address and
//! sends the bytes (plus the offset of the address in the allocation) over any channel; the peer
//! opens it and gets a device address of its own for the same memory ([`IpcMapping`]). A process
//! cannot open its own handles (the driver refuses), and memory from the VMM API (PyTorch's
//! `expandable_segments`) cannot be exported this way: use [`crate::export_fd`] for it.

use std::sync::Arc;

use crate::device::Context;
use crate::error::{Error, Result};
use crate::memory::DeviceBuffer;
use crate::result;
use crate::sys::{self, CUdeviceptr};

/// The 64 opaque bytes that name a `cuMemAlloc` allocation to other processes.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct IpcMemHandle {
    bytes: [u8; sys::CU_IPC_HANDLE_SIZE],
}

impl std::fmt::Debug for IpcMemHandle {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IpcMemHandle(")?;
        for b in &self.bytes[..8] {
            write!(f, "{b:02x}")?;
        }
        write!(f, "..)")
    }
}

/// An exported allocation: the handle, where the allocation starts and how large it is, and the
/// offset of the address that was asked for. The peer adds `offset` to its mapping's address.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct IpcExport {
    /// The handle of the whole allocation.
    pub handle: IpcMemHandle,
    /// The allocation's base address in the exporting process.
    pub alloc_base: CUdeviceptr,
    /// The allocation's size.
    pub alloc_size: usize,
    /// `ptr - alloc_base` for the address exported.
    pub offset: usize,
}

impl IpcMemHandle {
    /// Size of a handle in bytes.
    pub const LEN: usize = sys::CU_IPC_HANDLE_SIZE;

    /// Exports the `cuMemAlloc` allocation containing `ptr` (any address inside it, e.g. a
    /// PyTorch tensor inside a caching-allocator segment).
    ///
    /// # Errors
    /// A driver error when `ptr` is not `cuMemAlloc` memory (VMM memory included).
    pub fn export(ctx: &Context, ptr: CUdeviceptr) -> Result<IpcExport> {
        let _g = ctx.enter()?;
        let (alloc_base, alloc_size) = result::mem_get_address_range(ptr)?;
        let raw = result::ipc_get_mem_handle(alloc_base)?;
        Ok(IpcExport {
            handle: IpcMemHandle::from_raw(&raw),
            alloc_base,
            alloc_size,
            offset: (ptr - alloc_base) as usize,
        })
    }

    /// The handle of a [`DeviceBuffer`] (whose allocation starts at its address).
    ///
    /// # Errors
    /// A driver error.
    pub fn of_buffer(buf: &DeviceBuffer) -> Result<IpcMemHandle> {
        let _g = buf.context().enter()?;
        Ok(IpcMemHandle::from_raw(&result::ipc_get_mem_handle(
            buf.ptr(),
        )?))
    }

    fn from_raw(raw: &sys::CUipcMemHandle) -> IpcMemHandle {
        IpcMemHandle {
            bytes: raw.reserved.map(|c| c as u8),
        }
    }

    fn to_raw(self) -> sys::CUipcMemHandle {
        sys::CUipcMemHandle {
            reserved: self.bytes.map(|b| b as std::ffi::c_char),
        }
    }

    /// A handle from its 64 bytes (as sent by the exporting process).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] unless `bytes` is exactly 64 long.
    pub fn from_bytes(bytes: &[u8]) -> Result<IpcMemHandle> {
        let bytes: [u8; Self::LEN] = bytes.try_into().map_err(|_| {
            Error::InvalidArgument(format!(
                "a CUDA IPC handle is {} bytes, got {}",
                Self::LEN,
                bytes.len()
            ))
        })?;
        Ok(IpcMemHandle { bytes })
    }

    /// The 64 bytes, to send to a peer.
    pub fn as_bytes(&self) -> &[u8; sys::CU_IPC_HANDLE_SIZE] {
        &self.bytes
    }

    /// Maps the allocation into `ctx` (this process, that context's device). Peer access
    /// between the devices is enabled lazily (`CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS`) so that
    /// copies and kernels reach the memory over NVLink where there is one.
    ///
    /// # Errors
    /// A driver error: `CUDA_ERROR_INVALID_CONTEXT` (or similar) for a handle exported by this
    /// same process, `CUDA_ERROR_MAP_FAILED` once the exporter freed the memory, ...
    pub fn open(&self, ctx: &Arc<Context>) -> Result<IpcMapping> {
        let _g = ctx.enter()?;
        let ptr =
            result::ipc_open_mem_handle(self.to_raw(), sys::CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS)?;
        let alloc_size = result::mem_get_address_range(ptr).ok().map(|(_, len)| len);
        Ok(IpcMapping {
            ctx: ctx.clone(),
            ptr,
            alloc_size,
        })
    }
}

/// Another process's allocation mapped into this one; unmapped on drop. Opening the same handle
/// again in the same context returns the same address (the driver counts references).
///
/// The exporter must keep the memory allocated until every peer has dropped its mapping.
#[derive(Debug)]
pub struct IpcMapping {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    alloc_size: Option<usize>,
}

impl IpcMapping {
    /// The base address of the allocation in this process (add [`IpcExport::offset`]).
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// The allocation's size, as the driver reports it for the mapping (None if it does not).
    pub fn alloc_size(&self) -> Option<usize> {
        self.alloc_size
    }

    /// The context the mapping was opened in.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for IpcMapping {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we opened ptr once and close it once; work that used it was queued through
            // unsafe calls whose callers promised to keep the mapping alive until done.
            let _ = unsafe { result::ipc_close_mem_handle(self.ptr) };
        }
    }
}
