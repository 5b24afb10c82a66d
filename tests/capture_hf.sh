#!/bin/bash
# tests/capture_hf.sh - scripts/moecal-capture and `moecal calibrate` against
# Hugging Face transformers: a tiny random DeepSeek-V3 model is saved (bf16
# safetensors), its MoE inputs captured, calibrated by moecal, and compared
# with per-expert maxima taken by hooks inside the transformers forward pass
# over the same tokens (w1/w3 input and weight amax exact, w2 within 1e-2,
# token counts equal).  Skipped (77) where torch or transformers is missing.
#
# Environment: CAPTURE_PYTHON (a Python with torch, transformers, h5py;
# default $PYTHON3), BACKEND (cpu or cuda, default cpu), NP (ranks, default 2
# for cpu, 1 for cuda), CAPTURE_DEVICE (cpu, cuda or auto, the default).
. "$srcdir/tests/testlib.sh"

PY=${CAPTURE_PYTHON:-$PYTHON3}
"$PY" -c 'import torch, transformers, h5py, numpy, safetensors, tokenizers
from transformers import DeepseekV3ForCausalLM' 2>/dev/null ||
    skip "$PY lacks torch/transformers/h5py/safetensors/tokenizers (set CAPTURE_PYTHON)"
BACKEND=${BACKEND:-cpu}
if [ "$BACKEND" = cuda ]; then : "${NP:=1}"; else : "${NP:=2}"; fi
DEV=${CAPTURE_DEVICE:-auto}
if [ "$DEV" = auto ]; then
    DEV=$("$PY" -c 'import torch; print("cuda" if torch.cuda.is_available() else "cpu")')
fi
T=$TMPDIR
CHECK="$srcdir/tests/capture_hf.py"
CAPTURE="$srcdir/scripts/moecal-capture"
SEQ=128 BATCH=4 TOKENS=4096   # 8 full batches: no padding in the compared run

run "$PY" "$CHECK" build "$T/model" "$T/calib.txt"
mkdir -p "$T/run"
run "$PY" "$CAPTURE" --model "$T/model" --text "$T/calib.txt" --seq-len $SEQ \
    --batch-size $BATCH --max-tokens $TOKENS --device-map "$DEV" -o "$T/run/activations.h5" \
    --save-config
cmp -s "$T/model/config.json" "$T/run/config.json" || fail "--save-config did not copy config.json"
expect_fail 4 "$PY" "$CAPTURE" --model "$T/model" --text "$T/calib.txt" \
    -o "$T/run/activations.h5"
expect_msg "activations\.h5 exists; use --force"

# Reference: hooks on the MoE blocks and experts, same tokens; also checks
# that the activation file holds exactly what the MoE blocks saw.
run "$PY" "$CHECK" reference "$T/model" "$T/run/activations.h5" "$T/ref.npz" \
    --text "$T/calib.txt" --seq-len $SEQ --batch-size $BATCH --max-tokens $TOKENS \
    --device "$DEV" --capture "$CAPTURE"

run_mpi "$NP" "$MOECAL" calibrate --backend "$BACKEND" -m "$T/model" \
    -a "$T/run/activations.h5" -o "$T/out.h5" --chunk-tokens 1024 --quiet
run "$PY" "$CHECK" check "$T/out.h5" "$T/ref.npz"
check_amax schema "$T/out.h5"

# Padding: a token budget that leaves the last batch short is captured exactly.
run "$PY" "$CAPTURE" --model "$T/model" --text "$T/calib.txt" --seq-len $SEQ \
    --batch-size $BATCH --max-tokens 1000 --device-map "$DEV" -o "$T/run/short.h5"
run "$PY" "$CHECK" prefix "$T/run/activations.h5" "$T/run/short.h5" 1000
run_mpi "$NP" "$MOECAL" calibrate --backend "$BACKEND" -m "$T/model" \
    -a "$T/run/short.h5" -o "$T/short-out.h5" --quiet
exit 0
