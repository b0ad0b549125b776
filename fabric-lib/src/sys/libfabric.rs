//! Raw libfabric 1.17 ABI, loaded at run time.
//!
//! libfabric exports only a handful of functions (`fi_getinfo`, `fi_fabric`, ...). Everything on
//! the data path is an inline function in the C headers that calls through function tables stored
//! in the objects themselves, so this module mirrors the 1.17 struct layouts (`#[repr(C)]`) and
//! calls through those tables. `tests/abi_layout.rs` checks every offset against the installed C
//! headers when they are present.
//!
//! Only the members stolon uses are typed; other table slots are kept as opaque pointers so that
//! the offsets stay right.

#![allow(non_camel_case_types, missing_docs)]

use std::ffi::{c_char, c_int, c_void, CStr};
use std::path::PathBuf;
use std::sync::OnceLock;

pub type fi_addr_t = u64;
pub const FI_ADDR_UNSPEC: fi_addr_t = u64::MAX;
pub const FI_ADDR_NOTAVAIL: fi_addr_t = u64::MAX;

pub const fn fi_version(major: u32, minor: u32) -> u32 {
    (major << 16) | minor
}
/// The API version stolon asks for; newer runtimes accept it too (see shared/LIBFABRIC.md).
pub const FI_VERSION_REQUESTED: u32 = fi_version(1, 17);

// Capability and flag bits (fabric.h).
pub const FI_MSG: u64 = 1 << 1;
pub const FI_RMA: u64 = 1 << 2;
pub const FI_READ: u64 = 1 << 8;
pub const FI_WRITE: u64 = 1 << 9;
pub const FI_RECV: u64 = 1 << 10;
pub const FI_SEND: u64 = 1 << 11;
pub const FI_TRANSMIT: u64 = FI_SEND;
pub const FI_REMOTE_READ: u64 = 1 << 12;
pub const FI_REMOTE_WRITE: u64 = 1 << 13;
pub const FI_REMOTE_CQ_DATA: u64 = 1 << 17;
pub const FI_COMPLETION: u64 = 1 << 24;
pub const FI_DELIVERY_COMPLETE: u64 = 1 << 28;
pub const FI_HMEM: u64 = 1 << 47;
pub const FI_SOURCE: u64 = 1 << 57;
// Mode bits.
pub const FI_CONTEXT: u64 = 1 << 59;
pub const FI_RX_CQ_DATA: u64 = 1 << 56;
pub const FI_CONTEXT2: u64 = 1 << 52;
// Memory registration modes.
pub const FI_MR_LOCAL: c_int = 1 << 2;
pub const FI_MR_VIRT_ADDR: c_int = 1 << 4;
pub const FI_MR_ALLOCATED: c_int = 1 << 5;
pub const FI_MR_PROV_KEY: c_int = 1 << 6;
pub const FI_MR_ENDPOINT: c_int = 1 << 9;
pub const FI_MR_HMEM: c_int = 1 << 10;

pub const FI_EP_RDM: c_int = 3;
pub const FI_AV_TABLE: c_int = 2;
pub const FI_THREAD_DOMAIN: c_int = 3;
pub const FI_CQ_FORMAT_DATA: c_int = 3;
pub const FI_WAIT_NONE: c_int = 0;
pub const FI_WAIT_FD: c_int = 3;
/// `fi_control` command that returns a CQ's wait object (a file descriptor for FI_WAIT_FD).
pub const FI_GETWAIT: c_int = 5;
/// `fi_control` command that enables an endpoint.
pub const FI_ENABLE: c_int = 6;

// Error numbers (fi_errno.h): POSIX values plus libfabric's own from 256 up.
pub const FI_EAGAIN: isize = libc::EAGAIN as isize;
pub const FI_EAVAIL: isize = 259;
pub const FI_ENOKEY: isize = 266;
pub const FI_ECANCELED: c_int = libc::ECANCELED;

#[repr(C)]
pub struct fi_tx_attr {
    pub caps: u64,
    pub mode: u64,
    pub op_flags: u64,
    pub msg_order: u64,
    pub comp_order: u64,
    pub inject_size: usize,
    pub size: usize,
    pub iov_limit: usize,
    pub rma_iov_limit: usize,
    pub tclass: u32,
}

