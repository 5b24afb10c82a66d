#!/usr/bin/python3
"""export_ref.py - independent check of `moecal export` (numpy only).

  export_ref.py SRC_DIR AMAX.h5 DST_DIR
  export_ref.py augment SRC_DIR     (adds non-expert tensors to a synth model)

Quantizes every routed expert of SRC_DIR to NVFP4 from AMAX.h5 with numpy,
following Model-Optimizer's arithmetic in float32 (weight_scale_2 = amax *
fl32(1/2688); per block of 16: scale = e4m3(clamp(bamax / (6 * s2), 2^-9,
448)), 1.0 for a zero block; q = W / (scale * s2) rounded to E2M1 with ties
to the even code), and checks that DST_DIR holds the same bytes.  Also:

  - every other source tensor is in DST_DIR unchanged, FP8 weights with
    block scales dequantized to BF16, weight_scale_inv tensors dropped;
  - the dequantized export is within half a grid step of each source weight;
  - the index lists every tensor of every shard; config.json has no
    quantization_config; hf_quant_config.json names NVFP4, group 16, and
    every 2-D weight left unquantized (embeddings aside);
  - gate and up share weight_scale_2; their input_scale are equal.

Shares no code with moecal: it parses safetensors and decodes FP8 itself
(reference.py's readers).
"""
import json
import os
import sys

import numpy as np

sys.dont_write_bytecode = True
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import reference as ref  # noqa: E402

try:
    import h5py
except ImportError:
    sys.exit(77)

INV2688 = np.frombuffer(np.uint32(0x39C30C31).tobytes(), np.float32)[0]
GRID = np.array([0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0], np.float32)


def fail(msg):
    print(f"export_ref: FAIL: {msg}", file=sys.stderr)
    sys.exit(1)


def e4m3_encode(v):
    """float32 >= 0 (at most 448) -> E4M3 code, round to nearest even, by
    searching the table of the 127 non-negative finite values."""
    vals = ref.E4M3[:127].astype(np.float64)        # codes 0..126, ascending
    v = np.asarray(v, np.float64)
    i = np.clip(np.searchsorted(vals, v), 1, 126)
    lo, hi = vals[i - 1], vals[i]
    pick_hi = (v - lo > hi - v) | ((v - lo == hi - v) & (i % 2 == 0))
    code = np.where(pick_hi, i, i - 1)
    return np.where(v <= 0, 0, code).astype(np.uint8)


def e2m1_encode(q):
    """float32 -> E2M1 code: nearest grid value, ties to the even code,
    saturating at 6; the sign bit from q < 0."""
    a = np.abs(q).astype(np.float64)
    d = np.abs(a[..., None] - GRID.astype(np.float64))
    best = d.min(axis=-1, keepdims=True)
    tie_even = np.where(d == best, np.arange(8) % 2 == 0, False)
    idx = np.where(tie_even.any(axis=-1), np.argmax(tie_even, axis=-1), np.argmin(d, axis=-1))
    return (idx | np.where(q < 0, 8, 0)).astype(np.uint8)


def quantize(w, wamax):
    """w float32 [N, K] (bf16 values), wamax float32 -> (packed, scales, s2)."""
    N, K = w.shape
    s2 = np.float32(np.float32(wamax) * INV2688)
    blk = w.reshape(N, K // 16, 16)
    bamax = np.abs(blk).max(axis=-1).astype(np.float32)
    den = np.float32(np.float32(6.0) * s2)
    pbs = (bamax / den).astype(np.float32)
    pbs = np.where(pbs == 0, np.float32(1.0), pbs)
    pbs = np.clip(pbs, np.float32(2.0 ** -9), np.float32(448.0)).astype(np.float32)
    sc = e4m3_encode(pbs)
    d = (ref.E4M3[sc].astype(np.float32) * s2).astype(np.float32)
    q = (blk / d[..., None]).astype(np.float32)
    codes = e2m1_encode(q).reshape(N, K)
    packed = (codes[:, 0::2] | (codes[:, 1::2] << 4)).astype(np.uint8)
    return packed, sc, s2


def raw_bytes(st, name):
    info = st.header[name]
    b0, b1 = info["data_offsets"]
    with open(st.path, "rb") as f:
        f.seek(st.base + b0)
        return f.read(b1 - b0)


def write_safetensors(path, tensors):
    """tensors: [(name, dtype name, shape, bytes)] -> a safetensors file."""
    header, off, blobs = {}, 0, []
    for name, dt, shape, data in tensors:
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [off, off + len(data)]}
        off += len(data)
        blobs.append(data)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    with open(path, "wb") as f:
        f.write(len(text).to_bytes(8, "little") + text)
        for b in blobs:
            f.write(b)


