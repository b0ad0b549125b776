//! The domain group a worker drives: its endpoints (1..16, one backend each), the ops each could
//! not take yet, the transfers their ops add up to, and what the group can sleep on. (How a
//! transfer is cut into ops for the group is planned on the caller's thread, `crate::shard`,
//! from the group's parameters, so the worker only posts.)

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};
use std::time::Instant;

use super::{Active, Pending};
use crate::domain::Domain;
use crate::error::Error;

pub(super) struct DomainGroup {
    domains: Vec<Domain>,
    /// The transfers in flight: each completion of an op counts against its transfer.
    pub(super) transfers: Transfers,
    /// Ops waiting for queue space, per domain (FIFO, retried front first).
    queued: Vec<VecDeque<Pending>>,
    /// Ops waiting in all queues.
    n_queued: usize,
}

impl DomainGroup {
    pub(super) fn new(domains: Vec<Domain>) -> Self {
        let queued = domains.iter().map(|_| VecDeque::new()).collect();
        DomainGroup {
            domains,
            transfers: Transfers::default(),
            queued,
            n_queued: 0,
        }
    }

    pub(super) fn len(&self) -> usize {
        self.domains.len()
    }

    pub(super) fn iter(&self) -> std::slice::Iter<'_, Domain> {
        self.domains.iter()
    }

    /// Queues an op behind those its domain already holds.
    pub(super) fn queue(&mut self, p: Pending) {
        self.queued[p.op.domain].push_back(p);
        self.n_queued += 1;
    }

    /// Puts back an op its domain refused again, at the front (it keeps its turn).
    pub(super) fn requeue_front(&mut self, d: usize, p: Pending) {
        self.queued[d].push_front(p);
        self.n_queued += 1;
    }

    /// The oldest op queued on domain `d`.
    pub(super) fn take_queued(&mut self, d: usize) -> Option<Pending> {
        let p = self.queued[d].pop_front()?;
        self.n_queued -= 1;
        Some(p)
    }

    /// Whether domain `d` holds queued ops (a new op must wait behind them).
    pub(super) fn has_queued(&self, d: usize) -> bool {
        !self.queued[d].is_empty()
    }

    /// Ops queued on all domains.
    pub(super) fn n_queued(&self) -> usize {
        self.n_queued
    }

    /// Whether every domain has a completion-queue descriptor to sleep on.
    pub(super) fn all_wait_fds(&self) -> bool {
        self.domains.iter().all(|d| d.wait_fd().is_some())
    }

    /// Whether every domain either has a wait descriptor or serves only peers of this host,
    /// which ring the engine's doorbell when they post to it (shm).
    pub(super) fn rung_or_waitable(&self) -> bool {
        self.domains
            .iter()
            .all(|d| d.wait_fd().is_some() || is_host_local(&d.attrs().provider))
    }

    /// The wait descriptors of the domains that have one.
    pub(super) fn wait_fds(&self) -> impl Iterator<Item = std::os::fd::RawFd> + '_ {
        self.domains.iter().filter_map(|d| d.wait_fd())
    }

    /// `fi_trywait` on every domain with a descriptor: true if all agree that nothing is
    /// pending, so the worker may sleep on the descriptors.
    pub(super) fn trywait(&mut self) -> bool {
        self.domains
            .iter_mut()
            .filter(|d| d.wait_fd().is_some())
            .all(|d| d.trywait())
    }

    /// Hands the domains over for shutdown; the queued ops are dropped (their transfers are
    /// failed by then).
    pub(super) fn take_domains(&mut self) -> Vec<Domain> {
        self.queued.iter_mut().for_each(VecDeque::clear);
        self.n_queued = 0;
        std::mem::take(&mut self.domains)
    }
}

/// Transfers in flight, by slot: how many of each transfer's ops are still out, and its result
/// once known (the first error, a deadline, or success when the last op finishes).
#[derive(Default)]
pub(super) struct Transfers {
    slots: Vec<Option<Active>>,
    free: Vec<u32>,
}

impl Transfers {
    /// Takes a slot for a transfer.
    pub(super) fn start(&mut self, a: Active) -> u32 {
        match self.free.pop() {
            Some(s) => {
                self.slots[s as usize] = Some(a);
                s
            }
            None => {
                self.slots.push(Some(a));
                (self.slots.len() - 1) as u32
            }
        }
    }

    pub(super) fn get(&self, slot: u32) -> Option<&Active> {
        self.slots.get(slot as usize).and_then(Option::as_ref)
    }

    /// Whether the transfer in `slot` still wants its ops posted (it has not failed or timed
    /// out).
    pub(super) fn is_live(&self, slot: u32) -> bool {
        self.get(slot).is_some_and(|a| !a.reported)
    }

    /// One op of `slot` finished with `result`: the transfer fails at its first error and
    /// succeeds when its last op finishes without one; its slot is freed then.
    pub(super) fn op_finished(&mut self, slot: u32, result: Result<(), Error>) {
        let Some(Some(a)) = self.slots.get_mut(slot as usize) else {
            return;
        };
        a.remaining -= 1;
        if let Err(e) = result {
            a.fail(e);
        }
        if a.remaining == 0 {
            if !a.reported {
                a.state.complete(Ok(()));
            }
            self.slots[slot as usize] = None;
            self.free.push(slot);
        }
    }

    /// Fails the transfers whose deadline has passed (their ops still drain).
    pub(super) fn expire(&mut self, now: Instant) {
        for a in self.slots.iter_mut().flatten() {
            if a.deadline <= now {
                let timeout = a.timeout;
                a.fail(Error::Timeout(timeout));
            }
        }
    }

    /// Fails every transfer with an op to `peer`.
    pub(super) fn fail_peer(&mut self, peer: u32, err: &Error) {
        for a in self.slots.iter_mut().flatten() {
            if a.peers.contains(&peer) {
                a.fail(err.clone());
            }
        }
    }

    /// Fails every transfer (the engine is stopping).
    pub(super) fn fail_all(&mut self, err: &Error) {
        for a in self.slots.iter_mut().flatten() {
            a.fail(err.clone());
        }
    }

    /// Whether no transfer is in flight.
    pub(super) fn is_empty(&self) -> bool {
        self.slots.iter().all(Option::is_none)
    }

    /// Forgets every transfer (after shutdown has failed them).
    pub(super) fn clear(&mut self) {
        self.slots.clear();
        self.free.clear();
    }
}

impl Active {
    /// Reports `err` as the transfer's result unless one was reported already.
    fn fail(&mut self, err: Error) {
        if !self.reported {
            self.reported = true;
            self.state.complete(Err(err));
        }
    }
}

impl Index<usize> for DomainGroup {
    type Output = Domain;
    fn index(&self, d: usize) -> &Domain {
        &self.domains[d]
    }
}

impl IndexMut<usize> for DomainGroup {
    fn index_mut(&mut self, d: usize) -> &mut Domain {
        &mut self.domains[d]
    }
}

/// Whether every peer of a domain of `provider` is on this host (and so can ring its doorbell).
fn is_host_local(provider: &str) -> bool {
    provider.split(';').next() == Some("shm")
}
