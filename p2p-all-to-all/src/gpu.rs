//! [`AllToAll`]: the buffers of one rank on its GPU, its peers' buffers mapped over NVLink, and
//! the launches of the four phases.

use std::collections::hash_map::RandomState;
use std::ffi::c_void;
use std::hash::{BuildHasher, Hasher};
use std::sync::atomic::AtomicBool;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use stolon_cuda::sys::{self, CUdeviceptr};
use stolon_cuda::{
    Context, Device, DeviceBuffer, Function, IpcMapping, Module, PinnedHostBuffer, Stream,
};

use fabric_lib::{MemDesc, MemoryRegion, TransferEngine};

use crate::proxy::{
    self, Proxy, ProxyLayout, ProxyLocal, ProxyPeer, MAILBOX_WORDS, OUT_CFLAG, OUT_DFLAG, OUT_REL,
};
use crate::{
    rank_sharing_gpu, Config, Error, Handle, KernelError, Layout, Result, PEER_BYTES, STATE_BYTES,
};

const THREADS: u32 = 256;

/// Receive areas of closed all-to-alls, kept for reuse instead of freed.
///
/// CUDA IPC mappings are cached by the importing driver: a peer that once mapped an area can
/// later be handed a stale mapping when the exporter frees it and allocates again (we saw
/// peers write into freed memory that way). An area that is never freed can only ever be
/// mapped to itself, so closed areas wait here for the next all-to-all of this process.
static RX_POOL: Mutex<Vec<(usize, DeviceBuffer)>> = Mutex::new(Vec::new());

/// A zeroed receive area of at least `len` bytes on `device`: the smallest pooled one that fits
/// (and is not more than 4x too large), else a new allocation.
fn take_rx(ctx: &Arc<Context>, device: usize, len: usize) -> Result<DeviceBuffer> {
    let reused = {
        let mut pool = RX_POOL.lock().unwrap_or_else(|e| e.into_inner());
        let best = pool
            .iter()
            .enumerate()
            .filter(|(_, (d, b))| *d == device && b.len() >= len && b.len() <= len.max(1 << 20) * 4)
            .min_by_key(|(_, (_, b))| b.len())
            .map(|(i, _)| i);
        best.map(|i| pool.swap_remove(i).1)
    };
    let mut rx = match reused {
        Some(b) => b,
        None => DeviceBuffer::alloc(ctx, len)?,
    };
    rx.fill(0)?;
    Ok(rx)
}

