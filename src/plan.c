/* plan.c - `moecal calibrate --plan`; see plan.h. */
#include "config.h"

#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/resource.h>
#include <sys/stat.h>

#include "activations.h"
#include "calibrate.h"
#include "model.h"
#include "plan.h"
#include "prefetch.h"
#include "router.h"
#include "runtime.h"
#include "util.h"

#define GB 1e9
#define GIB 1073741824.0

void moecal_plan_experts(int E, int r, int n, int *e0, int *e1)
{
    *e0 = (int)((int64_t)E * r / n);
    *e1 = (int)((int64_t)E * (r + 1) / n);
}

void moecal_plan_free(moecal_plan *p)
{
    free(p->rank);
    free(p->node);
    memset(p, 0, sizeof *p);
}

/* Rows of a chunk of nrows that leader `node` of `nodes` reads (tokens.c). */
static int64_t leader_rows(int64_t nrows, int node, int nodes)
{
    return nrows * (node + 1) / nodes - nrows * node / nodes;
}

/* What a rank with n experts holds on the host besides its backend: the
 * prefetch's buffers (its own sizing) and the amax tables. */
static uint64_t rank_host(const moecal_plan_job *job, int n, int64_t C)
{
    uint64_t L = (uint64_t)job->L, N = (uint64_t)n;

    return moecal_prefetch_memory(job->cfg, n, job->fp8_buffers) + 3 * L * N * 3 * 4 +
           L * (uint64_t)C * N * (3 * 4 + 8) + (uint64_t)C * 16;
}

static moecal_status plan_rank(const moecal_plan_job *job, int r, int64_t C, uint64_t window,
                               moecal_plan *p)
{
    const moecal_model_config *m = job->cfg;
    moecal_plan_rank *pr = &p->rank[r];
    int per = job->ranks / job->nodes, extra = job->ranks % job->nodes;
    uint64_t row = (uint64_t)m->hidden_size, host = 0, dev = 0;
    moecal_backend_config bc;

    /* ranks split evenly: the first `extra` nodes hold one more */
    pr->node = r < extra * (per + 1) ? r / (per + 1) : extra + (r - extra * (per + 1)) / per;
    moecal_plan_experts(m->n_routed_experts, r, job->ranks, &pr->e0, &pr->e1);
    pr->weight_bytes = job->weight_bytes[r];
    bool leader = r == 0 || p->rank[r - 1].node != pr->node;
    for (int64_t c = 0; leader && c < C; c++) {
        int64_t nrows = c + 1 < C ? job->chunk : job->T - c * job->chunk;
        int64_t mine = leader_rows(nrows, pr->node, job->nodes);
        pr->token_bytes += (uint64_t)job->L * (uint64_t)mine * row * job->act_elem;
        if (job->nodes > 1)
            pr->exchange_bytes += (uint64_t)job->L * (uint64_t)(nrows - mine) * (row * 2 + 1);
    }
    bc = (moecal_backend_config){.model = m, .e0 = pr->e0, .e1 = pr->e1,
                                 .max_chunk_tokens = job->chunk,
                                 .all_experts = job->all_experts, .router_logits = job->prec,
                                 .device = -1, .threads = job->threads, .rank = r,
                                 .opts = job->opts};
    if (job->ops->memory)
        MOECAL_TRY(job->ops->memory(&bc, &host, &dev));
    /* every rank of a node maps the window and reads all of it: it counts in
     * each rank's resident memory, once in the node's */
    pr->host_bytes = job->baseline + host + rank_host(job, pr->e1 - pr->e0, C) + window;
    pr->gpu_bytes = dev;
    pr->compute_s = (double)job->T * job->L * (pr->e1 - pr->e0) / m->n_routed_experts /
                    job->tokens_per_s;
    return MOECAL_OK;
}

