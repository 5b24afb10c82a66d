/* backendlib.c - what the backend tests share; see backendlib.h. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backendlib.h"
#include "fp8.h"
#include "route_math.h"
#include "router.h"

uint64_t bl_rng_state;

double bl_urand(void)
{
    bl_rng_state ^= bl_rng_state << 13;
    bl_rng_state ^= bl_rng_state >> 7;
    bl_rng_state ^= bl_rng_state << 17;
    return (double)(bl_rng_state >> 11) / 9007199254740992.0;
}

double bl_nrand(void)
{
    double u = bl_urand() + 1e-12, v = bl_urand();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

void *bl_calloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    assert_non_null(p);
    return p;
}

result result_new(int n)
{
    result r;
    r.tokens = bl_calloc((size_t)n, sizeof(int64_t));
    r.amax_x = bl_calloc((size_t)n, sizeof(float));
    r.amax_h = bl_calloc((size_t)n, sizeof(float));
    return r;
}

void result_free(result *r)
{
    free(r->tokens);
    free(r->amax_x);
    free(r->amax_h);
}

static void make_config(moecal_model_config *c, moecal_scoring sc, int E, int G, int TG, int k,
                        int H, int I)
{
    c->family = sc == MOECAL_SCORING_SIGMOID ? MOECAL_FAMILY_DEEPSEEK_V3 : MOECAL_FAMILY_QWEN3_MOE;
    c->scoring = sc;
    c->hidden_size = H;
    c->moe_intermediate_size = I;
    c->n_routed_experts = E;
    c->num_experts_per_tok = k;
    c->n_group = G;
    c->topk_group = TG;
    c->norm_topk_prob = true;
    c->routed_scaling_factor = 2.5;
    c->has_correction_bias = sc == MOECAL_SCORING_SIGMOID;
}

/* Router rows of a few units' logits, skewed by expert; +-1000 on channel 0
 * saturate the scores: the cold expert is never chosen, the one-token
 * expert only by the token whose channel 1 is set. */
static void make_router(problem *p, int E, int H)
{
    if (p->cfg.has_correction_bias) {
        p->bias = bl_calloc((size_t)E, sizeof(float));
        for (int e = 0; e < E; e++)
            p->bias[e] = (float)(0.05 * bl_nrand());
    }
    for (int e = 0; e < E; e++) {
        double skew = 1.0 + 0.5 * (double)(e % 5);
        for (int h = 2; h < H; h++)
            p->gate[(size_t)e * H + h] = (float)(0.1 * skew * bl_nrand() / sqrt(H));
    }
    if (p->cold >= 0) {
        p->gate[(size_t)p->cold * H] = -1000.0f;
        if (p->bias)
            p->bias[p->cold] = -1.0f;
    }
    if (p->one >= 0) {
        p->gate[(size_t)p->one * H] = -1000.0f;
        p->gate[(size_t)p->one * H + 1] = 2000.0f;
        if (p->bias)
            p->bias[p->one] = 0.0f; /* s' = 1 for its token, 0 for the others */
    }
}

