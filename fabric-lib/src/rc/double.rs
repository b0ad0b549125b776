//! **A test double, not hardware.** An in-memory stand-in for stolon-verbs' device layer
//! (`VerbsDomain`), used because no machine available to the project has an RDMA device and
//! their kernels have no soft-RoCE, so the hardware path cannot run here. It exists only in test
//! builds (provider name `verbs-double`) and nothing here exercises libibverbs, a NIC, PSNs,
//! RNR, MTUs, GID/LID addressing or memory ordering on a real fabric.
//!
//! What it does model, so that the worker-side integration can be tested:
//! * The handshake is the real [`stolon_verbs::handshake::Handshake`], carried out exactly as
//!   `VerbsDomain::apply` does (connect, teardown, give up), and every `Connect` is turned into
//!   the real RTR/RTS attributes ([`stolon_verbs::handshake::Connect::attrs`]), so a message
//!   the QP transitions would refuse fails here too.
//! * RC pairing: a write or message reaches the peer only if the peer's QP exists (its process
//!   is alive) and is connected back to the sender's QP; otherwise it fails as on hardware when
//!   transport retries run out ([`VError::PeerUnreachable`]), the sender's QPs go to error and
//!   the handshake tears down and reconnects (or gives up).
//! * Posting before the connection is established is refused ([`VError::NotConnected`]).
//! * Remote keys and bounds are checked against the target's registrations
//!   ([`VError::RemoteAccess`]); bytes are really copied.
//! * A small send queue gives back-pressure, accounted as the device layer does under selective
//!   signalling ([`SendQueue`]: every [`SIGNAL_EVERY`]th WR of a chain and its last are
//!   signalled; a signalled completion frees the WRs it covers); a chain's WRs land in order
//!   and the first failing one ends it; completions appear only when polled, shuffled between
//!   transfers.
//! * A failed transfer is first reported un-drained, then drained at teardown, as the device
//!   layer's transfer table does.
//!
//! Faults are injected per device name (the domain spec's interface) through [`set_faults`].

use std::collections::{HashMap, HashSet};
use std::sync::{Arc, Mutex, OnceLock, Weak};
use std::time::{Duration, Instant};

use stolon_verbs::completion::{Finished, TransferId};
use stolon_verbs::domain::{DomainEvent, PeerId};
use stolon_verbs::gid::{Gid, LinkLayer};
use stolon_verbs::handshake::{self, Action, Handshake, HandshakeConfig, LocalStatic, Phase, Step};
use stolon_verbs::qp::{LocalPath, Mtu, QpConfig};
use stolon_verbs::wr::{SendQueue, WriteSeg};
use stolon_verbs::Error as VError;

use super::{Device, RcMr};
use crate::domain_types::DomainSpec;
use crate::error::Result;

/// Provider name that selects this double (test builds only).
pub(crate) const PROVIDER: &str = "verbs-double";
/// Send-queue depth per peer: small, so back-pressure happens in tests.
const DEPTH: u32 = 8;
/// Every how many WRs of a chain one is signalled (the device layer's `signal_every`).
pub(crate) const SIGNAL_EVERY: u32 = 4;

/// Handshake timers of the double: fast, so retries and giving up happen within a test.
pub(crate) fn handshake_config() -> HandshakeConfig {
    HandshakeConfig {
        retry_initial: Duration::from_millis(20),
        retry_max: Duration::from_millis(200),
        give_up_after: Duration::from_millis(1500),
    }
}

/// Faults a test asks a device of the double for.
#[derive(Clone, Copy, Debug, Default)]
pub(crate) struct Faults {
    /// Outgoing handshake datagrams to lose.
    pub lose_datagrams: u32,
    /// Writes to fail as if transport retries ran out (the QP then goes to error).
    pub fail_writes: u32,
    /// libibverbs without `ibv_reg_dmabuf_mr` (rdma-core older than 34).
    pub no_dmabuf: bool,
    /// The kernel refuses dma-buf registrations (`EOPNOTSUPP`).
    pub refuse_dmabuf: bool,
    /// No nvidia-peermem: registering a GPU address fails (`EFAULT`).
    pub no_peermem: bool,
    /// The next chain of more than `k` WRs fails at WR `k` (its earlier WRs land); one-shot.
    pub fail_chain_at: Option<u32>,
}

