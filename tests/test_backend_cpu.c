/* test_backend_cpu.c - the CPU backend against a naive per-token reference.
 *
 * The reference routes each token from route_math.h's logits, then
 * computes a and b of every selected local expert with plain double loops,
 * rounds them to bf16 and forms h as the model does.  Token counts and
 * amax(x) must match exactly; amax(h) within 1e-2 relative (the backend
 * accumulates in float32 in the BLAS's order).  The reference's logits are
 * route_math.h's definition, so routing must agree token for token, also
 * where a float32 GEMM would not (large cancelling terms).  Odd shapes, a local range in
 * the middle, a cold expert, a one-token expert, a hot expert spanning
 * several GEMM blocks, skipped rows, all-experts mode, and 1 vs 2 threads.
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "backend.h"
#include "fp8.h"
#include "route_math.h"
#include "router.h"

static uint64_t rng_state;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static double nrand(void)
{
    double u = urand() + 1e-12, v = urand();
    return sqrt(-2.0 * log(u)) * cos(6.283185307179586 * v);
}

typedef struct problem {
    moecal_model_config cfg;
    int e0, e1;
    int ntok;
    float *gate;      /* [E][H] */
    float *bias;      /* [E] or NULL */
    uint16_t *w1;     /* [nloc][I][H] */
    uint16_t *w3;
    uint16_t *x;      /* [ntok][H] */
    uint8_t *skip;    /* [ntok] */
    int cold, one, hot;  /* global expert ids, -1 if none */
    int one_token;
    int prec;         /* --router-logits (moecal_logit_prec); 0 = fp32 */
} problem;

typedef struct result {
    int64_t *tokens;
    float *amax_x, *amax_h;
} result;

static void *xcalloc(size_t n, size_t sz)
{
    void *p = calloc(n ? n : 1, sz);
    assert_non_null(p);
    return p;
}

static result result_new(int n)
{
    result r;
    r.tokens = xcalloc((size_t)n, sizeof(int64_t));
    r.amax_x = xcalloc((size_t)n, sizeof(float));
    r.amax_h = xcalloc((size_t)n, sizeof(float));
    return r;
}

static void result_free(result *r)
{
    free(r->tokens);
    free(r->amax_x);
    free(r->amax_h);
}

/* Channel 0 of x is 1 for every token and channel 1 marks one_token, so
 * gate rows can make an expert cold (never chosen), chosen by exactly one
 * token, or hot (chosen by every token). */
