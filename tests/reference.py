#!/usr/bin/python3
"""Independent reference for moecal's calibration numbers (numpy and h5py only).

Reads a Hugging Face MoE checkpoint directory and a moecal activation file
and computes, for each MoE layer and routed expert, what moecal writes to
amax.h5:

  tokens_per_expert      [L, E]     tokens routed to the expert
  input_amax_calibrated  [L, E, 3]  (w1, w2, w3) input amax before the sync
  weight_amax            [L, E, 3]  max |W| of the bf16 (dequantized) weight
  input_amax             [L, E, 3]  after the peer-max sync (top-k mode:
                                    every expert gets its layer's max)
  layers                 [L]        model layer index of each MoE layer

The model is computed as it runs in bf16: x is bf16, a = bf16(x W1^T) and
b = bf16(x W3^T) with float32 accumulation, h = bf16(bf16(silu(a)) * b).
Routing is the model's router in float32, its logits x Wg^T computed in
float64 and rounded once to float32 or to bf16 (--router-logits; auto is bf16
for Qwen-MoE and Mixtral, fp32 for DeepSeek, as moecal's default).  Ties between equal
scores go to the lower expert index (stable sort).  Masked groups
(DeepSeek-V3) are -inf.

This file shares no code with moecal on purpose: it parses safetensors,
decodes FP8 e4m3 from its bit fields and reads the activations itself.

usage: reference.py MODEL_DIR ACTIVATIONS.h5 -o OUT.npz|OUT.json
                    [--all-experts] [--layers 3-5,7] [--max-tokens N]
                    [--nonfinite error|skip] [--block-tokens N]
                    [--router-logits auto|bf16|fp32]
"""

import argparse
import json
import os
import struct
import sys

import numpy as np

try:
    import h5py
except ImportError:  # pragma: no cover
    sys.exit("reference.py: h5py is required (Debian: python3-h5py)")


def die(msg):
    sys.exit("reference.py: error: " + msg)


# --------------------------------------------------------------- bf16 / fp8

