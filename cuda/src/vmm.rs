//! Sharing CUDA VMM memory (`cuMemCreate` + `cuMemMap`, as PyTorch's `expandable_segments`
//! allocates) with another process on the same host, through POSIX file descriptors.
//!
//! The owner exports the physical allocation behind an address as a file descriptor
//! ([`export_fd`] / [`export`]), passes it to the peer over a Unix socket (`SCM_RIGHTS`; a plain
//! number means nothing in another process), and the peer maps it into its own address space
//! ([`import_fd`]). The allocation must have been created with
//! `CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR` among its requested handle types ([`VmmAllocation`]
//! does this; PyTorch does for expandable segments where it supports IPC of them).
//!
//! One VMM address range may be backed by several physical allocations (an expandable segment
//! grows by mapping one more); an export covers the one allocation mapped at the address given.

use std::os::fd::{BorrowedFd, OwnedFd};
use std::sync::Arc;

use crate::device::{Context, Device};
use crate::error::{Error, Result};
use crate::result;
use crate::sys::{self, CUdeviceptr, CUmemGenericAllocationHandle};

fn device_prop(device: &Device) -> sys::CUmemAllocationProp {
    sys::CUmemAllocationProp {
        type_: sys::CU_MEM_ALLOCATION_TYPE_PINNED,
        requestedHandleTypes: sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR,
        location: sys::CUmemLocation {
            type_: sys::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device.raw(),
        },
        ..Default::default()
    }
}

fn rw_access(device: &Device) -> sys::CUmemAccessDesc {
    sys::CUmemAccessDesc {
        location: sys::CUmemLocation {
            type_: sys::CU_MEM_LOCATION_TYPE_DEVICE,
            id: device.raw(),
        },
        flags: sys::CU_MEM_ACCESS_FLAGS_PROT_READWRITE,
    }
}

/// The size multiple (and alignment) of VMM allocations on `device` (2 MiB on current GPUs).
///
/// # Errors
/// A driver error, e.g. on a device without VMM support.
pub fn allocation_granularity(device: &Device) -> Result<usize> {
    result::mem_get_allocation_granularity(
        &device_prop(device),
        sys::CU_MEM_ALLOC_GRANULARITY_MINIMUM,
    )
}

/// Exports the VMM allocation mapped at `ptr` (any address inside it) as a POSIX file
/// descriptor, owned by the caller.
///
/// # Errors
/// A driver error: for memory that is not from the VMM API, or whose allocation did not request
/// POSIX file descriptor handles.
pub fn export_fd(ctx: &Context, ptr: CUdeviceptr) -> Result<OwnedFd> {
    let _g = ctx.enter()?;
    let h = result::mem_retain_allocation_handle(ptr)?;
    // SAFETY: h is live: we hold the reference just retained.
    let fd = unsafe { result::mem_export_to_fd(h) };
    // SAFETY: we give up the reference retained above; the export holds its own.
    let _ = unsafe { result::mem_release(h) };
    fd
}

/// An exported VMM allocation: its descriptor, where it is mapped in the exporting process, and
/// the offset of the address asked for. The peer imports `fd` with `alloc_size` and adds
/// `offset`.
#[derive(Debug)]
pub struct VmmExport {
    /// The allocation as a POSIX file descriptor.
    pub fd: OwnedFd,
    /// Start of the mapped region holding the address, in the exporting process.
    pub alloc_base: CUdeviceptr,
    /// Size of that mapped region: the size to import.
    pub alloc_size: usize,
    /// `ptr - alloc_base`.
    pub offset: usize,
}

/// [`export_fd`], plus the mapped region around `ptr` (`cuMemGetAddressRange`), which tells the
/// peer how much to map.
///
/// # Errors
/// As [`export_fd`].
pub fn export(ctx: &Context, ptr: CUdeviceptr) -> Result<VmmExport> {
    let fd = export_fd(ctx, ptr)?;
    let _g = ctx.enter()?;
    let (alloc_base, alloc_size) = result::mem_get_address_range(ptr)?;
    Ok(VmmExport {
        fd,
        alloc_base,
        alloc_size,
        offset: (ptr - alloc_base) as usize,
    })
}

