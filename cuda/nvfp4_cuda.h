/* nvfp4_cuda.h - NVFP4 quantization of one weight on the GPU, for
 * `moecal export --backend cuda`.
 *
 * The source is the checkpoint's own bytes: bf16 [N][K], or e4m3 [N][K] with
 * its float32 block scales [ceil(N/B)][ceil(K/B)], dequantized on the GPU
 * exactly as moecal_fp8_dequant_bf16 does (bf16_rne(e4m3 * scale_inv)).
 * One kernel dequantizes, takes the weight's amax and counts non-finite
 * values, and quantizes with nvfp4_math.h, the arithmetic the CPU path
 * uses: the bytes are the CPU's by construction, and tests/test_backend_cuda
 * compares them.
 *
 * A context belongs to one host thread (the device is set in that thread)
 * and owns page-locked host buffers of the capacity it was created with:
 * the caller reads the source into them, calls quantize, and finds the
 * result there.  Contexts of several threads share a GPU.
 */
#ifndef MOECAL_NVFP4_CUDA_H
#define MOECAL_NVFP4_CUDA_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moecal_nvfp4_gpu moecal_nvfp4_gpu;

typedef struct moecal_nvfp4_gpu_host {
    void *w;           /* the source: bf16 or e4m3 [N][K] */
    float *scale_inv;  /* e4m3 only: [ceil(N/B)][ceil(K/B)] */
    uint8_t *packed;   /* result: [N][K/2] */
    uint8_t *scales;   /* result: [N][K/16] e4m3 */
} moecal_nvfp4_gpu_host;

typedef struct moecal_nvfp4_gpu_result {
    float amax;              /* max |w| of the (dequantized) weight */
    uint64_t nonfinite;      /* NaN codes and values that are not finite */
} moecal_nvfp4_gpu_result;

/* The number of usable GPUs (0 when there is none or no driver). */
int moecal_nvfp4_gpu_count(void);

/* Capacity: max_elems elements N*K, max_scales block scales. */
moecal_status moecal_nvfp4_gpu_create(int device, size_t max_elems, size_t max_scales,
                                      moecal_nvfp4_gpu **out);
const moecal_nvfp4_gpu_host *moecal_nvfp4_gpu_buffers(const moecal_nvfp4_gpu *g);

/* Quantize the source in the host buffers (fp8: e4m3 with scale_inv and
 * block B; else bf16) with weight_scale_2 s2; K % 16 == 0.  Synchronous. */
moecal_status moecal_nvfp4_gpu_quantize(moecal_nvfp4_gpu *g, bool fp8, size_t N, size_t K,
                                        size_t block, float s2, moecal_nvfp4_gpu_result *res);

/* Bytes of device memory the context holds. */
size_t moecal_nvfp4_gpu_device_bytes(const moecal_nvfp4_gpu *g);

void moecal_nvfp4_gpu_destroy(moecal_nvfp4_gpu *g);

#ifdef __cplusplus
}
#endif
#endif
