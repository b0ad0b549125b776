//! Completions: the CQs polled, each completion mapped to its op, messages and staged chunks
//! received, staged copies advanced.

use std::sync::atomic::Ordering;

use super::*;

impl Worker {
    pub(super) fn poll_domain(&mut self, d: usize) -> usize {
        const BATCH: usize = 64;
        // Reused across polls (the provider overwrites the entries it returns); a poll nested in
        // completion handling (a repost that met a full queue) gets its own.
        let mut entries = std::mem::take(&mut self.cq_entries);
        if entries.is_empty() {
            entries = cq_entry_buffer(BATCH);
        }
        let mut total = 0;
        loop {
            match self.group[d].poll(&mut entries) {
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

    pub(super) fn on_completion(
        &mut self,
        d: usize,
        ctx: *mut c_void,
        flags: u64,
        len: usize,
        data: u64,
    ) {
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
            Tag::Send {
                slot,
                lease,
                buf,
                domain,
                len,
                token,
            } => {
                // The engine's own control messages are not the user's traffic.
                if slot != CTRL {
                    let s = &self.shared.stats[domain as usize];
                    s.messages_sent.fetch_add(1, Ordering::Relaxed);
                    s.bytes_sent.fetch_add(len as u64, Ordering::Relaxed);
                }
                self.free_send.push(buf);
                // A delivered staged chunk is done when the owner says it landed (it is
                // registered in `awaiting_landed` since it was posted).
                if token == 0 || slot == CTRL {
                    self.done(slot, lease, None, Ok(()));
                }
            }
            Tag::Recv { domain, buf } => self.on_message(domain, buf, len),
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
    pub(super) fn on_message(&mut self, domain: u8, buf: u32, _len: usize) {
        let (p, size) = self.msg_buf(buf as usize);
        // SAFETY: the provider wrote the message into this receive buffer of `size` bytes.
        let bytes = unsafe { std::slice::from_raw_parts(p, size) };
        let header = Header::decode(bytes).filter(|h| h.len as usize <= size - HEADER);
        if header.is_some_and(|h| h.kind != KIND_CTRL) {
            self.shared.stats[domain as usize]
                .messages_received
                .fetch_add(1, Ordering::Relaxed);
        }
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

    pub(super) fn on_error(&mut self, d: usize, e: CqError) {
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

    /// Advances staged copies that have finished (in submission order).
    pub(super) fn poll_copies(&mut self) -> bool {
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
                            self.group.queue(Pending { op, slot });
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

    pub(super) fn copy_failed(&mut self, after: AfterCopy, e: Error) {
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
}
