/* test_report.c - the statistics of `moecal report` (src/report.c) on amax
 * tables built by hand: tokens summed over chunks, never-routed and cold
 * experts, median and mean; the chunk each quantizer settled in, growth in
 * the tail and the warning; the largest amax and the lowest expert on a
 * tie; refusal of counts that overflow. */
#include "config.h"

#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <stdlib.h>
#include <string.h>

#include "report.h"

enum { L = 2, E = 4, C = 4 };

typedef struct tables {
    moecal_amax_data d;
    int layers[L];
    float in[L * E * 3], cal[L * E * 3], w[L * E * 3];
    int64_t tok[L * C * E];
    float hist[L * C * E * 3];
} tables;

static float *hist(tables *t, int l, int c, int e, int p)
{
    return &t->hist[(((size_t)l * C + (size_t)c) * E + (size_t)e) * 3 + (size_t)p];
}

static void make(tables *t)
{
    memset(t, 0, sizeof *t);
    t->d.path = (char *)"t.h5";
    t->d.L = L;
    t->d.E = E;
    t->d.C = C;
    t->layers[0] = 3;
    t->layers[1] = 7;
    t->d.layers = t->layers;
    t->d.input_amax = t->in;
    t->d.input_amax_calibrated = t->cal;
    t->d.weight_amax = t->w;
    t->d.tokens_per_expert = t->tok;
    t->d.history = t->hist;
    /* layer 0: expert 0 never routed, expert 1 routed 1 token in all (cold),
     * experts 2 and 3 100 tokens per chunk */
    for (int c = 0; c < C; c++) {
        t->tok[(0 * C + c) * E + 1] = c == 2;
        t->tok[(0 * C + c) * E + 2] = 100;
        t->tok[(0 * C + c) * E + 3] = 100;
        for (int e = 0; e < E; e++)
            t->tok[(1 * C + c) * E + e] = 10 + e;
    }
    /* histories: layer 0 expert 2 settles in chunk 0; expert 3 grows in the
     * last chunk by 50%; expert 1 appears in chunk 2; layer 1 settles in
     * chunk 1 everywhere, growing 0.5% in chunk 3 for w2 of expert 0. */
    for (int p = 0; p < 3; p++) {
        for (int c = 0; c < C; c++) {
            *hist(t, 0, c, 2, p) = c == 0 ? 4.0f : 1.0f;
            *hist(t, 0, c, 3, p) = c == 3 ? 3.0f : 2.0f;
            *hist(t, 0, c, 1, p) = c == 2 ? 0.5f : 0.0f;
            for (int e = 0; e < E; e++)
                *hist(t, 1, c, e, p) = c >= 1 ? 1.0f : 0.5f;
        }
    }
    *hist(t, 1, 3, 0, 1) = 1.005f;
    for (int l = 0; l < L; l++)
        for (int e = 0; e < E; e++)
            for (int p = 0; p < 3; p++) {
                size_t i = ((size_t)l * E + (size_t)e) * 3 + (size_t)p;
                t->w[i] = (float)(e % 2) + 0.25f * (float)p;  /* experts 1 and 3 tie */
                float m = 0.0f;
                for (int c = 0; c < C; c++)
                    m = *hist(t, l, c, e, p) > m ? *hist(t, l, c, e, p) : m;
                t->cal[i] = m;
            }
}

static const moecal_report_cfg cfg = {.cold = 0.1, .tail = 0.25, .tol = 0.01, .warn = 0.05};

static void test_routing(void **state)
{
    tables t;
    moecal_report r;
    (void)state;
    make(&t);
    assert_int_equal(moecal_report_compute(&t.d, &cfg, &r), MOECAL_OK);
    const moecal_route_stats *a = &r.routing[0], *b = &r.routing[1];
    assert_int_equal(a->total, 801);
    assert_int_equal(a->min, 0);
    assert_int_equal(a->max, 400);
    assert_true(a->median == 200.5);    /* of 0, 1, 400, 400 */
    assert_true(a->mean == 200.25);
    assert_int_equal(a->n_never, 1);
    assert_int_equal(a->never[0], 0);
    assert_int_equal(a->n_cold, 1);     /* 1 < 0.1 x 200.25 */
    assert_int_equal(a->cold[0], 1);
    assert_int_equal(r.tok[1], 1);
    assert_int_equal(b->total, 4 * (10 + 11 + 12 + 13));
    assert_int_equal(b->n_never + b->n_cold, 0);
    moecal_report_free(&r);
}

