#!/bin/bash
# tests/inspect.sh - `moecal inspect`: a synthetic checkpoint is described
# with exactly the parameters synth.json records; --json parses; a missing
# shard and a renamed tensor are reported (exit 3); activation and amax files
# are recognised; anything else is refused with exit 3.
. "$srcdir/tests/testlib.sh"
need_python_h5py

make_demo "$TMPDIR/demo"
run "$MOECAL" inspect "$TMPDIR/demo" >"$TMPDIR/text"
run "$MOECAL" inspect --json "$TMPDIR/demo" >"$TMPDIR/ckpt.json"
run "$MOECAL" inspect --json "$TMPDIR/demo/activations.h5" >"$TMPDIR/act.json"
run "$MOECAL" inspect "$TMPDIR/demo/activations.h5" >"$TMPDIR/act.txt"
for re in "MoE layers 1-3 \(3\)" "32 per layer, top-4, 4 groups / 2 kept, sigmoid" \
          "F8_E4M3 \(288 tensors\), FP8 blocks 128x128" "shards +3 file" "all present" \
          "usable by calibrate +yes"; do
    grep -Eq "$re" "$TMPDIR/text" || { cat "$TMPDIR/text" >&2; fail "inspect text lacks '$re'"; }
done
grep -Eq "tokens +4096 per layer" "$TMPDIR/act.txt" || fail "activation text lacks the tokens"
"$PYTHON3" - "$TMPDIR/demo" "$TMPDIR/ckpt.json" "$TMPDIR/act.json" <<'PY' || fail "inspect disagrees with synth.json"
import json, os, sys
d, cj, aj = sys.argv[1], json.load(open(sys.argv[2])), json.load(open(sys.argv[3]))
sj = json.load(open(os.path.join(d, "synth.json")))
assert cj["kind"] == "checkpoint" and cj["model_type"] == sj["model_type"]
for k in ("num_hidden_layers", "first_k_dense_replace", "moe_layers", "n_routed_experts",
          "num_experts_per_tok", "n_group", "topk_group", "hidden_size", "moe_intermediate_size",
          "shards", "total_size"):
    assert cj[k] == sj[k], (k, cj[k], sj[k])
L, E = len(sj["moe_layers"]), sj["n_routed_experts"]
assert cj["expert_dtypes"] == {sj["weight_dtype"]: 3 * E * L}, cj["expert_dtypes"]
assert cj["fp8_block"] == sj["weight_block_size"]
assert cj["expected_tensors"] == L * (2 + 6 * E)
assert cj["missing_tensors"] == [] and cj["missing_shards"] == [] and cj["usable"] is True
assert cj["file_bytes"] == sum(os.path.getsize(os.path.join(d, s)) for s in cj["shard_files"])
assert aj["kind"] == "activations" and aj["tokens"] == sj["tokens"]
assert aj["hidden_size"] == sj["hidden_size"] and aj["layers"] == sj["moe_layers"]
assert aj["dtype"] == "bf16" and aj["chunk_rows"] == 1024 and aj["format_version"] == 1
print("inspect agrees with synth.json")
PY

# A missing shard and a renamed tensor (in the index, and inside a shard).
cp -r "$TMPDIR/demo" "$TMPDIR/broken"
rm "$TMPDIR/broken/model-00002-of-00003.safetensors"
"$PYTHON3" - "$TMPDIR/broken" <<'PY' || fail "cannot break the checkpoint"
import json, sys
d = sys.argv[1]
p = d + "/model.safetensors.index.json"
idx = json.load(open(p))
name = "model.layers.1.mlp.experts.5.up_proj.weight"
idx["weight_map"][name + "s"] = idx["weight_map"].pop(name)
json.dump(idx, open(p, "w"))
s = d + "/model-00001-of-00003.safetensors"
raw = bytearray(open(s, "rb").read())
old = b'"model.layers.1.mlp.experts.7.down_proj.weight"'
i = raw.find(old)
assert i > 0
raw[i:i + len(old)] = b'"model.layers.1.mlp.experts.7.down_proj.wXight"'
open(s, "wb").write(raw)
PY
expect_fail 3 "$MOECAL" inspect "$TMPDIR/broken"
grep -q "MISSING shard *model-00002-of-00003.safetensors" "$TMPDIR/stdout" || fail "missing shard not reported"
grep -q "experts.5.up_proj.weight: not listed in model.safetensors.index.json" "$TMPDIR/stdout" ||
    fail "tensor renamed in the index not reported"
