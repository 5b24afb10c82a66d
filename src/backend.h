/* backend.h - compute backends behind one interface.
 *
 * A backend calibrates one rank's shard of experts [e0, e1) of one MoE layer
 * at a time: load_layer() takes the router weights (all experts) and the
 * rank's expert weights (bf16), then run_chunk() is called for every chunk of
 * tokens.  For each chunk the backend routes every token (route_math.h's
 * logits at the router_logits precision, then the model's router), gathers the tokens routed to each local expert (all tokens
 * in all-experts mode), and reports per local expert the number of tokens,
 * amax of the w1/w3 input x, and amax of the w2 input h, computed as the
 * bf16 model does: a = bf16(x W1^T), b = bf16(x W3^T) (float32 accumulation),
 * h = bf16(bf16(silu(a)) * b).
 *
 * Two optional refinements, used by the driver when a backend has them:
 *
 *   - submit_chunk/finish_chunk split run_chunk so that a chunk's copy and
 *     routing overlap the previous chunk's GEMMs: submit_chunk starts a chunk
 *     and returns; finish_chunk waits for the oldest submitted chunk and fills
 *     its statistics.  At most two chunks are in flight; x and skip must stay
 *     unchanged until that chunk's finish_chunk has returned; load_layer and
 *     run_chunk are refused while a submitted chunk is unfinished.
 *     pin_host/unpin_host page-lock a long-lived host buffer (the driver's
 *     token windows and weight buffers) so that copies from it are DMA.
 *
 *   - fp8_weights: load_layer takes w1/w3 as raw e4m3 bytes with their block
 *     scales (w1_fp8, w3_fp8, w1_scale, w3_scale, block) and dequantizes them
 *     itself, bit-identically to moecal_fp8_dequant_bf16:
 *     bf16_rne(e4m3_to_float(q) * scale_inv), float32 product.
 *
 * Backends are registered in backend.c; NULL function pointers mean "not
 * supported".
 */
#ifndef MOECAL_BACKEND_H
#define MOECAL_BACKEND_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "modelcfg.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moecal_backend moecal_backend; /* backend-private state */
struct moecal_optdef;
struct moecal_opts;

typedef struct moecal_backend_config {
    const moecal_model_config *model;
    int e0, e1;              /* local experts [e0, e1); e1 - e0 may be 0 */
    int64_t max_chunk_tokens;
    bool all_experts;        /* --calib-all-experts */
    int router_logits;       /* --router-logits: moecal_logit_prec (route_math.h) */
    int device;              /* CUDA device ordinal (placement), -1 for CPU */
    uint64_t gpu_mem_limit;  /* bytes, 0 = no limit */
    int threads;             /* CPU threads, 0 = default */
    int rank;                /* for messages */
    /* The command's options, the backend's own (ops->options) among them;
     * NULL (tests, benchmarks): the backend's defaults. */
    const struct moecal_opts *opts;
} moecal_backend_config;

typedef struct moecal_layer_weights {
    int layer;                   /* model layer index */
    const float *gate;           /* [E][H] router weight */
    const float *bias;           /* [E] e_score_correction_bias or NULL */
    const uint16_t *w1;          /* [n_local][I][H] bf16 (gate_proj), or NULL: */
    const uint16_t *w3;          /* [n_local][I][H] bf16 (up_proj), or NULL: */
    /* the FP8 form (only for backends with fp8_weights, when w1/w3 are NULL):
     * e4m3 [n_local][I][H] and scale_inv [n_local][ceil(I/B)][ceil(H/B)],
     * B = block; finite codes only, scales checked (moecal_fp8_check_scales) */
    const uint8_t *w1_fp8, *w3_fp8;
    const float *w1_scale, *w3_scale;
    int block;
} moecal_layer_weights;

/* Per local expert results for one chunk. */
typedef struct moecal_chunk_stats {
    int64_t *tokens;   /* [n_local] tokens routed to each local expert */
    float *amax_x;     /* [n_local] amax of the w1/w3 input, 0 if no token */
    float *amax_h;     /* [n_local] amax of the w2 input, 0 if no token */
} moecal_chunk_stats;

