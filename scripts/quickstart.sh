#!/bin/bash
# scripts/quickstart.sh - from a fresh Debian 12 machine to a first calibration.
#
# Installs the missing Debian packages (as root; otherwise prints the
# apt-get line and stops), builds moecal in ./build, and runs the main job:
# 4 MPI ranks calibrating the built-in demo model in 8 chunks of 512 tokens,
# so that the report shows how the amax converge, then the report and the
# plots of the result.
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
    echo "== moecal calibrate on $ranks ranks (demo model, 8 chunks of 512 tokens)"
    "$mpiexec" -n "$ranks" "$moecal" calibrate --demo-dir "$out/demo" -o "$out/amax.h5" \
        --chunk-tokens 512 --force
    "$moecal" inspect "$out/amax.h5"
    echo "== moecal report"
    "$moecal" report "$out/amax.h5" | tee "$out/report.txt"
    if python3 -c 'import h5py, numpy, matplotlib' 2>/dev/null; then
        echo "== moecal-plot"
        python3 "$top/scripts/moecal-plot" heatmap "$out/amax.h5" -o "$out/plots"
        python3 "$top/scripts/moecal-plot" history "$out/amax.h5" --layer 1 \
            --experts 0,1,2,3 -o "$out/plots/history-layer1.png"
    fi
fi
echo
echo "Results are in $out"
ls -l "$out"
