//! Building work requests: planning writes into WRs within the device's limits, selective
//! signalling with send-queue accounting, chains of `ibv_send_wr` / `ibv_recv_wr` ready to post,
//! and keeping receive queues stocked.
//!
//! # Send-queue accounting
//! A posted send WR occupies a send-queue slot until a completion at or after it is polled. With
//! selective signalling only every Nth WR (and always the last WR of every batch posted) asks
//! for a completion; that completion frees itself and the unsignalled WRs before it. Because
//! every batch ends signalled, no unsignalled WR is ever left without a later signalled one, and
//! [`SendQueue`] never admits more WRs than there are free slots: when the queue is full it
//! admits a prefix and says how many ([`Admitted::count`]); the caller posts the rest later.
//!
//! # Immediates
//! `ibv_send_wr::imm_data` is `__be32`: the immediate is stored in network byte order, and the
//! receiver's `ibv_wc::imm_data` is converted back (see [`crate::completion`]).

use std::ops::Range;

use crate::error::{Error, Result};
use crate::sys::{self, ibv_recv_wr, ibv_send_wr, ibv_sge};

/// What the device and port allow, from `ibv_query_device` / `ibv_query_port` and the QP's
/// granted capabilities.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Send-queue depth (`ibv_qp_cap::max_send_wr` as granted).
    pub max_send_wr: u32,
    /// Scatter/gather entries per send WR (`max_send_sge` as granted).
    pub max_sge: u32,
    /// Largest message (`ibv_port_attr::max_msg_sz`, 1 GiB on ConnectX).
    pub max_msg_size: u64,
    /// Largest inline payload (`max_inline_data` as granted); 0 disables inline.
    pub max_inline: u32,
}

impl Limits {
    /// # Errors
    /// [`Error::Config`] when a limit is zero.
    pub fn validate(&self) -> Result<()> {
        if self.max_send_wr == 0 || self.max_sge == 0 || self.max_msg_size == 0 {
            return Err(Error::Config(format!(
                "device limits must be non-zero: {self:?}"
            )));
        }
        Ok(())
    }
}

/// One contiguous piece of a write: `len` bytes from local memory to remote memory.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct WriteSeg {
    pub local_addr: u64,
    pub lkey: u32,
    pub remote_addr: u64,
    pub rkey: u32,
    pub len: u64,
}

/// One planned RDMA write: a contiguous remote range filled from `sges` of the plan.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PlannedWr {
    pub remote_addr: u64,
    pub rkey: u32,
    pub len: u64,
    /// Index range into [`WritePlan::sges`].
    pub sge_start: u32,
    pub sge_count: u32,
}

/// A transfer's writes, planned.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct WritePlan {
    pub wrs: Vec<PlannedWr>,
    pub sges: Vec<ibv_sge>,
}

impl WritePlan {
    /// A single zero-length write, used to deliver only an immediate.
    pub fn zero_length(remote_addr: u64, rkey: u32) -> Self {
        WritePlan {
            wrs: vec![PlannedWr {
                remote_addr,
                rkey,
                len: 0,
                sge_start: 0,
                sge_count: 0,
            }],
            sges: Vec::new(),
        }
    }

    pub fn total_len(&self) -> u64 {
        self.wrs.iter().map(|w| w.len).sum()
    }

    pub fn sges_of(&self, wr: &PlannedWr) -> &[ibv_sge] {
        &self.sges[wr.sge_start as usize..(wr.sge_start + wr.sge_count) as usize]
    }
}

