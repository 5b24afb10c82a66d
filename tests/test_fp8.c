/* test_fp8.c - unit tests of the scalar float formats and FP8 block dequantization.
 *
 * Reference values come from the formats' definitions (sign, exponent and
 * mantissa fields through ldexp) and from nearest-value searches, never from
 * the bit tricks fp8.c uses.
 */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <float.h>
#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"

static float u2f(uint32_t u)
{
    float x;
    memcpy(&x, &u, sizeof x);
    return x;
}

/* Small deterministic generator (xorshift64*), so failures reproduce. */
static uint64_t rng_state = 0x9e3779b97f4a7c15ull;
static uint64_t rng(void)
{
    rng_state ^= rng_state >> 12;
    rng_state ^= rng_state << 25;
    rng_state ^= rng_state >> 27;
    return rng_state * 0x2545f4914f6cdd1dull;
}

/* ------------------------------------------------------------------ references */

/* e4m3fn by definition: bias 7, subnormals at exp 0, NaN at S.1111.111. */
static double ref_e4m3(unsigned q, int *is_nan)
{
    unsigned s = q >> 7, e = (q >> 3) & 15, m = q & 7;
    double v;

    *is_nan = (e == 15 && m == 7);
    if (*is_nan)
        return NAN;
    v = e == 0 ? ldexp(m / 8.0, -6) : ldexp(1.0 + m / 8.0, (int)e - 7);
    return s ? -v : v;
}

/* IEEE binary16 by definition. */
static double ref_f16(unsigned h, int *kind) /* kind: 0 finite, 1 inf, 2 nan */
{
    unsigned s = h >> 15, e = (h >> 10) & 31, m = h & 1023;
    double v;

    *kind = 0;
    if (e == 31) {
        *kind = m ? 2 : 1;
        v = m ? NAN : INFINITY;
    } else if (e == 0) {
        v = ldexp(m / 1024.0, -14);
    } else {
        v = ldexp(1.0 + m / 1024.0, (int)e - 15);
    }
    return s ? -v : v;
}

/* bfloat16 by definition. */
static double ref_bf16(unsigned b, int *kind)
{
    unsigned s = b >> 15, e = (b >> 7) & 255, m = b & 127;
    double v;

    *kind = 0;
    if (e == 255) {
        *kind = m ? 2 : 1;
        v = m ? NAN : INFINITY;
    } else if (e == 0) {
        v = ldexp(m / 128.0, -126);
    } else {
        v = ldexp(1.0 + m / 128.0, (int)e - 127);
    }
    return s ? -v : v;
}

/* Round |x| to the nearest of two candidates lo < hi (codes clo, chi), ties
 * to the even code.  hi_val may be the "next binade" stand-in for Inf. */
static unsigned pick_nearest(double ax, double lo, unsigned clo, double hi, unsigned chi)
{
    double dl = ax - lo, dh = hi - ax;
    if (dl < dh)
        return clo;
    if (dh < dl)
        return chi;
    return (clo & 1) ? chi : clo;
}

/* Reference float -> bf16: bracket |x| between two adjacent bf16 magnitudes
 * (found by search, not by bit truncation) and pick the nearer. */
static uint16_t ref_to_bf16(float x)
{
    double ax = fabs((double)x);
    unsigned sign = signbit(x) ? 0x8000 : 0, lo = 0, hi = 0x7f80, k;

    if (isinf(x))
        return (uint16_t)(sign | 0x7f80);
    /* largest positive code with value <= ax */
    while (hi - lo > 1) {
        unsigned mid = (lo + hi) / 2;
        if (ref_bf16(mid, (int[]){0}) <= ax)
            lo = mid;
        else
            hi = mid;
    }
    if (ref_bf16(lo, &(int){0}) == ax)
        return (uint16_t)(sign | lo);
    k = pick_nearest(ax, ref_bf16(lo, &(int){0}), lo,
                     lo + 1 == 0x7f80 ? ldexp(1.0, 128) : ref_bf16(lo + 1, &(int){0}), lo + 1);
    return (uint16_t)(sign | k);
}

