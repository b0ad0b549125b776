//! The device-facing part: one ConnectX port as a stolon *domain*.
//!
//! [`VerbsDomain::open`] finds the device and port, picks the GID, and builds the shared
//! objects: a protection domain, one completion queue sized for every peer's outstanding work,
//! a shared receive queue for messages (with registered buffers) and one for writes with
//! immediate (empty receives: such a write consumes a receive WR at the target but places no
//! data in it, so that SRQ is kept stocked). Per peer it creates two RC QPs on demand (data and
//! message) and connects them through [`crate::handshake`], whose messages the caller carries
//! out of band ([`DomainEvent::SendHandshake`]). Posting and polling go through the pure modules:
//! [`crate::wr`] builds and accounts work requests, [`crate::completion`] maps completions back.
//!
//! # Ownership and teardown
//! Each verbs object is an RAII type that holds an `Arc` of what it depends on (a QP holds its
//! PD, CQ and SRQ; an MR its PD; everything the device context), so destruction happens in
//! dependency order whatever order handles are dropped in: QPs, then SRQs, MRs, the CQ, the PD,
//! and the context last. A [`MemoryRegion`] the caller keeps outlives the domain safely.
//!
//! # Threads
//! A domain is driven by one thread at a time (the worker); it is `Send`. libibverbs objects are
//! thread-safe, which is what makes the `Arc`-shared RAII types sound.
//!
//! Nothing in this module has run on hardware yet (see the README).

use std::collections::HashMap;
use std::ffi::{c_int, c_uint, c_void, CStr};
use std::net::IpAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::Instant;

use crate::completion::{
    self, Completion, Finished, QpErrors, TransferId, TransferTable, WrId, WrKind,
};
use crate::error::{Errno, Error, PortSummary, Result};
use crate::gid::{self, Gid, GidChoice, GidEntry, GidPolicy, GidSelector, GidType, LinkLayer};
use crate::handshake::{self, Action, Handshake, HandshakeConfig, LocalStatic, Phase, Step};
use crate::qp::{self, AnyQp, InitAttrs, LocalPath, Modify, Mtu, Qp, QpConfig, QpDriver};
use crate::sys::{self, LibIbverbs};
use crate::wr::{
    self, ImmPolicy, Limits, RecvChain, RecvStock, SendChain, SendQueue, WritePlan, WriteSeg,
};

/// A peer, as the engine numbers them.
pub type PeerId = u32;

// ---------------------------------------------------------------------------------------------
// Discovery results (plain data).

/// `enum ibv_port_state`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PortState {
    Down,
    Init,
    Armed,
    Active,
    ActiveDefer,
    Other(u32),
}

impl PortState {
    pub fn from_sys(v: u32) -> Self {
        match v {
            sys::IBV_PORT_DOWN => PortState::Down,
            sys::IBV_PORT_INIT => PortState::Init,
            sys::IBV_PORT_ARMED => PortState::Armed,
            sys::IBV_PORT_ACTIVE => PortState::Active,
            sys::IBV_PORT_ACTIVE_DEFER => PortState::ActiveDefer,
            other => PortState::Other(other),
        }
    }

    pub fn is_active(self) -> bool {
        matches!(self, PortState::Active | PortState::ActiveDefer)
    }

    pub fn name(self) -> String {
        match self {
            PortState::Down => "DOWN".into(),
            PortState::Init => "INIT (no subnet manager?)".into(),
            PortState::Armed => "ARMED".into(),
            PortState::Active => "ACTIVE".into(),
            PortState::ActiveDefer => "ACTIVE_DEFER".into(),
            PortState::Other(v) => format!("state {v}"),
        }
    }
}

/// One port of a device.
#[derive(Clone, Debug, PartialEq)]
pub struct PortInfo {
    pub port: u8,
    pub state: PortState,
    pub link_layer: LinkLayer,
    pub active_mtu: Mtu,
    pub lid: u16,
    pub active_speed: u8,
    pub active_width: u8,
    /// Link speed from speed × width, when both codes are known.
    pub gbps: Option<f64>,
    /// Largest message (`max_msg_sz`).
    pub max_msg_size: u32,
    /// `IBV_QPF_GRH_REQUIRED`.
    pub grh_required: bool,
    pub gid_table: Vec<GidEntry>,
    /// The Ethernet netdev behind a RoCE port (or the IPoIB one), when known.
    pub netdev: Option<String>,
}

/// The device limits stolon sizes its queues by.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct DeviceCaps {
    pub max_qp_wr: u32,
    pub max_sge: u32,
    pub max_cqe: u32,
    pub max_srq_wr: u32,
    pub max_srq_sge: u32,
    pub max_qp_rd_atom: i32,
    pub max_qp_init_rd_atom: i32,
    pub max_mr_size: u64,
}

impl DeviceCaps {
    fn from_sys(a: &sys::ibv_device_attr) -> Self {
        let u = |v: c_int| v.max(0) as u32;
        DeviceCaps {
            max_qp_wr: u(a.max_qp_wr),
            max_sge: u(a.max_sge),
            max_cqe: u(a.max_cqe),
            max_srq_wr: u(a.max_srq_wr),
            max_srq_sge: u(a.max_srq_sge),
            max_qp_rd_atom: a.max_qp_rd_atom,
            max_qp_init_rd_atom: a.max_qp_init_rd_atom,
            max_mr_size: a.max_mr_size,
        }
    }
}

/// One RDMA device.
#[derive(Clone, Debug, PartialEq)]
pub struct DeviceInfo {
    /// Kernel name, e.g. `mlx5_0`.
    pub name: String,
    /// PCI address (`0000:17:00.0`), from the realpath of `/sys/class/infiniband/<dev>/device`.
    pub pci_address: Option<String>,
    pub fw_version: String,
    /// Node GUID in host order.
    pub node_guid: u64,
    pub caps: DeviceCaps,
    pub ports: Vec<PortInfo>,
}

/// Per-lane data rate of `active_speed` codes, in Gbit/s (nominal, after encoding).
fn lane_gbps(speed: u8) -> Option<f64> {
    Some(match speed {
        1 => 2.5,     // SDR
        2 => 5.0,     // DDR
        4 => 10.0,    // QDR
        8 => 10.0,    // FDR10
        16 => 14.0,   // FDR
        32 => 25.0,   // EDR
        64 => 50.0,   // HDR
        128 => 100.0, // NDR
        _ => return None,
    })
}

/// Lanes of `active_width` codes.
fn lanes(width: u8) -> Option<u32> {
    Some(match width {
        1 => 1,
        2 => 4,
        4 => 8,
        8 => 12,
        16 => 2,
        _ => return None,
    })
}

/// Link speed in Gbit/s from `active_speed` and `active_width` (e.g. HDR × 4 = 200).
pub fn link_speed_gbps(active_speed: u8, active_width: u8) -> Option<f64> {
    Some(lane_gbps(active_speed)? * lanes(active_width)? as f64)
}

/// The PCI address at the end of a device's canonical sysfs path.
pub fn pci_address(canonical: &Path) -> Option<String> {
    let last = canonical.file_name()?.to_str()?;
    let b = last.as_bytes();
    // dddd:bb:dd.f
    let ok = b.len() == 12
        && b[4] == b':'
        && b[7] == b':'
        && b[10] == b'.'
        && b.iter()
            .enumerate()
            .all(|(i, c)| matches!(i, 4 | 7 | 10) || c.is_ascii_hexdigit());
    ok.then(|| last.to_string())
}

/// Picks the device and port: the named ones, else the first ACTIVE port (of the wanted link
/// layer, if given), in device order.
///
/// # Errors
/// [`Error::DeviceNotFound`], [`Error::PortUnusable`] or [`Error::NoActivePort`] listing every
/// port seen.
pub fn choose_port(
    devices: &[DeviceInfo],
    device: Option<&str>,
    port: Option<u8>,
    link: Option<LinkLayer>,
) -> Result<(usize, usize)> {
    let candidates: Vec<usize> = match device {
        Some(name) => {
            let i = devices.iter().position(|d| d.name == name).ok_or_else(|| {
                Error::DeviceNotFound {
                    name: name.to_string(),
                    available: devices.iter().map(|d| d.name.clone()).collect(),
                }
            })?;
            vec![i]
        }
        None => (0..devices.len()).collect(),
    };
    if let (Some(name), Some(p)) = (device, port) {
        let d = &devices[candidates[0]];
        let pi = d
            .ports
            .iter()
            .position(|x| x.port == p)
            .ok_or_else(|| Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: format!("the device has ports 1..={}", d.ports.len()),
            })?;
        let info = &d.ports[pi];
        if !info.state.is_active() {
            return Err(Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: info.state.name(),
            });
        }
        if let Some(l) = link.filter(|l| *l != info.link_layer) {
            return Err(Error::PortUnusable {
                device: name.to_string(),
                port: p,
                why: format!("link layer is {}, not {}", info.link_layer.name(), l.name()),
            });
        }
        return Ok((candidates[0], pi));
    }
    for &di in &candidates {
        for (pi, p) in devices[di].ports.iter().enumerate() {
            if p.state.is_active()
                && port.map_or(true, |want| want == p.port)
                && link.map_or(true, |l| l == p.link_layer)
            {
                return Ok((di, pi));
            }
        }
    }
    let found = candidates
        .iter()
        .flat_map(|&di| {
            devices[di].ports.iter().map(move |p| PortSummary {
                device: devices[di].name.clone(),
                port: p.port,
                state: p.state.name(),
                link_layer: p.link_layer.name().to_string(),
            })
        })
        .collect();
    Err(Error::NoActivePort { found })
}

// ---------------------------------------------------------------------------------------------
// Configuration.