/// Maps an allocation exported by another process (or this one) into `ctx`'s address space,
/// readable and writable by `ctx`'s device. `size` is the allocation's size (a multiple of the
/// granularity). The descriptor stays the caller's; it may be closed once this returns.
///
/// # Errors
/// [`Error::InvalidArgument`] for a size that is 0 or not a multiple of the granularity; a
/// driver error for a descriptor that is not an exported CUDA allocation.
pub fn import_fd(ctx: &Arc<Context>, fd: BorrowedFd<'_>, size: usize) -> Result<MappedVmm> {
    if size == 0 {
        return Err(Error::InvalidArgument(
            "import_fd: size must be non-zero".to_string(),
        ));
    }
    let _g = ctx.enter()?;
    let h = result::mem_import_from_fd(fd)?;
    // The mapping keeps the physical memory alive, so our handle reference goes either way.
    let mapped = map_handle(ctx, h, size);
    // SAFETY: we own the reference the import gave us.
    let _ = unsafe { result::mem_release(h) };
    mapped
}

fn map_handle(
    ctx: &Arc<Context>,
    h: CUmemGenericAllocationHandle,
    size: usize,
) -> Result<MappedVmm> {
    // SAFETY: h is live (the caller holds a reference).
    let prop = unsafe { result::mem_get_allocation_properties(h)? };
    let gran =
        result::mem_get_allocation_granularity(&prop, sys::CU_MEM_ALLOC_GRANULARITY_MINIMUM)?;
    if gran == 0 || size % gran != 0 {
        return Err(Error::InvalidArgument(format!(
            "import_fd: size {size} is not a multiple of the allocation granularity {gran}"
        )));
    }
    let ptr = result::mem_address_reserve(size, gran)?;
    // SAFETY: ptr..ptr+size is our fresh, empty reservation; h is live and, the caller says, at
    // least `size` bytes (the driver rejects a larger size).
    if let Err(e) = unsafe { result::mem_map(ptr, size, 0, h) } {
        // SAFETY: the reservation is ours and empty.
        let _ = unsafe { result::mem_address_free(ptr, size) };
        return Err(e);
    }
    let m = MappedVmm {
        ctx: ctx.clone(),
        ptr,
        size,
        pieces: vec![(0, size)],
    };
    m.grant_access(&ctx.device())?;
    Ok(m)
}

/// An imported VMM allocation mapped into this process; unmapped and its address range freed on
/// drop.
#[derive(Debug)]
pub struct MappedVmm {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    size: usize,
    /// (offset, size) of each mapping inside the range; each is unmapped on its own.
    pieces: Vec<(usize, usize)>,
}

impl MappedVmm {
    /// The address of the mapping in this process.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Size of the mapping in bytes.
    pub fn len(&self) -> usize {
        self.size
    }

    /// Always false: a mapping has at least one byte.
    pub fn is_empty(&self) -> bool {
        self.size == 0
    }

    /// Lets `device` read and write the mapping too (e.g. the owning GPU, or a third one).
    ///
    /// # Errors
    /// A driver error, e.g. when `device` cannot reach the memory's device.
    pub fn grant_access(&self, device: &Device) -> Result<()> {
        let _g = self.ctx.enter()?;
        // One call per mapping: a range of several mappings is not promised to work everywhere.
        for &(off, len) in &self.pieces {
            // SAFETY: the range is one of our mappings.
            unsafe { result::mem_set_access(self.ptr + off as u64, len, &[rw_access(device)])? };
        }
        Ok(())
    }
}

impl Drop for MappedVmm {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: the mappings and the reservation are ours, undone once; work that used
            // them was queued through unsafe calls whose callers kept the mapping alive until
            // done.
            unsafe {
                for &(off, len) in &self.pieces {
                    let _ = result::mem_unmap(self.ptr + off as u64, len);
                }
                let _ = result::mem_address_free(self.ptr, self.size);
            }
        }
    }
}

/// One mapping (one physical allocation, or the part of it mapped) under a VMM address range.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct VmmChunk {
    /// Where the mapping starts in this process.
    pub base: CUdeviceptr,
    /// Its size: what a peer imports and maps.
    pub size: usize,
    /// `requestedHandleTypes` of the allocation: it can be exported as a POSIX file descriptor
    /// only with [`sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR`] among them.
    pub handle_types: u64,
}

impl VmmChunk {
    /// Whether [`export_fd`] works for this allocation.
    pub fn exportable_as_fd(&self) -> bool {
        self.handle_types & sys::CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR as u64 != 0
    }
}

