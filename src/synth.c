/* synth.c - synthetic DeepSeek-V3-style checkpoints and activations; see synth.h.
 *
 * The numbers.  Every value is a function of (seed, what, layer, index, row,
 * column) through splitmix64 used as a counter-based generator, so any
 * thread may compute any part in any order.  A "normal" variate is the sum
 * of three 16-bit uniforms (Irwin-Hall, standard deviation 1, range +-3); the
 * remaining 16 bits of the same 64-bit draw give rare larger values.
 *
 *   activations  x[t,h] = s_t * (c_h * z + a_t * mu_h) on ordinary channels,
 *                s_t log-normal per token (sigma 0.4), c_h log-normal per
 *                channel (sigma 0.3), z heavy-tailed (1 % of values x2..x5),
 *                mu_h = +-0.3 a per-layer direction shared by all tokens and
 *                a_t = 1 + 0.25 N its per-token weight; the few outlier
 *                channels (fixed per model) carry s_t * M_o * (0.6..1) with
 *                M_o between 50 and 200 and a fixed sign.
 *   router       gate row e = g_e / sqrt(sum c_h^2) + p_e mu / |mu|^2, so that
 *                x . w_e ~ s_t (N(0,1) + p_e): p_e = 1 - 3 ln(1 + r_e) / ln E
 *                for the expert's popularity rank r_e (a Zipf-like skew: hot
 *                experts, cold experts).  On outlier channels the gate is
 *                divided by M_o, so outliers do not decide the routing.
 *                e_score_correction_bias: 0.02 N clipped to +-0.1, and -4 for
 *                the never-routed experts, spread over the groups; since
 *                sigmoid scores lie in (0, 1), such an expert only wins when
 *                its kept groups hold fewer than k other experts, which
 *                moecal_synth_check excludes.
 *   experts      w = 0.02 * expert scale (log-normal, sigma 0.1) * row scale
 *                (log-normal, sigma 0.25) * z, with one value in 4096 made
 *                4..11 times larger; FP8 e4m3 with 128x128 block scales
 *                (moecal_fp8_quant_block) or BF16.
 *
 * The writing.  The tensors are planned (names, shapes, shards) first; the
 * main thread then generates one expert tensor at a time with all OpenMP
 * threads (128-row bands, the FP8 block height) into one of two buffers
 * while a writer thread writes the other buffer, finishes completed shards
 * (fsync, rename) and writes the activation rows.  Only the writer thread
 * touches the safetensors writers and HDF5 between create and close.
 */
/* sync_file_range */
#ifndef _GNU_SOURCE
#define _GNU_SOURCE
#endif
#include "config.h"

#include <dirent.h>
#include <errno.h>
#include <fcntl.h>
#include <inttypes.h>
#include <math.h>
#include <pthread.h>
#include <stdarg.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/stat.h>
#include <time.h>
#include <unistd.h>

#include <jansson.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "fp8.h"
#include "nvfp4_math.h" /* moecal_nv_f2u, moecal_nv_u2f */
#include "safetensors.h"
#include "synth.h"
#include "util.h"

#define FP8_BLOCK 128
#define GOLDEN 0x9e3779b97f4a7c15ULL
#define ACT_BLOCK_BYTES (32u << 20)  /* float rows generated per activation write */
#define NAME_LEN 128
#define BATCH_BYTES (16u << 20)      /* expert weight bytes generated per batch */

typedef unsigned long long ull;

/* ------------------------------------------------------------------ numbers */

static inline uint64_t mix64(uint64_t z)
{
    z = (z ^ (z >> 30)) * 0xbf58476d1ce4e5b9ULL;
    z = (z ^ (z >> 27)) * 0x94d049bb133111ebULL;
    return z ^ (z >> 31);
}

/* The i-th output of the splitmix64 stream that starts at key. */
static inline uint64_t draw(uint64_t key, uint64_t i)
{
    return mix64(key + (i + 1) * GOLDEN);
}

/* What a stream is for (part of every key). */
enum {
    K_WEIGHT = 1, K_ROWSCALE, K_EXPSCALE, K_GATE, K_BIAS, K_POP, K_NEVER, K_TOKEN, K_ACT,
    K_CHANNEL, K_DIR, K_OUTLIER
};

static uint64_t key_of(uint64_t seed, uint64_t what, uint64_t a, uint64_t b, uint64_t c)
{
    uint64_t k = mix64(seed + GOLDEN);
    k = mix64(k ^ (what * 0xd1b54a32d192ed03ULL));
    k = mix64(k ^ (a + 0x8cb92ba72f3d8dd7ULL));
    k = mix64(k ^ (b + 0xaef17502108ef2d9ULL));
    return mix64(k ^ (c + 0x9fb21c651e98df25ULL));
}

/* Uniform in (0, 1) from 53 bits. */
static inline double unit(uint64_t z)
{
    return ((double)(z >> 11) + 0.5) * (1.0 / 9007199254740992.0);
}

/* Irwin-Hall(3) from the low 48 bits: mean 0, standard deviation 1. */
static inline float ih3(uint64_t z)
{
    uint32_t s = (uint32_t)(z & 0xffff) + (uint32_t)((z >> 16) & 0xffff) +
                 (uint32_t)((z >> 32) & 0xffff);
    return ((float)s - 98302.5f) * (1.0f / 32768.0f);
}

/* A proper normal variate (Box-Muller) for the few per-row and per-expert
 * values, from two draws of the stream key at index 2i, 2i + 1. */
static double gauss(uint64_t key, uint64_t i)
{
    double u = unit(draw(key, 2 * i)), v = unit(draw(key, 2 * i + 1));
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

/* ------------------------------------------------------------------ parameters */

moecal_status moecal_synth_preset_params(const char *preset, moecal_synth_params *p)
{
    if (!preset || !p)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_synth_preset_params: null argument");
    memset(p, 0, sizeof *p);
    p->seed = 1;
    p->dtype = MOECAL_DT_F8_E4M3;
    p->act_dtype = MOECAL_DT_BF16;
    p->shard_size = 4ULL << 30;
    p->outliers = 4;
    p->progress = MOECAL_SYNTH_AUTO;
    if (strcmp(preset, "demo") == 0) {
        p->layers = 4; p->first_dense = 1;
        p->experts = 32; p->topk = 4; p->groups = 4; p->topk_groups = 2;
        p->hidden = 512; p->intermediate = 256; p->tokens = 4096;
        p->never_routed = 2;
        p->shard_size = 16ULL << 20; /* several shards, as real checkpoints have */
    } else if (strcmp(preset, "tiny") == 0) {
        p->layers = 2; p->first_dense = 1;
        p->experts = 8; p->topk = 2; p->groups = 2; p->topk_groups = 1;
        p->hidden = 160; p->intermediate = 96; p->tokens = 256;
        p->never_routed = 1;
    } else if (strcmp(preset, "deepseek-v3-layer") == 0) {
        p->layers = 4; p->first_dense = 3;
        p->experts = 256; p->topk = 8; p->groups = 8; p->topk_groups = 4;
        p->hidden = 7168; p->intermediate = 2048; p->tokens = 32768;
        p->never_routed = 8;
    } else {
        return moecal_error_set(MOECAL_ERR_USAGE, "--preset: unknown preset '%s' (presets: "
                                "demo, tiny, deepseek-v3-layer)", preset);
    }
    snprintf(p->preset, sizeof p->preset, "%s", preset);
    return MOECAL_OK;
}

static int cmp_int_desc(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x < y) - (x > y);
}

/* Never-routed experts of each group when nr of them are spread over g groups. */
static int never_in_group(int nr, int g, int G)
{
    return nr / G + (g < nr % G);
}

/* The fewest routable experts any choice of topk_groups groups keeps. */
static int worst_routable(const moecal_synth_params *p)
{
    int G = p->groups, per = p->experts / p->groups, worst = 0;
    int *cnt = malloc((size_t)G * sizeof *cnt);

    if (!cnt)
        return -1;
    for (int g = 0; g < G; g++)
        cnt[g] = never_in_group(p->never_routed, g, G);
    qsort(cnt, (size_t)G, sizeof *cnt, cmp_int_desc);
    for (int g = 0; g < p->topk_groups; g++)
        worst += per - cnt[g];
    free(cnt);
    return worst;
}

