//! The `verbs-rc` backend under the worker: one ConnectX port (stolon-verbs' device layer) as a
//! domain of the group, presenting the same calls as a libfabric endpoint (register, post write /
//! send / receive, poll completions into `fi_cq_data_entry`s), so sharding, paged and scatter
//! writes, send/recv, barrier, triggers, watches and the [`crate::ImmCounter`] work unchanged.
//!
//! # Connections
//! RC queue pairs are created on demand: the first write or send to a peer (or the first
//! handshake message from one) makes the device layer create that peer's QPs and start the
//! handshake of [`stolon_verbs::handshake`]. Its messages travel as UDP datagrams
//! ([`wire`]) between small side sockets, one per domain, whose address is the domain's endpoint
//! name in the engine's address. UDP fits the handshake: it was designed for a lossy,
//! duplicating, reordering channel (retries with backoff, stale and duplicate detection), so no
//! connection state is needed on the side channel, and it needs no working RDMA path, which the
//! engine's own send/recv would (it runs over the very QPs being connected). Operations for a
//! peer that is still connecting wait here, in order, and are posted once it is established;
//! the engine's transfer deadlines still apply to them.
//!
//! # Peer restarts and teardown
//! A restarted engine opens new domains, so it has new endpoint names (a random instance) and
//! is a new peer: writes to it connect afresh, and datagrams still addressed to the old instance
//! are dropped. Work on the old peer's QPs fails (transport retries run out, a typed
//! [`stolon_verbs::Error::PeerUnreachable`]), which makes the device layer tear the QPs down
//! and retry the handshake until it gives up; everything that waited for the peer is failed
//! then. A peer whose QPs fail while it stays up (or that resets them) goes through the
//! handshake's epoch rules: both sides tear down and reconnect on fresh PSNs.
//!
//! # Posting: chained work requests
//! Ops the worker posts are accepted into the peer's queue and go out on the next poll (the
//! worker polls every domain right after handling its requests, so in the same loop): the run
//! of writes at the front of each peer's queue, up to [`MAX_CHAIN`], becomes one chained
//! `ibv_post_send`, one WR per op (each with its own immediate; the worker's planning keeps ops
//! within the port's largest message) under one device-layer transfer, with selective
//! signalling (every `signal_every`th WR and the last). The send queue takes a prefix when it is
//! nearly full; the rest waits for completions. Sends go out one by one in queue order. Past
//! [`MAX_BACKLOG`] queued ops the worker is told "again" and keeps them itself.
//!
//! # Completions
//! A chain is keyed by its [`TransferId`] to the worker contexts of all its ops. Unsignalled
//! WRs complete with the signalled one after them, so the chain completes with its last WR and
//! every op is reported once; an error completion anywhere fails every op of its chain (RC
//! stops at the first error; the WRs before it landed, but the chain is reported as one). A
//! failed transfer is reported to the worker only once it has drained from the send queue, so
//! the worker never releases memory a WR may still read. Writes with immediate that land here
//! become remote-CQ-data entries the worker counts.
//!
//! # GPU memory
//! [`gpu_registration_order`]: from a CUDA dma-buf (`ibv_reg_dmabuf_mr`, no kernel module
//! needed) when libibverbs and the GPU both support it, else by device address (needs
//! nvidia-peermem); when both fail the engine stages the region through host memory.
//!
//! # Not run on hardware
//! No machine available to the project has an RDMA device. The device-facing calls are those of
//! `stolon_verbs::domain::VerbsDomain` (see [`Device`]); this module's logic is tested against
//! an in-memory test double of that layer (`double.rs`, test builds only).

mod device;
mod gpu;
pub(crate) mod wire;

#[cfg(test)]
pub(crate) mod double;
#[cfg(test)]
mod tests;

use std::collections::{HashMap, VecDeque};
use std::ffi::c_void;
use std::net::{IpAddr, SocketAddr, UdpSocket};
use std::os::fd::AsFd;
use std::time::Instant;

use stolon_verbs::completion::TransferId;
use stolon_verbs::domain::{DomainEvent, PeerId};
use stolon_verbs::wr::WriteSeg;
use stolon_verbs::Error as VError;