/// The mappings covering `[ptr, ptr + len)` of VMM memory, in address order (back to back), and
/// the offset of `ptr` in the first. An expandable segment grows by one mapping at a time, so a
/// tensor in it may span several.
///
/// # Errors
/// [`Error::InvalidArgument`] for 0 bytes; a driver error where some byte of the range is not
/// VMM memory (`cuMemRetainAllocationHandle` fails) or is not mapped.
pub fn layout(ctx: &Context, ptr: CUdeviceptr, len: usize) -> Result<(Vec<VmmChunk>, usize)> {
    if len == 0 {
        return Err(Error::InvalidArgument("vmm::layout of 0 bytes".into()));
    }
    let end = ptr
        .checked_add(len as u64)
        .ok_or_else(|| Error::InvalidArgument("vmm::layout: range overflows".into()))?;
    let _g = ctx.enter()?;
    let mut chunks = Vec::new();
    let mut at = ptr;
    while at < end {
        let h = result::mem_retain_allocation_handle(at)?;
        // SAFETY: h is live: we hold the reference just retained.
        let prop = unsafe { result::mem_get_allocation_properties(h) };
        // SAFETY: we give up the reference retained above.
        let _ = unsafe { result::mem_release(h) };
        let prop = prop?;
        let (base, size) = result::mem_get_address_range(at)?;
        if size == 0 || base > at || base + size as u64 <= at {
            return Err(Error::InvalidArgument(format!(
                "vmm::layout: the driver placed {at:#x} in [{base:#x}, +{size})"
            )));
        }
        chunks.push(VmmChunk {
            base,
            size,
            handle_types: prop.requestedHandleTypes as u64,
        });
        at = base + size as u64;
    }
    let offset = (ptr - chunks[0].base) as usize;
    Ok((chunks, offset))
}

/// Builds one contiguous mapping in this process out of allocations exported by another (the
/// chunks of a [`layout`], in order): reserve the whole span, map each descriptor after the
/// previous one, then grant this context's device access. Undone on drop if not finished.
#[derive(Debug)]
pub struct VmmImport {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    size: usize,
    /// Bytes mapped so far, from the start.
    filled: usize,
    pieces: Vec<(usize, usize)>,
}

impl VmmImport {
    /// Reserves `span` bytes (a multiple of the device's VMM granularity).
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a span that is 0 or not a multiple of the granularity; a
    /// driver error.
    pub fn reserve(ctx: &Arc<Context>, span: usize) -> Result<VmmImport> {
        let gran = allocation_granularity(&ctx.device())?;
        if span == 0 || gran == 0 || span % gran != 0 {
            return Err(Error::InvalidArgument(format!(
                "VmmImport: span {span} is not a non-zero multiple of the granularity {gran}"
            )));
        }
        let _g = ctx.enter()?;
        let ptr = result::mem_address_reserve(span, gran)?;
        Ok(VmmImport {
            ctx: ctx.clone(),
            ptr,
            size: span,
            filled: 0,
            pieces: Vec::new(),
        })
    }

    /// Imports `fd` (an allocation of at least `size` bytes) and maps its first `size` bytes
    /// right after what is mapped so far. The descriptor may be closed once this returns.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when `size` is 0 or overruns the span; a driver error for a
    /// descriptor that is not an exported allocation, or a size it does not allow.
    pub fn map_next(&mut self, fd: BorrowedFd<'_>, size: usize) -> Result<()> {
        if size == 0 || size > self.size - self.filled {
            return Err(Error::InvalidArgument(format!(
                "VmmImport: {size} more bytes after {} of a {}-byte span",
                self.filled, self.size
            )));
        }
        let _g = self.ctx.enter()?;
        let h = result::mem_import_from_fd(fd)?;
        let at = self.ptr + self.filled as u64;
        // SAFETY: at..at+size lies in our reservation and nothing is mapped there yet (pieces
        // are laid back to back from the start); h is live (we hold the import's reference).
        let mapped = unsafe { result::mem_map(at, size, 0, h) };
        // SAFETY: the mapping (if made) keeps the memory; our reference goes either way.
        let _ = unsafe { result::mem_release(h) };
        mapped?;
        self.pieces.push((self.filled, size));
        self.filled += size;
        Ok(())
    }

    /// Checks that the whole span is mapped and makes it readable and writable by this
    /// context's device.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] when part of the span is unmapped; a driver error.
    pub fn finish(mut self) -> Result<MappedVmm> {
        if self.filled != self.size {
            return Err(Error::InvalidArgument(format!(
                "VmmImport: {} of {} bytes mapped",
                self.filled, self.size
            )));
        }
        let m = MappedVmm {
            ctx: self.ctx.clone(),
            ptr: self.ptr,
            size: self.size,
            pieces: std::mem::take(&mut self.pieces),
        };
        // The MappedVmm owns the range now.
        self.size = 0;
        m.grant_access(&m.ctx.device())?;
        Ok(m)
    }
}

impl Drop for VmmImport {
    fn drop(&mut self) {
        if self.size == 0 {
            return;
        }
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: the pieces and the reservation are ours and unused (nothing can address
            // an unfinished import), undone once.
            unsafe {
                for &(off, len) in &self.pieces {
                    let _ = result::mem_unmap(self.ptr + off as u64, len);
                }
                let _ = result::mem_address_free(self.ptr, self.size);
            }
        }
    }
}

