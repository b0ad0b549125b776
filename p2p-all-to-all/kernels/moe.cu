// MoE dispatch and combine between the GPUs of one host (and, through a host proxy, beyond).
//
// Four kernels, each one phase of a step, queued in this order on one stream per rank:
//
//   dispatch_send  every token is written once to every rank that holds one of its top-k
//                  experts (peer memory mapped through CUDA IPC, or a local staging area the
//                  host proxy forwards), with its routing (local expert, weight, position).
//   dispatch_recv  waits for every source rank's flag, packs the received tokens expert by
//                  expert into one contiguous output (rows of expert e start at offsets[e]).
//   combine_send   for every received token, the weighted sum of its local experts' outputs
//                  is written back into the source rank's receive area (the same memory the
//                  dispatch used: the buffers are shared between the two halves).
//   combine_recv   waits for every rank's flag and sums the partial results of each token.
//
// Nothing depends on the order in which writes land: a receiver learns that a source's data
// is complete from a 64-bit flag the source stores with release semantics after a system-wide
// fence. The step number lives in device memory (one counter per phase, advanced by the last
// block of each launch), so a CUDA graph of the four phases replays without new arguments.
// Reuse of the shared receive area is guarded by release notices: before writing into peer
// p's area, a rank waits until p has finished reading what was there (release values 2n-1
// after p's dispatch_recv of step n, 2n after its combine_recv).
//
// Every wait has a deadline (globaltimer); a timeout is recorded in host-mapped memory and the
// kernel finishes without touching the data it waited for.

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;
// Blocks per SM the registers must allow (the host launches up to this many per SM, see
// `DEFAULT_BLOCKS_PER_SM` in src/gpu.rs): at prefill sizes the phases are bandwidth-bound and
// need many loads and NVLink stores in flight.
constexpr int kMinBlocks = 4;
constexpr int kMaxWorld = 64;
constexpr int kMaxTopk = 16;
// Most tokens per chunk flag of the overlapped dispatch (and chunk x topk <= kThreads); keep in
// sync with `MAX_CHUNK_TOKENS` in src/lib.rs.
constexpr int kMaxChunkTokens = 16;
// Ints between two experts' running counts (ecount_local): one 128-byte line each, so the
// atomics of a dispatch spread over many L2 slices instead of queueing on a few lines; keep in
// sync with `ECOUNT_STRIDE` in src/lib.rs.
constexpr int kCountStride = 32;

// Error codes; keep in sync with p2p-all-to-all/src/lib.rs (KernelError).
constexpr uint32_t kErrTimeout = 1;
constexpr uint32_t kErrBadExpert = 2;
constexpr uint32_t kErrCapacity = 3;
constexpr uint32_t kErrTooManyTokens = 4;

// Per peer: where this rank writes what is meant for the peer (remote side), and where it
// reads what the peer sent (local side). Layout mirrored by `PeerEntry` in src/lib.rs.
struct Peer {
    uint8_t* data;      // peer's receive slots for tokens from this rank
    uint8_t* meta;      // peer's routing entries for tokens from this rank
    int32_t* ecount;    // peer's per-local-expert token counts from this rank
    uint64_t* dflag;    // peer's "dispatch from this rank complete" flag: step << 32 | tokens
    uint64_t* cflag;    // peer's "combine from this rank complete" flag: step
    uint64_t* rel;      // peer's copy of this rank's release notices
    const uint8_t* rx_data;
    const uint8_t* rx_meta;
    const int32_t* rx_ecount;
    const uint64_t* rx_dflag;
    const uint64_t* rx_cflag;
    const uint64_t* rel_in;  // the peer's release notices to this rank
    // Overlapped dispatch (moe_dispatch_count + moe_dispatch_fused):
    uint64_t* cntflag;          // peer's "counts from this rank written" flag: step << 32 | tokens
    uint64_t* chunk;            // peer's per-chunk "tokens of chunk c landed" flags: step
    const uint64_t* rx_cntflag;
    const uint64_t* rx_chunk;
};

struct State {
    uint64_t seq[4];   // last completed step of each phase
    uint32_t done[4];  // blocks of the running launch that finished, per phase
    int32_t my_ntok;   // tokens this rank dispatched in the current step
    int32_t failed;    // a wait of this rank timed out (device-side copy of err->code == 1)
    // The running moe_dispatch_fused:
    uint32_t arrive;     // blocks that started (the first `senders` of them send)
    uint32_t send_next;  // next chunk to send
    uint32_t own_next;   // next chunk of own tokens to expand
    uint32_t recv_next;  // next receive item
    uint32_t sent;       // send items finished
    uint32_t pad;
};

struct Error {
    uint32_t code;
    uint32_t phase;
    uint32_t peer;
    uint32_t detail;
    uint64_t step;
    uint64_t progress[4];  // last completed step of each phase, readable without the stream
};

// Mirrored by `KernelParams` in src/lib.rs: same order, same types.
struct Params {
    const Peer* peers;
    State* st;
    Error* err;  // host-mapped
    uint64_t* tok_mask;      // [max_tokens] ranks each token went to
    uint64_t* host_mask;     // the same in host-mapped memory for the proxy (null: no proxy)
    int32_t* ecount_local;   // [num_experts][kCountStride] running counts during the dispatch
    int32_t* route_rows;     // [world][max_tokens][topk] output row of each received entry
    const int32_t* num_tokens_ptr;  // used when num_tokens < 0
    const uint8_t* x;        // dispatch input rows
    const uint8_t* scales;   // their scales (or null)
    const void* idx;         // [tokens][topk] expert ids, int32 or int64
    const float* weights;    // [tokens][topk]
    uint8_t* out_x;          // dispatch output rows [capacity][x_bytes]
    uint8_t* out_s;          // dispatch output scales [capacity][s_bytes]
    int32_t* expert_counts;  // [experts_per_rank]
    int32_t* expert_offsets; // [experts_per_rank + 1]
    const uint8_t* y;        // combine input rows [capacity][hidden] (out dtype)
    uint8_t* out;            // combine output rows [tokens][hidden]
    int64_t x_stride;        // bytes between input rows
    int64_t s_stride;
    int64_t idx_stride;      // elements between routing rows
    int64_t w_stride;
    int64_t y_stride;        // bytes
    int64_t out_stride;      // bytes
    uint64_t timeout_ns;
    int32_t rank;
    int32_t world;
    int32_t experts_per_rank;
    int32_t topk;
    int32_t max_tokens;
    int32_t num_tokens;      // >= 0: this many tokens; < 0: read *num_tokens_ptr
    int32_t x_bytes;         // multiple of 16
    int32_t s_bytes;         // multiple of 4 (0 without scales)
    int32_t slot_bytes;      // multiple of 16
    int32_t meta_bytes;      // multiple of 16: int32 le[topk], int32 pos[topk], float w[topk]
    int32_t capacity;        // rows of out_x
    int32_t hidden;
    int32_t idx64;
    int32_t accumulate;
    int32_t chunk_tokens;    // tokens per chunk flag (overlapped dispatch)
    int32_t senders;         // blocks that send (overlapped dispatch)
};

__device__ __forceinline__ uint64_t ld_acquire(const uint64_t* p) {
    uint64_t v;
    asm volatile("ld.acquire.sys.global.u64 %0, [%1];" : "=l"(v) : "l"(p) : "memory");
    return v;
}

