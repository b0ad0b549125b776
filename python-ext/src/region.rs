//! Registered memory: `MemoryRegion`, and the Python owner a region keeps alive.

use fabric_lib as fl;
use pyo3::prelude::*;

use crate::wire::MemoryDescriptor;

/// A registered local memory region.
#[pyclass(module = "stolon._native", frozen)]
pub(crate) struct MemoryRegion {
    pub(crate) inner: fl::MemoryRegion,
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

pub(crate) fn boxed_owner(owner: Option<PyObject>) -> Option<Box<dyn std::any::Any + Send + Sync>> {
    owner.map(|o| Box::new(Owner(Some(o))) as Box<dyn std::any::Any + Send + Sync>)
}
