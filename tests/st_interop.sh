#!/bin/bash
# tests/st_interop.sh - the official `safetensors` Python package reads what
# `moecal synth` writes (FP8 and BF16 checkpoints, several shards), byte for
# byte, and moecal reads the same bytes (weight amax of every expert).
#
# The package comes from $PYTHON3 if it has it, else it is installed with pip
# into a virtual environment under $TMPDIR (seeing the system's numpy and
# h5py); without network access to a package index the test is skipped.
. "$srcdir/tests/testlib.sh"
need_python_h5py

py=$PYTHON3
if ! "$py" -c 'import safetensors' 2>/dev/null; then
    "$PYTHON3" -m venv --system-site-packages "$TMPDIR/venv" >"$TMPDIR/venv.log" 2>&1 ||
        skip "$PYTHON3 cannot make a virtual environment (python3-venv missing?)"
    "$TMPDIR/venv/bin/python" -m pip install --quiet --disable-pip-version-check safetensors \
        >>"$TMPDIR/venv.log" 2>&1 ||
        skip "pip cannot install safetensors (offline?): $(tail -1 "$TMPDIR/venv.log")"
    py=$TMPDIR/venv/bin/python
fi
"$py" -c 'import safetensors, numpy, h5py' || skip "safetensors, numpy and h5py do not import together"

# FP8 with several shards; BF16 in one shard; an odd hidden size.
run "$MOECAL" synth --preset demo --tokens 512 --shard-size 5M -o "$TMPDIR/fp8" -q
run "$MOECAL" synth --preset tiny --dtype bf16 --hidden 200 -o "$TMPDIR/bf16" -q
for m in fp8 bf16; do
    run_mpi 2 "$MOECAL" calibrate --backend cpu --quiet -m "$TMPDIR/$m" -o "$TMPDIR/$m.h5"
    run "$py" "$srcdir/tests/st_interop.py" "$TMPDIR/$m" "$TMPDIR/$m.h5"
done
exit 0
