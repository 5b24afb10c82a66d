/* prefetch.c - read the next layer's expert weights ahead; see prefetch.h. */
#include "config.h"

#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "prefetch.h"
#include "runtime.h"

#define MSG_LEN 1024

struct moecal_prefetch {
    moecal_model *m;
    const moecal_model_config *cfg;
    int e0, n, threads, block;
    bool want_fp8;
    size_t per, nsc;           /* values per w1/w3; scales per w1/w3 */

    /* buffers */
    float *gate, *bias;        /* [E][H], [E] */
    uint16_t *w13;             /* bf16 [2n][I][H]: w1 of every expert, then w3 */
    uint8_t *q13;              /* e4m3 [2n][I][H] */
    float *s13;                /* [2n][nsc] */
    float *wamax;              /* [n][3] */

    /* the read in progress */
    pthread_t thread;
    bool running;
    int layer;
    bool fp8;                  /* this layer kept in FP8 */
    moecal_status status;
    int failed;                /* lowest failing expert, n if none */
    char msg[MSG_LEN];
    double read_s, wait_s;
    uint64_t bytes;       /* stored bytes read so far (moecal_model_layer_bytes) */
};

static void *xmalloc(size_t n, size_t size)
{
    return n == 0 || size == 0 ? calloc(1, 1) : calloc(n, size);
}

/* Elements of one expert projection and of its block scales. */
static void proj_sizes(const moecal_model_config *cfg, int *block, size_t *per, size_t *nsc)
{
    size_t H = (size_t)cfg->hidden_size, I = (size_t)cfg->moe_intermediate_size, B;

    *block = cfg->weight_block[0] > 0 ? cfg->weight_block[0] : 128;
    B = (size_t)*block;
    *per = I * H;
    *nsc = ((I + B - 1) / B) * ((H + B - 1) / B);
}

uint64_t moecal_prefetch_memory(const moecal_model_config *cfg, int n, bool fp8)
{
    int block;
    size_t per, nsc, E = (size_t)cfg->n_routed_experts, n2 = 2 * (size_t)n;

    proj_sizes(cfg, &block, &per, &nsc);
    return (uint64_t)(E * (size_t)cfg->hidden_size * sizeof(float) + E * sizeof(float) +
                      (size_t)n * 3 * sizeof(float) +
                      (fp8 ? n2 * per + n2 * nsc * sizeof(float) : n2 * per * sizeof(uint16_t)));
}

moecal_status moecal_prefetch_create(moecal_model *m, int e0, int n, bool fp8, int threads,
                                     moecal_prefetch **out)
{
    moecal_prefetch *pf = calloc(1, sizeof *pf);
    const moecal_model_config *cfg = moecal_model_cfg(m);
    size_t H = (size_t)cfg->hidden_size;

    *out = NULL;
    if (pf == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (weight prefetch)");
    pf->m = m;
    pf->cfg = cfg;
    pf->e0 = e0;
    pf->n = n;
    pf->threads = threads > 0 ? threads : 1;
    pf->want_fp8 = fp8;
    proj_sizes(cfg, &pf->block, &pf->per, &pf->nsc);
    pf->gate = xmalloc((size_t)cfg->n_routed_experts * H, sizeof(float));
    pf->bias = xmalloc((size_t)cfg->n_routed_experts, sizeof(float));
    pf->wamax = xmalloc((size_t)n * 3, sizeof(float));
    if (!pf->gate || !pf->bias || !pf->wamax) {
        moecal_prefetch_destroy(pf);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory (weight prefetch)");
    }
    *out = pf;
    return MOECAL_OK;
}

int moecal_prefetch_buffers(const moecal_prefetch *pf, void *ptr[4], size_t bytes[4])
{
    int k = 0;
    if (pf->w13) {
        ptr[k] = pf->w13;
        bytes[k++] = 2 * (size_t)pf->n * pf->per * sizeof(uint16_t);
    }
    if (pf->q13) {
        ptr[k] = pf->q13;
        bytes[k++] = 2 * (size_t)pf->n * pf->per;
    }
    if (pf->s13) {
        ptr[k] = pf->s13;
        bytes[k++] = 2 * (size_t)pf->n * pf->nsc * sizeof(float);
    }
    return k;
}

/* Is this projection of this expert stored as F8_E4M3? */
static moecal_status is_fp8(moecal_model *m, int layer, int e, int proj, bool *yes)
{
    char name[512];
    const moecal_st_file *f;
    const moecal_st_tensor *t;

    moecal_model_expert_name(m, layer, e, proj, name, sizeof name);
    MOECAL_TRY(moecal_model_find(m, name, &f, &t));
    *yes = t->dtype == MOECAL_DT_F8_E4M3;
    return MOECAL_OK;
}

/* Buffers of the form this layer needs (made on first use). */
static moecal_status ensure_buffers(moecal_prefetch *pf)
{
    size_t n2 = 2 * (size_t)pf->n;
    if (pf->fp8 && pf->q13 == NULL) {
        pf->q13 = xmalloc(n2 * pf->per, 1);
        pf->s13 = xmalloc(n2 * pf->nsc, sizeof(float));
        if (!pf->q13 || !pf->s13)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for %zu bytes of FP8 "
                                    "expert weights", n2 * pf->per);
    }
    if (!pf->fp8 && pf->w13 == NULL) {
        pf->w13 = xmalloc(n2 * pf->per, sizeof(uint16_t));
        if (!pf->w13)
            return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for %zu bytes of bf16 "
                                    "expert weights", n2 * pf->per * sizeof(uint16_t));
    }
    return MOECAL_OK;
}

