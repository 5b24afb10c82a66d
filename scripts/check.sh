#!/bin/bash
# scripts/check.sh - install what is missing, build out of tree, run the tests.
#
#   scripts/check.sh              build in ./build-check, run make check
#   CHECK_DISTCHECK=1 scripts/check.sh   also make distcheck
#   CHECK_FUZZ_SECONDS=N          fuzz each target N seconds (default 60; 0 = off)
#   CHECK_CONFIGURE_FLAGS="..."   extra configure flags
#   CHECK_PYENV=DIR               the venv with torch and transformers for the
#                                 Hugging Face tests (default ./.check-pyenv,
#                                 made from tests/requirements-hf.txt, reused)
#   CHECK_HF=0                    do not make it: those tests then skip
#
# The last line is always "tests: N passed, N failed, N skipped"; the exit
# status is non-zero if anything failed.
set -u
top=$(cd "$(dirname "$0")/.." && pwd)
build=${CHECK_BUILDDIR:-$top/build-check}
jobs=$(nproc 2>/dev/null || echo 2)
pass=0; failn=0; skipn=0
summary() { echo "tests: $pass passed, $failn failed, $skipn skipped"; }
die() { echo "check.sh: $*" >&2; failn=$((failn + 1)); summary; exit 1; }

"$top/scripts/deps.sh" --with-fuzz --with-slurm || die "missing Debian packages (see above)"

cd "$top" || die "cannot enter $top"

# torch and transformers from PyPI for the tests that run Hugging Face models
# (about 2 minutes the first time; the venv is reused while the pins match).
if [ "${CHECK_HF:-1}" != 0 ]; then
    pyenv=${CHECK_PYENV:-$top/.check-pyenv}
    req=$top/tests/requirements-hf.txt
    if ! cmp -s "$req" "$pyenv/requirements-hf.txt" 2>/dev/null; then
        t0=$(date +%s)
        rm -rf "$pyenv"
        { /usr/bin/python3 -m venv "$pyenv" &&
          "$pyenv/bin/pip" install -q --disable-pip-version-check -r "$req" &&
          cp "$req" "$pyenv/requirements-hf.txt"; } ||
            die "cannot install tests/requirements-hf.txt into $pyenv (no network? CHECK_HF=0 skips those tests)"
        echo "check.sh: installed torch and transformers into $pyenv in $(( $(date +%s) - t0 )) s"
    fi
    export CAPTURE_PYTHON=$pyenv/bin/python
fi
autoreconf -fi >/dev/null 2>&1 || { autoreconf -fi; die "autoreconf failed"; }
rm -rf "$build"; mkdir -p "$build"; cd "$build" || die "cannot create $build"
# Build with CUDA when nvcc is there (CI has nvcc, no GPU: GPU tests skip).
"$top/configure" ${CHECK_CONFIGURE_FLAGS:-} >configure.out 2>&1 || { cat configure.out; die "configure failed"; }
sed -n '/^moecal .* configuration/,$p' configure.out
make -j"$jobs" >make.out 2>&1 || { tail -50 make.out; die "make failed"; }

make -j"$jobs" check >check.out 2>&1
check_rc=$?
# Count the Automake harness's results.
for f in $(find . -name '*.trs'); do
    r=$(sed -n 's/^:test-result: //p' "$f")
    case $r in
    PASS|XFAIL) pass=$((pass + 1)) ;;
    SKIP) skipn=$((skipn + 1)) ;;
    *) failn=$((failn + 1)); echo "--- failed: ${f%.trs}"; tail -30 "${f%.trs}.log" ;;
    esac
done
grep -E '^(PASS|FAIL|SKIP|ERROR|XFAIL|XPASS):' check.out
[ $check_rc -eq 0 ] || [ $failn -gt 0 ] || { tail -40 check.out; failn=$((failn + 1)); }

# Fuzz each target for a bounded time when clang can build them.
fz=${CHECK_FUZZ_SECONDS:-60}
if [ "$fz" -gt 0 ] && grep -q '^fuzz:' Makefile 2>/dev/null; then
    if make fuzz >fuzz.out 2>&1; then
        if "$top/scripts/run-fuzz.sh" "$build" "$fz" >fuzz-run.out 2>&1; then
            pass=$((pass + 1)); echo "PASS: fuzz (${fz}s per target)"
        else
            failn=$((failn + 1)); echo "FAIL: fuzz"; tail -30 fuzz-run.out
        fi
    else
        skipn=$((skipn + 1)); echo "SKIP: fuzz (targets did not build)"; tail -5 fuzz.out
    fi
fi

if [ "${CHECK_DISTCHECK:-0}" = 1 ]; then
    if make -j"$jobs" distcheck >distcheck.out 2>&1; then
        pass=$((pass + 1)); echo "PASS: distcheck"
    else
        failn=$((failn + 1)); echo "FAIL: distcheck"; tail -40 distcheck.out
    fi
fi
summary
[ $failn -eq 0 ]
