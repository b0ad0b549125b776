//! Raw CUDA driver API, loaded at run time from `libcuda.so.1`.
//!
//! This is the bottom layer: C types, constants and the table of function pointers, exactly as
//! `cuda.h` (CUDA 13.0) declares them. Nothing here checks a status code; [`crate::result`] does.
//!
//! `cuda.h` maps most API names to versioned symbols (`#define cuMemAlloc cuMemAlloc_v2`); the
//! table below names the versioned symbol the header maps to, and for the few symbols that older
//! drivers lack, the older symbol with the same signature as a fallback. `tests/abi_layout.rs`
//! checks every symbol name, struct layout and constant here against `cuda.h` when the header can
//! be found.
//!
//! C enums are passed as `u32` (all their values are non-negative and fit, so the C compiler gives
//! them an unsigned 32-bit type); a Rust `enum` would be undefined behaviour for values a newer
//! driver adds.

#![allow(non_camel_case_types, non_snake_case, missing_docs)]

use std::ffi::{c_char, c_int, c_uchar, c_uint, c_ulonglong, c_void};
use std::sync::OnceLock;

/// `CUresult`: `CUDA_SUCCESS` or an error code.
pub type CUresult = u32;
pub type CUdevice = c_int;
pub type CUdeviceptr = u64;
pub type CUmemGenericAllocationHandle = u64;
pub type CUdevice_attribute = u32;
pub type CUpointer_attribute = u32;
pub type CUmemorytype = u32;
pub type CUmemAllocationHandleType = u32;
pub type CUmemAllocationType = u32;
pub type CUmemLocationType = u32;
pub type CUmemAccess_flags = u32;
pub type CUmemAllocationGranularity_flags = u32;
pub type CUmemRangeHandleType = u32;
pub type CUlaunchAttributeID = u32;

macro_rules! opaque {
    ($($st:ident => $handle:ident),* $(,)?) => {$(
        /// An opaque driver object; only pointers to it exist.
        #[repr(C)]
        pub struct $st {
            _private: [u8; 0],
        }
        pub type $handle = *mut $st;
    )*};
}
opaque!(
    CUctx_st => CUcontext,
    CUstream_st => CUstream,
    CUevent_st => CUevent,
    CUmod_st => CUmodule,
    CUfunc_st => CUfunction,
);

// CUresult values (cudaError_enum).
pub const CUDA_SUCCESS: CUresult = 0;
pub const CUDA_ERROR_INVALID_VALUE: CUresult = 1;
pub const CUDA_ERROR_OUT_OF_MEMORY: CUresult = 2;
pub const CUDA_ERROR_NOT_INITIALIZED: CUresult = 3;
pub const CUDA_ERROR_DEINITIALIZED: CUresult = 4;
pub const CUDA_ERROR_STUB_LIBRARY: CUresult = 34;
pub const CUDA_ERROR_NO_DEVICE: CUresult = 100;
pub const CUDA_ERROR_INVALID_DEVICE: CUresult = 101;
pub const CUDA_ERROR_INVALID_CONTEXT: CUresult = 201;
pub const CUDA_ERROR_INVALID_HANDLE: CUresult = 400;
pub const CUDA_ERROR_NOT_FOUND: CUresult = 500;
pub const CUDA_ERROR_NOT_READY: CUresult = 600;
pub const CUDA_ERROR_PEER_ACCESS_ALREADY_ENABLED: CUresult = 704;
pub const CUDA_ERROR_NOT_PERMITTED: CUresult = 800;
pub const CUDA_ERROR_NOT_SUPPORTED: CUresult = 801;