moecal_status moecal_synth_check(const moecal_synth_params *p)
{
    int worst;
    uint64_t numel;

    if (!p)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_synth_check: null argument");
    if (p->layers < 1 || p->layers > 100000)
        return moecal_error_set(MOECAL_ERR_USAGE, "--layers %d: expected 1 to 100000",
                                p->layers);
    if (p->first_dense < 0 || p->first_dense >= p->layers)
        return moecal_error_set(MOECAL_ERR_USAGE, "--first-dense %d: expected 0 to --layers - 1 "
                                "(%d), so that at least one layer is a MoE layer",
                                p->first_dense, p->layers - 1);
    if (p->experts < 1 || p->experts > 65536)
        return moecal_error_set(MOECAL_ERR_USAGE, "--experts %d: expected 1 to 65536",
                                p->experts);
    if (p->groups < 1 || p->experts % p->groups != 0)
        return moecal_error_set(MOECAL_ERR_USAGE, "--groups %d: expected a divisor of "
                                "--experts %d", p->groups, p->experts);
    if (p->topk_groups < 1 || p->topk_groups > p->groups)
        return moecal_error_set(MOECAL_ERR_USAGE, "--topk-groups %d: expected 1 to --groups %d",
                                p->topk_groups, p->groups);
    if (p->groups > 1 && p->experts / p->groups < 2)
        return moecal_error_set(MOECAL_ERR_USAGE, "--groups %d: groups of %d expert(s); "
                                "DeepSeek-V3 scores a group by its two best experts, so groups "
                                "need at least 2", p->groups, p->experts / p->groups);
    if (p->topk < 1 || p->topk > p->experts)
        return moecal_error_set(MOECAL_ERR_USAGE, "--topk %d: expected 1 to --experts %d",
                                p->topk, p->experts);
    if (p->topk > p->topk_groups * (p->experts / p->groups))
        return moecal_error_set(MOECAL_ERR_USAGE, "--topk %d: the %d kept group(s) of %d "
                                "experts hold only %d experts", p->topk, p->topk_groups,
                                p->experts / p->groups, p->topk_groups * (p->experts / p->groups));
    if (p->never_routed < 0 || p->never_routed >= p->experts)
        return moecal_error_set(MOECAL_ERR_USAGE, "--never-routed %d: expected 0 to --experts - 1 "
                                "(%d)", p->never_routed, p->experts - 1);
    worst = worst_routable(p);
    if (worst < 0)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    if (worst < p->topk)
        return moecal_error_set(MOECAL_ERR_USAGE, "--never-routed %d: with %d per group spread "
                                "over %d groups, %d kept group(s) may hold only %d routable "
                                "experts, fewer than --topk %d, so a never-routed expert could "
                                "be chosen", p->never_routed,
                                never_in_group(p->never_routed, 0, p->groups), p->groups,
                                p->topk_groups, worst, p->topk);
    if (p->hidden < 1 || p->hidden > (1 << 20))
        return moecal_error_set(MOECAL_ERR_USAGE, "--hidden %d: expected 1 to %d", p->hidden,
                                1 << 20);
    if (p->intermediate < 1 || p->intermediate > (1 << 20))
        return moecal_error_set(MOECAL_ERR_USAGE, "--intermediate %d: expected 1 to %d",
                                p->intermediate, 1 << 20);
    if (p->tokens < 1 || p->tokens > (1LL << 40))
        return moecal_error_set(MOECAL_ERR_USAGE, "--tokens %lld: expected 1 to 2^40",
                                (long long)p->tokens);
    if (__builtin_mul_overflow((uint64_t)p->tokens, (uint64_t)p->hidden, &numel) ||
        numel > (1ULL << 44))
        return moecal_error_set(MOECAL_ERR_USAGE, "--tokens %lld x --hidden %d: too many "
                                "activation values", (long long)p->tokens, p->hidden);
    if (p->outliers < 0 || p->outliers > p->hidden / 2 || p->outliers > 64)
        return moecal_error_set(MOECAL_ERR_USAGE, "--outliers %d: expected 0 to %d", p->outliers,
                                p->hidden / 2 < 64 ? p->hidden / 2 : 64);
    if (p->dtype != MOECAL_DT_F8_E4M3 && p->dtype != MOECAL_DT_BF16)
        return moecal_error_set(MOECAL_ERR_USAGE, "--dtype: expert weights are fp8 or bf16");
    if (p->act_dtype != MOECAL_DT_BF16 && p->act_dtype != MOECAL_DT_F16 &&
        p->act_dtype != MOECAL_DT_F32)
        return moecal_error_set(MOECAL_ERR_USAGE, "--act-dtype: bf16, f16 or f32");
    if (p->shard_size < 1)
        return moecal_error_set(MOECAL_ERR_USAGE, "--shard-size: expected at least 1 byte");
    if (p->progress < MOECAL_SYNTH_QUIET || p->progress > MOECAL_SYNTH_AUTO)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "synth: progress mode %d", p->progress);
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ model-wide values */

typedef struct model_vals {
    int H, n_out;
    int *out_ch;        /* outlier channels, ascending */
    float *out_mag;     /* M_o */
    float *out_sign;
    float *chan;        /* c_h (1 on outlier channels) */
    uint8_t *is_out;    /* [H] */
    double chan_sq;     /* sum of c_h^2 over ordinary channels */
} model_vals;

static void model_vals_free(model_vals *m)
{
    free(m->out_ch);
    free(m->out_mag);
    free(m->out_sign);
    free(m->chan);
    free(m->is_out);
}

static int cmp_int(const void *a, const void *b)
{
    int x = *(const int *)a, y = *(const int *)b;
    return (x > y) - (x < y);
}

static moecal_status model_vals_make(const moecal_synth_params *p, model_vals *m)
{
    int H = p->hidden;
    uint64_t k;

    memset(m, 0, sizeof *m);
    m->H = H;
    m->n_out = p->outliers;
    m->out_ch = calloc((size_t)(m->n_out + 1), sizeof *m->out_ch);
    m->out_mag = calloc((size_t)(m->n_out + 1), sizeof *m->out_mag);
    m->out_sign = calloc((size_t)(m->n_out + 1), sizeof *m->out_sign);
    m->chan = malloc((size_t)H * sizeof *m->chan);
    m->is_out = calloc((size_t)H, 1);
    if (!m->out_ch || !m->out_mag || !m->out_sign || !m->chan || !m->is_out) {
        model_vals_free(m);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    }
    /* Outlier channels: distinct, drawn until n_out are found. */
    k = key_of(p->seed, K_OUTLIER, 0, 0, 0);
    for (uint64_t i = 0, n = 0; n < (uint64_t)m->n_out; i++) {
        int c = (int)(draw(k, i) % (uint64_t)H);
        if (!m->is_out[c]) {
            m->is_out[c] = 1;
            m->out_ch[n++] = c;
        }
    }
    qsort(m->out_ch, (size_t)m->n_out, sizeof *m->out_ch, cmp_int);
    for (int o = 0; o < m->n_out; o++) {
        uint64_t ko = key_of(p->seed, K_OUTLIER, 1, (uint64_t)m->out_ch[o], 0);
        /* log-uniform in [50, 200] */
        m->out_mag[o] = (float)(50.0 * exp(log(4.0) * unit(draw(ko, 0))));
        m->out_sign[o] = (draw(ko, 1) >> 63) ? -1.0f : 1.0f;
    }
    k = key_of(p->seed, K_CHANNEL, 0, 0, 0);
    for (int h = 0; h < H; h++) {
        if (m->is_out[h]) {
            m->chan[h] = 1.0f;
            continue;
        }
        m->chan[h] = (float)exp(0.3 * gauss(k, (uint64_t)h));
        m->chan_sq += (double)m->chan[h] * m->chan[h];
    }
    if (m->chan_sq <= 0.0)
        m->chan_sq = 1.0;
    return MOECAL_OK;
}

/* The per-layer direction mu shared by the tokens (0 on outlier channels). */
static void layer_dir(const moecal_synth_params *p, const model_vals *m, int layer, float *mu,
                      double *mu_sq)
{
    uint64_t k = key_of(p->seed, K_DIR, (uint64_t)layer, 0, 0);

    *mu_sq = 0.0;
    for (int h = 0; h < m->H; h++) {
        mu[h] = m->is_out[h] ? 0.0f : ((draw(k, (uint64_t)h) >> 63) ? -0.3f : 0.3f);
        *mu_sq += (double)mu[h] * mu[h];
    }
    if (*mu_sq <= 0.0)
        *mu_sq = 1.0;
}

/* Never-routed experts of a layer: never_in_group() of them in each group,
 * at positions drawn from the layer's stream; marks never[e] = 1. */
static void layer_never(const moecal_synth_params *p, int layer, uint8_t *never)
{
    int G = p->groups, per = p->experts / p->groups;
    uint64_t k = key_of(p->seed, K_NEVER, (uint64_t)layer, 0, 0), i = 0;

    memset(never, 0, (size_t)p->experts);
    for (int g = 0; g < G; g++) {
        int want = never_in_group(p->never_routed, g, G);
        for (int n = 0; n < want;) {
            int e = g * per + (int)(draw(k, i++) % (uint64_t)per);
            if (!never[e]) {
                never[e] = 1;
                n++;
            }
        }
    }
}

typedef struct pop_rank {
    uint64_t key;
    int e;
} pop_rank;

static int cmp_pop(const void *a, const void *b)
{
    const pop_rank *x = a, *y = b;
    if (x->key != y->key)
        return x->key < y->key ? -1 : 1;
    return (x->e > y->e) - (x->e < y->e);
}

/* Router of a layer: gate [E, H] (float, rounded to bf16 by the caller) and
 * the correction bias [E]. */
