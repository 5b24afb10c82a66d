/* test_nvfp4.c - NVFP4 arithmetic: the worked examples byte for byte, E2M1
 * rounding over every tie, neighbour, saturation and sign case plus a sweep,
 * the E4M3 cast of every representable value and every midpoint, and the
 * round trip of a quantized row within half a step of its block's grid. */
#include <stdarg.h>
#include <stddef.h>
#include <setjmp.h>
#include <stdint.h>
#include <cmocka.h>

#include <math.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"
#include "nvfp4.h"

static uint32_t bits(float f)
{
    uint32_t u;
    memcpy(&u, &f, sizeof u);
    return u;
}

static float from_bits(uint32_t u)
{
    float f;
    memcpy(&f, &u, sizeof f);
    return f;
}

static uint16_t bf(float x)
{
    uint16_t b = moecal_float_to_bf16(x);
    assert_true(moecal_bf16_to_float(b) == x); /* the examples are bf16 values */
    return b;
}

/* ------------------------------------------------------------------ examples */

static void quantize_block(const float *w, float amax, uint8_t packed[8], uint8_t *scale,
                           float *s2)
{
    uint16_t row[16];
    for (int i = 0; i < 16; i++)
        row[i] = bf(w[i]);
    *s2 = moecal_nvfp4_scale2(amax);
    moecal_nvfp4_quantize_row_bf16(row, 16, *s2, packed, scale);
}

static void test_example1(void **state)
{
    (void)state;
    const float w[16] = {0.5f, -0.25f, 0.125f, 0.0f, 1.0f, -0.75f, 0.375f, 0.3125f, -0.0625f,
                         0.03125f, 0.875f, -0.4375f, 0.6875f, 0.1875f, -0.625f, 0.015625f};
    const uint8_t want[8] = {0xB5, 0x02, 0xE7, 0x44, 0x09, 0xD7, 0x26, 0x0E};
    uint8_t packed[8], scale;
    float s2;
    quantize_block(w, 1.5f, packed, &scale, &s2);
    assert_int_equal(bits(s2), 0x3A124925u);
    assert_int_equal(scale, 0x79);
    assert_memory_equal(packed, want, 8);
}

static void test_example2_ties(void **state)
{
    (void)state;
    const float w[16] = {0.15625f, 0.046875f, 0.015625f, 0.21875f, 0.3125f, 0.375f, -0.078125f,
                         0.109375f, 0, 0, 0, 0, 0, 0, 0, -0.0078125f};
    const uint8_t want[8] = {0x24, 0x60, 0x76, 0x4A, 0x00, 0x00, 0x00, 0x80};
    uint8_t packed[8], scale;
    float s2;
    quantize_block(w, 2.625f, packed, &scale, &s2);
    assert_int_equal(bits(s2), 0x3A800000u); /* 2^-10 exactly */
    assert_int_equal(scale, 0x68);
    assert_memory_equal(packed, want, 8);
}

static void test_example3_zero_and_tiny(void **state)
{
    (void)state;
    const float zero[16] = {0};
    float tiny[16] = {0};
    uint8_t packed[8], scale;
    const uint8_t zeros[8] = {0};
    float s2;
    quantize_block(zero, 1.5f, packed, &scale, &s2);
    assert_int_equal(scale, 0x38);
    assert_memory_equal(packed, zeros, 8);
    tiny[0] = moecal_bf16_to_float(moecal_float_to_bf16(1e-7f));
    quantize_block(tiny, 1.5f, packed, &scale, &s2);
    assert_int_equal(scale, 0x01); /* clamped to 2^-9 */
    assert_memory_equal(packed, zeros, 8);
}

/* s2 is the product with fl32(1/2688), not the division: one ulp apart for
 * amax 1.03125 (0x39C92493 against 0x39C92492). */