#[repr(C)]
pub struct fi_rx_attr {
    pub caps: u64,
    pub mode: u64,
    pub op_flags: u64,
    pub msg_order: u64,
    pub comp_order: u64,
    pub total_buffered_recv: usize,
    pub size: usize,
    pub iov_limit: usize,
}

#[repr(C)]
pub struct fi_ep_attr {
    pub type_: c_int,
    pub protocol: u32,
    pub protocol_version: u32,
    pub max_msg_size: usize,
    pub msg_prefix_size: usize,
    pub max_order_raw_size: usize,
    pub max_order_war_size: usize,
    pub max_order_waw_size: usize,
    pub mem_tag_format: u64,
    pub tx_ctx_cnt: usize,
    pub rx_ctx_cnt: usize,
    pub auth_key_size: usize,
    pub auth_key: *mut u8,
}

#[repr(C)]
pub struct fi_domain_attr {
    pub domain: *mut fid_domain,
    pub name: *mut c_char,
    pub threading: c_int,
    pub control_progress: c_int,
    pub data_progress: c_int,
    pub resource_mgmt: c_int,
    pub av_type: c_int,
    pub mr_mode: c_int,
    pub mr_key_size: usize,
    pub cq_data_size: usize,
    pub cq_cnt: usize,
    pub ep_cnt: usize,
    pub tx_ctx_cnt: usize,
    pub rx_ctx_cnt: usize,
    pub max_ep_tx_ctx: usize,
    pub max_ep_rx_ctx: usize,
    pub max_ep_stx_ctx: usize,
    pub max_ep_srx_ctx: usize,
    pub cntr_cnt: usize,
    pub mr_iov_limit: usize,
    pub caps: u64,
    pub mode: u64,
    pub auth_key: *mut u8,
    pub auth_key_size: usize,
    pub max_err_data: usize,
    pub mr_cnt: usize,
    pub tclass: u32,
}

#[repr(C)]
pub struct fi_fabric_attr {
    pub fabric: *mut fid_fabric,
    pub name: *mut c_char,
    pub prov_name: *mut c_char,
    pub prov_version: u32,
    pub api_version: u32,
}

#[repr(C)]
pub struct fi_info {
    pub next: *mut fi_info,
    pub caps: u64,
    pub mode: u64,
    pub addr_format: u32,
    pub src_addrlen: usize,
    pub dest_addrlen: usize,
    pub src_addr: *mut c_void,
    pub dest_addr: *mut c_void,
    pub handle: *mut fid,
    pub tx_attr: *mut fi_tx_attr,
    pub rx_attr: *mut fi_rx_attr,
    pub ep_attr: *mut fi_ep_attr,
    pub domain_attr: *mut fi_domain_attr,
    pub fabric_attr: *mut fi_fabric_attr,
    pub nic: *mut c_void,
}

type Opaque = *const c_void;

#[repr(C)]
pub struct fi_ops {
    pub size: usize,
    pub close: unsafe extern "C" fn(*mut fid) -> c_int,
    pub bind: unsafe extern "C" fn(*mut fid, *mut fid, u64) -> c_int,
    pub control: unsafe extern "C" fn(*mut fid, c_int, *mut c_void) -> c_int,
    pub ops_open: Opaque,
    pub tostr: Opaque,
    pub ops_set: Opaque,
}

#[repr(C)]
pub struct fid {
    pub fclass: usize,
    pub context: *mut c_void,
    pub ops: *mut fi_ops,
}

#[repr(C)]
pub struct fi_ops_fabric {
    pub size: usize,
    pub domain: unsafe extern "C" fn(
        *mut fid_fabric,
        *mut fi_info,
        *mut *mut fid_domain,
        *mut c_void,
    ) -> c_int,
    pub passive_ep: Opaque,
    pub eq_open: Opaque,
    pub wait_open: Opaque,
    pub trywait: unsafe extern "C" fn(*mut fid_fabric, *mut *mut fid, c_int) -> c_int,
}

#[repr(C)]
pub struct fid_fabric {
    pub fid: fid,
    pub ops: *mut fi_ops_fabric,
    pub api_version: u32,
}

#[repr(C)]
pub struct fi_cq_attr {
    pub size: usize,
    pub flags: u64,
    pub format: c_int,
    pub wait_obj: c_int,
    pub signaling_vector: c_int,
    pub wait_cond: c_int,
    pub wait_set: *mut c_void,
}

