#!/usr/bin/env python3
"""make_amax.py - synthetic amax.h5 files (format_version 1) with known numbers.

Writes the exact schema of src/amaxfile.c with h5py, so that the analysis
commands can be tested without running a calibration.

  make_amax.py topk OUT.h5           a top-k-like file (peer-max synced input amax)
  make_amax.py pair A.h5 B.h5        a top-k-like A and an all-experts-like B:
                                     weight and w1/w3 input amax identical; w2 input
                                     A/B = 2**((e % 8) - 2) for expert e, except that
                                     B's w2 of the last layer's last expert is 0
  make_amax.py never OUT.h5          never-routed experts: layer 1: 3, 7; layer 3: 0, 15;
                                     cold experts: layer 1: 12; layer 2: 5
  make_amax.py early OUT.h5          20 chunks; quantizer (e, p) stops growing at chunk
                                     (e + p) % 5
  make_amax.py late OUT.h5           20 chunks; experts 0-7 grow by 10% in the last chunk,
                                     experts 8-9 by 0.5% in chunk 18, the others settle at 2

Options change one thing, for refusal tests: --seed, --layers 1,2,3, --experts N,
--hidden N, --model-type NAME, --drop DATASET, --attr KEY=VALUE (strings; integers
when VALUE is an integer), --checkpoint, --nan DATASET, --extra-chunk DATASET
(that dataset gets one chunk too many).  Layers, experts and chunks default to
[1, 2, 3], 16 and 10.
"""
import argparse
import sys

import h5py
import numpy as np

NVFP4 = 6.0 * 448.0


class Amax:
    """The contents of one amax file, as numpy arrays."""

    def __init__(self, layers, E, C, chunk_tokens=256, k=4):
        self.layers = np.asarray(layers, np.int32)
        self.E, self.C, self.k = E, C, k
        L = len(layers)
        self.chunk_start = np.arange(C, dtype=np.int64) * chunk_tokens
        self.chunk_count = np.full(C, chunk_tokens, np.int64)
        self.tokens_per_expert = np.zeros((L, C, E), np.int64)
        self.history = np.zeros((L, C, E, 3), np.float32)
        self.weight_amax = np.zeros((L, E, 3), np.float32)
        self.mode = "topk"
        self.attrs = {}

    @property
    def calibrated(self):
        return self.history.max(axis=1)

    def final(self):
        cal = self.calibrated
        if self.mode == "all_experts":
            return cal
        # peer-max sync: every expert gets the layer's largest input amax
        return np.broadcast_to(cal.max(axis=1, keepdims=True), cal.shape).copy()


def routed_history(rng, tokens, scale=1.0):
    """History where an expert's chunk amax is 0 without tokens; w1 == w3 (same x)."""
    L, C, E = tokens.shape
    x = rng.lognormal(mean=0.0, sigma=0.5, size=(L, C, E)).astype(np.float32) * np.float32(scale)
    h = rng.lognormal(mean=-1.0, sigma=0.8, size=(L, C, E)).astype(np.float32) * np.float32(scale)
    hist = np.stack([x, h, x], axis=-1)
    hist[tokens == 0] = 0
    return hist


def make_topk(a, rng):
    L, C, E = len(a.layers), a.C, a.E
    probs = rng.dirichlet(np.full(E, 0.7), size=L)
    for li in range(L):
        for c in range(C):
            a.tokens_per_expert[li, c] = rng.multinomial(int(a.chunk_count[c]) * a.k, probs[li])
    a.history = routed_history(rng, a.tokens_per_expert, 4.0)
    a.weight_amax = rng.uniform(0.05, 0.5, size=(L, E, 3)).astype(np.float32)


