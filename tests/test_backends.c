/* test_backends.c - the conformance suite: every registered backend against
 * the naive reference (backendlib.h), on the same problems.
 *
 * Each case runs once per backend compiled in ("cpu: odd_shapes", "cuda:
 * odd_shapes"); a backend that is not usable here (no GPU) has its cases
 * skipped.  Every problem runs in one chunk, in chunks of an odd size and,
 * for backends that take chunks ahead (submit_chunk), one chunk ahead.  What
 * is checked: the routing token for token (counts exact), amax(x) exact,
 * amax(h) within 1e-2; a cold expert gets no token and the one-token expert
 * one; odd shapes, a local range in the middle, E prime, k = 1 and k = E,
 * softmax with and without groups, exact ties, logits that cancel, every
 * --router-logits precision, skipped rows, all-experts mode, an empty range,
 * an empty and an oversized chunk, non-finite weights and bad configurations.
 * Each backend's own cases (threads, pipeline steps, pinned memory, memory
 * limits) are in test_backend_<name>.c.
 *
 * An optional argument is a cmocka test-name filter ("cuda: *").
 */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "backendlib.h"
#include "fp8.h"
#include "route_math.h"

#define THREADS 2

static const moecal_backend_ops *backend_of(void **state)
{
    const moecal_backend_ops *ops = *state;
    if (ops->available && !ops->available())
        skip();
    return ops;
}

/* The backend in one chunk, in chunks of odd_chunk tokens and one chunk
 * ahead, against the reference. */
static void check(const moecal_backend_ops *ops, const problem *p, bool all, int odd_chunk)
{
    int nloc = p->e1 - p->e0;
    result want = result_new(nloc), got = result_new(nloc);
    const char *ref = "the reference";

    reference(p, all, &want);
    run_backend(ops, p, all, THREADS, p->ntok, false, &got);
    compare(p, all, ops->name, &got, ref, &want);
    run_backend(ops, p, all, THREADS, odd_chunk, false, &got);
    compare(p, all, ops->name, &got, ref, &want);
    if (ops->submit_chunk) {
        run_backend(ops, p, all, THREADS, odd_chunk, true, &got);
        compare(p, all, ops->name, &got, ref, &want);
    }
    check_cold_and_one(p, all, &want);
    result_free(&want);
    result_free(&got);
}

static void odd_shapes(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    /* E 12 in 4 groups, keep 2, k 3; H 37, I 19; local experts [3, 9) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 301, 11);
    check(ops, &p, false, 77);
    problem_free(&p);
    /* E 20, a range of 8 from 5, k 4; H 200, I 72: vector paths with rows
     * that are not multiples of 128 */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 20, 4, 2, 4, 200, 72, 5, 13, 700, 21);
    check(ops, &p, false, 250);
    problem_free(&p);
}

static void softmax_k1_and_kE(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    /* E 13 (prime: no even split over ranks), k 1 */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 1, 45, 23, 4, 11, 257, 13);
    check(ops, &p, false, 100);
    problem_free(&p);
    /* k = E: every token reaches every expert through the router */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 13, 1, 1, 13, 48, 24, 0, 13, 90, 14);
    p.cold = p.one = -1;
    check(ops, &p, false, 31);
    problem_free(&p);
    /* softmax with groups (DeepSeek's group_limited_greedy: max per group) */
    problem_make(&p, MOECAL_SCORING_SOFTMAX, 16, 4, 2, 2, 64, 32, 2, 14, 400, 15);
    check(ops, &p, false, 128);
    problem_free(&p);
}

static void ties(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    const int H = 64;
    /* experts 4 and 5 have the same gate row and bias (exact ties: the lower
     * index wins), as do groups 0 and 2 (experts 0-3 and 8-11) */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 16, 4, 2, 3, H, 16, 0, 16, 600, 16);
    memcpy(p.gate + 5 * H, p.gate + 4 * H, (size_t)H * sizeof(float));
    p.bias[5] = p.bias[4];
    for (int e = 0; e < 4; e++) {
        memcpy(p.gate + (size_t)(e + 8) * H, p.gate + (size_t)e * H, (size_t)H * sizeof(float));
        p.bias[e + 8] = p.bias[e];
    }
    p.cold = p.one = -1;
    check(ops, &p, false, 100);
    problem_free(&p);
}

