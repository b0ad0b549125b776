//! `stolon._native`: a thin PyO3 layer over fabric-lib. It converts types and errors and releases
//! the GIL around everything that waits; all logic lives in fabric-lib. The public Python API is
//! `python/stolon/`, which re-exports these classes.

use std::sync::Arc;
use std::time::Duration;

mod errors;
mod moe;

use errors::{ints, invalid, to_py, Int};
use fabric_lib as fl;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyMemoryView, PyTuple, PyType};

/// `completion=` of a call: None keeps the engine's default.
fn completion(c: Option<&str>) -> PyResult<Option<fl::Completion>> {
    c.map(fl::Completion::parse).transpose().map_err(to_py)
}

/// Applies a call's `completion=` to a prepared transfer.
fn with_completion(p: fl::Prepared, c: Option<&str>) -> PyResult<fl::Prepared> {
    Ok(match completion(c)? {
        Some(c) => p.with_completion(c),
        None => p,
    })
}

fn dur(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        // Anything beyond ~31 years means "practically forever" (and keeps Instant + timeout from
        // overflowing).
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) => Err(invalid(format!("bad timeout {s}"))),
    }
}

fn sharding(s: Option<&str>, pin: Option<usize>) -> PyResult<Option<fl::Sharding>> {
    match (s, pin) {
        (_, Some(d)) => Ok(Some(fl::Sharding::Pinned(d))),
        (None, None) => Ok(None),
        (Some("round_robin"), None) => Ok(Some(fl::Sharding::RoundRobin)),
        (Some(other), None) => Err(invalid(format!(
            "sharding {other:?}: use 'round_robin' or pin_domain=N"
        ))),
    }
}

/// Runs `f` on the bytes of any bytes-like object (bytes, bytearray, memoryview, a numpy
/// array...); anything else is an InvalidArgumentError.
fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
    if let Ok(b) = data.downcast::<PyBytes>() {
        return Ok(f(b.as_bytes()));
    }
    let view = PyMemoryView::from(data).map_err(|_| {
        let ty = data
            .get_type()
            .name()
            .map(|n| n.to_string())
            .unwrap_or_default();
        invalid(format!(
            "expected a bytes-like object (bytes, bytearray, memoryview), got {ty}"
        ))
    })?;
    let copy = view.call_method0("tobytes")?;
    Ok(f(copy.downcast::<PyBytes>()?.as_bytes()))
}

/// An engine's address: what a peer needs to reach it. Serializes to bytes and text.
#[pyclass(module = "stolon._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
struct Address {
    inner: fl::PeerAddr,
}

#[pymethods]
impl Address {
    #[staticmethod]
    fn from_bytes(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        with_bytes(data, fl::PeerAddr::from_bytes)?
            .map(|inner| Address { inner })
            .map_err(to_py)
    }
    #[staticmethod]
    fn from_text(text: &str) -> PyResult<Self> {
        fl::PeerAddr::from_text(text)
            .map(|inner| Address { inner })
            .map_err(to_py)
    }
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }
    fn to_text(&self) -> String {
        self.inner.to_text()
    }
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.to_bytes(py)
    }
    fn __str__(&self) -> String {
        self.inner.to_text()
    }
    fn __repr__(&self) -> String {
        let provs: Vec<_> = self
            .inner
            .domains
            .iter()
            .map(|d| d.provider.as_str())
            .collect();
        format!(
            "Address(engine={:016x}, domains={provs:?})",
            self.inner.engine_id
        )
    }
    /// Providers of the engine's domains, in order.
    #[getter]
    fn providers(&self) -> Vec<String> {
        self.inner
            .domains
            .iter()
            .map(|d| d.provider.clone())
            .collect()
    }
    #[getter]
    fn engine_id(&self) -> u64 {
        self.inner.engine_id
    }
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let f = py.get_type::<Address>().getattr("from_bytes")?;
        Ok((f, (self.to_bytes(py),)))
    }
}

/// What a peer needs to write into a registered region: owner address, bounds, keys.
#[pyclass(module = "stolon._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
struct MemoryDescriptor {
    inner: fl::MemDesc,
}

#[pymethods]
impl MemoryDescriptor {
    #[staticmethod]
    fn from_bytes(data: &Bound<'_, PyAny>) -> PyResult<Self> {
        with_bytes(data, fl::MemDesc::from_bytes)?
            .map(|inner| MemoryDescriptor { inner })
            .map_err(to_py)
    }
    #[staticmethod]
    fn from_text(text: &str) -> PyResult<Self> {
        fl::MemDesc::from_text(text)
            .map(|inner| MemoryDescriptor { inner })
            .map_err(to_py)
    }
    fn to_bytes<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        PyBytes::new(py, &self.inner.to_bytes())
    }
    fn to_text(&self) -> String {
        self.inner.to_text()
    }
    fn __bytes__<'py>(&self, py: Python<'py>) -> Bound<'py, PyBytes> {
        self.to_bytes(py)
    }
    fn __str__(&self) -> String {
        self.inner.to_text()
    }
    fn __repr__(&self) -> String {
        format!(
            "MemoryDescriptor(engine={:016x}, region={}, length={})",
            self.inner.owner.engine_id, self.inner.region_id, self.inner.len
        )
    }
    /// Length of the region in bytes.
    #[getter]
    fn length(&self) -> u64 {
        self.inner.len
    }
    /// Whether the region is GPU memory (written through staging or NVLink).
    #[getter]
    fn staged(&self) -> bool {
        self.inner.gpu.is_some()
    }
    /// The owner's address.
    #[getter]
    fn address(&self) -> Address {
        Address {
            inner: self.inner.owner.clone(),
        }
    }
    fn __reduce__<'py>(
        &self,
        py: Python<'py>,
    ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
        let f = py.get_type::<MemoryDescriptor>().getattr("from_bytes")?;
        Ok((f, (self.to_bytes(py),)))
    }
}

