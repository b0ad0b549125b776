//! Streams, events, and signalling from a stream without a kernel.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::device::Context;
use crate::error::{Error, Result};
use crate::result;
use crate::sys::{self, CUdeviceptr, CUstream};

/// Polls `ready` until it returns true or `timeout` passes: spins briefly, then yields, then
/// sleeps with a backoff capped at 1 ms (waits for GPU work are usually microseconds).
pub(crate) fn poll_until(
    timeout: Duration,
    what: &'static str,
    mut ready: impl FnMut() -> Result<bool>,
) -> Result<()> {
    let start = Instant::now();
    let mut round = 0u32;
    loop {
        if ready()? {
            return Ok(());
        }
        let waited = start.elapsed();
        if waited >= timeout {
            return Err(Error::Timeout { waited, what });
        }
        round += 1;
        if round < 64 {
            std::hint::spin_loop();
        } else if round < 128 {
            std::thread::yield_now();
        } else {
            let nap = Duration::from_micros((10u64 << (round - 128).min(7)).min(1000));
            std::thread::sleep(nap.min(timeout.saturating_sub(waited)));
        }
    }
}

/// A CUDA stream: work queued on it runs in order. Created non-blocking, so it does not
/// serialise with the legacy default stream (nor with the synchronous copies that use it).
#[derive(Debug)]
pub struct Stream {
    ctx: Arc<Context>,
    raw: CUstream,
    owned: bool,
}

// SAFETY: a CUstream handle may be used from any thread; the driver serialises enqueueing.
unsafe impl Send for Stream {}
// SAFETY: as above; every method goes through the thread-safe driver API.
unsafe impl Sync for Stream {}

impl Stream {
    /// A new non-blocking stream in `ctx`.
    ///
    /// # Errors
    /// A driver error.
    pub fn new(ctx: &Arc<Context>) -> Result<Stream> {
        let _g = ctx.enter()?;
        let raw = result::stream_create(sys::CU_STREAM_NON_BLOCKING)?;
        Ok(Stream {
            ctx: ctx.clone(),
            raw,
            owned: true,
        })
    }

    /// Wraps a stream someone else owns (e.g. `torch.cuda.current_stream().cuda_stream`); it is
    /// not destroyed on drop. Null is the legacy default stream.
    ///
    /// # Safety
    /// `raw` must be null or a stream of `ctx` that outlives the returned value.
    pub unsafe fn from_raw(ctx: &Arc<Context>, raw: CUstream) -> Stream {
        Stream {
            ctx: ctx.clone(),
            raw,
            owned: false,
        }
    }

    /// [`Self::from_raw`] for a stream handle given as an integer, as Python frameworks pass it
    /// (`torch.cuda.Stream.cuda_stream`); 0 is the legacy default stream.
    ///
    /// # Safety
    /// As for [`Self::from_raw`].
    pub unsafe fn from_handle(ctx: &Arc<Context>, handle: usize) -> Stream {
        // SAFETY: forwarded contract; a CUstream is a pointer-sized handle.
        unsafe { Self::from_raw(ctx, handle as CUstream) }
    }

    /// The driver's `CUstream`.
    pub fn raw(&self) -> CUstream {
        self.raw
    }

    /// The context the stream belongs to.
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }

    /// Waits for all work queued so far. Blocks without a bound; see [`Stream::wait_idle`].
    ///
    /// # Errors
    /// An error from the queued work.
    pub fn synchronize(&self) -> Result<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: self.raw is live while self exists.
        unsafe { result::stream_synchronize(self.raw) }
    }

    /// Whether all work queued so far has completed.
    ///
    /// # Errors
    /// An error from the queued work.
    pub fn query(&self) -> Result<bool> {
        let _g = self.ctx.enter()?;
        // SAFETY: self.raw is live while self exists.
        unsafe { result::stream_query(self.raw) }
    }

    /// Waits, at most `timeout`, for all work queued so far.
    ///
    /// # Errors
    /// [`Error::Timeout`], or an error from the queued work.
    pub fn wait_idle(&self, timeout: Duration) -> Result<()> {
        poll_until(timeout, "stream work", || self.query())
    }

    /// Makes work queued on this stream after now wait until `event` has completed.
    ///
    /// # Errors
    /// A driver error.
    pub fn wait_event(&self, event: &Event) -> Result<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: both handles are live while their owners exist.
        unsafe { result::stream_wait_event(self.raw, event.raw) }
    }
}

impl Drop for Stream {
    fn drop(&mut self) {
        if !self.owned {
            return;
        }
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we created the stream and destroy it once. The driver lets queued work
            // finish before releasing its resources.
            let _ = unsafe { result::stream_destroy(self.raw) };
        }
    }
}

/// A CUDA event: a marker recorded on a stream, completed when the work before it is.
#[derive(Debug)]
pub struct Event {
    ctx: Arc<Context>,
    raw: sys::CUevent,
}

// SAFETY: a CUevent handle may be used from any thread.
unsafe impl Send for Event {}
// SAFETY: as above; every method goes through the thread-safe driver API.
unsafe impl Sync for Event {}

impl Event {
    /// A new event without timing (cheapest to record and query).
    ///
    /// # Errors
    /// A driver error.
    pub fn new(ctx: &Arc<Context>) -> Result<Event> {
        Self::with_flags(ctx, sys::CU_EVENT_DISABLE_TIMING)
    }

    /// A new event that records time, for [`Event::elapsed_ms`].
    ///
    /// # Errors
    /// A driver error.
    pub fn with_timing(ctx: &Arc<Context>) -> Result<Event> {
        Self::with_flags(ctx, sys::CU_EVENT_DEFAULT)
    }

