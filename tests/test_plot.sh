#!/bin/bash
# tests/test_plot.sh - scripts/moecal-plot draws every picture from a
# synthetic amax file (tests/make_amax.py) and, where the calibration engine
# runs, from a real demo run; each PNG must exist, weigh more than 10 KB and
# not be a single colour.  Skipped without matplotlib.
. "$srcdir/tests/testlib.sh"
need_python_h5py
"$PYTHON3" -c 'import matplotlib' 2>/dev/null || skip "$PYTHON3 lacks matplotlib"
export MPLCONFIGDIR="$TMPDIR/mplconfig"   # never write to the user's home

T=$TMPDIR
PLOT="$srcdir/scripts/moecal-plot"
mk() { run "$PYTHON3" "$srcdir/tests/make_amax.py" "$@"; }

# check_png FILE...: exists, > 10 KB, more than one colour once decoded.
check_png() {
    local f
    for f in "$@"; do
        [ -f "$f" ] || fail "$f was not written"
        [ "$(wc -c <"$f")" -gt 10240 ] || fail "$f is 10 KB or less"
    done
    "$PYTHON3" - "$@" <<'PY' || fail "a picture is blank"
import sys
import matplotlib
matplotlib.use("Agg")
import matplotlib.image as mpimg
import numpy as np
for path in sys.argv[1:]:
    img = mpimg.imread(path)
    px = img.reshape(-1, img.shape[-1]) if img.ndim == 3 else img.reshape(-1, 1)
    colours = np.unique(px, axis=0).shape[0]
    if colours < 16:
        sys.exit(f"{path}: {colours} distinct colours: a blank picture")
    print(f"{path}: {img.shape[1]}x{img.shape[0]}, {colours} colours")
PY
}

mk never "$T/never.h5"
mk late "$T/late.h5"
mk pair "$T/a.h5" "$T/b.h5"
run "$PYTHON3" "$PLOT" heatmap "$T/never.h5" -o "$T/heat" >/dev/null
check_png "$T/heat/input_amax.png" "$T/heat/weight_amax.png" "$T/heat/tokens.png"
run "$PYTHON3" "$PLOT" heatmap "$T/a.h5" --dataset input_amax -o "$T/heat-final" >/dev/null
check_png "$T/heat-final/input_amax.png"
run "$PYTHON3" "$PLOT" history "$T/late.h5" --layer 2 --experts 0,5,9,12 -o "$T/history.png" >/dev/null
run "$PYTHON3" "$PLOT" history "$T/never.h5" --layer 1 --experts 3,12,0 --x tokens --log \
    -o "$T/history-never.png" >/dev/null
check_png "$T/history.png" "$T/history-never.png"
run "$PYTHON3" "$PLOT" scatter "$T/a.h5" "$T/b.h5" -o "$T/scatter.png" >/dev/null
check_png "$T/scatter.png"

# Bad input and usage: exit 3 naming the file and dataset; 2 for usage.
mk topk "$T/nohist.h5" --drop input_amax_history
expect_fail 3 "$PYTHON3" "$PLOT" history "$T/nohist.h5" --layer 1 --experts 0 -o "$T/x.png"
expect_msg "nohist\.h5: dataset 'input_amax_history' missing"
mk topk "$T/mixtral.h5" --model-type mixtral
expect_fail 3 "$PYTHON3" "$PLOT" scatter "$T/a.h5" "$T/mixtral.h5" -o "$T/x.png"
expect_msg "not from the same model"
expect_fail 2 "$PYTHON3" "$PLOT" history "$T/late.h5" --layer 7 --experts 0 -o "$T/x.png"
expect_msg "--layer 7: .* has the MoE layers \[1, 2, 3\]"
expect_fail 2 "$PYTHON3" "$PLOT" history "$T/late.h5" --layer 1 --experts 0,99 -o "$T/x.png"
expect_msg "out of range"
[ ! -e "$T/x.png" ] || fail "a failed plot left a file behind"

# A real demo run, when the calibration engine works.
if "$MOECAL" synth --preset demo -o "$T/demo" >/dev/null 2>&1 &&
   $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$T/demo" -o "$T/top.h5" --quiet \
       >/dev/null 2>&1 &&
   $MPIEXEC -n 2 "$MOECAL" calibrate --backend cpu -m "$T/demo" --calib-all-experts \
       -o "$T/all.h5" --quiet >/dev/null 2>&1; then
    L0=$("$PYTHON3" -c 'import sys,h5py; print(int(h5py.File(sys.argv[1])["layers"][0]))' "$T/top.h5")
    run "$PYTHON3" "$PLOT" heatmap "$T/top.h5" -o "$T/demo-heat" >/dev/null
    run "$PYTHON3" "$PLOT" history "$T/top.h5" --layer "$L0" --experts 0,1,2 \
        -o "$T/demo-history.png" >/dev/null
    run "$PYTHON3" "$PLOT" scatter "$T/top.h5" "$T/all.h5" -o "$T/demo-scatter.png" >/dev/null
    check_png "$T/demo-heat/input_amax.png" "$T/demo-heat/tokens.png" \
        "$T/demo-history.png" "$T/demo-scatter.png"
else
    echo "note: moecal calibrate did not run; pictures of a real run not checked" >&2
fi
exit 0
