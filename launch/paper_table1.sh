#!/usr/bin/env bash
# The paper's Table 1 grid: every architecture × seed, one work directory each,
# then one combined table (python -m overinterp_jax.collect).
#
#   launch/paper_table1.sh configs/cifar10.py workdirs/table1 [--config.key=value ...]
#
# Runs the combinations one after another on this machine (all its devices);
# on a cluster, submit one launch/slurm_gpu.sbatch job per combination instead
# (same --workdir layout: <root>/<model>_seed<seed>). Re-running resumes.
set -euo pipefail
config=${1:?config file}
root=${2:?root work directory}
shift 2
cd "$(dirname "$0")/.."
models=${MODELS:-"resnet20 resnet18 vgg16"}
seeds=${SEEDS:-"0 1 2"}
for model in $models; do
  for seed in $seeds; do
    python3 -m overinterp_jax.main --config="$config" --workdir="$root/${model}_seed${seed}" \
      --config.model.name="$model" --config.train.seed="$seed" "$@"
  done
done
python3 -m overinterp_jax.collect "$root"/*_seed* | tee "$root/table1.md"