#[repr(C)]
pub struct fi_av_attr {
    pub type_: c_int,
    pub rx_ctx_bits: c_int,
    pub count: usize,
    pub ep_per_node: usize,
    pub name: *const c_char,
    pub map_addr: *mut c_void,
    pub flags: u64,
}

#[repr(C)]
pub struct fi_ops_domain {
    pub size: usize,
    pub av_open: unsafe extern "C" fn(
        *mut fid_domain,
        *mut fi_av_attr,
        *mut *mut fid_av,
        *mut c_void,
    ) -> c_int,
    pub cq_open: unsafe extern "C" fn(
        *mut fid_domain,
        *mut fi_cq_attr,
        *mut *mut fid_cq,
        *mut c_void,
    ) -> c_int,
    pub endpoint:
        unsafe extern "C" fn(*mut fid_domain, *mut fi_info, *mut *mut fid_ep, *mut c_void) -> c_int,
    pub scalable_ep: Opaque,
    pub cntr_open: Opaque,
    pub poll_open: Opaque,
    pub stx_ctx: Opaque,
    pub srx_ctx: Opaque,
    pub query_atomic: Opaque,
    pub query_collective: Opaque,
}

#[repr(C)]
pub struct fi_ops_mr {
    pub size: usize,
    #[allow(clippy::type_complexity)]
    pub reg: unsafe extern "C" fn(
        *mut fid,
        *const c_void,
        usize,
        u64,
        u64,
        u64,
        u64,
        *mut *mut fid_mr,
        *mut c_void,
    ) -> c_int,
    pub regv: Opaque,
    pub regattr: unsafe extern "C" fn(*mut fid, *const fi_mr_attr, u64, *mut *mut fid_mr) -> c_int,
}

/// `struct fi_mr_attr` as of 1.17 (the layout providers use for API version 1.17).
#[repr(C)]
pub struct fi_mr_attr {
    pub mr_iov: *const libc::iovec,
    pub iov_count: usize,
    pub access: u64,
    pub offset: u64,
    pub requested_key: u64,
    pub context: *mut c_void,
    pub auth_key_size: usize,
    pub auth_key: *mut u8,
    pub iface: c_int,
    /// The `device` union: `int cuda` sits in its first bytes.
    pub device: u64,
}

/// `enum fi_hmem_iface`: CUDA device memory.
pub const FI_HMEM_CUDA: c_int = 1;

// ---------------------------------------------------------------------------------------------
// libfabric 1.20: dma-buf registration. The installed headers are 1.17, which lack all of this;
// the layout below is copied from libfabric v1.20's `include/rdma/fi_domain.h` (`struct
// fi_mr_dmabuf`, the anonymous union that replaced `mr_iov` as the first member of `struct
// fi_mr_attr`, and the members appended after `device`: `hmem_data` since 1.18, then
// `page_size`, `base_mr`, `sub_mr_cnt`), and `FI_MR_DMABUF` from the same header. Only the
// union, the 1.17 members and `FI_MR_DMABUF` are relied on; the appended members are passed
// zeroed (their documented defaults), so a runtime that reads fewer of them is unaffected.
// `tests` below pin every size and offset; the 1.17 prefix is checked to coincide with
// [`fi_mr_attr`], which `tests/abi_layout.rs` checks against the installed header.

/// The API version that introduced `FI_MR_DMABUF`.
pub const FI_VERSION_DMABUF: u32 = fi_version(1, 20);

/// `fi_mr_regattr` flag (1.20): `attr.dmabuf` names a dma-buf instead of `attr.mr_iov`.
pub const FI_MR_DMABUF: u64 = 1 << 40;

/// `struct fi_mr_dmabuf` (1.20): `len` bytes at `offset` in the dma-buf `fd`, whose first byte
/// the application addresses as `base_addr` (so the region's address is `base_addr + offset`).
#[repr(C)]
#[derive(Clone, Copy, Debug)]
pub struct fi_mr_dmabuf {
    pub fd: c_int,
    pub offset: u64,
    pub len: usize,
    pub base_addr: *mut c_void,
}

/// The anonymous union at the start of the 1.20 `struct fi_mr_attr`.
#[repr(C)]
#[derive(Clone, Copy)]
pub union fi_mr_attr_mem {
    pub mr_iov: *const libc::iovec,
    pub dmabuf: *const fi_mr_dmabuf,
}

