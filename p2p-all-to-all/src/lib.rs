//! # p2p-all-to-all: MoE dispatch and combine between GPUs
//!
//! Expert-parallel MoE layers send each token to the ranks holding its top-k experts
//! (dispatch) and bring the weighted expert outputs back (combine). This crate holds the CUDA
//! kernels that do it (`kernels/moe.cu`, compiled by `build.rs` and loaded through the CUDA
//! driver at run time), the layout of the buffers they share, and [`AllToAll`], which owns
//! those buffers on one GPU, maps its peers' buffers over NVLink (CUDA IPC) and launches the
//! four phases on a caller's stream.
//!
//! Each phase is a separate launch so a model can run other work between the halves:
//! `dispatch_send` → `dispatch_recv` → (experts) → `combine_send` → `combine_recv`. Step
//! numbers and token counts live in device memory, so a CUDA graph of all four replays.
//!
//! The pure parts ([`Config`], [`Layout`], the handshake bytes) are tested on any machine;
//! [`AllToAll`] needs a GPU.

use std::time::Duration;

mod gpu;
pub mod kernels;
pub mod proxy;

pub use gpu::{AllToAll, CombineArgs, DispatchArgs, DispatchOutputs, OVERLAP_MIN_TOKENS};

/// Dtype of the combine (expert output and result).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum CombineDtype {
    /// bfloat16
    Bf16,
    /// float16
    F16,
    /// float32
    F32,
}

impl CombineDtype {
    /// Bytes per element.
    pub fn bytes(self) -> usize {
        match self {
            CombineDtype::Bf16 | CombineDtype::F16 => 2,
            CombineDtype::F32 => 4,
        }
    }

    /// Parses `bf16`, `f16`, `f32` (and the torch spellings `bfloat16`, `float16`, `float32`).
    pub fn parse(s: &str) -> Result<Self> {
        match s {
            "bf16" | "bfloat16" => Ok(CombineDtype::Bf16),
            "f16" | "fp16" | "float16" | "half" => Ok(CombineDtype::F16),
            "f32" | "fp32" | "float32" | "float" => Ok(CombineDtype::F32),
            _ => Err(Error::InvalidArgument(format!(
                "combine dtype {s:?} is not supported (bf16, f16 or f32)"
            ))),
        }
    }

    fn suffix(self) -> &'static str {
        match self {
            CombineDtype::Bf16 => "bf16",
            CombineDtype::F16 => "f16",
            CombineDtype::F32 => "f32",
        }
    }
}

/// Largest world the kernels handle (destination sets are 64-bit masks).
pub const MAX_WORLD: usize = 64;
/// Largest number of experts.
pub const MAX_EXPERTS: usize = 1024;
/// Largest top-k.
pub const MAX_TOPK: usize = 16;
/// Most tokens behind one chunk flag of the overlapped dispatch (`kMaxChunkTokens` in
/// kernels/common.cuh).
pub const MAX_CHUNK_TOKENS: usize = 16;

/// Ints between two experts' running counts in the dispatch (one 128-byte line each); keep in
/// sync with `kCountStride` in kernels/common.cuh.
pub const ECOUNT_STRIDE: usize = 32;

/// What one rank's all-to-all is built for. Every rank of a group must use the same values
/// (except `rank`); the handshake checks it.
#[derive(Debug, Clone, PartialEq)]
pub struct Config {
    /// This rank, `0..world`.
    pub rank: usize,
    /// Ranks in the group (expert-parallel size), `1..=64`.
    pub world: usize,
    /// Ranks per node: ranks `[k * ranks_per_node, (k + 1) * ranks_per_node)` share a node and
    /// write each other's memory directly; others are reached through the host proxy.
    pub ranks_per_node: usize,
    /// Experts in the layer, a multiple of `world`, at most 1024.
    pub num_experts: usize,
    /// Experts per token, `1..=16`.
    pub topk: usize,
    /// Most tokens one rank dispatches in one step.
    pub max_tokens: usize,
    /// Elements per token.
    pub hidden: usize,
    /// Bytes per element of the dispatched tokens (1 for fp8, 2 for bf16/fp16, 4 for fp32).
    pub dispatch_elem_bytes: usize,
    /// float32 scales sent with each token (0 for none; fp8 with one scale per 128 elements
    /// sends `hidden / 128`).
    pub scales_per_token: usize,
    /// Dtype of the combine.
    pub combine: CombineDtype,
    /// Rows of the dispatch output (default: the most any routing can need, world x max_tokens
    /// x topk, since a token may repeat an expert in its top-k).
    pub capacity: Option<usize>,
    /// How long a kernel waits for a peer before it records a timeout.
    pub timeout: Duration,
}

