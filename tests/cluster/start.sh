#!/usr/bin/env bash
# Start a throwaway Slurm cluster on loopback (127.0.0.1 only) for the test
# suite and CI: munged -> MariaDB -> slurmdbd -> (sacctmgr setup) -> slurmctld
# -> slurmd.  Must be run as root (all daemons run as root).  Its one real node
# is shaped like an Expanse GPU node; a second, smaller one (its own slurmd on
# this machine, `slurmd -N`) exists for multi-node job steps only: it is in no
# partition but `multinode`.
# Every daemon is addressed as 127.0.0.1; MariaDB always binds only there,
# the Slurm daemons too whenever `hostname` resolves to loopback (see below).
#
# Usage:  tests/cluster/start.sh [STATE_DIR]
#         STATE_DIR defaults to $TLWF_SLURM_DIR, else /tmp/tlwf-slurm.
#         Afterwards:  source STATE_DIR/env.sh   (exports SLURM_CONF etc.)
#         Stop with:   tests/cluster/stop.sh [STATE_DIR]
#
# State-dir policy: the state dir is REUSED across restarts.  Config files are
# regenerated on every start; the munge key, the MariaDB datadir (accounting
# DB, associations) and slurmctld's node/partition state are kept, so a
# restart is fast.  Jobs are NOT carried over (stop.sh cancels them; start.sh
# drops slurmctld's job state), but job ids keep increasing across restarts
# (FirstJobId follows the accounting DB), so sacct -j never matches two jobs.
# Set TLWF_SLURM_FRESH=1 to wipe the state dir first (refused while any daemon
# recorded there is still running).
#
# Idempotent: a daemon whose recorded PID is alive is left alone; running the
# script twice in a row is a no-op apart from rewriting identical configs.
#
# Tunables (env):  TLWF_SLURMCTLD_PORT (6817)  TLWF_SLURMD_PORT (6818)
#                  TLWF_SLURMDBD_PORT (6819)   TLWF_MYSQL_PORT (3307)
#                  TLWF_SLURMD2_PORT (6820, the second node's slurmd)
#                  TLWF_MUNGE_SOCKET ($STATE/munge/munge.socket.2)
#                  TLWF_SLURM_CLUSTER (expanse-local)
#                  TLWF_SLURM_ACCOUNT (testacct)
#                  TLWF_SLURM_TIMEOUT (60, seconds per readiness wait)
set -euo pipefail

STATE=${1:-${TLWF_SLURM_DIR:-/tmp/tlwf-slurm}}
CTLD_PORT=${TLWF_SLURMCTLD_PORT:-6817}
SLURMD_PORT=${TLWF_SLURMD_PORT:-6818}
SLURMD2_PORT=${TLWF_SLURMD2_PORT:-6820}
DBD_PORT=${TLWF_SLURMDBD_PORT:-6819}
MYSQL_PORT=${TLWF_MYSQL_PORT:-3307}
CLUSTER=${TLWF_SLURM_CLUSTER:-expanse-local}
ACCOUNT=${TLWF_SLURM_ACCOUNT:-testacct}
TIMEOUT=${TLWF_SLURM_TIMEOUT:-60}
# The node must carry this host's short name: slurmd and slurmctld both
# compare their configured names against `hostname -s`.
NODE=$(hostname -s)
NODE2=$NODE-2
# Jobs are submitted by whoever runs the tests (root in CI).
SUBMIT_USER=$(id -un)
# Throwaway password for slurmdbd's MariaDB user; the server only listens on
# 127.0.0.1 and the datadir is private to this state dir.
DB_USER=slurm
DB_PASS=tlwf-slurm-test