use crate::domain_types::{CqError, DomainAttrs, DomainSpec, Posted};
use crate::error::{Error, Result};
use crate::sys::libfabric::{self as fi, fi_addr_t, fi_cq_data_entry};
pub(crate) use device::Device;
use gpu::{dmabuf_allowed_by_env, CudaExporter};
pub(crate) use gpu::{gpu_registration_order, GpuExporter, GpuReg, GpuRegSupport};
use wire::{Datagram, EndpointName};

/// Provider name that selects this backend.
pub const PROVIDER: &str = "verbs-rc";
/// Older name of the same backend.
pub const PROVIDER_ALIAS: &str = "ibverbs";

/// Whether `provider` selects the libibverbs RC backend.
pub fn is_rc_provider(provider: &str) -> bool {
    provider == PROVIDER || provider == PROVIDER_ALIAS
}

/// Operations held for one peer (while it connects, or until the next poll posts them), at
/// most; past it the worker's own back-pressure queue takes over.
const MAX_BACKLOG: usize = 4096;
/// Writes chained into one post, at most: bounds how long the first op of a chain waits for
/// the chain's completion, and how many ops one error completion fails.
const MAX_CHAIN: usize = 64;
/// Datagrams read per poll, at most.
const DATAGRAMS_PER_POLL: usize = 64;

/// A registration on a verbs device: its keys, and the object that keeps it registered.
pub(crate) struct RcMr {
    pub lkey: u32,
    pub rkey: u32,
    pub _keep: Box<dyn Send>,
}

/// Maps a device-layer error to the engine's error kinds.
pub(crate) fn engine_error(e: VError) -> Error {
    match e {
        VError::LibraryNotFound(_)
        | VError::NoDevices { .. }
        | VError::NoActivePort { .. }
        | VError::DeviceNotFound { .. }
        | VError::PortUnusable { .. }
        | VError::NoUsableGid { .. }
        | VError::GidIndexNotUsable { .. }
        | VError::GidIpNotFound { .. } => Error::RdmaUnavailable(e.to_string()),
        VError::Config(s) => Error::Config(s),
        VError::InvalidArgument(s) => Error::InvalidArgument(s),
        VError::Unsupported { .. } => Error::Config(e.to_string()),
        VError::Decode { what, why } => Error::Decode { what, why },
        VError::Verbs { call, source } => Error::Fabric {
            call,
            code: -(source.0 as isize),
            message: source.to_string(),
        },
        VError::Timeout(d) => Error::Timeout(d),
        // Connection and work-completion failures end a transfer.
        other => Error::TransferFailed(other.to_string()),
    }
}

/// The `errno` a failed operation is reported to the worker with (for logs and stats).
pub(crate) fn completion_errno(e: &VError) -> i32 {
    match e {
        VError::PeerUnreachable { .. } | VError::HandshakeTimeout { .. } => libc::EHOSTUNREACH,
        VError::ReceiverNotReady { .. } => libc::EAGAIN,
        VError::RemoteAccess { .. } | VError::LocalProtection { .. } => libc::EACCES,
        VError::ConnectionReset { .. } | VError::Flushed { .. } => libc::ECONNRESET,
        VError::NotConnected(_) => libc::ENOTCONN,
        VError::Timeout(_) => libc::ETIMEDOUT,
        _ => libc::EIO,
    }
}

/// What this machine has, in words: libibverbs (where from, or every path tried), and every
/// device with its ports.
pub fn found_summary() -> String {
    let lib = match stolon_verbs::sys::lib() {
        Ok(l) => format!("libibverbs loaded from {}", l.path),
        Err(e) => return format!("libibverbs not found ({e}); devices: none"),
    };
    let devices = match stolon_verbs::domain::list_devices() {
        Ok(devs) if !devs.is_empty() => devs
            .iter()
            .map(|d| {
                let ports: Vec<String> = d
                    .ports
                    .iter()
                    .map(|p| format!("port {} {} {}", p.port, p.state.name(), p.link_layer.name()))
                    .collect();
                format!("{} ({})", d.name, ports.join(", "))
            })
            .collect::<Vec<_>>()
            .join("; "),
        Ok(_) | Err(VError::NoDevices { .. }) => "none".to_string(),
        Err(e) => format!("none could be listed ({e})"),
    };
    format!("{lib}; devices: {devices}")
}

