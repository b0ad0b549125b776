//! State the engine handle shares with its worker: counters, received messages, the peer table,
//! published descriptors, the wake-up eventfd.

use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::callbacks::CallbackSink;
use crate::desc::PeerAddr;
use crate::error::{Error, Result};
use crate::imm::ImmCounter;

/// Per-domain counters.
#[derive(Debug, Default)]
pub struct DomainStats {
    pub bytes_written: AtomicU64,
    pub write_ops: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub imms_received: AtomicU64,
    pub errors: AtomicU64,
    /// Writes this engine refused as their target (stale, revoked or forged descriptors,
    /// staged chunks outside their region).
    pub rejected: AtomicU64,
}

/// A snapshot of [`DomainStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub bytes_written: u64,
    pub write_ops: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub imms_received: u64,
    pub errors: u64,
    pub rejected: u64,
}

impl DomainStats {
    pub(super) fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_written: l(&self.bytes_written),
            write_ops: l(&self.write_ops),
            messages_sent: l(&self.messages_sent),
            bytes_sent: l(&self.bytes_sent),
            messages_received: l(&self.messages_received),
            imms_received: l(&self.imms_received),
            errors: l(&self.errors),
            rejected: l(&self.rejected),
        }
    }
}

/// Received messages, waiting for `recv` or handed to a callback.
pub(crate) struct MessageQueue {
    pub(super) q: Mutex<(VecDeque<Vec<u8>>, bool)>,
    pub(super) cv: Condvar,
    pub(super) callback: Mutex<Option<MessageCallback>>,
    pub(crate) sink: CallbackSink,
}

/// What `on_message` installs: called with each received message.
pub(crate) type MessageCallback = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

impl MessageQueue {
    pub(crate) fn push(&self, msg: Vec<u8>) {
        if let Some(cb) = self.callback.lock().unwrap().clone() {
            self.sink.submit(Box::new(move || cb(msg)));
            return;
        }
        self.q.lock().unwrap().0.push_back(msg);
        self.cv.notify_one();
    }

    pub(crate) fn stop(&self) {
        self.q.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    pub(super) fn pop(&self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.q.lock().unwrap();
        loop {
            if let Some(m) = g.0.pop_front() {
                return Ok(m);
            }
            if g.1 {
                return Err(Error::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

/// State shared by the engine handle and its worker.
pub(crate) struct Shared {
    pub imm: ImmCounter,
    pub messages: MessageQueue,
    pub stats: Vec<DomainStats>,
    /// Counters of the NVLink path.
    pub nvlink: DomainStats,
    pub next_key: AtomicU64,
    pub engine_id: u64,
    /// This engine's address as bytes (sent with lease requests, so owners can answer).
    pub addr_bytes: std::sync::OnceLock<Vec<u8>>,
    /// The descriptor bytes of every live region, by id: a lease request is granted only for
    /// an exact match. Filled before `register` returns, emptied when unregistering starts.
    pub published: Mutex<HashMap<u64, Vec<u8>>>,
    /// Worker ids of peers (the engine adds the peers it writes to, the worker those that ask
    /// it for leases).
    pub peers: Mutex<PeerTable>,
    /// Wakes a sleeping worker when a request is queued.
    pub waker: Waker,
}

/// Worker ids of peers, by address and by engine id.
#[derive(Default)]
pub(crate) struct PeerTable {
    by_addr: HashMap<PeerAddr, u32>,
    by_engine: HashMap<u64, u32>,
}

impl Shared {
    /// Lets go of a region's owner on the callback thread: the owner's drop may wait for a lock
    /// of the caller's runtime (Python's GIL), which the worker must never do.
    pub(crate) fn release(&self, owner: Option<Box<dyn std::any::Any + Send + Sync>>) {
        if let Some(o) = owner {
            self.messages.sink.submit(Box::new(move || drop(o)));
        }
    }

    /// The id of `peer`, allocated on first sight (the caller tells the worker).
    pub(crate) fn peer_id(&self, peer: &PeerAddr) -> u32 {
        self.peer_id_new(peer).0
    }

    /// [`Self::peer_id`], and whether the id is new.
    pub(super) fn peer_id_new(&self, peer: &PeerAddr) -> (u32, bool) {
        let mut t = self.peers.lock().unwrap();
        if let Some(&id) = t.by_addr.get(peer) {
            return (id, false);
        }
        let id = t.by_addr.len() as u32;
        t.by_addr.insert(peer.clone(), id);
        t.by_engine.insert(peer.engine_id, id);
        (id, true)
    }

    /// The id of the peer with engine id `engine`, if known.
    pub(crate) fn peer_of_engine(&self, engine: u64) -> Option<u32> {
        self.peers.lock().unwrap().by_engine.get(&engine).copied()
    }
}

/// An eventfd the engine rings after queueing a request while the worker sleeps.
pub(crate) struct Waker {
    pub fd: std::os::fd::RawFd,
    pub sleeping: AtomicBool,
}

impl Waker {
    pub(super) fn new() -> Result<Self> {
        // SAFETY: eventfd takes no pointers; the descriptor is owned by the Waker.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Config(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Waker {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wakes the worker if it sleeps.
    pub(super) fn ring(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to the owned eventfd.
            unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Resets the doorbell after a wake-up.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from the owned, non-blocking eventfd.
        unsafe { libc::read(self.fd, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned and closed once.
        unsafe { libc::close(self.fd) };
    }
}
