//! Facts about the machine: `cuda_info`, `libfabric_info`, `list_providers`.

use fabric_lib as fl;
use pyo3::prelude::*;
use pyo3::types::{PyDict, PyList, PyTuple};

use crate::errors::to_py;

pub(crate) fn attrs_dict<'py>(
    py: Python<'py>,
    a: &fl::DomainAttrs,
) -> PyResult<Bound<'py, PyDict>> {
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
pub(crate) fn cuda_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
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
pub(crate) fn libfabric_info<'py>(py: Python<'py>) -> PyResult<Bound<'py, PyDict>> {
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
pub(crate) fn list_providers<'py>(
    py: Python<'py>,
    provider: Option<&str>,
) -> PyResult<Bound<'py, PyList>> {
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
