/* backend_cuda.cu - the CUDA compute backend (cuBLAS and own kernels).
 *
 * Per layer, the rank's w1 and w3 (bf16) go to the GPU once, as one
 * [2I x H] matrix per local expert (w1 rows, then w3 rows), so a single GEMM
 * per expert gives a = x W1^T and b = x W3^T side by side; the router weight
 * stays float32.  Non-finite weights are refused as the CPU backend refuses
 * them, with the same messages.
 *
 * A chunk is processed in steps of at most `step` tokens (65536 in top-k
 * mode, 16384 in all-experts mode, fewer when the memory limit asks for it),
 * each copied and routed in pieces of 8192 tokens.  Counts add up and amax
 * are maxima, so the results do not depend on step or piece sizes.  Per
 * step, on the GPU:
 *   route   per piece, as soon as it has arrived: row max |x| (exact, integer
 *           max of bf16 magnitudes); router logits in double, ascending h,
 *           rounded to float (route_math.h); the model's selection, one
 *           thread per token, the float32 operations of router.c with
 *           route_math.h's exp; per local expert: token
 *           counts, amax(x) (integer atomicMax), a prefix sum and each
 *           selection's row in the gathered matrix (counting sort); the
 *           counts (nloc ints) go to the host, which needs them to size the
 *           GEMMs: one small copy per step, never one per expert;
 *   gather  the rows of each local expert, contiguous: one warp per token
 *           reads its row once and writes it to each of its local experts;
 *   gemm    per expert [n_e x H] x [H x 2I], bf16 in, float32 accumulation,
 *           bf16 out: cublasGemmEx on several streams, largest expert first
 *           (one cublasGemmGroupedBatchedEx call measured 2.5x slower);
 *   act     one kernel: h = bf16(bf16(silu(a)) * b) and max |h| per expert
 *           (integer atomicMax on the bits of |h|, NaN above everything).
 * All-experts mode skips the router: experts are taken in groups whose
 * weights are contiguous, one GEMM [n x H] x [H x 2I*group] per group, two
 * groups in flight on two streams with their activation pass.
 *
 * Pipelining: the steps of all submitted chunks form one sequence; the
 * host->device copy of step j+1 (copy stream) and its routing (route stream,
 * piece by piece behind the copy) overlap the gather/GEMM/activation of step
 * j (compute streams); the host waits only for each step's counts, while the
 * GPU is still busy with the previous step's GEMMs.  run_chunk submits one
 * chunk and finishes it; submit_chunk/finish_chunk (backend_cuda.h) let the
 * next chunk's first steps overlap this chunk's last ones.  Chunks in pinned
 * memory (cudaHostRegister'ed or
 * cudaMallocHost) are copied by DMA directly; pageable ones are staged piece
 * by piece into a ring of pinned buffers by the backend's copy threads
 * (cfg->threads, else up to 8), while the previous piece is in flight.  Only
 * the counts and the two amax arrays come back per chunk.
 *
 * Why the router is not a cuBLAS SGEMM: the selection must be identical to
 * the CPU backend's for the same inputs, and a float32 GEMM's summation order
 * (hence its last bit, hence a top-k choice on a near-tie) belongs to the
 * library.  route_math.h defines the logits and exp bit for bit, and the CPU
 * backend and router.c follow it too; the cost is
 * an FP64 GEMM of [n x H] x [H x E] (0.8% of the expert GEMM's FLOPs for
 * DeepSeek-V3, at a twenty-third of the bf16 rate: bench/NOTES-cuda.md).
 *
 * Tuning knobs (read once by create; backend_cuda_ops.c declares them as
 * calibrate options, so --cuda-step, MOECAL_CUDA_STEP or a conf key set
 * them; without the command's options, as in the tests and the benchmark,
 * the MOECAL_CUDA_* variables are read directly): cuda-step (tokens per
 * step), cuda-piece (tokens per copy/route piece), cuda-streams (GEMM
 * streams, 1 to 8), cuda-prio (stream priorities: 0 none, 1 GEMMs high, 2
 * routing high), cuda-router (dgemm, the default: route_math.h's block sums
 * from a cuBLAS DGEMM with an error bound, the logits the bound cannot settle
 * recomputed exactly; or exact: the FP64 kernel alone; same bits either way,
 * see kernels.cuh).
 *
 * Memory: create computes what the shard needs (weights plus the step's
 * buffers) and refuses with MOECAL_ERR_NOMEM, giving the sizes, when that
 * exceeds --gpu-mem-limit (or the free memory when no limit is given), after
 * trying smaller steps.  No managed memory.  Every CUDA and cuBLAS call is
 * checked; errors read "rank R GPU <bus id>: <call> failed: <reason>".
 */
#include "config.h"

#include <errno.h>
#include <math.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include <sched.h>

#include <algorithm>
#include <condition_variable>
#include <mutex>
#include <thread>
#include <vector>

#include <cublas_v2.h>
#include <cuda_runtime.h>

#include "backend.h"
#include "fp8.h"
#include "router.h"

#include "backend_cuda.h"
#include "options.h"
#include "kernels.cuh"

using namespace moecal_cuda;

namespace {

enum { MAX_STREAMS = 8 };

constexpr int64_t STEP_TOPK = 65536;     /* tokens per step, top-k mode (32768: -2%) */
constexpr int64_t STEP_ALL = 16384;      /* tokens per step, all-experts mode */
constexpr int64_t STEP_MIN = 256;        /* smallest step tried under a memory limit */
constexpr int64_t PIECE = 8192;          /* tokens per copy/route piece */
constexpr int NSLOTS = 4;                /* pinned staging buffers (one piece each) */
constexpr int MAX_COPY_THREADS = 8;
constexpr int ACT_ROWS = 16;             /* rows per activation block (top-k) */
constexpr int ALL_GROUP = 8;             /* experts per GEMM in all-experts mode */
constexpr size_t WS_BYTES = 32u << 20;   /* cuBLAS workspace per handle (Hopper) */
constexpr double GIB = 1024.0 * 1024.0 * 1024.0;

/* Host-side plan of one step's GEMMs (top-k), sized nloc at create. */
struct gemm_args {
    std::vector<int64_t> off;     /* first row of each local expert */
    std::vector<int> order;       /* experts with tokens, by count, descending */
};

/* memcpy split over a few persistent threads (and the caller): staging
 * pageable chunks into pinned buffers goes at memory speed, not at the
 * 6.5 GB/s that one thread (or the driver's own staging) reaches. */
class copy_pool {
public:
    /* n helper threads; fewer when threads cannot be had */
    explicit copy_pool(int n)
    {
        for (int i = 0; i < n; i++) {
            try {
                th_.emplace_back(&copy_pool::work, this, i + 1);
            } catch (...) {
                break;
            }
        }
    }
    ~copy_pool()
    {
        {
            std::lock_guard<std::mutex> l(m_);
            stop_ = true;
        }
        cv_.notify_all();
        for (std::thread &t : th_)
            t.join();
    }
    void copy(void *dst, const void *src, size_t n)
    {
        const size_t parts = th_.size() + 1;
        if (th_.empty() || n < ((size_t)4 << 20)) {
            memcpy(dst, src, n);
            return;
        }
        {
            std::lock_guard<std::mutex> l(m_);
            dst_ = (char *)dst;
            src_ = (const char *)src;
            n_ = n;
            per_ = (n / parts + 4095) & ~(size_t)4095;
            pending_ = (int)th_.size();
            gen_++;
        }
        cv_.notify_all();
        slice(0);
        std::unique_lock<std::mutex> l(m_);
        done_.wait(l, [this] { return pending_ == 0; });
    }

private:
    void slice(size_t i)
    {
        size_t a = std::min(n_, i * per_), z = std::min(n_, a + per_);
        if (z > a)
            memcpy(dst_ + a, src_ + a, z - a);
    }
    void work(size_t id)
    {
        uint64_t seen = 0;
        for (;;) {
            {
                std::unique_lock<std::mutex> l(m_);
                cv_.wait(l, [&] { return stop_ || gen_ != seen; });
                if (stop_)
                    return;
                seen = gen_;
            }
            slice(id);
            std::lock_guard<std::mutex> l(m_);
            if (--pending_ == 0)
                done_.notify_one();
        }
    }
    std::vector<std::thread> th_;
    std::mutex m_;
    std::condition_variable cv_, done_;
    uint64_t gen_ = 0;
    int pending_ = 0;
    bool stop_ = false;
    char *dst_ = nullptr;
    const char *src_ = nullptr;
    size_t n_ = 0, per_ = 0;
};

/* A begin/end pair of timing events and the phase it is charged to. */
struct timed {
    int phase;
    cudaEvent_t a, b;
};

/* A submitted chunk (at most two in flight). */
struct chunk_slot {
    const uint16_t *x;
    const uint8_t *skip;
    int64_t ntok, nsteps;
    int64_t first;           /* global index of its first step */
    int64_t nvalid;          /* rows not skipped (all-experts mode) */
    bool pinned;             /* x is page-locked: DMA straight from it */
    unsigned *ax, *ah;       /* device [nloc + 1] amax bits; ax[nloc]: all rows */
    unsigned *h_ax, *h_ah;   /* pinned copies */
    cudaEvent_t done;        /* the results have reached h_ax, h_ah */
    std::vector<int64_t> *tokens;   /* [nloc] */
};

} /* namespace */

struct moecal_backend {
    moecal_model_config model;    /* scalars only (moe_layers not kept) */
    int E, H, NI, k, e0, nloc, rank, dev;
    int64_t max_tok, step, piece;
    bool all_experts;
    int nstreams, all_group, copy_threads;
    int prio;                     /* MOECAL_CUDA_PRIO: 0 none, 1 GEMMs high, 2 routing high */
    int layer;                    /* -1 until a layer is loaded */
    bool has_bias;
    char where[96];               /* "rank R GPU 0000:3b:00.0" */

    /* device */
    float *gate, *bias;
    uint16_t *w13;                /* [nloc][2I][H] */
    uint16_t *x[2];               /* [step][H] */
    uint8_t *skip[2];
    unsigned *rowmax[2];
    float *logits;                /* [piece][E] */
    bool dgemm_router;            /* logits by DGEMM + exactness check (else k_logits) */
    int prec;                     /* --router-logits (moecal_logit_prec); exact: the
                                   * logits stay double, in ltot */
    double *gate_d, *gnorm;       /* [E][Hp], [E][nb] */
    double *xd, *xnorm, *ld;      /* [piece][Hp], [piece][nb], [nb][piece][E] */
    double *ltot;                 /* [piece][E]: block totals of the exact kernel */
    int2 *fix;                    /* [fix_cap] (t, e) to recompute */
    unsigned *nfix;               /* [0] this piece's count; [2..3] total (uint64) */
    unsigned fixcap;
    cublasHandle_t blas_route;
    int32_t *sel;                 /* [step][k] */
    int *cnt[2], *offs[2], *fill[2];
    int32_t *list[2];             /* top-k: [step * k] rows in xg (k_fill); all-experts: [step] */
    uint16_t *xg;                 /* gathered rows; FP8 staging in load_layer */
    size_t xg_bytes;
    uint16_t *ab[2];              /* GEMM outputs (top-k uses ab[0]) */
    act_item *items[2];
    int *nvalid;
    unsigned long long *first;
    void *ws[MAX_STREAMS];

