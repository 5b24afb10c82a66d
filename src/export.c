/* export.c - `moecal export`: the NVFP4 checkpoint writer (see export.h). */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE /* nftw */
#endif
#include "config.h"

#include <dirent.h>
#include <ftw.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <limits.h>
#include <math.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>
#include <unistd.h>

#include <jansson.h>
#include <mpi.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "amaxread.h"
#include "export.h"
#include "fp8.h"
#include "model.h"
#include "nvfp4.h" /* and nvfp4_math.h */
#ifdef HAVE_CUDA
#include "../cuda/nvfp4_cuda.h"
#endif
#include "runtime.h"
#include "safetensors.h"
#include "util.h"

#define INDEX_NAME "model.safetensors.index.json"
#define TMP_SUFFIX ".moecal-tmp"
#define OLD_SUFFIX ".moecal-old"
#define COPY_PIECE ((size_t)16 << 20)
/* per rank: bytes read, written, peak host MiB, GPU MiB, on GPU, seconds */
#define NSTAT 6

typedef unsigned long long ull;

/* ------------------------------------------------------------------ fingerprint */

moecal_status moecal_checkpoint_fingerprint(moecal_model *m, char hex[17])
{
    uint64_t h = MOECAL_FNV_BASIS;
    char path[4200];

    snprintf(path, sizeof path, "%s/config.json", moecal_model_dir(m));
    MOECAL_TRY(moecal_fnv1a_file(&h, path, UINT64_MAX));
    for (size_t i = 0; i < moecal_model_shard_count(m); i++) {
        const moecal_st_file *f;
        const char *name = moecal_model_shard_name(m, i);
        MOECAL_TRY(moecal_model_shard_open(m, i, &f));
        h = moecal_fnv1a(h, name, strlen(name) + 1);
        /* the header: every tensor's name, dtype, shape and offsets */
        MOECAL_TRY(moecal_fnv1a_file(&h, moecal_st_path(f), moecal_st_data_offset(f)));
    }
    snprintf(hex, 17, "%016" PRIx64, h);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ the plan */

typedef enum {
    OUT_COPY,      /* the source bytes */
    OUT_BF16,      /* an FP8 weight with its block scales, dequantized */
    OUT_W,         /* NVFP4 weight (writes the three below too) */
    OUT_WS,        /* weight_scale */
    OUT_WS2,       /* weight_scale_2 */
    OUT_IS         /* input_scale */
} out_kind;

typedef struct out_tensor {
    char *name;
    moecal_dtype dtype;
    int ndim;
    int64_t shape[MOECAL_ST_MAX_DIMS];
    out_kind kind;
    const moecal_st_file *file;          /* the source tensor's shard */
    const moecal_st_tensor *src;
    const moecal_st_file *sfile;         /* OUT_BF16: its scale_inv */
    const moecal_st_tensor *scale;
    int li, e, p;                        /* NVFP4: amax-file layer index, expert, proj */
} out_tensor;

typedef struct plan {
    out_tensor *t;
    size_t n, cap;
} plan;

typedef struct expert_ref {
    char *name;              /* the weight's tensor name */
    int li, layer, e, p;
} expert_ref;

typedef struct job {
    const moecal_comm *c;
    const moecal_export_params *p;
    moecal_model *model;
    const moecal_model_config *cfg;
    moecal_amax_data *amax;
    expert_ref *ex;          /* sorted by name */
    size_t nex;
    char tmp[4200], old[4200];
    int threads;
} job;

static int expert_cmp(const void *a, const void *b)
{
    return strcmp(((const expert_ref *)a)->name, ((const expert_ref *)b)->name);
}

static const expert_ref *find_expert(const job *j, const char *name)
{
    expert_ref key = {(char *)name, 0, 0, 0, 0};
    return bsearch(&key, j->ex, j->nex, sizeof *j->ex, expert_cmp);
}

static void plan_free(plan *pl)
{
    for (size_t i = 0; i < pl->n; i++)
        free(pl->t[i].name);
    free(pl->t);
    memset(pl, 0, sizeof *pl);
}

static moecal_status plan_add(plan *pl, const char *name, const char *suffix, moecal_dtype dt,
                              int ndim, const int64_t *shape, out_kind kind, out_tensor **out)
{
    if (pl->n == pl->cap) {
        size_t cap = pl->cap ? 2 * pl->cap : 64;
        out_tensor *t = realloc(pl->t, cap * sizeof *t);
        if (!t)
            return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory for the plan");
        pl->t = t;
        pl->cap = cap;
    }
    out_tensor *o = &pl->t[pl->n];
    memset(o, 0, sizeof *o);
    size_t len = strlen(name) + (suffix ? strlen(suffix) : 0) + 1;
    if (!(o->name = malloc(len)))
        return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory for the plan");
    snprintf(o->name, len, "%s%s", name, suffix ? suffix : "");
    o->dtype = dt;
    o->ndim = ndim;
    for (int d = 0; d < ndim; d++)
        o->shape[d] = shape[d];
    o->kind = kind;
    pl->n++;
    *out = o;
    return MOECAL_OK;
}

static bool ends_with(const char *s, const char *suffix)
{
    size_t a = strlen(s), b = strlen(suffix);
    return a >= b && strcmp(s + a - b, suffix) == 0;
}

/* The FP8 weight a "<w>_scale_inv" tensor belongs to, if there is one. */
static bool is_fp8_scale(job *j, const char *name)
{
    const moecal_st_file *f;
    const moecal_st_tensor *t;
    char w[1024];
    size_t n = strlen(name);

    if (!ends_with(name, "_scale_inv") || n - 10 >= sizeof w)
        return false;
    memcpy(w, name, n - 10);
    w[n - 10] = '\0';
    if (moecal_model_find(j->model, w, &f, &t) != MOECAL_OK) {
        moecal_error_clear();
        return false;
    }
    return t->dtype == MOECAL_DT_F8_E4M3;
}

/* What shard i of the source becomes. */
static moecal_status plan_shard(job *j, size_t i, plan *pl)
{
    const moecal_st_file *f;

    memset(pl, 0, sizeof *pl);
    MOECAL_TRY(moecal_model_shard_open(j->model, i, &f));
    for (size_t k = 0; k < moecal_st_count(f); k++) {
        const moecal_st_tensor *t = moecal_st_tensor_at(f, k);
        const expert_ref *x = find_expert(j, t->name);
        out_tensor *o;

        if (t->dtype == MOECAL_DT_UNKNOWN)
            return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s' has dtype %s, "
                                    "which moecal does not know how to copy",
                                    moecal_st_path(f), t->name, t->dtype_name);
        if (x != NULL) {
            int64_t N = t->shape[0], K = t->shape[1];
            if (t->ndim != 2 || K % MOECAL_NVFP4_BLOCK != 0)
                return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                        "%s: tensor '%s' has %" PRId64 " columns, not a "
                                        "multiple of %d: NVFP4 needs whole blocks of 16 (and "
                                        "vLLM and SGLang refuse padding)", moecal_st_path(f),
                                        t->name, t->ndim == 2 ? K : (int64_t)0,
                                        MOECAL_NVFP4_BLOCK);
            /* weight "<m>.weight" -> "<m>.weight", "<m>.weight_scale", ... */
            char mod[1024];
            size_t mlen = strlen(t->name) - strlen(".weight");
            if (!ends_with(t->name, ".weight") || mlen >= sizeof mod)
                return moecal_error_set(MOECAL_ERR_FORMAT, "%s: expert tensor '%s' is not "
                                        "named <module>.weight", moecal_st_path(f), t->name);
            memcpy(mod, t->name, mlen);
            mod[mlen] = '\0';
            const int64_t ws[2] = {N, K / 2}, ss[2] = {N, K / MOECAL_NVFP4_BLOCK};
            const out_kind kinds[4] = {OUT_W, OUT_WS, OUT_WS2, OUT_IS};
            const char *suf[4] = {".weight", ".weight_scale", ".weight_scale_2", ".input_scale"};
            const moecal_dtype dts[4] = {MOECAL_DT_U8, MOECAL_DT_F8_E4M3, MOECAL_DT_F32,
                                         MOECAL_DT_F32};
            for (int q = 0; q < 4; q++) {
                MOECAL_TRY(plan_add(pl, mod, suf[q], dts[q], q < 2 ? 2 : 0, q == 0 ? ws : ss,
                                    kinds[q], &o));
                o->file = f;
                o->src = t;
                o->li = x->li;
                o->e = x->e;
                o->p = x->p;
            }
            continue;
        }
        if (is_fp8_scale(j, t->name))
            continue; /* the weight becomes NVFP4 or BF16 */
        if (t->dtype == MOECAL_DT_F8_E4M3 && t->ndim == 2) {
            const moecal_st_file *sf;
            const moecal_st_tensor *st;
            char sname[1100];
            snprintf(sname, sizeof sname, "%s_scale_inv", t->name);
            if (moecal_model_find(j->model, sname, &sf, &st) == MOECAL_OK) {
                MOECAL_TRY(plan_add(pl, t->name, NULL, MOECAL_DT_BF16, 2, t->shape, OUT_BF16,
                                    &o));
                o->file = f;
                o->src = t;
                o->sfile = sf;
                o->scale = st;
                continue;
            }
            moecal_error_clear();
        }
        if (t->dtype == MOECAL_DT_F8_E4M3)
            /* config.json loses its quantization_config: raw FP8 codes would
             * be read as weights without their scales */
            return moecal_error_set(MOECAL_ERR_UNSUPPORTED,
                                    "%s: tensor '%s' is F8_E4M3 %s; export writes FP8 weights "
                                    "as BF16 with their 2-D block scales (<name>_scale_inv) and "
                                    "cannot carry it over", moecal_st_path(f), t->name,
                                    t->ndim == 2 ? "without a weight_scale_inv" : "of more than "
                                    "2 dimensions");
        MOECAL_TRY(plan_add(pl, t->name, NULL, t->dtype, t->ndim, t->shape, OUT_COPY, &o));
        o->file = f;
        o->src = t;
    }
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ writing */

