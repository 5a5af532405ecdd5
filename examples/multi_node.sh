#!/usr/bin/env bash
# GRPO over several machines: the generation server on one, `accelerate launch` on each training machine.
#
#   gen0$    MODEL=Qwen/Qwen2.5-7B-Instruct examples/multi_node.sh server
#   train0$  MODEL=Qwen/Qwen2.5-7B-Instruct SERVER_IP=10.0.0.1 MAIN_IP=10.0.0.2 MACHINE_RANK=0 examples/multi_node.sh train
#   train1$  MODEL=Qwen/Qwen2.5-7B-Instruct SERVER_IP=10.0.0.1 MAIN_IP=10.0.0.2 MACHINE_RANK=1 examples/multi_node.sh train
#
# MAIN_IP is training machine 0 (it hosts the processes' rendezvous and is the one process that talks to the
# server); the server must reach it too, for weight pushes. Arguments after the role go to `fastgrpo
# vllm-serve` (server) or to the training script (train), e.g. `train --max_steps 10`. To spread generation
# over several machines as well, see docs/multi-node.md (--headless engines).
set -euo pipefail
ROLE=${1:?usage: $0 server|train [arguments...]}
shift
HERE=$(cd "$(dirname "$0")" && pwd)
MODEL=${MODEL:-Qwen/Qwen2.5-1.5B-Instruct}
SERVER_IP=${SERVER_IP:-127.0.0.1}          # the generation machine
SERVER_PORT=${SERVER_PORT:-8000}
NUM_MACHINES=${NUM_MACHINES:-2}            # training machines
MACHINE_RANK=${MACHINE_RANK:-0}            # this one: 0 .. NUM_MACHINES-1
MAIN_IP=${MAIN_IP:-127.0.0.1}              # training machine 0
MAIN_PORT=${MAIN_PORT:-29500}
PROCS_PER_MACHINE=${PROCS_PER_MACHINE:-8}  # one per GPU
SCRIPT=${SCRIPT:-$HERE/math_accuracy.py}

case "$ROLE" in
  server)
    exec fastgrpo vllm-serve --model "$MODEL" --host 0.0.0.0 --port "$SERVER_PORT" "$@" ;;
  train)
    exec accelerate launch --config_file "$HERE/accelerate/ddp.yaml" \
      --num_machines "$NUM_MACHINES" --machine_rank "$MACHINE_RANK" \
      --num_processes $((NUM_MACHINES * PROCS_PER_MACHINE)) \
      --main_process_ip "$MAIN_IP" --main_process_port "$MAIN_PORT" \
      "$SCRIPT" --model_name_or_path "$MODEL" --vllm_server_base_url "http://$SERVER_IP:$SERVER_PORT" "$@" ;;
  *)
    echo "$0: the role is 'server' or 'train', not '$ROLE'" >&2; exit 2 ;;
esac
