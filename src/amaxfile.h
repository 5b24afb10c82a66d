/* amaxfile.h - the results of a calibration: amax.h5 (format_version 1) and
 * the files beside it (quant summary, hf_quant_config.json, safetensors). */
#ifndef MOECAL_AMAXFILE_H
#define MOECAL_AMAXFILE_H

#include <mpi.h>
#include <stdint.h>

#include "error.h"
#include "model.h"

#define MOECAL_AMAX_FORMAT "moecal-amax"
#define MOECAL_AMAX_FORMAT_VERSION 1

typedef enum { MOECAL_QFMT_NVFP4 = 0, MOECAL_QFMT_FP8 } moecal_qfmt;

typedef struct moecal_amax_meta {
    const char *created;         /* ISO 8601, identical on every rank */
    const char *command_line;
    int all_experts;             /* mode all_experts (no sync) vs topk (peer_max) */
    int router_logits;           /* moecal_logit_prec the router used (top-k mode) */
    const char *checkpoint_fingerprint; /* moecal_checkpoint_fingerprint of the model */
    moecal_qfmt qfmt;
    const char *model_path, *activations_path;
    const char *placement_json;  /* identical on every rank */
    const char *backend;         /* "cpu", "cuda"; NULL: not recorded */
    const char *backend_settings; /* "cuda-step=0 ..." (moecal_backend_settings) */
    int n_ranks, n_nodes;
    int64_t tokens;              /* tokens per layer used */
    int64_t chunk_tokens;
    const moecal_model_config *cfg;
    int L, E, C;                 /* MoE layers written, experts, chunks per layer */
    const int *layers;           /* [L] model layer indices */
    const int64_t *chunk_start;  /* [C] */
    const int64_t *chunk_count;  /* [C] */
    uint64_t input_hash;         /* inputs and result-affecting options */
    int checkpoint;              /* write a checkpoint (a partial file) */
    int64_t next_step;           /* checkpoint: first (layer, chunk) step not done */
} moecal_amax_meta;

/* One rank's experts [e0, e1) (n = e1 - e0, may be 0). */
typedef struct moecal_amax_slab {
    int e0, e1;
    const float *input_amax;            /* [L][n][3] after sync */
    const float *input_amax_calibrated; /* [L][n][3] before sync */
    const float *weight_amax;           /* [L][n][3] */
    const float *history;               /* [L][C][n][3] */
    const int64_t *tokens;              /* [L][C][n] */
} moecal_amax_slab;

/* Scale of a quantizer from its amax: NVFP4 amax / (6 * 448), FP8 amax / 448. */
float moecal_amax_scale(moecal_qfmt f, float amax);
const char *moecal_qfmt_name(moecal_qfmt f);

/* Collective over comm: write path (already a temporary name) with parallel
 * HDF5, each rank its slab, collective transfers. */
moecal_status moecal_amax_write_h5(MPI_Comm comm, const char *path, const moecal_amax_meta *m,
                                   const moecal_amax_slab *s);

/* Checkpoint: read this rank's slab back (serial HDF5, any rank count).
 * Validates format, input_hash and shapes; *next_step receives the position. */
moecal_status moecal_amax_read_checkpoint(const char *path, uint64_t input_hash,
                                          const moecal_amax_meta *m, int e0, int e1,
                                          float *amax_cal, float *weight_amax, float *history,
                                          int64_t *tokens, int64_t *next_step);

/* Whole-model tables, held by one rank. */
typedef struct moecal_amax_tables {
    const float *input_amax;            /* [L][E][3] */
    const float *input_amax_calibrated; /* [L][E][3] */
    const float *weight_amax;           /* [L][E][3] */
    const int64_t *tokens;              /* [L][E] over all chunks */
} moecal_amax_tables;

/* Serial: the quant summary in Model-Optimizer's print_quant_summary layout
 * (one line per TensorQuantizer of the routed experts, Hugging Face module
 * names), the amax table (per quantizer: amax, before the sync, scale,
 * tokens), hf_quant_config.json and a safetensors file of
 * Model-Optimizer-named amax and export scales.  Each is written to a
 * temporary name and renamed. */
moecal_status moecal_amax_write_summary(const char *path, const moecal_amax_meta *m,
                                        const moecal_model *model, const moecal_amax_tables *t);
moecal_status moecal_amax_write_table(const char *path, const moecal_amax_meta *m,
                                      const moecal_model *model, const moecal_amax_tables *t);
moecal_status moecal_amax_write_hf_config(const char *path, const moecal_amax_meta *m,
                                          const moecal_amax_tables *t);
moecal_status moecal_amax_write_safetensors(const char *path, const moecal_amax_meta *m,
                                            const moecal_model *model,
                                            const moecal_amax_tables *t);

#endif
