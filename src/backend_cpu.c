/* backend_cpu.c - the reference compute backend: CBLAS sgemm and OpenMP.
 *
 * Per layer, the rank's w1 and w3 (bf16) are widened once to float (exact)
 * into one [2I x H] matrix per local expert, so a single sgemm per block of
 * tokens gives a = x W1^T and b = x W3^T side by side.
 *
 * Per chunk:
 *   1. non-skipped rows are widened to float into a compact buffer, with
 *      each row's max |x| (exact: a max of stored values);
 *   2. router logits and the model's top-k, in blocks of ROUTE_BLOCK rows
 *      (top-k mode only).  Logits follow route_math.h to the bit: products
 *      summed in double in its fixed order for each expert, rounded once to
 *      float, so a token's experts and amax(x) do not depend on chunk
 *      boundaries, the thread count, the BLAS or the machine, and are the
 *      CUDA backend's too (vectorised across experts, which keeps each
 *      expert's order);
 *   3. a counting sort of the selections gives each local expert its rows in
 *      ascending token order;
 *   4. work items of at most ROW_BLOCK rows of one expert run in parallel
 *      (OpenMP, dynamic): gather rows, one sgemm [n x H] x [H x 2I], then
 *      h = bf16(bf16(silu(bf16(a))) * bf16(b)) and max |h|.
 *
 * Threading: OpenMP over work items with a single-threaded BLAS in each
 * thread.  The items are small GEMMs (a few hundred rows) of many experts,
 * where BLAS-internal threading pays a fork/join per call and leaves the
 * gather, router and activation phases serial; items also balance hot and
 * cold experts.  Item boundaries depend only on the chunk's data, never on
 * the thread count, and every reduction is a max, so results do not depend
 * on the number of threads.  Token counts and amax(x) are exact.
 *
 * NaN policy: weights (gate, bias, w1, w3) holding NaN or Inf are refused at
 * load_layer (MOECAL_ERR_NONFINITE).  Non-finite activation rows are the
 * caller's to skip.  A NaN that still arises in h (overflow of a GEMM to Inf,
 * then Inf * 0 or silu(-Inf)) is propagated into amax_h, as torch.amax
 * propagates it, so the caller sees it instead of a silently clipped value.
 */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* sched_getaffinity */
#endif
#include "config.h"

#include <errno.h>
#include <math.h>
#include <sched.h>
#include <stdlib.h>
#include <string.h>
#include <time.h>

#include <cblas.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "backend.h"
#include "route_math.h"
#include "router.h"
#include "util.h"

/* "#pragma omp parallel for CLAUSES", and nothing in builds without OpenMP */
#ifdef _OPENMP
#define PRAGMA_(x) _Pragma(#x)
#define OMP_PARALLEL_FOR(...) PRAGMA_(omp parallel for __VA_ARGS__)
#else
#define OMP_PARALLEL_FOR(...)
#endif

#define ROW_BLOCK 512    /* token rows per expert GEMM (512 beat 128 and 256) */
#define ROUTE_BLOCK 128  /* token rows per router GEMM */

/* OpenBLAS's thread control, when the BLAS is OpenBLAS; other CBLAS
 * implementations lack it and the weak reference stays NULL. */
void openblas_set_num_threads(int num_threads) __attribute__((weak));


typedef struct work_item {
    int32_t expert;      /* local expert index */
    int32_t nan;         /* 1 if h held a NaN */
    int64_t begin, end;  /* positions in the expert's row list */
    float amax_h;
} work_item;

typedef struct thread_buf {
    char *block;         /* the four below (carve_thread) */
    float *xg;           /* [ROW_BLOCK][H] gathered rows */
    float *ab;           /* [ROW_BLOCK][2I] a | b */
    void *router;        /* router scratch */
    double *acc;         /* [2E] logit accumulators (block, total) */
    double t[MOECAL_NPHASE];         /* seconds in gather, gemm, act */
    char pad[64];        /* keep neighbours' counters off this cache line */
} thread_buf;

struct moecal_backend {
    moecal_model_config model;   /* copy of the scalars (moe_layers not kept) */
    int E, H, NI, k, e0, nloc, nthreads;  /* NI: intermediate size (complex.h owns I) */
    int64_t max_tok;
    bool all_experts;
    int layer;                   /* -1 before the first load_layer */

