//! A thread that runs user callbacks, so the worker never blocks on user code (or the GIL).

use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// Where completions hand callbacks to be run.
#[derive(Clone)]
pub struct CallbackSink(mpsc::Sender<Option<Job>>);

impl CallbackSink {
    /// Queues a job; if the callback thread is gone the job runs here instead.
    pub(crate) fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(Some(job))) = self.0.send(Some(job)) {
            job();
        }
    }
}

/// Owns the callback thread; dropping it runs what is queued, then stops and joins the thread
/// (sinks still held elsewhere, by futures say, then run their jobs on the caller's thread).
pub struct CallbackThread {
    tx: mpsc::Sender<Option<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl CallbackThread {
    pub(crate) fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Option<Job>>();
        let handle = std::thread::Builder::new()
            .name("stolon-callbacks".into())
            .spawn(move || {
                // `None` is the stop message; the receiver goes with the thread.
                while let Ok(Some(job)) = rx.recv() {
                    // A panicking callback must not take the others down with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("spawn callback thread");
        CallbackThread {
            tx,
            handle: Some(handle),
        }
    }

    pub(crate) fn sink(&self) -> CallbackSink {
        CallbackSink(self.tx.clone())
    }
}

impl Drop for CallbackThread {
    fn drop(&mut self) {
        let _ = self.tx.send(None);
        if let Some(h) = self.handle.take() {
            // A callback that stops its own engine cannot wait for itself: the thread ends
            // after that callback returns.
            if h.thread().id() == std::thread::current().id() {
                return;
            }
            // A queued job may need a lock the stopping thread holds (Python's GIL, when an
            // engine is dropped by the garbage collector): wait a bounded time, then let the
            // thread finish on its own rather than deadlock.
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
            while !h.is_finished() && std::time::Instant::now() < deadline {
                std::thread::sleep(std::time::Duration::from_micros(200));
            }
            if h.is_finished() {
                let _ = h.join();
            } else {
                eprintln!("stolon: the callback thread is still running a callback; not waiting");
            }
        }
    }
}