static uint64_t out_bytes(const out_tensor *o)
{
    uint64_t n = moecal_dtype_size(o->dtype);
    for (int d = 0; d < o->ndim; d++)
        n *= (uint64_t)o->shape[d];
    return n;
}

/* ------------------------------------------------------------------ the work */

/* One unit of work: an output tensor, or a piece of a large copied one. */
typedef struct work_item {
    size_t shard, k;
    uint64_t off;                /* OUT_COPY: the piece's first byte */
} work_item;

/* The rank's shards, their writers and the items, shared by its workers. */
typedef struct pool {
    job *j;
    const plan *plans;
    moecal_st_writer **w;        /* [nshards], the rank's own ones open */
    work_item *items;
    size_t nitems, next;
    size_t max_elems, max_scales;/* the largest expert projection */
    int device;                  /* CUDA device, -1: quantize on the CPU */
    pthread_mutex_t mu;
    moecal_status st;            /* the first failure */
    char msg[2048];
    uint64_t bytes_in, bytes_out;
    size_t gpu_bytes;            /* device memory, all workers */
} pool;

/* A worker's buffers, grown to the largest item it has taken. */
typedef struct worker {
    pool *pl;
    void *copy;
    uint16_t *wb;
    uint8_t *packed, *scales;
    size_t cap;                  /* elements wb/packed/scales hold */
#ifdef HAVE_CUDA
    moecal_nvfp4_gpu *gpu;
#endif
    uint64_t bytes_in, bytes_out;
} worker;

static moecal_status write_copy(worker *wk, moecal_st_writer *w, const out_tensor *o,
                                uint64_t off)
{
    uint64_t total = o->src->end - o->src->begin;
    size_t n = total - off < COPY_PIECE ? (size_t)(total - off) : COPY_PIECE;

    if (!wk->copy && !(wk->copy = malloc(COPY_PIECE)))
        return moecal_error_set(MOECAL_ERR_NOMEM, "export: no memory for a copy buffer");
    MOECAL_TRY(moecal_st_read_range(o->file, o->src, off, wk->copy, n));
    MOECAL_TRY(moecal_st_writer_write_at(w, o->name, off, wk->copy, n));
    wk->bytes_in += n;
    wk->bytes_out += n;
    return MOECAL_OK;
}