/// `struct fi_mr_attr` as of 1.20. Pass it (cast to `*const fi_mr_attr`) only to a domain
/// opened with API version >= [`FI_VERSION_DMABUF`]; providers read the members the
/// application's API version defines.
#[repr(C)]
pub struct fi_mr_attr_v1_20 {
    pub mem: fi_mr_attr_mem,
    pub iov_count: usize,
    pub access: u64,
    pub offset: u64,
    pub requested_key: u64,
    pub context: *mut c_void,
    pub auth_key_size: usize,
    pub auth_key: *mut u8,
    pub iface: c_int,
    /// The `device` union: `int cuda` sits in its first bytes.
    pub device: u64,
    pub hmem_data: *mut c_void,
    pub page_size: usize,
    pub base_mr: *const fid_mr,
    pub sub_mr_cnt: usize,
}

/// The API version to open a domain with: 1.20 where the runtime has it and the domain is to
/// register GPU memory (so `FI_MR_DMABUF` is understood), else 1.17 (what every runtime
/// accepts; LIBFABRIC.md). With libfabric 1.17 this is always 1.17.
pub fn api_version_for(runtime: (u32, u32), hmem: bool) -> u32 {
    if hmem && fi_version(runtime.0, runtime.1) >= FI_VERSION_DMABUF {
        FI_VERSION_DMABUF
    } else {
        FI_VERSION_REQUESTED
    }
}

/// How a domain registers GPU memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GpuMrPath {
    /// `fi_mr_regattr` with `FI_MR_DMABUF` and a CUDA dma-buf.
    DmaBuf,
    /// `fi_mr_regattr` with `iface = FI_HMEM_CUDA` and the device address.
    CudaIface,
    /// The provider cannot touch GPU memory: the engine stages through host memory.
    Staging,
}

/// The first way to try for GPU memory: dma-buf when the loaded libfabric is 1.20 or newer, the
/// domain was opened with API 1.20 and the GPU exports dma-bufs; else the CUDA interface; both
/// only on a domain granted FI_HMEM. A dma-buf registration the provider refuses falls back to
/// the CUDA interface, and that to staging.
pub fn gpu_mr_path(
    runtime: (u32, u32),
    api_version: u32,
    hmem_granted: bool,
    cuda_dmabuf: bool,
) -> GpuMrPath {
    if !hmem_granted {
        GpuMrPath::Staging
    } else if fi_version(runtime.0, runtime.1) >= FI_VERSION_DMABUF
        && api_version >= FI_VERSION_DMABUF
        && cuda_dmabuf
    {
        GpuMrPath::DmaBuf
    } else {
        GpuMrPath::CudaIface
    }
}

#[repr(C)]
pub struct fid_domain {
    pub fid: fid,
    pub ops: *mut fi_ops_domain,
    pub mr: *mut fi_ops_mr,
}

#[repr(C)]
pub struct fid_mr {
    pub fid: fid,
    pub mem_desc: *mut c_void,
    pub key: u64,
}

#[repr(C)]
pub struct fi_ops_av {
    pub size: usize,
    pub insert: unsafe extern "C" fn(
        *mut fid_av,
        *const c_void,
        usize,
        *mut fi_addr_t,
        u64,
        *mut c_void,
    ) -> c_int,
    pub insertsvc: Opaque,
    pub insertsym: Opaque,
    pub remove: unsafe extern "C" fn(*mut fid_av, *mut fi_addr_t, usize, u64) -> c_int,
    pub lookup: Opaque,
    pub straddr: Opaque,
    pub av_set: Opaque,
}

#[repr(C)]
pub struct fid_av {
    pub fid: fid,
    pub ops: *mut fi_ops_av,
}

#[repr(C)]
pub struct fi_cq_data_entry {
    pub op_context: *mut c_void,
    pub flags: u64,
    pub len: usize,
    pub buf: *mut c_void,
    pub data: u64,
}

#[repr(C)]
pub struct fi_cq_err_entry {
    pub op_context: *mut c_void,
    pub flags: u64,
    pub len: usize,
    pub buf: *mut c_void,
    pub data: u64,
    pub tag: u64,
    pub olen: usize,
    pub err: c_int,
    pub prov_errno: c_int,
    pub err_data: *mut c_void,
    pub err_data_size: usize,
}

