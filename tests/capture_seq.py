#!/usr/bin/env python3
"""capture_seq.py - helpers of tests/capture_seq.sh.

  capture_seq.py fp8 SRC FP8_DIR BF16_DIR BLOCK
      from the BF16 checkpoint SRC, a copy whose decoder linear weights are
      FP8 e4m3 with float32 BLOCKxBLOCK scales (weight_scale_inv) and a
      quantization_config, as DeepSeek-V3 is released, and a BF16 copy that
      holds those weights dequantized (float32 product rounded to BF16)
  capture_seq.py same A.h5 B.h5       every /layers/<L>/hidden bit-identical
  capture_seq.py drop DIR NAME        remove tensor NAME from DIR's checkpoint
"""
import json
import os
import shutil
import sys


def fail(msg):
    print(f"capture_seq: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def load(d):
    from safetensors.torch import load_file
    return load_file(os.path.join(d, "model.safetensors"))


def save(d, sd):
    from safetensors.torch import save_file
    save_file(sd, os.path.join(d, "model.safetensors"), metadata={"format": "pt"})


def copy_dir(src, dst):
    if os.path.exists(dst):
        shutil.rmtree(dst)
    shutil.copytree(src, dst)


def quantizable(name, t):
    return (name.startswith("model.layers.") and name.endswith(".weight") and t.dim() == 2
            and not name.endswith("mlp.gate.weight"))


def cmd_fp8(src, fp8_dir, bf16_dir, block):
    import torch
    block = int(block)
    sd = load(src)
    q, deq = {}, {}
    for name, t in sd.items():
        if not quantizable(name, t):
            q[name] = deq[name] = t
            continue
        w = t.to(torch.float32)
        rows, cols = w.shape
        nr, nc = -(-rows // block), -(-cols // block)
        scale = torch.empty(nr, nc, dtype=torch.float32)
        codes = torch.empty(rows, cols, dtype=torch.float8_e4m3fn)
        for i in range(nr):
            for j in range(nc):
                blk = w[i * block:(i + 1) * block, j * block:(j + 1) * block]
                s = float(blk.abs().max()) / 448.0 or 1.0
                scale[i, j] = s
                codes[i * block:(i + 1) * block, j * block:(j + 1) * block] = \
                    (blk / s).to(torch.float8_e4m3fn)
        full = scale.repeat_interleave(block, 0)[:rows].repeat_interleave(block, 1)[:, :cols]
        q[name] = codes
        q[name + "_scale_inv"] = scale
        deq[name] = (codes.to(torch.float32) * full).to(torch.bfloat16)
    for d, state, quant in ((fp8_dir, q, True), (bf16_dir, deq, False)):
        copy_dir(src, d)
        save(d, state)
        if quant:
            path = os.path.join(d, "config.json")
            with open(path, encoding="utf-8") as fp:
                cfg = json.load(fp)
            cfg["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3",
                                          "activation_scheme": "dynamic",
                                          "weight_block_size": [block, block]}
            with open(path, "w", encoding="utf-8") as fp:
                json.dump(cfg, fp, indent=2)
    n = sum(1 for k in q if k.endswith("_scale_inv"))
    print(f"capture_seq: {n} FP8 weights with {block}x{block} scales in {fp8_dir}")
    return 0


def cmd_same(a, b):
    import h5py
    import numpy as np
    with h5py.File(a, "r") as fa, h5py.File(b, "r") as fb:
        la, lb = sorted(fa["layers"].keys()), sorted(fb["layers"].keys())
        if la != lb:
            fail(f"layers {la} in {a}, {lb} in {b}")
        for L in la:
            x, y = fa[f"layers/{L}/hidden"], fb[f"layers/{L}/hidden"]
            if x.shape != y.shape or x.dtype != y.dtype:
                fail(f"layer {L}: {x.shape} {x.dtype} vs {y.shape} {y.dtype}")
            xa = x[...].view(np.uint16 if x.dtype.itemsize == 2 else np.uint32)
            ya = y[...].view(xa.dtype)
            if not np.array_equal(xa, ya):
                bad = int(np.count_nonzero(xa != ya))
                fail(f"layer {L}: {bad} of {xa.size} values differ between {a} and {b}")
            ga, gb = dict(fa[f"layers/{L}"].attrs), dict(fb[f"layers/{L}"].attrs)
            if sorted(ga) != sorted(gb) or any(
                    np.asarray(ga[k]).tobytes() != np.asarray(gb[k]).tobytes() for k in ga):
                fail(f"layer {L}: attributes {ga} in {a}, {gb} in {b}")
        n = fa[f"layers/{la[0]}/hidden"].shape[0]
        print(f"capture_seq: {a} and {b}: {len(la)} layers x {n} tokens, bit for bit")
    return 0


def cmd_drop(d, name):
    sd = load(d)
    if name not in sd:
        fail(f"{d} has no tensor {name}")
    del sd[name]
    save(d, sd)
    return 0


def main():
    cmd, args = sys.argv[1], sys.argv[2:]
    return {"fp8": cmd_fp8, "same": cmd_same, "drop": cmd_drop}[cmd](*args)


if __name__ == "__main__":
    sys.exit(main())