log() { printf '[tlwf-slurm] %s\n' "$*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (munged/mariadbd/slurm daemons run as root here)"
for bin in munged munge mariadbd mariadb mariadb-admin mariadb-install-db \
           slurmdbd slurmctld slurmd sacctmgr scontrol sinfo sdiag; do
    command -v "$bin" >/dev/null || die "missing $bin (apt-get install slurm-wlm slurmdbd munge mariadb-server)"
done
case $STATE in /*) ;; *) STATE=$PWD/$STATE ;; esac

ETC=$STATE/etc RUN=$STATE/run LOG=$STATE/log
MUNGE_DIR=$STATE/munge
# Unix socket paths are limited to ~107 bytes; override for deep state dirs.
MUNGE_SOCK=${TLWF_MUNGE_SOCKET:-$MUNGE_DIR/munge.socket.2}
DB_DIR=$STATE/mysql
DB_SOCK=$RUN/mysqld.sock
export SLURM_CONF=$ETC/slurm.conf

# --- helpers -------------------------------------------------------------

# pid_alive NAME: true if $RUN/NAME.pid names a live, non-zombie process whose
# command is NAME (guards against a stale pidfile whose PID got reused, and
# against exited daemons that PID 1 has not reaped yet).
pid_alive() {
    local f=$RUN/$1.pid pid stat
    # slurmd-NODE.pid: one slurmd per node, each a process named slurmd.
    local comm=${1%%-*}
    [[ -s $f ]] || return 1
    pid=$(tr -dc 0-9 <"$f")
    [[ -n $pid ]] && kill -0 "$pid" 2>/dev/null || return 1
    [[ $(cat "/proc/$pid/comm" 2>/dev/null) == "$comm" ]] || return 1
    stat=$(cat "/proc/$pid/stat" 2>/dev/null) || return 1
    stat=${stat##*) }          # field 3 (state) follows "(comm) "
    [[ ${stat%% *} != Z ]]
}

# wait_for DESCRIPTION CMD...: poll CMD every 0.2 s for at most $TIMEOUT s.
wait_for() {
    local what=$1; shift
    local deadline=$((SECONDS + TIMEOUT))
    until "$@" >/dev/null 2>&1; do
        if ((SECONDS >= deadline)); then
            log "timed out after ${TIMEOUT}s waiting for $what"
            return 1
        fi
        sleep 0.2
    done
}

# require_free_port NAME PORT: a daemon we are about to start must not find
# its port taken (e.g. by another copy of this cluster in a different state
# dir) -- it would exit after daemonizing and clients would quietly talk to
# the other instance.
require_free_port() {
    if (exec 3<>"/dev/tcp/127.0.0.1/$2") 2>/dev/null; then
        die "port $2 for $1 is already in use on 127.0.0.1 (another cluster running? set TLWF_*_PORT)"
    fi
}

# Print the tail of a log and fail.
fail_with_log() {
    log "$1; last lines of $2:"
    tail -n 30 "$2" >&2 2>/dev/null || true
    exit 1
}

# --- state dir -------------------------------------------------------------

if [[ ${TLWF_SLURM_FRESH:-0} == 1 && -d $STATE ]]; then
    for d in slurmd-$NODE slurmd-$NODE2 slurmctld slurmdbd mariadbd munged; do
        pid_alive "$d" && die "TLWF_SLURM_FRESH=1 but $d is still running; run stop.sh first"
    done
    log "wiping $STATE"
    rm -rf "$STATE"
fi

# Check every port we are about to need before starting anything, so a clash
# doesn't leave a half-started cluster behind.
pid_alive mariadbd  || require_free_port mariadbd  "$MYSQL_PORT"
pid_alive slurmdbd  || require_free_port slurmdbd  "$DBD_PORT"
pid_alive slurmctld || require_free_port slurmctld "$CTLD_PORT"
pid_alive slurmd-$NODE  || require_free_port slurmd "$SLURMD_PORT"
pid_alive slurmd-$NODE2 || require_free_port slurmd "$SLURMD2_PORT"

# munged refuses a socket dir that others can write to or cannot traverse.
mkdir -p "$ETC" "$RUN" "$LOG" "$STATE/ctld" "$STATE/spool/$NODE" "$STATE/spool/$NODE2" \
    "$DB_DIR" "$MUNGE_DIR"
chmod 755 "$STATE"
chmod 711 "$MUNGE_DIR"
mkdir -p "$(dirname "$MUNGE_SOCK")"

# --- configuration ---------------------------------------------------------

# Slurm daemons listen on INADDR_ANY unless CommunicationParameters=No*InAddrAny,
# which makes them bind to whatever `gethostname()` resolves to.  Use that
# only when the hostname resolves to loopback (true here via /etc/hosts); on a
# host whose name resolves to a real interface it would bind *that* address,
# so keep the default there.  All traffic still goes to 127.0.0.1 either way
# (NodeAddr, SlurmctldHost address, DbdAddr, StorageHost).
COMM_PARAMS="# $NODE does not resolve to loopback: daemons listen on INADDR_ANY"
DBD_COMM_PARAMS=$COMM_PARAMS
HOST_ADDRS=$({ getent ahostsv4 "$(hostname)" 2>/dev/null || true; } | awk '{print $1}' | sort -u)
if [[ -z $HOST_ADDRS ]]; then
    log "warning: $(hostname) does not resolve; Slurm daemons will listen on all addresses"
elif grep -qv '^127\.' <<<"$HOST_ADDRS"; then
    log "warning: $(hostname) resolves to a non-loopback address; Slurm daemons will listen on all addresses"
else
    COMM_PARAMS="# Bind to $(hostname)'s loopback address instead of INADDR_ANY.
CommunicationParameters=NoCtldInAddrAny,NoInAddrAny"
    DBD_COMM_PARAMS="CommunicationParameters=NoInAddrAny"
fi

# Remember the previous configs: running daemons don't see rewritten files.
OLD_CONF_SUM=$({ cat "$ETC"/*.conf 2>/dev/null || true; } | md5sum)

# The node is shaped like an SDSC Expanse GPU node (2 x 20 cores, 384 GB,
# 4 x V100, feature "lustre") with some CPU-node room added (see NodeName
# below).  slurmd would normally drain a node that claims
# more than the hardware has; SlurmdParameters=config_overrides makes it
# trust the config.
cat >"$ETC/slurm.conf" <<EOF
# Generated by tests/cluster/start.sh -- edits are overwritten on next start.
ClusterName=$CLUSTER
SlurmctldHost=$NODE(127.0.0.1)
SlurmctldPort=$CTLD_PORT
SlurmdPort=$SLURMD_PORT
$COMM_PARAMS
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$MUNGE_SOCK

StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/spool/%n
SlurmctldPidFile=$RUN/slurmctld.pid
SlurmdPidFile=$RUN/slurmd-%n.pid
SlurmctldLogFile=$LOG/slurmctld.log
SlurmdLogFile=$LOG/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info

# No cgroups in the sandbox/CI containers: track processes via /proc.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
MpiDefault=none
SwitchType=switch/none
# Container ulimits may not be raisable; don't fail jobs over them.
PropagateResourceLimits=NONE

SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
# Without a default, a job without --mem gets the whole node's memory and
# jobs would run one at a time.
DefMemPerCPU=2000
GresTypes=gpu
SlurmdParameters=config_overrides

# Schedule immediately instead of every few seconds / minute.
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,sched_min_interval=0,bf_interval=1,default_queue_depth=1000

AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=127.0.0.1
AccountingStoragePort=$DBD_PORT
# Connections to slurmdbd authenticate via the munge socket named here, NOT
# via AuthInfo (without it sacctmgr/slurmctld use /run/munge/munge.socket.2).
AccountingStoragePass=$MUNGE_SOCK
# Reject unknown accounts/QOS at submission, as on a production cluster.
AccountingStorageEnforce=associations,limits,qos
AccountingStorageTRES=gres/gpu
# The Snakemake slurm plugin tags jobs with --comment; sacct only shows it
# with this flag.
AccountingStoreFlags=job_comment
JobCompType=jobcomp/none

# Reject jobs that exceed a partition limit (e.g. --time over MaxTime) at
# submission instead of leaving them pending forever (PartitionTimeLimit).
EnforcePartLimits=ALL
ReturnToService=2
# No mail in the sandbox; the default /bin/mail is missing and logs errors.
MailProg=/bin/true
# Finished jobs leave slurmctld's memory (and squeue) soon, so the tests see what a
# workflow sees when it looks at a job that ended longer ago than the site keeps it
# listed (Slurm's default is 300 s; slurmctld purges about once a minute past that).
MinJobAge=2
# A job gets SIGTERM and 60 s before SIGKILL (Slurm's default: 30 s). A cancelled
# Snakemake controller cancels its stage jobs and releases its lock in that time: about
# 5 s on a quiet 2-core test machine, but more than 30 s once when other work loaded it.
# Jobs that end at the SIGTERM (all of ours) are not slowed down by a longer wait.
KillWait=60
InactiveLimit=0
Waittime=0
SlurmctldTimeout=30
SlurmdTimeout=60
MessageTimeout=10

# FirstJobId, set just before slurmctld starts (see there).
Include $ETC/first_job_id.inc

# An Expanse GPU node (40 cores, 384 GB, 4 GPUs) plus 16 cores and 64 GB: on Expanse
# CPU jobs (a Snakemake controller, train_head, verify_dataset) run on other nodes than
# the GPU stages; here they would wait for a core while four GPU jobs of 10 cores each
# hold all 40.
NodeName=$NODE NodeAddr=127.0.0.1 NodeHostname=$NODE Sockets=2 CoresPerSocket=28 ThreadsPerCore=1 RealMemory=448000 Gres=gpu:v100:4 Feature=lustre State=UNKNOWN
# The second node: for tests of job steps over two nodes (srun, one torchrun per node).
# Same machine, its own slurmd (slurmd -N $NODE2) on its own port.
NodeName=$NODE2 NodeAddr=127.0.0.1 NodeHostname=$NODE Port=$SLURMD2_PORT Sockets=1 CoresPerSocket=4 ThreadsPerCore=1 RealMemory=16000 Gres=gpu:v100:4 Feature=lustre State=UNKNOWN

# Expanse-like partitions, all on the one node.  compute/gpu are whole-node
# (exclusive) on Expanse; the *-shared/*-debug ones share nodes.
# Preemption as on Expanse's gpu-preempt: a job of a partition with a higher
# PriorityTier that cannot start otherwise takes the resources of gpu-preempt
# jobs, which are requeued (same job id, pending again, then run from the start
# of their batch script).  Only gpu-preempt can be preempted (PreemptMode=OFF
# elsewhere), and only gpu-priority outranks it: on Expanse gpu and gpu-shared
# jobs preempt it too, here that would let the tests' concurrent runs preempt
# each other by chance.  gpu-priority stands in for them, for the test that
# preempts on purpose.
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
PartitionName=shared       Nodes=$NODE Default=YES MaxTime=2-00:00:00 DefaultTime=01:00:00 PreemptMode=OFF State=UP
PartitionName=debug        Nodes=$NODE MaxTime=00:30:00 DefaultTime=00:30:00 PreemptMode=OFF State=UP
PartitionName=compute      Nodes=$NODE MaxTime=2-00:00:00 DefaultTime=01:00:00 OverSubscribe=EXCLUSIVE PreemptMode=OFF State=UP
PartitionName=gpu-shared   Nodes=$NODE MaxTime=2-00:00:00 DefaultTime=01:00:00 PreemptMode=OFF State=UP
PartitionName=gpu-debug    Nodes=$NODE MaxTime=00:30:00 DefaultTime=00:30:00 PreemptMode=OFF State=UP
PartitionName=gpu          Nodes=$NODE MaxTime=2-00:00:00 DefaultTime=01:00:00 OverSubscribe=EXCLUSIVE PreemptMode=OFF State=UP
PartitionName=gpu-preempt  Nodes=$NODE MaxTime=7-00:00:00 DefaultTime=01:00:00 PriorityTier=1 PreemptMode=REQUEUE State=UP
PartitionName=gpu-priority Nodes=$NODE MaxTime=00:30:00 DefaultTime=00:05:00 PriorityTier=2 PreemptMode=OFF State=UP
PartitionName=multinode    Nodes=$NODE,$NODE2 MaxTime=00:30:00 DefaultTime=00:10:00 PreemptMode=OFF State=UP
EOF

[[ -s $ETC/first_job_id.inc ]] || echo "FirstJobId=1" >"$ETC/first_job_id.inc"

# gres/gpu needs one distinct device file per GPU (all checked with slurmd -G
# on 22.05): without File= the typed GPU line is dropped, so the node would
# register 0 GPUs and be drained; four lines of File=/dev/null are fatal
# ("gpu duplicate device file name"); File=/dev/null Count=4 is fatal ("count
# does not match File value").  There are no GPUs, so give each fake GPU its
# own name: symlinks to /dev/null (slurmd stat()s them: a char device).
mkdir -p "$STATE/dev"
for i in 0 1 2 3 4 5 6 7; do ln -sfn /dev/null "$STATE/dev/nvidia$i"; done
cat >"$ETC/gres.conf" <<EOF
AutoDetect=off
NodeName=$NODE Name=gpu Type=v100 File=$STATE/dev/nvidia[0-3]
NodeName=$NODE2 Name=gpu Type=v100 File=$STATE/dev/nvidia[4-7]
EOF

# Keep the distro's /etc/slurm/plugstack.conf out of the way.
: >"$ETC/plugstack.conf"

# slurmdbd.conf holds a password: slurmdbd insists on mode 600.
( umask 077
cat >"$ETC/slurmdbd.conf" <<EOF
# Generated by tests/cluster/start.sh -- edits are overwritten on next start.
AuthType=auth/munge
AuthInfo=socket=$MUNGE_SOCK
DbdHost=localhost
$DBD_COMM_PARAMS
DbdAddr=127.0.0.1
DbdPort=$DBD_PORT
SlurmUser=root
PidFile=$RUN/slurmdbd.pid
LogFile=$LOG/slurmdbd.log
DebugLevel=info
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$MYSQL_PORT
StorageUser=$DB_USER
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
)
chmod 600 "$ETC/slurmdbd.conf"

if [[ $(cat "$ETC"/*.conf | md5sum) != "$OLD_CONF_SUM" ]]; then
    for d in munged mariadbd slurmdbd slurmctld slurmd-$NODE slurmd-$NODE2; do
        if pid_alive "$d"; then
            log "warning: configs changed but $d is already running with the old ones;" \
                "run stop.sh then start.sh to apply them"
            break
        fi
    done
fi

START=$SECONDS

# --- munge -----------------------------------------------------------------
# A private key and socket, so nothing depends on (or disturbs) a system munged.

if ! pid_alive munged; then
    if [[ ! -s $MUNGE_DIR/munge.key ]]; then
        ( umask 077; dd if=/dev/urandom of="$MUNGE_DIR/munge.key" bs=1024 count=1 status=none )
    fi
    chmod 400 "$MUNGE_DIR/munge.key"
    rm -f "$MUNGE_SOCK" "$MUNGE_SOCK.lock"
    log "starting munged"
    munged --key-file="$MUNGE_DIR/munge.key" --socket="$MUNGE_SOCK" \
        --pid-file="$RUN/munged.pid" --log-file="$LOG/munged.log" \
        --seed-file="$MUNGE_DIR/munged.seed" </dev/null >>"$LOG/munged.out" 2>&1 \
        || fail_with_log "munged failed to start" "$LOG/munged.out"
fi
munge_ok() { munge -n -S "$MUNGE_SOCK" | unmunge -S "$MUNGE_SOCK"; }
wait_for munged munge_ok || fail_with_log "munged not answering" "$LOG/munged.log"

# --- MariaDB ---------------------------------------------------------------

# A throwaway accounting DB needs no crash durability.  Fewer fsyncs and one
# shared tablespace instead of a file per table make a fresh start noticeably
# faster (slurmdbd creates dozens of tables on first contact).
DB_FAST=(--innodb-flush-log-at-trx-commit=0 --innodb-doublewrite=0 --innodb-file-per-table=0 --skip-log-bin)

if ! pid_alive mariadbd; then
    if [[ ! -d $DB_DIR/mysql ]]; then
        log "initialising MariaDB datadir"
        mariadb-install-db --no-defaults --user=root --datadir="$DB_DIR" \
            --auth-root-authentication-method=socket --skip-test-db \
            --skip-name-resolve "${DB_FAST[@]}" >"$LOG/mariadb-install.log" 2>&1 \
            || fail_with_log "mariadb-install-db failed" "$LOG/mariadb-install.log"
    fi
    rm -f "$DB_SOCK" "$RUN/mariadbd.pid"
    log "starting mariadbd"
    # mariadbd does not daemonize: detach it into its own session, all stdio
    # to files, so callers capturing our output don't hang on its pipe.
    # --no-defaults keeps /etc/mysql/*.cnf (system socket, port 3306) out.
    # The innodb values are the minimums below which slurmdbd logs "Database
    # settings not recommended values" (the buffer pool is allocated lazily);
    # native AIO is off because sandboxes/containers often lack io_submit.
    setsid mariadbd --no-defaults --user=root --datadir="$DB_DIR" \
        --socket="$DB_SOCK" --port="$MYSQL_PORT" --bind-address=127.0.0.1 \
        --skip-name-resolve --pid-file="$RUN/mariadbd.pid" \
        --log-error="$LOG/mariadb.log" \
        --innodb-buffer-pool-size=512M --innodb-log-file-size=64M \
        --innodb-lock-wait-timeout=900 --innodb-use-native-aio=0 \
        "${DB_FAST[@]}" </dev/null >>"$LOG/mariadb.out" 2>&1 &
fi
wait_for "mariadbd" mariadb-admin --no-defaults --socket="$DB_SOCK" -u root ping \
    || fail_with_log "mariadbd not answering" "$LOG/mariadb.log"
wait_for "mariadbd pidfile" pid_alive mariadbd || fail_with_log "no mariadbd pid" "$LOG/mariadb.log"

mariadb --no-defaults --socket="$DB_SOCK" -u root <<EOF
CREATE USER IF NOT EXISTS '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
ALTER USER '$DB_USER'@'127.0.0.1' IDENTIFIED BY '$DB_PASS';
GRANT ALL ON slurm_acct_db.* TO '$DB_USER'@'127.0.0.1';
EOF

# --- slurmdbd --------------------------------------------------------------

if ! pid_alive slurmdbd; then
    log "starting slurmdbd"
    slurmdbd </dev/null >>"$LOG/slurmdbd.out" 2>&1 \
        || fail_with_log "slurmdbd failed to start" "$LOG/slurmdbd.log"
fi
wait_for slurmdbd sacctmgr -n -P show cluster || fail_with_log "slurmdbd not answering" "$LOG/slurmdbd.log"
wait_for "slurmdbd pidfile" pid_alive slurmdbd || fail_with_log "no slurmdbd pid" "$LOG/slurmdbd.log"

# --- accounting objects ----------------------------------------------------
# Created before slurmctld starts, so it registers with an existing cluster
# and loads the associations at once.  `sacctmgr add` of something that
# exists exits non-zero, hence the existence checks.

exists() { [[ -n $(sacctmgr -n -P "$@" 2>/dev/null) ]]; }

exists show cluster where name="$CLUSTER" format=cluster \
    || sacctmgr -i add cluster "$CLUSTER" >/dev/null
exists show qos where name=normal format=name \
    || sacctmgr -i add qos normal >/dev/null
exists show account where name="$ACCOUNT" format=account \
    || sacctmgr -i add account "$ACCOUNT" Cluster="$CLUSTER" \
        Description="tlwf test account" Organization=tlwf >/dev/null
exists show assoc where cluster="$CLUSTER" account="$ACCOUNT" user="$SUBMIT_USER" format=user \
    || sacctmgr -i add user "$SUBMIT_USER" Account="$ACCOUNT" Cluster="$CLUSTER" >/dev/null
# Jobs without --account land in $ACCOUNT (root otherwise defaults to 'root').
sacctmgr -i modify user where name="$SUBMIT_USER" set DefaultAccount="$ACCOUNT" >/dev/null 2>&1 || true

# --- slurmctld -------------------------------------------------------------

CTLD_STARTED=0
if ! pid_alive slurmctld; then
    CTLD_STARTED=1
    # Never recover jobs from a previous run: their processes are gone, and
    # a recovered job cancelled on start leaks its CPUs in select/cons_tres
    # (sinfo shows the idle node "mixed").  Node/partition/association state
    # is kept.  Without job_state, slurmctld would number jobs from 1 again,
    # while the accounting DB still has the old ids (sacct -j would match two
    # jobs): continue after the highest id the DB has seen.
    rm -rf "$STATE/ctld/job_state" "$STATE/ctld/job_state.old" "$STATE/ctld"/hash.[0-9]
    max_id=$(mariadb --no-defaults --socket="$DB_SOCK" -u root -N -B -e \
        "SELECT COALESCE(MAX(id_job), 0) FROM slurm_acct_db.\`${CLUSTER,,}_job_table\`")
    echo "FirstJobId=$((max_id + 1))" >"$ETC/first_job_id.inc"
    log "starting slurmctld"
    slurmctld </dev/null >>"$LOG/slurmctld.out" 2>&1 \
        || fail_with_log "slurmctld failed to start" "$LOG/slurmctld.log"
fi
wait_for slurmctld scontrol ping || fail_with_log "slurmctld not answering" "$LOG/slurmctld.log"
wait_for "slurmctld pidfile" pid_alive slurmctld || fail_with_log "no slurmctld pid" "$LOG/slurmctld.log"

# --- slurmd ----------------------------------------------------------------

# Ready = registered and responding, not drained/down.  %T appends '*' when
# the node is not responding; on a live cluster jobs may be running.
node_idle() { [[ $(sinfo -h -n "$1" -p "$2" -o %T) =~ ^(idle|mixed|allocated)$ ]]; }
for node in "$NODE" "$NODE2"; do
    if ! pid_alive "slurmd-$node"; then
        log "starting slurmd for node $node"
        slurmd -N "$node" </dev/null >>"$LOG/slurmd-$node.out" 2>&1 \
            || fail_with_log "slurmd failed to start" "$LOG/slurmd-$node.log"
    fi
done
for node in "$NODE" "$NODE2"; do
    if ! wait_for "node $node idle" node_idle "$node" multinode; then
        scontrol show node "$node" >&2 || true
        fail_with_log "node $node did not become idle" "$LOG/slurmd-$node.log"
    fi
    wait_for "slurmd pidfile" pid_alive "slurmd-$node" \
        || fail_with_log "no slurmd pid" "$LOG/slurmd-$node.log"
done

# Jobs of an unclean stop that the accounting DB still lists as pending or
# running, but slurmctld no longer knows (see above): close them, or sacct
# would report them running for ever.
if ((CTLD_STARTED)); then
    sacctmgr -i show runawayjobs >/dev/null 2>&1 || true
fi

# After an unclean stop slurmctld first replays/flushes accounting records;
# until its queue to slurmdbd drains, sacct may lag behind the first jobs.
dbd_queue_empty() { [[ $(sdiag | awk -F: '/DBD Agent queue size/ {gsub(/ /, "", $2); print $2}') == 0 ]]; }
wait_for "slurmctld's slurmdbd queue to drain" dbd_queue_empty \
    || log "warning: slurmctld still has accounting messages queued for slurmdbd"

# --- env for tests ---------------------------------------------------------

cat >"$STATE/env.sh" <<EOF
# Generated by tests/cluster/start.sh; source me.
export SLURM_CONF=$ETC/slurm.conf
export TLWF_SLURM_DIR=$STATE
export TLWF_SLURM_CLUSTER=$CLUSTER
export TLWF_SLURM_ACCOUNT=$ACCOUNT
EOF

log "cluster $CLUSTER up in $((SECONDS - START))s (state: $STATE); source $STATE/env.sh"
