//! The public engine: configuration, registration, submission, counters, stop.

use std::any::Any;
use std::collections::{HashMap, VecDeque};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::mpsc::{self, Sender};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use crate::callbacks::{CallbackSink, CallbackThread};
use crate::desc::{MemDesc, PeerAddr, MAX_DOMAINS};
use crate::error::{Error, Result};
use crate::imm::ImmCounter;
use crate::lease::NO_LEASE;
use crate::libfabric::{DomainAttrs, DomainSpec};
use crate::nvlink::{NvlinkMap, Route};
use crate::shard::{OpPlan, PagedSpec, ScatterItem, ShardParams, Sharding};
use crate::transfer::{Completion, Transfer, TransferState};
use crate::vmm_share::FdServer;
use crate::worker::{Op, OpKind, Request, TransferReq, Trigger, Worker, WorkerConfig};

/// How to build an engine.
#[derive(Debug, Clone)]
pub struct EngineConfig {
    /// The domains of the group (1..=16; 1-4 NICs per GPU in practice).
    pub domains: Vec<DomainSpec>,
    /// Default spreading of transfers over the domains.
    pub sharding: Sharding,
    /// A single write is split over domains only into shards of at least this many bytes.
    pub min_shard_bytes: u64,
    /// Largest single libfabric operation (defaults to the smallest provider max_msg_size,
    /// capped at 1 GiB).
    pub max_op_bytes: Option<u64>,
    /// Default deadline of a transfer.
    pub timeout: Duration,
    /// Receive buffers posted per domain for messages.
    pub recv_buffers: usize,
    /// Send buffers shared by all domains.
    pub send_buffers: usize,
    /// Largest message for send/recv.
    pub max_message_bytes: usize,
    /// Pin the worker thread to this CPU.
    pub worker_cpu: Option<usize>,
    /// How long an idle worker keeps spinning before it starts to sleep.
    pub spin: Duration,
    /// Longest sleep of an idle worker between polls of its completion queues.
    pub max_sleep: Duration,
    /// CUDA device whose memory this engine moves (GPU registration and staging); None for a
    /// host-only engine.
    pub cuda_device: Option<usize>,
    /// With `cuda_device`: accept and make NVLink (CUDA IPC) writes between processes of this
    /// host. Off, GPU memory always moves through staging over the fabric.
    pub nvlink: bool,
    /// What a transfer's success means unless the call says otherwise.
    pub completion: Completion,
    /// How long unregistering a region waits for the peers holding a lease on it to stop
    /// writing (a peer that does not answer by then is presumed dead and the region is closed).
    pub revoke_timeout: Duration,
}

impl EngineConfig {
    /// `n` domains of `provider` on its default interface, with default settings.
    pub fn new(provider: &str, n: usize) -> Self {
        EngineConfig {
            domains: (0..n).map(|_| DomainSpec::new(provider)).collect(),
            sharding: Sharding::RoundRobin,
            min_shard_bytes: 1 << 20,
            max_op_bytes: None,
            timeout: Duration::from_secs(30),
            recv_buffers: 64,
            send_buffers: 64,
            max_message_bytes: 64 << 10,
            worker_cpu: None,
            spin: Duration::from_millis(20),
            max_sleep: Duration::from_micros(500),
            cuda_device: None,
            nvlink: true,
            completion: Completion::Delivered,
            revoke_timeout: Duration::from_secs(5),
        }
    }
}

impl EngineConfig {
    /// Like [`EngineConfig::new`], but socket providers (tcp, net, udp) bind to 127.0.0.1, so
    /// every byte stays on the loopback interface (tests, benchmarks, the demo).
    pub fn loopback(provider: &str, n: usize) -> Self {
        let mut cfg = EngineConfig::new(provider, n);
        if is_socket_provider(provider) {
            for d in &mut cfg.domains {
                d.node = Some("127.0.0.1".into());
            }
        }
        cfg
    }
}

/// Whether `provider` runs over IP sockets (and so takes a source address).
pub fn is_socket_provider(provider: &str) -> bool {
    let p = provider.split(';').next().unwrap_or("");
    matches!(p, "tcp" | "net" | "udp" | "sockets")
}

/// Per-domain counters.
#[derive(Debug, Default)]
pub struct DomainStats {
    pub bytes_written: AtomicU64,
    pub write_ops: AtomicU64,
    pub messages_sent: AtomicU64,
    pub bytes_sent: AtomicU64,
    pub messages_received: AtomicU64,
    pub imms_received: AtomicU64,
    pub errors: AtomicU64,
    /// Writes this engine refused as their target (stale, revoked or forged descriptors,
    /// staged chunks outside their region).
    pub rejected: AtomicU64,
}

/// A snapshot of [`DomainStats`].
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct StatsSnapshot {
    pub bytes_written: u64,
    pub write_ops: u64,
    pub messages_sent: u64,
    pub bytes_sent: u64,
    pub messages_received: u64,
    pub imms_received: u64,
    pub errors: u64,
    pub rejected: u64,
}