static moecal_status write_bf16(job *j, worker *wk, moecal_st_writer *w, const out_tensor *o)
{
    const moecal_st_tensor *t = o->src, *s = o->scale;
    size_t rows = (size_t)t->shape[0], cols = (size_t)t->shape[1];
    size_t B = (size_t)j->cfg->weight_block[0];
    size_t nbr = (rows + B - 1) / B, nbc = (cols + B - 1) / B;
    uint8_t *q = NULL;
    float *sc = NULL;
    uint16_t *out = NULL;
    uint64_t nan = 0;
    moecal_status st = MOECAL_OK;

    if (s->dtype != MOECAL_DT_F32 || s->ndim != 2 || (size_t)s->shape[0] != nbr ||
        (size_t)s->shape[1] != nbc)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: tensor '%s' is %s [%" PRId64 ", %"
                                PRId64 "] but must be F32 [%zu, %zu] (the %zux%zu block scales "
                                "of '%s')", moecal_st_path(o->sfile), s->name, s->dtype_name,
                                s->shape[0], s->ndim > 1 ? s->shape[1] : (int64_t)0, nbr, nbc,
                                B, B, t->name);
    q = malloc(rows * cols);
    sc = malloc(nbr * nbc * sizeof *sc);
    out = malloc(rows * cols * sizeof *out);
    if (!q || !sc || !out) {
        st = moecal_error_set(MOECAL_ERR_NOMEM, "%s: no memory to dequantize '%s' (%zu x %zu)",
                              moecal_st_path(o->file), t->name, rows, cols);
        goto out;
    }
    if ((st = moecal_st_read(o->file, t, q, rows * cols)) != MOECAL_OK ||
        (st = moecal_st_read(o->sfile, s, sc, nbr * nbc * sizeof *sc)) != MOECAL_OK)
        goto out;
    st = moecal_fp8_dequant_bf16(q, rows, cols, sc, B, out, &nan, NULL);
    if (st != MOECAL_OK) {
        moecal_error_prefix("%s: tensor '%s': ", moecal_st_path(o->sfile), s->name);
        goto out;
    }
    if (nan) {
        st = moecal_error_set(MOECAL_ERR_NONFINITE, "%s: tensor '%s' holds %llu NaN codes",
                              moecal_st_path(o->file), t->name, (ull)nan);
        goto out;
    }
    st = moecal_st_writer_write(w, o->name, out, rows * cols * sizeof *out);
    wk->bytes_in += rows * cols + nbr * nbc * sizeof *sc;
    wk->bytes_out += rows * cols * sizeof *out;
out:
    free(q);
    free(sc);
    free(out);
    return st;
}

/* The amax file's value for (li, e, p). */
static float amax_at(const job *j, const float *table, int li, int e, int p)
{
    return table[moecal_amax_idx(j->amax, li, e, p)];
}

/* The scales of an expert projection from the amax file: *s2 (gate and up
 * share the larger weight amax: engines fuse them into one GEMM) and *is. */
static moecal_status expert_scales(const job *j, const out_tensor *o, float *s2, float *is)
{
    const int li = o->li, e = o->e, p = o->p, layer = j->amax->layers[li];
    const float *wa = j->amax->weight_amax, *ia = j->amax->input_amax;
    float w = p == MOECAL_W2 ? amax_at(j, wa, li, e, p)
                             : fmaxf(amax_at(j, wa, li, e, MOECAL_W1),
                                     amax_at(j, wa, li, e, MOECAL_W3));
    float x = amax_at(j, ia, li, e, p);

    if (p != MOECAL_W2 &&
        moecal_nv_f2u(amax_at(j, ia, li, e, MOECAL_W1)) !=
            moecal_nv_f2u(amax_at(j, ia, li, e, MOECAL_W3)))
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: layer %d expert %d: gate and up input "
                                "amax differ (%.9g, %.9g) but see the same input",
                                j->p->amax_path, layer, e,
                                (double)amax_at(j, ia, li, e, MOECAL_W1),
                                (double)amax_at(j, ia, li, e, MOECAL_W3));
    if (!(w > 0.0f))
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: tensor '%s' (layer %d expert %d): "
                                "weight amax %g: an all-zero weight has no NVFP4 scale",
                                moecal_st_path(o->file), o->src->name, layer, e, (double)w);
    if (!(x > 0.0f))
        return moecal_error_set(MOECAL_ERR_UNSUPPORTED, "%s: layer %d expert %d %s: input amax "
                                "%g: no token reached it, and an input_scale of 0 cannot be "
                                "served", j->p->amax_path, layer, e, moecal_proj_name[p],
                                (double)x);
    *s2 = moecal_nvfp4_scale2(w);
    *is = moecal_nvfp4_scale2(x);
    return MOECAL_OK;
}

/* The weight's amax, as the source holds it, must be the one calibrated. */
static moecal_status check_weight_amax(const job *j, const out_tensor *o, float amax)
{
    float want = amax_at(j, j->amax->weight_amax, o->li, o->e, o->p);

    if (moecal_nv_f2u(amax) == moecal_nv_f2u(want))
        return MOECAL_OK;
    return moecal_error_set(MOECAL_ERR_MISMATCH,
                            "%s: tensor '%s' has amax %.9g but %s recorded %.9g for it (layer "
                            "%d expert %d %s): the checkpoint is not the one calibrated",
                            moecal_st_path(o->file), o->src->name, (double)amax,
                            j->p->amax_path, (double)want, j->amax->layers[o->li], o->e,
                            moecal_proj_name[o->p]);
}

static moecal_status grow(worker *wk, size_t n)
{
    if (n <= wk->cap)
        return MOECAL_OK;
    free(wk->wb);
    free(wk->packed);
    free(wk->scales);
    wk->wb = malloc(n * sizeof *wk->wb);
    wk->packed = malloc(n / 2);
    wk->scales = malloc(n / MOECAL_NVFP4_BLOCK);
    wk->cap = wk->wb && wk->packed && wk->scales ? n : 0;
    if (!wk->cap)
        return moecal_error_set(MOECAL_ERR_NOMEM, "export: no memory to quantize a tensor of "
                                "%zu elements", n);
    return MOECAL_OK;
}

/* Quantize on the CPU: the reference. */
static moecal_status quantize_cpu(job *j, worker *wk, const out_tensor *o, float s2,
                                  const uint8_t **packed, const uint8_t **scales)
{
    const size_t N = (size_t)o->src->shape[0], K = (size_t)o->src->shape[1];
    float amax = 0.0f;

    MOECAL_TRY(grow(wk, N * K));
    /* dequantized exactly as calibrate did; shape, dtype and NaN checked */
    MOECAL_TRY(moecal_model_load_expert(j->model, j->amax->layers[o->li], o->e, o->p, wk->wb,
                                        &amax));
    MOECAL_TRY(check_weight_amax(j, o, amax));
    for (size_t r = 0; r < N; r++)
        moecal_nvfp4_quantize_row_bf16(wk->wb + r * K, K, s2, wk->packed + r * (K / 2),
                                       wk->scales + r * (K / MOECAL_NVFP4_BLOCK));
    *packed = wk->packed;
    *scales = wk->scales;
    return MOECAL_OK;
}

#ifdef HAVE_CUDA
/* Quantize on the GPU from the source's own bytes (nvfp4_cuda.h); F16 and
 * F32 sources are converted to bf16 on the CPU first. */
