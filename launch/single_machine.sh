#!/usr/bin/env bash
# One machine (CPU, one or more GPUs, Colab): all local devices, no coordinator.
#
#   launch/single_machine.sh configs/cifar10_cpu.py workdirs/cifar10_cpu [--config.key=value ...]
#
# For GPUs install the CUDA build first: pip install -U 'jax[cuda12]'.
set -euo pipefail
config=${1:?config file}
workdir=${2:?work directory}
shift 2
cd "$(dirname "$0")/.."
exec python3 -m overinterp_jax.main --config="$config" --workdir="$workdir" "$@"
