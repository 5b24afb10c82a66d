#!/bin/bash
# tests/export.sh - `moecal export`: an FP8 synthetic model with the tensors
# a real checkpoint has around its experts (tests/export_ref.py augment) and
# a BF16 one, calibrated and exported on 1 to 4 ranks: the same bytes for
# every rank count, and byte for byte what the independent numpy reference
# (tests/export_ref.py) computes.  Bad inputs are refused with the file and
# tensor named, leaving no output: an existing output, an amax file of
# another model, of another checkpoint of the same shapes, of some layers
# only, K not a multiple of 16, a NaN weight, a full disk.
. "$srcdir/tests/testlib.sh"

need_python_h5py
T=$TMPDIR
REF="$srcdir/tests/export_ref.py"

run "$MOECAL" synth -o "$T/fp8" --preset demo --seed 3 >/dev/null
run "$PYTHON3" "$REF" augment "$T/fp8"
run_mpi 2 "$MOECAL" calibrate -m "$T/fp8" -o "$T/fp8.h5" --backend cpu --quiet
for n in 1 2 3 4; do
    run_mpi $n "$MOECAL" export -m "$T/fp8" --amax "$T/fp8.h5" -o "$T/out$n" --quiet
    [ ! -e "$T/out$n.moecal-tmp" ] || fail "temporary directory left after a good export"
done
for n in 2 3 4; do
    diff -r "$T/out1" "$T/out$n" >/dev/null || fail "export on $n ranks differs from 1 rank"
done
# workers per rank: one, more than there are tensors in flight, on 1 and 2
# ranks, and the CPU backend named: the same bytes
run "$MOECAL" export -m "$T/fp8" --amax "$T/fp8.h5" -o "$T/outt1" --threads 1 --backend cpu --quiet
run_mpi 2 "$MOECAL" export -m "$T/fp8" --amax "$T/fp8.h5" -o "$T/outt7" --threads 7 --quiet
for d in outt1 outt7; do
    diff -r "$T/out1" "$T/$d" >/dev/null || fail "export $d differs from the default threads"
done
rm -rf "$T/outt1" "$T/outt7"
# --backend cuda without a usable GPU (or without CUDA) is refused before
# anything is written
if ! command -v nvidia-smi >/dev/null || ! nvidia-smi -L >/dev/null 2>&1; then
    expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$T/fp8" --amax "$T/fp8.h5" -o "$T/outc" \
        --backend cuda
    expect_msg "backend cuda: (no GPU is visible to this rank|this moecal was built without CUDA)"
    [ ! -e "$T/outc" ] && [ ! -e "$T/outc.moecal-tmp" ] || fail "--backend cuda left an output"
fi
run "$PYTHON3" "$REF" "$T/fp8" "$T/fp8.h5" "$T/out1"
[ ! -e "$T/out1/activations.h5" ] || fail "activations.h5 copied into the checkpoint"
[ -f "$T/out1/tokenizer_config.json" ] || fail "tokenizer_config.json not copied"

