#!/bin/bash
# session 20: the WML cohort's lesions weighted as lesions. Cache format 2 stores its 8-bit masks' 255 as
# label 1, so the recipe's model.lesion_weight={1: 8, ...} now reaches them (format 1 kept 255: weight 1).
# 1500 steps from the published GAN, the session-18/19 recipe, bf16, two threads: the same run as
# session 19's `control` arm (docs/evaluation/gan-s19-site/scripts/train_abc.sh), on the format-2 cache.
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s20-wml --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  "model.lesion_weight={1: 8, 2: 4, 3: 32}" data.lesion_oversample=3 "model.target_weight={t1c: 3}" \
  "data.dataset_oversample={ms: 4}" model.detail_bands=1 model.inside_brain=true train.dataset_dropout=0.1 $@ > /work/runs/s20/train-wml.log 2>&1
mmdiff export /work/runs/gan-s20-wml /work/eval/s20/gan-wml --overwrite > /dev/null
mmdiff evaluate --pipeline /work/eval/s20/gan-wml /work/eval/s19/gan-control pipelines/mmdiff-gan \
  --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s20/wml-ab --overwrite --quiet > /work/runs/s20/wml-ab-eval.log 2>&1