    char *block;                 /* the arrays below (carve_arrays) */
    float *gate;                 /* [E][H] */
    double *gate_t;              /* [H][E]: the gate transposed, for the logits */
    float *bias;                 /* [E] */
    bool has_bias;
    float *w13;                  /* [nloc][2I][H] */

    float *xf;                   /* [max_tok][H] widened non-skipped rows */
    float *rowmax;               /* [max_tok] max |x| of each row (NaN if any) */
    int32_t *src_row;            /* [max_tok] token of each compact row */
    void *logits;                /* [max_tok][E] float (double when exact) */
    int prec;                    /* --router-logits (moecal_logit_prec) */
    int32_t *sel;                /* [max_tok][k] */
    int64_t *offs;               /* [nloc + 1] row list offsets */
    int64_t *fill;               /* [nloc] */
    int32_t *list;               /* [max_tok * k] compact rows per expert */
    work_item *items;
    int64_t max_items;
    thread_buf *tb;              /* [nthreads] */

    double t[MOECAL_NPHASE];
};

static int thread_id(void)
{
#ifdef _OPENMP
    return omp_get_thread_num();
#else
    return 0;
#endif
}

/* Threads when none are asked for: OMP_NUM_THREADS if set, else the CPUs
 * this process is bound to now.  The OpenMP runtime sized its default at
 * start-up, before the rank was bound to its cores, so it may count the
 * whole node. */
#ifdef _OPENMP
static int default_threads(void)
{
    const char *env = getenv("OMP_NUM_THREADS");
    if (env != NULL && *env != '\0')
        return omp_get_max_threads();
#ifdef __linux__
    cpu_set_t set;
    if (sched_getaffinity(0, sizeof set, &set) == 0 && CPU_COUNT(&set) > 0)
        return CPU_COUNT(&set);
#endif
    return omp_get_max_threads();
}
#endif

static inline float bf16_widen(uint16_t u)
{
    uint32_t v = (uint32_t)u << 16;
    float f;
    memcpy(&f, &v, sizeof f);
    return f;
}

static inline int bf16_nonfinite(uint16_t u)
{
    return (u & 0x7f80u) == 0x7f80u;
}

static void cpu_destroy(moecal_backend *b)
{
    if (b == NULL)
        return;
    if (b->tb != NULL) {
        for (int i = 0; i < b->nthreads; i++)
            free(b->tb[i].block);
        free(b->tb);
    }
    free(b->block);
    free(b);
}

/* The arrays sized by the configuration, in one block: each call gives the
 * sizes (c without a block) or the places (c over the block). */
static void carve_arrays(moecal_backend *b, moecal_carve *c, size_t nblk)
{
    size_t E = (size_t)b->E, H = (size_t)b->H, nloc = (size_t)b->nloc;
    size_t mt = (size_t)b->max_tok, k = (size_t)b->k;
    /* router blocks are always full: room for the zero rows of the last */
    size_t mt_pad = (mt + ROUTE_BLOCK - 1) / ROUTE_BLOCK * ROUTE_BLOCK;

    b->gate = moecal_carve_take(c, E, H * sizeof(float));
    b->gate_t = moecal_carve_take(c, E, H * sizeof(double));
    b->bias = moecal_carve_take(c, E, sizeof(float));
    b->w13 = moecal_carve_take(c, nloc * 2 * (size_t)b->NI, H * sizeof(float));
    b->xf = moecal_carve_take(c, mt_pad, H * sizeof(float));
    b->rowmax = moecal_carve_take(c, mt, sizeof(float));
    b->src_row = moecal_carve_take(c, mt, sizeof(int32_t));
    b->offs = moecal_carve_take(c, nloc + 1, sizeof(int64_t));
    b->fill = moecal_carve_take(c, nloc, sizeof(int64_t));
    b->items = moecal_carve_take(c, nblk, sizeof(work_item));
    if (!b->all_experts) {
        b->logits = moecal_carve_take(c, mt_pad, E * (b->prec == MOECAL_LOGITS_EXACT
                                                      ? sizeof(double) : sizeof(float)));
        b->sel = moecal_carve_take(c, mt, k * sizeof(int32_t));
        b->list = moecal_carve_take(c, mt, k * sizeof(int32_t));
    }
}