#[repr(C)]
pub struct fi_ops_cq {
    pub size: usize,
    pub read: unsafe extern "C" fn(*mut fid_cq, *mut c_void, usize) -> isize,
    pub readfrom: Opaque,
    pub readerr: unsafe extern "C" fn(*mut fid_cq, *mut fi_cq_err_entry, u64) -> isize,
    pub sread: Opaque,
    pub sreadfrom: Opaque,
    pub signal: Opaque,
    pub strerror: unsafe extern "C" fn(
        *mut fid_cq,
        c_int,
        *const c_void,
        *mut c_char,
        usize,
    ) -> *const c_char,
}

#[repr(C)]
pub struct fid_cq {
    pub fid: fid,
    pub ops: *mut fi_ops_cq,
}

#[repr(C)]
pub struct fi_ops_ep {
    pub size: usize,
    pub cancel: Opaque,
    pub getopt: Opaque,
    pub setopt: Opaque,
    pub tx_ctx: Opaque,
    pub rx_ctx: Opaque,
    pub rx_size_left: Opaque,
    pub tx_size_left: Opaque,
}

#[repr(C)]
pub struct fi_ops_cm {
    pub size: usize,
    pub setname: Opaque,
    pub getname: unsafe extern "C" fn(*mut fid, *mut c_void, *mut usize) -> c_int,
    // getpeer, connect, listen, accept, reject, shutdown, join follow; unused.
}

#[repr(C)]
pub struct fi_ops_msg {
    pub size: usize,
    pub recv: unsafe extern "C" fn(
        *mut fid_ep,
        *mut c_void,
        usize,
        *mut c_void,
        fi_addr_t,
        *mut c_void,
    ) -> isize,
    pub recvv: Opaque,
    pub recvmsg: Opaque,
    pub send: unsafe extern "C" fn(
        *mut fid_ep,
        *const c_void,
        usize,
        *mut c_void,
        fi_addr_t,
        *mut c_void,
    ) -> isize,
    pub sendv: Opaque,
    pub sendmsg: Opaque,
    pub inject: Opaque,
    pub senddata: Opaque,
    pub injectdata: Opaque,
}

/// One remote range of an RMA operation.
#[repr(C)]
pub struct fi_rma_iov {
    pub addr: u64,
    pub len: usize,
    pub key: u64,
}

/// `fi_writemsg`'s description of a write.
#[repr(C)]
pub struct fi_msg_rma {
    pub msg_iov: *const libc::iovec,
    pub desc: *mut *mut c_void,
    pub iov_count: usize,
    pub addr: fi_addr_t,
    pub rma_iov: *const fi_rma_iov,
    pub rma_iov_count: usize,
    pub context: *mut c_void,
    pub data: u64,
}

#[repr(C)]
pub struct fi_ops_rma {
    pub size: usize,
    pub read: Opaque,
    pub readv: Opaque,
    pub readmsg: Opaque,
    pub write: unsafe extern "C" fn(
        *mut fid_ep,
        *const c_void,
        usize,
        *mut c_void,
        fi_addr_t,
        u64,
        u64,
        *mut c_void,
    ) -> isize,
    pub writev: Opaque,
    pub writemsg: unsafe extern "C" fn(*mut fid_ep, *const fi_msg_rma, u64) -> isize,
    pub inject:
        unsafe extern "C" fn(*mut fid_ep, *const c_void, usize, fi_addr_t, u64, u64) -> isize,
    #[allow(clippy::type_complexity)]
    pub writedata: unsafe extern "C" fn(
        *mut fid_ep,
        *const c_void,
        usize,
        *mut c_void,
        u64,
        fi_addr_t,
        u64,
        u64,
        *mut c_void,
    ) -> isize,
    pub injectdata:
        unsafe extern "C" fn(*mut fid_ep, *const c_void, usize, u64, fi_addr_t, u64, u64) -> isize,
}

#[repr(C)]
pub struct fid_ep {
    pub fid: fid,
    pub ops: *mut fi_ops_ep,
    pub cm: *mut fi_ops_cm,
    pub msg: *mut fi_ops_msg,
    pub rma: *mut fi_ops_rma,
    pub tagged: *mut c_void,
    pub atomic: *mut c_void,
    pub collective: *mut c_void,
}

