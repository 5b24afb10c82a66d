#!/bin/bash
# bench/run-capture-seq.sh - on a GPU machine: `moecal-capture --sequential`
# on a DeepSeek-V3-shaped checkpoint that transformers loads
# (bench/make-hf-model.py: full hidden size, 256 FP8 experts per MoE layer,
# LAYERS layers of which FIRST_DENSE dense; about 24 GB for 5 layers) with a
# GPU budget below the model's size, then `moecal calibrate` on the result.
# Prints each layer's tokens/s and peak GPU memory and the calibration's
# timing lines; logs go to OUTDIR.
#   bench/run-capture-seq.sh BINDIR WORKDIR [OUTDIR]
# BINDIR holds moecal (and mpiexec); PYTHON names a Python with torch,
# transformers, h5py, safetensors and tokenizers.  TOKENS (default 65536),
# SEQ (2048), BATCH (8), BUDGET (--max-gpu-memory, default 16G), LAYERS (5),
# FIRST_DENSE (3), MAKE_ARGS (more make-hf-model.py options: a small dry run
# on a CPU with DEVICE=cpu MAKE_ARGS="--experts 16 --hidden 512 --moe-inter
# 256 --inter 1024 --heads 4 --vocab 2000").
set -u
bin=$(cd "${1:?usage: run-capture-seq.sh BINDIR WORKDIR [OUTDIR]}" && pwd) || exit 2
work=${2:?usage: run-capture-seq.sh BINDIR WORKDIR [OUTDIR]}
out=${3:-${OUT:-.}}
here=$(cd "$(dirname "$0")" && pwd)
py=${PYTHON:-python3}
mkdir -p "$work" "$out"
t0=$(date +%s)
if [ ! -f "$work/hf/model.safetensors.index.json" ]; then
    "$py" "$here/make-hf-model.py" "$work/hf" --layers "${LAYERS:-5}" \
        --first-dense "${FIRST_DENSE:-3}" ${MAKE_ARGS:-} >"$out/make.log" 2>&1 ||
        { echo "make-hf-model failed:"; tail -n 5 "$out/make.log"; exit 1; }
fi
echo "== model: $(( $(date +%s) - t0 )) s; $(du -sh "$work/hf" | cut -f1)"
t0=$(date +%s)
"$py" "$here/../scripts/moecal-capture" --model "$work/hf" --text "$work/hf/calib.txt" \
    --sequential --device-map "${DEVICE:-cuda}" --max-gpu-memory "${BUDGET:-16G}" \
    --seq-len "${SEQ:-2048}" --batch-size "${BATCH:-8}" --max-tokens "${TOKENS:-65536}" \
    -o "$work/act.h5" -f >"$out/capture.log" 2>&1
rc=$?
echo "== capture --sequential: rc $rc, $(( $(date +%s) - t0 )) s"
grep -E "^moecal-capture: (layer|wrote)" "$out/capture.log"
[ $rc -eq 0 ] || { tail -n 5 "$out/capture.log"; exit 1; }
t0=$(date +%s)
"$bin/mpiexec" -n 1 "$bin/moecal" calibrate -m "$work/hf" -a "$work/act.h5" \
    -o "$work/amax.h5" -f --chunk-tokens 65536 -v 2 \
    ${DEVICE:+--backend cpu} >"$out/calibrate.log" 2>&1
rc=$?
echo "== calibrate: rc $rc, $(( $(date +%s) - t0 )) s"
grep -E "^# (rank 0 time|rank 0 reads|wrote)" "$out/calibrate.log"
exit $rc
