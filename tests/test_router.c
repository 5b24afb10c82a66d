/* test_router.c - expert selection: hand-computed cases and a randomized
 * comparison with a naive full-sort router written here independently. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "route_math.h"
#include "router.h"

static moecal_model_config deepseek(int E, int G, int TG, int k)
{
    moecal_model_config c;
    memset(&c, 0, sizeof c);
    c.family = MOECAL_FAMILY_DEEPSEEK_V3;
    c.scoring = MOECAL_SCORING_SIGMOID;
    c.n_routed_experts = E;
    c.num_experts_per_tok = k;
    c.n_group = G;
    c.topk_group = TG;
    c.norm_topk_prob = true;
    c.routed_scaling_factor = 2.5;
    c.has_correction_bias = true;
    c.hidden_size = 16;
    c.moe_intermediate_size = 8;
    return c;
}

static moecal_model_config softmax_cfg(moecal_family fam, int E, int k, bool norm)
{
    moecal_model_config c;
    memset(&c, 0, sizeof c);
    c.family = fam;
    c.scoring = MOECAL_SCORING_SOFTMAX;
    c.n_routed_experts = E;
    c.num_experts_per_tok = k;
    c.n_group = 1;
    c.topk_group = 1;
    c.norm_topk_prob = norm;
    c.routed_scaling_factor = 1.0;
    c.hidden_size = 16;
    c.moe_intermediate_size = 8;
    return c;
}

static float sig(float x)
{
    return 1.0f / (1.0f + expf(-x));
}

static void route1(const moecal_model_config *c, const float *l, const float *bias,
                   int32_t *sel, float *w)
{
    assert_int_equal(moecal_router_select(c, l, bias, 1, sel, w), MOECAL_OK);
}

/* E=8 in 4 groups of 2, keep 2 groups, k=2. */
static const float ds_logits[8] = {2.0f, -1.0f, 0.5f, 0.4f, 1.0f, 0.9f, -2.0f, -3.0f};

static void test_deepseek_group_excludes_global_best(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 2, 2);
    const float zero[8] = {0};
    int32_t sel[2];
    float w[2];

    /* s = .881 .269 | .622 .599 | .731 .711 | .119 .047: group sums
     * 1.150, 1.221, 1.442, 0.166 keep groups 2 and 1, so expert 0, the
     * best single expert, is masked out: top-2 of {2,3,4,5} is {4,5}. */
    route1(&c, ds_logits, zero, sel, w);
    assert_int_equal(sel[0], 4);
    assert_int_equal(sel[1], 5);
    float s4 = sig(1.0f), s5 = sig(0.9f);
    float d = s4 + s5 + 1e-20f;
    assert_float_equal(w[0], s4 / d * 2.5f, 1e-6);
    assert_float_equal(w[1], s5 / d * 2.5f, 1e-6);

    /* without groups (n_group 1) the plain top-2 is {0, 4} */
    c.n_group = 1;
    c.topk_group = 1;
    route1(&c, ds_logits, zero, sel, w);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 4);

    /* topk_group == n_group keeps everything: the same as no groups */
    c.n_group = 4;
    c.topk_group = 4;
    route1(&c, ds_logits, zero, sel, w);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 4);
}

static void test_deepseek_bias_changes_choice(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 2, 2);
    const float bias[8] = {0, 0, 0, 0, 0, 0, 0.9f, 0.9f};
    int32_t sel[2];
    float w[2];

    /* s' of group 3 = 1.019 + 0.947: groups 3 and 2 kept; s' 6 > 7 > 4 */
    route1(&c, ds_logits, bias, sel, w);
    assert_int_equal(sel[0], 6);
    assert_int_equal(sel[1], 7);
    /* weights come from s, not s' */
    float s6 = sig(-2.0f), s7 = sig(-3.0f);
    float d = s6 + s7 + 1e-20f;
    assert_float_equal(w[0], s6 / d * 2.5f, 1e-6);
    assert_float_equal(w[1], s7 / d * 2.5f, 1e-6);

    /* not normalized: weights are s times the scaling factor */
    c.norm_topk_prob = false;
    route1(&c, ds_logits, bias, sel, w);
    assert_float_equal(w[0], s6 * 2.5f, 1e-6);
    assert_float_equal(w[1], s7 * 2.5f, 1e-6);
}

