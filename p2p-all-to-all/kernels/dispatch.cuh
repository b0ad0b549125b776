// MoE dispatch (see moe.cu): the split kernels moe_dispatch_send and moe_dispatch_recv, the
// overlapped moe_dispatch_count + moe_dispatch_fused, and the helpers only the dispatch uses
// (expert offsets, expansion into the expert-major output, send flags, chunk flags).
//
// A part of the one translation unit moe.cu; include it from there only.

#pragma once

#include "common.cuh"

namespace {

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