static void test_convergence(void **state)
{
    tables t;
    moecal_report r;
    (void)state;
    make(&t);
    assert_int_equal(moecal_report_compute(&t.d, &cfg, &r), MOECAL_OK);
    assert_int_equal(r.tail, 1);
    assert_int_equal(r.pre, 3);
    /* layer 0, expert 0 never non-zero; 1 in chunk 2; 2 in chunk 0; 3 in 3 */
    for (int p = 0; p < 3; p++) {
        assert_int_equal(r.settled[(0 * E + 0) * 3 + p], -1);
        assert_int_equal(r.settled[(0 * E + 1) * 3 + p], 2);
        assert_int_equal(r.settled[(0 * E + 2) * 3 + p], 0);
        assert_int_equal(r.settled[(0 * E + 3) * 3 + p], 3);
    }
    const moecal_conv_stats *w1 = &r.conv[0 * 3 + 0];
    assert_int_equal(w1->calibrated, 3);
    assert_int_equal(w1->late, 1);
    assert_int_equal(w1->late_sig, 1);
    assert_int_equal(w1->settled_max, 3);
    assert_true(w1->settled_median == 2.0);
    /* layer 1 w2: expert 0 grew 0.5% in the tail: late, not significant */
    const moecal_conv_stats *w2 = &r.conv[1 * 3 + 1];
    assert_int_equal(w2->calibrated, 4);
    assert_int_equal(w2->late, 1);
    assert_int_equal(w2->late_sig, 0);
    assert_int_equal(r.total.calibrated, 3 * 3 + 4 * 3);
    assert_int_equal(r.total.late, 3 + 1);
    assert_int_equal(r.total.late_sig, 3);
    /* 3 of 21 grew significantly: > 5% warns */
    assert_non_null(strstr(r.warning, "3 of 21 calibrated input quantizers"));
    moecal_report_free(&r);

    moecal_report_cfg quiet = cfg;
    quiet.warn = 0.5;
    assert_int_equal(moecal_report_compute(&t.d, &quiet, &r), MOECAL_OK);
    assert_string_equal(r.warning, "");
    moecal_report_free(&r);

    /* the whole run as the tail: no chunk before it, no late counts, no warning */
    moecal_report_cfg all = cfg;
    all.tail = 1.0;
    assert_int_equal(moecal_report_compute(&t.d, &all, &r), MOECAL_OK);
    assert_int_equal(r.pre, 0);
    assert_int_equal(r.total.late, 0);
    assert_string_equal(r.warning, "");
    moecal_report_free(&r);
}

static void test_largest(void **state)
{
    tables t;
    moecal_report r;
    (void)state;
    make(&t);
    assert_int_equal(moecal_report_compute(&t.d, &cfg, &r), MOECAL_OK);
    for (int p = 0; p < 3; p++) {
        const moecal_largest *g = &r.largest[0 * 3 + p];
        assert_true(g->input == 4.0f);
        assert_int_equal(g->input_expert, 2);
        assert_true(g->weight == 1.0f + 0.25f * (float)p);
        assert_int_equal(g->weight_expert, 1);          /* 1 and 3 tie: the lower */
        assert_int_equal(r.largest[1 * 3 + p].input_expert, 0); /* all equal but w2's 1.005 */
    }
    moecal_report_free(&r);
}

static void test_overflow_refused(void **state)
{
    tables t;
    moecal_report r;
    (void)state;
    make(&t);
    t.tok[(1 * C + 0) * E + 2] = INT64_MAX;
    assert_int_equal(moecal_report_compute(&t.d, &cfg, &r), MOECAL_ERR_FORMAT);
    make(&t);
    t.tok[(0 * C + 1) * E + 3] = -1;
    assert_int_equal(moecal_report_compute(&t.d, &cfg, &r), MOECAL_ERR_FORMAT);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_routing),
        cmocka_unit_test(test_convergence),
        cmocka_unit_test(test_largest),
        cmocka_unit_test(test_overflow_refused),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