/// The functions libfabric exports by symbol.
pub struct LibFabric {
    pub getinfo: unsafe extern "C" fn(
        u32,
        *const c_char,
        *const c_char,
        u64,
        *const fi_info,
        *mut *mut fi_info,
    ) -> c_int,
    pub freeinfo: unsafe extern "C" fn(*mut fi_info),
    pub dupinfo: unsafe extern "C" fn(*const fi_info) -> *mut fi_info,
    pub fabric:
        unsafe extern "C" fn(*mut fi_fabric_attr, *mut *mut fid_fabric, *mut c_void) -> c_int,
    pub strerror: unsafe extern "C" fn(c_int) -> *const c_char,
    pub version: unsafe extern "C" fn() -> u32,
    /// Where the library was loaded from (as given to the loader: a path or a soname).
    pub path: String,
    /// The file the loader resolved `path` to (absolute, symlinks resolved), when it can tell.
    pub file: Option<String>,
    _lib: libloading::Library,
}

/// Why libfabric could not be loaded: every path tried, with the loader's answer for each.
#[derive(Debug, Clone)]
pub struct LoadError {
    pub tried: Vec<(String, String)>,
    /// The only path tried was `$STOLON_LIBFABRIC` (which disables the search).
    pub explicit: bool,
}

impl std::fmt::Display for LoadError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        if self.explicit {
            if let Some((path, why)) = self.tried.first() {
                return write!(
                    f,
                    "libfabric could not be loaded from STOLON_LIBFABRIC={path}: {why} (fix or \
                     unset STOLON_LIBFABRIC to use the default search)"
                );
            }
        }
        write!(f, "libfabric could not be loaded; tried:")?;
        for (path, why) in &self.tried {
            write!(f, " [{path}: {why}]")?;
        }
        write!(f, " (set STOLON_LIBFABRIC to the path of libfabric.so.1)")
    }
}

/// `$STOLON_LIBFABRIC` when set (and not empty): the one library to load, no fallback.
fn explicit_path() -> Option<String> {
    std::env::var_os("STOLON_LIBFABRIC")
        .filter(|p| !p.is_empty())
        .map(|p| PathBuf::from(p).to_string_lossy().into_owned())
}

/// Candidate library paths, in the order they are tried: `$STOLON_LIBFABRIC` alone when set
/// (a library the user named that cannot be loaded is an error, never replaced by another),
/// else the EFA installation's, then the system's.
pub fn candidate_paths() -> Vec<String> {
    if let Some(p) = explicit_path() {
        return vec![p];
    }
    let mut paths = Vec::new();
    for p in [
        "/opt/amazon/efa/lib/libfabric.so.1",
        "/opt/amazon/efa/lib64/libfabric.so.1",
    ] {
        if std::path::Path::new(p).exists() {
            paths.push(p.to_string());
        }
    }
    paths.push("libfabric.so.1".to_string());
    paths
}

/// Looks up one exported function.
///
/// # Safety
/// `T` must be the exact function-pointer type of the symbol `name`.
///
/// # Errors
/// The loader's message when the symbol is missing.
unsafe fn symbol<T: Copy>(lib: &libloading::Library, name: &[u8]) -> Result<T, String> {
    // SAFETY: the caller promises that T matches the symbol's type.
    unsafe { lib.get::<T>(name) }
        .map(|s| *s)
        .map_err(|e| e.to_string())
}

/// Provider settings stolon chooses unless the user set them: they are read from the
/// environment when libfabric initialises its providers, so they are put there before loading.
const DEFAULT_PARAMS: &[(&str, &str)] = &[
    // Let the kernel coalesce small writes on tcp (Nagle): with immediates every small write is
    // a separate send, and coalescing raises the 64-byte write rate several times over while a
    // request/response exchange still goes out at once (nothing is left unacknowledged).
    ("FI_TCP_NODELAY", "0"),
];

