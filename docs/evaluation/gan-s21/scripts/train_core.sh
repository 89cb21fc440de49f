#!/bin/bash
# session 21: the BraTS core (label 1 in BraTS only) three times heavier, WML and MS lesions as published (model.dataset_lesion_weight), 1500 steps from the published GAN
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s21-core --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 4}" model.detail_bands=1 \
  model.inside_brain=true train.dataset_dropout=0.1 "model.lesion_weight={1: 8, 2: 4, 3: 32}" "model.dataset_lesion_weight={brats: {1: 24, 2: 4, 3: 32}}" > /work/runs/s21/train-core.log 2>&1
mmdiff export /work/runs/gan-s21-core /work/eval/s21/gan-core --overwrite > /dev/null
echo done > /work/runs/s21/core.done
