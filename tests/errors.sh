#!/bin/bash
# tests/errors.sh - bad options and conf files: clear message, non-zero exit,
# no hang, on one and on several ranks.
. "$srcdir/tests/testlib.sh"

expect_fail 2 "$MOECAL" calibrate --bogus
expect_msg "unknown option '--bogus' for 'moecal calibrate'"
expect_msg "^moecal: error: rank 0 \("
expect_fail 2 "$MOECAL" calibrate -Z
expect_msg "unknown option '-Z'"
expect_fail 2 "$MOECAL" calibrate --chunk-tokens
expect_msg "needs a value"
expect_fail 2 "$MOECAL" calibrate --chunk-tokens abc
expect_msg "option 'chunk-tokens' takes an integer"
expect_fail 2 "$MOECAL" calibrate --chunk-tokens 0
expect_msg "must be between 1 and"
expect_fail 2 "$MOECAL" calibrate --backend gpu
expect_msg "must be one of cpu\|cuda\|auto, not 'gpu'"
expect_fail 2 env MOECAL_QUANT_FORMAT=int4 "$MOECAL" calibrate --print-config
expect_msg "environment \(MOECAL_QUANT_FORMAT\): option 'quant-format' must be one of"
expect_fail 2 "$MOECAL" calibrate --config "$srcdir/tests/data/bad-key.conf"
expect_msg "bad-key.conf:3: unknown key 'chunk-tokenz' for 'moecal calibrate'"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR/does-not-exist.conf"
expect_msg "does-not-exist.conf: cannot open conf file"
printf '[calibrate]\nchunk-tokens = 12x\n' >"$TMPDIR/badval.conf"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR/badval.conf"
expect_msg "badval.conf:2: option 'chunk-tokens' takes an integer"
printf '[calibrat]\nchunk-tokens = 12\n' >"$TMPDIR/badsec.conf"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR/badsec.conf"
expect_msg "badsec.conf:2: unknown section \[calibrat\]"
printf 'no equals sign here\n' >"$TMPDIR/syntax.conf"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR/syntax.conf"
expect_msg "syntax.conf:1: syntax error"
# Conf lines of any length (long HPC paths), the right line for an error,
# a directory refused.
long=/scratch/$(printf 'p%.0s' $(seq 1 700))/model
printf '; long\n[calibrate]\nmodel = %s ; inline comment\nchunk-tokens = 12x\n' "$long" \
    >"$TMPDIR/long.conf"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR/long.conf"
expect_msg "long.conf:4: option 'chunk-tokens' takes an integer"
printf '[calibrate]\nmodel = %s ; inline comment\n' "$long" >"$TMPDIR/long.conf"
"$MOECAL" calibrate --config "$TMPDIR/long.conf" --print-config >"$TMPDIR/pc" ||
    fail "a long conf line refused"
grep -q "^model  *= $long  *# .*long.conf:2" "$TMPDIR/pc" || fail "long value not read whole"
expect_fail 2 "$MOECAL" calibrate --config "$TMPDIR"
expect_msg "the conf file is a directory, not a regular file"
expect_fail 2 "$MOECAL" frobnicate
expect_msg "unknown command 'frobnicate'"

# Several ranks: every rank stops, one message, the same exit status.
[ "$MPIEXEC" != no ] || skip "no MPI launcher"
expect_fail 2 $MPIEXEC -n 3 "$MOECAL" calibrate --bogus
[ "$(grep -c "unknown option '--bogus'" "$TMPDIR/stderr")" = 1 ] || fail "expected one message from rank 0"

# Ranks that see different settings (an environment that differs between
# nodes) stop at once, naming the option, even for --print-config.
printf '#!/bin/sh\n[ "${PMI_RANK:-0}" = 1 ] && export MOECAL_CHUNK_TOKENS=512 MOECAL_THREADS=3\nexec "$@"\n' \
    >"$TMPDIR/envdiff.sh"
chmod +x "$TMPDIR/envdiff.sh"
expect_fail 2 $MPIEXEC -n 3 "$TMPDIR/envdiff.sh" "$MOECAL" calibrate --print-config
expect_msg "rank 1 .*option 'chunk-tokens' is '512' here \(environment \(MOECAL_CHUNK_TOKENS\)\) but '4096' on rank 0"
expect_fail 2 $MPIEXEC -n 2 "$TMPDIR/envdiff.sh" "$MOECAL" export -m x --amax y -o z
expect_msg "option .threads. is .3. here"
# A value only one rank finds wrong: every rank stops, that rank says why
printf '#!/bin/sh\n[ "${PMI_RANK:-0}" = 1 ] && export MOECAL_THREADS=abc\nexec "$@"\n' \
    >"$TMPDIR/envbad.sh"
chmod +x "$TMPDIR/envbad.sh"
expect_fail 2 $MPIEXEC -n 3 "$TMPDIR/envbad.sh" "$MOECAL" calibrate --print-config
expect_msg "rank 1 .*MOECAL_THREADS.*takes an integer"
exit 0
