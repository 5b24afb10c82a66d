#!/bin/bash
# tests/slurm.sh - the shipped sbatch templates on a real Slurm (slurmctld
# and slurmd of this machine on loopback): the demo job with srun, a
# two-task job with mpiexec, and a requeued job that got USR1 whose result
# equals an uninterrupted run's.
. "$srcdir/tests/testlib.sh"
. "$srcdir/tests/slurmlib.sh"
need_python_h5py
tmpl=$top_builddir/scripts/slurm
[ -x "$tmpl/moecal-node.sbatch" ] || skip "templates not built"
slurm_start

make_demo "$TMPDIR/demo"
cd "$TMPDIR" || fail "no $TMPDIR"
common="ALL,MOECAL=$MOECAL,MOECAL_MODEL=$TMPDIR/demo,MOECAL_BACKEND=cpu,MOECAL_CHUNK_TOKENS=1000,HYDRA_LAUNCHER=fork"

# 1. the demo job, srun, template defaults (4 tasks)
run sbatch --wait --export="$common,MOECAL_OUTPUT=$TMPDIR/s1.h5" -o "$TMPDIR/s1.out" \
    "$tmpl/moecal-node.sbatch" >/dev/null
grep -q "results in $TMPDIR/s1.h5" "$TMPDIR/s1.out" || { cat "$TMPDIR/s1.out"; fail "no result line"; }
check_amax schema "$TMPDIR/s1.h5"
"$PYTHON3" -c "import h5py,sys; assert int(h5py.File(sys.argv[1]).attrs['n_ranks']) == 4" \
    "$TMPDIR/s1.h5" || { cat "$TMPDIR/s1.out"; fail "the job did not run 4 ranks"; }

# 2. two tasks through mpiexec inside the allocation
run sbatch --wait --ntasks-per-node=2 --export="$common,MOECAL_LAUNCHER=mpiexec,MOECAL_OUTPUT=$TMPDIR/s2.h5" \
    -o "$TMPDIR/s2.out" "$tmpl/moecal-node.sbatch" >/dev/null
check_amax same "$TMPDIR/s1.h5" "$TMPDIR/s2.h5"

# 3. a failing job reports its status
expect_fail any sbatch --wait --export="$common,MOECAL_OUTPUT=$TMPDIR/s1.h5" -o "$TMPDIR/s3.out" \
    "$tmpl/moecal-node.sbatch"
grep -q "failed with exit status 4" "$TMPDIR/s3.out" || { cat "$TMPDIR/s3.out"; fail "no failure line"; }

# 4. requeue: USR1 to the batch script (as --signal=B:USR1 does), checkpoint,
#    exit 75, requeue, resume; the result equals an uninterrupted run's.
run sbatch --wait --export="$common,MOECAL_OUTPUT=$TMPDIR/u.h5" -o "$TMPDIR/u.out" \
    "$tmpl/moecal-node.sbatch" >/dev/null
id=$(sbatch --parsable --export="$common,MOECAL_OUTPUT=$TMPDIR/q.h5,MOECAL_TEST_CHUNK_DELAY_MS=300,MOECAL_CHECKPOINT_EVERY=3" \
    -o "$TMPDIR/q.out" "$tmpl/moecal-requeue.sbatch") || fail "sbatch failed"
for _ in $(seq 150); do [ -e "$TMPDIR/q.ckpt.h5" ] && break; sleep 0.2; done
[ -e "$TMPDIR/q.ckpt.h5" ] || { cat "$TMPDIR/q.out"; fail "no checkpoint from the requeue job"; }
scancel --signal=USR1 --batch "$id" || fail "scancel --signal failed"
# the requeued run must not be slowed down
for _ in $(seq 100); do grep -q "requeueing" "$TMPDIR/q.out" 2>/dev/null && break; sleep 0.2; done
grep -q "requeueing" "$TMPDIR/q.out" || { cat "$TMPDIR/q.out"; fail "the job was not requeued"; }
slurm_wait_job "$id" 600
[ "$(slurm_job_state "$id")" = COMPLETED ] || { cat "$TMPDIR/q.out"; fail "requeued job state $(slurm_job_state "$id")"; }
grep -q "resuming from" "$TMPDIR/q.out" || { cat "$TMPDIR/q.out"; fail "the requeued run did not resume"; }
check_amax identical "$TMPDIR/u.h5" "$TMPDIR/q.h5"
exit 0
