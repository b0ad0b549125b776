//! Transfers: planning the ops of writes, paged writes, scatters and immediates, submitting
//! them, and the two-sided path, barrier, triggers and watches.

use std::any::Any;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use super::*;

impl TransferEngine {
    /// The ops of planned writes to `dsts`, reached through `routes` (peer, lease) each.
    pub(super) fn write_ops(
        &self,
        plans: &[OpPlan],
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        routes: &[(u32, u32)],
        imm: Option<u32>,
    ) -> Vec<Op> {
        let delivered = self.config.completion == Completion::Delivered;
        use crate::staging::Mem;
        // The path depends only on the destination: chosen once per destination, not per op.
        let paths: Vec<Path> = dsts.iter().map(|d| self.path(src, d)).collect();
        plans
            .iter()
            .map(|p| {
                let dst = dsts[p.dst];
                let rd = p.domain % dst.owner.domains.len();
                let at = src.inner.ptr + p.src_off as usize;
                let src_mem = match src.inner.mem {
                    RegionMem::Gpu(_) | RegionMem::GpuDirect(_) => Mem::Gpu(at as u64),
                    RegionMem::Host | RegionMem::StagedHost => Mem::Host(at),
                };
                let path = paths[p.dst];
                let kind = if path == Path::Nvlink {
                    OpKind::NvlinkCopy {
                        src: at as u64,
                        len: p.len as usize,
                        region: dst.region_id,
                        offset: p.dst_off,
                        imm,
                    }
                } else if path == Path::Staged && dst.gpu.as_ref().is_some_and(|g| !g.direct) {
                    OpKind::StagedSend {
                        src: src_mem,
                        len: p.len as usize,
                        region: dst.region_id,
                        offset: p.dst_off,
                        imm,
                    }
                } else if path == Path::Staged {
                    OpKind::StagedWrite {
                        src: src_mem,
                        len: p.len as usize,
                        raddr: dst.remote_addr(rd, p.dst_off),
                        rkey: dst.keys[rd],
                        imm,
                    }
                } else {
                    OpKind::Write {
                        region: src.inner.id,
                        src: at,
                        len: p.len as usize,
                        raddr: dst.remote_addr(rd, p.dst_off),
                        rkey: dst.keys[rd],
                        imm,
                    }
                };
                Op {
                    domain: p.domain,
                    peer: routes[p.dst].0,
                    kind,
                    lease: routes[p.dst].1,
                    delivered,
                }
            })
            .collect()
    }

    pub(super) fn prepared(
        &self,
        ops: Vec<Op>,
        keep: Vec<crate::worker::KeepAlive>,
        payload: Option<Vec<u8>>,
        imm_counts: Vec<usize>,
        timeout: Option<Duration>,
    ) -> Prepared {
        Prepared {
            ops,
            keep,
            payload,
            imm_counts,
            timeout: timeout.unwrap_or(self.config.timeout),
            engine_id: self.addr.engine_id,
        }
    }

    pub(super) fn check_prepared(&self, p: &Prepared) -> Result<()> {
        if p.engine_id != self.addr.engine_id {
            return Err(Error::InvalidArgument(
                "the prepared transfer belongs to another engine".into(),
            ));
        }
        Ok(())
    }

    /// Turns a prepared transfer into a request and the caller's handle.
    pub(super) fn to_request(&self, p: Prepared) -> (TransferReq, Transfer) {
        let state = TransferState::new(self.sink.clone());
        let t = Transfer {
            state: state.clone(),
            imm_counts: p.imm_counts.into(),
        };
        let req = TransferReq {
            ops: p.ops,
            state,
            deadline: Instant::now() + p.timeout,
            timeout: p.timeout,
            keep: p.keep,
            payload: p.payload,
        };
        (req, t)
    }

    /// Submits a transfer made by one of the `prepare_*` methods.
    pub fn submit(&self, p: Prepared) -> Result<Transfer> {
        self.check_prepared(&p)?;
        let (req, t) = self.to_request(p);
        self.send_req(Request::Transfer(Box::new(req)))?;
        Ok(t)
    }

