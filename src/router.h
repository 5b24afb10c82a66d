/* router.h - the models' own expert selection, on the CPU, float32.
 *
 * DeepSeek-V3 (sigmoid, noaux_tc): s = sigmoid(logits); s' = s + bias; group
 * score = sum of the two largest s' in each of n_group groups; keep the
 * topk_group best groups; top-k experts by s' among them.
 * Softmax family: top-k of softmax(logits).
 * Ties break toward the lower expert index (as a stable sort does).
 */
#ifndef MOECAL_ROUTER_H
#define MOECAL_ROUTER_H

#include <stdint.h>

#include "modelcfg.h"

#ifdef __cplusplus
extern "C" {
#endif

/* logits: [ntok][E] float32 (x Wg^T).  Writes the k selected expert indices
 * per token, ascending by expert index, into experts[ntok][k]; weights
 * (may be NULL) receives the routing weights in the same order. */
void moecal_router_select(const moecal_model_config *cfg, const float *logits,
                          const float *bias, int64_t ntok, int32_t *experts,
                          float *weights);

#ifdef __cplusplus
}
#endif
#endif
