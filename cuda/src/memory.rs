//! Device memory, pinned host memory, host registrations, host-mapped counters, raw copies, and
//! what CUDA knows about a pointer.

use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use crate::device::Context;
use crate::error::{Error, Result};
use crate::result;
use crate::stream::{poll_until, Stream};
use crate::sys::{self, CUdeviceptr};

fn check_range(what: &str, offset: usize, len: usize, size: usize) -> Result<()> {
    match offset.checked_add(len) {
        Some(end) if end <= size => Ok(()),
        _ => Err(Error::InvalidArgument(format!(
            "{what}: bytes {offset}..{offset}+{len} fall outside a {size}-byte buffer"
        ))),
    }
}

fn nonzero(what: &str, len: usize) -> Result<()> {
    if len == 0 {
        return Err(Error::InvalidArgument(format!(
            "{what}: size must be non-zero"
        )));
    }
    Ok(())
}

/// Device memory from `cuMemAlloc`, freed on drop. Works with CUDA IPC ([`crate::IpcMemHandle`]).
///
/// The copy methods are synchronous and go through the legacy default stream, which does not
/// wait for work on [`Stream`]s (they are non-blocking): synchronise those first.
#[derive(Debug)]
pub struct DeviceBuffer {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    len: usize,
}

impl DeviceBuffer {
    /// `len` bytes of uninitialised device memory in `ctx`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for 0 bytes; `CUDA_ERROR_OUT_OF_MEMORY`, ...
    pub fn alloc(ctx: &Arc<Context>, len: usize) -> Result<DeviceBuffer> {
        nonzero("DeviceBuffer::alloc", len)?;
        let _g = ctx.enter()?;
        let ptr = result::mem_alloc(len)?;
        Ok(DeviceBuffer {
            ctx: ctx.clone(),
            ptr,
            len,
        })
    }

    /// `len` bytes of zeroed device memory.
    ///
    /// # Errors
    /// As [`DeviceBuffer::alloc`].
    pub fn alloc_zeroed(ctx: &Arc<Context>, len: usize) -> Result<DeviceBuffer> {
        let mut b = Self::alloc(ctx, len)?;
        b.fill(0)?;
        Ok(b)
    }

    /// The device address.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Copies `src` into the buffer at `offset`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the bytes fall outside the buffer; a driver error.
    pub fn copy_from_host(&mut self, offset: usize, src: &[u8]) -> Result<()> {
        check_range("copy_from_host", offset, src.len(), self.len)?;
        if src.is_empty() {
            return Ok(());
        }
        let _g = self.ctx.enter()?;
        // SAFETY: the range lies in our allocation (checked) and `src` is a live slice; the
        // synchronous copy has finished reading `src` when it returns.
        unsafe { result::memcpy_htod(self.ptr + offset as u64, src.as_ptr().cast(), src.len()) }
    }

    /// Copies bytes from `offset` into `dst`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when the bytes fall outside the buffer; a driver error.
    pub fn copy_to_host(&self, offset: usize, dst: &mut [u8]) -> Result<()> {
        check_range("copy_to_host", offset, dst.len(), self.len)?;
        if dst.is_empty() {
            return Ok(());
        }
        let _g = self.ctx.enter()?;
        // SAFETY: the range lies in our allocation (checked), `dst` is a live exclusive slice,
        // and a synchronous device-to-host copy has finished writing when it returns.
        unsafe { result::memcpy_dtoh(dst.as_mut_ptr().cast(), self.ptr + offset as u64, dst.len()) }
    }

    /// The whole buffer, copied to the host.
    ///
    /// # Errors
    /// A driver error.
    pub fn to_vec(&self) -> Result<Vec<u8>> {
        let mut v = vec![0u8; self.len];
        self.copy_to_host(0, &mut v)?;
        Ok(v)
    }

    /// Copies `len` bytes from `src` at `src_offset` to this buffer at `offset` (device to
    /// device; any devices, through unified addressing).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when either range falls outside its buffer; a driver error.
    pub fn copy_from_device(
        &mut self,
        offset: usize,
        src: &DeviceBuffer,
        src_offset: usize,
        len: usize,
    ) -> Result<()> {
        check_range("copy_from_device (destination)", offset, len, self.len)?;
        check_range("copy_from_device (source)", src_offset, len, src.len)?;
        if len == 0 {
            return Ok(());
        }
        let _g = self.ctx.enter()?;
        // SAFETY: both ranges lie in live allocations (checked); `self` is borrowed exclusively,
        // so they are different buffers and do not overlap.
        unsafe { result::memcpy(self.ptr + offset as u64, src.ptr + src_offset as u64, len) }
    }