// CUdevice_attribute values used by stolon.
pub const CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT: CUdevice_attribute = 16;
pub const CU_DEVICE_ATTRIBUTE_CAN_MAP_HOST_MEMORY: CUdevice_attribute = 19;
pub const CU_DEVICE_ATTRIBUTE_PCI_BUS_ID: CUdevice_attribute = 33;
pub const CU_DEVICE_ATTRIBUTE_PCI_DEVICE_ID: CUdevice_attribute = 34;
pub const CU_DEVICE_ATTRIBUTE_UNIFIED_ADDRESSING: CUdevice_attribute = 41;
pub const CU_DEVICE_ATTRIBUTE_PCI_DOMAIN_ID: CUdevice_attribute = 50;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: CUdevice_attribute = 75;
pub const CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: CUdevice_attribute = 76;
pub const CU_DEVICE_ATTRIBUTE_VIRTUAL_MEMORY_MANAGEMENT_SUPPORTED: CUdevice_attribute = 102;
pub const CU_DEVICE_ATTRIBUTE_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR_SUPPORTED: CUdevice_attribute = 103;
pub const CU_DEVICE_ATTRIBUTE_GPU_DIRECT_RDMA_SUPPORTED: CUdevice_attribute = 116;
pub const CU_DEVICE_ATTRIBUTE_CAN_USE_64_BIT_STREAM_MEM_OPS: CUdevice_attribute = 122;
pub const CU_DEVICE_ATTRIBUTE_DMA_BUF_SUPPORTED: CUdevice_attribute = 124;
pub const CU_DEVICE_ATTRIBUTE_IPC_EVENT_SUPPORTED: CUdevice_attribute = 125;

// CUpointer_attribute values.
pub const CU_POINTER_ATTRIBUTE_CONTEXT: CUpointer_attribute = 1;
pub const CU_POINTER_ATTRIBUTE_MEMORY_TYPE: CUpointer_attribute = 2;
pub const CU_POINTER_ATTRIBUTE_DEVICE_POINTER: CUpointer_attribute = 3;
pub const CU_POINTER_ATTRIBUTE_HOST_POINTER: CUpointer_attribute = 4;
pub const CU_POINTER_ATTRIBUTE_SYNC_MEMOPS: CUpointer_attribute = 6;
pub const CU_POINTER_ATTRIBUTE_BUFFER_ID: CUpointer_attribute = 7;
pub const CU_POINTER_ATTRIBUTE_IS_MANAGED: CUpointer_attribute = 8;
pub const CU_POINTER_ATTRIBUTE_DEVICE_ORDINAL: CUpointer_attribute = 9;
pub const CU_POINTER_ATTRIBUTE_IS_LEGACY_CUDA_IPC_CAPABLE: CUpointer_attribute = 10;
pub const CU_POINTER_ATTRIBUTE_RANGE_START_ADDR: CUpointer_attribute = 11;
pub const CU_POINTER_ATTRIBUTE_RANGE_SIZE: CUpointer_attribute = 12;
pub const CU_POINTER_ATTRIBUTE_MAPPED: CUpointer_attribute = 13;
pub const CU_POINTER_ATTRIBUTE_ALLOWED_HANDLE_TYPES: CUpointer_attribute = 14;
pub const CU_POINTER_ATTRIBUTE_IS_GPU_DIRECT_RDMA_CAPABLE: CUpointer_attribute = 15;
pub const CU_POINTER_ATTRIBUTE_MAPPING_SIZE: CUpointer_attribute = 18;
pub const CU_POINTER_ATTRIBUTE_MAPPING_BASE_ADDR: CUpointer_attribute = 19;

// CUmemorytype values.
pub const CU_MEMORYTYPE_HOST: CUmemorytype = 1;
pub const CU_MEMORYTYPE_DEVICE: CUmemorytype = 2;
pub const CU_MEMORYTYPE_ARRAY: CUmemorytype = 3;
pub const CU_MEMORYTYPE_UNIFIED: CUmemorytype = 4;

