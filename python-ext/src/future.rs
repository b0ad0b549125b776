//! Transfers in flight and prepared: `TransferFuture`, `PreparedTransfer`.

use std::time::Duration;

use fabric_lib as fl;
use pyo3::prelude::*;

use crate::args::dur;
use crate::errors::{invalid, to_py};

/// A submitted transfer: wait on it, poll it, or attach a callback.
#[pyclass(module = "stolon._native", frozen)]
pub(crate) struct TransferFuture {
    pub(crate) inner: fl::Transfer,
}

pub(crate) fn call_with_result(cb: Py<PyAny>, r: fl::Result<()>) {
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

/// A validated, planned transfer not submitted yet: `engine.submit(p)` or a watch step.
#[pyclass(module = "stolon._native", frozen)]
pub(crate) struct PreparedTransfer {
    pub(crate) inner: std::sync::Mutex<Option<fl::Prepared>>,
    pub(crate) imm_counts: Vec<usize>,
}

impl PreparedTransfer {
    pub(crate) fn wrap(p: fl::Prepared) -> Self {
        let imm_counts = p.imm_counts().to_vec();
        PreparedTransfer {
            inner: std::sync::Mutex::new(Some(p)),
            imm_counts,
        }
    }
    pub(crate) fn take(&self) -> PyResult<fl::Prepared> {
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
