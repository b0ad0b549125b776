//! How an idle worker waits: the doorbell, `sleep`, and the drain before stopping.

use std::sync::atomic::Ordering;

use super::*;

/// A same-host doorbell: an abstract Unix datagram socket named after the engine, for the
/// providers whose completion queue has no wait descriptor (shm; udp and net between processes
/// of one host). A peer rings it when it posts to this engine (at most once a millisecond), so
/// an idle worker sleeps until traffic instead of napping. The worker spins for `spin` after a
/// ring, which covers the writes that follow without a ring each.
pub(super) struct Doorbell {
    pub(super) sock: std::os::unix::net::UnixDatagram,
}

impl Doorbell {
    pub(super) fn name(engine_id: u64) -> String {
        format!("stolon-bell-{engine_id:016x}")
    }

    pub(super) fn addr(engine_id: u64) -> Option<std::os::unix::net::SocketAddr> {
        use std::os::linux::net::SocketAddrExt;
        std::os::unix::net::SocketAddr::from_abstract_name(Self::name(engine_id)).ok()
    }

    pub(super) fn bind(engine_id: u64) -> Option<Self> {
        let sock = std::os::unix::net::UnixDatagram::bind_addr(&Self::addr(engine_id)?).ok()?;
        sock.set_nonblocking(true).ok()?;
        Some(Doorbell { sock })
    }

    /// Empties the socket; true if anything had rung.
    pub(super) fn drain(&self) -> bool {
        let mut b = [0u8; 16];
        let mut rang = false;
        while self.sock.recv(&mut b).is_ok() {
            rang = true;
        }
        rang
    }
}

/// The longest sleep on a doorbell alone (see [`Worker::sleep`]): a peer that cannot ring waits
/// at most this long for its transfer to progress.
const BELL_ONLY_SLEEP: Duration = Duration::from_millis(10);

/// Why the worker woke up.
pub(super) enum Woke {
    Request(Request),
    /// Its doorbell rang or a completion queue's descriptor fired: traffic is arriving.
    Rung,
    Timeout,
}

impl Worker {
    /// Before closing: lets revocations in progress finish (their holders answer within
    /// microseconds unless dead; bounded by the revoke timeout) and control messages leave, so
    /// no peer is left sending an answer to an endpoint that is closing.
    pub(super) fn drain_before_stop(&mut self) {
        // Revocations in progress first: their holders must still be able to answer.
        let deadline = Instant::now() + self.cfg.revoke_timeout;
        while !self.revocations.is_empty() && Instant::now() < deadline {
            self.progress_once();
        }
        // Then every peer hears `Bye`, so its transfers here fail now rather than at their
        // deadline, and answers once it will send nothing more here.
        let known: Vec<u32> = self
            .peers
            .iter()
            .filter(|(id, p)| p.addrs.is_ok() && !self.gone.contains(id))
            .map(|(&id, _)| id)
            .collect();
        for &peer in &known {
            self.send_ctrl(peer, Ctrl::Bye);
        }
        self.bye_waiting = known.into_iter().collect();
        // Live peers answer within microseconds; a dead one does not answer at all.
        let bye_deadline = Instant::now() + Duration::from_millis(500);
        while !self.bye_waiting.is_empty() && Instant::now() < bye_deadline {
            self.progress_once();
        }
    }

    /// One round of progress while stopping: completions, copies, control messages,
    /// revocations.
    fn progress_once(&mut self) {
        for d in 0..self.group.len() {
            self.poll_domain(d);
        }
        if !self.copies.is_empty() {
            self.poll_copies();
        }
        if !self.landed_out.is_empty() {
            self.flush_landed();
        }
        self.flush_ctrl();
        self.finish_revocations(Instant::now());
        std::thread::yield_now();
    }

