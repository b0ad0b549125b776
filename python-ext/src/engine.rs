//! `TransferEngine`: the engine's Python class.

use std::sync::Arc;
use std::time::Duration;

use fabric_lib as fl;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict, PyList, PyType};

use crate::args::{dur, sharding, with_completion};
use crate::errors::{ints, invalid, to_py, Int};
use crate::future::{call_with_result, PreparedTransfer, TransferFuture};
use crate::gpu::{GpuFlag, HostCounter};
use crate::info::attrs_dict;
use crate::region::{boxed_owner, MemoryRegion};
use crate::wire::{Address, MemoryDescriptor};

/// One `scatter` item as Python passes it: (descriptor, src_offset, dst_offset, length).
pub(crate) type ScatterItemArg = (MemoryDescriptor, Int<u64>, Int<u64>, Int<u64>);

/// The transfer engine: one domain group (1..16 NIC endpoints) driven by one worker thread.
#[pyclass(module = "stolon._native", frozen, subclass)]
pub(crate) struct TransferEngine {
    pub(crate) inner: Arc<fl::TransferEngine>,
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

pub(crate) fn stats_dict<'py>(
    py: Python<'py>,
    s: &fl::StatsSnapshot,
) -> PyResult<Bound<'py, PyDict>> {
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
