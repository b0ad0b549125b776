//! [`AllToAll`]: the buffers of one rank on its GPU, its peers' buffers mapped over NVLink, and
//! the launches of the four phases.
//!
//! The modules, one concern each: `params` (what a launch hands the kernels), `tuning` (launch
//! settings from the environment), `pool` (receive areas, never freed), `remote` (ranks on
//! other nodes), `connect` (the handshake and peer table), `launch` (what every launch shares),
//! `dispatch` and `combine` (the phases), `status` (errors, progress, the end).

use std::collections::hash_map::RandomState;
use std::hash::{BuildHasher, Hasher};
use std::sync::Arc;

use stolon_cuda::{Context, Device, DeviceBuffer, Function, IpcMapping, Module, PinnedHostBuffer};

use fabric_lib::TransferEngine;

use crate::{Config, Error, Layout, Result};

mod combine;
mod connect;
mod dispatch;
mod launch;
mod params;
mod pool;
mod remote;
mod status;
mod tuning;

pub use params::{CombineArgs, DispatchArgs, DispatchOutputs};
pub use tuning::OVERLAP_MIN_TOKENS;

use pool::{put_rx, take_rx};
use remote::Remote;
use tuning::{blocks_per_sm, combine_senders, early_launch, overlap_senders};

fn random_nonce() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish() | 1
}

struct Kernels {
    dispatch_send: Function,
    dispatch_recv: Function,
    dispatch_count: Function,
    dispatch_fused: Function,
    combine_send: Function,
    combine_recv: Function,
    combine_fused: Function,
}

/// One rank's MoE all-to-all on one GPU.
pub struct AllToAll {
    cfg: Config,
    layout: Layout,
    ctx: Arc<Context>,
    kernels: Kernels,
    rx: Option<DeviceBuffer>,
    nonce: u64,
    local: DeviceBuffer,
    err: PinnedHostBuffer,
    mappings: Vec<IpcMapping>,
    remote: Option<Remote>,
    connected: bool,
    /// Most blocks a launch uses: the SM count times [`blocks_per_sm`].
    max_blocks: u32,
    /// See [`overlap_senders`].
    overlap_senders: i32,
    /// See [`combine_senders`].
    combine_senders: i32,
    /// See [`early_launch`].
    early_launch: bool,
}

// SAFETY: the buffers and handles are plain driver objects usable from any thread; the kernels
// are launched on a caller's stream, which serialises them.
unsafe impl Send for AllToAll {}
// SAFETY: as above; `&self` methods only read host-side fields or enqueue work.
unsafe impl Sync for AllToAll {}

impl AllToAll {
    /// Allocates this rank's receive area and state on GPU `device` and loads the kernels.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for a bad config, [`Error::NoKernels`] for a build without
    /// nvcc, [`Error::KernelBuild`] when no kernel build fits the driver (see
    /// [`crate::kernels`]), a CUDA error (no GPU, out of memory).
    pub fn new(device: usize, cfg: Config) -> Result<AllToAll> {
        AllToAll::with_engine(device, cfg, None)
    }

    /// As [`AllToAll::new`]; with `engine`, ranks on other nodes (`ranks_per_node` smaller than
    /// the world) are reached through it by a host proxy. The engine must move this GPU's
    /// memory (opened with `cuda_device` = `device`).
    ///
    /// # Errors
    /// As [`AllToAll::new`]; [`Error::InvalidArgument`] when other nodes exist but no engine
    /// was given; an engine error registering the buffers.
    pub fn with_engine(
        device: usize,
        cfg: Config,
        engine: Option<Arc<TransferEngine>>,
    ) -> Result<AllToAll> {
        let layout = cfg.layout()?;
        if cfg.ranks_per_node < cfg.world && engine.is_none() {
            return Err(Error::InvalidArgument(format!(
                "ranks_per_node {} < world {}: ranks on other nodes are reached through a \
                 TransferEngine, and none was given",
                cfg.ranks_per_node, cfg.world
            )));
        }
        let build = crate::kernels::selected()?;
        let dev = Device::get(device)?;
        let ctx = dev.primary_context()?;
        let module = Module::load(&ctx, build.fatbin)?;
        let suffix = cfg.combine.suffix();
        let kernels = Kernels {
            dispatch_send: module.function("moe_dispatch_send")?,
            dispatch_recv: module.function("moe_dispatch_recv")?,
            dispatch_count: module.function("moe_dispatch_count")?,
            dispatch_fused: module.function("moe_dispatch_fused")?,
            combine_send: module.function(&format!("moe_combine_send_{suffix}"))?,
            combine_recv: module.function(&format!("moe_combine_recv_{suffix}"))?,
            combine_fused: module.function(&format!("moe_combine_fused_{suffix}"))?,
        };
        let mut rx = take_rx(&ctx, device, layout.rx_total)?;
        let nonce = random_nonce();
        rx.copy_from_host(layout.rx_nonce, &nonce.to_le_bytes())?;
        let local = DeviceBuffer::alloc_zeroed(&ctx, layout.local_total)?;
        // The zeroing may still be queued; peers must not write before it is done (a late
        // memset would wipe their first flags).
        ctx.synchronize()?;
        let mut err = PinnedHostBuffer::alloc(&ctx, 64)?;
        // SAFETY: no kernel uses the buffer yet; we own it exclusively.
        unsafe { err.as_mut_slice().fill(0) };
        let sms = dev.multiprocessor_count()? as u32;
        let remote = match engine {
            Some(engine) if cfg.ranks_per_node < cfg.world => {
                Some(Remote::new(&ctx, engine, &cfg, &layout, &rx)?)
            }
            _ => None,
        };
        Ok(AllToAll {
            cfg,
            layout,
            ctx,
            kernels,
            rx: Some(rx),
            nonce,
            local,
            err,
            mappings: Vec::new(),
            remote,
            connected: false,
            max_blocks: sms * blocks_per_sm(),
            overlap_senders: overlap_senders(),
            combine_senders: combine_senders(),
            early_launch: early_launch(&dev)?,
        })
    }

    pub(super) fn rx(&self) -> &DeviceBuffer {
        self.rx.as_ref().expect("the receive area lives until drop")
    }

    /// The config.
    pub fn config(&self) -> &Config {
        &self.cfg
    }

    /// The buffer layout.
    pub fn layout(&self) -> &Layout {
        &self.layout
    }

    /// The CUDA context (the device's primary context, which torch uses too).
    pub fn context(&self) -> &Arc<Context> {
        &self.ctx
    }
}

impl Drop for AllToAll {
    fn drop(&mut self) {
        // Best effort: peers may still be writing their last release notices into our receive
        // area; wait for them (bounded). The area then goes back to the pool, never freed.
        let _ = self.quiesce(self.cfg.timeout);
        if let Some(rm) = &mut self.remote {
            rm.stop();
            rm.unregister();
        }
        if let Some(rx) = self.rx.take() {
            put_rx(self.ctx.device().ordinal(), rx);
        }
    }
}