# inspect understands the export; calibrate refuses it as a source
run "$MOECAL" inspect "$T/out1" >"$T/inspect.txt"
grep -q "NVFP4, 288 quantized linears, group 16, 7 excluded modules" "$T/inspect.txt" ||
    fail "inspect: $(cat "$T/inspect.txt")"
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" calibrate -m "$T/out1" -o "$T/again.h5" --backend cpu
expect_msg "out1 is a quantized checkpoint .*quant_algo NVFP4.*give the BF16 or FP8 checkpoint"
cp -r "$T/out1" "$T/skew"
"$PYTHON3" - "$T/skew" <<'EOF' || fail "cannot change a scale"
import json, os, struct, sys
d = sys.argv[1]
idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
name = "model.layers.3.mlp.experts.4.up_proj.weight_scale_2"
with open(os.path.join(d, idx[name]), "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
    f.seek(8 + n + h[name]["data_offsets"][0])
    f.write(struct.pack("<f", 0.5))
EOF
expect_fail 3 "$MOECAL" inspect "$T/skew"
grep -q "experts.4.gate_proj and .*experts.4.up_proj differ in weight_scale_2" "$TMPDIR/stdout" ||
    fail "inspect did not flag gate/up scales that differ: $(cat "$TMPDIR/stdout")"

# BF16 experts, all-experts calibration (input scales per expert)
run "$MOECAL" synth -o "$T/bf16" --preset tiny --dtype bf16 --seed 4 >/dev/null
run_mpi 3 "$MOECAL" calibrate -m "$T/bf16" -o "$T/bf16.h5" --backend cpu --calib-all-experts \
    --quiet
run_mpi 2 "$MOECAL" export -m "$T/bf16" --amax "$T/bf16.h5" -o "$T/outb" --quiet
run "$PYTHON3" "$REF" "$T/bf16" "$T/bf16.h5" "$T/outb"

# An existing output: refused without --force, replaced with it.
expect_fail 4 "$MOECAL" export -m "$T/bf16" --amax "$T/bf16.h5" -o "$T/outb"
expect_msg "outb exists; use --force"
touch "$T/outb/stale"
run_mpi 2 "$MOECAL" export -m "$T/bf16" --amax "$T/bf16.h5" -o "$T/outb" --force --quiet
[ ! -e "$T/outb/stale" ] || fail "--force kept a file of the old output"
[ ! -e "$T/outb.moecal-old" ] || fail "--force left the old output beside the new one"

# The source itself as the output, even with --force: refused.
expect_fail 2 "$MOECAL" export -m "$T/bf16" --amax "$T/bf16.h5" -o "$T/bf16" --force
expect_msg "bf16 is or holds an input of the export"
[ -f "$T/bf16/config.json" ] || fail "export --force replaced its own source"

# A directory that holds the inputs as the output, even with --force
mkdir -p "$T/par"
cp -r "$T/bf16" "$T/par/m"
cp "$T/bf16.h5" "$T/par/m.h5"
expect_fail 2 "$MOECAL" export -m "$T/par/m" --amax "$T/par/m.h5" -o "$T/par" --force
expect_msg "par is or holds an input of the export"
[ -f "$T/par/m/config.json" ] || fail "export --force removed the directory of its inputs"

# An FP8 tensor without its block scales cannot be carried over: refused
# before anything is written
cp -r "$T/fp8" "$T/noscale"
"$PYTHON3" - "$T/noscale" <<'EOF' || fail "cannot drop a scale"
import json, os, sys
d = sys.argv[1]
p = os.path.join(d, "model.safetensors.index.json")
idx = json.load(open(p))
del idx["weight_map"]["model.layers.1.self_attn.q_a_proj.weight_scale_inv"]
json.dump(idx, open(p, "w"))
EOF
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$T/noscale" --amax "$T/fp8.h5" -o "$T/x6"
expect_msg "q_a_proj.weight' is F8_E4M3 without a weight_scale_inv"
[ ! -e "$T/x6" ] && [ ! -e "$T/x6.moecal-tmp" ] || fail "output left after a refused export"

# The amax file of another model, of another checkpoint with the same
# shapes (its weights differ), of one layer only.
expect_fail 3 "$MOECAL" export -m "$T/fp8" --amax "$T/bf16.h5" -o "$T/x1"
expect_msg "bf16\.h5 is for hidden_size 160.*fp8 has 512"
run "$MOECAL" synth -o "$T/fp8b" --preset demo --seed 9 >/dev/null
run "$PYTHON3" "$REF" augment "$T/fp8b"
expect_fail 3 "$MOECAL" export -m "$T/fp8b" --amax "$T/fp8.h5" -o "$T/x2"
expect_msg "tensor 'model\.layers\.[0-9]+\.mlp\.experts\.[0-9]+\.[a-z_]+\.weight' has amax .* not the one calibrated"
[ ! -e "$T/x2" ] && [ ! -e "$T/x2.moecal-tmp" ] || fail "output left after a refused export"
run_mpi 2 "$MOECAL" calibrate -m "$T/fp8" -o "$T/part.h5" --layers 2 --backend cpu --quiet
expect_fail 3 "$MOECAL" export -m "$T/fp8" --amax "$T/part.h5" -o "$T/x3"
expect_msg "covers MoE layers 2 but .* has MoE layers 1-3"

# K not a multiple of 16 (the down projection's input, 40 wide)
run "$MOECAL" synth -o "$T/k40" --preset tiny --intermediate 40 >/dev/null
run_mpi 2 "$MOECAL" calibrate -m "$T/k40" -o "$T/k40.h5" --backend cpu --quiet
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$T/k40" --amax "$T/k40.h5" -o "$T/x4"
expect_msg "down_proj\.weight' has 40 columns, not a multiple of 16"
[ ! -e "$T/x4" ] && [ ! -e "$T/x4.moecal-tmp" ] || fail "output left after a refused export"

# A NaN code in an expert weight, found while quantizing
cp -r "$T/fp8" "$T/nan"
"$PYTHON3" - "$T/nan" <<'EOF' || fail "cannot plant a NaN"
import json, os, struct, sys
d = sys.argv[1]
idx = json.load(open(os.path.join(d, "model.safetensors.index.json")))["weight_map"]
name = "model.layers.2.mlp.experts.5.up_proj.weight"
path = os.path.join(d, idx[name])
with open(path, "r+b") as f:
    n = struct.unpack("<Q", f.read(8))[0]
    h = json.loads(f.read(n))
    f.seek(8 + n + h[name]["data_offsets"][0] + 1000)
    f.write(b"\x7f")
EOF
expect_fail 3 $MPIEXEC -n 2 "$MOECAL" export -m "$T/nan" --amax "$T/fp8.h5" -o "$T/x5"
expect_msg "up_proj\.weight.*NaN"
[ ! -e "$T/x5" ] && [ ! -e "$T/x5.moecal-tmp" ] || fail "output left after a refused export"

# Disk full (a small tmpfs; needs root and mount): exit 4, nothing left.
mnt=$T/mnt
mkdir -p "$mnt"
if [ "$(id -u)" -eq 0 ] && mount -t tmpfs -o size=6m tmpfs "$mnt" 2>/dev/null; then
    expect_fail 4 $MPIEXEC -n 2 "$MOECAL" export -m "$T/fp8" --amax "$T/fp8.h5" \
        -o "$mnt/full"
    grep -Eq "No space left on device" "$TMPDIR/stderr" || {
        umount "$mnt"; fail "a full disk not reported as such: $(cat "$TMPDIR/stderr")"; }
    left=$(ls -A "$mnt")
    umount "$mnt"
    [ -z "$left" ] || fail "a full disk left $left"
else
    echo "ENOSPC case skipped: no tmpfs mount here"
fi
exit 0
