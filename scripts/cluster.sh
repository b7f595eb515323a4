#!/usr/bin/env bash
# An emulated 2-node cluster on this machine, for testing the launch/ scripts across nodes.
#
#   scripts/cluster.sh up [--rate 10gbit]   network namespaces node1/node2 joined by a shaped veth
#                                           pair, sshd (passwordless root ssh, pdsh), munge + slurmctld
#                                           + one slurmd per node; installs Debian packages if missing
#   scripts/cluster.sh status               what is up; exit 0 only if everything is
#   scripts/cluster.sh check                can this machine host it (root, network namespaces)?
#   scripts/cluster.sh exec NODE CMD...     run CMD "on" a node (its namespace, hostname, /etc/hosts,
#                                           SLURM_CONF); e.g. exec node1 sbatch launch/slurm_srun.sbatch
#   scripts/cluster.sh sshd NODE stop|start  stop / restart one node's sshd (an unreachable node)
#   scripts/cluster.sh rate RATE|none       re-shape both veth ends to RATE (tc syntax: 10gbit,
#                                           7812500bit, 500mbit) or remove the shaping; idempotent
#   scripts/cluster.sh link NODE down|up    take NODE's veth end down / up (a cable pulled)
#   scripts/cluster.sh down                 remove every namespace, link, daemon and file `up` made
#
# A node is a network namespace plus a UTS namespace (its own hostname) sharing this machine's
# filesystem, so both nodes see the repository and its venv at the same path, as on a cluster
# with a shared filesystem.  `ip netns exec` bind-mounts /etc/netns/NODE/* over /etc/*: that is
# how each node gets its own /etc/hosts and /etc/ssh (client config, host keys) without
# touching this machine's.  Traffic stays on loopback and the private subnet below.
set -euo pipefail

NODES=(node1 node2)
SUBNET=10.213.0
declare -A ADDR=([node1]=$SUBNET.1 [node2]=$SUBNET.2)
declare -A LINK=([node1]=qgc-veth1 [node2]=qgc-veth2)
DIR=${QGALORE_CLUSTER_DIR:-/tmp/qgalore-cluster}  # everything `up` writes, apart from /etc/netns/NODE
PACKAGES=(openssh-server openssh-client pdsh munge slurmctld slurmd slurm-client openmpi-bin iproute2 util-linux)
T=20  # seconds: default timeout of one command

say() { echo "[cluster] $*"; }
die() { echo "[cluster] error: $*" >&2; exit 1; }
t() { timeout "$T" "$@"; }

preflight() {
  [[ $(id -u) == 0 ]] || die "must run as root (network namespaces, sshd and slurmd need it); try: sudo $0 up"
  command -v ip >/dev/null || die "'ip' (iproute2) is missing"
  local probe="qgc-probe-$$"
  if ! t ip netns add "$probe" 2>/tmp/qgc-probe.err; then
    die "network namespaces are unavailable here ($(cat /tmp/qgc-probe.err)); a container needs CAP_SYS_ADMIN / --privileged"
  fi
  t ip netns del "$probe"; rm -f /tmp/qgc-probe.err
}