/// The error for a device that could not be opened: the device layer's reason and what the
/// machine has.
fn unavailable(spec: &DomainSpec, e: VError) -> Error {
    match engine_error(e) {
        Error::RdmaUnavailable(why) => Error::RdmaUnavailable(format!(
            "provider {} (device {}): {why}. Found: {}",
            spec.provider,
            spec.interface.as_deref().unwrap_or("any"),
            found_summary()
        )),
        other => other,
    }
}

/// An op accepted for a peer that is still connecting.
#[derive(Clone, Copy, Debug)]
enum Deferred {
    Write {
        seg: WriteSeg,
        imm: Option<u32>,
        ctx: usize,
    },
    Send {
        buf: usize,
        len: usize,
        ctx: usize,
    },
}

impl Deferred {
    fn ctx(&self) -> usize {
        match *self {
            Deferred::Write { ctx, .. } | Deferred::Send { ctx, .. } => ctx,
        }
    }

    fn len(&self) -> usize {
        match *self {
            Deferred::Write { seg, .. } => seg.len as usize,
            Deferred::Send { len, .. } => len,
        }
    }
}

/// The writes to chain from the front of a peer's backlog: the run of writes there, at most
/// `max` (empty when a send is first). Sends are posted one by one, in backlog order.
fn chain_prefix(backlog: &VecDeque<Deferred>, max: usize) -> Vec<Deferred> {
    backlog
        .iter()
        .take(max)
        .take_while(|op| matches!(op, Deferred::Write { .. }))
        .copied()
        .collect()
}

struct PeerSlot {
    name: EndpointName,
    backlog: VecDeque<Deferred>,
}

/// A posted device transfer: the worker ops it carries (context and length; several for a
/// chain of writes), and its result once reported but not yet drained.
struct InFlight {
    ops: Vec<(usize, usize)>,
    send: bool,
    held: Option<VError>,
}

/// Counters of the side channel and the connection life cycle (tests and diagnostics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct ChannelStats {
    pub datagrams_sent: u64,
    pub datagrams_lost: u64,
    pub datagrams_received: u64,
    /// Datagrams refused: malformed, or meant for another instance.
    pub datagrams_dropped: u64,
    pub established: u64,
    pub resets: u64,
    pub gave_up: u64,
    /// GPU regions registered from a dma-buf.
    pub gpu_dmabuf: u64,
    /// GPU regions registered by device address (peermem).
    pub gpu_peermem: u64,
}

/// One port driven by the worker.
pub(crate) struct RcDomain {
    // Dropped first: QPs and registrations before anything else goes.
    dev: Box<dyn Device>,
    sock: UdpSocket,
    me: EndpointName,
    name: Vec<u8>,
    pub attrs: DomainAttrs,
    peers: Vec<PeerSlot>,
    by_name: HashMap<EndpointName, PeerId>,
    inflight: HashMap<TransferId, InFlight>,
    /// Receive buffers the worker posted: (address, length, context).
    recvs: VecDeque<(usize, usize, usize)>,
    /// Messages that arrived before a receive buffer was posted.
    messages: VecDeque<Vec<u8>>,
    ready: VecDeque<fi_cq_data_entry>,
    errors: VecDeque<CqError>,
    events: Vec<DomainEvent>,
    /// Some peer became established: post what waited for it.
    flush: bool,
    pub(crate) stats: ChannelStats,
    gpu: Box<dyn GpuExporter>,
    /// [`MAX_BACKLOG`], lowered by tests.
    backlog_cap: usize,
}

// SAFETY: the raw pointers held are integers naming worker-owned buffers; the domain is driven
// by one thread at a time (the worker), and the device is Send.
unsafe impl Send for RcDomain {}

fn entry(ctx: usize, flags: u64, len: usize, data: u64) -> fi_cq_data_entry {
    fi_cq_data_entry {
        op_context: ctx as *mut c_void,
        flags,
        len,
        buf: std::ptr::null_mut(),
        data,
    }
}