impl Remote {
    fn new(
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

/// Rows the kernels read or write with 16-byte accesses: aligned start, stride a multiple of 16
/// and at least one row long.
fn check_rows(what: &str, ptr: CUdeviceptr, stride: i64, row_bytes: usize) -> Result<()> {
    if ptr % 16 != 0 || stride % 16 != 0 || stride < row_bytes as i64 {
        return Err(Error::InvalidArgument(format!(
            "{what} must be 16-byte aligned with a stride of at least {row_bytes} bytes (a \
             multiple of 16); got address {ptr:#x}, stride {stride}"
        )));
    }
    Ok(())
}

fn random_nonce() -> u64 {
    let mut h = RandomState::new().build_hasher();
    h.write_u32(std::process::id());
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap_or_default();
    h.write_u128(now.as_nanos());
    h.finish() | 1
}

/// Mirror of `Peer` in kernels/moe.cu.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct PeerEntry {
    data: u64,
    meta: u64,
    ecount: u64,
    dflag: u64,
    cflag: u64,
    rel: u64,
    rx_data: u64,
    rx_meta: u64,
    rx_ecount: u64,
    rx_dflag: u64,
    rx_cflag: u64,
    rel_in: u64,
    cntflag: u64,
    chunk: u64,
    rx_cntflag: u64,
    rx_chunk: u64,
}
const _: () = assert!(std::mem::size_of::<PeerEntry>() == PEER_BYTES);

/// Mirror of `Params` in kernels/moe.cu: same fields, same order.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default)]
struct KernelParams {
    peers: u64,
    st: u64,
    err: u64,
    tok_mask: u64,
    host_mask: u64,
    ecount_local: u64,
    route_rows: u64,
    num_tokens_ptr: u64,
    x: u64,
    scales: u64,
    idx: u64,
    weights: u64,
    out_x: u64,
    out_s: u64,
    expert_counts: u64,
    expert_offsets: u64,
    y: u64,
    out: u64,
    x_stride: i64,
    s_stride: i64,
    idx_stride: i64,
    w_stride: i64,
    y_stride: i64,
    out_stride: i64,
    timeout_ns: u64,
    rank: i32,
    world: i32,
    experts_per_rank: i32,
    topk: i32,
    max_tokens: i32,
    num_tokens: i32,
    x_bytes: i32,
    s_bytes: i32,
    slot_bytes: i32,
    meta_bytes: i32,
    capacity: i32,
    hidden: i32,
    idx64: i32,
    accumulate: i32,
    chunk_tokens: i32,
    senders: i32,
}
const _: () = assert!(std::mem::size_of::<KernelParams>() == 18 * 8 + 7 * 8 + 16 * 4);

/// Inputs of `dispatch_send`. Pointers are device addresses on this rank's GPU; strides are in
/// bytes for rows of data and in elements for the routing.
#[derive(Debug, Clone, Copy)]
pub struct DispatchArgs {
    /// Token rows (`x_bytes` each, 16-byte aligned).
    pub x: CUdeviceptr,
    /// Bytes between token rows (a multiple of 16).
    pub x_stride: i64,
    /// float32 scales per token (0 when the config has none).
    pub scales: CUdeviceptr,
    /// Bytes between scale rows (a multiple of 4).
    pub s_stride: i64,
    /// Expert ids, `[tokens][topk]`, int32 or int64.
    pub idx: CUdeviceptr,
    /// True for int64 ids.
    pub idx64: bool,
    /// Elements between rows of `idx`.
    pub idx_stride: i64,
    /// float32 routing weights `[tokens][topk]`.
    pub weights: CUdeviceptr,
    /// Elements between rows of `weights`.
    pub w_stride: i64,
    /// Token count this step; `None` reads an int32 at `num_tokens_ptr` (for CUDA graphs).
    pub num_tokens: Option<usize>,
    /// Device int32 holding the token count, used when `num_tokens` is `None`.
    pub num_tokens_ptr: CUdeviceptr,
}

/// Outputs of `dispatch_recv`: rows of local expert `e` are `offsets[e]..offsets[e] + counts[e]`.
#[derive(Debug, Clone, Copy)]
pub struct DispatchOutputs {
    /// `[capacity][x_bytes]` token rows.
    pub out_x: CUdeviceptr,
    /// `[capacity][s_bytes]` scales (0 when none).
    pub out_s: CUdeviceptr,
    /// int32 `[experts_per_rank]`.
    pub counts: CUdeviceptr,
    /// int32 `[experts_per_rank + 1]`.
    pub offsets: CUdeviceptr,
}

/// Inputs and outputs of the combine.
#[derive(Debug, Clone, Copy)]
pub struct CombineArgs {
    /// Expert outputs, rows as the dispatch output (`hidden` elements of the combine dtype).
    pub y: CUdeviceptr,
    /// Bytes between rows of `y`.
    pub y_stride: i64,
    /// Result rows `[tokens][hidden]`.
    pub out: CUdeviceptr,
    /// Bytes between result rows.
    pub out_stride: i64,
    /// Add to what `out` holds instead of overwriting it.
    pub accumulate: bool,
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

/// Blocks per SM the phases launch (`STOLON_MOE_BLOCKS_PER_SM`, 1..=8; default
/// [`DEFAULT_BLOCKS_PER_SM`], which the kernels' launch bounds keep resident). More blocks keep
/// more loads and NVLink stores in flight: at prefill sizes the phases are bandwidth-bound
/// (on 2 H200s, 1 -> 4 blocks per SM took prefill dispatch from 234 to 201 us and combine from
/// 380 to 308 us); decode sizes launch one block per token or fewer either way.
fn blocks_per_sm() -> u32 {
    std::env::var("STOLON_MOE_BLOCKS_PER_SM")
        .ok()
        .and_then(|v| v.trim().parse::<u32>().ok())
        .filter(|b| (1..=8).contains(b))
        .unwrap_or(DEFAULT_BLOCKS_PER_SM)
}

/// See [`blocks_per_sm`].
pub const DEFAULT_BLOCKS_PER_SM: u32 = 4;

/// Smallest `max_tokens` for which [`AllToAll::dispatch`] overlaps by default.
pub const OVERLAP_MIN_TOKENS: usize = 512;

/// Blocks of the overlapped dispatch that send this rank's tokens to the peers
/// (`STOLON_MOE_SENDERS`, at least 1; default [`DEFAULT_SENDERS`]); the other blocks expand
/// what has landed and this rank's own tokens. A bounded set of senders working in token order
/// makes the peers' chunks land one after another from the start, so their expansion overlaps
/// the transfer; with every block sending, every chunk would land at the end. One sender block
/// moves only 4-5 GB/s over NVLink (2 H100s), hence the default: the best of 128, 192 and 256
/// measured there.
fn overlap_senders() -> i32 {
    senders_from_env("STOLON_MOE_SENDERS", DEFAULT_SENDERS)
}

/// See [`overlap_senders`].
pub const DEFAULT_SENDERS: i32 = 192;

/// Blocks of the overlapped combine that sum the tokens the peers sent here and write the sums
/// back (`STOLON_MOE_COMBINE_SENDERS`, at least 1; default [`DEFAULT_COMBINE_SENDERS`]); the
/// other blocks sum this rank's own tokens as the peers' sums of them land.
fn combine_senders() -> i32 {
    senders_from_env("STOLON_MOE_COMBINE_SENDERS", DEFAULT_COMBINE_SENDERS)
}

/// See [`combine_senders`].
pub const DEFAULT_COMBINE_SENDERS: i32 = 264;

/// Whether the overlapped dispatch launches its second kernel early (programmatic dependent
/// launch, so that its senders start while the counts kernel runs): on GPUs of compute
/// capability 9.0 and newer, unless `STOLON_MOE_EARLY_LAUNCH=0`.
fn early_launch(dev: &Device) -> Result<bool> {
    if std::env::var("STOLON_MOE_EARLY_LAUNCH").is_ok_and(|v| v.trim() == "0") {
        return Ok(false);
    }
    Ok(dev.attribute(sys::CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR)? >= 9)
}

fn senders_from_env(var: &str, default: i32) -> i32 {
    std::env::var(var)
        .ok()
        .and_then(|v| v.trim().parse::<i32>().ok())
        .filter(|s| *s >= 1)
        .unwrap_or(default)
}

/// What ranks on other nodes need: the engine, the staging area and the proxy's mailbox and
/// header areas, all registered with the engine, and the proxy thread once connected.
struct Remote {
    engine: Arc<TransferEngine>,
    playout: ProxyLayout,
    tx: DeviceBuffer,
    tx_region: MemoryRegion,
    rx_region: MemoryRegion,
    headers_in: MemoryRegion,
    headers_out: MemoryRegion,
    mailbox: PinnedHostBuffer,
    proxy: Option<(Arc<AtomicBool>, std::thread::JoinHandle<Proxy>)>,
}

impl Remote {
    /// Byte offset of the token masks in the mailbox buffer.
    fn masks_offset(&self) -> usize {
        self.playout.world * MAILBOX_WORDS * 8
    }

