/* export.h - `moecal export`: an NVFP4 checkpoint ("modelopt" format) from a
 * Hugging Face checkpoint and the amax file `moecal calibrate` wrote for it.
 *
 * Every routed expert projection of every MoE layer becomes NVFP4 (nvfp4.h):
 * weight U8 [N, K/2], weight_scale F8_E4M3 [N, K/16], weight_scale_2 F32 []
 * (gate and up share the larger of their weight amax), input_scale F32 []
 * (from the final input amax).  The source weight is dequantized exactly as
 * calibrate dequantized it, and its amax must equal the amax file's, which
 * proves the checkpoint is the one calibrated.  Other FP8 weights become
 * BF16 (their block scales applied, rounded to nearest even); every other
 * tensor is copied unchanged; weight_scale_inv tensors are dropped.  Shards
 * keep their names; the index lists every key; config.json loses its
 * quantization_config; hf_quant_config.json names every linear left
 * unquantized; the other files at the top of the source are copied.
 *
 * Ranks take whole shard files (shard i on rank i mod size); within a rank,
 * --threads workers take one tensor (or a 16 MiB piece of a copied one) at a
 * time, so reads, quantization and writes overlap and memory holds only the
 * tensors in hand.  The GPU quantizes when there is one (nvfp4_cuda.h), with
 * the CPU's arithmetic (nvfp4_math.h): the output is the same bytes for any
 * rank count, thread count and backend.  Everything is written into
 * DST.moecal-tmp and renamed to DST when every rank succeeded.
 */
#ifndef MOECAL_EXPORT_H
#define MOECAL_EXPORT_H

#include <stdbool.h>

#include "comm.h"
#include "error.h"

typedef struct moecal_export_params {
    const char *model_dir;
    const char *amax_path;
    const char *output;
    bool force;
    int threads;              /* workers per rank, 0 = OpenMP's default */
    const char *backend;      /* "cpu", "cuda" or "auto" (NULL: auto) */
} moecal_export_params;

/* Collective over c->world; every rank returns the same outcome (a failed
 * rank its error, the others MOECAL_ERR_PEER). */
moecal_status moecal_export_run(const moecal_comm *c, const moecal_export_params *p);

struct moecal_model;
/* What identifies a checkpoint's tensors, as 16 hex digits: FNV-1a of
 * config.json and of every shard's name and safetensors header (names,
 * dtypes, shapes, offsets).  calibrate records it; export compares. */
moecal_status moecal_checkpoint_fingerprint(struct moecal_model *m, char hex[17]);

#endif