/// Plans `segs` (for example the pages of a paged KV-cache transfer) into as few WRs as the
/// limits allow: a segment continues the previous WR when the remote side is contiguous with the
/// same key and the WR stays within `max_msg_size` and `max_sge` (a segment that is also
/// contiguous locally extends the last SGE instead). Segments longer than a message or an SGE
/// (4 GiB) are split. Zero-length segments are dropped.
///
/// # Errors
/// [`Error::Config`] for invalid limits.
pub fn plan_writes(segs: &[WriteSeg], limits: &Limits) -> Result<WritePlan> {
    limits.validate()?;
    let mut plan = WritePlan::default();
    let max_msg = limits.max_msg_size;
    for seg in segs {
        let mut off = 0u64;
        while off < seg.len {
            let remaining = seg.len - off;
            let local = seg.local_addr + off;
            let remote = seg.remote_addr + off;
            let cont = plan.wrs.last().is_some_and(|w| {
                w.rkey == seg.rkey
                    && w.remote_addr.checked_add(w.len) == Some(remote)
                    && w.len < max_msg
            });
            if cont {
                let w = *plan.wrs.last().expect("checked");
                let room = max_msg - w.len;
                let last = plan.sges.last().copied();
                let extend = w.sge_count > 0
                    && last.is_some_and(|s| {
                        s.lkey == seg.lkey
                            && s.addr.checked_add(s.length as u64) == Some(local)
                            && s.length < u32::MAX
                    });
                if extend {
                    let s = plan.sges.last_mut().expect("checked");
                    let take = remaining.min(room).min((u32::MAX - s.length) as u64);
                    s.length += take as u32;
                    plan.wrs.last_mut().expect("checked").len += take;
                    off += take;
                    continue;
                }
                if w.sge_count < limits.max_sge {
                    let take = remaining.min(room).min(u32::MAX as u64);
                    plan.sges.push(ibv_sge {
                        addr: local,
                        length: take as u32,
                        lkey: seg.lkey,
                    });
                    let w = plan.wrs.last_mut().expect("checked");
                    w.sge_count += 1;
                    w.len += take;
                    off += take;
                    continue;
                }
            }
            let take = remaining.min(max_msg).min(u32::MAX as u64);
            plan.wrs.push(PlannedWr {
                remote_addr: remote,
                rkey: seg.rkey,
                len: take,
                sge_start: plan.sges.len() as u32,
                sge_count: 1,
            });
            plan.sges.push(ibv_sge {
                addr: local,
                length: take as u32,
                lkey: seg.lkey,
            });
            off += take;
        }
    }
    Ok(plan)
}

/// Plans a batch of separate operations (for example the writes of several transfers to one
/// peer, posted together as one chain) into exactly one WR per segment, in order: unlike
/// [`plan_writes`], contiguous segments are never merged, because each is an operation of its
/// own whose immediate the receiver counts. Zero-length segments stay (a WR without SGE that
/// delivers only its immediate).
///
/// # Errors
/// [`Error::Config`] for invalid limits; [`Error::InvalidArgument`] for a segment longer than
/// one message (or an SGE).
pub fn plan_ops(segs: &[WriteSeg], limits: &Limits) -> Result<WritePlan> {
    limits.validate()?;
    let mut plan = WritePlan {
        wrs: Vec::with_capacity(segs.len()),
        sges: Vec::with_capacity(segs.len()),
    };
    for seg in segs {
        if seg.len > limits.max_msg_size || seg.len > u32::MAX as u64 {
            return Err(Error::InvalidArgument(format!(
                "a write of {} bytes is longer than one message ({} bytes)",
                seg.len,
                limits.max_msg_size.min(u32::MAX as u64)
            )));
        }
        let with_sge = seg.len > 0;
        plan.wrs.push(PlannedWr {
            remote_addr: seg.remote_addr,
            rkey: seg.rkey,
            len: seg.len,
            sge_start: plan.sges.len() as u32,
            sge_count: with_sge as u32,
        });
        if with_sge {
            plan.sges.push(ibv_sge {
                addr: seg.local_addr,
                length: seg.len as u32,
                lkey: seg.lkey,
            });
        }
    }
    Ok(plan)
}

/// Which WRs of a transfer carry the immediate.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum ImmPolicy {
    /// Every WR is a write-with-immediate; the receiver counts one arrival per WR (the engine's
    /// contract for every backend: delivery is reliable, order is not).
    #[default]
    EveryWr,
    /// Only the last WR carries it. Valid only within one RC QP, where the completion of a
    /// write with immediate at the target implies every earlier write on that QP has landed.
    LastWr,
}

impl ImmPolicy {
    /// How many immediates the receiver sees for a transfer of `n_wrs` WRs.
    pub fn imm_count(self, n_wrs: usize) -> usize {
        match self {
            ImmPolicy::EveryWr => n_wrs,
            ImmPolicy::LastWr => n_wrs.min(1),
        }
    }

    fn carries(self, index: usize, total: usize) -> bool {
        match self {
            ImmPolicy::EveryWr => true,
            ImmPolicy::LastWr => index + 1 == total,
        }
    }
}

/// How many WRs were admitted to the send queue, and which of them are signalled.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Admitted {
    /// WRs admitted (a prefix of those asked for).
    pub count: usize,
    /// Per admitted WR: the number of WRs its completion covers, 0 for unsignalled.
    pub covers: Vec<u16>,
}

/// Send-queue occupancy of one QP under selective signalling.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SendQueue {
    depth: u32,
    every: u32,
    outstanding: u32,
}

