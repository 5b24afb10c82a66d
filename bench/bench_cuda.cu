/* bench_cuda.cu - throughput of the CUDA backend on one DeepSeek-V3 MoE layer.
 *
 *   bench/bench_cuda [--quick] [--tokens N] [--no-check]
 *
 * One run measures, side by side on the same GPU:
 *   - cuBLAS's bf16 GEMM rate for [T x H] x [H x 2I] (the expert GEMM's
 *     shape, the call the backend makes) at several T;
 *   - the router's kernels alone (FP64 logits: TFLOP/s; selection);
 *   - the backend in top-k mode, chunks of 4096, 32768 and 131072 tokens
 *     (tokens/s from the host clock: run_chunk one chunk at a time, and
 *     "ahead": each chunk submitted before the previous one is finished,
 *     backend_cuda.h), with the time split of moecal_backend_ops.timings and
 *     the achieved GEMM rate; chunks in pinned and in pageable host memory;
 *   - the backend in all-experts mode.
 * Data are random and made on the GPU: weights ~ N(0, 0.02), tokens with a
 * shared direction, per-token scale spread and a few outlier channels, a
 * router with a per-expert skew (hot and cold experts).  Before timing, the
 * token counts and amax(x) of one 1024-token chunk are compared with a host
 * reference (route_math.h logits, router.c's selection).
 *
 * A benchmark, never a test: it prints a table; bench/run-gpu-bench.sh runs
 * it on a GPU machine.
 */
#include "config.h"

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <algorithm>
#include <string>
#include <thread>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend.h"
#include "router.h"
#include "backend_cuda.h"
#include "kernels.cuh"
#include "route_math.h"

