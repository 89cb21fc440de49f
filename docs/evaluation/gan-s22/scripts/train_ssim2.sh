#!/bin/bash
# session 22: 1 - SSIM (inside the brain) beside the synthesis L1, lambda_ssim 20, 1500 more steps from the published GAN (itself the first SSIM arm), its recipe
set -e
cd /work/main
OMP_NUM_THREADS=2 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s22-ssim2 --max-steps 1500 --max-minutes 40 \
  --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
  data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 4}" model.detail_bands=1 \
  model.inside_brain=true train.dataset_dropout=0.1 "model.lesion_weight={1: 8, 2: 4, 3: 32}" \
  "model.lambdas={lambda_syn: 100.0, lambda_rec: 30.0, lambda_adv: 1.0, lambda_ssim: 20.0}" \
  > /work/runs/s22/train-ssim2.log 2>&1
mmdiff export /work/runs/gan-s22-ssim2 /work/eval/s22/gan-ssim2 --overwrite > /dev/null
echo done > /work/runs/s22/ssim2.done