impl DomainStats {
    fn snapshot(&self) -> StatsSnapshot {
        let l = |a: &AtomicU64| a.load(Ordering::Relaxed);
        StatsSnapshot {
            bytes_written: l(&self.bytes_written),
            write_ops: l(&self.write_ops),
            messages_sent: l(&self.messages_sent),
            bytes_sent: l(&self.bytes_sent),
            messages_received: l(&self.messages_received),
            imms_received: l(&self.imms_received),
            errors: l(&self.errors),
            rejected: l(&self.rejected),
        }
    }
}

/// Received messages, waiting for `recv` or handed to a callback.
pub(crate) struct MessageQueue {
    q: Mutex<(VecDeque<Vec<u8>>, bool)>,
    cv: Condvar,
    callback: Mutex<Option<MessageCallback>>,
    sink: CallbackSink,
}

/// What `on_message` installs: called with each received message.
type MessageCallback = Arc<dyn Fn(Vec<u8>) + Send + Sync>;

impl MessageQueue {
    pub(crate) fn push(&self, msg: Vec<u8>) {
        if let Some(cb) = self.callback.lock().unwrap().clone() {
            self.sink.submit(Box::new(move || cb(msg)));
            return;
        }
        self.q.lock().unwrap().0.push_back(msg);
        self.cv.notify_one();
    }

    pub(crate) fn stop(&self) {
        self.q.lock().unwrap().1 = true;
        self.cv.notify_all();
    }

    fn pop(&self, timeout: Duration) -> Result<Vec<u8>> {
        let deadline = Instant::now() + timeout;
        let mut g = self.q.lock().unwrap();
        loop {
            if let Some(m) = g.0.pop_front() {
                return Ok(m);
            }
            if g.1 {
                return Err(Error::Stopped);
            }
            let now = Instant::now();
            if now >= deadline {
                return Err(Error::Timeout(timeout));
            }
            g = self.cv.wait_timeout(g, deadline - now).unwrap().0;
        }
    }
}

/// State shared by the engine handle and its worker.
pub(crate) struct Shared {
    pub imm: ImmCounter,
    pub messages: MessageQueue,
    pub stats: Vec<DomainStats>,
    /// Counters of the NVLink path.
    pub nvlink: DomainStats,
    pub next_key: AtomicU64,
    pub engine_id: u64,
    /// This engine's address as bytes (sent with lease requests, so owners can answer).
    pub addr_bytes: std::sync::OnceLock<Vec<u8>>,
    /// The descriptor bytes of every live region, by id: a lease request is granted only for
    /// an exact match. Filled before `register` returns, emptied when unregistering starts.
    pub published: Mutex<HashMap<u64, Vec<u8>>>,
    /// Worker ids of peers (the engine adds the peers it writes to, the worker those that ask
    /// it for leases).
    pub peers: Mutex<PeerTable>,
    /// Wakes a sleeping worker when a request is queued.
    pub waker: Waker,
}

/// Worker ids of peers, by address and by engine id.
#[derive(Default)]
pub(crate) struct PeerTable {
    by_addr: HashMap<PeerAddr, u32>,
    by_engine: HashMap<u64, u32>,
}

impl Shared {
    /// The id of `peer`, allocated on first sight (the caller tells the worker).
    pub(crate) fn peer_id(&self, peer: &PeerAddr) -> u32 {
        self.peer_id_new(peer).0
    }

    /// [`Self::peer_id`], and whether the id is new.
    fn peer_id_new(&self, peer: &PeerAddr) -> (u32, bool) {
        let mut t = self.peers.lock().unwrap();
        if let Some(&id) = t.by_addr.get(peer) {
            return (id, false);
        }
        let id = t.by_addr.len() as u32;
        t.by_addr.insert(peer.clone(), id);
        t.by_engine.insert(peer.engine_id, id);
        (id, true)
    }

    /// The id of the peer with engine id `engine`, if known.
    pub(crate) fn peer_of_engine(&self, engine: u64) -> Option<u32> {
        self.peers.lock().unwrap().by_engine.get(&engine).copied()
    }
}

/// An eventfd the engine rings after queueing a request while the worker sleeps.
pub(crate) struct Waker {
    pub fd: std::os::fd::RawFd,
    pub sleeping: AtomicBool,
}

impl Waker {
    fn new() -> Result<Self> {
        // SAFETY: eventfd takes no pointers; the descriptor is owned by the Waker.
        let fd = unsafe { libc::eventfd(0, libc::EFD_NONBLOCK | libc::EFD_CLOEXEC) };
        if fd < 0 {
            return Err(Error::Config(format!(
                "eventfd: {}",
                std::io::Error::last_os_error()
            )));
        }
        Ok(Waker {
            fd,
            sleeping: AtomicBool::new(false),
        })
    }

    /// Wakes the worker if it sleeps.
    fn ring(&self) {
        if self.sleeping.load(Ordering::SeqCst) {
            let one: u64 = 1;
            // SAFETY: writes 8 bytes from a live u64 to the owned eventfd.
            unsafe { libc::write(self.fd, (&one as *const u64).cast(), 8) };
        }
    }

    /// Resets the doorbell after a wake-up.
    pub(crate) fn drain(&self) {
        let mut v: u64 = 0;
        // SAFETY: reads at most 8 bytes into a live u64 from the owned, non-blocking eventfd.
        unsafe { libc::read(self.fd, (&mut v as *mut u64).cast(), 8) };
    }
}