static void problem_make(problem *p, moecal_scoring sc, int E, int G, int TG, int k,
                         int H, int I, int e0, int e1, int ntok, uint64_t seed)
{
    memset(p, 0, sizeof *p);
    rng_state = seed;
    moecal_model_config *c = &p->cfg;
    c->family = sc == MOECAL_SCORING_SIGMOID ? MOECAL_FAMILY_DEEPSEEK_V3 : MOECAL_FAMILY_QWEN3_MOE;
    c->scoring = sc;
    c->hidden_size = H;
    c->moe_intermediate_size = I;
    c->n_routed_experts = E;
    c->num_experts_per_tok = k;
    c->n_group = G;
    c->topk_group = TG;
    c->norm_topk_prob = true;
    c->routed_scaling_factor = 1.0;
    c->has_correction_bias = sc == MOECAL_SCORING_SIGMOID;
    p->e0 = e0;
    p->e1 = e1;
    p->ntok = ntok;
    p->cold = e0 + 1 < e1 ? e0 + 1 : -1;
    p->one = e0 + 2 < e1 ? e1 - 1 : -1;
    p->hot = -1;
    p->one_token = ntok / 3;

    int nloc = e1 - e0;
    p->gate = xcalloc((size_t)E * H, sizeof(float));
    p->w1 = xcalloc((size_t)nloc * I * H, sizeof(uint16_t));
    p->w3 = xcalloc((size_t)nloc * I * H, sizeof(uint16_t));
    p->x = xcalloc((size_t)ntok * H, sizeof(uint16_t));
    p->skip = xcalloc((size_t)ntok, 1);
    if (c->has_correction_bias) {
        p->bias = xcalloc((size_t)E, sizeof(float));
        for (int e = 0; e < E; e++)
            p->bias[e] = (float)(0.05 * nrand());
    }
    for (int e = 0; e < E; e++) {
        for (int h = 2; h < H; h++)
            p->gate[(size_t)e * H + h] = (float)(0.1 * nrand() / sqrt(H));
    }
    /* logits of a few units from the random part; +-1000 saturate the
     * scores, and a bias of -1 keeps a zero sigmoid below every other s' */
    if (p->cold >= 0) {
        p->gate[(size_t)p->cold * H] = -1000.0f;
        if (p->bias)
            p->bias[p->cold] = -1.0f;
    }
    if (p->one >= 0) {
        p->gate[(size_t)p->one * H] = -1000.0f;
        p->gate[(size_t)p->one * H + 1] = 2000.0f;
        if (p->bias)
            p->bias[p->one] = -0.5f;
    }
    for (size_t i = 0; i < (size_t)nloc * I * H; i++) {
        p->w1[i] = moecal_float_to_bf16((float)(nrand() / sqrt(H)));
        p->w3[i] = moecal_float_to_bf16((float)(nrand() / sqrt(H)));
    }
    for (int t = 0; t < ntok; t++) {
        /* per-token scale spread, a few outlier channels */
        double s = exp(nrand());
        for (int h = 0; h < H; h++) {
            double v = nrand() * s * (h % 7 == 3 ? 20.0 : 1.0);
            p->x[(size_t)t * H + h] = moecal_float_to_bf16((float)v);
        }
        p->x[(size_t)t * H] = moecal_float_to_bf16(1.0f);
        p->x[(size_t)t * H + 1] = moecal_float_to_bf16(t == p->one_token ? 1.0f : 0.0f);
    }
}

static void problem_free(problem *p)
{
    free(p->gate);
    free(p->bias);
    free(p->w1);
    free(p->w3);
    free(p->x);
    free(p->skip);
}

static float bf(float v)
{
    return moecal_round_bf16(v);
}

/* The naive reference: per token, per selected local expert. */
static void reference(const problem *p, bool all, result *r)
{
    const moecal_model_config *c = &p->cfg;
    int E = c->n_routed_experts, H = c->hidden_size, I = c->moe_intermediate_size;
    int k = c->num_experts_per_tok, nloc = p->e1 - p->e0;
    float *lg = xcalloc((size_t)E, sizeof(float));
    double *ld = xcalloc((size_t)E, sizeof(double));
    int32_t *sel = xcalloc((size_t)E, sizeof(int32_t));
    float *xf = xcalloc((size_t)H, sizeof(float));

    for (int e = 0; e < nloc; e++) {
        r->tokens[e] = 0;
        r->amax_x[e] = 0.0f;
        r->amax_h[e] = 0.0f;
    }
    for (int t = 0; t < p->ntok; t++) {
        if (p->skip[t])
            continue;
        float ax = 0.0f;
        for (int h = 0; h < H; h++) {
            xf[h] = moecal_bf16_to_float(p->x[(size_t)t * H + h]);
            ax = fmaxf(ax, fabsf(xf[h]));
        }
        int nsel;
        if (all) {
            nsel = E;
            for (int e = 0; e < E; e++)
                sel[e] = e;
        } else {
            for (int e = 0; e < E; e++) {
                ld[e] = moecal_route_logit_fd(xf, p->gate + (size_t)e * H, (size_t)H);
                lg[e] = moecal_route_round(ld[e], p->prec);
            }
            if (p->prec == MOECAL_LOGITS_EXACT)
                assert_int_equal(moecal_router_select_d(c, ld, p->bias, 1, sel, NULL), MOECAL_OK);
            else
                assert_int_equal(moecal_router_select(c, lg, p->bias, 1, sel, NULL), MOECAL_OK);
            nsel = k;
        }
        for (int i = 0; i < nsel; i++) {
            int e = sel[i] - p->e0;
            if (e < 0 || e >= nloc)
                continue;
            r->tokens[e]++;
            r->amax_x[e] = fmaxf(r->amax_x[e], ax);
            for (int j = 0; j < I; j++) {
                const uint16_t *r1 = p->w1 + ((size_t)e * I + j) * H;
                const uint16_t *r3 = p->w3 + ((size_t)e * I + j) * H;
                double a = 0.0, b = 0.0;
                for (int h = 0; h < H; h++) {
                    a += (double)xf[h] * moecal_bf16_to_float(r1[h]);
                    b += (double)xf[h] * moecal_bf16_to_float(r3[h]);
                }
                float af = bf((float)a), bf3 = bf((float)b);
                float hv = bf(bf(af / (1.0f + expf(-af))) * bf3);
                r->amax_h[e] = fmaxf(r->amax_h[e], fabsf(hv));
            }
        }
    }
    free(lg);
    free(ld);
    free(sel);
    free(xf);
}