/// Everything [`VerbsDomain::open`] can be told.
#[derive(Clone, Debug, PartialEq)]
pub struct DomainConfig {
    /// Device name (`mlx5_0`); the first with an active port when `None`.
    pub device: Option<String>,
    /// Port number; the first active one when `None`.
    pub port: Option<u8>,
    /// Only ports of this link layer.
    pub link_layer: Option<LinkLayer>,
    pub gid: GidPolicy,
    /// QP attributes (its `port` is overwritten with the port opened).
    pub qp: QpConfig,
    pub handshake: HandshakeConfig,
    /// Peers the CQ is sized for.
    pub max_peers: u32,
    /// Send-queue depth of each data QP.
    pub send_queue_depth: u32,
    /// Send-queue depth of each message QP.
    pub msg_queue_depth: u32,
    /// Signal at least every Nth write.
    pub signal_every: u32,
    /// SGEs per send WR asked for (clamped to the device).
    pub max_send_sge: u32,
    /// Inline data asked for per WR (the provider may grant less; 0 disables).
    pub max_inline: u32,
    /// Receives kept posted on the write-with-immediate SRQ.
    pub imm_receives: u32,
    /// Receive buffers kept posted on the message SRQ.
    pub msg_receives: u32,
    /// Bytes per message buffer (the largest message).
    pub max_message: u32,
    /// Registered send buffers for messages.
    pub msg_send_buffers: u32,
    /// Which writes of a transfer carry the immediate.
    pub imm_policy: ImmPolicy,
    /// Register memory with `IBV_ACCESS_RELAXED_ORDERING` (PCIe relaxed ordering; faster GPU
    /// memory access on many platforms).
    pub relaxed_ordering: bool,
}

impl Default for DomainConfig {
    fn default() -> Self {
        DomainConfig {
            device: None,
            port: None,
            link_layer: None,
            gid: GidPolicy::default(),
            qp: QpConfig::default(),
            handshake: HandshakeConfig::default(),
            max_peers: 64,
            send_queue_depth: 512,
            msg_queue_depth: 64,
            signal_every: 16,
            max_send_sge: 4,
            max_inline: 64,
            imm_receives: 4096,
            msg_receives: 256,
            max_message: 8192,
            msg_send_buffers: 64,
            imm_policy: ImmPolicy::EveryWr,
            relaxed_ordering: true,
        }
    }
}

impl DomainConfig {
    /// Applies `STOLON_IB_*` overrides read through `var` (the environment, in practice):
    /// `DEVICE`, `PORT`, `GID_INDEX`, `GID_IP`, `TC`, `SL`, `TIMEOUT`, `RETRY_CNT`, `HOP_LIMIT`,
    /// `ROCE_V1`.
    ///
    /// # Errors
    /// [`Error::Config`] naming a value that does not parse.
    pub fn apply_env(&mut self, var: impl Fn(&str) -> Option<String>) -> Result<()> {
        fn parse<T: std::str::FromStr>(name: &str, v: &str) -> Result<T> {
            v.trim()
                .parse()
                .map_err(|_| Error::Config(format!("STOLON_IB_{name}={v:?} does not parse")))
        }
        if let Some(v) = var("STOLON_IB_DEVICE") {
            self.device = Some(v);
        }
        if let Some(v) = var("STOLON_IB_PORT") {
            self.port = Some(parse("PORT", &v)?);
        }
        if let Some(v) = var("STOLON_IB_GID_INDEX") {
            self.gid.selector = GidSelector::Index(parse("GID_INDEX", &v)?);
        }
        if let Some(v) = var("STOLON_IB_GID_IP") {
            self.gid.selector = GidSelector::Ip(parse("GID_IP", &v)?);
        }
        if let Some(v) = var("STOLON_IB_TC") {
            self.qp.traffic_class = parse("TC", &v)?;
        }
        if let Some(v) = var("STOLON_IB_SL") {
            self.qp.sl = parse("SL", &v)?;
        }
        if let Some(v) = var("STOLON_IB_TIMEOUT") {
            self.qp.timeout = parse("TIMEOUT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_RETRY_CNT") {
            self.qp.retry_cnt = parse("RETRY_CNT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_HOP_LIMIT") {
            self.qp.hop_limit = parse("HOP_LIMIT", &v)?;
        }
        if let Some(v) = var("STOLON_IB_ROCE_V1") {
            self.gid.allow_roce_v1 = v.trim() == "1";
        }
        self.qp.validate()
    }
}

/// Queue sizes after clamping to the device.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct QueueSizes {
    pub data_sq: u32,
    pub msg_sq: u32,
    pub imm_srq: u32,
    pub msg_srq: u32,
    pub cq: u32,
    pub send_sge: u32,
}

/// Sizes every queue: the CQ must hold one entry per signalled send WR that can be outstanding
/// on every QP of every peer, plus every posted receive, or it overruns (a fatal CQ error).
///
/// # Errors
/// [`Error::Config`] when the device's CQ cannot hold that many, naming what to reduce.
pub fn queue_sizes(cfg: &DomainConfig, caps: &DeviceCaps) -> Result<QueueSizes> {
    let nz = |v: u32, what: &str| {
        if v == 0 {
            Err(Error::Config(format!("{what} must be at least 1")))
        } else {
            Ok(v)
        }
    };
    let data_sq = nz(cfg.send_queue_depth, "send_queue_depth")?.min(caps.max_qp_wr);
    let msg_sq = nz(cfg.msg_queue_depth, "msg_queue_depth")?.min(caps.max_qp_wr);
    let imm_srq = nz(cfg.imm_receives, "imm_receives")?.min(caps.max_srq_wr);
    let msg_srq = nz(cfg.msg_receives, "msg_receives")?.min(caps.max_srq_wr);
    nz(cfg.max_peers, "max_peers")?;
    nz(cfg.max_message, "max_message")?;
    let send_sge = nz(cfg.max_send_sge, "max_send_sge")?
        .min(caps.max_sge)
        .max(1);
    let need =
        cfg.max_peers as u64 * (data_sq as u64 + msg_sq as u64) + imm_srq as u64 + msg_srq as u64;
    if need > caps.max_cqe as u64 {
        return Err(Error::Config(format!(
            "the CQ would need {need} entries ({} peers x ({data_sq} + {msg_sq}) send slots + \
             {imm_srq} + {msg_srq} receives) but the device allows {}; lower max_peers or the \
             queue depths",
            cfg.max_peers, caps.max_cqe
        )));
    }
    Ok(QueueSizes {
        data_sq,
        msg_sq,
        imm_srq,
        msg_srq,
        cq: need as u32,
        send_sge,
    })
}

// ---------------------------------------------------------------------------------------------
// RAII wrappers.

/// An open device context; closed when the last holder drops it.
struct Context {
    lib: &'static LibIbverbs,
    raw: *mut sys::ibv_context,
}

// SAFETY: libibverbs contexts may be used from any thread (the library is thread-safe); the
// pointer is only dereferenced through libibverbs calls.
unsafe impl Send for Context {}
// SAFETY: as above; shared references only make thread-safe libibverbs calls.
unsafe impl Sync for Context {}

impl Drop for Context {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_open_device and is closed once; every object created from it
        // holds an Arc of this context, so none is left.
        unsafe { (self.lib.close_device)(self.raw) };
    }
}

/// A protection domain.
pub struct ProtectionDomain {
    ctx: Arc<Context>,
    raw: *mut sys::ibv_pd,
}

// SAFETY: see Context; a PD is a handle usable from any thread.
unsafe impl Send for ProtectionDomain {}
// SAFETY: see Context.
unsafe impl Sync for ProtectionDomain {}

impl Drop for ProtectionDomain {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_alloc_pd; every MR and QP on it holds an Arc of this PD, so
        // none is left and dealloc succeeds.
        unsafe { (self.ctx.lib.dealloc_pd)(self.raw) };
    }
}

/// A completion queue.
struct CompletionQueue {
    ctx: Arc<Context>,
    raw: *mut sys::ibv_cq,
}

// SAFETY: see Context.
unsafe impl Send for CompletionQueue {}
// SAFETY: see Context; polling goes through `&mut VerbsDomain`, one thread at a time.
unsafe impl Sync for CompletionQueue {}

impl Drop for CompletionQueue {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_cq; every QP using it holds an Arc of this CQ.
        unsafe { (self.ctx.lib.destroy_cq)(self.raw) };
    }
}

/// A shared receive queue.
struct SharedReceiveQueue {
    pd: Arc<ProtectionDomain>,
    raw: *mut sys::ibv_srq,
}

// SAFETY: see Context.
unsafe impl Send for SharedReceiveQueue {}
// SAFETY: see Context; posting goes through `&mut VerbsDomain`.
unsafe impl Sync for SharedReceiveQueue {}

impl Drop for SharedReceiveQueue {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_srq; every QP attached holds an Arc of this SRQ.
        unsafe { (self.pd.ctx.lib.destroy_srq)(self.raw) };
    }
}

/// A registered memory region (host memory, or GPU memory through a dma-buf).
pub struct MemoryRegion {
    pd: Arc<ProtectionDomain>,
    raw: *mut sys::ibv_mr,
}

// SAFETY: an MR is a handle; libibverbs allows deregistration from any thread.
unsafe impl Send for MemoryRegion {}
// SAFETY: shared references only read the keys.
unsafe impl Sync for MemoryRegion {}

impl MemoryRegion {
    /// The key local work requests name this memory with.
    pub fn lkey(&self) -> u32 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).lkey }
    }

    /// The key a peer writes into this memory with.
    pub fn rkey(&self) -> u32 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).rkey }
    }

    /// Start address (the IOVA peers use as remote address).
    pub fn addr(&self) -> u64 {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).addr as u64 }
    }

    pub fn len(&self) -> usize {
        // SAFETY: raw is a live MR until drop.
        unsafe { (*self.raw).length }
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl std::fmt::Debug for MemoryRegion {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MemoryRegion")
            .field("addr", &format_args!("{:#x}", self.addr()))
            .field("len", &self.len())
            .field("lkey", &self.lkey())
            .field("rkey", &self.rkey())
            .finish()
    }
}