void problem_make(problem *p, moecal_scoring sc, int E, int G, int TG, int k, int H, int I,
                  int e0, int e1, int ntok, uint64_t seed)
{
    int nloc = e1 - e0;

    memset(p, 0, sizeof *p);
    bl_rng_state = seed * 0x9e3779b97f4a7c15ull + 1;
    make_config(&p->cfg, sc, E, G, TG, k, H, I);
    p->e0 = e0;
    p->e1 = e1;
    p->ntok = ntok;
    p->cold = e0 + 1 < e1 ? e0 + 1 : -1;
    p->one = e0 + 2 < e1 ? e1 - 1 : -1;
    p->one_token = ntok / 3;
    p->gate = bl_calloc((size_t)E * H, sizeof(float));
    p->w1 = bl_calloc((size_t)nloc * I * H, sizeof(uint16_t));
    p->w3 = bl_calloc((size_t)nloc * I * H, sizeof(uint16_t));
    p->x = bl_calloc((size_t)ntok * H, sizeof(uint16_t));
    p->skip = bl_calloc((size_t)ntok, 1);
    make_router(p, E, H);
    for (size_t i = 0; i < (size_t)nloc * I * H; i++) {
        p->w1[i] = moecal_float_to_bf16((float)(bl_nrand() / sqrt(H)));
        p->w3[i] = moecal_float_to_bf16((float)(bl_nrand() / sqrt(H)));
    }
    for (int t = 0; t < ntok; t++) {
        /* per-token scales, outlier channels; the one token is quiet
         * elsewhere, so no other expert saturates for it */
        double s = t == p->one_token ? 0.01 : exp(bl_nrand());
        for (int h = 0; h < H; h++) {
            double v = bl_nrand() * s * (h % 7 == 3 ? 20.0 : 1.0);
            p->x[(size_t)t * H + h] = moecal_float_to_bf16((float)v);
        }
        p->x[(size_t)t * H] = moecal_float_to_bf16(1.0f);
        p->x[(size_t)t * H + 1] = moecal_float_to_bf16(t == p->one_token ? 1.0f : 0.0f);
    }
}

void problem_free(problem *p)
{
    free(p->gate);
    free(p->bias);
    free(p->w1);
    free(p->w3);
    free(p->x);
    free(p->skip);
}

/* The experts token xf selects: route_math.h's logits at p's precision,
 * router.c's selection.  Returns how many ids are in sel. */
static int route_token(const problem *p, bool all, const float *xf, double *ld, float *lg,
                       int32_t *sel)
{
    const moecal_model_config *c = &p->cfg;
    int E = c->n_routed_experts, H = c->hidden_size;

    if (all) {
        for (int e = 0; e < E; e++)
            sel[e] = e;
        return E;
    }
    for (int e = 0; e < E; e++) {
        ld[e] = moecal_route_logit_fd(xf, p->gate + (size_t)e * H, (size_t)H);
        lg[e] = moecal_route_round(ld[e], p->prec);
    }
    if (p->prec == MOECAL_LOGITS_EXACT)
        assert_int_equal(moecal_router_select_d(c, ld, p->bias, 1, sel, NULL), MOECAL_OK);
    else
        assert_int_equal(moecal_router_select(c, lg, p->bias, 1, sel, NULL), MOECAL_OK);
    return c->num_experts_per_tok;
}

/* amax(h) of local expert e for one token, h = bf16(bf16(silu(a)) * b). */
static float expert_amax_h(const problem *p, int e, const float *xf)
{
    int H = p->cfg.hidden_size, I = p->cfg.moe_intermediate_size;
    float m = 0.0f;

    for (int j = 0; j < I; j++) {
        const uint16_t *r1 = p->w1 + ((size_t)e * I + j) * H;
        const uint16_t *r3 = p->w3 + ((size_t)e * I + j) * H;
        double a = 0.0, b = 0.0;
        for (int h = 0; h < H; h++) {
            a += (double)xf[h] * moecal_bf16_to_float(r1[h]);
            b += (double)xf[h] * moecal_bf16_to_float(r3[h]);
        }
        float af = moecal_round_bf16((float)a), bf3 = moecal_round_bf16((float)b);
        float hv = moecal_round_bf16(moecal_round_bf16(af / (1.0f + expf(-af))) * bf3);
        m = fmaxf(m, fabsf(hv));
    }
    return m;
}