static moecal_status gen_router(const moecal_synth_params *p, const model_vals *m, int layer,
                                const uint8_t *never, float *gate, float *bias)
{
    int E = p->experts, H = p->hidden;
    float *mu = malloc((size_t)H * sizeof *mu);
    pop_rank *pr = malloc((size_t)E * sizeof *pr);
    double mu_sq, sg = 1.0 / sqrt(m->chan_sq);
    double lnE = E > 1 ? log((double)E) : 1.0;
    uint64_t kpop = key_of(p->seed, K_POP, (uint64_t)layer, 0, 0);

    if (!mu || !pr) {
        free(mu);
        free(pr);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    }
    layer_dir(p, m, layer, mu, &mu_sq);
    for (int e = 0; e < E; e++) {
        pr[e].key = draw(kpop, (uint64_t)e);
        pr[e].e = e;
    }
    qsort(pr, (size_t)E, sizeof *pr, cmp_pop);
#pragma omp parallel for schedule(static)
    for (int r = 0; r < E; r++) {
        int e = pr[r].e;
        double pe = 1.0 - 3.0 * log1p((double)r) / lnE;
        uint64_t kg = key_of(p->seed, K_GATE, (uint64_t)layer, (uint64_t)e, 0);
        float *row = gate + (size_t)e * (size_t)H;
        int o = 0;
        for (int h = 0; h < H; h++) {
            double g = sg * ih3(draw(kg, (uint64_t)h));
            if (m->is_out[h]) {
                while (m->out_ch[o] != h)
                    o++;
                row[h] = (float)(g / m->out_mag[o]);
            } else {
                row[h] = (float)(g + pe * mu[h] / mu_sq);
            }
        }
    }
    for (int e = 0; e < E; e++) {
        double b = 0.02 * gauss(key_of(p->seed, K_BIAS, (uint64_t)layer, (uint64_t)e, 0), 0);
        b = b > 0.1 ? 0.1 : b < -0.1 ? -0.1 : b;
        bias[e] = never[e] ? -4.0f : (float)b;
    }
    free(mu);
    free(pr);
    return MOECAL_OK;
}

/* Rows [r0, r0 + n) of expert weight (layer, e, proj) of width cols, float. */
static void gen_weight_rows(const moecal_synth_params *p, int layer, int e, int proj,
                            size_t r0, size_t n, size_t cols, float *out)
{
    uint64_t kt = key_of(p->seed, K_WEIGHT, (uint64_t)layer, (uint64_t)e, (uint64_t)proj);
    uint64_t ks = key_of(p->seed, K_ROWSCALE, (uint64_t)layer, (uint64_t)e, (uint64_t)proj);
    double es = exp(0.1 * gauss(key_of(p->seed, K_EXPSCALE, (uint64_t)layer, (uint64_t)e, 0),
                                (uint64_t)proj));

    for (size_t r = r0; r < r0 + n; r++) {
        float scale = (float)(0.02 * es * exp(0.25 * gauss(ks, r)));
        uint64_t kr = mix64(kt ^ (r * 0xa0761d6478bd642fULL));
        float *o = out + (r - r0) * cols;
        for (size_t c = 0; c < cols; c++) {
            uint64_t z = draw(kr, c);
            uint32_t t = (uint32_t)(z >> 48);
            float v = ih3(z) * scale;
            if (t < 16u) /* one in 4096 */
                v *= 4.0f + (float)(t & 7u);
            o[c] = v;
        }
    }
}

/* Per-token values: scale s_t and direction weight a_t. */
static void token_vals(uint64_t seed, int layer, int64_t t, float *s, float *a)
{
    uint64_t k = key_of(seed, K_TOKEN, (uint64_t)layer, (uint64_t)t, 0);
    *s = (float)exp(0.4 * gauss(k, 0));
    *a = (float)(1.0 + 0.25 * gauss(k, 1));
}

/* Activation rows [t0, t0 + n) of a layer, float [n, H]. */
static void gen_act_rows(const moecal_synth_params *p, const model_vals *m, const float *mu,
                         int layer, int64_t t0, int64_t n, float *x)
{
    int H = p->hidden;

#pragma omp parallel for schedule(static)
    for (int64_t i = 0; i < n; i++) {
        int64_t t = t0 + i;
        float s, a;
        uint64_t kr = key_of(p->seed, K_ACT, (uint64_t)layer, (uint64_t)t, 0);
        float *o = x + (size_t)i * (size_t)H;
        token_vals(p->seed, layer, t, &s, &a);
        for (int h = 0; h < H; h++) {
            uint64_t z = draw(kr, (uint64_t)h);
            uint32_t tail = (uint32_t)(z >> 48);
            float v = ih3(z);
            if (tail < 655u) /* one in 100: heavy tails */
                v *= 2.0f + (float)(tail & 3u);
            o[h] = s * (m->chan[h] * v + a * mu[h]);
        }
        for (int q = 0; q < m->n_out; q++) {
            uint64_t z = draw(kr, (uint64_t)H + (uint64_t)q);
            o[m->out_ch[q]] = s * m->out_sign[q] * m->out_mag[q] * (float)(0.6 + 0.4 * unit(z));
        }
    }
}

/* ------------------------------------------------------------------ FP8 */

/* e4m3 of a finite x, as moecal_float_to_e4m3 rounds it (nearest even,
 * saturating at 448), without branches: the normal and subnormal codes are
 * both computed and one is selected. */
static inline uint8_t e4m3_finite(float x)
{
    uint32_t u = moecal_nv_f2u(x), a = u & 0x7fffffffu, sign = (u >> 24) & 0x80u;
    /* normal: round the mantissa to 3 bits, rebias the exponent 127 -> 7 */
    uint32_t qn = ((a + 0x7ffffu + ((a >> 20) & 1u)) >> 20) - (120u << 3);
    /* subnormal: round(|x| * 2^9); adding 1.5 * 2^23 rounds to an integer */
    uint32_t qs = moecal_nv_f2u(moecal_nv_u2f(a) * 512.0f + 12582912.0f) - 0x4b400000u;
    uint32_t q = a >= 0x3c800000u ? qn : qs;
    q = q > 0x7eu ? 0x7eu : q;
    q = a >= 0x43e00000u ? 0x7eu : q;
    return (uint8_t)(sign | q);
}

void moecal_synth_quant_fp8(const float *w, size_t rows, size_t cols, uint8_t *q,
                            float *scale_inv)
{
    size_t nbc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
    uint32_t bmax[512];
    float sc[512];

    for (size_t r0 = 0; r0 < rows; r0 += FP8_BLOCK) {
        size_t r1 = r0 + FP8_BLOCK < rows ? r0 + FP8_BLOCK : rows;
        for (size_t c0 = 0; c0 < nbc; c0 += 512) {
            /* up to 512 column blocks at a time (cols up to 65536 each pass) */
            size_t nb = nbc - c0 < 512 ? nbc - c0 : 512;
            size_t col0 = c0 * FP8_BLOCK;
            size_t col1 = (c0 + nb) * FP8_BLOCK < cols ? (c0 + nb) * FP8_BLOCK : cols;
            memset(bmax, 0, nb * sizeof *bmax);
            /* block max of |w|: for finite floats the order of the magnitude
             * bits is the order of the values */
            for (size_t r = r0; r < r1; r++) {
                const float *row = w + r * cols;
                for (size_t b = 0; b < nb; b++) {
                    size_t c = col0 + b * FP8_BLOCK;
                    size_t ce = c + FP8_BLOCK < col1 ? c + FP8_BLOCK : col1;
                    uint32_t m = bmax[b];
                    for (; c < ce; c++) {
                        uint32_t a = moecal_nv_f2u(row[c]) & 0x7fffffffu;
                        m = a > m ? a : m;
                    }
                    bmax[b] = m;
                }
            }
            for (size_t b = 0; b < nb; b++) {
                float m = moecal_nv_u2f(bmax[b]);
                sc[b] = m > 0.0f ? m / 448.0f : 1.0f;
                scale_inv[(r0 / FP8_BLOCK) * nbc + c0 + b] = sc[b];
            }
            for (size_t r = r0; r < r1; r++) {
                const float *row = w + r * cols;
                uint8_t *qr = q + r * cols;
                for (size_t b = 0; b < nb; b++) {
                    size_t c = col0 + b * FP8_BLOCK;
                    size_t ce = c + FP8_BLOCK < col1 ? c + FP8_BLOCK : col1;
                    float s = sc[b];
                    for (; c < ce; c++)
                        qr[c] = e4m3_finite(row[c] / s);
                }
            }
        }
    }
}

/* ------------------------------------------------------------------ the plan */

enum { T_GATE, T_BIAS, T_WEIGHT, T_SCALE };

typedef struct tplan {
    char name[NAME_LEN];
    int kind, layer, expert, proj;
    moecal_dtype dtype;
    int64_t shape[2];
    int ndim;
    uint64_t bytes;
    int shard;
} tplan;

static const char *const proj_leaf[3] = {"gate_proj", "down_proj", "up_proj"};

