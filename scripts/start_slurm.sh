#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for trying `domaingrad sweep launch --launcher slurm`
# and for the cluster tests (`make test-clusters`): munged, slurmctld and slurmd on localhost, one
# partition `debug` holding this machine with its real CPU count and memory (`slurmd -C`), and
# job accounting (slurmdbd on a private MariaDB instance bound to 127.0.0.1), because submitit
# reads every job's state with `sacct`.
#
#   sudo apt-get install slurm-wlm slurmdbd munge mariadb-server   # Debian/Ubuntu packages
#   sudo scripts/start_slurm.sh          # start (does nothing if the cluster already answers)
#   sudo scripts/start_slurm.sh stop     # stop slurmd, slurmctld, slurmdbd, the database and munged
#   scripts/start_slurm.sh status        # exit 0 when the cluster answers
#
# Writes /etc/slurm/slurm.conf and slurmdbd.conf only when they are absent or were written by
# this script (it never touches a configuration written by someone else); its database lives in
# /var/lib/domaingrad-slurm, apart from any system MariaDB. Idempotent: running it again while
# the cluster is up changes nothing.
set -euo pipefail

ETC=/etc/slurm
MARKER="# written by domaingrad scripts/start_slurm.sh"
STATE=/var/spool/slurmctld
SPOOL=/var/spool/slurmd
LOGS=/var/log/slurm
DB_DIR=/var/lib/domaingrad-slurm
RUN=/run/domaingrad-slurm
DB_PORT=${START_SLURM_DB_PORT:-3316}
NODE=$(hostname -s)
WAIT_SECONDS=${START_SLURM_WAIT_SECONDS:-60}

die() {
  echo "start_slurm.sh: $*" >&2
  exit 1
}

node_state() { timeout 10 sinfo -h -n "$NODE" -o %T 2>/dev/null | head -n1 || true; }

cluster_answers() { # the controller answers, accounting works and the node can take jobs
  timeout 10 scontrol ping 2>/dev/null | grep -q "is UP" || return 1
  timeout 10 sacct -n -X -S now >/dev/null 2>&1 || return 1
  case "$(node_state)" in
    idle* | mixed* | allocated* | completing*) return 0 ;;
    *) return 1 ;;
  esac
}

munge_works() { timeout 10 munge -n 2>/dev/null | timeout 10 unmunge >/dev/null 2>&1; }

sql() { timeout 20 mariadb --no-defaults -S "$RUN/mysqld.sock" -u root -e "$1"; }

db_answers() { sql "SELECT 1" >/dev/null 2>&1; }

dbd_answers() { timeout 10 sacctmgr -n list cluster >/dev/null 2>&1; }

wait_for() { # wait_for WHAT COMMAND...: retry COMMAND for up to WAIT_SECONDS
  local what=$1 deadline=$((SECONDS + WAIT_SECONDS))
  shift
  until "$@"; do
    [ "$SECONDS" -lt "$deadline" ] || die "$what did not come up in ${WAIT_SECONDS}s (logs in $LOGS and $DB_DIR)"
    sleep 0.3
  done
}

stop_pidfile() { # stop the daemon whose pid file is $1, wait for it to exit
  local pid
  [ -f "$1" ] || return 0
  pid=$(cat "$1")
  if [ -n "$pid" ] && kill -0 "$pid" 2>/dev/null; then
    kill "$pid" || true
    for _ in $(seq 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
  fi
  rm -f "$1"
}

ours_or_absent() { # refuse to overwrite a configuration file someone else wrote
  if [ -f "$1" ] && ! grep -qF "$MARKER" "$1"; then
    die "$1 exists and was not written by this script; not touching it (use that cluster as its owner set it up)"
  fi
}

case "${1:-start}" in
  status)
    if cluster_answers; then sinfo; exit 0; fi
    echo "no Slurm cluster answers on $NODE (scontrol ping, sacct, sinfo)" >&2
    exit 1
    ;;
  stop)
    stop_pidfile /run/slurmd.pid
    stop_pidfile /run/slurmctld.pid
    stop_pidfile /run/slurmdbd.pid
    stop_pidfile "$RUN/mysqld.pid"
    stop_pidfile /run/munge/munged.pid
    echo "Slurm stopped"
    exit 0
    ;;
  start) ;;
  *) die "usage: scripts/start_slurm.sh [start|stop|status]" ;;
esac

if command -v scontrol >/dev/null && command -v sacct >/dev/null && cluster_answers; then
  echo "Slurm is already running on $NODE:"
  sinfo
  exit 0
