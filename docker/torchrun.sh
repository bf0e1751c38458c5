#!/usr/bin/env bash
# Multi-GPU / multi-node with torchrun (no SLURM). Run the same line on every node:
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0 docker/torchrun.sh --data.root /data/imagenet/train
#   NNODES=2 NODE_RANK=1 MASTER_ADDR=node0 docker/torchrun.sh --data.root /data/imagenet/train
#
# torchrun starts one process per GPU; Lightning detects it (TorchElasticEnvironment) and runs
# DDP (or the config's strategy). Extra arguments go to `fit`. Inside the container, prefix the
# command with `docker run --gpus all --ipc=host --network=host -v ... --entrypoint torchrun ssl-kit`.
set -euo pipefail

NNODES=${NNODES:-1}
NODE_RANK=${NODE_RANK:-0}
GPUS_PER_NODE=${GPUS_PER_NODE:-$(nvidia-smi -L 2>/dev/null | wc -l)}
MASTER_ADDR=${MASTER_ADDR:-127.0.0.1}
MASTER_PORT=${MASTER_PORT:-29500}
CONFIG=${CONFIG:-configs/mae.yaml}

exec torchrun \
    --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
    --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
    -m ssl_kit fit --config "$CONFIG" \
    --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE" \
    "$@"