    /// Writes `len` bytes from `src[src_off..]` into the remote region at `dst_off`, with an
    /// optional immediate; large writes are sharded over the group's domains.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_write(src, src_off, dst, dst_off, len, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::write`] without submitting it.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_write(
        &self,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        self.check_local(src, src_off, len)?;
        dst.check_range(dst_off, len)?;
        let route = self.route(src, dst)?;
        let sharding = sharding.unwrap_or(self.config.sharding);
        let plans = self.params_for(src, dst).plan_single(
            sharding,
            self.rotation(),
            src_off,
            dst_off,
            len,
        )?;
        let counts = vec![if imm.is_some() { plans.len() } else { 0 }];
        let ops = self.write_ops(&plans, src, &[dst], &[route], imm);
        Ok(self.prepared(ops, vec![src.keep_alive()], None, counts, timeout))
    }

    /// Immediates a receiver gets from [`Self::write`] of `len` bytes with an immediate;
    /// `staged` when the source or the destination is GPU memory moved through staging.
    pub fn imm_count_write(&self, len: u64, sharding: Option<Sharding>, staged: bool) -> usize {
        let p = if staged {
            &self.staged_params
        } else {
            &self.params
        };
        p.imm_count_single(sharding.unwrap_or(self.config.sharding), len)
    }

    /// Sends only an immediate to `peer` (a zero-byte write into its scratch region).
    pub fn write_imm(
        &self,
        peer: &PeerAddr,
        imm: u32,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_write_imm(peer, imm, timeout)?)
    }

    /// Validates and plans a [`Self::write_imm`] without submitting it.
    pub fn prepare_write_imm(
        &self,
        peer: &PeerAddr,
        imm: u32,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let id = self.peer_id(peer)?;
        let d = self.rotation() % self.addr.domains.len();
        let rd = d % peer.domains.len();
        let op = Op {
            domain: d,
            peer: id,
            kind: OpKind::Write {
                region: crate::worker::INTERNAL_REGION,
                src: 0,
                len: 0,
                raddr: peer.domains[rd].scratch_addr,
                rkey: peer.domains[rd].scratch_key,
                imm: Some(imm),
            },
            // The scratch region lives as long as the peer's worker: no lease.
            lease: NO_LEASE,
            delivered: self.config.completion == Completion::Delivered,
        };
        Ok(self.prepared(vec![op], Vec::new(), None, vec![1], timeout))
    }

    /// Writes pages `spec.src_pages[i]` of `src` to pages `spec.dst_pages[i]` of `dst`.
    pub fn write_paged(
        &self,
        src: &MemoryRegion,
        dst: &MemDesc,
        spec: &PagedSpec,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_paged(src, dst, spec, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::write_paged`] without submitting it.
    pub fn prepare_paged(
        &self,
        src: &MemoryRegion,
        dst: &MemDesc,
        spec: &PagedSpec,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let (src_end, dst_end) = spec.extents()?;
        if !spec.src_pages.is_empty() {
            self.check_local(src, 0, src_end)?;
            dst.check_range(0, dst_end)?;
        } else {
            self.check_local(src, 0, 0)?;
        }
        let route = self.route(src, dst)?;
        let sharding = sharding.unwrap_or(self.config.sharding);
        let plans = self
            .params_for(src, dst)
            .plan_paged(sharding, self.rotation(), spec)?;
        let counts = vec![if imm.is_some() { plans.len() } else { 0 }];
        let ops = self.write_ops(&plans, src, &[dst], &[route], imm);
        Ok(self.prepared(ops, vec![src.keep_alive()], None, counts, timeout))
    }

    /// Immediates a receiver gets from a paged write of `pages` pages of `page_bytes`.
    pub fn imm_count_paged(&self, pages: usize, page_bytes: u64, staged: bool) -> usize {
        let p = if staged {
            &self.staged_params
        } else {
            &self.params
        };
        p.imm_count_paged(pages, page_bytes)
    }

    /// Writes one source region to many destinations; destination `i` of `dsts` is reached
    /// through domain `i % n` (RoundRobin) so peers spread over the NICs.
    pub fn scatter(
        &self,
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        items: &[ScatterItem],
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_scatter(src, dsts, items, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::scatter`] without submitting it.
    pub fn prepare_scatter(
        &self,
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        items: &[ScatterItem],
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let mut routes = Vec::with_capacity(dsts.len());
        for d in dsts {
            routes.push(self.route(src, d)?);
        }
        for it in items {
            let dst = dsts.get(it.dst).ok_or_else(|| {
                Error::InvalidArgument(format!("destination {} of {}", it.dst, dsts.len()))
            })?;
            self.check_local(src, it.src_off, it.len)?;
            dst.check_range(it.dst_off, it.len)?;
        }
        let sharding = sharding.unwrap_or(self.config.sharding);
        // Each item is cut as a single write to its destination would be, by that
        // destination's path: one copy over NVLink, staging-buffer chunks when staged, the
        // fabric's op size otherwise ([`Self::imm_count_for`] counts an item the same way).
        let params: Vec<&ShardParams> = dsts.iter().map(|d| self.params_for(src, d)).collect();
        let rotation = self.rotation();
        let mut plans = Vec::with_capacity(items.len());
        for (k, it) in items.iter().enumerate() {
            // Item k starts on domain (rotation + k), as in ShardParams::plan_scatter.
            plans.extend(params[it.dst].plan_scatter(sharding, rotation + k, &[*it])?);
        }
        let mut counts = vec![0usize; dsts.len()];
        if imm.is_some() {
            for p in &plans {
                counts[p.dst] += 1;
            }
        }
        let ops = self.write_ops(&plans, src, dsts, &routes, imm);
        Ok(self.prepared(ops, vec![src.keep_alive()], None, counts, timeout))
    }

    /// Sends a message to `peer`'s receive pool.
    pub fn send(
        &self,
        peer: &PeerAddr,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        let max = self.config.max_message_bytes.min(peer.max_message as usize);
        if data.len() > max {
            return Err(Error::MessageTooLarge {
                len: data.len(),
                max,
            });
        }
        let id = self.peer_id(peer)?;
        let d = self.rotation() % self.addr.domains.len();
        let op = Op {
            domain: d,
            peer: id,
            kind: OpKind::Send,
            lease: NO_LEASE,
            delivered: false,
        };
        self.submit(self.prepared(vec![op], Vec::new(), Some(data.to_vec()), vec![0], timeout))
    }

    /// Takes the next received message, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.check_process()?;
        self.shared.messages.pop(timeout)
    }

    /// Delivers received messages to `cb` (on the callback thread) instead of `recv`.
    pub fn on_message(&self, cb: Option<MessageCallback>) {
        *self.shared.messages.callback.lock().unwrap() = cb;
    }

    /// Waits until every other engine in `peers` has reached the barrier with the same `imm`.
    ///
    /// Each member sends one immediate to every other member and waits for one from each. The
    /// immediate value must not be used for anything else while the barrier runs.
    pub fn barrier(&self, peers: &[PeerAddr], imm: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let others: Vec<&PeerAddr> = peers
            .iter()
            .filter(|p| p.engine_id != self.addr.engine_id)
            .collect();
        let mut sent = Vec::with_capacity(others.len());
        for p in &others {
            sent.push(self.write_imm(p, imm, Some(timeout))?);
        }
        for t in sent {
            t.wait(deadline.saturating_duration_since(Instant::now()))?;
        }
        self.shared.imm.wait(
            imm,
            others.len() as u64,
            deadline.saturating_duration_since(Instant::now()),
        )
    }

    /// Arms a trigger: each of the next `times` arrivals of `imm` makes the worker itself post a
    /// write of `len` bytes from `src[src_off..]` to `dst` at `dst_off` carrying `reply_imm`,
    /// without involving any other thread. Triggered arrivals are not counted by the counter.
    /// Returns once the trigger is armed: arrivals from then on fire it.
    #[allow(clippy::too_many_arguments)]
    pub fn trigger_write(
        &self,
        imm: u32,
        times: u64,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        reply_imm: Option<u32>,
    ) -> Result<()> {
        if times == 0 {
            return Ok(());
        }
        self.check_local(src, src_off, len)?;
        dst.check_range(dst_off, len)?;
        let route = self.route(src, dst)?;
        let plans = self
            .params
            .plan_single(Sharding::Pinned(0), 0, src_off, dst_off, len)?;
        let ops = self.write_ops(&plans, src, &[dst], &[route], reply_imm);
        let trigger = Trigger {
            imm,
            times,
            ops,
            _keep: vec![src.keep_alive()],
        };
        self.ask_worker(|reply| Request::Trigger(Box::new(trigger), reply))
    }

    /// Watches a 64-bit counter that other code (a GPU kernel, a stream memory operation, another
    /// thread) increments. The worker reads it on every loop; when it changes from `old` to
    /// `new`, `callback(old, new)` runs on the callback thread, and the prepared transfer `i` of
    /// `steps` is submitted by the worker itself as soon as the counter reaches `i + 1`. Returns
    /// the watch id and one [`Transfer`] per step.
    ///
    /// # Safety
    /// `ptr` must point to an 8-byte-aligned u64 that stays valid (and is only written
    /// atomically) until the watch is removed or the engine stops; `owner` is kept alive that
    /// long, which is the usual way to ensure it.
    pub unsafe fn watch(
        &self,
        ptr: usize,
        owner: Option<Box<dyn Any + Send + Sync>>,
        callback: Option<WatchCallback>,
        steps: Vec<Prepared>,
    ) -> Result<(u64, Vec<Transfer>)> {
        if ptr == 0 || ptr % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "counter address {ptr:#x} must be non-null and 8-byte aligned"
            )));
        }
        for p in &steps {
            self.check_prepared(p)?;
        }
        let mut reqs = Vec::with_capacity(steps.len());
        let mut handles = Vec::with_capacity(steps.len());
        for p in steps {
            let (req, t) = self.to_request(p);
            reqs.push(req);
            handles.push(t);
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let sink = self.sink.clone();
        let callback = callback.map(|cb| {
            let cb: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::from(cb);
            Box::new(move |old: u64, new: u64| {
                let cb = cb.clone();
                sink.submit(Box::new(move || cb(old, new)));
            }) as Box<dyn Fn(u64, u64) + Send>
        });
        let watch = crate::worker::Watch::new(id, ptr, owner, callback, reqs);
        self.ask_worker(|reply| Request::Watch(Box::new(watch), reply))?;
        Ok((id, handles))
    }

    /// Removes a watch; steps not yet submitted fail with [`Error::Stopped`].
    pub fn unwatch(&self, id: u64) -> Result<()> {
        self.send_req(Request::Unwatch { id })
    }
}
