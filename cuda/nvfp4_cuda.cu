/* nvfp4_cuda.cu - NVFP4 quantization of one weight on the GPU (nvfp4_cuda.h).
 *
 * One thread per block of 16 columns of a row: it loads the 16 source
 * values with vector loads (K % 16 == 0 keeps every block 16-byte aligned),
 * dequantizes e4m3 through its block's scale, takes the block's amax and
 * writes 8 packed bytes and one scale byte (nvfp4_math.h).  The weight's
 * amax is a warp maximum, then one integer atomicMax on the float bits
 * (non-negative floats order as their bits); non-finite values are counted
 * the same way.  The work is memory bound: per element one or two bytes in
 * and 0.5625 out.
 */
#include "config.h"

#include <cuda_runtime.h>

#include <stdlib.h>
#include <string.h>

#include "nvfp4_cuda.h"
#include "nvfp4_math.h"

struct moecal_nvfp4_gpu {
    int device;
    size_t max_elems, max_scales;
    cudaStream_t stream;
    moecal_nvfp4_gpu_host host;
    void *d_w;
    float *d_scale;
    uint8_t *d_packed, *d_scales;
    unsigned long long *d_red;   /* [0] amax bits, [1] non-finite count */
    unsigned long long *h_red;
};

namespace {

__device__ __forceinline__ float bf16_to_float(uint16_t b)
{
    return __uint_as_float((unsigned)b << 16);
}

template <bool FP8>
__global__ void k_nvfp4(const void *__restrict__ src, const float *__restrict__ scale_inv,
                        int64_t N, int64_t K, int64_t B, int64_t nbc, float s2,
                        uint8_t *__restrict__ packed, uint8_t *__restrict__ scales,
                        unsigned long long *__restrict__ red)
{
    const int64_t per_row = K / MOECAL_NVFP4_BLOCK, nblk = N * per_row;
    const int64_t stride = (int64_t)gridDim.x * blockDim.x;
    float amax = 0.0f;
    unsigned nonfinite = 0;

    for (int64_t i = (int64_t)blockIdx.x * blockDim.x + threadIdx.x; i < nblk; i += stride) {
        const int64_t r = i / per_row, c0 = (i % per_row) * MOECAL_NVFP4_BLOCK;
        float x[MOECAL_NVFP4_BLOCK];
        uint16_t h[MOECAL_NVFP4_BLOCK];
        if (FP8) {
            const uint4 v = __ldg(reinterpret_cast<const uint4 *>(
                static_cast<const uint8_t *>(src) + r * K + c0));
            const unsigned wd[4] = {v.x, v.y, v.z, v.w};
            const float *srow = scale_inv + (r / B) * nbc;
#pragma unroll
            for (int j = 0; j < MOECAL_NVFP4_BLOCK; j++) {
                const uint8_t q = (uint8_t)(wd[j / 4] >> (8 * (j % 4)));
                nonfinite += (q & 0x7f) == 0x7f;
                const float v = moecal_nv_e4m3_to_float(q);
                h[j] = moecal_nv_bf16_rne(__fmul_rn(v, srow[(c0 + j) / B]));
            }
        } else {
            const uint4 *p = reinterpret_cast<const uint4 *>(
                static_cast<const uint16_t *>(src) + r * K + c0);
            const uint4 v0 = __ldg(p), v1 = __ldg(p + 1);
            const unsigned wd[8] = {v0.x, v0.y, v0.z, v0.w, v1.x, v1.y, v1.z, v1.w};
#pragma unroll
            for (int j = 0; j < MOECAL_NVFP4_BLOCK; j++)
                h[j] = (uint16_t)(wd[j / 2] >> (16 * (j % 2)));
        }
#pragma unroll
        for (int j = 0; j < MOECAL_NVFP4_BLOCK; j++) {
            /* an e4m3 NaN code is counted once, as a NaN code */
            const bool bad = (h[j] & 0x7f80u) == 0x7f80u;
            nonfinite += bad && !(FP8 && (h[j] & 0x7fffu) > 0x7f80u);
            x[j] = bf16_to_float(h[j]);
            if (!bad)
                amax = fmaxf(amax, fabsf(x[j]));
        }
        uint8_t pk[MOECAL_NVFP4_BLOCK / 2];
        moecal_nv_quantize_block(x, s2, pk, scales + i);
        uint2 o;
        o.x = (unsigned)pk[0] | (unsigned)pk[1] << 8 | (unsigned)pk[2] << 16 |
              (unsigned)pk[3] << 24;
        o.y = (unsigned)pk[4] | (unsigned)pk[5] << 8 | (unsigned)pk[6] << 16 |
              (unsigned)pk[7] << 24;
        reinterpret_cast<uint2 *>(packed)[i] = o;
    }
    for (int off = 16; off > 0; off >>= 1) {
        amax = fmaxf(amax, __shfl_down_sync(0xffffffffu, amax, off));
        nonfinite += __shfl_down_sync(0xffffffffu, nonfinite, off);
    }
    if ((threadIdx.x & 31) == 0) {
        atomicMax(&red[0], (unsigned long long)__float_as_uint(amax));
        if (nonfinite)
            atomicAdd(&red[1], (unsigned long long)nonfinite);
    }
}

moecal_status fail(const moecal_nvfp4_gpu *g, const char *what, cudaError_t e)
{
    return moecal_error_set(MOECAL_ERR_CUDA, "CUDA device %d: %s: %s", g ? g->device : -1,
                            what, cudaGetErrorString(e));
}

} /* namespace */

