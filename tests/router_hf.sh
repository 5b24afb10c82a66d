#!/bin/bash
# tests/router_hf.sh - moecal's expert selection against the models' own
# routers: tiny random Qwen3-MoE, Mixtral and DeepSeek-V3 models made by
# Hugging Face transformers, activations captured by scripts/moecal-capture,
# and `moecal calibrate --chunk-tokens 1` (one token per chunk, so its
# tokens_per_expert holds every token's experts) compared with hooks on the
# models' routers and experts (tests/router_hf.py).  With the default
# --router-logits (bf16 for Qwen3-MoE and Mixtral, fp32 for DeepSeek-V3) at
# least 99.99% of the token-expert assignments must equal the model's, ties
# at the k-th place going to the lower expert index; the other precisions are
# run and reported.  A Qwen3-MoE config.json that spells the expert count
# num_experts (transformers 4) is calibrated as well.  Skipped (77) where
# torch or transformers is missing (scripts/check.sh installs them).
#
# Environment: CAPTURE_PYTHON (a Python with torch, transformers, h5py;
# default $PYTHON3), BACKEND (cpu or cuda, default cpu), NP (ranks, default 2
# for cpu, 1 for cuda), ROUTER_HF_FAMILIES (default all three).
. "$srcdir/tests/testlib.sh"

PY=${CAPTURE_PYTHON:-$PYTHON3}
"$PY" -c 'import torch, transformers, h5py, numpy, safetensors, tokenizers
from transformers import Qwen3MoeConfig, MixtralConfig, DeepseekV3Config' 2>/dev/null ||
    skip "$PY lacks torch/transformers/h5py/safetensors/tokenizers (set CAPTURE_PYTHON)"
BACKEND=${BACKEND:-cpu}
if [ "$BACKEND" = cuda ]; then : "${NP:=1}"; else : "${NP:=2}"; fi
T=$TMPDIR
REF="$srcdir/tests/router_hf.py"
CAPTURE="$srcdir/scripts/moecal-capture"
SEQ=128 BATCH=4 TOKENS=4096   # 8 full batches: no padding

calibrate() {   # calibrate MODEL_DIR OUT [options]
    local dir=$1 out=$2; shift 2
    run_mpi "$NP" "$MOECAL" calibrate --backend "$BACKEND" -m "$dir" -a "$T/$fam.h5" \
        -o "$out" --chunk-tokens 1 --quiet "$@"
}

for fam in ${ROUTER_HF_FAMILIES:-qwen3_moe mixtral deepseek_v3}; do
    M=$T/$fam
    run "$PY" "$REF" build "$fam" "$M" "$T/$fam.txt"
    run "$PY" "$CAPTURE" --model "$M" --text "$T/$fam.txt" --seq-len $SEQ --batch-size $BATCH \
        --max-tokens $TOKENS --device-map cpu -o "$T/$fam.h5"
    run "$PY" "$REF" reference "$fam" "$M" "$T/$fam.h5" "$T/$fam.npz" --text "$T/$fam.txt" \
        --seq-len $SEQ --batch-size $BATCH --max-tokens $TOKENS --capture "$CAPTURE"

    calibrate "$M" "$T/$fam-auto.h5"
    case $fam in deepseek_v3) want=fp32 others="bf16 exact" ;; *) want=bf16 others="fp32 exact" ;; esac
    got=$("$PY" -c 'import h5py, sys; v = h5py.File(sys.argv[1], "r").attrs["router_logits"]
print(v.decode() if isinstance(v, bytes) else v)' "$T/$fam-auto.h5")
    [ "$got" = "$want" ] || fail "$fam: router_logits attribute '$got', expected '$want'"
    run "$PY" "$REF" check "$T/$fam-auto.h5" "$T/$fam.npz"
    for p in $others; do
        calibrate "$M" "$T/$fam-$p.h5" --router-logits "$p"
        run "$PY" "$REF" check "$T/$fam-$p.h5" "$T/$fam.npz" --report-only
    done
done

case " ${ROUTER_HF_FAMILIES:-qwen3_moe} " in
*" qwen3_moe "*)
    # the spelling of transformers 4 (num_experts), same model and tokens
    fam=qwen3_moe
    O=$T/qwen3_moe-v4
    mkdir -p "$O"
    for f in "$T"/qwen3_moe/*; do ln -s "$f" "$O/"; done
    rm "$O/config.json"
    "$PY" -c 'import json, sys
c = json.load(open(sys.argv[1]))
c["num_experts"] = c.pop("num_local_experts")
json.dump(c, open(sys.argv[2], "w"), indent=2)' "$T/qwen3_moe/config.json" "$O/config.json" ||
        fail "cannot rewrite config.json"
    grep -q '"num_local_experts"' "$O/config.json" && fail "num_local_experts still in the copy"
    calibrate "$O" "$T/qwen3_moe-v4.h5"
    run "$PY" "$REF" check "$T/qwen3_moe-v4.h5" "$T/qwen3_moe.npz"
    ;;
esac
exit 0
