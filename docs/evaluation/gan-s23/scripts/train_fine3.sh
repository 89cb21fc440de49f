#!/bin/bash
# session 23: the full-resolution head (model.fine_channels=16) on the published recipe (lambda_ssim 20),
# 2500 more steps from the second fine-head run (the published one; generator, head and discriminators)
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s23-fine3 --max-steps 2500 --max-minutes 36 \
  --init-from /work/runs/gan-s23-fine2/checkpoint-2500 data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 4}" model.detail_bands=1 \
  model.inside_brain=true train.dataset_dropout=0.1 "model.lesion_weight={1: 8, 2: 4, 3: 32}" model.fine_channels=16 \
  "model.lambdas={lambda_syn: 100.0, lambda_rec: 30.0, lambda_adv: 1.0, lambda_ssim: 20.0}" checkpoint.every=500 \
  > /work/runs/s23/train-fine3.log 2>&1
mmdiff export /work/runs/gan-s23-fine3 /work/eval/s23/gan-fine3 --overwrite > /dev/null
echo done > /work/runs/s23/fine3.done
