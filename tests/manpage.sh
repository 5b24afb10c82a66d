#!/bin/bash
# tests/manpage.sh - every option of every command (as its --help lists
# them) is documented in the man page source, doc/moecal.1.in.
. "$srcdir/tests/testlib.sh"

man=$srcdir/doc/moecal.1.in
missing=
for cmd in calibrate synth inspect topo compare report export; do
    "$MOECAL" $cmd --help >"$TMPDIR/help" || fail "moecal $cmd --help failed"
    for opt in $(sed -n 's/^ *\(-[a-zA-Z], \)\{0,1\}--\([a-z0-9-]*\).*/\2/p' "$TMPDIR/help"); do
        esc=$(printf '%s' "$opt" | sed 's/-/\\-/g')
        grep -qF -- "\\-\\-$esc" "$man" || missing="$missing $cmd:--$opt"
    done
done
[ -z "$missing" ] || fail "options missing from doc/moecal.1.in:$missing"
exit 0