    /* host, pinned */
    int *h_cnt[2];
    act_item *h_items[2];
    uint8_t *h_skip[2];
    uint16_t *stage[NSLOTS];      /* staging of pageable chunks, made on first use */
    cudaEvent_t stage_ev[NSLOTS];
    unsigned stage_next;

    /* the step pipeline: steps of all submitted chunks in one sequence;
     * step j uses the buffers of parity j % 2 */
    chunk_slot chunk[2];          /* chunk c in chunk[c % 2] */
    int64_t c_sub, c_fin;         /* chunks submitted, finished */
    int64_t g_total;              /* steps submitted */
    int64_t g_routed, g_computed; /* steps uploaded and routed; steps whose
                                   * gather/GEMM/act are enqueued */
    int *h_nvalid;

    /* host, pageable */
    gemm_args *gemm;
    copy_pool *copier;
    int64_t max_items;

    cudaStream_t s_copy, s_route, s_comp, s_gemm[MAX_STREAMS];
    cublasHandle_t blas[MAX_STREAMS];
    cudaEvent_t ev_copied[2], ev_counted[2], ev_gathered[2], ev_fork, ev_join[MAX_STREAMS];
    std::vector<cudaEvent_t> *ev_piece[2];   /* each piece of a step copied */
    std::vector<cudaEvent_t> *pool;   /* free timing events */
    std::vector<timed> *marks;        /* timed regions not yet charged */

    int sel_threads;
    size_t sel_smem;
    double t[MOECAL_NPHASE];
};

namespace {

/* ------------------------------------------------------------------ errors */

/* "cudaMemcpyAsync(b->x[0], ...)" -> "cudaMemcpyAsync(...)" */
void call_name(const char *expr, char *out, size_t n)
{
    size_t i = 0;
    while (expr[i] != '\0' && expr[i] != '(' && i + 6 < n) {
        out[i] = expr[i];
        i++;
    }
    snprintf(out + i, n - i, "%s", expr[i] == '(' ? "(...)" : "");
}

moecal_status cuda_fail(const char *where, const char *expr, const char *why, const char *file,
                        int line)
{
    char name[96];
    call_name(expr, name, sizeof name);
#ifdef MOECAL_DEBUG
    return moecal_error_set(MOECAL_ERR_CUDA, "%s: %s failed: %s (%s:%d)", where, name, why, file,
                            line);
#else
    (void)file;
    (void)line;
    return moecal_error_set(MOECAL_ERR_CUDA, "%s: %s failed: %s", where, name, why);
#endif
}

} /* namespace */

/* Evaluate a CUDA runtime call once; on failure record MOECAL_ERR_CUDA and
 * return it from the enclosing function. */
