/* fuzz_config.c - libFuzzer target: config.json parsing (modelcfg.c).
 *
 * Any input must be refused or accepted cleanly; an accepted config must be
 * self-consistent (the invariants the router and the loaders rely on).
 */
#include <stddef.h>
#include <stdint.h>
#include <stdlib.h>

#include "modelcfg.h"

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size);

int LLVMFuzzerTestOneInput(const uint8_t *data, size_t size)
{
    moecal_model_config cfg;

    if (moecal_model_config_parse((const char *)data, size, "config.json", &cfg) != MOECAL_OK)
        return 0;
    int E = cfg.n_routed_experts, L = cfg.num_hidden_layers;
    if (E < 1 || cfg.num_experts_per_tok < 1 || cfg.num_experts_per_tok > E ||
        cfg.n_group < 1 || E % cfg.n_group != 0 || cfg.topk_group < 1 ||
        cfg.topk_group > cfg.n_group || cfg.hidden_size < 1 || cfg.moe_intermediate_size < 1 ||
        cfg.n_moe_layers < 1 || cfg.n_moe_layers > L || cfg.weight_block[0] < 1 ||
        cfg.weight_block[0] != cfg.weight_block[1])
        abort();
    for (int i = 0; i < cfg.n_moe_layers; i++)
        if (cfg.moe_layers[i] < 0 || cfg.moe_layers[i] >= L ||
            (i > 0 && cfg.moe_layers[i] <= cfg.moe_layers[i - 1]))
            abort();
    moecal_model_config_free(&cfg);
    return 0;
}