impl RcDomain {
    /// Opens the device named by `spec.interface` (any active port when `None`, with the
    /// `STOLON_IB_*` overrides) and the handshake socket on `spec.node` (else the port's own
    /// address). `max_message` is the largest message the worker sends (header included).
    pub(crate) fn open(spec: &DomainSpec, max_message: usize) -> Result<Self> {
        let mut cfg = stolon_verbs::domain::DomainConfig {
            device: spec.interface.clone(),
            max_message: u32::try_from(max_message)
                .map_err(|_| Error::Config(format!("max_message {max_message} too large")))?,
            ..Default::default()
        };
        cfg.apply_env(|k| std::env::var(k).ok())
            .map_err(engine_error)?;
        let dev = stolon_verbs::domain::open_device(cfg).map_err(|e| unavailable(spec, e))?;
        Self::with_device(spec, Box::new(dev))
    }

    pub(crate) fn with_device(spec: &DomainSpec, dev: Box<dyn Device>) -> Result<Self> {
        let ip: IpAddr = match &spec.node {
            Some(n) => n.parse().map_err(|_| {
                Error::Config(format!(
                    "verbs-rc node {n:?} is not an IP address (the handshake socket binds to it)"
                ))
            })?,
            None => dev.local_ip().ok_or_else(|| {
                Error::Config(format!(
                    "verbs-rc on {}: the port has no IP address for the handshake socket; \
                     pass node=<an IP address of this host peers can reach>",
                    dev.describe()
                ))
            })?,
        };
        let sock = UdpSocket::bind(SocketAddr::new(ip, 0))
            .map_err(|e| Error::Config(format!("verbs-rc handshake socket on {ip}: {e}")))?;
        sock.set_nonblocking(true)
            .map_err(|e| Error::Config(format!("verbs-rc handshake socket: {e}")))?;
        let addr = sock
            .local_addr()
            .map_err(|e| Error::Config(format!("verbs-rc handshake socket: {e}")))?;
        let me = EndpointName {
            addr,
            instance: stolon_verbs::handshake::os_seed() | 1,
        };
        let attrs = DomainAttrs {
            provider: PROVIDER.to_string(),
            fabric: "ibverbs RC".into(),
            domain: dev.describe(),
            virt_addr: true,
            prov_key: true,
            mr_local: true,
            max_msg_size: dev.max_msg_size(),
            inject_size: 0,
            tx_size: dev.queue_depth(),
            rx_size: dev.queue_depth(),
            cq_data_size: 4,
            use_inject: false,
            hmem: spec.hmem,
            wait_fd: false,
            zero_byte_delivery_lost: false,
        };
        Ok(RcDomain {
            dev,
            sock,
            name: me.encode(),
            me,
            attrs,
            peers: Vec::new(),
            by_name: HashMap::new(),
            inflight: HashMap::new(),
            recvs: VecDeque::new(),
            messages: VecDeque::new(),
            ready: VecDeque::new(),
            errors: VecDeque::new(),
            events: Vec::new(),
            flush: false,
            stats: ChannelStats::default(),
            gpu: Box::new(CudaExporter),
            backlog_cap: MAX_BACKLOG,
        })
    }

    pub(crate) fn name(&self) -> &[u8] {
        &self.name
    }

    fn slot_for(&mut self, name: EndpointName) -> PeerId {
        if let Some(&p) = self.by_name.get(&name) {
            return p;
        }
        let p = self.peers.len() as PeerId;
        self.peers.push(PeerSlot {
            name,
            backlog: VecDeque::new(),
        });
        self.by_name.insert(name, p);
        p
    }

    /// Adds a peer by its endpoint name; nothing is connected until the first op.
    pub(crate) fn insert_addr(&mut self, name: &[u8]) -> Result<fi_addr_t> {
        let n = EndpointName::decode(name)?;
        if n == self.me {
            return Err(Error::InvalidArgument(
                "verbs-rc: an engine cannot connect to its own domain (loopback QPs are not \
                 supported)"
                    .into(),
            ));
        }
        Ok(self.slot_for(n) as fi_addr_t)
    }

    /// Tears the peer's QPs down; what waited for it fails.
    pub(crate) fn remove_addr(&mut self, addr: fi_addr_t) {
        let peer = addr as PeerId;
        if (peer as usize) < self.peers.len() {
            let mut ev = self.dev.disconnect(peer);
            self.fail_backlog(peer, &VError::NotConnected(peer));
            self.handle_events(&mut ev, Instant::now());
        }
    }

