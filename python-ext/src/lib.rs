//! `stolon._native`: a thin PyO3 layer over fabric-lib. It converts types and errors and releases
//! the GIL around everything that waits; all logic lives in fabric-lib. The public Python API is
//! `python/stolon/`, which re-exports these classes.

mod args;
mod engine;
mod errors;
mod future;
mod gpu;
mod info;
mod moe;
mod region;
mod wire;

use pyo3::prelude::*;

#[pymodule]
fn _native(m: &Bound<'_, PyModule>) -> PyResult<()> {
    m.add_class::<engine::TransferEngine>()?;
    m.add_class::<future::TransferFuture>()?;
    m.add_class::<region::MemoryRegion>()?;
    m.add_class::<wire::MemoryDescriptor>()?;
    m.add_class::<wire::Address>()?;
    m.add_class::<gpu::HostCounter>()?;
    m.add_class::<gpu::GpuFlag>()?;
    m.add_class::<future::PreparedTransfer>()?;
    m.add_class::<moe::MoeAllToAll>()?;
    m.add_function(wrap_pyfunction!(info::cuda_info, m)?)?;
    m.add_function(wrap_pyfunction!(info::libfabric_info, m)?)?;
    m.add_function(wrap_pyfunction!(info::list_providers, m)?)?;
    m.add_function(wrap_pyfunction!(errors::_error_classes, m)?)?;
    Ok(())
}
