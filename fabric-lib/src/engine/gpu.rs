//! GPU memory: registration (CUDA IPC, VMM shared over the engine's socket, FI_HMEM, staging)
//! and the NVLink mapping of peers' GPU regions.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use super::*;

/// What `register_gpu` learned about sharing a region as VMM memory.
#[derive(Default)]
pub(super) struct Share {
    /// The descriptor's part.
    pub(super) desc: Option<crate::desc::VmmShare>,
    /// What the socket serves.
    pub(super) served: Option<crate::vmm_share::SharedRegion>,
    /// Why the region cannot be written over NVLink, if it cannot.
    pub(super) note: Option<String>,
}

impl TransferEngine {
    /// Registers GPU memory (a device pointer of the engine's `cuda_device`, or any device with
    /// unified addressing). Over providers that cannot touch GPU memory it is moved through
    /// pinned staging buffers; peers learn of a write only after it sits in GPU memory.
    ///
    /// # Safety
    /// As for [`Self::register`], for device memory.
    pub unsafe fn register_gpu(
        &self,
        ptr: u64,
        len: u64,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let Some(dev) = self.config.cuda_device else {
            return Err(Error::Config(
                "GPU memory needs an engine opened with cuda_device".into(),
            ));
        };
        let ctx = stolon_cuda::Device::get(dev)
            .and_then(|d| d.primary_context())
            .map_err(crate::staging::cuda_err)?;
        let info = stolon_cuda::pointer_info(&ctx, ptr).map_err(crate::staging::cuda_err)?;
        if info.memory_type != stolon_cuda::MemoryType::Device {
            return Err(Error::InvalidArgument(format!(
                "{ptr:#x} is not device memory ({:?})",
                info.memory_type
            )));
        }
        if ptr
            .checked_add(len)
            .map_or(true, |end| end > info.range_start + info.range_size as u64)
        {
            return Err(Error::OutOfBounds(format!(
                "{len} bytes at {ptr:#x} run past the allocation [{:#x}, +{})",
                info.range_start, info.range_size
            )));
        }
        let device = info.device.unwrap_or(dev) as u32;
        // CUDA IPC (NVLink between processes) where the allocation allows it.
        let (ipc_handle, ipc_offset) = match stolon_cuda::IpcMemHandle::export(&ctx, ptr) {
            Ok(x) => (x.handle.as_bytes().to_vec(), x.offset as u64),
            Err(_) => (Vec::new(), 0),
        };
        // Otherwise VMM memory exported as file descriptors over the engine's socket.
        let mut share = Share::default();
        if ipc_handle.is_empty() {
            match self.plan_vmm_share(&ctx, &info, ptr, len) {
                Ok((desc, served)) => {
                    share.desc = Some(desc);
                    share.served = Some(served);
                }
                Err(why) => share.note = Some(why),
            }
        }
        if self.attrs.iter().all(|a| a.hmem) {
            // Every provider of the group registers GPU memory itself: no staging.
            let id = self.next_region.fetch_add(1, Ordering::Relaxed);
            let len_ = len as usize;
            let registered = self.ask_worker(|reply| Request::RegisterHmem {
                id,
                ptr,
                len: len_,
                device: device as usize,
                reply,
            })?;
            // A provider may grant FI_HMEM and still refuse CUDA memory (libfabric built without
            // CUDA, seen with shm on 1.17): then the region takes the staging path.
            if let Ok(keys) = registered {
                let gpu = crate::desc::GpuDesc {
                    device,
                    ipc_handle,
                    ipc_offset,
                    direct: true,
                    vmm: share.desc.clone(),
                };
                let mem = RegionMem::GpuDirect(device);
                return Ok(self.new_region(
                    id,
                    ptr as usize,
                    len,
                    keys,
                    mem,
                    Some(gpu),
                    Some(share),
                    owner,
                ));
            }
        }
        let gpu = crate::desc::GpuDesc {
            device,
            ipc_handle,
            ipc_offset,
            direct: false,
            vmm: share.desc.clone(),
        };
        // SAFETY: forwarded contract.
        unsafe {
            self.register_staged(
                crate::staging::Mem::Gpu(ptr),
                len,
                RegionMem::Gpu(device),
                gpu,
                Some(share),
                owner,
            )
        }
    }

