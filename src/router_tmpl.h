/* router_tmpl.h - the selection steps of router.c for one value type.
 *
 * Included by router.c once per type with RT (float or double), RT_FN(name)
 * (the name with the type's suffix), RT_EXP (exp of an RT, identical on
 * every machine) and RT_NO_NAN; it undefines them at the end.  float is the
 * models' own arithmetic; double serves the exact logit precision.  Both run
 * the same steps in the same order, with the same tie rule: candidates are
 * scanned in ascending index order and move ahead only when strictly
 * better, so the lower expert (and group) index wins a tie.
 */

/* Offer candidate (v, i) to the descending list tv/ti holding *cnt of at most
 * cap entries.  Values are never NaN here. */
static inline void RT_FN(top_push)(RT *tv, int32_t *ti, int *cnt, int cap, RT v, int32_t i)
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

static inline RT RT_FN(sigmoid)(RT x)
{
    return (RT)1 / ((RT)1 + RT_EXP(-x));
}

/* Choice values of one token; returns the softmax denominator (1 for sigmoid)
 * and the logit maximum in *lmax, both needed to recompute scores. */
static RT RT_FN(token_choice)(const moecal_model_config *cfg, const RT *l, const float *bias,
                              RT *choice, RT *lmax)
{
    int E = cfg->n_routed_experts;

    if (cfg->scoring == MOECAL_SCORING_SIGMOID) {
        *lmax = 0;
        if (bias != NULL) {
            for (int j = 0; j < E; j++)
                choice[j] = RT_NO_NAN(RT_FN(sigmoid)(l[j]) + (RT)bias[j]);
        } else {
            for (int j = 0; j < E; j++)
                choice[j] = RT_NO_NAN(RT_FN(sigmoid)(l[j]));
        }
        return 1;
    }

    /* softmax: exp(l - max) / sum, as torch computes it in float32 */
    RT m = l[0];
    for (int j = 1; j < E; j++)
        m = l[j] > m || m != m ? l[j] : m; /* fmax: a NaN loses */
    RT sum = 0;
    for (int j = 0; j < E; j++) {
        choice[j] = RT_EXP(l[j] - m);
        sum += choice[j];
    }
    for (int j = 0; j < E; j++)
        choice[j] = RT_NO_NAN(bias != NULL ? choice[j] / sum + (RT)bias[j] : choice[j] / sum);
    *lmax = m;
    return sum;
}

/* Mark the topk_group best groups in keep[].  Group score: sum of the two
 * largest choice values (max when there is no bias, DeepSeek's reference). */
static void RT_FN(select_groups)(const moecal_model_config *cfg, const RT *choice,
                                 int with_bias, const layout *lo, unsigned char *base)
{
    int G = cfg->n_group, TG = cfg->topk_group;
    int gsz = cfg->n_routed_experts / G;
    RT *gs = (RT *)(void *)(base + lo->gscore);
    RT *tv = (RT *)(void *)(base + lo->topv);
    int32_t *gi = (int32_t *)(void *)(base + lo->gidx);
    unsigned char *keep = base + lo->keep;

    for (int g = 0; g < G; g++) {
        const RT *c = choice + (size_t)g * gsz;
        RT m1 = c[0], m2 = 0;
        int have2 = 0;
        for (int j = 1; j < gsz; j++) {
            RT v = c[j];
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
        gs[g] = RT_NO_NAN((with_bias && have2) ? m1 + m2 : m1);
    }

    int cnt = 0;
    for (int g = 0; g < G; g++)
        RT_FN(top_push)(tv, gi, &cnt, TG, gs[g], g);
    for (int g = 0; g < G; g++)
        keep[g] = 0;
    for (int i = 0; i < cnt; i++)
        keep[gi[i]] = 1;
}

static void RT_FN(select_tokens)(const moecal_model_config *cfg, const RT *logits,
                                 const float *bias, int64_t ntok, int32_t *experts,
                                 float *weights, void *scratch)
{
    const int E = cfg->n_routed_experts, k = cfg->num_experts_per_tok;
    const int G = cfg->n_group;
    const int grouped = G > 1 && cfg->topk_group < G;
    const int gsz = E / G;
    const int sigmoid = cfg->scoring == MOECAL_SCORING_SIGMOID;
    const int normalize = cfg->norm_topk_prob || cfg->family == MOECAL_FAMILY_MIXTRAL;
    const RT scale = (RT)cfg->routed_scaling_factor;
    const RT minus_inf = -(RT)INFINITY;
    layout lo = scratch_layout(cfg);
    unsigned char *base = scratch;
    RT *choice = (RT *)(void *)(base + lo.choice);
    RT *tv = (RT *)(void *)(base + lo.topv);
    const unsigned char *keep = base + lo.keep;

    for (int64_t t = 0; t < ntok; t++) {
        const RT *l = logits + (size_t)t * (size_t)E;
        int32_t *sel = experts + (size_t)t * (size_t)k;
        RT lmax, denom = RT_FN(token_choice)(cfg, l, bias, choice, &lmax);
        int cnt = 0;

        if (grouped) {
            RT_FN(select_groups)(cfg, choice, bias != NULL, &lo, base);
            /* experts of dropped groups compete as -inf (DeepSeek's masking) */
            for (int g = 0; g < G; g++) {
                const RT *c = choice + (size_t)g * gsz;
                int32_t j0 = (int32_t)g * gsz;
                if (keep[g]) {
                    for (int j = 0; j < gsz; j++)
                        RT_FN(top_push)(tv, sel, &cnt, k, c[j], j0 + j);
                } else if (cnt < k) {
                    /* -inf only enters a list that is not full */
                    for (int j = 0; j < gsz; j++)
                        RT_FN(top_push)(tv, sel, &cnt, k, minus_inf, j0 + j);
                }
            }
        } else {
            for (int j = 0; j < E; j++)
                RT_FN(top_push)(tv, sel, &cnt, k, choice[j], j);
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
            RT sum = 0, d = 1;
            /* weights are the scores without bias, recomputed exactly as above
             * (twice: once for the sum, once for the weight) */
            for (int i = 0; i < k; i++) {
                RT x = l[sel[i]];
                sum += sigmoid ? RT_FN(sigmoid)(x) : RT_EXP(x - lmax) / denom;
            }
            /* transformers' DeepSeek-V3 guards the sigmoid sum with 1e-20 */
            if (normalize)
                d = sigmoid ? sum + (RT)1e-20f : sum;
            for (int i = 0; i < k; i++) {
                RT x = l[sel[i]];
                RT v = sigmoid ? RT_FN(sigmoid)(x) : RT_EXP(x - lmax) / denom;
                if (normalize)
                    v /= d;
                w[i] = (float)(v * scale);
            }
        }
    }
}

#undef RT
#undef RT_FN
#undef RT_EXP
#undef RT_NO_NAN