static moecal_status quantize_gpu(job *j, worker *wk, const out_tensor *o, float s2,
                                  const uint8_t **packed, const uint8_t **scales)
{
    const size_t N = (size_t)o->src->shape[0], K = (size_t)o->src->shape[1];
    const int layer = j->amax->layers[o->li];
    const moecal_nvfp4_gpu_host *h;
    moecal_nvfp4_gpu_result res;
    moecal_dtype dt;

    if (!wk->gpu)
        MOECAL_TRY(moecal_nvfp4_gpu_create(wk->pl->device, wk->pl->max_elems,
                                           wk->pl->max_scales, &wk->gpu));
    h = moecal_nvfp4_gpu_buffers(wk->gpu);
    MOECAL_TRY(moecal_model_read_expert_raw(j->model, layer, o->e, o->p, h->w, h->scale_inv,
                                            &dt));
    if (dt != MOECAL_DT_F8_E4M3 && dt != MOECAL_DT_BF16)
        MOECAL_TRY(moecal_model_load_expert(j->model, layer, o->e, o->p, h->w, NULL));
    MOECAL_TRY(moecal_nvfp4_gpu_quantize(wk->gpu, dt == MOECAL_DT_F8_E4M3, N, K,
                                         (size_t)j->cfg->weight_block[0], s2, &res));
    if (res.nonfinite)
        return moecal_error_set(MOECAL_ERR_NONFINITE, "%s: tensor '%s' holds %llu NaN or Inf "
                                "values", moecal_st_path(o->file), o->src->name,
                                (ull)res.nonfinite);
    MOECAL_TRY(check_weight_amax(j, o, res.amax));
    *packed = h->packed;
    *scales = h->scales;
    return MOECAL_OK;
}
#endif

static moecal_status write_nvfp4(job *j, worker *wk, moecal_st_writer *w, const plan *pl,
                                 size_t k)
{
    const out_tensor *o = &pl->t[k];
    const size_t N = (size_t)o->src->shape[0], K = (size_t)o->src->shape[1];
    const uint8_t *packed = NULL, *scales = NULL;
    float s2, is;

    /* the plan: weight, weight_scale, weight_scale_2, input_scale in a row */
    MOECAL_ASSERT(k + 3 < pl->n && pl->t[k + 1].kind == OUT_WS && pl->t[k + 2].kind == OUT_WS2 &&
                  pl->t[k + 3].kind == OUT_IS && K % MOECAL_NVFP4_BLOCK == 0);

    MOECAL_TRY(expert_scales(j, o, &s2, &is));
#ifdef HAVE_CUDA
    if (wk->pl->device >= 0)
        MOECAL_TRY(quantize_gpu(j, wk, o, s2, &packed, &scales));
    else
#endif
        MOECAL_TRY(quantize_cpu(j, wk, o, s2, &packed, &scales));
    MOECAL_TRY(moecal_st_writer_write(w, pl->t[k].name, packed, N * K / 2));
    MOECAL_TRY(moecal_st_writer_write(w, pl->t[k + 1].name, scales, N * K / MOECAL_NVFP4_BLOCK));
    MOECAL_TRY(moecal_st_writer_write(w, pl->t[k + 2].name, &s2, sizeof s2));
    MOECAL_TRY(moecal_st_writer_write(w, pl->t[k + 3].name, &is, sizeof is));
    wk->bytes_in += (uint64_t)(o->src->end - o->src->begin);
    wk->bytes_out += N * K / 2 + N * K / MOECAL_NVFP4_BLOCK + 2 * sizeof(float);
    return MOECAL_OK;
}

static moecal_status run_item(worker *wk, const work_item *it)
{
    pool *pl = wk->pl;
    const plan *p = &pl->plans[it->shard];
    moecal_st_writer *w = pl->w[it->shard];

    switch (p->t[it->k].kind) {
    case OUT_COPY:
        return write_copy(wk, w, &p->t[it->k], it->off);
    case OUT_BF16:
        return write_bf16(pl->j, wk, w, &p->t[it->k]);
    case OUT_W:
        return write_nvfp4(pl->j, wk, w, p, it->k);
    default:
        return MOECAL_OK; /* written with their OUT_W */
    }
}

/* A worker takes the next item until none is left or one has failed. */
static void *worker_main(void *arg)
{
    worker *wk = arg;
    pool *pl = wk->pl;

#ifdef _OPENMP
    omp_set_num_threads(1); /* the workers are the parallelism */
#endif
    for (;;) {
        pthread_mutex_lock(&pl->mu);
        size_t i = pl->st == MOECAL_OK && pl->next < pl->nitems ? pl->next++ : SIZE_MAX;
        pthread_mutex_unlock(&pl->mu);
        if (i == SIZE_MAX)
            break;
        moecal_status st = run_item(wk, &pl->items[i]);
        if (st != MOECAL_OK) {
            pthread_mutex_lock(&pl->mu);
            if (pl->st == MOECAL_OK) {
                pl->st = st;
                snprintf(pl->msg, sizeof pl->msg, "%s", moecal_error_message());
            }
            pthread_mutex_unlock(&pl->mu);
            break;
        }
    }
    pthread_mutex_lock(&pl->mu);
    pl->bytes_in += wk->bytes_in;
    pl->bytes_out += wk->bytes_out;
#ifdef HAVE_CUDA
    if (wk->gpu)
        pl->gpu_bytes += moecal_nvfp4_gpu_device_bytes(wk->gpu);
    moecal_nvfp4_gpu_destroy(wk->gpu);
#endif
    pthread_mutex_unlock(&pl->mu);
    free(wk->copy);
    free(wk->wb);
    free(wk->packed);
    free(wk->scales);
    return NULL;
}

static moecal_status add_item(pool *pl, size_t *cap, size_t shard, size_t k, uint64_t off)
{
    if (pl->nitems == *cap) {
        size_t nc = *cap ? 2 * *cap : 256;
        work_item *it = realloc(pl->items, nc * sizeof *it);
        if (!it)
            return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory for the work list");
        pl->items = it;
        *cap = nc;
    }
    pl->items[pl->nitems++] = (work_item){shard, k, off};
    return MOECAL_OK;
}

/* Open the writer of shard i (header written, file at its final size). */
static moecal_status open_shard(job *j, size_t i, const plan *pl, moecal_st_writer **out)
{
    moecal_st_writer *w = NULL;
    char path[8400];
    moecal_status st;

    MOECAL_TRY(moecal_path_join(path, sizeof path, j->tmp,
                                moecal_model_shard_name(j->model, i)));
    MOECAL_TRY(moecal_st_writer_create(path, &w));
    st = MOECAL_OK;
    for (size_t k = 0; k < pl->n && st == MOECAL_OK; k++)
        st = moecal_st_writer_add(w, pl->t[k].name, pl->t[k].dtype, pl->t[k].ndim,
                                  pl->t[k].shape);
    if (st == MOECAL_OK)
        st = moecal_st_writer_write_header(w);
    if (st != MOECAL_OK) {
        moecal_st_writer_abort(w);
        return st;
    }
    *out = w;
    return MOECAL_OK;
}

