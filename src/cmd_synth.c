/* cmd_synth.c - `moecal synth`: write a synthetic DeepSeek-V3-style checkpoint
 * and its activations (see synth.h for what is written and how). */
#include "config.h"

#include <errno.h>
#include <limits.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>

#include "commands.h"
#include "options.h"
#include "runtime.h"
#include "synth.h"


/* What the options say.  Sizes default to the preset's: STRING options whose
 * default is "preset". */
typedef struct synth_args {
    const char *output, *preset, *dtype, *act_dtype, *progress;
    const char *layers, *first_dense, *experts, *topk, *groups, *topk_groups, *hidden;
    const char *intermediate, *tokens, *never_routed, *shard_size;
    long long outliers, seed;
    bool force, quiet;
} synth_args;

#define SYN(field) MOECAL_AT(synth_args, field)

const moecal_optdef moecal_synth_options[] = {
    {"output", 'o', MOECAL_OPT_STRING, NULL, NULL, "DIR",
     "model directory to write (required; created if missing)", MOECAL_OPTF_NOENV, 0, 0,
     SYN(output)},
    {"preset", 'p', MOECAL_OPT_CHOICE, "demo", "demo|tiny|deepseek-v3-layer", "NAME",
     "sizes to start from (see below)", 0, 0, 0, SYN(preset)},
    {"layers", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "num_hidden_layers", 0, 0, 0,
     SYN(layers)},
    {"first-dense", 0, MOECAL_OPT_STRING, "preset", NULL, "N",
     "first_k_dense_replace: layers before it are dense (not written)", 0, 0, 0, SYN(first_dense)},
    {"experts", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "n_routed_experts", 0, 0, 0,
     SYN(experts)},
    {"topk", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "num_experts_per_tok", 0, 0, 0, SYN(topk)},
    {"groups", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "n_group", 0, 0, 0, SYN(groups)},
    {"topk-groups", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "topk_group", 0, 0, 0,
     SYN(topk_groups)},
    {"hidden", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "hidden_size", 0, 0, 0, SYN(hidden)},
    {"intermediate", 0, MOECAL_OPT_STRING, "preset", NULL, "N", "moe_intermediate_size", 0, 0,
     0, SYN(intermediate)},
    {"tokens", 0, MOECAL_OPT_STRING, "preset", NULL, "N",
     "tokens per MoE layer in activations.h5 (k/M suffixes)", 0, 0, 0, SYN(tokens)},
    {"never-routed", 0, MOECAL_OPT_STRING, "preset", NULL, "N",
     "experts per MoE layer that can never be chosen (router bias -4; demo 2, tiny 1, "
     "otherwise experts/32)", 0, 0, 0, SYN(never_routed)},
    {"outliers", 0, MOECAL_OPT_INT, "4", NULL, "N",
     "massive-outlier channels of the activations (50-200x the typical value)", 0, 0, 64,
     SYN(outliers)},
    {"seed", 's', MOECAL_OPT_INT, "1", NULL, "N", "random seed: same options and seed, "
     "same bytes", 0, 0, LLONG_MAX, SYN(seed)},
    {"dtype", 0, MOECAL_OPT_CHOICE, "fp8", "fp8|bf16", "TYPE",
     "expert weights: FP8 e4m3 with float32 128x128 block scales, or BF16", 0, 0, 0, SYN(dtype)},
    {"act-dtype", 0, MOECAL_OPT_CHOICE, "bf16", "bf16|f16|f32", "TYPE",
     "element type of activations.h5", 0, 0, 0, SYN(act_dtype)},
    {"shard-size", 0, MOECAL_OPT_STRING, "preset", NULL, "BYTES",
     "tensor bytes per safetensors shard, k/M/G suffixes (demo 16M, otherwise 4G)", 0, 0, 0,
     SYN(shard_size)},
    {"progress", 0, MOECAL_OPT_CHOICE, "auto", "auto|bar|lines|none", "HOW",
     "progress on stderr (auto: a bar on a terminal, else a line per layer)", 0, 0, 0,
     SYN(progress)},
    {"force", 'f', MOECAL_OPT_FLAG, "0", NULL, NULL,
     "write into a non-empty directory (an earlier model's shards there are removed)",
     MOECAL_OPTF_NOENV, 0, 0, SYN(force)},
    {"quiet", 'q', MOECAL_OPT_FLAG, "0", NULL, NULL, "print nothing but errors", 0, 0, 0,
     SYN(quiet)},
    MOECAL_OPT_END
};