def augment(src):
    """Add to an FP8 checkpoint made by `moecal synth` what a real one has
    around its experts, in a fourth shard: embeddings, lm_head and a norm
    (BF16), an FP8 attention weight with partial 128x128 scale blocks, a BF16
    o_proj, and an FP8 expert and a BF16 projection of an extra layer past
    num_hidden_layers (DeepSeek's MTP layer)."""
    rng = np.random.default_rng(5)
    with open(os.path.join(src, "config.json")) as f:
        cfg = json.load(f)
    H, I, nl = cfg["hidden_size"], cfg["moe_intermediate_size"], cfg["num_hidden_layers"]

    def bf16(shape):
        x = rng.standard_normal(shape).astype(np.float32) * 0.05
        return (ref.round_bf16(x).view(np.uint32) >> 16).astype("<u2").tobytes()

    def fp8(rows, cols):
        codes = rng.integers(0, 0x7E, size=(rows, cols), dtype=np.uint8)
        codes |= rng.integers(0, 2, size=(rows, cols), dtype=np.uint8) << 7
        sc = (2.0 ** rng.integers(-12, -6, size=(-(-rows // 128), -(-cols // 128))))
        return codes.tobytes(), sc.astype("<f4").tobytes(), sc.shape

    t = [("model.embed_tokens.weight", "BF16", (64, H), bf16((64, H))),
         ("lm_head.weight", "BF16", (64, H), bf16((64, H))),
         ("model.norm.weight", "BF16", (H,), bf16((H,)))]
    q, s, ss = fp8(130, H)
    t += [("model.layers.1.self_attn.q_a_proj.weight", "F8_E4M3", (130, H), q),
          ("model.layers.1.self_attn.q_a_proj.weight_scale_inv", "F32", ss, s),
          ("model.layers.1.self_attn.o_proj.weight", "BF16", (H, 96), bf16((H, 96)))]
    q, s, ss = fp8(I, H)
    t += [(f"model.layers.{nl}.mlp.experts.0.gate_proj.weight", "F8_E4M3", (I, H), q),
          (f"model.layers.{nl}.mlp.experts.0.gate_proj.weight_scale_inv", "F32", ss, s),
          (f"model.layers.{nl}.eh_proj.weight", "BF16", (H, 2 * H), bf16((H, 2 * H)))]
    shard = "model-extra.safetensors"
    write_safetensors(os.path.join(src, shard), t)
    ipath = os.path.join(src, "model.safetensors.index.json")
    with open(ipath) as f:
        idx = json.load(f)
    for name, *_ in t:
        idx["weight_map"][name] = shard
    with open(ipath, "w") as f:
        json.dump(idx, f, indent=2)
    with open(os.path.join(src, "tokenizer_config.json"), "w") as f:
        json.dump({"model_max_length": 4096}, f)
    print(f"export_ref: added {len(t)} tensors in {shard} to {src}")


def main():
    if len(sys.argv) == 3 and sys.argv[1] == "augment":
        augment(sys.argv[2])
        return
    if len(sys.argv) != 4:
        sys.exit(__doc__.split("\n\n")[1])
    src, amax_path, dst = sys.argv[1:]
    ck = ref.Checkpoint(src)
    fam = ref.Family(ck.cfg)
    with h5py.File(amax_path, "r") as f:
        layers = [int(x) for x in f["layers"][...]]
        wam = f["weight_amax"][...]
        iam = f["input_amax"][...]

    # the output shards, all of them
    out = {}
    for fn in sorted(os.listdir(dst)):
        if fn.endswith(".safetensors"):
            st = ref.SafeTensors(os.path.join(dst, fn))
            for k in st.header:
                out[k] = (st, fn)
    src_names = set(ck.where)
    experts = {}
    for li, L in enumerate(layers):
        for e in range(fam.E):
            for p in range(3):
                experts[fam.expert_name(L, e, p)] = (li, e, p)

    nq = nbf = ncopy = 0
    worst = 0.0
    for name in sorted(src_names):
        if name.endswith("_scale_inv") and name[:-10] in src_names:
            if name in out:
                fail(f"{name} should have been dropped")
            continue
        w_raw, dt = ck.raw(name)
        if name in experts:
            li, e, p = experts[name]
            mod = name[: -len(".weight")]
            w = ck.weight_bf16(name)
            wa = wam[li, e, p] if p == 1 else max(wam[li, e, 0], wam[li, e, 2])
            if np.float32(np.abs(w).max()) != np.float32(wam[li, e, p]):
                fail(f"{name}: amax {np.abs(w).max()} but the amax file says {wam[li, e, p]}")
            packed, sc, s2 = quantize(w, wa)
            for suffix, want, dtype in ((".weight", packed.tobytes(), "U8"),
                                        (".weight_scale", sc.tobytes(), "F8_E4M3"),
                                        (".weight_scale_2", np.float32(s2).tobytes(), "F32"),
                                        (".input_scale",
                                         np.float32(np.float32(iam[li, e, p]) * INV2688)
                                         .tobytes(), "F32")):
                key = mod + suffix
                if key not in out:
                    fail(f"{key} missing from {dst}")
                st, fn = out[key]
                if st.header[key]["dtype"] != dtype:
                    fail(f"{key}: dtype {st.header[key]['dtype']}, want {dtype}")
                got = raw_bytes(st, key)
                if got != want:
                    a = np.frombuffer(got, np.uint8)
                    b = np.frombuffer(want, np.uint8)
                    i = int(np.argmax(a != b)) if a.size == b.size else -1
                    fail(f"{key}: bytes differ from the numpy reference (first at {i})")
                if fn != ck.where[name]:
                    fail(f"{key} is in {fn}, its source weight in {ck.where[name]}")
            # dequantized within half a step of the grid at each element
            N, K = w.shape
            codes = np.empty((N, K), np.uint8)
            codes[:, 0::2] = packed & 15
            codes[:, 1::2] = packed >> 4
            mag = GRID[codes & 7] * np.where(codes & 8, -1.0, 1.0)
            d = np.repeat(ref.E4M3[sc].astype(np.float64) * np.float64(s2), 16, axis=1)
            deq = mag * d
            qa = np.abs(w) / d
            step = np.where(qa < 2, 0.5, np.where(qa < 4, 1.0, 2.0))
            ok = (np.abs(w - deq) <= 0.5 * step * d * (1 + 1e-6)) | (qa > 6)
            if not ok.all():
                fail(f"{name}: dequantized export off by more than half a step")
            worst = max(worst, float((np.abs(w - deq) / (step * d)).max()))
            nq += 1
            continue
        if name not in out:
            fail(f"{name} missing from {dst}")
        st, fn = out[name]
        if dt == "F8_E4M3" and name + "_scale_inv" in src_names:
            want = ck.weight_bf16(name)
            got, gdt = ref.SafeTensors(st.path).read(name), st.header[name]["dtype"]
            if gdt != "BF16" or not np.array_equal(got, want):
                fail(f"{name}: not the BF16 dequantization of the FP8 source")
            nbf += 1
        else:
            s0 = ref.SafeTensors(os.path.join(src, ck.where[name]))
            if raw_bytes(st, name) != raw_bytes(s0, name) or \
                    st.header[name]["dtype"] != s0.header[name]["dtype"]:
                fail(f"{name}: not copied unchanged")
            ncopy += 1
    want_keys = set(out)
    if os.path.exists(os.path.join(dst, "model.safetensors.index.json")):
        with open(os.path.join(dst, "model.safetensors.index.json")) as f:
            idx = json.load(f)
        if set(idx["weight_map"]) != want_keys:
            fail("the index does not list exactly the tensors of the shards")
        for k, fn in idx["weight_map"].items():
            if out[k][1] != fn:
                fail(f"index: {k} in {fn}, found in {out[k][1]}")
    with open(os.path.join(dst, "config.json")) as f:
        cfg = json.load(f)
    if "quantization_config" in cfg:
        fail("config.json still has quantization_config")
    with open(os.path.join(dst, "hf_quant_config.json")) as f:
        hq = json.load(f)
    q = hq["quantization"]
    if hq["producer"]["name"] != "modelopt" or q["quant_algo"] != "NVFP4" or \
            q["group_size"] != 16 or "kv_cache_quant_algo" not in q:
        fail(f"hf_quant_config.json: {hq}")
    excl = set(q["exclude_modules"])
    nl = ck.cfg["num_hidden_layers"]
    for name in src_names:
        if name in experts or not name.endswith(".weight") or name.endswith("embed_tokens.weight"):
            continue
        st = ref.SafeTensors(os.path.join(src, ck.where[name]))
        if len(st.header[name]["shape"]) != 2:
            continue
        mod = name[: -len(".weight")]
        parts = mod.split(".")
        if len(parts) > 2 and parts[1] == "layers" and int(parts[2]) >= nl:
            mod = f"model.layers.{parts[2]}*"
        if mod not in excl:
            fail(f"hf_quant_config.json does not exclude {mod}")
    for x in excl:
        if not x.endswith("*") and x + ".weight" in experts:
            fail(f"hf_quant_config.json excludes the quantized {x}")
    print(f"export_ref: {dst}: {nq} NVFP4 projections byte-identical to the numpy reference "
          f"(dequantized within {worst:.3f} of a grid step), {nbf} FP8 weights as BF16, {ncopy} "
          f"tensors copied, {len(excl)} modules excluded")


if __name__ == "__main__":
    main()
