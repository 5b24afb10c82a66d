#!/bin/bash
# tests/calibrate.sh - the main job on the demo model against an independent
# reference: schema, amax and token counts, top-k invariants, side files.
. "$srcdir/tests/testlib.sh"
need_python_h5py

make_demo "$TMPDIR/demo"
run_mpi 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" -o "$TMPDIR/topk.h5" \
    >"$TMPDIR/out" 2>"$TMPDIR/err"
grep -q "^# rank" "$TMPDIR/out" || fail "no placement header lines"
# the demo has never-routed experts (synth --never-routed): the sync says so
grep -Eq "^# peer-max sync: [0-9]+ of 288 input quantizers raised .*; [1-9][0-9]* experts never routed" \
    "$TMPDIR/err" || fail "no peer-max sync line: $(cat "$TMPDIR/err")"
check_amax schema "$TMPDIR/topk.h5"
# provenance: the backend and its own settings (none for the CPU backend)
"$PYTHON3" - "$TMPDIR/topk.h5" <<'EOF' || fail "backend attributes"
import sys, h5py
a = h5py.File(sys.argv[1], "r").attrs
def s(v):
    return v.decode() if isinstance(v, bytes) else str(v)
assert s(a["backend"]) == "cpu", a["backend"]
assert s(a["backend_settings"]) == "", a["backend_settings"]
EOF

# Independent reference (numpy, its own safetensors and FP8 decoding).
run "$PYTHON3" "$srcdir/tests/reference.py" "$TMPDIR/demo" "$TMPDIR/demo/activations.h5" \
    --out "$TMPDIR/ref.npz"
check_amax ref "$TMPDIR/topk.h5" "$TMPDIR/ref.npz"
check_amax topk "$TMPDIR/topk.h5" "$TMPDIR/demo/activations.h5"

# All-experts mode: every token reaches every expert, no sync.
run_mpi 3 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" --calib-all-experts \
    -o "$TMPDIR/all.h5" >/dev/null
run "$PYTHON3" "$srcdir/tests/reference.py" "$TMPDIR/demo" "$TMPDIR/demo/activations.h5" \
    --all-experts --out "$TMPDIR/ref-all.npz"
check_amax ref "$TMPDIR/all.h5" "$TMPDIR/ref-all.npz"
"$PYTHON3" - "$TMPDIR/all.h5" <<'PY' || fail "all-experts attributes or counts wrong"
import sys, h5py, numpy as np
f = h5py.File(sys.argv[1], "r")
t = lambda v: v.decode() if isinstance(v, bytes) else str(v)
assert t(f.attrs["mode"]) == "all_experts" and t(f.attrs["sync"]) == "none"
tok = f["tokens_per_expert"][...].sum(axis=1)
assert (tok == int(f.attrs["tokens"])).all(), tok
assert np.array_equal(f["input_amax"][...], f["input_amax_calibrated"][...])
PY

# Files beside the output.
for f in topk.quant_summary.txt topk.amax_table.txt topk.hf_quant_config.json topk.safetensors; do
    [ -s "$TMPDIR/$f" ] || fail "$f missing"
done
grep -q "uncalibrated" "$TMPDIR/topk.amax_table.txt" || fail "amax table lists no uncalibrated expert"
# Model-Optimizer's layout: 3 quantizers per linear, 9 per expert, a count
grep -q "^model.layers.1.mlp.experts.0.up_proj.output_quantizer  *TensorQuantizer(disabled)$" \
    "$TMPDIR/topk.quant_summary.txt" || fail "quant summary not in Model-Optimizer's layout"
tail -n 1 "$TMPDIR/topk.quant_summary.txt" | grep -qx "864 TensorQuantizers found in model" ||
    fail "quant summary: last line $(tail -n 1 "$TMPDIR/topk.quant_summary.txt")"
grep -q '"quant_algo": "NVFP4"' "$TMPDIR/topk.hf_quant_config.json" || fail "hf_quant_config lacks NVFP4"
grep -q '"group_size": 16' "$TMPDIR/topk.hf_quant_config.json" || fail "hf_quant_config lacks group_size"
"$PYTHON3" - "$TMPDIR/topk.safetensors" "$TMPDIR/topk.h5" <<'PY' || fail "amax safetensors wrong"
import json, struct, sys
import h5py, numpy as np
raw = open(sys.argv[1], "rb").read()
n = struct.unpack("<Q", raw[:8])[0]
hdr = json.loads(raw[8:8 + n])
f = h5py.File(sys.argv[2], "r")
L0 = int(f["layers"][0])
key = f"model.layers.{L0}.mlp.experts.3.gate_proj.input_quantizer._amax"
b, e = hdr[key]["data_offsets"]
v = np.frombuffer(raw[8 + n + b:8 + n + e], "<f4")[0]
assert v == f["input_amax"][0, 3, 0], (v, f["input_amax"][0, 3, 0])
key = f"model.layers.{L0}.mlp.experts.3.down_proj.weight_quantizer._amax"
b, e = hdr[key]["data_offsets"]
assert np.frombuffer(raw[8 + n + b:8 + n + e], "<f4")[0] == f["weight_amax"][0, 3, 1]
PY

# The schema as h5dump shows it.
if [ "$H5DUMP" != no ]; then
    run "$H5DUMP" -H "$TMPDIR/topk.h5" >"$TMPDIR/dump"
    for d in input_amax input_amax_calibrated weight_amax input_scale weight_scale_2 \
             input_amax_history tokens_per_expert chunk_token_start layers projections; do
        grep -q "DATASET \"$d\"" "$TMPDIR/dump" || fail "h5dump -H lacks $d"
    done
fi

# An existing output is kept without --force; no temporary file is left.
expect_fail 4 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" -o "$TMPDIR/topk.h5"
expect_msg "topk.h5 exists; use --force"
run_mpi 2 "$MOECAL" calibrate --backend cpu -m "$TMPDIR/demo" -o "$TMPDIR/topk.h5" --force --quiet
[ ! -e "$TMPDIR/topk.h5.tmp" ] || fail "temporary output left behind"
exit 0