/// A registered local memory region.
#[pyclass(module = "stolon._native", frozen)]
struct MemoryRegion {
    inner: fl::MemoryRegion,
}

#[pymethods]
impl MemoryRegion {
    #[getter]
    fn descriptor(&self) -> MemoryDescriptor {
        MemoryDescriptor {
            inner: self.inner.descriptor().clone(),
        }
    }
    #[getter]
    fn ptr(&self) -> usize {
        self.inner.ptr()
    }
    #[getter]
    fn length(&self) -> u64 {
        self.inner.len()
    }
    #[getter]
    fn revoked(&self) -> bool {
        self.inner.is_revoked()
    }
    /// For GPU memory peers cannot write over NVLink: why (None when they can, or for host
    /// memory).
    #[getter]
    fn nvlink_note(&self) -> Option<String> {
        self.inner.nvlink_note().map(str::to_string)
    }
    /// "host", "gpu" or "staged_host".
    #[getter]
    fn memory(&self) -> &'static str {
        match self.inner.memory() {
            fl::engine::RegionMem::Host => "host",
            fl::engine::RegionMem::Gpu(_) | fl::engine::RegionMem::GpuDirect(_) => "gpu",
            fl::engine::RegionMem::StagedHost => "staged_host",
        }
    }
    fn __len__(&self) -> usize {
        self.inner.len() as usize
    }
    fn __repr__(&self) -> String {
        format!(
            "MemoryRegion(ptr={:#x}, length={})",
            self.inner.ptr(),
            self.inner.len()
        )
    }
}

/// A submitted transfer: wait on it, poll it, or attach a callback.
#[pyclass(module = "stolon._native", frozen)]
struct TransferFuture {
    inner: fl::Transfer,
}

fn call_with_result(cb: Py<PyAny>, r: fl::Result<()>) {
    Python::with_gil(|py| {
        let arg: PyObject = match r {
            Ok(()) => py.None(),
            Err(e) => to_py(e).into_value(py).into_any(),
        };
        if let Err(err) = cb.call1(py, (arg,)) {
            err.print(py);
        }
    });
}

#[pymethods]
impl TransferFuture {
    /// Blocks (GIL released) until the transfer finishes; raises its error.
    #[pyo3(signature = (timeout=None))]
    fn wait(&self, py: Python<'_>, timeout: Option<f64>) -> PyResult<()> {
        let t = dur(timeout)?.unwrap_or(Duration::from_secs(365 * 86400));
        let inner = self.inner.clone();
        py.allow_threads(move || inner.wait(t)).map_err(to_py)
    }
    /// Whether the transfer has finished.
    fn done(&self) -> bool {
        self.inner.is_done()
    }
    /// The error if it failed, None if it succeeded; raises if not finished.
    fn exception(&self, py: Python<'_>) -> PyResult<PyObject> {
        match self.inner.result() {
            None => Err(invalid("transfer has not finished")),
            Some(Ok(())) => Ok(py.None()),
            Some(Err(e)) => Ok(to_py(e).into_value(py).into_any()),
        }
    }
    /// Calls `fn(exc_or_None)` on the engine's callback thread when finished.
    fn add_done_callback(&self, callback: Py<PyAny>) {
        self.inner.on_done(move |r| call_with_result(callback, r));
    }
    /// Immediates this transfer produces at each receiver (a list, one entry per destination).
    #[getter]
    fn imm_counts(&self) -> Vec<usize> {
        self.inner.imm_counts.to_vec()
    }
    /// Total immediates this transfer produces.
    #[getter]
    fn imm_count(&self) -> usize {
        self.inner.imm_count()
    }
}

enum CounterMem {
    Host(Box<std::sync::atomic::AtomicU64>),
    Cuda(stolon_cuda::HostCounter),
}