impl Drop for MemoryRegion {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_reg_mr* and is deregistered once.
        unsafe { (self.pd.ctx.lib.dereg_mr)(self.raw) };
    }
}

/// An RC queue pair; its verbs state is tracked by the [`Qp`] typestate that wraps it.
pub struct QueuePair {
    _pd: Arc<ProtectionDomain>,
    _cq: Arc<CompletionQueue>,
    _srq: Arc<SharedReceiveQueue>,
    lib: &'static LibIbverbs,
    raw: *mut sys::ibv_qp,
    /// Capabilities granted by `ibv_create_qp`.
    cap: sys::ibv_qp_cap,
}

// SAFETY: see Context; a QP is used by one thread at a time through `&mut`.
unsafe impl Send for QueuePair {}

impl std::fmt::Debug for QueuePair {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("QueuePair")
            .field("qp_num", &self.qp_num())
            .field("cap", &self.cap)
            .finish()
    }
}

impl Drop for QueuePair {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_create_qp and is destroyed once; outstanding WRs are
        // discarded, and their buffers are owned by transfers that were failed before this.
        unsafe { (self.lib.destroy_qp)(self.raw) };
    }
}

impl QpDriver for QueuePair {
    fn qp_num(&self) -> u32 {
        // SAFETY: raw is a live QP until drop.
        unsafe { (*self.raw).qp_num }
    }

    fn modify(&mut self, m: &Modify) -> Result<()> {
        let mut attr = m.attr;
        // SAFETY: raw is a live QP; attr is a fully initialised ibv_qp_attr that lives across
        // the call; the mask names only members that attr sets.
        let rc = unsafe { (self.lib.modify_qp)(self.raw, &mut attr, m.mask) };
        if rc != 0 {
            return Err(Error::Verbs {
                call: modify_call(m.to),
                source: Errno(rc),
            });
        }
        Ok(())
    }
}

fn modify_call(to: qp::QpState) -> &'static str {
    match to {
        qp::QpState::Reset => "ibv_modify_qp(RESET)",
        qp::QpState::Init => "ibv_modify_qp(INIT)",
        qp::QpState::Rtr => "ibv_modify_qp(RTR)",
        qp::QpState::Rts => "ibv_modify_qp(RTS)",
        qp::QpState::Error => "ibv_modify_qp(ERR)",
    }
}

impl QueuePair {
    /// Posts a linked chain. Returns how many WRs were posted: all, or those before the one the
    /// provider refused, with its error.
    ///
    /// # Safety
    /// Every SGE of the chain must name memory registered on this QP's PD that stays valid (and,
    /// for receives, unread) until the WR's completion is polled or the QP is reset or
    /// destroyed; remote addresses and keys must be ones the peer handed out.
    ///
    /// # Errors
    /// The provider's errno (as [`Error::Verbs`]) beside the count of WRs it accepted.
    unsafe fn post(&mut self, chain: &mut SendChain) -> (usize, Option<Error>) {
        let head = chain.link();
        if head.is_null() {
            return (0, None);
        }
        let mut bad: *mut sys::ibv_send_wr = std::ptr::null_mut();
        // SAFETY: raw is a live QP; head is a valid NULL-terminated chain owned by `chain`, which
        // outlives the call; the caller upholds the buffer contract.
        let rc = unsafe { sys::post_send(self.raw, head, &mut bad) };
        if rc == 0 {
            return (chain.len(), None);
        }
        let posted = chain.index_of(bad).unwrap_or(0);
        (posted, Some(Error::verbs("ibv_post_send", rc)))
    }
}

// ---------------------------------------------------------------------------------------------
// Discovery.

fn cstr(p: *const std::ffi::c_char) -> String {
    if p.is_null() {
        return String::new();
    }
    // SAFETY: libibverbs strings are NUL-terminated and outlive this call.
    unsafe { CStr::from_ptr(p) }.to_string_lossy().into_owned()
}

fn sysfs_dev(name: &str) -> std::path::PathBuf {
    Path::new("/sys/class/infiniband").join(name)
}

fn ifname(ifindex: u32) -> Option<String> {
    let mut buf = [0 as std::ffi::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as if_indextoname requires.
    let p = unsafe { libc::if_indextoname(ifindex, buf.as_mut_ptr()) };
    (!p.is_null()).then(|| cstr(buf.as_ptr()))
}

fn ifindex(name: &str) -> u32 {
    let Ok(c) = std::ffi::CString::new(name) else {
        return 0;
    };
    // SAFETY: c is a valid NUL-terminated string.
    unsafe { libc::if_nametoindex(c.as_ptr()) }
}

/// IP addresses of the named interfaces (`getifaddrs`).
pub fn interface_addrs(names: &[String]) -> Vec<IpAddr> {
    let mut out = Vec::new();
    let mut head: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills head with a list we free below.
    if unsafe { libc::getifaddrs(&mut head) } != 0 {
        return out;
    }
    let mut cur = head;
    while !cur.is_null() {
        // SAFETY: cur walks the list getifaddrs returned, alive until freeifaddrs.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || !names.iter().any(|n| *n == cstr(ifa.ifa_name)) {
            continue;
        }
        // SAFETY: ifa_addr is non-null; its family says which sockaddr it is.
        unsafe {
            match (*ifa.ifa_addr).sa_family as c_int {
                libc::AF_INET => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in);
                    out.push(IpAddr::from(u32::from_be(a.sin_addr.s_addr).to_be_bytes()));
                }
                libc::AF_INET6 => {
                    let a = &*(ifa.ifa_addr as *const libc::sockaddr_in6);
                    out.push(IpAddr::from(a.sin6_addr.s6_addr));
                }
                _ => {}
            }
        }
    }
    // SAFETY: head came from getifaddrs and is freed once.
    unsafe { libc::freeifaddrs(head) };
    out
}

/// Reads a port's GID table: `_ibv_query_gid_ex` (type and netdev included) when exported,
/// else `ibv_query_gid` with the type and netdev from sysfs.
///
/// # Safety
/// `ctx` must be a live context of `lib`.
unsafe fn read_gid_table(
    lib: &LibIbverbs,
    ctx: *mut sys::ibv_context,
    dev: &str,
    port: u8,
    len: i32,
    link: LinkLayer,
) -> Vec<GidEntry> {
    let attrs = sysfs_dev(dev)
        .join("ports")
        .join(port.to_string())
        .join("gid_attrs");
    let mut out = Vec::new();
    for i in 0..len.max(0) as u32 {
        if let Some(q) = lib.query_gid_ex {
            let mut e = sys::ibv_gid_entry::default();
            // SAFETY: ctx is live (caller); e is a writable entry of the size passed.
            let rc = unsafe {
                q(
                    ctx,
                    port as u32,
                    i,
                    &mut e,
                    0,
                    std::mem::size_of::<sys::ibv_gid_entry>(),
                )
            };
            if rc == 0 {
                let gid = Gid::from_sys(&e.gid);
                let default_type = if link == LinkLayer::InfiniBand {
                    GidType::Ib
                } else {
                    GidType::RoceV1
                };
                if !gid.is_zero() {
                    out.push(GidEntry {
                        index: i,
                        gid,
                        gid_type: GidType::from_sys(e.gid_type).unwrap_or(default_type),
                        ifindex: e.ndev_ifindex,
                    });
                }
                continue;
            }
            if rc == libc::ENODATA || rc == libc::EINVAL {
                continue; // an empty slot
            }
            // Anything else (an old kernel without the ioctl): fall back below.
        }
        let mut g = sys::ibv_gid::default();
        // SAFETY: ctx is live (caller); g is a writable ibv_gid.
        if unsafe { (lib.query_gid)(ctx, port, i as c_int, &mut g) } != 0 {
            continue;
        }
        let gid = Gid::from_sys(&g);
        if gid.is_zero() {
            continue;
        }
        let read = |what: &str| std::fs::read_to_string(attrs.join(what).join(i.to_string())).ok();
        let gid_type = read("types")
            .and_then(|t| GidType::from_sysfs(&t, link))
            .unwrap_or(if link == LinkLayer::InfiniBand {
                GidType::Ib
            } else {
                GidType::RoceV1
            });
        let ifx = read("ndevs").map(|n| ifindex(n.trim())).unwrap_or(0);
        out.push(GidEntry {
            index: i,
            gid,
            gid_type,
            ifindex: ifx,
        });
    }
    out
}

/// Queries a device's attributes and ports.
///
/// # Safety
/// `ctx` must be a live context of `lib` for the device named `name`.
///
/// # Errors
/// [`Error::Verbs`] when the device or a port cannot be queried.
unsafe fn probe(lib: &LibIbverbs, ctx: *mut sys::ibv_context, name: &str) -> Result<DeviceInfo> {
    let mut attr = sys::ibv_device_attr::default();
    // SAFETY: ctx is live (caller); attr is writable.
    let rc = unsafe { (lib.query_device)(ctx, &mut attr) };
    if rc != 0 {
        return Err(Error::verbs("ibv_query_device", rc));
    }
    let mut ports = Vec::new();
    for p in 1..=attr.phys_port_cnt {
        let mut pa = sys::ibv_port_attr::default();
        // SAFETY: ctx is live (caller).
        let rc = unsafe { sys::query_port(lib, ctx, p, &mut pa) };
        if rc != 0 {
            return Err(Error::verbs("ibv_query_port", rc));
        }
        let link = LinkLayer::from_sys(pa.link_layer).unwrap_or(LinkLayer::InfiniBand);
        // SAFETY: ctx is live (caller).
        let gid_table = unsafe { read_gid_table(lib, ctx, name, p, pa.gid_tbl_len, link) };
        let netdev = gid_table
            .iter()
            .find(|e| e.ifindex != 0)
            .and_then(|e| ifname(e.ifindex))
            .or_else(|| {
                let d = sysfs_dev(name)
                    .join("ports")
                    .join(p.to_string())
                    .join("gid_attrs/ndevs/0");
                std::fs::read_to_string(d)
                    .ok()
                    .map(|s| s.trim().to_string())
                    .filter(|s| !s.is_empty())
            });
        ports.push(PortInfo {
            port: p,
            state: PortState::from_sys(pa.state),
            link_layer: link,
            active_mtu: Mtu::from_sys(pa.active_mtu).unwrap_or(Mtu::M1024),
            lid: pa.lid,
            active_speed: pa.active_speed,
            active_width: pa.active_width,
            gbps: link_speed_gbps(pa.active_speed, pa.active_width),
            max_msg_size: pa.max_msg_sz,
            grh_required: pa.flags & sys::IBV_QPF_GRH_REQUIRED != 0,
            gid_table,
            netdev,
        });
    }
    let fw = attr
        .fw_ver
        .iter()
        .take_while(|&&c| c != 0)
        .map(|&c| c as u8 as char)
        .collect();
    Ok(DeviceInfo {
        name: name.to_string(),
        pci_address: std::fs::canonicalize(sysfs_dev(name).join("device"))
            .ok()
            .and_then(|p| pci_address(&p)),
        fw_version: fw,
        node_guid: u64::from_be(attr.node_guid),
        caps: DeviceCaps::from_sys(&attr),
        ports,
    })
}

