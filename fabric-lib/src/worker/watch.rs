//! Watched counters and triggers (ops posted by the worker itself), the NVLink mailbox and the
//! mappings of peers' GPU regions.

use std::sync::atomic::Ordering;

use super::*;

impl Worker {
    /// Reads every watched counter; returns true if any changed.
    pub(super) fn poll_watches(&mut self) -> bool {
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
    pub(super) fn release_steps(&mut self, i: usize, _old: u64, now: u64) {
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
    pub(super) fn fire_trigger(&mut self, imm: u32) -> bool {
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

    /// Ends VMM mappings whose owner ended the lease (region unregistered, engine stopped,
    /// process dead): later writes to them fail; the mapping goes once no queued copy can use
    /// it.
    pub(super) fn check_vmm_leases(&mut self) {
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
    pub(super) fn retire(&mut self, rg: RemoteGpu) {
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
    pub(super) fn push_mailbox(&mut self, peer: u32, imm: u32) -> Result<bool> {
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
    pub(super) fn poll_mailbox(&mut self) -> bool {
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
}
