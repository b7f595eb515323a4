#!/usr/bin/env bash
# Launch training with OpenMPI's mpirun (no mpi4py needed: qgalore_dist.integrations.launch reads OMPI_COMM_WORLD_*).
#   one node:     NP=4 launch/mpirun.sh [train args...]
#   several:      NP=16 MPI_HOSTFILE=hosts MASTER_ADDR=node01 launch/mpirun.sh [train args...]
# Environment: TRAIN (default "python -m qgalore_dist.train"), NP (default 2), MPI_HOSTFILE (OpenMPI
# format: "node01 slots=8"), MASTER_ADDR (required with MPI_HOSTFILE: the host of rank 0),
# MASTER_PORT (default 29500), MPIRUN_ARGS (extra flags, e.g. --oversubscribe).
set -euo pipefail

TRAIN=${TRAIN:-python -m qgalore_dist.train}
read -r -a train_cmd <<< "$TRAIN"  # split into words without globbing
read -r -a extra <<< "${MPIRUN_ARGS:-}"

args=(-np "${NP:-2}")
if [[ -n "${MPI_HOSTFILE:-}" ]]; then
  # No default: 127.0.0.1 would send the other nodes' ranks to their own loopback, and they would hang.
  : "${MASTER_ADDR:?set MASTER_ADDR to the host of rank 0 (first host of $MPI_HOSTFILE)}"
  args+=(--hostfile "$MPI_HOSTFILE")
else
  export MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
fi
export MASTER_PORT=${MASTER_PORT:-29500}
# -x forwards variables to remote nodes (local ranks inherit everything); PATH so that `python` is
# this venv's.  --bind-to none: OpenMPI binds each rank to ONE core when NP <= 2, which squeezes
# torch's intra-op threads onto it.
args+=(-x MASTER_ADDR -x MASTER_PORT -x PATH --bind-to none)

exec mpirun "${args[@]}" "${extra[@]}" "${train_cmd[@]}" "$@"