#define NV_CHECK(g, call)                                     \
    do {                                                      \
        cudaError_t nv_e_ = (call);                           \
        if (nv_e_ != cudaSuccess)                             \
            return fail((g), #call, nv_e_);                   \
    } while (0)

extern "C" int moecal_nvfp4_gpu_count(void)
{
    int n = 0;
    if (cudaGetDeviceCount(&n) != cudaSuccess) {
        (void)cudaGetLastError();
        return 0;
    }
    return n;
}

static moecal_status create(moecal_nvfp4_gpu *g)
{
    const size_t e = g->max_elems ? g->max_elems : 16, s = g->max_scales ? g->max_scales : 1;
    NV_CHECK(g, cudaSetDevice(g->device));
    NV_CHECK(g, cudaStreamCreateWithFlags(&g->stream, cudaStreamNonBlocking));
    NV_CHECK(g, cudaMallocHost(&g->host.w, 2 * e));
    NV_CHECK(g, cudaMallocHost((void **)&g->host.scale_inv, s * sizeof(float)));
    NV_CHECK(g, cudaMallocHost((void **)&g->host.packed, e / 2));
    NV_CHECK(g, cudaMallocHost((void **)&g->host.scales, e / MOECAL_NVFP4_BLOCK));
    NV_CHECK(g, cudaMallocHost((void **)&g->h_red, 2 * sizeof *g->h_red));
    NV_CHECK(g, cudaMalloc(&g->d_w, 2 * e));
    NV_CHECK(g, cudaMalloc((void **)&g->d_scale, s * sizeof(float)));
    NV_CHECK(g, cudaMalloc((void **)&g->d_packed, e / 2));
    NV_CHECK(g, cudaMalloc((void **)&g->d_scales, e / MOECAL_NVFP4_BLOCK));
    NV_CHECK(g, cudaMalloc((void **)&g->d_red, 2 * sizeof *g->d_red));
    return MOECAL_OK;
}

extern "C" moecal_status moecal_nvfp4_gpu_create(int device, size_t max_elems, size_t max_scales,
                                                 moecal_nvfp4_gpu **out)
{
    moecal_nvfp4_gpu *g = static_cast<moecal_nvfp4_gpu *>(calloc(1, sizeof *g));
    *out = NULL;
    if (!g)
        return moecal_error_set(MOECAL_ERR_NOMEM, "no memory for a GPU quantizer");
    g->device = device;
    g->max_elems = (max_elems + 15) & ~(size_t)15;
    g->max_scales = max_scales;
    moecal_status st = create(g);
    if (st != MOECAL_OK) {
        moecal_nvfp4_gpu_destroy(g);
        return st;
    }
    *out = g;
    return MOECAL_OK;
}

extern "C" const moecal_nvfp4_gpu_host *moecal_nvfp4_gpu_buffers(const moecal_nvfp4_gpu *g)
{
    return &g->host;
}

extern "C" size_t moecal_nvfp4_gpu_device_bytes(const moecal_nvfp4_gpu *g)
{
    const size_t e = g->max_elems ? g->max_elems : 16;
    return 2 * e + g->max_scales * sizeof(float) + e / 2 + e / MOECAL_NVFP4_BLOCK + 16;
}

extern "C" moecal_status moecal_nvfp4_gpu_quantize(moecal_nvfp4_gpu *g, bool fp8, size_t N,
                                                   size_t K, size_t block, float s2,
                                                   moecal_nvfp4_gpu_result *res)
{
    const size_t n = N * K, nbr = fp8 ? (N + block - 1) / block : 0;
    const size_t nbc = fp8 ? (K + block - 1) / block : 0;

    if (K % MOECAL_NVFP4_BLOCK || n > g->max_elems || nbr * nbc > g->max_scales ||
        (fp8 && block == 0))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "GPU quantizer: [%zu, %zu] (block %zu) "
                                "does not fit its buffers or is not a multiple of 16", N, K,
                                block);
    res->amax = 0.0f;
    res->nonfinite = 0;
    if (n == 0)
        return MOECAL_OK;
    NV_CHECK(g, cudaSetDevice(g->device));
    NV_CHECK(g, cudaMemcpyAsync(g->d_w, g->host.w, n * (fp8 ? 1 : 2), cudaMemcpyHostToDevice,
                                g->stream));
    if (fp8)
        NV_CHECK(g, cudaMemcpyAsync(g->d_scale, g->host.scale_inv, nbr * nbc * sizeof(float),
                                    cudaMemcpyHostToDevice, g->stream));
    NV_CHECK(g, cudaMemsetAsync(g->d_red, 0, 2 * sizeof *g->d_red, g->stream));
    const int64_t nblk = (int64_t)(n / MOECAL_NVFP4_BLOCK);
    const int threads = 256;
    const int grid = (int)((nblk + threads - 1) / threads < 65536 ? (nblk + threads - 1) / threads
                                                                   : 65536);
    if (fp8)
        k_nvfp4<true><<<grid, threads, 0, g->stream>>>(g->d_w, g->d_scale, (int64_t)N,
                                                       (int64_t)K, (int64_t)block, (int64_t)nbc,
                                                       s2, g->d_packed, g->d_scales, g->d_red);
    else
        k_nvfp4<false><<<grid, threads, 0, g->stream>>>(g->d_w, NULL, (int64_t)N, (int64_t)K, 1,
                                                        0, s2, g->d_packed, g->d_scales,
                                                        g->d_red);
    NV_CHECK(g, cudaGetLastError());
    NV_CHECK(g, cudaMemcpyAsync(g->host.packed, g->d_packed, n / 2, cudaMemcpyDeviceToHost,
                                g->stream));
    NV_CHECK(g, cudaMemcpyAsync(g->host.scales, g->d_scales, n / MOECAL_NVFP4_BLOCK,
                                cudaMemcpyDeviceToHost, g->stream));
    NV_CHECK(g, cudaMemcpyAsync(g->h_red, g->d_red, 2 * sizeof *g->d_red,
                                cudaMemcpyDeviceToHost, g->stream));
    NV_CHECK(g, cudaStreamSynchronize(g->stream));
    const unsigned bits = (unsigned)g->h_red[0];
    memcpy(&res->amax, &bits, sizeof bits);
    res->nonfinite = g->h_red[1];
    return MOECAL_OK;
}

extern "C" void moecal_nvfp4_gpu_destroy(moecal_nvfp4_gpu *g)
{
    if (!g)
        return;
    cudaSetDevice(g->device);
    if (g->stream)
        cudaStreamSynchronize(g->stream);
    cudaFree(g->d_w);
    cudaFree(g->d_scale);
    cudaFree(g->d_packed);
    cudaFree(g->d_scales);
    cudaFree(g->d_red);
    cudaFreeHost(g->host.w);
    cudaFreeHost(g->host.scale_inv);
    cudaFreeHost(g->host.packed);
    cudaFreeHost(g->host.scales);
    cudaFreeHost(g->h_red);
    if (g->stream)
        cudaStreamDestroy(g->stream);
    (void)cudaGetLastError();
    free(g);
}