    /// # Safety
    /// The memory must stay valid until the registration is closed.
    pub(crate) unsafe fn register(&mut self, ptr: *const u8, len: usize) -> Result<RcMr> {
        // SAFETY: forwarded contract.
        unsafe { self.dev.register(ptr as *mut u8, len) }.map_err(engine_error)
    }

    #[cfg(test)]
    pub(crate) fn set_gpu_exporter(&mut self, gpu: Box<dyn GpuExporter>) {
        self.gpu = gpu;
    }

    /// Registers `len` bytes of GPU memory at `ptr` on CUDA device `device`: from a dma-buf
    /// when libibverbs and CUDA both can (the descriptor is closed right after registering),
    /// else by address (peermem); see [`gpu_registration_order`].
    ///
    /// # Safety
    /// The device memory must stay allocated until the registration is closed.
    ///
    /// # Errors
    /// The last way's error (a verbs failure stays [`Error::Fabric`], with every way tried in
    /// its message); the engine then stages the region.
    pub(crate) unsafe fn register_hmem(
        &mut self,
        ptr: u64,
        len: usize,
        device: usize,
    ) -> Result<RcMr> {
        let support = GpuRegSupport {
            rdma_core_dmabuf: self.dev.supports_dmabuf(),
            cuda_dmabuf: self.gpu.dmabuf_supported(device),
            dmabuf_allowed: dmabuf_allowed_by_env(
                std::env::var("STOLON_VERBS_DMABUF").ok().as_deref(),
            ),
        };
        let mut tried = Vec::new();
        let mut last = None;
        for way in gpu_registration_order(support) {
            let r = match way {
                GpuReg::DmaBuf => match self.gpu.export(device, ptr, len) {
                    Ok((fd, offset)) => {
                        // SAFETY: the dma-buf covers the caller's device memory, which stays
                        // allocated while registered (forwarded contract).
                        let r = unsafe { self.dev.register_dmabuf(fd.as_fd(), offset, len, ptr) };
                        // The registration holds its own reference to the dma-buf.
                        drop(fd);
                        r
                    }
                    Err(why) => {
                        tried.push(format!("dma-buf export: {why}"));
                        continue;
                    }
                },
                // SAFETY: forwarded contract.
                GpuReg::Peermem => unsafe { self.dev.register_gpu(ptr, len) },
            };
            match r {
                Ok(mr) => {
                    match way {
                        GpuReg::DmaBuf => self.stats.gpu_dmabuf += 1,
                        GpuReg::Peermem => self.stats.gpu_peermem += 1,
                    }
                    return Ok(mr);
                }
                Err(e) => {
                    tried.push(format!("{way:?}: {e}"));
                    last = Some(e);
                }
            }
        }
        let last = last.unwrap_or(VError::Unsupported {
            what: "GPU memory registration",
            why: "no way to register GPU memory".into(),
        });
        Err(match engine_error(last) {
            Error::Fabric { call, code, .. } => Error::Fabric {
                call,
                code,
                message: format!("GPU memory at {ptr:#x}+{len}: {}", tried.join("; ")),
            },
            other => other,
        })
    }

    fn check_peer(&self, dest: fi_addr_t) -> Result<PeerId> {
        if (dest as usize) < self.peers.len() {
            Ok(dest as PeerId)
        } else {
            Err(Error::InvalidArgument(format!(
                "verbs-rc: unknown destination {dest}"
            )))
        }
    }

    /// Queues `op` for a peer that is not established (starting its handshake), or says
    /// "again" when its backlog is full.
    fn defer(&mut self, peer: PeerId, op: Deferred, now: Instant) -> Result<Posted> {
        if self.peers[peer as usize].backlog.len() >= self.backlog_cap {
            return Ok(Posted::Again);
        }
        let mut ev = self.dev.connect(peer, now).map_err(engine_error)?;
        self.peers[peer as usize].backlog.push_back(op);
        self.handle_events(&mut ev, now);
        Ok(Posted::Yes)
    }