/* The phases a backend's time is split into (timings): routing, the gather
 * of each expert's rows, the expert GEMMs, the activation amax pass, and the
 * host<->device copies. */
typedef enum moecal_phase {
    MOECAL_PHASE_ROUTE,
    MOECAL_PHASE_GATHER,
    MOECAL_PHASE_GEMM,
    MOECAL_PHASE_ACT,
    MOECAL_PHASE_COPY,
    MOECAL_NPHASE
} moecal_phase;

typedef struct moecal_backend_ops {
    const char *name;
    /* Is the backend usable here (a GPU present, ...)?  NULL = always. */
    bool (*available)(void);
    moecal_status (*create)(const moecal_backend_config *cfg, moecal_backend **out);
    moecal_status (*load_layer)(moecal_backend *b, const moecal_layer_weights *w);
    /* x: [ntok][H] bf16, row-major; skip: [ntok] rows to ignore (non-finite
     * rows under --nonfinite=skip) or NULL. */
    moecal_status (*run_chunk)(moecal_backend *b, const uint16_t *x, int64_t ntok,
                               const uint8_t *skip, moecal_chunk_stats *out);
    /* Seconds spent in each phase since create. */
    void (*timings)(const moecal_backend *b, double t[MOECAL_NPHASE]);
    void (*destroy)(moecal_backend *b);
    /* Optional (NULL: the driver uses run_chunk, and pageable memory). */
    moecal_status (*submit_chunk)(moecal_backend *b, const uint16_t *x, int64_t ntok,
                                  const uint8_t *skip);
    moecal_status (*finish_chunk)(moecal_backend *b, moecal_chunk_stats *out);
    moecal_status (*pin_host)(moecal_backend *b, void *p, size_t bytes);
    void (*unpin_host)(moecal_backend *b, void *p);
    bool fp8_weights;            /* load_layer accepts the FP8 form */
    /* Optional: the bytes of host and device memory create would allocate
     * for cfg, computed without allocating (no GPU needed), for
     * `moecal calibrate --plan`. */
    moecal_status (*memory)(const moecal_backend_config *cfg, uint64_t *host,
                            uint64_t *device);
    /* The backend's own settings (tuning knobs that never change a result),
     * ended by MOECAL_OPT_END, or NULL.  Their names start with the
     * backend's ("cuda-step"); calibrate adds them to its options, so they
     * come from the command line, MOECAL_* variables or the conf file, show
     * in --help and --print-config, and are recorded in the amax file. */
    const struct moecal_optdef *options;
} moecal_backend_ops;

/* Registry. */
const moecal_backend_ops *moecal_backend_find(const char *name);  /* "cpu", "cuda" */
/* The i-th compiled-in backend, usable here or not (NULL past the last). */
const moecal_backend_ops *moecal_backend_at(int i);
/* The checks every backend's create makes of cfg (a configuration, the
 * router's settings, sizes, the expert range, the chunk size, threads);
 * name prefixes the message. */
moecal_status moecal_backend_check_config(const moecal_backend_config *cfg, const char *name);
/* "auto": cuda when compiled in and a GPU is present, else cpu. */
const moecal_backend_ops *moecal_backend_auto(void);
/* defs (ended by MOECAL_OPT_END) followed by every registered backend's
 * options, in one malloc'd table (NULL: out of memory). */
struct moecal_optdef *moecal_backend_add_options(const struct moecal_optdef *defs);
/* "name=value name=value" of ops' options as resolved in o (malloc'd; ""
 * for a backend without options or no o; NULL: out of memory). */
char *moecal_backend_settings(const moecal_backend_ops *ops, const struct moecal_opts *o);

extern const moecal_backend_ops moecal_backend_cpu;
#ifdef HAVE_CUDA
extern const moecal_backend_ops moecal_backend_cuda;
#endif

#ifdef __cplusplus
}
#endif
#endif
