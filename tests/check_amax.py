#!/usr/bin/env python3
"""check_amax.py - assertions on moecal amax.h5 files, for the test scenarios.

  check_amax.py same A.h5 B.h5          two runs give the same numbers:
                                        input_amax, weight_amax, tokens_per_expert
                                        and w1/w3 of input_amax_calibrated bit-identical,
                                        w2 within 1e-2 relative
  check_amax.py ref A.h5 REF.npz        A matches the independent reference
  check_amax.py topk A.h5 ACT.h5        top-k invariants: w1/w3 input amax equal the
                                        layer's whole-input amax; input >= calibrated;
                                        some expert never routed, with a weight amax
  check_amax.py identical A.h5 B.h5     every dataset bit-identical
  check_amax.py schema A.h5             datasets, shapes, dtypes, attributes of format 1
"""
import sys

import h5py
import numpy as np

RTOL_W2 = 1e-2


def die(msg):
    print("check_amax: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def text(v):
    """A string attribute as str (fixed-length strings come back as bytes)."""
    return v.decode() if isinstance(v, (bytes, np.bytes_)) else str(v)


def load(path):
    with h5py.File(path, "r") as f:
        d = {k: f[k][...] for k in f.keys()}
        d["attrs"] = {k: f.attrs[k] for k in f.attrs.keys()}
    return d


def w2_close(a, b, what):
    a = np.asarray(a, np.float64)
    b = np.asarray(b, np.float64)
    den = np.maximum(np.abs(b), 1e-30)
    rel = np.where((a == 0) & (b == 0), 0.0, np.abs(a - b) / den)
    if rel.max() > RTOL_W2:
        i = np.unravel_index(np.argmax(rel), rel.shape)
        die(f"{what}: w2 differs by {rel.max():.3g} relative at {i}: {a[i]} vs {b[i]}")


def exact(a, b, what):
    if a.shape != b.shape:
        die(f"{what}: shapes {a.shape} vs {b.shape}")
    if not np.array_equal(a, b):
        bad = np.argwhere(a != b)
        i = tuple(bad[0])
        die(f"{what}: {len(bad)} values differ, first at {i}: {a[i]!r} vs {b[i]!r}")


def cmd_same(a_path, b_path):
    a, b = load(a_path), load(b_path)
    exact(a["weight_amax"], b["weight_amax"], "weight_amax")
    tpe_a = a["tokens_per_expert"].sum(axis=1)
    tpe_b = b["tokens_per_expert"].sum(axis=1)
    exact(tpe_a, tpe_b, "tokens_per_expert (summed over chunks)")
    for name in ("input_amax", "input_amax_calibrated"):
        exact(a[name][..., [0, 2]], b[name][..., [0, 2]], name + " w1/w3")
        w2_close(a[name][..., 1], b[name][..., 1], name)
    print(f"check_amax: {a_path} and {b_path} agree")


def cmd_ref(a_path, ref_path):
    a = load(a_path)
    r = np.load(ref_path)
    layers = list(a["layers"])
    rl = list(r["layers"])
    if layers != rl:
        die(f"layers {layers} vs reference {rl}")
    exact(a["weight_amax"], r["weight_amax"].astype(np.float32), "weight_amax vs reference")
    exact(a["tokens_per_expert"].sum(axis=1), r["tokens_per_expert"].astype(np.int64),
          "tokens_per_expert vs reference")
    cal = a["input_amax_calibrated"]
    rc = r["input_amax_calibrated"].astype(np.float32)
    exact(cal[..., [0, 2]], rc[..., [0, 2]], "input_amax_calibrated w1/w3 vs reference")
    w2_close(cal[..., 1], rc[..., 1], "input_amax_calibrated vs reference")
    fin = a["input_amax"]
    rf = r["input_amax"].astype(np.float32)
    exact(fin[..., [0, 2]], rf[..., [0, 2]], "input_amax w1/w3 vs reference")
    w2_close(fin[..., 1], rf[..., 1], "input_amax vs reference")
    print(f"check_amax: {a_path} matches the reference {ref_path}")


def bf16_to_f32(u16):
    return (u16.astype(np.uint32) << 16).view(np.float32)


def cmd_topk(a_path, act_path):
    a = load(a_path)
    if text(a["attrs"]["mode"]) != "topk":
        die("not a top-k run")
    fin, cal, tok = a["input_amax"], a["input_amax_calibrated"], a["tokens_per_expert"]
    T = int(a["attrs"]["tokens"])
    with h5py.File(act_path, "r") as f:
        for li, layer in enumerate(a["layers"]):
            x = f[f"layers/{layer}/hidden"].astype("float32")[:T]
            whole = np.float32(np.abs(x).max())
            for p in (0, 2):
                if not np.all(fin[li, :, p] == whole):
                    die(f"layer {layer}: w{p + 1} input amax is not the layer's whole-input "
                        f"amax {whole}: {fin[li, :, p]}")
    if not np.all(fin >= cal):
        die("input_amax < input_amax_calibrated somewhere")
    never = tok.sum(axis=1) == 0
    if not never.any():
        die("no expert was never routed")
    if not np.all(a["weight_amax"][never] > 0):
        die("a never-routed expert has no weight amax")
    if not np.all(cal[never] == 0):
        die("a never-routed expert has a calibrated input amax")
    print(f"check_amax: top-k invariants hold; {int(never.sum())} never-routed experts")


def cmd_identical(a_path, b_path):
    """Every dataset bit-identical (a resumed run against an uninterrupted one)."""
    with h5py.File(a_path, "r") as fa, h5py.File(b_path, "r") as fb:
        if sorted(fa.keys()) != sorted(fb.keys()):
            die(f"datasets differ: {sorted(fa.keys())} vs {sorted(fb.keys())}")
        for k in fa.keys():
            exact(fa[k][...], fb[k][...], k)
    print(f"check_amax: every dataset of {a_path} and {b_path} is identical")


def cmd_schema(a_path):
    with h5py.File(a_path, "r") as f:
        at = f.attrs
        for k in ("format", "format_version", "moecal_version", "created", "command_line",
                  "mode", "sync", "router_logits", "quant_format", "model_path", "model_type",
                  "activations_path", "n_ranks", "n_nodes", "placement", "hidden_size",
                  "n_routed_experts", "num_experts_per_tok", "n_group", "topk_group"):
            if k not in at:
                die(f"root attribute {k} missing")
        if text(at["format"]) != "moecal-amax" or int(at["format_version"]) != 1:
            die("wrong format attributes")
        want_rl = ("none",) if text(at["mode"]) == "all_experts" else ("bf16", "fp32", "exact")
        if text(at["router_logits"]) not in want_rl:
            die(f"router_logits is {text(at['router_logits'])!r} in mode {text(at['mode'])}")
        L = f["layers"].shape[0]
        E = int(at["n_routed_experts"])
        C = f["chunk_token_start"].shape[0]
        want = {"layers": ((L,), "i"), "projections": ((3,), "S"),
                "input_amax": ((L, E, 3), "f"), "input_amax_calibrated": ((L, E, 3), "f"),
                "weight_amax": ((L, E, 3), "f"), "input_scale": ((L, E, 3), "f"),
                "weight_scale_2": ((L, E, 3), "f"), "input_amax_history": ((L, C, E, 3), "f"),
                "tokens_per_expert": ((L, C, E), "i"), "chunk_token_start": ((C,), "i"),
                "chunk_token_count": ((C,), "i")}
        for k, (shape, kind) in want.items():
            if k not in f:
                die(f"dataset {k} missing")
            if f[k].shape != shape or f[k].dtype.kind != kind:
                die(f"dataset {k}: {f[k].shape} {f[k].dtype}, expected {shape} kind {kind}")
        if [p.decode() for p in f["projections"][...]] != ["w1", "w2", "w3"]:
            die("projections are not w1, w2, w3")
        hist = f["input_amax_history"][...]
        if not np.array_equal(hist.max(axis=1), f["input_amax_calibrated"][...]):
            die("history's max over chunks differs from input_amax_calibrated")
        if int(f["chunk_token_count"][...].sum()) != int(at["tokens"]):
            die("chunk_token_count does not add up to the tokens attribute")
        import json
        json.loads(text(at["placement"]))
    print(f"check_amax: {a_path} has the format-1 schema")


def main():
    if len(sys.argv) < 3:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    cmd, args = sys.argv[1], sys.argv[2:]
    {"same": cmd_same, "identical": cmd_identical, "ref": cmd_ref, "topk": cmd_topk, "schema": cmd_schema}[cmd](*args)


if __name__ == "__main__":
    main()