#define CUDA_CHECK(where, call)                                                          \
    do {                                                                                 \
        cudaError_t cu_e_ = (call);                                                      \
        if (cu_e_ != cudaSuccess)                                                        \
            return cuda_fail((where), #call, cudaGetErrorString(cu_e_), __FILE__, __LINE__); \
    } while (0)

#define CUBLAS_CHECK(where, call)                                                        \
    do {                                                                                 \
        cublasStatus_t cb_e_ = (call);                                                   \
        if (cb_e_ != CUBLAS_STATUS_SUCCESS)                                              \
            return cuda_fail((where), #call, cublasGetStatusString(cb_e_), __FILE__, __LINE__); \
    } while (0)

/* After a kernel launch: a bad launch configuration, reported by name. */
#define LAUNCH_CHECK(where, name)                                                        \
    do {                                                                                 \
        cudaError_t cu_e_ = cudaGetLastError();                                          \
        if (cu_e_ != cudaSuccess)                                                        \
            return cuda_fail((where), "kernel " name, cudaGetErrorString(cu_e_), __FILE__, \
                             __LINE__);                                                  \
    } while (0)

namespace {

int64_t ceil_div(int64_t a, int64_t b)
{
    return (a + b - 1) / b;
}

/* Checked a * b (sizes from the model config, already range-checked). */
bool mul_ok(size_t a, size_t b, size_t *out)
{
    return !__builtin_mul_overflow(a, b, out);
}

/* ------------------------------------------------------------------ memory plan */

/* Every device allocation, by name; need = sum.  Allocation uses the same
 * numbers, so the check and the allocation cannot disagree. */
struct plan {
    size_t weights, gate, bias, x, skip, rowmax, logits, sel, cnt, list, xg, ab, items, amax, ws;
    size_t rgate, rpiece, fix;   /* the DGEMM router: gate, per piece, fix list */
    int n_ab;      /* GEMM output buffers: 1 (top-k), 2 (all-experts) */
    bool ok;
    size_t chunk_bytes() const
    {
        return x * 2 + skip * 2 + rowmax * 2 + logits + sel + cnt * 6 + list * 2 + xg +
               ab * (size_t)n_ab + items * 2 + amax * 4 + ws + rgate + rpiece + fix + 64;
    }
    size_t total() const { return weights + gate + bias + chunk_bytes(); }
};

/* Entries of the DGEMM router's fix list (more fall back to recomputing the
 * whole piece, see k_logit_fix). */
int padded_h(int H)
{
    return (H + MOECAL_RM_BLOCK - 1) / MOECAL_RM_BLOCK * MOECAL_RM_BLOCK;
}

unsigned fix_cap(size_t piece, size_t E)
{
    return (unsigned)std::min<size_t>(piece * E, (size_t)1 << 20);
}

plan make_plan(const moecal_backend *b, int64_t step)
{
    plan p = {};
    size_t H = (size_t)b->H, I2 = 2 * (size_t)b->NI, nloc = (size_t)b->nloc;
    size_t S = (size_t)step, K = (size_t)b->k, E = (size_t)b->E;
    size_t t1;
    bool ok = true;

    ok &= mul_ok(nloc, I2, &t1) && mul_ok(t1, H * 2, &p.weights);
    ok &= mul_ok(E, H * 4, &p.gate);
    p.bias = E * 4;
    ok &= mul_ok(S, H * 2, &p.x);
    p.skip = S;
    p.rowmax = S * 4;
    p.cnt = (nloc + 1) * 4;
    p.amax = (nloc + 1) * 4;
    p.ws = (size_t)b->nstreams * WS_BYTES;
    if (b->all_experts) {
        p.list = S * 4;
        p.xg = p.x;
        ok &= mul_ok(S, I2 * (size_t)b->all_group * 2, &p.ab);
        p.n_ab = 2;
    } else {
        ok &= mul_ok((size_t)std::min<int64_t>(step, b->piece), E * 4, &p.logits);
        p.sel = S * K * 4;
        p.list = S * K * 4;
        ok &= mul_ok(S * K, H * 2, &p.xg);
        ok &= mul_ok(S * K, I2 * 2, &p.ab);
        p.n_ab = 1;
        p.items = ((S * K) / ACT_ROWS + nloc + 1) * sizeof(act_item);
        /* the exact kernel's block totals [piece][E] */
        size_t P = (size_t)std::min<int64_t>(step, b->piece);
        ok &= mul_ok(P, E * 8, &p.rpiece);
        if (b->dgemm_router) {
            /* gate in double (rows padded to whole blocks) and its norms; per
             * piece x in double, norms, the block sums D */
            size_t Hp = (size_t)padded_h(b->H), nb = Hp / MOECAL_RM_BLOCK, xd, d;
            ok &= mul_ok(E, Hp * 8, &p.rgate);
            p.rgate += E * nb * 8;
            ok &= mul_ok(P, Hp * 8, &xd);
            ok &= mul_ok(nb, P * E * 8, &d);
            p.rpiece += xd + P * nb * 8 + d;
            p.fix = (size_t)fix_cap(P, E) * sizeof(int2) + 64;
        }
    }
    if (nloc > 0) {
        /* load_layer stages one expert's FP8 w1 or w3 and scales in xg */
        size_t B = (size_t)std::max(1, b->model.weight_block[0]), q, sc;
        ok &= mul_ok((size_t)b->NI, H, &q);
        sc = ((size_t)b->NI + B - 1) / B * ((H + B - 1) / B) * 4;
        p.xg = std::max(p.xg, q + ((sc + 255) & ~(size_t)255) + 256);
    }
    p.ok = ok;
    return p;
}

/* ------------------------------------------------------------------ timing marks */

moecal_status mark_begin(moecal_backend *b, int phase, cudaStream_t s, size_t *id)
{
    while (b->pool->size() < 2) {
        cudaEvent_t e;
        CUDA_CHECK(b->where, cudaEventCreate(&e));
        b->pool->push_back(e);
    }
    timed m;
    m.phase = phase;
    m.a = b->pool->back();
    b->pool->pop_back();
    m.b = b->pool->back();
    b->pool->pop_back();
    b->marks->push_back(m);
    *id = b->marks->size() - 1;
    CUDA_CHECK(b->where, cudaEventRecord(m.a, s));
    return MOECAL_OK;
}

moecal_status mark_end(moecal_backend *b, size_t id, cudaStream_t s)
{
    CUDA_CHECK(b->where, cudaEventRecord((*b->marks)[id].b, s));
    return MOECAL_OK;
}

/* Charge the GPU time of every region that has completed; the others (work
 * of a chunk still in flight) wait for a later call. */
moecal_status marks_harvest(moecal_backend *b)
{
    std::vector<timed> &ms = *b->marks;
    size_t keep = 0;
    for (size_t i = 0; i < ms.size(); i++) {
        cudaError_t q = cudaEventQuery(ms[i].b);
        if (q == cudaErrorNotReady) {
            ms[keep++] = ms[i];
            continue;
        }
        CUDA_CHECK(b->where, q);
        float t = 0.0f;
        CUDA_CHECK(b->where, cudaEventElapsedTime(&t, ms[i].a, ms[i].b));
        b->t[ms[i].phase] += 1e-3 * (double)t;
        b->pool->push_back(ms[i].a);
        b->pool->push_back(ms[i].b);
    }
    ms.resize(keep);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ lifetime */

void cuda_destroy(moecal_backend *b)
{
    if (b == NULL)
        return;
    /* best effort: finish what is in flight, then release everything */
    if (b->dev >= 0)
        (void)cudaSetDevice(b->dev);
    if (b->s_copy)
        (void)cudaStreamSynchronize(b->s_copy);
    if (b->s_route)
        (void)cudaStreamSynchronize(b->s_route);
    if (b->s_comp)
        (void)cudaStreamSynchronize(b->s_comp);
    for (int i = 0; i < MAX_STREAMS; i++) {
        if (b->s_gemm[i])
            (void)cudaStreamSynchronize(b->s_gemm[i]);
        if (b->blas[i])
            (void)cublasDestroy(b->blas[i]);
        if (b->ws[i])
            (void)cudaFree(b->ws[i]);
        if (b->s_gemm[i])
            (void)cudaStreamDestroy(b->s_gemm[i]);
        if (b->ev_join[i])
            (void)cudaEventDestroy(b->ev_join[i]);
    }
    if (b->blas_route)
        (void)cublasDestroy(b->blas_route);
    void *dptr[] = {b->gate, b->bias, b->w13, b->logits, b->sel, b->xg, b->nvalid, b->first,
                    b->gate_d, b->gnorm, b->xd, b->xnorm, b->ld, b->fix, b->nfix, b->ltot};
    for (void *p : dptr)
        if (p)
            (void)cudaFree(p);
    for (int i = 0; i < 2; i++) {
        void *dp[] = {b->x[i], b->skip[i], b->rowmax[i], b->cnt[i], b->offs[i], b->fill[i],
                      b->list[i], b->items[i], b->ab[i]};
        for (void *p : dp)
            if (p)
                (void)cudaFree(p);
        void *hp[] = {b->h_cnt[i], b->h_items[i], b->h_skip[i]};
        for (void *p : hp)
            if (p)
                (void)cudaFreeHost(p);
        cudaEvent_t ev[] = {b->ev_copied[i], b->ev_counted[i], b->ev_gathered[i]};
        for (cudaEvent_t e : ev)
            if (e)
                (void)cudaEventDestroy(e);
        if (b->ev_piece[i]) {
            for (cudaEvent_t e : *b->ev_piece[i])
                (void)cudaEventDestroy(e);
            delete b->ev_piece[i];
        }
    }
    for (int i = 0; i < NSLOTS; i++) {
        if (b->stage[i])
            (void)cudaFreeHost(b->stage[i]);
        if (b->stage_ev[i])
            (void)cudaEventDestroy(b->stage_ev[i]);
    }
    for (chunk_slot &c : b->chunk) {
        if (c.ax)
            (void)cudaFree(c.ax);
        if (c.ah)
            (void)cudaFree(c.ah);
        if (c.h_ax)
            (void)cudaFreeHost(c.h_ax);
        if (c.h_ah)
            (void)cudaFreeHost(c.h_ah);
        if (c.done)
            (void)cudaEventDestroy(c.done);
        delete c.tokens;
    }
    delete b->copier;
    void *hp[] = {b->h_nvalid};
    for (void *p : hp)
        if (p)
            (void)cudaFreeHost(p);
    if (b->ev_fork)
        (void)cudaEventDestroy(b->ev_fork);
    if (b->pool) {
        for (cudaEvent_t e : *b->pool)
            (void)cudaEventDestroy(e);
        delete b->pool;
    }
    if (b->marks) {
        for (const timed &m : *b->marks) {
            (void)cudaEventDestroy(m.a);
            (void)cudaEventDestroy(m.b);
        }
        delete b->marks;
    }
    delete b->gemm;
    cudaStream_t st[] = {b->s_copy, b->s_route, b->s_comp};
    for (cudaStream_t s : st)
        if (s)
            (void)cudaStreamDestroy(s);
    free(b);
}

bool cuda_available(void)
{
    int n = 0;
    cudaError_t e = cudaGetDeviceCount(&n);
    if (e != cudaSuccess) {
        (void)cudaGetLastError();
        return false;
    }
    return n > 0;
}

long env_long(const char *name, long def, long lo, long hi)
{
    const char *v = getenv(name);
    if (v == NULL || *v == '\0')
        return def;
    char *end;
    errno = 0;
    long r = strtol(v, &end, 10);
    if (errno != 0 || *end != '\0' || r < lo || r > hi)
        return def;
    return r;
}

/* A knob: the command's option (st, its settings as bound; 0 meaning def
 * where auto0), else (no options) the environment variable, else def. */
long knob(const moecal_cuda_settings *st, long long moecal_cuda_settings::*field,
          const char *env, long def, long lo, long hi, bool auto0)
{
    if (st) {
        long long v = st->*field;
        return auto0 && v == 0 ? def : (long)v;
    }
    return env_long(env, def, lo, hi);
}

/* The command's settings of this backend in *st; NULL without options. */
const moecal_cuda_settings *cuda_settings(const moecal_backend_config *cfg,
                                          moecal_cuda_settings *st)
{
    if (cfg->opts == NULL ||
        moecal_opts_bind(cfg->opts, moecal_backend_cuda.options, st) != MOECAL_OK)
        return NULL;
    return st;
}

template <typename T> moecal_status dalloc(moecal_backend *b, T **p, size_t bytes)
{
    CUDA_CHECK(b->where, cudaMalloc((void **)p, bytes ? bytes : 16));
    return MOECAL_OK;
}

template <typename T> moecal_status halloc(moecal_backend *b, T **p, size_t bytes)
{
    CUDA_CHECK(b->where, cudaMallocHost((void **)p, bytes ? bytes : 16));
    return MOECAL_OK;
}

moecal_status allocate(moecal_backend *b, const plan &p)
{
    if (b->nloc > 0)
        MOECAL_TRY(dalloc(b, &b->w13, p.weights));
    MOECAL_TRY(dalloc(b, &b->gate, p.gate));
    MOECAL_TRY(dalloc(b, &b->bias, p.bias));
    for (chunk_slot &c : b->chunk) {
        MOECAL_TRY(dalloc(b, &c.ax, p.amax));
        MOECAL_TRY(dalloc(b, &c.ah, p.amax));
        MOECAL_TRY(halloc(b, &c.h_ax, p.amax));
        MOECAL_TRY(halloc(b, &c.h_ah, p.amax));
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&c.done, cudaEventDisableTiming));
    }
    MOECAL_TRY(dalloc(b, &b->nvalid, 16));
    MOECAL_TRY(dalloc(b, &b->first, 16));
    MOECAL_TRY(dalloc(b, &b->xg, p.xg));
    b->xg_bytes = p.xg;
    if (!b->all_experts) {
        MOECAL_TRY(dalloc(b, &b->logits, p.logits));
        size_t P = (size_t)std::min<int64_t>(b->step, b->piece), E = (size_t)b->E;
        MOECAL_TRY(dalloc(b, &b->ltot, P * E * 8));
        if (b->dgemm_router) {
            size_t Hp = (size_t)padded_h(b->H), nb = Hp / MOECAL_RM_BLOCK;
            MOECAL_TRY(dalloc(b, &b->gate_d, E * Hp * 8));
            MOECAL_TRY(dalloc(b, &b->gnorm, E * nb * 8));
            MOECAL_TRY(dalloc(b, &b->xd, P * Hp * 8));
            MOECAL_TRY(dalloc(b, &b->xnorm, P * nb * 8));
            MOECAL_TRY(dalloc(b, &b->ld, nb * P * E * 8));
            b->fixcap = fix_cap(P, E);
            MOECAL_TRY(dalloc(b, &b->fix, (size_t)b->fixcap * sizeof(int2)));
            MOECAL_TRY(dalloc(b, &b->nfix, 64));
            CUDA_CHECK(b->where, cudaMemset(b->nfix, 0, 64));
        }
        MOECAL_TRY(dalloc(b, &b->sel, p.sel));
        MOECAL_TRY(dalloc(b, &b->ab[0], p.ab));
    }
    for (int i = 0; i < 2; i++) {
        MOECAL_TRY(dalloc(b, &b->x[i], p.x));
        MOECAL_TRY(dalloc(b, &b->skip[i], p.skip));
        MOECAL_TRY(dalloc(b, &b->rowmax[i], p.rowmax));
        MOECAL_TRY(dalloc(b, &b->cnt[i], p.cnt));
        MOECAL_TRY(dalloc(b, &b->offs[i], p.cnt));
        MOECAL_TRY(dalloc(b, &b->fill[i], p.cnt));
        MOECAL_TRY(dalloc(b, &b->list[i], p.list));
        if (b->all_experts) {
            MOECAL_TRY(dalloc(b, &b->ab[i], p.ab));
        } else {
            MOECAL_TRY(dalloc(b, &b->items[i], p.items));
            MOECAL_TRY(halloc(b, &b->h_items[i], p.items));
        }
        MOECAL_TRY(halloc(b, &b->h_cnt[i], p.cnt));
        MOECAL_TRY(halloc(b, &b->h_skip[i], p.skip));
    }
    MOECAL_TRY(halloc(b, &b->h_nvalid, 16));

    int lo = 0, hi = 0;
    CUDA_CHECK(b->where, cudaDeviceGetStreamPriorityRange(&lo, &hi));
    /* lo is the lowest priority (the default), hi the highest */
    const int p_route = b->prio == 2 ? hi : lo, p_gemm = b->prio == 1 ? hi : lo;
    CUDA_CHECK(b->where, cudaStreamCreateWithFlags(&b->s_copy, cudaStreamNonBlocking));
    CUDA_CHECK(b->where, cudaStreamCreateWithPriority(&b->s_route, cudaStreamNonBlocking,
                                                      p_route));
    CUDA_CHECK(b->where, cudaStreamCreateWithPriority(&b->s_comp, cudaStreamNonBlocking, p_gemm));
    if (b->dgemm_router) {
        CUBLAS_CHECK(b->where, cublasCreate(&b->blas_route));
        CUBLAS_CHECK(b->where, cublasSetStream(b->blas_route, b->s_route));
        /* native FP64 (no fixed-point emulation): IEEE operations, which the
         * bound of k_logit_check assumes */
        CUBLAS_CHECK(b->where, cublasSetMathMode(b->blas_route, CUBLAS_DEFAULT_MATH));
    }
    for (int i = 0; i < b->nstreams; i++) {
        CUDA_CHECK(b->where, cudaStreamCreateWithPriority(&b->s_gemm[i], cudaStreamNonBlocking,
                                                          p_gemm));
        CUDA_CHECK(b->where, cudaMalloc(&b->ws[i], WS_BYTES));
        CUBLAS_CHECK(b->where, cublasCreate(&b->blas[i]));
        CUBLAS_CHECK(b->where, cublasSetStream(b->blas[i], b->s_gemm[i]));
        CUBLAS_CHECK(b->where, cublasSetWorkspace(b->blas[i], b->ws[i], WS_BYTES));
        /* float32 accumulation throughout, as the reference computes */
        CUBLAS_CHECK(b->where, cublasSetMathMode(b->blas[i], (cublasMath_t)(
                     CUBLAS_DEFAULT_MATH | CUBLAS_MATH_DISALLOW_REDUCED_PRECISION_REDUCTION)));
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->ev_join[i], cudaEventDisableTiming));
    }
    for (int i = 0; i < 2; i++) {
        for (cudaEvent_t &e : *b->ev_piece[i])
            CUDA_CHECK(b->where, cudaEventCreateWithFlags(&e, cudaEventDisableTiming));
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->ev_copied[i], cudaEventDisableTiming));
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->ev_counted[i], cudaEventDisableTiming));
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->ev_gathered[i], cudaEventDisableTiming));
    }
    CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->ev_fork, cudaEventDisableTiming));
    for (int i = 0; i < NSLOTS; i++)
        CUDA_CHECK(b->where, cudaEventCreateWithFlags(&b->stage_ev[i], cudaEventDisableTiming));
    return MOECAL_OK;
}

