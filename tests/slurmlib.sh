# tests/slurmlib.sh - a private Slurm cluster of this one machine, on
# loopback, for the Slurm scenarios.  Needs root, slurm-wlm and munge; tests
# skip (77) where it cannot start.  Sourced after tests/testlib.sh.
#   slurm_start     start munged, slurmctld and slurmd under $TMPDIR/slurm
#   slurm_stop      stop them (also on exit)
#   slurm_wait_job ID [SECONDS]   wait until job ID has ended; prints its state
SLURM_DIR=$TMPDIR/slurm

slurm_stop() {
    local f
    for f in slurmd slurmctld munged; do
        [ -f "$SLURM_DIR/$f.pid" ] && kill "$(cat "$SLURM_DIR/$f.pid")" 2>/dev/null
    done
    sleep 1
}

slurm_start() {
    [ "$(id -u)" -eq 0 ] || skip "Slurm tests need root"
    command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null ||
        skip "slurm-wlm or munge not installed (scripts/deps.sh --with-slurm)"
    local host port cpus
    host=$(hostname -s)
    # ports of our own, so several test runs do not meet
    port=$((20000 + ($$ % 20000)))
    mkdir -p "$SLURM_DIR"/{state,spool,log}
    chmod 700 "$SLURM_DIR"
    mungekey -c -k "$SLURM_DIR/munge.key" -f 2>/dev/null || dd if=/dev/urandom of="$SLURM_DIR/munge.key" bs=1024 count=1 2>/dev/null
    chmod 600 "$SLURM_DIR/munge.key"
    munged --force --key-file="$SLURM_DIR/munge.key" --socket="$SLURM_DIR/munge.sock" \
        --pid-file="$SLURM_DIR/munged.pid" --log-file="$SLURM_DIR/log/munged.log" \
        --seed-file="$SLURM_DIR/munge.seed" 2>"$SLURM_DIR/log/munged.err" ||
        skip "munged does not start: $(cat "$SLURM_DIR/log/munged.err")"
    cat >"$SLURM_DIR/slurm.conf" <<CONF
ClusterName=moecaltest
SlurmctldHost=$host
SlurmctldPort=$port
SlurmdPort=$((port + 1))
AuthType=auth/munge
AuthInfo=socket=$SLURM_DIR/munge.sock
CryptoType=crypto/munge
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
SlurmdParameters=config_overrides
GresTypes=gpu
MpiDefault=none
JobRequeue=1
ReturnToService=2
StateSaveLocation=$SLURM_DIR/state
SlurmdSpoolDir=$SLURM_DIR/spool
SlurmctldPidFile=$SLURM_DIR/slurmctld.pid
SlurmdPidFile=$SLURM_DIR/slurmd.pid
SlurmctldLogFile=$SLURM_DIR/log/slurmctld.log
SlurmdLogFile=$SLURM_DIR/log/slurmd.log
KillWait=10
MinJobAge=600
InactiveLimit=0
NodeName=$host NodeHostname=$host NodeAddr=127.0.0.1 CPUs=32 Sockets=2 CoresPerSocket=16 ThreadsPerCore=1 RealMemory=2000 Gres=gpu:4 State=UNKNOWN
PartitionName=test Nodes=$host Default=YES MaxTime=INFINITE State=UP
CONF
    # Four fake GPUs: Slurm only keeps GPUs that have a device file; nothing
    # here opens them (no cgroup device constraint).
    : >"$SLURM_DIR/gres.conf"
    for dev in /dev/null /dev/zero /dev/full /dev/urandom; do
        echo "NodeName=$host Name=gpu File=$dev" >>"$SLURM_DIR/gres.conf"
    done
    export SLURM_CONF=$SLURM_DIR/slurm.conf
    trap 'rc=$?; slurm_stop; if [ $rc -eq 0 ] || [ $rc -eq 77 ]; then rm -rf "$TMPDIR"; else echo "kept $TMPDIR" >&2; fi' EXIT
    slurmctld -f "$SLURM_CONF" -i 2>"$SLURM_DIR/log/slurmctld.err" || skip "slurmctld does not start"
    slurmd -f "$SLURM_CONF" 2>"$SLURM_DIR/log/slurmd.err" || skip "slurmd does not start: $(tail -3 "$SLURM_DIR/log/slurmd.err")"
    for _ in $(seq 60); do
        sinfo -h -o %t 2>/dev/null | grep -qE '^(idle|mix|alloc)' && return 0
        sleep 1
    done
    tail -n 5 "$SLURM_DIR/log/slurmctld.log" "$SLURM_DIR/log/slurmd.log" >&2
    skip "the Slurm node did not become idle"
}

# slurm_wait_job ID [SECONDS]: until the job is gone from the queue.
slurm_wait_job() {
    local id=$1 limit=${2:-600} t=0
    while [ $t -lt "$limit" ]; do
        squeue -h -j "$id" 2>/dev/null | grep -q . || return 0
        sleep 2
        t=$((t + 2))
    done
    fail "job $id still queued or running after ${limit}s"
}

slurm_job_state() {
    scontrol show job "$1" 2>/dev/null | sed -n 's/.*JobState=\([A-Z_]*\).*/\1/p'
}
