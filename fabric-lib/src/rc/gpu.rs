//! How GPU memory is registered on a verbs device: dma-buf or peer memory, in which order.

use std::os::fd::OwnedFd;

/// A way to register GPU memory on a verbs device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum GpuReg {
    /// Export the range as a dma-buf (CUDA) and register that (`ibv_reg_dmabuf_mr`): needs no
    /// out-of-tree kernel module.
    DmaBuf,
    /// Register the device address (`ibv_reg_mr`): needs the nvidia-peermem module.
    Peermem,
}

/// What decides how GPU memory is registered.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) struct GpuRegSupport {
    /// libibverbs exports `ibv_reg_dmabuf_mr` (rdma-core 34+).
    pub rdma_core_dmabuf: bool,
    /// The CUDA driver exports `cuMemGetHandleForAddressRange` and the device reports
    /// `CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED`.
    pub cuda_dmabuf: bool,
    /// Not turned off with `STOLON_VERBS_DMABUF=0`.
    pub dmabuf_allowed: bool,
}

/// The ways to try, in order: dma-buf first when both sides support it, then registration by
/// address. A way that fails at run time (the export or the kernel refuses) falls through to the
/// next; when all fail, the engine stages the region through host memory.
pub(crate) fn gpu_registration_order(s: GpuRegSupport) -> Vec<GpuReg> {
    let mut order = Vec::with_capacity(2);
    if s.rdma_core_dmabuf && s.cuda_dmabuf && s.dmabuf_allowed {
        order.push(GpuReg::DmaBuf);
    }
    order.push(GpuReg::Peermem);
    order
}

/// `STOLON_VERBS_DMABUF=0` turns dma-buf registration off (anything else, or unset, leaves it
/// on).
pub(super) fn dmabuf_allowed_by_env(value: Option<&str>) -> bool {
    !matches!(value.map(str::trim), Some("0" | "false" | "off" | "no"))
}

/// Exports GPU memory as dma-bufs: CUDA on hardware, a stand-in in tests.
pub(crate) trait GpuExporter: Send {
    /// Whether `device` can export dma-bufs at all.
    fn dmabuf_supported(&self, device: usize) -> bool;
    /// A dma-buf covering `ptr..ptr+len` of `device`, and the offset of `ptr` in it.
    fn export(&self, device: usize, ptr: u64, len: usize) -> Result<(OwnedFd, u64), String>;
}

/// [`GpuExporter`] through the CUDA driver (`stolon_cuda::export_dmabuf`).
pub(super) struct CudaExporter;

impl GpuExporter for CudaExporter {
    fn dmabuf_supported(&self, device: usize) -> bool {
        stolon_cuda::Device::get(device)
            .and_then(|d| d.dma_buf_supported())
            .unwrap_or(false)
    }

    fn export(&self, device: usize, ptr: u64, len: usize) -> Result<(OwnedFd, u64), String> {
        let ctx = stolon_cuda::Device::get(device)
            .and_then(|d| d.primary_context())
            .map_err(|e| e.to_string())?;
        let d = stolon_cuda::export_dmabuf(&ctx, ptr, len).map_err(|e| e.to_string())?;
        Ok((d.fd, d.offset))
    }
}