/* Reference float -> f16 the same way; 2^16 stands for Inf. */
static uint16_t ref_to_f16(float x)
{
    double ax = fabs((double)x);
    unsigned sign = signbit(x) ? 0x8000 : 0, lo = 0, hi = 0x7c00, k;

    if (isinf(x))
        return (uint16_t)(sign | 0x7c00);
    while (hi - lo > 1) {
        unsigned mid = (lo + hi) / 2;
        if (ref_f16(mid, &(int){0}) <= ax)
            lo = mid;
        else
            hi = mid;
    }
    if (ref_f16(lo, &(int){0}) == ax)
        return (uint16_t)(sign | lo);
    k = pick_nearest(ax, ref_f16(lo, &(int){0}), lo,
                     lo + 1 == 0x7c00 ? 65536.0 : ref_f16(lo + 1, &(int){0}), lo + 1);
    return (uint16_t)(sign | k);
}

/* Reference float -> e4m3: nearest of all finite codes, ties to the even
 * code, saturating at 448. */
static uint8_t ref_to_e4m3(float x)
{
    double ax = fabs((double)x), best = INFINITY;
    unsigned sign = signbit(x) ? 0x80 : 0, bc = 0;

    if (isnan(x))
        return 0x7f;
    if (ax >= 448.0)
        return (uint8_t)(sign | 0x7e);
    for (unsigned c = 0; c <= 0x7e; c++) {
        int n;
        double d = fabs(ax - ref_e4m3(c, &n));
        if (d < best || (d == best && (c & 1) == 0 && (bc & 1))) {
            best = d;
            bc = c;
        }
    }
    return (uint8_t)(sign | bc);
}

/* ------------------------------------------------------------------ e4m3 */

static void test_e4m3_decode_all(void **state)
{
    (void)state;
    for (unsigned q = 0; q < 256; q++) {
        int is_nan;
        double want = ref_e4m3(q, &is_nan);
        float got = moecal_e4m3_to_float((uint8_t)q);
        assert_int_equal(moecal_e4m3_is_nan((uint8_t)q) != 0, is_nan);
        if (is_nan) {
            assert_true(isnan(got));
        } else {
            if ((double)got != want)
                fail_msg("e4m3 0x%02x: got %a, want %a", q, (double)got, want);
            assert_int_equal(signbit(got) != 0, (q & 0x80) != 0);
        }
    }
    assert_true(moecal_e4m3_to_float(0x7e) == 448.0f);
    assert_true(moecal_e4m3_to_float(0x01) == 0x1p-9f);
    assert_true(moecal_e4m3_to_float(0x08) == 0x1p-6f);
}

static void test_e4m3_roundtrip(void **state)
{
    (void)state;
    for (unsigned q = 0; q < 256; q++) {
        if (moecal_e4m3_is_nan((uint8_t)q))
            continue;
        uint8_t r = moecal_float_to_e4m3(moecal_e4m3_to_float((uint8_t)q));
        if (r != q)
            fail_msg("e4m3 0x%02x round-trips to 0x%02x", q, r);
    }
}

static void test_e4m3_rne_ties(void **state)
{
    (void)state;
    /* Midpoints of every pair of adjacent positive finite codes go to the
     * even code; one float above / below goes up / down. */
    for (unsigned c = 0; c < 0x7e; c++) {
        int n;
        double lo = ref_e4m3(c, &n), hi = ref_e4m3(c + 1, &n);
        float mid = (float)((lo + hi) / 2); /* exact: needs 5 significant bits */
        assert_true((double)mid == (lo + hi) / 2);
        unsigned even = (c & 1) ? c + 1 : c;
        assert_int_equal(moecal_float_to_e4m3(mid), even);
        assert_int_equal(moecal_float_to_e4m3(-mid), 0x80 | even);
        assert_int_equal(moecal_float_to_e4m3(nextafterf(mid, INFINITY)), c + 1);
        assert_int_equal(moecal_float_to_e4m3(nextafterf(mid, 0.0f)), c);
    }
    assert_int_equal(moecal_float_to_e4m3(0x1p-10f), 0x00);  /* half of min subnormal */
    assert_int_equal(moecal_float_to_e4m3(0x1.8p-9f), 0x02); /* 1.5 ulp -> 2 */
    assert_int_equal(moecal_float_to_e4m3(0x1p-20f), 0x00);
    assert_int_equal(moecal_float_to_e4m3(-0x1p-20f), 0x80);
    assert_int_equal(moecal_float_to_e4m3(u2f(1)), 0x00);    /* float subnormal */
    assert_int_equal(moecal_float_to_e4m3(-0.0f), 0x80);
}