static void weight_shape(const moecal_synth_params *p, int proj, int64_t *rows, int64_t *cols)
{
    /* w1/w3 [I, H], w2 [H, I] */
    *rows = proj == 1 ? p->hidden : p->intermediate;
    *cols = proj == 1 ? p->intermediate : p->hidden;
}

static moecal_status make_plan(const moecal_synth_params *p, tplan **out, size_t *n_out,
                               int *nshards, uint64_t *total)
{
    int nmoe = p->layers - p->first_dense;
    int fp8 = p->dtype == MOECAL_DT_F8_E4M3;
    size_t per_layer = 2 + (size_t)p->experts * 3 * (fp8 ? 2 : 1);
    size_t n = 0;
    tplan *t = calloc((size_t)nmoe * per_layer, sizeof *t);
    uint64_t in_shard = 0;
    int shard = 0;

    if (!t)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory planning %zu tensors",
                                (size_t)nmoe * per_layer);
    *total = 0;
    for (int L = p->first_dense; L < p->layers; L++) {
        tplan *g = &t[n++], *b = &t[n++];
        snprintf(g->name, NAME_LEN, "model.layers.%d.mlp.gate.weight", L);
        g->kind = T_GATE; g->layer = L; g->dtype = MOECAL_DT_BF16; g->ndim = 2;
        g->shape[0] = p->experts; g->shape[1] = p->hidden;
        snprintf(b->name, NAME_LEN, "model.layers.%d.mlp.gate.e_score_correction_bias", L);
        b->kind = T_BIAS; b->layer = L; b->dtype = MOECAL_DT_F32; b->ndim = 1;
        b->shape[0] = p->experts;
        for (int e = 0; e < p->experts; e++) {
            for (int q = 0; q < 3; q++) {
                tplan *w = &t[n++];
                int64_t rows, cols;
                weight_shape(p, q, &rows, &cols);
                snprintf(w->name, NAME_LEN, "model.layers.%d.mlp.experts.%d.%s.weight", L, e,
                         proj_leaf[q]);
                w->kind = T_WEIGHT; w->layer = L; w->expert = e; w->proj = q;
                w->dtype = p->dtype; w->ndim = 2; w->shape[0] = rows; w->shape[1] = cols;
                if (fp8) {
                    tplan *s = &t[n++];
                    snprintf(s->name, NAME_LEN, "model.layers.%d.mlp.experts.%d.%s.weight_scale_inv",
                             L, e, proj_leaf[q]);
                    s->kind = T_SCALE; s->layer = L; s->expert = e; s->proj = q;
                    s->dtype = MOECAL_DT_F32; s->ndim = 2;
                    s->shape[0] = (rows + FP8_BLOCK - 1) / FP8_BLOCK;
                    s->shape[1] = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
                }
            }
        }
    }
    for (size_t i = 0; i < n; i++) {
        uint64_t numel = 1;
        for (int d = 0; d < t[i].ndim; d++)
            numel *= (uint64_t)t[i].shape[d];
        t[i].bytes = numel * moecal_dtype_size(t[i].dtype);
        /* A weight and its scales, a gate and its bias stay in one shard, as
         * in real checkpoints. */
        if (t[i].kind != T_SCALE && t[i].kind != T_BIAS && in_shard > 0) {
            uint64_t need = t[i].bytes;
            if (t[i].kind == T_WEIGHT && fp8)
                need += (uint64_t)t[i + 1].shape[0] * (uint64_t)t[i + 1].shape[1] * 4;
            else if (t[i].kind == T_GATE)
                need += (uint64_t)t[i + 1].shape[0] * 4;
            if (in_shard + need > p->shard_size) {
                shard++;
                in_shard = 0;
            }
        }
        t[i].shard = shard;
        in_shard += t[i].bytes;
        *total += t[i].bytes;
    }
    *out = t;
    *n_out = n;
    *nshards = shard + 1;
    return MOECAL_OK;
}

static void shard_name(int i, int n, char *buf, size_t len)
{
    snprintf(buf, len, "model-%05d-of-%05d.safetensors", i + 1, n);
}

/* ------------------------------------------------------------------ files */

static moecal_status mkdir_p(const char *dir)
{
    char *d = strdup(dir);
    size_t len;

    if (!d)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    len = strlen(d);
    while (len > 1 && d[len - 1] == '/')
        d[--len] = '\0';
    for (char *s = d + 1; ; s++) {
        char c = *s;
        if (c != '/' && c != '\0')
            continue;
        *s = '\0';
        if (mkdir(d, 0777) != 0 && errno != EEXIST) {
            moecal_status st = moecal_error_errno(errno, "%s: cannot create directory", d);
            free(d);
            return st;
        }
        *s = c;
        if (c == '\0')
            break;
    }
    free(d);
    return MOECAL_OK;
}

/* model-NNNNN-of-NNNNN.safetensors, optionally with .tmp */
static int is_shard_name(const char *s)
{
    static const char pat[] = "model-#####-of-#####.safetensors";
    size_t i;

    for (i = 0; pat[i]; i++) {
        if (pat[i] == '#' ? (s[i] < '0' || s[i] > '9') : s[i] != pat[i])
            return 0;
    }
    return s[i] == '\0' || strcmp(s + i, ".tmp") == 0;
}

static moecal_status prepare_dir(const char *dir, bool force)
{
    struct stat sb;
    DIR *d;
    struct dirent *de;
    int entries = 0;
    moecal_status st = MOECAL_OK;

    if (stat(dir, &sb) != 0) {
        if (errno != ENOENT)
            return moecal_error_errno(errno, "%s: cannot use as output directory", dir);
        return mkdir_p(dir);
    }
    if (!S_ISDIR(sb.st_mode))
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s exists and is not a directory", dir);
    if (!(d = opendir(dir)))
        return moecal_error_errno(errno, "%s: cannot read directory", dir);
    while ((de = readdir(d)) != NULL) {
        if (strcmp(de->d_name, ".") == 0 || strcmp(de->d_name, "..") == 0)
            continue;
        entries++;
        /* With --force: an earlier model's shards would be left unreferenced,
         * and model.safetensors would take precedence over the new index. */
        if (force && (is_shard_name(de->d_name) || strcmp(de->d_name, "model.safetensors") == 0)) {
            char path[4352];
            snprintf(path, sizeof path, "%s/%s", dir, de->d_name);
            if (unlink(path) != 0 && errno != ENOENT && st == MOECAL_OK)
                st = moecal_error_errno(errno, "%s: cannot remove the earlier model's file",
                                        path);
        }
    }
    closedir(d);
    if (st != MOECAL_OK)
        return st;
    if (entries > 0 && !force)
        return moecal_error_set(MOECAL_ERR_EXISTS, "%s is not empty; use --force to write the "
                                "model into it", dir);
    return MOECAL_OK;
}

/* JSON to path through path.tmp, keys sorted (same parameters, same bytes). */
static moecal_status write_json(const char *path, json_t *j)
{
    char tmp[4352];
    FILE *fp;
    int bad;

    snprintf(tmp, sizeof tmp, "%s.tmp", path);
    if (!(fp = fopen(tmp, "w")))
        return moecal_error_errno(errno, "%s: cannot create", tmp);
    bad = json_dumpf(j, fp, JSON_INDENT(2) | JSON_SORT_KEYS) != 0;
    bad |= fputc('\n', fp) == EOF;
    bad |= fflush(fp) != 0 || fsync(fileno(fp)) != 0;
    if (fclose(fp) != 0 || bad) {
        moecal_status st = moecal_error_errno(errno ? errno : EIO, "%s: cannot write", tmp);
        unlink(tmp);
        return st;
    }
    if (rename(tmp, path) != 0) {
        moecal_status st = moecal_error_errno(errno, "%s: cannot rename %s to it", path, tmp);
        unlink(tmp);
        return st;
    }
    return MOECAL_OK;
}

/* json_object_set_new that remembers a failure. */
static void jset(json_t *o, const char *k, json_t *v, int *ok)
{
    if (!v || json_object_set_new(o, k, v) != 0)
        *ok = 0;
}