install_packages() {
  local missing=()
  for p in "${PACKAGES[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
  done
  [[ ${#missing[@]} == 0 ]] && return 0
  say "installing Debian packages: ${missing[*]}"
  # Keep the packages' own services stopped: this script runs private daemons with their own configs.
  local made_policy=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    printf '#!/bin/sh\nexit 101\n' > /usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d && made_policy=1
  fi
  export DEBIAN_FRONTEND=noninteractive
  timeout 300 apt-get update -q >/dev/null || die "apt-get update failed or took over 300 s"
  timeout 900 apt-get install -y -q --no-install-recommends "${missing[@]}" >/dev/null \
    || die "apt-get install ${missing[*]} failed or took over 900 s"
  [[ $made_policy == 1 ]] && rm -f /usr/sbin/policy-rc.d
  return 0
}

# Run a command in NODE's network namespace under a new UTS namespace whose hostname is NODE.
on_node() {
  local node=$1; shift
  SLURM_CONF="$DIR/slurm/slurm.conf" ip netns exec "$node" unshare --uts -- \
    sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

# on_node, replacing this shell: nothing of this script stays running alongside a long command.
exec_on_node() {
  local node=$1; shift
  SLURM_CONF="$DIR/slurm/slurm.conf" exec ip netns exec "$node" unshare --uts -- \
    sh -c 'hostname "$0" && exec "$@"' "$node" "$@"
}

# rate_bits RATE: RATE (tc syntax: 10gbit, 500mbit, 64kbit, 7812500bit, 7812500) in bit/s, integer.
rate_bits() {
  awk -v r="$1" 'BEGIN {
    if (!match(tolower(r), /^[0-9]+(\.[0-9]+)?/)) exit 1
    v = substr(r, 1, RLENGTH); u = tolower(substr(r, RLENGTH + 1))
    m["bit"] = 1; m[""] = 1; m["kbit"] = 1e3; m["mbit"] = 1e6; m["gbit"] = 1e9; m["tbit"] = 1e12
    if (!(u in m) || v * m[u] < 8000) exit 1
    printf "%.0f", v * m[u] }'
}

# shape_link NODE RATE: egress token bucket on NODE's veth end (tc qdisc replace: idempotent).  The
# bucket holds 1 ms at the rate but at least 256 KiB (a few 64 KiB GSO segments, as benchmarks/netns.py),
# so an idle link passes little for free; the queue holds 250 ms at the rate (at most 64 MiB) so
# TCP meets queueing delay rather than drops at low rates.  RATE none: no qdisc.
shape_link() {
  local n=$1 rate=$2 bits burst limit
  if [[ $rate == none ]]; then
    if t ip netns exec "$n" tc qdisc show dev "${LINK[$n]}" | grep -q '^qdisc tbf'; then
      t ip netns exec "$n" tc qdisc del dev "${LINK[$n]}" root
    fi
    return 0
  fi
  bits=$(rate_bits "$rate") || die "bad rate '$rate': give a tc rate >= 8kbit such as 10gbit, 500mbit or 7812500bit"
  burst=$(( bits / 8000 > 262144 ? bits / 8000 : 262144 ))
  limit=$(( bits / 32 < 67108864 ? bits / 32 : 67108864 ))
  t ip netns exec "$n" tc qdisc replace dev "${LINK[$n]}" root tbf rate "${bits}bit" burst "$burst" \
    limit $(( burst + limit )) || die "tc could not shape ${LINK[$n]} on $n to $rate"
}

make_network() {
  local rate=$1 n
  for n in "${NODES[@]}"; do t ip netns add "$n"; t ip -n "$n" link set lo up; done
  t ip link add "${LINK[node1]}" netns node1 type veth peer name "${LINK[node2]}" netns node2
  for n in "${NODES[@]}"; do
    t ip -n "$n" addr add "${ADDR[$n]}/24" dev "${LINK[$n]}"
    t ip -n "$n" link set "${LINK[$n]}" up
    shape_link "$n" "$rate"
  done
  say "network: node1=${ADDR[node1]} <-> node2=${ADDR[node2]} over ${LINK[node1]}/${LINK[node2]}, tc tbf rate $rate each way"
  say "no added delay: this kernel has no netem (sch_netem), so latency is loopback-like"
}

make_etc() {
  local n hosts
  hosts=$(printf '127.0.0.1 localhost\n%s node1\n%s node2\n' "${ADDR[node1]}" "${ADDR[node2]}")
  mkdir -p "$DIR/ssh" "$DIR/logs" "$DIR/munge" "$DIR/slurm"
  chmod 700 "$DIR" "$DIR/ssh"
  t ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/id_ed25519" -C qgalore-cluster
  cp "$DIR/ssh/id_ed25519.pub" "$DIR/ssh/authorized_keys"
  t ssh-keygen -q -t ed25519 -N '' -f "$DIR/ssh/host_ed25519"
  : > "$DIR/ssh/known_hosts"
  for n in "${NODES[@]}"; do
    echo "$n,${ADDR[$n]} $(cut -d' ' -f1,2 "$DIR/ssh/host_ed25519.pub")" >> "$DIR/ssh/known_hosts"
    mkdir -p "/etc/netns/$n/ssh"
    echo "$hosts" > "/etc/netns/$n/hosts"
    echo "$n" > "/etc/netns/$n/hostname"
    # Client config seen as /etc/ssh/ssh_config on the node (pdsh, mpirun, deepspeed all use ssh).
    cat > "/etc/netns/$n/ssh/ssh_config" <<EOF
Host *
  IdentityFile $DIR/ssh/id_ed25519
  UserKnownHostsFile $DIR/ssh/known_hosts
  StrictHostKeyChecking yes
  BatchMode yes
  ConnectTimeout 5
  ServerAliveInterval 5
  ServerAliveCountMax 3
  LogLevel ERROR
EOF
    cat > "$DIR/ssh/sshd_$n.conf" <<EOF
ListenAddress ${ADDR[$n]}
HostKey $DIR/ssh/host_ed25519
PidFile $DIR/ssh/sshd_$n.pid
AuthorizedKeysFile $DIR/ssh/authorized_keys
PermitRootLogin prohibit-password
PasswordAuthentication no
KbdInteractiveAuthentication no
UsePAM no
StrictModes no
MaxStartups 64
AcceptEnv LANG LC_*
EOF
  done
  touch "$DIR/.etc_netns_created"
}

start_sshd() {
  local n
  mkdir -p /run/sshd  # privilege separation directory
  for n in "${NODES[@]}"; do
    on_node "$n" /usr/sbin/sshd -f "$DIR/ssh/sshd_$n.conf" -E "$DIR/logs/sshd_$n.log" \
      || die "sshd on $n did not start; see $DIR/logs/sshd_$n.log"
  done
  for n in "${NODES[@]}"; do
    wait_for "ssh node1 -> $n" 20 on_node node1 timeout 10 ssh "$n" true
  done
}

write_slurm_conf() {
  local cpus; cpus=$(nproc)
  cat > "$DIR/slurm/slurm.conf" <<EOF
# Generated by scripts/cluster.sh for the emulated cluster; not for real use.
ClusterName=qgalore-emu
SlurmctldHost=node1(${ADDR[node1]})
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$DIR/munge/munge.socket
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$DIR/slurm/ctld
SlurmdSpoolDir=$DIR/slurm/spool-%n
SlurmctldPidFile=$DIR/slurm/slurmctld.pid
SlurmdPidFile=$DIR/slurm/slurmd-%n.pid
SlurmctldLogFile=$DIR/logs/slurmctld.log
SlurmdLogFile=$DIR/logs/slurmd-%n.log
# No cgroups: the two slurmd share one kernel and this machine may be a container.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
SchedulerType=sched/backfill
MpiDefault=none
ReturnToService=2
# Both slurmd see all of this machine's cores: trust the node lines below.
SlurmdParameters=config_overrides
SlurmdTimeout=30
KillWait=10
InactiveLimit=0
NodeName=node1 NodeAddr=${ADDR[node1]} CPUs=$cpus State=UNKNOWN
NodeName=node2 NodeAddr=${ADDR[node2]} CPUs=$cpus State=UNKNOWN
PartitionName=emu Nodes=node1,node2 Default=YES MaxTime=INFINITE State=UP OverSubscribe=YES
EOF
  # slurmd 22.05 always loads a cgroup plugin, and autodetection fails on the fresh /sys that
  # `ip netns exec` mounts; v1 with nothing asked of it (linuxproc, task/none) never touches it.
  printf 'CgroupPlugin=cgroup/v1\nCgroupAutomount=no\n' > "$DIR/slurm/cgroup.conf"
}

start_slurm() {
  local n
  mkdir -p "$DIR/slurm/ctld"
  t mungekey -c -f -k "$DIR/munge/munge.key" 2>/dev/null || t dd if=/dev/urandom of="$DIR/munge/munge.key" bs=1024 count=1 status=none
  chmod 400 "$DIR/munge/munge.key"
  chmod 700 "$DIR/munge"
  # munged listens on a unix socket: reachable from both namespaces (same filesystem).
  on_node node1 /usr/sbin/munged --force --socket="$DIR/munge/munge.socket" --key-file="$DIR/munge/munge.key" \
    --pid-file="$DIR/munge/munged.pid" --log-file="$DIR/logs/munged.log" --seed-file="$DIR/munge/seed" \
    || die "munged did not start; see $DIR/logs/munged.log"
  write_slurm_conf
  on_node node1 /usr/sbin/slurmctld -f "$DIR/slurm/slurm.conf" || die "slurmctld did not start; see $DIR/logs/slurmctld.log"
  for n in "${NODES[@]}"; do
    mkdir -p "$DIR/slurm/spool-$n"
    # -N: two slurmd on one host, each one node of slurm.conf.
    on_node "$n" /usr/sbin/slurmd -f "$DIR/slurm/slurm.conf" -N "$n" || die "slurmd on $n did not start; see $DIR/logs/slurmd-$n.log"
  done
  wait_for "both Slurm nodes idle" 60 slurm_idle
}

slurm_idle() {
  local out; out=$(on_node node1 timeout 10 sinfo -h -N -o '%N %t' 2>/dev/null) || return 1
  [[ $(grep -cE '^node[12] idle' <<< "$out") == 2 ]]
}

# wait_for WHAT SECONDS CMD...: poll CMD once a second, bounded.
wait_for() {
  local what=$1 limit=$2 i; shift 2
  for ((i = 0; i < limit; i++)); do
    if "$@" >/dev/null 2>&1; then return 0; fi
    sleep 1
  done
  die "timed out after ${limit}s waiting for: $what (logs in $DIR/logs)"
}

cmd_up() {
  local rate=10gbit
  while [[ $# -gt 0 ]]; do
    case $1 in
      --rate) rate=${2:?--rate needs a value such as 1gbit}; shift 2 ;;
      *) die "unknown option for up: $1" ;;
    esac
  done
  preflight
  if cmd_status >/dev/null 2>&1; then say "already up ($DIR)"; return 0; fi
  cmd_down >/dev/null 2>&1 || true  # a half-built cluster from an interrupted run
  install_packages
  mkdir -p "$DIR"
  make_network "$rate"
  make_etc
  start_sshd
  say "sshd: passwordless root ssh between node1 and node2 (key $DIR/ssh/id_ed25519)"
  start_slurm
  say "slurm: slurmctld on node1, slurmd on node1 and node2, partition emu ($(nproc) CPUs per node)"
  say "up. Run commands on a node with: $0 exec node1 <command>"
}

cmd_status() {
  local ok=0 n
  for n in "${NODES[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$n"; then echo "netns $n: present"; else echo "netns $n: missing"; ok=1; fi
  done
  [[ $ok == 0 ]] || return 1
  for n in "${NODES[@]}"; do
    if on_node node1 timeout 10 ssh "$n" hostname >/dev/null 2>&1; then echo "ssh node1->$n: ok"; else echo "ssh node1->$n: FAILED"; ok=1; fi
  done
  if slurm_idle; then echo "slurm: node1 and node2 idle"; else echo "slurm: not ready"; on_node node1 timeout 10 sinfo -N 2>&1 | sed 's/^/  /' || true; ok=1; fi
  return $ok
}

# Kill every process still inside NODE's network namespace (sshd, slurmd, ranks): all were
# started by this script or by jobs on the emulated node.
kill_node_procs() {
  local n=$1 sig pids i
  for sig in TERM KILL; do
    pids=$(ip netns pids "$n" 2>/dev/null || true)
    [[ -z $pids ]] && return 0
    kill -s "$sig" $pids 2>/dev/null || true
    for ((i = 0; i < 10; i++)); do
      [[ -z $(ip netns pids "$n" 2>/dev/null || true) ]] && return 0
      sleep 0.5
    done
  done
}

cmd_down() {
  [[ $(id -u) == 0 ]] || die "must run as root"
  local n
  for n in "${NODES[@]}"; do
    if ip netns list 2>/dev/null | grep -qw "$n"; then
      kill_node_procs "$n"
      t ip netns del "$n" || say "could not delete netns $n"  # deleting it deletes its veth end too
    fi
    if [[ -f "$DIR/.etc_netns_created" || -d "/etc/netns/$n" ]]; then
      rm -f "/etc/netns/$n/hosts" "/etc/netns/$n/hostname" "/etc/netns/$n/ssh/ssh_config"
      rmdir "/etc/netns/$n/ssh" "/etc/netns/$n" 2>/dev/null || true
    fi
  done
  rmdir /etc/netns 2>/dev/null || true  # only if empty: other tools may keep theirs there
  rm -rf "$DIR"
  say "down: namespaces, veth pair, daemons and $DIR removed"
}

main() {
  local cmd=${1:-}; shift || true
  case $cmd in
    up) cmd_up "$@" ;;
    down) cmd_down ;;
    check) preflight; say "ok: root, and network namespaces can be made" ;;
    status) [[ $(id -u) == 0 ]] || die "must run as root"; cmd_status ;;
    sshd)  # sshd NODE stop|start: make a node unreachable by ssh (tests), and back
      local node=${1:?usage: $0 sshd node1|node2 stop|start} action=${2:-}
      [[ " ${NODES[*]} " == *" $node "* ]] || die "unknown node '$node' (nodes: ${NODES[*]})"
      case $action in
        stop) [[ -f $DIR/ssh/sshd_$node.pid ]] && kill "$(cat "$DIR/ssh/sshd_$node.pid")" && rm -f "$DIR/ssh/sshd_$node.pid"
              say "sshd on $node stopped" ;;
        start) on_node "$node" /usr/sbin/sshd -f "$DIR/ssh/sshd_$node.conf" -E "$DIR/logs/sshd_$node.log"
               wait_for "ssh node1 -> $node" 20 on_node node1 timeout 10 ssh "$node" true; say "sshd on $node started" ;;
        *) die "usage: $0 sshd NODE stop|start" ;;
      esac ;;
    rate)  # rate RATE|none: re-shape both ends without tearing the cluster down
      [[ $(id -u) == 0 ]] || die "must run as root"
      local rate=${1:?usage: $0 rate RATE|none (e.g. 10gbit, 7812500bit)} n
      for n in "${NODES[@]}"; do
        ip netns list 2>/dev/null | grep -qw "$n" || die "netns $n is missing: run $0 up first"
      done
      for n in "${NODES[@]}"; do shape_link "$n" "$rate"; done
      for n in "${NODES[@]}"; do
        say "$n ${LINK[$n]}: $(t ip netns exec "$n" tc qdisc show dev "${LINK[$n]}" | head -n1)"
      done ;;
    link)  # link NODE down|up: a pulled cable (packets stop; no reset reaches the peer)
      [[ $(id -u) == 0 ]] || die "must run as root"
      local node=${1:?usage: $0 link node1|node2 down|up} state=${2:-}
      [[ " ${NODES[*]} " == *" $node "* ]] || die "unknown node '$node' (nodes: ${NODES[*]})"
      [[ $state == down || $state == up ]] || die "usage: $0 link NODE down|up"
      t ip -n "$node" link set "${LINK[$node]}" "$state"
      say "$node ${LINK[$node]}: $state" ;;
    exec)
      local node=${1:?usage: $0 exec node1|node2 COMMAND...}; shift
      [[ " ${NODES[*]} " == *" $node "* ]] || die "unknown node '$node' (nodes: ${NODES[*]})"
      exec_on_node "$node" "$@" ;;
    *) echo "usage: $0 up [--rate RATE] | down | status | check | rate RATE|none | link NODE down|up | exec NODE CMD... | sshd NODE stop|start" >&2; exit 2 ;;
  esac
}

# One line: bash has read it whole before main runs, so editing this file meanwhile is harmless.
main "$@"; exit $?