static void test_e4m3_saturation(void **state)
{
    (void)state;
    assert_int_equal(moecal_float_to_e4m3(448.0f), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(449.0f), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(464.0f), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(480.0f), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(1e30f), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(-1e30f), 0xfe);
    assert_int_equal(moecal_float_to_e4m3(INFINITY), 0x7e);
    assert_int_equal(moecal_float_to_e4m3(-INFINITY), 0xfe);
    assert_int_equal(moecal_float_to_e4m3(NAN), 0x7f);
    assert_int_equal(moecal_float_to_e4m3(-NAN), 0x7f);
    assert_int_equal(moecal_float_to_e4m3(FLT_MAX), 0x7e);
}

static void test_e4m3_random(void **state)
{
    (void)state;
    for (int i = 0; i < 200000; i++) {
        /* log-uniform magnitudes over the e4m3 range and beyond */
        float x = ldexpf((float)(rng() >> 40) / (float)(1 << 24) + 1.0f,
                         (int)(rng() % 30) - 14);
        if (rng() & 1)
            x = -x;
        uint8_t got = moecal_float_to_e4m3(x), want = ref_to_e4m3(x);
        if (got != want)
            fail_msg("e4m3(%a) = 0x%02x, want 0x%02x", (double)x, got, want);
    }
}

/* ------------------------------------------------------------------ bf16 */

static void test_bf16_decode_all(void **state)
{
    (void)state;
    for (unsigned b = 0; b < 65536; b++) {
        int kind;
        double want = ref_bf16(b, &kind);
        float got = moecal_bf16_to_float((uint16_t)b);
        if (kind == 2) {
            assert_true(isnan(got));
            continue;
        }
        if ((double)got != want)
            fail_msg("bf16 0x%04x: got %a, want %a", b, (double)got, want);
        assert_int_equal(signbit(got) != 0, (b & 0x8000) != 0);
        assert_int_equal(moecal_float_to_bf16(got), b);
    }
}

static void test_bf16_rne(void **state)
{
    (void)state;
    assert_int_equal(moecal_float_to_bf16(1.0f), 0x3f80);
    assert_int_equal(moecal_float_to_bf16(u2f(0x3f808000)), 0x3f80); /* tie, even below */
    assert_int_equal(moecal_float_to_bf16(u2f(0x3f818000)), 0x3f82); /* tie, even above */
    assert_int_equal(moecal_float_to_bf16(u2f(0x3f808001)), 0x3f81);
    assert_int_equal(moecal_float_to_bf16(u2f(0x3f807fff)), 0x3f80);
    assert_int_equal(moecal_float_to_bf16(u2f(0xbf818000)), 0xbf82);
    assert_int_equal(moecal_float_to_bf16(u2f(0x00008000)), 0x0000); /* subnormal tie */
    assert_int_equal(moecal_float_to_bf16(u2f(0x00018000)), 0x0002);
    assert_int_equal(moecal_float_to_bf16(u2f(0x007fffff)), 0x0080); /* to min normal */
    /* overflow */
    assert_int_equal(moecal_float_to_bf16(FLT_MAX), 0x7f80);
    assert_int_equal(moecal_float_to_bf16(-FLT_MAX), 0xff80);
    assert_int_equal(moecal_float_to_bf16(u2f(0x7f7f7fff)), 0x7f7f);
    assert_int_equal(moecal_float_to_bf16(u2f(0x7f7f8000)), 0x7f80);
    assert_int_equal(moecal_float_to_bf16(INFINITY), 0x7f80);
    assert_int_equal(moecal_float_to_bf16(-INFINITY), 0xff80);
    /* NaN stays NaN (a signalling NaN must not truncate to Inf), sign kept */
    uint16_t n = moecal_float_to_bf16(u2f(0x7f800001));
    assert_true(isnan(moecal_bf16_to_float(n)));
    assert_true(n & 0x40);
    n = moecal_float_to_bf16(u2f(0xffc00000));
    assert_int_equal(n, 0xffc0);
    assert_true(isnan(moecal_round_bf16(NAN)));
    assert_true(moecal_round_bf16(u2f(0x3f818000)) == u2f(0x3f820000));
}

