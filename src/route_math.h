/* route_math.h - the router's arithmetic, bit-identical on the CPU and the GPU.
 *
 * Expert selection compares float32 values: a top-k boundary or a group
 * boundary can sit within one rounding of a tie, so two backends choose the
 * same experts for every token only if they compute bit-identical choice
 * values.  A BLAS sgemm does not give that: its summation order belongs to
 * the library, its kernel and the CPU it runs on.  Nor does expf: glibc,
 * CUDA and other libms round differently in some cases.  This header fixes
 * both, in plain C that nvcc compiles for the device too:
 *
 *   logit = (float) sum_h x[h] * g[h] in double, in blocks of
 *     MOECAL_RM_BLOCK (512) consecutive h: each block's products summed in
 *     ascending h from +0.0, then the block sums in ascending order from
 *     +0.0.  x is bf16 (8 significant bits), g float32 (24), so each product
 *     is exact in double and fma(x, g, acc) == acc + x * g: contraction by the
 *     compiler cannot change the result; no sum is ever -0.0, so zero padding
 *     (g = 0 or x = 0 terms at the end) changes nothing either.  The double
 *     sum is far more accurate than a float32 GEMM; it is rounded once to
 *     float32.  The blocks bound how far any other order of the same sums
 *     can be from it (2 (gamma_512 + gamma_(H/512)) sum |x g|, 14 times less
 *     than one chain of 7168), which lets the CUDA backend take the block
 *     sums from a DGEMM and check them (kernels.cuh).
 *
 *   moecal_route_expf(x) = (float) exp(x), from a fixed sequence of double
 *     operations (explicit fma, rint, ldexp), so every IEEE-754 machine
 *     returns the same bits.  Its error before the final rounding is about
 *     1e-16 relative, so the result is the correctly rounded float except in
 *     rare midpoint cases, where it is still identical everywhere.
 *
 * Everything after these two (sigmoid as 1 / (1 + exp(-l)), softmax as
 * exp(l - max) / sum in ascending order, + bias, group top-2 sums, top-k
 * comparisons) is single float32 operations, which IEEE-754 fixes exactly,
 * as long as nothing is compiled with -ffast-math / -use_fast_math.
 *
 * The logit precision (--router-logits) says how the double sum becomes the
 * value the score function sees, one rounding in every case:
 *
 *   fp32   (float) sum: what a float32 linear layer computes, up to its own
 *          summation error (transformers' DeepseekV3, the dsv3 router GEMMs);
 *   bf16   sum rounded once to bf16, round to nearest even (a bf16 linear
 *          layer: transformers' Qwen3-MoE and Mixtral, most serving
 *          engines).  Rounding the float32 value again would round twice
 *          and differ where the float lands on a bf16 midpoint;
 *   exact  not rounded: the score function, the bias, the group sums and
 *          the comparisons run in double (moecal_route_exp), a reference
 *          that no deployed model computes but that depends on no dtype.
 */
#ifndef MOECAL_ROUTE_MATH_H
#define MOECAL_ROUTE_MATH_H

#include <math.h>
#include <stddef.h>
#include <stdint.h>

#if defined(__CUDACC__)
#define MOECAL_RM_FN static __host__ __device__ __forceinline__
#else
#define MOECAL_RM_FN static inline
#endif

/* bf16 bits -> float (exact). */
MOECAL_RM_FN float moecal_rm_bf16(uint16_t u)
{
#if defined(__CUDA_ARCH__)
    return __uint_as_float((unsigned)u << 16);
#else
    union { uint32_t u; float f; } v;
    v.u = (uint32_t)u << 16;
    return v.f;
#endif
}

#define MOECAL_RM_BLOCK 512

/* One router logit: x [H] bf16, g [H] float32. */
MOECAL_RM_FN float moecal_route_logit(const uint16_t *x, const float *g, size_t H)
{
    double tot = 0.0;
    for (size_t h0 = 0; h0 < H; h0 += MOECAL_RM_BLOCK) {
        size_t h1 = H - h0 < MOECAL_RM_BLOCK ? H : h0 + MOECAL_RM_BLOCK;
        double acc = 0.0;
        for (size_t h = h0; h < h1; h++)
            acc = fma((double)moecal_rm_bf16(x[h]), (double)g[h], acc);
        tot += acc;
    }
    return (float)tot;
}

/* The same from x already widened to float (exact: x holds bf16 values), as
 * the CPU backend keeps its rows; the double sum before any rounding. */
MOECAL_RM_FN double moecal_route_logit_fd(const float *x, const float *g, size_t H)
{
    double tot = 0.0;
    for (size_t h0 = 0; h0 < H; h0 += MOECAL_RM_BLOCK) {
        size_t h1 = H - h0 < MOECAL_RM_BLOCK ? H : h0 + MOECAL_RM_BLOCK;
        double acc = 0.0;
        for (size_t h = h0; h < h1; h++)
            acc = fma((double)x[h], (double)g[h], acc);
        tot += acc;
    }
    return tot;
}

MOECAL_RM_FN float moecal_route_logit_f(const float *x, const float *g, size_t H)
{
    return (float)moecal_route_logit_fd(x, g, H);
}

/* Logit precisions (--router-logits); the values are stored in files. */
typedef enum moecal_logit_prec {
    MOECAL_LOGITS_FP32 = 0,
    MOECAL_LOGITS_BF16 = 1,
    MOECAL_LOGITS_EXACT = 2
} moecal_logit_prec;