/// What a device of the double did (per device name), for exact counts in tests.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub(crate) struct DoubleStats {
    /// Chained posts of writes.
    pub chains: u64,
    /// Write WRs posted.
    pub write_wrs: u64,
    /// Successful completions of signalled write WRs (each covers itself and the unsignalled
    /// WRs before it).
    pub signalled_cqes: u64,
    /// Error completions.
    pub error_cqes: u64,
}

fn stats_map() -> &'static Mutex<HashMap<String, DoubleStats>> {
    static S: OnceLock<Mutex<HashMap<String, DoubleStats>>> = OnceLock::new();
    S.get_or_init(Default::default)
}

/// The counts of every device of the double opened with interface `name`.
pub(crate) fn stats(name: &str) -> DoubleStats {
    stats_map()
        .lock()
        .unwrap()
        .get(name)
        .copied()
        .unwrap_or_default()
}

fn faults() -> &'static Mutex<HashMap<String, Faults>> {
    static F: OnceLock<Mutex<HashMap<String, Faults>>> = OnceLock::new();
    F.get_or_init(Default::default)
}

/// Sets the faults of every device of the double opened with interface `name`.
pub(crate) fn set_faults(name: &str, f: Faults) {
    faults().lock().unwrap().insert(name.to_string(), f);
}

/// What peers can reach of a device: its registrations and its inbox.
#[derive(Default)]
struct Target {
    /// key -> (address, length)
    mrs: HashMap<u32, (usize, usize)>,
    inbox: Vec<DomainEvent>,
}

/// A QP of the double, as peers see it.
struct QpEntry {
    owner: Weak<Mutex<Target>>,
    /// The owner's peer id for the other side.
    peer: PeerId,
    /// The remote QP it is connected to (RTR/RTS), if any.
    connected_to: Option<u32>,
}

fn qps() -> &'static Mutex<HashMap<u32, QpEntry>> {
    static Q: OnceLock<Mutex<HashMap<u32, QpEntry>>> = OnceLock::new();
    Q.get_or_init(Default::default)
}

fn next_number() -> u32 {
    static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0x100);
    N.fetch_add(1, std::sync::atomic::Ordering::Relaxed) & 0xff_ffff
}

/// Removes the registration when dropped.
struct MrGuard {
    target: Arc<Mutex<Target>>,
    key: u32,
}

impl Drop for MrGuard {
    fn drop(&mut self) {
        self.target.lock().unwrap().mrs.remove(&self.key);
    }
}

enum OpKind {
    /// A chain of writes, each with its immediate, and the completions each WR asks for
    /// (selective signalling: 0 = unsignalled).
    Writes {
        wrs: Vec<(WriteSeg, Option<u32>)>,
        covers: Vec<u16>,
    },
    Send {
        data: Vec<u8>,
    },
}

struct Op {
    id: TransferId,
    peer: PeerId,
    kind: OpKind,
}

/// One WR as delivered.
#[derive(Clone, Copy)]
enum Wr<'a> {
    Write { seg: WriteSeg, imm: Option<u32> },
    Send { data: &'a [u8] },
}

struct DPeer {
    hs: Handshake,
    data_qpn: u32,
    msg_qpn: u32,
    data_sq: SendQueue,
    msg_sq: SendQueue,
    /// Transfers reported failed but not yet drained.
    undrained: HashSet<TransferId>,
}