static void test_bf16_random(void **state)
{
    (void)state;
    for (int i = 0; i < 300000; i++) {
        float x = u2f((uint32_t)rng());
        if (isnan(x))
            continue;
        uint16_t got = moecal_float_to_bf16(x), want = ref_to_bf16(x);
        if (got != want)
            fail_msg("bf16(%a) = 0x%04x, want 0x%04x", (double)x, got, want);
    }
}

/* ------------------------------------------------------------------ f16 */

static void test_f16_all(void **state)
{
    (void)state;
    for (unsigned h = 0; h < 65536; h++) {
        int kind;
        double want = ref_f16(h, &kind);
        float got = moecal_f16_to_float((uint16_t)h);
        if (kind == 2) {
            assert_true(isnan(got));
            assert_true(isnan(moecal_f16_to_float(moecal_float_to_f16(got))));
            continue;
        }
        if ((double)got != want)
            fail_msg("f16 0x%04x: got %a, want %a", h, (double)got, want);
        assert_int_equal(signbit(got) != 0, (h & 0x8000) != 0);
        if (moecal_float_to_f16(got) != h)
            fail_msg("f16 0x%04x round-trips to 0x%04x", h, moecal_float_to_f16(got));
    }
}

static void test_f16_rne(void **state)
{
    (void)state;
    /* every midpoint between adjacent positive finite codes goes to even */
    for (unsigned c = 0; c < 0x7bff; c++) {
        int k;
        double lo = ref_f16(c, &k), hi = ref_f16(c + 1, &k);
        float mid = (float)((lo + hi) / 2);
        assert_true((double)mid == (lo + hi) / 2);
        unsigned even = (c & 1) ? c + 1 : c;
        if (moecal_float_to_f16(mid) != even)
            fail_msg("f16 midpoint %a -> 0x%04x, want 0x%04x", (double)mid,
                     moecal_float_to_f16(mid), even);
        assert_int_equal(moecal_float_to_f16(nextafterf(mid, INFINITY)), c + 1);
        assert_int_equal(moecal_float_to_f16(nextafterf(mid, 0.0f)), c);
    }
    assert_int_equal(moecal_float_to_f16(65504.0f), 0x7bff);
    assert_int_equal(moecal_float_to_f16(nextafterf(65520.0f, 0.0f)), 0x7bff);
    assert_int_equal(moecal_float_to_f16(65520.0f), 0x7c00);
    assert_int_equal(moecal_float_to_f16(-1e10f), 0xfc00);
    assert_int_equal(moecal_float_to_f16(INFINITY), 0x7c00);
    assert_int_equal(moecal_float_to_f16(0x1p-24f), 0x0001);
    assert_int_equal(moecal_float_to_f16(0x1p-25f), 0x0000);
    assert_int_equal(moecal_float_to_f16(0x1.8p-24f), 0x0002);
    assert_int_equal(moecal_float_to_f16(0x1p-14f), 0x0400);
    assert_int_equal(moecal_float_to_f16(-0.0f), 0x8000);
    assert_true(isnan(moecal_f16_to_float(moecal_float_to_f16(NAN))));
    assert_true(isnan(moecal_f16_to_float(moecal_float_to_f16(u2f(0x7f800001)))));
    for (int i = 0; i < 300000; i++) {
        float x = u2f((uint32_t)rng());
        if (isnan(x))
            continue;
        uint16_t got = moecal_float_to_f16(x), want = ref_to_f16(x);
        if (got != want)
            fail_msg("f16(%a) = 0x%04x, want 0x%04x", (double)x, got, want);
    }
}

/* ------------------------------------------------------------------ dequant */