    /// Sets every byte to `value`.
    ///
    /// # Errors
    /// A driver error.
    pub fn fill(&mut self, value: u8) -> Result<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: the whole range is our allocation.
        unsafe { result::memset_d8(self.ptr, value, self.len) }
    }
}

impl Drop for DeviceBuffer {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we allocated ptr and free it once; work that still uses it was queued
            // through unsafe calls whose callers promised to keep it alive until done.
            let _ = unsafe { result::mem_free(self.ptr) };
        }
    }
}

/// Page-locked host memory from `cuMemHostAlloc`, mapped into every device's address space
/// (`CU_MEMHOSTALLOC_DEVICEMAP | CU_MEMHOSTALLOC_PORTABLE`): the CPU uses [`host_ptr`], kernels
/// and copies use [`device_ptr`] (the same address where unified addressing holds). Zeroed at
/// allocation, freed on drop. The staging buffer between GPU memory and a NIC that cannot reach
/// GPU memory.
///
/// [`host_ptr`]: PinnedHostBuffer::host_ptr
/// [`device_ptr`]: PinnedHostBuffer::device_ptr
#[derive(Debug)]
pub struct PinnedHostBuffer {
    ctx: Arc<Context>,
    host: *mut u8,
    dev: CUdeviceptr,
    len: usize,
}

// SAFETY: the buffer is plain memory owned by this value; the raw pointer is not thread-affine.
unsafe impl Send for PinnedHostBuffer {}
// SAFETY: shared access only hands out raw pointers; reading through them is the caller's
// (unsafe) business.
unsafe impl Sync for PinnedHostBuffer {}

impl PinnedHostBuffer {
    /// `len` zeroed bytes of mapped pinned memory.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for 0 bytes; a driver error.
    pub fn alloc(ctx: &Arc<Context>, len: usize) -> Result<PinnedHostBuffer> {
        nonzero("PinnedHostBuffer::alloc", len)?;
        let _g = ctx.enter()?;
        let p = result::mem_host_alloc(
            len,
            sys::CU_MEMHOSTALLOC_DEVICEMAP | sys::CU_MEMHOSTALLOC_PORTABLE,
        )?;
        let dev = match result::mem_host_get_device_pointer(p as usize) {
            Ok(d) => d,
            Err(e) => {
                // SAFETY: we just allocated p and nothing else has seen it.
                let _ = unsafe { result::mem_free_host(p) };
                return Err(e);
            }
        };
        // SAFETY: p is `len` bytes of fresh host memory that only we know about.
        unsafe { std::ptr::write_bytes(p.cast::<u8>(), 0, len) };
        Ok(PinnedHostBuffer {
            ctx: ctx.clone(),
            host: p.cast(),
            dev,
            len,
        })
    }

    /// The CPU address.
    pub fn host_ptr(&self) -> *mut u8 {
        self.host
    }

    /// The address kernels and copies use.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.dev
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a buffer has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// The context the allocation was made in.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// The bytes, for reading.
    ///
    /// # Safety
    /// No device work (kernel, copy, stream write) may write these bytes while the slice lives:
    /// synchronise the streams that do first.
    pub unsafe fn as_slice(&self) -> &[u8] {
        // SAFETY: host..host+len is our allocation, initialised at allocation; the caller rules
        // out concurrent device writes.
        unsafe { std::slice::from_raw_parts(self.host, self.len) }
    }

    /// The bytes, for writing.
    ///
    /// # Safety
    /// No device work may read or write these bytes while the slice lives.
    pub unsafe fn as_mut_slice(&mut self) -> &mut [u8] {
        // SAFETY: as in as_slice; `&mut self` excludes other host borrows.
        unsafe { std::slice::from_raw_parts_mut(self.host, self.len) }
    }
}

impl Drop for PinnedHostBuffer {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we allocated host and free it once.
            let _ = unsafe { result::mem_free_host(self.host.cast()) };
        }
    }
}

