/* fp8.c - scalar float formats (e4m3fn, bf16, f16) and FP8 block dequantization.
 *
 * Every conversion works on the bit patterns with integer arithmetic, so the
 * results do not depend on the FPU rounding mode or on flush-to-zero settings
 * that a linked library may have turned on.
 */
#include "config.h"

#include <math.h>
#include <stdbool.h>
#include <stdint.h>
#include <stdlib.h>
#include <string.h>

#include "fp8.h"
#include "nvfp4_math.h" /* the e4m3 conversions, shared with CUDA */

/* ------------------------------------------------------------------ e4m3fn */

float moecal_e4m3_to_float(uint8_t q)
{
    return moecal_nv_e4m3_to_float(q);
}

int moecal_e4m3_is_nan(uint8_t q)
{
    return (q & 0x7f) == 0x7f;
}

uint8_t moecal_float_to_e4m3(float x)
{
    return moecal_nv_e4m3_from_float(x);
}

/* ------------------------------------------------------------------ bf16 */

float moecal_bf16_to_float(uint16_t b)
{
    return moecal_nv_u2f((uint32_t)b << 16);
}

uint16_t moecal_float_to_bf16(float x)
{
    return moecal_nv_bf16_rne(x); /* the GPU's dequantization rounds with it too */
}

float moecal_round_bf16(float x)
{
    return moecal_bf16_to_float(moecal_float_to_bf16(x));
}

/* ------------------------------------------------------------------ f16 */

float moecal_f16_to_float(uint16_t h)
{
    uint32_t sign = (uint32_t)(h & 0x8000) << 16;
    uint32_t e = (h >> 10) & 0x1f, m = h & 0x3ff;

    if (e == 0x1f)
        return moecal_nv_u2f(sign | 0x7f800000 | (m << 13) | (m ? 0x400000 : 0));
    if (e == 0) {
        float v = (float)m * 0x1p-24f; /* exact */
        return sign ? -v : v;
    }
    return moecal_nv_u2f(sign | ((e + 112) << 23) | (m << 13));
}

uint16_t moecal_float_to_f16(float x)
{
    uint32_t u = moecal_nv_f2u(x);
    uint16_t sign = (uint16_t)((u >> 16) & 0x8000);
    uint32_t a = u & 0x7fffffff;
    int e;

    if (a > 0x7f800000)
        return sign | 0x7e00 | (uint16_t)((a >> 13) & 0x3ff);
    /* 65520 is the midpoint between 65504 (odd mantissa) and 2^16: ties go up. */
    if (a >= 0x477ff000)
        return sign | 0x7c00;
    e = (int)(a >> 23) - 127;
    if (e >= -14) {
        uint32_t h = ((uint32_t)(e + 15) << 10) | ((a >> 13) & 0x3ff);
        uint32_t rem = a & 0x1fff;
        if (rem > 0x1000 || (rem == 0x1000 && (h & 1)))
            h++;
        return sign | (uint16_t)h;
    }
    /* Subnormal half: round(|x| * 2^24); 0x400 is the smallest normal. */
    if (e < -25)
        return sign;
    {
        uint32_t mant = (a & 0x7fffff) | 0x800000;
        return sign | (uint16_t)moecal_nv_shr_rne(mant, (unsigned)(-1 - e));
    }
}

/* ------------------------------------------------------------------ block dequant */

/* Work below this many elements per block row is not worth a thread team. */
#define DEQUANT_PAR_MIN (1u << 18)

/* One row segment inside one block: codes -> bf16 through the block's table;
 * returns the largest finite code magnitude.  Codes are monotone in |value|
 * and the scale is positive, so the segment's amax is that code's table
 * entry.  NaN codes are rare: a plain byte max finds whether there are any,
 * and only then a second pass counts them. */
typedef unsigned char v16u8 __attribute__((vector_size(16)));

