/* nvfp4_math.h - the arithmetic of NVFP4 quantization, one definition for
 * the CPU (nvfp4.c, fp8.c) and the GPU (cuda/nvfp4_cuda.cu), so that both
 * write the same bytes by construction.
 *
 * Every step is one float32 operation rounded on its own (a product or a
 * quotient, never a product followed by an addition, so no compiler can
 * contract two steps into one fused multiply-add); the format conversions
 * work on bit patterns with integer arithmetic.  nvfp4.h says what the
 * steps compute and where the definition comes from.  The float/bit casts
 * (moecal_nv_f2u, moecal_nv_u2f) serve the other host code too.
 */
#ifndef MOECAL_NVFP4_MATH_H
#define MOECAL_NVFP4_MATH_H

#include <stdint.h>

#if defined(__CUDACC__)
#define MOECAL_NV_FN static __host__ __device__ __forceinline__
#else
#define MOECAL_NV_FN static inline
#endif

#define MOECAL_NVFP4_BLOCK 16

MOECAL_NV_FN uint32_t moecal_nv_f2u(float x)
{
#if defined(__CUDA_ARCH__)
    return __float_as_uint(x);
#else
    union { float f; uint32_t u; } v;
    v.f = x;
    return v.u;
#endif
}

MOECAL_NV_FN float moecal_nv_u2f(uint32_t u)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float(u);
#else
    union { uint32_t u; float f; } v;
    v.u = u;
    return v.f;
#endif
}

/* One rounded float32 product or quotient (IEEE, nearest even). */
MOECAL_NV_FN float moecal_nv_mul(float a, float b)
{
#if defined(__CUDA_ARCH__)
    return __fmul_rn(a, b);
#else
    return a * b;
#endif
}

MOECAL_NV_FN float moecal_nv_div(float a, float b)
{
#if defined(__CUDA_ARCH__)
    return __fdiv_rn(a, b);
#else
    return a / b;
#endif
}

/* bf16 bits of x, round to nearest even (overflow carries into Inf); a NaN
 * keeps its sign and payload top and is made quiet.  moecal_float_to_bf16
 * on the host, and the rounding of FP8 dequantization on the GPU. */
MOECAL_NV_FN uint16_t moecal_nv_bf16_rne(float x)
{
    uint32_t u = moecal_nv_f2u(x);
    if ((u & 0x7fffffffu) > 0x7f800000u)
        return (uint16_t)((u >> 16) | 0x40u);
    u += 0x7fffu + ((u >> 16) & 1u);
    return (uint16_t)(u >> 16);
}

/* m >> s rounded to nearest, ties to even; m < 2^31, 1 <= s <= 31. */
MOECAL_NV_FN uint32_t moecal_nv_shr_rne(uint32_t m, unsigned s)
{
    uint32_t q = m >> s, rem = m & ((UINT32_C(1) << s) - 1), half = UINT32_C(1) << (s - 1);

    if (rem > half || (rem == half && (q & 1)))
        q++;
    return q;
}

/* float32 -> E4M3 (e4m3fn), round to nearest even, saturating at 448;
 * NaN -> 0x7f. */
MOECAL_NV_FN uint8_t moecal_nv_e4m3_from_float(float x)
{
    uint32_t u = moecal_nv_f2u(x);
    uint8_t sign = (uint8_t)((u >> 24) & 0x80);
    uint32_t a = u & 0x7fffffff;
    int e;

    if (a > 0x7f800000)
        return 0x7f;
    /* >= 448 (including Inf) saturates; nothing in [448, 464) rounds elsewhere. */
    if (a >= 0x43e00000)
        return sign | 0x7e;
    e = (int)(a >> 23) - 127;
    if (e >= -6) {
        /* Normal e4m3: keep 3 of the 23 mantissa bits; a carry into the
         * exponent field is the correct next binade. */
        uint32_t q = ((uint32_t)(e + 7) << 3) | ((a >> 20) & 7);
        uint32_t rem = a & 0xfffff;
        if (rem > 0x80000 || (rem == 0x80000 && (q & 1)))
            q++;
        if (q > 0x7e)
            q = 0x7e;
        return sign | (uint8_t)q;
    }
    /* Subnormal e4m3: the code is round(|x| * 2^9), 8 meaning the smallest
     * normal, which is also its encoding.  Below 2^-10 it is 0. */
    if (e < -11)
        return sign;
    return sign | (uint8_t)moecal_nv_shr_rne((a & 0x7fffff) | 0x800000, (unsigned)(14 - e));
}

