#!/usr/bin/env bash
# Stop the test Slurm cluster started by tests/cluster/start.sh.
#
# Usage:  tests/cluster/stop.sh [STATE_DIR]
#         STATE_DIR defaults to $TLWF_SLURM_DIR, else /tmp/tlwf-slurm.
#
# Only processes recorded in STATE_DIR/run/*.pid are signalled (TERM, a
# bounded wait, then KILL), plus job-step daemons that hold this cluster's log
# dir open, with their job processes.  The state dir itself is kept (see
# start.sh); `rm -rf STATE_DIR` afterwards for a clean slate.  env.sh is
# removed so nothing sources a dead cluster.  Safe to run when nothing runs.
set -euo pipefail

STATE=${1:-${TLWF_SLURM_DIR:-/tmp/tlwf-slurm}}
case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac
RUN=$STATE/run
WAIT=${TLWF_SLURM_STOP_WAIT:-15}   # seconds to wait after TERM before KILL

log() { printf '[tlwf-slurm] %s\n' "$*" >&2; }

if [[ ! -d $STATE ]]; then
    log "no state dir $STATE; nothing to stop"
    exit 0
fi

# running PID: alive and not a zombie.  (Daemons are children of PID 1, which
# may reap them lazily; a zombie has already exited.)
running() {
    kill -0 "$1" 2>/dev/null || return 1
    local stat
    stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
    stat=${stat##*) }          # field 3 (state) follows "(comm) "
    [[ ${stat%% *} != Z ]]
}

# recorded_pid NAME: print the PID in $RUN/NAME.pid if that process is alive
# and really is NAME (a stale pidfile may point at a reused PID).
recorded_pid() {
    local f=$RUN/$1.pid pid
    # slurmd-NODE.pid: one slurmd per node, each a process named slurmd.
    local comm=${1%%-*}
    [[ -s $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [[ -n $pid ]] && running "$pid" || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    echo "$pid"
}

# terminate NAME...: TERM the recorded daemons together, wait up to $WAIT s
# for all of them, then KILL the stragglers.
terminate() {
    local name pid pids=() deadline=$((SECONDS + WAIT))
    for name in "$@"; do
        if pid=$(recorded_pid "$name"); then
            log "stopping $name ($pid)"
            kill -TERM "$pid" 2>/dev/null && pids+=("$pid")
        fi
        rm -f "$RUN/$name.pid"
    done
    for pid in "${pids[@]}"; do
        while running "$pid"; do
            if ((SECONDS >= deadline)); then
                log "PID $pid ignored TERM for ${WAIT}s; sending KILL"
                kill -KILL "$pid" 2>/dev/null || true
                break
            fi
            sleep 0.1
        done
    done
}

# 1. Cancel whatever is still queued/running so job steps end cleanly while
#    slurmctld and slurmd are still there to handle it.
# Every slurmd this cluster recorded (one per node).
slurmds=()
for f in "$RUN"/slurmd-*.pid; do
    [[ -e $f ]] && f=${f##*/} && slurmds+=("${f%.pid}")
done
if [[ -f $STATE/etc/slurm.conf ]] && recorded_pid slurmctld >/dev/null \
        && ((${#slurmds[@]})) && recorded_pid "${slurmds[0]}" >/dev/null; then
    export SLURM_CONF=$STATE/etc/slurm.conf
    jobs=$(timeout 10 squeue -h -o %A 2>/dev/null || true)
    if [[ -n $jobs ]]; then
        log "cancelling jobs: $(echo $jobs)"
        # shellcheck disable=SC2086
        timeout 10 scancel $jobs 2>/dev/null || true
        deadline=$((SECONDS + 10))
        while [[ -n $(timeout 10 squeue -h -t R,CG -o %A 2>/dev/null || true) ]] \
                && ((SECONDS < deadline)); do
            sleep 0.2
        done
    fi
fi

# 2. Daemons, in reverse start order; ones that don't depend on each other
#    go down together (each takes a second or two to exit).
terminate "${slurmds[@]}" slurmctld
terminate slurmdbd           # after slurmctld: it flushes accounting to slurmdbd
terminate mariadbd munged    # after slurmdbd

# 3. Leftover job-step daemons of this cluster (slurmd does not take its
#    slurmstepd processes down with it, e.g. if slurmctld was already gone and
#    jobs could not be cancelled).  slurmstepd keeps slurmd's log open, which
#    identifies it as ours; kill it together with its job's process tree.
descendants() {   # print all descendant PIDs of $1
    local child
    for child in $(ps -o pid= --ppid "$1" 2>/dev/null); do
        echo "$child"
        descendants "$child"
    done
}
# pgrep only lists candidates; each is checked before it is killed by PID.
for pid in $(pgrep -x slurmstepd || true); do
    if ls -l "/proc/$pid/fd" 2>/dev/null | grep -qF -- "-> $STATE/log/"; then
        tree=$(descendants "$pid")
        # Orphaned steps have nobody left to report to, and slurmstepd
        # ignores TERM: KILL the step daemon and the job's processes at once.
        log "killing leftover slurmstepd ($pid) and its job processes ($(echo $tree))"
        kill -KILL "$pid" $tree 2>/dev/null || true
    fi
done

rm -f "$STATE/env.sh"
log "stopped (state kept in $STATE)"
