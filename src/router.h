/* router.h - the models' own expert selection, on the CPU, float32 (or
 * double for the exact logit precision, route_math.h).
 *
 * Scores: sigmoid(logits) (DeepSeek-V3, MOECAL_SCORING_SIGMOID) or
 * softmax(logits) over the E experts (Mixtral, Qwen-MoE).  Choice values:
 * s' = score + bias when a bias (e_score_correction_bias) is given, else the
 * score.  Group limit, when 1 < n_group and topk_group < n_group: a group's
 * score is the sum of its two largest s' (max s' when there is no bias, as
 * DeepSeek's own inference code does), the topk_group best groups are kept
 * and the experts of the other groups are masked to -inf (DeepSeek's
 * reference; some transformers versions mask to 0.0, which differs when
 * s' < 0 is possible).  Then the k experts with the largest s' are chosen.
 * Routing weights are the scores (not s') of the chosen experts, normalized
 * to sum 1 when norm_topk_prob (always for Mixtral), times
 * routed_scaling_factor.  Routing weights do not affect amax.
 *
 * Ties break toward the lower expert (and group) index: the k-th place, the
 * group top-2 and the topk_group-th group alike, as torch.topk on a GPU and
 * the serving engines' top-k kernels do (torch.topk on the CPU does not
 * promise an order; tests/router_hf.py checks both, doc/ROUTING.md).  A NaN choice value
 * (from NaN logits) competes as -inf.  Valid configurations (as
 * moecal_model_config_parse checks them): 1 <= k <= E, n_group >= 1 dividing
 * E, 1 <= topk_group <= n_group.
 */
#ifndef MOECAL_ROUTER_H
#define MOECAL_ROUTER_H

#include <stddef.h>
#include <stdint.h>

#include "error.h"
#include "modelcfg.h"

#ifdef __cplusplus
extern "C" {
#endif

/* logits: [ntok][E] float32 (x Wg^T).  Writes the k selected expert indices
 * per token, ascending by expert index, into experts[ntok][k]; weights
 * (may be NULL) receives the routing weights in the same order.  Allocates
 * its scratch once per call; MOECAL_ERR_INTERNAL for an invalid config,
 * MOECAL_ERR_NOMEM if the scratch cannot be had. */
moecal_status moecal_router_select(const moecal_model_config *cfg, const float *logits,
                                   const float *bias, int64_t ntok, int32_t *experts,
                                   float *weights);

/* The same with caller-provided scratch (no allocation; for hot loops and
 * threads, one scratch per thread) of moecal_router_scratch_size(cfg) bytes,
 * aligned as malloc aligns.  The config must be valid (moecal_router_check). */
size_t moecal_router_scratch_size(const moecal_model_config *cfg);
void moecal_router_select_scratch(const moecal_model_config *cfg, const float *logits,
                                  const float *bias, int64_t ntok, int32_t *experts,
                                  float *weights, void *scratch);

/* The exact logit precision (route_math.h): double logits, and the score
 * function, bias, group sums and comparisons in double; the same steps and
 * tie rule.  Weights are computed in double and rounded to float. */
moecal_status moecal_router_select_d(const moecal_model_config *cfg, const double *logits,
                                     const float *bias, int64_t ntok, int32_t *experts,
                                     float *weights);
void moecal_router_select_scratch_d(const moecal_model_config *cfg, const double *logits,
                                    const float *bias, int64_t ntok, int32_t *experts,
                                    float *weights, void *scratch);

/* --router-logits: "bf16", "fp32", "exact" -> moecal_logit_prec; "auto" (and
 * anything else) -> -1, the family's default. */
int moecal_router_logits_parse(const char *name);
const char *moecal_router_logits_name(int prec);
/* The precision the model's deployed router computes its logits in: fp32
 * for the DeepSeek families (transformers' DeepseekV3/V2 gates cast to
 * float32; SGLang's and TensorRT-LLM's DeepSeek-V3 router GEMMs write
 * float32), bf16 for Qwen-MoE and Mixtral (a bf16 linear layer in
 * transformers, vLLM and SGLang).  doc/ROUTING.md has the table. */
int moecal_router_logits_default(const moecal_model_config *cfg);

/* MOECAL_OK when cfg describes a router moecal_router_select can run;
 * otherwise MOECAL_ERR_INTERNAL with a message saying which value is bad. */
moecal_status moecal_router_check(const moecal_model_config *cfg);

#ifdef __cplusplus
}
#endif
#endif