/* E4M3 -> float32, exact. */
MOECAL_NV_FN float moecal_nv_e4m3_to_float(uint8_t q)
{
    uint32_t sign = (uint32_t)(q & 0x80) << 24;
    uint32_t e = (q >> 3) & 0xf, m = q & 7;

    if ((q & 0x7f) == 0x7f)
        return moecal_nv_u2f(sign | UINT32_C(0x7fc00000));
    if (e == 0) /* subnormal: m * 2^-9 */
        return moecal_nv_u2f(sign | moecal_nv_f2u((float)m * 0.001953125f));
    return moecal_nv_u2f(sign | ((e + 120) << 23) | (m << 20));
}

/* s2 = A * fl32(1/2688), fl32(1/2688) = 0x39C30C31. */
MOECAL_NV_FN float moecal_nv_scale2(float amax)
{
    return moecal_nv_mul(amax, moecal_nv_u2f(UINT32_C(0x39C30C31)));
}

/* E2M1 code of q: ties to the even code, saturating at 6; the sign bit from
 * q < 0, so a negative that rounds to 0 gives code 8 and -0.0 gives 0 (as
 * torch's sign() does in Model-Optimizer's cast). */
MOECAL_NV_FN uint8_t moecal_nv_e2m1_encode(float q)
{
    uint32_t u = moecal_nv_f2u(q);
    float a = moecal_nv_u2f(u & 0x7fffffffu);
    uint8_t i = (uint8_t)((0.25f < a) + (0.75f < a) + (1.25f < a) + (1.75f < a) + (2.5f < a) +
                          (3.5f < a) + (5.0f < a));
    /* a tie on 0.75, 1.75 or 3.5 goes up to the even code */
    i = (uint8_t)(i + (a == 0.75f || a == 1.75f || a == 3.5f));
    return (uint8_t)(i | (q < 0.0f ? 8u : 0u));
}

/* The E4M3 block scale of a block whose max |W| is bamax:
 * e4m3(clamp(bamax / fl32(6 * s2), 2^-9, 448)), 1.0 for an all-zero block. */
MOECAL_NV_FN uint8_t moecal_nv_block_scale(float bamax, float s2)
{
    float p = moecal_nv_div(bamax, moecal_nv_mul(6.0f, s2));

    if (p == 0.0f)
        p = 1.0f;
    if (p < 0.001953125f) /* 2^-9 */
        p = 0.001953125f;
    if (p > 448.0f)
        p = 448.0f;
    return moecal_nv_e4m3_from_float(p);
}

/* One block of 16 values: its E4M3 scale in *scale, 8 packed bytes (the even
 * element in the low nibble). */
MOECAL_NV_FN void moecal_nv_quantize_block(const float *x, float s2, uint8_t *packed,
                                           uint8_t *scale)
{
    float bamax = 0.0f;
    for (int i = 0; i < MOECAL_NVFP4_BLOCK; i++) {
        float a = moecal_nv_u2f(moecal_nv_f2u(x[i]) & 0x7fffffffu);
        bamax = a > bamax ? a : bamax;
    }
    const uint8_t sc = moecal_nv_block_scale(bamax, s2);
    const float d = moecal_nv_mul(moecal_nv_e4m3_to_float(sc), s2);
    *scale = sc;
    for (int i = 0; i < MOECAL_NVFP4_BLOCK; i += 2)
        packed[i / 2] = (uint8_t)(moecal_nv_e2m1_encode(moecal_nv_div(x[i], d)) |
                                  (moecal_nv_e2m1_encode(moecal_nv_div(x[i + 1], d)) << 4));
}

#endif