/// One device of the double.
pub(crate) struct MemDevice {
    name: String,
    target: Arc<Mutex<Target>>,
    peers: HashMap<PeerId, DPeer>,
    ops: Vec<Op>,
    next_slot: u32,
    next_epoch: u64,
    rng: handshake::Rng,
    max_message: usize,
    /// dma-buf registrations accepted.
    dmabuf_regs: u64,
}

impl MemDevice {
    pub(crate) fn open(spec: &DomainSpec, max_message: usize) -> Result<Self> {
        Ok(MemDevice {
            name: spec.interface.clone().unwrap_or_else(|| "double".into()),
            target: Arc::new(Mutex::new(Target::default())),
            peers: HashMap::new(),
            ops: Vec::new(),
            next_slot: 0,
            next_epoch: 1,
            rng: handshake::Rng::new(handshake::os_seed()),
            max_message,
            dmabuf_regs: 0,
        })
    }

    /// Whether WR `k` of a chain of `len` fails (the one-shot `fail_chain_at`).
    fn take_chain_fault(&self, k: usize, len: usize) -> bool {
        let mut f = faults().lock().unwrap();
        let Some(x) = f.get_mut(&self.name) else {
            return false;
        };
        match x.fail_chain_at {
            Some(at) if at as usize == k && len > k => {
                x.fail_chain_at = None;
                true
            }
            _ => false,
        }
    }

    fn fault_flag(&self, pick: impl Fn(&Faults) -> bool) -> bool {
        faults().lock().unwrap().get(&self.name).is_some_and(pick)
    }

    fn take_fault(&self, pick: impl Fn(&mut Faults) -> &mut u32) -> bool {
        let mut f = faults().lock().unwrap();
        let Some(x) = f.get_mut(&self.name) else {
            return false;
        };
        let left = pick(x);
        if *left == 0 {
            return false;
        }
        *left -= 1;
        true
    }

    fn ensure_peer(&mut self, peer: PeerId) {
        if self.peers.contains_key(&peer) {
            return;
        }
        let (data_qpn, msg_qpn) = (next_number(), next_number());
        {
            let mut q = qps().lock().unwrap();
            for qpn in [data_qpn, msg_qpn] {
                q.insert(
                    qpn,
                    QpEntry {
                        owner: Arc::downgrade(&self.target),
                        peer,
                        connected_to: None,
                    },
                );
            }
        }
        let local = LocalStatic {
            data_qpn,
            msg_qpn,
            lid: 0,
            gid: Gid([0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0xff, 0xff, 127, 0, 0, 1]),
            mtu: Mtu::M4096,
            link_layer: LinkLayer::Ethernet,
        };
        let epoch = handshake::initial_epoch().max(self.next_epoch);
        self.next_epoch = epoch + (1 << 20);
        let hs = Handshake::new(handshake_config(), local, epoch, self.rng.next_u64());
        self.peers.insert(
            peer,
            DPeer {
                hs,
                data_qpn,
                msg_qpn,
                data_sq: SendQueue::new(DEPTH, SIGNAL_EVERY),
                msg_sq: SendQueue::new(DEPTH, 1),
                undrained: HashSet::new(),
            },
        );
    }

    fn set_connected(&self, peer: PeerId, remote: Option<(u32, u32)>) {
        let Some(p) = self.peers.get(&peer) else {
            return;
        };
        let mut q = qps().lock().unwrap();
        for (qpn, to) in [
            (p.data_qpn, remote.map(|r| r.0)),
            (p.msg_qpn, remote.map(|r| r.1)),
        ] {
            if let Some(e) = q.get_mut(&qpn) {
                e.connected_to = to;
            }
        }
    }

