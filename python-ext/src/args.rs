//! Arguments as Python passes them: completion levels, timeouts, sharding, bytes-like objects.

use std::time::Duration;

use fabric_lib as fl;
use pyo3::prelude::*;
use pyo3::types::{PyBytes, PyMemoryView};

use crate::errors::{invalid, to_py};

/// `completion=` of a call: None keeps the engine's default.
pub(crate) fn completion(c: Option<&str>) -> PyResult<Option<fl::Completion>> {
    c.map(fl::Completion::parse).transpose().map_err(to_py)
}

/// Applies a call's `completion=` to a prepared transfer.
pub(crate) fn with_completion(p: fl::Prepared, c: Option<&str>) -> PyResult<fl::Prepared> {
    Ok(match completion(c)? {
        Some(c) => p.with_completion(c),
        None => p,
    })
}

pub(crate) fn dur(seconds: Option<f64>) -> PyResult<Option<Duration>> {
    match seconds {
        None => Ok(None),
        // Anything beyond ~31 years means "practically forever" (and keeps Instant + timeout from
        // overflowing).
        Some(s) if s.is_finite() && s >= 0.0 => Ok(Some(Duration::from_secs_f64(s.min(1e9)))),
        Some(s) => Err(invalid(format!("bad timeout {s}"))),
    }
}

pub(crate) fn sharding(s: Option<&str>, pin: Option<usize>) -> PyResult<Option<fl::Sharding>> {
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
pub(crate) fn with_bytes<R>(data: &Bound<'_, PyAny>, f: impl FnOnce(&[u8]) -> R) -> PyResult<R> {
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