impl Config {
    /// A config with bf16 dispatch and combine, no scales, one node and a 10 s timeout.
    pub fn new(
        rank: usize,
        world: usize,
        num_experts: usize,
        topk: usize,
        max_tokens: usize,
        hidden: usize,
    ) -> Config {
        Config {
            rank,
            world,
            ranks_per_node: world,
            num_experts,
            topk,
            max_tokens,
            hidden,
            dispatch_elem_bytes: 2,
            scales_per_token: 0,
            combine: CombineDtype::Bf16,
            capacity: None,
            timeout: Duration::from_secs(10),
        }
    }

    /// Checks every field; the error says which and why.
    pub fn validate(&self) -> Result<()> {
        let bad = |m: String| Err(Error::InvalidArgument(m));
        if self.world == 0 || self.world > MAX_WORLD {
            return bad(format!("world must be 1..={MAX_WORLD}, got {}", self.world));
        }
        if self.rank >= self.world {
            return bad(format!(
                "rank {} is outside a world of {}",
                self.rank, self.world
            ));
        }
        if self.ranks_per_node == 0 || self.world % self.ranks_per_node != 0 {
            return bad(format!(
                "ranks_per_node ({}) must divide the world ({})",
                self.ranks_per_node, self.world
            ));
        }
        if self.num_experts == 0 || self.num_experts > MAX_EXPERTS {
            return bad(format!(
                "num_experts must be 1..={MAX_EXPERTS}, got {}",
                self.num_experts
            ));
        }
        if self.num_experts % self.world != 0 {
            return bad(format!(
                "num_experts ({}) must be a multiple of the world ({}) so every rank holds \
                 the same number of experts",
                self.num_experts, self.world
            ));
        }
        if self.topk == 0 || self.topk > MAX_TOPK {
            return bad(format!("topk must be 1..={MAX_TOPK}, got {}", self.topk));
        }
        if self.max_tokens == 0 || self.max_tokens > (1 << 24) {
            return bad(format!(
                "max_tokens must be 1..=2^24, got {}",
                self.max_tokens
            ));
        }
        if ![1, 2, 4].contains(&self.dispatch_elem_bytes) {
            return bad(format!(
                "dispatch element size must be 1, 2 or 4 bytes, got {}",
                self.dispatch_elem_bytes
            ));
        }
        let x_bytes = self.hidden * self.dispatch_elem_bytes;
        if self.hidden == 0 || x_bytes % 16 != 0 {
            return bad(format!(
                "a token must be a multiple of 16 bytes: hidden {} x {} bytes = {x_bytes}",
                self.hidden, self.dispatch_elem_bytes
            ));
        }
        if (self.hidden * self.combine.bytes()) % 16 != 0 {
            return bad(format!(
                "a combined token must be a multiple of 16 bytes: hidden {} x {} bytes",
                self.hidden,
                self.combine.bytes()
            ));
        }
        if self.scales_per_token > self.hidden {
            return bad(format!(
                "{} scales per token is more than the hidden size {}",
                self.scales_per_token, self.hidden
            ));
        }
        if let Some(c) = self.capacity {
            if c == 0 || c > i32::MAX as usize {
                return bad(format!("capacity must be 1..2^31, got {c}"));
            }
        }
        let worst = self.world * self.max_tokens * self.topk;
        if worst > i32::MAX as usize {
            return bad(format!(
                "world x max_tokens x topk = {worst} entries overflows the kernels' 32-bit rows"
            ));
        }
        if self.timeout.is_zero() {
            return bad("timeout must be positive".to_string());
        }
        Ok(())
    }

