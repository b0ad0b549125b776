// MoE combine (see moe.cu): the split kernels moe_combine_send_* and moe_combine_recv_*, the
// overlapped moe_combine_fused_*, each for bf16, f16 and f32, and the weighted row sums they
// share.
//
// A part of the one translation unit moe.cu; include it from there only.

#pragma once

#include "common.cuh"

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
