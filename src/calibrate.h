/* calibrate.h - the calibration job (`moecal calibrate`). */
#ifndef MOECAL_CALIBRATE_H
#define MOECAL_CALIBRATE_H

#include <stdbool.h>
#include <stdint.h>

#include "activations.h"
#include "amaxfile.h"
#include "comm.h"
#include "error.h"

typedef struct moecal_calib_params {
    const char *model_dir;
    const char *activations;
    const char *output;
    bool force;
    bool all_experts;
    int64_t chunk_tokens;
    int64_t max_tokens;      /* 0 = all */
    const char *layers;      /* "all" or "3-10,12" */
    moecal_qfmt qfmt;
    const char *backend;     /* cpu | cuda | auto */
    moecal_nonfinite nonfinite;
    int router_logits;       /* moecal_logit_prec, or -1 for the family's default */
    int threads;
    int readers;             /* threads reading each node's tokens (tokens.h) */
    uint64_t gpu_mem_limit;
    int gpu;                 /* device of this rank from the placement, -1 none */
    const char *command_line;
    const char *placement_json;
    int64_t checkpoint_every; /* chunks between checkpoints, 0 = only on a signal */
    bool resume;              /* continue from the newest valid checkpoint */
    /* --plan (plan.h): nodes and ranks per node to plan for (0: this
     * launch's), the read bandwidth per node and a rank's compute rate */
    int plan_nodes, plan_ranks_per_node;
    double assume_read_gbps, assume_tokens_per_s;
    const struct moecal_opts *opts; /* the parsed options (the backend's settings) */
} moecal_calib_params;

/* The peer-max fixup (DESIGN.md §2), collective over comm.  cal is this
 * rank's n experts' calibrated input amax [L][n][3] (n may be 0).  Top-k
 * mode: final[l][k][q] := the maximum of cal[l][*][q] over every expert of
 * every rank (one MPI_Allreduce(MPI_MAX) over the packed [L][3] table);
 * all-experts mode: final := cal (no collective).  *raised (may be NULL):
 * how many of this rank's values changed. */
moecal_status moecal_peer_max_fixup(MPI_Comm comm, const float *cal, int L, int n,
                                    bool all_experts, float *final, long long *raised);

/* Parse a layer list ("all", "3-10,12") against the model's MoE layers.
 * Returns the selected MoE layers (ascending) in *out (malloc'd). */
moecal_status moecal_calib_parse_layers(const char *spec, const int *moe_layers, int n_moe,
                                        int **out, int *n_out);

/* Collective over c->world: run the whole job and write the outputs.
 * MOECAL_ERR_INTERRUPTED (on every rank) when a signal stopped it after a
 * checkpoint was written. */
moecal_status moecal_calibrate_run(const moecal_comm *c, const moecal_calib_params *p);

/* `--plan` (plan.h): rank 0 prints what the job p describes would read,
 * hold, exchange and take, reading no data and writing nothing.  Collective
 * in that every rank returns rank 0's status through the caller's check. */
moecal_status moecal_calibrate_plan(const moecal_comm *c, const moecal_calib_params *p);

#endif
