#!/bin/bash
# tests/fixup.sh - tests/test_fixup on 1 to 4 ranks (ranks with 0 to 3
# experts): the peer-max fixup alone, without an end-to-end run.
. "$srcdir/tests/testlib.sh"
for n in 1 2 3 4; do
    run_mpi $n ./tests/test_fixup >"$TMPDIR/out" 2>&1 || { cat "$TMPDIR/out"; exit 1; }
done
exit 0