/* All s' negative: masking to -inf keeps the choice inside the kept groups
 * (masking to 0.0 would pick masked experts instead). */
static void test_deepseek_negative_scores_masked_to_minus_inf(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 2, 2);
    float bias[8];
    int32_t sel[2];

    for (int i = 0; i < 8; i++)
        bias[i] = -2.0f;
    route1(&c, ds_logits, bias, sel, NULL);
    assert_int_equal(sel[0], 4);
    assert_int_equal(sel[1], 5);
}

/* k larger than the kept experts: the rest are -inf, lowest index first. */
static void test_deepseek_k_exceeds_kept_groups(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 1, 3);
    const float zero[8] = {0};
    int32_t sel[3];

    /* group 2 {4,5} is the best; the third pick is expert 0, the lowest
     * masked index, not 2 (the best masked score) */
    route1(&c, ds_logits, zero, sel, NULL);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 4);
    assert_int_equal(sel[2], 5);
}

static void test_deepseek_no_bias_group_max(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 1, 2);
    /* group 0 = {.95, .05}: max .95 beats group 1 {.8, .8} (top-2 sum would
     * pick group 1) */
    const float l[8] = {3.0f, -3.0f, 1.4f, 1.4f, -1, -1, -1, -1};
    int32_t sel[2];

    c.has_correction_bias = false;
    route1(&c, l, NULL, sel, NULL);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 1);
    const float zero[8] = {0};
    route1(&c, l, zero, sel, NULL);
    assert_int_equal(sel[0], 2);
    assert_int_equal(sel[1], 3);
}

static void test_softmax_topk(void **state)
{
    (void)state;
    const float l[6] = {0.5f, 3.0f, 2.0f, -1.0f, 2.5f, 0.0f};
    int32_t sel[2];
    float w[2];

    moecal_model_config c = softmax_cfg(MOECAL_FAMILY_MIXTRAL, 6, 2, false);
    route1(&c, l, NULL, sel, w);
    assert_int_equal(sel[0], 1);
    assert_int_equal(sel[1], 4);
    /* Mixtral always renormalizes */
    float e1 = expf(0.0f), e4 = expf(-0.5f);
    assert_float_equal(w[0], e1 / (e1 + e4), 1e-6);
    assert_float_equal(w[1], e4 / (e1 + e4), 1e-6);

    /* Qwen3 without norm_topk_prob: the plain softmax probabilities */
    c = softmax_cfg(MOECAL_FAMILY_QWEN3_MOE, 6, 2, false);
    route1(&c, l, NULL, sel, w);
    double sum = 0;
    for (int i = 0; i < 6; i++)
        sum += exp((double)l[i] - 3.0);
    assert_float_equal(w[0], 1.0 / sum, 1e-6);
    assert_float_equal(w[1], exp(-0.5) / sum, 1e-6);
    c.norm_topk_prob = true;
    route1(&c, l, NULL, sel, w);
    assert_float_equal(w[0] + w[1], 1.0, 1e-6);
}

static void test_ties_lower_index(void **state)
{
    (void)state;
    const float l[6] = {1.0f, 2.0f, 2.0f, 0.0f, 2.0f, 2.0f};
    int32_t sel[3];

    moecal_model_config c = softmax_cfg(MOECAL_FAMILY_QWEN3_MOE, 6, 3, true);
    route1(&c, l, NULL, sel, NULL);
    assert_int_equal(sel[0], 1);
    assert_int_equal(sel[1], 2);
    assert_int_equal(sel[2], 4);

    c = deepseek(6, 1, 1, 3);
    c.has_correction_bias = false;
    route1(&c, l, NULL, sel, NULL);
    assert_int_equal(sel[0], 1);
    assert_int_equal(sel[1], 2);
    assert_int_equal(sel[2], 4);

    /* equal group scores: the lower group wins */
    const float flat[8] = {0};
    c = deepseek(8, 4, 2, 2);
    route1(&c, flat, flat, sel, NULL);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 1);
}

