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
    uint32_t ticket;   // next work item of the running moe_dispatch_fused
    uint32_t sent;     // its send items finished
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
    int32_t* ecount_local;   // [num_experts] running counts during dispatch_send
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
    int32_t lag;             // chunks a receive item trails the send items (overlapped dispatch)
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

// Spins until (*p >> shift) >= target. False (and an error recorded) after the deadline, or at
// once when another wait of this rank already timed out.
__device__ bool wait_at_least(const Params& P, const uint64_t* p, uint64_t target, int shift,
                              uint32_t phase, uint32_t peer, uint64_t step) {
    if ((ld_acquire(p) >> shift) >= target) return true;
    const uint64_t start = now_ns();
    uint64_t next_check = start + 20000;
    while ((ld_acquire(p) >> shift) < target) {
        const uint64_t t = now_ns();
        if (t >= next_check) {
            if (timed_out_elsewhere(P)) return false;
            if (t - start > P.timeout_ns) {
                record_error(P, kErrTimeout, phase, peer, static_cast<uint32_t>(target), step);
                return false;
            }
            next_check = t + 20000;
        }
    }
    return true;
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
        P.peers[d].ecount[i % P.experts_per_rank] = atomicExch(&P.ecount_local[i], 0);
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
                s_pos[tid] = atomicAdd(&P.ecount_local[e], 1);
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
//                       dispatch_send), hands the per-expert counts to every rank, then a
//                       counts flag. Positions wait in this rank's own rows of route_rows.
//   moe_dispatch_fused  once every rank's counts arrived, each block takes work items from a
//                       ticket counter: a send item writes a chunk of this rank's tokens to
//                       the peers (NVLink stores drain while the block goes on), expands the
//                       same values straight into this rank's own output rows, and stores the
//                       chunk's flag at each peer; a receive item waits for one peer chunk's
//                       flag and expands those tokens. Receive items trail the send items by
//                       `lag` chunks, so by the time one is taken its chunk has usually landed.
//
// No block waits for another block of its own grid: a receive item waits for a send item of
// another rank that has an earlier ticket there (tickets are handed out in the same order on
// every rank), so whatever blocks are resident keep making progress, and the grid does not
// need all of its blocks resident at once.
//
// Mixing the forms across ranks in one step is safe: both store the counts flag and, once all
// tokens are out, the dispatch flag; a receive item also accepts a source's dispatch flag in
// place of its chunk flag (dispatch_send stores no chunk flags).

namespace {

// True once source s's chunk c (or all of its tokens) landed; records a timeout otherwise.
__device__ bool wait_chunk(const Params& P, int s, int c, uint64_t n) {
    const uint64_t* chunk = P.peers[s].rx_chunk + c;
    const uint64_t* dflag = P.peers[s].rx_dflag;
    const auto landed = [&] { return ld_acquire(chunk) >= n || (ld_acquire(dflag) >> 32) >= n; };
    if (landed()) return true;
    const uint64_t start = now_ns();
    uint64_t next_check = start + 20000;
    while (!landed()) {
        const uint64_t t = now_ns();
        if (t >= next_check) {
            if (timed_out_elsewhere(P)) return false;
            if (t - start > P.timeout_ns) {
                record_error(P, kErrTimeout, 1, s, static_cast<uint32_t>(n), n);
                return false;
            }
            next_check = t + 20000;
        }
    }
    return true;
}

// Shared memory of one send item: the routing of up to kThreads (token, k) pairs.
struct SendChunk {
    int e[kThreads];      // expert, or -1
    int pos[kThreads];    // position in the expert (from moe_dispatch_count)
    float w[kThreads];
    int rows[kThreads];   // per token, its own-rank output rows first (n_rows[i] of them)
    int n_rows[kMaxChunkTokens];
    unsigned long long mask[kMaxChunkTokens];  // per token: peers it goes to (not this rank)
    uint8_t* dst[kMaxWorld];  // each peer's receive slots for this rank (set once per block)
};

// Sends tokens [t0, t0 + cnt) of this rank to their peers and expands them into this rank's
// own output rows.
__device__ void send_chunk(const Params& P, const int* s_off, SendChunk& sc, int t0, int cnt) {
    constexpr int U = 4;
    const int tid = threadIdx.x;
    const int topk = P.topk;
    const int epr = P.experts_per_rank;
    const int experts = P.world * epr;
    int32_t* own_rows = P.route_rows + static_cast<size_t>(P.rank) * P.max_tokens * topk;
    if (tid < cnt * topk) {
        const int t = t0 + tid / topk, k = tid % topk;
        const int64_t e = expert_of(P, t, k);
        const int pos = own_rows[static_cast<size_t>(t) * topk + k];
        const bool valid = e >= 0 && e < experts && pos >= 0;
        sc.e[tid] = valid ? static_cast<int>(e) : -1;
        sc.pos[tid] = valid ? pos : 0;
        sc.w[tid] = valid ? P.weights[t * P.w_stride + k] : 0.f;
        int row = -1;
        if (valid && e / epr == P.rank) {
            row = s_off[P.rank * epr + e % epr] + pos;
            if (row >= P.capacity) row = -1;
        }
        // The position is replaced by the row, as dispatch_recv records it for the combine.
        own_rows[static_cast<size_t>(t) * topk + k] = row;
        sc.rows[tid] = row;
    }
    if (tid < cnt) sc.mask[tid] = P.tok_mask[t0 + tid] & ~(1ull << P.rank);
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
    // Routing entries go to every rank, this one included (the combine reads the weights).
    for (int i = tid; i < cnt * P.world * topk; i += blockDim.x) {
        const int j = i / (P.world * topk), r = i % (P.world * topk);
        const int d = r / topk, k = r % topk;
        const int e = sc.e[j * topk + k];
        const int le = (e >= 0 && e / epr == d) ? e % epr : -1;
        uint8_t* m = P.peers[d].meta + static_cast<size_t>(t0 + j) * P.meta_bytes;
        reinterpret_cast<int32_t*>(m)[k] = le;
        reinterpret_cast<int32_t*>(m)[topk + k] = sc.pos[j * topk + k];
        reinterpret_cast<float*>(m)[2 * topk + k] = sc.w[j * topk + k];
    }
    __syncthreads();
    // The tokens: each 16-byte vector read once, stored at every peer and in every own row.
    const int x_vecs = P.x_bytes / 16;
    const int total = cnt * x_vecs;
    for (int base = tid; base < total; base += blockDim.x * U) {
        uint4 val[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + u * blockDim.x;
            if (v < total) {
                const int j = v / x_vecs;
                val[u] = reinterpret_cast<const uint4*>(P.x + (t0 + j) * P.x_stride)[v - j * x_vecs];
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int v = base + u * blockDim.x;
            if (v >= total) continue;
            const int j = v / x_vecs, vv = v - j * x_vecs;
            const size_t slot = static_cast<size_t>(t0 + j) * P.slot_bytes;
            for (uint64_t m = sc.mask[j]; m; m &= m - 1) {
                const int d = __ffsll(static_cast<long long>(m)) - 1;
                reinterpret_cast<uint4*>(sc.dst[d] + slot)[vv] = val[u];
            }
            for (int q = 0; q < sc.n_rows[j]; ++q) {
                const int r = sc.rows[j * topk + q];
                reinterpret_cast<uint4*>(P.out_x + static_cast<size_t>(r) * P.x_bytes)[vv] = val[u];
            }
        }
    }
    if (P.scales) {
        const int s_words = P.s_bytes / 4;
        for (int v = tid; v < cnt * s_words; v += blockDim.x) {
            const int j = v / s_words, vv = v - j * s_words;
            const uint32_t val =
                reinterpret_cast<const uint32_t*>(P.scales + (t0 + j) * P.s_stride)[vv];
            const size_t at = static_cast<size_t>(t0 + j) * P.slot_bytes + P.x_bytes;
            for (uint64_t m = sc.mask[j]; m; m &= m - 1) {
                const int d = __ffsll(static_cast<long long>(m)) - 1;
                reinterpret_cast<uint32_t*>(sc.dst[d] + at)[vv] = val;
            }
            for (int q = 0; q < sc.n_rows[j]; ++q) {
                const int r = sc.rows[j * topk + q];
                reinterpret_cast<uint32_t*>(P.out_s + static_cast<size_t>(r) * P.s_bytes)[vv] = val;
            }
        }
    }
    __syncthreads();
}

}  // namespace

extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_dispatch_count(Params P) {
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[0] + 1;
    const int ntok = step_tokens(P, n);
    const int experts = P.world * P.experts_per_rank;
    // The counts go into the peers' areas: each must have read the previous step's.
    const bool ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 2, 0, 0, n);
    int32_t* pos = P.route_rows + static_cast<size_t>(P.rank) * P.max_tokens * P.topk;
    const int stride = gridDim.x * blockDim.x;
    for (int i = blockIdx.x * blockDim.x + tid; ok && i < ntok * P.topk; i += stride) {
        const int t = i / P.topk, k = i % P.topk;
        const int64_t e = expert_of(P, t, k);
        if (e < 0 || e >= experts) {
            record_error(P, kErrBadExpert, 0, P.rank, static_cast<uint32_t>(t), n);
            pos[i] = -1;
        } else {
            pos[i] = atomicAdd(&P.ecount_local[e], 1);
        }
    }
    for (int t = blockIdx.x * blockDim.x + tid; ok && t < ntok; t += stride) {
        uint64_t mask = 0;
        for (int k = 0; k < P.topk; ++k) {
            const int64_t e = expert_of(P, t, k);
            if (e >= 0 && e < experts) mask |= 1ull << (e / P.experts_per_rank);
        }
        P.tok_mask[t] = mask;
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
    __shared__ SendChunk sc;
    __shared__ int s_ntok[kMaxWorld];
    __shared__ int s_item;
    __shared__ int s_ok;
    const int tid = threadIdx.x;
    int* s_off = s_dyn;
    int* s_cnt = s_dyn + P.world * P.experts_per_rank;
    const uint64_t n = P.st->seq[1] + 1;
    // Read once: the send loop stores through these for every vector (the barrier in
    // wait_all_peers publishes them).
    if (tid < P.world) sc.dst[tid] = P.peers[tid].data;
    // Every thread must reach the barrier inside (no short-circuit on a per-thread read); the
    // wait itself gives up at once when another wait of this rank already timed out.
    bool ok = wait_all_peers(P, &Peer::rx_cntflag, n, 32, 1, n);
    if (ok) {
        if (tid < P.world)
            s_ntok[tid] = static_cast<int>(ld_acquire(P.peers[tid].rx_cntflag) & 0xffffffffu);
        expert_offsets(P, s_off, s_cnt, n);
    }
    const int ntok = P.st->my_ntok;
    const int ch = P.chunk_tokens;
    const int warps = blockDim.x / 32;
    const int send_chunks = (ntok + ch - 1) / ch;
    int recv_chunks = 0;
    for (int s = 0; ok && s < P.world; ++s)
        if (s != P.rank) recv_chunks = max(recv_chunks, (s_ntok[s] + ch - 1) / ch);
    // Ticket j: group g = j / world; its first item sends chunk g, the others receive chunk
    // g - lag from each peer.
    const int lag = P.world > 1 ? P.lag : 0;
    const int groups = max(send_chunks, recv_chunks + lag);
    const int total = ok ? groups * P.world : 0;
    for (;;) {
        if (tid == 0) s_item = static_cast<int>(atomicAdd(&P.st->ticket, 1u));
        __syncthreads();
        const int j = s_item;
        __syncthreads();
        if (j >= total) break;
        const int g = j / P.world, r = j % P.world;
        if (r == 0) {
            if (g >= send_chunks) continue;
            const int t0 = g * ch;
            send_chunk(P, s_off, sc, t0, min(ch, ntok - t0));
            if (tid == 0) {
                // Fences are cumulative: the barrier in send_chunk put every thread's stores
                // before this one, so the chunk flag (and, from the last chunk, the dispatch
                // flag) covers them.
                __threadfence_system();
                for (int d = 0; d < P.world; ++d)
                    if (d != P.rank) st_release(P.peers[d].chunk + g, n);
                if (atomicAdd(&P.st->sent, 1u) == static_cast<uint32_t>(send_chunks - 1)) {
                    __threadfence_system();
                    s_ok = 1;
                } else {
                    s_ok = 0;
                }
            }
            __syncthreads();
            if (s_ok) store_send_flags(P, n, ntok, false, true);
            continue;
        }
        const int s = r - 1 + (r - 1 >= P.rank ? 1 : 0);
        const int c = g - lag;
        if (c < 0 || c * ch >= s_ntok[s]) continue;
        if (tid == 0) s_ok = wait_chunk(P, s, c, n);
        __syncthreads();
        if (!s_ok) {
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
    if (tid == 0) {
        P.st->ticket = 0;
        P.st->sent = 0;
    }
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

template <typename T>
__device__ void combine_send(const Params& P) {
    __shared__ int s_start[kMaxWorld + 1];
    constexpr int N = Vec<T>::N;
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[2] + 1;
    // Each source must have finished reading its receive area (its dispatch_recv of step n).
    const bool ok = wait_all_peers(P, &Peer::rel_in, 2 * n - 1, 0, 2, n);
    if (ok) {
        source_prefix(P, s_start);
        const int items = s_start[P.world];
        int most = 0;
        for (int s = 0; s < P.world; ++s) most = max(most, s_start[s + 1] - s_start[s]);
        const int vecs = P.hidden / N;
        const int lane = tid & 31;
        const int warps = blockDim.x / 32;
        constexpr int U = 4;
        const int chunks = chunk_count(items, vecs, U);
        const int per = (vecs + chunks - 1) / chunks;
        // Sources interleaved (token t of every source, then t + 1): at any moment some warps
        // write peers over NVLink while others write this rank's own slots, so the NVLink
        // stores and the HBM traffic of the weighted sums overlap instead of taking turns.
        for (int wi = blockIdx.x * warps + tid / 32; wi < P.world * most * chunks;
             wi += gridDim.x * warps) {
            const int i = wi / chunks, c = wi % chunks;
            const int s = i % P.world, t = i / P.world;
            if (t >= s_start[s + 1] - s_start[s]) continue;
            const uint8_t* m = P.peers[s].rx_meta + static_cast<size_t>(t) * P.meta_bytes;
            int row = -1;
            float w = 0.f;
            if (lane < P.topk) {
                row = P.route_rows[(static_cast<size_t>(s) * P.max_tokens + t) * P.topk + lane];
                w = meta_w(m, P.topk, lane);
            }
            const unsigned hit = __ballot_sync(0xffffffffu, row >= 0);
            if (!hit) continue;
            uint4* dst =
                reinterpret_cast<uint4*>(P.peers[s].data + static_cast<size_t>(t) * P.slot_bytes);
            const int hi = min(vecs, (c + 1) * per);
            for (int base = c * per; base < hi; base += 32 * U) {
                float acc[U][N];
#pragma unroll
                for (int u = 0; u < U; ++u)
#pragma unroll
                    for (int j = 0; j < N; ++j) acc[u][j] = 0.f;
                for (unsigned h = hit; h; h &= h - 1) {
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
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int v = base + 32 * u + lane;
                    if (v < hi) dst[v] = Vec<T>::store(acc[u]);
                }
            }
        }
    }
    if (!last_block(P, 2, true)) return;
    if (tid < P.world && ok) st_release(P.peers[tid].cflag, n);
    finish_phase(P, 2, n);
}

template <typename T>
__device__ void combine_recv(const Params& P) {
    constexpr int N = Vec<T>::N;
    const int tid = threadIdx.x;
    const uint64_t n = P.st->seq[3] + 1;
    const bool ok = wait_all_peers(P, &Peer::rx_cflag, n, 0, 3, n);
    if (ok) {
        const int ntok = P.st->my_ntok;
        const int vecs = P.hidden / N;
        const int lane = tid & 31;
        const int warps = blockDim.x / 32;
        constexpr int U = 4;
        const int chunks = chunk_count(ntok, vecs, U);
        const int per = (vecs + chunks - 1) / chunks;
        for (int wi = blockIdx.x * warps + tid / 32; wi < ntok * chunks;
             wi += gridDim.x * warps) {
            const int t = wi / chunks, c = wi % chunks;
            const uint64_t mask = P.tok_mask[t];
            uint4* dst = reinterpret_cast<uint4*>(P.out + static_cast<size_t>(t) * P.out_stride);
            const size_t slot = static_cast<size_t>(t) * P.slot_bytes;
            const int hi = min(vecs, (c + 1) * per);
            for (int base = c * per; base < hi; base += 32 * U) {
                float acc[U][N];
#pragma unroll
                for (int u = 0; u < U; ++u) {
                    const int v = base + 32 * u + lane;
                    if (P.accumulate && v < hi) {
                        Vec<T>::load(dst[v], acc[u]);
                    } else {
#pragma unroll
                        for (int j = 0; j < N; ++j) acc[u][j] = 0.f;
                    }
                }
                for (uint64_t mk = mask; mk; mk &= mk - 1) {
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
    }
    if (!last_block(P, 3, false)) return;
    if (tid < P.world && ok) st_relaxed(P.peers[tid].rel, 2 * n);
    finish_phase(P, 3, n);
}

}  // namespace

#define STOLON_COMBINE(SUFFIX, TYPE)                                                     \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_combine_send_##SUFFIX(   \
        Params P) {                                                                      \
        combine_send<TYPE>(P);                                                           \
    }                                                                                    \
    extern "C" __global__ void __launch_bounds__(kThreads, kMinBlocks) moe_combine_recv_##SUFFIX(   \
        Params P) {                                                                      \
        combine_recv<TYPE>(P);                                                           \
    }

STOLON_COMBINE(bf16, __nv_bfloat16)
STOLON_COMBINE(f16, __half)
STOLON_COMBINE(f32, float)
