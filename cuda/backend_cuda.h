/* backend_cuda.h - the CUDA backend's asynchronous chunk interface.
 *
 * run_chunk (backend.h) returns a chunk's statistics before it returns, so
 * each chunk's first copy and routing cannot overlap the previous chunk's
 * GEMMs.  These two calls split it: submit_chunk starts a chunk and returns
 * at once (for pageable x after staging its first steps); finish_chunk waits
 * for the oldest submitted chunk and fills out, while the next submitted
 * chunk already copies and routes.  At most two chunks are in flight; x and
 * skip must stay unchanged until the chunk's finish_chunk has returned.
 * run_chunk is submit_chunk then finish_chunk, and refuses to run while a
 * submitted chunk is not finished; so does load_layer.
 *
 * pin_host page-locks a host buffer that lives long (the driver's chunk
 * windows, MPI shared memory included) so that chunks read from it go to
 * the GPU by DMA, without staging; unpin_host undoes it before the buffer
 * is freed.  Chunks in memory the caller pinned otherwise (cudaHostRegister,
 * cudaMallocHost) are recognised too.
 *
 * The same functions fill moecal_backend_ops' optional members
 * (submit_chunk, finish_chunk, pin_host, unpin_host), through which the
 * driver calls them; the tests and the benchmark call them directly.
 */
#ifndef MOECAL_BACKEND_CUDA_H
#define MOECAL_BACKEND_CUDA_H

#include <stddef.h>
#include <stdint.h>

#include "backend.h"

#ifdef __cplusplus
extern "C" {
#endif

/* The backend's settings (its options, backend_cuda_ops.c), as
 * moecal_opts_bind stores them. */
typedef struct moecal_cuda_settings {
    long long step, piece, streams, prio;
    const char *router;
} moecal_cuda_settings;

/* The members of moecal_backend_cuda (backend.h's contracts). */
bool moecal_backend_cuda_available(void);
moecal_status moecal_backend_cuda_create(const moecal_backend_config *cfg, moecal_backend **out);
moecal_status moecal_backend_cuda_memory(const moecal_backend_config *cfg, uint64_t *host,
                                         uint64_t *device);
moecal_status moecal_backend_cuda_load_layer(moecal_backend *b, const moecal_layer_weights *w);
moecal_status moecal_backend_cuda_run_chunk(moecal_backend *b, const uint16_t *x, int64_t ntok,
                                            const uint8_t *skip, moecal_chunk_stats *out);
void moecal_backend_cuda_timings(const moecal_backend *b, double t[MOECAL_NPHASE]);
void moecal_backend_cuda_destroy(moecal_backend *b);
moecal_status moecal_backend_cuda_submit_chunk(moecal_backend *b, const uint16_t *x,
                                               int64_t ntok, const uint8_t *skip);
moecal_status moecal_backend_cuda_finish_chunk(moecal_backend *b, moecal_chunk_stats *out);
moecal_status moecal_backend_cuda_pin_host(moecal_backend *b, void *p, size_t bytes);
void moecal_backend_cuda_unpin_host(moecal_backend *b, void *p);
/* Router logits recomputed in the canonical order so far (the DGEMM router's
 * exactness check; 0 with MOECAL_CUDA_ROUTER=exact).  Synchronizes. */
unsigned long long moecal_backend_cuda_router_fixups(moecal_backend *b);

#ifdef __cplusplus
}
#endif
#endif