moecal_status moecal_plan_compute(const moecal_plan_job *job, moecal_plan *p)
{
    const int64_t C = (job->T + job->chunk - 1) / job->chunk;
    uint64_t H = (uint64_t)job->cfg->hidden_size, slot;
    double bw = job->read_gbps * GB;

    memset(p, 0, sizeof *p);
    if (job->nodes < 1 || job->ranks < job->nodes || job->T < 1 || job->chunk < 1)
        return moecal_error_set(MOECAL_ERR_USAGE, "--plan: %d rank(s) on %d node(s), %lld "
                                "tokens in chunks of %lld: nothing to plan", job->ranks,
                                job->nodes, (long long)job->T, (long long)job->chunk);
    p->rank = calloc((size_t)job->ranks, sizeof *p->rank);
    p->node = calloc((size_t)job->nodes, sizeof *p->node);
    if (!p->rank || !p->node) {
        moecal_plan_free(p);
        return moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the plan");
    }
    p->steps = (int64_t)job->L * C;
    /* tokens.c's window: slots of a header, the rows and the skip bytes */
    slot = (64 + (uint64_t)job->chunk * H * 2 + (uint64_t)job->chunk + 63) & ~(uint64_t)63;
    for (int r = 0; r < job->ranks; r++) {
        moecal_status s = plan_rank(job, r, C, (uint64_t)job->nslots * slot, p);
        if (s != MOECAL_OK) {
            moecal_plan_free(p);
            return s;
        }
        moecal_plan_node *nd = &p->node[p->rank[r].node];
        if (nd->ranks++ == 0)
            nd->window_bytes = (uint64_t)job->nslots * slot;
        nd->read_bytes += p->rank[r].token_bytes + p->rank[r].weight_bytes;
        nd->host_bytes += p->rank[r].host_bytes - (uint64_t)job->nslots * slot;
        nd->gpu_max = p->rank[r].gpu_bytes > nd->gpu_max ? p->rank[r].gpu_bytes : nd->gpu_max;
        nd->compute_s = p->rank[r].compute_s > nd->compute_s ? p->rank[r].compute_s
                                                             : nd->compute_s;
        nd->first_s += (double)job->first_layer_bytes[r] / bw;
    }
    for (int i = 0; i < job->nodes; i++) {
        moecal_plan_node *nd = &p->node[i];
        double overlapped = (double)nd->read_bytes / bw - nd->first_s;
        nd->host_bytes += nd->window_bytes;
        nd->read_s = (double)nd->read_bytes / bw;
        nd->time_s = nd->first_s + (overlapped > nd->compute_s ? overlapped : nd->compute_s);
        if (nd->time_s > p->time_s) {
            p->time_s = nd->time_s;
            p->read_bound = overlapped > nd->compute_s;
        }
    }
    /* per step: the stop agreement and the step's status (world), the
     * window barrier (node), the parts' status, and with several nodes the
     * rows, skip marks and counts (leaders); per layer: the weights' status */
    p->coll_world = 2 * (uint64_t)p->steps + (uint64_t)job->L;
    p->coll_node = (uint64_t)p->steps;
    p->coll_leaders = (uint64_t)p->steps * (job->nodes > 1 ? 4 : 1);
    return MOECAL_OK;
}

/* ------------------------------------------------------------ the command */

/* Stored bytes of a layer from config.json alone (no weights here): FP8
 * experts with float32 block scales when the config says fp8, else BF16; a
 * BF16 router and a float32 bias. */
static void config_bytes(const moecal_model_config *m, int n, uint64_t *router,
                         uint64_t *experts)
{
    uint64_t H = (uint64_t)m->hidden_size, I = (uint64_t)m->moe_intermediate_size;
    uint64_t B = m->weight_block[0] > 0 ? (uint64_t)m->weight_block[0] : 128;

    *router = (uint64_t)m->n_routed_experts * H * 2 +
              (m->has_correction_bias ? (uint64_t)m->n_routed_experts * 4 : 0);
    *experts = m->fp8 ? 3 * (uint64_t)n * (I * H + ((I + B - 1) / B) * ((H + B - 1) / B) * 4)
                      : 3 * (uint64_t)n * I * H * 2;
}

typedef struct plan_inputs {
    moecal_model *model;          /* NULL: config.json alone */
    moecal_model_config cfg;      /* when model is NULL */
    const moecal_model_config *m;
    int *layers, L;
    int64_t T;
    size_t act_elem;
    bool from_file;
} plan_inputs;

