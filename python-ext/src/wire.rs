//! What travels between engines as bytes: `Address` and `MemoryDescriptor`.

use fabric_lib as fl;
use pyo3::prelude::*;
use pyo3::types::PyBytes;

use crate::args::with_bytes;
use crate::errors::to_py;

/// One `#[pymethods]` block for a class that wraps a wire type (`inner: $wire`, which has
/// `from_bytes`, `from_text`, `to_bytes` and `to_text`): the byte, text and pickle methods they
/// share, followed by the class's own methods (`$own`).
macro_rules! wire_class {
    ($class:ident, $wire:ty, { $($own:tt)* }) => {
        #[pymethods]
        impl $class {
            #[staticmethod]
            fn from_bytes(data: &Bound<'_, PyAny>) -> PyResult<Self> {
                with_bytes(data, <$wire>::from_bytes)?
                    .map(|inner| $class { inner })
                    .map_err(to_py)
            }
            #[staticmethod]
            fn from_text(text: &str) -> PyResult<Self> {
                <$wire>::from_text(text)
                    .map(|inner| $class { inner })
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
            /// Pickles as its bytes.
            fn __reduce__<'py>(
                &self,
                py: Python<'py>,
            ) -> PyResult<(Bound<'py, PyAny>, (Bound<'py, PyBytes>,))> {
                let f = py.get_type::<$class>().getattr("from_bytes")?;
                Ok((f, (self.to_bytes(py),)))
            }
            $($own)*
        }
    };
}

/// An engine's address: what a peer needs to reach it. Serializes to bytes and text.
#[pyclass(module = "stolon._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct Address {
    pub(crate) inner: fl::PeerAddr,
}

wire_class!(Address, fl::PeerAddr, {
    fn __repr__(&self) -> String {
        format!(
            "Address(engine={:016x}, domains={:?})",
            self.inner.engine_id,
            self.providers()
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
});

/// What a peer needs to write into a registered region: owner address, bounds, keys.
#[pyclass(module = "stolon._native", frozen, eq, hash)]
#[derive(Clone, PartialEq, Eq, Hash)]
pub(crate) struct MemoryDescriptor {
    pub(crate) inner: fl::MemDesc,
}

wire_class!(MemoryDescriptor, fl::MemDesc, {
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
});