fn load() -> Result<LibFabric, LoadError> {
    for (k, v) in DEFAULT_PARAMS {
        if std::env::var_os(k).is_none() {
            // This runs once, before libfabric is loaded, from the first engine's construction;
            // setenv is not synchronised with concurrent getenv in other threads, a risk taken
            // once per process at start-up.
            std::env::set_var(k, v);
        }
    }
    let mut tried = Vec::new();
    for path in candidate_paths() {
        // SAFETY: loading libfabric runs its constructors, which only initialise its own state.
        let lib = match unsafe { libloading::Library::new(&path) } {
            Ok(lib) => lib,
            Err(e) => {
                tried.push((path, e.to_string()));
                continue;
            }
        };
        // SAFETY: each type below is the one fabric.h declares for that symbol, stable since
        // FABRIC_1.0; the pointers are copied out and `lib` moves into the returned struct, so it
        // outlives every use.
        let syms = unsafe {
            (|| -> Result<_, String> {
                Ok((
                    symbol(&lib, b"fi_getinfo\0")?,
                    symbol(&lib, b"fi_freeinfo\0")?,
                    symbol(&lib, b"fi_dupinfo\0")?,
                    symbol(&lib, b"fi_fabric\0")?,
                    symbol(&lib, b"fi_strerror\0")?,
                    symbol(&lib, b"fi_version\0")?,
                ))
            })()
        };
        let (getinfo, freeinfo, dupinfo, fabric, strerror, version) = match syms {
            Ok(s) => s,
            Err(e) => {
                tried.push((path, e));
                continue;
            }
        };
        let file = resolved_file(getinfo as *const c_void);
        return Ok(LibFabric {
            getinfo,
            freeinfo,
            dupinfo,
            fabric,
            strerror,
            version,
            path,
            file,
            _lib: lib,
        });
    }
    Err(LoadError {
        tried,
        explicit: explicit_path().is_some(),
    })
}

/// The file of the loaded object that contains `sym` (absolute, symlinks resolved).
fn resolved_file(sym: *const c_void) -> Option<String> {
    let mut info = std::mem::MaybeUninit::<libc::Dl_info>::zeroed();
    // SAFETY: `sym` is the address of a function of a library this process has loaded (and
    // keeps loaded); dladdr only fills `info`, whose strings belong to the loader and are copied
    // out below while the library is still loaded.
    let found = unsafe { libc::dladdr(sym, info.as_mut_ptr()) };
    if found == 0 {
        return None;
    }
    // SAFETY: dladdr returned non-zero, so it initialised `info`.
    let info = unsafe { info.assume_init() };
    if info.dli_fname.is_null() {
        return None;
    }
    // SAFETY: dli_fname is a NUL-terminated string owned by the loader (checked non-null).
    let name = unsafe { CStr::from_ptr(info.dli_fname) }
        .to_string_lossy()
        .into_owned();
    let path = std::fs::canonicalize(&name).ok()?;
    Some(path.to_string_lossy().into_owned())
}

/// The process-wide libfabric, loaded on first use.
pub fn lib() -> Result<&'static LibFabric, LoadError> {
    static LIB: OnceLock<Result<LibFabric, LoadError>> = OnceLock::new();
    LIB.get_or_init(load).as_ref().map_err(Clone::clone)
}

/// Whether libfabric can be loaded on this machine.
pub fn is_present() -> bool {
    lib().is_ok()
}

impl LibFabric {
    /// libfabric's text for an error number (positive or negative).
    pub fn error_string(&self, err: isize) -> String {
        let code = err.unsigned_abs() as c_int;
        // SAFETY: fi_strerror accepts any error number and returns a static string.
        let p = unsafe { (self.strerror)(code) };
        if p.is_null() {
            return format!("error {code}");
        }
        // SAFETY: p is a NUL-terminated static string owned by libfabric.
        unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
    }

    /// The runtime's version as (major, minor).
    pub fn runtime_version(&self) -> (u32, u32) {
        // SAFETY: fi_version takes no arguments and has no preconditions.
        let v = unsafe { (self.version)() };
        (v >> 16, v & 0xffff)
    }
}

#[cfg(test)]
mod dmabuf_tests {
    use super::*;
    use std::mem::{offset_of, size_of};