// cuMemHostAlloc / cuMemHostRegister flags.
pub const CU_MEMHOSTALLOC_PORTABLE: c_uint = 0x01;
pub const CU_MEMHOSTALLOC_DEVICEMAP: c_uint = 0x02;
pub const CU_MEMHOSTALLOC_WRITECOMBINED: c_uint = 0x04;
pub const CU_MEMHOSTREGISTER_PORTABLE: c_uint = 0x01;
pub const CU_MEMHOSTREGISTER_DEVICEMAP: c_uint = 0x02;
pub const CU_MEMHOSTREGISTER_IOMEMORY: c_uint = 0x04;
pub const CU_MEMHOSTREGISTER_READ_ONLY: c_uint = 0x08;

// CUipcMem_flags.
pub const CU_IPC_MEM_LAZY_ENABLE_PEER_ACCESS: c_uint = 0x1;
pub const CU_IPC_HANDLE_SIZE: usize = 64;

// Stream and event flags.
pub const CU_STREAM_DEFAULT: c_uint = 0x0;
pub const CU_STREAM_NON_BLOCKING: c_uint = 0x1;
pub const CU_EVENT_DEFAULT: c_uint = 0x0;
pub const CU_EVENT_BLOCKING_SYNC: c_uint = 0x1;
pub const CU_EVENT_DISABLE_TIMING: c_uint = 0x2;
pub const CU_EVENT_WAIT_DEFAULT: c_uint = 0x0;
pub const CU_STREAM_WAIT_VALUE_GEQ: c_uint = 0x0;
pub const CU_STREAM_WAIT_VALUE_EQ: c_uint = 0x1;
pub const CU_STREAM_WAIT_VALUE_AND: c_uint = 0x2;
pub const CU_STREAM_WAIT_VALUE_NOR: c_uint = 0x3;
pub const CU_STREAM_WRITE_VALUE_DEFAULT: c_uint = 0x0;

// CUDA virtual memory management (VMM).
pub const CU_MEM_HANDLE_TYPE_NONE: CUmemAllocationHandleType = 0x0;
pub const CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR: CUmemAllocationHandleType = 0x1;
pub const CU_MEM_HANDLE_TYPE_FABRIC: CUmemAllocationHandleType = 0x8;
pub const CU_MEM_ACCESS_FLAGS_PROT_NONE: CUmemAccess_flags = 0x0;
pub const CU_MEM_ACCESS_FLAGS_PROT_READ: CUmemAccess_flags = 0x1;
pub const CU_MEM_ACCESS_FLAGS_PROT_READWRITE: CUmemAccess_flags = 0x3;
pub const CU_MEM_LOCATION_TYPE_INVALID: CUmemLocationType = 0x0;
pub const CU_MEM_LOCATION_TYPE_DEVICE: CUmemLocationType = 0x1;
pub const CU_MEM_ALLOCATION_TYPE_INVALID: CUmemAllocationType = 0x0;
pub const CU_MEM_ALLOCATION_TYPE_PINNED: CUmemAllocationType = 0x1;
pub const CU_MEM_ALLOC_GRANULARITY_MINIMUM: CUmemAllocationGranularity_flags = 0x0;
pub const CU_MEM_ALLOC_GRANULARITY_RECOMMENDED: CUmemAllocationGranularity_flags = 0x1;

// cuMemGetHandleForAddressRange (dma-buf export of device memory, CUDA 11.7+).
pub const CU_MEM_RANGE_HANDLE_TYPE_DMA_BUF_FD: CUmemRangeHandleType = 0x1;
pub const CU_MEM_RANGE_FLAG_DMA_BUF_MAPPING_TYPE_PCIE: c_ulonglong = 0x1;

/// `CUipcMemHandle`: 64 opaque bytes, passed by value.
#[repr(C)]
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct CUipcMemHandle {
    pub reserved: [c_char; CU_IPC_HANDLE_SIZE],
}

/// `CUmemLocation`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUmemLocation {
    pub type_: CUmemLocationType,
    pub id: c_int,
}

