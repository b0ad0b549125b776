//! The data path of a [`VerbsDomain`]: planning and posting writes, sending messages, and
//! polling the completion queue.

use std::time::Instant;

use crate::completion::{self, Completion, TransferId, WrKind};
use crate::error::{Error, Result};
use crate::handshake::Phase;
use crate::qp::AnyQp;
use crate::sys;
use crate::wr::{self, WritePlan, WriteSeg};

use super::event::{DomainEvent, PeerId};
use super::verbs_domain::VerbsDomain;

impl VerbsDomain {
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
