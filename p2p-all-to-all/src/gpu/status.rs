//! After the launches: recorded kernel errors, waiting for a stream, the steps each phase
//! completed, and the orderly end of this rank's use of its peers.

use std::time::{Duration, Instant};

use stolon_cuda::Stream;

use super::AllToAll;
use crate::proxy::{self, MAILBOX_WORDS};
use crate::{Error, KernelError, Result, STATE_BYTES};

impl AllToAll {
    /// Reports and forgets a recorded error that only concerns the steps already run (a bad
    /// expert id, capacity exceeded, too many tokens); a timeout stays (the ranks are out of
    /// step for good and the all-to-all must be rebuilt on every rank).
    fn take_error(&self) -> Option<KernelError> {
        let e = self.error()?;
        if e.code != 1 {
            // SAFETY: 64 bytes of host memory we own; no kernel is running (the stream is idle
            // when this is called), and a racing kernel write would only re-report an error.
            unsafe { std::ptr::write_bytes(self.err.host_ptr(), 0, 24) };
        }
        Some(e)
    }

    /// What a kernel recorded, if anything failed (see [`AllToAll::synchronize`] for which
    /// errors are sticky).
    pub fn error(&self) -> Option<KernelError> {
        let p = self.err.host_ptr().cast::<u32>();
        // SAFETY: the buffer is 64 bytes of host memory we own; kernels write it through its
        // device mapping, so read it volatile.
        let (code, phase, peer, detail, lo, hi) = unsafe {
            (
                p.read_volatile(),
                p.add(1).read_volatile(),
                p.add(2).read_volatile(),
                p.add(3).read_volatile(),
                p.add(4).read_volatile(),
                p.add(5).read_volatile(),
            )
        };
        (code != 0).then_some(KernelError {
            code,
            phase,
            peer,
            detail,
            step: u64::from(lo) | (u64::from(hi) << 32),
        })
    }

    /// Waits until `stream` has run everything queued, at most `timeout`, then reports a
    /// recorded kernel error. A timeout stays recorded (every later phase fails: rebuild the
    /// all-to-all on every rank); the other errors concern the steps already run and are
    /// cleared once reported, as the kernels kept every rank in step.
    ///
    /// # Errors
    /// [`Error::Kernel`], [`Error::Timeout`], a CUDA error.
    pub fn synchronize(&self, stream: &Stream, timeout: Duration) -> Result<()> {
        let start = Instant::now();
        loop {
            if stream.query()? {
                break;
            }
            if let Some(e) = self.error() {
                if e.code == 1 {
                    // The kernels give up on their own; let them finish.
                    stream.wait_idle(timeout)?;
                    if let Some(p) = self.proxy_error() {
                        return Err(Error::Proxy(format!("{p}; then {e}")));
                    }
                    return Err(Error::Kernel(e));
                }
            }
            if start.elapsed() > timeout {
                return Err(Error::Timeout(format!(
                    "the all-to-all's stream did not finish within {timeout:?} (steps completed \
                     by dispatch_send, dispatch_recv, combine_send, combine_recv: {:?})",
                    self.progress()
                )));
            }
            std::thread::sleep(Duration::from_micros(50));
        }
        match self.take_error() {
            Some(e) => Err(Error::Kernel(e)),
            None => Ok(()),
        }
    }

    /// Waits until every peer has made its last write into this rank's receive area (its
    /// release notice after the last completed step), so the memory can be freed without a
    /// late peer write landing in whatever is allocated there next. Returns false when the
    /// phases are not balanced (a step was left half done) or `timeout` passed.
    ///
    /// # Errors
    /// A CUDA error reading device memory.
    pub fn quiesce(&self, timeout: Duration) -> Result<bool> {
        if !self.connected {
            return Ok(true);
        }
        let steps = self.steps()?;
        if steps.iter().any(|&s| s != steps[3]) || self.error().is_some() {
            return Ok(false);
        }
        let want = 2 * steps[3];
        let world = self.cfg.world;
        let me = self.cfg.rank;
        let mut buf = vec![0u8; world * 8];
        let start = Instant::now();
        loop {
            self.rx().copy_to_host(self.layout.rx_rel, &mut buf)?;
            let done = buf.chunks_exact(8).enumerate().all(|(p, c)| {
                let v = match &self.remote {
                    Some(rm) if self.cfg.node_of(p) != self.cfg.node_of(me) => {
                        // SAFETY: a word of the mailbox we own; the proxy stores it.
                        unsafe {
                            rm.mailbox
                                .host_ptr()
                                .cast::<u64>()
                                .add(p * MAILBOX_WORDS + proxy::IN_REL)
                                .read_volatile()
                        }
                    }
                    _ => u64::from_le_bytes(c.try_into().expect("8 bytes")),
                };
                v >= want
            });
            if done {
                return Ok(true);
            }
            if start.elapsed() > timeout {
                return Ok(false);
            }
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Ends this rank's use of its peers: waits for their last writes into this rank's area
    /// ([`AllToAll::quiesce`]), then unmaps their areas. After it, no phase can run. The caller
    /// then makes sure every rank got this far (a barrier) before dropping the all-to-all, whose
    /// memory peers must no longer have mapped when it is freed. Returns the quiesce result.
    ///
    /// # Errors
    /// A CUDA error reading device memory.
    pub fn release_peers(&mut self, timeout: Duration) -> Result<bool> {
        let quiet = self.quiesce(timeout)?;
        self.mappings.clear();
        if let Some(rm) = &mut self.remote {
            rm.stop();
            rm.unregister();
        }
        self.connected = false;
        Ok(quiet)
    }

    /// Whether ranks on other nodes are served by a proxy thread that has stopped with an
    /// error (its message). The kernels waiting for it then time out.
    pub fn proxy_error(&self) -> Option<String> {
        let rm = self.remote.as_ref()?;
        let (_, handle) = rm.proxy.as_ref()?;
        handle
            .is_finished()
            .then(|| "the proxy thread stopped (a write to a peer failed)".to_string())
    }

    /// Steps each phase has completed, as the kernels last reported them in host-mapped memory:
    /// readable at any time without touching a stream (e.g. while one is stuck).
    pub fn progress(&self) -> [u64; 4] {
        let p = self.err.host_ptr().cast::<u64>();
        // SAFETY: the 64-byte error buffer holds the four progress words at bytes 24..56; the
        // kernels store them through the device mapping, so read volatile.
        unsafe { [3, 4, 5, 6].map(|i| p.add(i).read_volatile()) }
    }

    /// Steps each phase has completed (reads device memory; synchronous).
    ///
    /// # Errors
    /// A CUDA error.
    pub fn steps(&self) -> Result<[u64; 4]> {
        let mut b = [0u8; STATE_BYTES];
        self.local.copy_to_host(self.layout.st, &mut b)?;
        let mut s = [0u64; 4];
        for (i, v) in s.iter_mut().enumerate() {
            *v = u64::from_le_bytes(b[i * 8..i * 8 + 8].try_into().expect("8 bytes"));
        }
        Ok(s)
    }
}
