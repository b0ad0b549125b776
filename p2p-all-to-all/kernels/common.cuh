// Common pieces of the MoE kernels (see moe.cu): constants and error codes, the layouts the
// host mirrors (Peer, State, Error, Params), release/acquire flags, waits with deadlines, the
// bookkeeping that ends a phase, and the routing metadata both dispatch and combine read.
//
// A part of the one translation unit moe.cu: its helpers live in an anonymous namespace, so
// include it from there only.

#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace {

constexpr int kThreads = 256;
// Blocks per SM the registers must allow (the host launches up to this many per SM, see
// `DEFAULT_BLOCKS_PER_SM` in src/gpu/tuning.rs): at prefill sizes the phases are
// bandwidth-bound and need many loads and NVLink stores in flight.
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
// reads what the peer sent (local side). Layout mirrored by `PeerEntry` in src/gpu/params.rs.
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

// Mirrored by `KernelParams` in src/gpu/params.rs: same order, same types.
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

}  // namespace