    /// Sleeps until a request arrives or, where nothing needs polling (staged copies, the
    /// NVLink mailbox, queued ops, and, on domains without a wait descriptor, transfers waiting
    /// for completions), until traffic arrives: `fi_trywait`, then `ppoll` on the CQ
    /// descriptors, the doorbell and the request eventfd. Otherwise it naps for `nap`.
    pub(super) fn sleep(&mut self, nap: Duration) -> Woke {
        let waker = &self.shared.waker;
        waker.sleeping.store(true, Ordering::SeqCst);
        // A request sent before the flag was set did not ring the eventfd: look once more.
        if let Ok(req) = self.rx.try_recv() {
            waker.sleeping.store(false, Ordering::SeqCst);
            return Woke::Request(req);
        }
        let all_fds = self.group.all_wait_fds();
        let quiet = self.group.transfers.is_empty() && self.awaiting_landed.is_empty();
        // A domain without a wait descriptor can be slept on only where every peer rings
        // (shm: peers share the host), and only while nothing of ours is in flight (the
        // answers to our own writes arrive without a ring). A peer that cannot ring (another
        // network namespace) is served at the sleep's pace, `BELL_ONLY_SLEEP`.
        let rung_only = self.doorbell.is_some() && quiet && self.group.rung_or_waitable();
        let blocking = self.copies.is_empty()
            && self.mailbox.is_none()
            && self.group.n_queued() == 0
            && self.ctrl_out.is_empty()
            && (all_fds || rung_only);
        let timeout = if blocking {
            // Every domain with a descriptor must agree that nothing is pending.
            if !self.group.trywait() {
                waker.sleeping.store(false, Ordering::SeqCst);
                return Woke::Timeout;
            }
            // Deadlines, expiring waits and revocations are checked at this pace.
            if !quiet || !self.revocations.is_empty() || self.shared.imm.has_waiters() {
                Duration::from_millis(5)
            } else if !all_fds {
                BELL_ONLY_SLEEP
            } else {
                Duration::from_millis(100)
            }
        } else {
            nap
        };
        let mut fds = Vec::with_capacity(2 + self.group.len());
        fds.push(libc::pollfd {
            fd: waker.fd,
            events: libc::POLLIN,
            revents: 0,
        });
        if let Some(b) = &self.doorbell {
            use std::os::fd::AsRawFd;
            fds.push(libc::pollfd {
                fd: b.sock.as_raw_fd(),
                events: libc::POLLIN,
                revents: 0,
            });
        }
        if blocking {
            for fd in self.group.wait_fds() {
                fds.push(libc::pollfd {
                    fd,
                    events: libc::POLLIN,
                    revents: 0,
                });
            }
        }
        let ts = libc::timespec {
            tv_sec: timeout.as_secs() as libc::time_t,
            tv_nsec: timeout.subsec_nanos() as libc::c_long,
        };
        // SAFETY: fds is a valid array of fds.len() pollfd entries; ts lives across the call;
        // no signal mask is passed.
        unsafe {
            libc::ppoll(
                fds.as_mut_ptr(),
                fds.len() as libc::nfds_t,
                &ts,
                std::ptr::null(),
            )
        };
        waker.sleeping.store(false, Ordering::SeqCst);
        if fds[0].revents != 0 {
            waker.drain();
        }
        if let Ok(req) = self.rx.try_recv() {
            return Woke::Request(req);
        }
        // Traffic on a completion queue (plain writes make no completion here, but the target
        // must keep progressing them) or the doorbell: spin for a while, as after any work.
        let bell = usize::from(self.doorbell.is_some());
        let traffic = fds[1 + bell..].iter().any(|f| f.revents != 0);
        let rung =
            bell == 1 && fds[1].revents != 0 && self.doorbell.as_ref().is_some_and(|b| b.drain());
        if traffic || rung {
            Woke::Rung
        } else {
            Woke::Timeout
        }
    }

    /// An op was posted to `peer` on domain `d`: where the peer's provider has no wait
    /// descriptor, ring its doorbell (at most once a millisecond) so it wakes to progress it.
    pub(super) fn ring(&mut self, peer: u32, d: usize) {
        if self.group[d].wait_fd().is_some() {
            return;
        }
        let (Some(bell), Some(p)) = (&self.doorbell, self.peers.get_mut(&peer)) else {
            return;
        };
        let Some(addr) = &p.bell else {
            return;
        };
        let now = Instant::now();
        if p.last_ring
            .is_some_and(|t| now.duration_since(t) < Duration::from_millis(1))
        {
            return;
        }
        p.last_ring = Some(now);
        match bell.sock.send_to_addr(&[1], addr) {
            Ok(_) => {}
            // Its queue is full of rings it has not drained yet (it is awake, or will wake on
            // them): rung enough.
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {}
            // No such engine on this host (a remote peer, or another network namespace): it
            // progresses on its own naps.
            Err(_) => p.bell = None,
        }
    }
}
