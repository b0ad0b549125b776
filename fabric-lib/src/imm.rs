//! Receiver-side counting of immediates.
//!
//! Writes may land in any order and a transfer may be split into several operations, so a
//! receiver never waits for "the" write: it waits until an immediate value has arrived a known
//! number of times. Arrivals before anyone waits are counted, never lost. Waiting consumes the
//! expected count, so one immediate value can be reused for the next round.

use std::collections::HashMap;
use std::sync::{Condvar, Mutex};
use std::time::{Duration, Instant};

use crate::callbacks::CallbackSink;
use crate::error::{Error, Result};

type Callback = Box<dyn FnOnce(Result<()>) + Send>;

struct Expectation {
    count: u64,
    deadline: Option<Instant>,
    timeout: Duration,
    callback: Callback,
    /// Run on the arriving thread (the worker) instead of the callback thread: only for tiny
    /// actions such as storing a flag a GPU kernel polls.
    inline: bool,
}

#[derive(Default)]
struct State {
    counts: HashMap<u32, u64>,
    expectations: HashMap<u32, Vec<Expectation>>,
    waiters: usize,
    stopped: bool,
}

/// Counts arrivals per immediate value.
pub struct ImmCounter {
    state: Mutex<State>,
    cv: Condvar,
    sink: CallbackSink,
}

impl ImmCounter {
    pub(crate) fn new(sink: CallbackSink) -> Self {
        ImmCounter {
            state: Mutex::new(State::default()),
            cv: Condvar::new(),
            sink,
        }
    }

    /// Records one arrival of `imm` (called by the worker for every remote-CQ-data event).
    pub(crate) fn arrive(&self, imm: u32) {
        self.arrive_n(imm, 1);
    }

    pub(crate) fn arrive_n(&self, imm: u32, n: u64) {
        let mut st = self.state.lock().unwrap();
        *st.counts.entry(imm).or_insert(0) += n;
        self.fire_ready(&mut st, imm);
        if st.waiters > 0 {
            self.cv.notify_all();
        }
    }

    /// Runs (on the callback thread) every expectation on `imm` that is now met, oldest first.
    fn fire_ready(&self, st: &mut State, imm: u32) {
        let Some(list) = st.expectations.get_mut(&imm) else {
            return;
        };
        let have = st.counts.get(&imm).copied().unwrap_or(0);
        let mut have_left = have;
        let mut fired = Vec::new();
        while let Some(first) = list.first() {
            if first.count > have_left {
                break;
            }
            have_left -= first.count;
            fired.push(list.remove(0));
        }
        if list.is_empty() {
            st.expectations.remove(&imm);
        }
        if have_left != have {
            st.counts.insert(imm, have_left);
        }
        for e in fired {
            let cb = e.callback;
            if e.inline {
                cb(Ok(()));
            } else {
                self.sink.submit(Box::new(move || cb(Ok(()))));
            }
        }
    }

    /// How many arrivals of `imm` are counted and not yet consumed.
    pub fn count(&self, imm: u32) -> u64 {
        self.state
            .lock()
            .unwrap()
            .counts
            .get(&imm)
            .copied()
            .unwrap_or(0)
    }

    /// Blocks until `imm` has arrived `count` times, then consumes those arrivals.
    ///
    /// # Errors
    /// [`Error::Timeout`] when `timeout` passes first (nothing is consumed);
    /// [`Error::Stopped`] when the engine stops.
    pub fn wait(&self, imm: u32, count: u64, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let mut st = self.state.lock().unwrap();
        st.waiters += 1;
        let result = loop {
            if st.stopped {
                break Err(Error::Stopped);
            }
            let have = st.counts.get(&imm).copied().unwrap_or(0);
            if have >= count {
                st.counts.insert(imm, have - count);
                break Ok(());
            }
            let now = Instant::now();
            if now >= deadline {
                break Err(Error::Timeout(timeout));
            }
            st = self.cv.wait_timeout(st, deadline - now).unwrap().0;
        };
        st.waiters -= 1;
        result
    }

