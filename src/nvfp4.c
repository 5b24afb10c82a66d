/* nvfp4.c - NVFP4 weight quantization (see nvfp4.h for the arithmetic,
 * nvfp4_math.h for its one definition, which the CUDA path shares). */
#include "config.h"

#include <string.h>

#include "error.h"
#include "fp8.h"
#include "nvfp4.h"

float moecal_nvfp4_scale2(float amax)
{
    return moecal_nv_scale2(amax);
}

uint8_t moecal_e2m1_encode(float q)
{
    return moecal_nv_e2m1_encode(q);
}

float moecal_e2m1_decode(uint8_t code)
{
    static const float grid[8] = {0.0f, 0.5f, 1.0f, 1.5f, 2.0f, 3.0f, 4.0f, 6.0f};
    float v = grid[code & 7u];
    return (code & 8u) ? -v : v;
}

uint8_t moecal_nvfp4_block_scale(float bamax, float s2)
{
    return moecal_nv_block_scale(bamax, s2);
}

void moecal_nvfp4_quantize_row_bf16(const uint16_t *w, size_t K, float s2, uint8_t *packed,
                                    uint8_t *scales)
{
    MOECAL_ASSERT(K % MOECAL_NVFP4_BLOCK == 0);
    for (size_t b = 0; b < K / MOECAL_NVFP4_BLOCK; b++) {
        float x[MOECAL_NVFP4_BLOCK];
        for (int i = 0; i < MOECAL_NVFP4_BLOCK; i++)
            x[i] = moecal_bf16_to_float(w[b * MOECAL_NVFP4_BLOCK + (size_t)i]);
        moecal_nv_quantize_block(x, s2, packed + b * (MOECAL_NVFP4_BLOCK / 2), scales + b);
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