/* Write the rank's shards (i mod size == rank) with `threads` workers, each
 * taking the next tensor (or 16 MiB piece of a copied one): reads, the
 * quantization and writes of different tensors overlap, and memory holds
 * only what the workers have in hand. */
static moecal_status write_shards(job *j, const plan *plans, size_t nsh, int device,
                                  pool *pl)
{
    size_t cap = 0;
    moecal_status st = MOECAL_OK;
    pthread_t *tid = NULL;
    worker *wk = NULL;
    int nw = 0;

    memset(pl, 0, sizeof *pl);
    pl->j = j;
    pl->plans = plans;
    pl->device = device;
    pthread_mutex_init(&pl->mu, NULL);
    if (!(pl->w = calloc(nsh ? nsh : 1, sizeof *pl->w)))
        st = moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
    for (size_t i = (size_t)j->c->rank; i < nsh && st == MOECAL_OK; i += (size_t)j->c->size) {
        st = open_shard(j, i, &plans[i], &pl->w[i]);
        for (size_t k = 0; k < plans[i].n && st == MOECAL_OK; k++) {
            const out_tensor *o = &plans[i].t[k];
            if (o->kind == OUT_COPY) {
                uint64_t total = o->src->end - o->src->begin;
                for (uint64_t off = 0; off < total && st == MOECAL_OK; off += COPY_PIECE)
                    st = add_item(pl, &cap, i, k, off);
            } else if (o->kind == OUT_BF16 || o->kind == OUT_W) {
                st = add_item(pl, &cap, i, k, 0);
                if (o->kind == OUT_W) {
                    size_t n = (size_t)o->src->shape[0] * (size_t)o->src->shape[1];
                    size_t B = (size_t)j->cfg->weight_block[0];
                    size_t ns = ((size_t)o->src->shape[0] + B - 1) / B *
                                (((size_t)o->src->shape[1] + B - 1) / B);
                    pl->max_elems = n > pl->max_elems ? n : pl->max_elems;
                    pl->max_scales = ns > pl->max_scales ? ns : pl->max_scales;
                }
            }
        }
    }
    if (st == MOECAL_OK && pl->nitems) {
        nw = j->threads < 1 ? 1 : j->threads;
        if ((size_t)nw > pl->nitems)
            nw = (int)pl->nitems;
        tid = calloc((size_t)nw, sizeof *tid);
        wk = calloc((size_t)nw, sizeof *wk);
        if (!tid || !wk)
            st = moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
    }
    int started = 0;
    for (; st == MOECAL_OK && started < nw; started++) {
        wk[started].pl = pl;
        int e = pthread_create(&tid[started], NULL, worker_main, &wk[started]);
        if (e != 0) {
            pthread_mutex_lock(&pl->mu);
            pl->st = moecal_error_errno(e, "export: cannot start a worker thread");
            snprintf(pl->msg, sizeof pl->msg, "%s", moecal_error_message());
            pthread_mutex_unlock(&pl->mu);
            break;
        }
    }
    for (int t = 0; t < started; t++)
        pthread_join(tid[t], NULL);
    if (st == MOECAL_OK && pl->st != MOECAL_OK)
        st = moecal_error_set(pl->st, "%s", pl->msg);
    for (size_t i = 0; i < nsh && pl->w; i++) {
        if (!pl->w[i])
            continue;
        if (st == MOECAL_OK)
            st = moecal_st_writer_finish(pl->w[i]);
        else
            moecal_st_writer_abort(pl->w[i]);
    }
    free(pl->w);
    free(pl->items);
    free(tid);
    free(wk);
    pthread_mutex_destroy(&pl->mu);
    return st;
}

/* ------------------------------------------------------------------ side files */

static int cmp_str(const void *a, const void *b)
{
    return strcmp(*(char *const *)a, *(char *const *)b);
}

/* Write text to dir/name (rank 0). */
static moecal_status write_text(const char *dir, const char *name, const char *text)
{
    char path[8400];
    FILE *fp;

    MOECAL_TRY(moecal_path_join(path, sizeof path, dir, name));
    fp = fopen(path, "w");
    if (!fp)
        return moecal_error_errno(errno, "%s: cannot create", path);
    size_t n = strlen(text);
    bool ok = fwrite(text, 1, n, fp) == n && fflush(fp) == 0 && fsync(fileno(fp)) == 0;
    int e = errno;
    if (fclose(fp) != 0 && ok) {
        ok = false;
        e = errno;
    }
    if (!ok)
        return moecal_error_errno(e, "%s: cannot write", path);
    return MOECAL_OK;
}

static moecal_status write_json(const char *dir, const char *name, json_t *root, size_t flags)
{
    char *text = json_dumps(root, flags);
    if (!text)
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s/%s: no memory", dir, name);
    size_t n = strlen(text);
    char *t2 = realloc(text, n + 2);
    if (!t2) {
        free(text);
        return moecal_error_set(MOECAL_ERR_NOMEM, "%s/%s: no memory", dir, name);
    }
    memcpy(t2 + n, "\n", 2);
    moecal_status st = write_text(dir, name, t2);
    free(t2);
    return st;
}

/* The module names of every linear left unquantized (the exclusion list):
 * 2-D weights other than embeddings that are not NVFP4; layers past
 * num_hidden_layers (DeepSeek's MTP layer) as "model.layers.N*".  Every
 * name is complete: loaders match entries as substrings too. */
static moecal_status exclusions(job *j, const plan *plans, size_t nplans, json_t *list)
{
    char **names = NULL;
    size_t n = 0, cap = 0;
    moecal_status st = MOECAL_OK;

    for (size_t s = 0; s < nplans; s++)
        for (size_t k = 0; k < plans[s].n; k++) {
            const out_tensor *o = &plans[s].t[k];
            char mod[1100];
            int layer, used = 0;
            if (o->kind != OUT_COPY && o->kind != OUT_BF16)
                continue;
            if (o->ndim != 2 || !ends_with(o->name, ".weight") || ends_with(o->name,
                                                                           "embed_tokens.weight"))
                continue;
            if (sscanf(o->name, "model.layers.%d.%n", &layer, &used) == 1 && used > 0 &&
                layer >= j->cfg->num_hidden_layers)
                snprintf(mod, sizeof mod, "model.layers.%d*", layer);
            else
                snprintf(mod, sizeof mod, "%.*s", (int)(strlen(o->name) - 7), o->name);
            if (n == cap) {
                cap = cap ? 2 * cap : 256;
                char **nn = realloc(names, cap * sizeof *nn);
                if (!nn) {
                    st = moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
                    goto out;
                }
                names = nn;
            }
            if (!(names[n] = strdup(mod))) {
                st = moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
                goto out;
            }
            n++;
        }
    qsort(names, n, sizeof *names, cmp_str);
    for (size_t i = 0; i < n; i++)
        if (i == 0 || strcmp(names[i], names[i - 1]) != 0)
            json_array_append_new(list, json_string(names[i]));
out:
    for (size_t i = 0; i < n; i++)
        free(names[i]);
    free(names);
    return st;
}