static moecal_backend *make_backend(const problem *p, bool all, int threads, int64_t maxtok)
{
    moecal_backend_config bc;
    moecal_backend *b = NULL;
    moecal_layer_weights w = {0};

    memset(&bc, 0, sizeof bc);
    bc.model = &p->cfg;
    bc.e0 = p->e0;
    bc.e1 = p->e1;
    bc.max_chunk_tokens = maxtok;
    bc.all_experts = all;
    bc.router_logits = p->prec;
    bc.device = -1;
    bc.threads = threads;
    assert_int_equal(moecal_backend_cpu.create(&bc, &b), MOECAL_OK);
    assert_non_null(b);
    w.layer = 3;
    w.gate = p->gate;
    w.bias = p->bias;
    w.w1 = p->w1;
    w.w3 = p->w3;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_OK);
    return b;
}

/* Run the problem in chunks of `chunk` tokens and merge as the driver does
 * (sum of counts, max of amax). */
static void run(const problem *p, bool all, int threads, int chunk, result *r)
{
    int nloc = p->e1 - p->e0;
    moecal_backend *b = make_backend(p, all, threads, chunk);
    result part = result_new(nloc);
    const int H = p->cfg.hidden_size;
    bool any_skip = false;

    for (int t = 0; t < p->ntok; t++)
        any_skip |= p->skip[t] != 0;
    for (int e = 0; e < nloc; e++) {
        r->tokens[e] = 0;
        r->amax_x[e] = 0.0f;
        r->amax_h[e] = 0.0f;
    }
    for (int t0 = 0; t0 < p->ntok; t0 += chunk) {
        int n = p->ntok - t0 < chunk ? p->ntok - t0 : chunk;
        moecal_chunk_stats st = {part.tokens, part.amax_x, part.amax_h};
        /* no skip mask at all when nothing is skipped, as the driver does */
        const uint8_t *sk = any_skip ? p->skip + t0 : NULL;
        assert_int_equal(moecal_backend_cpu.run_chunk(b, p->x + (size_t)t0 * H, n, sk, &st),
                         MOECAL_OK);
        for (int e = 0; e < nloc; e++) {
            r->tokens[e] += part.tokens[e];
            r->amax_x[e] = fmaxf(r->amax_x[e], part.amax_x[e]);
            r->amax_h[e] = fmaxf(r->amax_h[e], part.amax_h[e]);
        }
    }
    double t[MOECAL_NPHASE];
    moecal_backend_cpu.timings(b, t);
    for (int i = 0; i < MOECAL_NPHASE; i++)
        assert_true(t[i] >= 0.0);
    assert_true(t[MOECAL_PHASE_COPY] == 0.0); /* no device */
    moecal_backend_cpu.destroy(b);
    result_free(&part);
}

static void compare(const problem *p, const result *got, const result *want)
{
    for (int e = 0; e < p->e1 - p->e0; e++) {
        assert_int_equal(got->tokens[e], want->tokens[e]);
        assert_true(got->amax_x[e] == want->amax_x[e]);
        if (want->tokens[e] == 0) {
            assert_true(got->amax_h[e] == 0.0f);
            continue;
        }
        double rel = fabs((double)got->amax_h[e] - want->amax_h[e]) / want->amax_h[e];
        if (rel > 1e-2)
            fail_msg("expert %d: amax_h %.9g, reference %.9g", p->e0 + e,
                     (double)got->amax_h[e], (double)want->amax_h[e]);
    }
}