    /// Experts each rank holds.
    pub fn experts_per_rank(&self) -> usize {
        self.num_experts / self.world
    }

    /// The node rank `r` belongs to.
    pub fn node_of(&self, r: usize) -> usize {
        r / self.ranks_per_node
    }

    /// The buffer layout for this config (after [`Config::validate`]).
    pub fn layout(&self) -> Result<Layout> {
        self.validate()?;
        Ok(Layout::of(self))
    }

    /// A hash of every field the ranks must agree on (all but `rank` and `timeout`).
    pub fn fingerprint(&self) -> u64 {
        let fields = [
            self.world,
            self.ranks_per_node,
            self.num_experts,
            self.topk,
            self.max_tokens,
            self.hidden,
            self.dispatch_elem_bytes,
            self.scales_per_token,
            self.combine.bytes() * 10 + self.combine as usize,
            self.capacity.unwrap_or(0),
        ];
        // FNV-1a over the little-endian bytes.
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for f in fields {
            for b in (f as u64).to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0000_0100_0000_01b3);
            }
        }
        h
    }
}

const fn round_up(v: usize, a: usize) -> usize {
    v.div_ceil(a) * a
}

/// Byte offsets of the receive area every rank exposes to its peers, and of the local state.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Layout {
    /// Bytes of one dispatched token (hidden x element size).
    pub x_bytes: usize,
    /// Bytes of one token's scales.
    pub s_bytes: usize,
    /// Bytes of one combined token.
    pub c_bytes: usize,
    /// One receive slot: the larger of a dispatched token (+ scales) and a combined token; the
    /// same slots serve both halves.
    pub slot_bytes: usize,
    /// One routing entry: local expert, position and weight for each of the top-k.
    pub meta_bytes: usize,
    /// Experts per rank.
    pub experts_per_rank: usize,
    /// Rows of the dispatch output.
    pub capacity: usize,
    /// Receive area (shared with peers): a random u64 that peers read back through their
    /// mapping to prove it is this area (and not a stale mapping of freed memory).
    pub rx_nonce: usize,
    /// `[world][max_tokens]` slots.
    pub rx_data: usize,
    /// `[world][max_tokens]` routing entries.
    pub rx_meta: usize,
    /// `[world][experts_per_rank]` int32 counts.
    pub rx_ecount: usize,
    /// `[world]` u64 dispatch flags.
    pub rx_dflag: usize,
    /// `[world]` u64 combine flags.
    pub rx_cflag: usize,
    /// `[world]` u64 release notices.
    pub rx_rel: usize,
    /// `[world]` u64 counts flags (the per-expert counts of that source are in place).
    pub rx_cntflag: usize,
    /// `[world][max_chunks]` u64 chunk flags of the overlapped dispatch and combine.
    pub rx_chunk: usize,
    /// Tokens behind one chunk flag.
    pub chunk_tokens: usize,
    /// Chunk flags per source (`max_tokens / chunk_tokens`, rounded up).
    pub max_chunks: usize,
    /// Size of the receive area.
    pub rx_total: usize,
    /// Local state (step counters).
    pub st: usize,
    /// `[max_tokens]` u64 destination masks.
    pub tok_mask: usize,
    /// `[num_experts][ECOUNT_STRIDE]` int32 running counts (the first of each run is used).
    pub ecount_local: usize,
    /// `[world][max_tokens][topk]` int32 output rows.
    pub route_rows: usize,
    /// `[world]` peer table.
    pub peers: usize,
    /// Size of the local area.
    pub local_total: usize,
}

/// Size of the kernels' `State` struct.
pub const STATE_BYTES: usize = 80;
/// Size of the kernels' `Peer` struct.
pub const PEER_BYTES: usize = 16 * 8;