static void cancellation_routing(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
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
        p.gate[(size_t)e * HH] = (float)(0.1 * bl_nrand());
        p.gate[(size_t)e * HH + 1] = (float)(0.1 * bl_nrand());
        p.gate[(size_t)e * HH + 4] = p.gate[(size_t)e * HH + 5] = 3.0f + (float)e / 64.0f;
    }
    for (int t = 0; t < p.ntok; t++) {
        p.x[(size_t)t * HH + 4] = moecal_float_to_bf16(512.0f);
        p.x[(size_t)t * HH + 5] = moecal_float_to_bf16(-512.0f);
    }
    check(ops, &p, false, 777);
    problem_free(&p);
}

/* Every --router-logits precision against the reference at that precision;
 * bf16 must route some tokens differently from fp32 (else the option would
 * be untested), and equal router rows (exact ties at every precision) go to
 * the lower expert. */
static void logit_precisions(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
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
            if (p.bias)
                p.bias[9] = p.bias[3];
            check(ops, &p, false, 300);
            r[prec] = result_new(16);
            run_backend(ops, &p, false, THREADS, 300, false, &r[prec]);
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

static void skip_rows(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    for (int h = 0; h < 2; h++) {
        int H = h ? 64 : 37, I = h ? 32 : 19;
        problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, H, I, 3, 9, 301, 15 + h);
        /* skipped rows hold NaN and huge values: they must not be read */
        for (int t = 0; t < p.ntok; t += 5) {
            p.skip[t] = 1;
            p.x[(size_t)t * H + 4] = 0x7fc0;
            p.x[(size_t)t * H + 5] = moecal_float_to_bf16(1e30f);
        }
        p.skip[p.one_token] = 1;
        check(ops, &p, false, 100);
        check(ops, &p, true, 100);
        /* every row skipped */
        memset(p.skip, 1, (size_t)p.ntok);
        check(ops, &p, false, 100);
        check(ops, &p, true, 100);
        problem_free(&p);
    }
}

static void all_experts(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    /* 1100 tokens: every expert's rows span several GEMM blocks */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 5, 8, 1100, 16);
    check(ops, &p, true, 333);
    problem_free(&p);
    /* 11 local experts */
    problem_make(&p, MOECAL_SCORING_SIGMOID, 20, 4, 2, 4, 200, 72, 5, 16, 300, 17);
    check(ops, &p, true, 128);
    problem_free(&p);
}

static void empty_range_and_chunk(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 4, 4, 50, 17);
    moecal_backend *b = make_backend(ops, &p, false, THREADS, 64);
    moecal_chunk_stats st = {NULL, NULL, NULL};
    assert_int_equal(ops->run_chunk(b, p.x, 50, NULL, &st), MOECAL_OK);
    ops->destroy(b);
    problem_free(&p);

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 0, 12, 50, 18);
    b = make_backend(ops, &p, false, THREADS, 64);
    result r = result_new(12);
    moecal_chunk_stats s2 = {r.tokens, r.amax_x, r.amax_h};
    assert_int_equal(ops->run_chunk(b, p.x, 0, NULL, &s2), MOECAL_OK);
    for (int e = 0; e < 12; e++)
        assert_int_equal(r.tokens[e], 0);
    /* more tokens than the configured chunk is an error, not an overflow */
    assert_int_not_equal(ops->run_chunk(b, p.x, 65, NULL, &s2), MOECAL_OK);
    /* and the backend still works after it */
    assert_int_equal(ops->run_chunk(b, p.x, 50, NULL, &s2), MOECAL_OK);
    int64_t sum = 0;
    for (int e = 0; e < 12; e++)
        sum += r.tokens[e];
    assert_int_equal(sum, 50 * 3);
    ops->destroy(b);
    result_free(&r);
    problem_free(&p);
}

