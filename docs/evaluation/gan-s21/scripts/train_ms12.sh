#!/bin/bash
# session 21: the MS slices 12 times per epoch (published: 4), else as published, 1500 steps from the published GAN
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s21-ms12 --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 12}" model.detail_bands=1 \
  model.inside_brain=true train.dataset_dropout=0.1 "model.lesion_weight={1: 8, 2: 4, 3: 32}" > /work/runs/s21/train-ms12.log 2>&1
mmdiff export /work/runs/gan-s21-ms12 /work/eval/s21/gan-ms12 --overwrite > /dev/null
echo done > /work/runs/s21/ms12.done