impl Layout {
    fn of(c: &Config) -> Layout {
        let x_bytes = c.hidden * c.dispatch_elem_bytes;
        let s_bytes = c.scales_per_token * 4;
        let c_bytes = c.hidden * c.combine.bytes();
        let slot_bytes = round_up((x_bytes + s_bytes).max(c_bytes), 16);
        let meta_bytes = round_up(12 * c.topk, 16);
        let epr = c.experts_per_rank();
        // A token may name one expert in several of its top-k slots: each is its own row.
        let capacity = c.capacity.unwrap_or(c.world * c.max_tokens * c.topk);
        let slots = c.world * c.max_tokens;
        // About a thousand chunks at most per source: each costs a fence and a flag store per
        // peer, and a chunk's (token, k) routing must fit one block's threads.
        let chunk_tokens = c
            .max_tokens
            .div_ceil(1024)
            .clamp(1, MAX_CHUNK_TOKENS.min(256 / c.topk));
        let max_chunks = c.max_tokens.div_ceil(chunk_tokens);
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let here = at;
            at = round_up(at + bytes, 256);
            here
        };
        let rx_nonce = take(8);
        let rx_data = take(slots * slot_bytes);
        let rx_meta = take(slots * meta_bytes);
        let rx_ecount = take(c.world * epr * 4);
        let rx_dflag = take(c.world * 8);
        let rx_cflag = take(c.world * 8);
        let rx_rel = take(c.world * 8);
        let rx_cntflag = take(c.world * 8);
        let rx_chunk = take(c.world * max_chunks * 8);
        let rx_total = at;
        let mut at = 0usize;
        let mut take = |bytes: usize| {
            let here = at;
            at = round_up(at + bytes, 256);
            here
        };
        let st = take(STATE_BYTES);
        let tok_mask = take(c.max_tokens * 8);
        let ecount_local = take(c.num_experts * ECOUNT_STRIDE * 4);
        let route_rows = take(slots * c.topk * 4);
        let peers = take(c.world * PEER_BYTES);
        Layout {
            x_bytes,
            s_bytes,
            c_bytes,
            slot_bytes,
            meta_bytes,
            experts_per_rank: epr,
            capacity,
            rx_nonce,
            rx_data,
            rx_meta,
            rx_ecount,
            rx_dflag,
            rx_cflag,
            rx_rel,
            rx_cntflag,
            rx_chunk,
            chunk_tokens,
            max_chunks,
            rx_total,
            st,
            tok_mask,
            ecount_local,
            route_rows,
            peers,
            local_total: at,
        }
    }

    /// Device memory this rank allocates itself (receive area + local state), in bytes; the
    /// dispatch output (`capacity` rows) and combine output are the caller's tensors.
    pub fn footprint(&self) -> usize {
        self.rx_total + self.local_total
    }

    /// Bytes of the dispatch output tensors (rows and scales) at full capacity.
    pub fn dispatch_output_bytes(&self) -> usize {
        self.capacity * (self.x_bytes + self.s_bytes)
    }
}

/// What a rank sends its peers so they can map its receive area.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Handle {
    /// The sender's rank.
    pub rank: usize,
    /// The sender's world.
    pub world: usize,
    /// [`Config::fingerprint`] of the sender.
    pub fingerprint: u64,
    /// The sender's process id (two ranks in one process share memory without IPC).
    pub pid: u32,
    /// The random value at the start of the sender's receive area.
    pub nonce: u64,
    /// CUDA IPC handle of the receive area.
    pub ipc: [u8; 64],
    /// With an engine (ranks on other nodes): the receive area's memory descriptor.
    pub rx_desc: Vec<u8>,
    /// With an engine: the descriptor of the proxy's header area.
    pub headers_desc: Vec<u8>,
    /// The sender's GPU: its PCI bus id (`0000:18:00.0`), the same string for two ranks on one
    /// GPU of a host.
    pub gpu: String,
}