/// Why libibverbs reports no device, in words.
fn no_device_detail(lib: &LibIbverbs, errno: Option<Errno>) -> String {
    let class = Path::new("/sys/class/infiniband");
    let sysfs = match std::fs::read_dir(class) {
        Ok(rd) => {
            let names: Vec<String> = rd.filter_map(|e| e.ok()).map(|e| e.file_name().to_string_lossy().into_owned()).collect();
            if names.is_empty() {
                "/sys/class/infiniband is empty".to_string()
            } else {
                format!("/sys/class/infiniband lists {} but no userspace provider claimed them (install rdma-core's ibverbs-providers)", names.join(", "))
            }
        }
        Err(_) => "/sys/class/infiniband does not exist: the kernel has no RDMA device (or no ib_core / mlx5_ib module loaded)".to_string(),
    };
    let uverbs = if Path::new("/dev/infiniband").exists() {
        ""
    } else {
        "; /dev/infiniband is missing (in a container, pass the devices through)"
    };
    let call = match errno {
        Some(e) if e.0 == libc::ENOSYS => {
            format!("ibv_get_device_list failed: {e}: the kernel has no RDMA (uverbs) support")
        }
        Some(e) => format!("ibv_get_device_list failed: {e}"),
        None => "ibv_get_device_list returned 0 devices".to_string(),
    };
    format!("{call} (libibverbs from {}); {sysfs}{uverbs}", lib.path)
}

/// The device list, freed on drop.
struct DeviceList<'a> {
    lib: &'a LibIbverbs,
    raw: *mut *mut sys::ibv_device,
    n: usize,
}

impl DeviceList<'_> {
    fn get(&self, i: usize) -> *mut sys::ibv_device {
        assert!(i < self.n);
        // SAFETY: raw holds n device pointers (ibv_get_device_list's contract).
        unsafe { *self.raw.add(i) }
    }
}

impl Drop for DeviceList<'_> {
    fn drop(&mut self) {
        // SAFETY: raw came from ibv_get_device_list and is freed once; contexts opened from it
        // stay valid (libibverbs keeps opened devices alive).
        unsafe { (self.lib.free_device_list)(self.raw) };
    }
}

