#!/bin/bash
# tests/cli.sh - the command line: --help, --version, option sources and precedence.
. "$srcdir/tests/testlib.sh"

run "$MOECAL" --version >"$TMPDIR/v"
grep -q "^moecal [0-9]" "$TMPDIR/v" || fail "--version prints no version"
grep -q "^build: .*hdf5=.*hwloc=.*cuda=" "$TMPDIR/v" || fail "--version prints no build options"
run "$MOECAL" --help >"$TMPDIR/h"
for c in calibrate synth inspect topo compare report; do
    grep -q "^  $c " "$TMPDIR/h" || fail "--help does not list '$c'"
done

# Every option of calibrate is listed with its default.
run "$MOECAL" calibrate --help >"$TMPDIR/ch"
for o in model activations output chunk-tokens calib-all-experts quant-format layers backend nonfinite; do
    grep -Eq -- "--$o .*\[default: " "$TMPDIR/ch" || fail "calibrate --help lacks --$o with a default"
done

# Precedence: command line > environment > conf file > default.
pc() { "$MOECAL" calibrate "$@" --print-config; }
pc >"$TMPDIR/p0" || fail "--print-config failed"
grep -Eq '^chunk-tokens +\= 4096 +# default' "$TMPDIR/p0" || fail "default not shown: $(grep chunk "$TMPDIR/p0")"
pc --config "$srcdir/tests/data/good.conf" >"$TMPDIR/p1"
grep -Eq "^chunk-tokens += 1234 +# .*good.conf:6" "$TMPDIR/p1" || fail "conf value/line not shown: $(grep chunk "$TMPDIR/p1")"
grep -Eq "^quant-format += fp8 " "$TMPDIR/p1" || fail "conf quant-format not applied"
MOECAL_CHUNK_TOKENS=2k pc --config "$srcdir/tests/data/good.conf" >"$TMPDIR/p2"
grep -Eq "^chunk-tokens += 2k +# environment \(MOECAL_CHUNK_TOKENS\)" "$TMPDIR/p2" || fail "env does not beat conf"
MOECAL_CHUNK_TOKENS=2k pc --config "$srcdir/tests/data/good.conf" -c 99 >"$TMPDIR/p3"
grep -Eq "^chunk-tokens += 99 +# command line" "$TMPDIR/p3" || fail "command line does not beat env"
MOECAL_CONFIG="$srcdir/tests/data/good.conf" pc >"$TMPDIR/p4"
grep -Eq "^chunk-tokens += 1234 " "$TMPDIR/p4" || fail "MOECAL_CONFIG not read"
pc --no-bind >"$TMPDIR/p5"
grep -Eq "^bind += 0 +# command line" "$TMPDIR/p5" || fail "--no-bind not applied"

# The same through several ranks: rank 0 prints once.
run_mpi 2 "$MOECAL" calibrate --print-config >"$TMPDIR/p6"
[ "$(grep -c '^chunk-tokens' "$TMPDIR/p6")" = 1 ] || fail "print-config printed by several ranks"
exit 0