impl Drop for Waker {
    fn drop(&mut self) {
        // SAFETY: the descriptor is owned and closed once.
        unsafe { libc::close(self.fd) };
    }
}

/// A validated, planned transfer that has not been submitted yet (see the `prepare_*` methods).
/// Submit it with [`TransferEngine::submit`], or hand it to a watcher that submits it when a
/// progress counter reaches its step.
pub struct Prepared {
    ops: Vec<Op>,
    keep: Vec<Arc<RegionInner>>,
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

/// A registered local region. Cloning shares it; it is unregistered when the last clone (and
/// every transfer using it) is gone, or explicitly with [`TransferEngine::unregister`].
#[derive(Clone)]
pub struct MemoryRegion {
    pub(crate) inner: Arc<RegionInner>,
}

pub(crate) struct RegionInner {
    id: u64,
    ptr: usize,
    len: u64,
    /// Where the bytes live: host memory, or GPU memory (staged over the fabric).
    mem: RegionMem,
    engine_id: u64,
    desc: MemDesc,
    revoked: AtomicBool,
    tx: Sender<Request>,
    shared: Arc<Shared>,
    /// The engine's VMM socket, when this region is served on it (revoked on drop).
    vmm_server: Option<Arc<FdServer>>,
    /// Why peers cannot write this GPU region over NVLink, if they cannot.
    nvlink_note: Option<String>,
    /// The memory's owner: handed to the worker on drop, which releases it only once the
    /// registration is closed and no peer or local op can touch the memory.
    owner: Option<Box<dyn Any + Send + Sync>>,
}

/// How a transfer's bytes travel.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Path {
    /// RMA writes between registered host memory.
    Fabric,
    /// Through pinned staging buffers (GPU memory over providers without GPU support).
    Staged,
    /// CUDA IPC copies between GPUs of one host, immediates through the peer's mailbox.
    Nvlink,
}

/// What kind of memory a local region is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RegionMem {
    /// Host memory registered with every domain.
    Host,
    /// GPU memory (device ordinal); moved through staging buffers over the fabric.
    Gpu(u32),
    /// GPU memory registered with every domain (providers with FI_HMEM): plain RMA.
    GpuDirect(u32),
    /// Host memory that peers write through the staging protocol, as they would GPU memory.
    /// A test hook: it lets the protocol run on machines without a GPU.
    StagedHost,
}

/// `GpuDesc::device` value that marks a staged host region.
const STAGED_HOST_DEVICE: u32 = u32::MAX;

impl Drop for RegionInner {
    fn drop(&mut self) {
        if let Some(s) = &self.vmm_server {
            s.revoke(self.id);
        }
        // If the worker is gone (engine stopped), everything is closed: the owner drops here.
        let _ = self.tx.send(Request::Unregister {
            id: self.id,
            owner: self.owner.take(),
            reply: None,
        });
        self.shared.waker.ring();
    }
}

impl MemoryRegion {
    /// What a peer needs to write here.
    pub fn descriptor(&self) -> &MemDesc {
        &self.inner.desc
    }
    /// Address of the first byte.
    pub fn ptr(&self) -> usize {
        self.inner.ptr
    }
    /// Length in bytes.
    pub fn len(&self) -> u64 {
        self.inner.len
    }
    /// Whether the region is empty.
    pub fn is_empty(&self) -> bool {
        self.inner.len == 0
    }
    /// Whether [`TransferEngine::unregister`] was called.
    pub fn memory(&self) -> RegionMem {
        self.inner.mem
    }
    /// For GPU memory that peers cannot write over NVLink: why (e.g. VMM memory whose
    /// allocation was not created exportable as a file descriptor). None otherwise.
    pub fn nvlink_note(&self) -> Option<&str> {
        self.inner.nvlink_note.as_deref()
    }
    /// Whether [`TransferEngine::unregister`] was called.
    pub fn is_revoked(&self) -> bool {
        self.inner.revoked.load(Ordering::Acquire)
    }
}

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

/// What `register_gpu` learned about sharing a region as VMM memory.
#[derive(Default)]
struct Share {
    /// The descriptor's part.
    desc: Option<crate::desc::VmmShare>,
    /// What the socket serves.
    served: Option<crate::vmm_share::SharedRegion>,
    /// Why the region cannot be written over NVLink, if it cannot.
    note: Option<String>,
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

