/* nvfp4.c - NVFP4 weight quantization (see nvfp4.h for the arithmetic).
 * Every step is one float32 operation rounded on its own: no product here is
 * followed by an addition, so no contraction into a fused multiply-add can
 * change a result. */
#include "config.h"

#include <math.h>
#include <string.h>

#include "fp8.h"
#include "nvfp4.h"

/* fl32(1/2688) = 0x39C30C31 */
static float inv2688(void)
{
    union { uint32_t u; float f; } v = {0x39C30C31u};
    return v.f;
}

float moecal_nvfp4_scale2(float amax)
{
    return amax * inv2688();
}

uint8_t moecal_e2m1_encode(float q)
{
    static const float bound[7] = {0.25f, 0.75f, 1.25f, 1.75f, 2.5f, 3.5f, 5.0f};
    float a = fabsf(q);
    uint8_t i = 0;

    for (int b = 0; b < 7; b++)
        i += bound[b] < a;
    /* a tie on 0.75, 1.75 or 3.5 goes up to the even code */
    if (a == 0.75f || a == 1.75f || a == 3.5f)
        i++;
    return (uint8_t)(i | (q < 0.0f ? 8u : 0u));
}

float moecal_e2m1_decode(uint8_t code)
{
    static const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = grid[code & 7u];
    return (code & 8u) ? -v : v;
}

uint8_t moecal_nvfp4_block_scale(float bamax, float s2)
{
    float den = 6.0f * s2;
    float p = bamax / den;

    if (p == 0.0f)
        p = 1.0f;
    if (p < 0x1p-9f)
        p = 0x1p-9f;
    if (p > 448.0f)
        p = 448.0f;
    return moecal_float_to_e4m3(p);
}

void moecal_nvfp4_quantize_row_bf16(const uint16_t *w, size_t K, float s2, uint8_t *packed,
                                    uint8_t *scales)
{
    for (size_t b = 0; b < K / MOECAL_NVFP4_BLOCK; b++) {
        const uint16_t *blk = w + b * MOECAL_NVFP4_BLOCK;
        float bamax = 0.0f, x[MOECAL_NVFP4_BLOCK];
        for (int i = 0; i < MOECAL_NVFP4_BLOCK; i++) {
            x[i] = moecal_bf16_to_float(blk[i]);
            bamax = fabsf(x[i]) > bamax ? fabsf(x[i]) : bamax;
        }
        uint8_t sc = moecal_nvfp4_block_scale(bamax, s2);
        float d = moecal_e4m3_to_float(sc) * s2;
        scales[b] = sc;
        for (int i = 0; i < MOECAL_NVFP4_BLOCK; i += 2) {
            float q0 = x[i] / d, q1 = x[i + 1] / d;
            packed[b * 8 + (size_t)i / 2] =
                (uint8_t)(moecal_e2m1_encode(q0) | (moecal_e2m1_encode(q1) << 4));
        }
    }
}

void moecal_nvfp4_dequantize_row(const uint8_t *packed, const uint8_t *scales, size_t K,
                                 float s2, float *out)
{
    for (size_t k = 0; k < K; k++) {
        uint8_t byte = packed[k / 2];
        uint8_t code = (k & 1) ? (uint8_t)(byte >> 4) : (uint8_t)(byte & 15u);
        float s = moecal_e4m3_to_float(scales[k / MOECAL_NVFP4_BLOCK]);
        out[k] = moecal_e2m1_decode(code) * s * s2;
    }
}
