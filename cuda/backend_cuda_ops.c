/* backend_cuda_ops.c - the CUDA backend's table, by member name (C99
 * designated initializers, which the CUDA C++ dialect lacks): a member
 * misnamed or of the wrong type fails to compile.  Its settings too. */
#include "config.h"

#include <stdint.h>

#include "backend_cuda.h"
#include "options.h"

/* Tuning knobs (bench/NOTES-cuda.md); none changes a result.  0 for step and
 * piece: the backend's choice. */
#define CU(field) MOECAL_AT(moecal_cuda_settings, field)

static const moecal_optdef cuda_options[] = {
    {"cuda-step", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "CUDA backend: tokens per step (0: 65536 top-k, 16384 all-experts, fewer when memory "
     "asks for it)", 0, 0, INT32_MAX, CU(step)},
    {"cuda-piece", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "CUDA backend: tokens per copy and routing piece (0: 8192)", 0, 0, INT32_MAX, CU(piece)},
    {"cuda-streams", 0, MOECAL_OPT_INT, "4", NULL, "N", "CUDA backend: expert GEMM streams",
     0, 1, 8, CU(streams)},
    {"cuda-prio", 0, MOECAL_OPT_INT, "0", NULL, "N",
     "CUDA backend: stream priorities (0 none, 1 GEMMs high, 2 routing high)", 0, 0, 2,
     CU(prio)},
    {"cuda-router", 0, MOECAL_OPT_CHOICE, "dgemm", "dgemm|exact", "NAME",
     "CUDA backend: router logits from a cuBLAS DGEMM with an exactness check, or from the "
     "FP64 kernel alone (the same bits)", 0, 0, 0, CU(router)},
    MOECAL_OPT_END
};

const moecal_backend_ops moecal_backend_cuda = {
    .name = "cuda",
    .available = moecal_backend_cuda_available,
    .create = moecal_backend_cuda_create,
    .load_layer = moecal_backend_cuda_load_layer,
    .run_chunk = moecal_backend_cuda_run_chunk,
    .timings = moecal_backend_cuda_timings,
    .destroy = moecal_backend_cuda_destroy,
    .submit_chunk = moecal_backend_cuda_submit_chunk,
    .finish_chunk = moecal_backend_cuda_finish_chunk,
    .pin_host = moecal_backend_cuda_pin_host,
    .unpin_host = moecal_backend_cuda_unpin_host,
    .fp8_weights = true,
    .memory = moecal_backend_cuda_memory,
    .options = cuda_options,
};