/* One expert: w1 and w3 in the layer's form, w2 scanned for its amax. */
static moecal_status read_expert(moecal_prefetch *pf, int k)
{
    moecal_model *m = pf->m;
    int e = pf->e0 + k, layer = pf->layer;
    size_t n = (size_t)pf->n;
    float *wa = pf->wamax + (size_t)k * 3;

    for (int half = 0; half < 2; half++) {
        int proj = half ? MOECAL_W3 : MOECAL_W1;
        size_t slot = (size_t)half * n + (size_t)k;
        float *amax = &wa[half ? 2 : 0];
        if (pf->fp8)
            MOECAL_TRY(moecal_model_load_expert_fp8(m, layer, e, proj, pf->q13 + slot * pf->per,
                                                    pf->s13 + slot * pf->nsc, amax));
        else
            MOECAL_TRY(moecal_model_load_expert(m, layer, e, proj, pf->w13 + slot * pf->per,
                                                amax));
    }
    return moecal_model_expert_amax(m, layer, e, MOECAL_W2, &wa[1]);
}

static void *reader_main(void *arg)
{
    moecal_prefetch *pf = arg;
    double t0 = moecal_now();
    moecal_status s;

    pf->failed = pf->n;
    pf->status = MOECAL_OK;
    pf->fp8 = pf->want_fp8;
    for (int k = 0; k < pf->n && pf->fp8; k++) {
        bool a = false, b = false;
        s = is_fp8(pf->m, pf->layer, pf->e0 + k, MOECAL_W1, &a);
        if (s == MOECAL_OK)
            s = is_fp8(pf->m, pf->layer, pf->e0 + k, MOECAL_W3, &b);
        if (s != MOECAL_OK)
            goto fail;
        pf->fp8 = a && b;
    }
    s = moecal_model_load_gate(pf->m, pf->layer, pf->gate,
                               pf->cfg->has_correction_bias ? pf->bias : NULL);
    if (s == MOECAL_OK) {
        uint64_t rb = 0, eb = 0;
        s = moecal_model_layer_bytes(pf->m, pf->layer, pf->e0, pf->e0 + pf->n, &rb, &eb);
        pf->bytes += rb + eb;
    }
    if (s == MOECAL_OK)
        s = ensure_buffers(pf);
    if (s != MOECAL_OK)
        goto fail;

#ifdef _OPENMP
#pragma omp parallel for num_threads(pf->threads) schedule(dynamic, 1)
#endif
    for (int k = 0; k < pf->n; k++) {
        moecal_status sk;
        int first;
#ifdef _OPENMP
#pragma omp atomic read
#endif
        first = pf->failed;
        if (k > first)
            continue;       /* a lower expert already failed */
        sk = read_expert(pf, k);
        if (sk != MOECAL_OK) {
#ifdef _OPENMP
#pragma omp critical(moecal_prefetch_fail)
#endif
            if (k < pf->failed) {
                pf->failed = k;
                pf->status = sk;
                snprintf(pf->msg, sizeof pf->msg, "%s", moecal_error_message());
            }
        }
    }
    pf->read_s += moecal_now() - t0;
    return NULL;

fail:
    pf->status = s;
    snprintf(pf->msg, sizeof pf->msg, "%s", moecal_error_message());
    pf->read_s += moecal_now() - t0;
    return NULL;
}

moecal_status moecal_prefetch_start(moecal_prefetch *pf, int layer)
{
    if (pf->running)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "weight prefetch: a read is in progress");
    pf->layer = layer;
    if (pthread_create(&pf->thread, NULL, reader_main, pf) != 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "cannot start the weight prefetch thread");
    pf->running = true;
    return MOECAL_OK;
}

moecal_status moecal_prefetch_wait(moecal_prefetch *pf, moecal_layer_weights *lw, float *wamax)
{
    double t0 = moecal_now();
    size_t n = (size_t)pf->n;

    if (!pf->running)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "weight prefetch: no read started");
    pthread_join(pf->thread, NULL);
    pf->running = false;
    pf->wait_s += moecal_now() - t0;
    if (pf->status != MOECAL_OK)
        return moecal_error_set(pf->status, "%s", pf->msg);

    memset(lw, 0, sizeof *lw);
    lw->layer = pf->layer;
    lw->gate = pf->gate;
    lw->bias = pf->cfg->has_correction_bias ? pf->bias : NULL;
    if (pf->fp8) {
        lw->w1_fp8 = pf->q13;
        lw->w3_fp8 = pf->q13 + n * pf->per;
        lw->w1_scale = pf->s13;
        lw->w3_scale = pf->s13 + n * pf->nsc;
        lw->block = pf->block;
    } else {
        lw->w1 = pf->w13;
        lw->w3 = pf->w13 + n * pf->per;
    }
    memcpy(wamax, pf->wamax, n * 3 * sizeof(float));
    return MOECAL_OK;
}

uint64_t moecal_prefetch_bytes(const moecal_prefetch *pf)
{
    return pf->bytes;
}

void moecal_prefetch_times(const moecal_prefetch *pf, double *read_s, double *wait_s)
{
    *read_s = pf->read_s;
    *wait_s = pf->wait_s;
}

void moecal_prefetch_destroy(moecal_prefetch *pf)
{
    if (pf == NULL)
        return;
    if (pf->running)
        pthread_join(pf->thread, NULL);
    free(pf->gate);
    free(pf->bias);
    free(pf->w13);
    free(pf->q13);
    free(pf->s13);
    free(pf->wamax);
    free(pf);
}