/* --router-logits bf16 rounds the double sum once: against frexp/ldexp
 * arithmetic written here, on random doubles of every magnitude, and on the
 * cases a second rounding (through float32) gets wrong. */
static double urand(void);

static float ref_bf16(double v)
{
    int e;
    if (v != v || v == 0.0 || isinf(v))
        return (float)v;
    (void)frexp(v, &e);                 /* v = m 2^e, 0.5 <= |m| < 1 */
    int q = e - 8 < -133 ? -133 : e - 8;  /* 8 significant bits, subnormals */
    double r = nearbyint(ldexp(v, -q)); /* exact scaling, round half to even */
    return (float)ldexp(r, q);          /* inf past bf16's (float's) range */
}

static void test_round_bf16(void **state)
{
    (void)state;
    for (int i = 0; i < 2000000; i++) {
        double v = (urand() * 2.0 - 1.0) * ldexp(1.0, (int)(urand() * 290.0) - 150);
        if (i % 4 == 0) /* exactly on or next to a bf16 midpoint */
            v = ((double)ref_bf16(v) + ldexp(fabs((double)ref_bf16(v)), -9)) *
                (1.0 + (double)((i / 4) % 3 - 1) * 0x1p-52);
        float got = moecal_rm_round_bf16(v), want = ref_bf16(v);
        if (memcmp(&got, &want, sizeof got) != 0)
            fail_msg("round_bf16(%a) = %a, want %a", v, (double)got, (double)want);
        uint32_t bits;
        memcpy(&bits, &got, sizeof bits);
        if (!isinf(got))
            assert_int_equal(bits & 0xffffu, 0); /* a bf16 value */
    }
    /* double rounding: (float) lands on the midpoint 1 + 2^-8, which rounds
     * to even (1.0); the single rounding of the value above it goes up */
    double v = 1.0 + 0x1p-8 + 0x1p-30;
    assert_true(moecal_rm_round_bf16(v) == 1.0f + 0x1p-7f);
    assert_true(moecal_rm_round_bf16((double)(float)v) == 1.0f);
    assert_true(moecal_rm_round_bf16(1.0 + 0x1p-8) == 1.0f);                  /* tie: even */
    assert_true(moecal_rm_round_bf16(1.0 + 0x1p-7 + 0x1p-8) == 1.0f + 0x1p-6f); /* tie: even */
    assert_true(moecal_rm_round_bf16(-(1.0 + 0x1p-8 + 0x1p-40)) == -(1.0f + 0x1p-7f));
    assert_true(moecal_rm_round_bf16(0x1.ffp127) == INFINITY);
    assert_true(moecal_rm_round_bf16(0x1.feffffp127) == 0x1.fep127f);
    assert_true(moecal_rm_round_bf16(-1e300) == -INFINITY);
    assert_true(moecal_rm_round_bf16(0x1p-134) == 0.0f);           /* tie: even (0) */
    assert_true(moecal_rm_round_bf16(0x1.8p-133) == 0x1p-132f);    /* tie: even */
    assert_true(isnan(moecal_rm_round_bf16(NAN)));
    assert_true(moecal_route_round(v, MOECAL_LOGITS_FP32) == (float)v);
    assert_true(moecal_route_round(v, MOECAL_LOGITS_BF16) == 1.0f + 0x1p-7f);
}

/* The double exp of the exact precision: close to expl everywhere. */
static void test_route_exp(void **state)
{
    (void)state;
    double worst = 0.0;
    for (int i = 0; i < 200000; i++) {
        double x = urand() * 1400.0 - 700.0;
        if (i % 2)
            x = urand() * 40.0 - 20.0;
        long double want = expl((long double)x);
        double got = moecal_route_exp(x);
        double rel = (double)fabsl(((long double)got - want) / want);
        worst = rel > worst ? rel : worst;
    }
    if (worst > 4e-16)
        fail_msg("moecal_route_exp: relative error up to %g", worst);
    assert_true(moecal_route_exp(0.0) == 1.0);
    assert_true(moecal_route_exp(710.0) == INFINITY);
    assert_true(moecal_route_exp(-746.0) == 0.0);
    assert_true(moecal_route_exp(-740.0) > 0.0); /* subnormal */
    assert_true(isnan(moecal_route_exp(NAN)));
}