void reference(const problem *p, bool all, result *r)
{
    const moecal_model_config *c = &p->cfg;
    int E = c->n_routed_experts, H = c->hidden_size, nloc = p->e1 - p->e0;
    float *lg = bl_calloc((size_t)E, sizeof(float));
    double *ld = bl_calloc((size_t)E, sizeof(double));
    int32_t *sel = bl_calloc((size_t)E, sizeof(int32_t));
    float *xf = bl_calloc((size_t)H, sizeof(float));

    memset(r->tokens, 0, (size_t)nloc * sizeof(int64_t));
    memset(r->amax_x, 0, (size_t)nloc * sizeof(float));
    if (r->amax_h)
        memset(r->amax_h, 0, (size_t)nloc * sizeof(float));
    for (int t = 0; t < p->ntok; t++) {
        float ax = 0.0f;
        if (p->skip[t])
            continue;
        for (int h = 0; h < H; h++) {
            xf[h] = moecal_bf16_to_float(p->x[(size_t)t * H + h]);
            ax = fmaxf(ax, fabsf(xf[h]));
        }
        int nsel = route_token(p, all, xf, ld, lg, sel);
        for (int i = 0; i < nsel; i++) {
            int e = sel[i] - p->e0;
            if (e < 0 || e >= nloc)
                continue;
            r->tokens[e]++;
            r->amax_x[e] = fmaxf(r->amax_x[e], ax);
            if (r->amax_h)
                r->amax_h[e] = fmaxf(r->amax_h[e], expert_amax_h(p, e, xf));
        }
    }
    free(lg);
    free(ld);
    free(sel);
    free(xf);
}

moecal_backend *make_backend(const moecal_backend_ops *ops, const problem *p, bool all,
                             int threads, int64_t max_chunk)
{
    moecal_backend_config bc;
    moecal_backend *b = NULL;
    moecal_layer_weights w = {0};

    memset(&bc, 0, sizeof bc);
    bc.model = &p->cfg;
    bc.e0 = p->e0;
    bc.e1 = p->e1;
    bc.max_chunk_tokens = max_chunk;
    bc.all_experts = all;
    bc.router_logits = p->prec;
    bc.device = strcmp(ops->name, "cpu") == 0 ? -1 : 0;
    bc.threads = threads;
    if (ops->create(&bc, &b) != MOECAL_OK)
        fail_msg("%s create: %s", ops->name, moecal_error_message());
    assert_non_null(b);
    w.layer = 3;
    w.gate = p->gate;
    w.bias = p->bias;
    w.w1 = p->w1;
    w.w3 = p->w3;
    if (ops->load_layer(b, &w) != MOECAL_OK)
        fail_msg("%s load_layer: %s", ops->name, moecal_error_message());
    return b;
}

void merge(int nloc, result *r, const result *part)
{
    for (int e = 0; e < nloc; e++) {
        r->tokens[e] += part->tokens[e];
        r->amax_x[e] = fmaxf(r->amax_x[e], part->amax_x[e]);
        r->amax_h[e] = fmaxf(r->amax_h[e], part->amax_h[e]);
    }
}

/* Chunks submitted one ahead of the one being finished. */
static void run_ahead(const moecal_backend_ops *ops, moecal_backend *b, const problem *p,
                      int chunk, const uint8_t *skip, result *part, result *r)
{
    const int H = p->cfg.hidden_size, nch = (p->ntok + chunk - 1) / chunk;

    for (int c = 0; c <= nch; c++) {
        if (c < nch) {
            int t0 = c * chunk, n = p->ntok - t0 < chunk ? p->ntok - t0 : chunk;
            if (ops->submit_chunk(b, p->x + (size_t)t0 * H, n, skip ? skip + t0 : NULL) !=
                MOECAL_OK)
                fail_msg("%s submit_chunk: %s", ops->name, moecal_error_message());
        }
        if (c > 0) {
            moecal_chunk_stats st = {part->tokens, part->amax_x, part->amax_h};
            if (ops->finish_chunk(b, &st) != MOECAL_OK)
                fail_msg("%s finish_chunk: %s", ops->name, moecal_error_message());
            merge(p->e1 - p->e0, r, part);
        }
    }
}

