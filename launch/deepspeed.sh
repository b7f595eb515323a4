#!/usr/bin/env bash
# Launch training with DeepSpeed's own launcher.
#   one node:     NUM_GPUS=8 launch/deepspeed.sh [train args...]
#   several:      HOSTFILE=launch/hostfile NUM_GPUS=8 launch/deepspeed.sh [train args...]
# Environment: TRAIN (default "python -m qgalore_dist.train"), NUM_GPUS (default: every local
# accelerator; on CPU the launcher counts NUMA nodes, so set it), HOSTFILE, NUM_NODES,
# MASTER_ADDR (several nodes; default: DeepSpeed runs `ssh <first host> hostname -I`),
# MASTER_PORT (default 29500).  Extra launcher flags: DS_ARGS="--enable_each_rank_log logs".
# Each rank gets RANK/LOCAL_RANK/WORLD_SIZE/LOCAL_SIZE/MASTER_* (source "env" of qgalore_dist.integrations.launch).
set -euo pipefail

TRAIN=${TRAIN:-python -m qgalore_dist.train}
read -r -a train_cmd <<< "$TRAIN"  # split into words without globbing
read -r -a extra <<< "${DS_ARGS:-}"

# --no_python: TRAIN is a whole command (python -m ..., or a wrapper).  --no_local_rank: ranks read
# LOCAL_RANK from the environment, so the entry point need not parse --local_rank=N.
args=(--no_python --no_local_rank --master_port "${MASTER_PORT:-29500}")
if [[ -n "${NUM_GPUS:-}" ]]; then args+=(--num_gpus "$NUM_GPUS"); fi
if [[ -n "${HOSTFILE:-}" ]]; then
  # pdsh + passwordless ssh start one launcher per host in this directory.  Remote shells do not
  # inherit this environment: put PATH=<venv>/bin:... (and NCCL_* etc.) into ./.deepspeed_env.
  [[ -r $HOSTFILE ]] || { echo "deepspeed.sh: HOSTFILE=$HOSTFILE is not a readable file" >&2; exit 2; }
  # A host that ssh cannot reach makes pdsh print one line and go on, while the ranks on the other
  # hosts wait for it until the process-group timeout.  Check every host first (SSH_CHECK=0 skips).
  if [[ ${SSH_CHECK:-1} != 0 ]]; then
    mapfile -t hosts < <(sed -E 's/#.*//' "$HOSTFILE" | awk 'NF {print $1}' | head -n "${NUM_NODES:-100000}")
    unreachable=()
    for h in "${hosts[@]}"; do
      timeout 20 ssh -o BatchMode=yes -o ConnectTimeout=10 "$h" true </dev/null >/dev/null 2>&1 || unreachable+=("$h")
    done
    if [[ ${#unreachable[@]} -gt 0 ]]; then
      echo "deepspeed.sh: cannot ssh (passwordless, 10 s timeout) to ${unreachable[*]} from $(hostname)," \
           "listed in $HOSTFILE; fix ssh or drop the host (try: ssh ${unreachable[0]} true)" >&2
      exit 3
    fi
  fi
  args+=(--hostfile "$HOSTFILE" --launcher pdsh)
  if [[ -n "${NUM_NODES:-}" ]]; then args+=(--num_nodes "$NUM_NODES"); fi
  if [[ -n "${MASTER_ADDR:-}" ]]; then args+=(--master_addr "$MASTER_ADDR"); fi
fi

# Not exec: SIGTERM/SIGINT to this script (scancel, a scheduler's preemption, kill, Ctrl-C) must reach
# the ranks, which checkpoint and exit 0.  Sent to the `deepspeed` runner it would kill only the
# runner (it installs no handler on one node) and leave the ranks running; sent to
# deepspeed.launcher.launch it would terminate them, SIGKILL them after 30 s and exit 1 anyway.  So the
# signal goes to the ranks (children of launch, itself a child of the runner) and launch and the
# runner exit with the ranks' status.  With HOSTFILE the ranks run on other hosts: the runner gets
# the signal and stops them through pdsh (exit status 1).
deepspeed "${args[@]}" "${extra[@]}" "${train_cmd[@]}" "$@" &
runner=$!

forward() {
  local sig=$1 launcher
  if [[ -n "${HOSTFILE:-}" ]]; then
    kill -s "$sig" "$runner" 2>/dev/null || true
    return
  fi
  echo "launch/deepspeed.sh: SIG$sig: forwarding it to the ranks (they checkpoint and exit)" >&2
  for launcher in $(pgrep -P "$runner"); do
    pkill -"$sig" -P "$launcher" || true
  done
}
trap 'forward TERM' TERM
trap 'forward INT' INT

rc=0
while :; do
  wait "$runner" || rc=$?         # a trapped signal interrupts wait: wait again for the real exit
  kill -0 "$runner" 2>/dev/null || break
  rc=0
done
exit "$rc"
