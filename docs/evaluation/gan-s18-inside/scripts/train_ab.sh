#!/bin/bash
# session 18 A/B: the published recipe (session 15) from the published GAN, 1500 steps, one thread each,
# with and without the losses inside the brain (model.inside_brain)
cd /work/main
for arm in true false; do
  OMP_NUM_THREADS=1 mmdiff train --config gan-cpu --output-dir /work/runs/gan-s18-inside-$arm --max-steps 1500 --max-minutes 80 \
    --init-from pipelines/mmdiff-gan data.num_workers=0 validation.every=0 \
    "model.lesion_weight={1: 8, 2: 4, 3: 32}" data.lesion_oversample=3 "model.target_weight={t1c: 3}" \
    "data.dataset_oversample={ms: 4}" model.detail_bands=1 model.inside_brain=$arm > /work/runs/s18/train-$arm.log 2>&1 &
done
wait
