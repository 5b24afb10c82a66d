#!/bin/bash
# tests/export_modelopt.sh - `moecal export` byte for byte against NVIDIA
# Model-Optimizer's own NVFP4 quantization (nvidia-modelopt's NVFP4QTensor on
# the CPU, tests/export_modelopt.py) for a synthetic model with FP8 experts
# and one with BF16 experts, and the quant summary beside the amax file
# against Model-Optimizer's print_quant_summary.  Skipped (77) where torch or nvidia-modelopt is
# missing (scripts/check.sh installs them; CAPTURE_PYTHON names the Python).
. "$srcdir/tests/testlib.sh"

PY=${CAPTURE_PYTHON:-$PYTHON3}
"$PY" -c 'import torch, h5py, numpy
from modelopt.torch.quantization.qtensor.nvfp4_tensor import NVFP4QTensor' 2>/dev/null ||
    skip "$PY lacks torch/nvidia-modelopt/h5py (set CAPTURE_PYTHON)"
T=$TMPDIR
for dt in fp8 bf16; do
    run "$MOECAL" synth -o "$T/$dt" --preset demo --dtype $dt --seed 6 >/dev/null
    run_mpi 2 "$MOECAL" calibrate -m "$T/$dt" -o "$T/$dt.h5" --backend cpu --quiet
    run_mpi 2 "$MOECAL" export -m "$T/$dt" --amax "$T/$dt.h5" -o "$T/$dt-out" --quiet
    run "$PY" "$srcdir/tests/export_modelopt.py" "$T/$dt" "$T/$dt.h5" "$T/$dt-out" \
        "$T/$dt.quant_summary.txt"
done
exit 0