    fn mailbox_word(&self, peer: usize, which: usize) -> u64 {
        self.mailbox.device_ptr() + ((peer * MAILBOX_WORDS + which) * 8) as u64
    }

    /// Stops the proxy thread; its error, if it met one.
    fn stop(&mut self) -> Option<String> {
        let (stop, handle) = self.proxy.take()?;
        stop.store(true, std::sync::atomic::Ordering::Release);
        match handle.join() {
            Ok(p) => p.error().map(str::to_string),
            Err(_) => Some("the proxy thread panicked".to_string()),
        }
    }

    fn unregister(&self) {
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
        let sms = dev.attribute(sys::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT)? as u32;
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

    fn rx(&self) -> &DeviceBuffer {
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

    /// The bytes peers need to map this rank's receive area ([`Handle`]).
    ///
    /// # Errors
    /// A CUDA error exporting the IPC handle.
    pub fn handle(&self) -> Result<Vec<u8>> {
        let ipc = stolon_cuda::IpcMemHandle::of_buffer(self.rx())?;
        Ok(Handle {
            rank: self.cfg.rank,
            world: self.cfg.world,
            fingerprint: self.cfg.fingerprint(),
            pid: std::process::id(),
            nonce: self.nonce,
            ipc: *ipc.as_bytes(),
            rx_desc: self
                .remote
                .as_ref()
                .map(|r| r.rx_region.descriptor().to_bytes())
                .unwrap_or_default(),
            headers_desc: self
                .remote
                .as_ref()
                .map(|r| r.headers_in.descriptor().to_bytes())
                .unwrap_or_default(),
            gpu: self.ctx.device().pci_bus_id()?,
        }
        .to_bytes())
    }

    /// Maps every peer's receive area from the handles of all ranks (index = rank, this rank's
    /// own included) and writes the peer table. Called once.
    ///
    /// # Errors
    /// [`Error::Handshake`] when the handles disagree (world, config, ranks), when a peer is on
    /// another node (the proxy path is not configured), a CUDA error opening a mapping.
    pub fn connect(&mut self, handles: &[Vec<u8>]) -> Result<()> {
        if self.connected {
            return Err(Error::InvalidArgument(
                "connect() was already called".to_string(),
            ));
        }
        let world = self.cfg.world;
        if handles.len() != world {
            return Err(Error::Handshake(format!(
                "{} handles for a world of {world}",
                handles.len()
            )));
        }
        let decoded = handles
            .iter()
            .map(|b| Handle::from_bytes(b))
            .collect::<Result<Vec<_>>>()?;
        for (r, h) in decoded.iter().enumerate() {
            if h.rank != r || h.world != world {
                return Err(Error::Handshake(format!(
                    "handle {r} is from rank {} of a world of {} (expected rank {r} of {world})",
                    h.rank, h.world
                )));
            }
            if h.fingerprint != self.cfg.fingerprint() {
                return Err(Error::Handshake(format!(
                    "rank {r} was built with a different config (experts, top-k, hidden, \
                     dtypes, max_tokens, capacity or grouping differ)"
                )));
            }
        }
        let me = self.cfg.rank;
        if let Some(r) = rank_sharing_gpu(me, &decoded, |r| {
            self.cfg.node_of(r) == self.cfg.node_of(me)
        }) {
            return Err(Error::Handshake(format!(
                "ranks {me} and {r} are separate processes on one GPU ({}): the kernels wait \
                 on each other's flags while two processes' kernels only take turns on a GPU; \
                 give every rank its own GPU (ranks of one process may share one)",
                decoded[me].gpu
            )));
        }
        let mut bases = vec![0u64; world];
        for (r, h) in decoded.iter().enumerate() {
            if r == me {
                bases[r] = self.rx().ptr();
                continue;
            }
            if self.cfg.node_of(r) != self.cfg.node_of(me) {
                continue; // reached through the proxy (below)
            }
            let handle = stolon_cuda::IpcMemHandle::from_bytes(&h.ipc)?;
            let mapping = handle.open(&self.ctx).map_err(|e| {
                Error::Handshake(format!(
                    "cannot map rank {r}'s receive area through CUDA IPC (pid {}; is it on this \
                     host and on a GPU with peer access to this one?): {e}",
                    h.pid
                ))
            })?;
            let mut seen = [0u8; 8];
            // SAFETY: the mapping covers the peer's whole receive area, whose first 8 bytes
            // (rx_nonce) are readable device memory; `seen` is 8 writable bytes.
            unsafe {
                stolon_cuda::memory::copy_dtoh(
                    &self.ctx,
                    seen.as_mut_ptr(),
                    mapping.ptr() + self.layout.rx_nonce as u64,
                    8,
                )?
            };
            if u64::from_le_bytes(seen) != h.nonce {
                return Err(Error::Handshake(format!(
                    "CUDA IPC mapped rank {r}'s receive area, but not the one it exported (a \
                     stale mapping of memory it freed): its nonce differs"
                )));
            }
            bases[r] = mapping.ptr();
            self.mappings.push(mapping);
        }
        let l = &self.layout;
        let c = &self.cfg;
        let mine = self.rx().ptr();
        let slot_region = (c.max_tokens * l.slot_bytes) as u64;
        let meta_region = (c.max_tokens * l.meta_bytes) as u64;
        let ecount_region = (l.experts_per_rank * 4) as u64;
        let chunk_region = (l.max_chunks * 8) as u64;
        let (me64, off) = (me as u64, |b: u64, o: usize| b + o as u64);
        let table: Vec<PeerEntry> = (0..world)
            .map(|p| {
                let b = bases[p];
                let p64 = p as u64;
                PeerEntry {
                    data: off(b, l.rx_data) + me64 * slot_region,
                    meta: off(b, l.rx_meta) + me64 * meta_region,
                    ecount: off(b, l.rx_ecount) + me64 * ecount_region,
                    dflag: off(b, l.rx_dflag) + me64 * 8,
                    cflag: off(b, l.rx_cflag) + me64 * 8,
                    rel: off(b, l.rx_rel) + me64 * 8,
                    rx_data: off(mine, l.rx_data) + p64 * slot_region,
                    rx_meta: off(mine, l.rx_meta) + p64 * meta_region,
                    rx_ecount: off(mine, l.rx_ecount) + p64 * ecount_region,
                    rx_dflag: off(mine, l.rx_dflag) + p64 * 8,
                    rx_cflag: off(mine, l.rx_cflag) + p64 * 8,
                    rel_in: off(mine, l.rx_rel) + p64 * 8,
                    cntflag: off(b, l.rx_cntflag) + me64 * 8,
                    chunk: off(b, l.rx_chunk) + me64 * chunk_region,
                    rx_cntflag: off(mine, l.rx_cntflag) + p64 * 8,
                    rx_chunk: off(mine, l.rx_chunk) + p64 * chunk_region,
                }
            })
            .collect();
        // Ranks on other nodes: the kernels write into the staging area and the mailbox, and
        // wait on the mailbox; the proxy carries the rest.
        let mut table = table;
        let mut proxy_peers = Vec::new();
        if let Some(rm) = &self.remote {
            let tx = rm.tx.ptr();
            for (p, h) in decoded.iter().enumerate() {
                if self.cfg.node_of(p) == self.cfg.node_of(me) {
                    continue;
                }
                let (d, m, e) = rm.playout.tx_parts(p);
                let entry = &mut table[p];
                entry.data = tx + d as u64;
                entry.meta = tx + m as u64;
                entry.ecount = tx + e as u64;
                entry.dflag = rm.mailbox_word(p, OUT_DFLAG);
                entry.cflag = rm.mailbox_word(p, OUT_CFLAG);
                entry.rel = rm.mailbox_word(p, OUT_REL);
                entry.rx_dflag = rm.mailbox_word(p, proxy::IN_DFLAG);
                entry.rx_cflag = rm.mailbox_word(p, proxy::IN_CFLAG);
                entry.rel_in = rm.mailbox_word(p, proxy::IN_REL);
                // dispatch_send stores the counts flag just before the dispatch flag, with the
                // same value: both go to the one mailbox word the proxy watches. Chunk flags
                // belong to the overlapped dispatch, which needs every peer on this node.
                entry.cntflag = entry.dflag;
                entry.rx_cntflag = entry.rx_dflag;
                entry.chunk = 0;
                entry.rx_chunk = 0;
                let desc = |b: &[u8], what: &str| {
                    MemDesc::from_bytes(b).map_err(|e| {
                        Error::Handshake(format!(
                            "rank {p} is on another node but sent no usable {what} descriptor \
                             (was it given an engine?): {e}"
                        ))
                    })
                };
                proxy_peers.push(ProxyPeer {
                    rank: p,
                    rx: desc(&h.rx_desc, "receive area")?,
                    headers: desc(&h.headers_desc, "header area")?,
                });
            }
        }
        // SAFETY: PeerEntry is repr(C) plain data; the slice covers exactly the table.
        let bytes =
            unsafe { std::slice::from_raw_parts(table.as_ptr().cast::<u8>(), world * PEER_BYTES) };
        self.local.copy_from_host(l.peers, bytes)?;
        if let Some(rm) = &mut self.remote {
            // Every rank derives the same instance number from the handles (their nonces), so
            // two all-to-alls on one engine use different immediates.
            let instance = decoded
                .iter()
                .fold(0u8, |a, h| a ^ (h.nonce as u8) ^ ((h.nonce >> 8) as u8));
            let local = ProxyLocal {
                rank: me,
                tx: rm.tx_region.clone(),
                headers_out: rm.headers_out.clone(),
                headers_in: rm.headers_in.clone(),
                mailbox: rm.mailbox.host_ptr().cast::<u64>(),
                // SAFETY: the masks lie inside the mailbox buffer (allocated with them).
                masks: unsafe { rm.mailbox.host_ptr().add(rm.masks_offset()) }.cast::<u64>(),
            };
            let stop = Arc::new(AtomicBool::new(false));
            let p = Proxy::new(rm.engine.clone(), rm.playout, instance, local, proxy_peers);
            rm.proxy = Some((stop.clone(), p.spawn(stop)));
        }
        self.connected = true;
        Ok(())
    }

    fn base_params(&self) -> KernelParams {
        let l = &self.layout;
        let c = &self.cfg;
        let local = self.local.ptr();
        KernelParams {
            peers: local + l.peers as u64,
            st: local + l.st as u64,
            err: self.err.device_ptr(),
            tok_mask: local + l.tok_mask as u64,
            host_mask: self
                .remote
                .as_ref()
                .map_or(0, |rm| rm.mailbox.device_ptr() + rm.masks_offset() as u64),
            ecount_local: local + l.ecount_local as u64,
            route_rows: local + l.route_rows as u64,
            timeout_ns: c.timeout.as_nanos().min(u64::MAX as u128) as u64,
            rank: c.rank as i32,
            world: c.world as i32,
            experts_per_rank: l.experts_per_rank as i32,
            topk: c.topk as i32,
            max_tokens: c.max_tokens as i32,
            num_tokens: -1,
            x_bytes: l.x_bytes as i32,
            s_bytes: l.s_bytes as i32,
            slot_bytes: l.slot_bytes as i32,
            meta_bytes: l.meta_bytes as i32,
            capacity: l.capacity as i32,
            hidden: c.hidden as i32,
            chunk_tokens: l.chunk_tokens as i32,
            senders: self.overlap_senders,
            ..KernelParams::default()
        }
    }

    fn grid(&self, items: usize) -> u32 {
        (items.max(1) as u32).min(self.max_blocks)
    }

    /// # Safety
    /// Every pointer in `p` must be valid for the kernel until it completes.
    unsafe fn launch(
        &self,
        f: &Function,
        stream: &Stream,
        grid: u32,
        smem: u32,
        p: KernelParams,
    ) -> Result<()> {
        // SAFETY: as promised by the caller.
        unsafe { self.launch_with(f, stream, grid, smem, p, false) }
    }

    /// As [`AllToAll::launch`]; with `early`, `f` may start before the kernel ahead of it on
    /// `stream` finishes ([`Function::launch_early`]; a driver without that launches it
    /// plainly).
    ///
    /// # Safety
    /// As [`AllToAll::launch`]; with `early`, `f` must wait for what it needs of the kernel
    /// ahead of it.
    unsafe fn launch_with(
        &self,
        f: &Function,
        stream: &Stream,
        grid: u32,
        smem: u32,
        mut p: KernelParams,
        early: bool,
    ) -> Result<()> {
        if !self.connected {
            return Err(Error::InvalidArgument(
                "connect() must be called before the first phase".to_string(),
            ));
        }
        if let Some(e) = self.error().filter(|e| e.code == 1) {
            // A timeout leaves the ranks out of step for good; other errors are per step.
            return Err(Error::Kernel(e));
        }
        let mut params = [(&mut p as *mut KernelParams).cast::<c_void>()];
        let (grid, block) = ((grid, 1, 1), (THREADS, 1, 1));
        if early {
            // SAFETY: as below; the caller promises the kernel's own synchronization.
            match unsafe { f.launch_early(stream, grid, block, smem, &mut params) } {
                Err(stolon_cuda::Error::Unsupported { .. }) => {}
                r => return Ok(r?),
            }
        }
        // SAFETY: the one parameter is a KernelParams, the kernels' `Params` (checked layout);
        // the caller promises the pointers inside.
        unsafe { f.launch(stream, grid, block, smem, &mut params)? };
        Ok(())
    }

    /// Queues `dispatch_send` on `stream`.
    ///
    /// # Safety
    /// The pointers in `a` must address device memory of this GPU as described, valid (and not
    /// written by others) until the launch completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] (too many tokens, misaligned rows), a recorded kernel error.
    pub unsafe fn dispatch_send(&self, stream: &Stream, a: &DispatchArgs) -> Result<()> {
        let p = self.send_params(a)?;
        // SAFETY: the caller promises the inputs; our own buffers live as long as self.
        unsafe { self.launch_send(stream, p) }
    }

    /// # Safety
    /// As [`AllToAll::launch`]; `p` from [`AllToAll::send_params`].
    unsafe fn launch_send(&self, stream: &Stream, p: KernelParams) -> Result<()> {
        let grid = self.grid(self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.dispatch_send, stream, grid, 0, p) }
    }

    /// The kernel parameters of a dispatch's inputs, checked.
    fn send_params(&self, a: &DispatchArgs) -> Result<KernelParams> {
        let l = &self.layout;
        let num_tokens = match a.num_tokens {
            Some(n) if n > self.cfg.max_tokens => {
                return Err(Error::InvalidArgument(format!(
                    "{n} tokens is more than max_tokens ({})",
                    self.cfg.max_tokens
                )))
            }
            Some(n) => n as i32,
            None if a.num_tokens_ptr == 0 => {
                return Err(Error::InvalidArgument(
                    "neither num_tokens nor a num_tokens pointer given".to_string(),
                ))
            }
            None => -1,
        };
        check_rows("token rows", a.x, a.x_stride, l.x_bytes)?;
        let empty = a.num_tokens == Some(0);
        if (l.s_bytes > 0 && a.scales == 0 && !empty) || (l.s_bytes == 0 && a.scales != 0) {
            return Err(Error::InvalidArgument(if l.s_bytes > 0 {
                "this all-to-all sends scales with every token, but none were given".to_string()
            } else {
                "scales given, but this all-to-all was built without scales".to_string()
            }));
        }
        if a.scales != 0 && (a.scales % 4 != 0 || a.s_stride % 4 != 0) {
            return Err(Error::InvalidArgument(
                "scales must be 4-byte aligned".to_string(),
            ));
        }
        let p = KernelParams {
            x: a.x,
            x_stride: a.x_stride,
            scales: a.scales,
            s_stride: a.s_stride,
            idx: a.idx,
            idx64: i32::from(a.idx64),
            idx_stride: a.idx_stride,
            weights: a.weights,
            w_stride: a.w_stride,
            num_tokens,
            num_tokens_ptr: a.num_tokens_ptr,
            ..self.base_params()
        };
        Ok(p)
    }

    /// Queues `dispatch_recv` on `stream`.
    ///
    /// # Safety
    /// `o`'s pointers must address device memory of this GPU of at least the sizes described
    /// in [`DispatchOutputs`] (with `capacity` rows), valid until the launch completes.
    ///
    /// # Errors
    /// A recorded kernel error.
    pub unsafe fn dispatch_recv(&self, stream: &Stream, o: &DispatchOutputs) -> Result<()> {
        let p = self.recv_params(o, self.base_params())?;
        // SAFETY: as promised by the caller.
        unsafe { self.launch_recv(stream, p) }
    }

    /// # Safety
    /// As [`AllToAll::launch`]; `p` from [`AllToAll::recv_params`].
    unsafe fn launch_recv(&self, stream: &Stream, p: KernelParams) -> Result<()> {
        let grid = self.grid(self.cfg.world * self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe {
            self.launch(
                &self.kernels.dispatch_recv,
                stream,
                grid,
                self.offsets_smem(),
                p,
            )
        }
    }

    /// `p` with a dispatch's outputs, checked.
    fn recv_params(&self, o: &DispatchOutputs, p: KernelParams) -> Result<KernelParams> {
        if o.out_x % 16 != 0 {
            return Err(Error::InvalidArgument(
                "the dispatch output must be 16-byte aligned".to_string(),
            ));
        }
        Ok(KernelParams {
            out_x: o.out_x,
            out_s: o.out_s,
            expert_counts: o.counts,
            expert_offsets: o.offsets,
            ..p
        })
    }

    /// Shared memory of the kernels that compute the expert offsets.
    fn offsets_smem(&self) -> u32 {
        ((self.cfg.world + 1) * self.layout.experts_per_rank * 4) as u32
    }

    /// Whether [`AllToAll::dispatch`] and [`AllToAll::combine`] overlap by default: every peer
    /// is on this node (the overlapped forms write peer memory directly) and a step may carry
    /// [`OVERLAP_MIN_TOKENS`] tokens or more.
    pub fn overlaps_by_default(&self) -> bool {
        self.remote.is_none() && self.cfg.max_tokens >= OVERLAP_MIN_TOKENS
    }

    /// `overlap` or the default for the overlapped `what` (dispatch, combine); refused with
    /// ranks on other nodes.
    fn resolve_overlap(&self, overlap: Option<bool>, what: &str) -> Result<bool> {
        let overlap = overlap.unwrap_or_else(|| self.overlaps_by_default());
        if overlap && self.remote.is_some() {
            return Err(Error::InvalidArgument(format!(
                "the overlapped {what} writes every peer's memory directly; with ranks on other \
                 nodes (ranks_per_node < world) use the split form"
            )));
        }
        Ok(overlap)
    }

    /// Queues a whole dispatch on `stream`: `dispatch_send` then `dispatch_recv`, or, with
    /// `overlap` (default: [`AllToAll::overlaps_by_default`]), the overlapped form, which
    /// expands this rank's own tokens and each peer's chunks of tokens while the sends are
    /// still draining (two launches, see kernels/moe.cu). Either way the outputs, the state
    /// the combine reads and what peers see are the same, so ranks may choose differently in
    /// one step. Returns whether it overlapped.
    ///
    /// # Safety
    /// As [`AllToAll::dispatch_send`] for `a` and [`AllToAll::dispatch_recv`] for `o`.
    ///
    /// # Errors
    /// As the two halves; [`Error::InvalidArgument`] for `overlap = Some(true)` with ranks on
    /// other nodes.
    pub unsafe fn dispatch(
        &self,
        stream: &Stream,
        a: &DispatchArgs,
        o: &DispatchOutputs,
        overlap: Option<bool>,
    ) -> Result<bool> {
        let overlap = self.resolve_overlap(overlap, "dispatch")?;
        let p = self.recv_params(o, self.send_params(a)?)?;
        if !overlap {
            // SAFETY: as promised by the caller.
            unsafe {
                self.launch_send(stream, p)?;
                self.launch_recv(stream, p)?;
            }
            return Ok(false);
        }
        let count_grid = self.grid(self.cfg.max_tokens * self.cfg.topk / THREADS as usize);
        // SAFETY: as promised by the caller; both kernels read only the inputs and write only
        // the outputs, this rank's own buffers and the peers' receive areas.
        unsafe {
            self.launch(&self.kernels.dispatch_count, stream, count_grid, 0, p)?;
            let (grid, smem, early) = (self.max_blocks, self.offsets_smem(), self.early_launch);
            self.launch_with(&self.kernels.dispatch_fused, stream, grid, smem, p, early)?;
        }
        Ok(true)
    }

    /// Queues `combine_send` on `stream`.
    ///
    /// # Safety
    /// `a.y` must hold `capacity` rows of `y_stride` bytes on this GPU until the launch
    /// completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for misaligned rows, a recorded kernel error.
    pub unsafe fn combine_send(&self, stream: &Stream, a: &CombineArgs) -> Result<()> {
        let p = self.send_combine_params(a)?;
        let grid = self.grid(self.cfg.world * self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.combine_send, stream, grid, 0, p) }
    }

    /// Queues `combine_recv` on `stream`.
    ///
    /// # Safety
    /// `a.out` must hold as many rows of `out_stride` bytes as tokens were dispatched, on this
    /// GPU, until the launch completes.
    ///
    /// # Errors
    /// [`Error::InvalidArgument`] for misaligned rows, a recorded kernel error.
    pub unsafe fn combine_recv(&self, stream: &Stream, a: &CombineArgs) -> Result<()> {
        let p = self.recv_combine_params(a, self.base_params())?;
        let grid = self.grid(self.cfg.max_tokens);
        // SAFETY: as promised by the caller.
        unsafe { self.launch(&self.kernels.combine_recv, stream, grid, 0, p) }
    }

    fn send_combine_params(&self, a: &CombineArgs) -> Result<KernelParams> {
        check_rows("expert output rows", a.y, a.y_stride, self.layout.c_bytes)?;
        Ok(KernelParams {
            y: a.y,
            y_stride: a.y_stride,
            ..self.base_params()
        })
    }

    fn recv_combine_params(&self, a: &CombineArgs, p: KernelParams) -> Result<KernelParams> {
        check_rows("result rows", a.out, a.out_stride, self.layout.c_bytes)?;
        Ok(KernelParams {
            out: a.out,
            out_stride: a.out_stride,
            accumulate: i32::from(a.accumulate),
            ..p
        })
    }

    /// Queues a whole combine on `stream`: `combine_send` then `combine_recv`, or, with
    /// `overlap` (default: [`AllToAll::overlaps_by_default`]), the overlapped form (one
    /// launch), which sums this rank's own tokens while the peers' partial sums are still
    /// landing, and never writes its own partial sums to memory. The result and what peers see
    /// are the same either way, so ranks may choose differently in one step. Returns whether
    /// it overlapped.
    ///
    /// # Safety
    /// As [`AllToAll::combine_send`] and [`AllToAll::combine_recv`] for `a`.
    ///
    /// # Errors
    /// As the two halves; [`Error::InvalidArgument`] for `overlap = Some(true)` with ranks on
    /// other nodes.
    pub unsafe fn combine(
        &self,
        stream: &Stream,
        a: &CombineArgs,
        overlap: Option<bool>,
    ) -> Result<bool> {
        let overlap = self.resolve_overlap(overlap, "combine")?;
        // Both halves' arguments are checked before anything is queued.
        let p = self.recv_combine_params(a, self.send_combine_params(a)?)?;
        if !overlap {
            // SAFETY: as promised by the caller.
            unsafe {
                self.combine_send(stream, a)?;
                self.combine_recv(stream, a)?;
            }
            return Ok(false);
        }
        let p = KernelParams {
            senders: self.combine_senders,
            ..p
        };
        // SAFETY: as promised by the caller; the kernel reads the expert outputs and writes
        // the result, this rank's own buffers and the peers' receive areas.
        unsafe {
            self.launch(&self.kernels.combine_fused, stream, self.max_blocks, 0, p)?;
        }
        Ok(true)
    }

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
            RX_POOL
                .lock()
                .unwrap_or_else(|e| e.into_inner())
                .push((self.ctx.device().ordinal(), rx));
        }
    }
}