/// A 64-bit counter in host memory that the engine's worker watches, or that the engine sets
/// when immediates arrive. With `device=N` it lives in pinned, GPU-mapped memory: GPU code
/// writes it (`write_from_stream`, a kernel through `device_ptr`) or waits on it
/// (`wait_on_stream`, a kernel polling `device_ptr`).
#[pyclass(module = "stolon._native", frozen)]
struct HostCounter {
    mem: Arc<CounterMem>,
    device: Option<usize>,
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
    fn ptr(&self) -> usize {
        self.atomic() as *const _ as usize
    }
    fn owner(&self) -> Box<dyn std::any::Any + Send + Sync> {
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
        Ok(unsafe {
            stolon_cuda::Stream::from_raw(c.context(), stream as stolon_cuda::sys::CUstream)
        })
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
    let s = unsafe { stolon_cuda::Stream::from_raw(ctx, stream as stolon_cuda::sys::CUstream) };
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
struct GpuFlag {
    flag: Arc<stolon_cuda::GpuFlag>,
    ctx: Arc<stolon_cuda::Context>,
    device: usize,
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

/// A validated, planned transfer not submitted yet: `engine.submit(p)` or a watch step.
#[pyclass(module = "stolon._native", frozen)]
struct PreparedTransfer {
    inner: std::sync::Mutex<Option<fl::Prepared>>,
    imm_counts: Vec<usize>,
}

impl PreparedTransfer {
    fn wrap(p: fl::Prepared) -> Self {
        let imm_counts = p.imm_counts().to_vec();
        PreparedTransfer {
            inner: std::sync::Mutex::new(Some(p)),
            imm_counts,
        }
    }
    fn take(&self) -> PyResult<fl::Prepared> {
        self.inner
            .lock()
            .unwrap()
            .take()
            .ok_or_else(|| invalid("this prepared transfer was already used"))
    }
}

#[pymethods]
impl PreparedTransfer {
    /// Immediates it will produce at each receiver.
    #[getter]
    fn imm_counts(&self) -> Vec<usize> {
        self.imm_counts.clone()
    }
    /// Total immediates.
    #[getter]
    fn imm_count(&self) -> usize {
        self.imm_counts.iter().sum()
    }
    /// Whether it was submitted (or handed to a watch) already.
    #[getter]
    fn used(&self) -> bool {
        self.inner.lock().unwrap().is_none()
    }
}

/// One `scatter` item as Python passes it: (descriptor, src_offset, dst_offset, length).
type ScatterItemArg = (MemoryDescriptor, Int<u64>, Int<u64>, Int<u64>);

/// The transfer engine: one domain group (1..16 NIC endpoints) driven by one worker thread.
#[pyclass(module = "stolon._native", frozen, subclass)]
struct TransferEngine {
    inner: Arc<fl::TransferEngine>,
}

impl Drop for TransferEngine {
    /// The garbage collector drops an engine with the GIL held; stopping it joins the worker
    /// and the callback thread, whose last jobs may need the GIL. So the last Python handle
    /// stops the engine with the GIL released.
    fn drop(&mut self) {
        if Arc::strong_count(&self.inner) == 1 && !self.inner.is_stopped() {
            let engine = self.inner.clone();
            Python::with_gil(|py| py.allow_threads(move || engine.stop()));
        }
    }
}

impl TransferEngine {
    fn region<'a>(&self, r: &'a Bound<'_, MemoryRegion>) -> &'a fl::MemoryRegion {
        &r.get().inner
    }
}

#[pymethods]
impl TransferEngine {
    #[new]
    #[pyo3(signature = (provider="tcp", domains=None, *, interfaces=None, nodes=None, timeout=30.0,
                        min_shard_bytes=Int(1048576), max_op_bytes=None, recv_buffers=Int(64),
                        send_buffers=Int(64), max_message_bytes=Int(65536), worker_cpu=None,
                        spin_us=Int(20000), max_sleep_us=Int(500), cuda_device=None,
                        nvlink=true, completion="delivered", revoke_timeout=5.0),
           text_signature = "(provider=\"tcp\", domains=None, *, interfaces=None, nodes=None, \
                             timeout=30.0, min_shard_bytes=1048576, max_op_bytes=None, \
                             recv_buffers=64, send_buffers=64, max_message_bytes=65536, \
                             worker_cpu=None, spin_us=20000, max_sleep_us=500, cuda_device=None, \
                             nvlink=True, completion=\"delivered\", revoke_timeout=5.0)")]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        provider: &str,
        domains: Option<Int<usize>>,
        interfaces: Option<Vec<String>>,
        nodes: Option<Vec<String>>,
        timeout: f64,
        min_shard_bytes: Int<u64>,
        max_op_bytes: Option<Int<u64>>,
        recv_buffers: Int<usize>,
        send_buffers: Int<usize>,
        max_message_bytes: Int<usize>,
        worker_cpu: Option<Int<usize>>,
        spin_us: Int<u64>,
        max_sleep_us: Int<u64>,
        cuda_device: Option<Int<usize>>,
        nvlink: bool,
        completion: &str,
        revoke_timeout: f64,
    ) -> PyResult<Self> {
        let domains = domains.map(|i| i.0);
        let min_shard_bytes = min_shard_bytes.0;
        let max_op_bytes = max_op_bytes.map(|i| i.0);
        let recv_buffers = recv_buffers.0;
        let send_buffers = send_buffers.0;
        let max_message_bytes = max_message_bytes.0;
        let worker_cpu = worker_cpu.map(|i| i.0);
        let spin_us = spin_us.0;
        let max_sleep_us = max_sleep_us.0;
        let cuda_device = cuda_device.map(|i| i.0);
        let n = domains
            .or(interfaces.as_ref().map(Vec::len))
            .or(nodes.as_ref().map(Vec::len))
            .unwrap_or(1);
        for (what, list) in [("interfaces", &interfaces), ("nodes", &nodes)] {
            if let Some(l) = list {
                if l.len() != n {
                    return Err(to_py(fl::Error::Config(format!(
                        "{} {what} given for {n} domains",
                        l.len()
                    ))));
                }
            }
        }
        let mut cfg = fl::EngineConfig::new(provider, n);
        for (i, d) in cfg.domains.iter_mut().enumerate() {
            d.interface = interfaces.as_ref().map(|l| l[i].clone());
            d.node = nodes.as_ref().map(|l| l[i].clone());
        }
        cfg.timeout = dur(Some(timeout))?.unwrap();
        cfg.min_shard_bytes = min_shard_bytes;
        cfg.max_op_bytes = max_op_bytes;
        cfg.recv_buffers = recv_buffers;
        cfg.send_buffers = send_buffers;
        cfg.max_message_bytes = max_message_bytes;
        cfg.worker_cpu = worker_cpu;
        cfg.spin = Duration::from_micros(spin_us);
        cfg.max_sleep = Duration::from_micros(max_sleep_us.max(1));
        cfg.cuda_device = cuda_device;
        cfg.nvlink = nvlink;
        cfg.completion = fl::Completion::parse(completion).map_err(to_py)?;
        cfg.revoke_timeout = dur(Some(revoke_timeout))?.unwrap();
        let engine = py
            .allow_threads(move || fl::TransferEngine::new(cfg))
            .map_err(to_py)?;
        Ok(TransferEngine {
            inner: Arc::new(engine),
        })
    }

    /// This engine's address.
    #[getter]
    fn address(&self) -> Address {
        Address {
            inner: self.inner.address().clone(),
        }
    }

    /// Number of domains in the group.
    #[getter]
    fn num_domains(&self) -> usize {
        self.inner.address().domains.len()
    }

    /// What each domain's provider granted.
    fn domain_info<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for a in self.inner.domain_attrs() {
            out.append(attrs_dict(py, a)?)?;
        }
        Ok(out)
    }

    /// Registers `length` bytes at `ptr`; `owner` is kept alive while the region is.
    #[pyo3(signature = (ptr, length, owner=None))]
    fn register_ptr(
        &self,
        py: Python<'_>,
        ptr: Int<usize>,
        length: Int<u64>,
        owner: Option<PyObject>,
    ) -> PyResult<MemoryRegion> {
        let ptr = ptr.0;
        let length = length.0;
        let owner = boxed_owner(owner);
        let engine = self.inner.clone();
        // SAFETY: the Python layer passes the address of a buffer exported by `owner` (which
        // pins it: a buffer export prevents resizing) or a raw pointer the caller vouches for;
        // the owner is kept alive for as long as the region and any transfer using it.
        let r = py.allow_threads(move || unsafe { engine.register(ptr, length, owner) });
        Ok(MemoryRegion {
            inner: r.map_err(to_py)?,
        })
    }

    /// Registers `length` bytes of GPU memory at device address `ptr` (the engine needs
    /// `cuda_device`); `owner` (e.g. the tensor) is kept alive while the region is.
    #[pyo3(signature = (ptr, length, owner=None))]
    fn register_gpu_ptr(
        &self,
        py: Python<'_>,
        ptr: Int<u64>,
        length: Int<u64>,
        owner: Option<PyObject>,
    ) -> PyResult<MemoryRegion> {
        let ptr = ptr.0;
        let length = length.0;
        let owner = boxed_owner(owner);
        let engine = self.inner.clone();
        // SAFETY: the Python layer passes a tensor's data pointer and size with the tensor as
        // owner, which keeps the device memory allocated while the region lives.
        let r = py.allow_threads(move || unsafe { engine.register_gpu(ptr, length, owner) });
        Ok(MemoryRegion {
            inner: r.map_err(to_py)?,
        })
    }

    /// Registers host memory that peers write through the staging protocol exactly as they
    /// would GPU memory (tests of that protocol on machines without a GPU).
    #[pyo3(signature = (ptr, length, owner=None))]
    fn register_staged_host_ptr(
        &self,
        py: Python<'_>,
        ptr: Int<usize>,
        length: Int<u64>,
        owner: Option<PyObject>,
    ) -> PyResult<MemoryRegion> {
        let ptr = ptr.0;
        let length = length.0;
        let owner = boxed_owner(owner);
        let engine = self.inner.clone();
        // SAFETY: as for register_ptr.
        let r =
            py.allow_threads(move || unsafe { engine.register_staged_host(ptr, length, owner) });
        Ok(MemoryRegion {
            inner: r.map_err(to_py)?,
        })
    }

    /// Revokes a region and returns once no peer can write it any more (see the stub).
    fn unregister(&self, py: Python<'_>, region: &Bound<'_, MemoryRegion>) -> PyResult<()> {
        let r = self.region(region).clone();
        let engine = self.inner.clone();
        py.allow_threads(move || engine.unregister(&r))
            .map_err(to_py)
    }

    /// One-sided write of `length` bytes, optionally carrying immediate `imm`.
    #[pyo3(signature = (src, src_offset, dst, dst_offset, length, imm=None, *, sharding=None,
                        pin_domain=None, timeout=None, completion=None))]
    #[allow(clippy::too_many_arguments)]
    fn write(
        &self,
        src: &Bound<'_, MemoryRegion>,
        src_offset: Int<u64>,
        dst: &MemoryDescriptor,
        dst_offset: Int<u64>,
        length: Int<u64>,
        imm: Option<Int<u32>>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<TransferFuture> {
        let p = self.prepare_write(
            src, src_offset, dst, dst_offset, length, imm, sharding, pin_domain, timeout,
            completion,
        )?;
        self.submit(&p)
    }

    /// Like `write`, but returns a PreparedTransfer instead of submitting.
    #[pyo3(signature = (src, src_offset, dst, dst_offset, length, imm=None, *, sharding=None,
                        pin_domain=None, timeout=None, completion=None))]
    #[allow(clippy::too_many_arguments)]
    fn prepare_write(
        &self,
        src: &Bound<'_, MemoryRegion>,
        src_offset: Int<u64>,
        dst: &MemoryDescriptor,
        dst_offset: Int<u64>,
        length: Int<u64>,
        imm: Option<Int<u32>>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<PreparedTransfer> {
        let src_offset = src_offset.0;
        let dst_offset = dst_offset.0;
        let length = length.0;
        let imm = imm.map(|i| i.0);
        let pin_domain = pin_domain.map(|i| i.0);
        let s = self::sharding(sharding, pin_domain)?;
        let p = self
            .inner
            .prepare_write(
                self.region(src),
                src_offset,
                &dst.inner,
                dst_offset,
                length,
                imm,
                s,
                dur(timeout)?,
            )
            .map_err(to_py)?;
        with_completion(p, completion).map(PreparedTransfer::wrap)
    }

    /// Like `write_paged`, but returns a PreparedTransfer instead of submitting.
    #[pyo3(signature = (src, dst, page_bytes, src_pages, dst_pages, *, src_stride=None,
                        dst_stride=None, src_offset=Int(0), dst_offset=Int(0), imm=None, sharding=None,
                        pin_domain=None, timeout=None, completion=None),
           text_signature = "($self, src, dst, page_bytes, src_pages, dst_pages, *, src_stride=None, \
                             dst_stride=None, src_offset=0, dst_offset=0, imm=None, sharding=None, \
                             pin_domain=None, timeout=None, completion=None)")]
    #[allow(clippy::too_many_arguments)]
    fn prepare_paged(
        &self,
        src: &Bound<'_, MemoryRegion>,
        dst: &MemoryDescriptor,
        page_bytes: Int<u64>,
        src_pages: Vec<Int<u32>>,
        dst_pages: Vec<Int<u32>>,
        src_stride: Option<Int<u64>>,
        dst_stride: Option<Int<u64>>,
        src_offset: Int<u64>,
        dst_offset: Int<u64>,
        imm: Option<Int<u32>>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<PreparedTransfer> {
        let page_bytes = page_bytes.0;
        let src_pages = ints(src_pages);
        let dst_pages = ints(dst_pages);
        let src_stride = src_stride.map(|i| i.0);
        let dst_stride = dst_stride.map(|i| i.0);
        let src_offset = src_offset.0;
        let dst_offset = dst_offset.0;
        let imm = imm.map(|i| i.0);
        let pin_domain = pin_domain.map(|i| i.0);
        let spec = fl::PagedSpec {
            page_bytes,
            src_pages,
            dst_pages,
            src_stride: src_stride.unwrap_or(page_bytes),
            dst_stride: dst_stride.unwrap_or(page_bytes),
            src_offset,
            dst_offset,
        };
        let s = self::sharding(sharding, pin_domain)?;
        let p = self
            .inner
            .prepare_paged(self.region(src), &dst.inner, &spec, imm, s, dur(timeout)?)
            .map_err(to_py)?;
        with_completion(p, completion).map(PreparedTransfer::wrap)
    }

    /// Submits a PreparedTransfer (each can be used once).
    fn submit(&self, prepared: &PreparedTransfer) -> PyResult<TransferFuture> {
        self.inner
            .submit(prepared.take()?)
            .map(|inner| TransferFuture { inner })
            .map_err(to_py)
    }

    /// Watches `counter`: on each change `callback(old, new)` runs on the callback thread, and
    /// `steps[i]` is submitted by the worker itself once the counter reaches i + 1 (a GPU
    /// kernel or stream write bumping the counter streams layer i without any Python). Returns
    /// (watch_id, [TransferFuture per step]).
    #[pyo3(signature = (counter, steps=Vec::new(), callback=None))]
    fn watch(
        &self,
        counter: &HostCounter,
        steps: Vec<Bound<'_, PreparedTransfer>>,
        callback: Option<Py<PyAny>>,
    ) -> PyResult<(u64, Vec<TransferFuture>)> {
        let mut prepared = Vec::with_capacity(steps.len());
        for p in &steps {
            prepared.push(p.get().take()?);
        }
        let cb = callback.map(|cb| {
            Box::new(move |old: u64, new: u64| {
                Python::with_gil(|py| {
                    if let Err(e) = cb.call1(py, (old, new)) {
                        e.print(py);
                    }
                })
            }) as fl::WatchCallback
        });
        // SAFETY: the counter's memory is an aligned u64 kept alive by the owner passed along.
        let (id, handles) = unsafe {
            self.inner
                .watch(counter.ptr(), Some(counter.owner()), cb, prepared)
        }
        .map_err(to_py)?;
        Ok((
            id,
            handles
                .into_iter()
                .map(|inner| TransferFuture { inner })
                .collect(),
        ))
    }

    /// Removes a watch; steps not yet released fail with EngineStoppedError.
    fn unwatch(&self, watch_id: Int<u64>) -> PyResult<()> {
        let watch_id = watch_id.0;
        self.inner.unwatch(watch_id).map_err(to_py)
    }

    /// Once `imm` has arrived `count` times (consuming them), the worker stores `value` into
    /// `counter` immediately: a `HostCounter` (GPU-visible when it has a device) or a `GpuFlag`
    /// (in GPU memory, through GDRCopy); u64::MAX is stored if `timeout` passes first.
    #[pyo3(signature = (imm, count, counter, value=Int(1), timeout=None),
           text_signature = "($self, imm, count, counter, value=1, timeout=None)")]
    fn expect_imm_flag(
        &self,
        imm: Int<u32>,
        count: Int<u64>,
        counter: &Bound<'_, PyAny>,
        value: Int<u64>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let imm = imm.0;
        let count = count.0;
        let value = value.0;
        let (ptr, owner): (usize, Box<dyn std::any::Any + Send + Sync>) =
            if let Ok(c) = counter.downcast::<HostCounter>() {
                let c = c.get();
                (c.ptr(), c.owner())
            } else if let Ok(f) = counter.downcast::<GpuFlag>() {
                let f = f.get();
                (f.flag.host_ptr() as usize, Box::new(f.flag.clone()))
            } else {
                return Err(invalid("counter must be a HostCounter or a GpuFlag"));
            };
        // SAFETY: as in `watch`: the owner keeps the flag's memory (and mapping) alive until
        // the store ran.
        unsafe {
            self.inner.imm_counter().expect_store(
                imm,
                count,
                dur(timeout)?,
                ptr,
                value,
                Some(owner),
            )
        }
        .map_err(to_py)
    }

    /// Sends only an immediate to `peer`.
    #[pyo3(signature = (peer, imm, *, timeout=None, completion=None))]
    fn write_imm(
        &self,
        peer: &Address,
        imm: Int<u32>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<TransferFuture> {
        let imm = imm.0;
        let p = self
            .inner
            .prepare_write_imm(&peer.inner, imm, dur(timeout)?)
            .map_err(to_py)?;
        self.inner
            .submit(with_completion(p, completion)?)
            .map(|inner| TransferFuture { inner })
            .map_err(to_py)
    }

    /// Paged write: page src_pages[i] (at src_offset + index*src_stride) to page dst_pages[i].
    #[pyo3(signature = (src, dst, page_bytes, src_pages, dst_pages, *, src_stride=None,
                        dst_stride=None, src_offset=Int(0), dst_offset=Int(0), imm=None, sharding=None,
                        pin_domain=None, timeout=None, completion=None),
           text_signature = "($self, src, dst, page_bytes, src_pages, dst_pages, *, src_stride=None, \
                             dst_stride=None, src_offset=0, dst_offset=0, imm=None, sharding=None, \
                             pin_domain=None, timeout=None, completion=None)")]
    #[allow(clippy::too_many_arguments)]
    fn write_paged(
        &self,
        src: &Bound<'_, MemoryRegion>,
        dst: &MemoryDescriptor,
        page_bytes: Int<u64>,
        src_pages: Vec<Int<u32>>,
        dst_pages: Vec<Int<u32>>,
        src_stride: Option<Int<u64>>,
        dst_stride: Option<Int<u64>>,
        src_offset: Int<u64>,
        dst_offset: Int<u64>,
        imm: Option<Int<u32>>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<TransferFuture> {
        let p = self.prepare_paged(
            src, dst, page_bytes, src_pages, dst_pages, src_stride, dst_stride, src_offset,
            dst_offset, imm, sharding, pin_domain, timeout, completion,
        )?;
        self.submit(&p)
    }

    /// Scatter from one region: items are (descriptor, src_offset, dst_offset, length).
    /// Distinct descriptors are distinct destinations; `imm_counts` follows their first
    /// appearance.
    #[pyo3(signature = (src, items, imm=None, *, sharding=None, pin_domain=None, timeout=None,
                        completion=None))]
    #[allow(clippy::too_many_arguments)]
    fn scatter(
        &self,
        src: &Bound<'_, MemoryRegion>,
        items: Vec<ScatterItemArg>,
        imm: Option<Int<u32>>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        timeout: Option<f64>,
        completion: Option<&str>,
    ) -> PyResult<TransferFuture> {
        let imm = imm.map(|i| i.0);
        let pin_domain = pin_domain.map(|i| i.0);
        let mut dsts: Vec<fl::MemDesc> = Vec::new();
        let mut its = Vec::with_capacity(items.len());
        for (d, src_off, dst_off, len) in items {
            let idx = match dsts.iter().position(|x| *x == d.inner) {
                Some(i) => i,
                None => {
                    dsts.push(d.inner);
                    dsts.len() - 1
                }
            };
            its.push(fl::ScatterItem {
                dst: idx,
                src_off: src_off.0,
                dst_off: dst_off.0,
                len: len.0,
            });
        }
        let refs: Vec<&fl::MemDesc> = dsts.iter().collect();
        let s = self::sharding(sharding, pin_domain)?;
        let p = self
            .inner
            .prepare_scatter(self.region(src), &refs, &its, imm, s, dur(timeout)?)
            .map_err(to_py)?;
        self.inner
            .submit(with_completion(p, completion)?)
            .map(|inner| TransferFuture { inner })
            .map_err(to_py)
    }

    /// Sends a control message (bytes) to `peer`.
    #[pyo3(signature = (peer, data, *, timeout=None))]
    fn send(&self, peer: &Address, data: &[u8], timeout: Option<f64>) -> PyResult<TransferFuture> {
        self.inner
            .send(&peer.inner, data, dur(timeout)?)
            .map(|inner| TransferFuture { inner })
            .map_err(to_py)
    }

    /// Receives the next control message, waiting up to `timeout` seconds.
    #[pyo3(signature = (timeout=None))]
    fn recv<'py>(&self, py: Python<'py>, timeout: Option<f64>) -> PyResult<Bound<'py, PyBytes>> {
        let t = dur(timeout)?.unwrap_or(self.inner.config().timeout);
        let engine = self.inner.clone();
        let m = py.allow_threads(move || engine.recv(t)).map_err(to_py)?;
        Ok(PyBytes::new(py, &m))
    }

    /// Delivers messages to `callback(bytes)` on the callback thread (None restores recv()).
    #[pyo3(signature = (callback=None))]
    fn on_message(&self, callback: Option<Py<PyAny>>) {
        let cb = callback.map(|cb| {
            let cb = Arc::new(cb);
            Arc::new(move |m: Vec<u8>| {
                Python::with_gil(|py| {
                    if let Err(e) = cb.call1(py, (PyBytes::new(py, &m),)) {
                        e.print(py);
                    }
                })
            }) as Arc<dyn Fn(Vec<u8>) + Send + Sync>
        });
        self.inner.on_message(cb);
    }

    /// Waits until every other engine in `peers` reached the barrier with the same `imm`.
    #[pyo3(signature = (peers, imm, timeout=None))]
    fn barrier(
        &self,
        py: Python<'_>,
        peers: Vec<Address>,
        imm: Int<u32>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let imm = imm.0;
        let t = dur(timeout)?.unwrap_or(self.inner.config().timeout);
        let addrs: Vec<fl::PeerAddr> = peers.into_iter().map(|a| a.inner).collect();
        let engine = self.inner.clone();
        py.allow_threads(move || engine.barrier(&addrs, imm, t))
            .map_err(to_py)
    }

    /// Arrivals of `imm` counted and not yet consumed.
    fn imm_count(&self, imm: Int<u32>) -> u64 {
        let imm = imm.0;
        self.inner.imm_counter().count(imm)
    }

    /// Blocks until `imm` has arrived `count` times, then consumes them.
    #[pyo3(signature = (imm, count, timeout=None))]
    fn wait_imm(
        &self,
        py: Python<'_>,
        imm: Int<u32>,
        count: Int<u64>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let imm = imm.0;
        let count = count.0;
        let t = dur(timeout)?.unwrap_or(self.inner.config().timeout);
        let engine = self.inner.clone();
        py.allow_threads(move || engine.imm_counter().wait(imm, count, t))
            .map_err(to_py)
    }

    /// Calls `callback(exc_or_None)` once `imm` has arrived `count` times (consuming them), or
    /// with a timeout error after `timeout` seconds.
    #[pyo3(signature = (imm, count, callback, timeout=None))]
    fn expect_imm(
        &self,
        imm: Int<u32>,
        count: Int<u64>,
        callback: Py<PyAny>,
        timeout: Option<f64>,
    ) -> PyResult<()> {
        let imm = imm.0;
        let count = count.0;
        let t = dur(timeout)?;
        self.inner
            .imm_counter()
            .expect(imm, count, t, move |r| call_with_result(callback, r));
        Ok(())
    }

    /// Immediates a receiver gets from `write(..., length, imm)`. `staged=True` when the
    /// source or the destination is GPU memory moved through staging buffers.
    #[pyo3(signature = (length, *, sharding=None, pin_domain=None, staged=false))]
    fn imm_count_write(
        &self,
        length: Int<u64>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        staged: bool,
    ) -> PyResult<usize> {
        let length = length.0;
        let pin_domain = pin_domain.map(|i| i.0);
        Ok(self
            .inner
            .imm_count_write(length, self::sharding(sharding, pin_domain)?, staged))
    }

    /// Immediates a receiver gets from a paged write of `pages` pages.
    #[pyo3(signature = (pages, page_bytes, *, staged=false))]
    fn imm_count_paged(&self, pages: Int<usize>, page_bytes: Int<u64>, staged: bool) -> usize {
        let pages = pages.0;
        let page_bytes = page_bytes.0;
        self.inner.imm_count_paged(pages, page_bytes, staged)
    }

    /// Immediates one scatter destination gets for an item of `length` bytes (an item large
    /// enough to shard is split over the domains like a single write).
    #[pyo3(signature = (length, *, sharding=None, pin_domain=None, staged=false))]
    fn imm_count_scatter_item(
        &self,
        length: Int<u64>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
        staged: bool,
    ) -> PyResult<usize> {
        let length = length.0;
        let pin_domain = pin_domain.map(|i| i.0);
        let p = if staged {
            self.inner.staged_shard_params()
        } else {
            self.inner.shard_params()
        };
        let s = self::sharding(sharding, pin_domain)?.unwrap_or(fl::Sharding::RoundRobin);
        Ok(p.imm_count_scatter_item(s, length))
    }

    /// Arms a worker-side trigger: each of the next `times` arrivals of `imm` posts a prepared
    /// write (used for latency measurement and GPU-triggered streaming).
    #[pyo3(signature = (imm, times, src, src_offset, dst, dst_offset, length, reply_imm=None))]
    #[allow(clippy::too_many_arguments)]
    fn trigger_write(
        &self,
        imm: Int<u32>,
        times: Int<u64>,
        src: &Bound<'_, MemoryRegion>,
        src_offset: Int<u64>,
        dst: &MemoryDescriptor,
        dst_offset: Int<u64>,
        length: Int<u64>,
        reply_imm: Option<Int<u32>>,
    ) -> PyResult<()> {
        let imm = imm.0;
        let times = times.0;
        let src_offset = src_offset.0;
        let dst_offset = dst_offset.0;
        let length = length.0;
        let reply_imm = reply_imm.map(|i| i.0);
        self.inner
            .trigger_write(
                imm,
                times,
                self.region(src),
                src_offset,
                &dst.inner,
                dst_offset,
                length,
                reply_imm,
            )
            .map_err(to_py)
    }

    /// Per-domain counters: a list of dicts.
    fn stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyList>> {
        let out = PyList::empty(py);
        for s in self.inner.stats() {
            out.append(stats_dict(py, &s)?)?;
        }
        Ok(out)
    }

    /// Counters of the NVLink path (a dict like one entry of `stats()`).
    fn nvlink_stats<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        stats_dict(py, &self.inner.nvlink_stats())
    }

    /// How bytes from `src` reach `dst`: "fabric", "staged" or "nvlink".
    fn path(&self, src: &Bound<'_, MemoryRegion>, dst: &MemoryDescriptor) -> &'static str {
        match self.inner.path(self.region(src), &dst.inner) {
            fl::engine::Path::Fabric => "fabric",
            fl::engine::Path::Staged => "staged",
            fl::engine::Path::Nvlink => "nvlink",
        }
    }

    /// Immediates the receiver gets from `write(src, _, dst, _, length, imm)`, and from one
    /// `scatter` item of `length` bytes from `src` into `dst` (cut by the same path).
    #[pyo3(signature = (src, dst, length, *, sharding=None, pin_domain=None))]
    fn imm_count_for(
        &self,
        src: &Bound<'_, MemoryRegion>,
        dst: &MemoryDescriptor,
        length: Int<u64>,
        sharding: Option<&str>,
        pin_domain: Option<Int<usize>>,
    ) -> PyResult<usize> {
        let length = length.0;
        let pin_domain = pin_domain.map(|i| i.0);
        let s = self::sharding(sharding, pin_domain)?;
        Ok(self
            .inner
            .imm_count_for(self.region(src), &dst.inner, length, s))
    }

    /// Stops the worker; in-flight transfers fail with EngineStoppedError. Idempotent.
    fn stop(&self, py: Python<'_>) {
        let engine = self.inner.clone();
        py.allow_threads(move || engine.stop());
    }

    #[getter]
    fn stopped(&self) -> bool {
        self.inner.is_stopped()
    }

    fn __enter__(slf: Py<Self>) -> Py<Self> {
        slf
    }

    #[pyo3(signature = (_t=None, _v=None, _tb=None))]
    fn __exit__(
        &self,
        py: Python<'_>,
        _t: Option<&Bound<'_, PyType>>,
        _v: Option<&Bound<'_, PyAny>>,
        _tb: Option<&Bound<'_, PyAny>>,
    ) {
        self.stop(py);
    }
}

