/* synth.h - a synthetic DeepSeek-V3-style checkpoint and its activations.
 *
 * `moecal synth` (and `moecal calibrate` without --model) write into one
 * directory: config.json; model-0000i-of-0000N.safetensors shards holding the
 * routed experts (FP8 e4m3 with float32 128x128 block scales, or BF16) and
 * the router (gate weight BF16 [E, H], e_score_correction_bias F32 [E]) of
 * every MoE layer; model.safetensors.index.json; activations.h5 with the
 * hidden states entering each MoE layer; and synth.json, the parameters with
 * the never-routed experts and the outlier channels.  Attention, dense MLP,
 * shared-expert, embedding and norm weights are not written: moecal reads
 * none of them.
 *
 * Every value comes from a counter-based generator keyed by (seed, layer,
 * expert, projection, row), so the bytes depend on the parameters only,
 * never on the number of threads.  Generation streams (a few expert tensors
 * in memory at a time), runs on all OpenMP threads and overlaps the writes
 * (one writer thread).
 */
#ifndef MOECAL_SYNTH_H
#define MOECAL_SYNTH_H

#include <stdbool.h>
#include <stddef.h>
#include <stdint.h>

#include "dtype.h"
#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

enum {
    MOECAL_SYNTH_QUIET = 0,   /* nothing on stderr */
    MOECAL_SYNTH_LINES = 1,   /* one line per layer */
    MOECAL_SYNTH_BAR = 2,     /* a progress bar, redrawn in place */
    MOECAL_SYNTH_AUTO = 3     /* BAR when stderr is a terminal, else LINES */
};

typedef struct moecal_synth_params {
    char preset[32];        /* "demo", "tiny", "deepseek-v3-layer" (recorded) */
    int layers;             /* num_hidden_layers */
    int first_dense;        /* first_k_dense_replace: MoE layers are [first_dense, layers) */
    int experts;            /* E, n_routed_experts */
    int topk;               /* k, num_experts_per_tok */
    int groups;             /* n_group */
    int topk_groups;        /* topk_group */
    int hidden;             /* H */
    int intermediate;       /* I, moe_intermediate_size */
    int64_t tokens;         /* T */
    uint64_t seed;
    moecal_dtype dtype;     /* expert weights: MOECAL_DT_F8_E4M3 or MOECAL_DT_BF16 */
    moecal_dtype act_dtype; /* MOECAL_DT_BF16, MOECAL_DT_F16 or MOECAL_DT_F32 */
    uint64_t shard_size;    /* tensor bytes per shard (a larger tensor gets its own) */
    int never_routed;       /* experts per MoE layer that can never be chosen */
    int outliers;           /* massive-outlier channels of the activations */
    int progress;           /* MOECAL_SYNTH_QUIET ... MOECAL_SYNTH_AUTO */
} moecal_synth_params;

/* What was written, for the caller's summary. */
typedef struct moecal_synth_result {
    int shards;
    uint64_t weight_bytes;  /* tensor data in the shards */
    uint64_t act_bytes;     /* activation elements */
    double seconds;
} moecal_synth_result;

/* The presets' parameters; MOECAL_ERR_USAGE for an unknown name.  demo: 4
 * layers (3 MoE), E 32, k 4, 4 groups / 2 kept, H 512, I 256, 4096 tokens,
 * 2 never-routed experts, 16 MiB shards; tiny: 2 layers (1 MoE), E 8, k 2,
 * 2 groups / 1 kept, H 160, I 96, 256 tokens, 1 never-routed; deepseek-v3-
 * layer: 4 layers (1 MoE), E 256, k 8, 8 groups / 4 kept, H 7168, I 2048,
 * 32768 tokens, 8 never-routed.  FP8 weights, bf16 activations, seed 1,
 * 4 outlier channels, 4 GiB shards unless said otherwise. */
moecal_status moecal_synth_preset_params(const char *preset, moecal_synth_params *p);
/* Check p (MOECAL_ERR_USAGE naming the option): sizes as config.json readers
 * and the router accept them, and the never-routed experts can never be
 * chosen: every choice of topk_groups groups keeps at least k routable
 * experts. */
moecal_status moecal_synth_check(const moecal_synth_params *p);
/* Write the model directory dir, created (with parents) if missing.  A
 * non-empty dir is MOECAL_ERR_EXISTS unless force; with force, shards and
 * model.safetensors from an earlier model there are removed, other files
 * kept.  Every file is written under a temporary name and renamed when
 * complete; synth.json is written last.  res may be NULL. */
moecal_status moecal_synth_write(const char *dir, const moecal_synth_params *p, bool force,
                                 moecal_synth_result *res);
/* FP8 e4m3 with 128x128 block scales of a finite float weight w[rows x cols]:
 * the same bytes as moecal_fp8_quant_block(w, rows, cols, 128, q, scale_inv)
 * (scale_inv = block max / 448, q = e4m3(w / scale_inv), nearest even), in a
 * form the compiler vectorizes.  NaN or Inf in w are not allowed. */
void moecal_synth_quant_fp8(const float *w, size_t rows, size_t cols, uint8_t *q,
                            float *scale_inv);
/* A preset with its defaults into dir (force, quiet): the demo model of
 * `moecal calibrate` without --model. */
moecal_status moecal_synth_preset(const char *dir, const char *preset);

#ifdef __cplusplus
}
#endif
#endif