fn device_list(lib: &'static LibIbverbs) -> Result<DeviceList<'static>> {
    let mut n: c_int = 0;
    // SAFETY: n is a valid out-parameter.
    let raw = unsafe { (lib.get_device_list)(&mut n) };
    if raw.is_null() {
        let e = Errno::last();
        return Err(Error::NoDevices {
            detail: no_device_detail(lib, Some(e)),
        });
    }
    let list = DeviceList {
        lib,
        raw,
        n: n.max(0) as usize,
    };
    if list.n == 0 {
        return Err(Error::NoDevices {
            detail: no_device_detail(lib, None),
        });
    }
    Ok(list)
}

/// Lists every RDMA device with its ports and GID tables.
///
/// # Errors
/// [`Error::LibraryNotFound`] with the paths tried, or [`Error::NoDevices`] saying why there are
/// none.
pub fn list_devices() -> Result<Vec<DeviceInfo>> {
    Ok(open_all()?.into_iter().map(|(_, d)| d).collect())
}

fn open_all() -> Result<Vec<(Arc<Context>, DeviceInfo)>> {
    let lib = sys::lib()?;
    let list = device_list(lib)?;
    let mut out = Vec::new();
    let mut failures = Vec::new();
    for i in 0..list.n {
        let dev = list.get(i);
        // SAFETY: dev is a device of the live list.
        let name = cstr(unsafe { (lib.get_device_name)(dev) });
        // SAFETY: as above.
        let raw = unsafe { (lib.open_device)(dev) };
        if raw.is_null() {
            failures.push(format!("{name}: ibv_open_device: {}", Errno::last()));
            continue;
        }
        let ctx = Arc::new(Context { lib, raw });
        // SAFETY: ctx.raw is the live context just opened for `name`.
        match unsafe { probe(lib, ctx.raw, &name) } {
            Ok(info) => out.push((ctx, info)),
            Err(e) => failures.push(format!("{name}: {e}")),
        }
    }
    if out.is_empty() {
        return Err(Error::NoDevices {
            detail: format!("no device could be opened: {}", failures.join("; ")),
        });
    }
    Ok(out)
}

// ---------------------------------------------------------------------------------------------
// The domain.

/// What [`VerbsDomain`] reports to its driver.
#[derive(Debug)]
pub enum DomainEvent {
    /// Deliver these handshake bytes to `peer` out of band; hand its answers to
    /// [`VerbsDomain::on_handshake`].
    SendHandshake { peer: PeerId, bytes: Vec<u8> },
    /// `peer` is connected both ways; writes and messages may be posted.
    Established { peer: PeerId },
    /// `peer`'s connection was reset (it restarted, or a QP failed); in-flight transfers were
    /// failed and reconnection is under way.
    ConnectionReset { peer: PeerId, reason: String },
    /// The handshake with `peer` gave up.
    GaveUp { peer: PeerId, error: Error },
    /// A transfer finished. When `drained` is false (an early failure or cancellation) some of
    /// its WRs may still be in the send queue: keep its memory until [`DomainEvent::Drained`].
    Finished(Finished),
    /// A transfer reported earlier with `drained: false` has nothing left in any queue.
    Drained(TransferId),
    /// A write with immediate landed (the peer is unknown when its QP was just torn down).
    Imm { peer: Option<PeerId>, imm: u32 },
    /// A message arrived.
    Message {
        peer: Option<PeerId>,
        data: Vec<u8>,
        imm: Option<u32>,
    },
    /// A handshake observation, for logs.
    Handshake {
        peer: PeerId,
        event: handshake::Event,
    },
    /// A completion stolon did not post.
    Stray {
        wr_id: u64,
        status: completion::WcStatus,
    },
}

struct Peer {
    data: Option<AnyQp<QueuePair>>,
    msg: Option<AnyQp<QueuePair>>,
    data_sq: SendQueue,
    msg_sq: SendQueue,
    hs: Handshake,
}

/// One ConnectX port.
pub struct VerbsDomain {
    // Field order is drop order: QPs, then SRQs, the message buffers' MR, the CQ, the PD, the
    // context (each also kept alive by the Arcs of what depends on it), then the raw buffers.
    peers: HashMap<PeerId, Peer>,
    srq_imm: Arc<SharedReceiveQueue>,
    srq_msg: Arc<SharedReceiveQueue>,
    msg_mr: MemoryRegion,
    cq: Arc<CompletionQueue>,
    pd: Arc<ProtectionDomain>,
    _ctx: Arc<Context>,
    lib: &'static LibIbverbs,
    info: DeviceInfo,
    port_index: usize,
    gid: GidChoice,
    local_path: LocalPath,
    cfg: DomainConfig,
    sizes: QueueSizes,
    init: InitAttrs,
    qpn_to_peer: HashMap<u32, PeerId>,
    transfers: TransferTable,
    qp_errors: QpErrors,
    imm_stock: RecvStock,
    msg_stock: RecvStock,
    free_recv_bufs: Vec<u32>,
    free_send_bufs: Vec<u32>,
    send_buf_of: HashMap<TransferId, u32>,
    /// Granted inline size of the QPs (the smallest seen).
    max_inline: u32,
    next_epoch: u64,
    rng: handshake::Rng,
    wcs: Vec<sys::ibv_wc>,
    /// Receive buffers then send buffers, `max_message` bytes each; registered as `msg_mr`.
    msg_mem: Box<[u8]>,
}

/// Opens the configured (or first active) port. Alias of [`VerbsDomain::open`].
///
/// # Errors
/// See [`VerbsDomain::open`].
pub fn open_device(cfg: DomainConfig) -> Result<VerbsDomain> {
    VerbsDomain::open(cfg)
}

impl VerbsDomain {
    /// Opens a port and builds the shared objects.
    ///
    /// # Errors
    /// [`Error::LibraryNotFound`] (paths tried), [`Error::NoDevices`], [`Error::NoActivePort`]
    /// (every port seen), [`Error::DeviceNotFound`], GID selection errors, [`Error::Config`] for
    /// sizes the device cannot take, and [`Error::Verbs`] for a failing call.
    pub fn open(mut cfg: DomainConfig) -> Result<Self> {
        let mut all = open_all()?;
        let infos: Vec<DeviceInfo> = all.iter().map(|(_, d)| d.clone()).collect();
        let (di, pi) = choose_port(&infos, cfg.device.as_deref(), cfg.port, cfg.link_layer)?;
        let (ctx, info) = all.swap_remove(di);
        drop(all); // closes the other devices
        let lib = ctx.lib;
        let port = info.ports[pi].clone();
        let names: Vec<String> = port
            .gid_table
            .iter()
            .filter_map(|e| (e.ifindex != 0).then(|| ifname(e.ifindex)).flatten())
            .chain(port.netdev.clone())
            .collect();
        let addrs = interface_addrs(&names);
        let gid = gid::select_gid(
            port.link_layer,
            &port.gid_table,
            &addrs,
            &cfg.gid,
            port.grh_required,
        )?;
        cfg.qp.port = port.port;
        cfg.qp
            .clamp_to_device(info.caps.max_qp_init_rd_atom, info.caps.max_qp_rd_atom);
        cfg.qp.validate()?;
        let init = qp::init_attrs(&cfg.qp)?;
        let sizes = queue_sizes(&cfg, &info.caps)?;
        let local_path = LocalPath {
            link_layer: port.link_layer,
            active_mtu: port.active_mtu,
            sgid_index: gid.index,
            use_grh: gid.use_grh,
        };

        // SAFETY: ctx.raw is the live context of the chosen device.
        let pd = unsafe { (lib.alloc_pd)(ctx.raw) };
        if pd.is_null() {
            return Err(Error::Verbs {
                call: "ibv_alloc_pd",
                source: Errno::last(),
            });
        }
        let pd = Arc::new(ProtectionDomain {
            ctx: ctx.clone(),
            raw: pd,
        });
        // SAFETY: as above; no completion channel (polled), vector 0.
        let cq = unsafe {
            (lib.create_cq)(
                ctx.raw,
                sizes.cq as c_int,
                std::ptr::null_mut(),
                std::ptr::null_mut(),
                0,
            )
        };
        if cq.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_cq",
                source: Errno::last(),
            });
        }
        let cq = Arc::new(CompletionQueue {
            ctx: ctx.clone(),
            raw: cq,
        });
        let srq_imm = Self::create_srq(&pd, sizes.imm_srq)?;
        let srq_msg = Self::create_srq(&pd, sizes.msg_srq)?;

        let nbuf = sizes.msg_srq as usize + cfg.msg_send_buffers as usize;
        let mut msg_mem = vec![0u8; nbuf * cfg.max_message as usize].into_boxed_slice();
        // SAFETY: msg_mem is owned by the domain and dropped after msg_mr (field order) and after
        // the SRQs and QPs that may still reference it.
        let msg_mr = unsafe {
            Self::reg(
                &pd,
                msg_mem.as_mut_ptr().cast(),
                msg_mem.len().max(1),
                sys::IBV_ACCESS_LOCAL_WRITE,
            )?
        };

        let mut d = VerbsDomain {
            peers: HashMap::new(),
            srq_imm,
            srq_msg,
            msg_mr,
            cq,
            pd,
            _ctx: ctx,
            lib,
            port_index: pi,
            info,
            gid,
            local_path,
            sizes,
            init,
            qpn_to_peer: HashMap::new(),
            transfers: TransferTable::new(),
            qp_errors: QpErrors::default(),
            imm_stock: RecvStock::new(sizes.imm_srq, (sizes.imm_srq / 8).max(1)),
            msg_stock: RecvStock::new(sizes.msg_srq, (sizes.msg_srq / 8).max(1)),
            free_recv_bufs: (0..sizes.msg_srq).rev().collect(),
            free_send_bufs: (sizes.msg_srq..nbuf as u32).rev().collect(),
            send_buf_of: HashMap::new(),
            max_inline: cfg.max_inline,
            next_epoch: 1,
            rng: handshake::Rng::new(handshake::os_seed()),
            wcs: vec![sys::ibv_wc::default(); 256],
            msg_mem,
            cfg,
        };
        d.refill()?;
        Ok(d)
    }

    fn create_srq(pd: &Arc<ProtectionDomain>, depth: u32) -> Result<Arc<SharedReceiveQueue>> {
        let mut attr = sys::ibv_srq_init_attr {
            srq_context: std::ptr::null_mut(),
            attr: sys::ibv_srq_attr {
                max_wr: depth,
                max_sge: 1,
                srq_limit: 0,
            },
        };
        // SAFETY: pd is live; attr is initialised and outlives the call.
        let raw = unsafe { (pd.ctx.lib.create_srq)(pd.raw, &mut attr) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_srq",
                source: Errno::last(),
            });
        }
        Ok(Arc::new(SharedReceiveQueue {
            pd: pd.clone(),
            raw,
        }))
    }

    /// # Safety
    /// `addr..addr+len` must stay mapped while the region is registered.
    ///
    /// # Errors
    /// [`Error::Verbs`] from `ibv_reg_mr`.
    unsafe fn reg(
        pd: &Arc<ProtectionDomain>,
        addr: *mut c_void,
        len: usize,
        access: c_uint,
    ) -> Result<MemoryRegion> {
        // SAFETY: pd is live; the caller keeps the memory mapped.
        let raw = unsafe { pd.ctx.lib.reg_mr_any(pd.raw, addr, len, access) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_reg_mr",
                source: Errno::last(),
            });
        }
        Ok(MemoryRegion {
            pd: pd.clone(),
            raw,
        })
    }

    /// The device opened.
    pub fn device(&self) -> &DeviceInfo {
        &self.info
    }

    /// The port opened.
    pub fn port(&self) -> &PortInfo {
        &self.info.ports[self.port_index]
    }

    /// The GID (and GRH use) chosen.
    pub fn gid(&self) -> &GidChoice {
        &self.gid
    }

    /// Queue sizes in effect.
    pub fn sizes(&self) -> QueueSizes {
        self.sizes
    }

    /// Limits writes are planned with.
    pub fn limits(&self) -> Limits {
        Limits {
            max_send_wr: self.sizes.data_sq,
            max_sge: self.sizes.send_sge,
            max_msg_size: self.port().max_msg_size as u64,
            max_inline: self.max_inline,
        }
    }

    fn access(&self, remote_write: bool) -> c_uint {
        let mut a = sys::IBV_ACCESS_LOCAL_WRITE;
        if remote_write {
            a |= sys::IBV_ACCESS_REMOTE_WRITE;
        }
        if self.cfg.relaxed_ordering {
            a |= sys::IBV_ACCESS_RELAXED_ORDERING;
        }
        a
    }

    /// Registers host memory (and, with `remote_write`, lets peers write into it).
    ///
    /// # Safety
    /// `ptr..ptr+len` must stay mapped until the region is dropped, and must not be freed while
    /// a transfer using it is in flight.
    ///
    /// # Errors
    /// [`Error::Verbs`] from `ibv_reg_mr`.
    pub unsafe fn register(
        &self,
        ptr: *mut u8,
        len: usize,
        remote_write: bool,
    ) -> Result<MemoryRegion> {
        // SAFETY: forwarded contract.
        unsafe { Self::reg(&self.pd, ptr.cast(), len, self.access(remote_write)) }
    }

    /// Whether the loaded libibverbs exports `ibv_reg_dmabuf_mr` (rdma-core 34 or newer); the
    /// kernel and device may still refuse a registration.
    pub fn supports_dmabuf(&self) -> bool {
        self.lib.reg_dmabuf_mr.is_some()
    }

    /// Registers GPU (or other device) memory exported as a dma-buf: `len` bytes at `offset` in
    /// the buffer `fd`, addressed by peers as `iova`. The registration holds its own reference
    /// to the dma-buf: `fd` may be closed once this returns.
    ///
    /// # Safety
    /// The dma-buf must stay allocated until the region is dropped.
    ///
    /// # Errors
    /// [`Error::Unsupported`] when libibverbs predates `ibv_reg_dmabuf_mr` (rdma-core 34);
    /// [`Error::Verbs`] when the kernel or device refuses.
    pub unsafe fn register_dmabuf(
        &self,
        fd: std::os::fd::RawFd,
        offset: u64,
        len: usize,
        iova: u64,
        remote_write: bool,
    ) -> Result<MemoryRegion> {
        let Some(f) = self.lib.reg_dmabuf_mr else {
            return Err(Error::Unsupported {
                what: "ibv_reg_dmabuf_mr",
                why: format!(
                    "{} does not export it (rdma-core 34 or newer needed)",
                    self.lib.path
                ),
            });
        };
        let access = self.access(remote_write);
        // SAFETY: pd is live; the caller keeps the dma-buf allocated.
        let mut raw = unsafe { f(self.pd.raw, offset, len, iova, fd, access as c_int) };
        if raw.is_null() && access & sys::IBV_ACCESS_OPTIONAL_RANGE != 0 {
            // Older kernels refuse optional flags (relaxed ordering) here: retry without them.
            let plain = access & !sys::IBV_ACCESS_OPTIONAL_RANGE;
            // SAFETY: as above.
            raw = unsafe { f(self.pd.raw, offset, len, iova, fd, plain as c_int) };
        }
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_reg_dmabuf_mr",
                source: Errno::last(),
            });
        }
        Ok(MemoryRegion {
            pd: self.pd.clone(),
            raw,
        })
    }

    fn create_qp(&self, srq: &Arc<SharedReceiveQueue>, depth: u32) -> Result<QueuePair> {
        let mut attr = sys::ibv_qp_init_attr {
            qp_context: std::ptr::null_mut(),
            send_cq: self.cq.raw,
            recv_cq: self.cq.raw,
            srq: srq.raw,
            cap: sys::ibv_qp_cap {
                max_send_wr: depth,
                max_recv_wr: 0,
                max_send_sge: self.sizes.send_sge,
                max_recv_sge: 0,
                max_inline_data: self.cfg.max_inline,
            },
            qp_type: sys::IBV_QPT_RC,
            sq_sig_all: 0,
        };
        // SAFETY: pd, cq and srq are live; attr is initialised and outlives the call.
        let raw = unsafe { (self.lib.create_qp)(self.pd.raw, &mut attr) };
        if raw.is_null() {
            return Err(Error::Verbs {
                call: "ibv_create_qp",
                source: Errno::last(),
            });
        }
        Ok(QueuePair {
            _pd: self.pd.clone(),
            _cq: self.cq.clone(),
            _srq: srq.clone(),
            lib: self.lib,
            raw,
            cap: attr.cap,
        })
    }

    fn ensure_peer(&mut self, peer: PeerId) -> Result<()> {
        if self.peers.contains_key(&peer) {
            return Ok(());
        }
        if self.peers.len() >= self.cfg.max_peers as usize {
            return Err(Error::Config(format!(
                "max_peers = {} reached",
                self.cfg.max_peers
            )));
        }
        let data = self.create_qp(&self.srq_imm.clone(), self.sizes.data_sq)?;
        let msg = self.create_qp(&self.srq_msg.clone(), self.sizes.msg_sq)?;
        self.max_inline = self
            .max_inline
            .min(data.cap.max_inline_data)
            .min(msg.cap.max_inline_data);
        let data_depth = data.cap.max_send_wr.min(self.sizes.data_sq);
        let msg_depth = msg.cap.max_send_wr.min(self.sizes.msg_sq);
        let data = Qp::new(data).init(&self.init)?;
        let msg = Qp::new(msg).init(&self.init)?;
        let port = self.port();
        let local = LocalStatic {
            data_qpn: data.qp_num(),
            msg_qpn: msg.qp_num(),
            lid: port.lid,
            gid: self.gid.gid,
            mtu: port.active_mtu,
            link_layer: port.link_layer,
        };
        self.qpn_to_peer.insert(data.qp_num(), peer);
        self.qpn_to_peer.insert(msg.qp_num(), peer);
        // The first epoch must exceed every epoch an earlier handshake with this peer used, in
        // this process or one before it: the wall clock in ns, kept monotonic here, leaving
        // 2^20 attempts per handshake.
        let epoch = handshake::initial_epoch().max(self.next_epoch);
        self.next_epoch = epoch + (1 << 20);
        let hs = Handshake::new(
            self.cfg.handshake.clone(),
            local,
            epoch,
            self.rng.next_u64(),
        );
        self.peers.insert(
            peer,
            Peer {
                data: Some(AnyQp::Init(data)),
                msg: Some(AnyQp::Init(msg)),
                data_sq: SendQueue::new(data_depth, self.cfg.signal_every),
                // Every message send is signalled: its buffer is released on its completion.
                msg_sq: SendQueue::new(msg_depth, 1),
                hs,
            },
        );
        Ok(())
    }

    /// Starts connecting to `peer` (creating its QPs).
    ///
    /// # Errors
    /// [`Error::Verbs`] when the QPs cannot be created; [`Error::Config`] past `max_peers`.
    pub fn connect(&mut self, peer: PeerId, now: Instant) -> Result<Vec<DomainEvent>> {
        self.ensure_peer(peer)?;
        let step = self
            .peers
            .get_mut(&peer)
            .expect("just ensured")
            .hs
            .start(now);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    /// Handles handshake bytes from `peer` (creating its QPs on first contact).
    ///
    /// # Errors
    /// As for [`Self::connect`].
    pub fn on_handshake(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<DomainEvent>> {
        self.ensure_peer(peer)?;
        let step = self
            .peers
            .get_mut(&peer)
            .expect("just ensured")
            .hs
            .on_bytes(now, bytes);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    /// Drives handshake timers.
    pub fn tick(&mut self, now: Instant) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in ids {
            let step = self.peers.get_mut(&peer).expect("listed").hs.on_tick(now);
            self.apply(peer, step, &mut out);
        }
        out
    }

    /// When [`Self::tick`] next has work.
    pub fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.hs.next_deadline())
            .min()
    }

    pub fn is_established(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.hs.phase() == Phase::Established)
    }

    /// Carries out a handshake step.
    fn apply(&mut self, peer: PeerId, step: Step, out: &mut Vec<DomainEvent>) {
        for event in step.events {
            out.push(DomainEvent::Handshake { peer, event });
        }
        for action in step.actions {
            match action {
                Action::Send(m) => out.push(DomainEvent::SendHandshake {
                    peer,
                    bytes: m.encode().to_vec(),
                }),
                Action::Teardown(reason) => {
                    let reason = reason.to_string();
                    let err = Error::ConnectionReset {
                        peer,
                        reason: reason.clone(),
                    };
                    if let Err(e) = self.recycle(peer, &err, out) {
                        self.drop_peer(peer, e, out);
                        return;
                    }
                    out.push(DomainEvent::ConnectionReset { peer, reason });
                }
                Action::Connect(c) => {
                    if let Err(e) = self.connect_qps(peer, &c) {
                        self.drop_peer(peer, e, out);
                        return;
                    }
                }
                Action::Established => out.push(DomainEvent::Established { peer }),
                Action::GiveUp(error) => {
                    self.fail_transfers(peer, &error, out);
                    out.push(DomainEvent::GaveUp { peer, error });
                }
            }
        }
    }

    fn connect_qps(&mut self, peer: PeerId, c: &handshake::Connect) -> Result<()> {
        let attrs = c.attrs(&self.cfg.qp, &self.local_path)?;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        for (slot, (rtr, rts)) in [(&mut p.data, attrs.data), (&mut p.msg, attrs.msg)] {
            let q = slot.take().ok_or(Error::NotConnected(peer))?;
            let (q, r) = q.connect(&rtr, &rts);
            *slot = Some(q);
            r?;
        }
        Ok(())
    }

    /// Fails the peer's transfers and brings both QPs back to INIT.
    fn recycle(&mut self, peer: PeerId, err: &Error, out: &mut Vec<DomainEvent>) -> Result<()> {
        self.fail_transfers(peer, err, out);
        let init = self.init;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        p.data_sq.reset();
        p.msg_sq.reset();
        for slot in [&mut p.data, &mut p.msg] {
            let q = slot.take().ok_or(Error::NotConnected(peer))?;
            let qpn = q.qp_num();
            let (q, r) = q.recycle(&init);
            *slot = Some(q);
            r?;
            self.qp_errors.clear(qpn);
        }
        Ok(())
    }

    /// Destroys a peer's QPs after an unrecoverable error.
    fn drop_peer(&mut self, peer: PeerId, error: Error, out: &mut Vec<DomainEvent>) {
        self.fail_transfers(peer, &error, out);
        if let Some(p) = self.peers.remove(&peer) {
            for q in [p.data, p.msg].into_iter().flatten() {
                self.qpn_to_peer.remove(&q.qp_num());
            }
        }
        out.push(DomainEvent::GaveUp { peer, error });
    }

    /// Forgets `peer`: fails its transfers and destroys its QPs.
    pub fn disconnect(&mut self, peer: PeerId) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        if self.peers.contains_key(&peer) {
            self.drop_peer(peer, Error::NotConnected(peer), &mut out);
        }
        out
    }

    fn finish(&mut self, f: Finished, out: &mut Vec<DomainEvent>) {
        if f.drained {
            if let Some(b) = self.send_buf_of.remove(&f.id) {
                self.free_send_bufs.push(b);
            }
        }
        out.push(DomainEvent::Finished(f));
    }

    fn drained(&mut self, id: TransferId, out: &mut Vec<DomainEvent>) {
        if let Some(b) = self.send_buf_of.remove(&id) {
            self.free_send_bufs.push(b);
        }
        out.push(DomainEvent::Drained(id));
    }

    /// Retires every transfer to `peer` (its QPs are being reset or destroyed).
    fn fail_transfers(&mut self, peer: PeerId, error: &Error, out: &mut Vec<DomainEvent>) {
        let (failed, drained) = self.transfers.fail_peer(peer, error);
        for f in failed {
            self.finish(f, out);
        }
        for id in drained {
            self.drained(id, out);
        }
    }

    /// Plans a write from local segments (see [`wr::plan_writes`]).
    ///
    /// # Errors
    /// [`Error::Config`] for unusable limits.
    pub fn plan(&self, segs: &[WriteSeg]) -> Result<WritePlan> {
        wr::plan_writes(segs, &self.limits())
    }

    /// How many immediates a receiver sees for `plan` under the configured policy.
    pub fn imm_count(&self, plan: &WritePlan) -> usize {
        self.cfg.imm_policy.imm_count(plan.wrs.len())
    }

    /// Starts a transfer of `plan` to `peer`; post it with [`Self::post_write`].
    ///
    /// # Errors
    /// [`Error::NotConnected`] unless established; [`Error::InvalidArgument`] for an empty plan.
    pub fn begin_write(&mut self, peer: PeerId, plan: &WritePlan) -> Result<TransferId> {
        if !self.is_established(peer) {
            return Err(Error::NotConnected(peer));
        }
        self.transfers.begin(peer, plan.wrs.len() as u64)
    }

    /// Posts WRs `from..` of `plan` for transfer `id` on `peer`'s data QP, as many as the send
    /// queue takes; returns how many were posted (call again from `from + n` after polling).
    ///
    /// # Safety
    /// The local memory named by the plan must stay registered and unmodified until the
    /// transfer finishes; remote addresses and keys must be ones the peer handed out for this
    /// transfer.
    ///
    /// # Errors
    /// [`Error::NotConnected`]; [`Error::Verbs`] when the provider refuses a WR, in which case
    /// the transfer is failed and the connection reset.
    #[allow(clippy::too_many_arguments)]
    pub unsafe fn post_write(
        &mut self,
        peer: PeerId,
        id: TransferId,
        plan: &WritePlan,
        from: usize,
        imm: Option<u32>,
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<usize> {
        if from >= plan.wrs.len() {
            return Ok(0);
        }
        if !self.transfers.is_active(id) {
            return Err(Error::InvalidArgument(
                "the transfer is not in flight".into(),
            ));
        }
        let (policy, max_inline) = (self.cfg.imm_policy, self.max_inline);
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        if p.hs.phase() != Phase::Established {
            return Err(Error::NotConnected(peer));
        }
        let qp = p
            .data
            .as_mut()
            .and_then(AnyQp::rts_mut)
            .ok_or(Error::NotConnected(peer))?;
        let adm = p.data_sq.admit(plan.wrs.len() - from);
        if adm.count == 0 {
            return Ok(0);
        }
        let mut chain = wr::build_writes(
            plan,
            from..from + adm.count,
            imm,
            policy,
            &adm,
            max_inline,
            |c| id.wr_id(WrKind::Write, c),
        );
        // SAFETY: the caller upholds the memory contract for the plan's SGEs and remote ranges.
        let (posted, err) = unsafe { qp.sender().post(&mut chain) };
        self.transfers.posted(id, posted as u64);
        if let Some(e) = err {
            // A refused post leaves the SQ accounting unreliable: fail and reset the connection.
            if let Some(f) = self.transfers.cancel(id, e.clone()) {
                self.finish(f, out);
            }
            self.local_failure(peer, &e, now, out);
            return Err(e);
        }
        Ok(posted)
    }

    /// Posts a batch of separate writes to `peer` as one chain (one `ibv_post_send`, one WR
    /// per segment, [`wr::plan_ops`]) under one transfer, each WR with its own immediate
    /// (`imms[i]` for `segs[i]`). Only as many as the send queue has room for are taken (a
    /// prefix, at least one); every `signal_every`th WR and the last are signalled, so the
    /// transfer finishes when the chain's last WR completes, and an error completion anywhere
    /// fails the whole transfer. Returns the transfer and how many segments it took, or `None`
    /// when the send queue is full.
    ///
    /// # Safety
    /// As [`Self::post_write`], for every segment taken.
    ///
    /// # Errors
    /// [`Error::NotConnected`]; [`Error::InvalidArgument`] for mismatched lengths, an empty
    /// batch or a segment longer than one message: nothing was posted. A WR the provider
    /// refuses fails the transfer through `out` instead (and resets the connection).
    pub unsafe fn post_ops(
        &mut self,
        peer: PeerId,
        segs: &[WriteSeg],
        imms: &[Option<u32>],
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<(TransferId, usize)>> {
        if segs.is_empty() || segs.len() != imms.len() {
            return Err(Error::InvalidArgument(format!(
                "{} segments with {} immediates",
                segs.len(),
                imms.len()
            )));
        }
        if !self.is_established(peer) {
            return Err(Error::NotConnected(peer));
        }
        let free = self
            .peers
            .get(&peer)
            .ok_or(Error::NotConnected(peer))?
            .data_sq
            .free() as usize;
        let n = free.min(segs.len());
        if n == 0 {
            return Ok(None);
        }
        let plan = wr::plan_ops(&segs[..n], &self.limits())?;
        let id = self.transfers.begin(peer, n as u64)?;
        let max_inline = self.max_inline;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        let qp = p
            .data
            .as_mut()
            .and_then(AnyQp::rts_mut)
            .ok_or(Error::NotConnected(peer))?;
        let adm = p.data_sq.admit(n);
        debug_assert_eq!(adm.count, n, "room was checked");
        let mut chain = wr::build_writes_with(
            &plan,
            0..adm.count,
            |i| imms[i],
            &adm,
            max_inline,
            |c| id.wr_id(WrKind::Write, c),
        );
        // SAFETY: the caller upholds the memory contract for every segment taken.
        let (posted, err) = unsafe { qp.sender().post(&mut chain) };
        self.transfers.posted(id, posted as u64);
        if let Some(e) = err {
            // Part of the chain may be in the send queue: the failure is reported through
            // `out` (drained or not), like a failed completion, never as an error here, so the
            // caller keeps the memory of every segment until the transfer has drained.
            if let Some(f) = self.transfers.cancel(id, e.clone()) {
                self.finish(f, out);
            }
            self.local_failure(peer, &e, now, out);
        }
        Ok(Some((id, adm.count)))
    }

    /// Sends a message (copied into a registered buffer) on `peer`'s message QP. Returns `None`
    /// when no buffer or send slot is free: poll, then retry.
    ///
    /// # Errors
    /// [`Error::NotConnected`]; [`Error::InvalidArgument`] for a message over `max_message`;
    /// [`Error::Verbs`] when the provider refuses it.
    pub fn send_message(
        &mut self,
        peer: PeerId,
        data: &[u8],
        imm: Option<u32>,
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) -> Result<Option<TransferId>> {
        let max = self.cfg.max_message as usize;
        if data.len() > max {
            return Err(Error::InvalidArgument(format!(
                "message of {} bytes exceeds {max}",
                data.len()
            )));
        }
        if !self.is_established(peer) {
            return Err(Error::NotConnected(peer));
        }
        let Some(buf) = self.free_send_bufs.pop() else {
            return Ok(None);
        };
        let id = self.transfers.begin(peer, 1)?;
        let start = buf as usize * max;
        self.msg_mem[start..start + data.len()].copy_from_slice(data);
        let sge = sys::ibv_sge {
            addr: self.msg_mem.as_ptr() as u64 + start as u64,
            length: data.len() as u32,
            lkey: self.msg_mr.lkey(),
        };
        let max_inline = self.max_inline;
        let p = self.peers.get_mut(&peer).ok_or(Error::NotConnected(peer))?;
        let adm = p.msg_sq.admit(1);
        let Some(qp) = p
            .msg
            .as_mut()
            .and_then(AnyQp::rts_mut)
            .filter(|_| adm.count == 1)
        else {
            p.msg_sq.unadmit(adm.count as u32);
            self.transfers.cancel(id, Error::NotConnected(peer));
            self.free_send_bufs.push(buf);
            return Ok(None);
        };
        let mut chain = wr::build_send(sge, imm, true, max_inline, id.wr_id(WrKind::Send, 1));
        // SAFETY: the SGE names the domain's registered send buffer `buf`, which is not reused
        // until this transfer finishes (it is released in `finish`).
        let (posted, err) = unsafe { qp.sender().post(&mut chain) };
        self.transfers.posted(id, posted as u64);
        self.send_buf_of.insert(id, buf);
        if let Some(e) = err {
            if let Some(f) = self.transfers.cancel(id, e.clone()) {
                self.finish(f, out);
            }
            self.local_failure(peer, &e, now, out);
            return Err(e);
        }
        Ok(Some(id))
    }

    /// Ends a transfer early (its deadline passed). Its WRs still drain; the result is reported
    /// now.
    pub fn cancel(&mut self, id: TransferId, error: Error, out: &mut Vec<DomainEvent>) {
        if let Some(f) = self.transfers.cancel(id, error) {
            self.finish(f, out);
        }
    }

    fn local_failure(&mut self, peer: PeerId, e: &Error, now: Instant, out: &mut Vec<DomainEvent>) {
        if let Some(p) = self.peers.get_mut(&peer) {
            let step = p.hs.local_failure(now, &e.to_string());
            self.apply(peer, step, out);
        }
    }

    /// Posts receives to bring both SRQs back to their targets.
    fn refill(&mut self) -> Result<()> {
        let n = self.imm_stock.refill();
        if n > 0 {
            let id = WrId {
                kind: WrKind::RecvImm,
                slot: 0,
                generation: 0,
                count: 0,
            }
            .encode();
            let mut chain = RecvChain::empty(std::iter::repeat(id).take(n as usize));
            // SAFETY: the WRs have no SGEs; the SRQ is live.
            let posted = unsafe { post_srq(&self.srq_imm, &mut chain) }?;
            self.imm_stock.added(posted);
        }
        let n = self
            .msg_stock
            .refill()
            .min(self.free_recv_bufs.len() as u32);
        if n > 0 {
            let max = self.cfg.max_message as u64;
            let base = self.msg_mem.as_ptr() as u64;
            let lkey = self.msg_mr.lkey();
            let bufs: Vec<u32> = (0..n).filter_map(|_| self.free_recv_bufs.pop()).collect();
            let mut chain = RecvChain::buffers(bufs.iter().map(|&b| {
                let id = WrId {
                    kind: WrKind::RecvMsg,
                    slot: b,
                    generation: 0,
                    count: 0,
                }
                .encode();
                (
                    id,
                    sys::ibv_sge {
                        addr: base + b as u64 * max,
                        length: max as u32,
                        lkey,
                    },
                )
            }));
            // SAFETY: each SGE is a receive buffer of msg_mem, registered as msg_mr, not
            // read until its completion returns it to free_recv_bufs.
            let r = unsafe { post_srq(&self.srq_msg, &mut chain) };
            let posted = *r.as_ref().unwrap_or(&0);
            // Buffers not posted go back to the free list.
            self.free_recv_bufs
                .extend(bufs[posted as usize..].iter().rev());
            self.msg_stock.added(posted);
            r?;
        }
        Ok(())
    }

    /// Polls the completion queue, accounts every completion, and keeps the receive queues
    /// stocked. Returns the number of completions handled.
    ///
    /// # Errors
    /// [`Error::Verbs`] when polling or re-posting receives fails (the domain is then unusable).
    pub fn poll(&mut self, now: Instant, out: &mut Vec<DomainEvent>) -> Result<usize> {
        let mut wcs = std::mem::take(&mut self.wcs);
        // SAFETY: cq is live and polled only here, through &mut self.
        let n = unsafe { sys::poll_cq(self.cq.raw, &mut wcs) };
        if n < 0 {
            self.wcs = wcs;
            return Err(Error::verbs("ibv_poll_cq", -n));
        }
        for wc in &wcs[..n as usize] {
            let c = completion::classify(wc, &mut self.qp_errors);
            self.handle(c, now, out);
        }
        self.wcs = wcs;
        self.refill()?;
        Ok(n as usize)
    }

    fn handle(&mut self, c: Completion, now: Instant, out: &mut Vec<DomainEvent>) {
        match c {
            Completion::Send { id, qp_num, result } => {
                let peer = self.qpn_to_peer.get(&qp_num).copied();
                let real_error = matches!(&result, Err(e) if !matches!(e, Error::Flushed { .. }));
                let cause = result.as_ref().err().cloned();
                let outcome = self.transfers.on_send_completion(id, result);
                if outcome.live && !real_error {
                    if let Some(p) = peer.and_then(|p| self.peers.get_mut(&p)) {
                        let sq = if id.kind == WrKind::Write {
                            &mut p.data_sq
                        } else {
                            &mut p.msg_sq
                        };
                        sq.complete(id.count);
                    }
                }
                if let Some(f) = outcome.finished {
                    self.finish(f, out);
                }
                if let Some(id) = outcome.drained {
                    self.drained(id, out);
                }
                if let (true, Some(peer), Some(e)) = (real_error, peer, cause) {
                    self.local_failure(peer, &e, now, out);
                }
            }
            Completion::Imm { imm, qp_num, .. } => {
                self.imm_stock.consumed(1);
                out.push(DomainEvent::Imm {
                    peer: self.qpn_to_peer.get(&qp_num).copied(),
                    imm,
                });
            }
            Completion::Message {
                buf,
                len,
                qp_num,
                imm,
            } => {
                self.msg_stock.consumed(1);
                let max = self.cfg.max_message as usize;
                let start = buf as usize * max;
                let len = (len as usize).min(max);
                let data = self.msg_mem[start..start + len].to_vec();
                self.free_recv_bufs.push(buf);
                out.push(DomainEvent::Message {
                    peer: self.qpn_to_peer.get(&qp_num).copied(),
                    data,
                    imm,
                });
            }
            Completion::RecvFailed { id, qp_num, error } => {
                match id.kind {
                    WrKind::RecvMsg => {
                        self.msg_stock.consumed(1);
                        self.free_recv_bufs.push(id.slot);
                    }
                    _ => self.imm_stock.consumed(1),
                }
                // A receive error puts the QP it arrived on in error.
                if !matches!(error, Error::Flushed { .. }) {
                    if let Some(peer) = self.qpn_to_peer.get(&qp_num).copied() {
                        self.local_failure(peer, &error, now, out);
                    }
                }
            }
            Completion::Unknown { wr_id, status, .. } => {
                out.push(DomainEvent::Stray { wr_id, status })
            }
        }
    }
}

impl Drop for VerbsDomain {
    fn drop(&mut self) {
        // QPs first (the field order does the rest; the Arcs guarantee it).
        self.peers.clear();
    }
}

impl std::fmt::Debug for VerbsDomain {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VerbsDomain")
            .field("device", &self.info.name)
            .field("port", &self.port().port)
            .field("gid", &self.gid)
            .field("peers", &self.peers.len())
            .field("transfers", &self.transfers.active())
            .finish_non_exhaustive()
    }
}