grep -q "experts.7.down_proj.weight: listed in .* but not in model-00001-of-00003" "$TMPDIR/stdout" ||
    fail "tensor renamed in its shard not reported"
grep -q "usable by calibrate *no: " "$TMPDIR/stdout" || fail "not marked unusable"
expect_fail 3 "$MOECAL" inspect --json "$TMPDIR/broken"
"$PYTHON3" - "$TMPDIR/stdout" <<'PY' || fail "--json of the broken checkpoint"
import json, sys
j = json.load(open(sys.argv[1]))
assert j["missing_shards"] == ["model-00002-of-00003.safetensors"], j["missing_shards"]
miss = {m["tensor"]: m["problem"] for m in j["missing_tensors"]}
assert "not listed" in miss["model.layers.1.mlp.experts.5.up_proj.weight"]
assert "not in model-00001" in miss["model.layers.1.mlp.experts.7.down_proj.weight"]
assert any("is missing" in p for p in miss.values())
assert j["usable"] is False and j["problem"]
print(f"broken checkpoint: {len(miss)} tensors reported missing")
PY

# An amax file: root attributes and datasets.
if $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu --quiet -m "$TMPDIR/demo" \
        -o "$TMPDIR/amax.h5" >"$TMPDIR/cal.log" 2>&1; then
    run "$MOECAL" inspect "$TMPDIR/amax.h5" >"$TMPDIR/amax.txt"
    for re in "format +moecal-amax" "input_amax +float32 +\[3, 32, 3\]" "valid format-1 amax file: yes"; do
        grep -Eq "$re" "$TMPDIR/amax.txt" || fail "amax text lacks '$re'"
    done
    run "$MOECAL" inspect --json "$TMPDIR/amax.h5" >"$TMPDIR/amax.json"
    "$PYTHON3" -c 'import json,sys; j=json.load(open(sys.argv[1])); assert j["kind"]=="amax" and j["attributes"]["format"]=="moecal-amax" and j["datasets"]["weight_amax"]["shape"]==[3,32,3]' \
        "$TMPDIR/amax.json" || fail "amax --json"
else
    echo "calibrate did not run; amax part left out:" >&2
    tail -3 "$TMPDIR/cal.log" >&2
fi
# An HDF5 file claiming to be an amax file, but incomplete: described, exit 3.
"$PYTHON3" -c 'import h5py,sys; f=h5py.File(sys.argv[1],"w"); f.attrs["format"]="moecal-amax"; f.attrs["format_version"]=1; f["layers"]=[1,2]' \
    "$TMPDIR/fake.h5" || fail "cannot write fake.h5"
expect_fail 3 "$MOECAL" inspect "$TMPDIR/fake.h5"
grep -q "valid format-1 amax file: no" "$TMPDIR/stdout" || fail "an incomplete amax file passes"

# Neither: a text file, another HDF5 file, a missing path.
echo "hello" >"$TMPDIR/text.txt"
expect_fail 3 "$MOECAL" inspect "$TMPDIR/text.txt"
expect_msg "neither a checkpoint directory nor an HDF5 file"
"$PYTHON3" -c 'import h5py,sys; h5py.File(sys.argv[1],"w")["x"]=[1]' "$TMPDIR/other.h5"
expect_fail 3 "$MOECAL" inspect "$TMPDIR/other.h5"
expect_msg "neither a moecal activation file nor an amax file"
expect_fail 3 "$MOECAL" inspect "$TMPDIR/nothing-here"
expect_msg "nothing-here: No such file"
expect_fail 2 "$MOECAL" inspect
exit 0