    /// Retires every op of `peer` (its QPs are reset or destroyed), as the transfer table's
    /// `fail_peer` does.
    fn fail_peer(&mut self, peer: PeerId, error: &VError, out: &mut Vec<DomainEvent>) {
        let (mine, rest): (Vec<Op>, Vec<Op>) = std::mem::take(&mut self.ops)
            .into_iter()
            .partition(|o| o.peer == peer);
        self.ops = rest;
        for op in mine {
            out.push(DomainEvent::Finished(Finished {
                id: op.id,
                peer,
                result: Err(error.clone()),
                drained: true,
            }));
        }
        if let Some(p) = self.peers.get_mut(&peer) {
            p.data_sq.reset();
            p.msg_sq.reset();
            for id in p.undrained.drain() {
                out.push(DomainEvent::Drained(id));
            }
        }
    }

    fn drop_peer(&mut self, peer: PeerId, error: VError, out: &mut Vec<DomainEvent>) {
        self.fail_peer(peer, &error, out);
        if let Some(p) = self.peers.remove(&peer) {
            let mut q = qps().lock().unwrap();
            q.remove(&p.data_qpn);
            q.remove(&p.msg_qpn);
        }
        out.push(DomainEvent::GaveUp { peer, error });
    }

    /// Carries out a handshake step as `VerbsDomain::apply` does.
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
                    let err = VError::ConnectionReset {
                        peer,
                        reason: reason.clone(),
                    };
                    self.fail_peer(peer, &err, out);
                    self.set_connected(peer, None);
                    out.push(DomainEvent::ConnectionReset { peer, reason });
                }
                Action::Connect(c) => {
                    let path = LocalPath {
                        link_layer: LinkLayer::Ethernet,
                        active_mtu: Mtu::M4096,
                        sgid_index: 0,
                        use_grh: true,
                    };
                    if let Err(e) = c.attrs(&QpConfig::default(), &path) {
                        self.drop_peer(peer, e, out);
                        return;
                    }
                    self.set_connected(peer, Some((c.remote.data.qpn, c.remote.msg.qpn)));
                }
                Action::Established => out.push(DomainEvent::Established { peer }),
                Action::GiveUp(error) => {
                    self.fail_peer(peer, &error, out);
                    out.push(DomainEvent::GaveUp { peer, error });
                }
            }
        }
    }

    fn local_failure(
        &mut self,
        peer: PeerId,
        why: &VError,
        now: Instant,
        out: &mut Vec<DomainEvent>,
    ) {
        if let Some(p) = self.peers.get_mut(&peer) {
            let step = p.hs.local_failure(now, &why.to_string());
            self.apply(peer, step, out);
        }
    }

    fn count(&self, f: impl FnOnce(&mut DoubleStats)) {
        f(stats_map()
            .lock()
            .unwrap()
            .entry(self.name.clone())
            .or_default());
    }

    fn established(&mut self, peer: PeerId) -> Result<&mut DPeer, VError> {
        let p = self
            .peers
            .get_mut(&peer)
            .ok_or(VError::NotConnected(peer))?;
        if p.hs.phase() != Phase::Established {
            return Err(VError::NotConnected(peer));
        }
        Ok(p)
    }

    fn new_id(&mut self) -> TransferId {
        self.next_slot += 1;
        TransferId {
            slot: self.next_slot,
            generation: 0,
        }
    }

    /// Executes one WR against its target; the error is what the sender's CQ would report.
    fn deliver(&mut self, peer: PeerId, wr: Wr<'_>) -> Result<(), VError> {
        let p = self.peers.get(&peer).ok_or(VError::NotConnected(peer))?;
        let remote = p.hs.peer().copied().ok_or(VError::NotConnected(peer))?;
        let (mine, theirs) = match wr {
            Wr::Write { .. } => (p.data_qpn, remote.data.qpn),
            Wr::Send { .. } => (p.msg_qpn, remote.msg.qpn),
        };
        let unreachable = VError::PeerUnreachable {
            qp_num: mine,
            vendor_err: 0,
        };
        let (target, their_peer) = {
            let q = qps().lock().unwrap();
            let e = q.get(&theirs).ok_or_else(|| unreachable.clone())?;
            if e.connected_to != Some(mine) {
                return Err(unreachable);
            }
            (e.owner.upgrade().ok_or(unreachable)?, e.peer)
        };
        let mut t = target.lock().unwrap();
        match wr {
            Wr::Write { seg, imm } => {
                let dst = t.mrs.get(&seg.rkey).and_then(|&(base, len)| {
                    let off = (seg.remote_addr as usize).checked_sub(base)?;
                    (off.checked_add(seg.len as usize)? <= len).then_some(seg.remote_addr)
                });
                let Some(dst) = dst else {
                    return Err(VError::RemoteAccess {
                        qp_num: mine,
                        vendor_err: 0,
                    });
                };
                if seg.len > 0 {
                    // SAFETY: the source is a registered local range the worker keeps alive
                    // until this op completes; the destination lies inside a registration of
                    // the target (checked above), which cannot be removed while we hold its lock.
                    unsafe {
                        std::ptr::copy(
                            seg.local_addr as *const u8,
                            dst as *mut u8,
                            seg.len as usize,
                        )
                    };
                }
                if let Some(imm) = imm {
                    t.inbox.push(DomainEvent::Imm {
                        peer: Some(their_peer),
                        imm,
                    });
                }
            }
            Wr::Send { data } => t.inbox.push(DomainEvent::Message {
                peer: Some(their_peer),
                data: data.to_vec(),
                imm: None,
            }),
        }
        Ok(())
    }
}