    /// Posts the op (a send) or the run of writes (up to [`MAX_CHAIN`], one chained post) at
    /// the front of `peer`'s backlog. `Ok(0)`: the send queue is full. `Err`: nothing was
    /// posted and the `n` ops at the front fail with the error.
    fn post_front(&mut self, peer: PeerId, now: Instant) -> Result<usize, (usize, VError)> {
        let backlog = &self.peers[peer as usize].backlog;
        let Some(&first) = backlog.front() else {
            return Ok(0);
        };
        let mut ev = std::mem::take(&mut self.events);
        let r = match first {
            Deferred::Write { .. } => {
                let chain = chain_prefix(backlog, MAX_CHAIN);
                let mut segs = Vec::with_capacity(chain.len());
                let mut imms = Vec::with_capacity(chain.len());
                for op in &chain {
                    if let Deferred::Write { seg, imm, .. } = *op {
                        segs.push(seg);
                        imms.push(imm);
                    }
                }
                // SAFETY: the worker keeps every source registered and alive until its op's
                // completion, which is reported only after the transfer drained; the remote
                // ranges and keys come from validated descriptors.
                match unsafe { self.dev.write_chain(peer, &segs, &imms, now, &mut ev) } {
                    Ok(Some((id, taken))) => {
                        let ops = chain[..taken]
                            .iter()
                            .map(|op| (op.ctx(), op.len()))
                            .collect();
                        self.inflight.insert(
                            id,
                            InFlight {
                                ops,
                                send: false,
                                held: None,
                            },
                        );
                        Ok(taken)
                    }
                    Ok(None) => Ok(0),
                    Err(e) => Err((chain.len(), e)),
                }
            }
            Deferred::Send { buf, len, ctx } => {
                // SAFETY: buf..buf+len is a worker send buffer reserved until this op's
                // completion; the device copies it before returning.
                let data = unsafe { std::slice::from_raw_parts(buf as *const u8, len) };
                match self.dev.send_one(peer, data, now, &mut ev) {
                    Ok(Some(id)) => {
                        self.inflight.insert(
                            id,
                            InFlight {
                                ops: vec![(ctx, len)],
                                send: true,
                                held: None,
                            },
                        );
                        Ok(1)
                    }
                    Ok(None) => Ok(0),
                    Err(e) => Err((1, e)),
                }
            }
        };
        // Events after the in-flight entry exists, so a chain failed while posting maps back.
        self.handle_events(&mut ev, now);
        self.events = ev;
        r
    }

    /// Accepts `op` for `dest`: it waits in the peer's backlog (connecting it first when
    /// needed) and is posted on the next poll, chained with the other writes to that peer
    /// accepted meanwhile. "Again" once the backlog holds [`MAX_BACKLOG`] ops.
    fn submit(&mut self, dest: fi_addr_t, op: Deferred) -> Result<Posted> {
        let peer = self.check_peer(dest)?;
        let now = Instant::now();
        if !self.dev.is_established(peer) {
            return self.defer(peer, op, now);
        }
        let backlog = &mut self.peers[peer as usize].backlog;
        if backlog.len() >= self.backlog_cap {
            return Ok(Posted::Again);
        }
        backlog.push_back(op);
        self.flush = true;
        Ok(Posted::Yes)
    }

    /// # Safety
    /// `buf..buf+len` must stay valid and registered (its lkey is `desc`) until the completion
    /// for `ctx` is read.
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn post_write(
        &mut self,
        buf: *const u8,
        len: usize,
        desc: *mut c_void,
        dest: fi_addr_t,
        raddr: u64,
        key: u64,
        data: Option<u64>,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        let rkey = u32::try_from(key)
            .map_err(|_| Error::InvalidArgument(format!("verbs-rc: remote key {key:#x}")))?;
        let seg = WriteSeg {
            local_addr: buf as u64,
            lkey: desc as usize as u32,
            remote_addr: raddr,
            rkey,
            len: len as u64,
        };
        let imm = data.map(|d| d as u32);
        self.submit(
            dest,
            Deferred::Write {
                seg,
                imm,
                ctx: ctx as usize,
            },
        )
    }

    /// # Safety
    /// `buf..buf+len` must stay valid until the completion for `ctx` is read.
    pub(crate) unsafe fn post_send(
        &mut self,
        buf: *const u8,
        len: usize,
        dest: fi_addr_t,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        self.submit(
            dest,
            Deferred::Send {
                buf: buf as usize,
                len,
                ctx: ctx as usize,
            },
        )
    }