/* The sizes and settings create derives from cfg (no allocation). */
static void init_fields(moecal_backend *b, const moecal_backend_config *cfg)
{
    const moecal_model_config *m = cfg->model;

    b->model = *m;
    b->model.moe_layers = NULL;
    b->model.n_moe_layers = 0;
    b->E = m->n_routed_experts;
    b->H = m->hidden_size;
    b->NI = m->moe_intermediate_size;
    b->k = m->num_experts_per_tok;
    b->e0 = cfg->e0;
    b->nloc = cfg->e1 - cfg->e0;
    b->max_tok = cfg->max_chunk_tokens;
    b->all_experts = cfg->all_experts;
    b->prec = cfg->router_logits;
    b->layer = -1;
#ifdef _OPENMP
    b->nthreads = cfg->threads > 0 ? cfg->threads : default_threads();
#else
    b->nthreads = 1;
#endif
    if (b->nthreads < 1)
        b->nthreads = 1;
    /* work items: every expert's row list split into ROW_BLOCK pieces */
    if (b->all_experts)
        b->max_items = (int64_t)b->nloc * ((b->max_tok + ROW_BLOCK - 1) / ROW_BLOCK);
    else
        b->max_items = (int64_t)b->nloc +
                       (b->max_tok * (int64_t)b->k + ROW_BLOCK - 1) / ROW_BLOCK;
}

/* One thread's buffers: gather, GEMM output, router scratch, logit sums. */
static void carve_thread(const moecal_backend *b, moecal_carve *c, thread_buf *t)
{
    size_t H = (size_t)b->H, I2 = 2 * (size_t)b->NI;

    /* all-experts mode multiplies the compact rows in place: no gather */
    t->xg = b->all_experts ? NULL : moecal_carve_take(c, ROW_BLOCK, H * sizeof(float));
    t->ab = moecal_carve_take(c, ROW_BLOCK, I2 * sizeof(float));
    t->router = moecal_carve_take(c, moecal_router_scratch_size(&b->model), 1);
    t->acc = moecal_carve_take(c, 2 * (size_t)b->E, sizeof(double));
}

static moecal_status cpu_memory(const moecal_backend_config *cfg, uint64_t *host,
                                uint64_t *device)
{
    moecal_backend b;
    moecal_carve c = {0};
    thread_buf t;

    MOECAL_TRY(moecal_backend_check_config(cfg, "cpu"));
    memset(&b, 0, sizeof b);
    init_fields(&b, cfg);
    carve_arrays(&b, &c, (size_t)b.max_items);
    for (int i = 0; i < b.nthreads; i++)
        carve_thread(&b, &c, &t);
    *host = c.used + (uint64_t)b.nthreads * sizeof(thread_buf) + sizeof b;
    *device = 0;
    return c.overflow ? moecal_error_set(MOECAL_ERR_NOMEM, "cpu backend: sizes overflow")
                      : MOECAL_OK;
}

static moecal_status cpu_create(const moecal_backend_config *cfg, moecal_backend **out)
{
    moecal_backend *b;
    size_t nloc;

    *out = NULL;
    MOECAL_TRY(moecal_backend_check_config(cfg, "cpu"));
    b = calloc(1, sizeof *b);
    if (b == NULL)
        return moecal_error_errno(ENOMEM, "cpu backend");
    init_fields(b, cfg);
    nloc = (size_t)b->nloc;
    const int64_t nblk = b->max_items;

    moecal_carve c = {0};
    carve_arrays(b, &c, (size_t)nblk);
    bool ok = moecal_carve_alloc(&c);
    if (ok) {
        carve_arrays(b, &c, (size_t)nblk);
        b->block = c.block;
    }
    b->tb = calloc((size_t)b->nthreads, sizeof(thread_buf));
    ok = ok && b->tb;
    for (int i = 0; ok && i < b->nthreads; i++) {
        moecal_carve tc = {0};
        thread_buf *t = &b->tb[i];
        carve_thread(b, &tc, t);
        ok = moecal_carve_alloc(&tc);
        if (ok) {
            carve_thread(b, &tc, t);
            t->block = tc.block;
        }
    }
    if (!ok) {
        cpu_destroy(b);
        return moecal_error_set(MOECAL_ERR_NOMEM, "cpu backend: out of memory for %d local "
                                "experts (H %d, I %d) and chunks of %lld tokens",
                                (int)nloc, b->H, b->NI, (long long)b->max_tok);
    }

    /* Parallelism comes from OpenMP; each thread calls a sequential BLAS.
     * Without OpenMP, let the BLAS use the threads asked for. */
    if (openblas_set_num_threads != NULL) {
#ifdef _OPENMP
        openblas_set_num_threads(1);
#else
        if (cfg->threads > 0)
            openblas_set_num_threads(cfg->threads);
#endif
    }
    *out = b;
    return MOECAL_OK;
}