/* Check out/amax/n_nan of a dequantization against the definition. */
static void check_dequant(const uint8_t *q, size_t rows, size_t cols, const float *s,
                          size_t block, const uint16_t *out, uint64_t n_nan, float amax)
{
    size_t nbc = (cols + block - 1) / block;
    uint64_t want_nan = 0;
    float want_amax = 0.0f;

    for (size_t r = 0; r < rows; r++) {
        for (size_t c = 0; c < cols; c++) {
            int is_nan;
            double v = ref_e4m3(q[r * cols + c], &is_nan);
            uint16_t got = out[r * cols + c];
            if (is_nan) {
                want_nan++;
                assert_true(isnan(moecal_bf16_to_float(got)));
                continue;
            }
            /* float32 product, then bf16 */
            float prod = (float)v * s[(r / block) * nbc + c / block];
            uint16_t want = ref_to_bf16(prod);
            if (got != want)
                fail_msg("dequant [%zu, %zu] = 0x%04x, want 0x%04x", r, c, got, want);
            double bv = fabs(ref_bf16(want, &(int){0}));
            if (bv > want_amax)
                want_amax = (float)bv;
        }
    }
    assert_int_equal(n_nan, want_nan);
    assert_true(amax == want_amax);
}

static void run_dequant_case(size_t rows, size_t cols, size_t block, int with_nan)
{
    size_t nbr = (rows + block - 1) / block, nbc = (cols + block - 1) / block;
    uint8_t *q = malloc(rows * cols + 1);
    float *s = malloc((nbr * nbc + 1) * sizeof *s);
    uint16_t *out = malloc((rows * cols + 1) * sizeof *out);
    uint64_t n_nan = 12345;
    float amax = -1.0f;

    assert_non_null(q);
    assert_non_null(s);
    assert_non_null(out);
    for (size_t i = 0; i < rows * cols; i++) {
        q[i] = (uint8_t)rng();
        if (!with_nan && moecal_e4m3_is_nan(q[i]))
            q[i] = 0x7e;
    }
    for (size_t i = 0; i < nbr * nbc; i++)
        s[i] = ldexpf(1.0f + (float)(rng() % 1000) / 1000.0f, (int)(rng() % 20) - 16);
    assert_int_equal(moecal_fp8_dequant_bf16(q, rows, cols, s, block, out, &n_nan, &amax),
                     MOECAL_OK);
    check_dequant(q, rows, cols, s, block, out, n_nan, amax);
    /* the amax alone, from the codes: the same bits and NaN count */
    {
        uint64_t n2 = 777;
        float a2 = -1.0f;
        assert_int_equal(moecal_fp8_block_amax(q, rows, cols, s, block, &n2, &a2), MOECAL_OK);
        assert_int_equal(n2, n_nan);
        assert_memory_equal(&a2, &amax, sizeof a2);
        assert_int_equal(moecal_fp8_block_amax(q, rows, cols, s, block, NULL, NULL), MOECAL_OK);
    }
    /* NULL outputs are allowed */
    assert_int_equal(moecal_fp8_dequant_bf16(q, rows, cols, s, block, out, NULL, NULL),
                     MOECAL_OK);
    free(q);
    free(s);
    free(out);
}

static void test_dequant_edges(void **state)
{
    (void)state;
    run_dequant_case(300, 200, 128, 1);   /* partial edge blocks both ways */
    run_dequant_case(128, 256, 128, 1);   /* exact multiples */
    run_dequant_case(5, 7, 128, 1);       /* one partial block */
    run_dequant_case(33, 65, 16, 0);      /* small blocks, no NaN */
    run_dequant_case(1, 1, 1, 1);
    run_dequant_case(1100, 1000, 128, 1); /* big enough for the threaded path */
}

static void test_dequant_nan_count(void **state)
{
    uint8_t q[4 * 4] = {0x7f, 0xff, 0x38, 0xb8, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0x7f, 0x7e};
    float s[4] = {1.0f, 2.0f, 0.5f, 4.0f};
    uint16_t out[16];
    uint64_t n;
    float amax;

    (void)state;
    assert_int_equal(moecal_fp8_dequant_bf16(q, 4, 4, s, 2, out, &n, &amax), MOECAL_OK);
    assert_int_equal(n, 3);
    assert_true(isnan(moecal_bf16_to_float(out[0])));
    assert_true(isnan(moecal_bf16_to_float(out[1])));
    assert_true(moecal_bf16_to_float(out[2]) == 2.0f);  /* 1.0 * 2 */
    assert_true(moecal_bf16_to_float(out[3]) == -2.0f);
    assert_true(isnan(moecal_bf16_to_float(out[14])));
    assert_true(moecal_bf16_to_float(out[15]) == 1792.0f); /* 448 * 4 */
    assert_true(amax == 1792.0f);
    /* zero-sized weights are fine */
    assert_int_equal(moecal_fp8_dequant_bf16(q, 0, 4, s, 2, out, &n, &amax), MOECAL_OK);
    assert_int_equal(n, 0);
    assert_true(amax == 0.0f);
}

