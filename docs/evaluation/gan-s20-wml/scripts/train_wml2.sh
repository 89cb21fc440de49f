#!/bin/bash
# session 20, second arm: 1500 more steps from train_wml.sh's weights with the WML cohort's slices
# three times as often (data.dataset_oversample={ms: 4, wml: 3}); otherwise the same recipe.
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s20-wml2 --max-steps 1500 --max-minutes 40 \
  --init-from /work/eval/s20/gan-wml data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  "model.lesion_weight={1: 8, 2: 4, 3: 32}" data.lesion_oversample=3 "model.target_weight={t1c: 3}" \
  "data.dataset_oversample={ms: 4, wml: 3}" model.detail_bands=1 model.inside_brain=true train.dataset_dropout=0.1 $@ \
  > /work/runs/s20/train-wml2.log 2>&1
mmdiff export /work/runs/gan-s20-wml2 /work/eval/s20/gan-wml2 --overwrite > /dev/null
mmdiff evaluate --pipeline /work/eval/s20/gan-wml2 /work/eval/s20/gan-wml \
  --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s20/wml2-ab --overwrite --quiet > /work/runs/s20/wml2-ab-eval.log 2>&1