static moecal_status cpu_load_layer(moecal_backend *b, const moecal_layer_weights *w)
{
    const size_t H = (size_t)b->H, NI = (size_t)b->NI;
    const size_t gsz = (size_t)b->E * H;

    if (w == NULL || w->gate == NULL || (b->nloc > 0 && (w->w1 == NULL || w->w3 == NULL)))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cpu backend: layer weights missing");
    if (b->model.has_correction_bias && w->bias == NULL)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "layer %d: the router has no "
                                "e_score_correction_bias", w->layer);
    b->layer = -1;

    for (size_t i = 0; i < gsz; i++) {
        if (!isfinite(w->gate[i]))
            return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: router weight [%zu, %zu] "
                                    "is %g", w->layer, i / H, i % H, (double)w->gate[i]);
    }
    memcpy(b->gate, w->gate, gsz * sizeof(float));
    for (size_t e = 0; e < (size_t)b->E; e++)
        for (size_t h = 0; h < H; h++)
            b->gate_t[h * (size_t)b->E + e] = (double)w->gate[e * H + h];
    b->has_bias = w->bias != NULL;
    if (b->has_bias) {
        for (int e = 0; e < b->E; e++) {
            if (!isfinite(w->bias[e]))
                return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: "
                                        "e_score_correction_bias[%d] is %g", w->layer, e,
                                        (double)w->bias[e]);
        }
        memcpy(b->bias, w->bias, (size_t)b->E * sizeof(float));
    }

    /* widen w1 | w3, one row of H at a time (rows of all local experts in
     * one loop, so a rank with a single expert still uses every thread);
     * the first bad row is reported whatever thread found it */
    const int64_t nrows = (int64_t)b->nloc * 2 * (int64_t)NI;
    int64_t bad_row = nrows;
OMP_PARALLEL_FOR(num_threads(b->nthreads) schedule(static) reduction(min:bad_row))
    for (int64_t r = 0; r < nrows; r++) {
        int64_t e = r / (2 * (int64_t)NI), j = r % (2 * (int64_t)NI);
        const uint16_t *src = (j < (int64_t)NI ? w->w1 : w->w3) +
                              ((size_t)e * NI + (size_t)(j % (int64_t)NI)) * H;
        float *dst = b->w13 + (size_t)r * H;
        unsigned bad = 0;
        for (size_t c = 0; c < H; c++) {
            bad |= (unsigned)bf16_nonfinite(src[c]);
            dst[c] = bf16_widen(src[c]);
        }
        if (bad && r < bad_row)
            bad_row = r;
    }
    if (bad_row < nrows) {
        int64_t e = bad_row / (2 * (int64_t)NI), j = bad_row % (2 * (int64_t)NI);
        int up = j >= (int64_t)NI;
        int64_t row = j % (int64_t)NI;
        const uint16_t *src = (up ? w->w3 : w->w1) + ((size_t)e * NI + (size_t)row) * H;
        size_t c = 0;
        while (c < H - 1 && !bf16_nonfinite(src[c]))
            c++;
        return moecal_error_set(MOECAL_ERR_NONFINITE, "layer %d: expert %d %s [%lld, %zu] is %s",
                                w->layer, b->e0 + (int)e, up ? "up_proj (w3)" : "gate_proj (w1)",
                                (long long)row, c, (src[c] & 0x7fu) ? "NaN" : "Inf");
    }
    b->layer = w->layer;
    return MOECAL_OK;
}

/* x rounded to the nearest bf16 (ties to even), as a float: the rounding of
 * moecal_round_bf16, inlined because it runs four times per element of a | b.
 * A NaN stays a NaN. */