/// The Python object that owns registered memory, kept alive by the region.
/// A Python object a region keeps alive. Dropped with the GIL held, so the object goes as soon
/// as the engine lets go of it (PyO3 defers a decref made without the GIL until some thread
/// next enters PyO3: an unregistered tensor stayed allocated while Python only slept). The
/// engine drops owners on its callback thread, never on its worker.
struct Owner(Option<PyObject>);

impl Drop for Owner {
    fn drop(&mut self) {
        if let Some(o) = self.0.take() {
            Python::with_gil(|_| drop(o));
        }
    }
}

fn boxed_owner(owner: Option<PyObject>) -> Option<Box<dyn std::any::Any + Send + Sync>> {
    owner.map(|o| Box::new(Owner(Some(o))) as Box<dyn std::any::Any + Send + Sync>)
}

fn stats_dict<'py>(py: Python<'py>, s: &fl::StatsSnapshot) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("bytes_written", s.bytes_written)?;
    d.set_item("write_ops", s.write_ops)?;
    d.set_item("messages_sent", s.messages_sent)?;
    d.set_item("bytes_sent", s.bytes_sent)?;
    d.set_item("messages_received", s.messages_received)?;
    d.set_item("imms_received", s.imms_received)?;
    d.set_item("rejected", s.rejected)?;
    d.set_item("errors", s.errors)?;
    Ok(d)
}

