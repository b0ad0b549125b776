//! From `ibv_wc` back to stolon's objects: `wr_id` encoding, the transfer table, and the
//! meaning of every `ibv_wc_status`.
//!
//! Every work request carries a `wr_id` that names what it belongs to by *slot index and
//! generation*, never by pointer: a transfer that failed or timed out is reported at once and its
//! slot reused under a new generation, so completions still draining for the old one are
//! recognised as stale and dropped. Under selective signalling a signalled send WR also carries
//! how many WRs of its transfer its completion covers (itself and the unsignalled ones before
//! it); unsignalled WRs carry 0 and are only ever seen when they fail.

use std::collections::HashMap;

use crate::error::{Error, Result};
use crate::sys;

pub use crate::wc_status::WcStatus;

/// The typed error of a failed completion; `None` for success. A flush names the failure that
/// put the QP in error, when `earlier` knows it.
pub fn status_error(
    status: WcStatus,
    qp_num: u32,
    vendor_err: u32,
    earlier: Option<&Error>,
) -> Option<Error> {
    Some(match status {
        WcStatus::Success => return None,
        WcStatus::RetryExcErr => Error::PeerUnreachable { qp_num, vendor_err },
        WcStatus::RnrRetryExcErr => Error::ReceiverNotReady { qp_num, vendor_err },
        WcStatus::RemAccessErr => Error::RemoteAccess { qp_num, vendor_err },
        WcStatus::RemInvReqErr => Error::RemoteInvalidRequest { qp_num, vendor_err },
        WcStatus::RemOpErr => Error::RemoteOperation { qp_num, vendor_err },
        WcStatus::LocProtErr | WcStatus::LocAccessErr => Error::LocalProtection {
            status,
            qp_num,
            vendor_err,
        },
        WcStatus::LocLenErr => Error::LocalLength { qp_num, vendor_err },
        WcStatus::LocQpOpErr => Error::LocalQpOperation { qp_num, vendor_err },
        WcStatus::WrFlushErr => Error::Flushed {
            qp_num,
            after: earlier.map(|e| Box::new(e.clone())),
        },
        other => Error::WorkCompletion {
            status: other,
            qp_num,
            vendor_err,
        },
    })
}

/// What a work request belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum WrKind {
    /// An RDMA write (with or without immediate) of a transfer.
    Write = 1,
    /// A message send of a transfer.
    Send = 2,
    /// A receive on the message SRQ; `slot` is the buffer index.
    RecvMsg = 3,
    /// A receive on the write-with-immediate SRQ (no buffer).
    RecvImm = 4,
}

/// Number of transfer slots (and receive buffers) a `wr_id` can name.
pub const MAX_SLOTS: u32 = 1 << 24;

/// The decoded `wr_id`: `kind` in bits 56..64, `slot` in 32..56, `generation` in 16..32,
/// `count` in 0..16.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct WrId {
    pub kind: WrKind,
    pub slot: u32,
    pub generation: u16,
    /// WRs of the transfer this completion covers (0: unsignalled).
    pub count: u16,
}

impl WrId {
    pub fn encode(self) -> u64 {
        debug_assert!(self.slot < MAX_SLOTS);
        ((self.kind as u64) << 56)
            | (((self.slot & (MAX_SLOTS - 1)) as u64) << 32)
            | ((self.generation as u64) << 16)
            | self.count as u64
    }

    pub fn decode(v: u64) -> Option<WrId> {
        let kind = match v >> 56 {
            1 => WrKind::Write,
            2 => WrKind::Send,
            3 => WrKind::RecvMsg,
            4 => WrKind::RecvImm,
            _ => return None,
        };
        Some(WrId {
            kind,
            slot: ((v >> 32) & (MAX_SLOTS as u64 - 1)) as u32,
            generation: (v >> 16) as u16,
            count: v as u16,
        })
    }
}

/// The first real (non-flush) failure seen on each QP, so flushes can name their cause.
#[derive(Debug, Default)]
pub struct QpErrors {
    first: HashMap<u32, Error>,
}

