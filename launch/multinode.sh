#!/usr/bin/env bash
# Multi-node training with torchrun and c10d rendezvous: no ssh, no hostfile -- run this SAME command on every
# node (a login shell per node, a Slurm step, a Kubernetes pod...). Node ranks are assigned at rendezvous.
#
#   NNODES          number of nodes (default 1)
#   NPROC_PER_NODE  processes per node (default: the node's GPUs, or 1 without GPUs)
#   MASTER_ADDR     host name or address of one node that every node can reach; it hosts the rendezvous store
#   MASTER_PORT     its port (default 29400)
#   RUN_ID          rendezvous id, the same on the nodes of one job and different between jobs (default: scha-vae)
#
# Arguments are Hydra overrides for launch.train. Use a run_dir on storage every node mounts (checkpoint shards
# of all ranks go there) and keep it fixed per run, e.g.:
#   NNODES=2 MASTER_ADDR=node0 launch/multinode.sh experiment=omniglot_ns_ns run_dir=/shared/runs/ns
set -euo pipefail
: "${MASTER_ADDR:?set MASTER_ADDR to a node every node can reach (the rendezvous host)}"
NPROC_PER_NODE=${NPROC_PER_NODE:-$(python -c 'import torch; print(torch.cuda.device_count() or 1)')}
exec torchrun \
  --nnodes="${NNODES:-1}" \
  --nproc-per-node="${NPROC_PER_NODE}" \
  --rdzv-backend=c10d \
  --rdzv-endpoint="${MASTER_ADDR}:${MASTER_PORT:-29400}" \
  --rdzv-id="${RUN_ID:-scha-vae}" \
  ${TORCHRUN_ARGS:-} \
  -m launch.train "$@"