impl Drop for MemDevice {
    fn drop(&mut self) {
        // The process is gone: its QPs no longer answer.
        let mut q = qps().lock().unwrap();
        for p in self.peers.values() {
            q.remove(&p.data_qpn);
            q.remove(&p.msg_qpn);
        }
    }
}

impl Device for MemDevice {
    fn describe(&self) -> String {
        format!("{} (in-memory test double, not hardware)", self.name)
    }

    fn max_msg_size(&self) -> usize {
        1 << 30
    }

    fn queue_depth(&self) -> usize {
        DEPTH as usize
    }

    fn local_ip(&self) -> Option<std::net::IpAddr> {
        Some(std::net::Ipv4Addr::LOCALHOST.into())
    }

    unsafe fn register(&mut self, ptr: *mut u8, len: usize) -> Result<RcMr, VError> {
        let key = next_number();
        self.target
            .lock()
            .unwrap()
            .mrs
            .insert(key, (ptr as usize, len));
        Ok(RcMr {
            lkey: key,
            rkey: key,
            _keep: Box::new(MrGuard {
                target: self.target.clone(),
                key,
            }),
        })
    }

    unsafe fn register_gpu(&mut self, ptr: u64, len: usize) -> Result<RcMr, VError> {
        // "GPU memory" in tests is host memory standing in for it.
        if self.fault_flag(|f| f.no_peermem) {
            return Err(VError::Verbs {
                call: "ibv_reg_mr",
                source: stolon_verbs::error::Errno(libc::EFAULT),
            });
        }
        // SAFETY: forwarded contract.
        unsafe { self.register(ptr as *mut u8, len) }
    }

    fn supports_dmabuf(&self) -> bool {
        !self.fault_flag(|f| f.no_dmabuf)
    }

    unsafe fn register_dmabuf(
        &mut self,
        fd: std::os::fd::BorrowedFd<'_>,
        _offset: u64,
        len: usize,
        iova: u64,
    ) -> Result<RcMr, VError> {
        use std::os::fd::AsRawFd;
        if self.fault_flag(|f| f.no_dmabuf) {
            return Err(VError::Unsupported {
                what: "ibv_reg_dmabuf_mr",
                why: "the double was told libibverbs lacks it".into(),
            });
        }
        // SAFETY: F_GETFD only reads the descriptor's flags.
        let open = unsafe { libc::fcntl(fd.as_raw_fd(), libc::F_GETFD) } >= 0;
        if !open || self.fault_flag(|f| f.refuse_dmabuf) {
            return Err(VError::Verbs {
                call: "ibv_reg_dmabuf_mr",
                source: stolon_verbs::error::Errno(if open {
                    libc::EOPNOTSUPP
                } else {
                    libc::EBADF
                }),
            });
        }
        self.dmabuf_regs += 1;
        // Like the kernel, keep no reference to the descriptor itself: the range is addressed
        // by `iova` (host memory standing in for GPU memory in tests).
        // SAFETY: forwarded contract.
        unsafe { self.register(iova as *mut u8, len) }
    }