static void test_dequant_bad_scales(void **state)
{
    uint8_t q[300 * 200];
    uint16_t *out = malloc(sizeof(uint16_t) * 300 * 200);
    float s[3 * 2];
    const float bad[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, -1.0f, 1e38f};
    char want[64];

    (void)state;
    assert_non_null(out);
    memset(q, 0x38, sizeof q);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        for (int j = 0; j < 6; j++)
            s[j] = 1.0f;
        s[2 * 2 + 1] = bad[i]; /* block row 2, block column 1 */
        float amax = 0;
        assert_int_equal(moecal_fp8_dequant_bf16(q, 300, 200, s, 128, out, NULL, &amax),
                         MOECAL_ERR_FORMAT);
        snprintf(want, sizeof want, "block [2, 1]");
        if (strstr(moecal_error_message(), want) == NULL)
            fail_msg("message '%s' lacks '%s'", moecal_error_message(), want);
    }
    /* a tiny positive scale (float subnormal) is valid */
    for (int j = 0; j < 6; j++)
        s[j] = u2f(1);
    assert_int_equal(moecal_fp8_dequant_bf16(q, 300, 200, s, 128, out, NULL, NULL), MOECAL_OK);
    assert_int_equal(moecal_fp8_dequant_bf16(q, 300, 200, s, 0, out, NULL, NULL),
                     MOECAL_ERR_INTERNAL);
    free(out);
}

#define AMAX_FN moecal_fp8_block_amax
/* ------------------------------------------------------------------ amax */

static float largest_scale(void)
{
    static float cached;
    uint32_t lo = 0x3f800000, hi = 0x7f800000;
    if (cached > 0.0f)
        return cached;
    while (hi - lo > 1) {
        uint32_t mid = lo + (hi - lo) / 2;
        if (isfinite(moecal_round_bf16(448.0f * u2f(mid))))
            lo = mid;
        else
            hi = mid;
    }
    cached = u2f(lo);
    return cached;
}

static float any_scale(int kind)
{
    switch (kind >= 0 ? kind : (int)(rng() % 8)) {
    case 0:
        return u2f(1 + (uint32_t)(rng() % 0x7fffff));
    case 1:
        return ldexpf(1.0f + (float)(rng() % 4096) / 4096.0f, -126 - (int)(rng() % 4));
    case 2: {
        float s = largest_scale();
        for (int k = (int)(rng() % 64); k > 0; k--)
            s = nextafterf(s, 0.0f);
        return s;
    }
    default:
        return ldexpf(1.0f + (float)(rng() % 100000) / 100000.0f, (int)(rng() % 246) - 127);
    }
}

static float out_amax(const uint16_t *out, size_t n, uint64_t *n_nan)
{
    float m = 0.0f;
    *n_nan = 0;
    for (size_t i = 0; i < n; i++) {
        float v = fabsf(moecal_bf16_to_float(out[i]));
        if (isnan(v))
            ++*n_nan;
        else if (v > m)
            m = v;
    }
    return m;
}

static void check_amax(const uint8_t *q, size_t rows, size_t cols, const float *s, size_t block)
{
    uint16_t *out = malloc((rows * cols + 1) * sizeof *out);
    uint64_t nd = 1, na = 2, ne;
    float ad = -1.0f, aa = -2.0f, ae;

    assert_non_null(out);
    assert_int_equal(moecal_fp8_dequant_bf16(q, rows, cols, s, block, out, &nd, &ad), MOECAL_OK);
    assert_int_equal(AMAX_FN(q, rows, cols, s, block, &na, &aa), MOECAL_OK);
    ae = out_amax(out, rows * cols, &ne);
    if (!(memcmp(&aa, &ad, sizeof aa) == 0 && aa == ae) || na != nd || na != ne)
        fail_msg("[%zu x %zu] block %zu: amax %a, dequant %a, max |out| %a; NaN %llu, %llu, "
                 "%llu", rows, cols, block, (double)aa, (double)ad, (double)ae,
                 (unsigned long long)na, (unsigned long long)nd, (unsigned long long)ne);
    free(out);
}

