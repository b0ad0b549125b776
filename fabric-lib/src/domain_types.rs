//! The vocabulary every backend, the worker and the engine share: what a domain is asked for
//! and what its provider granted ([`DomainSpec`], [`DomainAttrs`]), what posting and polling
//! return ([`Posted`], [`CqError`]), which providers run over sockets, and what kind of memory a
//! region is and how its bytes travel ([`RegionMem`], [`Path`]). A leaf: it imports nothing of
//! the crate's.

use std::ffi::c_void;

/// Which provider and interface a domain uses.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DomainSpec {
    /// libfabric provider name: `tcp` (`tcp;ofi_rxm`), `net`, `shm`, `udp` (`udp;ofi_rxd`), `efa`,
    /// `verbs` (`verbs;ofi_rxm`), or any full provider string.
    pub provider: String,
    /// libfabric domain name (for socket providers the interface, e.g. `lo`, `eth0`).
    pub interface: Option<String>,
    /// Source address to bind (for socket providers an IP address of the interface).
    pub node: Option<String>,
    /// Ask for FI_HMEM (GPU memory registration); falls back to a host-only endpoint when the
    /// provider cannot do it.
    pub hmem: bool,
}

impl DomainSpec {
    /// A spec for `provider` on its default interface.
    pub fn new(provider: &str) -> Self {
        DomainSpec {
            provider: provider.to_string(),
            interface: None,
            node: None,
            hmem: false,
        }
    }

    /// The full libfabric provider string for a short name.
    pub fn provider_string(&self) -> String {
        match self.provider.as_str() {
            "tcp" => "tcp;ofi_rxm".to_string(),
            "udp" => "udp;ofi_rxd".to_string(),
            "verbs" => "verbs;ofi_rxm".to_string(),
            other => other.to_string(),
        }
    }
}

/// What the provider granted, read back from `fi_getinfo`.
#[derive(Debug, Clone)]
pub struct DomainAttrs {
    pub provider: String,
    pub fabric: String,
    pub domain: String,
    /// Remote addresses are absolute virtual addresses (`FI_MR_VIRT_ADDR` kept) rather than offsets.
    pub virt_addr: bool,
    /// The provider picks memory keys (`FI_MR_PROV_KEY` kept).
    pub prov_key: bool,
    /// Local buffers need a registration descriptor (`FI_MR_LOCAL` kept).
    pub mr_local: bool,
    pub max_msg_size: usize,
    pub inject_size: usize,
    pub tx_size: usize,
    pub rx_size: usize,
    pub cq_data_size: usize,
    /// Small writes use `fi_inject_write*` (see [`inject_allowed`]).
    pub use_inject: bool,
    /// The provider registers GPU memory itself (FI_HMEM granted).
    pub hmem: bool,
    /// The completion queue has a file descriptor the worker can sleep on (`FI_WAIT_FD` with
    /// `fi_trywait`); false where the provider offers none (shm, udp in 1.17).
    pub wait_fd: bool,
    /// A zero-byte write asked for `FI_DELIVERY_COMPLETE` never completes on the writer
    /// (shm before libfabric 1.19: its delivery path kept the transfer pending, though the
    /// target counted the immediate). Such writes are posted with the default completion:
    /// there are no bytes to deliver, and the immediate is queued in the target's shared
    /// memory when the write completes.
    pub zero_byte_delivery_lost: bool,
}

/// Outcome of posting an operation.
#[derive(Debug, PartialEq, Eq)]
pub enum Posted {
    /// Queued; a completion will follow.
    Yes,
    /// The queue is full or the peer is not yet connected: progress the CQ and retry.
    Again,
}

/// A failed completion.
#[derive(Debug)]
pub struct CqError {
    pub op_context: *mut c_void,
    pub err: i32,
    pub message: String,
}

/// Whether `provider` runs over IP sockets (and so takes a source address).
pub fn is_socket_provider(provider: &str) -> bool {
    let p = provider.split(';').next().unwrap_or("");
    matches!(p, "tcp" | "net" | "udp" | "sockets")
}

/// What kind of memory a local region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionMem {
    /// Host memory registered with every domain.
    Host,
    /// GPU memory (device ordinal); moved through staging buffers over the fabric.
    Gpu(u32),
    /// GPU memory registered with every domain (providers with FI_HMEM): plain RMA.
    GpuDirect(u32),
    /// Host memory that peers write through the staging protocol, as they would GPU memory.
    /// A test hook: it lets the protocol run on machines without a GPU.
    StagedHost,
}

/// How a transfer's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// RMA writes between registered host memory.
    Fabric,
    /// Through pinned staging buffers (GPU memory over providers without GPU support).
    Staged,
    /// CUDA IPC copies between GPUs of one host, immediates through the peer's mailbox.
    Nvlink,
}
