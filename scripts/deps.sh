#!/bin/sh
# scripts/deps.sh - the Debian packages moecal needs, installed when missing.
#
#   scripts/deps.sh [--print] [--with-slurm] [--with-fuzz]
#
# As root it runs apt-get; otherwise it prints the exact apt-get line and
# exits 1.  --print only prints the missing packages.
set -eu

pkgs="build-essential autoconf automake libtool pkg-config
mpich libmpich-dev libhdf5-mpich-dev hdf5-tools libhwloc-dev hwloc
libopenblas-dev libjansson-dev libcmocka-dev
python3 python3-venv python3-h5py python3-numpy python3-matplotlib"
print_only=no
for a in "$@"; do
    case $a in
    --print) print_only=yes ;;
    --with-slurm) pkgs="$pkgs slurm-wlm munge" ;;
    --with-fuzz) pkgs="$pkgs clang libclang-rt-dev" ;;
    *) echo "usage: $0 [--print] [--with-slurm] [--with-fuzz]" >&2; exit 2 ;;
    esac
done

missing=
for p in $pkgs; do
    if ! dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed"; then
        missing="$missing $p"
    fi
done
[ -n "$missing" ] || exit 0
if [ "$print_only" = yes ]; then
    echo "$missing"
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    echo "moecal: these Debian packages are missing; as root run:" >&2
    echo "  apt-get install -y --no-install-recommends$missing" >&2
    exit 1
fi
echo "moecal: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -q >/dev/null
# shellcheck disable=SC2086
apt-get install -y -q --no-install-recommends $missing >/dev/null
