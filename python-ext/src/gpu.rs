//! Counters and flags shared with GPU work: `HostCounter`, `GpuFlag`.

use std::sync::Arc;

use pyo3::prelude::*;

use crate::errors::{invalid, to_py, Int};

enum CounterMem {
    Host(Box<std::sync::atomic::AtomicU64>),
    Cuda(stolon_cuda::HostCounter),
}

/// A 64-bit counter in host memory that the engine's worker watches, or that the engine sets
/// when immediates arrive. With `device=N` it lives in pinned, GPU-mapped memory: GPU code
/// writes it (`write_from_stream`, a kernel through `device_ptr`) or waits on it
/// (`wait_on_stream`, a kernel polling `device_ptr`).
#[pyclass(module = "stolon._native", frozen)]
pub(crate) struct HostCounter {
    mem: Arc<CounterMem>,
    pub(crate) device: Option<usize>,
}

impl HostCounter {
    fn atomic(&self) -> &std::sync::atomic::AtomicU64 {
        match &*self.mem {
            CounterMem::Host(a) => a,
            // SAFETY: the host address of a HostCounter is an aligned u64 that lives as long as
            // the counter, accessed atomically from the CPU.
            CounterMem::Cuda(c) => unsafe { std::sync::atomic::AtomicU64::from_ptr(c.host_ptr()) },
        }
    }
    pub(crate) fn ptr(&self) -> usize {
        self.atomic() as *const _ as usize
    }
    pub(crate) fn owner(&self) -> Box<dyn std::any::Any + Send + Sync> {
        Box::new(self.mem.clone())
    }
    fn cuda(&self) -> PyResult<&stolon_cuda::HostCounter> {
        match &*self.mem {
            CounterMem::Cuda(c) => Ok(c),
            CounterMem::Host(_) => Err(invalid(
                "this counter is in plain host memory; create it with device=N for GPU use",
            )),
        }
    }
    fn stream(&self, stream: usize) -> PyResult<stolon_cuda::Stream> {
        let c = self.cuda()?;
        // SAFETY: the caller passes a live CUstream of this counter's device's primary context
        // (e.g. torch.cuda.current_stream().cuda_stream) or 0; it outlives this call.
        Ok(unsafe { stolon_cuda::Stream::from_handle(c.context(), stream) })
    }
}

// SAFETY: the counter memory is only accessed atomically and its owner is Send + Sync.
unsafe impl Send for CounterMem {}
// SAFETY: as above.
unsafe impl Sync for CounterMem {}

#[pymethods]
impl HostCounter {
    #[new]
    #[pyo3(signature = (device=None, value=Int(0)), text_signature = "(device=None, value=0)")]
    fn new(device: Option<Int<usize>>, value: Int<u64>) -> PyResult<Self> {
        let device = device.map(|i| i.0);
        let value = value.0;
        let mem = match device {
            None => CounterMem::Host(Box::new(std::sync::atomic::AtomicU64::new(value))),
            Some(d) => {
                let dev = stolon_cuda::Device::get(d).map_err(to_py)?;
                let ctx = dev.primary_context().map_err(to_py)?;
                let c = stolon_cuda::HostCounter::new(&ctx).map_err(to_py)?;
                c.store(value);
                CounterMem::Cuda(c)
            }
        };
        Ok(HostCounter {
            mem: Arc::new(mem),
            device,
        })
    }
    /// The current value.
    #[getter]
    fn value(&self) -> u64 {
        self.atomic().load(std::sync::atomic::Ordering::Acquire)
    }
    /// Sets the value (from the CPU).
    fn set(&self, value: Int<u64>) {
        let value = value.0;
        self.atomic()
            .store(value, std::sync::atomic::Ordering::Release)
    }
    /// Adds `delta` (from the CPU); returns the new value.
    #[pyo3(signature = (delta=Int(1)), text_signature = "($self, delta=1)")]
    fn add(&self, delta: Int<u64>) -> u64 {
        let delta = delta.0;
        self.atomic()
            .fetch_add(delta, std::sync::atomic::Ordering::AcqRel)
            + delta
    }
    /// CPU address of the value.
    #[getter]
    fn host_ptr(&self) -> usize {
        self.ptr()
    }
    /// Device address of the value (GPU counters only).
    #[getter]
    fn device_ptr(&self) -> PyResult<u64> {
        Ok(self.cuda()?.device_ptr())
    }
    /// The CUDA device ordinal, or None for a plain host counter.
    #[getter]
    fn device(&self) -> Option<usize> {
        self.device
    }
    /// Enqueues "set the counter to `value`" on a CUDA stream (`cuStreamWriteValue64`; works
    /// inside CUDA-graph capture). `stream` is a raw CUstream, e.g.
    /// `torch.cuda.current_stream().cuda_stream`.
    #[pyo3(signature = (value, stream=Int(0)), text_signature = "($self, value, stream=0)")]
    fn write_from_stream(&self, value: Int<u64>, stream: Int<usize>) -> PyResult<()> {
        let value = value.0;
        let stream = stream.0;
        let s = self.stream(stream)?;
        // SAFETY: the device address belongs to this counter, alive as long as self; the write
        // is queued, and the counter memory is kept by the engine/watch owners when shared.
        unsafe { stolon_cuda::stream_write_value64(&s, self.cuda()?.device_ptr(), value) }
            .map_err(to_py)
    }
    /// Makes later work on `stream` wait until the counter is >= `value`
    /// (`cuStreamWaitValue64`).
    #[pyo3(signature = (value, stream=Int(0)), text_signature = "($self, value, stream=0)")]
    fn wait_on_stream(&self, value: Int<u64>, stream: Int<usize>) -> PyResult<()> {
        let value = value.0;
        let stream = stream.0;
        let c = self.cuda()?;
        wait_value_on_stream(c.context(), stream, c.device_ptr(), value)
    }
    fn __repr__(&self) -> String {
        format!(
            "HostCounter(value={}, device={:?})",
            self.value(),
            self.device
        )
    }
}

