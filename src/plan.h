/* plan.h - `moecal calibrate --plan`: what a calibration job will read, hold
 * and exchange, and how long it should take, computed before any data is
 * read and without writing anything.
 *
 * The job is the one the options describe, on --plan-nodes nodes of
 * --plan-ranks-per-node ranks (default: this launch's, ranks split evenly
 * over its nodes).  What it counts, as the job does:
 *   - bytes read: each node leader's part of every token chunk (rows split
 *     over the leaders as tokens.h does, at the file's element size) and each
 *     rank's router and expert tensors per layer, as stored (from the
 *     safetensors headers, or from config.json's shapes and quantization when
 *     the directory holds no weights);
 *   - bytes exchanged: the rows a leader receives from the other leaders;
 *   - memory: per node the token window; per rank the weight buffers of the
 *     prefetch, the amax tables, what the backend allocates (its `memory`
 *     op, so also the GPU memory of a CUDA rank without a GPU here) and the
 *     memory the process already uses (libraries, measured now);
 *   - collectives per rank, over the world, the node and the leaders;
 *   - time: a node reads its leader's tokens and its ranks' weights at
 *     --assume-read-gbps, a rank computes at --assume-tokens-per-s tokens
 *     per second for a whole layer of experts (a share n/E for n experts);
 *     reading overlaps computing except for the first layer's weights.
 */
#ifndef MOECAL_PLAN_H
#define MOECAL_PLAN_H

#include <stdint.h>

#include "backend.h"
#include "modelcfg.h"

typedef struct moecal_plan_job {
    const moecal_model_config *cfg;
    const moecal_backend_ops *ops;
    int L;                     /* MoE layers calibrated */
    int64_t T, chunk;          /* tokens per layer, tokens per chunk */
    size_t act_elem;           /* bytes per element of the activation file */
    int nodes, ranks;          /* ranks split evenly over the nodes */
    int nslots;                /* token window slots (tokens.h) */
    bool all_experts, fp8_buffers;
    int prec, threads;
    const struct moecal_opts *opts;
    /* per rank, filled by the caller: stored bytes of the router and of the
     * rank's experts, summed over the layers, and of the first layer */
    uint64_t *weight_bytes, *first_layer_bytes;
    uint64_t baseline;         /* host memory the process holds already */
    double read_gbps, tokens_per_s;
} moecal_plan_job;

typedef struct moecal_plan_rank {
    int node, e0, e1;
    uint64_t token_bytes, exchange_bytes, weight_bytes;
    uint64_t host_bytes, gpu_bytes;
    double compute_s;
} moecal_plan_rank;

typedef struct moecal_plan_node {
    int ranks;
    uint64_t read_bytes, window_bytes, host_bytes, gpu_max;
    double read_s, compute_s, first_s, time_s;
} moecal_plan_node;

typedef struct moecal_plan {
    moecal_plan_rank *rank;    /* [ranks] */
    moecal_plan_node *node;    /* [nodes] */
    int64_t steps;             /* layers x chunks */
    uint64_t coll_world, coll_node, coll_leaders;   /* per rank (leaders: per leader) */
    double time_s;
    bool read_bound;
} moecal_plan;

/* The expert range of rank r of n (the job's split). */
void moecal_plan_experts(int E, int r, int n, int *e0, int *e1);
/* Compute the plan; free it with moecal_plan_free. */
moecal_status moecal_plan_compute(const moecal_plan_job *job, moecal_plan *out);
void moecal_plan_free(moecal_plan *p);

#endif