void run_backend(const moecal_backend_ops *ops, const problem *p, bool all, int threads,
                 int chunk, bool ahead, result *r)
{
    int nloc = p->e1 - p->e0;
    moecal_backend *b = make_backend(ops, p, all, threads, chunk);
    result part = result_new(nloc);
    const int H = p->cfg.hidden_size;
    bool any_skip = false;
    double t[MOECAL_NPHASE];

    for (int i = 0; i < p->ntok; i++)
        any_skip |= p->skip[i] != 0;
    memset(r->tokens, 0, (size_t)nloc * sizeof(int64_t));
    memset(r->amax_x, 0, (size_t)nloc * sizeof(float));
    memset(r->amax_h, 0, (size_t)nloc * sizeof(float));
    /* no skip mask at all when nothing is skipped, as the driver does */
    if (ahead && ops->submit_chunk) {
        run_ahead(ops, b, p, chunk, any_skip ? p->skip : NULL, &part, r);
    } else {
        for (int t0 = 0; t0 < p->ntok; t0 += chunk) {
            int n = p->ntok - t0 < chunk ? p->ntok - t0 : chunk;
            moecal_chunk_stats st = {part.tokens, part.amax_x, part.amax_h};
            const uint8_t *sk = any_skip ? p->skip + t0 : NULL;
            if (ops->run_chunk(b, p->x + (size_t)t0 * H, n, sk, &st) != MOECAL_OK)
                fail_msg("%s run_chunk: %s", ops->name, moecal_error_message());
            merge(nloc, r, &part);
        }
    }
    ops->timings(b, t);
    for (int i = 0; i < MOECAL_NPHASE; i++)
        assert_true(t[i] >= 0.0);
    ops->destroy(b);
    result_free(&part);
}

void compare(const problem *p, bool all, const char *what, const result *got, const char *ref,
             const result *want)
{
    int nloc = p->e1 - p->e0;

    for (int e = 0; e < nloc; e++) {
        if (got->tokens[e] != want->tokens[e]) {
            result r = result_new(nloc);
            free(r.amax_h);
            r.amax_h = NULL;
            reference(p, all, &r);
            fail_msg("expert %d: %lld tokens from %s, %lld from %s, %lld in the route_math.h "
                     "reference", p->e0 + e, (long long)got->tokens[e], what,
                     (long long)want->tokens[e], ref, (long long)r.tokens[e]);
        }
        if (memcmp(&got->amax_x[e], &want->amax_x[e], sizeof(float)) != 0 &&
            !(isnan(got->amax_x[e]) && isnan(want->amax_x[e])))
            fail_msg("expert %d: amax_x %.9g from %s, %.9g from %s", p->e0 + e,
                     (double)got->amax_x[e], what, (double)want->amax_x[e], ref);
        if (want->tokens[e] == 0) {
            assert_true(got->amax_h[e] == 0.0f && want->amax_h[e] == 0.0f);
            continue;
        }
        double rel = fabs((double)got->amax_h[e] - want->amax_h[e]) / want->amax_h[e];
        if (!(rel <= 1e-2))
            fail_msg("expert %d: amax_h %.9g from %s, %.9g from %s", p->e0 + e,
                     (double)got->amax_h[e], what, (double)want->amax_h[e], ref);
    }
}

void same_bits(const problem *p, const result *a, const result *b)
{
    int n = p->e1 - p->e0;
    assert_memory_equal(a->tokens, b->tokens, (size_t)n * sizeof(int64_t));
    assert_memory_equal(a->amax_x, b->amax_x, (size_t)n * sizeof(float));
    assert_memory_equal(a->amax_h, b->amax_h, (size_t)n * sizeof(float));
}

void check_cold_and_one(const problem *p, bool all, const result *r)
{
    if (all)
        return;
    if (p->cold >= 0)
        assert_int_equal(r->tokens[p->cold - p->e0], 0);
    if (p->one >= 0)
        assert_int_equal(r->tokens[p->one - p->e0], p->skip[p->one_token] ? 0 : 1);
}