static moecal_status copy_file(const char *src, const char *dst)
{
    char buf[1 << 16];
    int in = open(src, O_RDONLY | O_CLOEXEC | O_NONBLOCK), out = -1;
    struct stat st;
    moecal_status s = MOECAL_OK;

    if (in < 0)
        return moecal_error_errno(errno, "%s: cannot open", src);
    if (fstat(in, &st) != 0 || !S_ISREG(st.st_mode)) {
        close(in);
        return MOECAL_OK; /* only regular files are copied */
    }
    out = open(dst, O_WRONLY | O_CREAT | O_TRUNC | O_CLOEXEC, 0666);
    if (out < 0) {
        s = moecal_error_errno(errno, "%s: cannot create", dst);
        close(in);
        return s;
    }
    for (;;) {
        ssize_t n = read(in, buf, sizeof buf);
        if (n < 0 && errno == EINTR)
            continue;
        if (n < 0) {
            s = moecal_error_errno(errno, "%s: read failed", src);
            break;
        }
        if (n == 0)
            break;
        for (ssize_t done = 0; done < n;) {
            ssize_t m = write(out, buf + done, (size_t)(n - done));
            if (m < 0 && errno == EINTR)
                continue;
            if (m <= 0) {
                s = moecal_error_errno(m < 0 ? errno : ENOSPC, "%s: write failed", dst);
                break;
            }
            done += m;
        }
        if (s != MOECAL_OK)
            break;
    }
    if (s == MOECAL_OK && fsync(out) != 0)
        s = moecal_error_errno(errno, "%s: cannot sync", dst);
    if (close(out) != 0 && s == MOECAL_OK)
        s = moecal_error_errno(errno, "%s: cannot close", dst);
    close(in);
    return s;
}

/* Rank 0: config.json, hf_quant_config.json, the index, the other files. */
static moecal_status side_files(job *j, const plan *plans, size_t nplans)
{
    const char *src = moecal_model_dir(j->model);
    char path[8400];
    json_error_t jerr;
    json_t *cfg, *root, *q, *ex, *idx, *map;
    moecal_status st;
    DIR *d;
    struct dirent *de;

    /* config.json without the source's quantization_config: vLLM reads
     * hf_quant_config.json only when config.json has none */
    snprintf(path, sizeof path, "%s/config.json", src);
    cfg = json_load_file(path, JSON_REJECT_DUPLICATES, &jerr);
    if (!cfg)
        return moecal_error_set(MOECAL_ERR_FORMAT, "%s: %s", path, jerr.text);
    json_object_del(cfg, "quantization_config");
    st = write_json(j->tmp, "config.json", cfg, JSON_INDENT(2) | JSON_SORT_KEYS);
    json_decref(cfg);
    if (st != MOECAL_OK)
        return st;

    root = json_object();
    q = json_object();
    ex = json_array();
    json_t *prod = json_pack("{s:s, s:s}", "name", "modelopt", "version",
                             "moecal " PACKAGE_VERSION);
    if (!root || !q || !ex || !prod)
        return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
    json_object_set_new(root, "producer", prod);
    json_object_set_new(q, "quant_algo", json_string("NVFP4"));
    json_object_set_new(q, "kv_cache_quant_algo", json_null());
    json_object_set_new(q, "group_size", json_integer(MOECAL_NVFP4_BLOCK));
    if ((st = exclusions(j, plans, nplans, ex)) != MOECAL_OK) {
        json_decref(root);
        json_decref(q);
        json_decref(ex);
        return st;
    }
    json_object_set_new(q, "exclude_modules", ex);
    json_object_set_new(root, "quantization", q);
    st = write_json(j->tmp, "hf_quant_config.json", root, JSON_INDENT(4) | JSON_PRESERVE_ORDER);
    json_decref(root);
    if (st != MOECAL_OK)
        return st;

    if (moecal_model_has_index(j->model)) {
        uint64_t total = 0;
        idx = json_object();
        map = json_object();
        for (size_t s = 0; s < nplans; s++)
            for (size_t k = 0; k < plans[s].n; k++) {
                total += out_bytes(&plans[s].t[k]);
                json_object_set_new(map, plans[s].t[k].name,
                                    json_string(moecal_model_shard_name(j->model, s)));
            }
        json_object_set_new(idx, "metadata", json_pack("{s:I}", "total_size", (json_int_t)total));
        json_object_set_new(idx, "weight_map", map);
        st = write_json(j->tmp, INDEX_NAME, idx, JSON_INDENT(2) | JSON_SORT_KEYS);
        json_decref(idx);
        if (st != MOECAL_OK)
            return st;
    }

    /* the other files (tokenizer, generation config, remote code): regular
     * files at the top of the source, never a FIFO or device */
    if (!(d = opendir(src)))
        return moecal_error_errno(errno, "%s: cannot list", src);
    while ((de = readdir(d)) != NULL) {
        const char *n = de->d_name;
        struct stat sb;
        char dst[8400];
        if (n[0] == '.' || ends_with(n, ".safetensors") || strcmp(n, INDEX_NAME) == 0 ||
            strcmp(n, "config.json") == 0 || strcmp(n, "hf_quant_config.json") == 0 ||
            ends_with(n, ".h5") || ends_with(n, ".hdf5") || ends_with(n, TMP_SUFFIX))
            continue; /* activation and amax files are moecal's, not the model's */
        if ((st = moecal_path_join(path, sizeof path, src, n)) != MOECAL_OK)
            break;
        if (stat(path, &sb) != 0 || !S_ISREG(sb.st_mode))
            continue;
        if ((st = moecal_path_join(dst, sizeof dst, j->tmp, n)) != MOECAL_OK ||
            (st = copy_file(path, dst)) != MOECAL_OK)
            break;
    }
    closedir(d);
    return st;
}

/* ------------------------------------------------------------------ checks */