static inline float round_bf16(float x)
{
    uint32_t u;
    memcpy(&u, &x, sizeof u);
    if ((u & 0x7fffffffu) <= 0x7f800000u) {
        u += 0x7fffu + ((u >> 16) & 1u);
        u &= 0xffff0000u;
        memcpy(&x, &u, sizeof x);
    }
    return x;
}

/* max |h| over one work item's rows of a | b; NaN reported through *nan. */
static float activation_amax(const float *ab, int64_t n, size_t NI, int32_t *nan)
{
    float m = 0.0f;
    unsigned anynan = 0;

    for (int64_t r = 0; r < n; r++) {
        const float *ra = ab + (size_t)r * 2 * NI;
        const float *rb = ra + NI;
        for (size_t j = 0; j < NI; j++) {
            float a = round_bf16(ra[j]);
            float s = round_bf16(a / (1.0f + expf(-a)));
            float h = fabsf(round_bf16(s * round_bf16(rb[j])));
            anynan |= (unsigned)(h != h);
            m = h > m ? h : m;
        }
    }
    *nan = anynan != 0;
    return m;
}

/* One token's logits, route_math.h's moecal_route_logit_fd for every expert:
 * per block of MOECAL_RM_BLOCK h, acc[e] += x[h] * g[e][h] in ascending h
 * from +0.0 (each product exact in double, so contraction to fma changes
 * nothing), then tot[e] += acc[e]; vectorised over e.  acc holds 2E.  out
 * receives them rounded as prec says (float), or as they are (double, for
 * MOECAL_LOGITS_EXACT). */
static void route_logits(const double *gate_t, const float *x, size_t H, size_t E, double *acc,
                         int prec, void *out)
{
    double *tot = acc + E;

    for (size_t e = 0; e < E; e++)
        tot[e] = 0.0;
    for (size_t h0 = 0; h0 < H; h0 += MOECAL_RM_BLOCK) {
        size_t h1 = H - h0 < MOECAL_RM_BLOCK ? H : h0 + MOECAL_RM_BLOCK;
        for (size_t e = 0; e < E; e++)
            acc[e] = 0.0;
        for (size_t h = h0; h < h1; h++) {
            const double xv = (double)x[h], *g = gate_t + h * E;
            for (size_t e = 0; e < E; e++)
                acc[e] += xv * g[e];
        }
        for (size_t e = 0; e < E; e++)
            tot[e] += acc[e];
    }
    if (prec == MOECAL_LOGITS_EXACT) {
        memcpy(out, tot, E * sizeof(double));
    } else {
        float *o = out;
        for (size_t e = 0; e < E; e++)
            o[e] = moecal_route_round(tot[e], prec);
    }
}

/* Step 1 of a chunk: the rows not skipped, widened to float and compacted
 * in token order, with each row's max |x| (NaN when it holds one); returns
 * their number. */
static int64_t widen_rows(moecal_backend *b, const uint16_t *x, int64_t ntok,
                          const uint8_t *skip)
{
    const size_t H = (size_t)b->H;
    int64_t nvalid = 0;

    for (int64_t t = 0; t < ntok; t++) {
        if (skip == NULL || !skip[t])
            b->src_row[nvalid++] = (int32_t)t;
    }
OMP_PARALLEL_FOR(num_threads(b->nthreads) schedule(static))
    for (int64_t r = 0; r < nvalid; r++) {
        const uint16_t *src = x + (size_t)b->src_row[r] * H;
        float *dst = b->xf + (size_t)r * H;
        float m = 0.0f;
        unsigned nan = 0;
        for (size_t c = 0; c < H; c++) {
            float v = bf16_widen(src[c]);
            float a = fabsf(v);
            dst[c] = v;
            nan |= (unsigned)(a != a);
            m = a > m ? a : m;
        }
        b->rowmax[r] = nan ? NAN : m;
    }
    return nvalid;
}

/* Step 2 of a chunk: the router's choice for nvalid widened rows, in full
 * blocks of ROUTE_BLOCK rows (the padding rows zeroed). */
