//! Taking and posting ops: transfers in, each op kind posted, queued ops retried, finished
//! ops accounted.

use std::sync::atomic::Ordering;

use super::*;

impl Worker {
    pub(super) fn start_transfer(&mut self, t: TransferReq) {
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
        let mut peers: Vec<u32> = ops.iter().map(|o| o.peer).collect();
        peers.sort_unstable();
        peers.dedup();
        let slot = self.group.transfers.start(Active {
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
    pub(super) fn post_or_queue(&mut self, op: Op, slot: u32) {
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
    pub(super) fn post_or_queue_counted(&mut self, op: Op, slot: u32) {
        if self.group.has_queued(op.domain) {
            self.group.queue(Pending { op, slot });
            return;
        }
        match self.try_post(op, slot) {
            Ok(true) => {}
            Ok(false) => self.group.queue(Pending { op, slot }),
            Err(e) => self.op_done(op, slot, Err(e)),
        }
    }

    /// Returns Ok(true) when posted (or parked until its lease is answered), Ok(false) when it
    /// must be retried.
    pub(super) fn try_post(&mut self, op: Op, slot: u32) -> Result<bool> {
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
                let dom = &self.group[d];
                if !op.delivered && dom.attrs().use_inject && len <= dom.attrs().inject_size {
                    // SAFETY: src..src+len lies in a registered region (checked by the engine)
                    // and is only read during the call; raddr/rkey come from a validated
                    // descriptor.
                    let r = unsafe {
                        self.group[d].inject_write(
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
                            self.ring(op.peer, d);
                            self.poll_domain(d);
                            Ok(false)
                        }
                    };
                }
                let desc = mrs[d].desc();
                let lease = op.lease;
                let tag = Tag::Transfer {
                    slot,
                    lease,
                    region,
                    domain: d as u8,
                    len,
                };
                let ctx = self.alloc_ctx(tag);
                // SAFETY: src..src+len lies in a registered region (checked by the engine
                // before submitting) that the transfer keeps alive until this op completes;
                // raddr/rkey were derived from a validated descriptor; ctx is a stable slab
                // block released only when its completion is read.
                let r = unsafe {
                    self.group[d].post_write(
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
                let payload = self
                    .group
                    .transfers
                    .get(slot)
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
    pub(super) fn post_from_send_buf(
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
                    self.group[d].post_write(
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
                let r = unsafe { self.group[d].post_send(p, HEADER + len, desc, dest, ctx) };
                self.finish_post(op.peer, d, ctx, r)
            }
        };
        if !matches!(r, Ok(true)) {
            self.free_send.push(buf);
        }
        r
    }

    pub(super) fn finish_post(
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
                        // "Again" may mean the peer has not progressed our connection yet: a
                        // sleeping peer without a wait descriptor must be rung for that too.
                        self.ring(peer, d);
                        self.poll_domain(d);
                        Ok(false)
                    }
                    Err(e) => Err(e),
                }
            }
        }
    }

    /// Retries queued ops, front first, until a domain says "again".
    pub(super) fn retry_pending(&mut self) -> bool {
        let mut progressed = false;
        for d in 0..self.group.len() {
            while let Some(p) = self.group.take_queued(d) {
                if !self.is_live(p.slot) {
                    // Its transfer already failed or timed out: drop the op.
                    self.op_done(p.op, p.slot, Ok(()));
                    progressed = true;
                    continue;
                }
                match self.try_post(p.op, p.slot) {
                    Ok(true) => progressed = true,
                    Ok(false) => {
                        self.group.requeue_front(d, p);
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
    pub(super) fn is_live(&self, slot: u32) -> bool {
        slot == TRIGGERED || slot == CTRL || self.group.transfers.is_live(slot)
    }

    /// Accounts one finished op: releases what [`Self::post_or_queue`] counted, then the op's
    /// share of its transfer.
    pub(super) fn op_done(&mut self, op: Op, slot: u32, result: Result<()>) {
        let local = match op.kind {
            OpKind::Write { region, .. } => Some(region),
            _ => None,
        };
        self.done(slot, op.lease, local, result);
    }

    /// [`Self::op_done`] from the parts a completion keeps: the slot, the lease, the local
    /// region a `Write` reads.
    pub(super) fn done(&mut self, slot: u32, lease: u32, local: Option<u64>, result: Result<()>) {
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
        self.group.transfers.op_finished(slot, result);
    }

    pub(super) fn check_deadlines(&mut self, now: Instant) {
        self.group.transfers.expire(now);
        let _ = &self.waiting_sends;
    }
}
