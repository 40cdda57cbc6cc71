#!/usr/bin/env bash
# The per-pixel mitigation study (configs/cifar10_cpu.py:mitigations_pixel: train the four
# models, coarse-to-fine SISes of 200 test images per model, report) and then
# benchmarks/accelerator.py, on one GPU, each within a time limit, so that one call of a
# lent machine returns both; a second call resumes the study where it stopped.
#
#   bash launch/mitigations_pixel_gpu.sh OUT_DIR [CIFAR10_ARCHIVE_OR_FOLDER] [WORKDIR]
#
# OUT_DIR receives study.log, accelerator.log/.json, results.tar.gz (the work directory
# without checkpoints) and models.tar.gz.* (the checkpoints, in pieces: cat them to untar). STUDY_SECONDS (default 420) and BENCH_SECONDS (default
# 150) bound the two parts.
set -uo pipefail
OUT=${1:?usage: $0 OUT_DIR [DATA] [WORKDIR]}
DATA=${2:-.data/cifar10_jpeg.tar.gz}
W=${3:-/tmp/mitigations_pixel}
mkdir -p "$OUT"
start=$(date +%s)
timeout "${STUDY_SECONDS:-420}" python3 -m overinterp_jax.main \
  --config=configs/cifar10_cpu.py:mitigations_pixel --workdir="$W" \
  --config.data.path="$DATA" "--config.stages=('train','sis','report')" \
  --config.runtime.progress=False 2>&1 | tee "$OUT/study.log"
echo "study: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/study.log"
start=$(date +%s)
timeout "${BENCH_SECONDS:-150}" python3 benchmarks/accelerator.py --out "$OUT/accelerator.json" \
  2>&1 | tee "$OUT/accelerator.log"
echo "accelerator: exit ${PIPESTATUS[0]} after $(( $(date +%s) - start )) s" | tee -a "$OUT/accelerator.log"
# The results without the models' checkpoints, and the checkpoints in pieces of 15 MiB
# (a lent machine returns files of at most 16 MiB).
tar czf "$OUT/results.tar.gz" --exclude='*/checkpoints' --exclude='*/data_cache' -C "$(dirname "$W")" "$(basename "$W")"
(cd "$(dirname "$W")" && find "$(basename "$W")" -type d -name checkpoints -print0 \
   | tar czf - --null -T -) | split -b 15M - "$OUT/models.tar.gz."
ls -la "$OUT"