/// Makes later work on the raw CUstream `stream` (of `ctx`; 0 for the legacy stream) wait until
/// the 64-bit value at `dptr` is >= `value` (`cuStreamWaitValue64`).
fn wait_value_on_stream(
    ctx: &Arc<stolon_cuda::Context>,
    stream: usize,
    dptr: u64,
    value: u64,
) -> PyResult<()> {
    // SAFETY: the caller passes a live CUstream of this context (e.g.
    // torch.cuda.current_stream().cuda_stream) or 0; it outlives this call.
    let s = unsafe { stolon_cuda::Stream::from_handle(ctx, stream) };
    // SAFETY: dptr is a counter or flag its owner keeps alive; the wait is only queued.
    unsafe {
        stolon_cuda::stream_wait_value64(
            &s,
            dptr,
            value,
            stolon_cuda::WaitCondition::GreaterOrEqual,
        )
    }
    .map_err(to_py)
}

/// A 64-bit flag in GPU memory that the CPU sets through GDRCopy (a BAR mapping), for GPU work
/// that waits on it: a kernel polling `device_ptr` reads its own memory instead of host memory
/// across PCIe. Needs `libgdrapi` and the `gdrdrv` module; without them the constructor raises
/// `CudaUnavailableError` saying why, and a `HostCounter(device=N)` does the same job. Starts at 0.
#[pyclass(module = "stolon._native", frozen)]
pub(crate) struct GpuFlag {
    pub(crate) flag: Arc<stolon_cuda::GpuFlag>,
    pub(crate) ctx: Arc<stolon_cuda::Context>,
    pub(crate) device: usize,
}

#[pymethods]
impl GpuFlag {
    #[new]
    fn new(device: Int<usize>) -> PyResult<Self> {
        let device = device.0;
        let dev = stolon_cuda::Device::get(device).map_err(to_py)?;
        let ctx = dev.primary_context().map_err(to_py)?;
        // Without GDRCopy: `Unsupported`, a CudaUnavailableError.
        let flag = stolon_cuda::GpuFlag::new(&ctx).map_err(to_py)?;
        Ok(GpuFlag {
            flag: Arc::new(flag),
            ctx,
            device,
        })
    }
    /// Whether GDRCopy can be used here (the library loads and `gdr_open` succeeds).
    #[staticmethod]
    fn available() -> bool {
        stolon_cuda::Gdr::get().is_ok()
    }
    /// The current value (an uncached read through the mapping; not for tight polling).
    #[getter]
    fn value(&self) -> u64 {
        self.flag.load()
    }
    /// Sets the value from the CPU (store, then a fence that drains write combining).
    fn set(&self, value: Int<u64>) {
        let value = value.0;
        self.flag.store(value)
    }
    /// Device address of the flag, for kernels.
    #[getter]
    fn device_ptr(&self) -> u64 {
        self.flag.device_ptr()
    }
    /// The CUDA device ordinal.
    #[getter]
    fn device(&self) -> usize {
        self.device
    }
    /// Makes later work on `stream` wait until the flag is >= `value` (`cuStreamWaitValue64`).
    #[pyo3(signature = (value, stream=Int(0)), text_signature = "($self, value, stream=0)")]
    fn wait_on_stream(&self, value: Int<u64>, stream: Int<usize>) -> PyResult<()> {
        let value = value.0;
        let stream = stream.0;
        wait_value_on_stream(&self.ctx, stream, self.flag.device_ptr(), value)
    }
    fn __repr__(&self) -> String {
        format!("GpuFlag(value={}, device={})", self.value(), self.device)
    }
}