static void test_scale2_product(void **state)
{
    (void)state;
    assert_int_equal(bits(moecal_nvfp4_scale2(1.03125f)), 0x39C92493u);
    assert_int_equal(bits(1.03125f / 2688.0f), 0x39C92492u);
    int differ = 0;
    for (uint32_t b = 0; b < 0x10000; b++) {
        float a = moecal_bf16_to_float((uint16_t)b);
        if (!(a >= 0x1p-7f && a < 512.0f))
            continue;
        float p = moecal_nvfp4_scale2(a);
        assert_true(p == a * from_bits(0x39C30C31u));
        differ += p != a / 2688.0f;
    }
    /* 448 of the 2048 bf16 values in [2^-7, 512) round differently */
    assert_int_equal(differ, 448);
}

/* ------------------------------------------------------------------ E2M1 */

/* nearest grid value; a tie goes to the even code */
static uint8_t ref_e2m1(float q)
{
    static const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    double a = fabs((double)q);
    int best = 0;
    for (int i = 1; i < 8; i++) {
        double d = fabs(a - grid[i]), db = fabs(a - grid[best]);
        if (d < db || (d == db && (i & 1) == 0))
            best = i;
    }
    if (isnan(q))
        best = 0;
    return (uint8_t)(best | (q < 0.0f ? 8 : 0));
}

static void check_e2m1(float q)
{
    uint8_t got = moecal_e2m1_encode(q), want = ref_e2m1(q);
    if (got != want)
        fail_msg("e2m1(%a) = 0x%x, want 0x%x", (double)q, got, want);
}