static void route_rows(moecal_backend *b, int64_t nvalid)
{
    const int E = b->E, k = b->k;
    const size_t H = (size_t)b->H;
    int64_t nrb = (nvalid + ROUTE_BLOCK - 1) / ROUTE_BLOCK;
    const float *bias = b->has_bias ? b->bias : NULL;
    size_t npad = (size_t)(nrb * ROUTE_BLOCK - nvalid);

    memset(b->xf + (size_t)nvalid * H, 0, npad * H * sizeof(float));
OMP_PARALLEL_FOR(num_threads(b->nthreads) schedule(dynamic, 1))
    for (int64_t blk = 0; blk < nrb; blk++) {
        int64_t r0 = blk * ROUTE_BLOCK;
        int64_t nr = nvalid - r0 < ROUTE_BLOCK ? nvalid - r0 : ROUTE_BLOCK;
        const size_t esz = b->prec == MOECAL_LOGITS_EXACT ? sizeof(double) : sizeof(float);
        char *lg = (char *)b->logits + (size_t)r0 * (size_t)E * esz;
        double *acc = b->tb[thread_id()].acc;
        for (int64_t i = 0; i < nr; i++)
            route_logits(b->gate_t, b->xf + (size_t)(r0 + i) * H, H, (size_t)E, acc,
                         b->prec, lg + (size_t)i * (size_t)E * esz);
        if (b->prec == MOECAL_LOGITS_EXACT)
            moecal_router_select_scratch_d(&b->model, (const double *)(void *)lg, bias, nr,
                                           b->sel + (size_t)r0 * k, NULL,
                                           b->tb[thread_id()].router);
        else
            moecal_router_select_scratch(&b->model, (const float *)(void *)lg, bias, nr,
                                         b->sel + (size_t)r0 * k, NULL,
                                         b->tb[thread_id()].router);
    }
}