fn attrs_dict<'py>(py: Python<'py>, a: &fl::DomainAttrs) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("provider", &a.provider)?;
    d.set_item("fabric", &a.fabric)?;
    d.set_item("domain", &a.domain)?;
    d.set_item("virt_addr", a.virt_addr)?;
    d.set_item("prov_key", a.prov_key)?;
    d.set_item("mr_local", a.mr_local)?;
    d.set_item("max_msg_size", a.max_msg_size)?;
    d.set_item("inject_size", a.inject_size)?;
    d.set_item("tx_size", a.tx_size)?;
    d.set_item("rx_size", a.rx_size)?;
    d.set_item("cq_data_size", a.cq_data_size)?;
    d.set_item("hmem", a.hmem)?;
    Ok(d)
}

/// CUDA driver facts: {"present", "driver_version", "devices": [...]} (never raises).
#[pyfunction]
fn cuda_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let d = PyDict::new(py);
    d.set_item("present", stolon_cuda::is_present())?;
    match stolon_cuda::driver_version() {
        Ok(v) => d.set_item("driver_version", v.to_string())?,
        Err(e) => d.set_item("error", e.to_string())?,
    }
    let devs = PyList::empty(py);
    if let Ok(all) = stolon_cuda::Device::all() {
        for dev in all {
            let e = PyDict::new(py);
            e.set_item("name", dev.name().unwrap_or_default())?;
            e.set_item("pci_bus_id", dev.pci_bus_id().unwrap_or_default())?;
            devs.append(e)?;
        }
    }
    d.set_item("devices", devs)?;
    match stolon_cuda::Gdr::get() {
        Ok(g) => d.set_item("gdrcopy", format!("available ({})", g.path))?,
        Err(e) => d.set_item("gdrcopy", format!("not available: {e}"))?,
    }
    Ok(d)
}

