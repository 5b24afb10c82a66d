#!/usr/bin/env python3
"""make-hf-model.py - a DeepSeek-V3-shaped checkpoint that transformers loads.

Writes DIR/config.json (DeepSeek-V3's, with --layers decoder layers of which
the first --first-dense are dense), sharded safetensors with every tensor of
the model as the released checkpoint names and stores it (per-expert
gate/up/down projections; linear weights of the decoder layers FP8 e4m3 with
128x128 float32 weight_scale_inv, the router, norms, embedding and head
BF16), random values, a word-level tokenizer and calibration text.  Tensor
names and shapes come from transformers' own DeepseekV3 model built on the
meta device, so the checkpoint is complete for it.  One layer is made at a
time: the memory needed is one layer's.  For `moecal-capture --sequential`
and `moecal calibrate` measurements (bench/run-capture-seq.sh).

  make-hf-model.py DIR [--layers 5] [--first-dense 3] [--experts 256]
                       [--hidden 7168] [--moe-inter 2048] [--seed 1]
"""
import argparse
import json
import os
import sys

import numpy as np


def parse():
    ap = argparse.ArgumentParser(prog="make-hf-model.py")
    ap.add_argument("dir")
    ap.add_argument("--layers", type=int, default=5)
    ap.add_argument("--first-dense", type=int, default=3)
    ap.add_argument("--experts", type=int, default=256)
    ap.add_argument("--hidden", type=int, default=7168)
    ap.add_argument("--moe-inter", type=int, default=2048)
    ap.add_argument("--inter", type=int, default=18432)
    ap.add_argument("--heads", type=int, default=128)
    ap.add_argument("--vocab", type=int, default=129280)
    ap.add_argument("--seed", type=int, default=1)
    return ap.parse_args()


def config(a):
    groups = 8 if a.experts % 8 == 0 and a.experts >= 16 else 1
    return {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "hidden_act": "silu", "hidden_size": a.hidden, "intermediate_size": a.inter,
        "moe_intermediate_size": a.moe_inter, "num_hidden_layers": a.layers,
        "first_k_dense_replace": a.first_dense, "moe_layer_freq": 1,
        "n_routed_experts": a.experts, "n_shared_experts": 1, "num_experts_per_tok": 8,
        "n_group": groups, "topk_group": min(4, groups), "topk_method": "noaux_tc",
        "scoring_func": "sigmoid", "norm_topk_prob": True, "routed_scaling_factor": 2.5,
        "num_attention_heads": a.heads, "num_key_value_heads": a.heads,
        "q_lora_rank": 1536, "kv_lora_rank": 512, "qk_nope_head_dim": 128,
        "qk_rope_head_dim": 64, "v_head_dim": 128, "rope_theta": 10000,
        "max_position_embeddings": 163840, "rms_norm_eps": 1e-6, "vocab_size": a.vocab,
        "tie_word_embeddings": False, "bos_token_id": 1, "eos_token_id": 2,
        "pad_token_id": 0, "num_nextn_predict_layers": 0, "torch_dtype": "bfloat16",
        "quantization_config": {"quant_method": "fp8", "fmt": "e4m3",
                                "activation_scheme": "dynamic",
                                "weight_block_size": [128, 128]},
    }


def checkpoint_params(module_params, prefix, n_experts):
    """(name, shape) as the released checkpoint stores them: fused expert
    parameters of transformers' module split per expert."""
    out = []
    for name, shape in module_params:
        full = prefix + name
        if name.endswith("mlp.experts.gate_up_proj"):
            base = full[: -len("gate_up_proj")]
            inter = shape[1] // 2
            for e in range(n_experts):
                out.append((f"{base}{e}.gate_proj.weight", (inter, shape[2])))
                out.append((f"{base}{e}.up_proj.weight", (inter, shape[2])))
        elif name.endswith("mlp.experts.down_proj"):
            base = full[: -len("down_proj")]
            for e in range(n_experts):
                out.append((f"{base}{e}.down_proj.weight", (shape[1], shape[2])))
        else:
            out.append((full, tuple(shape)))
    return out


def tensors(torch, name, shape, gen, dev):
    """The tensors stored for one parameter (FP8 + scales, or BF16)."""
    if len(shape) == 1:
        if name.endswith("e_score_correction_bias"):
            return {name: (torch.rand(shape, generator=gen, device=dev) * 0.05).float().cpu()}
        return {name: torch.ones(shape, dtype=torch.bfloat16)}
    std = 0.08 if name.endswith("mlp.gate.weight") else 1.0 / np.sqrt(shape[1])
    w = torch.randn(shape, generator=gen, device=dev) * std
    if not name.startswith("model.layers.") or name.endswith("mlp.gate.weight"):
        return {name: w.to(torch.bfloat16).cpu()}
    rows, cols = shape
    nr, nc = -(-rows // 128), -(-cols // 128)
    pad = torch.zeros(nr * 128, nc * 128, device=dev)
    pad[:rows, :cols] = w
    blocks = pad.reshape(nr, 128, nc, 128).abs().amax(dim=(1, 3))
    scale = torch.where(blocks > 0, blocks / 448.0, torch.ones_like(blocks))
    full = scale.repeat_interleave(128, 0)[:rows].repeat_interleave(128, 1)[:, :cols]
    codes = (w / full).to(torch.float8_e4m3fn)
    return {name: codes.cpu(), name + "_scale_inv": scale.float().cpu()}


def main():
    a = parse()
    import torch
    from safetensors.torch import save_file
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    import capture_hf

    os.makedirs(a.dir, exist_ok=True)
    cfg = config(a)
    hf = {k: v for k, v in cfg.items() if k not in ("quantization_config", "architectures")}
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(DeepseekV3Config(**hf))
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(device=dev).manual_seed(a.seed)
    groups = [("model.embed_tokens.", model.model.embed_tokens),
              ("model.norm.", model.model.norm), ("lm_head.", model.lm_head)]
    groups += [(f"model.layers.{i}.", layer) for i, layer in enumerate(model.model.layers)]
    weight_map, total = {}, 0
    for n, (prefix, mod) in enumerate(groups):
        params = [(k, tuple(p.shape)) for k, p in mod.state_dict().items()]
        sd = {}
        for name, shape in checkpoint_params(params, prefix, a.experts):
            sd.update(tensors(torch, name, shape, gen, dev))
        shard = f"model-{n + 1:05d}-of-{len(groups):05d}.safetensors"
        save_file(sd, os.path.join(a.dir, shard), metadata={"format": "pt"})
        size = sum(t.numel() * t.element_size() for t in sd.values())
        total += size
        weight_map.update({k: shard for k in sd})
        print(f"make-hf-model: {shard}: {prefix[:-1]}, {len(sd)} tensors, {size / 1e9:.2f} GB",
              file=sys.stderr, flush=True)
    with open(os.path.join(a.dir, "model.safetensors.index.json"), "w") as fp:
        json.dump({"metadata": {"total_size": total}, "weight_map": weight_map}, fp, indent=1)
    with open(os.path.join(a.dir, "config.json"), "w") as fp:
        json.dump(cfg, fp, indent=2)
    n = capture_hf.write_tokenizer_and_text(a.dir, os.path.join(a.dir, "calib.txt"),
                                           min(a.vocab, 20000))
    print(f"make-hf-model: {a.dir}: {a.layers} layers ({a.layers - a.first_dense} MoE, "
          f"{a.experts} experts), {total / 1e9:.2f} GB; calib.txt of {n} words",
          file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
