//! The worker's loop: take requests, poll every domain and what else needs polling, sleep when
//! idle; then drain and shut down.

use super::*;

impl Worker {
    pub(crate) fn run(mut self) {
        if let Some(cpu) = self.cfg.cpu {
            pin_to_cpu(cpu);
        }
        let mut last_busy = Instant::now();
        let mut nap = Duration::from_micros(20);
        let mut last_check = Instant::now();
        let mut spins = 0u32;
        'outer: loop {
            let mut busy = false;
            loop {
                match self.rx.try_recv() {
                    Ok(Request::Stop) => break 'outer,
                    Ok(req) => {
                        busy = true;
                        self.handle(req);
                    }
                    Err(TryRecvError::Empty) => break,
                    Err(TryRecvError::Disconnected) => break 'outer,
                }
            }
            for d in 0..self.group.len() {
                busy |= self.poll_domain(d) > 0;
            }
            if !self.copies.is_empty() {
                busy |= self.poll_copies();
            }
            if self.mailbox.is_some() {
                busy |= self.poll_mailbox();
            }
            if !self.watches.is_empty() {
                busy |= self.poll_watches();
            }
            if self.group.n_queued() > 0 {
                busy |= self.retry_pending();
            }
            if !self.landed_out.is_empty() {
                self.flush_landed();
                busy = true;
            }
            if !self.ctrl_out.is_empty() {
                busy |= self.flush_ctrl();
            }
            let now = Instant::now();
            if !self.revocations.is_empty() {
                self.finish_revocations(now);
            }
            if now.duration_since(last_check) >= Duration::from_millis(1) {
                last_check = now;
                self.check_deadlines(now);
                self.shared.imm.expire(now);
                self.check_vmm_leases();
            }
            if busy {
                last_busy = now;
                nap = Duration::from_micros(20);
            } else if now.duration_since(last_busy) > self.cfg.spin && self.watches.is_empty() {
                // Idle (watched counters are polled instead: they are the low-latency path).
                match self.sleep(nap) {
                    Woke::Request(Request::Stop) => break,
                    Woke::Request(req) => {
                        self.handle(req);
                        last_busy = Instant::now();
                        nap = Duration::from_micros(20);
                    }
                    Woke::Rung => {
                        last_busy = Instant::now();
                        nap = Duration::from_micros(20);
                    }
                    Woke::Timeout => {
                        let cap = if self.shared.imm.has_waiters() {
                            self.cfg.max_sleep.min(Duration::from_micros(50))
                        } else {
                            self.cfg.max_sleep
                        };
                        nap = (nap * 2).min(cap);
                    }
                }
            } else {
                // Spinning: give the core to any thread waiting for it (on a machine with
                // fewer cores than busy threads, the caller waiting for this future, or a peer
                // engine that must progress this write, would otherwise wait for a time
                // slice: tcp delivered 4 KiB p50 42 -> 20 us on the 2-core VM).
                spins = spins.wrapping_add(1);
                if spins % 4 == 0 {
                    std::thread::yield_now();
                } else {
                    std::hint::spin_loop();
                }
            }
        }
        self.drain_before_stop();
        self.shutdown();
        drop(self);
        // libfabric's endpoint buffers were allocated on this thread, in its malloc arena,
        // which glibc does not shrink by itself: give the freed pages back, or a process that
        // opens and closes engines grows by tens of megabytes each time.
        #[cfg(all(target_os = "linux", target_env = "gnu"))]
        // SAFETY: malloc_trim only releases free memory of the allocator's arenas.
        unsafe {
            libc::malloc_trim(0);
        }
    }

    fn handle(&mut self, req: Request) {
        match req {
            Request::Register {
                id,
                ptr,
                len,
                reply,
            } => {
                let _ = reply.send(self.register(id, ptr, len));
            }
            Request::RegisterHmem {
                id,
                ptr,
                len,
                device,
                reply,
            } => {
                let _ = reply.send(self.register_hmem(id, ptr, len, device));
            }
            Request::RegisterStaged {
                id,
                base,
                len,
                reply,
            } => {
                self.staged_regions.insert(id, (base, len));
                let _ = reply.send(Ok(()));
            }
            Request::Unregister { id, owner, reply } => self.start_revocation(id, owner, reply),
            Request::AddLease {
                lease,
                peer,
                region,
                desc,
            } => {
                let i = lease as usize;
                if self.leases.len() <= i {
                    self.leases.resize_with(i + 1, || Lease {
                        peer: u32::MAX,
                        region: 0,
                        desc: Vec::new(),
                        state: LeaseState::Closed(Error::Stopped),
                        parked: Vec::new(),
                        inflight: 0,
                    });
                }
                self.leases[i] = Lease {
                    peer,
                    region,
                    desc,
                    state: LeaseState::New,
                    parked: Vec::new(),
                    inflight: 0,
                };
                self.leases_of
                    .entry((peer, region))
                    .or_default()
                    .push(lease);
            }
            Request::AddPeer { id, addr } => self.add_peer(id, &addr),
            Request::AddRemoteGpu {
                peer,
                region,
                target,
                len,
            } => {
                let old = self.remote_gpu.insert(
                    (peer, region),
                    RemoteGpu {
                        target,
                        len,
                        mapping: None,
                        gone: None,
                    },
                );
                if let Some(old) = old {
                    self.retire(old);
                }
            }
            Request::Transfer(t) => self.start_transfer(*t),
            Request::Watch(mut w, reply) => {
                w.last = w.load();
                self.watches.push(*w);
                let _ = reply.send(());
                // Steps already due (the counter moved before the watch was armed).
                let i = self.watches.len() - 1;
                let now = self.watches[i].last;
                self.release_steps(i, 0, now);
            }
            Request::Unwatch { id } => {
                if let Some(i) = self.watches.iter().position(|w| w.id == id) {
                    let w = self.watches.swap_remove(i);
                    for req in w.steps {
                        req.state.complete(Err(Error::Stopped));
                    }
                }
            }
            Request::Trigger(t, reply) => {
                self.triggers.insert(t.imm, *t);
                let _ = reply.send(());
            }
            Request::Stop => {}
        }
    }

    fn shutdown(&mut self) {
        self.group.transfers.fail_all(&Error::Stopped);
        for w in self.watches.drain(..) {
            for req in w.steps {
                req.state.complete(Err(Error::Stopped));
            }
        }
        self.shared.imm.stop();
        self.shared.messages.stop();
        // Endpoints first: once closed, nothing a peer sends can land and nothing posted can
        // still read or write; then the registrations; then the memory of regions being
        // unregistered, once no staged copy can touch it.
        let mut domains = self.group.take_domains();
        for (d, dom) in domains.iter_mut().enumerate() {
            if let Err(e) = dom.close_endpoint() {
                eprintln!("stolon: closing the endpoint of domain {d}: {e}");
            }
        }
        for (id, mrs) in self.regions.drain() {
            for (d, mr) in mrs.into_iter().enumerate() {
                if let Err(e) = domains[d].close_mr(mr) {
                    eprintln!("stolon: closing region {id} on domain {d}: {e}");
                }
            }
        }
        let deadline = Instant::now() + Duration::from_secs(5);
        while let Some((ticket, _)) = self.copies.front() {
            if matches!(ticket.is_done(), Ok(false)) && Instant::now() < deadline {
                std::thread::sleep(Duration::from_micros(50));
                continue;
            }
            self.copies.pop_front();
        }
        for r in self.revocations.drain(..) {
            self.shared.release(r.owner);
            for reply in r.replies {
                let _ = reply.send(Ok(()));
            }
        }
        domains.clear();
        self.group.transfers.clear();
    }
}

#[cfg(target_os = "linux")]
fn pin_to_cpu(cpu: usize) {
    // SAFETY: cpu_set_t is plain data; CPU_SET writes inside it; sched_setaffinity(0) affects
    // only the calling thread.
    unsafe {
        let mut set: libc::cpu_set_t = std::mem::zeroed();
        libc::CPU_SET(cpu, &mut set);
        if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
            eprintln!("stolon: could not pin worker to CPU {cpu}");
        }
    }
}

#[cfg(not(target_os = "linux"))]
fn pin_to_cpu(_cpu: usize) {}
