//! Every error that reaches Python, converted in one place.
//!
//! The exception classes are defined once, in `python/stolon/errors.py`; [`Class`] names the
//! ones the native module raises, and they are looked up once per interpreter. Each error type
//! of the Rust crates (`fabric_lib::Error`, `stolon_cuda::Error`, `p2p_all_to_all::Error`) is
//! classified by an exhaustive `match` (none of them is `#[non_exhaustive]`), so a new variant
//! does not compile until it is given a class. `_error_classes()` lists the names for the test
//! that checks each one exists in `stolon.errors`.

use std::fmt::Display;

use fabric_lib as fl;
use p2p_all_to_all as a2a;
use pyo3::exceptions::{PyOverflowError, PyRuntimeError};
use pyo3::prelude::*;
use pyo3::sync::GILOnceCell;
use pyo3::types::PyType;

/// Defines [`Class`] with its list of every variant and each variant's Python name.
macro_rules! classes {
    ($($variant:ident => $name:literal,)*) => {
        /// A `stolon.errors` class the native module raises.
        #[derive(Clone, Copy, Debug, PartialEq, Eq)]
        pub(crate) enum Class {
            $($variant,)*
        }

        impl Class {
            /// Every class, in declaration order (index = discriminant).
            const ALL: &'static [Class] = &[$(Class::$variant,)*];

            /// The class's name in `stolon.errors`.
            pub(crate) fn name(self) -> &'static str {
                match self {
                    $(Class::$variant => $name,)*
                }
            }
        }
    };
}

classes! {
    LibraryNotFound => "LibraryNotFoundError",
    ProviderNotFound => "ProviderNotFoundError",
    RdmaUnavailable => "RdmaUnavailableError",
    Fabric => "FabricError",
    Config => "ConfigError",
    OutOfBounds => "OutOfBoundsError",
    Unregistered => "UnregisteredMemoryError",
    DomainMismatch => "DomainMismatchError",
    Decode => "DecodeError",
    InvalidArgument => "InvalidArgumentError",
    MessageTooLarge => "MessageTooLargeError",
    Transfer => "TransferError",
    WriteRejected => "WriteRejectedError",
    TransferTimeout => "TransferTimeoutError",
    EngineStopped => "EngineStoppedError",
    Cuda => "CudaError",
    CudaUnavailable => "CudaUnavailableError",
    AllToAll => "AllToAllError",
    AllToAllTimeout => "AllToAllTimeoutError",
}

/// An error type of one of the crates: which class it becomes in Python.
pub(crate) trait Classify: Display {
    fn class(&self) -> Class;
}

impl Classify for fl::Error {
    fn class(&self) -> Class {
        match self {
            fl::Error::LibraryNotFound(_) => Class::LibraryNotFound,
            fl::Error::ProviderNotFound { .. } => Class::ProviderNotFound,
            fl::Error::RdmaUnavailable(_) => Class::RdmaUnavailable,
            fl::Error::Fabric { .. } => Class::Fabric,
            fl::Error::Config(_) => Class::Config,
            fl::Error::OutOfBounds(_) => Class::OutOfBounds,
            fl::Error::Unregistered(_) => Class::Unregistered,
            fl::Error::DomainMismatch(_) => Class::DomainMismatch,
            fl::Error::Decode { .. } => Class::Decode,
            fl::Error::InvalidArgument(_) => Class::InvalidArgument,
            fl::Error::MessageTooLarge { .. } => Class::MessageTooLarge,
            fl::Error::TransferFailed(_) => Class::Transfer,
            fl::Error::Rejected(_) => Class::WriteRejected,
            fl::Error::Timeout(_) => Class::TransferTimeout,
            fl::Error::CudaDriver(e) => e.class(),
            fl::Error::Cuda(_) => Class::Cuda,
            fl::Error::Stopped => Class::EngineStopped,
        }
    }
}

impl Classify for stolon_cuda::Error {
    fn class(&self) -> Class {
        use stolon_cuda::Error as E;
        match self {
            // CUDA is not usable here at all, or not for this feature (GDRCopy missing, a
            // driver too old to export an entry point): callers fall back to something else.
            E::LibraryNotFound(_) | E::NoDevice | E::Forked | E::Unsupported { .. } => {
                Class::CudaUnavailable
            }
            // The driver's stub library (a container without the real driver).
            E::Driver { .. } if self.is_unavailable() => Class::CudaUnavailable,
            E::Driver { .. }
            | E::InvalidDevice { .. }
            | E::InvalidArgument(_)
            | E::Timeout { .. } => Class::Cuda,
        }
    }
}

