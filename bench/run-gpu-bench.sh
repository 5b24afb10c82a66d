#!/bin/bash
# bench/run-gpu-bench.sh - on a GPU machine: the conformance suite
# (test_backends) and the CUDA backend's comparison test against the CPU
# backend, compute-sanitizer (memcheck, racecheck, synccheck) on small cases,
# then the benchmark.  Logs go to OUTDIR; a short
# table is printed last.
#   bench/run-gpu-bench.sh BINDIR [OUTDIR] [bench options...]
# BINDIR holds test_backends, test_backend_cuda and bench_cuda (built on the
# build machine, copied with the shared libraries they need when the GPU
# machine lacks them).
set -u
bin=$(cd "${1:?usage: run-gpu-bench.sh BINDIR [OUTDIR] [bench options]}" && pwd)
out=${2:-${OUT:-.}}
shift $(( $# >= 2 ? 2 : 1 ))
mkdir -p "$out"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4}

q=name,pci.bus_id,driver_version,memory.total,clocks.sm,clocks.max.sm,temperature.gpu,power.draw
nvidia-smi --query-gpu=$q --format=csv >"$out/gpu.txt" 2>&1
t0=$(date +%s)
"$bin/test_backends" >"$out/test.log" 2>&1
rc_test=$?
"$bin/test_backend_cuda" >>"$out/test.log" 2>&1
rc=$?
[ $rc_test -ne 0 ] || rc_test=$rc
t1=$(date +%s)

# Small cases under the sanitizers (a filter per run: cmocka test names of
# test_backend_cuda, or of test_backends after "backends:", where "?" stands
# for the space in "cuda: case").
# Each case gets SAN_TIMEOUT seconds (default 240; racecheck of the FP64
# router kernels takes minutes): a case cut off is logged as such, and the
# run goes on to the next one instead of losing the whole job's time.
san() { # tool case...
    local tool=$1 rc=0 c r; shift
    for c in "$@"; do
        local prog=test_backend_cuda
        case $c in backends:*) prog=test_backends c=${c#backends:} ;; esac
        timeout "${SAN_TIMEOUT:-240}" compute-sanitizer --tool "$tool" --error-exitcode 9 \
            ${SAN_EXTRA:-} "$bin/$prog" "$c" >>"$out/$tool.log" 2>&1
        r=$?
        [ $r -ne 124 ] || echo "== $tool $c: cut off after ${SAN_TIMEOUT:-240} s (not a failure)" \
            >>"$out/$tool.log"
        [ $r -eq 0 ] || [ $r -eq 124 ] || rc=$r
    done
    echo $rc
}
rc_mem=$(SAN_EXTRA="--leak-check full" san memcheck test_deepseek_odd_shapes \
    test_deepseek_h200_i72 test_skip_rows test_all_experts 'backends:cuda:?empty_range_and_chunk' \
    test_async_misuse 'backends:cuda:?nonfinite_weights_refused' test_memory_limit_and_device \
    test_fp8_weights test_dgemm_router_exactness test_many_slots test_logit_precisions \
    test_nvfp4_quantizer)
rc_race=$(san racecheck test_deepseek_odd_shapes test_deepseek_h200_i72 test_all_experts \
    test_dgemm_router_exactness test_many_slots test_logit_precisions test_nvfp4_quantizer)
rc_sync=$(san synccheck test_deepseek_odd_shapes test_all_experts test_many_slots)
t2=$(date +%s)

"$bin/bench_cuda" "$@" >"$out/bench.log" 2>&1
rc_bench=$?
t3=$(date +%s)

echo "== test_backends, test_backend_cuda (rc $rc_test, $((t1 - t0)) s)"
grep -E "^\[  (PASSED|FAILED|  ERROR|   LINE) |FAILED TEST|skipped" "$out/test.log" | head -20
for t in memcheck racecheck synccheck; do
    sum=$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$out/$t.log" | sort | uniq -c | tr '\n' ' ')
    echo "== compute-sanitizer $t: $sum"
    grep -h "cut off" "$out/$t.log" || true
done
echo "   (memcheck rc $rc_mem, racecheck rc $rc_race, synccheck rc $rc_sync, $((t2 - t1)) s)"
echo "== bench_cuda (rc $rc_bench, $((t3 - t2)) s)"
tail -n 40 "$out/bench.log"