/* Equal router rows give equal logits at every precision: the lower expert
 * index wins the k-th place, and the lower group a tied group score, in the
 * float and the double router alike. */
static void test_ties_equal_rows(void **state)
{
    (void)state;
    enum { E = 8, H = 40 };
    float g[E][H];
    uint16_t x[H];
    for (int h = 0; h < H; h++) {
        float v = (float)(urand() * 2.0 - 1.0);
        uint32_t u;
        memcpy(&u, &v, sizeof u);
        x[h] = (uint16_t)(u >> 16);
        for (int e = 0; e < E; e++)
            g[e][h] = (float)(urand() * 0.2 - 0.1);
    }
    /* experts 1, 4, 6 share a row (the best), 3 and 5 share the next best */
    for (int h = 0; h < H; h++) {
        g[4][h] = g[6][h] = g[1][h] = fabsf(g[1][h]) * (float)(x[h] & 0x8000 ? -1 : 1);
        g[5][h] = g[3][h] = 0.5f * g[1][h];
    }
    for (int prec = 0; prec < 3; prec++) {
        float lf[E];
        double ld[E];
        int32_t sel[4], seld[4];
        for (int e = 0; e < E; e++) {
            const float *ge = g[e];
            float xf[H];
            for (int h = 0; h < H; h++)
                xf[h] = moecal_rm_bf16(x[h]);
            ld[e] = moecal_route_logit_fd(xf, ge, H);
            lf[e] = moecal_route_round(ld[e], prec);
        }
        assert_true(lf[1] == lf[4] && lf[4] == lf[6] && lf[3] == lf[5]);
        moecal_model_config c = softmax_cfg(MOECAL_FAMILY_QWEN3_MOE, E, 4, true);
        route1(&c, lf, NULL, sel, NULL);
        assert_int_equal(moecal_router_select_d(&c, ld, NULL, 1, seld, NULL), MOECAL_OK);
        /* 1, 4, 6 then the lower of 3 and 5 */
        assert_int_equal(sel[0], 1);
        assert_int_equal(sel[1], 3);
        assert_int_equal(sel[2], 4);
        assert_int_equal(sel[3], 6);
        assert_memory_equal(sel, seld, sizeof sel);
        /* groups {0,1} {2,3} {4,5} {6,7}, one kept: {4,5} and {6,7} hold the
         * same two logits, the others less; the lower group wins */
        c = deepseek(E, 4, 1, 2);
        float lg[E] = {-5, -5, -5, -5, lf[1], lf[3], lf[1], lf[3]};
        double lgd[E] = {-5, -5, -5, -5, ld[1], ld[3], ld[1], ld[3]};
        const float zero[E] = {0};
        route1(&c, lg, zero, sel, NULL);
        assert_int_equal(moecal_router_select_d(&c, lgd, zero, 1, seld, NULL), MOECAL_OK);
        assert_int_equal(sel[0], 4);
        assert_int_equal(sel[1], 5);
        assert_memory_equal(sel, seld, 2 * sizeof sel[0]);
    }
}

static void test_k_equals_e(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 4, 2, 8);
    const float zero[8] = {0};
    int32_t sel[8];
    float w[8];

    route1(&c, ds_logits, zero, sel, w);
    float sum = 0;
    for (int i = 0; i < 8; i++) {
        assert_int_equal(sel[i], i);
        sum += w[i];
    }
    assert_float_equal(sum, 2.5f, 1e-5);

    c = softmax_cfg(MOECAL_FAMILY_MIXTRAL, 8, 8, true);
    route1(&c, ds_logits, NULL, sel, w);
    for (int i = 0; i < 8; i++)
        assert_int_equal(sel[i], i);
}

static void test_nan_competes_as_minus_inf(void **state)
{
    (void)state;
    /* NaN scores tie with -inf: the lowest NaN index fills the last slot */
    const float l[4] = {NAN, 1.0f, -1.0f, NAN};
    int32_t sel[3];

    moecal_model_config c = deepseek(4, 1, 1, 3);
    const float zero[4] = {0};
    route1(&c, l, zero, sel, NULL);
    assert_int_equal(sel[0], 0);
    assert_int_equal(sel[1], 1);
    assert_int_equal(sel[2], 2);
}

