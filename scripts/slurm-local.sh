#!/usr/bin/env bash
# A real single-node SLURM 22.05 on this machine (Debian/Ubuntu, root, no systemd needed), to try
# `--executor slurm` without a cluster; CI runs the SLURM tests against it. Accounting (slurmdbd + MariaDB)
# is part of it because submitit polls `sacct` for job states: without it a killed job never ends.
#   bash scripts/slurm-local.sh up      # apt-install if needed, start munged, mariadbd, slurmdbd, slurmctld, slurmd
#   bash scripts/slurm-local.sh down    # cancel jobs, stop the daemons, drop job state and the accounting DB
#   bash scripts/slurm-local.sh status  # sinfo + squeue
# Partition `debug`, no time limit, jobs run as root. Logs: /var/log/slurm/.
# Env: SLURM_LOCAL_CPUS (default: nproc; may exceed the real cores), SLURM_LOCAL_MEM_MB (default 80% of RAM).
# Adapted from the recipe verified for this project (preemption requeue in ~25 s thanks to cred_expire=10 and
# the fast scheduler parameters; impossible requests rejected at submit by EnforcePartLimits=ALL).
set -euo pipefail
export DEBIAN_FRONTEND=noninteractive

NODE=$(hostname -s)
CPUS=${SLURM_LOCAL_CPUS:-$(nproc)}
MEM_MB=${SLURM_LOCAL_MEM_MB:-$(( $(awk '/MemTotal/{print $2}' /proc/meminfo) * 8 / 10 / 1024 ))}
LOGDIR=/var/log/slurm
DBPASS=sslbench-local

wait_for() {  # wait_for <tries of 0.2 s> <command...>
  local n=$1; shift
  for _ in $(seq "$n"); do "$@" >/dev/null 2>&1 && return 0; sleep 0.2; done
  echo "timeout waiting for: $*" >&2; return 1
}