/// A rank of `handles` that is another process on this rank's GPU and node, if any: the
/// kernels spin-wait on each other's flags, and the kernels of two processes only take turns
/// on one GPU (the driver switches contexts), so such a group crawls from one time slice to the
/// next instead of running. Two ranks of one process share a context and run side by side.
pub fn rank_sharing_gpu(
    me: usize,
    handles: &[Handle],
    same_node: impl Fn(usize) -> bool,
) -> Option<usize> {
    let mine = &handles[me];
    (0..handles.len()).find(|&r| {
        r != me
            && same_node(r)
            && handles[r].pid != mine.pid
            && !mine.gpu.is_empty()
            && handles[r].gpu == mine.gpu
    })
}

const HANDLE_MAGIC: &[u8; 4] = b"STA2";
// 2: the receive area gained the counts and chunk flags (overlapped dispatch); 3: the counts
// kernel of the overlapped dispatch writes the routing entries, senders and workers split the
// fused kernel. Ranks of different builds must not map each other.
const HANDLE_VERSION: u32 = 4;
/// Length of the fixed part of an encoded [`Handle`] (the two descriptors and the GPU id
/// follow, each with a u32 length).
pub const HANDLE_BYTES: usize = 4 + 4 + 4 + 4 + 8 + 4 + 8 + 64;

impl Handle {
    /// Encodes to bytes.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::with_capacity(HANDLE_BYTES);
        v.extend_from_slice(HANDLE_MAGIC);
        v.extend_from_slice(&HANDLE_VERSION.to_le_bytes());
        v.extend_from_slice(&(self.rank as u32).to_le_bytes());
        v.extend_from_slice(&(self.world as u32).to_le_bytes());
        v.extend_from_slice(&self.fingerprint.to_le_bytes());
        v.extend_from_slice(&self.pid.to_le_bytes());
        v.extend_from_slice(&self.nonce.to_le_bytes());
        v.extend_from_slice(&self.ipc);
        for d in [&self.rx_desc, &self.headers_desc, self.gpu.as_bytes()] {
            v.extend_from_slice(&(d.len() as u32).to_le_bytes());
            v.extend_from_slice(d);
        }
        v
    }

    /// Decodes bytes made by [`Handle::to_bytes`].
    pub fn from_bytes(b: &[u8]) -> Result<Handle> {
        let bad = |m: &str| Err(Error::Handshake(m.to_string()));
        if b.len() < HANDLE_BYTES + 12 {
            return bad(&format!(
                "handle is {} bytes, expected at least {}",
                b.len(),
                HANDLE_BYTES + 12
            ));
        }
        if &b[0..4] != HANDLE_MAGIC {
            return bad("not an all-to-all handle (bad magic)");
        }
        let u32_at = |i: usize| u32::from_le_bytes(b[i..i + 4].try_into().expect("4 bytes"));
        if u32_at(4) != HANDLE_VERSION {
            return bad(&format!(
                "handle version {} is not supported (this build reads {HANDLE_VERSION})",
                u32_at(4)
            ));
        }
        let mut ipc = [0u8; 64];
        ipc.copy_from_slice(&b[36..100]);
        let mut at = HANDLE_BYTES;
        let mut tail = || -> Result<Vec<u8>> {
            let n = b
                .get(at..at + 4)
                .map(|x| u32::from_le_bytes(x.try_into().expect("4 bytes")) as usize)
                .ok_or_else(|| Error::Handshake("handle truncated".into()))?;
            let d = b
                .get(at + 4..at + 4 + n)
                .ok_or_else(|| Error::Handshake("handle truncated".into()))?;
            at += 4 + n;
            Ok(d.to_vec())
        };
        let rx_desc = tail()?;
        let headers_desc = tail()?;
        let gpu = String::from_utf8(tail()?)
            .map_err(|_| Error::Handshake("handle's GPU id is not UTF-8".into()))?;
        if at != b.len() {
            return bad("handle has trailing bytes");
        }
        Ok(Handle {
            rank: u32_at(8) as usize,
            world: u32_at(12) as usize,
            fingerprint: u64::from_le_bytes(b[16..24].try_into().expect("8 bytes")),
            pid: u32_at(24),
            nonce: u64::from_le_bytes(b[28..36].try_into().expect("8 bytes")),
            ipc,
            rx_desc,
            headers_desc,
            gpu,
        })
    }
}

