#!/bin/bash
# tests/calib_errors.sh - bad inputs to calibrate: a clear message naming the
# files, a non-zero exit on every rank, no hang and no output left behind.
. "$srcdir/tests/testlib.sh"
need_python_h5py

make_demo "$TMPDIR/demo"
run "$MOECAL" synth --preset tiny -o "$TMPDIR/tiny" >/dev/null

# Activations of another model (other hidden size): refused before compute.
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" \
    -a "$TMPDIR/tiny/activations.h5" -o "$TMPDIR/x.h5"
expect_msg "tiny/activations.h5 has hidden size .* but the model .*demo/config.json has hidden_size"
[ ! -e "$TMPDIR/x.h5" ] && [ ! -e "$TMPDIR/x.h5.tmp" ] || fail "output left after a refused run"

# A layer that is not MoE.
expect_fail 2 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" --layers 0 -o "$TMPDIR/x.h5"
expect_msg "layer 0 is not a MoE layer"

# An expert tensor the index places in a shard that lacks it: only the rank
# owning that expert finds out (when it loads the layer); every rank stops,
# with that rank's message naming the tensor and the shard.
cp -r "$TMPDIR/demo" "$TMPDIR/broken"
"$PYTHON3" - "$TMPDIR/broken" <<'PY' || fail "cannot edit the index"
import json, sys
p = sys.argv[1] + "/model.safetensors.index.json"
idx = json.load(open(p))
cfg = json.load(open(sys.argv[1] + "/config.json"))
L = cfg["num_hidden_layers"] - 1
E = cfg["n_routed_experts"] - 1
name = f"model.layers.{L}.mlp.experts.{E}.up_proj.weight"
shards = sorted(set(idx["weight_map"].values()))
other = [s for s in shards if s != idx["weight_map"][name]][0]
idx["weight_map"][name] = other
json.dump(idx, open(p, "w"))
PY
expect_fail 3 $MPIEXEC -n 3 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/broken" -o "$TMPDIR/x.h5"
expect_msg "rank 2 .*experts\.31\.up_proj\.weight"
[ "$(grep -c "moecal: error" "$TMPDIR/stderr")" = 1 ] || fail "expected one message, from rank 2"
[ ! -e "$TMPDIR/x.h5" ] || fail "output left after a failed run"

# A tensor missing from the index altogether is found by every rank before
# any compute, and reported once.
cp -r "$TMPDIR/demo" "$TMPDIR/broken2"
"$PYTHON3" - "$TMPDIR/broken2" <<'PY' || fail "cannot edit the index"
import json, sys
p = sys.argv[1] + "/model.safetensors.index.json"
idx = json.load(open(p))
del idx["weight_map"]["model.layers.2.mlp.experts.5.down_proj.weight"]
json.dump(idx, open(p, "w"))
PY
expect_fail 3 $MPIEXEC -n 3 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/broken2" -o "$TMPDIR/x.h5"
expect_msg "experts\.5\.down_proj\.weight"
[ "$(grep -c "moecal: error" "$TMPDIR/stderr")" = 1 ] || fail "expected one message"

# NaN rows: an error naming layer and token by default, skipped on request.
cp -r "$TMPDIR/demo" "$TMPDIR/nan"
"$PYTHON3" - "$TMPDIR/nan/activations.h5" <<'PY' || fail "cannot write NaN"
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r+")
name = sorted(f["layers"].keys(), key=int)[0]
d = f[f"layers/{name}/hidden"]
# write a NaN into token 17 through HDF5's own conversion
buf = d.astype("float32")[17:18]
buf[0, 5] = np.nan
sel = np.s_[17:18]
d[sel] = buf
print(name)
PY
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/nan" -o "$TMPDIR/x.h5"
expect_msg "token 17"
run_mpi 2 "$MOECAL" calibrate --backend cpu --nonfinite skip -m "$TMPDIR/nan" -o "$TMPDIR/skip.h5" --quiet

# No silent zero scales.  A layer whose dataset was created but never (or
# only partly) written reads as zeros: refused.  A layer whose every row is
# skipped as non-finite ends with input amax 0: warned, naming the layer and
# the count, and export refuses the file.
for part in none some; do
    cp -r "$TMPDIR/tiny" "$TMPDIR/unw-$part"
    "$PYTHON3" - "$TMPDIR/unw-$part/activations.h5" $part <<'PY' || fail "cannot rewrite"
