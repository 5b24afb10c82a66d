#!/bin/bash
# tests/readers.sh - the token readers (tokens.h): any number of reader
# threads, the direct (pread) path and the HDF5 path, give bit-identical
# results, also when T divides neither the readers nor the chunk and when a
# node leader's part of a chunk is empty; a file cut short while the job
# reads it stops every rank with an error that names it, and no output.
. "$srcdir/tests/testlib.sh"
need_python_h5py
[ "$MPIEXEC" != no ] || skip "no MPI launcher"

# 4099 tokens: chunks of 1000 leave 99, which 4 readers split unevenly
make_demo "$TMPDIR/m" --tokens 4099
cal() { local n=$1; shift; run_mpi "$n" "$MOECAL" calibrate --backend cpu --quiet --threads 1 \
        -m "$TMPDIR/m" "$@"; }
cal 2 -o "$TMPDIR/r1.h5" --chunk-tokens 1000 --readers 1
for r in 2 3 7; do
    cal 2 -o "$TMPDIR/r$r.h5" --chunk-tokens 1000 --readers $r
    check_amax identical "$TMPDIR/r1.h5" "$TMPDIR/r$r.h5"
done
# 3 fake nodes: three leaders split each chunk; with chunks of 4097 the last
# holds 2 rows, so one leader reads nothing
MOECAL_FAKE_NODES=3 cal 3 -o "$TMPDIR/f3.h5" --chunk-tokens 1000 --readers 3
check_amax identical "$TMPDIR/r1.h5" "$TMPDIR/f3.h5"
cal 1 -o "$TMPDIR/big1.h5" --chunk-tokens 4097 --readers 1
MOECAL_FAKE_NODES=3 cal 3 -o "$TMPDIR/big3.h5" --chunk-tokens 4097 --readers 5
check_amax identical "$TMPDIR/big1.h5" "$TMPDIR/big3.h5"

# The HDF5 path: the same activations compressed (no direct reads)
command -v h5repack >/dev/null || skip "no h5repack (hdf5-tools)"
mkdir -p "$TMPDIR/z"
cp "$TMPDIR/m"/*.json "$TMPDIR/m"/*.safetensors "$TMPDIR/z/"
run h5repack -f GZIP=1 "$TMPDIR/m/activations.h5" "$TMPDIR/z/activations.h5"
run_mpi 2 "$MOECAL" calibrate --backend cpu --threads 1 -v 2 -m "$TMPDIR/z" \
    -o "$TMPDIR/z.h5" --chunk-tokens 1000 --readers 3 >"$TMPDIR/z.log" 2>&1
grep -q "needs HDF5 to read it" "$TMPDIR/z.log" || fail "the compressed file was not read by HDF5"
grep -q "reads: tokens .*1 reader;" "$TMPDIR/z.log" || fail "no read statistics: $(cat "$TMPDIR/z.log")"
check_amax identical "$TMPDIR/r1.h5" "$TMPDIR/z.h5"

# float32 activations: converted to bf16 the same way on both paths
make_demo "$TMPDIR/f" --tokens 2500 --act-dtype f32
run_mpi 2 "$MOECAL" calibrate --backend cpu --quiet --threads 1 -m "$TMPDIR/f" \
    -o "$TMPDIR/f_direct.h5" --chunk-tokens 700 --readers 4
mkdir -p "$TMPDIR/fz"
cp "$TMPDIR/f"/*.json "$TMPDIR/f"/*.safetensors "$TMPDIR/fz/"
run h5repack -f GZIP=1 "$TMPDIR/f/activations.h5" "$TMPDIR/fz/activations.h5"
run_mpi 2 "$MOECAL" calibrate --backend cpu --quiet --threads 1 -m "$TMPDIR/fz" \
    -o "$TMPDIR/f_hdf5.h5" --chunk-tokens 700
check_amax identical "$TMPDIR/f_direct.h5" "$TMPDIR/f_hdf5.h5"

# Cut short while in use: every rank stops, the error names the file
cp -r "$TMPDIR/m" "$TMPDIR/t"
MOECAL_TEST_CHUNK_DELAY_MS=150 $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu --quiet \
    --threads 1 -m "$TMPDIR/t" -o "$TMPDIR/t.h5" --chunk-tokens 500 --readers 3 \
    2>"$TMPDIR/t.err" &
pid=$!
sleep 1
truncate -s $(( $(stat -c %s "$TMPDIR/t/activations.h5") / 3 )) "$TMPDIR/t/activations.h5"
t0=$(date +%s)
wait $pid
rc=$?
t1=$(date +%s)
[ $rc -ne 0 ] || fail "the job exited 0 reading a truncated file"
[ $((t1 - t0)) -le 60 ] || fail "the job took $((t1 - t0))s to stop"
grep -q "t/activations.h5.*truncated" "$TMPDIR/t.err" || fail "no clear error: $(cat "$TMPDIR/t.err")"
[ ! -e "$TMPDIR/t.h5" ] || fail "an output was left"
echo "truncated file: exit $rc after $((t1 - t0))s: $(head -n 1 "$TMPDIR/t.err")"
exit 0
