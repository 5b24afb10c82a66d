#!/bin/bash
# tests/manpage.sh - the built man page, doc/moecal.1, lists every option of
# every command (as its --help lists them) in that command's section, and
# no placeholder of doc/moecal.1.in is left in it.
. "$srcdir/tests/testlib.sh"

man=$top_builddir/doc/moecal.1
[ -f "$man" ] || fail "$man was not built"
grep -q '@[A-Z_]*@' "$man" && fail "placeholder left in $man: $(grep -o '@[A-Z_]*@' "$man" | head -1)"
missing=
for cmd in calibrate synth inspect topo compare report export; do
    "$MOECAL" $cmd --help >"$TMPDIR/help" || fail "moecal $cmd --help failed"
    # the command's section: from its .SS line to the next section
    sed -n "/^\\.SS \"moecal $cmd\"/,/^\\.S[SH]/p" "$man" >"$TMPDIR/section"
    [ -s "$TMPDIR/section" ] || fail "no section for moecal $cmd in $man"
    for opt in $(sed -n 's/^ *\(-[a-zA-Z], \)\{0,1\}--\([a-z0-9-]*\).*/\2/p' "$TMPDIR/help"); do
        case $opt in config|print-config|help) continue ;; esac  # common to all, in OPTIONS
        esc=$(printf '%s' "$opt" | sed 's/-/\\-/g')
        grep -qF -- "\\fB\\-\\-$esc\\fR" "$TMPDIR/section" || missing="$missing $cmd:--$opt"
    done
done
[ -z "$missing" ] || fail "options missing from $man:$missing"
# and the man page names the ones every command takes
for opt in config print-config help; do
    grep -qF -- "\\-\\-$(printf '%s' "$opt" | sed 's/-/\\-/g')" "$man" || fail "$man lacks --$opt"
done
exit 0
