#!/bin/bash
# tests/plan.sh - `moecal calibrate --plan` against real runs: the bytes each
# rank reads are exact and its peak host memory within 10% (the demo and a
# DeepSeek-V3-shaped synth, 2 ranks); the plan reads no data and writes
# nothing; a model directory with its config.json alone is planned from the
# config's shapes, with the same bytes as from the safetensors headers.
. "$srcdir/tests/testlib.sh"
[ "$MPIEXEC" != no ] || skip "no MPI launcher"

# rank 0's figures: plan (weight bytes, token bytes, host bytes) and the
# -v 2 line of a real run (tokens, weights, peak host memory)
plan_rank0() { awk '$1 == "0" && $2 == "0" && NF == 8 { print $4, $5, $6 }' "$1"; }
real_rank0() {
    sed -n 's/.*reads: tokens \([0-9]*\) bytes.*weights \([0-9]*\) bytes.*peak host memory \([0-9]*\) bytes.*/\2 \1 \3/p' "$1"
}
compare() { # NAME ARGS...: plan and run with ARGS on 2 ranks
    local name=$1; shift
    run_mpi 2 "$MOECAL" calibrate --backend cpu --threads 1 --quiet --plan \
        -o "$TMPDIR/$name.h5" "$@" >"$TMPDIR/$name.plan"
    [ ! -e "$TMPDIR/$name.h5" ] || fail "--plan wrote $name.h5"
    run_mpi 2 "$MOECAL" calibrate --backend cpu --threads 1 -v 2 -o "$TMPDIR/$name.h5" "$@" \
        >"$TMPDIR/$name.log" 2>&1
    read -r pw pt ph <<<"$(plan_rank0 "$TMPDIR/$name.plan")"
    read -r rw rt rh <<<"$(real_rank0 "$TMPDIR/$name.log")"
    [ -n "$pw" ] && [ -n "$rw" ] || fail "$name: no figures (plan '$pw', run '$rw')"
    [ "$pw" = "$rw" ] || fail "$name: plan reads $pw weight bytes, the run $rw"
    [ "$pt" = "$rt" ] || fail "$name: plan reads $pt token bytes, the run $rt"
    awk -v p="$ph" -v r="$rh" 'BEGIN { d = (p - r) / r; if (d < 0) d = -d; exit !(d <= 0.10) }' ||
        fail "$name: plan holds $ph host bytes, the run peaked at $rh"
    echo "$name: weights $pw, tokens $pt bytes exact; host $ph planned, $rh peak"
}

make_demo "$TMPDIR/demo"
compare demo -m "$TMPDIR/demo" --chunk-tokens 1000
run "$MOECAL" synth -o "$TMPDIR/ds" --preset deepseek-v3-layer --experts 16 --groups 4 \
    --topk-groups 2 --tokens 1536 \
    --quiet
compare ds -m "$TMPDIR/ds" --chunk-tokens 1024

# config.json alone: the same bytes from the config's shapes
mkdir -p "$TMPDIR/cfg"
cp "$TMPDIR/ds/config.json" "$TMPDIR/cfg/"
run_mpi 2 "$MOECAL" calibrate --backend cpu --threads 1 --quiet --plan -m "$TMPDIR/cfg" \
    --max-tokens 1536 --chunk-tokens 1024 >"$TMPDIR/cfg.plan"
grep -q "sizes from config.json" "$TMPDIR/cfg.plan" || fail "config-only plan: $(cat "$TMPDIR/cfg.plan")"
read -r cw ct _ <<<"$(plan_rank0 "$TMPDIR/cfg.plan")"
read -r dw dt _ <<<"$(plan_rank0 "$TMPDIR/ds.plan")"
[ "$cw $ct" = "$dw $dt" ] || fail "config-only plan: $cw $ct bytes, from the headers $dw $dt"

# another job's shape: 4 nodes of 8 ranks, from one process
run "$MOECAL" calibrate --backend cpu --quiet --plan -m "$TMPDIR/cfg" --max-tokens 1M \
    --plan-nodes 4 --plan-ranks-per-node 8 >"$TMPDIR/big.plan"
[ "$(awk '$1 ~ /^[0-9]+$/ && NF == 11' "$TMPDIR/big.plan" | wc -l)" -eq 4 ] || fail "not 4 nodes"
[ "$(awk '$1 ~ /^[0-9]+$/ && NF == 8' "$TMPDIR/big.plan" | wc -l)" -eq 32 ] || fail "not 32 ranks"
grep -q "predicted wall" "$TMPDIR/big.plan" || fail "no prediction"

# what the plan needs
expect_fail 2 "$MOECAL" calibrate --plan
expect_msg "--plan needs --model"
expect_fail any "$MOECAL" calibrate --plan -m "$TMPDIR/cfg"
expect_msg "max-tokens"
exit 0
