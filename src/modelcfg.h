/* modelcfg.h - what moecal needs from a Hugging Face config.json.
 *
 * Families: DeepSeek-V3 (model_type "deepseek_v3", also "deepseek_v2"/"kimi_k2"
 * style configs with the same keys), Qwen3-MoE ("qwen3_moe", "qwen2_moe") and
 * Mixtral ("mixtral").  No MPI in here (fuzzed alone).
 *
 * DeepSeek gates: topk_method "noaux_tc" (scoring sigmoid, correction bias,
 * groups scored by their top-2), "group_limited_greedy" (softmax, groups
 * scored by their max) or "greedy" (softmax, n_group = topk_group = 1).
 * A JSON null counts as an absent key; unknown keys are ignored.
 */
#ifndef MOECAL_MODELCFG_H
#define MOECAL_MODELCFG_H

#include <stdbool.h>
#include <stddef.h>

#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef enum moecal_family {
    MOECAL_FAMILY_DEEPSEEK_V3 = 1,
    MOECAL_FAMILY_QWEN3_MOE,
    MOECAL_FAMILY_MIXTRAL
} moecal_family;

typedef enum moecal_scoring {
    MOECAL_SCORING_SIGMOID = 1, /* DeepSeek-V3 noaux_tc: sigmoid + bias + group-limited top-k */
    MOECAL_SCORING_SOFTMAX      /* Mixtral, Qwen-MoE: top-k of softmax */
} moecal_scoring;

typedef struct moecal_model_config {
    moecal_family family;
    char model_type[32];
    int hidden_size;            /* H */
    int moe_intermediate_size;  /* I (Mixtral: intermediate_size) */
    int num_hidden_layers;
    int n_routed_experts;       /* E (Qwen: num_experts, Mixtral: num_local_experts) */
    int num_experts_per_tok;    /* k */
    int n_group;                /* 1 when the family has no groups */
    int topk_group;             /* 1 when the family has no groups */
    double routed_scaling_factor; /* 1.0 when absent */
    bool norm_topk_prob;
    moecal_scoring scoring;
    char topk_method[32];       /* "noaux_tc", "greedy", "" */
    bool has_correction_bias;   /* DeepSeek-V3 noaux_tc: gate.e_score_correction_bias */
    int first_k_dense_replace;  /* DeepSeek */
    int moe_layer_freq;         /* DeepSeek, 1 when absent */
    int decoder_sparse_step;    /* Qwen, 1 when absent */
    bool fp8;                   /* quantization_config.quant_method == "fp8" */
    int weight_block[2];        /* quantization_config.weight_block_size, {128,128} */
    int n_moe_layers;
    int *moe_layers;            /* model layer index of each MoE layer, ascending */
} moecal_model_config;

/* Parse config.json text; label names the file in messages.  Every key moecal
 * uses is type- and range-checked (positive sizes, k <= E, E % n_group == 0,
 * topk_group <= n_group, ...). */
moecal_status moecal_model_config_parse(const char *json, size_t len, const char *label,
                                        moecal_model_config *cfg);
moecal_status moecal_model_config_load(const char *path, moecal_model_config *cfg);
void moecal_model_config_free(moecal_model_config *cfg);
const char *moecal_family_name(moecal_family f);

#ifdef __cplusplus
}
#endif
#endif