    /// Registers GPU memory (a device pointer of the engine's `cuda_device`, or any device with
    /// unified addressing). Over providers that cannot touch GPU memory it is moved through
    /// pinned staging buffers; peers learn of a write only after it sits in GPU memory.
    ///
    /// # Safety
    /// As for [`Self::register`], for device memory.
    pub unsafe fn register_gpu(
        &self,
        ptr: u64,
        len: u64,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let Some(dev) = self.config.cuda_device else {
            return Err(Error::Config(
                "GPU memory needs an engine opened with cuda_device".into(),
            ));
        };
        let ctx = stolon_cuda::Device::get(dev)
            .and_then(|d| d.primary_context())
            .map_err(crate::staging::cuda_err)?;
        let info = stolon_cuda::pointer_info(&ctx, ptr).map_err(crate::staging::cuda_err)?;
        if info.memory_type != stolon_cuda::MemoryType::Device {
            return Err(Error::InvalidArgument(format!(
                "{ptr:#x} is not device memory ({:?})",
                info.memory_type
            )));
        }
        if ptr
            .checked_add(len)
            .map_or(true, |end| end > info.range_start + info.range_size as u64)
        {
            return Err(Error::OutOfBounds(format!(
                "{len} bytes at {ptr:#x} run past the allocation [{:#x}, +{})",
                info.range_start, info.range_size
            )));
        }
        let device = info.device.unwrap_or(dev) as u32;
        // CUDA IPC (NVLink between processes) where the allocation allows it.
        let (ipc_handle, ipc_offset) = match stolon_cuda::IpcMemHandle::export(&ctx, ptr) {
            Ok(x) => (x.handle.as_bytes().to_vec(), x.offset as u64),
            Err(_) => (Vec::new(), 0),
        };
        // Otherwise VMM memory exported as file descriptors over the engine's socket.
        let mut share = Share::default();
        if ipc_handle.is_empty() {
            match self.plan_vmm_share(&ctx, &info, ptr, len) {
                Ok((desc, served)) => {
                    share.desc = Some(desc);
                    share.served = Some(served);
                }
                Err(why) => share.note = Some(why),
            }
        }
        if self.attrs.iter().all(|a| a.hmem) {
            // Every provider of the group registers GPU memory itself: no staging.
            let id = self.next_region.fetch_add(1, Ordering::Relaxed);
            let len_ = len as usize;
            let registered = self.ask_worker(|reply| Request::RegisterHmem {
                id,
                ptr,
                len: len_,
                device: device as usize,
                reply,
            })?;
            // A provider may grant FI_HMEM and still refuse CUDA memory (libfabric built without
            // CUDA, seen with shm on 1.17): then the region takes the staging path.
            if let Ok(keys) = registered {
                let gpu = crate::desc::GpuDesc {
                    device,
                    ipc_handle,
                    ipc_offset,
                    direct: true,
                    vmm: share.desc.clone(),
                };
                let mem = RegionMem::GpuDirect(device);
                return Ok(self.new_region(
                    id,
                    ptr as usize,
                    len,
                    keys,
                    mem,
                    Some(gpu),
                    Some(share),
                    owner,
                ));
            }
        }
        let gpu = crate::desc::GpuDesc {
            device,
            ipc_handle,
            ipc_offset,
            direct: false,
            vmm: share.desc.clone(),
        };
        // SAFETY: forwarded contract.
        unsafe {
            self.register_staged(
                crate::staging::Mem::Gpu(ptr),
                len,
                RegionMem::Gpu(device),
                gpu,
                Some(share),
                owner,
            )
        }
    }

    /// Registers host memory that peers write through the staging protocol, exactly as they
    /// would write GPU memory (a test hook for machines without a GPU).
    ///
    /// # Safety
    /// As for [`Self::register`].
    pub unsafe fn register_staged_host(
        &self,
        ptr: usize,
        len: u64,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let gpu = crate::desc::GpuDesc {
            device: STAGED_HOST_DEVICE,
            ipc_handle: Vec::new(),
            ipc_offset: 0,
            direct: false,
            vmm: None,
        };
        // SAFETY: forwarded contract.
        unsafe {
            self.register_staged(
                crate::staging::Mem::Host(ptr),
                len,
                RegionMem::StagedHost,
                gpu,
                None,
                owner,
            )
        }
    }