/* CPUs this process may run on (its binding), for the copy threads. */
int bound_cpus(void)
{
    cpu_set_t set;
    CPU_ZERO(&set);
    if (sched_getaffinity(0, sizeof set, &set) != 0)
        return 1;
    return std::max(1, CPU_COUNT(&set));
}

/* The selection kernel's per-token scratch in shared memory: threads per
 * block and bytes, the opt-in above 48 KiB. */
moecal_status setup_select(moecal_backend *b, int dev)
{
    const bool dbl = b->prec == MOECAL_LOGITS_EXACT;
    int words = select_words(b->E, b->k, b->model.n_group, dbl ? 8 : 4);
    int smem_max = 0;
    cudaError_t e = cudaDeviceGetAttribute(&smem_max, cudaDevAttrMaxSharedMemoryPerBlockOptin,
                                           dev);
    if (e != cudaSuccess)
        smem_max = 48 * 1024;
    int nt = 64;
    while (nt > 1 && (size_t)nt * (size_t)words * 4 > (size_t)smem_max)
        nt /= 2;
    if ((size_t)nt * (size_t)words * 4 > (size_t)smem_max) {
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: %d experts need %d bytes of "
                                "router scratch per token, more than the %d bytes of shared "
                                "memory a block may use", b->where, b->E, words * 4,
                                smem_max);
    }
    b->sel_threads = nt;
    b->sel_smem = (size_t)nt * (size_t)words * 4;
    if (b->sel_smem > 48 * 1024) {
        cudaError_t ea =
            dbl ? cudaFuncSetAttribute(k_select<double>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)b->sel_smem)
                : cudaFuncSetAttribute(k_select<float>,
                                       cudaFuncAttributeMaxDynamicSharedMemorySize,
                                       (int)b->sel_smem);
        if (ea != cudaSuccess)
            return cuda_fail(b->where, "cudaFuncSetAttribute(k_select)",
                             cudaGetErrorString(ea), __FILE__, __LINE__);
    }
    return MOECAL_OK;
}

/* The step to try first (the setting, or the default for the mode) and the
 * piece; sets b->piece. */
int64_t first_step(moecal_backend *b, const moecal_backend_config *cfg)
{
    int64_t def = b->all_experts ? STEP_ALL : STEP_TOPK;
    moecal_cuda_settings sts;
    const moecal_cuda_settings *st = cuda_settings(cfg, &sts);
    def = knob(st, &moecal_cuda_settings::step, "MOECAL_CUDA_STEP", (long)def, 1, INT32_MAX,
               true);
    int64_t step = std::min(b->max_tok, def);
    b->piece = knob(st, &moecal_cuda_settings::piece, "MOECAL_CUDA_PIECE", (long)PIECE, 1,
                    INT32_MAX, true);
    /* int32 positions in the token lists */
    while (!b->all_experts && step * (int64_t)b->k > INT32_MAX / 2)
        step /= 2;
    return step;
}

/* The step (tokens per GPU pass) under the memory limit, smaller steps
 * tried before giving up with the sizes; then the buffers. */
moecal_status size_and_allocate(moecal_backend *b, const moecal_backend_config *cfg)
{
    size_t freeb = 0, totalb = 0;
    cudaError_t e = cudaMemGetInfo(&freeb, &totalb);
    if (e != cudaSuccess)
        return cuda_fail(b->where, "cudaMemGetInfo()", cudaGetErrorString(e), __FILE__,
                         __LINE__);
    bool limited = cfg->gpu_mem_limit > 0;
    size_t avail = limited ? (size_t)std::min<uint64_t>(cfg->gpu_mem_limit, freeb) : freeb;
    int64_t step = first_step(b, cfg);
    plan p = make_plan(b, step);
    while ((!p.ok || p.total() > avail) && step > std::min<int64_t>(STEP_MIN, b->max_tok)) {
        step = std::max<int64_t>(std::min<int64_t>(STEP_MIN, b->max_tok), step / 2);
        p = make_plan(b, step);
    }
    if (!p.ok || p.total() > avail) {
        const char *why = limited && cfg->gpu_mem_limit <= freeb ? "--gpu-mem-limit"
                                                                  : "free on the GPU";
        moecal_status s = moecal_error_set(
            MOECAL_ERR_NOMEM, "%s: the shard needs %.1f GiB (weights %.1f GiB, chunk "
            "buffers %.1f GiB) but only %.1f GiB may be used (%s)", b->where,
            (double)p.total() / GIB, (double)(p.weights + p.gate + p.bias) / GIB,
            (double)p.chunk_bytes() / GIB, (double)avail / GIB, why);
        return s;
    }
    b->step = step;
    b->piece = std::min(b->piece, step);
    b->max_items = (int64_t)(p.items / sizeof(act_item));
    moecal_status s = MOECAL_OK;
    try {
        size_t np = (size_t)ceil_div(step, b->piece);
        b->ev_piece[0]->assign(np, nullptr);
        b->ev_piece[1]->assign(np, nullptr);
        b->copier = new copy_pool(b->copy_threads - 1);
    } catch (...) {
        s = moecal_error_errno(ENOMEM, "cuda backend");
    }
    if (s == MOECAL_OK)
        s = allocate(b, p);
    if (s != MOECAL_OK) {
        if (moecal_error_code() == MOECAL_ERR_CUDA && strstr(moecal_error_message(),
                                                              "out of memory"))
            moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of GPU memory allocating %.1f GiB "
                             "(weights %.1f GiB, chunk buffers %.1f GiB)", b->where,
                             (double)p.total() / GIB, (double)p.weights / GIB,
                             (double)p.chunk_bytes() / GIB);
        return moecal_error_code();
    }
    return MOECAL_OK;
}

/* The sizes and settings create derives from cfg (no GPU, no allocation). */
void init_fields(moecal_backend *b, const moecal_backend_config *cfg)
{
    const moecal_model_config *m = cfg->model;

    b->dev = -1;
    b->model = *m;
    b->model.moe_layers = NULL;
    b->model.n_moe_layers = 0;
    b->E = m->n_routed_experts;
    b->H = m->hidden_size;
    b->NI = m->moe_intermediate_size;
    b->k = m->num_experts_per_tok;
    b->e0 = cfg->e0;
    b->nloc = cfg->e1 - cfg->e0;
    b->rank = cfg->rank;
    b->max_tok = cfg->max_chunk_tokens;
    b->all_experts = cfg->all_experts;
    b->prec = cfg->router_logits;
    b->layer = -1;
    moecal_cuda_settings sts;
    const moecal_cuda_settings *st = cuda_settings(cfg, &sts);
    b->nstreams = (int)knob(st, &moecal_cuda_settings::streams, "MOECAL_CUDA_STREAMS", 4, 1,
                            MAX_STREAMS, false);
    b->prio = (int)knob(st, &moecal_cuda_settings::prio, "MOECAL_CUDA_PRIO", 0, 0, 2, false);
    {
        /* dgemm (default): block sums by DGEMM + exactness check; exact: the
         * FP64 kernel (bench/NOTES-cuda.md, v4) */
        const char *r = st ? st->router : getenv("MOECAL_CUDA_ROUTER");
        b->dgemm_router = !b->all_experts && !(r && strcmp(r, "exact") == 0) &&
                          b->prec != MOECAL_LOGITS_EXACT;
    }
    b->copy_threads = cfg->threads > 0 ? std::min(cfg->threads, 64)
                                       : std::min(MAX_COPY_THREADS, bound_cpus());
    if (b->all_experts && b->nstreams < 2)
        b->nstreams = 2;
    b->all_group = std::max(1, std::min(ALL_GROUP, b->nloc));
    snprintf(b->where, sizeof b->where, "rank %d GPU %d", b->rank,
             cfg->device < 0 ? 0 : cfg->device);
}

/* What create allocates on the GPU when no memory limit makes it take a
 * smaller step; the host buffers it pins are a few KiB. */
moecal_status cuda_memory(const moecal_backend_config *cfg, uint64_t *host, uint64_t *device)
{
    MOECAL_TRY(moecal_backend_check_config(cfg, "cuda"));
    moecal_backend *b = (moecal_backend *)calloc(1, sizeof *b);
    if (b == NULL)
        return moecal_error_errno(ENOMEM, "cuda backend");
    init_fields(b, cfg);
    plan p = make_plan(b, first_step(b, cfg));
    bool empty = b->nloc == 0;
    free(b);
    *host = 0;
    *device = empty ? 0 : p.total();
    return p.ok ? MOECAL_OK : moecal_error_set(MOECAL_ERR_NOMEM, "cuda backend: sizes overflow");
}