/// What a kernel recorded when it failed (in host-mapped memory, readable at any time).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct KernelError {
    /// 1 timeout, 2 expert id out of range, 3 capacity exceeded, 4 too many tokens.
    pub code: u32,
    /// 0 dispatch_send, 1 dispatch_recv, 2 combine_send, 3 combine_recv.
    pub phase: u32,
    /// The peer waited for (timeout) or this rank.
    pub peer: u32,
    /// Token index (bad expert), rows needed (capacity), token count (too many tokens).
    pub detail: u32,
    /// The step of the phase that failed.
    pub step: u64,
}

const PHASES: [&str; 4] = [
    "dispatch_send",
    "dispatch_recv",
    "combine_send",
    "combine_recv",
];

impl std::fmt::Display for KernelError {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let phase = PHASES.get(self.phase as usize).unwrap_or(&"?");
        match self.code {
            1 => write!(
                f,
                "{phase} of step {} timed out waiting for rank {} (is it alive, and did it run \
                 the same phases in the same order?)",
                self.step, self.peer
            ),
            2 => write!(
                f,
                "{phase} of step {}: token {} names an expert outside 0..num_experts",
                self.step, self.detail
            ),
            3 => write!(
                f,
                "{phase} of step {}: {} rows received exceed the dispatch capacity; rows past \
                 it were dropped (raise capacity)",
                self.step, self.detail
            ),
            4 => write!(
                f,
                "{phase} of step {}: num_tokens {} is outside 0..=max_tokens",
                self.step, self.detail as i32
            ),
            c => write!(f, "{phase} of step {}: kernel error code {c}", self.step),
        }
    }
}

/// Everything that can go wrong.
///
/// Not `#[non_exhaustive]`: the Python bindings convert it with one exhaustive `match`.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// A bad argument; nothing was launched.
    #[error("invalid argument: {0}")]
    InvalidArgument(String),
    /// A CUDA driver call failed.
    #[error(transparent)]
    Cuda(#[from] stolon_cuda::Error),
    /// This build has no kernels (nvcc was not found when it was compiled).
    #[error(
        "stolon was built without the MoE kernels (nvcc was not found at build time; install \
         nvidia-cuda-nvcc or set NVCC / CUDA_HOME and rebuild)"
    )]
    NoKernels,
    /// No kernel build of this library fits the installed driver, or `STOLON_MOE_KERNELS`
    /// forced one that is missing or too new for it.
    #[error("MoE kernels: {0}")]
    KernelBuild(String),
    /// Peers' handles do not fit together.
    #[error("all-to-all handshake: {0}")]
    Handshake(String),
    /// A kernel recorded a failure.
    #[error("all-to-all kernel failed: {0}")]
    Kernel(KernelError),
    /// A bounded wait ran out on the host.
    #[error("timed out: {0}")]
    Timeout(String),
    /// The host proxy (ranks on other nodes) could not move data.
    #[error("all-to-all proxy: {0}")]
    Proxy(String),
}

impl Error {
    /// True when the error is a timeout (on the host, or recorded by a kernel).
    pub fn is_timeout(&self) -> bool {
        matches!(self, Error::Timeout(_)) || matches!(self, Error::Kernel(k) if k.code == 1)
    }
}