__device__ __forceinline__ void st_release(uint64_t* p, uint64_t v) {
    asm volatile("st.release.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

__device__ __forceinline__ uint64_t now_ns() {
    uint64_t t;
    asm volatile("mov.u64 %0, %%globaltimer;" : "=l"(t));
    return t;
}

__device__ void record_error(const Params& P, uint32_t code, uint32_t phase, uint32_t peer,
                             uint32_t detail, uint64_t step) {
    if (code == kErrTimeout) atomicExch(&P.st->failed, 1);
    if (atomicCAS_system(&P.err->code, 0u, code) == 0u) {
        P.err->phase = phase;
        P.err->peer = peer;
        P.err->detail = detail;
        P.err->step = step;
        __threadfence_system();
    }
}

// Read from device memory: polling the host-mapped error word would cross PCIe.
__device__ __forceinline__ bool timed_out_elsewhere(const Params& P) {
    return *reinterpret_cast<volatile int32_t*>(&P.st->failed) != 0;
}

// Spins until `done()`. False (and a timeout recorded as `phase`, `peer`, `detail`, `step`)
// after the deadline, or at once when another wait of this rank already timed out.
template <typename Done>
__device__ bool spin_until(const Params& P, Done done, uint32_t phase, uint32_t peer,
                           uint32_t detail, uint64_t step) {
    if (done()) return true;
    const uint64_t start = now_ns();
    uint64_t next_check = start + 20000;
    while (!done()) {
        const uint64_t t = now_ns();
        if (t >= next_check) {
            if (timed_out_elsewhere(P)) return false;
            if (t - start > P.timeout_ns) {
                record_error(P, kErrTimeout, phase, peer, detail, step);
                return false;
            }
            next_check = t + 20000;
        }
    }
    return true;
}

// Spins until (*p >> shift) >= target (see spin_until).
__device__ bool wait_at_least(const Params& P, const uint64_t* p, uint64_t target, int shift,
                              uint32_t phase, uint32_t peer, uint64_t step) {
    const auto done = [&] { return (ld_acquire(p) >> shift) >= target; };
    return spin_until(P, done, phase, peer, static_cast<uint32_t>(target), step);
}

// Waits for each peer's value; true in every thread when all arrived. One thread per block
// polls (peer by peer) while the others wait at the barrier, so the flags' cache lines see few
// readers.
__device__ bool wait_all_peers(const Params& P, const uint64_t* Peer::*field, uint64_t target,
                               int shift, uint32_t phase, uint64_t step) {
    __shared__ int s_ok;
    if (threadIdx.x == 0) {
        int ok = 1;
        for (int p = 0; p < P.world && ok; ++p)
            ok = wait_at_least(P, P.peers[p].*field, target, shift, phase, p, step);
        s_ok = ok;
    }
    __syncthreads();
    return s_ok != 0;
}

// Marks this block finished for `phase`; true in every thread of the last block to finish.
// With `writer`, the last block then sees every other block's writes: the barrier orders the
// block's writes before thread 0's system-scope fence (fences are cumulative), as a grid
// barrier does. Phases that only read peer data (and write local memory, which the next launch
// sees anyway) pass false and skip the fences: a block's loads are complete once their values
// were used, which they were before the barrier.
__device__ bool last_block(const Params& P, int phase, bool writer) {
    __shared__ int s_last;
    __syncthreads();
    if (threadIdx.x == 0) {
        if (writer) __threadfence_system();
        const uint32_t prev = atomicAdd(&P.st->done[phase], 1u);
        s_last = prev == gridDim.x - 1;
        if (s_last && writer) __threadfence_system();
    }
    __syncthreads();
    return s_last != 0;
}

// A release notice to a peer after this rank's reads: no fence needed (see last_block).
__device__ __forceinline__ void st_relaxed(uint64_t* p, uint64_t v) {
    asm volatile("st.relaxed.sys.global.u64 [%0], %1;" ::"l"(p), "l"(v) : "memory");
}

// Clears the role and item counters of a fused kernel (moe_dispatch_fused, moe_combine_fused)
// for the next one: by the last block, once every block has taken its last item.
__device__ void reset_roles(State* st) {
    st->arrive = 0;
    st->send_next = 0;
    st->own_next = 0;
    st->recv_next = 0;
    st->sent = 0;
}

__device__ void finish_phase(const Params& P, int phase, uint64_t n) {
    if (threadIdx.x == 0) {
        P.st->done[phase] = 0;
        P.st->seq[phase] = n;
        *reinterpret_cast<volatile uint64_t*>(&P.err->progress[phase]) = n;
    }
}

__device__ __forceinline__ int64_t expert_of(const Params& P, int t, int k) {
    if (P.idx64) return static_cast<const int64_t*>(P.idx)[t * P.idx_stride + k];
    return static_cast<const int32_t*>(P.idx)[t * P.idx_stride + k];
}

__device__ __forceinline__ int meta_le(const uint8_t* m, int k) {
    return __ldcg(reinterpret_cast<const int32_t*>(m) + k);
}
__device__ __forceinline__ int meta_pos(const uint8_t* m, int topk, int k) {
    return __ldcg(reinterpret_cast<const int32_t*>(m) + topk + k);
}
__device__ __forceinline__ float meta_w(const uint8_t* m, int topk, int k) {
    return __ldcg(reinterpret_cast<const float*>(m) + 2 * topk + k);
}

// Splits each of `items` tokens into chunks of its 16-byte vectors so that about two units of
// work exist per warp of the grid (few tokens at decode sizes would otherwise leave most warps
// idle and each busy warp with a long chain of dependent loads). A chunk spans at least one
// warp-wide pass of `unroll` vectors per lane.
__device__ __forceinline__ int chunk_count(int items, int vecs, int unroll) {
    const int warps_total = gridDim.x * (blockDim.x / 32);
    const int max_chunks = max(1, (vecs + 32 * unroll - 1) / (32 * unroll));
    const int want = items > 0 ? (2 * warps_total + items - 1) / items : 1;
    return max(1, min(max_chunks, want));
}

// Tokens each source sends in this step (from its counts flag, which also says the routing
// entries' count) and their running sum.
__device__ void source_prefix(const Params& P, int* s_start) {
    if (threadIdx.x == 0) {
        int acc = 0;
        for (int s = 0; s < P.world; ++s) {
            s_start[s] = acc;
            acc += static_cast<int>(ld_acquire(P.peers[s].rx_cntflag) & 0xffffffffu);
        }
        s_start[P.world] = acc;
    }
    __syncthreads();
}

__device__ __forceinline__ int source_of(const int* s_start, int world, int i) {
    int s = 0;
    while (s + 1 < world && s_start[s + 1] <= i) ++s;
    return s;
}

// This step's token count, clamped to 0..max_tokens (an out-of-range count is recorded).
__device__ int step_tokens(const Params& P, uint64_t n) {
    int ntok = P.num_tokens >= 0 ? P.num_tokens : *P.num_tokens_ptr;
    if (ntok < 0 || ntok > P.max_tokens) {
        if (blockIdx.x == 0 && threadIdx.x == 0)
            record_error(P, kErrTooManyTokens, 0, P.rank, static_cast<uint32_t>(ntok), n);
        ntok = ntok < 0 ? 0 : P.max_tokens;
    }
    return ntok;
}

// Where each source's tokens for each local expert start in the packed output, from every
// source's counts (which must have arrived): rows of local expert le hold the sources in rank
// order, each source's tokens in the positions it assigned. Leaves off[s * epr + le] in
// `s_off`; block 0 also writes the outputs' counts and offsets. `s_cnt` is scratch.
__device__ void expert_offsets(const Params& P, int* s_off, int* s_cnt, uint64_t n) {
    __shared__ int s_rows_total;
    const int tid = threadIdx.x;
    const int epr = P.experts_per_rank;
    // Every count is loaded at once, then summed over sources and scanned over experts.
    for (int i = tid; i < P.world * epr; i += blockDim.x)
        s_off[i] = __ldcg(P.peers[i / epr].rx_ecount + i % epr);
    __syncthreads();
    for (int le = tid; le < epr; le += blockDim.x) {
        int c = 0;
        for (int s = 0; s < P.world; ++s) {
            const int v = s_off[s * epr + le];
            s_off[s * epr + le] = c;
            c += v;
        }
        s_cnt[le] = c;
    }
    __syncthreads();
    if (tid < 32) {
        // Exclusive scan of s_cnt by one warp: each lane sums a run, the runs are scanned
        // with shuffles, then each lane rewrites its run.
        const int run = (epr + 31) / 32;
        const int lo = tid * run, hi = min(epr, lo + run);
        int sum = 0;
        for (int le = lo; le < hi; ++le) sum += s_cnt[le];
        int incl = sum;
        for (int d = 1; d < 32; d <<= 1) {
            const int v = __shfl_up_sync(0xffffffffu, incl, d);
            if (tid >= d) incl += v;
        }
        int base = incl - sum;
        for (int le = lo; le < hi; ++le) {
            const int c = s_cnt[le];
            s_cnt[le] = base;
            base += c;
        }
        const int total = __shfl_sync(0xffffffffu, incl, 31);
        if (tid == 0) {
            s_rows_total = total;
            if (blockIdx.x == 0) {
                P.expert_offsets[epr] = total;
                if (total > P.capacity)
                    record_error(P, kErrCapacity, 1, P.rank, static_cast<uint32_t>(total), n);
            }
        }
    }
    __syncthreads();
    for (int i = tid; i < P.world * epr; i += blockDim.x) s_off[i] += s_cnt[i % epr];
    if (blockIdx.x == 0) {
        for (int le = tid; le < epr; le += blockDim.x) {
            P.expert_offsets[le] = s_cnt[le];
            const int next = le + 1 < epr ? s_cnt[le + 1] : s_rows_total;
            P.expert_counts[le] = next - s_cnt[le];
        }
    }
    __syncthreads();
}

// One warp copies part c (of `chunks`) of source s's token t from its receive slot into the
// token's rows of the packed output (part 0 also copies the scales and records the rows).
__device__ void expand_received(const Params& P, const int* s_off, int s, int t, int c,
                                int chunks) {
    constexpr int U = 4;
    const int lane = threadIdx.x & 31;
    const int epr = P.experts_per_rank;
    const int x_vecs = P.x_bytes / 16;
    const int s_words = P.s_bytes / 4;
    const uint8_t* m = P.peers[s].rx_meta + static_cast<size_t>(t) * P.meta_bytes;
    int row = -1;
    if (lane < P.topk) {
        const int le = meta_le(m, lane);
        if (le >= 0 && le < epr) {
            row = s_off[s * epr + le] + meta_pos(m, P.topk, lane);
            if (row >= P.capacity) row = -1;
        }
        if (c == 0)
            P.route_rows[(static_cast<size_t>(s) * P.max_tokens + t) * P.topk + lane] = row;
    }
    const unsigned hit = __ballot_sync(0xffffffffu, row >= 0);
    if (!hit) return;
    const uint8_t* slot = P.peers[s].rx_data + static_cast<size_t>(t) * P.slot_bytes;
    const uint4* src = reinterpret_cast<const uint4*>(slot);
    const int per = (x_vecs + chunks - 1) / chunks;
    // Trip counts are the same in every lane, so the shuffles see the whole warp.
    const int hi = min(x_vecs, (c + 1) * per);
    for (int base = c * per; base < hi; base += 32 * U) {
        uint4 val[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + 32 * u + lane;
            if (v < hi) val[u] = __ldcg(src + v);
        }
        for (unsigned h = hit; h; h &= h - 1) {
            const int r = __shfl_sync(0xffffffffu, row, __ffs(h) - 1);
            uint4* dst = reinterpret_cast<uint4*>(P.out_x + static_cast<size_t>(r) * P.x_bytes);
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = base + 32 * u + lane;
                if (v < hi) dst[v] = val[u];
            }
        }
    }
    if (c != 0) return;
    const uint32_t* ssrc = reinterpret_cast<const uint32_t*>(slot + P.x_bytes);
    for (int base = 0; base < s_words; base += 32) {
        const int v = base + lane;
        const uint32_t val = v < s_words ? __ldcg(ssrc + v) : 0u;
        for (unsigned h = hit; h; h &= h - 1) {
            const int r = __shfl_sync(0xffffffffu, row, __ffs(h) - 1);
            if (v < s_words)
                reinterpret_cast<uint32_t*>(P.out_s + static_cast<size_t>(r) * P.s_bytes)[v] = val;
        }
    }
}

// The counts and dispatch flags of the last block of a send: `cntflag` (the counts are in
// place), then `dflag` (every token too), both `step << 32 | tokens`. One system fence, then
// plain stores: together a release of both, at the cost of one (a release store is a fence
// plus the store, and each costs a round trip at decode sizes). The fence is cumulative, so the
// barrier before it puts the whole block's stores (and what it saw of other blocks) first.
__device__ void store_send_flags(const Params& P, uint64_t n, int ntok, bool counts, bool data) {
    const int tid = threadIdx.x;
    const uint64_t v = (n << 32) | static_cast<uint32_t>(ntok);
    if (tid >= P.world || !(counts || data)) return;
    asm volatile("fence.acq_rel.sys;" ::: "memory");
    if (counts) st_relaxed(P.peers[tid].cntflag, v);
    if (data) st_relaxed(P.peers[tid].dflag, v);
}

// Hands the per-expert counts of this step to every rank and clears the running counts (last
// block only).
__device__ void publish_counts(const Params& P) {
    const int experts = P.world * P.experts_per_rank;
    for (int i = threadIdx.x; i < experts; i += blockDim.x) {
        const int d = i / P.experts_per_rank;
        P.peers[d].ecount[i % P.experts_per_rank] =
            atomicExch(&P.ecount_local[i * kCountStride], 0);
    }
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_dispatch_send(Params P) {
    __shared__ int s_e[kMaxTopk];
    __shared__ float s_w[kMaxTopk];
    __shared__ int s_pos[kMaxTopk];
    __shared__ unsigned long long s_mask;
    __shared__ uint8_t* s_dst[kMaxWorld];
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[0] + 1;
    const int ntok = step_tokens(P, n);
    const int experts = P.world * P.experts_per_rank;
    // Each peer must have read what this rank wrote into its area in the previous step.
    const bool ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 2, 0, 0, n);
    if (tid < P.world) s_dst[tid] = P.peers[tid].data;
    __syncthreads();
    const int x_vecs = P.x_bytes / 16;
    const int s_words = P.s_bytes / 4;
    const int s_off = P.x_bytes;
    for (int t = blockIdx.x; ok && t < ntok; t += gridDim.x) {
        if (tid == 0) s_mask = 0;
        __syncthreads();
        if (tid < P.topk) {
            const int64_t e = expert_of(P, t, tid);
            if (e < 0 || e >= experts) {
                record_error(P, kErrBadExpert, 0, P.rank, static_cast<uint32_t>(t), n);
                s_e[tid] = -1;
                s_pos[tid] = 0;
                s_w[tid] = 0.f;
            } else {
                s_e[tid] = static_cast<int>(e);
                s_w[tid] = P.weights[t * P.w_stride + tid];
                s_pos[tid] = atomicAdd(&P.ecount_local[e * kCountStride], 1);
                atomicOr(&s_mask, 1ull << (e / P.experts_per_rank));
            }
        }
        __syncthreads();
        const uint64_t mask = s_mask;
        // Routing entries go to every rank (all -1 where the token has no expert there).
        for (int i = tid; i < P.world * P.topk; i += blockDim.x) {
            const int d = i / P.topk, k = i % P.topk;
            const int e = s_e[k];
            const int le = (e >= 0 && e / P.experts_per_rank == d) ? e % P.experts_per_rank : -1;
            uint8_t* m = P.peers[d].meta + static_cast<size_t>(t) * P.meta_bytes;
            reinterpret_cast<int32_t*>(m)[k] = le;
            reinterpret_cast<int32_t*>(m)[P.topk + k] = s_pos[k];
            reinterpret_cast<float*>(m)[2 * P.topk + k] = s_w[k];
        }
        // The token itself, read once, stored once per destination rank.
        const uint4* src = reinterpret_cast<const uint4*>(P.x + t * P.x_stride);
        const size_t slot = static_cast<size_t>(t) * P.slot_bytes;
        for (int v = tid; v < x_vecs; v += blockDim.x) {
            const uint4 val = src[v];
            for (uint64_t m = mask; m; m &= m - 1) {
                const int d = __ffsll(static_cast<long long>(m)) - 1;
                reinterpret_cast<uint4*>(s_dst[d] + slot)[v] = val;
            }
        }
        if (P.scales) {
            const uint32_t* ssrc = reinterpret_cast<const uint32_t*>(P.scales + t * P.s_stride);
            for (int v = tid; v < s_words; v += blockDim.x) {
                const uint32_t val = ssrc[v];
                for (uint64_t m = mask; m; m &= m - 1) {
                    const int d = __ffsll(static_cast<long long>(m)) - 1;
                    reinterpret_cast<uint32_t*>(s_dst[d] + slot + s_off)[v] = val;
                }
            }
        }
        if (tid == 0) {
            P.tok_mask[t] = mask;
            // Read by the host proxy after the dispatch flag (the last block's system fence
            // orders this store before the flag).
            if (P.host_mask) P.host_mask[t] = mask;
        }
        __syncthreads();
    }
    if (!last_block(P, 0, true)) return;
    publish_counts(P);
    if (tid == 0) P.st->my_ntok = ok ? ntok : 0;
    // The barrier orders every thread's count stores before the flag stores; a release store
    // is cumulative (a fence plus the store), so no separate system fence is needed here.
    __syncthreads();
    store_send_flags(P, n, ntok, ok, ok);
    finish_phase(P, 0, n);
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_dispatch_recv(Params P) {
    extern __shared__ int s_dyn[];  // off[world * experts_per_rank], cnt[experts_per_rank]
    __shared__ int s_start[kMaxWorld + 1];
    const int tid = threadIdx.x;
    int* s_off = s_dyn;
    int* s_cnt = s_dyn + P.world * P.experts_per_rank;
    const uint64_t n = P.st->seq[1] + 1;
    const bool ok = wait_all_peers(P, &Peer::rx_dflag, n, 32, 1, n);
    if (ok) {
        source_prefix(P, s_start);
        expert_offsets(P, s_off, s_cnt, n);
        // One warp per received token (or part of one): many tokens in flight per SM hide the
        // load latency.
        const int items = s_start[P.world];
        const int warps = blockDim.x / 32;
        const int chunks = chunk_count(items, P.x_bytes / 16, 4);
        for (int w = blockIdx.x * warps + tid / 32; w < items * chunks; w += gridDim.x * warps) {
            const int i = w / chunks;
            const int s = source_of(s_start, P.world, i);
            expand_received(P, s_off, s, i - s_start[s], w % chunks, chunks);
        }
    }
    if (!last_block(P, 1, false)) return;
    if (tid < P.world && ok) st_relaxed(P.peers[tid].rel, 2 * n - 1);
    finish_phase(P, 1, n);
}

// ---- Overlapped dispatch: moe_dispatch_count, then moe_dispatch_fused ----------------------
//
// The split phases above cannot overlap: dispatch_recv starts when the last token of every
// source has landed, and then writes each token once per local expert (at prefill sizes,
// several times the bytes that crossed NVLink). The overlapped form does the same work in two
// launches that `dispatch()` queues back to back:
//
//   moe_dispatch_count  assigns every (token, k) its position in its expert (atomics, as
//                       dispatch_send), writes every rank's routing entries for this rank's
//                       tokens and the tokens' destination masks, hands the per-expert counts
//                       to every rank, then a counts flag. Positions wait in this rank's own
//                       rows of route_rows.
//   moe_dispatch_fused  blocks take roles in the order they start. The first `senders` send
//                       this rank's tokens to the peers, in items of a few chunks in token
//                       order, each item followed by its chunk flags at every peer; they start
//                       at once (they need nothing from the other ranks). Every other block,
//                       and a sender once the items are gone, is a worker: once every rank's
//                       counts arrived it expands the next peer chunk if that has landed (in
//                       chunk order), else a chunk of this rank's own tokens straight from the
//                       input; once those are gone, the peer chunks in order, waiting as
//                       needed.
//
// On sm_90 and newer the host launches moe_dispatch_fused early (programmatic dependent
// launch): its blocks start while moe_dispatch_count still runs, and wait for the counts flag
// that kernel stores last (the senders for this rank's, the workers for every rank's), so the
// launch gap between the two kernels is gone. Nothing in it relies on the counts kernel having
// finished otherwise.
//
// A bounded set of blocks sending in token order makes the peer's chunks land one after
// another from the start, at the link's rate, so their expansion runs alongside the transfer;
// with every block sending (all chunks in flight at once) every chunk would land at the end.
// The expansion of this rank's own tokens never waits and fills the gaps. Each rank moves about
// 11 bytes of HBM per byte it sends at prefill sizes (the expert-major output), so the workers,
// not the link, set the pace once the two overlap.
//
// No block waits for another block of its own grid: senders wait for nothing, and a worker
// waits for another rank's counts (an earlier launch there) and senders (running blocks
// there: roles follow the start order). So whatever blocks are resident keep making progress,
// and the grid need not be resident at once.
//
// Mixing the forms across ranks in one step is safe: both write the routing entries and the
// counts before the counts flag and, once all tokens are out, the dispatch flag; a worker also
// accepts a source's dispatch flag in place of its chunk flag (dispatch_send stores no chunk
// flags).

namespace {

// Chunk flags carry 2n - 1 once a chunk of step n's dispatch landed and 2n once the partial
// sums of a chunk of step n's combine did (the release notices' numbering): the source's
// dispatch of a step precedes its combine, so each flag only grows.
__device__ __forceinline__ bool chunk_landed(const Params& P, int s, int c, uint64_t n) {
    return ld_acquire(P.peers[s].rx_chunk + c) >= 2 * n - 1 ||
           (ld_acquire(P.peers[s].rx_dflag) >> 32) >= n;
}

// Whether source s's chunk c seems to have landed (no ordering: for choosing work only).
__device__ __forceinline__ bool chunk_peek(const Params& P, int s, int c, uint64_t n) {
    return *reinterpret_cast<const volatile uint64_t*>(P.peers[s].rx_chunk + c) >= 2 * n - 1 ||
           (*reinterpret_cast<const volatile uint64_t*>(P.peers[s].rx_dflag) >> 32) >= n;
}

// True once source s's chunk c (or all of its tokens) landed; records a timeout otherwise.
__device__ bool wait_chunk(const Params& P, int s, int c, uint64_t n) {
    const auto done = [&] { return chunk_landed(P, s, c, n); };
    return spin_until(P, done, 1, s, static_cast<uint32_t>(n), n);
}

// Shared memory of one chunk of this rank's tokens.
struct ChunkShared {
    int rows[kThreads];   // per token, its own-rank output rows first (n_rows[i] of them)
    int n_rows[kMaxChunkTokens];
    unsigned long long mask[kMaxChunkTokens];  // per token: peers it goes to (not this rank)
    uint8_t* dst[kMaxWorld];  // each peer's receive slots for this rank (set once per block)
};

// Copies tokens [t0, t0 + cnt) of the input: every 16-byte vector (and scale word) is read
// once and stored at each peer in the token's mask (`to_peers`) or in each of its own rows.
// Each thread keeps U vectors in flight.
template <int U>
__device__ void copy_chunk(const Params& P, const ChunkShared& sc, int t0, int cnt,
                           bool to_peers) {
    const int tid = threadIdx.x;
    const int x_vecs = P.x_bytes / 16;
    const int total = cnt * x_vecs;
    for (int base = tid; base < total; base += blockDim.x * U) {
        uint4 val[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + u * blockDim.x;
            if (v < total) {
                const int j = v / x_vecs;
                const uint4* row = reinterpret_cast<const uint4*>(P.x + (t0 + j) * P.x_stride);
                val[u] = row[v - j * x_vecs];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + u * blockDim.x;
            if (v >= total) continue;
            const int j = v / x_vecs, vv = v - j * x_vecs;
            if (to_peers) {
                const size_t slot = static_cast<size_t>(t0 + j) * P.slot_bytes;
                for (uint64_t m = sc.mask[j]; m; m &= m - 1) {
                    const int d = __ffsll(static_cast<long long>(m)) - 1;
                    reinterpret_cast<uint4*>(sc.dst[d] + slot)[vv] = val[u];
                }
            } else {
                for (int q = 0; q < sc.n_rows[j]; ++q) {
                    const int r = sc.rows[j * P.topk + q];
                    reinterpret_cast<uint4*>(P.out_x + static_cast<size_t>(r) * P.x_bytes)[vv] =
                        val[u];
                }
            }
        }
    }
    if (!P.scales) return;
    const int s_words = P.s_bytes / 4;
    for (int v = tid; v < cnt * s_words; v += blockDim.x) {
        const int j = v / s_words, vv = v - j * s_words;
        const uint32_t* srow = reinterpret_cast<const uint32_t*>(P.scales + (t0 + j) * P.s_stride);
        const uint32_t val = srow[vv];
        if (to_peers) {
            const size_t at = static_cast<size_t>(t0 + j) * P.slot_bytes + P.x_bytes;
            for (uint64_t m = sc.mask[j]; m; m &= m - 1) {
                const int d = __ffsll(static_cast<long long>(m)) - 1;
                reinterpret_cast<uint32_t*>(sc.dst[d] + at)[vv] = val;
            }
        } else {
            for (int q = 0; q < sc.n_rows[j]; ++q) {
                const int r = sc.rows[j * P.topk + q];
                reinterpret_cast<uint32_t*>(P.out_s + static_cast<size_t>(r) * P.s_bytes)[vv] = val;
            }
        }
    }
}

// The ranks token t goes to (bit r: rank r holds one of its experts).
__device__ __forceinline__ uint64_t token_mask(const Params& P, int t) {
    const int experts = P.world * P.experts_per_rank;
    uint64_t mask = 0;
    for (int k = 0; k < P.topk; ++k) {
        const int64_t e = expert_of(P, t, k);
        if (e >= 0 && e < experts) mask |= 1ull << (e / P.experts_per_rank);
    }
    return mask;
}

// Sends tokens [t0, t0 + cnt) of this rank to the peers they go to.
__device__ void send_chunk(const Params& P, ChunkShared& sc, int t0, int cnt) {
    if (static_cast<int>(threadIdx.x) < cnt)
        sc.mask[threadIdx.x] = P.tok_mask[t0 + threadIdx.x] & ~(1ull << P.rank);
    __syncthreads();
    // More loads in flight per thread: only a few blocks send, at the rate their loads and
    // NVLink stores keep in flight.
    copy_chunk<5>(P, sc, t0, cnt, true);
    __syncthreads();
}

// Expands tokens [t0, t0 + cnt) of this rank into its own output rows, and records the rows
// (in place of the positions moe_dispatch_count left there), as dispatch_recv does.
__device__ void expand_own(const Params& P, const int* s_off, ChunkShared& sc, int t0, int cnt) {
    const int tid = threadIdx.x;
    const int topk = P.topk;
    const int epr = P.experts_per_rank;
    int32_t* own_rows = P.route_rows + static_cast<size_t>(P.rank) * P.max_tokens * topk;
    if (tid < cnt * topk) {
        const int t = t0 + tid / topk, k = tid % topk;
        const int64_t e = expert_of(P, t, k);
        const int pos = own_rows[static_cast<size_t>(t) * topk + k];
        int row = -1;
        if (pos >= 0 && e >= 0 && e < P.world * epr && e / epr == P.rank) {
            row = s_off[P.rank * epr + e % epr] + pos;
            if (row >= P.capacity) row = -1;
        }
        own_rows[static_cast<size_t>(t) * topk + k] = row;
        sc.rows[tid] = row;
    }
    __syncthreads();
    if (tid < cnt) {
        // Compact the token's own rows to the front of its run.
        int nr = 0;
        for (int k = 0; k < topk; ++k) {
            const int r = sc.rows[tid * topk + k];
            if (r >= 0) sc.rows[tid * topk + nr++] = r;
        }
        sc.n_rows[tid] = nr;
    }
    __syncthreads();
    copy_chunk<4>(P, sc, t0, cnt, false);
    __syncthreads();
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_dispatch_count(Params P) {
#if __CUDA_ARCH__ >= 900
    // moe_dispatch_fused may start now (launched early, see there): it needs nothing of this
    // kernel's until the counts flags, which it waits for.
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[0] + 1;
    const int ntok = step_tokens(P, n);
    const int epr = P.experts_per_rank;
    const int experts = P.world * epr;
    // The counts and routing entries go into the peers' areas: each must have read the
    // previous step's.
    const bool ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 2, 0, 0, n);
    int32_t* pos = P.route_rows + static_cast<size_t>(P.rank) * P.max_tokens * P.topk;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + tid; ok && i < ntok * P.topk; i += stride) {
        const int t = i / P.topk, k = i % P.topk;
        const int64_t e = expert_of(P, t, k);
        const bool valid = e >= 0 && e < experts;
        int p = -1;
        if (!valid)
            record_error(P, kErrBadExpert, 0, P.rank, static_cast<uint32_t>(t), n);
        else
            p = atomicAdd(&P.ecount_local[e * kCountStride], 1);
        pos[i] = p;
        // Routing entries go to every rank, this one included (the combine reads the weights).
        const float w = valid ? P.weights[t * P.w_stride + k] : 0.f;
        for (int d = 0; d < P.world; ++d) {
            uint8_t* m = P.peers[d].meta + static_cast<size_t>(t) * P.meta_bytes;
            const int le = valid && e / epr == d ? static_cast<int>(e % epr) : -1;
            reinterpret_cast<int32_t*>(m)[k] = le;
            reinterpret_cast<int32_t*>(m)[P.topk + k] = valid ? p : 0;
            reinterpret_cast<float*>(m)[2 * P.topk + k] = w;
        }
        if (k == 0) P.tok_mask[t] = token_mask(P, t);
    }
    if (!last_block(P, 0, true)) return;
    publish_counts(P);
    if (tid == 0) {
        P.st->my_ntok = ok ? ntok : 0;
        P.st->done[0] = 0;  // the step advances when moe_dispatch_fused ends
    }
    __syncthreads();
    // Without tokens there is nothing to send: the dispatch flag goes out with the counts.
    store_send_flags(P, n, ntok, ok, ok && ntok == 0);
}

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_dispatch_fused(Params P) {
    extern __shared__ int s_dyn[];  // off[world * experts_per_rank], cnt[experts_per_rank]
    __shared__ ChunkShared sc;
    __shared__ int s_ntok[kMaxWorld];
    __shared__ int s_item;
    __shared__ int s_flag;
    __shared__ int s_own_counts;
    constexpr int kDone = -1;
    constexpr int kOwn = 1 << 30;  // s_item >= kOwn: own chunk s_item - kOwn
    const int tid = threadIdx.x;
    int* s_off = s_dyn;
    int* s_cnt = s_dyn + P.world * P.experts_per_rank;
    State* st = P.st;
    const uint64_t n = st->seq[1] + 1;
    // Read once: the send loop stores through these for every vector.
    if (tid < P.world) sc.dst[tid] = P.peers[tid].data;
    if (tid == 0) s_flag = atomicAdd(&st->arrive, 1u) < static_cast<uint32_t>(P.senders);
    __syncthreads();
    const bool sender = s_flag != 0;
    const int ntok = step_tokens(P, n);
    const int ch = P.chunk_tokens;
    const int own_chunks = (ntok + ch - 1) / ch;

    // Senders: items of `group` chunks in token order (about 128 KiB of tokens each, so the
    // fence before the flags is paid once per item, not per chunk). They start once this
    // rank's counts flag is out: moe_dispatch_count has then waited until every peer had read
    // what this rank sent last step, and written the tokens' masks. Sending needs nothing from
    // the other ranks. (Sending alongside the counts kernel instead was slower at prefill
    // sizes: the workers set the pace, and they wait for the counts.)
    const int group = max(1, min(64, (128 << 10) / max(1, ch * P.slot_bytes)));
    const int send_items = (own_chunks + group - 1) / group;
    if (sender && tid == 0)
        s_own_counts = wait_at_least(P, P.peers[P.rank].rx_cntflag, n, 32, 1, P.rank, n);
    __syncthreads();
    const bool send_ok = sender && s_own_counts != 0;
    while (send_ok) {
        if (tid == 0) s_item = static_cast<int>(atomicAdd(&st->send_next, 1u));
        __syncthreads();
        const int g = s_item;
        __syncthreads();
        if (g >= send_items) break;
        const int c_end = min(own_chunks, (g + 1) * group);
        for (int c = g * group; c < c_end; ++c) send_chunk(P, sc, c * ch, min(ch, ntok - c * ch));
        if (tid == 0) {
            // Fences are cumulative: the barrier in send_chunk put every thread's stores
            // before this one, so the chunk flags (and, from the last item, the dispatch
            // flag) cover them.
            __threadfence_system();
            for (int d = 0; d < P.world; ++d)
                if (d != P.rank)
                    for (int c = g * group; c < c_end; ++c)
                        st_relaxed(P.peers[d].chunk + c, 2 * n - 1);
            s_flag = atomicAdd(&st->sent, 1u) == static_cast<uint32_t>(send_items - 1);
            if (s_flag) __threadfence_system();
        }
        __syncthreads();
        if (s_flag) store_send_flags(P, n, ntok, false, true);
    }

    // Workers: once every rank's counts arrived, the next peer chunk if it has landed, else a
    // chunk of own tokens; once those are gone, the peer chunks in order, waiting as needed.
    // Items are claimed with one atomic add (a compare-and-swap on a peeked value would let a
    // single block through per round of peeks); chunks land about in order, so the one
    // claimed after a peek at a landed chunk has usually landed too. Every thread must reach
    // the barrier inside the wait (no short-circuit on a per-thread read); the wait itself
    // gives up at once when another wait of this rank already timed out.
    bool ok = wait_all_peers(P, &Peer::rx_cntflag, n, 32, 1, n);
    if (ok) {
        if (tid < P.world)
            s_ntok[tid] = static_cast<int>(ld_acquire(P.peers[tid].rx_cntflag) & 0xffffffffu);
        expert_offsets(P, s_off, s_cnt, n);
    }
    const int warps = blockDim.x / 32;
    const int peers = P.world - 1;
    int recv_chunks = 0;
    for (int s = 0; ok && s < P.world; ++s)
        if (s != P.rank) recv_chunks = max(recv_chunks, (s_ntok[s] + ch - 1) / ch);
    // Receive item q: chunk q / peers of the (q % peers)-th peer.
    const int recv_total = recv_chunks * peers;
    const auto source = [&](int q) {
        const int r = q % peers;
        return r + (r >= P.rank ? 1 : 0);
    };
    while (ok) {
        if (tid == 0) {
            int item = kDone;
            const int q = static_cast<int>(*reinterpret_cast<volatile uint32_t*>(&st->recv_next));
            bool take_recv = q < recv_total;
            if (take_recv) {
                const int s = source(q), c = q / peers;
                // A chunk past the source's tokens is empty: take it to skip it.
                take_recv = c * ch >= s_ntok[s] || chunk_peek(P, s, c, n);
            }
            if (!take_recv) {
                const int o = static_cast<int>(atomicAdd(&st->own_next, 1u));
                if (o < own_chunks) item = kOwn + o;
            }
            if (item == kDone) {
                const int q2 = static_cast<int>(atomicAdd(&st->recv_next, 1u));
                if (q2 < recv_total) item = q2;
            }
            s_item = item;
        }
        __syncthreads();
        const int item = s_item;
        __syncthreads();
        if (item == kDone) break;
        if (item >= kOwn) {
            const int t0 = (item - kOwn) * ch;
            expand_own(P, s_off, sc, t0, min(ch, ntok - t0));
            continue;
        }
        const int s = source(item), c = item / peers;
        if (c * ch >= s_ntok[s]) continue;
        if (tid == 0) s_flag = wait_chunk(P, s, c, n);
        __syncthreads();
        if (!s_flag) {
            ok = false;
            break;
        }
        const int t0 = c * ch, cnt = min(ch, s_ntok[s] - t0);
        const int parts = max(1, warps / cnt);
        for (int w = tid / 32; w < cnt * parts; w += warps)
            expand_received(P, s_off, s, t0 + w % cnt, w / cnt, parts);
    }
    if (!last_block(P, 1, false)) return;
    if (tid < P.world && !timed_out_elsewhere(P)) st_relaxed(P.peers[tid].rel, 2 * n - 1);
    if (tid == 0) reset_roles(st);
    finish_phase(P, 0, n);
    finish_phase(P, 1, n);
}

namespace {

template <typename T>
struct Vec;  // 16 bytes of T, converted to and from float

// The two 16-bit float types differ only in their pair conversions.
struct Bf16Pair {
    using T = __nv_bfloat162;
    __device__ static float2 to_float(T v) { return __bfloat1622float2(v); }
    __device__ static T from_float(float a, float b) { return __floats2bfloat162_rn(a, b); }
};

struct HalfPair {
    using T = __half2;
    __device__ static float2 to_float(T v) { return __half22float2(v); }
    __device__ static T from_float(float a, float b) { return __floats2half2_rn(a, b); }
};

template <typename Pair>
struct PairVec {
    static constexpr int N = 8;
    __device__ static void load(const uint4& v, float* f) {
        const typename Pair::T* h = reinterpret_cast<const typename Pair::T*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) {
            const float2 p = Pair::to_float(h[i]);
            f[2 * i] = p.x;
            f[2 * i + 1] = p.y;
        }
    }
    __device__ static uint4 store(const float* f) {
        uint4 v;
        typename Pair::T* h = reinterpret_cast<typename Pair::T*>(&v);
#pragma unroll
        for (int i = 0; i < 4; ++i) h[i] = Pair::from_float(f[2 * i], f[2 * i + 1]);
        return v;
    }
};

template <>
struct Vec<__nv_bfloat16> : PairVec<Bf16Pair> {};

template <>
struct Vec<__half> : PairVec<HalfPair> {};

template <>
struct Vec<float> {
    static constexpr int N = 4;
    __device__ static void load(const uint4& v, float* f) {
        f[0] = __uint_as_float(v.x);
        f[1] = __uint_as_float(v.y);
        f[2] = __uint_as_float(v.z);
        f[3] = __uint_as_float(v.w);
    }
    __device__ static uint4 store(const float* f) {
        return make_uint4(__float_as_uint(f[0]), __float_as_uint(f[1]), __float_as_uint(f[2]),
                          __float_as_uint(f[3]));
    }
};

// 16-byte vectors each lane of sum_token keeps in flight: two, so that the sums of 16-bit
// types fit the 64 registers of four blocks per SM without spilling (four spilled there).
constexpr int kSumUnroll = 2;

// One warp's part c (of `chunks`) of one token's combine: the weighted sum of the rows that
// hold source s's token t on this rank (s < 0: none), plus the slot of token t from each rank
// in `add` (their partial sums for this rank's token t), plus what `dst` holds with
// `accumulate`; stored to `dst` (the row's 16-byte vectors). Without `always`, a token with no
// row here is skipped (nothing stored). R (1 or 2): rows loaded at a time. Two keep twice the
// loads in flight but spill a little at the 64-register cap; in moe_combine_fused that still
// won (prefill on 2 H100s: 284 against 294 us), the split kernels keep one (no spills).
template <typename T, int R = 1>
__device__ void sum_token(const Params& P, int s, int t, int c, int chunks, uint64_t add,
                          bool accumulate, bool always, uint4* dst) {
    constexpr int N = Vec<T>::N;
    constexpr int U = kSumUnroll;
    const int lane = threadIdx.x & 31;
    int row = -1;
    float w = 0.f;
    if (s >= 0 && lane < P.topk) {
        row = P.route_rows[(static_cast<size_t>(s) * P.max_tokens + t) * P.topk + lane];
        w = meta_w(P.peers[s].rx_meta + static_cast<size_t>(t) * P.meta_bytes, P.topk, lane);
    }
    const unsigned hit = __ballot_sync(0xffffffffu, row >= 0);
    if (!hit && !always) return;
    const int vecs = P.hidden / N;
    const size_t slot = static_cast<size_t>(t) * P.slot_bytes;
    const int per = (vecs + chunks - 1) / chunks;
    // Trip counts are the same in every lane, so the shuffles see the whole warp.
    const int hi = min(vecs, (c + 1) * per);
    for (int base = c * per; base < hi; base += 32 * U) {
        float acc[U][N];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + 32 * u + lane;
            if (accumulate && v < hi) {
                Vec<T>::load(dst[v], acc[u]);
            } else {
#pragma unroll
                for (int j = 0; j < N; ++j) acc[u][j] = 0.f;
            }
        }
        for (unsigned h = hit; R == 1 && h; h &= h - 1) {
            const int src_lane = __ffs(h) - 1;
            const int r = __shfl_sync(0xffffffffu, row, src_lane);
            const float wk = __shfl_sync(0xffffffffu, w, src_lane);
            const uint4* y =
                reinterpret_cast<const uint4*>(P.y + static_cast<size_t>(r) * P.y_stride);
            uint4 raw[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = base + 32 * u + lane;
                if (v < hi) raw[u] = y[v];
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float f[N];
                Vec<T>::load(raw[u], f);
#pragma unroll
                for (int j = 0; j < N; ++j) acc[u][j] = fmaf(wk, f[j], acc[u][j]);
            }
        }
        // Two rows at a time (R == 2): twice the loads in flight for the registers of two
        // more vectors (more vectors per lane would need more accumulators).
        for (unsigned h = R == 2 ? hit : 0u; h;) {
            const int l0 = __ffs(h) - 1;
            h &= h - 1;
            const int l1 = h ? __ffs(h) - 1 : l0;
            const bool two = h != 0;
            h &= h - 1;
            const uint4* y0 = reinterpret_cast<const uint4*>(
                P.y + static_cast<size_t>(__shfl_sync(0xffffffffu, row, l0)) * P.y_stride);
            const uint4* y1 = reinterpret_cast<const uint4*>(
                P.y + static_cast<size_t>(__shfl_sync(0xffffffffu, row, l1)) * P.y_stride);
            const float w0 = __shfl_sync(0xffffffffu, w, l0);
            const float w1 = __shfl_sync(0xffffffffu, w, l1);
            uint4 raw0[U], raw1[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = base + 32 * u + lane;
                if (v < hi) {
                    raw0[u] = y0[v];
                    if (two) raw1[u] = y1[v];
                }
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float f[N];
                Vec<T>::load(raw0[u], f);
#pragma unroll
                for (int j = 0; j < N; ++j) acc[u][j] = fmaf(w0, f[j], acc[u][j]);
                if (two) {
                    Vec<T>::load(raw1[u], f);
#pragma unroll
                    for (int j = 0; j < N; ++j) acc[u][j] = fmaf(w1, f[j], acc[u][j]);
                }
            }
        }
        for (uint64_t mk = add; mk; mk &= mk - 1) {
            const int d = __ffsll(static_cast<long long>(mk)) - 1;
            const uint4* src = reinterpret_cast<const uint4*>(P.peers[d].rx_data + slot);
            uint4 raw[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int v = base + 32 * u + lane;
                if (v < hi) raw[u] = __ldcg(src + v);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                float f[N];
                Vec<T>::load(raw[u], f);
#pragma unroll
                for (int j = 0; j < N; ++j) acc[u][j] += f[j];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + 32 * u + lane;
            if (v < hi) dst[v] = Vec<T>::store(acc[u]);
        }
    }
}

template <typename T>
__device__ void combine_send(const Params& P) {
    __shared__ int s_start[kMaxWorld + 1];
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[2] + 1;
    // Each source must have finished reading its receive area (its dispatch_recv of step n).
    const bool ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 1, 0, 2, n);
    if (ok) {
        source_prefix(P, s_start);
        const int items = s_start[P.world];
        int most = 0;
        for (int s = 0; s < P.world; ++s) most = max(most, s_start[s + 1] - s_start[s]);
        const int warps = blockDim.x / 32;
        const int chunks = chunk_count(items, P.hidden / Vec<T>::N, kSumUnroll);
        // Sources interleaved (token t of every source, then t + 1): at any moment some warps
        // write peers over NVLink while others write this rank's own slots, so the NVLink
        // stores and the HBM traffic of the weighted sums overlap instead of taking turns.
        for (int wi = blockIdx.x * warps + tid / 32; wi < P.world * most * chunks;
             wi += gridDim.x * warps) {
            const int i = wi / chunks, c = wi % chunks;
            const int s = i % P.world, t = i / P.world;
            if (t >= s_start[s + 1] - s_start[s]) continue;
            uint4* dst =
                reinterpret_cast<uint4*>(P.peers[s].data + static_cast<size_t>(t) * P.slot_bytes);
            sum_token<T>(P, s, t, c, chunks, 0, false, false, dst);
        }
    }
    if (!last_block(P, 2, true)) return;
    if (tid < P.world && ok) st_release(P.peers[tid].cflag, n);
    finish_phase(P, 2, n);
}

template <typename T>
__device__ void combine_recv(const Params& P) {
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[3] + 1;
    const bool ok = wait_all_peers(P, &Peer::rx_cflag, n, 0, 3, n);
    if (ok) {
        const int ntok = P.st->my_ntok;
        const int warps = blockDim.x / 32;
        const int chunks = chunk_count(ntok, P.hidden / Vec<T>::N, kSumUnroll);
        for (int wi = blockIdx.x * warps + tid / 32; wi < ntok * chunks;
             wi += gridDim.x * warps) {
            const int t = wi / chunks;
            uint4* dst = reinterpret_cast<uint4*>(P.out + static_cast<size_t>(t) * P.out_stride);
            sum_token<T>(P, -1, t, wi % chunks, chunks, P.tok_mask[t], P.accumulate, true, dst);
        }
    }
    if (!last_block(P, 3, false)) return;
    if (tid < P.world && ok) st_relaxed(P.peers[tid].rel, 2 * n);
    finish_phase(P, 3, n);
}

// ---- Overlapped combine: moe_combine_fused ---------------------------------------------
//
// combine_send then combine_recv in one launch, with this rank's own tokens summed while the
// peers' partial sums are still arriving. Blocks take roles in the order they start, as in
// moe_dispatch_fused. The first `senders` sum the tokens each peer sent here (in items of a
// few chunks of the peer's tokens, peers interleaved, in token order) into that peer's receive
// slots, each item followed by its chunk flags there. Every other block, and a sender once the
// items are gone, takes this rank's own tokens chunk by chunk: it waits for every peer's partial
// sums of the chunk, then adds this rank's own weighted sum, the peers' sums (and the output
// with `accumulate`) and stores the result. This rank's own partial sums never go through
// memory (combine_send writes them into its own slots and combine_recv reads them back), and
// the summing overlaps the transfer.
//
// As in moe_dispatch_fused, no block waits for its own grid: senders wait only for the peers'
// release notices (their dispatch finished reading), workers for the peers' senders (blocks
// that started there). A worker also accepts a peer's combine flag in place of its chunk flags,
// so ranks may mix the two forms in one step (the senders' last item stores the combine flag,
// which combine_recv waits for).

// True once peer s's partial sums of this rank's chunk c of step n (or all of them) landed.
__device__ bool wait_sums(const Params& P, int s, int c, uint64_t n) {
    const auto done = [&] {
        return ld_acquire(P.peers[s].rx_chunk + c) >= 2 * n ||
               ld_acquire(P.peers[s].rx_cflag) >= n;
    };
    return spin_until(P, done, 3, s, static_cast<uint32_t>(c), n);
}

template <typename T>
__device__ void combine_fused(const Params& P) {
    __shared__ int s_ntok[kMaxWorld];
    __shared__ int s_item;
    __shared__ int s_flag;
    const int tid = threadIdx.x;
    State* st = P.st;
    const uint64_t n = st->seq[2] + 1;
    if (tid == 0) s_flag = atomicAdd(&st->arrive, 1u) < static_cast<uint32_t>(P.senders);
    // Tokens each source dispatched this step (the same counts flag combine_send reads).
    if (tid < P.world)
        s_ntok[tid] = static_cast<int>(ld_acquire(P.peers[tid].rx_cntflag) & 0xffffffffu);
    __syncthreads();
    const bool sender = s_flag != 0;
    const int ch = P.chunk_tokens;
    const int warps = blockDim.x / 32;
    const int peers = P.world - 1;
    int most = 0;
    for (int s = 0; s < P.world; ++s)
        if (s != P.rank) most = max(most, (s_ntok[s] + ch - 1) / ch);
    // Items of about 128 KiB of partial sums (one fence per item), but enough of them for
    // every sender at decode sizes.
    const int row_bytes = P.hidden * static_cast<int>(sizeof(T));
    int group = max(1, min(64, (128 << 10) / max(1, ch * row_bytes)));
    group = min(group, max(1, (most * peers + P.senders - 1) / P.senders));
    const int send_items = (most + group - 1) / group * peers;
    bool ok = true;
    if (sender) ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 1, 0, 2, n);
    const int ntok = st->my_ntok;
    const int own_chunks = (ntok + ch - 1) / ch;
    // Send item g: chunks [c0, c0 + group) of the (g % peers)-th peer's tokens, summed into its
    // slots. Own item c: chunk c of this rank's tokens, once every peer's sums of it landed.
    // One loop and one sum_token for both (two inlined copies would spill).
    bool sending = sender;
    while (ok) {
        if (tid == 0) {
            int item = sending ? static_cast<int>(atomicAdd(&st->send_next, 1u)) : send_items;
            if (item >= send_items) {
                const int c = static_cast<int>(atomicAdd(&st->own_next, 1u));
                item = c < own_chunks ? send_items + c : -1;
                for (int d = 0; item >= 0 && d < P.world && ok; ++d)
                    if (d != P.rank) ok = wait_sums(P, d, c, n);
            }
            s_item = ok ? item : -1;
        }
        __syncthreads();
        const int item = s_item;
        __syncthreads();
        if (item < 0) break;
        const bool own = item >= send_items;
        sending = !own;
        int s = P.rank, c0 = item - send_items, c_end = c0 + 1;
        if (!own) {
            const int r = item % peers;
            s = r + (r >= P.rank ? 1 : 0);
            c0 = item / peers * group;
            c_end = min((s_ntok[s] + ch - 1) / ch, c0 + group);
        }
        const int t0 = c0 * ch, cnt = min(own ? ntok : s_ntok[s], c_end * ch) - t0;
        uint8_t* base = own ? P.out : P.peers[s].data;
        const size_t stride = own ? P.out_stride : P.slot_bytes;
        const int parts = max(1, warps / max(1, cnt));
        for (int w = tid / 32; w < cnt * parts; w += warps) {
            const int t = t0 + w % cnt;
            const uint64_t add = own ? P.tok_mask[t] & ~(1ull << P.rank) : 0;
            uint4* dst = reinterpret_cast<uint4*>(base + static_cast<size_t>(t) * stride);
            sum_token<T, 2>(P, s, t, w / cnt, parts, add, own && P.accumulate, own, dst);
        }
        if (own) continue;
        __syncthreads();
        if (tid == 0) {
            // Cumulative fence: the barrier put every thread's stores before it.
            __threadfence_system();
            for (int c = c0; c < c_end; ++c) st_relaxed(P.peers[s].chunk + c, 2 * n);
            s_flag = atomicAdd(&st->sent, 1u) == static_cast<uint32_t>(send_items - 1);
            if (s_flag) __threadfence_system();
        }
        __syncthreads();
        // The last item: every sender's stores are fenced (each fenced before counting its
        // item), so the combine flag covers them all.
        if (s_flag && tid < P.world) st_release(P.peers[tid].cflag, n);
    }
    if (!last_block(P, 3, false)) return;
    if (tid < P.world && !timed_out_elsewhere(P)) {
        // Without send items (no peer sent tokens) no sender stored the combine flag.
        if (send_items == 0) st_release(P.peers[tid].cflag, n);
        st_relaxed(P.peers[tid].rel, 2 * n);
    }
    if (tid == 0) reset_roles(st);
    finish_phase(P, 2, n);
    finish_phase(P, 3, n);
}

}  // namespace

#define STOLON_COMBINE(SUFFIX, TYPE)                                                       \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)                    \
        moe_combine_send_##SUFFIX(Params P) {                                             \
        combine_send<TYPE>(P);                                                            \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)                    \
        moe_combine_recv_##SUFFIX(Params P) {                                             \
        combine_recv<TYPE>(P);                                                            \
    }                                                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks)                    \
        moe_combine_fused_##SUFFIX(Params P) {                                            \
        combine_fused<TYPE>(P);                                                           \
    }

STOLON_COMBINE(bf16, __nv_bfloat16)
STOLON_COMBINE(f16, __half)
STOLON_COMBINE(f32, float)