moecal_status cuda_create(const moecal_backend_config *cfg, moecal_backend **out)
{
    moecal_backend *b;

    *out = NULL;
    MOECAL_TRY(moecal_backend_check_config(cfg, "cuda"));
    b = (moecal_backend *)calloc(1, sizeof *b);
    if (b == NULL)
        return moecal_error_errno(ENOMEM, "cuda backend");
    init_fields(b, cfg);
    try {
        size_t n = (size_t)b->nloc;
        b->gemm = new gemm_args();
        b->gemm->off.resize(n);
        b->gemm->order.resize(n);
        b->ev_piece[0] = new std::vector<cudaEvent_t>();
        b->ev_piece[1] = new std::vector<cudaEvent_t>();
        for (chunk_slot &c : b->chunk)
            c.tokens = new std::vector<int64_t>(n);
        b->pool = new std::vector<cudaEvent_t>();
        b->marks = new std::vector<timed>();
    } catch (...) {
        cuda_destroy(b);
        return moecal_error_errno(ENOMEM, "cuda backend");
    }

    /* the device, its bus id for messages */
    int ndev = 0;
    cudaError_t ce = cudaGetDeviceCount(&ndev);
    if (ce != cudaSuccess || ndev < 1) {
        moecal_status s = moecal_error_set(MOECAL_ERR_CUDA, "%s: no CUDA device (%s)", b->where,
                                           ce != cudaSuccess ? cudaGetErrorString(ce)
                                                             : "none found");
        cuda_destroy(b);
        return s;
    }
    int dev = cfg->device < 0 ? 0 : cfg->device;
    if (dev >= ndev) {
        cuda_destroy(b);
        return moecal_error_set(MOECAL_ERR_CUDA, "rank %d: GPU %d requested but only %d visible "
                                "(CUDA_VISIBLE_DEVICES?)", cfg->rank, dev, ndev);
    }
    {
        moecal_status s = MOECAL_OK;
        auto setup = [&]() -> moecal_status {
            CUDA_CHECK(b->where, cudaSetDevice(dev));
            b->dev = dev;
            char bus[32];
            if (cudaDeviceGetPCIBusId(bus, sizeof bus, dev) == cudaSuccess)
                snprintf(b->where, sizeof b->where, "rank %d GPU %s", b->rank, bus);
            return MOECAL_OK;
        };
        s = setup();
        if (s != MOECAL_OK) {
            cuda_destroy(b);
            return s;
        }
    }

    {
        moecal_status s = setup_select(b, dev);
        if (s != MOECAL_OK) {
            cuda_destroy(b);
            return s;
        }
    }

    if (b->nloc == 0) {
        /* nothing to compute on this rank: no buffers, no streams */
        *out = b;
        return MOECAL_OK;
    }

    {
        moecal_status s = size_and_allocate(b, cfg);
        if (s != MOECAL_OK) {
            cuda_destroy(b);
            return s;
        }
    }
    *out = b;
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ layer */

/* Bytes of one expert's FP8 w1 or w3 and of its scales. */
void fp8_sizes(const moecal_backend *b, int block, size_t *q, size_t *sc)
{
    size_t nbr = ((size_t)b->NI + (size_t)block - 1) / (size_t)block;
    size_t nbc = ((size_t)b->H + (size_t)block - 1) / (size_t)block;
    *q = (size_t)b->NI * (size_t)b->H;
    *sc = nbr * nbc * sizeof(float);
}

/* FP8 w1/w3 to bf16 on the GPU: batches of experts copied into the gather
 * buffer (free while no chunk is in flight; the plan makes it hold at least
 * one expert's w1 or w3 with its scales), then dequantized into w13. */
moecal_status upload_fp8(moecal_backend *b, const moecal_layer_weights *w)
{
    const int block = w->block;
    const int nbr = (int)ceil_div(b->NI, block), nbc = (int)ceil_div(b->H, block);
    size_t qb, sb;
    fp8_sizes(b, block, &qb, &sb);
    const size_t per = qb + ((sb + 255) & ~(size_t)255);
    const size_t room = (size_t)b->xg_bytes;
    const int64_t nb_max = std::max<int64_t>(1, (int64_t)(room / per));
    if (room < per)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: FP8 staging of %zu bytes for one "
                                "expert, %zu available", b->where, per, room);
    e4m3_lut lut;
    for (int c = 0; c < 256; c++)
        lut.v[c] = moecal_e4m3_to_float((uint8_t)c);
    uint8_t *dq = reinterpret_cast<uint8_t *>(b->xg);
    for (int half = 0; half < 2; half++) {
        const uint8_t *hq = half ? w->w3_fp8 : w->w1_fp8;
        const float *hs = half ? w->w3_scale : w->w1_scale;
        for (int64_t e0 = 0; e0 < b->nloc; e0 += nb_max) {
            const int64_t nb = std::min<int64_t>(nb_max, b->nloc - e0);
            uint8_t *dqb = dq;
            float *dsc = reinterpret_cast<float *>(dq + (((size_t)nb * qb + 255) & ~(size_t)255));
            CUDA_CHECK(b->where, cudaMemcpyAsync(dqb, hq + (size_t)e0 * qb, (size_t)nb * qb,
                                                 cudaMemcpyHostToDevice, b->s_copy));
            CUDA_CHECK(b->where, cudaMemcpyAsync(dsc, reinterpret_cast<const char *>(hs) +
                                                 (size_t)e0 * sb, (size_t)nb * sb,
                                                 cudaMemcpyHostToDevice, b->s_copy));
            const int64_t n = nb * (int64_t)qb;
            const int grid = (int)std::min<int64_t>(ceil_div(n, 256), 132 * 32);
            k_dequant_fp8<<<grid, 256, 0, b->s_copy>>>(dqb, dsc, nb, b->NI, b->H, block, nbr,
                                                       nbc, half, lut,
                                                       b->w13 + (size_t)e0 * 2 * qb);
            LAUNCH_CHECK(b->where, "k_dequant_fp8");
        }
    }
    return MOECAL_OK;
}

moecal_status cuda_load_layer(moecal_backend *b, const moecal_layer_weights *w)
{
    const size_t H = (size_t)b->H, NI = (size_t)b->NI;
    const size_t gsz = (size_t)b->E * H;

    const bool fp8 = w != NULL && w->w1 == NULL && w->w3 == NULL;
    if (w == NULL || w->gate == NULL ||
        (b->nloc > 0 && !fp8 && (w->w1 == NULL || w->w3 == NULL)) ||
        (b->nloc > 0 && fp8 && (w->w1_fp8 == NULL || w->w3_fp8 == NULL ||
                                w->w1_scale == NULL || w->w3_scale == NULL || w->block < 1)))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: layer weights missing");
    if (b->model.has_correction_bias && w->bias == NULL)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "layer %d: the router has no "
                                "e_score_correction_bias", w->layer);
    if (b->c_fin != b->c_sub)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: load_layer while a "
                                "submitted chunk is not finished");
    b->layer = -1;
    for (size_t i = 0; i < gsz; i++) {
        if (!isfinite(w->gate[i]))
            return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: router weight [%zu, %zu] "
                                    "is %g", w->layer, i / H, i % H, (double)w->gate[i]);
    }
    b->has_bias = w->bias != NULL;
    if (b->has_bias) {
        for (int e = 0; e < b->E; e++) {
            if (!isfinite(w->bias[e]))
                return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: "
                                        "e_score_correction_bias[%d] is %g", w->layer, e,
                                        (double)w->bias[e]);
        }
    }
    if (b->nloc == 0) {
        b->layer = w->layer;
        return MOECAL_OK;
    }
    CUDA_CHECK(b->where, cudaSetDevice(b->dev));
    CUDA_CHECK(b->where, cudaMemcpyAsync(b->gate, w->gate, gsz * sizeof(float),
                                         cudaMemcpyHostToDevice, b->s_copy));
    if (b->has_bias)
        CUDA_CHECK(b->where, cudaMemcpyAsync(b->bias, w->bias, (size_t)b->E * sizeof(float),
                                             cudaMemcpyHostToDevice, b->s_copy));
    if (b->dgemm_router) {
        k_gate_to_double<<<(unsigned)b->E, 256, 0, b->s_copy>>>(b->gate, b->E, b->H,
                                                               padded_h(b->H), b->gate_d,
                                                               b->gnorm);
        LAUNCH_CHECK(b->where, "k_gate_to_double");
    }
    {
        if (fp8) {
            MOECAL_TRY(upload_fp8(b, w));
        } else {
            /* w1 rows then w3 rows of each expert: two pitched copies */
            size_t row = NI * H * sizeof(uint16_t);
            CUDA_CHECK(b->where, cudaMemcpy2DAsync(b->w13, 2 * row, w->w1, row, row,
                                                   (size_t)b->nloc, cudaMemcpyHostToDevice,
                                                   b->s_copy));
            CUDA_CHECK(b->where, cudaMemcpy2DAsync((char *)b->w13 + row, 2 * row, w->w3, row,
                                                   row, (size_t)b->nloc,
                                                   cudaMemcpyHostToDevice, b->s_copy));
        }
        /* the first non-finite value, in the CPU backend's order: expert,
         * w1 rows then w3 rows, column */
        const int64_t n = (int64_t)b->nloc * 2 * (int64_t)NI * (int64_t)H;
        CUDA_CHECK(b->where, cudaMemsetAsync(b->first, 0xff, sizeof(unsigned long long),
                                             b->s_copy));
        if (n % 8 == 0) {
            int64_t nv = n / 8;
            int grid = (int)std::min<int64_t>(ceil_div(nv, 256), 132 * 16);
            k_first_nonfinite8<<<grid, 256, 0, b->s_copy>>>(
                reinterpret_cast<const uint4 *>(b->w13), nv, b->first);
        } else {
            int grid = (int)std::min<int64_t>(ceil_div(n, 256), 132 * 16);
            k_first_nonfinite<<<grid, 256, 0, b->s_copy>>>(b->w13, n, b->first);
        }
        LAUNCH_CHECK(b->where, "k_first_nonfinite");
        unsigned long long first = 0;
        CUDA_CHECK(b->where, cudaMemcpyAsync(&first, b->first, sizeof first,
                                             cudaMemcpyDeviceToHost, b->s_copy));
        CUDA_CHECK(b->where, cudaStreamSynchronize(b->s_copy));
        if (first != ~0ull) {
            int64_t r = (int64_t)(first / H), c = (int64_t)(first % H);
            int64_t e = r / (2 * (int64_t)NI), j = r % (2 * (int64_t)NI);
            int up = j >= (int64_t)NI;
            uint16_t v = 0;
            CUDA_CHECK(b->where, cudaMemcpy(&v, b->w13 + first, sizeof v,
                                            cudaMemcpyDeviceToHost));
            return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: expert %d %s [%lld, %lld] "
                                    "is %s", w->layer, b->e0 + (int)e,
                                    up ? "up_proj (w3)" : "gate_proj (w1)",
                                    (long long)(j % (int64_t)NI), (long long)c,
                                    (v & 0x7fu) ? "NaN" : "Inf");
        }
    }
    b->layer = w->layer;
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ one chunk */

int64_t step_tokens(const moecal_backend *b, const chunk_slot &c, int64_t s)
{
    return std::min(b->step, c.ntok - s * b->step);
}

/* Step j of the sequence: its chunk, and its index s there. */
chunk_slot *step_chunk(moecal_backend *b, int64_t j, int64_t *s)
{
    for (chunk_slot &c : b->chunk) {
        if (c.nsteps > 0 && j >= c.first && j < c.first + c.nsteps) {
            *s = j - c.first;
            return &c;
        }
    }
    return NULL;
}

/* Host -> device copy of step s of chunk c (step j of the sequence) into
 * buffer j % 2 (copy stream), piece by piece, each piece's arrival marked by
 * ev_piece[j % 2][piece]. */
