//! The worker: one thread per domain group. It owns every libfabric object of the group, takes
//! requests from a queue, posts operations, polls completions and reports them.
//!
//! Every operation's libfabric context is a slot in a slab of [`OpCtx`] blocks that stay at a
//! fixed address; a completion names its transfer by slot index, never by a pointer into a
//! transfer, so a transfer that has timed out or failed can be reported at once while its
//! remaining operations still drain safely.

use std::collections::{HashMap, HashSet, VecDeque};
use std::ffi::c_void;
use std::sync::atomic::Ordering;
use std::sync::mpsc::{Receiver, TryRecvError};
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::desc::PeerAddr;
use crate::domain::{Domain, MrHandle};
use crate::engine::{RegionInner, Shared};
use crate::error::{Error, Result};
use crate::lease::{Ctrl, MAX_LANDED, NO_LEASE};
use crate::libfabric::{CqError, Posted};
use crate::staging::{Copier, Header, Mem, Ticket, HEADER, KIND_CTRL, KIND_STAGED, KIND_USER};
use crate::sys::libfabric::{self as fi, fi_addr_t};
use crate::transfer::TransferState;

/// Transfer slot of ops fired by a trigger: nobody waits for them.
const TRIGGERED: u32 = u32::MAX;
/// Transfer slot of the worker's own control messages.
const CTRL: u32 = u32::MAX - 1;

/// Region id of the worker's own registered buffer (message buffers and the scratch target).
pub(crate) const INTERNAL_REGION: u64 = 0;

/// What an operation writes or sends.
#[derive(Debug, Clone, Copy)]
pub(crate) enum OpKind {
    /// RMA write from a local region (id, address) to (raddr, rkey), optionally with data.
    Write {
        region: u64,
        src: usize,
        len: usize,
        raddr: u64,
        rkey: u64,
        imm: Option<u32>,
    },
    /// A message from the transfer's payload.
    Send,
    /// GPU source to a host destination: copy a chunk into a send buffer, then RMA-write it.
    StagedWrite {
        src: Mem,
        len: usize,
        raddr: u64,
        rkey: u64,
        imm: Option<u32>,
    },
    /// GPU to GPU on this host: a CUDA copy into the peer's IPC-mapped region, then the
    /// immediate into the peer's mailbox.
    NvlinkCopy {
        src: u64,
        len: usize,
        region: u64,
        offset: u64,
        imm: Option<u32>,
    },
    /// Any source to a staged (GPU) destination region: one message with a header.
    StagedSend {
        src: Mem,
        len: usize,
        region: u64,
        offset: u64,
        imm: Option<u32>,
    },
}

#[derive(Debug, Clone, Copy)]
pub(crate) struct Op {
    pub domain: usize,
    pub peer: u32,
    pub kind: OpKind,
    /// The lease on the destination region ([`NO_LEASE`] for the peer's scratch region and
    /// messages): no op is posted before its lease is granted.
    pub lease: u32,
    /// Complete only once the bytes are in the destination ([`crate::Completion::Delivered`]).
    pub delivered: bool,
}

pub(crate) struct TransferReq {
    pub ops: Vec<Op>,
    pub state: Arc<TransferState>,
    pub deadline: Instant,
    pub timeout: Duration,
    /// Keeps the local regions (and the memory they cover) alive until every op has completed.
    pub keep: Vec<Arc<RegionInner>>,
    pub payload: Option<Vec<u8>>,
}

pub(crate) struct Trigger {
    pub imm: u32,
    pub times: u64,
    pub ops: Vec<Op>,
    /// Keeps the source region alive while the trigger is armed.
    pub _keep: Vec<Arc<RegionInner>>,
}

/// A watched 64-bit counter and the transfers it releases step by step.
pub(crate) struct Watch {
    id: u64,
    ptr: usize,
    last: u64,
    callback: Option<Box<dyn Fn(u64, u64) + Send>>,
    steps: VecDeque<TransferReq>,
    /// Counter value at which the front of `steps` is released.
    next_step: u64,
    _owner: Option<Box<dyn std::any::Any + Send + Sync>>,
}

impl Watch {
    pub(crate) fn new(
        id: u64,
        ptr: usize,
        owner: Option<Box<dyn std::any::Any + Send + Sync>>,
        callback: Option<Box<dyn Fn(u64, u64) + Send>>,
        steps: Vec<TransferReq>,
    ) -> Self {
        Watch {
            id,
            ptr,
            last: 0,
            callback,
            steps: steps.into(),
            next_step: 1,
            _owner: owner,
        }
    }

    fn load(&self) -> u64 {
        // SAFETY: the engine's `watch` contract: ptr is an aligned u64 that stays valid while the
        // watch exists and is written only atomically.
        unsafe { (*(self.ptr as *const std::sync::atomic::AtomicU64)).load(Ordering::Acquire) }
    }
}

pub(crate) enum Request {
    /// GPU memory registered with every domain (all of them have FI_HMEM).
    RegisterHmem {
        id: u64,
        ptr: u64,
        len: usize,
        device: usize,
        reply: std::sync::mpsc::SyncSender<Result<Vec<u64>>>,
    },
    /// A region peers write through staging (GPU memory, or a staged host region).
    RegisterStaged {
        id: u64,
        base: Mem,
        len: usize,
        reply: std::sync::mpsc::SyncSender<Result<()>>,
    },
    Register {
        id: u64,
        ptr: usize,
        len: usize,
        reply: std::sync::mpsc::SyncSender<Result<Vec<u64>>>,
    },
    /// Closes a region once no peer can write it: its holders have answered the revocation
    /// (or the revoke timeout passed) and no local op still reads it. `owner` (the memory) is
    /// dropped only then; `reply`, if any, hears the result of closing.
    Unregister {
        id: u64,
        owner: Option<Box<dyn std::any::Any + Send + Sync>>,
        reply: Option<std::sync::mpsc::SyncSender<Result<()>>>,
    },
    /// A remote descriptor this engine writes through: lease `lease` (the engine's index) on
    /// `region` of `peer`, requested from the owner on first use.
    AddLease {
        lease: u32,
        peer: u32,
        region: u64,
        desc: Vec<u8>,
    },
    /// A peer's GPU region reachable over NVLink (how to map it, length).
    AddRemoteGpu {
        peer: u32,
        region: u64,
        target: RemoteTarget,
        len: u64,
    },
    AddPeer {
        id: u32,
        addr: PeerAddr,
    },
    Transfer(Box<TransferReq>),
    /// Arms a trigger; the reply says it is in place (so no arrival can miss it).
    Trigger(Box<Trigger>, std::sync::mpsc::SyncSender<()>),
    /// Adds a watched counter; the reply says it is in place.
    Watch(Box<Watch>, std::sync::mpsc::SyncSender<()>),
    Unwatch {
        id: u64,
    },
    Stop,
}

#[derive(Clone, Copy)]
enum Tag {
    Free,
    /// A write from local region `region`.
    Transfer {
        slot: u32,
        lease: u32,
        region: u64,
        domain: u8,
        len: usize,
    },
    Recv {
        domain: u8,
        buf: u32,
    },
    /// A message from send buffer `buf`: a user or control message, or a staged chunk, which,
    /// when `token` is not 0, completes only when the owner says it landed.
    Send {
        slot: u32,
        lease: u32,
        buf: u32,
        domain: u8,
        len: usize,
        token: u64,
    },
    /// A staged write posted from send buffer `buf`.
    StagedWrite {
        slot: u32,
        lease: u32,
        buf: u32,
        domain: u8,
        len: usize,
    },
    /// An op fired by a trigger; nobody waits for it.
    Triggered {
        lease: u32,
        region: u64,
        domain: u8,
        len: usize,
    },
}

/// The context block handed to libfabric; `FI_CONTEXT`/`FI_CONTEXT2` providers may use the
/// first 64 bytes.
#[repr(C)]
struct OpCtx {
    fi_ctx: [usize; 8],
    tag: Tag,
}

struct Active {
    remaining: usize,
    state: Arc<TransferState>,
    deadline: Instant,
    /// The transfer's whole allowance, for the error message.
    timeout: Duration,
    reported: bool,
    /// The peers its ops go to (a peer's `Bye` fails the transfer at once).
    peers: Vec<u32>,
    _keep: Vec<Arc<RegionInner>>,
    payload: Option<Vec<u8>>,
}

struct Pending {
    op: Op,
    slot: u32,
}

/// Where a lease stands, on the writer's side.
enum LeaseState {
    /// Not asked for yet (no op has needed it).
    New,
    /// Asked for at `since`; ops wait in `parked`.
    Requested {
        since: Instant,
    },
    Granted,
    /// The owner revoked it: no new op; `RevokeAck` once nothing is in flight.
    Revoking,
    /// Refused or revoked: every op fails with this.
    Closed(Error),
}

/// The writer's side of a lease on one remote descriptor.
struct Lease {
    peer: u32,
    region: u64,
    desc: Vec<u8>,
    state: LeaseState,
    /// Ops waiting for the answer.
    parked: Vec<Pending>,
    /// Ops accepted by the worker and not yet finished (parked, queued, posted).
    inflight: usize,
}

/// A control message waiting to be sent.
struct CtrlOut {
    peer: u32,
    body: Vec<u8>,
    /// The lease a request is for (a failed send fails the writes waiting for it).
    lease: Option<u32>,
    since: Instant,
}

/// A region being unregistered, closed once `finish_revocations` finds it safe.
struct Revocation {
    id: u64,
    /// Holders that have not answered `Revoke` yet.
    waiting: HashSet<u32>,
    deadline: Instant,
    owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    replies: Vec<std::sync::mpsc::SyncSender<Result<()>>>,
}

struct PeerEntry {
    /// fi_addr on each local domain, or why it could not be added.
    addrs: std::result::Result<Vec<fi_addr_t>, Error>,
    /// The peer's NVLink mailbox name, and the mailbox once opened.
    mailbox_name: Option<String>,
    mailbox: Option<crate::nvlink::Mailbox>,
    /// The peer's doorbell (see [`Doorbell`]); None once ringing it failed (another host).
    bell: Option<std::os::unix::net::SocketAddr>,
    last_ring: Option<Instant>,
}

/// A same-host doorbell: an abstract Unix datagram socket named after the engine, for the
/// providers whose completion queue has no wait descriptor (shm; udp and net between processes
/// of one host). A peer rings it when it posts to this engine (at most once a millisecond), so
/// an idle worker sleeps until traffic instead of napping. The worker spins for `spin` after a
/// ring, which covers the writes that follow without a ring each.
struct Doorbell {
    sock: std::os::unix::net::UnixDatagram,
}

impl Doorbell {
    fn name(engine_id: u64) -> String {
        format!("stolon-bell-{engine_id:016x}")
    }