static void nonfinite_weights_refused(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    moecal_backend *b;
    moecal_layer_weights w = {0};
    const size_t at5 = (size_t)2 * 19 * 37 + 5 * 37 + 6, at7 = (size_t)4 * 19 * 37;

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 10, 19);
    b = make_backend(ops, &p, false, THREADS, 16);
    w.layer = 7;
    w.gate = p.gate;
    w.bias = p.bias;
    w.w1 = p.w1;
    w.w3 = p.w3;

    uint16_t saved = p.w3[at5];
    p.w3[at5] = 0xffc1;          /* NaN in expert 5 */
    p.w1[at7] = 0x7f80;          /* Inf in expert 7 */
    assert_int_equal(ops->load_layer(b, &w), MOECAL_ERR_NONFINITE);
    assert_non_null(strstr(moecal_error_message(), "expert 5 up_proj (w3) [5, 6] is NaN"));
    /* refused layer: no chunk may run on it */
    moecal_chunk_stats st = {NULL, NULL, NULL};
    assert_int_not_equal(ops->run_chunk(b, p.x, 1, NULL, &st), MOECAL_OK);
    p.w3[at5] = saved;
    assert_int_equal(ops->load_layer(b, &w), MOECAL_ERR_NONFINITE);
    assert_non_null(strstr(moecal_error_message(), "expert 7 gate_proj (w1) [0, 0] is Inf"));
    p.w1[at7] = 0;

    p.gate[40] = NAN;
    assert_int_equal(ops->load_layer(b, &w), MOECAL_ERR_NONFINITE);
    p.gate[40] = 0.0f;
    p.bias[2] = INFINITY;
    assert_int_equal(ops->load_layer(b, &w), MOECAL_ERR_NONFINITE);
    p.bias[2] = 0.0f;
    w.bias = NULL;
    assert_int_equal(ops->load_layer(b, &w), MOECAL_ERR_MISMATCH);
    w.bias = p.bias;
    assert_int_equal(ops->load_layer(b, &w), MOECAL_OK);
    ops->destroy(b);
    problem_free(&p);
}

static void bad_config(void **state)
{
    const moecal_backend_ops *ops = backend_of(state);
    problem p;
    moecal_backend_config bc;
    moecal_backend *b = (moecal_backend *)&bc;

    problem_make(&p, MOECAL_SCORING_SIGMOID, 12, 4, 2, 3, 37, 19, 3, 9, 10, 20);
    memset(&bc, 0, sizeof bc);
    bc.model = &p.cfg;
    bc.device = strcmp(ops->name, "cpu") == 0 ? -1 : 0;
    bc.e0 = 3;
    bc.e1 = 13;               /* past E */
    bc.max_chunk_tokens = 16;
    assert_int_not_equal(ops->create(&bc, &b), MOECAL_OK);
    assert_null(b);
    bc.e1 = 9;
    bc.max_chunk_tokens = 0;
    assert_int_not_equal(ops->create(&bc, &b), MOECAL_OK);
    bc.max_chunk_tokens = 16;
    p.cfg.n_group = 5;        /* does not divide E */
    assert_int_not_equal(ops->create(&bc, &b), MOECAL_OK);
    bc.model = NULL;
    assert_int_not_equal(ops->create(&bc, &b), MOECAL_OK);
    ops->destroy(NULL);
    problem_free(&p);
}

static const struct {
    const char *name;
    CMUnitTestFunction fn;
} cases[] = {
    {"odd_shapes", odd_shapes},
    {"softmax_k1_and_kE", softmax_k1_and_kE},
    {"ties", ties},
    {"cancellation_routing", cancellation_routing},
    {"logit_precisions", logit_precisions},
    {"skip_rows", skip_rows},
    {"all_experts", all_experts},
    {"empty_range_and_chunk", empty_range_and_chunk},
    {"nonfinite_weights_refused", nonfinite_weights_refused},
    {"bad_config", bad_config},
};

int main(int argc, char **argv)
{
    enum { NCASE = sizeof cases / sizeof cases[0], MAXB = 8 };
    struct CMUnitTest tests[NCASE * MAXB];
    static char names[NCASE * MAXB][64];
    size_t n = 0;
    const moecal_backend_ops *ops;

    if (argc > 1)
        cmocka_set_test_filter(argv[1]);
    for (int i = 0; (ops = moecal_backend_at(i)) != NULL && i < MAXB; i++) {
        for (size_t c = 0; c < NCASE; c++, n++) {
            snprintf(names[n], sizeof names[n], "%s: %s", ops->name, cases[c].name);
            tests[n] = (struct CMUnitTest){.name = names[n], .test_func = cases[c].fn,
                                           .initial_state = (void *)ops};
        }
    }
    return _cmocka_run_group_tests("backends", tests, n, NULL, NULL);
}