static void run_amax_case(size_t rows, size_t cols, size_t block, unsigned nan_rate,
                          int scale_kind)
{
    size_t nbr = (rows + block - 1) / block, nbc = (cols + block - 1) / block;
    uint8_t *q = malloc(rows * cols + 1), *cap = malloc(nbr * nbc);
    float *s = malloc((nbr * nbc + 1) * sizeof *s);

    assert_non_null(q);
    assert_non_null(cap);
    assert_non_null(s);
    for (size_t b = 0; b < nbr * nbc; b++) {
        cap[b] = (uint8_t)(rng() % 0x7f);
        s[b] = any_scale(scale_kind);
    }
    for (size_t r = 0; r < rows; r++) {
        for (size_t c = 0; c < cols; c++) {
            uint64_t h = rng();
            unsigned m = (unsigned)(h % (cap[(r / block) * nbc + c / block] + 1u));
            q[r * cols + c] = (uint8_t)(m | ((h >> 32) & 0x80));
            if (nan_rate && (h >> 40) % nan_rate == 0)
                q[r * cols + c] = (h & 0x100) ? 0xff : 0x7f;
        }
    }
    check_amax(q, rows, cols, s, block);
    assert_int_equal(AMAX_FN(q, rows, cols, s, block, NULL, NULL), MOECAL_OK);
    free(q);
    free(cap);
    free(s);
}

static void test_amax_random(void **state)
{
    (void)state;
    for (int i = 0; i < 50; i++) {
        int k = i % 5 - 1;
        run_amax_case(300, 200, 128, 0, k);
        run_amax_case(33, 65, 16, i % 2 ? 50 : 0, k);
        run_amax_case(37, 53, 7, 0, k);
        run_amax_case(20, 100, 40, 0, k);
        run_amax_case(5, 3, 128, 0, k);
        run_amax_case(1, 1, 1, i % 4 == 0 ? 1 : 0, k);
    }
    run_amax_case(256, 8500, 128, 0, -1);
    run_amax_case(1100, 1000, 128, 0, -1);
    run_amax_case(1100, 1000, 128, 5000, -1);
    run_amax_case(131, 129, 128, 3, -1);
}

static void test_amax_every_code(void **state)
{
    enum { R = 3, C = 37, B = 37 };
    uint8_t q[R * 2 * C];
    float s[2];

    (void)state;
    for (unsigned code = 0; code < 256; code++) {
        unsigned mag = code & 0x7f;
        for (size_t pos = 0; pos < R * B; pos++) {
            size_t r = pos / B, c = pos % B;
            for (size_t i = 0; i < sizeof q; i++) {
                uint64_t h = rng();
                unsigned m = mag > 0 && mag < 0x7f ? (unsigned)(h % mag) : (unsigned)(h % 0x7f);
                q[i] = (uint8_t)(m | ((h >> 32) & 0x80));
            }
            q[r * 2 * C + c] = (uint8_t)code;
            s[0] = any_scale(-1);
            s[1] = rng() & 1 ? any_scale(-1) : 0x1p-100f;
            check_amax(q, R, 2 * C, s, B);
        }
    }
}

static void test_amax_errors(void **state)
{
    uint8_t q[300 * 200];
    float s[3 * 2], amax = -1.0f;
    uint64_t n = 7;
    const float bad[] = {NAN, INFINITY, -INFINITY, 0.0f, -0.0f, -1.0f, 1e38f,
                         nextafterf(largest_scale(), INFINITY)};

    (void)state;
    memset(q, 0x38, sizeof q);
    for (size_t i = 0; i < sizeof bad / sizeof bad[0]; i++) {
        char want[256];
        for (int j = 0; j < 6; j++)
            s[j] = 1.0f;
        s[2 * 2 + 1] = bad[i];
        assert_int_equal(moecal_fp8_check_scales(s, 3, 2), MOECAL_ERR_FORMAT);
        snprintf(want, sizeof want, "%s", moecal_error_message());
        assert_non_null(strstr(want, "block [2, 1]"));
        assert_int_equal(AMAX_FN(q, 300, 200, s, 128, &n, &amax), MOECAL_ERR_FORMAT);
        assert_string_equal(moecal_error_message(), want);
    }
    assert_int_equal(AMAX_FN(q, 300, 200, s, 0, NULL, NULL), MOECAL_ERR_INTERNAL);
    amax = -1.0f;
    n = 7;
    assert_int_equal(AMAX_FN(q, 0, 200, s, 128, &n, &amax), MOECAL_OK);
    assert_true(amax == 0.0f);
    assert_int_equal(n, 0);
    assert_int_equal(AMAX_FN(q, 300, 0, NULL, 128, &n, &amax), MOECAL_OK);
    s[0] = largest_scale();
    q[0] = 0x7e;
    assert_int_equal(AMAX_FN(q, 1, 1, s, 128, &n, &amax), MOECAL_OK);
    assert_true(amax == u2f(0x7f7f0000));
    memset(q, 0xff, 64);
    s[0] = 1.0f;
    assert_int_equal(AMAX_FN(q, 8, 8, s, 128, &n, &amax), MOECAL_OK);
    assert_int_equal(n, 64);
    assert_true(amax == 0.0f);
}