impl SendQueue {
    /// A queue of `depth` slots signalling at least every `every`th WR (clamped to 1..=depth
    /// and to what a `wr_id` can count).
    pub fn new(depth: u32, every: u32) -> Self {
        let every = every.clamp(1, depth.max(1)).min(u16::MAX as u32);
        SendQueue {
            depth,
            every,
            outstanding: 0,
        }
    }

    pub fn depth(&self) -> u32 {
        self.depth
    }

    pub fn every(&self) -> u32 {
        self.every
    }

    /// Slots taken by posted WRs not yet covered by a completion.
    pub fn outstanding(&self) -> u32 {
        self.outstanding
    }

    pub fn free(&self) -> u32 {
        self.depth - self.outstanding
    }

    /// Admits up to `n` WRs of one batch: as many as fit, every `every`th signalled and the last
    /// admitted one always signalled.
    pub fn admit(&mut self, n: usize) -> Admitted {
        let count = n.min(self.free() as usize);
        let mut covers = vec![0u16; count];
        let mut run = 0u32;
        for (i, c) in covers.iter_mut().enumerate() {
            run += 1;
            if run == self.every || i + 1 == count {
                *c = run as u16;
                run = 0;
            }
        }
        self.outstanding += count as u32;
        Admitted { count, covers }
    }

    /// A signalled WR completed (successfully) and frees `covers` slots.
    pub fn complete(&mut self, covers: u16) {
        debug_assert!(
            covers as u32 <= self.outstanding,
            "freed more slots than were taken"
        );
        self.outstanding -= (covers as u32).min(self.outstanding);
    }

    /// Gives back slots of WRs that were admitted but not posted (the post was refused at WR
    /// `posted`, so `admitted - posted` WRs never reached the queue).
    pub fn unadmit(&mut self, n: u32) {
        self.outstanding -= n.min(self.outstanding);
    }

    /// The QP was reset: everything it held is gone.
    pub fn reset(&mut self) {
        self.outstanding = 0;
    }
}

/// A linked list of send WRs with the SGEs they point at, owned together so the pointers stay
/// valid while the chain lives and is not modified.
#[derive(Debug, Default)]
pub struct SendChain {
    wrs: Vec<ibv_send_wr>,
    sges: Vec<ibv_sge>,
    ranges: Vec<(u32, u32)>,
}

impl SendChain {
    pub fn len(&self) -> usize {
        self.wrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }

    /// The WRs, unlinked (for inspection).
    pub fn wrs(&self) -> &[ibv_send_wr] {
        &self.wrs
    }

    /// The SGEs of WR `i`.
    pub fn sges(&self, i: usize) -> &[ibv_sge] {
        let (s, n) = self.ranges[i];
        &self.sges[s as usize..(s + n) as usize]
    }

    fn push(&mut self, mut wr: ibv_send_wr, sges: &[ibv_sge]) {
        self.ranges
            .push((self.sges.len() as u32, sges.len() as u32));
        self.sges.extend_from_slice(sges);
        wr.num_sge = sges.len() as i32;
        self.wrs.push(wr);
    }

    /// Links `next` and `sg_list` pointers and returns the head, or null when empty. The
    /// pointers stay valid until the chain is dropped or modified.
    pub fn link(&mut self) -> *mut ibv_send_wr {
        let sge_base = self.sges.as_mut_ptr();
        let n = self.wrs.len();
        let wr_base = self.wrs.as_mut_ptr();
        for (i, wr) in self.wrs.iter_mut().enumerate() {
            let (s, c) = self.ranges[i];
            wr.sg_list = if c == 0 {
                std::ptr::null_mut()
            } else {
                // SAFETY: s < sges.len() whenever c > 0 (push appended c SGEs at s).
                unsafe { sge_base.add(s as usize) }
            };
            wr.next = if i + 1 < n {
                // SAFETY: i + 1 < n, inside the WR vector.
                unsafe { wr_base.add(i + 1) }
            } else {
                std::ptr::null_mut()
            };
        }
        if n == 0 {
            std::ptr::null_mut()
        } else {
            wr_base
        }
    }

    /// The index of the WR `bad` points at (from `ibv_post_send`'s `bad_wr`).
    pub fn index_of(&self, bad: *const ibv_send_wr) -> Option<usize> {
        let base = self.wrs.as_ptr() as usize;
        let p = bad as usize;
        let size = std::mem::size_of::<ibv_send_wr>();
        if p < base || (p - base) % size != 0 {
            return None;
        }
        let i = (p - base) / size;
        (i < self.wrs.len()).then_some(i)
    }
}

