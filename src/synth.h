/* synth.h - a synthetic DeepSeek-V3-style checkpoint and its activations. */
#ifndef MOECAL_SYNTH_H
#define MOECAL_SYNTH_H

#include <stdint.h>

#include "dtype.h"
#include "error.h"

#ifdef __cplusplus
extern "C" {
#endif

typedef struct moecal_synth_params {
    char preset[32];
    int num_layers, first_dense;
    int experts, topk, n_group, topk_group;
    int hidden, intermediate;
    int64_t tokens;
    uint64_t seed;
    int fp8;
    moecal_dtype act_dtype;
    uint64_t shard_size;
    int never_routed, outliers;
} moecal_synth_params;

moecal_status moecal_synth_preset_params(const char *preset, moecal_synth_params *p);
moecal_status moecal_synth_check(const moecal_synth_params *p);
moecal_status moecal_synth_write(const char *dir, const moecal_synth_params *p, int force,
                                 int progress);
/* Write the named preset's model and activations into dir. */
moecal_status moecal_synth_preset(const char *dir, const char *preset);

#ifdef __cplusplus
}
#endif
#endif