static moecal_status check_amax(job *j)
{
    const moecal_amax_data *a = j->amax;
    const moecal_model_config *c = j->cfg;
    const char *ap = j->p->amax_path, *mp = j->p->model_dir;

    if (strcmp(a->model_type, c->model_type) != 0)
        return moecal_error_set(MOECAL_ERR_MISMATCH, "%s is for model_type '%s' but %s is '%s'",
                                ap, a->model_type, mp, c->model_type);
    if (a->hidden_size != c->hidden_size || a->n_routed_experts != c->n_routed_experts ||
        (a->num_experts_per_tok >= 0 && a->num_experts_per_tok != c->num_experts_per_tok))
        return moecal_error_set(MOECAL_ERR_MISMATCH,
                                "%s is for hidden_size %lld, %lld experts, top-%lld but %s has "
                                "%d, %d, top-%d", ap, (long long)a->hidden_size,
                                (long long)a->n_routed_experts, (long long)a->num_experts_per_tok,
                                mp, c->hidden_size, c->n_routed_experts, c->num_experts_per_tok);
    if (a->L != c->n_moe_layers || memcmp(a->layers, c->moe_layers, (size_t)a->L * sizeof(int))) {
        char la[128], lc[128];
        moecal_amax_layers_str(a->layers, a->L, la, sizeof la);
        moecal_amax_layers_str(c->moe_layers, c->n_moe_layers, lc, sizeof lc);
        return moecal_error_set(MOECAL_ERR_MISMATCH,
                                "%s covers MoE layers %s but %s has MoE layers %s: export "
                                "needs every MoE layer calibrated (calibrate without --layers)",
                                ap, la, mp, lc);
    }
    if (a->checkpoint_fingerprint[0]) {
        char fp[17];
        MOECAL_TRY(moecal_checkpoint_fingerprint(j->model, fp));
        if (strcmp(fp, a->checkpoint_fingerprint) != 0)
            return moecal_error_set(MOECAL_ERR_MISMATCH,
                                    "%s was calibrated on a checkpoint with fingerprint %s, but "
                                    "%s has %s (config.json or the tensors' names, dtypes or "
                                    "shapes differ)", ap, a->checkpoint_fingerprint, mp, fp);
    }
    return MOECAL_OK;
}

static moecal_status build_experts(job *j)
{
    const int L = j->amax->L, E = j->cfg->n_routed_experts;
    char name[1024];

    j->nex = (size_t)L * (size_t)E * MOECAL_NPROJ;
    j->ex = calloc(j->nex ? j->nex : 1, sizeof *j->ex);
    if (!j->ex)
        return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
    size_t n = 0;
    for (int li = 0; li < L; li++)
        for (int e = 0; e < E; e++)
            for (int p = 0; p < MOECAL_NPROJ; p++) {
                moecal_model_expert_name(j->model, j->amax->layers[li], e, p, name, sizeof name);
                if (!(j->ex[n].name = strdup(name)))
                    return moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
                j->ex[n].li = li;
                j->ex[n].layer = j->amax->layers[li];
                j->ex[n].e = e;
                j->ex[n].p = p;
                n++;
            }
    qsort(j->ex, j->nex, sizeof *j->ex, expert_cmp);
    return MOECAL_OK;
}

/* rm -r: a failed export's temporary directory, or the output --force
 * replaces.  Symbolic links are removed, never followed. */
static int remove_one(const char *path, const struct stat *sb, int flag, struct FTW *ftw)
{
    (void)sb;
    (void)ftw;
    if (flag == FTW_DP)
        rmdir(path);
    else
        unlink(path);
    return 0;
}

static void remove_tree(const char *path)
{
    nftw(path, remove_one, 16, FTW_DEPTH | FTW_PHYS);
}

/* Is out the input, or a directory above it?  (--force replaces out.) */
static bool holds_input(const char *out, const char *input)
{
    char ro[PATH_MAX], ri[PATH_MAX];
    size_t n;

    if (!realpath(out, ro) || !realpath(input, ri))
        return false;
    n = strlen(ro);
    return strncmp(ro, ri, n) == 0 && (ri[n] == '\0' || ri[n] == '/' || (n == 1 && ro[0] == '/'));
}

static bool exists(const char *path)
{
    struct stat st;
    return lstat(path, &st) == 0;
}

/* ------------------------------------------------------------------ the job */

/* The GPU quantizes when there is one (--backend auto) or when asked; ranks
 * of a node take its GPUs in turn.  -1: the CPU.  Collective. */
static int pick_device(const moecal_comm *c, const moecal_export_params *p)
{
    int device = -1;
    moecal_status s = MOECAL_OK;
    const char *no_gpu = "this moecal was built without CUDA (" MOECAL_BUILD_OPTIONS ")";
#ifdef HAVE_CUDA
    if (strcmp(p->backend ? p->backend : "auto", "cpu") != 0) {
        int ng = moecal_nvfp4_gpu_count();
        device = ng > 0 ? c->node_rank % ng : -1;
        no_gpu = "no GPU is visible to this rank";
    }
#endif
    if (device < 0 && p->backend && strcmp(p->backend, "cuda") == 0)
        s = moecal_error_set(MOECAL_ERR_UNSUPPORTED, "--backend cuda: %s", no_gpu);
    moecal_check_all(s);
    return device;
}

/* Rank 0, when every rank is done (st: their agreed outcome): the
 * temporary directory becomes the output, the old output (--force) moved
 * aside first and put back if the rename fails; on failure nothing is left
 * but the old output. */
static moecal_status publish(const job *j, moecal_status st)
{
    const char *out = j->p->output;
    moecal_status r = MOECAL_OK;
    bool moved = false;  /* the old output is at j->old, moved there now */

    if (st != MOECAL_OK) {
        remove_tree(j->tmp);
        return st;
    }
    if (exists(out)) {
        if (exists(j->old))
            remove_tree(j->old);
        if (rename(out, j->old) != 0)
            r = moecal_error_errno(errno, "%s: cannot move the old output aside to %s", out,
                                   j->old);
        else
            moved = true;
    }
    if (r == MOECAL_OK && rename(j->tmp, out) != 0) {
        r = moecal_error_errno(errno, "%s: cannot rename %s to it", out, j->tmp);
        /* put the old output back where it was */
        if (moved && rename(j->old, out) != 0)
            moecal_warn("the previous %s is kept as %s", out, j->old);
    } else if (r == MOECAL_OK && moved) {
        remove_tree(j->old);
    }
    if (r != MOECAL_OK)
        remove_tree(j->tmp);
    return r;
}