def make_never(a, rng):
    L, C, E = len(a.layers), a.C, a.E
    never = {0: [3, 7], 2: [0, 15]}
    cold = {0: [12], 1: [5]}
    for li in range(L):
        for c in range(C):
            for e in range(E):
                if e in never.get(li, []):
                    n = 0
                elif e in cold.get(li, []):
                    n = 1 if c % 2 == 0 else 0
                else:
                    n = 80 + (e * 7 + c * 3) % 41
                a.tokens_per_expert[li, c, e] = n
    a.history = routed_history(rng, a.tokens_per_expert, 2.0)
    a.weight_amax = rng.uniform(0.05, 0.5, size=(L, E, 3)).astype(np.float32)


def make_early(a, rng):
    L, C, E = len(a.layers), a.C, a.E
    a.tokens_per_expert[...] = 50
    base = rng.uniform(1.0, 8.0, size=(L, E, 3)).astype(np.float32)
    for e in range(E):
        for p in range(3):
            s = (e + p) % 5
            for c in range(C):
                v = base[:, e, p] * np.float32(c + 1) / np.float32(s + 1) if c <= s \
                    else base[:, e, p] * np.float32(0.5)
                a.history[:, c, e, p] = v
    a.weight_amax = rng.uniform(0.05, 0.5, size=(L, E, 3)).astype(np.float32)


def make_late(a, rng):
    L, C, E = len(a.layers), a.C, a.E
    a.tokens_per_expert[...] = 50
    base = rng.uniform(1.0, 8.0, size=(L, E, 3)).astype(np.float32)
    a.history[:, :, :, :] = (base * np.float32(0.5))[:, None, :, :]
    a.history[:, 2] = base                       # everyone reaches `base` at chunk 2
    for e in range(E):
        if e < 8:
            a.history[:, C - 1, e] = base[:, e] * np.float32(1.10)
        elif e < 10:
            a.history[:, C - 2, e] = base[:, e] * np.float32(1.005)
    a.weight_amax = rng.uniform(0.05, 0.5, size=(L, E, 3)).astype(np.float32)