    /// Calls `callback(Ok(()))` once `imm` has arrived `count` times (consuming them), or
    /// `callback(Err(Timeout))` if that has not happened within `timeout`. Expectations on the same
    /// value are met in the order they were set. Arrivals already counted count towards it.
    pub fn expect(
        &self,
        imm: u32,
        count: u64,
        timeout: Option<Duration>,
        callback: impl FnOnce(Result<()>) + Send + 'static,
    ) {
        let mut st = self.state.lock().unwrap();
        if st.stopped {
            drop(st);
            self.sink
                .submit(Box::new(move || callback(Err(Error::Stopped))));
            return;
        }
        st.expectations.entry(imm).or_default().push(Expectation {
            count,
            deadline: timeout.map(|t| Instant::now() + t),
            timeout: timeout.unwrap_or_default(),
            callback: Box::new(callback),
            inline: false,
        });
        self.fire_ready(&mut st, imm);
    }

    /// Once `imm` has arrived `count` times (consuming them), stores `value` into the u64 at `ptr`
    /// right away on the arriving thread: a flag that a GPU kernel (or `cuStreamWaitValue64`)
    /// polls in host-mapped memory, so GPU work can wait for data without a CPU launch. With a
    /// timeout, `u64::MAX` is stored instead when it passes.
    ///
    /// # Safety
    /// `ptr` must point to an 8-byte-aligned u64 that stays valid until the flag is stored;
    /// `owner` is kept alive until then, which is the usual way to ensure it.
    pub unsafe fn expect_store(
        &self,
        imm: u32,
        count: u64,
        timeout: Option<Duration>,
        ptr: usize,
        value: u64,
        owner: Option<Box<dyn std::any::Any + Send + Sync>>,
    ) -> Result<()> {
        if ptr == 0 || ptr % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "flag address {ptr:#x} must be non-null and 8-byte aligned"
            )));
        }
        let store = move |r: Result<()>| {
            let v = if r.is_ok() { value } else { u64::MAX };
            // SAFETY: the caller keeps the aligned u64 at ptr valid until this runs (owner is
            // moved into this closure and dropped after the store).
            unsafe {
                (*(ptr as *const std::sync::atomic::AtomicU64))
                    .store(v, std::sync::atomic::Ordering::Release)
            };
            // A full fence: where the flag is a write-combining mapping of GPU memory
            // (GDRCopy), it drains the combining buffer, so the GPU sees the store now.
            std::sync::atomic::fence(std::sync::atomic::Ordering::SeqCst);
            drop(owner);
        };
        let mut st = self.state.lock().unwrap();
        if st.stopped {
            return Err(Error::Stopped);
        }
        st.expectations.entry(imm).or_default().push(Expectation {
            count,
            deadline: timeout.map(|t| Instant::now() + t),
            timeout: timeout.unwrap_or_default(),
            callback: Box::new(store),
            inline: true,
        });
        self.fire_ready(&mut st, imm);
        Ok(())
    }

    /// Whether a thread blocks in [`ImmCounter::wait`] or an expectation is pending: the worker
    /// then polls on a short leash (an idle worker naps up to `max_sleep` between polls, which
    /// would delay the arrival that ends the wait by as much).
    pub(crate) fn has_waiters(&self) -> bool {
        let st = self.state.lock().unwrap();
        st.waiters > 0 || !st.expectations.is_empty()
    }

    /// Fails expectations whose deadline has passed (called periodically by the worker).
    pub(crate) fn expire(&self, now: Instant) {
        let mut st = self.state.lock().unwrap();
        if st.expectations.is_empty() {
            return;
        }
        let mut expired = Vec::new();
        st.expectations.retain(|_, list| {
            let mut i = 0;
            while i < list.len() {
                if list[i].deadline.is_some_and(|d| d <= now) {
                    expired.push(list.remove(i));
                } else {
                    i += 1;
                }
            }
            !list.is_empty()
        });
        drop(st);
        for e in expired {
            let (cb, t) = (e.callback, e.timeout);
            self.sink
                .submit(Box::new(move || cb(Err(Error::Timeout(t)))));
        }
    }

    /// Fails every pending wait and expectation with [`Error::Stopped`].
    pub(crate) fn stop(&self) {
        let mut st = self.state.lock().unwrap();
        st.stopped = true;
        let all: Vec<_> = st.expectations.drain().flat_map(|(_, v)| v).collect();
        drop(st);
        self.cv.notify_all();
        for e in all {
            let cb = e.callback;
            self.sink.submit(Box::new(move || cb(Err(Error::Stopped))));
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::callbacks::CallbackThread;
    use proptest::prelude::*;
    use std::sync::mpsc;
    use std::sync::Arc;

    fn counter() -> (CallbackThread, Arc<ImmCounter>) {
        let t = CallbackThread::start();
        let c = Arc::new(ImmCounter::new(t.sink()));
        (t, c)
    }

    #[test]
    fn arrivals_before_the_wait_are_kept() {
        let (_t, c) = counter();
        for _ in 0..5 {
            c.arrive(7);
        }
        c.wait(7, 3, Duration::from_millis(10)).unwrap();
        assert_eq!(c.count(7), 2);
        assert!(matches!(
            c.wait(7, 3, Duration::from_millis(10)),
            Err(Error::Timeout(_))
        ));
        assert_eq!(c.count(7), 2, "a timed-out wait consumes nothing");
    }

    #[test]
    fn wait_wakes_on_arrival_from_another_thread() {
        let (_t, c) = counter();
        let c2 = c.clone();
        let h = std::thread::spawn(move || {
            for _ in 0..4 {
                std::thread::sleep(Duration::from_millis(2));
                c2.arrive(1);
            }
        });
        c.wait(1, 4, Duration::from_secs(5)).unwrap();
        h.join().unwrap();
        assert_eq!(c.count(1), 0);
    }

    #[test]
    fn expectations_fire_in_order_and_time_out() {
        let (_t, c) = counter();
        let (tx, rx) = mpsc::channel();
        for tag in 0..2 {
            let tx = tx.clone();
            c.expect(3, 2, None, move |r| tx.send((tag, r.is_ok())).unwrap());
        }
        c.arrive_n(3, 3);
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap(), (0, true));
        assert!(rx.recv_timeout(Duration::from_millis(20)).is_err());
        c.arrive(3);
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap(), (1, true));
        let tx2 = tx.clone();
        c.expect(9, 1, Some(Duration::from_millis(1)), move |r| {
            tx2.send((9, r.is_ok())).unwrap()
        });
        std::thread::sleep(Duration::from_millis(5));
        c.expire(Instant::now());
        assert_eq!(rx.recv_timeout(Duration::from_secs(1)).unwrap(), (9, false));
    }

    #[test]
    fn expect_store_sets_the_flag_when_the_count_is_reached() {
        use std::sync::atomic::{AtomicU64, Ordering};
        let (_t, c) = counter();
        let flag = Arc::new(AtomicU64::new(0));
        let ptr = Arc::as_ptr(&flag) as usize;
        // SAFETY: the Arc keeps the aligned u64 alive (passed as owner).
        unsafe { c.expect_store(4, 3, None, ptr, 77, Some(Box::new(flag.clone()))) }.unwrap();
        c.arrive_n(4, 2);
        assert_eq!(flag.load(Ordering::Acquire), 0);
        c.arrive(4);
        // Stored inline by the arriving thread: visible at once.
        assert_eq!(flag.load(Ordering::Acquire), 77);
        assert_eq!(c.count(4), 0);
        // SAFETY: as above.
        let r = unsafe { c.expect_store(5, 1, None, ptr + 1, 1, None) };
        assert!(matches!(r, Err(Error::InvalidArgument(_))));
    }

    #[test]
    fn stop_fails_waiters() {
        let (_t, c) = counter();
        let c2 = c.clone();
        let h = std::thread::spawn(move || c2.wait(1, 1, Duration::from_secs(10)));
        std::thread::sleep(Duration::from_millis(20));
        c.stop();
        assert!(matches!(h.join().unwrap(), Err(Error::Stopped)));
    }

    proptest! {
        /// Any interleaving of arrivals of several values gives exact counts.
        #[test]
        fn counts_are_exact_in_any_order(mut arrivals in proptest::collection::vec(0u32..4, 0..200),
                                         seed in any::<u64>()) {
            let (_t, c) = counter();
            let mut expected = [0u64; 4];
            for a in &arrivals { expected[*a as usize] += 1; }
            // A deterministic shuffle: the order must not matter.
            let n = arrivals.len();
            let mut s = seed;
            for i in (1..n).rev() {
                s = s.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
                arrivals.swap(i, (s >> 33) as usize % (i + 1));
            }
            for a in &arrivals { c.arrive(*a); }
            for (v, &e) in expected.iter().enumerate() {
                prop_assert_eq!(c.count(v as u32), e);
                c.wait(v as u32, e, Duration::from_millis(1)).unwrap();
                prop_assert_eq!(c.count(v as u32), 0);
            }
        }
    }
}
