#!/bin/bash
# tests/capture_seq.sh - `moecal-capture --sequential` (one decoder layer at
# a time) against the whole-model capture, on tiny random Qwen3-MoE, Mixtral
# and DeepSeek-V3 models made by transformers: the activation files must be
# the same bit for bit, also with a short last batch (padding) and with the
# hidden states spilled to files; a DeepSeek-V3 checkpoint with FP8 weights
# (64x64 block scales) captured sequentially equals the whole-model capture
# of the same weights dequantized.  Then the errors: a layer tensor missing
# from the shards, a config.json that does not match the tensors, a
# --max-gpu-memory smaller than one layer, a spill directory that fills up
# (where a small tmpfs can be mounted): each exits non-zero with a message
# and leaves no activation file.  Skipped (77) where torch or transformers is
# missing (scripts/check.sh installs them).
. "$srcdir/tests/testlib.sh"

PY=${CAPTURE_PYTHON:-$PYTHON3}
"$PY" -c 'import torch, transformers, h5py, numpy, safetensors, tokenizers
from transformers import Qwen3MoeConfig, MixtralConfig, DeepseekV3Config' 2>/dev/null ||
    skip "$PY lacks torch/transformers/h5py/safetensors/tokenizers (set CAPTURE_PYTHON)"
T=$TMPDIR
BUILD="$srcdir/tests/router_hf.py"
HELP="$srcdir/tests/capture_seq.py"
CAPTURE="$srcdir/scripts/moecal-capture"
cap() { # MODEL TEXT OUT [options]: capture on the CPU
    local m=$1 txt=$2 out=$3; shift 3
    "$PY" "$CAPTURE" --model "$m" --text "$txt" --seq-len 96 --batch-size 3 \
        --device-map cpu -o "$out" "$@"
}

for fam in qwen3_moe mixtral deepseek_v3; do
    run "$PY" "$BUILD" build "$fam" "$T/$fam" "$T/$fam.txt"
    # 1000 tokens: 11 sequences of 96 and one of 40, so the last batch pads
    run cap "$T/$fam" "$T/$fam.txt" "$T/$fam-whole.h5" --max-tokens 1000
    run cap "$T/$fam" "$T/$fam.txt" "$T/$fam-seq.h5" --max-tokens 1000 --sequential \
        >"$T/$fam-seq.log" 2>&1
    grep -q "tokens/s" "$T/$fam-seq.log" || fail "$fam: no per-layer rate: $(cat "$T/$fam-seq.log")"
    run "$PY" "$HELP" same "$T/$fam-whole.h5" "$T/$fam-seq.h5"
done
# moecal reads what the capture adds: layer 0 holds dense MLP inputs, and
# every layer its o_proj input amax
"$MOECAL" inspect --json "$T/deepseek_v3-seq.h5" >"$T/inspect.json" || fail "inspect failed"
"$PY" -c 'import json, sys
d = json.load(open(sys.argv[1]))
assert d["dense_layers"] == [0] and sorted(d["o_proj_input_amax"]) == ["0", "1", "2"], d' \
    "$T/inspect.json" || fail "inspect: $(cat "$T/inspect.json")"
run cap "$T/deepseek_v3" "$T/deepseek_v3.txt" "$T/spill.h5" --max-tokens 1000 --sequential \
    --spill-dir "$T/spill"
run "$PY" "$HELP" same "$T/deepseek_v3-whole.h5" "$T/spill.h5"
[ -z "$(ls -A "$T/spill")" ] || fail "spill files left behind: $(ls "$T/spill")"

# FP8 weights, dequantized by the capture as moecal does
run "$PY" "$HELP" fp8 "$T/deepseek_v3" "$T/ds-fp8" "$T/ds-deq" 64
run cap "$T/ds-deq" "$T/deepseek_v3.txt" "$T/deq-whole.h5" --max-tokens 1000
run cap "$T/ds-fp8" "$T/deepseek_v3.txt" "$T/fp8-seq.h5" --max-tokens 1000 --sequential
run "$PY" "$HELP" same "$T/deq-whole.h5" "$T/fp8-seq.h5"

# A tensor of the last MoE layer missing
cp -r "$T/deepseek_v3" "$T/ds-missing"
run "$PY" "$HELP" drop "$T/ds-missing" "model.layers.2.self_attn.o_proj.weight"
expect_fail 3 "$PY" "$CAPTURE" --model "$T/ds-missing" --text "$T/deepseek_v3.txt" \
    --max-tokens 500 --device-map cpu -o "$T/missing.h5" --sequential
expect_msg "layer 2 .*missing.*model.layers.2.self_attn.o_proj.weight"
[ ! -e "$T/missing.h5" ] && ! ls "$T"/missing.h5.tmp* >/dev/null 2>&1 ||
    fail "an activation file was left after a missing tensor"

# config.json that does not match the tensors
cp -r "$T/deepseek_v3" "$T/ds-badcfg"
"$PY" - "$T/ds-badcfg/config.json" <<'PYEOF' || fail "cannot edit config.json"
import json, sys
c = json.load(open(sys.argv[1]))
c["moe_intermediate_size"] = c["moe_intermediate_size"] * 2
json.dump(c, open(sys.argv[1], "w"))
PYEOF
expect_fail 3 "$PY" "$CAPTURE" --model "$T/ds-badcfg" --text "$T/deepseek_v3.txt" \
    --max-tokens 500 --device-map cpu -o "$T/badcfg.h5" --sequential
expect_msg "layer 1 .*(config|shape)"
[ ! -e "$T/badcfg.h5" ] || fail "an activation file was left after a config mismatch"

# a GPU budget smaller than one layer, refused with the sizes
expect_fail 2 "$PY" "$CAPTURE" --model "$T/deepseek_v3" --text "$T/deepseek_v3.txt" \
    --max-tokens 500 --device-map cpu -o "$T/small.h5" --sequential --max-gpu-memory 64k
expect_msg "needs [0-9]+ bytes of weights in BF16, more than --max-gpu-memory 65536"

# a spill directory that fills up (needs root and mount)
mnt=$T/tiny
mkdir -p "$mnt"
if [ "$(id -u)" -eq 0 ] && mount -t tmpfs -o size=256k tmpfs "$mnt" 2>/dev/null; then
    expect_fail 4 "$PY" "$CAPTURE" --model "$T/deepseek_v3" --text "$T/deepseek_v3.txt" \
        --max-tokens 1000 --device-map cpu -o "$T/full.h5" --sequential --spill-dir "$mnt"
    expect_msg "spill directory is full"
    leftover=$(ls -A "$mnt")
    umount "$mnt"
    [ ! -e "$T/full.h5" ] || fail "an activation file was left after the spill filled up"
    [ -z "$leftover" ] || fail "spill files left on the full tmpfs: $leftover"
else
    echo "full spill directory: skipped (no tmpfs mount here)"
fi
exit 0
