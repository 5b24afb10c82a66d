#!/bin/bash
# tests/special_files.sh - every file moecal reads, replaced in turn by a
# FIFO, a character device, a directory and a symbolic link loop: each run
# must end within 10 s (a FIFO never blocks a rank, /dev/zero is never read
# forever) with the documented exit class (2 for a conf file, 3 for an input
# of the wrong kind, 4 for one that cannot be opened) and a message that
# names the path, and must leave no output.
#
# The file kinds moecal opens, and where each is covered here:
#   conf file (--config)               calibrate --config
#   config.json, the index, a shard    calibrate -m / export -m / inspect
#   activation file                    calibrate -a
#   checkpoint to resume               calibrate --resume (OUT.ckpt.h5)
#   amax file                          report, compare, export --amax
# A new file kind gets a line in cases() below.
. "$srcdir/tests/testlib.sh"

T=$TMPDIR
run "$MOECAL" synth -o "$T/m" --preset tiny >/dev/null
run_mpi 2 "$MOECAL" calibrate -m "$T/m" -o "$T/good.h5" --backend cpu --quiet
export MPIEXEC_TIMEOUT=20

# make_special KIND PATH: PATH becomes a FIFO, /dev/zero, a directory or a
# symlink loop (the original moved aside to PATH.orig)
make_special() {
    local kind=$1 p=$2
    [ -e "$p" ] && mv "$p" "$p.orig"
    case $kind in
    fifo) mkfifo "$p" ;;
    chardev) ln -s /dev/zero "$p" ;;
    dir) mkdir "$p" ;;
    loop) ln -s "$p" "$p" ;;   # a link to itself: ELOOP
    esac
}

restore() {
    local p=$1
    rm -rf "$p"
    [ -e "$p.orig" ] && mv "$p.orig" "$p"
    true
}

# check KIND PATH CODES OUT CMD...: CMD ends within 10 s, with an exit
# status among CODES, names PATH, and leaves no OUT
check() {
    local kind=$1 p=$2 codes=$3 out=$4 rc t0
    shift 4
    make_special "$kind" "$p"
    t0=$(date +%s)
    timeout 15 "$@" >"$T/stdout" 2>"$T/stderr"
    rc=$?
    restore "$p"
    [ $(( $(date +%s) - t0 )) -le 10 ] || fail "$kind $p: took more than 10 s: $*"
    case " $codes " in *" $rc "*) ;; *)
        fail "$kind $p: exit status $rc, expected one of $codes: $* ($(cat "$T/stderr"))" ;;
    esac
    grep -qF "$(basename "$p")" "$T/stderr" ||
        fail "$kind $p: the message does not name it: $(cat "$T/stderr")"
    if [ -n "$out" ] && ls -d "$out" "$out".* 2>/dev/null | grep -v "\.lock$" | grep -q .; then
        fail "$kind $p: left $(ls -d "$out"*)"
    fi
}

M=$T/m
for kind in fifo chardev dir loop; do
    printf '[calibrate]\nchunk-tokens = 64\n' >"$T/c.conf"
    check $kind "$T/c.conf" "2" "$T/o1.h5" \
        $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/o1.h5" --backend cpu --config "$T/c.conf"
    check $kind "$M/config.json" "3 4" "$T/o2.h5" \
        $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/o2.h5" --backend cpu
    check $kind "$M/model-00001-of-00001.safetensors" "3 4" "$T/o3.h5" \
        $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/o3.h5" --backend cpu
    check $kind "$M/model.safetensors.index.json" "3 4" "$T/o4.h5" \
        $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/o4.h5" --backend cpu
    check $kind "$M/activations.h5" "3 4" "$T/o5.h5" \
        $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/o5.h5" --backend cpu
    check $kind "$T/good.h5" "3 4" "" "$MOECAL" report "$T/good.h5"
    cp "$T/good.h5" "$T/other.h5"
    check $kind "$T/good.h5" "3 4" "" "$MOECAL" compare "$T/good.h5" "$T/other.h5"
    check $kind "$T/good.h5" "3 4" "$T/x" \
        $MPIEXEC -n 2 "$MOECAL" export -m "$M" --amax "$T/good.h5" -o "$T/x"
    check $kind "$M/config.json" "3 4" "$T/x" \
        $MPIEXEC -n 2 "$MOECAL" export -m "$M" --amax "$T/other.h5" -o "$T/x"
    check $kind "$M/model.safetensors.index.json" "3 4" "" "$MOECAL" inspect "$M"
done

# A checkpoint to resume that is a FIFO or a directory: the newest valid one
# is used, the others are reported and skipped, never read.
for kind in fifo dir; do
    rm -f "$T/r.h5"*
    make_special $kind "$T/r.ckpt.h5"
    timeout 15 $MPIEXEC -n 2 "$MOECAL" calibrate -m "$M" -o "$T/r.h5" --backend cpu --resume \
        >"$T/stdout" 2>"$T/stderr"
    rc=$?
    restore "$T/r.ckpt.h5"
    [ $rc -eq 0 ] || fail "resume with a $kind checkpoint: exit $rc ($(cat "$T/stderr"))"
    grep -q "r.ckpt.h5: the checkpoint is a" "$T/stderr" ||
        fail "resume with a $kind checkpoint: not reported: $(cat "$T/stderr")"
done
exit 0