    fn with_flags(ctx: &Arc<Context>, flags: u32) -> Result<Event> {
        let _g = ctx.enter()?;
        let raw = result::event_create(flags)?;
        Ok(Event {
            ctx: ctx.clone(),
            raw,
        })
    }

    /// The driver's `CUevent`.
    pub fn raw(&self) -> sys::CUevent {
        self.raw
    }

    /// Records the event at the current end of `stream`'s work.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a stream of another context; a driver error.
    pub fn record(&self, stream: &Stream) -> Result<()> {
        if stream.ctx.raw() != self.ctx.raw() {
            return Err(Error::InvalidArgument(
                "event and stream belong to different contexts".to_string(),
            ));
        }
        let _g = self.ctx.enter()?;
        // SAFETY: both handles are live and of the same context.
        unsafe { result::event_record(self.raw, stream.raw) }
    }

    /// Whether the recorded work has completed (true for a never-recorded event).
    ///
    /// # Errors
    /// An error from the recorded work.
    pub fn query(&self) -> Result<bool> {
        let _g = self.ctx.enter()?;
        // SAFETY: self.raw is live.
        unsafe { result::event_query(self.raw) }
    }

    /// Waits for the recorded work. Blocks without a bound; see [`Event::wait`].
    ///
    /// # Errors
    /// An error from the recorded work.
    pub fn synchronize(&self) -> Result<()> {
        let _g = self.ctx.enter()?;
        // SAFETY: self.raw is live.
        unsafe { result::event_synchronize(self.raw) }
    }

    /// Waits, at most `timeout`, for the recorded work.
    ///
    /// # Errors
    /// [`Error::Timeout`], or an error from the recorded work.
    pub fn wait(&self, timeout: Duration) -> Result<()> {
        poll_until(timeout, "event", || self.query())
    }

    /// Milliseconds between this event and `end` (both made with [`Event::with_timing`], both
    /// completed).
    ///
    /// # Errors
    /// A driver error, e.g. `CUDA_ERROR_NOT_READY`.
    pub fn elapsed_ms(&self, end: &Event) -> Result<f32> {
        let _g = self.ctx.enter()?;
        // SAFETY: both handles are live.
        unsafe { result::event_elapsed_time(self.raw, end.raw) }
    }
}

impl Drop for Event {
    fn drop(&mut self) {
        if let Ok(_g) = self.ctx.enter() {
            // SAFETY: we created the event and destroy it once.
            let _ = unsafe { result::event_destroy(self.raw) };
        }
    }
}

/// The condition [`stream_wait_value64`] waits for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WaitCondition {
    /// `(int64_t)(*addr - value) >= 0`: a counter reached `value` (wraparound-safe).
    GreaterOrEqual,
    /// `*addr == value`.
    Equal,
    /// `(*addr & value) != 0`.
    And,
    /// `~(*addr | value) != 0`.
    Nor,
}

impl WaitCondition {
    fn flags(self) -> u32 {
        match self {
            WaitCondition::GreaterOrEqual => sys::CU_STREAM_WAIT_VALUE_GEQ,
            WaitCondition::Equal => sys::CU_STREAM_WAIT_VALUE_EQ,
            WaitCondition::And => sys::CU_STREAM_WAIT_VALUE_AND,
            WaitCondition::Nor => sys::CU_STREAM_WAIT_VALUE_NOR,
        }
    }
}

fn check_aligned8(dptr: CUdeviceptr) -> Result<()> {
    if dptr % 8 != 0 {
        return Err(Error::InvalidArgument(format!(
            "address {dptr:#x} is not 8-byte aligned"
        )));
    }
    Ok(())
}

/// Queues, on `stream`, a write of `value` to the 64-bit word at `dptr`: when the stream reaches
/// it, after a memory barrier (work queued before is visible first). This signals "everything
/// before here is done" without a kernel, e.g. into a [`crate::HostCounter`]'s device address.
///
/// # Safety
/// `dptr` must be device-accessible memory (device memory, or the device address of mapped pinned
/// host memory) that stays valid until the write has executed.
///
/// # Errors
/// [`Error::InvalidArgument`] for a misaligned address; `CUDA_ERROR_NOT_SUPPORTED` on devices
/// without 64-bit stream memory operations.
pub unsafe fn stream_write_value64(stream: &Stream, dptr: CUdeviceptr, value: u64) -> Result<()> {
    check_aligned8(dptr)?;
    let _g = stream.ctx.enter()?;
    // SAFETY: the stream is live; the caller promises the address.
    unsafe {
        result::stream_write_value64(stream.raw, dptr, value, sys::CU_STREAM_WRITE_VALUE_DEFAULT)
    }
}

/// Queues, on `stream`, a wait: work queued after it starts only once the 64-bit word at `dptr`
/// meets `cond` against `value`. The GPU polls; nothing bounds the wait, so whoever should write
/// the word must, or the stream hangs.
///
/// # Safety
/// As [`stream_write_value64`].
///
/// # Errors
/// As [`stream_write_value64`].
pub unsafe fn stream_wait_value64(
    stream: &Stream,
    dptr: CUdeviceptr,
    value: u64,
    cond: WaitCondition,
) -> Result<()> {
    check_aligned8(dptr)?;
    let _g = stream.ctx.enter()?;
    // SAFETY: the stream is live; the caller promises the address.
    unsafe { result::stream_wait_value64(stream.raw, dptr, value, cond.flags()) }
}
