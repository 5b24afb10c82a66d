/* prefetch.h - a rank's expert weights of the next layer, read ahead.
 *
 * While the backend computes layer L, a background thread reads this rank's
 * experts of the next layer (router weight and bias, w1 and w3 for the
 * backend, and the weight amax of w1, w2 and w3) into host buffers, with a
 * few OpenMP threads over the experts.  w2 is only scanned for its amax.
 * With fp8 set (a backend with fp8_weights), w1/w3 stored as F8_E4M3 are
 * kept raw with their block scales, so the backend dequantizes them (and
 * the host reads and copies half the bytes); any other dtype is converted
 * to bf16 on the host.
 *
 * One buffer set: the weights returned by moecal_prefetch_wait stay valid
 * until the next moecal_prefetch_start, so start the next read once the
 * backend's load_layer has returned (backends copy what they keep).
 */
#ifndef MOECAL_PREFETCH_H
#define MOECAL_PREFETCH_H

#include <stdbool.h>
#include <stddef.h>

#include "backend.h"
#include "error.h"
#include "model.h"

typedef struct moecal_prefetch moecal_prefetch;

/* Experts [e0, e0 + n) of model m (n may be 0); threads <= 0: one. */
moecal_status moecal_prefetch_create(moecal_model *m, int e0, int n, bool fp8, int threads,
                                     moecal_prefetch **out);
/* The large buffers allocated so far (for pin_host): up to 4 pointers and
 * sizes; returns how many. */
int moecal_prefetch_buffers(const moecal_prefetch *pf, void *ptr[4], size_t bytes[4]);
/* Start reading model layer `layer` (a MoE layer index) in the background. */
moecal_status moecal_prefetch_start(moecal_prefetch *pf, int layer);
/* Wait for the read; fill *lw (pointing into the buffers) and wamax [n][3]
 * (w1, w2, w3).  A failed read returns its status with the reading thread's
 * message, for the lowest failing expert. */
moecal_status moecal_prefetch_wait(moecal_prefetch *pf, moecal_layer_weights *lw, float *wamax);
/* Seconds the reads took in the background, and the caller waited. */
void moecal_prefetch_times(const moecal_prefetch *pf, double *read_s, double *wait_s);
/* The host bytes a prefetch of n experts holds (router, w1|w3 buffers in
 * the FP8 or the bf16 form, weight amax), for `--plan`. */
uint64_t moecal_prefetch_memory(const moecal_model_config *cfg, int n, bool fp8);
/* The stored bytes of the layers read so far (moecal_model_layer_bytes). */
uint64_t moecal_prefetch_bytes(const moecal_prefetch *pf);
/* Joins a read in progress. */
void moecal_prefetch_destroy(moecal_prefetch *pf);

#endif