moecal_status upload(moecal_backend *b, const chunk_slot &c, int64_t s, int64_t j)
{
    const int par = (int)(j % 2);
    const int64_t n = step_tokens(b, c, s), t0 = s * b->step;
    const size_t H = (size_t)b->H;
    size_t id;
    /* the buffer's previous step has been gathered (or multiplied) */
    CUDA_CHECK(b->where, cudaStreamWaitEvent(b->s_copy, b->ev_gathered[par], 0));
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_COPY, b->s_copy, &id));
    if (c.skip != NULL) {
        /* pinned staging of the mask; its last copy (two steps back) is done */
        CUDA_CHECK(b->where, cudaEventSynchronize(b->ev_copied[par]));
        memcpy(b->h_skip[par], c.skip + t0, (size_t)n);
        CUDA_CHECK(b->where, cudaMemcpyAsync(b->skip[par], b->h_skip[par], (size_t)n,
                                             cudaMemcpyHostToDevice, b->s_copy));
    }
    for (int64_t r0 = 0, i = 0; r0 < n; r0 += b->piece, i++) {
        const size_t bytes = (size_t)std::min(b->piece, n - r0) * H * sizeof(uint16_t);
        const uint16_t *src = c.x + (size_t)(t0 + r0) * H;
        uint16_t *dst = b->x[par] + (size_t)r0 * H;
        if (c.pinned) {
            CUDA_CHECK(b->where, cudaMemcpyAsync(dst, src, bytes, cudaMemcpyHostToDevice,
                                                 b->s_copy));
        } else {
            /* the staging buffer's previous DMA is done; fill it while the
             * last piece is in flight */
            const unsigned q = b->stage_next++ % NSLOTS;
            CUDA_CHECK(b->where, cudaEventSynchronize(b->stage_ev[q]));
            b->copier->copy(b->stage[q], src, bytes);
            CUDA_CHECK(b->where, cudaMemcpyAsync(dst, b->stage[q], bytes,
                                                 cudaMemcpyHostToDevice, b->s_copy));
            CUDA_CHECK(b->where, cudaEventRecord(b->stage_ev[q], b->s_copy));
        }
        CUDA_CHECK(b->where, cudaEventRecord((*b->ev_piece[par])[(size_t)i], b->s_copy));
    }
    MOECAL_TRY(mark_end(b, id, b->s_copy));
    CUDA_CHECK(b->where, cudaEventRecord(b->ev_copied[par], b->s_copy));
    return MOECAL_OK;
}

moecal_status launch_rowmax(moecal_backend *b, const uint16_t *x, int64_t n, unsigned *rowmax,
                            cudaStream_t st)
{
    const int per = 8; /* rows (warps) per block */
    int grid = (int)ceil_div(n, per);
    if (b->H % 8 == 0)
        k_rowmax<true><<<grid, 32 * per, 0, st>>>(x, n, b->H, rowmax);
    else
        k_rowmax<false><<<grid, 32 * per, 0, st>>>(x, n, b->H, rowmax);
    LAUNCH_CHECK(b->where, "k_rowmax");
    return MOECAL_OK;
}

moecal_status launch_logits(moecal_backend *b, const uint16_t *x, int64_t n, cudaStream_t st)
{
    if (b->dgemm_router) {
        /* route_math.h's logits from block sums by DGEMM, checked (kernels.cuh) */
        const int Hp = padded_h(b->H), nb = Hp / MOECAL_RM_BLOCK;
        auto gamma = [](double m) { return m * 0x1p-52 / (1.0 - m * 0x1p-52); };
        const double kb = 2.0 * (gamma(MOECAL_RM_BLOCK) + gamma(nb)) * (1.0 + 0x1p-20);
        const double one = 1.0, zero = 0.0;
        k_x_to_double<<<(unsigned)n, 256, 0, st>>>(x, n, b->H, Hp, b->xd, b->xnorm);
        LAUNCH_CHECK(b->where, "k_x_to_double");
        CUDA_CHECK(b->where, cudaMemsetAsync(b->nfix, 0, sizeof(unsigned), st));
        CUBLAS_CHECK(b->where, cublasDgemmStridedBatched(
            b->blas_route, CUBLAS_OP_T, CUBLAS_OP_N, b->E, (int)n, MOECAL_RM_BLOCK, &one,
            b->gate_d, Hp, MOECAL_RM_BLOCK, b->xd, Hp, MOECAL_RM_BLOCK, &zero, b->ld, b->E,
            (long long)n * b->E, nb));
        const int64_t tot = n * b->E;
        int grid = (int)std::min<int64_t>(ceil_div(tot, 256), 132 * 8);
        k_logit_check<<<grid, 256, 0, st>>>(b->ld, nb, b->xnorm, b->gnorm, n, b->E, kb,
                                            b->prec, b->logits, b->fix, b->fixcap, b->nfix);
        LAUNCH_CHECK(b->where, "k_logit_check");
        if (b->H % 8 == 0)
            k_logit_fix<true><<<132 * 4, 256, 0, st>>>(x, b->gate, n, b->H, b->E, b->prec,
                                                       b->fix, b->fixcap, b->nfix, b->logits);
        else
            k_logit_fix<false><<<132 * 4, 256, 0, st>>>(x, b->gate, n, b->H, b->E, b->prec,
                                                        b->fix, b->fixcap, b->nfix, b->logits);
        LAUNCH_CHECK(b->where, "k_logit_fix");
        return MOECAL_OK;
    }
    dim3 grid((unsigned)ceil_div(b->E, LG_BE), (unsigned)ceil_div(n, LG_BT));
    if (b->H % 8 == 0)
        k_logits<true><<<grid, LG_THREADS, 0, st>>>(x, b->gate, n, b->H, b->E, b->prec,
                                                     b->ltot, b->logits);
    else
        k_logits<false><<<grid, LG_THREADS, 0, st>>>(x, b->gate, n, b->H, b->E, b->prec,
                                                      b->ltot, b->logits);
    LAUNCH_CHECK(b->where, "k_logits");
    return MOECAL_OK;
}

/* Top-k routing of step s of chunk c (step j of the sequence) on the route
 * stream, each piece as soon as it has arrived; ends with the counts on the
 * host side (h_cnt[j % 2]) and ev_counted[j % 2]. */
moecal_status route_topk(moecal_backend *b, const chunk_slot &c, int64_t s, int64_t j)
{
    const int par = (int)(j % 2);
    const int64_t n = step_tokens(b, c, s);
    const cudaStream_t st = b->s_route;
    const int nloc = b->nloc, k = b->k;
    const size_t H = (size_t)b->H;
    size_t id;

    select_params sp;
    sp.E = b->E;
    sp.k = k;
    sp.G = b->model.n_group;
    sp.TG = b->model.topk_group;
    sp.grouped = sp.G > 1 && sp.TG < sp.G;
    sp.sigmoid = b->model.scoring == MOECAL_SCORING_SIGMOID;
    sp.has_bias = b->has_bias;
    sp.words = select_words(sp.E, sp.k, sp.G, b->prec == MOECAL_LOGITS_EXACT ? 8 : 4);

    /* the lists of this parity were read by the gather two steps back */
    CUDA_CHECK(b->where, cudaStreamWaitEvent(st, b->ev_gathered[par], 0));
    CUDA_CHECK(b->where, cudaMemsetAsync(b->cnt[par], 0, (size_t)nloc * sizeof(int), st));
    for (int64_t r0 = 0, i = 0; r0 < n; r0 += b->piece, i++) {
        const int64_t m = std::min(b->piece, n - r0);
        const uint16_t *xp = b->x[par] + (size_t)r0 * H;
        CUDA_CHECK(b->where, cudaStreamWaitEvent(st, (*b->ev_piece[par])[(size_t)i], 0));
        MOECAL_TRY(mark_begin(b, MOECAL_PHASE_ROUTE, st, &id));
        MOECAL_TRY(launch_rowmax(b, xp, m, b->rowmax[par] + r0, st));
        MOECAL_TRY(launch_logits(b, xp, m, st));
        int grid = (int)ceil_div(m, b->sel_threads);
        if (b->prec == MOECAL_LOGITS_EXACT)
            k_select<double><<<grid, b->sel_threads, b->sel_smem, st>>>(
                b->ltot, b->bias, c.skip ? b->skip[par] + r0 : nullptr, m, sp,
                b->sel + (size_t)r0 * (size_t)k);
        else
            k_select<float><<<grid, b->sel_threads, b->sel_smem, st>>>(
                b->logits, b->bias, c.skip ? b->skip[par] + r0 : nullptr, m, sp,
                b->sel + (size_t)r0 * (size_t)k);
        LAUNCH_CHECK(b->where, "k_select");
        MOECAL_TRY(mark_end(b, id, st));
    }
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_ROUTE, st, &id));
    {
        int64_t nsel = n * k;
        int grid = (int)ceil_div(nsel, 256);
        k_count<<<grid, 256, 0, st>>>(b->sel, b->rowmax[par], nsel, k, b->e0, nloc,
                                      b->cnt[par], c.ax);
        LAUNCH_CHECK(b->where, "k_count");
        k_scan<<<1, SCAN_THREADS, 0, st>>>(b->cnt[par], nloc, b->offs[par], b->fill[par]);
        LAUNCH_CHECK(b->where, "k_scan");
        k_fill<<<grid, 256, 0, st>>>(b->sel, nsel, b->e0, nloc, b->offs[par], b->fill[par],
                                     b->list[par]);
        LAUNCH_CHECK(b->where, "k_fill");
    }
    MOECAL_TRY(mark_end(b, id, st));
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_COPY, st, &id));
    CUDA_CHECK(b->where, cudaMemcpyAsync(b->h_cnt[par], b->cnt[par], (size_t)nloc * sizeof(int),
                                         cudaMemcpyDeviceToHost, st));
    MOECAL_TRY(mark_end(b, id, st));
    CUDA_CHECK(b->where, cudaEventRecord(b->ev_counted[par], st));
    return MOECAL_OK;
}

/* Gather, GEMMs and activation amax of step j of the sequence (top-k), a
 * step of chunk c; the host has the step's counts. */