    fn addr(engine_id: u64) -> Option<std::os::unix::net::SocketAddr> {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(Self::name(engine_id)).ok()
    }

    fn bind(engine_id: u64) -> Option<Self> {
        let sock = std::os::unix::net::UnixDatagram::bind_addr(&Self::addr(engine_id)?).ok()?;
        sock.set_nonblocking(true).ok()?;
        Some(Doorbell { sock })
    }

    /// Empties the socket; true if anything had rung.
    fn drain(&self) -> bool {
        let mut b = [0u8; 16];
        let mut rang = false;
        while self.sock.recv(&mut b).is_ok() {
            rang = true;
        }
        rang
    }
}

/// Why the worker woke up.
enum Woke {
    Request(Request),
    /// Its doorbell rang or a completion queue's descriptor fired: traffic is arriving.
    Rung,
    Timeout,
}

/// How a peer's GPU region is reached over NVLink.
pub(crate) enum RemoteTarget {
    /// `cuMemAlloc` memory: its CUDA IPC handle (opened on first use) and the region's offset
    /// in the allocation.
    Ipc { handle: Vec<u8>, offset: u64 },
    /// VMM memory already mapped here from descriptors the owner sent, the lease the owner
    /// ends when the region goes away, and the region's offset in the mapping. The mapping is
    /// taken (and unmapped once no copy can use it) when the lease ends.
    Vmm {
        mapping: Option<stolon_cuda::MappedVmm>,
        lease: crate::vmm_share::Lease,
        offset: u64,
    },
}

/// A peer's GPU region reachable over NVLink.
struct RemoteGpu {
    target: RemoteTarget,
    len: u64,
    mapping: Option<stolon_cuda::IpcMapping>,
    /// Set when the owner ended the lease: writes fail with this.
    gone: Option<String>,
}

pub(crate) struct WorkerConfig {
    pub spin: Duration,
    pub max_sleep: Duration,
    pub recv_buffers: usize,
    pub send_buffers: usize,
    pub max_message: usize,
    pub cpu: Option<usize>,
    pub cuda_device: Option<usize>,
    /// Name of this engine's NVLink mailbox (created by the worker), if NVLink is on.
    pub mailbox: Option<String>,
    /// How long unregistering waits for the region's lease holders to answer.
    pub revoke_timeout: Duration,
}

/// What happens when a staged copy has finished.
enum AfterCopy {
    /// An NVLink copy has finished: tell the peer (its mailbox), complete the op.
    Nvlink {
        slot: u32,
        lease: u32,
        peer: u32,
        imm: Option<u32>,
        len: usize,
    },
    /// Post the staged op from send buffer `buf` (its data is in place).
    Post {
        op: Op,
        slot: u32,
        buf: u32,
        len: usize,
        token: u64,
    },
    /// A staged message landed in its destination: repost the receive buffer, count `imm`,
    /// tell the writer (`writer`, `token`) when it asked.
    Landed {
        domain: u8,
        buf: u32,
        imm: Option<u32>,
        region: u64,
        writer: u64,
        token: u64,
    },
}

pub(crate) struct Worker {
    domains: Vec<Domain>,
    rx: Receiver<Request>,
    shared: Arc<Shared>,
    cfg: WorkerConfig,
    /// Operation contexts, in fixed-address chunks: a pointer from a completion is accepted only
    /// if it points at one of these entries (providers have been seen to report contexts they
    /// were never given).
    ctxs: Vec<Box<[OpCtx]>>,
    n_ctx: usize,
    free_ctx: Vec<u32>,
    active: Vec<Option<Active>>,
    free_active: Vec<u32>,
    /// Ops waiting for queue space, per domain (FIFO, retried front first).
    pending: Vec<VecDeque<Pending>>,
    /// Ops waiting in all queues.
    n_pending: usize,
    peers: HashMap<u32, PeerEntry>,
    regions: HashMap<u64, Vec<MrHandle>>,
    /// Regions peers write through staging: id -> (first byte, length).
    staged_regions: HashMap<u64, (Mem, usize)>,
    copier: Copier,
    /// This engine's NVLink mailbox (immediates from same-host peers).
    mailbox: Option<crate::nvlink::Mailbox>,
    /// Peers' GPU regions reachable over NVLink, by (peer, region id).
    remote_gpu: HashMap<(u32, u64), RemoteGpu>,
    /// VMM mappings whose lease ended, unmapped once no queued copy can still use them.
    retired_vmm: Vec<stolon_cuda::MappedVmm>,
    /// IPC mappings replaced while copies may still use them (same rule).
    retired_ipc: Vec<stolon_cuda::IpcMapping>,
    /// Staged copies in flight, in submission order (on several streams; finished ones are
    /// handled in this order).
    copies: VecDeque<(Ticket, AfterCopy)>,
    /// Pins `msg_mem` for asynchronous CUDA copies; declared before it so it is dropped first.
    _pinned: Option<stolon_cuda::HostRegistration>,
    /// Backing store of message buffers: recv buffers of every domain, then send buffers.
    /// Each buffer is `HEADER + max_message` bytes.
    msg_mem: Box<[u8]>,
    free_send: Vec<u32>,
    waiting_sends: VecDeque<(u32, usize, u32)>,
    triggers: HashMap<u32, Trigger>,
    watches: Vec<Watch>,
    /// Leases on peers' regions, by the engine's index.
    leases: Vec<Lease>,
    /// The leases on each (peer, region), for the owner's `Revoke`.
    leases_of: HashMap<(u32, u64), Vec<u32>>,
    /// Peers holding a lease on each of this engine's regions.
    holders: HashMap<u64, HashSet<u32>>,
    /// Peers by engine id (those that asked for a lease), for `Landed` answers.
    peer_of_engine: HashMap<u64, u32>,
    /// Regions being unregistered.
    revocations: Vec<Revocation>,
    /// Control messages waiting to be sent.
    ctrl_out: VecDeque<CtrlOut>,
    /// `Landed` entries to send, per peer, flushed once per loop.
    landed_out: HashMap<u32, Vec<(u64, bool)>>,
    /// Delivered staged chunks waiting for the owner's `Landed`: token -> (slot, lease).
    awaiting_landed: HashMap<u64, (u32, u32)>,
    next_token: u64,
    /// Ops in flight that read each local region (only `Write` reads a registration).
    local_inflight: HashMap<u64, usize>,
    /// Regions whose refusals were logged (once each).
    logged_refusals: HashSet<u64>,
    /// Peers that said `Bye`: ops to them fail at once.
    gone: HashSet<u32>,
    /// This engine's doorbell, where some domain has no wait descriptor.
    doorbell: Option<Doorbell>,
    /// Completion entries reused by every poll.
    cq_entries: Vec<fi::fi_cq_data_entry>,
}

/// Layout of the internal region: [scratch 64 B][recv buffers][send buffers].
const SCRATCH: usize = 64;

impl Worker {
    /// Opens every domain, registers the internal buffers and returns the worker with the
    /// per-domain (name, scratch key, virt_addr, scratch address) it exposes.
    pub(crate) fn open(
        specs: &[crate::libfabric::DomainSpec],
        rx: Receiver<Request>,
        shared: Arc<Shared>,
        cfg: WorkerConfig,
    ) -> Result<(
        Self,
        Vec<crate::desc::DomainAddr>,
        Vec<crate::libfabric::DomainAttrs>,
    )> {
        let mut domains = Vec::with_capacity(specs.len());
        for s in specs {
            domains.push(Domain::open(s, HEADER + cfg.max_message)?);
        }
        let nd = domains.len();
        let buf_size = HEADER + cfg.max_message;
        let msg_len = SCRATCH + (nd * cfg.recv_buffers + cfg.send_buffers) * buf_size;
        let msg_mem = vec![0u8; msg_len].into_boxed_slice();
        let (copier, pinned) = match cfg.cuda_device {
            None => (Copier::Host, None),
            Some(dev) => {
                let copier = Copier::cuda(dev)?;
                let Copier::Cuda { ctx, .. } = &copier else {
                    unreachable!()
                };
                // SAFETY: msg_mem lives in the worker and is dropped after the registration
                // (field order), so the pinned range stays valid while registered.
                let reg = unsafe {
                    stolon_cuda::HostRegistration::new(
                        ctx,
                        msg_mem.as_ptr() as *mut u8,
                        msg_len,
                        stolon_cuda::HostRegistration::DEFAULT_FLAGS,
                    )
                }
                .map_err(crate::staging::cuda_err)?;
                (copier, Some(reg))
            }
        };
        let mailbox = match &cfg.mailbox {
            Some(name) => Some(crate::nvlink::Mailbox::create(name, 1 << 16)?),
            None => None,
        };
        let mut w = Worker {
            domains,
            rx,
            shared,
            ctxs: Vec::new(),
            n_ctx: 0,
            free_ctx: Vec::new(),
            active: Vec::new(),
            free_active: Vec::new(),
            pending: (0..nd).map(|_| VecDeque::new()).collect(),
            n_pending: 0,
            peers: HashMap::new(),
            regions: HashMap::new(),
            staged_regions: HashMap::new(),
            copier,
            mailbox,
            remote_gpu: HashMap::new(),
            retired_vmm: Vec::new(),
            retired_ipc: Vec::new(),
            copies: VecDeque::new(),
            _pinned: pinned,
            msg_mem,
            free_send: (0..cfg.send_buffers as u32).rev().collect(),
            waiting_sends: VecDeque::new(),
            triggers: HashMap::new(),
            watches: Vec::new(),
            leases: Vec::new(),
            leases_of: HashMap::new(),
            holders: HashMap::new(),
            peer_of_engine: HashMap::new(),
            revocations: Vec::new(),
            ctrl_out: VecDeque::new(),
            landed_out: HashMap::new(),
            awaiting_landed: HashMap::new(),
            next_token: 1,
            local_inflight: HashMap::new(),
            logged_refusals: HashSet::new(),
            gone: HashSet::new(),
            doorbell: None,
            cq_entries: cq_entry_buffer(64),
            cfg,
        };
        if w.domains.iter().any(|d| d.wait_fd().is_none()) {
            w.doorbell = Doorbell::bind(w.shared.engine_id);
        }
        let ptr = w.msg_mem.as_ptr() as usize;
        let keys = w.register(INTERNAL_REGION, ptr, msg_len)?;
        let mut addrs = Vec::with_capacity(nd);
        let mut attrs = Vec::with_capacity(nd);
        for (d, dom) in w.domains.iter().enumerate() {
            addrs.push(crate::desc::DomainAddr {
                provider: dom.attrs().provider.clone(),
                name: dom.name().to_vec(),
                virt_addr: dom.attrs().virt_addr,
                scratch_key: keys[d],
                scratch_addr: if dom.attrs().virt_addr { ptr as u64 } else { 0 },
            });
            attrs.push(dom.attrs().clone());
        }
        for d in 0..nd {
            for b in 0..w.cfg.recv_buffers {
                w.post_recv(d, (d * w.cfg.recv_buffers + b) as u32)?;
            }
        }
        Ok((w, addrs, attrs))
    }