static json_t *config_json(const moecal_synth_params *p)
{
    json_t *c = json_object(), *q;
    int ok = c != NULL;
    int heads = p->hidden / 128 > 0 ? p->hidden / 128 : 1;

    if (!ok)
        return NULL;
    jset(c, "architectures", json_pack("[s]", "DeepseekV3ForCausalLM"), &ok);
    jset(c, "attention_bias", json_false(), &ok);
    jset(c, "attention_dropout", json_real(0.0), &ok);
    jset(c, "aux_loss_alpha", json_real(0.001), &ok);
    jset(c, "bos_token_id", json_integer(0), &ok);
    jset(c, "eos_token_id", json_integer(1), &ok);
    jset(c, "ep_size", json_integer(1), &ok);
    jset(c, "first_k_dense_replace", json_integer(p->first_dense), &ok);
    jset(c, "hidden_act", json_string("silu"), &ok);
    jset(c, "hidden_size", json_integer(p->hidden), &ok);
    jset(c, "initializer_range", json_real(0.02), &ok);
    jset(c, "intermediate_size", json_integer(9 * (json_int_t)p->intermediate), &ok);
    jset(c, "kv_lora_rank", json_integer(512), &ok);
    jset(c, "max_position_embeddings", json_integer(163840), &ok);
    jset(c, "model_type", json_string("deepseek_v3"), &ok);
    jset(c, "moe_intermediate_size", json_integer(p->intermediate), &ok);
    jset(c, "moe_layer_freq", json_integer(1), &ok);
    jset(c, "n_group", json_integer(p->groups), &ok);
    jset(c, "n_routed_experts", json_integer(p->experts), &ok);
    jset(c, "n_shared_experts", json_integer(1), &ok);
    jset(c, "norm_topk_prob", json_true(), &ok);
    jset(c, "num_attention_heads", json_integer(heads), &ok);
    jset(c, "num_experts_per_tok", json_integer(p->topk), &ok);
    jset(c, "num_hidden_layers", json_integer(p->layers), &ok);
    jset(c, "num_key_value_heads", json_integer(heads), &ok);
    jset(c, "num_nextn_predict_layers", json_integer(0), &ok);
    jset(c, "q_lora_rank", json_integer(1536), &ok);
    jset(c, "qk_nope_head_dim", json_integer(128), &ok);
    jset(c, "qk_rope_head_dim", json_integer(64), &ok);
    if (p->dtype == MOECAL_DT_F8_E4M3) {
        q = json_pack("{s:s, s:s, s:s, s:[i,i]}", "activation_scheme", "dynamic", "fmt", "e4m3",
                      "quant_method", "fp8", "weight_block_size", FP8_BLOCK, FP8_BLOCK);
        jset(c, "quantization_config", q, &ok);
    }
    jset(c, "rms_norm_eps", json_real(1e-6), &ok);
    jset(c, "rope_theta", json_integer(10000), &ok);
    jset(c, "routed_scaling_factor", json_real(2.5), &ok);
    jset(c, "scoring_func", json_string("sigmoid"), &ok);
    jset(c, "seq_aux", json_true(), &ok);
    jset(c, "tie_word_embeddings", json_false(), &ok);
    jset(c, "topk_group", json_integer(p->topk_groups), &ok);
    jset(c, "topk_method", json_string("noaux_tc"), &ok);
    jset(c, "torch_dtype", json_string("bfloat16"), &ok);
    jset(c, "transformers_version", json_string("4.46.3"), &ok);
    jset(c, "use_cache", json_true(), &ok);
    jset(c, "v_head_dim", json_integer(128), &ok);
    jset(c, "vocab_size", json_integer(129280), &ok);
    if (!ok) {
        json_decref(c);
        return NULL;
    }
    return c;
}

static const char *act_word(moecal_dtype t)
{
    return t == MOECAL_DT_F32 ? "f32" : t == MOECAL_DT_F16 ? "f16" : "bf16";
}

/* ------------------------------------------------------------------ writer thread */

enum { J_NONE, J_TENSORS, J_FINISH, J_ACT };

typedef struct job {
    int kind;
    moecal_st_writer *w;          /* J_TENSORS, J_FINISH */
    int fd;                       /* its file, to start the writeback early (-1: none) */
    size_t n;                     /* J_TENSORS: n tensors */
    const char *const *name;
    const void *const *data;
    const size_t *len;
    moecal_act_writer *aw;        /* J_ACT */
    int layer;
    int64_t row0, nrows;
    const float *rows;
} job;

typedef struct pipe {
    pthread_t th;
    pthread_mutex_t mu;
    pthread_cond_t cv;
    bool started, quit, pending, busy;
    job j;
    moecal_status st;             /* first failure of the writer thread */
    char msg[2048];
} pipe_t;

static void *pipe_main(void *arg)
{
    pipe_t *pp = arg;

#ifdef _OPENMP
    /* The conversions inside moecal_act_write_float run on this thread only,
     * not as a second team competing with the generating one. */
    omp_set_num_threads(1);
#endif
    pthread_mutex_lock(&pp->mu);
    for (;;) {
        job j;
        moecal_status st = MOECAL_OK;
        while (!pp->pending && !pp->quit)
            pthread_cond_wait(&pp->cv, &pp->mu);
        if (!pp->pending && pp->quit)
            break;
        j = pp->j;
        pp->pending = false;
        pp->busy = true;
        pthread_mutex_unlock(&pp->mu);
        if (j.kind == J_TENSORS) {
            for (size_t i = 0; i < j.n && st == MOECAL_OK; i++)
                st = moecal_st_writer_write(j.w, j.name[i], j.data[i], j.len[i]);
            /* Start writing the pages back now rather than all at the final
             * fsync, so that the disk works while the next tensors are made. */
#ifdef SYNC_FILE_RANGE_WRITE
            if (st == MOECAL_OK && j.fd >= 0)
                (void)sync_file_range(j.fd, 0, 0, SYNC_FILE_RANGE_WRITE);
#endif
        } else if (j.kind == J_FINISH) {
            st = moecal_st_writer_finish(j.w);
            if (j.fd >= 0)
                close(j.fd);
        } else if (j.kind == J_ACT) {
            st = moecal_act_write_float(j.aw, j.layer, j.row0, j.nrows, j.rows);
        }
        pthread_mutex_lock(&pp->mu);
        if (st != MOECAL_OK && pp->st == MOECAL_OK) {
            pp->st = st;
            snprintf(pp->msg, sizeof pp->msg, "%s", moecal_error_message());
        }
        pp->busy = false;
        pthread_cond_broadcast(&pp->cv);
    }
    pthread_mutex_unlock(&pp->mu);
    return NULL;
}

static moecal_status pipe_start(pipe_t *pp)
{
    int rc;

    memset(pp, 0, sizeof *pp);
    pthread_mutex_init(&pp->mu, NULL);
    pthread_cond_init(&pp->cv, NULL);
    rc = pthread_create(&pp->th, NULL, pipe_main, pp);
    if (rc != 0) {
        pthread_cond_destroy(&pp->cv);
        pthread_mutex_destroy(&pp->mu);
        return moecal_error_errno(rc, "cannot start the writer thread");
    }
    pp->started = true;
    return MOECAL_OK;
}

/* Wait until the writer thread is idle; its failure, if any, becomes ours. */
static moecal_status pipe_wait(pipe_t *pp)
{
    moecal_status st;

    pthread_mutex_lock(&pp->mu);
    while (pp->pending || pp->busy)
        pthread_cond_wait(&pp->cv, &pp->mu);
    st = pp->st;
    if (st != MOECAL_OK)
        moecal_error_set(st, "%s", pp->msg);
    pthread_mutex_unlock(&pp->mu);
    return st;
}

/* Hand a job over once the previous one is done.  The job's buffers belong
 * to the writer thread until the next pipe_wait or pipe_submit returns. */
static moecal_status pipe_submit(pipe_t *pp, const job *j)
{
    MOECAL_TRY(pipe_wait(pp));
    pthread_mutex_lock(&pp->mu);
    pp->j = *j;
    pp->pending = true;
    pthread_cond_broadcast(&pp->cv);
    pthread_mutex_unlock(&pp->mu);
    return MOECAL_OK;
}

static void pipe_stop(pipe_t *pp)
{
    if (!pp->started)
        return;
    pthread_mutex_lock(&pp->mu);
    pp->quit = true;
    pthread_cond_broadcast(&pp->cv);
    pthread_mutex_unlock(&pp->mu);
    pthread_join(pp->th, NULL);
    pthread_cond_destroy(&pp->cv);
    pthread_mutex_destroy(&pp->mu);
    pp->started = false;
}

/* ------------------------------------------------------------------ progress */

typedef struct progress {
    int mode;                 /* MOECAL_SYNTH_QUIET, _LINES, _BAR */
    uint64_t total, done, layer_start_bytes;
    double t0, layer_t0, last_draw;
} progress;

static void human_bytes(double b, char *buf, size_t len)
{
    const char *u[] = {"B", "kB", "MB", "GB", "TB"};
    int i = 0;
    while (b >= 1000.0 && i < 4) {
        b /= 1000.0;
        i++;
    }
    snprintf(buf, len, i ? "%.1f %s" : "%.0f %s", b, u[i]);
}

static void progress_draw(progress *pg, const char *what, bool force)
{
    double t = moecal_now(), frac, rate;
    char done[32], tot[32];
    int width = 30, fill;

    if (pg->mode != MOECAL_SYNTH_BAR || (!force && t - pg->last_draw < 0.2))
        return;
    pg->last_draw = t;
    frac = pg->total ? (double)pg->done / (double)pg->total : 1.0;
    fill = (int)(frac * width + 0.5);
    rate = t > pg->t0 ? (double)pg->done / (t - pg->t0) : 0.0;
    human_bytes((double)pg->done, done, sizeof done);
    human_bytes((double)pg->total, tot, sizeof tot);
    fprintf(stderr, "\rsynth [%.*s%*s] %3.0f%% %s / %s, %.0f MB/s %-24s", fill,
            "##############################", width - fill, "", 100.0 * frac, done, tot,
            rate / 1e6, what);
    fflush(stderr);
}

