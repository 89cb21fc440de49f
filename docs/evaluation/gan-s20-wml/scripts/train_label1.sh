#!/bin/bash
# session 20, two arms side by side (one thread each), 1500 steps from the published (session-20) GAN:
#   more     the recipe as published (the control: what 1500 more steps do)
#   label1   model.lesion_weight={1: 24, ...} (label 1 three times heavier: WML and MS lesions, BraTS necrotic core)
set -e
cd /work/main
arm() {
  name=$1; shift
  OMP_NUM_THREADS=1 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s20-$name --max-steps 1500 --max-minutes 40 \
    --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
    data.lesion_oversample=3 "model.target_weight={t1c: 3}" "data.dataset_oversample={ms: 4}" model.detail_bands=1 \
    model.inside_brain=true train.dataset_dropout=0.1 "$@" > /work/runs/s20/train-$name.log 2>&1
  mmdiff export /work/runs/gan-s20-$name /work/eval/s20/gan-$name --overwrite > /dev/null
}
arm more "model.lesion_weight={1: 8, 2: 4, 3: 32}" &
arm label1 "model.lesion_weight={1: 24, 2: 4, 3: 32}" &
wait
mmdiff evaluate --pipeline /work/eval/s20/gan-label1 /work/eval/s20/gan-more pipelines/mmdiff-gan \
  --data ~/.cache/mmdiff/cpu-v2 --slice-stride 4 --out /work/eval/s20/label1 --overwrite --quiet > /work/runs/s20/label1-eval.log 2>&1
