#!/usr/bin/env bash
# Run a config on every worker of a Cloud TPU VM (single host or pod slice).
#
#   launch/tpu_vm.sh TPU_NAME ZONE configs/cifar10.py /mnt/gcs/workdirs/cifar10 [--config.key=value ...]
#   launch/tpu_vm.sh TPU_NAME ZONE configs/imagenet.py /mnt/gcs/workdirs/imagenet \
#       --config.data.data_dir=/mnt/gcs/tfds --config.model.weights=/mnt/gcs/inception_v3.safetensors
#
# ImageNet (docs/imagenet.md): every worker streams its own rows of every batch from the
# shared TFDS ArrayRecord files (--config.runtime.data_workers decoding processes each);
# backselect shards are computed by all workers together and written by worker 0.
# Each worker runs the same command; `--config.runtime.distributed=True` makes main call
# jax.distributed.initialize(), which finds the other workers by itself on TPU VMs.
# The work directory must be a POSIX path on storage every host sees (Filestore/NFS,
# or a GCS bucket mounted with gcsfuse, e.g. /mnt/gcs/workdirs/cifar10): the pipeline
# writes .npz/.json results with rename-into-place and validates them on read, so a
# non-atomic rename (gcsfuse) can tear a file but never make a torn file trusted.
# Re-running the same command resumes.
set -euo pipefail
tpu=$1 zone=$2 config=$3 workdir=$4
shift 4
repo=${REPO_URL:-$(git config --get remote.origin.url)}
gcloud compute tpus tpu-vm ssh "$tpu" --zone="$zone" --worker=all --command="
  set -e
  [ -d overinterp_jax ] || git clone '$repo' overinterp_jax
  cd overinterp_jax && git pull --ff-only
  python3 -m pip install -q -e . 'jax[tpu]' -f https://storage.googleapis.com/jax-releases/libtpu_releases.html
  python3 -m overinterp_jax.main --config='$config' --workdir='$workdir' --config.runtime.distributed=True $*
"