static void same_bits(const problem *p, const result *a, const result *b)
{
    int n = p->e1 - p->e0;
    assert_memory_equal(a->tokens, b->tokens, (size_t)n * sizeof(int64_t));
    assert_memory_equal(a->amax_x, b->amax_x, (size_t)n * sizeof(float));
    assert_memory_equal(a->amax_h, b->amax_h, (size_t)n * sizeof(float));
}

static void check_problem(problem *p, bool all)
{
    int nloc = p->e1 - p->e0;
    result want = result_new(nloc), one = result_new(nloc), two = result_new(nloc);
    result chunked = result_new(nloc);

    reference(p, all, &want);
    run(p, all, 1, p->ntok, &one);
    compare(p, &one, &want);
    run(p, all, 2, p->ntok, &two);
    same_bits(p, &one, &two);
    /* odd chunking: counts and amax(x) exact, amax(h) within GEMM rounding */
    run(p, all, 2, 77, &chunked);
    compare(p, &chunked, &want);
    assert_memory_equal(chunked.tokens, one.tokens, (size_t)nloc * sizeof(int64_t));
    assert_memory_equal(chunked.amax_x, one.amax_x, (size_t)nloc * sizeof(float));

    if (!all) {
        if (p->cold >= 0)
            assert_int_equal(want.tokens[p->cold - p->e0], 0);
        if (p->one >= 0)
            assert_int_equal(want.tokens[p->one - p->e0], p->skip[p->one_token] ? 0 : 1);
    }
    result_free(&want);
    result_free(&one);
    result_free(&two);
    result_free(&chunked);
}

static void test_deepseek_odd_shapes(void **state)
{
    (void)state;
    problem p;
    /* E 12 in 4 groups, keep 2, k 3; H 37, I 19; local experts [3, 9) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 301, 11);
    check_problem(&p, false);
    problem_free(&p);
}

static void test_hot_expert_spans_blocks(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 1100, 12);
    /* expert 5 gets every token through its bias: 1100 rows, 3 GEMM blocks */
    p.bias[5] = 10.0f;
    p.one = -1;   /* the hot group may crowd out the one-token expert's group */
    check_problem(&p, false);
    problem_free(&p);
}

static void test_cancellation_routing(void **state)
{
    (void)state;
    problem p;
    enum { HH = 1100 }; /* three blocks of route_math.h's sum, the last partial */
    /* Every token carries +-512 on channels 4 and 5, which every gate row
     * weighs equally: the products cancel exactly, and the logit is the
     * small rest.  A float32 GEMM (or any other order) loses low bits of the
     * rest to the large partial sums and flips close choices; the logits of
     * route_math.h (double, ascending h) keep them, and the reference's
     * selection must be met token for token. */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 4, HH, 8, 0, 16, 2000, 13);
    p.cold = p.one = -1;
    for (int e = 0; e < 16; e++) {
        p.gate[(size_t)e * HH] = (float)(0.1 * nrand());
        p.gate[(size_t)e * HH + 1] = (float)(0.1 * nrand());
        p.gate[(size_t)e * HH + 4] = p.gate[(size_t)e * HH + 5] = 3.0f + (float)e / 64.0f;
    }
    for (int t = 0; t < p.ntok; t++) {
        p.x[(size_t)t * HH + 4] = moecal_float_to_bf16(512.0f);
        p.x[(size_t)t * HH + 5] = moecal_float_to_bf16(-512.0f);
    }
    check_problem(&p, false);
    problem_free(&p);
}

/* Every --router-logits precision against the reference at that precision;
 * bf16 must route some tokens differently from fp32 (else the option would
 * be untested), and equal router rows (exact ties at every precision) go to
 * the lower expert. */
