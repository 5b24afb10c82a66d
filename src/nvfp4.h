/* nvfp4.h - NVFP4 weight quantization, bit for bit as Model-Optimizer's
 * export writes it (doc/EXPORT.md has the facts and where they come from).
 *
 * A weight W [N, K] (K a multiple of 16) with per-tensor amax A becomes
 *
 *   weight_scale_2  s2 = A * fl32(1/2688)          (2688 = 6 * 448; float32
 *                   product with the rounded reciprocal, as PyTorch computes
 *                   tensor / 2688 on CUDA, where the checkpoints are made)
 *   weight_scale    per block of 16 columns of a row: pbs = fl32(bamax /
 *                   fl32(6 * s2)), 1.0 when 0, clamped to [2^-9, 448], cast
 *                   to E4M3 (round to nearest even)
 *   weight          q = fl32(W / fl32(e4m3(pbs) * s2)) rounded to E2M1 (ties
 *                   to the even code, saturating at 6, -0 and tiny negatives
 *                   to code 8), two codes per byte, the even element in the
 *                   low nibble
 *
 * The input scale is the same product, input_amax * fl32(1/2688).
 * No MPI, no allocation: fuzzed and tested alone.
 */
#ifndef MOECAL_NVFP4_H
#define MOECAL_NVFP4_H

#include <stddef.h>
#include <stdint.h>

#include "nvfp4_math.h" /* the arithmetic, shared with the CUDA path */

#ifdef __cplusplus
extern "C" {
#endif

/* A * fl32(1/2688): weight_scale_2 from a weight amax, input_scale from an
 * input amax. */
float moecal_nvfp4_scale2(float amax);

/* E2M1 code (4 bits) of a float32 value, ties to the even code. */
uint8_t moecal_e2m1_encode(float q);
/* The value of an E2M1 code: {0, .5, 1, 1.5, 2, 3, 4, 6}, bit 3 the sign. */
float moecal_e2m1_decode(uint8_t code);

/* The E4M3 block scale of a block whose max |W| is bamax. */
uint8_t moecal_nvfp4_block_scale(float bamax, float s2);

/* Quantize one row of K bf16 values (K % 16 == 0): packed [K/2] bytes and
 * scales [K/16] E4M3 bytes. */
void moecal_nvfp4_quantize_row_bf16(const uint16_t *w, size_t K, float s2, uint8_t *packed,
                                    uint8_t *scales);

/* Dequantize one row back to float32 (for checks). */
void moecal_nvfp4_dequantize_row(const uint8_t *packed, const uint8_t *scales, size_t K,
                                 float s2, float *out);

#ifdef __cplusplus
}
#endif
#endif