moecal_status compute_topk(moecal_backend *b, chunk_slot &c, int64_t j)
{
    const int par = (int)(j % 2);
    int64_t *tokens = c.tokens->data();
    const int nloc = b->nloc, H = b->H, NI = b->NI, I2 = 2 * NI;
    const int *cnt = b->h_cnt[par];
    const cudaStream_t st = b->s_comp;
    gemm_args &g = *b->gemm;
    size_t id;

    /* offsets (the device's prefix sum, recomputed), activation items, and
     * the experts with tokens, largest first */
    int64_t total = 0, nitems = 0;
    int ng = 0;
    act_item *items = b->h_items[par];
    for (int e = 0; e < nloc; e++) {
        g.off[(size_t)e] = total;
        tokens[e] += cnt[e];
        for (int64_t r = 0; r < cnt[e]; r += ACT_ROWS) {
            if (nitems >= b->max_items)
                return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: %lld activation items (at "
                                        "most %lld)", b->where, (long long)nitems,
                                        (long long)b->max_items);
            act_item &it = items[nitems++];
            it.e = e;
            it.nrows = (int)std::min<int64_t>(ACT_ROWS, cnt[e] - r);
            it.row0 = total + r;
            it.col0 = 0;
        }
        total += cnt[e];
        if (cnt[e] > 0)
            g.order[(size_t)ng++] = e;
    }
    if (total > b->step * (int64_t)b->k)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: %lld routed rows in a step of %lld "
                                "tokens", b->where, (long long)total, (long long)b->step);
    std::stable_sort(g.order.begin(), g.order.begin() + ng,
                     [cnt](int a, int c) { return cnt[a] > cnt[c]; });

    CUDA_CHECK(b->where, cudaStreamWaitEvent(st, b->ev_counted[par], 0));
    if (total == 0) {
        CUDA_CHECK(b->where, cudaEventRecord(b->ev_gathered[par], st));
        return MOECAL_OK;
    }
    /* the activation table first: ev_gathered[par] then also says that the
     * pinned table of this parity may be rewritten */
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_COPY, st, &id));
    CUDA_CHECK(b->where, cudaMemcpyAsync(b->items[par], items, (size_t)nitems * sizeof(act_item),
                                         cudaMemcpyHostToDevice, st));
    MOECAL_TRY(mark_end(b, id, st));

    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_GATHER, st, &id));
    {
        /* token by token: each row read once, written to its local experts */
        const int per = 8;
        const int64_t n = step_tokens(b, c, j - c.first);
        int grid = (int)ceil_div(n, per);
        if (H % 8 == 0)
            k_gather_tok<true><<<grid, 32 * per, 0, st>>>(b->x[par], b->list[par], n, b->k, H,
                                                          b->xg);
        else
            k_gather_tok<false><<<grid, 32 * per, 0, st>>>(b->x[par], b->list[par], n, b->k, H,
                                                           b->xg);
        LAUNCH_CHECK(b->where, "k_gather_tok");
    }
    MOECAL_TRY(mark_end(b, id, st));
    CUDA_CHECK(b->where, cudaEventRecord(b->ev_gathered[par], st));

    /* GEMMs: C_e [n_e x 2I] = X_e [n_e x H] W_e^T; in cuBLAS's column-major
     * terms C_e^T (2I x n_e) = op_T(W_e^T: H x 2I) * X_e^T (H x n_e) */
    const float one = 1.0f, zero = 0.0f;
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_GEMM, st, &id));
    {
        const int ns = std::min(b->nstreams, ng);
        CUDA_CHECK(b->where, cudaEventRecord(b->ev_fork, st));
        for (int i = 0; i < ns; i++)
            CUDA_CHECK(b->where, cudaStreamWaitEvent(b->s_gemm[i], b->ev_fork, 0));
        for (int i = 0; i < ng; i++) {
            int e = g.order[(size_t)i];
            int q = i % ns;
            CUBLAS_CHECK(b->where, cublasGemmEx(
                b->blas[q], CUBLAS_OP_T, CUBLAS_OP_N, I2, cnt[e], H, &one,
                b->w13 + (size_t)e * (size_t)I2 * (size_t)H, CUDA_R_16BF, H,
                b->xg + (size_t)g.off[(size_t)e] * (size_t)H, CUDA_R_16BF, H, &zero,
                b->ab[0] + (size_t)g.off[(size_t)e] * (size_t)I2, CUDA_R_16BF, I2,
                CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        }
        for (int i = 0; i < ns; i++) {
            CUDA_CHECK(b->where, cudaEventRecord(b->ev_join[i], b->s_gemm[i]));
            CUDA_CHECK(b->where, cudaStreamWaitEvent(st, b->ev_join[i], 0));
        }
    }
    MOECAL_TRY(mark_end(b, id, st));

    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_ACT, st, &id));
    if (NI % 8 == 0)
        k_act<true><<<(unsigned)nitems, 256, 0, st>>>(b->ab[0], I2, NI, b->items[par], c.ah);
    else
        k_act<false><<<(unsigned)nitems, 256, 0, st>>>(b->ab[0], I2, NI, b->items[par], c.ah);
    LAUNCH_CHECK(b->where, "k_act");
    MOECAL_TRY(mark_end(b, id, st));
    return MOECAL_OK;
}

/* All-experts mode, step s of chunk c (step j of the sequence): rows not
 * skipped (route stream), then every expert over all of them, ALL_GROUP
 * experts per GEMM (two GEMM streams). */
moecal_status run_all_step(moecal_backend *b, chunk_slot &c, int64_t s, int64_t j)
{
    const int par = (int)(j % 2);
    const int64_t n = step_tokens(b, c, s);
    const int nloc = b->nloc, H = b->H, NI = b->NI, I2 = 2 * NI;
    const cudaStream_t sr = b->s_route;
    size_t id;

    CUDA_CHECK(b->where, cudaStreamWaitEvent(sr, b->ev_copied[par], 0));
    /* one buffer of gathered rows: the previous step's GEMMs are done with it */
    CUDA_CHECK(b->where, cudaStreamWaitEvent(sr, b->ev_gathered[(j + 1) % 2], 0));
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_ROUTE, sr, &id));
    MOECAL_TRY(launch_rowmax(b, b->x[par], n, b->rowmax[par], sr));
    CUDA_CHECK(b->where, cudaMemsetAsync(b->nvalid, 0, sizeof(int), sr));
    {
        int grid = (int)ceil_div(n, 256);
        k_valid_rows<<<grid, 256, 0, sr>>>(c.skip ? b->skip[par] : nullptr, b->rowmax[par], n,
                                           b->nvalid, c.skip ? b->list[par] : nullptr,
                                           c.ax + nloc);
        LAUNCH_CHECK(b->where, "k_valid_rows");
    }
    MOECAL_TRY(mark_end(b, id, sr));
    int64_t nvalid = n;
    const uint16_t *A = b->x[par];
    if (c.skip != NULL) {
        CUDA_CHECK(b->where, cudaMemcpyAsync(b->h_nvalid, b->nvalid, sizeof(int),
                                             cudaMemcpyDeviceToHost, sr));
        CUDA_CHECK(b->where, cudaEventRecord(b->ev_counted[par], sr));
        CUDA_CHECK(b->where, cudaEventSynchronize(b->ev_counted[par]));
        nvalid = *b->h_nvalid;
        if (nvalid > 0) {
            MOECAL_TRY(mark_begin(b, MOECAL_PHASE_GATHER, sr, &id));
            const int per = 8;
            int grid = (int)ceil_div(nvalid, per);
            if (H % 8 == 0)
                k_gather<true><<<grid, 32 * per, 0, sr>>>(b->x[par], b->list[par], nvalid, H,
                                                          b->xg);
            else
                k_gather<false><<<grid, 32 * per, 0, sr>>>(b->x[par], b->list[par], nvalid, H,
                                                           b->xg);
            LAUNCH_CHECK(b->where, "k_gather");
            MOECAL_TRY(mark_end(b, id, sr));
            A = b->xg;
        }
    }
    CUDA_CHECK(b->where, cudaEventRecord(b->ev_counted[par], sr));
    c.nvalid += nvalid;
    if (nvalid == 0) {
        CUDA_CHECK(b->where, cudaEventRecord(b->ev_gathered[par], sr));
        return MOECAL_OK;
    }

    /* the GEMM streams start when the rows are ready; the next upload into
     * this parity waits for the last GEMM to finish with them */
    const float one = 1.0f, zero = 0.0f;
    const int ga = b->all_group;
    const int ngr = (int)ceil_div(nloc, ga);
    for (int q = 0; q < 2; q++)
        CUDA_CHECK(b->where, cudaStreamWaitEvent(b->s_gemm[q], b->ev_counted[par], 0));
    for (int g = 0; g < ngr; g++) {
        const int q = g % 2;
        const cudaStream_t sg = b->s_gemm[q];
        const int eg = g * ga, ne = std::min(ga, nloc - eg);
        const int ld = ne * I2;
        MOECAL_TRY(mark_begin(b, MOECAL_PHASE_GEMM, sg, &id));
        CUBLAS_CHECK(b->where, cublasGemmEx(
            b->blas[q], CUBLAS_OP_T, CUBLAS_OP_N, ld, (int)nvalid, H, &one,
            b->w13 + (size_t)eg * (size_t)I2 * (size_t)H, CUDA_R_16BF, H, A, CUDA_R_16BF, H,
            &zero, b->ab[q], CUDA_R_16BF, ld, CUBLAS_COMPUTE_32F, CUBLAS_GEMM_DEFAULT));
        MOECAL_TRY(mark_end(b, id, sg));
        MOECAL_TRY(mark_begin(b, MOECAL_PHASE_ACT, sg, &id));
        /* items are implicit: blocks over (row block, expert of the group) */
        dim3 grid((unsigned)ceil_div(nvalid, ACT_ROWS), (unsigned)ne);
        if (NI % 8 == 0)
            k_act_dense<true><<<grid, 256, 0, sg>>>(b->ab[q], ld, NI, nvalid, ACT_ROWS, eg,
                                                    c.ah);
        else
            k_act_dense<false><<<grid, 256, 0, sg>>>(b->ab[q], ld, NI, nvalid, ACT_ROWS, eg,
                                                     c.ah);
        LAUNCH_CHECK(b->where, "k_act");
        MOECAL_TRY(mark_end(b, id, sg));
    }
    for (int q = 0; q < 2; q++) {
        CUDA_CHECK(b->where, cudaEventRecord(b->ev_join[q], b->s_gemm[q]));
        CUDA_CHECK(b->where, cudaStreamWaitEvent(b->s_comp, b->ev_join[q], 0));
    }
    CUDA_CHECK(b->where, cudaEventRecord(b->ev_gathered[par], b->s_comp));
    return MOECAL_OK;
}

float amax_of(unsigned bits)
{
    float f;
    memcpy(&f, &bits, sizeof f);
    return f != f ? NAN : f;
}

/* Upload and route steps ahead of the computation, up to step `upto`: step
 * j may start once step j - 2, the last user of its buffers, has its
 * computation enqueued. */
moecal_status advance(moecal_backend *b, int64_t upto = INT64_MAX)
{
    while (b->g_routed < b->g_total && b->g_routed <= b->g_computed + 1 &&
           b->g_routed <= upto) {
        int64_t s;
        chunk_slot *c = step_chunk(b, b->g_routed, &s);
        if (c == NULL)
            return moecal_error_set(MOECAL_ERR_INTERNAL, "%s: step %lld has no chunk", b->where,
                                    (long long)b->g_routed);
        MOECAL_TRY(upload(b, *c, s, b->g_routed));
        MOECAL_TRY(route_topk(b, *c, s, b->g_routed));
        b->g_routed++;
    }
    return MOECAL_OK;
}