static void test_logit_precisions(void **state)
{
    (void)state;
    for (int fam = 0; fam < 2; fam++) {
        result r[3];
        problem p;
        for (int prec = 0; prec < 3; prec++) {
            if (fam == 0)
                problem_make(&p, MOECAL_SCORING_SOFTMAX, 16, 1, 1, 4, 70, 12, 0, 16, 900, 21);
            else
                problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 4, 70, 12, 0, 16, 4000, 21);
            p.cold = p.one = -1;
            p.prec = prec;
            /* experts 3 and 9 share a router row */
            memcpy(p.gate + 9 * 70, p.gate + 3 * 70, 70 * sizeof(float));
            check_problem(&p, false);
            r[prec] = result_new(16);
            run(&p, false, 2, 300, &r[prec]);
            assert_true(r[prec].tokens[9] <= r[prec].tokens[3]);
            problem_free(&p);
        }
        bool differ = false;
        for (int e = 0; e < 16; e++)
            differ |= r[MOECAL_LOGITS_BF16].tokens[e] != r[MOECAL_LOGITS_FP32].tokens[e];
        if (!differ)
            fail_msg("family %d: bf16 logits routed every token as fp32 logits did", fam);
        for (int prec = 0; prec < 3; prec++)
            result_free(&r[prec]);
    }
}

static void test_softmax_k1_and_kE(void **state)
{
    (void)state;
    problem p;
    /* E 13 (prime: no even split over ranks), k 1 */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 1, 45, 23, 4, 11, 257, 13);
    check_problem(&p, false);
    problem_free(&p);
    /* k = E: every token reaches every expert through the router */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 13, 45, 23, 0, 13, 90, 14);
    p.cold = p.one = -1;
    check_problem(&p, false);
    problem_free(&p);
}

static void test_skip_rows(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 301, 15);
    /* skipped rows hold NaN and huge values: they must not be read */
    for (int t = 0; t < p.ntok; t += 5) {
        p.skip[t] = 1;
        p.x[(size_t)t * 37 + 4] = 0x7fc0;                     /* NaN */
        p.x[(size_t)t * 37 + 5] = moecal_float_to_bf16(1e30f);
    }
    p.skip[p.one_token] = 1;
    check_problem(&p, false);
    check_problem(&p, true);
    /* every row skipped */
    memset(p.skip, 1, (size_t)p.ntok);
    check_problem(&p, false);
    problem_free(&p);
}

static void test_all_experts(void **state)
{
    (void)state;
    problem p;
    /* 1100 tokens: every expert's rows span three GEMM blocks */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 5, 8, 1100, 16);
    check_problem(&p, true);
    problem_free(&p);
}

static void test_empty_range_and_chunk(void **state)
{
    (void)state;
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 4, 4, 50, 17);
    moecal_backend *b = make_backend(&p, false, 2, 64);
    moecal_chunk_stats st = {NULL, NULL, NULL};
    assert_int_equal(moecal_backend_cpu.run_chunk(b, p.x, 50, NULL, &st), MOECAL_OK);
    moecal_backend_cpu.destroy(b);
    problem_free(&p);

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 0, 12, 50, 18);
    b = make_backend(&p, false, 2, 64);
    result r = result_new(12);
    moecal_chunk_stats s2 = {r.tokens, r.amax_x, r.amax_h};
    assert_int_equal(moecal_backend_cpu.run_chunk(b, p.x, 0, NULL, &s2), MOECAL_OK);
    for (int e = 0; e < 12; e++)
        assert_int_equal(r.tokens[e], 0);
    /* more tokens than the configured chunk is an error, not an overflow */
    assert_int_not_equal(moecal_backend_cpu.run_chunk(b, p.x, 65, NULL, &s2), MOECAL_OK);
    moecal_backend_cpu.destroy(b);
    result_free(&r);
    problem_free(&p);
}