import sys, h5py
f = h5py.File(sys.argv[1], "r+")
name = sorted(f["layers"].keys(), key=int)[0]
d = f[f"layers/{name}/hidden"]
shape, x = d.shape, d.astype("float32")[...]
del f[f"layers/{name}/hidden"]
n = f.create_dataset(f"layers/{name}/hidden", shape=shape, dtype="float32", chunks=(16, shape[1]))
if sys.argv[2] == "some":
    n[:32] = x[:32]
PY
    expect_fail 3 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/unw-$part" \
        -o "$TMPDIR/unw.h5"
    expect_msg "layers/1/hidden has 256 rows of which (only )?$part.* written"
    [ ! -e "$TMPDIR/unw.h5" ] || fail "output written from an unwritten layer"
done
cp -r "$TMPDIR/tiny" "$TMPDIR/allnan"
"$PYTHON3" - "$TMPDIR/allnan/activations.h5" <<'PY' || fail "cannot plant NaN"
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r+")
d = f["layers/1/hidden"]
x = d.astype("float32")[...]
x[:, 3] = np.nan
d[...] = x
PY
run_mpi 2 "$MOECAL" calibrate --backend cpu --nonfinite skip -m "$TMPDIR/allnan" \
    -o "$TMPDIR/allnan.h5" --quiet 2>"$TMPDIR/stderr"
grep -q "layer 1: 8 of 8 experts have input amax 0 .*256 of 256 rows were skipped" \
    "$TMPDIR/stderr" || fail "no warning for a layer with no token: $(cat "$TMPDIR/stderr")"
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$TMPDIR/allnan" --amax "$TMPDIR/allnan.h5" \
    -o "$TMPDIR/allnan-out"
expect_msg "input amax 0: no token reached it"
[ ! -e "$TMPDIR/allnan-out" ] || fail "export wrote a checkpoint with zero input scales"

# Output names are checked before anything is read; a failure at the end
# leaves no output, no side file and no lock file.
expect_fail 2 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" -o ''
expect_msg "output is empty"
expect_fail 2 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
    -o "$TMPDIR/tiny/activations.h5" --force
expect_msg "would overwrite .*activations.h5, the activation file"
mkdir -p "$TMPDIR/adir.h5"
expect_fail 4 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
    -o "$TMPDIR/adir.h5" --force
expect_msg "adir.h5 is a directory"
deep=$TMPDIR
while [ ${#deep} -lt 3900 ]; do deep=$deep/$(printf 'd%.0s' $(seq 1 200)); done
mkdir -p "$deep"
expect_fail 2 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
    -o "$deep/$(printf 'o%.0s' $(seq 1 150)).h5"
expect_msg "must stay under 4096"
for sfx in .quant_summary.txt .amax_table.txt .hf_quant_config.json .safetensors; do
    rm -rf "$TMPDIR/blk"*
    mkdir -p "$TMPDIR/blk$sfx/x"   # a non-empty directory where the side file goes
    expect_fail 4 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
        -o "$TMPDIR/blk.h5" --quiet
    expect_msg "blk$sfx: rename from .*blk$sfx.tmp failed"
    left=$(cd "$TMPDIR" && ls -d blk* | grep -vx "blk$sfx")
    [ -z "$left" ] || fail "a failed rename of blk$sfx left $left"
done
expect_fail 2 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
    -o "$TMPDIR/tiny/model.h5"
expect_msg "would write .*tiny/model.safetensors in the model's directory"
[ ! -e "$TMPDIR/tiny/model.safetensors" ] || fail "a side file landed as the model's weights"

# Each command given the wrong kind of HDF5 file: exit 3, saying what it is.
run_mpi 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" -o "$TMPDIR/ok.h5" --quiet
expect_fail 3 "$MOECAL" report "$TMPDIR/tiny/activations.h5"
expect_msg "format' is 'moecal-activations', not 'moecal-amax'"
expect_fail 3 "$MOECAL" compare "$TMPDIR/ok.h5" "$TMPDIR/tiny/activations.h5"
expect_msg "format' is 'moecal-activations', not 'moecal-amax'"
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$TMPDIR/tiny" \
    --amax "$TMPDIR/tiny/activations.h5" -o "$TMPDIR/wk"
expect_msg "format' is 'moecal-activations', not 'moecal-amax'"
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/tiny" \
    -a "$TMPDIR/ok.h5" -o "$TMPDIR/wk.h5"
expect_msg "ok.h5.*moecal-amax"
exit 0
