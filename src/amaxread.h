/* amaxread.h - read a finished amax.h5 (format_version 1) into memory.
 *
 * Serial HDF5, one process: the reader of `moecal compare` and `moecal
 * report`.  Everything in the file is validated before it is used: format and
 * format_version, the root attributes the analysis needs, the rank, shape and
 * type class of every dataset, and the values (amax finite and >= 0, token
 * counts >= 0, layer indices ascending).  Errors name the file and the
 * dataset or attribute.  The writer is amaxfile.c.
 */
#ifndef MOECAL_AMAXREAD_H
#define MOECAL_AMAXREAD_H

#include <stdint.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

/* What to load beyond the always-read tables (layers, projections, chunk
 * table, input_amax, input_amax_calibrated, weight_amax). */
enum {
    MOECAL_AMAXREAD_TOKENS = 1u << 0,  /* tokens_per_expert */
    MOECAL_AMAXREAD_HISTORY = 1u << 1  /* input_amax_history (L x C x E x 3 floats) */
};

typedef struct moecal_amax_data {
    char *path;
    /* Root attributes; strings are "" where an optional one is absent. */
    char model_type[64];
    char mode[32];             /* "topk" | "all_experts" */
    char sync[32];             /* "peer_max" | "none" */
    char router_logits[16];    /* "bf16" | "fp32" | "exact" | "none"; "" in older files */
    char checkpoint_fingerprint[24]; /* 16 hex digits; "" in older files */
    char quant_format[32];
    char created[64];
    char moecal_version[32];
    int64_t hidden_size;
    int64_t n_routed_experts;
    int64_t num_experts_per_tok; /* -1 if absent */
    int64_t tokens;              /* tokens per layer, -1 if absent */

    int L, E, C;                 /* MoE layers, experts, chunks */
    int *layers;                 /* [L] model layer indices, ascending */
    int64_t *chunk_start;        /* [C] */
    int64_t *chunk_count;        /* [C] */
    float *input_amax;           /* [L][E][3] */
    float *input_amax_calibrated; /* [L][E][3] */
    float *weight_amax;          /* [L][E][3] */
    int64_t *tokens_per_expert;  /* [L][C][E], NULL unless MOECAL_AMAXREAD_TOKENS */
    float *history;              /* [L][C][E][3], NULL unless MOECAL_AMAXREAD_HISTORY */
} moecal_amax_data;

/* Index of (layer l, expert e, projection p) in the [L][E][3] tables. */
static inline size_t moecal_amax_idx(const moecal_amax_data *d, int l, int e, int p)
{
    return ((size_t)l * (size_t)d->E + (size_t)e) * 3 + (size_t)p;
}

/* Read path.  A missing or unreadable file is MOECAL_ERR_IO; a file that is
 * not a finished format-1 amax file (wrong format, a checkpoint, a missing or
 * misshapen dataset, bad values) is MOECAL_ERR_FORMAT. */
moecal_status moecal_amax_data_read(const char *path, unsigned what, moecal_amax_data **out);
void moecal_amax_data_free(moecal_amax_data *d);

/* "3-10,12,13" for an ascending list of layer indices (runs of three or more
 * as ranges), cut with "..." when it does not fit. */
void moecal_amax_layers_str(const int *layers, int n, char *buf, size_t len);

#ifdef __cplusplus
}
#endif
#endif