impl QpErrors {
    pub fn record(&mut self, qp_num: u32, e: &Error) {
        if !matches!(e, Error::Flushed { .. }) {
            self.first.entry(qp_num).or_insert_with(|| e.clone());
        }
    }

    pub fn get(&self, qp_num: u32) -> Option<&Error> {
        self.first.get(&qp_num)
    }

    /// Forgets a QP's failure once it has been reset and reconnected.
    pub fn clear(&mut self, qp_num: u32) {
        self.first.remove(&qp_num);
    }
}

/// One completion, interpreted.
#[derive(Clone, Debug)]
pub enum Completion {
    /// A write or send of a transfer completed, successfully or not. On success `id.count` WRs
    /// of the transfer are done.
    Send {
        id: WrId,
        qp_num: u32,
        result: Result<()>,
    },
    /// A write with immediate (or a send with immediate on the data QP) landed; `imm` is in
    /// host order.
    Imm {
        imm: u32,
        qp_num: u32,
        byte_len: u32,
    },
    /// A message arrived in receive buffer `buf`.
    Message {
        buf: u32,
        len: u32,
        qp_num: u32,
        imm: Option<u32>,
    },
    /// A receive failed (SRQ receives fail only when the SRQ is torn down, or on a message
    /// longer than the buffer).
    RecvFailed { id: WrId, qp_num: u32, error: Error },
    /// A `wr_id` stolon did not write.
    Unknown {
        wr_id: u64,
        status: WcStatus,
        qp_num: u32,
    },
}

/// Interprets one work completion, recording real failures in `errors`.
pub fn classify(wc: &sys::ibv_wc, errors: &mut QpErrors) -> Completion {
    let status = WcStatus::from_sys(wc.status);
    let qp_num = wc.qp_num;
    let Some(id) = WrId::decode(wc.wr_id) else {
        return Completion::Unknown {
            wr_id: wc.wr_id,
            status,
            qp_num,
        };
    };
    let error = status_error(status, qp_num, wc.vendor_err, errors.get(qp_num));
    if let Some(e) = &error {
        errors.record(qp_num, e);
    }
    let with_imm = wc.wc_flags & sys::IBV_WC_WITH_IMM != 0;
    // The immediate is in network byte order in the completion.
    let imm = with_imm.then(|| u32::from_be(wc.imm_data));
    match (id.kind, error) {
        (WrKind::Write | WrKind::Send, error) => Completion::Send {
            id,
            qp_num,
            result: error.map_or(Ok(()), Err),
        },
        (WrKind::RecvMsg | WrKind::RecvImm, Some(error)) => {
            Completion::RecvFailed { id, qp_num, error }
        }
        (WrKind::RecvImm, None) => Completion::Imm {
            imm: imm.unwrap_or(0),
            qp_num,
            byte_len: wc.byte_len,
        },
        (WrKind::RecvMsg, None) => Completion::Message {
            buf: id.slot,
            len: wc.byte_len,
            qp_num,
            imm,
        },
    }
}

/// A transfer's handle: its slot and the generation it was given.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub struct TransferId {
    pub slot: u32,
    pub generation: u16,
}

impl TransferId {
    /// The `wr_id` of one of its WRs.
    pub fn wr_id(self, kind: WrKind, count: u16) -> u64 {
        WrId {
            kind,
            slot: self.slot,
            generation: self.generation,
            count,
        }
        .encode()
    }
}

/// A transfer that finished, either way.
#[derive(Clone, Debug)]
pub struct Finished {
    pub id: TransferId,
    pub peer: u32,
    pub result: Result<()>,
    /// None of its WRs is left in a send queue: its memory may be reused. When `false` (a
    /// failure or cancellation reported early), the table reports the id again once drained.
    pub drained: bool,
}

/// What a send-side completion meant for its transfer.
#[derive(Clone, Debug)]
pub struct SendOutcome {
    /// The completion belongs to a transfer still in the table (reported or not), so the
    /// send-queue slots it covers are freed. `false` for a completion of a transfer retired
    /// when its QP was torn down (the send queue was reset then).
    pub live: bool,
    /// The transfer, when this completion decided it.
    pub finished: Option<Finished>,
    /// A transfer reported earlier (with `drained: false`) whose last WR this completion
    /// covered: its memory may be reused now.
    pub drained: Option<TransferId>,
}