static void progress_line(progress *pg, const char *fmt, ...) __attribute__((format(printf, 2, 3)));

static void progress_line(progress *pg, const char *fmt, ...)
{
    va_list ap;
    double t = moecal_now(), dt = t - pg->layer_t0;
    uint64_t b = pg->done - pg->layer_start_bytes;
    char bs[32];

    if (pg->mode == MOECAL_SYNTH_QUIET)
        return;
    human_bytes((double)b, bs, sizeof bs);
    if (pg->mode == MOECAL_SYNTH_BAR)
        fputc('\r', stderr);
    fprintf(stderr, "synth: ");
    va_start(ap, fmt);
    vfprintf(stderr, fmt, ap);
    va_end(ap);
    fprintf(stderr, ": %s in %.2f s (%.0f MB/s)%*s\n", bs, dt, dt > 0 ? (double)b / dt / 1e6 : 0.0,
            pg->mode == MOECAL_SYNTH_BAR ? 30 : 0, "");
    fflush(stderr);
    pg->layer_t0 = t;
    pg->layer_start_bytes = pg->done;
    progress_draw(pg, "", true);
}

/* ------------------------------------------------------------------ the writing */

/* A buffer of the double buffer: a batch of expert tensors and the job that
 * writes them. */
typedef struct slot {
    void *w;                  /* weights, back to back */
    float *s;                 /* their FP8 scales, back to back */
    size_t wcap, scap;        /* bytes, floats */
    const char **name;
    const void **data;
    size_t *len;
    size_t ncap;              /* entries of name/data/len */
} slot;

typedef struct synth_ctx {
    const moecal_synth_params *p;
    const char *dir;
    model_vals mv;
    tplan *plan;
    size_t nplan;
    int nshards;
    uint64_t total;
    pipe_t pipe;
    progress pg;
    slot slots[2];
    int cur;                  /* slot to fill next */
    size_t batch_bytes;       /* weight bytes per batch (at least one tensor) */
    float **band;             /* per OpenMP thread: 128 rows of the widest tensor */
    int nthreads;
    size_t *bstart, *woff, *soff, *tidx;  /* per batch tensor (see gen_batch) */
    size_t bcap;
    moecal_st_writer *w;      /* shard being filled, owned by this thread */
    int wfd;                  /* its temporary file, read-only, for writeback hints */
    int w_shard;
    uint8_t *never;           /* [layers - first_dense][E] */
    float *gate, *bias;
    uint16_t *gate16;
} synth_ctx;

/* Generate the weight tensors plan[tidx[0..m)] (and FP8 scales) into slot
 * c->cur: all their 128-row bands are one parallel loop, so small tensors
 * keep every thread busy too. */
static void gen_batch(synth_ctx *c, size_t m)
{
    const moecal_synth_params *p = c->p;
    int fp8 = p->dtype == MOECAL_DT_F8_E4M3;
    slot *sl = &c->slots[c->cur];
    size_t nbands;

    c->bstart[0] = 0;
    for (size_t j = 0; j < m; j++) {
        const tplan *t = &c->plan[c->tidx[j]];
        c->bstart[j + 1] = c->bstart[j] + ((size_t)t->shape[0] + FP8_BLOCK - 1) / FP8_BLOCK;
    }
    nbands = c->bstart[m];
#pragma omp parallel for schedule(dynamic, 1)
    for (size_t k = 0; k < nbands; k++) {
#ifdef _OPENMP
        float *band = c->band[omp_get_thread_num()];
#else
        float *band = c->band[0];
#endif
        size_t lo = 0, hi = m, j, b, r0, n, rows, cols, nbc;
        const tplan *t;
        while (hi - lo > 1) { /* the tensor j with bstart[j] <= k < bstart[j + 1] */
            size_t mid = (lo + hi) / 2;
            if (c->bstart[mid] <= k)
                lo = mid;
            else
                hi = mid;
        }
        j = lo;
        t = &c->plan[c->tidx[j]];
        rows = (size_t)t->shape[0];
        cols = (size_t)t->shape[1];
        nbc = (cols + FP8_BLOCK - 1) / FP8_BLOCK;
        b = k - c->bstart[j];
        r0 = b * FP8_BLOCK;
        n = rows - r0 < FP8_BLOCK ? rows - r0 : FP8_BLOCK;
        gen_weight_rows(p, t->layer, t->expert, t->proj, r0, n, cols, band);
        if (fp8) {
            moecal_synth_quant_fp8(band, n, cols, (uint8_t *)sl->w + c->woff[j] + r0 * cols,
                                   sl->s + c->soff[j] + b * nbc);
        } else {
            uint16_t *o = (uint16_t *)((char *)sl->w + c->woff[j]) + r0 * cols;
            for (size_t i = 0; i < n * cols; i++)
                o[i] = moecal_float_to_bf16(band[i]);
        }
    }
}

static moecal_status slot_reserve(synth_ctx *c, slot *sl, size_t wbytes, size_t sfloats,
                                  size_t n)
{
    if (wbytes > sl->wcap) {
        void *q = realloc(sl->w, wbytes);
        if (!q)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for %zu bytes of expert "
                                    "weights", wbytes);
        sl->w = q;
        sl->wcap = wbytes;
    }
    if (sfloats > sl->scap) {
        float *q = realloc(sl->s, sfloats * sizeof *q);
        if (!q)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for FP8 scales");
        sl->s = q;
        sl->scap = sfloats;
    }
    if (n > sl->ncap) {
        const char **nm = realloc(sl->name, n * sizeof *nm);
        if (nm)
            sl->name = nm;
        const void **d = realloc(sl->data, n * sizeof *d);
        if (d)
            sl->data = d;
        size_t *l = realloc(sl->len, n * sizeof *l);
        if (l)
            sl->len = l;
        if (!nm || !d || !l)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        sl->ncap = n;
    }
    if (n > c->bcap) {
        size_t *a = realloc(c->bstart, (n + 1) * sizeof *a);
        if (a)
            c->bstart = a;
        size_t *b = realloc(c->woff, n * sizeof *b);
        if (b)
            c->woff = b;
        size_t *d = realloc(c->soff, n * sizeof *d);
        if (d)
            c->soff = d;
        size_t *e = realloc(c->tidx, n * sizeof *e);
        if (e)
            c->tidx = e;
        if (!a || !b || !d || !e)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        c->bcap = n;
    }
    return MOECAL_OK;
}

static moecal_status open_shard(synth_ctx *c, int s)
{
    char name[64], path[4352];
    moecal_status st;

    shard_name(s, c->nshards, name, sizeof name);
    MOECAL_TRY(moecal_path_join(path, sizeof path, c->dir, name));
    MOECAL_TRY(moecal_st_writer_create(path, &c->w));
    /* The writer writes PATH.tmp; a second descriptor of it serves only
     * sync_file_range (advisory: without it the final fsync does the work). */
    strncat(path, ".tmp", sizeof path - strlen(path) - 1);
    c->wfd = open(path, O_RDONLY | O_CLOEXEC);
    c->w_shard = s;
    st = moecal_st_writer_metadata(c->w, "format", "pt");
    for (size_t i = 0; st == MOECAL_OK && i < c->nplan; i++)
        if (c->plan[i].shard == s)
            st = moecal_st_writer_add(c->w, c->plan[i].name, c->plan[i].dtype, c->plan[i].ndim,
                                      c->plan[i].shape);
    if (st == MOECAL_OK)
        st = moecal_st_writer_write_header(c->w);
    if (st != MOECAL_OK) {
        moecal_st_writer_abort(c->w);
        c->w = NULL;
        if (c->wfd >= 0)
            close(c->wfd);
        c->wfd = -1;
    }
    return st;
}

/* The current shard is complete: the writer thread fsyncs and renames it. */
static moecal_status close_shard(synth_ctx *c)
{
    job j = {.kind = J_FINISH, .w = c->w, .fd = c->wfd};
    moecal_status st = pipe_submit(&c->pipe, &j);

    if (st == MOECAL_OK) {
        c->w = NULL; /* the writer thread owns (and consumes) it now */
        c->wfd = -1;
    }
    return st;
}

static moecal_status write_router(synth_ctx *c, int L)
{
    const moecal_synth_params *p = c->p;
    size_t ng = (size_t)p->experts * (size_t)p->hidden;
    char gname[NAME_LEN], bname[NAME_LEN];
    const char *names[2] = {gname, bname};
    const void *data[2];
    size_t len[2] = {ng * 2, (size_t)p->experts * 4};
    job j = {.kind = J_TENSORS, .n = 2, .name = names, .data = data, .len = len};

    /* The previous router buffers may still be in the writer's hands. */
    MOECAL_TRY(pipe_wait(&c->pipe));
    MOECAL_TRY(gen_router(p, &c->mv, L, c->never + (size_t)(L - p->first_dense) * p->experts,
                          c->gate, c->bias));
#pragma omp parallel for schedule(static)
    for (size_t i = 0; i < ng; i++)
        c->gate16[i] = moecal_float_to_bf16(c->gate[i]);
    snprintf(gname, sizeof gname, "model.layers.%d.mlp.gate.weight", L);
    snprintf(bname, sizeof bname, "model.layers.%d.mlp.gate.e_score_correction_bias", L);
    data[0] = c->gate16;
    data[1] = c->bias;
    j.w = c->w;
    j.fd = c->wfd;
    MOECAL_TRY(pipe_submit(&c->pipe, &j));
    /* the job's arrays live on this stack frame: let the writer finish */
    MOECAL_TRY(pipe_wait(&c->pipe));
    c->pg.done += len[0] + len[1];
    return MOECAL_OK;
}