fi
for tool in munged slurmctld slurmd slurmdbd sbatch sacct scontrol sinfo mariadbd mariadb-install-db; do
  command -v "$tool" >/dev/null \
    || die "$tool not found; install Slurm first: sudo apt-get install slurm-wlm slurmdbd munge mariadb-server"
done
[ "$(id -u)" = 0 ] || die "run as root (munged, slurmdbd, slurmctld and slurmd are system daemons): sudo $0"
ours_or_absent "$ETC/slurm.conf"
ours_or_absent "$ETC/slurmdbd.conf"
mkdir -p "$ETC" "$STATE" "$SPOOL" "$LOGS" "$DB_DIR"

# -- munge: the credentials of every Slurm message -------------------------------------------
if ! munge_works; then
  [ -s /etc/munge/munge.key ] || { mungekey --create 2>/dev/null || create-munge-key -f; }
  chown munge:munge /etc/munge/munge.key
  chmod 400 /etc/munge/munge.key
  install -d -o munge -g munge -m 0755 /run/munge
  install -d -o munge -g munge -m 0700 /var/log/munge /var/lib/munge
  stop_pidfile /run/munge/munged.pid
  runuser -u munge -- munged
  wait_for munged munge_works
fi

# -- the accounting database: a private MariaDB on 127.0.0.1:$DB_PORT -----------------------
install -d -o mysql -g mysql -m 0755 "$RUN"
if [ ! -d "$DB_DIR/mysql/mysql" ]; then
  mariadb-install-db --no-defaults --datadir="$DB_DIR/mysql" --user=mysql \
    --auth-root-authentication-method=socket --skip-test-db >"$DB_DIR/install.log" 2>&1 \
    || die "mariadb-install-db failed (see $DB_DIR/install.log)"
fi
if ! db_answers; then
  stop_pidfile "$RUN/mysqld.pid"
  setsid -f mariadbd --no-defaults --datadir="$DB_DIR/mysql" --user=mysql --bind-address=127.0.0.1 \
    --port="$DB_PORT" --socket="$RUN/mysqld.sock" --pid-file="$RUN/mysqld.pid" \
    --log-error="$DB_DIR/mariadb.log" --innodb-lock-wait-timeout=900 </dev/null >/dev/null 2>&1
  wait_for "MariaDB (port $DB_PORT)" db_answers
fi
if [ -f "$ETC/slurmdbd.conf" ]; then
  password=$(sed -n 's/^StoragePass=//p' "$ETC/slurmdbd.conf")
else
  password=$(head -c 16 /dev/urandom | od -An -tx1 | tr -d ' \n')
fi
sql "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
     CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
     ALTER USER 'slurm'@'127.0.0.1' IDENTIFIED BY '$password';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" || die "cannot set up the accounting database"

# -- the configuration for this one machine ------------------------------------------------
node_line=$(slurmd -C | head -n1)
case "$node_line" in
  NodeName=*) ;;
  *) die "slurmd -C did not describe this machine: $node_line" ;;
esac
(
  umask 077
  cat >"$ETC/slurmdbd.conf.new" <<EOF
$MARKER: accounting for the single-node cluster
AuthType=auth/munge
DbdHost=localhost
DbdAddr=127.0.0.1
SlurmUser=root
LogFile=$LOGS/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=$password
StorageLoc=slurm_acct_db
EOF
)
mv "$ETC/slurmdbd.conf.new" "$ETC/slurmdbd.conf"
cat >"$ETC/slurm.conf.new" <<EOF
$MARKER: a single-node cluster on localhost
ClusterName=domaingrad
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=$STATE
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=$LOGS/slurmctld.log
SlurmdLogFile=$LOGS/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobAcctGatherType=jobacct_gather/none
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=5
MinJobAge=600
$node_line NodeAddr=127.0.0.1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
EOF
mv "$ETC/slurm.conf.new" "$ETC/slurm.conf"

# -- the daemons -----------------------------------------------------------------------------
# (re)start them all so that they read this configuration
stop_pidfile /run/slurmd.pid
stop_pidfile /run/slurmctld.pid
stop_pidfile /run/slurmdbd.pid
slurmdbd
wait_for slurmdbd dbd_answers
if ! sacctmgr -n -P list cluster format=cluster | grep -qx domaingrad; then
  sacctmgr -i add cluster domaingrad >/dev/null
fi
slurmctld
slurmd
wait_for_node() {
  case "$(node_state)" in
    down* | drain* | fail*) scontrol update NodeName="$NODE" State=RESUME >/dev/null 2>&1 || true ;;
  esac
  cluster_answers
}
wait_for "the Slurm cluster" wait_for_node
echo "Slurm is running on $NODE ($ETC/slurm.conf):"
sinfo