#[derive(Debug)]
struct Active {
    peer: u32,
    expected: u64,
    posted: u64,
    done: u64,
    /// Its result was reported (early failure or cancellation); the slot stays until every
    /// posted WR is covered, so that the send queue is accounted right.
    reported: bool,
}

#[derive(Debug, Default)]
struct Slot {
    generation: u16,
    active: Option<Active>,
}

/// The send-side transfers in flight, by slot.
#[derive(Debug, Default)]
pub struct TransferTable {
    slots: Vec<Slot>,
    free: Vec<u32>,
    active: usize,
}

impl TransferTable {
    pub fn new() -> Self {
        Self::default()
    }

    /// Starts a transfer of `expected_wrs` work requests to `peer`.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for zero WRs or when [`MAX_SLOTS`] transfers are in flight.
    pub fn begin(&mut self, peer: u32, expected_wrs: u64) -> Result<TransferId> {
        if expected_wrs == 0 {
            return Err(Error::InvalidArgument(
                "a transfer needs at least one WR".into(),
            ));
        }
        let slot = match self.free.pop() {
            Some(s) => s,
            None => {
                if self.slots.len() as u64 >= MAX_SLOTS as u64 {
                    return Err(Error::InvalidArgument(format!(
                        "{MAX_SLOTS} transfers in flight"
                    )));
                }
                self.slots.push(Slot::default());
                self.slots.len() as u32 - 1
            }
        };
        let s = &mut self.slots[slot as usize];
        s.active = Some(Active {
            peer,
            expected: expected_wrs,
            posted: 0,
            done: 0,
            reported: false,
        });
        self.active += 1;
        Ok(TransferId {
            slot,
            generation: s.generation,
        })
    }

    /// Slots in use (including reported transfers still draining).
    pub fn active(&self) -> usize {
        self.active
    }

    /// Whether `id` is in the table and not yet reported.
    pub fn is_active(&self, id: TransferId) -> bool {
        self.get(id).is_some_and(|a| !a.reported)
    }

    fn get(&self, id: TransferId) -> Option<&Active> {
        let s = self.slots.get(id.slot as usize)?;
        (s.generation == id.generation)
            .then_some(s.active.as_ref())
            .flatten()
    }

    fn get_mut(&mut self, id: TransferId) -> Option<&mut Active> {
        let s = self.slots.get_mut(id.slot as usize)?;
        if s.generation != id.generation {
            return None;
        }
        s.active.as_mut()
    }

    /// Records that `n` more WRs of `id` reached the send queue.
    pub fn posted(&mut self, id: TransferId, n: u64) {
        if let Some(a) = self.get_mut(id) {
            a.posted += n;
        }
    }

    fn retire(&mut self, id: TransferId) {
        if let Some(s) = self.slots.get_mut(id.slot as usize) {
            if s.generation == id.generation && s.active.take().is_some() {
                s.generation = s.generation.wrapping_add(1);
                self.free.push(id.slot);
                self.active -= 1;
            }
        }
    }

    /// Marks `id` reported with `result`; retires it when nothing it posted is outstanding.
    fn report(&mut self, id: TransferId, result: Result<()>) -> Option<Finished> {
        let a = self.get_mut(id)?;
        if a.reported {
            return None;
        }
        a.reported = true;
        let (peer, drained) = (a.peer, a.done >= a.posted);
        if drained {
            self.retire(id);
        }
        Some(Finished {
            id,
            peer,
            result,
            drained,
        })
    }