def bf16_bits_to_f32(bits):
    """uint16 bf16 bit patterns -> float32 (exact)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_bf16(x):
    """float32 -> nearest bf16 (ties to even), returned as float32."""
    x = np.asarray(x, dtype=np.float32)
    u = x.view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    r = u.astype(np.uint32).view(np.float32)
    return np.where(np.isnan(x), x, r).astype(np.float32)


def e4m3_table():
    """Value of each of the 256 FP8 e4m3fn codes (bias 7, no inf, S.1111.111 = NaN)."""
    t = np.zeros(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp = (code >> 3) & 0xF
        man = code & 0x7
        if exp == 0xF and man == 0x7:
            t[code] = np.nan
        elif exp == 0:
            t[code] = sign * (man / 8.0) * 2.0 ** -6
        else:
            t[code] = sign * (1.0 + man / 8.0) * 2.0 ** (exp - 7)
    return t


E4M3 = e4m3_table()


# --------------------------------------------------------------- safetensors

ST_DTYPES = {"F8_E4M3": (np.uint8, 1), "BF16": (np.uint16, 2), "F16": (np.float16, 2),
             "F32": (np.float32, 4)}


class SafeTensors:
    """One .safetensors file: 8-byte little-endian header size, JSON header,
    then the tensor bytes at offsets relative to the end of the header."""

    def __init__(self, path):
        self.path = path
        self.size = os.path.getsize(path)
        with open(path, "rb") as f:
            raw = f.read(8)
            if len(raw) != 8:
                die(f"{path}: shorter than a safetensors header")
            (n,) = struct.unpack("<Q", raw)
            if n > self.size - 8:
                die(f"{path}: header size {n} exceeds the file")
            self.header = json.loads(f.read(n))
        self.base = 8 + n
        self.header.pop("__metadata__", None)

    def read(self, name):
        """Tensor as float32 (bf16/f16/f32 exactly; FP8 as its raw codes, uint8)."""
        info = self.header[name]
        dt = info["dtype"]
        if dt not in ST_DTYPES:
            die(f"{self.path}: tensor '{name}' has dtype {dt}")
        npdt, width = ST_DTYPES[dt]
        shape = tuple(info["shape"])
        b0, b1 = info["data_offsets"]
        count = int(np.prod(shape)) if shape else 1
        if b1 - b0 != count * width or self.base + b1 > self.size:
            die(f"{self.path}: tensor '{name}' offsets do not match its shape")
        a = np.fromfile(self.path, dtype=np.dtype(npdt).newbyteorder("<"), count=count,
                        offset=self.base + b0).reshape(shape)
        if dt == "BF16":
            return bf16_bits_to_f32(a)
        if dt == "F8_E4M3":
            return a  # codes; the caller dequantizes with the scales
        return a.astype(np.float32)


class Checkpoint:
    def __init__(self, d):
        self.dir = d
        with open(os.path.join(d, "config.json")) as f:
            self.cfg = json.load(f)
        index = os.path.join(d, "model.safetensors.index.json")
        if os.path.exists(index):
            with open(index) as f:
                self.where = json.load(f)["weight_map"]
        else:
            single = SafeTensors(os.path.join(d, "model.safetensors"))
            self.where = {k: "model.safetensors" for k in single.header}
        self.files = {}
        qc = self.cfg.get("quantization_config") or {}
        self.block = list(qc.get("weight_block_size", [128, 128]))

    def has(self, name):
        return name in self.where

    def raw(self, name):
        if name not in self.where:
            die(f"{self.dir}: tensor '{name}' not found")
        fn = self.where[name]
        if os.path.basename(fn) != fn:
            die(f"{self.dir}: shard name '{fn}' is not a plain file name")
        if fn not in self.files:
            self.files[fn] = SafeTensors(os.path.join(self.dir, fn))
        st = self.files[fn]
        return st.read(name), st.header[name]["dtype"]

    def weight_bf16(self, name):
        """A weight as the model uses it: bf16 values in float32; FP8 codes
        times the scale_inv of their block, in float32, rounded to bf16."""
        w, dt = self.raw(name)
        if dt == "F8_E4M3":
            s, _ = self.raw(name + "_scale_inv")
            rows, cols = w.shape
            br, bc = self.block
            if s.shape != (-(-rows // br), -(-cols // bc)):
                die(f"{name}_scale_inv has shape {s.shape} for a {rows}x{cols} weight")
            full = np.repeat(np.repeat(s.astype(np.float32), br, axis=0), bc, axis=1)
            return round_bf16(E4M3[w] * full[:rows, :cols])
        # bf16 stays exact; f16/f32 weights are used in bf16
        return w if dt == "BF16" else round_bf16(w)


# --------------------------------------------------------------- model family

def expert_count(cfg, key, alias):
    """The expert count under either spelling transformers reads."""
    vals = {cfg[k] for k in (key, alias) if cfg.get(k) is not None}
    if len(vals) != 1:
        die(f"config.json: '{key}'/'{alias}' give {sorted(vals)}")
    return vals.pop()


def round_bf16_f64(v):
    """float64 -> nearest bf16 in one rounding (ties to even), as float32."""
    v = np.asarray(v, dtype=np.float64)
    u = v.view(np.uint64)
    drop = np.uint64((1 << 45) - 1)
    r = ((u + (drop >> np.uint64(1)) + ((u >> np.uint64(45)) & np.uint64(1))) & ~drop)
    out = r.view(np.float64)
    tiny = np.abs(v) < 2.0 ** -126
    out = np.where(tiny, np.rint(v * 2.0 ** 133) * 2.0 ** -133, out)
    out = np.where(np.abs(v) >= float.fromhex("0x1.ffp127"), np.copysign(np.inf, v), out)
    return out.astype(np.float32)


class Family:
    def __init__(self, cfg):
        mt = cfg.get("model_type", "")
        self.model_type = mt
        self.H = cfg["hidden_size"]
        nl = cfg["num_hidden_layers"]
        if mt in ("deepseek_v3", "deepseek_v2", "kimi_k2"):
            self.E = expert_count(cfg, "n_routed_experts",
                                  "num_experts" if mt == "deepseek_v2" else "num_local_experts")
            self.I = cfg["moe_intermediate_size"]
            self.logits = "fp32"
            self.scoring = cfg.get("scoring_func", "sigmoid" if mt != "deepseek_v2" else "softmax")
            method = cfg.get("topk_method", "noaux_tc" if mt != "deepseek_v2" else "greedy")
            self.grouped = method in ("noaux_tc", "group_limited_greedy")
            self.use_bias = method == "noaux_tc"
            self.n_group = cfg.get("n_group", 1) or 1
            self.topk_group = cfg.get("topk_group", 1) or 1
            fk = cfg.get("first_k_dense_replace", 0)
            freq = cfg.get("moe_layer_freq", 1) or 1
            self.moe_layers = [i for i in range(nl) if i >= fk and i % freq == 0]
            self.prefix = "model.layers.{L}.mlp"
            self.proj = ("gate_proj", "down_proj", "up_proj")
        elif mt in ("qwen3_moe", "qwen2_moe"):
            self.E = expert_count(cfg, "num_experts", "num_local_experts" if mt == "qwen3_moe"
                                  else "num_experts")
            self.I = cfg["moe_intermediate_size"]
            self.logits = "bf16"
            self.scoring = "softmax"
            self.grouped = self.use_bias = False
            self.n_group = self.topk_group = 1
            step = cfg.get("decoder_sparse_step", 1) or 1
            only = set(cfg.get("mlp_only_layers", []) or [])
            self.moe_layers = [i for i in range(nl) if i not in only and (i + 1) % step == 0]
            self.prefix = "model.layers.{L}.mlp"
            self.proj = ("gate_proj", "down_proj", "up_proj")
        elif mt == "mixtral":
            self.E = expert_count(cfg, "num_local_experts", "num_experts")
            self.I = cfg["intermediate_size"]
            self.logits = "bf16"
            self.scoring = "softmax"
            self.grouped = self.use_bias = False
            self.n_group = self.topk_group = 1
            self.moe_layers = list(range(nl))
            self.prefix = "model.layers.{L}.block_sparse_moe"
            self.proj = ("w1", "w2", "w3")
        else:
            die(f"model_type '{mt}' is not a supported MoE family")
        self.k = cfg["num_experts_per_tok"]

    def gate_name(self, layer):
        return self.prefix.format(L=layer) + ".gate.weight"

    def bias_name(self, layer):
        return self.prefix.format(L=layer) + ".gate.e_score_correction_bias"

    def expert_name(self, layer, e, p):
        return self.prefix.format(L=layer) + f".experts.{e}.{self.proj[p]}.weight"


# --------------------------------------------------------------- routing

def route(fam, logits, bias):
    """Selected experts [T, k] of each token, by full stable sorts."""
    logits = logits.astype(np.float32)
    T, E = logits.shape
    if fam.scoring == "sigmoid":
        scores = (np.float32(1.0) / (np.float32(1.0) + np.exp(-logits))).astype(np.float32)
    else:
        z = np.exp(logits - logits.max(axis=1, keepdims=True))
        scores = (z / z.sum(axis=1, keepdims=True)).astype(np.float32)
    choice = scores + bias if bias is not None else scores.copy()
    G, TG = fam.n_group, fam.topk_group
    if fam.grouped and G > 1 and TG < G:
        grp = np.sort(choice.reshape(T, G, E // G), axis=2)
        if bias is not None and E // G >= 2:
            gscore = grp[:, :, -1] + grp[:, :, -2]
        else:
            gscore = grp[:, :, -1]
        kept = np.argsort(-gscore, axis=1, kind="stable")[:, :TG]
        keep = np.zeros((T, G), dtype=bool)
        np.put_along_axis(keep, kept, True, axis=1)
        choice = np.where(np.repeat(keep, E // G, axis=1), choice, np.float32(-np.inf))
    return np.argsort(-choice, axis=1, kind="stable")[:, :fam.k]


# --------------------------------------------------------------- activations

class Activations:
    def __init__(self, path):
        self.f = h5py.File(path, "r")
        fmt = self.f.attrs.get("format")
        if isinstance(fmt, bytes):
            fmt = fmt.decode()
        if fmt != "moecal-activations":
            die(f"{path}: format attribute is {fmt!r}, not 'moecal-activations'")

    def rows_bf16(self, layer, r0, n):
        """Rows [r0, r0+n) of /layers/<layer>/hidden as bf16 values in float32:
        stored bf16 bit for bit (raw read, no conversion), f16/f32 rounded."""
        ds = self.f[f"layers/{layer}/hidden"]
        ftype = ds.id.get_type()
        H = ds.shape[1]
        if ftype.get_class() != h5py.h5t.FLOAT:
            die(f"layer {layer}: hidden is not a float dataset")
        size = ftype.get_size()
        if size == 2 and ftype.get_fields() == (15, 7, 8, 0, 7) and ftype.get_ebias() == 127:
            raw = np.empty((n, H), dtype=np.uint16)
            fspace = ds.id.get_space()
            fspace.select_hyperslab((r0, 0), (n, H))
            mspace = h5py.h5s.create_simple((n, H))
            ds.id.read(mspace, fspace, raw, mtype=ftype)
            return bf16_bits_to_f32(raw)
        return round_bf16(ds[r0:r0 + n].astype(np.float32))

    def tokens(self, layer):
        return self.f[f"layers/{layer}/hidden"].shape[0]


# --------------------------------------------------------------- calibration

def silu_bf16(a):
    return round_bf16(a / (np.float32(1.0) + np.exp(-a)))


def parse_layers(spec, moe_layers):
    if spec in (None, "all"):
        return list(moe_layers)
    want = set()
    for part in spec.split(","):
        if "-" in part:
            lo, hi = part.split("-")
            want.update(range(int(lo), int(hi) + 1))
        else:
            want.add(int(part))
    bad = sorted(want - set(moe_layers))
    if bad:
        die(f"--layers: {bad} are not MoE layers")
    return sorted(want)


def calibrate_layer(ck, fam, acts, layer, args, T):
    E, H = fam.E, fam.H
    gate, _ = ck.raw(fam.gate_name(layer))
    gate = gate.astype(np.float32)
    bias = None
    if fam.use_bias and ck.has(fam.bias_name(layer)):
        bias, _ = ck.raw(fam.bias_name(layer))
        bias = bias.astype(np.float32)
    W = [[ck.weight_bf16(fam.expert_name(layer, e, p)) for p in range(3)] for e in range(E)]

    tokens = np.zeros(E, dtype=np.int64)
    amax = np.zeros((E, 3), dtype=np.float32)
    wamax = np.array([[np.nanmax(np.abs(W[e][p])) for p in range(3)] for e in range(E)],
                     dtype=np.float32)
    for r0 in range(0, T, args.block_tokens):
        n = min(args.block_tokens, T - r0)
        x = acts.rows_bf16(layer, r0, n)
        if x.shape[1] != H:
            die(f"layer {layer}: activations have {x.shape[1]} columns, hidden_size is {H}")
        bad = ~np.isfinite(x).all(axis=1)
        if bad.any():
            if args.nonfinite == "error":
                die(f"layer {layer}: token {r0 + int(np.argmax(bad))} holds NaN or Inf")
            x = x[~bad]
        if x.shape[0] == 0:
            continue
        if args.all_experts:
            member = np.ones((x.shape[0], E), dtype=bool)
        else:
            exact = x.astype(np.float64) @ gate.astype(np.float64).T
            logits = round_bf16_f64(exact) if args.prec == "bf16" else exact.astype(np.float32)
            sel = route(fam, logits, bias)
            member = np.zeros((x.shape[0], E), dtype=bool)
            np.put_along_axis(member, sel, True, axis=1)
        rowmax = np.abs(x).max(axis=1)
        for e in range(E):
            rows = np.nonzero(member[:, e])[0]
            if rows.size == 0:
                continue
            xe = x[rows]
            a = round_bf16(xe @ W[e][0].T)
            b = round_bf16(xe @ W[e][2].T)
            h = round_bf16(silu_bf16(a) * b)
            tokens[e] += rows.size
            amax[e, 0] = max(amax[e, 0], rowmax[rows].max())
            amax[e, 2] = amax[e, 0]
            amax[e, 1] = max(amax[e, 1], np.abs(h).max())
    return tokens, amax, wamax


def main():
    np.seterr(over="ignore")  # exp(-a) overflows to inf for a << 0: silu -> -0, as in float32
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("model")
    ap.add_argument("activations")
    ap.add_argument("-o", "--output", required=True, help="OUT.npz or OUT.json")
    ap.add_argument("--all-experts", action="store_true")
    ap.add_argument("--layers", default="all")
    ap.add_argument("--max-tokens", type=int, default=0)
    ap.add_argument("--nonfinite", choices=("error", "skip"), default="error")
    ap.add_argument("--block-tokens", type=int, default=4096,
                    help="tokens read and multiplied at a time (memory only)")
    ap.add_argument("--router-logits", choices=("auto", "bf16", "fp32"), default="auto")
    args = ap.parse_args()

    ck = Checkpoint(args.model)
    fam = Family(ck.cfg)
    args.prec = fam.logits if args.router_logits == "auto" else args.router_logits
    acts = Activations(args.activations)
    layers = parse_layers(args.layers, fam.moe_layers)
    L, E = len(layers), fam.E
    tpe = np.zeros((L, E), dtype=np.int64)
    cal = np.zeros((L, E, 3), dtype=np.float32)
    wam = np.zeros((L, E, 3), dtype=np.float32)
    for li, layer in enumerate(layers):
        T = acts.tokens(layer)
        if args.max_tokens:
            T = min(T, args.max_tokens)
        tpe[li], cal[li], wam[li] = calibrate_layer(ck, fam, acts, layer, args, T)

    if args.all_experts:
        final = cal.copy()
    else:
        final = np.broadcast_to(cal.max(axis=1, keepdims=True), cal.shape).copy()
    out = {"layers": np.array(layers, dtype=np.int32), "tokens_per_expert": tpe,
           "input_amax_calibrated": cal, "weight_amax": wam, "input_amax": final}
    if args.output.endswith(".json"):
        with open(args.output, "w") as f:
            json.dump({k: v.tolist() for k, v in out.items()}, f)
    else:
        np.savez(args.output, **out)


if __name__ == "__main__":
    main()