/// Device memory from the VMM API, exportable as POSIX file descriptors: one address range
/// backed by one or more physical allocations ("chunks") mapped back to back, the way PyTorch's
/// expandable segments are. Readable and writable by its own device; all undone on drop.
#[derive(Debug)]
pub struct VmmAllocation {
    ctx: Arc<Context>,
    ptr: CUdeviceptr,
    reserved: usize,
    chunk: usize,
    handles: Vec<CUmemGenericAllocationHandle>,
}

impl VmmAllocation {
    /// `size` bytes (rounded up to the granularity) as one physical allocation.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for 0 bytes; a driver error (no VMM support, out of memory).
    pub fn new(ctx: &Arc<Context>, size: usize) -> Result<VmmAllocation> {
        if size == 0 {
            return Err(Error::InvalidArgument(
                "VmmAllocation: size must be non-zero".into(),
            ));
        }
        let gran = allocation_granularity(&ctx.device())?;
        Self::chunked(ctx, size.div_ceil(gran) * gran, 1)
    }

    /// `chunks` physical allocations of `chunk_size` bytes each (a multiple of the granularity),
    /// mapped back to back in one address range.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad size or count; a driver error.
    pub fn chunked(ctx: &Arc<Context>, chunk_size: usize, chunks: usize) -> Result<VmmAllocation> {
        let device = ctx.device();
        let gran = allocation_granularity(&device)?;
        if chunks == 0 || chunk_size == 0 || chunk_size % gran != 0 {
            return Err(Error::InvalidArgument(format!(
                "VmmAllocation: {chunks} chunks of {chunk_size} bytes; chunks must be a non-zero \
                 multiple of the {gran}-byte granularity"
            )));
        }
        let total = chunk_size
            .checked_mul(chunks)
            .ok_or_else(|| Error::InvalidArgument("VmmAllocation: size overflows".to_string()))?;
        let _g = ctx.enter()?;
        let ptr = result::mem_address_reserve(total, gran)?;
        // From here on, Drop undoes whatever has been done (it unmaps only mapped chunks).
        let mut a = VmmAllocation {
            ctx: ctx.clone(),
            ptr,
            reserved: total,
            chunk: chunk_size,
            handles: Vec::with_capacity(chunks),
        };
        let prop = device_prop(&device);
        for i in 0..chunks {
            let h = result::mem_create(chunk_size, &prop)?;
            let at = ptr + (i * chunk_size) as u64;
            // SAFETY: `at..at+chunk` lies in our reservation and nothing is mapped there yet; h is
            // a fresh allocation of exactly chunk_size bytes.
            if let Err(e) = unsafe { result::mem_map(at, chunk_size, 0, h) } {
                // SAFETY: h is ours and unmapped.
                let _ = unsafe { result::mem_release(h) };
                return Err(e);
            }
            a.handles.push(h);
        }
        // SAFETY: the whole range is mapped by us.
        unsafe { result::mem_set_access(ptr, total, &[rw_access(&device)])? };
        Ok(a)
    }

    /// The start of the address range.
    pub fn ptr(&self) -> CUdeviceptr {
        self.ptr
    }

    /// Total size in bytes.
    pub fn len(&self) -> usize {
        self.chunk * self.handles.len()
    }

    /// Always false.
    pub fn is_empty(&self) -> bool {
        self.handles.is_empty()
    }

    /// Size of each physical allocation.
    pub fn chunk_size(&self) -> usize {
        self.chunk
    }

    /// Number of physical allocations.
    pub fn chunks(&self) -> usize {
        self.handles.len()
    }

    /// The context the memory belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Exports chunk `i` as a POSIX file descriptor.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a chunk out of range; a driver error.
    pub fn export_chunk_fd(&self, i: usize) -> Result<OwnedFd> {
        let Some(&h) = self.handles.get(i) else {
            return Err(Error::InvalidArgument(format!(
                "chunk {i} of {}",
                self.handles.len()
            )));
        };
        let _g = self.ctx.enter()?;
        // SAFETY: h is live: we hold it until drop.
        unsafe { result::mem_export_to_fd(h) }
    }
}

impl Drop for VmmAllocation {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            for (i, &h) in self.handles.iter().enumerate() {
                // SAFETY: chunk i is mapped by us with handle h; both undone once.
                unsafe {
                    let _ = result::mem_unmap(self.ptr + (i * self.chunk) as u64, self.chunk);
                    let _ = result::mem_release(h);
                }
            }
            // SAFETY: the reservation is ours and now empty.
            let _ = unsafe { result::mem_address_free(self.ptr, self.reserved) };
        }
    }
}
