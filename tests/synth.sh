#!/bin/bash
# tests/synth.sh - `moecal synth`: the same options and seed give the same
# bytes (whatever the threads or ranks), another seed other bytes; a
# non-empty directory is refused; the files have the documented layout
# (h5dump shows the activation schema); an independent router (numpy) never
# sends a token to a never-routed expert, and the data have their structure.
. "$srcdir/tests/testlib.sh"

same_dirs() {
    local a=$1 b=$2 f
    [ "$(cd "$a" && ls)" = "$(cd "$b" && ls)" ] || fail "$a and $b hold other files"
    for f in "$a"/*; do
        cmp -s "$f" "$b/$(basename "$f")" || fail "$(basename "$f") differs: $a vs $b"
    done
}

# --help lists every option with its default.
run "$MOECAL" synth --help >"$TMPDIR/help"
for o in output preset layers first-dense experts topk groups topk-groups hidden intermediate \
         tokens never-routed outliers seed dtype act-dtype shard-size progress force; do
    grep -Eq -- "--$o .*\[default: " "$TMPDIR/help" || fail "synth --help lacks --$o with a default"
done
grep -q "no attention" "$TMPDIR/help" || fail "synth --help does not say what is left out"

# Same seed, same bytes: 1 and 2 threads, 1 and 2 ranks.
for p in tiny demo; do
    OMP_NUM_THREADS=1 run "$MOECAL" synth --preset $p -o "$TMPDIR/$p-a" -q
    OMP_NUM_THREADS=2 run "$MOECAL" synth --preset $p -o "$TMPDIR/$p-b" -q
    same_dirs "$TMPDIR/$p-a" "$TMPDIR/$p-b"
done
OMP_NUM_THREADS=2 run_mpi 2 "$MOECAL" synth --preset tiny -o "$TMPDIR/tiny-mpi" -q
same_dirs "$TMPDIR/tiny-a" "$TMPDIR/tiny-mpi"
[ "$(ls "$TMPDIR/demo-a" | grep -c '^model-0000[1-9]-of-00003.safetensors$')" = 3 ] ||
    fail "demo: expected 3 shards, found: $(ls "$TMPDIR/demo-a")"

# Another seed, other bytes (every data file).
run "$MOECAL" synth --preset tiny --seed 2 -o "$TMPDIR/tiny-s2" -q
for f in activations.h5 model-00001-of-00001.safetensors; do
    ! cmp -s "$TMPDIR/tiny-a/$f" "$TMPDIR/tiny-s2/$f" || fail "$f is the same for seeds 1 and 2"
done

# A non-empty directory is refused; --force writes into it, removing an
# earlier model's shards, and gives the same bytes.
expect_fail 4 "$MOECAL" synth --preset tiny -o "$TMPDIR/tiny-a"
expect_msg "tiny-a is not empty; use --force"
touch "$TMPDIR/tiny-a/model-00001-of-00002.safetensors" "$TMPDIR/tiny-a/notes.txt"
run "$MOECAL" synth --preset tiny -o "$TMPDIR/tiny-a" --force -q
[ ! -e "$TMPDIR/tiny-a/model-00001-of-00002.safetensors" ] || fail "--force left a stale shard"
[ -e "$TMPDIR/tiny-a/notes.txt" ] || fail "--force removed a file that is not the model's"
rm "$TMPDIR/tiny-a/notes.txt"
same_dirs "$TMPDIR/tiny-a" "$TMPDIR/tiny-b"
expect_fail 4 "$MOECAL" synth --preset tiny -o "$TMPDIR/tiny-a/config.json"
expect_msg "exists and is not a directory"

# Bad parameters: exit 2, the option named.
expect_fail 2 "$MOECAL" synth --preset tiny --groups 4 --topk-groups 1 --never-routed 1 \
    -o "$TMPDIR/x"
expect_msg "never-routed 1: .*could be chosen"
expect_fail 2 "$MOECAL" synth --preset tiny --groups 3 -o "$TMPDIR/x"
expect_msg "--groups 3"
expect_fail 2 "$MOECAL" synth --preset tiny --tokens lots -o "$TMPDIR/x"
expect_msg "--tokens lots"
expect_fail 2 "$MOECAL" synth --preset tiny
expect_msg "needs -o DIR"
[ ! -e "$TMPDIR/x" ] || fail "a refused run created its output directory"

# The activation schema as h5dump shows it.
H5DUMP=${H5DUMP:-$(command -v h5dump || echo no)}
if [ "$H5DUMP" != no ]; then
    run "$H5DUMP" -H "$TMPDIR/tiny-a/activations.h5" >"$TMPDIR/dump"
    for re in 'ATTRIBUTE "format"' 'ATTRIBUTE "format_version"' 'GROUP "layers"' 'GROUP "1"' \
              'DATASET "hidden"' '16-bit little-endian floating-point' \
              'SIMPLE \{ \( 256, 160 \) / \( 256, 160 \) \}'; do
        grep -Eq "$re" "$TMPDIR/dump" || fail "h5dump -H lacks $re"
    done
    run "$H5DUMP" -a /format "$TMPDIR/tiny-a/activations.h5" >"$TMPDIR/fmt"
    grep -q '"moecal-activations"' "$TMPDIR/fmt" || fail "format attribute is not moecal-activations"
    run "$H5DUMP" -p -H "$TMPDIR/demo-a/activations.h5" >"$TMPDIR/dump2"
    grep -q "CHUNKED ( 1024, 512 )" "$TMPDIR/dump2" || fail "demo activations are not chunked by 1 MiB"
    run "$MOECAL" synth --preset tiny --act-dtype f32 -o "$TMPDIR/tiny-f32" -q
    run "$H5DUMP" -H "$TMPDIR/tiny-f32/activations.h5" >"$TMPDIR/dump3"
    grep -q "H5T_IEEE_F32LE" "$TMPDIR/dump3" || fail "--act-dtype f32 is not float32"
fi

need_python_h5py
run "$MOECAL" synth --preset demo --dtype bf16 --act-dtype f16 -o "$TMPDIR/demo-bf16" -q
"$PYTHON3" - "$TMPDIR/demo-a" "$TMPDIR/demo-bf16" "$TMPDIR/tiny-a" <<'PY' || fail "layout or data checks failed"
import json, struct, sys
import h5py, numpy as np

def bf16(raw):
    return (np.frombuffer(raw, "<u2").astype(np.uint32) << 16).view(np.float32)

def check(d):
    cfg = json.load(open(f"{d}/config.json"))
    sj = json.load(open(f"{d}/synth.json"))
    idx = json.load(open(f"{d}/model.safetensors.index.json"))
    fp8 = sj["weight_dtype"] == "F8_E4M3"
    assert cfg["model_type"] == "deepseek_v3" and cfg["architectures"] == ["DeepseekV3ForCausalLM"]
    for k in ("scoring_func", "topk_method", "norm_topk_prob", "routed_scaling_factor",
              "moe_layer_freq", "torch_dtype", "vocab_size", "first_k_dense_replace"):
        assert k in cfg, k
    assert cfg["scoring_func"] == "sigmoid" and cfg["topk_method"] == "noaux_tc"
    assert cfg["routed_scaling_factor"] == 2.5 and cfg["norm_topk_prob"] is True
    assert ("quantization_config" in cfg) == fp8
    if fp8:
        assert cfg["quantization_config"] == {"activation_scheme": "dynamic", "fmt": "e4m3",
                                              "quant_method": "fp8", "weight_block_size": [128, 128]}
    for a, b in (("num_hidden_layers", "num_hidden_layers"), ("n_routed_experts", "n_routed_experts"),
                 ("num_experts_per_tok", "num_experts_per_tok"), ("n_group", "n_group"),
                 ("topk_group", "topk_group"), ("hidden_size", "hidden_size"),
                 ("moe_intermediate_size", "moe_intermediate_size"),
                 ("first_k_dense_replace", "first_k_dense_replace")):
        assert cfg[a] == sj[b], (a, cfg[a], sj[b])
    E, H, I = sj["n_routed_experts"], sj["hidden_size"], sj["moe_intermediate_size"]
    layers = sj["moe_layers"]
    assert layers == list(range(cfg["first_k_dense_replace"], cfg["num_hidden_layers"]))
    # the index: exactly the expected tensors; each shard's header agrees
    want = {}
    for L in layers:
        want[f"model.layers.{L}.mlp.gate.weight"] = ("BF16", [E, H])
        want[f"model.layers.{L}.mlp.gate.e_score_correction_bias"] = ("F32", [E])
        for e in range(E):
            for p, shape in (("gate_proj", [I, H]), ("down_proj", [H, I]), ("up_proj", [I, H])):
                n = f"model.layers.{L}.mlp.experts.{e}.{p}.weight"
                want[n] = ("F8_E4M3" if fp8 else "BF16", shape)
                if fp8:
                    want[n + "_scale_inv"] = ("F32", [-(-shape[0] // 128), -(-shape[1] // 128)])
    assert set(idx["weight_map"]) == set(want), set(idx["weight_map"]) ^ set(want)
    shards = sorted(set(idx["weight_map"].values()))
    assert len(shards) == sj["shards"]
    total, tensors = 0, {}
    for i, s in enumerate(shards):
        assert s == f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors", s
        raw = open(f"{d}/{s}", "rb").read()
        n = struct.unpack("<Q", raw[:8])[0]
        hdr = json.loads(raw[8:8 + n])
        assert hdr.pop("__metadata__") == {"format": "pt"}
        for name, e in hdr.items():
            assert idx["weight_map"][name] == s, name
            assert (e["dtype"], e["shape"]) == want[name], (name, e, want[name])
            b, en = e["data_offsets"]
            tensors[name] = raw[8 + n + b:8 + n + en]
            total += en - b
        assert 8 + n + max(e["data_offsets"][1] for e in hdr.values()) == len(raw)
    assert total == idx["metadata"]["total_size"] == sj["total_size"]
    # the router: never-routed experts have bias -4, the others small ones
    f = h5py.File(f"{d}/activations.h5", "r")
    assert f.attrs["format"] in (b"moecal-activations", "moecal-activations")
    assert int(f.attrs["format_version"]) == 1
    assert sorted(int(k) for k in f["layers"]) == layers
    k, G, TG = sj["num_experts_per_tok"], sj["n_group"], sj["topk_group"]
    out = sj["outlier_channels"]
    for L in layers:
        never = sj["never_routed"][str(L)]
        assert len(never) == sj["never_routed_per_layer"]
        b = np.frombuffer(tensors[f"model.layers.{L}.mlp.gate.e_score_correction_bias"], "<f4")
        assert all(b[e] == -4.0 for e in never) and np.all(np.abs(np.delete(b, never)) <= 0.1)
        W = bf16(tensors[f"model.layers.{L}.mlp.gate.weight"]).reshape(E, H)
        x = f[f"layers/{L}/hidden"].astype("float32")[...]
        assert x.shape == (sj["tokens"], H)
        # DeepSeek-V3 routing, float32, independent of moecal
        s = 1.0 / (1.0 + np.exp(-(x @ W.T).astype(np.float32)))
        sp = (s + b).astype(np.float32)
        T = x.shape[0]
        g = sp.reshape(T, G, E // G)
        gs = np.sort(g, axis=2)[:, :, -2:].sum(axis=2) if G > 1 else np.zeros((T, 1))
        keep = np.argsort(-gs, axis=1, kind="stable")[:, :TG]
        mask = np.full((T, G), -np.inf, dtype=np.float32)
        np.put_along_axis(mask, keep, 0.0, axis=1)
        top = np.argsort(-(g + mask[:, :, None]).reshape(T, E), axis=1, kind="stable")[:, :k]
        cnt = np.bincount(top.ravel(), minlength=E)
        assert all(cnt[e] == 0 for e in never), (L, never, cnt)
        live = np.delete(cnt, never)
        mean = cnt.sum() / E
        assert cnt.max() > 2.0 * mean, ("routing not skewed", cnt)
        # structure: outlier channels 30x+ the typical value, per-token scale spread
        med = np.median(np.abs(np.delete(x, out, axis=1)))
        assert np.all(np.median(np.abs(x[:, out]), axis=0) > 30 * med), (L, out)
        rms = np.sqrt((np.delete(x, out, axis=1) ** 2).mean(axis=1))
        assert np.percentile(rms, 95) / np.percentile(rms, 5) > 2.0
        print(f"{d} layer {L}: never-routed {never} get no token; tokens per expert "
              f"max {cnt.max()} (mean {mean:.0f}), min routable {live.min()}; outliers "
              f"{int(np.median(np.abs(x[:, out])) / med)}x the median")
    # weights: FP8 scales are block max / 448 of finite weights near N(0, 0.02)
    if fp8:
        L = layers[0]
        q = np.frombuffer(tensors[f"model.layers.{L}.mlp.experts.0.gate_proj.weight"], np.uint8)
        assert not np.any((q & 0x7F) == 0x7F), "NaN code"
        sc = np.frombuffer(tensors[f"model.layers.{L}.mlp.experts.0.gate_proj.weight_scale_inv"], "<f4")
        assert np.all(sc > 0) and np.all(sc < 1e-2), sc

for d in sys.argv[1:]:
    check(d)
PY
exit 0
