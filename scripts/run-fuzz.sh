#!/bin/sh
# scripts/run-fuzz.sh - run each libFuzzer target built by `make fuzz`.
#
#   scripts/run-fuzz.sh BUILDDIR SECONDS
#
# Each target (BUILDDIR/tests/fuzz/fuzz_<name>) runs SECONDS on a copy of its
# committed corpus (tests/fuzz/corpus/<name>), so that the corpus in the tree
# only changes when someone copies an input there.  A crashing input is saved
# under BUILDDIR/tests/fuzz/crashers/fuzz_<name>/ and the command to replay it
# is printed.  Exit status: 0 when no target found anything, 1 when one did,
# 2 on a usage or setup error.
#
# Environment: FUZZ_TARGETS  targets to run (default "fuzz_safetensors fuzz_config")
#              FUZZ_KEEP_CORPUS=DIR  keep each grown corpus in DIR/<target>
set -u

usage() { echo "usage: $0 BUILDDIR SECONDS" >&2; exit 2; }
[ $# -eq 2 ] || usage
case $2 in ''|*[!0-9]*) usage ;; esac
build=$(cd "$1" 2>/dev/null && pwd) || { echo "$0: no build directory $1" >&2; exit 2; }
secs=$2
top=$(cd "$(dirname "$0")/.." && pwd)
targets=${FUZZ_TARGETS:-fuzz_safetensors fuzz_config}

work=$(mktemp -d "${TMPDIR:-/tmp}/moecal-fuzz.XXXXXX") || exit 2
trap 'rm -rf "$work"' EXIT
trap 'exit 130' INT TERM

# Tokens of each input format help the fuzzer past the JSON syntax.
cat >"$work/safetensors.dict" <<'EOF'
"\"dtype\""
"\"shape\""
"\"data_offsets\""
"\"__metadata__\""
"\"format\""
"\"pt\""
"\"F8_E4M3\""
"\"F8_E5M2\""
"\"BF16\""
"\"F16\""
"\"F32\""
"\"F64\""
"\"I8\""
"\"U8\""
"\"I16\""
"\"U16\""
"\"I32\""
"\"U32\""
"\"I64\""
"\"U64\""
"\"BOOL\""
"\"F4\""
"\"F6_E2M3\""
"\"F8_E8M0\""
"\"C64\""
"18446744073709551615"
"9223372036854775807"
"4294967296"
"-1"
"null"
"\\u0000"
EOF
cat >"$work/config.dict" <<'EOF'
"\"model_type\""
"\"deepseek_v3\""
"\"qwen3_moe\""
"\"qwen2_moe\""
"\"mixtral\""
"\"hidden_size\""
"\"moe_intermediate_size\""
"\"intermediate_size\""
"\"num_hidden_layers\""
"\"n_routed_experts\""
"\"num_experts\""
"\"num_local_experts\""
"\"num_experts_per_tok\""
"\"n_group\""
"\"topk_group\""
"\"topk_method\""
"\"noaux_tc\""
"\"scoring_func\""
"\"sigmoid\""
"\"softmax\""
"\"norm_topk_prob\""
"\"routed_scaling_factor\""
"\"first_k_dense_replace\""
"\"moe_layer_freq\""
"\"decoder_sparse_step\""
"\"mlp_only_layers\""
"\"quantization_config\""
"\"quant_method\""
"\"fp8\""
"\"weight_block_size\""
"2147483648"
"-1"
"1e308"
"null"
"true"
EOF

status=0
ran=0
for t in $targets; do
    name=${t#fuzz_}
    bin=$build/tests/fuzz/$t
    if [ ! -x "$bin" ]; then
        echo "$t: not built ($bin missing): run 'make fuzz' in $build first" >&2
        status=2
        continue
    fi
    corpus=$work/corpus-$name
    mkdir -p "$corpus"
    if [ -d "$top/tests/fuzz/corpus/$name" ]; then
        cp -R "$top/tests/fuzz/corpus/$name/." "$corpus/"
    else
        echo "$t: no seed corpus in $top/tests/fuzz/corpus/$name, starting empty" >&2
    fi
    seeds=$(find "$corpus" -type f | wc -l)
    crash=$build/tests/fuzz/crashers/$t
    mkdir -p "$crash" || exit 2
    dict=
    [ -f "$work/$name.dict" ] && dict=-dict=$work/$name.dict
    log=$build/tests/fuzz/$t.log
    echo "$t: fuzzing ${secs}s from $seeds seeds (log: $log)"
    # shellcheck disable=SC2086
    "$bin" -max_total_time="$secs" -timeout=30 -rss_limit_mb=2048 -max_len=16384 \
        -print_final_stats=1 -artifact_prefix="$crash/" $dict "$corpus" >"$log" 2>&1
    rc=$?
    ran=$((ran + 1))
    runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "$log")
    rate=$(sed -n 's/^stat::average_exec_per_sec: *//p' "$log")
    rss=$(sed -n 's/^stat::peak_rss_mb: *//p' "$log")
    cov=$(sed -n 's/.*\(cov: [0-9]*\).*/\1/p' "$log" | tail -1)
    units=$(find "$corpus" -type f | wc -l)
    if [ $rc -eq 0 ]; then
        echo "$t: OK: ${runs:-?} runs (${rate:-?}/s), $cov, corpus $seeds -> $units," \
             "peak RSS ${rss:-?} MB"
    else
        status=1
        echo "$t: FAILED (libFuzzer exit $rc) after ${runs:-?} runs; last lines of $log:"
        tail -40 "$log"
        for a in "$crash"/*; do
            [ -f "$a" ] || continue
            echo "$t: crasher $a; replay: $bin $a"
        done
    fi
    if [ -n "${FUZZ_KEEP_CORPUS:-}" ]; then
        mkdir -p "$FUZZ_KEEP_CORPUS/$t" && cp -R "$corpus/." "$FUZZ_KEEP_CORPUS/$t/"
    fi
done
[ $ran -gt 0 ] || { echo "$0: no fuzz target ran" >&2; exit 2; }
exit $status