static void test_e2m1(void **state)
{
    (void)state;
    /* the ties, as the table of the format's reference says */
    const float tie[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    const uint8_t tie_code[7] = {0, 2, 2, 4, 4, 6, 6};
    for (int i = 0; i < 7; i++) {
        assert_int_equal(moecal_e2m1_encode(tie[i]), tie_code[i]);
        assert_int_equal(moecal_e2m1_encode(-tie[i]), tie_code[i] | 8);
        check_e2m1(tie[i]);
        check_e2m1(nextafterf(tie[i], 0.0f));
        check_e2m1(nextafterf(tie[i], 10.0f));
        check_e2m1(-nextafterf(tie[i], 10.0f));
    }
    /* every grid value, saturation, zeros and tiny negatives */
    for (int c = 0; c < 16; c++)
        assert_int_equal(moecal_e2m1_encode(moecal_e2m1_decode((uint8_t)c)), c == 8 ? 0 : c);
    assert_int_equal(moecal_e2m1_encode(6.0f), 7);
    assert_int_equal(moecal_e2m1_encode(7.5f), 7);
    assert_int_equal(moecal_e2m1_encode(1e30f), 7);
    assert_int_equal(moecal_e2m1_encode(INFINITY), 7);
    assert_int_equal(moecal_e2m1_encode(-INFINITY), 15);
    assert_int_equal(moecal_e2m1_encode(0.0f), 0);
    assert_int_equal(moecal_e2m1_encode(-0.0f), 0);    /* sign from q < 0 */
    assert_int_equal(moecal_e2m1_encode(-0.1f), 8);    /* negative zero code */
    assert_int_equal(moecal_e2m1_encode(-1e-30f), 8);
    assert_true(moecal_e2m1_decode(8) == 0.0f && signbit(moecal_e2m1_decode(8)));
    /* every float in [0, 8), one of every 61 bit patterns, both signs */
    for (uint32_t u = 0; u < 0x41000000u; u += 61) {
        check_e2m1(from_bits(u));
        check_e2m1(-from_bits(u));
    }
}

/* ------------------------------------------------------------------ E4M3 */

static void test_e4m3_cast(void **state)
{
    (void)state;
    /* every representable value maps to its code */
    for (int c = 0; c < 256; c++) {
        if (moecal_e4m3_is_nan((uint8_t)c))
            continue;
        float v = moecal_e4m3_to_float((uint8_t)c);
        uint8_t got = moecal_float_to_e4m3(v);
        if (got != c && !(c == 0x80 && got == 0x80))
            fail_msg("e4m3(%a) = 0x%02x, want 0x%02x", (double)v, got, c);
    }
    /* every midpoint between neighbours goes to the even code; a hair off
     * it goes to the nearer one */
    for (int c = 0; c < 0x7e; c++) {
        float lo = moecal_e4m3_to_float((uint8_t)c), hi = moecal_e4m3_to_float((uint8_t)(c + 1));
        float mid = (lo + hi) / 2.0f; /* exact: both fit in 4 bits */
        assert_true(mid > lo && mid < hi);
        uint8_t even = (c & 1) ? (uint8_t)(c + 1) : (uint8_t)c;
        if (moecal_float_to_e4m3(mid) != even)
            fail_msg("e4m3 midpoint %a: 0x%02x, want 0x%02x", (double)mid,
                     moecal_float_to_e4m3(mid), even);
        assert_int_equal(moecal_float_to_e4m3(nextafterf(mid, 0.0f)), c);
        assert_int_equal(moecal_float_to_e4m3(nextafterf(mid, 1000.0f)), c + 1);
        assert_int_equal(moecal_float_to_e4m3(-mid), even | 0x80);
    }
    /* block scales: clamped to [2^-9, 448], zero -> 1.0 */
    assert_int_equal(moecal_nvfp4_block_scale(0.0f, 1.0f), 0x38);
    assert_int_equal(moecal_nvfp4_block_scale(1e-30f, 1.0f), 0x01);
    assert_int_equal(moecal_nvfp4_block_scale(1e30f, 1.0f), 0x7e);
    assert_int_equal(moecal_nvfp4_block_scale(6.0f * 448.0f, 1.0f), 0x7e);
    assert_int_equal(moecal_nvfp4_block_scale(6.0f, 1.0f), 0x38);
}

/* ------------------------------------------------------------------ round trip */

/* Dequantized rows are within half a grid step of the source: per element,
 * |W - deq| <= half the spacing of the E2M1 grid at q, times the block's
 * scale, unless q saturated (only possible when the E4M3 scale rounded down). */
static void test_round_trip(void **state)
{
    (void)state;
    enum { K = 256, ROWS = 64 };
    uint16_t w[K];
    uint8_t packed[K / 2], scales[K / 16];
    float deq[K];
    uint64_t r = 0x243f6a8885a308d3ull;
    for (int row = 0; row < ROWS; row++) {
        float amax = 0.0f;
        double spread = ldexp(1.0, row % 24 - 12);
        for (int k = 0; k < K; k++) {
            r ^= r << 13; r ^= r >> 7; r ^= r << 17;
            double u = (double)(r >> 11) / 9007199254740992.0 * 2.0 - 1.0;
            double v = u * spread * ((k % 16 == 3) ? 30.0 : 1.0);
            w[k] = moecal_float_to_bf16((float)v);
            amax = fmaxf(amax, fabsf(moecal_bf16_to_float(w[k])));
        }
        float s2 = moecal_nvfp4_scale2(amax);
        moecal_nvfp4_quantize_row_bf16(w, K, s2, packed, scales);
        moecal_nvfp4_dequantize_row(packed, scales, K, s2, deq);
        for (int k = 0; k < K; k++) {
            float d = moecal_e4m3_to_float(scales[k / 16]) * s2;
            float x = moecal_bf16_to_float(w[k]), q = fabsf(x / d);
            float step = q < 2.0f ? 0.5f : q < 4.0f ? 1.0f : 2.0f;
            double err = fabs((double)x - deq[k]);
            if (q <= 6.0f + 1e-6f && err > 0.5 * step * d * (1.0 + 1e-6))
                fail_msg("row %d k %d: %a dequantizes to %a (step %g)", row, k, (double)x,
                         (double)deq[k], (double)(step * d));
        }
    }
}

int main(void)
{
    const struct CMUnitTest tests[] = {
        cmocka_unit_test(test_example1),
        cmocka_unit_test(test_example2_ties),
        cmocka_unit_test(test_example3_zero_and_tiny),
        cmocka_unit_test(test_scale2_product),
        cmocka_unit_test(test_e2m1),
        cmocka_unit_test(test_e4m3_cast),
        cmocka_unit_test(test_round_trip),
    };
    return cmocka_run_group_tests(tests, NULL, NULL);
}