static inline unsigned seg_maxcode(const uint8_t *q, size_t n, uint64_t *nan)
{
    unsigned char mmax = 0;
    size_t j = 0;

    /* Byte max, 16 lanes at a time with GCC/clang vector extensions: the
     * plain loop is left scalar by -O2's cost model. */
    if (n >= 16) {
        v16u8 acc = {0}, mask7f;
        for (int l = 0; l < 16; l++)
            mask7f[l] = 0x7f;
        for (; j + 16 <= n; j += 16) {
            v16u8 v;
            memcpy(&v, q + j, sizeof v);
            v &= mask7f;
            v16u8 gt = (v16u8)(v > acc);
            acc = (v & gt) | (acc & ~gt);
        }
        for (int l = 0; l < 16; l++)
            mmax = acc[l] > mmax ? acc[l] : mmax;
    }
    for (; j < n; j++) {
        unsigned char m = q[j] & 0x7f;
        mmax = m > mmax ? m : mmax;
    }
    if (mmax == 0x7f) {
        uint64_t nn = 0;
        mmax = 0;
        for (size_t i = 0; i < n; i++) {
            unsigned char m = q[i] & 0x7f;
            if (m == 0x7f)
                nn++;
            else if (m > mmax)
                mmax = m;
        }
        *nan += nn;
    }
    return mmax;
}

static inline unsigned seg_dequant(const uint8_t *q, size_t n, const uint16_t *tab,
                                   uint16_t *out, uint64_t *nan)
{
    for (size_t i = 0; i < n; i++)
        out[i] = tab[q[i]];
    return seg_maxcode(q, n, nan);
}

moecal_status moecal_fp8_check_scales(const float *scale_inv, size_t nbr, size_t nbc)
{
    /* Besides NaN/Inf/<= 0, a scale for which 448 * scale is not a finite
     * bf16 would turn finite codes into Inf: no real checkpoint has one, and
     * refusing it keeps every finite code finite (and amax simple). */
    for (size_t br = 0; br < nbr; br++) {
        for (size_t bc = 0; bc < nbc; bc++) {
            float s = scale_inv[br * nbc + bc];
            if (!(s > 0.0f) || !isfinite(s))
                return moecal_error_set(MOECAL_ERR_FORMAT,
                                        "weight_scale_inv block [%zu, %zu] is %g "
                                        "(must be finite and > 0)", br, bc, (double)s);
            if (!isfinite(moecal_round_bf16(448.0f * s)))
                return moecal_error_set(MOECAL_ERR_FORMAT,
                                        "weight_scale_inv block [%zu, %zu] is %g, so large "
                                        "that 448 * scale overflows bf16", br, bc, (double)s);
        }
    }
    return MOECAL_OK;
}

/* Common start of the block functions: block counts, outputs zeroed, scales
 * checked.  Returns true when the caller is done (*rc: error or empty). */
static bool blocks_begin(size_t rows, size_t cols, const float *scale_inv, size_t block,
                         const char *what, size_t *nbr, size_t *nbc, uint64_t *n_nan,
                         float *amax, moecal_status *rc)
{
    *rc = MOECAL_OK;
    if (block == 0) {
        *rc = moecal_error_set(MOECAL_ERR_INTERNAL, "FP8 %s with block size 0", what);
        return true;
    }
    *nbr = rows / block + (rows % block != 0);
    *nbc = cols / block + (cols % block != 0);
    if (n_nan)
        *n_nan = 0;
    if (amax)
        *amax = 0.0f;
    if (rows == 0 || cols == 0)
        return true;
    *rc = moecal_fp8_check_scales(scale_inv, *nbr, *nbc);
    return *rc != MOECAL_OK;
}