static moecal_status write_weights(synth_ctx *c)
{
    const moecal_synth_params *p = c->p;
    int fp8 = p->dtype == MOECAL_DT_F8_E4M3;
    int layer = -1;
    size_t i = 0;
    char what[64];

    while (i < c->nplan) {
        tplan *t = &c->plan[i];
        size_t m = 0, wb = 0, sf = 0, i0 = i, nt;
        slot *sl;
        job j = {.kind = J_TENSORS};

        if (t->shard != c->w_shard || !c->w) {
            if (c->w)
                MOECAL_TRY(close_shard(c));
            MOECAL_TRY(open_shard(c, t->shard));
        }
        if (t->layer != layer) {
            if (layer >= 0)
                progress_line(&c->pg, "layer %d: router and %d experts", layer, p->experts);
            layer = t->layer;
        }
        if (t->kind == T_GATE) {
            MOECAL_TRY(write_router(c, t->layer));
            i += 2; /* the bias was written with the gate */
            continue;
        }
        /* A batch: weights (with their scales) of this shard and layer, up to
         * batch_bytes, at least one. */
        for (; i < c->nplan; i += fp8 ? 2 : 1) {
            const tplan *u = &c->plan[i];
            if (u->kind != T_WEIGHT || u->shard != t->shard || u->layer != t->layer ||
                (m > 0 && wb + u->bytes > c->batch_bytes))
                break;
            wb += (size_t)u->bytes;
            sf += fp8 ? (size_t)u[1].bytes / 4 : 0;
            m++;
        }
        nt = fp8 ? 2 * m : m;
        sl = &c->slots[c->cur];
        MOECAL_TRY(slot_reserve(c, sl, wb, sf, nt));
        wb = sf = 0;
        for (size_t k = 0; k < m; k++) {
            size_t ti = i0 + k * (fp8 ? 2 : 1);
            const tplan *u = &c->plan[ti];
            size_t e = fp8 ? 2 * k : k;
            c->tidx[k] = ti;
            c->woff[k] = wb;
            c->soff[k] = sf;
            sl->name[e] = u->name;
            sl->data[e] = (char *)sl->w + wb;
            sl->len[e] = (size_t)u->bytes;
            wb += (size_t)u->bytes;
            if (fp8) {
                sl->name[e + 1] = u[1].name;
                sl->data[e + 1] = sl->s + sf;
                sl->len[e + 1] = (size_t)u[1].bytes;
                sf += (size_t)u[1].bytes / 4;
            }
        }
        gen_batch(c, m);
        j.w = c->w;
        j.fd = c->wfd;
        j.n = nt;
        j.name = sl->name;
        j.data = sl->data;
        j.len = sl->len;
        MOECAL_TRY(pipe_submit(&c->pipe, &j));
        c->cur ^= 1;
        c->pg.done += wb + 4 * sf;
        snprintf(what, sizeof what, "layer %d expert %d", t->layer,
                 c->plan[c->tidx[m - 1]].expert);
        progress_draw(&c->pg, what, false);
    }
    if (c->w)
        MOECAL_TRY(close_shard(c));
    MOECAL_TRY(pipe_wait(&c->pipe));
    if (layer >= 0)
        progress_line(&c->pg, "layer %d: router and %d experts", layer, p->experts);
    return MOECAL_OK;
}

static moecal_status write_activations(synth_ctx *c)
{
    const moecal_synth_params *p = c->p;
    int nmoe = p->layers - p->first_dense, H = p->hidden;
    int *layers = malloc((size_t)nmoe * sizeof *layers);
    float *buf[2] = {NULL, NULL}, *mu = malloc((size_t)H * sizeof *mu);
    moecal_act_writer *aw = NULL;
    int64_t step, crow;
    char path[4352], src[256];
    double mu_sq;
    moecal_status st = MOECAL_OK;
    int cur = 0;

    if (!layers || !mu) {
        st = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
        goto out;
    }
    for (int i = 0; i < nmoe; i++)
        layers[i] = p->first_dense + i;
    snprintf(path, sizeof path, "%s/activations.h5", c->dir);
    if ((st = moecal_act_create(path, p->tokens, H, layers, nmoe, p->act_dtype, &aw)) !=
        MOECAL_OK)
        goto out;
    snprintf(src, sizeof src, "moecal synth, preset %s, seed %llu", p->preset,
             (ull)p->seed);
    if ((st = moecal_act_writer_attr(aw, "source", src)) != MOECAL_OK)
        goto out;
    /* Whole chunks per write, ~32 MiB of floats. */
    crow = moecal_act_writer_chunk_rows(aw);
    step = (int64_t)(ACT_BLOCK_BYTES / (4 * (size_t)H)) / crow * crow;
    if (step < crow)
        step = crow;
    if (step > p->tokens)
        step = p->tokens;
    buf[0] = malloc((size_t)step * (size_t)H * sizeof(float));
    buf[1] = malloc((size_t)step * (size_t)H * sizeof(float));
    if (!buf[0] || !buf[1]) {
        st = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for %lld activation rows",
                              (long long)step);
        goto out;
    }
    for (int i = 0; i < nmoe; i++) {
        layer_dir(p, &c->mv, layers[i], mu, &mu_sq);
        for (int64_t t0 = 0; t0 < p->tokens; t0 += step) {
            int64_t n = p->tokens - t0 < step ? p->tokens - t0 : step;
            job j = {.kind = J_ACT, .fd = -1, .aw = aw, .layer = layers[i], .row0 = t0, .nrows = n,
                     .rows = buf[cur]};
            char what[64];
            gen_act_rows(p, &c->mv, mu, layers[i], t0, n, buf[cur]);
            if ((st = pipe_submit(&c->pipe, &j)) != MOECAL_OK)
                goto out;
            cur ^= 1;
            c->pg.done += (uint64_t)n * (uint64_t)H * moecal_dtype_size(p->act_dtype);
            snprintf(what, sizeof what, "activations layer %d", layers[i]);
            progress_draw(&c->pg, what, false);
        }
        if ((st = pipe_wait(&c->pipe)) != MOECAL_OK)
            goto out;
        progress_line(&c->pg, "layer %d: %lld activation rows", layers[i], (long long)p->tokens);
    }
    if ((st = pipe_wait(&c->pipe)) == MOECAL_OK) {
        st = moecal_act_writer_close(aw);
        aw = NULL;
    }
out:
    if (aw) {
        moecal_status ws = pipe_wait(&c->pipe);
        (void)ws;
        if (st != MOECAL_OK) {
            /* keep this thread's message: the abort must not replace it */
            char msg[2048];
            snprintf(msg, sizeof msg, "%s", moecal_error_message());
            moecal_act_writer_abort(aw);
            moecal_error_set(st, "%s", msg);
        } else {
            moecal_act_writer_abort(aw);
        }
    }
    free(buf[0]);
    free(buf[1]);
    free(mu);
    free(layers);
    return st;
}

static json_t *ints_json(const int *v, int n)
{
    json_t *a = json_array();
    for (int i = 0; a && i < n; i++)
        if (json_array_append_new(a, json_integer(v[i])) != 0) {
            json_decref(a);
            return NULL;
        }
    return a;
}