/* route_math.h's exp against expl (64-bit significand) rounded to float,
 * every 331st float of [-104, 89] and the edges: the result must be the
 * correctly rounded one (the routers of both backends compare these bits). */
static void test_route_expf(void **state)
{
    (void)state;
    union { float f; uint32_t u; } lo = {-104.0f}, hi = {89.0f}, v;
    long n = 0, bad = 0;

    /* negative floats: bit patterns from -0 up to -104 */
    for (uint32_t u = 0x80000000u; u <= lo.u; u += 331) {
        v.u = u;
        float want = (float)expl((long double)v.f), got = moecal_route_expf(v.f);
        bad += memcmp(&want, &got, sizeof got) != 0;
        n++;
    }
    for (uint32_t u = 0; u <= hi.u; u += 331) {
        v.u = u;
        float want = (float)expl((long double)v.f), got = moecal_route_expf(v.f);
        bad += memcmp(&want, &got, sizeof got) != 0;
        n++;
    }
    if (bad != 0)
        fail_msg("moecal_route_expf: %ld of %ld results are not the correctly rounded exp",
                 bad, n);
    assert_true(n > 6000000);
    assert_true(isnan(moecal_route_expf(NAN)));
    assert_true(moecal_route_expf(INFINITY) == INFINITY);
    assert_true(moecal_route_expf(-INFINITY) == 0.0f);
    assert_true(moecal_route_expf(0.0f) == 1.0f);
    assert_true(moecal_route_expf(88.8f) == INFINITY);       /* > FLT_MAX */
    assert_true(moecal_route_expf(-103.5f) > 0.0f);          /* subnormal */
    assert_true(moecal_route_expf(-104.5f) == 0.0f);
    assert_true(moecal_route_expf(-100.0f) == (float)expl(-100.0L));
}

/* The logit: double products of bf16 x float are exact, so the result does
 * not depend on fma contraction; summation starts from +0.0. */
static void test_route_logit(void **state)
{
    (void)state;
    uint16_t x[5] = {0x3f80, 0xbf80, 0x4000, 0x0000, 0x8000}; /* 1, -1, 2, 0, -0 */
    float xf[5] = {1.0f, -1.0f, 2.0f, 0.0f, -0.0f};
    float g[5] = {0.1f, 0.1f, 3.0e-8f, 5.0f, 5.0f};
    float l = moecal_route_logit(x, g, 5);
    assert_true(l == (float)(2.0 * (double)3.0e-8f));
    assert_memory_equal(&l, &(float){moecal_route_logit_f(xf, g, 5)}, sizeof l);
    /* an exactly cancelling sum is +0, never -0 */
    float z = moecal_route_logit(x, g, 2);
    assert_true(z == 0.0f && !signbit(z));
}

static void test_bad_config(void **state)
{
    (void)state;
    moecal_model_config c = deepseek(8, 3, 2, 2);
    float l[8] = {0};
    int32_t sel[2];

    assert_int_not_equal(moecal_router_select(&c, l, NULL, 1, sel, NULL), MOECAL_OK);
    c = deepseek(8, 4, 5, 2);
    assert_int_not_equal(moecal_router_check(&c), MOECAL_OK);
    c = deepseek(8, 4, 2, 9);
    assert_int_not_equal(moecal_router_check(&c), MOECAL_OK);
    c = deepseek(8, 4, 2, 0);
    assert_int_not_equal(moecal_router_check(&c), MOECAL_OK);
    assert_int_not_equal(moecal_router_check(NULL), MOECAL_OK);
}

/* ------------------------------------------------------------------ naive */

typedef struct vi {
    float v;
    int i;
} vi;

/* descending value, NaN last, then ascending index */
static int cmp_vi(const void *pa, const void *pb)
{
    const vi *a = pa, *b = pb;
    int an = a->v != a->v, bn = b->v != b->v;
    if (an != bn)
        return an - bn;
    if (!an && a->v != b->v)
        return a->v > b->v ? -1 : 1;
    return a->i - b->i;
}