/// Result with [`Error`].
pub type Result<T> = std::result::Result<T, Error>;

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn decode_cfg() -> Config {
        let mut c = Config::new(0, 2, 256, 8, 128, 7168);
        c.dispatch_elem_bytes = 1;
        c.scales_per_token = 56;
        c
    }

    #[test]
    fn decode_layout_sizes() {
        let l = decode_cfg().layout().unwrap();
        assert_eq!(l.x_bytes, 7168);
        assert_eq!(l.s_bytes, 224);
        assert_eq!(l.c_bytes, 14336);
        // The combine's bf16 token is larger than the fp8 token plus scales: slots fit it.
        assert_eq!(l.slot_bytes, 14336);
        assert_eq!(l.meta_bytes, 96);
        assert_eq!(l.experts_per_rank, 128);
        assert_eq!(l.capacity, 2 * 128 * 8);
        assert_eq!(l.rx_meta, 256 + 2 * 128 * 14336);
        assert!(l.footprint() < 5 << 20, "{}", l.footprint());
    }

    #[test]
    fn validation_names_the_field() {
        let mut c = decode_cfg();
        c.num_experts = 255;
        let e = c.validate().unwrap_err().to_string();
        assert!(e.contains("multiple of the world"), "{e}");
        let mut c = decode_cfg();
        c.hidden = 7; // 7 fp8 bytes
        assert!(c.validate().unwrap_err().to_string().contains("16 bytes"));
        let mut c = decode_cfg();
        c.topk = 17;
        assert!(c.validate().unwrap_err().to_string().contains("topk"));
        let mut c = decode_cfg();
        c.rank = 2;
        assert!(c.validate().unwrap_err().to_string().contains("outside"));
        let mut c = decode_cfg();
        c.ranks_per_node = 3;
        assert!(c.validate().unwrap_err().to_string().contains("divide"));
        let mut c = decode_cfg();
        c.world = 65;
        c.num_experts = 65 * 4;
        assert!(c.validate().unwrap_err().to_string().contains("world"));
    }

    #[test]
    fn handle_roundtrip_and_rejects() {
        let h = Handle {
            rank: 3,
            world: 4,
            fingerprint: 0xdead_beef_0123,
            pid: 77,
            nonce: 0x1234_5678_9abc_def0,
            ipc: [7; 64],
            rx_desc: vec![1, 2, 3],
            headers_desc: vec![],
            gpu: "0000:18:00.0".into(),
        };
        let b = h.to_bytes();
        assert_eq!(b.len(), HANDLE_BYTES + 12 + 3 + 12);
        assert_eq!(Handle::from_bytes(&b).unwrap(), h);
        assert!(Handle::from_bytes(&b[1..]).is_err());
        for cut in [1, 4, 9] {
            assert!(
                Handle::from_bytes(&b[..b.len() - cut]).is_err(),
                "cut {cut}"
            );
        }
        let mut longer = b.clone();
        longer.push(0);
        assert!(Handle::from_bytes(&longer)
            .unwrap_err()
            .to_string()
            .contains("trailing"));
        let mut bad = b.clone();
        bad[0] = b'X';
        assert!(Handle::from_bytes(&bad)
            .unwrap_err()
            .to_string()
            .contains("magic"));
        let mut bad = b;
        bad[4] = 9;
        assert!(Handle::from_bytes(&bad)
            .unwrap_err()
            .to_string()
            .contains("version"));
    }

    #[test]
    fn a_second_process_on_one_gpu_is_found_and_one_process_is_not() {
        let h = |pid: u32, gpu: &str| Handle {
            rank: 0,
            world: 4,
            fingerprint: 1,
            pid,
            nonce: 2,
            ipc: [0; 64],
            rx_desc: vec![],
            headers_desc: vec![],
            gpu: gpu.into(),
        };
        let all_one_node = |_: usize| true;
        let distinct = [h(10, "a"), h(11, "b"), h(12, "c"), h(13, "d")];
        assert_eq!(rank_sharing_gpu(0, &distinct, all_one_node), None);
        // Rank 3 is another process on rank 1's GPU.
        let shared = [h(10, "a"), h(11, "b"), h(12, "c"), h(13, "b")];
        assert_eq!(rank_sharing_gpu(1, &shared, all_one_node), Some(3));
        assert_eq!(rank_sharing_gpu(3, &shared, all_one_node), Some(1));
        assert_eq!(rank_sharing_gpu(0, &shared, all_one_node), None);
        // The same GPU id on another node is another GPU.
        assert_eq!(rank_sharing_gpu(1, &shared, |r| r < 2), None);
        // Ranks of one process share a context: allowed.
        let one_process = [h(10, "a"), h(10, "a")];
        assert_eq!(rank_sharing_gpu(0, &one_process, all_one_node), None);
        // An unknown GPU id matches nothing.
        let unknown = [h(10, ""), h(11, "")];
        assert_eq!(rank_sharing_gpu(0, &unknown, all_one_node), None);
    }

    #[test]
    fn fingerprint_ignores_rank_and_timeout_only() {
        let a = decode_cfg();
        let mut b = a.clone();
        b.rank = 1;
        b.timeout = Duration::from_secs(1);
        assert_eq!(a.fingerprint(), b.fingerprint());
        b.topk = 4;
        assert_ne!(a.fingerprint(), b.fingerprint());
        let mut c = a.clone();
        c.combine = CombineDtype::F16;
        assert_ne!(a.fingerprint(), c.fingerprint());
    }

    #[test]
    fn kernel_errors_read_well() {
        let e = KernelError {
            code: 1,
            phase: 1,
            peer: 3,
            detail: 0,
            step: 5,
        };
        let s = e.to_string();
        assert!(s.contains("dispatch_recv") && s.contains("rank 3"), "{s}");
        assert!(Error::Kernel(e).is_timeout());
    }

    proptest! {
        // Regions never overlap and every one is 256-byte aligned, for any valid config.
        #[test]
        fn regions_are_disjoint_and_aligned(
            world_pow in 0u32..7, epr in 1usize..16, topk in 1usize..=16,
            max_tokens in 1usize..5000, hidden16 in 1usize..600, elem in prop::sample::select(vec![1usize, 2, 4]),
            scales in 0usize..64, comb in 0usize..3,
        ) {
            let world = 1usize << world_pow;
            let mut c = Config::new(0, world, (world * epr).min(1024 / world * world), topk, max_tokens, hidden16 * 16);
            c.dispatch_elem_bytes = elem;
            c.scales_per_token = scales.min(c.hidden);
            c.combine = [CombineDtype::Bf16, CombineDtype::F16, CombineDtype::F32][comb];
            prop_assume!(c.validate().is_ok());
            let l = c.layout().unwrap();
            let slots = world * max_tokens;
            let rx = [
                (l.rx_nonce, 8), (l.rx_data, slots * l.slot_bytes), (l.rx_meta, slots * l.meta_bytes),
                (l.rx_ecount, world * l.experts_per_rank * 4), (l.rx_dflag, world * 8),
                (l.rx_cflag, world * 8), (l.rx_rel, world * 8), (l.rx_cntflag, world * 8),
                (l.rx_chunk, world * l.max_chunks * 8),
            ];
            let local = [
                (l.st, STATE_BYTES), (l.tok_mask, max_tokens * 8), (l.ecount_local, c.num_experts * ECOUNT_STRIDE * 4),
                (l.route_rows, slots * topk * 4), (l.peers, world * PEER_BYTES),
            ];
            for (regions, total) in [(&rx[..], l.rx_total), (&local[..], l.local_total)] {
                for (i, &(a, la)) in regions.iter().enumerate() {
                    prop_assert_eq!(a % 256, 0);
                    prop_assert!(a + la <= total);
                    for &(b, lb) in &regions[i + 1..] {
                        prop_assert!(a + la <= b || b + lb <= a);
                    }
                }
            }
            prop_assert!(l.slot_bytes >= l.x_bytes + l.s_bytes && l.slot_bytes >= l.c_bytes);
            prop_assert_eq!(l.slot_bytes % 16, 0);
            prop_assert!(l.meta_bytes >= 12 * topk);
            prop_assert!(l.chunk_tokens >= 1 && l.chunk_tokens <= MAX_CHUNK_TOKENS);
            prop_assert!(l.chunk_tokens * topk <= 256);
            prop_assert!(l.max_chunks * l.chunk_tokens >= max_tokens);
        }
    }
}