    /// Accounts a send-side completion: progress, the end of the transfer (all WRs done, or
    /// the first failure), or nothing for a stale completion.
    pub fn on_send_completion(&mut self, id: WrId, result: Result<()>) -> SendOutcome {
        let tid = TransferId {
            slot: id.slot,
            generation: id.generation,
        };
        let Some(a) = self.get_mut(tid) else {
            return SendOutcome {
                live: false,
                finished: None,
                drained: None,
            };
        };
        if let Err(e) = result {
            // The QP is in error now; its WRs will be flushed or the QP reset. Report once.
            let finished = self.report(tid, Err(e));
            return SendOutcome {
                live: true,
                finished,
                drained: None,
            };
        }
        a.done += id.count as u64;
        let mut drained = None;
        let finished = if a.reported {
            if a.done >= a.posted {
                self.retire(tid);
                drained = Some(tid);
            }
            None
        } else if a.done >= a.expected {
            debug_assert_eq!(
                a.done, a.expected,
                "a transfer completed more WRs than it has"
            );
            let peer = a.peer;
            self.retire(tid);
            Some(Finished {
                id: tid,
                peer,
                result: Ok(()),
                drained: true,
            })
        } else {
            None
        };
        SendOutcome {
            live: true,
            finished,
            drained,
        }
    }

    /// Ends a transfer early (posting failed, deadline passed): reported now, its slot kept
    /// until the WRs it already posted are covered.
    pub fn cancel(&mut self, id: TransferId, error: Error) -> Option<Finished> {
        self.report(id, Err(error))
    }