moecal_status moecal_fp8_dequant_bf16(const uint8_t *q, size_t rows, size_t cols,
                                      const float *scale_inv, size_t block,
                                      uint16_t *out, uint64_t *n_nan, float *amax)
{
    size_t nbr, nbc;
    moecal_status rc;
    float lut[256];
    uint64_t nan_total = 0;
    float amax_total = 0.0f;
    uint16_t *tabs;

    /* Refuse bad scales before writing anything. */
    if (blocks_begin(rows, cols, scale_inv, block, "dequantization", &nbr, &nbc, n_nan, amax,
                     &rc))
        return rc;

    for (int c = 0; c < 256; c++)
        lut[c] = moecal_e4m3_to_float((uint8_t)c);

    /* One 256-entry bf16 table per column block of the current block row:
     * 256 multiplies replace the block*block multiplies of the block. */
    if (nbc > SIZE_MAX / (256 * sizeof *tabs))
        return moecal_error_set(MOECAL_ERR_NOMEM, "FP8 dequantization: %zu column blocks", nbc);
    tabs = malloc(nbc * 256 * sizeof *tabs);
    if (tabs == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM,
                                "FP8 dequantization: cannot allocate %zu lookup tables", nbc);

    for (size_t br = 0; br < nbr; br++) {
        size_t r0 = br * block, r1 = r0 + block < rows ? r0 + block : rows;
        uint64_t nan_br = 0;
        unsigned par = (r1 - r0) * cols >= DEQUANT_PAR_MIN;
        float amax_br = 0.0f;

        (void)par;
        for (size_t bc = 0; bc < nbc; bc++) {
            float s = scale_inv[br * nbc + bc];
            uint16_t *t = tabs + bc * 256;
            for (int c = 0; c < 256; c++)
                t[c] = moecal_float_to_bf16(lut[c] * s);
        }

#ifdef _OPENMP
#pragma omp parallel for if(par) schedule(static) \
    reduction(+:nan_br) reduction(max:amax_br)
#endif
        for (size_t r = r0; r < r1; r++) {
            const uint8_t *qr = q + r * cols;
            uint16_t *orow = out + r * cols;
            for (size_t bc = 0; bc < nbc; bc++) {
                size_t c0 = bc * block, n = c0 + block < cols ? block : cols - c0;
                const uint16_t *t = tabs + bc * 256;
                unsigned mmax = seg_dequant(qr + c0, n, t, orow + c0, &nan_br);
                float v = moecal_bf16_to_float(t[mmax]);
                amax_br = v > amax_br ? v : amax_br;
            }
        }
        nan_total += nan_br;
        amax_total = amax_br > amax_total ? amax_br : amax_total;
    }
    free(tabs);
    if (n_nan)
        *n_nan = nan_total;
    if (amax)
        *amax = amax_total;
    return MOECAL_OK;
}

moecal_status moecal_fp8_block_amax(const uint8_t *q, size_t rows, size_t cols,
                                    const float *scale_inv, size_t block, uint64_t *n_nan,
                                    float *amax)
{
    size_t nbr, nbc;
    moecal_status rc;
    uint64_t nan_total = 0;
    float amax_total = 0.0f;

    if (blocks_begin(rows, cols, scale_inv, block, "amax", &nbr, &nbc, n_nan, amax, &rc))
        return rc;

    for (size_t br = 0; br < nbr; br++) {
        size_t r0 = br * block, r1 = r0 + block < rows ? r0 + block : rows;
        for (size_t bc = 0; bc < nbc; bc++) {
            size_t c0 = bc * block, n = c0 + block < cols ? block : cols - c0;
            unsigned mmax = 0;
            for (size_t r = r0; r < r1; r++) {
                unsigned m = seg_maxcode(q + r * cols + c0, n, &nan_total);
                mmax = m > mmax ? m : mmax;
            }
            /* the value dequantization gives this code, as its table does */
            float v = moecal_bf16_to_float(moecal_float_to_bf16(
                moecal_e4m3_to_float((uint8_t)mmax) * scale_inv[br * nbc + bc]));
            amax_total = v > amax_total ? v : amax_total;
        }
    }
    if (n_nan)
        *n_nan = nan_total;
    if (amax)
        *amax = amax_total;
    return MOECAL_OK;
}

/* ------------------------------------------------------------------ block quant */

void moecal_fp8_quant_block(const float *w, size_t rows, size_t cols, size_t block,
                            uint8_t *q, float *scale_inv)
{
    size_t nbr, nbc;

    if (block == 0)
        return;
    nbr = rows / block + (rows % block != 0);
    nbc = cols / block + (cols % block != 0);
    for (size_t br = 0; br < nbr; br++) {
        size_t r0 = br * block, r1 = r0 + block < rows ? r0 + block : rows;
        for (size_t bc = 0; bc < nbc; bc++) {
            size_t c0 = bc * block, c1 = c0 + block < cols ? c0 + block : cols;
            float m = 0.0f, s;
            for (size_t r = r0; r < r1; r++)
                for (size_t c = c0; c < c1; c++)
                    m = fmaxf(m, fabsf(w[r * cols + c]));
            s = m > 0.0f ? m / 448.0f : 1.0f;
            scale_inv[br * nbc + bc] = s;
            for (size_t r = r0; r < r1; r++)
                for (size_t c = c0; c < c1; c++)
                    q[r * cols + c] = moecal_float_to_e4m3(w[r * cols + c] / s);
        }
    }
}
