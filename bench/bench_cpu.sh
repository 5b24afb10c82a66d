#!/bin/bash
# bench/bench_cpu.sh - throughput of the CPU backend, and the GEMM share of
# its time against OpenBLAS's own sgemm rate measured in the same run.
#   bench/bench_cpu.sh BUILDDIR [RANKS]
# Writes a table to stdout (copy it into BENCHMARKS.md with date and commit).
set -eu
build=$(cd "${1:?usage: bench_cpu.sh BUILDDIR [RANKS]}" && pwd)
ranks=${2:-1}
moecal=$build/src/moecal
src=$(cd "$(dirname "$0")/.." && pwd)
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-$(nproc)} HYDRA_LAUNCHER=fork

mpicc -O2 -o "$work/sgemm_rate" "$src/bench/sgemm_rate.c" $(pkg-config --cflags --libs openblas)

run_case() { # name synth-options...
    local name=$1; shift
    "$moecal" synth -o "$work/$name" "$@" >/dev/null
    local t0 t1
    t0=$(date +%s.%N)
    mpiexec -n "$ranks" "$moecal" calibrate --backend cpu -m "$work/$name" -o "$work/$name.h5" \
        --verbose 2 --chunk-tokens 4096 >"$work/$name.out" 2>"$work/$name.err"
    t1=$(date +%s.%N)
    local H I E k T
    read -r H I E k T < <(/usr/bin/python3 -c "
import json,sys; c=json.load(open('$work/$name/config.json')); s=json.load(open('$work/$name/synth.json'))
print(c['hidden_size'], c['moe_intermediate_size'], c['n_routed_experts'], c['num_experts_per_tok'], s.get('tokens', 0))")
    echo "== $name: H=$H I=$I E=$E k=$k, $ranks rank(s), $OMP_NUM_THREADS threads"
    grep -E "^# (wrote|rank 0 time)" "$work/$name.err" || true
    # per-expert GEMM shape at the mean routed count per chunk
    local m=$(( 4096 * k / E ))
    [ $m -gt 0 ] || m=1
    "$work/sgemm_rate" $m "$H" $((2 * I))
    echo "wall: $(echo "$t1 - $t0" | bc) s"
}
run_case demo --preset demo
run_case larger --preset demo --hidden 1024 --intermediate 512 --experts 64 --topk 8 --groups 8 --topk-groups 4 --tokens 8192 --layers 2 --first-dense 1
