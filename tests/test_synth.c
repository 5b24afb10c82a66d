/* test_synth.c - unit tests of the synthetic model writer (synth.c).
 *
 * The fast FP8 quantizer gives the bytes of moecal_fp8_quant_block; the
 * parameter checks refuse never-routed experts that a router could choose;
 * written models open with model.c and activations.c, and routing their
 * tokens with the project's router (router.c) never picks a never-routed
 * expert while the popularity is skewed; the bytes do not depend on the
 * number of threads.
 */
#define _GNU_SOURCE
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <dirent.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <unistd.h>

#include <jansson.h>
#include <mpi.h>
#ifdef _OPENMP
#include <omp.h>
#endif

#include "activations.h"
#include "fp8.h"
#include "model.h"
#include "router.h"
#include "synth.h"

static char tmpdir[256];

static const char *tpath(const char *name)
{
    static char buf[8][512];
    static int k;
    char *p = buf[k++ & 7];
    snprintf(p, 512, "%s/%s", tmpdir, name);
    return p;
}

/* ------------------------------------------------------------------ quantizer */

static uint64_t xs = 88172645463325252ull;

static uint64_t next(void)
{
    xs ^= xs << 13;
    xs ^= xs >> 7;
    xs ^= xs << 17;
    return xs;
}

static void quant_case(size_t rows, size_t cols, int mode)
{
    size_t n = rows * cols, nb = ((rows + 127) / 128) * ((cols + 127) / 128);
    float *w = malloc(n * sizeof *w), *s1 = malloc(nb * 4), *s2 = malloc(nb * 4);
    uint8_t *q1 = malloc(n), *q2 = malloc(n);

    assert_true(w && s1 && s2 && q1 && q2);
    for (size_t i = 0; i < n; i++) {
        uint64_t z = next();
        uint32_t u = (uint32_t)(z >> 32);
        float v;
        switch (mode) {
        case 0: /* any finite bit pattern */
            memcpy(&v, &u, 4);
            if (!isfinite(v))
                v = 1.0f;
            break;
        case 1: /* weights-like */
            v = (float)((int32_t)u) * 1e-11f;
            break;
        case 2: /* wide exponent range within a block: subnormal e4m3 codes */
            v = ldexpf((float)(int32_t)u, -(int)(z & 63));
            break;
        default: /* zeros of both signs: all-zero blocks get scale 1 */
            v = (z & 1) ? 0.0f : -0.0f;
            break;
        }
        w[i] = v;
    }
    moecal_fp8_quant_block(w, rows, cols, 128, q1, s1);
    moecal_synth_quant_fp8(w, rows, cols, q2, s2);
    for (size_t i = 0; i < nb; i++)
        if (memcmp(&s1[i], &s2[i], 4) != 0)
            fail_msg("%zux%zu mode %d: scale %zu: %a vs %a", rows, cols, mode, i, s1[i], s2[i]);
    for (size_t i = 0; i < n; i++)
        if (q1[i] != q2[i])
            fail_msg("%zux%zu mode %d: element %zu = %a: code %02x vs %02x", rows, cols, mode, i,
                     w[i], q1[i], q2[i]);
    free(w);
    free(s1);
    free(s2);
    free(q1);
    free(q2);
}

static void test_quant_same_bytes(void **state)
{
    static const size_t shapes[][2] = {{1, 1}, {128, 128}, {129, 130}, {300, 1000},
                                       {7, 200}, {256, 96}, {2, 70000}};
    (void)state;
    for (size_t s = 0; s < sizeof shapes / sizeof shapes[0]; s++)
        for (int mode = 0; mode < 4; mode++)
            quant_case(shapes[s][0], shapes[s][1], mode);
}

/* Every e4m3 rounding boundary: x at, just below and just above each
 * midpoint between codes, in one block scaled to 448. */