static int cmp_int(const void *pa, const void *pb)
{
    int a = *(const int32_t *)pa, b = *(const int32_t *)pb;
    return (a > b) - (a < b);
}

static void naive_route(const moecal_model_config *c, const float *l, const float *bias,
                        int32_t *sel, float *w)
{
    int E = c->n_routed_experts, G = c->n_group, k = c->num_experts_per_tok;
    int gsz = E / G;
    vi *all = malloc(sizeof(vi) * (size_t)E), *grp = malloc(sizeof(vi) * (size_t)G);
    float *score = malloc(sizeof(float) * (size_t)E);
    char *keep = calloc((size_t)G, 1);
    float m = l[0], sum = 0;

    assert_non_null(all);
    assert_non_null(grp);
    assert_non_null(score);
    assert_non_null(keep);
    if (c->scoring == MOECAL_SCORING_SOFTMAX) {
        for (int j = 1; j < E; j++)
            m = l[j] > m ? l[j] : m;
        for (int j = 0; j < E; j++) {
            score[j] = expf(l[j] - m);
            sum += score[j];
        }
        for (int j = 0; j < E; j++)
            score[j] /= sum;
    } else {
        for (int j = 0; j < E; j++)
            score[j] = sig(l[j]);
    }
    for (int j = 0; j < E; j++) {
        all[j].v = bias ? score[j] + bias[j] : score[j];
        all[j].i = j;
    }
    if (G > 1 && c->topk_group < G) {
        for (int g = 0; g < G; g++) {
            vi *part = malloc(sizeof(vi) * (size_t)gsz);
            assert_non_null(part);
            memcpy(part, all + g * gsz, sizeof(vi) * (size_t)gsz);
            qsort(part, (size_t)gsz, sizeof(vi), cmp_vi);
            grp[g].v = (bias && gsz > 1) ? part[0].v + part[1].v : part[0].v;
            grp[g].i = g;
            free(part);
        }
        qsort(grp, (size_t)G, sizeof(vi), cmp_vi);
        for (int g = 0; g < c->topk_group; g++)
            keep[grp[g].i] = 1;
        for (int j = 0; j < E; j++) {
            if (!keep[j / gsz])
                all[j].v = -INFINITY;
        }
    }
    qsort(all, (size_t)E, sizeof(vi), cmp_vi);
    for (int i = 0; i < k; i++)
        sel[i] = all[i].i;
    qsort(sel, (size_t)k, sizeof(int32_t), cmp_int);
    double ws = 0;
    for (int i = 0; i < k; i++) {
        w[i] = score[sel[i]];
        ws += w[i];
    }
    bool norm = c->norm_topk_prob || c->family == MOECAL_FAMILY_MIXTRAL;
    for (int i = 0; i < k; i++)
        w[i] = (float)((norm ? w[i] / ws : w[i]) * c->routed_scaling_factor);
    free(all);
    free(grp);
    free(score);
    free(keep);
}

static uint64_t rng_state = 0x9e3779b97f4a7c15ull;

static double urand(void)
{
    rng_state ^= rng_state << 13;
    rng_state ^= rng_state >> 7;
    rng_state ^= rng_state << 17;
    return (double)(rng_state >> 11) / 9007199254740992.0;
}