/// The anonymous `allocFlags` struct inside `CUmemAllocationProp`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUmemAllocationPropFlags {
    pub compressionType: c_uchar,
    pub gpuDirectRDMACapable: c_uchar,
    pub usage: u16,
    pub reserved: [c_uchar; 4],
}

/// `CUmemAllocationProp`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUmemAllocationProp {
    pub type_: CUmemAllocationType,
    pub requestedHandleTypes: CUmemAllocationHandleType,
    pub location: CUmemLocation,
    pub win32HandleMetaData: *mut c_void,
    pub allocFlags: CUmemAllocationPropFlags,
}

impl Default for CUmemAllocationProp {
    fn default() -> Self {
        Self {
            type_: CU_MEM_ALLOCATION_TYPE_INVALID,
            requestedHandleTypes: CU_MEM_HANDLE_TYPE_NONE,
            location: CUmemLocation::default(),
            win32HandleMetaData: std::ptr::null_mut(),
            allocFlags: CUmemAllocationPropFlags::default(),
        }
    }
}

/// `CUmemAccessDesc`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUmemAccessDesc {
    pub location: CUmemLocation,
    pub flags: CUmemAccess_flags,
}

// cuLaunchKernelEx attributes.
pub const CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION: CUlaunchAttributeID = 6;

/// `CUlaunchAttributeValue`: a union of 64 bytes (8-byte aligned); the attributes used here
/// keep an `int` in its first four bytes.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUlaunchAttributeValue {
    pub words: [u64; 8],
}

/// `CUlaunchAttribute`.
#[repr(C)]
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct CUlaunchAttribute {
    pub id: CUlaunchAttributeID,
    pub pad: [c_char; 4],
    pub value: CUlaunchAttributeValue,
}

/// `CUlaunchConfig`.
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct CUlaunchConfig {
    pub gridDimX: c_uint,
    pub gridDimY: c_uint,
    pub gridDimZ: c_uint,
    pub blockDimX: c_uint,
    pub blockDimY: c_uint,
    pub blockDimZ: c_uint,
    pub sharedMemBytes: c_uint,
    pub hStream: CUstream,
    pub attrs: *mut CUlaunchAttribute,
    pub numAttrs: c_uint,
}

/// One entry of the driver's function table, for diagnostics and the ABI test.
#[derive(Clone, Copy, Debug)]
pub struct SymbolInfo {
    /// The API name `cuda.h` documents, e.g. `cuMemAlloc`.
    pub api: &'static str,
    /// The symbols tried, in order: first the one `cuda.h` maps the API name to.
    pub symbols: &'static [&'static str],
    /// The Rust argument types, as written in the table.
    pub args: &'static [&'static str],
    /// Bound when the driver exports it, else the field is `None` (the driver still loads).
    pub optional: bool,
}