static void test_nonfinite_weights_refused(void **state)
{
    (void)state;
    problem p;
    moecal_backend_config bc;
    moecal_backend *b = NULL;
    moecal_layer_weights w = {0};

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 10, 19);
    memset(&bc, 0, sizeof bc);
    bc.model = &p.cfg;
    bc.e0 = 3;
    bc.e1 = 9;
    bc.max_chunk_tokens = 16;
    bc.threads = 2;
    assert_int_equal(moecal_backend_cpu.create(&bc, &b), MOECAL_OK);
    w.layer = 7;
    w.gate = p.gate;
    w.bias = p.bias;
    w.w1 = p.w1;
    w.w3 = p.w3;

    uint16_t saved = p.w3[(size_t)2 * 19 * 37 + 5 * 37 + 6];
    p.w3[(size_t)2 * 19 * 37 + 5 * 37 + 6] = 0xffc1;          /* NaN in expert 5 */
    p.w1[(size_t)4 * 19 * 37] = 0x7f80;                      /* Inf in expert 7 */
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_ERR_NONFINITE);
    assert_non_null(strstr(moecal_error_message(), "expert 5 up_proj (w3) [5, 6] is NaN"));
    /* refused layer: no chunk may run on it */
    moecal_chunk_stats st = {NULL, NULL, NULL};
    assert_int_not_equal(moecal_backend_cpu.run_chunk(b, p.x, 1, NULL, &st), MOECAL_OK);
    p.w3[(size_t)2 * 19 * 37 + 5 * 37 + 6] = saved;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_ERR_NONFINITE);
    assert_non_null(strstr(moecal_error_message(), "expert 7 gate_proj (w1) [0, 0] is Inf"));
    p.w1[(size_t)4 * 19 * 37] = 0;

    p.gate[40] = NAN;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_ERR_NONFINITE);
    p.gate[40] = 0.0f;
    p.bias[2] = INFINITY;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_ERR_NONFINITE);
    p.bias[2] = 0.0f;
    w.bias = NULL;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_ERR_MISMATCH);
    w.bias = p.bias;
    assert_int_equal(moecal_backend_cpu.load_layer(b, &w), MOECAL_OK);
    moecal_backend_cpu.destroy(b);
    problem_free(&p);
}

static void test_bad_config(void **state)
{
    (void)state;
    problem p;
    moecal_backend_config bc;
    moecal_backend *b = (moecal_backend *)&bc;

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 10, 20);
    memset(&bc, 0, sizeof bc);
    bc.model = &p.cfg;
    bc.e0 = 3;
    bc.e1 = 13;
    bc.max_chunk_tokens = 16;
    assert_int_not_equal(moecal_backend_cpu.create(&bc, &b), MOECAL_OK);
    assert_null(b);
    bc.e1 = 9;
    bc.max_chunk_tokens = 0;
    assert_int_not_equal(moecal_backend_cpu.create(&bc, &b), MOECAL_OK);
    bc.max_chunk_tokens = 16;
    p.cfg.n_group = 5;
    assert_int_not_equal(moecal_backend_cpu.create(&bc, &b), MOECAL_OK);
    moecal_backend_cpu.destroy(NULL);
    problem_free(&p);
}

static void test_registry(void **state)
{
    (void)state;
    assert_ptr_equal(moecal_backend_find("cpu"), &moecal_backend_cpu);
    assert_null(moecal_backend_find("tpu"));
    assert_null(moecal_backend_find(NULL));
    assert_non_null(moecal_backend_auto());
    assert_ptr_equal(moecal_backend_find("auto"), moecal_backend_auto());
#ifdef HAVE_CUDA
    assert_ptr_equal(moecal_backend_find("cuda"), &moecal_backend_cuda);
#else
    assert_null(moecal_backend_find("cuda"));
    assert_ptr_equal(moecal_backend_auto(), &moecal_backend_cpu);
#endif
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek_odd_shapes),
        cmocka_unit_test(test_hot_expert_spans_blocks),
        cmocka_unit_test(test_cancellation_routing),
        cmocka_unit_test(test_softmax_k1_and_kE),
        cmocka_unit_test(test_logit_precisions),
        cmocka_unit_test(test_skip_rows),
        cmocka_unit_test(test_all_experts),
        cmocka_unit_test(test_empty_range_and_chunk),
        cmocka_unit_test(test_nonfinite_weights_refused),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_registry),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
