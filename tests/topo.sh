#!/bin/bash
# tests/topo.sh - `moecal topo`: placements planned on XML and synthetic
# topologies, compared with the golden outputs in tests/topo/.  Nothing is
# bound on these topologies, so the test runs oversubscribed on any machine.
#
# After an intended change of the output, regenerate the golden files with
#   make check TESTS=tests/topo.sh MOECAL_REGEN_GOLDEN=1
# (or MOECAL_REGEN_GOLDEN=1 srcdir=. MOECAL=build/src/moecal bash tests/topo.sh)
# and review the diff.
. "$srcdir/tests/testlib.sh"

topo_dir=$srcdir/tests/topo
xml=$topo_dir/2pkg-4gpu.xml
[ -r "$xml" ] || fail "missing $xml"
[ "$MPIEXEC" != no ] || skip "no MPI launcher"

# Nothing from the caller's environment may change the plan.
unset HWLOC_XMLFILE HWLOC_SYNTHETIC HWLOC_COMPONENTS HWLOC_FSROOT HWLOC_CPUID_PATH \
      HWLOC_THISSYSTEM CUDA_VISIBLE_DEVICES CUDA_DEVICE_ORDER MOECAL_FAKE_NODES \
      MOECAL_CONFIG MOECAL_BIND MOECAL_JSON
# Host names are part of the output: fix them.
export MOECAL_HOSTNAME=node0

