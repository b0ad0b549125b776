//! Raw bindings to native libraries that are loaded at run time.
//!
//! Nothing here links against a native library: each one is `dlopen`ed on first use, so the crate
//! builds and the Python wheel imports on machines that have none of them.

pub mod libfabric;
