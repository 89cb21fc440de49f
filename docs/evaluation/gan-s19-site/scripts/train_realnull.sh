#!/bin/bash
# session 19: the null embedding trained on the real cohorts only (their ids dropped with p = 0.3, the
# phantoms' never); 1500 steps from the published GAN, its recipe, bf16, two threads. Its control is
# train_abc.sh's `control` arm (the same steps and recipe, dataset dropout 0.1 on every dataset).
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s19-realnull --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  "model.lesion_weight={1: 8, 2: 4, 3: 32}" data.lesion_oversample=3 "model.target_weight={t1c: 3}" \
  "data.dataset_oversample={ms: 4}" model.detail_bands=1 model.inside_brain=true \
  train.dataset_dropout=0.3 "train.dataset_dropout_from=[brats,ms,wml]" > /work/runs/s19/train-realnull.log 2>&1
mmdiff export /work/runs/gan-s19-realnull /work/eval/s19/gan-realnull --overwrite > /dev/null
mmdiff evaluate --pipeline /work/eval/s19/gan-realnull /work/eval/s19/gan-control --unseen-site --datasets brats ms wml \
  --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s19/realnull --overwrite --quiet > /work/runs/s19/realnull-eval.log 2>&1
