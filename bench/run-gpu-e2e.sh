#!/bin/bash
# bench/run-gpu-e2e.sh - on a GPU machine: `moecal calibrate --backend cuda`
# end to end on a synthetic model with two DeepSeek-V3 MoE layers (FP8,
# 22.6 GB of experts, 15 GB of activations), once per chunk size, then
# `moecal compare` of the outputs.  The model is written to WORKDIR (about
# 38 GB of disk) and read from the page cache: the first synth leaves it
# there.  Logs go to OUTDIR; each run's timing lines are printed after it.
# The read bound is measured in the same run: pcopy (bench/pcopy.c, in
# BINDIR) reads the activations and the shards with READERS threads (default
# 16) before the runs, and each run's wall time is divided by the larger of
# its compute time and the time its reads take at that rate ("wall/bound").
# Exits non-zero if a run or a comparison fails.
#   bench/run-gpu-e2e.sh BINDIR WORKDIR [OUTDIR] [RANKS] [CHUNK...]
# BINDIR holds moecal (built --with-cuda) and mpiexec, with the shared
# libraries they need when the GPU machine lacks them.  RANKS (default 1) ranks share the
# node's GPUs; CHUNK defaults to 131072 32768.  SYNTH_ARGS and BACKEND
# replace the model's sizes and the backend (a small dry run on a CPU:
# SYNTH_ARGS="--preset demo" BACKEND=cpu).  ROUTER_LOGITS="fp32 bf16 exact"
# then times each --router-logits setting at the first CHUNK and prints how
# its amax compare with the first setting's (the routing differs, so they
# need not be identical).
set -u
usage="usage: run-gpu-e2e.sh BINDIR WORKDIR [OUTDIR] [RANKS] [CHUNK...]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
bin=$(cd "$1" && pwd) || exit 2
work=$2
out=${3:-${OUT:-.}}
ranks=${4:-1}
shift $(( $# >= 4 ? 4 : $# ))
chunks=${*:-131072 32768}
mkdir -p "$work" "$out"

t0=$(date +%s)
if [ ! -f "$work/model/activations.h5" ]; then
    "$bin/moecal" synth -o "$work/model" \
        ${SYNTH_ARGS:---preset deepseek-v3-layer --layers 5 --first-dense 3 --tokens 524288} \
        --progress lines >"$out/synth.log" 2>&1 ||
        { echo "synth failed (rc $?):"; tail -n 5 "$out/synth.log"; exit 1; }
fi
echo "== synth: $(( $(date +%s) - t0 )) s; $(du -sh "$work/model" | cut -f1)"

# The read bound: a plain parallel read of the same files, now.
bound=
if [ -x "$bin/pcopy" ]; then
    "$bin/pcopy" -t "${READERS:-16}" "$work/model/activations.h5" "$work/model"/*.safetensors \
        >"$out/pread.txt" 2>&1 && bound=$(sed -n 's/.*: \([0-9.]*\) GB\/s.*/\1/p' "$out/pread.txt")
    echo "== read bound: $(cat "$out/pread.txt")"
fi

# wall / max(compute, bytes read / bound) of a run's log
ratio() {
    [ -n "$bound" ] || return 0
    awk -v bw="$bound" '
        /reads: tokens/ { for (i = 1; i <= NF; i++) { if ($i == "tokens") t = $(i + 1);
                                                       if ($i == "weights") w = $(i + 1) } }
        /rank 0 time:/ { for (i = 1; i <= NF; i++) if ($i == "compute") c = $(i + 1) + 0 }
        /^# wrote/ { for (i = 1; i <= NF; i++) if ($i == "in") wall = $(i + 1) + 0 }
        END { rb = (t + w) / (bw * 1e9); b = rb > c ? rb : c;
              if (b > 0) printf "   wall %.2f s, compute %.2f s, reads %.3f GB (rank 0) at %.2f GB/s: %.2f s; wall/bound %.2f\n",
                                wall, c, (t + w) / 1e9, bw, rb, wall / b }' "$1"
}

first= status=0
for c in $chunks; do
    t0=$(date +%s)
    mpiexec -n "$ranks" "$bin/moecal" calibrate -m "$work/model" -o "$work/amax-$c.h5" -f \
        --backend "${BACKEND:-cuda}" --chunk-tokens "$c" -v 2 >"$out/calibrate-$c.log" 2>&1
    rc=$?
    echo "== calibrate --chunk-tokens $c on $ranks rank(s): rc $rc, $(( $(date +%s) - t0 )) s"
    grep -E "^# (rank 0 time|rank 0 reads|wrote)" "$out/calibrate-$c.log"
    [ $rc -eq 0 ] || { tail -n 5 "$out/calibrate-$c.log"; status=1; continue; }
    ratio "$out/calibrate-$c.log"
    if [ -z "$first" ]; then
        first=$c
    else
        echo "== compare $c with $first (every amax row must be 100% identical)"
        "$bin/moecal" compare "$work/amax-$c.h5" "$work/amax-$first.h5" >"$out/compare-$c.log" 2>&1 ||
            status=1
        head -n 30 "$out/compare-$c.log"
    fi
done
set -- $chunks
for p in ${ROUTER_LOGITS:-}; do
    t0=$(date +%s)
    mpiexec -n "$ranks" "$bin/moecal" calibrate -m "$work/model" -o "$work/amax-rl-$p.h5" -f \
        --backend "${BACKEND:-cuda}" --chunk-tokens "$1" --router-logits "$p" -v 2 \
        >"$out/calibrate-rl-$p.log" 2>&1
    rc=$?
    echo "== calibrate --chunk-tokens $1 --router-logits $p: rc $rc, $(( $(date +%s) - t0 )) s"
    grep -E "^# (rank 0 time|wrote)" "$out/calibrate-rl-$p.log"
    [ $rc -eq 0 ] || { tail -n 5 "$out/calibrate-rl-$p.log"; status=1; continue; }
    if [ -z "${rl_first:-}" ]; then
        rl_first=$p
    else
        echo "== compare --router-logits $p with $rl_first"
        "$bin/moecal" compare "$work/amax-rl-$p.h5" "$work/amax-rl-$rl_first.h5" \
            >"$out/compare-rl-$p.log" 2>&1 || status=1
        head -n 12 "$out/compare-rl-$p.log"
    fi
done
exit $status
