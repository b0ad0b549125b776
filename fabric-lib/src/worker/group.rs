//! The domain group a worker drives: its endpoints (1..16, one backend each), the ops each could
//! not take yet, and what the group can sleep on.

use std::collections::VecDeque;
use std::ops::{Index, IndexMut};

use super::Pending;
use crate::domain::Domain;

pub(super) struct DomainGroup {
    domains: Vec<Domain>,
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