/// Existing host memory page-locked with `cuMemHostRegister`, unregistered on drop. With
/// [`HostRegistration::DEFAULT_FLAGS`] it is mapped into every device's address space.
///
/// Memory that is already pinned (`torch.Tensor.pin_memory()`, [`PinnedHostBuffer`]) cannot be
/// registered again (`CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`); [`pointer_info`] reports it
/// as [`MemoryType::Host`], so check first.
#[derive(Debug)]
pub struct HostRegistration {
    ctx: Arc<Context>,
    ptr: *mut u8,
    len: usize,
    dev: Option<CUdeviceptr>,
}

// SAFETY: holds only addresses; the memory itself belongs to the caller.
unsafe impl Send for HostRegistration {}
// SAFETY: as above.
unsafe impl Sync for HostRegistration {}

impl HostRegistration {
    /// Pinned for every context, and mapped into the devices' address spaces.
    pub const DEFAULT_FLAGS: u32 =
        sys::CU_MEMHOSTREGISTER_PORTABLE | sys::CU_MEMHOSTREGISTER_DEVICEMAP;
    /// The device only reads the memory (`CU_MEMHOSTREGISTER_READ_ONLY`; add to the flags).
    pub const READ_ONLY: u32 = sys::CU_MEMHOSTREGISTER_READ_ONLY;

    /// Registers `ptr..ptr+len` with `flags` (`CU_MEMHOSTREGISTER_*`).
    ///
    /// # Safety
    /// The memory must stay mapped (not freed, not unmapped) until this value drops, and must not
    /// overlap another registration.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a null pointer or 0 bytes;
    /// `CUDA_ERROR_HOST_MEMORY_ALREADY_REGISTERED`, `CUDA_ERROR_NOT_PERMITTED`, ...
    pub unsafe fn new(
        ctx: &Arc<Context>,
        ptr: *mut u8,
        len: usize,
        flags: u32,
    ) -> Result<HostRegistration> {
        nonzero("HostRegistration::new", len)?;
        if ptr.is_null() {
            return Err(Error::InvalidArgument(
                "HostRegistration::new: null pointer".to_string(),
            ));
        }
        let _g = ctx.enter()?;
        // SAFETY: the caller promises the range stays mapped while registered.
        unsafe { result::mem_host_register(ptr.cast(), len, flags)? };
        let dev = if flags & sys::CU_MEMHOSTREGISTER_DEVICEMAP != 0 {
            match result::mem_host_get_device_pointer(ptr as usize) {
                Ok(d) => Some(d),
                Err(e) => {
                    // SAFETY: we registered ptr just above and nothing uses it yet.
                    let _ = unsafe { result::mem_host_unregister(ptr.cast()) };
                    return Err(e);
                }
            }
        } else {
            None
        };
        Ok(HostRegistration {
            ctx: ctx.clone(),
            ptr,
            len,
            dev,
        })
    }

    /// The CPU address registered.
    pub fn host_ptr(&self) -> *mut u8 {
        self.ptr
    }

    /// The device address, when registered with `CU_MEMHOSTREGISTER_DEVICEMAP`.
    pub fn device_ptr(&self) -> Option<CUdeviceptr> {
        self.dev
    }

    /// Size in bytes.
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false: a registration covers at least one byte.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }
}

impl Drop for HostRegistration {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we registered ptr and unregister it once.
            let _ = unsafe { result::mem_host_unregister(self.ptr.cast()) };
        }
    }
}

/// A 64-bit counter in mapped pinned host memory: GPU work increments or sets it through
/// [`HostCounter::device_ptr`] (a kernel, or [`crate::stream_write_value64`]) and a CPU thread
/// watches it with [`HostCounter::load`] / [`HostCounter::wait_at_least`]; or the CPU sets it
/// and a kernel polls it (a GPU-visible completion flag). Starts at 0.
///
/// CPU accesses are atomic (acquire loads, release stores); device writers should use
/// system-scope stores or atomics (`st.release.sys`, `atomicAdd_system`) so the CPU sees them.
#[derive(Debug)]
pub struct HostCounter {
    buf: PinnedHostBuffer,
}

impl HostCounter {
    /// A new counter at 0, mapped for every device.
    ///
    /// # Errors
    /// A driver error.
    pub fn new(ctx: &Arc<Context>) -> Result<HostCounter> {
        // One cache line of its own (the allocation is a whole page anyway).
        Ok(HostCounter {
            buf: PinnedHostBuffer::alloc(ctx, 64)?,
        })
    }