/// Builds the WRs `range` of a planned transfer, already admitted as `admitted` (whose
/// `count` must equal the range's length). `wr_id(covers)` names each WR; `imm` goes on the WRs
/// the policy picks, in network byte order. Payloads up to `max_inline` bytes are sent inline.
pub fn build_writes(
    plan: &WritePlan,
    range: Range<usize>,
    imm: Option<u32>,
    policy: ImmPolicy,
    admitted: &Admitted,
    max_inline: u32,
    wr_id: impl FnMut(u16) -> u64,
) -> SendChain {
    let total = plan.wrs.len();
    build_writes_with(
        plan,
        range,
        |i| imm.filter(|_| policy.carries(i, total)),
        admitted,
        max_inline,
        wr_id,
    )
}

/// Like [`build_writes`], with the immediate of each WR (by its index in the plan) given by
/// `imm_of`: for chains of separate operations ([`plan_ops`]) that carry different immediates.
pub fn build_writes_with(
    plan: &WritePlan,
    range: Range<usize>,
    imm_of: impl Fn(usize) -> Option<u32>,
    admitted: &Admitted,
    max_inline: u32,
    mut wr_id: impl FnMut(u16) -> u64,
) -> SendChain {
    assert_eq!(
        range.len(),
        admitted.count,
        "build exactly what was admitted"
    );
    let mut chain = SendChain::default();
    for (k, i) in range.enumerate() {
        let p = &plan.wrs[i];
        let covers = admitted.covers[k];
        let mut flags = if covers > 0 {
            sys::IBV_SEND_SIGNALED
        } else {
            0
        };
        if p.len > 0 && p.len <= max_inline as u64 {
            flags |= sys::IBV_SEND_INLINE;
        }
        let with_imm = imm_of(i);
        let wr = ibv_send_wr {
            wr_id: wr_id(covers),
            opcode: if with_imm.is_some() {
                sys::IBV_WR_RDMA_WRITE_WITH_IMM
            } else {
                sys::IBV_WR_RDMA_WRITE
            },
            send_flags: flags,
            imm_data: with_imm.map_or(0, u32::to_be),
            wr: sys::ibv_send_wr_wr {
                rdma: sys::ibv_send_wr_rdma {
                    remote_addr: p.remote_addr,
                    rkey: p.rkey,
                },
            },
            ..Default::default()
        };
        chain.push(wr, plan.sges_of(p));
    }
    chain
}

/// One message send (optionally with immediate) from a registered buffer.
pub fn build_send(
    sge: ibv_sge,
    imm: Option<u32>,
    signalled: bool,
    max_inline: u32,
    wr_id: u64,
) -> SendChain {
    let mut flags = if signalled { sys::IBV_SEND_SIGNALED } else { 0 };
    if sge.length > 0 && sge.length <= max_inline {
        flags |= sys::IBV_SEND_INLINE;
    }
    let wr = ibv_send_wr {
        wr_id,
        opcode: if imm.is_some() {
            sys::IBV_WR_SEND_WITH_IMM
        } else {
            sys::IBV_WR_SEND
        },
        send_flags: flags,
        imm_data: imm.map_or(0, u32::to_be),
        ..Default::default()
    };
    let mut chain = SendChain::default();
    chain.push(
        wr,
        if sge.length == 0 {
            &[]
        } else {
            std::slice::from_ref(&sge)
        },
    );
    chain
}

/// A linked list of receive WRs with their SGEs.
#[derive(Debug, Default)]
pub struct RecvChain {
    wrs: Vec<ibv_recv_wr>,
    sges: Vec<ibv_sge>,
    has_sge: Vec<bool>,
}

impl RecvChain {
    /// Receives into buffers: `(wr_id, sge)` each.
    pub fn buffers(items: impl IntoIterator<Item = (u64, ibv_sge)>) -> Self {
        let mut c = RecvChain::default();
        for (wr_id, sge) in items {
            c.wrs.push(ibv_recv_wr {
                wr_id,
                num_sge: 1,
                ..Default::default()
            });
            c.sges.push(sge);
            c.has_sge.push(true);
        }
        c
    }

    /// Receives without a buffer, for writes with immediate (which place no data in the receive
    /// buffer, only consume the WR).
    pub fn empty(ids: impl IntoIterator<Item = u64>) -> Self {
        let mut c = RecvChain::default();
        for wr_id in ids {
            c.wrs.push(ibv_recv_wr {
                wr_id,
                num_sge: 0,
                ..Default::default()
            });
            c.has_sge.push(false);
        }
        c
    }

