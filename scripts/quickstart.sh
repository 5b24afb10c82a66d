#!/bin/bash
# scripts/quickstart.sh - from a fresh Debian 12 machine to a first calibration.
#
# Installs the missing Debian packages (as root; otherwise prints the
# apt-get line and stops), builds moecal in ./build, and runs the main job:
# 4 MPI ranks calibrating the built-in demo model.
#   QUICKSTART_RANKS=N   ranks (default 4)
#   QUICKSTART_OUT=DIR   where results go (default ./quickstart-out)
set -eu
top=$(cd "$(dirname "$0")/.." && pwd)
ranks=${QUICKSTART_RANKS:-4}
out=${QUICKSTART_OUT:-$PWD/quickstart-out}

"$top/scripts/deps.sh"
cd "$top"
[ -x configure ] || autoreconf -fi
mkdir -p build
cd build
[ -f Makefile ] || "$top/configure" --prefix="$top/build/install"
make -j"$(nproc)"
moecal=$PWD/src/moecal
mpiexec=$(sed -n "s/^MPIEXEC='\(.*\)'/\1/p" tests/mpi-env.sh)
export HYDRA_LAUNCHER=${HYDRA_LAUNCHER:-fork}
mkdir -p "$out"

echo "== moecal topo on $ranks ranks"
"$mpiexec" -n "$ranks" "$moecal" topo | tee "$out/topo.txt"
if "$moecal" calibrate --help >/dev/null 2>&1 && "$moecal" synth --help >/dev/null 2>&1 &&
   ! "$moecal" calibrate --print-config 2>&1 | grep -q 'not built'; then
    echo "== moecal calibrate on $ranks ranks (demo model)"
    "$mpiexec" -n "$ranks" "$moecal" calibrate --demo-dir "$out/demo" -o "$out/amax.h5" --force
    "$moecal" inspect "$out/amax.h5" || true
fi
echo
echo "Results are in $out"
ls -l "$out"
