//! The public engine: configuration, registration, submission, counters, stop.
//!
//! Split by concern: [`config`] (how to build one), `shared` (state shared with the worker),
//! [`region`] (registered memory), `gpu` (GPU registration and NVLink mappings), `submit`
//! (transfers); this file holds the engine itself: opening, registration, routing, stop.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::Duration;

use crate::callbacks::{CallbackSink, CallbackThread};
use crate::desc::{MemDesc, PeerAddr, MAX_DOMAINS};
use crate::domain_types::DomainAttrs;
use crate::error::{Error, Result};
use crate::imm::ImmCounter;
use crate::lease::NO_LEASE;
use crate::nvlink::{NvlinkMap, Route};
use crate::shard::{OpPlan, PagedSpec, ScatterItem, ShardParams, Sharding};
use crate::transfer::{Completion, Transfer, TransferState};
use crate::vmm_share::FdServer;
use crate::worker::{Op, OpKind, Request, TransferReq, Trigger, Worker, WorkerConfig};

mod config;
mod gpu;
mod region;
mod submit;

pub use crate::shared::{DomainStats, StatsSnapshot};
pub(crate) use crate::shared::{MessageCallback, MessageQueue, PeerTable, Shared, Waker};
pub use config::{is_socket_provider, EngineConfig};
use gpu::Share;
pub use region::{MemoryRegion, Path, RegionMem};
pub(crate) use region::{RegionInner, STAGED_HOST_DEVICE};

/// A validated, planned transfer that has not been submitted yet (see the `prepare_*` methods).
/// Submit it with [`TransferEngine::submit`], or hand it to a watcher that submits it when a
/// progress counter reaches its step.
pub struct Prepared {
    ops: Vec<Op>,
    keep: Vec<crate::worker::KeepAlive>,
    payload: Option<Vec<u8>>,
    imm_counts: Vec<usize>,
    timeout: Duration,
    engine_id: u64,
}

impl Prepared {
    /// Immediates the transfer will produce at each receiver.
    pub fn imm_counts(&self) -> &[usize] {
        &self.imm_counts
    }

    /// What the transfer's success will mean (the engine's default unless changed here).
    pub fn with_completion(mut self, completion: Completion) -> Self {
        let delivered = completion == Completion::Delivered;
        for op in &mut self.ops {
            op.delivered = delivered;
        }
        self
    }
}

/// Called with (old, new) when a watched counter changes.
pub type WatchCallback = Box<dyn Fn(u64, u64) + Send + Sync>;

/// A transfer engine: one domain group driven by one worker thread.
///
/// Thread safety: every method takes `&self` and may be called from any thread; submissions are
/// queued to the worker. Cleanup: [`TransferEngine::stop`] (or drop) fails what is in flight
/// with [`Error::Stopped`], joins the worker and closes every libfabric object.
pub struct TransferEngine {
    config: EngineConfig,
    params: ShardParams,
    /// Planning for staged transfers: every op is at most one message buffer.
    staged_params: ShardParams,
    /// Planning for NVLink copies: one copy per write, page or scatter item.
    nvlink_params: ShardParams,
    /// Remote GPU regions (peer id, region id) already described to the worker.
    remote_gpu: Mutex<std::collections::HashSet<(u32, u64)>>,
    /// The Unix socket that hands this engine's VMM regions to NVLink writers.
    vmm_server: Option<Arc<FdServer>>,
    addr: PeerAddr,
    attrs: Vec<DomainAttrs>,
    tx: Sender<Request>,
    shared: Arc<Shared>,
    /// Leases on peers' descriptors, by descriptor: each distinct descriptor is checked by its
    /// owner once (`crate::lease`).
    leases: Mutex<HashMap<MemDesc, u32>>,
    rotation: AtomicUsize,
    next_region: AtomicU64,
    stopped: AtomicBool,
    worker: Mutex<Option<JoinHandle<()>>>,
    callbacks: Mutex<Option<CallbackThread>>,
    sink: CallbackSink,
    /// The process that created the engine; a forked child has no worker thread.
    pid: u32,
}

/// The engine's VMM socket: `$STOLON_VMM_SOCKET_DIR/...sock` when set, else a name in the
/// abstract namespace (nothing on disk, gone with the process).
fn vmm_socket_name(engine_id: u64) -> String {
    let base = format!("stolon-vmm-{engine_id:016x}-{}", std::process::id());
    match std::env::var_os("STOLON_VMM_SOCKET_DIR") {
        Some(dir) if !dir.is_empty() => std::path::Path::new(&dir)
            .join(format!("{base}.sock"))
            .to_string_lossy()
            .into_owned(),
        _ => format!("@{base}"),
    }
}