/// Declares the driver's function table: the struct [`Driver`], the list [`SYMBOLS`] and the
/// loader. Each entry of the `required { ... }` block is `ApiName [symbols tried, first match wins] (argument types)`; every
/// function returns `CUresult`. The argument types are copied from the prototypes in `cuda.h`.
/// Entries in the trailing `optional { ... }` block are `Option`s: a driver without them still
/// loads, and the calls that need them say so ([`crate::Error::Unsupported`]).
macro_rules! driver_api {
    (
        required {
            $(
                $(#[doc = $doc:literal])*
                $field:ident [$($sym:literal),+] ($($arg:ty),* $(,)?);
            )*
        }
        optional {
            $(
                $(#[doc = $odoc:literal])*
                $ofield:ident [$($osym:literal),+] ($($oarg:ty),* $(,)?);
            )*
        }
    ) => {
        /// The driver's functions, looked up by symbol. Fields carry the API name; the symbol
        /// actually bound is listed in [`SYMBOLS`].
        pub struct Driver {
            $( $(#[doc = $doc])* pub $field: unsafe extern "C" fn($($arg),*) -> CUresult, )*
            $(
                $(#[doc = $odoc])*
                pub $ofield: Option<unsafe extern "C" fn($($oarg),*) -> CUresult>,
            )*
            /// Where the library was loaded from.
            pub path: String,
            _lib: libloading::Library,
        }

        /// Every entry of [`Driver`], in declaration order (required ones first).
        pub const SYMBOLS: &[SymbolInfo] = &[
            $( SymbolInfo {
                api: stringify!($field),
                symbols: &[$($sym),+],
                args: &[$(stringify!($arg)),*],
                optional: false,
            }, )*
            $( SymbolInfo {
                api: stringify!($ofield),
                symbols: &[$($osym),+],
                args: &[$(stringify!($oarg)),*],
                optional: true,
            }, )*
        ];

        /// Binds every entry of the table from `lib`, or names the first required one missing.
        fn resolve(lib: libloading::Library, path: String) -> Result<Driver, String> {
            Ok(Driver {
                $( $field: {
                    // SAFETY: the argument types written for this entry are the ones cuda.h
                    // declares for each symbol named (checked by tests/abi_layout.rs), all return
                    // CUresult, and the pointer is stored next to `lib`, which is never unloaded.
                    unsafe { symbol_any(&lib, &[$($sym),+]) }?
                }, )*
                $( $ofield: {
                    // SAFETY: as above; a missing optional symbol leaves the field `None`.
                    unsafe { symbol_any(&lib, &[$($osym),+]) }.ok()
                }, )*
                path,
                _lib: lib,
            })
        }
    };
}

driver_api! {
    required {
    cuGetErrorName ["cuGetErrorName"] (CUresult, *mut *const c_char);
    cuGetErrorString ["cuGetErrorString"] (CUresult, *mut *const c_char);
    cuInit ["cuInit"] (c_uint);
    cuDriverGetVersion ["cuDriverGetVersion"] (*mut c_int);

    cuDeviceGet ["cuDeviceGet"] (*mut CUdevice, c_int);
    cuDeviceGetCount ["cuDeviceGetCount"] (*mut c_int);
    cuDeviceGetName ["cuDeviceGetName"] (*mut c_char, c_int, CUdevice);
    cuDeviceGetAttribute ["cuDeviceGetAttribute"] (*mut c_int, CUdevice_attribute, CUdevice);
    cuDeviceGetPCIBusId ["cuDeviceGetPCIBusId"] (*mut c_char, c_int, CUdevice);
    cuDeviceTotalMem ["cuDeviceTotalMem_v2"] (*mut usize, CUdevice);
    cuDeviceCanAccessPeer ["cuDeviceCanAccessPeer"] (*mut c_int, CUdevice, CUdevice);
    cuDevicePrimaryCtxRetain ["cuDevicePrimaryCtxRetain"] (*mut CUcontext, CUdevice);
    cuDevicePrimaryCtxRelease ["cuDevicePrimaryCtxRelease_v2"] (CUdevice);

    cuCtxSetCurrent ["cuCtxSetCurrent"] (CUcontext);
    cuCtxGetCurrent ["cuCtxGetCurrent"] (*mut CUcontext);
    cuCtxGetDevice ["cuCtxGetDevice"] (*mut CUdevice);
    cuCtxSynchronize ["cuCtxSynchronize"] ();
    cuCtxEnablePeerAccess ["cuCtxEnablePeerAccess"] (CUcontext, c_uint);

    cuMemGetInfo ["cuMemGetInfo_v2"] (*mut usize, *mut usize);
    cuMemAlloc ["cuMemAlloc_v2"] (*mut CUdeviceptr, usize);
    cuMemFree ["cuMemFree_v2"] (CUdeviceptr);
    cuMemGetAddressRange ["cuMemGetAddressRange_v2"] (*mut CUdeviceptr, *mut usize, CUdeviceptr);
    cuMemcpy ["cuMemcpy"] (CUdeviceptr, CUdeviceptr, usize);
    cuMemcpyAsync ["cuMemcpyAsync"] (CUdeviceptr, CUdeviceptr, usize, CUstream);
    cuMemcpyHtoD ["cuMemcpyHtoD_v2"] (CUdeviceptr, *const c_void, usize);
    cuMemcpyDtoH ["cuMemcpyDtoH_v2"] (*mut c_void, CUdeviceptr, usize);
    cuMemcpyDtoD ["cuMemcpyDtoD_v2"] (CUdeviceptr, CUdeviceptr, usize);
    cuMemcpyHtoDAsync ["cuMemcpyHtoDAsync_v2"] (CUdeviceptr, *const c_void, usize, CUstream);
    cuMemcpyDtoHAsync ["cuMemcpyDtoHAsync_v2"] (*mut c_void, CUdeviceptr, usize, CUstream);
    cuMemcpyDtoDAsync ["cuMemcpyDtoDAsync_v2"] (CUdeviceptr, CUdeviceptr, usize, CUstream);
    cuMemcpyPeerAsync ["cuMemcpyPeerAsync"]
        (CUdeviceptr, CUcontext, CUdeviceptr, CUcontext, usize, CUstream);
    cuMemsetD8 ["cuMemsetD8_v2"] (CUdeviceptr, c_uchar, usize);
    cuMemsetD8Async ["cuMemsetD8Async"] (CUdeviceptr, c_uchar, usize, CUstream);

    cuMemHostAlloc ["cuMemHostAlloc"] (*mut *mut c_void, usize, c_uint);
    cuMemFreeHost ["cuMemFreeHost"] (*mut c_void);
    cuMemHostRegister ["cuMemHostRegister_v2"] (*mut c_void, usize, c_uint);
    cuMemHostUnregister ["cuMemHostUnregister"] (*mut c_void);
    cuMemHostGetDevicePointer ["cuMemHostGetDevicePointer_v2"] (*mut CUdeviceptr, *mut c_void, c_uint);
    cuPointerGetAttribute ["cuPointerGetAttribute"] (*mut c_void, CUpointer_attribute, CUdeviceptr);

    cuIpcGetMemHandle ["cuIpcGetMemHandle"] (*mut CUipcMemHandle, CUdeviceptr);
    cuIpcOpenMemHandle ["cuIpcOpenMemHandle_v2"] (*mut CUdeviceptr, CUipcMemHandle, c_uint);
    cuIpcCloseMemHandle ["cuIpcCloseMemHandle"] (CUdeviceptr);

    cuMemCreate ["cuMemCreate"]
        (*mut CUmemGenericAllocationHandle, usize, *const CUmemAllocationProp, c_ulonglong);
    cuMemRelease ["cuMemRelease"] (CUmemGenericAllocationHandle);
    cuMemRetainAllocationHandle ["cuMemRetainAllocationHandle"]
        (*mut CUmemGenericAllocationHandle, *mut c_void);
    cuMemExportToShareableHandle ["cuMemExportToShareableHandle"]
        (*mut c_void, CUmemGenericAllocationHandle, CUmemAllocationHandleType, c_ulonglong);
    cuMemImportFromShareableHandle ["cuMemImportFromShareableHandle"]
        (*mut CUmemGenericAllocationHandle, *mut c_void, CUmemAllocationHandleType);
    cuMemGetAllocationPropertiesFromHandle ["cuMemGetAllocationPropertiesFromHandle"]
        (*mut CUmemAllocationProp, CUmemGenericAllocationHandle);
    cuMemGetAllocationGranularity ["cuMemGetAllocationGranularity"]
        (*mut usize, *const CUmemAllocationProp, CUmemAllocationGranularity_flags);
    cuMemAddressReserve ["cuMemAddressReserve"]
        (*mut CUdeviceptr, usize, usize, CUdeviceptr, c_ulonglong);
    cuMemAddressFree ["cuMemAddressFree"] (CUdeviceptr, usize);
    cuMemMap ["cuMemMap"] (CUdeviceptr, usize, usize, CUmemGenericAllocationHandle, c_ulonglong);
    cuMemUnmap ["cuMemUnmap"] (CUdeviceptr, usize);
    cuMemSetAccess ["cuMemSetAccess"] (CUdeviceptr, usize, *const CUmemAccessDesc, usize);

    cuStreamCreate ["cuStreamCreate"] (*mut CUstream, c_uint);
    cuStreamDestroy ["cuStreamDestroy_v2"] (CUstream);
    cuStreamSynchronize ["cuStreamSynchronize"] (CUstream);
    cuStreamQuery ["cuStreamQuery"] (CUstream);
    cuStreamWaitEvent ["cuStreamWaitEvent"] (CUstream, CUevent, c_uint);
    /// `_v2` since CUDA 11.7 (the header maps to it); the unversioned symbol on older drivers.
    cuStreamWriteValue64 ["cuStreamWriteValue64_v2", "cuStreamWriteValue64"]
        (CUstream, CUdeviceptr, u64, c_uint);
    /// `_v2` since CUDA 11.7 (the header maps to it); the unversioned symbol on older drivers.
    cuStreamWaitValue64 ["cuStreamWaitValue64_v2", "cuStreamWaitValue64"]
        (CUstream, CUdeviceptr, u64, c_uint);

    cuEventCreate ["cuEventCreate"] (*mut CUevent, c_uint);
    cuEventRecord ["cuEventRecord"] (CUevent, CUstream);
    cuEventQuery ["cuEventQuery"] (CUevent);
    cuEventSynchronize ["cuEventSynchronize"] (CUevent);
    /// `_v2` in CUDA 13 headers, same signature; the unversioned symbol on older drivers.
    cuEventElapsedTime ["cuEventElapsedTime_v2", "cuEventElapsedTime"] (*mut f32, CUevent, CUevent);
    cuEventDestroy ["cuEventDestroy_v2"] (CUevent);

    cuModuleLoadData ["cuModuleLoadData"] (*mut CUmodule, *const c_void);
    cuModuleUnload ["cuModuleUnload"] (CUmodule);
    cuModuleGetFunction ["cuModuleGetFunction"] (*mut CUfunction, CUmodule, *const c_char);
    cuLaunchKernel ["cuLaunchKernel"] (
        CUfunction,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        c_uint,
        CUstream,
        *mut *mut c_void,
        *mut *mut c_void,
    );
    }

    optional {
        /// CUDA 11.7+: a dma-buf file descriptor for a range of device memory (the handle
        /// argument points to an `int`). Older drivers lack it.
        cuMemGetHandleForAddressRange ["cuMemGetHandleForAddressRange"]
            (*mut c_void, CUdeviceptr, usize, CUmemRangeHandleType, c_ulonglong);
        /// Sets a pointer attribute (GDRCopy wants SYNC_MEMOPS on memory it maps).
        cuPointerSetAttribute ["cuPointerSetAttribute"]
            (*const c_void, CUpointer_attribute, CUdeviceptr);
        /// CUDA 12.0+: a launch with attributes (programmatic dependent launch).
        cuLaunchKernelEx ["cuLaunchKernelEx"]
            (*const CUlaunchConfig, CUfunction, *mut *mut c_void, *mut *mut c_void);
    }
}

impl std::fmt::Debug for Driver {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Driver")
            .field("path", &self.path)
            .finish_non_exhaustive()
    }
}

/// The environment variable naming the driver library to try first.
pub const ENV_LIBCUDA: &str = "STOLON_LIBCUDA";

/// Why the driver library could not be loaded: every path tried, with the loader's answer for
/// each (or the symbol that was missing).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoadError {
    pub tried: Vec<(String, String)>,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "the CUDA driver library (libcuda.so.1) could not be loaded; tried:"
        )?;
        for (path, why) in &self.tried {
            write!(f, " [{path}: {why}]")?;
        }
        write!(
            f,
            " (it comes with the NVIDIA driver, not the CUDA toolkit; set {ENV_LIBCUDA} to its path)"
        )
    }
}

impl std::error::Error for LoadError {}

/// Candidate library paths, in the order they are tried: `$STOLON_LIBCUDA`, the loader's search
/// path (`LD_LIBRARY_PATH`, `ld.so.cache`), then where drivers and container runtimes put it.
pub fn candidate_paths() -> Vec<String> {
    let mut paths = Vec::new();
    if let Some(p) = std::env::var_os(ENV_LIBCUDA) {
        if !p.is_empty() {
            paths.push(p.to_string_lossy().into_owned());
        }
    }
    for p in [
        "libcuda.so.1",
        "/usr/lib/x86_64-linux-gnu/libcuda.so.1",
        "/usr/lib/aarch64-linux-gnu/libcuda.so.1",
        "/usr/lib64/libcuda.so.1",
        "/usr/local/nvidia/lib64/libcuda.so.1",
        "/usr/lib/wsl/lib/libcuda.so.1",
    ] {
        if !paths.iter().any(|q| q == p) {
            paths.push(p.to_string());
        }
    }
    paths
}

/// Looks up the first of `names` that the library exports.
///
/// # Safety
/// `T` must be the exact function-pointer type of every symbol in `names`.
///
/// # Errors
/// Names the symbols tried and the loader's message when none is exported.
unsafe fn symbol_any<T: Copy>(lib: &libloading::Library, names: &[&str]) -> Result<T, String> {
    let mut last = String::new();
    for name in names {
        // SAFETY: the caller promises that T matches the symbol's type.
        match unsafe { lib.get::<T>(name.as_bytes()) } {
            Ok(s) => return Ok(*s),
            Err(e) => last = e.to_string(),
        }
    }
    Err(format!(
        "missing symbol {} (the driver is too old: stolon needs CUDA 11.7 or newer): {last}",
        names.join(" or ")
    ))
}

/// Loads the first of `paths` that opens and exports every symbol in [`SYMBOLS`]. Not cached:
/// [`driver`] is the process-wide instance.
///
/// # Errors
/// A [`LoadError`] with every path tried and why each failed.
pub fn load_from<S: AsRef<str>>(paths: &[S]) -> Result<Driver, LoadError> {
    let mut tried = Vec::new();
    for path in paths {
        let path = path.as_ref().to_string();
        // SAFETY: loading libcuda runs its constructors, which only set up the driver's own
        // state; it does not initialise a GPU until cuInit.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(e) => {
                // dlerror() starts with the path; don't say it twice.
                let why = e.to_string();
                let why = why
                    .strip_prefix(&format!("{path}: "))
                    .unwrap_or(&why)
                    .to_string();
                tried.push((path, why));
                continue;
            }
        };
        match resolve(lib, path.clone()) {
            Ok(d) => return Ok(d),
            Err(e) => tried.push((path, e)),
        }
    }
    Err(LoadError { tried })
}

/// The process-wide driver library, loaded on first use from [`candidate_paths`]. Loading does
/// not call `cuInit`; [`crate::result::driver`] does.
///
/// # Errors
/// The cached [`LoadError`] when no candidate loaded.
pub fn driver() -> Result<&'static Driver, LoadError> {
    static LIB: OnceLock<Result<Driver, LoadError>> = OnceLock::new();
    LIB.get_or_init(|| load_from(&candidate_paths()))
        .as_ref()
        .map_err(Clone::clone)
}

/// Whether `libcuda.so.1` can be loaded (it may still find no GPU; see [`crate::is_present`]).
pub fn is_loadable() -> bool {
    driver().is_ok()
}