static void test_quant_boundaries(void **state)
{
    enum { C = 128 };
    float w[C * 4], s1[1], s2[1];
    uint8_t q1[C * 4], q2[C * 4];

    (void)state;
    memset(w, 0, sizeof w); /* 126 codes fill 504 of the 512 values */
    for (int k = 0; k < 126; k++) {
        float lo = moecal_e4m3_to_float((uint8_t)k), hi = moecal_e4m3_to_float((uint8_t)(k + 1));
        float mid = lo + (hi - lo) / 2;
        w[4 * k % (C * 4)] = mid;
        w[(4 * k + 1) % (C * 4)] = nextafterf(mid, 0.0f);
        w[(4 * k + 2) % (C * 4)] = -nextafterf(mid, 1000.0f);
        w[(4 * k + 3) % (C * 4)] = hi;
    }
    w[0] = 448.0f; /* the block max: scale exactly 1 */
    moecal_fp8_quant_block(w, 4, C, 128, q1, s1);
    moecal_synth_quant_fp8(w, 4, C, q2, s2);
    assert_memory_equal(s1, s2, sizeof s1);
    assert_memory_equal(q1, q2, sizeof q1);
}

/* ------------------------------------------------------------------ parameters */

static void test_presets(void **state)
{
    moecal_synth_params p;

    (void)state;
    assert_int_equal(moecal_synth_preset_params("demo", &p), MOECAL_OK);
    assert_int_equal(p.layers - p.first_dense, 3);
    assert_int_equal(p.experts, 32);
    assert_int_equal(p.never_routed, 2);
    assert_int_equal(moecal_synth_check(&p), MOECAL_OK);
    assert_int_equal(moecal_synth_preset_params("deepseek-v3-layer", &p), MOECAL_OK);
    assert_int_equal(p.hidden, 7168);
    assert_int_equal(p.intermediate, 2048);
    assert_int_equal(p.experts, 256);
    assert_int_equal(p.never_routed, 8);
    assert_int_equal(moecal_synth_check(&p), MOECAL_OK);
    assert_int_equal(moecal_synth_preset_params("tiny", &p), MOECAL_OK);
    assert_int_equal(moecal_synth_check(&p), MOECAL_OK);
    assert_int_equal(moecal_synth_preset_params("huge", &p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "huge"));
}

static void test_check_never_routed(void **state)
{
    moecal_synth_params p;

    (void)state;
    moecal_synth_preset_params("tiny", &p);
    /* 4 groups of 2, one kept, k 2: a never-routed expert would leave its
     * group one routable expert */
    p.groups = 4;
    p.topk_groups = 1;
    p.never_routed = 1;
    assert_int_equal(moecal_synth_check(&p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "--never-routed"));
    /* two kept groups hold at least 2 routable experts */
    p.topk_groups = 2;
    p.never_routed = 2;
    assert_int_equal(moecal_synth_check(&p), MOECAL_OK);
    /* no groups: E - never >= k */
    p.experts = 3;
    p.groups = 1;
    p.topk_groups = 1;
    p.topk = 2;
    p.never_routed = 1;
    assert_int_equal(moecal_synth_check(&p), MOECAL_OK);
    p.never_routed = 2;
    assert_int_equal(moecal_synth_check(&p), MOECAL_ERR_USAGE);
    /* other checks name their option */
    moecal_synth_preset_params("tiny", &p);
    p.groups = 3;
    assert_int_equal(moecal_synth_check(&p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "--groups"));
    moecal_synth_preset_params("tiny", &p);
    p.first_dense = 2;
    assert_int_equal(moecal_synth_check(&p), MOECAL_ERR_USAGE);
    assert_non_null(strstr(moecal_error_message(), "--first-dense"));
}

/* ------------------------------------------------------------------ written models */

static json_t *load_synth_json(const char *dir)
{
    char path[600];
    json_error_t e;
    json_t *j;

    snprintf(path, sizeof path, "%s/synth.json", dir);
    j = json_load_file(path, 0, &e);
    if (!j)
        fail_msg("%s: %s", path, e.text);
    return j;
}

/* Route every token of every MoE layer with the project's router; never-
 * routed experts get none, the most popular several times the mean. */