/// Posts a receive chain on an SRQ; returns how many were posted.
///
/// # Safety
/// As for [`sys::post_srq_recv`]: every SGE names registered memory that stays valid and unread
/// until its completion.
///
/// # Errors
/// [`Error::Verbs`] when the provider refuses a WR (those before it are posted).
unsafe fn post_srq(srq: &SharedReceiveQueue, chain: &mut RecvChain) -> Result<u32> {
    let head = chain.link();
    if head.is_null() {
        return Ok(0);
    }
    let mut bad: *mut sys::ibv_recv_wr = std::ptr::null_mut();
    // SAFETY: srq is live; head is a valid chain owned by `chain`, alive across the call.
    let rc = unsafe { sys::post_srq_recv(srq.raw, head, &mut bad) };
    if rc == 0 {
        return Ok(chain.len() as u32);
    }
    let posted = chain.index_of(bad).unwrap_or(0) as u32;
    if posted > 0 {
        // Partial success is still progress; report the error on the next refill.
        return Ok(posted);
    }
    Err(Error::verbs("ibv_post_srq_recv", rc))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn port(p: u8, state: PortState, link: LinkLayer) -> PortInfo {
        PortInfo {
            port: p,
            state,
            link_layer: link,
            active_mtu: Mtu::M4096,
            lid: 0,
            active_speed: 64,
            active_width: 2,
            gbps: link_speed_gbps(64, 2),
            max_msg_size: 1 << 30,
            grh_required: false,
            gid_table: Vec::new(),
            netdev: None,
        }
    }

    fn caps() -> DeviceCaps {
        DeviceCaps {
            max_qp_wr: 32768,
            max_sge: 30,
            max_cqe: 4_194_303,
            max_srq_wr: 32767,
            max_srq_sge: 31,
            max_qp_rd_atom: 16,
            max_qp_init_rd_atom: 16,
            max_mr_size: u64::MAX,
        }
    }

    fn dev(name: &str, ports: Vec<PortInfo>) -> DeviceInfo {
        DeviceInfo {
            name: name.into(),
            pci_address: None,
            fw_version: String::new(),
            node_guid: 0,
            caps: caps(),
            ports,
        }
    }

    #[test]
    fn link_speeds() {
        assert_eq!(link_speed_gbps(64, 2), Some(200.0), "HDR x4");
        assert_eq!(link_speed_gbps(128, 2), Some(400.0), "NDR x4");
        assert_eq!(link_speed_gbps(32, 2), Some(100.0), "EDR x4");
        assert_eq!(link_speed_gbps(128, 16), Some(200.0), "NDR x2");
        assert_eq!(link_speed_gbps(16, 1), Some(14.0), "FDR x1");
        assert_eq!(link_speed_gbps(3, 2), None);
        assert_eq!(link_speed_gbps(64, 3), None);
    }

    #[test]
    fn pci_addresses_from_sysfs_paths() {
        let p = Path::new("/sys/devices/pci0000:16/0000:16:02.0/0000:17:00.0");
        assert_eq!(pci_address(p).as_deref(), Some("0000:17:00.0"));
        assert_eq!(
            pci_address(Path::new("/sys/devices/virtual/net/rxe0")),
            None
        );
    }

    #[test]
    fn port_choice_and_its_errors() {
        let devs = vec![
            dev(
                "mlx5_0",
                vec![port(1, PortState::Down, LinkLayer::InfiniBand)],
            ),
            dev(
                "mlx5_1",
                vec![
                    port(1, PortState::Init, LinkLayer::InfiniBand),
                    port(2, PortState::Active, LinkLayer::Ethernet),
                ],
            ),
        ];
        assert_eq!(choose_port(&devs, None, None, None).unwrap(), (1, 1));
        assert_eq!(
            choose_port(&devs, Some("mlx5_1"), Some(2), None).unwrap(),
            (1, 1)
        );
        let e = choose_port(&devs, None, None, Some(LinkLayer::InfiniBand)).unwrap_err();
        let text = e.to_string();
        assert!(
            matches!(e, Error::NoActivePort { ref found } if found.len() == 3),
            "{text}"
        );
        assert!(text.contains("mlx5_0 port 1 (DOWN, InfiniBand)"), "{text}");
        assert!(text.contains("no subnet manager"), "{text}");
        let e = choose_port(&devs, Some("mlx5_9"), None, None).unwrap_err();
        assert!(e.to_string().contains("mlx5_0, mlx5_1"), "{e}");
        let e = choose_port(&devs, Some("mlx5_0"), Some(1), None).unwrap_err();
        assert!(matches!(e, Error::PortUnusable { .. }), "{e}");
        let e = choose_port(&devs, Some("mlx5_1"), Some(3), None).unwrap_err();
        assert!(e.to_string().contains("ports 1..=2"), "{e}");
        assert!(matches!(
            choose_port(&[], None, None, None),
            Err(Error::NoActivePort { .. })
        ));
    }

    #[test]
    fn queue_sizing() {
        let cfg = DomainConfig::default();
        let s = queue_sizes(&cfg, &caps()).unwrap();
        assert_eq!(s.cq, 64 * (512 + 64) + 4096 + 256);
        assert_eq!(s.send_sge, 4);
        let small = DeviceCaps {
            max_cqe: 10_000,
            max_qp_wr: 256,
            max_sge: 2,
            ..caps()
        };
        let e = queue_sizes(&cfg, &small).unwrap_err();
        assert!(e.to_string().contains("lower max_peers"), "{e}");
        let few = DomainConfig {
            max_peers: 4,
            ..cfg.clone()
        };
        let s = queue_sizes(&few, &small).unwrap();
        assert_eq!((s.data_sq, s.send_sge), (256, 2));
        let zero = DomainConfig {
            send_queue_depth: 0,
            ..cfg
        };
        assert!(queue_sizes(&zero, &caps()).is_err());
    }

    #[test]
    fn env_overrides() {
        let env: HashMap<&str, &str> = [
            ("STOLON_IB_DEVICE", "mlx5_3"),
            ("STOLON_IB_PORT", "1"),
            ("STOLON_IB_GID_INDEX", "3"),
            ("STOLON_IB_TC", "106"),
            ("STOLON_IB_TIMEOUT", "20"),
        ]
        .into_iter()
        .collect();
        let mut c = DomainConfig::default();
        c.apply_env(|k| env.get(k).map(|v| v.to_string())).unwrap();
        assert_eq!(c.device.as_deref(), Some("mlx5_3"));
        assert_eq!(c.gid.selector, GidSelector::Index(3));
        assert_eq!(
            (c.qp.traffic_class, c.qp.timeout, c.port),
            (106, 20, Some(1))
        );
        let mut c = DomainConfig::default();
        let bad = c.apply_env(|k| (k == "STOLON_IB_TIMEOUT").then(|| "40".to_string()));
        assert!(matches!(bad, Err(Error::Config(_))));
        let mut c = DomainConfig::default();
        assert!(c
            .apply_env(|k| (k == "STOLON_IB_PORT").then(|| "x".to_string()))
            .is_err());
    }

    #[test]
    fn loopback_interface_addresses() {
        let addrs = interface_addrs(&["lo".to_string()]);
        assert!(addrs.contains(&"127.0.0.1".parse().unwrap()), "{addrs:?}");
        assert!(interface_addrs(&["no-such-if0".to_string()]).is_empty());
    }
}
