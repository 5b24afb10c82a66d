/* cmd_synth.c - `moecal synth`: write a synthetic checkpoint and activations. */
#include "config.h"

#include <stdio.h>
#include <string.h>

#include "calibrate_opts.h"
#include "commands.h"
#include "runtime.h"
#include "synth.h"

static const moecal_optdef defs[] = {
    {"output", 'o', MOECAL_OPT_STRING, NULL, NULL, "DIR", "directory to write (required)", 0, 0, 0},
    {"preset", 'p', MOECAL_OPT_CHOICE, "demo", "demo|tiny|deepseek-v3-layer", "NAME",
     "sizes to start from: demo (3 MoE layers, 32 experts, H 512), tiny (1 MoE layer, 8 "
     "experts, H 160), deepseek-v3-layer (1 MoE layer, 256 experts, H 7168, I 2048)", 0, 0, 0},
    {"seed", 's', MOECAL_OPT_INT, "1", NULL, "N", "random seed (same seed, same bytes)", 0, 0,
     1LL << 62},
    {"layers", 0, MOECAL_OPT_INT, NULL, NULL, "N", "num_hidden_layers (preset's if unset)", 0, 1, 4096},
    {"first-dense", 0, MOECAL_OPT_INT, NULL, NULL, "N", "first_k_dense_replace", 0, 0, 4096},
    {"experts", 0, MOECAL_OPT_INT, NULL, NULL, "N", "n_routed_experts", 0, 1, 65536},
    {"topk", 0, MOECAL_OPT_INT, NULL, NULL, "N", "num_experts_per_tok", 0, 1, 65536},
    {"groups", 0, MOECAL_OPT_INT, NULL, NULL, "N", "n_group", 0, 1, 65536},
    {"topk-groups", 0, MOECAL_OPT_INT, NULL, NULL, "N", "topk_group", 0, 1, 65536},
    {"hidden", 0, MOECAL_OPT_INT, NULL, NULL, "N", "hidden_size", 0, 1, 1 << 20},
    {"intermediate", 0, MOECAL_OPT_INT, NULL, NULL, "N", "moe_intermediate_size", 0, 1, 1 << 20},
    {"tokens", 0, MOECAL_OPT_INT, NULL, NULL, "N", "tokens in the activation file", 0, 1, 1LL << 40},
    {"never-routed", 0, MOECAL_OPT_INT, NULL, NULL, "N",
     "experts per layer that can never be chosen (demo 2, tiny 1, deepseek-v3-layer 8)", 0, 0, 65536},
    {"outliers", 0, MOECAL_OPT_INT, NULL, NULL, "N", "massive-outlier channels (4; tiny 2)", 0, 0, 1 << 20},
    {"dtype", 0, MOECAL_OPT_CHOICE, "fp8", "fp8|bf16", "TYPE",
     "expert weights: FP8 e4m3 with 128x128 block scales, or BF16", 0, 0, 0},
    {"act-dtype", 0, MOECAL_OPT_CHOICE, "bf16", "bf16|f16|f32", "TYPE", "activation element type", 0, 0, 0},
    {"shard-size", 0, MOECAL_OPT_INT, NULL, NULL, "BYTES",
     "bytes per safetensors shard, k/M/G suffixes (demo 16M, others 4G)", 0, 1, 1LL << 50},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL, "write into a non-empty directory", 0, 0, 0},
    {"quiet", 0, MOECAL_OPT_FLAG, "0", NULL, NULL, "no progress lines", 0, 0, 0},
    MOECAL_OPT_END
};

static const char summary[] =
    "Write a synthetic DeepSeek-V3-style model directory (config.json, sharded safetensors\n"
    "with the MoE layers' router and expert tensors only: no attention or dense weights)\n"
    "and activations.h5 with the hidden states entering every MoE layer.";

int moecal_cmd_synth(int argc, char **argv)
{
    moecal_opts *o = NULL;
    moecal_synth_params p;
    moecal_status s;
    const char *dt;

    s = moecal_opts_parse("synth", defs, NULL, argc, argv, &o);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    if (moecal_opts_help(o)) {
        if (moecal_world_rank() == 0)
            moecal_opts_usage("synth", defs, NULL, summary, stdout);
        moecal_opts_free(o);
        return 0;
    }
    if (moecal_opts_print_config(o)) {
        if (moecal_world_rank() == 0)
            moecal_opts_dump(o, stdout);
        moecal_opts_free(o);
        return 0;
    }
    if (!moecal_opts_str(o, "output")) {
        moecal_error_set(MOECAL_ERR_USAGE, "moecal synth needs -o DIR");
        moecal_fatal_all(MOECAL_ERR_USAGE);
    }
    s = moecal_synth_preset_params(moecal_opts_str(o, "preset"), &p);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
#define OVERRIDE(opt, field) if (moecal_opts_isset(o, opt)) p.field = (int)moecal_opts_int(o, opt)
    OVERRIDE("layers", num_layers);
    OVERRIDE("first-dense", first_dense);
    OVERRIDE("experts", experts);
    OVERRIDE("topk", topk);
    OVERRIDE("groups", n_group);
    OVERRIDE("topk-groups", topk_group);
    OVERRIDE("hidden", hidden);
    OVERRIDE("intermediate", intermediate);
    OVERRIDE("never-routed", never_routed);
    OVERRIDE("outliers", outliers);
#undef OVERRIDE
    if (moecal_opts_isset(o, "tokens"))
        p.tokens = moecal_opts_int(o, "tokens");
    if (moecal_opts_isset(o, "shard-size"))
        p.shard_size = (uint64_t)moecal_opts_int(o, "shard-size");
    p.seed = (uint64_t)moecal_opts_int(o, "seed");
    p.fp8 = strcmp(moecal_opts_str(o, "dtype"), "fp8") == 0;
    dt = moecal_opts_str(o, "act-dtype");
    p.act_dtype = strcmp(dt, "f32") == 0 ? MOECAL_DT_F32 :
                  strcmp(dt, "f16") == 0 ? MOECAL_DT_F16 : MOECAL_DT_BF16;
    s = moecal_synth_check(&p);
    if (s != MOECAL_OK)
        moecal_fatal_all(s);
    /* One writer: rank 0 writes, the others wait. */
    if (moecal_world_rank() == 0)
        s = moecal_synth_write(moecal_opts_str(o, "output"), &p, moecal_opts_flag(o, "force"),
                               !moecal_opts_flag(o, "quiet"));
    moecal_check_all(s);
    if (moecal_world_rank() == 0 && !moecal_opts_flag(o, "quiet"))
        printf("moecal synth: wrote %s (%s preset, seed %llu): %d MoE layers x %d experts, "
               "H %d, I %d, %lld tokens\n", moecal_opts_str(o, "output"), p.preset,
               (unsigned long long)p.seed, p.num_layers - p.first_dense, p.experts, p.hidden,
               p.intermediate, (long long)p.tokens);
    moecal_opts_free(o);
    return 0;
}
