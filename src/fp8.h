/* fp8.h - scalar float formats (e4m3, bf16, f16) and FP8 block dequantization. */
#ifndef MOECAL_FP8_H
#define MOECAL_FP8_H

#include <stdint.h>
#include <stddef.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* OCP FP8 e4m3fn: bias 7, no infinities, S.1111.111 is NaN, max 448. */
float moecal_e4m3_to_float(uint8_t q);
int moecal_e4m3_is_nan(uint8_t q);
/* Round to nearest even, saturating to +-448; NaN -> 0x7f. */
uint8_t moecal_float_to_e4m3(float x);

float moecal_bf16_to_float(uint16_t b);
/* Round to nearest even (as torch's float -> bfloat16); NaN stays NaN. */
uint16_t moecal_float_to_bf16(float x);
/* x rounded to the nearest bf16, returned as float. */
float moecal_round_bf16(float x);

float moecal_f16_to_float(uint16_t h);
uint16_t moecal_float_to_f16(float x);

/* Check block scales [nbr x nbc]: NaN, Inf, zero, negative, or so large that
 * 448 * scale overflows bf16 are refused (MOECAL_ERR_FORMAT, the message names
 * the block as "block [row, col]"). */
moecal_status moecal_fp8_check_scales(const float *scale_inv, size_t nbr, size_t nbc);

/* Dequantize an FP8 weight q[rows x cols] (row-major) with scale_inv of shape
 * [ceil(rows/block) x ceil(cols/block)]: W = q * scale_inv[r/block][c/block],
 * the product taken in float32 and rounded to bf16 (RNE) into out[rows x cols].
 * Scales are checked as by moecal_fp8_check_scales first.  NaN codes are
 * counted in *n_nan (may be NULL) and dequantize to NaN; every other code
 * gives a finite value.  If amax is not NULL it receives max |W| over finite
 * elements (a bf16 value).  Multi-threaded with OpenMP for large weights. */
moecal_status moecal_fp8_dequant_bf16(const uint8_t *q, size_t rows, size_t cols,
                                      const float *scale_inv, size_t block,
                                      uint16_t *out, uint64_t *n_nan, float *amax);

/* max |W| and the NaN count of the same dequantization, without producing W:
 * rounding and a positive scale are monotone, so each block's largest code
 * magnitude gives its maximum.  Equal to the amax moecal_fp8_dequant_bf16
 * reports, bit for bit. */
moecal_status moecal_fp8_block_amax(const uint8_t *q, size_t rows, size_t cols,
                                    const float *scale_inv, size_t block, uint64_t *n_nan,
                                    float *amax);

/* Quantize a float weight w[rows x cols] to e4m3 with per-block scales:
 * scale_inv[b] = blockmax / 448 (1 for an all-zero block), q = e4m3(w / scale_inv).
 * Used by `moecal synth`. */
void moecal_fp8_quant_block(const float *w, size_t rows, size_t cols, size_t block,
                            uint8_t *q, float *scale_inv);

#ifdef __cplusplus
}
#endif
#endif
