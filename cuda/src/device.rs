//! Devices and their primary contexts.

use std::marker::PhantomData;
use std::sync::Arc;

use crate::error::{Error, Result};
use crate::result;
use crate::sys::{self, CUcontext, CUdevice};

/// The number of CUDA devices visible to this process (after `CUDA_VISIBLE_DEVICES`).
///
/// 0 when the driver is installed but sees no GPU.
///
/// # Errors
/// [`Error::LibraryNotFound`] without a driver; [`Error::Forked`]; a driver error.
pub fn device_count() -> Result<usize> {
    match result::device_get_count() {
        Ok(n) => Ok(n.max(0) as usize),
        Err(Error::NoDevice) => Ok(0),
        Err(e) => Err(e),
    }
}

/// One CUDA device, by ordinal. Cheap to copy; holds no driver resources.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct Device {
    ordinal: usize,
    raw: CUdevice,
}

impl Device {
    /// The device with this ordinal (0-based, among the visible devices).
    ///
    /// # Errors
    /// [`Error::InvalidDevice`] for an ordinal beyond [`device_count`]; [`Error::NoDevice`] when
    /// the driver sees no GPU; [`Error::LibraryNotFound`] without a driver.
    pub fn get(ordinal: usize) -> Result<Device> {
        // Not device_count(): with no GPU at all, say NoDevice rather than "ordinal 0 of 0".
        let count = result::device_get_count()?.max(0) as usize;
        if ordinal >= count {
            return Err(Error::InvalidDevice { ordinal, count });
        }
        let raw = result::device_get(ordinal as i32)?;
        Ok(Device { ordinal, raw })
    }

    /// Every visible device (none when the driver sees no GPU).
    ///
    /// # Errors
    /// As [`device_count`].
    pub fn all() -> Result<Vec<Device>> {
        (0..device_count()?).map(Device::get).collect()
    }

    /// The ordinal this device was opened with.
    pub fn ordinal(&self) -> usize {
        self.ordinal
    }

    /// The driver's `CUdevice`.
    pub fn raw(&self) -> CUdevice {
        self.raw
    }

    /// The product name, e.g. `NVIDIA H100 80GB HBM3`.
    ///
    /// # Errors
    /// A driver error.
    pub fn name(&self) -> Result<String> {
        result::device_get_name(self.raw)
    }

    /// The PCI address, `domain:bus:device.function` (e.g. `0000:3B:00.0`), which ties the GPU
    /// to its NUMA node and nearby NICs in sysfs.
    ///
    /// # Errors
    /// A driver error.
    pub fn pci_bus_id(&self) -> Result<String> {
        result::device_get_pci_bus_id(self.raw)
    }

    /// Any `CU_DEVICE_ATTRIBUTE_*` (see [`crate::sys`]).
    ///
    /// # Errors
    /// A driver error, e.g. for an attribute this driver does not know.
    pub fn attribute(&self, attr: sys::CUdevice_attribute) -> Result<i32> {
        result::device_get_attribute(self.raw, attr)
    }

    fn flag(&self, attr: sys::CUdevice_attribute) -> Result<bool> {
        Ok(self.attribute(attr)? != 0)
    }

    /// (major, minor) compute capability, e.g. (9, 0) for H100.
    ///
    /// # Errors
    /// A driver error.
    pub fn compute_capability(&self) -> Result<(i32, i32)> {
        Ok((
            self.attribute(sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)?,
            self.attribute(sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR)?,
        ))
    }

    /// The device's streaming multiprocessors.
    ///
    /// # Errors
    /// A driver error.
    pub fn multiprocessor_count(&self) -> Result<i32> {
        self.attribute(sys::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)
    }

    /// Whether host and device share one virtual address space (needed for IPC, mapped pinned
    /// memory at the same address, and [`crate::memory::copy`]).
    ///
    /// # Errors
    /// A driver error.
    pub fn unified_addressing(&self) -> Result<bool> {
        self.flag(sys::CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING)
    }

    /// Whether the device supports the VMM API (`cuMemCreate`, `cuMemMap`...).
    ///
    /// # Errors
    /// A driver error.
    pub fn supports_vmm(&self) -> Result<bool> {
        self.flag(sys::CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED)
    }

    /// Whether VMM allocations can be exported as POSIX file descriptors.
    ///
    /// # Errors
    /// A driver error.
    pub fn supports_posix_fd_export(&self) -> Result<bool> {
        self.flag(sys::CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED)
    }

    /// Whether `cuStreamWriteValue64` / `cuStreamWaitValue64` work on this device.
    ///
    /// # Errors
    /// A driver error.
    pub fn supports_stream_mem_ops_64(&self) -> Result<bool> {
        self.flag(sys::CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS)
    }

    /// Whether pinned host memory can be mapped into the device's address space.
    ///
    /// # Errors
    /// A driver error.
    pub fn can_map_host_memory(&self) -> Result<bool> {
        self.flag(sys::CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY)
    }

    /// Total memory in bytes.
    ///
    /// # Errors
    /// A driver error.
    pub fn total_memory(&self) -> Result<usize> {
        result::device_total_mem(self.raw)
    }