    #[test]
    fn the_1_20_dmabuf_structs_have_the_header_layout() {
        assert_eq!(size_of::<fi_mr_dmabuf>(), 32);
        assert_eq!(offset_of!(fi_mr_dmabuf, fd), 0);
        assert_eq!(offset_of!(fi_mr_dmabuf, offset), 8);
        assert_eq!(offset_of!(fi_mr_dmabuf, len), 16);
        assert_eq!(offset_of!(fi_mr_dmabuf, base_addr), 24);
        assert_eq!(size_of::<fi_mr_attr_mem>(), 8);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, mem), 0);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, iface), 64);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, device), 72);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, hmem_data), 80);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, page_size), 88);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, base_mr), 96);
        assert_eq!(offset_of!(fi_mr_attr_v1_20, sub_mr_cnt), 104);
        assert_eq!(size_of::<fi_mr_attr_v1_20>(), 112);
        assert_eq!(FI_MR_DMABUF, 0x100_0000_0000);
        assert_eq!(FI_VERSION_DMABUF, (1 << 16) | 20);
    }

    #[test]
    fn the_1_20_attr_starts_with_the_1_17_attr() {
        // The 1.17 layout (checked against the installed header by tests/abi_layout.rs) is a
        // prefix of the 1.20 one: mr_iov became the union's first member, nothing moved.
        assert_eq!(
            offset_of!(fi_mr_attr, mr_iov),
            offset_of!(fi_mr_attr_v1_20, mem)
        );
        for (a, b) in [
            (
                offset_of!(fi_mr_attr, iov_count),
                offset_of!(fi_mr_attr_v1_20, iov_count),
            ),
            (
                offset_of!(fi_mr_attr, access),
                offset_of!(fi_mr_attr_v1_20, access),
            ),
            (
                offset_of!(fi_mr_attr, offset),
                offset_of!(fi_mr_attr_v1_20, offset),
            ),
            (
                offset_of!(fi_mr_attr, requested_key),
                offset_of!(fi_mr_attr_v1_20, requested_key),
            ),
            (
                offset_of!(fi_mr_attr, context),
                offset_of!(fi_mr_attr_v1_20, context),
            ),
            (
                offset_of!(fi_mr_attr, auth_key_size),
                offset_of!(fi_mr_attr_v1_20, auth_key_size),
            ),
            (
                offset_of!(fi_mr_attr, auth_key),
                offset_of!(fi_mr_attr_v1_20, auth_key),
            ),
            (
                offset_of!(fi_mr_attr, iface),
                offset_of!(fi_mr_attr_v1_20, iface),
            ),
            (
                offset_of!(fi_mr_attr, device),
                offset_of!(fi_mr_attr_v1_20, device),
            ),
        ] {
            assert_eq!(a, b);
        }
        assert_eq!(
            size_of::<fi_mr_attr>(),
            offset_of!(fi_mr_attr_v1_20, hmem_data)
        );
    }

    #[test]
    fn the_api_version_rises_to_1_20_only_for_gpu_domains_on_new_runtimes() {
        let v17 = FI_VERSION_REQUESTED;
        assert_eq!(api_version_for((1, 17), true), v17);
        assert_eq!(api_version_for((1, 17), false), v17);
        assert_eq!(api_version_for((1, 19), true), v17);
        assert_eq!(api_version_for((1, 20), false), v17);
        assert_eq!(api_version_for((1, 20), true), FI_VERSION_DMABUF);
        assert_eq!(api_version_for((1, 22), true), FI_VERSION_DMABUF);
        assert_eq!(api_version_for((2, 0), true), FI_VERSION_DMABUF);
    }

    #[test]
    fn gpu_registration_path_selection() {
        let (v17, v20) = (FI_VERSION_REQUESTED, FI_VERSION_DMABUF);
        use GpuMrPath::*;
        // libfabric 1.17 (this machine, the H100 hosts): never dma-buf.
        assert_eq!(gpu_mr_path((1, 17), v17, true, true), CudaIface);
        assert_eq!(gpu_mr_path((1, 17), v17, false, true), Staging);
        // 1.20+: dma-buf when the domain was opened with 1.20 and CUDA can export.
        assert_eq!(gpu_mr_path((1, 20), v20, true, true), DmaBuf);
        assert_eq!(gpu_mr_path((2, 1), v20, true, true), DmaBuf);
        assert_eq!(gpu_mr_path((1, 20), v20, true, false), CudaIface);
        assert_eq!(gpu_mr_path((1, 20), v17, true, true), CudaIface);
        assert_eq!(gpu_mr_path((1, 19), v17, true, true), CudaIface);
        assert_eq!(gpu_mr_path((1, 20), v20, false, true), Staging);
    }
}