    /// # Safety
    /// As for [`Self::register`].
    unsafe fn register_staged(
        &self,
        base: crate::staging::Mem,
        len: u64,
        mem: RegionMem,
        gpu: crate::desc::GpuDesc,
        share: Option<Share>,
        owner: Option<Box<dyn Any + Send + Sync>>,
    ) -> Result<MemoryRegion> {
        let ptr = match base {
            crate::staging::Mem::Host(p) => p,
            crate::staging::Mem::Gpu(p) => p as usize,
        };
        if ptr == 0 && len > 0 {
            return Err(Error::InvalidArgument("null pointer".into()));
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let len_ = len as usize;
        self.ask_worker(|reply| Request::RegisterStaged {
            id,
            base,
            len: len_,
            reply,
        })??;
        let keys = vec![0; self.addr.domains.len()];
        Ok(self.new_region(id, ptr, len, keys, mem, Some(gpu), share, owner))
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

    /// The ops of planned writes to `dsts`, reached through `routes` (peer, lease) each.
    fn write_ops(
        &self,
        plans: &[OpPlan],
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        routes: &[(u32, u32)],
        imm: Option<u32>,
    ) -> Vec<Op> {
        let delivered = self.config.completion == Completion::Delivered;
        use crate::staging::Mem;
        // The path depends only on the destination: chosen once per destination, not per op.
        let paths: Vec<Path> = dsts.iter().map(|d| self.path(src, d)).collect();
        plans
            .iter()
            .map(|p| {
                let dst = dsts[p.dst];
                let rd = p.domain % dst.owner.domains.len();
                let at = src.inner.ptr + p.src_off as usize;
                let src_mem = match src.inner.mem {
                    RegionMem::Gpu(_) | RegionMem::GpuDirect(_) => Mem::Gpu(at as u64),
                    RegionMem::Host | RegionMem::StagedHost => Mem::Host(at),
                };
                let path = paths[p.dst];
                let kind = if path == Path::Nvlink {
                    OpKind::NvlinkCopy {
                        src: at as u64,
                        len: p.len as usize,
                        region: dst.region_id,
                        offset: p.dst_off,
                        imm,
                    }
                } else if path == Path::Staged && dst.gpu.as_ref().is_some_and(|g| !g.direct) {
                    OpKind::StagedSend {
                        src: src_mem,
                        len: p.len as usize,
                        region: dst.region_id,
                        offset: p.dst_off,
                        imm,
                    }
                } else if path == Path::Staged {
                    OpKind::StagedWrite {
                        src: src_mem,
                        len: p.len as usize,
                        raddr: dst.remote_addr(rd, p.dst_off),
                        rkey: dst.keys[rd],
                        imm,
                    }
                } else {
                    OpKind::Write {
                        region: src.inner.id,
                        src: at,
                        len: p.len as usize,
                        raddr: dst.remote_addr(rd, p.dst_off),
                        rkey: dst.keys[rd],
                        imm,
                    }
                };
                Op {
                    domain: p.domain,
                    peer: routes[p.dst].0,
                    kind,
                    lease: routes[p.dst].1,
                    delivered,
                }
            })
            .collect()
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

    /// Describes a peer's GPU region to the worker (once) so NVLink copies can map it. VMM
    /// memory is fetched from the owner's socket and mapped here, on the caller's thread, so
    /// the worker never waits on a peer; a dead or silent owner is this write's error.
    fn describe_remote_gpu(&self, peer: u32, dst: &MemDesc, map: NvlinkMap) -> Result<()> {
        let mut seen = self.remote_gpu.lock().unwrap();
        if seen.contains(&(peer, dst.region_id)) {
            return Ok(());
        }
        let g = dst.gpu.as_ref().expect("NVLink path has a GPU descriptor");
        let target = match map {
            NvlinkMap::Ipc => crate::worker::RemoteTarget::Ipc {
                handle: g.ipc_handle.clone(),
                offset: g.ipc_offset,
            },
            NvlinkMap::Vmm => self.map_remote_vmm(dst)?,
        };
        self.send_req(Request::AddRemoteGpu {
            peer,
            region: dst.region_id,
            target,
            len: dst.len,
        })?;
        seen.insert((peer, dst.region_id));
        Ok(())
    }

    /// Fetches a peer's VMM region over its socket and maps it into this engine's device.
    fn map_remote_vmm(&self, dst: &MemDesc) -> Result<crate::worker::RemoteTarget> {
        let share = dst
            .gpu
            .as_ref()
            .and_then(|g| g.vmm.as_ref())
            .expect("VMM route has a VMM share");
        let socket = &dst
            .owner
            .nvlink
            .as_ref()
            .expect("NVLink route has the owner's address")
            .vmm_socket;
        let dev = self
            .config
            .cuda_device
            .ok_or_else(|| Error::Cuda("NVLink needs an engine with cuda_device".into()))?;
        let ctx = stolon_cuda::Device::get(dev)
            .and_then(|d| d.primary_context())
            .map_err(crate::staging::cuda_err)?;
        let span = usize::try_from(share.span)
            .map_err(|_| Error::InvalidArgument(format!("VMM span {}", share.span)))?;
        let mut import = None;
        let lease = crate::vmm_share::fetch(
            socket,
            dst.region_id,
            share.token,
            self.config.timeout,
            |i, size, fd| {
                if i == 0 {
                    import = Some(
                        stolon_cuda::VmmImport::reserve(&ctx, span)
                            .map_err(crate::staging::cuda_err)?,
                    );
                }
                let size = usize::try_from(size)
                    .map_err(|_| Error::InvalidArgument(format!("VMM allocation of {size}")))?;
                import
                    .as_mut()
                    .expect("reserved at the first allocation")
                    .map_next(std::os::fd::AsFd::as_fd(&fd), size)
                    .map_err(crate::staging::cuda_err)
            },
        )?;
        let l = &lease.layout;
        if l.sizes.len() as u64 != share.chunks
            || l.offset != share.offset
            || l.span() != share.span
        {
            return Err(Error::TransferFailed(format!(
                "the owner's VMM region {} has {} allocations at offset {} over {} bytes; its \
                 descriptor says {} at {} over {}",
                dst.region_id,
                l.sizes.len(),
                l.offset,
                l.span(),
                share.chunks,
                share.offset,
                share.span
            )));
        }
        let mapping = import
            .expect("at least one allocation")
            .finish()
            .map_err(crate::staging::cuda_err)?;
        Ok(crate::worker::RemoteTarget::Vmm {
            mapping: Some(mapping),
            lease,
            offset: share.offset,
        })
    }

    /// Decides whether a GPU region is shared as VMM memory over the engine's socket: the
    /// descriptor's part and what the server needs, or why not.
    fn plan_vmm_share(
        &self,
        ctx: &Arc<stolon_cuda::Context>,
        info: &stolon_cuda::PointerInfo,
        ptr: u64,
        len: u64,
    ) -> std::result::Result<(crate::desc::VmmShare, crate::vmm_share::SharedRegion), String> {
        if !info.is_vmm {
            return Err("the memory has no CUDA IPC handle and is not VMM memory".into());
        }
        if self.vmm_server.is_none() {
            return Err(
                "this engine serves no VMM socket (NVLink off, or the socket could \
                        not be bound)"
                    .into(),
            );
        }
        if len == 0 {
            return Err("an empty region is not shared".into());
        }
        let (chunks, offset) = stolon_cuda::vmm::layout(ctx, ptr, len as usize)
            .map_err(|e| format!("cannot walk its VMM mappings: {e}"))?;
        if let Some(c) = chunks.iter().find(|c| !c.exportable_as_fd()) {
            return Err(format!(
                "the VMM allocation mapped at {:#x} was not created with \
                 CU_MEM_HANDLE_TYPE_POSIX_FILE_DESCRIPTOR (requested handle types {:#x}), so it \
                 cannot be exported",
                c.base, c.handle_types
            ));
        }
        if chunks.len() as u64 > crate::desc::MAX_VMM_CHUNKS {
            return Err(format!(
                "{} VMM allocations is too many to share",
                chunks.len()
            ));
        }
        // One real export now, so a driver that refuses is found here, not by the writer.
        stolon_cuda::export_fd(ctx, chunks[0].base)
            .map_err(|e| format!("exporting its VMM allocation failed: {e}"))?;
        let sizes: Vec<u64> = chunks.iter().map(|c| c.size as u64).collect();
        let bases: Vec<u64> = chunks.iter().map(|c| c.base).collect();
        let token = crate::vmm_share::random_token();
        let desc = crate::desc::VmmShare {
            token,
            chunks: sizes.len() as u64,
            offset: offset as u64,
            span: sizes.iter().sum(),
        };
        let ctx = ctx.clone();
        let served = crate::vmm_share::SharedRegion {
            token,
            layout: crate::vmm_share::Layout {
                sizes,
                offset: offset as u64,
            },
            exporter: Box::new(move |i| {
                stolon_cuda::export_fd(&ctx, bases[i]).map_err(crate::staging::cuda_err)
            }),
        };
        Ok((desc, served))
    }

    fn prepared(
        &self,
        ops: Vec<Op>,
        keep: Vec<Arc<RegionInner>>,
        payload: Option<Vec<u8>>,
        imm_counts: Vec<usize>,
        timeout: Option<Duration>,
    ) -> Prepared {
        Prepared {
            ops,
            keep,
            payload,
            imm_counts,
            timeout: timeout.unwrap_or(self.config.timeout),
            engine_id: self.addr.engine_id,
        }
    }

    fn check_prepared(&self, p: &Prepared) -> Result<()> {
        if p.engine_id != self.addr.engine_id {
            return Err(Error::InvalidArgument(
                "the prepared transfer belongs to another engine".into(),
            ));
        }
        Ok(())
    }

    /// Turns a prepared transfer into a request and the caller's handle.
    fn to_request(&self, p: Prepared) -> (TransferReq, Transfer) {
        let state = TransferState::new(self.sink.clone());
        let t = Transfer {
            state: state.clone(),
            imm_counts: p.imm_counts.into(),
        };
        let req = TransferReq {
            ops: p.ops,
            state,
            deadline: Instant::now() + p.timeout,
            timeout: p.timeout,
            keep: p.keep,
            payload: p.payload,
        };
        (req, t)
    }

    /// Submits a transfer made by one of the `prepare_*` methods.
    pub fn submit(&self, p: Prepared) -> Result<Transfer> {
        self.check_prepared(&p)?;
        let (req, t) = self.to_request(p);
        self.send_req(Request::Transfer(Box::new(req)))?;
        Ok(t)
    }

    /// Writes `len` bytes from `src[src_off..]` into the remote region at `dst_off`, with an
    /// optional immediate; large writes are sharded over the group's domains.
    #[allow(clippy::too_many_arguments)]
    pub fn write(
        &self,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_write(src, src_off, dst, dst_off, len, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::write`] without submitting it.
    #[allow(clippy::too_many_arguments)]
    pub fn prepare_write(
        &self,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        self.check_local(src, src_off, len)?;
        dst.check_range(dst_off, len)?;
        let route = self.route(src, dst)?;
        let sharding = sharding.unwrap_or(self.config.sharding);
        let plans = self.params_for(src, dst).plan_single(
            sharding,
            self.rotation(),
            src_off,
            dst_off,
            len,
        )?;
        let counts = vec![if imm.is_some() { plans.len() } else { 0 }];
        let ops = self.write_ops(&plans, src, &[dst], &[route], imm);
        Ok(self.prepared(ops, vec![src.inner.clone()], None, counts, timeout))
    }

    /// Immediates a receiver gets from [`Self::write`] of `len` bytes with an immediate;
    /// `staged` when the source or the destination is GPU memory moved through staging.
    pub fn imm_count_write(&self, len: u64, sharding: Option<Sharding>, staged: bool) -> usize {
        let p = if staged {
            &self.staged_params
        } else {
            &self.params
        };
        p.imm_count_single(sharding.unwrap_or(self.config.sharding), len)
    }

    /// Sends only an immediate to `peer` (a zero-byte write into its scratch region).
    pub fn write_imm(
        &self,
        peer: &PeerAddr,
        imm: u32,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_write_imm(peer, imm, timeout)?)
    }

    /// Validates and plans a [`Self::write_imm`] without submitting it.
    pub fn prepare_write_imm(
        &self,
        peer: &PeerAddr,
        imm: u32,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let id = self.peer_id(peer)?;
        let d = self.rotation() % self.addr.domains.len();
        let rd = d % peer.domains.len();
        let op = Op {
            domain: d,
            peer: id,
            kind: OpKind::Write {
                region: crate::worker::INTERNAL_REGION,
                src: 0,
                len: 0,
                raddr: peer.domains[rd].scratch_addr,
                rkey: peer.domains[rd].scratch_key,
                imm: Some(imm),
            },
            // The scratch region lives as long as the peer's worker: no lease.
            lease: NO_LEASE,
            delivered: self.config.completion == Completion::Delivered,
        };
        Ok(self.prepared(vec![op], Vec::new(), None, vec![1], timeout))
    }

    /// Writes pages `spec.src_pages[i]` of `src` to pages `spec.dst_pages[i]` of `dst`.
    pub fn write_paged(
        &self,
        src: &MemoryRegion,
        dst: &MemDesc,
        spec: &PagedSpec,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_paged(src, dst, spec, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::write_paged`] without submitting it.
    pub fn prepare_paged(
        &self,
        src: &MemoryRegion,
        dst: &MemDesc,
        spec: &PagedSpec,
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let (src_end, dst_end) = spec.extents()?;
        if !spec.src_pages.is_empty() {
            self.check_local(src, 0, src_end)?;
            dst.check_range(0, dst_end)?;
        } else {
            self.check_local(src, 0, 0)?;
        }
        let route = self.route(src, dst)?;
        let sharding = sharding.unwrap_or(self.config.sharding);
        let plans = self
            .params_for(src, dst)
            .plan_paged(sharding, self.rotation(), spec)?;
        let counts = vec![if imm.is_some() { plans.len() } else { 0 }];
        let ops = self.write_ops(&plans, src, &[dst], &[route], imm);
        Ok(self.prepared(ops, vec![src.inner.clone()], None, counts, timeout))
    }

    /// Immediates a receiver gets from a paged write of `pages` pages of `page_bytes`.
    pub fn imm_count_paged(&self, pages: usize, page_bytes: u64, staged: bool) -> usize {
        let p = if staged {
            &self.staged_params
        } else {
            &self.params
        };
        p.imm_count_paged(pages, page_bytes)
    }

    /// Writes one source region to many destinations; destination `i` of `dsts` is reached
    /// through domain `i % n` (RoundRobin) so peers spread over the NICs.
    pub fn scatter(
        &self,
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        items: &[ScatterItem],
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        self.submit(self.prepare_scatter(src, dsts, items, imm, sharding, timeout)?)
    }

    /// Validates and plans a [`Self::scatter`] without submitting it.
    pub fn prepare_scatter(
        &self,
        src: &MemoryRegion,
        dsts: &[&MemDesc],
        items: &[ScatterItem],
        imm: Option<u32>,
        sharding: Option<Sharding>,
        timeout: Option<Duration>,
    ) -> Result<Prepared> {
        let mut routes = Vec::with_capacity(dsts.len());
        for d in dsts {
            routes.push(self.route(src, d)?);
        }
        for it in items {
            let dst = dsts.get(it.dst).ok_or_else(|| {
                Error::InvalidArgument(format!("destination {} of {}", it.dst, dsts.len()))
            })?;
            self.check_local(src, it.src_off, it.len)?;
            dst.check_range(it.dst_off, it.len)?;
        }
        let sharding = sharding.unwrap_or(self.config.sharding);
        // Each item is cut as a single write to its destination would be, by that
        // destination's path: one copy over NVLink, staging-buffer chunks when staged, the
        // fabric's op size otherwise ([`Self::imm_count_for`] counts an item the same way).
        let params: Vec<&ShardParams> = dsts.iter().map(|d| self.params_for(src, d)).collect();
        let rotation = self.rotation();
        let mut plans = Vec::with_capacity(items.len());
        for (k, it) in items.iter().enumerate() {
            // Item k starts on domain (rotation + k), as in ShardParams::plan_scatter.
            plans.extend(params[it.dst].plan_scatter(sharding, rotation + k, &[*it])?);
        }
        let mut counts = vec![0usize; dsts.len()];
        if imm.is_some() {
            for p in &plans {
                counts[p.dst] += 1;
            }
        }
        let ops = self.write_ops(&plans, src, dsts, &routes, imm);
        Ok(self.prepared(ops, vec![src.inner.clone()], None, counts, timeout))
    }

    /// Sends a message to `peer`'s receive pool.
    pub fn send(
        &self,
        peer: &PeerAddr,
        data: &[u8],
        timeout: Option<Duration>,
    ) -> Result<Transfer> {
        let max = self.config.max_message_bytes.min(peer.max_message as usize);
        if data.len() > max {
            return Err(Error::MessageTooLarge {
                len: data.len(),
                max,
            });
        }
        let id = self.peer_id(peer)?;
        let d = self.rotation() % self.addr.domains.len();
        let op = Op {
            domain: d,
            peer: id,
            kind: OpKind::Send,
            lease: NO_LEASE,
            delivered: false,
        };
        self.submit(self.prepared(vec![op], Vec::new(), Some(data.to_vec()), vec![0], timeout))
    }

    /// Takes the next received message, waiting up to `timeout`.
    pub fn recv(&self, timeout: Duration) -> Result<Vec<u8>> {
        self.check_process()?;
        self.shared.messages.pop(timeout)
    }

    /// Delivers received messages to `cb` (on the callback thread) instead of `recv`.
    pub fn on_message(&self, cb: Option<MessageCallback>) {
        *self.shared.messages.callback.lock().unwrap() = cb;
    }

    /// Waits until every other engine in `peers` has reached the barrier with the same `imm`.
    ///
    /// Each member sends one immediate to every other member and waits for one from each. The
    /// immediate value must not be used for anything else while the barrier runs.
    pub fn barrier(&self, peers: &[PeerAddr], imm: u32, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        let others: Vec<&PeerAddr> = peers
            .iter()
            .filter(|p| p.engine_id != self.addr.engine_id)
            .collect();
        let mut sent = Vec::with_capacity(others.len());
        for p in &others {
            sent.push(self.write_imm(p, imm, Some(timeout))?);
        }
        for t in sent {
            t.wait(deadline.saturating_duration_since(Instant::now()))?;
        }
        self.shared.imm.wait(
            imm,
            others.len() as u64,
            deadline.saturating_duration_since(Instant::now()),
        )
    }

    /// Arms a trigger: each of the next `times` arrivals of `imm` makes the worker itself post a
    /// write of `len` bytes from `src[src_off..]` to `dst` at `dst_off` carrying `reply_imm`,
    /// without involving any other thread. Triggered arrivals are not counted by the counter.
    /// Returns once the trigger is armed: arrivals from then on fire it.
    #[allow(clippy::too_many_arguments)]
    pub fn trigger_write(
        &self,
        imm: u32,
        times: u64,
        src: &MemoryRegion,
        src_off: u64,
        dst: &MemDesc,
        dst_off: u64,
        len: u64,
        reply_imm: Option<u32>,
    ) -> Result<()> {
        if times == 0 {
            return Ok(());
        }
        self.check_local(src, src_off, len)?;
        dst.check_range(dst_off, len)?;
        let route = self.route(src, dst)?;
        let plans = self
            .params
            .plan_single(Sharding::Pinned(0), 0, src_off, dst_off, len)?;
        let ops = self.write_ops(&plans, src, &[dst], &[route], reply_imm);
        let trigger = Trigger {
            imm,
            times,
            ops,
            _keep: vec![src.inner.clone()],
        };
        self.ask_worker(|reply| Request::Trigger(Box::new(trigger), reply))
    }

    /// Watches a 64-bit counter that other code (a GPU kernel, a stream memory operation, another
    /// thread) increments. The worker reads it on every loop; when it changes from `old` to
    /// `new`, `callback(old, new)` runs on the callback thread, and the prepared transfer `i` of
    /// `steps` is submitted by the worker itself as soon as the counter reaches `i + 1`. Returns
    /// the watch id and one [`Transfer`] per step.
    ///
    /// # Safety
    /// `ptr` must point to an 8-byte-aligned u64 that stays valid (and is only written
    /// atomically) until the watch is removed or the engine stops; `owner` is kept alive that
    /// long, which is the usual way to ensure it.
    pub unsafe fn watch(
        &self,
        ptr: usize,
        owner: Option<Box<dyn Any + Send + Sync>>,
        callback: Option<WatchCallback>,
        steps: Vec<Prepared>,
    ) -> Result<(u64, Vec<Transfer>)> {
        if ptr == 0 || ptr % 8 != 0 {
            return Err(Error::InvalidArgument(format!(
                "counter address {ptr:#x} must be non-null and 8-byte aligned"
            )));
        }
        for p in &steps {
            self.check_prepared(p)?;
        }
        let mut reqs = Vec::with_capacity(steps.len());
        let mut handles = Vec::with_capacity(steps.len());
        for p in steps {
            let (req, t) = self.to_request(p);
            reqs.push(req);
            handles.push(t);
        }
        let id = self.next_region.fetch_add(1, Ordering::Relaxed);
        let sink = self.sink.clone();
        let callback = callback.map(|cb| {
            let cb: Arc<dyn Fn(u64, u64) + Send + Sync> = Arc::from(cb);
            Box::new(move |old: u64, new: u64| {
                let cb = cb.clone();
                sink.submit(Box::new(move || cb(old, new)));
            }) as Box<dyn Fn(u64, u64) + Send>
        });
        let watch = crate::worker::Watch::new(id, ptr, owner, callback, reqs);
        self.ask_worker(|reply| Request::Watch(Box::new(watch), reply))?;
        Ok((id, handles))
    }

    /// Removes a watch; steps not yet submitted fail with [`Error::Stopped`].
    pub fn unwatch(&self, id: u64) -> Result<()> {
        self.send_req(Request::Unwatch { id })
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
