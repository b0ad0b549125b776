//! Sender-side completion of one transfer, as a waitable handle with an optional callback.

use std::sync::{Arc, Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::callbacks::CallbackSink;
use crate::error::{Error, Result};

type Callback = Box<dyn FnOnce(Result<()>) + Send>;

/// What a transfer's success promises.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default)]
pub enum Completion {
    /// Every byte is in the destination's memory (the default): libfabric's
    /// `FI_DELIVERY_COMPLETE`, an RC queue pair's acknowledged completion, a finished NVLink
    /// copy, or, for a staged GPU destination, the owner's word that the chunk sits in GPU
    /// memory.
    #[default]
    Delivered,
    /// Only that the source may be reused: nothing is promised about the destination (the
    /// receiver's immediate count still says when the bytes have landed). Cheaper on providers
    /// whose local completion comes before delivery (tcp, shm).
    Local,
}

impl Completion {
    /// Parses `"delivered"` or `"local"`.
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "delivered" => Ok(Completion::Delivered),
            "local" => Ok(Completion::Local),
            other => Err(Error::InvalidArgument(format!(
                "completion {other:?} (must be \"delivered\" or \"local\")"
            ))),
        }
    }

    /// The name [`Self::parse`] takes.
    pub fn name(self) -> &'static str {
        match self {
            Completion::Delivered => "delivered",
            Completion::Local => "local",
        }
    }
}

#[derive(Default)]
struct Inner {
    result: Option<Result<()>>,
    callback: Option<Callback>,
}

/// How long [`Transfer::wait`] polls before it blocks.
const WAIT_POLL: Duration = Duration::from_micros(50);

/// Shared between the worker (which completes it) and the caller's [`Transfer`] handle.
pub(crate) struct TransferState {
    inner: Mutex<Inner>,
    /// Set (after `inner.result`) when the transfer finishes: what [`Transfer::wait`] polls
    /// before it blocks.
    done: std::sync::atomic::AtomicBool,
    cv: Condvar,
    sink: CallbackSink,
}

impl TransferState {
    pub(crate) fn new(sink: CallbackSink) -> Arc<Self> {
        Arc::new(TransferState {
            inner: Mutex::new(Inner::default()),
            done: std::sync::atomic::AtomicBool::new(false),
            cv: Condvar::new(),
            sink,
        })
    }

    /// Sets the result once; later calls are ignored.
    pub(crate) fn complete(&self, result: Result<()>) {
        let mut g = self.inner.lock().unwrap();
        if g.result.is_some() {
            return;
        }
        g.result = Some(result.clone());
        let cb = g.callback.take();
        self.done.store(true, std::sync::atomic::Ordering::Release);
        drop(g);
        self.cv.notify_all();
        if let Some(cb) = cb {
            self.sink.submit(Box::new(move || cb(result)));
        }
    }

    pub(crate) fn is_done(&self) -> bool {
        self.inner.lock().unwrap().result.is_some()
    }
}

/// A submitted transfer. The sender learns it has finished (by default delivered: every byte in
/// the destination's memory; see [`Completion`]) or failed; the receiver learns data landed by
/// counting immediates.
#[derive(Clone)]
pub struct Transfer {
    pub(crate) state: Arc<TransferState>,
    /// Immediates this transfer produces at each receiver (0 when it carries none). For a
    /// scatter, per destination in the order given.
    pub imm_counts: Arc<[usize]>,
}

impl Transfer {
    /// Blocks until the transfer finishes or `timeout` passes.
    ///
    /// # Errors
    /// The transfer's own error, or [`Error::Timeout`] if it is still running at the deadline
    /// (the transfer itself keeps its engine-side deadline).
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        let deadline = start + timeout;
        // A short transfer finishes within microseconds: poll for it, yielding the core (the
        // worker that completes it may share it), before sleeping on the condition variable,
        // whose wake-up costs a cross-core interrupt and a scheduler pass.
        let poll = WAIT_POLL.min(timeout);
        while !self.state.done.load(std::sync::atomic::Ordering::Acquire) && start.elapsed() < poll
        {
            std::thread::yield_now();
        }
        let mut g = self.state.inner.lock().unwrap();
        loop {
            if let Some(r) = &g.result {
                return r.clone();
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            g = self.state.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }

    /// Whether the transfer has finished (successfully or not).
    pub fn is_done(&self) -> bool {
        self.state.is_done()
    }

    /// The result, if finished.
    pub fn result(&self) -> Option<Result<()>> {
        self.state.inner.lock().unwrap().result.clone()
    }

    /// Calls `cb` with the result, on the engine's callback thread (immediately queued if the
    /// transfer has already finished).
    pub fn on_done(&self, cb: impl FnOnce(Result<()>) + Send + 'static) {
        let mut g = self.state.inner.lock().unwrap();
        match &g.result {
            Some(r) => {
                let r = r.clone();
                drop(g);
                self.state.sink.submit(Box::new(move || cb(r)));
            }
            None => g.callback = Some(Box::new(cb)),
        }
    }

    /// Total immediates this transfer produces over all receivers.
    pub fn imm_count(&self) -> usize {
        self.imm_counts.iter().sum()
    }
}