    /// Registers host memory that peers write through the staging protocol, exactly as they
    /// would write GPU memory (a test hook for machines without a GPU).
    ///
    /// # Safety
    /// As for [`Self::register`].
    pub unsafe fn register_staged_host(
        &self,
        ptr: usize,
        len: u64,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let gpu = crate::desc::GpuDesc {
            device: STAGED_HOST_DEVICE,
            ipc_handle: Vec::new(),
            ipc_offset: 0,
            direct: false,
            vmm: None,
        };
        // SAFETY: forwarded contract.
        unsafe {
            self.register_staged(
                crate::staging::Mem::Host(ptr),
                len,
                RegionMem::StagedHost,
                gpu,
                None,
                owner,
            )
        }
    }

    /// # Safety
    /// As for [`Self::register`].
    pub(super) unsafe fn register_staged(
        &self,
        base: crate::staging::Mem,
        len: u64,
        mem: RegionMem,
        gpu: crate::desc::GpuDesc,
        share: Option<Share>,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let ptr = match base {
            crate::staging::Mem::Host(p) => p,
            crate::staging::Mem::Gpu(p) => p as usize,
        };
        if ptr == 0 && len > 0 {
            return Err(Error::InvalidArgument("null pointer".into()));
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let len_ = len as usize;
        self.ask_worker(|reply| Request::RegisterStaged {
            id,
            base,
            len: len_,
            reply,
        })??;
        let keys = vec![0; self.addr.domains.len()];
        Ok(self.new_region(id, ptr, len, keys, mem, Some(gpu), share, owner))
    }

    /// Describes a peer's GPU region to the worker (once) so NVLink copies can map it. VMM
    /// memory is fetched from the owner's socket and mapped here, on the caller's thread, so
    /// the worker never waits on a peer; a dead or silent owner is this write's error.
    pub(super) fn describe_remote_gpu(
        &self,
        peer: u32,
        dst: &MemDesc,
        map: NvlinkMap,
    ) -> Result<()> {
        let mut seen = self.remote_gpu.lock().unwrap();
        if seen.contains(&(peer, dst.region_id)) {
            return Ok(());
        }
        let g = dst.gpu.as_ref().expect("NVLink path has a GPU descriptor");
        let target = match map {
            NvlinkMap::Ipc => crate::worker::RemoteTarget::Ipc {
                handle: g.ipc_handle.clone(),
                offset: g.ipc_offset,
            },
            NvlinkMap::Vmm => self.map_remote_vmm(dst)?,
        };
        self.send_req(Request::AddRemoteGpu {
            peer,
            region: dst.region_id,
            target,
            len: dst.len,
        })?;
        seen.insert((peer, dst.region_id));
        Ok(())
    }

    /// Fetches a peer's VMM region over its socket and maps it into this engine's device.
    pub(super) fn map_remote_vmm(&self, dst: &MemDesc) -> Result<crate::worker::RemoteTarget> {
        let share = dst
            .gpu
            .as_ref()
            .and_then(|g| g.vmm.as_ref())
            .expect("VMM route has a VMM share");
        let socket = &dst
            .owner
            .nvlink
            .as_ref()
            .expect("NVLink route has the owner's address")
            .vmm_socket;
        let dev = self
            .config
            .cuda_device
            .ok_or_else(|| Error::Cuda("NVLink needs an engine with cuda_device".into()))?;
        let ctx = stolon_cuda::Device::get(dev)
            .and_then(|d| d.primary_context())
            .map_err(crate::staging::cuda_err)?;
        let span = usize::try_from(share.span)
            .map_err(|_| Error::InvalidArgument(format!("VMM span {}", share.span)))?;
        let mut import = None;
        let lease = crate::vmm_share::fetch(
            socket,
            dst.region_id,
            share.token,
            self.config.timeout,
            |i, size, fd| {
                if i == 0 {
                    import = Some(
                        stolon_cuda::VmmImport::reserve(&ctx, span)
                            .map_err(crate::staging::cuda_err)?,
                    );
                }
                let size = usize::try_from(size)
                    .map_err(|_| Error::InvalidArgument(format!("VMM allocation of {size}")))?;
                import
                    .as_mut()
                    .expect("reserved at the first allocation")
                    .map_next(std::os::fd::AsFd::as_fd(&fd), size)
                    .map_err(crate::staging::cuda_err)
            },
        )?;
        let l = &lease.layout;
        if l.sizes.len() as u64 != share.chunks
            || l.offset != share.offset
            || l.span() != share.span
        {
            return Err(Error::TransferFailed(format!(
                "the owner's VMM region {} has {} allocations at offset {} over {} bytes; its \
                 descriptor says {} at {} over {}",
                dst.region_id,
                l.sizes.len(),
                l.offset,
                l.span(),
                share.chunks,
                share.offset,
                share.span
            )));
        }
        let mapping = import
            .expect("at least one allocation")
            .finish()
            .map_err(crate::staging::cuda_err)?;
        Ok(crate::worker::RemoteTarget::Vmm {
            mapping: Some(mapping),
            lease,
            offset: share.offset,
        })
    }

    /// Decides whether a GPU region is shared as VMM memory over the engine's socket: the
    /// descriptor's part and what the server needs, or why not.
    pub(super) fn plan_vmm_share(
        &self,
        ctx: &Arc<stolon_cuda::Context>,
        info: &stolon_cuda::PointerInfo,
        ptr: u64,
        len: u64,
    ) -> std::result::Result<(crate::desc::VmmShare, crate::vmm_share::SharedRegion), String> {
        if !info.is_vmm {
            return Err("the memory has no CUDA IPC handle and is not VMM memory".into());
        }
        if self.vmm_server.is_none() {
            return Err(
                "this engine serves no VMM socket (NVLink off, or the socket could \
                        not be bound)"
                    .into(),
            );
        }
        if len == 0 {
            return Err("an empty region is not shared".into());
        }
        let (chunks, offset) = stolon_cuda::vmm::layout(ctx, ptr, len as usize)
            .map_err(|e| format!("cannot walk its VMM mappings: {e}"))?;
        if let Some(c) = chunks.iter().find(|c| !c.exportable_as_fd()) {
            return Err(format!(
                "the VMM allocation mapped at {:#x} was not created with \
                 CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (requested handle types {:#x}), so it \
                 cannot be exported",
                c.base, c.handle_types
            ));
        }
        if chunks.len() as u64 > crate::desc::MAX_VMM_CHUNKS {
            return Err(format!(
                "{} VMM allocations is too many to share",
                chunks.len()
            ));
        }
        // One real export now, so a driver that refuses is found here, not by the writer.
        stolon_cuda::export_fd(ctx, chunks[0].base)
            .map_err(|e| format!("exporting its VMM allocation failed: {e}"))?;
        let sizes: Vec<u64> = chunks.iter().map(|c| c.size as u64).collect();
        let bases: Vec<u64> = chunks.iter().map(|c| c.base).collect();
        let token = crate::vmm_share::random_token();
        let desc = crate::desc::VmmShare {
            token,
            chunks: sizes.len() as u64,
            offset: offset as u64,
            span: sizes.iter().sum(),
        };
        let ctx = ctx.clone();
        let served = crate::vmm_share::SharedRegion {
            token,
            layout: crate::vmm_share::Layout {
                sizes,
                offset: offset as u64,
            },
            exporter: Box::new(move |i| {
                stolon_cuda::export_fd(&ctx, bases[i]).map_err(crate::staging::cuda_err)
            }),
        };
        Ok((desc, served))
    }
}