    pub fn len(&self) -> usize {
        self.wrs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.wrs.is_empty()
    }

    pub fn wrs(&self) -> &[ibv_recv_wr] {
        &self.wrs
    }

    /// Links the list and returns its head (null when empty).
    pub fn link(&mut self) -> *mut ibv_recv_wr {
        let n = self.wrs.len();
        let wr_base = self.wrs.as_mut_ptr();
        let sge_base = self.sges.as_mut_ptr();
        let mut s = 0usize;
        for i in 0..n {
            // SAFETY: i < n; s counts SGEs pushed before WR i and is < sges.len() when has_sge.
            unsafe {
                let wr = &mut *wr_base.add(i);
                wr.sg_list = if self.has_sge[i] {
                    s += 1;
                    sge_base.add(s - 1)
                } else {
                    std::ptr::null_mut()
                };
                wr.next = if i + 1 < n {
                    wr_base.add(i + 1)
                } else {
                    std::ptr::null_mut()
                };
            }
        }
        if n == 0 {
            std::ptr::null_mut()
        } else {
            wr_base
        }
    }

    pub fn index_of(&self, bad: *const ibv_recv_wr) -> Option<usize> {
        let base = self.wrs.as_ptr() as usize;
        let p = bad as usize;
        let size = std::mem::size_of::<ibv_recv_wr>();
        if p < base || (p - base) % size != 0 {
            return None;
        }
        let i = (p - base) / size;
        (i < self.wrs.len()).then_some(i)
    }
}

/// Keeps a receive queue stocked: tracks posted receives and says when and how many to add.
/// A write with immediate consumes one receive WR at the target, so the write-with-immediate SRQ
/// must never run dry (the sender would see RNR NAKs).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecvStock {
    target: u32,
    batch: u32,
    posted: u32,
}

impl RecvStock {
    /// Keep `target` receives posted, refilling in batches of `batch` (clamped to 1..=target).
    pub fn new(target: u32, batch: u32) -> Self {
        RecvStock {
            target,
            batch: batch.clamp(1, target.max(1)),
            posted: 0,
        }
    }

    pub fn posted(&self) -> u32 {
        self.posted
    }

    /// `n` receives completed (consumed or flushed).
    pub fn consumed(&mut self, n: u32) {
        self.posted -= n.min(self.posted);
    }

    /// How many to post now: the whole deficit once it reaches a batch, or once fewer than half
    /// the target remain; otherwise 0 (to post in batches, not one by one).
    pub fn refill(&self) -> u32 {
        let deficit = self.target - self.posted;
        if deficit >= self.batch || self.posted < self.target / 2 {
            deficit
        } else {
            0
        }
    }

