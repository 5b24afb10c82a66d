/* backend_cuda_ops.c - the CUDA backend's table, by member name (C99
 * designated initializers, which the CUDA C++ dialect lacks): a member
 * misnamed or of the wrong type fails to compile. */
#include "config.h"

#include "backend_cuda.h"

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
};