stop_pidfiles() {  # args: pidfile:command ...; SIGTERM each live process whose name matches,
  local arg pf pid pids=()  # wait up to 10 s for all to exit, then SIGKILL what is left
  for arg in "$@"; do
    pf=${arg%%:*}
    if [ -s "$pf" ]; then
      pid=$(cat "$pf")
      [ "$(cat /proc/"$pid"/comm 2>/dev/null)" = "${arg#*:}" ] && pids+=("$pid")
      rm -f "$pf"
    fi
  done
  [ ${#pids[@]} -gt 0 ] || return 0
  kill "${pids[@]}" 2>/dev/null || true
  for _ in $(seq 100); do
    local alive=()
    for pid in "${pids[@]}"; do kill -0 "$pid" 2>/dev/null && alive+=("$pid"); done
    [ ${#alive[@]} -eq 0 ] && return 0
    sleep 0.1
  done
  kill -9 "${alive[@]}" 2>/dev/null || true
}

down() {
  # cancel jobs and wait (max 30 s) until the node has no job left, not even COMPLETING,
  # otherwise a slurmstepd outlives slurmd (seen: submitit ignores SIGTERM, so KillWait applies)
  if [ -s /run/slurmctld.pid ] && scontrol ping >/dev/null 2>&1; then
    squeue -h -o %A | xargs -r scancel || true
    for _ in $(seq 150); do
      [ -z "$(squeue -h -o %A)" ] && [ "$(sinfo -h -o %t | sort -u)" = idle ] && break
      sleep 0.2
    done
  fi
  stop_pidfiles /run/slurmd.pid:slurmd /run/slurmctld.pid:slurmctld /run/slurmdbd.pid:slurmdbd
  if [ -S /run/mysqld/mysqld.sock ]; then
    mariadb -e 'DROP DATABASE IF EXISTS slurm_acct_db' 2>/dev/null || true
  fi
  stop_pidfiles /run/mysqld/mysqld.pid:mariadbd /run/munge/munged.pid:munged
  rm -rf /var/spool/slurmctld /var/spool/slurmd
}

up() {
  if ! command -v slurmctld >/dev/null || ! command -v slurmdbd >/dev/null || ! command -v mariadbd >/dev/null; then
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends \
      munge slurm-client slurmctld slurmd slurmdbd mariadb-server >/dev/null
  fi
  down   # idempotent: clear anything left from an earlier run

  # --- munge (the Debian postinst normally created the key already)
  if [ ! -s /etc/munge/munge.key ]; then mungekey --create --keyfile /etc/munge/munge.key; fi
  mkdir -p /run/munge /var/lib/munge /var/log/munge
  chown munge:munge /etc/munge /etc/munge/munge.key /run/munge /var/lib/munge /var/log/munge
  chmod 700 /etc/munge /var/log/munge; chmod 400 /etc/munge/munge.key; chmod 755 /run/munge
  runuser -u munge -- /usr/sbin/munged </dev/null >/dev/null 2>&1
  wait_for 50 sh -c 'munge -n | unmunge'

  # --- MariaDB for slurmdbd (Debian's datadir, unix socket only, no TCP)
  mkdir -p /run/mysqld && chown mysql:root /run/mysqld
  nohup /usr/sbin/mariadbd --user=mysql --skip-networking --socket=/run/mysqld/mysqld.sock \
    --pid-file=/run/mysqld/mysqld.pid --innodb-buffer-pool-size=128M --innodb-lock-wait-timeout=900 \
    </dev/null >>/var/log/mariadbd-sslbench.log 2>&1 &
  wait_for 150 mariadb-admin --socket=/run/mysqld/mysqld.sock ping
  mariadb -e 'DROP DATABASE IF EXISTS slurm_acct_db'   # job ids restart at 1 with fresh state
  mariadb -e "CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DBPASS';
              GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"

  # --- config
  mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd "$LOGDIR"
  cat > /etc/slurm/slurmdbd.conf <<EOF
AuthType=auth/munge
DbdHost=localhost
SlurmUser=root
LogFile=$LOGDIR/slurmdbd.log
PidFile=/run/slurmdbd.pid
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageLoc=slurm_acct_db
StorageUser=slurm
StoragePass=$DBPASS
EOF
  chmod 600 /etc/slurm/slurmdbd.conf   # slurmdbd refuses a group/world-readable file
  cat > /etc/slurm/slurm.conf <<EOF
ClusterName=sslbench
SlurmctldHost=$NODE(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
AuthInfo=cred_expire=10
MpiDefault=none
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
JobCompType=jobcomp/none
ReturnToService=2
EnforcePartLimits=ALL
SchedulerType=sched/backfill
SchedulerParameters=batch_sched_delay=0,sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SlurmdParameters=config_overrides
KillWait=5
MailProg=/bin/true
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmdSpoolDir=/var/spool/slurmd
StateSaveLocation=/var/spool/slurmctld
SlurmctldLogFile=$LOGDIR/slurmctld.log
SlurmdLogFile=$LOGDIR/slurmd.log
SlurmdDebug=info
SlurmctldDebug=info
NodeName=$NODE NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$MEM_MB State=UNKNOWN
PartitionName=debug Nodes=ALL Default=YES MaxTime=INFINITE State=UP
EOF

  # --- daemons (each forks into the background and writes its pid file)
  slurmdbd </dev/null >>"$LOGDIR/daemons.out" 2>&1
  wait_for 150 sacctmgr -n show cluster
  slurmctld </dev/null >>"$LOGDIR/daemons.out" 2>&1
  wait_for 150 scontrol ping
  slurmd </dev/null >>"$LOGDIR/daemons.out" 2>&1
  wait_for 150 sh -c "sinfo -h -n $NODE -o %t | grep -qx idle"
  wait_for 150 sh -c "sacctmgr -n -P show cluster format=cluster,controlport | grep -q '^sslbench|6817'"
  sinfo
}

case "${1:-up}" in
  up) up ;;
  down) down ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 up|down|status" >&2; exit 2 ;;
esac