    /// # Safety
    /// The buffer must stay valid until its completion is read.
    pub(crate) unsafe fn post_recv(
        &mut self,
        buf: *mut u8,
        len: usize,
        ctx: *mut c_void,
    ) -> Result<Posted> {
        self.recvs.push_back((buf as usize, len, ctx as usize));
        self.deliver_messages();
        Ok(Posted::Yes)
    }

    fn fail_ctx(&mut self, ctx: usize, peer: Option<PeerId>, e: &VError) {
        let who = match peer.and_then(|p| self.peers.get(p as usize)) {
            Some(s) => format!("peer {}", s.name.addr),
            None => "verbs-rc".to_string(),
        };
        self.errors.push_back(CqError {
            op_context: ctx as *mut c_void,
            err: completion_errno(e),
            message: format!("verbs-rc {who}: {e}"),
        });
    }

    fn fail_backlog(&mut self, peer: PeerId, e: &VError) {
        let ops: Vec<Deferred> = self.peers[peer as usize].backlog.drain(..).collect();
        for op in ops {
            self.fail_ctx(op.ctx(), Some(peer), e);
        }
    }

    /// Reports every op of a finished (and drained) device transfer to the worker, each once:
    /// all succeed together, or the error fails every op of the chain.
    fn complete(&mut self, id: TransferId, peer: Option<PeerId>, result: Result<(), VError>) {
        let Some(f) = self.inflight.remove(&id) else {
            return; // not ours (a transfer cancelled before it was posted)
        };
        match result {
            Ok(()) => {
                let flags = if f.send {
                    fi::FI_MSG | fi::FI_SEND
                } else {
                    fi::FI_RMA | fi::FI_WRITE
                };
                for (ctx, len) in f.ops {
                    self.ready.push_back(entry(ctx, flags, len, 0));
                }
            }
            Err(e) => {
                for (ctx, _) in f.ops {
                    self.fail_ctx(ctx, peer, &e);
                }
            }
        }
    }

    fn send_datagram(&mut self, peer: PeerId, bytes: &[u8]) {
        let Some(slot) = self.peers.get(peer as usize) else {
            return;
        };
        let Ok(message) = bytes.try_into() else {
            return;
        };
        if self.dev.lose_datagram() {
            self.stats.datagrams_lost += 1;
            return;
        }
        let d = Datagram {
            to_instance: slot.name.instance,
            from: self.me,
            message,
        };
        // A refused send is a lost datagram: the handshake retries.
        if self.sock.send_to(&d.encode(), slot.name.addr).is_ok() {
            self.stats.datagrams_sent += 1;
        }
    }

    /// Turns device events into worker completions, datagrams and peer state.
    fn handle_events(&mut self, events: &mut Vec<DomainEvent>, now: Instant) {
        let _ = now;
        for ev in events.drain(..) {
            match ev {
                DomainEvent::SendHandshake { peer, bytes } => self.send_datagram(peer, &bytes),
                DomainEvent::Established { .. } => {
                    self.stats.established += 1;
                    self.flush = true;
                }
                DomainEvent::ConnectionReset { .. } => self.stats.resets += 1,
                DomainEvent::GaveUp { peer, error } => {
                    self.stats.gave_up += 1;
                    if (peer as usize) < self.peers.len() {
                        self.fail_backlog(peer, &error);
                    }
                }
                DomainEvent::Finished(f) => {
                    if f.drained {
                        self.complete(f.id, Some(f.peer), f.result);
                    } else if let Some(x) = self.inflight.get_mut(&f.id) {
                        // Reported early; its WR may still be in the send queue: hold the
                        // result until it drains.
                        x.held = Some(f.result.err().unwrap_or(VError::NotConnected(f.peer)));
                    }
                }
                DomainEvent::Drained(id) => {
                    let held = self.inflight.get_mut(&id).and_then(|x| x.held.take());
                    if let Some(e) = held {
                        self.complete(id, None, Err(e));
                    }
                }
                DomainEvent::Imm { imm, .. } => self.ready.push_back(entry(
                    0,
                    fi::FI_RMA | fi::FI_REMOTE_WRITE | fi::FI_REMOTE_CQ_DATA,
                    0,
                    imm as u64,
                )),
                DomainEvent::Message { data, .. } => {
                    self.messages.push_back(data);
                    self.deliver_messages();
                }
                DomainEvent::Stray { .. } => self.errors.push_back(CqError {
                    op_context: std::ptr::null_mut(),
                    err: libc::EIO,
                    message: "verbs-rc: a completion stolon did not post".into(),
                }),
                DomainEvent::Handshake { .. } => {}
            }
        }
    }

