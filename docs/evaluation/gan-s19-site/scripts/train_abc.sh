#!/bin/bash
# session 19: three arms of 1500 steps from the published GAN (session-18 recipe, bf16 autocast on a CPU
# with AVX512-BF16), one thread each, side by side:
#   control  train.dataset_dropout=0.1 (the recipe as published)
#   drop3    train.dataset_dropout=0.3 (the null "unseen site" embedding trained three times as often)
#   drop3g   train.dataset_dropout=0.3 + train.source_gamma=[0.7,1.4] (sources' contrast changed)
cd /work/main
mkdir -p /work/runs/s19
arm() {
  name=$1; shift
  OMP_NUM_THREADS=1 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s19-$name --max-steps 1500 --max-minutes 75 \
    --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 train.mixed_precision=bf16 \
    "model.lesion_weight={1: 8, 2: 4, 3: 32}" data.lesion_oversample=3 "model.target_weight={t1c: 3}" \
    "data.dataset_oversample={ms: 4}" model.detail_bands=1 model.inside_brain=true "$@" > /work/runs/s19/train-$name.log 2>&1
}
arm control train.dataset_dropout=0.1 &
arm drop3 train.dataset_dropout=0.3 &
arm drop3g train.dataset_dropout=0.3 "train.source_gamma=[0.7,1.4]" &
wait