static const char summary[] =
    "Write a synthetic DeepSeek-V3-style model directory: config.json, sharded safetensors\n"
    "(model-0000i-of-0000N.safetensors + model.safetensors.index.json) holding the router\n"
    "(gate.weight BF16 [E,H], gate.e_score_correction_bias F32 [E]) and the routed experts\n"
    "(gate/up/down_proj, FP8 e4m3 + weight_scale_inv, or BF16) of every MoE layer;\n"
    "activations.h5 with the hidden states entering each MoE layer; synth.json with the\n"
    "parameters, the never-routed experts and the outlier channels.\n"
    "Only what moecal reads is written: no attention, dense MLP, shared-expert, embedding\n"
    "or norm weights, so the directory is not a model transformers can load.\n"
    "The data have realistic structure: per-token log-normal scales, heavy tails, a few\n"
    "massive-outlier channels, a Zipf-like skewed router with cold experts and exactly\n"
    "--never-routed experts per layer that no token can reach.\n"
    "\n"
    "Presets (layers/dense, experts, k, groups/kept, hidden, intermediate, tokens):\n"
    "  demo               4/1  32  4  4/2   512   256   4096   (~40 MB)\n"
    "  tiny               2/1   8  2  2/1   160    96    256   (~0.4 MB)\n"
    "  deepseek-v3-layer  4/3 256  8  8/4  7168  2048  32768   (~11 GB FP8 + 0.5 GB)\n"
    "Under mpiexec, rank 0 writes and the other ranks wait.";

/* A size option (--name) given as text s: "preset" keeps *val; else an
 * integer with an optional k/M/G/T suffix (x1024) in [lo, hi]. */
static moecal_status size_opt(const moecal_opts *o, const char *name, const char *s,
                              long long lo, long long hi, long long *val)
{
    char *end;
    long long v, mul = 1;

    if (!s || strcmp(s, "preset") == 0)
        return MOECAL_OK;
    errno = 0;
    v = strtoll(s, &end, 10);
    if (end != s && *end) {
        switch (*end) {
        case 'k': case 'K': mul = 1LL << 10; end++; break;
        case 'm': case 'M': mul = 1LL << 20; end++; break;
        case 'g': case 'G': mul = 1LL << 30; end++; break;
        case 't': case 'T': mul = 1LL << 40; end++; break;
        default: break;
        }
        if (*end == 'i' || *end == 'B') /* "4GiB", "4GB" read as 4 GiB */
            end += *end == 'i' && end[1] == 'B' ? 2 : 1;
    }
    if (end == s || *end || errno == ERANGE || __builtin_mul_overflow(v, mul, &v) || v < lo ||
        v > hi)
        return moecal_error_set(MOECAL_ERR_USAGE, "--%s %s (from %s): expected an integer from "
                                "%lld to %lld, or 'preset'", name, s,
                                moecal_opts_source(o, name), lo, hi);
    *val = v;
    return MOECAL_OK;
}

static moecal_status int_opt(const moecal_opts *o, const char *name, const char *s, long long lo,
                             long long hi, int *field)
{
    long long v = *field;
    MOECAL_TRY(size_opt(o, name, s, lo, hi, &v));
    *field = (int)v;
    return MOECAL_OK;
}

