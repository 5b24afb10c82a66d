/* model.h - a Hugging Face MoE checkpoint directory.
 *
 * config.json plus either model.safetensors.index.json and its shards or one
 * model.safetensors (which wins when both exist, as in transformers).  Shard
 * names are plain basenames inside the directory.  Opening checks that every
 * shard exists and that every expert and router tensor the config implies is
 * listed.  Shards are opened lazily and only the tensors asked for are read,
 * so a rank touches only its own experts of the current layer.  Loads may run
 * concurrently from several threads on one model.  `layer` arguments are
 * model layer indices and must be MoE layers.
 */
#ifndef MOECAL_MODEL_H
#define MOECAL_MODEL_H

#include <stdint.h>

#include "error.h"
#include "modelcfg.h"
#include "safetensors.h"

#ifdef __cplusplus
extern "C" {
#endif

/* Projections, always in this order. */
enum { MOECAL_W1 = 0, MOECAL_W2 = 1, MOECAL_W3 = 2, MOECAL_NPROJ = 3 };
extern const char *const moecal_proj_name[MOECAL_NPROJ];   /* "w1","w2","w3" */

typedef struct moecal_model moecal_model;

moecal_status moecal_model_open(const char *dir, moecal_model **out);
void moecal_model_close(moecal_model *m);
const moecal_model_config *moecal_model_cfg(const moecal_model *m);
const char *moecal_model_dir(const moecal_model *m);

/* Tensor name of an expert projection's weight in this family, e.g.
 * "model.layers.3.mlp.experts.17.gate_proj.weight". */
void moecal_model_expert_name(const moecal_model *m, int layer, int expert, int proj,
                              char *buf, size_t len);
/* Model-Optimizer style module prefix, "model.layers.3.mlp.experts.17.gate_proj". */
void moecal_model_expert_module(const moecal_model *m, int layer, int expert, int proj,
                                char *buf, size_t len);

/* The shard files: model.safetensors alone, or those the index lists, in
 * ascending name order; moecal_model_has_index tells which. */
size_t moecal_model_shard_count(const moecal_model *m);
const char *moecal_model_shard_name(const moecal_model *m, size_t i);  /* basename */
moecal_status moecal_model_shard_open(moecal_model *m, size_t i, const moecal_st_file **out);
int moecal_model_has_index(const moecal_model *m);

/* Find a tensor by name (opens its shard on first use). */
moecal_status moecal_model_find(moecal_model *m, const char *name,
                                const moecal_st_file **file, const moecal_st_tensor **t);

/* Load one expert projection as bf16, dequantizing FP8 with its
 * weight_scale_inv (F16/F32 are rounded to bf16, RNE).  w1/w3 have shape
 * [I, H], w2 [H, I]; shapes and dtypes are checked against the config.  dst
 * holds rows*cols bf16 values.  *amax (may be NULL) receives max |W| (a bf16
 * value).  A weight holding NaN or Inf is refused (MOECAL_ERR_NONFINITE). */
moecal_status moecal_model_load_expert(moecal_model *m, int layer, int expert, int proj,
                                       uint16_t *dst, float *amax);
/* The same projection stored as F8_E4M3, kept raw: q [rows*cols] codes and
 * scale_inv [ceil(rows/B)][ceil(cols/B)] (B = quantization block), with every
 * check of moecal_model_load_expert (NaN codes and bad scales refused) and
 * the same *amax.  MOECAL_ERR_UNSUPPORTED when the tensor is another dtype. */
moecal_status moecal_model_load_expert_fp8(moecal_model *m, int layer, int expert, int proj,
                                           uint8_t *q, float *scale_inv, float *amax);
/* The projection's stored bytes, unconverted, for a caller that dequantizes
 * and checks the values itself (the GPU quantizer of export): shape, dtype
 * and block scales are checked as by moecal_model_load_expert.  *dtype
 * receives the tensor's dtype; for F8_E4M3, q [rows*cols] codes and
 * scale_inv as for moecal_model_load_expert_fp8; for BF16, rows*cols values
 * in q; for F16 and F32 nothing is read (the caller converts with
 * moecal_model_load_expert).  Neither NaN nor amax is looked at. */
moecal_status moecal_model_read_expert_raw(moecal_model *m, int layer, int expert, int proj,
                                           void *q, float *scale_inv, moecal_dtype *dtype);
/* Only *amax of moecal_model_load_expert, with its checks: for F8_E4M3 from
 * the codes and block scales, without dequantizing. */
moecal_status moecal_model_expert_amax(moecal_model *m, int layer, int expert, int proj,
                                       float *amax);
/* The stored bytes a layer's calibration reads on a rank: the router
 * (weight and correction bias) and, for experts [e0, e1), their three
 * projections with their block scales when FP8.  From the safetensors
 * headers only: nothing is read. */
moecal_status moecal_model_layer_bytes(moecal_model *m, int layer, int e0, int e1,
                                       uint64_t *router, uint64_t *experts);

/* Router weight [E, H] as float32 (from F8_E4M3, BF16, F16 or F32), and
 * e_score_correction_bias [E] (F32, BF16 or F16; bias may be NULL; it must be
 * non-NULL exactly when cfg->has_correction_bias).  NaN/Inf are refused. */
moecal_status moecal_model_load_gate(moecal_model *m, int layer, float *weight, float *bias);

#ifdef __cplusplus
}
#endif
#endif