static void compare_random(const moecal_model_config *c, int ntok, bool with_bias,
                           bool coarse)
{
    int E = c->n_routed_experts, k = c->num_experts_per_tok;
    float *l = malloc(sizeof(float) * (size_t)ntok * (size_t)E);
    float *bias = malloc(sizeof(float) * (size_t)E);
    int32_t *sel = malloc(sizeof(int32_t) * (size_t)ntok * (size_t)k);
    float *w = malloc(sizeof(float) * (size_t)ntok * (size_t)k);
    int32_t *rs = malloc(sizeof(int32_t) * (size_t)k);
    float *rw = malloc(sizeof(float) * (size_t)k);

    assert_true(l && bias && sel && w && rs && rw);
    for (int j = 0; j < E; j++)
        bias[j] = (float)(urand() * 0.2 - 0.1);
    for (size_t i = 0; i < (size_t)ntok * (size_t)E; i++) {
        double v = urand() * 8.0 - 4.0;
        /* coarse logits make many exact ties */
        l[i] = coarse ? (float)(floor(v * 2.0) / 2.0) : (float)v;
    }
    const float *b = with_bias ? bias : NULL;
    assert_int_equal(moecal_router_select(c, l, b, ntok, sel, w), MOECAL_OK);
    for (int t = 0; t < ntok; t++) {
        naive_route(c, l + (size_t)t * E, b, rs, rw);
        for (int i = 0; i < k; i++) {
            assert_int_equal(sel[(size_t)t * k + i], rs[i]);
            assert_float_equal(w[(size_t)t * k + i], rw[i], 1e-5 * (1.0 + fabsf(rw[i])));
        }
    }
    /* the exact precision's double router: the same steps and tie rule, so
     * the same experts where no two choice values are within float rounding
     * (these logits are float values, far apart or exactly equal) */
    double *ld = malloc(sizeof(double) * (size_t)ntok * (size_t)E);
    int32_t *seld = malloc(sizeof(int32_t) * (size_t)ntok * (size_t)k);
    float *wd = malloc(sizeof(float) * (size_t)ntok * (size_t)k);
    assert_true(ld && seld && wd);
    for (size_t i = 0; i < (size_t)ntok * (size_t)E; i++)
        ld[i] = l[i];
    assert_int_equal(moecal_router_select_d(c, ld, b, ntok, seld, wd), MOECAL_OK);
    for (size_t i = 0; i < (size_t)ntok * (size_t)k; i++) {
        if (sel[i] != seld[i])
            fail_msg("token %zu: the double router chose expert %d, the float router %d",
                     i / (size_t)k, seld[i], sel[i]);
        assert_float_equal(wd[i], w[i], 1e-5 * (1.0 + fabsf(w[i])));
    }
    free(ld);
    free(seld);
    free(wd);
    free(l);
    free(bias);
    free(sel);
    free(w);
    free(rs);
    free(rw);
}

static void test_random_vs_naive(void **state)
{
    (void)state;
    moecal_model_config c;

    for (int coarse = 0; coarse <= 1; coarse++) {
        c = deepseek(256, 8, 4, 8);                /* DeepSeek-V3 */
        compare_random(&c, 300, true, coarse);
        compare_random(&c, 100, false, coarse);
        c = deepseek(64, 8, 3, 6);
        compare_random(&c, 300, true, coarse);
        c = deepseek(24, 4, 2, 24);                /* k = E */
        compare_random(&c, 50, true, coarse);
        c = deepseek(12, 12, 5, 4);                /* groups of one expert */
        compare_random(&c, 200, true, coarse);
        c = deepseek(16, 1, 1, 1);                 /* plain top-1 */
        compare_random(&c, 200, true, coarse);
        c = softmax_cfg(MOECAL_FAMILY_MIXTRAL, 8, 2, true);
        compare_random(&c, 300, false, coarse);
        c = softmax_cfg(MOECAL_FAMILY_QWEN3_MOE, 128, 8, false);
        compare_random(&c, 200, false, coarse);
        c = softmax_cfg(MOECAL_FAMILY_QWEN3_MOE, 60, 4, true);
        compare_random(&c, 200, false, coarse);
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_deepseek_group_excludes_global_best),
        cmocka_unit_test(test_deepseek_bias_changes_choice),
        cmocka_unit_test(test_deepseek_negative_scores_masked_to_minus_inf),
        cmocka_unit_test(test_deepseek_k_exceeds_kept_groups),
        cmocka_unit_test(test_deepseek_no_bias_group_max),
        cmocka_unit_test(test_softmax_topk),
        cmocka_unit_test(test_ties_lower_index),
        cmocka_unit_test(test_k_equals_e),
        cmocka_unit_test(test_nan_competes_as_minus_inf),
        cmocka_unit_test(test_route_expf),
        cmocka_unit_test(test_round_bf16),
        cmocka_unit_test(test_route_exp),
        cmocka_unit_test(test_ties_equal_rows),
        cmocka_unit_test(test_route_logit),
        cmocka_unit_test(test_bad_config),
        cmocka_unit_test(test_random_vs_naive),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