fn random_u64() -> u64 {
    use std::hash::{BuildHasher, Hasher};
    let mut h = std::collections::hash_map::RandomState::new().build_hasher();
    h.write_u128(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .unwrap_or_default()
            .as_nanos(),
    );
    h.write_u32(std::process::id());
    h.finish()
}

impl TransferEngine {
    /// Opens every domain and starts the worker.
    pub fn new(config: EngineConfig) -> Result<Self> {
        let n = config.domains.len();
        if n == 0 || n > MAX_DOMAINS {
            return Err(Error::Config(format!(
                "{n} domains (must be 1..={MAX_DOMAINS})"
            )));
        }
        if config.max_message_bytes == 0 || config.recv_buffers == 0 || config.send_buffers == 0 {
            return Err(Error::Config("message buffers must be non-empty".into()));
        }
        let callbacks = CallbackThread::start();
        let sink = callbacks.sink();
        let engine_id = random_u64();
        let shared = Arc::new(Shared {
            imm: ImmCounter::new(sink.clone()),
            messages: MessageQueue {
                q: Mutex::new((VecDeque::new(), false)),
                cv: Condvar::new(),
                callback: Mutex::new(None),
                sink: sink.clone(),
            },
            stats: (0..n).map(|_| DomainStats::default()).collect(),
            nvlink: DomainStats::default(),
            next_key: AtomicU64::new(1 + (random_u64() & 0xffff) * 0x10000),
            engine_id,
            addr_bytes: std::sync::OnceLock::new(),
            published: Mutex::new(HashMap::new()),
            peers: Mutex::new(PeerTable::default()),
            waker: Waker::new()?,
        });
        let mailbox = config
            .cuda_device
            .filter(|_| config.nvlink)
            .map(|_| format!("/stolon-{:016x}-{}", engine_id, std::process::id()));
        let (tx, rx) = mpsc::channel();
        if config.max_message_bytes % 4096 != 0 {
            return Err(Error::Config(format!(
                "max_message_bytes {} must be a multiple of 4096",
                config.max_message_bytes
            )));
        }
        let wcfg = WorkerConfig {
            spin: config.spin,
            max_sleep: config.max_sleep,
            recv_buffers: config.recv_buffers,
            send_buffers: config.send_buffers,
            max_message: config.max_message_bytes,
            cpu: config.worker_cpu,
            cuda_device: config.cuda_device,
            mailbox: mailbox.clone(),
            revoke_timeout: config.revoke_timeout,
        };
        // Domains are opened on the worker thread, which owns them from then on.
        let (ready_tx, ready_rx) = mpsc::sync_channel(1);
        let mut specs = config.domains.clone();
        for s in &mut specs {
            s.hmem |= config.cuda_device.is_some();
        }
        let wshared = shared.clone();
        let handle = std::thread::Builder::new()
            .name("stolon-worker".into())
            .spawn(move || match Worker::open(&specs, rx, wshared, wcfg) {
                Ok((w, addrs, attrs)) => {
                    let _ = ready_tx.send(Ok((addrs, attrs)));
                    w.run();
                }
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                }
            })
            .map_err(|e| Error::Config(format!("cannot spawn worker: {e}")))?;
        let (domain_addrs, attrs) = match ready_rx.recv() {
            Ok(Ok(x)) => x,
            Ok(Err(e)) => {
                let _ = handle.join();
                return Err(e);
            }
            Err(_) => {
                let _ = handle.join();
                return Err(Error::Config("worker died while opening domains".into()));
            }
        };
        let max_op = config
            .max_op_bytes
            .unwrap_or_else(|| {
                attrs
                    .iter()
                    .map(|a| a.max_msg_size as u64)
                    .min()
                    .unwrap_or(0)
            })
            .min(1 << 30);
        let params = ShardParams::new(n, config.min_shard_bytes, max_op)?;
        let staged_params = ShardParams::new(
            n,
            config.min_shard_bytes,
            (config.max_message_bytes as u64).min(max_op),
        )?;
        let host = crate::nvlink::host_id();
        let vmm_server = match &mailbox {
            Some(_) if !host.is_empty() => {
                let name = vmm_socket_name(engine_id);
                match FdServer::bind(&name, config.timeout) {
                    Ok(s) => Some(Arc::new(s)),
                    Err(e) => {
                        eprintln!("stolon: VMM memory will be staged, not sent over NVLink: {e}");
                        None
                    }
                }
            }
            _ => None,
        };
        let vmm_socket = vmm_server
            .as_ref()
            .map(|s| s.name().to_string())
            .unwrap_or_default();
        let addr = PeerAddr {
            engine_id,
            max_message: config.max_message_bytes as u32,
            domains: domain_addrs,
            nvlink: mailbox
                .filter(|_| !host.is_empty())
                .map(|mailbox| crate::desc::NvlinkAddr {
                    host_id: host.clone(),
                    mailbox,
                    pid: std::process::id(),
                    vmm_socket,
                }),
        };
        let nvlink_params = ShardParams::new(1, 1 << 40, 1 << 40)?;
        let _ = shared.addr_bytes.set(addr.to_bytes());
        Ok(TransferEngine {
            config,
            params,
            staged_params,
            nvlink_params,
            remote_gpu: Mutex::new(std::collections::HashSet::new()),
            vmm_server,
            addr,
            attrs,
            tx,
            shared,
            leases: Mutex::new(HashMap::new()),
            rotation: AtomicUsize::new(0),
            next_region: AtomicU64::new(1),
            stopped: AtomicBool::new(false),
            worker: Mutex::new(Some(handle)),
            callbacks: Mutex::new(Some(callbacks)),
            sink,
            pid: std::process::id(),
        })
    }

    /// This engine's address, to give to peers.
    pub fn address(&self) -> &PeerAddr {
        &self.addr
    }

    /// What each domain's provider granted.
    pub fn domain_attrs(&self) -> &[DomainAttrs] {
        &self.attrs
    }

    /// The sharding parameters in force.
    pub fn shard_params(&self) -> ShardParams {
        self.params
    }

    /// The sharding parameters for staged (GPU) transfers: ops of at most one message buffer.
    pub fn staged_shard_params(&self) -> ShardParams {
        self.staged_params
    }

    /// The configuration the engine was built with.
    pub fn config(&self) -> &EngineConfig {
        &self.config
    }

    /// The receiver-side immediate counter.
    pub fn imm_counter(&self) -> &ImmCounter {
        &self.shared.imm
    }

    /// Per-domain counters.
    pub fn stats(&self) -> Vec<StatsSnapshot> {
        self.shared
            .stats
            .iter()
            .map(DomainStats::snapshot)
            .collect()
    }

    /// Counters of the NVLink path.
    pub fn nvlink_stats(&self) -> StatsSnapshot {
        self.shared.nvlink.snapshot()
    }

    /// Fails in a forked child: the worker thread and the libfabric state belong to the parent.
    fn check_process(&self) -> Result<()> {
        if std::process::id() != self.pid {
            return Err(Error::Config(
                "this engine was created in another process (fork); create a new engine in the \
                 child"
                    .into(),
            ));
        }
        Ok(())
    }

    fn send_req(&self, req: Request) -> Result<()> {
        self.check_process()?;
        if self.stopped.load(Ordering::Acquire) {
            return Err(Error::Stopped);
        }
        self.tx.send(req).map_err(|_| Error::Stopped)?;
        self.shared.waker.ring();
        Ok(())
    }

    /// Sends a request that carries a reply channel and waits for the worker's answer.
    fn ask_worker<T>(&self, make: impl FnOnce(mpsc::SyncSender<T>) -> Request) -> Result<T> {
        let (reply, rx) = mpsc::sync_channel(1);
        self.send_req(make(reply))?;
        rx.recv().map_err(|_| Error::Stopped)
    }

    /// Registers `len` bytes at `ptr`; `owner` is kept alive as long as the region is.
    ///
    /// # Safety
    /// The memory must stay valid and not move while the region (or any transfer using it) is
    /// alive. Passing the object that owns the memory as `owner` is the usual way to ensure it.
    pub unsafe fn register(
        &self,
        ptr: usize,
        len: u64,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        if ptr == 0 && len > 0 {
            return Err(Error::InvalidArgument("null pointer".into()));
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let len_ = len as usize;
        let keys = self.ask_worker(|reply| Request::Register {
            id,
            ptr,
            len: len_,
            reply,
        })??;
        Ok(self.new_region(id, ptr, len, keys, RegionMem::Host, None, None, owner))
    }

    #[allow(clippy::too_many_arguments)]
    fn new_region(
        &self,
        id: u64,
        ptr: usize,
        len: u64,
        keys: Vec<u64>,
        mem: RegionMem,
        gpu: Option<crate::desc::GpuDesc>,
        share: Option<Share>,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> MemoryRegion {
        let Share { served, note, .. } = share.unwrap_or_default();
        // Served from now on: the descriptor is not out before this returns.
        let vmm_server = match (served, &self.vmm_server) {
            (Some(r), Some(s)) => {
                s.add(id, r);
                Some(s.clone())
            }
            _ => None,
        };
        let desc = MemDesc {
            owner: self.addr.clone(),
            region_id: id,
            base: ptr as u64,
            len,
            keys,
            gpu,
        };
        // Published before the descriptor can leave this process: a peer's lease request for
        // it finds it.
        self.shared
            .published
            .lock()
            .unwrap()
            .insert(id, desc.to_bytes());
        MemoryRegion {
            inner: Arc::new(RegionInner {
                id,
                ptr,
                len,
                mem,
                engine_id: self.addr.engine_id,
                desc,
                revoked: AtomicBool::new(false),
                tx: self.tx.clone(),
                shared: self.shared.clone(),
                vmm_server,
                nvlink_note: note,
                owner,
            }),
        }
    }

    /// Registers an owned buffer; the region keeps it.
    pub fn register_buffer(&self, buf: Box<[u8]>) -> Result<MemoryRegion> {
        let (ptr, len) = (buf.as_ptr() as usize, buf.len() as u64);
        // SAFETY: the boxed slice's heap memory does not move when the box moves, and the box is
        // owned by the region.
        unsafe { self.register(ptr, len, Some(Box::new(buf))) }
    }

    /// Revokes a region and returns once no peer can write it: later submissions using it fail
    /// here, peers holding a lease on it are told to stop (their later writes fail on their side
    /// with [`Error::Rejected`]), their writes in flight finish, local transfers from it finish,
    /// and the registration is closed. A peer that does not answer within
    /// [`EngineConfig::revoke_timeout`] is presumed dead. The memory stays with its owner.
    ///
    /// # Errors
    /// [`Error::Fabric`] if closing the registration failed; [`Error::Stopped`] if the engine
    /// stopped (which closes everything anyway).
    pub fn unregister(&self, region: &MemoryRegion) -> Result<()> {
        if region.inner.revoked.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        // NVLink writers holding a VMM mapping of it lose their lease and unmap.
        if let Some(s) = &region.inner.vmm_server {
            s.revoke(region.inner.id);
        }
        let (reply, rx) = mpsc::sync_channel(1);
        self.send_req(Request::Unregister {
            id: region.inner.id,
            owner: None,
            reply: Some(reply),
        })?;
        // The worker answers within the revoke timeout plus the longest local transfer.
        let bound = self.config.revoke_timeout + self.config.timeout + Duration::from_secs(1);
        match rx.recv_timeout(bound) {
            Ok(r) => r,
            Err(mpsc::RecvTimeoutError::Timeout) => Err(Error::Timeout(bound)),
            Err(mpsc::RecvTimeoutError::Disconnected) => Err(Error::Stopped),
        }
    }

    fn check_local(&self, region: &MemoryRegion, off: u64, len: u64) -> Result<()> {
        if region.inner.engine_id != self.addr.engine_id {
            return Err(Error::Unregistered(
                "the region belongs to another engine".into(),
            ));
        }
        if region.is_revoked() {
            return Err(Error::Unregistered(format!(
                "region {} was unregistered",
                region.inner.id
            )));
        }
        match off.checked_add(len) {
            Some(end) if end <= region.inner.len => Ok(()),
            _ => Err(Error::OutOfBounds(format!(
                "local range [{off}, {off}+{len}) exceeds the {}-byte region",
                region.inner.len
            ))),
        }
    }

    /// Checks that `peer` can be reached by this engine's domains.
    fn check_peer(&self, peer: &PeerAddr) -> Result<()> {
        let r = peer.domains.len();
        for (d, local) in self.addr.domains.iter().enumerate() {
            let remote = &peer.domains[d % r];
            if remote.provider != local.provider {
                return Err(Error::DomainMismatch(format!(
                    "local domain {d} is {} but the peer's domain {} is {}",
                    local.provider,
                    d % r,
                    remote.provider
                )));
            }
        }
        Ok(())
    }

    /// The worker's id for a peer, adding it on first use.
    fn peer_id(&self, peer: &PeerAddr) -> Result<u32> {
        self.check_peer(peer)?;
        let (id, new) = self.shared.peer_id_new(peer);
        if new {
            self.send_req(Request::AddPeer {
                id,
                addr: peer.clone(),
            })?;
        }
        Ok(id)
    }

    /// The lease index for writes through `dst` (requested from its owner on first use).
    fn lease(&self, peer: u32, dst: &MemDesc) -> Result<u32> {
        let mut leases = self.leases.lock().unwrap();
        if let Some(&l) = leases.get(dst) {
            return Ok(l);
        }
        let l = leases.len() as u32;
        self.send_req(Request::AddLease {
            lease: l,
            peer,
            region: dst.region_id,
            desc: dst.to_bytes(),
        })?;
        leases.insert(dst.clone(), l);
        Ok(l)
    }

    fn rotation(&self) -> usize {
        self.rotation.fetch_add(1, Ordering::Relaxed)
    }

    /// How bytes from `src` reach `dst`.
    pub fn path(&self, src: &MemoryRegion, dst: &MemDesc) -> Path {
        self.route_info(src, dst).path
    }

    /// [`Self::path`], with how NVLink maps the destination and why NVLink was not chosen.
    pub fn route_info(&self, src: &MemoryRegion, dst: &MemDesc) -> Route {
        crate::nvlink::select_path(
            src.inner.mem,
            dst.gpu.as_ref(),
            self.addr.nvlink.as_ref(),
            dst.owner.nvlink.as_ref(),
        )
    }

    /// The planning parameters for a transfer between `src` and `dst`.
    fn params_for(&self, src: &MemoryRegion, dst: &MemDesc) -> &ShardParams {
        self.params_of(self.path(src, dst))
    }

    fn params_of(&self, path: Path) -> &ShardParams {
        match path {
            Path::Fabric => &self.params,
            Path::Staged => &self.staged_params,
            Path::Nvlink => &self.nvlink_params,
        }
    }

    /// Immediates the receiver gets from a write of `len` bytes from `src` to `dst`, and from a
    /// [`Self::scatter`] item of that size (an item is cut as the write would be).
    pub fn imm_count_for(
        &self,
        src: &MemoryRegion,
        dst: &MemDesc,
        len: u64,
        sharding: Option<Sharding>,
    ) -> usize {
        self.params_for(src, dst)
            .imm_count_single(sharding.unwrap_or(self.config.sharding), len)
    }

    /// The worker's id for `dst`'s owner; on the NVLink path also makes sure the worker knows
    /// the destination region.
    fn route(&self, src: &MemoryRegion, dst: &MemDesc) -> Result<(u32, u32)> {
        let peer = self.peer_id(&dst.owner)?;
        let lease = self.lease(peer, dst)?;
        let r = self.route_info(src, dst);
        if let (Path::Nvlink, Some(map)) = (r.path, r.map) {
            self.describe_remote_gpu(peer, dst, map)?;
        }
        Ok((peer, lease))
    }

    /// Stops the worker: transfers in flight fail with [`Error::Stopped`], waits return
    /// [`Error::Stopped`], every libfabric object is closed. Idempotent.
    pub fn stop(&self) {
        if self.stopped.swap(true, Ordering::AcqRel) {
            return;
        }
        if std::process::id() != self.pid {
            // A forked child: the worker is the parent's. Leak rather than join a thread that
            // does not exist here or close the parent's endpoints.
            std::mem::forget(self.worker.lock().map(|mut w| w.take()));
            std::mem::forget(self.callbacks.lock().map(|mut c| c.take()));
            return;
        }
        // Writers' VMM leases end first: they unmap rather than write into a stopped engine.
        if let Some(s) = &self.vmm_server {
            s.shutdown();
        }
        let _ = self.tx.send(Request::Stop);
        if let Some(h) = self.worker.lock().unwrap().take() {
            let _ = h.join();
        }
        self.callbacks.lock().unwrap().take();
    }

    /// Whether [`Self::stop`] was called.
    pub fn is_stopped(&self) -> bool {
        self.stopped.load(Ordering::Acquire)
    }
}

impl Drop for TransferEngine {
    fn drop(&mut self) {
        self.stop();
    }
}