static moecal_status cpu_run_chunk(moecal_backend *b, const uint16_t *x, int64_t ntok,
                                   const uint8_t *skip, moecal_chunk_stats *out)
{
    const int k = b->k, nloc = b->nloc;
    const size_t H = (size_t)b->H, NI = (size_t)b->NI, I2 = 2 * NI;
    int64_t nvalid = 0, nitems = 0;
    double t0, t1;

    if (b->layer < 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cpu backend: run_chunk before load_layer");
    if (ntok < 0 || ntok > b->max_tok)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cpu backend: chunk of %lld tokens "
                                "(at most %lld)", (long long)ntok, (long long)b->max_tok);
    for (int e = 0; e < nloc; e++) {
        out->tokens[e] = 0;
        out->amax_x[e] = 0.0f;
        out->amax_h[e] = 0.0f;
    }
    if (nloc == 0 || ntok == 0)
        return MOECAL_OK;

    /* 1. widen the rows that are not skipped, compacted in token order;
     * 2. route them (top-k mode) */
    t0 = moecal_now();
    nvalid = widen_rows(b, x, ntok, skip);
    if (!b->all_experts && nvalid > 0)
        route_rows(b, nvalid);
    t1 = moecal_now();
    b->t[MOECAL_PHASE_ROUTE] += t1 - t0;
    t0 = t1;

    /* 3. rows of each local expert (counting sort, ascending token order),
     * token counts, amax(x) */
    if (b->all_experts) {
        float m = 0.0f;
        unsigned nan = 0;
        for (int64_t r = 0; r < nvalid; r++) {
            float v = b->rowmax[r];
            nan |= (unsigned)(v != v);
            m = v > m ? v : m;
        }
        for (int e = 0; e < nloc; e++) {
            out->tokens[e] = nvalid;
            out->amax_x[e] = nvalid > 0 ? (nan ? NAN : m) : 0.0f;
        }
    } else {
        const int32_t e0 = b->e0, e1 = b->e0 + nloc;
        memset(b->fill, 0, (size_t)nloc * sizeof(int64_t));
        for (int64_t i = 0; i < nvalid * k; i++) {
            int32_t e = b->sel[i];
            if (e >= e0 && e < e1)
                b->fill[e - e0]++;
        }
        b->offs[0] = 0;
        for (int e = 0; e < nloc; e++) {
            out->tokens[e] = b->fill[e];
            b->offs[e + 1] = b->offs[e] + b->fill[e];
            b->fill[e] = b->offs[e];
        }
        for (int64_t r = 0; r < nvalid; r++) {
            const int32_t *s = b->sel + (size_t)r * k;
            for (int i = 0; i < k; i++) {
                if (s[i] >= e0 && s[i] < e1)
                    b->list[b->fill[s[i] - e0]++] = (int32_t)r;
            }
        }
        for (int e = 0; e < nloc; e++) {
            float m = 0.0f;
            unsigned nan = 0;
            for (int64_t i = b->offs[e]; i < b->offs[e + 1]; i++) {
                float v = b->rowmax[b->list[i]];
                nan |= (unsigned)(v != v);
                m = v > m ? v : m;
            }
            out->amax_x[e] = nan ? NAN : m;
        }
    }

    /* 4. work items, each at most ROW_BLOCK rows of one expert */
    for (int e = 0; e < nloc; e++) {
        /* all-experts mode: every expert takes all compact rows, in place */
        int64_t first = b->all_experts ? 0 : b->offs[e];
        int64_t last = b->all_experts ? nvalid : b->offs[e + 1];
        for (int64_t p = first; p < last; p += ROW_BLOCK) {
            work_item *it = &b->items[nitems++];
            it->expert = e;
            it->begin = p;
            it->end = p + ROW_BLOCK < last ? p + ROW_BLOCK : last;
        }
    }
    t1 = moecal_now();
    b->t[MOECAL_PHASE_GATHER] += t1 - t0;
    t0 = t1;
    for (int i = 0; i < b->nthreads; i++)
        memset(b->tb[i].t, 0, sizeof b->tb[i].t);

OMP_PARALLEL_FOR(num_threads(b->nthreads) schedule(dynamic, 1))
    for (int64_t n = 0; n < nitems; n++) {
        work_item *it = &b->items[n];
        thread_buf *tb = &b->tb[thread_id()];
        int64_t nr = it->end - it->begin;
        const float *a;
        double s0 = moecal_now(), s1;

        if (b->all_experts) {
            a = b->xf + (size_t)it->begin * H;
        } else {
            const int32_t *rows = b->list + it->begin;
            for (int64_t r = 0; r < nr; r++)
                memcpy(tb->xg + (size_t)r * H, b->xf + (size_t)rows[r] * H, H * sizeof(float));
            a = tb->xg;
        }
        s1 = moecal_now();
        tb->t[MOECAL_PHASE_GATHER] += s1 - s0;
        s0 = s1;
        cblas_sgemm(CblasRowMajor, CblasNoTrans, CblasTrans, (int)nr, (int)I2, (int)H, 1.0f,
                    a, (int)H, b->w13 + (size_t)it->expert * I2 * H, (int)H, 0.0f, tb->ab,
                    (int)I2);
        s1 = moecal_now();
        tb->t[MOECAL_PHASE_GEMM] += s1 - s0;
        s0 = s1;
        it->amax_h = activation_amax(tb->ab, nr, NI, &it->nan);
        tb->t[MOECAL_PHASE_ACT] += moecal_now() - s0;
    }
    t1 = moecal_now();

    /* apportion the parallel section's wall time by the threads' busy time */
    {
        double busy[MOECAL_NPHASE] = {0}, sum = 0.0;
        for (int i = 0; i < b->nthreads; i++) {
            for (int j = MOECAL_PHASE_GATHER; j <= MOECAL_PHASE_ACT; j++)
                busy[j] += b->tb[i].t[j];
        }
        for (int j = MOECAL_PHASE_GATHER; j <= MOECAL_PHASE_ACT; j++)
            sum += busy[j];
        for (int j = MOECAL_PHASE_GATHER; j <= MOECAL_PHASE_ACT && sum > 0.0; j++)
            b->t[j] += (t1 - t0) * busy[j] / sum;
    }

    for (int64_t n = 0; n < nitems; n++) {
        const work_item *it = &b->items[n];
        float *m = &out->amax_h[it->expert];
        if (it->nan || *m != *m)
            *m = NAN;
        else if (it->amax_h > *m)
            *m = it->amax_h;
    }
    return MOECAL_OK;
}

static void cpu_timings(const moecal_backend *b, double t[MOECAL_NPHASE])
{
    for (int i = 0; i < MOECAL_NPHASE; i++)
        t[i] = b->t[i];
}

const moecal_backend_ops moecal_backend_cpu = {
    .name = "cpu",
    .available = NULL,
    .create = cpu_create,
    .load_layer = cpu_load_layer,
    .run_chunk = cpu_run_chunk,
    .timings = cpu_timings,
    .destroy = cpu_destroy,
    .memory = cpu_memory,
};