/* ------------------------------------------------------------------ quant */

static void test_quant_block(void **state)
{
    const size_t rows = 130, cols = 260, block = 128;
    size_t nbr = 2, nbc = 3;
    float *w = malloc(rows * cols * sizeof *w), s[6], amax;
    uint8_t *q = malloc(rows * cols);
    uint16_t *out = malloc(rows * cols * sizeof *out);

    (void)state;
    assert_non_null(w);
    assert_non_null(q);
    assert_non_null(out);
    for (size_t i = 0; i < rows * cols; i++)
        w[i] = ((float)(rng() % 20001) - 10000.0f) / 1000.0f;
    /* block [1, 2] all zero */
    for (size_t r = 128; r < rows; r++)
        for (size_t c = 256; c < cols; c++)
            w[r * cols + c] = 0.0f;
    moecal_fp8_quant_block(w, rows, cols, block, q, s);
    for (size_t br = 0; br < nbr; br++) {
        for (size_t bc = 0; bc < nbc; bc++) {
            float m = 0.0f;
            for (size_t r = br * block; r < rows && r < (br + 1) * block; r++)
                for (size_t c = bc * block; c < cols && c < (bc + 1) * block; c++)
                    m = fmaxf(m, fabsf(w[r * cols + c]));
            assert_true(s[br * nbc + bc] == (m > 0 ? m / 448.0f : 1.0f));
        }
    }
    for (size_t i = 0; i < rows * cols; i++) {
        float sc = s[(i / cols / block) * nbc + (i % cols) / block];
        assert_int_equal(q[i], ref_to_e4m3(w[i] / sc));
    }
    /* dequantized weights are within e4m3's half-ulp (2^-4 relative) plus bf16 */
    assert_int_equal(moecal_fp8_dequant_bf16(q, rows, cols, s, block, out, NULL, &amax),
                     MOECAL_OK);
    for (size_t i = 0; i < rows * cols; i++) {
        float d = moecal_bf16_to_float(out[i]);
        float sc = s[(i / cols / block) * nbc + (i % cols) / block];
        assert_true(fabsf(d - w[i]) <= fabsf(w[i]) * 0.0705f + sc * 0x1p-9f);
    }
    assert_true(fabsf(amax - 10.0f) <= 10.0f * 0.01f);
    free(w);
    free(q);
    free(out);
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_e4m3_decode_all),
        cmocka_unit_test(test_e4m3_roundtrip),
        cmocka_unit_test(test_e4m3_rne_ties),
        cmocka_unit_test(test_e4m3_saturation),
        cmocka_unit_test(test_e4m3_random),
        cmocka_unit_test(test_bf16_decode_all),
        cmocka_unit_test(test_bf16_rne),
        cmocka_unit_test(test_bf16_random),
        cmocka_unit_test(test_f16_all),
        cmocka_unit_test(test_f16_rne),
        cmocka_unit_test(test_dequant_edges),
        cmocka_unit_test(test_dequant_nan_count),
        cmocka_unit_test(test_dequant_bad_scales),
        cmocka_unit_test(test_amax_random),
        cmocka_unit_test(test_amax_every_code),
        cmocka_unit_test(test_amax_errors),
        cmocka_unit_test(test_quant_block),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
