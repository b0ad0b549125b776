//! One error type for the crate; one variant per kind of failure a caller may branch on.
//!
//! Work-completion failures are mapped to variants by what they mean for the caller
//! ([`Error::PeerUnreachable`], [`Error::RemoteAccess`], [`Error::Flushed`], ...), not by their
//! `ibv_wc_status` number; [`crate::completion::WcStatus`] keeps the number for logs.
//!
//! A leaf of the crate: besides `sys` (the loader's error) it names only plain data from the
//! leaf modules `addr` (GID table entries) and `wc_status`, never a module that uses it.

use std::time::Duration;

use crate::addr::GidEntry;
use crate::sys::LoadError;
use crate::wc_status::WcStatus;

/// An `errno` value returned by a libibverbs call, with the system's text for it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Errno(pub i32);

impl Errno {
    /// The calling thread's `errno` right now (read it straight after a failing call).
    pub fn last() -> Self {
        Errno(std::io::Error::last_os_error().raw_os_error().unwrap_or(0))
    }
}

impl std::fmt::Display for Errno {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // The io::Error text already ends with "(os error N)".
        write!(f, "{}", std::io::Error::from_raw_os_error(self.0))
    }
}

impl std::error::Error for Errno {}

/// One port seen while looking for a usable one; listed by [`Error::NoActivePort`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PortSummary {
    pub device: String,
    pub port: u8,
    pub state: String,
    pub link_layer: String,
}

impl std::fmt::Display for PortSummary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} port {} ({}, {})",
            self.device, self.port, self.state, self.link_layer
        )
    }
}