/// Path and version of the libfabric that was loaded (raises LibraryNotFoundError).
#[pyfunction]
fn libfabric_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
    let lib =
        fl::sys::libfabric::lib().map_err(|e| to_py(fl::Error::LibraryNotFound(e.to_string())))?;
    let d = PyDict::new(py);
    d.set_item("path", &lib.path)?;
    d.set_item("file", lib.file.as_deref())?;
    let (maj, min) = lib.runtime_version();
    d.set_item("version", format!("{maj}.{min}"))?;
    d.set_item(
        "candidates",
        PyTuple::new(py, fl::sys::libfabric::candidate_paths())?,
    )?;
    Ok(d)
}

/// RDM providers/interfaces usable here with FI_MSG, FI_RMA and remote CQ data.
#[pyfunction]
#[pyo3(signature = (provider=None))]
fn list_providers<'py>(py: Python<'py>, provider: Option<&str>) -> PyResult<Bound<'py, PyList>> {
    let p = provider.map(str::to_string);
    let found = py.allow_threads(move || fl::list_providers(p.as_deref()));
    let out = PyList::empty(py);
    match found {
        Ok(list) => {
            for a in &list {
                out.append(attrs_dict(py, a)?)?;
            }
        }
        Err(fl::Error::ProviderNotFound { .. }) => {}
        Err(e) => return Err(to_py(e)),
    }
    Ok(out)
}

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<TransferEngine>()?;
    m.add_class::<TransferFuture>()?;
    m.add_class::<MemoryRegion>()?;
    m.add_class::<MemoryDescriptor>()?;
    m.add_class::<Address>()?;
    m.add_class::<HostCounter>()?;
    m.add_class::<GpuFlag>()?;
    m.add_class::<PreparedTransfer>()?;
    m.add_class::<moe::MoeAllToAll>()?;
    m.add_function(wrap_pyfunction!(cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(libfabric_info, m)?)?;
    m.add_function(wrap_pyfunction!(list_providers, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_error_classes, m)?)?;
    Ok(())
}