    /// `n` receives were posted.
    pub fn added(&mut self, n: u32) {
        self.posted = (self.posted + n).min(self.target);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn limits() -> Limits {
        Limits {
            max_send_wr: 64,
            max_sge: 4,
            max_msg_size: 1 << 20,
            max_inline: 0,
        }
    }

    #[test]
    fn contiguous_pages_merge_and_scattered_pages_do_not() {
        let page = 4096u64;
        // Remote contiguous, local scattered: one WR with several SGEs.
        let segs: Vec<_> = (0..3)
            .map(|i| WriteSeg {
                local_addr: 0x10_0000 + i * 3 * page,
                lkey: 1,
                remote_addr: 0x90_0000 + i * page,
                rkey: 2,
                len: page,
            })
            .collect();
        let p = plan_writes(&segs, &limits()).unwrap();
        assert_eq!(p.wrs.len(), 1);
        assert_eq!(p.wrs[0].sge_count, 3);
        // Both contiguous: one SGE.
        let segs: Vec<_> = (0..3)
            .map(|i| WriteSeg {
                local_addr: 0x10_0000 + i * page,
                lkey: 1,
                remote_addr: 0x90_0000 + i * page,
                rkey: 2,
                len: page,
            })
            .collect();
        let p = plan_writes(&segs, &limits()).unwrap();
        assert_eq!(
            (p.wrs.len(), p.sges.len(), p.sges[0].length),
            (1, 1, 3 * 4096)
        );
        // Remote scattered: one WR per page.
        let segs: Vec<_> = (0..3)
            .map(|i| WriteSeg {
                local_addr: 0x10_0000 + i * page,
                lkey: 1,
                remote_addr: 0x90_0000 + i * 2 * page,
                rkey: 2,
                len: page,
            })
            .collect();
        assert_eq!(plan_writes(&segs, &limits()).unwrap().wrs.len(), 3);
        // Large segments split at the message size.
        let big = [WriteSeg {
            local_addr: 0,
            lkey: 1,
            remote_addr: 0,
            rkey: 2,
            len: (5 << 20) + 7,
        }];
        let p = plan_writes(&big, &limits()).unwrap();
        assert_eq!(p.wrs.len(), 6);
        assert_eq!(p.total_len(), (5 << 20) + 7);
    }

    #[test]
    fn writes_with_immediate_in_network_order_and_signalling() {
        let segs: Vec<_> = (0..5u64)
            .map(|i| WriteSeg {
                local_addr: 0x1000 * i,
                lkey: 7,
                remote_addr: 0x10_0000 * i,
                rkey: 9,
                len: 64,
            })
            .collect();
        let plan = plan_writes(&segs, &limits()).unwrap();
        let mut sq = SendQueue::new(64, 2);
        let adm = sq.admit(plan.wrs.len());
        assert_eq!(adm.covers, vec![0, 2, 0, 2, 1]);
        let mut chain = build_writes(
            &plan,
            0..5,
            Some(0x0102_0304),
            ImmPolicy::EveryWr,
            &adm,
            32,
            |c| c as u64,
        );
        let head = chain.link();
        assert!(!head.is_null());
        for (i, wr) in chain.wrs().iter().enumerate() {
            assert_eq!(wr.opcode, sys::IBV_WR_RDMA_WRITE_WITH_IMM);
            assert_eq!(
                wr.imm_data.to_ne_bytes(),
                [1, 2, 3, 4],
                "big-endian in memory"
            );
            assert_eq!(
                wr.send_flags & sys::IBV_SEND_SIGNALED != 0,
                adm.covers[i] > 0
            );
            assert_eq!(
                wr.send_flags & sys::IBV_SEND_INLINE,
                0,
                "64 B > 32 B inline limit"
            );
            // SAFETY: rdma is the member build_writes filled.
            let rdma = unsafe { wr.wr.rdma };
            assert_eq!((rdma.remote_addr, rdma.rkey), (0x10_0000 * i as u64, 9));
            assert_eq!(wr.num_sge, 1);
            assert_eq!(chain.sges(i)[0].lkey, 7);
            // The links point inside the chain.
            if i + 1 < 5 {
                assert_eq!(chain.index_of(wr.next), Some(i + 1));
            } else {
                assert!(wr.next.is_null());
            }
        }
        assert_eq!(chain.index_of(head), Some(0));
        assert_eq!(chain.index_of(std::ptr::null()), None);
        // Only the last WR carries the immediate under LastWr.
        let adm = SendQueue::new(64, 64).admit(5);
        let chain = build_writes(&plan, 0..5, Some(1), ImmPolicy::LastWr, &adm, 0, |_| 0);
        let ops: Vec<_> = chain.wrs().iter().map(|w| w.opcode).collect();
        assert_eq!(ops[..4], [sys::IBV_WR_RDMA_WRITE; 4]);
        assert_eq!(ops[4], sys::IBV_WR_RDMA_WRITE_WITH_IMM);
        assert_eq!(ImmPolicy::LastWr.imm_count(5), 1);
        assert_eq!(ImmPolicy::EveryWr.imm_count(5), 5);
    }

    #[test]
    fn zero_length_write_carries_only_the_immediate() {
        let plan = WritePlan::zero_length(0xabc, 5);
        let adm = SendQueue::new(8, 4).admit(1);
        let mut chain = build_writes(&plan, 0..1, Some(42), ImmPolicy::EveryWr, &adm, 64, |_| 1);
        chain.link();
        let wr = chain.wrs()[0];
        assert_eq!(
            (wr.num_sge, wr.opcode),
            (0, sys::IBV_WR_RDMA_WRITE_WITH_IMM)
        );
        assert!(wr.sg_list.is_null());
        assert_eq!(wr.send_flags, sys::IBV_SEND_SIGNALED);
    }

    #[test]
    fn sends_and_receives() {
        let sge = ibv_sge {
            addr: 0x5000,
            length: 16,
            lkey: 3,
        };
        let mut c = build_send(sge, Some(9), true, 64, 77);
        c.link();
        let wr = c.wrs()[0];
        assert_eq!(
            (wr.opcode, wr.wr_id, wr.num_sge),
            (sys::IBV_WR_SEND_WITH_IMM, 77, 1)
        );
        assert_eq!(wr.send_flags, sys::IBV_SEND_SIGNALED | sys::IBV_SEND_INLINE);
        assert_eq!(u32::from_be(wr.imm_data), 9);
        let mut r = RecvChain::buffers((0..3).map(|i| {
            (
                i,
                ibv_sge {
                    addr: 0x1000 * i,
                    length: 256,
                    lkey: 4,
                },
            )
        }));
        let head = r.link();
        assert_eq!(r.index_of(head), Some(0));
        for (i, w) in r.wrs().iter().enumerate() {
            // SAFETY: sg_list points into the chain's SGE vector, alive here.
            assert_eq!(unsafe { (*w.sg_list).addr }, 0x1000 * i as u64);
        }
        let mut e = RecvChain::empty(0..4);
        e.link();
        assert!(e
            .wrs()
            .iter()
            .all(|w| w.num_sge == 0 && w.sg_list.is_null()));
        assert!(RecvChain::empty(0..0).link().is_null());
    }

    #[test]
    fn a_full_queue_admits_a_signalled_prefix() {
        let mut sq = SendQueue::new(10, 4);
        let a = sq.admit(7);
        assert_eq!(a.covers, vec![0, 0, 0, 4, 0, 0, 3]);
        let b = sq.admit(7);
        assert_eq!(b.count, 3, "only 3 slots left");
        assert_eq!(b.covers, vec![0, 0, 3]);
        assert_eq!(sq.admit(1).count, 0);
        sq.complete(4);
        assert_eq!(sq.free(), 4);
        sq.reset();
        assert_eq!(sq.free(), 10);
    }

    #[test]
    fn recv_stock_refills_in_batches() {
        let mut s = RecvStock::new(100, 16);
        assert_eq!(s.refill(), 100);
        s.added(100);
        s.consumed(10);
        assert_eq!(s.refill(), 0, "below a batch");
        s.consumed(6);
        assert_eq!(s.refill(), 16);
        s.added(16);
        s.consumed(60);
        assert_eq!(s.refill(), 60, "under half: refill now");
    }

    fn arb_segs() -> impl Strategy<Value = Vec<WriteSeg>> {
        proptest::collection::vec(
            (
                0u64..8,
                0u64..4,
                any::<bool>(),
                any::<bool>(),
                0u64..700,
                0u32..2,
            ),
            0..24,
        )
        .prop_map(|items| {
            let (mut l, mut r) = (0x1_0000u64, 0x100_0000u64);
            items
                .into_iter()
                .map(|(lgap, rgap, lc, rc, len, key)| {
                    // Sometimes contiguous with the previous segment, sometimes not.
                    l += if lc { 0 } else { lgap * 4096 + 1 };
                    r += if rc { 0 } else { rgap * 4096 + 3 };
                    let s = WriteSeg {
                        local_addr: l,
                        lkey: 10 + key,
                        remote_addr: r,
                        rkey: 20 + key,
                        len,
                    };
                    l += len;
                    r += len;
                    s
                })
                .collect()
        })
    }

    proptest! {
        /// Every byte is written exactly once, from the right local address to the right remote
        /// address, and every WR respects the limits.
        #[test]
        fn plans_cover_every_byte_within_limits(
            segs in arb_segs(),
            max_sge in 1u32..5,
            max_msg in 1u64..2_000,
        ) {
            let lim = Limits { max_send_wr: 16, max_sge, max_msg_size: max_msg, max_inline: 0 };
            let plan = plan_writes(&segs, &lim).unwrap();
            let mut want: Vec<(u64, u32, u64, u32)> = Vec::new();
            for s in &segs {
                for b in 0..s.len {
                    want.push((s.local_addr + b, s.lkey, s.remote_addr + b, s.rkey));
                }
            }
            let mut got = Vec::new();
            for w in &plan.wrs {
                prop_assert!(w.len <= max_msg);
                prop_assert!(w.sge_count >= 1 && w.sge_count <= max_sge);
                let sges = plan.sges_of(w);
                prop_assert_eq!(sges.iter().map(|s| s.length as u64).sum::<u64>(), w.len);
                let mut r = w.remote_addr;
                for s in sges {
                    prop_assert!(s.length > 0);
                    for b in 0..s.length as u64 {
                        got.push((s.addr + b, s.lkey, r, w.rkey));
                        r += 1;
                    }
                }
            }
            prop_assert_eq!(got, want);
        }

        /// Under any interleaving of admissions and completions the queue never holds more than
        /// its depth, every admitted batch ends signalled, no run of unsignalled WRs is longer
        /// than `every - 1`, and completing every signalled WR frees exactly what was admitted.
        #[test]
        fn send_queue_never_overflows(
            depth in 1u32..64,
            every in 1u32..80,
            batches in proptest::collection::vec(0usize..100, 1..40),
            completions in proptest::collection::vec(any::<bool>(), 40),
        ) {
            let mut sq = SendQueue::new(depth, every);
            let mut signalled: std::collections::VecDeque<u16> = Default::default();
            for (i, n) in batches.iter().enumerate() {
                let a = sq.admit(*n);
                prop_assert!(sq.outstanding() <= depth);
                prop_assert_eq!(a.count, a.covers.len());
                if a.count > 0 {
                    prop_assert!(*a.covers.last().unwrap() > 0, "batch ends signalled");
                }
                prop_assert_eq!(a.covers.iter().map(|&c| c as usize).sum::<usize>(), a.count);
                let mut run = 0;
                for &c in &a.covers {
                    if c == 0 { run += 1; prop_assert!(run < sq.every()); } else { run = 0; }
                }
                signalled.extend(a.covers.iter().copied().filter(|&c| c > 0));
                if completions[i % completions.len()] {
                    while let Some(c) = signalled.pop_front() {
                        sq.complete(c);
                    }
                }
            }
            while let Some(c) = signalled.pop_front() {
                sq.complete(c);
            }
            prop_assert_eq!(sq.outstanding(), 0);
        }
    }

    #[test]
    fn ops_are_planned_one_wr_each_and_never_merged() {
        let l = limits();
        // Contiguous on both sides: plan_writes would merge them, plan_ops must not.
        let segs = [
            WriteSeg {
                local_addr: 0x1000,
                lkey: 1,
                remote_addr: 0x9000,
                rkey: 2,
                len: 100,
            },
            WriteSeg {
                local_addr: 0x1064,
                lkey: 1,
                remote_addr: 0x9064,
                rkey: 2,
                len: 50,
            },
            WriteSeg {
                local_addr: 0,
                lkey: 0,
                remote_addr: 0x9000,
                rkey: 2,
                len: 0,
            },
        ];
        assert_eq!(plan_writes(&segs, &l).unwrap().wrs.len(), 1);
        let p = plan_ops(&segs, &l).unwrap();
        assert_eq!(p.wrs.len(), 3);
        assert_eq!(p.sges.len(), 2);
        assert_eq!(p.sges_of(&p.wrs[1])[0].addr, 0x1064);
        assert!(p.sges_of(&p.wrs[2]).is_empty());
        let too_long = WriteSeg {
            len: l.max_msg_size + 1,
            ..segs[0]
        };
        assert!(matches!(
            plan_ops(&[too_long], &l),
            Err(Error::InvalidArgument(_))
        ));
    }

    #[test]
    fn a_chain_of_ops_carries_each_immediate_and_signals_selectively() {
        let segs: Vec<WriteSeg> = (0..10u64)
            .map(|i| WriteSeg {
                local_addr: 0x1000 + i * 64,
                lkey: 1,
                remote_addr: 0x9000 + i * 64,
                rkey: 2,
                len: 64,
            })
            .collect();
        let p = plan_ops(&segs, &limits()).unwrap();
        let mut sq = SendQueue::new(8, 4);
        let adm = sq.admit(p.wrs.len());
        assert_eq!(adm.count, 8, "a full queue admits a prefix");
        assert_eq!(adm.covers, vec![0, 0, 0, 4, 0, 0, 0, 4]);
        let imms = [
            Some(7),
            None,
            Some(9),
            Some(9),
            None,
            Some(1),
            Some(2),
            Some(3),
        ];
        let chain = build_writes_with(&p, 0..8, |i| imms[i], &adm, 0, |c| c as u64);
        for (i, wr) in chain.wrs().iter().enumerate() {
            let signalled = wr.send_flags & sys::IBV_SEND_SIGNALED != 0;
            assert_eq!(signalled, adm.covers[i] > 0, "WR {i}");
            assert_eq!(wr.wr_id, adm.covers[i] as u64);
            match imms[i] {
                Some(v) => {
                    assert_eq!(wr.opcode, sys::IBV_WR_RDMA_WRITE_WITH_IMM);
                    assert_eq!(u32::from_be(wr.imm_data), v);
                }
                None => assert_eq!(wr.opcode, sys::IBV_WR_RDMA_WRITE),
            }
        }
        assert_eq!(sq.free(), 0);
        sq.complete(4);
        sq.complete(4);
        let adm = sq.admit(2);
        assert_eq!(
            adm.covers,
            vec![0, 2],
            "the last WR of every batch is signalled"
        );
    }
}