/* Every rank's bytes, rate and peak memory (-v 2) and the totals. */
static void report_stats(const job *j, const double *stats, size_t nsh, double t0)
{
    const moecal_comm *c = j->c;
    const moecal_export_params *p = j->p;
    double sum[NSTAT], mx[NSTAT], *all = NULL;
    if (c->rank == 0 && !(all = malloc((size_t)c->size * NSTAT * sizeof *all)))
        moecal_fatal(moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory"));
    MPI_Reduce(stats, sum, NSTAT, MPI_DOUBLE, MPI_SUM, 0, c->world);
    MPI_Reduce(stats, mx, NSTAT, MPI_DOUBLE, MPI_MAX, 0, c->world);
    MPI_Gather(stats, NSTAT, MPI_DOUBLE, all, NSTAT, MPI_DOUBLE, 0, c->world);
    for (int r = 0; all && r < c->size; r++) {
        const double *a = all + (size_t)r * NSTAT;
        moecal_log(MOECAL_LOG_VERBOSE, "# rank %d: %s: read %.2f GB, wrote %.2f GB in %.2f s "
                   "(%.2f GB/s in+out); peak memory %.0f MiB host, %.0f MiB GPU", r,
                   a[4] > 0 ? "cuda" : "cpu", a[0] / 1e9, a[1] / 1e9, a[5],
                   a[5] > 0 ? (a[0] + a[1]) / 1e9 / a[5] : 0.0, a[2], a[3]);
    }
    free(all);
    double dt = moecal_now() - t0;
    moecal_log(MOECAL_LOG_INFO, "# wrote %s in %.1f s: %zu shard file%s, %d x %d x 3 NVFP4 "
               "expert projections; read %.2f GB, wrote %.2f GB (%.2f GB/s in+out); "
               "quantized on %s; peak memory per rank %.0f MiB host, %.0f MiB GPU",
               p->output, dt, nsh, nsh == 1 ? "" : "s", j->amax->L, j->cfg->n_routed_experts,
               sum[0] / 1e9, sum[1] / 1e9, dt > 0 ? (sum[0] + sum[1]) / 1e9 / dt : 0.0,
               mx[4] > 0 ? (sum[4] == c->size ? "the GPU" : "GPUs and CPUs") : "the CPU",
               mx[2], mx[3]);
}

moecal_status moecal_export_run(const moecal_comm *c, const moecal_export_params *p)
{
    job j;
    moecal_status s = MOECAL_OK;
    size_t nsh;
    plan *plans = NULL;
    double t0 = moecal_now(), stats[NSTAT] = {0};

    memset(&j, 0, sizeof j);
    j.c = c;
    j.p = p;
#ifdef _OPENMP
    j.threads = p->threads > 0 ? p->threads : omp_get_max_threads();
#else
    j.threads = 1;
#endif
    if (!p->output || !*p->output)
        s = moecal_error_set(MOECAL_ERR_USAGE, "command line: -o/--output is empty");
    else if (!p->model_dir || !p->amax_path)
        s = moecal_error_set(MOECAL_ERR_USAGE, "command line: export needs -m/--model DIR and "
                             "--amax FILE (see 'moecal export --help')");
    else if (strlen(p->output) + sizeof OLD_SUFFIX >= sizeof j.tmp)
        s = moecal_error_set(MOECAL_ERR_USAGE, "command line: output path too long");
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    snprintf(j.tmp, sizeof j.tmp, "%s%s", p->output, TMP_SUFFIX);
    snprintf(j.old, sizeof j.old, "%s%s", p->output, OLD_SUFFIX);
    if (c->rank == 0) {
        if (holds_input(p->output, p->model_dir) || holds_input(p->output, p->amax_path))
            s = moecal_error_set(MOECAL_ERR_USAGE, "command line: -o %s is or holds an input of "
                                 "the export (%s, %s); it would be replaced", p->output,
                                 p->model_dir, p->amax_path);
        else if (exists(p->output) && !p->force)
            s = moecal_error_set(MOECAL_ERR_EXISTS, "%s exists; use --force to replace it",
                                 p->output);
    }
    moecal_check_all(s);

    /* Inputs: every rank reads the config, the index and the amax file. */
    s = moecal_model_open(p->model_dir, &j.model);
    if (s == MOECAL_OK) {
        j.cfg = moecal_model_cfg(j.model);
        s = moecal_amax_data_read(p->amax_path, 0, &j.amax);
    }
    if (s == MOECAL_OK && c->rank == 0)
        s = check_amax(&j);
    moecal_check_all(s);
    s = build_experts(&j);
    moecal_check_all(s);
    /* The plan of every shard, from the headers alone, on every rank: what
     * cannot be exported is found before anything is written. */
    nsh = moecal_model_shard_count(j.model);
    plans = calloc(nsh ? nsh : 1, sizeof *plans);
    if (!plans)
        s = moecal_error_set(MOECAL_ERR_NOMEM, "export: out of memory");
    for (size_t i = 0; i < nsh && s == MOECAL_OK; i++)
        s = plan_shard(&j, i, &plans[i]);
    moecal_check_all(s);
    moecal_log(MOECAL_LOG_INFO, "# export %s + %s -> %s: %zu shard file%s on %d rank%s, "
               "%d MoE layers x %d experts to NVFP4", p->model_dir, p->amax_path, p->output, nsh,
               nsh == 1 ? "" : "s", c->size, c->size == 1 ? "" : "s", j.amax->L,
               j.cfg->n_routed_experts);

    int device = pick_device(c, p);

    /* The temporary directory, made fresh by rank 0. */
    if (c->rank == 0) {
        if (exists(j.tmp))
            remove_tree(j.tmp);
        if (mkdir(j.tmp, 0777) != 0)
            s = moecal_error_errno(errno, "%s: cannot create", j.tmp);
    }
    moecal_check_all(s);

    {
        pool pl;
        double ts = moecal_now();
        s = write_shards(&j, plans, nsh, device, &pl);
        double dt = moecal_now() - ts;
        struct rusage ru;
        getrusage(RUSAGE_SELF, &ru);
        stats[5] = dt;
        stats[0] = (double)pl.bytes_in;
        stats[1] = (double)pl.bytes_out;
        stats[2] = ru.ru_maxrss / 1024.0;
        stats[3] = (double)pl.gpu_bytes / 1048576.0;
        stats[4] = device >= 0;
    }
    if (s == MOECAL_OK && c->rank == 0)
        s = side_files(&j, plans, nsh);
    /* Every rank done, or none: rank 0 renames or cleans up. */
    s = moecal_comm_agree(c->world, s);
    if (c->rank == 0)
        s = publish(&j, s);
    moecal_check_all(s);
    report_stats(&j, stats, nsh, t0);
    for (size_t i = 0; i < nsh; i++)
        plan_free(&plans[i]);
    free(plans);
    for (size_t i = 0; i < j.nex; i++)
        free(j.ex[i].name);
    free(j.ex);
    moecal_amax_data_free(j.amax);
    moecal_model_close(j.model);
    return MOECAL_OK;
}