static void route_all(const char *dir)
{
    moecal_model *m = NULL;
    moecal_act *a = NULL;
    char apath[600];
    json_t *sj = load_synth_json(dir), *never = json_object_get(sj, "never_routed");
    const moecal_model_config *cfg;

    snprintf(apath, sizeof apath, "%s/activations.h5", dir);
    if (moecal_model_open(dir, &m) != MOECAL_OK)
        fail_msg("%s", moecal_error_message());
    if (moecal_act_open(apath, MPI_COMM_NULL, &a) != MOECAL_OK)
        fail_msg("%s", moecal_error_message());
    cfg = moecal_model_cfg(m);
    assert_int_equal(moecal_act_hidden(a), cfg->hidden_size);
    assert_int_equal(moecal_act_n_layers(a), cfg->n_moe_layers);
    for (int li = 0; li < cfg->n_moe_layers; li++) {
        int L = cfg->moe_layers[li], E = cfg->n_routed_experts, H = cfg->hidden_size;
        int k = cfg->num_experts_per_tok;
        int64_t T = moecal_act_tokens(a), *cnt = calloc((size_t)E, sizeof *cnt), maxc = 0;
        float *W = malloc((size_t)E * H * 4), *bias = malloc((size_t)E * 4);
        float *x = malloc((size_t)T * H * 4), *logit = malloc((size_t)T * E * 4);
        int32_t *sel = malloc((size_t)T * k * sizeof *sel);
        char key[16];
        json_t *nv, *v;
        size_t i;

        assert_true(cnt && W && bias && x && logit && sel);
        assert_int_equal(moecal_model_load_gate(m, L, W, bias), MOECAL_OK);
        assert_int_equal(moecal_act_read_float(a, L, 0, T, x), MOECAL_OK);
        for (int64_t t = 0; t < T; t++)
            for (int e = 0; e < E; e++) {
                float s = 0.0f;
                for (int h = 0; h < H; h++)
                    s += x[t * H + h] * W[(size_t)e * H + h];
                logit[t * E + e] = s;
            }
        assert_int_equal(moecal_router_select(cfg, logit, bias, T, sel, NULL), MOECAL_OK);
        for (int64_t t = 0; t < T * k; t++)
            cnt[sel[t]]++;
        snprintf(key, sizeof key, "%d", L);
        nv = json_object_get(never, key);
        assert_true(json_is_array(nv));
        json_array_foreach(nv, i, v) {
            int e = (int)json_integer_value(v);
            if (cnt[e] != 0)
                fail_msg("%s layer %d: never-routed expert %d got %lld tokens", dir, L, e,
                         (long long)cnt[e]);
            assert_true(bias[e] == -4.0f);
        }
        for (int e = 0; e < E; e++)
            maxc = cnt[e] > maxc ? cnt[e] : maxc;
        /* skewed: the hottest expert well above the mean T k / E */
        if (E >= 8)
            assert_true((double)maxc > 1.5 * (double)T * k / E);
        free(cnt);
        free(W);
        free(bias);
        free(x);
        free(logit);
        free(sel);
    }
    moecal_act_close(a);
    moecal_model_close(m);
    json_decref(sj);
}

static void write_model(const char *dir, moecal_synth_params *p)
{
    p->progress = MOECAL_SYNTH_QUIET;
    if (moecal_synth_write(dir, p, true, NULL) != MOECAL_OK)
        fail_msg("%s", moecal_error_message());
}

static void test_tiny_routes(void **state)
{
    moecal_synth_params p;
    (void)state;
    moecal_synth_preset_params("tiny", &p);
    write_model(tpath("tiny"), &p);
    route_all(tpath("tiny"));
}

static void test_demo_routes(void **state)
{
    moecal_synth_params p;
    (void)state;
    moecal_synth_preset_params("demo", &p);
    p.tokens = 2048;
    write_model(tpath("demo"), &p);
    route_all(tpath("demo"));
}

