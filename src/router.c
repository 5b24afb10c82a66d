/* router.c - expert selection of DeepSeek-V3, Qwen-MoE and Mixtral routers.
 *
 * Everything is float32, as the models compute their routers, with one
 * exception: exp is route_math.h's moecal_route_expf, which every IEEE-754
 * machine computes to the same bits (libm's expf differs between C libraries
 * and CUDA in rare cases), so the CPU and CUDA backends select the same
 * experts.  The exact logit precision runs the same steps in double
 * (router_tmpl.h is included once per value type).  The top-k is
 * a partial selection: candidates are scanned once in ascending index order
 * and kept in a small descending list, so a token costs O(E) comparisons
 * when k << E and never a full sort.  Scanning in index order and moving a
 * candidate ahead only when it is strictly better makes ties go to the lower
 * index without extra work.
 */
#include "config.h"

#include <math.h>
#include <stdlib.h>
#include <string.h>

#include "route_math.h"
#include "router.h"

/* Scratch layout (bytes), for the wider value type (double), all offsets
 * multiples of 8. */
typedef struct layout {
    size_t choice;  /* RT [E]              s' per expert */
    size_t gscore;  /* RT [n_group]        group scores */
    size_t topv;    /* RT [max(k, G)]      values of the running top list */
    size_t gidx;    /* int32 [n_group]     kept groups */
    size_t keep;    /* uint8 [n_group]     1 = group kept */
    size_t total;
} layout;

static layout scratch_layout(const moecal_model_config *cfg)
{
    layout l;
    size_t E = (size_t)cfg->n_routed_experts, G = (size_t)cfg->n_group;
    size_t K = (size_t)cfg->num_experts_per_tok;

    l.choice = 0;
    l.gscore = l.choice + E * sizeof(double);
    l.topv = l.gscore + G * sizeof(double);
    l.gidx = l.topv + (K > G ? K : G) * sizeof(double);
    l.keep = l.gidx + G * sizeof(int32_t);
    l.total = l.keep + G;
    return l;
}

moecal_status moecal_router_check(const moecal_model_config *cfg)
{
    if (cfg == NULL)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "router: no model config");
    int E = cfg->n_routed_experts, k = cfg->num_experts_per_tok;
    int G = cfg->n_group, TG = cfg->topk_group;
    if (E < 1 || E > (1 << 20))
        return moecal_error_set(MOECAL_ERR_INTERNAL, "router: n_routed_experts = %d", E);
    if (k < 1 || k > E)
        return moecal_error_set(MOECAL_ERR_INTERNAL,
                                "router: num_experts_per_tok = %d with %d experts", k, E);
    if (G < 1 || E % G != 0)
        return moecal_error_set(MOECAL_ERR_INTERNAL,
                                "router: n_group = %d does not divide %d experts", G, E);
    if (TG < 1 || TG > G)
        return moecal_error_set(MOECAL_ERR_INTERNAL,
                                "router: topk_group = %d with n_group = %d", TG, G);
    if (cfg->scoring != MOECAL_SCORING_SIGMOID && cfg->scoring != MOECAL_SCORING_SOFTMAX)
        return moecal_error_set(MOECAL_ERR_INTERNAL, "router: unknown scoring function %d",
                                (int)cfg->scoring);
    return MOECAL_OK;
}

int moecal_router_logits_parse(const char *name)
{
    if (name == NULL)
        return -1;
    if (strcmp(name, "bf16") == 0)
        return MOECAL_LOGITS_BF16;
    if (strcmp(name, "fp32") == 0)
        return MOECAL_LOGITS_FP32;
    if (strcmp(name, "exact") == 0)
        return MOECAL_LOGITS_EXACT;
    return -1;
}

const char *moecal_router_logits_name(int prec)
{
    switch (prec) {
    case MOECAL_LOGITS_BF16: return "bf16";
    case MOECAL_LOGITS_FP32: return "fp32";
    case MOECAL_LOGITS_EXACT: return "exact";
    default: return "auto";
    }
}

int moecal_router_logits_default(const moecal_model_config *cfg)
{
    return cfg->family == MOECAL_FAMILY_DEEPSEEK_V3 ? MOECAL_LOGITS_FP32 : MOECAL_LOGITS_BF16;
}

size_t moecal_router_scratch_size(const moecal_model_config *cfg)
{
    return scratch_layout(cfg).total;
}

static inline float no_nan_f(float v)
{
    return v == v ? v : -INFINITY;
}

static inline double no_nan_d(double v)
{
    return v == v ? v : -(double)INFINITY;
}

static inline float exp_f(float x)
{
    return moecal_route_expf(x);
}

#define RT float
#define RT_FN(name) name##_f
#define RT_EXP exp_f
#define RT_NO_NAN no_nan_f
#include "router_tmpl.h"

#define RT double
#define RT_FN(name) name##_d
#define RT_EXP moecal_route_exp
#define RT_NO_NAN no_nan_d
#include "router_tmpl.h"

void moecal_router_select_scratch(const moecal_model_config *cfg, const float *logits,
                                  const float *bias, int64_t ntok, int32_t *experts,
                                  float *weights, void *scratch)
{
    select_tokens_f(cfg, logits, bias, ntok, experts, weights, scratch);
}

void moecal_router_select_scratch_d(const moecal_model_config *cfg, const double *logits,
                                    const float *bias, int64_t ntok, int32_t *experts,
                                    float *weights, void *scratch)
{
    select_tokens_d(cfg, logits, bias, ntok, experts, weights, scratch);
}

/* One allocation of scratch around either selection (f or d logits). */
static moecal_status select_alloc(const moecal_model_config *cfg, const float *lf,
                                  const double *ld, const float *bias, int64_t ntok,
                                  int32_t *experts, float *weights)
{
    MOECAL_TRY(moecal_router_check(cfg));
    void *scratch = malloc(moecal_router_scratch_size(cfg));
    if (scratch == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "router: out of memory for scratch");
    if (ld != NULL)
        select_tokens_d(cfg, ld, bias, ntok, experts, weights, scratch);
    else
        select_tokens_f(cfg, lf, bias, ntok, experts, weights, scratch);
    free(scratch);
    return MOECAL_OK;
}

moecal_status moecal_router_select(const moecal_model_config *cfg, const float *logits,
                                   const float *bias, int64_t ntok, int32_t *experts,
                                   float *weights)
{
    return select_alloc(cfg, logits, NULL, bias, ntok, experts, weights);
}

moecal_status moecal_router_select_d(const moecal_model_config *cfg, const double *logits,
                                     const float *bias, int64_t ntok, int32_t *experts,
                                     float *weights)
{
    return select_alloc(cfg, NULL, logits, bias, ntok, experts, weights);
}