    fn atomic(&self) -> &AtomicU64 {
        // SAFETY: the allocation is page-aligned, at least 8 bytes, lives as long as self, and is
        // only ever accessed atomically from the host (the device side is outside Rust's model;
        // aligned 64-bit accesses are single transactions there).
        unsafe { AtomicU64::from_ptr(self.buf.host_ptr().cast::<u64>()) }
    }

    /// The context whose mapping `device_ptr` belongs to.
    pub fn context(&self) -> &Arc<Context> {
        self.buf.context()
    }

    /// The CPU address of the counter.
    pub fn host_ptr(&self) -> *mut u64 {
        self.buf.host_ptr().cast()
    }

    /// The address a kernel or a stream memory operation writes.
    pub fn device_ptr(&self) -> CUdeviceptr {
        self.buf.device_ptr()
    }

    /// The current value (acquire).
    pub fn load(&self) -> u64 {
        self.atomic().load(Ordering::Acquire)
    }

    /// Sets the value (release), e.g. to raise a flag a kernel polls, or to reset.
    pub fn store(&self, value: u64) {
        self.atomic().store(value, Ordering::Release)
    }

    /// Adds `delta` from the CPU; returns the previous value.
    pub fn fetch_add(&self, delta: u64) -> u64 {
        self.atomic().fetch_add(delta, Ordering::AcqRel)
    }

    /// Waits, at most `timeout`, until the counter is at least `target`; returns the value seen.
    ///
    /// # Errors
    /// [`Error::Timeout`].
    pub fn wait_at_least(&self, target: u64, timeout: Duration) -> Result<u64> {
        let mut seen = 0;
        poll_until(timeout, "host counter", || {
            seen = self.load();
            Ok(seen >= target)
        })?;
        Ok(seen)
    }
}

/// Where the memory behind a pointer lives, as CUDA sees it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemoryType {
    /// Pinned host memory (`cuMemHostAlloc`, or registered with `cuMemHostRegister`).
    Host,
    /// Device memory (`cuMemAlloc`, VMM mappings, IPC mappings).
    Device,
    /// Managed (unified) memory from `cuMemAllocManaged`.
    Unified,
    /// CUDA does not know the address: ordinary pageable host memory, or garbage.
    Unknown,
}

/// What [`pointer_info`] learns about an address.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PointerInfo {
    /// Where the memory lives.
    pub memory_type: MemoryType,
    /// The device ordinal the memory was allocated on or registered with.
    pub device: Option<usize>,
    /// The raw `CUcontext` it belongs to, as an integer (compare with `Context::raw() as usize`);
    /// 0 when unknown.
    pub context: usize,
    /// A process-wide unique id of the allocation (0 when unknown).
    pub buffer_id: u64,
    /// `CU_POINTER_ATTRIBUTE_RANGE_START_ADDR`/`_SIZE`: the allocation for `cuMemAlloc` memory;
    /// for VMM memory the whole reserved address range (e.g. an entire PyTorch expandable
    /// segment), which may be far larger than what is mapped.
    pub range_start: CUdeviceptr,
    /// See `range_start`.
    pub range_size: usize,
    /// `cuMemGetAddressRange`: the allocation (what an IPC handle exports), or for VMM memory the
    /// mapped region holding the address. Equal to `range_*` for `cuMemAlloc` memory; 0 when
    /// unknown.
    pub alloc_start: CUdeviceptr,
    /// See `alloc_start`.
    pub alloc_size: usize,
    /// Whether the memory comes from the VMM API (`cuMemCreate` + `cuMemMap`, as PyTorch's
    /// `expandable_segments`): `cuMemRetainAllocationHandle` succeeds only for such memory.
    /// Share it with [`crate::export_fd`], not CUDA IPC.
    pub is_vmm: bool,
    /// Whether `cuIpcGetMemHandle` works for it (`cuMemAlloc` memory).
    pub ipc_capable: bool,
    /// `CU_MEM_HANDLE_TYPE_*` bits the allocation may be exported as (VMM memory; 0 otherwise).
    pub allowed_handle_types: u64,
}