    fn connect(&mut self, peer: PeerId, now: Instant) -> Result<Vec<DomainEvent>, VError> {
        self.ensure_peer(peer);
        let step = self.peers.get_mut(&peer).expect("ensured").hs.start(now);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    fn on_handshake(
        &mut self,
        peer: PeerId,
        bytes: &[u8],
        now: Instant,
    ) -> Result<Vec<DomainEvent>, VError> {
        self.ensure_peer(peer);
        let step = self
            .peers
            .get_mut(&peer)
            .expect("ensured")
            .hs
            .on_bytes(now, bytes);
        let mut out = Vec::new();
        self.apply(peer, step, &mut out);
        Ok(out)
    }

    fn tick(&mut self, now: Instant) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        let ids: Vec<PeerId> = self.peers.keys().copied().collect();
        for peer in ids {
            let step = self.peers.get_mut(&peer).expect("listed").hs.on_tick(now);
            self.apply(peer, step, &mut out);
        }
        out
    }

    fn next_deadline(&self) -> Option<Instant> {
        self.peers
            .values()
            .filter_map(|p| p.hs.next_deadline())
            .min()
    }

    fn is_established(&self, peer: PeerId) -> bool {
        self.peers
            .get(&peer)
            .is_some_and(|p| p.hs.phase() == Phase::Established)
    }

    fn disconnect(&mut self, peer: PeerId) -> Vec<DomainEvent> {
        let mut out = Vec::new();
        if self.peers.contains_key(&peer) {
            self.drop_peer(peer, VError::NotConnected(peer), &mut out);
        }
        out
    }

    unsafe fn write_chain(
        &mut self,
        peer: PeerId,
        segs: &[WriteSeg],
        imms: &[Option<u32>],
        _now: Instant,
        _out: &mut Vec<DomainEvent>,
    ) -> Result<Option<(TransferId, usize)>, VError> {
        if segs.is_empty() || segs.len() != imms.len() {
            return Err(VError::InvalidArgument(format!(
                "{} segments with {} immediates",
                segs.len(),
                imms.len()
            )));
        }
        {
            let t = self.target.lock().unwrap();
            for seg in segs {
                // A zero-length write (an immediate only) has no local memory.
                let known = seg.len == 0
                    || t.mrs.get(&seg.lkey).is_some_and(|&(base, len)| {
                        (seg.local_addr as usize)
                            .checked_sub(base)
                            .and_then(|o| o.checked_add(seg.len as usize))
                            .is_some_and(|end| end <= len)
                    });
                if !known {
                    return Err(VError::InvalidArgument(format!(
                        "local range {:#x}+{} is not registered under lkey {:#x}",
                        seg.local_addr, seg.len, seg.lkey
                    )));
                }
            }
        }
        let p = self.established(peer)?;
        let n = (p.data_sq.free() as usize).min(segs.len());
        if n == 0 {
            return Ok(None);
        }
        let adm = p.data_sq.admit(n);
        let id = self.new_id();
        self.count(|s| {
            s.chains += 1;
            s.write_wrs += n as u64;
        });
        self.ops.push(Op {
            id,
            peer,
            kind: OpKind::Writes {
                wrs: segs[..n]
                    .iter()
                    .copied()
                    .zip(imms[..n].iter().copied())
                    .collect(),
                covers: adm.covers,
            },
        });
        Ok(Some((id, n)))
    }