static moecal_status open_plan_inputs(const moecal_calib_params *p, plan_inputs *in)
{
    char path[4200], act[4200];
    struct stat st;

    snprintf(path, sizeof path, "%s/model.safetensors.index.json", p->model_dir);
    snprintf(act, sizeof act, "%s/model.safetensors", p->model_dir);
    if (stat(path, &st) == 0 || stat(act, &st) == 0) {
        MOECAL_TRY(moecal_model_open(p->model_dir, &in->model));
        in->m = moecal_model_cfg(in->model);
    } else {
        snprintf(path, sizeof path, "%s/config.json", p->model_dir);
        MOECAL_TRY(moecal_model_config_load(path, &in->cfg));
        in->m = &in->cfg;
    }
    MOECAL_TRY(moecal_calib_parse_layers(p->layers, in->m->moe_layers, in->m->n_moe_layers,
                                         &in->layers, &in->L));
    if (p->activations)
        snprintf(act, sizeof act, "%s", p->activations);
    else
        snprintf(act, sizeof act, "%s/activations.h5", p->model_dir);
    in->act_elem = 2;
    if (stat(act, &st) == 0) {
        moecal_act *a = NULL;
        MOECAL_TRY(moecal_act_open(act, MPI_COMM_NULL, &a));
        in->T = moecal_act_tokens(a);
        in->act_elem = moecal_dtype_size(moecal_act_dtype(a));
        in->from_file = true;
        for (int i = 0; i < in->L; i++)
            if (!moecal_act_has_layer(a, in->layers[i])) {
                moecal_act_close(a);
                return moecal_error_set(MOECAL_ERR_MISMATCH, "%s has no /layers/%d/hidden",
                                        act, in->layers[i]);
            }
        moecal_act_close(a);
    }
    if (p->max_tokens > 0 && (in->T == 0 || p->max_tokens < in->T))
        in->T = p->max_tokens;
    if (in->T < 1)
        return moecal_error_set(MOECAL_ERR_USAGE, "--plan: %s does not exist; give the number "
                                "of tokens with --max-tokens", act);
    return MOECAL_OK;
}

static uint64_t rss_now(void)
{
    struct rusage ru;
    return getrusage(RUSAGE_SELF, &ru) == 0 ? (uint64_t)ru.ru_maxrss * 1024 : 0;
}

/* Per rank: stored bytes over all layers and of the first layer. */
static moecal_status weight_bytes(plan_inputs *in, int ranks, uint64_t *all, uint64_t *first)
{
    for (int r = 0; r < ranks; r++) {
        int e0, e1;
        moecal_plan_experts(in->m->n_routed_experts, r, ranks, &e0, &e1);
        all[r] = first[r] = 0;
        for (int l = 0; l < in->L; l++) {
            uint64_t rb, eb;
            if (in->model)
                MOECAL_TRY(moecal_model_layer_bytes(in->model, in->layers[l], e0, e1, &rb, &eb));
            else
                config_bytes(in->m, e1 - e0, &rb, &eb);
            all[r] += rb + eb;
            if (l == 0)
                first[r] = rb + eb;
        }
    }
    return MOECAL_OK;
}

static void print_plan(const moecal_plan_job *job, const plan_inputs *in, const moecal_plan *p)
{
    const moecal_model_config *m = job->cfg;
    bool gpu = job->ops->memory && strcmp(job->ops->name, "cpu") != 0;

    printf("# moecal calibrate --plan: %s backend, %d node(s) x %d rank(s)%s\n",
           job->ops->name, job->nodes, job->ranks / job->nodes,
           job->ranks % job->nodes ? " (uneven)" : "");
    printf("# model %s: %d MoE layer(s) of %d experts, hidden %d, intermediate %d, %s weights "
           "(%s)\n", m->model_type, job->L, m->n_routed_experts, m->hidden_size,
           m->moe_intermediate_size, m->fp8 ? "FP8" : "BF16",
           in->model ? "sizes from the safetensors headers" : "sizes from config.json");
    printf("# %lld tokens per layer (%s) in chunks of %lld: %lld steps; %s mode\n",
           (long long)job->T, in->from_file ? "activation file" : "--max-tokens",
           (long long)job->chunk, (long long)p->steps,
           job->all_experts ? "all-experts" : "top-k");
    printf("# assumed: %.2f GB/s read per node, %.0f tokens/s per rank for a whole layer\n",
           job->read_gbps, job->tokens_per_s);
    printf("node  ranks  read_GB  tokens_GB  exchange_GB  host_GiB  window_GiB  GPU_GiB/rank"
           "  read_s  compute_s  time_s\n");
    for (int i = 0; i < job->nodes; i++) {
        const moecal_plan_node *nd = &p->node[i];
        uint64_t tok = 0, ex = 0;
        for (int r = 0; r < job->ranks; r++)
            if (p->rank[r].node == i) {
                tok += p->rank[r].token_bytes;
                ex += p->rank[r].exchange_bytes;
            }
        printf("%4d  %5d  %7.2f  %9.2f  %11.2f  %8.2f  %10.2f  %12.2f  %6.1f  %9.1f  %6.1f\n",
               i, nd->ranks, (double)nd->read_bytes / GB, (double)tok / GB, (double)ex / GB,
               (double)nd->host_bytes / GIB, (double)nd->window_bytes / GIB,
               gpu ? (double)nd->gpu_max / GIB : 0.0, nd->read_s, nd->compute_s, nd->time_s);
    }
    printf("rank  node  experts  weight_bytes  token_bytes  host_bytes  GPU_bytes  compute_s\n");
    for (int r = 0; r < job->ranks; r++) {
        const moecal_plan_rank *pr = &p->rank[r];
        char ex[32];
        if (pr->e1 > pr->e0)
            snprintf(ex, sizeof ex, "%d-%d", pr->e0, pr->e1 - 1);
        else
            snprintf(ex, sizeof ex, "none");
        printf("%4d  %4d  %7s  %12llu  %11llu  %10llu  %9llu  %9.1f\n", r, pr->node, ex,
               (unsigned long long)pr->weight_bytes, (unsigned long long)pr->token_bytes,
               (unsigned long long)pr->host_bytes, (unsigned long long)pr->gpu_bytes,
               pr->compute_s);
    }
    printf("# collectives per rank: %llu over the world, %llu over the node; %llu per node "
           "leader over the leaders\n", (unsigned long long)p->coll_world,
           (unsigned long long)p->coll_node, (unsigned long long)p->coll_leaders);
    printf("# predicted wall: %.1f s (%s), besides start-up and writing the outputs\n",
           p->time_s, p->read_bound ? "read-bound" : "compute-bound");
}