fn list<T: std::fmt::Display>(items: &[T]) -> String {
    if items.is_empty() {
        return "none".to_string();
    }
    items
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// Everything that can go wrong in the verbs backend.
#[derive(Debug, Clone, thiserror::Error)]
#[non_exhaustive]
pub enum Error {
    /// libibverbs could not be loaded; every path tried is listed.
    #[error(transparent)]
    LibraryNotFound(#[from] LoadError),
    /// libibverbs loaded but reported no RDMA device.
    #[error("no RDMA device found: {detail}")]
    NoDevices { detail: String },
    /// Devices exist but none has a port in the ACTIVE state.
    #[error("no RDMA port is active; found: {}", list(found))]
    NoActivePort { found: Vec<PortSummary> },
    /// The device asked for by name does not exist.
    #[error("RDMA device {name:?} not found; available: {}", list(available))]
    DeviceNotFound {
        name: String,
        available: Vec<String>,
    },
    /// The port asked for does not exist or is not active.
    #[error("port {port} of {device} is not usable: {why}")]
    PortUnusable {
        device: String,
        port: u8,
        why: String,
    },
    /// A libibverbs call failed.
    #[error("{call} failed: {source}")]
    Verbs {
        call: &'static str,
        #[source]
        source: Errno,
    },
    /// The loaded libibverbs or the provider lacks something stolon needs.
    #[error("{what} is not supported: {why}")]
    Unsupported { what: &'static str, why: String },
    /// Invalid configuration.
    #[error("invalid configuration: {0}")]
    Config(String),
    /// Any other bad argument.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),

    /// RoCE needs a GID and the port offers none that fits.
    #[error("no usable GID on {link} port: {why}; GID table: {}", list(available))]
    NoUsableGid {
        link: &'static str,
        why: String,
        available: Vec<GidEntry>,
    },
    /// A GID index given in the configuration is not in the port's table (or is empty).
    #[error(
        "GID index {index} is not usable: {why}; GID table: {}",
        list(available)
    )]
    GidIndexNotUsable {
        index: u32,
        why: String,
        available: Vec<GidEntry>,
    },
    /// No GID of the port carries the IP address given in the configuration.
    #[error("no GID carries address {ip}; GID table: {}", list(available))]
    GidIpNotFound {
        ip: std::net::IpAddr,
        available: Vec<GidEntry>,
    },

    /// Bytes that should hold a handshake message could not be decoded.
    #[error("cannot decode {what}: {why}")]
    Decode { what: &'static str, why: String },
    /// The peer's parameters cannot work with ours (link layer, addressing).
    #[error("peer is incompatible: {0}")]
    Incompatible(String),
    /// The connection handshake got no answer in time.
    #[error("handshake unanswered after {attempts} messages over {waited:?}")]
    HandshakeTimeout { attempts: u32, waited: Duration },
    /// The peer is not (or no longer) connected.
    #[error("peer {0} is not connected")]
    NotConnected(u32),
    /// The connection was torn down (peer restarted, or a QP error) while work was in flight.
    #[error("connection to peer {peer} was reset: {reason}")]
    ConnectionReset { peer: u32, reason: String },

    /// Transport retries ran out: the peer (or the path to it) is gone (`IBV_WC_RETRY_EXC_ERR`).
    #[error("peer unreachable: transport retries exhausted on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    PeerUnreachable { qp_num: u32, vendor_err: u32 },
    /// The peer had no receive posted for a send or write-with-immediate, after every RNR retry
    /// (`IBV_WC_RNR_RETRY_EXC_ERR`).
    #[error("receiver not ready: RNR retries exhausted on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    ReceiverNotReady { qp_num: u32, vendor_err: u32 },
    /// The peer refused the remote key or address range (`IBV_WC_REM_ACCESS_ERR`).
    #[error("remote access error on QP {qp_num:#x}: bad remote key, address or permissions (vendor error {vendor_err:#x})")]
    RemoteAccess { qp_num: u32, vendor_err: u32 },
    /// The peer found the request invalid, e.g. a message longer than its receive buffer
    /// (`IBV_WC_REM_INV_REQ_ERR`).
    #[error("remote invalid request on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    RemoteInvalidRequest { qp_num: u32, vendor_err: u32 },
    /// The peer could not complete the operation (`IBV_WC_REM_OP_ERR`).
    #[error("remote operation error on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    RemoteOperation { qp_num: u32, vendor_err: u32 },
    /// A local key or address was refused (`IBV_WC_LOC_PROT_ERR`, `IBV_WC_LOC_ACCESS_ERR`).
    #[error("local protection error ({status}) on QP {qp_num:#x}: bad local key or address (vendor error {vendor_err:#x})")]
    LocalProtection {
        status: WcStatus,
        qp_num: u32,
        vendor_err: u32,
    },
    /// A local length was wrong: a message longer than the receive buffer, or over the port's
    /// maximum (`IBV_WC_LOC_LEN_ERR`).
    #[error("local length error on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    LocalLength { qp_num: u32, vendor_err: u32 },
    /// The QP itself failed a request (`IBV_WC_LOC_QP_OP_ERR`).
    #[error("local QP operation error on QP {qp_num:#x} (vendor error {vendor_err:#x})")]
    LocalQpOperation { qp_num: u32, vendor_err: u32 },
    /// The work request was flushed because its QP had entered the error state; `after` is the
    /// failure that put it there, when it was seen.
    #[error("flushed: QP {qp_num:#x} was in error{}", after.as_ref().map(|e| format!(" after: {e}")).unwrap_or_default())]
    Flushed {
        qp_num: u32,
        after: Option<Box<Error>>,
    },
    /// Any other failed work completion.
    #[error("work completion failed on QP {qp_num:#x}: {status} (vendor error {vendor_err:#x})")]
    WorkCompletion {
        status: WcStatus,
        qp_num: u32,
        vendor_err: u32,
    },

    /// A wait ran past its deadline.
    #[error("timed out after {0:?}")]
    Timeout(Duration),
}

impl Error {
    /// Wraps an errno returned by (or left behind by) the libibverbs call `call`.
    pub fn verbs(call: &'static str, errno: i32) -> Self {
        Error::Verbs {
            call,
            source: Errno(errno),
        }
    }
}

/// The crate's result type.
pub type Result<T, E = Error> = std::result::Result<T, E>;