moecal_status check_chunk(const moecal_backend *b, int64_t ntok)
{
    if (b->layer < 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: chunk before load_layer");
    if (ntok < 0 || ntok > b->max_tok)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: chunk of %lld tokens "
                                "(at most %lld)", (long long)ntok, (long long)b->max_tok);
    if (b->c_sub - b->c_fin >= 2)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: a third chunk submitted "
                                "before the first was finished");
    return MOECAL_OK;
}

moecal_status submit_impl(moecal_backend *b, const uint16_t *x, int64_t ntok,
                          const uint8_t *skip)
{
    chunk_slot &c = b->chunk[b->c_sub % 2];
    const int nloc = b->nloc;

    c.x = x;
    c.skip = skip;
    c.ntok = ntok;
    c.nsteps = nloc > 0 ? ceil_div(ntok, b->step) : 0;
    c.first = b->g_total;
    c.nvalid = 0;
    c.pinned = false;
    if (c.nsteps == 0) {
        b->c_sub++;
        return MOECAL_OK;
    }
    std::fill(c.tokens->begin(), c.tokens->end(), 0);
    CUDA_CHECK(b->where, cudaSetDevice(b->dev));
    {
        /* page-locked (registered or cudaMallocHost) from first to last byte? */
        const size_t bytes = (size_t)ntok * (size_t)b->H * sizeof(uint16_t);
        cudaPointerAttributes a0, a1;
        c.pinned = cudaPointerGetAttributes(&a0, x) == cudaSuccess &&
                   cudaPointerGetAttributes(&a1, (const char *)x + bytes - 1) == cudaSuccess &&
                   a0.type == cudaMemoryTypeHost && a1.type == cudaMemoryTypeHost;
        (void)cudaGetLastError();
        for (int i = 0; !c.pinned && i < NSLOTS; i++) {
            if (b->stage[i] == NULL)
                CUDA_CHECK(b->where, cudaMallocHost((void **)&b->stage[i],
                                                    (size_t)b->piece * (size_t)b->H *
                                                        sizeof(uint16_t)));
        }
    }
    /* the chunk's accumulators: everything that writes them comes later on
     * the route stream or waits for a step's routing */
    CUDA_CHECK(b->where, cudaMemsetAsync(c.ax, 0, (size_t)(nloc + 1) * sizeof(unsigned),
                                         b->s_route));
    CUDA_CHECK(b->where, cudaMemsetAsync(c.ah, 0, (size_t)(nloc + 1) * sizeof(unsigned),
                                         b->s_route));
    b->c_sub++;
    b->g_total += c.nsteps;
    if (!b->all_experts)
        MOECAL_TRY(advance(b));
    return MOECAL_OK;
}

moecal_status finish_impl(moecal_backend *b, moecal_chunk_stats *out)
{
    chunk_slot &c = b->chunk[b->c_fin % 2];
    const int nloc = b->nloc;
    const int64_t last = c.first + c.nsteps;
    size_t id;

    for (int e = 0; e < nloc; e++) {
        out->tokens[e] = 0;
        out->amax_x[e] = 0.0f;
        out->amax_h[e] = 0.0f;
    }
    if (c.nsteps == 0) {
        b->c_fin++;
        return MOECAL_OK;
    }
    CUDA_CHECK(b->where, cudaSetDevice(b->dev));
    if (b->all_experts) {
        for (int64_t s = 0; s < c.nsteps; s++) {
            MOECAL_TRY(upload(b, c, s, c.first + s));
            MOECAL_TRY(run_all_step(b, c, s, c.first + s));
        }
        b->g_routed = b->g_computed = last;
    } else {
        while (b->g_computed < last) {
            const int64_t j = b->g_computed;
            MOECAL_TRY(advance(b, j)); /* this step only: its GEMMs go first */
            CUDA_CHECK(b->where, cudaEventSynchronize(b->ev_counted[j % 2]));
            MOECAL_TRY(compute_topk(b, c, j));
            b->g_computed++;
            /* the next steps (of this chunk or the next) copy and route while
             * this one multiplies */
            MOECAL_TRY(advance(b));
        }
    }
    /* the results: 2 small arrays (the counts are on the host already).  In
     * top-k mode the compute stream has waited for every routing of the
     * chunk (and ev_counted may already mark the next chunk's) */
    if (b->all_experts)
        CUDA_CHECK(b->where, cudaStreamWaitEvent(b->s_comp, b->ev_counted[(last - 1) % 2], 0));
    MOECAL_TRY(mark_begin(b, MOECAL_PHASE_COPY, b->s_comp, &id));
    CUDA_CHECK(b->where, cudaMemcpyAsync(c.h_ax, c.ax, (size_t)(nloc + 1) * sizeof(unsigned),
                                         cudaMemcpyDeviceToHost, b->s_comp));
    CUDA_CHECK(b->where, cudaMemcpyAsync(c.h_ah, c.ah, (size_t)(nloc + 1) * sizeof(unsigned),
                                         cudaMemcpyDeviceToHost, b->s_comp));
    MOECAL_TRY(mark_end(b, id, b->s_comp));
    CUDA_CHECK(b->where, cudaEventRecord(c.done, b->s_comp));
    CUDA_CHECK(b->where, cudaEventSynchronize(c.done));
    MOECAL_TRY(marks_harvest(b));

    for (int e = 0; e < nloc; e++) {
        int64_t n = b->all_experts ? c.nvalid : (*c.tokens)[(size_t)e];
        unsigned axb = b->all_experts ? c.h_ax[nloc] : c.h_ax[e];
        out->tokens[e] = n;
        out->amax_x[e] = n > 0 ? amax_of(axb << 16) : 0.0f;
        out->amax_h[e] = n > 0 ? amax_of(c.h_ah[e]) : 0.0f;
    }
    c.nsteps = 0;
    b->c_fin++;
    return MOECAL_OK;
}

/* After a failure: wait for everything in flight (it may read the callers'
 * buffers) and drop the chunks that were not finished. */
void abandon(moecal_backend *b)
{
    cudaStream_t st[] = {b->s_copy, b->s_route, b->s_comp};
    for (cudaStream_t s : st)
        if (s)
            (void)cudaStreamSynchronize(s);
    for (int q = 0; q < b->nstreams; q++)
        if (b->s_gemm[q])
            (void)cudaStreamSynchronize(b->s_gemm[q]);
    if (b->marks) {
        for (const timed &m : *b->marks) {
            b->pool->push_back(m.a);
            b->pool->push_back(m.b);
        }
        b->marks->clear();
    }
    for (chunk_slot &c : b->chunk)
        c.nsteps = 0;
    b->c_fin = b->c_sub;
    b->g_routed = b->g_computed = b->g_total;
}

template <typename F> moecal_status guarded(moecal_backend *b, F f)
{
    moecal_status s;
    try {
        s = f();
    } catch (...) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "%s: out of host memory", b->where);
    }
    if (s != MOECAL_OK)
        abandon(b);
    return s;
}

moecal_status cuda_submit_chunk(moecal_backend *b, const uint16_t *x, int64_t ntok,
                                const uint8_t *skip)
{
    MOECAL_TRY(check_chunk(b, ntok));
    return guarded(b, [&] { return submit_impl(b, x, ntok, skip); });
}

moecal_status cuda_finish_chunk(moecal_backend *b, moecal_chunk_stats *out)
{
    if (b->c_fin == b->c_sub)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: no chunk to finish");
    return guarded(b, [&] { return finish_impl(b, out); });
}

moecal_status cuda_run_chunk(moecal_backend *b, const uint16_t *x, int64_t ntok,
                             const uint8_t *skip, moecal_chunk_stats *out)
{
    if (b->c_fin != b->c_sub)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cuda backend: run_chunk while a "
                                "submitted chunk is not finished");
    MOECAL_TRY(cuda_submit_chunk(b, x, ntok, skip));
    return cuda_finish_chunk(b, out);
}

void cuda_timings(const moecal_backend *b, double t[MOECAL_NPHASE])
{
    for (int i = 0; i < MOECAL_NPHASE; i++)
        t[i] = b->t[i];
}

} /* namespace */

extern "C" {
moecal_status moecal_backend_cuda_submit_chunk(moecal_backend *b, const uint16_t *x,
                                               int64_t ntok, const uint8_t *skip)
{
    return cuda_submit_chunk(b, x, ntok, skip);
}

moecal_status moecal_backend_cuda_finish_chunk(moecal_backend *b, moecal_chunk_stats *out)
{
    return cuda_finish_chunk(b, out);
}

moecal_status moecal_backend_cuda_pin_host(moecal_backend *b, void *p, size_t bytes)
{
    if (b == NULL || p == NULL || bytes == 0)
        return MOECAL_OK;
    CUDA_CHECK(b->where, cudaHostRegister(p, bytes, cudaHostRegisterPortable));
    return MOECAL_OK;
}

unsigned long long moecal_backend_cuda_router_fixups(moecal_backend *b)
{
    unsigned long long n = 0;
    if (b != NULL && b->nfix != NULL && cudaSetDevice(b->dev) == cudaSuccess &&
        cudaDeviceSynchronize() == cudaSuccess)
        (void)cudaMemcpy(&n, b->nfix + 2, sizeof n, cudaMemcpyDeviceToHost);
    return n;
}

void moecal_backend_cuda_unpin_host(moecal_backend *b, void *p)
{
    (void)b;
    if (p != NULL)
        (void)cudaHostUnregister(p);
}

/* The table's members (cuda/backend_cuda_ops.c fills moecal_backend_cuda). */
bool moecal_backend_cuda_available(void)
{
    return cuda_available();
}

moecal_status moecal_backend_cuda_memory(const moecal_backend_config *cfg, uint64_t *host,
                                         uint64_t *device)
{
    return cuda_memory(cfg, host, device);
}

moecal_status moecal_backend_cuda_create(const moecal_backend_config *cfg, moecal_backend **out)
{
    return cuda_create(cfg, out);
}

moecal_status moecal_backend_cuda_load_layer(moecal_backend *b, const moecal_layer_weights *w)
{
    return cuda_load_layer(b, w);
}

moecal_status moecal_backend_cuda_run_chunk(moecal_backend *b, const uint16_t *x, int64_t ntok,
                                            const uint8_t *skip, moecal_chunk_stats *out)
{
    return cuda_run_chunk(b, x, ntok, skip, out);
}

void moecal_backend_cuda_timings(const moecal_backend *b, double t[MOECAL_NPHASE])
{
    cuda_timings(b, t);
}

void moecal_backend_cuda_destroy(moecal_backend *b)
{
    cuda_destroy(b);
}
}