/// Asks CUDA what it knows about `ptr` (device or host address). Works for any device's memory
/// through unified addressing; `ctx` only has to be a live context to ask from.
///
/// # Errors
/// A driver error other than "unknown address" (which gives [`MemoryType::Unknown`]).
pub fn pointer_info(ctx: &Context, ptr: CUdeviceptr) -> Result<PointerInfo> {
    let _g = ctx.enter()?;
    // SAFETY: MEMORY_TYPE is written as an unsigned int; a zeroed u32 receives it.
    let mt: u32 = match unsafe {
        result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_MEMORY_TYPE, ptr)
    } {
        Ok(v) => v,
        Err(e) if e.driver_code() == Some(sys::CUDA_ERROR_INVALID_VALUE) => {
            return Ok(PointerInfo {
                memory_type: MemoryType::Unknown,
                device: None,
                context: 0,
                buffer_id: 0,
                range_start: 0,
                range_size: 0,
                alloc_start: 0,
                alloc_size: 0,
                is_vmm: false,
                ipc_capable: false,
                allowed_handle_types: 0,
            });
        }
        Err(e) => return Err(e),
    };
    // SAFETY: IS_MANAGED is written as a boolean in an unsigned int (u64 is wider, zeroed).
    let managed: u64 =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_IS_MANAGED, ptr) }
            .unwrap_or(0);
    let memory_type = match mt {
        _ if managed != 0 => MemoryType::Unified,
        sys::CU_MEMORYTYPE_HOST => MemoryType::Host,
        sys::CU_MEMORYTYPE_DEVICE => MemoryType::Device,
        sys::CU_MEMORYTYPE_UNIFIED => MemoryType::Unified,
        _ => MemoryType::Unknown,
    };
    // SAFETY: DEVICE_ORDINAL is written as an int.
    let device: Option<i32> =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL, ptr) }
            .ok();
    // SAFETY: CONTEXT is written as a CUcontext, pointer-sized like usize.
    let context: usize =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_CONTEXT, ptr) }
            .unwrap_or(0);
    // SAFETY: BUFFER_ID is written as an unsigned long long.
    let buffer_id: u64 =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_BUFFER_ID, ptr) }
            .unwrap_or(0);
    // SAFETY: RANGE_START_ADDR is written as a CUdeviceptr (u64).
    let range_start: u64 =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_RANGE_START_ADDR, ptr) }
            .unwrap_or(0);
    // SAFETY: RANGE_SIZE is written as a size_t.
    let range_size: usize =
        unsafe { result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_RANGE_SIZE, ptr) }
            .unwrap_or(0);
    // SAFETY: IS_LEGACY_CUDA_IPC_CAPABLE is a boolean in an unsigned int (u64 is wider, zeroed).
    let ipc_capable: u64 = unsafe {
        result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE, ptr)
    }
    .unwrap_or(0);
    // SAFETY: ALLOWED_HANDLE_TYPES is a bitmask of at most 64 bits (u64, zeroed).
    let allowed_handle_types: u64 = unsafe {
        result::pointer_get_attribute(sys::CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES, ptr)
    }
    .unwrap_or(0);
    let (alloc_start, alloc_size) = if memory_type == MemoryType::Device {
        result::mem_get_address_range(ptr).unwrap_or((0, 0))
    } else {
        (0, 0)
    };
    let is_vmm = memory_type == MemoryType::Device
        && match result::mem_retain_allocation_handle(ptr) {
            Ok(h) => {
                // SAFETY: we own the reference just retained.
                let _ = unsafe { result::mem_release(h) };
                true
            }
            Err(_) => false,
        };
    Ok(PointerInfo {
        memory_type,
        device: device.and_then(|d| usize::try_from(d).ok()),
        context,
        buffer_id,
        range_start,
        range_size,
        alloc_start,
        alloc_size,
        is_vmm,
        ipc_capable: ipc_capable != 0,
        allowed_handle_types,
    })
}

// ---------------------------------------------------------------------------------------------
// Raw copies between addresses, for memory this crate does not own (PyTorch tensors, NIC
// buffers, IPC and VMM mappings).

/// Copies `len` bytes from `src` to `dst`, either side host or device (unified addressing picks
/// the direction). Synchronous, on the legacy default stream.
///
/// # Safety
/// `src..src+len` must be readable and `dst..dst+len` writable memory CUDA can reach (device
/// memory, pinned or pageable host memory), not overlapping, not used concurrently.
///
/// # Errors
/// A driver error.
pub unsafe fn copy(ctx: &Context, dst: CUdeviceptr, src: CUdeviceptr, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = ctx.enter()?;
    // SAFETY: the caller promises both ranges.
    unsafe { result::memcpy(dst, src, len) }
}