static moecal_status write_meta(synth_ctx *c)
{
    const moecal_synth_params *p = c->p;
    json_t *cfg = config_json(p), *idx = json_object(), *wm = json_object(), *sj = json_object();
    json_t *never = json_object(), *outl = json_array(), *mag = json_array();
    int ok = cfg && idx && wm && sj && never && outl && mag;
    int nmoe = p->layers - p->first_dense;
    char path[4352], name[64];
    moecal_status st = MOECAL_OK;
    int *ids = malloc((size_t)p->experts * sizeof *ids);
    int *moe = malloc((size_t)nmoe * sizeof *moe);

    if (!ids || !moe)
        ok = 0;
    for (size_t i = 0; ok && i < c->nplan; i++) {
        shard_name(c->plan[i].shard, c->nshards, name, sizeof name);
        jset(wm, c->plan[i].name, json_string(name), &ok);
    }
    jset(idx, "metadata", json_pack("{s:I}", "total_size", (json_int_t)c->total), &ok);
    jset(idx, "weight_map", wm, &ok);
    wm = NULL;
    for (int li = 0; ok && li < nmoe; li++) {
        const uint8_t *nv = c->never + (size_t)li * p->experts;
        int n = 0;
        char key[16];
        moe[li] = p->first_dense + li;
        for (int e = 0; e < p->experts; e++)
            if (nv[e])
                ids[n++] = e;
        snprintf(key, sizeof key, "%d", moe[li]);
        jset(never, key, ints_json(ids, n), &ok);
    }
    for (int o = 0; ok && o < c->mv.n_out; o++) {
        ok = json_array_append_new(outl, json_integer(c->mv.out_ch[o])) == 0 &&
             json_array_append_new(mag, json_real(c->mv.out_mag[o] * c->mv.out_sign[o])) == 0;
    }
    if (ok) {
        jset(sj, "generator", json_string("moecal synth"), &ok);
        jset(sj, "preset", json_string(p->preset), &ok);
        jset(sj, "seed", json_integer((json_int_t)p->seed), &ok);
        jset(sj, "model_type", json_string("deepseek_v3"), &ok);
        jset(sj, "num_hidden_layers", json_integer(p->layers), &ok);
        jset(sj, "first_k_dense_replace", json_integer(p->first_dense), &ok);
        jset(sj, "moe_layers", ints_json(moe, nmoe), &ok);
        jset(sj, "n_routed_experts", json_integer(p->experts), &ok);
        jset(sj, "num_experts_per_tok", json_integer(p->topk), &ok);
        jset(sj, "n_group", json_integer(p->groups), &ok);
        jset(sj, "topk_group", json_integer(p->topk_groups), &ok);
        jset(sj, "hidden_size", json_integer(p->hidden), &ok);
        jset(sj, "moe_intermediate_size", json_integer(p->intermediate), &ok);
        jset(sj, "tokens", json_integer((json_int_t)p->tokens), &ok);
        jset(sj, "weight_dtype", json_string(moecal_dtype_name(p->dtype)), &ok);
        if (p->dtype == MOECAL_DT_F8_E4M3)
            jset(sj, "weight_block_size", json_pack("[i,i]", FP8_BLOCK, FP8_BLOCK), &ok);
        jset(sj, "act_dtype", json_string(act_word(p->act_dtype)), &ok);
        jset(sj, "activations", json_string("activations.h5"), &ok);
        jset(sj, "shard_size", json_integer((json_int_t)p->shard_size), &ok);
        jset(sj, "shards", json_integer(c->nshards), &ok);
        jset(sj, "total_size", json_integer((json_int_t)c->total), &ok);
        jset(sj, "never_routed_per_layer", json_integer(p->never_routed), &ok);
        jset(sj, "never_routed", never, &ok);
        never = NULL;
        jset(sj, "outlier_channels", outl, &ok);
        outl = NULL;
        jset(sj, "outlier_magnitudes", mag, &ok);
        mag = NULL;
        jset(sj, "router_correction_bias_never_routed", json_real(-4.0), &ok);
    }
    if (!ok) {
        st = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory building the JSON files");
        goto out;
    }
    snprintf(path, sizeof path, "%s/config.json", c->dir);
    if ((st = write_json(path, cfg)) != MOECAL_OK)
        goto out;
    snprintf(path, sizeof path, "%s/model.safetensors.index.json", c->dir);
    if ((st = write_json(path, idx)) != MOECAL_OK)
        goto out;
    snprintf(path, sizeof path, "%s/synth.json", c->dir);
    st = write_json(path, sj);
out:
    json_decref(cfg);
    json_decref(idx);
    json_decref(wm);
    json_decref(sj);
    json_decref(never);
    json_decref(outl);
    json_decref(mag);
    free(ids);
    free(moe);
    return st;
}

static void ctx_free(synth_ctx *c)
{
    if (c->w)
        moecal_st_writer_abort(c->w);
    c->w = NULL;
    if (c->wfd >= 0)
        close(c->wfd);
    c->wfd = -1;
    pipe_stop(&c->pipe);
    for (int i = 0; i < 2; i++) {
        free(c->slots[i].w);
        free(c->slots[i].s);
        free(c->slots[i].name);
        free(c->slots[i].data);
        free(c->slots[i].len);
    }
    if (c->band)
        for (int i = 0; i < c->nthreads; i++)
            free(c->band[i]);
    free(c->band);
    free(c->bstart);
    free(c->woff);
    free(c->soff);
    free(c->tidx);
    free(c->plan);
    free(c->never);
    free(c->gate);
    free(c->bias);
    free(c->gate16);
    model_vals_free(&c->mv);
}

static moecal_status ctx_alloc(synth_ctx *c)
{
    const moecal_synth_params *p = c->p;
    size_t maxw = 0, widest = (size_t)(p->hidden > p->intermediate ? p->hidden
                                                                   : p->intermediate);
    int nmoe = p->layers - p->first_dense;

    for (size_t i = 0; i < c->nplan; i++)
        if (c->plan[i].kind == T_WEIGHT && c->plan[i].bytes > maxw)
            maxw = (size_t)c->plan[i].bytes;
    /* Batches of about 16 MiB: enough bands for every thread, few in memory. */
    c->batch_bytes = maxw > BATCH_BYTES ? maxw : BATCH_BYTES;
#ifdef _OPENMP
    c->nthreads = omp_get_max_threads();
#else
    c->nthreads = 1;
#endif
    c->band = calloc((size_t)c->nthreads, sizeof *c->band);
    c->never = calloc((size_t)nmoe * (size_t)p->experts, 1);
    c->gate = malloc((size_t)p->experts * (size_t)p->hidden * sizeof *c->gate);
    c->gate16 = malloc((size_t)p->experts * (size_t)p->hidden * sizeof *c->gate16);
    c->bias = malloc((size_t)p->experts * sizeof *c->bias);
    if (!c->band || !c->never || !c->gate || !c->gate16 || !c->bias)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory");
    for (int i = 0; i < c->nthreads; i++)
        if (!(c->band[i] = malloc((size_t)FP8_BLOCK * widest * sizeof(float))))
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the generator "
                                    "threads' buffers (%d threads)", c->nthreads);
    for (int li = 0; li < nmoe; li++)
        layer_never(p, p->first_dense + li, c->never + (size_t)li * p->experts);
    return MOECAL_OK;
}

moecal_status moecal_synth_write(const char *dir, const moecal_synth_params *p, bool force,
                                 moecal_synth_result *res)
{
    synth_ctx c;
    moecal_status st;
    double t0 = moecal_now();

    if (!dir || !*dir || !p)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "moecal_synth_write: null argument");
    MOECAL_TRY(moecal_synth_check(p));
    memset(&c, 0, sizeof c);
    c.p = p;
    c.dir = dir;
    c.w_shard = -1;
    c.wfd = -1;
    c.pg.mode = p->progress == MOECAL_SYNTH_AUTO
                    ? (isatty(STDERR_FILENO) ? MOECAL_SYNTH_BAR : MOECAL_SYNTH_LINES)
                    : p->progress;
    if ((st = prepare_dir(dir, force)) != MOECAL_OK)
        return st;
    if ((st = model_vals_make(p, &c.mv)) != MOECAL_OK)
        return st;
    if ((st = make_plan(p, &c.plan, &c.nplan, &c.nshards, &c.total)) != MOECAL_OK)
        goto out;
    if ((st = ctx_alloc(&c)) != MOECAL_OK)
        goto out;
    if ((st = pipe_start(&c.pipe)) != MOECAL_OK)
        goto out;
    c.pg.total = c.total + (uint64_t)p->tokens * (uint64_t)p->hidden *
                               (uint64_t)(p->layers - p->first_dense) *
                               moecal_dtype_size(p->act_dtype);
    c.pg.t0 = c.pg.layer_t0 = t0;
    progress_draw(&c.pg, "", true);
    if ((st = write_weights(&c)) != MOECAL_OK)
        goto out;
    if ((st = write_activations(&c)) != MOECAL_OK)
        goto out;
    /* synth.json last: its presence says the directory is complete. */
    st = write_meta(&c);
out:
    if (st != MOECAL_OK) {
        char msg[2048];
        /* the writer thread may still hold a shard: let it finish first */
        snprintf(msg, sizeof msg, "%s", moecal_error_message());
        (void)pipe_wait(&c.pipe);
        ctx_free(&c);
        moecal_error_set(st, "%s", msg);
        if (c.pg.mode == MOECAL_SYNTH_BAR)
            fputc('\n', stderr);
        return st;
    }
    ctx_free(&c);
    if (c.pg.mode == MOECAL_SYNTH_BAR) {
        progress_draw(&c.pg, "done", true);
        fputc('\n', stderr);
    }
    if (res) {
        res->shards = c.nshards;
        res->weight_bytes = c.total;
        res->act_bytes = c.pg.total - c.total;
        res->seconds = moecal_now() - t0;
    }
    return MOECAL_OK;
}

moecal_status moecal_synth_preset(const char *dir, const char *preset)
{
    moecal_synth_params p;

    MOECAL_TRY(moecal_synth_preset_params(preset, &p));
    p.progress = MOECAL_SYNTH_QUIET;
    return moecal_synth_write(dir, &p, true, NULL);
}