def write(path, a, args, final=None):
    E = a.E
    cal = a.calibrated
    fin = a.final() if final is None else final
    wa = a.weight_amax
    w13 = np.maximum(wa[..., 0], wa[..., 2])
    ws = np.stack([w13, wa[..., 1], w13], axis=-1) / np.float32(NVFP4)
    attrs = {
        "format": "moecal-amax", "format_version": 1, "moecal_version": "0.1.0",
        "created": "2025-01-01T00:00:00Z", "command_line": "make_amax.py",
        "mode": a.mode, "sync": "none" if a.mode == "all_experts" else "peer_max",
        "quant_format": "nvfp4", "model_path": "/synthetic/model", "model_type": args.model_type,
        "activations_path": "/synthetic/activations.h5", "n_ranks": 1, "n_nodes": 1,
        "placement": '[{"rank": 0, "host": "localhost", "cpuset": "0", "gpu": null}]',
        "tokens": int(a.chunk_count.sum()), "chunk_tokens": int(a.chunk_count[0]),
        "hidden_size": args.hidden, "moe_intermediate_size": 128,
        "num_hidden_layers": int(a.layers.max()) + 1, "n_routed_experts": E,
        "num_experts_per_tok": a.k, "n_group": 4, "topk_group": 2,
        "routed_scaling_factor": 2.5, "norm_topk_prob": 1, "scoring_func": "sigmoid",
        "topk_method": "noaux_tc", "first_k_dense_replace": int(a.layers.min()),
        "input_hash": "0123456789abcdef",
    }
    if args.checkpoint:
        attrs["checkpoint_next_step"] = 2
    for kv in args.attr:
        key, _, val = kv.partition("=")
        try:
            attrs[key] = int(val)
        except ValueError:
            attrs[key] = val
    dsets = {
        "layers": a.layers.astype(np.int32),
        "projections": np.array([b"w1", b"w2", b"w3"], dtype="S3"),
        "experts": np.arange(E, dtype=np.int32),
        "chunk_token_start": a.chunk_start, "chunk_token_count": a.chunk_count,
        "input_amax": fin.astype(np.float32),
        "input_amax_calibrated": cal.astype(np.float32),
        "weight_amax": wa.astype(np.float32),
        "input_scale": (fin / np.float32(NVFP4)).astype(np.float32),
        "weight_scale_2": ws.astype(np.float32),
        "input_amax_history": a.history.astype(np.float32),
        "tokens_per_expert": a.tokens_per_expert.astype(np.int64),
    }
    if args.nan:
        v = dsets[args.nan].copy()
        v.reshape(-1)[1] = np.nan
        dsets[args.nan] = v
    if args.extra_chunk:
        v = dsets[args.extra_chunk]
        ax = 0 if v.ndim == 1 else 1
        dsets[args.extra_chunk] = np.concatenate([v, np.take(v, [0], axis=ax)], axis=ax)
    for d in args.drop:
        del dsets[d]
    with h5py.File(path, "w") as f:
        for k, v in attrs.items():
            # fixed-length strings, as the C writer stores them
            f.attrs[k] = np.bytes_(v) if isinstance(v, str) else np.int64(v)
        for k, v in dsets.items():
            f.create_dataset(k, data=v)
        scales = {"layers": "layer", "experts": "expert", "projections": "projection",
                  "chunk_token_start": "chunk"}
        for k, label in scales.items():
            if k in f:
                f[k].make_scale(label)

        def attach(name, dims):
            if name not in f:
                return
            for i, s in enumerate(dims):
                if s in f and f[name].shape[i] == f[s].shape[0]:
                    f[name].dims[i].attach_scale(f[s])
        for k in ("input_amax", "input_amax_calibrated", "weight_amax", "input_scale",
                  "weight_scale_2"):
            attach(k, ("layers", "experts", "projections"))
        attach("input_amax_history", ("layers", "chunk_token_start", "experts", "projections"))
        attach("tokens_per_expert", ("layers", "chunk_token_start", "experts"))


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("kind", choices=["topk", "pair", "never", "early", "late"])
    ap.add_argument("out", nargs="+")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--layers", default="1,2,3")
    ap.add_argument("--experts", type=int, default=16)
    ap.add_argument("--chunks", type=int, default=None)
    ap.add_argument("--hidden", type=int, default=256)
    ap.add_argument("--model-type", default="deepseek_v3")
    ap.add_argument("--drop", action="append", default=[])
    ap.add_argument("--attr", action="append", default=[])
    ap.add_argument("--checkpoint", action="store_true")
    ap.add_argument("--nan", default=None)
    ap.add_argument("--extra-chunk", default=None)
    args = ap.parse_args()
    if len(args.out) != (2 if args.kind == "pair" else 1):
        ap.error(f"{args.kind} writes {'two files' if args.kind == 'pair' else 'one file'}")
    layers = [int(x) for x in args.layers.split(",")]
    C = args.chunks or (20 if args.kind in ("early", "late") else 10)
    rng = np.random.default_rng(args.seed)
    a = Amax(layers, args.experts, C)
    if args.kind == "never":
        make_never(a, rng)
    elif args.kind == "early":
        make_early(a, rng)
    elif args.kind == "late":
        make_late(a, rng)
    else:
        make_topk(a, rng)
    write(args.out[0], a, args)
    if args.kind != "pair":
        return
    # B: all-experts-like.  Every token reaches every expert; w1/w3 input amax
    # is then the layer's whole-input amax, as A's synced value; w2 differs by
    # a known power of two (exact in float32).
    b = Amax(layers, args.experts, C)
    b.mode = "all_experts"
    b.tokens_per_expert[...] = a.chunk_count[None, :, None]
    b.weight_amax = a.weight_amax.copy()
    fa = a.final()
    fb = fa.copy()
    E = args.experts
    for e in range(E):
        fb[:, e, 1] = fa[:, e, 1] / np.float32(2.0 ** ((e % 8) - 2))
    fb[-1, E - 1, 1] = 0
    # a history whose max over chunks is fb
    b.history[:, 0] = fb
    b.history[:, 1:] = fb[:, None] * np.float32(0.5)
    write(args.out[1], b, args, final=fb)


if __name__ == "__main__":
    sys.exit(main())