static moecal_status params_from(const moecal_opts *o, const synth_args *a,
                                 moecal_synth_params *p)
{
    const char *dt = a->act_dtype, *pr = a->progress;
    long long v;

    MOECAL_TRY(moecal_synth_preset_params(a->preset, p));
    MOECAL_TRY(int_opt(o, "layers", a->layers, 1, 100000, &p->layers));
    MOECAL_TRY(int_opt(o, "first-dense", a->first_dense, 0, 100000, &p->first_dense));
    MOECAL_TRY(int_opt(o, "experts", a->experts, 1, 65536, &p->experts));
    MOECAL_TRY(int_opt(o, "topk", a->topk, 1, 65536, &p->topk));
    MOECAL_TRY(int_opt(o, "groups", a->groups, 1, 65536, &p->groups));
    MOECAL_TRY(int_opt(o, "topk-groups", a->topk_groups, 1, 65536, &p->topk_groups));
    MOECAL_TRY(int_opt(o, "hidden", a->hidden, 1, 1 << 20, &p->hidden));
    MOECAL_TRY(int_opt(o, "intermediate", a->intermediate, 1, 1 << 20, &p->intermediate));
    v = p->tokens;
    MOECAL_TRY(size_opt(o, "tokens", a->tokens, 1, 1LL << 40, &v));
    p->tokens = v;
    /* the default follows --experts when only that was changed */
    if (strcmp(a->never_routed, "preset") == 0 && strcmp(a->experts, "preset") != 0)
        p->never_routed = p->experts / 32;
    MOECAL_TRY(int_opt(o, "never-routed", a->never_routed, 0, 65535, &p->never_routed));
    v = (long long)p->shard_size;
    MOECAL_TRY(size_opt(o, "shard-size", a->shard_size, 1, 1LL << 50, &v));
    p->shard_size = (uint64_t)v;
    p->outliers = (int)a->outliers;
    p->seed = (uint64_t)a->seed;
    p->dtype = strcmp(a->dtype, "bf16") == 0 ? MOECAL_DT_BF16 : MOECAL_DT_F8_E4M3;
    p->act_dtype = strcmp(dt, "f32") == 0 ? MOECAL_DT_F32 :
                   strcmp(dt, "f16") == 0 ? MOECAL_DT_F16 : MOECAL_DT_BF16;
    p->progress = strcmp(pr, "bar") == 0 ? MOECAL_SYNTH_BAR :
                  strcmp(pr, "lines") == 0 ? MOECAL_SYNTH_LINES :
                  strcmp(pr, "none") == 0 ? MOECAL_SYNTH_QUIET : MOECAL_SYNTH_AUTO;
    if (a->quiet)
        p->progress = MOECAL_SYNTH_QUIET;
    return moecal_synth_check(p);
}

int moecal_cmd_synth(int argc, char **argv)
{
    moecal_opts *o = NULL;
    synth_args a;
    moecal_synth_params p;
    moecal_synth_result r = {0};
    moecal_status s;
    const char *out;

    o = moecal_cmd_begin("synth", moecal_synth_options, NULL, summary, 0, NULL, &a, argc, argv);
    if (!o)
        return 0;
    out = a.output;
    if (!out || !*out) {
        moecal_error_set(MOECAL_ERR_USAGE, "moecal synth needs -o DIR, the model directory to "
                         "write");
        moecal_fatal_all(MOECAL_ERR_USAGE);
    }
    if ((s = params_from(o, &a, &p)) != MOECAL_OK)
        moecal_fatal_all(s);
    /* One writer: rank 0 writes; the others wait for its status. */
    if (moecal_world_rank() == 0)
        s = moecal_synth_write(out, &p, a.force, &r);
    moecal_check_all(s);
    if (moecal_world_rank() == 0 && !a.quiet) {
        double mb = (double)(r.weight_bytes + r.act_bytes) / 1e6;
        printf("moecal synth: wrote %s (preset %s, seed %llu): %d MoE layer(s) x %d experts, "
               "H %d, I %d, %s weights in %d shard(s), %lld tokens of %s activations; "
               "%.1f MB in %.2f s (%.0f MB/s)\n", out, p.preset, (unsigned long long)p.seed,
               p.layers - p.first_dense, p.experts, p.hidden, p.intermediate,
               p.dtype == MOECAL_DT_BF16 ? "BF16" : "FP8", r.shards, (long long)p.tokens,
               a.act_dtype, mb, r.seconds,
               r.seconds > 0 ? mb / r.seconds : 0.0);
    }
    moecal_opts_free(o);
    return 0;
}
