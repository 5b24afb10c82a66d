/* router.c - expert selection of DeepSeek-V3, Qwen-MoE and Mixtral routers.
 *
 * Everything is float32, as the models compute their routers, with one
 * exception: exp is route_math.h's moecal_route_expf, which every IEEE-754
 * machine computes to the same bits (libm's expf differs between C libraries
 * and CUDA in rare cases), so the CPU and CUDA backends select the same
 * experts.  The top-k is
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

/* Scratch layout (bytes), all offsets multiples of 4. */
typedef struct layout {
    size_t choice;  /* float [E]            s' per expert */
    size_t gscore;  /* float [n_group]      group scores */
    size_t topv;    /* float [max(k, G)]    values of the running top list */
    size_t gidx;    /* int32 [n_group]      kept groups */
    size_t keep;    /* uint8 [n_group]      1 = group kept */
    size_t total;
} layout;

static layout scratch_layout(const moecal_model_config *cfg)
{
    layout l;
    size_t E = (size_t)cfg->n_routed_experts, G = (size_t)cfg->n_group;
    size_t K = (size_t)cfg->num_experts_per_tok;

    l.choice = 0;
    l.gscore = l.choice + E * sizeof(float);
    l.topv = l.gscore + G * sizeof(float);
    l.gidx = l.topv + (K > G ? K : G) * sizeof(float);
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

size_t moecal_router_scratch_size(const moecal_model_config *cfg)
{
    return scratch_layout(cfg).total;
}

/* Offer candidate (v, i) to the descending list tv/ti holding *cnt of at most
 * cap entries.  Candidates come in ascending index order, so an equal value
 * never overtakes an earlier (lower) index.  Values are never NaN here. */
static inline void top_push(float *tv, int32_t *ti, int *cnt, int cap, float v, int32_t i)
{
    int p = *cnt;

    if (p == cap) {
        if (!(v > tv[cap - 1]))
            return;
        p = cap - 1;
    } else {
        (*cnt)++;
    }
    while (p > 0 && v > tv[p - 1]) {
        tv[p] = tv[p - 1];
        ti[p] = ti[p - 1];
        p--;
    }
    tv[p] = v;
    ti[p] = i;
}

/* A NaN choice value competes as -inf, so the selection stays a total order. */
static inline float no_nan(float v)
{
    return v == v ? v : -INFINITY;
}

static inline float sigmoidf(float x)
{
    return 1.0f / (1.0f + moecal_route_expf(-x));
}

/* Choice values of one token; returns the softmax denominator (1 for sigmoid)
 * and the logit maximum in *lmax, both needed to recompute scores. */
static float token_choice(const moecal_model_config *cfg, const float *l, const float *bias,
                          float *choice, float *lmax)
{
    int E = cfg->n_routed_experts;

    if (cfg->scoring == MOECAL_SCORING_SIGMOID) {
        *lmax = 0.0f;
        if (bias != NULL) {
            for (int j = 0; j < E; j++)
                choice[j] = no_nan(sigmoidf(l[j]) + bias[j]);
        } else {
            for (int j = 0; j < E; j++)
                choice[j] = no_nan(sigmoidf(l[j]));
        }
        return 1.0f;
    }

    /* softmax: exp(l - max) / sum, as torch computes it in float32 */
    float m = l[0];
    for (int j = 1; j < E; j++)
        m = fmaxf(m, l[j]);
    float sum = 0.0f;
    for (int j = 0; j < E; j++) {
        choice[j] = moecal_route_expf(l[j] - m);
        sum += choice[j];
    }
    for (int j = 0; j < E; j++)
        choice[j] = no_nan(bias != NULL ? choice[j] / sum + bias[j] : choice[j] / sum);
    *lmax = m;
    return sum;
}

/* Mark the topk_group best groups in keep[].  Group score: sum of the two
 * largest choice values (max when there is no bias, DeepSeek's reference). */
static void select_groups(const moecal_model_config *cfg, const float *choice, int with_bias,
                          const layout *lo, unsigned char *base)
{
    int G = cfg->n_group, TG = cfg->topk_group;
    int gsz = cfg->n_routed_experts / G;
    float *gs = (float *)(void *)(base + lo->gscore);
    float *tv = (float *)(void *)(base + lo->topv);
    int32_t *gi = (int32_t *)(void *)(base + lo->gidx);
    unsigned char *keep = base + lo->keep;

    for (int g = 0; g < G; g++) {
        const float *c = choice + (size_t)g * gsz;
        float m1 = c[0], m2 = 0.0f;
        int have2 = 0;
        for (int j = 1; j < gsz; j++) {
            float v = c[j];
            if (v > m1) {
                m2 = m1;
                m1 = v;
                have2 = 1;
            } else if (!have2 || v > m2) {
                m2 = v;
                have2 = 1;
            }
        }
        /* a group of one expert has no second value: its score is that value */
        gs[g] = no_nan((with_bias && have2) ? m1 + m2 : m1);
    }

    int cnt = 0;
    for (int g = 0; g < G; g++)
        top_push(tv, gi, &cnt, TG, gs[g], g);
    for (int g = 0; g < G; g++)
        keep[g] = 0;
    for (int i = 0; i < cnt; i++)
        keep[gi[i]] = 1;
}

void moecal_router_select_scratch(const moecal_model_config *cfg, const float *logits,
                                  const float *bias, int64_t ntok, int32_t *experts,
                                  float *weights, void *scratch)
{
    const int E = cfg->n_routed_experts, k = cfg->num_experts_per_tok;
    const int G = cfg->n_group;
    const int grouped = G > 1 && cfg->topk_group < G;
    const int gsz = E / G;
    const int sigmoid = cfg->scoring == MOECAL_SCORING_SIGMOID;
    const int normalize = cfg->norm_topk_prob || cfg->family == MOECAL_FAMILY_MIXTRAL;
    const float scale = (float)cfg->routed_scaling_factor;
    layout lo = scratch_layout(cfg);
    unsigned char *base = scratch;
    float *choice = (float *)(void *)(base + lo.choice);
    float *tv = (float *)(void *)(base + lo.topv);
    const unsigned char *keep = base + lo.keep;

    for (int64_t t = 0; t < ntok; t++) {
        const float *l = logits + (size_t)t * (size_t)E;
        int32_t *sel = experts + (size_t)t * (size_t)k;
        float lmax, denom = token_choice(cfg, l, bias, choice, &lmax);
        int cnt = 0;

        if (grouped) {
            select_groups(cfg, choice, bias != NULL, &lo, base);
            /* experts of dropped groups compete as -inf (DeepSeek's masking) */
            for (int g = 0; g < G; g++) {
                const float *c = choice + (size_t)g * gsz;
                int32_t j0 = (int32_t)g * gsz;
                if (keep[g]) {
                    for (int j = 0; j < gsz; j++)
                        top_push(tv, sel, &cnt, k, c[j], j0 + j);
                } else if (cnt < k) {
                    /* -inf only enters a list that is not full */
                    for (int j = 0; j < gsz; j++)
                        top_push(tv, sel, &cnt, k, -INFINITY, j0 + j);
                }
            }
        } else {
            for (int j = 0; j < E; j++)
                top_push(tv, sel, &cnt, k, choice[j], j);
        }

        /* ascending expert order (k is small: insertion sort) */
        for (int i = 1; i < k; i++) {
            int32_t e = sel[i];
            int p = i;
            while (p > 0 && sel[p - 1] > e) {
                sel[p] = sel[p - 1];
                p--;
            }
            sel[p] = e;
        }

        if (weights != NULL) {
            float *w = weights + (size_t)t * (size_t)k;
            float sum = 0.0f;
            /* weights are the scores without bias, recomputed exactly as above */
            for (int i = 0; i < k; i++) {
                float x = l[sel[i]];
                w[i] = sigmoid ? sigmoidf(x) : moecal_route_expf(x - lmax) / denom;
                sum += w[i];
            }
            if (normalize) {
                /* transformers' DeepSeek-V3 guards the sigmoid sum with 1e-20 */
                float d = sigmoid ? sum + 1e-20f : sum;
                for (int i = 0; i < k; i++)
                    w[i] /= d;
            }
            for (int i = 0; i < k; i++)
                w[i] *= scale;
        }
    }
}

moecal_status moecal_router_select(const moecal_model_config *cfg, const float *logits,
                                   const float *bias, int64_t ntok, int32_t *experts,
                                   float *weights)
{
    MOECAL_TRY(moecal_router_check(cfg));
    void *scratch = malloc(moecal_router_scratch_size(cfg));
    if (scratch == NULL)
        return moecal_error_set(MOECAL_ERR_NOMEM, "router: out of memory for scratch");
    moecal_router_select_scratch(cfg, logits, bias, ntok, experts, weights, scratch);
    free(scratch);
    return MOECAL_OK;
}
