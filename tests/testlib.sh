# tests/testlib.sh - helpers for moecal's shell test scenarios.
#
# Sourced by every tests/*.sh.  Provides:
#   $MOECAL     the moecal binary under test
#   $MPIEXEC    the MPI launcher configure found
#   $TMPDIR     a private scratch directory, removed on success
#   run_mpi N CMD...   run CMD on N ranks (oversubscribed is fine); on failure
#                      print the exact command to rerun it
#   run CMD...         the same for a plain command
#   expect_fail CODE CMD...   CMD must exit with CODE (or non-zero if CODE is "any")
#   fail MSG / skip MSG (exit 77)
set -u

: "${srcdir:=.}"
: "${MOECAL:=$PWD/src/moecal}"
if [ -n "${MOECAL_TEST_ENV:-}" ] && [ -f "$MOECAL_TEST_ENV" ]; then
    . "$MOECAL_TEST_ENV"
fi
: "${MPIEXEC:=mpiexec}"
: "${PYTHON3:=python3}"
export HYDRA_LAUNCHER=fork          # no ssh/rsh inside a test
export MPIEXEC_TIMEOUT="${MPIEXEC_TIMEOUT:-300}"   # never hang a test run
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-1}"
export OPENBLAS_NUM_THREADS="${OPENBLAS_NUM_THREADS:-1}"

test_name=$(basename "$0" .sh)
TMPDIR=$(mktemp -d "${TMPDIR:-/tmp}/moecal-$test_name.XXXXXX")
export TMPDIR
trap 'rc=$?; if [ $rc -eq 0 ] || [ $rc -eq 77 ]; then rm -rf "$TMPDIR"; else echo "kept $TMPDIR" >&2; fi' EXIT

fail() { echo "FAIL: $test_name: $*" >&2; exit 1; }
skip() { echo "SKIP: $test_name: $*" >&2; exit 77; }

_show() { printf '%q ' "$@"; }

run() {
    "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "FAIL: $test_name: command exited with $rc; rerun with:" >&2
        echo "  $(_show "$@")" >&2
        exit 1
    fi
}

run_mpi() {
    local n=$1; shift
    [ "$MPIEXEC" != no ] || skip "no MPI launcher"
    $MPIEXEC -n "$n" "$@"
    local rc=$?
    if [ $rc -ne 0 ]; then
        echo "FAIL: $test_name: $n-rank run exited with $rc; rerun with:" >&2
        echo "  $(_show env MOECAL_FAKE_NODES="${MOECAL_FAKE_NODES:-}" $MPIEXEC -n "$n" "$@")" >&2
        exit 1
    fi
}

# expect_fail CODE CMD...: CMD must fail (with exit status CODE unless "any");
# its stderr is kept in $TMPDIR/stderr for grep.
expect_fail() {
    local want=$1; shift
    "$@" >"$TMPDIR/stdout" 2>"$TMPDIR/stderr"
    local rc=$?
    if [ $rc -eq 0 ] || { [ "$want" != any ] && [ $rc -ne "$want" ]; }; then
        echo "FAIL: $test_name: expected exit status $want, got $rc from:" >&2
        echo "  $(_show "$@")" >&2
        cat "$TMPDIR/stderr" >&2
        exit 1
    fi
}

# expect_msg REGEX: the last expect_fail's stderr matches REGEX.
expect_msg() {
    grep -Eq -- "$1" "$TMPDIR/stderr" || {
        echo "FAIL: $test_name: stderr does not match '$1':" >&2
        cat "$TMPDIR/stderr" >&2
        exit 1
    }
}

# Python with h5py and numpy, or skip.
need_python_h5py() {
    "$PYTHON3" -c 'import h5py, numpy' 2>/dev/null || skip "$PYTHON3 lacks h5py/numpy"
}

# A demo-preset model and its activations in $1 (synthesized once per test).
make_demo() {
    local dir=$1; shift
    run "$MOECAL" synth --preset demo -o "$dir" "$@" >/dev/null
}

# check_amax SUBCOMMAND ARGS...: assertions of tests/check_amax.py.
check_amax() {
    need_python_h5py
    run "$PYTHON3" "$srcdir/tests/check_amax.py" "$@"
}