/* v rounded once to bf16 (8 significant bits, float32's exponent range,
 * subnormals down to 2^-133), round to nearest even, returned as the float
 * that holds it exactly.  NaN stays NaN, overflow gives +-inf. */
MOECAL_RM_FN float moecal_rm_round_bf16(double v)
{
    if (!(fabs(v) >= 0x1p-126)) {
        /* NaN, zero, or below bf16's normal range: multiples of 2^-133
         * (scaling by powers of 2 is exact; rint rounds half to even) */
        if (v != v)
            return (float)v;
        return (float)(rint(v * 0x1p133) * 0x1p-133);
    }
    if (fabs(v) >= 0x1.ffp127) /* from the midpoint above bf16's largest, and inf */
        return v > 0 ? (float)INFINITY : -(float)INFINITY;
    /* keep the sign, the exponent and 7 of the 52 stored fraction bits */
    const uint64_t drop = ((uint64_t)1 << 45) - 1;
#if defined(__CUDA_ARCH__)
    uint64_t u = (uint64_t)__double_as_longlong(v);
    u = (u + (drop >> 1) + ((u >> 45) & 1)) & ~drop;
    return (float)__longlong_as_double((long long)u); /* exact */
#else
    union { double d; uint64_t u; } b;
    b.d = v;
    b.u = (b.u + (drop >> 1) + ((b.u >> 45) & 1)) & ~drop;
    return (float)b.d; /* exact */
#endif
}

/* The logit as --router-logits fp32 or bf16 makes it. */
MOECAL_RM_FN float moecal_route_round(double v, int prec)
{
    return prec == MOECAL_LOGITS_BF16 ? moecal_rm_round_bf16(v) : (float)v;
}

/* exp(x) for float x, identical on every IEEE-754 machine.
 * x = k ln2 + r, |r| <= ln2/2 (two fma steps with ln2 split in two
 * doubles); exp(r) by its Taylor polynomial of degree 13 (truncation error
 * below 2e-17 relative); times 2^k (exact); one rounding to float. */
MOECAL_RM_FN float moecal_route_expf(float x)
{
    if (x != x)
        return x;                 /* NaN */
    if (x > 89.0f)
        return (float)INFINITY;   /* e^89 > FLT_MAX */
    if (x < -104.0f)
        return 0.0f;              /* e^-104 < 2^-150: rounds to zero */
    const double inv_ln2 = 0x1.71547652b82fep+0;
    const double ln2_hi = 0x1.62e42fefa39efp-1;
    const double ln2_lo = 0x1.abc9e3b39803fp-56;
    double xd = (double)x;
    double kd = rint(xd * inv_ln2);
    double r = fma(-kd, ln2_hi, xd);
    r = fma(-kd, ln2_lo, r);
    /* 1/n! for n = 13 down to 0 */
    double p = 1.6059043836821614599e-10;              /* 1/13! */
    p = fma(p, r, 2.0876756987868098979e-09);         /* 1/12! */
    p = fma(p, r, 2.5052108385441718775e-08);         /* 1/11! */
    p = fma(p, r, 2.7557319223985890653e-07);         /* 1/10! */
    p = fma(p, r, 2.7557319223985890653e-06);         /* 1/9! */
    p = fma(p, r, 2.4801587301587301566e-05);         /* 1/8! */
    p = fma(p, r, 1.9841269841269841253e-04);         /* 1/7! */
    p = fma(p, r, 1.3888888888888888889e-03);         /* 1/6! */
    p = fma(p, r, 8.3333333333333333333e-03);         /* 1/5! */
    p = fma(p, r, 4.1666666666666666667e-02);         /* 1/4! */
    p = fma(p, r, 1.6666666666666666667e-01);         /* 1/3! */
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    return (float)ldexp(p, (int)kd);
}

/* exp(x) in double for the exact precision, identical on every IEEE-754
 * machine: the same reduction and polynomial as moecal_route_expf, not
 * rounded to float.  Relative error about 1e-16 (1e-15 near the ends of
 * the range, from the reduction). */
MOECAL_RM_FN double moecal_route_exp(double x)
{
    if (x != x)
        return x;
    if (x > 709.0)
        return (double)INFINITY;
    if (x < -745.0)
        return 0.0;
    const double inv_ln2 = 0x1.71547652b82fep+0;
    const double ln2_hi = 0x1.62e42fefa39efp-1;
    const double ln2_lo = 0x1.abc9e3b39803fp-56;
    double kd = rint(x * inv_ln2);
    double r = fma(-kd, ln2_hi, x);
    r = fma(-kd, ln2_lo, r);
    double p = 1.6059043836821614599e-10;
    p = fma(p, r, 2.0876756987868098979e-09);
    p = fma(p, r, 2.5052108385441718775e-08);
    p = fma(p, r, 2.7557319223985890653e-07);
    p = fma(p, r, 2.7557319223985890653e-06);
    p = fma(p, r, 2.4801587301587301566e-05);
    p = fma(p, r, 1.9841269841269841253e-04);
    p = fma(p, r, 1.3888888888888888889e-03);
    p = fma(p, r, 8.3333333333333333333e-03);
    p = fma(p, r, 4.1666666666666666667e-02);
    p = fma(p, r, 1.6666666666666666667e-01);
    p = fma(p, r, 0.5);
    p = fma(p, r, 1.0);
    p = fma(p, r, 1.0);
    /* two steps: 2^kd alone may not be a double near the ends of the range */
    int k = (int)kd, k1 = k / 2;
    return ldexp(ldexp(p, k1), k - k1);
}

#endif
