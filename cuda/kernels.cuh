/* kernels.cuh - device kernels of the CUDA backend (see backend_cuda.cu).
 *
 * bf16 values travel as their uint16_t bit patterns.  |x| of a bf16 is its
 * bits & 0x7fff, and non-negative floats (NaN above Inf) order like their
 * bit patterns as unsigned integers, so every amax here is an integer max:
 * exact, order-independent, and NaN-propagating as the CPU backend is.
 */
#ifndef MOECAL_CUDA_KERNELS_CUH
#define MOECAL_CUDA_KERNELS_CUH

#include <stdint.h>

#include <cub/block/block_scan.cuh>

#include "nvfp4_math.h" /* moecal_nv_bf16_rne */
#include "route_math.h"

namespace moecal_cuda {
/* internal linkage: each translation unit that includes this (the backend,
 * the benchmark) has its own copy of the kernels */
namespace {

/* ------------------------------------------------------------------ helpers */

__device__ __forceinline__ float bf16_to_f(uint16_t u)
{
    return __uint_as_float((unsigned)u << 16);
}

/* Round to the nearest bf16 (ties to even), as a float; NaN stays NaN.  The
 * same bit operation as the CPU backend's round_bf16. */
__device__ __forceinline__ float round_bf16(float x)
{
    unsigned u = __float_as_uint(x);
    if ((u & 0x7fffffffu) <= 0x7f800000u) {
        u += 0x7fffu + ((u >> 16) & 1u);
        u &= 0xffff0000u;
    }
    return __uint_as_float(u);
}

__device__ __forceinline__ unsigned warp_max(unsigned v)
{
    for (int o = 16; o > 0; o >>= 1)
        v = max(v, __shfl_xor_sync(0xffffffffu, v, o));
    return v;
}

/* Max over the block (blockDim.x a multiple of 32, at most 1024); the result
 * is valid in thread 0. */
__device__ __forceinline__ unsigned block_max(unsigned v)
{
    __shared__ unsigned part[32];
    const int lane = threadIdx.x & 31, w = threadIdx.x >> 5;
    v = warp_max(v);
    if (lane == 0)
        part[w] = v;
    __syncthreads();
    if (w == 0) {
        v = lane < (int)(blockDim.x >> 5) ? part[lane] : 0u;
        v = warp_max(v);
    }
    return v;
}

/* ------------------------------------------------------------------ row max */

/* rowmax[t] = max |x[t][:]| as bf16 magnitude bits (NaN if any NaN).  One
 * warp per row; VEC: H % 8 == 0, rows 16-byte aligned. */
template <bool VEC>
__global__ void k_rowmax(const uint16_t *__restrict__ x, int64_t n, int H,
                         unsigned *__restrict__ rowmax)
{
    const int lane = threadIdx.x & 31;
    int64_t row = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (row >= n)
        return;
    const uint16_t *r = x + row * (int64_t)H;
    unsigned m = 0;
    if (VEC) {
        const uint4 *v = reinterpret_cast<const uint4 *>(r);
        unsigned m2 = 0;
        for (int i = lane; i < H / 8; i += 32) {
            uint4 q = __ldg(v + i);
            m2 = __vmaxu2(m2, q.x & 0x7fff7fffu);
            m2 = __vmaxu2(m2, q.y & 0x7fff7fffu);
            m2 = __vmaxu2(m2, q.z & 0x7fff7fffu);
            m2 = __vmaxu2(m2, q.w & 0x7fff7fffu);
        }
        m = max(m2 & 0xffffu, m2 >> 16);
    } else {
        for (int i = lane; i < H; i += 32)
            m = max(m, (unsigned)(r[i] & 0x7fffu));
    }
    m = warp_max(m);
    if (lane == 0)
        rowmax[row] = m;
}

/* ------------------------------------------------------------------ logits */

/* logits[t][e] = (float) sum_h x[t][h] * g[e][h] in double, in route_math.h's
 * order (blocks of MOECAL_RM_BLOCK h, ascending within and across), tiled.
 * Each output is one accumulator that walks a block's h in order, added at
 * the block's end to the running total in tot [n][E] (double, global: 14
 * flushes per 7168 h cost far less than the registers of a second 8 x 8
 * tile); tiles only decide which thread owns an output.
 * 8 x 8 doubles per thread: 64 FMA per 16 shared loads (a first kernel with
 * 8 x 4, 32 FMA per 8 loads of which half were 4-way broadcasts, reached 16.9
 * FP64 TFLOP/s on an H100; this one 19.6).  Block: 128 threads, 64 tokens x
 * 128 experts, k-tiles of 16; thread (ty, tx) owns tokens ty*8 .. ty*8+7 and
 * experts tx + 16 j (conflict-free loads).  blockIdx.x walks the expert
 * tiles, so the blocks that share a token tile run together and read it from
 * HBM once.  VEC: H % 8 == 0 (16-byte loads of x and g rows). */
enum { LG_BT = 64, LG_BE = 128, LG_BK = 16, LG_THREADS = 128 };

template <bool VEC>
__global__ void __launch_bounds__(LG_THREADS, 2)
k_logits(const uint16_t *__restrict__ x, const float *__restrict__ g, int64_t n, int H, int E,
          int prec, double *__restrict__ tot, float *__restrict__ logits)
{
    __shared__ __align__(16) double xs[LG_BK][LG_BT];
    __shared__ __align__(16) double gs[LG_BK][LG_BE];
    const int tid = threadIdx.x;
    const int ty = tid >> 4, tx = tid & 15;
    const int e0 = blockIdx.x * LG_BE;
    const int64_t t0 = (int64_t)blockIdx.y * LG_BT;

    /* loaders: x, token tid/2, k half tid%2 (8 values); g, expert tid, all
     * 16 k of the tile */
    const int lx_t = tid >> 1, lx_k = (tid & 1) * 8;
    const bool x_ok = t0 + lx_t < n, g_ok = e0 + tid < E;
    const uint16_t *xrow = x + (x_ok ? (t0 + lx_t) * (int64_t)H : 0);
    const float *grow = g + (g_ok ? (int64_t)(e0 + tid) * H : 0);

    double acc[8][8];
#pragma unroll
    for (int i = 0; i < 8; i++)
#pragma unroll
        for (int j = 0; j < 8; j++)
            acc[i][j] = 0.0;

    uint4 xq;
    float gv[16];
    auto load = [&](int k0) {
        if (VEC) {
            xq = make_uint4(0, 0, 0, 0);
            if (x_ok && k0 + lx_k < H)
                xq = __ldg(reinterpret_cast<const uint4 *>(xrow + k0 + lx_k));
#pragma unroll
            for (int q = 0; q < 4; q++) {
                float4 f = make_float4(0.f, 0.f, 0.f, 0.f);
                if (g_ok && k0 + 4 * q < H)
                    f = __ldg(reinterpret_cast<const float4 *>(grow + k0 + 4 * q));
                gv[4 * q] = f.x;
                gv[4 * q + 1] = f.y;
                gv[4 * q + 2] = f.z;
                gv[4 * q + 3] = f.w;
            }
        } else {
            unsigned w[4];
#pragma unroll
            for (int q = 0; q < 4; q++) {
                int k = k0 + lx_k + 2 * q;
                unsigned lo = (x_ok && k < H) ? xrow[k] : 0u;
                unsigned hi = (x_ok && k + 1 < H) ? xrow[k + 1] : 0u;
                w[q] = lo | (hi << 16);
            }
            xq = make_uint4(w[0], w[1], w[2], w[3]);
#pragma unroll
            for (int i = 0; i < 16; i++)
                gv[i] = (g_ok && k0 + i < H) ? grow[k0 + i] : 0.0f;
        }
    };

    load(0);
    for (int k0 = 0; k0 < H; k0 += LG_BK) {
        __syncthreads(); /* the previous tile is consumed */
        {
            const unsigned w[4] = {xq.x, xq.y, xq.z, xq.w};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                xs[lx_k + 2 * q][lx_t] = (double)bf16_to_f((uint16_t)(w[q] & 0xffff));
                xs[lx_k + 2 * q + 1][lx_t] = (double)bf16_to_f((uint16_t)(w[q] >> 16));
            }
        }
#pragma unroll
        for (int i = 0; i < 16; i++)
            gs[i][tid] = (double)gv[i];
        __syncthreads();
        if (k0 + LG_BK < H)
            load(k0 + LG_BK); /* in flight while this tile is multiplied */
#pragma unroll
        for (int kk = 0; kk < LG_BK; kk++) {
            double a[8], b[8];
            const double2 *xa = reinterpret_cast<const double2 *>(&xs[kk][ty * 8]);
#pragma unroll
            for (int i = 0; i < 4; i++) {
                double2 v = xa[i];
                a[2 * i] = v.x;
                a[2 * i + 1] = v.y;
            }
#pragma unroll
            for (int j = 0; j < 8; j++)
                b[j] = gs[kk][tx + 16 * j];
#pragma unroll
            for (int i = 0; i < 8; i++)
#pragma unroll
                for (int j = 0; j < 8; j++)
                    acc[i][j] = fma(a[i], b[j], acc[i][j]);
        }
        const int k1 = k0 + LG_BK;
        if (k1 % MOECAL_RM_BLOCK == 0 || k1 >= H) {
            /* a block of h ends: its sums join the totals (the first one is
             * the total: +0 + s == s, as no sum is -0) */
            const bool first = k1 <= MOECAL_RM_BLOCK, last = k1 >= H;
#pragma unroll
            for (int i = 0; i < 8; i++) {
                const int64_t t = t0 + ty * 8 + i;
#pragma unroll
                for (int j = 0; j < 8; j++) {
                    const int e = e0 + tx + 16 * j;
                    if (t < n && e < E) {
                        double v = first ? acc[i][j] : tot[t * E + e] + acc[i][j];
                        /* the exact precision keeps the double sum in tot */
                        if (last && prec != MOECAL_LOGITS_EXACT)
                            logits[t * E + e] = moecal_route_round(v, prec);
                        else
                            tot[t * E + e] = v;
                    }
                    acc[i][j] = 0.0;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ selection */

/* The router of router.c (router_tmpl.h), one thread per token, with
 * route_math.h's exp; T = float, or double for the exact logit precision.
 * Per-token scratch lives in dynamic shared memory, transposed (element j of
 * thread i at [j * nt + i] of its array) so that threads at the same step hit
 * distinct banks.  Arrays: T choice [E], gscore [G], tv [KG], then int ti
 * [KG], gi [G], keep [G], with KG = max(k, G). */
struct select_params {
    int E, k, G, TG;
    int grouped;      /* 1 < G and TG < G */
    int sigmoid;      /* 1 sigmoid, 0 softmax */
    int has_bias;
    int words;        /* per-token words of scratch */
};

/* 4-byte words of scratch per token, for values of tsize bytes */
__host__ __device__ inline int select_words(int E, int k, int G, int tsize)
{
    int KG = k > G ? k : G;
    return (E + G + KG) * (tsize / 4) + KG + 2 * G;
}

template <typename T> __device__ __forceinline__ T no_nan(T v)
{
    return v == v ? v : -(T)INFINITY;
}

/* the float32 operations of router.c, each rounded once (no contraction) */
__device__ __forceinline__ float rt_add(float a, float b) { return __fadd_rn(a, b); }
__device__ __forceinline__ float rt_sub(float a, float b) { return __fsub_rn(a, b); }
__device__ __forceinline__ float rt_div(float a, float b) { return __fdiv_rn(a, b); }
__device__ __forceinline__ float rt_exp(float x) { return moecal_route_expf(x); }
__device__ __forceinline__ double rt_add(double a, double b) { return __dadd_rn(a, b); }
__device__ __forceinline__ double rt_sub(double a, double b) { return __dsub_rn(a, b); }
__device__ __forceinline__ double rt_div(double a, double b) { return __ddiv_rn(a, b); }
__device__ __forceinline__ double rt_exp(double x) { return moecal_route_exp(x); }

/* Offer (v, i) to the descending list tv/ti (stride nt) of *cnt <= cap
 * entries; candidates arrive in ascending index order, so an equal value
 * never overtakes a lower index. */
template <typename T>
__device__ __forceinline__ void top_push(T *tv, int *ti, int nt, int *cnt, int cap, T v, int i)
{
    int p = *cnt;
    if (p == cap) {
        if (!(v > tv[(cap - 1) * nt]))
            return;
        p = cap - 1;
    } else {
        (*cnt)++;
    }
    while (p > 0 && v > tv[(p - 1) * nt]) {
        tv[p * nt] = tv[(p - 1) * nt];
        ti[p * nt] = ti[(p - 1) * nt];
        p--;
    }
    tv[p * nt] = v;
    ti[p * nt] = i;
}

template <typename T>
__global__ void k_select(const T *__restrict__ logits, const float *__restrict__ bias,
                         const uint8_t *__restrict__ skip, int64_t n, select_params sp,
                         int32_t *__restrict__ sel)
{
    extern __shared__ __align__(8) unsigned char sm_bytes[];
    const int nt = blockDim.x, tid = threadIdx.x;
    const int64_t t = (int64_t)blockIdx.x * nt + tid;
    if (t >= n)
        return;
    const int E = sp.E, k = sp.k, G = sp.G;
    const int KG = k > G ? k : G;
    T *const tbase = reinterpret_cast<T *>(sm_bytes);
    int *const ibase = reinterpret_cast<int *>(tbase + (size_t)(E + G + KG) * nt);
    T *choice = tbase + tid;
    T *gs = choice + (size_t)E * nt;
    T *tv = gs + (size_t)G * nt;
    int *ti = ibase + tid;
    int *gi = ti + (size_t)KG * nt;
    int *keep = gi + (size_t)G * nt;
    int32_t *out = sel + t * k;
    const T one = 1, minus_inf = -(T)INFINITY;

    if (skip != nullptr && skip[t]) {
        for (int i = 0; i < k; i++)
            out[i] = -1;
        return;
    }
    const T *l = logits + t * E;

    /* choice values (router_tmpl.h token_choice) */
    if (sp.sigmoid) {
        for (int j = 0; j < E; j++) {
            T s = rt_div(one, rt_add(one, rt_exp(-l[j])));
            choice[(size_t)j * nt] = no_nan(sp.has_bias ? rt_add(s, (T)bias[j]) : s);
        }
    } else {
        T m = l[0];
        for (int j = 1; j < E; j++)
            m = (l[j] > m || m != m) ? l[j] : m; /* fmax: a NaN loses */
        T sum = 0;
        for (int j = 0; j < E; j++) {
            T c = rt_exp(rt_sub(l[j], m));
            choice[(size_t)j * nt] = c;
            sum = rt_add(sum, c);
        }
        for (int j = 0; j < E; j++) {
            T c = rt_div(choice[(size_t)j * nt], sum);
            choice[(size_t)j * nt] = no_nan(sp.has_bias ? rt_add(c, (T)bias[j]) : c);
        }
    }

    int cnt = 0;
    if (sp.grouped) {
        /* group scores (router.c select_groups) */
        const int gsz = E / G;
        for (int g = 0; g < G; g++) {
            const T *c = choice + (size_t)g * gsz * nt;
            T m1 = c[0], m2 = 0;
            int have2 = 0;
            for (int j = 1; j < gsz; j++) {
                T v = c[(size_t)j * nt];
                if (v > m1) {
                    m2 = m1;
                    m1 = v;
                    have2 = 1;
                } else if (!have2 || v > m2) {
                    m2 = v;
                    have2 = 1;
                }
            }
            gs[(size_t)g * nt] = no_nan((sp.has_bias && have2) ? rt_add(m1, m2) : m1);
        }
        int gc = 0;
        for (int g = 0; g < G; g++)
            top_push(tv, gi, nt, &gc, sp.TG, gs[(size_t)g * nt], g);
        for (int g = 0; g < G; g++)
            keep[(size_t)g * nt] = 0;
        for (int i = 0; i < gc; i++)
            keep[(size_t)gi[(size_t)i * nt] * nt] = 1;
        /* experts of dropped groups compete as -inf */
        for (int g = 0; g < G; g++) {
            const T *c = choice + (size_t)g * gsz * nt;
            int j0 = g * gsz;
            if (keep[(size_t)g * nt]) {
                for (int j = 0; j < gsz; j++)
                    top_push(tv, ti, nt, &cnt, k, c[(size_t)j * nt], j0 + j);
            } else if (cnt < k) {
                for (int j = 0; j < gsz; j++)
                    top_push(tv, ti, nt, &cnt, k, minus_inf, j0 + j);
            }
        }
    } else {
        for (int j = 0; j < E; j++)
            top_push(tv, ti, nt, &cnt, k, choice[(size_t)j * nt], j);
    }

    /* ascending expert order */
    for (int i = 1; i < k; i++) {
        int e = ti[(size_t)i * nt];
        int p = i;
        while (p > 0 && ti[(size_t)(p - 1) * nt] > e) {
            ti[(size_t)p * nt] = ti[(size_t)(p - 1) * nt];
            p--;
        }
        ti[(size_t)p * nt] = e;
    }
    for (int i = 0; i < k; i++)
        out[i] = ti[(size_t)i * nt];
}

/* ------------------------------------------------------------------ token lists */

/* Per (token, slot): count tokens of each local expert and take the max of
 * the tokens' row maxima. */
__global__ void k_count(const int32_t *__restrict__ sel, const unsigned *__restrict__ rowmax,
                        int64_t nsel, int k, int e0, int nloc, int *__restrict__ cnt,
                        unsigned *__restrict__ ax)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nsel)
        return;
    int e = sel[i] - e0;
    if (e < 0 || e >= nloc)
        return;
    atomicAdd(&cnt[e], 1);
    atomicMax(&ax[e], rowmax[i / k]);
}

/* offs[e] = sum of cnt[< e] (offs has nloc + 1 entries); fill[] = 0.  One
 * block of SCAN_THREADS. */
enum { SCAN_THREADS = 512 };

__global__ void __launch_bounds__(SCAN_THREADS)
k_scan(const int *__restrict__ cnt, int nloc, int *__restrict__ offs, int *__restrict__ fill)
{
    typedef cub::BlockScan<int, SCAN_THREADS> scan_t;
    __shared__ typename scan_t::TempStorage tmp;
    __shared__ int carry;
    if (threadIdx.x == 0)
        carry = 0;
    __syncthreads();
    for (int base = 0; base < nloc; base += SCAN_THREADS) {
        int e = base + (int)threadIdx.x;
        int v = e < nloc ? cnt[e] : 0, ex, total;
        scan_t(tmp).ExclusiveSum(v, ex, total);
        if (e < nloc) {
            offs[e] = carry + ex;
            fill[e] = 0;
        }
        __syncthreads();
        if (threadIdx.x == 0)
            carry += total;
        __syncthreads();
    }
    if (threadIdx.x == 0)
        offs[nloc] = carry;
}

/* dest[i] = the row of the gathered matrix that selection i (token i / k,
 * slot i % k) fills: offs[e] + the i-th (in no particular order) token of
 * local expert e; -1 for a selection of another rank's expert.  The order
 * does not matter: each GEMM row depends only on its own token, and amax is
 * a max. */
__global__ void k_fill(const int32_t *__restrict__ sel, int64_t nsel, int e0, int nloc,
                       const int *__restrict__ offs, int *__restrict__ fill,
                       int32_t *__restrict__ dest)
{
    int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    if (i >= nsel)
        return;
    int e = sel[i] - e0;
    if (e < 0 || e >= nloc) {
        dest[i] = -1;
        return;
    }
    dest[i] = offs[e] + atomicAdd(&fill[e], 1);
}

/* All-experts mode: the rows not skipped, and the max of their row maxima. */
__global__ void k_valid_rows(const uint8_t *__restrict__ skip, const unsigned *__restrict__ rowmax,
                             int64_t n, int *__restrict__ nvalid, int32_t *__restrict__ list,
                             unsigned *__restrict__ ax_all)
{
    int64_t t = (int64_t)blockIdx.x * blockDim.x + threadIdx.x;
    unsigned m = 0;
    if (t < n && (skip == nullptr || !skip[t])) {
        m = rowmax[t];
        if (list != nullptr)
            list[atomicAdd(nvalid, 1)] = (int32_t)t;
    }
    m = block_max(m);
    if (threadIdx.x == 0 && m != 0)
        atomicMax(ax_all, m);
}

/* xg[p][:] = x[list[p]][:], one warp per row; VEC: H % 8 == 0. */
template <bool VEC>
__global__ void k_gather(const uint16_t *__restrict__ x, const int32_t *__restrict__ list,
                         int64_t nrows, int H, uint16_t *__restrict__ xg)
{
    const int lane = threadIdx.x & 31;
    int64_t p = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (p >= nrows)
        return;
    const uint16_t *src = x + (int64_t)list[p] * H;
    uint16_t *dst = xg + p * (int64_t)H;
    if (VEC) {
        const uint4 *s = reinterpret_cast<const uint4 *>(src);
        uint4 *d = reinterpret_cast<uint4 *>(dst);
        const int nv = H / 8;
        int i = lane;
        for (; i + 96 < nv; i += 128) {
            uint4 a = __ldg(s + i), b = __ldg(s + i + 32), c = __ldg(s + i + 64),
                  e = __ldg(s + i + 96);
            d[i] = a;
            d[i + 32] = b;
            d[i + 64] = c;
            d[i + 96] = e;
        }
        for (; i < nv; i += 32)
            d[i] = __ldg(s + i);
    } else {
        for (int i = lane; i < H; i += 32)
            dst[i] = src[i];
    }
}

/* Top-k: xg[dest[t * k + s]][:] = x[t][:] for every slot s of token t with
 * dest >= 0 (k_fill), one warp per token: each row is read once, however
 * many local experts it goes to (list-driven gathers read it k times), and
 * not at all when none of them is local.  VEC: H % 8 == 0. */
template <bool VEC>
__global__ void k_gather_tok(const uint16_t *__restrict__ x, const int32_t *__restrict__ dest,
                             int64_t n, int k, int H, uint16_t *__restrict__ xg)
{
    const int lane = threadIdx.x & 31;
    const int64_t t = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) >> 5;
    if (t >= n)
        return;
    const uint16_t *src = x + t * (int64_t)H;
    for (int s0 = 0; s0 < k; s0 += 32) {
        const int d = s0 + lane < k ? dest[t * k + s0 + lane] : -1;
        const unsigned m = __ballot_sync(0xffffffffu, d >= 0);
        if (m == 0)
            continue;
        if (VEC) {
            const uint4 *s = reinterpret_cast<const uint4 *>(src);
            const int nv = H / 8;
            for (int i0 = 0; i0 < nv; i0 += 128) { /* uniform: the shuffles */
                const int i = i0 + lane;
                uint4 v[4];
#pragma unroll
                for (int u = 0; u < 4; u++)
                    if (i + 32 * u < nv)
                        v[u] = __ldg(s + i + 32 * u);
                for (unsigned mm = m; mm != 0; mm &= mm - 1) {
                    const int64_t row = __shfl_sync(0xffffffffu, d, __ffs((int)mm) - 1);
                    uint4 *o = reinterpret_cast<uint4 *>(xg + row * H);
#pragma unroll
                    for (int u = 0; u < 4; u++)
                        if (i + 32 * u < nv)
                            o[i + 32 * u] = v[u];
                }
            }
        } else {
            for (int i0 = 0; i0 < H; i0 += 32) {
                const int i = i0 + lane;
                const uint16_t v = i < H ? src[i] : 0;
                for (unsigned mm = m; mm != 0; mm &= mm - 1) {
                    const int64_t row = __shfl_sync(0xffffffffu, d, __ffs((int)mm) - 1);
                    if (i < H)
                        xg[row * H + i] = v;
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ activation amax */

/* One item: rows [row0, row0 + nrows) of ab, whose columns [col0, col0 + I)
 * hold a = bf16(x W1^T) and [col0 + I, col0 + 2I) b = bf16(x W3^T) of local
 * expert e. */
struct act_item {
    int e;
    int nrows;
    int64_t row0;
    int64_t col0;
};

/* max |h| (as bits) over rows [row0, row0 + nrows) of ab, h = bf16(bf16(silu(a))
 * * b) as the CPU backend's activation_amax computes it, a at columns
 * [col0, col0 + I) and b at [col0 + I, col0 + 2I); this thread's share.
 * silu by the hardware's exp2 and reciprocal (__expf, __fdividef: a few
 * float ulps, far below the bf16 rounding that follows; IEEE expf and
 * division made this pass compute-bound); Inf and NaN come out as the
 * CPU's: silu(-Inf) = -Inf * 0 = NaN, silu(+Inf) = Inf, silu(a < -88) = -0.
 * VEC: I, ld and col0 multiples of 8 (16-byte loads). */
template <bool VEC>
__device__ __forceinline__ unsigned act_rows(const uint16_t *__restrict__ ab, int64_t ld, int I,
                                             int64_t row0, int nrows, int64_t col0)
{
    unsigned m = 0;
    auto h_of = [](uint16_t au, uint16_t bu) -> unsigned {
        float a = bf16_to_f(au);
        float s = round_bf16(__fdividef(a, 1.0f + __expf(-a)));
        float h = round_bf16(s * bf16_to_f(bu));
        return __float_as_uint(h) & 0x7fffffffu;
    };
    if (VEC) {
        const int nv = I / 8;
        const int64_t total = (int64_t)nrows * nv;
        for (int64_t q = threadIdx.x; q < total; q += blockDim.x) {
            int64_t r = q / nv;
            int j = (int)(q - r * nv) * 8;
            const uint16_t *row = ab + (row0 + r) * ld + col0;
            uint4 av = __ldg(reinterpret_cast<const uint4 *>(row + j));
            uint4 bv = __ldg(reinterpret_cast<const uint4 *>(row + I + j));
            const unsigned aw[4] = {av.x, av.y, av.z, av.w};
            const unsigned bw[4] = {bv.x, bv.y, bv.z, bv.w};
#pragma unroll
            for (int w = 0; w < 4; w++) {
                m = max(m, h_of((uint16_t)(aw[w] & 0xffff), (uint16_t)(bw[w] & 0xffff)));
                m = max(m, h_of((uint16_t)(aw[w] >> 16), (uint16_t)(bw[w] >> 16)));
            }
        }
    } else {
        const int64_t total = (int64_t)nrows * I;
        for (int64_t q = threadIdx.x; q < total; q += blockDim.x) {
            int64_t r = q / I;
            int j = (int)(q - r * I);
            const uint16_t *row = ab + (row0 + r) * ld + col0;
            m = max(m, h_of(row[j], row[I + j]));
        }
    }
    return m;
}

/* Top-k mode: one block per item, ah[item.e] = max. */
template <bool VEC>
__global__ void k_act(const uint16_t *__restrict__ ab, int64_t ld, int I,
                      const act_item *__restrict__ items, unsigned *__restrict__ ah)
{
    const act_item it = items[blockIdx.x];
    unsigned m = act_rows<VEC>(ab, ld, I, it.row0, it.nrows, it.col0);
    m = block_max(m);
    if (threadIdx.x == 0)
        atomicMax(&ah[it.e], m);
}

/* All-experts mode: ab holds [nrows][ne * 2I], experts e_first + y side by
 * side; block (x, y) takes rows [x * R, x * R + R) of expert e_first + y. */
template <bool VEC>
__global__ void k_act_dense(const uint16_t *__restrict__ ab, int64_t ld, int I, int64_t nrows,
                            int R, int e_first, unsigned *__restrict__ ah)
{
    const int64_t r0 = (int64_t)blockIdx.x * R;
    const int n = (int)(nrows - r0 < R ? nrows - r0 : R);
    unsigned m = act_rows<VEC>(ab, ld, I, r0, n, (int64_t)blockIdx.y * 2 * I);
    m = block_max(m);
    if (threadIdx.x == 0)
        atomicMax(&ah[e_first + (int)blockIdx.y], m);
}

/* ------------------------------------------------------------------ weight check */

/* ---------------------------------------------------------------- router by DGEMM
 *
 * The canonical logit c (route_math.h: exact products summed in double in
 * ascending h, rounded to float) from a cuBLAS DGEMM D of the same products
 * in another order.  Both are within gamma * sum|x g| of the exact sum S
 * (gamma = n u / (1 - n u), with u = 2^-52: one ulp per operation, so even
 * a truncating adder is covered), and sum|x g| <= |x|_2 |g|_2; so
 * |c - D| <= 2 gamma |x| |g| =: B.  Rounding to float is monotone: if D - B
 * and D + B round to the same float (same bits), c rounds to it too.
 * Otherwise (c may lie on either side of a rounding boundary; also NaN, Inf
 * and signed zeros) the logit is recomputed in the canonical order.  With
 * route_math.h's blocks, the block sums come from a batched DGEMM and are
 * added in the canonical order: B = 2 (gamma_512 + gamma_nb) sum_j |x_j| |g_j|
 * over blocks j. */

/* An upper bound of sqrt(the block's sum of ss), valid in thread 0 (blockDim
 * a multiple of 32): the computed sum of squares is within a relative n u of
 * the true one and sqrt adds half an ulp, so 2^-30 of margin covers any n up
 * to 2^22. */
__device__ double block_norm(double ss)
{
    __shared__ double red[32];
    __syncthreads(); /* red may still be read from a previous call */
    for (int o = 16; o > 0; o >>= 1)
        ss += __shfl_down_sync(0xffffffffu, ss, o);
    if ((threadIdx.x & 31) == 0)
        red[threadIdx.x >> 5] = ss;
    __syncthreads();
    double tot = 0.0;
    if (threadIdx.x == 0)
        for (int w = 0; w < (int)(blockDim.x >> 5); w++)
            tot += red[w];
    return sqrt(tot) * (1.0 + 0x1p-30);
}

/* x bf16 [n][H] -> double [n][Hp] (zeros after H); xnorm[t][j] >= the norm
 * of block j of x_t (NaN/Inf pass through).  blockDim divides
 * MOECAL_RM_BLOCK. */
__global__ void k_x_to_double(const uint16_t *__restrict__ x, int64_t n, int H, int Hp,
                              double *__restrict__ xd, double *__restrict__ xnorm)
{
    const int64_t t = blockIdx.x;
    if (t >= n)
        return;
    const uint16_t *xr = x + t * (int64_t)H;
    double *dr = xd + t * (int64_t)Hp;
    const int nb = Hp / MOECAL_RM_BLOCK;
    for (int j = 0; j < nb; j++) {
        double ss = 0.0;
        for (int h = j * MOECAL_RM_BLOCK + threadIdx.x; h < (j + 1) * MOECAL_RM_BLOCK;
             h += blockDim.x) {
            double v = h < H ? (double)moecal_rm_bf16(xr[h]) : 0.0;
            dr[h] = v;
            ss = fma(v, v, ss);
        }
        const double nrm = block_norm(ss);
        if (threadIdx.x == 0)
            xnorm[t * nb + j] = nrm;
    }
}

/* gate float [E][H] -> double [E][Hp] (zeros after H); gnorm[e][j] >= the
 * norm of block j of g_e. */
__global__ void k_gate_to_double(const float *__restrict__ g, int E, int H, int Hp,
                                 double *__restrict__ gd, double *__restrict__ gnorm)
{
    const int e = blockIdx.x;
    if (e >= E)
        return;
    const int nb = Hp / MOECAL_RM_BLOCK;
    for (int j = 0; j < nb; j++) {
        double ss = 0.0;
        for (int h = j * MOECAL_RM_BLOCK + threadIdx.x; h < (j + 1) * MOECAL_RM_BLOCK;
             h += blockDim.x) {
            double v = h < H ? (double)g[(int64_t)e * H + h] : 0.0;
            gd[(int64_t)e * Hp + h] = v;
            ss = fma(v, v, ss);
        }
        const double nrm = block_norm(ss);
        if (threadIdx.x == 0)
            gnorm[(int64_t)e * nb + j] = nrm;
    }
}

/* Accept the DGEMM's where the bound allows, else list (t, e) for the exact
 * path.  d is [nb][n][E]: the block sums (cuBLAS column-major E x n per
 * block), added in route_math.h's order; kb = 2 (gamma_B + gamma_nb),
 * inflated. */
__global__ void k_logit_check(const double *__restrict__ d, int nb,
                              const double *__restrict__ xnorm, const double *__restrict__ gnorm,
                              int64_t n, int E, double kb, int prec, float *__restrict__ logits,
                              int2 *__restrict__ fix, unsigned cap, unsigned *__restrict__ nfix)
{
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n * E; i += stride) {
        const int64_t t = i / E;
        const int e = (int)(i % E);
        double v = d[i], a = xnorm[t * nb] * gnorm[(int64_t)e * nb];
        for (int j = 1; j < nb; j++) {
            v += d[(int64_t)j * n * E + i];
            a = fma(xnorm[t * nb + j], gnorm[(int64_t)e * nb + j], a);
        }
        /* the bound, plus the rounding of v -+ B itself (an ulp of |v|) */
        /* a >= sum_j |x_j| |g_j| >= sum |x g| (Cauchy-Schwarz per block),
         * computed with a relative error far below the 2^-20 in kb */
        /* rounding is monotone: when both ends of the interval round to the
         * same float32 (or bf16) value, so does route_math.h's sum, which
         * lies between them; an interval that holds a rounding boundary (a
         * float or bf16 midpoint) goes to the exact path */
        const double bnd = kb * a + fabs(v) * 0x1p-50 + 0x1p-1000;
        const float lo = moecal_route_round(v - bnd, prec);
        const float hi = moecal_route_round(v + bnd, prec);
        if (__float_as_uint(lo) == __float_as_uint(hi)) {
            logits[i] = lo;
        } else {
            unsigned slot = atomicAdd(nfix, 1u);
            if (slot < cap)
                fix[slot] = make_int2((int)t, e);
        }
    }
}

/* One block sum of route_math.h: x[h0, h1) . g[h0, h1) in ascending h from
 * +0.  VEC: 16-byte aligned x + h0 and 8-float aligned g + h0 (H % 8 == 0);
 * the unrolled loads run ahead of the dependent chain of FMA. */
template <bool VEC>
__device__ __forceinline__ double block_dot(const uint16_t *__restrict__ x,
                                            const float *__restrict__ g, int h0, int h1)
{
    double acc = 0.0;
    int h = h0;
    if (VEC) {
#pragma unroll 4
        for (; h + 8 <= h1; h += 8) {
            const uint4 xv = __ldg(reinterpret_cast<const uint4 *>(x + h));
            const float4 g0 = __ldg(reinterpret_cast<const float4 *>(g + h));
            const float4 g1 = __ldg(reinterpret_cast<const float4 *>(g + h + 4));
            const unsigned xw[4] = {xv.x, xv.y, xv.z, xv.w};
            const float gw[8] = {g0.x, g0.y, g0.z, g0.w, g1.x, g1.y, g1.z, g1.w};
#pragma unroll
            for (int q = 0; q < 4; q++) {
                acc = fma((double)bf16_to_f((uint16_t)(xw[q] & 0xffff)), (double)gw[2 * q], acc);
                acc = fma((double)bf16_to_f((uint16_t)(xw[q] >> 16)), (double)gw[2 * q + 1],
                          acc);
            }
        }
    }
    for (; h < h1; h++)
        acc = fma((double)bf16_to_f(x[h]), (double)g[h], acc);
    return acc;
}

/* The listed logits in route_math.h's order.  W = min(32, nb rounded up to
 * a power of 2) lanes per logit: lane j of the group sums blocks j, j + W,
 * ... (each a chain of 512 FMA, independent of the others), lane 0 adds the
 * block sums in ascending order (the same operations as moecal_route_logit).
 * When more than cap were listed, every logit of the piece (slow, and only
 * for inputs far outside any model's range).  Block size a multiple of 32;
 * VEC: H % 8 == 0. */
template <bool VEC>
__global__ void k_logit_fix(const uint16_t *__restrict__ x, const float *__restrict__ g, int64_t n,
                            int H, int E, int prec, const int2 *__restrict__ fix, unsigned cap,
                            const unsigned *__restrict__ nfix, float *__restrict__ logits)
{
    const unsigned cnt = *nfix;
    const int64_t total = cnt > cap ? n * E : (int64_t)cnt;
    const int nb = (H + MOECAL_RM_BLOCK - 1) / MOECAL_RM_BLOCK;
    int W = 1;
    while (W < nb && W < 32)
        W <<= 1;
    const int lane = threadIdx.x & 31, sub = lane & (W - 1), base = lane - sub;
    const unsigned gmask = (W == 32 ? 0xffffffffu : ((1u << W) - 1u)) << base;
    if (blockIdx.x == 0 && threadIdx.x == 0) /* the running total, for benchmarks */
        atomicAdd(reinterpret_cast<unsigned long long *>(const_cast<unsigned *>(nfix) + 2),
                  (unsigned long long)cnt);
    const int64_t groups = (int64_t)gridDim.x * (blockDim.x / W);
    /* the loop bound is the same for the W lanes of a group (the shuffles) */
    for (int64_t i = ((int64_t)blockIdx.x * blockDim.x + threadIdx.x) / W; i < total;
         i += groups) {
        const int2 te = cnt > cap ? make_int2((int)(i / E), (int)(i % E)) : fix[i];
        const uint16_t *xr = x + (int64_t)te.x * H;
        const float *gr = g + (int64_t)te.y * H;
        double tot = 0.0;
        for (int j0 = 0; j0 < nb; j0 += W) {
            const int j = j0 + sub;
            const double acc = j < nb ? block_dot<VEC>(xr, gr, j * MOECAL_RM_BLOCK,
                                                        min(H, (j + 1) * MOECAL_RM_BLOCK))
                                      : 0.0;
            for (int l = 0; l < W && j0 + l < nb; l++)
                tot += __shfl_sync(gmask, acc, base + l);
        }
        if (sub == 0)
            logits[(int64_t)te.x * E + te.y] = moecal_route_round(tot, prec);
    }
}

/* FP8 e4m3 block dequantization of nb experts' w1 (half 0) or w3 (half 1)
 * into w13 [nb][2I][H]: w = bf16_rne(lut[q] * scale), one float32 product,
 * exactly as moecal_fp8_dequant_bf16 (fp8.c) computes it; lut is the host's
 * moecal_e4m3_to_float table.  q [nb][I][H], scale [nb][nbr][nbc]. */
struct e4m3_lut {
    float v[256];
};

__global__ void k_dequant_fp8(const uint8_t *__restrict__ q, const float *__restrict__ scale,
                              int64_t nb, int I, int H, int block, int nbr, int nbc, int half,
                              e4m3_lut lut, uint16_t *__restrict__ w13)
{
    const int64_t per = (int64_t)I * H, n = nb * per;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        const int64_t e = i / per, r = (i % per) / H, c = i % H;
        const float s = scale[(e * nbr + r / block) * nbc + c / block];
        w13[(e * 2 + half) * per + r * H + c] = moecal_nv_bf16_rne(__fmul_rn(lut.v[q[i]], s));
    }
}

/* first[0] = smallest index i < n with w[i] non-finite (bf16 exponent all
 * ones), left alone when there is none. */
__global__ void k_first_nonfinite(const uint16_t *__restrict__ w, int64_t n,
                                  unsigned long long *__restrict__ first)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < n; i += stride) {
        if ((w[i] & 0x7f80u) == 0x7f80u) {
            atomicMin(first, (unsigned long long)i);
            return; /* later indices of this thread are larger */
        }
    }
}

/* Vector form for n % 8 == 0 and 16-byte alignment: 8 values per load. */
__global__ void k_first_nonfinite8(const uint4 *__restrict__ w, int64_t nv,
                                   unsigned long long *__restrict__ first)
{
    int64_t stride = (int64_t)gridDim.x * blockDim.x;
    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nv; i += stride) {
        uint4 q = __ldg(w + i);
        const unsigned ws[4] = {q.x, q.y, q.z, q.w};
#pragma unroll
        for (int j = 0; j < 4; j++) {
            unsigned lo = ws[j] & 0x7f80u, hi = (ws[j] >> 16) & 0x7f80u;
            if (lo == 0x7f80u || hi == 0x7f80u) {
                atomicMin(first, (unsigned long long)(i * 8 + 2 * j + (lo == 0x7f80u ? 0 : 1)));
                return;
            }
        }
    }
}

} /* namespace */
} /* namespace moecal_cuda */

#endif
