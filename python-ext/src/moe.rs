//! `stolon._native.MoeAllToAll`: the MoE dispatch/combine of one rank (p2p-all-to-all).
//!
//! Python passes integers (device pointers, strides, the raw stream) and keeps the tensors
//! alive; `stolon.moe` validates shapes and dtypes before anything reaches here.

use std::time::Duration;

use p2p_all_to_all as a2a;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyDict};

use crate::errors::{invalid, raise, to_py, Class};

/// One rank's MoE all-to-all (see `stolon.moe.AllToAll`, which wraps it).
#[pyclass(module = "stolon._native", name = "MoeAllToAll")]
pub struct MoeAllToAll {
    inner: Option<a2a::AllToAll>,
}

impl MoeAllToAll {
    fn get(&self) -> PyResult<&a2a::AllToAll> {
        self.inner
            .as_ref()
            .ok_or_else(|| raise(Class::AllToAll, "the all-to-all was closed"))
    }

    fn stream(&self, stream: usize) -> PyResult<stolon_cuda::Stream> {
        let a = self.get()?;
        // SAFETY: Python passes a stream handle of this device's primary context (torch's
        // current stream) or 0, alive for the duration of the call that uses it.
        Ok(unsafe { stolon_cuda::Stream::from_handle(a.context(), stream) })
    }
}

