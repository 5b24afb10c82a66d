#!/bin/bash
# tests/determinism.sh - the same numbers for 1-4 ranks, 1 and 2 (fake) nodes
# and two chunk sizes: x and weight amax and token counts bit-identical, w2
# within GEMM rounding.
. "$srcdir/tests/testlib.sh"
need_python_h5py

make_demo "$TMPDIR/demo"
cal() { local n=$1 out=$2; shift 2
        run_mpi "$n" "$MOECAL" calibrate --backend cpu --quiet -m "$TMPDIR/demo" -o "$out" "$@"; }
cal 1 "$TMPDIR/p1.h5"
for n in 2 3 4; do
    cal $n "$TMPDIR/p$n.h5"
    check_amax same "$TMPDIR/p1.h5" "$TMPDIR/p$n.h5"
done
MOECAL_FAKE_NODES=2 cal 4 "$TMPDIR/n2.h5"
check_amax same "$TMPDIR/p1.h5" "$TMPDIR/n2.h5"
"$PYTHON3" -c "import h5py,sys; f=h5py.File(sys.argv[1]); assert int(f.attrs['n_nodes'])==2" \
    "$TMPDIR/n2.h5" || fail "2 fake nodes not recorded"
MOECAL_FAKE_NODES=3 cal 3 "$TMPDIR/n3.h5" --chunk-tokens 1000
check_amax same "$TMPDIR/p1.h5" "$TMPDIR/n3.h5"
cal 2 "$TMPDIR/c.h5" --chunk-tokens 777
check_amax same "$TMPDIR/p1.h5" "$TMPDIR/c.h5"
# More ranks than experts: a rank with no expert still takes part.
run "$MOECAL" synth --preset tiny --experts 3 --groups 1 --topk-groups 1 --topk 2 \
    --never-routed 1 -o "$TMPDIR/tiny" >/dev/null
run_mpi 1 "$MOECAL" calibrate --backend cpu --quiet -m "$TMPDIR/tiny" -o "$TMPDIR/t1.h5"
run_mpi 4 "$MOECAL" calibrate --backend cpu --quiet -m "$TMPDIR/tiny" -o "$TMPDIR/t4.h5" --chunk-tokens 100
check_amax same "$TMPDIR/t1.h5" "$TMPDIR/t4.h5"
exit 0
