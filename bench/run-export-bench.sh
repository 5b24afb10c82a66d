#!/bin/bash
# bench/run-export-bench.sh - on a GPU machine: `moecal export` of a
# synthetic DeepSeek-V3 layer set (FP8 experts) against a plain parallel copy
# of the same shard files, measured in the same run.  Steps: synth (unless
# WORKDIR/model exists) and calibrate; pcopy (bench/pcopy.c) reads the
# shards, then copies them; export with the CUDA and the CPU backend; the two
# outputs must be the same bytes (cmp).  Each step's log goes to OUTDIR; the
# figures are printed last: GB/s of bytes read plus bytes written, the ratio
# to the copy, and the peak host and GPU memory per rank from export's log.
#   bench/run-export-bench.sh BINDIR WORKDIR [OUTDIR] [THREADS] [RANKS]
# BINDIR holds moecal (built --with-cuda), mpiexec and pcopy (cc -O2
# bench/pcopy.c -lpthread), with the shared libraries they need when the GPU
# machine lacks them.  SYNTH_ARGS replaces the model's sizes; BACKENDS the
# backends exported with (default "cuda cpu").
set -u
usage="usage: run-export-bench.sh BINDIR WORKDIR [OUTDIR] [THREADS] [RANKS]"
[ $# -ge 2 ] || { echo "$usage" >&2; exit 2; }
bin=$(cd "$1" && pwd) || exit 2
work=$2
out=${3:-${OUT:-.}}
threads=${4:-$(nproc)}
ranks=${5:-1}
mkdir -p "$work" "$out"
status=0

t0=$(date +%s)
if [ ! -f "$work/model/config.json" ]; then
    "$bin/moecal" synth -o "$work/model" \
        ${SYNTH_ARGS:---preset deepseek-v3-layer --layers 5 --first-dense 3 --tokens 8192} \
        --progress lines >"$out/synth.log" 2>&1 ||
        { echo "synth failed (rc $?):"; tail -n 5 "$out/synth.log"; exit 1; }
fi
echo "== synth: $(( $(date +%s) - t0 )) s; $(du -sh "$work/model" | cut -f1)"
if [ ! -f "$work/amax.h5" ]; then
    "$bin/moecal" calibrate -m "$work/model" -o "$work/amax.h5" -f --quiet \
        >"$out/calibrate.log" 2>&1 || { echo "calibrate failed:"; tail -n 5 "$out/calibrate.log"; exit 1; }
fi

shards=("$work"/model/*.safetensors)
# the read bound, then the copy bound (into the same file system)
"$bin/pcopy" -t "$threads" "${shards[@]}" | tee "$out/pread.txt"
rm -rf "$work/copy" && mkdir -p "$work/copy"
"$bin/pcopy" -t "$threads" -o "$work/copy" "${shards[@]}" | tee "$out/pcopy.txt"
rm -rf "$work/copy"
copy_rate=$(sed -n 's/.*: \([0-9.]*\) GB\/s in+out/\1/p' "$out/pcopy.txt")

first=
for b in ${BACKENDS:-cuda cpu}; do
    t0=$(date +%s%N)
    mpiexec -n "$ranks" "$bin/moecal" export -m "$work/model" --amax "$work/amax.h5" \
        -o "$work/nvfp4-$b" -f --backend "$b" --threads "$threads" -v 2 >"$out/export-$b.log" 2>&1
    rc=$?
    ms=$(( ($(date +%s%N) - t0) / 1000000 ))
    echo "== export --backend $b, $ranks rank(s) x $threads threads: rc $rc, wall $ms ms"
    grep -E "^# (rank|wrote)" "$out/export-$b.log"
    [ $rc -eq 0 ] || { tail -n 5 "$out/export-$b.log"; status=1; continue; }
    rate=$(sed -n 's/^# wrote .*(\([0-9.]*\) GB\/s in+out).*/\1/p' "$out/export-$b.log")
    echo "   $rate GB/s in+out = $(awk -v a="$rate" -v b="$copy_rate" 'BEGIN { printf "%.0f", 100 * a / b }')% of the parallel copy ($copy_rate GB/s)"
    if [ -z "$first" ]; then
        first=$b
    else
        if cmp_out=$(diff -r "$work/nvfp4-$first" "$work/nvfp4-$b" 2>&1); then
            echo "== $b and $first outputs: the same bytes"
        else
            echo "== $b and $first outputs DIFFER: $cmp_out" | head -n 5
            status=1
        fi
        rm -rf "$work/nvfp4-$b"
    fi
done
exit $status
