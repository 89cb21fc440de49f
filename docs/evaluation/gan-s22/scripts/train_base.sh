#!/bin/bash
# session 22: the detail transfer spans the whole source (model.detail_base=true), 1500 steps from the published GAN, its recipe
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s22-base --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 4}" model.detail_bands=1 \
  model.inside_brain=true train.dataset_dropout=0.1 "model.lesion_weight={1: 8, 2: 4, 3: 32}" model.detail_base=true \
  > /work/runs/s22/train-base.log 2>&1
mmdiff export /work/runs/gan-s22-base /work/eval/s22/gan-base --overwrite > /dev/null
echo done > /work/runs/s22/base.done