#[pymethods]
impl MoeAllToAll {
    /// The kernel builds in this library, oldest toolkit first: dicts with `name` (`cuda12`),
    /// `toolkit` (`12.8`), `compiler`, `cubins`, `ptx`, `bytes`, `description`.
    #[staticmethod]
    fn kernel_builds<'py>(py: Python<'py>) -> PyResult<Vec<Bound<'py, PyDict>>> {
        a2a::kernels::BUILDS
            .iter()
            .map(|b| {
                let d = PyDict::new(py);
                d.set_item("name", b.name)?;
                d.set_item("toolkit", format!("{}.{}", b.toolkit.0, b.toolkit.1))?;
                d.set_item("compiler", b.compiler)?;
                d.set_item("cubins", b.cubins.to_vec())?;
                d.set_item("ptx", b.ptx.to_vec())?;
                d.set_item("bytes", b.fatbin.len())?;
                d.set_item("description", b.describe())?;
                Ok(d)
            })
            .collect()
    }

    /// The name of the kernel build that loads for a driver supporting CUDA `driver`
    /// (`"12.4"`; default: the installed driver, `cuDriverGetVersion`), honouring
    /// `STOLON_MOE_KERNELS`. Raises as creating an all-to-all would.
    #[staticmethod]
    #[pyo3(signature = (driver=None))]
    fn selected_kernels(driver: Option<&str>) -> PyResult<&'static str> {
        let build = match driver {
            None => a2a::kernels::selected(),
            Some(v) => {
                let parsed = v.split_once('.').and_then(|(a, b)| {
                    Some((a.trim().parse::<u32>().ok()?, b.trim().parse::<u32>().ok()?))
                });
                let Some(ver) = parsed else {
                    return Err(invalid(format!(
                        "driver must look like \"12.4\", got {v:?}"
                    )));
                };
                let forced = a2a::kernels::forced_from_env();
                a2a::kernels::select(a2a::kernels::BUILDS, ver, forced.as_deref())
            }
        };
        Ok(build.map_err(to_py)?.name)
    }

    #[new]
    #[pyo3(signature = (*, device, rank, world, num_experts, topk, max_tokens, hidden,
                        dispatch_elem_bytes, scales_per_token, combine_dtype,
                        ranks_per_node=None, capacity=None, timeout=10.0, engine=None))]
    #[allow(clippy::too_many_arguments)]
    fn new(
        py: Python<'_>,
        device: usize,
        rank: usize,
        world: usize,
        num_experts: usize,
        topk: usize,
        max_tokens: usize,
        hidden: usize,
        dispatch_elem_bytes: usize,
        scales_per_token: usize,
        combine_dtype: &str,
        ranks_per_node: Option<usize>,
        capacity: Option<usize>,
        timeout: f64,
        engine: Option<PyRef<'_, crate::engine::TransferEngine>>,
    ) -> PyResult<Self> {
        if !(timeout.is_finite() && timeout > 0.0) {
            return Err(invalid(format!(
                "timeout must be a positive number of seconds, got {timeout}"
            )));
        }
        let cfg = a2a::Config {
            rank,
            world,
            ranks_per_node: ranks_per_node.unwrap_or(world),
            num_experts,
            topk,
            max_tokens,
            hidden,
            dispatch_elem_bytes,
            scales_per_token,
            combine: a2a::CombineDtype::parse(combine_dtype).map_err(to_py)?,
            capacity,
            timeout: Duration::from_secs_f64(timeout),
        };
        let engine = engine.map(|e| e.inner.clone());
        let inner = py
            .allow_threads(|| a2a::AllToAll::with_engine(device, cfg, engine))
            .map_err(to_py)?;
        Ok(MoeAllToAll { inner: Some(inner) })
    }

    /// Bytes the other ranks pass to `connect` to map this rank's receive area.
    fn handle<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyBytes>> {
        let h = self.get()?.handle().map_err(to_py)?;
        Ok(PyBytes::new(py, &h))
    }

    /// Maps every peer from the handles of all ranks, indexed by rank.
    fn connect(&mut self, py: Python<'_>, handles: Vec<Vec<u8>>) -> PyResult<()> {
        let a = self
            .inner
            .as_mut()
            .ok_or_else(|| raise(Class::AllToAll, "the all-to-all was closed"))?;
        py.allow_threads(|| a.connect(&handles)).map_err(to_py)
    }

    #[pyo3(signature = (stream, x, x_stride, scales, s_stride, idx, idx64, idx_stride, weights,
                        w_stride, num_tokens, num_tokens_ptr))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch_send(
        &self,
        stream: usize,
        x: u64,
        x_stride: i64,
        scales: u64,
        s_stride: i64,
        idx: u64,
        idx64: bool,
        idx_stride: i64,
        weights: u64,
        w_stride: i64,
        num_tokens: Option<usize>,
        num_tokens_ptr: u64,
    ) -> PyResult<()> {
        let s = self.stream(stream)?;
        let args = a2a::DispatchArgs {
            x,
            x_stride,
            scales,
            s_stride,
            idx,
            idx64,
            idx_stride,
            weights,
            w_stride,
            num_tokens,
            num_tokens_ptr,
        };
        // SAFETY: stolon.moe checked the tensors' devices, shapes, dtypes and strides and keeps
        // them referenced; the caching allocator does not reuse them before the stream passes.
        unsafe { self.get()?.dispatch_send(&s, &args) }.map_err(to_py)
    }

    fn dispatch_recv(
        &self,
        stream: usize,
        out_x: u64,
        out_s: u64,
        counts: u64,
        offsets: u64,
    ) -> PyResult<()> {
        let s = self.stream(stream)?;
        let o = a2a::DispatchOutputs {
            out_x,
            out_s,
            counts,
            offsets,
        };
        // SAFETY: as in dispatch_send; stolon.moe allocated the outputs with capacity rows.
        unsafe { self.get()?.dispatch_recv(&s, &o) }.map_err(to_py)
    }

    /// A whole dispatch (both halves, or the overlapped form); returns whether it overlapped.
    #[pyo3(signature = (stream, x, x_stride, scales, s_stride, idx, idx64, idx_stride, weights,
                        w_stride, num_tokens, num_tokens_ptr, out_x, out_s, counts, offsets,
                        overlap))]
    #[allow(clippy::too_many_arguments)]
    fn dispatch(
        &self,
        stream: usize,
        x: u64,
        x_stride: i64,
        scales: u64,
        s_stride: i64,
        idx: u64,
        idx64: bool,
        idx_stride: i64,
        weights: u64,
        w_stride: i64,
        num_tokens: Option<usize>,
        num_tokens_ptr: u64,
        out_x: u64,
        out_s: u64,
        counts: u64,
        offsets: u64,
        overlap: Option<bool>,
    ) -> PyResult<bool> {
        let s = self.stream(stream)?;
        let args = a2a::DispatchArgs {
            x,
            x_stride,
            scales,
            s_stride,
            idx,
            idx64,
            idx_stride,
            weights,
            w_stride,
            num_tokens,
            num_tokens_ptr,
        };
        let o = a2a::DispatchOutputs {
            out_x,
            out_s,
            counts,
            offsets,
        };
        // SAFETY: as in dispatch_send and dispatch_recv.
        unsafe { self.get()?.dispatch(&s, &args, &o, overlap) }.map_err(to_py)
    }

    /// Whether `dispatch` overlaps when not told.
    fn overlaps_by_default(&self) -> PyResult<bool> {
        Ok(self.get()?.overlaps_by_default())
    }

    fn combine_send(&self, stream: usize, y: u64, y_stride: i64) -> PyResult<()> {
        let s = self.stream(stream)?;
        let a = a2a::CombineArgs {
            y,
            y_stride,
            out: 0,
            out_stride: 0,
            accumulate: false,
        };
        // SAFETY: as in dispatch_send; stolon.moe checked y has capacity rows.
        unsafe { self.get()?.combine_send(&s, &a) }.map_err(to_py)
    }

    fn combine_recv(
        &self,
        stream: usize,
        out: u64,
        out_stride: i64,
        accumulate: bool,
    ) -> PyResult<()> {
        let s = self.stream(stream)?;
        let a = a2a::CombineArgs {
            y: 0,
            y_stride: 0,
            out,
            out_stride,
            accumulate,
        };
        // SAFETY: as in dispatch_send; stolon.moe checked out has max_tokens rows.
        unsafe { self.get()?.combine_recv(&s, &a) }.map_err(to_py)
    }

    /// A whole combine (both halves, or the overlapped form); returns whether it overlapped.
    #[pyo3(signature = (stream, y, y_stride, out, out_stride, accumulate, overlap))]
    #[allow(clippy::too_many_arguments)]
    fn combine(
        &self,
        stream: usize,
        y: u64,
        y_stride: i64,
        out: u64,
        out_stride: i64,
        accumulate: bool,
        overlap: Option<bool>,
    ) -> PyResult<bool> {
        let s = self.stream(stream)?;
        let a = a2a::CombineArgs {
            y,
            y_stride,
            out,
            out_stride,
            accumulate,
        };
        // SAFETY: as in combine_send and combine_recv.
        unsafe { self.get()?.combine(&s, &a, overlap) }.map_err(to_py)
    }

    /// Waits (GIL released) until `stream` is idle, at most `timeout` seconds; raises what a
    /// kernel recorded.
    fn synchronize(&self, py: Python<'_>, stream: usize, timeout: f64) -> PyResult<()> {
        let s = self.stream(stream)?;
        let a = self.get()?;
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.allow_threads(|| a.synchronize(&s, t)).map_err(to_py)
    }

    /// Raises what a kernel recorded, if anything (no synchronisation).
    fn check(&self) -> PyResult<()> {
        match self.get()?.error() {
            Some(e) => Err(to_py(a2a::Error::Kernel(e))),
            None => Ok(()),
        }
    }

    /// Steps completed by each phase as the kernels last reported them (no synchronisation).
    fn progress(&self) -> PyResult<[u64; 4]> {
        Ok(self.get()?.progress())
    }

    /// Steps completed by each phase (synchronous device read).
    fn steps(&self) -> PyResult<[u64; 4]> {
        self.get()?.steps().map_err(to_py)
    }

    /// Sizes: slot/meta bytes, capacity, and the device memory allocated (`footprint`).
    fn layout<'py>(&self, py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
        let l = self.get()?.layout();
        let d = PyDict::new(py);
        d.set_item("x_bytes", l.x_bytes)?;
        d.set_item("s_bytes", l.s_bytes)?;
        d.set_item("c_bytes", l.c_bytes)?;
        d.set_item("slot_bytes", l.slot_bytes)?;
        d.set_item("meta_bytes", l.meta_bytes)?;
        d.set_item("experts_per_rank", l.experts_per_rank)?;
        d.set_item("capacity", l.capacity)?;
        d.set_item("receive_area_bytes", l.rx_total)?;
        d.set_item("state_bytes", l.local_total)?;
        d.set_item("footprint_bytes", l.footprint())?;
        d.set_item("dispatch_output_bytes", l.dispatch_output_bytes())?;
        Ok(d)
    }

    /// Waits (GIL released, at most `timeout` seconds) for the peers' last writes into this
    /// rank's receive area, then unmaps the peers' areas. True when the peers went quiet.
    fn release_peers(&mut self, py: Python<'_>, timeout: f64) -> PyResult<bool> {
        let a = self
            .inner
            .as_mut()
            .ok_or_else(|| raise(Class::AllToAll, "the all-to-all was closed"))?;
        let t = Duration::from_secs_f64(timeout.max(0.0));
        py.allow_threads(|| a.release_peers(t)).map_err(to_py)
    }

    /// Waits (GIL released, at most the kernels' timeout) until the peers' last writes into
    /// this rank's receive area have landed, then frees the buffers and unmaps the peers.
    /// Call after the stream is idle. Idempotent.
    fn close(&mut self, py: Python<'_>) {
        if let Some(a) = self.inner.take() {
            py.allow_threads(move || drop(a));
        }
    }
}
