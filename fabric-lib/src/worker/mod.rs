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
use crate::domain_types::{CqError, Posted};
use crate::error::{Error, Result};
use crate::lease::{Ctrl, MAX_LANDED, NO_LEASE};
use crate::shared::Shared;
use crate::staging::{Copier, Header, Mem, Ticket, HEADER, KIND_CTRL, KIND_STAGED, KIND_USER};
use crate::sys::libfabric::{self as fi, fi_addr_t};
use crate::transfer::TransferState;

mod complete;
mod control;
mod group;
mod idle;
mod post;
mod run;
mod watch;

use control::{CtrlOut, Lease, LeaseState, Revocation};
use group::DomainGroup;
use idle::{Doorbell, Woke};

/// The worker's message buffers: an anonymous mapping of its own, so closing an engine gives
/// the memory back to the system at once (a heap block of this size, freed from the worker's
/// thread, stays in that thread's malloc arena: engines opened and closed in a loop grew a
/// process by gigabytes).
pub(crate) struct MsgMem {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: MsgMem owns its mapping exclusively; it is plain memory, usable from any thread.
unsafe impl Send for MsgMem {}

impl MsgMem {
    fn new(len: usize) -> Result<Self> {
        // SAFETY: an anonymous private mapping; no pointer is passed in.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len.max(1),
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(Error::Config(format!(
                "cannot map {len} bytes of message buffers: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(MsgMem {
            ptr: p.cast(),
            len: len.max(1),
        })
    }

    fn as_ptr(&self) -> *const u8 {
        self.ptr
    }
}

impl Drop for MsgMem {
    fn drop(&mut self) {
        // SAFETY: ptr/len are the mapping made in `new`, unmapped once.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// What keeps a transfer's local regions (and their memory) alive until its ops finish.
pub(crate) type KeepAlive = Arc<dyn std::any::Any + Send + Sync>;

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
    pub keep: Vec<KeepAlive>,
    pub payload: Option<Vec<u8>>,
}

pub(crate) struct Trigger {
    pub imm: u32,
    pub times: u64,
    pub ops: Vec<Op>,
    /// Keeps the source region alive while the trigger is armed.
    pub _keep: Vec<KeepAlive>,
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
    /// A write from local region `region` (slot `TRIGGERED` for an op fired by a trigger).
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
    _keep: Vec<KeepAlive>,
    payload: Option<Vec<u8>>,
}

struct Pending {
    op: Op,
    slot: u32,
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
    /// The endpoints this worker drives and the ops they could not take yet.
    group: DomainGroup,
    rx: Receiver<Request>,
    shared: Arc<Shared>,
    cfg: WorkerConfig,
    /// Operation contexts, in fixed-address chunks: a pointer from a completion is accepted only
    /// if it points at one of these entries (providers have been seen to report contexts they
    /// were never given).
    ctxs: Vec<Box<[OpCtx]>>,
    n_ctx: usize,
    free_ctx: Vec<u32>,
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
    msg_mem: MsgMem,
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
    /// While stopping: peers that have not answered this engine's `Bye` yet.
    bye_waiting: HashSet<u32>,
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
        specs: &[crate::domain_types::DomainSpec],
        rx: Receiver<Request>,
        shared: Arc<Shared>,
        cfg: WorkerConfig,
    ) -> Result<(
        Self,
        Vec<crate::desc::DomainAddr>,
        Vec<crate::domain_types::DomainAttrs>,
    )> {
        let mut domains = Vec::with_capacity(specs.len());
        for s in specs {
            domains.push(Domain::open(s, HEADER + cfg.max_message)?);
        }
        let nd = domains.len();
        let buf_size = HEADER + cfg.max_message;
        let msg_len = SCRATCH + (nd * cfg.recv_buffers + cfg.send_buffers) * buf_size;
        let msg_mem = MsgMem::new(msg_len)?;
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
            group: DomainGroup::new(domains),
            rx,
            shared,
            ctxs: Vec::new(),
            n_ctx: 0,
            free_ctx: Vec::new(),
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
            bye_waiting: HashSet::new(),
            doorbell: None,
            cq_entries: cq_entry_buffer(64),
            cfg,
        };
        if !w.group.all_wait_fds() {
            w.doorbell = Doorbell::bind(w.shared.engine_id);
        }
        let ptr = w.msg_mem.as_ptr() as usize;
        let keys = w.register(INTERNAL_REGION, ptr, msg_len)?;
        let mut addrs = Vec::with_capacity(nd);
        let mut attrs = Vec::with_capacity(nd);
        for (d, dom) in w.group.iter().enumerate() {
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
        let mut mrs = Vec::with_capacity(self.group.len());
        let key = self.shared.next_key.fetch_add(1, Ordering::Relaxed);
        for d in 0..self.group.len() {
            match reg(&mut self.group[d], key) {
                Ok(mr) => mrs.push(mr),
                Err(e) => {
                    for (dd, mr) in mrs.into_iter().enumerate() {
                        let _ = self.group[dd].close_mr(mr);
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
        let index = self.group.len() * self.cfg.recv_buffers + buf as usize;
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
            match unsafe { self.group[d].post_recv(p as *mut u8, len, desc, ctx) } {
                Ok(Posted::Yes) => return Ok(()),
                Ok(Posted::Again) => {
                    self.poll_domain(d);
                }
                Err(e) => return Err(e),
            }
        }
    }

    /// Adds a peer to every domain's address vector (once: the engine and the lease protocol
    /// may both introduce the same peer).
    fn add_peer(&mut self, id: u32, addr: &PeerAddr) {
        if self.peers.contains_key(&id) {
            return;
        }
        let r = self.group.len();
        let mut addrs = Vec::with_capacity(r);
        let mut err = None;
        for d in 0..r {
            let remote = &addr.domains[d % addr.domains.len()];
            match self.group[d].insert_addr(&remote.name) {
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
                    self.group[d].remove_addr(a);
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