/* The tightest layout the check allows: groups of 2, never-routed experts
 * in two of them, two groups kept, k 2. */
static void test_tight_groups_route(void **state)
{
    moecal_synth_params p;
    (void)state;
    moecal_synth_preset_params("tiny", &p);
    p.experts = 8;
    p.groups = 4;
    p.topk_groups = 2;
    p.topk = 2;
    p.never_routed = 2;
    p.tokens = 2000;
    p.dtype = MOECAL_DT_BF16;
    p.act_dtype = MOECAL_DT_F32;
    write_model(tpath("tight"), &p);
    route_all(tpath("tight"));
}

static int same_file(const char *a, const char *b)
{
    FILE *x = fopen(a, "rb"), *y = fopen(b, "rb");
    int same = x && y, c, d;
    while (same) {
        c = getc(x);
        d = getc(y);
        if (c != d)
            same = 0;
        if (c == EOF || d == EOF)
            break;
    }
    if (x)
        fclose(x);
    if (y)
        fclose(y);
    return same;
}

/* Same bytes with 1 and 3 threads; several shards, each weight with its
 * scales; a different seed gives other bytes. */
static void test_threads_same_bytes(void **state)
{
    moecal_synth_params p;
    char a[600], b[600];
    DIR *d;
    struct dirent *de;
    int nfiles = 0, nshards = 0;

    (void)state;
    moecal_synth_preset_params("tiny", &p);
    p.shard_size = 100000;
    p.hidden = 300; /* not a multiple of 128 */
#ifdef _OPENMP
    omp_set_num_threads(1);
#endif
    write_model(tpath("t1"), &p);
#ifdef _OPENMP
    omp_set_num_threads(3);
#endif
    write_model(tpath("t3"), &p);
    d = opendir(tpath("t1"));
    assert_non_null(d);
    while ((de = readdir(d)) != NULL) {
        if (de->d_name[0] == '.')
            continue;
        nfiles++;
        nshards += strncmp(de->d_name, "model-", 6) == 0;
        snprintf(a, sizeof a, "%s/%s", tpath("t1"), de->d_name);
        snprintf(b, sizeof b, "%s/%s", tpath("t3"), de->d_name);
        if (!same_file(a, b))
            fail_msg("%s differs between 1 and 3 threads", de->d_name);
    }
    closedir(d);
    assert_true(nshards >= 4);
    assert_int_equal(nfiles, nshards + 4);
    route_all(tpath("t1"));
    p.seed = 2;
    write_model(tpath("t3"), &p);
    snprintf(a, sizeof a, "%s/activations.h5", tpath("t1"));
    snprintf(b, sizeof b, "%s/activations.h5", tpath("t3"));
    assert_false(same_file(a, b));
}

/* ------------------------------------------------------------------ main */

int main(int argc, char **argv)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_quant_same_bytes),
        cmocka_unit_test(test_quant_boundaries),
        cmocka_unit_test(test_presets),
        cmocka_unit_test(test_check_never_routed),
        cmocka_unit_test(test_tiny_routes),
        cmocka_unit_test(test_demo_routes),
        cmocka_unit_test(test_tight_groups_route),
        cmocka_unit_test(test_threads_same_bytes),
    };
    const char *base = getenv("TMPDIR");
    char cmd[600];
    int rc;

    if (MPI_Init(&argc, &argv) != MPI_SUCCESS)
        return 1;
    snprintf(tmpdir, sizeof tmpdir, "%s/moecal-test-synth-XXXXXX", base && *base ? base : "/tmp");
    if (!mkdtemp(tmpdir)) {
        perror("mkdtemp");
        MPI_Finalize();
        return 1;
    }
    rc = cmocka_run_group_tests(tests, NULL, NULL);
    if (rc == 0) {
        snprintf(cmd, sizeof cmd, "rm -rf '%s'", tmpdir);
        if (system(cmd) != 0)
            fprintf(stderr, "could not remove %s\n", tmpdir);
    }
    MPI_Finalize();
    return rc;
}