    fn send_one(
        &mut self,
        peer: PeerId,
        data: &[u8],
        _now: Instant,
        _out: &mut Vec<DomainEvent>,
    ) -> Result<Option<TransferId>, VError> {
        if data.len() > self.max_message {
            return Err(VError::InvalidArgument(format!(
                "message of {} bytes exceeds {}",
                data.len(),
                self.max_message
            )));
        }
        let p = self.established(peer)?;
        if p.msg_sq.admit(1).count == 0 {
            return Ok(None);
        }
        let id = self.new_id();
        self.ops.push(Op {
            id,
            peer,
            kind: OpKind::Send {
                data: data.to_vec(),
            },
        });
        Ok(Some(id))
    }

    fn poll(&mut self, now: Instant, out: &mut Vec<DomainEvent>) -> Result<usize, VError> {
        let mut ops = std::mem::take(&mut self.ops);
        // Completions of different transfers in a scrambled order (within a chain, in order, as
        // on one RC QP).
        for i in (1..ops.len()).rev() {
            let j = (self.rng.next_u64() % (i as u64 + 1)) as usize;
            ops.swap(i, j);
        }
        let mut n = 0;
        while let Some(op) = ops.pop() {
            n += 1;
            // Deliver WR by WR; the first failure ends the chain (later WRs are flushed by the
            // teardown that follows).
            let mut failed = None;
            let mut freed = 0u16;
            let mut signalled = 0u64;
            match &op.kind {
                OpKind::Writes { wrs, covers } => {
                    for (k, &(seg, imm)) in wrs.iter().enumerate() {
                        let injected = (k == 0 && self.take_fault(|f| &mut f.fail_writes))
                            || self.take_chain_fault(k, wrs.len());
                        let r = if injected {
                            Err(VError::PeerUnreachable {
                                qp_num: self.peers.get(&op.peer).map_or(0, |p| p.data_qpn),
                                vendor_err: 0,
                            })
                        } else {
                            self.deliver(op.peer, Wr::Write { seg, imm })
                        };
                        if let Err(e) = r {
                            failed = Some(e);
                            break;
                        }
                        if covers[k] > 0 {
                            freed += covers[k];
                            signalled += 1;
                        }
                    }
                }
                OpKind::Send { data } => {
                    if let Err(e) = self.deliver(op.peer, Wr::Send { data }) {
                        failed = Some(e);
                    }
                }
            }
            let send = matches!(op.kind, OpKind::Send { .. });
            if let Some(p) = self.peers.get_mut(&op.peer) {
                if send {
                    p.msg_sq.complete(if failed.is_none() { 1 } else { 0 });
                } else {
                    p.data_sq.complete(freed);
                }
            }
            if !send {
                self.count(|s| s.signalled_cqes += signalled);
            }
            match failed {
                None => out.push(DomainEvent::Finished(Finished {
                    id: op.id,
                    peer: op.peer,
                    result: Ok(()),
                    drained: true,
                })),
                Some(e) => {
                    self.count(|s| s.error_cqes += 1);
                    // Reported now, drained when the QP is torn down (the error put it in ERR).
                    if let Some(p) = self.peers.get_mut(&op.peer) {
                        p.undrained.insert(op.id);
                    }
                    out.push(DomainEvent::Finished(Finished {
                        id: op.id,
                        peer: op.peer,
                        result: Err(e.clone()),
                        drained: false,
                    }));
                    // The peer's other ops are flushed by the teardown that follows.
                    let (theirs, others): (Vec<Op>, Vec<Op>) =
                        ops.into_iter().partition(|o| o.peer == op.peer);
                    ops = others;
                    self.ops.extend(theirs);
                    self.local_failure(op.peer, &e, now, out);
                }
            }
        }
        let inbox = std::mem::take(&mut self.target.lock().unwrap().inbox);
        n += inbox.len();
        out.extend(inbox);
        Ok(n)
    }

    fn lose_datagram(&mut self) -> bool {
        self.take_fault(|f| &mut f.lose_datagrams)
    }
}