    /// Retires every transfer to `peer` because its QPs were reset (nothing of theirs is left in
    /// any queue). Returns those not reported yet, failed with `error`, and the ids of those
    /// reported earlier that are drained now.
    pub fn fail_peer(&mut self, peer: u32, error: &Error) -> (Vec<Finished>, Vec<TransferId>) {
        let ids: Vec<(TransferId, bool)> = self
            .slots
            .iter()
            .enumerate()
            .filter_map(|(i, s)| {
                let a = s.active.as_ref().filter(|a| a.peer == peer)?;
                Some((
                    TransferId {
                        slot: i as u32,
                        generation: s.generation,
                    },
                    a.reported,
                ))
            })
            .collect();
        let mut failed = Vec::new();
        let mut drained = Vec::new();
        for (id, reported) in ids {
            if reported {
                drained.push(id);
            } else {
                failed.push(Finished {
                    id,
                    peer,
                    result: Err(error.clone()),
                    drained: true,
                });
            }
            self.retire(id);
        }
        (failed, drained)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn wc(wr_id: u64, status: u32, opcode: u32) -> sys::ibv_wc {
        sys::ibv_wc {
            wr_id,
            status,
            opcode,
            qp_num: 0x77,
            vendor_err: 0x81,
            ..Default::default()
        }
    }

    #[test]
    fn every_status_maps_to_a_typed_error() {
        for v in 0..=24u32 {
            let s = WcStatus::from_sys(v);
            assert_eq!(s.to_sys(), v);
            let e = status_error(s, 1, 2, None);
            assert_eq!(e.is_none(), v == 0, "{s}");
        }
        let e = |s| status_error(WcStatus::from_sys(s), 5, 0, None).unwrap();
        assert!(matches!(
            e(sys::IBV_WC_RETRY_EXC_ERR),
            Error::PeerUnreachable { qp_num: 5, .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_RNR_RETRY_EXC_ERR),
            Error::ReceiverNotReady { .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_REM_ACCESS_ERR),
            Error::RemoteAccess { .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_REM_INV_REQ_ERR),
            Error::RemoteInvalidRequest { .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_LOC_PROT_ERR),
            Error::LocalProtection { .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_LOC_LEN_ERR),
            Error::LocalLength { .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_WR_FLUSH_ERR),
            Error::Flushed { after: None, .. }
        ));
        assert!(matches!(
            e(sys::IBV_WC_FATAL_ERR),
            Error::WorkCompletion { .. }
        ));
        assert!(e(sys::IBV_WC_REM_ACCESS_ERR)
            .to_string()
            .contains("bad remote key"));
        assert_eq!(WcStatus::from_sys(99), WcStatus::Unknown(99));
        assert_eq!(WcStatus::RetryExcErr.to_string(), "IBV_WC_RETRY_EXC_ERR");
    }

    #[test]
    fn flushes_name_the_first_failure() {
        let mut errs = QpErrors::default();
        let t = TransferId {
            slot: 3,
            generation: 9,
        };
        let first = classify(
            &wc(t.wr_id(WrKind::Write, 0), sys::IBV_WC_RETRY_EXC_ERR, 0),
            &mut errs,
        );
        assert!(matches!(
            first,
            Completion::Send {
                result: Err(Error::PeerUnreachable { .. }),
                ..
            }
        ));
        let flush = classify(
            &wc(t.wr_id(WrKind::Write, 2), sys::IBV_WC_WR_FLUSH_ERR, 0),
            &mut errs,
        );
        let Completion::Send { result: Err(e), .. } = flush else {
            panic!("{flush:?}")
        };
        assert!(
            matches!(&e, Error::Flushed { after: Some(b), .. } if matches!(**b, Error::PeerUnreachable { .. }))
        );
        assert!(e.to_string().contains("peer unreachable"), "{e}");
        errs.clear(0x77);
        assert!(errs.get(0x77).is_none());
    }

    #[test]
    fn receives_decode_immediates_in_host_order() {
        let mut errs = QpErrors::default();
        let mut c = wc(
            WrId {
                kind: WrKind::RecvImm,
                slot: 0,
                generation: 0,
                count: 0,
            }
            .encode(),
            0,
            sys::IBV_WC_RECV_RDMA_WITH_IMM,
        );
        c.wc_flags = sys::IBV_WC_WITH_IMM;
        c.imm_data = 0xdead_beefu32.to_be();
        assert!(matches!(
            classify(&c, &mut errs),
            Completion::Imm {
                imm: 0xdead_beef,
                qp_num: 0x77,
                ..
            }
        ));
        let mut m = wc(
            WrId {
                kind: WrKind::RecvMsg,
                slot: 12,
                generation: 0,
                count: 0,
            }
            .encode(),
            0,
            sys::IBV_WC_RECV,
        );
        m.byte_len = 100;
        assert!(matches!(
            classify(&m, &mut errs),
            Completion::Message {
                buf: 12,
                len: 100,
                imm: None,
                ..
            }
        ));
        assert!(matches!(
            classify(&wc(0, 0, 0), &mut errs),
            Completion::Unknown { .. }
        ));
        let bad = wc(
            WrId {
                kind: WrKind::RecvMsg,
                slot: 1,
                generation: 0,
                count: 0,
            }
            .encode(),
            sys::IBV_WC_LOC_LEN_ERR,
            0,
        );
        assert!(matches!(
            classify(&bad, &mut errs),
            Completion::RecvFailed {
                error: Error::LocalLength { .. },
                ..
            }
        ));
    }

    #[test]
    fn stale_completions_of_a_failed_transfer_are_dropped() {
        let mut t = TransferTable::new();
        let a = t.begin(1, 4).unwrap();
        t.posted(a, 4);
        let id = |tid: TransferId, count| WrId::decode(tid.wr_id(WrKind::Write, count)).unwrap();
        let o = t.on_send_completion(id(a, 2), Ok(()));
        assert!(o.live && o.finished.is_none());
        let o = t.on_send_completion(
            id(a, 0),
            Err(Error::PeerUnreachable {
                qp_num: 1,
                vendor_err: 0,
            }),
        );
        assert!(o.finished.unwrap().result.is_err());
        // Reported once; the flushes that follow change nothing.
        let o = t.on_send_completion(
            id(a, 2),
            Err(Error::Flushed {
                qp_num: 1,
                after: None,
            }),
        );
        assert!(o.live && o.finished.is_none());
        // The QP is reset: the slot is retired and reused with a new generation.
        let (failed, drained) = t.fail_peer(1, &Error::NotConnected(1));
        assert!(failed.is_empty(), "already reported");
        assert_eq!(drained, vec![a]);
        let b = t.begin(1, 1).unwrap();
        assert_eq!(b.slot, a.slot);
        assert_ne!(b.generation, a.generation);
        let o = t.on_send_completion(
            id(a, 2),
            Err(Error::Flushed {
                qp_num: 1,
                after: None,
            }),
        );
        assert!(!o.live && o.finished.is_none(), "stale");
        assert!(t.is_active(b));
        t.posted(b, 1);
        let f = t.on_send_completion(id(b, 1), Ok(())).finished.unwrap();
        assert!(f.result.is_ok());
        assert_eq!(t.active(), 0);
        assert!(t.begin(1, 0).is_err());
    }

    #[test]
    fn a_cancelled_transfer_keeps_its_slot_until_its_wrs_drain() {
        let mut t = TransferTable::new();
        let a = t.begin(3, 10).unwrap();
        t.posted(a, 6);
        let f = t
            .cancel(a, Error::Timeout(std::time::Duration::from_secs(1)))
            .unwrap();
        assert!(matches!(f.result, Err(Error::Timeout(_))));
        assert!(!f.drained);
        assert!(!t.is_active(a));
        assert_eq!(t.active(), 1, "still draining");
        let id = WrId::decode(a.wr_id(WrKind::Write, 4)).unwrap();
        let o = t.on_send_completion(id, Ok(()));
        assert!(o.live && o.finished.is_none());
        let id = WrId::decode(a.wr_id(WrKind::Write, 2)).unwrap();
        assert_eq!(t.on_send_completion(id, Ok(())).drained, Some(a));
        assert_eq!(t.active(), 0);
        assert!(t.cancel(a, Error::NotConnected(3)).is_none());
    }

    #[test]
    fn fail_peer_fails_only_that_peer() {
        let mut t = TransferTable::new();
        let a = t.begin(1, 3).unwrap();
        let b = t.begin(2, 3).unwrap();
        let c = t.begin(1, 3).unwrap();
        let f = t.fail_peer(
            1,
            &Error::ConnectionReset {
                peer: 1,
                reason: "test".into(),
            },
        );
        let mut ids: Vec<_> = f.0.iter().map(|f| f.id).collect();
        ids.sort_by_key(|i| i.slot);
        assert_eq!(ids, vec![a, c]);
        assert!(t.is_active(b) && !t.is_active(a));
    }

    proptest! {
        #[test]
        fn wr_id_round_trips(kind in 1u64..=4, slot in 0u32..MAX_SLOTS, generation in any::<u16>(), count in any::<u16>()) {
            let kind = WrId::decode(kind << 56).unwrap().kind;
            let id = WrId { kind, slot, generation, count };
            prop_assert_eq!(WrId::decode(id.encode()), Some(id));
            prop_assert_ne!(id.encode(), 0);
        }

        /// Transfers split into chunks of covered WRs finish exactly when all their WRs are
        /// covered, in any interleaving, and exactly once.
        #[test]
        fn transfers_finish_once_when_covered(
            sizes in proptest::collection::vec(proptest::collection::vec(1u16..5, 1..6), 1..8),
            order in proptest::collection::vec(any::<prop::sample::Index>(), 64),
        ) {
            let mut t = TransferTable::new();
            let mut pending: Vec<(TransferId, u16)> = Vec::new();
            let mut ids = Vec::new();
            for chunks in &sizes {
                let total: u64 = chunks.iter().map(|&c| c as u64).sum();
                let id = t.begin(0, total).unwrap();
                t.posted(id, total);
                ids.push(id);
                pending.extend(chunks.iter().map(|&c| (id, c)));
            }
            let mut finished = Vec::new();
            let mut k = 0;
            while !pending.is_empty() {
                let i = order[k % order.len()].index(pending.len());
                k += 1;
                let (id, c) = pending.remove(i);
                let done = t.on_send_completion(WrId::decode(id.wr_id(WrKind::Write, c)).unwrap(), Ok(())).finished;
                let last = !pending.iter().any(|(p, _)| *p == id);
                prop_assert_eq!(done.is_some(), last);
                if let Some(f) = done {
                    prop_assert!(f.result.is_ok());
                    finished.push(f.id);
                }
            }
            finished.sort_by_key(|i| i.slot);
            ids.sort_by_key(|i| i.slot);
            prop_assert_eq!(finished, ids);
            prop_assert_eq!(t.active(), 0);
        }
    }
}