    fn register(&mut self, id: u64, ptr: usize, len: usize) -> Result<Vec<u64>> {
        self.register_on_all(id, |dom, key| {
            // SAFETY: the region's owner keeps the memory alive until Unregister, which closes
            // these MRs (regions are unregistered only when their last handle is dropped, or
            // explicitly, and every in-flight op holds a handle).
            unsafe { dom.register(ptr as *const u8, len.max(1), key) }
        })
    }

    fn register_hmem(&mut self, id: u64, ptr: u64, len: usize, device: usize) -> Result<Vec<u64>> {
        self.register_on_all(id, |dom, key| {
            // SAFETY: the region's owner keeps the device memory allocated until Unregister,
            // which closes these registrations.
            unsafe { dom.register_hmem(ptr, len.max(1), key, device) }
        })
    }

    /// Registers one region on every domain (all or none) and returns its per-domain keys.
    fn register_on_all(
        &mut self,
        id: u64,
        reg: impl Fn(&mut Domain, u64) -> Result<MrHandle>,
    ) -> Result<Vec<u64>> {
        let mut mrs = Vec::with_capacity(self.domains.len());
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        for d in 0..self.domains.len() {
            match reg(&mut self.domains[d], key) {
                Ok(mr) => mrs.push(mr),
                Err(e) => {
                    for (dd, mr) in mrs.into_iter().enumerate() {
                        let _ = self.domains[dd].close_mr(mr);
                    }
                    return Err(e);
                }
            }
        }
        let keys = mrs.iter().map(MrHandle::key).collect();
        self.regions.insert(id, mrs);
        Ok(keys)
    }

    fn alloc_ctx(&mut self, tag: Tag) -> *mut c_void {
        const CHUNK: usize = 1024;
        let i = match self.free_ctx.pop() {
            Some(i) => i as usize,
            None => {
                if self.n_ctx == self.ctxs.len() * CHUNK {
                    let chunk: Vec<OpCtx> = (0..CHUNK)
                        .map(|_| OpCtx {
                            fi_ctx: [0; 8],
                            tag: Tag::Free,
                        })
                        .collect();
                    self.ctxs.push(chunk.into_boxed_slice());
                }
                self.n_ctx += 1;
                self.n_ctx - 1
            }
        };
        let c = &mut self.ctxs[i / CHUNK][i % CHUNK];
        c.tag = tag;
        (c as *mut OpCtx).cast()
    }

    /// Takes back the context behind a completion and returns its tag, or None when `p` is not
    /// a context of this worker with an operation in flight (nothing is dereferenced then).
    fn take_ctx(&mut self, p: *mut c_void) -> Option<Tag> {
        let size = std::mem::size_of::<OpCtx>();
        let addr = p as usize;
        for (c, chunk) in self.ctxs.iter_mut().enumerate() {
            let base = chunk.as_ptr() as usize;
            let end = base + chunk.len() * size;
            if addr < base || addr >= end || (addr - base) % size != 0 {
                continue;
            }
            let k = (addr - base) / size;
            let tag = std::mem::replace(&mut chunk[k].tag, Tag::Free);
            if matches!(tag, Tag::Free) {
                return None;
            }
            self.free_ctx.push((c * chunk.len() + k) as u32);
            return Some(tag);
        }
        None
    }

    /// Address and size of message buffer `index` (receive buffers first, then send buffers).
    fn msg_buf(&self, index: usize) -> (*const u8, usize) {
        let size = HEADER + self.cfg.max_message;
        let off = SCRATCH + index * size;
        // SAFETY: index < number of buffers, so the range lies inside msg_mem.
        (unsafe { self.msg_mem.as_ptr().add(off) }, size)
    }

    /// Address of send buffer `buf`.
    fn send_buf(&self, buf: u32) -> *mut u8 {
        let index = self.domains.len() * self.cfg.recv_buffers + buf as usize;
        self.msg_buf(index).0 as *mut u8
    }

    fn internal_desc(&self, d: usize) -> *mut c_void {
        self.regions[&INTERNAL_REGION][d].desc()
    }

    fn post_recv(&mut self, d: usize, buf: u32) -> Result<()> {
        let (p, len) = self.msg_buf(buf as usize);
        let desc = self.internal_desc(d);
        let ctx = self.alloc_ctx(Tag::Recv {
            domain: d as u8,
            buf,
        });
        loop {
            // SAFETY: the buffer is part of the internal region, registered for the worker's
            // lifetime; ctx is a stable slab block released when the completion is read.
            match unsafe { self.domains[d].post_recv(p as *mut u8, len, desc, ctx) } {
                Ok(Posted::Yes) => return Ok(()),
                Ok(Posted::Again) => {
                    self.poll_domain(d);
                }
                Err(e) => return Err(e),
            }
        }
    }