# golden NAME NRANKS [VAR=VALUE...] [-- TOPO-OPTION...]
# Run `moecal topo` on NRANKS ranks with the variables set, and compare its
# standard output with tests/topo/NAME (paths under tests/topo/ shortened).
golden() {
    local name=$1 n=$2 out
    shift 2
    local vars=() opts=()
    while [ $# -gt 0 ] && [ "$1" != -- ]; do vars+=("$1"); shift; done
    [ $# -gt 0 ] && shift
    opts=("$@")
    out=$TMPDIR/$name
    run_mpi "$n" env "${vars[@]}" "$MOECAL" topo "${opts[@]}" >"$out.raw"
    sed "s|$topo_dir/||g" "$out.raw" >"$out"
    if [ "${MOECAL_REGEN_GOLDEN:-0}" = 1 ]; then
        cp "$out" "$topo_dir/$name" || fail "cannot write $topo_dir/$name"
        echo "regenerated $topo_dir/$name"
        return
    fi
    [ -f "$topo_dir/$name" ] \
        || fail "no golden file $topo_dir/$name (MOECAL_REGEN_GOLDEN=1 makes it)"
    if ! diff -u "$topo_dir/$name" "$out" >&2; then
        echo "rerun: $(_show "$MPIEXEC" -n "$n" env "${vars[@]}" "$MOECAL" topo "${opts[@]}")" >&2
        fail "$name: output differs from the golden file (above)"
    fi
}

# The 4-GPU XML: 2 packages x 2 NUMA nodes x 8 cores; GPUs 0000:1b (NUMA 0),
# 0000:43 (NUMA 1), 0000:c3 (NUMA 2), 0000:9d (NUMA 3): PCI order, which is
# CUDA's, is not tree order on the second package.
golden xml-1.out 1 HWLOC_XMLFILE="$xml"
golden xml-2.out 2 HWLOC_XMLFILE="$xml"
golden xml-4.out 4 HWLOC_XMLFILE="$xml"
golden xml-8.out 8 HWLOC_XMLFILE="$xml"
golden xml-visible23-2.out 2 HWLOC_XMLFILE="$xml" CUDA_VISIBLE_DEVICES=2,3
golden xml-visible-cut-2.out 2 HWLOC_XMLFILE="$xml" CUDA_VISIBLE_DEVICES=1,7,2
golden xml-uuid-3.out 3 HWLOC_XMLFILE="$xml" CUDA_VISIBLE_DEVICES=GPU-5c1a,GPU-77e0
golden xml-fake2-4.out 4 HWLOC_XMLFILE="$xml" MOECAL_FAKE_NODES=2
golden synthetic-4.out 4 HWLOC_SYNTHETIC="pack:2 numa:2 core:4 pu:1"
golden synthetic-shared-3.out 3 HWLOC_SYNTHETIC="pack:1 core:2 pu:1"
golden xml-4.json 4 HWLOC_XMLFILE="$xml" -- --json

# The same properties checked without the golden files: distinct core sets,
# each on the NUMA node of its GPU; two ranks per GPU split its cores.
check_json() {
    "$PYTHON3" - "$1" "$2" <<'EOF' || fail "$1: JSON placement checks failed"
import json, sys
path, nranks = sys.argv[1], int(sys.argv[2])
numa_of_gpu = {"0000:1b:00.0": 0, "0000:43:00.0": 1, "0000:c3:00.0": 2, "0000:9d:00.0": 3}
def cpus(text):
    out = set()
    for part in text.split(","):
        lo, _, hi = part.partition("-")
        out.update(range(int(lo), int(hi or lo) + 1))
    return out
ranks = json.load(open(path))
assert [r["rank"] for r in ranks] == list(range(nranks)), "ranks missing or out of order"
seen = set()
for r in ranks:
    c = cpus(r["cpuset"])
    assert c and not (c & seen), f"rank {r['rank']}: cores {r['cpuset']} empty or shared"
    seen |= c
    node = numa_of_gpu[r["gpu_bus_id"]]
    assert r["numa"] == node, f"rank {r['rank']}: NUMA {r['numa']}, its GPU is on {node}"
    assert c <= set(range(8 * node, 8 * node + 8)), f"rank {r['rank']}: cores not local"
    assert r["gpu"] == r["node_rank"] % 4 and r["ranks_per_gpu"] == nranks // 4
    assert r["bound"] is False and r["notes"] == []
    assert len(c) == 8 // (nranks // 4)
EOF
}
for n in 4 8; do
    run_mpi $n env HWLOC_XMLFILE="$xml" "$MOECAL" topo --json >"$TMPDIR/p$n.json"
    check_json "$TMPDIR/p$n.json" $n
done

# This machine: ranks are bound (or told why not) and the table says so;
# --no-bind plans only.
run_mpi 2 "$MOECAL" topo >"$TMPDIR/here"
grep -q "^# moecal topo: 2 ranks on 1 node, topology: this system$" "$TMPDIR/here" \
    || fail "unexpected header: $(head -1 "$TMPDIR/here")"
[ "$(grep -c '^# *[0-9]' "$TMPDIR/here")" = 2 ] || fail "expected 2 rank lines"
grep -Eq '^# +1 +node0 +1 +[0-9]' "$TMPDIR/here" || fail "rank 1 line malformed"
run_mpi 2 "$MOECAL" topo --no-bind >"$TMPDIR/nobind"
[ "$(grep -Ec '^# +[0-9].* no$' "$TMPDIR/nobind")" = 2 ] || fail "--no-bind still bound"

# Errors name what is wrong and exit with the usage status, on one line.
expect_fail 2 $MPIEXEC -n 2 env MOECAL_FAKE_NODES=3 "$MOECAL" topo
expect_msg "MOECAL_FAKE_NODES='3'"
[ "$(grep -c 'moecal: error' "$TMPDIR/stderr")" = 1 ] || fail "error reported more than once"
expect_fail 2 $MPIEXEC -n 1 env MOECAL_FAKE_NODES=0 "$MOECAL" topo
expect_msg "MOECAL_FAKE_NODES='0'"
expect_fail 2 $MPIEXEC -n 2 env HWLOC_XMLFILE="$TMPDIR/missing.xml" "$MOECAL" topo
expect_msg "HWLOC_XMLFILE=.*missing.xml"
expect_fail 2 $MPIEXEC -n 1 env HWLOC_SYNTHETIC="pack:2 core:2" "$MOECAL" topo
expect_msg "HWLOC_SYNTHETIC"
expect_fail 2 $MPIEXEC -n 1 env MOECAL_HOSTNAME="two words" "$MOECAL" topo
expect_msg "MOECAL_HOSTNAME"
expect_fail 2 "$MOECAL" topo extra-argument
expect_msg "unexpected argument 'extra-argument'"
exit 0
