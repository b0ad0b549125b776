//! The worker's side of `crate::lease`: leases on peers' regions (writer), revocations of its
//! own (owner), control messages, `Landed` answers, `Bye`.

use std::sync::atomic::Ordering;

use super::*;

/// Where a lease stands, on the writer's side.
pub(super) enum LeaseState {
    /// Not asked for yet (no op has needed it).
    New,
    /// Asked for at `since`; ops wait in `parked`.
    Requested {
        since: Instant,
    },
    Granted,
    /// The owner revoked it: no new op; `RevokeAck` once nothing is in flight.
    Revoking,
    /// Revoked and answered: every op fails.
    Revoked,
    /// Refused or revoked: every op fails with this.
    Closed(Error),
}

/// The writer's side of a lease on one remote descriptor.
pub(super) struct Lease {
    pub(super) peer: u32,
    pub(super) region: u64,
    pub(super) desc: Vec<u8>,
    pub(super) state: LeaseState,
    /// Ops waiting for the answer.
    pub(super) parked: Vec<Pending>,
    /// Ops accepted by the worker and not yet finished (parked, queued, posted).
    pub(super) inflight: usize,
}

/// A control message waiting to be sent.
pub(super) struct CtrlOut {
    pub(super) peer: u32,
    pub(super) body: Vec<u8>,
    /// The lease a request is for (a failed send fails the writes waiting for it).
    pub(super) lease: Option<u32>,
    pub(super) since: Instant,
}

/// A region being unregistered, closed once `finish_revocations` finds it safe.
pub(super) struct Revocation {
    pub(super) id: u64,
    /// Holders that have not answered `Revoke` yet.
    pub(super) waiting: HashSet<u32>,
    pub(super) deadline: Instant,
    pub(super) owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    pub(super) replies: Vec<std::sync::mpsc::SyncSender<Result<()>>>,
}

impl Worker {
    /// Whether `op` may be posted now: its lease is granted (Ok(true)), it was parked until the
    /// owner answers (Ok(false)), or the lease was refused or revoked (Err).
    pub(super) fn lease_gate(&mut self, op: Op, slot: u32) -> Result<bool> {
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
            LeaseState::Revoked => {
                return Err(Error::Rejected(format!(
                    "region {} of the peer was unregistered",
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

    /// Queues a control message to `peer`; sent as soon as a send buffer is free.
    pub(super) fn send_ctrl(&mut self, peer: u32, msg: Ctrl) {
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
    pub(super) fn flush_ctrl(&mut self) -> bool {
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
    pub(super) fn ctrl_failed(&mut self, peer: u32, token: u64, e: Error) {
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
    pub(super) fn answer_landed(&mut self, writer: u64, token: u64, region: u64, ok: bool) {
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
    pub(super) fn flush_landed(&mut self) {
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
    pub(super) fn refused(&mut self, domain: u8, region: u64, why: &str) {
        self.shared.stats[domain as usize]
            .rejected
            .fetch_add(1, Ordering::Relaxed);
        if self.logged_refusals.insert(region) {
            eprintln!("stolon: refused a write into region {region}: {why} (logged once)");
        }
    }

    /// A control message from the engine `from`.
    pub(super) fn on_ctrl(&mut self, domain: u8, from: u64, c: Ctrl) {
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
                    if matches!(l.state, LeaseState::Closed(_) | LeaseState::Revoked) {
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
                // Nothing of ours can reach the region (no lease, or all closed): say so now.
                let draining = self.leases_of.get(&(peer, region)).is_some_and(|v| {
                    v.iter()
                        .any(|&i| matches!(self.leases[i as usize].state, LeaseState::Revoking))
                });
                let answered = self.leases_of.get(&(peer, region)).is_some_and(|v| {
                    v.iter()
                        .any(|&i| matches!(self.leases[i as usize].state, LeaseState::Revoked))
                });
                if !draining && !answered {
                    self.send_ctrl(peer, Ctrl::RevokeAck { region });
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
                    // The answer leaves before the peer is marked gone (messages to gone
                    // peers are dropped), and nothing is sent to it after.
                    self.send_ctrl(peer, Ctrl::ByeAck);
                    self.peer_gone(peer);
                }
            }
            Ctrl::ByeAck => {
                if let Some(peer) = self.shared.peer_of_engine(from) {
                    self.bye_waiting.remove(&peer);
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
    pub(super) fn peer_gone(&mut self, peer: u32) {
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
        self.group.transfers.fail_peer(peer, &err);
        for h in self.holders.values_mut() {
            h.remove(&peer);
        }
        for r in &mut self.revocations {
            r.waiting.remove(&peer);
        }
    }

    /// The owner answered lease `lease`: post what was parked, or fail it with `refusal`.
    pub(super) fn lease_answered(&mut self, lease: u32, refusal: Option<Error>) {
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
    pub(super) fn release_lease(&mut self, lease: u32) {
        let Some(l) = self.leases.get_mut(lease as usize) else {
            return;
        };
        l.inflight = l.inflight.saturating_sub(1);
        self.maybe_ack_revoke(lease);
    }

    /// Answers the owner's `Revoke` for lease `lease` once nothing of it is in flight, and
    /// drops the NVLink mapping of the region (no copy can use it any more).
    pub(super) fn maybe_ack_revoke(&mut self, lease: u32) {
        let l = &mut self.leases[lease as usize];
        if !matches!(l.state, LeaseState::Revoking) || l.inflight > 0 {
            return;
        }
        let (peer, region) = (l.peer, l.region);
        l.state = LeaseState::Revoked;
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
    pub(super) fn start_revocation(
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
            self.shared.release(owner);
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
    pub(super) fn finish_revocations(&mut self, now: Instant) {
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
            self.shared.release(r.owner);
            for reply in r.replies {
                let _ = reply.send(result.clone());
            }
        }
    }

    /// Closes a region's registrations (every domain) and its staged entry.
    pub(super) fn close_region(&mut self, id: u64) -> Result<()> {
        self.staged_regions.remove(&id);
        let mut result = Ok(());
        if let Some(mrs) = self.regions.remove(&id) {
            for (d, mr) in mrs.into_iter().enumerate() {
                if let Err(e) = self.group[d].close_mr(mr) {
                    result = Err(e);
                }
            }
        }
        result
    }
}