/// As [`copy`], queued on `stream`. Truly asynchronous only between device memory and pinned
/// host memory.
///
/// # Safety
/// As [`copy`], and both ranges must stay valid until the copy completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_async(
    stream: &Stream,
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises both ranges for the copy's lifetime; the stream is live.
    unsafe { result::memcpy_async(dst, src, len, stream.raw()) }
}

/// Host to device, synchronous.
///
/// # Safety
/// `src` must be `len` readable host bytes and `dst` `len` writable device bytes.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_htod(ctx: &Context, dst: CUdeviceptr, src: *const u8, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = ctx.enter()?;
    // SAFETY: the caller promises both ranges.
    unsafe { result::memcpy_htod(dst, src.cast(), len) }
}

/// Device to host, synchronous.
///
/// # Safety
/// `src` must be `len` readable device bytes and `dst` `len` writable host bytes.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_dtoh(ctx: &Context, dst: *mut u8, src: CUdeviceptr, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = ctx.enter()?;
    // SAFETY: the caller promises both ranges.
    unsafe { result::memcpy_dtoh(dst.cast(), src, len) }
}

/// Device to device (any devices), synchronous.
///
/// # Safety
/// Both must be `len`-byte device ranges, `dst` writable, not overlapping.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_dtod(
    ctx: &Context,
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = ctx.enter()?;
    // SAFETY: the caller promises both ranges.
    unsafe { result::memcpy_dtod(dst, src, len) }
}

/// Host to device, queued on `stream` (asynchronous when `src` is pinned).
///
/// # Safety
/// As [`copy_htod`], with both ranges valid until the copy completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_htod_async(
    stream: &Stream,
    dst: CUdeviceptr,
    src: *const u8,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises both ranges for the copy's lifetime.
    unsafe { result::memcpy_htod_async(dst, src.cast(), len, stream.raw()) }
}

/// Device to host, queued on `stream` (asynchronous when `dst` is pinned).
///
/// # Safety
/// As [`copy_dtoh`], with both ranges valid until the copy completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_dtoh_async(
    stream: &Stream,
    dst: *mut u8,
    src: CUdeviceptr,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises both ranges for the copy's lifetime.
    unsafe { result::memcpy_dtoh_async(dst.cast(), src, len, stream.raw()) }
}

/// Device to device, queued on `stream`.
///
/// # Safety
/// As [`copy_dtod`], with both ranges valid until the copy completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_dtod_async(
    stream: &Stream,
    dst: CUdeviceptr,
    src: CUdeviceptr,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises both ranges for the copy's lifetime.
    unsafe { result::memcpy_dtod_async(dst, src, len, stream.raw()) }
}

/// Copies between two devices' memory, queued on `stream`: over NVLink when peer access is
/// enabled between the contexts ([`Context::enable_peer_access`]), staged otherwise.
///
/// # Safety
/// `dst` must be `len` writable bytes of `dst_ctx`'s device, `src` `len` readable bytes of
/// `src_ctx`'s, both valid until the copy completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn copy_peer_async(
    stream: &Stream,
    dst: CUdeviceptr,
    dst_ctx: &Context,
    src: CUdeviceptr,
    src_ctx: &Context,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises both ranges for the copy's lifetime; contexts are live.
    unsafe { result::memcpy_peer_async(dst, dst_ctx.raw(), src, src_ctx.raw(), len, stream.raw()) }
}

/// Sets `len` bytes at `dst` to `value`, synchronously.
///
/// # Safety
/// `dst..dst+len` must be writable device (or mapped pinned) memory not used concurrently.
///
/// # Errors
/// A driver error.
pub unsafe fn memset_d8(ctx: &Context, dst: CUdeviceptr, value: u8, len: usize) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = ctx.enter()?;
    // SAFETY: the caller promises the range.
    unsafe { result::memset_d8(dst, value, len) }
}

/// As [`memset_d8`], queued on `stream`.
///
/// # Safety
/// As [`memset_d8`], with the range valid until the operation completes on `stream`.
///
/// # Errors
/// A driver error.
pub unsafe fn memset_d8_async(
    stream: &Stream,
    dst: CUdeviceptr,
    value: u8,
    len: usize,
) -> Result<()> {
    if len == 0 {
        return Ok(());
    }
    let _g = stream.context().enter()?;
    // SAFETY: the caller promises the range for the operation's lifetime.
    unsafe { result::memset_d8_async(dst, value, len, stream.raw()) }
}