#define CK(call)                                                                          \
    do {                                                                                  \
        cudaError_t e_ = (call);                                                          \
        if (e_ != cudaSuccess) {                                                          \
            fprintf(stderr, "bench_cuda: %s failed: %s (line %d)\n", #call,              \
                    cudaGetErrorString(e_), __LINE__);                                    \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)
#define CB(call)                                                                          \
    do {                                                                                  \
        cublasStatus_t e_ = (call);                                                       \
        if (e_ != CUBLAS_STATUS_SUCCESS) {                                                \
            fprintf(stderr, "bench_cuda: %s failed: %s (line %d)\n", #call,              \
                    cublasGetStatusString(e_), __LINE__);                                 \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)
#define MC(call)                                                                          \
    do {                                                                                  \
        if ((call) != MOECAL_OK) {                                                        \
            fprintf(stderr, "bench_cuda: %s failed: %s\n", #call, moecal_error_message()); \
            exit(1);                                                                      \
        }                                                                                 \
    } while (0)

static double now(void)
{
    struct timespec ts;
    clock_gettime(CLOCK_MONOTONIC, &ts);
    return (double)ts.tv_sec + 1e-9 * (double)ts.tv_nsec;
}

/* ------------------------------------------------------------------ data on the GPU */

__device__ __forceinline__ uint64_t mix(uint64_t z)
{
    z += 0x9e3779b97f4a7c15ull;
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ull;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebull;
    return z ^ (z >> 31);
}

__device__ __forceinline__ float normal(uint64_t seed, uint64_t i)
{
    uint64_t r = mix(seed ^ mix(i));
    float u = ((float)(r >> 40) + 0.5f) * (1.0f / 16777216.0f);
    float v = (float)((r >> 16) & 0xffffff) * (1.0f / 16777216.0f);
    return sqrtf(-2.0f * logf(u)) * cospif(2.0f * v);
}

__device__ __forceinline__ uint16_t to_bf16(float f)
{
    unsigned u = __float_as_uint(f);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

__global__ void gen_weights(uint16_t *w, int64_t n, uint64_t seed, float sd)
{
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x)
        w[i] = to_bf16(sd * normal(seed, (uint64_t)i));
}

/* Tokens: s_t * (N(0,1) + m_h) with m_h = +-0.5 (a shared direction), s_t =
 * exp(0.4 N), channels h % 1021 == 7 scaled by 30 (outliers). */
__global__ void gen_tokens(uint16_t *x, int64_t ntok, int H, int64_t t0, uint64_t seed)
{
    int64_t n = ntok * H;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int64_t t = i / H + t0;
        int h = (int)(i % H);
        float s = expf(0.4f * normal(seed + 1, (uint64_t)t));
        float m = (mix((uint64_t)h * 7919u) & 1) ? 0.5f : -0.5f;
        float v = s * (normal(seed, (uint64_t)(t * H + h)) + m);
        if (h % 1021 == 7)
            v *= 30.0f;
        x[i] = to_bf16(v);
    }
}

/* Gate row e: N(0, 1/H) + mu_e * m / |m|^2, mu_e ~ 0.6 N(0,1): the shared
 * direction gives expert e a mean logit of about mu_e (skewed loads). */
__global__ void gen_gate(float *g, int E, int H, uint64_t seed)
{
    int64_t n = (int64_t)E * H;
    for (int64_t i = blockIdx.x * (int64_t)blockDim.x + threadIdx.x; i < n;
         i += (int64_t)gridDim.x * blockDim.x) {
        int e = (int)(i / H), h = (int)(i % H);
        float m = (mix((uint64_t)h * 7919u) & 1) ? 0.5f : -0.5f;
        float mu = 0.6f * normal(seed + 7, (uint64_t)e);
        g[i] = normal(seed, (uint64_t)i) * rsqrtf((float)H) + mu * m / (0.25f * (float)H);
    }
}

/* ------------------------------------------------------------------ GEMM rate */

static double gemm_rate(int T, int H, int N, int reps)
{
    uint16_t *a, *b, *c;
    CK(cudaMalloc(&a, (size_t)T * H * 2));
    CK(cudaMalloc(&b, (size_t)N * H * 2));
    CK(cudaMalloc(&c, (size_t)T * N * 2));
    gen_weights<<<1024, 256>>>(a, (int64_t)T * H, 11, 1.0f);
    gen_weights<<<1024, 256>>>(b, (int64_t)N * H, 12, 0.02f);
    CK(cudaGetLastError());
    cublasHandle_t h;
    CB(cublasCreate(&h));
    CB(cublasSetMathMode(h, (cublasMath_t)(CUBLAS_DEFAULT_MATH |
                                           CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
    const float one = 1.0f, zero = 0.0f;
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    std::vector<float> ms;
    for (int r = 0; r < reps + 3; r++) {
        CK(cudaEventRecord(e0));
        CB(cublasGemmEx(h, CUBLAS_OP_T, CUBLAS_OP_N, N, T, H, &one, b, CUDA_R_16BF, H, a,
                        CUDA_R_16BF, H, &zero, c, CUDA_R_16BF, N, CUBLAS_COMPUTE_32F,
                        CUBLAS_GEMM_DEFAULT));
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float m;
        CK(cudaEventElapsedTime(&m, e0, e1));
        if (r >= 3)
            ms.push_back(m);
    }
    std::sort(ms.begin(), ms.end());
    double med = ms[ms.size() / 2] * 1e-3;
    CB(cublasDestroy(h));
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    CK(cudaFree(a));
    CK(cudaFree(b));
    CK(cudaFree(c));
    return 2.0 * T * (double)H * N / med * 1e-12;
}

/* ------------------------------------------------------------------ router kernels */

template <typename F> static double time_ms(F f, int reps)
{
    cudaEvent_t e0, e1;
    CK(cudaEventCreate(&e0));
    CK(cudaEventCreate(&e1));
    f();
    CK(cudaGetLastError());
    std::vector<float> ms;
    for (int r = 0; r < reps; r++) {
        CK(cudaEventRecord(e0));
        f();
        CK(cudaEventRecord(e1));
        CK(cudaEventSynchronize(e1));
        float m;
        CK(cudaEventElapsedTime(&m, e0, e1));
        ms.push_back(m);
    }
    CK(cudaGetLastError());
    CK(cudaEventDestroy(e0));
    CK(cudaEventDestroy(e1));
    std::sort(ms.begin(), ms.end());
    return ms[ms.size() / 2];
}

static void router_kernels(int64_t n, int H, int E)
{
    using namespace moecal_cuda;
    uint16_t *x;
    float *g, *lg, *bias;
    int32_t *sel;
    CK(cudaMalloc(&x, (size_t)n * H * 2));
    CK(cudaMalloc(&g, (size_t)E * H * 4));
    CK(cudaMalloc(&lg, (size_t)n * E * 4));
    CK(cudaMalloc(&bias, (size_t)E * 4));
    CK(cudaMalloc(&sel, (size_t)n * 8 * 4));
    gen_tokens<<<2048, 256>>>(x, n, H, 0, 5);
    gen_gate<<<1024, 256>>>(g, E, H, 6);
    CK(cudaMemset(bias, 0, (size_t)E * 4));
    CK(cudaGetLastError());
    double flop = 2.0 * (double)n * H * E;
    double *ltot;
    CK(cudaMalloc(&ltot, (size_t)n * E * 8));
    double t2 = time_ms([&] {
        dim3 grid((unsigned)((E + LG_BE - 1) / LG_BE), (unsigned)((n + LG_BT - 1) / LG_BT));
        k_logits<true><<<grid, LG_THREADS>>>(x, g, n, H, E, MOECAL_LOGITS_FP32, ltot, lg);
    }, 5);
    CK(cudaFree(ltot));
    select_params sp = {E, 8, 8, 4, 1, 1, 1, select_words(E, 8, 8, 4)};
    size_t smem = (size_t)64 * sp.words * 4;
    CK(cudaFuncSetAttribute(k_select<float>, cudaFuncAttributeMaxDynamicSharedMemorySize, (int)smem));
    double t3 = time_ms([&] {
        k_select<float><<<(unsigned)((n + 63) / 64), 64, smem>>>(lg, bias, nullptr, n, sp, sel);
    }, 5);
    printf("\n# router kernels, %lld tokens, H %d, E %d (FP64 logits, route_math.h order)\n",
           (long long)n, H, E);
    printf("#   k_logits (8x8 doubles per thread): %7.2f ms, %5.1f FP64 TFLOP/s\n", t2,
           flop / t2 * 1e-9);
    printf("#   k_select (sigmoid, 8 groups keep 4, k 8): %.2f ms\n", t3);

    /* the DGEMM router (kernels.cuh), in pieces of 8192 tokens as the backend
     * runs it; its logits must equal k_logits' bit for bit */
    {
        const int64_t P = 8192;
        const int Hp = (H + MOECAL_RM_BLOCK - 1) / MOECAL_RM_BLOCK * MOECAL_RM_BLOCK;
        const int nb = Hp / MOECAL_RM_BLOCK;
        double *gd, *gn, *xd, *xn, *ld;
        int2 *fix;
        unsigned *nfix;
        float *lg2;
        CK(cudaMalloc(&gd, (size_t)E * Hp * 8));
        CK(cudaMalloc(&gn, (size_t)E * nb * 8));
        CK(cudaMalloc(&xd, (size_t)P * Hp * 8));
        CK(cudaMalloc(&xn, (size_t)P * nb * 8));
        CK(cudaMalloc(&ld, (size_t)nb * P * E * 8));
        CK(cudaMalloc(&fix, (size_t)P * E * sizeof(int2)));
        CK(cudaMalloc(&nfix, 64));
        CK(cudaMalloc(&lg2, (size_t)n * E * 4));
        CK(cudaMemset(nfix, 0, 64));
        cublasHandle_t h;
        if (cublasCreate(&h) != CUBLAS_STATUS_SUCCESS ||
            cublasSetMathMode(h, CUBLAS_DEFAULT_MATH) != CUBLAS_STATUS_SUCCESS) {
            fprintf(stderr, "bench_cuda: cublas setup failed\n");
            exit(1);
        }
        k_gate_to_double<<<(unsigned)E, 256>>>(g, E, H, Hp, gd, gn);
        auto gamma = [](double m) { return m * 0x1p-52 / (1.0 - m * 0x1p-52); };
        const double kb = 2.0 * (gamma(MOECAL_RM_BLOCK) + gamma(nb)) * (1.0 + 0x1p-20);
        const double one = 1.0, zero = 0.0;
        const unsigned cap = (unsigned)std::min<int64_t>(P * E, 1 << 20);
        double tc = 0, tg = 0, tk = 0, tf = 0;
        for (int64_t r0 = 0; r0 < n; r0 += P) {
            int64_t m = std::min(P, n - r0);
            const uint16_t *xp = x + (size_t)r0 * H;
            float *out = lg2 + (size_t)r0 * E;
            tc += time_ms([&] { k_x_to_double<<<(unsigned)m, 256>>>(xp, m, H, Hp, xd, xn); }, 3);
            tg += time_ms([&] {
                cublasDgemmStridedBatched(h, CUBLAS_OP_T, CUBLAS_OP_N, E, (int)m,
                                          MOECAL_RM_BLOCK, &one, gd, Hp, MOECAL_RM_BLOCK, xd, Hp,
                                          MOECAL_RM_BLOCK, &zero, ld, E, (long long)m * E, nb);
            }, 3);
            tk += time_ms([&] {
                cudaMemsetAsync(nfix, 0, 4);
                k_logit_check<<<132 * 8, 256>>>(ld, nb, xn, gn, m, E, kb, MOECAL_LOGITS_FP32, out, fix, cap, nfix);
            }, 1);
            tf += time_ms([&] {
                k_logit_fix<true><<<132 * 4, 256>>>(xp, g, m, H, E, MOECAL_LOGITS_FP32, fix, cap, nfix, out);
            }, 1);
        }
        CK(cudaGetLastError());
        unsigned long long nf = 0;
        CK(cudaMemcpy(&nf, nfix + 2, sizeof nf, cudaMemcpyDeviceToHost));
        nf /= 2; /* time_ms runs each kernel once more to warm up */
        std::vector<uint32_t> a((size_t)n * E), b2((size_t)n * E);
        CK(cudaMemcpy(a.data(), lg, a.size() * 4, cudaMemcpyDeviceToHost));
        CK(cudaMemcpy(b2.data(), lg2, b2.size() * 4, cudaMemcpyDeviceToHost));
        size_t diff = 0;
        for (size_t i = 0; i < a.size(); i++)
            diff += a[i] != b2[i];
        double tsum = tc + tg + tk + tf;
        printf("#   DGEMM router: convert %.2f + DGEMM %.2f (%.1f FP64 TFLOP/s) + check %.2f + "
               "fix %.2f = %.2f ms; %llu of %lld logits recomputed; %zu differ from k_logits\n",
               tc, tg, flop / tg * 1e-9, tk, tf, tsum, nf, (long long)n * E, diff);
        if (diff != 0) {
            fprintf(stderr, "bench_cuda: the DGEMM router differs from the exact kernel\n");
            exit(1);
        }
        cublasDestroy(h);
        CK(cudaFree(gd));
        CK(cudaFree(gn));
        CK(cudaFree(xd));
        CK(cudaFree(xn));
        CK(cudaFree(ld));
        CK(cudaFree(fix));
        CK(cudaFree(nfix));
        CK(cudaFree(lg2));
    }
    CK(cudaFree(x));
    CK(cudaFree(g));
    CK(cudaFree(lg));
    CK(cudaFree(bias));
    CK(cudaFree(sel));
}

/* ------------------------------------------------------------------ the layer */

struct layer {
    moecal_model_config cfg;
    int E, H, I, k;
    std::vector<float> gate, bias;
    uint16_t *w1, *w3;        /* host [E][I][H] */
    uint16_t *x;              /* host [pool][H] */
    int64_t pool;
};

static void make_layer(layer &L, int64_t pool)
{
    memset(&L.cfg, 0, sizeof L.cfg);
    moecal_model_config &c = L.cfg;
    c.family = MOECAL_FAMILY_DEEPSEEK_V3;
    snprintf(c.model_type, sizeof c.model_type, "deepseek_v3");
    c.hidden_size = L.H = 7168;
    c.moe_intermediate_size = L.I = 2048;
    c.n_routed_experts = L.E = 256;
    c.num_experts_per_tok = L.k = 8;
    c.n_group = 8;
    c.topk_group = 4;
    c.routed_scaling_factor = 2.5;
    c.norm_topk_prob = true;
    c.scoring = MOECAL_SCORING_SIGMOID;
    snprintf(c.topk_method, sizeof c.topk_method, "noaux_tc");
    c.has_correction_bias = true;
    c.num_hidden_layers = 61;
    c.first_k_dense_replace = 3;

    const size_t wn = (size_t)L.E * L.I * L.H;
    L.pool = pool;
    L.w1 = (uint16_t *)malloc(wn * 2);
    L.w3 = (uint16_t *)malloc(wn * 2);
    L.x = (uint16_t *)malloc((size_t)pool * L.H * 2);
    if (!L.w1 || !L.w3 || !L.x) {
        fprintf(stderr, "bench_cuda: out of host memory\n");
        exit(1);
    }
    L.gate.resize((size_t)L.E * L.H);
    L.bias.resize((size_t)L.E);
    /* generate in 1 GiB slices on the GPU */
    const size_t slice = (size_t)1 << 29;
    uint16_t *d;
    CK(cudaMalloc(&d, slice * 2));
    for (int w = 0; w < 2; w++) {
        uint16_t *dst = w ? L.w3 : L.w1;
        for (size_t o = 0; o < wn; o += slice) {
            size_t n = std::min(slice, wn - o);
            /* a different seed per slice: the index restarts at 0 */
            gen_weights<<<2048, 256>>>(d, (int64_t)n, 100 + 2 * o / slice + w, 0.02f);
            CK(cudaGetLastError());
            CK(cudaMemcpy(dst + o, d, n * 2, cudaMemcpyDeviceToHost));
        }
    }
    int64_t per = (int64_t)(slice / L.H);
    for (int64_t t = 0; t < pool; t += per) {
        int64_t n = std::min(per, pool - t);
        gen_tokens<<<2048, 256>>>(d, n, L.H, t, 7);
        CK(cudaGetLastError());
        CK(cudaMemcpy(L.x + (size_t)t * L.H, d, (size_t)n * L.H * 2, cudaMemcpyDeviceToHost));
    }
    float *dg;
    CK(cudaMalloc(&dg, L.gate.size() * 4));
    gen_gate<<<1024, 256>>>(dg, L.E, L.H, 3);
    CK(cudaGetLastError());
    CK(cudaMemcpy(L.gate.data(), dg, L.gate.size() * 4, cudaMemcpyDeviceToHost));
    CK(cudaFree(dg));
    CK(cudaFree(d));
    /* correction bias: small, as in the checkpoints */
    uint64_t s = 99;
    for (int e = 0; e < L.E; e++) {
        s = s * 6364136223846793005ull + 1442695040888963407ull;
        L.bias[(size_t)e] = 0.02f * ((float)(s >> 40) / 16777216.0f - 0.5f);
    }
}

/* ------------------------------------------------------------------ runs */

struct run_result {
    std::string name;
    int64_t chunk, tokens;
    double wall, load, t[MOECAL_NPHASE];
    double tok_min, tok_med, tok_max; /* per expert, last chunk */
    int64_t routed;                   /* sum of counts */
    unsigned long long fixups;        /* router logits recomputed exactly */
    double gemm_tflops_eff;           /* useful flops / gemm time */
};

/* load_layer from FP8 (7.5 GB of e4m3 w1|w3 and their 128x128 block scales),
 * dequantized on the GPU: from pageable, then from pinned memory. */
static void fp8_load(const layer &L)
{
    const size_t wn = (size_t)L.E * L.I * L.H, ns = (size_t)L.E * (L.I / 128) * (L.H / 128);
    uint8_t *q = (uint8_t *)malloc(2 * wn);
    std::vector<float> sc(2 * ns);
    if (!q) {
        fprintf(stderr, "bench_cuda: out of host memory\n");
        exit(1);
    }
    uint64_t st = 12345;
    for (size_t i = 0; i < 2 * wn / 8; i++) {
        st ^= st << 13;
        st ^= st >> 7;
        st ^= st << 17;
        uint64_t v = st & 0xbfbfbfbfbfbfbfbfull; /* no NaN code (0x7f, 0xff) */
        memcpy(q + 8 * i, &v, 8);
    }
    for (size_t i = 0; i < 2 * ns; i++)
        sc[i] = 1.0f / 256.0f;
    moecal_backend_config bc;
    memset(&bc, 0, sizeof bc);
    bc.model = &L.cfg;
    bc.e0 = 0;
    bc.e1 = L.E;
    bc.max_chunk_tokens = 4096;
    bc.device = 0;
    moecal_layer_weights w;
    memset(&w, 0, sizeof w);
    w.layer = 3;
    w.gate = L.gate.data();
    w.bias = L.bias.data();
    w.w1_fp8 = q;
    w.w3_fp8 = q + wn;
    w.w1_scale = sc.data();
    w.w3_scale = sc.data() + ns;
    w.block = 128;
    double t[2];
    for (int pinned = 0; pinned < 2; pinned++) {
        if (pinned)
            CK(cudaHostRegister(q, 2 * wn, cudaHostRegisterDefault));
        moecal_backend *b = NULL;
        MC(moecal_backend_cuda.create(&bc, &b));
        double t0 = now();
        MC(moecal_backend_cuda.load_layer(b, &w));
        t[pinned] = now() - t0;
        moecal_backend_cuda.destroy(b);
    }
    CK(cudaHostUnregister(q));
    free(q);
    printf("# load_layer from FP8 (%.1f GB of e4m3 w1|w3, dequantized on the GPU): %.2f s from "
           "pageable memory, %.2f s pinned\n", 2.0 * wn / 1e9, t[0], t[1]);
}

static moecal_backend *make(const layer &L, int64_t chunk, bool all, double *load_s)
{
    moecal_backend_config bc;
    memset(&bc, 0, sizeof bc);
    bc.model = &L.cfg;
    bc.e0 = 0;
    bc.e1 = L.E;
    bc.max_chunk_tokens = chunk;
    bc.all_experts = all;
    bc.device = 0;
    moecal_backend *b = NULL;
    MC(moecal_backend_cuda.create(&bc, &b));
    moecal_layer_weights w;
    memset(&w, 0, sizeof w);
    w.layer = 3;
    w.gate = L.gate.data();
    w.bias = L.bias.data();
    w.w1 = L.w1;
    w.w3 = L.w3;
    double t0 = now();
    MC(moecal_backend_cuda.load_layer(b, &w));
    *load_s = now() - t0;
    return b;
}

static run_result run_topk(const layer &L, const char *name, int64_t chunk, int64_t total,
                           bool all, bool ahead = false)
{
    run_result r;
    r.name = name;
    r.chunk = chunk;
    moecal_backend *b = make(L, chunk, all, &r.load);
    std::vector<int64_t> tok((size_t)L.E);
    std::vector<float> ax((size_t)L.E), ah((size_t)L.E);
    moecal_chunk_stats st = {tok.data(), ax.data(), ah.data()};
    int64_t pos = 0;
    auto next = [&]() -> const uint16_t * {
        if (pos + chunk > L.pool)
            pos = 0;
        const uint16_t *p = L.x + (size_t)pos * L.H;
        pos += chunk;
        return p;
    };
    /* warm-up: module load, cuBLAS heuristics, first-touch */
    MC(moecal_backend_cuda.run_chunk(b, next(), chunk, NULL, &st));
    double t0[MOECAL_NPHASE], t1[MOECAL_NPHASE];
    moecal_backend_cuda.timings(b, t0);
    int64_t n = std::max<int64_t>(1, total / chunk);
    double w0 = now();
    if (ahead) {
        MC(moecal_backend_cuda_submit_chunk(b, next(), chunk, NULL));
        for (int64_t i = 0; i < n; i++) {
            if (i + 1 < n)
                MC(moecal_backend_cuda_submit_chunk(b, next(), chunk, NULL));
            MC(moecal_backend_cuda_finish_chunk(b, &st));
        }
    } else {
        for (int64_t i = 0; i < n; i++)
            MC(moecal_backend_cuda.run_chunk(b, next(), chunk, NULL, &st));
    }
    r.wall = now() - w0;
    moecal_backend_cuda.timings(b, t1);
    for (int i = 0; i < MOECAL_NPHASE; i++)
        r.t[i] = t1[i] - t0[i];
    r.tokens = n * chunk;
    std::vector<double> c(tok.begin(), tok.end());
    std::sort(c.begin(), c.end());
    r.tok_min = c.front();
    r.tok_med = c[c.size() / 2];
    r.tok_max = c.back();
    r.routed = 0;
    for (int64_t v : tok)
        r.routed += v;
    double flops_per_row = 2.0 * L.H * 2.0 * L.I;
    double rows = all ? (double)r.tokens * L.E : (double)r.tokens * L.k;
    r.gemm_tflops_eff = r.t[MOECAL_PHASE_GEMM] > 0 ? rows * flops_per_row / r.t[MOECAL_PHASE_GEMM] * 1e-12 : 0.0;
    r.fixups = moecal_backend_cuda_router_fixups(b);
    moecal_backend_cuda.destroy(b);
    return r;
}

/* Token counts and amax(x) of one chunk against the host reference. */
static void check_chunk(const layer &L, int64_t n)
{
    double ld;
    moecal_backend *b = make(L, n, false, &ld);
    std::vector<int64_t> tok((size_t)L.E), ref((size_t)L.E, 0);
    std::vector<float> ax((size_t)L.E), ah((size_t)L.E), rax((size_t)L.E, 0.0f);
    moecal_chunk_stats st = {tok.data(), ax.data(), ah.data()};
    MC(moecal_backend_cuda.run_chunk(b, L.x, n, NULL, &st));
    moecal_backend_cuda.destroy(b);

    std::vector<float> lg((size_t)L.E);
    std::vector<int32_t> sel((size_t)L.k);
    for (int64_t t = 0; t < n; t++) {
        const uint16_t *xr = L.x + (size_t)t * L.H;
        float m = 0.0f;
        for (int h = 0; h < L.H; h++)
            m = std::max(m, fabsf(moecal_rm_bf16(xr[h])));
        for (int e = 0; e < L.E; e++)
            lg[(size_t)e] = moecal_route_logit(xr, L.gate.data() + (size_t)e * L.H, (size_t)L.H);
        MC(moecal_router_select(&L.cfg, lg.data(), L.bias.data(), 1, sel.data(), NULL));
        for (int i = 0; i < L.k; i++) {
            ref[(size_t)sel[(size_t)i]]++;
            rax[(size_t)sel[(size_t)i]] = std::max(rax[(size_t)sel[(size_t)i]], m);
        }
    }
    int bad_tok = 0, bad_ax = 0;
    for (int e = 0; e < L.E; e++) {
        bad_tok += tok[(size_t)e] != ref[(size_t)e];
        bad_ax += ax[(size_t)e] != rax[(size_t)e];
    }
    printf("# check: %lld tokens, DeepSeek-V3 router: %d experts with other token counts, "
           "%d with other amax(x) than the host reference%s\n", (long long)n, bad_tok, bad_ax,
           bad_tok + bad_ax ? "  <-- MISMATCH" : " (identical)");
}

int main(int argc, char **argv)
{
    bool quick = false, check = true;
    int64_t total = 262144;
    for (int i = 1; i < argc; i++) {
        if (strcmp(argv[i], "--quick") == 0)
            quick = true;
        else if (strcmp(argv[i], "--no-check") == 0)
            check = false;
        else if (strcmp(argv[i], "--tokens") == 0 && i + 1 < argc)
            total = atoll(argv[++i]);
        else {
            fprintf(stderr, "usage: bench_cuda [--quick] [--no-check] [--tokens N]\n");
            return 2;
        }
    }
    if (!moecal_backend_cuda.available()) {
        fprintf(stderr, "bench_cuda: no CUDA device\n");
        return 77;
    }
    cudaDeviceProp pr;
    CK(cudaGetDeviceProperties(&pr, 0));
    int drv = 0, rtv = 0;
    CK(cudaDriverGetVersion(&drv));
    CK(cudaRuntimeGetVersion(&rtv));
    char bus[32] = "?";
    CK(cudaDeviceGetPCIBusId(bus, sizeof bus, 0));
    time_t tt = time(NULL);
    char date[32];
    strftime(date, sizeof date, "%Y-%m-%d %H:%M", gmtime(&tt));
    printf("# bench_cuda (%s), %s UTC\n", MOECAL_BUILD_OPTIONS, date);
    printf("# device: %s (%s), %d SMs, %.1f GiB, driver %d, runtime %d, cuBLAS %d\n", pr.name,
           bus, pr.multiProcessorCount, (double)pr.totalGlobalMem / 1073741824.0, drv, rtv,
           CUBLAS_VERSION);

    layer L;
    const int64_t pool = quick ? 32768 : 131072 * 2;
    make_layer(L, pool);
    printf("# layer: H %d, I %d, E %d, k %d, groups 8 keep 4; token pool %lld\n", L.H, L.I, L.E,
           L.k, (long long)pool);

    /* 1. cuBLAS GEMM rate, the expert GEMM's shape */
    printf("\n# cuBLAS bf16 GEMM [T x %d] x [%d x %d], float32 accumulation, bf16 out\n", L.H,
           L.H, 2 * L.I);
    const int Ts[] = {128, 512, 1024, 4096, 16384, 32768};
    double peak = 0.0;
    for (int T : Ts) {
        double r = gemm_rate(T, L.H, 2 * L.I, quick ? 5 : 20);
        peak = std::max(peak, r);
        printf("#   T %6d: %6.1f TFLOP/s\n", T, r);
    }

    router_kernels(32768, L.H, L.E);
    if (check)
        check_chunk(L, 1024);

    /* 2. the backend: weights from pageable memory once (load time), then
     * pinned; token chunks pageable (the driver's MPI windows today), then
     * pinned (a driver that registers its windows) */
    std::vector<run_result> res;
    const int64_t t_small = quick ? 32768 : total;
    res.push_back(run_topk(L, "top-k 131072 pageable", 131072, total, false));
    const double load_pageable = res.back().load;
    const size_t wn = (size_t)L.E * L.I * L.H * 2;
    CK(cudaHostRegister(L.w1, wn, cudaHostRegisterDefault));
    CK(cudaHostRegister(L.w3, wn, cudaHostRegisterDefault));
    res.push_back(run_topk(L, "top-k 131072 pageable ahead", 131072, total, false, true));
    res.push_back(run_topk(L, "top-k 32768 pageable ahead", 32768, t_small, false, true));
    CK(cudaHostRegister(L.x, (size_t)L.pool * L.H * 2, cudaHostRegisterDefault));
    res.push_back(run_topk(L, "top-k 4096 pinned", 4096, t_small, false));
    res.push_back(run_topk(L, "top-k 4096 pinned ahead", 4096, t_small, false, true));
    res.push_back(run_topk(L, "top-k 32768 pinned", 32768, t_small, false));
    res.push_back(run_topk(L, "top-k 32768 pinned ahead", 32768, t_small, false, true));
    res.push_back(run_topk(L, "top-k 131072 pinned", 131072, total, false));
    res.push_back(run_topk(L, "top-k 131072 pinned ahead", 131072, total, false, true));
    setenv("MOECAL_CUDA_ROUTER", "exact", 1);
    res.push_back(run_topk(L, "top-k 131072 ahead, FP64 kernel", 131072, total, false, true));
    res.push_back(run_topk(L, "top-k 32768 ahead, FP64 kernel", 32768, t_small, false, true));
    unsetenv("MOECAL_CUDA_ROUTER");
    if (!quick) {
        setenv("MOECAL_CUDA_STEP", "65536", 1);
        res.push_back(run_topk(L, "top-k 131072 ahead step 65536", 131072, total, false, true));
        setenv("MOECAL_CUDA_STEP", "131072", 1);
        res.push_back(run_topk(L, "top-k 131072 ahead step 131072", 131072, total, false, true));
        unsetenv("MOECAL_CUDA_STEP");
        /* stream priorities (backend_cuda.cu: MOECAL_CUDA_PRIO) */
        setenv("MOECAL_CUDA_PRIO", "1", 1);
        res.push_back(run_topk(L, "top-k 131072 ahead, GEMMs first", 131072, total, false, true));
        setenv("MOECAL_CUDA_PRIO", "2", 1);
        res.push_back(run_topk(L, "top-k 131072 ahead, route first", 131072, total, false, true));
        res.push_back(run_topk(L, "top-k 32768 ahead, route first", 32768, t_small, false, true));
        unsetenv("MOECAL_CUDA_PRIO");
        setenv("MOECAL_CUDA_PIECE", "16384", 1);
        res.push_back(run_topk(L, "top-k 131072 ahead piece 16384", 131072, total, false, true));
        unsetenv("MOECAL_CUDA_PIECE");
    }
    res.push_back(run_topk(L, "all-experts 16384 pinned", 16384, quick ? 16384 : 32768, true));

    printf("\n# load_layer (15.0 GB of w1|w3): %.2f s from pageable memory, %.2f s pinned\n",
           load_pageable, res[1].load);
    printf("# copy threads for pageable chunks: %d (cfg->threads = 0)\n",
           std::min(8, (int)std::thread::hardware_concurrency()));
    printf("# time split: GPU seconds per phase (phases of different steps overlap)\n");
    printf("%-32s %7s %10s %8s %7s %7s %7s %7s %7s %8s %6s %s\n", "run", "chunk", "tokens/s",
           "wall s", "route", "gather", "gemm", "act", "copy", "gemmTF/s", "ofpeak",
           "tokens/expert min/med/max, router fixups");
    for (const run_result &r : res) {
        printf("%-32s %7lld %10.0f %8.3f %7.3f %7.3f %7.3f %7.3f %7.3f %8.1f %5.0f%% "
               "%.0f/%.0f/%.0f %llu\n",
               r.name.c_str(), (long long)r.chunk, (double)r.tokens / r.wall, r.wall,
               r.t[MOECAL_PHASE_ROUTE], r.t[MOECAL_PHASE_GATHER], r.t[MOECAL_PHASE_GEMM],
               r.t[MOECAL_PHASE_ACT], r.t[MOECAL_PHASE_COPY], r.gemm_tflops_eff,
               100.0 * r.gemm_tflops_eff / peak, r.tok_min, r.tok_med, r.tok_max, r.fixups);
    }
    printf("# peak measured cuBLAS rate above: %.1f TFLOP/s; top-k roofline at that rate: %.0f "
           "tokens/s\n", peak, peak * 1e12 / (L.k * 2.0 * L.H * 2.0 * L.I));
    CK(cudaHostUnregister(L.x));
    CK(cudaHostUnregister(L.w1));
    CK(cudaHostUnregister(L.w3));
    free(L.w1);
    free(L.w3);
    L.w1 = L.w3 = NULL;
    fp8_load(L);
    free(L.x);
    return 0;
}