impl Classify for a2a::Error {
    fn class(&self) -> Class {
        match self {
            a2a::Error::InvalidArgument(_) => Class::InvalidArgument,
            a2a::Error::Cuda(c) => c.class(),
            a2a::Error::NoKernels | a2a::Error::KernelBuild(_) => Class::CudaUnavailable,
            a2a::Error::Handshake(_) | a2a::Error::Proxy(_) => Class::AllToAll,
            a2a::Error::Kernel(k) if k.code == 1 => Class::AllToAllTimeout,
            a2a::Error::Kernel(_) => Class::AllToAll,
            a2a::Error::Timeout(_) => Class::AllToAllTimeout,
        }
    }
}

/// Converts any of the crates' errors into its `stolon.errors` exception.
pub(crate) fn to_py<E: Classify>(e: E) -> PyErr {
    raise(e.class(), e.to_string())
}

/// An instance of `class` carrying `msg`.
pub(crate) fn raise(class: Class, msg: impl Into<String>) -> PyErr {
    let msg = msg.into();
    Python::with_gil(|py| match classes(py) {
        Ok(all) => {
            let cls = all[class as usize].bind(py);
            match cls.call1((msg,)) {
                Ok(inst) => PyErr::from_value(inst),
                Err(err) => err,
            }
        }
        Err(err) => err,
    })
}

/// An `InvalidArgumentError`.
pub(crate) fn invalid(msg: impl Into<String>) -> PyErr {
    raise(Class::InvalidArgument, msg)
}

/// The classes, looked up in `stolon.errors` once per interpreter (every one must exist).
fn classes(py: Python<'_>) -> PyResult<&'static [Py<PyType>]> {
    static CLASSES: GILOnceCell<Vec<Py<PyType>>> = GILOnceCell::new();
    CLASSES
        .get_or_try_init(py, || {
            let module = py.import("stolon.errors")?;
            Class::ALL
                .iter()
                .map(|c| {
                    let obj = module.getattr(c.name()).map_err(|e| {
                        PyRuntimeError::new_err(format!(
                            "stolon.errors has no class {} ({e}); the package and its native \
                             module do not match",
                            c.name()
                        ))
                    })?;
                    Ok(obj.downcast_into::<PyType>()?.unbind())
                })
                .collect()
        })
        .map(Vec::as_slice)
}

/// Names of every class the native module raises (for the test that each exists).
#[pyfunction]
pub(crate) fn _error_classes() -> Vec<&'static str> {
    Class::ALL.iter().map(|c| c.name()).collect()
}

/// An integer argument that must fit `T` (an offset, a length, an immediate...). Out of range
/// (negative, too large) it raises `InvalidArgumentError` instead of PyO3's `OverflowError`, so
/// `except stolon.StolonError` catches it; a non-integer stays a `TypeError`.
#[derive(Clone, Copy, Debug)]
pub(crate) struct Int<T>(pub T);

impl<'py, T> FromPyObject<'py> for Int<T>
where
    T: FromPyObject<'py>,
{
    fn extract_bound(obj: &Bound<'py, PyAny>) -> PyResult<Self> {
        match obj.extract::<T>() {
            Ok(v) => Ok(Int(v)),
            Err(e) if e.is_instance_of::<PyOverflowError>(obj.py()) => Err(invalid(format!(
                "integer {} out of range for {}",
                obj.str().map(|s| s.to_string()).unwrap_or_default(),
                short_type_name::<T>()
            ))),
            Err(e) => Err(e),
        }
    }
}

/// `u64` for `core::primitive::u64`, with the range it allows.
fn short_type_name<T>() -> String {
    let name = std::any::type_name::<T>();
    let name = name.rsplit("::").next().unwrap_or(name);
    let range = match name {
        "u8" => format!("0..={}", u8::MAX),
        "u16" => format!("0..={}", u16::MAX),
        "u32" => format!("0..={}", u32::MAX),
        "u64" => format!("0..={}", u64::MAX),
        "usize" => format!("0..={}", usize::MAX),
        "i32" => format!("{}..={}", i32::MIN, i32::MAX),
        "i64" => format!("{}..={}", i64::MIN, i64::MAX),
        _ => return name.to_string(),
    };
    format!("{name} ({range})")
}

/// Unwraps a list of [`Int`]s.
pub(crate) fn ints<T>(v: Vec<Int<T>>) -> Vec<T> {
    v.into_iter().map(|i| i.0).collect()
}