    fn deliver_messages(&mut self) {
        while !self.messages.is_empty() && !self.recvs.is_empty() {
            let data = self.messages.pop_front().expect("checked");
            let (buf, len, ctx) = self.recvs.pop_front().expect("checked");
            let n = data.len().min(len);
            // SAFETY: buf..buf+len is a receive buffer the worker posted and does not read until
            // this completion; n <= len.
            unsafe { std::ptr::copy_nonoverlapping(data.as_ptr(), buf as *mut u8, n) };
            self.ready
                .push_back(entry(ctx, fi::FI_MSG | fi::FI_RECV, n, 0));
        }
    }

    fn read_datagrams(&mut self, now: Instant) {
        let mut buf = [0u8; wire::MAX_DATAGRAM + 1];
        for _ in 0..DATAGRAMS_PER_POLL {
            let n = match self.sock.recv_from(&mut buf) {
                Ok((n, _)) => n,
                Err(_) => break, // WouldBlock, or a transient error: try again next poll
            };
            let d = match Datagram::decode(&buf[..n]) {
                Ok(d) if d.to_instance == self.me.instance => d,
                _ => {
                    self.stats.datagrams_dropped += 1;
                    continue;
                }
            };
            self.stats.datagrams_received += 1;
            let peer = self.slot_for(d.from);
            match self.dev.on_handshake(peer, &d.message, now) {
                Ok(mut ev) => self.handle_events(&mut ev, now),
                // Out of QPs (max_peers) or a failing QP creation: nothing to answer.
                Err(_) => self.stats.datagrams_dropped += 1,
            }
        }
    }

    /// Posts what waits for established peers: runs of writes as chains, sends one by one, as
    /// far as each peer's send queue takes them.
    fn flush_backlogs(&mut self, now: Instant) {
        self.flush = false;
        for p in 0..self.peers.len() as PeerId {
            while !self.peers[p as usize].backlog.is_empty() {
                if !self.dev.is_established(p) {
                    break;
                }
                match self.post_front(p, now) {
                    Ok(0) => {
                        self.flush = true; // queue full: again on the next poll
                        break;
                    }
                    Ok(n) => {
                        self.peers[p as usize].backlog.drain(..n);
                    }
                    Err((n, e)) => {
                        let failed: Vec<Deferred> =
                            self.peers[p as usize].backlog.drain(..n).collect();
                        for op in failed {
                            self.fail_ctx(op.ctx(), Some(p), &e);
                        }
                    }
                }
            }
        }
    }

    /// Drives the side channel, handshake timers and the device; hands out completions.
    pub(crate) fn poll(&mut self, out: &mut [fi_cq_data_entry]) -> Result<usize, CqError> {
        let now = Instant::now();
        self.read_datagrams(now);
        if self.dev.next_deadline().is_some_and(|t| t <= now) {
            let mut ev = self.dev.tick(now);
            self.handle_events(&mut ev, now);
        }
        if self.flush {
            // Ops accepted since the last poll go out first, chained per peer.
            self.flush_backlogs(now);
        }
        let mut ev = std::mem::take(&mut self.events);
        let polled = self.dev.poll(now, &mut ev);
        self.handle_events(&mut ev, now);
        self.events = ev;
        if let Err(e) = polled {
            self.errors.push_back(CqError {
                op_context: std::ptr::null_mut(),
                err: completion_errno(&e),
                message: format!("verbs-rc: polling the device failed: {e}"),
            });
        }
        if self.flush {
            self.flush_backlogs(now);
        }
        if let Some(e) = self.errors.pop_front() {
            return Err(e);
        }
        let n = self.ready.len().min(out.len());
        for slot in out.iter_mut().take(n) {
            *slot = self.ready.pop_front().expect("counted");
        }
        Ok(n)
    }
}
