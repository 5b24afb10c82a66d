#!/usr/bin/env python3
"""st_interop.py - the official `safetensors` package reads a moecal synth checkpoint.

usage: st_interop.py MODEL_DIR [AMAX.h5]

For every shard named by model.safetensors.index.json:
  - safe_open(framework="numpy") opens it: the keys are the index's entries
    for that shard, the metadata is {"format": "pt"}, dtype and shape of
    every tensor agree with the header as parsed here independently, and
    every F32 tensor read through numpy equals the bytes at its offsets;
  - safetensors.deserialize (the package's own parser, raw bytes of every
    dtype, FP8 and BF16 included) gives byte-identical tensors.
With AMAX.h5 (from `moecal calibrate` on the same model), what moecal read
is compared with what the package read: each expert's weight_amax equals
max |bf16(e4m3(q) * scale_inv)| computed from the package's bytes.
"""
import json
import os
import struct
import sys

import numpy as np

try:
    import safetensors
    from safetensors import safe_open
except ImportError:
    print("st_interop.py: the safetensors package is not importable", file=sys.stderr)
    sys.exit(77)


def die(msg):
    print("st_interop.py: FAIL: " + msg, file=sys.stderr)
    sys.exit(1)


def own_parse(path):
    """Header and raw tensor bytes, parsed here without the package."""
    raw = open(path, "rb").read()
    n = struct.unpack("<Q", raw[:8])[0]
    hdr = json.loads(raw[8:8 + n])
    meta = hdr.pop("__metadata__", None)
    out = {}
    for name, e in hdr.items():
        b, en = e["data_offsets"]
        out[name] = (e["dtype"], list(e["shape"]), raw[8 + n + b:8 + n + en])
    return meta, out


def e4m3_table():
    t = np.zeros(256, dtype=np.float32)
    for c in range(256):
        s = -1.0 if c & 0x80 else 1.0
        e, m = (c >> 3) & 0xF, c & 7
        if e == 0xF and m == 7:
            t[c] = np.nan
        elif e == 0:
            t[c] = s * (m / 8.0) * 2.0 ** -6
        else:
            t[c] = s * (1.0 + m / 8.0) * 2.0 ** (e - 7)
    return t


def round_bf16(x):
    u = x.astype(np.float32).view(np.uint32).astype(np.uint64)
    u = (u + 0x7FFF + ((u >> 16) & 1)) & 0xFFFF0000
    return u.astype(np.uint32).view(np.float32)


def main():
    if len(sys.argv) < 2:
        print(__doc__, file=sys.stderr)
        sys.exit(2)
    d = sys.argv[1]
    idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))
    wmap = idx["weight_map"]
    shards = sorted(set(wmap.values()))
    package = {}     # name -> (dtype, shape, bytes) as the package read them
    total = 0
    for sh in shards:
        path = os.path.join(d, sh)
        meta, own = own_parse(path)
        listed = sorted(k for k, v in wmap.items() if v == sh)
        with safe_open(path, framework="numpy") as f:
            keys = sorted(f.keys())
            if keys != listed:
                die(f"{sh}: package keys differ from the index's entries for it")
            if f.metadata() != {"format": "pt"} or meta != {"format": "pt"}:
                die(f"{sh}: metadata {f.metadata()} / {meta}")
            for k in keys:
                sl = f.get_slice(k)
                dt, shape, raw = own[k]
                if sl.get_dtype() != dt or list(sl.get_shape()) != shape:
                    die(f"{sh}: {k}: package sees {sl.get_dtype()} {sl.get_shape()}, "
                        f"header {dt} {shape}")
                if dt == "F32":
                    a = f.get_tensor(k)
                    if a.dtype != np.float32 or a.tobytes() != raw:
                        die(f"{sh}: {k}: F32 data differ")
        if hasattr(safetensors, "deserialize"):
            for name, t in safetensors.deserialize(open(path, "rb").read()):
                dt, shape, raw = own[name]
                if t["dtype"] != dt or list(t["shape"]) != shape or bytes(t["data"]) != raw:
                    die(f"{sh}: {name}: deserialize gives other bytes")
                package[name] = (dt, shape, bytes(t["data"]))
        else:
            package.update(own)
        total += sum(len(v[2]) for v in own.values())
    if idx["metadata"]["total_size"] != total:
        die(f"index total_size {idx['metadata']['total_size']} != {total} tensor bytes")
    print(f"st_interop: safetensors {safetensors.__version__} read {len(package)} tensors "
          f"in {len(shards)} shard(s) of {d}, {total} bytes, byte-identical")

    if len(sys.argv) < 3:
        return
    import h5py
    tab = e4m3_table()
    with h5py.File(sys.argv[2], "r") as a:
        layers = [int(x) for x in a["layers"][...]]
        wa = a["weight_amax"][...]
    leaf = ("gate_proj", "down_proj", "up_proj")
    n = 0
    for li, L in enumerate(layers):
        for e in range(wa.shape[1]):
            for p in range(3):
                name = f"model.layers.{L}.mlp.experts.{e}.{leaf[p]}.weight"
                dt, shape, raw = package[name]
                if dt == "F8_E4M3":
                    q = np.frombuffer(raw, np.uint8).reshape(shape)
                    sdt, sshape, sraw = package[name + "_scale_inv"]
                    s = np.frombuffer(sraw, "<f4").reshape(sshape)
                    full = np.repeat(np.repeat(s, 128, axis=0), 128, axis=1)[:shape[0], :shape[1]]
                    w = round_bf16(tab[q] * full)
                else:
                    w = (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)
                want = np.float32(np.abs(w).max())
                if wa[li, e, p] != want:
                    die(f"{name}: moecal weight_amax {wa[li, e, p]!r}, from the package's "
                        f"bytes {want!r}")
                n += 1
    print(f"st_interop: moecal's weight_amax of {n} expert tensors equals the package's bytes")


if __name__ == "__main__":
    main()