    /// Whether this device can access `peer`'s memory directly (NVLink or PCIe P2P).
    ///
    /// # Errors
    /// A driver error.
    pub fn can_access_peer(&self, peer: &Device) -> Result<bool> {
        result::device_can_access_peer(self.raw, peer.raw)
    }

    /// Retains this device's primary context; see [`Context::primary`].
    ///
    /// # Errors
    /// A driver error.
    pub fn primary_context(&self) -> Result<Arc<Context>> {
        Context::primary(*self)
    }
}

/// A reference on a device's primary context: the one context per device that the CUDA runtime
/// (and so PyTorch) uses, so memory and streams made here are shared with them.
///
/// Every object that lives in a context (buffers, streams, events, mappings...) holds an
/// `Arc<Context>`, so the context outlives them. Dropping the last reference releases the
/// primary context (the driver destroys it once nobody, PyTorch included, holds it).
#[derive(Debug)]
pub struct Context {
    raw: CUcontext,
    device: Device,
}

// SAFETY: a CUcontext is a handle the driver lets any thread use (bind, query, release); this
// type holds no thread-affine state.
unsafe impl Send for Context {}
// SAFETY: as above; every method goes through the thread-safe driver API.
unsafe impl Sync for Context {}

impl Context {
    /// Retains `device`'s primary context (creating it if no one has yet).
    ///
    /// # Errors
    /// A driver error.
    pub fn primary(device: Device) -> Result<Arc<Context>> {
        let raw = result::device_primary_ctx_retain(device.raw)?;
        Ok(Arc::new(Context { raw, device }))
    }

    /// The driver's `CUcontext`.
    pub fn raw(&self) -> CUcontext {
        self.raw
    }

    /// The device this context belongs to.
    pub fn device(&self) -> Device {
        self.device
    }

    /// Binds this context to the calling thread until something else is bound. Prefer
    /// [`Context::enter`], which restores what was bound before.
    ///
    /// # Errors
    /// A driver error.
    pub fn make_current(&self) -> Result<()> {
        // SAFETY: self.raw stays live while self exists (we hold a primary-context reference).
        unsafe { result::ctx_set_current(self.raw) }
    }

    /// Binds this context to the calling thread for the life of the guard, then restores the
    /// context that was bound before (so a PyTorch thread's current device is left as it was).
    /// Costs one driver call when this context is already current.
    ///
    /// # Errors
    /// A driver error.
    pub fn enter(&self) -> Result<ContextGuard<'_>> {
        let previous = result::ctx_get_current()?;
        if previous != self.raw {
            // SAFETY: self.raw is live (see make_current).
            unsafe { result::ctx_set_current(self.raw)? };
        }
        Ok(ContextGuard {
            previous,
            changed: previous != self.raw,
            _ctx: PhantomData,
        })
    }

    /// Waits for all work in this context. Blocks without a bound.
    ///
    /// # Errors
    /// An error from any work that failed.
    pub fn synchronize(&self) -> Result<()> {
        let _g = self.enter()?;
        result::ctx_synchronize()
    }

    /// Lets kernels and copies in this context access memory of `peer`'s context directly
    /// (NVLink / PCIe P2P). Already enabled counts as success. One direction only: call it on
    /// both sides for both directions.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for the same device; a driver error such as
    /// `CUDA_ERROR_PEER_ACCESS_UNSUPPORTED`.
    pub fn enable_peer_access(&self, peer: &Context) -> Result<()> {
        if peer.device == self.device {
            return Err(Error::InvalidArgument(
                "peer access needs two different devices".to_string(),
            ));
        }
        let _g = self.enter()?;
        // SAFETY: peer.raw is live while `peer` exists.
        unsafe { result::ctx_enable_peer_access(peer.raw) }
    }

    /// (free, total) bytes of device memory.
    ///
    /// # Errors
    /// A driver error.
    pub fn memory_info(&self) -> Result<(usize, usize)> {
        let _g = self.enter()?;
        result::mem_get_info()
    }
}

impl Drop for Context {
    fn drop(&mut self) {
        // The handle stays bound on threads that bound it; the driver resets the primary context
        // only when its last reference (PyTorch's included) goes, and a reset one is reported as
        // an error, not used. Unbinding here could pull the context from under PyTorch.
        // SAFETY: we own exactly one reference, taken in `primary`. Errors (a forked child, the
        // driver already shut down at exit) leave nothing to clean up.
        let _ = unsafe { result::device_primary_ctx_release(self.device.raw) };
    }
}

/// Restores the previously bound context when dropped; see [`Context::enter`]. Not `Send`: it
/// belongs to the thread it was made on.
#[must_use = "the context is unbound again when the guard drops"]
pub struct ContextGuard<'a> {
    previous: CUcontext,
    changed: bool,
    _ctx: PhantomData<(&'a Context, *const ())>,
}

impl Drop for ContextGuard<'_> {
    fn drop(&mut self) {
        if self.changed {
            // SAFETY: `previous` was bound on this thread when the guard was made; if it has been
            // destroyed since, the driver returns an error, which we ignore.
            let _ = unsafe { result::ctx_set_current(self.previous) };
        }
    }
}