moecal_status moecal_calibrate_plan(const moecal_comm *c, const moecal_calib_params *p)
{
    plan_inputs in = {0};
    moecal_plan_job job = {0};
    moecal_plan plan = {0};
    moecal_status s = MOECAL_OK;

    if (c->rank != 0)
        goto out;
    job.nodes = p->plan_nodes > 0 ? p->plan_nodes : c->n_nodes;
    job.ranks = p->plan_nodes > 0 ? job.nodes * (p->plan_ranks_per_node > 0
                                                 ? p->plan_ranks_per_node : 1)
                                  : (p->plan_ranks_per_node > 0
                                     ? job.nodes * p->plan_ranks_per_node : c->size);
    job.ops = strcmp(p->backend, "auto") == 0 ? moecal_backend_auto()
                                              : moecal_backend_find(p->backend);
    if (!job.ops) {
        s = moecal_error_set(MOECAL_ERR_UNSUPPORTED, "--plan: backend '%s' is not in this "
                             "build (%s)", p->backend, MOECAL_BUILD_OPTIONS);
        goto out;
    }
    if ((s = open_plan_inputs(p, &in)) != MOECAL_OK)
        goto out;
    /* the libraries, and what opening the inputs took, as the job will */
    job.baseline = rss_now();
    job.weight_bytes = calloc((size_t)job.ranks, sizeof *job.weight_bytes);
    job.first_layer_bytes = calloc((size_t)job.ranks, sizeof *job.first_layer_bytes);
    if (!job.weight_bytes || !job.first_layer_bytes) {
        s = moecal_error_set(MOECAL_ERR_NOMEM, "out of memory for the plan");
        goto out;
    }
    if ((s = weight_bytes(&in, job.ranks, job.weight_bytes, job.first_layer_bytes)) !=
        MOECAL_OK)
        goto out;
    job.cfg = in.m;
    job.L = in.L;
    job.T = in.T;
    job.chunk = p->chunk_tokens < in.T ? p->chunk_tokens : in.T;
    job.act_elem = in.act_elem;
    job.all_experts = p->all_experts;
    job.fp8_buffers = job.ops->fp8_weights && in.m->fp8;
    job.nslots = job.ops->submit_chunk ? 3 : 2;
    job.prec = p->router_logits >= 0 ? p->router_logits : moecal_router_logits_default(in.m);
    job.threads = p->threads;
    job.opts = p->opts;
    job.read_gbps = p->assume_read_gbps;
    job.tokens_per_s = p->assume_tokens_per_s;
    if ((s = moecal_plan_compute(&job, &plan)) == MOECAL_OK) {
        print_plan(&job, &in, &plan);
        fflush(stdout);
    }
out:
    moecal_plan_free(&plan);
    free(job.weight_bytes);
    free(job.first_layer_bytes);
    free(in.layers);
    if (in.model)
        moecal_model_close(in.model);
    else if (in.m)
        moecal_model_config_free(&in.cfg);
    return s;
}