    pub(crate) fn run(mut self) {
        if let Some(cpu) = self.cfg.cpu {
            pin_to_cpu(cpu);
        }
        let mut last_busy = Instant::now();
        let mut nap = Duration::from_micros(20);
        let mut last_check = Instant::now();
        'outer: loop {
            let mut busy = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Request::Stop) => break 'outer,
                    Ok(req) => {
                        busy = true;
                        self.handle(req);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'outer,
                }
            }
            for d in 0..self.domains.len() {
                busy |= self.poll_domain(d) > 0;
            }
            if !self.copies.is_empty() {
                busy |= self.poll_copies();
            }
            if self.mailbox.is_some() {
                busy |= self.poll_mailbox();
            }
            if !self.watches.is_empty() {
                busy |= self.poll_watches();
            }
            if self.n_pending > 0 {
                busy |= self.retry_pending();
            }
            if !self.landed_out.is_empty() {
                self.flush_landed();
                busy = true;
            }
            if !self.ctrl_out.is_empty() {
                busy |= self.flush_ctrl();
            }
            let now = Instant::now();
            if !self.revocations.is_empty() {
                self.finish_revocations(now);
            }
            if now.duration_since(last_check) >= Duration::from_millis(1) {
                last_check = now;
                self.check_deadlines(now);
                self.shared.imm.expire(now);
                self.check_vmm_leases();
            }
            if busy {
                last_busy = now;
                nap = Duration::from_micros(20);
            } else if now.duration_since(last_busy) > self.cfg.spin && self.watches.is_empty() {
                // Idle (watched counters are polled instead: they are the low-latency path).
                match self.sleep(nap) {
                    Woke::Request(Request::Stop) => break,
                    Woke::Request(req) => {
                        self.handle(req);
                        last_busy = Instant::now();
                        nap = Duration::from_micros(20);
                    }
                    Woke::Rung => {
                        last_busy = Instant::now();
                        nap = Duration::from_micros(20);
                    }
                    Woke::Timeout => {
                        let cap = if self.shared.imm.has_waiters() {
                            self.cfg.max_sleep.min(Duration::from_micros(50))
                        } else {
                            self.cfg.max_sleep
                        };
                        nap = (nap * 2).min(cap);
                    }
                }
            } else {
                std::hint::spin_loop();
            }
        }
        self.drain_before_stop();
        self.shutdown();
    }

    /// Before closing: lets revocations in progress finish (their holders answer within
    /// microseconds unless dead; bounded by the revoke timeout) and control messages leave, so
    /// no peer is left sending an answer to an endpoint that is closing.
    fn drain_before_stop(&mut self) {
        // Every peer hears `Bye`, so its transfers here fail now rather than at their deadline.
        let known: Vec<u32> = self
            .peers
            .iter()
            .filter(|(id, p)| p.addrs.is_ok() && !self.gone.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for peer in known {
            self.send_ctrl(peer, Ctrl::Bye);
        }
        let deadline = Instant::now() + self.cfg.revoke_timeout;
        // A short grace for the goodbyes (their sends completing), more for revocations.
        let bye_deadline = Instant::now() + Duration::from_millis(200);
        let all_sent = |w: &Self| w.ctrl_out.is_empty() && w.free_send.len() == w.cfg.send_buffers;
        while (!self.revocations.is_empty() || (!all_sent(self) && Instant::now() < bye_deadline))
            && Instant::now() < deadline
        {
            for d in 0..self.domains.len() {
                self.poll_domain(d);
            }
            if !self.copies.is_empty() {
                self.poll_copies();
            }
            if !self.landed_out.is_empty() {
                self.flush_landed();
            }
            self.flush_ctrl();
            self.finish_revocations(Instant::now());
            std::thread::yield_now();
        }
    }

    /// Sleeps until a request arrives or, where nothing needs polling (staged copies, the
    /// NVLink mailbox, queued ops, and, on domains without a wait descriptor, transfers waiting
    /// for completions), until traffic arrives: `fi_trywait`, then `ppoll` on the CQ
    /// descriptors, the doorbell and the request eventfd. Otherwise it naps for `nap`.
    fn sleep(&mut self, nap: Duration) -> Woke {
        let waker = &self.shared.waker;
        waker.sleeping.store(true, Ordering::SeqCst);
        // A request sent before the flag was set did not ring the eventfd: look once more.
        if let Ok(req) = self.rx.try_recv() {
            waker.sleeping.store(false, Ordering::SeqCst);
            return Woke::Request(req);
        }
        let all_fds = self.domains.iter().all(|d| d.wait_fd().is_some());
        let quiet = self.active.iter().all(Option::is_none) && self.awaiting_landed.is_empty();
        let blocking = self.copies.is_empty()
            && self.mailbox.is_none()
            && self.n_pending == 0
            && self.ctrl_out.is_empty()
            && (all_fds || (self.doorbell.is_some() && quiet));
        let timeout = if blocking {
            // Every domain with a descriptor must agree that nothing is pending.
            if !self
                .domains
                .iter_mut()
                .filter(|d| d.wait_fd().is_some())
                .all(|d| d.trywait())
            {
                waker.sleeping.store(false, Ordering::SeqCst);
                return Woke::Timeout;
            }
            // Deadlines, expiring waits and revocations are checked at this pace.
            if !quiet || !self.revocations.is_empty() || self.shared.imm.has_waiters() {
                Duration::from_millis(5)
            } else {
                Duration::from_millis(100)
            }
        } else {
            nap
        };
        let mut fds = Vec::with_capacity(2 + self.domains.len());
        fds.push(libc::pollfd {
            fd: waker.fd,
            events: libc::POLLIN,
            revents: 0,
        });
        if let Some(b) = &self.doorbell {
            use std::os::fd::AsRawFd;
            fds.push(libc::pollfd {
                fd: b.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if blocking {
            for fd in self.domains.iter().filter_map(|d| d.wait_fd()) {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: fds is a valid array of fds.len() pollfd entries; ts lives across the call;
        // no signal mask is passed.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        waker.sleeping.store(false, Ordering::SeqCst);
        if fds[0].revents != 0 {
            waker.drain();
        }
        if let Ok(req) = self.rx.try_recv() {
            return Woke::Request(req);
        }
        // Traffic on a completion queue (plain writes make no completion here, but the target
        // must keep progressing them) or the doorbell: spin for a while, as after any work.
        let bell = usize::from(self.doorbell.is_some());
        let traffic = fds[1 + bell..].iter().any(|f| f.revents != 0);
        let rung =
            bell == 1 && fds[1].revents != 0 && self.doorbell.as_ref().is_some_and(|b| b.drain());
        if traffic || rung {
            Woke::Rung
        } else {
            Woke::Timeout
        }
    }

    /// An op was posted to `peer` on domain `d`: where the peer's provider has no wait
    /// descriptor, ring its doorbell (at most once a millisecond) so it wakes to progress it.
    fn ring(&mut self, peer: u32, d: usize) {
        if self.domains[d].wait_fd().is_some() {
            return;
        }
        let (Some(bell), Some(p)) = (&self.doorbell, self.peers.get_mut(&peer)) else {
            return;
        };
        let Some(addr) = &p.bell else {
            return;
        };
        let now = Instant::now();
        if p.last_ring
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(1))
        {
            return;
        }
        p.last_ring = Some(now);
        if bell.sock.send_to_addr(&[1], addr).is_err() {
            // No such engine on this host (a remote peer): it progresses on its own naps.
            p.bell = None;
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Register {
                id,
                ptr,
                len,
                reply,
            } => {
                let _ = reply.send(self.register(id, ptr, len));
            }
            Request::RegisterHmem {
                id,
                ptr,
                len,
                device,
                reply,
            } => {
                let _ = reply.send(self.register_hmem(id, ptr, len, device));
            }
            Request::RegisterStaged {
                id,
                base,
                len,
                reply,
            } => {
                self.staged_regions.insert(id, (base, len));
                let _ = reply.send(Ok(()));
            }
            Request::Unregister { id, owner, reply } => self.start_revocation(id, owner, reply),
            Request::AddLease {
                lease,
                peer,
                region,
                desc,
            } => {
                let i = lease as usize;
                if self.leases.len() <= i {
                    self.leases.resize_with(i + 1, || Lease {
                        peer: u32::MAX,
                        region: 0,
                        desc: Vec::new(),
                        state: LeaseState::Closed(Error::Stopped),
                        parked: Vec::new(),
                        inflight: 0,
                    });
                }
                self.leases[i] = Lease {
                    peer,
                    region,
                    desc,
                    state: LeaseState::New,
                    parked: Vec::new(),
                    inflight: 0,
                };
                self.leases_of
                    .entry((peer, region))
                    .or_default()
                    .push(lease);
            }
            Request::AddPeer { id, addr } => self.add_peer(id, &addr),
            Request::AddRemoteGpu {
                peer,
                region,
                target,
                len,
            } => {
                let old = self.remote_gpu.insert(
                    (peer, region),
                    RemoteGpu {
                        target,
                        len,
                        mapping: None,
                        gone: None,
                    },
                );
                if let Some(old) = old {
                    self.retire(old);
                }
            }
            Request::Transfer(t) => self.start_transfer(*t),
            Request::Watch(mut w, reply) => {
                w.last = w.load();
                self.watches.push(*w);
                let _ = reply.send(());
                // Steps already due (the counter moved before the watch was armed).
                let i = self.watches.len() - 1;
                let now = self.watches[i].last;
                self.release_steps(i, 0, now);
            }
            Request::Unwatch { id } => {
                if let Some(i) = self.watches.iter().position(|w| w.id == id) {
                    let w = self.watches.swap_remove(i);
                    for req in w.steps {
                        req.state.complete(Err(Error::Stopped));
                    }
                }
            }
            Request::Trigger(t, reply) => {
                self.triggers.insert(t.imm, *t);
                let _ = reply.send(());
            }
            Request::Stop => {}
        }
    }

    /// Adds a peer to every domain's address vector (once: the engine and the lease protocol
    /// may both introduce the same peer).
    fn add_peer(&mut self, id: u32, addr: &PeerAddr) {
        if self.peers.contains_key(&id) {
            return;
        }
        let r = self.domains.len();
        let mut addrs = Vec::with_capacity(r);
        let mut err = None;
        for d in 0..r {
            let remote = &addr.domains[d % addr.domains.len()];
            match self.domains[d].insert_addr(&remote.name) {
                Ok(a) => addrs.push(a),
                Err(e) => {
                    err = Some(e);
                    break;
                }
            }
        }
        let addrs = match err {
            None => Ok(addrs),
            Some(e) => {
                for (d, a) in addrs.into_iter().enumerate() {
                    self.domains[d].remove_addr(a);
                }
                Err(e)
            }
        };
        let mailbox_name = addr.nvlink.as_ref().map(|n| n.mailbox.clone());
        self.peers.insert(
            id,
            PeerEntry {
                addrs,
                bell: Doorbell::addr(addr.engine_id),
                last_ring: None,
                mailbox_name,
                mailbox: None,
            },
        );
    }

    fn start_transfer(&mut self, t: TransferReq) {
        let TransferReq {
            ops,
            state,
            deadline,
            timeout,
            keep,
            payload,
        } = t;
        if ops.is_empty() {
            state.complete(Ok(()));
            return;
        }
        let slot = match self.free_active.pop() {
            Some(s) => s,
            None => {
                self.active.push(None);
                (self.active.len() - 1) as u32
            }
        };
        let mut peers: Vec<u32> = ops.iter().map(|o| o.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        self.active[slot as usize] = Some(Active {
            remaining: ops.len(),
            state,
            deadline,
            timeout,
            reported: false,
            peers,
            _keep: keep,
            payload,
        });
        for op in ops {
            self.post_or_queue(op, slot);
        }
    }

    /// Takes a new op: counts it against its lease and its local region until it finishes
    /// ([`Self::op_done`]), then posts it now, or queues it when the provider says "again" (or
    /// ops are already queued on its domain: posting would only fail again).
    fn post_or_queue(&mut self, op: Op, slot: u32) {
        if op.lease != NO_LEASE {
            if let Some(l) = self.leases.get_mut(op.lease as usize) {
                l.inflight += 1;
            }
        }
        if let OpKind::Write { region, .. } = op.kind {
            *self.local_inflight.entry(region).or_default() += 1;
        }
        self.post_or_queue_counted(op, slot);
    }

    /// [`Self::post_or_queue`] for an op already counted.
    fn post_or_queue_counted(&mut self, op: Op, slot: u32) {
        if !self.pending[op.domain].is_empty() {
            self.pending[op.domain].push_back(Pending { op, slot });
            self.n_pending += 1;
            return;
        }
        match self.try_post(op, slot) {
            Ok(true) => {}
            Ok(false) => {
                self.pending[op.domain].push_back(Pending { op, slot });
                self.n_pending += 1;
            }
            Err(e) => self.op_done(op, slot, Err(e)),
        }
    }

    /// Whether `op` may be posted now: its lease is granted (Ok(true)), it was parked until the
    /// owner answers (Ok(false)), or the lease was refused or revoked (Err).
    fn lease_gate(&mut self, op: Op, slot: u32) -> Result<bool> {
        if op.lease == NO_LEASE {
            return Ok(true);
        }
        let now = Instant::now();
        let resend = self.cfg.revoke_timeout;
        let Some(l) = self.leases.get_mut(op.lease as usize) else {
            return Err(Error::InvalidArgument(format!(
                "unknown lease {}",
                op.lease
            )));
        };
        match &l.state {
            LeaseState::Granted => return Ok(true),
            LeaseState::Closed(e) => return Err(e.clone()),
            LeaseState::Revoking => {
                return Err(Error::Rejected(format!(
                    "region {} of the peer is being unregistered",
                    l.region
                )))
            }
            LeaseState::Requested { since } if now.duration_since(*since) < resend => {
                l.parked.push(Pending { op, slot });
                return Ok(false);
            }
            LeaseState::New | LeaseState::Requested { .. } => {}
        }
        // Ask (again, if the first request went unanswered for the revoke timeout).
        l.state = LeaseState::Requested { since: now };
        l.parked.push(Pending { op, slot });
        let msg = Ctrl::LeaseReq {
            lease: op.lease,
            region: l.region,
            desc: l.desc.clone(),
            writer: self.shared.addr_bytes.get().cloned().unwrap_or_default(),
        };
        let peer = l.peer;
        self.ctrl_out.push_back(CtrlOut {
            peer,
            body: msg.encode(),
            lease: Some(op.lease),
            since: now,
        });
        self.flush_ctrl();
        Ok(false)
    }

    /// Returns Ok(true) when posted (or parked until its lease is answered), Ok(false) when it
    /// must be retried.
    fn try_post(&mut self, op: Op, slot: u32) -> Result<bool> {
        if self.gone.contains(&op.peer) {
            return Err(peer_stopped(op.peer));
        }
        if !self.lease_gate(op, slot)? {
            return Ok(true);
        }
        let d = op.domain;
        let dest = match self.peers.get(&op.peer).map(|p| &p.addrs) {
            Some(Ok(a)) => a[d],
            Some(Err(e)) => return Err(e.clone()),
            None => return Err(Error::InvalidArgument(format!("unknown peer {}", op.peer))),
        };
        match op.kind {
            OpKind::Write {
                region,
                src,
                len,
                raddr,
                rkey,
                imm,
            } => {
                let Some(mrs) = self.regions.get(&region) else {
                    return Err(Error::Unregistered(format!("region {region} is gone")));
                };
                let dom = &self.domains[d];
                if !op.delivered && dom.attrs().use_inject && len <= dom.attrs().inject_size {
                    // SAFETY: src..src+len lies in a registered region (checked by the engine)
                    // and is only read during the call; raddr/rkey come from a validated
                    // descriptor.
                    let r = unsafe {
                        self.domains[d].inject_write(
                            src as *const u8,
                            len,
                            dest,
                            raddr,
                            rkey,
                            imm.map(u64::from),
                        )
                    };
                    return match r? {
                        Posted::Yes => {
                            let s = &self.shared.stats[d];
                            s.write_ops.fetch_add(1, Ordering::Relaxed);
                            s.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                            self.ring(op.peer, d);
                            self.op_done(op, slot, Ok(()));
                            Ok(true)
                        }
                        Posted::Again => {
                            self.poll_domain(d);
                            Ok(false)
                        }
                    };
                }
                let desc = mrs[d].desc();
                let lease = op.lease;
                let tag = if slot == TRIGGERED {
                    Tag::Triggered {
                        lease,
                        region,
                        domain: d as u8,
                        len,
                    }
                } else {
                    Tag::Transfer {
                        slot,
                        lease,
                        region,
                        domain: d as u8,
                        len,
                    }
                };
                let ctx = self.alloc_ctx(tag);
                // SAFETY: src..src+len lies in a registered region (checked by the engine
                // before submitting) that the transfer keeps alive until this op completes;
                // raddr/rkey were derived from a validated descriptor; ctx is a stable slab
                // block released only when its completion is read.
                let r = unsafe {
                    self.domains[d].post_write(
                        src as *const u8,
                        len,
                        desc,
                        dest,
                        raddr,
                        rkey,
                        imm.map(u64::from),
                        op.delivered,
                        ctx,
                    )
                };
                self.finish_post(op.peer, d, ctx, r)
            }
            OpKind::Send => {
                let Some(buf) = self.free_send.pop() else {
                    return Ok(false);
                };
                let payload = self.active[slot as usize]
                    .as_ref()
                    .and_then(|a| a.payload.as_ref());
                let Some(payload) = payload else {
                    self.free_send.push(buf);
                    return Err(Error::InvalidArgument("send without payload".into()));
                };
                let len = payload.len();
                let p = self.send_buf(buf);
                // SAFETY: p points to a send buffer of HEADER + max_message bytes inside msg_mem
                // and len <= max_message (checked by the engine); the source is the payload Vec.
                unsafe {
                    Header::message(KIND_USER, len)
                        .encode(std::slice::from_raw_parts_mut(p, HEADER));
                    std::ptr::copy_nonoverlapping(payload.as_ptr(), p.add(HEADER), len);
                }
                self.post_from_send_buf(op, slot, buf, len, 0)
            }
            OpKind::NvlinkCopy {
                src,
                len,
                region,
                offset,
                imm,
            } => {
                let Copier::Cuda { ctx, .. } = &self.copier else {
                    return Err(Error::Cuda(
                        "NVLink needs an engine with cuda_device".into(),
                    ));
                };
                let Some(rg) = self.remote_gpu.get_mut(&(op.peer, region)) else {
                    return Err(Error::InvalidArgument(format!(
                        "GPU region {region} of peer {} was not described",
                        op.peer
                    )));
                };
                if let Some(why) = &rg.gone {
                    return Err(Error::TransferFailed(why.clone()));
                }
                if offset.checked_add(len as u64).map_or(true, |e| e > rg.len) {
                    return Err(Error::OutOfBounds(format!(
                        "NVLink write [{offset}, +{len}) past the {}-byte region",
                        rg.len
                    )));
                }
                let base = match &rg.target {
                    RemoteTarget::Ipc { handle, offset } => {
                        if rg.mapping.is_none() {
                            let h = stolon_cuda::IpcMemHandle::from_bytes(handle)
                                .map_err(crate::staging::cuda_err)?;
                            rg.mapping = Some(h.open(ctx).map_err(crate::staging::cuda_err)?);
                        }
                        rg.mapping.as_ref().unwrap().ptr() + offset
                    }
                    RemoteTarget::Vmm {
                        mapping: Some(m),
                        offset,
                        ..
                    } => m.ptr() + offset,
                    RemoteTarget::Vmm { mapping: None, .. } => {
                        return Err(Error::TransferFailed(format!(
                            "GPU region {region} of peer {} is no longer mapped",
                            op.peer
                        )))
                    }
                };
                // SAFETY: the destination lies inside the peer's IPC-mapped allocation (bounds
                // checked against the descriptor), the source inside a registered GPU region kept
                // alive by the transfer until the copy's ticket is done.
                let ticket = unsafe {
                    self.copier
                        .copy(Mem::Gpu(base + offset), Mem::Gpu(src), len)
                }?;
                self.copies.push_back((
                    ticket,
                    AfterCopy::Nvlink {
                        slot,
                        lease: op.lease,
                        peer: op.peer,
                        imm,
                        len,
                    },
                ));
                Ok(true)
            }
            OpKind::StagedWrite { src, len, .. } | OpKind::StagedSend { src, len, .. } => {
                let Some(buf) = self.free_send.pop() else {
                    return Ok(false);
                };
                let p = self.send_buf(buf);
                // A delivered staged chunk completes when the owner says it landed.
                let token = match op.kind {
                    OpKind::StagedSend { .. } if op.delivered && slot != TRIGGERED => {
                        self.next_token += 1;
                        // Registered now: the answer may come before the send's completion.
                        self.awaiting_landed
                            .insert(self.next_token, (slot, op.lease));
                        self.next_token
                    }
                    _ => 0,
                };
                let data = if let OpKind::StagedSend {
                    region,
                    offset,
                    imm,
                    ..
                } = op.kind
                {
                    let h = Header {
                        kind: KIND_STAGED,
                        imm,
                        len: len as u32,
                        region,
                        offset,
                        writer: self.shared.engine_id,
                        token,
                    };
                    // SAFETY: p points to a send buffer of at least HEADER bytes.
                    h.encode(unsafe { std::slice::from_raw_parts_mut(p, HEADER) });
                    // SAFETY: HEADER + len <= buffer size (staged ops are planned at most
                    // max_message bytes long).
                    unsafe { p.add(HEADER) }
                } else {
                    p
                };
                // SAFETY: the send buffer stays reserved until the op completes; the source
                // region is kept alive by its transfer.
                match unsafe { self.copier.copy(Mem::Host(data as usize), src, len) } {
                    Ok(ticket) => {
                        self.copies.push_back((
                            ticket,
                            AfterCopy::Post {
                                op,
                                slot,
                                buf,
                                len,
                                token,
                            },
                        ));
                        Ok(true)
                    }
                    Err(e) => {
                        self.free_send.push(buf);
                        self.awaiting_landed.remove(&token);
                        Err(e)
                    }
                }
            }
        }
    }

    /// Posts `op` (a send or a staged op) whose bytes are in send buffer `buf`. The buffer is
    /// released on completion, or now if the op could not be posted. A staged chunk with a
    /// `token` completes when the owner answers `Landed`, not when the send completes.
    fn post_from_send_buf(
        &mut self,
        op: Op,
        slot: u32,
        buf: u32,
        len: usize,
        token: u64,
    ) -> Result<bool> {
        let d = op.domain;
        let dest = match self.peers.get(&op.peer).map(|p| &p.addrs) {
            Some(Ok(a)) => a[d],
            Some(Err(e)) => {
                self.free_send.push(buf);
                return Err(e.clone());
            }
            None => {
                self.free_send.push(buf);
                return Err(Error::InvalidArgument(format!("unknown peer {}", op.peer)));
            }
        };
        let p = self.send_buf(buf);
        let desc = self.internal_desc(d);
        let domain = d as u8;
        let r = match op.kind {
            OpKind::StagedWrite {
                raddr, rkey, imm, ..
            } => {
                let ctx = self.alloc_ctx(Tag::StagedWrite {
                    slot,
                    lease: op.lease,
                    buf,
                    domain,
                    len,
                });
                // SAFETY: the send buffer is in the internal region, registered for the worker's
                // lifetime and reserved until this op completes; raddr/rkey come from a
                // validated descriptor; ctx is a stable slab block.
                let r = unsafe {
                    self.domains[d].post_write(
                        p,
                        len,
                        desc,
                        dest,
                        raddr,
                        rkey,
                        imm.map(u64::from),
                        op.delivered,
                        ctx,
                    )
                };
                self.finish_post(op.peer, d, ctx, r)
            }
            _ => {
                let ctx = self.alloc_ctx(Tag::Send {
                    slot,
                    lease: op.lease,
                    buf,
                    domain,
                    len,
                    token,
                });
                // SAFETY: as above; the message is the header plus `len` bytes.
                let r = unsafe { self.domains[d].post_send(p, HEADER + len, desc, dest, ctx) };
                self.finish_post(op.peer, d, ctx, r)
            }
        };
        if !matches!(r, Ok(true)) {
            self.free_send.push(buf);
        }
        r
    }

    /// Advances staged copies that have finished (in submission order).
    fn poll_copies(&mut self) -> bool {
        let mut progressed = false;
        while let Some((ticket, _)) = self.copies.front() {
            match ticket.is_done() {
                Ok(false) => break,
                Ok(true) => {}
                Err(e) => {
                    // A failed copy: fail what it served, keep going.
                    let (_, after) = self.copies.pop_front().unwrap();
                    self.copy_failed(after, e);
                    progressed = true;
                    continue;
                }
            }
            let (ticket, after) = self.copies.pop_front().unwrap();
            self.copier.recycle(ticket);
            progressed = true;
            match after {
                AfterCopy::Post {
                    op,
                    slot,
                    buf,
                    len,
                    token,
                } => {
                    if !self.is_live(slot) {
                        self.free_send.push(buf);
                        self.op_done(op, slot, Ok(()));
                        continue;
                    }
                    // Re-reserve the buffer: post_from_send_buf releases it on failure.
                    match self.post_from_send_buf(op, slot, buf, len, token) {
                        Ok(true) => {}
                        Ok(false) => {
                            // Queue full: the buffer was released; redo the copy later (under
                            // a new token).
                            self.awaiting_landed.remove(&token);
                            self.pending[op.domain].push_back(Pending { op, slot });
                            self.n_pending += 1;
                        }
                        Err(e) => {
                            self.awaiting_landed.remove(&token);
                            self.op_done(op, slot, Err(e));
                        }
                    }
                }
                AfterCopy::Nvlink {
                    slot,
                    lease,
                    peer,
                    imm,
                    len,
                } => {
                    if let Some(imm) = imm {
                        match self.push_mailbox(peer, imm) {
                            Ok(true) => {}
                            Ok(false) => {
                                // The peer's mailbox is full: try again on a later poll.
                                let again = AfterCopy::Nvlink {
                                    slot,
                                    lease,
                                    peer,
                                    imm: Some(imm),
                                    len,
                                };
                                self.copies.push_back((Ticket::Done, again));
                                break;
                            }
                            Err(e) => {
                                self.done(slot, lease, None, Err(e));
                                continue;
                            }
                        }
                    }
                    let s = &self.shared.nvlink;
                    s.write_ops.fetch_add(1, Ordering::Relaxed);
                    s.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                    self.done(slot, lease, None, Ok(()));
                }
                AfterCopy::Landed {
                    domain,
                    buf,
                    imm,
                    region,
                    writer,
                    token,
                } => {
                    if let Err(e) = self.post_recv(domain as usize, buf) {
                        self.shared.stats[domain as usize]
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                        eprintln!("stolon: cannot repost receive buffer: {e}");
                    }
                    self.answer_landed(writer, token, region, true);
                    if let Some(imm) = imm {
                        if !self.fire_trigger(imm) {
                            self.shared.imm.arrive(imm);
                        }
                    }
                }
            }
        }
        progressed
    }

    /// Ends VMM mappings whose owner ended the lease (region unregistered, engine stopped,
    /// process dead): later writes to them fail; the mapping goes once no queued copy can use
    /// it.
    fn check_vmm_leases(&mut self) {
        for ((peer, region), rg) in self.remote_gpu.iter_mut() {
            if let RemoteTarget::Vmm { mapping, lease, .. } = &mut rg.target {
                if mapping.is_some() && lease.is_gone() {
                    rg.gone = Some(format!(
                        "peer {peer} ended its VMM region {region} (unregistered, stopped or \
                         dead)"
                    ));
                    self.retired_vmm.extend(mapping.take());
                }
            }
        }
        if self.copies.is_empty() {
            // Copies are the only users of a mapping, and none is queued.
            self.retired_vmm.clear();
            self.retired_ipc.clear();
        }
    }

    /// Drops a remote region's mapping once no queued copy can still use it.
    fn retire(&mut self, rg: RemoteGpu) {
        if let RemoteTarget::Vmm {
            mapping: Some(m), ..
        } = rg.target
        {
            self.retired_vmm.push(m);
        }
        if let Some(m) = rg.mapping {
            // An IPC mapping: closing it under a queued copy would be as wrong; keep it until
            // the queue drains too (rare: a region described twice).
            self.retired_ipc.push(m);
        }
    }

    /// Pushes an immediate into a peer's NVLink mailbox (opened on first use).
    fn push_mailbox(&mut self, peer: u32, imm: u32) -> Result<bool> {
        let Some(p) = self.peers.get_mut(&peer) else {
            return Err(Error::InvalidArgument(format!("unknown peer {peer}")));
        };
        if p.mailbox.is_none() {
            let name = p
                .mailbox_name
                .as_deref()
                .ok_or_else(|| Error::InvalidArgument("the peer has no NVLink mailbox".into()))?;
            p.mailbox = Some(crate::nvlink::Mailbox::open(name)?);
        }
        Ok(p.mailbox.as_ref().unwrap().push(imm))
    }

    /// Takes immediates from this engine's NVLink mailbox.
    fn poll_mailbox(&mut self) -> bool {
        let mut any = false;
        while let Some(imm) = self.mailbox.as_mut().and_then(|m| m.pop()) {
            any = true;
            self.shared
                .nvlink
                .imms_received
                .fetch_add(1, Ordering::Relaxed);
            if !self.fire_trigger(imm) {
                self.shared.imm.arrive(imm);
            }
        }
        any
    }

    fn copy_failed(&mut self, after: AfterCopy, e: Error) {
        match after {
            AfterCopy::Nvlink { slot, lease, .. } => self.done(slot, lease, None, Err(e)),
            AfterCopy::Post {
                op,
                slot,
                buf,
                token,
                ..
            } => {
                self.free_send.push(buf);
                self.awaiting_landed.remove(&token);
                self.op_done(op, slot, Err(e));
            }
            AfterCopy::Landed {
                domain,
                buf,
                region,
                writer,
                token,
                ..
            } => {
                self.shared.stats[domain as usize]
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
                eprintln!("stolon: staged copy into GPU memory failed: {e}");
                let _ = self.post_recv(domain as usize, buf);
                self.answer_landed(writer, token, region, false);
            }
        }
    }

    fn finish_post(
        &mut self,
        peer: u32,
        d: usize,
        ctx: *mut c_void,
        r: Result<Posted>,
    ) -> Result<bool> {
        match r {
            Ok(Posted::Yes) => {
                self.ring(peer, d);
                Ok(true)
            }
            other => {
                // The op was not posted, so libfabric holds no reference to ctx.
                self.take_ctx(ctx);
                match other {
                    Ok(_) => {
                        self.poll_domain(d);
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Retries queued ops, front first, until a domain says "again".
    fn retry_pending(&mut self) -> bool {
        let mut progressed = false;
        for d in 0..self.pending.len() {
            while let Some(p) = self.pending[d].pop_front() {
                self.n_pending -= 1;
                if !self.is_live(p.slot) {
                    // Its transfer already failed or timed out: drop the op.
                    self.op_done(p.op, p.slot, Ok(()));
                    progressed = true;
                    continue;
                }
                match self.try_post(p.op, p.slot) {
                    Ok(true) => progressed = true,
                    Ok(false) => {
                        self.pending[d].push_front(p);
                        self.n_pending += 1;
                        break;
                    }
                    Err(e) => {
                        progressed = true;
                        self.op_done(p.op, p.slot, Err(e));
                    }
                }
            }
        }
        progressed
    }

    /// Whether ops of `slot` should still be posted: a triggered op or control message (no
    /// transfer), or a transfer that has not failed or timed out.
    fn is_live(&self, slot: u32) -> bool {
        slot == TRIGGERED
            || slot == CTRL
            || self
                .active
                .get(slot as usize)
                .is_some_and(|a| a.as_ref().is_some_and(|a| !a.reported))
    }

    /// Accounts one finished op: releases what [`Self::post_or_queue`] counted, then the op's
    /// share of its transfer.
    fn op_done(&mut self, op: Op, slot: u32, result: Result<()>) {
        let local = match op.kind {
            OpKind::Write { region, .. } => Some(region),
            _ => None,
        };
        self.done(slot, op.lease, local, result);
    }

    /// [`Self::op_done`] from the parts a completion keeps: the slot, the lease, the local
    /// region a `Write` reads.
    fn done(&mut self, slot: u32, lease: u32, local: Option<u64>, result: Result<()>) {
        if let Some(region) = local {
            if let Some(n) = self.local_inflight.get_mut(&region) {
                *n -= 1;
                if *n == 0 {
                    self.local_inflight.remove(&region);
                }
            }
        }
        if lease != NO_LEASE {
            self.release_lease(lease);
        }
        if slot == TRIGGERED || slot == CTRL {
            return;
        }
        let Some(Some(a)) = self.active.get_mut(slot as usize) else {
            return;
        };
        a.remaining -= 1;
        if let Err(e) = result {
            if !a.reported {
                a.reported = true;
                a.state.complete(Err(e));
            }
        }
        if a.remaining == 0 {
            if !a.reported {
                a.state.complete(Ok(()));
            }
            self.active[slot as usize] = None;
            self.free_active.push(slot);
        }
    }

    fn poll_domain(&mut self, d: usize) -> usize {
        const BATCH: usize = 64;
        // Reused across polls (the provider overwrites the entries it returns); a poll nested in
        // completion handling (a repost that met a full queue) gets its own.
        let mut entries = std::mem::take(&mut self.cq_entries);
        if entries.is_empty() {
            entries = cq_entry_buffer(BATCH);
        }
        let mut total = 0;
        loop {
            match self.domains[d].poll(&mut entries) {
                Ok(0) => break,
                Ok(n) => {
                    total += n;
                    for e in &entries[..n] {
                        self.on_completion(d, e.op_context, e.flags, e.len, e.data);
                    }
                    if n < BATCH {
                        break;
                    }
                }
                Err(e) => {
                    total += 1;
                    self.on_error(d, e);
                }
            }
        }
        self.cq_entries = entries;
        total
    }

    fn on_completion(&mut self, d: usize, ctx: *mut c_void, flags: u64, len: usize, data: u64) {
        // Remote events are recognised by their flags, never by the context (which the target
        // side did not post).
        if flags & fi::FI_REMOTE_CQ_DATA != 0 {
            self.shared.stats[d]
                .imms_received
                .fetch_add(1, Ordering::Relaxed);
            let imm = data as u32;
            if !self.fire_trigger(imm) {
                self.shared.imm.arrive(imm);
            }
            return;
        }
        if ctx.is_null() || flags & (fi::FI_REMOTE_WRITE | fi::FI_REMOTE_READ) != 0 {
            return;
        }
        let Some(tag) = self.take_ctx(ctx) else {
            // Not one of ours: count it, never dereference it.
            self.shared.stats[d].errors.fetch_add(1, Ordering::Relaxed);
            return;
        };
        match tag {
            Tag::Transfer {
                slot,
                lease,
                region,
                domain,
                len,
            } => {
                let s = &self.shared.stats[domain as usize];
                s.write_ops.fetch_add(1, Ordering::Relaxed);
                s.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                self.done(slot, lease, Some(region), Ok(()));
            }
            Tag::Triggered {
                lease,
                region,
                domain,
                len,
            } => {
                let s = &self.shared.stats[domain as usize];
                s.write_ops.fetch_add(1, Ordering::Relaxed);
                s.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                self.done(TRIGGERED, lease, Some(region), Ok(()));
            }
            Tag::Send {
                slot,
                lease,
                buf,
                domain,
                len,
                token,
            } => {
                let s = &self.shared.stats[domain as usize];
                s.messages_sent.fetch_add(1, Ordering::Relaxed);
                s.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                self.free_send.push(buf);
                // A delivered staged chunk is done when the owner says it landed (it is
                // registered in `awaiting_landed` since it was posted).
                if token == 0 || slot == CTRL {
                    self.done(slot, lease, None, Ok(()));
                }
            }
            Tag::Recv { domain, buf } => {
                self.shared.stats[d]
                    .messages_received
                    .fetch_add(1, Ordering::Relaxed);
                self.on_message(domain, buf, len);
            }
            Tag::StagedWrite {
                slot,
                lease,
                buf,
                domain,
                len,
            } => {
                let s = &self.shared.stats[domain as usize];
                s.write_ops.fetch_add(1, Ordering::Relaxed);
                s.bytes_written.fetch_add(len as u64, Ordering::Relaxed);
                self.free_send.push(buf);
                self.done(slot, lease, None, Ok(()));
            }
            Tag::Free => {}
        }
    }

    /// A message arrived in receive buffer `buf` of `domain` (`len` as the provider reports it,
    /// which may be 0: the header says how long the body is).
    fn on_message(&mut self, domain: u8, buf: u32, _len: usize) {
        let (p, size) = self.msg_buf(buf as usize);
        // SAFETY: the provider wrote the message into this receive buffer of `size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
        let header = Header::decode(bytes).filter(|h| h.len as usize <= size - HEADER);
        match header {
            Some(h) if h.kind == KIND_USER => {
                let msg = bytes[HEADER..HEADER + h.len as usize].to_vec();
                self.shared.messages.push(msg);
            }
            Some(h) if h.kind == KIND_CTRL => {
                let ctrl = Ctrl::decode(&bytes[HEADER..HEADER + h.len as usize]);
                // The body is decoded: the buffer goes back before the answer is sent.
                if let Err(e) = self.post_recv(domain as usize, buf) {
                    eprintln!("stolon: cannot repost receive buffer: {e}");
                }
                match ctrl {
                    Some(c) => self.on_ctrl(domain, h.writer, c),
                    None => {
                        self.shared.stats[domain as usize]
                            .errors
                            .fetch_add(1, Ordering::Relaxed);
                    }
                }
                return;
            }
            Some(h) if h.kind == KIND_STAGED => {
                let dst = self
                    .staged_regions
                    .get(&h.region)
                    .and_then(|&(base, rlen)| {
                        let end = h.offset.checked_add(h.len as u64)?;
                        (end <= rlen as u64).then_some(match base {
                            Mem::Host(b) => Mem::Host(b + h.offset as usize),
                            Mem::Gpu(b) => Mem::Gpu(b + h.offset),
                        })
                    });
                if let Some(dst) = dst {
                    let src = Mem::Host(p as usize + HEADER);
                    // SAFETY: the destination range lies inside a registered staged region
                    // (checked above); the receive buffer is not reposted until the copy is done.
                    match unsafe { self.copier.copy(dst, src, h.len as usize) } {
                        Ok(ticket) => {
                            let after = AfterCopy::Landed {
                                domain,
                                buf,
                                imm: h.imm,
                                region: h.region,
                                writer: h.writer,
                                token: h.token,
                            };
                            self.copies.push_back((ticket, after));
                            return;
                        }
                        Err(e) => eprintln!("stolon: staged copy failed: {e}"),
                    }
                    self.shared.stats[domain as usize]
                        .errors
                        .fetch_add(1, Ordering::Relaxed);
                } else {
                    self.refused(
                        domain,
                        h.region,
                        &format!(
                            "a staged chunk [{}, +{}) is not inside a registered staged region",
                            h.offset, h.len
                        ),
                    );
                }
                self.answer_landed(h.writer, h.token, h.region, false);
            }
            _ => {
                self.shared.stats[domain as usize]
                    .errors
                    .fetch_add(1, Ordering::Relaxed);
            }
        }
        if let Err(e) = self.post_recv(domain as usize, buf) {
            self.shared.stats[domain as usize]
                .errors
                .fetch_add(1, Ordering::Relaxed);
            eprintln!("stolon: cannot repost receive buffer: {e}");
        }
    }

    fn on_error(&mut self, d: usize, e: CqError) {
        self.shared.stats[d].errors.fetch_add(1, Ordering::Relaxed);
        if e.op_context.is_null() {
            return;
        }
        let Some(tag) = self.take_ctx(e.op_context) else {
            return;
        };
        let err = Error::TransferFailed(e.message);
        match tag {
            Tag::Transfer {
                slot,
                lease,
                region,
                ..
            } => self.done(slot, lease, Some(region), Err(err)),
            Tag::Triggered { lease, region, .. } => {
                self.done(TRIGGERED, lease, Some(region), Err(err))
            }
            Tag::Send {
                slot: CTRL,
                buf,
                token,
                ..
            } => {
                self.free_send.push(buf);
                self.ctrl_failed(u32::MAX, token, err);
            }
            Tag::Send {
                slot,
                lease,
                buf,
                token,
                ..
            } => {
                self.free_send.push(buf);
                // Done now, unless the owner's answer already completed it.
                if token == 0 || self.awaiting_landed.remove(&token).is_some() {
                    self.done(slot, lease, None, Err(err));
                }
            }
            Tag::StagedWrite {
                slot, lease, buf, ..
            } => {
                self.free_send.push(buf);
                self.done(slot, lease, None, Err(err));
            }
            Tag::Recv { domain, buf } => {
                // Canceled at shutdown, or a receive error: repost unless we are stopping.
                if e.err != fi::FI_ECANCELED {
                    let _ = self.post_recv(domain as usize, buf);
                }
            }
            Tag::Free => {}
        }
    }

    /// Queues a control message to `peer`; sent as soon as a send buffer is free.
    fn send_ctrl(&mut self, peer: u32, msg: Ctrl) {
        self.ctrl_out.push_back(CtrlOut {
            peer,
            body: msg.encode(),
            lease: None,
            since: Instant::now(),
        });
        self.flush_ctrl();
    }

    /// Sends queued control messages while send buffers last; true if any was sent. A message
    /// its peer's queue refuses ("again") waits behind the others, not in front of them (a dead
    /// peer must not hold up the answers to live ones), and is dropped after the revoke
    /// timeout; messages to peers that said `Bye` are dropped.
    fn flush_ctrl(&mut self) -> bool {
        let mut sent = false;
        for _ in 0..self.ctrl_out.len() {
            let Some(m) = self.ctrl_out.pop_front() else {
                break;
            };
            let token = m.lease.map_or(0, |l| l as u64 + 1);
            if self.gone.contains(&m.peer) {
                self.ctrl_failed(m.peer, token, peer_stopped(m.peer));
                continue;
            }
            let Some(buf) = self.free_send.pop() else {
                self.ctrl_out.push_front(m);
                break;
            };
            let p = self.send_buf(buf);
            // SAFETY: p is a send buffer of HEADER + max_message bytes; control bodies are far
            // below max_message (a descriptor and an address, or at most MAX_LANDED entries).
            unsafe {
                let mut h = Header::message(KIND_CTRL, m.body.len());
                h.writer = self.shared.engine_id;
                h.encode(std::slice::from_raw_parts_mut(p, HEADER));
                std::ptr::copy_nonoverlapping(m.body.as_ptr(), p.add(HEADER), m.body.len());
            }
            let op = Op {
                domain: 0,
                peer: m.peer,
                kind: OpKind::Send,
                lease: NO_LEASE,
                delivered: false,
            };
            // A lease request's send carries the lease (+1) as its token, so a failed send
            // fails the writes waiting for it.
            match self.post_from_send_buf(op, CTRL, buf, m.body.len(), token) {
                Ok(true) => sent = true,
                Ok(false) if m.since.elapsed() < self.cfg.revoke_timeout => {
                    // The buffer was released; try again after the others.
                    self.ctrl_out.push_back(m);
                }
                Ok(false) => self.ctrl_failed(
                    m.peer,
                    token,
                    Error::TransferFailed(format!(
                        "peer {} took no message for {:?}",
                        m.peer, self.cfg.revoke_timeout
                    )),
                ),
                Err(e) => self.ctrl_failed(m.peer, token, e),
            }
        }
        sent
    }

    /// A control message could not be sent: a lease request fails the writes waiting for it
    /// (the next write asks again); anything else is logged.
    fn ctrl_failed(&mut self, peer: u32, token: u64, e: Error) {
        let Some(l) = token
            .checked_sub(1)
            .and_then(|i| self.leases.get_mut(i as usize))
        else {
            eprintln!("stolon: a control message to peer {peer} failed: {e}");
            return;
        };
        if !matches!(l.state, LeaseState::Requested { .. }) {
            return;
        }
        l.state = LeaseState::New;
        for p in std::mem::take(&mut l.parked) {
            self.op_done(p.op, p.slot, Err(e.clone()));
        }
    }

    /// Queues the `Landed` answer for a staged chunk whose writer asked for one.
    fn answer_landed(&mut self, writer: u64, token: u64, region: u64, ok: bool) {
        if token == 0 {
            return;
        }
        match self.peer_of_engine.get(&writer) {
            Some(&peer) => self.landed_out.entry(peer).or_default().push((token, ok)),
            None => eprintln!(
                "stolon: cannot answer a staged chunk for region {region}: its writer holds no \
                 lease here"
            ),
        }
    }

    /// Sends the `Landed` answers gathered in this loop, one message per writer.
    fn flush_landed(&mut self) {
        let out = std::mem::take(&mut self.landed_out);
        for (peer, entries) in out {
            for chunk in entries.chunks(MAX_LANDED) {
                self.send_ctrl(
                    peer,
                    Ctrl::Landed {
                        entries: chunk.to_vec(),
                    },
                );
            }
        }
    }

    /// Counts a write this engine refused (stats) and logs the first refusal per region.
    fn refused(&mut self, domain: u8, region: u64, why: &str) {
        self.shared.stats[domain as usize]
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        if self.logged_refusals.insert(region) {
            eprintln!("stolon: refused a write into region {region}: {why} (logged once)");
        }
    }

    /// A control message from the engine `from`.
    fn on_ctrl(&mut self, domain: u8, from: u64, c: Ctrl) {
        match c {
            Ctrl::LeaseReq {
                lease,
                region,
                desc,
                writer,
            } => {
                let Ok(addr) = crate::desc::PeerAddr::from_bytes(&writer) else {
                    self.refused(domain, region, "the writer's address does not decode");
                    return;
                };
                let peer = self.shared.peer_id(&addr);
                self.add_peer(peer, &addr);
                self.peer_of_engine.insert(addr.engine_id, peer);
                let verdict = match self.shared.published.lock().unwrap().get(&region) {
                    None => Err(format!(
                        "region {region} is not registered (unregistered, or never registered \
                         by this engine)"
                    )),
                    Some(mine) if *mine != desc => Err(format!(
                        "the descriptor does not match region {region}'s registration (its \
                         length, keys or addresses differ)"
                    )),
                    Some(_) => Ok(()),
                };
                let answer = match verdict {
                    Ok(()) => {
                        self.holders.entry(region).or_default().insert(peer);
                        Ctrl::LeaseOk { lease }
                    }
                    Err(reason) => {
                        self.refused(domain, region, &reason);
                        Ctrl::LeaseRefused { lease, reason }
                    }
                };
                self.send_ctrl(peer, answer);
            }
            Ctrl::LeaseOk { lease } => self.lease_answered(lease, None),
            Ctrl::LeaseRefused { lease, reason } => {
                self.lease_answered(lease, Some(Error::Rejected(reason)))
            }
            Ctrl::Revoke { region } => {
                let Some(peer) = self.shared.peer_of_engine(from) else {
                    return;
                };
                let leases = self
                    .leases_of
                    .get(&(peer, region))
                    .cloned()
                    .unwrap_or_default();
                for i in leases {
                    let l = &mut self.leases[i as usize];
                    if matches!(l.state, LeaseState::Closed(_)) {
                        continue;
                    }
                    l.state = LeaseState::Revoking;
                    let parked = std::mem::take(&mut l.parked);
                    for p in parked {
                        let e = Error::Rejected(format!("region {region} was unregistered"));
                        self.op_done(p.op, p.slot, Err(e));
                    }
                    // With nothing in flight the answer goes now (release_lease sends it).
                    self.maybe_ack_revoke(i);
                }
            }
            Ctrl::RevokeAck { region } => {
                let Some(&peer) = self.peer_of_engine.get(&from) else {
                    return;
                };
                for r in self.revocations.iter_mut().filter(|r| r.id == region) {
                    r.waiting.remove(&peer);
                }
            }
            Ctrl::Bye => {
                if let Some(peer) = self.shared.peer_of_engine(from) {
                    self.peer_gone(peer);
                }
            }
            Ctrl::Landed { entries } => {
                for (token, ok) in entries {
                    let Some((slot, lease)) = self.awaiting_landed.remove(&token) else {
                        continue;
                    };
                    let r = if ok {
                        Ok(())
                    } else {
                        Err(Error::Rejected(
                            "the owner refused a staged chunk (region unregistered or out of \
                             range)"
                                .into(),
                        ))
                    };
                    self.done(slot, lease, None, r);
                }
            }
        }
    }

    /// Peer `peer` stopped (it said `Bye`): its leases close, transfers to it fail now, no
    /// revocation waits for it.
    fn peer_gone(&mut self, peer: u32) {
        self.gone.insert(peer);
        let err = peer_stopped(peer);
        let leases: Vec<u32> = self
            .leases_of
            .iter()
            .filter(|((p, _), _)| *p == peer)
            .flat_map(|(_, v)| v.iter().copied())
            .collect();
        for i in leases {
            let l = &mut self.leases[i as usize];
            l.state = LeaseState::Closed(err.clone());
            for p in std::mem::take(&mut l.parked) {
                self.op_done(p.op, p.slot, Err(err.clone()));
            }
        }
        for a in self.active.iter_mut().flatten() {
            if !a.reported && a.peers.contains(&peer) {
                a.reported = true;
                a.state.complete(Err(err.clone()));
            }
        }
        for h in self.holders.values_mut() {
            h.remove(&peer);
        }
        for r in &mut self.revocations {
            r.waiting.remove(&peer);
        }
    }

    /// The owner answered lease `lease`: post what was parked, or fail it with `refusal`.
    fn lease_answered(&mut self, lease: u32, refusal: Option<Error>) {
        let Some(l) = self.leases.get_mut(lease as usize) else {
            return;
        };
        if !matches!(l.state, LeaseState::Requested { .. } | LeaseState::New) {
            return;
        }
        let parked = std::mem::take(&mut l.parked);
        match refusal {
            None => {
                l.state = LeaseState::Granted;
                for p in parked {
                    self.post_or_queue_counted(p.op, p.slot);
                }
            }
            Some(e) => {
                l.state = LeaseState::Closed(e.clone());
                for p in parked {
                    self.op_done(p.op, p.slot, Err(e.clone()));
                }
            }
        }
    }

    /// One op of lease `lease` finished: a revoked lease answers once nothing is in flight.
    fn release_lease(&mut self, lease: u32) {
        let Some(l) = self.leases.get_mut(lease as usize) else {
            return;
        };
        l.inflight = l.inflight.saturating_sub(1);
        self.maybe_ack_revoke(lease);
    }

    /// Answers the owner's `Revoke` for lease `lease` once nothing of it is in flight, and
    /// drops the NVLink mapping of the region (no copy can use it any more).
    fn maybe_ack_revoke(&mut self, lease: u32) {
        let l = &mut self.leases[lease as usize];
        if !matches!(l.state, LeaseState::Revoking) || l.inflight > 0 {
            return;
        }
        let (peer, region) = (l.peer, l.region);
        l.state = LeaseState::Closed(Error::Rejected(format!(
            "region {region} of the peer was unregistered"
        )));
        // Every lease on (peer, region) must be drained before the one answer.
        let all_drained = self.leases_of[&(peer, region)]
            .iter()
            .all(|&i| !matches!(self.leases[i as usize].state, LeaseState::Revoking));
        if !all_drained {
            return;
        }
        if let Some(rg) = self.remote_gpu.remove(&(peer, region)) {
            self.retire(rg);
        }
        self.send_ctrl(peer, Ctrl::RevokeAck { region });
    }

    /// Starts unregistering region `id`: no new lease, `Revoke` to every holder; the region is
    /// closed by [`Self::finish_revocations`].
    fn start_revocation(
        &mut self,
        id: u64,
        owner: Option<Box<dyn std::any::Any + Send + Sync>>,
        reply: Option<std::sync::mpsc::SyncSender<Result<()>>>,
    ) {
        self.shared.published.lock().unwrap().remove(&id);
        if let Some(r) = self.revocations.iter_mut().find(|r| r.id == id) {
            // Already being unregistered (explicitly, then dropped): close it once, then.
            if owner.is_some() {
                r.owner = owner;
            }
            r.replies.extend(reply);
            return;
        }
        if !self.regions.contains_key(&id) && !self.staged_regions.contains_key(&id) {
            // Already closed (an explicit unregister, then the drop): nothing can write it.
            drop(owner);
            if let Some(r) = reply {
                let _ = r.send(Ok(()));
            }
            return;
        }
        let waiting = self.holders.remove(&id).unwrap_or_default();
        for &peer in &waiting {
            self.send_ctrl(peer, Ctrl::Revoke { region: id });
        }
        self.revocations.push(Revocation {
            id,
            waiting,
            deadline: Instant::now() + self.cfg.revoke_timeout,
            owner,
            replies: reply.into_iter().collect(),
        });
        self.finish_revocations(Instant::now());
    }

    /// Closes the regions whose holders have all answered (or timed out) and that no local op
    /// reads any more; staged regions also wait for copies into them to finish.
    fn finish_revocations(&mut self, now: Instant) {
        let mut i = 0;
        while i < self.revocations.len() {
            let r = &self.revocations[i];
            let answered = r.waiting.is_empty() || now >= r.deadline;
            // No local write reads it, and no staged copy can still be writing into it.
            let copying = self.staged_regions.contains_key(&r.id) && !self.copies.is_empty();
            let unused = !self.local_inflight.contains_key(&r.id) && !copying;
            if !(answered && unused) {
                i += 1;
                continue;
            }
            let r = self.revocations.swap_remove(i);
            if !r.waiting.is_empty() {
                eprintln!(
                    "stolon: unregistering region {}: {} lease holder(s) did not answer within \
                     {:?}; closing it anyway",
                    r.id,
                    r.waiting.len(),
                    self.cfg.revoke_timeout
                );
            }
            let result = self.close_region(r.id);
            drop(r.owner);
            for reply in r.replies {
                let _ = reply.send(result.clone());
            }
        }
    }

    /// Closes a region's registrations (every domain) and its staged entry.
    fn close_region(&mut self, id: u64) -> Result<()> {
        self.staged_regions.remove(&id);
        let mut result = Ok(());
        if let Some(mrs) = self.regions.remove(&id) {
            for (d, mr) in mrs.into_iter().enumerate() {
                if let Err(e) = self.domains[d].close_mr(mr) {
                    result = Err(e);
                }
            }
        }
        result
    }

    /// Reads every watched counter; returns true if any changed.
    fn poll_watches(&mut self) -> bool {
        let mut changed = false;
        for i in 0..self.watches.len() {
            let now = self.watches[i].load();
            let old = self.watches[i].last;
            if now == old {
                continue;
            }
            changed = true;
            self.watches[i].last = now;
            if let Some(cb) = &self.watches[i].callback {
                cb(old, now);
            }
            self.release_steps(i, old, now);
        }
        changed
    }

    /// Submits the steps of watch `i` that are due at counter value `now`.
    fn release_steps(&mut self, i: usize, _old: u64, now: u64) {
        while self.watches[i].next_step <= now {
            let Some(mut req) = self.watches[i].steps.pop_front() else {
                break;
            };
            self.watches[i].next_step += 1;
            req.deadline = Instant::now() + req.timeout;
            self.start_transfer(req);
        }
    }

    /// Posts a trigger's prepared ops for an arrival of `imm`; returns false if none is set.
    fn fire_trigger(&mut self, imm: u32) -> bool {
        // Taken out while its ops are posted (posting needs the whole worker), then put back
        // unless this was its last firing: no copy of the ops on this path.
        let Some(mut t) = self.triggers.remove(&imm) else {
            return false;
        };
        t.times -= 1;
        for &op in &t.ops {
            self.post_or_queue(op, TRIGGERED);
        }
        if t.times > 0 {
            self.triggers.insert(imm, t);
        }
        true
    }

    fn check_deadlines(&mut self, now: Instant) {
        for a in self.active.iter_mut().flatten() {
            if !a.reported && a.deadline <= now {
                a.reported = true;
                a.state.complete(Err(Error::Timeout(a.timeout)));
            }
        }
        let _ = &self.waiting_sends;
    }

    fn shutdown(&mut self) {
        for a in self.active.iter_mut().flatten() {
            if !a.reported {
                a.reported = true;
                a.state.complete(Err(Error::Stopped));
            }
        }
        for w in self.watches.drain(..) {
            for req in w.steps {
                req.state.complete(Err(Error::Stopped));
            }
        }
        self.shared.imm.stop();
        self.shared.messages.stop();
        // Endpoints first: once closed, nothing a peer sends can land and nothing posted can
        // still read or write; then the registrations; then the memory of regions being
        // unregistered, once no staged copy can touch it.
        let mut domains = std::mem::take(&mut self.domains);
        for (d, dom) in domains.iter_mut().enumerate() {
            if let Err(e) = dom.close_endpoint() {
                eprintln!("stolon: closing the endpoint of domain {d}: {e}");
            }
        }
        for (id, mrs) in self.regions.drain() {
            for (d, mr) in mrs.into_iter().enumerate() {
                if let Err(e) = domains[d].close_mr(mr) {
                    eprintln!("stolon: closing region {id} on domain {d}: {e}");
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some((ticket, _)) = self.copies.front() {
            if matches!(ticket.is_done(), Ok(false)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            self.copies.pop_front();
        }
        for r in self.revocations.drain(..) {
            drop(r.owner);
            for reply in r.replies {
                let _ = reply.send(Ok(()));
            }
        }
        domains.clear();
        self.active.clear();
        self.pending.clear();
        self.n_pending = 0;
    }
}

/// The error of transfers to a peer that stopped.
fn peer_stopped(peer: u32) -> Error {
    Error::TransferFailed(format!("peer {peer} stopped its engine"))
}

fn cq_entry_buffer(n: usize) -> Vec<fi::fi_cq_data_entry> {
    (0..n)
        .map(|_| fi::fi_cq_data_entry {
            op_context: std::ptr::null_mut(),
            flags: 0,
            len: 0,
            buf: std::ptr::null_mut(),
            data: 0,
        })
        .collect()
}

#[cfg(target_os = "linux")]
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) affects
    // only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("stolon: could not pin worker to CPU {cpu}");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_to_cpu(_cpu: usize) {}
