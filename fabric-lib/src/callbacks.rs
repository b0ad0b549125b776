//! A thread that runs user callbacks, so the worker never blocks on user code (or the GIL).

use std::sync::mpsc;
use std::thread::JoinHandle;

type Job = Box<dyn FnOnce() + Send>;

/// Where completions hand callbacks to be run.
#[derive(Clone)]
pub struct CallbackSink(mpsc::Sender<Job>);

impl CallbackSink {
    /// Queues a job; if the callback thread is gone the job runs here instead.
    pub(crate) fn submit(&self, job: Job) {
        if let Err(mpsc::SendError(job)) = self.0.send(job) {
            job();
        }
    }
}

/// Owns the callback thread; dropping it drains the queue and joins the thread.
pub struct CallbackThread {
    tx: Option<mpsc::Sender<Job>>,
    handle: Option<JoinHandle<()>>,
}

impl CallbackThread {
    pub(crate) fn start() -> Self {
        let (tx, rx) = mpsc::channel::<Job>();
        let handle = std::thread::Builder::new()
            .name("stolon-callbacks".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    // A panicking callback must not take the others down with it.
                    let _ = std::panic::catch_unwind(std::panic::AssertUnwindSafe(job));
                }
            })
            .expect("spawn callback thread");
        CallbackThread {
            tx: Some(tx),
            handle: Some(handle),
        }
    }

    pub(crate) fn sink(&self) -> CallbackSink {
        CallbackSink(self.tx.clone().expect("callback thread running"))
    }
}

impl Drop for CallbackThread {
    fn drop(&mut self) {
        self.tx.take();
        if let Some(h) = self.handle.take() {
            // The thread exits once every sink clone is dropped; don't wait on sinks that are
            // still held elsewhere (a callback holding the engine, say).
            if h.is_finished() {
                let _ = h.join();
            }
        }
    }
}
