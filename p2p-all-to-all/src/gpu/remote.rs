//! [`Remote`]: what this rank needs for ranks on other nodes (the host proxy's side).

use std::sync::atomic::AtomicBool;
use std::sync::Arc;

use stolon_cuda::{Context, DeviceBuffer, PinnedHostBuffer};

use fabric_lib::{MemoryRegion, TransferEngine};

use crate::proxy::{Proxy, ProxyLayout, MAILBOX_WORDS};
use crate::{Config, Error, Layout, Result};

/// What ranks on other nodes need: the engine, the staging area and the proxy's mailbox and
/// header areas, all registered with the engine, and the proxy thread once connected.
pub(super) struct Remote {
    pub(super) engine: Arc<TransferEngine>,
    pub(super) playout: ProxyLayout,
    pub(super) tx: DeviceBuffer,
    pub(super) tx_region: MemoryRegion,
    pub(super) rx_region: MemoryRegion,
    pub(super) headers_in: MemoryRegion,
    pub(super) headers_out: MemoryRegion,
    pub(super) mailbox: PinnedHostBuffer,
    pub(super) proxy: Option<(Arc<AtomicBool>, std::thread::JoinHandle<Proxy>)>,
}

impl Remote {
    pub(super) fn new(
        ctx: &Arc<Context>,
        engine: Arc<TransferEngine>,
        cfg: &Config,
        layout: &Layout,
        rx: &DeviceBuffer,
    ) -> Result<Remote> {
        let eng = |e: fabric_lib::Error| Error::Proxy(format!("registering with the engine: {e}"));
        let playout = ProxyLayout {
            world: cfg.world,
            max_tokens: cfg.max_tokens,
            slot_bytes: layout.slot_bytes,
            meta_bytes: layout.meta_bytes,
            ecount_bytes: layout.experts_per_rank * 4,
            rx_data: layout.rx_data,
            rx_meta: layout.rx_meta,
            rx_ecount: layout.rx_ecount,
        };
        let tx = DeviceBuffer::alloc_zeroed(ctx, playout.tx_total())?;
        // The mailbox words, then the token masks `dispatch_send` stores for the proxy.
        let mut mailbox =
            PinnedHostBuffer::alloc(ctx, (cfg.world * MAILBOX_WORDS + cfg.max_tokens) * 8)?;
        // SAFETY: no kernel or proxy uses the mailbox yet; we own it exclusively.
        unsafe { mailbox.as_mut_slice().fill(0) };
        // SAFETY: both buffers are device memory that outlives its region: the region is
        // unregistered (release_peers / drop) before tx is freed, and rx is never freed (pool).
        let (tx_region, rx_region) = unsafe {
            (
                engine
                    .register_gpu(tx.ptr(), tx.len() as u64, None)
                    .map_err(eng)?,
                engine
                    .register_gpu(rx.ptr(), rx.len() as u64, None)
                    .map_err(eng)?,
            )
        };
        let headers = || {
            engine
                .register_buffer(vec![0u8; playout.headers_total()].into_boxed_slice())
                .map_err(eng)
        };
        Ok(Remote {
            headers_in: headers()?,
            headers_out: headers()?,
            engine,
            playout,
            tx,
            tx_region,
            rx_region,
            mailbox,
            proxy: None,
        })
    }
}

impl Remote {
    /// Byte offset of the token masks in the mailbox buffer.
    pub(super) fn masks_offset(&self) -> usize {
        self.playout.world * MAILBOX_WORDS * 8
    }

    pub(super) fn mailbox_word(&self, peer: usize, which: usize) -> u64 {
        self.mailbox.device_ptr() + ((peer * MAILBOX_WORDS + which) * 8) as u64
    }

    /// Stops the proxy thread; its error, if it met one.
    pub(super) fn stop(&mut self) -> Option<String> {
        let (stop, handle) = self.proxy.take()?;
        stop.store(true, std::sync::atomic::Ordering::Release);
        match handle.join() {
            Ok(p) => p.error().map(str::to_string),
            Err(_) => Some("the proxy thread panicked".to_string()),
        }
    }

    pub(super) fn unregister(&self) {
        for r in [
            &self.tx_region,
            &self.rx_region,
            &self.headers_in,
            &self.headers_out,
        ] {
            let _ = self.engine.unregister(r);
        }
    }
}
